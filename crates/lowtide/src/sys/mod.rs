//! The operating-system edge: every `unsafe` block of the crate lives here.
//!
//! Each block carries a `// SAFETY:` comment saying why it holds. The rest of the crate
//! talks to the kernel through the safe types below.

mod buf;
pub(crate) mod cast;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod direct;
pub(crate) mod fork;
mod mapping;
pub(crate) mod open;

pub(crate) use buf::AlignedBuf;
pub(crate) use mapping::{CacheRun, Mapping};

/// The kernel's page size, read once.
pub(crate) fn page_size() -> usize {
    rustix::param::page_size()
}

/// The largest page-aligned range inside `[start, start + len)`: pages wholly owned by it.
///
/// Tensors share their boundary pages with their neighbours; only the inner pages may be
/// released without touching a neighbour's bytes.
pub(crate) fn inner_pages(start: u64, len: u64, page: u64) -> Option<(u64, u64)> {
    let end = start.checked_add(len)?;
    let first = start.div_ceil(page).checked_mul(page)?;
    let last = end / page * page;
    (last > first).then(|| (first, last - first))
}

#[cfg(test)]
mod tests {
    use super::inner_pages;

    #[test]
    fn inner_pages_rounds_inward() {
        assert_eq!(inner_pages(0, 8192, 4096), Some((0, 8192)));
        assert_eq!(inner_pages(1, 8192, 4096), Some((4096, 4096)));
        assert_eq!(inner_pages(100, 4000, 4096), None);
        assert_eq!(inner_pages(4095, 4098, 4096), Some((4096, 4096)));
        assert_eq!(inner_pages(u64::MAX - 1, 10, 4096), None);
    }
}

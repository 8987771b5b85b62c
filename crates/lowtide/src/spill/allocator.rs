//! Extent allocator for the spill file: first fit over a coalescing free list.
//!
//! Invariants (checked by the property test): extents handed out never overlap each other or
//! a free range; free ranges are disjoint, non-adjacent (coalesced) and below `end`; every
//! offset and length is a multiple of `BLOCK`.

use std::collections::BTreeMap;

/// Allocation granularity: one page, so holes can be punched and direct I/O used.
pub(crate) const BLOCK: u64 = 4096;

#[derive(Debug, Default)]
pub(crate) struct Allocator {
    /// Free ranges below `end`: offset -> length.
    free: BTreeMap<u64, u64>,
    /// One past the last byte ever handed out and not given back at the tail.
    end: u64,
}

/// Rounds up to whole blocks (at least one).
pub(crate) fn blocks(len: u64) -> u64 {
    len.max(1).div_ceil(BLOCK) * BLOCK
}

impl Allocator {
    /// One past the last byte handed out (the used tail of the file).
    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    /// Allocates `len` bytes (a multiple of `BLOCK`); returns the offset.
    pub(crate) fn allocate(&mut self, len: u64) -> u64 {
        debug_assert_eq!(len % BLOCK, 0);
        let fit = self
            .free
            .iter()
            .find(|&(_, &l)| l >= len)
            .map(|(&o, &l)| (o, l));
        if let Some((offset, free_len)) = fit {
            self.free.remove(&offset);
            if free_len > len {
                self.free.insert(offset + len, free_len - len);
            }
            return offset;
        }
        let offset = self.end;
        self.end += len;
        offset
    }

    /// Gives `[offset, offset + len)` back.
    pub(crate) fn free(&mut self, mut offset: u64, mut len: u64) {
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            self.free.remove(&prev);
            offset = prev;
            len += prev_len;
        }
        if let Some(&next_len) = self.free.get(&(offset + len)) {
            self.free.remove(&(offset + len));
            len += next_len;
        }
        if offset + len == self.end {
            self.end = offset;
        } else {
            self.free.insert(offset, len);
        }
    }

    #[cfg(test)]
    fn free_ranges(&self) -> Vec<(u64, u64)> {
        self.free.iter().map(|(&o, &l)| (o, l)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{Allocator, BLOCK, blocks};
    use proptest::prelude::*;

    #[test]
    fn reuses_and_coalesces() {
        let mut a = Allocator::default();
        let x = a.allocate(BLOCK);
        let y = a.allocate(2 * BLOCK);
        let z = a.allocate(BLOCK);
        assert_eq!((x, y, z), (0, BLOCK, 3 * BLOCK));
        a.free(x, BLOCK);
        a.free(y, 2 * BLOCK);
        assert_eq!(a.free_ranges(), vec![(0, 3 * BLOCK)]);
        assert_eq!(a.allocate(2 * BLOCK), 0);
        a.free(z, BLOCK);
        assert_eq!(a.end(), 2 * BLOCK, "freeing the tail shrinks the end");
        assert_eq!(blocks(0), BLOCK);
        assert_eq!(blocks(BLOCK + 1), 2 * BLOCK);
    }

    proptest! {
        #[test]
        fn extents_never_overlap(ops in proptest::collection::vec((any::<bool>(), 1u64..6, any::<prop::sample::Index>()), 1..200)) {
            let mut a = Allocator::default();
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (alloc, size, pick) in ops {
                if alloc || live.is_empty() {
                    let len = size * BLOCK;
                    live.push((a.allocate(len), len));
                } else {
                    let (o, l) = live.swap_remove(pick.index(live.len()));
                    a.free(o, l);
                }
                let mut all: Vec<(u64, u64, bool)> = live.iter().map(|&(o, l)| (o, l, true)).collect();
                all.extend(a.free_ranges().into_iter().map(|(o, l)| (o, l, false)));
                all.sort_unstable();
                for pair in all.windows(2) {
                    prop_assert!(pair[0].0 + pair[0].1 <= pair[1].0, "overlap: {:?}", pair);
                    prop_assert!(pair[0].2 || pair[1].2 || pair[0].0 + pair[0].1 < pair[1].0, "free ranges not coalesced");
                }
                for &(o, l, _) in &all {
                    prop_assert!(o % BLOCK == 0 && l % BLOCK == 0 && o + l <= a.end());
                }
                let covered: u64 = all.iter().map(|&(_, l, _)| l).sum();
                prop_assert_eq!(covered, a.end(), "live + free tile [0, end)");
            }
        }
    }
}

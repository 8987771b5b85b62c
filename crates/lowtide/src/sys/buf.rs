//! Page-aligned owned buffers for RAM copies (aligned so that direct I/O can fill them).
//!
//! Large buffers are their own anonymous mappings, aligned to 2 MiB and marked for
//! transparent huge pages: the kernel hands out zeroed pages itself (no `memset` pass over
//! fresh memory), faults them in 2 MiB at a time where it can, and gives a buffer back to the
//! system in one `munmap` that frees 512 pages per huge page instead of one — dropping a
//! 1 GiB copy costs a few milliseconds instead of about a hundred (docs/performance.md).

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every RAM copy: one page, which also satisfies `O_DIRECT` on common devices.
const ALIGN: usize = 4096;

/// Buffers at least this large are mappings of their own; smaller ones come from the
/// allocator, which reuses memory between them.
const MAP_MIN: usize = 256 << 10;

/// Transparent huge page size on x86-64 and most arm64 kernels. Mappings of at least this
/// size start on such a boundary so that every whole 2 MiB of them can be a huge page.
const HUGE: usize = 2 << 20;

/// An owned, zero-initialised, page-aligned byte buffer.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes mapped at `ptr` when the buffer is a mapping of its own, else 0.
    mapped: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively, like `Box<[u8]>`; sharing `&AlignedBuf`
// only hands out `&[u8]`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes, or `None` when the system refuses.
    pub(crate) fn zeroed(len: usize) -> Option<Self> {
        if len == 0 {
            return Some(Self {
                ptr: NonNull::<[u8; ALIGN]>::dangling().cast(),
                len: 0,
                mapped: 0,
            });
        }
        if len >= MAP_MIN {
            return Self::mapped(len);
        }
        let layout = Layout::from_size_align(len, ALIGN).ok()?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(ptr).map(|ptr| Self {
            ptr,
            len,
            mapped: 0,
        })
    }

    /// A private anonymous mapping of `len` bytes (rounded up to pages), starting on a 2 MiB
    /// boundary when it is at least that large, with huge pages asked for.
    fn mapped(len: usize) -> Option<Self> {
        use rustix::mm::{Advice, MapFlags, ProtFlags, madvise, mmap_anonymous, munmap};
        let size = len.checked_next_multiple_of(ALIGN)?;
        let huge = size >= HUGE;
        // Over-reserve by one huge page so that an aligned start lies inside, then trim.
        let reserve = if huge { size.checked_add(HUGE)? } else { size };
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks; it
        // aliases nothing.
        let base = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                reserve,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .ok()? as usize;
        let start = if huge {
            base.next_multiple_of(HUGE)
        } else {
            base
        };
        let (head, tail) = (start - base, base + reserve - (start + size));
        // SAFETY: `[base, start)` and `[start + size, base + reserve)` lie inside the mapping
        // just made, which nothing else refers to. A failure leaves them mapped: wasted
        // address space, never a wrong buffer.
        unsafe {
            if head > 0 {
                let _ = munmap(base as *mut std::ffi::c_void, head);
            }
            if tail > 0 {
                let _ = munmap((start + size) as *mut std::ffi::c_void, tail);
            }
        }
        if huge {
            // SAFETY: `[start, start + size)` is this buffer's own mapping. Advisory: where
            // transparent huge pages are off the buffer simply has small pages.
            let _ = unsafe { madvise(start as *mut std::ffi::c_void, size, Advice::LinuxHugepage) };
        }
        Some(Self {
            ptr: NonNull::new(start as *mut u8)?,
            len,
            mapped: size,
        })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes (zeroed at allocation: by the
        // allocator, or as fresh anonymous pages) for as long as `self` lives; a zero-length
        // buffer uses an aligned dangling pointer, which is valid for empty slices.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        if self.mapped > 0 {
            // SAFETY: `[ptr, ptr + mapped)` is the mapping this buffer made and owns; no
            // reference into it outlives `self`.
            if let Err(err) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.mapped) } {
                log::warn!("munmap of a {} byte buffer failed: {err}", self.mapped);
            }
            return;
        }
        // SAFETY: the pointer came from `alloc_zeroed` with exactly this layout, which was valid
        // when the buffer was created.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, ALIGN),
            );
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::{AlignedBuf, HUGE, MAP_MIN};

    #[test]
    fn aligned_and_zeroed() {
        for len in [
            1,
            10_000,
            MAP_MIN - 1,
            MAP_MIN,
            MAP_MIN + 1,
            HUGE - 1,
            HUGE,
            3 * HUGE + 5,
        ] {
            let mut buf = AlignedBuf::zeroed(len).unwrap();
            assert_eq!(buf.as_slice().len(), len);
            assert_eq!(buf.as_slice().as_ptr() as usize % 4096, 0, "len {len}");
            if len >= HUGE {
                assert_eq!(buf.as_slice().as_ptr() as usize % HUGE, 0, "len {len}");
            }
            assert!(buf.as_slice().iter().all(|&b| b == 0), "len {len}");
            // Every byte is writable, the last one included.
            buf.as_mut_slice().fill(0xa5);
            assert!(buf.as_slice().iter().all(|&b| b == 0xa5), "len {len}");
        }
        let empty = AlignedBuf::zeroed(0).unwrap();
        assert!(empty.as_slice().is_empty());
    }

    #[test]
    fn refuses_impossible_sizes() {
        assert!(AlignedBuf::zeroed(usize::MAX - 100).is_none());
        assert!(AlignedBuf::zeroed(1 << 62).is_none());
    }
}

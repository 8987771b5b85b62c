//! Read-only shared mappings of model files.
//!
//! The contract (as with any file mapping): the file must not be truncated while mapped, or an
//! access to the missing pages raises SIGBUS. lowtide checks the file's identity before it hands
//! out mapped bytes and faults ranges in with `MADV_POPULATE_READ`, which fails with `EFAULT`
//! instead of raising a signal; what it cannot prevent is documented in `docs/reliability.md`.

use std::fs::File;
use std::io;

use memmap2::{Advice, Mmap, MmapOptions, UncheckedAdvice};

/// A read-only `MAP_SHARED` mapping of a whole file.
#[derive(Debug)]
pub(crate) struct Mapping {
    map: Option<Mmap>,
}

impl Mapping {
    /// Maps the first `len` bytes of `file` read-only and shared.
    pub(crate) fn map(file: &File, len: u64) -> io::Result<Self> {
        if len == 0 {
            return Ok(Self { map: None });
        }
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
        // SAFETY: the mapping is read-only and shared, so no Rust reference aliases a mutable
        // view. The remaining hazard is another process truncating or rewriting the file; the
        // callers check the file identity before each use and fault pages in through
        // `populate`, which reports a missing page as an error rather than a signal.
        let map = unsafe { MmapOptions::new().len(len).map(file)? };
        Ok(Self { map: Some(map) })
    }

    /// The mapped bytes. Touching them may fault pages in from the file.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Faults `[offset, offset + len)` in without risking SIGBUS (`MADV_POPULATE_READ`).
    ///
    /// Returns `Ok(false)` when the kernel does not support it (before Linux 5.14).
    pub(crate) fn populate(&self, offset: usize, len: usize) -> io::Result<bool> {
        let Some(map) = &self.map else {
            return Ok(true);
        };
        if len == 0 {
            return Ok(true);
        }
        match map.advise_range(Advice::PopulateRead, offset, len) {
            Ok(()) => Ok(true),
            Err(err) if err.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// Whether every page of `[offset, offset + len)` is in the page cache now (`mincore`).
    /// `false` where the kernel will not say (it reports page-cache state only for files the
    /// caller owns or may write), which makes callers take the cold path: correct, only
    /// slower for warm ranges.
    pub(crate) fn resident(&self, offset: usize, len: usize) -> bool {
        let Some(map) = &self.map else { return true };
        if len == 0 {
            return true;
        }
        let page = super::page_size();
        let first = offset / page * page;
        let end = (offset + len).min(map.len());
        if end <= first {
            return true;
        }
        let pages = (end - first).div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: `[first, end)` lies inside the mapping (clamped to its length above) and
        // `first` is page-aligned because the mapping starts on a page boundary; `vec` holds
        // one byte per page of that range, as mincore requires. mincore only reads page
        // tables and writes `vec`.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr().add(first).cast_mut().cast(),
                end - first,
                vec.as_mut_ptr(),
            )
        };
        rc == 0 && vec.iter().all(|&b| b & 1 == 1)
    }

    /// Drops this process's pages of `[offset, offset + len)` (`MADV_DONTNEED`).
    ///
    /// `offset` and `len` must be page-aligned (see `sys::inner_pages`). Nothing is written:
    /// the mapping is read-only, so its pages are never dirty.
    pub(crate) fn release(&self, offset: usize, len: usize) -> io::Result<()> {
        let Some(map) = &self.map else { return Ok(()) };
        if len == 0 {
            return Ok(());
        }
        debug_assert_eq!(offset % super::page_size(), 0);
        // SAFETY: the mapping is a read-only MAP_SHARED file mapping: MADV_DONTNEED only drops
        // page-table entries, and later accesses fault the same bytes back in from the file.
        // No Rust reference observes different bytes afterwards.
        unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) }
    }
}

//! Read-only shared mappings of model files.
//!
//! The contract (as with any file mapping): the file must not be truncated while mapped, or an
//! access to the missing pages raises SIGBUS. lowtide checks the file's identity before it hands
//! out mapped bytes and faults ranges in with `MADV_POPULATE_READ`, which fails with `EFAULT`
//! instead of raising a signal; what it cannot prevent is documented in `docs/reliability.md`.
//!
//! Mappings are advised random, so that a fault reads only the page it needs: with the
//! default advice the kernel's read-around reads the readahead window (8 MiB on a disk with
//! `read_ahead_kb` 8192) centred on each missed page, and its asynchronous readahead runs on
//! past the range, pulling neighbouring tensors into the page cache — measured: 4 MiB for a
//! 1.5 KiB tensor, 52-60 MiB for a 44.7 MiB one. Their restores would then copy those pages
//! instead of reading them directly, and leave them cached. Page by page, though, a cold
//! fault-in reaches a hundredth of the disk's speed, so [`Mapping::populate`] first asks the
//! kernel to read the range's pages (`POSIX_FADV_WILLNEED`, exactly those pages, each call as
//! large as the kernel will read at once, all submitted before the first is waited for), and
//! only then faults them in, mostly as minor faults.
//!
//! The cost: the kernel reads such requests into single pages, not the large folios of its
//! own readahead, so the disk sees requests of about 1 MiB instead of about 4 MiB; measured
//! with `lowtide bench --size 512MiB` on a virtio disk, a cold fault-in reached 0.86-1.01 GB/s
//! against 1.34-1.55 GB/s with the default advice.

use std::fs::File;
use std::io;

use memmap2::{Advice, Mmap, MmapOptions, UncheckedAdvice};

/// A read-only `MAP_SHARED` mapping of a whole file.
#[derive(Debug)]
pub(crate) struct Mapping {
    map: Option<Mmap>,
    /// Bytes per `POSIX_FADV_WILLNEED` call: what the kernel reads of one call at most.
    read_step: usize,
    /// Faults read around with the kernel's readahead instead of exactly the range
    /// ([`Mapping::use_kernel_readahead`]).
    readahead: std::sync::atomic::AtomicBool,
}

impl Mapping {
    /// Maps the first `len` bytes of `file` read-only and shared, advised random (see the
    /// module docs).
    pub(crate) fn map(file: &File, len: u64) -> io::Result<Self> {
        let read_step = read_step(file);
        if len == 0 {
            return Ok(Self {
                map: None,
                read_step,
                readahead: false.into(),
            });
        }
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
        // SAFETY: the mapping is read-only and shared, so no Rust reference aliases a mutable
        // view. The remaining hazard is another process truncating or rewriting the file; the
        // callers check the file identity before each use and fault pages in through
        // `populate`, which reports a missing page as an error rather than a signal.
        let map = unsafe { MmapOptions::new().len(len).map(file)? };
        // Advisory: where refused, faults read around as before, only less tidy.
        let _ = map.advise(Advice::Random);
        Ok(Self {
            map: Some(map),
            read_step,
            readahead: false.into(),
        })
    }

    /// From now on faults read around as the kernel's readahead decides (the default advice):
    /// a cold fault-in goes faster, but neighbouring bytes enter the page cache too.
    pub(crate) fn use_kernel_readahead(&self) {
        self.readahead
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(map) = &self.map {
            // Advisory: where refused, faults stay exact.
            let _ = map.advise(Advice::Normal);
        }
    }

    /// The mapped bytes. Touching them may fault pages in from the file.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Faults `[offset, offset + len)` in without risking SIGBUS (`MADV_POPULATE_READ`),
    /// after asking the kernel to read exactly its pages from `file` (the file mapped), in
    /// large requests that are all in flight before the first fault waits for one.
    ///
    /// The page cache gains the range's pages and nothing else: faults on a mapping advised
    /// random read no neighbour, and fault-around only maps pages that are already cached.
    /// Returns `Ok(false)` when the kernel does not support populating (before Linux 5.14).
    pub(crate) fn populate(&self, file: &File, offset: usize, len: usize) -> io::Result<bool> {
        let Some(map) = &self.map else {
            return Ok(true);
        };
        if len == 0 {
            return Ok(true);
        }
        let page = super::page_size();
        let (first, end) = (offset / page * page, offset + len);
        let mut at = if self.readahead.load(std::sync::atomic::Ordering::Relaxed) {
            end
        } else {
            first
        };
        while at < end {
            let n = self.read_step.min(end - at);
            // Advisory: where refused, the faults below read the pages themselves (slower).
            // Pages already cached are skipped by the kernel; the file's end bounds the read.
            let _ = rustix::fs::fadvise(
                file,
                at as u64,
                std::num::NonZeroU64::new(n as u64),
                rustix::fs::Advice::WillNeed,
            );
            at += n;
        }
        match map.advise_range(Advice::PopulateRead, offset, len) {
            Ok(()) => Ok(true),
            Err(err) if err.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// Which parts of `[offset, offset + len)` of `file` (the file mapped) are in the page
    /// cache now (`cachestat`, then `mincore` for a range only partly cached): runs
    /// in file order that cover the range exactly. Boundaries between runs fall on page
    /// boundaries. Uncached runs separated by fewer than `merge` cached bytes become one
    /// uncached run (re-reading a little from disk costs less than another request).
    ///
    /// Where the kernel will not say (it reports page-cache state only for files the caller
    /// owns or may write) the whole range is one uncached run: callers then take the cold
    /// path, which is correct, only slower for cached bytes.
    pub(crate) fn cache_runs(
        &self,
        file: &File,
        offset: usize,
        len: usize,
        merge: usize,
    ) -> Vec<CacheRun> {
        let whole = |cached| {
            vec![CacheRun {
                offset,
                len,
                cached,
            }]
        };
        let Some(map) = &self.map else {
            return whole(true);
        };
        if len == 0 {
            return Vec::new();
        }
        let page = super::page_size();
        let first = offset / page * page;
        let end = offset + len;
        if end > map.len() {
            return whole(false);
        }
        // The common answers, all cached or none, in one cheap call where the kernel has it.
        let pages = (end - first).div_ceil(page);
        match cached_pages(file, first, end - first) {
            Some(n) if n >= pages as u64 => return whole(true),
            Some(0) => return whole(false),
            _ => {}
        }
        let mut vec = vec![0u8; pages];
        // SAFETY: `[first, end)` lies inside the mapping (checked above) and `first` is
        // page-aligned because the mapping starts on a page boundary; `vec` holds one byte per
        // page of that range, as mincore requires. mincore only reads page tables and the
        // page cache, and writes `vec`.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr().add(first).cast_mut().cast(),
                end - first,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return whole(false);
        }
        cache_runs(&vec, first, offset, len, page, merge)
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

/// The most the kernel reads for one `POSIX_FADV_WILLNEED` call on `file`:
/// `max(read_ahead_kb, max_sectors_kb)` of the block device under its file system
/// (`force_page_cache_ra` stops there; a larger call would leave the rest to page-by-page
/// faults). Where sysfs does not say (no block device, e.g. network or FUSE file systems), the
/// kernel's default readahead window, 128 KiB, below which no backing device reads.
fn read_step(file: &File) -> usize {
    const DEFAULT: usize = 128 << 10;
    let Ok(stat) = rustix::fs::fstat(file) else {
        return DEFAULT;
    };
    let (major, minor) = (
        rustix::fs::major(stat.st_dev),
        rustix::fs::minor(stat.st_dev),
    );
    let device = format!("/sys/dev/block/{major}:{minor}");
    // A partition's queue is its disk's, one folder up.
    let kib = |name: &str| -> Option<usize> {
        [
            format!("{device}/queue/{name}"),
            format!("{device}/../queue/{name}"),
        ]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok()?.trim().parse().ok())
    };
    let step = kib("read_ahead_kb")
        .unwrap_or(0)
        .max(kib("max_sectors_kb").unwrap_or(0))
        .saturating_mul(1024);
    // Whole pages, and never below the default: a device that reports less still reads it.
    let page = super::page_size();
    (step / page * page).max(DEFAULT)
}

/// `cachestat(2)`'s number (Linux 6.5), the same on every architecture Rust targets.
const SYS_CACHESTAT: libc::c_long = 451;

/// How many pages of `[offset, offset + len)` of `file` are in the page cache (`cachestat`,
/// which walks the cache once per folio, where `mincore` looks up every page). `None` where
/// the kernel lacks it (before Linux 6.5) or will not say.
fn cached_pages(file: &File, offset: usize, len: usize) -> Option<u64> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    #[allow(clippy::struct_field_names)] // The kernel's names.
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range {
        off: offset as u64,
        len: len as u64,
    };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat(fd, &range, &stat, flags) reads `range` and writes `stat`, both live,
    // correctly laid out (`repr(C)` as in the kernel's uapi) and exclusively borrowed here.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &raw const range,
            &raw mut stat,
            0u32,
        )
    };
    (rc == 0).then_some(stat.nr_cache)
}

/// A part of a file range that is wholly in the page cache, or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheRun {
    /// Offset in the file.
    pub(crate) offset: usize,
    /// Length in bytes.
    pub(crate) len: usize,
    /// Whether every page of it is cached.
    pub(crate) cached: bool,
}

/// Turns `mincore`'s answer for the pages from `first` into runs covering
/// `[offset, offset + len)`, merging uncached runs closer than `merge` bytes.
fn cache_runs(
    pages: &[u8],
    first: usize,
    offset: usize,
    len: usize,
    page: usize,
    merge: usize,
) -> Vec<CacheRun> {
    let end = offset + len;
    let mut runs: Vec<CacheRun> = Vec::new();
    for (i, &state) in pages.iter().enumerate() {
        let cached = state & 1 == 1;
        let lo = (first + i * page).max(offset);
        let hi = (first + (i + 1) * page).min(end);
        match runs.last_mut() {
            Some(run) if run.cached == cached => run.len = hi - run.offset,
            _ => runs.push(CacheRun {
                offset: lo,
                len: hi - lo,
                cached,
            }),
        }
    }
    // A short cached run between two uncached ones joins them.
    let mut merged: Vec<CacheRun> = Vec::with_capacity(runs.len());
    for run in runs {
        let joins = !run.cached
            && merged.len() >= 2
            && merged[merged.len() - 1].len < merge
            && !merged[merged.len() - 2].cached;
        if joins {
            merged.pop();
            let last = merged.last_mut().expect("two runs were there");
            last.len = run.offset + run.len - last.offset;
        } else {
            merged.push(run);
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::{CacheRun, cache_runs, read_step};

    fn run(offset: usize, len: usize, cached: bool) -> CacheRun {
        CacheRun {
            offset,
            len,
            cached,
        }
    }

    #[test]
    fn read_steps_are_whole_pages_of_at_least_the_default_window() {
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let step = read_step(&file);
        assert!(step >= 128 << 10, "{step}");
        assert_eq!(step % crate::sys::page_size(), 0);
    }

    #[test]
    fn runs_cover_the_range_exactly() {
        // Pages 0..4 of 100 bytes: cached, cached, not, cached; the range starts and ends
        // inside pages.
        let runs = cache_runs(&[1, 1, 0, 1], 0, 50, 300, 100, 0);
        assert_eq!(
            runs,
            [run(50, 150, true), run(200, 100, false), run(300, 50, true)]
        );
        assert_eq!(
            cache_runs(&[0], 100, 130, 10, 100, 0),
            [run(130, 10, false)]
        );
        assert_eq!(cache_runs(&[1, 1], 0, 0, 200, 100, 0), [run(0, 200, true)]);
    }

    #[test]
    fn short_cached_gaps_between_misses_are_merged() {
        let pages = [0, 1, 0, 1, 1, 0, 1];
        let runs = cache_runs(&pages, 0, 0, 700, 100, 150);
        assert_eq!(
            runs,
            [
                run(0, 300, false),
                run(300, 200, true),
                run(500, 100, false),
                run(600, 100, true)
            ]
        );
        // A cached run at the edge is never merged away.
        let runs = cache_runs(&[1, 0, 1], 0, 0, 300, 100, 1000);
        assert_eq!(
            runs,
            [run(0, 100, true), run(100, 100, false), run(200, 100, true)]
        );
    }
}

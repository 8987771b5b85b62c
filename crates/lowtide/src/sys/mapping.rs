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
//! against 1.34-1.55 GB/s with the default advice. And every single page costs the drop
//! (`Source::release`) as much as a whole huge folio: dropping 2 GiB faulted in that way took
//! 165-333 ms/GiB in `lowtide bench`. So the aligned 2 MiB blocks that a range holds entirely
//! are read as huge folios instead, through a short-lived mapping of their own
//! ([`read_huge`]); only the pages at the range's edges are read with `POSIX_FADV_WILLNEED`.

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
    /// after asking the kernel to read exactly its pages from `file` (the file mapped): the
    /// aligned huge-page blocks that are wholly the range's own as huge folios ([`read_huge`]),
    /// the rest in large requests that are all in flight before the first fault waits for one.
    ///
    /// The page cache gains the range's pages and nothing else: faults on a mapping advised
    /// random read no neighbour, fault-around only maps pages that are already cached, and a
    /// huge block holds none of a neighbour's bytes.
    /// Returns `Ok(false)` when the kernel does not support populating (before Linux 5.14).
    pub(crate) fn populate(&self, file: &File, offset: usize, len: usize) -> io::Result<bool> {
        let Some(map) = &self.map else {
            return Ok(true);
        };
        if len == 0 {
            return Ok(true);
        }
        if !self.readahead.load(std::sync::atomic::Ordering::Relaxed) {
            let page = super::page_size();
            let (first, end) = (offset / page * page, offset + len);
            match huge_blocks(offset, end, page) {
                Some((lo, hi, block)) => {
                    // The edges first: their reads are in flight while the blocks are read.
                    self.will_need(file, first, lo);
                    self.will_need(file, hi, end);
                    read_huge(file, lo, hi, block, &|from, to| {
                        self.will_need(file, from, to);
                    });
                }
                None => self.will_need(file, first, end),
            }
        }
        match map.advise_range(Advice::PopulateRead, offset, len) {
            Ok(()) => Ok(true),
            Err(err) if err.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// Asks the kernel to read `[from, to)` of `file` into the page cache (`from`
    /// page-aligned): exactly those pages, each call as large as the kernel reads at once.
    /// Advisory: where refused, the faults that follow read the pages themselves (slower).
    /// Pages already cached are skipped by the kernel; the file's end bounds the read.
    fn will_need(&self, file: &File, from: usize, to: usize) {
        let mut at = from;
        while at < to {
            let n = self.read_step.min(to - at);
            let _ = rustix::fs::fadvise(
                file,
                at as u64,
                std::num::NonZeroU64::new(n as u64),
                rustix::fs::Advice::WillNeed,
            );
            at += n;
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

/// Threads that fault huge blocks in at once for one range (each fault waits for its read):
/// a C probe of this path over 2 GiB on a virtio disk read 0.7-1.4 GB/s on one thread,
/// 1.2-2.9 GB/s on four.
const HUGE_THREADS: usize = 4;

/// More major faults than this for one huge block mean the kernel read it page by page.
const PAGE_BY_PAGE: u64 = 16;

/// Whether huge blocks are read through a transient mapping ([`read_huge`]); cleared for the
/// process once the kernel is seen faulting such a block in page by page (kernels before 5.18
/// read no huge folio on a fault, and a fault's readahead may be turned off for a file that
/// misses often), after which every range is read with `POSIX_FADV_WILLNEED` alone.
static HUGE_READS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// The bytes of a huge page (`hpage_pmd_size`: 2 MiB on x86-64), where transparent huge pages
/// are built in and a block of them is a sensible read (at most 32 MiB).
fn huge_page() -> Option<usize> {
    static SIZE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        let text =
            std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").ok()?;
        let size: usize = text.trim().parse().ok()?;
        let page = super::page_size();
        (size > page && size.is_power_of_two() && size <= 32 << 20).then_some(size)
    })
}

/// The aligned huge-page blocks inside the pages that `[offset, end)` shares with no
/// neighbour: `(lo, hi, block)`, or `None` where there is none (or huge reads are off).
/// Only own pages: a release drops a tensor's own pages, and the page cache drops a folio
/// only when the range covers all of it.
fn huge_blocks(offset: usize, end: usize, page: usize) -> Option<(usize, usize, usize)> {
    if !HUGE_READS.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let block = huge_page()?;
    let (lo, hi) = aligned_blocks(offset, end, page, block)?;
    Some((lo, hi, block))
}

/// The `block`-aligned blocks inside the whole pages of `[offset, end)`.
fn aligned_blocks(offset: usize, end: usize, page: usize, block: usize) -> Option<(usize, usize)> {
    let lo = offset.div_ceil(page) * page;
    let hi = end / page * page;
    let (lo, hi) = (lo.div_ceil(block) * block, hi / block * block);
    (hi > lo).then_some((lo, hi))
}

/// Reads the huge-page blocks `[lo, hi)` of `file` into the page cache, each as one huge folio
/// where the file system caches large folios, and asks `fallback` to read those it could not.
///
/// `POSIX_FADV_WILLNEED` reads into single pages, and a single page costs the drop as much as
/// a huge folio: measured with a C probe over 2 GiB on ext4 (Linux 6.18), `MADV_DONTNEED`
/// took 28 ms/GiB and `POSIX_FADV_DONTNEED` 124 ms/GiB for single pages, 0.2 and
/// 2.2-4.8 ms/GiB for 2 MiB folios. A fault on a mapping advised `MADV_HUGEPAGE` and random
/// reads exactly its aligned block as one folio (without the random advice it reads the next
/// block too). That mapping is this function's own and gone when it returns, so that
/// khugepaged never sees a huge-page mapping of the file: where it collapses file pages
/// (`CONFIG_READ_ONLY_THP_FOR_FS`) it would collapse partly cached blocks at the range's edges
/// and read the neighbours' bytes with them. Blocks fault in on up to [`HUGE_THREADS`]
/// threads; the caller's populate then maps the cached folios, without reading.
fn read_huge(
    file: &File,
    lo: usize,
    hi: usize,
    block: usize,
    fallback: &(dyn Fn(usize, usize) + Sync),
) {
    let page = super::page_size();
    // A warm range (every acquire of a mapped view populates it again) needs nothing here.
    if cached_pages(file, lo, hi - lo).is_some_and(|n| n >= ((hi - lo) / page) as u64) {
        return;
    }
    let Ok(helper) = huge_mapping(file, lo, hi - lo) else {
        return fallback(lo, hi);
    };
    let blocks = (hi - lo) / block;
    let pages = (block / page) as u64;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= blocks {
                break;
            }
            let at = i * block;
            if !HUGE_READS.load(std::sync::atomic::Ordering::Relaxed) {
                fallback(lo + at, lo + at + block);
                continue;
            }
            // A cached block needs no read, and mapping it here would only cost an unmap.
            if cached_pages(file, lo + at, block).is_some_and(|n| n >= pages) {
                continue;
            }
            let before = major_faults();
            match helper.advise_range(Advice::PopulateRead, at, block) {
                Ok(()) => {}
                // The file shrank: the caller's own populate reports it.
                Err(err) if err.raw_os_error() == Some(rustix::io::Errno::FAULT.raw_os_error()) => {
                    break;
                }
                Err(err) => {
                    if err.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) {
                        // No MADV_POPULATE_READ (before Linux 5.14).
                        HUGE_READS.store(false, std::sync::atomic::Ordering::Relaxed);
                    }
                    fallback(lo + at, lo + at + block);
                    continue;
                }
            }
            if major_faults().saturating_sub(before) > PAGE_BY_PAGE {
                log::debug!(
                    "huge-page blocks fault in page by page here: reads go back to single pages"
                );
                HUGE_READS.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    let work = &work;
    std::thread::scope(|scope| {
        for _ in 1..blocks.min(HUGE_THREADS) {
            let spawned = std::thread::Builder::new()
                .name("lowtide-fault-in".into())
                .spawn_scoped(scope, work);
            if spawned.is_err() {
                // The blocks are shared out as they go: the threads there take the rest.
                break;
            }
        }
        work();
    });
}

/// A read-only shared mapping of `[offset, offset + len)` of `file` whose faults read whole
/// huge-page blocks, exactly the faulting one (`MADV_HUGEPAGE`, `MADV_RANDOM`).
fn huge_mapping(file: &File, offset: usize, len: usize) -> io::Result<Mmap> {
    // SAFETY: as in `Mapping::map`: read-only and shared, so no Rust reference aliases a
    // mutable view; nothing reads through it, it only faults pages in with
    // MADV_POPULATE_READ, which reports a missing page as an error rather than a signal.
    let map = unsafe {
        MmapOptions::new()
            .offset(offset as u64)
            .len(len)
            .map(file)?
    };
    // Both or neither: without the random advice a fault reads the next block too.
    map.advise(Advice::Random)?;
    map.advise(Advice::HugePage)?;
    Ok(map)
}

/// The calling thread's major faults so far (`getrusage(RUSAGE_THREAD)`); 0 where refused.
fn major_faults() -> u64 {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the live, exclusively borrowed `usage` and nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage) };
    if rc == 0 {
        u64::try_from(usage.ru_majflt).unwrap_or(0)
    } else {
        0
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
    use super::{CacheRun, aligned_blocks, cache_runs, read_step};

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
    fn huge_blocks_lie_in_the_range_own_pages() {
        let (page, block) = (100, 1000);
        // The pages holding the range's ends are shared with the neighbours: blocks stay
        // inside the whole pages between them.
        assert_eq!(aligned_blocks(950, 4000, page, block), Some((1000, 4000)));
        assert_eq!(aligned_blocks(1050, 4000, page, block), Some((2000, 4000)));
        assert_eq!(aligned_blocks(900, 3999, page, block), Some((1000, 3000)));
        assert_eq!(aligned_blocks(0, 1000, page, block), Some((0, 1000)));
        assert_eq!(aligned_blocks(1, 1999, page, block), None);
        assert_eq!(aligned_blocks(0, 999, page, block), None);
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

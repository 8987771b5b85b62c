//! Direct I/O: block-aligned reads and writes that bypass the page cache, with several
//! requests in flight — through io_uring where the kernel allows it, else through a few
//! threads issuing `pread`/`pwrite` in parallel.
//!
//! Every buffer handed to the kernel here is a block-aligned slice borrowed for the whole
//! call, and every call waits for all of its requests to complete (also on error) before it
//! returns, so the kernel never touches memory the caller has got back.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::AlignedBuf;
use super::fork::Owner;

/// Offsets, lengths and buffer addresses of direct I/O are multiples of this.
pub const BLOCK: u64 = 4096;

/// How a transfer is split: requests of `chunk` bytes, up to `depth` in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoShape {
    /// Bytes per request (a multiple of 4096).
    pub chunk: usize,
    /// Requests in flight at once.
    pub depth: usize,
}

impl IoShape {
    /// What restores use: 4 MiB requests, 8 in flight (see docs/performance.md).
    pub const DEFAULT: IoShape = IoShape {
        chunk: 4 << 20,
        depth: 8,
    };
}

/// Which mechanism moved the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring.
    Uring,
    /// Parallel `pread`/`pwrite` on threads.
    Threads,
}

/// How many bytes of `[offset, offset + len)` of `file` are in the page cache now
/// (`mincore` over a temporary mapping). The kernel reports page-cache state only for files
/// the caller owns or may write; elsewhere this says 0.
pub(crate) fn cached_bytes(file: &File, offset: u64, len: u64) -> io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    let page = super::page_size() as u64;
    let first = offset / page * page;
    let map_len = usize::try_from(offset + len - first)
        .map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
    // SAFETY: a private read-only mapping that this function only hands to mincore, which
    // reads page tables and never touches the mapped bytes; it is unmapped on return.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(first)
            .len(map_len)
            .map(file)?
    };
    let pages = map_len.div_ceil(page as usize);
    let mut vec = vec![0u8; pages];
    // SAFETY: `map` starts on a page boundary (offset rounded down to a page) and spans
    // `map_len` bytes; `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(map.as_ptr().cast_mut().cast(), map_len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|&&b| b & 1 == 1).count() as u64 * page)
}

/// Reopens `file` (the same inode, even if its path was renamed over since) with `O_DIRECT`.
/// `None` where the file system refuses direct I/O (tmpfs before Linux 6.6, some FUSE).
pub(crate) fn reopen_direct(file: &File, write: bool) -> Option<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits().cast_signed())
        .open(path)
        .ok()
}

/// A buffer for one direct read of `[offset, offset + len)` of a file: the read covers the
/// enclosing blocks, and the buffer is laid out so that the wanted bytes sit at the right
/// place inside it without a copy.
pub(crate) struct DirectBuf {
    buf: AlignedBuf,
    start: usize,
    len: usize,
    /// Bytes of `buf` the blocks cover (`buf` may be a larger reused buffer).
    padded: usize,
}

impl DirectBuf {
    /// Bytes of buffer a direct read of `[offset, offset + len)` needs: whole blocks.
    pub(crate) fn padded_len(offset: u64, len: u64) -> u64 {
        ((offset % BLOCK) + len).div_ceil(BLOCK) * BLOCK
    }

    /// A zeroed buffer for `[offset, offset + len)`, or `None` when the allocator refuses.
    pub(crate) fn for_range(offset: u64, len: u64) -> Option<Self> {
        let padded = Self::padded_len(offset, len);
        Self::in_buf(
            AlignedBuf::zeroed(usize::try_from(padded).ok()?)?,
            offset,
            len,
        )
        .ok()
    }

    /// Lays `[offset, offset + len)` out in `buf` (a reused buffer: its other bytes are stale),
    /// or gives `buf` back when it is too small.
    pub(crate) fn in_buf(buf: AlignedBuf, offset: u64, len: u64) -> Result<Self, AlignedBuf> {
        let padded = Self::padded_len(offset, len);
        match (usize::try_from(padded), usize::try_from(len)) {
            (Ok(padded), Ok(len)) if buf.as_slice().len() >= padded => Ok(Self {
                buf,
                start: (offset % BLOCK) as usize,
                len,
                padded,
            }),
            _ => Err(buf),
        }
    }

    /// `[offset, offset + len)` laid out in `reuse` (a pooled buffer: its pages are there)
    /// when it is large enough, else in a new buffer; and whether the buffer is new, its
    /// pages still to be faulted in. `None` when the allocator refuses.
    pub(crate) fn reused_or_new(
        reuse: Option<AlignedBuf>,
        offset: u64,
        len: u64,
    ) -> Option<(Self, bool)> {
        match reuse.and_then(|buf| Self::in_buf(buf, offset, len).ok()) {
            Some(buf) => Some((buf, false)),
            None => Self::for_range(offset, len).map(|buf| (buf, true)),
        }
    }

    /// The buffer, for reuse.
    pub(crate) fn into_inner(self) -> AlignedBuf {
        self.buf
    }

    /// The wanted bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf.as_slice()[self.start..self.start + self.len]
    }

    /// The whole block-aligned buffer, as direct I/O needs it.
    pub(crate) fn blocks_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut_slice()[..self.padded]
    }
}

impl std::fmt::Debug for DirectBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectBuf")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Buffers at least this large are faulted in ahead of the transfer by a helper thread.
const PREFAULT_MIN: usize = 16 << 20;

/// Runs `f(buf)` while a helper thread faults `buf`'s pages in ahead of it
/// (`MADV_POPULATE_WRITE`, in 4 MiB steps from the start), so that the cost of fresh memory —
/// zeroing pages, and in virtual machines the host backing them — overlaps the I/O instead of
/// adding to it. Small buffers are left to fault as they are written.
pub(crate) fn with_prefault<R>(buf: &mut [u8], f: impl FnOnce(&mut [u8]) -> R) -> R {
    if buf.len() < PREFAULT_MIN {
        return f(buf);
    }
    let (base, len) = (buf.as_mut_ptr() as usize, buf.len());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let stride = 4 << 20;
            let mut at = 0;
            while at < len && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = stride.min(len - at);
                // SAFETY: `[base + at, base + at + n)` lies inside `buf`, which outlives this
                // scope. MADV_POPULATE_WRITE only makes pages present and writable; it never
                // changes the bytes of a present page, so it cannot disturb the transfer `f`
                // runs on the same memory. No Rust reference is created here. Advisory: an
                // error only means the transfer faults the pages itself.
                let _ = unsafe {
                    rustix::mm::madvise(
                        (base + at) as *mut std::ffi::c_void,
                        n,
                        rustix::mm::Advice::LinuxPopulateWrite,
                    )
                };
                at += n;
            }
        });
        let result = f(buf);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    })
}

/// Makes `buf`'s pages present and writable now (`MADV_POPULATE_WRITE`), so that a transfer
/// into it does not stop at each page. Advisory: where the kernel refuses, the transfer faults
/// the pages itself.
pub(crate) fn populate_write(buf: &mut [u8]) {
    if buf.is_empty() {
        return;
    }
    // SAFETY: the range is `buf`, exclusively borrowed; MADV_POPULATE_WRITE never changes the
    // bytes of a present page (fresh pages read as zero, as before).
    let _ = unsafe {
        rustix::mm::madvise(
            buf.as_mut_ptr().cast(),
            buf.len(),
            rustix::mm::Advice::LinuxPopulateWrite,
        )
    };
}

/// [`populate_write`] on up to four threads (as many as the CPUs allow) for buffers of at
/// least [`PREFAULT_MIN`]: in virtual machines a fresh page costs the host's backing, about
/// 1.7-1.9 GB/s a thread on a 2-core VM (measured with `MADV_POPULATE_WRITE` over fresh 64 MiB
/// mappings), slower than the disk a restore reads.
pub(crate) fn populate_write_parallel(buf: &mut [u8]) {
    let threads = if buf.len() >= PREFAULT_MIN {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    } else {
        1
    };
    let share = buf.len().div_ceil(threads).next_multiple_of(4096).max(4096);
    let mut parts = buf.chunks_mut(share);
    let Some(first) = parts.next() else { return };
    std::thread::scope(|scope| {
        for part in parts {
            scope.spawn(move || populate_write(part));
        }
        populate_write(first);
    });
}

/// Rings kept for reuse (setting one up costs a few system calls and mappings), and the
/// process that made them.
///
/// A ring's submission and completion queues are memory the kernel shares with every process
/// holding the ring, so a forked child inherits its parent's rings live: a request the child
/// queued would be submitted by whichever process entered the kernel next, with that
/// process's addresses, and either could reap the other's completions (seen from Python: the
/// parent's reads returned bytes that were not the file's with no error, failed with
/// `EFAULT`, or waited for good; `tests/fork.rs` catches a child reaping its parent's
/// completions). So a process never uses a ring another process made: a child forgets the
/// inherited ones, neither unmapping nor closing them, and makes its own.
struct Pool {
    owner: Option<Owner>,
    rings: Vec<io_uring::IoUring>,
}

impl Pool {
    /// The rings this process may use: those made by another process are forgotten first.
    fn adopt(&mut self) -> &mut Vec<io_uring::IoUring> {
        let here = Owner::current();
        if self.owner != Some(here) {
            self.rings.drain(..).for_each(std::mem::forget);
            self.owner = Some(here);
        }
        &mut self.rings
    }
}

static RINGS: Mutex<Pool> = Mutex::new(Pool {
    owner: None,
    rings: Vec::new(),
});

/// Whether io_uring could not be set up once: then threads are used from then on.
static NO_URING: AtomicBool = AtomicBool::new(false);

fn pool() -> MutexGuard<'static, Pool> {
    hold_across_fork();
    RINGS.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// The pool's lock, held by a thread that is forking (see [`hold_across_fork`]).
    static HELD: RefCell<Option<MutexGuard<'static, Pool>>> = const { RefCell::new(None) };
}

/// Registers (once) fork handlers that hold the pool's lock across every `fork(3)`: a child
/// has none of its parent's other threads, so a lock one of them held at the fork would stay
/// held in the child for good, and the child's first direct read would wait forever.
fn hold_across_fork() {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if REGISTERED.load(Ordering::Acquire) || REGISTERED.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: the handlers never unwind. The prepare handler runs in the parent before the
    // fork, where it may do anything; the two others only drop the guard it stashed in this
    // thread's slot (a futex unlock, async-signal-safe), in the parent and in the child.
    let rc = unsafe {
        libc::pthread_atfork(
            Some(lock_for_fork),
            Some(unlock_after_fork),
            Some(unlock_after_fork),
        )
    };
    if rc != 0 {
        log::debug!("pthread_atfork failed ({rc}); the ring pool is not held across forks");
    }
}

extern "C" fn lock_for_fork() {
    let guard = RINGS.lock().unwrap_or_else(PoisonError::into_inner);
    // Outside a thread's lifetime (its slot destroyed) the guard is simply let go.
    let _ = HELD.try_with(move |held| *held.borrow_mut() = Some(guard));
}

extern "C" fn unlock_after_fork() {
    let _ = HELD.try_with(|held| held.borrow_mut().take());
}

fn take_ring(depth: usize) -> Option<io_uring::IoUring> {
    if NO_URING.load(Ordering::Relaxed) {
        return None;
    }
    let depth = u32::try_from(depth.next_power_of_two())
        .unwrap_or(32)
        .clamp(1, 64);
    let mut pool = pool();
    let rings = pool.adopt();
    if let Some(pos) = rings.iter().position(|r| r.params().sq_entries() >= depth) {
        return Some(rings.swap_remove(pos));
    }
    drop(pool);
    match io_uring::IoUring::new(depth.max(8)) {
        Ok(ring) => Some(ring),
        Err(err) => {
            log::info!("io_uring is unavailable ({err}); direct I/O uses threads");
            NO_URING.store(true, Ordering::Relaxed);
            None
        }
    }
}

/// Keeps a ring this process took or made for the next transfer. (A thread never carries a
/// ring across a fork: only the forking thread lives on in the child, and it is not in the
/// middle of a transfer.)
fn give_ring(ring: io_uring::IoUring) {
    let mut pool = pool();
    let rings = pool.adopt();
    if rings.len() < 8 {
        rings.push(ring);
    }
}

fn check_aligned(offset: u64, buf: &[u8], shape: IoShape) -> io::Result<()> {
    let ok = offset.is_multiple_of(BLOCK)
        && (buf.as_ptr() as u64).is_multiple_of(BLOCK)
        && (buf.len() as u64).is_multiple_of(BLOCK)
        && (shape.chunk as u64).is_multiple_of(BLOCK)
        && shape.chunk > 0
        && shape.depth > 0;
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "direct I/O needs block-aligned offsets, buffers and chunks",
        ))
    }
}

/// Reads `buf.len()` bytes at `offset` of a direct (or any) file into `buf`. Returns the bytes
/// read: fewer than asked only at the end of the file. Offset and buffer must be
/// block-aligned.
pub(crate) fn read_at(
    file: &File,
    offset: u64,
    buf: &mut [u8],
    shape: IoShape,
    engine: Option<IoEngine>,
) -> io::Result<(usize, IoEngine)> {
    check_aligned(offset, buf, shape)?;
    if engine != Some(IoEngine::Threads)
        && let Some(mut ring) = take_ring(shape.depth)
    {
        let result = uring_transfer(
            &mut ring,
            file,
            offset,
            buf.as_mut_ptr(),
            buf.len(),
            shape,
            false,
        );
        give_ring(ring);
        return result.map(|n| (n, IoEngine::Uring));
    }
    threads_transfer(shape, buf.len(), |at, len| {
        // Each range is disjoint: split the buffer by hand through its base address.
        let base = buf.as_ptr() as usize;
        // SAFETY: `[at, at + len)` lies inside `buf`, which is exclusively borrowed for this
        // call; the ranges handed to the threads are disjoint, so no two threads alias.
        let part = unsafe { std::slice::from_raw_parts_mut((base + at) as *mut u8, len) };
        read_full(file, offset + at as u64, part)
    })
    .map(|n| (n, IoEngine::Threads))
}

/// Writes `buf` at `offset` of a direct (or any) file. Offset and buffer must be
/// block-aligned.
pub(crate) fn write_at(
    file: &File,
    offset: u64,
    buf: &[u8],
    shape: IoShape,
    engine: Option<IoEngine>,
) -> io::Result<IoEngine> {
    check_aligned(offset, buf, shape)?;
    if engine != Some(IoEngine::Threads)
        && let Some(mut ring) = take_ring(shape.depth)
    {
        let ptr = buf.as_ptr().cast_mut();
        let result = uring_transfer(&mut ring, file, offset, ptr, buf.len(), shape, true);
        give_ring(ring);
        return match result {
            Ok(n) if n == buf.len() => Ok(IoEngine::Uring),
            Ok(_) => Err(io::ErrorKind::WriteZero.into()),
            Err(err) => Err(err),
        };
    }
    threads_transfer(shape, buf.len(), |at, len| {
        file.write_all_at(&buf[at..at + len], offset + at as u64)?;
        Ok(len)
    })
    .map(|_| IoEngine::Threads)
}

/// `pread` until `buf` is full or the file ends.
fn read_full(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(done)
}

/// Runs `op(at, len)` over `[0, total)` in chunks on `depth` threads. Returns the bytes moved
/// up to the first short chunk (the end of the file).
fn threads_transfer(
    shape: IoShape,
    total: usize,
    op: impl Fn(usize, usize) -> io::Result<usize> + Sync,
) -> io::Result<usize> {
    let chunks = total.div_ceil(shape.chunk);
    let next = std::sync::atomic::AtomicUsize::new(0);
    // Per chunk: bytes moved.
    let moved: Vec<std::sync::atomic::AtomicUsize> = (0..chunks)
        .map(|_| std::sync::atomic::AtomicUsize::new(0))
        .collect();
    let error: Mutex<Option<io::Error>> = Mutex::new(None);
    let work = || {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= chunks {
                return;
            }
            let at = i * shape.chunk;
            let len = shape.chunk.min(total - at);
            match op(at, len) {
                Ok(n) => moved[i].store(n, std::sync::atomic::Ordering::Relaxed),
                Err(err) => {
                    *error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(err);
                    return;
                }
            }
        }
    };
    let threads = shape.depth.min(chunks).max(1);
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(work);
            }
        });
    }
    if let Some(err) = error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        return Err(err);
    }
    let mut total_moved = 0;
    for (i, n) in moved.iter().enumerate() {
        let n = n.load(std::sync::atomic::Ordering::Relaxed);
        total_moved += n;
        if n < shape.chunk.min(total - i * shape.chunk) {
            break;
        }
    }
    Ok(total_moved)
}

/// Reads (or writes) `len` bytes at `ptr` from (to) `offset` of `file` through `ring`, up to
/// `shape.depth` requests in flight; short transfers are continued. Returns the bytes moved:
/// fewer than `len` only when a read reaches the end of the file.
#[allow(clippy::too_many_arguments)]
fn uring_transfer(
    ring: &mut io_uring::IoUring,
    file: &File,
    offset: u64,
    ptr: *mut u8,
    len: usize,
    shape: IoShape,
    write: bool,
) -> io::Result<usize> {
    use io_uring::{opcode, types};

    let fd = types::Fd(file.as_fd().as_raw_fd());
    let chunks = len.div_ceil(shape.chunk);
    // Per chunk: bytes done so far; a chunk is finished when done == its length or at EOF.
    let mut done = vec![0usize; chunks];
    let mut eof_at: Option<usize> = None;
    let mut next = 0usize;
    let mut in_flight = 0usize;
    let mut first_error: Option<io::Error> = None;
    let chunk_len = |i: usize| shape.chunk.min(len - i * shape.chunk);
    let depth = shape.depth.min(ring.params().sq_entries() as usize).max(1);

    let submit = |ring: &mut io_uring::IoUring, i: usize, from: usize| -> io::Result<()> {
        let at = i * shape.chunk + from;
        let n = u32::try_from(chunk_len(i) - from).unwrap_or(u32::MAX);
        // SAFETY: `at + n <= len`, so the range lies inside the caller's buffer at `ptr`, which
        // stays borrowed until this function returns; it returns only after every submitted
        // request has completed (the loop below drains `in_flight` to zero, also on error).
        let target = unsafe { ptr.add(at) };
        let entry = if write {
            opcode::Write::new(fd, target, n)
                .offset(offset + at as u64)
                .build()
        } else {
            opcode::Read::new(fd, target, n)
                .offset(offset + at as u64)
                .build()
        }
        .user_data(i as u64);
        // SAFETY: the entry's buffer stays valid until its completion is reaped (see above).
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        Ok(())
    };

    loop {
        while first_error.is_none() && in_flight < depth && next < chunks {
            if let Some(eof) = eof_at
                && next * shape.chunk >= eof
            {
                next = chunks;
                break;
            }
            submit(ring, next, 0)?;
            next += 1;
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                // Requests already queued may still complete: wait for them before the
                // buffer is handed back.
                first_error.get_or_insert(err);
                if ring.submit_and_wait(in_flight).is_err() {
                    // Cannot confirm completion: never return while the kernel may write.
                    std::process::abort();
                }
            }
        }
        let completions: Vec<(usize, i32)> = ring
            .completion()
            .map(|cqe| (cqe.user_data() as usize, cqe.result()))
            .collect();
        for (i, result) in completions {
            in_flight -= 1;
            if result < 0 {
                let err = io::Error::from_raw_os_error(-result);
                if err.kind() == io::ErrorKind::Interrupted && first_error.is_none() {
                    submit(ring, i, done[i])?;
                    in_flight += 1;
                } else {
                    first_error.get_or_insert(err);
                }
                continue;
            }
            let n = result.cast_unsigned() as usize;
            done[i] += n;
            if done[i] < chunk_len(i) && first_error.is_none() {
                if n == 0 {
                    if write {
                        first_error.get_or_insert(io::ErrorKind::WriteZero.into());
                    } else {
                        let end = i * shape.chunk + done[i];
                        eof_at = Some(eof_at.map_or(end, |e| e.min(end)));
                    }
                } else {
                    submit(ring, i, done[i])?;
                    in_flight += 1;
                }
            }
        }
    }
    if let Some(err) = first_error {
        return Err(err);
    }
    // Bytes up to the first short chunk.
    let mut total = 0;
    for (i, &d) in done.iter().enumerate() {
        total += d;
        if d < chunk_len(i) {
            break;
        }
    }
    Ok(total)
}

/// A ring kept busy across many reads: each read queued with [`ReadQueue::push`] is split in
/// requests of `shape.chunk` bytes, and up to `shape.depth` requests are in flight at any
/// time, whichever reads they belong to — the requests of the next read go in while the
/// current one completes, so the queue does not drain at read boundaries.
///
/// Buffers are raw pointers that must stay valid until their read is reported by
/// [`ReadQueue::wait`]; dropping the queue waits for every request in flight first.
pub(crate) struct ReadQueue {
    ring: Option<io_uring::IoUring>,
    shape: IoShape,
    /// Requests not yet submitted, in order.
    queued: std::collections::VecDeque<Request>,
    /// Requests submitted and not yet completed, by slot (`user_data`).
    slots: Vec<Option<Request>>,
    in_flight: usize,
    /// Per read (by tag): requests left and bytes done, and the first error.
    reads: std::collections::HashMap<u64, ReadState>,
    /// The most requests that were in flight at once.
    pub(crate) max_in_flight: usize,
}

#[derive(Clone, Copy)]
struct Request {
    tag: u64,
    fd: i32,
    offset: u64,
    ptr: *mut u8,
    len: usize,
    /// Bytes of this request done by earlier (short) completions.
    done: usize,
}

#[derive(Default)]
struct ReadState {
    requests: usize,
    bytes: usize,
    /// Bytes of the read's end where the file ended (a short request), if it did.
    eof: bool,
    error: Option<io::Error>,
}

/// A read [`ReadQueue::wait`] reports as finished: its bytes read (fewer than asked only at
/// the end of the file), or its first error.
pub(crate) struct ReadDone {
    pub(crate) tag: u64,
    pub(crate) result: io::Result<usize>,
}

impl ReadQueue {
    /// A queue reading with `shape`, with a ring for up to `max_depth` requests (the deepest
    /// shape [`ReadQueue::set_shape`] may ask for); `None` where io_uring is unavailable.
    pub(crate) fn new(shape: IoShape, max_depth: usize) -> Option<Self> {
        let ring = take_ring(shape.depth.max(max_depth))?;
        let slots = ring.params().sq_entries() as usize;
        let depth = shape.depth.min(slots).max(1);
        Some(Self {
            ring: Some(ring),
            shape: IoShape {
                chunk: shape.chunk,
                depth,
            },
            queued: std::collections::VecDeque::new(),
            slots: vec![None; slots],
            in_flight: 0,
            reads: std::collections::HashMap::new(),
            max_in_flight: 0,
        })
    }

    /// The shape requests are cut to from now on (reads already queued keep theirs); the
    /// depth is bounded by the ring's size.
    pub(crate) fn set_shape(&mut self, shape: IoShape) {
        let slots = self.slots.len();
        self.shape = IoShape {
            chunk: shape.chunk.max(BLOCK as usize),
            depth: shape.depth.min(slots).max(1),
        };
    }

    /// Requests in flight now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a read of `len` bytes at `offset` of `file` (opened with `O_DIRECT`) into `ptr`,
    /// reported under `tag` (unique among the reads not yet reported), and submits what fits.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must be writable memory that nothing else reads or writes until the
    /// read is reported by [`ReadQueue::wait`] or the queue is dropped; `file` must stay open
    /// as long. `offset`, `len` and `ptr` must be multiples of [`BLOCK`].
    pub(crate) unsafe fn push(
        &mut self,
        file: &File,
        offset: u64,
        ptr: *mut u8,
        len: usize,
        tag: u64,
    ) -> io::Result<()> {
        if !offset.is_multiple_of(BLOCK)
            || !(ptr as u64).is_multiple_of(BLOCK)
            || !(len as u64).is_multiple_of(BLOCK)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "direct I/O needs block-aligned offsets, buffers and lengths",
            ));
        }
        let fd = file.as_raw_fd();
        let state = self.reads.entry(tag).or_default();
        let mut at = 0;
        while at < len {
            let n = self.shape.chunk.min(len - at);
            state.requests += 1;
            self.queued.push_back(Request {
                tag,
                fd,
                offset: offset + at as u64,
                // SAFETY: `at < len`: inside the caller's buffer.
                ptr: unsafe { ptr.add(at) },
                len: n,
                done: 0,
            });
            at += n;
        }
        if len == 0 {
            // Reported by the next `wait` as a read of nothing.
            state.requests = 0;
        }
        self.submit_queued()
    }

    /// Moves queued requests into the ring while the depth allows, and hands them to the
    /// kernel.
    fn submit_queued(&mut self) -> io::Result<()> {
        let mut pushed = false;
        while self.in_flight < self.shape.depth
            && let Some(request) = self.queued.pop_front()
        {
            self.submit(request)?;
            pushed = true;
        }
        if pushed {
            self.ring.as_mut().expect("a ring until dropped").submit()?;
        }
        Ok(())
    }

    /// Reaps what completed (without waiting), keeps the queue full, and returns the reads
    /// finished since the last call.
    pub(crate) fn poll(&mut self) -> io::Result<Vec<ReadDone>> {
        self.reap()?;
        self.submit_queued()?;
        Ok(self.take_finished())
    }

    fn reap(&mut self) -> io::Result<()> {
        let ring = self.ring.as_mut().expect("a ring until dropped");
        let completions: Vec<(usize, i32)> = ring
            .completion()
            .map(|cqe| (cqe.user_data() as usize, cqe.result()))
            .collect();
        for (slot, result) in completions {
            self.complete(slot, result)?;
        }
        Ok(())
    }

    fn submit(&mut self, request: Request) -> io::Result<()> {
        use io_uring::{opcode, types};
        let Some(slot) = self.slots.iter().position(Option::is_none) else {
            self.queued.push_front(request);
            return Ok(());
        };
        let left = request.len - request.done;
        // SAFETY: `done < len`, so the target lies inside the request's range of the caller's
        // buffer, which `push`'s contract keeps valid until the read is reported.
        let target = unsafe { request.ptr.add(request.done) };
        let entry = opcode::Read::new(
            types::Fd(request.fd),
            target,
            u32::try_from(left).unwrap_or(u32::MAX),
        )
        .offset(request.offset + request.done as u64)
        .build()
        .user_data(slot as u64);
        let ring = self.ring.as_mut().expect("a ring until dropped");
        // SAFETY: the buffer stays valid until the completion is reaped (see `push`).
        if unsafe { ring.submission().push(&entry) }.is_err() {
            ring.submit()?;
            // SAFETY: as above.
            unsafe { ring.submission().push(&entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        self.slots[slot] = Some(request);
        self.in_flight += 1;
        self.max_in_flight = self.max_in_flight.max(self.in_flight);
        Ok(())
    }

    /// Submits what is queued, waits for at least one completion when something is in flight,
    /// and returns the reads finished since the last call (in no particular order).
    pub(crate) fn wait(&mut self) -> io::Result<Vec<ReadDone>> {
        let mut finished = self.take_finished();
        if !finished.is_empty() {
            return Ok(finished);
        }
        self.submit_queued()?;
        while finished.is_empty() && self.in_flight > 0 {
            let ring = self.ring.as_mut().expect("a ring until dropped");
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
            self.reap()?;
            self.submit_queued()?;
            finished = self.take_finished();
        }
        Ok(finished)
    }

    fn complete(&mut self, slot: usize, result: i32) -> io::Result<()> {
        let Some(mut request) = self.slots.get_mut(slot).and_then(Option::take) else {
            return Ok(());
        };
        self.in_flight -= 1;
        let state = self.reads.entry(request.tag).or_default();
        if result < 0 {
            let err = io::Error::from_raw_os_error(-result);
            if err.kind() == io::ErrorKind::Interrupted && state.error.is_none() {
                return self.submit(request);
            }
            state.error.get_or_insert(err);
            state.requests -= 1;
            return Ok(());
        }
        let n = result.cast_unsigned() as usize;
        request.done += n;
        if n == 0 || request.done == request.len || state.error.is_some() {
            if request.done < request.len {
                state.eof = true;
            }
            state.bytes += request.done;
            state.requests -= 1;
            return Ok(());
        }
        // A short read that is not the end of the file: continue it.
        self.submit(request)
    }

    fn take_finished(&mut self) -> Vec<ReadDone> {
        let tags: Vec<u64> = self
            .reads
            .iter()
            .filter(|(tag, state)| {
                state.requests == 0 && !self.queued.iter().any(|r| r.tag == **tag)
            })
            .map(|(tag, _)| *tag)
            .collect();
        tags.into_iter()
            .filter_map(|tag| {
                let state = self.reads.remove(&tag)?;
                let result = match state.error {
                    Some(err) => Err(err),
                    None => Ok(state.bytes),
                };
                let _ = state.eof;
                Some(ReadDone { tag, result })
            })
            .collect()
    }

    /// Drops the reads not yet submitted and waits for the requests in flight.
    fn drain(&mut self) {
        self.queued.clear();
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        while self.in_flight > 0 {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                // Cannot confirm completion: never let the buffers go while the kernel may
                // write them.
                Err(_) => std::process::abort(),
            }
            let slots: Vec<usize> = ring
                .completion()
                .map(|cqe| cqe.user_data() as usize)
                .collect();
            for slot in slots {
                if self.slots.get_mut(slot).and_then(Option::take).is_some() {
                    self.in_flight -= 1;
                }
            }
        }
        self.reads.clear();
    }
}

impl Drop for ReadQueue {
    fn drop(&mut self) {
        self.drain();
        if let Some(ring) = self.ring.take() {
            give_ring(ring);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DirectBuf, IoEngine, IoShape, read_at, reopen_direct, write_at};
    use crate::sys::AlignedBuf;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 131 % 251) as u8).collect()
    }

    #[test]
    fn direct_reads_and_writes_round_trip_with_both_engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes = pattern(5 << 20);
        std::fs::write(&path, &bytes[..(5 << 20) - 100]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let direct = reopen_direct(&file, false).unwrap_or(file);
        for engine in [IoEngine::Uring, IoEngine::Threads] {
            for shape in [
                IoShape {
                    chunk: 4096,
                    depth: 1,
                },
                IoShape {
                    chunk: 1 << 20,
                    depth: 4,
                },
                IoShape {
                    chunk: 8 << 20,
                    depth: 32,
                },
            ] {
                let mut buf = AlignedBuf::zeroed(6 << 20).unwrap();
                let (n, used) =
                    read_at(&direct, 8192, buf.as_mut_slice(), shape, Some(engine)).unwrap();
                if used != engine {
                    println!("io_uring is unavailable here: {used:?} used instead");
                }
                assert_eq!(
                    n,
                    (5 << 20) - 100 - 8192,
                    "{engine:?} {shape:?}: short at EOF"
                );
                assert_eq!(&buf.as_slice()[..n], &bytes[8192..(5 << 20) - 100]);
            }
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("g"))
            .unwrap();
        let out_direct = reopen_direct(&out, true).unwrap_or(out);
        let mut buf = AlignedBuf::zeroed(3 << 20).unwrap();
        buf.as_mut_slice().copy_from_slice(&bytes[..3 << 20]);
        for (i, engine) in [IoEngine::Uring, IoEngine::Threads].into_iter().enumerate() {
            let at = i as u64 * (4 << 20);
            write_at(
                &out_direct,
                at,
                buf.as_slice(),
                IoShape::DEFAULT,
                Some(engine),
            )
            .unwrap();
            let mut back = vec![0u8; 3 << 20];
            let plain = std::fs::File::open(dir.path().join("g")).unwrap();
            std::os::unix::fs::FileExt::read_exact_at(&plain, &mut back, at).unwrap();
            assert_eq!(back, &bytes[..3 << 20]);
        }
    }

    #[test]
    fn misaligned_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let mut buf = AlignedBuf::zeroed(8192).unwrap();
        assert!(read_at(&file, 100, buf.as_mut_slice(), IoShape::DEFAULT, None).is_err());
        assert!(
            read_at(
                &file,
                0,
                &mut buf.as_mut_slice()[1..4097],
                IoShape::DEFAULT,
                None
            )
            .is_err()
        );
    }

    #[test]
    fn a_direct_buf_places_the_range_inside_its_blocks() {
        let mut d = DirectBuf::for_range(5000, 10_000).unwrap();
        assert_eq!(d.as_slice().len(), 10_000);
        assert_eq!(
            d.blocks_mut().len(),
            12288,
            "blocks 1-3 of the file, 904 + 10000 bytes"
        );
        d.blocks_mut()[5000 - 4096] = 7;
        assert_eq!(d.as_slice()[0], 7);
    }
}

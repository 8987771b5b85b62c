//! The spill file: where dirty bytes go when RAM may not hold them.
//!
//! One file per store, created with `O_TMPFILE` in the spill directory so that a crash leaves
//! nothing behind (no name ever exists). Space is reserved with `fallocate` before any byte is
//! written — a full disk is then `ENOSPC` from `fallocate`, an ordinary error, never a SIGBUS or
//! a half-written extent. Writes and reads use `O_DIRECT` (no copy of spilled bytes lingers in
//! the page cache) with several requests in flight, falling back to `pwrite`/`pread` where the
//! file system refuses direct I/O; every extent carries an xxh3 checksum verified on
//! every read; freed extents have their blocks returned with hole punching.

mod allocator;

use crate::size::Bytes;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rustix::fs::FallocateFlags;

use allocator::{Allocator, blocks};

use crate::sys::AlignedBuf;
use crate::sys::direct::{BLOCK, IoShape, read_at, reopen_direct, write_at};

/// Errors of the spill file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpillError {
    /// The file system holding the spill file is full.
    #[error("no space left in {} for {} of spill", dir.display(), Bytes(*.requested))]
    NoSpace {
        /// The spill directory.
        dir: PathBuf,
        /// Bytes asked for.
        requested: u64,
    },
    /// The configured `spill_max` would be exceeded.
    #[error("spill limit reached: {} of {} used, {} more asked for", Bytes(*.used), Bytes(*.max), Bytes(*.requested))]
    Limit {
        /// Bytes asked for.
        requested: u64,
        /// Bytes in use.
        used: u64,
        /// The limit.
        max: u64,
    },
    /// The spill file could not be created, written or read.
    #[error("spill file in {}: cannot {op}", dir.display())]
    Io {
        /// The spill directory.
        dir: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The device the bytes were streamed from or to failed.
    #[error("device transfer failed")]
    Device {
        /// The device's error.
        #[source]
        source: crate::device::DeviceError,
    },
    /// An extent's bytes do not match the checksum written with them.
    #[error(
        "spill extent at offset {offset} ({len} bytes) is corrupt: checksum {actual:#018x}, expected {expected:#018x}"
    )]
    Checksum {
        /// Offset in the spill file.
        offset: u64,
        /// Length.
        len: u64,
        /// Checksum written.
        expected: u64,
        /// Checksum read back.
        actual: u64,
    },
}

/// One tensor's bytes in the spill file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) checksum: u64,
}

impl Extent {
    fn reserved(&self) -> u64 {
        blocks(self.len)
    }
}

/// The spill file, created on first use.
#[derive(Debug)]
pub(crate) struct SpillFile {
    dir: PathBuf,
    max: Option<u64>,
    file: Option<File>,
    /// The same file opened with `O_DIRECT` (`None` where the file system refuses it).
    direct: Option<File>,
    /// Block-aligned buffers kept between calls (fresh memory costs page faults on every
    /// use): for unaligned callers' bytes, and for streaming to and from devices.
    bounce: Mutex<Option<AlignedBuf>>,
    stream: Mutex<Option<AlignedBuf>>,
    alloc: Allocator,
    /// Bytes reserved by live extents (whole blocks).
    used: u64,
    /// Space is reserved (`fallocate`d) from the allocator's end up to here: extents that
    /// grow the file reserve [`AHEAD`] more at once, so that a run of spills costs one
    /// `fallocate` per step instead of one each. Lowered whenever a range is punched.
    tail_reserved: u64,
}

/// How far past a growing extent space is reserved ahead (less where `spill_max` is near).
const AHEAD: u64 = 256 << 20;

impl SpillFile {
    pub(crate) fn new(dir: PathBuf, max: Option<u64>) -> Self {
        Self {
            dir,
            max,
            file: None,
            direct: None,
            bounce: Mutex::default(),
            stream: Mutex::default(),
            alloc: Allocator::default(),
            used: 0,
            tail_reserved: 0,
        }
    }

    /// Bytes reserved by live extents.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> SpillError + use<> {
        let dir = self.dir.clone();
        move |source| SpillError::Io { dir, op, source }
    }

    /// Checks that spilling can work here: creates the spill file and reserves its first
    /// block, as the first spill would. On error nothing is kept, and the first spill tries
    /// again (the directory may be fixed meanwhile).
    pub(crate) fn probe(&mut self) -> Result<(), SpillError> {
        if self.file.is_some() {
            return Ok(());
        }
        let file = create_unnamed(&self.dir).map_err(self.io("create"))?;
        rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, BLOCK).map_err(
            |errno| match errno {
                rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT => SpillError::NoSpace {
                    dir: self.dir.clone(),
                    requested: BLOCK,
                },
                errno => SpillError::Io {
                    dir: self.dir.clone(),
                    op: "reserve space in",
                    source: errno.into(),
                },
            },
        )?;
        self.direct = reopen_direct(&file, true);
        self.file = Some(file);
        // The block is reserved at the allocator's end: the first extent starts in it.
        self.tail_reserved = BLOCK;
        Ok(())
    }

    fn file(&mut self) -> Result<&File, SpillError> {
        if self.file.is_none() {
            let file = create_unnamed(&self.dir).map_err(self.io("create"))?;
            self.direct = reopen_direct(&file, true);
            self.file = Some(file);
        }
        Ok(self.file.as_ref().expect("created above"))
    }

    /// Reserves whole blocks for `len` bytes: checks `spill_max`, creates the file on first
    /// use, allocates an extent and `fallocate`s it. On error nothing stays reserved.
    fn reserve(&mut self, len: u64) -> Result<(u64, u64), SpillError> {
        let reserved = blocks(len);
        if let Some(max) = self.max
            && self.used + reserved > max
        {
            return Err(SpillError::Limit {
                requested: len,
                used: self.used,
                max,
            });
        }
        self.file()?;
        let tail = self.alloc.end();
        let offset = self.alloc.allocate(reserved);
        let end = offset + reserved;
        let file = self.file.as_ref().expect("created above");
        let fallocate = |from: u64, to: u64| {
            rustix::fs::fallocate(file, FallocateFlags::empty(), from, to - from)
        };
        let result = if offset < tail {
            // A range freed earlier: it was punched then.
            fallocate(offset, end)
        } else if end <= self.tail_reserved {
            // Inside the space reserved ahead by an earlier extent.
            Ok(())
        } else {
            let from = offset.max(self.tail_reserved);
            let room = self
                .max
                .map_or(AHEAD, |max| max.saturating_sub(self.used + reserved));
            let ahead = AHEAD.min(room) / BLOCK * BLOCK;
            // Ahead if the disk has room for it, else exactly what this extent needs.
            let reached = if ahead > 0 && fallocate(from, end + ahead).is_ok() {
                Ok(end + ahead)
            } else {
                if ahead > 0 {
                    // A failed fallocate may leave part of the range allocated.
                    punch(file, end, ahead);
                }
                fallocate(from, end).map(|()| end)
            };
            reached.map(|reached| self.tail_reserved = reached)
        };
        if let Err(errno) = result {
            self.abort(offset, reserved);
            return Err(match errno {
                rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT => SpillError::NoSpace {
                    dir: self.dir.clone(),
                    requested: len,
                },
                errno => SpillError::Io {
                    dir: self.dir.clone(),
                    op: "reserve space in",
                    source: errno.into(),
                },
            });
        }
        Ok((offset, reserved))
    }

    /// Gives back a reservation whose write failed. ext4 may leave a partial allocation behind
    /// a failed `fallocate`: punching the range frees it too.
    fn abort(&mut self, offset: u64, reserved: u64) {
        if let Some(file) = &self.file {
            punch(file, offset, reserved);
        }
        self.give_back(offset, reserved);
    }

    /// Returns a punched range to the allocator. When that shrinks the file's used tail, the
    /// tail is no longer all reserved: forget the space reserved ahead (reserving it again
    /// later is harmless).
    fn give_back(&mut self, offset: u64, reserved: u64) {
        let tail = self.alloc.end();
        self.alloc.free(offset, reserved);
        if self.alloc.end() < tail {
            self.tail_reserved = self.alloc.end();
        }
    }

    fn write_error(&self, len: u64, source: io::Error) -> SpillError {
        if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            SpillError::NoSpace {
                dir: self.dir.clone(),
                requested: len,
            }
        } else {
            SpillError::Io {
                dir: self.dir.clone(),
                op: "write",
                source,
            }
        }
    }

    /// Writes `bytes` to a new extent: space reserved first, then written, then checksummed.
    /// On any error nothing is kept and the caller still holds its bytes.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<Extent, SpillError> {
        let len = bytes.len() as u64;
        let (offset, reserved) = self.reserve(len)?;
        // Large tensors are checksummed on a second thread while they are written.
        let (written, checksum) = if bytes.len() >= HASH_ALONGSIDE_MIN {
            std::thread::scope(|scope| {
                let hash = scope.spawn(|| checksum(bytes));
                let written = self.put(offset, bytes);
                let checksum = hash
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (written, checksum)
            })
        } else {
            (self.put(offset, bytes), checksum(bytes))
        };
        if let Err(source) = written {
            let err = self.write_error(len, source);
            self.abort(offset, reserved);
            return Err(err);
        }
        self.used += reserved;
        Ok(Extent {
            offset,
            len,
            checksum,
        })
    }

    /// Writes `len` bytes produced chunk by chunk: `fill(offset, chunk)` fills each chunk
    /// (at most `chunk_len` bytes) of the tensor, for example from a device. The checksum is
    /// computed as the chunks pass. On any error nothing is kept.
    pub(crate) fn write_with(
        &mut self,
        len: u64,
        chunk_len: usize,
        mut fill: impl FnMut(u64, &mut [u8]) -> Result<(), crate::device::DeviceError>,
    ) -> Result<Extent, SpillError> {
        let (offset, reserved) = self.reserve(len)?;
        match self.stream_out(offset, len, chunk_len, &mut fill) {
            Ok(checksum) => {
                self.used += reserved;
                Ok(Extent {
                    offset,
                    len,
                    checksum,
                })
            }
            Err(err) => {
                self.abort(offset, reserved);
                Err(err)
            }
        }
    }

    /// The body of [`SpillFile::write_with`]: fills and writes the chunks of a reserved
    /// extent; returns their checksum.
    fn stream_out(
        &self,
        offset: u64,
        len: u64,
        chunk_len: usize,
        fill: &mut impl FnMut(u64, &mut [u8]) -> Result<(), crate::device::DeviceError>,
    ) -> Result<u64, SpillError> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let size = chunk_size(chunk_len, len);
        let mut slot = reuse(&self.stream, size)?;
        let chunk = &mut slot.as_mut().expect("reuse fills it").as_mut_slice()[..size];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            let buf = &mut chunk[..n];
            fill(done, buf).map_err(|source| SpillError::Device { source })?;
            self.put(offset + done, buf)
                .map_err(|source| self.write_error(len, source))?;
            hasher.update(buf);
            done += n as u64;
        }
        Ok(hasher.digest())
    }

    /// Reads an extent chunk by chunk into `sink(offset, chunk)` (for example a device) and
    /// verifies the checksum at the end. On a mismatch the caller must discard what `sink`
    /// received.
    pub(crate) fn read_with(
        &self,
        extent: &Extent,
        chunk_len: usize,
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), crate::device::DeviceError>,
    ) -> Result<(), SpillError> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let size = chunk_size(chunk_len, extent.len);
        let mut slot = reuse(&self.stream, size)?;
        let chunk = &mut slot.as_mut().expect("reuse fills it").as_mut_slice()[..size];
        let mut done = 0u64;
        while done < extent.len {
            let n = (extent.len - done).min(chunk.len() as u64) as usize;
            let buf = &mut chunk[..n];
            self.get(extent.offset + done, buf)
                .map_err(self.io("read"))?;
            hasher.update(buf);
            sink(done, buf).map_err(|source| SpillError::Device { source })?;
            done += n as u64;
        }
        let actual = hasher.digest();
        if actual != extent.checksum {
            return Err(SpillError::Checksum {
                offset: extent.offset,
                len: extent.len,
                expected: extent.checksum,
                actual,
            });
        }
        Ok(())
    }

    /// Reads an extent into `dst` (exactly `extent.len` bytes) and verifies its checksum.
    pub(crate) fn read(&self, extent: &Extent, dst: &mut [u8]) -> Result<(), SpillError> {
        debug_assert_eq!(dst.len() as u64, extent.len);
        self.get(extent.offset, dst).map_err(self.io("read"))?;
        let actual = checksum(dst);
        if actual != extent.checksum {
            return Err(SpillError::Checksum {
                offset: extent.offset,
                len: extent.len,
                expected: extent.checksum,
                actual,
            });
        }
        Ok(())
    }

    /// Writes `bytes` at the block-aligned `offset` of a reserved extent: with `O_DIRECT`
    /// straight from the caller's buffer when it is block-aligned (its last partial block,
    /// and unaligned buffers, through a block-aligned bounce buffer, zero-padded inside the
    /// reservation); with `pwrite` where direct I/O is unavailable.
    fn put(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let Some(direct) = &self.direct else {
            let file = self.file.as_ref().ok_or(io::ErrorKind::NotFound)?;
            return file.write_all_at(bytes, offset);
        };
        let body = if (bytes.as_ptr() as u64).is_multiple_of(BLOCK) {
            let body = bytes.len() / BLOCK as usize * BLOCK as usize;
            write_at(direct, offset, &bytes[..body], IoShape::DEFAULT, None)?;
            body
        } else {
            0
        };
        let rest = &bytes[body..];
        // Large enough for several requests in flight per copy.
        let size = chunk_size(BOUNCE, rest.len() as u64);
        let mut slot =
            reuse(&self.bounce, size).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let bounce = &mut slot.as_mut().expect("reuse fills it").as_mut_slice()[..size];
        let at = offset + body as u64;
        if rest.len() < OVERLAP_MIN {
            // One piece: `size` covers all of it.
            let padded = rest.len().div_ceil(BLOCK as usize) * BLOCK as usize;
            let buf = &mut bounce[..padded];
            fill_padded(buf, rest);
            return write_at(direct, at, buf, IoShape::DEFAULT, None).map(drop);
        }
        overlapped_write(direct, at, rest, bounce)
    }

    /// Reads `dst.len()` bytes at the block-aligned `offset` of an extent: the mirror of
    /// [`SpillFile::put`].
    fn get(&self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        let Some(direct) = &self.direct else {
            let file = self.file.as_ref().ok_or(io::ErrorKind::NotFound)?;
            return file.read_exact_at(dst, offset);
        };
        let short = || io::Error::from(io::ErrorKind::UnexpectedEof);
        let body = if (dst.as_ptr() as u64).is_multiple_of(BLOCK) {
            let body = dst.len() / BLOCK as usize * BLOCK as usize;
            let (n, _) = read_at(direct, offset, &mut dst[..body], IoShape::DEFAULT, None)?;
            if n < body {
                return Err(short());
            }
            body
        } else {
            0
        };
        let len = dst.len() - body;
        let size = chunk_size(BOUNCE, len as u64);
        let mut slot =
            reuse(&self.bounce, size).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let bounce = &mut slot.as_mut().expect("reuse fills it").as_mut_slice()[..size];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(bounce.len());
            let padded = (n as u64).div_ceil(BLOCK) * BLOCK;
            let buf = &mut bounce[..padded as usize];
            let (got, _) = read_at(
                direct,
                offset + (body + done) as u64,
                buf,
                IoShape::DEFAULT,
                None,
            )?;
            if got < n {
                return Err(short());
            }
            dst[body + done..body + done + n].copy_from_slice(&buf[..n]);
            done += n;
        }
        Ok(())
    }

    /// Frees an extent: its blocks go back to the file system and to the allocator.
    pub(crate) fn free(&mut self, extent: Extent) {
        let reserved = extent.reserved();
        if let Some(file) = &self.file {
            punch(file, extent.offset, reserved);
        }
        self.give_back(extent.offset, reserved);
        self.used -= reserved;
    }
}

/// Copies `bytes` to the start of `buf` and zeroes the rest (the padding of the last block).
fn fill_padded(buf: &mut [u8], bytes: &[u8]) {
    buf[..bytes.len()].copy_from_slice(bytes);
    buf[bytes.len()..].fill(0);
}

/// Writes `bytes` (any alignment) at the block-aligned `offset` of a direct file through
/// `SLOTS` slots of `bounce`: this thread copies the next piece into a free slot while
/// `WRITERS` writer threads each write a filled one, so the copy hides behind the writes and
/// one slot's requests are queued while another's complete. (On the development machine one
/// to four writers measured the same within its noise; two is the smallest number that keeps
/// a write queued across slot boundaries.)
fn overlapped_write(direct: &File, offset: u64, bytes: &[u8], bounce: &mut [u8]) -> io::Result<()> {
    const SLOTS: usize = 4;
    const WRITERS: usize = 2;
    let slot = bounce.len() / SLOTS / BLOCK as usize * BLOCK as usize;
    assert!(
        slot > 0,
        "the bounce buffer holds a block per slot at least"
    );
    let (to_writers, jobs) = std::sync::mpsc::sync_channel::<(&mut [u8], u64, usize)>(SLOTS);
    let jobs = Mutex::new(jobs);
    let (to_copier, done) = std::sync::mpsc::channel::<(&mut [u8], io::Result<()>)>();
    std::thread::scope(|scope| {
        for _ in 0..WRITERS {
            let (jobs, to_copier) = (&jobs, to_copier.clone());
            scope.spawn(move || {
                loop {
                    let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok((buf, at, padded)) = job else { return };
                    let result =
                        write_at(direct, at, &buf[..padded], IoShape::DEFAULT, None).map(drop);
                    if to_copier.send((buf, result)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(to_copier);
        let mut free: Vec<&mut [u8]> = bounce.chunks_exact_mut(slot).take(SLOTS).collect();
        let mut in_flight = 0;
        let mut error = None;
        let mut at = 0;
        while at < bytes.len() && error.is_none() {
            let buf = if let Some(buf) = free.pop() {
                buf
            } else {
                let (buf, result) = done.recv().expect("the writers answer every job");
                in_flight -= 1;
                if let Err(err) = result {
                    error = Some(err);
                    break;
                }
                buf
            };
            let n = (bytes.len() - at).min(slot);
            let padded = n.div_ceil(BLOCK as usize) * BLOCK as usize;
            fill_padded(&mut buf[..padded], &bytes[at..at + n]);
            to_writers
                .send((buf, offset + at as u64, padded))
                .expect("the writers run until the channel closes");
            in_flight += 1;
            at += n;
        }
        drop(to_writers);
        for _ in 0..in_flight {
            let (_, result) = done.recv().expect("the writers answer every job");
            if let Err(err) = result {
                error.get_or_insert(err);
            }
        }
        error.map_or(Ok(()), Err)
    })
}

/// Unaligned bytes from this size on are copied and written in overlapping slots.
const OVERLAP_MIN: usize = 8 << 20;

/// The bounce buffer for unaligned buffers: 8 requests of the default size.
const BOUNCE: usize = 32 << 20;

/// The most memory the spill file's own buffers hold (kept between uses) for tensors of at
/// most `largest` bytes moved in chunks of `chunk_len`: the bounce buffer for unaligned
/// bytes and the stream buffer for device transfers.
pub(crate) fn buffers_bound(largest: u64, chunk_len: usize) -> u64 {
    (chunk_size(BOUNCE, largest) + chunk_size(chunk_len, largest)) as u64
}

/// Bytes of buffer for moving `len` bytes in chunks of about `chunk_len`: whole blocks, at
/// most the rounded-up `len`.
fn chunk_size(chunk_len: usize, len: u64) -> usize {
    let chunk = (chunk_len as u64).max(BLOCK).div_ceil(BLOCK) * BLOCK;
    chunk.min(len.div_ceil(BLOCK) * BLOCK).max(BLOCK) as usize
}

/// The buffer kept in `slot`, grown to at least `size` bytes.
fn reuse(
    slot: &Mutex<Option<AlignedBuf>>,
    size: usize,
) -> Result<MutexGuard<'_, Option<AlignedBuf>>, SpillError> {
    let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if guard.as_ref().is_none_or(|buf| buf.as_slice().len() < size) {
        *guard = None;
        *guard = Some(AlignedBuf::zeroed(size).ok_or_else(|| SpillError::Io {
            dir: PathBuf::new(),
            op: "allocate a buffer for",
            source: io::ErrorKind::OutOfMemory.into(),
        })?);
    }
    Ok(guard)
}

/// Tensors at least this large are checksummed alongside their write.
const HASH_ALONGSIDE_MIN: usize = 8 << 20;

fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Returns `[offset, offset + len)` to the file system. Advisory: a failure only costs space.
fn punch(file: &File, offset: u64, len: u64) {
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    if let Err(err) = rustix::fs::fallocate(file, flags, offset, len) {
        log::debug!("punching a hole in the spill file failed: {err}");
    }
}

/// An unnamed file in `dir`: `O_TMPFILE`, or where the file system lacks it, a file unlinked
/// right after creation.
fn create_unnamed(dir: &Path) -> io::Result<File> {
    let tmpfile = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::TMPFILE.bits().cast_signed())
        .open(dir);
    match tmpfile {
        Ok(file) => Ok(file),
        Err(err)
            if matches!(
                rustix::io::Errno::from_io_error(&err),
                Some(
                    rustix::io::Errno::OPNOTSUPP
                        | rustix::io::Errno::ISDIR
                        | rustix::io::Errno::INVAL
                )
            ) =>
        {
            let path = dir.join(format!(
                ".lowtide-spill-{}-{:x}",
                std::process::id(),
                nonce()
            ));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(file)
        }
        Err(err) => Err(err),
    }
}

fn nonce() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::{SpillError, SpillFile};

    #[test]
    fn round_trip_reuse_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = SpillFile::new(dir.path().to_path_buf(), Some(64 << 10));
        let a: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let extent = spill.write(&a).unwrap();
        assert_eq!(spill.used(), 12_288);
        let mut back = vec![0; a.len()];
        spill.read(&extent, &mut back).unwrap();
        assert_eq!(back, a);
        // Nothing named is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        spill.free(extent);
        assert_eq!(spill.used(), 0);
        // Streamed writes and reads give the same checksum as whole ones.
        let streamed = spill
            .write_with(a.len() as u64, 4096, |off, buf| {
                buf.copy_from_slice(&a[off as usize..off as usize + buf.len()]);
                Ok(())
            })
            .unwrap();
        assert_eq!(streamed.checksum, super::checksum(&a));
        let mut gathered = Vec::new();
        spill
            .read_with(&streamed, 4096, |_, chunk| {
                gathered.extend_from_slice(chunk);
                Ok(())
            })
            .unwrap();
        assert_eq!(gathered, a);
        spill.free(streamed);
        let again = spill.write(&a).unwrap();
        assert_eq!(again.offset, 0, "freed space is reused");
        let err = spill.write(&vec![0; 60 << 10]).unwrap_err();
        assert!(matches!(err, SpillError::Limit { .. }), "{err}");
        assert_eq!(spill.used(), 12_288, "a refused write reserves nothing");
    }

    /// Space is reserved ahead of a growing file, never beyond `spill_max`, and every live
    /// extent's blocks stay allocated through frees at the tail and in the middle.
    #[test]
    fn space_is_reserved_ahead_and_kept_for_live_extents() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mut spill = SpillFile::new(dir.path().to_path_buf(), Some(8 << 20));
        let allocated = |spill: &SpillFile| {
            let file = spill.file.as_ref().unwrap();
            file.metadata().unwrap().blocks() * 512
        };
        let piece = |i: u8| vec![i; 1 << 20];
        let mut extents: Vec<_> = (0..4).map(|i| spill.write(&piece(i)).unwrap()).collect();
        // The first extent reserved ahead up to the limit; the others fit inside.
        assert_eq!(spill.tail_reserved, 8 << 20);
        assert!(allocated(&spill) >= 8 << 20);
        // Free the tail and one in the middle: punched, the ahead space forgotten.
        let tail = extents.pop().unwrap();
        spill.free(tail);
        let middle = extents.remove(1);
        spill.free(middle);
        assert_eq!(spill.tail_reserved, spill.alloc.end());
        assert!(allocated(&spill) >= spill.used());
        // New extents reuse the punched ranges and reserve them again.
        let refill: Vec<_> = (10..13).map(|i| spill.write(&piece(i)).unwrap()).collect();
        assert!(allocated(&spill) >= spill.used());
        for (extent, i) in extents.iter().zip([0u8, 2]).chain(refill.iter().zip(10..)) {
            let mut back = vec![0; 1 << 20];
            spill.read(extent, &mut back).unwrap();
            assert!(back.iter().all(|&b| b == i), "extent of {i}");
        }
    }

    #[test]
    fn a_probe_reserves_the_first_block_and_the_first_extent_uses_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = SpillFile::new(dir.path().to_path_buf(), None);
        spill.probe().unwrap();
        assert_eq!(spill.tail_reserved, super::BLOCK);
        let extent = spill.write(b"abc").unwrap();
        assert_eq!(extent.offset, 0);
        let mut back = [0; 3];
        spill.read(&extent, &mut back).unwrap();
        assert_eq!(&back, b"abc");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut missing = SpillFile::new("/nonexistent/spill".into(), None);
        let err = missing.probe().unwrap_err();
        assert!(matches!(err, SpillError::Io { op: "create", .. }), "{err}");
    }

    #[test]
    fn missing_directory_is_an_io_error() {
        let mut spill = SpillFile::new("/nonexistent/spill".into(), None);
        let err = spill.write(b"abc").unwrap_err();
        assert!(matches!(err, SpillError::Io { op: "create", .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/spill"));
    }
}

//! The spill file: where dirty bytes go when RAM may not hold them.
//!
//! One file per store, created with `O_TMPFILE` in the spill directory so that a crash leaves
//! nothing behind (no name ever exists). Space is reserved with `fallocate` before any byte is
//! written — a full disk is then `ENOSPC` from `fallocate`, an ordinary error, never a SIGBUS or
//! a half-written extent. Writes and reads use `O_DIRECT` (no copy of spilled bytes lingers in
//! the page cache) with several requests in flight, falling back to `pwrite`/`pread` where the
//! file system refuses direct I/O; every extent carries an xxh3 checksum, computed alongside
//! every write and verified alongside every read; freed extents have their blocks returned
//! with hole punching. The requests' size and number in flight (the file's shape) fit the
//! device under the spill directory (`shape.rs`).

mod allocator;
mod shape;
mod storage;

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use allocator::{Allocator, blocks};
pub(crate) use shape::{for_dir as shape_for_dir, normalized as normalized_shape};
pub use storage::{DiskStorage, STORAGE_BLOCK, Storage, StorageFile};

use crate::size::Bytes;
use crate::sys::AlignedBuf;
use crate::sys::direct::{BLOCK, IoShape};
use crate::sys::fork::Owner;

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

    /// Whether `bytes` (the extent's, read back) match its checksum.
    pub(crate) fn verify(&self, bytes: &[u8]) -> bool {
        checksum(bytes) == self.checksum
    }
}

/// The spill file, created on first use.
///
/// Shared by every thread of a store. Its space (which blocks are taken, how much is
/// reserved) sits behind a small lock held only for allocator updates and the `fallocate`
/// and hole-punching calls; the bytes of an extent are written and read outside it, at their
/// own offsets, so a long spill stalls neither restores nor other spills. Each transfer in
/// flight holds its own staging buffer (one is kept between uses).
#[derive(Debug)]
pub(crate) struct SpillFile {
    dir: PathBuf,
    max: Option<u64>,
    storage: Arc<dyn Storage>,
    /// How each tensor's bytes are split into requests (see `shape.rs`).
    shape: IoShape,
    /// The file, created on first use (under the space lock, so once); reads and writes
    /// take it without any lock.
    file: std::sync::OnceLock<Arc<dyn StorageFile>>,
    space: Mutex<Space>,
    /// Extents freed but not yet punched: freeing happens under the store's registry lock,
    /// so it only queues the range here (a leaf lock); the next reservation, or
    /// [`SpillFile::reclaim`] called outside the registry lock, punches them and gives them
    /// back to the allocator.
    freed: Mutex<Vec<(u64, u64)>>,
    /// Block-aligned buffers kept between calls (fresh memory costs page faults on every
    /// use): for unaligned callers' bytes, and for streaming to and from devices.
    bounce: BufferSlot,
    stream: BufferSlot,
    /// The process that made it. A child forked from that process shares the file (the same
    /// open file, its blocks and holes) but keeps its own copy of the space map: if it
    /// punched or wrote, the parent would lose extents it still reads. The store refuses
    /// every operation in a child; this is the spill file's own guard against writing or
    /// punching there.
    owner: Owner,
}

#[derive(Debug, Default)]
struct Space {
    alloc: Allocator,
    /// Bytes reserved by live extents and by writes in flight (whole blocks).
    used: u64,
    /// Space is reserved (`fallocate`d) from the allocator's end up to here: extents that
    /// grow the file reserve [`AHEAD`] more at once, so that a run of spills costs one
    /// `fallocate` per step instead of one each. Lowered whenever a range is punched.
    tail_reserved: u64,
}

/// How far past a growing extent space is reserved ahead (less where `spill_max` is near).
const AHEAD: u64 = 256 << 20;

/// A reserved extent being written: its file, offset and reserved length.
struct Reservation {
    file: Arc<dyn StorageFile>,
    offset: u64,
    reserved: u64,
}

impl SpillFile {
    pub(crate) fn new(
        dir: PathBuf,
        max: Option<u64>,
        storage: Arc<dyn Storage>,
        shape: IoShape,
    ) -> Self {
        Self {
            dir,
            max,
            storage,
            shape,
            file: std::sync::OnceLock::new(),
            space: Mutex::default(),
            freed: Mutex::default(),
            bounce: BufferSlot::default(),
            stream: BufferSlot::default(),
            owner: Owner::current(),
        }
    }

    fn space(&self) -> MutexGuard<'_, Space> {
        // Every update of the space completes before anything that can panic.
        self.space.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes reserved by live extents (and writes in flight).
    pub(crate) fn used(&self) -> u64 {
        let space = self.space();
        let queued: u64 = self.queued().iter().map(|(_, len)| len).sum();
        space.used - queued
    }

    fn queued(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.freed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Punches the extents freed since the last call and returns them to the allocator.
    pub(crate) fn reclaim(&self) {
        let mut space = self.space();
        self.reclaim_locked(&mut space);
    }

    fn reclaim_locked(&self, space: &mut Space) {
        if !self.owner.is_current() {
            return;
        }
        let freed = std::mem::take(&mut *self.queued());
        if freed.is_empty() {
            return;
        }
        let file = self.file.get().cloned();
        for (offset, reserved) in freed {
            if let Some(file) = &file {
                punch(&**file, offset, reserved);
            }
            give_back(space, offset, reserved);
            space.used -= reserved;
        }
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> SpillError + use<> {
        let dir = self.dir.clone();
        move |source| SpillError::Io { dir, op, source }
    }

    /// A failed `fallocate` or write: a full file system is [`SpillError::NoSpace`].
    fn space_error(&self, len: u64, op: &'static str, source: io::Error) -> SpillError {
        if is_full(&source) {
            SpillError::NoSpace {
                dir: self.dir.clone(),
                requested: len,
            }
        } else {
            SpillError::Io {
                dir: self.dir.clone(),
                op,
                source,
            }
        }
    }

    fn reserve_error(&self, len: u64, source: io::Error) -> SpillError {
        self.space_error(len, "reserve space in", source)
    }

    /// The file, created on first use; the caller holds the space lock (so it is created
    /// once).
    fn file(&self, _space: &MutexGuard<'_, Space>) -> Result<Arc<dyn StorageFile>, SpillError> {
        if let Some(file) = self.file.get() {
            return Ok(Arc::clone(file));
        }
        let file = self
            .storage
            .create_for(&self.dir, self.shape)
            .map_err(self.io("create"))?;
        Ok(Arc::clone(self.file.get_or_init(|| file)))
    }

    /// Checks that spilling can work here: creates the spill file and reserves its first
    /// block, as the first spill would. On error nothing is kept, and the first spill tries
    /// again (the directory may be fixed meanwhile).
    pub(crate) fn probe(&self) -> Result<(), SpillError> {
        let mut space = self.space();
        if self.file.get().is_some() {
            return Ok(());
        }
        let file = self
            .storage
            .create_for(&self.dir, self.shape)
            .map_err(self.io("create"))?;
        file.allocate(0, BLOCK)
            .map_err(|err| self.reserve_error(BLOCK, err))?;
        let _ = self.file.set(file);
        // The block is reserved at the allocator's end: the first extent starts in it.
        space.tail_reserved = BLOCK;
        Ok(())
    }

    /// Reserves whole blocks for `len` bytes: checks `spill_max`, creates the file on first
    /// use, allocates an extent and `fallocate`s it. On error nothing stays reserved.
    fn reserve(&self, len: u64) -> Result<Reservation, SpillError> {
        if !self.owner.is_current() {
            return Err(SpillError::Io {
                dir: self.dir.clone(),
                op: "reserve space in",
                source: io::Error::other(format!(
                    "the spill file belongs to process {}, which forked this one",
                    self.owner.pid()
                )),
            });
        }
        let reserved = blocks(len);
        let mut space = self.space();
        self.reclaim_locked(&mut space);
        if let Some(max) = self.max
            && space.used + reserved > max
        {
            return Err(SpillError::Limit {
                requested: len,
                used: space.used,
                max,
            });
        }
        let file = self.file(&space)?;
        let tail = space.alloc.end();
        let offset = space.alloc.allocate(reserved);
        let end = offset + reserved;
        let result = if offset < tail {
            // A range freed earlier: it was punched then.
            file.allocate(offset, reserved)
        } else if end <= space.tail_reserved {
            // Inside the space reserved ahead by an earlier extent.
            Ok(())
        } else {
            let from = offset.max(space.tail_reserved);
            let room = self
                .max
                .map_or(AHEAD, |max| max.saturating_sub(space.used + reserved));
            let ahead = AHEAD.min(room) / BLOCK * BLOCK;
            // Ahead if the disk has room for it, else exactly what this extent needs.
            let reached = if ahead > 0 && file.allocate(from, end + ahead - from).is_ok() {
                Ok(end + ahead)
            } else {
                if ahead > 0 {
                    // A failed fallocate may leave part of the range allocated.
                    punch(&*file, end, ahead);
                }
                file.allocate(from, end - from).map(|()| end)
            };
            reached.map(|reached| space.tail_reserved = reached)
        };
        if let Err(err) = result {
            punch(&*file, offset, reserved);
            give_back(&mut space, offset, reserved);
            return Err(self.reserve_error(len, err));
        }
        space.used += reserved;
        Ok(Reservation {
            file,
            offset,
            reserved,
        })
    }

    /// Gives back a reservation whose write failed. ext4 may leave a partial allocation behind
    /// a failed `fallocate`: punching the range frees it too.
    fn abort(&self, reservation: &Reservation) {
        let mut space = self.space();
        punch(&*reservation.file, reservation.offset, reservation.reserved);
        give_back(&mut space, reservation.offset, reservation.reserved);
        space.used -= reservation.reserved;
    }

    fn write_error(&self, len: u64, source: io::Error) -> SpillError {
        self.space_error(len, "write", source)
    }

    /// Writes `bytes` to a new extent: space reserved first, then written, then checksummed.
    /// On any error nothing is kept and the caller still holds its bytes.
    pub(crate) fn write(&self, bytes: &[u8]) -> Result<Extent, SpillError> {
        let len = bytes.len() as u64;
        let reservation = self.reserve(len)?;
        // Large tensors are checksummed on a second thread while they are written.
        let (written, checksum) = if bytes.len() >= HASH_ALONGSIDE_MIN {
            std::thread::scope(|scope| {
                let hash = scope.spawn(|| checksum(bytes));
                let written = self.put(&*reservation.file, reservation.offset, bytes);
                let checksum = hash
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (written, checksum)
            })
        } else {
            (
                self.put(&*reservation.file, reservation.offset, bytes),
                checksum(bytes),
            )
        };
        if let Err(source) = written {
            self.abort(&reservation);
            return Err(self.write_error(len, source));
        }
        Ok(Extent {
            offset: reservation.offset,
            len,
            checksum,
        })
    }

    /// Writes `len` bytes produced chunk by chunk: `fill(offset, chunk)` fills each chunk
    /// (at most `chunk_len` bytes) of the tensor, for example from a device. The checksum is
    /// computed as the chunks pass. On any error nothing is kept.
    pub(crate) fn write_with(
        &self,
        len: u64,
        chunk_len: usize,
        mut fill: impl FnMut(u64, &mut [u8]) -> Result<(), crate::device::DeviceError>,
    ) -> Result<Extent, SpillError> {
        let reservation = self.reserve(len)?;
        match self.stream_out(&reservation, len, chunk_len, &mut fill) {
            Ok(checksum) => Ok(Extent {
                offset: reservation.offset,
                len,
                checksum,
            }),
            Err(err) => {
                self.abort(&reservation);
                Err(err)
            }
        }
    }

    /// The body of [`SpillFile::write_with`]: fills and writes the chunks of a reserved
    /// extent; returns their checksum.
    fn stream_out(
        &self,
        reservation: &Reservation,
        len: u64,
        chunk_len: usize,
        fill: &mut impl FnMut(u64, &mut [u8]) -> Result<(), crate::device::DeviceError>,
    ) -> Result<u64, SpillError> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let size = chunk_size(chunk_len, len);
        let mut staging = self
            .stream
            .take(size)
            .map_err(self.io("allocate a buffer for"))?;
        let result = (|| {
            let chunk = &mut staging.as_mut_slice()[..size];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(chunk.len() as u64) as usize;
                let padded = n.div_ceil(BLOCK as usize) * BLOCK as usize;
                let buf = &mut chunk[..padded];
                fill(done, &mut buf[..n]).map_err(|source| SpillError::Device { source })?;
                buf[n..].fill(0);
                reservation
                    .file
                    .write_at(reservation.offset + done, buf)
                    .map_err(|source| self.write_error(len, source))?;
                hasher.update(&buf[..n]);
                done += n as u64;
            }
            Ok(hasher.digest())
        })();
        self.stream.give(staging);
        result
    }

    /// Bytes of bounce buffer for unaligned tensors: the shape's requests in flight, at most
    /// [`BOUNCE`].
    fn bounce_len(&self) -> usize {
        self.shape
            .chunk
            .saturating_mul(self.shape.depth)
            .min(BOUNCE)
    }

    /// The spill file opened with `O_DIRECT`, when its storage reads extents with nothing
    /// more than that ([`StorageFile::direct_file`]), and the request shape it reads with:
    /// a stream may queue extents' reads on it (block-aligned: extents start on a block and
    /// own their last one whole) and check their checksums itself ([`Extent::verify`]).
    pub(crate) fn direct_reads(&self) -> Option<(&std::fs::File, IoShape)> {
        self.file
            .get()?
            .direct_file()
            .map(|file| (file, self.shape))
    }

    /// The file to read an extent from.
    fn file_of(&self) -> io::Result<Arc<dyn StorageFile>> {
        self.file
            .get()
            .cloned()
            .ok_or_else(|| io::ErrorKind::NotFound.into())
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
        let file = self.file_of().map_err(self.io("read"))?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let size = chunk_size(chunk_len, extent.len);
        let mut staging = self
            .stream
            .take(size)
            .map_err(self.io("allocate a buffer for"))?;
        let result = (|| {
            let chunk = &mut staging.as_mut_slice()[..size];
            let mut done = 0u64;
            while done < extent.len {
                let n = (extent.len - done).min(chunk.len() as u64) as usize;
                let padded = n.div_ceil(BLOCK as usize) * BLOCK as usize;
                let buf = &mut chunk[..padded];
                read_exact(&*file, extent.offset + done, buf, n).map_err(self.io("read"))?;
                hasher.update(&buf[..n]);
                sink(done, &buf[..n]).map_err(|source| SpillError::Device { source })?;
                done += n as u64;
            }
            Ok(())
        })();
        self.stream.give(staging);
        result?;
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
    /// Large extents read into block-aligned memory (every RAM copy) are checksummed as
    /// their windows arrive.
    pub(crate) fn read(&self, extent: &Extent, dst: &mut [u8]) -> Result<(), SpillError> {
        debug_assert_eq!(dst.len() as u64, extent.len);
        let file = self.file_of().map_err(self.io("read"))?;
        let hashed_alongside =
            dst.len() >= HASH_ALONGSIDE_MIN && (dst.as_ptr() as u64).is_multiple_of(BLOCK);
        let actual = if hashed_alongside {
            self.get_hashed(&*file, extent.offset, dst)
        } else {
            self.get(&*file, extent.offset, dst).map(|()| checksum(dst))
        }
        .map_err(self.io("read"))?;
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

    /// Writes `bytes` at the block-aligned `offset` of a reserved extent: straight from the
    /// caller's buffer when it is block-aligned (its last partial block, and unaligned
    /// buffers, through a block-aligned bounce buffer, zero-padded inside the reservation).
    fn put(&self, file: &dyn StorageFile, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let body = if (bytes.as_ptr() as u64).is_multiple_of(BLOCK) {
            let body = bytes.len() / BLOCK as usize * BLOCK as usize;
            if body > 0 {
                file.write_at(offset, &bytes[..body])?;
            }
            body
        } else {
            0
        };
        let rest = &bytes[body..];
        if rest.is_empty() {
            return Ok(());
        }
        // Large enough for several requests in flight per copy.
        let size = chunk_size(self.bounce_len(), rest.len() as u64);
        let mut bounce = self.bounce.take(size)?;
        let at = offset + body as u64;
        let result = if rest.len() < OVERLAP_MIN {
            // One piece: `size` covers all of it.
            let padded = rest.len().div_ceil(BLOCK as usize) * BLOCK as usize;
            let buf = &mut bounce.as_mut_slice()[..padded];
            fill_padded(buf, rest);
            file.write_at(at, buf)
        } else {
            overlapped_write(file, at, rest, &mut bounce.as_mut_slice()[..size])
        };
        self.bounce.give(bounce);
        result
    }

    /// Reads `dst.len()` bytes at the block-aligned `offset` of an extent: the mirror of
    /// [`SpillFile::put`].
    fn get(&self, file: &dyn StorageFile, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        let body = if (dst.as_ptr() as u64).is_multiple_of(BLOCK) {
            let body = dst.len() / BLOCK as usize * BLOCK as usize;
            if body > 0 {
                read_exact(file, offset, &mut dst[..body], body)?;
            }
            body
        } else {
            0
        };
        let len = dst.len() - body;
        if len == 0 {
            return Ok(());
        }
        let size = chunk_size(self.bounce_len(), len as u64);
        let mut bounce = self.bounce.take(size)?;
        let result = (|| {
            let bounce = &mut bounce.as_mut_slice()[..size];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(bounce.len());
                let padded = n.div_ceil(BLOCK as usize) * BLOCK as usize;
                let buf = &mut bounce[..padded];
                read_exact(file, offset + (body + done) as u64, buf, n)?;
                dst[body + done..body + done + n].copy_from_slice(&buf[..n]);
                done += n;
            }
            Ok(())
        })();
        self.bounce.give(bounce);
        result
    }

    /// [`SpillFile::get`] into block-aligned `dst`, checksummed on this thread while reader
    /// threads read the next windows (see [`windowed_read`]); returns the checksum.
    fn get_hashed(&self, file: &dyn StorageFile, offset: u64, dst: &mut [u8]) -> io::Result<u64> {
        let body = dst.len() / BLOCK as usize * BLOCK as usize;
        let (body, tail) = dst.split_at_mut(body);
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        windowed_read(file, offset, body, self.shape, |window| {
            hasher.update(window);
        })?;
        self.get(file, offset + body.len() as u64, tail)?;
        hasher.update(tail);
        Ok(hasher.digest())
    }

    /// Frees an extent: it no longer counts as used at once; its blocks go back to the file
    /// system and to the allocator at the next reservation or [`SpillFile::reclaim`]. Takes
    /// only a leaf lock: callers may hold the store's registry lock.
    pub(crate) fn free(&self, extent: Extent) {
        self.queued().push((extent.offset, extent.reserved()));
    }
}

/// The error for a spill transfer that panicked (a plugged-in storage, or a helper thread the
/// system refused to start).
pub(crate) fn panicked(op: &'static str) -> SpillError {
    SpillError::Io {
        dir: PathBuf::new(),
        op,
        source: io::Error::other("the transfer panicked"),
    }
}

/// Returns a punched range to the allocator. When that shrinks the file's used tail, the
/// tail is no longer all reserved: forget the space reserved ahead (reserving it again
/// later is harmless).
fn give_back(space: &mut Space, offset: u64, reserved: u64) {
    let tail = space.alloc.end();
    space.alloc.free(offset, reserved);
    if space.alloc.end() < tail {
        space.tail_reserved = space.alloc.end();
    }
}

/// A full file system, as `fallocate` or a write reports it.
fn is_full(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::StorageFull
        || matches!(
            rustix::io::Errno::from_io_error(err),
            Some(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT)
        )
}

/// Reads `buf` (block-padded) at `offset` and fails unless at least `need` bytes came.
fn read_exact(file: &dyn StorageFile, offset: u64, buf: &mut [u8], need: usize) -> io::Result<()> {
    let got = file.read_at(offset, buf)?;
    if got < need {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short read: {got} of {need} bytes at offset {offset}"),
        ));
    }
    Ok(())
}

/// A staging buffer kept between transfers. A transfer takes it (or, while another transfer
/// holds it, a fresh one) and gives it back after; the lock is held only for the swap.
#[derive(Debug, Default)]
struct BufferSlot(Mutex<Option<AlignedBuf>>);

impl BufferSlot {
    fn take(&self, size: usize) -> io::Result<AlignedBuf> {
        let kept = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        match kept {
            Some(buf) if buf.as_slice().len() >= size => Ok(buf),
            kept => {
                drop(kept);
                AlignedBuf::zeroed(size).ok_or_else(|| io::ErrorKind::OutOfMemory.into())
            }
        }
    }

    /// Keeps `buf` for the next transfer (the larger one when two come back).
    fn give(&self, buf: AlignedBuf) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if slot
            .as_ref()
            .is_none_or(|kept| kept.as_slice().len() < buf.as_slice().len())
        {
            *slot = Some(buf);
        }
    }
}

/// Copies `bytes` to the start of `buf` and zeroes the rest (the padding of the last block).
fn fill_padded(buf: &mut [u8], bytes: &[u8]) {
    buf[..bytes.len()].copy_from_slice(bytes);
    buf[bytes.len()..].fill(0);
}

/// Writes `bytes` (any alignment) at the block-aligned `offset` through `SLOTS` slots of
/// `bounce`: this thread copies the next piece into a free slot while `WRITERS` writer
/// threads each write a filled one, so the copy hides behind the writes and one slot's
/// requests are queued while another's complete. (On the development machine one to four
/// writers measured the same within its noise; two is the smallest number that keeps a write
/// queued across slot boundaries.)
fn overlapped_write(
    file: &dyn StorageFile,
    offset: u64,
    bytes: &[u8],
    bounce: &mut [u8],
) -> io::Result<()> {
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
                    let result = file.write_at(at, &buf[..padded]);
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

/// Reads `buf` (block-aligned) at the block-aligned `offset` in windows of whole requests of
/// `shape`, on up to [`READERS`] threads that share the shape's depth (each reads one window
/// at a time, all of its requests in flight), and hands the windows to `consume` on this
/// thread in order, each as soon as it and those before it have arrived: `consume` runs
/// alongside the reads, and only the last window's is left after them. The requests in
/// flight dip only while a reader waits for the last of its window; the others keep theirs
/// queued. On the development machine (64 MiB extents, 4 MiB x 8, two cores) one read and a
/// checksum after it measured 0.82-0.87 x a raw read of the same extents at the same shape,
/// and windows checksummed alongside 0.89-0.90 (without the checksum, 0.96-0.98: the
/// checksum's core is one of two, and the reads slow down while it runs).
fn windowed_read(
    file: &dyn StorageFile,
    offset: u64,
    buf: &mut [u8],
    shape: IoShape,
    mut consume: impl FnMut(&[u8]),
) -> io::Result<()> {
    // Each reader keeps `per_reader` requests in flight; together about `shape.depth`.
    let per_reader = shape.depth.div_ceil(READERS).max(1);
    let readers = shape.depth.div_ceil(per_reader);
    let window = shape.chunk * per_reader;
    let (to_readers, jobs) = std::sync::mpsc::channel::<(usize, &mut [u8])>();
    let mut count = 0;
    for (i, piece) in buf.chunks_mut(window).enumerate() {
        to_readers
            .send((i, piece))
            .expect("the receiver lives in this function");
        count += 1;
    }
    drop(to_readers);
    let jobs = Mutex::new(jobs);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let (to_consumer, arrived) = std::sync::mpsc::channel::<(usize, &mut [u8], io::Result<()>)>();
    std::thread::scope(|scope| {
        for _ in 0..readers.min(count) {
            let (jobs, failed, to_consumer) = (&jobs, &failed, to_consumer.clone());
            scope.spawn(move || {
                loop {
                    let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok((i, piece)) = job else { return };
                    if failed.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let at = offset + (i * window) as u64;
                    let result = read_exact(file, at, piece, piece.len());
                    if to_consumer.send((i, piece, result)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(to_consumer);
        let mut waiting = std::collections::BTreeMap::new();
        let mut next = 0;
        let mut error = None;
        // Ends when every reader has returned.
        for (i, piece, result) in arrived {
            if let Err(err) = result {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                error.get_or_insert(err);
            }
            if error.is_some() {
                continue;
            }
            waiting.insert(i, piece);
            while let Some(piece) = waiting.remove(&next) {
                consume(piece);
                next += 1;
            }
        }
        error.map_or(Ok(()), Err)
    })
}

/// The most threads [`windowed_read`] reads an extent on. (One, two and eight measured the
/// same on the development machine; four keep the last window, checksummed after the reads,
/// at 8 MiB for the default shapes.)
const READERS: usize = 4;

/// Unaligned bytes from this size on are copied and written in overlapping slots.
const OVERLAP_MIN: usize = 8 << 20;

/// The most bytes of bounce buffer for unaligned buffers, whatever the shape: 8 requests of
/// the default size.
const BOUNCE: usize = 32 << 20;

/// The most memory the spill file's own buffers hold (kept between uses) for tensors of at
/// most `largest` bytes moved in chunks of `chunk_len`: the bounce buffer for unaligned
/// bytes and the stream buffer for device transfers. Transfers that run at the same time
/// each hold buffers of their own.
pub(crate) fn buffers_bound(largest: u64, chunk_len: usize) -> u64 {
    (chunk_size(BOUNCE, largest) + chunk_size(chunk_len, largest)) as u64
}

/// Bytes of buffer for moving `len` bytes in chunks of about `chunk_len`: whole blocks, at
/// most the rounded-up `len`.
fn chunk_size(chunk_len: usize, len: u64) -> usize {
    let chunk = (chunk_len as u64).max(BLOCK).div_ceil(BLOCK) * BLOCK;
    chunk.min(len.div_ceil(BLOCK) * BLOCK).max(BLOCK) as usize
}

/// Tensors at least this large are checksummed alongside their write.
const HASH_ALONGSIDE_MIN: usize = 8 << 20;

fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Returns `[offset, offset + len)` to the file system. Advisory: a failure only costs space.
fn punch(file: &dyn StorageFile, offset: u64, len: u64) {
    if let Err(err) = file.punch(offset, len) {
        log::debug!("punching a hole in the spill file failed: {err}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{DiskStorage, IoShape, SpillError, SpillFile};

    fn disk() -> Arc<dyn super::Storage> {
        Arc::new(DiskStorage)
    }

    /// Disk storage that keeps a handle on the file it created, to look at its blocks.
    #[derive(Debug, Default)]
    struct Kept(std::sync::Mutex<Option<std::fs::File>>);

    impl super::Storage for Kept {
        fn create(&self, dir: &std::path::Path) -> std::io::Result<Arc<dyn super::StorageFile>> {
            let file = DiskStorage::open(dir, IoShape::DEFAULT)?;
            *self.0.lock().unwrap() = Some(file.file.try_clone()?);
            Ok(Arc::new(file))
        }
    }

    #[test]
    fn round_trip_reuse_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let spill = SpillFile::new(
            dir.path().to_path_buf(),
            Some(64 << 10),
            disk(),
            IoShape::DEFAULT,
        );
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
        let kept = Arc::new(Kept::default());
        let spill = SpillFile::new(
            dir.path().to_path_buf(),
            Some(8 << 20),
            kept.clone(),
            IoShape::DEFAULT,
        );
        let allocated = |_: &SpillFile| {
            let file = kept.0.lock().unwrap();
            file.as_ref().unwrap().metadata().unwrap().blocks() * 512
        };
        let piece = |i: u8| vec![i; 1 << 20];
        let mut extents: Vec<_> = (0..4).map(|i| spill.write(&piece(i)).unwrap()).collect();
        // The first extent reserved ahead up to the limit; the others fit inside.
        assert_eq!(spill.space().tail_reserved, 8 << 20);
        assert!(allocated(&spill) >= 8 << 20);
        // Free the tail and one in the middle: punched, the ahead space forgotten.
        let tail = extents.pop().unwrap();
        spill.free(tail);
        let middle = extents.remove(1);
        spill.free(middle);
        spill.reclaim();
        let space = spill.space();
        assert_eq!(space.tail_reserved, space.alloc.end());
        drop(space);
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
        let spill = SpillFile::new(dir.path().to_path_buf(), None, disk(), IoShape::DEFAULT);
        spill.probe().unwrap();
        assert_eq!(spill.space().tail_reserved, super::BLOCK);
        let extent = spill.write(b"abc").unwrap();
        assert_eq!(extent.offset, 0);
        let mut back = [0; 3];
        spill.read(&extent, &mut back).unwrap();
        assert_eq!(&back, b"abc");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let missing = SpillFile::new("/nonexistent/spill".into(), None, disk(), IoShape::DEFAULT);
        let err = missing.probe().unwrap_err();
        assert!(matches!(err, SpillError::Io { op: "create", .. }), "{err}");
    }

    /// A spill file in memory that records the shape it was created for and the reads it
    /// received, and can fail or corrupt the reads of one offset.
    #[derive(Debug, Default)]
    struct Mem {
        shape: std::sync::Mutex<Option<IoShape>>,
        file: Arc<MemFile>,
    }

    #[derive(Debug, Default)]
    struct MemFile {
        bytes: std::sync::Mutex<Vec<u8>>,
        /// Offset and length of every read.
        reads: std::sync::Mutex<Vec<(u64, usize)>>,
        /// Reads at this offset fail with `EIO` (0: none).
        fail_at: std::sync::atomic::AtomicU64,
        /// Reads at this offset return their first byte flipped (0: none).
        flip_at: std::sync::atomic::AtomicU64,
    }

    impl super::Storage for Mem {
        fn create(&self, _dir: &std::path::Path) -> std::io::Result<Arc<dyn super::StorageFile>> {
            Ok(self.file.clone())
        }

        fn create_for(
            &self,
            dir: &std::path::Path,
            shape: IoShape,
        ) -> std::io::Result<Arc<dyn super::StorageFile>> {
            *self.shape.lock().unwrap() = Some(shape);
            self.create(dir)
        }
    }

    impl super::StorageFile for MemFile {
        fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
            let mut bytes = self.bytes.lock().unwrap();
            let end = (offset + len) as usize;
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            Ok(())
        }

        fn punch(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }

        fn write_at(&self, offset: u64, src: &[u8]) -> std::io::Result<()> {
            let mut bytes = self.bytes.lock().unwrap();
            bytes[offset as usize..offset as usize + src.len()].copy_from_slice(src);
            Ok(())
        }

        fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<usize> {
            use std::sync::atomic::Ordering::SeqCst;
            self.reads.lock().unwrap().push((offset, dst.len()));
            if offset > 0 && self.fail_at.load(SeqCst) == offset {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            if offset == 0 {
                // The first window usually arrives last: the checksum must still take the
                // windows in order.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let bytes = self.bytes.lock().unwrap();
            let n = dst.len().min(bytes.len().saturating_sub(offset as usize));
            dst[..n].copy_from_slice(&bytes[offset as usize..offset as usize + n]);
            if offset > 0 && self.flip_at.load(SeqCst) == offset {
                dst[0] ^= 1;
            }
            Ok(n)
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 131 % 251) as u8).collect()
    }

    /// A large extent read into aligned memory arrives in windows of whole requests of the
    /// spill file's shape, read on several threads and checksummed in order; a window that
    /// fails or comes back corrupt fails the read.
    #[test]
    fn large_extents_are_read_in_windows_and_checksummed_in_order() {
        use crate::sys::AlignedBuf;
        use std::sync::atomic::Ordering::SeqCst;
        let shape = IoShape {
            chunk: 64 << 10,
            depth: 16,
        };
        let storage = Arc::new(Mem::default());
        let spill = SpillFile::new("/unused".into(), None, storage.clone(), shape);
        let len = super::HASH_ALONGSIDE_MIN + 5000;
        let bytes = pattern(len);
        let extent = spill.write(&bytes).unwrap();
        assert_eq!(*storage.shape.lock().unwrap(), Some(shape));
        let mut back = AlignedBuf::zeroed(len).unwrap();
        spill.read(&extent, back.as_mut_slice()).unwrap();
        assert!(back.as_slice() == bytes.as_slice());
        // Four readers of four requests each: 256 KiB windows, then the tail through the
        // bounce buffer.
        let reads = std::mem::take(&mut *storage.file.reads.lock().unwrap());
        let body = len / 4096 * 4096;
        assert_eq!(reads.len(), body.div_ceil(256 << 10) + 1);
        assert!(
            reads[..reads.len() - 1]
                .iter()
                .all(|&(o, l)| o % (256 << 10) == 0 && (l == 256 << 10 || o as usize + l == body))
        );

        let window = 5 * (256 << 10) as u64;
        storage.file.flip_at.store(window, SeqCst);
        let err = spill.read(&extent, back.as_mut_slice()).unwrap_err();
        assert!(matches!(err, SpillError::Checksum { .. }), "{err}");
        storage.file.flip_at.store(0, SeqCst);
        storage.file.fail_at.store(window, SeqCst);
        let err = spill.read(&extent, back.as_mut_slice()).unwrap_err();
        assert!(matches!(err, SpillError::Io { op: "read", .. }), "{err}");
        storage.file.fail_at.store(0, SeqCst);
        spill.read(&extent, back.as_mut_slice()).unwrap();
        assert!(back.as_slice() == bytes.as_slice());
    }

    /// Unaligned tensors pass through a bounce buffer sized by the shape's requests in
    /// flight (never above 32 MiB), and come back whole through it.
    #[test]
    fn the_bounce_buffer_follows_the_shape() {
        let small = IoShape {
            chunk: 64 << 10,
            depth: 2,
        };
        let storage = Arc::new(Mem::default());
        let spill = SpillFile::new("/unused".into(), None, storage.clone(), small);
        assert_eq!(spill.bounce_len(), 128 << 10);
        let large = IoShape {
            chunk: 16 << 20,
            depth: 8,
        };
        let unused = SpillFile::new("/unused".into(), None, Arc::new(Mem::default()), large);
        assert_eq!(unused.bounce_len(), 32 << 20);
        // Unaligned by one byte, large enough for the overlapped writers.
        let bytes = pattern(super::OVERLAP_MIN + 1 + 100);
        let extent = spill.write(&bytes[1..]).unwrap();
        let written = storage.file.bytes.lock().unwrap();
        assert!(written[..bytes.len() - 1] == bytes[1..]);
        drop(written);
        let mut back = vec![0; bytes.len() - 1];
        spill.read(&extent, &mut back).unwrap();
        assert!(back == bytes[1..]);
    }

    /// `StoreBuilder::spill_io_shape` reaches the storage, made usable; without it the
    /// storage gets the shape for the spill directory's device.
    #[test]
    fn the_store_gives_its_spill_file_a_shape() {
        let dir = tempfile::tempdir().unwrap();
        let given = Arc::new(Mem::default());
        let _store = crate::Store::builder()
            .spill_dir(dir.path())
            .spill_io_shape(IoShape {
                chunk: 5000,
                depth: 0,
            })
            .spill_storage(given.clone())
            .build()
            .unwrap();
        let expected = IoShape {
            chunk: 8192,
            depth: 1,
        };
        assert_eq!(*given.shape.lock().unwrap(), Some(expected));
        let default = Arc::new(Mem::default());
        let _store = crate::Store::builder()
            .spill_dir(dir.path())
            .spill_storage(default.clone())
            .build()
            .unwrap();
        assert_eq!(
            *default.shape.lock().unwrap(),
            Some(DiskStorage::shape_for(dir.path()))
        );
    }

    #[test]
    fn missing_directory_is_an_io_error() {
        let spill = SpillFile::new("/nonexistent/spill".into(), None, disk(), IoShape::DEFAULT);
        let err = spill.write(b"abc").unwrap_err();
        assert!(matches!(err, SpillError::Io { op: "create", .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/spill"));
    }
}

//! The storage seam under the spill file: where its bytes physically go.
//!
//! The spill file decides *what* to write where (extents, checksums, space accounting); a
//! [`Storage`] decides *how* (a file in a directory, with `O_DIRECT` where the file system
//! allows it). Tests plug in their own storage to cause faults deterministically: a full disk
//! at byte N, `EIO`, short reads, a write that blocks until the test lets it go, flipped bits.
//! Real-kernel tests (a tiny tmpfs that fills up, cgroups) exercise [`DiskStorage`] itself.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::FallocateFlags;

use crate::sys::direct::{IoShape, read_at, reopen_direct, write_at};

/// Offsets, lengths and buffer addresses of the I/O a [`StorageFile`] receives are multiples
/// of this many bytes.
pub const STORAGE_BLOCK: u64 = crate::sys::direct::BLOCK;

/// Creates the files the spill file keeps its bytes in.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// A new, empty file in `dir` that no other process can find (a crash must leave nothing
    /// behind).
    fn create(&self, dir: &Path) -> io::Result<Arc<dyn StorageFile>>;

    /// The same as [`Storage::create`], for a spill file that moves each tensor in requests
    /// of `shape.chunk` bytes, `shape.depth` in flight: a storage that splits transfers into
    /// requests of its own uses it. Default: `create(dir)`, the shape unused.
    fn create_for(&self, dir: &Path, shape: IoShape) -> io::Result<Arc<dyn StorageFile>> {
        let _ = shape;
        self.create(dir)
    }
}

/// One file of a [`Storage`], used from many threads at once.
///
/// Every offset, length and buffer address passed in is a multiple of [`STORAGE_BLOCK`].
/// Reads and writes of different ranges may run concurrently; a range is never read while
/// it is written.
pub trait StorageFile: Send + Sync + std::fmt::Debug {
    /// Reserves space for `[offset, offset + len)` so that writing it later cannot fail for
    /// lack of room (`fallocate`). A full disk is an error of kind `StorageFull` or the raw
    /// `ENOSPC`/`EDQUOT`; a failure may leave part of the range reserved.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Gives `[offset, offset + len)` back to the file system (hole punching). Advisory.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Writes all of `bytes` at `offset`.
    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()>;

    /// Reads up to `dst.len()` bytes at `offset`; returns how many were read (fewer only at
    /// the end of the file).
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> io::Result<usize>;

    /// The file opened with `O_DIRECT`, when [`StorageFile::read_at`] is nothing more than
    /// `O_DIRECT` reads of it: a store may then queue the reads of many extents on it at once
    /// (a stream of restores), checking each extent's checksum as usual. Default `None`:
    /// every read goes through `read_at`.
    fn direct_file(&self) -> Option<&File> {
        None
    }
}

/// The default storage: an unnamed file (`O_TMPFILE`, or a file unlinked at once where the
/// file system lacks it) written and read with `O_DIRECT` and several requests in flight
/// (the spill file's shape: see [`DiskStorage::shape_for`]), or with `pwrite`/`pread` where
/// the file system refuses direct I/O.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskStorage;

impl DiskStorage {
    pub(super) fn open(dir: &Path, shape: IoShape) -> io::Result<DiskFile> {
        let file = create_unnamed(dir)?;
        let direct = reopen_direct(&file, true);
        Ok(DiskFile {
            file,
            direct,
            shape,
        })
    }

    /// The request shape a store gives its spill file in `dir` unless
    /// [`StoreBuilder::spill_io_shape`](crate::StoreBuilder::spill_io_shape) says otherwise:
    /// requests as large as the device's queue takes whole (`queue/max_sectors_kb` in sysfs,
    /// a power of two within 1-16 MiB), 32 MiB in flight; 4 MiB x 8 ([`IoShape::DEFAULT`])
    /// where sysfs does not describe the device.
    pub fn shape_for(dir: &Path) -> IoShape {
        super::shape::for_dir(dir)
    }
}

impl Storage for DiskStorage {
    /// A file moved in requests of [`DiskStorage::shape_for`] `dir`.
    fn create(&self, dir: &Path) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(Self::open(dir, Self::shape_for(dir))?))
    }

    fn create_for(&self, dir: &Path, shape: IoShape) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(Self::open(dir, shape)?))
    }
}

#[derive(Debug)]
pub(super) struct DiskFile {
    pub(super) file: File,
    /// The same file opened with `O_DIRECT` (`None` where the file system refuses it).
    direct: Option<File>,
    /// How each direct read or write is split into requests.
    shape: IoShape,
}

impl StorageFile for DiskFile {
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(&self.file, FallocateFlags::empty(), offset, len).map_err(Into::into)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(&self.file, flags, offset, len).map_err(Into::into)
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        match &self.direct {
            Some(direct) => write_at(direct, offset, bytes, self.shape, None).map(drop),
            None => self.file.write_all_at(bytes, offset),
        }
    }

    fn direct_file(&self) -> Option<&File> {
        self.direct.as_ref()
    }

    fn read_at(&self, offset: u64, dst: &mut [u8]) -> io::Result<usize> {
        if let Some(direct) = &self.direct {
            return read_at(direct, offset, dst, self.shape, None).map(|(n, _)| n);
        }
        let mut done = 0;
        while done < dst.len() {
            match self.file.read_at(&mut dst[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(done)
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

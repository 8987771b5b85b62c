//! Direct I/O as lowtide uses it, exposed for benchmarks and tools: block-aligned buffers,
//! `O_DIRECT` files, and reads and writes with several requests in flight (io_uring, or
//! threads issuing `pread`/`pwrite` where io_uring is unavailable).
//!
//! ```no_run
//! use lowtide::direct::{AlignedBytes, IoShape, open, read};
//!
//! let file = open("model.safetensors".as_ref(), false)?;
//! let mut buf = AlignedBytes::zeroed(64 << 20).expect("memory");
//! let (n, engine) = read(&file, 0, &mut buf, IoShape::DEFAULT)?;
//! println!("{n} bytes through {engine:?}, bypassing the page cache");
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fs::File;
use std::io;
use std::path::Path;

pub use crate::sys::direct::{BLOCK, IoEngine, IoShape};

/// A zero-initialised, page-aligned byte buffer, as direct I/O needs. Large ones are their
/// own mappings with transparent huge pages asked for.
///
/// Also the best container for a derived tensor's bytes ([`Store::derive`](crate::Store::derive)
/// takes it): it spills with direct writes straight from its pages, where a `Vec<u8>` goes
/// through a bounce buffer, and it is freed quickly.
#[derive(Debug)]
pub struct AlignedBytes(pub(crate) crate::sys::AlignedBuf);

impl AlignedBytes {
    /// `len` zeroed bytes aligned to 4096, or `None` when the allocator refuses.
    pub fn zeroed(len: usize) -> Option<Self> {
        crate::sys::AlignedBuf::zeroed(len).map(Self)
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
}

/// Opens `path` with `O_DIRECT` (read-only, or read-write without truncating).
pub fn open(path: &Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits().cast_signed())
        .open(path)
}

/// Reads `buf.len()` bytes at the block-aligned `offset`. Returns the bytes read (fewer only
/// at the end of the file) and the engine that moved them.
pub fn read(
    file: &File,
    offset: u64,
    buf: &mut AlignedBytes,
    shape: IoShape,
) -> io::Result<(usize, IoEngine)> {
    crate::sys::direct::read_at(file, offset, buf.as_mut_slice(), shape, None)
}

/// Writes the first `len` bytes of `buf` (a multiple of [`BLOCK`]) at the block-aligned
/// `offset`.
pub fn write(
    file: &File,
    offset: u64,
    buf: &AlignedBytes,
    len: usize,
    shape: IoShape,
) -> io::Result<IoEngine> {
    crate::sys::direct::write_at(file, offset, &buf.as_slice()[..len], shape, None)
}

/// Bytes of `[offset, offset + len)` of `file` in the page cache now. The kernel reports this
/// only for files the caller owns or may write (elsewhere: 0).
pub fn cached_bytes(file: &File, offset: u64, len: u64) -> io::Result<u64> {
    crate::sys::direct::cached_bytes(file, offset, len)
}

/// Asks the kernel to drop `file`'s clean pages from the page cache (`fdatasync`, then
/// `POSIX_FADV_DONTNEED`). Pages mapped by a process stay; check with [`cached_bytes`].
pub fn drop_cached(file: &File) -> io::Result<()> {
    rustix::fs::fdatasync(file)?;
    rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}

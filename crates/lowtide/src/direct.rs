//! For benchmarks and tools, not part of managing weights: direct I/O as lowtide uses it
//! (`O_DIRECT` files, and reads and writes with several requests in flight through io_uring,
//! or threads issuing `pread`/`pwrite` where io_uring is unavailable) and the page-cache
//! residency of a file. `lowtide bench` measures its raw baselines with these, and tests check
//! what a restore left in the page cache. The buffers they take, [`AlignedBytes`], belong to
//! the main API and live at the crate root.
//!
//! ```no_run
//! use lowtide::AlignedBytes;
//! use lowtide::direct::{IoShape, open, read};
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

/// The buffers these functions take: [`crate::AlignedBytes`], named here too.
pub use crate::AlignedBytes;

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

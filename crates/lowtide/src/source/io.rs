//! The seam under model-file reads: how a source's bytes are read from its file.
//!
//! Restores read a model file two ways: blocks not in the page cache with `O_DIRECT` (no copy
//! is left in the cache), cached bytes with `pread`. A [`SourceIo`] performs both; the
//! default, [`FileIo`], calls the kernel. Tests plug in their own to cause read faults
//! deterministically (`EIO`, short reads) with [`StoreBuilder::source_io`]; a fault-injecting
//! implementation overrides a method and calls [`FileIo`]'s for the bytes it lets through.
//!
//! [`StoreBuilder::source_io`]: crate::StoreBuilder::source_io

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::sys::direct::{IoShape, read_at};

/// Reads of model files.
pub trait SourceIo: Send + Sync + std::fmt::Debug {
    /// Reads `buf.len()` bytes at `offset` of `file`, opened with `O_DIRECT`: `offset`, the
    /// length and the buffer's address are multiples of 4096. Returns the bytes read, fewer
    /// only at the end of the file.
    fn read_direct(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        read_at(file, offset, buf, IoShape::DEFAULT, None).map(|(n, _)| n)
    }

    /// Reads exactly `buf.len()` bytes at `offset` of `file` through the page cache (an end
    /// of file first is `UnexpectedEof`).
    fn read_cached(&self, file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        file.read_exact_at(buf, offset)
    }
}

/// The kernel's reads: `O_DIRECT` with several requests in flight (io_uring, or threads
/// issuing `pread`), and `pread` for cached bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileIo;

impl SourceIo for FileIo {}

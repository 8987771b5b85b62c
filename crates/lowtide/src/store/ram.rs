//! RAM copies: the owned buffers a tensor's bytes live in, and the bytes callers hand in.

use crate::sys::AlignedBuf;
use crate::sys::direct::DirectBuf;

/// An owned RAM copy: page-aligned when lowtide filled it, the caller's buffer when derived.
#[derive(Debug)]
pub(crate) enum RamBuf {
    Aligned(AlignedBuf),
    /// Restored from a file by a direct read: the bytes sit inside their blocks.
    Direct(DirectBuf),
    Owned(Box<[u8]>),
}

/// Owned bytes for a derived or replaced tensor: a `Vec<u8>` (or boxed slice), or
/// [`AlignedBytes`](crate::direct::AlignedBytes), which spills without a bounce copy.
#[derive(Debug)]
pub struct TensorBytes(RamBuf);

impl TensorBytes {
    pub(super) fn len(&self) -> u64 {
        self.0.len()
    }

    pub(super) fn into_ram(self) -> RamBuf {
        self.0
    }
}

impl From<Vec<u8>> for TensorBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self(RamBuf::Owned(bytes.into_boxed_slice()))
    }
}

impl From<Box<[u8]>> for TensorBytes {
    fn from(bytes: Box<[u8]>) -> Self {
        Self(RamBuf::Owned(bytes))
    }
}

impl From<crate::direct::AlignedBytes> for TensorBytes {
    fn from(bytes: crate::direct::AlignedBytes) -> Self {
        Self(RamBuf::Aligned(bytes.0))
    }
}

impl RamBuf {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            RamBuf::Aligned(buf) => buf.as_slice(),
            RamBuf::Direct(buf) => buf.as_slice(),
            RamBuf::Owned(buf) => buf,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
}

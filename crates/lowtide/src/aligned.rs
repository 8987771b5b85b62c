//! Page-aligned byte buffers: the container for derived tensors that spills without a copy,
//! and what direct I/O reads into and writes from.

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

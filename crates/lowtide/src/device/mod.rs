//! The accelerator tier: device memory behind the [`Device`] trait.
//!
//! Two implementations: [`SimDevice`] (device memory simulated in host memory, for tests and
//! the demo) and `CudaDevice` (behind the `cuda` cargo feature). Transfers are by byte range so
//! the store can stream a tensor through a small staging buffer: a model never needs a second
//! full copy in host RAM on its way to or from the device.

mod sim;

use crate::size::Bytes;

#[cfg(feature = "cuda")]
mod cuda;

pub use sim::SimDevice;

#[cfg(feature = "cuda")]
pub use cuda::CudaDevice;

/// An allocation on a device, returned by [`Device::allocate`] and given back with
/// [`Device::release`].
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct DeviceAlloc {
    id: u64,
    len: u64,
}

impl DeviceAlloc {
    /// A handle with an implementation-defined `id` for `len` bytes.
    pub fn new(id: u64, len: u64) -> Self {
        Self { id, len }
    }

    /// The implementation-defined identifier.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes allocated.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the allocation holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Errors of device operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The device has not enough free memory.
    #[error("{device}: cannot allocate {}, {} free", Bytes(*.requested), Bytes(*.free))]
    OutOfMemory {
        /// The device's name.
        device: String,
        /// Bytes asked for.
        requested: u64,
        /// Bytes free.
        free: u64,
    },
    /// The host refused the memory of a device that lives in host memory (a simulated one).
    #[error("{device}: the host cannot give {} for an allocation", Bytes(*.requested))]
    HostMemory {
        /// The device's name.
        device: String,
        /// Bytes asked for.
        requested: u64,
    },
    /// A transfer range lies outside its allocation.
    #[error("{device}: range {offset}+{len} is outside a {alloc_len}-byte allocation")]
    Range {
        /// The device's name.
        device: String,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Length of the allocation.
        alloc_len: u64,
    },
    /// The allocation handle is not (or no longer) known to the device.
    #[error("{device}: unknown allocation #{id}")]
    UnknownAlloc {
        /// The device's name.
        device: String,
        /// The handle's id.
        id: u64,
    },
    /// The device driver reported an error.
    #[error("{device}: {op} failed")]
    Driver {
        /// The device's name.
        device: String,
        /// The operation.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Accelerator memory: allocate, free, and copy byte ranges in and out.
///
/// Implementations must be thread-safe. `upload` may return before the copy completes (the
/// implementation owns any staging it needs: `src` may be reused as soon as it returns);
/// `download` returns once `dst` holds the bytes; `synchronize` waits for every queued copy.
pub trait Device: Send + Sync + std::fmt::Debug {
    /// A name for messages, such as `"sim0"` or `"cuda:0 (NVIDIA H100)"`.
    fn name(&self) -> String;
    /// Total bytes of device memory lowtide may use.
    fn capacity(&self) -> u64;
    /// Bytes free now.
    fn free_bytes(&self) -> u64;
    /// Allocates `len` bytes.
    fn allocate(&self, len: u64) -> Result<DeviceAlloc, DeviceError>;
    /// Frees an allocation.
    fn release(&self, alloc: DeviceAlloc);
    /// Copies `src` into `dst` at `offset`.
    fn upload(&self, dst: &DeviceAlloc, offset: u64, src: &[u8]) -> Result<(), DeviceError>;
    /// Copies `dst.len()` bytes at `offset` of `src` into `dst`.
    fn download(&self, src: &DeviceAlloc, offset: u64, dst: &mut [u8]) -> Result<(), DeviceError>;
    /// Waits until every queued upload has completed.
    fn synchronize(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The chunk size streaming transfers should use (the staging buffer's size).
    fn chunk_len(&self) -> usize {
        4 << 20
    }
    /// Whether the device's memory is this process's host memory (a simulated device, or a
    /// unified-memory one). The store then counts its allocations against the RAM reserve
    /// like RAM copies: they take memory from the same pool and the same cgroup limit.
    fn in_host_memory(&self) -> bool {
        false
    }
}

/// Checks that `[offset, offset + len)` lies inside `alloc`.
pub(crate) fn check_range(
    device: &dyn Device,
    alloc: &DeviceAlloc,
    offset: u64,
    len: u64,
) -> Result<(), DeviceError> {
    match offset.checked_add(len) {
        Some(end) if end <= alloc.len => Ok(()),
        _ => Err(DeviceError::Range {
            device: device.name(),
            offset,
            len,
            alloc_len: alloc.len,
        }),
    }
}

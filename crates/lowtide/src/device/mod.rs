//! The accelerator tier: device memory behind the [`Device`] trait.
//!
//! Two implementations: [`SimDevice`] (device memory simulated in host memory, for tests and
//! the demo) and `CudaDevice` (behind the `cuda` cargo feature). Transfers are by byte range so
//! the store can stream a tensor through a small staging buffer: a model never needs a second
//! full copy in host RAM on its way to or from the device.
//!
//! # Working on device memory in place
//!
//! A consumer that computes on a tensor's device copy (a kernel, a LoRA patch applied on the
//! GPU, a `DLPack` export) reaches the memory itself, without a host round trip:
//!
//! 1. Pin the copy with the store's `DeviceGuard`: while it lives the allocation is neither
//!    unloaded nor freed, so the pointer or slice below stays valid.
//! 2. Downcast the guard's `Arc<dyn Device>` to the concrete device with
//!    `<dyn Device>::downcast_ref` (or `downcast_arc`, or `as_any`).
//! 3. Reach the bytes of the guard's [`DeviceAlloc`]:
//!    - [`SimDevice::with_bytes_mut`] (or [`SimDevice::with_range_mut`]) runs a closure on the
//!      allocation's bytes, as a `&mut [u8]`, under the device's lock: nothing else reads or
//!      writes them meanwhile. [`SimDevice::with_bytes`] and [`SimDevice::with_range`] read.
//!    - `CudaDevice::device_ptr` gives the allocation's `CUdeviceptr`, in the primary context
//!      of the GPU `CudaDevice::ordinal`, which the CUDA runtime (and frameworks built on it)
//!      shares. lowtide queues its copies on a stream of its own (`CudaDevice::raw_stream`):
//!      call [`Device::synchronize`] before work on another stream touches the bytes, and wait
//!      for that work to finish before the store reads the tensor again or the guard drops.
//! 4. Tell the store the tensor changed, with the store's in-place update call for the
//!    guard: the store then treats the device copy as the tensor's bytes (no longer equal to
//!    the file's), so unloading it keeps them rather than freeing them as clean.
//!
//! Every accessor checks that the handle names a live allocation of *this* device and that
//! the range lies inside it: a wrong handle or range is a [`DeviceError`], never a panic.
//! lowtide's devices draw allocation ids from one process-wide sequence, so a handle of one
//! device is [`DeviceError::UnknownAlloc`] to every other.

mod sim;

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::size::Bytes;

#[cfg(feature = "cuda")]
mod cuda;

pub use sim::SimDevice;

#[cfg(feature = "cuda")]
pub use cuda::CudaDevice;

/// An allocation on a device, returned by [`Device::allocate`] and given back with
/// [`Device::release`].
///
/// Not `Clone`: one handle per allocation, so that it is released once.
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
/// Implementations must be thread-safe and `'static` (so that `dyn Device` downcasts to the
/// concrete type: `<dyn Device>::downcast_ref`). `upload` may return before the copy completes (the
/// implementation owns any staging it needs: `src` may be reused as soon as it returns);
/// `download` returns once `dst` holds the bytes; `synchronize` waits for every queued copy.
///
/// # Changing a device copy in place
///
/// Without a host round trip: while the store's `DeviceGuard` pins the copy, downcast its
/// device (`guard.device().downcast_ref::<SimDevice>()`, or `CudaDevice` with the `cuda`
/// feature), reach the allocation's bytes ([`SimDevice::with_bytes_mut`]) or its address
/// (`CudaDevice::device_ptr`, ordered against lowtide's stream as `CudaDevice`'s docs say),
/// write, then tell the store the tensor changed with its in-place update call.
pub trait Device: Any + Send + Sync + std::fmt::Debug {
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

impl dyn Device {
    /// The device as [`Any`], to downcast to its concrete type.
    pub fn as_any(&self) -> &dyn Any {
        self
    }

    /// The device as a `T` (such as [`SimDevice`] or `CudaDevice`), or `None` when it is
    /// another kind of device.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use lowtide::{Device, SimDevice};
    ///
    /// let device: Arc<dyn Device> = Arc::new(SimDevice::new("sim0", 1 << 20));
    /// assert!(device.downcast_ref::<SimDevice>().is_some());
    /// ```
    pub fn downcast_ref<T: Device>(&self) -> Option<&T> {
        self.as_any().downcast_ref()
    }

    /// The shared device as an `Arc<T>`, or the `Arc` back when it is another kind of device.
    pub fn downcast_arc<T: Device>(self: Arc<Self>) -> Result<Arc<T>, Arc<Self>> {
        let any: Arc<dyn Any + Send + Sync> = self.clone();
        any.downcast().map_err(|_| self)
    }
}

/// The id of a new allocation of one of lowtide's devices: one process-wide sequence, so that
/// no two allocations of different devices share an id and a handle given to the wrong device
/// is [`DeviceError::UnknownAlloc`] rather than another allocation's bytes.
pub(crate) fn next_alloc_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
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

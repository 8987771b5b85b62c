//! The CUDA driver calls that cudarc offers only as `unsafe`, behind the `cuda` feature.
//!
//! Each is wrapped in a safe function whose contract is kept here, so that `device::cuda`
//! holds no `unsafe` of its own.

use std::sync::Arc;

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys::{self, CUmemPool_attribute};
use cudarc::driver::{CudaContext, PinnedHostSlice};

/// Whether the CUDA driver library (`libcuda.so`) can be loaded.
///
/// cudarc panics on its first driver call when it cannot load the library; asking first lets
/// a machine without CUDA get an error rather than a panic message.
pub(crate) fn driver_library_present() -> bool {
    // SAFETY: this loads (and unloads again) the CUDA driver library under the names cudarc
    // itself loads it by on the first driver call; loading it runs only the driver's own
    // initialisers, as in every CUDA program, and no symbol of it is called.
    unsafe { sys::is_culib_present() }
}

/// `len` bytes (at least 1) of page-locked host memory in `ctx`, zeroed: plain pinned memory,
/// not write-combined, since downloads read it back on the host.
pub(crate) fn pinned_zeroed(
    ctx: &Arc<CudaContext>,
    len: usize,
) -> Result<PinnedHostSlice<u8>, DriverError> {
    // SAFETY: the buffer's bytes are uninitialised: they are zeroed right below, through the
    // raw pointer, before anything reads them or forms a reference to them.
    let mut buffer = unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) }?;
    let ptr = buffer.as_mut_ptr()?;
    // SAFETY: `ptr` points to the `len` bytes `buffer` owns (cudarc allocates `len` elements
    // of one byte), and no copy has been queued on them yet.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    Ok(buffer)
}

/// The bytes reserved by the current memory pool of `ctx`'s device but not used by any
/// allocation: memory freed on a stream stays in the pool until the pool is trimmed, free for
/// that device's next stream-ordered allocations. 0 without stream-ordered allocation.
pub(crate) fn pool_free(ctx: &CudaContext) -> Result<u64, DriverError> {
    if !ctx.has_async_alloc() {
        return Ok(0);
    }
    // SAFETY: `cu_device` is the handle cudarc got from the driver for the context's device.
    let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }?;
    let (mut reserved, mut used) = (0u64, 0u64);
    // SAFETY: `pool` is the device's current pool, just returned by the driver; both
    // attributes are `cuuint64_t` values and each pointer points to a live `u64`.
    unsafe {
        result::mem_pool::get_attribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
            (&raw mut reserved).cast(),
        )?;
        result::mem_pool::get_attribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            (&raw mut used).cast(),
        )?;
    }
    Ok(reserved.saturating_sub(used))
}

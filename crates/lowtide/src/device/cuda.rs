//! Device memory on an NVIDIA GPU through the CUDA driver API, behind the `cuda` feature.
//!
//! The driver library (`libcuda.so`) is loaded at run time, on first use, so this module builds
//! and lints on machines without CUDA; there [`CudaDevice::new`] returns [`DeviceError::Driver`].
//!
//! Transfers run on a stream of their own through a small ring of pinned (page-locked) host
//! staging buffers. An upload copies each chunk of the caller's bytes into the next buffer of
//! the ring and queues its host-to-device copy, then moves on: it waits only when it comes back
//! round to a buffer whose copy has not finished yet. So `upload` returns while the last few
//! chunks are still on their way, and the caller reads the next chunk from disk in the meantime.
//!
//! Consumers compute on the allocations themselves: [`CudaDevice::device_ptr`] gives the
//! `CUdeviceptr` of an allocation, [`CudaDevice::ordinal`] the GPU it lives on and
//! [`CudaDevice::raw_stream`] the stream lowtide's copies are queued on (see the `device`
//! module's docs for the whole in-place sequence). Raw driver calls, with their contracts, live
//! in `sys::cuda`.

use std::any::Any;
use std::collections::HashMap;
use std::panic;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::CUresult;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};

use super::{Device, DeviceAlloc, DeviceError, check_range, next_alloc_id};
use crate::sys::cuda::{driver_library_present, pinned_zeroed, pool_free};

/// An NVIDIA GPU, through the CUDA driver loaded at run time.
///
/// Allocations are zeroed device memory of the device's primary context. Uploads and downloads
/// go through [`CudaDevice::RING_LEN`] pinned staging buffers of [`CudaDevice::CHUNK_LEN`] bytes
/// each (by default): that pinned host memory is held for the device's lifetime.
///
/// # Using the memory from other CUDA code
///
/// [`CudaDevice::device_ptr`] is the address of an allocation in the primary context of GPU
/// [`CudaDevice::ordinal`], the context the CUDA runtime uses too, so kernels, cuBLAS or a
/// framework (through `DLPack`) can read and write it. Every allocation, copy and free of this
/// device is queued, in issue order, on one stream ([`CudaDevice::raw_stream`]):
///
/// - before other work reads or writes an allocation, call [`Device::synchronize`] (or make
///   that work's stream wait for this one), since an upload may still be on its way;
/// - before the store reads the bytes again (an unload, a download) or the allocation is
///   released (its guard dropped), wait for that work to finish: lowtide's copies and its
///   stream-ordered free do not wait for other streams.
pub struct CudaDevice {
    name: String,
    capacity: u64,
    chunk_len: usize,
    /// The stream every allocation, copy and free of this device is queued on, so that they
    /// run in the order they were issued.
    stream: Arc<CudaStream>,
    allocs: Mutex<Allocs>,
    /// Lock order: `staging` before `allocs`.
    staging: Mutex<Staging>,
    ctx: Arc<CudaContext>,
}

/// The allocations, by [`DeviceAlloc::id`].
#[derive(Default)]
struct Allocs {
    /// `None` for an empty allocation (the driver does not allocate zero bytes).
    slices: HashMap<u64, Option<CudaSlice<u8>>>,
    /// Bytes allocated through this device.
    used: u64,
}

/// The ring of pinned staging buffers.
struct Staging {
    slots: Vec<Slot>,
    /// The slot the next chunk goes through.
    next: usize,
}

/// One staging buffer and the event recorded after the last copy that used it.
///
/// Invariant: the host writes or reads `buffer`, or hands it to a copy, only after `done` has
/// completed, that is after the last copy queued on it has finished.
struct Slot {
    buffer: PinnedHostSlice<u8>,
    done: CudaEvent,
}

impl CudaDevice {
    /// The default staging chunk: 8 MiB.
    pub const CHUNK_LEN: usize = 8 << 20;
    /// The default number of staging buffers in the ring.
    pub const RING_LEN: usize = 4;

    /// Opens the GPU with the given ordinal (0 for the first) with the default staging ring.
    ///
    /// Fails with [`DeviceError::Driver`] where the CUDA driver library cannot be loaded, where
    /// there is no such device, or where the driver fails; it does not panic.
    pub fn new(ordinal: usize) -> Result<Self, DeviceError> {
        Self::with_staging(ordinal, Self::CHUNK_LEN, Self::RING_LEN)
    }

    /// Opens the GPU with the given ordinal with `ring_len` pinned staging buffers of
    /// `chunk_len` bytes each (both at least 1).
    pub fn with_staging(
        ordinal: usize,
        chunk_len: usize,
        ring_len: usize,
    ) -> Result<Self, DeviceError> {
        let label = format!("cuda:{ordinal}");
        // cudarc panics on the first driver call when it cannot load the library: look for it
        // first, so that a machine without CUDA gets an error rather than a panic message.
        if !driver_library_present() {
            return Err(DeviceError::Driver {
                device: label,
                op: "load the CUDA driver library",
                source: "libcuda not found: no NVIDIA driver installed, or not on the library \
                         search path (LD_LIBRARY_PATH)"
                    .into(),
            });
        }
        // cudarc also panics when a driver symbol is missing (a driver older than the API it was
        // built for): every symbol this device uses is loaded here, by the self-test.
        match panic::catch_unwind(move || Self::open(ordinal, chunk_len.max(1), ring_len.max(1))) {
            Ok(result) => result,
            Err(payload) => Err(DeviceError::Driver {
                device: label,
                op: "load the CUDA driver",
                source: panic_message(&*payload).into(),
            }),
        }
    }

    fn open(ordinal: usize, chunk_len: usize, ring_len: usize) -> Result<Self, DeviceError> {
        let label = format!("cuda:{ordinal}");
        let err = |op| driver_error(&label, op);
        let ctx = CudaContext::new(ordinal).map_err(err("create a context"))?;
        let name = match ctx.name() {
            Ok(device_name) => format!("{label} ({device_name})"),
            Err(_) => label.clone(),
        };
        let capacity = match ctx.mem_get_info() {
            Ok((_, total)) => total,
            Err(_) => ctx.total_mem().map_err(err("query the memory size"))?,
        } as u64;
        let stream = ctx.new_stream().map_err(err("create a stream"))?;
        let mut slots = Vec::with_capacity(ring_len);
        for _ in 0..ring_len {
            let buffer =
                pinned_zeroed(&ctx, chunk_len).map_err(err("allocate pinned staging memory"))?;
            let done = ctx.new_event(None).map_err(err("create an event"))?;
            slots.push(Slot { buffer, done });
        }
        let device = Self {
            name,
            capacity,
            chunk_len,
            stream,
            allocs: Mutex::default(),
            staging: Mutex::new(Staging { slots, next: 0 }),
            ctx,
        };
        device.self_test()?;
        Ok(device)
    }

    /// A small round trip through the device's whole transfer path, which loads every driver
    /// symbol the device uses while the caller still catches panics.
    fn self_test(&self) -> Result<(), DeviceError> {
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let alloc = self.allocate(pattern.len() as u64 + 16)?;
        let mut back = vec![0; pattern.len()];
        let result = self
            .upload(&alloc, 16, &pattern)
            .and_then(|()| self.synchronize())
            .and_then(|()| self.download(&alloc, 16, &mut back));
        let _ = self.free_bytes();
        self.release(alloc);
        result?;
        if back != pattern {
            return Err(DeviceError::Driver {
                device: self.name.clone(),
                op: "self-test",
                source: "bytes read back differ from the bytes written".into(),
            });
        }
        self.synchronize()
    }

    fn allocs(&self) -> MutexGuard<'_, Allocs> {
        self.allocs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn staging(&self) -> MutexGuard<'_, Staging> {
        self.staging.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn driver(&self, op: &'static str) -> impl FnOnce(DriverError) -> DeviceError + '_ {
        driver_error(&self.name, op)
    }

    fn unknown(&self, id: u64) -> DeviceError {
        DeviceError::UnknownAlloc {
            device: self.name.clone(),
            id,
        }
    }

    /// The ordinal of the GPU (0 for the first), as `CUDA_VISIBLE_DEVICES` numbers them for
    /// this process: the `device_id` of a `DLPack` tensor of type `kDLCUDA`.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The `CUstream` every allocation, copy and free of this device is queued on, as an
    /// address (what `torch.cuda.ExternalStream` or a `DLPack` `stream` argument takes).
    ///
    /// Valid while the device lives. Other code may queue work on it, or make its own streams
    /// wait for it (an event recorded on it), so that the work runs after lowtide's uploads
    /// without blocking the host; it must not destroy it.
    pub fn raw_stream(&self) -> usize {
        self.stream.cu_stream().addr()
    }

    /// The `CUdeviceptr` of `alloc`'s first byte, in the primary context of GPU
    /// [`CudaDevice::ordinal`]; 0 for an empty allocation (no memory behind it).
    ///
    /// The address stays valid until the allocation is released: hold the store's guard of
    /// the tensor while work uses it. Copies to the allocation may still be queued when it
    /// returns: order work after them as the type's docs say. Writing through it changes the
    /// device copy: tell the store (its in-place update call) so that it keeps those bytes.
    ///
    /// Fails with [`DeviceError::UnknownAlloc`] when `alloc` is not a live allocation of this
    /// device (one of another device, or one released), and with [`DeviceError::Range`] when
    /// its length is not the length of the memory its id names.
    pub fn device_ptr(&self, alloc: &DeviceAlloc) -> Result<u64, DeviceError> {
        let allocs = self.allocs();
        let slice = allocs
            .slices
            .get(&alloc.id())
            .ok_or_else(|| self.unknown(alloc.id()))?;
        let len = slice.as_ref().map_or(0, |slice| slice.len() as u64);
        if len != alloc.len() {
            return Err(DeviceError::Range {
                device: self.name.clone(),
                offset: 0,
                len: alloc.len(),
                alloc_len: len,
            });
        }
        Ok(match slice {
            Some(slice) => {
                // Recorded as a read on lowtide's own stream (cudarc's bookkeeping); other
                // streams are the caller's to order.
                let (ptr, _read) = slice.device_ptr(&self.stream);
                ptr
            }
            None => 0,
        })
    }

    /// Queues the copy of `len` bytes of `slot` into `dst` at `offset`, and records the slot's
    /// event after it.
    fn queue_upload(
        &self,
        slot: &Slot,
        dst: &DeviceAlloc,
        offset: usize,
        len: usize,
    ) -> Result<(), DeviceError> {
        let chunk = &slot.buffer.as_slice().map_err(self.driver("upload"))?[..len];
        {
            let mut allocs = self.allocs();
            let slice = allocs
                .slices
                .get_mut(&dst.id())
                .ok_or_else(|| self.unknown(dst.id()))?;
            let Some(slice) = slice else {
                return Err(self.range(offset, len, 0));
            };
            let alloc_len = slice.len();
            let Some(mut view) = slice.try_slice_mut(offset..offset + len) else {
                return Err(self.range(offset, len, alloc_len));
            };
            self.stream
                .memcpy_htod(chunk, &mut view)
                .map_err(self.driver("upload"))?;
        }
        slot.done
            .record(&self.stream)
            .map_err(self.driver("upload"))
    }

    /// Queues the copy of `len` bytes of `src` at `offset` into `slot`, and records the slot's
    /// event after it.
    fn queue_download(
        &self,
        slot: &mut Slot,
        src: &DeviceAlloc,
        offset: usize,
        len: usize,
    ) -> Result<(), DeviceError> {
        slot.done.synchronize().map_err(self.driver("download"))?;
        let chunk = &mut slot
            .buffer
            .as_mut_slice()
            .map_err(self.driver("download"))?[..len];
        {
            let allocs = self.allocs();
            let slice = allocs
                .slices
                .get(&src.id())
                .ok_or_else(|| self.unknown(src.id()))?;
            let Some(slice) = slice else {
                return Err(self.range(offset, len, 0));
            };
            let Some(view) = slice.try_slice(offset..offset + len) else {
                return Err(self.range(offset, len, slice.len()));
            };
            self.stream
                .memcpy_dtoh(&view, chunk)
                .map_err(self.driver("download"))?;
        }
        slot.done
            .record(&self.stream)
            .map_err(self.driver("download"))
    }

    /// A range error for a handle whose length disagrees with the allocation it names.
    fn range(&self, offset: usize, len: usize, alloc_len: usize) -> DeviceError {
        DeviceError::Range {
            device: self.name.clone(),
            offset: offset as u64,
            len: len as u64,
            alloc_len: alloc_len as u64,
        }
    }

    /// Checks that the handle names a live allocation (for transfers of zero bytes).
    fn check_known(&self, alloc: &DeviceAlloc) -> Result<(), DeviceError> {
        if self.allocs().slices.contains_key(&alloc.id()) {
            Ok(())
        } else {
            Err(self.unknown(alloc.id()))
        }
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn free_bytes(&self) -> u64 {
        match self.ctx.mem_get_info() {
            Ok((free, _)) => (free as u64 + pool_free(&self.ctx).unwrap_or(0)).min(self.capacity),
            Err(_) => self.capacity.saturating_sub(self.allocs().used),
        }
    }

    fn allocate(&self, len: u64) -> Result<DeviceAlloc, DeviceError> {
        let out_of_memory = || DeviceError::OutOfMemory {
            device: self.name.clone(),
            requested: len,
            free: self.free_bytes(),
        };
        let bytes = match usize::try_from(len) {
            Ok(bytes) if len <= self.capacity => bytes,
            _ => return Err(out_of_memory()),
        };
        let slice = if bytes == 0 {
            None
        } else {
            let mut result = self.stream.alloc_zeros::<u8>(bytes);
            if matches!(result, Err(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY))) {
                // Memory freed on the stream goes back to the driver once the stream is
                // synchronised (the pool trims itself then): wait for that and try once more.
                self.stream
                    .synchronize()
                    .map_err(self.driver("synchronize"))?;
                result = self.stream.alloc_zeros::<u8>(bytes);
            }
            match result {
                Ok(slice) => Some(slice),
                Err(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                    return Err(out_of_memory());
                }
                Err(err) => return Err(self.driver("allocate")(err)),
            }
        };
        let id = next_alloc_id();
        let mut allocs = self.allocs();
        allocs.slices.insert(id, slice);
        allocs.used += len;
        Ok(DeviceAlloc::new(id, len))
    }

    fn release(&self, alloc: DeviceAlloc) {
        let slice = {
            let mut allocs = self.allocs();
            let slice = allocs.slices.remove(&alloc.id());
            if let Some(memory) = &slice {
                // The length of the memory the id named, whatever the handle says.
                allocs.used -= memory.as_ref().map_or(0, |memory| memory.len() as u64);
            }
            slice
        };
        // Dropped outside the lock: the free is queued on the stream, after every copy queued
        // so far (or, without stream-ordered allocation, waits for them).
        drop(slice);
    }

    fn upload(&self, dst: &DeviceAlloc, offset: u64, src: &[u8]) -> Result<(), DeviceError> {
        check_range(self, dst, offset, src.len() as u64)?;
        if src.is_empty() {
            return self.check_known(dst);
        }
        let mut staging = self.staging();
        let Staging { slots, next } = &mut *staging;
        let mut at = offset as usize;
        for chunk in src.chunks(self.chunk_len) {
            let index = *next;
            *next = (index + 1) % slots.len();
            let slot = &mut slots[index];
            // Wait until the copy last queued from this buffer has finished, then refill it.
            slot.done.synchronize().map_err(self.driver("upload"))?;
            let buffer = slot.buffer.as_mut_slice().map_err(self.driver("upload"))?;
            buffer[..chunk.len()].copy_from_slice(chunk);
            self.queue_upload(slot, dst, at, chunk.len())?;
            at += chunk.len();
        }
        Ok(())
    }

    fn download(&self, src: &DeviceAlloc, offset: u64, dst: &mut [u8]) -> Result<(), DeviceError> {
        check_range(self, src, offset, dst.len() as u64)?;
        if dst.is_empty() {
            return self.check_known(src);
        }
        let mut staging = self.staging();
        let Staging { slots, next } = &mut *staging;
        let ring = slots.len();
        let first = *next;
        let (chunk_len, total) = (self.chunk_len, dst.len());
        let count = total.div_ceil(chunk_len);
        *next = (first + count) % ring;
        // Keep up to `ring` chunks queued: chunk k is copied out while the next ones are in flight.
        let mut queued = 0;
        for (k, out) in dst.chunks_mut(chunk_len).enumerate() {
            while queued < count && queued < k + ring {
                let start = queued * chunk_len;
                let len = chunk_len.min(total - start);
                let slot = &mut slots[(first + queued) % ring];
                self.queue_download(slot, src, offset as usize + start, len)?;
                queued += 1;
            }
            let slot = &slots[(first + k) % ring];
            slot.done.synchronize().map_err(self.driver("download"))?;
            let buffer = slot.buffer.as_slice().map_err(self.driver("download"))?;
            out.copy_from_slice(&buffer[..out.len()]);
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.stream
            .synchronize()
            .map_err(self.driver("synchronize"))
    }

    fn chunk_len(&self) -> usize {
        self.chunk_len
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let allocs = self.allocs();
        f.debug_struct("CudaDevice")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("allocations", &allocs.slices.len())
            .field("used", &allocs.used)
            .field("chunk_len", &self.chunk_len)
            .finish_non_exhaustive()
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Let queued copies finish before the staging buffers and allocations are freed.
        let _ = self.stream.synchronize();
    }
}

fn driver_error<'a>(
    device: &'a str,
    op: &'static str,
) -> impl FnOnce(DriverError) -> DeviceError + 'a {
    move |err| DeviceError::Driver {
        device: device.to_owned(),
        op,
        source: Box::new(err),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "the CUDA bindings panicked".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::CudaDevice;
    use crate::device::{Device, DeviceError};

    /// Opens GPU 0, or says why the test is skipped.
    fn open(chunk_len: usize, ring_len: usize) -> Option<CudaDevice> {
        match CudaDevice::with_staging(0, chunk_len, ring_len) {
            Ok(device) => Some(device),
            Err(err) => {
                let source = std::error::Error::source(&err).map(ToString::to_string);
                println!(
                    "skipped: no CUDA device: {err}: {}",
                    source.unwrap_or_default()
                );
                None
            }
        }
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
            .collect()
    }

    /// Uploads 20 MiB at an unaligned offset (in one call, then again in uneven pieces as the
    /// store streams a file), synchronizes, downloads and compares.
    fn round_trip(device: &CudaDevice) {
        const LEN: usize = 20 << 20;
        const OFFSET: u64 = (1 << 20) + 3;
        let free_before = device.free_bytes();
        assert!(free_before <= device.capacity());
        let alloc = device.allocate(OFFSET + 2 * LEN as u64 + 5).unwrap();
        let (first, second) = (pattern(LEN, 1), pattern(LEN, 7));
        device.upload(&alloc, OFFSET, &first).unwrap();
        let mut at = OFFSET + LEN as u64;
        for piece in second.chunks((3 << 20) + 17) {
            device.upload(&alloc, at, piece).unwrap();
            at += piece.len() as u64;
        }
        device.synchronize().unwrap();

        let mut back = vec![0xAA; 2 * LEN + 9];
        device.download(&alloc, OFFSET - 4, &mut back).unwrap();
        assert_eq!(&back[..4], &[0; 4], "allocations start zeroed");
        assert!(back[4..4 + LEN] == first, "first 20 MiB differ");
        assert!(back[4 + LEN..4 + 2 * LEN] == second, "second 20 MiB differ");
        assert_eq!(&back[4 + 2 * LEN..], &[0; 5]);

        assert!(matches!(
            device.upload(&alloc, at, &[0; 6]),
            Err(DeviceError::Range { .. })
        ));
        let id = alloc.id();
        device.release(alloc);
        let gone = crate::device::DeviceAlloc::new(id, 10);
        assert!(matches!(
            device.download(&gone, 0, &mut [0; 10]),
            Err(DeviceError::UnknownAlloc { .. })
        ));
        device.synchronize().unwrap();
        println!(
            "{}: capacity {} B, free {} B before, {} B after",
            device.name(),
            device.capacity(),
            free_before,
            device.free_bytes()
        );
    }

    #[test]
    fn cuda_round_trip_through_the_staging_ring() {
        let Some(device) = open(CudaDevice::CHUNK_LEN, CudaDevice::RING_LEN) else {
            return;
        };
        round_trip(&device);
        // Small chunks and a short ring: every transfer wraps the ring many times.
        let Some(device) = open(1 << 20, 3) else {
            return;
        };
        round_trip(&device);
    }
}

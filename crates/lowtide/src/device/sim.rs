//! A device simulated in host memory, with a fixed capacity and an optional bandwidth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Device, DeviceAlloc, DeviceError, check_range, next_alloc_id};
use crate::sys::AlignedBuf;

/// Device memory simulated in host memory: a fixed capacity, byte counters, and optionally a
/// bandwidth so that transfers take as long as they would over a real link.
///
/// Its memory is this process's memory: not counted by the store's RAM budget (it stands for
/// device memory), but real memory for the kernel and the memory cgroup, so the store counts
/// it against the RAM reserve ([`Device::in_host_memory`]). Allocations of 256 KiB and more
/// are mappings of their own, given back to the kernel when released; a refused allocation
/// is [`DeviceError::HostMemory`], never an abort.
///
/// Its memory can be read and changed in place, as a kernel would on a real device:
/// [`SimDevice::with_bytes_mut`] and its siblings lend an allocation's bytes to a closure.
#[derive(Debug)]
pub struct SimDevice {
    name: String,
    capacity: u64,
    bandwidth: Option<u64>,
    state: Mutex<SimState>,
    uploaded: AtomicU64,
    downloaded: AtomicU64,
}

/// The allocations: the map's lock is held only to look an allocation up, add or remove
/// it; each allocation's own lock is held for a transfer, so transfers of different
/// allocations run at once and an allocation (a fresh mapping) is made outside both.
#[derive(Debug, Default)]
struct SimState {
    /// Each with its length.
    allocs: HashMap<u64, (u64, Arc<Mutex<AlignedBuf>>)>,
    used: u64,
}

impl SimDevice {
    /// A simulated device of `capacity` bytes with unthrottled transfers.
    pub fn new(name: impl Into<String>, capacity: u64) -> Self {
        Self {
            name: name.into(),
            capacity,
            bandwidth: None,
            state: Mutex::default(),
            uploaded: AtomicU64::new(0),
            downloaded: AtomicU64::new(0),
        }
    }

    /// Throttles transfers to `bytes_per_second` (a PCIe 4.0 x16 link moves about 25 GB/s).
    pub fn with_bandwidth(mut self, bytes_per_second: u64) -> Self {
        self.bandwidth = Some(bytes_per_second.max(1));
        self
    }

    /// Bytes uploaded so far.
    pub fn bytes_uploaded(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }

    /// Bytes downloaded so far.
    pub fn bytes_downloaded(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }

    /// Bytes allocated now.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Runs `f` on the bytes of `alloc`, under the device's lock, and returns what it returns.
    ///
    /// The slice is the allocation's memory itself, not a copy: nothing else reads or writes
    /// it while `f` runs (uploads, downloads and other accessors of this device wait), and no
    /// transfer is counted. `f` must not call this device (it would wait for itself).
    ///
    /// Fails with [`DeviceError::UnknownAlloc`] when `alloc` is not a live allocation of this
    /// device (one of another device, or one released), without calling `f`.
    pub fn with_bytes<R>(
        &self,
        alloc: &DeviceAlloc,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, DeviceError> {
        self.access(alloc, 0, alloc.len(), |bytes| f(bytes))
    }

    /// Runs `f` on the bytes of `alloc`, which it may change in place, under the device's
    /// lock; as [`SimDevice::with_bytes`] otherwise.
    ///
    /// A change made here is the device copy's new content: tell the store the tensor changed
    /// (its in-place update call) so that it keeps those bytes.
    pub fn with_bytes_mut<R>(
        &self,
        alloc: &DeviceAlloc,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, DeviceError> {
        self.access(alloc, 0, alloc.len(), f)
    }

    /// Runs `f` on the `len` bytes at `offset` of `alloc`; as [`SimDevice::with_bytes`]
    /// otherwise. A range outside the allocation is [`DeviceError::Range`], without calling
    /// `f`.
    pub fn with_range<R>(
        &self,
        alloc: &DeviceAlloc,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, DeviceError> {
        self.access(alloc, offset, len, |bytes| f(bytes))
    }

    /// Runs `f` on the `len` bytes at `offset` of `alloc`, which it may change in place; as
    /// [`SimDevice::with_bytes_mut`] otherwise. A range outside the allocation is
    /// [`DeviceError::Range`], without calling `f`.
    pub fn with_range_mut<R>(
        &self,
        alloc: &DeviceAlloc,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, DeviceError> {
        self.access(alloc, offset, len, f)
    }

    /// Checks the handle and the range, then runs `f` on those bytes under the lock.
    ///
    /// The range is checked against the handle's length and against the memory the id names,
    /// so a handle made up with [`DeviceAlloc::new`] cannot reach past an allocation.
    fn access<R>(
        &self,
        alloc: &DeviceAlloc,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, DeviceError> {
        check_range(self, alloc, offset, len)?;
        let Some((_, memory)) = self.lock().allocs.get(&alloc.id()).cloned() else {
            return Err(DeviceError::UnknownAlloc {
                device: self.name.clone(),
                id: alloc.id(),
            });
        };
        let mut memory = memory.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = memory.as_mut_slice();
        // Inside the handle (checked above), so `offset + len` does not overflow; inside the
        // memory (checked here), so both fit in `usize`.
        if offset + len > bytes.len() as u64 {
            return Err(DeviceError::Range {
                device: self.name.clone(),
                offset,
                len,
                alloc_len: bytes.len() as u64,
            });
        }
        Ok(f(&mut bytes[offset as usize..(offset + len) as usize]))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn throttle(&self, started: Instant, len: usize) {
        if let Some(bandwidth) = self.bandwidth {
            let due = Duration::from_secs_f64(len as f64 / bandwidth as f64);
            if let Some(rest) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }
}

impl Device for SimDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn free_bytes(&self) -> u64 {
        self.capacity - self.lock().used
    }

    fn allocate(&self, len: u64) -> Result<DeviceAlloc, DeviceError> {
        {
            // The room is taken first, the memory mapped outside the lock.
            let mut state = self.lock();
            let free = self.capacity - state.used;
            if len > free {
                return Err(DeviceError::OutOfMemory {
                    device: self.name.clone(),
                    requested: len,
                    free,
                });
            }
            state.used += len;
        }
        let Some(memory) = usize::try_from(len).ok().and_then(AlignedBuf::zeroed) else {
            self.lock().used -= len;
            return Err(DeviceError::HostMemory {
                device: self.name.clone(),
                requested: len,
            });
        };
        let id = next_alloc_id();
        self.lock()
            .allocs
            .insert(id, (len, Arc::new(Mutex::new(memory))));
        Ok(DeviceAlloc::new(id, len))
    }

    fn release(&self, alloc: DeviceAlloc) {
        let memory = {
            let mut state = self.lock();
            let memory = state.allocs.remove(&alloc.id());
            if let Some((len, _)) = &memory {
                state.used -= len;
            }
            memory
        };
        // Unmapped outside the lock (after any transfer still holding it ends).
        drop(memory);
    }

    fn in_host_memory(&self) -> bool {
        true
    }

    fn upload(&self, dst: &DeviceAlloc, offset: u64, src: &[u8]) -> Result<(), DeviceError> {
        let started = Instant::now();
        self.access(dst, offset, src.len() as u64, |bytes| {
            bytes.copy_from_slice(src);
        })?;
        self.uploaded.fetch_add(src.len() as u64, Ordering::Relaxed);
        self.throttle(started, src.len());
        Ok(())
    }

    fn download(&self, src: &DeviceAlloc, offset: u64, dst: &mut [u8]) -> Result<(), DeviceError> {
        let started = Instant::now();
        self.access(src, offset, dst.len() as u64, |bytes| {
            dst.copy_from_slice(bytes);
        })?;
        self.downloaded
            .fetch_add(dst.len() as u64, Ordering::Relaxed);
        self.throttle(started, dst.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SimDevice;
    use crate::device::{Device, DeviceError};

    #[test]
    fn capacity_ranges_and_round_trip() {
        let device = SimDevice::new("sim0", 1000);
        let a = device.allocate(600).unwrap();
        assert!(matches!(
            device.allocate(500),
            Err(DeviceError::OutOfMemory { free: 400, .. })
        ));
        device.upload(&a, 100, b"hello").unwrap();
        let mut back = [0u8; 5];
        device.download(&a, 100, &mut back).unwrap();
        assert_eq!(&back, b"hello");
        assert!(matches!(
            device.upload(&a, 598, b"abc"),
            Err(DeviceError::Range { .. })
        ));
        assert_eq!((device.bytes_uploaded(), device.bytes_downloaded()), (5, 5));
        device.release(a);
        assert_eq!(device.free_bytes(), 1000);
    }

    #[test]
    fn an_allocation_the_host_cannot_give_is_an_error() {
        // A 64 TiB device: the capacity allows it, the host does not.
        let device = SimDevice::new("sim0", 1 << 46);
        assert!(matches!(
            device.allocate(1 << 45),
            Err(DeviceError::HostMemory { requested, .. }) if requested == 1 << 45
        ));
        assert_eq!(device.used(), 0);
        assert!(device.allocate(0).unwrap().is_empty());
    }
}

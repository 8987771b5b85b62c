//! The accelerator tier of the store: loading onto devices, device guards, and unloading by
//! bytes — the ComfyUI proposal's path done without writing what can be re-read.
//!
//! Unload semantics: a device copy whose bytes exist elsewhere (a clean tensor, or a dirty one
//! with a RAM copy or a spill extent) is simply freed — nothing is written. A dirty tensor whose
//! only copy is on the device is downloaded into RAM when the governor allows (budget and
//! reserve), otherwise streamed into the spill file through a chunk-sized staging buffer
//! (never a full RAM copy); if both fail the device copy stays and the unload reports it.

use std::sync::Arc;

use super::state::{DeviceCopy, Origin, RamBuf, State, TensorEntry};
use super::{Recipe, Shared, Store, StoreError, TensorId};
use crate::device::{Device, DeviceAlloc, DeviceError};
use crate::policy::{Candidate, READ_COST, WRITE_COST};
use crate::spill::{Extent, SpillError};
use crate::stats::Stats;
use crate::sys::AlignedBuf;

/// Bytes restored at once for a device upload (rounded to the device's chunks): two
/// direct-I/O requests of the default size in flight, and little staging memory — the
/// reader works on the next window while this one is uploaded. (Measured with `SimDevice`,
/// 4-32 MiB windows loaded at the same speed within noise, warm or cold; the simulated
/// device's own copy into fresh memory was the limit.)
const UPLOAD_WINDOW: u64 = 8 << 20;

/// The most host memory one upload from a source holds in window buffers: the window being
/// uploaded, the one the reader fills, and one in the channel between them, each padded to
/// whole blocks on both ends.
pub(super) fn upload_windows_bound(largest: u64, chunk_len: usize) -> u64 {
    let chunk = chunk_len.max(1) as u64;
    let window = ((UPLOAD_WINDOW / chunk).max(1) * chunk).min(largest);
    3 * (window.div_ceil(crate::sys::direct::BLOCK) + 2) * crate::sys::direct::BLOCK
}

/// A refused device allocation as the store reports it.
fn allocation_error(err: DeviceError, name: &str, device: &dyn Device, len: u64) -> StoreError {
    match err {
        DeviceError::OutOfMemory { free, .. } => StoreError::DeviceFull {
            name: name.to_owned(),
            device: device.name(),
            requested: len,
            available: free,
        },
        source => StoreError::Device {
            name: name.to_owned(),
            source,
        },
    }
}

/// A device added to a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub(super) u32);

/// What [`Store::load`] placed where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadOutcome {
    /// Tensors now on the device.
    pub device_tensors: u32,
    /// Their bytes.
    pub device_bytes: u64,
    /// Tensors left on the host (over the budget or the device's room); uploaded when used.
    pub host_tensors: u32,
    /// Their bytes.
    pub host_bytes: u64,
}

/// What an unload did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnloadOutcome {
    /// Device bytes freed in total.
    pub freed_bytes: u64,
    /// Of which freed without writing anything (the bytes exist elsewhere).
    pub clean_bytes: u64,
    /// Of which downloaded into RAM copies.
    pub to_ram_bytes: u64,
    /// Of which streamed into the spill file.
    pub to_spill_bytes: u64,
    /// Dirty device bytes that could go neither to RAM nor to the spill file: still on the
    /// device.
    pub not_freed_bytes: u64,
    /// Copies left alone because a guard pins them.
    pub pinned: u32,
}

/// A pinned device copy of a tensor. While it lives the copy is never unloaded.
pub struct DeviceGuard {
    shared: Arc<Shared>,
    id: TensorId,
    device: Arc<dyn Device>,
    alloc: Arc<DeviceAlloc>,
}

impl DeviceGuard {
    /// The tensor.
    pub fn id(&self) -> TensorId {
        self.id
    }

    /// The device holding the copy.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }

    /// The device allocation holding the tensor's bytes.
    pub fn alloc(&self) -> &DeviceAlloc {
        &self.alloc
    }

    /// Copies the tensor's bytes back to the host (for checks; costs a transfer). The vector
    /// is allocated fallibly: a host that cannot hold it is [`DeviceError::HostMemory`].
    pub fn download(&self) -> Result<Vec<u8>, DeviceError> {
        let len = self.alloc.len();
        let mut bytes = Vec::new();
        usize::try_from(len)
            .ok()
            .and_then(|n| bytes.try_reserve_exact(n).ok())
            .ok_or_else(|| DeviceError::HostMemory {
                device: self.device.name(),
                requested: len,
            })?;
        bytes.resize(len as usize, 0);
        self.download_into(&mut bytes)?;
        Ok(bytes)
    }

    /// Copies the tensor's bytes into `dst`, which must be exactly as long as the tensor
    /// (a buffer the caller reuses, or one of its own mappings such as
    /// [`crate::direct::AlignedBytes`]).
    pub fn download_into(&self, dst: &mut [u8]) -> Result<(), DeviceError> {
        if dst.len() as u64 != self.alloc.len() {
            return Err(DeviceError::Range {
                device: self.device.name(),
                offset: 0,
                len: dst.len() as u64,
                alloc_len: self.alloc.len(),
            });
        }
        self.device.download(&self.alloc, 0, dst)
    }
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        self.shared.unpin(self.id);
    }
}

impl std::fmt::Debug for DeviceGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGuard")
            .field("id", &self.id)
            .field("device", &self.device.name())
            .field("len", &self.alloc.len())
            .finish_non_exhaustive()
    }
}

/// Where an upload takes its bytes from, chosen under the lock.
enum UploadFrom {
    Ram(Arc<RamBuf>),
    Source {
        source: Arc<crate::source::Source>,
        offset: u64,
    },
    Spill {
        extent: Extent,
        recipe: Option<Recipe>,
    },
    Recipe(Recipe),
}

impl UploadFrom {
    /// Where the bytes of a tensor without a device copy come from, fastest first.
    fn of(entry: &TensorEntry) -> UploadFrom {
        match (&entry.ram, &entry.origin, entry.spilled, &entry.recipe) {
            (Some(buf), ..) => UploadFrom::Ram(Arc::clone(buf)),
            (None, Origin::Source { source, offset }, ..) => UploadFrom::Source {
                source: Arc::clone(source),
                offset: *offset,
            },
            (None, Origin::Derived, Some(extent), recipe) => UploadFrom::Spill {
                extent,
                recipe: recipe.clone(),
            },
            (None, Origin::Derived, None, Some(recipe)) => UploadFrom::Recipe(recipe.clone()),
            (None, Origin::Derived, None, None) => {
                unreachable!("a dirty tensor off the device has a RAM, spill or recipe copy")
            }
        }
    }
}

impl Shared {
    /// Unloads other copies from `device_id`, in policy order, until `len` bytes are free or
    /// nothing else can go. `id` itself and the model `spare` stay.
    fn make_device_room(
        &self,
        state: &mut State,
        device: &dyn Device,
        device_id: DeviceId,
        id: TensorId,
        len: u64,
        spare: Option<super::ModelId>,
    ) {
        if device.free_bytes() >= len {
            return;
        }
        let mut outcome = UnloadOutcome::default();
        for victim in self.device_victims(state, device_id, None, spare) {
            if device.free_bytes() >= len {
                break;
            }
            if victim != id {
                self.unload_copy(state, victim, &mut outcome);
            }
        }
        self.check(state);
    }

    #[allow(clippy::unused_self)] // a method so that every lookup reads `shared.device(..)`
    pub(super) fn device(
        &self,
        state: &State,
        device: DeviceId,
    ) -> Result<Arc<dyn Device>, StoreError> {
        state
            .devices
            .get(device.0 as usize)
            .cloned()
            .ok_or(StoreError::UnknownDevice { device: device.0 })
    }

    /// Frees a tensor's device copy without writing anything (the caller has made sure its
    /// bytes exist elsewhere, or they are stale).
    pub(super) fn release_device_copy(&self, state: &mut State, id: TensorId) -> u64 {
        let Some(Some(entry)) = state.tensors.get_mut(id.0 as usize) else {
            return 0;
        };
        let Some(copy) = entry.device.take() else {
            return 0;
        };
        let len = copy.alloc.len();
        if let Some(device) = state.devices.get(copy.device.0 as usize) {
            match Arc::try_unwrap(copy.alloc) {
                Ok(alloc) => device.release(alloc),
                Err(_) => log::error!(
                    "device copy of tensor #{} released while still shared",
                    id.0
                ),
            }
        }
        self.stats
            .device_bytes
            .fetch_sub(len, std::sync::atomic::Ordering::Relaxed);
        len
    }

    /// Whether the governor allows `len` more bytes of RAM copies right now, without evicting.
    pub(super) fn ram_allows(&self, state: &State, len: u64) -> bool {
        if state.anon + state.reserved + len > self.governor.ram_budget {
            return false;
        }
        let reserve = self.governor.reserve_ram();
        reserve == 0
            || crate::governor::reserve_shortfall(self.governor.reading().available, len, reserve)
                == 0
    }

    /// Unloads one tensor's device copy (see the module docs). Never touches pinned copies.
    fn unload_copy(&self, state: &mut State, id: TensorId, outcome: &mut UnloadOutcome) {
        let Ok(entry) = state.tensor(id) else { return };
        let Some(copy) = &entry.device else { return };
        if entry.pins > 0 {
            outcome.pinned += 1;
            return;
        }
        let len = entry.len;
        let cheap_recipe = entry
            .recipe
            .as_ref()
            .is_some_and(|r| r.cost_per_byte() < WRITE_COST + READ_COST);
        if entry.recoverable_without_device() || cheap_recipe {
            self.release_device_copy(state, id);
            Stats::add(&self.stats.unloaded_clean_bytes, len);
            Stats::add(&self.stats.device_unloads, 1);
            outcome.clean_bytes += len;
            outcome.freed_bytes += len;
            return;
        }
        let Ok(device) = self.device(state, copy.device) else {
            return;
        };
        let alloc = Arc::clone(&copy.alloc);
        let name = entry.name.clone();
        if self.ram_allows(state, len)
            && let Some(mut buf) = AlignedBuf::zeroed(len as usize)
        {
            match device.download(&alloc, 0, buf.as_mut_slice()) {
                Ok(()) => {
                    drop(alloc);
                    Stats::add(&self.stats.bytes_downloaded, len);
                    state.tensor_mut(id).expect("present").ram =
                        Some(Arc::new(RamBuf::Aligned(buf)));
                    state.anon += len;
                    self.release_device_copy(state, id);
                    Stats::add(&self.stats.device_unloads, 1);
                    outcome.to_ram_bytes += len;
                    outcome.freed_bytes += len;
                    return;
                }
                Err(err) => log::warn!(
                    "tensor `{name}`: download from {} failed: {err}",
                    device.name()
                ),
            }
        }
        let chunk = device.chunk_len();
        let written = self.spill_lock().write_with(len, chunk, |offset, buf| {
            device.download(&alloc, offset, buf)
        });
        drop(alloc);
        match written {
            Ok(extent) => {
                Stats::add(&self.stats.bytes_downloaded, len);
                Stats::add(&self.stats.bytes_spilled, len);
                Stats::add(&self.stats.bytes_written, len);
                state.tensor_mut(id).expect("present").spilled = Some(extent);
                self.release_device_copy(state, id);
                Stats::add(&self.stats.device_unloads, 1);
                outcome.to_spill_bytes += len;
                outcome.freed_bytes += len;
            }
            Err(err) => {
                log::warn!(
                    "tensor `{name}`: cannot unload from {}: {err}",
                    device.name()
                );
                Stats::add(&self.stats.spill_failures, 1);
                outcome.not_freed_bytes += len;
            }
        }
    }

    /// Device copies on `device` that may be unloaded, in policy order, optionally limited to
    /// one model's tensors or excluding one model's.
    fn device_victims(
        &self,
        state: &State,
        device: DeviceId,
        only: Option<super::ModelId>,
        spare: Option<super::ModelId>,
    ) -> Vec<TensorId> {
        let mut candidates: Vec<Candidate> = state
            .tensors
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (TensorId(i as u32), t)))
            .filter(|(_, t)| t.pins == 0 && t.device.as_ref().is_some_and(|c| c.device == device))
            .filter(|(_, t)| only.is_none_or(|m| t.model == m) && spare != Some(t.model))
            .map(|(id, t)| Candidate {
                tensor: id,
                priority: state.model(t.model).map(|m| m.priority).unwrap_or_default(),
                last_use: t.last_use,
                credit: t.credit,
                len: t.len,
                clean: t.recoverable_without_device(),
            })
            .collect();
        self.policy.order(&mut candidates);
        candidates.into_iter().map(|c| c.tensor).collect()
    }
}

impl Store {
    /// Adds a device; its copies are managed by this store from now on.
    pub fn add_device(&self, device: Arc<dyn Device>) -> DeviceId {
        let mut state = self.shared.lock();
        state.devices.push(device);
        DeviceId(state.devices.len() as u32 - 1)
    }

    /// The device behind a handle.
    pub fn device(&self, device: DeviceId) -> Result<Arc<dyn Device>, StoreError> {
        self.shared.device(&self.shared.lock(), device)
    }

    /// Pins a copy of the tensor on `device`, uploading it from wherever its bytes are (RAM,
    /// the spill file, the source file, or its recipe) when it is not there yet. Other
    /// unpinned device copies are unloaded in policy order to make room.
    pub fn acquire_device(
        &self,
        id: TensorId,
        device: DeviceId,
    ) -> Result<DeviceGuard, StoreError> {
        self.acquire_device_sparing(id, device, None)
    }

    fn acquire_device_sparing(
        &self,
        id: TensorId,
        device_id: DeviceId,
        spare: Option<super::ModelId>,
    ) -> Result<DeviceGuard, StoreError> {
        let (device, alloc, from, name) = {
            let mut state = self.shared.lock();
            let device = self.shared.device(&state, device_id)?;
            let (now, inflation) = (state.tick(), state.inflation);
            let entry = state.tensor_mut(id)?;
            entry.touch(now, inflation);
            if let Some(copy) = &entry.device {
                if copy.device == device_id {
                    let alloc = Arc::clone(&copy.alloc);
                    entry.pins += 1;
                    return Ok(DeviceGuard {
                        shared: Arc::clone(&self.shared),
                        id,
                        device,
                        alloc,
                    });
                }
                // A tensor has at most one device copy: move it off the other device first.
                if entry.pins > 0 {
                    return Err(StoreError::Pinned {
                        name: entry.name.clone(),
                        pins: entry.pins,
                    });
                }
                let mut outcome = UnloadOutcome::default();
                self.shared.unload_copy(&mut state, id, &mut outcome);
                if outcome.not_freed_bytes > 0 {
                    let entry = state.tensor(id)?;
                    return Err(StoreError::DeviceFull {
                        name: entry.name.clone(),
                        device: device.name(),
                        requested: entry.len,
                        available: 0,
                    });
                }
            }
            let entry = state.tensor_mut(id)?;
            let (name, len) = (entry.name.clone(), entry.len);
            let from = UploadFrom::of(entry);
            self.shared
                .make_device_room(&mut state, &*device, device_id, id, len, spare);
            if device.in_host_memory() {
                // Its memory is the host's: keep the reserve as for a RAM copy.
                self.shared.keep_reserve(&mut state, id, &name, len)?;
            }
            let alloc = device
                .allocate(len)
                .map_err(|err| allocation_error(err, &name, &*device, len))?;
            state.tensor_mut(id)?.pins += 1;
            (device, alloc, from, name)
        };
        match self.upload(&device, &alloc, &name, &from) {
            Ok(()) => {
                let len = alloc.len();
                Stats::add(&self.shared.stats.bytes_uploaded, len);
                let mut state = self.shared.lock();
                let entry = state.tensor_mut(id)?;
                if let Some(copy) = &entry.device {
                    // Another thread uploaded it meanwhile: keep that copy if it is on this
                    // device, else give up ours (a tensor has one device copy at a time).
                    let same = copy.device == device_id;
                    let existing = Arc::clone(&copy.alloc);
                    device.release(alloc);
                    if same {
                        return Ok(DeviceGuard {
                            shared: Arc::clone(&self.shared),
                            id,
                            device,
                            alloc: existing,
                        });
                    }
                    entry.pins -= 1;
                    return Err(StoreError::Pinned {
                        name,
                        pins: entry.pins,
                    });
                }
                let alloc = Arc::new(alloc);
                entry.device = Some(DeviceCopy {
                    device: device_id,
                    alloc: Arc::clone(&alloc),
                });
                Stats::add(&self.shared.stats.device_bytes, len);
                self.shared.check(&mut state);
                Ok(DeviceGuard {
                    shared: Arc::clone(&self.shared),
                    id,
                    device,
                    alloc,
                })
            }
            Err(err) => {
                device.release(alloc);
                self.shared.unpin(id);
                Err(err)
            }
        }
    }

    /// Streams the bytes into `alloc` outside the lock (the tensor is pinned).
    fn upload(
        &self,
        device: &Arc<dyn Device>,
        alloc: &DeviceAlloc,
        name: &str,
        from: &UploadFrom,
    ) -> Result<(), StoreError> {
        let len = alloc.len();
        let device_err = |source| StoreError::Device {
            name: name.to_owned(),
            source,
        };
        let recompute = |recipe: &Recipe| -> Result<(), StoreError> {
            let bytes = (recipe.compute)();
            if bytes.len() as u64 != len {
                return Err(StoreError::Recipe {
                    name: name.to_owned(),
                    expected: len,
                    actual: bytes.len() as u64,
                });
            }
            Stats::add(&self.shared.stats.recomputes, 1);
            device.upload(alloc, 0, &bytes).map_err(device_err)
        };
        match from {
            UploadFrom::Ram(buf) => device
                .upload(alloc, 0, buf.as_slice())
                .map_err(device_err)?,
            UploadFrom::Source { source, offset } => {
                // Restored window by window (cached parts copied, the rest read with
                // O_DIRECT, as for RAM copies) on a reader thread while the previous window is
                // uploaded in the device's chunks: no full host copy is kept, nothing is left
                // in the page cache, and at most three windows of buffer exist at once.
                let chunk = device.chunk_len().max(1) as u64;
                let window = (UPLOAD_WINDOW / chunk).max(1) * chunk;
                let (to_uploader, windows) = std::sync::mpsc::sync_channel(1);
                let (to_reader, spares) = std::sync::mpsc::channel::<AlignedBuf>();
                std::thread::scope(|scope| -> Result<(), StoreError> {
                    scope.spawn(move || {
                        let mut done = 0u64;
                        while done < len {
                            let n = (len - done).min(window);
                            let restored = source.restore(offset + done, n, spares.try_recv().ok());
                            let failed = restored.is_err();
                            // The uploader stops receiving when it fails.
                            if to_uploader.send((done, n, restored)).is_err() || failed {
                                return;
                            }
                            done += n;
                        }
                    });
                    for (done, n, restored) in windows {
                        let (buf, cold) = restored?;
                        self.shared.stats.restored_from_source(n, cold);
                        for (i, piece) in buf.as_slice().chunks(chunk as usize).enumerate() {
                            device
                                .upload(alloc, done + i as u64 * chunk, piece)
                                .map_err(device_err)?;
                        }
                        // The reader may have finished: then the buffer is simply freed.
                        let _ = to_reader.send(buf.into_inner());
                    }
                    Ok(())
                })?;
            }
            UploadFrom::Spill { extent, recipe } => {
                let read = self.shared.spill_lock().read_with(
                    extent,
                    device.chunk_len(),
                    |offset, chunk| device.upload(alloc, offset, chunk),
                );
                match read {
                    Ok(()) => Stats::add(&self.shared.stats.bytes_restored_spill, len),
                    Err(err) => {
                        if matches!(err, SpillError::Checksum { .. }) {
                            Stats::add(&self.shared.stats.checksum_failures, 1);
                        }
                        match recipe {
                            Some(recipe) => recompute(recipe)?,
                            None => {
                                return Err(StoreError::Lost {
                                    name: name.to_owned(),
                                    source: err,
                                });
                            }
                        }
                    }
                }
            }
            UploadFrom::Recipe(recipe) => recompute(recipe)?,
        }
        device.synchronize().map_err(device_err)
    }

    /// Loads a model onto a device within `budget` bytes (all of it when `None`): tensors are
    /// uploaded in name order while they fit; the rest stay on the host and are uploaded when
    /// acquired (like ComfyUI's low-VRAM mode). Other models' copies are unloaded in policy
    /// order to make room; this model's own are not.
    pub fn load(
        &self,
        model: super::ModelId,
        device: DeviceId,
        budget: Option<u64>,
    ) -> Result<LoadOutcome, StoreError> {
        let budget = budget.unwrap_or(u64::MAX);
        let mut outcome = LoadOutcome::default();
        for id in self.tensors(model)? {
            let len = self.info(id)?.len;
            if outcome.device_bytes + len > budget {
                outcome.host_tensors += 1;
                outcome.host_bytes += len;
                continue;
            }
            match self.acquire_device_sparing(id, device, Some(model)) {
                Ok(guard) => {
                    drop(guard);
                    outcome.device_tensors += 1;
                    outcome.device_bytes += len;
                }
                // A device in host memory may also be refused to keep the RAM reserve.
                Err(StoreError::DeviceFull { .. } | StoreError::UnderReserve { .. }) => {
                    outcome.host_tensors += 1;
                    outcome.host_bytes += len;
                }
                Err(err) => return Err(err),
            }
        }
        Ok(outcome)
    }

    /// Replaces a tensor's bytes on `device` (after patching it there, say with a LoRA): the
    /// device copy becomes the tensor's only copy and the tensor is dirty. RAM and spill copies
    /// are dropped. Fails while a guard pins it; on error the tensor is unchanged.
    pub fn replace_on_device(
        &self,
        id: TensorId,
        device: DeviceId,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let info = self.info(id)?;
        super::check_len(&info.name, info.dtype, &info.shape, bytes.len() as u64)?;
        if info.pins > 0 {
            return Err(StoreError::Pinned {
                name: info.name,
                pins: info.pins,
            });
        }
        let guard = self.acquire_device(id, device)?;
        guard
            .device
            .upload(&guard.alloc, 0, bytes)
            .map_err(|source| StoreError::Device {
                name: info.name.clone(),
                source,
            })?;
        guard
            .device
            .synchronize()
            .map_err(|source| StoreError::Device {
                name: info.name.clone(),
                source,
            })?;
        Stats::add(&self.shared.stats.bytes_uploaded, bytes.len() as u64);
        drop(guard);
        let mut state = self.shared.lock();
        let released = state.drop_clean(id, false);
        self.record_drop(released);
        state.free_ram(id);
        let (now, inflation) = (state.tick(), state.inflation);
        let entry = state.tensor_mut(id)?;
        entry.origin = Origin::Derived;
        entry.recipe = None;
        entry.touch(now, inflation);
        let old_extent = entry.spilled.take();
        if let Some(extent) = old_extent {
            self.shared.spill_lock().free(extent);
        }
        self.shared.check(&mut state);
        Ok(())
    }

    /// Frees at least `bytes` of device memory held by `model`'s tensors (on every device), in
    /// policy order, never a pinned copy. See the module docs for what is written.
    pub fn unload(&self, model: super::ModelId, bytes: u64) -> Result<UnloadOutcome, StoreError> {
        let mut state = self.shared.lock();
        state.model(model)?;
        let mut outcome = UnloadOutcome::default();
        for device in 0..state.devices.len() as u32 {
            for victim in self
                .shared
                .device_victims(&state, DeviceId(device), Some(model), None)
            {
                if outcome.freed_bytes >= bytes {
                    break;
                }
                self.shared.unload_copy(&mut state, victim, &mut outcome);
            }
        }
        outcome.pinned = state
            .model(model)?
            .tensors
            .iter()
            .filter_map(|&t| state.tensor(t).ok())
            .filter(|t| t.pins > 0 && t.device.is_some())
            .count() as u32;
        self.shared.check(&mut state);
        Ok(outcome)
    }

    /// Unloads every unpinned device copy of `model`.
    pub fn unload_all(&self, model: super::ModelId) -> Result<UnloadOutcome, StoreError> {
        self.unload(model, u64::MAX)
    }
}

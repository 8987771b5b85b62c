//! The accelerator tier of the store: loading onto devices, device guards, and unloading by
//! bytes — the ComfyUI proposal's path done without writing what can be re-read.
//!
//! Unload semantics: a device copy whose bytes exist elsewhere (a clean tensor, or a dirty one
//! with a RAM copy or a spill extent) is simply freed — nothing is written. A dirty tensor whose
//! only copy is on the device is downloaded into RAM when the governor allows (budget and
//! reserve), otherwise streamed into the spill file through a chunk-sized staging buffer
//! (never a full RAM copy); if both fail the device copy stays and the unload reports it.
//! The policy chooses these fates ([`crate::policy::Fate`]). Like RAM evictions, unloads plan
//! under the lock, move bytes outside it (the victim marked busy), and commit under it.

use std::sync::{Arc, MutexGuard};

use super::copies::{CopySource, Target, alloc};
use super::device_stream::{DeviceStream, Placed};
use super::error::{HandleError, MemoryError, RestoreError, UpdateError};
use super::ram::RamBuf;
use super::reread::FileRead;
use super::state::{DeviceCopy, State};
use super::stream::StreamStats;
use super::{Shared, Store, StoreError, TensorId, Tier};
use crate::device::{Device, DeviceAlloc, DeviceError};
use crate::governor::reserve_shortfall;
use crate::ids::{DeviceId, ModelId};
use crate::policy::{Candidate, Evicting, Fate};
use crate::stats::Stats;

/// A refused device allocation as the store reports it.
fn allocation_error(err: DeviceError, name: &str, device: &dyn Device, len: u64) -> StoreError {
    match err {
        DeviceError::OutOfMemory { free, .. } => StoreError::Memory(MemoryError::DeviceFull {
            name: name.to_owned(),
            device: device.name(),
            requested: len,
            available: free,
        }),
        source => StoreError::Restore(RestoreError::Device {
            name: name.to_owned(),
            source,
        }),
    }
}

/// What [`Store::begin_device`] did.
pub(super) enum DeviceBegun {
    /// The tensor had a copy on the device: pinned.
    Ready(DeviceGuard),
    /// Allocated and pinned; its bytes are to be uploaded from `from`.
    Pending(DevicePending),
}

/// A device copy on its way: allocation made, tensor pinned, source chosen. Handed to
/// [`Store::finish_device`], which installs it or gives the allocation back.
pub(super) struct DevicePending {
    pub(super) id: TensorId,
    pub(super) device_id: DeviceId,
    pub(super) device: Arc<dyn Device>,
    pub(super) name: String,
    pub(super) len: u64,
    pub(super) alloc: DeviceAlloc,
    pub(super) from: CopySource,
}

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
    /// What the load's stream did: tensors read through its queue, the most reads in flight
    /// at once (see [`DeviceStream`]).
    pub stream: StreamStats,
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

impl UnloadOutcome {
    fn add(&mut self, other: UnloadOutcome) {
        self.freed_bytes += other.freed_bytes;
        self.clean_bytes += other.clean_bytes;
        self.to_ram_bytes += other.to_ram_bytes;
        self.to_spill_bytes += other.to_spill_bytes;
        self.not_freed_bytes += other.not_freed_bytes;
        self.pinned += other.pinned;
    }
}

/// A pinned device copy of a tensor. While it lives the copy is never unloaded.
pub struct DeviceGuard {
    shared: Arc<Shared>,
    id: TensorId,
    device: Arc<dyn Device>,
    /// `None` only while the guard is dropped (given up before the pin).
    alloc: Option<Arc<DeviceAlloc>>,
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
        self.alloc
            .as_deref()
            .expect("present until the guard is dropped")
    }

    /// Copies the tensor's bytes back to the host (for checks; costs a transfer). The vector
    /// is allocated fallibly: a host that cannot hold it is [`DeviceError::HostMemory`].
    pub fn download(&self) -> Result<Vec<u8>, DeviceError> {
        let len = self.alloc().len();
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
        if dst.len() as u64 != self.alloc().len() {
            return Err(DeviceError::Range {
                device: self.device.name(),
                offset: 0,
                len: dst.len() as u64,
                alloc_len: self.alloc().len(),
            });
        }
        self.device.download(self.alloc(), 0, dst)
    }
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        // The handle first, then the pin: an unload that frees the copy right after must hold
        // its last reference, or the allocation would never be given back to the device.
        drop(self.alloc.take());
        // In a forked child: see `TensorGuard::drop`.
        if self.shared.owner.is_current() {
            self.shared.unpin(self.id);
        }
    }
}

impl std::fmt::Debug for DeviceGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGuard")
            .field("id", &self.id)
            .field("device", &self.device.name())
            .field("len", &self.alloc().len())
            .finish_non_exhaustive()
    }
}

/// Which device copies an unload may take.
#[derive(Clone, Copy)]
enum Victims {
    /// Any on the device but this model's and this tensor's.
    AllBut(Option<ModelId>, Option<TensorId>),
    /// This model's.
    Of(ModelId),
    /// This tensor's.
    Only(TensorId),
}

/// A device copy whose bytes must move before it can go.
struct Move {
    id: TensorId,
    device: Arc<dyn Device>,
    alloc: Arc<DeviceAlloc>,
    /// Bytes reserved in RAM for a download (0: stream it to the spill file).
    to_ram: u64,
}

impl Shared {
    /// Device copies on `device` that may be unloaded, in policy order.
    fn device_candidates(
        &self,
        state: &State,
        device: DeviceId,
        victims: Victims,
        available: Option<u64>,
    ) -> Vec<Candidate> {
        let budget = self.governor.ram_budget;
        let reserve = self.governor.reserve_ram();
        let capacity = state.device(device).map_or(0, |d| d.capacity());
        let mut candidates: Vec<Candidate> = state
            .entries()
            .filter(|(_, t)| {
                t.pins == 0 && !t.busy && t.device.as_ref().is_some_and(|c| c.device == device)
            })
            .filter(|(id, t)| match victims {
                Victims::AllBut(spare, keep) => spare != Some(t.model) && keep != Some(*id),
                Victims::Of(model) => t.model == model,
                Victims::Only(only) => *id == only,
            })
            .map(|(id, t)| {
                let ram_room = state.anon + state.reserved + state.releaser.pending() + t.len
                    <= budget
                    && (reserve == 0
                        || available.is_some_and(|a| {
                            reserve_shortfall(a.saturating_sub(state.reserved), t.len, reserve) == 0
                        }));
                state.candidate(id, t, Evicting::Device, ram_room, capacity)
            })
            .collect();
        if super::unwinding(|| self.policy.order(&mut candidates)).is_none() {
            // A policy that panics unloads nothing.
            candidates.clear();
        }
        candidates
    }

    /// Unloads device copies from `device` until `enough` says so or none is left, in policy
    /// order, with no lock held while bytes move. Returns what it did.
    fn unload_from(
        &self,
        device_id: DeviceId,
        victims: Victims,
        mut enough: impl FnMut(&UnloadOutcome) -> bool,
    ) -> Result<UnloadOutcome, StoreError> {
        let mut outcome = UnloadOutcome::default();
        // Victims the policy keeps: not offered again in this unload.
        let mut kept = std::collections::HashSet::new();
        loop {
            if enough(&outcome) {
                return Ok(outcome);
            }
            let available =
                (self.governor.reserve_ram() > 0).then(|| self.governor.reading().available);
            let mut state = self.lock();
            let device = state.device(device_id)?;
            let mut candidates = self.device_candidates(&state, device_id, victims, available);
            candidates.retain(|c| !kept.contains(&c.tensor));
            if candidates.is_empty() {
                let waiting = state.entries().any(|(_, t)| {
                    t.busy && t.device.as_ref().is_some_and(|c| c.device == device_id)
                });
                if !waiting {
                    return Ok(outcome);
                }
                drop(self.wait_changed(state));
                continue;
            }
            // One victim at a time: the next choice sees what this one freed.
            let mut moved = None;
            for candidate in candidates {
                let id = candidate.tensor;
                let fate = super::unwinding(|| self.policy.fate(&candidate)).unwrap_or(Fate::Keep);
                match fate {
                    // A copy whose bytes exist elsewhere needs no write, whatever the fate.
                    Fate::Drop | Fate::ToRam | Fate::Spill if candidate.kept_elsewhere() => {}
                    Fate::Recompute if candidate.recipe_cost.is_some() => {}
                    fate @ (Fate::ToRam | Fate::Spill) => {
                        let to_ram = if fate == Fate::ToRam && candidate.ram_room {
                            state.reserve(candidate.len);
                            candidate.len
                        } else {
                            0
                        };
                        let entry = state.tensor_mut(id)?;
                        entry.busy = true;
                        let alloc = Arc::clone(&entry.device.as_ref().expect("a candidate").alloc);
                        moved = Some(Move {
                            id,
                            device: Arc::clone(&device),
                            alloc,
                            to_ram,
                        });
                        break;
                    }
                    fate => {
                        if fate != Fate::Keep {
                            log::debug!(
                                "policy chose {fate:?} for the device copy of tensor #{}, which \
                                 would lose its bytes: kept",
                                id.0
                            );
                        }
                        kept.insert(id);
                        continue;
                    }
                }
                // Nothing to write.
                let freed = self.release_device_copy(&mut state, id);
                Stats::add(&self.stats.unloaded_clean_bytes, freed);
                Stats::add(&self.stats.device_unloads, 1);
                outcome.clean_bytes += freed;
                outcome.freed_bytes += freed;
                break;
            }
            self.check(&mut state);
            let Some(moved) = moved else {
                continue;
            };
            drop(state);
            let (moved_id, before) = (moved.id, outcome.not_freed_bytes);
            self.move_off_device(moved, &mut outcome);
            if outcome.not_freed_bytes > before {
                // A failed move: the copy stays, and the next victims are tried.
                kept.insert(moved_id);
            }
        }
    }

    /// A new allocation of `len` bytes on `device` for tensor `id`: room made by unloading
    /// `victims`, the RAM reserve kept for a device in host memory, and the allocation made
    /// outside the lock (a device may map memory or wait on its stream).
    fn device_allocation(
        &self,
        device: &Arc<dyn Device>,
        device_id: DeviceId,
        victims: Victims,
        id: TensorId,
        name: &str,
        len: u64,
    ) -> Result<DeviceAlloc, StoreError> {
        self.make_device_room(device, device_id, victims, name, len)?;
        if device.in_host_memory() {
            // Its memory is the host's: keep the reserve as for a RAM copy.
            drop(self.admit(id, name, len, super::evict::Room::ReserveOnly)?);
        }
        device
            .allocate(len)
            .map_err(|err| allocation_error(err, name, &**device, len))
    }

    /// Unloads `victims` from the device until `len` bytes are free. When even unloading
    /// every one of them could not free that much, fails at once without unloading anything
    /// (a tensor that cannot fit must not empty the device for nothing).
    fn make_device_room(
        &self,
        device: &Arc<dyn Device>,
        device_id: DeviceId,
        victims: Victims,
        name: &str,
        len: u64,
    ) -> Result<(), StoreError> {
        let free = device.free_bytes();
        if free >= len {
            return Ok(());
        }
        let freeable: u64 = {
            let state = self.lock();
            self.device_candidates(&state, device_id, victims, None)
                .iter()
                .map(|c| c.len)
                .sum()
        };
        if free + freeable < len {
            return Err(StoreError::Memory(MemoryError::DeviceFull {
                name: name.to_owned(),
                device: device.name(),
                requested: len,
                available: free + freeable,
            }));
        }
        self.unload_from(device_id, victims, |_| device.free_bytes() >= len)?;
        Ok(())
    }

    /// Moves one dirty device copy's bytes to RAM (bytes reserved) or the spill file outside
    /// the lock, then commits.
    fn move_off_device(&self, moved: Move, outcome: &mut UnloadOutcome) {
        let Move {
            id,
            device,
            alloc: copy,
            to_ram,
        } = moved;
        let len = copy.len();
        let moved_bytes = super::unwinding(|| self.move_bytes(&device, &copy, to_ram))
            .unwrap_or((None, Some(Err(crate::spill::panicked("write")))));
        let (downloaded, spilled) = moved_bytes;
        drop(copy);
        let mut state = self.lock();
        if to_ram > 0 {
            state.unreserve(to_ram);
        }
        let gone = state.tensor(id).is_err();
        if let Ok(entry) = state.tensor_mut(id) {
            entry.busy = false;
        }
        match (downloaded, spilled) {
            (Some(buf), _) if !gone => {
                Stats::add(&self.stats.bytes_downloaded, len);
                state.install_ram(id, RamBuf::Aligned(buf));
                outcome.to_ram_bytes += len;
                self.commit_unload(&mut state, id, len, outcome);
            }
            (_, Some(Ok(extent))) if gone => self.spill.free(extent),
            (_, Some(Ok(extent))) => {
                Stats::add(&self.stats.bytes_downloaded, len);
                Stats::add(&self.stats.bytes_spilled, len);
                Stats::add(&self.stats.bytes_written, len);
                state.set_spilled(id, extent);
                outcome.to_spill_bytes += len;
                self.commit_unload(&mut state, id, len, outcome);
            }
            (_, Some(Err(err))) => {
                if let Ok(entry) = state.tensor(id) {
                    log::warn!(
                        "tensor `{}`: cannot unload from {}: {err}",
                        crate::text::Escaped(&entry.name),
                        device.name()
                    );
                }
                Stats::add(&self.stats.spill_failures, 1);
                outcome.not_freed_bytes += len;
            }
            _ => {}
        }
        self.check(&mut state);
        drop(state);
        self.changed.notify_all();
    }

    /// The I/O of [`Shared::move_off_device`], outside the lock: a download into a fresh RAM
    /// buffer when `to_ram` bytes are reserved for it, else (or when that fails) a stream into
    /// the spill file.
    #[allow(clippy::type_complexity)] // two outcomes, one of them optional
    fn move_bytes(
        &self,
        device: &Arc<dyn Device>,
        copy: &DeviceAlloc,
        to_ram: u64,
    ) -> (
        Option<crate::sys::AlignedBuf>,
        Option<Result<crate::spill::Extent, crate::spill::SpillError>>,
    ) {
        let len = copy.len();
        // A host that cannot give the buffer, or a failed download: streamed to the spill
        // file instead.
        let downloaded = (to_ram > 0)
            .then(|| {
                let mut buf = alloc("", len).ok()?;
                match device.download(copy, 0, buf.as_mut_slice()) {
                    Ok(()) => Some(buf),
                    Err(err) => {
                        log::warn!("download from {} failed: {err}", device.name());
                        None
                    }
                }
            })
            .flatten();
        if downloaded.is_some() {
            return (downloaded, None);
        }
        let spilled = self
            .spill
            .write_with(len, device.chunk_len(), |offset, buf| {
                device.download(copy, offset, buf)
            });
        (None, Some(spilled))
    }

    /// The bytes are safe elsewhere now: frees the device copy unless a guard pinned it
    /// meanwhile (then it keeps both).
    fn commit_unload(
        &self,
        state: &mut State,
        id: TensorId,
        len: u64,
        outcome: &mut UnloadOutcome,
    ) {
        if state.tensor(id).is_ok_and(|t| t.pins > 0) {
            outcome.pinned += 1;
            return;
        }
        self.release_device_copy(state, id);
        Stats::add(&self.stats.device_unloads, 1);
        outcome.freed_bytes += len;
    }

    /// Uploads a begun tensor's bytes from the copy chosen for it, then waits for the
    /// device. A file extent is read as `read` says when given (a stream chose and counted
    /// it already), else as [`Shared::file_read`] chooses. A panic is
    /// [`RestoreError::Panicked`].
    pub(super) fn fill_device(
        &self,
        pending: &DevicePending,
        read: Option<FileRead>,
    ) -> Result<(), StoreError> {
        let DevicePending {
            name,
            len,
            device,
            alloc,
            from,
            ..
        } = pending;
        super::unwinding(|| {
            match (from, read) {
                (CopySource::File(extent, _), Some(read)) => {
                    self.stream_file(&extent.source, extent.offset, name, device, alloc, read)
                }
                _ => self
                    .restore(name, *len, from, Target::Device { device, alloc })
                    .map(drop),
            }
            .and_then(|()| {
                device.synchronize().map_err(|source| {
                    StoreError::Restore(RestoreError::Device {
                        name: name.clone(),
                        source,
                    })
                })
            })
        })
        .unwrap_or_else(|| {
            Err(StoreError::Restore(RestoreError::Panicked {
                name: name.clone(),
            }))
        })
    }

    /// Frees a tensor's device copy without writing anything (the caller has made sure its
    /// bytes exist elsewhere, or they are stale).
    pub(super) fn release_device_copy(&self, state: &mut State, id: TensorId) -> u64 {
        let Some((device, copy)) = state.take_device(id) else {
            return 0;
        };
        let DeviceCopy { alloc, .. } = copy;
        let len = alloc.len();
        match Arc::try_unwrap(alloc) {
            Ok(alloc) => device.release(alloc),
            // Only a guard or a move holds another handle, and neither lets a copy be
            // released meanwhile (pins and `busy` are checked first).
            Err(_) => log::error!(
                "device copy of tensor #{} released while still shared",
                id.0
            ),
        }
        self.stats
            .device_bytes
            .fetch_sub(len, std::sync::atomic::Ordering::Relaxed);
        len
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
        self.shared.not_forked()?;
        self.shared.lock().device(device)
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
        spare: Option<ModelId>,
    ) -> Result<DeviceGuard, StoreError> {
        match self.begin_device(id, device_id, spare)? {
            DeviceBegun::Ready(guard) => Ok(guard),
            DeviceBegun::Pending(pending) => {
                let restored = self.shared.fill_device(&pending, None);
                self.finish_device(pending, restored)
            }
        }
    }

    /// The first half of a device acquire: the tensor's existing copy on `device_id` pinned,
    /// or a new allocation made (room made by unloading other copies, `spare`'s excepted,
    /// as the eviction rules say), the tensor pinned and the copy to upload from chosen. A
    /// [`DeviceBegun::Pending`] must be handed to [`Store::finish_device`].
    // One sequence of steps (find, move off another device, allocate, choose), each needing
    // the previous one's results: split, it would read worse.
    #[allow(clippy::too_many_lines)]
    pub(super) fn begin_device(
        &self,
        id: TensorId,
        device_id: DeviceId,
        spare: Option<ModelId>,
    ) -> Result<DeviceBegun, StoreError> {
        self.shared.not_forked()?;
        let (device, name, len, elsewhere) = {
            let mut state = self.shared.lock();
            let device = state.device(device_id)?;
            let entry = state.touch(id)?;
            if let Some(copy) = &entry.device
                && copy.device == device_id
            {
                let alloc = Arc::clone(&copy.alloc);
                entry.pins += 1;
                return Ok(DeviceBegun::Ready(self.device_guard(id, device, alloc)));
            }
            let elsewhere = entry.device.as_ref().map(|c| c.device);
            if elsewhere.is_some() && entry.pins > 0 {
                // A tensor has at most one device copy, and this one is in use.
                return Err(StoreError::Update(UpdateError::Pinned {
                    name: entry.name.clone(),
                    pins: entry.pins,
                }));
            }
            (device, entry.name.clone(), entry.len, elsewhere)
        };
        if let Some(other) = elsewhere {
            // Move it off the other device first.
            let outcome = self
                .shared
                .unload_from(other, Victims::Only(id), |o| o.freed_bytes > 0)?;
            if outcome.freed_bytes == 0 {
                // Not moved: gone already (another thread did it), pinned meanwhile, or its
                // bytes could go nowhere.
                let state = self.shared.lock();
                let entry = state.tensor(id)?;
                if entry.device.as_ref().is_some_and(|c| c.device == other) {
                    if entry.pins > 0 {
                        return Err(StoreError::Update(UpdateError::Pinned {
                            name,
                            pins: entry.pins,
                        }));
                    }
                    return Err(StoreError::Memory(MemoryError::DeviceFull {
                        name,
                        device: device.name(),
                        requested: len,
                        available: 0,
                    }));
                }
            }
        }
        let alloc = self.shared.device_allocation(
            &device,
            device_id,
            Victims::AllBut(spare, Some(id)),
            id,
            &name,
            len,
        )?;
        let chosen = {
            let mut state = self.shared.lock_idle(id);
            let entry = match state.tensor(id) {
                Ok(entry) => entry,
                Err(err) => {
                    drop(state);
                    device.release(alloc);
                    return Err(err);
                }
            };
            match &entry.device {
                // Another thread uploaded it meanwhile.
                Some(copy) if copy.device == device_id => {
                    let existing = Arc::clone(&copy.alloc);
                    state.pin(id)?;
                    Err(Ok(existing))
                }
                Some(_) => Err(Err(StoreError::Update(UpdateError::Pinned {
                    name: name.clone(),
                    pins: entry.pins,
                }))),
                None => match CopySource::of(&state, entry, Tier::Device) {
                    Ok(from) => {
                        let entry = state.pin(id)?;
                        if from.reads_spill() {
                            entry.spill_readers += 1;
                        }
                        Ok(from)
                    }
                    Err(err) => Err(Err(err)),
                },
            }
        };
        match chosen {
            Ok(from) => Ok(DeviceBegun::Pending(DevicePending {
                id,
                device_id,
                device,
                name,
                len,
                alloc,
                from,
            })),
            Err(found) => {
                device.release(alloc);
                found.map(|existing| DeviceBegun::Ready(self.device_guard(id, device, existing)))
            }
        }
    }

    /// The second half of a device acquire: installs the uploaded copy and returns its
    /// guard, or undoes [`Store::begin_device`] (allocation, pin) and returns the error.
    pub(super) fn finish_device(
        &self,
        pending: DevicePending,
        restored: Result<(), StoreError>,
    ) -> Result<DeviceGuard, StoreError> {
        let DevicePending {
            id,
            device_id,
            device,
            name,
            len,
            alloc,
            from,
        } = pending;
        let (reads_spill, reads_file) = (from.reads_spill(), from.reads_file());
        drop(from);
        let mut state = self.shared.lock();
        if reads_spill {
            state.end_spill_read(id);
        }
        if let Err(err) = restored {
            device.release(alloc);
            state.unpin(id);
            self.shared.check(&mut state);
            return Err(err);
        }
        if reads_file {
            state.count_file_restore(id);
        }
        Stats::add(&self.shared.stats.bytes_uploaded, len);
        let entry = state.tensor_mut(id)?;
        if let Some(copy) = &entry.device {
            // Another thread uploaded it meanwhile: keep that copy if it is on this device,
            // else give up ours (a tensor has one device copy at a time).
            let same = copy.device == device_id;
            let existing = Arc::clone(&copy.alloc);
            device.release(alloc);
            if same {
                return Ok(self.device_guard(id, device, existing));
            }
            entry.pins -= 1;
            return Err(StoreError::Update(UpdateError::Pinned {
                name,
                pins: entry.pins,
            }));
        }
        let alloc = state.set_device(id, device_id, alloc);
        Stats::add(&self.shared.stats.device_bytes, len);
        self.shared.check(&mut state);
        Ok(self.device_guard(id, device, alloc))
    }

    fn device_guard(
        &self,
        id: TensorId,
        device: Arc<dyn Device>,
        alloc: Arc<DeviceAlloc>,
    ) -> DeviceGuard {
        DeviceGuard {
            shared: Arc::clone(&self.shared),
            id,
            device,
            alloc: Some(alloc),
        }
    }

    /// Loads a model onto a device within `budget` bytes (all of it when `None`): tensors are
    /// uploaded in name order while they fit; the rest stay on the host and are uploaded when
    /// acquired (like ComfyUI's low-VRAM mode). Other models' copies are unloaded in policy
    /// order to make room; this model's own are not.
    ///
    /// The tensors go as one stream ([`DeviceStream`]): while one tensor's windows are
    /// uploaded, the `O_DIRECT` reads of the next ones are in flight. A tensor the device has
    /// no room for ([`MemoryError::DeviceFull`], or [`MemoryError::UnderReserve`] for a device
    /// in host memory) stays on the host; any other error ends the load and is returned (the
    /// tensors loaded before it stay on the device, those begun after it are undone).
    pub fn load(
        &self,
        model: ModelId,
        device: DeviceId,
        budget: Option<u64>,
    ) -> Result<LoadOutcome, StoreError> {
        self.shared.not_forked()?;
        let ids = self.tensors(model)?;
        let mut stream = DeviceStream::new(self, ids, device, Some(model), budget);
        let mut outcome = LoadOutcome::default();
        while let Some(placed) = stream.next_placed() {
            match placed {
                Placed::Tensor {
                    len,
                    result: Ok(guard),
                } => {
                    drop(guard);
                    outcome.device_tensors += 1;
                    outcome.device_bytes += len;
                }
                // Past the budget; or refused by the device, or to keep the RAM reserve
                // (a device in host memory).
                Placed::Host { len }
                | Placed::Tensor {
                    len,
                    result:
                        Err(StoreError::Memory(
                            MemoryError::DeviceFull { .. } | MemoryError::UnderReserve { .. },
                        )),
                } => {
                    outcome.host_tensors += 1;
                    outcome.host_bytes += len;
                }
                Placed::Tensor {
                    result: Err(err), ..
                } => return Err(err),
            }
        }
        outcome.stream = stream.stats();
        Ok(outcome)
    }

    /// Replaces a tensor's bytes on `device` (after patching it there, say with a LoRA): the
    /// device copy becomes the tensor's only copy and the tensor is dirty. RAM and spill copies
    /// are dropped. Fails while a guard pins it; on error the tensor is unchanged.
    ///
    /// The bytes go to a new allocation on the device first, which takes the old copy's place
    /// only once written: a reader of the old copy never sees them half-written, and an unload
    /// meanwhile moves the old bytes, not the new ones.
    pub fn replace_on_device(
        &self,
        id: TensorId,
        device_id: DeviceId,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.shared.not_forked()?;
        let (device, name, len) = {
            let state = self.shared.lock_idle(id);
            let device = state.device(device_id)?;
            let entry = state.unpinned(id)?;
            super::check_len(&entry.name, entry.dtype, &entry.shape, bytes.len() as u64)?;
            (device, entry.name.clone(), entry.len)
        };
        let alloc = self.shared.device_allocation(
            &device,
            device_id,
            Victims::AllBut(None, Some(id)),
            id,
            &name,
            len,
        )?;
        let written = device
            .upload(&alloc, 0, bytes)
            .and_then(|()| device.synchronize())
            .map_err(|source| {
                StoreError::Restore(RestoreError::Device {
                    name: name.clone(),
                    source,
                })
            });
        if let Err(err) = written {
            device.release(alloc);
            return Err(err);
        }
        Stats::add(&self.shared.stats.bytes_uploaded, len);
        let mut state = self.shared.lock_idle(id);
        if let Err(err) = state.unpinned(id).map(drop) {
            device.release(alloc);
            return Err(err);
        }
        self.shared.release_device_copy(&mut state, id);
        state.set_device(id, device_id, alloc);
        Stats::add(&self.shared.stats.device_bytes, len);
        self.commit_device_change(&mut state, id, device_id)
    }

    /// Records that the bytes of `guard`'s device copy were changed in place — by a kernel
    /// through `CudaDevice::device_ptr` (the `cuda` feature), or through
    /// [`SimDevice::with_bytes_mut`](crate::SimDevice::with_bytes_mut) — so that the device
    /// copy is now the tensor's only copy: the tensor becomes dirty, its RAM copy and spill
    /// extent are dropped (they hold the old bytes), and an unload later moves the new bytes
    /// to RAM or the spill file instead of dropping them. Patching a tensor on the device
    /// this way costs no transfer at all:
    ///
    /// ```no_run
    /// # fn patch(store: &lowtide::Store, id: lowtide::TensorId, dev: lowtide::DeviceId)
    /// # -> Result<(), Box<dyn std::error::Error>> {
    /// let guard = store.acquire_device(id, dev)?;
    /// if let Some(sim) = guard.device().downcast_ref::<lowtide::SimDevice>() {
    ///     sim.with_bytes_mut(guard.alloc(), |bytes| bytes.fill(0))?;
    /// }
    /// store.mark_dirty_on_device(&guard)?;
    /// # Ok(()) }
    /// ```
    ///
    /// Call it while the guard still lives, and with no other guard of the tensor alive
    /// (another holder would be reading bytes that changed under it): otherwise
    /// [`UpdateError::Pinned`], and the store still takes the tensor for its old bytes — the
    /// caller must not have written them then.
    pub fn mark_dirty_on_device(&self, guard: &DeviceGuard) -> Result<(), StoreError> {
        self.shared.not_forked()?;
        let mut state = self.shared.lock_idle(guard.id);
        let entry = state.tensor(guard.id)?;
        if entry.pins != 1 {
            return Err(StoreError::Update(UpdateError::Pinned {
                name: entry.name.clone(),
                pins: entry.pins - 1,
            }));
        }
        let device = state
            .devices
            .iter()
            .position(|d| Arc::ptr_eq(d, &guard.device))
            .map(|i| DeviceId(i as u32))
            .ok_or(StoreError::Handle(HandleError::UnknownDevice {
                device: u32::MAX,
            }))?;
        self.commit_device_change(&mut state, guard.id, device)
    }

    /// The tensor's bytes changed on `device`: its device copy there is now its only copy.
    fn commit_device_change(
        &self,
        state: &mut MutexGuard<'_, State>,
        id: TensorId,
        device: DeviceId,
    ) -> Result<(), StoreError> {
        if state.tensor(id)?.device.as_ref().map(|c| c.device) != Some(device) {
            // Unloaded meanwhile (the bytes written were moved off with it): nothing is lost,
            // but the change is not where the caller wrote it.
            let entry = state.tensor(id)?;
            return Err(StoreError::Restore(RestoreError::NoCopy {
                name: entry.name.clone(),
                tier: Tier::Device,
            }));
        }
        let released = state.drop_clean(id, false);
        self.shared.record_drop(released);
        state.free_ram(id);
        state.make_dirty(id)?;
        state.touch(id)?;
        self.shared.check(state);
        Ok(())
    }

    /// Frees at least `bytes` of device memory held by `model`'s tensors (on every device), in
    /// policy order, never a pinned copy. See the module docs for what is written.
    pub fn unload(&self, model: ModelId, bytes: u64) -> Result<UnloadOutcome, StoreError> {
        self.shared.not_forked()?;
        let devices = {
            let state = self.shared.lock();
            state.model(model)?;
            state.devices.len() as u32
        };
        let mut outcome = UnloadOutcome::default();
        for device in 0..devices {
            let done = self
                .shared
                .unload_from(DeviceId(device), Victims::Of(model), |o| {
                    outcome.freed_bytes + o.freed_bytes >= bytes
                })?;
            outcome.add(done);
        }
        let mut state = self.shared.lock();
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
    pub fn unload_all(&self, model: ModelId) -> Result<UnloadOutcome, StoreError> {
        self.unload(model, u64::MAX)
    }
}

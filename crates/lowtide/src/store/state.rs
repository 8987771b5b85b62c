//! The registry behind the store's lock: models, tensors, their copies and the accounting.
//!
//! Every change of a tensor's copies goes through a transition method here (`install_ram`,
//! `take_ram`, `set_spilled`, `free_spilled`, `set_device`, `take_device`, `make_dirty`,
//! `make_clean`), and only those methods touch the byte counters (`anon`, `reserved`), so the
//! accounting cannot drift from the copies. Pins change through `pin` and `unpin`, or by
//! `pins += 1` on the entry an acquire has just looked up under the same lock.
//!
//! Invariants (checked after every operation in `strict` builds): `anon` equals the sum of
//! the lengths of all RAM copies; `anon + reserved + pooled + being freed` never exceeds the
//! budget; a dirty tensor always has a copy somewhere or a recipe; only dirty tensors have
//! spill extents.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::error::{HandleError, UpdateError};
use super::ram::RamBuf;
use super::release::Releaser;
use super::{Recipe, StoreError};
use crate::device::{Device, DeviceAlloc};
use crate::dtype::Dtype;
use crate::ids::{DeviceId, ModelId, TensorId};
use crate::policy::{Candidate, Evicting, Priority, restore_cost};
use crate::source::Source;
use crate::spill::{Extent, SpillFile};
use crate::sys::AlignedBuf;

/// A tensor's extent in its model file.
#[derive(Debug, Clone)]
pub(super) struct FileExtent {
    pub(super) source: Arc<Source>,
    pub(super) offset: u64,
}

/// A tensor's bytes on a device.
#[derive(Debug)]
pub(super) struct DeviceCopy {
    pub(super) device: DeviceId,
    pub(super) alloc: Arc<DeviceAlloc>,
}

#[derive(Debug)]
pub(super) struct TensorEntry {
    pub(super) model: ModelId,
    pub(super) name: String,
    pub(super) dtype: Dtype,
    pub(super) shape: Arc<[usize]>,
    pub(super) len: u64,
    /// The file extent the tensor was opened from, kept after patching so that it can be
    /// reverted to its original bytes without writing anything.
    pub(super) base: Option<FileExtent>,
    /// The bytes equal `base` (which is then `Some`): they can always be restored from it.
    pub(super) clean: bool,
    pub(super) ram: Option<Arc<RamBuf>>,
    /// The mapped pages were faulted in by lowtide and not released since.
    pub(super) mapped: bool,
    /// A dirty tensor's bytes in the spill file.
    pub(super) spilled: Option<Extent>,
    /// How to recompute a dirty tensor instead of spilling it.
    pub(super) recipe: Option<Recipe>,
    /// A copy in device memory.
    pub(super) device: Option<DeviceCopy>,
    pub(super) pins: u32,
    pub(super) last_use: u64,
    /// The byte clock ([`State::used_bytes`]) at its last use; `None` before the first.
    pub(super) used_at: Option<u64>,
    /// Bytes of tensors used between its last two uses (`None`: used once so far).
    pub(super) reuse_distance: Option<u64>,
    /// GreedyDual credit (see `policy`).
    pub(super) credit: f64,
    /// An eviction is moving this tensor's bytes outside the lock (a spill write, a device
    /// download): no other eviction takes it, and changes of its bytes wait for it.
    pub(super) busy: bool,
    /// Restores reading its spill extent outside the lock: the extent stays until they end.
    pub(super) spill_readers: u32,
    /// Extents this tensor no longer uses (its bytes changed) that restores still read: freed
    /// when the last of them ends.
    pub(super) retired: Vec<Extent>,
    /// Completed restores from its model file so far (RAM or device): from the second on, the
    /// tensor is streamed repeatedly, which `reread` may keep in the page cache.
    pub(super) file_restores: u32,
}

impl TensorEntry {
    pub(super) fn new(
        model: ModelId,
        name: String,
        dtype: Dtype,
        shape: Arc<[usize]>,
        len: u64,
    ) -> Self {
        Self {
            model,
            name,
            dtype,
            shape,
            len,
            base: None,
            clean: false,
            ram: None,
            mapped: false,
            spilled: None,
            recipe: None,
            device: None,
            pins: 0,
            last_use: 0,
            used_at: None,
            reuse_distance: None,
            credit: 0.0,
            busy: false,
            spill_readers: 0,
            retired: Vec::new(),
            file_restores: 0,
        }
    }

    pub(super) fn is_clean(&self) -> bool {
        self.clean
    }

    /// The file extent a clean tensor's bytes equal.
    pub(super) fn clean_extent(&self) -> Option<&FileExtent> {
        self.base.as_ref().filter(|_| self.clean)
    }

    /// Cost per byte of bringing the bytes back after evicting the RAM copy.
    pub(super) fn restore_cost(&self) -> f64 {
        restore_cost(
            self.is_clean(),
            self.recipe.as_ref().map(Recipe::cost_per_byte),
        )
    }

    /// Records a use at logical time `now` (`used`: the byte clock) with inflation
    /// `inflation`. A use while the tensor is pinned continues the use that pinned it (a
    /// stream's lease, then the caller's own acquire): it refreshes recency but is not a
    /// new use for the loop distance.
    pub(super) fn touch(&mut self, now: u64, used: u64, inflation: f64) {
        self.last_use = now;
        if self.pins == 0 {
            if let Some(before) = self.used_at {
                self.reuse_distance = Some(used - before);
            }
            self.used_at = Some(used);
        }
        self.credit = inflation + self.restore_cost();
    }

    /// The bytes survive somewhere other than RAM.
    pub(super) fn recoverable_without_ram(&self) -> bool {
        self.is_clean() || self.spilled.is_some() || self.recipe.is_some() || self.device.is_some()
    }
}

#[derive(Debug)]
pub(super) struct ModelEntry {
    pub(super) path: PathBuf,
    pub(super) priority: Priority,
    pub(super) tensors: Vec<TensorId>,
    pub(super) by_name: HashMap<String, TensorId>,
    /// The bytes of its tensors in its files: what keeping the whole model in the page cache
    /// takes (see `reread`).
    pub(super) file_bytes: u64,
}

/// Bytes freed by dropping clean copies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropOutcome {
    /// Bytes of RAM copies freed.
    pub ram_bytes: u64,
    /// Bytes of mapped pages released.
    pub mapped_bytes: u64,
    /// Tensors skipped because a guard pins them or they are dirty (their only copy).
    pub kept: u32,
}

impl std::ops::AddAssign for DropOutcome {
    fn add_assign(&mut self, other: Self) {
        self.ram_bytes += other.ram_bytes;
        self.mapped_bytes += other.mapped_bytes;
        self.kept += other.kept;
    }
}

pub(super) struct State {
    pub(super) models: Vec<Option<ModelEntry>>,
    pub(super) tensors: Vec<Option<TensorEntry>>,
    /// Sum of RAM copy lengths.
    pub(super) anon: u64,
    /// Bytes promised to RAM copies being read right now (outside the lock).
    pub(super) reserved: u64,
    /// Logical clock for recency.
    pub(super) clock: u64,
    /// Byte clock: bytes of tensors used so far (each use of an unpinned tensor adds its
    /// length), which measures how far apart two uses of a tensor are in the terms a budget
    /// is set in.
    pub(super) used_bytes: u64,
    /// GreedyDual inflation value `L`: the credit of the last evicted copy.
    pub(super) inflation: f64,
    /// Devices added with `Store::add_device`, indexed by `DeviceId`.
    pub(super) devices: Vec<Arc<dyn Device>>,
    /// Buffers of RAM copies evicted to make room within the budget, kept for the restores
    /// that follow: their pages are already touched, so reusing them avoids the cost of fresh
    /// memory. Counted against the budget (`anon + reserved + pool_bytes <= budget`); flushed
    /// when the governor needs memory back.
    /// Each with the length of the copy it held, which is what it counts as (like `anon`,
    /// which counts copies' lengths, not their block padding).
    pub(super) pool: Vec<(AlignedBuf, u64)>,
    /// Sum of the pooled buffers' counted lengths.
    pub(super) pool_bytes: u64,
    /// Frees copies dropped on purpose in the background; what it holds counts against the
    /// budget until it is freed (`anon + reserved + pool_bytes + pending <= budget`).
    pub(super) releaser: Arc<Releaser>,
    /// The spill file, to free extents whose tensor no longer needs them (its own small lock
    /// is taken after this one).
    pub(super) spill: Arc<SpillFile>,
}

/// RAM copies smaller than this are not pooled (the allocator reuses small blocks itself).
const POOL_MIN: u64 = 1 << 20;

impl State {
    pub(super) fn new(spill: Arc<SpillFile>) -> Self {
        Self {
            models: Vec::new(),
            tensors: Vec::new(),
            anon: 0,
            reserved: 0,
            clock: 0,
            used_bytes: 0,
            inflation: 0.0,
            devices: Vec::new(),
            pool: Vec::new(),
            pool_bytes: 0,
            releaser: Arc::default(),
            spill,
        }
    }

    pub(super) fn tensor(&self, id: TensorId) -> Result<&TensorEntry, StoreError> {
        self.tensors
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .ok_or(StoreError::Handle(HandleError::UnknownTensor {
                tensor: id.0,
            }))
    }

    pub(super) fn tensor_mut(&mut self, id: TensorId) -> Result<&mut TensorEntry, StoreError> {
        self.tensors
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(StoreError::Handle(HandleError::UnknownTensor {
                tensor: id.0,
            }))
    }

    pub(super) fn model(&self, id: ModelId) -> Result<&ModelEntry, StoreError> {
        self.models
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .ok_or(StoreError::Handle(HandleError::UnknownModel {
                model: id.0,
            }))
    }

    pub(super) fn device(&self, device: DeviceId) -> Result<Arc<dyn Device>, StoreError> {
        self.devices
            .get(device.0 as usize)
            .cloned()
            .ok_or(StoreError::Handle(HandleError::UnknownDevice {
                device: device.0,
            }))
    }

    /// Tensors registered now, with their ids.
    pub(super) fn entries(&self) -> impl Iterator<Item = (TensorId, &TensorEntry)> {
        self.tensors
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (TensorId(i as u32), t)))
    }

    /// How the policy sees `t`'s `copy` as an eviction candidate; `capacity` is the bytes the
    /// tier it leaves can hold (the RAM budget, the device's memory).
    pub(super) fn candidate(
        &self,
        id: TensorId,
        t: &TensorEntry,
        copy: Evicting,
        ram_room: bool,
        capacity: u64,
    ) -> Candidate {
        Candidate {
            tensor: id,
            priority: self.model(t.model).map(|m| m.priority).unwrap_or_default(),
            last_use: t.last_use,
            reuse_distance: t.reuse_distance,
            since_use: t.used_at.map_or(self.used_bytes, |at| self.used_bytes - at),
            capacity,
            credit: t.credit,
            len: t.len,
            clean: t.is_clean(),
            copy,
            spilled: t.spilled.is_some(),
            in_ram: t.ram.is_some(),
            on_device: t.device.is_some(),
            recipe_cost: t.recipe.as_ref().map(Recipe::cost_per_byte),
            ram_room,
        }
    }

    /// Records a use of `id` now.
    pub(super) fn touch(&mut self, id: TensorId) -> Result<&mut TensorEntry, StoreError> {
        self.clock += 1;
        let (now, used, inflation) = (self.clock, self.used_bytes, self.inflation);
        let (len, pins) = self.tensor(id).map(|entry| (entry.len, entry.pins))?;
        if pins == 0 {
            self.used_bytes = used.saturating_add(len.max(1));
        }
        let entry = self.tensor_mut(id)?;
        entry.touch(now, used, inflation);
        Ok(entry)
    }

    /// Pins `id`: none of its copies is evicted until [`State::unpin`].
    pub(super) fn pin(&mut self, id: TensorId) -> Result<&mut TensorEntry, StoreError> {
        let entry = self.tensor_mut(id)?;
        entry.pins += 1;
        Ok(entry)
    }

    pub(super) fn unpin(&mut self, id: TensorId) {
        if let Ok(entry) = self.tensor_mut(id) {
            entry.pins = entry.pins.saturating_sub(1);
        }
    }

    /// Fails while a guard pins `id`.
    pub(super) fn unpinned(&self, id: TensorId) -> Result<&TensorEntry, StoreError> {
        let entry = self.tensor(id)?;
        if entry.pins > 0 {
            return Err(StoreError::Update(UpdateError::Pinned {
                name: entry.name.clone(),
                pins: entry.pins,
            }));
        }
        Ok(entry)
    }

    /// Promises `len` bytes to a RAM copy being filled outside the lock.
    pub(super) fn reserve(&mut self, len: u64) {
        self.reserved += len;
    }

    pub(super) fn unreserve(&mut self, len: u64) {
        self.reserved -= len;
    }

    /// Gives `id` the RAM copy `buf` (counted from now on), unless it has one already: then
    /// that one is kept and returned, and `buf` is freed.
    pub(super) fn install_ram(&mut self, id: TensorId, buf: RamBuf) -> Arc<RamBuf> {
        let Some(Some(entry)) = self.tensors.get_mut(id.0 as usize) else {
            return Arc::new(buf);
        };
        if let Some(existing) = &entry.ram {
            return Arc::clone(existing);
        }
        let buf = Arc::new(buf);
        entry.ram = Some(Arc::clone(&buf));
        self.anon += buf.len();
        buf
    }

    /// Takes a tensor's RAM copy out of the entry and the accounting.
    pub(super) fn take_ram(&mut self, id: TensorId) -> Option<Arc<RamBuf>> {
        let buf = self.tensors.get_mut(id.0 as usize)?.as_mut()?.ram.take()?;
        self.anon -= buf.len();
        Some(buf)
    }

    /// Frees a tensor's RAM copy now. Returns the bytes freed.
    pub(super) fn free_ram(&mut self, id: TensorId) -> u64 {
        self.take_ram(id).map_or(0, |buf| buf.len())
    }

    /// Hands a tensor's RAM copy to the releaser (freed in the background, counted as
    /// pending until then). Returns its length.
    pub(super) fn release_ram(&mut self, id: TensorId) -> u64 {
        self.take_ram(id).map_or(0, |buf| {
            let len = buf.len();
            self.releaser.release(buf);
            len
        })
    }

    /// Like [`State::free_ram`], but keeps the copy's buffer in the pool when it is large and
    /// no guard still shares it, and the budget has room for it.
    pub(super) fn recycle_ram(&mut self, id: TensorId, budget: u64) -> u64 {
        let Some(buf) = self.take_ram(id) else {
            return 0;
        };
        let len = buf.len();
        let buf = if len >= POOL_MIN {
            match Arc::try_unwrap(buf) {
                Ok(RamBuf::Aligned(buf)) => Err(buf),
                Ok(RamBuf::Direct(buf)) => Err(buf.into_inner()),
                Ok(owned) => Ok(Arc::new(owned)),
                Err(shared) => Ok(shared),
            }
        } else {
            Ok(buf)
        };
        match buf {
            Err(buf) => {
                // Counted as the copy was (its tensor's bytes): the copy's room passes to the
                // pool as it is. Counting the few KiB of block padding too would put a full
                // budget over by them, and `trim_pool` would free the buffer at once: no
                // restore under a full budget would ever reuse one.
                self.pool_bytes += len;
                self.pool.push((buf, len));
            }
            // Not poolable: freed in the background, not under the registry lock.
            Ok(buf) => self.releaser.release(buf),
        }
        self.trim_pool(budget);
        len
    }

    /// Records that the spill file holds `id`'s bytes in `extent` (freeing any older one).
    pub(super) fn set_spilled(&mut self, id: TensorId, extent: Extent) {
        let spill = Arc::clone(&self.spill);
        match self.tensor_mut(id) {
            Ok(entry) => {
                if let Some(old) = entry.spilled.replace(extent) {
                    Self::retire(&spill, entry, old);
                }
            }
            Err(_) => spill.free(extent),
        }
    }

    /// Frees `id`'s spill extent (its bytes changed, or it is clean again). One that a restore
    /// is still reading is retired instead, and freed when the last such restore ends (see
    /// [`State::end_spill_read`]).
    pub(super) fn free_spilled(&mut self, id: TensorId) {
        let spill = Arc::clone(&self.spill);
        if let Ok(entry) = self.tensor_mut(id)
            && let Some(extent) = entry.spilled.take()
        {
            Self::retire(&spill, entry, extent);
        }
    }

    fn retire(spill: &SpillFile, entry: &mut TensorEntry, extent: Extent) {
        if entry.spill_readers == 0 {
            spill.free(extent);
        } else {
            entry.retired.push(extent);
        }
    }

    /// Frees the spill extents of tensors that also have a RAM copy (unchanged since it was
    /// read from the extent) and that no restore reads: the spill file needs the room for
    /// bytes held nowhere else. Returns how many were freed.
    pub(super) fn free_redundant_spills(&mut self) -> usize {
        let spill = Arc::clone(&self.spill);
        let mut freed = 0;
        for entry in self.tensors.iter_mut().flatten() {
            if entry.ram.is_some()
                && entry.spill_readers == 0
                && let Some(extent) = entry.spilled.take()
            {
                spill.free(extent);
                freed += 1;
            }
        }
        freed
    }

    /// A restore from `id`'s spill extent ended. The extent stays with the tensor while its
    /// bytes are unchanged: evicting the RAM copy again then drops it, writing nothing (a
    /// write through `replace` or `mark_dirty` frees the extent, `make_dirty`). Extents
    /// retired meanwhile are freed by the last restore that read them.
    pub(super) fn end_spill_read(&mut self, id: TensorId) {
        let spill = Arc::clone(&self.spill);
        let Ok(entry) = self.tensor_mut(id) else {
            return;
        };
        entry.spill_readers -= 1;
        if entry.spill_readers == 0 {
            for extent in entry.retired.drain(..) {
                spill.free(extent);
            }
        }
    }

    /// Gives `id` the device copy `alloc` on `device` (it must have none).
    pub(super) fn set_device(
        &mut self,
        id: TensorId,
        device: DeviceId,
        alloc: DeviceAlloc,
    ) -> Arc<DeviceAlloc> {
        let alloc = Arc::new(alloc);
        if let Ok(entry) = self.tensor_mut(id) {
            debug_assert!(entry.device.is_none(), "one device copy at a time");
            entry.device = Some(DeviceCopy {
                device,
                alloc: Arc::clone(&alloc),
            });
        }
        alloc
    }

    /// Takes `id`'s device copy out of the entry; the caller frees it on its device.
    pub(super) fn take_device(&mut self, id: TensorId) -> Option<(Arc<dyn Device>, DeviceCopy)> {
        let copy = self.tensor_mut(id).ok()?.device.take()?;
        let device = self.devices.get(copy.device.0 as usize).cloned()?;
        Some((device, copy))
    }

    /// The tensor's bytes changed: its file pages, recipe and spill extent no longer hold
    /// them. The caller installs the new copy.
    pub(super) fn make_dirty(&mut self, id: TensorId) -> Result<(), StoreError> {
        let entry = self.tensor_mut(id)?;
        if std::mem::take(&mut entry.mapped)
            && let Some(base) = &entry.base
        {
            base.source.release(base.offset, entry.len);
        }
        entry.clean = false;
        entry.recipe = None;
        self.free_spilled(id);
        Ok(())
    }

    /// The tensor's bytes are its file's again: every other copy is stale and must already be
    /// gone (the caller freed RAM and device copies).
    pub(super) fn make_clean(&mut self, id: TensorId) -> Result<(), StoreError> {
        self.free_spilled(id);
        let entry = self.tensor_mut(id)?;
        debug_assert!(entry.ram.is_none() && entry.device.is_none());
        entry.clean = entry.base.is_some();
        entry.recipe = None;
        entry.mapped = false;
        Ok(())
    }

    /// Takes a pooled buffer of at least `len` bytes and at most 1/16 more, if there is one.
    pub(super) fn take_pooled(&mut self, len: u64) -> Option<AlignedBuf> {
        let fits = |b: &AlignedBuf| {
            let cap = b.as_slice().len() as u64;
            cap >= len && cap <= len + len / 16
        };
        let best = self
            .pool
            .iter()
            .enumerate()
            .filter(|(_, (b, _))| fits(b))
            .min_by_key(|(_, (b, _))| b.as_slice().len())
            .map(|(i, _)| i)?;
        let (buf, counted) = self.pool.swap_remove(best);
        self.pool_bytes -= counted;
        Some(buf)
    }

    /// Frees pooled buffers (oldest first) until copies, reservations and the pool fit the
    /// budget.
    pub(super) fn trim_pool(&mut self, budget: u64) {
        let pending = self.releaser.pending();
        while self.anon + self.reserved + self.pool_bytes + pending > budget
            && !self.pool.is_empty()
        {
            let (_, counted) = self.pool.remove(0);
            self.pool_bytes -= counted;
        }
    }

    /// Hands every pooled buffer to the releaser; returns the bytes given back.
    pub(super) fn flush_pool(&mut self) -> u64 {
        let bytes = self.pool_bytes;
        for (buf, _) in self.pool.drain(..) {
            self.releaser.release(Arc::new(RamBuf::Aligned(buf)));
        }
        self.pool_bytes = 0;
        bytes
    }

    /// Drops the clean copies of an unpinned tensor: frees its RAM copy (in the background
    /// with `background`: only where nothing is allocated in the same operation, which
    /// counts on the room) and releases its mapped pages. Dirty tensors and pinned ones are
    /// left alone. Nothing is written.
    pub(super) fn drop_clean(&mut self, id: TensorId, background: bool) -> DropOutcome {
        let Some(Some(entry)) = self.tensors.get_mut(id.0 as usize) else {
            return DropOutcome::default();
        };
        if entry.pins > 0 {
            return DropOutcome {
                kept: 1,
                ..DropOutcome::default()
            };
        }
        let Some(FileExtent { source, offset }) = entry.clean_extent().cloned() else {
            let kept = u32::from(entry.ram.is_some());
            return DropOutcome {
                kept,
                ..DropOutcome::default()
            };
        };
        let mapped_bytes = if std::mem::take(&mut entry.mapped) {
            source.release(offset, entry.len)
        } else {
            0
        };
        let ram_bytes = if background {
            self.release_ram(id)
        } else {
            self.free_ram(id)
        };
        DropOutcome {
            ram_bytes,
            mapped_bytes,
            kept: 0,
        }
    }

    /// Records a completed restore of `id` from its model file (see `reread`).
    pub(super) fn count_file_restore(&mut self, id: TensorId) {
        if let Ok(entry) = self.tensor_mut(id) {
            entry.file_restores = entry.file_restores.saturating_add(1);
        }
    }

    /// Releases the mapped pages of unpinned tensors of idle models. Returns bytes released.
    pub(super) fn release_idle_mapped(&mut self) -> u64 {
        let idle: Vec<TensorId> = self
            .entries()
            .filter(|(_, t)| t.mapped && t.pins == 0)
            .filter(|(_, t)| {
                self.model(t.model)
                    .is_ok_and(|m| m.priority == Priority::Idle)
            })
            .map(|(id, _)| id)
            .collect();
        let mut released = 0;
        for id in idle {
            let Ok(entry) = self.tensor_mut(id) else {
                continue;
            };
            if let Some(FileExtent { source, offset }) = entry.clean_extent().cloned() {
                released += source.release(offset, entry.len);
                entry.mapped = false;
            }
        }
        released
    }

    /// Panics if the accounting disagrees with the copies held (`strict` builds call this
    /// after every operation).
    pub(super) fn assert_invariants(&self, budget: u64) {
        let sum: u64 = self
            .tensors
            .iter()
            .flatten()
            .filter_map(|t| t.ram.as_ref())
            .map(|b| b.len())
            .sum();
        assert_eq!(
            self.anon, sum,
            "accounted anonymous bytes != sum of RAM copies"
        );
        let pending = self.releaser.pending();
        assert!(
            self.anon + self.reserved + self.pool_bytes + pending <= budget,
            "anonymous bytes {} (+{} reserved, +{} pooled, +{pending} being freed) over the \
             budget {budget}",
            self.anon,
            self.reserved,
            self.pool_bytes
        );
        assert_eq!(
            self.pool_bytes,
            self.pool.iter().map(|(_, counted)| counted).sum::<u64>(),
            "pooled bytes != sum of pooled buffers"
        );
        for t in self.tensors.iter().flatten() {
            if let Some(buf) = &t.ram {
                assert_eq!(
                    buf.len(),
                    t.len,
                    "RAM copy of `{}` has the wrong length",
                    t.name
                );
            }
            assert!(
                t.ram.is_some() || t.recoverable_without_ram(),
                "dirty tensor `{}` has no copy",
                t.name
            );
            assert!(
                t.spilled.is_none() || !t.is_clean(),
                "clean tensor `{}` was spilled",
                t.name
            );
            assert!(
                !t.clean || t.base.is_some(),
                "clean tensor `{}` has no file extent",
                t.name
            );
        }
    }
}

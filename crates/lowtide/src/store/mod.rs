//! The store: models, tensors, their copies, guards, the budget and the spill file.
//!
//! One lock guards the registry (`State`); file reads (page faults, `pread`, spill restores)
//! happen outside it while the tensor is pinned, so threads working on different tensors do
//! not wait on each other's disk reads. Spill writes happen during eviction, under the lock.
//! Lock order: registry, then spill file.

mod builder;
mod device;
mod error;
mod evict;
mod guard;
mod prefetch;
mod release;
mod state;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub use builder::StoreBuilder;
pub use device::{DeviceGuard, DeviceId, LoadOutcome, UnloadOutcome};
pub use error::{ConfigError, StoreError};
pub use evict::FreeOutcome;
pub use guard::TensorGuard;
pub use prefetch::{Prefetch, PrefetchOutcome};
pub use state::DropOutcome;

use crate::dtype::Dtype;
use crate::governor::{EvictReason, Governor, MemoryReading, Monitor};
use crate::policy::{EvictionPolicy, Priority};
use crate::source::ModelFiles;
use crate::spill::{SpillError, SpillFile};
use crate::stats::{Stats, StatsSnapshot};
use crate::sys::AlignedBuf;
use crate::sys::direct::DirectBuf;
use guard::View;
pub use state::TensorBytes;
use state::{ModelEntry, Origin, RamBuf, State, TensorEntry};

/// A model opened in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(u32);

/// A tensor registered in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u32);

/// Where a copy of a tensor's bytes lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[non_exhaustive]
pub enum Tier {
    /// An owned anonymous buffer, counted against the RAM budget.
    Ram,
    /// The source file's own pages, which the kernel may reclaim without writing anything.
    Mapped,
    /// An extent of the spill file (dirty bytes only).
    Spilled,
}

/// How to recompute a derived tensor, so that evicting it may cost no write at all.
#[derive(Clone)]
pub struct Recipe {
    compute: Arc<dyn Fn() -> Vec<u8> + Send + Sync>,
    cost_per_byte: f64,
}

impl Recipe {
    /// A recipe whose recompute costs `cost_per_byte` relative to reading a byte back from
    /// disk (`1.0`); spilling costs a write and a read (`2.0`). The policy drops instead of
    /// spilling when the recipe is cheaper.
    pub fn new(cost_per_byte: f64, compute: impl Fn() -> Vec<u8> + Send + Sync + 'static) -> Self {
        Self {
            compute: Arc::new(compute),
            cost_per_byte: cost_per_byte.max(0.0),
        }
    }

    /// The recompute cost per byte.
    pub fn cost_per_byte(&self) -> f64 {
        self.cost_per_byte
    }
}

impl std::fmt::Debug for Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipe")
            .field("cost_per_byte", &self.cost_per_byte)
            .finish_non_exhaustive()
    }
}

/// What the store knows about a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[allow(clippy::struct_excessive_bools)] // independent facts about one tensor, not a state machine
pub struct TensorInfo {
    /// Name within its model.
    pub name: String,
    /// The model it belongs to.
    pub model: ModelId,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Length in bytes.
    pub len: u64,
    /// Its bytes equal its extent in the source file (it can always be restored from there).
    pub clean: bool,
    /// It has a RAM copy.
    pub in_ram: bool,
    /// Its mapped pages were faulted in by lowtide and not released since.
    pub mapped: bool,
    /// Its bytes are in the spill file.
    pub spilled: bool,
    /// It carries a recipe.
    pub has_recipe: bool,
    /// The device holding a copy, if any.
    pub device: Option<DeviceId>,
    /// Live guards.
    pub pins: u32,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    spill: Mutex<SpillFile>,
    stats: Stats,
    governor: Governor,
    policy: Box<dyn EvictionPolicy>,
    monitor: Mutex<Option<Monitor>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation of the registry completes before anything that can panic, so a
        // poisoned lock still guards a consistent registry.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spill_lock(&self) -> MutexGuard<'_, SpillFile> {
        self.spill.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn unpin(&self, id: TensorId) {
        let mut state = self.lock();
        if let Ok(entry) = state.tensor_mut(id) {
            entry.pins = entry.pins.saturating_sub(1);
        }
    }

    /// After every change: trims the pool to the budget, checks the invariants in strict
    /// mode, and publishes the figures.
    fn check(&self, state: &mut State) {
        state.trim_pool(self.governor.ram_budget);
        if cfg!(feature = "strict") {
            state.assert_invariants(self.governor.ram_budget);
        }
        self.stats.set_anon(state.anon);
        self.stats
            .pool_bytes
            .store(state.pool_bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn guard(self: &Arc<Self>, id: TensorId, view: View) -> TensorGuard {
        Stats::add(&self.stats.acquires, 1);
        TensorGuard {
            shared: Arc::clone(self),
            id,
            view,
        }
    }
}

/// The registry of models and tensors, their copies, the RAM budget and the spill file.
///
/// Cheap to clone (an `Arc` inside); `Send + Sync`, meant to be shared by many threads.
/// Dropping the last clone (and the last guard) stops the monitor thread.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("ram_budget", &self.shared.governor.ram_budget)
            .field("reserve_ram", &self.shared.governor.reserve_ram())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// What a restore needs, taken under the lock.
enum Restore {
    Ready(Arc<RamBuf>),
    Read {
        name: String,
        len: u64,
        from: CopyFrom,
        /// A pooled buffer to restore into.
        reuse: Option<AlignedBuf>,
    },
}

enum CopyFrom {
    Source {
        source: Arc<crate::source::Source>,
        offset: u64,
    },
    /// A dirty tensor whose bytes are on a device (kept there while the tensor is pinned).
    Device {
        device: Arc<dyn crate::device::Device>,
        copy: Arc<crate::device::DeviceAlloc>,
    },
    Spill {
        extent: crate::spill::Extent,
        recipe: Option<Recipe>,
    },
    Recipe(Recipe),
}

impl Store {
    /// Settings with their defaults.
    pub fn builder() -> StoreBuilder {
        StoreBuilder::default()
    }

    /// The RAM budget in bytes.
    pub fn ram_budget(&self) -> u64 {
        self.shared.governor.ram_budget
    }

    /// The RAM reserve in bytes (0 when off).
    pub fn reserve_ram(&self) -> u64 {
        self.shared.governor.reserve_ram()
    }

    /// Changes the RAM reserve (0 turns it off). The monitor thread, when it runs, acts on the
    /// new value at its next sample; new RAM copies are checked against it at once.
    pub fn set_reserve_ram(&self, bytes: u64) {
        self.shared.governor.set_reserve_ram(bytes);
    }

    /// Available memory now, as the governor sees it.
    pub fn memory(&self) -> MemoryReading {
        self.shared.governor.reading()
    }

    /// The pressure file the monitor thread watches, if it runs and PSI is available.
    pub fn pressure_file(&self) -> Option<std::path::PathBuf> {
        let monitor = self
            .shared
            .monitor
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        monitor.as_ref().and_then(|m| m.pressure_file.clone())
    }

    /// Opens a model: a `.safetensors` file, a directory of shards or a shard index.
    ///
    /// Every file is validated completely and mapped; no tensor data is read.
    pub fn open_model(&self, path: impl AsRef<Path>) -> Result<ModelId, StoreError> {
        let files = ModelFiles::open(path)?;
        let mut state = self.shared.lock();
        let model = ModelId(state.models.len() as u32);
        let mut tensors = Vec::with_capacity(files.tensors.len());
        let mut by_name = HashMap::with_capacity(files.tensors.len());
        for (name, location) in &files.tensors {
            let source = &files.sources[location.source];
            let entry = &source.tensors()[location.index];
            let id = TensorId(state.tensors.len() as u32);
            state.tensors.push(Some(TensorEntry {
                model,
                name: name.clone(),
                dtype: entry.dtype,
                shape: entry.shape.clone(),
                len: entry.len,
                origin: Origin::Source {
                    source: Arc::clone(source),
                    offset: entry.offset,
                },
                ram: None,
                mapped: false,
                spilled: None,
                recipe: None,
                pins: 0,
                last_use: 0,
                credit: 0.0,
                device: None,
                base: Some((Arc::clone(source), entry.offset)),
            }));
            tensors.push(id);
            by_name.insert(name.clone(), id);
        }
        state.models.push(Some(ModelEntry {
            path: files.path.clone(),
            priority: Priority::default(),
            tensors,
            by_name,
        }));
        Ok(model)
    }

    /// Sets a model's priority class (see [`crate::policy`] for the eviction order).
    pub fn set_priority(&self, model: ModelId, priority: Priority) -> Result<(), StoreError> {
        let mut state = self.shared.lock();
        state.model(model)?;
        state.models[model.0 as usize]
            .as_mut()
            .expect("checked")
            .priority = priority;
        Ok(())
    }

    /// The tensors of a model, ordered by name.
    pub fn tensors(&self, model: ModelId) -> Result<Vec<TensorId>, StoreError> {
        let state = self.shared.lock();
        let mut ids = state.model(model)?.tensors.clone();
        ids.sort_by_cached_key(|id| {
            state
                .tensor(*id)
                .map(|t| t.name.clone())
                .unwrap_or_default()
        });
        Ok(ids)
    }

    /// A tensor of a model by name.
    pub fn tensor(&self, model: ModelId, name: &str) -> Result<TensorId, StoreError> {
        let state = self.shared.lock();
        let entry = state.model(model)?;
        entry
            .by_name
            .get(name)
            .copied()
            .ok_or_else(|| StoreError::NoSuchTensor {
                model: entry.path.clone(),
                name: name.to_owned(),
            })
    }

    /// What the store knows about a tensor now.
    pub fn info(&self, id: TensorId) -> Result<TensorInfo, StoreError> {
        let state = self.shared.lock();
        let t = state.tensor(id)?;
        Ok(TensorInfo {
            name: t.name.clone(),
            model: t.model,
            dtype: t.dtype,
            shape: t.shape.clone(),
            len: t.len,
            clean: t.is_clean(),
            in_ram: t.ram.is_some(),
            mapped: t.mapped,
            spilled: t.spilled.is_some(),
            has_recipe: t.recipe.is_some(),
            device: t.device.as_ref().map(|c| c.device),
            pins: t.pins,
        })
    }

    /// Pins a host view of the tensor without copying it: its RAM copy if it has one; for a
    /// clean tensor, the source file's own mapped pages (faulted in with
    /// `MADV_POPULATE_READ`, costing no anonymous memory); for a dirty one, a RAM copy
    /// restored from the spill file or recomputed, as [`Store::acquire_ram`] does.
    ///
    /// The file's identity is checked before the view is handed out, never while the caller
    /// reads it: that is what makes this function `unsafe` (the contract of memmap2's
    /// `Mmap::map`). [`Store::acquire_ram`] is the safe way to read a tensor.
    ///
    /// # Safety
    ///
    /// While the guard (or any slice borrowed from it) lives, no process may truncate or
    /// write the tensor's model file. A truncation makes reading the view raise `SIGBUS`,
    /// which kills the process; a write changes bytes behind a shared reference, which Rust
    /// treats as undefined behaviour. Only call it on files nothing else modifies (read-only
    /// mounts, files the process itself wrote and keeps), see docs/reliability.md.
    pub unsafe fn acquire_mapped(&self, id: TensorId) -> Result<TensorGuard, StoreError> {
        self.pin_host_view(id)
    }

    /// Makes the tensor's host bytes resident without handing any out: a clean tensor's
    /// mapped file pages are faulted in (`MADV_POPULATE_READ`: a file truncated meanwhile is
    /// an error, never `SIGBUS`), so that the page cache holds them and a later restore
    /// copies instead of reading the disk; a dirty one gets its RAM copy. Safe: no byte of
    /// the mapping is read by the caller.
    pub fn fault_in(&self, id: TensorId) -> Result<(), StoreError> {
        self.pin_host_view(id).map(drop)
    }

    /// [`Store::acquire_mapped`]'s work; the guard's bytes are only read by callers that keep
    /// its contract.
    fn pin_host_view(&self, id: TensorId) -> Result<TensorGuard, StoreError> {
        let (source, offset, len, was_mapped) = {
            let mut state = self.shared.lock();
            let (now, inflation) = (state.tick(), state.inflation);
            let entry = state.tensor_mut(id)?;
            entry.touch(now, inflation);
            if let Some(buf) = &entry.ram {
                let view = View::Ram(Arc::clone(buf));
                entry.pins += 1;
                return Ok(self.shared.guard(id, view));
            }
            let Origin::Source { source, offset } = &entry.origin else {
                drop(state);
                return self.acquire_ram(id);
            };
            let found = (Arc::clone(source), *offset, entry.len, entry.mapped);
            entry.pins += 1;
            entry.mapped = true;
            found
        };
        let view = View::Mapped {
            source: Arc::clone(&source),
            offset: offset as usize,
            len: len as usize,
        };
        // From here the guard owns the pin: on error its drop unpins.
        let guard = self.shared.guard(id, view);
        if let Err(err) = source.fault_in(offset, len) {
            if !was_mapped && let Ok(entry) = self.shared.lock().tensor_mut(id) {
                entry.mapped = false;
            }
            return Err(err.into());
        }
        if !was_mapped {
            Stats::add(&self.shared.stats.bytes_read_source, len);
        }
        Ok(guard)
    }

    /// Pins an owned RAM copy of the tensor, reading it from the source (clean) or the spill
    /// file (dirty), or recomputing it from its recipe, when it has none.
    ///
    /// Safe when the model file changes: bytes are read with `pread` and `O_DIRECT` (never
    /// through the mapping), and the file's size and modification time are checked before and
    /// after the copy, so a file truncated or rewritten with `write(2)` meanwhile is
    /// [`crate::SourceError::Changed`] instead of other bytes or `SIGBUS` (writes through
    /// another process's writable mapping may not move the mtime: docs/reliability.md).
    ///
    /// The copy counts against the RAM budget (and, when set, the reserve); other copies are
    /// evicted in policy order to make room. Fails with [`StoreError::OverBudget`] or
    /// [`StoreError::UnderReserve`] when even that is not enough: nothing is allocated past
    /// the budget.
    pub fn acquire_ram(&self, id: TensorId) -> Result<TensorGuard, StoreError> {
        let restore = {
            let mut state = self.shared.lock();
            let (now, inflation) = (state.tick(), state.inflation);
            let entry = state.tensor_mut(id)?;
            entry.touch(now, inflation);
            if let Some(buf) = &entry.ram {
                let buf = Arc::clone(buf);
                entry.pins += 1;
                Restore::Ready(buf)
            } else {
                let on_device = entry
                    .device
                    .as_ref()
                    .map(|copy| (copy.device, Arc::clone(&copy.alloc)));
                let from = match (&entry.origin, entry.spilled, &entry.recipe) {
                    (Origin::Source { source, offset }, _, _) => Some(CopyFrom::Source {
                        source: Arc::clone(source),
                        offset: *offset,
                    }),
                    // A device copy comes back over the bus, faster than from the disk.
                    (Origin::Derived, ..) if on_device.is_some() => None,
                    (Origin::Derived, Some(extent), recipe) => Some(CopyFrom::Spill {
                        extent,
                        recipe: recipe.clone(),
                    }),
                    (Origin::Derived, None, Some(recipe)) => Some(CopyFrom::Recipe(recipe.clone())),
                    (Origin::Derived, None, None) => None,
                };
                let (name, len) = (entry.name.clone(), entry.len);
                let from = match (from, on_device) {
                    (Some(from), _) => from,
                    (None, Some((device, copy))) => CopyFrom::Device {
                        device: self.shared.device(&state, device)?,
                        copy,
                    },
                    (None, None) => unreachable!(
                        "a dirty tensor always has a copy in RAM, the spill file or on a \
                         device, or a recipe (strict mode checks)"
                    ),
                };
                // Reserve the bytes now so that concurrent loads cannot overshoot together.
                self.shared.make_room(&mut state, id, &name, len)?;
                self.shared.keep_reserve(&mut state, id, &name, len)?;
                state.reserved += len;
                state.tensor_mut(id)?.pins += 1;
                let reuse = match &from {
                    CopyFrom::Source { offset, .. } => {
                        state.take_pooled(DirectBuf::padded_len(*offset, len))
                    }
                    _ => None,
                };
                if reuse.is_some() {
                    Stats::add(&self.shared.stats.pool_reuses, 1);
                }
                self.shared.check(&mut state);
                Restore::Read {
                    name,
                    len,
                    from,
                    reuse,
                }
            }
        };
        let (name, len, from, reuse) = match restore {
            Restore::Ready(buf) => return Ok(self.shared.guard(id, View::Ram(buf))),
            Restore::Read {
                name,
                len,
                from,
                reuse,
            } => (name, len, from, reuse),
        };
        match self.read_copy(&name, len, &from, reuse) {
            Ok(buf) => Ok(self.install(id, len, buf, &from)),
            Err(err) => {
                let mut state = self.shared.lock();
                state.reserved -= len;
                if let Ok(entry) = state.tensor_mut(id) {
                    entry.pins -= 1;
                }
                self.shared.check(&mut state);
                Err(err)
            }
        }
    }

    /// Reads a copy's bytes outside the lock.
    fn read_copy(
        &self,
        name: &str,
        len: u64,
        from: &CopyFrom,
        reuse: Option<AlignedBuf>,
    ) -> Result<RamBuf, StoreError> {
        let alloc = || {
            AlignedBuf::zeroed(len as usize).ok_or_else(|| StoreError::Alloc {
                name: name.to_owned(),
                bytes: len,
            })
        };
        let stats = &self.shared.stats;
        let recompute = |recipe: &Recipe| {
            let bytes = (recipe.compute)();
            if bytes.len() as u64 != len {
                return Err(StoreError::Recipe {
                    name: name.to_owned(),
                    expected: len,
                    actual: bytes.len() as u64,
                });
            }
            Stats::add(&stats.recomputes, 1);
            Ok(RamBuf::Owned(bytes.into_boxed_slice()))
        };
        match from {
            CopyFrom::Source { source, offset } => {
                let (buf, cold) = source.restore(*offset, len, reuse)?;
                stats.restored_from_source(len, cold);
                Ok(RamBuf::Direct(buf))
            }
            CopyFrom::Spill { extent, recipe } => {
                let mut buf = alloc()?;
                match self.shared.spill_lock().read(extent, buf.as_mut_slice()) {
                    Ok(()) => {
                        Stats::add(&stats.bytes_restored_spill, len);
                        Ok(RamBuf::Aligned(buf))
                    }
                    Err(err) => {
                        if matches!(err, SpillError::Checksum { .. }) {
                            Stats::add(&stats.checksum_failures, 1);
                        }
                        log::warn!("tensor `{name}`: {err}");
                        match recipe {
                            Some(recipe) => recompute(recipe),
                            None => Err(StoreError::Lost {
                                name: name.to_owned(),
                                source: err,
                            }),
                        }
                    }
                }
            }
            CopyFrom::Recipe(recipe) => recompute(recipe),
            CopyFrom::Device { device, copy } => {
                let mut buf = alloc()?;
                device
                    .download(copy, 0, buf.as_mut_slice())
                    .map_err(|source| StoreError::Device {
                        name: name.to_owned(),
                        source,
                    })?;
                Stats::add(&stats.bytes_downloaded, len);
                Ok(RamBuf::Aligned(buf))
            }
        }
    }

    /// Installs a restored copy (unless another thread did first) and frees the spill extent
    /// it came from.
    fn install(&self, id: TensorId, len: u64, buf: RamBuf, from: &CopyFrom) -> TensorGuard {
        let mut state = self.shared.lock();
        state.reserved -= len;
        let entry = state
            .tensor_mut(id)
            .expect("pinned tensors stay registered");
        let buf = if let Some(existing) = &entry.ram {
            Arc::clone(existing)
        } else {
            let buf = Arc::new(buf);
            entry.ram = Some(Arc::clone(&buf));
            let spilled = if matches!(from, CopyFrom::Spill { .. } | CopyFrom::Recipe(_)) {
                entry.spilled.take()
            } else {
                None
            };
            state.anon += len;
            if let Some(extent) = spilled {
                self.shared.spill_lock().free(extent);
            }
            buf
        };
        self.shared.check(&mut state);
        drop(state);
        self.shared.guard(id, View::Ram(buf))
    }

    /// Registers a new dirty tensor in `model` from owned bytes (a cast, a quantization, a
    /// merged LoRA). It counts against the RAM budget.
    pub fn derive(
        &self,
        model: ModelId,
        name: &str,
        dtype: Dtype,
        shape: &[u64],
        bytes: impl Into<TensorBytes>,
    ) -> Result<TensorId, StoreError> {
        self.derive_inner(model, name, dtype, shape, bytes.into(), None)
    }

    /// Like [`Store::derive`], with a recipe that recomputes the bytes: the policy may then
    /// drop the copy instead of spilling it.
    pub fn derive_with_recipe(
        &self,
        model: ModelId,
        name: &str,
        dtype: Dtype,
        shape: &[u64],
        bytes: impl Into<TensorBytes>,
        recipe: Recipe,
    ) -> Result<TensorId, StoreError> {
        self.derive_inner(model, name, dtype, shape, bytes.into(), Some(recipe))
    }

    fn derive_inner(
        &self,
        model: ModelId,
        name: &str,
        dtype: Dtype,
        shape: &[u64],
        bytes: TensorBytes,
        recipe: Option<Recipe>,
    ) -> Result<TensorId, StoreError> {
        check_len(name, dtype, shape, bytes.len())?;
        let mut state = self.shared.lock();
        let entry = state.model(model)?;
        if entry.by_name.contains_key(name) {
            return Err(StoreError::DuplicateName {
                model: entry.path.clone(),
                name: name.into(),
            });
        }
        let id = TensorId(state.tensors.len() as u32);
        let len = bytes.len();
        self.shared.make_room(&mut state, id, name, len)?;
        self.shared.keep_reserve(&mut state, id, name, len)?;
        let (now, inflation) = (state.tick(), state.inflation);
        let mut entry = TensorEntry {
            model,
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
            len,
            origin: Origin::Derived,
            ram: Some(Arc::new(bytes.into_ram())),
            mapped: false,
            spilled: None,
            recipe,
            pins: 0,
            last_use: 0,
            credit: 0.0,
            device: None,
            base: None,
        };
        entry.touch(now, inflation);
        state.tensors.push(Some(entry));
        state.anon += len;
        let model_entry = state.models[model.0 as usize]
            .as_mut()
            .expect("checked above");
        model_entry.tensors.push(id);
        model_entry.by_name.insert(name.to_owned(), id);
        self.shared.check(&mut state);
        Ok(id)
    }

    /// Replaces a tensor's bytes (after patching it): the tensor becomes dirty and its new
    /// bytes are its only copy (any recipe is forgotten). Fails while a guard pins it; on any
    /// error the tensor is unchanged.
    pub fn replace(&self, id: TensorId, bytes: impl Into<TensorBytes>) -> Result<(), StoreError> {
        let bytes = bytes.into();
        let mut state = self.shared.lock();
        let entry = state.tensor(id)?;
        let name = entry.name.clone();
        check_len(&name, entry.dtype, &entry.shape, bytes.len())?;
        if entry.pins > 0 {
            return Err(StoreError::Pinned {
                name,
                pins: entry.pins,
            });
        }
        let held = entry.ram.as_ref().map_or(0, |b| b.len());
        let len = bytes.len();
        self.shared
            .make_room(&mut state, id, &name, len.saturating_sub(held))?;
        self.shared
            .keep_reserve(&mut state, id, &name, len.saturating_sub(held))?;
        // The file's pages and any device copy no longer hold this tensor's bytes.
        let released = state.drop_clean(id, false);
        self.record_drop(released);
        state.free_ram(id);
        self.shared.release_device_copy(&mut state, id);
        let (now, inflation) = (state.tick(), state.inflation);
        let entry = state.tensor_mut(id)?;
        entry.origin = Origin::Derived;
        entry.recipe = None;
        let old_extent = entry.spilled.take();
        entry.ram = Some(Arc::new(bytes.into_ram()));
        entry.touch(now, inflation);
        state.anon += len;
        if let Some(extent) = old_extent {
            self.shared.spill_lock().free(extent);
        }
        self.shared.check(&mut state);
        Ok(())
    }

    /// Reverts a patched tensor to its original bytes in its file: its RAM, device and spill
    /// copies are dropped (nothing is written) and it is clean again — switching a LoRA off
    /// costs no write. Fails for tensors that were derived rather than opened from a file, and
    /// while a guard pins it. Returns the bytes of copies freed.
    pub fn revert(&self, id: TensorId) -> Result<u64, StoreError> {
        let mut state = self.shared.lock();
        let entry = state.tensor(id)?;
        if entry.pins > 0 {
            return Err(StoreError::Pinned {
                name: entry.name.clone(),
                pins: entry.pins,
            });
        }
        let Some((source, offset)) = entry.base.clone() else {
            return Err(StoreError::NotFromFile {
                name: entry.name.clone(),
            });
        };
        if entry.is_clean() {
            return Ok(0);
        }
        let mut freed = state.free_ram(id);
        freed += self.shared.release_device_copy(&mut state, id);
        let (now, inflation) = (state.tick(), state.inflation);
        let entry = state.tensor_mut(id)?;
        entry.origin = Origin::Source { source, offset };
        entry.recipe = None;
        entry.mapped = false;
        entry.touch(now, inflation);
        if let Some(extent) = entry.spilled.take() {
            self.shared.spill_lock().free(extent);
        }
        self.shared.check(&mut state);
        Ok(freed)
    }

    /// Drops the tensor's clean copies: frees its RAM copy and releases its mapped pages (only
    /// the pages that belong to it alone). Writes nothing. A dirty tensor keeps its copy.
    pub fn drop_clean(&self, id: TensorId) -> Result<DropOutcome, StoreError> {
        let mut state = self.shared.lock();
        let entry = state.tensor(id)?;
        if entry.pins > 0 {
            return Err(StoreError::Pinned {
                name: entry.name.clone(),
                pins: entry.pins,
            });
        }
        let outcome = state.drop_clean(id, true);
        self.record_drop(outcome);
        self.shared.check(&mut state);
        Ok(outcome)
    }

    /// Drops the clean copies of every unpinned tensor of a model (see [`Store::drop_clean`]).
    pub fn release_model(&self, model: ModelId) -> Result<DropOutcome, StoreError> {
        let mut state = self.shared.lock();
        let ids = state.model(model)?.tensors.clone();
        let mut total = DropOutcome::default();
        for id in ids {
            total += state.drop_clean(id, true);
        }
        self.record_drop(total);
        self.shared.check(&mut state);
        Ok(total)
    }

    /// Evicts at least `bytes` of RAM copies in policy order if it can: clean copies are
    /// dropped, dirty ones spilled (or dropped when their recipe is cheaper).
    pub fn free_memory(&self, bytes: u64) -> FreeOutcome {
        let mut state = self.shared.lock();
        let outcome = self
            .shared
            .free(&mut state, bytes, EvictReason::Request, None);
        self.shared.check(&mut state);
        outcome
    }

    /// Spills one dirty tensor's RAM copy now. On error (disk full, `spill_max`) the tensor
    /// keeps its RAM copy.
    pub fn spill(&self, id: TensorId) -> Result<u64, StoreError> {
        let mut state = self.shared.lock();
        let entry = state.tensor(id)?;
        let name = entry.name.clone();
        if entry.pins > 0 {
            return Err(StoreError::Pinned {
                name,
                pins: entry.pins,
            });
        }
        let Some(buf) = entry
            .ram
            .as_ref()
            .filter(|_| !entry.is_clean() && entry.spilled.is_none())
        else {
            return Ok(0);
        };
        let buf = Arc::clone(buf);
        let extent = self
            .shared
            .spill_lock()
            .write(buf.as_slice())
            .map_err(|source| {
                Stats::add(&self.shared.stats.spill_failures, 1);
                StoreError::Spill {
                    name: name.clone(),
                    source,
                }
            })?;
        Stats::add(&self.shared.stats.bytes_spilled, extent.len);
        Stats::add(&self.shared.stats.bytes_written, extent.len);
        state.tensor_mut(id)?.spilled = Some(extent);
        let freed = state.release_ram(id);
        Stats::add(&self.shared.stats.evictions, 1);
        Stats::add(&self.shared.stats.evictions_request, 1);
        self.shared.check(&mut state);
        Ok(freed)
    }

    /// Bytes the spill file holds now.
    pub fn spill_used(&self) -> u64 {
        self.shared.spill_lock().used()
    }

    /// Closes a model: frees its copies and spill extents and forgets its tensors. Fails while
    /// any is pinned.
    pub fn close_model(&self, model: ModelId) -> Result<(), StoreError> {
        let mut state = self.shared.lock();
        let ids = state.model(model)?.tensors.clone();
        for &id in &ids {
            let entry = state.tensor(id)?;
            if entry.pins > 0 {
                return Err(StoreError::Pinned {
                    name: entry.name.clone(),
                    pins: entry.pins,
                });
            }
        }
        for id in ids {
            let outcome = state.drop_clean(id, true);
            self.record_drop(outcome);
            state.release_ram(id);
            if let Some(Some(entry)) = state.tensors.get_mut(id.0 as usize)
                && let Some(extent) = entry.spilled.take()
            {
                self.shared.spill_lock().free(extent);
            }
            self.shared.release_device_copy(&mut state, id);
            state.tensors[id.0 as usize] = None;
        }
        state.models[model.0 as usize] = None;
        self.shared.check(&mut state);
        Ok(())
    }

    /// The store's counters now.
    pub fn stats(&self) -> StatsSnapshot {
        let mut stats = self.shared.stats.snapshot();
        stats.release_pending_bytes = self.shared.lock().releaser.pending();
        stats
    }

    /// Waits until the copies dropped so far have been given back to the system.
    ///
    /// Dropping copies on purpose ([`Store::release_model`], [`Store::drop_clean`],
    /// [`Store::spill`], [`Store::close_model`]) returns at once: large buffers are unmapped by
    /// a background thread, and count against the RAM budget until they are. The store waits
    /// for them itself whenever it needs the room (the budget, the reserve, pressure); call
    /// this where something outside the store needs the memory now, for example before
    /// starting another process.
    pub fn wait_released(&self) {
        let releaser = Arc::clone(&self.shared.lock().releaser);
        releaser.wait();
    }

    fn record_drop(&self, outcome: DropOutcome) {
        Stats::add(&self.shared.stats.ram_dropped_bytes, outcome.ram_bytes);
        Stats::add(
            &self.shared.stats.mapped_released_bytes,
            outcome.mapped_bytes,
        );
    }
}

/// The most host memory a store's transfer buffers hold beyond its RAM budget, for tensors
/// of at most `largest` bytes moved to and from devices in chunks of `device_chunk` bytes
/// ([`Device::chunk_len`](crate::Device::chunk_len)): the device upload windows and the
/// spill file's bounce and stream buffers. With the RAM budget, the reserve and, for a device
/// in host memory, the device's capacity, it bounds the memory a store makes its process
/// hold; a memory limit below that sum cannot be kept (docs/reliability.md).
pub fn scratch_bytes(largest: u64, device_chunk: usize) -> u64 {
    device::upload_windows_bound(largest, device_chunk)
        + crate::spill::buffers_bound(largest, device_chunk)
}

fn check_len(name: &str, dtype: Dtype, shape: &[u64], actual: u64) -> Result<(), StoreError> {
    let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let Some(expected) = elements.and_then(|n| dtype.bytes_for(n)) else {
        return Err(StoreError::BadShape {
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
        });
    };
    if expected == actual {
        return Ok(());
    }
    Err(StoreError::ByteLength {
        name: name.to_owned(),
        dtype,
        shape: shape.to_vec(),
        expected,
        actual,
    })
}

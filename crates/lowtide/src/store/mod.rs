//! The store: models, tensors, their copies, guards, the budget and the spill file.
//!
//! One lock guards the registry (`State`), and it is never held across I/O: file reads (page
//! faults, `pread`, `O_DIRECT`), spill reads and writes, device transfers and memory readings
//! all happen outside it, while the tensor involved is pinned (a restore) or marked busy (an
//! eviction, see `evict`). Dropping a guard takes the lock only to unpin. Lock order:
//! registry, then the spill file's space lock; the releaser's and the staging buffers' locks
//! are leaves. docs/design.md has the state machine and what each lock protects.

mod builder;
mod copies;
mod device;
mod device_stream;
mod error;
mod evict;
mod guard;
mod prefetch;
mod ram;
mod release;
mod reread;
mod state;
mod stream;
mod tune;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

pub use builder::StoreBuilder;
pub use device::{DeviceGuard, LoadOutcome, UnloadOutcome};
pub use device_stream::DeviceStream;
pub use error::{ConfigError, HandleError, MemoryError, RestoreError, StoreError, UpdateError};
pub use evict::FreeOutcome;
pub use guard::{TensorGuard, ViewError};
pub use prefetch::{Prefetch, PrefetchCancel, PrefetchOutcome};
pub use state::DropOutcome;
pub use stream::{RamStream, StreamStats};
pub use tune::DeviceShape;

use crate::dtype::Dtype;
use crate::governor::{EvictReason, Governor, MemoryReading, Monitor};
pub use crate::ids::{DeviceId, ModelId, TensorId};
use crate::policy::{EvictionPolicy, Priority};
use crate::source::ModelFiles;
use crate::spill::SpillFile;
use crate::stats::{Stats, StatsSnapshot};
use crate::sys::fork::Owner;
use copies::{CopySource, Target};
use evict::Room;
use guard::View;
pub use ram::TensorBytes;
pub(crate) use reread::FileRead;
use state::{FileExtent, ModelEntry, State, TensorEntry};

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
    /// Device memory.
    Device,
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
    /// Its handle.
    pub id: TensorId,
    /// Name within its model.
    pub name: String,
    /// The model it belongs to.
    pub model: ModelId,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
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

impl TensorInfo {
    fn of(id: TensorId, t: &TensorEntry) -> Self {
        Self {
            id,
            name: t.name.clone(),
            model: t.model,
            dtype: t.dtype,
            shape: t.shape.to_vec(),
            len: t.len,
            clean: t.is_clean(),
            in_ram: t.ram.is_some(),
            mapped: t.mapped,
            spilled: t.spilled.is_some(),
            has_recipe: t.recipe.is_some(),
            device: t.device.as_ref().map(|c| c.device),
            pins: t.pins,
        }
    }

    /// The tiers holding a copy of its bytes now, fastest first (the model file itself is
    /// not listed: a clean tensor can always be restored from it).
    pub fn tiers(&self) -> Vec<Tier> {
        [
            (self.device.is_some(), Tier::Device),
            (self.in_ram, Tier::Ram),
            (self.mapped, Tier::Mapped),
            (self.spilled, Tier::Spilled),
        ]
        .into_iter()
        .filter_map(|(held, tier)| held.then_some(tier))
        .collect()
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled when an eviction commits (a `busy` tensor is free again).
    changed: Condvar,
    /// How model files are read, when not the default.
    source_io: Option<Arc<dyn crate::source::SourceIo>>,
    /// Mapped acquires use the kernel's readahead (`StoreBuilder::mapped_readahead`).
    mapped_readahead: bool,
    /// Streamed tensors are read with `O_DIRECT` too (`StoreBuilder::keep_streamed_cached`).
    streamed_direct: bool,
    /// The shape of queued direct reads, per device.
    tuner: tune::Tuner,
    spill: Arc<SpillFile>,
    stats: Stats,
    governor: Governor,
    policy: Box<dyn EvictionPolicy>,
    monitor: Mutex<Option<Monitor>>,
    /// The process that built the store: a child forked from it shares its spill file and
    /// I/O but not its threads, and may not use it (see [`Shared::not_forked`]).
    owner: Owner,
}

impl Shared {
    /// Fails in a child forked from the process that built the store. The child inherits a
    /// copy of the registry, but the spill file it names, the pages it would release and the
    /// threads it would wait for are the parent's: using them would change what the parent
    /// reads, frees or waits for. Checked first by every operation, before any lock (a lock
    /// another thread of the parent held at the fork stays held in the child for good).
    fn not_forked(&self) -> Result<(), StoreError> {
        if self.owner.is_current() {
            return Ok(());
        }
        Err(StoreError::Forked {
            owner_pid: self.owner.pid(),
            pid: crate::sys::fork::pid(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation of the registry completes before anything that can panic, so a
        // poisoned lock still guards a consistent registry.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits (releasing the lock meanwhile) until an eviction in flight commits.
    fn wait_changed<'a>(&'a self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the registry once no eviction is moving `id`'s bytes: changes of a tensor's
    /// bytes wait for that (it takes as long as one write).
    fn lock_idle(&self, id: TensorId) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        while state.tensor(id).is_ok_and(|t| t.busy) {
            state = self.wait_changed(state);
        }
        state
    }

    /// Like [`Shared::lock_idle`] for every tensor of `model`.
    fn lock_model_idle(&self, model: ModelId) -> MutexGuard<'_, State> {
        let mut state = self.lock();
        while state.entries().any(|(_, t)| t.model == model && t.busy) {
            state = self.wait_changed(state);
        }
        state
    }

    fn unpin(&self, id: TensorId) {
        self.lock().unpin(id);
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

    fn guard(self: &Arc<Self>, id: TensorId, entry: &TensorEntry, view: View) -> TensorGuard {
        Stats::add(&self.stats.acquires, 1);
        TensorGuard {
            shared: Arc::clone(self),
            id,
            dtype: entry.dtype,
            shape: Arc::clone(&entry.shape),
            view,
        }
    }
}

/// What [`Store::begin_ram`] did.
enum Begun {
    /// The tensor had a RAM copy: pinned.
    Ready(TensorGuard),
    /// Room is reserved and the tensor pinned; its bytes are to be read from `from`.
    Pending(Pending),
}

/// A RAM copy on its way: room reserved, tensor pinned, source chosen.
struct Pending {
    id: TensorId,
    name: String,
    len: u64,
    from: CopySource,
    /// A pooled buffer to read a file extent into.
    reuse: Option<crate::sys::AlignedBuf>,
}

/// The registry of models and tensors, their copies, the RAM budget and the spill file.
///
/// Cheap to clone (an `Arc` inside); `Send + Sync`, meant to be shared by many threads.
/// Dropping the last clone (and the last guard) stops the monitor thread.
///
/// A store belongs to the process that built it. A child forked from that process (Python's
/// `multiprocessing`, PyTorch's `DataLoader` workers) must open a store of its own: there,
/// every operation of the inherited one that returns a `Result` fails with
/// [`StoreError::Forked`], [`Store::free_memory`] and [`Store::relieve_reserve`] free
/// nothing, [`Store::wait_released`] returns at once, and dropping it or its guards releases
/// nothing the parent uses (the child's copies are left to its exit). Guards taken before the
/// fork still read their bytes: the child's copy of them.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("ram_budget", &self.shared.governor.ram_budget)
            .field("reserve_ram", &self.shared.governor.reserve_setting())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
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
        self.shared.governor.reserve_setting()
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
        self.shared.not_forked()?;
        let files = ModelFiles::open(path)?;
        for source in &files.sources {
            if let Some(io) = &self.shared.source_io {
                source.set_io(Arc::clone(io));
            }
            if self.shared.mapped_readahead {
                source.use_kernel_readahead();
            }
        }
        let mut state = self.shared.lock();
        let model = ModelId(state.models.len() as u32);
        let mut tensors = Vec::with_capacity(files.tensors.len());
        let mut by_name = HashMap::with_capacity(files.tensors.len());
        let mut file_bytes = 0u64;
        for (name, location) in &files.tensors {
            let source = &files.sources[location.source];
            let entry = &source.tensors()[location.index];
            let id = TensorId(state.tensors.len() as u32);
            let mut tensor = TensorEntry::new(
                model,
                name.clone(),
                entry.dtype,
                entry.shape.iter().map(|&d| d as usize).collect(),
                entry.len,
            );
            tensor.base = Some(FileExtent {
                source: Arc::clone(source),
                offset: entry.offset,
            });
            tensor.clean = true;
            file_bytes = file_bytes.saturating_add(entry.len);
            state.tensors.push(Some(tensor));
            tensors.push(id);
            by_name.insert(name.clone(), id);
        }
        state.models.push(Some(ModelEntry {
            path: files.path.clone(),
            priority: Priority::default(),
            tensors,
            by_name,
            file_bytes,
        }));
        Ok(model)
    }

    /// Sets a model's priority class (see [`crate::policy`] for the eviction order).
    pub fn set_priority(&self, model: ModelId, priority: Priority) -> Result<(), StoreError> {
        self.shared.not_forked()?;
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
        self.shared.not_forked()?;
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
        self.shared.not_forked()?;
        let state = self.shared.lock();
        let entry = state.model(model)?;
        entry.by_name.get(name).copied().ok_or_else(|| {
            StoreError::Handle(HandleError::NoSuchTensor {
                model: entry.path.clone(),
                name: name.to_owned(),
            })
        })
    }

    /// What the store knows about a tensor now.
    pub fn info(&self, id: TensorId) -> Result<TensorInfo, StoreError> {
        self.shared.not_forked()?;
        let state = self.shared.lock();
        Ok(TensorInfo::of(id, state.tensor(id)?))
    }

    /// What the store knows about every tensor of a model now, ordered by name: names,
    /// dtypes, shapes and where the bytes are, in one call.
    pub fn list(&self, model: ModelId) -> Result<Vec<TensorInfo>, StoreError> {
        self.shared.not_forked()?;
        let state = self.shared.lock();
        let mut infos: Vec<TensorInfo> = state
            .model(model)?
            .tensors
            .iter()
            .filter_map(|&id| state.tensor(id).ok().map(|t| TensorInfo::of(id, t)))
            .collect();
        drop(state);
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(infos)
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
        self.shared.not_forked()?;
        let (extent, len, was_mapped, guard) = {
            let mut state = self.shared.lock();
            let entry = state.touch(id)?;
            if let Some(buf) = &entry.ram {
                let view = View::Ram(Arc::clone(buf));
                entry.pins += 1;
                return Ok(self.shared.guard(id, entry, view));
            }
            let Some(extent) = entry.clean_extent().cloned() else {
                drop(state);
                return self.acquire_ram(id);
            };
            let found = (extent, entry.len, entry.mapped);
            let entry = state.pin(id)?;
            entry.mapped = true;
            let view = View::Mapped {
                source: Arc::clone(&found.0.source),
                offset: found.0.offset as usize,
                len: found.1 as usize,
            };
            // From here the guard owns the pin: on error its drop unpins.
            let guard = self.shared.guard(id, entry, view);
            (found.0, found.1, found.2, guard)
        };
        if let Err(err) = extent.source.fault_in(extent.offset, len) {
            // Unmarked only when no other guard relies on the pages being marked.
            if !was_mapped
                && let Ok(entry) = self.shared.lock().tensor_mut(id)
                && entry.pins == 1
            {
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
    /// evicted in policy order to make room, with no lock held while they are written. Fails
    /// with [`MemoryError::OverBudget`] or [`MemoryError::UnderReserve`] when even that is not
    /// enough: nothing is allocated past the budget.
    pub fn acquire_ram(&self, id: TensorId) -> Result<TensorGuard, StoreError> {
        self.acquire_ram_with(id, Room::Evict)
    }

    /// [`Store::acquire_ram`], making room as `room` allows.
    fn acquire_ram_with(&self, id: TensorId, room: Room) -> Result<TensorGuard, StoreError> {
        let mut pending = match self.begin_ram(id, room)? {
            Begun::Ready(guard) => return Ok(guard),
            Begun::Pending(pending) => pending,
        };
        let restored = unwinding(|| {
            self.shared.restore(
                &pending.name,
                pending.len,
                &pending.from,
                Target::Ram {
                    reuse: pending.reuse.take(),
                },
            )
        })
        .unwrap_or_else(|| {
            Err(StoreError::Restore(RestoreError::Panicked {
                name: pending.name.clone(),
            }))
        });
        self.finish_ram(pending, restored)
    }

    /// The first half of a RAM acquire: the tensor's existing RAM copy pinned, or room reserved
    /// for a new one, the tensor pinned and the copy to read it from chosen. A
    /// [`Begun::Pending`] must be handed to [`Store::finish_ram`].
    fn begin_ram(&self, id: TensorId, room: Room) -> Result<Begun, StoreError> {
        self.shared.not_forked()?;
        let (name, len) = {
            let mut state = self.shared.lock();
            let entry = state.touch(id)?;
            if let Some(buf) = &entry.ram {
                let buf = Arc::clone(buf);
                entry.pins += 1;
                return Ok(Begun::Ready(self.shared.guard(id, entry, View::Ram(buf))));
            }
            (entry.name.clone(), entry.len)
        };
        // The room is reserved before the read so that concurrent loads cannot overshoot
        // together.
        let mut state = self.shared.admit(id, &name, len, room)?;
        let chosen = match state.tensor(id) {
            // Another thread restored it meanwhile.
            Ok(entry) if entry.ram.is_some() => None,
            Ok(entry) => Some(CopySource::of(&state, entry, Tier::Ram)),
            Err(err) => Some(Err(err)),
        };
        let from = match chosen {
            None => {
                state.unreserve(len);
                let entry = state.pin(id)?;
                let buf = Arc::clone(entry.ram.as_ref().expect("checked above"));
                let guard = self.shared.guard(id, entry, View::Ram(buf));
                self.shared.check(&mut state);
                return Ok(Begun::Ready(guard));
            }
            Some(Ok(from)) => from,
            Some(Err(err)) => {
                state.unreserve(len);
                self.shared.check(&mut state);
                return Err(err);
            }
        };
        let entry = state.pin(id)?;
        if from.reads_spill() {
            entry.spill_readers += 1;
        }
        // A pooled buffer for a read into RAM (from the model file at the extent's place in
        // its blocks, from the spill file at its start).
        let reuse = match &from {
            CopySource::File(extent, _) => state.take_pooled(
                crate::sys::direct::DirectBuf::padded_len(extent.offset, len),
            ),
            CopySource::Spill { .. } => {
                state.take_pooled(crate::sys::direct::DirectBuf::padded_len(0, len))
            }
            _ => None,
        };
        if reuse.is_some() {
            Stats::add(&self.shared.stats.pool_reuses, 1);
        }
        self.shared.check(&mut state);
        Ok(Begun::Pending(Pending {
            id,
            name,
            len,
            from,
            reuse,
        }))
    }

    /// The second half of a RAM acquire: installs the restored copy and returns its guard, or
    /// undoes [`Store::begin_ram`] (room, pin) and returns the error.
    fn finish_ram(
        &self,
        pending: Pending,
        restored: Result<Option<ram::RamBuf>, StoreError>,
    ) -> Result<TensorGuard, StoreError> {
        let Pending {
            id,
            name,
            len,
            from,
            reuse,
        } = pending;
        drop(reuse);
        // Its share of a device copy goes before the pin does (see `TensorGuard::drop`).
        let (reads_spill, reads_file) = (from.reads_spill(), from.reads_file());
        drop(from);
        let mut state = self.shared.lock();
        state.unreserve(len);
        let result = match restored {
            Ok(Some(buf)) => {
                if reads_file {
                    state.count_file_restore(id);
                }
                Ok(state.install_ram(id, buf))
            }
            Ok(None) => Err(StoreError::Restore(RestoreError::NoCopy {
                name: name.clone(),
                tier: Tier::Ram,
            })),
            Err(err) => Err(err),
        };
        if reads_spill {
            state.end_spill_read(id);
        }
        let result = match result.and_then(|buf| Ok((buf, state.tensor(id)?))) {
            Ok((buf, entry)) => {
                let guard = self.shared.guard(id, entry, View::Ram(buf));
                self.shared.check(&mut state);
                drop(state);
                Ok(guard)
            }
            Err(err) => {
                state.unpin(id);
                self.shared.check(&mut state);
                drop(state);
                Err(err)
            }
        };
        if reads_spill {
            // The extent it came from, punched outside the registry lock.
            self.shared.spill.reclaim();
        }
        result
    }

    /// Registers a new dirty tensor in `model` from owned bytes (a cast, a quantization, a
    /// merged LoRA). It counts against the RAM budget.
    pub fn derive(
        &self,
        model: ModelId,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
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
        shape: &[usize],
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
        shape: &[usize],
        bytes: TensorBytes,
        recipe: Option<Recipe>,
    ) -> Result<TensorId, StoreError> {
        self.shared.not_forked()?;
        check_len(name, dtype, shape, bytes.len())?;
        let len = bytes.len();
        let duplicate = |state: &State| -> Result<(), StoreError> {
            let entry = state.model(model)?;
            if entry.by_name.contains_key(name) {
                return Err(StoreError::Update(UpdateError::DuplicateName {
                    model: entry.path.clone(),
                    name: name.into(),
                }));
            }
            Ok(())
        };
        duplicate(&self.shared.lock())?;
        // The id the tensor will get; eviction only needs it to exclude nothing registered.
        let pending = TensorId(u32::MAX);
        let mut state = self.shared.admit(pending, name, len, Room::Evict)?;
        state.unreserve(len);
        if let Err(err) = duplicate(&state) {
            self.shared.check(&mut state);
            return Err(err);
        }
        let id = TensorId(state.tensors.len() as u32);
        let mut entry = TensorEntry::new(model, name.to_owned(), dtype, shape.into(), len);
        entry.recipe = recipe;
        state.tensors.push(Some(entry));
        state.install_ram(id, bytes.into_ram());
        state.touch(id)?;
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
        self.shared.not_forked()?;
        let bytes = bytes.into();
        let (name, mut held) = {
            let state = self.shared.lock_idle(id);
            let entry = state.unpinned(id)?;
            check_len(&entry.name, entry.dtype, &entry.shape, bytes.len())?;
            (
                entry.name.clone(),
                entry.ram.as_ref().map_or(0, |b| b.len()),
            )
        };
        let mut state = loop {
            // The old copy's room is reused; only the difference is made room for.
            let extra = bytes.len().saturating_sub(held);
            let mut state = self.shared.admit(id, &name, extra, Room::Evict)?;
            state.unreserve(extra);
            // The lock was let go while making room: check again.
            if let Err(err) = state.unpinned(id).map(drop) {
                self.shared.check(&mut state);
                return Err(err);
            }
            let entry = state.tensor(id)?;
            let now = entry.ram.as_ref().map_or(0, |b| b.len());
            if entry.busy || now < held {
                // Being evicted, or evicted meanwhile: its room is no longer there.
                held = now;
                while state.tensor(id).is_ok_and(|t| t.busy) {
                    state = self.shared.wait_changed(state);
                }
                continue;
            }
            break state;
        };
        // The file's pages and any device copy no longer hold this tensor's bytes.
        let released = state.drop_clean(id, false);
        self.shared.record_drop(released);
        state.free_ram(id);
        self.shared.release_device_copy(&mut state, id);
        state.make_dirty(id)?;
        state.install_ram(id, bytes.into_ram());
        state.touch(id)?;
        self.shared.check(&mut state);
        drop(state);
        self.shared.spill.reclaim();
        Ok(())
    }

    /// Records that the tensor's RAM copy was written in place — through a pointer a binding
    /// handed to a framework (a DLPack or buffer-protocol view of a [`TensorGuard`]'s bytes,
    /// which PyTorch may patch with `copy_`) — so that its RAM copy is now its only copy: the
    /// tensor becomes dirty (its file pages, recipe and spill extent no longer hold its bytes)
    /// and is spilled when evicted, never dropped. Nothing is copied.
    ///
    /// Guards may be alive: they share that one RAM copy. Fails when the tensor has no RAM
    /// copy ([`UpdateError::NotInRam`]: the writes, if any, went nowhere lowtide keeps) or a
    /// device guard holds its device copy, whose bytes are now stale ([`UpdateError::Pinned`]).
    /// Writes made before this call and after the copy was last restored are kept; a copy
    /// written without it stays clean and its writes are lost when it is dropped.
    pub fn mark_dirty(&self, id: TensorId) -> Result<(), StoreError> {
        self.shared.not_forked()?;
        let mut state = self.shared.lock_idle(id);
        let entry = state.tensor(id)?;
        if entry.ram.is_none() {
            return Err(StoreError::Update(UpdateError::NotInRam {
                name: entry.name.clone(),
            }));
        }
        if let Some(copy) = &entry.device
            && Arc::strong_count(&copy.alloc) > 1
        {
            return Err(StoreError::Update(UpdateError::Pinned {
                name: entry.name.clone(),
                pins: entry.pins,
            }));
        }
        // A device copy, a spill extent and a recipe all hold the old bytes.
        self.shared.release_device_copy(&mut state, id);
        state.make_dirty(id)?;
        state.touch(id)?;
        self.shared.check(&mut state);
        drop(state);
        self.shared.spill.reclaim();
        Ok(())
    }

    /// Reverts a patched tensor to its original bytes in its file: its RAM, device and spill
    /// copies are dropped (nothing is written) and it is clean again — switching a LoRA off
    /// costs no write. Fails for tensors that were derived rather than opened from a file, and
    /// while a guard pins it. Returns the bytes of copies freed.
    pub fn revert(&self, id: TensorId) -> Result<u64, StoreError> {
        self.shared.not_forked()?;
        let mut state = self.shared.lock_idle(id);
        let entry = state.unpinned(id)?;
        if entry.base.is_none() {
            return Err(StoreError::Update(UpdateError::NotFromFile {
                name: entry.name.clone(),
            }));
        }
        if entry.is_clean() {
            return Ok(0);
        }
        let mut freed = state.release_ram(id);
        freed += self.shared.release_device_copy(&mut state, id);
        state.make_clean(id)?;
        state.touch(id)?;
        self.shared.check(&mut state);
        drop(state);
        self.shared.spill.reclaim();
        Ok(freed)
    }

    /// Removes a derived tensor from its model: its RAM, device and spill copies are freed
    /// (nothing is written) and its name can be derived again — dropping a result that is no
    /// longer wanted (a patch switched off) leaves nothing behind. Fails for tensors opened
    /// from a file (revert those) and while a guard pins it. Returns the bytes of copies
    /// freed.
    pub fn discard(&self, id: TensorId) -> Result<u64, StoreError> {
        self.shared.not_forked()?;
        let mut state = self.shared.lock_idle(id);
        let entry = state.unpinned(id)?;
        if entry.base.is_some() {
            return Err(StoreError::Update(UpdateError::FromFile {
                name: entry.name.clone(),
            }));
        }
        let (model, name) = (entry.model, entry.name.clone());
        let mut freed = state.release_ram(id);
        freed += self.shared.release_device_copy(&mut state, id);
        state.free_spilled(id);
        let removed = state.tensors[id.0 as usize].take();
        if let Some(Some(entry)) = state.models.get_mut(model.0 as usize) {
            entry.tensors.retain(|&t| t != id);
            entry.by_name.remove(&name);
        }
        self.shared.check(&mut state);
        drop(state);
        drop(removed);
        self.shared.spill.reclaim();
        Ok(freed)
    }

    /// Drops the tensor's clean copies: frees its RAM copy and releases its mapped pages (only
    /// the pages that belong to it alone). Writes nothing. A dirty tensor keeps its copy.
    pub fn drop_clean(&self, id: TensorId) -> Result<DropOutcome, StoreError> {
        self.shared.not_forked()?;
        let mut state = self.shared.lock();
        state.unpinned(id)?;
        let outcome = state.drop_clean(id, true);
        self.shared.record_drop(outcome);
        self.shared.check(&mut state);
        Ok(outcome)
    }

    /// Drops the clean copies of every unpinned tensor of a model (see [`Store::drop_clean`]).
    pub fn release_model(&self, model: ModelId) -> Result<DropOutcome, StoreError> {
        self.shared.not_forked()?;
        let mut state = self.shared.lock();
        let ids = state.model(model)?.tensors.clone();
        let mut total = DropOutcome::default();
        for id in ids {
            total += state.drop_clean(id, true);
        }
        self.shared.record_drop(total);
        self.shared.check(&mut state);
        Ok(total)
    }

    /// Evicts at least `bytes` of RAM copies in policy order if it can: clean copies are
    /// dropped, dirty ones spilled (or dropped when their recipe is cheaper), as the policy's
    /// fates say. No lock is held while spills are written.
    pub fn free_memory(&self, bytes: u64) -> FreeOutcome {
        if self.shared.not_forked().is_err() {
            return FreeOutcome::default();
        }
        self.shared.evict(bytes, EvictReason::Request, None)
    }

    /// Frees RAM copies until the available memory is back above the RAM reserve, as the
    /// pressure monitor does on each of its ticks: clean copies dropped, dirty ones spilled,
    /// in policy order. Call it after unpinning many tensors (a framework unloading a model)
    /// to apply the reserve at once instead of at the next tick or allocation. Frees nothing
    /// when the reserve is off or met.
    pub fn relieve_reserve(&self) -> FreeOutcome {
        if self.shared.not_forked().is_err() {
            return FreeOutcome::default();
        }
        self.shared.relieve(false)
    }

    /// Spills one dirty tensor's RAM copy now. On error (disk full, `spill_max`) the tensor
    /// keeps its RAM copy. Returns the RAM bytes freed: none for a clean tensor, one already
    /// spilled, or one a guard pinned while it was written (it then has both copies).
    pub fn spill(&self, id: TensorId) -> Result<u64, StoreError> {
        self.shared.not_forked()?;
        let (name, buf) = {
            let mut state = self.shared.lock_idle(id);
            let entry = state.unpinned(id)?;
            let name = entry.name.clone();
            let Some(buf) = entry.ram.clone().filter(|_| !entry.is_clean()) else {
                return Ok(0);
            };
            if entry.spilled.is_some() {
                // Already in the spill file: nothing to write.
                let freed = state.release_ram(id);
                self.shared.count_request_eviction();
                self.shared.check(&mut state);
                return Ok(freed);
            }
            state.tensor_mut(id)?.busy = true;
            (name, buf)
        };
        let written = self.shared.write_spill(buf.as_slice());
        drop(buf);
        let mut state = self.shared.lock();
        let result = match state.tensor_mut(id) {
            Err(err) => {
                if let Ok(extent) = written {
                    self.shared.spill.free(extent);
                }
                Err(err)
            }
            Ok(entry) => {
                entry.busy = false;
                let pinned = entry.pins > 0;
                match written {
                    Ok(extent) => {
                        Stats::add(&self.shared.stats.bytes_spilled, extent.len);
                        Stats::add(&self.shared.stats.bytes_written, extent.len);
                        state.set_spilled(id, extent);
                        if pinned {
                            Ok(0)
                        } else {
                            self.shared.count_request_eviction();
                            Ok(state.release_ram(id))
                        }
                    }
                    Err(source) => {
                        Stats::add(&self.shared.stats.spill_failures, 1);
                        Err(StoreError::Update(UpdateError::Spill { name, source }))
                    }
                }
            }
        };
        self.shared.check(&mut state);
        drop(state);
        self.shared.changed.notify_all();
        result
    }

    /// Bytes the spill file holds now.
    pub fn spill_used(&self) -> u64 {
        self.shared.spill.used()
    }

    /// Closes a model: frees its copies and spill extents and forgets its tensors. Fails while
    /// any is pinned.
    pub fn close_model(&self, model: ModelId) -> Result<(), StoreError> {
        self.shared.not_forked()?;
        let mut state = self.shared.lock_model_idle(model);
        let ids = state.model(model)?.tensors.clone();
        for &id in &ids {
            state.unpinned(id)?;
        }
        // Entries (and with them the last references to the model's files, whose mappings are
        // unmapped when dropped) are dropped after the lock is let go.
        let mut closed = Vec::with_capacity(ids.len());
        for id in ids {
            let outcome = state.drop_clean(id, true);
            self.shared.record_drop(outcome);
            state.release_ram(id);
            state.free_spilled(id);
            self.shared.release_device_copy(&mut state, id);
            closed.push(state.tensors[id.0 as usize].take());
        }
        let entry = state.models[model.0 as usize].take();
        self.shared.check(&mut state);
        drop(state);
        drop((closed, entry));
        self.shared.spill.reclaim();
        Ok(())
    }

    /// The store's counters now.
    pub fn stats(&self) -> StatsSnapshot {
        let mut stats = self.shared.stats.snapshot();
        if self.shared.not_forked().is_ok() {
            stats.release_pending_bytes = self.shared.lock().releaser.pending();
        }
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
        if self.shared.not_forked().is_err() {
            // The releaser thread is the parent's: there is nothing here to wait for.
            return;
        }
        let releaser = Arc::clone(&self.shared.lock().releaser);
        releaser.wait();
    }
}

impl Shared {
    fn count_request_eviction(&self) {
        Stats::add(&self.stats.evictions, 1);
        Stats::add(&self.stats.evictions_request, 1);
    }

    fn record_drop(&self, outcome: DropOutcome) {
        Stats::add(&self.stats.ram_dropped_bytes, outcome.ram_bytes);
        Stats::add(&self.stats.mapped_released_bytes, outcome.mapped_bytes);
    }
}

/// Runs work the store does outside its lock that may panic — a recipe, a plugged-in
/// storage, device, reader or policy, a helper thread the system refuses to start — and
/// turns a panic into `None`, so that the caller undoes what it marked (pins, reservations,
/// busy flags) instead of leaving them set for good. The panic itself is reported by the
/// panic hook as usual.
pub(crate) fn unwinding<T>(f: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok()
}

/// The most host memory a store's transfer buffers hold beyond its RAM budget, for tensors
/// of at most `largest` bytes moved to and from devices in chunks of `device_chunk` bytes
/// ([`Device::chunk_len`](crate::Device::chunk_len)): the device upload windows and the
/// spill file's bounce and stream buffers. With the RAM budget, the reserve and, for a device
/// in host memory, the device's capacity, it bounds the memory a store makes its process
/// hold; a memory limit below that sum cannot be kept (docs/reliability.md).
pub fn scratch_bytes(largest: u64, device_chunk: usize) -> u64 {
    copies::upload_windows_bound(largest, device_chunk)
        + crate::spill::buffers_bound(largest, device_chunk)
}

fn check_len(name: &str, dtype: Dtype, shape: &[usize], actual: u64) -> Result<(), StoreError> {
    // For ggml block types the innermost dimension must also be whole blocks.
    let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let Some(expected) = dtype.bytes_for_shape(&dims) else {
        return Err(StoreError::Update(UpdateError::BadShape {
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
        }));
    };
    if expected == actual {
        return Ok(());
    }
    Err(StoreError::Update(UpdateError::ByteLength {
        name: name.to_owned(),
        dtype,
        shape: shape.to_vec(),
        expected,
        actual,
    }))
}

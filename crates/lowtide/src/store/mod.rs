//! The store: models, tensors, their copies, guards and the RAM budget.
//!
//! One lock guards the registry (`State`); file I/O (page faults, reads) happens outside it
//! while the tensor is pinned, so threads working on different tensors do not wait on each
//! other's disk reads.

mod error;
mod guard;
mod state;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub use error::{ConfigError, StoreError};
pub use guard::TensorGuard;
pub use state::DropOutcome;

use crate::dtype::Dtype;
use crate::source::ModelFiles;
use crate::stats::{Stats, StatsSnapshot};
use crate::sys::AlignedBuf;
use guard::View;
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
}

/// What the store knows about a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Live guards.
    pub pins: u32,
}

/// Settings for a [`Store`].
#[derive(Debug, Clone, Default)]
pub struct StoreBuilder {
    ram_budget: Option<u64>,
}

impl StoreBuilder {
    /// The most anonymous bytes (RAM copies) the store may hold.
    ///
    /// Default: half of the system's available memory when the store is built.
    pub fn ram_budget(mut self, bytes: u64) -> Self {
        self.ram_budget = Some(bytes);
        self
    }

    /// Validates the settings and creates the store.
    pub fn build(self) -> Result<Store, ConfigError> {
        let ram_budget = self.ram_budget.unwrap_or_else(default_ram_budget);
        if ram_budget == 0 {
            return Err(ConfigError::ZeroBudget);
        }
        Ok(Store {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                stats: Stats::default(),
                ram_budget,
            }),
        })
    }
}

/// Half of `MemAvailable`, or 1 GiB where `/proc/meminfo` cannot be read.
fn default_ram_budget() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    available.map_or(1 << 30, |bytes| (bytes / 2).max(1))
}

pub(crate) struct Shared {
    state: Mutex<State>,
    stats: Stats,
    ram_budget: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the registry consistent at operation
        // boundaries (every mutation completes before anything can panic), so carry on.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn unpin(&self, id: TensorId) {
        let mut state = self.lock();
        if let Ok(entry) = state.tensor_mut(id) {
            entry.pins = entry.pins.saturating_sub(1);
        }
    }

    fn check(&self, state: &State) {
        if cfg!(feature = "strict") {
            state.assert_invariants(self.ram_budget);
        }
        self.stats.set_anon(state.anon);
    }

    /// Makes room for `bytes` more anonymous bytes by dropping clean RAM copies, least
    /// recently used first. Never touches pinned copies or `for_tensor`.
    fn make_room(
        &self,
        state: &mut State,
        for_tensor: TensorId,
        name: &str,
        bytes: u64,
    ) -> Result<(), StoreError> {
        let budget = self.ram_budget;
        if state.anon + state.reserved + bytes <= budget {
            return Ok(());
        }
        let victims = state.clean_ram_victims(for_tensor);
        let freeable: u64 = victims
            .iter()
            .filter_map(|&id| state.tensor(id).ok())
            .map(|t| t.len)
            .sum();
        let available = budget.saturating_sub(state.anon + state.reserved) + freeable;
        if available < bytes {
            return Err(StoreError::OverBudget {
                name: name.to_owned(),
                requested: bytes,
                available,
                budget,
            });
        }
        for id in victims {
            if state.anon + state.reserved + bytes <= budget {
                break;
            }
            let freed = state.free_ram(id);
            Stats::add(&self.stats.ram_dropped_bytes, freed);
            Stats::add(&self.stats.evictions, 1);
        }
        Ok(())
    }
}

/// The registry of models and tensors, their copies, and the RAM budget.
///
/// Cheap to clone (an `Arc` inside); `Send + Sync`, meant to be shared by many threads.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("ram_budget", &self.shared.ram_budget)
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
        self.shared.ram_budget
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
                pins: 0,
                last_use: 0,
            }));
            tensors.push(id);
            by_name.insert(name.clone(), id);
        }
        state.models.push(Some(ModelEntry {
            path: files.path.clone(),
            tensors,
            by_name,
        }));
        Ok(model)
    }

    /// The tensors of a model, ordered by name.
    pub fn tensors(&self, model: ModelId) -> Result<Vec<TensorId>, StoreError> {
        let state = self.shared.lock();
        let mut ids = state.model(model)?.tensors.clone();
        ids.sort_by(|a, b| {
            let name = |id: &TensorId| {
                state
                    .tensor(*id)
                    .map(|t| t.name.clone())
                    .unwrap_or_default()
            };
            name(a).cmp(&name(b))
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
            pins: t.pins,
        })
    }

    /// Pins a host view of the tensor: its RAM copy if it has one, else the source file's own
    /// mapped pages (faulted in safely, costing no anonymous memory).
    pub fn acquire(&self, id: TensorId) -> Result<TensorGuard, StoreError> {
        let (source, offset, len, was_mapped) = {
            let mut state = self.shared.lock();
            let now = state.tick();
            let entry = state.tensor_mut(id)?;
            entry.last_use = now;
            if let Some(buf) = &entry.ram {
                let view = View::Ram(Arc::clone(buf));
                entry.pins += 1;
                Stats::add(&self.shared.stats.acquires, 1);
                return Ok(TensorGuard {
                    shared: Arc::clone(&self.shared),
                    id,
                    view,
                });
            }
            let Origin::Source { source, offset } = &entry.origin else {
                unreachable!("a dirty tensor always has a RAM copy (checked in strict mode)");
            };
            let found = (Arc::clone(source), *offset, entry.len, entry.mapped);
            entry.pins += 1;
            entry.mapped = true;
            found
        };
        let guard = TensorGuard {
            shared: Arc::clone(&self.shared),
            id,
            view: View::Mapped {
                source: Arc::clone(&source),
                offset: offset as usize,
                len: len as usize,
            },
        };
        // On error the guard's drop unpins; the pages were not (all) faulted in.
        if let Err(err) = source.fault_in(offset, len) {
            if !was_mapped {
                if let Ok(entry) = self.shared.lock().tensor_mut(id) {
                    entry.mapped = false;
                }
            }
            return Err(err.into());
        }
        if !was_mapped {
            Stats::add(&self.shared.stats.bytes_read_source, len);
        }
        Stats::add(&self.shared.stats.acquires, 1);
        Ok(guard)
    }

    /// Pins an owned RAM copy of the tensor, reading it from the source when it has none.
    ///
    /// The copy counts against the RAM budget; clean copies of other tensors are dropped (least
    /// recently used first) to make room. Fails with [`StoreError::OverBudget`] when even that
    /// is not enough; nothing is allocated past the budget.
    pub fn acquire_ram(&self, id: TensorId) -> Result<TensorGuard, StoreError> {
        let (source, offset, len, name) = {
            let mut state = self.shared.lock();
            let now = state.tick();
            let entry = state.tensor_mut(id)?;
            entry.last_use = now;
            if let Some(buf) = &entry.ram {
                let view = View::Ram(Arc::clone(buf));
                entry.pins += 1;
                Stats::add(&self.shared.stats.acquires, 1);
                return Ok(TensorGuard {
                    shared: Arc::clone(&self.shared),
                    id,
                    view,
                });
            }
            let Origin::Source { source, offset } = &entry.origin else {
                unreachable!("a dirty tensor always has a RAM copy (checked in strict mode)");
            };
            let found = (Arc::clone(source), *offset, entry.len, entry.name.clone());
            // Reserve the bytes now so concurrent loads cannot overshoot the budget together.
            self.shared.make_room(&mut state, id, &found.3, found.2)?;
            state.reserved += found.2;
            state.tensor_mut(id)?.pins += 1;
            found
        };
        let unreserve = |shared: &Shared| {
            let mut state = shared.lock();
            state.reserved -= len;
            if let Ok(entry) = state.tensor_mut(id) {
                entry.pins -= 1;
            }
            shared.check(&state);
        };
        let Some(mut buf) = AlignedBuf::zeroed(len as usize) else {
            unreserve(&self.shared);
            return Err(StoreError::Alloc { name, bytes: len });
        };
        if let Err(err) = source.read_into(offset, buf.as_mut_slice()) {
            unreserve(&self.shared);
            return Err(err.into());
        }
        Stats::add(&self.shared.stats.bytes_read_source, len);
        let mut state = self.shared.lock();
        state.reserved -= len;
        let entry = state.tensor_mut(id)?;
        // Another thread may have loaded it meanwhile: then keep that copy and drop ours.
        let buf = if let Some(existing) = &entry.ram {
            Arc::clone(existing)
        } else {
            let buf = Arc::new(RamBuf::Aligned(buf));
            entry.ram = Some(Arc::clone(&buf));
            state.anon += len;
            buf
        };
        self.shared.check(&state);
        drop(state);
        Stats::add(&self.shared.stats.acquires, 1);
        Ok(TensorGuard {
            shared: Arc::clone(&self.shared),
            id,
            view: View::Ram(buf),
        })
    }

    /// Registers a new dirty tensor in `model` from owned bytes (a cast, a quantization, a
    /// merged LoRA). It counts against the RAM budget.
    pub fn derive(
        &self,
        model: ModelId,
        name: &str,
        dtype: Dtype,
        shape: &[u64],
        bytes: Vec<u8>,
    ) -> Result<TensorId, StoreError> {
        check_len(name, dtype, shape, bytes.len() as u64)?;
        let mut state = self.shared.lock();
        let entry = state.model(model)?;
        if entry.by_name.contains_key(name) {
            return Err(StoreError::DuplicateName {
                model: entry.path.clone(),
                name: name.into(),
            });
        }
        let id = TensorId(state.tensors.len() as u32);
        let len = bytes.len() as u64;
        self.shared.make_room(&mut state, id, name, len)?;
        let now = state.tick();
        state.tensors.push(Some(TensorEntry {
            model,
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
            len,
            origin: Origin::Derived,
            ram: Some(Arc::new(RamBuf::Owned(bytes.into_boxed_slice()))),
            mapped: false,
            pins: 0,
            last_use: now,
        }));
        state.anon += len;
        let model_entry = state.models[model.0 as usize]
            .as_mut()
            .expect("checked above");
        model_entry.tensors.push(id);
        model_entry.by_name.insert(name.to_owned(), id);
        self.shared.check(&state);
        Ok(id)
    }

    /// Replaces a tensor's bytes (after patching it): the tensor becomes dirty and its new
    /// bytes are its only copy. Fails while a guard pins it; on any error the tensor is
    /// unchanged.
    pub fn replace(&self, id: TensorId, bytes: Vec<u8>) -> Result<(), StoreError> {
        let mut state = self.shared.lock();
        let entry = state.tensor(id)?;
        let name = entry.name.clone();
        check_len(&name, entry.dtype, &entry.shape, bytes.len() as u64)?;
        if entry.pins > 0 {
            return Err(StoreError::Pinned {
                name,
                pins: entry.pins,
            });
        }
        let held = entry.ram.as_ref().map_or(0, |b| b.len());
        let len = bytes.len() as u64;
        self.shared
            .make_room(&mut state, id, &name, len.saturating_sub(held))?;
        // Release the file's pages first: they no longer hold this tensor's bytes.
        state.drop_clean(id);
        state.free_ram(id);
        let now = state.tick();
        let entry = state.tensor_mut(id)?;
        entry.origin = Origin::Derived;
        entry.ram = Some(Arc::new(RamBuf::Owned(bytes.into_boxed_slice())));
        entry.last_use = now;
        state.anon += len;
        self.shared.check(&state);
        Ok(())
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
        let outcome = state.drop_clean(id);
        self.record_drop(outcome);
        self.shared.check(&state);
        Ok(outcome)
    }

    /// Drops the clean copies of every unpinned tensor of a model (see [`Store::drop_clean`]).
    pub fn release_model(&self, model: ModelId) -> Result<DropOutcome, StoreError> {
        let mut state = self.shared.lock();
        let ids = state.model(model)?.tensors.clone();
        let mut total = DropOutcome::default();
        for id in ids {
            total += state.drop_clean(id);
        }
        self.record_drop(total);
        self.shared.check(&state);
        Ok(total)
    }

    /// Closes a model: frees its copies and forgets its tensors. Fails while any is pinned.
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
            let outcome = state.drop_clean(id);
            self.record_drop(outcome);
            state.free_ram(id);
            state.tensors[id.0 as usize] = None;
        }
        state.models[model.0 as usize] = None;
        self.shared.check(&state);
        Ok(())
    }

    /// The store's counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    fn record_drop(&self, outcome: DropOutcome) {
        Stats::add(&self.shared.stats.ram_dropped_bytes, outcome.ram_bytes);
        Stats::add(
            &self.shared.stats.mapped_released_bytes,
            outcome.mapped_bytes,
        );
    }
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

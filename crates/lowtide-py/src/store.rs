//! `Store`, `Model`, `TensorInfo` and `Prefetch`: thin classes over [`lowtide::Store`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};

use lowtide::{Dtype, HandleError, ModelId, StoreError, TensorId, Tier};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::errors::{
    IntoPy, Raised, config_error, describe, model_closed, store_closed, store_error,
    store_error_while,
};
use crate::lease::Lease;
use crate::size::{bytes_of, optional_bytes};

/// The Rust store, shared by a `Store` and its models; `None` once closed.
#[derive(Default)]
struct Shared {
    store: RwLock<Option<lowtide::Store>>,
    models: Mutex<Vec<ModelId>>,
}

impl Shared {
    /// The Rust store, or `StoreClosed`.
    fn get(&self) -> PyResult<lowtide::Store> {
        self.open().ok_or_else(|| Python::attach(store_closed))
    }

    /// The Rust store; `None` once closed.
    fn open(&self) -> Option<lowtide::Store> {
        self.store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The models that `Store.close` closes: those not closed by their own `close`.
    fn models(&self) -> MutexGuard<'_, Vec<ModelId>> {
        self.models.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A store of model weights under a RAM budget (see the package docs).
#[pyclass(module = "lowtide", frozen)]
pub(crate) struct Store {
    shared: Arc<Shared>,
}

#[pymethods]
impl Store {
    #[new]
    #[pyo3(signature = (ram_budget=None, reserve_ram=None, spill_dir=None, spill_max=None, pressure=None, mapped_readahead=false, keep_streamed_cached=true))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments, each optional
    fn new(
        py: Python<'_>,
        ram_budget: Option<&Bound<'_, PyAny>>,
        reserve_ram: Option<&Bound<'_, PyAny>>,
        spill_dir: Option<PathBuf>,
        spill_max: Option<&Bound<'_, PyAny>>,
        pressure: Option<bool>,
        mapped_readahead: bool,
        keep_streamed_cached: bool,
    ) -> PyResult<Self> {
        let mut builder = lowtide::Store::builder()
            .mapped_readahead(mapped_readahead)
            .keep_streamed_cached(keep_streamed_cached);
        if let Some(bytes) = optional_bytes(ram_budget, "ram_budget")? {
            builder = builder.ram_budget(bytes);
        }
        if let Some(bytes) = optional_bytes(reserve_ram, "reserve_ram")? {
            builder = builder.reserve_ram(bytes);
        }
        if let Some(dir) = spill_dir {
            builder = builder.spill_dir(dir);
        }
        if let Some(bytes) = optional_bytes(spill_max, "spill_max")? {
            builder = builder.spill_max(bytes);
        }
        if let Some(on) = pressure {
            builder = builder.monitor(on);
        }
        // Building probes the spill file and may start the monitor thread.
        let store = py
            .detach(|| builder.build())
            .map_err(|err| config_error(py, &err))?;
        Ok(Self {
            shared: Arc::new(Shared {
                store: RwLock::new(Some(store)),
                models: Mutex::default(),
            }),
        })
    }

    /// The RAM budget in bytes.
    #[getter]
    fn ram_budget(&self) -> PyResult<u64> {
        Ok(self.shared.get()?.ram_budget())
    }

    /// The RAM reserve in bytes (0 when off).
    #[getter]
    fn reserve_ram(&self) -> PyResult<u64> {
        Ok(self.shared.get()?.reserve_ram())
    }

    /// Changes the RAM reserve (a size; 0 turns it off). Applied by the next allocation, the
    /// pressure monitor's next tick, or `relieve_reserve()`.
    #[setter]
    fn set_reserve_ram(&self, bytes: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = bytes_of(bytes, "reserve_ram")?;
        self.shared.get()?.set_reserve_ram(bytes);
        Ok(())
    }

    /// Whether the store was closed.
    #[getter]
    fn closed(&self) -> bool {
        self.shared
            .store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }

    /// Opens a model: a `.safetensors` file, a directory of shards or a shard index. Every
    /// file is validated and mapped; no tensor data is read.
    fn open_model(&self, py: Python<'_>, path: PathBuf) -> PyResult<Model> {
        let store = self.shared.get()?;
        let id = py.detach(|| store.open_model(&path)).py_err(py)?;
        self.shared.models().push(id);
        Ok(Model {
            shared: Arc::clone(&self.shared),
            id,
            path,
            closed: AtomicBool::new(false),
        })
    }

    /// Drops the clean copies of every unpinned tensor of `model`; writes nothing.
    fn release(&self, py: Python<'_>, model: &Model) -> PyResult<Py<PyDict>> {
        model.release(py)
    }

    /// Evicts at least `nbytes` of RAM copies in policy order if it can (GIL released).
    fn free_memory(&self, py: Python<'_>, nbytes: &Bound<'_, PyAny>) -> PyResult<Py<PyDict>> {
        let bytes = bytes_of(nbytes, "nbytes")?;
        let store = self.shared.get()?;
        let outcome = py.detach(|| store.free_memory(bytes));
        free_outcome(py, &outcome)
    }

    /// Frees RAM copies until the available memory is back above the reserve (clean copies
    /// dropped, dirty ones spilled), as the pressure monitor does on its ticks.
    fn relieve_reserve(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let store = self.shared.get()?;
        let outcome = py.detach(|| store.relieve_reserve());
        free_outcome(py, &outcome)
    }

    /// The memory reading the governor acts on now: `available` (the smaller of
    /// `mem_available` and the cgroup's headroom), and the cgroup's `cgroup_limit` and
    /// `cgroup_usage` (None outside a limited cgroup).
    fn memory(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let store = self.shared.get()?;
        let reading = py.detach(|| store.memory());
        let dict = PyDict::new(py);
        dict.set_item("available", reading.available)?;
        dict.set_item("mem_available", reading.mem_available)?;
        let cgroup = reading.cgroup.as_ref();
        dict.set_item("cgroup_limit", cgroup.and_then(|c| c.limit))?;
        dict.set_item("cgroup_usage", cgroup.map(|c| c.usage))?;
        Ok(dict.unbind())
    }

    /// Restores `model`'s tensors into RAM in the background, within the room the budget
    /// leaves free (never evicting).
    fn prefetch(&self, py: Python<'_>, model: &Model) -> PyResult<Prefetch> {
        model.prefetch(py)
    }

    /// Registers a new dirty tensor `name` in `model` from `data` (one copy).
    #[pyo3(signature = (model, name, data, dtype=None, shape=None))]
    fn derive(
        &self,
        py: Python<'_>,
        model: &Model,
        name: &str,
        data: &Bound<'_, PyAny>,
        dtype: Option<&str>,
        shape: Option<Vec<usize>>,
    ) -> PyResult<TensorInfo> {
        model.derive(py, name, data, dtype, shape)
    }

    /// The store's counters (`lowtide.StoreStats`: the fields of the Rust `StatsSnapshot`).
    fn stats(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let stats = self.shared.get()?.stats();
        let dict = PyDict::new(py);
        for (key, value) in stats_fields(&stats) {
            dict.set_item(key, value.into_pyobject(py)?)?;
        }
        Ok(dict.unbind())
    }

    /// Waits (GIL released) until the copies dropped so far were given back to the system.
    fn wait_released(&self, py: Python<'_>) -> PyResult<()> {
        let store = self.shared.get()?;
        py.detach(|| store.wait_released());
        Ok(())
    }

    /// Closes every model opened through this store that nothing pins, and the store itself.
    /// Live leases and arrays keep their copies until they are gone. Returns once the memory
    /// of the copies it dropped is back with the system. Idempotent.
    fn close(&self, py: Python<'_>) {
        let store = self
            .shared
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let models = std::mem::take(&mut *self.shared.models());
        if let Some(store) = store {
            py.detach(move || {
                for model in models {
                    // A pinned model stays open in the Rust store until the last view goes.
                    let _ = store.close_model(model);
                }
                // The caller may count on the memory being free once `close` returns.
                store.wait_released();
            });
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        match self.shared.get() {
            Ok(store) => format!(
                "Store(ram_budget={}, reserve_ram={})",
                store.ram_budget(),
                store.reserve_ram()
            ),
            Err(_) => "Store(closed)".into(),
        }
    }
}

/// A counter's value: most are bytes or counts, `evict_seconds` is seconds.
enum Stat {
    Int(u64),
    Float(f64),
}

impl<'py> IntoPyObject<'py> for Stat {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;
    fn into_pyobject(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self {
            Stat::Int(n) => n.into_pyobject(py)?.into_any(),
            Stat::Float(x) => x.into_pyobject(py)?.into_any(),
        })
    }
}

/// The snapshot's fields by their Rust names (through its `Serialize` implementation, so
/// that new counters show up without a change here).
fn stats_fields(stats: &lowtide::StatsSnapshot) -> Vec<(String, Stat)> {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(stats) else {
        return Vec::new();
    };
    map.into_iter()
        .filter_map(|(key, value)| {
            let stat = value
                .as_u64()
                .map(Stat::Int)
                .or_else(|| value.as_f64().map(Stat::Float))?;
            Some((key, stat))
        })
        .collect()
}

/// A model opened in a store: its tensors, views of them and changes to them.
///
/// Its file stays open until `close()`, the end of a `with` block, the store's `close()`, or
/// the object being freed (see `Drop`).
#[pyclass(module = "lowtide", frozen)]
pub(crate) struct Model {
    shared: Arc<Shared>,
    id: ModelId,
    path: PathBuf,
    /// Set by `close`: calls then raise `UnknownHandle` naming the path.
    closed: AtomicBool,
}

impl Model {
    /// The Rust store, or `UnknownHandle` once this model is closed (`StoreClosed` once the
    /// store is).
    fn store(&self, py: Python<'_>) -> PyResult<lowtide::Store> {
        if self.closed.load(Ordering::Acquire) {
            return Err(model_closed(py, &self.path));
        }
        self.shared.get()
    }

    fn tensor(&self, py: Python<'_>, name: &str) -> PyResult<(lowtide::Store, TensorId)> {
        let store = self.store(py)?;
        let id = store.tensor(self.id, name).py_err(py)?;
        Ok((store, id))
    }

    /// Closes the model in the Rust store (which refuses while a tensor is pinned), once.
    fn close_in(&self, store: &lowtide::Store) -> Result<(), StoreError> {
        match store.close_model(self.id) {
            // Closed meanwhile by another thread's `close`.
            Ok(()) | Err(StoreError::Handle(HandleError::UnknownModel { .. })) => {
                self.closed.store(true, Ordering::Release);
                self.shared.models().retain(|&id| id != self.id);
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    fn frameworks(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
        PyModule::import(py, "lowtide._frameworks")
    }

    /// Bytes of `data` copied once (GIL released during the copy) with the dtype name and
    /// shape of the array it came from, when it has them.
    fn copy_in(
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
    ) -> PyResult<(lowtide::AlignedBytes, Option<String>, Option<Vec<usize>>)> {
        let (view, dtype, shape): (Bound<'_, PyAny>, Option<String>, Option<Vec<usize>>) =
            Self::frameworks(py)?
                .call_method1("as_bytes", (data,))?
                .extract()?;
        let buffer = pyo3::buffer::PyBuffer::<u8>::get(&view)?;
        if !buffer.is_c_contiguous() {
            return Err(PyTypeError::new_err("expected contiguous bytes"));
        }
        let (addr, len) = (buffer.buf_ptr() as usize, buffer.len_bytes());
        let copy = py.detach(|| {
            let mut out = lowtide::AlignedBytes::zeroed(len)?;
            // The buffer stays acquired (and its exporter alive) until `buffer` is dropped
            // below; only the copy runs without the GIL.
            out.as_mut_slice().copy_from_slice(as_bytes(addr, len));
            Some(out)
        });
        drop(buffer);
        let copy = copy.ok_or_else(|| {
            pyo3::exceptions::PyMemoryError::new_err(format!("cannot allocate {len} bytes"))
        })?;
        Ok((copy, dtype, shape))
    }

    fn release(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let store = self.store(py)?;
        let outcome = py.detach(|| store.release_model(self.id)).py_err(py)?;
        let dict = PyDict::new(py);
        dict.set_item("ram_bytes", outcome.ram_bytes)?;
        dict.set_item("mapped_bytes", outcome.mapped_bytes)?;
        dict.set_item("kept", outcome.kept)?;
        Ok(dict.unbind())
    }

    fn prefetch(&self, py: Python<'_>) -> PyResult<Prefetch> {
        let store = self.store(py)?;
        let running = py.detach(|| store.prefetch(self.id)).py_err(py)?;
        Ok(Prefetch {
            cancel: running.canceller(),
            run: Mutex::new(Run::Running(running)),
            finished: Condvar::new(),
        })
    }

    fn derive(
        &self,
        py: Python<'_>,
        name: &str,
        data: &Bound<'_, PyAny>,
        dtype: Option<&str>,
        shape: Option<Vec<usize>>,
    ) -> PyResult<TensorInfo> {
        let store = self.store(py)?;
        let (bytes, found_dtype, found_shape) = Self::copy_in(py, data)?;
        let dtype = dtype.map(str::to_owned).or(found_dtype).ok_or_else(|| {
            PyTypeError::new_err(
                "derive: pass dtype= for data that is not a NumPy array or torch tensor",
            )
        })?;
        let dtype: Dtype = dtype
            .parse()
            .map_err(|err: lowtide::UnknownDtype| PyValueError::new_err(err.to_string()))?;
        let shape = shape.or(found_shape).ok_or_else(|| {
            PyTypeError::new_err(
                "derive: pass shape= for data that is not a NumPy array or torch tensor",
            )
        })?;
        let model = self.id;
        let id = py
            .detach(|| store.derive(model, name, dtype, &shape, bytes))
            .py_err(py)?;
        Ok(TensorInfo::from(store.info(id).py_err(py)?))
    }
}

fn as_bytes<'a>(addr: usize, len: usize) -> &'a [u8] {
    if len == 0 {
        return &[];
    }
    // SAFETY: `addr` and `len` come from a contiguous `Py_buffer` that the caller holds
    // acquired for longer than the returned slice is used; its exporter keeps the memory.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
}

#[pymethods]
impl Model {
    /// The path the model was opened from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Every tensor now, ordered by name: name, dtype, shape, size and where its bytes are.
    fn tensors(&self, py: Python<'_>) -> PyResult<Vec<TensorInfo>> {
        let store = self.store(py)?;
        let infos = store.list(self.id).py_err(py)?;
        Ok(infos.into_iter().map(TensorInfo::from).collect())
    }

    /// The names of the tensors, ordered.
    fn names(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        Ok(self.tensors(py)?.into_iter().map(|t| t.name).collect())
    }

    /// One tensor's info now.
    fn info(&self, py: Python<'_>, name: &str) -> PyResult<TensorInfo> {
        let (store, id) = self.tensor(py, name)?;
        Ok(TensorInfo::from(store.info(id).py_err(py)?))
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        let store = self.store(py)?;
        Ok(store.tensors(self.id).py_err(py)?.len())
    }

    fn __contains__(&self, py: Python<'_>, name: &str) -> PyResult<bool> {
        let store = self.store(py)?;
        match store.tensor(self.id, name) {
            Ok(_) => Ok(true),
            Err(StoreError::Handle(HandleError::NoSuchTensor { .. })) => Ok(false),
            Err(err) => Err(store_error(py, &err)),
        }
    }

    /// Whether `close()` closed it (or its store was closed).
    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.shared.open().is_none()
    }

    /// Closes the model: frees its copies and spill extents and closes its files (GIL
    /// released). Later calls on it raise `UnknownHandle`. Raises `Pinned` while a lease, an
    /// array or a tensor made from it is alive (the model stays open and usable). Closing
    /// again, or after the store was closed, does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(store) = self.shared.open() else {
            // `Store.close` closed it, or keeps it until its last view goes.
            return Ok(());
        };
        py.detach(|| self.close_in(&store)).map_err(|err| {
            let doing = format!("cannot close model {}", self.path.display());
            store_error_while(py, &doing, &err)
        })
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Closes the model; an error leaving the block is not hidden by `Pinned`.
    #[pyo3(signature = (*exc))]
    fn __exit__(&self, py: Python<'_>, exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        let raising = exc.iter().next().is_some_and(|e| !e.is_none());
        match self.close(py) {
            Err(_) if raising => Ok(false),
            Err(err) => Err(err),
            Ok(()) => Ok(false),
        }
    }

    /// Pins a RAM copy of the tensor (reading it if needed, GIL released) and returns a
    /// lease on it. No copy is made beyond the store's own RAM copy.
    fn lease(&self, py: Python<'_>, name: &str) -> PyResult<Lease> {
        let (store, id) = self.tensor(py, name)?;
        let guard = py.detach(|| store.acquire_ram(id)).py_err(py)?;
        Ok(Lease::new(store, id, name.to_owned(), guard))
    }

    /// Pins RAM copies of the named tensors (all of the model's, in file order, without
    /// names) and returns a lease on each, in that order. They are read as one stream, GIL
    /// released: the reads of the next tensors are in flight while one completes. All or
    /// none: on the first error the leases taken so far are let go and the error raised.
    #[pyo3(signature = (names=None))]
    fn leases(&self, py: Python<'_>, names: Option<Vec<String>>) -> PyResult<Vec<Lease>> {
        let store = self.store(py)?;
        let (ids, names) = if let Some(names) = names {
            let ids = names
                .iter()
                .map(|name| store.tensor(self.id, name))
                .collect::<Result<Vec<_>, _>>()
                .py_err(py)?;
            (ids, names)
        } else {
            let infos = store.list(self.id).py_err(py)?;
            infos.into_iter().map(|info| (info.id, info.name)).unzip()
        };
        let guards = py.detach(|| store.acquire_ram_many(&ids)).py_err(py)?;
        Ok(guards
            .into_iter()
            .zip(ids.into_iter().zip(names))
            .map(|(guard, (id, name))| Lease::new(store.clone(), id, name, guard))
            .collect())
    }

    /// A NumPy array over the tensor's pinned RAM copy (no copy).
    fn numpy<'py>(slf: &Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let lease = Bound::new(py, slf.get().lease(py, name)?)?;
        Self::frameworks(py)?.call_method1("to_numpy", (lease,))
    }

    /// A torch tensor over the tensor's pinned RAM copy (no copy); on another `device`, a
    /// copy there.
    #[pyo3(signature = (name, device=None))]
    fn torch<'py>(
        slf: &Bound<'py, Self>,
        name: &str,
        device: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let lease = Bound::new(py, slf.get().lease(py, name)?)?;
        Self::frameworks(py)?.call_method1("to_torch", (lease, device))
    }

    /// Replaces the tensor's bytes with `data`'s (one copy): it becomes dirty.
    fn replace(&self, py: Python<'_>, name: &str, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let (store, id) = self.tensor(py, name)?;
        let info = store.info(id).py_err(py)?;
        let (bytes, dtype, _) = Self::copy_in(py, data)?;
        if let Some(dtype) = dtype
            && dtype != info.dtype.name()
        {
            return Err(PyTypeError::new_err(format!(
                "replace `{name}`: data is {dtype}, the tensor is {}",
                info.dtype.name()
            )));
        }
        py.detach(|| store.replace(id, bytes)).py_err(py)
    }

    /// Registers a new dirty tensor from `data` (one copy).
    #[pyo3(name = "derive", signature = (name, data, dtype=None, shape=None))]
    fn py_derive(
        &self,
        py: Python<'_>,
        name: &str,
        data: &Bound<'_, PyAny>,
        dtype: Option<&str>,
        shape: Option<Vec<usize>>,
    ) -> PyResult<TensorInfo> {
        self.derive(py, name, data, dtype, shape)
    }

    /// Keeps the writes made in place through the tensor's views (`copy_`, `+=`): its RAM
    /// copy becomes its only copy, spilled when evicted, never dropped. Nothing is copied;
    /// views may stay alive. Raises `NotInRam` when it has no RAM copy.
    fn mark_dirty(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let (store, id) = self.tensor(py, name)?;
        py.detach(|| store.mark_dirty(id)).py_err(py)
    }

    /// Reverts a patched tensor to its bytes in the file; returns the bytes of copies freed.
    fn revert(&self, py: Python<'_>, name: &str) -> PyResult<u64> {
        let (store, id) = self.tensor(py, name)?;
        py.detach(|| store.revert(id)).py_err(py)
    }

    /// Removes a derived tensor: its copies (RAM, spilled) are freed, nothing is written, and
    /// its name can be derived again. Returns the bytes freed.
    fn discard(&self, py: Python<'_>, name: &str) -> PyResult<u64> {
        let (store, id) = self.tensor(py, name)?;
        py.detach(|| store.discard(id)).py_err(py)
    }

    /// Spills a dirty tensor's RAM copy now; returns the RAM bytes freed.
    fn spill(&self, py: Python<'_>, name: &str) -> PyResult<u64> {
        let (store, id) = self.tensor(py, name)?;
        py.detach(|| store.spill(id)).py_err(py)
    }

    /// Drops the clean copies of every unpinned tensor; writes nothing.
    #[pyo3(name = "release")]
    fn py_release(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        self.release(py)
    }

    /// Restores the tensors into RAM in the background, never evicting.
    #[pyo3(name = "prefetch")]
    fn py_prefetch(&self, py: Python<'_>) -> PyResult<Prefetch> {
        self.prefetch(py)
    }

    fn __repr__(&self) -> String {
        let closed = if self.closed() { ", closed" } else { "" };
        format!("Model({:?}{closed})", self.path.display().to_string())
    }
}

/// A model object freed while open closes its model, so that dropping the last reference
/// closes the file as it would a Python file object: nothing can reach the model's tensors
/// through the binding any more. Tensors still pinned by arrays or leases keep it open until
/// the store closes (closing never waits for pins). It runs with the GIL held, as destructors
/// do: closing reads nothing (it unmaps, frees copies and punches the spill file's holes).
impl Drop for Model {
    fn drop(&mut self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Some(store) = self.shared.open() {
            // `Pinned`: kept open until the store closes, as documented.
            let _ = self.close_in(&store);
        }
    }
}

/// What the store knows about one tensor at one moment.
#[pyclass(module = "lowtide", frozen, get_all)]
pub(crate) struct TensorInfo {
    /// Name within its model.
    name: String,
    /// The file's dtype name, such as `"BF16"`.
    dtype: &'static str,
    /// Shape, outermost dimension first.
    shape: Py<PyTuple>,
    /// Length in bytes.
    nbytes: u64,
    /// Its bytes equal its extent in the file.
    clean: bool,
    /// Where copies of its bytes are now, fastest first: `"device"`, `"ram"`, `"mapped"`,
    /// `"spilled"` (the file itself is not listed).
    tiers: Vec<&'static str>,
    /// Live pins (leases and the arrays made from them count once per lease).
    pins: u32,
}

impl From<lowtide::TensorInfo> for TensorInfo {
    fn from(info: lowtide::TensorInfo) -> Self {
        let shape = Python::attach(|py| {
            PyTuple::new(py, &info.shape)
                .map_or_else(|_| PyTuple::empty(py).unbind(), Bound::unbind)
        });
        Self {
            name: info.name.clone(),
            dtype: info.dtype.name(),
            shape,
            nbytes: info.len,
            clean: info.clean,
            tiers: info.tiers().into_iter().map(tier_name).collect(),
            pins: info.pins,
        }
    }
}

fn tier_name(tier: Tier) -> &'static str {
    match tier {
        Tier::Ram => "ram",
        Tier::Mapped => "mapped",
        Tier::Spilled => "spilled",
        Tier::Device => "device",
        _ => "other",
    }
}

#[pymethods]
impl TensorInfo {
    /// Whether it has a RAM copy now.
    #[getter]
    fn in_ram(&self) -> bool {
        self.tiers.contains(&"ram")
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "TensorInfo(name={:?}, dtype={:?}, shape={}, nbytes={}, clean={}, tiers={:?}, pins={})",
            self.name,
            self.dtype,
            self.shape
                .bind(py)
                .repr()
                .map_or_else(|_| "?".into(), |r| r.to_string()),
            self.nbytes,
            if self.clean { "True" } else { "False" },
            self.tiers,
            self.pins
        )
    }
}

/// A prefetch running in the background.
#[pyclass(module = "lowtide", frozen)]
pub(crate) struct Prefetch {
    run: Mutex<Run>,
    /// Signalled when `run` becomes `Finished`, for the threads waiting beside the one that
    /// joins the prefetch.
    finished: Condvar,
    /// Reaches the prefetch also while `wait` holds it (on another thread, GIL released).
    cancel: lowtide::PrefetchCancel,
}

/// Where a prefetch is, as its waiters see it.
enum Run {
    /// Not waited for yet.
    Running(lowtide::Prefetch),
    /// One thread joins it (GIL released); the others wait for `Finished`.
    Joining,
    /// Its outcome, kept for every later `wait`.
    Finished(Result<lowtide::PrefetchOutcome, Raised>),
}

impl Prefetch {
    fn lock(&self) -> MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until the prefetch has finished (call without the GIL) and returns its outcome:
    /// the first caller joins its thread, the others wait for that.
    fn join(&self) -> Result<lowtide::PrefetchOutcome, Raised> {
        let mut run = self.lock();
        loop {
            match std::mem::replace(&mut *run, Run::Joining) {
                Run::Running(prefetch) => {
                    drop(run);
                    let joined =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prefetch.wait()));
                    let outcome = match &joined {
                        Ok(result) => result.as_ref().map(|o| *o).map_err(describe),
                        Err(_) => Err(Raised::new("LowtideError", "the prefetch thread panicked")),
                    };
                    *self.lock() = Run::Finished(outcome.clone());
                    self.finished.notify_all();
                    if let Err(panic) = joined {
                        // The joining caller sees the panic itself; the others the error.
                        std::panic::resume_unwind(panic);
                    }
                    return outcome;
                }
                Run::Joining => {
                    run = self
                        .finished
                        .wait(run)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                Run::Finished(outcome) => {
                    *run = Run::Finished(outcome.clone());
                    return outcome;
                }
            }
        }
    }
}

#[pymethods]
impl Prefetch {
    /// Waits until it has finished (GIL released), from any thread and as often as asked;
    /// returns what it restored.
    fn wait(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let outcome = py
            .detach(|| self.join())
            .map_err(|raised| raised.into_pyerr(py))?;
        let dict = PyDict::new(py);
        dict.set_item("tensors", outcome.tensors)?;
        dict.set_item("bytes", outcome.bytes)?;
        dict.set_item("skipped_bytes", outcome.skipped_bytes)?;
        dict.set_item("cancelled", outcome.cancelled)?;
        Ok(dict.unbind())
    }

    /// Asks it to stop after the tensor it is restoring, also while another thread waits
    /// for it.
    fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Whether it has finished (`wait` would return at once).
    #[getter]
    fn done(&self) -> bool {
        match &*self.lock() {
            Run::Running(prefetch) => prefetch.is_finished(),
            Run::Joining => false,
            Run::Finished(_) => true,
        }
    }
}

fn free_outcome(py: Python<'_>, outcome: &lowtide::FreeOutcome) -> PyResult<Py<PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("freed_bytes", outcome.freed_bytes)?;
    dict.set_item("dropped_bytes", outcome.dropped_bytes)?;
    dict.set_item("spilled_bytes", outcome.spilled_bytes)?;
    dict.set_item("recipe_bytes", outcome.recipe_bytes)?;
    dict.set_item("spill_failures", outcome.spill_failures)?;
    Ok(dict.unbind())
}

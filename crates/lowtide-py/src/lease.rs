//! Leases: a pinned RAM copy of one tensor, handed to NumPy and PyTorch without a copy.
//!
//! Pin lifetime: the guard lives in an `Arc` shared by the lease and by every DLPack capsule
//! made from it (each capsule's deleter drops its share). The buffer protocol's consumers
//! often release their `Py_buffer` at once and keep the exporting object instead
//! (`numpy.frombuffer`, `torch.frombuffer`), so once a lease has exported a buffer its own
//! share is kept until the lease object itself is freed, whatever `close()` says. The copy
//! is unpinned when the last share goes.
//!
//! Only RAM copies (`Store::acquire_ram`) are leased: they are owned, writable memory. A
//! mapping of the model file is read-only, and PyTorch ignores DLPack's read-only flag (an
//! in-place write to such a tensor kills the process), so no mapping is ever handed out.
//!
//! Writes through a lease's memory change the RAM copy only; the store still holds the
//! tensor clean, and may drop the copy once it is unpinned. `Lease.mark_dirty` (or
//! `Model.mark_dirty`) keeps them: the copy becomes the tensor's only copy, without a copy.

use std::ffi::{CStr, c_int, c_void};
use std::sync::{Arc, Mutex, PoisonError};

use dlpark::ffi::{
    DLDataType, DLDataTypeCode, DLDevice, DLManagedTensor, DLManagedTensorVersioned,
};
use dlpark::metadata::Dynamic;
use dlpark::python::{DlpackExporter, ExportRequest, export_dlpack};
use dlpark::{DlpackFlags, Managed, ManagedTensorBase};
use lowtide::{Dtype, TensorGuard, TensorId, Tier};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;

use crate::errors::IntoPy;

/// A pinned RAM copy: held only for its drop, which unpins the tensor.
struct Pin {
    _guard: TensorGuard,
}

#[derive(Default)]
struct LeaseState {
    /// The lease's own share of the pin; `None` once closed (unless a buffer was exported).
    pin: Option<Arc<Pin>>,
    closed: bool,
    /// A buffer was exported: consumers may hold this object rather than the buffer.
    buffer_exported: bool,
}

/// A pinned RAM copy of one tensor: a view for NumPy, PyTorch or any buffer consumer.
///
/// While the lease is open, or any array or tensor made from it is alive, the copy cannot be
/// evicted. `__dlpack__` and the buffer protocol hand out the copy's own memory (writable,
/// no copy). A context manager: leaving the `with` block ends the lease's own pin; arrays
/// made from it keep theirs.
#[pyclass(module = "lowtide", frozen)]
pub(crate) struct Lease {
    pub(crate) store: lowtide::Store,
    pub(crate) id: TensorId,
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Address and length of the copy's bytes (valid while the pin lives).
    addr: usize,
    len: usize,
    /// Export every dtype as unsigned integers of its width (`bits()`), for NumPy, which has
    /// no bfloat16 or float8.
    raw: bool,
    state: Arc<Mutex<LeaseState>>,
}

impl Lease {
    /// Pins a RAM copy of `id` (the caller released the GIL around it).
    pub(crate) fn new(
        store: lowtide::Store,
        id: TensorId,
        name: String,
        guard: TensorGuard,
    ) -> Self {
        debug_assert_eq!(guard.tier(), Tier::Ram, "only RAM copies are leased");
        let bytes = guard.bytes();
        let (addr, len) = (bytes.as_ptr() as usize, bytes.len());
        Self {
            store,
            id,
            name,
            dtype: guard.dtype(),
            shape: guard.shape().to_vec(),
            addr,
            len,
            raw: false,
            state: Arc::new(Mutex::new(LeaseState {
                pin: Some(Arc::new(Pin { _guard: guard })),
                ..LeaseState::default()
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A share of the pin for a new export.
    fn share(&self) -> PyResult<Arc<Pin>> {
        let state = self.lock();
        match (&state.pin, state.closed) {
            (Some(pin), false) => Ok(Arc::clone(pin)),
            _ => Err(PyValueError::new_err(format!(
                "the lease of tensor `{}` is closed",
                self.name
            ))),
        }
    }

    /// DLPack dtype and shape of the export.
    fn dl_layout(&self) -> (DLDataType, Vec<i64>) {
        // Dimensions and lengths of an allocation fit in `isize`, so in `i64`.
        let dim = |d: usize| i64::try_from(d).unwrap_or(i64::MAX);
        let shape: Vec<i64> = self.shape.iter().map(|&d| dim(d)).collect();
        let flat = vec![dim(self.len)];
        let uint = |bits| DLDataType::scalar(DLDataTypeCode::UINT, bits);
        if self.dtype.is_quantized() {
            // ggml blocks: their bytes, one row of blocks per innermost row, as the reference
            // GGUF reader shows them (`[..., ne0]` becomes `[..., ne0 / elements * bytes]`).
            let block = self.dtype.block();
            let mut rows = shape;
            return match rows.last_mut() {
                Some(last) if block.elements > 0 => {
                    let per_row = u64::try_from(*last).unwrap_or(0) / block.elements * block.bytes;
                    *last = i64::try_from(per_row).unwrap_or(i64::MAX);
                    (uint(8), rows)
                }
                _ => (uint(8), flat),
            };
        }
        let bits = self.dtype.bits();
        if !bits.is_multiple_of(8) {
            // Packed sub-byte types (F4, F6): their bytes.
            return (uint(8), flat);
        }
        if self.raw {
            return (uint(bits as u8), shape);
        }
        let code = match self.dtype {
            Dtype::BOOL => DLDataTypeCode::BOOL,
            Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 => DLDataTypeCode::INT,
            Dtype::F16 | Dtype::F32 | Dtype::F64 => DLDataTypeCode::FLOAT,
            Dtype::BF16 => DLDataTypeCode::BFLOAT,
            Dtype::C64 => DLDataTypeCode::COMPLEX,
            // Unsigned integers, and the float8 variants, whose DLPack codes not every
            // consumer reads: their bits, viewed as the float type on the Python side.
            _ => DLDataTypeCode::UINT,
        };
        (DLDataType::scalar(code, bits as u8), shape)
    }

    fn export<M: ManagedTensorBase>(&self) -> PyResult<Managed<M>> {
        let pin = self.share()?;
        let (dtype, shape) = self.dl_layout();
        let prepared = Dynamic::compact(shape)
            .prepare_as::<M>()
            .map_err(|err| PyValueError::new_err(err.to_string()))?;
        let mut tensor = prepared.initialize(Box::new(pin));
        tensor
            .set_data(self.addr as *mut c_void)
            .set_dtype(dtype)
            .set_device(DLDevice::CPU);
        // SAFETY: the data pointer is the start of the RAM copy that `pin` (now the capsule's
        // context, dropped by its deleter) keeps pinned and alive; shape and compact strides
        // describe exactly its `len` bytes; no flag is set: the memory is an owned,
        // writable buffer (never a mapping), not a copy made for the consumer.
        Ok(unsafe { tensor.finish() })
    }
}

impl DlpackExporter for Lease {
    fn device(&self) -> DLDevice {
        DLDevice::CPU
    }

    fn flags(&self) -> DlpackFlags {
        DlpackFlags::empty()
    }

    fn prepare_export(&self, _py: Python<'_>, _request: &ExportRequest<'_>) -> PyResult<()> {
        Ok(())
    }

    fn export_legacy(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensor>> {
        self.export()
    }

    fn export_versioned(&self, _py: Python<'_>) -> PyResult<Managed<DLManagedTensorVersioned>> {
        self.export()
    }
}

static BYTE_FORMAT: &CStr = c"B";

#[pymethods]
impl Lease {
    /// The tensor's name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// The file's dtype name, such as `"BF16"`.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    /// The shape, outermost dimension first.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyTuple>> {
        pyo3::types::PyTuple::new(py, &self.shape)
    }

    /// Length in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.len
    }

    /// The address of the first byte of the RAM copy (for zero-copy checks).
    #[getter]
    fn data_ptr(&self) -> usize {
        self.addr
    }

    /// Whether the lease was closed (arrays made from it may still pin the copy).
    #[getter]
    fn closed(&self) -> bool {
        self.lock().closed
    }

    /// Ends the lease's own pin. Arrays and tensors made from it keep theirs; no new ones can
    /// be made. Once a buffer was exported (`memoryview(lease)`, `numpy.frombuffer`) the pin
    /// lasts until the lease object itself is freed, since such consumers keep the object.
    fn close(&self) {
        let pin = {
            let mut state = self.lock();
            state.closed = true;
            if state.buffer_exported {
                None
            } else {
                state.pin.take()
            }
        };
        // Unpinning takes the store's lock for a moment; the GIL is kept (no I/O).
        drop(pin);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close();
        false
    }

    /// A lease object sharing this one's pin that exports every dtype as unsigned integers
    /// of its width (`uint16` for BF16 and F16, `uint8` for the float8 types): NumPy has no
    /// bfloat16 or float8 dtype.
    fn bits(&self) -> PyResult<Self> {
        let pin = self.share()?;
        Ok(Self {
            store: self.store.clone(),
            id: self.id,
            name: self.name.clone(),
            dtype: self.dtype,
            shape: self.shape.clone(),
            addr: self.addr,
            len: self.len,
            raw: true,
            state: Arc::new(Mutex::new(LeaseState {
                pin: Some(pin),
                ..LeaseState::default()
            })),
        })
    }

    /// Keeps the writes made through this lease's views: the tensor's RAM copy (the memory
    /// they share) becomes its only copy, spilled when evicted, never dropped. Nothing is
    /// copied; the lease and its views stay usable.
    fn mark_dirty(&self, py: Python<'_>) -> PyResult<()> {
        self.share()?;
        let (store, id) = (self.store.clone(), self.id);
        py.detach(move || store.mark_dirty(id)).py_err(py)
    }

    #[pyo3(signature = (stream=None, *, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(u32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let request = ExportRequest::parse(stream.as_ref(), max_version, dl_device, copy)?;
        export_dlpack(self, py, request)
    }

    fn __dlpack_device__(&self) -> (u32, i32) {
        (DLDevice::CPU.device_type.0, 0)
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!(
            "Lease(name={:?}, dtype={:?}, shape={:?}, nbytes={}, closed={})",
            self.name,
            self.dtype.name(),
            self.shape,
            self.len,
            self.lock().closed
        )
    }

    /// The buffer protocol: the copy's bytes, one-dimensional, format `B`, writable.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("Py_buffer is null"));
        }
        let lease = slf.get();
        {
            let mut state = lease.lock();
            if state.closed || state.pin.is_none() {
                return Err(PyBufferError::new_err(format!(
                    "the lease of tensor `{}` is closed",
                    lease.name
                )));
            }
            state.buffer_exported = true;
        }
        // SAFETY: `view` is the non-null `Py_buffer` Python passes to `bf_getbuffer`. `buf`
        // points at the RAM copy pinned by this lease, whose share is kept until the lease
        // object is freed (`buffer_exported`), and `obj` holds a reference to it for as long
        // as the buffer is held. `shape` and `strides` point into the `Py_buffer` itself
        // (`len` and `itemsize`), which lives as long as the export; `format` is static.
        unsafe {
            (*view).buf = lease.addr as *mut c_void;
            (*view).obj = slf.clone().into_any().into_ptr();
            // An allocation's length fits in `isize`.
            (*view).len = isize::try_from(lease.len).unwrap_or(isize::MAX);
            (*view).readonly = 0;
            (*view).itemsize = 1;
            (*view).format = if flags & pyo3::ffi::PyBUF_FORMAT == pyo3::ffi::PyBUF_FORMAT {
                BYTE_FORMAT.as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & pyo3::ffi::PyBUF_ND == pyo3::ffi::PyBUF_ND {
                &raw mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & pyo3::ffi::PyBUF_STRIDES == pyo3::ffi::PyBUF_STRIDES {
                &raw mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}
}

//! Rust errors as Python exceptions.
//!
//! The exception classes are defined in Python (`lowtide/_errors.py`, so that they can derive
//! from both `LowtideError` and a builtin such as `MemoryError` or `ValueError`); this module
//! picks the class for each Rust variant, keeps the Rust message (with its `source()` chain)
//! and sets the variant's fields as attributes.

use lowtide::{
    ConfigError, HandleError, MemoryError, RestoreError, SourceError, StoreError, UpdateError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyModule};

/// An attribute value of an exception.
#[derive(Clone)]
pub(crate) enum Attr {
    Str(String),
    Int(u64),
    Shape(Vec<usize>),
}

/// What a Python exception is made of (built without the GIL, raised with it).
#[derive(Clone)]
pub(crate) struct Raised {
    class: &'static str,
    message: String,
    retryable: bool,
    attrs: Vec<(&'static str, Attr)>,
}

impl Raised {
    pub(crate) fn new(class: &'static str, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            retryable: false,
            attrs: Vec::new(),
        }
    }

    pub(crate) fn attr(mut self, name: &'static str, value: Attr) -> Self {
        self.attrs.push((name, value));
        self
    }

    /// The exception, ready to raise.
    pub(crate) fn into_pyerr(self, py: Python<'_>) -> PyErr {
        match self.build(py) {
            Ok(err) | Err(err) => err,
        }
    }

    fn build(self, py: Python<'_>) -> PyResult<PyErr> {
        static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
        let module = MODULE.get_or_try_init(py, || {
            PyModule::import(py, "lowtide._errors").map(Bound::unbind)
        })?;
        let attrs = PyDict::new(py);
        for (name, value) in self.attrs {
            match value {
                Attr::Str(s) => attrs.set_item(name, s)?,
                Attr::Int(n) => attrs.set_item(name, n)?,
                Attr::Shape(shape) => {
                    attrs.set_item(name, pyo3::types::PyTuple::new(py, shape)?)?;
                }
            }
        }
        // `_exception` picks the class (for an `OSError` with `errno`, the subclass that is
        // also `FileNotFoundError`, `PermissionError`...).
        let instance = module.bind(py).getattr("_exception")?.call1((
            self.class,
            self.message,
            self.retryable,
            attrs,
        ))?;
        Ok(PyErr::from_value(instance))
    }
}

/// The message with its causes, as `lowtide` prints errors: `outer: cause: cause`.
fn chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn path(p: &std::path::Path) -> Attr {
    Attr::Str(p.display().to_string())
}

/// The Python exception for a store error.
pub(crate) fn store_error(py: Python<'_>, err: &StoreError) -> PyErr {
    describe(err).into_pyerr(py)
}

/// Like [`store_error`], the message led by what was being done.
pub(crate) fn store_error_while(py: Python<'_>, doing: &str, err: &StoreError) -> PyErr {
    let mut raised = describe(err);
    raised.message = format!("{doing}: {}", raised.message);
    raised.into_pyerr(py)
}

/// Converts a `Result` with a store error, for use after `py.detach`.
pub(crate) trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, StoreError> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|err| store_error(py, &err))
    }
}

#[allow(clippy::too_many_lines)] // one arm per Rust variant, kept in one place on purpose
pub(crate) fn describe(err: &StoreError) -> Raised {
    use Attr::{Int, Shape, Str};
    let message = chain(err);
    let mut raised = match err {
        StoreError::Handle(h) => match h {
            HandleError::NoSuchTensor { model, name } => Raised::new("NoSuchTensor", &message)
                .attr("model", path(model))
                .attr("name", Str(name.clone())),
            HandleError::UnknownModel { model } => {
                Raised::new("UnknownHandle", &message).attr("model", Int(u64::from(*model)))
            }
            HandleError::UnknownTensor { tensor } => {
                Raised::new("UnknownHandle", &message).attr("tensor", Int(u64::from(*tensor)))
            }
            HandleError::UnknownDevice { device } => {
                Raised::new("UnknownHandle", &message).attr("device", Int(u64::from(*device)))
            }
            _ => Raised::new("HandleError", &message),
        },
        StoreError::Update(u) => match u {
            UpdateError::DuplicateName { model, name } => Raised::new("DuplicateName", &message)
                .attr("model", path(model))
                .attr("name", Str(name.clone())),
            UpdateError::ByteLength {
                name,
                dtype,
                shape,
                expected,
                actual,
            } => Raised::new("ByteLength", &message)
                .attr("name", Str(name.clone()))
                .attr("dtype", Str(dtype.name().into()))
                .attr("shape", Shape(shape.clone()))
                .attr("expected", Int(*expected))
                .attr("actual", Int(*actual)),
            UpdateError::BadShape { name, dtype, shape } => Raised::new("BadShape", &message)
                .attr("name", Str(name.clone()))
                .attr("dtype", Str(dtype.name().into()))
                .attr("shape", Shape(shape.clone())),
            UpdateError::Pinned { name, pins } => Raised::new("Pinned", &message)
                .attr("name", Str(name.clone()))
                .attr("pins", Int(u64::from(*pins))),
            UpdateError::NotFromFile { name } => {
                Raised::new("NotFromFile", &message).attr("name", Str(name.clone()))
            }
            UpdateError::FromFile { name } => {
                Raised::new("FromFile", &message).attr("name", Str(name.clone()))
            }
            UpdateError::NotInRam { name } => {
                Raised::new("NotInRam", &message).attr("name", Str(name.clone()))
            }
            UpdateError::Spill { name, .. } => {
                Raised::new("SpillFailed", &message).attr("name", Str(name.clone()))
            }
            _ => Raised::new("UpdateError", &message),
        },
        StoreError::Memory(m) => match m {
            MemoryError::OverBudget {
                name,
                requested,
                available,
                budget,
            } => Raised::new("OverBudget", &message)
                .attr("name", Str(name.clone()))
                .attr("requested", Int(*requested))
                .attr("available", Int(*available))
                .attr("budget", Int(*budget)),
            MemoryError::UnderReserve {
                name,
                requested,
                available,
                reserve,
            } => Raised::new("UnderReserve", &message)
                .attr("name", Str(name.clone()))
                .attr("requested", Int(*requested))
                .attr("available", Int(*available))
                .attr("reserve", Int(*reserve)),
            MemoryError::DeviceFull {
                name,
                device,
                requested,
                available,
            } => Raised::new("DeviceFull", &message)
                .attr("name", Str(name.clone()))
                .attr("device", Str(device.clone()))
                .attr("requested", Int(*requested))
                .attr("available", Int(*available)),
            MemoryError::Alloc { name, bytes } => Raised::new("AllocFailed", &message)
                .attr("name", Str(name.clone()))
                .attr("requested", Int(*bytes)),
            _ => Raised::new("StoreMemoryError", &message),
        },
        StoreError::Restore(r) => match r {
            RestoreError::Lost { name, .. } => {
                Raised::new("Lost", &message).attr("name", Str(name.clone()))
            }
            RestoreError::SpillRead { name, .. } => {
                Raised::new("SpillReadFailed", &message).attr("name", Str(name.clone()))
            }
            RestoreError::NoCopy { name, tier } => Raised::new("NoCopy", &message)
                .attr("name", Str(name.clone()))
                .attr("tier", Str(format!("{tier:?}").to_lowercase())),
            RestoreError::Recipe {
                name,
                expected,
                actual,
            } => Raised::new("RecipeMismatch", &message)
                .attr("name", Str(name.clone()))
                .attr("expected", Int(*expected))
                .attr("actual", Int(*actual)),
            RestoreError::Panicked { name } | RestoreError::Device { name, .. } => {
                Raised::new("RestoreError", &message).attr("name", Str(name.clone()))
            }
            _ => Raised::new("RestoreError", &message),
        },
        StoreError::Source(s) => source_error(s, &message),
        StoreError::Forked { owner_pid, pid } => Raised::new("Forked", &message)
            .attr("owner_pid", Int(u64::from(*owner_pid)))
            .attr("pid", Int(u64::from(*pid))),
        // `Thread`, and areas added later.
        _ => Raised::new("LowtideError", &message),
    };
    raised.retryable = err.is_retryable();
    if let Some(errno) = os_errno(err) {
        // The Python class is an `OSError`: `errno` picks its builtin subclass too
        // (`FileNotFoundError` for ENOENT) and sets `strerror`, as `OSError(errno, ...)` does.
        raised = raised.attr("errno", Int(u64::from(errno.unsigned_abs())));
    }
    raised
}

/// The OS error number behind an error whose Python class is an `OSError` (reading or
/// opening a model file, the spill file), found in its `source()` chain.
fn os_errno(err: &StoreError) -> Option<i32> {
    let os_class = matches!(
        err,
        StoreError::Source(SourceError::Io { .. })
            | StoreError::Update(UpdateError::Spill { .. })
            | StoreError::Restore(RestoreError::SpillRead { .. })
    );
    if !os_class {
        return None;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(errno) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(errno);
        }
        source = cause.source();
    }
    None
}

fn source_error(err: &SourceError, message: &str) -> Raised {
    match err {
        SourceError::Io { path: p, op, .. } => Raised::new("SourceIoError", message)
            .attr("path", path(p))
            .attr("filename", path(p))
            .attr("op", Attr::Str((*op).into())),
        SourceError::Header { path: p, .. }
        | SourceError::Gguf { path: p, .. }
        | SourceError::Index { path: p, .. } => {
            Raised::new("MalformedModel", message).attr("path", path(p))
        }
        SourceError::Changed { path: p, change } => Raised::new("SourceChanged", message)
            .attr("path", path(p))
            .attr("change", Attr::Str(change.to_string())),
        _ => Raised::new("SourceError", message),
    }
}

/// The Python exception for a call on a closed store.
pub(crate) fn store_closed(py: Python<'_>) -> PyErr {
    Raised::new("StoreClosed", "the store is closed").into_pyerr(py)
}

/// The Python exception for a call on a model closed by `Model.close()`.
pub(crate) fn model_closed(py: Python<'_>, file: &std::path::Path) -> PyErr {
    Raised::new(
        "UnknownHandle",
        format!("model {} is closed", file.display()),
    )
    .attr("path", path(file))
    .into_pyerr(py)
}

/// The Python exception for an impossible store setting.
pub(crate) fn config_error(py: Python<'_>, err: &ConfigError) -> PyErr {
    Raised::new("ConfigError", chain(err)).into_pyerr(py)
}

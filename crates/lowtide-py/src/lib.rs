//! `lowtide._lowtide`: the Python extension behind the `lowtide` package.
//!
//! A thin binding over [`lowtide::Store`]: it converts arguments and errors and delegates,
//! holding no policy of its own. Every call that reads, writes, waits or evicts releases the
//! GIL (`Python::detach`). Views are pinned RAM copies (`Store::acquire_ram`, never a mapping
//! of the model file) handed to NumPy and PyTorch through DLPack and the buffer protocol
//! (`lease`); the framework-specific parts (dtype tables, `torch.from_dlpack`) live in the
//! pure-Python package beside this module.

// pyo3's macros expand to code that trips these pedantic lints; the functions they mark are
// called from Python, where these conventions do not apply.
#![allow(clippy::needless_pass_by_value)] // #[pyfunction] arguments arrive owned
#![allow(clippy::unused_self)] // methods that Python calls on an instance

mod errors;
mod lease;
mod size;
mod store;

use pyo3::prelude::*;

/// The extension module.
#[pymodule]
fn _lowtide(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<store::Store>()?;
    m.add_class::<store::Model>()?;
    m.add_class::<store::TensorInfo>()?;
    m.add_class::<store::Prefetch>()?;
    m.add_class::<lease::Lease>()?;
    m.add_function(wrap_pyfunction!(size::parse_size, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

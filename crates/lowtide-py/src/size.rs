//! Sizes at the Python edge: `"8GiB"`, `"512MB"` or a plain number of bytes.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Bytes from a size given as an int or a string such as `"8GiB"`.
pub(crate) fn bytes_of(value: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    if let Ok(text) = value.extract::<String>() {
        return text
            .trim()
            .parse::<lowtide::ByteSize>()
            .map(lowtide::ByteSize::bytes)
            .map_err(|err| PyValueError::new_err(format!("{what}: {err}")));
    }
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{what}: expected a size in bytes or a string such as \"8GiB\", got a bool"
        )));
    }
    value.extract::<u64>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what}: expected a non-negative number of bytes or a string such as \"8GiB\""
        ))
    })
}

/// Like [`bytes_of`], `None` staying `None`.
pub(crate) fn optional_bytes(
    value: Option<&Bound<'_, PyAny>>,
    what: &str,
) -> PyResult<Option<u64>> {
    value
        .filter(|v| !v.is_none())
        .map(|v| bytes_of(v, what))
        .transpose()
}

/// Parses a size such as `"8GiB"`, `"512MB"` or `1024` into bytes.
#[pyfunction]
pub(crate) fn parse_size(size: &Bound<'_, PyAny>) -> PyResult<u64> {
    bytes_of(size, "size")
}

//! Writing safetensors files: used by tests, the demo's synthetic models and benchmarks.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::dtype::Dtype;

/// Name, dtype and shape of a tensor to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// A spec from its parts.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: &[u64]) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Bytes of data, or `None` if the shape overflows or is not whole bytes.
    pub fn byte_len(&self) -> Option<u64> {
        let elements = self
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        self.dtype.bytes_for(elements)
    }
}

/// Writes a safetensors file with `specs` in order; `fill(i, buf)` provides tensor `i`'s bytes.
///
/// The file is written next to `path` under a temporary name and renamed into place, so a
/// reader never sees a half-written file. Returns the file's length.
pub fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut [u8]),
) -> io::Result<u64> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0u64;
    for spec in specs {
        let len = spec.byte_len().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tensor `{}`: bad shape", spec.name),
            )
        })?;
        let entry = serde_json::json!({
            "dtype": spec.dtype.name(),
            "shape": spec.shape,
            "data_offsets": [offset, offset + len],
        });
        if header.insert(spec.name.clone(), entry).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tensor `{}` named twice", spec.name),
            ));
        }
        offset += len;
    }
    let mut json = serde_json::to_vec(&header)?;
    // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    json.resize(json.len().div_ceil(8) * 8, b' ');

    let tmp = path.with_extension("safetensors.partial");
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(&json)?;
    let mut buf = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let len = usize::try_from(spec.byte_len().unwrap_or(0))
            .map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
        buf.clear();
        buf.resize(len, 0);
        fill(i, &mut buf);
        out.write_all(&buf)?;
    }
    let written = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    written.sync_all()?;
    drop(written);
    fs::rename(&tmp, path)?;
    Ok(8 + json.len() as u64 + offset)
}

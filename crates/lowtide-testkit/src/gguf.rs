//! Writing GGUF files (version 3) for tests and benchmarks, the way the reference writer lays
//! them out: the header, padding to the alignment, then each tensor's data padded to the
//! alignment. Shapes in [`TensorSpec`] are outermost first (as lowtide reports them); they are
//! written innermost first, as GGUF stores them.

use std::io::{self, BufWriter, Write};
use std::path::Path;

use lowtide::{GGUF_DEFAULT_ALIGNMENT, GgufArray, GgufValue};

use crate::writer::{TensorSpec, Unnamed};

/// Where a file's parts lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufLayout {
    /// Bytes of the header (up to the end of the tensor infos).
    pub header_len: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
    /// Absolute offset of each tensor's data, in the order of the specs.
    pub offsets: Vec<u64>,
    /// Length of the whole file.
    pub file_len: u64,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

fn put_string(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// Appends `value` (without its type id) as GGUF encodes it.
pub fn encode_gguf_value(buf: &mut Vec<u8>, value: &GgufValue) -> io::Result<()> {
    match value {
        GgufValue::U8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => buf.push(u8::from(*v)),
        GgufValue::String(v) => put_string(buf, v.as_bytes()),
        GgufValue::Array(v) => encode_array(buf, v)?,
        GgufValue::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        other => return Err(invalid(format!("cannot encode {other:?}"))),
    }
    Ok(())
}

fn encode_array(buf: &mut Vec<u8>, array: &GgufArray) -> io::Result<()> {
    buf.extend_from_slice(&array.element_type().id().to_le_bytes());
    buf.extend_from_slice(&(array.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            $v.iter()
                .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()))
        };
    }
    match array {
        GgufArray::U8(v) => each!(v),
        GgufArray::I8(v) => each!(v),
        GgufArray::U16(v) => each!(v),
        GgufArray::I16(v) => each!(v),
        GgufArray::U32(v) => each!(v),
        GgufArray::I32(v) => each!(v),
        GgufArray::F32(v) => each!(v),
        GgufArray::U64(v) => each!(v),
        GgufArray::I64(v) => each!(v),
        GgufArray::F64(v) => each!(v),
        GgufArray::Bool(v) => buf.extend(v.iter().map(|&b| u8::from(b))),
        GgufArray::String(v) => v.iter().for_each(|s| put_string(buf, s.as_bytes())),
        GgufArray::Array(v) => {
            for inner in v {
                encode_array(buf, inner)?;
            }
        }
        other => return Err(invalid(format!("cannot encode {other:?}"))),
    }
    Ok(())
}

/// The header of a file of `specs` and `metadata` (in order; `general.alignment`, a `U32`,
/// sets the alignment), padded to the start of the data section, with the layout.
pub fn gguf_header(
    specs: &[TensorSpec],
    metadata: &[(String, GgufValue)],
) -> io::Result<(Vec<u8>, GgufLayout)> {
    let alignment = metadata
        .iter()
        .find_map(|(k, v)| match (k.as_str(), v) {
            ("general.alignment", GgufValue::U32(a)) => Some(u64::from(*a)),
            _ => None,
        })
        .unwrap_or(GGUF_DEFAULT_ALIGNMENT)
        .max(1);
    let mut buf = Vec::new();
    buf.extend_from_slice(b"GGUF");
    buf.extend_from_slice(&3u32.to_le_bytes());
    buf.extend_from_slice(&(specs.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut buf, key.as_bytes());
        buf.extend_from_slice(&value.value_type().id().to_le_bytes());
        encode_gguf_value(&mut buf, value)?;
    }
    let mut relative = Vec::with_capacity(specs.len());
    let mut offset = 0u64;
    for spec in specs {
        let ggml = spec.dtype.ggml_id().ok_or_else(|| {
            invalid(format!(
                "tensor `{}`: {} is not a ggml type",
                spec.name, spec.dtype
            ))
        })?;
        let len = spec
            .byte_len()
            .ok_or_else(|| invalid(format!("tensor `{}`: bad shape", spec.name)))?;
        put_string(&mut buf, spec.name.as_bytes());
        buf.extend_from_slice(&(spec.shape.len() as u32).to_le_bytes());
        for dim in spec.shape.iter().rev() {
            buf.extend_from_slice(&dim.to_le_bytes());
        }
        buf.extend_from_slice(&ggml.to_le_bytes());
        buf.extend_from_slice(&offset.to_le_bytes());
        relative.push(offset);
        offset = offset
            .checked_add(len)
            .map(|end| end.next_multiple_of(alignment))
            .ok_or(io::ErrorKind::FileTooLarge)?;
    }
    let header_len = buf.len() as u64;
    let data_start = header_len.next_multiple_of(alignment);
    buf.resize(data_start as usize, 0);
    let layout = GgufLayout {
        header_len,
        data_start,
        offsets: relative.iter().map(|r| data_start + r).collect(),
        file_len: data_start + offset,
    };
    Ok((buf, layout))
}

/// A whole file image; `fill(i, buf)` provides tensor `i`'s bytes.
pub fn gguf_image(
    specs: &[TensorSpec],
    metadata: &[(String, GgufValue)],
    mut fill: impl FnMut(usize, &mut [u8]),
) -> io::Result<(Vec<u8>, GgufLayout)> {
    let (mut image, layout) = gguf_header(specs, metadata)?;
    let file_len = usize::try_from(layout.file_len).map_err(|_| io::ErrorKind::FileTooLarge)?;
    image.resize(file_len, 0);
    for (i, spec) in specs.iter().enumerate() {
        let start = layout.offsets[i] as usize;
        let len = spec.byte_len().unwrap_or(0) as usize;
        fill(i, &mut image[start..start + len]);
    }
    Ok((image, layout))
}

/// Writes a GGUF file of `specs` and `metadata` at `path` (replacing one there), named only
/// once complete and synced, like [`crate::write_safetensors`]; `fill(i, buf)` provides tensor
/// `i`'s bytes. Returns the layout.
pub fn write_gguf(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &[(String, GgufValue)],
    mut fill: impl FnMut(usize, &mut [u8]),
) -> io::Result<GgufLayout> {
    let (header, layout) = gguf_header(specs, metadata)?;
    let mut out = Unnamed::create(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, &out.file);
    w.write_all(&header)?;
    let mut at = layout.data_start;
    let mut buf = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let pad = layout.offsets[i] - at;
        w.write_all(&vec![0u8; pad as usize])?;
        let len = spec
            .byte_len()
            .and_then(|len| usize::try_from(len).ok())
            .ok_or(io::ErrorKind::FileTooLarge)?;
        buf.clear();
        buf.try_reserve_exact(len)
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        buf.resize(len, 0);
        fill(i, &mut buf);
        w.write_all(&buf)?;
        at = layout.offsets[i] + len as u64;
    }
    w.write_all(&vec![0u8; (layout.file_len - at) as usize])?;
    w.flush()?;
    drop(w);
    out.file.sync_all()?;
    out.replace(path)?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use lowtide::{Dtype, GgufValue};

    use super::gguf_image;
    use crate::TensorSpec;

    #[test]
    fn images_parse_back() {
        let specs = [
            TensorSpec::new("a", Dtype::Q4_0, &[3, 64]),
            TensorSpec::new("b", Dtype::F32, &[5]),
        ];
        let meta = vec![(
            "general.architecture".to_owned(),
            GgufValue::String("llama".into()),
        )];
        let (image, layout) = gguf_image(&specs, &meta, |i, b| b.fill(i as u8 + 1)).unwrap();
        let (gguf, tensors) = lowtide::parse::gguf_image(&image).unwrap();
        assert_eq!(gguf.architecture(), Some("llama"));
        assert_eq!(tensors[0].shape, [3, 64]);
        assert_eq!(tensors[0].len, 3 * 2 * 18);
        assert_eq!(tensors[1].offset, layout.offsets[1]);
        assert_eq!(gguf.tensors()[0].dims, [64, 3]);
    }
}

//! The GGUF header parser: reads through [`ReadAt`] into a growing buffer and checks as it
//! goes; nothing is trusted, every sum and product is checked.

use std::collections::HashSet;
use std::io;

use super::value::{GgufArray, GgufString, GgufValue, GgufValueType};
use super::{
    GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, Gguf, GgufError, GgufTensorInfo, MAX_GGUF_ARRAY_DEPTH,
    MAX_GGUF_ARRAY_LEN, MAX_GGUF_DIMS, MAX_GGUF_HEADER_LEN, MAX_GGUF_KEYS, MAX_GGUF_STRING_LEN,
    MAX_GGUF_TENSORS,
};
use crate::dtype::Dtype;

/// Where the header's bytes come from: a file (`pread`) or an image in memory.
pub(crate) trait ReadAt {
    /// Fills `buf` from `offset`; an end of data first is `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Why a parse stopped: a failed check, or the read itself.
#[derive(Debug)]
pub(crate) enum Failure {
    Invalid(GgufError),
    Io(io::Error),
}

impl From<GgufError> for Failure {
    fn from(err: GgufError) -> Self {
        Self::Invalid(err)
    }
}

type Result<T> = std::result::Result<T, Failure>;

/// A validated header and its tensors' extents `(absolute offset, length)`, in header order.
pub(crate) struct Parsed {
    pub(crate) gguf: Gguf,
    pub(crate) extents: Vec<(u64, u64)>,
}

/// ggml holds dimensions and element counts in `int64_t`.
const MAX_NE: u64 = i64::MAX as u64;

/// Bytes of the first read (the buffer then doubles as the parse needs more). Small, because
/// what a read takes past the header is tensor data pulled into the page cache, which a cold
/// restore would then copy from there: at most this much, or the header's size, is.
const CHUNK: u64 = 16 << 10;

/// The bytes of the header read so far (`buf` holds the file's bytes `0..buf.len()`) and the
/// position of the next field.
struct Reader<'a, R: ?Sized> {
    src: &'a R,
    file_len: u64,
    buf: Vec<u8>,
    pos: u64,
}

impl<R: ReadAt + ?Sized> Reader<'_, R> {
    /// Makes sure the `n` bytes at the position are in the buffer.
    fn need(&mut self, n: u64, what: &'static str) -> Result<()> {
        let end = self.pos.saturating_add(n);
        if end > self.file_len {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: n,
                file_len: self.file_len,
            }
            .into());
        }
        if end > MAX_GGUF_HEADER_LEN {
            return Err(GgufError::HeaderTooLarge {
                what,
                offset: self.pos,
                max: MAX_GGUF_HEADER_LEN,
            }
            .into());
        }
        let have = self.buf.len() as u64;
        if end > have {
            // `end` is within the file and the cap, so `target >= end`.
            let target = end
                .max(have.saturating_mul(2))
                .max(CHUNK)
                .min(self.file_len)
                .min(MAX_GGUF_HEADER_LEN);
            let oom = || Failure::Io(io::ErrorKind::OutOfMemory.into());
            let grow = usize::try_from(target - have).map_err(|_| oom())?;
            self.buf.try_reserve_exact(grow).map_err(|_| oom())?;
            self.buf.resize(self.buf.len() + grow, 0);
            let (_, fresh) = self.buf.split_at_mut(have as usize);
            self.src.read_exact_at(fresh, have).map_err(Failure::Io)?;
        }
        Ok(())
    }

    /// The next `n` bytes.
    fn take(&mut self, n: u64, what: &'static str) -> Result<&[u8]> {
        self.need(n, what)?;
        let start = self.pos as usize;
        self.pos += n;
        Ok(&self.buf[start..self.pos as usize])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count at the position, checked against its cap.
    fn count(&mut self, what: &'static str, max: u64) -> Result<u64> {
        let offset = self.pos;
        let count = self.u64(what)?;
        if count > max {
            return Err(GgufError::Count {
                what,
                count,
                max,
                offset,
            }
            .into());
        }
        Ok(count)
    }

    /// A string's bytes; `len_what` names its length field.
    fn bytes(&mut self, len_what: &'static str, what: &'static str) -> Result<Box<[u8]>> {
        let len = self.count(len_what, MAX_GGUF_STRING_LEN)?;
        Ok(self.take(len, what)?.into())
    }

    /// A string that must be UTF-8 (a key or a tensor name).
    fn text(&mut self, what: &'static str) -> Result<String> {
        let offset = self.pos;
        let len_what = match what {
            "a tensor name" => "the length of a tensor name",
            _ => "the length of a metadata key",
        };
        let bytes = self.bytes(len_what, what)?;
        String::from_utf8(bytes.into_vec()).map_err(|_| GgufError::NotUtf8 { what, offset }.into())
    }

    /// A value type id.
    fn value_type(&mut self, key: &str) -> Result<GgufValueType> {
        let offset = self.pos;
        let id = self.u32("a value type")?;
        GgufValueType::from_id(id).ok_or_else(|| {
            GgufError::UnknownValueType {
                key: key.to_owned(),
                value_type: id,
                offset,
            }
            .into()
        })
    }

    fn bool(&mut self, key: &str) -> Result<bool> {
        let offset = self.pos;
        match self.array::<1>("a bool")? {
            [0] => Ok(false),
            [1] => Ok(true),
            [byte] => Err(GgufError::Bool {
                key: key.to_owned(),
                byte,
                offset,
            }
            .into()),
        }
    }

    /// A value of type `ty`, at array depth `depth` (0 for an entry's own value).
    fn value(&mut self, key: &str, ty: GgufValueType, depth: u32) -> Result<GgufValue> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(u8::from_le_bytes(self.array("a UINT8")?)),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array("an INT8")?)),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array("a UINT16")?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array("an INT16")?)),
            GgufValueType::U32 => GgufValue::U32(u32::from_le_bytes(self.array("a UINT32")?)),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array("an INT32")?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array("a FLOAT32")?)),
            GgufValueType::Bool => GgufValue::Bool(self.bool(key)?),
            GgufValueType::String => GgufValue::String(GgufString(
                self.bytes("the length of a string", "a string")?,
            )),
            GgufValueType::Array => GgufValue::Array(self.array_value(key, depth + 1)?),
            GgufValueType::U64 => GgufValue::U64(u64::from_le_bytes(self.array("a UINT64")?)),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array("an INT64")?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array("a FLOAT64")?)),
        })
    }

    /// `count` elements of a fixed size `N`, decoded by `decode`.
    fn fixed<const N: usize, T>(&mut self, count: u64, decode: fn([u8; N]) -> T) -> Result<Vec<T>> {
        // `count` is capped, so the product fits; `take` checks the bytes are there.
        let bytes = self.take(count * N as u64, "an array's elements")?;
        Ok(bytes
            .chunks_exact(N)
            .map(|chunk| {
                let mut out = [0u8; N];
                out.copy_from_slice(chunk);
                decode(out)
            })
            .collect())
    }

    /// An array (type, count, elements) nested `depth` deep.
    fn array_value(&mut self, key: &str, depth: u32) -> Result<GgufArray> {
        if depth > MAX_GGUF_ARRAY_DEPTH {
            return Err(GgufError::ArrayDepth {
                key: key.to_owned(),
                max: MAX_GGUF_ARRAY_DEPTH,
                offset: self.pos,
            }
            .into());
        }
        let ty = self.value_type(key)?;
        let count = self.count("the length of an array", MAX_GGUF_ARRAY_LEN)?;
        // Every element takes at least `min_size` bytes: they are in the file (and under
        // the cap) before anything is allocated for them.
        self.need(count * ty.min_size(), "an array's elements")?;
        let capacity = usize::try_from(count).unwrap_or(usize::MAX);
        Ok(match ty {
            GgufValueType::U8 => GgufArray::U8(self.fixed(count, u8::from_le_bytes)?),
            GgufValueType::I8 => GgufArray::I8(self.fixed(count, i8::from_le_bytes)?),
            GgufValueType::U16 => GgufArray::U16(self.fixed(count, u16::from_le_bytes)?),
            GgufValueType::I16 => GgufArray::I16(self.fixed(count, i16::from_le_bytes)?),
            GgufValueType::U32 => GgufArray::U32(self.fixed(count, u32::from_le_bytes)?),
            GgufValueType::I32 => GgufArray::I32(self.fixed(count, i32::from_le_bytes)?),
            GgufValueType::F32 => GgufArray::F32(self.fixed(count, f32::from_le_bytes)?),
            GgufValueType::U64 => GgufArray::U64(self.fixed(count, u64::from_le_bytes)?),
            GgufValueType::I64 => GgufArray::I64(self.fixed(count, i64::from_le_bytes)?),
            GgufValueType::F64 => GgufArray::F64(self.fixed(count, f64::from_le_bytes)?),
            GgufValueType::Bool => {
                let mut out = Vec::with_capacity(capacity);
                for _ in 0..count {
                    out.push(self.bool(key)?);
                }
                GgufArray::Bool(out)
            }
            GgufValueType::String => {
                let mut out = Vec::with_capacity(capacity);
                for _ in 0..count {
                    out.push(GgufString(
                        self.bytes("the length of a string", "a string")?,
                    ));
                }
                GgufArray::String(out)
            }
            GgufValueType::Array => {
                let mut out = Vec::with_capacity(capacity);
                for _ in 0..count {
                    out.push(self.array_value(key, depth + 1)?);
                }
                GgufArray::Array(out)
            }
        })
    }

    /// One tensor info, checked on its own; returns it with its length in bytes.
    fn tensor_info(&mut self, alignment: u64) -> Result<(GgufTensorInfo, u64)> {
        let name = self.text("a tensor name")?;
        let dims_offset = self.pos;
        let n_dims = self.u32("a tensor's dimension count")?;
        if n_dims > MAX_GGUF_DIMS {
            return Err(GgufError::Dims {
                name,
                n_dims,
                max: MAX_GGUF_DIMS,
                offset: dims_offset,
            }
            .into());
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64("a tensor's dimension")?);
        }
        let type_offset = self.pos;
        let type_id = self.u32("a tensor's type")?;
        let Some(dtype) = Dtype::from_ggml_id(type_id) else {
            return Err(GgufError::UnknownTensorType {
                name,
                type_id,
                offset: type_offset,
            }
            .into());
        };
        let offset_offset = self.pos;
        let data_offset = self.u64("a tensor's data offset")?;

        let shape_at = dims_offset + 4;
        // The product itself, whatever the order: a zero dimension makes it zero.
        let elements = if dims.iter().any(|&d| d > MAX_NE) {
            None
        } else if dims.contains(&0) {
            Some(0)
        } else {
            dims.iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d).filter(|&n| n <= MAX_NE))
        };
        let block = dtype.block();
        let innermost = dims.first().copied().unwrap_or(1);
        if elements.is_some() && !innermost.is_multiple_of(block.elements) {
            return Err(GgufError::PartialBlock {
                name,
                dtype,
                innermost,
                block: block.elements,
                offset: shape_at,
            }
            .into());
        }
        let Some(len) = elements.and_then(|n| dtype.bytes_for(n)) else {
            return Err(GgufError::ShapeOverflow {
                name,
                dims,
                offset: shape_at,
            }
            .into());
        };
        if !data_offset.is_multiple_of(alignment) {
            return Err(GgufError::Misaligned {
                name,
                data_offset,
                alignment,
                offset: offset_offset,
            }
            .into());
        }
        let info = GgufTensorInfo {
            name,
            dtype,
            dims,
            offset: data_offset,
        };
        Ok((info, len))
    }
}

/// Validates the GGUF header of a file of `file_len` bytes read from `src`.
pub(crate) fn parse<R: ReadAt + ?Sized>(src: &R, file_len: u64) -> Result<Parsed> {
    let mut r = Reader {
        src,
        file_len,
        buf: Vec::new(),
        pos: 0,
    };
    if r.array::<4>("the magic")? != GGUF_MAGIC {
        return Err(GgufError::Magic.into());
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version { version }.into());
    }
    let n_tensors = r.count("the tensor count", MAX_GGUF_TENSORS)?;
    let n_keys = r.count("the metadata count", MAX_GGUF_KEYS)?;

    let (metadata, alignment) = metadata(&mut r, n_keys)?;

    let mut tensors = Vec::new();
    let mut lens = Vec::new();
    let mut names = HashSet::new();
    for _ in 0..n_tensors {
        let info_offset = r.pos;
        let (info, len) = r.tensor_info(alignment)?;
        if !names.insert(info.name.clone()) {
            return Err(GgufError::DuplicateName {
                name: info.name,
                offset: info_offset,
            }
            .into());
        }
        tensors.push(info);
        lens.push(len);
    }
    drop(names);
    let header_len = r.pos;
    // Under the header cap and an alignment of at most 2^31: no overflow.
    let data_start = header_len.next_multiple_of(alignment);

    let extents = extents(&tensors, &lens, data_start, file_len)?;

    Ok(Parsed {
        gguf: Gguf {
            version,
            alignment,
            metadata,
            tensors,
            header_len,
            data_start,
        },
        extents,
    })
}

/// The `n_keys` metadata entries at the reader's position, and the alignment they set.
fn metadata<R: ReadAt + ?Sized>(
    r: &mut Reader<'_, R>,
    n_keys: u64,
) -> Result<(Vec<(String, GgufValue)>, u64)> {
    let mut alignment = GGUF_DEFAULT_ALIGNMENT;
    let mut metadata = Vec::new();
    let mut keys = HashSet::new();
    for _ in 0..n_keys {
        let key_offset = r.pos;
        let key = r.text("a metadata key")?;
        if !keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey {
                key,
                offset: key_offset,
            }
            .into());
        }
        let type_offset = r.pos;
        let ty = r.value_type(&key)?;
        let value_offset = r.pos;
        let value = r.value(&key, ty, 0)?;
        if key == "general.alignment" {
            let GgufValue::U32(value) = value else {
                return Err(GgufError::AlignmentType {
                    value_type: ty,
                    offset: type_offset,
                }
                .into());
            };
            if !value.is_power_of_two() {
                return Err(GgufError::Alignment {
                    alignment: value.into(),
                    offset: value_offset,
                }
                .into());
            }
            alignment = value.into();
        }
        metadata.push((key, value));
    }
    Ok((metadata, alignment))
}

/// The tensors' extents `(absolute offset, length)`: inside the file, none overlapping.
fn extents(
    tensors: &[GgufTensorInfo],
    lens: &[u64],
    data_start: u64,
    file_len: u64,
) -> Result<Vec<(u64, u64)>> {
    let mut extents = Vec::with_capacity(tensors.len());
    for (info, &len) in tensors.iter().zip(lens) {
        let start = data_start.checked_add(info.offset);
        match start.and_then(|s| s.checked_add(len)) {
            Some(end) if end <= file_len => extents.push((data_start + info.offset, len)),
            _ => {
                return Err(GgufError::OutOfBounds {
                    name: info.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    len,
                    file_len,
                }
                .into());
            }
        }
    }
    // No two non-empty extents share a byte: sorted by start, each begins at or after the
    // end of those before it.
    let mut order: Vec<usize> = (0..extents.len()).filter(|&i| extents[i].1 > 0).collect();
    order.sort_unstable_by_key(|&i| (extents[i].0, i));
    let mut last: Option<usize> = None;
    for &i in &order {
        let (start, _) = extents[i];
        if let Some(prev) = last {
            let (prev_start, prev_len) = extents[prev];
            if start < prev_start + prev_len {
                return Err(GgufError::Overlap {
                    name: tensors[i].name.clone(),
                    other: tensors[prev].name.clone(),
                    offset: start,
                }
                .into());
            }
        }
        last = Some(i);
    }

    Ok(extents)
}

//! GGUF files (llama.cpp, ComfyUI-GGUF): a strict parser of versions 2 and 3.
//!
//! Layout (little-endian): the magic `GGUF`, a `u32` version, a `u64` tensor count, a `u64`
//! metadata count, the metadata (`key: string, type: u32, value`), the tensor infos
//! (`name: string, n_dims: u32, dims: [u64; n_dims], type: u32, offset: u64`), padding to the
//! alignment (`general.alignment`, default 32), then the data section. A string is a `u64`
//! length and its bytes; an array a `u32` element type, a `u64` count and its elements.
//!
//! The header is read with `pread` into a buffer that grows as the parser needs bytes (never
//! through a mapping), with checked arithmetic throughout and caps on everything a file
//! declares ([`MAX_GGUF_HEADER_LEN`], [`MAX_GGUF_TENSORS`], [`MAX_GGUF_KEYS`],
//! [`MAX_GGUF_STRING_LEN`], [`MAX_GGUF_ARRAY_LEN`], [`MAX_GGUF_ARRAY_DEPTH`],
//! [`MAX_GGUF_DIMS`]); nothing is allocated for a count before the bytes it needs are known to
//! be in the file. Every check names its byte offset ([`GgufError`]). `docs/gguf.md` lists
//! the checks.
//!
//! Shapes: GGUF writes dimensions innermost first (ggml's `ne`). lowtide reports shapes
//! outermost first, as PyTorch and NumPy do ([`crate::SourceTensor::shape`] is `ne`
//! reversed); the order as written is [`GgufTensorInfo::dims`].

mod parse;
mod value;

pub(crate) use parse::{Failure, Parsed, parse};
pub use value::{GgufArray, GgufString, GgufValue, GgufValueType};

use crate::dtype::Dtype;
use crate::text::Escaped;

/// The magic at byte 0 of a GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Largest header accepted: metadata and tensor infos, before the data section.
pub const MAX_GGUF_HEADER_LEN: u64 = 256 << 20;
/// Most tensors a file may declare.
pub const MAX_GGUF_TENSORS: u64 = 1 << 20;
/// Most metadata entries a file may declare.
pub const MAX_GGUF_KEYS: u64 = 1 << 20;
/// Longest string (key, tensor name or value), in bytes.
pub const MAX_GGUF_STRING_LEN: u64 = 16 << 20;
/// Most elements of one array.
pub const MAX_GGUF_ARRAY_LEN: u64 = 1 << 26;
/// Deepest nesting of arrays (an array of arrays is depth 2).
pub const MAX_GGUF_ARRAY_DEPTH: u32 = 4;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_GGUF_DIMS: u32 = 4;
/// The alignment when `general.alignment` is absent (ggml's `GGUF_DEFAULT_ALIGNMENT`).
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor info as the file writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Its name.
    pub name: String,
    /// Its type.
    pub dtype: Dtype,
    /// Its dimensions as written: innermost first (ggml's `ne`). The reverse of
    /// [`crate::SourceTensor::shape`].
    pub dims: Vec<u64>,
    /// Offset of its data from the start of the data section, as written.
    pub offset: u64,
}

/// A validated GGUF header: version, alignment, metadata in file order and tensor infos in
/// header order.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    pub(crate) version: u32,
    pub(crate) alignment: u64,
    pub(crate) metadata: Vec<(String, GgufValue)>,
    pub(crate) tensors: Vec<GgufTensorInfo>,
    pub(crate) header_len: u64,
    pub(crate) data_start: u64,
}

impl Gguf {
    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of the data section and of every tensor's offset.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Every metadata entry, in file order (keys are unique).
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture`, when it is a UTF-8 string.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(GgufValue::as_str)
    }

    /// `general.name`, when it is a UTF-8 string.
    pub fn name(&self) -> Option<&str> {
        self.get("general.name").and_then(GgufValue::as_str)
    }

    /// The tensor infos, in header order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// Bytes of the header: where the tensor infos end (the data section starts at the next
    /// multiple of the alignment).
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Absolute offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }
}

/// A check of the GGUF format that failed, with the byte offset where it failed (absolute,
/// from the start of the file).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file does not start with `GGUF`.
    #[error("no GGUF magic at byte offset 0")]
    Magic,
    /// A version other than 2 or 3 (version 1 had 32-bit counts; a big-endian file reads as
    /// a huge version).
    #[error("version {version} at byte offset 4 is not supported (only 2 and 3)")]
    Version {
        /// The version as read (little-endian).
        version: u32,
    },
    /// The file ends inside the header.
    #[error(
        "{what} at byte offset {offset} needs {needed} bytes, past the end of the {file_len}-byte file"
    )]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Absolute offset of the field.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The header runs past [`MAX_GGUF_HEADER_LEN`].
    #[error("{what} at byte offset {offset} runs the header past the {max}-byte cap")]
    HeaderTooLarge {
        /// The field being read.
        what: &'static str,
        /// Absolute offset of the field.
        offset: u64,
        /// The cap.
        max: u64,
    },
    /// A count (tensors, metadata entries, array elements, string bytes) over its cap.
    #[error("{what} {count} at byte offset {offset} is over the cap of {max}")]
    Count {
        /// What is counted.
        what: &'static str,
        /// The count as written.
        count: u64,
        /// The cap.
        max: u64,
        /// Absolute offset of the count.
        offset: u64,
    },
    /// A key or tensor name is not UTF-8.
    #[error("{what} at byte offset {offset} is not UTF-8")]
    NotUtf8 {
        /// A key or a tensor name.
        what: &'static str,
        /// Absolute offset of the string's length field.
        offset: u64,
    },
    /// A value type id that GGUF does not define.
    #[error(
        "key `{}`: unknown value type {value_type} at byte offset {offset}",
        Escaped(key)
    )]
    UnknownValueType {
        /// The key.
        key: String,
        /// The type id as written.
        value_type: u32,
        /// Absolute offset of the type id.
        offset: u64,
    },
    /// Arrays nested deeper than [`MAX_GGUF_ARRAY_DEPTH`].
    #[error(
        "key `{}`: arrays nested deeper than {max} at byte offset {offset}",
        Escaped(key)
    )]
    ArrayDepth {
        /// The key.
        key: String,
        /// The cap.
        max: u32,
        /// Absolute offset of the innermost array's type.
        offset: u64,
    },
    /// A `BOOL` byte other than 0 or 1.
    #[error(
        "key `{}`: bool byte {byte} at byte offset {offset} is not 0 or 1",
        Escaped(key)
    )]
    Bool {
        /// The key.
        key: String,
        /// The byte.
        byte: u8,
        /// Its absolute offset.
        offset: u64,
    },
    /// A key appears twice.
    #[error("key `{}` at byte offset {offset} appears twice", Escaped(key))]
    DuplicateKey {
        /// The key.
        key: String,
        /// Absolute offset of its second appearance.
        offset: u64,
    },
    /// `general.alignment` is not a `UINT32`.
    #[error("general.alignment at byte offset {offset} is {value_type}, not UINT32")]
    AlignmentType {
        /// Its type.
        value_type: GgufValueType,
        /// Absolute offset of its type id.
        offset: u64,
    },
    /// `general.alignment` is not a power of two.
    #[error("general.alignment {alignment} at byte offset {offset} is not a power of two")]
    Alignment {
        /// The value.
        alignment: u64,
        /// Absolute offset of the value.
        offset: u64,
    },
    /// A tensor has more dimensions than [`MAX_GGUF_DIMS`].
    #[error(
        "tensor `{}`: {n_dims} dimensions at byte offset {offset}, over the {max} ggml allows",
        Escaped(name)
    )]
    Dims {
        /// The tensor.
        name: String,
        /// Dimensions as written.
        n_dims: u32,
        /// The cap.
        max: u32,
        /// Absolute offset of the count.
        offset: u64,
    },
    /// A tensor type id that ggml does not define.
    #[error(
        "tensor `{}`: unknown tensor type {type_id} at byte offset {offset}",
        Escaped(name)
    )]
    UnknownTensorType {
        /// The tensor.
        name: String,
        /// The type id as written.
        type_id: u32,
        /// Absolute offset of the type id.
        offset: u64,
    },
    /// The number of elements (or of bytes) overflows 63 bits, ggml's `int64_t`.
    #[error(
        "tensor `{}`: dims {dims:?} (innermost first) at byte offset {offset} overflow",
        Escaped(name)
    )]
    ShapeOverflow {
        /// The tensor.
        name: String,
        /// Dimensions as written.
        dims: Vec<u64>,
        /// Absolute offset of the dimensions.
        offset: u64,
    },
    /// The innermost dimension is not a whole number of blocks.
    #[error(
        "tensor `{}`: innermost dimension {innermost} at byte offset {offset} is not a multiple of the {dtype} block of {block}",
        Escaped(name)
    )]
    PartialBlock {
        /// The tensor.
        name: String,
        /// Its type.
        dtype: Dtype,
        /// The innermost dimension (`ne[0]`).
        innermost: u64,
        /// Elements per block.
        block: u64,
        /// Absolute offset of the dimensions.
        offset: u64,
    },
    /// A tensor name appears twice.
    #[error("tensor `{}` at byte offset {offset} appears twice", Escaped(name))]
    DuplicateName {
        /// The tensor.
        name: String,
        /// Absolute offset of its second info.
        offset: u64,
    },
    /// A data offset is not a multiple of the alignment.
    #[error(
        "tensor `{}`: data offset {data_offset} at byte offset {offset} is not a multiple of the alignment {alignment}",
        Escaped(name)
    )]
    Misaligned {
        /// The tensor.
        name: String,
        /// The offset as written (from the data section).
        data_offset: u64,
        /// The alignment.
        alignment: u64,
        /// Absolute offset of the offset field.
        offset: u64,
    },
    /// A tensor's data ends past the end of the file.
    #[error(
        "tensor `{}`: data at byte offset {start} of {len} bytes runs past the end of the {file_len}-byte file",
        Escaped(name)
    )]
    OutOfBounds {
        /// The tensor.
        name: String,
        /// Absolute offset of its data (saturated at `u64::MAX`).
        start: u64,
        /// Its length.
        len: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// Two tensors' data overlap.
    #[error(
        "tensor `{}` overlaps tensor `{}` at byte offset {offset}",
        Escaped(name),
        Escaped(other)
    )]
    Overlap {
        /// The tensor that starts later.
        name: String,
        /// The tensor it overlaps.
        other: String,
        /// Absolute offset where they overlap.
        offset: u64,
    },
}

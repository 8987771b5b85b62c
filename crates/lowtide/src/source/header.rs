//! Parsing and complete validation of a safetensors header.
//!
//! Layout: 8 bytes little-endian header length `n`, `n` bytes of JSON, then the data buffer.
//! The JSON maps tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets
//! relative to the data buffer) plus an optional `"__metadata__"` map of strings.
//!
//! Every check names the tensor or byte offset it failed at. After lowtide's own checks the
//! reference parser (the `safetensors` crate) reads the same header as a second opinion, so
//! a file is accepted only when both agree.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use crate::dtype::Dtype;

/// Bytes of the little-endian length prefix.
pub(crate) const PREFIX_LEN: u64 = 8;
/// Largest header accepted, as in the reference implementation.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor entry of a validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawTensor {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<u64>,
    /// Offsets relative to the start of the data buffer.
    pub(crate) begin: u64,
    pub(crate) end: u64,
}

/// A header that passed every check.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    /// Tensors in the order of their data.
    pub(crate) tensors: Vec<RawTensor>,
    pub(crate) metadata: BTreeMap<String, String>,
    /// Absolute file offset of the data buffer (`8 + n`).
    pub(crate) data_start: u64,
}

/// A check of the safetensors format that failed, with where it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The file cannot hold the 8-byte length prefix.
    #[error("file is {file_len} bytes, too short for the 8-byte header length")]
    TooShort {
        /// Length of the file.
        file_len: u64,
    },
    /// The header length prefix is over the cap.
    #[error("header length {header_len} (bytes 0..8) is over the {max}-byte cap")]
    TooLarge {
        /// Declared header length.
        header_len: u64,
        /// The cap.
        max: u64,
    },
    /// The header length prefix points past the end of the file.
    #[error(
        "header length {header_len} (bytes 0..8) runs past the end of the {file_len}-byte file"
    )]
    PastEnd {
        /// Declared header length.
        header_len: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The header is not UTF-8.
    #[error("header is not UTF-8 at byte offset {offset}")]
    NotUtf8 {
        /// Absolute file offset of the first invalid byte.
        offset: u64,
    },
    /// The header is not a JSON object of tensor entries.
    #[error("header JSON is malformed at line {line} column {column}")]
    Json {
        /// Line within the header JSON.
        line: usize,
        /// Column within the header JSON.
        column: usize,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A name appears twice in the header.
    #[error("tensor `{name}` appears twice in the header")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// An entry is not `{dtype, shape, data_offsets}` of the right types.
    #[error("tensor `{name}`: malformed entry")]
    Entry {
        /// The tensor's name.
        name: String,
        /// What the JSON reader found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// `__metadata__` is not a map of strings to strings.
    #[error("`__metadata__` must map strings to strings")]
    Metadata {
        /// What the JSON reader found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// An entry names a dtype safetensors does not define.
    #[error("tensor `{name}`: unknown dtype `{dtype}`")]
    UnknownDtype {
        /// The tensor's name.
        name: String,
        /// The dtype as written.
        dtype: String,
    },
    /// The number of elements times the element size overflows or is not whole bytes.
    #[error("tensor `{name}`: shape {shape:?} of {dtype} does not fit in a whole number of bytes")]
    ShapeSize {
        /// The tensor's name.
        name: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// `data_offsets` is reversed.
    #[error("tensor `{name}`: data_offsets [{begin}, {end}] end before they begin")]
    Reversed {
        /// The tensor's name.
        name: String,
        /// Declared begin.
        begin: u64,
        /// Declared end.
        end: u64,
    },
    /// The extent's length disagrees with shape x dtype size.
    #[error(
        "tensor `{name}`: data_offsets [{begin}, {end}] hold {actual} bytes but {dtype} {shape:?} needs {expected}"
    )]
    LengthMismatch {
        /// The tensor's name.
        name: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<u64>,
        /// Declared begin.
        begin: u64,
        /// Declared end.
        end: u64,
        /// Bytes the shape needs.
        expected: u64,
        /// Bytes the offsets hold.
        actual: u64,
    },
    /// The extent ends past the end of the file.
    #[error(
        "tensor `{name}`: data ends at byte offset {end_offset}, past the end of the {file_len}-byte file"
    )]
    OutOfBounds {
        /// The tensor's name.
        name: String,
        /// Absolute file offset where its data ends.
        end_offset: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// Two extents overlap.
    #[error("tensor `{name}` overlaps tensor `{other}` at byte offset {offset}")]
    Overlap {
        /// The tensor's name.
        name: String,
        /// The tensor it overlaps.
        other: String,
        /// Absolute file offset where they overlap.
        offset: u64,
    },
    /// The data buffer has bytes that belong to no tensor.
    #[error("bytes {start}..{end} of the file belong to no tensor")]
    Gap {
        /// Absolute file offset of the first unclaimed byte.
        start: u64,
        /// Absolute file offset after the last unclaimed byte.
        end: u64,
    },
    /// The reference parser rejected a header lowtide's own checks accepted.
    #[error("the reference safetensors parser rejects the header")]
    Reference {
        /// The reference parser's error.
        #[source]
        source: safetensors::SafeTensorError,
    },
}

/// Reads the length prefix: the header length `n`, checked against the cap and the file length.
pub(crate) fn header_len(prefix: [u8; 8], file_len: u64) -> Result<u64, HeaderError> {
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLarge {
            header_len,
            max: MAX_HEADER_LEN,
        });
    }
    if PREFIX_LEN + header_len > file_len {
        return Err(HeaderError::PastEnd {
            header_len,
            file_len,
        });
    }
    Ok(header_len)
}

#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// The top-level object with its keys in file order, duplicates kept so they can be reported.
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object mapping tensor names to entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// Validates the header JSON `json` of a file of `file_len` bytes.
pub(crate) fn parse(json: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    let data_start = PREFIX_LEN + json.len() as u64;
    let text = std::str::from_utf8(json).map_err(|err| HeaderError::NotUtf8 {
        offset: PREFIX_LEN + err.valid_up_to() as u64,
    })?;
    let Entries(entries) = serde_json::from_str(text).map_err(|source| HeaderError::Json {
        line: source.line(),
        column: source.column(),
        source,
    })?;

    let mut seen = HashSet::with_capacity(entries.len());
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(HeaderError::DuplicateName { name });
        }
        if name == "__metadata__" {
            if !value.is_null() {
                metadata = serde_json::from_value(value)
                    .map_err(|source| HeaderError::Metadata { source })?;
            }
            continue;
        }
        let entry: Entry = match serde_json::from_value(value) {
            Ok(entry) => entry,
            Err(source) => return Err(HeaderError::Entry { name, source }),
        };
        tensors.push(check_entry(name, entry, data_start, file_len)?);
    }

    // Extents must tile the data buffer exactly: sorted by offset, each starts where the
    // previous ended and the last ends at the end of the file (as the reference requires).
    tensors.sort_by_key(|t| (t.begin, t.end));
    let mut cursor = 0u64;
    let mut previous: Option<&RawTensor> = None;
    for tensor in &tensors {
        if tensor.begin < cursor {
            let other = previous.map_or_else(String::new, |p| p.name.clone());
            return Err(HeaderError::Overlap {
                name: tensor.name.clone(),
                other,
                offset: data_start + tensor.begin,
            });
        }
        if tensor.begin > cursor {
            return Err(HeaderError::Gap {
                start: data_start + cursor,
                end: data_start + tensor.begin,
            });
        }
        cursor = tensor.end;
        previous = Some(tensor);
    }
    if data_start + cursor != file_len {
        return Err(HeaderError::Gap {
            start: data_start + cursor,
            end: file_len,
        });
    }

    // Second opinion from the reference parser. It checks the same things, so a rejection
    // here means the two disagree; refuse the file rather than guess.
    let reference: safetensors::tensor::Metadata =
        serde_json::from_str(text).map_err(|err| HeaderError::Reference {
            source: safetensors::SafeTensorError::InvalidHeaderDeserialization(err),
        })?;
    if reference.data_len() as u64 != cursor || reference.tensors().len() != tensors.len() {
        return Err(HeaderError::Reference {
            source: safetensors::SafeTensorError::MetadataIncompleteBuffer,
        });
    }

    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

fn check_entry(
    name: String,
    entry: Entry,
    data_start: u64,
    file_len: u64,
) -> Result<RawTensor, HeaderError> {
    let Ok(dtype) = entry.dtype.parse::<Dtype>() else {
        return Err(HeaderError::UnknownDtype {
            name,
            dtype: entry.dtype,
        });
    };
    let shape = entry.shape;
    let (begin, end) = entry.data_offsets;
    let expected = shape
        .iter()
        .try_fold(1u64, |acc, &dim| acc.checked_mul(dim))
        .and_then(|elements| dtype.bytes_for(elements));
    let Some(expected) = expected else {
        return Err(HeaderError::ShapeSize { name, dtype, shape });
    };
    if end < begin {
        return Err(HeaderError::Reversed { name, begin, end });
    }
    if end - begin != expected {
        return Err(HeaderError::LengthMismatch {
            name,
            dtype,
            shape,
            begin,
            end,
            expected,
            actual: end - begin,
        });
    }
    match data_start.checked_add(end) {
        Some(end_offset) if end_offset <= file_len => {}
        end_offset => {
            return Err(HeaderError::OutOfBounds {
                name,
                end_offset: end_offset.unwrap_or(u64::MAX),
                file_len,
            });
        }
    }
    Ok(RawTensor {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::{HeaderError, PREFIX_LEN, parse};

    fn check(json: &str, data_len: u64) -> Result<super::Header, HeaderError> {
        parse(json.as_bytes(), PREFIX_LEN + json.len() as u64 + data_len)
    }

    #[test]
    fn accepts_a_valid_header() {
        let json = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        let header = check(json, 12).unwrap();
        assert_eq!(header.tensors.len(), 2);
        assert_eq!(header.tensors[0].name, "a");
        assert_eq!(header.metadata["format"], "pt");
    }

    #[test]
    fn rejects_with_location() {
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(matches!(check(dup, 1), Err(HeaderError::DuplicateName { name }) if name == "a"));
        let mismatch = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let err = check(mismatch, 8).unwrap_err();
        assert!(err.to_string().contains("tensor `w`"), "{err}");
        let overlap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        assert!(matches!(
            check(overlap, 6),
            Err(HeaderError::Overlap { .. })
        ));
        let past = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(matches!(
            check(past, 2),
            Err(HeaderError::OutOfBounds { .. })
        ));
        assert!(matches!(check(past, 6), Err(HeaderError::Gap { .. })));
        let dtype = r#"{"a":{"dtype":"F17","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(matches!(
            check(dtype, 4),
            Err(HeaderError::UnknownDtype { .. })
        ));
        let huge = r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#;
        assert!(matches!(check(huge, 4), Err(HeaderError::ShapeSize { .. })));
        assert!(matches!(check("[1,2]", 0), Err(HeaderError::Json { .. })));
        let meta = r#"{"__metadata__":{"a":1}}"#;
        assert!(matches!(check(meta, 0), Err(HeaderError::Metadata { .. })));
    }
}

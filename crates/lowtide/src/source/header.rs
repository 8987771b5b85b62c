//! Parsing and complete validation of a safetensors header.
//!
//! Layout: 8 bytes little-endian header length `n`, `n` bytes of JSON, then the data buffer.
//! The JSON maps tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets
//! relative to the data buffer) plus an optional `"__metadata__"` map of strings.
//!
//! Every check names the tensor or byte offset it failed at. Each entry that passes lowtide's
//! own checks is checked again by the reference implementation's types and validation (the
//! `safetensors` crate) as a second opinion, so a file is accepted only when both agree.
//!
//! Memory: the header is read as a stream of entries, never as a JSON tree. Names are copied
//! once (into the tensor list), dtypes are borrowed from the text, shapes are stored without
//! spare capacity (and at most [`MAX_RANK`] dimensions), and names are checked for
//! duplicates by hash. Parsing a header of typical entries takes the text plus about four
//! times its size for the tensor list (measured: 398 MB for an 85.7 MB header of a million
//! tensors); a short entry costs at most a few hundred bytes.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, RandomState};

use serde::Deserialize;
use serde::de::{DeserializeSeed, Error as _, MapAccess, Visitor};

use crate::dtype::Dtype;
use crate::text::Escaped;

/// Bytes of the little-endian length prefix.
pub(crate) const PREFIX_LEN: u64 = 8;
/// Largest header accepted, as in the reference implementation.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor entry of a validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawTensor {
    pub(crate) name: String,
    pub(crate) dtype: Dtype,
    /// Position in the header, to keep its order among tensors at the same offset.
    pub(crate) order: u32,
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
    /// The header length prefix is over the cap. The message does not show the length: eight
    /// bytes of a file that is not a safetensors file may be text (`root:*:2` of a password
    /// file), which an error message must not repeat.
    #[error("the header length (bytes 0..8) is over the {max}-byte cap: not a safetensors file")]
    TooLarge {
        /// Declared header length.
        header_len: u64,
        /// The cap.
        max: u64,
    },
    /// The header length prefix points past the end of the file. The length is shown: it is
    /// under the cap, so its upper bytes are zero and it cannot carry text.
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
    #[error("tensor `{}` appears twice in the header", Escaped(name))]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// An entry is not `{dtype, shape, data_offsets}` of the right types.
    #[error("tensor `{}`: malformed entry", Escaped(name))]
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
    #[error("tensor `{}`: unknown dtype `{}`", Escaped(name), Escaped(dtype))]
    UnknownDtype {
        /// The tensor's name.
        name: String,
        /// The dtype as written.
        dtype: String,
    },
    /// The number of elements times the element size overflows or is not whole bytes.
    #[error(
        "tensor `{}`: shape {shape:?} of {dtype} does not fit in a whole number of bytes",
        Escaped(name)
    )]
    ShapeSize {
        /// The tensor's name.
        name: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// `data_offsets` is reversed.
    #[error(
        "tensor `{}`: data_offsets [{begin}, {end}] end before they begin",
        Escaped(name)
    )]
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
        "tensor `{}`: data_offsets [{begin}, {end}] hold {actual} bytes but {dtype} {shape:?} needs {expected}",
        Escaped(name)
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
        "tensor `{}`: data ends at byte offset {end_offset}, past the end of the {file_len}-byte file",
        Escaped(name)
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
    #[error(
        "tensor `{}` overlaps tensor `{}` at byte offset {offset}",
        Escaped(name),
        Escaped(other)
    )]
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

/// One tensor's entry as written. The dtype is borrowed from the header text when it has no
/// escapes; the shape is stored without spare capacity.
#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    dtype: Cow<'a, str>,
    #[serde(deserialize_with = "exact_shape")]
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// The most dimensions a shape may have: the limit of `NumPy` arrays (`NPY_MAXDIMS`), far above any model's.
/// It also bounds what one entry can make the parser hold (a shape of millions of ones).
pub(crate) const MAX_RANK: usize = 64;

fn exact_shape<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u64>, D::Error> {
    struct Dims;
    impl<'de> Visitor<'de> for Dims {
        type Value = Vec<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of at most {MAX_RANK} dimensions")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u64>, A::Error> {
            let mut shape = Vec::new();
            while let Some(dim) = seq.next_element::<u64>()? {
                if shape.len() == MAX_RANK {
                    return Err(A::Error::custom(format_args!(
                        "a shape has at most {MAX_RANK} dimensions"
                    )));
                }
                shape.push(dim);
            }
            shape.shrink_to_fit();
            Ok(shape)
        }
    }
    deserializer.deserialize_seq(Dims)
}

/// A key of the top-level object: borrowed from the header text unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a tensor name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Where the streaming parse of the top-level object stopped, when it stopped early.
enum Stop {
    /// A check of lowtide's failed on an entry.
    Check(HeaderError),
    /// The JSON reader failed inside this tensor's entry.
    InEntry(String),
    /// The JSON reader failed inside `__metadata__`.
    InMetadata,
}

/// Reads the top-level object entry by entry, checking each as it comes, so that the header
/// is never held as a JSON tree: memory is the text plus the tensors.
struct Entries<'s> {
    data_start: u64,
    file_len: u64,
    metadata: &'s mut BTreeMap<String, String>,
    stop: &'s mut Option<Stop>,
}

impl<'de> DeserializeSeed<'de> for Entries<'_> {
    type Value = Vec<RawTensor>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<RawTensor>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_> {
    type Value = Vec<RawTensor>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object mapping tensor names to entries")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<RawTensor>, A::Error> {
        let stop = |stop: &mut Option<Stop>, why: Stop| {
            *stop = Some(why);
            A::Error::custom("stopped")
        };
        let mut tensors: Vec<RawTensor> = Vec::new();
        // Names seen so far, as hashes under a per-parse random key: a few bytes per tensor
        // where a set of the names would copy them. A hash seen before is confirmed against
        // the names themselves, so a collision costs a scan but never a false error.
        let hasher = RandomState::new();
        let mut seen: HashSet<u64> = HashSet::new();
        let mut metadata_seen = false;
        while let Some(Key(name)) = map.next_key::<Key<'de>>()? {
            if name == "__metadata__" {
                if metadata_seen {
                    let name = name.into_owned();
                    return Err(stop(
                        self.stop,
                        Stop::Check(HeaderError::DuplicateName { name }),
                    ));
                }
                metadata_seen = true;
                match map.next_value::<Option<BTreeMap<String, String>>>() {
                    Ok(metadata) => *self.metadata = metadata.unwrap_or_default(),
                    Err(err) => {
                        *self.stop = Some(Stop::InMetadata);
                        return Err(err);
                    }
                }
                continue;
            }
            if !seen.insert(hasher.hash_one(&*name)) && tensors.iter().any(|t| t.name == name) {
                let name = name.into_owned();
                return Err(stop(
                    self.stop,
                    Stop::Check(HeaderError::DuplicateName { name }),
                ));
            }
            let entry = match map.next_value::<Entry<'de>>() {
                Ok(entry) => entry,
                Err(err) => {
                    *self.stop = Some(Stop::InEntry(name.into_owned()));
                    return Err(err);
                }
            };
            let order = u32::try_from(tensors.len()).unwrap_or(u32::MAX);
            match check_entry(
                name.into_owned(),
                order,
                entry,
                self.data_start,
                self.file_len,
            ) {
                Ok(tensor) => tensors.push(tensor),
                Err(err) => return Err(stop(self.stop, Stop::Check(err))),
            }
        }
        Ok(tensors)
    }
}

/// Validates the header JSON `json` of a file of `file_len` bytes.
pub(crate) fn parse(json: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    let data_start = PREFIX_LEN + json.len() as u64;
    let text = std::str::from_utf8(json).map_err(|err| HeaderError::NotUtf8 {
        offset: PREFIX_LEN + err.valid_up_to() as u64,
    })?;
    let mut metadata = BTreeMap::new();
    let mut stop = None;
    let mut reader = serde_json::Deserializer::from_str(text);
    let entries = Entries {
        data_start,
        file_len,
        metadata: &mut metadata,
        stop: &mut stop,
    };
    let parsed = entries
        .deserialize(&mut reader)
        .and_then(|tensors| reader.end().map(|()| tensors));
    let mut tensors = match parsed {
        Ok(tensors) => tensors,
        Err(source) => {
            let data = source.classify() == serde_json::error::Category::Data;
            return Err(match stop {
                Some(Stop::Check(err)) => err,
                Some(Stop::InEntry(name)) if data => HeaderError::Entry { name, source },
                Some(Stop::InMetadata) if data => HeaderError::Metadata { source },
                _ => HeaderError::Json {
                    line: source.line(),
                    column: source.column(),
                    source,
                },
            });
        }
    };
    tensors.shrink_to_fit();

    // Extents must tile the data buffer exactly: sorted by offset, each starts where the
    // previous ended and the last ends at the end of the file (as the reference requires).
    // Ties (empty tensors at one offset) keep the order of the header.
    let key = |t: &RawTensor| (t.begin, t.end, t.order);
    if !tensors.is_sorted_by_key(key) {
        tensors.sort_unstable_by_key(key);
    }
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

    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

fn check_entry(
    name: String,
    order: u32,
    entry: Entry<'_>,
    data_start: u64,
    file_len: u64,
) -> Result<RawTensor, HeaderError> {
    // The ggml block types are dtypes of GGUF files only.
    let Some(dtype) = entry
        .dtype
        .parse::<Dtype>()
        .ok()
        .filter(|d| d.is_safetensors())
    else {
        return Err(HeaderError::UnknownDtype {
            name,
            dtype: entry.dtype.into_owned(),
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
    reference_check(&entry.dtype, &shape, end - begin)?;
    Ok(RawTensor {
        name,
        dtype,
        order,
        shape,
        begin,
        end,
    })
}

/// The second opinion: the reference implementation's own types and checks on one entry that
/// lowtide's checks accepted. Its dtype is parsed by the reference's `Dtype`, and its shape and
/// length (as an extent from 0) are validated by the reference's `Metadata::new`, which
/// computes the size with the reference's arithmetic. A rejection means the two disagree;
/// the file is refused rather than guessed at.
///
/// Why per entry: the reference's whole-header parse buffers the header as a tree (its
/// `#[serde(flatten)]` map) and took over ten times the header's size in memory. The tiling
/// of the extents, the one check the reference makes across entries, is the loop in [`parse`].
fn reference_check(dtype: &str, shape: &[u64], len: u64) -> Result<(), HeaderError> {
    use safetensors::SafeTensorError;
    use safetensors::tensor::{Metadata, TensorInfo};
    use serde::de::IntoDeserializer;

    let reference = |source| HeaderError::Reference { source };
    let dtype = safetensors::Dtype::deserialize(dtype.into_deserializer()).map_err(
        |err: serde_json::Error| reference(SafeTensorError::InvalidHeaderDeserialization(err)),
    )?;
    let size =
        |n: u64| usize::try_from(n).map_err(|_| reference(SafeTensorError::ValidationOverflow));
    let info = TensorInfo {
        dtype,
        shape: shape.iter().map(|&d| size(d)).collect::<Result<_, _>>()?,
        data_offsets: (0, size(len)?),
    };
    Metadata::new(None, vec![(String::new(), info)]).map_err(reference)?;
    Ok(())
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
    fn shapes_have_at_most_max_rank_dimensions() {
        let entry = |rank: usize| {
            let ones = vec!["1"; rank].join(",");
            format!(r#"{{"w":{{"dtype":"U8","shape":[{ones}],"data_offsets":[0,1]}}}}"#)
        };
        assert!(check(&entry(super::MAX_RANK), 1).is_ok());
        let err = check(&entry(super::MAX_RANK + 1), 1).unwrap_err();
        assert!(
            matches!(err, HeaderError::Entry { ref name, .. } if name == "w"),
            "{err:?}"
        );
        let chain = format!("{:?}", std::error::Error::source(&err));
        assert!(chain.contains("at most 64 dimensions"), "{chain}");
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
        let ggml = r#"{"a":{"dtype":"Q4_0","shape":[32],"data_offsets":[0,18]}}"#;
        assert!(matches!(
            check(ggml, 18),
            Err(HeaderError::UnknownDtype { .. })
        ));
        let huge = r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#;
        assert!(matches!(check(huge, 4), Err(HeaderError::ShapeSize { .. })));
        assert!(matches!(check("[1,2]", 0), Err(HeaderError::Json { .. })));
        let meta = r#"{"__metadata__":{"a":1}}"#;
        assert!(matches!(check(meta, 0), Err(HeaderError::Metadata { .. })));
    }

    #[test]
    fn entries_are_read_one_at_a_time_with_their_names() {
        // A name written with an escape is the same name: still a duplicate.
        let dup = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"\u0061":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(matches!(check(dup, 2), Err(HeaderError::DuplicateName { name }) if name == "a"));
        let meta_twice = r#"{"__metadata__":{},"__metadata__":null}"#;
        assert!(matches!(
            check(meta_twice, 0),
            Err(HeaderError::DuplicateName { name }) if name == "__metadata__"
        ));
        // A wrong type inside an entry names the entry; broken JSON is a JSON error.
        let wrong = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"U8","shape":"x","data_offsets":[1,2]}}"#;
        assert!(matches!(check(wrong, 2), Err(HeaderError::Entry { name, .. }) if name == "b"));
        assert!(matches!(
            check(r#"{"b":null}"#, 0),
            Err(HeaderError::Entry { .. })
        ));
        let broken = r#"{"a":{"dtype":"U8","shape":[1,,"data_offsets":[0,1]}}"#;
        assert!(matches!(check(broken, 1), Err(HeaderError::Json { .. })));
        let trailing = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x"#;
        assert!(matches!(check(trailing, 1), Err(HeaderError::Json { .. })));
        // Empty tensors at one offset keep their order in the header.
        let empties = r#"{"z":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"y":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let names: Vec<String> = check(empties, 1)
            .unwrap()
            .tensors
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["z", "y", "x"]);
    }

    #[test]
    fn messages_escape_names_and_never_echo_an_implausible_length() {
        let evil = r"\u001b[2J\r all good";
        let dup = format!(
            r#"{{"{evil}":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}},"{evil}":{{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}}}"#
        );
        let err = check(&dup, 2).unwrap_err();
        assert!(matches!(&err, HeaderError::DuplicateName { name } if name.contains('\u{1b}')));
        let shown = err.to_string();
        assert!(!shown.contains(['\u{1b}', '\r']), "{shown:?}");
        assert!(shown.contains(r"\u{1b}[2J\u{d} all good"), "{shown}");

        let prefix = *b"root:*:2";
        let err = super::header_len(prefix, 1 << 20).unwrap_err();
        let shown = err.to_string();
        assert!(
            matches!(err, HeaderError::TooLarge { header_len, .. } if header_len == u64::from_le_bytes(prefix))
        );
        assert!(
            !shown.contains(&u64::from_le_bytes(prefix).to_string()),
            "{shown}"
        );
    }
}

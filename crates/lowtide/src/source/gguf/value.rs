//! GGUF metadata values: the thirteen value types, typed arrays, and strings kept as bytes.

use std::fmt;

macro_rules! value_types {
    ($($variant:ident = $id:literal, $name:literal, $size:expr;)*) => {
        /// The type of a GGUF metadata value, as the file writes it (a `u32`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum GgufValueType {
            $(#[doc = concat!("`", $name, "` (type id ", $id, ").")] $variant,)*
        }

        impl GgufValueType {
            /// The type of id `id` (`None`: unknown).
            pub fn from_id(id: u32) -> Option<Self> {
                match id {
                    $($id => Some(Self::$variant),)*
                    _ => None,
                }
            }

            /// Its id in GGUF files.
            pub fn id(self) -> u32 {
                match self { $(Self::$variant => $id,)* }
            }

            /// Its name, as the reference `gguf` package's `GGUFValueType` names it.
            pub fn name(self) -> &'static str {
                match self { $(Self::$variant => $name,)* }
            }

            /// The fewest bytes a value of this type takes in a file (strings and arrays:
            /// their length fields).
            pub(crate) fn min_size(self) -> u64 {
                match self { $(Self::$variant => $size,)* }
            }
        }
    };
}

value_types! {
    U8 = 0, "UINT8", 1;
    I8 = 1, "INT8", 1;
    U16 = 2, "UINT16", 2;
    I16 = 3, "INT16", 2;
    U32 = 4, "UINT32", 4;
    I32 = 5, "INT32", 4;
    F32 = 6, "FLOAT32", 4;
    Bool = 7, "BOOL", 1;
    String = 8, "STRING", 8;
    Array = 9, "ARRAY", 12;
    U64 = 10, "UINT64", 8;
    I64 = 11, "INT64", 8;
    F64 = 12, "FLOAT64", 8;
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A GGUF string: its bytes as written. The format says UTF-8; keys and tensor names are
/// checked to be, but a string value is kept as it is (tokenizer vocabularies hold byte
/// pieces), readable as text with [`GgufString::as_str`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct GgufString(pub(crate) Box<[u8]>);

impl GgufString {
    /// A string of `bytes`.
    pub fn new(bytes: impl Into<Box<[u8]>>) -> Self {
        Self(bytes.into())
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Its text, when it is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// Its text, invalid UTF-8 replaced with U+FFFD.
    pub fn to_string_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }
}

impl From<&str> for GgufString {
    fn from(text: &str) -> Self {
        Self(text.as_bytes().into())
    }
}

impl From<String> for GgufString {
    fn from(text: String) -> Self {
        Self(text.into_bytes().into())
    }
}

impl fmt::Debug for GgufString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string_lossy(), f)
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum GgufValue {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `FLOAT32`.
    F32(f32),
    /// `BOOL` (the byte 0 or 1).
    Bool(bool),
    /// `STRING`.
    String(GgufString),
    /// `ARRAY`: elements of one type.
    Array(GgufArray),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT64`.
    F64(f64),
}

/// An array value: its elements, stored by type.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
#[allow(missing_docs)] // each variant is the array of the value type of its name
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<GgufString>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufValue {
    /// Its type.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            Self::U8(_) => GgufValueType::U8,
            Self::I8(_) => GgufValueType::I8,
            Self::U16(_) => GgufValueType::U16,
            Self::I16(_) => GgufValueType::I16,
            Self::U32(_) => GgufValueType::U32,
            Self::I32(_) => GgufValueType::I32,
            Self::F32(_) => GgufValueType::F32,
            Self::Bool(_) => GgufValueType::Bool,
            Self::String(_) => GgufValueType::String,
            Self::Array(_) => GgufValueType::Array,
            Self::U64(_) => GgufValueType::U64,
            Self::I64(_) => GgufValueType::I64,
            Self::F64(_) => GgufValueType::F64,
        }
    }

    /// Its text, when it is a UTF-8 string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => s.as_str(),
            _ => None,
        }
    }

    /// Its value, when it is an unsigned or a non-negative signed integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

macro_rules! arrays {
    ($($variant:ident),*) => {
        impl GgufArray {
            /// Its number of elements.
            pub fn len(&self) -> usize {
                match self { $(Self::$variant(v) => v.len(),)* }
            }

            /// The type of its elements.
            pub fn element_type(&self) -> GgufValueType {
                match self { $(Self::$variant(_) => GgufValueType::$variant,)* }
            }
        }
    };
}
arrays!(
    U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64
);

impl GgufArray {
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// As JSON: numbers, booleans, strings (invalid UTF-8 replaced with U+FFFD) and lists. A
/// float that is not finite is `null`, as `serde_json` writes it.
impl serde::Serialize for GgufValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::U8(v) => s.serialize_u8(*v),
            Self::I8(v) => s.serialize_i8(*v),
            Self::U16(v) => s.serialize_u16(*v),
            Self::I16(v) => s.serialize_i16(*v),
            Self::U32(v) => s.serialize_u32(*v),
            Self::I32(v) => s.serialize_i32(*v),
            Self::F32(v) => s.serialize_f32(*v),
            Self::Bool(v) => s.serialize_bool(*v),
            Self::String(v) => v.serialize(s),
            Self::Array(v) => v.serialize(s),
            Self::U64(v) => s.serialize_u64(*v),
            Self::I64(v) => s.serialize_i64(*v),
            Self::F64(v) => s.serialize_f64(*v),
        }
    }
}

impl serde::Serialize for GgufString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string_lossy())
    }
}

impl serde::Serialize for GgufArray {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::U8(v) => s.collect_seq(v),
            Self::I8(v) => s.collect_seq(v),
            Self::U16(v) => s.collect_seq(v),
            Self::I16(v) => s.collect_seq(v),
            Self::U32(v) => s.collect_seq(v),
            Self::I32(v) => s.collect_seq(v),
            Self::F32(v) => s.collect_seq(v),
            Self::Bool(v) => s.collect_seq(v),
            Self::String(v) => s.collect_seq(v),
            Self::Array(v) => s.collect_seq(v),
            Self::U64(v) => s.collect_seq(v),
            Self::I64(v) => s.collect_seq(v),
            Self::F64(v) => s.collect_seq(v),
        }
    }
}

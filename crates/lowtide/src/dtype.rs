//! Element types: those of safetensors headers and the ggml types of GGUF files.
//!
//! Most types have a whole number of bits per element. The ggml quantized types (`Q4_0`,
//! `Q4_K`, `IQ2_XXS`, ...) are stored in *blocks*: a block of [`Block::elements`] elements
//! takes [`Block::bytes`] bytes, and a tensor's innermost dimension is a whole number of
//! blocks. [`Dtype::block`] gives the geometry of every type (one element per block for the
//! plain types), and [`Dtype::bytes_for`] / [`Dtype::bytes_for_shape`] compute sizes from it.

use std::fmt;
use std::str::FromStr;

/// How a type's elements are packed: `elements` elements take `bytes` bytes, as one unit.
///
/// Plain types have blocks of one element (`F32`: 1 element, 4 bytes); sub-byte safetensors
/// types have the smallest whole-byte group (`F4`: 2 elements, 1 byte; `F6_E2M3`: 4 elements,
/// 3 bytes); ggml quantized types have their ggml block (`Q4_0`: 32 elements, 18 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Block {
    /// Elements in one block.
    pub elements: u64,
    /// Bytes of one block.
    pub bytes: u64,
}

macro_rules! dtypes {
    (
        safetensors { $($variant:ident = $name:literal, $bits:literal, $ggml:expr, $doc:literal;)* }
        ggml { $($qvariant:ident = $qname:literal, $qid:literal, $qblock:literal, $qbytes:literal;)* }
    ) => {
        /// The element type of a tensor: the dtypes of safetensors headers (`"BF16"`) and the
        /// ggml tensor types of GGUF files (`Q4_K`). The types both formats have (`F32`,
        /// `F16`, `BF16`, `F64`, `I8` to `I64`) are one variant each.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        #[allow(non_camel_case_types)]
        pub enum Dtype {
            $(#[doc = $doc] $variant,)*
            $(#[doc = concat!("ggml `", $qname, "` (type ", $qid, "): blocks of ", $qblock, " elements in ", $qbytes, " bytes.")] $qvariant,)*
        }

        impl Dtype {
            /// Every dtype lowtide knows.
            pub const ALL: &'static [Dtype] = &[$(Dtype::$variant,)* $(Dtype::$qvariant,)*];

            /// The dtypes safetensors headers may name.
            pub const SAFETENSORS: &'static [Dtype] = &[$(Dtype::$variant,)*];

            /// The name used in safetensors headers (`"BF16"`), or by ggml for its own types
            /// (`"Q4_K"`, `"IQ2_XXS"`, as the reference `gguf` package names them).
            pub fn name(self) -> &'static str {
                match self {
                    $(Dtype::$variant => $name,)*
                    $(Dtype::$qvariant => $qname,)*
                }
            }

            /// Bits of one element. For the ggml block types, whose elements share bytes
            /// (scales), it is the bits of a block divided by its elements, rounded up, and
            /// never a multiple of 8: sizes come from [`Dtype::block`] and
            /// [`Dtype::bytes_for`], not from this.
            pub fn bits(self) -> u64 {
                match self {
                    $(Dtype::$variant => $bits,)*
                    $(Dtype::$qvariant => ($qbytes * 8u64).div_ceil($qblock),)*
                }
            }

            /// The ggml type id of this dtype in GGUF files (`None`: GGUF has no such type).
            pub fn ggml_id(self) -> Option<u32> {
                match self {
                    $(Dtype::$variant => $ggml,)*
                    $(Dtype::$qvariant => Some($qid),)*
                }
            }

            /// The dtype of ggml type id `id`, as GGUF files write it (`None`: unknown).
            pub fn from_ggml_id(id: u32) -> Option<Dtype> {
                match id {
                    $(id if $ggml == Some(id) => Some(Dtype::$variant),)*
                    $($qid => Some(Dtype::$qvariant),)*
                    _ => None,
                }
            }

            /// The geometry of its storage: how many elements take how many bytes.
            pub fn block(self) -> Block {
                match self {
                    $(Dtype::$variant => {
                        // The smallest group of whole bytes: 8 / gcd(bits, 8) elements.
                        let elements = 8 / gcd($bits, 8);
                        Block { elements, bytes: elements * $bits / 8 }
                    })*
                    $(Dtype::$qvariant => Block { elements: $qblock, bytes: $qbytes },)*
                }
            }

            /// Whether safetensors headers may name it.
            pub fn is_safetensors(self) -> bool {
                matches!(self, $(Dtype::$variant)|*)
            }
        }

        impl FromStr for Dtype {
            type Err = UnknownDtype;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(Dtype::$variant),)*
                    $($qname => Ok(Dtype::$qvariant),)*
                    _ => Err(UnknownDtype(s.to_owned())),
                }
            }
        }
    };
}

const fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

// The ggml ids and block geometry are those of ggml's `type_traits` (`ggml/src/ggml.c`) and of
// the reference `gguf` package's `GGML_QUANT_SIZES` (`gguf-py/gguf/constants.py`), which the
// tests check against each other (`tests/gguf_reference.rs`). Ids 4 and 5 (Q4_2, Q4_3) and
// 31 to 33 (Q4_0_4_4 and its kind, repacked at load time) were removed from ggml.
dtypes! {
    safetensors {
        BOOL = "BOOL", 8, None, "Boolean, one byte.";
        F4 = "F4", 4, None, "4-bit float (MXFP4 elements without their scales).";
        F6_E2M3 = "F6_E2M3", 6, None, "6-bit float, E2M3.";
        F6_E3M2 = "F6_E3M2", 6, None, "6-bit float, E3M2.";
        U8 = "U8", 8, None, "Unsigned byte.";
        I8 = "I8", 8, Some(24), "Signed byte.";
        F8_E5M2 = "F8_E5M2", 8, None, "8-bit float, E5M2.";
        F8_E4M3 = "F8_E4M3", 8, None, "8-bit float, E4M3.";
        F8_E8M0 = "F8_E8M0", 8, None, "8-bit exponent-only scale.";
        I16 = "I16", 16, Some(25), "Signed 16-bit integer.";
        U16 = "U16", 16, None, "Unsigned 16-bit integer.";
        F16 = "F16", 16, Some(1), "IEEE half precision.";
        BF16 = "BF16", 16, Some(30), "bfloat16.";
        I32 = "I32", 32, Some(26), "Signed 32-bit integer.";
        U32 = "U32", 32, None, "Unsigned 32-bit integer.";
        F32 = "F32", 32, Some(0), "IEEE single precision.";
        C64 = "C64", 64, None, "Complex with two 32-bit float parts.";
        F64 = "F64", 64, Some(28), "IEEE double precision.";
        I64 = "I64", 64, Some(27), "Signed 64-bit integer.";
        U64 = "U64", 64, None, "Unsigned 64-bit integer.";
    }
    ggml {
        Q4_0 = "Q4_0", 2, 32, 18;
        Q4_1 = "Q4_1", 3, 32, 20;
        Q5_0 = "Q5_0", 6, 32, 22;
        Q5_1 = "Q5_1", 7, 32, 24;
        Q8_0 = "Q8_0", 8, 32, 34;
        Q8_1 = "Q8_1", 9, 32, 40;
        Q2_K = "Q2_K", 10, 256, 84;
        Q3_K = "Q3_K", 11, 256, 110;
        Q4_K = "Q4_K", 12, 256, 144;
        Q5_K = "Q5_K", 13, 256, 176;
        Q6_K = "Q6_K", 14, 256, 210;
        Q8_K = "Q8_K", 15, 256, 292;
        IQ2_XXS = "IQ2_XXS", 16, 256, 66;
        IQ2_XS = "IQ2_XS", 17, 256, 74;
        IQ3_XXS = "IQ3_XXS", 18, 256, 98;
        IQ1_S = "IQ1_S", 19, 256, 50;
        IQ4_NL = "IQ4_NL", 20, 32, 18;
        IQ3_S = "IQ3_S", 21, 256, 110;
        IQ2_S = "IQ2_S", 22, 256, 82;
        IQ4_XS = "IQ4_XS", 23, 256, 136;
        IQ1_M = "IQ1_M", 29, 256, 56;
        TQ1_0 = "TQ1_0", 34, 256, 54;
        TQ2_0 = "TQ2_0", 35, 256, 66;
        MXFP4 = "MXFP4", 39, 32, 17;
        NVFP4 = "NVFP4", 40, 64, 36;
        Q1_0 = "Q1_0", 41, 128, 18;
    }
}

impl Dtype {
    /// Bytes needed by `elements` elements, or `None` on overflow or a partial block (a
    /// partial byte for sub-byte types).
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        let Block { elements: n, bytes } = self.block();
        elements
            .is_multiple_of(n)
            .then_some(elements / n)?
            .checked_mul(bytes)
    }

    /// Bytes of a tensor of `shape` (outermost dimension first), or `None` when the number of
    /// elements or of bytes overflows (a shape with a zero dimension has none) or when the
    /// innermost dimension is not a whole number of blocks. For types of one-element
    /// blocks this is [`Dtype::bytes_for`] of the product.
    pub fn bytes_for_shape(self, shape: &[u64]) -> Option<u64> {
        // The product itself, whatever the order: a zero dimension makes it zero.
        let elements = if shape.contains(&0) {
            0
        } else {
            shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))?
        };
        let innermost = shape.last().copied().unwrap_or(1);
        let Block { elements: n, .. } = self.block();
        if n > 1 && !self.is_safetensors() && !innermost.is_multiple_of(n) {
            return None;
        }
        self.bytes_for(elements)
    }

    /// Whether it is a ggml block type (elements stored in blocks with shared scales).
    pub fn is_quantized(self) -> bool {
        !self.is_safetensors()
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Dtype {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// A dtype name that lowtide does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype `{0}`")]
pub struct UnknownDtype(pub String);

#[cfg(test)]
mod tests {
    use super::{Block, Dtype};

    #[test]
    fn names_round_trip() {
        for &dtype in Dtype::ALL {
            assert_eq!(dtype.name().parse::<Dtype>().unwrap(), dtype);
        }
        assert!("F17".parse::<Dtype>().is_err());
    }

    #[test]
    fn sub_byte_sizes() {
        assert_eq!(Dtype::F4.bytes_for(4), Some(2));
        assert_eq!(Dtype::F4.bytes_for(3), None);
        assert_eq!(Dtype::F6_E2M3.bytes_for(4), Some(3));
        assert_eq!(Dtype::F6_E2M3.bytes_for(2), None);
        assert_eq!(Dtype::BF16.bytes_for(u64::MAX), None);
        // The block form agrees with bits x elements for every safetensors dtype.
        for &dtype in Dtype::SAFETENSORS {
            for n in 0..64u64 {
                let bits = n * dtype.bits();
                let want = (bits % 8 == 0).then_some(bits / 8);
                assert_eq!(dtype.bytes_for(n), want, "{dtype} x {n}");
            }
        }
    }

    #[test]
    fn ggml_ids_and_blocks() {
        assert_eq!(Dtype::from_ggml_id(0), Some(Dtype::F32));
        assert_eq!(Dtype::from_ggml_id(30), Some(Dtype::BF16));
        assert_eq!(Dtype::from_ggml_id(12), Some(Dtype::Q4_K));
        assert_eq!(Dtype::from_ggml_id(4), None);
        assert_eq!(Dtype::from_ggml_id(u32::MAX), None);
        assert_eq!(Dtype::U8.ggml_id(), None);
        for &dtype in Dtype::ALL {
            if let Some(id) = dtype.ggml_id() {
                assert_eq!(Dtype::from_ggml_id(id), Some(dtype));
            }
            assert_eq!(
                dtype.is_quantized(),
                dtype.block().elements > 1 && dtype.ggml_id().is_some()
            );
            if dtype.is_quantized() {
                assert_ne!(dtype.bits() % 8, 0, "{dtype}");
            }
        }
        assert_eq!(
            Dtype::Q4_0.block(),
            Block {
                elements: 32,
                bytes: 18
            }
        );
        assert_eq!(Dtype::Q4_0.bytes_for(64), Some(36));
        assert_eq!(Dtype::Q4_0.bytes_for(33), None);
        assert_eq!(Dtype::Q4_0.bytes_for_shape(&[2, 32]), Some(36));
        assert_eq!(Dtype::Q4_0.bytes_for_shape(&[32, 2]), None);
        assert_eq!(Dtype::Q6_K.bytes_for_shape(&[1 << 62, 256]), None);
        assert_eq!(Dtype::F32.bytes_for_shape(&[]), Some(4));
        assert_eq!(Dtype::F32.bytes_for_shape(&[u64::MAX, 2, 0]), Some(0));
    }
}

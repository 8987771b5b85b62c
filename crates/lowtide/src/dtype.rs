//! Element types of safetensors tensors.

use std::fmt;
use std::str::FromStr;

macro_rules! dtypes {
    ($($variant:ident = $name:literal, $bits:literal, $doc:literal;)*) => {
        /// The element type of a tensor, as named in safetensors headers.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        #[allow(non_camel_case_types)]
        pub enum Dtype {
            $(#[doc = $doc] $variant,)*
        }

        impl Dtype {
            /// Every dtype lowtide knows.
            pub const ALL: &'static [Dtype] = &[$(Dtype::$variant,)*];

            /// The name used in safetensors headers, such as `"BF16"`.
            pub fn name(self) -> &'static str {
                match self { $(Dtype::$variant => $name,)* }
            }

            /// Size of one element in bits (sub-byte types such as `F4` exist).
            pub fn bits(self) -> u64 {
                match self { $(Dtype::$variant => $bits,)* }
            }
        }

        impl FromStr for Dtype {
            type Err = UnknownDtype;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(Dtype::$variant),)*
                    _ => Err(UnknownDtype(s.to_owned())),
                }
            }
        }
    };
}

dtypes! {
    BOOL = "BOOL", 8, "Boolean, one byte.";
    F4 = "F4", 4, "4-bit float (MXFP4).";
    F6_E2M3 = "F6_E2M3", 6, "6-bit float, E2M3.";
    F6_E3M2 = "F6_E3M2", 6, "6-bit float, E3M2.";
    U8 = "U8", 8, "Unsigned byte.";
    I8 = "I8", 8, "Signed byte.";
    F8_E5M2 = "F8_E5M2", 8, "8-bit float, E5M2.";
    F8_E4M3 = "F8_E4M3", 8, "8-bit float, E4M3.";
    F8_E8M0 = "F8_E8M0", 8, "8-bit exponent-only scale.";
    I16 = "I16", 16, "Signed 16-bit integer.";
    U16 = "U16", 16, "Unsigned 16-bit integer.";
    F16 = "F16", 16, "IEEE half precision.";
    BF16 = "BF16", 16, "bfloat16.";
    I32 = "I32", 32, "Signed 32-bit integer.";
    U32 = "U32", 32, "Unsigned 32-bit integer.";
    F32 = "F32", 32, "IEEE single precision.";
    C64 = "C64", 64, "Complex with two 32-bit float parts.";
    F64 = "F64", 64, "IEEE double precision.";
    I64 = "I64", 64, "Signed 64-bit integer.";
    U64 = "U64", 64, "Unsigned 64-bit integer.";
}

impl Dtype {
    /// Bytes needed by `elements` elements, or `None` on overflow or a partial byte.
    pub fn bytes_for(self, elements: u64) -> Option<u64> {
        let bits = elements.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
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

/// A dtype name that safetensors does not define.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype `{0}`")]
pub struct UnknownDtype(pub String);

#[cfg(test)]
mod tests {
    use super::Dtype;

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
        assert_eq!(Dtype::BF16.bytes_for(u64::MAX), None);
    }
}

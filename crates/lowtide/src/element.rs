//! Plain numeric element types a tensor's bytes can be viewed as without a copy.

use crate::dtype::Dtype;

mod sealed {
    pub trait Sealed {}
}

/// A numeric type whose values are any bit pattern of its size (no padding, no invalid
/// values): `u8`..`u64`, `i8`..`i64`, `f32`, `f64`, and `half`'s `f16` and `bf16`. Sealed:
/// only these implement it, which is what makes [`TensorGuard::as_slice`] sound.
///
/// [`TensorGuard::as_slice`]: crate::TensorGuard::as_slice
pub trait Element: sealed::Sealed + Copy + Send + Sync + 'static {
    /// The safetensors dtype with this element type.
    const DTYPE: Dtype;
}

macro_rules! elements {
    ($($t:ty => $dtype:ident),* $(,)?) => {
        $(
            impl sealed::Sealed for $t {}
            impl Element for $t {
                const DTYPE: Dtype = Dtype::$dtype;
            }
        )*
    };
}

elements! {
    u8 => U8,
    i8 => I8,
    u16 => U16,
    i16 => I16,
    u32 => U32,
    i32 => I32,
    u64 => U64,
    i64 => I64,
    f32 => F32,
    f64 => F64,
    half::f16 => F16,
    half::bf16 => BF16,
}

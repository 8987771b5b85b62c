//! Viewing bytes as a slice of plain numeric elements.

use crate::element::Element;

/// `bytes` as `&[T]`, or `None` when the address is not aligned for `T` or the length is not
/// a whole number of elements.
pub(crate) fn cast_slice<T: Element>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        || !bytes.len().is_multiple_of(size)
    {
        return None;
    }
    // SAFETY: `Element` is sealed and implemented only for primitive numeric types (and
    // `half`'s `f16`/`bf16`, `repr(transparent)` over `u16`) that have no padding and for
    // which every bit pattern is a valid value; the pointer is aligned for `T` (checked
    // above) and `bytes.len() / size` elements cover exactly the borrowed bytes, which stay
    // borrowed (immutably) for the returned slice's lifetime.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}

/// One element read from the first `size_of::<T>()` bytes of `bytes`, whatever their
/// alignment.
pub(crate) fn read_unaligned<T: Element>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= std::mem::size_of::<T>(), "a whole element");
    // SAFETY: `bytes` holds at least `size_of::<T>()` initialized bytes (asserted), and every
    // bit pattern is a valid `T` (`Element` is sealed to such types); `read_unaligned` has no
    // alignment requirement.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::cast_slice;

    #[test]
    fn aligned_whole_elements_only() {
        let words = [1u32, 2, 3, 4];
        // SAFETY: reading initialized u32s as bytes is always valid.
        let raw = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), 16) };
        assert_eq!(cast_slice::<u32>(&raw[..0]), Some(&[][..]));
        assert_eq!(cast_slice::<u32>(raw), Some(&words[..]));
        assert_eq!(cast_slice::<u32>(&raw[1..5]), None, "misaligned");
        assert_eq!(cast_slice::<u32>(&raw[..6]), None, "partial element");
        assert_eq!(cast_slice::<u16>(&raw[2..6]).map(<[u16]>::len), Some(2));
    }
}

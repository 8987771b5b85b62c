//! The bytes of synthetic tensors: one pseudo-random stream per tensor name and seed (an FNV-1a
//! hash of the name, then splitmix64), given to a file either as raw bytes or as weights.

use lowtide::Dtype;

use crate::TensorSpec;

/// The pseudo-random words of the tensor `name` under `seed`.
struct Stream(u64);

impl Stream {
    fn new(name: &str, seed: u32) -> Self {
        Self(
            name.bytes()
                .fold(0xcbf2_9ce4_8422_2325_u64 ^ u64::from(seed), |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                }),
        )
    }

    fn next_word(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Fills `buf` with the pseudo-random bytes of the tensor `name`, whatever its dtype: what the
/// tests write and compare against ([`expected`]).
pub fn pattern(name: &str, buf: &mut [u8]) {
    let mut stream = Stream::new(name, 0);
    for chunk in buf.chunks_mut(8) {
        chunk.copy_from_slice(&stream.next_word().to_le_bytes()[..chunk.len()]);
    }
}

/// The bytes [`pattern`] gives a tensor `name` of `len` bytes.
pub fn expected(name: &str, len: u64) -> Vec<u8> {
    let mut buf = vec![0; usize::try_from(len).expect("a test tensor fits in memory")];
    pattern(name, &mut buf);
    buf
}

/// Fills `buf` with the weights of the synthetic tensor `spec` under `seed`: values in
/// (-0.05, 0.05) for BF16 and F16 (trailing bytes short of a group of four values are zero), a
/// ramp of little-endian `u64` for other dtypes.
pub fn fill(spec: &TensorSpec, seed: u32, buf: &mut [u8]) {
    let mut stream = Stream::new(&spec.name, seed);
    match spec.dtype {
        Dtype::BF16 | Dtype::F16 => {
            for group in buf.chunks_exact_mut(8) {
                let r = stream.next_word();
                for (k, out) in group.chunks_exact_mut(2).enumerate() {
                    // A value in (-0.05, 0.05): 16 random bits into the mantissa range.
                    let unit = ((r >> (16 * k)) & 0xffff) as f32 / 65536.0 - 0.5;
                    let value = unit * 0.1;
                    let bits = if spec.dtype == Dtype::BF16 {
                        half::bf16::from_f32(value).to_bits()
                    } else {
                        half::f16::from_f32(value).to_bits()
                    };
                    out.copy_from_slice(&bits.to_le_bytes());
                }
            }
            let tail = buf.len() / 8 * 8;
            buf[tail..].fill(0);
        }
        _ => {
            for (i, chunk) in buf.chunks_mut(8).enumerate() {
                let value = (i as u64).to_le_bytes();
                chunk.copy_from_slice(&value[..chunk.len()]);
            }
        }
    }
}

//! Test helpers: temp dirs and synthetic safetensors files with realistic shapes.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lowtide::{Dtype, TensorSpec, write_safetensors};

/// Deterministic pseudo-random bytes for tensor `name` (splitmix64 over a name hash).
pub fn fill(name: &str, buf: &mut [u8]) {
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    for chunk in buf.chunks_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// The bytes `fill` gives a tensor of `len` bytes.
pub fn expected(name: &str, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    fill(name, &mut buf);
    buf
}

/// A small UNet-like set of tensors (about 3 MB): several dtypes, odd sizes so that tensors
/// share boundary pages, a scalar and an empty tensor.
pub fn unet_specs(prefix: &str) -> Vec<TensorSpec> {
    let n = |s: &str| format!("{prefix}{s}");
    vec![
        TensorSpec::new(n("conv_in.weight"), Dtype::F16, &[320, 4, 3, 3]),
        TensorSpec::new(n("conv_in.bias"), Dtype::F16, &[320]),
        TensorSpec::new(
            n("time_embedding.linear_1.weight"),
            Dtype::F32,
            &[1280, 320],
        ),
        TensorSpec::new(n("time_embedding.linear_1.bias"), Dtype::F32, &[1280]),
        TensorSpec::new(
            n("down_blocks.0.attentions.0.to_q.weight"),
            Dtype::BF16,
            &[320, 320],
        ),
        TensorSpec::new(
            n("down_blocks.0.attentions.0.to_k.weight"),
            Dtype::BF16,
            &[320, 768],
        ),
        TensorSpec::new(
            n("down_blocks.0.attentions.0.norm.weight"),
            Dtype::F32,
            &[320],
        ),
        TensorSpec::new(
            n("mid_block.resnets.0.conv1.weight"),
            Dtype::F16,
            &[640, 64, 3, 3],
        ),
        TensorSpec::new(n("mid_block.quant.weight"), Dtype::F8_E4M3, &[640, 641]),
        TensorSpec::new(n("position_ids"), Dtype::I64, &[1, 77]),
        TensorSpec::new(n("logit_scale"), Dtype::F32, &[]),
        TensorSpec::new(n("empty"), Dtype::F32, &[0, 16]),
        TensorSpec::new(n("mask"), Dtype::BOOL, &[77]),
        TensorSpec::new(n("conv_out.weight"), Dtype::F16, &[4, 320, 3, 3]),
    ]
}

/// Writes `specs` to `path` filled by [`fill`].
pub fn write(path: &Path, specs: &[TensorSpec]) -> PathBuf {
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_owned(), "pt".to_owned());
    write_safetensors(path, specs, &metadata, |i, buf| fill(&specs[i].name, buf)).unwrap();
    path.to_path_buf()
}

/// A temp dir and a single-file UNet-like model in it.
pub fn unet(dir: &tempfile::TempDir) -> PathBuf {
    write(&dir.path().join("unet.safetensors"), &unet_specs(""))
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A view of the tensor's mapped file pages (`Store::acquire_mapped`).
pub fn mapped(
    store: &lowtide::Store,
    id: lowtide::TensorId,
) -> Result<lowtide::TensorGuard, lowtide::StoreError> {
    // SAFETY: the tests write their model files themselves and change one only while no
    // mapped guard over it lives (the reliability tests change it between guards, and check
    // that the next acquire refuses it).
    unsafe { store.acquire_mapped(id) }
}

//! Synthetic models with realistic tensor shapes: an SDXL-like text encoder, UNet and VAE, and
//! LoRAs that patch the UNet's attention weights. Weights are deterministic small values, so
//! every run (and every strategy) sees the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use lowtide::{ByteSize, Dtype, TensorSpec, create_safetensors};

/// Bump when shapes or values change: cached files carry it in their names.
const VERSION: u32 = 2;

/// The kinds of synthetic model a workflow can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// A CLIP-like text encoder (F16).
    TextEncoder,
    /// A UNet with resnets and transformer blocks (BF16).
    Unet,
    /// A VAE decoder of 3x3 convolutions (F16).
    Vae,
    /// A rank-16 LoRA over the UNet's attention projections (BF16).
    Lora,
}

/// Repeats a block `n` times scaled, at least once.
#[allow(clippy::cast_sign_loss)] // scales are positive
fn scaled(n: u32, scale: f64) -> u32 {
    ((f64::from(n) * scale).round() as u32).max(1)
}

/// A hidden width: exact at scale 1 and above (realistic shapes), narrower below so that tiny
/// test models stay tiny (by the square root of the scale, a multiple of 8).
#[allow(clippy::cast_sign_loss)] // scales are positive
fn w(width: u64, scale: f64) -> u64 {
    if scale >= 1.0 {
        return width;
    }
    (((width as f64 * scale.sqrt()) / 8.0).round() as u64 * 8).max(8)
}

fn t(name: String, dtype: Dtype, shape: &[u64]) -> TensorSpec {
    TensorSpec::new(name, dtype, shape)
}

fn text_encoder(scale: f64) -> Vec<TensorSpec> {
    let (hidden, mlp, vocab) = (w(1024, scale), w(4096, scale), w(49408, scale));
    let d = Dtype::F16;
    let mut specs = vec![
        t(
            "embeddings.token_embedding.weight".into(),
            d,
            &[vocab, hidden],
        ),
        t(
            "embeddings.position_embedding.weight".into(),
            d,
            &[77, hidden],
        ),
        t("embeddings.position_ids".into(), Dtype::I64, &[1, 77]),
    ];
    for layer in 0..scaled(24, scale) {
        let p = format!("encoder.layers.{layer}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            specs.push(t(
                format!("{p}.self_attn.{proj}.weight"),
                d,
                &[hidden, hidden],
            ));
            specs.push(t(format!("{p}.self_attn.{proj}.bias"), d, &[hidden]));
        }
        specs.push(t(format!("{p}.mlp.fc1.weight"), d, &[mlp, hidden]));
        specs.push(t(format!("{p}.mlp.fc1.bias"), d, &[mlp]));
        specs.push(t(format!("{p}.mlp.fc2.weight"), d, &[hidden, mlp]));
        specs.push(t(format!("{p}.mlp.fc2.bias"), d, &[hidden]));
        for norm in ["layer_norm1", "layer_norm2"] {
            specs.push(t(format!("{p}.{norm}.weight"), d, &[hidden]));
            specs.push(t(format!("{p}.{norm}.bias"), d, &[hidden]));
        }
    }
    specs.push(t("final_layer_norm.weight".into(), d, &[hidden]));
    specs
}

/// (level, channels, transformer depth) as in SDXL: no attention at 320, 2 at 640, 10 at 1280.
fn unet_levels(scale: f64) -> Vec<(u32, u64, u32)> {
    vec![
        (0, w(320, scale), 0),
        (1, w(640, scale), scaled(2, scale)),
        (2, w(1280, scale), scaled(10, scale)),
    ]
}

/// The transformer blocks of the UNet, (name prefix, channels): one attention per down level,
/// the middle block, two attentions per up level (SDXL has 2 and 3: this keeps the default
/// set near 4 GB).
fn transformer_blocks(scale: f64) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let levels = unet_levels(scale);
    let mut push = |prefix: String, ch: u64, depth: u32| {
        for block in 0..depth {
            out.push((format!("{prefix}.transformer_blocks.{block}"), ch));
        }
    };
    for &(level, ch, depth) in &levels {
        push(format!("down_blocks.{level}.attentions.0"), ch, depth);
    }
    let (_, mid_ch, mid_depth) = levels[2];
    push("mid_block.attentions.0".to_owned(), mid_ch, mid_depth);
    for (up, &(_, ch, depth)) in levels.iter().rev().enumerate() {
        for attention in 0..2 {
            push(format!("up_blocks.{up}.attentions.{attention}"), ch, depth);
        }
    }
    out
}

/// The attention projections a LoRA patches: (name, out, in).
fn unet_attention(scale: f64) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for (p, ch) in transformer_blocks(scale) {
        for proj in [
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out.0",
            "attn2.to_q",
            "attn2.to_out.0",
        ] {
            out.push((format!("{p}.{proj}.weight"), ch, ch));
        }
        for proj in ["attn2.to_k", "attn2.to_v"] {
            out.push((format!("{p}.{proj}.weight"), ch, 2048));
        }
    }
    out
}

fn unet(scale: f64) -> Vec<TensorSpec> {
    let d = Dtype::BF16;
    let (c0, temb) = (w(320, scale), w(1280, scale));
    let mut specs = vec![
        t("conv_in.weight".into(), d, &[c0, 4, 3, 3]),
        t("conv_in.bias".into(), d, &[c0]),
        t("time_embedding.linear_1.weight".into(), d, &[temb, c0]),
        t("time_embedding.linear_2.weight".into(), d, &[temb, temb]),
    ];
    let levels = unet_levels(scale);
    let resnets = levels
        .iter()
        .map(|&(level, ch, _)| (format!("down_blocks.{level}"), ch, 2))
        .chain(
            levels
                .iter()
                .rev()
                .enumerate()
                .map(|(up, &(_, ch, _))| (format!("up_blocks.{up}"), ch, 3)),
        );
    for (block, ch, count) in resnets {
        for resnet in 0..count {
            let p = format!("{block}.resnets.{resnet}");
            specs.push(t(format!("{p}.conv1.weight"), d, &[ch, ch, 3, 3]));
            specs.push(t(format!("{p}.conv2.weight"), d, &[ch, ch, 3, 3]));
            specs.push(t(format!("{p}.time_emb_proj.weight"), d, &[ch, temb]));
            specs.push(t(format!("{p}.norm1.weight"), d, &[ch]));
            specs.push(t(format!("{p}.norm2.weight"), d, &[ch]));
        }
    }
    for (p, ch) in transformer_blocks(scale) {
        specs.push(t(format!("{p}.ff.net.0.proj.weight"), d, &[ch * 8, ch]));
        specs.push(t(format!("{p}.ff.net.2.weight"), d, &[ch, ch * 4]));
        for norm in ["norm1", "norm2", "norm3"] {
            specs.push(t(format!("{p}.{norm}.weight"), d, &[ch]));
        }
    }
    specs.extend(
        unet_attention(scale)
            .into_iter()
            .map(|(name, o, i)| t(name, d, &[o, i])),
    );
    specs.push(t("conv_out.weight".into(), d, &[4, c0, 3, 3]));
    specs
}

fn vae(scale: f64) -> Vec<TensorSpec> {
    let d = Dtype::F16;
    let ch = w(512, scale);
    let mut specs = vec![t("decoder.conv_in.weight".into(), d, &[ch, 4, 3, 3])];
    for block in 0..scaled(4, scale) {
        for resnet in 0..3 {
            let p = format!("decoder.up_blocks.{block}.resnets.{resnet}");
            specs.push(t(format!("{p}.conv1.weight"), d, &[ch, ch, 3, 3]));
            specs.push(t(format!("{p}.conv2.weight"), d, &[ch, ch, 3, 3]));
            specs.push(t(format!("{p}.norm1.weight"), d, &[ch]));
        }
    }
    specs.push(t(
        "decoder.conv_out.weight".into(),
        d,
        &[3, w(128, scale), 3, 3],
    ));
    specs
}

/// LoRA tensors for the UNet's attention projections: `<target>.lora_down.weight` [r, in] and
/// `<target>.lora_up.weight` [out, r]; every other projection, offset by `variant`, so two
/// LoRAs patch different tensors.
fn lora(scale: f64, variant: u32) -> Vec<TensorSpec> {
    const RANK: u64 = 16;
    let mut specs = Vec::new();
    for (i, (name, out, input)) in unet_attention(scale).into_iter().enumerate() {
        if (i as u32 + variant).is_multiple_of(2) {
            let target = name.trim_end_matches(".weight");
            specs.push(t(
                format!("{target}.lora_down.weight"),
                Dtype::BF16,
                &[RANK, input],
            ));
            specs.push(t(
                format!("{target}.lora_up.weight"),
                Dtype::BF16,
                &[out, RANK],
            ));
        }
    }
    specs
}

/// Bytes of the UNet weights a LoRA of this `seed` patches.
pub(crate) fn patched_bytes(scale: f64, seed: u32) -> u64 {
    unet_attention(scale)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| (*i as u32 + seed).is_multiple_of(2))
        .map(|(_, (_, out, input))| out * input * 2)
        .sum()
}

/// The tensor specs of a synthetic model.
pub(crate) fn specs(kind: Kind, scale: f64, seed: u32) -> Vec<TensorSpec> {
    match kind {
        Kind::TextEncoder => text_encoder(scale),
        Kind::Unet => unet(scale),
        Kind::Vae => vae(scale),
        Kind::Lora => lora(scale, seed),
    }
}

/// Total bytes of a synthetic model.
pub(crate) fn bytes(kind: Kind, scale: f64, seed: u32) -> u64 {
    specs(kind, scale, seed)
        .iter()
        .filter_map(TensorSpec::byte_len)
        .sum()
}

/// The cached file of a synthetic model, written if missing. `progress` is called with the
/// bytes written so far.
///
/// The file is named only once complete, so a run killed while generating leaves nothing in
/// `dir`; of several runs generating the same file at once, the first to finish names it and
/// the others use it.
pub(crate) fn ensure(
    dir: &Path,
    kind: Kind,
    scale: f64,
    seed: u32,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<PathBuf> {
    let kind_name = serde_json::to_value(kind)?
        .as_str()
        .unwrap_or("model")
        .to_owned();
    let path = dir.join(format!(
        "{kind_name}-x{scale}-s{seed}-v{VERSION}.safetensors"
    ));
    if path.exists() {
        return Ok(path);
    }
    // Files of earlier versions of the synthetic shapes are stale.
    for old in 1..VERSION {
        let _ = std::fs::remove_file(
            dir.join(format!("{kind_name}-x{scale}-s{seed}-v{old}.safetensors")),
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let specs = specs(kind, scale, seed);
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_owned(), "pt".to_owned());
    metadata.insert(
        "lowtide.synthetic".to_owned(),
        format!("{kind_name} scale {scale} seed {seed}"),
    );
    let total: u64 = specs.iter().filter_map(TensorSpec::byte_len).sum();
    check_space(dir, &path, total)?;
    let mut written = 0u64;
    create_safetensors(&path, &specs, &metadata, |i, buf| {
        fill(&specs[i], seed, buf);
        written += buf.len() as u64;
        progress(written);
    })
    .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Refuses to start a file of `bytes` that the file system of `dir` cannot hold.
fn check_space(dir: &Path, path: &Path, bytes: u64) -> anyhow::Result<()> {
    let Ok(stat) = rustix::fs::statvfs(dir) else {
        // Not knowing is no reason to refuse: a full disk is still an error when writing.
        return Ok(());
    };
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    // The header is small: a megabyte covers it.
    if bytes.saturating_add(1 << 20) > free {
        anyhow::bail!(
            "cannot write {}: the model needs {}, {} has {} free",
            path.display(),
            ByteSize(bytes),
            dir.display(),
            ByteSize(free)
        );
    }
    Ok(())
}

/// Deterministic values: small floats for float dtypes, a ramp for integers.
fn fill(spec: &TensorSpec, seed: u32, buf: &mut [u8]) {
    let mut state = spec
        .name
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64 ^ u64::from(seed), |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    match spec.dtype {
        Dtype::BF16 | Dtype::F16 => {
            for pair in buf.chunks_exact_mut(8) {
                let r = next();
                for (k, out) in pair.chunks_exact_mut(2).enumerate() {
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

#[cfg(test)]
mod tests {
    use super::{Kind, bytes, specs};

    #[test]
    fn default_sizes_are_realistic() {
        let gib = |b: u64| b as f64 / f64::from(1 << 30);
        let te = gib(bytes(Kind::TextEncoder, 1.0, 0));
        let unet = gib(bytes(Kind::Unet, 1.0, 0));
        let vae = gib(bytes(Kind::Vae, 1.0, 0));
        assert!((0.5..0.9).contains(&te), "text encoder {te:.2} GiB");
        assert!((2.4..3.2).contains(&unet), "unet {unet:.2} GiB");
        assert!((0.1..0.4).contains(&vae), "vae {vae:.2} GiB");
        // Tiny scales give tiny models for tests.
        let tiny: u64 = [Kind::TextEncoder, Kind::Unet, Kind::Vae]
            .iter()
            .map(|&k| bytes(k, 0.01, 0))
            .sum();
        assert!(tiny < 40 << 20, "{tiny} bytes at scale 0.01");
        // Two LoRAs patch disjoint tensors.
        let a: Vec<String> = specs(Kind::Lora, 1.0, 0)
            .into_iter()
            .map(|s| s.name)
            .collect();
        let b: Vec<String> = specs(Kind::Lora, 1.0, 1)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert!(a.iter().all(|n| !b.contains(n)));
    }
}

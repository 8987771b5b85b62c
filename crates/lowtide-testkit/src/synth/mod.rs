//! Synthetic models: the one generator of the workspace's model shapes.
//!
//! An SDXL-like model set with realistic tensor shapes at scale 1 (a text encoder, a UNet, a
//! VAE, and LoRAs that patch the UNet's attention weights), smaller at smaller scales, for the
//! CLI's workflows, demo and benchmarks; and [`small_unet`], a UNet-like set of about 3 MB
//! with the cases those shapes lack (several dtypes, odd sizes, a scalar, an empty tensor),
//! for the library's tests.
//!
//! Bytes are deterministic: [`fill`] gives the model set small weight values (finite floats,
//! so patching and hashing agree between runs and strategies), [`pattern`] gives any tensor
//! pseudo-random bytes its name determines (what the tests compare against).

mod fill;

pub use fill::{expected, fill, pattern};
use lowtide::Dtype;

use crate::TensorSpec;

/// Bump when the model set's shapes or values change: cached files carry it in their names
/// ([`file_name`]).
pub const VERSION: u32 = 2;

/// The kinds of model in the synthetic set (`snake_case` in workflow files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
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

impl Kind {
    /// Its name in workflow files and file names: `text_encoder`, `unet`, `vae`, `lora`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::TextEncoder => "text_encoder",
            Kind::Unet => "unet",
            Kind::Vae => "vae",
            Kind::Lora => "lora",
        }
    }
}

/// Bytes of the UNet weights a LoRA of this `seed` patches.
pub fn patched_bytes(scale: f64, seed: u32) -> u64 {
    unet_attention(scale)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| (*i as u32 + seed).is_multiple_of(2))
        .map(|(_, (_, out, input))| out * input * 2)
        .sum()
}

/// The tensor specs of a synthetic model. `scale` 1.0 gives realistic shapes; `seed` picks
/// which projections a LoRA patches and the values of [`fill`].
pub fn specs(kind: Kind, scale: f64, seed: u32) -> Vec<TensorSpec> {
    match kind {
        Kind::TextEncoder => text_encoder(scale),
        Kind::Unet => unet(scale),
        Kind::Vae => vae(scale),
        Kind::Lora => lora(scale, seed),
    }
}

/// Total bytes of a synthetic model.
pub fn bytes(kind: Kind, scale: f64, seed: u32) -> u64 {
    specs(kind, scale, seed)
        .iter()
        .filter_map(TensorSpec::byte_len)
        .sum()
}

/// The file name of a synthetic model: `<kind>-x<scale>-s<seed>-v<VERSION>.safetensors`.
pub fn file_name(kind: Kind, scale: f64, seed: u32) -> String {
    file_name_of_version(kind, scale, seed, VERSION)
}

/// [`file_name`] as an earlier `version` of the shapes named it (to find stale files).
pub fn file_name_of_version(kind: Kind, scale: f64, seed: u32, version: u32) -> String {
    format!("{}-x{scale}-s{seed}-v{version}.safetensors", kind.name())
}

/// A small UNet-like set of tensors (about 3 MB), names prefixed with `prefix`: several dtypes,
/// odd sizes so that tensors share boundary pages, a scalar and an empty tensor. The library's
/// tests pin its names and sizes (budgets are set between them).
pub fn small_unet(prefix: &str) -> Vec<TensorSpec> {
    let n = |s: &str| format!("{prefix}{s}");
    vec![
        t(n("conv_in.weight"), Dtype::F16, &[320, 4, 3, 3]),
        t(n("conv_in.bias"), Dtype::F16, &[320]),
        t(
            n("time_embedding.linear_1.weight"),
            Dtype::F32,
            &[1280, 320],
        ),
        t(n("time_embedding.linear_1.bias"), Dtype::F32, &[1280]),
        t(
            n("down_blocks.0.attentions.0.to_q.weight"),
            Dtype::BF16,
            &[320, 320],
        ),
        t(
            n("down_blocks.0.attentions.0.to_k.weight"),
            Dtype::BF16,
            &[320, 768],
        ),
        t(
            n("down_blocks.0.attentions.0.norm.weight"),
            Dtype::F32,
            &[320],
        ),
        t(
            n("mid_block.resnets.0.conv1.weight"),
            Dtype::F16,
            &[640, 64, 3, 3],
        ),
        t(n("mid_block.quant.weight"), Dtype::F8_E4M3, &[640, 641]),
        t(n("position_ids"), Dtype::I64, &[1, 77]),
        t(n("logit_scale"), Dtype::F32, &[]),
        t(n("empty"), Dtype::F32, &[0, 16]),
        t(n("mask"), Dtype::BOOL, &[77]),
        t(n("conv_out.weight"), Dtype::F16, &[4, 320, 3, 3]),
    ]
}

#[cfg(test)]
mod tests {
    use super::{Kind, bytes, fill, small_unet, specs};

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

    /// The generator's bytes are pinned: the CLI's output digests (the README's among them)
    /// are of these bytes. A change here is a new [`super::VERSION`] and new documented digests.
    #[test]
    fn the_model_set_is_byte_for_byte_what_it_was() {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for scale in [1.0, 0.1, 0.01] {
            for kind in [Kind::TextEncoder, Kind::Unet, Kind::Vae, Kind::Lora] {
                for seed in [0, 1, 7] {
                    for spec in specs(kind, scale, seed) {
                        h.update(spec.name.as_bytes());
                        h.update(spec.dtype.name().as_bytes());
                        for d in &spec.shape {
                            h.update(&d.to_le_bytes());
                        }
                        let len = spec.byte_len().unwrap().min(4099) as usize;
                        let mut buf = vec![0; len];
                        fill(&spec, seed, &mut buf);
                        h.update(&buf);
                    }
                }
            }
        }
        assert_eq!(format!("{:016x}", h.digest()), "d9cea22510122424");
    }

    /// The tests' pattern is pinned too: it is what they compare tensors against.
    #[test]
    fn the_pattern_is_what_it_was() {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for (name, len) in [
            ("conv_in.weight", 23040),
            ("x", 3),
            ("", 17),
            ("mid_block.quant.weight", 410_240),
        ] {
            h.update(&super::expected(name, len));
        }
        assert_eq!(format!("{:016x}", h.digest()), "7b749c00acadf0b6");
        assert_eq!(small_unet("").len(), 14);
    }
}

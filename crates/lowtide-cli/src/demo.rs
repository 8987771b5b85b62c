//! `lowtide demo`: a ComfyUI-like session (text encoder, UNet with two LoRAs, VAE) under a
//! memory cap that the classic strategy cannot meet, run with all three strategies.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use lowtide::ByteSize;

use lowtide_testkit::synth::{self, Kind};

/// Arguments of `lowtide demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Size of the synthetic models (1.0: SDXL-like shapes, about 4 GiB in all).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// The memory cap (default: the UNet, its patched weights and half the text encoder and
    /// VAE, which the classic strategy cannot meet).
    #[arg(long)]
    cap: Option<ByteSize>,
    /// Generations to run (each switches LoRA).
    #[arg(long, default_value_t = 3)]
    generations: u32,
    /// Where the models and the workflow are kept (default: ~/.cache/lowtide/demo).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("lowtide").join("demo")
}

/// The demo's device capacity, default cap and reserve at `scale`, in MiB.
///
/// A device that holds the largest model. A cap that holds it, its patched weights twice (the
/// classic path keeps a backup of each in RAM) and half the other models: enough for a
/// strategy that offloads, not for one that keeps everything in RAM. A reserve of half
/// the smaller models; lowtide's RAM budget is what the cap leaves after the device, the
/// reserve and its overhead (`lowtide run` works it out and refuses a cap too small).
fn sizes(scale: f64) -> (u64, u64, u64) {
    let (te, unet, vae) = (
        synth::bytes(Kind::TextEncoder, scale, 0),
        synth::bytes(Kind::Unet, scale, 0),
        synth::bytes(Kind::Vae, scale, 0),
    );
    let patched = synth::patched_bytes(scale, 0).max(synth::patched_bytes(scale, 1));
    let mib = |bytes: u64| bytes.div_ceil(1 << 20);
    (
        mib(unet + unet / 20),
        mib(unet + patched + u64::midpoint(te, vae)),
        mib(u64::midpoint(te, vae)).max(1),
    )
}

/// The demo's workflow file text.
pub(crate) fn workflow_text(scale: f64, cap: Option<u64>, generations: u32) -> String {
    let (capacity, default_cap, reserve) = sizes(scale);
    let cap = cap.map_or(default_cap, |bytes| bytes.div_ceil(1 << 20));
    let mut text = format!(
        "# lowtide demo: an SDXL-like session, {generations} generations switching LoRAs.\n\
         # The simulated device's memory lives in this process, so the cap covers it too (as on\n\
         # a unified-memory machine).\n\
         cache_dir = \".\"\n\n\
         [device]\ncapacity = \"{capacity}MiB\"\n\n\
         [limits]\ncap = \"{cap}MiB\"\nreserve_ram = \"{reserve}MiB\"\n\n\
         [models.text_encoder]\nsynthetic = \"text_encoder\"\nscale = {scale:?}\n\n\
         [models.unet]\nsynthetic = \"unet\"\nscale = {scale:?}\n\n\
         [models.vae]\nsynthetic = \"vae\"\nscale = {scale:?}\n\n\
         [models.style_a]\nsynthetic = \"lora\"\nscale = {scale:?}\nseed = 0\n\n\
         [models.style_b]\nsynthetic = \"lora\"\nscale = {scale:?}\nseed = 1\n"
    );
    let step = |text: &mut String, op: &str, model: &str, extra: &str| {
        let _ = write!(
            text,
            "\n[[steps]]\nop = \"{op}\"\nmodel = \"{model}\"\n{extra}"
        );
    };
    for generation in 0..generations {
        let _ = write!(text, "\n# generation {}\n", generation + 1);
        step(&mut text, "load", "text_encoder", "");
        step(&mut text, "compute", "text_encoder", "");
        step(&mut text, "unload", "text_encoder", "");
        if generation > 0 {
            step(&mut text, "unpatch", "unet", "");
        }
        step(&mut text, "load", "unet", "");
        let lora = if generation % 2 == 0 {
            "style_a"
        } else {
            "style_b"
        };
        step(
            &mut text,
            "patch",
            "unet",
            &format!("lora = \"{lora}\"\nstrength = 0.8\n"),
        );
        step(&mut text, "compute", "unet", "");
        step(&mut text, "compute", "unet", "");
        step(&mut text, "unload", "unet", "");
        step(&mut text, "load", "vae", "");
        step(&mut text, "compute", "vae", "");
        step(&mut text, "unload", "vae", "");
    }
    text
}

/// More generations than anyone waits for; the workflow text grows with them.
const MAX_GENERATIONS: u32 = 1000;

/// Refuses arguments no run can satisfy, naming them.
fn check(args: &Args) -> anyhow::Result<()> {
    if !(args.scale > 0.0 && args.scale <= 4.0) {
        anyhow::bail!("--scale must be in (0, 4], got {}", args.scale);
    }
    if !(1..=MAX_GENERATIONS).contains(&args.generations) {
        anyhow::bail!(
            "--generations must be in 1..={MAX_GENERATIONS}, got {}",
            args.generations
        );
    }
    // A cap too small for the device, the reserve and lowtide's overhead is refused with
    // the sum it needs once the models are known (docs/workflows.md).
    if let Some(cap) = args.cap {
        if cap.bytes() == 0 {
            anyhow::bail!("--cap must be more than 0");
        }
        // What is known before the models are generated: the device and the reserve.
        let (capacity, _, reserve) = sizes(args.scale);
        let known = (capacity + reserve) << 20;
        if cap.bytes() <= known {
            anyhow::bail!(
                "--cap {cap} cannot hold the demo's simulated device ({} MiB) and reserve \
                 ({} MiB) at --scale {}, let alone lowtide's RAM budget and overhead",
                capacity,
                reserve,
                args.scale
            );
        }
    }
    Ok(())
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    check(args)?;
    let dir = args.dir.clone().unwrap_or_else(default_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("workflow-x{}.toml", args.scale));
    let text = workflow_text(args.scale, args.cap.map(ByteSize::bytes), args.generations);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    if !args.json {
        eprintln!("workflow: {}", path.display());
    }
    crate::run::run(&crate::run::Args::compare(path, args.json))
}

//! `lowtide demo`: a ComfyUI-like session (text encoder, UNet with two LoRAs, VAE) under a
//! memory cap that the classic strategy cannot meet, run with all three strategies.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use lowtide::ByteSize;

use lowtide_testkit::synth::{self, Kind};

use crate::workflow::catalog::ModelMeta;
use crate::workflow::{Workflow, fit, runner};

/// Arguments of `lowtide demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Size of the synthetic models (1.0: SDXL-like shapes, about 4 GiB in all).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// The memory cap (default: the UNet, its patched weights, half the text encoder and VAE
    /// and lowtide's overhead, which the classic strategy cannot meet).
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

/// The demo's device capacity, the models' share of the default cap, and the reserve at
/// `scale`, in MiB.
///
/// A device that holds the largest model. A cap that holds it, its patched weights and half
/// the other models (enough for a strategy that offloads, not for one that keeps everything in
/// RAM), plus lowtide's overhead, which depends on the models' largest tensor and LoRA pairs
/// and is added once they are known ([`default_cap`]). A reserve of half the smaller models;
/// lowtide's RAM budget is what the cap leaves after the device, the reserve and the overhead
/// (`lowtide run` works it out and refuses a cap too small).
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

/// The demo's default cap in bytes, for its `workflow` (without a cap) over its `models`: the
/// models' share ([`sizes`]), or at scales so small that the share leaves lowtide less than
/// the least RAM budget it runs with, the device, the reserve and that least; plus the
/// overhead `lowtide run` counts for lowtide's own buffers ([`fit::overhead`]). So the budget
/// `lowtide run` leaves is never under what it requires, at any scale.
fn default_cap(scale: f64, workflow: &Workflow, models: &[ModelMeta]) -> u64 {
    let (capacity, share, reserve) = sizes(scale);
    let least = ((capacity + reserve) << 20) + fit::least_budget(workflow, models);
    (share << 20).max(least) + fit::overhead(workflow, models)
}

/// The demo's workflow file text; without a `cap` (bytes, rounded up to MiB) it has none.
pub(crate) fn workflow_text(scale: f64, cap: Option<u64>, generations: u32) -> String {
    let (capacity, _, reserve) = sizes(scale);
    let cap = cap.map_or(String::new(), |bytes| {
        format!("cap = \"{}MiB\"\n", bytes.div_ceil(1 << 20))
    });
    let mut text = format!(
        "# lowtide demo: an SDXL-like session, {generations} generations switching LoRAs.\n\
         # The simulated device's memory lives in this process, so the cap covers it too (as on\n\
         # a unified-memory machine).\n\
         cache_dir = \".\"\n\n\
         [device]\ncapacity = \"{capacity}MiB\"\n\n\
         [limits]\n{cap}reserve_ram = \"{reserve}MiB\"\n\n\
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
    let write = |cap: Option<u64>| {
        let text = workflow_text(args.scale, cap, args.generations);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    let cap = if let Some(cap) = args.cap {
        cap.bytes()
    } else {
        // The models first (generated once): the default cap depends on them.
        write(None)?;
        let mut workflow = Workflow::load(&path)?;
        let models = runner::prepare(&mut workflow)?;
        default_cap(args.scale, &workflow, &models)
    };
    write(Some(cap))?;
    if !args.json {
        eprintln!("workflow: {}", path.display());
    }
    crate::run::run(&crate::run::Args::compare(path, args.json))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use lowtide::SourceTensor;
    use lowtide_testkit::TensorSpec;
    use lowtide_testkit::synth;

    use super::{default_cap, workflow_text};
    use crate::workflow::catalog::{self, ModelMeta};
    use crate::workflow::{ModelSource, Workflow, fit};

    /// The workflow's synthetic models as their headers would list them, without files.
    fn models(workflow: &Workflow) -> Vec<ModelMeta> {
        workflow
            .models
            .iter()
            .map(|def| {
                let ModelSource::Synthetic { kind, scale, seed } = def.source else {
                    panic!("the demo's models are synthetic");
                };
                let mut specs = synth::specs(kind, scale, seed);
                specs.sort_by(|a, b| a.name.cmp(&b.name));
                let mut offset = 0;
                let tensors: Vec<SourceTensor> = specs
                    .iter()
                    .map(|spec: &TensorSpec| {
                        let len = spec.byte_len().unwrap();
                        offset += len;
                        SourceTensor {
                            name: spec.name.clone(),
                            dtype: spec.dtype,
                            shape: spec.shape.clone(),
                            offset: offset - len,
                            len,
                        }
                    })
                    .collect();
                let files = vec![PathBuf::from("synthetic"); tensors.len()];
                catalog::meta(&def.name, PathBuf::from("synthetic"), tensors, files).unwrap()
            })
            .collect()
    }

    #[test]
    fn the_default_cap_fits_what_lowtide_run_requires_at_every_scale() {
        let path = Path::new("demo/workflow.toml");
        // The ends of the accepted range (0, 4], the scales the issue named, and between.
        for scale in [
            1e-6, 0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0,
            3.0, 4.0,
        ] {
            let open = Workflow::parse(path, &workflow_text(scale, None, 3)).unwrap();
            let models = models(&open);
            let cap = default_cap(scale, &open, &models);
            let capped = Workflow::parse(path, &workflow_text(scale, Some(cap), 3)).unwrap();
            let fit = fit::check_cap(&capped, &models)
                .unwrap_or_else(|err| panic!("--scale {scale}: {err:#}"))
                .expect("a cap");
            assert!(fit.total() <= capped.limits.cap.unwrap(), "--scale {scale}");
            assert!(
                fit.ram_budget >= fit::least_budget(&capped, &models),
                "--scale {scale}"
            );
        }
    }
}

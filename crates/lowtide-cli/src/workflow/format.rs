//! Workflow files (TOML): models, a device, limits and the steps of a ComfyUI-like session.
//!
//! ```toml
//! cache_dir = "cache"                 # where synthetic models are generated (default: next
//!                                     # to the workflow, `.lowtide-cache`)
//! [device]
//! kind = "sim"                        # "sim" (default) or "cuda" (built with --features cuda)
//! capacity = "3GiB"                   # simulated device memory
//! bandwidth = "16GB"                  # optional: simulated transfer rate per second
//!
//! [limits]
//! ram_budget = "512MiB"               # lowtide's RAM budget (default: half of what is available)
//! reserve_ram = "512MiB"              # keep this much available (also the spill-all trigger)
//! spill_dir = "/tmp"                  # default: the system temp directory
//! cap = "3GiB"                        # the memory cap `--compare` enforces
//!
//! [models.unet]
//! synthetic = "unet"                  # text_encoder | unet | vae | lora, or: path = "x.safetensors"
//! scale = 1.0
//!
//! [[steps]]
//! op = "load"                         # load | compute | patch | unpatch | unload | prefetch
//! model = "unet"
//! budget = "2GiB"                     # load: device budget (the rest stays on the host)
//! ```
//!
//! `patch` takes `lora = "<model>"` and `strength = 0.8`; `unload` takes `bytes = "1GiB"` (all
//! when absent). Errors name the file, the line and the field.
//!
//! A workflow file must be a regular file of at most [`MAX_WORKFLOW_LEN`] bytes (a FIFO or
//! `/dev/zero` is refused, not read), and sizes and rates that cannot work are refused: a
//! device capacity, bandwidth, RAM budget, spill limit or memory cap of 0, a strength that is
//! not a finite number.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lowtide::ByteSize;
use serde::Deserialize;
use toml::Spanned;

use lowtide_testkit::synth::Kind;

/// A size written as a string (`"2GiB"`) or an integer number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size(pub(crate) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"512MiB\" or a number of bytes")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                s.parse::<ByteSize>()
                    .map(|b| Size(b.bytes()))
                    .map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Largest workflow file read.
pub(crate) const MAX_WORKFLOW_LEN: u64 = 1 << 20;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeviceFile {
    kind: Option<Spanned<String>>,
    capacity: Option<Spanned<Size>>,
    bandwidth: Option<Spanned<Size>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    ram_budget: Option<Spanned<Size>>,
    reserve_ram: Option<Size>,
    spill_dir: Option<String>,
    spill_max: Option<Spanned<Size>>,
    cap: Option<Spanned<Size>>,
}

/// The value of an optional size, refused with its line when it is 0: `what` says what 0
/// would mean, such as "a device that holds nothing".
fn nonzero(
    size: Option<&Spanned<Size>>,
    field: &str,
    what: &str,
    at: &dyn Fn(usize) -> String,
) -> anyhow::Result<Option<u64>> {
    match size {
        Some(s) if s.get_ref().0 == 0 => bail!(
            "{}: {field} must be more than 0 ({what}; leave it out for the default)",
            at(s.span().start)
        ),
        Some(s) => Ok(Some(s.get_ref().0)),
        None => Ok(None),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    path: Option<String>,
    synthetic: Option<Kind>,
    scale: Option<f64>,
    seed: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    op: Spanned<String>,
    model: Spanned<String>,
    lora: Option<Spanned<String>>,
    strength: Option<Spanned<f64>>,
    budget: Option<Size>,
    bytes: Option<Size>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowFile {
    cache_dir: Option<String>,
    #[serde(default)]
    device: DeviceFile,
    #[serde(default)]
    limits: LimitsFile,
    models: Spanned<BTreeMap<String, Spanned<ModelFile>>>,
    steps: Vec<Spanned<StepFile>>,
}

/// Where a model's bytes come from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ModelSource {
    /// A file, shard directory or index on disk.
    Path(PathBuf),
    /// Generated on first use into the cache directory.
    Synthetic { kind: Kind, scale: f64, seed: u32 },
}

/// A model of the workflow.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelDef {
    pub(crate) name: String,
    pub(crate) source: ModelSource,
}

/// One step; models are indices into [`Workflow::models`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    Load {
        model: usize,
        budget: Option<u64>,
    },
    Compute {
        model: usize,
    },
    Patch {
        model: usize,
        lora: usize,
        strength: f32,
    },
    Unpatch {
        model: usize,
    },
    Unload {
        model: usize,
        bytes: Option<u64>,
    },
    Prefetch {
        model: usize,
    },
}

/// A step with the line it was written on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    pub(crate) line: usize,
    pub(crate) op: Op,
}

/// The device to run on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DeviceDef {
    pub(crate) cuda: bool,
    pub(crate) capacity: u64,
    pub(crate) bandwidth: Option<u64>,
}

/// Memory limits.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Limits {
    pub(crate) ram_budget: Option<u64>,
    pub(crate) reserve_ram: u64,
    pub(crate) spill_dir: Option<PathBuf>,
    pub(crate) spill_max: Option<u64>,
    pub(crate) cap: Option<u64>,
}

/// A validated workflow.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Workflow {
    pub(crate) path: PathBuf,
    pub(crate) cache_dir: PathBuf,
    pub(crate) device: DeviceDef,
    pub(crate) limits: Limits,
    pub(crate) models: Vec<ModelDef>,
    pub(crate) steps: Vec<Step>,
}

impl Op {
    /// A short description for progress and tables, such as `patch unet + style`.
    pub(crate) fn describe(&self, models: &[ModelDef]) -> String {
        let name = |i: usize| models[i].name.as_str();
        match self {
            Op::Load {
                model,
                budget: Some(b),
            } => format!("load {} (budget {})", name(*model), ByteSize(*b)),
            Op::Load { model, .. } => format!("load {}", name(*model)),
            Op::Compute { model } => format!("compute {}", name(*model)),
            Op::Patch {
                model,
                lora,
                strength,
            } => format!("patch {} + {} x{strength}", name(*model), name(*lora)),
            Op::Unpatch { model } => format!("unpatch {}", name(*model)),
            Op::Unload {
                model,
                bytes: Some(b),
            } => format!("unload {} ({})", name(*model), ByteSize(*b)),
            Op::Unload { model, .. } => format!("unload {}", name(*model)),
            Op::Prefetch { model } => format!("prefetch {}", name(*model)),
        }
    }
}

/// The `[models.*]` tables, validated.
fn parse_models(
    defs: BTreeMap<String, Spanned<ModelFile>>,
    base: &Path,
    at: &dyn Fn(usize) -> String,
) -> anyhow::Result<Vec<ModelDef>> {
    let mut models = Vec::new();
    for (name, def) in defs {
        let span = def.span();
        let def = def.into_inner();
        let source = match (def.path, def.synthetic) {
            (Some(p), None) => ModelSource::Path(base.join(p)),
            (None, Some(kind)) => {
                let scale = def.scale.unwrap_or(1.0);
                if !(scale > 0.0 && scale <= 4.0) {
                    bail!(
                        "{}: models.{name}.scale must be in (0, 4], got {scale}",
                        at(span.start)
                    );
                }
                ModelSource::Synthetic {
                    kind,
                    scale,
                    seed: def.seed.unwrap_or(0),
                }
            }
            (Some(_), Some(_)) => bail!(
                "{}: models.{name}: give either `path` or `synthetic`, not both",
                at(span.start)
            ),
            (None, None) => bail!(
                "{}: models.{name}: needs `path` or `synthetic`",
                at(span.start)
            ),
        };
        models.push(ModelDef { name, source });
    }
    Ok(models)
}

/// The `[device]` table, validated.
fn parse_device(device: &DeviceFile, at: &dyn Fn(usize) -> String) -> anyhow::Result<DeviceDef> {
    let kind = device.kind.as_ref().map_or("sim", |k| k.get_ref().as_str());
    let cuda = match kind {
        "sim" => false,
        "cuda" => true,
        other => {
            let span = device.kind.as_ref().map_or(0, |k| k.span().start);
            bail!(
                "{}: device.kind `{other}` is not one of: sim, cuda",
                at(span)
            );
        }
    };
    let capacity = nonzero(
        device.capacity.as_ref(),
        "device.capacity",
        "a device that holds nothing",
        at,
    )?;
    let bandwidth = nonzero(
        device.bandwidth.as_ref(),
        "device.bandwidth",
        "bytes per second: a transfer at 0 never ends",
        at,
    )?;
    Ok(DeviceDef {
        cuda,
        capacity: capacity.unwrap_or(4 << 30),
        bandwidth,
    })
}

/// The `[limits]` table, validated.
fn parse_limits(
    limits: LimitsFile,
    base: &Path,
    at: &dyn Fn(usize) -> String,
) -> anyhow::Result<Limits> {
    Ok(Limits {
        ram_budget: nonzero(
            limits.ram_budget.as_ref(),
            "limits.ram_budget",
            "a budget that holds nothing",
            at,
        )?,
        reserve_ram: limits.reserve_ram.map_or(0, |s| s.0),
        spill_dir: limits.spill_dir.map(|d| base.join(d)),
        spill_max: nonzero(
            limits.spill_max.as_ref(),
            "limits.spill_max",
            "a spill file that holds nothing",
            at,
        )?,
        cap: nonzero(
            limits.cap.as_ref(),
            "limits.cap",
            "a memory cap nothing runs under",
            at,
        )?,
    })
}

/// One step's op and its fields, validated.
fn parse_op(
    s: &StepFile,
    model: usize,
    here: &str,
    find: &dyn Fn(&str, &Spanned<String>) -> anyhow::Result<usize>,
    models: &[ModelDef],
    at: &dyn Fn(usize) -> String,
) -> anyhow::Result<Op> {
    let unexpected = |field: &str, present: bool| -> anyhow::Result<()> {
        if present {
            bail!(
                "{here}: `{field}` does not apply to op `{}`",
                s.op.get_ref()
            );
        }
        Ok(())
    };
    Ok(match s.op.get_ref().as_str() {
        "load" => {
            unexpected("lora", s.lora.is_some())?;
            unexpected("bytes", s.bytes.is_some())?;
            Op::Load {
                model,
                budget: s.budget.map(|b| b.0),
            }
        }
        "compute" | "unpatch" | "prefetch" => {
            unexpected("lora", s.lora.is_some())?;
            unexpected("budget", s.budget.is_some())?;
            unexpected("bytes", s.bytes.is_some())?;
            match s.op.get_ref().as_str() {
                "compute" => Op::Compute { model },
                "unpatch" => Op::Unpatch { model },
                _ => Op::Prefetch { model },
            }
        }
        "patch" => {
            let Some(lora) = &s.lora else {
                bail!("{here}: op `patch` needs `lora = \"<model>\"`")
            };
            let strength = s.strength.as_ref().map_or(1.0, |v| *v.get_ref());
            if !(strength as f32).is_finite() {
                let span = s.strength.as_ref().map_or(0, |v| v.span().start);
                bail!(
                    "{}: strength must be a finite number, got {strength}",
                    at(span)
                );
            }
            let lora = find("lora", lora)?;
            if !matches!(
                models[lora].source,
                ModelSource::Synthetic {
                    kind: Kind::Lora,
                    ..
                } | ModelSource::Path(_)
            ) {
                bail!(
                    "{here}: `lora` must name a LoRA model, `{}` is not one",
                    models[lora].name
                );
            }
            Op::Patch {
                model,
                lora,
                strength: strength as f32,
            }
        }
        "unload" => {
            unexpected("lora", s.lora.is_some())?;
            Op::Unload {
                model,
                bytes: s.bytes.map(|b| b.0),
            }
        }
        other => bail!(
            "{here}: op `{other}` is not one of: load, compute, patch, unpatch, unload, prefetch"
        ),
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

impl Workflow {
    /// Reads and validates a workflow file: a regular file (never a FIFO or a device) of at
    /// most [`MAX_WORKFLOW_LEN`] bytes.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let cannot_read = || format!("{}: cannot read", path.display());
        let file = lowtide::open_regular_file(path).with_context(cannot_read)?;
        let len = file.metadata().with_context(cannot_read)?.len();
        let too_large = |len: u64| {
            anyhow::anyhow!(
                "{}: is {len} bytes, over the {} cap for a workflow file",
                path.display(),
                ByteSize(MAX_WORKFLOW_LEN)
            )
        };
        if len > MAX_WORKFLOW_LEN {
            return Err(too_large(len));
        }
        // One byte over the cap at most, should the file grow while it is read.
        let mut bytes = Vec::new();
        file.take(MAX_WORKFLOW_LEN + 1)
            .read_to_end(&mut bytes)
            .with_context(cannot_read)?;
        if bytes.len() as u64 > MAX_WORKFLOW_LEN {
            return Err(too_large(bytes.len() as u64));
        }
        let text = String::from_utf8(bytes)
            .map_err(|err| anyhow::anyhow!("{}: is not UTF-8 text ({err})", path.display()))?;
        Self::parse(path, &text)
    }

    /// Validates workflow `text` read from `path` (relative paths are relative to its folder).
    pub(crate) fn parse(path: &Path, text: &str) -> anyhow::Result<Self> {
        let file: WorkflowFile = toml::from_str(text).map_err(|err| {
            let line = err.span().map_or(0, |s| line_of(text, s.start));
            anyhow::anyhow!("{}:{line}: {}", path.display(), err.message())
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let at = |offset: usize| format!("{}:{}", path.display(), line_of(text, offset));

        let device = parse_device(&file.device, &at)?;
        let limits = parse_limits(file.limits, &base, &at)?;

        let models_span = file.models.span();
        let models = parse_models(file.models.into_inner(), &base, &at)?;
        if models.is_empty() {
            bail!("{}: `models` is empty", at(models_span.start));
        }
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        let find = |field: &str, value: &Spanned<String>| -> anyhow::Result<usize> {
            names
                .iter()
                .position(|n| *n == value.get_ref())
                .with_context(|| {
                    format!(
                        "{}: {field} `{}` is not a model of this workflow (models: {})",
                        at(value.span().start),
                        value.get_ref(),
                        names.join(", ")
                    )
                })
        };

        let mut steps = Vec::new();
        for step in &file.steps {
            let line = line_of(text, step.span().start);
            let s = step.get_ref();
            let model = find("model", &s.model)?;
            let here = at(s.op.span().start);
            let op = parse_op(s, model, &here, &find, &models, &at)?;
            steps.push(Step { line, op });
        }
        if steps.is_empty() {
            bail!("{}: no [[steps]]", path.display());
        }
        let cache_dir = file
            .cache_dir
            .map_or_else(|| base.join(".lowtide-cache"), |d| base.join(d));
        Ok(Self {
            path: path.to_path_buf(),
            cache_dir,
            device,
            limits,
            models,
            steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Op, Workflow};
    use std::path::Path;

    const GOOD: &str = r#"
[device]
capacity = "1GiB"
[limits]
reserve_ram = "256MiB"
cap = 1073741824
[models.unet]
synthetic = "unet"
scale = 0.01
[models.style]
synthetic = "lora"
scale = 0.01
[[steps]]
op = "load"
model = "unet"
[[steps]]
op = "patch"
model = "unet"
lora = "style"
strength = 0.5
[[steps]]
op = "unload"
model = "unet"
bytes = "1MiB"
"#;

    fn parse(text: &str) -> anyhow::Result<Workflow> {
        Workflow::parse(Path::new("dir/w.toml"), text)
    }

    #[test]
    fn a_good_workflow() {
        let w = parse(GOOD).unwrap();
        assert_eq!(w.device.capacity, 1 << 30);
        assert_eq!(w.limits.cap, Some(1 << 30));
        assert_eq!(w.steps.len(), 3);
        assert_eq!(
            w.steps[1].op,
            Op::Patch {
                model: 1,
                lora: 0,
                strength: 0.5
            }
        );
        assert_eq!(w.steps[2].line, 21);
        assert_eq!(w.cache_dir, Path::new("dir/.lowtide-cache"));
    }

    fn error(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let e = error(&GOOD.replace(
            r#"model = "unet"
lora"#,
            r#"model = "unett"
lora"#,
        ));
        assert!(
            e.starts_with("dir/w.toml:18:")
                && e.contains("model `unett`")
                && e.contains("models: style, unet"),
            "{e}"
        );
        let e = error(&GOOD.replace(r#"capacity = "1GiB""#, r#"capacity = "1 parsec""#));
        assert!(
            e.starts_with("dir/w.toml:3:") && e.contains("unknown unit"),
            "{e}"
        );
        let e = error(&GOOD.replace(r#"op = "load""#, r#"op = "lode""#));
        assert!(
            e.starts_with("dir/w.toml:14:") && e.contains("op `lode`"),
            "{e}"
        );
        let e = error(&GOOD.replace("strength = 0.5", "strenght = 0.5"));
        assert!(e.contains("dir/w.toml:20") && e.contains("strenght"), "{e}");
        let e = error(&GOOD.replace(r#"lora = "style""#, ""));
        assert!(e.contains("needs `lora"), "{e}");
        let e = error(&GOOD.replace("scale = 0.01\n[models.style]", "scale = -1\n[models.style]"));
        assert!(e.contains("models.unet.scale"), "{e}");
    }
}

//! The models of a workflow resolved to files, their tensors, and the arithmetic every strategy
//! shares: applying a LoRA and hashing weights, so that all strategies compute the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lowtide::{ByteSize, Dtype, ModelFiles, SourceTensor};
use lowtide_testkit::synth::{self, Kind};
use lowtide_testkit::{TensorSpec, create_safetensors};

use super::{ModelSource, Op, Workflow};

/// A LoRA pair for one target weight: `up` [out, rank] and `down` [rank, in].
#[derive(Debug, Clone)]
pub(crate) struct LoraPair {
    pub(crate) target: String,
    pub(crate) down: usize,
    pub(crate) up: usize,
}

/// A model of the workflow, opened and validated.
#[derive(Debug, Clone)]
pub(crate) struct ModelMeta {
    pub(crate) name: String,
    /// What to open: a file, a directory of shards or an index.
    pub(crate) path: PathBuf,
    /// Tensors in name order, as their files' headers give them (offsets absolute).
    pub(crate) tensors: Vec<SourceTensor>,
    /// The file holding each of `tensors`, by index.
    pub(crate) files: Vec<PathBuf>,
    /// For a LoRA: its pairs by target name (empty for other models).
    pub(crate) lora: Vec<LoraPair>,
}

impl ModelMeta {
    pub(crate) fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
    }
}

/// The files of a synthetic model, written on first use into the workflow's cache directory.
/// `progress` is told the bytes written so far.
pub(crate) fn resolve(
    workflow: &Workflow,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> anyhow::Result<Vec<ModelMeta>> {
    workflow
        .models
        .iter()
        .map(|def| {
            let path = match &def.source {
                ModelSource::Path(path) => path.clone(),
                ModelSource::Synthetic { kind, scale, seed } => {
                    let total = synth::bytes(*kind, *scale, *seed);
                    ensure(&workflow.cache_dir, *kind, *scale, *seed, &mut |done| {
                        progress(&def.name, done, total);
                    })?
                }
            };
            open(&def.name, path)
        })
        .collect()
}

/// The cached file of a synthetic model, written if missing. `progress` is called with the
/// bytes written so far.
///
/// The file is named only once complete, so a run killed while generating leaves nothing in
/// `dir`; of several runs generating the same file at once, the first to finish names it and
/// the others use it.
fn ensure(
    dir: &Path,
    kind: Kind,
    scale: f64,
    seed: u32,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<PathBuf> {
    let path = dir.join(synth::file_name(kind, scale, seed));
    if path.exists() {
        return Ok(path);
    }
    // Files of earlier versions of the synthetic shapes are stale.
    for old in 1..synth::VERSION {
        let _ = std::fs::remove_file(dir.join(synth::file_name_of_version(kind, scale, seed, old)));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let specs = synth::specs(kind, scale, seed);
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_owned(), "pt".to_owned());
    metadata.insert(
        "lowtide.synthetic".to_owned(),
        format!("{} scale {scale} seed {seed}", kind.name()),
    );
    let total: u64 = specs.iter().filter_map(TensorSpec::byte_len).sum();
    check_space(dir, &path, total)?;
    let mut written = 0u64;
    create_safetensors(&path, &specs, &metadata, |i, buf| {
        synth::fill(&specs[i], seed, buf);
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

/// Opens and validates one model.
pub(crate) fn open(name: &str, path: PathBuf) -> anyhow::Result<ModelMeta> {
    let files = ModelFiles::open(&path).with_context(|| format!("model `{name}`"))?;
    let (tensors, files): (Vec<SourceTensor>, Vec<PathBuf>) = files
        .tensors()
        .keys()
        .filter_map(|tensor| files.get(tensor))
        .map(|(source, t)| (t.clone(), source.path().to_path_buf()))
        .unzip();
    meta(name, path, tensors, files)
}

/// A model from its tensors (in name order) and the file of each, its LoRA pairs found by
/// their names.
pub(crate) fn meta(
    name: &str,
    path: PathBuf,
    tensors: Vec<SourceTensor>,
    files: Vec<PathBuf>,
) -> anyhow::Result<ModelMeta> {
    let mut pairs: BTreeMap<&str, (Option<usize>, Option<usize>)> = BTreeMap::new();
    for (i, t) in tensors.iter().enumerate() {
        if let Some(target) = t.name.strip_suffix(".lora_down.weight") {
            pairs.entry(target).or_default().0 = Some(i);
        } else if let Some(target) = t.name.strip_suffix(".lora_up.weight") {
            pairs.entry(target).or_default().1 = Some(i);
        }
    }
    let mut lora = Vec::new();
    for (target, pair) in pairs {
        let (Some(down), Some(up)) = pair else {
            bail!("model `{name}`: LoRA target `{target}` lacks its lora_down or lora_up tensor");
        };
        lora.push(LoraPair {
            target: format!("{target}.weight"),
            down,
            up,
        });
    }
    Ok(ModelMeta {
        name: name.to_owned(),
        path,
        tensors,
        files,
        lora,
    })
}

/// Checks before a run that every `patch` step's LoRA fits its model: each target exists with
/// shape [out, in] and the pair's shapes are [rank, in] and [out, rank] in BF16, F16 or F32.
pub(crate) fn check_patches(workflow: &Workflow, models: &[ModelMeta]) -> anyhow::Result<()> {
    for step in &workflow.steps {
        let Op::Patch { model, lora, .. } = step.op else {
            continue;
        };
        let (m, l) = (&models[model], &models[lora]);
        let at = format!("{}:{}", workflow.path.display(), step.line);
        if l.lora.is_empty() {
            bail!(
                "{at}: `{}` has no LoRA tensors (`*.lora_down.weight`)",
                l.name
            );
        }
        for pair in &l.lora {
            let Some(target) = m.index_of(&pair.target) else {
                bail!(
                    "{at}: LoRA `{}` patches `{}`, which model `{}` lacks",
                    l.name,
                    pair.target,
                    m.name
                );
            };
            let (w, down, up) = (
                &m.tensors[target],
                &l.tensors[pair.down],
                &l.tensors[pair.up],
            );
            let float = |d: Dtype| matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32);
            let fits = w.shape.len() == 2
                && down.shape.len() == 2
                && up.shape.len() == 2
                && up.shape[0] == w.shape[0]
                && down.shape[1] == w.shape[1]
                && up.shape[1] == down.shape[0]
                && float(w.dtype)
                && float(down.dtype)
                && float(up.dtype);
            if !fits {
                bail!(
                    "{at}: LoRA `{}` does not fit `{}`: weight {:?} {:?}, up {:?}, down {:?}",
                    l.name,
                    pair.target,
                    w.dtype,
                    w.shape,
                    up.shape,
                    down.shape
                );
            }
        }
    }
    Ok(())
}

/// The elements of a float tensor as f32, allocated fallibly.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
    let width = if matches!(dtype, Dtype::BF16 | Dtype::F16) {
        2
    } else {
        4
    };
    let mut out = Vec::new();
    out.try_reserve_exact(bytes.len() / width)
        .with_context(|| {
            format!(
                "cannot allocate {} bytes for a LoRA factor",
                bytes.len() * 2
            )
        })?;
    let chunks = bytes.chunks_exact(width);
    match dtype {
        Dtype::BF16 => out.extend(chunks.map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        Dtype::F16 => out.extend(chunks.map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())),
        _ => out.extend(chunks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
    }
    Ok(out)
}

/// `weight += strength * up @ down`, computed in f32 and rounded back to the weight's dtype.
/// Shapes were checked by [`check_patches`]; any dimension may be zero (then there is
/// nothing to add).
pub(crate) fn apply_lora(
    weight: &mut [u8],
    w: &SourceTensor,
    down: (&SourceTensor, &[u8]),
    up: (&SourceTensor, &[u8]),
    strength: f32,
) -> anyhow::Result<()> {
    let (cols, rank) = (w.shape[1] as usize, down.0.shape[0] as usize);
    let elem = w.dtype.bytes_for(1).unwrap_or(2) as usize;
    if cols == 0 || rank == 0 || weight.is_empty() {
        return Ok(());
    }
    let (down, up) = (to_f32(down.0.dtype, down.1)?, to_f32(up.0.dtype, up.1)?);
    let mut row = Vec::new();
    row.try_reserve_exact(cols)
        .context("cannot allocate a row of the LoRA product")?;
    row.resize(cols, 0f32);
    for (o, out) in weight.chunks_exact_mut(cols * elem).enumerate() {
        row.fill(0.0);
        for k in 0..rank {
            let scale = strength * up[o * rank + k];
            for (acc, d) in row.iter_mut().zip(&down[k * cols..(k + 1) * cols]) {
                *acc += scale * d;
            }
        }
        for (value, delta) in out.chunks_exact_mut(elem).zip(&row) {
            match w.dtype {
                Dtype::BF16 => {
                    let x = half::bf16::from_le_bytes([value[0], value[1]]).to_f32() + delta;
                    value.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
                }
                Dtype::F16 => {
                    let x = half::f16::from_le_bytes([value[0], value[1]]).to_f32() + delta;
                    value.copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
                }
                _ => {
                    let x = f32::from_le_bytes([value[0], value[1], value[2], value[3]]) + delta;
                    value.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    Ok(())
}

/// The digest of one model's weights as a compute step sees them: xxh3 over every tensor's
/// name and bytes in name order, fed in chunks.
pub(crate) struct Digest(xxhash_rust::xxh3::Xxh3);

impl Digest {
    pub(crate) fn new() -> Self {
        Self(xxhash_rust::xxh3::Xxh3::new())
    }

    pub(crate) fn tensor(&mut self, name: &str) {
        self.0.update(name.as_bytes());
        self.0.update(&[0]);
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0.digest()
    }
}

#[cfg(test)]
mod tests {
    use lowtide::{Dtype, SourceTensor};

    use super::apply_lora;

    fn meta(dtype: Dtype, shape: &[u64]) -> SourceTensor {
        SourceTensor {
            name: "w".into(),
            dtype,
            shape: shape.to_vec(),
            offset: 0,
            len: 0,
        }
    }

    #[test]
    fn lora_adds_strength_times_up_down() {
        // w = [[1, 2], [3, 4]] (F32), up = [[1], [2]], down = [[10, 20]], strength 0.5.
        let mut w: Vec<u8> = [1f32, 2., 3., 4.]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let up: Vec<u8> = [1f32, 2.].iter().flat_map(|x| x.to_le_bytes()).collect();
        let down: Vec<u8> = [10f32, 20.].iter().flat_map(|x| x.to_le_bytes()).collect();
        apply_lora(
            &mut w,
            &meta(Dtype::F32, &[2, 2]),
            (&meta(Dtype::F32, &[1, 2]), &down),
            (&meta(Dtype::F32, &[2, 1]), &up),
            0.5,
        )
        .unwrap();
        let got: Vec<f32> = w
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(got, [6., 12., 13., 24.]);
    }

    #[test]
    fn zero_sized_dimensions_add_nothing() {
        // A [4, 0] weight with a [2, 0] down and [4, 2] up factor, and the other way round.
        let up: Vec<u8> = vec![0; 4 * 2 * 4];
        let mut w: Vec<u8> = Vec::new();
        apply_lora(
            &mut w,
            &meta(Dtype::F32, &[4, 0]),
            (&meta(Dtype::F32, &[2, 0]), &[]),
            (&meta(Dtype::F32, &[4, 2]), &up),
            1.0,
        )
        .unwrap();
        let mut w: Vec<u8> = vec![7; 4 * 3 * 2];
        apply_lora(
            &mut w,
            &meta(Dtype::BF16, &[4, 3]),
            (&meta(Dtype::BF16, &[0, 3]), &[]),
            (&meta(Dtype::BF16, &[4, 0]), &[]),
            1.0,
        )
        .unwrap();
        assert_eq!(w, vec![7; 24]);
    }
}

//! The three ways a workflow can manage its weights: lowtide's store, the classic unload to
//! anonymous RAM, and the ComfyUI proposal's "everything unloaded goes to a disk file while RAM
//! is under the reserve". All three run the same steps on the same simulated device and compute
//! the same bytes; they differ only in where weights wait while off the device.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lowtide::{
    AlignedBytes, ByteSize, Device, DeviceAlloc, DeviceId, MemoryReading, ModelId, Priority,
    SimDevice, SourceTensor, Store, TensorId,
};

use super::Workflow;
use super::catalog::{Digest, ModelMeta, apply_lora};

/// Compute and spill-all stream device memory in chunks of this size.
pub(crate) const CHUNK: usize = 4 << 20;

/// Which strategy runs a workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Strategy {
    /// lowtide's store: clean weights dropped and re-read, patched ones to RAM within the
    /// budget or to the checksummed spill file.
    Lowtide,
    /// The ComfyUI proposal: while available memory is under the reserve, everything unloaded
    /// (and, when a load needs room, every host copy of another model) is written to a disk
    /// file, clean or not.
    SpillAll,
    /// The classic path: everything unloaded waits in anonymous RAM, without a budget.
    Ram,
}

impl Strategy {
    pub(crate) const ALL: [Strategy; 3] = [Strategy::Lowtide, Strategy::SpillAll, Strategy::Ram];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Strategy::Lowtide => "lowtide",
            Strategy::SpillAll => "spill-all",
            Strategy::Ram => "ram",
        }
    }
}

/// Running totals a strategy keeps; the runner reports their differences per step.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Figures {
    /// Bytes read from model files.
    pub(crate) bytes_read: u64,
    /// Bytes written (spill or offload files).
    pub(crate) bytes_written: u64,
    /// Bytes read back from spill or offload files.
    pub(crate) bytes_restored: u64,
    /// Copies evicted or offloaded to make room (RAM evictions and device unloads).
    pub(crate) evictions: u64,
    /// Peak of the host bytes the strategy itself holds (the store's accounted peak).
    pub(crate) held_peak: u64,
    /// Time spent bringing weights onto the device (loads and on-demand uploads).
    pub(crate) stall: Duration,
}

/// The operations of a workflow step, by model index.
pub(crate) trait Backend {
    fn load(&mut self, model: usize, budget: Option<u64>) -> anyhow::Result<()>;
    /// Reads every weight of the model as the device holds it; returns the digest.
    fn compute(&mut self, model: usize) -> anyhow::Result<u64>;
    fn patch(&mut self, model: usize, lora: usize, strength: f32) -> anyhow::Result<()>;
    fn unpatch(&mut self, model: usize) -> anyhow::Result<()>;
    fn unload(&mut self, model: usize, bytes: Option<u64>) -> anyhow::Result<()>;
    fn prefetch(&mut self, model: usize) -> anyhow::Result<()>;
    fn figures(&self) -> Figures;
}

/// The device of a workflow: simulated, or GPU 0 when built with the `cuda` feature.
pub(crate) fn device(workflow: &Workflow) -> anyhow::Result<Arc<dyn Device>> {
    if workflow.device.cuda {
        return cuda_device(workflow);
    }
    let mut sim = SimDevice::new("sim0", workflow.device.capacity);
    if let Some(rate) = workflow.device.bandwidth {
        sim = sim.with_bandwidth(rate);
    }
    Ok(Arc::new(sim))
}

#[cfg(feature = "cuda")]
fn cuda_device(_workflow: &Workflow) -> anyhow::Result<Arc<dyn Device>> {
    Ok(Arc::new(lowtide::CudaDevice::new(0)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(workflow: &Workflow) -> anyhow::Result<Arc<dyn Device>> {
    anyhow::bail!(
        "{}: device.kind = \"cuda\" needs lowtide built with `--features cuda`",
        workflow.path.display()
    )
}

/// A buffer of `len` bytes that is its own mapping when large (given back to the kernel when
/// dropped, never kept by the allocator), or an error naming what it was for.
pub(crate) fn buffer(len: u64, what: &str) -> anyhow::Result<AlignedBytes> {
    usize::try_from(len)
        .ok()
        .and_then(AlignedBytes::zeroed)
        .with_context(|| format!("cannot allocate {} for {what}", ByteSize(len)))
}

/// `len` zero bytes in a vector, allocated fallibly (sizes come from model files).
pub(crate) fn zeroed_vec(len: u64, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    usize::try_from(len)
        .ok()
        .and_then(|n| bytes.try_reserve_exact(n).ok())
        .with_context(|| format!("cannot allocate {} for {what}", ByteSize(len)))?;
    bytes.resize(len as usize, 0);
    Ok(bytes)
}

/// Hashes a device allocation in chunks of `scratch`.
fn hash_device(
    device: &dyn Device,
    alloc: &DeviceAlloc,
    digest: &mut Digest,
    scratch: &mut [u8],
) -> anyhow::Result<()> {
    let mut at = 0u64;
    while at < alloc.len() {
        let n = (alloc.len() - at).min(scratch.len() as u64) as usize;
        device.download(alloc, at, &mut scratch[..n])?;
        digest.bytes(&scratch[..n]);
        at += n as u64;
    }
    Ok(())
}

/// Reads a tensor's bytes from `path`, the file holding it.
fn read_tensor(path: &Path, meta: &SourceTensor) -> anyhow::Result<Vec<u8>> {
    let file = lowtide::open_regular_file(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = zeroed_vec(meta.len, &meta.name)?;
    file.read_exact_at(&mut bytes, meta.offset)
        .with_context(|| format!("{}: cannot read `{}`", path.display(), meta.name))?;
    Ok(bytes)
}

/// lowtide's store.
pub(crate) struct LowtideBackend {
    store: Store,
    gpu: DeviceId,
    models: Vec<ModelMeta>,
    ids: Vec<ModelId>,
    stall: Duration,
    /// Prefetches started by `prefetch` steps, by model (cancelled when dropped).
    prefetches: std::collections::HashMap<usize, lowtide::Prefetch>,
    /// Where compute steps download device memory to hash it, reused.
    scratch: AlignedBytes,
}

impl LowtideBackend {
    pub(crate) fn new(workflow: &Workflow, models: Vec<ModelMeta>) -> anyhow::Result<Self> {
        let mut builder = Store::builder().reserve_ram(workflow.limits.reserve_ram);
        // Under a cap, `run::prepare` has filled in the budget the cap leaves.
        if let Some(budget) = workflow.limits.ram_budget {
            builder = builder.ram_budget(budget);
        }
        if let Some(dir) = &workflow.limits.spill_dir {
            builder = builder.spill_dir(dir);
        }
        if let Some(max) = workflow.limits.spill_max {
            builder = builder.spill_max(max);
        }
        let store = builder.build()?;
        let gpu = store.add_device(device(workflow)?);
        let ids = models
            .iter()
            .map(|m| {
                store
                    .open_model(&m.path)
                    .with_context(|| format!("model `{}`", m.name))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            store,
            gpu,
            models,
            ids,
            stall: Duration::ZERO,
            prefetches: std::collections::HashMap::new(),
            scratch: buffer(CHUNK as u64, "hashing")?,
        })
    }

    /// Waits for a prefetch of `model` still running: it pins each tensor while it reads it,
    /// and the next step on the model may replace or revert them. The wait counts as a stall.
    fn settle(&mut self, model: usize) -> anyhow::Result<()> {
        if let Some(prefetch) = self.prefetches.remove(&model) {
            let start = Instant::now();
            prefetch.wait()?;
            self.stall += start.elapsed();
        }
        Ok(())
    }

    fn id(&self, model: usize, tensor: &str) -> anyhow::Result<TensorId> {
        Ok(self.store.tensor(self.ids[model], tensor)?)
    }
}

impl Backend for LowtideBackend {
    fn load(&mut self, model: usize, budget: Option<u64>) -> anyhow::Result<()> {
        self.settle(model)?;
        self.store.set_priority(self.ids[model], Priority::Active)?;
        let start = Instant::now();
        self.store.load(self.ids[model], self.gpu, budget)?;
        self.stall += start.elapsed();
        Ok(())
    }

    fn compute(&mut self, model: usize) -> anyhow::Result<u64> {
        self.settle(model)?;
        let mut digest = Digest::new();
        for id in self.store.tensors(self.ids[model])? {
            let start = Instant::now();
            let guard = self.store.acquire_device(id, self.gpu)?;
            self.stall += start.elapsed();
            digest.tensor(&self.store.info(id)?.name);
            hash_device(
                &**guard.device(),
                guard.alloc(),
                &mut digest,
                self.scratch.as_mut_slice(),
            )?;
        }
        Ok(digest.finish())
    }

    fn patch(&mut self, model: usize, lora: usize, strength: f32) -> anyhow::Result<()> {
        self.settle(model)?;
        self.settle(lora)?;
        for pair in &self.models[lora].lora {
            let id = self.id(model, &pair.target)?;
            let meta = &self.models[model].tensors[self.models[model]
                .index_of(&pair.target)
                .context("checked")?];
            let mut weight = buffer(meta.len, "patching")?;
            self.store
                .acquire_device(id, self.gpu)?
                .download_into(weight.as_mut_slice())?;
            let (down, up) = (
                &self.models[lora].tensors[pair.down],
                &self.models[lora].tensors[pair.up],
            );
            // RAM copies, read and checked against the file's identity: a LoRA file
            // truncated or rewritten meanwhile is an error, never SIGBUS or other bytes.
            let down_bytes = self.store.acquire_ram(self.id(lora, &down.name)?)?;
            let up_bytes = self.store.acquire_ram(self.id(lora, &up.name)?)?;
            apply_lora(
                weight.as_mut_slice(),
                meta,
                (down, &down_bytes),
                (up, &up_bytes),
                strength,
            )?;
            drop((down_bytes, up_bytes));
            self.store
                .replace_on_device(id, self.gpu, weight.as_slice())?;
        }
        Ok(())
    }

    fn unpatch(&mut self, model: usize) -> anyhow::Result<()> {
        self.settle(model)?;
        for id in self.store.tensors(self.ids[model])? {
            self.store.revert(id)?;
        }
        Ok(())
    }

    fn unload(&mut self, model: usize, bytes: Option<u64>) -> anyhow::Result<()> {
        self.settle(model)?;
        let outcome = if let Some(bytes) = bytes {
            self.store.unload(self.ids[model], bytes)?
        } else {
            self.store.set_priority(self.ids[model], Priority::Idle)?;
            self.store.unload_all(self.ids[model])?
        };
        if outcome.not_freed_bytes > 0 {
            log::warn!(
                "unload {}: {} bytes stayed on the device (neither RAM nor the spill file could take them)",
                self.models[model].name,
                outcome.not_freed_bytes
            );
        }
        Ok(())
    }

    fn prefetch(&mut self, model: usize) -> anyhow::Result<()> {
        // Restores into RAM in the background, within the room the governor has free; the
        // steps that follow go on meanwhile.
        self.store.set_priority(self.ids[model], Priority::Queued)?;
        self.settle(model)?;
        let prefetch = self.store.prefetch(self.ids[model])?;
        self.prefetches.insert(model, prefetch);
        Ok(())
    }

    fn figures(&self) -> Figures {
        let stats = self.store.stats();
        Figures {
            bytes_read: stats.bytes_read_source,
            bytes_written: stats.bytes_written,
            bytes_restored: stats.bytes_restored_spill,
            // Evictions from RAM and unloads from the device, as the classic strategies count
            // their offloads.
            evictions: stats.evictions + stats.device_unloads,
            held_peak: stats.anon_peak_bytes,
            stall: self.stall,
        }
    }
}

/// Where one tensor is in the classic strategies.
#[derive(Default)]
struct Slot {
    /// Host copy (anonymous RAM).
    host: Option<Vec<u8>>,
    device: Option<DeviceAlloc>,
    /// (offset) of its bytes in the offload file, written by spill-all.
    offloaded: Option<u64>,
    /// The bytes before patching, kept in RAM as ComfyUI keeps its weight backups.
    backup: Option<Vec<u8>>,
}

/// The classic strategies: `ram` and `spill-all`.
pub(crate) struct ClassicBackend {
    device: Arc<dyn Device>,
    models: Vec<ModelMeta>,
    slots: Vec<Vec<Slot>>,
    /// Models on the device, least recently loaded first.
    loaded: Vec<usize>,
    /// spill-all's offload file and its reserve trigger.
    offload: Option<(File, u64)>,
    offload_end: u64,
    figures: Figures,
    held: u64,
    /// Where compute steps download device memory to hash it, reused.
    scratch: AlignedBytes,
}

impl ClassicBackend {
    pub(crate) fn new(
        workflow: &Workflow,
        models: Vec<ModelMeta>,
        spill_all: bool,
    ) -> anyhow::Result<Self> {
        let offload = if spill_all {
            let dir = workflow
                .limits
                .spill_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir);
            let file = tempfile::tempfile_in(&dir)
                .with_context(|| format!("cannot create an offload file in {}", dir.display()))?;
            Some((file, workflow.limits.reserve_ram))
        } else {
            None
        };
        let slots = models
            .iter()
            .map(|m| m.tensors.iter().map(|_| Slot::default()).collect())
            .collect();
        Ok(Self {
            device: device(workflow)?,
            models,
            slots,
            loaded: Vec::new(),
            offload,
            offload_end: 0,
            figures: Figures::default(),
            held: 0,
            scratch: buffer(CHUNK as u64, "hashing")?,
        })
    }

    fn hold(&mut self, bytes: u64) {
        self.held += bytes;
        self.figures.held_peak = self.figures.held_peak.max(self.held);
    }

    /// The tensor's bytes in host RAM, read from the offload file or the model file if needed.
    fn ensure_host(&mut self, model: usize, t: usize) -> anyhow::Result<()> {
        let slot = &self.slots[model][t];
        if slot.host.is_some() || slot.device.is_some() {
            return Ok(());
        }
        let meta = &self.models[model].tensors[t];
        let bytes = if let (Some(at), Some((file, _))) = (slot.offloaded, &self.offload) {
            let mut bytes = zeroed_vec(meta.len, &meta.name)?;
            file.read_exact_at(&mut bytes, at).context("offload file")?;
            self.figures.bytes_restored += meta.len;
            bytes
        } else {
            let bytes = read_tensor(&self.models[model].files[t], meta)?;
            self.figures.bytes_read += meta.len;
            bytes
        };
        self.hold(meta.len);
        self.slots[model][t].host = Some(bytes);
        Ok(())
    }

    /// Moves one tensor from the device to host RAM (and on to the offload file for spill-all
    /// when available memory is under the reserve).
    fn offload_tensor(&mut self, model: usize, t: usize) -> anyhow::Result<u64> {
        let Some(alloc) = self.slots[model][t].device.take() else {
            return Ok(0);
        };
        let len = alloc.len();
        let mut bytes = zeroed_vec(len, "a download")?;
        self.device.download(&alloc, 0, &mut bytes)?;
        self.device.release(alloc);
        self.figures.evictions += 1;
        if self.under_reserve() {
            self.write_offload(model, t, &bytes)?;
            return Ok(len);
        }
        self.hold(len);
        self.slots[model][t].host = Some(bytes);
        Ok(len)
    }

    /// spill-all: whether available memory is under the reserve now.
    fn under_reserve(&self) -> bool {
        self.offload
            .as_ref()
            .is_some_and(|(_, reserve)| MemoryReading::now().available < *reserve)
    }

    /// spill-all: writes a tensor's bytes to the offload file (every time, clean or not).
    fn write_offload(&mut self, model: usize, t: usize, bytes: &[u8]) -> anyhow::Result<()> {
        let Some((file, _)) = &self.offload else {
            return Ok(());
        };
        let len = bytes.len() as u64;
        let at = self.slots[model][t].offloaded.unwrap_or(self.offload_end);
        file.write_all_at(bytes, at).context("offload file")?;
        if at == self.offload_end {
            self.offload_end += len;
        }
        self.figures.bytes_written += len;
        self.slots[model][t].offloaded = Some(at);
        Ok(())
    }

    /// spill-all, while available memory is under the reserve: moves the host copies of the
    /// models other than `keep` to the offload file.
    fn relieve(&mut self, keep: usize) -> anyhow::Result<()> {
        if !self.under_reserve() {
            return Ok(());
        }
        for model in (0..self.models.len()).filter(|&m| m != keep) {
            for t in 0..self.models[model].tensors.len() {
                if let Some(bytes) = self.slots[model][t].host.take() {
                    self.write_offload(model, t, &bytes)?;
                    self.held -= bytes.len() as u64;
                    self.figures.evictions += 1;
                }
            }
        }
        Ok(())
    }

    /// Unloads whole models other than `keep`, least recently loaded first, until `len` bytes
    /// are free; false if even that is not enough.
    fn make_room(&mut self, keep: usize, len: u64) -> anyhow::Result<bool> {
        while self.device.free_bytes() < len {
            let Some(pos) = self.loaded.iter().position(|&m| m != keep) else {
                return Ok(false);
            };
            let victim = self.loaded.remove(pos);
            self.unload(victim, None)?;
        }
        Ok(true)
    }

    /// Puts one tensor on the device (from host RAM, reading it first if needed). One that
    /// does not fit stays in host RAM, as in ComfyUI's low-VRAM mode.
    fn upload(&mut self, model: usize, t: usize) -> anyhow::Result<()> {
        if self.slots[model][t].device.is_some() {
            return Ok(());
        }
        let start = Instant::now();
        self.relieve(model)?;
        self.ensure_host(model, t)?;
        let len = self.models[model].tensors[t].len;
        if self.make_room(model, len)? {
            let alloc = self.device.allocate(len)?;
            let host = self.slots[model][t].host.take().context("host copy")?;
            self.device.upload(&alloc, 0, &host)?;
            self.held -= len;
            self.slots[model][t].device = Some(alloc);
        }
        self.figures.stall += start.elapsed();
        Ok(())
    }

    /// The current bytes of a tensor (from the device or host).
    fn current(&mut self, model: usize, t: usize) -> anyhow::Result<Vec<u8>> {
        self.ensure_host(model, t)?;
        let slot = &self.slots[model][t];
        if let Some(alloc) = &slot.device {
            let mut bytes = zeroed_vec(alloc.len(), "a download")?;
            self.device.download(alloc, 0, &mut bytes)?;
            return Ok(bytes);
        }
        slot.host.clone().context("host copy")
    }

    /// Writes new bytes where the tensor is (device or host); an offloaded copy is stale.
    fn set(&mut self, model: usize, t: usize, bytes: Vec<u8>) -> anyhow::Result<()> {
        let slot = &mut self.slots[model][t];
        slot.offloaded = None;
        if let Some(alloc) = &slot.device {
            self.device.upload(alloc, 0, &bytes)?;
        } else {
            slot.host = Some(bytes);
        }
        Ok(())
    }
}

impl Backend for ClassicBackend {
    fn load(&mut self, model: usize, budget: Option<u64>) -> anyhow::Result<()> {
        let budget = budget.unwrap_or(u64::MAX);
        let mut on_device = 0u64;
        for t in 0..self.models[model].tensors.len() {
            let len = self.models[model].tensors[t].len;
            if on_device + len > budget {
                self.ensure_host(model, t)?;
                continue;
            }
            self.upload(model, t)?;
            on_device += len;
        }
        self.loaded.retain(|&m| m != model);
        self.loaded.push(model);
        Ok(())
    }

    fn compute(&mut self, model: usize) -> anyhow::Result<u64> {
        let mut digest = Digest::new();
        for t in 0..self.models[model].tensors.len() {
            digest.tensor(&self.models[model].tensors[t].name);
            self.ensure_host(model, t)?;
            match (&self.slots[model][t].device, &self.slots[model][t].host) {
                (Some(alloc), _) => {
                    hash_device(
                        &*self.device,
                        alloc,
                        &mut digest,
                        self.scratch.as_mut_slice(),
                    )?;
                }
                // Low-VRAM: weights that did not fit are used from host RAM.
                (None, Some(host)) => digest.bytes(host),
                (None, None) => unreachable!("ensure_host gave it a copy"),
            }
        }
        Ok(digest.finish())
    }

    fn patch(&mut self, model: usize, lora: usize, strength: f32) -> anyhow::Result<()> {
        for p in 0..self.models[lora].lora.len() {
            let pair = self.models[lora].lora[p].clone();
            let t = self.models[model]
                .index_of(&pair.target)
                .context("checked")?;
            let mut weight = self.current(model, t)?;
            if self.slots[model][t].backup.is_none() {
                self.hold(weight.len() as u64);
                self.slots[model][t].backup = Some(weight.clone());
            }
            let down = self.current(lora, pair.down)?;
            let up = self.current(lora, pair.up)?;
            let (meta, lm) = (&self.models[model].tensors[t], &self.models[lora].tensors);
            apply_lora(
                &mut weight,
                meta,
                (&lm[pair.down], &down),
                (&lm[pair.up], &up),
                strength,
            )?;
            self.set(model, t, weight)?;
        }
        Ok(())
    }

    fn unpatch(&mut self, model: usize) -> anyhow::Result<()> {
        for t in 0..self.models[model].tensors.len() {
            let slot = &mut self.slots[model][t];
            let Some(backup) = slot.backup.take() else {
                continue;
            };
            let len = backup.len() as u64;
            slot.offloaded = None;
            if let Some(alloc) = &slot.device {
                self.device.upload(alloc, 0, &backup)?;
                self.held -= len;
            } else if slot.host.replace(backup).is_some() {
                // The patched host copy is gone; the backup took its place.
                self.held -= len;
            }
        }
        Ok(())
    }

    fn unload(&mut self, model: usize, bytes: Option<u64>) -> anyhow::Result<()> {
        let want = bytes.unwrap_or(u64::MAX);
        let mut freed = 0u64;
        for t in 0..self.models[model].tensors.len() {
            if freed >= want {
                break;
            }
            freed += self.offload_tensor(model, t)?;
        }
        if bytes.is_none() {
            self.loaded.retain(|&m| m != model);
        }
        Ok(())
    }

    fn prefetch(&mut self, model: usize) -> anyhow::Result<()> {
        for t in 0..self.models[model].tensors.len() {
            self.ensure_host(model, t)?;
        }
        Ok(())
    }

    fn figures(&self) -> Figures {
        self.figures
    }
}

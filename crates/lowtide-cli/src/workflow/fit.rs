//! Whether a workflow's configuration fits its memory cap, checked before the first step.
//!
//! Under a cap, the lowtide strategy holds at most: the simulated device's capacity (its
//! memory is this process's), the RAM budget, the reserve it keeps free, and an overhead —
//! a fixed base for the process itself, the store's transfer buffers
//! ([`lowtide::scratch_bytes`]) and this command's own buffers for hashing and patching. A
//! cap below that sum cannot be kept, so it is refused with the sum spelled out instead of
//! ending in an OOM kill (docs/reliability.md).

use anyhow::bail;
use lowtide::ByteSize;

use super::catalog::ModelMeta;
use super::strategy::CHUNK;
use super::{Op, Workflow};

/// The process itself: its heap, thread stacks and I/O rings, measured at about 3 MiB of
/// anonymous memory for a workflow of one tiny model; rounded up generously.
pub(crate) const BASE_OVERHEAD: u64 = 8 << 20;

/// The chunk size of the workflow's device: its staging ring's for CUDA, the simulated
/// device's otherwise.
fn chunk_len(cuda: bool) -> usize {
    #[cfg(feature = "cuda")]
    if cuda {
        return lowtide::CudaDevice::CHUNK_LEN;
    }
    // Without the feature a CUDA workflow is refused when its device is made.
    let _ = cuda;
    lowtide::Device::chunk_len(&lowtide::SimDevice::new("sim0", 0))
}

/// The smallest RAM budget a capped workflow runs with.
const MIN_BUDGET: u64 = 1 << 20;

/// What the lowtide strategy may hold under the cap, term by term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fit {
    /// Device memory that lives in this process (the simulated device's capacity).
    pub(crate) device: u64,
    /// The RAM budget: the workflow's, or under a cap without one, what the cap leaves.
    pub(crate) ram_budget: u64,
    pub(crate) reserve: u64,
    /// [`BASE_OVERHEAD`], the store's transfer buffers and the command's own buffers.
    pub(crate) overhead: u64,
}

impl Fit {
    pub(crate) fn total(&self) -> u64 {
        self.device
            .saturating_add(self.ram_budget)
            .saturating_add(self.reserve)
            .saturating_add(self.overhead)
    }
}

/// The largest tensor of the workflow's models, with its name.
fn largest(models: &[ModelMeta]) -> Option<(&str, &str, u64)> {
    models
        .iter()
        .flat_map(|m| m.tensors.iter().map(move |t| (m.name.as_str(), t)))
        .max_by_key(|(_, t)| t.len)
        .map(|(model, t)| (model, t.name.as_str(), t.len))
}

/// What the `patch` steps need, over every LoRA pair they apply.
#[derive(Default)]
struct Patches {
    /// The largest pair of factors read into RAM copies at once, and which target it patches.
    factors: u64,
    pair: String,
    /// Bytes the command itself holds at most while patching: the weight's host copy and both
    /// factors as f32 (the factors' RAM copies count against the budget).
    held: u64,
}

fn patches(workflow: &Workflow, models: &[ModelMeta]) -> Patches {
    let mut most = Patches::default();
    for step in &workflow.steps {
        let Op::Patch { model, lora, .. } = step.op else {
            continue;
        };
        let (m, l) = (&models[model], &models[lora]);
        for pair in &l.lora {
            let factors = l.tensors[pair.down].len + l.tensors[pair.up].len;
            let weight = m.index_of(&pair.target).map_or(0, |i| m.tensors[i].len);
            if factors > most.factors {
                most.factors = factors;
                most.pair = format!("{}` of `{}", pair.target, l.name);
            }
            most.held = most.held.max(weight + 2 * factors);
        }
    }
    most
}

/// The overhead term of a capped run: [`BASE_OVERHEAD`], the store's transfer buffers for the
/// largest tensor and this command's own hashing and patching buffers.
pub(crate) fn overhead(workflow: &Workflow, models: &[ModelMeta]) -> u64 {
    let chunk = chunk_len(workflow.device.cuda);
    let largest_len = largest(models).map_or(0, |(_, _, len)| len);
    BASE_OVERHEAD
        + lowtide::scratch_bytes(largest_len, chunk)
        + CHUNK as u64
        + patches(workflow, models).held
}

/// The least RAM budget lowtide runs the workflow with: both factors of its largest LoRA
/// pair, which a patch reads at once, and never under [`MIN_BUDGET`].
pub(crate) fn least_budget(workflow: &Workflow, models: &[ModelMeta]) -> u64 {
    patches(workflow, models).factors.max(MIN_BUDGET)
}

/// Checks that every tensor fits the device and, under a cap, that the configuration fits
/// it. Returns the terms (with the RAM budget to use) when a cap is set.
pub(crate) fn check(workflow: &Workflow, models: &[ModelMeta]) -> anyhow::Result<Option<Fit>> {
    let capacity = workflow.device.capacity;
    if let Some((model, tensor, len)) = largest(models)
        && len > capacity
    {
        bail!(
            "{}: tensor `{tensor}` of model `{model}` is {} ({len} bytes), larger than the \
             device's capacity of {} ({capacity} bytes): it could never be computed on",
            workflow.path.display(),
            ByteSize(len),
            ByteSize(capacity)
        );
    }
    if !workflow.device.cuda {
        let available = lowtide::MemoryReading::now().available;
        if capacity > available {
            bail!(
                "{}: device.capacity {} ({capacity} bytes) is more than the {} ({available} bytes) \
                 of memory available: the simulated device lives in this process's memory",
                workflow.path.display(),
                ByteSize(capacity),
                ByteSize(available)
            );
        }
    }
    check_cap(workflow, models)
}

/// The cap's part of [`check`], which depends on nothing but the workflow and its models.
pub(crate) fn check_cap(workflow: &Workflow, models: &[ModelMeta]) -> anyhow::Result<Option<Fit>> {
    let Some(cap) = workflow.limits.cap else {
        return Ok(None);
    };
    let patches = patches(workflow, models);
    let overhead = overhead(workflow, models);
    let capacity = workflow.device.capacity;
    let device = if workflow.device.cuda { 0 } else { capacity };
    let reserve = workflow.limits.reserve_ram;
    let fixed = device.saturating_add(reserve).saturating_add(overhead);
    let ram_budget = match workflow.limits.ram_budget {
        Some(budget) => budget,
        // What the cap leaves, so that the sum fits by construction.
        None => cap.saturating_sub(fixed),
    };
    // Patching reads both factors of a pair into RAM copies at once.
    let (pair, factors) = (patches.pair, patches.factors);
    let least = least_budget(workflow, models);
    if ram_budget < least {
        let what = if factors >= MIN_BUDGET {
            format!("the LoRA factors of `{pair}`, which a patch reads at once")
        } else {
            "the least lowtide runs with".to_owned()
        };
        let left = if workflow.limits.ram_budget.is_none() {
            let at_least = fixed.saturating_add(least);
            format!(
                " (what the cap of {} leaves after the device {}, the reserve {} and the overhead \
                 {}; the smallest cap that works is {} ({at_least} bytes))",
                ByteSize(cap),
                ByteSize(device),
                ByteSize(reserve),
                ByteSize(overhead),
                ByteSize(at_least)
            )
        } else {
            String::new()
        };
        bail!(
            "{}: a RAM budget of {}{left} is under the {} ({least} bytes) of {what}",
            workflow.path.display(),
            ByteSize(ram_budget),
            ByteSize(least),
        );
    }
    let fit = Fit {
        device,
        ram_budget,
        reserve,
        overhead,
    };
    if fit.total() > cap {
        let show = |bytes: u64| format!("{} ({bytes} bytes)", ByteSize(bytes));
        bail!(
            "{}: the configuration does not fit its cap of {}: device memory {} + RAM budget \
             {} + reserve {} + overhead {} (process {}, transfer buffers and this command's \
             hashing and patching buffers) = {}; raise `limits.cap` or lower the others",
            workflow.path.display(),
            show(cap),
            ByteSize(device),
            ByteSize(ram_budget),
            ByteSize(reserve),
            ByteSize(overhead),
            ByteSize(BASE_OVERHEAD),
            show(fit.total())
        );
    }
    Ok(Some(fit))
}

//! Runs a workflow with one strategy in this process and reports per-step figures; the
//! reports that `--compare` gathers from its children.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use lowtide::ByteSize;
use lowtide_testkit::ProcMemory;
use serde::{Deserialize, Serialize};

use super::catalog::{self, ModelMeta};
use super::strategy::{Backend, ClassicBackend, Figures, LowtideBackend, Strategy};
use super::{Op, Workflow};

/// The figures of one step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StepReport {
    pub(crate) step: String,
    pub(crate) line: usize,
    pub(crate) wall_s: f64,
    pub(crate) bytes_read: u64,
    pub(crate) bytes_written: u64,
    pub(crate) bytes_restored: u64,
    pub(crate) evictions: u64,
    pub(crate) stall_s: f64,
    /// Highest anonymous resident memory of the process seen during the step.
    pub(crate) peak_anon_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) digest: Option<String>,
}

/// The result of one strategy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunReport {
    pub(crate) strategy: String,
    /// `ok`, `oom-killed` or `error`.
    pub(crate) status: String,
    pub(crate) wall_s: f64,
    pub(crate) bytes_read: u64,
    pub(crate) bytes_written: u64,
    pub(crate) bytes_restored: u64,
    /// Highest anonymous resident memory of the process (sampled `RssAnon`, including the
    /// simulated device's memory, which lives in the process).
    pub(crate) peak_anon_bytes: u64,
    /// Peak of the host bytes the strategy itself held (lowtide: the store's accounted peak).
    pub(crate) held_peak_bytes: u64,
    /// The process's peak resident set (`VmHWM`: anonymous and file pages).
    pub(crate) vm_hwm_bytes: u64,
    pub(crate) evictions: u64,
    pub(crate) stall_s: f64,
    pub(crate) output_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    pub(crate) steps: Vec<StepReport>,
}

impl RunReport {
    /// A run that produced no report of its own (killed, or failed before it could report).
    pub(crate) fn failed(strategy: Strategy, status: &str, wall_s: f64, error: String) -> Self {
        Self {
            strategy: strategy.name().to_owned(),
            status: status.to_owned(),
            wall_s,
            bytes_read: 0,
            bytes_written: 0,
            bytes_restored: 0,
            peak_anon_bytes: 0,
            held_peak_bytes: 0,
            vm_hwm_bytes: 0,
            evictions: 0,
            stall_s: 0.0,
            output_digest: None,
            error: Some(error),
            steps: Vec::new(),
        }
    }
}

/// What `--json` prints.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Output {
    pub(crate) cap_bytes: u64,
    pub(crate) model_bytes: u64,
    /// How the cap was applied: `cgroup v1`, `cgroup v2`, or why it was not enforced.
    pub(crate) cap_enforced: Option<String>,
    pub(crate) runs: Vec<RunReport>,
}

/// Samples the process's `RssAnon` every few milliseconds: the overall and the current step's
/// peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    step_peak: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let step_peak = Arc::new(AtomicU64::new(0));
        let (s, p, sp) = (Arc::clone(&stop), Arc::clone(&peak), Arc::clone(&step_peak));
        let thread = std::thread::Builder::new()
            .name("lowtide-rss".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    sample(&p, &sp);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .ok();
        Self {
            stop,
            peak,
            step_peak,
            thread,
        }
    }

    /// Starts a new step; returns the peak of the one before.
    fn next_step(&self) -> u64 {
        sample(&self.peak, &self.step_peak);
        let now = ProcMemory::read().map_or(0, |m| m.rss_anon);
        self.step_peak.swap(now, Ordering::Relaxed)
    }

    fn peak(&self) -> u64 {
        sample(&self.peak, &self.step_peak);
        self.peak.load(Ordering::Relaxed)
    }
}

fn sample(peak: &AtomicU64, step_peak: &AtomicU64) {
    if let Some(memory) = ProcMemory::read() {
        peak.fetch_max(memory.rss_anon, Ordering::Relaxed);
        step_peak.fetch_max(memory.rss_anon, Ordering::Relaxed);
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Resolves the workflow's models, generating synthetic ones (with a progress bar) if needed,
/// and checks that its patches fit their models and its configuration its cap. Under a cap
/// without a RAM budget of its own, the workflow gets the budget the cap leaves.
pub(crate) fn prepare(workflow: &mut Workflow) -> anyhow::Result<Vec<ModelMeta>> {
    let mut bar: Option<(String, ProgressBar)> = None;
    let models = catalog::resolve(workflow, &mut |name, done, total| {
        if bar.as_ref().is_none_or(|(n, _)| n != name) {
            let b = ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "generating {prefix:12} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(name.to_owned());
            bar = Some((name.to_owned(), b));
        }
        if let Some((_, b)) = &bar {
            b.set_position(done);
            if done >= total {
                b.finish();
            }
        }
    })?;
    catalog::check_patches(workflow, &models)?;
    if let Some(fit) = super::fit::check(workflow, &models)? {
        workflow.limits.ram_budget = Some(fit.ram_budget);
    }
    Ok(models)
}

/// Runs every step of `workflow` with one strategy in this process.
pub(crate) fn run_one(
    workflow: &Workflow,
    models: Vec<ModelMeta>,
    strategy: Strategy,
    show_progress: bool,
) -> RunReport {
    let started = Instant::now();
    let sampler = Sampler::start();
    let mut steps = Vec::new();
    let result = execute(
        workflow,
        models,
        strategy,
        show_progress,
        &sampler,
        &mut steps,
    );
    let wall_s = started.elapsed().as_secs_f64();
    let peak_anon_bytes = sampler.peak();
    let vm_hwm_bytes = ProcMemory::read().map_or(0, |m| m.vm_hwm);
    match result {
        Ok((figures, digest)) => RunReport {
            strategy: strategy.name().to_owned(),
            status: "ok".to_owned(),
            wall_s,
            bytes_read: figures.bytes_read,
            bytes_written: figures.bytes_written,
            bytes_restored: figures.bytes_restored,
            peak_anon_bytes,
            held_peak_bytes: figures.held_peak,
            vm_hwm_bytes,
            evictions: figures.evictions,
            stall_s: figures.stall.as_secs_f64(),
            output_digest: Some(format!("{digest:016x}")),
            error: None,
            steps,
        },
        Err(err) => {
            let mut report = RunReport::failed(strategy, "error", wall_s, crate::one_line(&err));
            report.peak_anon_bytes = peak_anon_bytes;
            report.vm_hwm_bytes = vm_hwm_bytes;
            report.steps = steps;
            report
        }
    }
}

fn execute(
    workflow: &Workflow,
    models: Vec<ModelMeta>,
    strategy: Strategy,
    show_progress: bool,
    sampler: &Sampler,
    steps: &mut Vec<StepReport>,
) -> anyhow::Result<(Figures, u64)> {
    let mut backend: Box<dyn Backend> = match strategy {
        Strategy::Lowtide => Box::new(LowtideBackend::new(workflow, models)?),
        Strategy::SpillAll => Box::new(ClassicBackend::new(workflow, models, true)?),
        Strategy::Ram => Box::new(ClassicBackend::new(workflow, models, false)?),
    };
    let bar = if show_progress {
        ProgressBar::new(workflow.steps.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(strategy.name());
    let mut output = xxhash_rust::xxh3::Xxh3::new();
    for step in &workflow.steps {
        let what = step.op.describe(&workflow.models);
        bar.set_message(what.clone());
        let before = backend.figures();
        sampler.next_step();
        let start = Instant::now();
        let mut digest = None;
        let at = || format!("{}:{}: {what}", workflow.path.display(), step.line);
        match step.op {
            Op::Load { model, budget } => backend.load(model, budget),
            Op::Compute { model } => backend.compute(model).map(|d| {
                output.update(&d.to_le_bytes());
                digest = Some(format!("{d:016x}"));
            }),
            Op::Patch {
                model,
                lora,
                strength,
            } => backend.patch(model, lora, strength),
            Op::Unpatch { model } => backend.unpatch(model),
            Op::Unload { model, bytes } => backend.unload(model, bytes),
            Op::Prefetch { model } => backend.prefetch(model),
        }
        .with_context(at)?;
        let after = backend.figures();
        steps.push(StepReport {
            step: what,
            line: step.line,
            wall_s: start.elapsed().as_secs_f64(),
            bytes_read: after.bytes_read - before.bytes_read,
            bytes_written: after.bytes_written - before.bytes_written,
            bytes_restored: after.bytes_restored - before.bytes_restored,
            evictions: after.evictions - before.evictions,
            stall_s: after.stall.saturating_sub(before.stall).as_secs_f64(),
            peak_anon_bytes: sampler.next_step(),
            digest,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((backend.figures(), output.digest()))
}

/// The cap to compare against: the workflow's, else the machine's memory.
pub(crate) fn cap_of(workflow: &Workflow) -> u64 {
    workflow.limits.cap.unwrap_or_else(|| {
        let reading = lowtide::MemoryReading::now();
        reading.mem_available
    })
}

/// `bytes` as a human size (`3.14 GiB`).
pub(crate) fn gib(bytes: u64) -> String {
    ByteSize(bytes).to_string()
}

//! `lowtide run`: runs a workflow with one strategy (or all three with `--compare`) and prints
//! per-step figures, a comparison table or JSON.

use std::path::PathBuf;

use lowtide::ByteSize;

use crate::workflow::catalog::ModelMeta;
use crate::workflow::compare;
use crate::workflow::runner::{self, Output, RunReport};
use crate::workflow::{Op, Strategy, Workflow};

/// Arguments of `lowtide run`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The workflow file (TOML).
    workflow: PathBuf,
    /// How weights are managed.
    #[arg(long, value_enum, default_value_t = Strategy::Lowtide)]
    strategy: Strategy,
    /// Run all three strategies, each in a child process (under a memory cgroup with the
    /// workflow's cap where the machine allows), and print one table.
    #[arg(long)]
    compare: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Internal to `--compare`: the memory cgroup directory its child moves itself into
    /// first (refused in any other process).
    #[arg(long, hide = true)]
    cgroup: Option<PathBuf>,
}

impl Args {
    /// `run WORKFLOW --compare [--json]`.
    pub(crate) fn compare(workflow: PathBuf, json: bool) -> Self {
        Self {
            workflow,
            strategy: Strategy::Lowtide,
            compare: true,
            json,
            cgroup: None,
        }
    }
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    // First of all in a `--compare` child: die with the parent.
    let parent = compare::as_child()?;
    if let Some(dir) = &args.cgroup {
        compare::enter_cgroup(dir, parent)?;
    }
    let mut workflow = Workflow::load(&args.workflow)?;
    let models = runner::prepare(&mut workflow)?;
    let model_bytes = models.iter().map(ModelMeta::bytes).sum();
    let output = if args.compare {
        compare::compare(&args.workflow, &workflow, model_bytes, args.json)?
    } else {
        let report = runner::run_one(&workflow, models, args.strategy, !args.json);
        Output {
            cap_bytes: runner::cap_of(&workflow),
            model_bytes,
            cap_enforced: args.cgroup.as_ref().map(|_| "cgroup".to_owned()),
            runs: vec![report],
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else if args.compare {
        let patches = workflow
            .steps
            .iter()
            .any(|step| matches!(step.op, Op::Patch { .. }));
        compare::print_table(&output, patches);
    } else {
        print_steps(&output.runs[0]);
    }
    if args.compare {
        // The table (or JSON) shows every run; the exit status says whether the comparison
        // did what was asked.
        return compare::verdict(&output).map_err(|why| anyhow::anyhow!("{why}"));
    }
    match output.runs.iter().find(|r| r.status != "ok") {
        Some(report) => anyhow::bail!("{}", report.error.clone().unwrap_or_default()),
        None => Ok(()),
    }
}

fn print_steps(report: &RunReport) {
    println!(
        "{:>4}  {:<34} {:>8} {:>10} {:>10} {:>10} {:>10} {:>5} {:>7}",
        "line", "step", "wall s", "read", "written", "restored", "peak anon", "evict", "stall s"
    );
    for s in &report.steps {
        println!(
            "{:>4}  {:<34} {:>8.2} {:>10} {:>10} {:>10} {:>10} {:>5} {:>7.2}",
            s.line,
            s.step,
            s.wall_s,
            ByteSize(s.bytes_read).to_string(),
            ByteSize(s.bytes_written).to_string(),
            ByteSize(s.bytes_restored).to_string(),
            ByteSize(s.peak_anon_bytes).to_string(),
            s.evictions,
            s.stall_s
        );
    }
    println!(
        "{}: {} in {:.1} s; read {}, written {}, restored {}; peak anon {} (process RssAnon, simulated device included), held peak {}, VmHWM {}; {} evictions; {:.2} s stalled; digest {}",
        report.strategy,
        report.status,
        report.wall_s,
        ByteSize(report.bytes_read),
        ByteSize(report.bytes_written),
        ByteSize(report.bytes_restored),
        ByteSize(report.peak_anon_bytes),
        ByteSize(report.held_peak_bytes),
        ByteSize(report.vm_hwm_bytes),
        report.evictions,
        report.stall_s,
        report.output_digest.as_deref().unwrap_or("-")
    );
}

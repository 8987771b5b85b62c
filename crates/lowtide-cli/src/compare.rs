//! `lowtide run --compare`: each strategy in a child process, under a memory cgroup whose hard
//! limit is the workflow's cap where the machine allows (root and a memory controller), so
//! that a strategy over the cap is really OOM-killed and reported as such.

use std::fs;
use std::io::Read as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use lowtide::{ByteSize, CgroupMemory, CgroupVersion};

use crate::run::{Output, RunReport, cap_of, gib};
use crate::strategy::Strategy;
use crate::workflow::Workflow;

/// A memory cgroup made for one child; removed on drop.
struct Cgroup {
    dir: PathBuf,
    version: CgroupVersion,
}

impl Cgroup {
    /// Creates `lowtide-<pid>-<name>` under the process's own memory cgroup with a hard limit
    /// of `cap` bytes and no swap; the error says why it cannot.
    fn create(name: &str, cap: u64) -> Result<Self, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root".to_owned());
        }
        let own = CgroupMemory::detect().ok_or("no memory cgroup controller found")?;
        let dir = own
            .dir
            .join(format!("lowtide-{}-{name}", std::process::id()));
        if own.version == CgroupVersion::V2 {
            // Children get the memory controller only where the parent delegates it.
            let control = own.dir.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&control).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == "memory") {
                fs::write(&control, "+memory").map_err(|err| {
                    format!(
                        "cannot enable the memory controller in {}: {err}",
                        control.display()
                    )
                })?;
            }
        }
        fs::create_dir(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        let cgroup = Self {
            dir,
            version: own.version,
        };
        let write = |file: &str, value: &str| {
            let path = cgroup.dir.join(file);
            fs::write(&path, value).map_err(|err| format!("cannot write {}: {err}", path.display()))
        };
        match own.version {
            CgroupVersion::V1 => {
                write("memory.limit_in_bytes", &cap.to_string())?;
                if cgroup.dir.join("memory.memsw.limit_in_bytes").exists() {
                    write("memory.memsw.limit_in_bytes", &cap.to_string())?;
                }
            }
            CgroupVersion::V2 => {
                write("memory.max", &cap.to_string())?;
                if cgroup.dir.join("memory.swap.max").exists() {
                    write("memory.swap.max", "0")?;
                }
            }
        }
        Ok(cgroup)
    }

    fn label(&self) -> &'static str {
        match self.version {
            CgroupVersion::V1 => "cgroup v1 memory.limit_in_bytes",
            CgroupVersion::V2 => "cgroup v2 memory.max",
        }
    }

    /// How many times the kernel's OOM killer acted in this cgroup.
    fn oom_kills(&self) -> u64 {
        let file = match self.version {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        };
        fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The child's exit can take a moment to leave the cgroup.
        for _ in 0..100 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("lowtide: warning: could not remove {}", self.dir.display());
    }
}

/// Moves this process into `dir` (a child of `--compare`, before it allocates anything).
pub(crate) fn enter_cgroup(dir: &Path) -> anyhow::Result<()> {
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("cannot move into the cgroup {}", dir.display()))
}

/// Runs every strategy in a child process and gathers their reports.
pub(crate) fn compare(
    path: &Path,
    workflow: &Workflow,
    model_bytes: u64,
    quiet: bool,
) -> anyhow::Result<Output> {
    let cap = cap_of(workflow);
    let exe = std::env::current_exe().context("cannot find the lowtide executable")?;
    let mut runs = Vec::new();
    let mut enforced: Option<String> = None;
    for strategy in Strategy::ALL {
        let cgroup = if workflow.limits.cap.is_some() {
            Cgroup::create(strategy.name(), cap)
        } else {
            Err("the workflow sets no cap".to_owned())
        };
        enforced = Some(match &cgroup {
            Ok(c) => c.label().to_owned(),
            Err(why) => format!("not enforced: {why}"),
        });
        if !quiet {
            eprintln!("running {} ...", strategy.name());
        }
        let mut command = Command::new(&exe);
        command
            .arg("run")
            .arg(path)
            .args(["--strategy", strategy.name(), "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            });
        if let Ok(c) = &cgroup {
            command.arg("--cgroup").arg(&c.dir);
        }
        let start = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let mut stdout = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        let status = child.wait()?;
        let wall_s = start.elapsed().as_secs_f64();
        let parsed: Option<Output> = serde_json::from_str(&stdout).ok();
        let report = match (
            parsed.and_then(|o| o.runs.into_iter().next()),
            status.signal(),
        ) {
            (Some(report), _) => report,
            (None, Some(9)) => {
                let kills = cgroup.as_ref().map_or(0, Cgroup::oom_kills);
                let why = if kills > 0 {
                    format!("killed by the OOM killer at the {} cap", ByteSize(cap))
                } else {
                    "killed by SIGKILL".to_owned()
                };
                RunReport::failed(strategy, "oom-killed", wall_s, why)
            }
            (None, _) => RunReport::failed(
                strategy,
                "error",
                wall_s,
                format!("the child exited with {status} without a report"),
            ),
        };
        runs.push(report);
    }
    Ok(Output {
        cap_bytes: cap,
        model_bytes,
        cap_enforced: enforced,
        runs,
    })
}

/// Checks that every finished run computed the same bytes.
pub(crate) fn digests_agree(output: &Output) -> bool {
    let mut digests = output
        .runs
        .iter()
        .filter(|r| r.status == "ok")
        .filter_map(|r| r.output_digest.as_deref());
    let first = digests.next();
    digests.all(|d| Some(d) == first)
}

/// The comparison table and one sentence saying what it shows.
pub(crate) fn print_table(output: &Output) {
    println!(
        "{:<10} {:<11} {:>7} {:>11} {:>11} {:>11} {:>11} {:>7} {:>6}  digest",
        "strategy",
        "status",
        "wall s",
        "read",
        "written",
        "restored",
        "peak anon",
        "of cap",
        "evict"
    );
    for r in &output.runs {
        let of_cap = if r.peak_anon_bytes > 0 && output.cap_bytes > 0 {
            format!(
                "{:.0}%",
                100.0 * r.peak_anon_bytes as f64 / output.cap_bytes as f64
            )
        } else {
            "-".to_owned()
        };
        let show = |bytes: u64| {
            if r.status == "ok" {
                gib(bytes)
            } else {
                "-".to_owned()
            }
        };
        println!(
            "{:<10} {:<11} {:>7.1} {:>11} {:>11} {:>11} {:>11} {:>7} {:>6}  {}",
            r.strategy,
            r.status,
            r.wall_s,
            show(r.bytes_read),
            show(r.bytes_written),
            show(r.bytes_restored),
            if r.peak_anon_bytes > 0 {
                gib(r.peak_anon_bytes)
            } else {
                "-".to_owned()
            },
            of_cap,
            r.evictions,
            r.output_digest.as_deref().unwrap_or("-"),
        );
        if let Some(error) = &r.error {
            println!("{:<10} {error}", "");
        }
    }
    println!(
        "cap {} ({}); models {}; peak anon = the process's RssAnon, simulated device memory included.",
        gib(output.cap_bytes),
        output.cap_enforced.as_deref().unwrap_or("not enforced"),
        gib(output.model_bytes)
    );
    if !digests_agree(output) {
        println!("WARNING: the strategies that finished computed different outputs.");
    }
    println!("{}", conclusion(output));
}

/// One sentence on what the comparison shows.
pub(crate) fn conclusion(output: &Output) -> String {
    let find = |name: &str| output.runs.iter().find(|r| r.strategy == name);
    let (Some(lt), Some(sa), Some(ram)) = (find("lowtide"), find("spill-all"), find("ram")) else {
        return String::new();
    };
    let lowtide = if lt.status == "ok" {
        format!(
            "lowtide finished at {} peak, writing {} (only patched weights; clean ones were dropped and re-read)",
            gib(lt.peak_anon_bytes),
            gib(lt.bytes_written)
        )
    } else {
        format!("lowtide {}", lt.status)
    };
    let spill = if sa.status == "ok" {
        format!("spill-all wrote {} to disk", gib(sa.bytes_written))
    } else {
        format!("spill-all was {}", sa.status)
    };
    let ram = if ram.status == "ok" {
        format!("ram peaked at {}", gib(ram.peak_anon_bytes))
    } else {
        format!("ram was {}", ram.status)
    };
    format!(
        "Under a {} cap, {lowtide}; {spill}; {ram}.",
        gib(output.cap_bytes)
    )
}

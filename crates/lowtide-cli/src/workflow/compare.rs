//! `lowtide run --compare`: each strategy in a child process, under a memory cgroup whose hard
//! limit is the workflow's cap where the machine allows (root and a memory controller), so
//! that a strategy over the cap is really OOM-killed and reported as such.
//!
//! Nothing outlives the comparison: each child asks the kernel to kill it when its parent
//! dies (`PR_SET_PDEATHSIG`), SIGTERM, SIGINT and SIGHUP in the parent kill the running child
//! and remove its cgroup before the parent dies of the signal, and each comparison first
//! removes the empty `lowtide-<pid>-*` cgroups of parents that are gone (killed with
//! SIGKILL, which nothing can catch).

use std::ffi::OsStr;
use std::fs;
use std::io::Read as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use lowtide::{ByteSize, CgroupMemory, CgroupVersion};
use rustix::process::{Pid, Signal};

use super::Workflow;
use super::runner::{Output, RunReport, cap_of, gib};
use super::strategy::Strategy;

/// The environment variable through which the parent gives each child its pid: the child
/// checks it against its actual parent, and only such a child may use `--cgroup`.
const PARENT_ENV: &str = "LOWTIDE_COMPARE_PARENT";

/// The cgroup directory name of a child of the parent `pid`: `lowtide-<pid>-<strategy>`.
fn cgroup_name(pid: u32, strategy: &str) -> String {
    format!("lowtide-{pid}-{strategy}")
}

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
        remove_abandoned(&own.dir);
        let dir = own.dir.join(cgroup_name(std::process::id(), name));
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
        if !remove_cgroup(&self.dir) {
            log::warn!("could not remove the cgroup {}", self.dir.display());
        }
    }
}

/// Removes a cgroup directory, waiting up to two seconds for its processes to leave (a
/// child's exit can take a moment to leave the cgroup); says whether it is gone.
fn remove_cgroup(dir: &Path) -> bool {
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

/// Removes the `lowtide-<pid>-*` cgroups under `parent` whose comparison is gone: its
/// process no longer exists and no process is left in the cgroup.
fn remove_abandoned(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("lowtide-"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
            .and_then(Pid::from_raw)
        else {
            continue;
        };
        let alive = !matches!(
            rustix::process::test_kill_process(pid),
            Err(rustix::io::Errno::SRCH)
        );
        let dir = entry.path();
        let empty = fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
        if alive || !empty {
            continue;
        }
        match fs::remove_dir(&dir) {
            Ok(()) => log::info!(
                "removed the cgroup {} of a comparison that was killed",
                dir.display()
            ),
            Err(err) => log::warn!(
                "cannot remove the abandoned cgroup {}: {err}",
                dir.display()
            ),
        }
    }
}

/// In a `--compare` child (the parent set [`PARENT_ENV`]): makes the kernel kill this process
/// when its parent dies, then checks that the parent is still the one that started it (it may
/// have died before the request). Returns the parent's pid; `None` in any other process.
pub(crate) fn as_child() -> anyhow::Result<Option<u32>> {
    let Some(value) = std::env::var_os(PARENT_ENV) else {
        return Ok(None);
    };
    // First, so that from here on no parent death goes unnoticed.
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
        .context("cannot ask to die with the `--compare` parent")?;
    let expected = value
        .to_str()
        .and_then(|v| v.parse::<u32>().ok())
        .with_context(|| format!("{PARENT_ENV}={} is not a process id", value.display()))?;
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get().unsigned_abs());
    if parent != expected {
        anyhow::bail!(
            "{PARENT_ENV}={expected} but the parent process is {parent}: the `--compare` run that started this one is gone"
        );
    }
    Ok(Some(expected))
}

/// Moves this process into `dir` (a child of `--compare`, before it allocates anything).
/// `parent` is the pid [`as_child`] checked: only a child of a comparison may move, and only
/// into one of that comparison's cgroups, `lowtide-<parent>-*` under this process's own
/// memory cgroup.
pub(crate) fn enter_cgroup(dir: &Path, parent: Option<u32>) -> anyhow::Result<()> {
    let Some(parent) = parent else {
        anyhow::bail!(
            "--cgroup {} is internal to `lowtide run --compare` and refused here: the cap of a single run is not enforced by a cgroup",
            dir.display()
        );
    };
    let own = CgroupMemory::detect().context("--cgroup: no memory cgroup controller found")?;
    let prefix = cgroup_name(parent, "");
    let named = dir
        .file_name()
        .and_then(OsStr::to_str)
        .is_some_and(|name| name.starts_with(&prefix) && name.len() > prefix.len());
    let canonical = |p: &Path| fs::canonicalize(p).ok();
    let under_own = dir
        .parent()
        .and_then(canonical)
        .is_some_and(|p| Some(p) == canonical(&own.dir));
    if !named || !under_own {
        anyhow::bail!(
            "--cgroup {}: not a cgroup of the `--compare` parent {parent} (expected {}/{prefix}<strategy>)",
            dir.display(),
            own.dir.display()
        );
    }
    fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("cannot move into the cgroup {}", dir.display()))
}

/// The child running now and its cgroup, for the signal handler to clean up.
struct Running {
    child: Option<Pid>,
    cgroup: Option<PathBuf>,
}

static RUNNING: Mutex<Running> = Mutex::new(Running {
    child: None,
    cgroup: None,
});

fn running() -> MutexGuard<'static, Running> {
    RUNNING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// On SIGTERM, SIGINT or SIGHUP: kills the running child, removes its cgroup, and dies of the
/// signal. The lock is held from then on, so no other child starts.
fn handle_signals() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot handle SIGTERM")?;
    std::thread::Builder::new()
        .name("lowtide-signals".into())
        .spawn(move || {
            let Some(signal) = signals.forever().next() else {
                return;
            };
            let running = running();
            if let Some(child) = running.child {
                let _ = rustix::process::kill_process(child, Signal::KILL);
            }
            if let Some(dir) = &running.cgroup
                && !remove_cgroup(dir)
            {
                log::warn!("could not remove the cgroup {}", dir.display());
            }
            let _ = signal_hook::low_level::emulate_default_handler(signal);
            std::process::exit(128 + signal);
        })
        .context("cannot start the signal thread")?;
    Ok(())
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
    handle_signals()?;
    let mut runs = Vec::new();
    let mut enforced: Option<String> = None;
    for strategy in Strategy::ALL {
        // Created and registered under the lock: a signal cleans up all or nothing of it.
        let mut lock = running();
        let cgroup = if workflow.limits.cap.is_some() {
            Cgroup::create(strategy.name(), cap)
        } else {
            Err("the workflow sets no cap".to_owned())
        };
        lock.cgroup = cgroup.as_ref().ok().map(|c| c.dir.clone());
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
            .env(PARENT_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Warnings and errors of the child are the user's to see, in JSON mode too.
            .stderr(Stdio::inherit());
        if let Ok(c) = &cgroup {
            command.arg("--cgroup").arg(&c.dir);
        }
        let start = Instant::now();
        // Children are started by this thread only: PR_SET_PDEATHSIG fires when the thread
        // that forked a child exits, and this one lives as long as the process.
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let pid = Pid::from_child(&child);
        lock.child = Some(pid);
        drop(lock);
        let mut stdout = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        // Waited for without reaping, so that the signal handler never kills a pid reused
        // after the child was reaped.
        let _ = rustix::process::waitid(
            rustix::process::WaitId::Pid(pid),
            rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
        );
        let mut lock = running();
        lock.child = None;
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
        drop(cgroup);
        lock.cgroup = None;
        drop(lock);
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

/// Whether the comparison did what was asked: lowtide finished, and every strategy that
/// finished computed the same output. Otherwise, why not, in one line.
pub(crate) fn verdict(output: &Output) -> Result<(), String> {
    let Some(lowtide) = output.runs.iter().find(|r| r.strategy == "lowtide") else {
        return Err("the comparison has no lowtide run".to_owned());
    };
    if lowtide.status != "ok" {
        let why = lowtide
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(format!(
            "the comparison failed: lowtide did not finish ({}{why})",
            lowtide.status
        ));
    }
    if !digests_agree(output) {
        let digests: Vec<String> = output
            .runs
            .iter()
            .filter(|r| r.status == "ok")
            .map(|r| {
                format!(
                    "{} {}",
                    r.strategy,
                    r.output_digest.as_deref().unwrap_or("-")
                )
            })
            .collect();
        return Err(format!(
            "the comparison failed: the strategies that finished computed different outputs ({})",
            digests.join(", ")
        ));
    }
    Ok(())
}

/// The comparison table and one sentence saying what it shows. `patches`: whether the
/// workflow patches any weights.
pub(crate) fn print_table(output: &Output, patches: bool) {
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
    println!("{}", conclusion(output, patches));
}

/// One sentence on what the comparison shows, from what each strategy did.
pub(crate) fn conclusion(output: &Output, patches: bool) -> String {
    let find = |name: &str| output.runs.iter().find(|r| r.strategy == name);
    let (Some(lt), Some(sa), Some(ram)) = (find("lowtide"), find("spill-all"), find("ram")) else {
        return String::new();
    };
    let lowtide = if lt.status == "ok" {
        // lowtide writes only dirty (patched) weights: clean ones are dropped and re-read.
        let wrote = match (patches, lt.bytes_written) {
            (false, 0) => "wrote nothing (the workflow patches no weights)".to_owned(),
            (true, 0) => {
                "wrote nothing (its patched weights stayed in RAM or on the device)".to_owned()
            }
            (false, written) => format!("wrote {}", gib(written)),
            (true, written) => format!("wrote {} of patched weights", gib(written)),
        };
        format!(
            "lowtide finished at {} peak, read {} from the model files and {wrote}",
            gib(lt.peak_anon_bytes),
            gib(lt.bytes_read),
        )
    } else {
        format!("lowtide was {}", lt.status)
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

#[cfg(test)]
mod tests {
    use super::{conclusion, verdict};
    use crate::workflow::runner::{Output, RunReport};
    use crate::workflow::strategy::Strategy;

    fn ok(strategy: Strategy, digest: &str, written: u64) -> RunReport {
        let mut report = RunReport::failed(strategy, "ok", 1.0, String::new());
        report.error = None;
        report.output_digest = Some(digest.to_owned());
        report.bytes_written = written;
        report
    }

    fn output(runs: Vec<RunReport>) -> Output {
        Output {
            cap_bytes: 1 << 30,
            model_bytes: 1 << 30,
            cap_enforced: None,
            runs,
        }
    }

    #[test]
    fn a_comparison_succeeds_only_when_lowtide_finished_and_outputs_agree() {
        let killed = |s| RunReport::failed(s, "oom-killed", 1.0, "killed".to_owned());
        let all_ok = output(vec![
            ok(Strategy::Lowtide, "a", 0),
            ok(Strategy::SpillAll, "a", 5),
            killed(Strategy::Ram),
        ]);
        assert_eq!(verdict(&all_ok), Ok(()));
        let none = output(Strategy::ALL.into_iter().map(killed).collect());
        let why = verdict(&none).unwrap_err();
        assert!(
            why.contains("lowtide did not finish (oom-killed: killed)"),
            "{why}"
        );
        let differ = output(vec![
            ok(Strategy::Lowtide, "a", 0),
            ok(Strategy::SpillAll, "b", 0),
            ok(Strategy::Ram, "a", 0),
        ]);
        let why = verdict(&differ).unwrap_err();
        assert!(why.contains("lowtide a, spill-all b, ram a"), "{why}");
    }

    #[test]
    fn the_conclusion_says_what_was_written() {
        let runs = |written| {
            output(vec![
                ok(Strategy::Lowtide, "a", written),
                ok(Strategy::SpillAll, "a", 5),
                ok(Strategy::Ram, "a", 0),
            ])
        };
        let text = conclusion(&runs(0), false);
        assert!(
            text.contains("wrote nothing (the workflow patches no weights)"),
            "{text}"
        );
        let text = conclusion(&runs(0), true);
        assert!(text.contains("patched weights stayed in RAM"), "{text}");
        let text = conclusion(&runs(2 << 20), true);
        assert!(text.contains("wrote 2.00 MiB of patched weights"), "{text}");
    }
}

//! Nothing outlives a run that is killed, and runs that meet do not break each other: the
//! children of a `lowtide run --compare` killed with SIGKILL or SIGTERM die with it and leave
//! no cgroup; a run killed while generating a synthetic model leaves no file; two runs
//! generating the same model at once both succeed. The `--compare` tests need root and a
//! memory cgroup controller; elsewhere they say why they are skipped.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{json_of, lowtide, text};
use rustix::process::{Pid, Signal};

/// A compare run whose lowtide child takes many seconds: the UNet (about 20 MB) crosses a
/// simulated device link of 4 MB/s.
const SLOW: &str = r#"cache_dir = "models"
[device]
capacity = "64MiB"
bandwidth = "4MB"
[limits]
cap = "2GiB"
ram_budget = "16MiB"
[models.unet]
synthetic = "unet"
scale = 0.02
[[steps]]
op = "load"
model = "unet"
[[steps]]
op = "compute"
model = "unet"
"#;

/// A compare run of a second or so, under a cap (so with cgroups).
const QUICK: &str = r#"cache_dir = "models"
[device]
capacity = "8MiB"
[limits]
cap = "2GiB"
ram_budget = "4MiB"
[models.te]
synthetic = "text_encoder"
scale = 0.01
[[steps]]
op = "load"
model = "te"
[[steps]]
op = "compute"
model = "te"
"#;

/// One run that generates a 90 MB synthetic UNet.
const GENERATE: &str = r#"cache_dir = "models"
[device]
capacity = "256MiB"
[limits]
ram_budget = "64MiB"
[models.unet]
synthetic = "unet"
scale = 0.1
[[steps]]
op = "load"
model = "unet"
[[steps]]
op = "compute"
model = "unet"
"#;

fn workflow(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn start(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lowtide")
}

/// The memory cgroup `--compare` makes its children's cgroups in, or why it makes none.
fn compare_cgroups() -> Result<PathBuf, String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root".to_owned());
    }
    lowtide::CgroupMemory::detect()
        .map(|cgroup| cgroup.dir)
        .ok_or_else(|| "no memory cgroup controller".to_owned())
}

/// The `lowtide-<pid>-*` cgroups left under `dir`.
fn cgroups_of(dir: &Path, pid: u32) -> Vec<String> {
    let prefix = format!("lowtide-{pid}-");
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(&prefix))
        .collect()
}

/// Whether `pid` is gone (a zombie waiting for its new parent to reap it counts as gone).
fn gone(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        matches!(state, Some(Some('Z' | 'X')))
    })
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Starts a slow comparison, waits until its lowtide child runs in its cgroup, sends the
/// parent `signal`, and checks that the parent died of it and the child within seconds;
/// returns the parent's pid.
fn kill_a_comparison(dir: &Path, cgroups: &Path, signal: Signal) -> u32 {
    let slow = workflow(dir, "slow.toml", SLOW);
    let mut parent = start(&["run", &slow, "--compare", "--json"]);
    let ppid = parent.id();
    let procs = cgroups.join(format!("lowtide-{ppid}-lowtide/cgroup.procs"));
    let mut child = 0;
    wait_until("the child in its cgroup", Duration::from_secs(60), || {
        child = fs::read_to_string(&procs)
            .ok()
            .and_then(|p| p.lines().next()?.trim().parse().ok())
            .unwrap_or(0);
        child != 0
    });
    rustix::process::kill_process(Pid::from_raw(ppid.cast_signed()).unwrap(), signal).unwrap();
    let status = parent.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(signal.as_raw()),
        "the parent dies of the signal: {status}"
    );
    wait_until("the child's death", Duration::from_secs(5), || gone(child));
    ppid
}

#[test]
fn a_comparison_killed_with_sigkill_leaves_no_child_and_no_cgroup() {
    let cgroups = match compare_cgroups() {
        Ok(dir) => dir,
        Err(why) => return eprintln!("skipped: the --compare kill test needs cgroups: {why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let ppid = kill_a_comparison(dir.path(), &cgroups, Signal::KILL);
    // SIGKILL cannot be caught: the next comparison removes the dead one's cgroup.
    let quick = workflow(dir.path(), "quick.toml", QUICK);
    let out = json_of(&lowtide(&["run", &quick, "--compare", "--json"]));
    assert!(
        out["cap_enforced"].as_str().unwrap().starts_with("cgroup"),
        "{out}"
    );
    assert_eq!(cgroups_of(&cgroups, ppid), Vec::<String>::new());
}

#[test]
fn a_comparison_killed_with_sigterm_removes_its_child_and_cgroup_at_once() {
    let cgroups = match compare_cgroups() {
        Ok(dir) => dir,
        Err(why) => return eprintln!("skipped: the --compare kill test needs cgroups: {why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let ppid = kill_a_comparison(dir.path(), &cgroups, Signal::TERM);
    assert_eq!(cgroups_of(&cgroups, ppid), Vec::<String>::new());
}

#[test]
fn the_hidden_cgroup_flag_is_refused_outside_a_comparison() {
    let dir = tempfile::tempdir().unwrap();
    let quick = workflow(dir.path(), "quick.toml", QUICK);
    let target = dir.path().join("x");
    fs::create_dir(&target).unwrap();
    let target = target.to_str().unwrap();
    let refused = |out: &std::process::Output, why: &str| {
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert!(stderr.starts_with("lowtide: error: "), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
        assert!(
            fs::read_dir(target).unwrap().next().is_none(),
            "nothing is written into {target}"
        );
    };
    // A user passing it.
    let out = lowtide(&["run", &quick, "--cgroup", target]);
    refused(&out, "internal to `lowtide run --compare`");
    // With the parent marker naming this (real) parent, but not one of its cgroups.
    let out = Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(["run", &quick, "--cgroup", target])
        .env("LOWTIDE_COMPARE_PARENT", std::process::id().to_string())
        .output()
        .unwrap();
    let why = if lowtide::CgroupMemory::detect().is_some() {
        "not a cgroup of the `--compare` parent"
    } else {
        "no memory cgroup controller"
    };
    refused(&out, why);
    // A marker that names another parent.
    let out = Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(["run", &quick, "--cgroup", target])
        .env("LOWTIDE_COMPARE_PARENT", "1")
        .output()
        .unwrap();
    refused(&out, "the `--compare` run that started this one is gone");
}

/// The files in `dir`, each of which must be a complete model.
fn complete_models(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        assert!(
            lowtide::ModelFiles::open(entry.path()).is_ok(),
            "{name} in the cache is not a complete model"
        );
        names.push(name);
    }
    names.sort();
    names
}

#[test]
fn a_run_killed_while_generating_a_model_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let generate = workflow(dir.path(), "generate.toml", GENERATE);
    let cache = dir.path().join("models");
    let mut run = start(&["run", &generate, "--json"]);
    let pid = run.id();
    // Killed while it holds the file it is writing (unnamed, or a temporary name).
    let writing = || {
        fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten()
                .any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(&cache)))
        })
    };
    wait_until("the model being written", Duration::from_secs(30), writing);
    rustix::process::kill_process(Pid::from_raw(pid.cast_signed()).unwrap(), Signal::KILL).unwrap();
    run.wait().unwrap();
    assert_eq!(complete_models(&cache), Vec::<String>::new());
    // The next run generates it and finishes.
    let out = json_of(&lowtide(&["run", &generate, "--json"]));
    assert_eq!(out["runs"][0]["status"], "ok");
    assert_eq!(complete_models(&cache), ["unet-x0.1-s0-v2.safetensors"]);
}

#[test]
fn two_runs_generating_the_same_model_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let generate = workflow(dir.path(), "generate.toml", GENERATE);
    let runs: Vec<Child> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_lowtide"))
                .args(["run", &generate, "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let digests: Vec<String> = runs
        .into_iter()
        .map(|run| {
            let out = json_of(&run.wait_with_output().unwrap());
            assert_eq!(out["runs"][0]["status"], "ok", "{out}");
            out["runs"][0]["output_digest"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
    assert_eq!(
        complete_models(&dir.path().join("models")),
        ["unet-x0.1-s0-v2.safetensors"]
    );
}

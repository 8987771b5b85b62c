//! Outcomes are said, not swallowed: the library's warnings reach stderr (and `RUST_LOG`
//! controls them), a comparison whose lowtide run was OOM-killed exits 1 with the reason,
//! impossible `demo` arguments are refused by name, and the comparison's summary says what
//! was written.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::{json_of, lowtide, text};

/// A small run whose spill directory is under `/proc`, where no file can be created.
const PROC_SPILL: &str = r#"cache_dir = "models"
[device]
capacity = "8MiB"
[limits]
cap = "2GiB"
ram_budget = "4MiB"
spill_dir = "/proc/self"
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

/// Settings that look as if they fit (a 4 MiB device and a 1 MiB budget under a 6 MiB cap),
/// but leave no room for the process itself: the comparison is refused before anything runs
/// (a run that did not finish exits 1 as well: `compare.rs`'s unit tests).
const TOO_SMALL: &str = r#"cache_dir = "models"
[device]
capacity = "4MiB"
[limits]
cap = "6MiB"
ram_budget = "1MiB"
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

fn workflow(dir: &Path, text: &str) -> String {
    let path = dir.join("w.toml");
    fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn with_env(args: &[&str], key: &str, value: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(args)
        .env(key, value)
        .output()
        .unwrap()
}

const WARNING: &str = "lowtide: warning: spill file in /proc/self: cannot create";

#[test]
fn a_spill_dir_that_cannot_work_is_a_warning_the_user_sees() {
    let dir = tempfile::tempdir().unwrap();
    let path = workflow(dir.path(), PROC_SPILL);
    let out = lowtide(&["run", &path]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches(WARNING).count(), 1, "{stderr}");
    assert!(stderr.contains("spilling will fail"), "{stderr}");

    // In a comparison the children's warnings reach the user too, with --json.
    let out = lowtide(&["run", &path, "--compare", "--json"]);
    let stderr = text(&out.stderr);
    assert!(stderr.contains(WARNING), "{stderr}");
    json_of(&out);

    // RUST_LOG turns them off, or down to errors.
    for level in ["off", "error"] {
        let out = with_env(&["run", &path], "RUST_LOG", level);
        assert!(out.status.success());
        assert!(!text(&out.stderr).contains("warning"), "RUST_LOG={level}");
    }
    let out = with_env(&["run", &path], "RUST_LOG", "warn,bad directive");
    let stderr = text(&out.stderr);
    assert!(stderr.contains(WARNING), "{stderr}");
    assert!(
        stderr.contains("RUST_LOG: ignoring `bad directive`"),
        "{stderr}"
    );
}

#[test]
fn a_comparison_that_cannot_fit_its_cap_exits_1_before_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = workflow(dir.path(), TOO_SMALL);
    for json in [true, false] {
        let mut args = vec!["run", path.as_str(), "--compare"];
        if json {
            args.push("--json");
        }
        let out = lowtide(&args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("does not fit its cap of 6.00 MiB") && stderr.contains("overhead"),
            "{stderr}"
        );
        assert!(!stderr.contains("running lowtide"), "nothing ran: {stderr}");
    }
}

#[test]
fn impossible_demo_arguments_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap();
    for (args, named) in [
        (&["--cap", "0"][..], "--cap must be more than 0"),
        (
            &["--cap", "1MiB"],
            "--cap 1.00 MiB cannot hold the demo's simulated device",
        ),
        (
            &["--generations", "0"],
            "--generations must be in 1..=1000, got 0",
        ),
        (
            &["--generations", "4000000000"],
            "--generations must be in 1..=1000, got 4000000000",
        ),
        (&["--scale", "0"], "--scale must be in (0, 4], got 0"),
        (&["--scale", "NaN"], "--scale must be in (0, 4], got NaN"),
    ] {
        let mut all = vec!["demo", "--dir", dir];
        all.extend_from_slice(args);
        let out = lowtide(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.starts_with(&format!("lowtide: error: {named}")),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
    assert_eq!(
        fs::read_dir(dir).unwrap().count(),
        0,
        "nothing generated for refused arguments"
    );
}

#[test]
fn the_summary_says_what_lowtide_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = workflow(
        dir.path(),
        &PROC_SPILL.replace("spill_dir = \"/proc/self\"\n", ""),
    );
    let out = lowtide(&["run", &path, "--compare"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("wrote nothing (the workflow patches no weights)"),
        "{stdout}"
    );
    assert!(!stdout.contains("only patched weights"), "{stdout}");
}

//! `lowtide run` and `lowtide demo` as programs: a small workflow runs end to end with all three
//! strategies giving the same digest, `--json` has the documented shape, and bad workflow
//! files are reported with the file, line and field.

mod common;

use std::fs;
use std::path::Path;

use common::{json_of, lowtide, text};
use serde_json::Value;

/// A small session: text encoder, UNet patched with two LoRAs in turn, VAE; about 3 MB.
/// The cap is generous: every strategy must finish.
const WORKFLOW: &str = r#"cache_dir = "models"

[device]
capacity = "8MiB"

[limits]
cap = "4GiB"
reserve_ram = "0"
ram_budget = "4MiB"

[models.te]
synthetic = "text_encoder"
scale = 0.01

[models.unet]
synthetic = "unet"
scale = 0.01

[models.vae]
synthetic = "vae"
scale = 0.01

[models.a]
synthetic = "lora"
scale = 0.01

[models.b]
synthetic = "lora"
scale = 0.01
seed = 1

[[steps]]
op = "load"
model = "te"

[[steps]]
op = "compute"
model = "te"

[[steps]]
op = "unload"
model = "te"

[[steps]]
op = "prefetch"
model = "unet"

[[steps]]
op = "load"
model = "unet"
budget = "1MiB"

[[steps]]
op = "patch"
model = "unet"
lora = "a"
strength = 0.8

[[steps]]
op = "compute"
model = "unet"

[[steps]]
op = "unload"
model = "unet"
bytes = "512KiB"

[[steps]]
op = "unload"
model = "unet"

[[steps]]
op = "unpatch"
model = "unet"

[[steps]]
op = "patch"
model = "unet"
lora = "b"

[[steps]]
op = "load"
model = "unet"

[[steps]]
op = "compute"
model = "unet"

[[steps]]
op = "load"
model = "vae"

[[steps]]
op = "compute"
model = "vae"
"#;

fn write_workflow(dir: &Path, text: &str) -> String {
    let path = dir.join("w.toml");
    fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Checks the documented shape of one run and returns its digest.
fn check_run(run: &Value) -> String {
    for key in [
        "bytes_read",
        "bytes_written",
        "peak_anon_bytes",
        "evictions",
    ] {
        assert!(run[key].is_u64(), "{key} in {run}");
    }
    assert!(run["wall_s"].is_f64(), "{run}");
    assert_eq!(run["status"], "ok", "{run}");
    let digest = run["output_digest"].as_str().expect("a digest").to_owned();
    assert_eq!(digest.len(), 16, "{digest}");
    digest
}

#[test]
fn all_three_strategies_compute_the_same_digest() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = write_workflow(dir.path(), WORKFLOW);
    let out = json_of(&lowtide(&["run", &workflow, "--compare", "--json"]));
    assert_eq!(out["cap_bytes"], 4u64 << 30);
    let model_bytes = out["model_bytes"].as_u64().unwrap();
    assert!((1 << 20..40 << 20).contains(&model_bytes), "{model_bytes}");
    let runs = out["runs"].as_array().unwrap();
    let names: Vec<&str> = runs
        .iter()
        .map(|r| r["strategy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lowtide", "spill-all", "ram"]);
    let digests: Vec<String> = runs.iter().map(check_run).collect();
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");

    // lowtide re-reads clean weights instead of writing them: it writes at most the patched
    // tensors; the classic path holds everything in RAM and writes nothing.
    let (lt, ram) = (&runs[0], &runs[2]);
    assert_eq!(ram["bytes_written"], 0);
    assert!(lt["bytes_read"].as_u64().unwrap() > 0);

    // A single strategy in this process gives the same digest, with per-step figures.
    for strategy in ["lowtide", "spill-all", "ram"] {
        let one = json_of(&lowtide(&[
            "run",
            &workflow,
            "--strategy",
            strategy,
            "--json",
        ]));
        let run = &one["runs"][0];
        assert_eq!(check_run(run), digests[0], "{strategy}");
        assert_eq!(run["steps"].as_array().unwrap().len(), 15);
    }

    // The table names every strategy and ends with the sentence.
    let table = lowtide(&["run", &workflow, "--compare"]);
    assert!(table.status.success(), "{}", text(&table.stderr));
    let table = text(&table.stdout);
    for name in ["lowtide", "spill-all", "ram", "Under a 4.00 GiB cap"] {
        assert!(table.contains(name), "{name} missing from:\n{table}");
    }
}

#[test]
fn a_run_prints_per_step_figures() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = write_workflow(dir.path(), WORKFLOW);
    let out = lowtide(&["run", &workflow]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("patch unet + a x0.8"), "{table}");
    assert!(table.contains("lowtide: ok"), "{table}");
}

/// Runs a broken variant of the workflow: exit status 1 and one line naming the file and line.
fn broken(from: &str, to: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    assert!(WORKFLOW.contains(from), "{from}");
    let workflow = write_workflow(dir.path(), &WORKFLOW.replacen(from, to, 1));
    let out = lowtide(&["run", &workflow]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("w.toml:"), "{err}");
    err
}

#[test]
fn workflow_errors_name_the_line_and_field() {
    let err = broken(
        "op = \"compute\"\nmodel = \"te\"",
        "op = \"compute\"\nmodel = \"t5\"",
    );
    assert!(
        err.contains("w.toml:38:") && err.contains("model `t5`"),
        "{err}"
    );
    let err = broken("capacity = \"8MiB\"", "capacity = \"8 MiBs\"");
    assert!(err.contains("w.toml:4:"), "{err}");
    let err = broken("strength = 0.8", "strenght = 0.8");
    assert!(err.contains("strenght"), "{err}");
    let err = broken("lora = \"a\"", "lora = \"vae\"");
    assert!(err.contains("`vae` is not one"), "{err}");
    let err = broken("op = \"unpatch\"", "op = \"unpach\"");
    assert!(err.contains("op `unpach`"), "{err}");
}

#[test]
fn a_missing_model_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = write_workflow(
        dir.path(),
        &WORKFLOW.replacen(
            "synthetic = \"vae\"\nscale = 0.01",
            "path = \"nowhere.safetensors\"",
            1,
        ),
    );
    let out = lowtide(&["run", &workflow]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("model `vae`") && err.contains("nowhere.safetensors"),
        "{err}"
    );
    assert_eq!(
        err.matches("nowhere.safetensors").count(),
        1,
        "the path once: {err}"
    );
}

#[test]
fn a_workflow_that_is_not_a_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("w.toml");
    common::mkfifo(&pipe);
    let pipe = pipe.to_str().unwrap();
    common::fails_fast(
        &["run", pipe],
        &[pipe, "is a FIFO (named pipe), not a regular file"],
    );
    common::fails_fast(
        &["run", "/dev/zero", "--compare"],
        &["/dev/zero", "is a character device, not a regular file"],
    );
    let folder = dir.path().to_str().unwrap();
    common::fails_fast(&["run", folder], &[folder, "is a directory"]);
}

#[test]
fn an_oversized_workflow_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let padding = "# padding\n".repeat(200_000);
    let workflow = write_workflow(dir.path(), &format!("{WORKFLOW}{padding}"));
    common::fails_fast(
        &["run", &workflow],
        &[
            &workflow,
            "bytes, over the 1.00 MiB cap for a workflow file",
        ],
    );
}

#[test]
fn sizes_and_rates_that_cannot_work_are_refused_with_their_line() {
    // `bandwidth = 0` used to become 1 byte per second: the run would never end.
    let capacity = "capacity = \"8MiB\"";
    for (from, to, needle) in [
        (
            capacity,
            "capacity = \"8MiB\"\nbandwidth = 0",
            "w.toml:5: device.bandwidth",
        ),
        (
            capacity,
            "capacity = \"8MiB\"\nbandwidth = \"0GB\"",
            "w.toml:5: device.bandwidth",
        ),
        (capacity, "capacity = 0", "w.toml:4: device.capacity"),
        ("cap = \"4GiB\"", "cap = \"0B\"", "w.toml:7: limits.cap"),
        (
            "ram_budget = \"4MiB\"",
            "ram_budget = 0",
            "w.toml:9: limits.ram_budget",
        ),
        (
            "ram_budget = \"4MiB\"",
            "ram_budget = \"4MiB\"\nspill_max = 0",
            "w.toml:10: limits.spill_max",
        ),
        (
            "strength = 0.8",
            "strength = inf",
            "w.toml:57: strength must be a finite number",
        ),
        (
            "strength = 0.8",
            "strength = nan",
            "w.toml:57: strength must be a finite number",
        ),
        (
            "strength = 0.8",
            "strength = 1e300",
            "w.toml:57: strength must be a finite number",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        assert!(WORKFLOW.contains(from), "{from}");
        let workflow = write_workflow(dir.path(), &WORKFLOW.replacen(from, to, 1));
        for mode in ["--compare", "--json"] {
            common::fails_fast(&["run", &workflow, mode], &[needle]);
        }
    }
}

//! The example workflows under `examples/` (docs/workflows.md) run as documented.

mod common;

use std::path::Path;

use common::{json_of, lowtide};

/// Copies `examples/` into a temporary directory (synthetic models are generated next to
/// the workflow) and returns it.
fn examples() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    dir
}

#[test]
fn the_example_on_a_users_own_model_file_runs() {
    let dir = examples();
    let path = dir.path().join("own-model.toml");
    let run = json_of(&lowtide(&["run", path.to_str().unwrap(), "--json"]));
    assert_eq!(run["runs"][0]["status"], "ok", "{run}");
    assert_eq!(run["runs"][0]["steps"].as_array().unwrap().len(), 5);
    assert_eq!(
        run["runs"][0]["bytes_written"], 0,
        "nothing patched, nothing written"
    );
}

#[test]
fn the_synthetic_example_compares_the_strategies() {
    let dir = examples();
    let path = dir.path().join("sdxl-small.toml");
    let out = lowtide(&["run", path.to_str().unwrap(), "--compare", "--json"]);
    let compared: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", common::text(&out.stderr)));
    let runs = compared["runs"].as_array().unwrap();
    let lowtide = runs.iter().find(|r| r["strategy"] == "lowtide").unwrap();
    assert_eq!(lowtide["status"], "ok", "{lowtide}");
    // Only the patched weights were written.
    let written = lowtide["bytes_written"].as_u64().unwrap();
    assert!(written > 0 && written < 64 << 20, "{written}");
}

#[test]
fn the_models_the_examples_generate_are_ignored_by_git() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if !repo.join(".git").exists() {
        eprintln!("skipped: not a git checkout, so nothing to ignore");
        return;
    }
    // The default `cache_dir` of a workflow in examples/, as `lowtide run` resolves it.
    let generated = "examples/.lowtide-cache/unet-x0.2-s0-v2.safetensors";
    let out = match std::process::Command::new("git")
        .args(["check-ignore", "--no-index", "--quiet", generated])
        .current_dir(&repo)
        .output()
    {
        Ok(out) => out,
        Err(err) => {
            eprintln!("skipped: cannot run git: {err}");
            return;
        }
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "git does not ignore {generated}: {}",
        common::text(&out.stderr)
    );
}

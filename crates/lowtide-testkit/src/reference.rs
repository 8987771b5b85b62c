//! Files written by the reference implementations (the `safetensors` package,
//! `crates/lowtide/tests/reference/write_reference.py`, and the `gguf` package's `GGUFWriter`,
//! `write_gguf_reference.py`), for tests that cross-check lowtide against them.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The exit status of a writer when Python lacks one of its packages.
const MISSING_PACKAGE: i32 = 3;

/// The Python to run: the test venv of `scripts/test` when it exists (beside the test's
/// `CARGO_TARGET_TMPDIR`, passed as `target_tmpdir`), else `python3`.
fn python(target_tmpdir: &Path) -> PathBuf {
    let venv = target_tmpdir.join("../python-venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Writes the reference GGUF files into a temporary directory and returns it with their
/// `manifest.json`, or `None` (after saying why on stderr) when Python or its packages are
/// missing and `CI` is not set; with `CI` set that is a failure of `test`.
pub fn gguf_reference_files(
    test: &str,
    target_tmpdir: &Path,
) -> Option<(tempfile::TempDir, Value)> {
    run_reference_writer(test, target_tmpdir, "write_gguf_reference.py", "gguf numpy")
}

/// Runs a reference writer of `crates/lowtide/tests/reference/` (`script`) into a new
/// temporary directory and returns it with the `manifest.json` the writer left there, or
/// `None` (after saying why on stderr) when Python or one of `packages` (space-separated, as
/// `pip install` takes them) is missing and `CI` is not set; with `CI` set that is a failure
/// of `test`. The Python is the one of `scripts/test`'s venv when it exists (found from
/// `target_tmpdir`, the test's `CARGO_TARGET_TMPDIR`), else `python3` from `PATH`.
pub fn run_reference_writer(
    test: &str,
    target_tmpdir: &Path,
    script: &str,
    packages: &str,
) -> Option<(tempfile::TempDir, Value)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lowtide/tests/reference")
        .join(script);
    let dir = crate::tempdir();
    let python = python(target_tmpdir);
    let missing = |what: &str| {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: {what}. The reference tests need Python with the packages {packages}; \
             `scripts/test` installs them into target/python-venv (pip install {packages})"
        );
        // Straight to the process's stderr, past the test harness's capture, so a skip shows.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: {test}: {what}. It needs Python with the packages {packages} \
             (pip install {packages}); with CI set, this is a failure"
        );
        None
    };
    let output = match Command::new(&python).arg(&script).arg(dir.path()).output() {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return missing(&format!("{} is not installed", python.display()));
        }
        Err(err) => panic!(
            "cannot run {} {}: {err}",
            python.display(),
            script.display()
        ),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(MISSING_PACKAGE) {
        return missing(stderr.trim());
    }
    assert!(
        output.status.success(),
        "{} {} failed ({}):\n{stderr}",
        python.display(),
        script.display(),
        output.status
    );
    let manifest = std::fs::read(dir.path().join("manifest.json")).unwrap();
    Some((dir, serde_json::from_slice(&manifest).unwrap()))
}

/// `a` and `b` agree as JSON values; numbers of `FLOAT32` values (`f32`) compare as `f32`.
pub fn same_json(a: &Value, b: &Value, f32: bool) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if f32 => {
            x.as_f64().map(|v| v as f32) == y.as_f64().map(|v| v as f32)
        }
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            x.as_f64() == y.as_f64()
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b, f32))
        }
        _ => a == b,
    }
}

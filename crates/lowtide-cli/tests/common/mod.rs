//! Helpers for the tests that run the `lowtide` program.
#![allow(dead_code, unreachable_pub)]

use std::process::{Command, Output};

use serde_json::Value;

/// Runs `lowtide` with `args`.
pub fn lowtide(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(args)
        .output()
        .expect("run lowtide")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The JSON a successful run printed.
pub fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "lowtide failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {}", text(&out.stdout)))
}

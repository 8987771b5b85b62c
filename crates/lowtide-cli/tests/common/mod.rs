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

/// How long a `lowtide` that must fail fast may run before it is killed as hung.
pub const WATCHDOG: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs `lowtide` with `args` under a watchdog: a run still going after [`WATCHDOG`] is
/// killed and the test fails naming the hang. Returns the output and how long it ran.
pub fn lowtide_watched<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (Output, std::time::Duration) {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use std::time::Instant;

    let start = Instant::now();
    // Its own process group, so that a hung run's helpers (`--compare` runs each strategy in
    // a child process) are killed with it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lowtide");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for lowtide") {
            break status;
        }
        if start.elapsed() > WATCHDOG {
            let group = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            let _ = child.wait();
            let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_owned()).collect();
            panic!("lowtide {shown:?} still running after {WATCHDOG:?}: killed as hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let output = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    (output, elapsed)
}

/// Runs `lowtide` under the watchdog expecting a fast failure: exit status 1, nothing on
/// stdout, one line on stderr containing each of `needles`. Returns that line.
pub fn fails_fast<S: AsRef<std::ffi::OsStr>>(args: &[S], needles: &[&str]) -> String {
    let (out, elapsed) = lowtide_watched(args);
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "lowtide {shown:?}: want exit status 1, got {} (stderr: {stderr})",
        out.status
    );
    assert!(
        elapsed < WATCHDOG / 2,
        "lowtide {shown:?} took {elapsed:?} to fail"
    );
    assert!(
        out.stdout.is_empty(),
        "lowtide {shown:?}: stdout: {}",
        text(&out.stdout)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "lowtide {shown:?}: stderr:\n{stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "lowtide {shown:?}: no `{needle}` in: {stderr}"
        );
    }
    stderr
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &std::path::Path) {
    use rustix::fs::{CWD, FileType, Mode};
    rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::RUSR | Mode::WUSR, 0).unwrap();
}

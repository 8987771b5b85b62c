//! `lowtide bench` on sizes it cannot run, on a disk that fills up, and on a small size: sizes
//! that do not fit are refused with one line (never a signal), a disk that fills while the
//! test file is written leaves nothing behind, and a run prints each target with its verdict.
//! The tmpfs tests need root; elsewhere they say why they are skipped.

mod common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{json_of, lowtide, text};
use lowtide_testkit::Mount;
use rustix::process::{Pid, Signal};

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn sizes_that_do_not_fit_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    for size in ["18446744073709551615", "100TiB"] {
        let out = lowtide(&["bench", path, "--size", size]);
        assert_eq!(out.status.signal(), None, "--size {size}: {}", out.status);
        assert_eq!(out.status.code(), Some(1), "--size {size}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("lowtide: error: --size "), "{stderr}");
        assert!(
            stderr.contains(" is free"),
            "names the free space: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn a_bench_that_does_not_fit_a_tiny_disk_is_refused_and_leaves_nothing() {
    let fs = match Mount::tmpfs("16m") {
        Ok(fs) => fs,
        Err(why) => return eprintln!("skipped: bench on a tiny tmpfs: {why}"),
    };
    let out = lowtide(&["bench", fs.path().to_str().unwrap(), "--size", "64MiB"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("lowtide: error: --size 64.00 MiB: the bench needs "),
        "{stderr}"
    );
    assert!(stderr.contains("and 16.00 MiB is free"), "{stderr}");
    assert_eq!(entries(&fs.path()), Vec::<String>::new());
}

/// The disk fills up while the test file is written (another writer takes the space after
/// the bench checked it): shrunk to what is in use while the bench is stopped mid-write.
#[test]
fn a_disk_that_fills_while_the_test_file_is_written_keeps_nothing() {
    let fs = match Mount::tmpfs("800m") {
        Ok(fs) => fs,
        Err(why) => return eprintln!("skipped: bench on a filling tmpfs: {why}"),
    };
    let before = fs.used();
    let mut bench = Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(["bench", fs.path().to_str().unwrap(), "--size", "256MiB"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(bench.id().cast_signed()).unwrap();
    let mut stderr = BufReader::new(bench.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("writing the test file") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the bench ended");
    }
    rustix::process::kill_process(pid, Signal::STOP).unwrap();
    assert_eq!(
        entries(&fs.path()),
        Vec::<String>::new(),
        "stopped while writing the test file, which has no name yet"
    );
    fs.resize(fs.used() + (1 << 20));
    rustix::process::kill_process(pid, Signal::CONT).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = bench.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{rest}");
    assert!(rest.contains("No space left on device"), "{rest}");
    assert_eq!(rest.lines().count(), 1, "one line: {rest}");
    assert_eq!(entries(&fs.path()), Vec::<String>::new());
    assert_eq!(fs.used(), before, "no space held");
}

#[test]
fn a_bench_prints_each_target_with_its_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let json = json_of(&lowtide(&["bench", path, "--size", "64MiB", "--json"]));
    let targets = json["targets"].as_array().expect("a targets array");
    assert_eq!(targets.len(), 10, "{json}");
    for target in targets {
        assert!(target["figure"].is_string(), "{target}");
        assert!(target["value"].is_number(), "{target}");
        assert!(target["target"].is_string(), "{target}");
        assert!(
            target["met"].is_boolean() || target["met"].is_null(),
            "{target}"
        );
    }
    let figure = |name: &str| targets.iter().find(|t| t["figure"] == name).unwrap();
    assert_eq!(
        figure("cold restore into RAM")["target"],
        ">= 0.90 x raw read"
    );
    // 64 MiB fits the steady budget: those targets cannot be judged, and say why.
    let steady = figure("cold restore, steady budget");
    assert!(steady["met"].is_null(), "{steady}");
    assert!(
        steady["note"].as_str().unwrap().contains("192 MiB"),
        "{steady}"
    );

    let out = lowtide(&["bench", path, "--size", "64MiB"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let header = table.lines().nth(1).unwrap();
    assert!(
        header.ends_with("target                   verdict"),
        "{header}"
    );
    let row = |name: &str| table.lines().find(|l| l.starts_with(name)).unwrap();
    let acquire = row("acquire + release, resident");
    assert!(
        acquire.contains("<= 1000 ns")
            && (acquire.ends_with(" met") || acquire.ends_with("NOT met")),
        "{acquire}"
    );
    assert!(row("cold restore into RAM").contains(">= 0.90 x raw read"));
    assert!(row("drop clean mapped pages").contains("<= 10 ms/GiB"));
    // The spill rows name the spill file's shape and compare with raw I/O at that shape.
    for spill in ["spill write (", "spill read, steady ("] {
        let spill = row(spill);
        assert!(
            spill.contains(" MiB x ") && spill.contains(">= 0.90 x raw same shape"),
            "{spill}"
        );
    }
    assert!(table.contains("targets: "), "{table}");
    assert_eq!(entries(dir.path()), ["lowtide-bench-1x64MiB.safetensors"]);
}

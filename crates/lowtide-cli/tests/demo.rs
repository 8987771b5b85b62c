//! `lowtide demo` runs at the small scales its help accepts, with its default cap: the cap
//! leaves lowtide the RAM budget `lowtide run` requires after the device, the reserve and the
//! overhead, and lowtide finishes under it (under a real memory cgroup where the machine
//! allows). Larger scales are checked without running by the unit test beside `demo.rs`.

mod common;

use common::{json_of, lowtide};

#[test]
fn the_demo_runs_at_small_scales_with_its_default_cap() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap();
    // About 0.3, 15 and 55 MB of models.
    for scale in ["0.001", "0.01", "0.05"] {
        let report = json_of(&lowtide(&[
            "demo", "--scale", scale, "--dir", dir, "--json",
        ]));
        let runs = report["runs"].as_array().unwrap();
        let run = |name: &str| runs.iter().find(|r| r["strategy"] == name).unwrap();
        assert_eq!(run("lowtide")["status"], "ok", "--scale {scale}: {report}");
        let cap = report["cap_bytes"].as_u64().unwrap();
        assert!(cap > 0, "--scale {scale}: {report}");
        let enforced = report["cap_enforced"].as_str().unwrap_or_default();
        if enforced.starts_with("cgroup v") {
            let peak = run("lowtide")["peak_anon_bytes"].as_u64().unwrap();
            assert!(
                peak <= cap,
                "--scale {scale}: peak {peak} over the cap {cap}"
            );
        } else {
            eprintln!("--scale {scale}: the cap was not enforced here: {enforced}");
        }
    }
}

//! A real memory cgroup: a workflow runs as a child whose hard limit is under half the model
//! set's bytes. lowtide finishes with the same output digest as an unconstrained run; the
//! classic `ram` strategy, the control, is OOM-killed. Needs root and a memory cgroup
//! controller (v1 or v2); elsewhere the test says why it is skipped.

mod common;

use common::{json_of as json, lowtide};

const WORKFLOW: &str = r#"cache_dir = "models"
[device]
capacity = "40MiB"
[limits]
cap = "128MiB"
reserve_ram = "8MiB"
ram_budget = "16MiB"
[models.te]
synthetic = "text_encoder"
scale = 0.2
[models.unet]
synthetic = "unet"
scale = 0.2
[models.vae]
synthetic = "vae"
scale = 0.2
[models.a]
synthetic = "lora"
scale = 0.2
[[steps]]
op = "load"
model = "te"
budget = "32MiB"
[[steps]]
op = "compute"
model = "te"
[[steps]]
op = "unload"
model = "te"
[[steps]]
op = "load"
model = "unet"
budget = "32MiB"
[[steps]]
op = "patch"
model = "unet"
lora = "a"
[[steps]]
op = "compute"
model = "unet"
[[steps]]
op = "unload"
model = "unet"
[[steps]]
op = "load"
model = "vae"
[[steps]]
op = "compute"
model = "vae"
[[steps]]
op = "load"
model = "unet"
budget = "32MiB"
[[steps]]
op = "compute"
model = "unet"
"#;

#[test]
fn under_a_cap_of_half_the_models_lowtide_finishes_and_ram_is_oom_killed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("oom.toml");
    std::fs::write(&path, WORKFLOW).unwrap();
    let path = path.to_str().unwrap();

    let compared = json(&lowtide(&["run", path, "--compare", "--json"]));
    let enforced = compared["cap_enforced"].as_str().unwrap_or_default();
    if enforced.starts_with("not enforced") {
        println!("skipped: the memory cgroup test needs root and a memory controller: {enforced}");
        eprintln!("skipped: the memory cgroup test needs root and a memory controller: {enforced}");
        return;
    }
    assert!(enforced.starts_with("cgroup v"), "{enforced}");
    let (cap, models) = (
        compared["cap_bytes"].as_u64().unwrap(),
        compared["model_bytes"].as_u64().unwrap(),
    );
    assert!(
        2 * cap <= models,
        "cap {cap} is at most half the models' {models} bytes"
    );
    let runs = compared["runs"].as_array().unwrap();
    let run = |name: &str| runs.iter().find(|r| r["strategy"] == name).unwrap();
    assert_eq!(run("lowtide")["status"], "ok", "{}", run("lowtide"));
    assert!(run("lowtide")["peak_anon_bytes"].as_u64().unwrap() <= cap);
    assert_eq!(run("ram")["status"], "oom-killed", "{}", run("ram"));

    // Unconstrained, in this cgroup: the same digest, from lowtide and from the control.
    let digest = run("lowtide")["output_digest"].as_str().unwrap().to_owned();
    for strategy in ["lowtide", "ram"] {
        let free = json(&lowtide(&["run", path, "--strategy", strategy, "--json"]));
        assert_eq!(free["runs"][0]["status"], "ok");
        assert_eq!(
            free["runs"][0]["output_digest"],
            digest.as_str(),
            "{strategy}"
        );
    }
}

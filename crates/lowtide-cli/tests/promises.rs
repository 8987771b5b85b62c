//! The promises of docs/reliability.md under the real faults: a LoRA file truncated or
//! rewritten while a patch reads it, a real memory cgroup at caps around the configured sum,
//! zero-sized dimensions, and allocations sized by a file or a flag far beyond the machine.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{json_of, lowtide, text};

/// Writes a safetensors file of `(name, dtype, shape)` tensors, each filled by `fill`.
fn write_model(path: &Path, tensors: &[(&str, &str, &[u64])], fill: impl Fn(&str, &mut [u8])) {
    let width = |dtype: &str| if dtype == "F32" { 4 } else { 2 };
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape) in tensors {
        let len = shape.iter().product::<u64>() as usize * width(dtype);
        let begin = data.len();
        data.resize(begin + len, 0);
        fill(name, &mut data[begin..]);
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + len]}),
        );
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut image = (json.len() as u64).to_le_bytes().to_vec();
    image.extend_from_slice(&json);
    image.extend_from_slice(&data);
    fs::write(path, image).unwrap();
}

/// Small deterministic bf16 values (|x| < 0.05) for tensor `name`.
fn values(name: &str, buf: &mut [u8], salt: u64) {
    let mut state = name.bytes().fold(salt ^ 0x9e37_79b9, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    for pair in buf.chunks_exact_mut(2) {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let unit = ((state >> 40) & 0xffff) as f32 / 65536.0 - 0.5;
        let bits = (unit * 0.1).to_bits();
        pair.copy_from_slice(&((bits >> 16) as u16).to_le_bytes());
    }
}

const LAYERS: usize = 48;

/// A model of `LAYERS` [512, 512] BF16 weights and a rank-64 LoRA over each of them.
fn lora_fixture(dir: &Path) {
    let names: Vec<String> = (0..LAYERS).map(|i| format!("blk.{i}.attn")).collect();
    let weights: Vec<(String, [u64; 2])> = names
        .iter()
        .map(|n| (format!("{n}.weight"), [512, 512]))
        .collect();
    let specs: Vec<(&str, &str, &[u64])> = weights
        .iter()
        .map(|(n, s)| (n.as_str(), "BF16", &s[..]))
        .collect();
    write_model(&dir.join("model.safetensors"), &specs, |n, b| {
        values(n, b, 1);
    });
    let mut factors = Vec::new();
    for n in &names {
        factors.push((format!("{n}.lora_down.weight"), [64u64, 512]));
        factors.push((format!("{n}.lora_up.weight"), [512u64, 64]));
    }
    let specs: Vec<(&str, &str, &[u64])> = factors
        .iter()
        .map(|(n, s)| (n.as_str(), "BF16", &s[..]))
        .collect();
    write_model(&dir.join("pristine.safetensors"), &specs, |n, b| {
        values(n, b, 2);
    });
    fs::write(
        dir.join("w.toml"),
        r#"[device]
capacity = "64MiB"
bandwidth = "64MB"
[limits]
ram_budget = "64MiB"
[models.base]
path = "model.safetensors"
[models.style]
path = "lora.safetensors"
[[steps]]
op = "load"
model = "base"
[[steps]]
op = "patch"
model = "base"
lora = "style"
[[steps]]
op = "compute"
model = "base"
"#,
    )
    .unwrap();
}

/// Truncates the file to half, or rewrites its data in place with other bytes (same size).
fn change(path: &Path, truncate: bool) {
    let len = fs::metadata(path).unwrap().len();
    if truncate {
        fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    } else {
        use std::os::unix::fs::FileExt as _;
        let file = fs::OpenOptions::new().write(true).open(path).unwrap();
        // Everything past the first 4 KiB (the header is shorter): every factor changes.
        let junk = vec![0x3c; (len - 4096) as usize];
        file.write_all_at(&junk, 4096).unwrap();
    }
}

#[test]
fn a_lora_file_truncated_or_rewritten_during_a_run_is_an_error_never_sigbus_or_other_bytes() {
    let dir = tempfile::tempdir().unwrap();
    lora_fixture(dir.path());
    let (lora, pristine) = (
        dir.path().join("lora.safetensors"),
        dir.path().join("pristine.safetensors"),
    );
    let workflow = dir.path().join("w.toml");
    let workflow = workflow.to_str().unwrap();
    fs::copy(&pristine, &lora).unwrap();
    let reference = json_of(&lowtide(&["run", workflow, "--json"]));
    let digest = reference["runs"][0]["output_digest"].clone();

    // Changes spread over the run: while the base model loads (through a throttled device),
    // while the patch reads the factors, and after. Each run either finishes with the
    // unchanged file's digest or stops with an error naming the change.
    let (mut finished, mut refused) = (0, 0);
    for trial in 0..12u64 {
        fs::copy(&pristine, &lora).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lowtide"))
            .args(["run", workflow, "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + 90 * trial));
        change(&lora, trial % 2 == 0);
        let out = child.wait_with_output().unwrap();
        let what = if trial % 2 == 0 {
            "truncated"
        } else {
            "rewritten"
        };
        assert_eq!(
            out.status.signal(),
            None,
            "trial {trial} ({what}): killed by a signal; stderr: {}",
            text(&out.stderr)
        );
        if out.status.success() {
            let run = json_of(&out);
            assert_eq!(
                run["runs"][0]["output_digest"], digest,
                "trial {trial} ({what}): other bytes handed out as the LoRA"
            );
            finished += 1;
        } else {
            let err = text(&out.stderr);
            assert!(
                err.contains("changed since it was opened") && err.contains("lora.safetensors"),
                "trial {trial} ({what}): {err}"
            );
            refused += 1;
        }
    }
    println!("{finished} runs finished with the original digest, {refused} refused the change");
    assert!(
        refused > 0,
        "no trial changed the file while the run read it"
    );
}

/// The small workflow of the cgroup test, with its cap as a parameter.
fn capped_workflow(dir: &Path, cap: u64) -> String {
    let text = format!(
        r#"cache_dir = "models"
[device]
capacity = "48MiB"
[limits]
cap = {cap}
reserve_ram = "16MiB"
ram_budget = "16MiB"
[models.te]
synthetic = "text_encoder"
scale = 0.2
[models.unet]
synthetic = "unet"
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
model = "unet"
budget = "32MiB"
[[steps]]
op = "compute"
model = "unet"
"#
    );
    let path = dir.join(format!("w-{cap}.toml"));
    fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The sum a refusal names: `= 141.65 MiB (148533248 bytes)`.
fn refused_sum(err: &str) -> u64 {
    let tail = err.rsplit(" = ").next().unwrap();
    let bytes = tail.split('(').nth(1).unwrap().split(' ').next().unwrap();
    bytes.parse().unwrap_or_else(|_| panic!("no sum in: {err}"))
}

/// A fresh memory cgroup v1 with a hard limit, or why there is none.
fn cgroup(name: &str, limit: u64) -> Result<std::path::PathBuf, String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root".into());
    }
    let own = lowtide::CgroupMemory::detect().ok_or("no memory cgroup controller")?;
    if own.version != lowtide::CgroupVersion::V1 {
        return Err("the test drives cgroup v1 files; this machine mounts v2".into());
    }
    let dir = own
        .dir
        .join(format!("lowtide-test-{}-{name}", std::process::id()));
    fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).map_err(|e| e.to_string())?;
    Ok(dir)
}

#[test]
fn caps_at_the_configured_sum_always_finish_and_below_it_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Any cap too small names the sum it needs.
    let out = lowtide(&["run", &capped_workflow(dir.path(), 1 << 20), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("does not fit its cap"), "{err}");
    let sum = refused_sum(&err);
    assert!(
        sum > (48 + 16 + 16) << 20,
        "the sum includes an overhead: {err}"
    );
    // One byte less is refused before the first step, with the same sum.
    let out = lowtide(&["run", &capped_workflow(dir.path(), sum - 1), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(refused_sum(&text(&out.stderr)), sum);

    let path = capped_workflow(dir.path(), sum);
    let free = json_of(&lowtide(&["run", &path, "--json"]));
    let digest = free["runs"][0]["output_digest"].clone();
    let cg = match cgroup("fit", sum) {
        Ok(cg) => cg,
        Err(why) => {
            eprintln!("skipped: the capped runs need a memory cgroup v1 as root: {why}");
            return;
        }
    };
    let runs = 20;
    let mut peaks = Vec::new();
    for i in 0..runs {
        // The shell moves itself into the cgroup, then becomes lowtide.
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec {} run {path} --json",
                cg.display(),
                env!("CARGO_BIN_EXE_lowtide")
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "run {i} of {runs} under a cap of {sum} bytes failed ({}): {}",
            out.status,
            text(&out.stderr)
        );
        let report = json_of(&out);
        assert_eq!(report["runs"][0]["output_digest"], digest, "run {i}");
        peaks.push(report["runs"][0]["peak_anon_bytes"].as_u64().unwrap());
    }
    let oom = fs::read_to_string(cg.join("memory.oom_control")).unwrap();
    let max = fs::read_to_string(cg.join("memory.max_usage_in_bytes")).unwrap();
    let _ = fs::remove_dir(&cg);
    assert!(oom.contains("oom_kill 0"), "{oom}");
    println!(
        "{runs} of {runs} runs finished under a cap of {sum} bytes; peak RssAnon {:?} MiB; \
         cgroup max usage {} bytes",
        peaks.iter().map(|p| p >> 20).collect::<Vec<_>>(),
        max.trim()
    );
}

#[test]
fn zero_sized_dimensions_run_through_every_step_and_strategy() {
    let dir = tempfile::tempdir().unwrap();
    let empty: &[u64] = &[4, 0];
    write_model(
        &dir.path().join("model.safetensors"),
        &[
            ("empty.weight", "F32", empty),
            ("full.weight", "BF16", &[8, 8]),
            ("none.weight", "F16", &[0]),
        ],
        |n, b| values(n, b, 3),
    );
    write_model(
        &dir.path().join("lora.safetensors"),
        &[
            ("empty.lora_down.weight", "F32", &[2, 0]),
            ("empty.lora_up.weight", "F32", &[4, 2]),
            ("full.lora_down.weight", "BF16", &[0, 8]),
            ("full.lora_up.weight", "BF16", &[8, 0]),
        ],
        |n, b| values(n, b, 4),
    );
    let path = dir.path().join("w.toml");
    fs::write(
        &path,
        r#"[device]
capacity = "1MiB"
[limits]
ram_budget = "1MiB"
[models.base]
path = "model.safetensors"
[models.lora]
path = "lora.safetensors"
[[steps]]
op = "load"
model = "base"
[[steps]]
op = "patch"
model = "base"
lora = "lora"
[[steps]]
op = "compute"
model = "base"
[[steps]]
op = "unload"
model = "base"
[[steps]]
op = "unpatch"
model = "base"
[[steps]]
op = "prefetch"
model = "base"
[[steps]]
op = "compute"
model = "base"
"#,
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let mut digests = Vec::new();
    for strategy in ["lowtide", "spill-all", "ram"] {
        let run = json_of(&lowtide(&["run", path, "--strategy", strategy, "--json"]));
        assert_eq!(run["runs"][0]["status"], "ok", "{strategy}: {run}");
        digests.push(run["runs"][0]["output_digest"].clone());
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    let out = lowtide(&[
        "inspect",
        &dir.path().join("model.safetensors").display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn sizes_far_beyond_the_machine_are_errors_never_aborts() {
    let dir = tempfile::tempdir().unwrap();
    // A 64 GiB tensor in a sparse file: the header is real, the data a hole.
    let len: u64 = 64 << 30;
    let header = format!(
        r#"{{"huge.weight":{{"dtype":"BF16","shape":[32,1073741824],"data_offsets":[0,{len}]}}}}"#
    );
    let mut json = header.into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let path = dir.path().join("huge.safetensors");
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    fs::write(&path, &bytes).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(bytes.len() as u64 + len)
        .unwrap();
    let workflow = dir.path().join("w.toml");
    fs::write(
        &workflow,
        r#"[device]
capacity = "1TiB"
[models.huge]
path = "huge.safetensors"
[[steps]]
op = "load"
model = "huge"
[[steps]]
op = "compute"
model = "huge"
"#,
    )
    .unwrap();
    let out = lowtide(&["run", workflow.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("device.capacity") && err.contains("available"),
        "{err}"
    );
    // A device that fits the machine but not the tensor: refused before the first step.
    fs::write(
        &workflow,
        fs::read_to_string(&workflow)
            .unwrap()
            .replace("1TiB", "1GiB"),
    )
    .unwrap();
    let out = lowtide(&["run", workflow.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("`huge.weight`") && err.contains("larger than the device's capacity"),
        "{err}"
    );
}

/// Whether CI asked for every test to run: a test that cannot run here fails instead of
/// skipping.
fn in_ci() -> bool {
    std::env::var("CI")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// Set in the child processes of the cgroup test below: what the child does there.
const CGROUP_CHILD: &str = "LOWTIDE_TEST_CGROUP_CHILD";
/// The model file the child pins (a path).
const CGROUP_MODEL: &str = "LOWTIDE_TEST_CGROUP_MODEL";

/// Removes a test cgroup when dropped (after its processes exited).
struct CgroupDir(std::path::PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        for _ in 0..40 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What a child of the test below does inside the cgroup: `pin` opens a store with a 2 GiB
/// RAM budget and no reserve and pins the model's 64 MiB tensor, and must be refused with a
/// typed error; `control` touches 64 MiB of anonymous memory, which the cgroup must OOM-kill.
fn cgroup_child(role: &str) {
    match role {
        "control" => {
            let bytes = std::hint::black_box(vec![1u8; 64 << 20]);
            println!(
                "control: held {} bytes",
                bytes.iter().map(|&b| u64::from(b)).sum::<u64>()
            );
        }
        "pin" => {
            let model = std::env::var(CGROUP_MODEL).expect("the model's path");
            let store = lowtide::Store::builder()
                .ram_budget(2 << 30)
                .build()
                .expect("a store");
            println!("child: memory as the store sees it: {:?}", store.memory());
            let model = store.open_model(&model).expect("the model opens");
            let tensor = store.tensor(model, "w").expect("its tensor");
            match store.acquire_ram(tensor) {
                Err(lowtide::StoreError::Memory(
                    err @ (lowtide::MemoryError::UnderReserve { .. }
                    | lowtide::MemoryError::OverBudget { .. }),
                )) => println!("refused: {err}"),
                Err(err) => panic!("refused with an error of another kind: {err}"),
                Ok(guard) => panic!(
                    "pinned {} bytes in a cgroup of {} bytes",
                    guard.bytes().len(),
                    48 << 20
                ),
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

/// The cap promise: with a RAM budget far beyond the process's memory cgroup and no reserve,
/// a pin that the cgroup cannot hold is a typed error (`UnderReserve` or `OverBudget`), never
/// an OOM kill. The child runs in a real v1 memory cgroup of 48 MiB and pins a 64 MiB tensor;
/// a control child that allocates the same 64 MiB itself is OOM-killed there.
#[test]
fn a_ram_budget_beyond_its_cgroup_is_a_typed_error_never_an_oom_kill() {
    if let Ok(role) = std::env::var(CGROUP_CHILD) {
        cgroup_child(&role);
        return;
    }
    let limit: u64 = 48 << 20;
    let cg = match cgroup("pin", limit) {
        Ok(dir) => CgroupDir(dir),
        Err(why) => {
            assert!(
                !in_ci(),
                "CI runs as root with a memory cgroup v1 controller, but: {why}"
            );
            eprintln!(
                "skipped: the cap promise test needs root and a memory cgroup v1 controller: {why}"
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("pin.safetensors");
    write_model(&model, &[("w", "F32", &[16, 1 << 20])], |_, buf| {
        buf.fill(1);
    });
    let test = "a_ram_budget_beyond_its_cgroup_is_a_typed_error_never_an_oom_kill";
    let run = |role: &str| {
        // The shell moves itself into the cgroup, then becomes this test binary running only
        // this test, as the child.
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$0\" {test} --exact --nocapture --test-threads=1",
                cg.0.display()
            ))
            .arg(std::env::current_exe().unwrap())
            .env(CGROUP_CHILD, role)
            .env(CGROUP_MODEL, &model)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    let out = run("pin");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_ne!(
        out.status.signal(),
        Some(9),
        "the child was killed (SIGKILL: the OOM killer) pinning 64 MiB in a {limit}-byte \
         cgroup with a 2 GiB budget: {stdout}{stderr}"
    );
    assert!(
        out.status.success(),
        "the child failed ({}): {stdout}{stderr}",
        out.status
    );
    assert!(stdout.contains("refused: tensor `w`"), "{stdout}{stderr}");
    println!(
        "{}",
        stdout
            .lines()
            .filter(|l| l.starts_with("refused"))
            .collect::<String>()
    );

    // The control: the cgroup really kills a process that takes the same bytes itself.
    let out = run("control");
    assert_eq!(
        out.status.signal(),
        Some(9),
        "the control child was not OOM-killed ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

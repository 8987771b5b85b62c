//! Tensors streamed again and again (a model larger than its budget, or a tensor dropped and
//! needed again): with memory free their restores read through the page cache and leave the
//! pages there, so that the next restore reads nothing from the disk; in a tight memory cgroup
//! they stay `O_DIRECT` and nothing extra is left cached.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::TensorSpec;
use lowtide::direct::cached_bytes;
use lowtide::{Dtype, StatsSnapshot, Store};

const MIB: u64 = 1 << 20;

/// A model of `n` F32 tensors of `mib` MiB each.
fn model(dir: &Path, n: usize, mib: u64) -> PathBuf {
    let specs: Vec<TensorSpec> = (0..n)
        .map(|i| TensorSpec::new(format!("blocks.{i}.w"), Dtype::F32, &[mib * 256, 1024]))
        .collect();
    common::write(&dir.join("m.safetensors"), &specs)
}

fn cached(path: &Path) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    cached_bytes(&file, 0, file.metadata().unwrap().len()).unwrap()
}

/// Acquires every tensor of `model` in order, checks its bytes and lets it go.
fn pass(store: &Store, model: lowtide::ModelId) {
    for id in store.tensors(model).unwrap() {
        let guard = store.acquire_ram(id).unwrap();
        let name = store.info(id).unwrap().name;
        assert_eq!(&guard[..], &common::expected(&name, guard.len() as u64)[..]);
    }
}

/// Whether memory is plentiful enough here for the rule to keep `model_bytes` cached with room
/// to spare; else a message saying why the test is skipped.
fn plenty(store: &Store, model_bytes: u64) -> bool {
    let available = store.memory().available;
    if available < 8 * model_bytes + (256 << 20) {
        println!("skipped: only {available} bytes of memory available");
        return false;
    }
    true
}

#[test]
fn a_model_larger_than_its_budget_is_streamed_from_the_page_cache_while_memory_is_free() {
    let dir = common::tempdir();
    let path = model(dir.path(), 8, 4);
    let total = 32 * MIB;
    // Room for two tensors (and a pooled buffer): every pass in order restores all eight.
    let store = common::store(13 * MIB);
    if !plenty(&store, total) || common::cold(&path).is_none() {
        return;
    }
    let m = store.open_model(&path).unwrap();
    pass(&store, m);
    let first = store.stats();
    // Larger than its budget: streamed from the first pass on, read through the page cache.
    assert_eq!(
        (
            first.restores_cached,
            first.restores_direct_first,
            first.restores_direct_short
        ),
        (8, 0, 0),
        "{first:?}"
    );
    assert!(first.bytes_read_cold >= total - 64 * 1024, "{first:?}");
    assert_eq!(first.bytes_read_cold_kept, first.bytes_read_cold);
    assert!(cached(&path) >= total, "the pages stayed cached");

    for _ in 0..2 {
        pass(&store, m);
    }
    let later = store.stats();
    // Each later pass restores what the budget could not keep from the pass before (at
    // least one tensor it kept: the default policy's loop rule).
    let restored = later.restores_cached - first.restores_cached;
    assert!((8..=14).contains(&restored), "{later:?}");
    // Nothing more from the disk: every later restore copied from the page cache.
    assert_eq!(later.bytes_read_cold, first.bytes_read_cold, "{later:?}");
    assert_eq!(
        later.bytes_read_cached - first.bytes_read_cached,
        restored * 4 * MIB
    );
}

#[test]
fn a_tensor_is_read_direct_first_and_kept_cached_when_it_comes_back() {
    let dir = common::tempdir();
    let path = model(dir.path(), 4, 1);
    let total = 4 * MIB;
    // The model fits in the budget: its first restores leave nothing in the page cache.
    let store = common::store(64 * MIB);
    if !plenty(&store, total) || common::cold(&path).is_none() {
        return;
    }
    let m = store.open_model(&path).unwrap();
    pass(&store, m);
    let first = store.stats();
    assert_eq!((first.restores_direct_first, first.restores_cached), (4, 0));
    assert_eq!(first.bytes_read_cold_kept, 0);
    assert!(
        cached(&path) < total / 2,
        "direct reads left nothing cached"
    );

    // Dropped and needed again: streamed, read through the page cache.
    let drop_all = |store: &Store| {
        store.release_model(m).unwrap();
        store.wait_released();
    };
    drop_all(&store);
    pass(&store, m);
    let second = store.stats();
    assert_eq!(second.restores_cached, 4, "{second:?}");
    assert!(
        second.bytes_read_cold_kept >= total - 64 * 1024,
        "{second:?}"
    );
    assert!(cached(&path) >= total);

    drop_all(&store);
    pass(&store, m);
    let third = store.stats();
    assert_eq!(third.restores_cached, 8);
    assert_eq!(third.bytes_read_cold, second.bytes_read_cold, "{third:?}");
}

/// Whether CI asked for every test to run: a test that cannot run here fails instead of
/// skipping.
fn in_ci() -> bool {
    std::env::var("CI")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// Set in the child process of the cgroup test: the model file's path.
const CHILD_MODEL: &str = "LOWTIDE_TEST_REREAD_MODEL";
/// Set in the child process of the cgroup test: its cgroup's directory.
const CHILD_CGROUP: &str = "LOWTIDE_TEST_REREAD_CGROUP";

/// Removes a test cgroup when dropped (after its processes exited).
struct CgroupDir(PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        for _ in 0..40 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// A fresh memory cgroup v1 with a hard limit, or why there is none.
fn cgroup(limit: u64) -> Result<CgroupDir, String> {
    let own = lowtide::CgroupMemory::detect().ok_or("no memory cgroup controller")?;
    if own.version != lowtide::CgroupVersion::V1 {
        return Err("the test drives cgroup v1 files; this machine mounts v2".into());
    }
    let dir = own
        .dir
        .join(format!("lowtide-test-{}-reread", std::process::id()));
    std::fs::create_dir(&dir)
        .map_err(|e| format!("cannot create {} (root needed): {e}", dir.display()))?;
    let dir = CgroupDir(dir);
    std::fs::write(dir.0.join("memory.limit_in_bytes"), limit.to_string())
        .map_err(|e| e.to_string())?;
    Ok(dir)
}

/// The page cache charged to a v1 cgroup (`cache` in its `memory.stat`).
fn cgroup_cache(dir: &Path) -> u64 {
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap();
    stat.lines()
        .find_map(|l| l.strip_prefix("cache "))
        .and_then(|v| v.trim().parse().ok())
        .expect("a cache line in memory.stat")
}

/// The child of the test below, inside a 48 MiB cgroup: streams a 64 MiB model twice under an
/// 8 MiB budget and prints its stats and how much page cache the cgroup gained.
fn cgroup_child(model: &str, cgroup: &Path) {
    let store = common::store(9 * MIB);
    let m = store.open_model(model).unwrap();
    let before = cgroup_cache(cgroup);
    pass(&store, m);
    pass(&store, m);
    let grown = cgroup_cache(cgroup).saturating_sub(before);
    let stats: StatsSnapshot = store.stats();
    println!("memory as the store sees it: {:?}", store.memory());
    println!(
        "child: cached {} direct_short {} direct_first {} kept {} cache_grown {grown}",
        stats.restores_cached,
        stats.restores_direct_short,
        stats.restores_direct_first,
        stats.bytes_read_cold_kept
    );
}

#[test]
fn in_a_tight_cgroup_streamed_tensors_stay_direct_and_leave_nothing_cached() {
    if let (Ok(model), Ok(cgroup)) = (std::env::var(CHILD_MODEL), std::env::var(CHILD_CGROUP)) {
        cgroup_child(&model, Path::new(&cgroup));
        return;
    }
    let cg = match cgroup(48 * MIB) {
        Ok(dir) => dir,
        Err(why) => {
            assert!(
                !in_ci(),
                "CI runs as root with a memory cgroup v1 controller, but: {why}"
            );
            println!("skipped: the test needs root and a memory cgroup v1 controller: {why}");
            return;
        }
    };
    let dir = common::tempdir();
    let path = model(dir.path(), 16, 4);
    if common::cold(&path).is_none() {
        return;
    }
    let test = "in_a_tight_cgroup_streamed_tensors_stay_direct_and_leave_nothing_cached";
    // The shell moves itself into the cgroup, then becomes this test binary running only this
    // test, as the child.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" {test} --exact --nocapture --test-threads=1",
            cg.0.display()
        ))
        .arg(std::env::current_exe().unwrap())
        .env(CHILD_MODEL, &path)
        .env(CHILD_CGROUP, &cg.0)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the child failed ({}): {stdout}{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("child: "))
        .unwrap_or_else(|| panic!("no figures from the child: {stdout}{stderr}"));
    let figure = |key: &str| -> u64 {
        let mut words = line.split_whitespace();
        words.find(|w| *w == key);
        words.next().and_then(|v| v.parse().ok()).expect(key)
    };
    println!("{line}");
    // 64 MiB streamed twice through an 8 MiB budget: every restore reads with O_DIRECT (all
    // 16 tensors in the first pass, all but what the budget kept in the second).
    assert_eq!(figure("cached"), 0, "{stdout}");
    assert_eq!(figure("kept"), 0, "{stdout}");
    assert!((28..=32).contains(&figure("direct_short")), "{stdout}");
    // Nothing the size of the tensors was left in the cgroup's page cache.
    assert!(figure("cache_grown") < 8 * MIB, "{stdout}");
}

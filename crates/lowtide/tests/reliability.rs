//! Real faults: a source file truncated, rewritten in place or replaced while the store holds
//! it; a process killed with SIGKILL while it spills; eight threads racing on one store under a
//! tight budget with a watchdog. (Disk full: `disk_full.rs`; spill corruption: `governor.rs`;
//! the memory cgroup: the CLI's `tests/oom.rs`.)

mod common;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use lowtide::{Change, Dtype, SimDevice, SourceError, Store, StoreError, TensorId};
use lowtide_testkit::TensorSpec;

/// A model of twelve tensors of odd sizes (so that they share boundary pages).
fn model(dir: &Path) -> PathBuf {
    let specs: Vec<TensorSpec> = (0..12)
        .map(|i| TensorSpec::new(format!("layer.{i}.weight"), Dtype::F16, &[100 + i, 515]))
        .collect();
    common::write(&dir.join("model.safetensors"), &specs)
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    store: Store,
    ids: Vec<TensorId>,
}

/// Opens the model; tensors 0-3 get RAM copies, 4-7 were mapped (and stay mapped), 8-11 were
/// never touched.
fn fixture() -> Fixture {
    let dir = common::tempdir();
    let path = model(dir.path());
    let store = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(dir.path())
        .monitor(false)
        .build()
        .unwrap();
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    for &id in &ids[..4] {
        drop(store.acquire_ram(id).unwrap());
    }
    for &id in &ids[4..8] {
        drop(common::mapped(&store, id).unwrap());
    }
    Fixture {
        _dir: dir,
        path,
        store,
        ids,
    }
}

fn expected(store: &Store, id: TensorId) -> Vec<u8> {
    let info = store.info(id).unwrap();
    common::expected(&info.name, info.len)
}

/// After the file changed: RAM copies still give the right bytes; everything else is a
/// `Changed` error naming the file — never a signal, never wrong bytes.
fn check_after_change(f: &Fixture, what: fn(&Change) -> bool) {
    for &id in &f.ids[..4] {
        let guard = f.store.acquire_ram(id).unwrap();
        assert_eq!(&guard[..], &expected(&f.store, id)[..], "RAM copy kept");
    }
    for &id in &f.ids[4..] {
        for result in [common::mapped(&f.store, id), f.store.acquire_ram(id)] {
            match result {
                Err(StoreError::Source(SourceError::Changed { path, change })) => {
                    assert_eq!(path, f.path);
                    assert!(what(&change), "{change:?}");
                }
                Err(err) => panic!("unexpected error: {err}"),
                Ok(guard) => panic!(
                    "a changed file served {} bytes for tensor {id:?}",
                    guard.len()
                ),
            }
        }
    }
    // Uploading to a device reads the source too: the same typed error.
    let gpu = f
        .store
        .add_device(Arc::new(SimDevice::new("sim0", 64 << 20)));
    assert!(matches!(
        f.store.acquire_device(f.ids[10], gpu),
        Err(StoreError::Source(SourceError::Changed { .. }))
    ));
}

/// Reads every tensor into RAM over and over while another thread truncates or rewrites the
/// file in place (same size, other bytes): each read returns the bytes validated at open or a
/// typed error, never a signal and never other bytes; once the change has landed every later
/// read is refused.
fn race_a_change(truncate: bool) {
    let dir = tempfile::tempdir().unwrap();
    // Tensors large enough (1-4 MiB) that a read takes long enough to be raced.
    let specs: Vec<TensorSpec> = (0..16)
        .map(|i| {
            TensorSpec::new(
                format!("layer.{i}.weight"),
                Dtype::BF16,
                &[1024 + 64 * i, 1024],
            )
        })
        .collect();
    let path = common::write(&dir.path().join("model.safetensors"), &specs);
    for round in 0..6u64 {
        let pristine = std::fs::read(&path).unwrap();
        let store = Store::builder().ram_budget(256 << 20).build().unwrap();
        let model = store.open_model(&path).unwrap();
        let ids = store.tensors(model).unwrap();
        // After the timestamp tick of the open (docs/reliability.md).
        std::thread::sleep(Duration::from_millis(20));
        let changer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5 + 7 * round));
                let file = OpenOptions::new().write(true).open(&path).unwrap();
                let len = file.metadata().unwrap().len();
                if truncate {
                    file.set_len(len / 2).unwrap();
                } else {
                    // 64 KiB at a time, back to front, so that reads see the change land.
                    let junk = vec![0x5au8; 64 << 10];
                    let mut at = len;
                    while at > 4096 {
                        let n = (at - 4096).min(junk.len() as u64);
                        at -= n;
                        file.write_all_at(&junk[..n as usize], at).unwrap();
                    }
                }
            })
        };
        let mut refused = false;
        for pass in 0..40 {
            for &id in &ids {
                let info = store.info(id).unwrap();
                match store.acquire_ram(id) {
                    Ok(guard) => {
                        assert!(
                            !refused,
                            "pass {pass}: {} served after a change was seen",
                            info.name
                        );
                        assert!(
                            guard[..] == common::expected(&info.name, info.len)[..],
                            "round {round} pass {pass}: {} served other bytes",
                            info.name
                        );
                    }
                    Err(StoreError::Source(SourceError::Changed { .. })) => refused = true,
                    Err(err) => panic!("round {round}: unexpected error: {err}"),
                }
                store.drop_clean(id).unwrap();
            }
        }
        changer.join().unwrap();
        assert!(refused, "round {round}: the change was never seen");
        std::fs::write(&path, &pristine).unwrap();
    }
}

#[test]
fn a_truncation_racing_reads_is_an_error_never_sigbus() {
    race_a_change(true);
}

#[test]
fn a_same_size_rewrite_racing_reads_never_serves_other_bytes() {
    race_a_change(false);
}

#[test]
fn a_truncated_source_is_a_typed_error_never_sigbus() {
    let f = fixture();
    let file = OpenOptions::new().write(true).open(&f.path).unwrap();
    file.set_len(4096).unwrap();
    check_after_change(&f, |c| matches!(c, Change::Size { now: 4096, .. }));
}

#[test]
fn a_source_rewritten_in_place_is_detected_by_its_mtime() {
    let f = fixture();
    // File timestamps come from a coarse clock (a few ms): wait so that the rewrite gets a
    // new mtime. (A rewrite within the same tick cannot be told apart: docs/reliability.md.)
    std::thread::sleep(Duration::from_millis(50));
    let file = OpenOptions::new().write(true).open(&f.path).unwrap();
    let len = file.metadata().unwrap().len();
    let header_end = 8 + u64::from_le_bytes({
        let mut b = [0u8; 8];
        std::fs::File::open(&f.path)
            .unwrap()
            .read_exact_at(&mut b, 0)
            .unwrap();
        b
    });
    let garbage = vec![0xa5u8; (len - header_end) as usize];
    file.write_all_at(&garbage, header_end).unwrap();
    file.sync_all().unwrap();
    assert_eq!(file.metadata().unwrap().len(), len, "same size");
    check_after_change(&f, |c| matches!(c, Change::Modified));
}

#[test]
fn a_source_replaced_by_rename_keeps_serving_the_file_it_opened() {
    let f = fixture();
    // Write a different model under a temporary name and rename it over the original: the
    // store holds the old inode open, whose bytes do not change, so every restore still gives
    // the bytes it validated at open.
    let other = f.path.with_extension("new");
    let specs: Vec<TensorSpec> = (0..3)
        .map(|i| TensorSpec::new(format!("other.{i}"), Dtype::U8, &[1000]))
        .collect();
    common::write(&other, &specs);
    std::fs::rename(&other, &f.path).unwrap();
    for &id in &f.ids {
        f.store.drop_clean(id).unwrap();
        let guard = common::mapped(&f.store, id).unwrap();
        assert_eq!(&guard[..], &expected(&f.store, id)[..]);
        drop(guard);
        let guard = f.store.acquire_ram(id).unwrap();
        assert_eq!(&guard[..], &expected(&f.store, id)[..]);
    }
    // Reopening the path gives the new model.
    let m = f.store.open_model(&f.path).unwrap();
    assert_eq!(f.store.tensors(m).unwrap().len(), 3);
}

const CRASH_CHILD: &str = "LOWTIDE_TEST_CRASH_CHILD";

/// The child of the crash test: spills 1 MiB tensors in a loop until it is killed.
fn spill_until_killed(dir: &Path) {
    let model_dir = common::tempdir();
    let store = Store::builder()
        .ram_budget(256 << 20)
        .spill_dir(dir)
        .monitor(false)
        .build()
        .unwrap();
    let m = store.open_model(model(model_dir.path())).unwrap();
    for i in 0..4096u32 {
        let bytes = vec![(i % 251) as u8; 1 << 20];
        let id = store
            .derive(m, &format!("derived.{i}"), Dtype::U8, &[1 << 20], bytes)
            .unwrap();
        store.spill(id).unwrap();
        if i == 0 {
            println!("spilling");
        }
    }
    // Killed long before; if not, wait to be.
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_process_killed_mid_spill_leaves_nothing_in_the_spill_dir() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD) {
        spill_until_killed(Path::new(&dir));
        return;
    }
    let spill_dir = common::tempdir();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_process_killed_mid_spill_leaves_nothing_in_the_spill_dir",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD, spill_dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut started = false;
    for line in stdout.lines() {
        if line.unwrap().contains("spilling") {
            started = true;
            break;
        }
    }
    assert!(started, "the child never started spilling");
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let left: Vec<_> = std::fs::read_dir(spill_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// What a worker thread knows about the tensors it owns.
enum Owned {
    Clean,
    Patched(Vec<u8>),
}

fn patched(base: &[u8], round: usize) -> Vec<u8> {
    base.iter()
        .enumerate()
        .map(|(i, b)| b.wrapping_add((i + round) as u8 | 1))
        .collect()
}

/// Errors a racing thread may meet: the budget, the device or another thread's pin.
fn tolerated(err: &StoreError) -> bool {
    matches!(
        err,
        StoreError::Memory(
            lowtide::MemoryError::OverBudget { .. }
                | lowtide::MemoryError::UnderReserve { .. }
                | lowtide::MemoryError::DeviceFull { .. }
        ) | StoreError::Update(lowtide::UpdateError::Pinned { .. })
    )
}

fn ok_or_tolerated<T>(result: Result<T, StoreError>, what: &str) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(err) if tolerated(&err) => None,
        Err(err) => panic!("{what}: {err}"),
    }
}

/// One worker: a fixed sequence of operations; every byte it reads is checked.
#[allow(clippy::too_many_lines)]
fn worker(store: &Store, gpu: lowtide::DeviceId, m: lowtide::ModelId, t: usize, ids: &[TensorId]) {
    const BUDGET: u64 = 3 << 20;
    // Each thread owns two tensors (it alone patches them); the rest are shared read-only.
    let owned_ids = [ids[2 * t], ids[2 * t + 1]];
    let mut owned: HashMap<TensorId, Owned> =
        owned_ids.iter().map(|&id| (id, Owned::Clean)).collect();
    let mut derived: Vec<(TensorId, Vec<u8>)> = Vec::new();
    let mut rng = 0x9e37_79b9_u64 ^ (t as u64) << 32;
    let expect = |id: TensorId, owned: &HashMap<TensorId, Owned>| -> Vec<u8> {
        match owned.get(&id) {
            Some(Owned::Patched(bytes)) => bytes.clone(),
            _ => expected(store, id),
        }
    };
    for round in 0..250usize {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let pick = (rng >> 8) as usize;
        // Shared tensors (from 16 on) or this thread's own.
        let id = if pick.is_multiple_of(3) {
            owned_ids[pick % 2]
        } else {
            ids[16 + pick % (ids.len() - 16)]
        };
        match rng % 9 {
            0 => {
                let guard = common::mapped(store, id).unwrap();
                assert_eq!(&guard[..], &expect(id, &owned)[..], "acquire");
            }
            1 => {
                if let Some(guard) = ok_or_tolerated(store.acquire_ram(id), "acquire_ram") {
                    assert_eq!(&guard[..], &expect(id, &owned)[..], "acquire_ram");
                }
            }
            2 => {
                let len = 4096 + (pick % 64) * 1024;
                let bytes: Vec<u8> = (0..len).map(|i| (i * 31 + t + round) as u8).collect();
                let name = format!("t{t}.derived.{round}");
                if let Some(id) = ok_or_tolerated(
                    store.derive(m, &name, Dtype::U8, &[len], bytes.clone()),
                    "derive",
                ) {
                    derived.push((id, bytes));
                }
            }
            3 => {
                let own = owned_ids[pick % 2];
                let bytes = patched(&expected(store, own), round);
                if ok_or_tolerated(store.replace(own, bytes.clone()), "replace").is_some() {
                    owned.insert(own, Owned::Patched(bytes));
                }
            }
            4 => {
                let own = owned_ids[pick % 2];
                if ok_or_tolerated(store.revert(own), "revert").is_some() {
                    owned.insert(own, Owned::Clean);
                }
            }
            5 => {
                if let Some(guard) = ok_or_tolerated(store.acquire_device(id, gpu), "device") {
                    assert_eq!(guard.download().unwrap(), expect(id, &owned), "device");
                }
            }
            6 => {
                let _ = ok_or_tolerated(store.unload(m, 256 << 10), "unload");
            }
            7 => {
                if let Some((id, bytes)) = derived.get(pick % derived.len().max(1)) {
                    let _ = ok_or_tolerated(store.spill(*id), "spill");
                    let guard = store.acquire_ram(*id).unwrap();
                    assert_eq!(&guard[..], &bytes[..], "derived after spill");
                }
            }
            _ => {
                let _ = ok_or_tolerated(store.drop_clean(id), "drop_clean");
                store.free_memory(128 << 10);
            }
        }
        assert!(store.stats().anon_bytes <= BUDGET, "over budget");
    }
    // Everything this thread made or patched is still there, byte for byte.
    for (id, bytes) in &derived {
        let guard = store.acquire_ram(*id).unwrap();
        assert_eq!(&guard[..], &bytes[..], "derived at the end");
    }
    for &id in &owned_ids {
        let guard = store.acquire_ram(id).unwrap();
        assert_eq!(&guard[..], &expect(id, &owned)[..], "owned at the end");
    }
}

#[test]
fn eight_threads_race_on_one_store_without_deadlock_or_wrong_bytes() {
    const THREADS: usize = 8;
    let dir = common::tempdir();
    let specs: Vec<TensorSpec> = (0..24)
        .map(|i| TensorSpec::new(format!("w.{i}"), Dtype::BF16, &[96 + i, 1024]))
        .collect();
    let path = common::write(&dir.path().join("model.safetensors"), &specs);
    let store = Store::builder()
        .ram_budget(3 << 20)
        .spill_dir(dir.path())
        .build()
        .unwrap();
    let gpu = store.add_device(Arc::new(SimDevice::new("sim0", 2 << 20)));
    let m = store.open_model(&path).unwrap();
    let ids = Arc::new(store.tensors(m).unwrap());
    let (done, finished) = mpsc::channel();
    for t in 0..THREADS {
        let (store, ids, done) = (store.clone(), Arc::clone(&ids), done.clone());
        std::thread::Builder::new()
            .name(format!("worker-{t}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker(&store, gpu, m, t, &ids);
                }));
                done.send((t, result.is_ok())).unwrap();
            })
            .unwrap();
    }
    // The watchdog: every worker must finish within the deadline.
    for _ in 0..THREADS {
        match finished.recv_timeout(Duration::from_secs(180)) {
            Ok((t, ok)) => assert!(ok, "worker {t} failed (see its panic above)"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("deadlock: workers still running after 180 s")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("the test holds a sender"),
        }
    }
    for id in ids.iter() {
        assert_eq!(store.info(*id).unwrap().pins, 0, "a pin leaked");
    }
    // The budget and the device were tight enough to make the threads evict, spill, upload
    // and unload under each other's feet.
    let stats = store.stats();
    assert!(stats.evictions > 0 && stats.bytes_spilled > 0, "{stats:?}");
    assert!(
        stats.bytes_uploaded > 0 && stats.unloaded_clean_bytes > 0,
        "{stats:?}"
    );
}

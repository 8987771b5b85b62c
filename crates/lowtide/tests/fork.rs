//! A store opened before a `fork`: a child never changes what the parent reads, writes, frees
//! or waits for. The children are real (`fork(2)`), made while the parent's threads read
//! uncached tensors (`O_DIRECT`, through io_uring where the kernel has it) and spill patched
//! ones; the parent compares every byte it reads. A child finds the inherited store refusing
//! every operation, reads the model through a store of its own, and drops both without
//! hanging or aborting.
//!
//! A binary of its own: a forked child must not inherit other tests' threads and locks.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::TensorSpec;
use lowtide::direct::drop_cached;
use lowtide::{Dtype, ModelId, Store, StoreError, TensorId};
use rustix::process::{Pid, Signal, WaitOptions};

/// Children forked one after the other while the parent works.
const CHILDREN: usize = 12;

/// How long a child may take before it counts as hung (it is then killed).
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// Tensors of odd sizes (about 1 MiB each, starting and ending off block boundaries): the
/// first half is patched and spilled by the parent, the second half read cold.
fn specs() -> Vec<TensorSpec> {
    (0..8)
        .map(|i| TensorSpec::new(format!("blocks.{i}.w"), Dtype::BF16, &[509 + i, 1031]))
        .collect()
}

/// A patched tensor's bytes: its file bytes, every bit flipped, then `round` added.
fn patched(name: &str, len: u64, round: u8) -> Vec<u8> {
    common::expected(name, len)
        .iter()
        .map(|b| (!b).wrapping_add(round))
        .collect()
}

fn name_of(store: &Store, id: TensorId) -> String {
    store.info(id).unwrap().name
}

/// The parent's work until `stop`: `cold` tensors read from the file with nothing cached,
/// `dirty` ones patched, spilled (a write, and a punch of the previous extent) and read back
/// from the spill file. Every byte is compared. Returns the bytes compared.
fn parent_reads(
    store: &Store,
    model: ModelId,
    path: &Path,
    cold: &[TensorId],
    stop: &AtomicBool,
) -> Result<u64, String> {
    let file = std::fs::File::open(path).unwrap();
    let mut checked = 0;
    while !stop.load(Ordering::Relaxed) {
        drop_cached(&file).map_err(|err| err.to_string())?;
        for &id in cold {
            let name = name_of(store, id);
            let guard = store
                .acquire_ram(id)
                .map_err(|err| format!("{name}: {err}"))?;
            if guard[..] != common::expected(&name, guard.len() as u64)[..] {
                return Err(format!(
                    "{name}: a cold read gave other bytes than the file's"
                ));
            }
            checked += guard.len() as u64;
        }
        store.release_model(model).map_err(|err| err.to_string())?;
    }
    Ok(checked)
}

fn parent_spills(store: &Store, dirty: &[TensorId], stop: &AtomicBool) -> Result<u64, String> {
    let mut checked = 0;
    let mut round = 0u8;
    while !stop.load(Ordering::Relaxed) {
        round = round.wrapping_add(1);
        for &id in dirty {
            let info = store.info(id).unwrap();
            let bytes = patched(&info.name, info.len, round);
            let failed = |err: StoreError| format!("{} (round {round}): {err}", info.name);
            store.replace(id, bytes.clone()).map_err(failed)?;
            store.spill(id).map_err(failed)?;
            let guard = store.acquire_ram(id).map_err(failed)?;
            if guard[..] != bytes[..] {
                return Err(format!(
                    "{} (round {round}): the spill file gave other bytes back",
                    info.name
                ));
            }
            checked += guard.len() as u64;
            drop(guard);
            // Out of RAM again: the next read comes from the spill file.
            store.spill(id).map_err(failed)?;
        }
    }
    Ok(checked)
}

/// What a child knows of its parent's store.
struct Inherited<'a> {
    parent: u32,
    model: ModelId,
    /// A tensor the parent patches and spills.
    dirty: TensorId,
    /// A tensor the parent reads from the file.
    cold: TensorId,
    path: &'a Path,
    spill_dir: &'a Path,
}

/// What a child does: the inherited store refuses everything (and drops quietly, with the
/// parent's threads absent), while a store of its own reads the model and spills.
fn child(inherited: Store, reserved: Store, at: &Inherited<'_>) -> Result<(), String> {
    let Inherited {
        parent,
        model,
        dirty,
        cold,
        path,
        spill_dir,
    } = *at;
    let me = std::process::id();
    let refused = |what: &str, result: Result<(), StoreError>| match result {
        Err(StoreError::Forked { owner_pid, pid }) if owner_pid == parent && pid == me => Ok(()),
        other => Err(format!("{what} in a forked child: {other:?}")),
    };
    refused("revert", inherited.revert(dirty).map(drop))?;
    refused("acquire_ram", inherited.acquire_ram(cold).map(drop))?;
    refused("spill", inherited.spill(dirty).map(drop))?;
    refused("info", inherited.info(cold).map(drop))?;
    refused("close_model", inherited.close_model(model))?;
    refused("open_model", inherited.open_model(path).map(drop))?;
    let message = inherited.revert(dirty).unwrap_err().to_string();
    let expected = format!(
        "this store was opened in process {parent}; a forked child (process {me}) cannot use it: open a new Store in the child"
    );
    if message != expected {
        return Err(format!("the error says {message:?}"));
    }
    if inherited.free_memory(u64::MAX).freed_bytes != 0 {
        return Err("free_memory freed the parent's copies".into());
    }
    inherited.wait_released();
    drop(inherited);
    // Its monitor and releaser threads are the parent's: dropping the last handle here must
    // neither join them nor wait for what they free.
    reserved.wait_released();
    drop(reserved);

    // A store of its own works: its reads go through rings of its own.
    let own = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(spill_dir)
        .monitor(false)
        .build()
        .map_err(|err| err.to_string())?;
    let m = own.open_model(path).map_err(|err| err.to_string())?;
    for _ in 0..2 {
        for id in own.tensors(m).map_err(|err| err.to_string())? {
            let name = name_of(&own, id);
            let guard = own
                .acquire_ram(id)
                .map_err(|err| format!("{name}: {err}"))?;
            if guard[..] != common::expected(&name, guard.len() as u64)[..] {
                return Err(format!("{name}: the child's own store read other bytes"));
            }
        }
        own.release_model(m).map_err(|err| err.to_string())?;
    }
    let id = own.tensors(m).map_err(|err| err.to_string())?[0];
    let info = own.info(id).map_err(|err| err.to_string())?;
    let bytes = patched(&info.name, info.len, 200);
    own.replace(id, bytes.clone())
        .map_err(|err| err.to_string())?;
    own.spill(id).map_err(|err| err.to_string())?;
    let back = own.acquire_ram(id).map_err(|err| err.to_string())?;
    if back[..] != bytes[..] {
        return Err("the child's own spill file gave other bytes back".into());
    }
    drop(back);
    own.revert(id).map_err(|err| err.to_string())?;
    Ok(())
}

/// Forks; the child runs `body` and exits: 0 when it returns `Ok`, else 1 after writing the
/// message to `report`.
fn fork(report: &Path, body: impl FnOnce() -> Result<(), String>) -> Pid {
    // SAFETY: the child runs only `body` and then `_exit`s: it never returns into the test
    // harness, whose threads and locks are the parent's. `body` allocates (glibc's allocator
    // is fork-safe), opens files and uses lowtide, whose ring pool is held across forks by
    // its fork handler; it prints nothing (stdout's lock may have been held at the fork).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
            .unwrap_or_else(|_| Err("the child panicked".into()));
        let code = match result {
            Ok(()) => 0,
            Err(message) => {
                let _ = std::fs::write(report, message);
                1
            }
        };
        // SAFETY: ends the child at once, running no exit handlers and no destructors: the
        // harness state it inherited is the parent's.
        unsafe { libc::_exit(code) }
    }
    Pid::from_raw(pid).expect("a child's pid is positive")
}

/// Waits for a child to exit with 0; a child that runs past the timeout hangs, and is killed.
fn wait_ok(pid: Pid, report: &Path) {
    let deadline = Instant::now() + CHILD_TIMEOUT;
    loop {
        if let Some((_, status)) = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG)
            .unwrap_or_else(|err| panic!("waitpid {pid:?}: {err}"))
        {
            let message = std::fs::read_to_string(report).unwrap_or_default();
            assert_eq!(
                status.exit_status(),
                Some(0),
                "child {pid:?} ended with {status:?} (signal {:?}): {message}",
                status.terminating_signal()
            );
            return;
        }
        if Instant::now() > deadline {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
            let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
            panic!("child {pid:?} still ran after {CHILD_TIMEOUT:?}: it hung (killed)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn forked_children_never_change_what_the_parent_reads_spills_or_waits_for() {
    let dir = common::tempdir();
    let specs = specs();
    let path = common::write(&dir.path().join("m.safetensors"), &specs);
    let spill_dir: PathBuf = dir.path().join("spill");
    std::fs::create_dir(&spill_dir).unwrap();
    let store = Store::builder()
        .ram_budget(128 << 20)
        .spill_dir(&spill_dir)
        .monitor(false)
        .build()
        .unwrap();
    let model = store.open_model(&path).unwrap();
    let ids = store.tensors(model).unwrap();
    let (dirty, cold) = ids.split_at(ids.len() / 2);
    let (dirty, cold) = (dirty.to_vec(), cold.to_vec());
    // A second store, used only by this thread, whose monitor (a reserve is set) and
    // releaser threads run: a child holds its last handle and drops it.
    let reserved = Store::builder()
        .ram_budget(64 << 20)
        .reserve_ram(1)
        .spill_dir(&spill_dir)
        .build()
        .unwrap();
    let reserved_model = reserved.open_model(&path).unwrap();
    for id in reserved.tensors(reserved_model).unwrap() {
        drop(reserved.acquire_ram(id).unwrap());
    }
    reserved.release_model(reserved_model).unwrap();
    let engine = {
        let file = lowtide::direct::open(&path, false).unwrap();
        let mut buf = lowtide::AlignedBytes::zeroed(1 << 20).unwrap();
        lowtide::direct::read(&file, 0, &mut buf, lowtide::direct::IoShape::DEFAULT)
            .unwrap()
            .1
    };
    if engine != lowtide::direct::IoEngine::Uring {
        println!("io_uring is unavailable here: direct reads use threads ({engine:?})");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (done, finished) = std::sync::mpsc::channel();
    {
        let (store, path, stop, done) = (store.clone(), path.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            let _ = done.send(("reads", parent_reads(&store, model, &path, &cold, &stop)));
        });
    }
    {
        let (store, dirty, stop) = (store.clone(), dirty.clone(), stop.clone());
        std::thread::spawn(move || {
            let _ = done.send(("spills", parent_spills(&store, &dirty, &stop)));
        });
    }
    // The parent's threads are at work (and the spill file holds extents) before the first
    // fork.
    std::thread::sleep(Duration::from_millis(200));
    let at = Inherited {
        parent: std::process::id(),
        model,
        dirty: dirty[0],
        cold: ids[ids.len() - 1],
        path: &path,
        spill_dir: &spill_dir,
    };
    for i in 0..CHILDREN {
        let report = dir.path().join(format!("child-{i}.txt"));
        let (inherited, reserved) = (store.clone(), reserved.clone());
        let pid = fork(&report, || child(inherited, reserved, &at));
        wait_ok(pid, &report);
    }
    stop.store(true, Ordering::Relaxed);
    for _ in 0..2 {
        let (what, result) = finished
            .recv_timeout(Duration::from_secs(120))
            .expect("the parent's threads finish (they hung if not)");
        let checked = result.unwrap_or_else(|err| panic!("the parent's {what}: {err}"));
        assert!(checked > 0, "the parent's {what} compared no bytes");
    }

    // Every child dropped its handles on both stores: the parent's still work, and wait for
    // their own threads only.
    reserved.wait_released();
    for id in reserved.tensors(reserved_model).unwrap() {
        let name = name_of(&reserved, id);
        let guard = reserved.acquire_ram(id).unwrap();
        assert_eq!(&guard[..], &common::expected(&name, guard.len() as u64)[..]);
    }
    for &id in &dirty {
        store.revert(id).unwrap();
    }
    store.close_model(model).unwrap();
    store.wait_released();
    assert_eq!(store.spill_used(), 0);
}

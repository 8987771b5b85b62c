//! Loads onto a device as one stream (`Store::load`, `Store::stream_device`) with `SimDevice`:
//! the `O_DIRECT` reads of the next tensors are in flight while one tensor's windows are
//! uploaded, each tensor gets its own bytes or its own error, the load's host/device split is
//! the one tensor-by-tensor loads gave, and a stream that ends early leaves nothing pinned,
//! reserved or allocated.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lowtide::{
    Device, DeviceAlloc, DeviceError, DeviceId, ModelId, SimDevice, Store, StoreError, TensorId,
};

const MIB: u64 = 1 << 20;

fn expected(store: &Store, id: TensorId) -> Vec<u8> {
    let info = store.info(id).unwrap();
    common::expected(&info.name, info.len)
}

/// The tensor's device copy, downloaded, is its file bytes.
fn check_device(store: &Store, id: TensorId, guard: &lowtide::DeviceGuard) {
    let name = store.info(id).unwrap().name;
    assert!(
        guard.download().unwrap() == expected(store, id),
        "{name}: the device copy is not the file's bytes"
    );
}

/// Bytes of the tensors the store has a device copy of.
fn on_device(store: &Store, ids: &[TensorId]) -> u64 {
    ids.iter()
        .map(|&id| store.info(id).unwrap())
        .filter(|info| info.device.is_some())
        .map(|info| info.len)
        .sum()
}

/// A store with a RAM budget of `budget` bytes and a `SimDevice` of `capacity` bytes.
fn setup(budget: u64, capacity: u64) -> (Store, Arc<SimDevice>, DeviceId) {
    let store = common::store(budget);
    let sim = Arc::new(SimDevice::new("sim0", capacity));
    let gpu = store.add_device(sim.clone());
    (store, sim, gpu)
}

/// The split tensor-by-tensor loads gave: in name order, a tensor goes to the device while
/// the bytes placed so far and its own fit both `budget` and the device.
fn expected_split(store: &Store, m: ModelId, budget: u64, capacity: u64) -> (u32, u64) {
    let (mut tensors, mut bytes) = (0, 0);
    for id in store.tensors(m).unwrap() {
        let len = store.info(id).unwrap().len;
        if bytes + len <= budget.min(capacity) {
            tensors += 1;
            bytes += len;
        }
    }
    (tensors, bytes)
}

#[test]
fn a_cold_model_loads_byte_exact_with_the_next_tensors_reads_in_flight() {
    let dir = common::tempdir();
    let path = common::odd_start_model(dir.path(), "m.safetensors", 12, 4);
    if !common::all_cold(&path) {
        return;
    }
    // A 64 MiB budget: a few staging windows, reused from tensor to tensor.
    let (store, sim, gpu) = setup(64 * MIB, 256 * MIB);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let total: u64 = ids.iter().map(|&id| store.info(id).unwrap().len).sum();
    let outcome = store.load(m, gpu, None).unwrap();
    assert_eq!((outcome.device_tensors, outcome.host_tensors), (13, 0));
    assert_eq!(outcome.device_bytes, total);
    for &id in &ids {
        let guard = store.acquire_device(id, gpu).unwrap();
        check_device(&store, id, &guard);
    }
    assert!(common::pinned(&store, &ids).is_empty());
    let s = store.stats();
    assert_eq!(s.bytes_uploaded, total, "{s:?}");
    assert_eq!(s.device_bytes, total, "{s:?}");
    assert_eq!(sim.used(), total);
    assert!(s.anon_peak_bytes <= store.ram_budget(), "{s:?}");
    let stream = outcome.stream;
    println!("{stream:?}");
    if stream.queued_tensors == 0 {
        println!("skipped: no io_uring or no O_DIRECT here; every tensor was uploaded alone");
        return;
    }
    // The tensors sharing a page with the header (cached when it was read) go alone.
    assert!(stream.queued_tensors >= 10, "{stream:?}");
    assert_eq!(s.restores_queued, stream.queued_tensors, "{s:?}");
    assert!(
        stream.max_tensors_in_flight >= 2,
        "the next tensor's reads were not in flight while one was uploaded: {stream:?}"
    );
    assert!(stream.max_requests_in_flight >= 2, "{stream:?}");
    // All of it from the disk but the page the header shares with the first tensors.
    assert!(s.bytes_read_cold > 48 * MIB - 4096, "{s:?}");
    assert_eq!(s.bytes_read_source, total, "{s:?}");
}

#[test]
fn a_load_budget_smaller_than_the_model_gives_the_same_split_as_before() {
    let dir = common::tempdir();
    let path = common::odd_start_model(dir.path(), "m.safetensors", 10, 2);
    let Some(_) = common::cold(&path) else { return };
    let (store, sim, gpu) = setup(64 * MIB, 256 * MIB);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    // Three blocks fit, the fourth does not, and then `odd` (last in name order) does.
    let budget = 7 * MIB;
    let outcome = store.load(m, gpu, Some(budget)).unwrap();
    let (tensors, bytes) = expected_split(&store, m, budget, u64::MAX);
    assert_eq!((tensors, bytes), (4, 6 * MIB + 60));
    assert_eq!(
        (outcome.device_tensors, outcome.device_bytes),
        (tensors, bytes)
    );
    assert_eq!(outcome.host_tensors, 11 - tensors);
    assert_eq!(outcome.device_bytes + outcome.host_bytes, 20 * MIB + 60);
    assert_eq!(sim.used(), bytes);
    assert_eq!(on_device(&store, &ids), bytes);
    for &id in &ids {
        let info = store.info(id).unwrap();
        let loaded = ["blocks.0.w", "blocks.1.w", "blocks.2.w", "odd"].contains(&&*info.name);
        assert_eq!(info.device.is_some(), loaded, "{}", info.name);
    }
    // Every tensor is served, the host ones uploaded on demand.
    for &id in &ids {
        let guard = store.acquire_device(id, gpu).unwrap();
        check_device(&store, id, &guard);
    }
    assert!(common::pinned(&store, &ids).is_empty());
}

#[test]
fn a_device_too_small_leaves_what_does_not_fit_on_the_host() {
    let dir = common::tempdir();
    let first = common::odd_start_model(dir.path(), "a.safetensors", 10, 2);
    let second = common::odd_start_model(dir.path(), "b.safetensors", 10, 2);
    let capacity = 7 * MIB;
    let (store, sim, gpu) = setup(64 * MIB, capacity);
    let a = store.open_model(&first).unwrap();
    let b = store.open_model(&second).unwrap();
    for path in [&first, &second] {
        let _ = common::cold(path);
    }
    let outcome = store.load(a, gpu, None).unwrap();
    let (tensors, bytes) = expected_split(&store, a, u64::MAX, capacity);
    assert_eq!(
        (outcome.device_tensors, outcome.device_bytes),
        (tensors, bytes)
    );
    assert_eq!(outcome.host_tensors, 11 - tensors);
    let a_ids = store.tensors(a).unwrap();
    assert_eq!(on_device(&store, &a_ids), bytes);
    assert_eq!(sim.used(), bytes);
    // The next model's load unloads the first one's copies to make room, never its own.
    let outcome = store.load(b, gpu, None).unwrap();
    assert_eq!(
        (outcome.device_tensors, outcome.device_bytes),
        (tensors, bytes)
    );
    let b_ids = store.tensors(b).unwrap();
    assert_eq!(on_device(&store, &b_ids), bytes);
    // The first model's blocks made room; its small `odd` had no need to.
    assert_eq!(on_device(&store, &a_ids), 60);
    assert_eq!(sim.used(), bytes + 60);
    assert_eq!(store.stats().device_bytes, sim.used());
    for &id in &b_ids {
        if store.info(id).unwrap().device.is_some() {
            let guard = store.acquire_device(id, gpu).unwrap();
            check_device(&store, id, &guard);
        }
    }
    assert!(common::pinned(&store, &a_ids).is_empty() && common::pinned(&store, &b_ids).is_empty());
}

#[test]
fn a_file_changed_between_open_and_load_fails_every_tensor_with_changed() {
    let dir = common::tempdir();
    let path = common::odd_start_model(dir.path(), "m.safetensors", 8, 2);
    let (store, sim, gpu) = setup(64 * MIB, 256 * MIB);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let _ = common::cold(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let outcomes: Vec<_> = store.stream_device(ids.clone(), gpu).collect();
    assert_eq!(outcomes.len(), ids.len());
    for (i, outcome) in outcomes.iter().enumerate() {
        assert!(
            matches!(
                outcome,
                Err(StoreError::Source(lowtide::SourceError::Changed { .. }))
            ),
            "tensor {i}: {outcome:?}"
        );
    }
    drop(outcomes);
    let err = store.load(m, gpu, None).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Source(lowtide::SourceError::Changed { .. })
        ),
        "{err}"
    );
    assert!(common::pinned(&store, &ids).is_empty());
    assert_eq!(sim.used(), 0);
    assert_eq!(store.stats().device_bytes, 0);
    assert_eq!(store.stats().bytes_uploaded, 0);

    // Rewritten in place, the same size: changed too.
    let path = common::odd_start_model(dir.path(), "n.safetensors", 4, 2);
    let n = store.open_model(&path).unwrap();
    let n_ids = store.tensors(n).unwrap();
    let _ = common::cold(&path);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0xff; 4096], 8192).unwrap();
    file.set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    drop(file);
    let err = store.load(n, gpu, None).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Source(lowtide::SourceError::Changed { .. })
        ),
        "{err}"
    );
    assert!(common::pinned(&store, &n_ids).is_empty());
    assert_eq!(sim.used(), 0);
}

#[test]
fn each_tensor_gets_its_own_outcome_when_the_file_is_cut_mid_stream() {
    let dir = common::tempdir();
    let path = common::odd_start_model(dir.path(), "m.safetensors", 8, 2);
    let (store, sim, gpu) = setup(256 * MIB, 256 * MIB);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    if !common::all_cold(&path) {
        return;
    }
    let mut stream = store.stream_device(ids.clone(), gpu);
    let first = stream.next().unwrap().unwrap();
    check_device(&store, ids[0], &first);
    // Truncated while the others are read: none of them may come out as other bytes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let rest: Vec<_> = stream.by_ref().collect();
    let stats = stream.stats();
    drop(stream);
    assert_eq!(rest.len(), ids.len() - 1);
    for (i, outcome) in rest.iter().enumerate() {
        match outcome {
            Ok(guard) => check_device(&store, ids[i + 1], guard),
            Err(StoreError::Source(lowtide::SourceError::Changed { .. })) => {}
            Err(err) => panic!("tensor {}: {err}", i + 1),
        }
    }
    if stats.queued_tensors > 0 {
        // Read through the queue, the tensors are checked once their reads are over: after
        // the cut.
        assert!(
            rest.iter().filter(|r| r.is_err()).count() >= 4,
            "the tensors past the cut cannot have been read: {stats:?}"
        );
    }
    drop(rest);
    drop(first);
    assert!(common::pinned(&store, &ids).is_empty());
    assert_eq!(sim.used(), on_device(&store, &ids));
    assert_eq!(store.stats().device_bytes, sim.used());
}

#[test]
fn a_stream_dropped_early_leaves_nothing_pinned_reserved_or_allocated() {
    let dir = common::tempdir();
    let path = common::odd_start_model(dir.path(), "m.safetensors", 10, 2);
    // Room for the model's RAM copies and a little more: a staging reservation left behind
    // would make the last step below fail.
    let (store, sim, gpu) = setup(24 * MIB, 256 * MIB);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    if !common::all_cold(&path) {
        return;
    }
    {
        let mut stream = store.stream_device(ids.clone(), gpu);
        let first = stream.next().unwrap().unwrap();
        check_device(&store, ids[0], &first);
        // Reads of later tensors are in flight now; the stream goes with them.
    }
    assert!(common::pinned(&store, &ids).is_empty());
    // Every allocation left is a device copy the store knows (no tensor begun ahead left
    // one behind): here only the one handed out, the others having been read through the
    // queue.
    assert_eq!(sim.used(), on_device(&store, &ids));
    assert_eq!(sim.used(), store.info(ids[0]).unwrap().len);
    assert_eq!(store.stats().device_bytes, sim.used());

    // Dropped while unwinding from a panic of its consumer.
    let _ = common::cold(&path);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut stream = store.stream_device(ids[1..].to_vec(), gpu);
        let _guard = stream.next();
        panic!("the consumer fails");
    }));
    assert!(unwound.is_err());
    assert!(common::pinned(&store, &ids).is_empty());
    assert_eq!(sim.used(), on_device(&store, &ids));
    assert_eq!(store.stats().device_bytes, sim.used());
    let held = sim.used();
    assert!(held >= 2 * store.info(ids[0]).unwrap().len);
    assert_eq!(store.unload_all(m).unwrap().freed_bytes, held);
    assert_eq!(sim.used(), 0);
    // Nothing is left reserved in the RAM budget: the whole model fits in it again.
    let all = store.acquire_ram_many(&ids).unwrap();
    assert_eq!(all.len(), ids.len());
}

/// A `SimDevice` whose uploads fail once `budget` bytes were uploaded.
#[derive(Debug)]
struct Failing {
    sim: SimDevice,
    budget: u64,
    uploaded: AtomicU64,
}

impl Device for Failing {
    fn name(&self) -> String {
        self.sim.name()
    }
    fn capacity(&self) -> u64 {
        self.sim.capacity()
    }
    fn free_bytes(&self) -> u64 {
        self.sim.free_bytes()
    }
    fn allocate(&self, len: u64) -> Result<DeviceAlloc, DeviceError> {
        self.sim.allocate(len)
    }
    fn release(&self, alloc: DeviceAlloc) {
        self.sim.release(alloc);
    }
    fn upload(&self, dst: &DeviceAlloc, offset: u64, src: &[u8]) -> Result<(), DeviceError> {
        let before = self.uploaded.fetch_add(src.len() as u64, Ordering::Relaxed);
        if before + src.len() as u64 > self.budget {
            return Err(DeviceError::Driver {
                device: self.name(),
                op: "upload",
                source: "the link went down".into(),
            });
        }
        self.sim.upload(dst, offset, src)
    }
    fn download(&self, src: &DeviceAlloc, offset: u64, dst: &mut [u8]) -> Result<(), DeviceError> {
        self.sim.download(src, offset, dst)
    }
    fn in_host_memory(&self) -> bool {
        true
    }
}

#[test]
fn a_load_that_fails_mid_stream_returns_the_error_and_undoes_the_tensors_begun_ahead() {
    let dir = common::tempdir();
    let path = common::odd_start_model(dir.path(), "m.safetensors", 10, 2);
    let store = common::store(64 * MIB);
    let device = Arc::new(Failing {
        sim: SimDevice::new("flaky0", 256 * MIB),
        budget: 5 * MIB,
        uploaded: AtomicU64::new(0),
    });
    let gpu = store.add_device(device.clone());
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let _ = common::cold(&path);
    let err = store.load(m, gpu, None).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Restore(lowtide::RestoreError::Device { .. })
        ),
        "{err}"
    );
    assert!(common::pinned(&store, &ids).is_empty());
    // The two tensors uploaded before the link went down stay; nothing else is allocated.
    assert_eq!(on_device(&store, &ids), 4 * MIB);
    assert_eq!(device.sim.used(), 4 * MIB);
    assert_eq!(store.stats().device_bytes, 4 * MIB);
    for &id in &ids {
        if store.info(id).unwrap().device.is_some() {
            let guard = store.acquire_device(id, gpu).unwrap();
            check_device(&store, id, &guard);
        }
    }
}

#[test]
fn two_threads_load_two_models_at_once() {
    let dir = common::tempdir();
    let paths = [
        common::odd_start_model(dir.path(), "a.safetensors", 8, 2),
        common::odd_start_model(dir.path(), "b.safetensors", 8, 2),
    ];
    for round in 0..2 {
        // Round 0: room for both models; round 1: room for one and a half.
        let capacity = if round == 0 { 64 * MIB } else { 24 * MIB };
        let (store, sim, gpu) = setup(64 * MIB, capacity);
        let models: Vec<ModelId> = paths
            .iter()
            .map(|path| store.open_model(path).unwrap())
            .collect();
        for path in &paths {
            let _ = common::cold(path);
        }
        let outcomes: Vec<_> = std::thread::scope(|scope| {
            let loads: Vec<_> = models
                .iter()
                .map(|&m| {
                    let store = &store;
                    scope.spawn(move || store.load(m, gpu, None))
                })
                .collect();
            loads.into_iter().map(|l| l.join().unwrap()).collect()
        });
        let mut ids = Vec::new();
        for (outcome, &m) in outcomes.iter().zip(&models) {
            let outcome = outcome
                .as_ref()
                .unwrap_or_else(|err| panic!("round {round}: {err}"));
            assert_eq!(
                outcome.device_tensors + outcome.host_tensors,
                9,
                "round {round}: {outcome:?}"
            );
            if round == 0 {
                assert_eq!(outcome.host_tensors, 0, "{outcome:?}");
            }
            ids.extend(store.tensors(m).unwrap());
        }
        assert!(common::pinned(&store, &ids).is_empty(), "round {round}");
        assert_eq!(sim.used(), on_device(&store, &ids), "round {round}");
        assert_eq!(store.stats().device_bytes, sim.used(), "round {round}");
        assert!(sim.used() <= capacity);
        for &id in &ids {
            if store.info(id).unwrap().device.is_some() {
                let guard = store.acquire_device(id, gpu).unwrap();
                check_device(&store, id, &guard);
            }
        }
        let s = store.stats();
        assert!(s.anon_peak_bytes <= store.ram_budget(), "{s:?}");
    }
}

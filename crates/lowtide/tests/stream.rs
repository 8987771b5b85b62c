//! Restores of many tensors as one stream (`Store::stream_ram`, `Store::acquire_ram_many`,
//! prefetch): the reads of the next tensors are in flight while one completes, tensors come out
//! in order with their own bytes or their own error, and nothing stays pinned or reserved.

mod common;

use std::path::{Path, PathBuf};

use lowtide::{Dtype, Store, StoreError, TensorId};

const MIB: u64 = 1 << 20;

/// A model of `n` F32 tensors of `mib` MiB each after a small odd-sized one.
fn model(dir: &Path, n: usize, mib: u64) -> PathBuf {
    common::odd_start_model(dir, "m.safetensors", n, mib)
}

fn check(store: &Store, id: TensorId, guard: &lowtide::TensorGuard) {
    let name = store.info(id).unwrap().name;
    assert_eq!(
        &guard[..],
        &common::expected(&name, guard.len() as u64)[..],
        "{name}"
    );
}

#[test]
fn a_cold_model_streams_with_the_next_tensors_in_flight() {
    let dir = common::tempdir();
    let path = model(dir.path(), 12, 4);
    if !common::all_cold(&path) {
        return;
    }
    let store = common::store(1 << 30);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let mut stream = store.stream_ram(ids.clone());
    let mut order = Vec::new();
    for (i, guard) in stream.by_ref().enumerate() {
        let guard = guard.unwrap();
        check(&store, ids[i], &guard);
        order.push(guard.id());
    }
    let stats = stream.stats();
    drop(stream);
    assert_eq!(order, ids, "handed out in the order asked");
    if stats.queued_tensors == 0 {
        println!("skipped: no io_uring or no O_DIRECT here; every tensor was restored alone");
        return;
    }
    // The tensors sharing a page with the header (cached when it was read) are restored alone.
    assert!(stats.queued_tensors >= 10, "{stats:?}");
    assert!(
        stats.max_tensors_in_flight >= 2,
        "the next tensor's reads were not in flight while one completed: {stats:?}"
    );
    assert!(stats.max_requests_in_flight >= 2, "{stats:?}");
    assert_eq!(stats.drained_at_boundary, 0, "{stats:?}");
    assert!(common::pinned(&store, &ids).is_empty());
    let s = store.stats();
    // All of it from the disk but the page the header shares with the first tensors.
    assert!(s.bytes_read_cold > 48 * MIB - 4096, "{s:?}");
    assert!(s.anon_peak_bytes <= store.ram_budget());
    // The device's shape is being measured or chosen from its own reads.
    let shapes = store.read_shapes();
    assert_eq!(shapes.len(), 1, "{shapes:?}");
}

#[test]
fn a_model_larger_than_its_budget_streams_through_it() {
    let dir = common::tempdir();
    let path = model(dir.path(), 16, 2);
    let Some(_) = common::cold(&path) else { return };
    // Room for about six of the sixteen tensors.
    let store = common::store(13 * MIB);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    for round in 0..2 {
        let mut seen = 0;
        for (i, guard) in store.stream_ram(ids.clone()).enumerate() {
            let guard = guard.unwrap_or_else(|err| panic!("round {round}, tensor {i}: {err}"));
            check(&store, ids[i], &guard);
            seen += 1;
        }
        assert_eq!(seen, ids.len());
    }
    assert!(common::pinned(&store, &ids).is_empty());
    let stats = store.stats();
    assert!(
        stats.anon_peak_bytes <= store.ram_budget(),
        "{} > {}",
        stats.anon_peak_bytes,
        store.ram_budget()
    );
}

#[test]
fn acquire_many_pins_all_or_none() {
    let dir = common::tempdir();
    let path = model(dir.path(), 6, 2);
    let store = common::store(8 * MIB);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    // Three fit.
    let guards = store.acquire_ram_many(&ids[1..4]).unwrap();
    for guard in &guards {
        check(&store, guard.id(), guard);
    }
    assert_eq!(common::pinned(&store, &ids).len(), 3);
    drop(guards);
    // Six cannot: the budget holds four.
    let err = store.acquire_ram_many(&ids).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Memory(lowtide::MemoryError::OverBudget { .. })
        ),
        "{err}"
    );
    assert!(
        common::pinned(&store, &ids).is_empty(),
        "{:?}",
        common::pinned(&store, &ids)
    );
    // And the store goes on.
    let guards = store.acquire_ram_many(&ids[..3]).unwrap();
    assert_eq!(guards.len(), 3);
}

#[test]
fn a_stream_dropped_early_leaves_nothing_pinned_or_reserved() {
    let dir = common::tempdir();
    let path = model(dir.path(), 10, 2);
    let Some(_) = common::cold(&path) else { return };
    let store = common::store(64 * MIB);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    {
        let mut stream = store.stream_ram(ids.clone());
        let first = stream.next().unwrap().unwrap();
        check(&store, ids[0], &first);
        // Reads of later tensors are in flight now; the stream goes with them.
    }
    assert!(common::pinned(&store, &ids).is_empty());
    // Everything fits again: nothing was left reserved.
    let all = store.acquire_ram_many(&ids).unwrap();
    for guard in &all {
        check(&store, guard.id(), guard);
    }
}

#[test]
fn each_tensor_gets_its_own_outcome_when_the_file_changes_mid_stream() {
    let dir = common::tempdir();
    let path = model(dir.path(), 8, 2);
    let store = common::store(256 * MIB);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    if !common::all_cold(&path) {
        return;
    }
    let mut stream = store.stream_ram(ids.clone());
    let first = stream.next().unwrap().unwrap();
    check(&store, ids[0], &first);
    // Truncated while the others are being read: none of them may come out as other bytes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let rest: Vec<_> = stream.collect();
    assert_eq!(rest.len(), ids.len() - 1);
    for (i, outcome) in rest.iter().enumerate() {
        match outcome {
            Ok(guard) => check(&store, ids[i + 1], guard),
            Err(StoreError::Source(lowtide::SourceError::Changed { .. })) => {}
            Err(err) => panic!("tensor {}: {err}", i + 1),
        }
    }
    // The tensors read through the queue are checked as they come out: after the cut.
    assert!(
        rest.iter().filter(|r| r.is_err()).count() >= 4,
        "the tensors past the cut cannot have been read"
    );
    drop(rest);
    drop(first);
    assert!(common::pinned(&store, &ids).is_empty());
}

#[test]
fn cached_spilled_and_resident_tensors_come_out_of_the_same_stream() {
    let dir = common::tempdir();
    let path = model(dir.path(), 6, 2);
    let spill = common::tempdir();
    let store = Store::builder()
        .ram_budget(64 * MIB)
        .spill_dir(spill.path())
        .monitor(false)
        .build()
        .unwrap();
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let Some(_) = common::cold(&path) else { return };
    // ids[1]: dirty and spilled; ids[2]: resident; ids[3]: in the page cache.
    let patched: Vec<u8> = (0..2 * MIB as usize).map(|i| (i % 7) as u8).collect();
    store.replace(ids[1], patched.clone()).unwrap();
    store.spill(ids[1]).unwrap();
    let resident = store.acquire_ram(ids[2]).unwrap();
    drop(resident);
    let info = store.info(ids[3]).unwrap();
    {
        let guard = common::mapped(&store, ids[3]).unwrap();
        assert_eq!(guard.len() as u64, info.len);
    }
    let guards = store.acquire_ram_many(&ids).unwrap();
    for (i, guard) in guards.iter().enumerate() {
        if i == 1 {
            assert_eq!(&guard[..], &patched[..]);
        } else {
            check(&store, ids[i], guard);
        }
    }
}

#[test]
fn threads_streaming_the_same_model_under_a_tight_budget_each_get_every_tensor_right() {
    let dir = common::tempdir();
    let path = model(dir.path(), 12, 2);
    let Some(_) = common::cold(&path) else { return };
    // Room for about eight of the twelve tensors: the streams evict each other's copies.
    let store = common::store(17 * MIB);
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let checked = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (store, ids, checked) = (&store, &ids, &checked);
            scope.spawn(move || {
                for round in 0..3 {
                    // Each thread in its own order: some streams run backwards.
                    let mut order = ids.clone();
                    if (t + round) % 2 == 1 {
                        order.reverse();
                    }
                    for (i, guard) in store.stream_ram(order.clone()).enumerate() {
                        match guard {
                            Ok(guard) => {
                                check(store, order[i], &guard);
                                checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            // Four streams each holding a tensor and reading ahead can fill
                            // the budget for a moment: refused, never over it.
                            Err(StoreError::Memory(lowtide::MemoryError::OverBudget {
                                ..
                            })) => {}
                            Err(err) => panic!("thread {t}, round {round}: {err}"),
                        }
                    }
                }
            });
        }
    });
    let checked = checked.into_inner();
    println!("{checked} of {} tensors handed out", 4 * 3 * ids.len());
    assert!(
        checked >= 4 * 3 * ids.len() / 2,
        "only {checked} handed out"
    );
    assert!(common::pinned(&store, &ids).is_empty());
    let stats = store.stats();
    assert!(
        stats.anon_peak_bytes <= store.ram_budget(),
        "{} > {}",
        stats.anon_peak_bytes,
        store.ram_budget()
    );
}

/// Bytes of the `i`th patched tensor of the spill tests.
fn patched(i: u64) -> Vec<u8> {
    (0..MIB)
        .map(|b| (b * 31 + i * 7 + b / 4099) as u8)
        .collect()
}

/// A store spilling into `spill`, with `n` derived 1 MiB tensors of model `path`, each
/// spilled (only in the spill file now).
fn spilled(path: &Path, spill: &Path, n: u64) -> (Store, Vec<TensorId>) {
    let store = Store::builder()
        .ram_budget(64 * MIB)
        .spill_dir(spill)
        .monitor(false)
        .build()
        .unwrap();
    let m = store.open_model(path).unwrap();
    let ids: Vec<TensorId> = (0..n)
        .map(|i| {
            let mut bytes = lowtide::AlignedBytes::zeroed(MIB as usize).unwrap();
            bytes.as_mut_slice().copy_from_slice(&patched(i));
            let id = store
                .derive(
                    m,
                    &format!("patched.{i}"),
                    Dtype::U8,
                    &[MIB as usize],
                    bytes,
                )
                .unwrap();
            store.spill(id).unwrap();
            id
        })
        .collect();
    store.wait_released();
    for &id in &ids {
        assert!(!store.info(id).unwrap().in_ram);
    }
    (store, ids)
}

#[test]
fn spilled_tensors_are_read_through_the_queue_and_checked() {
    let dir = common::tempdir();
    let path = model(dir.path(), 1, 1);
    let spill = common::tempdir();
    let (store, ids) = spilled(&path, spill.path(), 8);
    let mut stream = store.stream_ram(ids.clone());
    for (i, guard) in (&mut stream).enumerate() {
        assert!(guard.unwrap()[..] == patched(i as u64)[..], "tensor {i}");
    }
    let stats = stream.stats();
    drop(stream);
    if stats.queued_tensors == 0 {
        println!("skipped: the spill file's directory refused O_DIRECT");
        return;
    }
    assert_eq!(stats.queued_tensors, 8, "{stats:?}");
    assert!(stats.max_tensors_in_flight >= 2, "{stats:?}");
    let totals = store.stats();
    assert_eq!(totals.bytes_restored_spill, 8 * MIB, "{totals:?}");
    assert_eq!(totals.checksum_failures, 0);
    assert!(common::pinned(&store, &ids).is_empty());
}

#[test]
fn a_corrupt_spill_extent_in_a_stream_is_reported_lost_and_the_others_arrive() {
    use std::os::unix::fs::FileExt as _;
    let dir = common::tempdir();
    let path = model(dir.path(), 1, 1);
    let spill = common::tempdir();
    let (store, ids) = spilled(&path, spill.path(), 3);
    // The spill file has no name: found through this process's descriptors.
    let file = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.as_ref().ok()?.path()).ok()?;
            link.starts_with(spill.path())
                .then(|| fd.ok().unwrap().path())
        })
        .find_map(|fd| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(fd)
                .ok()
        })
        .expect("the spill file among this process's descriptors");
    let mut image = vec![0u8; 4 * MIB as usize];
    let n = file.read_at(&mut image, 0).unwrap();
    let middle = patched(1);
    let at = image[..n]
        .windows(4096)
        .step_by(4096)
        .position(|w| w == &middle[..4096])
        .expect("the middle tensor's extent")
        * 4096;
    file.write_all_at(&[!middle[100]], (at + 100) as u64)
        .unwrap();
    file.sync_data().unwrap();

    let results: Vec<_> = store.stream_ram(ids.clone()).collect();
    assert!(results[0].as_ref().unwrap()[..] == patched(0)[..]);
    assert!(results[2].as_ref().unwrap()[..] == patched(2)[..]);
    match &results[1] {
        Err(StoreError::Restore(lowtide::RestoreError::Lost { name, .. })) => {
            assert_eq!(name, "patched.1");
        }
        other => panic!("expected the loss of patched.1, got {other:?}"),
    }
    drop(results);
    assert!(store.stats().checksum_failures >= 1);
    assert!(common::pinned(&store, &ids).is_empty());
}

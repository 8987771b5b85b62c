//! The governor, the eviction policy and the spill file, through the Store.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lowtide::{Dtype, Priority, Recipe, SpillError, Store, StoreError, Tier};
use lowtide_testkit::TensorSpec;

const MB: u64 = 1 << 20;

/// Three models of four 256 KiB tensors each.
fn three_models(dir: &Path) -> Vec<std::path::PathBuf> {
    ["a", "b", "c"]
        .iter()
        .map(|m| {
            let specs: Vec<TensorSpec> = (0..4)
                .map(|i| TensorSpec::new(format!("{m}.w{i}"), Dtype::F32, &[256, 256]))
                .collect();
            common::write(&dir.join(format!("{m}.safetensors")), &specs)
        })
        .collect()
}

fn store(dir: &Path, budget: u64) -> Store {
    Store::builder()
        .ram_budget(budget)
        .spill_dir(dir)
        .build()
        .unwrap()
}

#[test]
fn priority_classes_come_before_recency() {
    let dir = common::tempdir();
    let paths = three_models(dir.path());
    let store = store(dir.path(), 3 * 256 * 1024);
    let [a, b, c] = [0, 1, 2].map(|i| store.open_model(&paths[i]).unwrap());
    store.set_priority(a, Priority::Idle).unwrap();
    store.set_priority(b, Priority::Queued).unwrap();
    store.set_priority(c, Priority::Active).unwrap();
    let t = |m, name: &str| store.tensor(m, name).unwrap();
    // Used oldest first: the active model's tensor, then queued, then idle (most recent).
    for id in [t(c, "c.w0"), t(b, "b.w0"), t(a, "a.w0")] {
        drop(store.acquire_ram(id).unwrap());
    }
    drop(store.acquire_ram(t(c, "c.w1")).unwrap());
    assert!(
        !store.info(t(a, "a.w0")).unwrap().in_ram,
        "the idle model goes first"
    );
    assert!(store.info(t(b, "b.w0")).unwrap().in_ram);
    drop(store.acquire_ram(t(c, "c.w2")).unwrap());
    assert!(
        !store.info(t(b, "b.w0")).unwrap().in_ram,
        "then the queued one"
    );
    assert!(
        store.info(t(c, "c.w0")).unwrap().in_ram,
        "the active model last"
    );
    assert_eq!(store.stats().evictions_budget, 2);
    assert_eq!(store.stats().bytes_written, 0);
}

#[test]
fn clean_copies_go_before_dirty_ones_used_at_the_same_time() {
    let dir = common::tempdir();
    let paths = three_models(dir.path());
    let store = store(dir.path(), 2 * 256 * 1024);
    let a = store.open_model(&paths[0]).unwrap();
    // The dirty tensor is used first (older), the clean one after.
    let dirty = store
        .derive(a, "a.lora", Dtype::F32, &[256, 256], vec![3; 256 * 1024])
        .unwrap();
    let clean = store.tensor(a, "a.w0").unwrap();
    drop(store.acquire_ram(clean).unwrap());
    drop(store.acquire_ram(store.tensor(a, "a.w1").unwrap()).unwrap());
    assert!(
        !store.info(clean).unwrap().in_ram,
        "clean dropped although more recent"
    );
    assert!(
        store.info(dirty).unwrap().in_ram,
        "dirty kept: evicting it costs a write"
    );
    assert_eq!(store.stats().bytes_written, 0);
    // Two more loads: now the dirty copy must go, and it is spilled, not lost.
    drop(store.acquire_ram(store.tensor(a, "a.w2").unwrap()).unwrap());
    drop(store.acquire_ram(store.tensor(a, "a.w3").unwrap()).unwrap());
    let info = store.info(dirty).unwrap();
    assert!(!info.in_ram && info.spilled, "{info:?}");
    assert_eq!(store.stats().bytes_spilled, 256 * 1024);
    assert_eq!(store.stats().bytes_written, 256 * 1024);
    let back = store.acquire_ram(dirty).unwrap();
    assert_eq!(back.tier(), Tier::Ram);
    assert!(back.iter().all(|&b| b == 3));
    assert_eq!(store.stats().bytes_restored_spill, 256 * 1024);
    drop(back);
    let info = store.info(dirty).unwrap();
    assert!(
        info.in_ram && info.spilled,
        "the extent stays while the bytes are unchanged: {info:?}"
    );
    // Evicted again: its RAM copy is dropped, nothing written a second time.
    let freed = store.free_memory(2 * 256 * 1024);
    assert_eq!(freed.spilled_bytes, 0);
    let info = store.info(dirty).unwrap();
    assert!(!info.in_ram && info.spilled, "{info:?}");
    assert_eq!(store.stats().bytes_written, 256 * 1024);
    // A write frees the extent: the spill copy is stale.
    store.replace(dirty, vec![4; 256 * 1024]).unwrap();
    assert!(!store.info(dirty).unwrap().spilled);
    assert_eq!(store.spill_used(), 0);
}

#[test]
fn spill_round_trip_and_a_flipped_byte_is_caught() {
    let dir = common::tempdir();
    let spill_dir = common::tempdir();
    let paths = three_models(dir.path());
    let store = store(spill_dir.path(), 64 * MB);
    let a = store.open_model(&paths[0]).unwrap();
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let plain = store
        .derive(a, "plain", Dtype::U8, &[100_000], bytes.clone())
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let expected = bytes.clone();
    // An expensive recipe (more than a spill costs): spilled, but recomputable if lost.
    let recipe = Recipe::new(10.0, move || {
        counter.fetch_add(1, Ordering::SeqCst);
        expected.clone()
    });
    let with_recipe = store
        .derive_with_recipe(
            a,
            "with_recipe",
            Dtype::U8,
            &[100_000],
            bytes.clone(),
            recipe,
        )
        .unwrap();
    assert_eq!(store.spill(plain).unwrap(), 100_000);
    assert_eq!(store.spill(with_recipe).unwrap(), 100_000);
    assert_eq!(
        std::fs::read_dir(spill_dir.path()).unwrap().count(),
        0,
        "nothing named on disk"
    );

    // Round trip is byte-identical.
    assert_eq!(&store.acquire_ram(plain).unwrap()[..], &bytes[..]);
    store.spill(plain).unwrap();

    // Flip one byte of every extent through the process's own descriptor of the spill file.
    corrupt_spill_file(spill_dir.path());
    let err = store.acquire_ram(plain).unwrap_err();
    let StoreError::Restore(lowtide::RestoreError::Lost { name, source }) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(name, "plain");
    assert!(matches!(source, SpillError::Checksum { .. }), "{source}");
    assert!(store.stats().checksum_failures >= 1);
    // Still reported lost on the next try: never wrong bytes.
    assert!(matches!(
        store.acquire_ram(plain),
        Err(StoreError::Restore(lowtide::RestoreError::Lost { .. }))
    ));

    let restored = store.acquire_ram(with_recipe).unwrap();
    assert_eq!(&restored[..], &bytes[..]);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "recomputed from its recipe"
    );
    assert_eq!(store.stats().recomputes, 1);
}

/// Flips the first byte of each 4 KiB block that holds data in this process's spill file.
fn corrupt_spill_file(spill_dir: &Path) {
    let mut found = false;
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if !(target.starts_with(&*spill_dir.to_string_lossy()) && target.ends_with("(deleted)")) {
            continue;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(fd.path())
            .unwrap();
        let len = file.metadata().unwrap().len();
        let mut offset = 0;
        while offset < len {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, offset).unwrap();
            file.write_all_at(&[byte[0] ^ 0x5a], offset).unwrap();
            offset += 100_000_u64.div_ceil(4096) * 4096;
        }
        // The store may hold the file twice (buffered and O_DIRECT): flip each byte once.
        found = true;
        break;
    }
    assert!(found, "the spill file is open in this process");
}

#[test]
fn a_cheap_recipe_is_dropped_instead_of_spilled() {
    let dir = common::tempdir();
    let paths = three_models(dir.path());
    let store = store(dir.path(), 300 * 1024);
    let a = store.open_model(&paths[0]).unwrap();
    let recipe = Recipe::new(0.5, || vec![9; 256 * 1024]);
    let cheap = store
        .derive_with_recipe(
            a,
            "cheap",
            Dtype::U8,
            &[256 * 1024],
            vec![9; 256 * 1024],
            recipe,
        )
        .unwrap();
    drop(store.acquire_ram(store.tensor(a, "a.w0").unwrap()).unwrap());
    let info = store.info(cheap).unwrap();
    assert!(!info.in_ram && !info.spilled && info.has_recipe, "{info:?}");
    assert_eq!(store.stats().bytes_written, 0);
    assert!(store.acquire_ram(cheap).unwrap().iter().all(|&b| b == 9));
    assert_eq!(store.stats().recomputes, 1);
}

#[test]
fn asking_for_more_than_fits_is_a_typed_error_and_allocates_nothing() {
    let dir = common::tempdir();
    let paths = three_models(dir.path());
    let store = store(dir.path(), 600 * 1024);
    let a = store.open_model(&paths[0]).unwrap();
    let g0 = store.acquire_ram(store.tensor(a, "a.w0").unwrap()).unwrap();
    let g1 = store.acquire_ram(store.tensor(a, "a.w1").unwrap()).unwrap();
    let before = store.stats();
    let err = store
        .acquire_ram(store.tensor(a, "a.w2").unwrap())
        .unwrap_err();
    let StoreError::Memory(lowtide::MemoryError::OverBudget {
        requested,
        available,
        ..
    }) = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(requested, 256 * 1024);
    assert_eq!(available, 600 * 1024 - 512 * 1024);
    assert_eq!(store.stats().anon_bytes, before.anon_bytes);
    assert_eq!(
        store.stats().evictions,
        0,
        "nothing evicted for a request that cannot fit"
    );
    drop((g0, g1));
}

#[test]
fn the_reserve_is_kept_and_refusals_are_typed() {
    let dir = common::tempdir();
    let paths = three_models(dir.path());
    // A reserve above all the memory there is: every new RAM copy is refused.
    let store = Store::builder()
        .ram_budget(64 * MB)
        .reserve_ram(u64::MAX / 4)
        .monitor(false)
        .spill_dir(dir.path())
        .build()
        .unwrap();
    let a = store.open_model(&paths[0]).unwrap();
    let err = store
        .acquire_ram(store.tensor(a, "a.w0").unwrap())
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Memory(lowtide::MemoryError::UnderReserve {
                requested: 262_144,
                ..
            })
        ),
        "{err}"
    );
    // The mapped view costs no anonymous memory and is still served.
    assert_eq!(
        common::mapped(&store, store.tensor(a, "a.w0").unwrap())
            .unwrap()
            .tier(),
        Tier::Mapped
    );
}

#[test]
fn the_monitor_evicts_when_available_memory_is_under_the_reserve() {
    let dir = common::tempdir();
    let paths = three_models(dir.path());
    let store = Store::builder()
        .ram_budget(64 * MB)
        .spill_dir(dir.path())
        .monitor(true)
        .sample_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    match store.pressure_file() {
        Some(file) => eprintln!("PSI trigger registered on {}", file.display()),
        None if Path::new("/proc/pressure/memory").exists() => {
            panic!("/proc/pressure/memory exists but no PSI trigger was registered")
        }
        None => eprintln!("no PSI on this kernel: the monitor samples only"),
    }
    let a = store.open_model(&paths[0]).unwrap();
    for id in store.tensors(a).unwrap() {
        drop(store.acquire_ram(id).unwrap());
    }
    assert_eq!(store.stats().anon_bytes, MB);
    let lora = store
        .derive(a, "lora", Dtype::U8, &[1000], vec![1; 1000])
        .unwrap();

    // Now ask for a reserve no machine can meet: new copies are refused at once, and the
    // monitor thread frees what is held (the dirty tensor goes to the spill file).
    store.set_reserve_ram(u64::MAX / 4);
    let refused = store.derive(a, "lora2", Dtype::U8, &[1000], vec![1; 1000]);
    assert!(
        matches!(
            refused,
            Err(StoreError::Memory(
                lowtide::MemoryError::UnderReserve { .. }
            ))
        ),
        "{refused:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().anon_bytes > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = store.stats();
    assert_eq!(stats.anon_bytes, 0, "{stats:?}");
    assert_eq!(stats.evictions_reserve, 5);
    assert_eq!(stats.bytes_spilled, 1000);
    assert!(store.info(lora).unwrap().spilled);
}

#[test]
fn settings_that_cannot_work_are_config_errors() {
    let bad_dir = Store::builder()
        .spill_dir("/nonexistent/dir")
        .build()
        .unwrap_err();
    assert!(
        bad_dir.to_string().contains("/nonexistent/dir"),
        "{bad_dir}"
    );
    let trigger = lowtide::PressureTrigger {
        stall: Duration::from_millis(100),
        window: Duration::from_secs(3),
    };
    let err = Store::builder()
        .pressure_trigger(trigger)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("multiple of 2 s"), "{err}");
    assert!(Store::builder().spill_max(0).build().is_err());
    assert!(
        Store::builder()
            .sample_interval(Duration::ZERO)
            .build()
            .is_err()
    );
}

#[test]
fn spill_max_refusal_keeps_the_tensor_in_ram() {
    let dir = common::tempdir();
    let paths = three_models(dir.path());
    let store = Store::builder()
        .ram_budget(64 * MB)
        .spill_dir(dir.path())
        .spill_max(300_000)
        .build()
        .unwrap();
    let a = store.open_model(&paths[0]).unwrap();
    let x = store
        .derive(a, "x", Dtype::U8, &[200_000], vec![1; 200_000])
        .unwrap();
    let y = store
        .derive(a, "y", Dtype::U8, &[200_000], vec![2; 200_000])
        .unwrap();
    store.spill(x).unwrap();
    let err = store.spill(y).unwrap_err();
    let StoreError::Update(lowtide::UpdateError::Spill {
        name,
        source: SpillError::Limit { .. },
    }) = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(name, "y");
    assert!(store.info(y).unwrap().in_ram);
    assert!(store.acquire_ram(y).unwrap().iter().all(|&b| b == 2));
    // Eviction moves on past a failed spill instead of giving up.
    let outcome = store.free_memory(400_000);
    assert_eq!(outcome.spill_failures, 1);
    assert!(store.info(y).unwrap().in_ram);
    assert_eq!(store.stats().spill_failures, 2);
}

//! The Store: guards, RAM copies, the budget, derived and patched tensors, many threads.

mod common;

use std::sync::Arc;
use std::thread;

use lowtide::{Dtype, Store, StoreError, Tier};

fn store_with(budget: u64) -> (tempfile::TempDir, Store, lowtide::ModelId) {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    let store = Store::builder().ram_budget(budget).build().unwrap();
    let model = store.open_model(&path).unwrap();
    (dir, store, model)
}

#[test]
fn store_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
    assert_send_sync::<lowtide::TensorGuard>();
}

#[test]
fn mapped_and_ram_views_hold_the_file_bytes() {
    let (_dir, store, model) = store_with(64 << 20);
    for spec in common::unet_specs("") {
        let id = store.tensor(model, &spec.name).unwrap();
        let len = spec.byte_len().unwrap();
        let expected = common::expected(&spec.name, len);
        {
            let mapped = common::mapped(&store, id).unwrap();
            assert_eq!(mapped.tier(), Tier::Mapped);
            assert_eq!(&mapped[..], &expected[..], "{}", spec.name);
        }
        let ram = store.acquire_ram(id).unwrap();
        assert_eq!(ram.tier(), Tier::Ram);
        assert_eq!(&ram[..], &expected[..]);
        // Once there is a RAM copy, plain acquire serves it.
        assert_eq!(store.acquire_ram(id).unwrap().tier(), Tier::Ram);
    }
    let stats = store.stats();
    let total: u64 = common::unet_specs("")
        .iter()
        .map(|s| s.byte_len().unwrap())
        .sum();
    assert_eq!(stats.anon_bytes, total);
    assert_eq!(stats.anon_peak_bytes, total);
    assert_eq!(stats.bytes_written, 0);
    assert_eq!(
        stats.bytes_read_source,
        2 * total,
        "mapped fault-in + pread, once each"
    );
}

#[test]
fn unknown_names_and_handles_are_typed_errors() {
    let (_dir, store, model) = store_with(1 << 20);
    let err = store.tensor(model, "nope").unwrap_err();
    assert!(
        matches!(&err, StoreError::Handle(lowtide::HandleError::NoSuchTensor { name, .. }) if name == "nope"),
        "{err}"
    );
    let id = store.tensor(model, "conv_in.weight").unwrap();
    store.close_model(model).unwrap();
    assert!(matches!(
        store.acquire_ram(id),
        Err(StoreError::Handle(
            lowtide::HandleError::UnknownTensor { .. }
        ))
    ));
    assert!(matches!(
        store.tensors(model),
        Err(StoreError::Handle(
            lowtide::HandleError::UnknownModel { .. }
        ))
    ));
}

#[test]
fn the_budget_evicts_clean_copies_least_recently_used_first() {
    // Budget for the two largest tensors (1.6 MB + 1.2 MB) but not three.
    let (_dir, store, model) = store_with(3_000_000);
    let big = store
        .tensor(model, "time_embedding.linear_1.weight")
        .unwrap(); // 1.6 MB
    let conv = store
        .tensor(model, "mid_block.resnets.0.conv1.weight")
        .unwrap(); // 737 KB
    let quant = store.tensor(model, "mid_block.quant.weight").unwrap(); // 410 KB
    let k = store
        .tensor(model, "down_blocks.0.attentions.0.to_k.weight")
        .unwrap(); // 491 KB
    drop(store.acquire_ram(big).unwrap());
    drop(store.acquire_ram(conv).unwrap());
    drop(store.acquire_ram(quant).unwrap());
    drop(store.acquire_ram(big).unwrap()); // big is now the most recent
    // 1.6 + 0.74 + 0.41 = 2.75 MB; adding 0.49 MB needs 0.24 MB: conv (the LRU) goes.
    drop(store.acquire_ram(k).unwrap());
    assert!(
        !store.info(conv).unwrap().in_ram,
        "least recently used copy evicted"
    );
    assert!(store.info(quant).unwrap().in_ram);
    assert!(store.info(big).unwrap().in_ram);
    assert!(store.stats().anon_bytes <= 3_000_000);
    assert_eq!(store.stats().evictions, 1);
    assert_eq!(store.stats().bytes_written, 0);
}

#[test]
fn pinned_copies_are_never_evicted_and_over_budget_is_an_error() {
    let (_dir, store, model) = store_with(2_000_000);
    let big = store
        .tensor(model, "time_embedding.linear_1.weight")
        .unwrap(); // 1.6 MB
    let conv = store
        .tensor(model, "mid_block.resnets.0.conv1.weight")
        .unwrap(); // 737 KB
    let pinned = store.acquire_ram(big).unwrap();
    let err = store.acquire_ram(conv).unwrap_err();
    let StoreError::Memory(lowtide::MemoryError::OverBudget {
        name,
        requested,
        available,
        budget,
    }) = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(name, "mid_block.resnets.0.conv1.weight");
    assert_eq!(*requested, 737_280);
    assert_eq!(*available, 2_000_000 - 1_638_400);
    assert_eq!(*budget, 2_000_000);
    assert!(store.info(big).unwrap().in_ram);
    assert!(matches!(
        store.drop_clean(big),
        Err(StoreError::Update(lowtide::UpdateError::Pinned {
            pins: 1,
            ..
        }))
    ));
    // The mapped view still works without RAM.
    assert_eq!(common::mapped(&store, conv).unwrap().tier(), Tier::Mapped);
    drop(pinned);
    drop(store.acquire_ram(conv).unwrap());
    assert!(!store.info(big).unwrap().in_ram);
}

#[test]
fn derived_and_patched_tensors_are_dirty_and_kept() {
    let (_dir, store, model) = store_with(8 << 20);
    let bias = store.tensor(model, "conv_in.bias").unwrap();
    let patched: Vec<u8> = store
        .acquire_ram(bias)
        .unwrap()
        .iter()
        .map(|b| b ^ 0xff)
        .collect();
    store.replace(bias, patched.clone()).unwrap();
    let info = store.info(bias).unwrap();
    assert!(!info.clean && info.in_ram);
    // Dropping clean copies keeps the only copy of a dirty tensor.
    let outcome = store.drop_clean(bias).unwrap();
    assert_eq!((outcome.ram_bytes, outcome.kept), (0, 1));
    assert_eq!(&store.acquire_ram(bias).unwrap()[..], &patched[..]);

    let lora = store
        .derive(model, "lora.down", Dtype::BF16, &[4, 320], vec![7; 2560])
        .unwrap();
    assert!(!store.info(lora).unwrap().clean);
    assert_eq!(store.stats().anon_bytes, 640 + 2560);
    let err = store
        .derive(model, "lora.down", Dtype::BF16, &[4, 320], vec![7; 2560])
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Update(lowtide::UpdateError::DuplicateName { .. })
        ),
        "{err}"
    );
    let err = store
        .derive(model, "lora.up", Dtype::F32, &[3], vec![0; 11])
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Update(lowtide::UpdateError::ByteLength {
                expected: 12,
                actual: 11,
                ..
            })
        ),
        "{err}"
    );
    let err = store
        .derive(model, "huge", Dtype::F32, &[usize::MAX, 2], vec![])
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Update(lowtide::UpdateError::BadShape { .. })
        ),
        "{err}"
    );
    // Replacing while pinned is refused and changes nothing.
    let guard = store.acquire_ram(lora).unwrap();
    assert!(matches!(
        store.replace(lora, vec![1; 2560]),
        Err(StoreError::Update(lowtide::UpdateError::Pinned { .. }))
    ));
    assert_eq!(&guard[..], &[7; 2560][..]);
    assert_eq!(store.stats().bytes_written, 0);
}

#[test]
fn release_model_drops_every_clean_copy() {
    let (_dir, store, model) = store_with(64 << 20);
    for id in store.tensors(model).unwrap() {
        drop(common::mapped(&store, id).unwrap());
        drop(store.acquire_ram(id).unwrap());
    }
    let held = store.stats().anon_bytes;
    let outcome = store.release_model(model).unwrap();
    assert_eq!(outcome.ram_bytes, held);
    assert!(outcome.mapped_bytes > 0);
    assert_eq!(store.stats().anon_bytes, 0);
    for id in store.tensors(model).unwrap() {
        let info = store.info(id).unwrap();
        assert!(!info.in_ram && !info.mapped);
    }
}

#[test]
fn many_threads_share_one_store() {
    let (_dir, store, model) = store_with(2_500_000);
    let ids = Arc::new(store.tensors(model).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            let ids = Arc::clone(&ids);
            thread::spawn(move || {
                for i in 0..200 {
                    let id = ids[(t * 7 + i * 3) % ids.len()];
                    let name = store.info(id).unwrap().name;
                    let guard = match i % 3 {
                        0 => common::mapped(&store, id).unwrap(),
                        _ => match store.acquire_ram(id) {
                            Ok(guard) => guard,
                            Err(StoreError::Memory(lowtide::MemoryError::OverBudget {
                                ..
                            })) => continue,
                            Err(err) => panic!("{err}"),
                        },
                    };
                    assert_eq!(&guard[..], &common::expected(&name, guard.len() as u64)[..]);
                    drop(guard);
                    if i % 5 == 0 {
                        let _ = store.drop_clean(id);
                    }
                    assert!(store.stats().anon_bytes <= 2_500_000);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    for id in ids.iter() {
        assert_eq!(store.info(*id).unwrap().pins, 0);
    }
    assert_eq!(store.stats().bytes_written, 0);
}

#[test]
fn zero_budget_is_a_config_error() {
    let err = Store::builder().ram_budget(0).build().unwrap_err();
    assert!(err.to_string().contains("ram_budget"));
}

#[test]
fn a_discarded_derived_tensor_leaves_nothing_behind() {
    let (_dir, store, model) = store_with(8 << 20);
    let patched = store
        .derive(
            model,
            "conv_in.weight#patched",
            Dtype::F32,
            &[512],
            vec![3; 2048],
        )
        .unwrap();
    store.spill(patched).unwrap();
    assert!(store.spill_used() > 0);
    let guard = store.acquire_ram(patched).unwrap();
    let err = store.discard(patched).unwrap_err();
    assert!(
        matches!(err, StoreError::Update(lowtide::UpdateError::Pinned { .. })),
        "{err}"
    );
    drop(guard);
    assert_eq!(store.discard(patched).unwrap(), 2048); // its RAM copy, read back to check
    assert_eq!(store.spill_used(), 0); // and its spill extent: nothing left behind
    assert_eq!(store.stats().anon_bytes, 0);
    assert!(store.tensor(model, "conv_in.weight#patched").is_err());
    assert!(store.info(patched).is_err());
    // The name can be derived again.
    let again = store
        .derive(
            model,
            "conv_in.weight#patched",
            Dtype::F32,
            &[512],
            vec![4; 2048],
        )
        .unwrap();
    assert_eq!(&store.acquire_ram(again).unwrap()[..], &[4; 2048][..]);
    // A tensor opened from the file is reverted, never discarded.
    let bias = store.tensor(model, "conv_in.bias").unwrap();
    let err = store.discard(bias).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Update(lowtide::UpdateError::FromFile { .. })
        ),
        "{err}"
    );
}

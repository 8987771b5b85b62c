//! Dropping copies on purpose returns at once and gives the memory back in the background,
//! never beyond the budget. A binary of its own: it reads the process's resident memory.

mod common;

use lowtide::{Dtype, Store};
use lowtide_testkit::{ProcMemory, TensorSpec};

#[test]
fn released_copies_go_back_to_the_system_in_the_background_within_the_budget() {
    let dir = common::tempdir();
    let specs: Vec<TensorSpec> = (0..8)
        .map(|i| TensorSpec::new(format!("blocks.{i}.w"), Dtype::BF16, &[2048, 2048]))
        .collect();
    let path = common::write(&dir.path().join("m.safetensors"), &specs);
    let budget = 96u64 << 20;
    let store = Store::builder()
        .ram_budget(budget)
        .monitor(false)
        .build()
        .unwrap();
    let model = store.open_model(&path).unwrap();
    let ids = store.tensors(model).unwrap();
    let load = || {
        for &id in &ids {
            let guard = store.acquire_ram(id).unwrap();
            let name = store.info(id).unwrap().name;
            assert_eq!(&guard[..], &common::expected(&name, guard.len() as u64)[..]);
        }
    };
    load();
    let held = store.stats().anon_bytes;
    assert_eq!(held, 64 << 20);
    let Some(before) = ProcMemory::read() else {
        println!("skipped: /proc/self/status is not readable here");
        return;
    };

    let outcome = store.release_model(model).unwrap();
    assert_eq!(outcome.ram_bytes, held);
    let stats = store.stats();
    assert_eq!(stats.anon_bytes, 0);
    assert!(stats.release_pending_bytes <= held);
    store.wait_released();
    assert_eq!(store.stats().release_pending_bytes, 0);
    let after = ProcMemory::read().unwrap();
    assert!(
        after.rss_anon + (56 << 20) <= before.rss_anon,
        "resident anonymous memory {} -> {} after releasing {held} bytes",
        before.rss_anon,
        after.rss_anon
    );

    // Release and reload at once, twice: the reload needs the room the releases still hold,
    // and waits for them (the strict invariants, on in tests, count them against the budget).
    for _ in 0..2 {
        load();
        store.release_model(model).unwrap();
    }
    load();
    assert_eq!(store.stats().anon_bytes, held);
}

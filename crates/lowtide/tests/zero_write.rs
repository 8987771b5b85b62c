//! Dropping clean copies writes nothing: checked with the process's own write counters.
//!
//! This binary holds a single test so that no other test writes while it measures.

mod common;

use lowtide::Store;
use lowtide_testkit::ProcIo;

#[test]
fn dropping_clean_copies_writes_zero_bytes() {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    let store = Store::builder().ram_budget(64 << 20).build().unwrap();
    let model = store.open_model(&path).unwrap();
    let ids = store.tensors(model).unwrap();
    for &id in &ids {
        drop(common::mapped(&store, id).unwrap());
        drop(store.acquire_ram(id).unwrap());
    }
    let held = store.stats().anon_bytes;
    assert!(held > 2_000_000);

    let Some(before) = ProcIo::read() else {
        eprintln!(
            "skipped: /proc/self/io is not readable here; the Store's own counter is checked"
        );
        let outcome = store.release_model(model).unwrap();
        assert_eq!(outcome.ram_bytes, held);
        assert_eq!(store.stats().bytes_written, 0);
        return;
    };
    let outcome = store.release_model(model).unwrap();
    let after = ProcIo::read().unwrap();

    assert_eq!(outcome.ram_bytes, held);
    assert!(outcome.mapped_bytes > 0, "mapped pages were released");
    assert_eq!(store.stats().anon_bytes, 0);
    assert_eq!(store.stats().bytes_written, 0);
    assert_eq!(after.wchar, before.wchar, "no write system call");
    assert_eq!(
        after.write_bytes, before.write_bytes,
        "nothing sent to storage"
    );
}

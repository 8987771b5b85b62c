//! Disk full on a real tiny file system: a tmpfs of 1 MiB mounted by the test (root only).

mod common;

use lowtide::{Dtype, SpillError, Store, StoreError};
use lowtide_testkit::Mount;

fn skip(why: &str) {
    eprintln!("skipped: disk-full test on a real tmpfs: {why}");
}

#[test]
fn a_full_disk_is_a_typed_error_and_nothing_is_lost() {
    let fs = match Mount::tmpfs("1m") {
        Ok(fs) => fs,
        Err(why) => return skip(&why),
    };
    let models = common::tempdir();
    let path = common::unet(&models);
    let store = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(fs.path())
        .build()
        .unwrap();
    let model = store.open_model(&path).unwrap();
    let part = 300 * 1024;
    let fill = |i: u8| vec![i; part];
    let ids: Vec<_> = (0..5u8)
        .map(|i| {
            store
                .derive(model, &format!("patched.{i}"), Dtype::U8, &[part], fill(i))
                .unwrap()
        })
        .collect();

    // Three 300 KiB extents fit in 1 MiB; the fourth does not.
    let mut spilled = Vec::new();
    let mut refused = None;
    for &id in &ids {
        match store.spill(id) {
            Ok(_) => spilled.push(id),
            Err(StoreError::Update(lowtide::UpdateError::Spill {
                source: SpillError::NoSpace { dir, .. },
                name,
            })) => {
                assert_eq!(dir, fs.path());
                refused = Some((id, name));
                break;
            }
            Err(other) => panic!("expected a disk-full error, got {other}"),
        }
    }
    let (full_id, name) = refused.expect("a 1 MiB file system must fill up");
    assert!(spilled.len() >= 2, "{} extents fit", spilled.len());
    assert!(
        store.info(full_id).unwrap().in_ram,
        "`{name}` keeps its RAM copy"
    );
    assert!(store.stats().spill_failures >= 1);

    // Every tensor is still readable with the right bytes. A restored tensor keeps its spill
    // copy while its bytes are unchanged (evicting it again writes nothing)...
    for (i, &id) in ids.iter().enumerate() {
        assert!(
            store.acquire_ram(id).unwrap().iter().all(|&b| b == i as u8),
            "tensor {i}"
        );
    }
    let first = store.info(spilled[0]).unwrap();
    assert!(first.in_ram && first.spilled, "restored and still spilled");
    assert!(store.spill_used() > 0);
    // ...until the disk is full: then those redundant copies are freed and the write retried.
    store.spill(full_id).unwrap();
    assert!(store.info(full_id).unwrap().spilled);
    assert!(
        store
            .acquire_ram(full_id)
            .unwrap()
            .iter()
            .all(|&b| b == spilled.len() as u8)
    );
    drop(store);
    assert_eq!(
        std::fs::read_dir(fs.path()).unwrap().count(),
        0,
        "nothing left behind"
    );
}

/// A model file larger than the file system: the writer fails with `ENOSPC` and leaves no
/// file and no used space behind (it never had a name); a smaller one then fits.
#[test]
fn a_model_written_to_a_full_disk_leaves_nothing_behind() {
    use std::collections::BTreeMap;

    use lowtide_testkit::{CreateOutcome, TensorSpec, create_safetensors, write_safetensors};

    let fs = match Mount::tmpfs("1m") {
        Ok(fs) => fs,
        Err(why) => return skip(&why),
    };
    let used = || {
        let stat = rustix::fs::statvfs(fs.path()).unwrap();
        (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    };
    let before = used();
    let path = fs.path().join("big.safetensors");
    let big = [TensorSpec::new("w", Dtype::U8, &[4 << 20])];
    let none = BTreeMap::new();
    for replace in [false, true] {
        let err = if replace {
            write_safetensors(&path, &big, &none, |_, buf| buf.fill(1)).unwrap_err()
        } else {
            create_safetensors(&path, &big, &none, |_, buf| buf.fill(1)).unwrap_err()
        };
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::NOSPC.raw_os_error()),
            "{err}"
        );
        assert_eq!(
            std::fs::read_dir(fs.path()).unwrap().count(),
            0,
            "nothing left behind"
        );
        // Freed when the file's last reference goes, which a fork by a test running
        // alongside (mount, umount) may hold for a moment.
        let freed = (0..100).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            used() == before
        });
        assert!(freed, "no space held: {} bytes used", used() - before);
    }
    let small = [TensorSpec::new("w", Dtype::U8, &[256 << 10])];
    let outcome = create_safetensors(&path, &small, &none, |_, buf| buf.fill(1)).unwrap();
    assert!(
        matches!(outcome, CreateOutcome::Written { .. }),
        "{outcome:?}"
    );
}

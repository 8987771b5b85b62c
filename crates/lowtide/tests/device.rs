//! The device tier with `SimDevice`: the ComfyUI proposal's unload scenario, partial unloads,
//! loading within a device budget; reaching a device copy's memory in place (downcasting the
//! store's device, the sim's byte accessors and their errors).

mod common;

use std::sync::Arc;

use common::TensorSpec;
use lowtide::{
    Device, DeviceAlloc, DeviceError, DeviceId, Dtype, ModelId, SimDevice, Store, StoreError,
    TensorId,
};

const KIB: u64 = 1024;

/// A model of ten 256 KiB tensors.
fn model(dir: &std::path::Path) -> std::path::PathBuf {
    let specs: Vec<TensorSpec> = (0..10)
        .map(|i| TensorSpec::new(format!("block.{i}.weight"), Dtype::BF16, &[128, 1024]))
        .collect();
    common::write(&dir.join("model.safetensors"), &specs)
}

/// A store (64 MiB of RAM, spill in `dir`, no monitor) with the ten-tensor model open and
/// an 8 MiB `SimDevice`.
fn setup(dir: &std::path::Path) -> (Store, Arc<SimDevice>, DeviceId, ModelId) {
    let store = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(dir)
        .monitor(false)
        .build()
        .unwrap();
    let sim = Arc::new(SimDevice::new("sim0", 8 << 20));
    let gpu = store.add_device(sim.clone());
    let m = store.open_model(model(dir)).unwrap();
    (store, sim, gpu, m)
}

fn expected(store: &Store, id: TensorId) -> Vec<u8> {
    let info = store.info(id).unwrap();
    common::expected(&info.name, info.len)
}

/// A low-rank-style patch: deterministic and different from the original bytes.
fn patch(bytes: &[u8]) -> Vec<u8> {
    bytes
        .iter()
        .enumerate()
        .map(|(i, b)| b.wrapping_add((i % 7) as u8 + 1))
        .collect()
}

#[test]
fn the_proposal_scenario_writes_only_the_patched_tensors() {
    let dir = common::tempdir();
    let (store, sim, gpu, m) = setup(dir.path());
    let loaded = store.load(m, gpu, None).unwrap();
    assert_eq!((loaded.device_tensors, loaded.host_tensors), (10, 0));
    assert_eq!(store.stats().anon_bytes, 0, "loading kept no host copy");

    // LoRA-patch three tensors on the device.
    let ids = store.tensors(m).unwrap();
    let patched: Vec<TensorId> = ids[..3].to_vec();
    let mut truth: Vec<Vec<u8>> = ids.iter().map(|&id| expected(&store, id)).collect();
    for (i, &id) in patched.iter().enumerate() {
        truth[i] = patch(&truth[i]);
        store.replace_on_device(id, gpu, &truth[i]).unwrap();
        assert!(!store.info(id).unwrap().clean);
    }

    // Host RAM is under the reserve: nothing may go to RAM.
    store.set_reserve_ram(u64::MAX / 4);
    let written_before = store.stats().bytes_written;
    let outcome = store.unload_all(m).unwrap();
    let patched_bytes = 3 * 256 * KIB;
    assert_eq!(outcome.to_spill_bytes, patched_bytes, "{outcome:?}");
    assert_eq!(
        outcome.clean_bytes,
        7 * 256 * KIB,
        "clean tensors: freed, nothing written"
    );
    assert_eq!(outcome.to_ram_bytes, 0);
    assert_eq!(outcome.not_freed_bytes, 0);
    assert_eq!(store.stats().bytes_written - written_before, patched_bytes);
    assert_eq!(sim.used(), 0);
    assert_eq!(
        store.stats().anon_bytes,
        0,
        "streamed to the spill file without a RAM copy"
    );

    // Reload: byte-identical.
    store.set_reserve_ram(0);
    store.load(m, gpu, None).unwrap();
    for (i, &id) in ids.iter().enumerate() {
        let guard = store.acquire_device(id, gpu).unwrap();
        assert_eq!(guard.download().unwrap(), truth[i], "tensor {i}");
    }
    // Unloading again writes nothing: the spill file still holds the patched bytes.
    let outcome = store.unload_all(m).unwrap();
    assert_eq!(outcome.clean_bytes, 10 * 256 * KIB);
    assert_eq!(store.stats().bytes_written - written_before, patched_bytes);
}

#[test]
fn unload_goes_to_ram_when_the_governor_allows() {
    let dir = common::tempdir();
    let store = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(dir.path())
        .build()
        .unwrap();
    let gpu = store.add_device(Arc::new(SimDevice::new("sim0", 8 << 20)));
    let m = store.open_model(model(dir.path())).unwrap();
    let id = store.tensors(m).unwrap()[0];
    let bytes = patch(&expected(&store, id));
    store.replace_on_device(id, gpu, &bytes).unwrap();
    let outcome = store.unload_all(m).unwrap();
    assert_eq!(outcome.to_ram_bytes, 256 * KIB);
    assert_eq!(store.stats().bytes_written, 0);
    assert_eq!(&store.acquire_ram(id).unwrap()[..], &bytes[..]);
}

#[test]
fn when_neither_ram_nor_spill_can_take_it_the_device_copy_stays() {
    let dir = common::tempdir();
    // A budget under the tensor's size keeps it out of RAM. (A reserve would do too, but it
    // also refuses uploads to a simulated device: its memory is the host's.)
    let store = Store::builder()
        .ram_budget(64 * KIB)
        .monitor(false)
        .spill_dir(dir.path())
        .spill_max(100 * KIB)
        .build()
        .unwrap();
    let gpu = store.add_device(Arc::new(SimDevice::new("sim0", 8 << 20)));
    let m = store.open_model(model(dir.path())).unwrap();
    let id = store.tensors(m).unwrap()[0];
    let bytes = patch(&expected(&store, id));
    store.replace_on_device(id, gpu, &bytes).unwrap();
    let outcome = store.unload_all(m).unwrap();
    assert_eq!(outcome.not_freed_bytes, 256 * KIB, "{outcome:?}");
    assert_eq!(store.stats().spill_failures, 1);
    assert_eq!(
        store.acquire_device(id, gpu).unwrap().download().unwrap(),
        bytes,
        "nothing lost"
    );
}

#[test]
fn partial_unload_frees_what_was_asked_in_policy_order_and_never_a_pinned_copy() {
    let dir = common::tempdir();
    let store = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(dir.path())
        .build()
        .unwrap();
    let gpu = store.add_device(Arc::new(SimDevice::new("sim0", 8 << 20)));
    let m = store.open_model(model(dir.path())).unwrap();
    store.load(m, gpu, None).unwrap();
    let ids = store.tensors(m).unwrap();
    // Use tensors 0..4 again, most recently 3; pin tensor 0 (the oldest of the four).
    for &id in &ids[..4] {
        drop(store.acquire_device(id, gpu).unwrap());
    }
    let pinned = store.acquire_device(ids[0], gpu).unwrap();
    // Make tensor 9 dirty on the device: evicting it costs a write.
    store
        .replace_on_device(ids[9], gpu, &patch(&expected(&store, ids[9])))
        .unwrap();
    let outcome = store.unload(m, 600 * KIB).unwrap();
    assert!(outcome.freed_bytes >= 600 * KIB, "{outcome:?}");
    assert_eq!(outcome.freed_bytes, 768 * KIB, "three 256 KiB copies");
    assert_eq!(
        outcome.clean_bytes, outcome.freed_bytes,
        "clean copies go first"
    );
    assert_eq!(outcome.pinned, 1);
    assert!(
        ids.iter().all(|&id| !store.info(id).unwrap().spilled),
        "nothing spilled"
    );
    // The least recently used clean copies went: tensors 4, 5, 6 (used only by the load).
    let on_device: Vec<bool> = ids
        .iter()
        .map(|&id| store.info(id).unwrap().device == Some(gpu))
        .collect();
    assert_eq!(
        on_device,
        [
            true, true, true, true, false, false, false, true, true, true
        ]
    );
    let sim = store.device(gpu).unwrap();
    assert_eq!(sim.capacity() - sim.free_bytes(), 7 * 256 * KIB);
    drop(pinned);
}

#[test]
fn loading_within_a_device_budget_leaves_the_rest_on_the_host() {
    let dir = common::tempdir();
    let store = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(dir.path())
        .build()
        .unwrap();
    // The device holds four tensors; the load budget allows three.
    let gpu = store.add_device(Arc::new(SimDevice::new("sim0", 1024 * KIB)));
    let m = store.open_model(model(dir.path())).unwrap();
    let outcome = store.load(m, gpu, Some(800 * KIB)).unwrap();
    assert_eq!((outcome.device_tensors, outcome.host_tensors), (3, 7));
    assert_eq!(outcome.device_bytes, 768 * KIB);
    // Every tensor is still served: host ones by the mapped file, and on the device on demand
    // (unloading others to make room).
    for &id in &store.tensors(m).unwrap() {
        assert_eq!(
            &store.acquire_ram(id).unwrap()[..],
            &expected(&store, id)[..]
        );
        let guard = store.acquire_device(id, gpu).unwrap();
        assert_eq!(guard.download().unwrap(), expected(&store, id));
    }
    // With four copies pinned the fifth cannot fit: a typed error, nothing unloaded.
    let ids = store.tensors(m).unwrap();
    let guards: Vec<_> = ids[..4]
        .iter()
        .map(|&id| store.acquire_device(id, gpu).unwrap())
        .collect();
    let err = store.acquire_device(ids[4], gpu).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Memory(lowtide::MemoryError::DeviceFull {
                requested: 262_144,
                ..
            })
        ),
        "{err}"
    );
    drop(guards);
    assert_eq!(store.stats().bytes_written, 0);
}

#[test]
fn reverting_a_patch_writes_nothing_and_restores_the_file_bytes() {
    let dir = common::tempdir();
    let store = Store::builder()
        .ram_budget(64 << 20)
        .spill_dir(dir.path())
        .build()
        .unwrap();
    let gpu = store.add_device(Arc::new(SimDevice::new("sim0", 8 << 20)));
    let m = store.open_model(model(dir.path())).unwrap();
    let id = store.tensors(m).unwrap()[0];
    let original = expected(&store, id);
    store.replace_on_device(id, gpu, &patch(&original)).unwrap();
    store.spill(id).unwrap_or_default();
    store.set_reserve_ram(u64::MAX / 4);
    store.unload_all(m).unwrap();
    assert!(store.info(id).unwrap().spilled);
    let written = store.stats().bytes_written;
    store.set_reserve_ram(0);
    store.revert(id).unwrap();
    let info = store.info(id).unwrap();
    assert!(
        info.clean && !info.spilled && info.device.is_none(),
        "{info:?}"
    );
    assert_eq!(store.spill_used(), 0);
    assert_eq!(&store.acquire_ram(id).unwrap()[..], &original[..]);
    assert_eq!(
        store.acquire_device(id, gpu).unwrap().download().unwrap(),
        original
    );
    assert_eq!(store.stats().bytes_written, written);
    // Derived tensors have nothing to revert to.
    let lora = store
        .derive(m, "lora", Dtype::U8, &[4], vec![1; 4])
        .unwrap();
    assert!(matches!(
        store.revert(lora),
        Err(StoreError::Update(lowtide::UpdateError::NotFromFile { .. }))
    ));
}

/// A patched tensor uploaded to a device may lose its RAM copy to eviction (the device holds
/// its bytes, so nothing is written); reading it on the host again downloads it. Found by
/// the eight-thread stress test, where this path panicked.
#[test]
fn a_patched_tensor_whose_only_copy_is_on_a_device_reads_back_on_the_host() {
    let dir = common::tempdir();
    let (store, sim, gpu, m) = setup(dir.path());
    let id = store.tensors(m).unwrap()[0];
    let patched = patch(&expected(&store, id));
    store.replace(id, patched.clone()).unwrap();
    drop(store.acquire_device(id, gpu).unwrap());
    // Evict every RAM copy: the patched one is dropped, its device copy kept.
    let freed = store.free_memory(u64::MAX);
    assert_eq!(
        freed.spilled_bytes, 0,
        "nothing written: the device holds the bytes"
    );
    let info = store.info(id).unwrap();
    assert!(!info.in_ram && !info.spilled && info.device.is_some());

    let downloaded = sim.bytes_downloaded();
    assert_eq!(&store.acquire_ram(id).unwrap()[..], &patched[..]);
    assert_eq!(&store.acquire_ram(id).unwrap()[..], &patched[..]);
    assert_eq!(sim.bytes_downloaded() - downloaded, patched.len() as u64);
    assert_eq!(store.stats().bytes_written, 0);
}

/// A device of another kind, for downcasts that must fail.
#[derive(Debug)]
struct OtherDevice;

impl Device for OtherDevice {
    fn name(&self) -> String {
        "other".to_owned()
    }
    fn capacity(&self) -> u64 {
        0
    }
    fn free_bytes(&self) -> u64 {
        0
    }
    fn allocate(&self, len: u64) -> Result<DeviceAlloc, DeviceError> {
        Err(DeviceError::OutOfMemory {
            device: self.name(),
            requested: len,
            free: 0,
        })
    }
    fn release(&self, _alloc: DeviceAlloc) {}
    fn upload(&self, dst: &DeviceAlloc, _offset: u64, _src: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::UnknownAlloc {
            device: self.name(),
            id: dst.id(),
        })
    }
    fn download(
        &self,
        src: &DeviceAlloc,
        _offset: u64,
        _dst: &mut [u8],
    ) -> Result<(), DeviceError> {
        Err(DeviceError::UnknownAlloc {
            device: self.name(),
            id: src.id(),
        })
    }
}

#[test]
fn the_stores_device_downcasts_to_the_sim_device_it_was_given() {
    let dir = common::tempdir();
    let (store, sim, gpu, _m) = setup(dir.path());
    let device = store.device(gpu).unwrap();
    let found = device.downcast_ref::<SimDevice>().expect("a SimDevice");
    assert!(
        std::ptr::eq(found, Arc::as_ptr(&sim)),
        "the very device added"
    );
    assert!(device.as_any().is::<SimDevice>());
    assert!(device.downcast_ref::<OtherDevice>().is_none());
    let shared = device.downcast_arc::<SimDevice>().expect("a SimDevice");
    assert!(Arc::ptr_eq(&shared, &sim));

    let other = store.add_device(Arc::new(OtherDevice));
    let other = store.device(other).unwrap();
    assert!(other.downcast_ref::<SimDevice>().is_none());
    let back = other
        .downcast_arc::<SimDevice>()
        .expect_err("not a SimDevice");
    assert!(
        back.downcast_ref::<OtherDevice>().is_some(),
        "the Arc comes back"
    );
}

#[test]
fn a_device_copy_changes_in_place_and_reads_back_changed() {
    let dir = common::tempdir();
    let (store, sim, gpu, m) = setup(dir.path());
    let id = store.tensors(m).unwrap()[0];
    let original = expected(&store, id);
    let guard = store.acquire_device(id, gpu).unwrap();
    let device = guard
        .device()
        .downcast_ref::<SimDevice>()
        .expect("a SimDevice");
    let (uploaded, downloaded) = (sim.bytes_uploaded(), sim.bytes_downloaded());

    // The slice is the device memory itself: it holds the tensor's bytes as uploaded.
    let same = device
        .with_bytes(guard.alloc(), |bytes| bytes == &original[..])
        .unwrap();
    assert!(same);
    let len = device
        .with_bytes_mut(guard.alloc(), |bytes| {
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = b.wrapping_add((i % 7) as u8 + 1);
            }
            bytes.len()
        })
        .unwrap();
    assert_eq!(len as u64, guard.alloc().len());
    // A sub-range: the last 4 bytes.
    let end = guard.alloc().len();
    device
        .with_range_mut(guard.alloc(), end - 4, 4, |bytes| {
            bytes.copy_from_slice(b"tail");
        })
        .unwrap();
    assert_eq!(
        (sim.bytes_uploaded(), sim.bytes_downloaded()),
        (uploaded, downloaded),
        "in place: no transfer"
    );

    let mut truth = patch(&original);
    let n = truth.len();
    truth[n - 4..].copy_from_slice(b"tail");
    assert!(
        guard.download().unwrap() == truth,
        "download sees the change"
    );
    let mut head = [0u8; 16];
    sim.download(guard.alloc(), 0, &mut head).unwrap();
    assert_eq!(head[..], truth[..16]);
    let tail = device
        .with_range(guard.alloc(), end - 4, 4, <[u8]>::to_vec)
        .unwrap();
    assert_eq!(tail, b"tail");
}

#[test]
fn accessors_refuse_a_foreign_or_released_handle_and_a_range_outside() {
    let a = SimDevice::new("simA", 1 << 20);
    let b = SimDevice::new("simB", 1 << 20);
    let in_b = b.allocate(64).unwrap();
    let in_a = a.allocate(64).unwrap();
    let mut called = false;

    // A handle of another device: its id is unknown here, whatever B holds.
    let err = b
        .with_bytes_mut(&in_a, |_| called = true)
        .expect_err("a handle of another device");
    assert!(
        matches!(&err, DeviceError::UnknownAlloc { device, id } if device == "simB" && *id == in_a.id()),
        "{err:?}"
    );
    assert!(matches!(
        b.with_bytes(&in_a, |_| called = true),
        Err(DeviceError::UnknownAlloc { .. })
    ));
    assert!(matches!(
        b.download(&in_a, 0, &mut [0; 8]),
        Err(DeviceError::UnknownAlloc { .. })
    ));

    // Ranges outside the allocation, including ones whose end overflows.
    for (offset, len) in [(60, 5), (65, 0), (0, 65), (u64::MAX, 2), (1, u64::MAX)] {
        let err = a
            .with_range_mut(&in_a, offset, len, |_| called = true)
            .expect_err("outside");
        assert!(
            matches!(err, DeviceError::Range { offset: o, len: l, alloc_len: 64, .. } if (o, l) == (offset, len)),
            "{err:?}"
        );
        assert!(matches!(
            a.with_range(&in_a, offset, len, |_| called = true),
            Err(DeviceError::Range { .. })
        ));
    }
    assert_eq!(a.with_range(&in_a, 64, 0, <[u8]>::len).unwrap(), 0);

    // A handle made up with the right id and a wrong length cannot reach past the memory.
    let forged = DeviceAlloc::new(in_a.id(), 4096);
    assert!(matches!(
        a.with_bytes(&forged, |_| called = true),
        Err(DeviceError::Range { alloc_len: 64, .. })
    ));
    assert!(matches!(
        a.upload(&forged, 100, b"beyond"),
        Err(DeviceError::Range { .. })
    ));
    assert!(matches!(
        a.download(&forged, 0, &mut [0; 128]),
        Err(DeviceError::Range { .. })
    ));

    // A released handle (its twin kept to ask with).
    let twin = DeviceAlloc::new(in_a.id(), in_a.len());
    a.release(in_a);
    assert!(matches!(
        a.with_bytes_mut(&twin, |_| called = true),
        Err(DeviceError::UnknownAlloc { .. })
    ));
    assert_eq!(a.used(), 0);
    assert!(!called, "no closure ran on a refused handle or range");
    b.release(in_b);
    assert_eq!(b.used(), 0);
}

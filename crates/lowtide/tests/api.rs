//! The Store's consumer-facing API: typed views, listing, fates chosen by a plugged-in
//! policy, and patching a device copy in place.

mod common;

use std::sync::Arc;

use common::TensorSpec;
use lowtide::policy::{Candidate, DefaultPolicy, EvictionPolicy, Fate};
use lowtide::{Dtype, SimDevice, Store, StoreError, Tier, ViewError, bf16, f16};

fn store_with(dir: &tempfile::TempDir, budget: u64) -> (Store, lowtide::ModelId) {
    let path = common::unet(dir);
    let store = Store::builder().ram_budget(budget).build().unwrap();
    let model = store.open_model(&path).unwrap();
    (store, model)
}

#[test]
fn typed_views_check_dtype_and_alignment() {
    let dir = common::tempdir();
    let (store, model) = store_with(&dir, 64 << 20);
    let bias = store.tensor(model, "time_embedding.linear_1.bias").unwrap();
    let guard = store.acquire_ram(bias).unwrap();
    assert_eq!(guard.dtype(), Dtype::F32);
    assert_eq!(guard.shape(), &[1280]);
    let want: Vec<f32> = common::expected("time_embedding.linear_1.bias", 1280 * 4)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // Bit patterns compared: the synthetic bytes include NaNs.
    let as_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(as_bits(&guard.to_vec_of::<f32>().unwrap()), as_bits(&want));
    match guard.as_slice::<f32>() {
        Ok(slice) => assert_eq!(as_bits(slice), as_bits(&want)),
        Err(ViewError::Misaligned { align, .. }) => assert_eq!(align, 4),
        Err(err) => panic!("{err}"),
    }
    assert!(matches!(
        guard.as_slice::<u32>(),
        Err(ViewError::Dtype {
            have: Dtype::F32,
            want: Dtype::U32
        })
    ));
    // Derived tensors from a Vec are typed views too, and half types work.
    let halves: Vec<u8> = [1.5f32, -2.0, 0.25]
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect();
    let id = store
        .derive(model, "halves", Dtype::F16, &[3], halves)
        .unwrap();
    let guard = store.acquire_ram(id).unwrap();
    let values: Vec<f32> = guard
        .to_vec_of::<f16>()
        .unwrap()
        .iter()
        .map(|h| h.to_f32())
        .collect();
    assert_eq!(values, [1.5, -2.0, 0.25]);
    assert!(guard.as_slice::<bf16>().is_err());
    // A RAM copy restored from the spill file starts on a page.
    drop(guard);
    store.spill(id).unwrap();
    let guard = store.acquire_ram(id).unwrap();
    assert_eq!(guard.bytes().as_ptr() as usize % 4096, 0);
    assert_eq!(guard.as_slice::<f16>().unwrap().len(), 3);
}

#[test]
fn one_call_lists_names_dtypes_shapes_and_tiers() {
    let dir = common::tempdir();
    let (store, model) = store_with(&dir, 64 << 20);
    let ids = store.tensors(model).unwrap();
    drop(store.acquire_ram(ids[0]).unwrap());
    let list = store.list(model).unwrap();
    assert_eq!(list.len(), common::unet_specs("").len());
    let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted, "ordered by name");
    for (info, id) in list.iter().zip(&ids) {
        assert_eq!(info.id, *id);
        assert_eq!(store.info(*id).unwrap(), *info);
    }
    assert_eq!(list[0].tiers(), vec![Tier::Ram]);
    assert!(list[1..].iter().all(|t| t.tiers().is_empty() && t.clean));
    let conv = list.iter().find(|t| t.name == "conv_in.weight").unwrap();
    assert_eq!(
        (conv.dtype, conv.shape.as_slice()),
        (Dtype::F16, &[320usize, 4, 3, 3][..])
    );
}

/// Keeps everything, or says drop for everything: the store follows the first and refuses
/// the second where it would lose bytes.
#[derive(Debug)]
struct Fixed(Fate);

impl EvictionPolicy for Fixed {
    fn order(&self, candidates: &mut [Candidate]) {
        DefaultPolicy.order(candidates);
    }

    fn fate(&self, _: &Candidate) -> Fate {
        self.0
    }
}

#[test]
fn a_plugged_in_policy_chooses_fates_and_cannot_lose_bytes() {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    for (fate, frees_clean) in [(Fate::Keep, false), (Fate::Drop, true)] {
        let store = Store::builder()
            .ram_budget(64 << 20)
            .policy(Fixed(fate))
            .build()
            .unwrap();
        let model = store.open_model(&path).unwrap();
        let clean = store.tensors(model).unwrap()[0];
        drop(store.acquire_ram(clean).unwrap());
        let dirty = store
            .derive(model, "dirty", Dtype::U8, &[8192], vec![3u8; 8192])
            .unwrap();
        let outcome = store.free_memory(u64::MAX);
        assert_eq!(outcome.spilled_bytes, 0, "{fate:?}: nothing written");
        assert_eq!(store.info(clean).unwrap().in_ram, !frees_clean, "{fate:?}");
        // The dirty tensor's RAM copy is its only copy: kept either way.
        assert!(store.info(dirty).unwrap().in_ram, "{fate:?}");
        assert_eq!(store.acquire_ram(dirty).unwrap().to_vec(), vec![3u8; 8192]);
    }
}

#[test]
fn a_device_copy_patched_in_place_survives_an_unload() {
    let dir = common::tempdir();
    let specs = vec![TensorSpec::new("w", Dtype::U8, &[1 << 20])];
    let path = common::write(&dir.path().join("m.safetensors"), &specs);
    let store = Store::builder().ram_budget(8 << 20).build().unwrap();
    let model = store.open_model(&path).unwrap();
    let id = store.tensor(model, "w").unwrap();
    let device = store.add_device(Arc::new(SimDevice::new("sim0", 4 << 20)));
    let before = store.stats();
    let guard = store.acquire_device(id, device).unwrap();
    let sim = guard.device().downcast_ref::<SimDevice>().unwrap();
    sim.with_bytes_mut(guard.alloc(), |bytes| {
        for b in bytes.iter_mut() {
            *b = b.wrapping_add(1);
        }
    })
    .unwrap();
    // A second guard would read changed bytes: refused while it lives.
    let other = store.acquire_device(id, device).unwrap();
    assert!(matches!(
        store.mark_dirty_on_device(&guard),
        Err(StoreError::Update(lowtide::UpdateError::Pinned { .. }))
    ));
    drop(other);
    store.mark_dirty_on_device(&guard).unwrap();
    drop(guard);
    let info = store.info(id).unwrap();
    assert!(!info.clean && info.device.is_some() && !info.in_ram);
    let uploaded = store.stats().bytes_uploaded - before.bytes_uploaded;
    assert_eq!(
        uploaded,
        1 << 20,
        "one upload, no round trip through the host"
    );
    // Unloading keeps the patched bytes (in RAM: the budget allows it).
    let outcome = store.unload_all(model).unwrap();
    assert_eq!(outcome.to_ram_bytes, 1 << 20, "{outcome:?}");
    let want: Vec<u8> = common::expected("w", 1 << 20)
        .iter()
        .map(|b| b.wrapping_add(1))
        .collect();
    assert_eq!(store.acquire_ram(id).unwrap().to_vec(), want);
    // Reverting returns to the file's bytes and writes nothing.
    store.revert(id).unwrap();
    assert_eq!(
        store.acquire_ram(id).unwrap().to_vec(),
        common::expected("w", 1 << 20)
    );
    assert_eq!(store.stats().bytes_written, 0);
}

/// Making room ends with an error, not a hang, when evicting makes no progress: the policy
/// keeps every copy, or every spill fails.
#[test]
fn making_room_without_progress_fails_instead_of_waiting() {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let keep_all = Store::builder()
            .ram_budget(1 << 20)
            .policy(Fixed(Fate::Keep))
            .build()
            .unwrap();
        let model = keep_all.open_model(&path).unwrap();
        let first = keep_all
            .derive(model, "a", Dtype::U8, &[700 << 10], vec![1u8; 700 << 10])
            .unwrap();
        let second = keep_all.derive(model, "b", Dtype::U8, &[700 << 10], vec![2u8; 700 << 10]);
        let spill_dir = tempfile::tempdir().unwrap();
        // A spill limit smaller than any tensor: every spill fails.
        let no_room = Store::builder()
            .ram_budget(1 << 20)
            .spill_dir(spill_dir.path())
            .spill_max(4096)
            .build()
            .unwrap();
        let model = no_room.open_model(&path).unwrap();
        no_room
            .derive(model, "a", Dtype::U8, &[700 << 10], vec![1u8; 700 << 10])
            .unwrap();
        let third = no_room.derive(model, "b", Dtype::U8, &[700 << 10], vec![2u8; 700 << 10]);
        let kept = keep_all.info(first).unwrap().in_ram;
        tx.send((second.map(drop), third.map(drop), kept)).unwrap();
    });
    let (second, third, kept) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("making room did not return");
    assert!(
        matches!(
            second,
            Err(StoreError::Memory(lowtide::MemoryError::OverBudget { .. }))
        ),
        "{second:?}"
    );
    assert!(
        matches!(
            third,
            Err(StoreError::Memory(lowtide::MemoryError::OverBudget { .. }))
        ),
        "{third:?}"
    );
    assert!(kept, "the kept copy is still there");
}

/// A tensor that cannot fit on the device even after unloading everything else is refused
/// before anything is unloaded.
#[test]
fn an_upload_that_cannot_fit_unloads_nothing() {
    let dir = common::tempdir();
    let specs = vec![
        TensorSpec::new("small.a", Dtype::U8, &[1 << 20]),
        TensorSpec::new("small.b", Dtype::U8, &[1 << 20]),
        TensorSpec::new("huge", Dtype::U8, &[5 << 20]),
    ];
    let path = common::write(&dir.path().join("m.safetensors"), &specs);
    let store = Store::builder().ram_budget(32 << 20).build().unwrap();
    let model = store.open_model(&path).unwrap();
    let device = store.add_device(Arc::new(SimDevice::new("sim0", 4 << 20)));
    for name in ["small.a", "small.b"] {
        let id = store.tensor(model, name).unwrap();
        drop(store.acquire_device(id, device).unwrap());
    }
    let huge = store.tensor(model, "huge").unwrap();
    let err = store.acquire_device(huge, device).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Memory(lowtide::MemoryError::DeviceFull { .. })
        ),
        "{err}"
    );
    let on_device = store
        .list(model)
        .unwrap()
        .iter()
        .filter(|t| t.device.is_some())
        .count();
    assert_eq!(
        on_device, 2,
        "nothing was unloaded for a tensor that cannot fit"
    );
}

/// When the first victim's spill fails, copies that can go for free are evicted instead.
#[test]
fn a_failed_spill_falls_back_on_clean_copies() {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    let spill_dir = common::tempdir();
    let store = Store::builder()
        .ram_budget(2 << 20)
        .spill_dir(spill_dir.path())
        .spill_max(4096)
        .build()
        .unwrap();
    let idle = store.open_model(&path).unwrap();
    store.set_priority(idle, lowtide::Priority::Idle).unwrap();
    // The first victim in policy order: dirty, in an idle model, and unspillable.
    let dirty = store
        .derive(idle, "patched", Dtype::U8, &[1 << 20], vec![9u8; 1 << 20])
        .unwrap();
    let active = store.open_model(&path).unwrap();
    store
        .set_priority(active, lowtide::Priority::Active)
        .unwrap();
    let clean = store
        .tensor(active, "mid_block.resnets.0.conv1.weight")
        .unwrap();
    drop(store.acquire_ram(clean).unwrap());
    // Needs room: the dirty copy cannot be spilled, the clean one is dropped instead.
    let other = store
        .tensor(active, "down_blocks.0.attentions.0.to_k.weight")
        .unwrap();
    let guard = store.acquire_ram(other).unwrap();
    assert_eq!(guard.len(), 320 * 768 * 2);
    assert!(store.info(dirty).unwrap().in_ram, "the dirty copy stays");
    assert!(!store.info(clean).unwrap().in_ram, "the clean copy went");
    assert!(store.stats().spill_failures >= 1);
}

/// A recipe that needs its own tensor is an error, not a stack overflow, and leaves nothing
/// pinned or reserved.
#[test]
fn a_recipe_that_needs_itself_is_an_error() {
    let dir = common::tempdir();
    let (store, model) = store_with(&dir, 64 << 20);
    let me = Arc::new(std::sync::OnceLock::new());
    let recipe = {
        let (store, me) = (store.clone(), Arc::clone(&me));
        lowtide::Recipe::new(0.1, move || {
            let id = *me.get().expect("set after derive");
            store
                .acquire_ram(id)
                .map(|guard| guard.to_vec())
                .unwrap_or_default()
        })
    };
    let id = store
        .derive_with_recipe(model, "loop", Dtype::U8, &[4096], vec![1u8; 4096], recipe)
        .unwrap();
    me.set(id).unwrap();
    // Cheap to recompute: dropped, not spilled.
    assert_eq!(store.free_memory(u64::MAX).recipe_bytes, 4096);
    let err = store.acquire_ram(id).unwrap_err();
    assert!(matches!(err, StoreError::Restore(_)), "{err}");
    let info = store.info(id).unwrap();
    assert_eq!((info.pins, info.in_ram), (0, false));
    assert_eq!(store.stats().anon_bytes, 0);
}

/// A RAM copy written in place through its guard's memory (as a binding's DLPack view would)
/// is kept once marked dirty: spilled on eviction, never dropped.
#[test]
fn a_ram_copy_marked_dirty_is_kept() {
    let dir = common::tempdir();
    let (store, model) = store_with(&dir, 64 << 20);
    let name = "conv_in.bias";
    let id = store.tensor(model, name).unwrap();
    let guard = store.acquire_ram(id).unwrap();
    // Not marked: an eviction drops the copy (it is clean).
    assert!(matches!(
        store.mark_dirty(store.tensor(model, "logit_scale").unwrap()),
        Err(StoreError::Update(lowtide::UpdateError::NotInRam { .. }))
    ));
    store.mark_dirty(id).unwrap();
    let info = store.info(id).unwrap();
    assert!(!info.clean && info.in_ram && info.pins == 1);
    let bytes = guard.to_vec();
    drop(guard);
    let outcome = store.free_memory(u64::MAX);
    assert_eq!(outcome.spilled_bytes, bytes.len() as u64, "{outcome:?}");
    assert_eq!(store.acquire_ram(id).unwrap().to_vec(), bytes);
    // Reverting returns to the file.
    store.revert(id).unwrap();
    assert!(store.info(id).unwrap().clean);
}

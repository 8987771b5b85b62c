//! The restore engine: cold restores read with `O_DIRECT` and leave no second copy of the
//! bytes in the page cache; warm ones copy from the cache; both give the file's bytes.

mod common;

use common::TensorSpec;
use lowtide::direct::cached_bytes;
use lowtide::{Dtype, Store};

/// A store with room for every test file here, without the monitor thread.
fn store() -> Store {
    Store::builder()
        .ram_budget(256 << 20)
        .monitor(false)
        .build()
        .unwrap()
}

#[test]
fn cold_restores_bypass_the_page_cache_and_warm_ones_copy_from_it() {
    let dir = common::tempdir();
    // Odd shapes: tensors start and end off block boundaries.
    let specs: Vec<TensorSpec> = (0..8)
        .map(|i| TensorSpec::new(format!("blocks.{i}.w"), Dtype::BF16, &[257 + i, 1531]))
        .collect();
    let path = common::write(&dir.path().join("m.safetensors"), &specs);
    let Some((file, len, before)) = common::cold(&path) else {
        return;
    };
    let store = store();
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let total: u64 = ids.iter().map(|&id| store.info(id).unwrap().len).sum();
    for &id in &ids {
        let guard = store.acquire_ram(id).unwrap();
        let name = store.info(id).unwrap().name;
        assert_eq!(&guard[..], &common::expected(&name, guard.len() as u64)[..]);
    }
    let stats = store.stats();
    // The first tensor shares a page with the header, which opening read (buffered): those
    // bytes come from the cache, everything else from the disk.
    assert_eq!(stats.bytes_read_cold + stats.bytes_read_cached, total);
    assert!(stats.bytes_read_cached <= 16 * 1024, "{stats:?}");
    let after = cached_bytes(&file, 0, len).unwrap();
    // Opening read the header (buffered): a page or two. The data stayed out of the cache.
    assert!(
        after <= before + 16 * 1024,
        "cold restores left {after} of {len} bytes in the page cache (before: {before})"
    );

    // Warm the file, drop the RAM copies, restore again: copied from the cache.
    let before_warm = stats.bytes_read_cached;
    std::fs::read(&path).unwrap();
    store.release_model(m).unwrap();
    for &id in &ids {
        let guard = store.acquire_ram(id).unwrap();
        let name = store.info(id).unwrap().name;
        assert_eq!(&guard[..], &common::expected(&name, guard.len() as u64)[..]);
    }
    let stats = store.stats();
    assert_eq!(stats.bytes_written, 0);
    // Everything still cached now was cached during the restores (direct reads add nothing
    // and the kernel may evict pages meanwhile, never add them): it was all copied.
    let copied = stats.bytes_read_cached - before_warm;
    let source = lowtide::Source::open(&path).unwrap();
    let still = cached_in_tensors(&file, source.tensors());
    assert!(
        copied + EDGES * ids.len() as u64 >= still,
        "{still} bytes of the tensors are cached, {copied} were copied: {stats:?}"
    );
    assert!(
        still >= total / 2,
        "the kernel evicted most of a file just read ({still} of {total} bytes cached)"
    );
}

/// Slack per tensor when comparing byte counts with page-cache page counts: the two pages a
/// tensor shares with its neighbours.
const EDGES: u64 = 8192;

/// Cached bytes of the tensors' ranges (whole pages).
fn cached_in_tensors(file: &std::fs::File, tensors: &[lowtide::SourceTensor]) -> u64 {
    tensors
        .iter()
        .map(|t| cached_bytes(file, t.offset, t.len).unwrap())
        .sum()
}

#[test]
fn a_partly_cached_tensor_copies_its_cached_part_and_reads_the_rest_from_disk() {
    let dir = common::tempdir();
    // 24 MiB and a little: large enough for the multi-threaded copy, off block boundaries.
    let specs = [
        TensorSpec::new("head", Dtype::U8, &[1000]),
        TensorSpec::new("big", Dtype::BF16, &[3 << 20, 4]),
    ];
    let path = common::write(&dir.path().join("m.safetensors"), &specs);
    let Some((file, len, _)) = common::cold(&path) else {
        return;
    };
    let store = store();
    let m = store.open_model(&path).unwrap();
    let big = store.tensor(m, "big").unwrap();
    let info = lowtide::Source::open(&path)
        .unwrap()
        .tensor("big")
        .unwrap()
        .clone();
    // Cache 6 MiB in the middle of the tensor (readahead off, so exactly what is read).
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Random).unwrap();
    let middle = (info.offset + (8 << 20)) / 4096 * 4096;
    let mut scratch = vec![0u8; 6 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut scratch, middle).unwrap();
    let cached_before = cached_bytes(&file, 0, len).unwrap();
    let in_tensor = cached_bytes(&file, info.offset, info.len).unwrap();
    assert!(in_tensor >= 6 << 20, "{in_tensor}");

    let guard = store.acquire_ram(big).unwrap();
    assert_eq!(&guard[..], &common::expected("big", info.len)[..]);
    drop(guard);
    let stats = store.stats();
    assert_eq!(stats.bytes_read_cold + stats.bytes_read_cached, info.len);
    // The cached middle was copied, the rest read directly: no more than was cached before
    // was copied, and no less than is still cached after (pages may be evicted meanwhile,
    // never added: the direct reads left no copy behind). A page of slack at each end.
    let still = cached_bytes(&file, info.offset, info.len).unwrap();
    assert!(
        stats.bytes_read_cached <= in_tensor && stats.bytes_read_cached + EDGES >= still,
        "cached {in_tensor} before and {still} after the restore, {stats:?}"
    );
    assert!(
        still >= 4 << 20,
        "the kernel evicted the cached middle ({still} bytes left)"
    );
    assert!(cached_bytes(&file, 0, len).unwrap() <= cached_before + 16 * 1024);

    // All cached now: copied from the cache (by several threads where there are cores).
    std::fs::read(&path).unwrap();
    store.release_model(m).unwrap();
    let guard = store.acquire_ram(big).unwrap();
    assert_eq!(&guard[..], &common::expected("big", info.len)[..]);
    let copied = store.stats().bytes_read_cached - stats.bytes_read_cached;
    let still = cached_bytes(&file, info.offset, info.len).unwrap();
    assert!(
        copied + EDGES >= still,
        "{copied} bytes copied, {still} cached"
    );
    assert!(
        still >= info.len / 2,
        "the kernel evicted most of the tensor"
    );
}

#[test]
fn prefetch_fills_free_room_in_the_background_and_never_evicts() {
    let dir = common::tempdir();
    let write = |name: &str| {
        let specs: Vec<TensorSpec> = (0..6)
            .map(|i| TensorSpec::new(format!("{name}.{i}"), Dtype::U8, &[256 << 10]))
            .collect();
        common::write(&dir.path().join(format!("{name}.safetensors")), &specs)
    };
    let (a_path, b_path) = (write("a"), write("b"));
    let store = Store::builder()
        .ram_budget(1 << 20)
        .monitor(false)
        .build()
        .unwrap();
    let (a, b) = (
        store.open_model(&a_path).unwrap(),
        store.open_model(&b_path).unwrap(),
    );
    // Model a holds two RAM copies (512 KiB of the 1 MiB budget).
    let a_ids = store.tensors(a).unwrap();
    for &id in &a_ids[..2] {
        drop(store.acquire_ram(id).unwrap());
    }
    let outcome = store.prefetch(b).unwrap().wait().unwrap();
    assert_eq!(outcome.tensors, 2, "{outcome:?}");
    assert_eq!(outcome.bytes, 512 << 10);
    assert_eq!(outcome.skipped_bytes, 4 * (256 << 10));
    for &id in &a_ids[..2] {
        assert!(store.info(id).unwrap().in_ram, "prefetch evicted a copy");
    }
    // What it restored is served from RAM, with the right bytes.
    for &id in &store.tensors(b).unwrap()[..2] {
        let info = store.info(id).unwrap();
        assert!(info.in_ram);
        let guard = store.acquire_ram(id).unwrap();
        assert_eq!(&guard[..], &common::expected(&info.name, info.len)[..]);
    }
    // A cancelled prefetch stops.
    store.release_model(b).unwrap();
    store.release_model(a).unwrap();
    let prefetch = store.prefetch(b).unwrap();
    prefetch.cancel();
    let outcome = prefetch.wait().unwrap();
    assert!(outcome.cancelled || outcome.tensors <= 4, "{outcome:?}");
}

#[test]
fn evicted_buffers_are_reused_within_the_budget_and_given_back_for_the_reserve() {
    const MIB: u64 = 1 << 20;
    let dir = common::tempdir();
    let specs: Vec<TensorSpec> = (0..8)
        .map(|i| TensorSpec::new(format!("big.{i}"), Dtype::U8, &[2 * MIB + 100]))
        .collect();
    let path = common::write(&dir.path().join("m.safetensors"), &specs);
    let budget = 7 * MIB;
    let store = Store::builder()
        .ram_budget(budget)
        .monitor(false)
        .build()
        .unwrap();
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    for _ in 0..2 {
        for &id in &ids {
            let guard = store.acquire_ram(id).unwrap();
            let info = store.info(id).unwrap();
            assert_eq!(&guard[..], &common::expected(&info.name, info.len)[..]);
            let stats = store.stats();
            assert!(stats.anon_bytes + stats.pool_bytes <= budget, "{stats:?}");
        }
    }
    let stats = store.stats();
    assert!(stats.pool_reuses >= 10, "{stats:?}");
    assert_eq!(stats.bytes_written, 0);

    // The reserve cannot be met: pooled buffers go back before anything else is refused.
    store.set_reserve_ram(u64::MAX / 4);
    store.release_model(m).unwrap();
    assert!(matches!(
        store.acquire_ram(ids[0]),
        Err(lowtide::StoreError::Memory(
            lowtide::MemoryError::UnderReserve { .. }
        ))
    ));
    assert_eq!(store.stats().pool_bytes, 0);
}

#[test]
fn large_derived_tensors_spill_and_restore_byte_identical() {
    // Derived bytes live in caller memory of any alignment: large ones are copied and written
    // in overlapping slots of the bounce buffer, odd sizes end in a padded block. Bytes in
    // `AlignedBytes` are written from their own pages.
    let dir = common::tempdir();
    let path = common::write(
        &dir.path().join("m.safetensors"),
        &[TensorSpec::new("w", Dtype::U8, &[4096])],
    );
    let store = Store::builder()
        .ram_budget(256 << 20)
        .spill_dir(dir.path())
        .monitor(false)
        .build()
        .unwrap();
    let m = store.open_model(&path).unwrap();
    for (i, len) in [(37u64 << 20) + 123, (8 << 20) - 1, 8 << 20, 5000]
        .into_iter()
        .enumerate()
    {
        // Offset the bytes inside their allocation so that they are not block-aligned.
        let mut backing: Vec<u8> = (0..=len).map(|b| (b * 7 + i as u64) as u8).collect();
        let bytes: Vec<u8> = backing.drain(1..).collect();
        let id = store
            .derive(
                m,
                &format!("d{i}"),
                Dtype::U8,
                &[len as usize],
                bytes.clone(),
            )
            .unwrap();
        assert_eq!(store.spill(id).unwrap(), len);
        assert!(store.info(id).unwrap().spilled);
        let guard = store.acquire_ram(id).unwrap();
        assert!(
            guard[..] == bytes[..],
            "tensor of {len} bytes differs after the round trip"
        );
        drop(guard);

        let mut aligned = lowtide::direct::AlignedBytes::zeroed(len as usize).unwrap();
        aligned.as_mut_slice().copy_from_slice(&bytes);
        aligned.as_mut_slice()[0] ^= 0xff;
        let id = store
            .derive(m, &format!("a{i}"), Dtype::U8, &[len as usize], aligned)
            .unwrap();
        let written = store.stats().bytes_spilled;
        assert_eq!(store.spill(id).unwrap(), len);
        assert_eq!(store.stats().bytes_spilled - written, len);
        let guard = store.acquire_ram(id).unwrap();
        assert_eq!(guard[0], bytes[0] ^ 0xff);
        assert!(
            guard[1..] == bytes[1..],
            "aligned tensor of {len} bytes differs"
        );
    }
    assert_eq!(store.stats().checksum_failures, 0);
}

#[test]
fn device_uploads_restore_like_ram_copies_and_leave_no_page_cache_copy() {
    let dir = common::tempdir();
    // One tensor larger than the upload window, odd sizes around it.
    let specs = [
        TensorSpec::new("a", Dtype::U8, &[5000]),
        TensorSpec::new("big", Dtype::BF16, &[5 << 20, 4]),
        TensorSpec::new("c", Dtype::F32, &[12_345]),
    ];
    let path = common::write(&dir.path().join("m.safetensors"), &specs);
    let Some((file, len, before)) = common::cold(&path) else {
        return;
    };
    let store = store();
    let gpu = store.add_device(std::sync::Arc::new(lowtide::SimDevice::new(
        "sim0",
        128 << 20,
    )));
    let m = store.open_model(&path).unwrap();
    store.load(m, gpu, None).unwrap();
    let ids = store.tensors(m).unwrap();
    let total: u64 = ids.iter().map(|&id| store.info(id).unwrap().len).sum();
    for &id in &ids {
        let name = store.info(id).unwrap().name;
        let bytes = store.acquire_device(id, gpu).unwrap().download().unwrap();
        assert_eq!(bytes, common::expected(&name, bytes.len() as u64), "{name}");
    }
    let stats = store.stats();
    assert_eq!(stats.anon_bytes, 0, "no host copy kept");
    assert_eq!(stats.bytes_read_cold + stats.bytes_read_cached, total);
    assert!(stats.bytes_read_cached <= 16 * 1024, "{stats:?}");
    let after = cached_bytes(&file, 0, len).unwrap();
    assert!(
        after <= before + 16 * 1024,
        "uploads left {after} of {len} bytes in the page cache (before: {before})"
    );
}

#[test]
fn a_mapped_acquire_reads_no_neighbour_and_a_cold_restore_still_leaves_no_copy() {
    let dir = common::tempdir();
    // Tiny tensors (1.5 KiB) between ones of 2 and 5 MiB, back to back: the kernel's
    // read-around of any of them (the readahead window, up to 8 MiB, centred on the fault)
    // would cover several neighbours.
    let specs: Vec<TensorSpec> = (0..13)
        .map(|i| {
            let rows = match i % 4 {
                0 | 2 => 3,
                1 => 1024,
                _ => 2560,
            };
            TensorSpec::new(format!("blocks.{i:02}.w"), Dtype::BF16, &[rows, 256 + i])
        })
        .collect();
    let path = common::write(&dir.path().join("m.safetensors"), &specs);
    let Some((file, _, _)) = common::cold(&path) else {
        return;
    };
    let source = lowtide::Source::open(&path).unwrap();
    let store = store();
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let page = 4096;
    // The pages of tensor `i` that it shares with no other tensor.
    let own = |i: usize| {
        let t = source.tensor(&specs[i].name).unwrap();
        let start = t.offset.div_ceil(page) * page;
        let end = (t.offset + t.len) / page * page;
        (start, end.saturating_sub(start))
    };
    let mut acquired = Vec::new();
    // A tiny tensor between two large ones, then a 5 MiB one next to it.
    for target in [6, 7] {
        let t = source.tensor(&specs[target].name).unwrap().clone();
        let guard = common::mapped(&store, ids[target]).unwrap();
        assert_eq!(&guard[..], &common::expected(&t.name, t.len)[..]);
        drop(guard);
        acquired.push(target);
        let (start, len) = own(target);
        assert_eq!(
            cached_bytes(&file, start, len).unwrap(),
            len,
            "tensor {target} is in the page cache"
        );
        for other in (0..specs.len()).filter(|i| !acquired.contains(i)) {
            let (start, len) = own(other);
            let cached = cached_bytes(&file, start, len).unwrap();
            assert_eq!(
                cached, 0,
                "tensor {other}: {cached} of its {len} own bytes cached after a mapped \
                 acquire of tensor {target}"
            );
        }
    }
    // Cold restores of the neighbours still read from the disk and leave no copy.
    for neighbour in [5, 8] {
        let (start, len) = own(neighbour);
        let cold_before = store.stats().bytes_read_cold;
        let guard = store.acquire_ram(ids[neighbour]).unwrap();
        assert_eq!(
            &guard[..],
            &common::expected(&specs[neighbour].name, guard.len() as u64)[..]
        );
        drop(guard);
        let cold = store.stats().bytes_read_cold - cold_before;
        assert!(
            cold >= len,
            "tensor {neighbour}: {cold} of {len} bytes read cold"
        );
        assert_eq!(
            cached_bytes(&file, start, len).unwrap(),
            0,
            "tensor {neighbour}: a cold restore left a page-cache copy"
        );
    }
}

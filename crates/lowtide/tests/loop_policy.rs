//! A model larger than its budget used in the same order again and again (one forward a
//! step): recency alone evicts each copy just before its next use and re-reads the whole model
//! every pass; the default policy keeps a budget's worth of the loop between passes.

mod common;

use common::TensorSpec;
use lowtide::policy::{Candidate, EvictionPolicy};
use lowtide::{Dtype, ModelId, Store, TensorId};

const MIB: u64 = 1 << 20;
/// Tensors in the loop, 1 MiB each.
const N: u64 = 16;
/// Room for about five of them (and the pooled buffer a restore reuses).
const BUDGET: u64 = 6 * MIB;
const PASSES: usize = 5;

/// Least recently used first, nothing else: the order a loop defeats.
#[derive(Debug)]
struct Lru;

impl EvictionPolicy for Lru {
    fn order(&self, candidates: &mut [Candidate]) {
        candidates.sort_by_key(|c| c.last_use);
    }
}

fn store(policy: Option<Lru>, spill: &std::path::Path) -> Store {
    let builder = Store::builder()
        .ram_budget(BUDGET)
        .spill_dir(spill)
        .monitor(false);
    match policy {
        Some(lru) => builder.policy(lru),
        None => builder,
    }
    .build()
    .unwrap()
}

fn model(dir: &std::path::Path) -> std::path::PathBuf {
    let specs: Vec<TensorSpec> = (0..N)
        .map(|i| TensorSpec::new(format!("blocks.{i}.w"), Dtype::F32, &[256, 1024]))
        .collect();
    common::write(&dir.join("loop.safetensors"), &specs)
}

/// Acquires `ids` in order, checking each one's bytes with `expect`; returns the bytes the
/// pass restored (from the model file and the spill file).
fn pass(store: &Store, ids: &[TensorId], expect: impl Fn(TensorId) -> Vec<u8>) -> u64 {
    let before = store.stats();
    for &id in ids {
        let guard = store.acquire_ram(id).unwrap();
        assert!(guard[..] == expect(id)[..], "tensor {id:?} has other bytes");
    }
    let after = store.stats();
    (after.bytes_read_source - before.bytes_read_source)
        + (after.bytes_restored_spill - before.bytes_restored_spill)
}

fn file_bytes(store: &Store) -> impl Fn(TensorId) -> Vec<u8> + '_ {
    |id| {
        let name = store.info(id).unwrap().name;
        common::expected(&name, MIB)
    }
}

fn passes(store: &Store, m: ModelId) -> Vec<u64> {
    let ids = store.tensors(m).unwrap();
    (0..PASSES)
        .map(|_| pass(store, &ids, file_bytes(store)))
        .collect()
}

#[test]
fn a_loop_longer_than_the_budget_keeps_a_budget_of_it_between_passes() {
    let dir = common::tempdir();
    let path = model(dir.path());

    let lru = store(Some(Lru), dir.path());
    let m = lru.open_model(&path).unwrap();
    let by_recency = passes(&lru, m);
    // The control: recency re-reads all of the model at every pass.
    assert!(
        by_recency.iter().all(|&read| read == N * MIB),
        "{by_recency:?}"
    );

    let default = store(None, dir.path());
    let m = default.open_model(&path).unwrap();
    let by_default = passes(&default, m);
    println!("bytes read per pass: recency {by_recency:?}, default {by_default:?}");
    assert_eq!(by_default[0], N * MIB, "the first pass reads everything");
    // From the third pass on, every distance is known: each pass reads the model less what
    // the budget kept from the pass before (at least 3 of its ~5 MiB).
    for (i, &read) in by_default.iter().enumerate().skip(2) {
        assert!(
            read <= (N - 3) * MIB,
            "pass {i} read {read} bytes: {by_default:?}"
        );
    }
    assert!(by_default[1] < N * MIB, "{by_default:?}");
}

#[test]
fn patched_weights_in_a_loop_longer_than_the_budget_are_read_back_less_than_all_per_pass() {
    let dir = common::tempdir();
    let path = model(dir.path());
    let store = store(None, dir.path());
    let m = store.open_model(&path).unwrap();
    let patched = |i: u64| -> Vec<u8> { (0..MIB).map(|b| (b * 7 + i * 13) as u8).collect() };
    let ids: Vec<TensorId> = (0..N)
        .map(|i| {
            store
                .derive(
                    m,
                    &format!("patched.{i}"),
                    Dtype::U8,
                    &[MIB as usize],
                    patched(i),
                )
                .unwrap()
        })
        .collect();
    let expect = |id: TensorId| {
        let i = ids.iter().position(|&x| x == id).unwrap() as u64;
        patched(i)
    };
    let reads: Vec<u64> = (0..PASSES).map(|_| pass(&store, &ids, expect)).collect();
    println!("spill bytes read per pass: {reads:?}");
    for (i, &read) in reads.iter().enumerate().skip(2) {
        assert!(
            read <= (N - 3) * MIB,
            "pass {i} read {read} bytes: {reads:?}"
        );
    }
    // Each patched tensor was written to the spill file at most once: a spilled copy that
    // is evicted again is dropped, its extent still holding its bytes.
    let stats = store.stats();
    assert!(stats.bytes_spilled <= N * MIB, "{stats:?}");
    // Under a full budget the reads back land in the buffers of the copies they evict.
    assert!(stats.pool_reuses > 0, "{stats:?}");
}

#[test]
fn a_tensor_used_at_every_step_of_a_loop_stays_in_ram() {
    let dir = common::tempdir();
    let path = model(dir.path());
    let store = store(None, dir.path());
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();
    let (hot, rest) = ids.split_first().unwrap();
    let expect = file_bytes(&store);
    for pass in 0..PASSES {
        for &id in rest {
            if pass > 0 {
                assert!(store.info(*hot).unwrap().in_ram, "pass {pass}: evicted");
            }
            drop(store.acquire_ram(*hot).unwrap());
            let guard = store.acquire_ram(id).unwrap();
            assert!(guard[..] == expect(id)[..]);
        }
    }
}

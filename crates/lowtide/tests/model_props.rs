//! Model-based property test: random operations on a Store against a simple reference model.
//!
//! After every step the accounted anonymous bytes equal the sum of RAM copies (the `strict`
//! feature asserts this inside the store) and never exceed the budget, and every tensor's
//! bytes, read back at the end of a run, are exactly what the reference model says.

mod common;

use std::collections::BTreeMap;

use lowtide::{Dtype, Priority, Recipe, Store, StoreError, TensorGuard, TensorId};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Acquire(usize),
    AcquireRam(usize),
    Release(usize),
    Derive(u16, u8, bool),
    Patch(usize, u8),
    DropClean(usize),
    Spill(usize),
    Free(u32),
    Priority(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<usize>().prop_map(Op::Acquire),
        4 => any::<usize>().prop_map(Op::AcquireRam),
        4 => any::<usize>().prop_map(Op::Release),
        2 => (1u16..400, any::<u8>(), any::<bool>()).prop_map(|(k, v, r)| Op::Derive(k, v, r)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Op::Patch(i, v)),
        1 => any::<usize>().prop_map(Op::DropClean),
        1 => any::<usize>().prop_map(Op::Spill),
        1 => (0u32..2_000_000).prop_map(Op::Free),
        1 => any::<u8>().prop_map(Op::Priority),
    ]
}

const BUDGET: u64 = 1_500_000;

#[allow(clippy::too_many_lines)] // one match over the operations reads best in one place
fn run(ops: &[Op]) {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    let store = Store::builder()
        .ram_budget(BUDGET)
        .spill_dir(dir.path())
        .build()
        .unwrap();
    let model = store.open_model(&path).unwrap();
    // The reference model: every tensor's true bytes.
    let mut truth: BTreeMap<TensorId, Vec<u8>> = BTreeMap::new();
    for id in store.tensors(model).unwrap() {
        let info = store.info(id).unwrap();
        truth.insert(id, common::expected(&info.name, info.len));
    }
    let mut guards: Vec<TensorGuard> = Vec::new();
    let mut derived = 0;
    let pick =
        |truth: &BTreeMap<TensorId, Vec<u8>>, i: usize| *truth.keys().nth(i % truth.len()).unwrap();

    for op in ops {
        match op {
            Op::Acquire(i) | Op::AcquireRam(i) => {
                let id = pick(&truth, *i);
                let result = if matches!(op, Op::Acquire(_)) {
                    common::mapped(&store, id)
                } else {
                    store.acquire_ram(id)
                };
                match result {
                    Ok(guard) => {
                        assert_eq!(&guard[..], &truth[&id][..], "{op:?}");
                        if guards.len() < 4 {
                            guards.push(guard);
                        }
                    }
                    Err(StoreError::Memory(lowtide::MemoryError::OverBudget { .. })) => {}
                    Err(err) => panic!("{op:?}: {err}"),
                }
            }
            Op::Release(i) => {
                if !guards.is_empty() {
                    guards.swap_remove(i % guards.len());
                }
            }
            Op::Derive(k, value, with_recipe) => {
                let len = u64::from(*k) * 1000;
                let bytes = vec![*value; len as usize];
                let name = format!("derived.{derived}");
                derived += 1;
                let result = if *with_recipe {
                    let again = bytes.clone();
                    let recipe = Recipe::new(f64::from(*value % 4) * 0.8, move || again.clone());
                    store.derive_with_recipe(
                        model,
                        &name,
                        Dtype::U8,
                        &[len as usize],
                        bytes.clone(),
                        recipe,
                    )
                } else {
                    store.derive(model, &name, Dtype::U8, &[len as usize], bytes.clone())
                };
                match result {
                    Ok(id) => {
                        truth.insert(id, bytes);
                    }
                    Err(StoreError::Memory(lowtide::MemoryError::OverBudget { .. })) => {}
                    Err(err) => panic!("{op:?}: {err}"),
                }
            }
            Op::Patch(i, value) => {
                let id = pick(&truth, *i);
                let patched: Vec<u8> = truth[&id].iter().map(|b| b ^ value).collect();
                match store.replace(id, patched.clone()) {
                    Ok(()) => {
                        truth.insert(id, patched);
                    }
                    Err(
                        StoreError::Memory(lowtide::MemoryError::OverBudget { .. })
                        | StoreError::Update(lowtide::UpdateError::Pinned { .. }),
                    ) => {}
                    Err(err) => panic!("{op:?}: {err}"),
                }
            }
            Op::DropClean(i) => match store.drop_clean(pick(&truth, *i)) {
                Ok(_) | Err(StoreError::Update(lowtide::UpdateError::Pinned { .. })) => {}
                Err(err) => panic!("{op:?}: {err}"),
            },
            Op::Spill(i) => match store.spill(pick(&truth, *i)) {
                Ok(_) | Err(StoreError::Update(lowtide::UpdateError::Pinned { .. })) => {}
                Err(err) => panic!("{op:?}: {err}"),
            },
            Op::Free(n) => {
                store.free_memory(u64::from(*n));
            }
            Op::Priority(p) => {
                let priority =
                    [Priority::Idle, Priority::Queued, Priority::Active][usize::from(*p % 3)];
                store.set_priority(model, priority).unwrap();
            }
        }
        let stats = store.stats();
        assert!(
            stats.anon_bytes <= BUDGET,
            "{op:?}: {} over budget",
            stats.anon_bytes
        );
        for guard in &guards {
            assert_eq!(&guard[..], &truth[&guard.id()][..], "a pinned copy changed");
        }
    }
    // Every tensor is recoverable with the right bytes.
    guards.clear();
    for (id, bytes) in &truth {
        let guard = common::mapped(&store, *id).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(&guard[..], &bytes[..], "{:?}", store.info(*id).unwrap());
    }
    assert_eq!(store.stats().checksum_failures, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_reference_model(ops in proptest::collection::vec(op(), 1..120)) {
        run(&ops);
    }
}

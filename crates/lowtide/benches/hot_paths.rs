//! Micro-benchmarks of the hot paths: acquire + release of a resident tensor (RAM and mapped),
//! header validation, the spill checksum, and a warm restore into RAM.
//! Run with `cargo bench -p lowtide`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_main};
use lowtide::{Dtype, Store};
use lowtide_testkit::{TensorSpec, write_safetensors};

fn model(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("bench.safetensors");
    let specs: Vec<TensorSpec> = (0..64)
        .map(|i| {
            TensorSpec::new(
                format!("blocks.{i}.attn.to_q.weight"),
                Dtype::BF16,
                &[640, 640],
            )
        })
        .collect();
    write_safetensors(&path, &specs, &BTreeMap::new(), |i, buf| buf.fill(i as u8)).unwrap();
    path
}

fn hot_paths(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = model(dir.path());
    let store = Store::builder()
        .ram_budget(1 << 30)
        .monitor(false)
        .build()
        .unwrap();
    let m = store.open_model(&path).unwrap();
    let ids = store.tensors(m).unwrap();

    drop(store.acquire_ram(ids[0]).unwrap());
    c.bench_function("acquire+release, RAM copy", |b| {
        b.iter(|| black_box(store.acquire_ram(ids[0]).unwrap()));
    });
    // SAFETY: the benchmark's model file is its own and nothing modifies it.
    let mapped = || unsafe { store.acquire_mapped(ids[1]) }.unwrap();
    drop(mapped());
    c.bench_function("acquire+release, mapped", |b| {
        b.iter(|| black_box(mapped()));
    });

    let mut group = c.benchmark_group("restore");
    let len = store.info(ids[2]).unwrap().len;
    group.throughput(Throughput::Bytes(len));
    std::fs::read(&path).unwrap(); // warm
    group.bench_function("warm restore into RAM (800 KiB)", |b| {
        b.iter(|| {
            store.drop_clean(ids[2]).unwrap();
            black_box(store.acquire_ram(ids[2]).unwrap());
        });
    });
    group.finish();

    let image = std::fs::read(&path).unwrap();
    c.bench_function("validate a 64-tensor header", |b| {
        b.iter(|| black_box(lowtide::parse::safetensors_image(&image).unwrap()));
    });

    let mut group = c.benchmark_group("checksum");
    let bytes = vec![7u8; 4 << 20];
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("xxh3 of 4 MiB", |b| {
        b.iter(|| black_box(xxhash_rust::xxh3::xxh3_64(&bytes)));
    });
    group.finish();
}

#[allow(missing_docs)] // the macro generates an undocumented function
mod group {
    criterion::criterion_group!(benches, super::hot_paths);
}
criterion_main!(group::benches);

//! Validating a GGUF header of 10,000 tensors and 1,000 metadata keys (the whole file image
//! held in memory, as `lowtide::parse::gguf_image` takes it). Run with
//! `cargo bench -p lowtide --bench gguf`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_main};
use lowtide::{Dtype, GgufArray, GgufValue};
use lowtide_testkit::{TensorSpec, gguf_image};

/// 10,000 tensors of block and plain types and 1,000 keys of every value type.
fn image() -> (Vec<u8>, u64) {
    let types = [
        Dtype::Q4_K,
        Dtype::Q8_0,
        Dtype::F16,
        Dtype::F32,
        Dtype::IQ2_XXS,
        Dtype::Q6_K,
    ];
    let specs: Vec<TensorSpec> = (0..10_000)
        .map(|i| {
            let dtype = types[i % types.len()];
            let name = format!("blk.{}.ffn_{}.weight", i / 8, i % 8);
            TensorSpec::new(name, dtype, &[2, dtype.block().elements])
        })
        .collect();
    let metadata: Vec<(String, GgufValue)> = (0..1_000)
        .map(|i| {
            let value = match i % 6 {
                0 => GgufValue::U32(i),
                1 => GgufValue::F32(i as f32 / 3.0),
                2 => GgufValue::String(format!("value number {i}").into()),
                3 => GgufValue::Bool(i % 4 == 1),
                4 => GgufValue::Array(GgufArray::I32((0..16).collect())),
                _ => GgufValue::Array(GgufArray::String(
                    (0..16).map(|j| format!("tok{j}").into()).collect(),
                )),
            };
            (format!("bench.key.{i}"), value)
        })
        .collect();
    let (image, layout) = gguf_image(&specs, &metadata, |_, b| b.fill(0)).unwrap();
    (image, layout.header_len)
}

fn gguf(c: &mut Criterion) {
    let (image, header_len) = image();
    let mut group = c.benchmark_group("gguf");
    group.throughput(Throughput::Bytes(header_len));
    group.bench_function("validate header: 10,000 tensors, 1,000 keys", |b| {
        b.iter(|| black_box(lowtide::parse::gguf_image(black_box(&image)).unwrap()));
    });
    group.finish();
}

/// The benchmark group (the macro's function has no docs of its own).
mod group {
    #![allow(missing_docs)]
    criterion::criterion_group!(benches, super::gguf);
}
criterion_main!(group::benches);

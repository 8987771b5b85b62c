//! Property tests of the GGUF parser: random valid files (every ggml type, random shapes and
//! metadata) read back exactly as written, and valid headers with a field overwritten by an
//! interesting value (a count, length, type id, dimension or offset: 0, 1, 2^40, `u64::MAX`,
//! ...) either accepted and self-consistent (`fuzz/checks.rs`) or rejected with a typed error,
//! never a panic.

#[allow(dead_code)] // the safetensors properties are run by `fuzz_props.rs`
#[path = "../../../fuzz/checks.rs"]
mod checks;

use lowtide::{Dtype, GgufArray, GgufValue};
use lowtide_testkit::{TensorSpec, gguf_image};
use proptest::prelude::*;

fn ggml_dtype() -> impl Strategy<Value = Dtype> {
    let types: Vec<Dtype> = Dtype::ALL
        .iter()
        .copied()
        .filter(|d| d.ggml_id().is_some())
        .collect();
    proptest::sample::select(types)
}

/// A tensor of a ggml type: up to four dimensions, the innermost whole blocks.
fn spec(i: usize) -> impl Strategy<Value = TensorSpec> {
    (ggml_dtype(), prop::collection::vec(0u64..5, 0..4), 1u64..4).prop_map(
        move |(dtype, outer, blocks)| {
            let mut shape = outer;
            shape.push(blocks * dtype.block().elements);
            TensorSpec::new(format!("blk.{i}.weight"), dtype, &shape)
        },
    )
}

fn value() -> impl Strategy<Value = GgufValue> {
    let leaf = prop_oneof![
        any::<u8>().prop_map(GgufValue::U8),
        any::<i8>().prop_map(GgufValue::I8),
        any::<u16>().prop_map(GgufValue::U16),
        any::<i16>().prop_map(GgufValue::I16),
        any::<u32>().prop_map(GgufValue::U32),
        any::<i32>().prop_map(GgufValue::I32),
        any::<u64>().prop_map(GgufValue::U64),
        any::<i64>().prop_map(GgufValue::I64),
        (-1e6f32..1e6).prop_map(GgufValue::F32),
        (-1e9f64..1e9).prop_map(GgufValue::F64),
        any::<bool>().prop_map(GgufValue::Bool),
        ".{0,12}".prop_map(|s| GgufValue::String(s.into())),
    ];
    let arrays = prop_oneof![
        prop::collection::vec(any::<u32>(), 0..8).prop_map(|v| GgufValue::Array(GgufArray::U32(v))),
        prop::collection::vec(any::<bool>(), 0..8)
            .prop_map(|v| GgufValue::Array(GgufArray::Bool(v))),
        prop::collection::vec("[a-z]{0,4}", 0..8).prop_map(|v| {
            GgufValue::Array(GgufArray::String(v.into_iter().map(Into::into).collect()))
        }),
        prop::collection::vec(prop::collection::vec(any::<i8>(), 0..3), 0..3).prop_map(|v| {
            GgufValue::Array(GgufArray::Array(v.into_iter().map(GgufArray::I8).collect()))
        }),
    ];
    prop_oneof![3 => leaf, 1 => arrays]
}

#[derive(Debug, Clone)]
struct File {
    specs: Vec<TensorSpec>,
    metadata: Vec<(String, GgufValue)>,
}

fn file() -> impl Strategy<Value = File> {
    let specs = (0usize..6).prop_flat_map(|n| (0..n).map(spec).collect::<Vec<_>>());
    let metadata = prop::collection::btree_map("[a-z.]{1,10}", value(), 0..6);
    let alignment = prop::option::of(prop_oneof![
        Just(1u32),
        Just(8),
        Just(32),
        Just(64),
        Just(4096)
    ]);
    (specs, metadata, alignment).prop_map(|(specs, metadata, alignment)| {
        let mut metadata: Vec<(String, GgufValue)> = metadata
            .into_iter()
            .filter(|(k, _)| k != "general.alignment")
            .collect();
        if let Some(a) = alignment {
            metadata.push(("general.alignment".into(), GgufValue::U32(a)));
        }
        File { specs, metadata }
    })
}

/// A value to write over a field: small numbers, type ids near the valid ones, and the
/// extremes that overflow.
fn interesting() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..70,
        Just(255),
        Just(1 << 20),
        Just((1 << 20) + 1),
        Just(1 << 32),
        Just(1 << 40),
        Just(1 << 62),
        Just(i64::MAX as u64),
        Just(u64::MAX - 31),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn valid_files_read_back_as_written(f in file()) {
        let (image, layout) = gguf_image(&f.specs, &f.metadata, |i, b| b.fill(i as u8)).unwrap();
        let (gguf, tensors) = lowtide::parse::gguf_image(&image).unwrap();
        checks::gguf(&image);
        prop_assert_eq!(gguf.metadata(), &f.metadata[..]);
        prop_assert_eq!(gguf.header_len(), layout.header_len);
        prop_assert_eq!(gguf.data_start(), layout.data_start);
        prop_assert_eq!(tensors.len(), f.specs.len());
        for (spec, &offset) in f.specs.iter().zip(&layout.offsets) {
            let t = tensors.iter().find(|t| t.name == spec.name).unwrap();
            prop_assert_eq!(t.dtype, spec.dtype);
            prop_assert_eq!(&t.shape, &spec.shape);
            prop_assert_eq!(t.offset, offset);
            prop_assert_eq!(Some(t.len), spec.byte_len());
            let info = gguf.tensors().iter().find(|i| i.name == spec.name).unwrap();
            let reversed: Vec<u64> = spec.shape.iter().rev().copied().collect();
            prop_assert_eq!(&info.dims, &reversed);
        }
    }

    #[test]
    fn overwritten_fields_are_accepted_consistently_or_rejected(
        f in file(),
        at in any::<prop::sample::Index>(),
        value in interesting(),
        wide in any::<bool>(),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let (mut image, layout) = gguf_image(&f.specs, &f.metadata, |i, b| b.fill(i as u8)).unwrap();
        // A field of the header (4 or 8 bytes) at any byte position of it.
        let width = if wide { 8 } else { 4 };
        let header = layout.header_len as usize;
        let start = at.index(header.saturating_sub(width).max(1));
        let bytes = value.to_le_bytes();
        let end = (start + width).min(image.len());
        image[start..end].copy_from_slice(&bytes[..end - start]);
        if let Some(cut) = cut {
            image.truncate(cut.index(image.len() + 1));
        }
        checks::gguf(&image);
    }
}

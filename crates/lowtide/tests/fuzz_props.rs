//! A bounded run of the fuzz targets' properties (`fuzz/checks.rs`) that normal CI executes:
//! random bytes, random byte edits of valid inputs, and random index documents. The open-ended
//! runs are `cargo fuzz run header`, `cargo fuzz run index` and `cargo fuzz run gguf` (see the
//! README).

mod common;

#[path = "../../../fuzz/checks.rs"]
mod checks;

use std::sync::OnceLock;

use lowtide::Dtype;
use lowtide_testkit::TensorSpec;
use proptest::prelude::*;

/// A valid image with a few tensors of several dtypes.
fn valid_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = common::tempdir();
        let specs = [
            TensorSpec::new("a.weight", Dtype::F16, &[3, 5]),
            TensorSpec::new("b.bias", Dtype::F32, &[7]),
            TensorSpec::new("c.q", Dtype::U8, &[2, 2, 2]),
        ];
        std::fs::read(common::write(&dir.path().join("m.safetensors"), &specs)).unwrap()
    })
}

/// A valid GGUF image: tensors of block and plain types, metadata of every value type.
fn valid_gguf() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        use lowtide::{GgufArray, GgufValue};
        let specs = [
            TensorSpec::new("a.weight", Dtype::Q4_K, &[2, 256]),
            TensorSpec::new("b.bias", Dtype::F32, &[7]),
            TensorSpec::new("c.q", Dtype::Q8_0, &[3, 32]),
        ];
        let meta = vec![
            ("general.alignment".to_owned(), GgufValue::U32(32)),
            (
                "general.architecture".to_owned(),
                GgufValue::String("llama".into()),
            ),
            ("k.u8".to_owned(), GgufValue::U8(7)),
            ("k.bool".to_owned(), GgufValue::Bool(true)),
            ("k.f64".to_owned(), GgufValue::F64(0.5)),
            (
                "k.tokens".to_owned(),
                GgufValue::Array(GgufArray::String(vec!["a".into(), "bc".into()])),
            ),
            (
                "k.nested".to_owned(),
                GgufValue::Array(GgufArray::Array(vec![GgufArray::I16(vec![1, -2])])),
            ),
        ];
        lowtide_testkit::gguf_image(&specs, &meta, |i, b| b.fill(i as u8))
            .unwrap()
            .0
    })
}

const VALID_INDEX: &[u8] = br#"{"metadata":{"total_size":64},"weight_map":{"a.weight":"model-00001-of-00002.safetensors","b.bias":"model-00002-of-00002.safetensors"}}"#;

/// Up to 8 byte edits (offset, value) applied to `base`, plus an optional truncation.
fn edited(base: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        prop::option::of(any::<prop::sample::Index>()),
    )
        .prop_map(move |(edits, cut)| {
            let mut bytes = base.to_vec();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

fn shard_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("model-00001-of-00002.safetensors".to_owned()),
        Just("../escape.safetensors".to_owned()),
        Just("/etc/passwd".to_owned()),
        Just("sub/dir.safetensors".to_owned()),
        Just("..".to_owned()),
        Just(String::new()),
        "[a-z./-]{0,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn header_random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        checks::header(&data);
    }

    #[test]
    fn header_edited_valid_images(data in edited(valid_image())) {
        checks::header(&data);
    }

    #[test]
    fn gguf_random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        checks::gguf(&data);
    }

    #[test]
    fn gguf_random_bytes_after_a_valid_prefix(
        version in prop_oneof![Just(2u32), Just(3u32)],
        data in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut image = b"GGUF".to_vec();
        image.extend_from_slice(&version.to_le_bytes());
        image.extend_from_slice(&data);
        checks::gguf(&image);
    }

    #[test]
    fn gguf_edited_valid_images(data in edited(valid_gguf())) {
        checks::gguf(&data);
    }

    #[test]
    fn index_random_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        checks::index(&data);
    }

    #[test]
    fn index_edited_valid_documents(data in edited(VALID_INDEX)) {
        checks::index(&data);
    }

    #[test]
    fn index_documents_with_any_shard_names(
        map in prop::collection::btree_map("[a-z.]{1,8}", shard_name(), 0..6)
    ) {
        let doc = serde_json::json!({ "weight_map": map });
        checks::index(doc.to_string().as_bytes());
    }
}

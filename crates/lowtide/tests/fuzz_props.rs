//! A bounded run of the fuzz targets' properties (`fuzz/checks.rs`) that normal CI executes:
//! random bytes, random byte edits of valid inputs, and random index documents. The open-ended
//! runs are `cargo fuzz run header` and `cargo fuzz run index` (see the README).

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

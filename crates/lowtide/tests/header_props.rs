//! Property tests: any mutation of a valid file is either accepted and consistent, or rejected
//! with a typed error; never a panic.

mod common;

use std::collections::HashSet;
use std::sync::OnceLock;

use lowtide::{Dtype, parse};
use lowtide_testkit::TensorSpec;
use proptest::prelude::*;

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("a.weight", Dtype::F16, &[8, 4, 3, 3]),
        TensorSpec::new("a.bias", Dtype::F32, &[8]),
        TensorSpec::new("b.weight", Dtype::BF16, &[16, 8]),
        TensorSpec::new("scale", Dtype::F32, &[]),
        TensorSpec::new("q", Dtype::F4, &[6]),
    ]
}

fn valid_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = common::tempdir();
        let path = common::write(&dir.path().join("m.safetensors"), &specs());
        std::fs::read(path).unwrap()
    })
}

/// What every accepted file must satisfy.
fn assert_consistent(image: &[u8], tensors: &[lowtide::SourceTensor]) {
    let header_len = u64::from_le_bytes(image[..8].try_into().unwrap());
    let mut cursor = 8 + header_len;
    let mut names = HashSet::new();
    for t in tensors {
        assert!(names.insert(t.name.clone()), "duplicate {}", t.name);
        assert_eq!(t.offset, cursor, "extents tile the data buffer");
        let elements = t.shape.iter().product::<u64>();
        assert_eq!(t.dtype.bytes_for(elements), Some(t.len));
        cursor += t.len;
    }
    assert_eq!(cursor, image.len() as u64);
}

/// What lowtide accepts, the reference parser accepts too, with the same tensors: lowtide
/// checks each entry with the reference's types instead of running its whole-header parse
/// (which holds the header as a tree), and this holds the two to agreement.
fn assert_reference_agrees(image: &[u8], tensors: &[lowtide::SourceTensor]) {
    let reference = safetensors::SafeTensors::deserialize(image)
        .unwrap_or_else(|err| panic!("lowtide accepts what the reference rejects: {err}"));
    assert_eq!(reference.len(), tensors.len());
    for t in tensors {
        let view = reference.tensor(&t.name).unwrap();
        assert_eq!(format!("{:?}", view.dtype()), t.dtype.name(), "{}", t.name);
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        assert_eq!(shape, t.shape, "{}", t.name);
        let offset = view.data().as_ptr() as usize - image.as_ptr() as usize;
        assert_eq!(
            (offset as u64, view.data().len() as u64),
            (t.offset, t.len),
            "{}",
            t.name
        );
    }
}

fn check(image: &[u8]) {
    if let Ok(tensors) = parse::safetensors_image(image) {
        assert_consistent(image, &tensors);
        assert_reference_agrees(image, &tensors);
    }
}

fn header_json(image: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    let n = u64::from_le_bytes(image[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&image[8..8 + n]).unwrap()
}

fn rebuild(json: &serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(json).unwrap();
    let mut image = (text.len() as u64).to_le_bytes().to_vec();
    image.extend_from_slice(&text);
    image.extend_from_slice(data);
    image
}

fn data_of(image: &[u8]) -> &[u8] {
    let n = u64::from_le_bytes(image[..8].try_into().unwrap()) as usize;
    &image[8 + n..]
}

#[derive(Debug, Clone)]
enum Edit {
    Offsets(usize, u64, u64),
    Shape(usize, Vec<u64>),
    Dtype(usize, String),
    Remove(usize, &'static str),
    Value(usize, serde_json::Value),
    Metadata(serde_json::Value),
    Rename(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let big = prop_oneof![0u64..400, Just(u64::MAX), Just(u64::MAX / 2), any::<u64>()];
    let dtype = prop_oneof![
        proptest::sample::select(
            Dtype::ALL
                .iter()
                .map(|d| d.name().to_owned())
                .collect::<Vec<_>>()
        ),
        "[A-Z0-9_]{0,8}",
    ];
    let value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z]{0,4}".prop_map(serde_json::Value::from),
        Just(serde_json::json!([])),
        Just(serde_json::json!({"dtype": "F32"})),
    ];
    prop_oneof![
        (0..5usize, big.clone(), big.clone()).prop_map(|(i, a, b)| Edit::Offsets(i, a, b)),
        (0..5usize, proptest::collection::vec(big, 0..5)).prop_map(|(i, s)| Edit::Shape(i, s)),
        (0..5usize, dtype).prop_map(|(i, d)| Edit::Dtype(i, d)),
        (
            0..5usize,
            proptest::sample::select(vec!["dtype", "shape", "data_offsets"])
        )
            .prop_map(|(i, f)| Edit::Remove(i, f)),
        (0..5usize, value.clone()).prop_map(|(i, v)| Edit::Value(i, v)),
        value.prop_map(Edit::Metadata),
        (0..5usize, 0..5usize).prop_map(|(a, b)| Edit::Rename(a, b)),
    ]
}

fn apply(json: &mut serde_json::Map<String, serde_json::Value>, edit: &Edit) {
    let names: Vec<String> = specs().into_iter().map(|s| s.name).collect();
    let mut set = |i: usize, field: &str, value: serde_json::Value| {
        if let Some(entry) = json.get_mut(&names[i]).and_then(|e| e.as_object_mut()) {
            entry.insert(field.to_owned(), value);
        }
    };
    match edit {
        Edit::Offsets(i, a, b) => set(*i, "data_offsets", serde_json::json!([a, b])),
        Edit::Shape(i, s) => set(*i, "shape", serde_json::json!(s)),
        Edit::Dtype(i, d) => set(*i, "dtype", serde_json::json!(d)),
        Edit::Remove(i, f) => {
            if let Some(entry) = json.get_mut(&names[*i]).and_then(|e| e.as_object_mut()) {
                entry.remove(*f);
            }
        }
        Edit::Value(i, v) => {
            json.insert(names[*i].clone(), v.clone());
        }
        Edit::Metadata(v) => {
            json.insert("__metadata__".into(), v.clone());
        }
        Edit::Rename(a, b) => {
            if let Some(entry) = json.remove(&names[*a]) {
                json.insert(names[*b].clone(), entry);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn byte_mutations_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        extra in proptest::collection::vec(any::<u8>(), 0..4),
    ) {
        let mut image = valid_image().to_vec();
        for (at, byte) in &flips {
            let i = at.index(image.len());
            image[i] = *byte;
        }
        if let Some(cut) = cut {
            image.truncate(cut.index(image.len() + 1));
        }
        image.extend_from_slice(&extra);
        check(&image);
    }

    #[test]
    fn header_edits_are_accepted_consistently_or_rejected(
        edits in proptest::collection::vec(edit(), 1..4),
        data_delta in -8isize..8,
    ) {
        let image = valid_image();
        let mut json = header_json(image);
        for e in &edits {
            apply(&mut json, e);
        }
        let mut data = data_of(image).to_vec();
        let len = data.len().saturating_add_signed(data_delta);
        data.resize(len, 0);
        check(&rebuild(&json, &data));
    }

    #[test]
    fn prefix_values_never_panic(prefix in any::<u64>()) {
        let mut image = valid_image().to_vec();
        image[..8].copy_from_slice(&prefix.to_le_bytes());
        check(&image);
    }
}

#[test]
fn the_unmutated_image_is_accepted() {
    let tensors = parse::safetensors_image(valid_image()).unwrap();
    assert_eq!(tensors.len(), specs().len());
    assert_consistent(valid_image(), &tensors);
}

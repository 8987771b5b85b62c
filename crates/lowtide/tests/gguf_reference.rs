//! GGUF files written by the reference implementation (the `gguf` package's `GGUFWriter`, see
//! `tests/reference/write_gguf_reference.py`) and read back by its `GGUFReader`: lowtide must
//! read the same names, types, shapes, offsets, bytes and metadata, and know exactly the
//! reference's tensor types with the same block geometry.
//!
//! Needs Python with `pip install gguf numpy`: the virtual environment `scripts/test` makes
//! (`target/python-venv`) when it exists, else `python3`. Without the packages the tests fail
//! when `CI` is set and are skipped with a message on stderr otherwise.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use lowtide::{Dtype, Source, SourceFormat, Store, Tier};
use serde::Deserialize;
use serde_json::Value;

/// Exit status of the script when a Python package is missing.

#[derive(Debug, Deserialize)]
struct Manifest {
    types: Vec<ManifestType>,
    files: Vec<ManifestFile>,
}

#[derive(Debug, Deserialize)]
struct ManifestType {
    name: String,
    id: u32,
    block: u64,
    bytes: u64,
}

#[derive(Debug, Deserialize)]
struct ManifestFile {
    file: String,
    alignment: u64,
    data_start: u64,
    version: u32,
    metadata: Vec<ManifestValue>,
    tensors: Vec<ManifestTensor>,
}

#[derive(Debug, Deserialize)]
struct ManifestValue {
    key: String,
    #[serde(rename = "type")]
    value_type: String,
    element_type: Option<String>,
    len: Option<usize>,
    value: Value,
}

#[derive(Debug, Deserialize)]
struct ManifestTensor {
    name: String,
    #[serde(rename = "type")]
    dtype: String,
    type_id: u32,
    dims: Vec<u64>,
    shape: Vec<u64>,
    offset: u64,
    bytes: u64,
    bin: String,
}

struct Reference {
    dir: tempfile::TempDir,
    manifest: Manifest,
}

impl Reference {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

fn reference(test: &str) -> Option<Reference> {
    let (dir, manifest) =
        lowtide_testkit::gguf_reference_files(test, Path::new(env!("CARGO_TARGET_TMPDIR")))?;
    let manifest: Manifest = serde_json::from_value(manifest).unwrap();
    Some(Reference { dir, manifest })
}

#[test]
fn reference_tensor_types_are_exactly_lowtides_ggml_types() {
    let Some(reference) = reference("reference_tensor_types_are_exactly_lowtides_ggml_types")
    else {
        return;
    };
    for t in &reference.manifest.types {
        let dtype = Dtype::from_ggml_id(t.id)
            .unwrap_or_else(|| panic!("lowtide does not know ggml type {} ({})", t.name, t.id));
        assert_eq!(dtype.name(), t.name, "type {}", t.id);
        assert_eq!(dtype.block().elements, t.block, "{}", t.name);
        assert_eq!(dtype.block().bytes, t.bytes, "{}", t.name);
    }
    for dtype in Dtype::ALL.iter().filter(|d| d.ggml_id().is_some()) {
        assert!(
            reference
                .manifest
                .types
                .iter()
                .any(|t| Some(t.id) == dtype.ggml_id()),
            "{dtype} is not a type of the reference"
        );
    }
}

#[test]
fn every_reference_gguf_file_opens_with_identical_tensors_and_metadata() {
    let Some(reference) =
        reference("every_reference_gguf_file_opens_with_identical_tensors_and_metadata")
    else {
        return;
    };
    let mut types_seen = std::collections::BTreeSet::new();
    for file in &reference.manifest.files {
        let rel = &file.file;
        let source =
            Source::open(reference.path(rel)).unwrap_or_else(|err| panic!("{rel}: {err:?}"));
        assert_eq!(source.format(), SourceFormat::Gguf, "{rel}");
        let gguf = source.gguf().unwrap();
        assert_eq!(gguf.version(), file.version, "{rel}");
        assert_eq!(gguf.alignment(), file.alignment, "{rel}");
        assert_eq!(source.data_start(), file.data_start, "{rel}");
        assert_eq!(gguf.data_start(), file.data_start, "{rel}");

        // Tensors: the same set, each identical, listed in the order of their data.
        assert_eq!(source.tensors().len(), file.tensors.len(), "{rel}");
        assert!(source.tensors().is_sorted_by_key(|t| t.offset), "{rel}");
        let bytes = fs::read(reference.path(rel)).unwrap();
        for m in &file.tensors {
            let what = format!("{rel}: tensor `{}`", m.name);
            let t = source
                .tensor(&m.name)
                .unwrap_or_else(|| panic!("{what}: missing"));
            assert_eq!(t.dtype.name(), m.dtype, "{what}");
            assert_eq!(t.dtype.ggml_id(), Some(m.type_id), "{what}");
            assert_eq!(t.shape, m.shape, "{what}: shape, outermost first");
            assert_eq!(t.offset, m.offset, "{what}: offset");
            assert_eq!(t.len, m.bytes, "{what}: length");
            let data = &bytes[t.offset as usize..(t.offset + t.len) as usize];
            let want = fs::read(reference.path(&m.bin)).unwrap();
            assert!(data == want.as_slice(), "{what}: bytes differ");
            let info = gguf.tensors().iter().find(|i| i.name == m.name).unwrap();
            assert_eq!(
                info.dims, m.dims,
                "{what}: dims as written, innermost first"
            );
            assert_eq!(info.offset + gguf.data_start(), m.offset, "{what}");
            types_seen.insert(m.dtype.clone());
        }

        // Metadata: the same keys in the same order, each of the same type and value.
        let keys: Vec<&str> = gguf.metadata().iter().map(|(k, _)| k.as_str()).collect();
        let want: Vec<&str> = file.metadata.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, want, "{rel}: metadata keys");
        for m in &file.metadata {
            let what = format!("{rel}: key `{}`", m.key);
            let value = gguf.get(&m.key).unwrap();
            assert_eq!(value.value_type().name(), m.value_type, "{what}");
            if let lowtide::GgufValue::Array(array) = value {
                assert_eq!(
                    Some(array.element_type().name()),
                    m.element_type.as_deref(),
                    "{what}"
                );
                assert_eq!(Some(array.len()), m.len, "{what}");
            }
            let f32 = m.value_type == "FLOAT32" || m.element_type.as_deref() == Some("FLOAT32");
            let ours = serde_json::to_value(value).unwrap();
            assert!(
                lowtide_testkit::same_json(&ours, &m.value, f32),
                "{what}: {ours} != {}",
                m.value
            );
        }
        assert_eq!(
            gguf.get("general.architecture").and_then(|v| v.as_str()),
            Some("lowtide-test")
        );
    }
    // Every type of the reference was written and read.
    assert_eq!(types_seen.len(), reference.manifest.types.len());
}

#[test]
fn store_serves_reference_gguf_bytes_mapped_and_in_ram() {
    let Some(reference) = reference("store_serves_reference_gguf_bytes_mapped_and_in_ram") else {
        return;
    };
    let store = Store::builder().ram_budget(64 << 20).build().unwrap();
    for file in &reference.manifest.files {
        let model = store.open_model(reference.path(&file.file)).unwrap();
        assert_eq!(store.tensors(model).unwrap().len(), file.tensors.len());
        for m in &file.tensors {
            let what = format!("{}: `{}`", file.file, m.name);
            let want = fs::read(reference.path(&m.bin)).unwrap();
            let id = store.tensor(model, &m.name).unwrap();
            let info = store.info(id).unwrap();
            assert_eq!(info.dtype.name(), m.dtype, "{what}");
            assert!(
                info.shape
                    .iter()
                    .map(|&d| d as u64)
                    .eq(m.shape.iter().copied()),
                "{what}"
            );
            assert!(info.clean, "{what}");
            let mapped = common::mapped(&store, id).unwrap();
            assert_eq!(mapped.tier(), Tier::Mapped);
            assert!(mapped.bytes() == want.as_slice(), "{what}: mapped bytes");
            drop(mapped);
            let ram = store.acquire_ram(id).unwrap();
            assert!(&*ram == want.as_slice(), "{what}: RAM bytes");
        }
    }
}

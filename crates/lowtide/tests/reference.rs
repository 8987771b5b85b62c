//! Files written by the reference implementation (Python `safetensors` + `numpy`, see
//! `tests/reference/write_reference.py`) read back through lowtide: names, dtypes, shapes,
//! offsets and bytes must match what the reference wrote, tensor for tensor.
//!
//! Needs Python with `pip install safetensors numpy` (the venv of `scripts/test` when it exists,
//! else `python3`). Without them the tests fail when `CI` is set and are skipped with a message
//! on stderr otherwise.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use lowtide::{ModelFiles, Source, Store, Tier};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Manifest {
    files: Vec<ManifestFile>,
    sharded: ManifestSharded,
    tensors: Vec<ManifestTensor>,
}

#[derive(Debug, Deserialize)]
struct ManifestFile {
    file: String,
    metadata: Option<BTreeMap<String, String>>,
    data_start: u64,
    tensors: usize,
}

#[derive(Debug, Deserialize)]
struct ManifestSharded {
    dir: String,
    index: String,
    total_size: u64,
    weight_map: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct ManifestTensor {
    file: String,
    name: String,
    dtype: String,
    shape: Vec<u64>,
    bytes: u64,
    data_offsets: (u64, u64),
    #[allow(
        dead_code,
        reason = "kept for people reading the manifest; bytes are compared"
    )]
    sha256: String,
    bin: String,
}

/// The reference files in a temporary directory, with their manifest.
struct Reference {
    dir: tempfile::TempDir,
    manifest: Manifest,
}

impl Reference {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The raw bytes the reference wrote for a tensor.
    fn expected(&self, tensor: &ManifestTensor) -> Vec<u8> {
        let bytes = fs::read(self.path(&tensor.bin)).unwrap();
        assert_eq!(bytes.len() as u64, tensor.bytes, "{}", tensor.bin);
        bytes
    }

    /// The manifest's tensors of one file, by name.
    fn tensors_of(&self, file: &str) -> BTreeMap<&str, &ManifestTensor> {
        self.manifest
            .tensors
            .iter()
            .filter(|t| t.file == file)
            .map(|t| (t.name.as_str(), t))
            .collect()
    }

    /// The manifest's tensors of the sharded model, by name.
    fn sharded_tensors(&self) -> BTreeMap<&str, &ManifestTensor> {
        let prefix = format!("{}/", self.manifest.sharded.dir);
        self.manifest
            .tensors
            .iter()
            .filter(|t| t.file.starts_with(&prefix))
            .map(|t| (t.name.as_str(), t))
            .collect()
    }
}

/// Runs the reference writer into a new temporary directory. `None` (after a message on
/// stderr) when Python or its packages are missing and `CI` is not set; a failure under `CI`.
fn reference(test: &str) -> Option<Reference> {
    let (dir, manifest) = lowtide_testkit::run_reference_writer(
        test,
        Path::new(env!("CARGO_TARGET_TMPDIR")),
        "write_reference.py",
        "safetensors numpy",
    )?;
    let manifest: Manifest = serde_json::from_value(manifest).unwrap();
    assert!(!manifest.tensors.is_empty());
    Some(Reference { dir, manifest })
}

/// Checks one opened file against the manifest: metadata, tensor set, and every tensor's
/// dtype, shape, offset and bytes (read from the file at the offset lowtide reports).
fn check_source(reference: &Reference, rel: &str, source: &Source) {
    let file = reference
        .manifest
        .files
        .iter()
        .find(|f| f.file == rel)
        .unwrap_or_else(|| panic!("{rel} is not in the manifest"));
    let expected = reference.tensors_of(rel);
    assert_eq!(expected.len(), file.tensors, "{rel}");
    assert_eq!(
        source.metadata(),
        &file.metadata.clone().unwrap_or_default(),
        "{rel}"
    );
    assert_eq!(source.data_start(), file.data_start, "{rel}");

    let names: BTreeSet<&str> = source.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names.len(),
        source.tensors().len(),
        "{rel}: duplicate names"
    );
    let want: BTreeSet<&str> = expected.keys().copied().collect();
    assert_eq!(names, want, "{rel}: tensor names");

    let bytes = fs::read(reference.path(rel)).unwrap();
    assert_eq!(source.file_len(), bytes.len() as u64, "{rel}");
    let mut end = source.data_start();
    for t in source.tensors() {
        let m = expected[t.name.as_str()];
        let what = format!("{rel}: tensor `{}`", t.name);
        assert_eq!(t.dtype.name(), m.dtype, "{what}: dtype");
        assert_eq!(t.shape, m.shape, "{what}: shape");
        assert_eq!(t.len, m.bytes, "{what}: length");
        assert_eq!(
            t.offset,
            file.data_start + m.data_offsets.0,
            "{what}: offset"
        );
        assert_eq!(t.offset, end, "{what}: tensors are listed in data order");
        end += t.len;
        let data = &bytes[t.offset as usize..(t.offset + t.len) as usize];
        assert!(data == reference.expected(m), "{what}: bytes differ");
        assert_eq!(source.tensor(&t.name), Some(t), "{what}: lookup by name");
    }
    assert_eq!(
        end,
        source.file_len(),
        "{rel}: tensors tile the data buffer"
    );
}

/// Checks a model opened through `ModelFiles` against the manifest's tensors `expected`.
fn check_model(
    reference: &Reference,
    model: &ModelFiles,
    expected: &BTreeMap<&str, &ManifestTensor>,
) {
    let what = model.path().display().to_string();
    let names: BTreeSet<&str> = model.tensors().keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = expected.keys().copied().collect();
    assert_eq!(names, want, "{what}: tensor names");
    let total: u64 = expected.values().map(|t| t.bytes).sum();
    assert_eq!(model.total_bytes(), total, "{what}: total bytes");
    for source in model.sources() {
        let rel = source
            .path()
            .strip_prefix(reference.dir.path())
            .unwrap()
            .to_str()
            .unwrap();
        check_source(reference, rel, source);
    }
    for (name, m) in expected {
        let (source, t) = model.get(name).unwrap();
        assert_eq!(
            source.path(),
            reference.path(&m.file),
            "{what}: `{name}` file"
        );
        assert_eq!(t.name, *name);
        assert_eq!(t.dtype.name(), m.dtype, "{what}: `{name}` dtype");
        assert_eq!(t.shape, m.shape, "{what}: `{name}` shape");
        assert_eq!(t.len, m.bytes, "{what}: `{name}` length");
    }
}

#[test]
fn every_reference_file_opens_with_identical_tensors() {
    let Some(reference) = reference("every_reference_file_opens_with_identical_tensors") else {
        return;
    };
    assert!(reference.manifest.files.len() >= 4);
    let mut seen = BTreeSet::new();
    for file in &reference.manifest.files {
        let source = Source::open(reference.path(&file.file))
            .unwrap_or_else(|err| panic!("{}: {err:?}", file.file));
        check_source(&reference, &file.file, &source);
        for t in source.tensors() {
            assert!(seen.insert((file.file.clone(), t.name.clone())));
        }
    }
    // Every tensor of the manifest was found, in the file the manifest names.
    let manifest: BTreeSet<(String, String)> = reference
        .manifest
        .tensors
        .iter()
        .map(|t| (t.file.clone(), t.name.clone()))
        .collect();
    assert_eq!(seen, manifest);
}

#[test]
fn every_dtype_the_reference_writes_is_read() {
    let Some(reference) = reference("every_dtype_the_reference_writes_is_read") else {
        return;
    };
    let dtypes: BTreeSet<&str> = reference
        .manifest
        .tensors
        .iter()
        .map(|t| t.dtype.as_str())
        .collect();
    for dtype in ["F16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL"] {
        assert!(
            dtypes.contains(dtype),
            "the reference files have no {dtype}"
        );
    }
    for dtype in dtypes {
        assert!(
            lowtide::Dtype::ALL.iter().any(|d| d.name() == dtype),
            "lowtide has no dtype {dtype}"
        );
    }
}

#[test]
fn sharded_reference_model_by_directory_and_index() {
    let Some(reference) = reference("sharded_reference_model_by_directory_and_index") else {
        return;
    };
    let sharded = &reference.manifest.sharded;
    let expected = reference.sharded_tensors();
    let mapped: BTreeSet<&str> = sharded.weight_map.keys().map(String::as_str).collect();
    assert_eq!(mapped, expected.keys().copied().collect());

    for path in [reference.path(&sharded.dir), reference.path(&sharded.index)] {
        let model =
            ModelFiles::open(&path).unwrap_or_else(|err| panic!("{}: {err:?}", path.display()));
        assert_eq!(model.sources().len(), 2, "{}", path.display());
        check_model(&reference, &model, &expected);
        assert_eq!(model.total_bytes(), sharded.total_size);
        assert_eq!(
            model.index_metadata().get("total_size"),
            Some(&serde_json::Value::from(sharded.total_size)),
            "{}: the index's metadata",
            path.display()
        );
        for (name, shard) in &sharded.weight_map {
            let (source, _) = model.get(name).unwrap();
            let file = source.path().file_name().unwrap().to_str().unwrap();
            assert_eq!(file, shard, "`{name}` is in the shard the index names");
        }
    }
}

#[test]
fn single_reference_files_and_their_directory_as_models() {
    let Some(reference) = reference("single_reference_files_and_their_directory_as_models") else {
        return;
    };
    let top: Vec<&ManifestFile> = reference
        .manifest
        .files
        .iter()
        .filter(|f| !f.file.contains('/'))
        .collect();
    assert!(top.len() >= 2);
    let mut all = BTreeMap::new();
    for file in &top {
        let expected = reference.tensors_of(&file.file);
        let model = ModelFiles::open(reference.path(&file.file))
            .unwrap_or_else(|err| panic!("{}: {err:?}", file.file));
        assert_eq!(model.sources().len(), 1);
        check_model(&reference, &model, &expected);
        all.extend(expected);
    }
    // The top directory holds no index: every `.safetensors` file in it is one model.
    let model = ModelFiles::open(reference.dir.path()).unwrap();
    assert_eq!(model.sources().len(), top.len());
    check_model(&reference, &model, &all);
}

#[test]
fn store_serves_reference_bytes_mapped_and_in_ram() {
    let Some(reference) = reference("store_serves_reference_bytes_mapped_and_in_ram") else {
        return;
    };
    let store = Store::builder().ram_budget(64 << 20).build().unwrap();
    let mut models: Vec<(PathBuf, BTreeMap<&str, &ManifestTensor>)> = reference
        .manifest
        .files
        .iter()
        .filter(|f| !f.file.contains('/'))
        .map(|f| (reference.path(&f.file), reference.tensors_of(&f.file)))
        .collect();
    models.push((
        reference.path(&reference.manifest.sharded.index),
        reference.sharded_tensors(),
    ));
    for (path, expected) in &models {
        let model = store
            .open_model(path)
            .unwrap_or_else(|err| panic!("{}: {err:?}", path.display()));
        assert_eq!(store.tensors(model).unwrap().len(), expected.len());
        for (name, m) in expected {
            let what = format!("{}: tensor `{name}`", path.display());
            let want = reference.expected(m);
            let id = store.tensor(model, name).unwrap();
            let info = store.info(id).unwrap();
            assert_eq!(info.dtype.name(), m.dtype, "{what}");
            assert!(
                info.shape
                    .iter()
                    .map(|&d| d as u64)
                    .eq(m.shape.iter().copied()),
                "{what}"
            );
            assert_eq!(info.len, m.bytes, "{what}");
            assert!(info.clean, "{what}");

            let mapped = common::mapped(&store, id).unwrap_or_else(|err| panic!("{what}: {err:?}"));
            assert_eq!(mapped.tier(), Tier::Mapped, "{what}");
            assert!(
                mapped.bytes() == want.as_slice(),
                "{what}: mapped bytes differ"
            );
            drop(mapped);

            let ram = store
                .acquire_ram(id)
                .unwrap_or_else(|err| panic!("{what}: {err:?}"));
            assert_eq!(ram.tier(), Tier::Ram, "{what}");
            assert!(&*ram == want.as_slice(), "{what}: RAM bytes differ");
            drop(ram);

            // With a RAM copy, a plain acquire serves it; after a clean drop, the file again.
            assert_eq!(store.acquire_ram(id).unwrap().tier(), Tier::Ram, "{what}");
            store.drop_clean(id).unwrap();
            assert!(!store.info(id).unwrap().in_ram, "{what}");
            let again = common::mapped(&store, id).unwrap();
            assert_eq!(again.tier(), Tier::Mapped, "{what}");
            assert!(
                again.bytes() == want.as_slice(),
                "{what}: bytes after a drop"
            );
        }
    }
    let stats = store.stats();
    assert_eq!(stats.anon_bytes, 0);
    assert_eq!(stats.bytes_written, 0, "clean drops write nothing");
}

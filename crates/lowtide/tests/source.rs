//! Opening sources: single files, shards, indexes, and the errors for bad ones.

mod common;

use std::fs;

use lowtide::{HeaderError, IndexError, ModelFiles, Source, SourceError};

#[test]
fn single_file_round_trip() {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    let source = Source::open(&path).unwrap();
    let specs = common::unet_specs("");
    assert_eq!(source.tensors().len(), specs.len());
    assert_eq!(source.metadata()["format"], "pt");
    let file = fs::read(&path).unwrap();
    for spec in &specs {
        let t = source.tensor(&spec.name).unwrap();
        assert_eq!((t.dtype, &t.shape), (spec.dtype, &spec.shape));
        assert_eq!(t.len, spec.byte_len().unwrap());
        let bytes = &file[t.offset as usize..(t.offset + t.len) as usize];
        assert_eq!(bytes, common::expected(&spec.name, t.len), "{}", spec.name);
    }
    // Tensors are listed in data order and tile the data buffer.
    let mut end = source.data_start();
    for t in source.tensors() {
        assert_eq!(t.offset, end);
        end += t.len;
    }
    assert_eq!(end, source.file_len());
}

fn shard_dir() -> tempfile::TempDir {
    let dir = common::tempdir();
    let specs = common::unet_specs("");
    let (a, b) = specs.split_at(6);
    common::write(&dir.path().join("model-00001-of-00002.safetensors"), a);
    common::write(&dir.path().join("model-00002-of-00002.safetensors"), b);
    dir
}

fn write_index(dir: &tempfile::TempDir, map: &[(&str, &str)]) -> std::path::PathBuf {
    let map: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .map(|(t, s)| ((*t).to_owned(), serde_json::Value::from(*s)))
        .collect();
    let json = serde_json::json!({"metadata": {"total_size": 1}, "weight_map": map});
    let path = dir.path().join("model.safetensors.index.json");
    fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    path
}

#[test]
fn shards_by_directory_and_index() {
    let dir = shard_dir();
    let by_dir = ModelFiles::open(dir.path()).unwrap();
    assert_eq!(by_dir.sources.len(), 2);
    assert_eq!(by_dir.tensors.len(), common::unet_specs("").len());

    let specs = common::unet_specs("");
    let map: Vec<(String, &str)> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let shard = if i < 6 {
                "model-00001-of-00002.safetensors"
            } else {
                "model-00002-of-00002.safetensors"
            };
            (s.name.clone(), shard)
        })
        .collect();
    let map: Vec<(&str, &str)> = map.iter().map(|(t, s)| (t.as_str(), *s)).collect();
    let index = write_index(&dir, &map);
    let by_index = ModelFiles::open(&index).unwrap();
    assert_eq!(by_index.tensors.len(), specs.len());
    assert_eq!(by_index.index_metadata["total_size"], 1);
    // The directory now has an index, and uses it.
    let by_dir = ModelFiles::open(dir.path()).unwrap();
    assert_eq!(by_dir.path, index);
    for spec in &specs {
        let (source, t) = by_index.get(&spec.name).unwrap();
        let bytes = fs::read(source.path()).unwrap();
        assert_eq!(
            &bytes[t.offset as usize..(t.offset + t.len) as usize],
            common::expected(&spec.name, t.len)
        );
    }
}

fn index_error(map: &[(&str, &str)]) -> IndexError {
    let dir = shard_dir();
    let index = write_index(&dir, map);
    match ModelFiles::open(&index) {
        Err(SourceError::Index { path, source }) => {
            assert_eq!(path, index);
            source
        }
        other => panic!("expected an index error, got {other:?}"),
    }
}

#[test]
fn inconsistent_indexes_are_rejected() {
    let s1 = "model-00001-of-00002.safetensors";
    let all: Vec<String> = common::unet_specs("")
        .iter()
        .map(|s| s.name.clone())
        .collect();
    // A tensor mapped to the wrong shard.
    let err = index_error(&[(all[0].as_str(), "model-00002-of-00002.safetensors")]);
    assert!(matches!(err, IndexError::MissingTensor { .. }), "{err}");
    // Shard 1 has tensors the index does not list.
    let err = index_error(&[(all[0].as_str(), s1)]);
    assert!(matches!(err, IndexError::Unlisted { .. }), "{err}");
    // A shard path that leaves the directory.
    let err = index_error(&[(all[0].as_str(), "../outside.safetensors")]);
    assert!(matches!(err, IndexError::ShardPath { .. }), "{err}");
}

#[test]
fn duplicate_tensors_across_shards_are_rejected() {
    let dir = common::tempdir();
    let specs = common::unet_specs("");
    common::write(&dir.path().join("a.safetensors"), &specs[..3]);
    common::write(&dir.path().join("b.safetensors"), &specs[2..4]);
    let err = ModelFiles::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("invalid sharded model"), "{err}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains(&specs[2].name), "{source}");
}

#[test]
fn truncated_file_is_an_error_not_a_signal() {
    let dir = common::tempdir();
    let path = common::unet(&dir);
    let len = fs::metadata(&path).unwrap().len();
    for cut in [0, 5, 8, 100, len / 2, len - 1] {
        common::unet(&dir);
        let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(cut).unwrap();
        let err = Source::open(&path).unwrap_err();
        let SourceError::Header { source, .. } = &err else {
            panic!("{err:?}")
        };
        let expected = match cut {
            0..8 => matches!(source, HeaderError::TooShort { .. }),
            8..=100 => matches!(source, HeaderError::PastEnd { .. }),
            _ => matches!(source, HeaderError::OutOfBounds { .. }),
        };
        assert!(expected, "cut at {cut}: {source}");
    }
}

#[test]
fn missing_file_names_the_path() {
    let err = Source::open("/nonexistent/model.safetensors").unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/model.safetensors"),
        "{err}"
    );
    assert!(matches!(err, SourceError::Io { .. }));
}

#[test]
fn empty_directory_is_an_error() {
    let dir = common::tempdir();
    let err = ModelFiles::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            SourceError::Index {
                source: IndexError::Empty,
                ..
            }
        ),
        "{err}"
    );
}

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
    assert_eq!(by_dir.sources().len(), 2);
    assert_eq!(by_dir.tensors().len(), common::unet_specs("").len());

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
    assert_eq!(by_index.tensors().len(), specs.len());
    assert_eq!(by_index.index_metadata()["total_size"], 1);
    // The directory now has an index, and uses it.
    let by_dir = ModelFiles::open(dir.path()).unwrap();
    assert_eq!(by_dir.path(), index);
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

/// What a password file starts with: as a header length, bytes 0..8 decode to this text.
const SECRET: &[u8] = b"root:*:20000:0:99999:7:::\n";

/// The whole error, its causes included, as one string.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// Asserts that `text` repeats nothing of [`SECRET`]: neither its bytes nor their value as a
/// little-endian header length.
fn assert_no_secret(text: &str) {
    let as_len = u64::from_le_bytes(SECRET[..8].try_into().unwrap()).to_string();
    assert!(!text.contains("root:") && !text.contains(&as_len), "{text}");
}

/// `root/model/` holding shard `a.safetensors` (the first tensors of the UNet), and `root/secret`.
fn model_beside_a_secret() -> (tempfile::TempDir, std::path::PathBuf) {
    let root = common::tempdir();
    let model = root.path().join("model");
    fs::create_dir(&model).unwrap();
    common::write(&model.join("a.safetensors"), &common::unet_specs("")[..6]);
    fs::write(root.path().join("secret"), SECRET).unwrap();
    (root, model)
}

/// An index in `model` mapping the first UNet tensors to `a.safetensors` and the rest to `b`.
fn index_with_second_shard(model: &std::path::Path, b: &str) -> std::path::PathBuf {
    let map: serde_json::Map<String, serde_json::Value> = common::unet_specs("")
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let shard = if i < 6 { "a.safetensors" } else { b };
            (s.name.clone(), shard.into())
        })
        .collect();
    let path = model.join("model.safetensors.index.json");
    let json = serde_json::json!({"metadata": {}, "weight_map": map});
    fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    path
}

fn outside_name(err: &SourceError) -> Option<&str> {
    match err {
        SourceError::Index {
            source: IndexError::Outside { name, .. },
            ..
        } => Some(name),
        _ => None,
    }
}

#[test]
fn an_index_shard_linking_to_a_secret_outside_is_refused_unread() {
    let (root, model) = model_beside_a_secret();
    let secret = root.path().join("secret");
    // A relative link out of the directory, and an absolute one.
    for target in [std::path::PathBuf::from("../secret"), secret.clone()] {
        let _ = fs::remove_file(model.join("b.safetensors"));
        std::os::unix::fs::symlink(&target, model.join("b.safetensors")).unwrap();
        let index = index_with_second_shard(&model, "b.safetensors");
        for path in [&index, &model] {
            let err = ModelFiles::open(path).unwrap_err();
            assert_eq!(outside_name(&err), Some("b.safetensors"), "{err:?}");
            let text = chain(&err);
            assert!(text.contains("`b.safetensors`"), "{text}");
            assert_no_secret(&text);
        }
    }
    // Named directly, the secret is read (the user named it), and its first bytes are still
    // not repeated as a "header length".
    let err = Source::open(&secret).unwrap_err();
    assert!(
        matches!(
            &err,
            SourceError::Header {
                source: HeaderError::TooLarge { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_no_secret(&chain(&err));
}

#[test]
fn a_link_to_a_valid_shard_outside_the_directory_is_refused() {
    let (root, model) = model_beside_a_secret();
    let outside = common::write(
        &root.path().join("b.safetensors"),
        &common::unet_specs("")[6..],
    );
    std::os::unix::fs::symlink(&outside, model.join("b.safetensors")).unwrap();
    let index = index_with_second_shard(&model, "b.safetensors");
    let err = ModelFiles::open(&index).unwrap_err();
    assert_eq!(outside_name(&err), Some("b.safetensors"), "{err:?}");
    // A directory of shards with that link is refused the same way.
    fs::remove_file(&index).unwrap();
    let err = ModelFiles::open(&model).unwrap_err();
    assert_eq!(outside_name(&err), Some("b.safetensors"), "{err:?}");
}

#[test]
fn links_inside_the_directory_are_followed() {
    let (_root, model) = model_beside_a_secret();
    fs::create_dir(model.join("blobs")).unwrap();
    common::write(
        &model.join("blobs/b-real.safetensors"),
        &common::unet_specs("")[6..],
    );
    std::os::unix::fs::symlink("blobs/b-real.safetensors", model.join("b.safetensors")).unwrap();
    let index = index_with_second_shard(&model, "b.safetensors");
    let by_index = ModelFiles::open(&index).unwrap();
    assert_eq!(by_index.tensors().len(), common::unet_specs("").len());
    assert_eq!(by_index.sources()[1].path(), model.join("b.safetensors"));
    fs::remove_file(&index).unwrap();
    let by_dir = ModelFiles::open(&model).unwrap();
    assert_eq!(by_dir.tensors().len(), common::unet_specs("").len());
}

/// Runs `open` on another thread and fails the test if it has not returned within 20 s (the
/// thread is left blocked; the test process ends it).
fn within_20s<T: Send + 'static>(open: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(open()));
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("opening a FIFO blocked for 20 s")
}

fn assert_fifo_refused(err: &SourceError, name: &str) {
    let SourceError::Io { path, source, .. } = err else {
        panic!("{err:?}")
    };
    assert!(path.ends_with(name), "{err:?}");
    let kind = source
        .get_ref()
        .and_then(|e| e.downcast_ref::<lowtide::NotRegularFile>())
        .map(|e| e.kind);
    assert_eq!(kind, Some(lowtide::FileKind::Fifo), "{err:?}");
}

fn mkfifo(path: &std::path::Path) {
    use rustix::fs::{CWD, FileType, Mode};
    rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::RUSR | Mode::WUSR, 0).unwrap();
}

#[test]
fn fifos_are_refused_without_blocking() {
    let (_root, model) = model_beside_a_secret();
    // As a file named directly.
    let pipe = model.join("pipe.safetensors");
    mkfifo(&pipe);
    let named = pipe.clone();
    let err = within_20s(move || Source::open(&named).unwrap_err());
    assert_fifo_refused(&err, "pipe.safetensors");
    // As a shard of a directory: an error naming it, not skipped.
    let dir = model.clone();
    let err = within_20s(move || ModelFiles::open(&dir).unwrap_err());
    assert_fifo_refused(&err, "pipe.safetensors");
    // As a shard named by an index.
    let index = index_with_second_shard(&model, "pipe.safetensors");
    let named = index.clone();
    let err = within_20s(move || ModelFiles::open(&named).unwrap_err());
    assert_fifo_refused(&err, "pipe.safetensors");
    // As the index itself, named directly and found in the directory.
    fs::remove_file(&index).unwrap();
    fs::remove_file(&pipe).unwrap();
    mkfifo(&index);
    let named = index.clone();
    let err = within_20s(move || ModelFiles::open(&named).unwrap_err());
    assert_fifo_refused(&err, "model.safetensors.index.json");
    let err = within_20s(move || ModelFiles::open(&model).unwrap_err());
    assert_fifo_refused(&err, "model.safetensors.index.json");
}

#[test]
fn a_json_file_that_is_not_an_index_says_so() {
    let dir = common::tempdir();
    let config = dir.path().join("config.json");
    fs::write(
        &config,
        br#"{"_class_name": "UNet2DConditionModel", "in_channels": 4}"#,
    )
    .unwrap();
    let err = ModelFiles::open(&config).unwrap_err();
    assert!(
        matches!(
            &err,
            SourceError::Index {
                source: IndexError::NoWeightMap,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(chain(&err).contains("not a safetensors index"), "{err}");
}

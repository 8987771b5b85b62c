//! A model as a set of files: one `.safetensors` file, a directory of shards, or a
//! `*.safetensors.index.json` with its `weight_map`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::{Source, SourceError, SourceTensor};
use crate::sys::open::{BeneathError, ModelDir, open_regular_file};
use crate::text::{Escaped, EscapedPath};

/// Largest index file read, like the header cap.
const MAX_INDEX_LEN: u64 = 100_000_000;

/// Why a sharded model's index or directory was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// The index is not JSON of the expected shape.
    #[error("index JSON is malformed at line {line} column {column}")]
    Json {
        /// Line in the index file.
        line: usize,
        /// Column in the index file.
        column: usize,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The index file is larger than the cap.
    #[error("index is {len} bytes, over the {max}-byte cap")]
    TooLarge {
        /// Its length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// A shard is named by a path that leaves the index's directory.
    #[error(
        "tensor `{}`: shard `{}` is not a plain file name in the index's directory",
        Escaped(tensor),
        Escaped(shard)
    )]
    ShardPath {
        /// The tensor mapped to it.
        tensor: String,
        /// The shard as written.
        shard: String,
    },
    /// The index maps a tensor to a shard that does not contain it.
    #[error(
        "tensor `{}` is mapped to shard `{}`, which does not contain it",
        Escaped(tensor),
        Escaped(shard)
    )]
    MissingTensor {
        /// The tensor.
        tensor: String,
        /// The shard.
        shard: String,
    },
    /// A shard contains a tensor the index does not list or maps elsewhere.
    #[error(
        "shard `{}` contains tensor `{}`, which the index does not map to it",
        Escaped(shard),
        Escaped(tensor)
    )]
    Unlisted {
        /// The tensor.
        tensor: String,
        /// The shard.
        shard: String,
    },
    /// Two shards of a directory define the same tensor.
    #[error(
        "tensor `{}` is defined in both `{}` and `{}`",
        Escaped(tensor),
        Escaped(first),
        Escaped(second)
    )]
    Duplicate {
        /// The tensor.
        tensor: String,
        /// One file.
        first: String,
        /// The other.
        second: String,
    },
    /// A directory holds no `.safetensors` file.
    #[error("no .safetensors file found")]
    Empty,
    /// A JSON file without a `weight_map`: some other JSON file (a `config.json`), not an index.
    #[error("not a safetensors index: it has no `weight_map`")]
    NoWeightMap,
    /// A shard or index resolves to a file outside the model's directory: through `..`, an
    /// absolute symbolic link, or a symbolic link whose target lies outside. Nothing of it is
    /// read.
    #[error(
        "`{}` resolves outside the model's directory {}: a symbolic link leading out of it is not followed",
        Escaped(name),
        EscapedPath(dir)
    )]
    Outside {
        /// The shard or index, as named in the index or the directory.
        name: String,
        /// The model's directory.
        dir: PathBuf,
    },
}

/// An index with its weight map.
struct IndexJson {
    metadata: serde_json::Map<String, serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

/// An index as read, before `weight_map` is known to be there.
#[derive(Deserialize)]
struct MaybeIndex {
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    weight_map: Option<BTreeMap<String, String>>,
}

/// Where one tensor of a model lives.
#[derive(Debug, Clone)]
pub struct TensorLocation {
    /// Index into [`ModelFiles::sources()`].
    pub source: usize,
    /// Index into that source's [`Source::tensors`].
    pub index: usize,
}

/// The files of one model, opened and validated, with every tensor located.
#[derive(Debug)]
pub struct ModelFiles {
    // Read directly by the store when it opens a model; read-only outside the crate.
    /// What the user named: a file, a directory or an index.
    pub(crate) path: PathBuf,
    /// The shard files, in the order they were found.
    pub(crate) sources: Vec<Arc<Source>>,
    /// Every tensor of the model by name.
    pub(crate) tensors: BTreeMap<String, TensorLocation>,
    /// The index's `metadata` object, when there is an index.
    pub(crate) index_metadata: serde_json::Map<String, serde_json::Value>,
}

impl ModelFiles {
    /// What was opened, as the caller named it: a file, a directory or an index.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shard files, in the order they were found.
    pub fn sources(&self) -> &[Arc<Source>] {
        &self.sources
    }

    /// Every tensor of the model by name, with the shard and entry that hold it.
    pub fn tensors(&self) -> &BTreeMap<String, TensorLocation> {
        &self.tensors
    }

    /// The index's `metadata` object; empty without an index.
    pub fn index_metadata(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.index_metadata
    }

    /// Opens `path`: a `.safetensors` file, a `*.index.json` index, or a directory (which uses
    /// its index when it has exactly one, and otherwise every `.safetensors` file in it).
    ///
    /// Only regular files are read, and nothing blocks: a FIFO, socket or device is refused
    /// with a [`crate::NotRegularFile`] error naming it. What `path` names may be a symbolic
    /// link (the caller named it), but the shards of an index and the files found in a
    /// directory must resolve inside the model's directory ([`IndexError::Outside`]); links
    /// that stay inside are followed. In a directory every entry whose name ends in
    /// `.safetensors` is a shard: one that is not a regular file (a FIFO, a subdirectory, a
    /// dangling link) is an error naming it, not skipped, so that a model is never silently
    /// opened with a shard missing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        let path = path.as_ref();
        let io = |op: &'static str| {
            move |source| SourceError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        // `stat` does not open the file: a FIFO cannot block here.
        let meta = fs::metadata(path).map_err(io("open"))?;
        if meta.is_dir() {
            let dir = ModelDir::open(path).map_err(io("open"))?;
            let mut indexes = Vec::new();
            let mut shards = Vec::new();
            for entry in fs::read_dir(path).map_err(io("list"))? {
                let entry = entry.map_err(io("list"))?;
                let raw = entry.file_name();
                let Some(name) = raw.to_str().map(str::to_owned) else {
                    if raw.as_encoded_bytes().ends_with(b".safetensors") {
                        // Never skipped: a model would open with a shard missing.
                        return Err(SourceError::Io {
                            path: entry.path(),
                            op: "use as a shard (its name is not UTF-8)",
                            source: std::io::ErrorKind::InvalidData.into(),
                        });
                    }
                    continue;
                };
                if name.ends_with(".safetensors.index.json") {
                    indexes.push(name);
                } else if name.ends_with(".safetensors") {
                    shards.push(name);
                }
            }
            if let [index] = indexes.as_slice() {
                let file = open_in(&dir, path, index)?;
                return Self::open_index(&path.join(index), &file, &dir);
            }
            shards.sort();
            let sources = shards
                .iter()
                .map(|name| open_shard(&dir, path, name))
                .collect::<Result<Vec<_>, _>>()?;
            return Self::assemble(path, sources);
        }
        if path.to_string_lossy().ends_with(".json") {
            let file = open_regular_file(path).map_err(io("open"))?;
            let dir = ModelDir::open(path.parent().unwrap_or(Path::new(".")))
                .map_err(io("open the directory of"))?;
            return Self::open_index(path, &file, &dir);
        }
        Self::assemble(path, vec![Arc::new(Source::open(path)?)])
    }

    /// A model of the opened `sources`, every tensor defined once.
    fn assemble(path: &Path, sources: Vec<Arc<Source>>) -> Result<Self, SourceError> {
        let invalid = |source| SourceError::Index {
            path: path.to_path_buf(),
            source,
        };
        if sources.is_empty() {
            return Err(invalid(IndexError::Empty));
        }
        let mut tensors: BTreeMap<String, TensorLocation> = BTreeMap::new();
        for (source_index, source) in sources.iter().enumerate() {
            for (index, tensor) in source.tensors().iter().enumerate() {
                let location = TensorLocation {
                    source: source_index,
                    index,
                };
                if let Some(first) = tensors.insert(tensor.name.clone(), location) {
                    return Err(invalid(IndexError::Duplicate {
                        tensor: tensor.name.clone(),
                        first: sources[first.source].path().display().to_string(),
                        second: source.path().display().to_string(),
                    }));
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            sources,
            tensors,
            index_metadata: serde_json::Map::new(),
        })
    }

    /// Reads index `index_path` from `file`; its shards are opened beneath `dir`.
    fn open_index(index_path: &Path, file: &File, dir: &ModelDir) -> Result<Self, SourceError> {
        let invalid = |source| SourceError::Index {
            path: index_path.to_path_buf(),
            source,
        };
        let io = |source| SourceError::Io {
            path: index_path.to_path_buf(),
            op: "read",
            source,
        };
        let len = file.metadata().map_err(io)?.len();
        if len > MAX_INDEX_LEN {
            return Err(invalid(IndexError::TooLarge {
                len,
                max: MAX_INDEX_LEN,
            }));
        }
        // At most one byte over the cap, should the file grow while it is read.
        let mut text = Vec::with_capacity(len as usize);
        file.take(MAX_INDEX_LEN + 1)
            .read_to_end(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_INDEX_LEN {
            return Err(invalid(IndexError::TooLarge {
                len: text.len() as u64,
                max: MAX_INDEX_LEN,
            }));
        }
        let index = parse_index(&text).map_err(invalid)?;
        drop(text);

        // Shards in order of first mention, each opened once.
        let mut shard_names: Vec<&str> = Vec::new();
        let mut shard_of: HashMap<&str, usize> = HashMap::new();
        for shard in index.weight_map.values() {
            if !shard_of.contains_key(shard.as_str()) {
                shard_of.insert(shard, shard_names.len());
                shard_names.push(shard);
            }
        }
        let sources = shard_names
            .iter()
            .map(|name| open_in(dir, index_path, name).and_then(|file| shard(dir, name, file)))
            .collect::<Result<Vec<_>, _>>()?;

        let mut tensors = BTreeMap::new();
        for (tensor, shard) in &index.weight_map {
            let source_index = shard_of[shard.as_str()];
            let source = &sources[source_index];
            let Some(index) = source.tensors().iter().position(|t| &t.name == tensor) else {
                return Err(invalid(IndexError::MissingTensor {
                    tensor: tensor.clone(),
                    shard: shard.clone(),
                }));
            };
            tensors.insert(
                tensor.clone(),
                TensorLocation {
                    source: source_index,
                    index,
                },
            );
        }
        for (source_index, source) in sources.iter().enumerate() {
            for tensor in source.tensors() {
                let mapped_here = tensors
                    .get(&tensor.name)
                    .is_some_and(|l| l.source == source_index);
                if !mapped_here {
                    return Err(invalid(IndexError::Unlisted {
                        tensor: tensor.name.clone(),
                        shard: shard_names[source_index].to_owned(),
                    }));
                }
            }
        }
        Ok(Self {
            path: index_path.to_path_buf(),
            sources,
            tensors,
            index_metadata: index.metadata,
        })
    }

    /// Total bytes of tensor data over all shards.
    pub fn total_bytes(&self) -> u64 {
        self.sources
            .iter()
            .flat_map(|s| s.tensors())
            .map(|t| t.len)
            .sum()
    }

    /// A tensor's entry and its source.
    pub fn get(&self, name: &str) -> Option<(&Arc<Source>, &SourceTensor)> {
        let location = self.tensors.get(name)?;
        let source = &self.sources[location.source];
        Some((source, &source.tensors()[location.index]))
    }
}

/// Opens `name`, a file of the model `model` (its index or its directory), beneath `dir`.
fn open_in(dir: &ModelDir, model: &Path, name: &str) -> Result<File, SourceError> {
    dir.open_regular(Path::new(name)).map_err(|err| match err {
        BeneathError::Outside => SourceError::Index {
            path: model.to_path_buf(),
            source: IndexError::Outside {
                name: name.to_owned(),
                dir: dir.path().to_path_buf(),
            },
        },
        BeneathError::Io(source) => SourceError::Io {
            path: dir.path().join(name),
            op: "open",
            source,
        },
    })
}

/// Validates and maps shard `name` of `dir`, opened as `file`.
fn shard(dir: &ModelDir, name: &str, file: File) -> Result<Arc<Source>, SourceError> {
    Source::from_file(&dir.path().join(name), file).map(Arc::new)
}

/// Opens shard `name` of the directory model `model` beneath `dir`.
fn open_shard(dir: &ModelDir, model: &Path, name: &str) -> Result<Arc<Source>, SourceError> {
    shard(dir, name, open_in(dir, model, name)?)
}

/// Parses and checks the text of a `*.safetensors.index.json` file: its JSON shape, and that
/// every shard is a plain file name in the index's directory. Returns the weight map (tensor
/// to shard). Never panics; exposed for fuzzing.
pub fn parse_index_json(text: &[u8]) -> Result<BTreeMap<String, String>, IndexError> {
    parse_index(text).map(|index| index.weight_map)
}

/// Parses an index and checks that every shard is a plain file name in the index's directory.
fn parse_index(text: &[u8]) -> Result<IndexJson, IndexError> {
    let index: MaybeIndex = serde_json::from_slice(text).map_err(|source| IndexError::Json {
        line: source.line(),
        column: source.column(),
        source,
    })?;
    let Some(weight_map) = index.weight_map else {
        return Err(IndexError::NoWeightMap);
    };
    let index = IndexJson {
        metadata: index.metadata,
        weight_map,
    };
    if let Some((tensor, shard)) = index
        .weight_map
        .iter()
        .find(|(_, shard)| !is_plain_file_name(shard))
    {
        return Err(IndexError::ShardPath {
            tensor: tensor.clone(),
            shard: shard.clone(),
        });
    }
    Ok(index)
}

fn is_plain_file_name(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty()
        && path.file_name().is_some_and(|f| f == path.as_os_str())
        && name != "."
        && name != ".."
}

#[cfg(test)]
mod tests {
    use super::{is_plain_file_name, parse_index_json};

    #[test]
    fn shard_names_stay_in_the_directory() {
        assert!(is_plain_file_name("model-00001-of-00002.safetensors"));
        assert!(!is_plain_file_name("../secret.safetensors"));
        assert!(!is_plain_file_name("/etc/passwd"));
        assert!(!is_plain_file_name("sub/dir.safetensors"));
        assert!(!is_plain_file_name(".."));
        assert!(!is_plain_file_name(""));
    }

    #[test]
    fn messages_escape_names_from_files() {
        let err = super::IndexError::MissingTensor {
            tensor: "\u{1b}[2J\r all good".into(),
            shard: "a\u{9b}b.safetensors".into(),
        };
        let shown = err.to_string();
        assert!(!shown.contains(|c: char| c.is_control()), "{shown:?}");
        assert!(shown.contains(r"`\u{1b}[2J\u{d} all good`"), "{shown}");
        assert!(shown.contains(r"`a\u{9b}b.safetensors`"), "{shown}");
    }

    #[test]
    fn index_json_shape() {
        assert!(parse_index_json(br#"{"weight_map":{"a":"x.safetensors"}}"#).is_ok());
        assert!(matches!(
            parse_index_json(br#"{"metadata":{}}"#),
            Err(super::IndexError::NoWeightMap)
        ));
        assert!(matches!(
            parse_index_json(br#"{"_name_or_path":"x","architectures":["Unet"]}"#),
            Err(super::IndexError::NoWeightMap)
        ));
        assert!(parse_index_json(br#"{"weight_map":{"a":1}}"#).is_err());
    }
}

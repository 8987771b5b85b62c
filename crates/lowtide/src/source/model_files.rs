//! A model as a set of files: one `.safetensors` file, a directory of shards, or a
//! `*.safetensors.index.json` with its `weight_map`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::{Source, SourceError, SourceTensor};

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
    #[error("tensor `{tensor}`: shard `{shard}` is not a plain file name in the index's directory")]
    ShardPath {
        /// The tensor mapped to it.
        tensor: String,
        /// The shard as written.
        shard: String,
    },
    /// The index maps a tensor to a shard that does not contain it.
    #[error("tensor `{tensor}` is mapped to shard `{shard}`, which does not contain it")]
    MissingTensor {
        /// The tensor.
        tensor: String,
        /// The shard.
        shard: String,
    },
    /// A shard contains a tensor the index does not list or maps elsewhere.
    #[error("shard `{shard}` contains tensor `{tensor}`, which the index does not map to it")]
    Unlisted {
        /// The tensor.
        tensor: String,
        /// The shard.
        shard: String,
    },
    /// Two shards of a directory define the same tensor.
    #[error("tensor `{tensor}` is defined in both `{first}` and `{second}`")]
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
}

#[derive(Deserialize)]
struct IndexJson {
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

/// Where one tensor of a model lives.
#[derive(Debug, Clone)]
pub struct TensorLocation {
    /// Index into [`ModelFiles::sources`].
    pub source: usize,
    /// Index into that source's [`Source::tensors`].
    pub index: usize,
}

/// The files of one model, opened and validated, with every tensor located.
#[derive(Debug)]
pub struct ModelFiles {
    /// What the user named: a file, a directory or an index.
    pub path: PathBuf,
    /// The shard files, in the order they were found.
    pub sources: Vec<Arc<Source>>,
    /// Every tensor of the model by name.
    pub tensors: BTreeMap<String, TensorLocation>,
    /// The index's `metadata` object, when there is an index.
    pub index_metadata: serde_json::Map<String, serde_json::Value>,
}

impl ModelFiles {
    /// Opens `path`: a `.safetensors` file, a `*.index.json` index, or a directory (which uses
    /// its index when it has exactly one, and otherwise every `.safetensors` file in it).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        let path = path.as_ref();
        let io = |op: &'static str| {
            move |source| SourceError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        let meta = fs::metadata(path).map_err(io("open"))?;
        if meta.is_dir() {
            let mut indexes = Vec::new();
            let mut shards = Vec::new();
            for entry in fs::read_dir(path).map_err(io("list"))? {
                let entry_path = entry.map_err(io("list"))?.path();
                let name = entry_path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                if name.ends_with(".safetensors.index.json") {
                    indexes.push(entry_path);
                } else if name.ends_with(".safetensors") && entry_path.is_file() {
                    shards.push(entry_path);
                }
            }
            if indexes.len() == 1 {
                return Self::open_index(&indexes[0]);
            }
            shards.sort();
            return Self::open_shards(path, &shards);
        }
        if path.to_string_lossy().ends_with(".json") {
            return Self::open_index(path);
        }
        Self::open_shards(path, &[path.to_path_buf()])
    }

    fn open_shards(path: &Path, files: &[PathBuf]) -> Result<Self, SourceError> {
        let invalid = |source| SourceError::Index {
            path: path.to_path_buf(),
            source,
        };
        if files.is_empty() {
            return Err(invalid(IndexError::Empty));
        }
        let sources = files.iter().map(Source::open).map(|s| s.map(Arc::new));
        let sources = sources.collect::<Result<Vec<_>, _>>()?;
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

    fn open_index(index_path: &Path) -> Result<Self, SourceError> {
        let invalid = |source| SourceError::Index {
            path: index_path.to_path_buf(),
            source,
        };
        let io = |source| SourceError::Io {
            path: index_path.to_path_buf(),
            op: "read",
            source,
        };
        let len = fs::metadata(index_path).map_err(io)?.len();
        if len > MAX_INDEX_LEN {
            return Err(invalid(IndexError::TooLarge {
                len,
                max: MAX_INDEX_LEN,
            }));
        }
        let text = fs::read(index_path).map_err(io)?;
        let index = parse_index(&text).map_err(invalid)?;
        let dir = index_path.parent().unwrap_or(Path::new("."));

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
            .map(|name| Source::open(dir.join(name)).map(Arc::new));
        let sources = sources.collect::<Result<Vec<_>, _>>()?;

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

/// Parses and checks the text of a `*.safetensors.index.json` file: its JSON shape, and that
/// every shard is a plain file name in the index's directory. Returns the weight map (tensor
/// to shard). Never panics; exposed for fuzzing.
pub fn parse_index_json(text: &[u8]) -> Result<BTreeMap<String, String>, IndexError> {
    parse_index(text).map(|index| index.weight_map)
}

/// Parses an index and checks that every shard is a plain file name in the index's directory.
fn parse_index(text: &[u8]) -> Result<IndexJson, IndexError> {
    let index: IndexJson = serde_json::from_slice(text).map_err(|source| IndexError::Json {
        line: source.line(),
        column: source.column(),
        source,
    })?;
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
    fn index_json_shape() {
        assert!(parse_index_json(br#"{"weight_map":{"a":"x.safetensors"}}"#).is_ok());
        assert!(parse_index_json(br#"{"metadata":{}}"#).is_err());
        assert!(parse_index_json(br#"{"weight_map":{"a":1}}"#).is_err());
    }
}

//! Sources: immutable model files (safetensors or GGUF), validated completely and mapped
//! read-only.
//!
//! A [`Source`] is opened once: its header is read with `pread` (never through the mapping, so a
//! short file cannot raise SIGBUS), validated in full, and only then is the file mapped
//! `MAP_SHARED` read-only. Its identity (device, inode, size, modification time) is recorded and
//! checked again before every restore; a changed file is [`SourceError::Changed`].

mod gguf;
mod header;
mod io;
mod model_files;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use gguf::{
    GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, Gguf, GgufArray, GgufError, GgufString, GgufTensorInfo,
    GgufValue, GgufValueType, MAX_GGUF_ARRAY_DEPTH, MAX_GGUF_ARRAY_LEN, MAX_GGUF_DIMS,
    MAX_GGUF_HEADER_LEN, MAX_GGUF_KEYS, MAX_GGUF_STRING_LEN, MAX_GGUF_TENSORS,
};
pub use header::{HeaderError, MAX_HEADER_LEN};
pub use io::{FileIo, SourceIo};
pub use model_files::{IndexError, ModelFiles, TensorLocation, parse_index_json};

use crate::dtype::Dtype;
use crate::sys::direct::{BLOCK, DirectBuf, with_prefault};
use crate::sys::{AlignedBuf, CacheRun, Mapping};

/// What identifies the bytes of a file: if any of these change, the file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl FileIdentity {
    fn of(file: &File) -> std::io::Result<Self> {
        let stat = rustix::fs::fstat(file)?;
        Ok(Self {
            dev: stat.st_dev,
            ino: stat.st_ino,
            size: u64::try_from(stat.st_size).unwrap_or(0),
            mtime_ns: i128::from(stat.st_mtime) * 1_000_000_000 + i128::from(stat.st_mtime_nsec),
        })
    }
}

/// How a source file changed since it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// Its size changed (truncated or extended).
    Size {
        /// Size when opened.
        was: u64,
        /// Size now.
        now: u64,
    },
    /// Its modification time changed (rewritten in place).
    Modified,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Size { was, now } => write!(f, "its size changed from {was} to {now} bytes"),
            Change::Modified => f.write_str("it was modified"),
        }
    }
}

/// Errors opening or reading a source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The file could not be opened, read or mapped.
    #[error("{}: cannot {op}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file.
    #[error("{}: invalid safetensors file", path.display())]
    Header {
        /// The file.
        path: PathBuf,
        /// The check that failed and where.
        #[source]
        source: HeaderError,
    },
    /// The file starts with `GGUF` but is not a valid GGUF file.
    #[error("{}: invalid GGUF file", path.display())]
    Gguf {
        /// The file.
        path: PathBuf,
        /// The check that failed and where.
        #[source]
        source: GgufError,
    },
    /// A sharded model's index or directory is inconsistent.
    #[error("{}: invalid sharded model", path.display())]
    Index {
        /// The index file or directory.
        path: PathBuf,
        /// The check that failed.
        #[source]
        source: IndexError,
    },
    /// The file changed after it was opened; its mapped bytes can no longer be trusted.
    #[error("{}: changed since it was opened: {change}", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
        /// What changed.
        change: Change,
    },
}

/// The format of a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SourceFormat {
    /// safetensors: a JSON header, then the data.
    Safetensors,
    /// GGUF (llama.cpp): a binary header of typed metadata, then the aligned data section.
    Gguf,
}

impl SourceFormat {
    /// `"safetensors"` or `"gguf"`.
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Safetensors => "safetensors",
            SourceFormat::Gguf => "gguf",
        }
    }
}

/// A tensor entry of a source: where its bytes are and what they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTensor {
    /// Name as in the header.
    pub name: String,
    /// Element type (for GGUF files, the ggml type: `Q4_K` and the like are [`Dtype`]s).
    pub dtype: Dtype,
    /// Shape, outermost dimension first (row-major, as PyTorch and NumPy show it). GGUF files
    /// write dimensions innermost first: this is their order reversed, and
    /// [`GgufTensorInfo::dims`] keeps the order as written.
    pub shape: Vec<u64>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

fn source_tensors(raw: Vec<header::RawTensor>, data_start: u64) -> Vec<SourceTensor> {
    raw.into_iter()
        .map(|t| SourceTensor {
            offset: data_start + t.begin,
            len: t.end - t.begin,
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
        })
        .collect()
}

/// Validates a whole file image in memory (for fuzzing and property tests).
pub(crate) fn parse_image(bytes: &[u8]) -> Result<Vec<SourceTensor>, HeaderError> {
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.first_chunk::<8>() else {
        return Err(HeaderError::TooShort { file_len });
    };
    let header_len = header::header_len(*prefix, file_len)?;
    let json = &bytes[8..8 + header_len as usize];
    let header = header::parse(json, file_len)?;
    Ok(source_tensors(header.tensors, header.data_start))
}

/// Validates a whole GGUF file image in memory (for fuzzing and property tests).
pub(crate) fn parse_gguf_image(bytes: &[u8]) -> Result<(Gguf, Vec<SourceTensor>), GgufError> {
    match gguf::parse(bytes, bytes.len() as u64) {
        Ok(parsed) => {
            let tensors = gguf_tensors(&parsed);
            Ok((parsed.gguf, tensors))
        }
        Err(gguf::Failure::Invalid(err)) => Err(err),
        // An image in memory only fails to read past its end, which the parser checks first.
        Err(gguf::Failure::Io(_)) => Err(GgufError::Truncated {
            what: "the header",
            offset: 0,
            needed: 0,
            file_len: bytes.len() as u64,
        }),
    }
}

/// The tensors of a parsed GGUF header, in the order of their data (ties: header order).
fn gguf_tensors(parsed: &gguf::Parsed) -> Vec<SourceTensor> {
    let mut tensors: Vec<(usize, SourceTensor)> = parsed
        .gguf
        .tensors
        .iter()
        .zip(&parsed.extents)
        .enumerate()
        .map(|(i, (info, &(offset, len)))| {
            let tensor = SourceTensor {
                name: info.name.clone(),
                dtype: info.dtype,
                shape: info.dims.iter().rev().copied().collect(),
                offset,
                len,
            };
            (i, tensor)
        })
        .collect();
    tensors.sort_by_key(|(i, t)| (t.offset, *i));
    tensors.into_iter().map(|(_, t)| t).collect()
}

/// An opened, validated, mapped safetensors or GGUF file.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    file: File,
    mapping: Mapping,
    identity: FileIdentity,
    data_start: u64,
    tensors: Vec<SourceTensor>,
    by_name: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    /// The header of a GGUF file.
    gguf: Option<Box<Gguf>>,
    /// The same file opened with `O_DIRECT`, on first cold restore (`None`: refused).
    direct: OnceLock<Option<File>>,
    /// How its bytes are read ([`FileIo`] unless a store set another before first use).
    io: OnceLock<std::sync::Arc<dyn SourceIo>>,
    /// Whether a store set its own [`SourceIo`] (then every read goes through it).
    custom_io: std::sync::atomic::AtomicBool,
}

/// What every source is made of, whatever its format.
struct Parts {
    path: PathBuf,
    file: File,
    mapping: Mapping,
    identity: FileIdentity,
    data_start: u64,
}

impl Source {
    /// Lets the kernel's readahead serve faults on the mapping (see
    /// [`crate::StoreBuilder::mapped_readahead`]).
    pub(crate) fn use_kernel_readahead(&self) {
        self.mapping.use_kernel_readahead();
    }

    /// Reads this source's bytes through `io` from now on, unless it was read already (the
    /// first restore fixes the reader). Returns whether `io` was taken.
    pub(crate) fn set_io(&self, io: std::sync::Arc<dyn SourceIo>) -> bool {
        let set = self.io.set(io).is_ok();
        if set {
            self.custom_io
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        set
    }

    /// Opens and validates `path`, then maps it read-only. `path` must be a regular file (or a
    /// symbolic link to one); anything else is refused without blocking.
    ///
    /// A file that starts with the magic `GGUF` is read as GGUF (whatever its name), any
    /// other as safetensors.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        let path = path.as_ref();
        let file = crate::sys::open::open_regular_file(path).map_err(|source| SourceError::Io {
            path: path.to_path_buf(),
            op: "open",
            source,
        })?;
        Self::from_file(path, file)
    }

    /// Validates and maps `file`, opened from `path` (a shard opened beneath its directory).
    pub(crate) fn from_file(path: &Path, file: File) -> Result<Self, SourceError> {
        let path = path.to_path_buf();
        let io = |op: &'static str| {
            let path = path.clone();
            move |source| SourceError::Io { path, op, source }
        };
        // lowtide reads exactly what it needs (from the page cache only what is there):
        // readahead would pull copies of neighbouring tensors into the cache, which their
        // restores then read again from the disk. Advisory: where refused, only less tidy.
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Random);
        let identity = FileIdentity::of(&file).map_err(io("stat"))?;
        let invalid = |source| SourceError::Header {
            path: path.clone(),
            source,
        };
        let file_len = identity.size;
        let mut magic = [0u8; 4];
        if file_len >= 4 {
            file.read_exact_at(&mut magic, 0)
                .map_err(io("read the header of"))?;
        }
        if magic == gguf::GGUF_MAGIC {
            return Self::from_gguf(path, file, identity);
        }
        if file_len < header::PREFIX_LEN {
            return Err(invalid(HeaderError::TooShort { file_len }));
        }
        let mut prefix = [0u8; 8];
        file.read_exact_at(&mut prefix, 0)
            .map_err(io("read the header of"))?;
        let header_len = header::header_len(prefix, file_len).map_err(invalid)?;
        // At most `MAX_HEADER_LEN` bytes, but allocated fallibly all the same.
        let mut json = Vec::new();
        json.try_reserve_exact(header_len as usize)
            .map_err(|_| io("allocate the header of")(std::io::ErrorKind::OutOfMemory.into()))?;
        json.resize(header_len as usize, 0);
        file.read_exact_at(&mut json, header::PREFIX_LEN)
            .map_err(io("read the header of"))?;
        let header = header::parse(&json, file_len).map_err(invalid)?;
        let mapping = Mapping::map(&file, file_len).map_err(io("map"))?;

        let tensors = source_tensors(header.tensors, header.data_start);
        Ok(Self::assemble(
            Parts {
                path,
                file,
                mapping,
                identity,
                data_start: header.data_start,
            },
            tensors,
            header.metadata,
            None,
        ))
    }

    /// A source of validated `tensors`, findable by name.
    fn assemble(
        parts: Parts,
        tensors: Vec<SourceTensor>,
        metadata: BTreeMap<String, String>,
        gguf: Option<Box<Gguf>>,
    ) -> Self {
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Self {
            path: parts.path,
            file: parts.file,
            mapping: parts.mapping,
            identity: parts.identity,
            data_start: parts.data_start,
            tensors,
            by_name,
            metadata,
            gguf,
            direct: OnceLock::new(),
            io: OnceLock::new(),
            custom_io: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Validates and maps the GGUF file `file`.
    fn from_gguf(path: PathBuf, file: File, identity: FileIdentity) -> Result<Self, SourceError> {
        let parsed = match gguf::parse(&file, identity.size) {
            Ok(parsed) => parsed,
            Err(gguf::Failure::Invalid(source)) => return Err(SourceError::Gguf { path, source }),
            Err(gguf::Failure::Io(source)) => {
                return Err(SourceError::Io {
                    path,
                    op: "read the header of",
                    source,
                });
            }
        };
        let mapping = match Mapping::map(&file, identity.size) {
            Ok(mapping) => mapping,
            Err(source) => {
                return Err(SourceError::Io {
                    path,
                    op: "map",
                    source,
                });
            }
        };
        let tensors = gguf_tensors(&parsed);
        let data_start = parsed.gguf.data_start;
        Ok(Self::assemble(
            Parts {
                path,
                file,
                mapping,
                identity,
                data_start,
            },
            tensors,
            BTreeMap::new(),
            Some(Box::new(parsed.gguf)),
        ))
    }

    /// The file's format.
    pub fn format(&self) -> SourceFormat {
        if self.gguf.is_some() {
            SourceFormat::Gguf
        } else {
            SourceFormat::Safetensors
        }
    }

    /// The header of a GGUF file: its version, alignment, typed metadata and tensor infos as
    /// written (`None` for safetensors).
    pub fn gguf(&self) -> Option<&Gguf> {
        self.gguf.as_deref()
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes when it was opened.
    pub fn file_len(&self) -> u64 {
        self.identity.size
    }

    /// Absolute offset of the data buffer (just after the header; for GGUF, the aligned start
    /// of the data section).
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Identity recorded at open.
    pub fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// Tensors in the order of their data in the file.
    pub fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&SourceTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The header's `__metadata__` map (empty for GGUF files: their metadata is typed, see
    /// [`Source::gguf`]).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The device the file lives on (`st_dev`): restores tune their reads per device.
    pub(crate) fn device(&self) -> u64 {
        self.identity.dev
    }

    /// Checks that the file still has the identity it had when opened.
    pub fn check_unchanged(&self) -> Result<(), SourceError> {
        let now = FileIdentity::of(&self.file).map_err(|source| SourceError::Io {
            path: self.path.clone(),
            op: "stat",
            source,
        })?;
        let change = if now.size != self.identity.size {
            Change::Size {
                was: self.identity.size,
                now: now.size,
            }
        } else if now.mtime_ns != self.identity.mtime_ns {
            Change::Modified
        } else {
            return Ok(());
        };
        Err(SourceError::Changed {
            path: self.path.clone(),
            change,
        })
    }

    /// Checks the file's identity, then faults `[offset, offset + len)` of the mapping in with
    /// `MADV_POPULATE_READ`, which reports a missing page as an error instead of SIGBUS. Only
    /// the range's pages are read into the page cache (rounded out to whole pages), in large
    /// requests: no neighbouring tensor is pulled in.
    pub(crate) fn fault_in(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        self.check_unchanged()?;
        debug_assert!(
            offset + len <= self.identity.size,
            "extents are validated at open"
        );
        self.mapping
            .populate(&self.file, offset as usize, len as usize)
            .map(drop)
            .map_err(|source| SourceError::Io {
                path: self.path.clone(),
                op: "fault in the mapped pages of",
                source,
            })
    }

    /// The mapped bytes of `[offset, offset + len)`; callers check the range with `fault_in`.
    pub(crate) fn mapped_bytes(&self, offset: usize, len: usize) -> &[u8] {
        &self.mapping.bytes()[offset..offset + len]
    }

    /// Restores `[offset, offset + len)` into a block-aligned buffer. The parts in the page
    /// cache are copied from it with `pread` (not through the mapping: a file truncated during
    /// the copy then gives a short read, an error, where a copy from the mapping would raise
    /// SIGBUS), by several threads for large ranges; the other parts are read with `O_DIRECT`
    /// straight into the buffer — several requests in flight, no second copy left in the page
    /// cache. Returns the buffer and how many of the bytes were read from the disk. Where the
    /// file system refuses direct I/O every read is buffered.
    ///
    /// `reuse` is a buffer to fill instead of allocating one (freed memory of an evicted copy:
    /// already touched, so cheaper than fresh memory); it is used when large enough.
    ///
    /// With `keep_cached` the parts not in the page cache are read through it too (buffered
    /// `pread`), which leaves them cached: the next restore of the range copies them instead
    /// of reading the disk again. The kernel reclaims those pages without writing anything.
    pub(crate) fn restore(
        &self,
        offset: u64,
        len: u64,
        reuse: Option<AlignedBuf>,
        keep_cached: bool,
    ) -> Result<(DirectBuf, u64), SourceError> {
        self.check_unchanged()?;
        let reader: &dyn SourceIo = &**self.io.get_or_init(|| std::sync::Arc::new(FileIo));
        let io = |op: &'static str| {
            let path = self.path.clone();
            move |source| SourceError::Io { path, op, source }
        };
        // Fresh memory is faulted in ahead of the transfer; a reused buffer's pages are there.
        let (mut buf, fresh) = DirectBuf::reused_or_new(reuse, offset, len)
            .ok_or_else(|| io("allocate a buffer for")(std::io::ErrorKind::OutOfMemory.into()))?;
        let (start, end) = (
            usize::try_from(offset)
                .map_err(|_| io("read")(std::io::ErrorKind::FileTooLarge.into()))?,
            usize::try_from(offset + len)
                .map_err(|_| io("read")(std::io::ErrorKind::FileTooLarge.into()))?,
        );
        let mut runs = self
            .mapping
            .cache_runs(&self.file, start, end - start, MERGE_GAP);
        let uncached: u64 = runs
            .iter()
            .filter(|run| !run.cached)
            .map(|run| run.len as u64)
            .sum();
        let direct = if uncached > 0 && !keep_cached {
            self.direct
                .get_or_init(|| crate::sys::direct::reopen_direct(&self.file, false))
                .as_ref()
        } else {
            None
        };
        // Read from the disk: the uncached bytes, unless the file system refuses direct I/O
        // where they are not counted (as before: the page cache may have had them).
        let cold = if keep_cached || direct.is_some() {
            uncached
        } else {
            0
        };
        if direct.is_none() {
            // Buffered reads of everything: asked for, or the file system refuses direct I/O.
            runs = vec![CacheRun {
                offset: start,
                len: end - start,
                cached: true,
            }];
        }
        // Buffered reads of bytes not in the page cache go in readahead-sized steps.
        let buffered_step = if uncached > 0 {
            CACHED_STEP
        } else {
            usize::MAX
        };
        let read = |blocks: &mut [u8]| -> std::io::Result<()> {
            let base = start / BLOCK as usize * BLOCK as usize;
            let (uncached, cached) = carve(base, &runs, blocks);
            match direct {
                Some(direct) if !uncached.is_empty() && !cached.is_empty() => {
                    // Holes in a cached range: read them from the disk while the cached
                    // part is copied, so that their latency hides behind the copy.
                    std::thread::scope(|scope| {
                        let holes = scope.spawn(|| read_uncached(reader, direct, uncached));
                        let copied = read_cached(reader, &self.file, cached, usize::MAX);
                        let holes = holes
                            .join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                        holes.and(copied)
                    })
                }
                Some(direct) => read_uncached(reader, direct, uncached).and(read_cached(
                    reader,
                    &self.file,
                    cached,
                    usize::MAX,
                )),
                None => read_cached(reader, &self.file, cached, buffered_step),
            }
        };
        let result = if fresh {
            with_prefault(buf.blocks_mut(), read)
        } else {
            read(buf.blocks_mut())
        };
        if let Err(err) = result {
            return Err(self.read_error(err));
        }
        // Checked again after the copy: a write to the file moves its timestamps before it
        // changes the page cache, so bytes rewritten while they were being read are caught
        // here instead of being handed out as the tensor (docs/reliability.md).
        self.check_unchanged()?;
        Ok((buf, cold))
    }

    /// The file opened with `O_DIRECT`, when all of `[offset, offset + len)` is to be read
    /// from the disk with it: none of it is in the page cache, the caller does not want it kept
    /// there, the file system allows direct I/O and the kernel's reads are in use (not a
    /// store's own [`SourceIo`]). Then a queued read of the enclosing blocks may stand for
    /// [`Source::restore`]; the caller checks the file's identity before and after
    /// ([`Source::check_unchanged`]) and reports failures with [`Source::read_error`].
    pub(crate) fn direct_only(&self, offset: u64, len: u64, keep_cached: bool) -> Option<&File> {
        if keep_cached || len == 0 || self.custom_io.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let (start, len) = (usize::try_from(offset).ok()?, usize::try_from(len).ok()?);
        let runs = self.mapping.cache_runs(&self.file, start, len, MERGE_GAP);
        if runs.iter().any(|run| run.cached) {
            return None;
        }
        self.direct
            .get_or_init(|| crate::sys::direct::reopen_direct(&self.file, false))
            .as_ref()
    }

    /// The file opened with `O_DIRECT` by an earlier [`Source::direct_only`] that returned it
    /// (for the next reads of the same extent, queued later).
    pub(crate) fn direct_file(&self) -> Option<&File> {
        self.direct.get().and_then(Option::as_ref)
    }

    /// A read of this file that failed (a file that shrank meanwhile is the change it is).
    pub(crate) fn read_error(&self, err: std::io::Error) -> SourceError {
        match self.check_unchanged() {
            Err(changed) => changed,
            Ok(()) => SourceError::Io {
                path: self.path.clone(),
                op: "read",
                source: err,
            },
        }
    }

    /// Releases this process's mapped pages that lie wholly inside `[offset, offset + len)` and
    /// asks the kernel to drop them from the page cache. Writes nothing. Returns bytes released.
    ///
    /// Both calls cost the kernel per folio, so a range faulted in as huge folios drops in a
    /// fraction of the time single pages take (`sys/mapping.rs` has the figures).
    pub(crate) fn release(&self, offset: u64, len: u64) -> u64 {
        let page = crate::sys::page_size() as u64;
        let Some((start, len)) = crate::sys::inner_pages(offset, len, page) else {
            return 0;
        };
        if let Err(err) = self.mapping.release(start as usize, len as usize) {
            log::warn!("{}: madvise(DONTNEED) failed: {err}", self.path.display());
            return 0;
        }
        // Only after the mapping dropped its pages can the cache drop them (DESIGN: fadvise
        // does nothing while pages are mapped). Advisory: a failure loses nothing.
        let _ = rustix::fs::fadvise(
            &self.file,
            start,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::DontNeed,
        );
        len
    }
}

/// Uncached runs closer than this are read as one (the cached bytes between them again from
/// the disk): fewer, larger requests.
const MERGE_GAP: usize = 1 << 20;

/// Cached ranges at least this large are copied by several threads.
const PARALLEL_MIN: usize = 16 << 20;

/// Bytes per `pread` of bytes read through the page cache that are not cached yet. Measured on a 2-core VM, a 2 GiB file
/// read cold through the page cache: 64 MiB reads 1.2 GB/s, 4 MiB reads 1.9-2.9 GB/s.
const CACHED_STEP: usize = 4 << 20;

/// A piece of a restore: the file offset of its first byte and the buffer bytes it fills.
type Piece<'a> = (u64, &'a mut [u8]);

/// Cuts `blocks` (the block-aligned buffer whose first byte is file offset `base`) into the
/// pieces the runs fill: uncached runs widened to whole blocks, as direct I/O needs, with the
/// bytes each must get; cached runs exactly. Boundaries between runs are page boundaries, so
/// a widened run only reaches outside the range (into the buffer's padding), never into a
/// neighbouring run: the pieces are disjoint.
fn carve<'a>(
    base: usize,
    runs: &[CacheRun],
    blocks: &'a mut [u8],
) -> (Vec<(Piece<'a>, usize)>, Vec<Piece<'a>>) {
    let block = BLOCK as usize;
    let (mut uncached, mut cached) = (Vec::new(), Vec::new());
    let (mut rest, mut at) = (blocks, base);
    for run in runs {
        let (lo, hi) = if run.cached {
            (run.offset, run.offset + run.len)
        } else {
            (
                run.offset / block * block,
                (run.offset + run.len).div_ceil(block) * block,
            )
        };
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(lo - at);
        let (piece, tail) = tail.split_at_mut(hi - lo);
        (rest, at) = (tail, hi);
        if run.cached {
            cached.push((lo as u64, piece));
        } else {
            uncached.push(((lo as u64, piece), run.offset + run.len - lo));
        }
    }
    (uncached, cached)
}

/// Reads uncached pieces with `O_DIRECT`; each must get at least its wanted bytes.
fn read_uncached(
    reader: &dyn SourceIo,
    direct: &File,
    pieces: Vec<(Piece<'_>, usize)>,
) -> std::io::Result<()> {
    for ((offset, piece), wanted) in pieces {
        let n = reader.read_direct(direct, offset, piece)?;
        if n < wanted {
            // The file ended early: it changed since it was checked.
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Copies cached pieces from the page cache with `pread`, split over up to four threads when
/// they are large: one thread's copy from the page cache reaches about two thirds of
/// memcpy's speed.
fn read_cached(
    reader: &dyn SourceIo,
    file: &File,
    pieces: Vec<Piece<'_>>,
    step: usize,
) -> std::io::Result<()> {
    let total: usize = pieces.iter().map(|(_, piece)| piece.len()).sum();
    let threads = if total >= PARALLEL_MIN {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    } else {
        1
    };
    let share = total.div_ceil(threads.max(1)).max(1);
    // Deal the pieces into `threads` lists of about `share` bytes each, cutting where needed.
    let mut lists: Vec<Vec<Piece<'_>>> = (0..threads).map(|_| Vec::new()).collect();
    let (mut filled, mut list) = (0, 0);
    for (mut offset, mut piece) in pieces {
        while !piece.is_empty() {
            let n = piece.len().min(share - filled);
            let (head, tail) = std::mem::take(&mut piece).split_at_mut(n);
            lists[list.min(threads - 1)].push((offset, head));
            (piece, offset, filled) = (tail, offset + n as u64, filled + n);
            if filled == share {
                (list, filled) = (list + 1, 0);
            }
        }
    }
    // Each thread reads its share in steps of `step`: for bytes not cached yet, the kernel's
    // readahead keeps ahead of a run of `CACHED_STEP` reads, where one large read waits for
    // each window in turn; cached bytes are copied in one read per piece.
    let copy = |pieces: Vec<Piece<'_>>| -> std::io::Result<()> {
        pieces.into_iter().try_for_each(|(offset, piece)| {
            let mut at = offset;
            piece.chunks_mut(step).try_for_each(|step| {
                let len = step.len() as u64;
                reader.read_cached(file, at, step)?;
                at += len;
                Ok(())
            })
        })
    };
    let mut lists = lists.into_iter();
    let first = lists.next().unwrap_or_default();
    std::thread::scope(|scope| {
        let helpers: Vec<_> = lists
            .filter(|pieces| !pieces.is_empty())
            .map(|pieces| scope.spawn(move || copy(pieces)))
            .collect();
        let mine = copy(first);
        helpers
            .into_iter()
            .map(|helper| {
                helper
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .fold(mine, Result::and)
    })
}

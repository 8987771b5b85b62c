//! Writing safetensors files: the tests' models, the CLI's synthetic models and benchmarks.
//!
//! A file is written unnamed (`O_TMPFILE` in the target's directory) and given its name only
//! once complete and synced, so that a crash or `kill -9` mid-write leaves nothing behind and
//! no reader ever sees a half-written file. Where the file system refuses `O_TMPFILE` the
//! bytes go to a unique name (`.<name>.<pid>-<nonce>.partial`), removed on every exit path
//! that runs; one left by a killed writer is removed by the next writer of the same file once
//! its process is gone.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use lowtide::Dtype;
use rustix::fs::{AtFlags, CWD};

/// Name, dtype and shape of a tensor to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// A spec from its parts.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: &[u64]) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Bytes of data, or `None` if the shape overflows or is not whole bytes.
    pub fn byte_len(&self) -> Option<u64> {
        let elements = self
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        self.dtype.bytes_for(elements)
    }
}

/// Writes a safetensors file with `specs` in order; `fill(i, buf)` provides tensor `i`'s bytes.
/// A file already at `path` is replaced.
///
/// The file gets its name only when complete and synced (see the module docs), so a reader
/// never sees a half-written file and a killed writer leaves nothing behind. Returns the
/// file's length.
pub fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    fill: impl FnMut(usize, &mut [u8]),
) -> io::Result<u64> {
    let header = header(specs, metadata)?;
    let mut out = Unnamed::create(path)?;
    let len = write_body(&out.file, &header, specs, fill)?;
    out.replace(path)?;
    Ok(len)
}

/// How [`create_safetensors`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CreateOutcome {
    /// This call wrote the file.
    Written {
        /// The file's length.
        bytes: u64,
    },
    /// A file was at `path` already, or another writer finished first while this call wrote:
    /// that file is kept, and whatever this call wrote is discarded.
    Existing,
}

/// Writes a safetensors file at `path` unless one is there: [`write_safetensors`] for files
/// that several processes may generate at once (caches). Of concurrent writers of the same
/// `path` one names its file and the others get [`CreateOutcome::Existing`]; none fails for the
/// others, and a file at `path` is never replaced.
pub fn create_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    fill: impl FnMut(usize, &mut [u8]),
) -> io::Result<CreateOutcome> {
    if fs::symlink_metadata(path).is_ok() {
        return Ok(CreateOutcome::Existing);
    }
    let header = header(specs, metadata)?;
    let mut out = Unnamed::create(path)?;
    let bytes = write_body(&out.file, &header, specs, fill)?;
    Ok(if out.link_new(path)? {
        CreateOutcome::Written { bytes }
    } else {
        CreateOutcome::Existing
    })
}

/// The header (its JSON, padded) of a file of `specs`.
fn header(specs: &[TensorSpec], metadata: &BTreeMap<String, String>) -> io::Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0u64;
    for spec in specs {
        let len = spec.byte_len().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tensor `{}`: bad shape", spec.name),
            )
        })?;
        let end = offset.checked_add(len).ok_or(io::ErrorKind::FileTooLarge)?;
        let entry = serde_json::json!({
            "dtype": spec.dtype.name(),
            "shape": spec.shape,
            "data_offsets": [offset, end],
        });
        if header.insert(spec.name.clone(), entry).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tensor `{}` named twice", spec.name),
            ));
        }
        offset = end;
    }
    let mut json = serde_json::to_vec(&header)?;
    // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    Ok(json)
}

/// Writes the header (`json`) and every tensor to `dst`, then syncs it; returns the length.
fn write_body(
    dst: &File,
    json: &[u8],
    specs: &[TensorSpec],
    mut fill: impl FnMut(usize, &mut [u8]),
) -> io::Result<u64> {
    let mut out = BufWriter::with_capacity(1 << 20, dst);
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(json)?;
    let mut written = 8 + json.len() as u64;
    let mut buf = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let len = spec
            .byte_len()
            .and_then(|len| usize::try_from(len).ok())
            .ok_or(io::ErrorKind::FileTooLarge)?;
        buf.clear();
        // Sizes come from the caller's shapes: a tensor too large for memory is an error.
        buf.try_reserve_exact(len).map_err(|_| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("tensor `{}`: cannot allocate {len} bytes", spec.name),
            )
        })?;
        buf.resize(len, 0);
        fill(i, &mut buf);
        out.write_all(&buf)?;
        written += len as u64;
    }
    out.flush()?;
    drop(out);
    dst.sync_all()?;
    Ok(written)
}

/// A file being written that has no name yet (`O_TMPFILE`), or, where the file system refuses
/// that, a unique temporary name that is removed on drop unless the file was published.
pub(crate) struct Unnamed {
    pub(crate) file: File,
    dir: PathBuf,
    temporary: Option<PathBuf>,
}

impl Unnamed {
    /// A new file in the directory of `path`.
    pub(crate) fn create(path: &Path) -> io::Result<Self> {
        Self::create_in(path, true)
    }

    /// With `tmpfile` false, always takes the fallback of a unique name (for tests).
    fn create_in(path: &Path, tmpfile: bool) -> io::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        remove_abandoned(&dir, name);
        if tmpfile {
            let unnamed = OpenOptions::new()
                .read(true)
                .write(true)
                .mode(0o666)
                .custom_flags(rustix::fs::OFlags::TMPFILE.bits().cast_signed())
                .open(&dir);
            match unnamed {
                Ok(file) => {
                    return Ok(Self {
                        file,
                        dir,
                        temporary: None,
                    });
                }
                Err(err) if !tmpfile_refused(&err) => return Err(err),
                Err(_) => {}
            }
        }
        let temporary = dir.join(temporary_name(name));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        Ok(Self {
            file,
            dir,
            temporary: Some(temporary),
        })
    }

    /// Gives the file the name `target` unless something has that name; says whether it did.
    fn link_new(&mut self, target: &Path) -> io::Result<bool> {
        let linked = match &self.temporary {
            Some(temporary) => fs::hard_link(temporary, target),
            None => link_unnamed(&self.file, target),
        };
        match linked {
            Ok(()) => {
                sync_dir(&self.dir);
                Ok(true)
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Gives the file the name `target`, replacing what has that name.
    pub(crate) fn replace(&mut self, target: &Path) -> io::Result<()> {
        if self.temporary.is_none() {
            // Linux cannot link over a name: link to a unique name, then rename it over. Only
            // a kill between the two leaves that name, for the next writer to remove.
            let name = target.file_name().unwrap_or(OsStr::new("file"));
            let temporary = self.dir.join(temporary_name(name));
            link_unnamed(&self.file, &temporary)?;
            self.temporary = Some(temporary);
        }
        let temporary = self.temporary.as_ref().expect("set above");
        fs::rename(temporary, target)?;
        self.temporary = None;
        sync_dir(&self.dir);
        Ok(())
    }
}

impl Drop for Unnamed {
    fn drop(&mut self) {
        if let Some(temporary) = &self.temporary {
            let _ = fs::remove_file(temporary);
        }
    }
}

/// `O_TMPFILE` is not supported by this file system (or kernel).
fn tmpfile_refused(err: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(err),
        Some(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL)
    )
}

/// Names an `O_TMPFILE` file: through `/proc/self/fd`, or `AT_EMPTY_PATH` where `/proc` is
/// not mounted.
fn link_unnamed(file: &File, target: &Path) -> io::Result<()> {
    let by_proc = format!("/proc/self/fd/{}", file.as_raw_fd());
    match rustix::fs::linkat(CWD, by_proc.as_str(), CWD, target, AtFlags::SYMLINK_FOLLOW) {
        Err(rustix::io::Errno::NOENT) if fs::metadata("/proc/self/fd").is_err() => {
            rustix::fs::linkat(file, "", CWD, target, AtFlags::EMPTY_PATH).map_err(Into::into)
        }
        result => result.map_err(Into::into),
    }
}

/// Makes a new name in `dir` durable. Advisory: the file itself is synced already.
fn sync_dir(dir: &Path) {
    if let Err(err) = File::open(dir).and_then(|d| d.sync_all()) {
        log::debug!("cannot sync the directory {}: {err}", dir.display());
    }
}

/// `.<name>.<pid>-<nonce>.partial`: unique to this process and call.
fn temporary_name(name: &OsStr) -> String {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        ".{}.{}-{:x}{nanos:08x}.partial",
        name.to_string_lossy(),
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the temporary names of `name` in `dir` left by writers that were killed: those
/// whose process no longer exists.
fn remove_abandoned(dir: &Path, name: &OsStr) {
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".partial"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if !process_alive(pid) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => log::info!("removed {}, left by a writer that died", path.display()),
                Err(err) => log::debug!("cannot remove {}: {err}", path.display()),
            }
        }
    }
}

/// Whether a process with this id exists (one that cannot be signalled exists too).
fn process_alive(pid: i32) -> bool {
    rustix::process::Pid::from_raw(pid).is_none_or(|pid| {
        !matches!(
            rustix::process::test_kill_process(pid),
            Err(rustix::io::Errno::SRCH)
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::{
        CreateOutcome, TensorSpec, Unnamed, create_safetensors, write_body, write_safetensors,
    };
    use lowtide::Dtype;

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("a", Dtype::F32, &[64, 64]),
            TensorSpec::new("b", Dtype::U8, &[1000]),
        ]
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn nothing_is_named_until_the_file_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let len = write_safetensors(&path, &specs(), &BTreeMap::new(), |i, buf| {
            // While tensors are written, the directory is empty.
            assert!(names(dir.path()).is_empty(), "tensor {i}");
            buf.fill(1);
        })
        .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(names(dir.path()), ["m.safetensors"]);
        // Replaced by a second write; not by a create.
        write_safetensors(&path, &specs(), &BTreeMap::new(), |_, buf| buf.fill(2)).unwrap();
        let created = create_safetensors(&path, &specs(), &BTreeMap::new(), |_, _| {
            panic!("not written: the file exists")
        })
        .unwrap();
        assert_eq!(created, CreateOutcome::Existing);
        assert_eq!(*std::fs::read(&path).unwrap().last().unwrap(), 2);
        assert_eq!(names(dir.path()), ["m.safetensors"]);
    }

    #[test]
    fn the_fallback_name_is_removed_on_errors_and_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        // An error while writing (a tensor too large for memory).
        let huge = [TensorSpec::new("huge", Dtype::U8, &[1 << 60])];
        let out = Unnamed::create_in(&path, false).unwrap();
        assert_eq!(names(dir.path()).len(), 1, "a temporary name exists");
        let err = write_body(&out.file, b"{}      ", &huge, |_, _| {}).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::OutOfMemory, "{err}");
        drop(out);
        assert!(names(dir.path()).is_empty());
        // A panic in `fill`.
        let panicked = std::panic::catch_unwind(|| {
            let out = Unnamed::create_in(&path, false).unwrap();
            write_body(&out.file, b"{}      ", &specs(), |_, _| {
                panic!("fill fails")
            })
            .ok();
        });
        assert!(panicked.is_err());
        assert!(names(dir.path()).is_empty());
        // Published: the temporary name is gone, the final one stays.
        let mut out = Unnamed::create_in(&path, false).unwrap();
        write_body(&out.file, b"{}      ", &[], |_, _| {}).unwrap();
        assert!(out.link_new(&path).unwrap());
        drop(out);
        assert_eq!(names(dir.path()), ["m.safetensors"]);
    }

    #[test]
    fn temporary_names_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // A pid that no process has: above the kernel's maximum.
        let dead = dir.path().join(".m.safetensors.99999999-1.partial");
        let alive = dir
            .path()
            .join(format!(".m.safetensors.{}-1.partial", std::process::id()));
        let other = dir.path().join(".n.safetensors.99999999-1.partial");
        for path in [&dead, &alive, &other] {
            std::fs::write(path, b"partial").unwrap();
        }
        let path = dir.path().join("m.safetensors");
        write_safetensors(&path, &specs(), &BTreeMap::new(), |_, buf| buf.fill(0)).unwrap();
        assert!(!dead.exists(), "a dead writer's file is removed");
        assert!(alive.exists(), "a live writer's file is kept");
        assert!(other.exists(), "another file's temporary name is kept");
    }

    #[test]
    fn concurrent_creators_all_succeed_with_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let barrier = std::sync::Barrier::new(4);
        let outcomes: Vec<CreateOutcome> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        create_safetensors(&path, &specs(), &BTreeMap::new(), |_, buf| {
                            barrier.wait();
                            buf.fill(3);
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        let written = outcomes
            .iter()
            .filter(|c| matches!(c, CreateOutcome::Written { .. }))
            .count();
        assert_eq!(written, 1, "{outcomes:?}");
        assert_eq!(names(dir.path()), ["m.safetensors"]);
        lowtide::ModelFiles::open(&path).unwrap();
    }
}

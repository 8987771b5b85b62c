//! Opening input files: only regular files, never blocking, and a model's shards only from
//! inside its directory.
//!
//! A FIFO named as a model would block `open(2)` until a writer appears, and a character
//! device such as `/dev/zero` reads without end. So every input is checked to be a regular
//! file before it is read: its type is looked up without opening it (a device's driver never
//! sees an open), then it is opened with `O_NONBLOCK` and checked again on the descriptor (a
//! file swapped in between is caught), and only then is `O_NONBLOCK` cleared.
//!
//! Shards are named by an index or found in a directory that someone else may have written:
//! a shard that is a symbolic link to `/etc/shadow` must not be read. They are opened with
//! `openat2(RESOLVE_BENEATH)` relative to the model's directory, so that no `..` and no
//! symbolic link leads out of it (links that stay inside are followed). Where the kernel lacks
//! `openat2` (before Linux 5.6, or a sandbox that filters it) the path is resolved with
//! `realpath` and checked to lie beneath the directory's real path; that leaves a window in
//! which a link swapped in after the check is followed, which `openat2` does not.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

/// What a path turned out to be when a regular file was needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileKind {
    /// A directory.
    Directory,
    /// A FIFO (named pipe): opening it would wait for a writer.
    Fifo,
    /// A Unix domain socket.
    Socket,
    /// A character device, such as `/dev/zero`.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A symbolic link (seen only where links are not followed).
    Symlink,
    /// A type the kernel reported that is none of the above.
    Unknown,
}

impl FileKind {
    /// The kind of a file that is not regular, or `None` for a regular file.
    fn of(stat: &Stat) -> Option<Self> {
        Some(match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => return None,
            FileType::Directory => Self::Directory,
            FileType::Fifo => Self::Fifo,
            FileType::Socket => Self::Socket,
            FileType::CharacterDevice => Self::CharDevice,
            FileType::BlockDevice => Self::BlockDevice,
            FileType::Symlink => Self::Symlink,
            FileType::Unknown => Self::Unknown,
        })
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Directory => "a directory",
            Self::Fifo => "a FIFO (named pipe)",
            Self::Socket => "a socket",
            Self::CharDevice => "a character device",
            Self::BlockDevice => "a block device",
            Self::Symlink => "a symbolic link",
            Self::Unknown => "of an unknown file type",
        })
    }
}

/// A model, shard, index or workflow that is not a regular file. Carried inside the
/// [`io::Error`] of the failed open (`ErrorKind::InvalidInput`); reach it with
/// [`io::Error::get_ref`] and `downcast_ref`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("is {kind}, not a regular file")]
#[non_exhaustive]
pub struct NotRegularFile {
    /// What it is instead.
    pub kind: FileKind,
}

/// Fails with [`NotRegularFile`] unless `stat` describes a regular file.
fn require_regular(stat: &Stat) -> io::Result<()> {
    match FileKind::of(stat) {
        None => Ok(()),
        Some(kind) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            NotRegularFile { kind },
        )),
    }
}

/// Flags of every input open: read-only, not inherited by children, never blocking (a FIFO
/// swapped in after the type check), never becoming the controlling terminal.
const READ: OFlags = OFlags::RDONLY
    .union(OFlags::NONBLOCK)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOCTTY);

/// Checks the opened descriptor again and clears `O_NONBLOCK`, which has no use on a regular
/// file but would surprise code that reads it later.
fn finish(fd: OwnedFd) -> io::Result<File> {
    require_regular(&rustix::fs::fstat(&fd)?)?;
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags.difference(OFlags::NONBLOCK))?;
    Ok(File::from(fd))
}

/// Opens `path` for reading if it is a regular file (after following symbolic links: the
/// caller named it), without blocking on a FIFO and without opening a device.
///
/// Anything else fails with an [`io::Error`] of kind `InvalidInput` that carries a
/// [`NotRegularFile`]; a missing file or a refused open fails as `open(2)` does.
pub fn open_regular_file(path: impl AsRef<Path>) -> io::Result<File> {
    let path = path.as_ref();
    require_regular(&rustix::fs::stat(path)?)?;
    finish(rustix::fs::open(path, READ, Mode::empty())?)
}

/// Why a file could not be opened beneath a directory.
#[derive(Debug)]
pub(crate) enum BeneathError {
    /// The name leads outside the directory: through `..`, an absolute symbolic link, or a
    /// symbolic link whose target lies outside.
    Outside,
    /// The open failed, or the file is not a regular file ([`NotRegularFile`]).
    Io(io::Error),
}

impl From<io::Error> for BeneathError {
    fn from(err: io::Error) -> Self {
        Self::Io(err)
    }
}

impl From<Errno> for BeneathError {
    fn from(err: Errno) -> Self {
        Self::Io(err.into())
    }
}

/// A model's directory, held open: the files of the model are opened relative to it and must
/// resolve inside it.
///
/// One layout widens "inside": a snapshot of a Hugging Face hub cache
/// (`models--org--name/snapshots/<revision>/`, whose files are links to
/// `../../blobs/<hash>`). There the files must resolve inside the repository's cache folder,
/// `models--org--name`, which holds the snapshot and its blobs.
#[derive(Debug)]
pub(crate) struct ModelDir {
    path: PathBuf,
    /// The directory files must resolve beneath: the model's own, or the hub cache folder.
    fd: OwnedFd,
    /// Where the model's directory is inside that one (empty, or `snapshots/<revision>`).
    inner: PathBuf,
    /// The real path of the directory files must resolve beneath, for the fallback.
    root: PathBuf,
}

/// For a directory inside a hub cache snapshot (`<repo>/snapshots/<revision>/...` with
/// `<repo>/blobs` beside `snapshots`: the snapshot itself, or a component's subfolder such as
/// a diffusers pipeline's `unet/`), the repository folder and the directory's place in it.
fn hub_snapshot(real: &Path) -> Option<(PathBuf, PathBuf)> {
    // An ancestor is `<repo>/snapshots/<revision>` when its parent is named `snapshots`.
    real.ancestors().find_map(|dir| {
        let snapshots = dir.parent()?;
        let repo = snapshots.parent()?;
        if snapshots.file_name()? != "snapshots" || !repo.join("blobs").is_dir() {
            return None;
        }
        let inner = real.strip_prefix(repo).ok()?;
        Some((repo.to_path_buf(), inner.to_path_buf()))
    })
}

/// How often an open beneath the directory is retried when the kernel reports that a rename
/// raced with the lookup (`EAGAIN`).
const RACE_RETRIES: usize = 8;

impl ModelDir {
    /// Opens directory `path` (an empty path is the current directory). `path` itself may be a
    /// symbolic link: the caller named it.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let at = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let real = std::fs::canonicalize(at)?;
        let (root, inner) = hub_snapshot(&real).unwrap_or((real, PathBuf::new()));
        let fd = rustix::fs::open(&root, flags, Mode::empty())?;
        Ok(Self {
            path: path.to_path_buf(),
            fd,
            inner,
            root,
        })
    }

    /// The directory as it was named (joined with a file's name, the path to show for it).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `name` for reading if it resolves inside the directory and is a regular file,
    /// without blocking and without opening a device.
    pub(crate) fn open_regular(&self, name: &Path) -> Result<File, BeneathError> {
        // First a path-only descriptor: its type is checked before anything is opened for
        // reading (a device's open has side effects, a FIFO's blocks).
        match self.open_beneath(name, OFlags::PATH | OFlags::CLOEXEC) {
            Ok(probe) => require_regular(&rustix::fs::fstat(&probe)?)?,
            Err(Errno::NOSYS | Errno::PERM) => {
                return open_beneath_by_path(&self.root, &self.inner.join(name));
            }
            Err(Errno::XDEV) => return Err(BeneathError::Outside),
            Err(err) => return Err(err.into()),
        }
        match self.open_beneath(name, READ) {
            Ok(fd) => Ok(finish(fd)?),
            Err(Errno::XDEV) => Err(BeneathError::Outside),
            Err(err) => Err(err.into()),
        }
    }

    /// `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, retried when a rename raced it.
    /// `EXDEV` means that `name` leads outside; `ENOSYS` (or `EPERM` from a seccomp filter)
    /// that the kernel cannot do it.
    fn open_beneath(&self, name: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        let name = self.inner.join(name);
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(&self.fd, &name, flags, Mode::empty(), resolve) {
                Err(Errno::AGAIN) if tries < RACE_RETRIES => tries += 1,
                result => return result,
            }
        }
    }
}

/// The fallback of [`ModelDir::open_regular`] where `openat2` is missing: resolves `name` with
/// `realpath`, requires the result to lie beneath the directory's real path, and opens that
/// path without following a link in its last component.
fn open_beneath_by_path(dir: &Path, name: &Path) -> Result<File, BeneathError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let root = std::fs::canonicalize(dir)?;
    let target = std::fs::canonicalize(dir.join(name))?;
    if !target.starts_with(&root) {
        return Err(BeneathError::Outside);
    }
    require_regular(&rustix::fs::lstat(&target)?)?;
    let fd = rustix::fs::open(&target, READ | OFlags::NOFOLLOW, Mode::empty())?;
    Ok(finish(fd)?)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use rustix::fs::{CWD, FileType, Mode};

    use super::{BeneathError, FileKind, ModelDir, NotRegularFile, open_beneath_by_path};
    use super::{open_regular_file, require_regular};

    fn kind_of(err: &std::io::Error) -> Option<FileKind> {
        err.get_ref()?
            .downcast_ref::<NotRegularFile>()
            .map(|e| e.kind)
    }

    fn fifo(path: &Path) {
        rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::RUSR | Mode::WUSR, 0).unwrap();
    }

    #[test]
    fn only_regular_files_open() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"bytes").unwrap();
        let mut text = String::new();
        open_regular_file(&file)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "bytes");
        let flags = rustix::fs::fcntl_getfl(open_regular_file(&file).unwrap()).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK));

        let pipe = dir.path().join("p");
        fifo(&pipe);
        let err = open_regular_file(&pipe).unwrap_err();
        assert_eq!(kind_of(&err), Some(FileKind::Fifo), "{err}");
        assert_eq!(
            err.to_string(),
            "is a FIFO (named pipe), not a regular file"
        );
        let err = open_regular_file("/dev/zero").unwrap_err();
        assert_eq!(kind_of(&err), Some(FileKind::CharDevice), "{err}");
        let err = open_regular_file(dir.path()).unwrap_err();
        assert_eq!(kind_of(&err), Some(FileKind::Directory), "{err}");

        // A link the caller named is followed.
        let link = dir.path().join("l");
        symlink(&file, &link).unwrap();
        assert!(open_regular_file(&link).is_ok());
        let stat = rustix::fs::lstat(&link).unwrap();
        assert!(require_regular(&stat).is_err());
    }

    /// Sets up `root/model` with a file, a link inside, links leading out and a FIFO.
    fn model_dir() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::create_dir(model.join("sub")).unwrap();
        std::fs::write(model.join("sub/a"), b"inside").unwrap();
        std::fs::write(root.path().join("secret"), b"root:*:20000:0:99999:7:::").unwrap();
        symlink("sub/a", model.join("inside")).unwrap();
        symlink("../secret", model.join("relative")).unwrap();
        symlink(root.path().join("secret"), model.join("absolute")).unwrap();
        symlink("sub/../../secret", model.join("dotdot")).unwrap();
        fifo(&model.join("pipe"));
        root
    }

    fn check(open: impl Fn(&str) -> Result<std::fs::File, BeneathError>) {
        for name in ["sub/a", "inside"] {
            let mut text = String::new();
            let mut file = open(name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            file.read_to_string(&mut text).unwrap();
            assert_eq!(text, "inside");
        }
        for name in ["relative", "absolute", "dotdot", "../secret"] {
            assert!(
                matches!(open(name), Err(BeneathError::Outside)),
                "{name} leads outside"
            );
        }
        match open("pipe") {
            Err(BeneathError::Io(err)) => assert_eq!(kind_of(&err), Some(FileKind::Fifo)),
            other => panic!("a FIFO: {other:?}"),
        }
        match open("sub") {
            Err(BeneathError::Io(err)) => assert_eq!(kind_of(&err), Some(FileKind::Directory)),
            other => panic!("a directory: {other:?}"),
        }
        assert!(matches!(open("missing"), Err(BeneathError::Io(_))));
    }

    #[test]
    fn files_open_only_beneath_the_directory() {
        let root = model_dir();
        let dir = ModelDir::open(&root.path().join("model")).unwrap();
        check(|name| dir.open_regular(Path::new(name)));
    }

    #[test]
    fn a_hub_cache_snapshot_resolves_within_its_repository_folder() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::write(repo.join("blobs/0f3e"), "blob").unwrap();
        std::fs::write(cache.path().join("secret"), "secret").unwrap();
        let snapshot = repo.join("snapshots/abc123");
        symlink("../../blobs/0f3e", snapshot.join("model.safetensors")).unwrap();
        symlink("../../../secret", snapshot.join("escape.safetensors")).unwrap();
        let dir = ModelDir::open(&snapshot).unwrap();
        let mut text = String::new();
        dir.open_regular(Path::new("model.safetensors"))
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "blob");
        assert!(matches!(
            dir.open_regular(Path::new("escape.safetensors")),
            Err(BeneathError::Outside)
        ));
        // A component's subfolder, as diffusers pipelines keep them: `../../../blobs`.
        let unet = snapshot.join("unet");
        std::fs::create_dir(&unet).unwrap();
        symlink("../../../blobs/0f3e", unet.join("model.safetensors")).unwrap();
        symlink("../../../../secret", unet.join("escape.safetensors")).unwrap();
        let dir = ModelDir::open(&unet).unwrap();
        assert!(dir.open_regular(Path::new("model.safetensors")).is_ok());
        assert!(matches!(
            dir.open_regular(Path::new("escape.safetensors")),
            Err(BeneathError::Outside)
        ));
        // Without a `blobs` folder beside it, `snapshots/<rev>` is an ordinary directory.
        std::fs::remove_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir(repo.join("blobs-not")).unwrap();
        let dir = ModelDir::open(&snapshot).unwrap();
        assert!(dir.open_regular(Path::new("model.safetensors")).is_err());
    }

    #[test]
    fn the_fallback_also_keeps_files_beneath_the_directory() {
        let root = model_dir();
        let dir = root.path().join("model");
        check(|name| open_beneath_by_path(&dir, Path::new(name)));
    }
}

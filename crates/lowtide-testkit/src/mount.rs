//! File systems mounted for a test: small tmpfs instances that fill up, read-only ones, ramfs.

use std::path::PathBuf;
use std::process::Command;

/// A file system mounted on a temporary directory for this value's lifetime (unmounted lazily
/// when dropped). Mounting needs root.
#[derive(Debug)]
pub struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    /// Mounts a file system of type `kind` (`tmpfs`, `ramfs`) with `options` (`size=1m,ro`).
    /// The error says why not (not root, no mount privilege) for the test to report as a skip.
    pub fn new(kind: &str, options: &str) -> Result<Self, String> {
        if !rustix::process::geteuid().is_root() {
            return Err(format!("not root: cannot mount a {kind}"));
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let status = Command::new("mount")
            .args(["-t", kind, "-o", options, "lowtide-test"])
            .arg(dir.path())
            .status()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !status.success() {
            return Err(format!("mount -t {kind} failed ({status})"));
        }
        Ok(Self { dir })
    }

    /// A tmpfs of `size` (`1m`, `800m`).
    pub fn tmpfs(size: &str) -> Result<Self, String> {
        Self::new("tmpfs", &format!("size={size}"))
    }

    /// Where it is mounted.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        let stat = rustix::fs::statvfs(self.dir.path()).expect("statvfs of a mounted directory");
        (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    }

    /// Shrinks (or grows) a tmpfs to `bytes` (at least what is in use).
    pub fn resize(&self, bytes: u64) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={}k", bytes.div_ceil(1024))])
            .arg(self.dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "remount: {status}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

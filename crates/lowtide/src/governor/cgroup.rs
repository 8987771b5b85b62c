//! The memory limits of the process's own cgroup, v1 or v2.
//!
//! Found from `/proc/self/cgroup` and `/proc/self/mountinfo`. Headroom is what the cgroup can
//! still charge before its limit, counting reclaimable file pages (inactive page cache) as
//! free, since the kernel drops them before it OOM-kills anything.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Values at or above this are the kernel's "no limit" (v1 writes `PAGE_COUNTER_MAX` pages).
const UNLIMITED: u64 = 1 << 62;

/// Which cgroup hierarchy a reading came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CgroupVersion {
    /// The legacy per-controller hierarchy (`memory.limit_in_bytes`).
    V1,
    /// The unified hierarchy (`memory.max`, `memory.high`).
    V2,
}

/// The memory figures of one cgroup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CgroupMemory {
    /// Hierarchy version.
    pub version: CgroupVersion,
    /// The cgroup's directory.
    pub dir: PathBuf,
    /// The tightest limit: v1 `memory.limit_in_bytes` and `hierarchical_memory_limit`; v2 the
    /// smaller of `memory.max` and `memory.high`. `None` when unlimited.
    pub limit: Option<u64>,
    /// Bytes charged now (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub usage: u64,
    /// Charged bytes the kernel can reclaim without writing: inactive file pages.
    pub reclaimable: u64,
}

impl CgroupMemory {
    /// Bytes that can still be charged before the limit; `None` when unlimited.
    pub fn headroom(&self) -> Option<u64> {
        let used = self.usage.saturating_sub(self.reclaimable);
        self.limit.map(|limit| limit.saturating_sub(used))
    }

    /// Reads a v1 memory cgroup directory.
    pub fn read_v1(dir: &Path) -> io::Result<Self> {
        let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
        let usage = read_u64(&dir.join("memory.usage_in_bytes"))?;
        let stat = fs::read_to_string(dir.join("memory.stat"))?;
        let hierarchical = stat_value(&stat, "hierarchical_memory_limit").unwrap_or(u64::MAX);
        let reclaimable = stat_value(&stat, "total_inactive_file")
            .or_else(|| stat_value(&stat, "inactive_file"))
            .unwrap_or(0);
        let limit = limit.min(hierarchical);
        Ok(Self {
            version: CgroupVersion::V1,
            dir: dir.to_path_buf(),
            limit: (limit < UNLIMITED).then_some(limit),
            usage,
            reclaimable,
        })
    }

    /// Reads a v2 cgroup directory (its own limits only; see [`CgroupMemory::detect`] for
    /// ancestors).
    pub fn read_v2(dir: &Path) -> io::Result<Self> {
        let max = read_limit_v2(&dir.join("memory.max"))?;
        let high = read_limit_v2(&dir.join("memory.high")).unwrap_or(None);
        let usage = read_u64(&dir.join("memory.current"))?;
        let stat = fs::read_to_string(dir.join("memory.stat"))?;
        let reclaimable = stat_value(&stat, "inactive_file").unwrap_or(0);
        let limit = match (max, high) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Self {
            version: CgroupVersion::V2,
            dir: dir.to_path_buf(),
            limit,
            usage,
            reclaimable,
        })
    }

    /// The process's own memory cgroup, or the tightest of its ancestors (v2, where limits
    /// are per level). `None` when no memory cgroup is mounted or readable.
    pub fn detect() -> Option<Self> {
        let cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let membership = parse_proc_cgroup(&cgroup);
        if let Some(path) = &membership.v1_memory
            && let Some(dir) = resolve(&mountinfo, path, Hierarchy::V1Memory)
            && let Ok(reading) = Self::read_v1(&dir)
        {
            return Some(reading);
        }
        let path = membership.v2?;
        let (mount, dir) = resolve_with_mount(&mountinfo, &path, Hierarchy::V2)?;
        // Walk up to the mount point: any level may carry the limit that binds.
        let mut best: Option<Self> = None;
        let mut current = Some(dir.as_path());
        while let Some(level) = current {
            if let Ok(reading) = Self::read_v2(level) {
                let tighter = match (&best, reading.headroom()) {
                    (None, _) => true,
                    (Some(b), Some(h)) => b.headroom().is_none_or(|bh| h < bh),
                    (Some(_), None) => false,
                };
                if tighter {
                    best = Some(reading);
                }
            }
            if level == mount {
                break;
            }
            current = level.parent();
        }
        best
    }

    /// The pressure file of this cgroup (v2 only; v1 has none worth using).
    pub fn pressure_file(&self) -> Option<PathBuf> {
        (self.version == CgroupVersion::V2).then(|| self.dir.join("memory.pressure"))
    }
}

/// Where the process sits in each hierarchy, from `/proc/self/cgroup`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Membership {
    pub(crate) v1_memory: Option<String>,
    pub(crate) v2: Option<String>,
}

/// Parses `/proc/self/cgroup`: `id:controllers:path` lines.
pub(crate) fn parse_proc_cgroup(text: &str) -> Membership {
    let mut membership = Membership::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            membership.v2 = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            membership.v1_memory = Some(path.to_owned());
        }
    }
    membership
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hierarchy {
    V1Memory,
    V2,
}

fn resolve(mountinfo: &str, path: &str, hierarchy: Hierarchy) -> Option<PathBuf> {
    resolve_with_mount(mountinfo, path, hierarchy).map(|(_, dir)| dir)
}

/// Finds the mount of the hierarchy and the directory of `path` inside it.
fn resolve_with_mount(
    mountinfo: &str,
    path: &str,
    hierarchy: Hierarchy,
) -> Option<(PathBuf, PathBuf)> {
    for line in mountinfo.lines() {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        let rest: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let (Some(fstype), Some(options)) = (rest.first(), rest.get(2)) else {
            continue;
        };
        let matches = match hierarchy {
            Hierarchy::V2 => *fstype == "cgroup2",
            Hierarchy::V1Memory => *fstype == "cgroup" && options.split(',').any(|o| o == "memory"),
        };
        if !matches {
            continue;
        }
        let mount = PathBuf::from(mount_point);
        // Inside a cgroup namespace the mount's root is a prefix of the path (or the path is
        // already relative to it).
        let relative = path
            .strip_prefix(root)
            .unwrap_or(path)
            .trim_start_matches('/');
        let dir = mount.join(relative);
        return Some(if dir.is_dir() {
            (mount.clone(), dir)
        } else {
            (mount.clone(), mount)
        });
    }
    None
}

fn read_u64(path: &Path) -> io::Result<u64> {
    let text = fs::read_to_string(path)?;
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a number", path.display()),
        )
    })
}

fn read_limit_v2(path: &Path) -> io::Result<Option<u64>> {
    let text = fs::read_to_string(path)?;
    let text = text.trim();
    if text == "max" {
        return Ok(None);
    }
    let value: u64 = text.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a number", path.display()),
        )
    })?;
    Ok((value < UNLIMITED).then_some(value))
}

fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::{CgroupMemory, CgroupVersion, Membership, parse_proc_cgroup, resolve};
    use std::fs;

    #[test]
    fn proc_self_cgroup_of_both_versions() {
        let v1 = "9:name=systemd:/\n4:memory:/process_api/abc\n0::/\n";
        assert_eq!(
            parse_proc_cgroup(v1),
            Membership {
                v1_memory: Some("/process_api/abc".into()),
                v2: Some("/".into())
            }
        );
        let v2 = "0::/user.slice/app.scope\n";
        assert_eq!(
            parse_proc_cgroup(v2),
            Membership {
                v1_memory: None,
                v2: Some("/user.slice/app.scope".into())
            }
        );
    }

    #[test]
    fn fixtures_of_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("v1");
        fs::create_dir(&v1).unwrap();
        fs::write(v1.join("memory.limit_in_bytes"), "1073741824\n").unwrap();
        fs::write(v1.join("memory.usage_in_bytes"), "805306368\n").unwrap();
        fs::write(
            v1.join("memory.stat"),
            "cache 100\ninactive_file 4096\nhierarchical_memory_limit 9223372036854771712\ntotal_inactive_file 268435456\n",
        )
        .unwrap();
        let reading = CgroupMemory::read_v1(&v1).unwrap();
        assert_eq!(reading.version, CgroupVersion::V1);
        assert_eq!(reading.limit, Some(1 << 30));
        assert_eq!(
            reading.headroom(),
            Some((1 << 30) - (768 << 20) + (256 << 20))
        );

        fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(CgroupMemory::read_v1(&v1).unwrap().headroom(), None);

        let v2 = dir.path().join("v2");
        fs::create_dir(&v2).unwrap();
        fs::write(v2.join("memory.max"), "2147483648\n").unwrap();
        fs::write(v2.join("memory.high"), "max\n").unwrap();
        fs::write(v2.join("memory.current"), "1073741824\n").unwrap();
        fs::write(
            v2.join("memory.stat"),
            "anon 1000\nfile 500\ninactive_file 536870912\n",
        )
        .unwrap();
        let reading = CgroupMemory::read_v2(&v2).unwrap();
        assert_eq!(reading.limit, Some(2 << 30));
        assert_eq!(
            reading.headroom(),
            Some((2 << 30) - (1 << 30) + (512 << 20))
        );
        assert_eq!(reading.pressure_file(), Some(v2.join("memory.pressure")));
        fs::write(v2.join("memory.high"), "1610612736\n").unwrap();
        assert_eq!(CgroupMemory::read_v2(&v2).unwrap().limit, Some(1536 << 20));
        fs::write(v2.join("memory.max"), "max\n").unwrap();
        fs::write(v2.join("memory.high"), "max\n").unwrap();
        assert_eq!(CgroupMemory::read_v2(&v2).unwrap().headroom(), None);
    }

    #[test]
    fn mountinfo_resolution() {
        let mountinfo = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                         30 23 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        // Directories that do not exist resolve to the mount point.
        assert_eq!(
            resolve(mountinfo, "/nonexistent/x", super::Hierarchy::V1Memory),
            Some("/sys/fs/cgroup/memory".into())
        );
        assert_eq!(
            resolve(mountinfo, "/nonexistent", super::Hierarchy::V2),
            Some("/sys/fs/cgroup/unified".into())
        );
    }

    #[test]
    fn the_live_system_reads_without_error() {
        // Whatever this machine has, detection must not fail on it; say what was found.
        match CgroupMemory::detect() {
            Some(reading) => {
                eprintln!(
                    "live cgroup: {reading:?}, headroom {:?}",
                    reading.headroom()
                );
                assert!(reading.dir.is_dir());
            }
            None => eprintln!("no memory cgroup readable on this machine"),
        }
    }
}

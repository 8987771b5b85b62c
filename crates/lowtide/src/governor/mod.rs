//! The governor: turns limits and signals into a number of bytes to free.
//!
//! - `ram_budget`: the most anonymous bytes (RAM copies) the store may hold — a hard limit.
//! - `reserve_ram`: keep the system's available memory above this. Available memory is the
//!   smaller of `MemAvailable` and the headroom of the process's own memory cgroup.
//! - the cgroup's limit, always: where the process's memory cgroup has a hard limit, new RAM
//!   copies are admitted only within its headroom, less a small floor ([`cgroup_floor`]),
//!   whatever `ram_budget` and `reserve_ram` say. A RAM budget larger than the cgroup allows
//!   then ends in a typed error (`UnderReserve`), never in the kernel's OOM killer.
//! - pressure events: a PSI trigger on the cgroup's `memory.pressure` or
//!   `/proc/pressure/memory`, watched by a monitor thread.

mod cgroup;
mod monitor;

use std::fs;
use std::path::PathBuf;

pub use cgroup::{CgroupMemory, CgroupVersion};
pub use monitor::PressureTrigger;
pub(crate) use monitor::{Monitor, Relieve};

/// Why copies were evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[non_exhaustive]
pub enum EvictReason {
    /// To stay within the RAM budget.
    Budget,
    /// To keep available memory above the reserve.
    Reserve,
    /// A memory pressure event fired.
    Pressure,
    /// The caller asked (`Store::free_memory`).
    Request,
}

/// One reading of how much memory the system can still give.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MemoryReading {
    /// `MemAvailable` from `/proc/meminfo`.
    pub mem_available: u64,
    /// The process's memory cgroup, when one is readable.
    pub cgroup: Option<CgroupMemory>,
    /// The smaller of `mem_available` and the cgroup's headroom.
    pub available: u64,
}

impl MemoryReading {
    /// Reads `/proc/meminfo` and the process's memory cgroup now.
    pub fn now() -> Self {
        Self::with_cgroup(CgroupMemory::detect())
    }

    fn with_cgroup(cgroup: Option<CgroupMemory>) -> Self {
        let mem_available = mem_available().unwrap_or(u64::MAX);
        let headroom = cgroup
            .as_ref()
            .and_then(CgroupMemory::headroom)
            .unwrap_or(u64::MAX);
        Self {
            mem_available,
            cgroup,
            available: mem_available.min(headroom),
        }
    }
}

/// The limits of one store, and where to read the memory figures they are checked against.
#[derive(Debug)]
pub(crate) struct Governor {
    pub(crate) ram_budget: u64,
    reserve_ram: std::sync::atomic::AtomicU64,
    /// The cgroup found when the store was built; re-read (not re-detected) on each reading.
    cgroup: Option<(CgroupVersion, PathBuf)>,
    /// The least reserve in force: [`cgroup_floor`] of that cgroup's limit (0 without one).
    floor: u64,
    /// The last available memory read for a restore's choice, and when (see
    /// [`Governor::recent_available`]).
    recent: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

/// How long a reading serves the restores' choice of how to read (`store/reread.rs`): a
/// reading costs tens of microseconds (60 in a v1 cgroup here), and a model streamed per
/// submodule restores a tensor every few hundred.
const RECENT: std::time::Duration = std::time::Duration::from_millis(100);

impl Governor {
    pub(crate) fn new(ram_budget: u64, reserve_ram: u64) -> Self {
        let detected = CgroupMemory::detect();
        let floor = detected
            .as_ref()
            .and_then(|c| c.limit)
            .map_or(0, cgroup_floor);
        Self {
            ram_budget,
            reserve_ram: reserve_ram.into(),
            cgroup: detected.map(|c| (c.version, c.dir)),
            floor,
            recent: std::sync::Mutex::new(None),
        }
    }

    /// Available memory, read at most [`RECENT`] ago: for choices that a slightly old figure
    /// cannot make unsafe (admissions read the figures afresh).
    pub(crate) fn recent_available(&self) -> u64 {
        let now = std::time::Instant::now();
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *recent {
            Some((at, available)) if now.duration_since(at) < RECENT => available,
            _ => {
                let available = self.reading().available;
                *recent = Some((now, available));
                available
            }
        }
    }

    /// The reserve in force, in bytes: the setting, or the cgroup's floor when that is larger
    /// (so that under a cgroup limit every admission reads the memory figures, even with no
    /// reserve set). 0 when neither is set.
    pub(crate) fn reserve_ram(&self) -> u64 {
        self.reserve_setting().max(self.floor)
    }

    /// The reserve as set (0 when off).
    pub(crate) fn reserve_setting(&self) -> u64 {
        self.reserve_ram.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_reserve_ram(&self, bytes: u64) {
        self.reserve_ram
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Available memory now.
    pub(crate) fn reading(&self) -> MemoryReading {
        let cgroup = self
            .cgroup
            .as_ref()
            .and_then(|(version, dir)| match version {
                CgroupVersion::V1 => CgroupMemory::read_v1(dir).ok(),
                CgroupVersion::V2 => CgroupMemory::read_v2(dir).ok(),
            });
        MemoryReading::with_cgroup(cgroup)
    }

    /// Pressure files to try, most specific first.
    pub(crate) fn pressure_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some((CgroupVersion::V2, dir)) = &self.cgroup {
            files.push(dir.join("memory.pressure"));
        }
        files.push(PathBuf::from("/proc/pressure/memory"));
        files
    }
}

/// `MemAvailable` in bytes.
fn mem_available() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The default RAM budget: half of what is available now (1 GiB where nothing can be read).
pub(crate) fn default_ram_budget() -> u64 {
    let available = MemoryReading::now().available;
    if available == u64::MAX {
        1 << 30
    } else {
        (available / 2).max(1)
    }
}

/// The least headroom kept in a memory cgroup that has a hard limit, whatever the reserve: a
/// 64th of the limit, between 1 byte and 64 MiB. lowtide's own RAM copies never take the cgroup
/// to its limit (where the kernel OOM-kills the process), and the rest of the process keeps a
/// little room. Small enough to stay under any reserve a capped workflow sets.
pub(crate) fn cgroup_floor(limit: u64) -> u64 {
    (limit / 64).clamp(1, 64 << 20)
}

/// How many bytes to free so that holding `extra` more keeps `available` above `reserve`.
/// Saturating: a reserve near `u64::MAX` is never met (every new copy is refused), rather
/// than wrapping around to a small number that would switch the reserve off.
pub(crate) fn reserve_shortfall(available: u64, extra: u64, reserve: u64) -> u64 {
    reserve.saturating_add(extra).saturating_sub(available)
}

#[cfg(test)]
mod tests {
    use super::cgroup_floor;

    #[test]
    fn the_cgroup_floor_is_small_and_never_zero() {
        assert_eq!(cgroup_floor(48 << 20), 768 << 10);
        assert_eq!(cgroup_floor(4 << 30), 64 << 20);
        assert_eq!(cgroup_floor(1 << 40), 64 << 20);
        assert_eq!(cgroup_floor(10), 1);
    }
}

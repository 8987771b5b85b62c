//! Figures for every byte lowtide reads, writes, holds and drops.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, updated with relaxed atomics (each is an independent tally).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) bytes_read_source: AtomicU64,
    pub(crate) bytes_read_cold: AtomicU64,
    pub(crate) bytes_read_cold_kept: AtomicU64,
    pub(crate) restores_direct_first: AtomicU64,
    pub(crate) restores_cached: AtomicU64,
    pub(crate) restores_direct_short: AtomicU64,
    pub(crate) restores_queued: AtomicU64,
    pub(crate) pool_bytes: AtomicU64,
    pub(crate) pool_reuses: AtomicU64,
    pub(crate) bytes_read_cached: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) anon_bytes: AtomicU64,
    pub(crate) anon_peak: AtomicU64,
    pub(crate) ram_dropped_bytes: AtomicU64,
    pub(crate) mapped_released_bytes: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) acquires: AtomicU64,
    pub(crate) bytes_spilled: AtomicU64,
    pub(crate) bytes_restored_spill: AtomicU64,
    pub(crate) checksum_failures: AtomicU64,
    pub(crate) spill_failures: AtomicU64,
    pub(crate) recomputes: AtomicU64,
    pub(crate) evictions_budget: AtomicU64,
    pub(crate) evictions_reserve: AtomicU64,
    pub(crate) evictions_pressure: AtomicU64,
    pub(crate) evictions_request: AtomicU64,
    pub(crate) evict_ns: AtomicU64,
    pub(crate) bytes_uploaded: AtomicU64,
    pub(crate) bytes_downloaded: AtomicU64,
    pub(crate) device_bytes: AtomicU64,
    pub(crate) unloaded_clean_bytes: AtomicU64,
    pub(crate) device_unloads: AtomicU64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records a restore of `len` bytes from a source file, `cold` of them read from the disk
    /// (through the page cache, and left there, when `read` keeps them cached) and the rest
    /// copied from the page cache.
    pub(crate) fn restored_from_source(&self, len: u64, cold: u64, read: crate::store::FileRead) {
        Self::add(&self.bytes_read_source, len);
        Self::add(&self.bytes_read_cold, cold);
        Self::add(&self.bytes_read_cached, len - cold);
        if read.keeps_cached() {
            Self::add(&self.bytes_read_cold_kept, cold);
        }
    }

    /// Records that the store now holds `anon` anonymous bytes.
    pub(crate) fn set_anon(&self, anon: u64) {
        self.anon_bytes.store(anon, Ordering::Relaxed);
        self.anon_peak.fetch_max(anon, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            bytes_read_source: get(&self.bytes_read_source),
            bytes_read_cold: get(&self.bytes_read_cold),
            bytes_read_cold_kept: get(&self.bytes_read_cold_kept),
            restores_direct_first: get(&self.restores_direct_first),
            restores_cached: get(&self.restores_cached),
            restores_direct_short: get(&self.restores_direct_short),
            restores_queued: get(&self.restores_queued),
            pool_bytes: get(&self.pool_bytes),
            release_pending_bytes: 0,
            pool_reuses: get(&self.pool_reuses),
            bytes_read_cached: get(&self.bytes_read_cached),
            bytes_written: get(&self.bytes_written),
            anon_bytes: get(&self.anon_bytes),
            anon_peak_bytes: get(&self.anon_peak),
            ram_dropped_bytes: get(&self.ram_dropped_bytes),
            mapped_released_bytes: get(&self.mapped_released_bytes),
            evictions: get(&self.evictions),
            acquires: get(&self.acquires),
            bytes_spilled: get(&self.bytes_spilled),
            bytes_restored_spill: get(&self.bytes_restored_spill),
            checksum_failures: get(&self.checksum_failures),
            spill_failures: get(&self.spill_failures),
            recomputes: get(&self.recomputes),
            evictions_budget: get(&self.evictions_budget),
            evictions_reserve: get(&self.evictions_reserve),
            evictions_pressure: get(&self.evictions_pressure),
            evictions_request: get(&self.evictions_request),
            evict_seconds: get(&self.evict_ns) as f64 / 1e9,
            bytes_uploaded: get(&self.bytes_uploaded),
            bytes_downloaded: get(&self.bytes_downloaded),
            device_bytes: get(&self.device_bytes),
            unloaded_clean_bytes: get(&self.unloaded_clean_bytes),
            device_unloads: get(&self.device_unloads),
        }
    }
}

/// A copy of the store's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Bytes read from source files: `pread` into RAM copies and ranges faulted in through the
    /// mapping.
    pub bytes_read_source: u64,
    /// Of those, bytes restored from the disk (they were not in the page cache): with direct
    /// reads, which leave nothing cached, except `bytes_read_cold_kept`.
    pub bytes_read_cold: u64,
    /// Of `bytes_read_cold`, bytes read through the page cache and left there, for restores
    /// of tensors streamed repeatedly while memory is plentiful (`restores_cached`).
    pub bytes_read_cold_kept: u64,
    /// Restores from a model file (into RAM or onto a device) of tensors not streamed: their
    /// first, in a model that fits in the RAM budget. What was not in the page cache was read
    /// with `O_DIRECT`.
    pub restores_direct_first: u64,
    /// Restores from a model file of streamed tensors (restored before, or in a model larger
    /// than the RAM budget) while available memory exceeded the reserve by twice the model's
    /// file bytes: read through the page cache and left there, so that the next restore
    /// copies them instead of reading the disk.
    pub restores_cached: u64,
    /// Restores from a model file of streamed tensors while memory was short of that: read
    /// with `O_DIRECT`, nothing left cached.
    pub restores_direct_short: u64,
    /// Of the restores from a model file, those read with `O_DIRECT` through a stream's queue
    /// ([`crate::Store::stream_ram`], [`crate::Store::stream_device`], [`crate::Store::load`]):
    /// with the next tensors' reads in flight.
    pub restores_queued: u64,
    /// Of those, bytes restored into RAM copies by copying from the page cache.
    pub bytes_read_cached: u64,
    /// Bytes of evicted copies' buffers kept for reuse by the next restores (counted against
    /// the RAM budget; given back first when the governor needs memory).
    pub pool_bytes: u64,
    /// Restores that reused a pooled buffer instead of fresh memory.
    pub pool_reuses: u64,
    /// Bytes of copies dropped on purpose (model releases, spills) that the background
    /// releaser has not given back to the system yet (counted against the RAM budget until
    /// then; [`Store::wait_released`](crate::Store::wait_released) waits for them).
    pub release_pending_bytes: u64,
    /// Bytes written to disk by lowtide (spill writes).
    pub bytes_written: u64,
    /// Anonymous bytes held now: the sum of RAM copies.
    pub anon_bytes: u64,
    /// The most anonymous bytes held at once.
    pub anon_peak_bytes: u64,
    /// Bytes of clean RAM copies freed (nothing written).
    pub ram_dropped_bytes: u64,
    /// Bytes of mapped pages released with `madvise` (nothing written).
    pub mapped_released_bytes: u64,
    /// Copies evicted to make room.
    pub evictions: u64,
    /// Guards handed out.
    pub acquires: u64,
    /// Bytes written to the spill file (included in `bytes_written`).
    pub bytes_spilled: u64,
    /// Bytes read back from the spill file and verified.
    pub bytes_restored_spill: u64,
    /// Spill extents whose checksum did not match.
    pub checksum_failures: u64,
    /// Spill writes that failed (disk full, limit, I/O); the bytes stayed in RAM.
    pub spill_failures: u64,
    /// Dirty tensors recomputed from their recipe.
    pub recomputes: u64,
    /// Evictions to stay within the RAM budget.
    pub evictions_budget: u64,
    /// Evictions to keep available memory above the reserve.
    pub evictions_reserve: u64,
    /// Evictions after a memory pressure event.
    pub evictions_pressure: u64,
    /// Evictions the caller asked for.
    pub evictions_request: u64,
    /// Time spent evicting (spill writes included), in seconds.
    pub evict_seconds: f64,
    /// Bytes copied to devices.
    pub bytes_uploaded: u64,
    /// Bytes copied back from devices (into RAM or straight into the spill file).
    pub bytes_downloaded: u64,
    /// Bytes of device copies held now.
    pub device_bytes: u64,
    /// Bytes of device copies freed without writing anything (their bytes exist elsewhere).
    pub unloaded_clean_bytes: u64,
    /// Device copies unloaded (clean ones freed, dirty ones moved to RAM or the spill file).
    pub device_unloads: u64,
}

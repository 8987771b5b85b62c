//! Store settings: limits, spill, policy and the pressure monitor.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::state::State;
use super::{ConfigError, Shared, Store};
use crate::governor::{self, Governor, PressureTrigger};
use crate::policy::{DefaultPolicy, EvictionPolicy};
use crate::source::SourceIo;
use crate::spill::{DiskStorage, SpillFile, Storage};
use crate::stats::Stats;
use crate::sys::direct::IoShape;
use crate::sys::fork::Owner;

/// Settings for a [`Store`]. Every setter documents its default; [`StoreBuilder::build`]
/// rejects impossible combinations with a [`ConfigError`].
#[derive(Debug, Default)]
pub struct StoreBuilder {
    ram_budget: Option<u64>,
    reserve_ram: u64,
    spill_dir: Option<PathBuf>,
    spill_max: Option<u64>,
    spill_io_shape: Option<IoShape>,
    policy: Option<Box<dyn EvictionPolicy>>,
    storage: Option<Arc<dyn Storage>>,
    source_io: Option<Arc<dyn SourceIo>>,
    mapped_readahead: bool,
    /// `keep_streamed_cached(false)`.
    streamed_direct: bool,
    monitor: Option<bool>,
    trigger: PressureTrigger,
    interval: Option<Duration>,
}

impl StoreBuilder {
    /// The most anonymous bytes (RAM copies) the store may hold. A hard limit: a request that
    /// cannot fit even after evicting is refused.
    ///
    /// Default: half of the available memory (the smaller of `MemAvailable` and the process's
    /// memory cgroup headroom) when the store is built.
    pub fn ram_budget(mut self, bytes: u64) -> Self {
        self.ram_budget = Some(bytes);
        self
    }

    /// Keep the system's available memory above this many bytes: evict when it drops below,
    /// and refuse new RAM copies that would take it below.
    ///
    /// Default: 0 (off).
    pub fn reserve_ram(mut self, bytes: u64) -> Self {
        self.reserve_ram = bytes;
        self
    }

    /// Directory of the spill file (an unnamed file: nothing is left there after a crash).
    /// [`StoreBuilder::build`] creates the file and reserves its first block; where that
    /// fails (a read-only directory, a file system without `O_TMPFILE` or `fallocate`, such
    /// as `/proc`), the store is built all the same and a warning is logged once.
    ///
    /// Default: the system temp directory (`$TMPDIR` or `/tmp`).
    pub fn spill_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spill_dir = Some(dir.into());
        self
    }

    /// The most bytes the spill file may hold.
    ///
    /// Default: no limit other than the file system's free space.
    pub fn spill_max(mut self, bytes: u64) -> Self {
        self.spill_max = Some(bytes);
        self
    }

    /// How the spill file splits each tensor it writes or reads: requests of `shape.chunk`
    /// bytes, `shape.depth` of them in flight (one tensor moves at a time, so this is all
    /// the queue the device gets from it). The chunk is rounded up to whole 4096-byte blocks,
    /// within one block and 64 MiB; the depth is kept within 1 and 64. Memory stays bounded
    /// whatever the shape: aligned tensors are written from and read into their own pages,
    /// and unaligned ones pass through a bounce buffer of at most 32 MiB. A
    /// [`spill_storage`](StoreBuilder::spill_storage) of your own receives the shape in
    /// [`Storage::create_for`].
    ///
    /// Default: [`DiskStorage::shape_for`] the spill directory, chosen for its device when
    /// the store is built: requests as large as the device's queue takes whole, 32 MiB in
    /// flight (4 MiB x 8 for a queue that takes 4 MiB, and where sysfs does not describe the
    /// device; 1 MiB x 32 for one that takes 128 KiB to 1 MiB).
    pub fn spill_io_shape(mut self, shape: IoShape) -> Self {
        self.spill_io_shape = Some(shape);
        self
    }

    /// The eviction order.
    ///
    /// Default: [`crate::DefaultPolicy`] (priority class, then cost-aware recency).
    pub fn policy(mut self, policy: impl EvictionPolicy + 'static) -> Self {
        self.policy = Some(Box::new(policy));
        self
    }

    /// Where the spill file's bytes physically go. Default: [`DiskStorage`], an unnamed file
    /// in `spill_dir` written with `O_DIRECT`. Tests plug in a [`Storage`] that injects faults.
    pub fn spill_storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = Some(storage);
        self
    }

    /// How a mapped acquire ([`Store::acquire_mapped`], [`Store::fault_in`]) reads a tensor's
    /// pages. Default `false`: exactly its pages, in large requests, so neighbouring tensors
    /// stay out of the page cache (their restores then read them directly and leave no
    /// copy behind). `true`: the kernel's readahead around each fault, as a plain `mmap` of
    /// the file does — a faster cold fault-in (measured with `lowtide bench --size 512MiB`:
    /// 1.39-1.47 GB/s against 0.67-0.69), at the cost of megabytes of neighbours cached per
    /// tensor.
    pub fn mapped_readahead(mut self, on: bool) -> Self {
        self.mapped_readahead = on;
        self
    }

    /// Whether a tensor streamed again and again (restored from its file before, or its model
    /// larger than the RAM budget) is read through the page cache and left there while memory
    /// is plentiful (available memory minus the reserve at least twice the model's file), so
    /// that its next restore reads nothing from the disk. Default `true`. With `false`, every
    /// restore from a model file reads what is not cached with `O_DIRECT` and leaves nothing
    /// in the page cache: a first pass at the disk's full speed, and a disk read at every
    /// pass after it (see docs/performance.md for both, measured).
    pub fn keep_streamed_cached(mut self, on: bool) -> Self {
        self.streamed_direct = !on;
        self
    }

    /// How model files' bytes are read. Default: [`FileIo`](crate::FileIo), the kernel's
    /// `O_DIRECT` and `pread`. Tests plug in a [`SourceIo`] that injects read faults.
    pub fn source_io(mut self, io: Arc<dyn SourceIo>) -> Self {
        self.source_io = Some(io);
        self
    }

    /// Run a monitor thread that watches memory pressure (PSI) and samples available memory,
    /// evicting when pressure fires or available memory falls under the reserve.
    ///
    /// Default: on when `reserve_ram` is set, off otherwise.
    pub fn monitor(mut self, on: bool) -> Self {
        self.monitor = Some(on);
        self
    }

    /// The PSI trigger the monitor registers.
    ///
    /// Default: 150 ms of stall per 2 s window (`some 150000 2000000`).
    pub fn pressure_trigger(mut self, trigger: PressureTrigger) -> Self {
        self.trigger = trigger;
        self
    }

    /// How often the monitor samples available memory.
    ///
    /// Default: 250 ms.
    pub fn sample_interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Validates the settings and creates the store (and its monitor thread, if on).
    pub fn build(self) -> Result<Store, ConfigError> {
        let ram_budget = self.ram_budget.unwrap_or_else(governor::default_ram_budget);
        if ram_budget == 0 {
            return Err(ConfigError::ZeroBudget);
        }
        let spill_dir = self.spill_dir.unwrap_or_else(std::env::temp_dir);
        if !spill_dir.is_dir() {
            return Err(ConfigError::SpillDir { path: spill_dir });
        }
        if self.spill_max == Some(0) {
            return Err(ConfigError::ZeroSpillMax);
        }
        let trigger = self.trigger;
        let window_us = trigger.window.as_micros();
        if trigger.stall.is_zero()
            || trigger.stall > trigger.window
            || !window_us.is_multiple_of(2_000_000)
        {
            return Err(ConfigError::Trigger {
                stall: trigger.stall,
                window: trigger.window,
            });
        }
        let interval = self.interval.unwrap_or(Duration::from_millis(250));
        if interval.is_zero() {
            return Err(ConfigError::ZeroInterval);
        }
        let storage = self.storage.unwrap_or_else(|| Arc::new(DiskStorage));
        let shape = self.spill_io_shape.map_or_else(
            || crate::spill::shape_for_dir(&spill_dir),
            crate::spill::normalized_shape,
        );
        let spill = Arc::new(SpillFile::new(spill_dir, self.spill_max, storage, shape));
        if let Err(err) = spill.probe() {
            // Not an error of the settings: a store without a working spill file still
            // serves clean tensors, and the first spill tries again. But say so now, not at
            // the first eviction that needs it.
            let cause = std::error::Error::source(&err).map(|s| format!(": {s}"));
            log::warn!(
                "{err}{}; spilling will fail, so patched and derived tensors stay in RAM or on their device",
                cause.unwrap_or_default()
            );
        }
        let governor = Governor::new(ram_budget, self.reserve_ram);
        let pressure_files = governor.pressure_files();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(Arc::clone(&spill))),
            changed: Condvar::new(),
            source_io: self.source_io,
            mapped_readahead: self.mapped_readahead,
            streamed_direct: self.streamed_direct,
            tuner: super::tune::Tuner::default(),
            spill,
            stats: Stats::default(),
            governor,
            policy: self.policy.unwrap_or_else(|| Box::new(DefaultPolicy)),
            monitor: Mutex::new(None),
            owner: Owner::current(),
        });
        if self.monitor.unwrap_or(self.reserve_ram > 0) {
            let monitor = governor::Monitor::spawn(
                Arc::downgrade(&shared),
                &pressure_files,
                trigger,
                interval,
            )
            .map_err(|source| ConfigError::Monitor { source })?;
            *shared
                .monitor
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(monitor);
        }
        Ok(Store { shared })
    }
}

//! How a restore from a model file reads the bytes that are not in the page cache: with
//! `O_DIRECT` (nothing left cached) or through the page cache (left there for the next one).
//!
//! A tensor streamed again and again (a model larger than its budget, whose weights come back
//! at every forward) would be read from the disk at every restore if it were always read with
//! `O_DIRECT`. Kept in the page cache instead, its next restore is a copy from memory, and
//! keeping it costs nothing that has to be written: the kernel reclaims clean file pages
//! whenever it needs them. That is worth it only while memory is plentiful: where the model's
//! streamed bytes do not fit in what is free, a cyclic pass over them through the cache evicts
//! each page before its next use (every read misses anyway) and pushes out other processes'
//! pages. The rule ([`choose`]):
//!
//! - a tensor is *streamed* when it was restored from its file before (it was dropped and is
//!   needed again), or when its model's file bytes exceed the RAM budget (the model cannot stay
//!   whole in RAM: its tensors will be dropped and needed again, from the first pass on);
//! - a restore of a tensor that is not streamed reads with `O_DIRECT` (its RAM copy can stay;
//!   a second copy in the page cache would only take memory);
//! - a streamed tensor's restore reads through the page cache when the governor's available
//!   memory (the smaller of `MemAvailable` and the memory cgroup's headroom) exceeds the
//!   reserve in force by at least [`ROOM_FACTOR`] times the model's file bytes, and with
//!   `O_DIRECT` otherwise (memory short).
//!
//! The choices are counted in the stats (`restores_direct_first`, `restores_cached`,
//! `restores_direct_short`), and the bytes read from the disk into the page cache in
//! `bytes_read_cold_kept`.

/// Available memory above the reserve, in multiples of the model's file bytes, that lets a
/// repeated restore leave its pages cached: the whole model could stay cached with as much
/// again to spare for everything else.
pub(super) const ROOM_FACTOR: u64 = 2;

/// How one restore from a model file reads what is not in the page cache, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileRead {
    /// Not streamed (its first restore, and its model fits in the RAM budget): `O_DIRECT`.
    First,
    /// Streamed, and memory is plentiful: through the page cache, left there.
    Cached,
    /// Streamed, but memory is short: `O_DIRECT`.
    Short,
}

impl FileRead {
    pub(crate) fn keeps_cached(self) -> bool {
        self == Self::Cached
    }
}

/// Whether a restore reads through the page cache: `streamed` (see the module's rule), the
/// model's file bytes, available memory now and the reserve in force.
pub(super) fn choose(streamed: bool, model_bytes: u64, available: u64, reserve: u64) -> FileRead {
    if !streamed {
        return FileRead::First;
    }
    let room = available.saturating_sub(reserve);
    if room >= model_bytes.saturating_mul(ROOM_FACTOR) {
        FileRead::Cached
    } else {
        FileRead::Short
    }
}

#[cfg(test)]
mod tests {
    use super::{FileRead, choose};

    #[test]
    fn unstreamed_restores_are_direct_and_streamed_ones_cached_only_with_room() {
        const M: u64 = 1 << 20;
        assert_eq!(choose(false, 90 * M, 20 << 30, 0), FileRead::First);
        assert_eq!(choose(true, 90 * M, 20 << 30, 0), FileRead::Cached);
        assert_eq!(choose(true, 90 * M, 180 * M, 0), FileRead::Cached);
        assert_eq!(choose(true, 90 * M, 180 * M - 1, 0), FileRead::Short);
        // The reserve is not room.
        assert_eq!(choose(true, 90 * M, 200 * M, 64 * M), FileRead::Short);
        assert_eq!(choose(true, 90 * M, 10 * M, 64 * M), FileRead::Short);
        // Unreadable memory figures read as unlimited.
        assert_eq!(choose(true, u64::MAX, u64::MAX, 0), FileRead::Cached);
        assert!(FileRead::Cached.keeps_cached() && !FileRead::Short.keeps_cached());
    }
}

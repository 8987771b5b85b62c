//! Which unpinned copy to evict first.
//!
//! The default order, documented and tested:
//!
//! 1. **Priority class** of the tensor's model: [`Priority::Idle`] models first, then
//!    [`Priority::Queued`] (used later in the workflow), then [`Priority::Active`] (in use now).
//! 2. Within a class, **cost-aware recency** in the spirit of GreedyDual-Size: each copy carries
//!    a credit `H = L + c`, set when it is used, where `L` is the store's inflation value (the
//!    credit of the last evicted copy) and `c` the cost per byte of bringing it back: a clean
//!    copy costs one read (`READ_COST`), a dirty one a write now and a read later
//!    (`WRITE_COST + READ_COST`), or its recipe's recompute cost when that is cheaper. Lowest
//!    credit goes first. Restore time grows with size, so cost per byte is the size-normalised
//!    cost GreedyDual-Size divides by. The effect: among copies used equally long ago a clean
//!    one goes before a dirty one, and a dirty copy survives about one "generation" of
//!    evictions longer than a clean one used at the same time.
//! 3. Ties: least recently used first.
//!
//! Copies under a guard are never candidates.

use crate::store::TensorId;

/// Cost per byte of reading a copy back (the unit).
pub const READ_COST: f64 = 1.0;
/// Cost per byte of writing a dirty copy to the spill file.
pub const WRITE_COST: f64 = 1.0;

/// How much a model's copies are worth keeping, set with `Store::set_priority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub enum Priority {
    /// Leftovers: evicted first.
    Idle,
    /// Used later in the workflow. The default for a newly opened model.
    #[default]
    Queued,
    /// In use now: evicted last.
    Active,
}

/// An evictable copy, as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Candidate {
    /// The tensor.
    pub tensor: TensorId,
    /// Its model's priority class.
    pub priority: Priority,
    /// Logical time of its last use (larger is more recent).
    pub last_use: u64,
    /// Its GreedyDual credit (see the module docs).
    pub credit: f64,
    /// Bytes the eviction frees.
    pub len: u64,
    /// Clean: dropping it costs nothing now.
    pub clean: bool,
}

/// Orders eviction candidates.
pub trait EvictionPolicy: Send + Sync + std::fmt::Debug {
    /// Sorts `candidates` so that the first is evicted first.
    fn order(&self, candidates: &mut [Candidate]);
}

/// The documented default order: priority class, then credit, then recency.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPolicy;

impl EvictionPolicy for DefaultPolicy {
    fn order(&self, candidates: &mut [Candidate]) {
        candidates.sort_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then(a.credit.total_cmp(&b.credit))
                .then(a.last_use.cmp(&b.last_use))
        });
    }
}

/// Cost per byte of restoring a copy after evicting it.
pub(crate) fn restore_cost(clean: bool, recompute: Option<f64>) -> f64 {
    if clean {
        return READ_COST;
    }
    let spill = WRITE_COST + READ_COST;
    recompute.map_or(spill, |r| r.min(spill))
}

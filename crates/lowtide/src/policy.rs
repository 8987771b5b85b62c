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
//! Before credit, within a class: **copies in a loop longer than their tier**. A copy whose
//! last two uses were further apart (in bytes of tensors used, see
//! [`Candidate::reuse_distance`]) than its tier holds comes back only after a whole pass,
//! and recency evicts every such copy just before its next use: a model streamed through a
//! budget smaller than itself would read all of itself at every pass. These go first, the
//! one due last first ([`Candidate::due_in`], Belady's rule with the distance as the
//! forecast), so that a budget's worth of the loop stays for the next pass and each pass
//! reads about the model's size less the budget. A copy overdue (unused for longer than its
//! distance) is ordered as any other.
//!
//! Copies under a guard are never candidates.
//!
//! Then the policy chooses each victim's **fate** ([`EvictionPolicy::fate`]): drop it (its
//! bytes exist elsewhere), drop it and recompute it later from its recipe, spill it, download
//! a device copy into RAM, or keep it. The default ([`default_fate`]) keeps the cost rule
//! above: nothing is written that can be re-read or recomputed for less than a write and a
//! read. The store never carries out a fate that would lose bytes: a drop of a tensor's only
//! copy, or a recompute without a recipe, is treated as keep.

use crate::ids::TensorId;

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
#[allow(clippy::struct_excessive_bools)] // independent facts about one copy
pub struct Candidate {
    /// The tensor.
    pub tensor: TensorId,
    /// Its model's priority class.
    pub priority: Priority,
    /// Logical time of its last use (larger is more recent).
    pub last_use: u64,
    /// Bytes of tensors used between its last two uses (every use of any tensor counts its
    /// length): how far apart its uses come. `None` while it has been used once.
    pub reuse_distance: Option<u64>,
    /// Bytes of tensors used since its last use (its own use included).
    pub since_use: u64,
    /// Bytes the tier it would leave can hold: the RAM budget, or the device's memory.
    pub capacity: u64,
    /// Its GreedyDual credit (see the module docs).
    pub credit: f64,
    /// Bytes the eviction frees.
    pub len: u64,
    /// Clean: its bytes equal its extent in the model file, so dropping it costs nothing now.
    pub clean: bool,
    /// Which copy the eviction takes away.
    pub copy: Evicting,
    /// The spill file already holds its bytes.
    pub spilled: bool,
    /// It has a RAM copy (for a device candidate: dropping the device copy loses nothing).
    pub in_ram: bool,
    /// It has a device copy (for a RAM candidate: dropping the RAM copy loses nothing).
    pub on_device: bool,
    /// Its recipe's recompute cost per byte, if it has one.
    pub recipe_cost: Option<f64>,
    /// For a device candidate: RAM can take its bytes now (budget and reserve), without
    /// evicting anything.
    pub ram_room: bool,
}

impl Candidate {
    /// For a copy used in a loop longer than its tier holds (its uses `reuse_distance` apart,
    /// more than `capacity`, and not overdue): the bytes of other uses until its next one is
    /// due. Recency cannot keep such a copy until it comes back — each pass of the loop
    /// would push it out first — so the default order evicts these first, the one needed
    /// last going first, which keeps a tier's worth of the loop for the next pass.
    pub fn due_in(&self) -> Option<u64> {
        let distance = self.reuse_distance?;
        (distance > self.capacity && self.since_use <= distance).then(|| distance - self.since_use)
    }

    /// Its bytes survive without the copy being evicted: dropping it loses nothing.
    pub fn kept_elsewhere(&self) -> bool {
        self.clean
            || self.spilled
            || match self.copy {
                Evicting::Ram => self.on_device,
                Evicting::Device => self.in_ram,
            }
    }
}

/// Which copy of a tensor an eviction takes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Evicting {
    /// Its RAM copy (to stay within the RAM budget or reserve, or under pressure).
    Ram,
    /// Its device copy (to make room on the device, or an unload).
    Device,
}

/// What happens to an eviction victim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fate {
    /// Free the copy, writing nothing: its bytes exist elsewhere (the file, the spill file,
    /// another tier).
    Drop,
    /// Free the copy, writing nothing: it is recomputed from its recipe when needed.
    Recompute,
    /// Write the bytes to the spill file, then free the copy.
    Spill,
    /// Device copies only: download the bytes into a RAM copy, then free the device copy.
    /// Where RAM cannot take them after all, they are spilled.
    ToRam,
    /// Leave it where it is.
    Keep,
}

/// Orders eviction candidates and chooses their fates.
pub trait EvictionPolicy: Send + Sync + std::fmt::Debug {
    /// Sorts `candidates` so that the first is evicted first.
    fn order(&self, candidates: &mut [Candidate]);

    /// What to do with a victim. The default is [`default_fate`].
    fn fate(&self, candidate: &Candidate) -> Fate {
        default_fate(candidate)
    }
}

/// The default fate: drop what exists elsewhere; recompute what its recipe rebuilds for less
/// than a write and a read ([`WRITE_COST`] + [`READ_COST`]); a device copy goes to RAM when
/// RAM has room for it; anything else is spilled.
pub fn default_fate(candidate: &Candidate) -> Fate {
    if candidate.kept_elsewhere() {
        Fate::Drop
    } else if candidate
        .recipe_cost
        .is_some_and(|cost| cost < WRITE_COST + READ_COST)
    {
        Fate::Recompute
    } else if candidate.copy == Evicting::Device && candidate.ram_room {
        Fate::ToRam
    } else {
        Fate::Spill
    }
}

/// The documented default order: priority class, then copies in loops longer than their
/// tier (the one due last first), then credit, then recency.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultPolicy;

impl EvictionPolicy for DefaultPolicy {
    fn order(&self, candidates: &mut [Candidate]) {
        candidates.sort_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                // Looping copies first (`Some` before `None`), the one due last first.
                .then_with(|| match (a.due_in(), b.due_in()) {
                    (Some(a), Some(b)) => b.cmp(&a),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(tensor: u32, last_use: u64, reuse: Option<u64>, since: u64) -> Candidate {
        Candidate {
            tensor: TensorId(tensor),
            priority: Priority::Queued,
            last_use,
            reuse_distance: reuse,
            since_use: since,
            capacity: 100,
            credit: 1.0,
            len: 10,
            clean: true,
            copy: Evicting::Ram,
            spilled: false,
            in_ram: true,
            on_device: false,
            recipe_cost: None,
            ram_room: false,
        }
    }

    #[test]
    fn only_a_copy_in_a_loop_longer_than_its_tier_is_due() {
        // Used once, a short loop, overdue, in a long loop.
        assert_eq!(candidate(0, 1, None, 500).due_in(), None);
        assert_eq!(candidate(0, 1, Some(80), 10).due_in(), None);
        assert_eq!(candidate(0, 1, Some(300), 301).due_in(), None);
        assert_eq!(candidate(0, 1, Some(300), 10).due_in(), Some(290));
    }

    #[test]
    fn looping_copies_go_first_the_one_due_last_first_then_recency() {
        let mut candidates = vec![
            candidate(0, 1, None, 400),      // old, used once
            candidate(1, 9, Some(300), 20),  // due in 280
            candidate(2, 2, Some(50), 350),  // short loop, long unused
            candidate(3, 10, Some(300), 10), // due in 290: evicted first
            candidate(4, 3, Some(300), 310), // overdue: as any other
        ];
        DefaultPolicy.order(&mut candidates);
        let order: Vec<u32> = candidates.iter().map(|c| c.tensor.0).collect();
        assert_eq!(order, [3, 1, 0, 2, 4]);
    }
}

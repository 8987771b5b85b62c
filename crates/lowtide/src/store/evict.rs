//! Eviction of RAM copies, in two phases so that no lock is held across a write.
//!
//! 1. **Plan**, under the registry lock: candidates in policy order; the policy chooses each
//!    victim's fate. Drops (clean copies, copies kept elsewhere, cheap recipes) happen at once
//!    — they write nothing. Victims to spill are marked `busy` (no other eviction takes them,
//!    and changes of their bytes wait) and their RAM copy is shared with the plan.
//! 2. **Write**, outside the lock: each victim's bytes go to the spill file.
//! 3. **Commit**, under the lock: the extent is recorded and the RAM copy freed — unless a
//!    guard pinned the tensor meanwhile, then it keeps both copies. A failed write leaves the
//!    copy in RAM.
//!
//! [`Shared::admit`] is how a new RAM copy gets its room: it loops over these phases until
//! the budget and the reserve allow the bytes, and returns with them reserved.

use std::collections::HashSet;
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use super::error::MemoryError;
use super::ram::RamBuf;
use super::state::State;
use super::{Shared, StoreError};
use crate::governor::{EvictReason, MemoryReading};
use crate::ids::TensorId;
use crate::policy::{Candidate, Evicting, Fate};
use crate::stats::Stats;

/// What an eviction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FreeOutcome {
    /// RAM bytes freed in total.
    pub freed_bytes: u64,
    /// Of which clean copies dropped (nothing written).
    pub dropped_bytes: u64,
    /// Of which dirty copies written to the spill file first.
    pub spilled_bytes: u64,
    /// Of which dirty copies dropped because their recipe is cheaper than a spill, or their
    /// bytes were already in the spill file or on a device.
    pub recipe_bytes: u64,
    /// Dirty copies that could not be spilled (and so stayed in RAM).
    pub spill_failures: u32,
}

/// How [`Shared::admit`] may make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Room {
    /// Within the budget and above the reserve, evicting as needed.
    Evict,
    /// Within the budget and above the reserve, or not at all (prefetch).
    NoEviction,
    /// Above the reserve only, evicting as needed: bytes that are not RAM copies (a device
    /// in host memory).
    ReserveOnly,
}

/// Victims chosen under the lock whose bytes must be written before their copy can go.
#[derive(Default)]
pub(super) struct Plan {
    reason: Option<EvictReason>,
    spills: Vec<(TensorId, Arc<RamBuf>, f64)>,
    /// What the plan freed at once (drops).
    pub(super) outcome: FreeOutcome,
}

impl Plan {
    /// Whether the plan freed or will free anything.
    pub(super) fn is_empty(&self) -> bool {
        self.spills.is_empty() && self.outcome.freed_bytes == 0
    }

    /// Bytes freed now or once written.
    fn planned(&self) -> u64 {
        self.outcome.freed_bytes + self.spills.iter().map(|(_, b, _)| b.len()).sum::<u64>()
    }
}

impl Shared {
    /// Evicts at least `need` bytes of RAM copies if it can, in policy order, skipping pinned
    /// copies and `exclude`: the three phases of the module docs. Takes the lock itself.
    pub(super) fn evict(
        &self,
        need: u64,
        reason: EvictReason,
        exclude: Option<TensorId>,
    ) -> FreeOutcome {
        let mut state = self.lock();
        let plan = self.plan(&mut state, need, reason, exclude, &HashSet::new());
        self.check(&mut state);
        drop(state);
        self.carry_out(plan)
    }

    /// Phase 1: chooses victims for `need` bytes and drops what needs no write.
    pub(super) fn plan(
        &self,
        state: &mut State,
        need: u64,
        reason: EvictReason,
        exclude: Option<TensorId>,
        skip: &HashSet<TensorId>,
    ) -> Plan {
        let mut plan = Plan {
            reason: Some(reason),
            ..Plan::default()
        };
        if need == 0 {
            return plan;
        }
        let started = Instant::now();
        let mut candidates: Vec<Candidate> = state
            .entries()
            .filter(|(id, t)| {
                Some(*id) != exclude
                    && !skip.contains(id)
                    && t.pins == 0
                    && !t.busy
                    && t.ram.is_some()
            })
            .map(|(id, t)| state.candidate(id, t, Evicting::Ram, false, self.governor.ram_budget))
            .collect();
        if super::unwinding(|| self.policy.order(&mut candidates)).is_none() {
            // A policy that panics evicts nothing.
            candidates.clear();
        }
        for candidate in candidates {
            if plan.planned() >= need {
                break;
            }
            let id = candidate.tensor;
            let fate = super::unwinding(|| self.policy.fate(&candidate)).unwrap_or(Fate::Keep);
            match fate {
                // A copy whose bytes exist elsewhere needs no write, whatever the fate.
                Fate::Drop | Fate::Spill | Fate::ToRam if candidate.kept_elsewhere() => {
                    let freed = self.let_go(state, id, reason);
                    if candidate.clean {
                        plan.outcome.dropped_bytes += freed;
                    } else {
                        plan.outcome.recipe_bytes += freed;
                    }
                }
                Fate::Recompute if candidate.recipe_cost.is_some() => {
                    plan.outcome.recipe_bytes += self.let_go(state, id, reason);
                }
                Fate::Spill => {
                    let Ok(entry) = state.tensor_mut(id) else {
                        continue;
                    };
                    let buf = Arc::clone(entry.ram.as_ref().expect("candidates have a RAM copy"));
                    entry.busy = true;
                    plan.spills.push((id, buf, candidate.credit));
                    continue;
                }
                fate => {
                    if fate != Fate::Keep {
                        log::debug!(
                            "policy chose {fate:?} for tensor #{}, which would lose its bytes: kept",
                            id.0
                        );
                    }
                    continue;
                }
            }
            plan.outcome.freed_bytes = plan.outcome.dropped_bytes + plan.outcome.recipe_bytes;
            state.inflation = state.inflation.max(candidate.credit);
            self.count_eviction(reason);
        }
        Stats::add(&self.stats.ram_dropped_bytes, plan.outcome.dropped_bytes);
        Stats::add(&self.stats.evict_ns, started.elapsed().as_nanos() as u64);
        plan
    }

    /// Phases 2 and 3: writes the planned spills outside the lock, then commits them.
    pub(super) fn carry_out(&self, plan: Plan) -> FreeOutcome {
        self.carry_out_noting(plan, &mut HashSet::new()).0
    }

    /// [`Shared::carry_out`], adding the victims whose write failed to `failed`; also says
    /// whether any extent was recorded (a victim pinned during its write keeps its RAM copy
    /// and is free to drop next time).
    fn carry_out_noting(&self, plan: Plan, failed: &mut HashSet<TensorId>) -> (FreeOutcome, bool) {
        let mut outcome = plan.outcome;
        let mut recorded = false;
        let Some(reason) = plan.reason else {
            return (outcome, recorded);
        };
        if plan.spills.is_empty() {
            return (outcome, recorded);
        }
        // Each victim commits right after its own write: its `busy` mark lasts one write.
        for (id, buf, credit) in plan.spills {
            let result = self.write_spill(buf.as_slice());
            drop(buf);
            let mut state = self.lock();
            let Ok(entry) = state.tensor_mut(id) else {
                // Closed meanwhile: the extent has no owner.
                if let Ok(extent) = result {
                    self.spill.free(extent);
                }
                continue;
            };
            entry.busy = false;
            let name = entry.name.clone();
            let pinned = entry.pins > 0;
            match result {
                Ok(extent) => {
                    Stats::add(&self.stats.bytes_spilled, extent.len);
                    Stats::add(&self.stats.bytes_written, extent.len);
                    state.set_spilled(id, extent);
                    recorded = true;
                    if !pinned {
                        outcome.spilled_bytes += self.let_go(&mut state, id, reason);
                        outcome.freed_bytes += extent.len;
                        state.inflation = state.inflation.max(credit);
                        self.count_eviction(reason);
                    }
                    // Else used meanwhile: it keeps its RAM copy and now has a spilled one.
                }
                Err(err) => {
                    log::warn!(
                        "cannot spill tensor `{}`: {err}",
                        crate::text::Escaped(&name)
                    );
                    Stats::add(&self.stats.spill_failures, 1);
                    outcome.spill_failures += 1;
                    failed.insert(id);
                }
            }
            self.check(&mut state);
            drop(state);
            self.changed.notify_all();
        }
        self.spill.reclaim();
        (outcome, recorded)
    }

    /// Frees a victim's RAM copy: kept in the pool when evicting for the budget (the room is
    /// refilled at once), else handed to the releaser (the memory goes back to the system).
    fn let_go(&self, state: &mut State, id: TensorId, reason: EvictReason) -> u64 {
        if reason == EvictReason::Budget {
            state.recycle_ram(id, self.governor.ram_budget)
        } else {
            state.release_ram(id)
        }
    }

    fn count_eviction(&self, reason: EvictReason) {
        Stats::add(&self.stats.evictions, 1);
        Stats::add(
            match reason {
                EvictReason::Budget => &self.stats.evictions_budget,
                EvictReason::Reserve => &self.stats.evictions_reserve,
                EvictReason::Pressure => &self.stats.evictions_pressure,
                _ => &self.stats.evictions_request,
            },
            1,
        );
    }

    /// Makes room for `len` more bytes of RAM for tensor `id` within the budget (unless
    /// `room` is [`Room::ReserveOnly`]) and above the reserve, evicting in policy order (unless
    /// [`Room::NoEviction`]) with no lock held across a write, and returns the lock with the
    /// bytes reserved in the budget (`state.reserved`; the caller un-reserves them when it
    /// installs the copy or fails). Memory readings and waits for the releaser happen outside
    /// the lock. Fails when evicting cannot make room: at once when even every unpinned copy
    /// would not be enough (nothing is evicted then), or when a pass frees nothing (every
    /// write failed, or the policy keeps everything).
    pub(super) fn admit(
        &self,
        id: TensorId,
        name: &str,
        len: u64,
        room: Room,
    ) -> Result<MutexGuard<'_, State>, StoreError> {
        let budget = self.governor.ram_budget;
        let reserve = self.governor.reserve_ram();
        let in_budget = room != Room::ReserveOnly;
        let mut wait_releaser = reserve > 0;
        // Victims whose spill failed in this call: not chosen again, so that the copies
        // that can go for free are tried before giving up.
        let mut failed = HashSet::new();
        loop {
            if wait_releaser {
                // Copies still being freed are not available yet; they will be in a moment.
                let releaser = Arc::clone(&self.lock().releaser);
                releaser.wait();
            }
            let reading: Option<MemoryReading> = (reserve > 0).then(|| self.governor.reading());
            let mut state = self.lock();
            let pending = state.releaser.pending();
            if in_budget && pending > 0 && state.anon + state.reserved + pending + len > budget {
                drop(state);
                wait_releaser = true;
                continue;
            }
            let over = if in_budget {
                (state.anon + state.reserved + len).saturating_sub(budget)
            } else {
                0
            };
            let over_budget = |state: &State, evictable: u64| {
                StoreError::Memory(MemoryError::OverBudget {
                    name: name.to_owned(),
                    requested: len,
                    available: budget.saturating_sub(state.anon + state.reserved) + evictable,
                    budget,
                })
            };
            if over > 0 {
                let evictable: u64 = state
                    .entries()
                    .filter(|(other, t)| *other != id && t.pins == 0)
                    .filter_map(|(_, t)| t.ram.as_ref().map(|b| b.len()))
                    .sum();
                if over > evictable || room == Room::NoEviction {
                    return Err(over_budget(&state, evictable));
                }
                let plan = self.plan(&mut state, over, EvictReason::Budget, Some(id), &failed);
                if !self.evicted_or_waited(state, plan, &mut failed) {
                    return Err(over_budget(&self.lock(), 0));
                }
                wait_releaser = false;
                continue;
            }
            // Bytes promised to copies being filled are not in the reading yet.
            let available = reading.map(|r| r.available.saturating_sub(state.reserved));
            let short = available.map_or(0, |available| {
                crate::governor::reserve_shortfall(available, len, reserve)
            });
            if short > 0 {
                let under_reserve = || {
                    StoreError::Memory(MemoryError::UnderReserve {
                        name: name.to_owned(),
                        requested: len,
                        available: available.unwrap_or(0),
                        reserve,
                    })
                };
                if room == Room::NoEviction {
                    return Err(under_reserve());
                }
                if state.flush_pool() > 0 {
                    // Pooled buffers go back first: they hold no tensor.
                    self.check(&mut state);
                    drop(state);
                    wait_releaser = true;
                    continue;
                }
                let plan = self.plan(&mut state, short, EvictReason::Reserve, Some(id), &failed);
                if !self.evicted_or_waited(state, plan, &mut failed) {
                    return Err(under_reserve());
                }
                wait_releaser = true;
                continue;
            }
            if in_budget {
                state.reserve(len);
            }
            return Ok(state);
        }
    }

    /// Carries out a plan outside the lock, or when it is empty waits for an eviction in
    /// flight to commit. Says whether anything changed (bytes freed, or a commit waited for):
    /// `false` means evicting cannot make progress now.
    fn evicted_or_waited(
        &self,
        mut state: MutexGuard<'_, State>,
        plan: Plan,
        failed: &mut HashSet<TensorId>,
    ) -> bool {
        self.check(&mut state);
        if plan.is_empty() {
            if state.entries().any(|(_, t)| t.busy) {
                drop(self.wait_changed(state));
                return true;
            }
            return false;
        }
        drop(state);
        let before = failed.len();
        let (outcome, recorded) = self.carry_out_noting(plan, failed);
        outcome.freed_bytes > 0 || recorded || failed.len() > before
    }

    /// Frees what the governor asks for: called by the monitor thread.
    pub(super) fn relieve(&self, pressure: bool) -> FreeOutcome {
        // Copies still being freed first, without holding the store's lock meanwhile.
        let releaser = Arc::clone(&self.lock().releaser);
        releaser.wait();
        let reading: MemoryReading = self.governor.reading();
        let reserve = self.governor.reserve_ram();
        let short = reserve.saturating_sub(reading.available);
        let mut state = self.lock();
        if pressure || short > 0 {
            // Pooled buffers hold no tensor: they go back first.
            state.flush_pool();
        }
        let plan = if pressure {
            // Under pressure give back at least an eighth of what is held, and release the
            // mapped pages of idle models so the kernel can reclaim them first.
            let need = short.max(state.anon / 8);
            let plan = self.plan(
                &mut state,
                need,
                EvictReason::Pressure,
                None,
                &HashSet::new(),
            );
            let idle_mapped = state.release_idle_mapped();
            Stats::add(&self.stats.mapped_released_bytes, idle_mapped);
            plan
        } else {
            self.plan(
                &mut state,
                short,
                EvictReason::Reserve,
                None,
                &HashSet::new(),
            )
        };
        self.check(&mut state);
        drop(state);
        self.carry_out(plan)
    }
}

impl Shared {
    /// Writes `bytes` to the spill file. When the disk or `spill_max` has no room, the spill
    /// copies of tensors whose RAM copy is unchanged since it was read from them are freed
    /// (they are redundant: evicting such a RAM copy would drop it) and the write is tried once
    /// more.
    pub(super) fn write_spill(
        &self,
        bytes: &[u8],
    ) -> Result<crate::spill::Extent, crate::SpillError> {
        let write = || {
            super::unwinding(|| self.spill.write(bytes))
                .unwrap_or_else(|| Err(crate::spill::panicked("write")))
        };
        match write() {
            Err(crate::SpillError::NoSpace { .. } | crate::SpillError::Limit { .. })
                if self.lock().free_redundant_spills() > 0 =>
            {
                write()
            }
            other => other,
        }
    }
}

impl crate::governor::Relieve for Shared {
    fn tick(&self, pressure: bool) {
        let _ = self.relieve(pressure);
    }
}

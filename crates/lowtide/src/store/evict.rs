//! Eviction: freeing RAM copies in policy order, spilling dirty ones, never a pinned one.

use std::sync::Arc;
use std::time::Instant;

use super::state::State;
use super::{Shared, TensorId};
use crate::governor::{EvictReason, MemoryReading};
use crate::policy::{Candidate, READ_COST, WRITE_COST};
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
    /// Of which dirty copies dropped because their recipe is cheaper than a spill.
    pub recipe_bytes: u64,
    /// Dirty copies that could not be spilled (and so stayed in RAM).
    pub spill_failures: u32,
}

impl Shared {
    /// Frees at least `need` bytes of RAM copies if it can, in policy order, skipping pinned
    /// copies and `exclude`. Dirty copies are spilled (or dropped when their recipe is
    /// cheaper); a failed spill leaves the copy in RAM and moves on to the next victim.
    pub(super) fn free(
        &self,
        state: &mut State,
        need: u64,
        reason: EvictReason,
        exclude: Option<TensorId>,
    ) -> FreeOutcome {
        let mut outcome = FreeOutcome::default();
        if need == 0 {
            return outcome;
        }
        let started = Instant::now();
        let mut candidates: Vec<Candidate> = state
            .tensors
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (TensorId(i as u32), t)))
            .filter(|(id, t)| Some(*id) != exclude && t.pins == 0 && t.ram.is_some())
            .map(|(id, t)| Candidate {
                tensor: id,
                priority: state.model(t.model).map(|m| m.priority).unwrap_or_default(),
                last_use: t.last_use,
                credit: t.credit,
                len: t.len,
                clean: t.is_clean(),
            })
            .collect();
        self.policy.order(&mut candidates);
        // Evicting to make room within the budget: the freed buffers are likely to be
        // refilled at once, so keep them. For the reserve or pressure, give memory back.
        let budget = self.governor.ram_budget;
        let release = |state: &mut State, id: TensorId| {
            if reason == EvictReason::Budget {
                state.recycle_ram(id, budget)
            } else {
                state.free_ram(id)
            }
        };
        for candidate in candidates {
            if outcome.freed_bytes >= need {
                break;
            }
            let id = candidate.tensor;
            let Ok(entry) = state.tensor(id) else {
                continue;
            };
            let credit = entry.credit;
            if entry.is_clean() {
                outcome.dropped_bytes += release(state, id);
            } else if entry
                .recipe
                .as_ref()
                .is_some_and(|r| r.cost_per_byte() < WRITE_COST + READ_COST)
                || entry.spilled.is_some()
                || entry.device.is_some()
            {
                // Recomputing is cheaper than a write and a read, or the spill file or a
                // device already holds these bytes: nothing to write now.
                outcome.recipe_bytes += release(state, id);
            } else {
                let buf = Arc::clone(entry.ram.as_ref().expect("candidates have a RAM copy"));
                let written = self.spill_lock().write(buf.as_slice());
                match written {
                    Ok(extent) => {
                        Stats::add(&self.stats.bytes_spilled, extent.len);
                        Stats::add(&self.stats.bytes_written, extent.len);
                        state.tensor_mut(id).expect("present").spilled = Some(extent);
                        outcome.spilled_bytes += release(state, id);
                    }
                    Err(err) => {
                        log::warn!("cannot spill tensor `{}`: {err}", entry.name);
                        Stats::add(&self.stats.spill_failures, 1);
                        outcome.spill_failures += 1;
                        continue;
                    }
                }
            }
            outcome.freed_bytes =
                outcome.dropped_bytes + outcome.spilled_bytes + outcome.recipe_bytes;
            state.inflation = state.inflation.max(credit);
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
        Stats::add(&self.stats.ram_dropped_bytes, outcome.dropped_bytes);
        Stats::add(&self.stats.evict_ns, started.elapsed().as_nanos() as u64);
        outcome
    }

    /// Makes room within the budget for `bytes` more, evicting in policy order. Fails without
    /// evicting anything when even evicting every unpinned copy could not make room.
    pub(super) fn make_room(
        &self,
        state: &mut State,
        for_tensor: TensorId,
        name: &str,
        bytes: u64,
    ) -> Result<(), super::StoreError> {
        let budget = self.governor.ram_budget;
        if state.anon + state.reserved + state.releaser.pending() + bytes > budget {
            // Copies dropped on purpose and still being freed: let them go first.
            state.releaser.wait();
        }
        let held = state.anon + state.reserved;
        if held + bytes <= budget {
            return Ok(());
        }
        let evictable: u64 = state
            .tensors
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (i, t)))
            .filter(|(i, t)| *i != for_tensor.0 as usize && t.pins == 0)
            .filter_map(|(_, t)| t.ram.as_ref().map(|b| b.len()))
            .sum();
        let over_budget = |state: &State, evictable: u64| super::StoreError::OverBudget {
            name: name.to_owned(),
            requested: bytes,
            available: budget.saturating_sub(state.anon + state.reserved) + evictable,
            budget,
        };
        if held + bytes - evictable > budget {
            return Err(over_budget(state, evictable));
        }
        self.free(
            state,
            held + bytes - budget,
            EvictReason::Budget,
            Some(for_tensor),
        );
        if state.anon + state.reserved + bytes > budget {
            return Err(over_budget(state, 0));
        }
        Ok(())
    }

    /// Keeps available memory above the reserve after `bytes` more are held, evicting if
    /// needed. Reads `/proc/meminfo` (and the cgroup files) only when a reserve is set.
    pub(super) fn keep_reserve(
        &self,
        state: &mut State,
        for_tensor: TensorId,
        name: &str,
        bytes: u64,
    ) -> Result<(), super::StoreError> {
        let reserve = self.governor.reserve_ram();
        if reserve == 0 {
            return Ok(());
        }
        // What is still being freed is not available yet; it will be in a moment.
        state.releaser.wait();
        let mut available = self.governor.reading().available;
        let mut short = crate::governor::reserve_shortfall(available, bytes, reserve);
        if short > 0 && state.flush_pool() > 0 {
            // Pooled buffers go back first: they hold no tensor.
            self.check(state);
            available = self.governor.reading().available;
            short = crate::governor::reserve_shortfall(available, bytes, reserve);
        }
        if short == 0 {
            return Ok(());
        }
        let freed = self
            .free(state, short, EvictReason::Reserve, Some(for_tensor))
            .freed_bytes;
        if freed < short {
            return Err(super::StoreError::UnderReserve {
                name: name.to_owned(),
                requested: bytes,
                available: available + freed,
                reserve,
            });
        }
        Ok(())
    }
}

impl crate::governor::Relieve for Shared {
    fn tick(&self, pressure: bool) {
        // Copies still being freed first, without holding the store's lock meanwhile.
        Arc::clone(&self.lock().releaser).wait();
        let reading: MemoryReading = self.governor.reading();
        let reserve = self.governor.reserve_ram();
        let short = reserve.saturating_sub(reading.available);
        let mut state = self.lock();
        if pressure || short > 0 {
            // Pooled buffers hold no tensor: they go back first.
            state.flush_pool();
        }
        if pressure {
            // Under pressure give back at least an eighth of what is held, and release the
            // mapped pages of idle models so the kernel can reclaim them first.
            let need = short.max(state.anon / 8);
            self.free(&mut state, need, EvictReason::Pressure, None);
            let released = state.release_idle_mapped();
            Stats::add(&self.stats.mapped_released_bytes, released);
        } else if short > 0 {
            self.free(&mut state, short, EvictReason::Reserve, None);
        }
        self.check(&mut state);
    }
}

//! The shape of queued direct reads, per device, chosen from what this store measured itself.
//!
//! A disk reads fastest with enough bytes in flight, and what is enough differs by two orders
//! of magnitude between a SATA SSD, a network volume and a PCIe 5 `NVMe` drive. No constant fits
//! them all, so each device (`st_dev` of the files read) gets its own shape: the first streams
//! that read from it measure one rung of [`LADDER`] per segment of their own reads (the bytes
//! they read anyway, so the probe costs no extra I/O), climbing while more in flight reads
//! faster, then stepping down while less in flight reads as fast (within [`WITHIN`]), and
//! settle on the smallest shape as fast as the best. The memory bound caps the ladder: the
//! bytes in flight are the tensors' own buffers, admitted by the governor, and a stream never
//! keeps more than a quarter of the RAM budget in flight.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::sys::direct::IoShape;

/// Candidate shapes, by bytes in flight: 16 MiB to 512 MiB.
pub(crate) const LADDER: [IoShape; 6] = [
    IoShape {
        chunk: 2 << 20,
        depth: 8,
    },
    IoShape {
        chunk: 4 << 20,
        depth: 8,
    },
    IoShape {
        chunk: 8 << 20,
        depth: 8,
    },
    IoShape {
        chunk: 16 << 20,
        depth: 8,
    },
    IoShape {
        chunk: 16 << 20,
        depth: 16,
    },
    IoShape {
        chunk: 16 << 20,
        depth: 32,
    },
];

/// Where a device's measurement starts: 64 MiB in flight.
const START: usize = 2;

/// A smaller shape is chosen when it reads at least this fraction of the best rate.
pub(crate) const WITHIN: f64 = 0.95;

/// Bytes in flight of a shape.
pub(crate) fn in_flight(shape: IoShape) -> u64 {
    (shape.chunk * shape.depth) as u64
}

/// The highest rung whose bytes in flight fit `bound` (at least the first).
pub(crate) fn top_within(bound: u64) -> usize {
    LADDER
        .iter()
        .rposition(|&shape| in_flight(shape) <= bound)
        .unwrap_or(0)
}

/// The shape a store's streams read a device with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceShape {
    /// The device (`st_dev` of the files read from it).
    pub device: u64,
    /// Request size and requests in flight.
    pub shape: IoShape,
    /// Whether the measurement is over (else `shape` is the one being measured next).
    pub settled: bool,
    /// Shapes measured so far.
    pub measured: usize,
}

/// What is known of one device: the read rate measured at each rung.
#[derive(Debug, Clone, Default)]
pub(crate) struct DeviceTune {
    rates: [Option<f64>; LADDER.len()],
}

/// The next rung to use: a rung still worth measuring, or the one chosen (`true`: settled).
///
/// Climbs from the best rung while the rung above is unmeasured and the last step up read
/// faster by more than [`WITHIN`] allows (more in flight may be faster still); then steps down from the smallest rung within [`WITHIN`] of the best while the
/// rung below is unmeasured (less in flight may be as fast); then settles on that smallest
/// rung. With nothing measured, [`START`] (or `top`, if lower).
pub(crate) fn next_rung(rates: &[Option<f64>], top: usize) -> (usize, bool) {
    let top = top.min(rates.len().saturating_sub(1));
    let measured = || {
        rates
            .iter()
            .enumerate()
            .take(top + 1)
            .filter_map(|(i, r)| r.map(|r| (i, r)))
    };
    // The best rung; of equal rates, the smallest.
    let Some((best, best_rate)) =
        measured().fold(None, |best: Option<(usize, f64)>, (i, r)| match best {
            Some((_, b)) if b >= r => best,
            _ => Some((i, r)),
        })
    else {
        return (START.min(top), false);
    };
    // Climb while the last step up helped (or nothing below was measured).
    let helped = best == 0 || rates[best - 1].is_none_or(|below| best_rate * WITHIN > below);
    if best < top && rates[best + 1].is_none() && helped {
        return (best + 1, false);
    }
    let chosen = measured()
        .find(|&(_, rate)| rate >= WITHIN * best_rate)
        .map_or(best, |(i, _)| i);
    if chosen > 0 && rates[chosen - 1].is_none() {
        return (chosen - 1, false);
    }
    (chosen, true)
}

impl DeviceTune {
    /// The rung to read with now, and whether it is settled, below `top`.
    pub(crate) fn rung(&self, top: usize) -> (usize, bool) {
        next_rung(&self.rates, top)
    }

    /// Records a rate (bytes per second) measured at `rung`; a later measurement of the same
    /// rung averages with the earlier ones.
    pub(crate) fn record(&mut self, rung: usize, rate: f64) {
        if let Some(slot) = self.rates.get_mut(rung) {
            *slot = Some(slot.map_or(rate, |was| f64::midpoint(was, rate)));
        }
    }
}

/// The shapes of every device this store read from.
#[derive(Debug, Default)]
pub(crate) struct Tuner {
    devices: Mutex<HashMap<u64, DeviceTune>>,
}

impl Tuner {
    /// The rung to read `device` with, under `top`, and whether it is settled (a device seen
    /// for the first time is listed from now on).
    pub(crate) fn rung(&self, device: u64, top: usize) -> (usize, bool) {
        self.lock().entry(device).or_default().rung(top)
    }

    /// Records a read rate measured on `device` at `rung`.
    pub(crate) fn record(&self, device: u64, rung: usize, rate: f64) {
        self.lock().entry(device).or_default().record(rung, rate);
    }

    /// What is known of every device, under `top`.
    pub(crate) fn shapes(&self, top: usize) -> Vec<DeviceShape> {
        let mut out: Vec<_> = self
            .lock()
            .iter()
            .map(|(&device, tune)| {
                let (rung, settled) = tune.rung(top);
                DeviceShape {
                    device,
                    shape: LADDER[rung],
                    settled,
                    measured: tune.rates.iter().filter(|r| r.is_some()).count(),
                }
            })
            .collect();
        out.sort_by_key(|d| d.device);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, DeviceTune>> {
        self.devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::{DeviceTune, LADDER, START, next_rung, top_within};

    /// Feeds `rate_at(rung)` to a fresh device until it settles; returns the rung and the
    /// rungs measured on the way.
    fn settle(rate_at: impl Fn(usize) -> f64, top: usize) -> (usize, Vec<usize>) {
        let mut tune = DeviceTune::default();
        let mut tried = Vec::new();
        for _ in 0..=LADDER.len() {
            let (rung, settled) = tune.rung(top);
            if settled {
                return (rung, tried);
            }
            tried.push(rung);
            tune.record(rung, rate_at(rung));
        }
        panic!("did not settle: tried {tried:?}");
    }

    #[test]
    fn a_fast_disk_climbs_to_where_more_in_flight_stops_helping() {
        // Like a 5 GB/s virtual disk: faster up to 128 MiB in flight, flat after.
        let rates = [1.6e9, 2.6e9, 3.9e9, 5.3e9, 5.4e9, 5.4e9];
        let (rung, tried) = settle(|r| rates[r], LADDER.len() - 1);
        assert_eq!(rung, 3, "tried {tried:?}");
        assert_eq!(tried, vec![START, 3, 4]);
    }

    #[test]
    fn a_slow_device_settles_on_little_in_flight() {
        // Like a throttled loop device: 200 MB/s whatever the shape.
        let (rung, tried) = settle(|_| 2.0e8, LADDER.len() - 1);
        assert_eq!(rung, 0, "tried {tried:?}");
        assert_eq!(tried, vec![START, 3, 1, 0]);
    }

    #[test]
    fn a_device_that_peaks_early_steps_down_to_its_knee() {
        // Saturated from 32 MiB in flight on.
        let rates = [1.0e9, 2.0e9, 2.02e9, 2.0e9, 1.98e9, 1.9e9];
        let (rung, _) = settle(|r| rates[r], LADDER.len() - 1);
        assert_eq!(rung, 1);
    }

    #[test]
    fn the_memory_bound_caps_the_ladder() {
        let rates = [1.0e9, 2.0e9, 3.0e9, 4.0e9, 5.0e9, 6.0e9];
        let top = top_within(100 << 20);
        assert_eq!(top, 2, "64 MiB is the most in flight under 100 MiB");
        let (rung, tried) = settle(|r| rates[r], top);
        assert_eq!(rung, 2);
        assert!(tried.iter().all(|&r| r <= top), "tried {tried:?}");
        assert_eq!(next_rung(&[None; 6], 0), (0, false));
    }
}

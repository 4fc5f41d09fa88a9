//! The simulator's network model and random numbers, shared by every
//! simulation so that all of them see the same WAN (parameters in
//! [`crate::sim::OverlaySimOpts`]' module docs): zones at random points of
//! the unit square, `10 ms + 140 ms * d / sqrt(2)` one-way between zones,
//! an access delay of 0.5..2.5 ms per node on top.

use crate::id::Micros;

pub const MS: Micros = 1_000;

pub(super) use super::overlay::SplitMix;

/// One-way delays between zones (row-major, `zones * zones`).
pub(super) fn zone_delays(zones: usize, rng: &mut SplitMix) -> Vec<Micros> {
    let pts: Vec<(f64, f64)> = (0..zones).map(|_| (rng.unit(), rng.unit())).collect();
    let mut d = vec![0; zones * zones];
    for a in 0..zones {
        for b in 0..zones {
            if a != b {
                let dist = ((pts[a].0 - pts[b].0).powi(2) + (pts[a].1 - pts[b].1).powi(2)).sqrt();
                d[a * zones + b] =
                    10 * MS + (140.0 * MS as f64 * dist / std::f64::consts::SQRT_2) as Micros;
            }
        }
    }
    d
}

/// A node's access delay (µs): uniform in 0.5..2.5 ms.
pub(super) fn access_delay(rng: &mut SplitMix) -> u32 {
    500 + rng.below(2000) as u32
}

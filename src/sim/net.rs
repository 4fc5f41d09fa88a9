//! The simulator's network model and random numbers, shared by every
//! simulation so that all of them see the same WAN (parameters in
//! [`crate::sim::OverlaySimOpts`]' module docs): zones at random points of
//! the unit square, `10 ms + 140 ms * d / sqrt(2)` one-way between zones,
//! an access delay of 0.5..2.5 ms per node on top.

use crate::id::{Micros, NodeId};

pub const MS: Micros = 1_000;

/// SplitMix64: small, fast and seedable; the simulations' only source of
/// randomness.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn id(&mut self) -> NodeId {
        NodeId(((self.next() as u128) << 64) | self.next() as u128)
    }
}

/// One-way delays between zones (row-major, `zones * zones`).
pub fn zone_delays(zones: usize, rng: &mut SplitMix) -> Vec<Micros> {
    let pts: Vec<(f64, f64)> = (0..zones).map(|_| (rng.unit(), rng.unit())).collect();
    let mut d = vec![0; zones * zones];
    for a in 0..zones {
        for b in 0..zones {
            if a != b {
                let dist =
                    ((pts[a].0 - pts[b].0).powi(2) + (pts[a].1 - pts[b].1).powi(2)).sqrt();
                d[a * zones + b] =
                    10 * MS + (140.0 * MS as f64 * dist / std::f64::consts::SQRT_2) as Micros;
            }
        }
    }
    d
}

/// A node's access delay (µs): uniform in 0.5..2.5 ms.
pub fn access_delay(rng: &mut SplitMix) -> u32 {
    500 + rng.below(2000) as u32
}

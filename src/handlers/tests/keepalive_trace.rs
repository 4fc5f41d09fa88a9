//! adaptive-keepalive against fixed keep-alive windows on a synthetic trace
//! in the Azure Functions 2019 format (after the characterisation in
//! Shahrad et al., "Serverless in the Wild"). The generator, the replay in
//! virtual time and the baselines are those of `capy eval keepalive`
//! (`crate::sim::eval::keepalive`); this is a small run of it.

use crate::sim::eval::keepalive::{compare, generated_trace, PolicyResult};

fn run(apps: usize, days: usize, seed: u64) -> Vec<PolicyResult> {
    let trace = match generated_trace(apps, days, seed) {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    match compare(&trace, seed) {
        Ok((r, measured)) => {
            println!("{measured} apps, {days} days, seed {seed}");
            for p in &r {
                println!(
                    "{:<20} cold-start % p50 {:>5.1}  p75 {:>5.1}  p90 {:>5.1}   idle {:>8.0} h",
                    p.policy, p.cold_p50, p.cold_p75, p.cold_p90, p.idle_hours
                );
            }
            r
        }
        Err(e) => panic!("{e}"),
    }
}

/// The claim: below every fixed window up to 120 minutes on p90 cold-start
/// percentage, without idling more than the 120-minute window.
fn check(out: &[PolicyResult]) {
    let find = |n: &str| match out.iter().find(|s| s.policy == n) {
        Some(p) => p,
        None => panic!("{n} missing"),
    };
    let adaptive = find("adaptive-keepalive");
    let fixed120 = find("fixed 120 min");
    for f in out.iter().filter(|s| s.policy.starts_with("fixed")) {
        assert!(
            adaptive.cold_p90 < f.cold_p90,
            "adaptive p90 {:.1}% is not below {} ({:.1}%)",
            adaptive.cold_p90,
            f.policy,
            f.cold_p90
        );
    }
    assert!(
        adaptive.idle_hours <= fixed120.idle_hours,
        "adaptive idles {:.0} h, fixed 120 min {:.0} h",
        adaptive.idle_hours,
        fixed120.idle_hours
    );
}

/// A small run that fits the unoptimised test build.
#[test]
fn adaptive_beats_fixed_keepalive_small_trace() {
    check(&run(40, 6, 7));
}

/// The full comparison: `cargo test --release --lib keepalive_trace -- --ignored --nocapture`
#[test]
#[ignore]
fn adaptive_beats_fixed_keepalive_azure_like_trace() {
    // CAPY_TRACE="apps days seeds" overrides the size, e.g. "100 7 2"
    let spec = std::env::var("CAPY_TRACE").unwrap_or_else(|_| "300 14 3".into());
    let n: Vec<usize> = spec
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let (apps, days, seeds) = (
        n.first().copied().unwrap_or(300),
        n.get(1).copied().unwrap_or(14),
        n.get(2).copied().unwrap_or(3),
    );
    for seed in 1..=seeds as u64 {
        check(&run(apps, days, seed));
    }
}

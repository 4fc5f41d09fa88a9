//! Recovery (paper Fig. 8, overlay part): how long the overlay takes to
//! recover from 1, 2, 4, ... simultaneous node failures.
//!
//! The overlay simulator ([`crate::sim::run_recovery`]) builds an overlay
//! of real [`crate::overlay::Pastry`] cores in the zone latency model, lets
//! every node tick for a warm-up (keep-alive probes, maintenance), then
//! fails nodes at once. From then on a batch of lookups starts every second
//! as real routed messages; a lookup is right when it is delivered at its
//! key's live root within 5 s (a send to a failed node comes back after
//! 2 s and is routed around, as QUIC reports it). Recovered: every live
//! node's leaf set is exactly its true one (checked every 250 ms) and every
//! lookup of every batch is right from then on.
//!
//! Function recovery on a real cluster (the paper's second half of Fig. 8)
//! is [`super::fnrecovery`].

use super::plot::{Mark, Plot, Series};
use super::{Claim, EvalError, EvalOpts, Figure, Report};
use crate::sim::{run_recovery, OverlaySimOpts, RecoveryReport};

const SEC: u64 = 1_000_000;

pub fn run(opts: &EvalOpts) -> Result<Report, EvalError> {
    let (nodes, max_fail, probes) = if opts.quick {
        (500, 64, 1000)
    } else {
        (2000, 256, 4000)
    };
    let sim = OverlaySimOpts {
        nodes,
        seed: opts.seed,
        repair_limit: 120 * SEC,
        ..OverlaySimOpts::default()
    };
    let mut counts = Vec::new();
    let mut f = 1;
    while f <= max_fail {
        counts.push(f);
        f *= 2;
    }
    let reports: Vec<RecoveryReport> = counts
        .iter()
        .map(|&f| {
            run_recovery(
                &OverlaySimOpts {
                    seed: opts.seed.wrapping_mul(1000).wrapping_add(f as u64),
                    ..sim.clone()
                },
                f,
                probes,
                10 * SEC,
                SEC,
            )
        })
        .collect();
    let limit = sim.repair_limit as f64 / SEC as f64;
    let pts = |g: fn(&RecoveryReport) -> Option<f64>| -> Vec<(f64, f64)> {
        reports
            .iter()
            .map(|r| (r.failed as f64, g(r).unwrap_or(limit)))
            .collect()
    };
    let mut p = Plot::new(
        &format!("Overlay recovery after simultaneous failures ({nodes} nodes)"),
        "nodes failed at once (log scale)",
        "time to recover (s, virtual)",
    );
    p.x_log = true;
    p.x_range = Some((0.8, max_fail as f64 * 1.25));
    p.x_ticks = Some(counts.iter().map(|&f| f as f64).collect());
    p.series.push(Series::new(
        "leaf sets exact",
        Mark::LinePoints,
        pts(|r| r.leaf_sets_seconds),
    ));
    p.series.push(Series::new(
        format!("every lookup reaches the right root ({probes} per second)"),
        Mark::LinePoints,
        pts(|r| r.lookups_seconds),
    ));
    p.series.push(Series::new(
        "recovered (both)",
        Mark::LinePoints,
        pts(|r| r.recovered_seconds),
    ));
    let ymax = reports
        .iter()
        .filter_map(|r| r.recovered_seconds)
        .fold(1.0, f64::max);
    p.y_range = Some((0.0, ymax * 1.2));

    let worst = reports.last();
    let mut c = Plot::new(
        &format!(
            "Recovery from {} failures at once, over time",
            worst.map_or(0, |r| r.failed)
        ),
        "time since the failures (s, virtual)",
        "share (%)",
    );
    c.legend_low = true;
    c.y_range = Some((0.0, 101.0));
    if let Some(r) = worst {
        c.series.push(Series::new(
            "live nodes with an exact leaf set",
            Mark::Line,
            r.curve.iter().map(|q| (q[0], 100.0 * q[1])).collect(),
        ));
        c.series.push(Series::new(
            "lookups that reach the right root",
            Mark::Line,
            r.curve.iter().map(|q| (q[0], 100.0 * q[2])).collect(),
        ));
        c.series.push(Series::new(
            "lookups whose first route meets only live hops",
            Mark::Line,
            r.curve.iter().map(|q| (q[0], 100.0 * q[3])).collect(),
        ));
    }

    let all_recovered = reports.iter().all(|r| r.recovered_seconds.is_some());
    let worst_time = reports
        .iter()
        .map(|r| r.recovered_seconds.unwrap_or(f64::INFINITY))
        .fold(0.0, f64::max);
    let claims = vec![
        Claim::new(
            format!("the overlay recovers from up to {max_fail} simultaneous failures"),
            all_recovered,
            reports
                .iter()
                .map(|r| {
                    format!(
                        "{}: {}",
                        r.failed,
                        r.recovered_seconds
                            .map_or("not within the limit".to_string(), |s| format!("{s:.1} s"))
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
        ),
        Claim::new(
            "recovery takes under a minute of virtual time at every failure count",
            worst_time < 60.0,
            format!("slowest {worst_time:.1} s"),
        ),
    ];
    let mut table = String::from(
        "| failed | leaf sets exact (s) | lookups right (s) | recovered (s) | lookups missed | lookup ms before | first batch after |\n|---|---|---|---|---|---|---|\n",
    );
    let o = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    for r in &reports {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} |\n",
            r.failed,
            o(r.leaf_sets_seconds),
            o(r.lookups_seconds),
            o(r.recovered_seconds),
            r.failed_lookups,
            r.lookup_ms_before,
            r.lookup_ms_first_batch
        ));
    }
    let summary = format!(
        "{nodes} Pastry nodes in 20 zones (one-way delays 1..150 ms), keep-alive probes every \
         {:.0} s, a member silent for {:.0} s declared failed; 10 s of ticking before the \
         failures. From the failures on, a batch of {probes} lookups from random live nodes \
         starts every second as real messages (a send to a failed node is reported back \
         after 2 s, and the hop is routed around); a lookup is right when it is delivered at \
         its key's live root within 5 s. Recovered: leaf sets exact and every lookup of every \
         batch right from then on.\n\n\
         **Headline:** after {} simultaneous failures the overlay is whole again in {}.\n\n{table}",
        sim.overlay.probe_interval as f64 / SEC as f64,
        sim.overlay.probe_timeout as f64 / SEC as f64,
        worst.map_or(0, |r| r.failed),
        worst
            .and_then(|r| r.recovered_seconds)
            .map_or("(not within the limit)".to_string(), |s| format!(
                "{s:.1} s of virtual time"
            )),
    );
    Ok(Report {
        name: "recovery",
        title: "Recovery: overlay recovery time after simultaneous failures (Fig. 8)".into(),
        data: serde_json::json!({
            "nodes": nodes,
            "probes": probes,
            "runs": reports,
            "function_recovery": "capy eval fnrecovery (real cluster, podman)",
        }),
        claims,
        figures: vec![
            Figure {
                file: "recovery-overlay.svg".into(),
                caption: "Fig. 8a: time until leaf sets are exact and every lookup succeeds".into(),
                plot: p,
            },
            Figure {
                file: "recovery-curve.svg".into(),
                caption: "Recovery from the largest failure over time".into(),
                plot: c,
            },
        ],
        summary,
    })
}

//! Subscriptions (paper Fig. 5): update latency for 100..6,400
//! subscribers, publish through the Scribe-style multicast tree against
//! polling the key's root at a fixed interval.
//!
//! This is `capy sim subscribe` ([`crate::sim::run_subscribe`]): the
//! node's own Scribe core (`overlay::scribe`) on every node of an overlay
//! of real Pastry cores, in the overlay simulator's WAN model. Only the
//! sizes differ between the quick and the full run; the full run also
//! fails 5 % of the nodes under the largest trees and follows the trees'
//! repair. The JSON's `data` is the simulator's
//! [`crate::sim::SubscribeReport`].

use super::plot::{Mark, Plot, Series};
use super::{Claim, EvalError, EvalOpts, Figure, Report};
use crate::sim::{run_subscribe, Latency, SubscribeSimOpts};

const MS: u64 = 1_000;

/// The paper's medians at 6,400 subscribers (ms): publish, polling.
const PAPER_6400: (f64, f64) = (154.5, 723.8);
/// The goal for the median at 6,400 subscribers (ms).
const GOAL_MS: f64 = 100.0;

pub fn run(opts: &EvalOpts) -> Result<Report, EvalError> {
    let sim = SubscribeSimOpts {
        seed: opts.seed,
        ..if opts.quick {
            SubscribeSimOpts {
                topics: 2,
                publishes: 10,
                fail_fraction: 0.0,
                ..SubscribeSimOpts::default()
            }
        } else {
            SubscribeSimOpts::default()
        }
    };
    let r = run_subscribe(&sim);
    let (first, last) = match (r.rows.first(), r.rows.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => {
            return Err(EvalError::Run(
                "the subscription run measured nothing".into(),
            ))
        }
    };

    // Fig. 5: latency against subscribers, tree and polling.
    let mut p = Plot::new(
        &format!(
            "Update latency: publish through the tree vs polling every {:.0} s ({} nodes)",
            r.poll_interval_ms / 1000.0,
            r.nodes
        ),
        "subscribers (log scale)",
        "update latency (ms, from the update at the key's root)",
    );
    p.x_log = true;
    p.x_range = Some((80.0, 8000.0));
    p.x_ticks = Some(r.rows.iter().map(|x| x.subscribers as f64).collect());
    let ymax = r
        .rows
        .iter()
        .map(|x| x.polling.p99_ms.max(x.publish.p99_ms))
        .fold(0.0, f64::max);
    p.y_range = Some((0.0, ymax * 1.6));
    let line = |label: &str, mark: Mark, f: fn(&Latency) -> f64, tree: bool, c: usize| {
        Series::new(
            label,
            mark,
            r.rows
                .iter()
                .map(|x| {
                    let l = if tree { &x.publish } else { &x.polling };
                    (x.subscribers as f64, f(l))
                })
                .collect(),
        )
        .colour(c)
    };
    p.series
        .push(line("polling: p99", Mark::Line, |l| l.p99_ms, false, 1));
    p.series
        .push(line("polling: p90", Mark::Dashed, |l| l.p90_ms, false, 1));
    p.series.push(line(
        "polling: median",
        Mark::LinePoints,
        |l| l.median_ms,
        false,
        1,
    ));
    p.series
        .push(line("tree (capy): p99", Mark::Line, |l| l.p99_ms, true, 0));
    p.series.push(line(
        "tree (capy): p90",
        Mark::Dashed,
        |l| l.p90_ms,
        true,
        0,
    ));
    p.series.push(line(
        "tree (capy): median",
        Mark::LinePoints,
        |l| l.median_ms,
        true,
        0,
    ));

    // Why the tree stays flat: its depth follows log16 of the fleet.
    let log16 = (r.nodes as f64).ln() / 16f64.ln();
    let mut d = Plot::new(
        &format!("Tree depth against subscribers ({} nodes)", r.nodes),
        "subscribers (log scale)",
        "hops from the root to a subscriber",
    );
    d.x_log = true;
    d.x_range = Some((80.0, 8000.0));
    d.x_ticks = p.x_ticks.clone();
    d.y_range = Some((0.0, log16.ceil() + 2.0));
    d.series.push(
        Series::new(
            "deepest subscriber",
            Mark::LinePoints,
            r.rows
                .iter()
                .map(|x| (x.subscribers as f64, x.tree_depth_max as f64))
                .collect(),
        )
        .colour(1),
    );
    d.series.push(
        Series::new(
            "mean over deliveries",
            Mark::LinePoints,
            r.rows
                .iter()
                .map(|x| (x.subscribers as f64, x.tree_depth_mean))
                .collect(),
        )
        .colour(0),
    );
    d.series.push(
        Series::new(
            format!("log16(nodes) = {log16:.2} (Pastry's route length)"),
            Mark::Dashed,
            r.rows
                .iter()
                .map(|x| (x.subscribers as f64, log16))
                .collect(),
        )
        .colour(6),
    );

    let beats = r.rows.iter().all(|x| {
        x.publish.median_ms < x.polling.median_ms
            && x.publish.p90_ms < x.polling.p90_ms
            && x.publish.p99_ms < x.polling.p99_ms
    });
    let growth = last.publish.median_ms / first.publish.median_ms.max(1e-9);
    let size_ratio = last.subscribers as f64 / first.subscribers.max(1) as f64;
    let depth_max = r.rows.iter().map(|x| x.tree_depth_max).max().unwrap_or(0);
    let depth_bound = log16.ceil() as u8 + 1;
    let reach = r.rows.iter().map(|x| x.delivered_ratio).fold(1.0, f64::min);
    let mut claims = vec![
        Claim::new(
            "publishing through the tree beats polling at every subscriber count (median, p90 and p99)",
            beats,
            r.rows
                .iter()
                .map(|x| {
                    format!(
                        "{}: {:.0} vs {:.0} ms",
                        x.subscribers, x.publish.median_ms, x.polling.median_ms
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
        ),
        Claim::new(
            "tree latency grows like the tree's depth (log of the fleet), not with the subscriber count",
            growth < 2.0 && depth_max <= depth_bound,
            format!(
                "{size_ratio:.0}x the subscribers: median x{growth:.2} ({:.1} -> {:.1} ms); \
                 deepest subscriber {depth_max} hops (bound ceil(log16 {})+1 = {depth_bound})",
                first.publish.median_ms, last.publish.median_ms, r.nodes
            ),
        ),
        Claim::new(
            format!(
                "median update latency at {} subscribers <= {GOAL_MS:.0} ms (paper: {} ms publish vs {} ms polling)",
                last.subscribers, PAPER_6400.0, PAPER_6400.1
            ),
            last.publish.median_ms <= GOAL_MS,
            format!(
                "{:.1} ms through the tree, {:.1} ms polling",
                last.publish.median_ms, last.polling.median_ms
            ),
        ),
        Claim::new(
            "every subscriber receives every publication",
            reach >= 0.999,
            format!("lowest delivered share {:.3} %", reach * 100.0),
        ),
    ];
    let mut figures = vec![
        Figure {
            file: "subscriptions-latency.svg".into(),
            caption: "Fig. 5: update latency (median, p90, p99) against subscribers, publish \
                      through the tree vs polling"
                .into(),
            plot: p,
        },
        Figure {
            file: "subscriptions-depth.svg".into(),
            caption: "Tree depth against subscribers: bounded by the overlay's route length".into(),
            plot: d,
        },
    ];
    let mut repair_text = String::new();
    if let Some(rep) = &r.repair {
        let mut c = Plot::new(
            &format!(
                "Trees after {} of {} nodes fail at once ({} subscribers)",
                rep.failed_nodes, r.nodes, last.subscribers
            ),
            "time since the failures (s, virtual)",
            "live subscribers a probe publication reaches (%)",
        );
        c.legend_low = true;
        let low = rep
            .reach_curve
            .iter()
            .map(|q| 100.0 * q[1])
            .fold(100.0, f64::min);
        c.y_range = Some(((low - 5.0).floor().max(0.0), 100.5));
        c.series.push(
            Series::new(
                "probe publications (every 500 ms)",
                Mark::LinePoints,
                rep.reach_curve
                    .iter()
                    .map(|q| (q[0], 100.0 * q[1]))
                    .collect(),
            )
            .colour(0),
        );
        if let Some(o) = rep.overlay_repair_s {
            c.series.push(
                Series::new(
                    format!("overlay leaf sets exact again ({o:.1} s)"),
                    Mark::Dashed,
                    vec![(o, (low - 5.0).floor().max(0.0)), (o, 100.5)],
                )
                .colour(6),
            );
        }
        claims.push(Claim::new(
            format!(
                "trees repair after {} % of the nodes fail at once: probes reach >= 99.9 % of live subscribers within 30 s",
                (sim.fail_fraction * 100.0).round()
            ),
            rep.repaired_after_s.is_some_and(|s| s <= 30.0),
            format!(
                "{} cut off, first probe {:.1} %, >= 99.9 % from {}",
                rep.cut_off,
                rep.first_probe_reach * 100.0,
                rep.repaired_after_s
                    .map_or("never".to_string(), |s| format!("{s:.1} s on"))
            ),
        ));
        repair_text = format!(
            "\n\nThen {} nodes ({:.0} %, never a root) fail at once under the {}-subscriber \
             trees: {} of {} live subscribers are cut off, the first probe reaches {:.1} % \
             of them, every probe reaches >= 99.9 % from {} on (overlay leaf sets exact at \
             {}), {} of {} deliveries after that were missed, and the last 5 s reach \
             {:.3} %.",
            rep.failed_nodes,
            sim.fail_fraction * 100.0,
            last.subscribers,
            rep.cut_off,
            rep.subscribers,
            rep.first_probe_reach * 100.0,
            rep.repaired_after_s
                .map_or("never".to_string(), |s| format!("{s:.1} s")),
            rep.overlay_repair_s
                .map_or("-".to_string(), |s| format!("{s:.1} s")),
            rep.missed_after_repair,
            rep.deliveries_after_repair,
            rep.final_reach * 100.0,
        );
        figures.push(Figure {
            file: "subscriptions-repair.svg".into(),
            caption: "Tree repair: share of live subscribers each probe publication reaches \
                      after the failures"
                .into(),
            plot: c,
        });
    }
    let mut table = String::from(
        "| subscribers | tree p50 / p90 / p99 (ms) | polling p50 / p90 / p99 (ms) | depth mean / max | messages per publication |\n|---|---|---|---|---|\n",
    );
    for x in &r.rows {
        table.push_str(&format!(
            "| {} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | {:.2} / {} | {:.0} |\n",
            x.subscribers,
            x.publish.median_ms,
            x.publish.p90_ms,
            x.publish.p99_ms,
            x.polling.median_ms,
            x.polling.p90_ms,
            x.polling.p99_ms,
            x.tree_depth_mean,
            x.tree_depth_max,
            x.messages_per_publish,
        ));
    }
    let summary = format!(
        "`capy sim subscribe` on {} Pastry nodes, WAN model: {}. For each subscriber count, \
         {} random keys; the subscribers join each key's tree through the node's Scribe \
         core (Subscribe routed hop by hop), then the key's root publishes {} updates \
         {} ms apart. Latency runs from the publication at the root to its delivery at each \
         subscriber. The baseline polls the root every {:.0} ms (random phase; request \
         routed through the overlay, answer sent straight back): latency from the update \
         until the answer of the first poll that reaches the root after it.\n\n\
         **Headline:** at {} subscribers the median update latency is {:.1} ms through the \
         tree against {:.1} ms polling (paper: {} vs {} ms; goal <= {GOAL_MS:.0} ms); \
         p99 {:.1} vs {:.1} ms.{repair_text}\n\n{table}",
        r.nodes,
        r.wan,
        r.topics,
        r.publishes,
        sim.publish_every / MS,
        r.poll_interval_ms,
        last.subscribers,
        last.publish.median_ms,
        last.polling.median_ms,
        PAPER_6400.0,
        PAPER_6400.1,
        last.publish.p99_ms,
        last.polling.p99_ms,
    );
    let data = serde_json::to_value(&r)
        .map_err(|e| EvalError::Run(format!("cannot encode the subscription report: {e}")))?;
    Ok(Report {
        name: "subscriptions",
        title: "Subscriptions: update latency, publish through the tree vs polling (Fig. 5)".into(),
        data,
        claims,
        figures,
        summary,
    })
}

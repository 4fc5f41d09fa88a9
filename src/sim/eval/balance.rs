//! Load balance (paper Fig. 7): the request load each node serves,
//! relative to its capacity, before and after the vnode game, on a fleet of
//! four board classes (Pi 3 on SD card to x86 with NVMe).
//!
//! Runs the game's simulator ([`crate::game::run_game_sim`]: the real
//! [`crate::game::GameNode`] players, their messages and vnode changes).
//! A node's request load is the share of the key ring its vnodes are root
//! of, which is the share of requests it serves when requests spread over
//! keys uniformly; it is shown per unit of the node's capacity, over the
//! fleet's mean (1 = its fair share).

use super::plot::{cdf, Bars, Mark, Plot, Series};
use super::{mean, quantile, Claim, EvalError, EvalOpts, Figure, Report};
use crate::game::{run_game_sim, GameSimOpts};

pub fn run(opts: &EvalOpts) -> Result<Report, EvalError> {
    let g = GameSimOpts {
        nodes: if opts.quick { 300 } else { 1000 },
        seed: opts.seed,
        epochs: if opts.quick { 6 } else { 10 },
        ..GameSimOpts::default()
    };
    let r = run_game_sim(&g);
    if r.per_node.is_empty() {
        return Err(EvalError::Run(
            "the game simulation returned no nodes".into(),
        ));
    }
    let col = |f: fn(&crate::game::sim::NodeLoad) -> f64| -> Vec<f64> {
        r.per_node.iter().map(f).filter(|x| x.is_finite()).collect()
    };
    let before = col(|n| n.before);
    let game_only = col(|n| n.game_only);
    let after = col(|n| n.after);
    let stats = |v: &[f64]| {
        serde_json::json!({
            "max": v.iter().copied().fold(0.0, f64::max),
            "p99": quantile(v, 0.99),
            "p90": quantile(v, 0.90),
            "p50": quantile(v, 0.50),
            "min": v.iter().copied().fold(f64::INFINITY, f64::min),
            "mean_abs_dev": mean(&v.iter().map(|x| (x - 1.0).abs()).collect::<Vec<_>>()),
        })
    };
    let spread = |v: &[f64]| quantile(v, 0.99) / quantile(v, 0.01).max(1e-9);

    let mut c = Plot::new(
        "Request load per node, relative to its capacity (CDF)",
        "load / capacity, over the fleet's mean (1 = fair share; log scale)",
        "nodes (%)",
    );
    c.x_log = true;
    c.legend_low = true;
    c.y_range = Some((0.0, 100.0));
    c.series
        .push(Series::new("one vnode per node", Mark::Step, cdf(&before)));
    c.series.push(Series::new(
        "after the game (no load feedback)",
        Mark::Step,
        cdf(&game_only),
    ));
    c.series.push(Series::new(
        format!("after the game and {} load epochs", g.epochs),
        Mark::Step,
        cdf(&after),
    ));
    c.series.push(Series::new(
        "fair share",
        Mark::Dashed,
        vec![(1.0, 0.0), (1.0, 100.0)],
    ));

    let classes: Vec<String> = r.classes.iter().map(|c| c.class.clone()).collect();
    let by_class = |f: &dyn Fn(&crate::game::sim::NodeLoad) -> f64, agg: &dyn Fn(&[f64]) -> f64| {
        classes
            .iter()
            .map(|cl| {
                let v: Vec<f64> = r
                    .per_node
                    .iter()
                    .filter(|n| &n.class == cl)
                    .map(f)
                    .filter(|x| x.is_finite())
                    .collect();
                agg(&v)
            })
            .collect::<Vec<f64>>()
    };
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let mut b = Plot::new(
        "Worst node's load per board class",
        "board class (capacity grows to the right)",
        "max load / capacity, over the fleet's mean",
    );
    b.bars = Some(Bars {
        categories: classes.clone(),
        series: vec![
            ("one vnode per node".into(), by_class(&|n| n.before, &max)),
            ("after the game".into(), by_class(&|n| n.after, &max)),
        ],
    });
    let mut v = Plot::new(
        "Vnodes per node after the game, by board class",
        "board class (capacity grows to the right)",
        "vnodes (mean over the class's nodes)",
    );
    v.bars = Some(Bars {
        categories: classes.clone(),
        series: vec![(
            "mean vnodes".into(),
            r.classes.iter().map(|c| c.mean_vnodes).collect(),
        )],
    });

    let means: Vec<f64> = r.classes.iter().map(|c| c.mean_vnodes).collect();
    let claims = vec![
        Claim::new(
            "the game lowers the worst node's load relative to capacity",
            r.imbalance_after < r.imbalance_before,
            format!(
                "max load/capacity over mean {:.2} (one vnode each) -> {:.2} (game only) -> {:.2} (with load feedback)",
                r.imbalance_before, r.imbalance_game_only, r.imbalance_after
            ),
        ),
        Claim::new(
            "load follows capacity: the p99/p1 spread of load per capacity narrows",
            spread(&after) < spread(&before),
            format!(
                "p99/p1 {:.1} -> {:.2}",
                spread(&before),
                spread(&after)
            ),
        ),
        Claim::new(
            "stronger boards run more vnodes",
            means.windows(2).all(|w| w[0] < w[1]),
            format!(
                "mean vnodes by class: {}",
                r.classes
                    .iter()
                    .map(|c| format!("{} {:.1}", c.class, c.mean_vnodes))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    ];
    let summary = format!(
        "The vnode game's simulator on {} nodes in 4 zones, board mix per zone \
         (Pi 3/SD, Pi 4/SSD, RK3588/NVMe, x86/NVMe; capacities {}), seed {}: \
         a cold start of {} rounds, then {} load epochs of {} rounds in which each node \
         measures its key share and adjusts its load factor. \
         Equilibrium reached in {} rounds.\n\n\
         **Headline:** the worst node's load per unit of capacity falls from {:.2}x its fair \
         share with one vnode per node to {:.2}x after the game ({:.2}x with the game alone); \
         {} vnodes in all.",
        r.nodes,
        r.classes
            .iter()
            .map(|c| format!("{:.2}", c.capacity))
            .collect::<Vec<_>>()
            .join(", "),
        r.seed,
        g.rounds,
        g.epochs,
        g.epoch_rounds,
        r.rounds_to_converge
            .map_or("(not within the cold start)".to_string(), |x| x.to_string()),
        r.imbalance_before,
        r.imbalance_after,
        r.imbalance_game_only,
        r.vnodes_total
    );
    let data = serde_json::json!({
        "nodes": r.nodes,
        "imbalance_before": r.imbalance_before,
        "imbalance_game_only": r.imbalance_game_only,
        "imbalance_after": r.imbalance_after,
        "load_before": stats(&before),
        "load_game_only": stats(&game_only),
        "load_after": stats(&after),
        "classes": r.classes,
        "zones": r.zones,
        "epochs": r.epochs,
        "rounds_to_converge": r.rounds_to_converge,
        "vnodes_total": r.vnodes_total,
    });
    Ok(Report {
        name: "balance",
        title: "Load balance: request load per node before and after the vnode game (Fig. 7)"
            .into(),
        data,
        claims,
        figures: vec![
            Figure {
                file: "balance-load-cdf.svg".into(),
                caption: "Fig. 7a: CDF over nodes of request load per unit of capacity".into(),
                plot: c,
            },
            Figure {
                file: "balance-by-class.svg".into(),
                caption: "Fig. 7b: the most loaded node of each board class, before and after"
                    .into(),
                plot: b,
            },
            Figure {
                file: "balance-vnodes.svg".into(),
                caption: "Vnodes per node after the game follow board capacity".into(),
                plot: v,
            },
        ],
        summary,
    })
}

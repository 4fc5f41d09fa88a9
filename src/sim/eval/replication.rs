//! Smart replication (paper Fig. 6): how many copies of a key the shipped
//! `smart-replication` Lua policy keeps as its read rate changes, and how
//! the copies of many apps spread over a fleet.
//!
//! The policy runs in the handler engine ([`AppRuntime`], virtual-time
//! host whose leaf set is the key's replica set); the copies are made by the
//! replication cores of a simulated fleet ([`crate::sim::store::StoreSim`]).
//! Effects map as the node does it: `createCb`'s result is written with
//! k = 1 + the copies it asked for, and `sys.set_replicas(key, n)` makes
//! the root rewrite the key with k = n; the store's anti-entropy then adds
//! the missing copies and hands off the surplus. A replica count is the
//! number of nodes that hold a live copy, counted in the store.

use super::plot::{Bars, Mark, Plot, Series};
use super::{mean, Claim, EvalError, EvalOpts, Figure, Report};
use crate::handlers::{
    AppKey, AppRuntime, CallCtx, Effect, Event, HandlerSource, MemHost, SysHost,
    DEFAULT_TIMER_INTERVAL,
};
use crate::id::{Micros, NodeId};
use crate::sim::net::MS;
use crate::sim::store::{StoreSim, StoreSimOpts};
use futures_lite::future::block_on;
use std::sync::Arc;

const SEC: Micros = 1_000_000;
const MINUTE: Micros = 60 * SEC;
const APP: &str = "rep";

/// The policy and the fleet, for a set of keys.
struct Harness {
    rt: AppRuntime,
    s: StoreSim,
    value: serde_json::Value,
    /// Per key: the count the policy asked for last.
    wanted: Vec<u32>,
    keys: Vec<AppKey>,
}

impl Harness {
    fn new(nodes: usize, seed: u64, keys: usize) -> Result<Harness, String> {
        let rt = AppRuntime::new(
            APP,
            &HandlerSource::Policy("smart-replication".into()),
            super::keepalive::replay_limits(),
        )
        .map_err(|e| e.to_string())?;
        let mut s = StoreSim::new(&StoreSimOpts {
            nodes,
            seed,
            tick_every: 250 * MS,
            ..StoreSimOpts::default()
        });
        s.start_ticks();
        Ok(Harness {
            rt,
            s,
            value: serde_json::json!({"reading": 21.5, "unit": "C"}),
            wanted: vec![0; keys],
            keys: (0..keys)
                .map(|i| AppKey::new(APP, format!("k{i}")))
                .collect(),
        })
    }

    /// The virtual-time host of a call on key `i`: the root's id, the
    /// replica set after it as the leaf set.
    fn host(&self, i: usize) -> Arc<MemHost> {
        let k = &self.keys[i];
        let set = self.s.placement(NodeId::for_key(&k.app, &k.name), 9);
        let mut h = MemHost::new(set.first().map_or(NodeId(0), |x| x.id));
        h.leaves = set.iter().skip(1).map(|x| x.id).collect();
        h.set_now(self.s.now);
        Arc::new(h)
    }

    fn call(&mut self, i: usize, ev: Event) -> Result<Vec<Effect>, String> {
        let host: Arc<dyn SysHost> = self.host(i);
        let ctx = CallCtx::new(self.keys[i].clone(), "client").with_data(Some(self.value.clone()));
        block_on(self.rt.call(ev, ctx, host))
            .map(|o| o.effects)
            .map_err(|e| format!("smart-replication: {e}"))
    }

    fn write(&mut self, i: usize, k: u32) {
        let key = self.keys[i].clone();
        let root = self.s.root(NodeId::for_key(&key.app, &key.name));
        let v = self.value.to_string().into_bytes();
        self.s
            .put(root, &key.app, &key.name, v, k.clamp(1, 16) as u8);
        self.wanted[i] = k;
    }

    fn create(&mut self, i: usize) -> Result<(), String> {
        let eff = self.call(i, Event::Create)?;
        let copies = eff
            .iter()
            .filter(|e| matches!(e, Effect::Write { node: Some(_), .. }))
            .count() as u32;
        self.write(i, 1 + copies);
        Ok(())
    }

    fn read(&mut self, i: usize) -> Result<(), String> {
        self.call(
            i,
            Event::Read {
                args: serde_json::Value::Null,
            },
        )
        .map(|_| ())
    }

    fn timer(&mut self, i: usize) -> Result<(), String> {
        for e in self.call(i, Event::Timer)? {
            if let Effect::SetReplicas { n, .. } = e {
                self.write(i, n);
            }
        }
        Ok(())
    }

    fn holders(&self, i: usize) -> Vec<usize> {
        self.s.holders(APP, &self.keys[i].name)
    }
}

/// Poisson count with mean `m` (inversion for small means, normal beyond).
fn poisson(s: &mut StoreSim, m: f64) -> u64 {
    if m > 50.0 {
        let u1 = (s.below(1 << 30) as f64 + 0.5) / (1u64 << 30) as f64;
        let u2 = (s.below(1 << 30) as f64 + 0.5) / (1u64 << 30) as f64;
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        return (m + z * m.sqrt()).round().max(0.0) as u64;
    }
    let l = (-m).exp();
    let (mut k, mut p) = (0u64, 1.0);
    loop {
        p *= (s.below(1 << 30) as f64 + 0.5) / (1u64 << 30) as f64;
        if p <= l {
            return k;
        }
        k += 1;
    }
}

/// Reads per second of the single-key run, by minute.
fn rate_at(minute: u64) -> f64 {
    match minute {
        0..=9 => 0.2,
        10..=19 => 3.0,
        20..=24 => 15.0,
        _ => 0.5,
    }
}

struct Timeline {
    /// (minute, reads/s, wanted, holders)
    points: Vec<(f64, f64, u32, usize)>,
}

fn one_key(nodes: usize, seed: u64, minutes: u64) -> Result<Timeline, String> {
    let mut h = Harness::new(nodes, seed, 1)?;
    h.create(0)?;
    let tick = DEFAULT_TIMER_INTERVAL.as_micros() as Micros;
    let start = h.s.now;
    let mut points = Vec::new();
    let step = 10 * SEC;
    let mut next_timer = start + tick;
    let mut t = start;
    while t < start + minutes * MINUTE {
        let minute = (t - start) / MINUTE;
        let r = rate_at(minute);
        let n = poisson(&mut h.s, r * step as f64 / SEC as f64);
        for _ in 0..n {
            h.read(0)?;
        }
        t += step;
        h.s.run(t);
        if t >= next_timer {
            h.timer(0)?;
            next_timer += tick;
        }
        points.push((
            (t - start) as f64 / MINUTE as f64,
            r,
            h.wanted[0],
            h.holders(0).len(),
        ));
    }
    Ok(Timeline { points })
}

struct Fleet {
    /// Per app: reads/s, replicas held at the end.
    apps: Vec<(f64, usize)>,
    /// Copies held per node.
    per_node: Vec<usize>,
    /// Distinct zones holding each app's copies.
    zones_per_app: Vec<usize>,
    nodes: usize,
    zones: usize,
}

fn fleet(nodes: usize, apps: usize, minutes: u64, seed: u64) -> Result<Fleet, String> {
    let mut h = Harness::new(nodes, seed, apps)?;
    for i in 0..apps {
        h.create(i)?;
    }
    let settle = h.s.now + 5 * SEC;
    h.s.run(settle);
    // Zipf(1) popularity: the most read app at 20 reads/s.
    let rates: Vec<f64> = (0..apps).map(|i| 20.0 / (i + 1) as f64).collect();
    for _ in 0..minutes {
        for (i, r) in rates.iter().enumerate() {
            let n = poisson(&mut h.s, r * 60.0);
            for _ in 0..n {
                h.read(i)?;
            }
        }
        let until = h.s.now + MINUTE;
        h.s.run(until);
        for i in 0..apps {
            h.timer(i)?;
        }
    }
    // Let the store carry out the last changes.
    let until = h.s.now + 20 * SEC;
    h.s.run(until);
    let mut per_node = vec![0usize; nodes];
    let mut out = Vec::new();
    let mut zones_per_app = Vec::new();
    for (i, r) in rates.iter().enumerate() {
        let hs = h.holders(i);
        for &n in &hs {
            per_node[n] += 1;
        }
        let mut z: Vec<usize> = hs.iter().map(|&n| h.s.nodes[n].zone).collect();
        z.sort_unstable();
        z.dedup();
        zones_per_app.push(z.len());
        out.push((*r, hs.len()));
    }
    Ok(Fleet {
        apps: out,
        per_node,
        zones_per_app,
        nodes,
        zones: h.s.zones,
    })
}

pub fn run(opts: &EvalOpts) -> Result<Report, EvalError> {
    let (nodes_a, nodes_b, apps, minutes_b) = if opts.quick {
        (100, 400, 120, 6)
    } else {
        (200, 400, 400, 10)
    };
    let tl = one_key(nodes_a, opts.seed, 40).map_err(EvalError::Run)?;
    let fl = fleet(nodes_b, apps, minutes_b, opts.seed).map_err(EvalError::Run)?;

    let mut a = Plot::new(
        "Replicas of one key as its read rate changes",
        "time (minutes, virtual)",
        "replicas (copies) / reads per second",
    );
    a.series.push(Series::new(
        "copies held in the store",
        Mark::Line,
        tl.points.iter().map(|p| (p.0, p.3 as f64)).collect(),
    ));
    a.series.push(Series::new(
        "count the policy asked for",
        Mark::Dashed,
        tl.points.iter().map(|p| (p.0, f64::from(p.2))).collect(),
    ));
    a.series.push(Series::new(
        "read rate (reads/s)",
        Mark::Line,
        tl.points.iter().map(|p| (p.0, p.1)).collect(),
    ));
    a.y_range = Some((0.0, 16.0));

    let mut b = Plot::new(
        &format!(
            "Replicas per app by popularity ({} apps, {} nodes)",
            apps, fl.nodes
        ),
        "reads per second of the app (log scale)",
        "replicas held at the end",
    );
    b.x_log = true;
    b.legend_low = true;
    b.series.push(Series::new(
        "apps",
        Mark::Points,
        fl.apps.iter().map(|(r, n)| (*r, *n as f64)).collect(),
    ));
    b.y_range = Some((0.0, 9.0));

    let max_copies = fl.per_node.iter().copied().max().unwrap_or(0);
    let mut hist = vec![0.0; max_copies + 1];
    for &c in &fl.per_node {
        hist[c] += 1.0;
    }
    let mut c = Plot::new(
        &format!(
            "Copies held per node ({} nodes in {} zones)",
            fl.nodes, fl.zones
        ),
        "copies a node holds",
        "nodes",
    );
    c.bars = Some(Bars {
        categories: (0..=max_copies).map(|i| i.to_string()).collect(),
        series: vec![("nodes".into(), hist.clone())],
    });

    // Claims
    let peak = tl
        .points
        .iter()
        .filter(|p| p.0 > 20.0 && p.0 <= 26.0)
        .map(|p| p.3)
        .max()
        .unwrap_or(0);
    let low = tl
        .points
        .iter()
        .filter(|p| p.0 > 5.0 && p.0 <= 10.0)
        .map(|p| p.3)
        .max()
        .unwrap_or(0);
    let end = tl.points.last().map_or(0, |p| p.3);
    let end_wanted = tl.points.last().map_or(0, |p| p.2);
    let top: Vec<f64> = fl.apps.iter().take(apps / 10).map(|x| x.1 as f64).collect();
    let bottom: Vec<f64> = fl.apps.iter().skip(apps / 2).map(|x| x.1 as f64).collect();
    let zone_share = fl.zones_per_app.iter().sum::<usize>() as f64
        / fl.apps.iter().map(|a| a.1).sum::<usize>().max(1) as f64;
    let mean_copies = mean(&fl.per_node.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let claims = vec![
        Claim::new(
            "replicas follow the read rate up and back down",
            peak > low && end < peak && end as u32 == end_wanted,
            format!(
                "{low} copies at 0.2 reads/s, {peak} at 15 reads/s, {end} after the rate fell (policy: {end_wanted})"
            ),
        ),
        Claim::new(
            "popular apps get more replicas than unpopular ones",
            mean(&top) > mean(&bottom),
            format!(
                "mean replicas: top 10 % of apps {:.2}, bottom half {:.2}",
                mean(&top),
                mean(&bottom)
            ),
        ),
        Claim::new(
            "an app's copies sit in different zones (on average at least 90 % of them)",
            zone_share >= 0.9,
            format!(
                "{:.0} % of copies in distinct zones; max {max_copies} copies on one node, mean {mean_copies:.2}",
                100.0 * zone_share
            ),
        ),
    ];
    let zones_mean = mean(
        &fl.zones_per_app
            .iter()
            .map(|&x| x as f64)
            .collect::<Vec<_>>(),
    );
    let summary = format!(
        "Part 1: one key on {nodes_a} nodes, reads at 0.2/s for 10 min, 3/s for 10 min, 15/s \
         for 5 min, then 0.5/s; `timerCb` every minute. Part 2: {apps} apps on {} nodes in {} \
         zones with Zipf popularity (the most read at 20 reads/s), {minutes_b} minutes.\n\n\
         **Headline:** one key's copies rise from {low} to {peak} under load and fall back to \
         {end}; across apps, the most read tenth keep {:.1} replicas on average against {:.1} \
         for the less read half; each app's copies sit in {zones_mean:.1} zones on average.",
        fl.nodes,
        fl.zones,
        mean(&top),
        mean(&bottom),
    );
    Ok(Report {
        name: "replication",
        title: "Smart replication: replicas follow reads (Fig. 6)".into(),
        data: serde_json::json!({
            "timeline": tl.points.iter().map(|p| serde_json::json!({"minute": p.0, "reads_per_s": p.1, "wanted": p.2, "held": p.3})).collect::<Vec<_>>(),
            "fleet": {
                "nodes": fl.nodes,
                "zones": fl.zones,
                "apps": fl.apps.iter().zip(&fl.zones_per_app).map(|((r, n), z)| serde_json::json!({"reads_per_s": r, "replicas": n, "zones": z})).collect::<Vec<_>>(),
                "copies_per_node_histogram": hist,
            },
        }),
        claims,
        figures: vec![
            Figure {
                file: "replication-timeline.svg".into(),
                caption: "Fig. 6a: copies of one key over time under a changing read rate".into(),
                plot: a,
            },
            Figure {
                file: "replication-by-popularity.svg".into(),
                caption: "Fig. 6b: replicas per app against its read rate".into(),
                plot: b,
            },
            Figure {
                file: "replication-per-node.svg".into(),
                caption: "How the copies of all apps spread over the nodes".into(),
                plot: c,
            },
        ],
        summary,
    })
}

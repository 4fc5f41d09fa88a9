//! Data locality (paper Fig. 3): function invocation latency when the
//! function runs where its data is (capy: code, image and data share the
//! function's key, so the key's root holds a replica) against a greedy
//! bin-packing placement that ignores data (the OpenWhisk/Lambda-like
//! baseline: first fit of each function's memory into the nodes in a fixed
//! order, largest functions first).
//!
//! Both run on the same simulated fleet ([`crate::sim::store::StoreSim`]:
//! real replication cores, zone latency model, 100 Mbit/s within a zone and
//! 20 Mbit/s between zones). The function's data is written with k = 3.
//! An invocation comes from a client at a random node of a random zone (its
//! gateway): the request (1 KB) goes to the executing node, which reads the
//! data through its replication core (a store read routed to the key's
//! root, answered from the root's copy), runs for 10 ms and sends a 1 KB
//! answer back. The read is timed in the simulator; the request and answer
//! legs use the same delay model. Invocations run one at a time (no
//! queueing) and warm (no container start).

use super::plot::{cdf, Mark, Plot, Series};
use super::{quantile, Claim, EvalError, EvalOpts, Figure, Report};
use crate::id::{Micros, NodeId};
use crate::sim::net::MS;
use crate::sim::store::{StoreSim, StoreSimOpts};
use crate::store::replica::Outcome;

const BUCKET: &str = "fn";
const EXEC: Micros = 10 * MS;
const MSG: usize = 1024;

/// Per data size: latencies (ms) of every invocation, capy and baseline.
struct SizeRun {
    size: usize,
    capy: Vec<f64>,
    packed: Vec<f64>,
    /// Share of baseline invocations whose executor happened to hold a copy.
    packed_local: f64,
}

fn one_size(
    nodes: usize,
    funcs: usize,
    calls: usize,
    size: usize,
    seed: u64,
) -> Result<SizeRun, String> {
    let mut s = StoreSim::new(&StoreSimOpts {
        nodes,
        seed,
        ..StoreSimOpts::default()
    });
    s.start_ticks();
    // The functions' data, written through random nodes.
    for f in 0..funcs {
        let at = s.below(nodes);
        let value: Vec<u8> = (0..size).map(|i| (i + f) as u8).collect();
        let req = s.put(at, BUCKET, &format!("f{f}"), value, 3);
        match s.wait(req, 30_000 * MS) {
            Some((_, Outcome::Put(Ok(_)))) => {}
            other => return Err(format!("writing the data of f{f} failed: {other:?}")),
        }
    }
    // Greedy first-fit decreasing by memory, ignoring data.
    let caps = [1024u32, 2048, 4096, 8192];
    let mut free: Vec<u32> = (0..nodes).map(|_| caps[s.below(caps.len())]).collect();
    let mut demand: Vec<(u32, usize)> = (0..funcs)
        .map(|f| ([128u32, 256, 512][s.below(3)], f))
        .collect();
    demand.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut packed = vec![0usize; funcs];
    for (mem, f) in demand {
        let n = (0..nodes).find(|&n| free[n] >= mem).unwrap_or(f % nodes);
        free[n] = free[n].saturating_sub(mem);
        packed[f] = n;
    }
    let by_zone: Vec<Vec<usize>> = (0..s.zones)
        .map(|z| (0..nodes).filter(|&n| s.nodes[n].zone == z).collect())
        .collect();
    let mut out = SizeRun {
        size,
        capy: Vec::new(),
        packed: Vec::new(),
        packed_local: 0.0,
    };
    let mut local = 0;
    for _ in 0..calls {
        let f = s.below(funcs);
        let key = format!("f{f}");
        let zone = loop {
            let z = s.below(s.zones);
            if !by_zone[z].is_empty() {
                break z;
            }
        };
        let gw = by_zone[zone][s.below(by_zone[zone].len())];
        let root = s.root(NodeId::for_key(BUCKET, &key));
        let holders = s.holders(BUCKET, &key);
        for (exec, into) in [(root, 0), (packed[f], 1)] {
            if into == 1 && holders.contains(&exec) {
                local += 1;
            }
            let legs =
                s.delay(gw, exec) * 2 + s.transfer(gw, exec, MSG) + s.transfer(exec, gw, MSG);
            let t0 = s.now;
            let req = s.get(exec, BUCKET, &key, 3);
            let read = match s.wait(req, 30_000 * MS) {
                Some((at, Outcome::Get(Ok(Some(v))))) if v.value.len() == size => at - t0,
                other => return Err(format!("reading the data of {key} failed: {other:?}")),
            };
            let ms = (legs + read + EXEC) as f64 / MS as f64;
            if into == 0 {
                out.capy.push(ms);
            } else {
                out.packed.push(ms);
            }
        }
    }
    out.packed_local = local as f64 / calls.max(1) as f64;
    Ok(out)
}

pub fn run(opts: &EvalOpts) -> Result<Report, EvalError> {
    let (nodes, funcs, calls, sizes): (usize, usize, usize, Vec<usize>) = if opts.quick {
        (100, 24, 150, vec![1 << 10, 64 << 10, 1 << 20])
    } else {
        (
            200,
            40,
            400,
            vec![1 << 10, 16 << 10, 256 << 10, 1 << 20, 3 << 20],
        )
    };
    let mut runs = Vec::new();
    // The same fleet, functions and calls at every size.
    for &size in &sizes {
        runs.push(one_size(nodes, funcs, calls, size, opts.seed).map_err(EvalError::Run)?);
    }
    let kb = |b: usize| b as f64 / 1024.0;
    let label = |b: usize| {
        if b >= 1 << 20 {
            format!("{} MB", b >> 20)
        } else {
            format!("{} KB", b >> 10)
        }
    };
    let mut p = Plot::new(
        "Function invocation latency against data size",
        "size of the function's data (KB, log scale)",
        "invocation latency (ms, log scale)",
    );
    p.x_log = true;
    p.y_log = true;
    let line = |name: &str, mark: Mark, f: &dyn Fn(&SizeRun) -> f64| {
        Series::new(
            name,
            mark,
            runs.iter().map(|r| (kb(r.size), f(r))).collect(),
        )
    };
    p.series.push(
        line(
            "capy (runs at its data's root): median",
            Mark::LinePoints,
            &|r| quantile(&r.capy, 0.5),
        )
        .colour(0),
    );
    p.series
        .push(line("capy: p90", Mark::Dashed, &|r| quantile(&r.capy, 0.9)).colour(0));
    p.series.push(
        line(
            "bin-packing, data elsewhere: median",
            Mark::LinePoints,
            &|r| quantile(&r.packed, 0.5),
        )
        .colour(1),
    );
    p.series.push(
        line("bin-packing: p90", Mark::Dashed, &|r| {
            quantile(&r.packed, 0.9)
        })
        .colour(1),
    );
    p.x_range = Some((0.5, kb(*sizes.last().unwrap_or(&1024)) * 2.0));
    let mid = &runs[runs.len() / 2];
    let mut c = Plot::new(
        &format!("Invocation latency with {} of data (CDF)", label(mid.size)),
        "invocation latency (ms, log scale)",
        "invocations (%)",
    );
    c.x_log = true;
    c.legend_low = true;
    c.y_range = Some((0.0, 100.0));
    c.series
        .push(Series::new("capy", Mark::Step, cdf(&mid.capy)));
    c.series.push(Series::new(
        "bin-packing baseline",
        Mark::Step,
        cdf(&mid.packed),
    ));

    let rows: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            serde_json::json!({
                "data_bytes": r.size,
                "capy_ms": {"p50": quantile(&r.capy, 0.5), "p90": quantile(&r.capy, 0.9), "p99": quantile(&r.capy, 0.99)},
                "binpack_ms": {"p50": quantile(&r.packed, 0.5), "p90": quantile(&r.packed, 0.9), "p99": quantile(&r.packed, 0.99)},
                "binpack_executor_held_a_copy": r.packed_local,
            })
        })
        .collect();
    let faster = runs
        .iter()
        .all(|r| quantile(&r.capy, 0.5) < quantile(&r.packed, 0.5));
    let gap = |r: &SizeRun| quantile(&r.packed, 0.5) - quantile(&r.capy, 0.5);
    let grows = match (runs.first(), runs.last()) {
        (Some(a), Some(b)) => runs.len() > 1 && gap(b) > 2.0 * gap(a),
        _ => false,
    };
    let detail = runs
        .iter()
        .map(|r| {
            format!(
                "{}: {:.0} vs {:.0} ms",
                label(r.size),
                quantile(&r.capy, 0.5),
                quantile(&r.packed, 0.5)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let claims = vec![
        Claim::new(
            "running at the data's root is faster than bin-packing placement (median, every size)",
            faster,
            detail.clone(),
        ),
        Claim::new(
            "the advantage grows with the data's size (largest size: over twice the smallest's)",
            grows,
            runs.iter()
                .map(|r| format!("{}: {:.0} ms", label(r.size), gap(r)))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ];
    let last = runs.last();
    let summary = format!(
        "{nodes} nodes in 20 zones, {funcs} functions with their data written at k = 3, \
         {calls} invocations per data size from clients in random zones. Median (and p90) \
         latency: {detail}.\n\n**Headline:** with {} of data a capy invocation takes {:.0} ms \
         at the median against {:.0} ms when the function is placed by bin-packing \
         ({:.1}x).",
        last.map_or(String::new(), |r| label(r.size)),
        last.map_or(f64::NAN, |r| quantile(&r.capy, 0.5)),
        last.map_or(f64::NAN, |r| quantile(&r.packed, 0.5)),
        last.map_or(f64::NAN, |r| quantile(&r.packed, 0.5)
            / quantile(&r.capy, 0.5)),
    );
    Ok(Report {
        name: "locality",
        title: "Data locality: invocation latency, function at its data vs bin-packing (Fig. 3)"
            .into(),
        data: serde_json::json!({
            "nodes": nodes,
            "functions": funcs,
            "invocations_per_size": calls,
            "exec_ms": EXEC as f64 / MS as f64,
            "lan_mbps": 100.0,
            "wan_mbps": 20.0,
            "sizes": rows,
        }),
        claims,
        figures: vec![
            Figure {
                file: "locality-latency.svg".into(),
                caption: "Fig. 3: invocation latency against data size, capy vs bin-packing".into(),
                plot: p,
            },
            Figure {
                file: "locality-cdf.svg".into(),
                caption: "Invocation latency distribution at one data size".into(),
                plot: c,
            },
        ],
        summary,
    })
}

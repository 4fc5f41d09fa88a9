//! Recovery (paper Fig. 8, function part): how long a function takes to
//! answer again after 1 or 2 nodes fail at once, on a real cluster with
//! real podman — not in the simulator.
//!
//! For each failure count a fresh local cluster of separate `capy`
//! processes (the same [`LocalCluster`] `capy bench fn` and the functions
//! tests use) starts on loopback, a function image is deployed and invoked
//! once (cold) and a few times warm. Then the function's root and, for two
//! failures, the next node in ring order (the one that would take over) are
//! SIGKILLed together. On a gateway a node's podman goes with it; these
//! nodes share this machine's podman, so the failed nodes' containers and
//! the image are removed too, and the new root has to load the image from
//! the store's chunks. From the kill on, a surviving node is asked to
//! invoke the function every 250 ms; recovered: the first 200 answer.

use super::{Claim, EvalError, EvalOpts, Figure, Report};
use crate::cli::cluster::LocalCluster;
use crate::containers::{Engine, Podman, LABEL_NODE};
use crate::id::NodeId;
use hyper::{Method, StatusCode};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

const FN_PATH: &str = "/api/fn/eval/echo";
/// Longest a function may take to come back before the run gives up.
const LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Serialize)]
pub struct FnRun {
    pub failed: usize,
    pub nodes: usize,
    pub killed: Vec<String>,
    pub new_root: String,
    /// Seconds from the kill until the function answered again.
    pub recovered_s: f64,
    /// Invocations that failed or were refused before that.
    pub failed_invocations: usize,
    /// The answering invocation's own figures (ms): the image read from
    /// the store and loaded, and the whole cold invocation at the root.
    pub image_load_ms: Option<f64>,
    pub cold_invoke_ms: Option<f64>,
    /// Warm invocations before the failure, median (ms, through a node).
    pub warm_before_ms: f64,
    pub cold_before_ms: f64,
}

fn http(
    c: &LocalCluster,
    i: usize,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, serde_json::Value), String> {
    let url = format!("{}{path}", c.nodes[i].url());
    let r = smol::block_on(crate::http::call(
        &url,
        method,
        body.map(|b| (b, "application/octet-stream")),
        timeout,
    ))
    .map_err(|e| e.to_string())?;
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| serde_json::json!(r.message()));
    Ok((r.status, v))
}

fn invoke(
    c: &LocalCluster,
    i: usize,
    n: usize,
    timeout: Duration,
) -> Result<(StatusCode, serde_json::Value, f64), String> {
    let t = Instant::now();
    let body = serde_json::json!({ "action": "echo", "i": n }).to_string();
    let (s, v) = http(
        c,
        i,
        Method::POST,
        &format!("{FN_PATH}?verbose"),
        Some(body.into_bytes()),
        timeout,
    )?;
    Ok((s, v, t.elapsed().as_secs_f64() * 1e3))
}

fn ms(v: &serde_json::Value, field: &str) -> Option<f64> {
    v["timings"][field].as_u64().map(|us| us as f64 / 1e3)
}

/// Removes what a run left in the shared podman: the containers of every
/// node of the cluster (by label) and the image.
fn clean(engine: &Podman, labels: &[String], image: &str) {
    smol::block_on(async {
        for l in labels {
            for x in engine
                .list(&[(LABEL_NODE, l.as_str())])
                .await
                .unwrap_or_default()
            {
                let _ = engine.remove(&x.id).await;
            }
        }
        let _ = engine.remove_image(image).await;
    });
}

fn one_run(
    bin: &Path,
    socket: &Path,
    archive: &[u8],
    nodes: usize,
    failed: usize,
) -> Result<FnRun, String> {
    let engine = Podman::new(socket);
    let image = crate::containers::FnSpec::image_ref_for(archive);
    let mut c = LocalCluster::prepare(bin, nodes, 1)?;
    for n in &mut c.nodes {
        n.extra_args = vec!["--podman-socket".into(), socket.display().to_string()];
    }
    c.start_all()?;
    let mut labels = Vec::new();
    let r = (|| {
        c.wait_converged(Duration::from_secs(60))?;
        for i in 0..nodes {
            let s = c.status(i)?;
            labels.push(
                s["functions"]["container_label"]
                    .as_str()
                    .ok_or("no container label in the status: functions unavailable")?
                    .to_string(),
            );
        }
        let (s, v) = http(
            &c,
            0,
            Method::PUT,
            &format!("{FN_PATH}?timeout=30&memory=64m"),
            Some(archive.to_vec()),
            Duration::from_secs(600),
        )?;
        if s != StatusCode::OK {
            return Err(format!("deploy: {s} {v}"));
        }
        let ring: NodeId = v["ring_id"]
            .as_str()
            .and_then(|x| x.parse().ok())
            .or_else(|| {
                http(&c, 0, Method::GET, FN_PATH, None, Duration::from_secs(30))
                    .ok()
                    .and_then(|(_, v)| v["ring_id"].as_str().and_then(|x| x.parse().ok()))
            })
            .ok_or("no ring id for the function")?;
        let (s, v, cold_before_ms) = invoke(&c, 0, 0, Duration::from_secs(300))?;
        if s != StatusCode::OK {
            return Err(format!("first invoke: {s} {v}"));
        }
        let mut warm = Vec::new();
        for n in 1..=10 {
            let (s, v, t) = invoke(&c, 0, n, Duration::from_secs(60))?;
            if s != StatusCode::OK {
                return Err(format!("warm invoke: {s} {v}"));
            }
            warm.push(t);
        }
        // The nodes in ring order from the function's key: its root first,
        // then the node that takes over when the root fails.
        let mut order: Vec<(u128, usize)> = Vec::new();
        for i in 0..nodes {
            let s = c.status(i)?;
            let id: NodeId = s["vnodes"][0]["id"]
                .as_str()
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| format!("no vnode id in node {i}'s status"))?;
            order.push((ring.distance(id), i));
        }
        order.sort_unstable();
        let root_name = v["node"].as_str().unwrap_or_default().to_string();
        let victims: Vec<usize> = order.iter().take(failed).map(|x| x.1).collect();
        if !victims.iter().any(|&i| c.nodes[i].name == root_name) {
            return Err(format!(
                "the function ran on {root_name}, not on the node closest to its key"
            ));
        }
        let client = (0..nodes)
            .find(|i| !victims.contains(i))
            .ok_or("no node left to ask")?;
        let killed: Vec<String> = victims.iter().map(|&i| c.nodes[i].name.clone()).collect();
        let t0 = Instant::now();
        for &i in &victims {
            c.kill(i);
        }
        let victim_labels: Vec<String> = victims.iter().map(|&i| labels[i].clone()).collect();
        clean(&engine, &victim_labels, &image);
        let mut tries = 0;
        let v = loop {
            tries += 1;
            match invoke(&c, client, 100 + tries, Duration::from_secs(60)) {
                Ok((StatusCode::OK, v, _)) => break v,
                _ if t0.elapsed() > LIMIT => {
                    return Err(format!(
                        "the function did not answer within {} s of the failure",
                        LIMIT.as_secs()
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(250)),
            }
        };
        let recovered_s = t0.elapsed().as_secs_f64();
        let mut w = warm.clone();
        w.sort_by(f64::total_cmp);
        Ok(FnRun {
            failed,
            nodes,
            killed,
            new_root: v["node"].as_str().unwrap_or_default().to_string(),
            recovered_s,
            failed_invocations: tries - 1,
            image_load_ms: ms(&v, "image_load_us"),
            cold_invoke_ms: ms(&v, "total_us"),
            warm_before_ms: w[w.len() / 2],
            cold_before_ms,
        })
    })();
    for i in 0..nodes {
        c.stop(i);
    }
    clean(&engine, &labels, &image);
    r
}

/// What the run needs, checked before any experiment of `capy eval all`
/// starts: the image archive (answered) and podman answering.
pub fn check(opts: &EvalOpts) -> Result<Vec<u8>, EvalError> {
    let image = opts.fn_image.as_ref().ok_or_else(|| {
        EvalError::Input(
            "fnrecovery runs a real cluster on podman: give --fn-image ARCHIVE \
             (scripts/build-fn-image makes one) and, if not the default, --podman-socket"
                .into(),
        )
    })?;
    let archive =
        std::fs::read(image).map_err(|e| EvalError::Input(format!("{}: {e}", image.display())))?;
    if smol::block_on(Podman::new(&opts.podman_socket).ping()).is_err() {
        return Err(EvalError::Input(format!(
            "podman does not answer on {} (scripts/setup-podman starts it)",
            opts.podman_socket.display()
        )));
    }
    Ok(archive)
}

pub fn run(opts: &EvalOpts) -> Result<Report, EvalError> {
    let archive = check(opts)?;
    let bin = std::env::current_exe()
        .map_err(|e| EvalError::Run(format!("finding the capy binary: {e}")))?;
    let nodes = 5;
    let reps = if opts.quick { 1 } else { 3 };
    let mut runs = Vec::new();
    for failed in [1, 2] {
        for rep in 0..reps {
            // An archive of its own (zero blocks added: the same image to
            // podman, another reference to capy), so that removing it
            // touches no one else's.
            let mut a = archive.clone();
            let pad = 8 + (std::process::id() as usize % 500) * 8 + failed * 4 + rep;
            a.resize(a.len() + 1024 * pad, 0);
            eprintln!("capy eval fnrecovery: {failed} failed, run {}", rep + 1);
            runs.push(
                one_run(&bin, &opts.podman_socket, &a, nodes, failed)
                    .map_err(|e| EvalError::Run(format!("{failed} failed: {e}")))?,
            );
        }
    }
    let of = |f: usize| -> Vec<&FnRun> { runs.iter().filter(|r| r.failed == f).collect() };
    let mean = |v: &[&FnRun], g: fn(&FnRun) -> f64| {
        v.iter().map(|r| g(r)).sum::<f64>() / v.len().max(1) as f64
    };
    let cats = vec!["1 node failed".to_string(), "2 nodes failed".to_string()];
    let rec: Vec<f64> = [1, 2]
        .iter()
        .map(|&f| mean(&of(f), |r| r.recovered_s))
        .collect();
    // Only runs whose answer carried its timings: a missing one is not a 0.
    let load: Vec<f64> = [1, 2]
        .iter()
        .map(|&f| {
            let t: Vec<f64> = of(f).iter().filter_map(|r| r.cold_invoke_ms).collect();
            if t.is_empty() {
                f64::NAN
            } else {
                t.iter().sum::<f64>() / t.len() as f64 / 1e3
            }
        })
        .collect();
    let mut p = super::plot::Plot::new(
        &format!("Function recovery on a real {nodes}-node cluster with podman"),
        "",
        "time (s, wall clock)",
    );
    p.bars = Some(super::plot::Bars {
        categories: cats,
        series: vec![
            (
                format!("until the function answers again (mean of {reps})"),
                rec.clone(),
            ),
            (
                "of which the cold start at the new root (image from the store)".into(),
                load,
            ),
        ],
    });
    let worst = runs.iter().map(|r| r.recovered_s).fold(0.0, f64::max);
    let claims = vec![Claim::new(
        "a function answers again within a minute after its root (and the next node) fail",
        worst < 60.0,
        format!(
            "1 failed: {:.1} s, 2 failed: {:.1} s (mean); slowest {worst:.1} s",
            rec[0], rec[1]
        ),
    )];
    let mut table = String::from(
        "| failed | killed | new root | recovered (s) | failed calls | cold invoke at new root (ms) | image load (ms) | warm before (ms) |\n|---|---|---|---|---|---|---|---|\n",
    );
    let o = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
    for r in &runs {
        table.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {} | {} | {:.1} |\n",
            r.failed,
            r.killed.join(", "),
            r.new_root,
            r.recovered_s,
            r.failed_invocations,
            o(r.cold_invoke_ms),
            o(r.image_load_ms),
            r.warm_before_ms
        ));
    }
    let summary = format!(
        "A real cluster of {nodes} `capy` processes on loopback sharing this machine's \
         podman; one function (a static echo runtime image) deployed with k = 3 copies of \
         its image chunks. The function's root and, for two failures, the next node in \
         ring order are SIGKILLed at once; their containers and the image are removed \
         from podman (a gateway's podman dies with it), so the new root loads the image \
         from the store. A surviving node invokes the function every 250 ms until it \
         answers.\n\n**Headline:** the function answers again {:.1} s after one failure \
         and {:.1} s after two (mean of {reps} runs each).\n\n{table}",
        rec[0], rec[1]
    );
    Ok(Report {
        name: "fnrecovery",
        title:
            "Recovery: a function answers again after 1 and 2 failed nodes, real cluster (Fig. 8b)"
                .into(),
        data: serde_json::json!({ "nodes": nodes, "runs": runs }),
        claims,
        figures: vec![Figure {
            file: "fnrecovery.svg".into(),
            caption: "Fig. 8b: time until the function answers again, real cluster and podman"
                .into(),
            plot: p,
        }],
        summary,
    })
}

//! `capy bench kv`: real nodes on loopback, real QUIC, real redb files; the
//! client is this process talking to the nodes' HTTP APIs over kept-alive
//! connections, as an application on the gateway would.

use super::cluster::LocalCluster;
use crate::http::Client;
use crate::stats::{percentile, sorted};
use hyper::{Method, StatusCode};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct OpFigures {
    pub ops: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub ops_per_s: f64,
}

#[derive(Serialize)]
pub struct KvReport {
    pub nodes: usize,
    pub clients: usize,
    pub value_size: usize,
    pub put: OpFigures,
    pub get: OpFigures,
    pub idle_rss_mb: f64,
    pub loaded_rss_mb: f64,
}

/// Resident set size of a process in MiB, from /proc.
pub fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub(super) fn figures(lat_ms: Vec<f64>, errors: usize, wall: Duration) -> OpFigures {
    let lat_ms = sorted(lat_ms);
    OpFigures {
        ops: lat_ms.len(),
        errors,
        p50_ms: percentile(&lat_ms, 0.50),
        p99_ms: percentile(&lat_ms, 0.99),
        max_ms: lat_ms.last().copied().unwrap_or(0.0),
        ops_per_s: lat_ms.len() as f64 / wall.as_secs_f64().max(1e-9),
    }
}

/// Runs `ops` operations of one kind over `clients` connections spread over
/// the nodes; returns latencies (ms) of the successful ones and the errors.
fn drive(
    cluster: &LocalCluster,
    clients: usize,
    ops: usize,
    method: Method,
    value: &[u8],
) -> Result<(Vec<f64>, usize, Duration), String> {
    let started = Instant::now();
    let results = smol::block_on(async {
        let mut tasks = Vec::new();
        for c in 0..clients {
            let addr = cluster.nodes[c % cluster.nodes.len()].http.to_string();
            let method = method.clone();
            let value = value.to_vec();
            tasks.push(smol::spawn(async move {
                let mut client = Client::connect(&addr, Duration::from_secs(30))
                    .await
                    .map_err(|e| e.to_string())?;
                let mut lat = Vec::new();
                let mut errors = 0;
                let mut i = c;
                while i < ops {
                    let target = format!("/api/kv/bench-{i}");
                    let body = (method == Method::PUT)
                        .then(|| (value.clone(), "application/octet-stream"));
                    let t = Instant::now();
                    match client.request(method.clone(), &target, body).await {
                        Ok(r) if r.status == StatusCode::OK => {
                            lat.push(t.elapsed().as_secs_f64() * 1e3)
                        }
                        Ok(_) | Err(_) => errors += 1,
                    }
                    i += clients;
                }
                Ok::<_, String>((lat, errors))
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await);
        }
        all
    });
    let wall = started.elapsed();
    let mut lat = Vec::new();
    let mut errors = 0;
    for r in results {
        let (l, e) = r?;
        lat.extend(l);
        errors += e;
    }
    Ok((lat, errors, wall))
}

pub fn kv(nodes: usize, ops: usize, clients: usize, value_size: usize) -> Result<KvReport, String> {
    if nodes == 0 || clients == 0 {
        return Err("--nodes and --clients must be at least 1".into());
    }
    let bin = std::env::current_exe().map_err(|e| format!("finding the capy binary: {e}"))?;
    let mut cluster = LocalCluster::prepare(&bin, nodes, 1)?;
    cluster.start_all()?;
    cluster.wait_converged(Duration::from_secs(60))?;
    // Let the first probes and maintenance settle before measuring idle RSS.
    std::thread::sleep(Duration::from_secs(2));
    let idle_rss_mb = cluster.nodes[0].pid().map(rss_mb).unwrap_or(0.0);
    let value = vec![b'v'; value_size];
    let (plat, perr, pwall) = drive(&cluster, clients, ops, Method::PUT, &value)?;
    let (glat, gerr, gwall) = drive(&cluster, clients, ops, Method::GET, &value)?;
    let loaded_rss_mb = cluster.nodes[0].pid().map(rss_mb).unwrap_or(0.0);
    Ok(KvReport {
        nodes,
        clients,
        value_size,
        put: figures(plat, perr, pwall),
        get: figures(glat, gerr, gwall),
        idle_rss_mb,
        loaded_rss_mb,
    })
}

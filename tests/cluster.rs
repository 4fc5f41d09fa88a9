//! Real clusters: separate `capy` processes on 127.0.0.1, each with its own
//! CA-issued certificate and data dir, joined through one peer; real QUIC,
//! real redb files, SIGKILL.

use capy::cli::cluster::LocalCluster;
use hyper::{Method, StatusCode};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_capy"))
}

fn put(c: &LocalCluster, node: usize, key: &str, value: &str) -> Result<u64, String> {
    let r = c.http(
        node,
        Method::PUT,
        &format!("/api/kv/{key}"),
        Some(value.as_bytes().to_vec()),
    )?;
    if r.status != StatusCode::OK {
        return Err(format!("{}: {}", r.status, r.message()));
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
    v["version"]
        .as_u64()
        .ok_or_else(|| "no version in reply".to_string())
}

fn get(c: &LocalCluster, node: usize, key: &str) -> Result<Option<String>, String> {
    let r = c.http(node, Method::GET, &format!("/api/kv/{key}"), None)?;
    match r.status {
        StatusCode::OK => Ok(Some(String::from_utf8_lossy(&r.body).to_string())),
        StatusCode::NOT_FOUND => Ok(None),
        s => Err(format!("{s}: {}", r.message())),
    }
}

/// Every acknowledged key must read back with its value from `node`.
fn check_all(c: &LocalCluster, node: usize, acked: &BTreeMap<String, String>) {
    let mut missing = Vec::new();
    for (k, v) in acked {
        match get(c, node, k) {
            Ok(Some(got)) if &got == v => {}
            other => missing.push(format!("{k}: {other:?}")),
        }
    }
    assert!(
        missing.is_empty(),
        "node {node} lost {} of {} acknowledged keys, e.g. {:?}\nlog:\n{}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)],
        c.log_tail(node, 40)
    );
}

fn store_keys(c: &LocalCluster, node: usize) -> u64 {
    c.status(node)
        .map(|s| s["store"]["keys"].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

#[test]
fn five_nodes_replicate_survive_sigkill_and_rejoin() {
    let mut c = LocalCluster::prepare(bin(), 5, 1).expect("prepare cluster");
    c.start_all().expect("start");
    c.wait_converged(Duration::from_secs(60)).expect("converge");

    // 1,000 keys written through all five nodes.
    let mut acked = BTreeMap::new();
    for i in 0..1000 {
        let (k, v) = (format!("key-{i}"), format!("value-{i}"));
        put(&c, i % 5, &k, &v).unwrap_or_else(|e| panic!("put {k}: {e}"));
        acked.insert(k, v);
    }
    // Read back from every node.
    for n in 0..5 {
        check_all(&c, n, &acked);
    }
    // Every node names the same root for a key, and that root holds it.
    for k in ["key-1", "key-500", "key-999"] {
        let roots: Vec<String> = (0..5)
            .map(|n| {
                let r = c
                    .http(n, Method::GET, &format!("/api/root/{k}"), None)
                    .expect("root");
                assert_eq!(r.status, StatusCode::OK, "{}", r.message());
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                v["root"]["name"].as_str().unwrap().to_string()
            })
            .collect();
        assert!(
            roots.iter().all(|r| r == &roots[0]),
            "roots disagree for {k}: {roots:?}"
        );
    }
    // k = 3 copies of each key across the cluster.
    let copies: u64 = (0..5).map(|n| store_keys(&c, n)).sum();
    assert_eq!(copies, 3000, "expected 3 replicas per key");

    // SIGKILL a node holding replicas; nothing acknowledged may be lost.
    let victim = 2;
    assert!(store_keys(&c, victim) > 0);
    c.kill(victim);
    check_all(&c, 0, &acked);
    // Writes go on while it is down.
    let started = Instant::now();
    for i in 1000..1200 {
        let (k, v) = (format!("key-{i}"), format!("value-{i}"));
        match put(&c, i % 2, &k, &v) {
            Ok(_) => {
                acked.insert(k, v);
            }
            Err(e) => eprintln!("put {k} during failure (not acknowledged): {e}"),
        }
    }
    assert!(
        acked.len() >= 1190,
        "too many writes failed while a node was down: {}",
        acked.len()
    );
    eprintln!("200 writes during the failure took {:?}", started.elapsed());
    check_all(&c, 3, &acked);

    // Re-replication: once the failure is repaired, every key is back at 3
    // copies on the 4 live nodes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let copies: u64 = [0, 1, 3, 4].iter().map(|&n| store_keys(&c, n)).sum();
        if copies >= 3 * acked.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "re-replication stuck at {copies} copies"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The killed node restarts from its data dir and rejoins.
    c.start(victim).expect("restart");
    c.wait_http(victim, Duration::from_secs(20))
        .expect("restarted node answers");
    c.wait_converged(Duration::from_secs(60))
        .expect("converge after restart");
    check_all(&c, victim, &acked);
    for n in [0, 4] {
        check_all(&c, n, &acked);
    }
}

#[test]
fn a_node_of_another_ca_is_refused() {
    let mut c = LocalCluster::prepare(bin(), 3, 1).expect("prepare cluster");
    c.start_all().expect("start");
    c.wait_converged(Duration::from_secs(60)).expect("converge");
    put(&c, 0, "honest", "yes").expect("put");

    // An intruder with its own CA, joining through node 0.
    let mut evil = LocalCluster::prepare(bin(), 1, 1).expect("prepare intruder");
    evil.nodes[0].join = Some(c.nodes[0].quic);
    evil.start(0).expect("start intruder");
    evil.wait_http(0, Duration::from_secs(20))
        .expect("intruder answers");
    std::thread::sleep(Duration::from_secs(3));
    let s = evil.status(0).expect("intruder status");
    assert_eq!(s["joined"], false, "intruder joined: {s}");
    // Its writes never reach the cluster.
    let r = evil.http(0, Method::PUT, "/api/kv/evil", Some(b"x".to_vec()));
    assert!(
        !matches!(&r, Ok(r) if r.status == StatusCode::OK),
        "intruder write acknowledged"
    );
    for n in 0..3 {
        assert_eq!(
            get(&c, n, "evil").expect("get"),
            None,
            "intruder's key reached node {n}"
        );
        assert_eq!(get(&c, n, "honest").expect("get").as_deref(), Some("yes"));
    }
    // The refusal is logged by the cluster node.
    let log = std::fs::read_to_string(c.nodes[0].dir.join("node.log")).unwrap_or_default();
    assert!(
        log.to_lowercase().contains("refus"),
        "no refusal logged:\n{log}"
    );
}

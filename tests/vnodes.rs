//! A node's vnode count goes up and down while keys are written and read:
//! every acknowledged key stays readable, from every node.

use capy::cli::cluster::LocalCluster;
use hyper::{Method, StatusCode};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_capy"))
}

fn pin(c: &LocalCluster, node: usize, count: u32) {
    let body = format!("{{\"count\": {count}}}").into_bytes();
    let r = c
        .http(node, Method::PUT, "/api/vnodes", Some(body))
        .expect("pin");
    assert_eq!(r.status, StatusCode::OK, "{}", r.message());
}

fn running(c: &LocalCluster, node: usize) -> usize {
    c.status(node)
        .map(|s| s["vnodes"].as_array().map_or(0, |a| a.len()))
        .unwrap_or(0)
}

#[test]
fn vnodes_come_and_go_under_writes_without_losing_a_key() {
    let mut c = LocalCluster::prepare(bin(), 4, 8).expect("prepare");
    c.start_all().expect("start");
    c.wait_converged(Duration::from_secs(60)).expect("converge");
    for n in 0..4 {
        pin(&c, n, 1);
    }
    let c = Arc::new(c);
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("vk-{i}"), format!("vv-{i}"));
                if let Ok(r) = c.http(
                    i % 4,
                    Method::PUT,
                    &format!("/api/kv/{k}"),
                    Some(v.clone().into_bytes()),
                ) {
                    if r.status == StatusCode::OK {
                        acked.lock().unwrap().insert(k, v);
                    }
                }
                i += 1;
            }
        })
    };
    // Node 1 goes 1 -> 6 -> 2 -> 5 -> 1 vnodes while the writer runs.
    for count in [6u32, 2, 5, 1] {
        std::thread::sleep(Duration::from_secs(3));
        pin(&c, 1, count);
        let deadline = Instant::now() + Duration::from_secs(20);
        while running(&c, 1) != count as usize {
            assert!(
                Instant::now() < deadline,
                "node 1 did not reach {count} vnodes"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Reads during the change: everything acknowledged so far.
        let snapshot = acked.lock().unwrap().clone();
        for (k, v) in snapshot.iter().rev().take(50) {
            let r = c
                .http(3, Method::GET, &format!("/api/kv/{k}"), None)
                .unwrap();
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{k} unreadable with {count} vnodes: {}",
                r.message()
            );
            assert_eq!(&r.body[..], v.as_bytes());
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "too few writes went through: {}",
        acked.len()
    );
    // Once hand-off settles, every acknowledged key reads back from every node.
    std::thread::sleep(Duration::from_secs(3));
    for n in 0..4 {
        let mut lost = Vec::new();
        for (k, v) in &acked {
            match c.http(n, Method::GET, &format!("/api/kv/{k}"), None) {
                Ok(r) if r.status == StatusCode::OK && &r.body[..] == v.as_bytes() => {}
                other => lost.push(format!("{k}: {:?}", other.map(|r| r.status))),
            }
        }
        assert!(
            lost.is_empty(),
            "node {n} lost {} of {} keys: {:?}",
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(5)]
        );
    }
    let s = c.status(1).unwrap();
    assert_eq!(s["game"]["mode"]["pinned"], 1, "{}", s["game"]);
    assert!(s["game"]["changes"].as_u64().unwrap() >= 4);
    // Bad requests are refused with a message.
    let r = c
        .http(
            1,
            Method::PUT,
            "/api/vnodes",
            Some(b"{\"count\": 99}".to_vec()),
        )
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("at most 8"), "{}", r.message());
}

//! Functions in a real cluster: separate `capy` processes on loopback with
//! real podman (the socket from `CAPY_PODMAN_SOCKET`, the image archive
//! from `CAPY_FN_IMAGE`; when unset, `scripts/setup-podman` and
//! `scripts/build-fn-image` are run). If podman cannot be made to answer,
//! the tests fail: they are never skipped.
//!
//! All nodes here share this machine's podman, as nodes of other test runs
//! may; each node labels its containers with its own name and id, and each
//! test uses an image archive of its own (the test image padded with zero
//! blocks: the same image to podman, another reference to capy).

use capy::cli::cluster::LocalCluster;
use capy::containers::testenv::{test_env, TestEnv};
use capy::containers::{Engine, Podman, LABEL_NODE};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_capy"))
}

fn env() -> &'static TestEnv {
    test_env()
}

/// The test image padded with zero blocks, unique to this process and `k`.
fn archive(k: usize) -> Vec<u8> {
    let mut v = env().archive.clone();
    let pad = 20 + (std::process::id() as usize % 200) * 4 + k;
    v.resize(v.len() + 1024 * pad, 0);
    v
}

fn engine() -> Podman {
    Podman::new(&env().socket)
}

/// Removes, whatever happens, the containers of a cluster's nodes and the
/// images a test loaded.
struct Cleanup {
    labels: Vec<String>,
    images: Vec<String>,
}

impl Cleanup {
    fn containers(label: &str) -> Vec<String> {
        smol::block_on(engine().list(&[(LABEL_NODE, label)]))
            .map(|l| l.into_iter().map(|c| c.name).collect())
            .unwrap_or_default()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        smol::block_on(async {
            let e = engine();
            for l in &self.labels {
                for c in e
                    .list(&[(LABEL_NODE, l.as_str())])
                    .await
                    .unwrap_or_default()
                {
                    let _ = e.remove(&c.id).await;
                }
            }
            for i in &self.images {
                let _ = e.remove_image(i).await;
            }
        });
    }
}

/// A cluster of `n` nodes on podman, with `config` as their config file.
fn cluster(n: usize, config: &str, socket: Option<&str>) -> (LocalCluster, Cleanup) {
    let mut c = LocalCluster::prepare(bin(), n, 1).expect("prepare cluster");
    let cfg = c.root.join("node.toml");
    std::fs::write(&cfg, config).expect("write config");
    let sock = socket
        .map(String::from)
        .unwrap_or_else(|| env().socket.display().to_string());
    for node in &mut c.nodes {
        node.extra_args = vec![
            "--config".into(),
            cfg.display().to_string(),
            "--podman-socket".into(),
            sock.clone(),
        ];
    }
    c.start_all().expect("start");
    c.wait_converged(Duration::from_secs(60)).expect("converge");
    let labels = (0..n)
        .map(|i| {
            let s = c.status(i).expect("status");
            s["functions"]["container_label"]
                .as_str()
                .expect("container label in status")
                .to_string()
        })
        .collect();
    (
        c,
        Cleanup {
            labels,
            images: Vec::new(),
        },
    )
}

/// One request with a generous timeout (cold starts on a loaded machine);
/// on no answer, the nodes' logs say why.
fn call(
    c: &LocalCluster,
    i: usize,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    let url = format!("{}{path}", c.nodes[i].url());
    let r = smol::block_on(capy::http::call(
        &url,
        method.clone(),
        body.map(|b| (b, "application/octet-stream")),
        Duration::from_secs(120),
    ))
    .unwrap_or_else(|e| {
        let logs: Vec<String> = (0..c.nodes.len())
            .map(|n| format!("--- node {n} ---\n{}", c.log_tail(n, 30)))
            .collect();
        panic!("{method} {path} on node {i}: {e}\n{}", logs.join("\n"))
    });
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|_| json!(r.message()));
    (r.status, v)
}

fn invoke(c: &LocalCluster, i: usize, f: &str, input: Value) -> (StatusCode, Value) {
    call(
        c,
        i,
        Method::POST,
        &format!("/api/fn/{f}?verbose"),
        Some(input.to_string().into_bytes()),
    )
}

fn node_index(c: &LocalCluster, name: &str) -> usize {
    c.nodes
        .iter()
        .position(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node named {name}"))
}

fn containers_of(c: &LocalCluster, i: usize, f: &str) -> Vec<Value> {
    c.status(i).expect("status")["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|x| x["function"] == f)
        .collect()
}

fn kv_works(c: &LocalCluster, i: usize, key: &str) {
    let (s, v) = call(
        c,
        i,
        Method::PUT,
        &format!("/api/kv/{key}"),
        Some(b"v".to_vec()),
    );
    assert_eq!(s, StatusCode::OK, "put {key}: {v}");
    let r = c
        .http(i, Method::GET, &format!("/api/kv/{key}"), None)
        .expect("get");
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"v"[..]));
}

/// A tar with one text file: a tar archive, but no image.
fn plain_tar() -> Vec<u8> {
    let mut v = capy::containers::tar_entry("notes.txt", b"hello");
    v.extend([0u8; 1024]);
    v
}

/// Deploys `a` as `f` through node `i`; answers the reply.
fn deploy(c: &LocalCluster, i: usize, f: &str, query: &str, a: Vec<u8>) -> Value {
    let (s, v) = call(c, i, Method::PUT, &format!("/api/fn/{f}?{query}"), Some(a));
    assert_eq!(s, StatusCode::OK, "deploy {f}: {v}");
    v
}

#[test]
fn deploy_cold_warm_keep_alive_and_recovery_after_sigkill() {
    let (mut c, mut clean) = cluster(3, "[functions]\nchunk_bytes = 131072\n", None);
    let a = archive(1);
    let image = capy::containers::FnSpec::image_ref_for(&a);
    clean.images.push(image.clone());

    // Archives that are not images are refused before anything is stored.
    let (s, v) = call(
        &c,
        0,
        Method::PUT,
        "/api/fn/shop/echo",
        Some(b"just some text, no image".to_vec()),
    );
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["kind"], "image_invalid");
    assert!(
        v["error"].as_str().unwrap().contains("not a tar archive"),
        "{v}"
    );
    let (s, v) = call(&c, 1, Method::PUT, "/api/fn/shop/echo", Some(plain_tar()));
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("no manifest.json"),
        "{v}"
    );
    let (s, v) = call(&c, 2, Method::GET, "/api/fn/shop/echo", None);
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "a refused deploy left a function: {v}"
    );
    let (s, v) = invoke(&c, 0, "shop/echo", json!(1));
    assert_eq!(
        (s, v["kind"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_deployed")),
        "{v}"
    );

    // Deploy: chunked (131072-byte chunks), replicated.
    let size = a.len();
    let d = deploy(&c, 1, "shop/echo", "timeout=10&memory=64m&keep_alive=3", a);
    assert_eq!(d["size"], size);
    assert_eq!(d["chunks"], size.div_ceil(131072));
    assert_eq!(d["format"], "docker-archive");
    // Every chunk and the manifest are stored k = 3 times: all three nodes
    // hold the app's bucket.
    let want = size.div_ceil(131072) as u64 + 1;
    let t = Instant::now();
    loop {
        let keys: Vec<u64> = (0..3)
            .map(|i| {
                c.status(i).unwrap()["store"]["buckets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["name"] == "shop")
                    .map(|b| b["keys"].as_u64().unwrap())
                    .unwrap_or(0)
            })
            .collect();
        if keys == vec![want; 3] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "chunks + manifest ({want} keys) not on every node: {keys:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Cold invoke through one node, warm through another: same root.
    let (s, v) = invoke(&c, 0, "shop/echo", json!({"action": "echo", "n": 1}));
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["output"], json!({"action": "echo", "n": 1}));
    assert_eq!(v["cold"], true);
    let root = v["node"].as_str().unwrap().to_string();
    let (s, v) = invoke(&c, 2, "shop/echo", json!({"n": 2}));
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["cold"].as_bool(), v["node"].as_str()),
        (Some(false), Some(root.as_str())),
        "{v}"
    );
    // The plain form answers the output itself.
    let r = c
        .http(
            1,
            Method::POST,
            "/api/fn/shop/echo",
            Some(b"[1,2,3]".to_vec()),
        )
        .unwrap();
    assert_eq!((r.status, &r.body[..]), (StatusCode::OK, &b"[1,2,3]"[..]));

    // Where it runs: the info, the root's status and metrics, podman.
    let (s, info) = call(&c, 0, Method::GET, "/api/fn/shop/echo", None);
    assert_eq!(s, StatusCode::OK);
    assert_eq!(info["root"]["node"], root.as_str(), "{info}");
    assert_eq!(
        info["root"]["containers"].as_array().unwrap().len(),
        1,
        "{info}"
    );
    let r = node_index(&c, &root);
    let cs = containers_of(&c, r, "shop/echo");
    assert_eq!(cs.len(), 1, "{cs:?}");
    assert_eq!(cs[0]["state"], "idle");
    assert!(cs[0]["idle_s"].as_f64().is_some());
    let st = c.status(r).unwrap();
    let shop = &st["functions"]["apps"]["shop"];
    assert_eq!(
        (shop["cold_starts"].as_u64(), shop["warm_starts"].as_u64()),
        (Some(1), Some(2)),
        "{shop}"
    );
    let m = c.http(r, Method::GET, "/metrics", None).unwrap();
    let m = String::from_utf8_lossy(&m.body);
    assert!(
        m.contains("capy_fn_cold_starts_total{app=\"shop\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("capy_fn_warm_starts_total{app=\"shop\"} 2"),
        "{m}"
    );
    assert_eq!(Cleanup::containers(&clean.labels[r]).len(), 1);
    for i in (0..3).filter(|&i| i != r) {
        assert!(
            containers_of(&c, i, "shop/echo").is_empty(),
            "only the root runs it"
        );
        assert!(Cleanup::containers(&clean.labels[i]).is_empty());
    }

    // Keep-alive: 3 s idle and the container goes (podman too).
    let t = Instant::now();
    while !containers_of(&c, r, "shop/echo").is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the container outlived its keep-alive"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "expired too early: {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    while !Cleanup::containers(&clean.labels[r]).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "podman still has the expired container"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let shop = c.status(r).unwrap()["functions"]["apps"]["shop"].clone();
    assert_eq!(shop["expired"], 1, "{shop}");
    assert!(shop["idle_seconds"].as_f64().unwrap() >= 2.5, "{shop}");
    let (s, v) = invoke(&c, 0, "shop/echo", json!("again"));
    assert_eq!(
        (s, v["cold"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{v}"
    );

    // SIGKILL the node that runs it. On a gateway its podman goes with it:
    // here the shared podman keeps the container and the image, so remove
    // both, and the new root must load the image from the store.
    c.kill(r);
    smol::block_on(async {
        let e = engine();
        for x in e
            .list(&[(LABEL_NODE, clean.labels[r].as_str())])
            .await
            .unwrap()
        {
            e.remove(&x.id).await.unwrap();
        }
        e.remove_image(&image).await.unwrap();
    });
    let other = (r + 1) % 3;
    let t = Instant::now();
    let v = loop {
        let (s, v) = invoke(&c, other, "shop/echo", json!({"after": "kill"}));
        if s == StatusCode::OK {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no answer after the root died: {s} {v}"
        );
        eprintln!("waiting for a new root: {s} {v}");
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("recovered after {:?}: {v}", t.elapsed());
    assert_eq!(v["output"], json!({"after": "kill"}));
    assert_eq!(v["cold"], true);
    let new_root = v["node"].as_str().unwrap().to_string();
    assert_ne!(new_root, root);
    assert!(
        v["timings"]["image_load_us"].as_u64().is_some(),
        "the new root loaded the image from the store: {v}"
    );
    let (s, v) = invoke(&c, (r + 2) % 3, "shop/echo", json!(5));
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["cold"].as_bool(), v["node"].as_str()),
        (Some(false), Some(new_root.as_str()))
    );
    let nr = node_index(&c, &new_root);
    assert_eq!(containers_of(&c, nr, "shop/echo").len(), 1);

    // The killed node comes back; the function keeps answering, and
    // removing it takes its containers and chunks away.
    if c.nodes[r].join.is_none() {
        // The first node has no peer to join through, and it may have died
        // before it remembered any.
        c.nodes[r].join = Some(c.nodes[(r + 1) % 3].quic);
    }
    c.start(r).expect("restart");
    c.wait_http(r, Duration::from_secs(20)).expect("restarted");
    c.wait_converged(Duration::from_secs(60)).expect("converge");
    let (s, v) = invoke(&c, r, "shop/echo", json!(6));
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = call(&c, 0, Method::DELETE, "/api/fn/shop/echo", None);
    assert_eq!(s, StatusCode::OK, "{v}");
    // The root is told at once; the others' cached manifest lasts 2 s (and
    // a node just back may still read its old copy until anti-entropy).
    let t = Instant::now();
    for i in 0..3 {
        loop {
            let (s, v) = invoke(&c, i, "shop/echo", json!(7));
            if s == StatusCode::NOT_FOUND {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "node {i} still runs the removed function: {s} {v}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let t = Instant::now();
    while (0..3).any(|i| !containers_of(&c, i, "shop/echo").is_empty()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "containers outlived the function"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_functions_fail_clearly_busy_roots_forward_and_nothing_else_is_affected() {
    let (c, mut clean) = cluster(3, "[functions]\nmax_per_function = 1\n", None);
    let a = archive(2);
    clean
        .images
        .push(capy::containers::FnSpec::image_ref_for(&a));
    deploy(&c, 0, "lab/fn", "timeout=2&memory=32m", a.clone());
    deploy(&c, 1, "lab/slow", "timeout=20&memory=32m", a);
    let (s, v) = invoke(&c, 2, "lab/fn", json!("ok"));
    assert_eq!(s, StatusCode::OK, "{v}");
    let root = v["node"].as_str().unwrap().to_string();

    let healthy = |what: &str| {
        let (s, v) = invoke(&c, 1, "lab/fn", json!({"after": what}));
        assert_eq!(s, StatusCode::OK, "after {what}: {v}");
        assert_eq!(v["output"], json!({"after": what}));
        kv_works(&c, 0, &format!("after-{what}"));
    };

    // A function that never answers: 504 at its timeout.
    let t = Instant::now();
    let (s, v) = invoke(&c, 0, "lab/fn", json!({"action": "sleep", "ms": 30000}));
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{v}");
    assert_eq!(v["kind"], "timeout");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("did not answer within 2s"),
        "{v}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    healthy("timeout");

    // One that prints garbage: 502, not JSON.
    let (s, v) = invoke(&c, 1, "lab/fn", json!({"action": "garbage"}));
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert_eq!(v["kind"], "bad_output");
    assert!(v["error"].as_str().unwrap().contains("not JSON"), "{v}");
    healthy("garbage");

    // One that exits: 502, crashed, with the exit code.
    let (s, v) = invoke(&c, 2, "lab/fn", json!({"action": "exit", "code": 3}));
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert_eq!(v["kind"], "crashed");
    assert!(v["error"].as_str().unwrap().contains("code 3"), "{v}");
    healthy("exit");

    // Its own error, a missing function, bad input and names.
    let (s, v) = invoke(
        &c,
        0,
        "lab/fn",
        json!({"action": "fail", "message": "no stock"}),
    );
    assert_eq!(
        (s, v["kind"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("failed")),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("no stock"));
    let (s, v) = invoke(&c, 0, "lab/nope", json!(1));
    assert_eq!(
        (s, v["kind"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_deployed")),
        "{v}"
    );
    let (s, v) = call(
        &c,
        0,
        Method::POST,
        "/api/fn/lab/fn",
        Some(b"{not json".to_vec()),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = call(
        &c,
        0,
        Method::POST,
        "/api/fn/la%20b/fn",
        Some(b"1".to_vec()),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = call(
        &c,
        0,
        Method::PUT,
        "/api/fn/lab/x?memory=1k",
        Some(b"x".to_vec()),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    healthy("bad-input");

    // Every node still serves, and the root counted the errors.
    for i in 0..3 {
        kv_works(&c, i, &format!("node-{i}"));
    }
    let r = node_index(&c, &root);
    let lab = c.status(r).unwrap()["functions"]["apps"]["lab"].clone();
    assert!(lab["errors"].as_u64().unwrap() >= 4, "{lab}");
    assert_eq!(lab["timeouts"], 1, "{lab}");

    // Load: the root runs one container per function here; concurrent
    // invocations go to its replica neighbours, which start their own.
    let urls: Vec<String> = (0..3)
        .map(|i| format!("{}/api/fn/lab/slow?verbose", c.nodes[i].url()))
        .collect();
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let url = urls[i].clone();
            std::thread::spawn(move || {
                let body = json!({"action": "sleep", "ms": 2500, "i": i}).to_string();
                let r = smol::block_on(capy::http::call(
                    &url,
                    Method::POST,
                    Some((body.into_bytes(), "application/json")),
                    Duration::from_secs(60),
                ))
                .expect("invoke");
                let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                (r.status, v)
            })
        })
        .collect();
    let replies: Vec<(StatusCode, Value)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (s, v) in &replies {
        assert_eq!(*s, StatusCode::OK, "{v}");
    }
    let nodes: std::collections::BTreeSet<&str> = replies
        .iter()
        .map(|(_, v)| v["node"].as_str().unwrap())
        .collect();
    assert!(nodes.len() >= 2, "all ran on one node: {replies:?}");
    assert!(
        replies.iter().any(|(_, v)| v["forwarded"] == true),
        "{replies:?}"
    );
    let slow_root = replies
        .iter()
        .find(|(_, v)| v["forwarded"] == false)
        .map(|(_, v)| v["node"].as_str().unwrap().to_string())
        .expect("one ran on the root");
    let sr = node_index(&c, &slow_root);
    let st = c.status(sr).unwrap();
    assert!(
        st["functions"]["forwarded_out"].as_u64().unwrap() >= 1,
        "{}",
        st["functions"]
    );
    let (_, info) = call(&c, 0, Method::GET, "/api/fn/lab/slow", None);
    assert!(
        !info["root"]["helpers"].as_array().unwrap().is_empty(),
        "{info}"
    );

    // A node stopped gracefully removes its containers.
    let had: Vec<usize> = (0..3)
        .filter(|&i| !Cleanup::containers(&clean.labels[i]).is_empty())
        .collect();
    assert!(had.len() >= 2, "containers on {had:?}");
    let mut c = c;
    for &i in &had {
        c.stop(i);
        assert!(
            Cleanup::containers(&clean.labels[i]).is_empty(),
            "node {i} left containers behind after a graceful stop"
        );
    }
}

#[test]
fn a_node_without_podman_stores_and_says_functions_are_unavailable() {
    let (c, _clean) = cluster(1, "", Some("/nonexistent/podman.sock"));
    // The first attempt to reach podman ends at once: no such socket.
    let t = Instant::now();
    loop {
        let st = c.status(0).unwrap();
        assert_eq!(st["functions"]["available"], false, "{}", st["functions"]);
        let why = st["functions"]["unavailable_reason"]
            .as_str()
            .unwrap()
            .to_string();
        if why.contains("/nonexistent/podman.sock") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{why}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Storage still works, and so does a deploy (it only stores).
    kv_works(&c, 0, "still-here");
    let a = archive(3);
    deploy(&c, 0, "solo/fn", "timeout=5", a);
    let (s, v) = invoke(&c, 0, "solo/fn", json!(1));
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["kind"], "unavailable");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("unavailable") && msg.contains("podman"),
        "{msg}"
    );
    let m = c.http(0, Method::GET, "/metrics", None).unwrap();
    assert!(String::from_utf8_lossy(&m.body).contains("capy_fn_available 0"));
    kv_works(&c, 0, "still-here-2");
}

/// The keep-alive override: an app's handler starts and removes its
/// function's containers with `sys.deploy_container` / `sys.delete_container`,
/// with no invocation in between.
#[test]
fn a_handler_starts_and_removes_its_function_containers() {
    let (c, mut clean) = cluster(3, "[functions]\nkeep_alive_s = 600\n", None);
    let a = archive(4);
    clean
        .images
        .push(capy::containers::FnSpec::image_ref_for(&a));
    deploy(&c, 0, "warmer/f", "timeout=10", a);
    let app = json!({"name": "warmer", "owner": "ops", "source": r#"
        function updateCb(caller, v)
          if v.containers == "up" then sys.deploy_container("f") end
          if v.containers == "down" then sys.delete_container("f") end
          return v
        end"#});
    let (s, v) = call(
        &c,
        1,
        Method::POST,
        "/api/apps",
        Some(app.to_string().into_bytes()),
    );
    assert_eq!(s, StatusCode::OK, "register: {v}");
    let running =
        |c: &LocalCluster| -> usize { (0..3).map(|i| containers_of(c, i, "warmer/f").len()).sum() };
    let set = |c: &LocalCluster, to: &str| {
        let body = json!({ "containers": to }).to_string().into_bytes();
        let (s, v) = call(c, 2, Method::PUT, "/api/kv/ctl?bucket=warmer", Some(body));
        assert_eq!(s, StatusCode::OK, "update: {v}");
    };
    // The first write of a key is its creation; updates run updateCb.
    set(&c, "none");
    assert_eq!(running(&c), 0, "nothing runs before the handler asks");
    set(&c, "up");
    let t = Instant::now();
    while running(&c) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the handler's deploy_container started no container:\n{}",
            (0..3)
                .map(|n| format!("--- node {n} ---\n{}", c.log_tail(n, 15)))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Started warm for the first invocation.
    let (s, v) = invoke(&c, 0, "warmer/f", json!({"echo": 1}));
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["cold"], false, "{v}");
    set(&c, "down");
    let t = Instant::now();
    while running(&c) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the handler's delete_container left {} containers",
            running(&c)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

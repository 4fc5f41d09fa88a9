//! Apps on real clusters: separate `capy` processes on 127.0.0.1 with real
//! QUIC and redb. Each shipped policy end to end (keep-alive windows,
//! subscriptions with server-sent events on several nodes, replication
//! following popularity), handler events at the key's root, and hostile
//! handlers stopped while the node keeps serving.

use capy::cli::apps::{stream_sse, SseEvent};
use capy::cli::cluster::LocalCluster;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_capy"))
}

fn cluster(n: usize) -> LocalCluster {
    let mut c = LocalCluster::prepare(bin(), n, 1).expect("prepare cluster");
    c.start_all().expect("start");
    c.wait_converged(Duration::from_secs(60)).expect("converge");
    c
}

/// Registers an app from TOML through the CLI, as an operator would.
fn register_cli(c: &LocalCluster, node: usize, name: &str, toml: &str) -> std::process::Output {
    let dir = c.root.join(format!("app-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("app.toml"), toml).unwrap();
    Command::new(bin())
        .args(["app", "register"])
        .arg(dir.join("app.toml"))
        .args(["--node", &c.nodes[node].url()])
        .output()
        .unwrap()
}

fn register(c: &LocalCluster, node: usize, spec: Value) -> (StatusCode, Value) {
    let r = c
        .http(
            node,
            Method::POST,
            "/api/apps",
            Some(spec.to_string().into_bytes()),
        )
        .expect("register");
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

fn put(c: &LocalCluster, node: usize, app: &str, key: &str, v: &Value) -> (StatusCode, Value) {
    let r = c
        .http(
            node,
            Method::PUT,
            &format!("/api/kv/{key}?bucket={app}"),
            Some(v.to_string().into_bytes()),
        )
        .expect("put");
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

fn get(c: &LocalCluster, node: usize, app: &str, key: &str) -> (StatusCode, Value) {
    let r = c
        .http(
            node,
            Method::GET,
            &format!("/api/kv/{key}?bucket={app}"),
            None,
        )
        .expect("get");
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

fn status(c: &LocalCluster, node: usize) -> Value {
    c.status(node).expect("status")
}

/// Copies of `app`'s keys across the running nodes.
fn copies(c: &LocalCluster, nodes: &[usize], app: &str) -> u64 {
    nodes
        .iter()
        .map(|&n| {
            status(c, n)["store"]["buckets"]
                .as_array()
                .and_then(|b| b.iter().find(|x| x["name"] == app))
                .and_then(|x| x["keys"].as_u64())
                .unwrap_or(0)
        })
        .sum()
}

/// The per-app counters of `app` summed over `nodes`.
fn app_counter(c: &LocalCluster, nodes: &[usize], app: &str, path: &[&str]) -> u64 {
    nodes
        .iter()
        .map(|&n| {
            let s = status(c, n);
            let Some(a) = s["apps"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == app))
                .cloned()
            else {
                return 0;
            };
            let mut v = &a;
            for p in path {
                v = &v[*p];
            }
            v.as_u64().unwrap_or(0)
        })
        .sum()
}

fn root_of(c: &LocalCluster, app: &str, key: &str) -> String {
    let r = c
        .http(
            0,
            Method::GET,
            &format!("/api/root/{key}?bucket={app}"),
            None,
        )
        .expect("root");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v["root"]["name"].as_str().unwrap().to_string()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn apps_register_list_remove_and_run_at_the_root() {
    let c = cluster(3);
    // Through the CLI: a Lua handler file next to the app file.
    let dir = c.root.join("app-notes");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("notes.lua"),
        r#"
        function createCb(caller, data)
          if data.reject then return nil end
          data.created_by = caller
          data.root = sys.node_id()
          return data
        end
        function readCb(caller, args)
          local d = sys.read(sys.key())
          if args and args.field then return d[args.field] end
          return d
        end
        function updateCb(caller, new)
          local old = sys.read(sys.key())
          new.revisions = (old.revisions or 0) + 1
          return new
        end
        "#,
    )
    .unwrap();
    let out = register_cli(
        &c,
        1,
        "notes",
        "name = \"notes\"\nowner = \"alice\"\nreplicas = 2\nhandler = \"notes.lua\"\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("registered notes"));

    // Listed from any node, with its AppId.
    let ls = Command::new(bin())
        .args(["app", "ls", "--json", "--node", &c.nodes[2].url()])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&ls.stdout).unwrap();
    let apps = v["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 1, "{v}");
    assert_eq!(apps[0]["name"], "notes");
    assert_eq!(apps[0]["app_id"].as_str().unwrap().len(), 40);
    let app_id = apps[0]["app_id"].clone();

    // createCb runs on the key's root and shapes what is stored.
    let (s, v) = put(&c, 0, "notes", "n1", &json!({"text": "hello"}));
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["event"], "create");
    let (s, v) = get(&c, 2, "notes", "n1");
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["text"], "hello");
    assert_eq!(v["created_by"], "http");
    let root_vnode = v["root"].as_str().unwrap().to_string();
    let root_name = root_of(&c, "notes", "n1");
    let root_idx: usize = root_name[1..].parse().unwrap();
    assert_eq!(
        status(&c, root_idx)["vnodes"][0]["id"].as_str().unwrap(),
        root_vnode,
        "createCb did not run on the key's root"
    );
    // readCb's args pick what the reader gets; updateCb rewrites the value.
    let r = c
        .http(
            1,
            Method::GET,
            "/api/apps/notes/kv/n1?args=%7B%22field%22%3A%22text%22%7D",
            None,
        )
        .unwrap();
    assert_eq!(&r.body[..], b"\"hello\"");
    let (s, v) = put(&c, 1, "notes", "n1", &json!({"text": "again"}));
    assert_eq!((s, v["event"].clone()), (StatusCode::OK, json!("update")));
    let (_, v) = get(&c, 0, "notes", "n1");
    assert_eq!(
        (v["text"].clone(), v["revisions"].clone()),
        (json!("again"), json!(1))
    );
    // createCb returning nil stores nothing.
    let (s, v) = put(&c, 0, "notes", "n2", &json!({"reject": true}));
    assert_eq!((s, v["stored"].clone()), (StatusCode::OK, json!(false)));
    assert_eq!(get(&c, 0, "notes", "n2").0, StatusCode::NOT_FOUND);
    // An app's values are JSON.
    let r = c
        .http(
            0,
            Method::PUT,
            "/api/kv/n3?bucket=notes",
            Some(b"not json".to_vec()),
        )
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("JSON"), "{}", r.message());
    // The app's k = 2: two copies of each key, not the cluster's 3.
    wait_until("two copies of n1", Duration::from_secs(20), || {
        copies(&c, &[0, 1, 2], "notes") == 2
    });
    // Handler counters show on the root's status page and metrics.
    assert!(app_counter(&c, &[root_idx], "notes", &["calls"]) >= 4);
    let m = c.http(root_idx, Method::GET, "/metrics", None).unwrap();
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("capy_handler_runs_total{app=\"notes\",event=\"create\"}"),
        "{text}"
    );
    assert!(
        text.contains("capy_handler_latency_seconds_count{app=\"notes\"}"),
        "{text}"
    );

    // Timers fire on the key's root, and only there.
    let (s, v) = register(
        &c,
        0,
        json!({"name": "ticker", "owner": "alice", "timer_interval_ms": 200,
               "source": "function timerCb() state.n = (state.n or 0) + 1 end"}),
    );
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(put(&c, 1, "ticker", "t", &json!(0)).0, StatusCode::OK);
    let troot: usize = root_of(&c, "ticker", "t")[1..].parse().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let fired: Vec<u64> = (0..3)
        .map(|i| app_counter(&c, &[i], "ticker", &["events", "timer"]))
        .collect();
    assert!(fired[troot] >= 8, "timers at the root: {fired:?}");
    assert_eq!(
        fired.iter().sum::<u64>(),
        fired[troot],
        "timers off the root: {fired:?}"
    );
    let st = c
        .http(2, Method::GET, "/api/apps/ticker/state/t", None)
        .unwrap();
    let st: Value = serde_json::from_slice(&st.body).unwrap();
    assert!(st["state"]["n"].as_u64().unwrap() >= 8, "{st}");

    // Re-registration by the owner keeps the AppId; another owner is refused.
    let (s, v) = register(
        &c,
        2,
        json!({"name": "notes", "owner": "alice", "policy": "subscription", "replicas": 2}),
    );
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["app_id"].clone(), v["revision"].clone()),
        (app_id, json!(2))
    );
    let (s, v) = register(
        &c,
        0,
        json!({"name": "notes", "owner": "mallory", "policy": "subscription"}),
    );
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // Bad definitions are refused before anything is stored.
    let (s, v) = register(
        &c,
        0,
        json!({"name": "x1", "owner": "a", "policy": "no-such"}),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("no shipped policy"));
    let (s, v) = register(
        &c,
        0,
        json!({"name": "x2", "owner": "a", "source": "function readCb( oops"}),
    );
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("failed to load"),
        "{v}"
    );
    let (s, _) = register(
        &c,
        0,
        json!({"name": "x3", "owner": "a", "source": "while true do end"}),
    );
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = register(
        &c,
        0,
        json!({"name": "_apps", "owner": "a", "policy": "subscription"}),
    );
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // The registry's buckets are not writable through /api/kv.
    let r = c
        .http(
            0,
            Method::PUT,
            "/api/kv/notes?bucket=_apps",
            Some(b"{}".to_vec()),
        )
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // Removal: gone from the list; its keys stay readable as plain data.
    let out = Command::new(bin())
        .args([
            "app",
            "rm",
            "notes",
            "--owner",
            "alice",
            "--node",
            &c.nodes[0].url(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, v) = {
        let r = c.http(1, Method::GET, "/api/apps", None).unwrap();
        (r.status, serde_json::from_slice::<Value>(&r.body).unwrap())
    };
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = v["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["ticker"]);
    let r = c.http(1, Method::GET, "/api/apps/notes", None).unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// Follows `app/key` on `node` from a thread until `stop` is set; events
/// land in the vector.
fn watcher(
    c: &LocalCluster,
    node: usize,
    app: &str,
    key: &str,
    stop: &Arc<AtomicBool>,
) -> Arc<Mutex<Vec<SseEvent>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let url = format!("{}/api/watch/{key}?bucket={app}", c.nodes[node].url());
    let (ev, stop) = (events.clone(), stop.clone());
    std::thread::spawn(move || {
        let _ = smol::block_on(stream_sse(&url, |e| {
            ev.lock().unwrap().push(e);
            !stop.load(Ordering::Relaxed)
        }));
    });
    events
}

#[test]
fn every_watcher_on_every_node_gets_every_update_in_order() {
    let c = cluster(4);
    let out = register_cli(
        &c,
        0,
        "feed",
        "name = \"feed\"\nowner = \"bob\"\npolicy = \"subscription\"\ntimer_interval_s = 1\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        put(&c, 0, "feed", "temp", &json!({"t": -1})).0,
        StatusCode::OK
    );
    // Two watchers on each node.
    let stop = Arc::new(AtomicBool::new(false));
    let watchers: Vec<_> = (0..4)
        .flat_map(|n| {
            [
                watcher(&c, n, "feed", "temp", &stop),
                watcher(&c, n, "feed", "temp", &stop),
            ]
        })
        .collect();
    wait_until("every watcher subscribed", Duration::from_secs(30), || {
        watchers.iter().all(|w| {
            let w = w.lock().unwrap();
            w.iter().any(|e| e.event == "subscribed") && w.iter().any(|e| e.event == "value")
        })
    });
    for w in &watchers {
        let w = w.lock().unwrap();
        let v = w.iter().find(|e| e.event == "value").unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&v.data).unwrap(),
            json!({"t": -1})
        );
    }
    // The readCb of each node's first watcher registered it with the policy.
    let st = c
        .http(1, Method::GET, "/api/apps/feed/state/temp", None)
        .unwrap();
    let st: Value = serde_json::from_slice(&st.body).unwrap();
    assert_eq!(st["state"]["subscribers"], 4, "{st}");

    // Updates from every node, one after another.
    let n = 60;
    for i in 0..n {
        let (s, v) = put(&c, i % 4, "feed", "temp", &json!({"t": i}));
        assert_eq!(s, StatusCode::OK, "update {i}: {v}");
    }
    wait_until("every update everywhere", Duration::from_secs(30), || {
        watchers.iter().all(|w| {
            w.lock()
                .unwrap()
                .iter()
                .filter(|e| e.event == "update")
                .count()
                >= n
        })
    });
    for (i, w) in watchers.iter().enumerate() {
        let w = w.lock().unwrap();
        let ups: Vec<Value> = w
            .iter()
            .filter(|e| e.event == "update")
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        let values: Vec<i64> = ups
            .iter()
            .map(|u| u["value"]["t"].as_i64().unwrap())
            .collect();
        assert_eq!(values, (0..n as i64).collect::<Vec<_>>(), "watcher {i}");
        let seqs: Vec<i64> = ups.iter().map(|u| u["seq"].as_i64().unwrap()).collect();
        assert!(
            seqs.windows(2).all(|s| s[0] < s[1]),
            "watcher {i}: {seqs:?}"
        );
        assert!(
            w.iter().all(|e| e.event != "gap" && e.event != "error"),
            "watcher {i}"
        );
    }
    // The tree did the fan-out: the root's node delivered to its own
    // watchers and forwarded, the others received.
    let delivered: u64 = (0..4)
        .map(|i| status(&c, i)["pubsub"]["delivered"].as_u64().unwrap())
        .sum();
    assert_eq!(delivered, 4 * n as u64);

    // Only an app's keys can be watched.
    let r = c
        .http(0, Method::GET, "/api/watch/x?bucket=default", None)
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // A client that stops reading is cut off with a clear event; the node
    // and the tree go on. (The other watchers stop first, to keep the
    // test's traffic down.)
    stop.store(true, Ordering::Relaxed);
    let mut slow = std::net::TcpStream::connect(c.nodes[2].http).unwrap();
    slow.write_all(b"GET /api/watch/temp?bucket=feed HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let pad = "x".repeat(50_000);
    for i in 0..500 {
        let (s, _) = put(&c, 0, "feed", "temp", &json!({"t": n + i, "pad": pad}));
        assert_eq!(s, StatusCode::OK);
    }
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match slow.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => all.extend_from_slice(&buf[..k]),
        }
    }
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains("event: dropped"),
        "no dropped event in {} bytes",
        all.len()
    );
    assert!(text.contains("fell more than 256 events behind"));
    assert!(status(&c, 2)["pubsub"]["dropped_clients"].as_u64().unwrap() >= 1);
    // A new watcher on that node is served as before.
    let again = watcher(&c, 2, "feed", "temp", &Arc::new(AtomicBool::new(false)));
    wait_until("a new watcher", Duration::from_secs(20), || {
        again
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.event == "subscribed")
    });
    assert_eq!(
        put(&c, 1, "feed", "temp", &json!({"t": "last"})).0,
        StatusCode::OK
    );
    wait_until("the new watcher's update", Duration::from_secs(20), || {
        again
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.event == "update" && e.data.contains("last"))
    });
}

#[test]
fn keepalive_windows_follow_the_arrival_pattern_and_survive_the_root() {
    let c = cluster(3);
    // One handler minute per 10 ms (6000x); timers every 10 handler
    // minutes; a checkpoint at most every 30 handler minutes.
    let (s, v) = register(
        &c,
        0,
        json!({
            "name": "ka", "owner": "carol", "policy": "adaptive-keepalive",
            "timer_interval_ms": 100, "clock_scale": 6000,
            "limits": {"checkpoint_ms": 1_800_000}
        }),
    );
    assert_eq!(s, StatusCode::OK, "{v}");
    for k in ["slow", "quick"] {
        assert_eq!(put(&c, 0, "ka", k, &json!({"fn": k})).0, StatusCode::OK);
    }
    // "slow" is invoked every 90 handler minutes, "quick" every 20.
    let state = |node: usize, k: &str| -> Value {
        let r = c
            .http(node, Method::GET, &format!("/api/apps/ka/state/{k}"), None)
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.message());
        serde_json::from_slice::<Value>(&r.body).unwrap()["state"].clone()
    };
    let w = |s: &Value, f: &str| s[f].as_u64().unwrap_or(0);
    let start = Instant::now();
    let (mut next_slow, mut next_quick) = (start, start);
    let mut cold_mid = None;
    while start.elapsed() < Duration::from_secs(24) {
        let now = Instant::now();
        if now >= next_slow {
            assert_eq!(get(&c, 1, "ka", "slow").0, StatusCode::OK);
            next_slow += Duration::from_millis(900);
            if cold_mid.is_none() && start.elapsed() > Duration::from_secs(10) {
                let st = state(0, "slow");
                cold_mid = Some((w(&st, "n"), w(&st, "cold")));
            }
        }
        if now >= next_quick {
            assert_eq!(get(&c, 2, "ka", "quick").0, StatusCode::OK);
            next_quick += Duration::from_millis(200);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let slow = state(0, "slow");
    let quick = state(0, "quick");
    eprintln!(
        "slow: pw {} ka {} n {} cold {}; quick: pw {} ka {} n {} cold {}",
        w(&slow, "pw"),
        w(&slow, "ka"),
        w(&slow, "n"),
        w(&slow, "cold"),
        w(&quick, "pw"),
        w(&quick, "ka"),
        w(&quick, "n"),
        w(&quick, "cold")
    );
    // Out of the fixed 60-minute fallback, windows fitted to each pattern.
    assert!(w(&slow, "n") >= 20 && w(&quick, "n") >= 80);
    assert!((55..95).contains(&w(&slow, "pw")), "slow pre-warm {slow}");
    assert!(
        (91..200).contains(&w(&slow, "ka")),
        "slow keep-alive {slow}"
    );
    assert!(w(&quick, "pw") < w(&slow, "pw"), "{quick}");
    assert!(
        w(&quick, "ka") < w(&slow, "ka") && w(&quick, "ka") <= 40,
        "{quick}"
    );
    // Pre-warming works: once the windows were learnt, most invocations of
    // the slow function found it warm (with the fixed 60-minute keep-alive
    // every one of them would start cold). Timers landing late on a busy
    // machine may miss a few.
    let (n_mid, cold_mid) = cold_mid.unwrap();
    let (calls, colds) = (w(&slow, "n") - n_mid, w(&slow, "cold") - cold_mid);
    eprintln!("after 10 s: {colds} cold starts in {calls} invocations");
    assert!(
        calls >= 8 && colds * 2 <= calls,
        "{colds} cold starts in {calls} invocations"
    );
    // The windows show as container effects at the roots (this cluster has
    // no function host, so each is also an effect error).
    let all = [0, 1, 2];
    let deploys = app_counter(&c, &all, "ka", &["effects", "deploy_container"]);
    let deletes = app_counter(&c, &all, "ka", &["effects", "delete_container"]);
    assert!(
        deploys >= 10 && deletes >= 10,
        "deploys {deploys}, deletes {deletes}"
    );
    assert!(app_counter(&c, &all, "ka", &["effect_errors"]) >= deploys);

    // SIGKILL the root of "slow": the next root resumes the policy from its
    // checkpoint instead of starting over.
    let root: usize = root_of(&c, "ka", "slow")[1..].parse().unwrap();
    let before = state(root, "slow");
    let mut c = c;
    c.kill(root);
    let other = (0..3).find(|&i| i != root).unwrap();
    let mut after = Value::Null;
    wait_until("a new root for slow", Duration::from_secs(60), || {
        let r = c.http(other, Method::GET, "/api/apps/ka/state/slow", None);
        match r {
            Ok(r) if r.status == StatusCode::OK => {
                let v: Value = serde_json::from_slice(&r.body).unwrap();
                after = v["state"].clone();
                v["root"].as_str() != Some(&format!("n{root}")) && !after.is_null()
            }
            _ => false,
        }
    });
    assert!(
        w(&after, "n") + 2 >= w(&before, "n"),
        "before {before}\nafter {after}"
    );
    assert_eq!(w(&after, "pw"), w(&before, "pw"));
}

#[test]
fn replicas_rise_under_read_load_and_fall_back() {
    let c = cluster(5);
    let (s, v) = register(
        &c,
        0,
        json!({"name": "hot", "owner": "dave", "policy": "smart-replication",
               "replicas": 3, "timer_interval_ms": 2000}),
    );
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        put(&c, 0, "hot", "page", &json!({"html": "<p>hi</p>"})).0,
        StatusCode::OK
    );
    let all = [0, 1, 2, 3, 4];
    wait_until("3 copies", Duration::from_secs(20), || {
        copies(&c, &all, "hot") == 3
    });
    // Read load from every node for a while.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let urls: Vec<String> = c.nodes.iter().map(|n| n.url()).collect();
    let threads: Vec<_> = (0..5)
        .map(|t| {
            let (stop, reads, url) = (stop.clone(), reads.clone(), urls[t].clone());
            std::thread::spawn(move || {
                smol::block_on(async {
                    let (auth, _) = capy::http::split_url(&url).unwrap();
                    let mut cl = capy::http::Client::connect(&auth, Duration::from_secs(10))
                        .await
                        .unwrap();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = cl
                            .request(Method::GET, "/api/kv/page?bucket=hot", None)
                            .await;
                        if matches!(r, Ok(r) if r.status == StatusCode::OK) {
                            reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut peak = 0;
    let mut timeline = Vec::new();
    while t0.elapsed() < Duration::from_secs(8)
        || (peak < 5 && t0.elapsed() < Duration::from_secs(40))
    {
        let n = copies(&c, &all, "hot");
        if timeline.last().map(|x: &(u64, u128)| x.0) != Some(n) {
            timeline.push((n, t0.elapsed().as_millis()));
        }
        peak = peak.max(n);
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("copies under load (count, ms): {timeline:?}");
    assert!(
        copies(&c, &all, "hot") >= 4,
        "copies fell while the load went on"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let rate = reads.load(std::sync::atomic::Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    eprintln!(
        "{rate:.0} reads/s; peak {peak} copies after {:?}",
        t0.elapsed()
    );
    assert!(
        peak >= 4,
        "copies never rose above 3 under {rate:.0} reads/s"
    );
    // The handler asked for it (not the store on its own).
    assert!(app_counter(&c, &all, "hot", &["effects", "set_replicas"]) >= 1);
    // Load gone: one replica fewer per interval, down to 3.
    let t1 = Instant::now();
    wait_until("copies back to 3", Duration::from_secs(90), || {
        copies(&c, &all, "hot") == 3
    });
    eprintln!("back to 3 copies {:?} after the load stopped", t1.elapsed());
    let (s, v) = get(&c, 3, "hot", "page");
    assert_eq!((s, v["html"].clone()), (StatusCode::OK, json!("<p>hi</p>")));
}

#[test]
fn hostile_handlers_are_stopped_and_the_node_keeps_serving() {
    let c = cluster(3);
    // A victim app with data, and plain data.
    let (s, _) = register(
        &c,
        0,
        json!({"name": "victim", "owner": "v", "policy": "subscription"}),
    );
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        put(&c, 0, "victim", "secret", &json!("s3cret")).0,
        StatusCode::OK
    );
    let r = c
        .http(0, Method::PUT, "/api/kv/plain", Some(b"kept".to_vec()))
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);

    let cases: &[(&str, &str, &str)] = &[
        ("loop", "while true do end", "budget"),
        ("coloop", "local co = coroutine and coroutine.wrap(function() while true do end end) if co then co() end while true do end", "budget"),
        ("meta", "local t = setmetatable({}, {__index = function(t, k) while true do end end}) return t.x", "budget"),
        ("gc", "setmetatable({}, {__gc = function() while true do end end})", "__gc"),
        ("membomb", "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1024) .. i end", "memory"),
        ("rep", "return string.rep('x', 1 << 40)", "memory"),
        ("deep", "local function f(n) return f(n + 1) + 1 end return f(1)", "stack|memory|budget"),
        ("os", "return os.execute('true')", "os"),
        ("io", "return io.open('/etc/passwd')", "io"),
        ("require", "return require('socket')", "require"),
        ("loadlib", "return package.loadlib('libc.so.6', 'system')", "package"),
        ("debug", "return debug.getinfo(1)", "debug"),
        ("dofile", "return dofile('/etc/passwd')", "dofile"),
        ("bytecode", "return load('\\27Lua')", "binary"),
        ("steal", "return sys.read('victim/secret')", "may not touch"),
        ("vandal", "sys.write(nil, 'victim/secret', 'gone') return 1", "may not touch"),
    ];
    for (name, body, want) in cases {
        let src = format!(
            "function readCb(caller, args)\n if args and args.ok then return 'alive' end\n {body}\nend"
        );
        let (s, v) = register(
            &c,
            1,
            json!({"name": format!("h-{name}"), "owner": "eve", "source": src,
                   "limits": {"wall_ms": 2000}}),
        );
        assert_eq!(s, StatusCode::OK, "{name}: {v}");
        assert_eq!(
            put(&c, 0, &format!("h-{name}"), "k", &json!(1)).0,
            StatusCode::OK,
            "{name}"
        );
        let t = Instant::now();
        let (s, v) = get(&c, 2, &format!("h-{name}"), "k");
        let msg = v["error"].as_str().unwrap_or("").to_lowercase();
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {v}");
        assert!(
            want.split('|').any(|w| msg.contains(w)),
            "{name}: {msg:?} lacks {want:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{name} took {:?}",
            t.elapsed()
        );
        // The same app still answers a harmless call.
        let r = c
            .http(
                2,
                Method::GET,
                &format!("/api/apps/h-{name}/kv/k?args=%7B%22ok%22%3Atrue%7D"),
                None,
            )
            .unwrap();
        assert_eq!(&r.body[..], b"\"alive\"", "{name}");
    }
    // A failing update leaves the stored value as it was.
    let (s, _) = register(
        &c,
        0,
        json!({"name": "badupd", "owner": "eve",
        "source": "function updateCb(c, v) error('no updates today') end"}),
    );
    assert_eq!(s, StatusCode::OK);
    assert_eq!(put(&c, 0, "badupd", "k", &json!("v1")).0, StatusCode::OK);
    let (s, v) = put(&c, 1, "badupd", "k", &json!("v2"));
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("no updates today"),
        "{v}"
    );
    assert_eq!(get(&c, 2, "badupd", "k").1, json!("v1"));
    // A timer that never ends is stopped every interval; the node goes on.
    let (s, _) = register(
        &c,
        0,
        json!({"name": "badtimer", "owner": "eve",
        "timer_interval_ms": 200, "source": "function timerCb() while true do end end"}),
    );
    assert_eq!(s, StatusCode::OK);
    assert_eq!(put(&c, 0, "badtimer", "k", &json!(0)).0, StatusCode::OK);
    wait_until(
        "the timer's failures counted",
        Duration::from_secs(30),
        || app_counter(&c, &[0, 1, 2], "badtimer", &["errors"]) >= 3,
    );

    // The victim's data is untouched, and every node still serves.
    for n in 0..3 {
        assert_eq!(get(&c, n, "victim", "secret").1, json!("s3cret"));
        let r = c.http(n, Method::GET, "/api/kv/plain", None).unwrap();
        assert_eq!(&r.body[..], b"kept");
        assert!(status(&c, n)["joined"].as_bool().unwrap());
    }
    let errors = app_counter(&c, &[0, 1, 2], "h-loop", &["errors"]);
    assert!(errors >= 1);
    let logs: String = (0..3)
        .map(|i| std::fs::read_to_string(c.nodes[i].dir.join("node.log")).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("handler readCb failed"),
        "no log line for failed handlers"
    );
}

//! Objects on a real cluster: separate capy processes on loopback, real
//! QUIC, real redb files, real podman running the test function image
//! (tests/fn-runtime). The example package (examples/video.yaml) is
//! deployed and driven end to end; ordering, exactly-once across a SIGKILL
//! of an object's root, access modifiers, presigned URLs and failed TASK
//! calls are checked. Podman is set up when missing; never skipped.

use capy::cli::cluster::{free_port, LocalCluster};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_capy"))
}

/// Podman answering and the function image archive, made if missing; the
/// nodes started here find the socket in their environment.
fn image_archive() -> &'static PathBuf {
    let env = capy::containers::testenv::test_env();
    if std::env::var("CAPY_PODMAN_SOCKET").is_err() {
        std::env::set_var("CAPY_PODMAN_SOCKET", &env.socket);
    }
    &env.archive_path
}

/// The address containers reach the host at: the podman network's gateway.
fn container_gateway() -> String {
    let out = Command::new("podman")
        .args([
            "network",
            "inspect",
            "podman",
            "--format",
            "{{range .Subnets}}{{.Gateway}}{{end}}",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let g = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if g.is_empty() {
                "10.88.0.1".into()
            } else {
                g
            }
        }
        _ => "10.88.0.1".into(),
    }
}

/// A started, converged cluster whose nodes serve presigned URLs where
/// containers reach them, with the example package's directory (the
/// package and the image archive) ready.
fn cluster(n: usize) -> (LocalCluster, PathBuf) {
    let archive = image_archive().clone();
    let mut c = LocalCluster::prepare(bin(), n, 1).expect("prepare cluster");
    let gw = container_gateway();
    for node in c.nodes.iter_mut() {
        let p = free_port().expect("port");
        node.extra_args = vec![
            "--blob-http".into(),
            format!("0.0.0.0:{p}"),
            "--blob-url".into(),
            format!("http://{gw}:{p}"),
        ];
    }
    c.start_all().expect("start");
    c.wait_converged(Duration::from_secs(60)).expect("converge");
    let dir = c.root.join("pkg");
    std::fs::create_dir_all(&dir).unwrap();
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/video.yaml"))
            .unwrap();
    std::fs::write(dir.join("video.yaml"), text).unwrap();
    std::fs::copy(&archive, dir.join("fn.tar")).expect("copy the image archive");
    (c, dir)
}

fn capy(c: &LocalCluster, node: usize, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env("CAPY_NODE", c.nodes[node].url())
        .output()
        .expect("run capy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn call(
    c: &LocalCluster,
    node: usize,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let r = c
        .http(node, method, path, body.map(|b| b.to_string().into_bytes()))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

fn ok(c: &LocalCluster, node: usize, method: Method, path: &str, body: Option<Value>) -> Value {
    let (s, v) = call(c, node, method, path, body);
    assert!(s.is_success(), "{path}: {s} {v}");
    v
}

fn new_obj(c: &LocalCluster, node: usize, class: &str, state: Value) -> String {
    let v = ok(
        c,
        node,
        Method::POST,
        "/api/obj",
        Some(json!({ "class": class, "state": state })),
    );
    v["id"].as_str().expect("id").to_string()
}

/// The status of invocation `inv` once it is no longer pending.
fn settled(c: &LocalCluster, node: usize, inv: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let s = ok(c, node, Method::GET, &format!("/api/inv/{inv}"), None);
        if s["status"] != "pending" {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "invocation {inv} not applied: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn deploy(c: &LocalCluster, dir: &Path) {
    let (code, out, err) = capy(
        c,
        0,
        &["pkg", "deploy", dir.join("video.yaml").to_str().unwrap()],
    );
    assert_eq!(code, 0, "deploy: {out} {err}");
}

#[test]
fn the_example_package_end_to_end() {
    let (c, dir) = cluster(3);

    // A package with errors is refused whole, naming file, line and field.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "name: broken\nclasses:\n  - name: A\n    parent: Nope\n  - name: B\n    functions:\n      - name: f\n        type: TASK\n        timeout: 9999\n        image: x\n").unwrap();
    let (code, _, err) = capy(&c, 1, &["pkg", "deploy", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bad.yaml:4: classes[0].parent: no class \"Nope\""),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:9: classes[1].functions[0].timeout"),
        "{err}"
    );
    let (_, ls, _) = capy(&c, 2, &["pkg", "ls"]);
    assert!(
        !ls.contains("broken"),
        "a refused package was registered: {ls}"
    );

    deploy(&c, &dir);
    let (code, ls, _) = capy(&c, 2, &["pkg", "ls"]);
    assert_eq!(code, 0);
    assert!(ls.contains("\"video\""), "{ls}");

    // Objects through the CLI, on different nodes.
    let (code, out, err) = capy(
        &c,
        1,
        &["obj", "new", "video.Video", r#"{"title": "cats"}"#],
    );
    assert_eq!(code, 0, "{err}");
    let v = out.trim().to_string();
    let hd = new_obj(&c, 2, "video.HdVideo", json!({"title": "cats in HD"}));
    let list = new_obj(&c, 0, "video.Playlist", json!({}));
    let (code, out, _) = capy(&c, 2, &["obj", "get", &v]);
    assert_eq!(code, 0);
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["state"]["title"], "cats");
    assert_eq!(got["class"], "video.Video");
    // INTERNAL and PRIVATE fields are not shown to clients.
    assert!(got["state"].get("codec").is_none(), "{got}");

    // A TASK function gets the state and returns the new one.
    let (code, out, err) = capy(&c, 0, &["obj", "invoke", &v, "view"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"views\":1"), "{out}");

    // Blobs: a client writes one, TASK functions re-encode it through
    // presigned URLs; the derived class's override runs for HdVideo.
    for (id, node) in [(&v, 0), (&hd, 1)] {
        let r = c
            .http(
                node,
                Method::PUT,
                &format!("/api/obj/{id}/blobs/video"),
                Some(b"frames".to_vec()),
            )
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.message());
    }
    ok(
        &c,
        1,
        Method::POST,
        &format!("/api/obj/{v}/transcode"),
        None,
    );
    ok(
        &c,
        2,
        Method::POST,
        &format!("/api/obj/{hd}/transcode"),
        None,
    );
    let blob = |id: &str| {
        c.http(0, Method::GET, &format!("/api/obj/{id}/blobs/video"), None)
            .unwrap()
    };
    assert_eq!(blob(&v).body, b"FRAMES+sd".to_vec());
    assert_eq!(blob(&hd).body, b"FRAMES+hd".to_vec());
    let before = ok(&c, 0, Method::GET, &format!("/api/obj/{v}"), None);
    assert_eq!(before["state"]["size"], 9);

    // A failed TASK call leaves state and blobs as they were, though the
    // function wrote a blob version before failing.
    let (s, e) = call(
        &c,
        2,
        Method::POST,
        &format!("/api/obj/{v}/transcode"),
        Some(json!({"fail_after_put": true, "suffix": "!!"})),
    );
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("failing after the blob write"),
        "{e}"
    );
    let after = ok(&c, 1, Method::GET, &format!("/api/obj/{v}"), None);
    assert_eq!(after["version"], before["version"]);
    assert_eq!(after["state"], before["state"]);
    assert_eq!(after["blobs"], before["blobs"]);
    assert_eq!(blob(&v).body, b"FRAMES+sd".to_vec());
    // A function that does not exist in the container at all fails too.
    let (s, _) = call(
        &c,
        2,
        Method::POST,
        &format!("/api/obj/{v}/view"),
        Some(json!({"action": "garbage"})),
    );
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(
        ok(&c, 1, Method::GET, &format!("/api/obj/{v}"), None)["state"],
        before["state"]
    );

    // Access modifiers: 403 with a message.
    let (s, e) = call(&c, 0, Method::POST, &format!("/api/obj/{v}/audit"), None);
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(e["error"].as_str().unwrap().contains("INTERNAL"), "{e}");
    let (s, e) = call(
        &c,
        0,
        Method::POST,
        &format!("/api/obj/{v}/update"),
        Some(json!({"owner_key": "k"})),
    );
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    assert!(e["error"].as_str().unwrap().contains("PRIVATE"), "{e}");
    let (s, e) = call(&c, 1, Method::DELETE, &format!("/api/obj/{v}"), None);
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    // A PRIVATE blob is not even listed for a client: 404, as if absent.
    let (s, e) = call(
        &c,
        1,
        Method::GET,
        &format!("/api/obj/{v}/blobs/master"),
        None,
    );
    assert_eq!(s, StatusCode::NOT_FOUND, "{e}");
    assert!(e.to_string().contains("not PUBLIC"), "{e}");
    let (s, e) = call(
        &c,
        1,
        Method::GET,
        &format!("/api/kv/{v}?bucket=capy.obj"),
        None,
    );
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let (code, _, err) = capy(&c, 0, &["obj", "invoke", &v, "audit"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("INTERNAL") && err.contains("403"), "{err}");

    // Presigned URLs: valid ones work on any node; tampered and expired
    // ones get 403.
    let u = ok(
        &c,
        0,
        Method::GET,
        &format!("/api/obj/{v}/blobs/video/url?ttl=2"),
        None,
    );
    let url = u["url"].as_str().unwrap().to_string();
    let path = &url[url.find("/blob/").unwrap()..];
    for n in 0..3 {
        let r = c.http(n, Method::GET, path, None).unwrap();
        assert_eq!(r.status, StatusCode::OK, "node {n}: {}", r.message());
        assert_eq!(r.body, b"FRAMES+sd".to_vec());
    }
    let tampered = [
        path.replace("/video/", "/master/"),
        path.replace("expires=", "expires=9"),
        // The signature's last digit changed (to one it is not).
        format!(
            "{}{}",
            &path[..path.len() - 1],
            if path.ends_with('0') { '1' } else { '0' }
        ),
    ];
    for t in &tampered {
        let r = c.http(1, Method::GET, t, None).unwrap();
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{t}: {}", r.message());
    }
    let r = c.http(1, Method::PUT, path, Some(b"x".to_vec())).unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN, "a GET URL used to PUT");
    std::thread::sleep(Duration::from_secs(4));
    let r = c.http(2, Method::GET, path, None).unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.message().contains("expired"), "{}", r.message());

    // MACRO: audit (INTERNAL, allowed inside the package), transcode and
    // thumbnail in parallel, then label the new Image and add it to the
    // playlist.
    let args = json!({"caption": "cute", "playlist": list, "invocation": "publish-1"});
    let r = ok(
        &c,
        2,
        Method::POST,
        &format!("/api/obj/{hd}/publish"),
        Some(args.clone()),
    );
    let thumb = r["created"]["thumb"]
        .as_str()
        .expect("thumb id")
        .to_string();
    assert_eq!(r["output"]["state"]["labels"], json!(["cute"]), "{r}");
    let img = ok(&c, 0, Method::GET, &format!("/api/obj/{thumb}"), None);
    assert_eq!(img["class"], "video.Image");
    assert_eq!(img["state"]["caption"], "cute");
    assert_eq!(img["state"]["source"], hd.as_str());
    let pl = ok(&c, 1, Method::GET, &format!("/api/obj/{list}"), None);
    assert_eq!(pl["state"]["items"], json!([thumb]));
    assert_eq!(blob(&hd).body, b"FRAMES+HD+hd".to_vec());
    // `immutable`: the same invocation re-run gets the same output object.
    let r2 = ok(
        &c,
        0,
        Method::POST,
        &format!("/api/obj/{hd}/publish"),
        Some(args),
    );
    assert_eq!(r2["created"]["thumb"], thumb.as_str());
    // A step that fails fails the MACRO with its name.
    let (s, e) = call(
        &c,
        0,
        Method::POST,
        &format!("/api/obj/{v}/publish"),
        Some(json!({"caption": "x", "playlist": "nope"})),
    );
    assert!(!s.is_success());
    assert!(e["error"].as_str().unwrap().contains("step list"), "{e}");

    // Async calls: an invocation id, then its result.
    let a = ok(
        &c,
        1,
        Method::POST,
        &format!("/api/obj/{v}/view?async=1"),
        None,
    );
    let inv = a["invocation"].as_str().unwrap().to_string();
    let s = settled(&c, 2, &inv, Duration::from_secs(30));
    assert_eq!(s["status"], "done", "{s}");
    assert_eq!(s["output"]["state"]["views"], 2, "{s}");
    let (code, out, _) = capy(&c, 0, &["inv", &inv]);
    assert_eq!(code, 0);
    assert!(out.contains("done"), "{out}");

    // Removing the package leaves its objects uncallable.
    let (code, _, err) = capy(&c, 0, &["pkg", "rm", "video"]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_secs(3));
    let (s, _) = call(&c, 1, Method::POST, &format!("/api/obj/{v}/view"), None);
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[test]
fn concurrent_calls_to_one_object_apply_in_one_order() {
    let (c, dir) = cluster(3);
    deploy(&c, &dir);
    let id = new_obj(&c, 0, "video.Playlist", json!({}));
    let (clients, per) = (6usize, 40usize);
    let urls: Vec<String> = (0..clients).map(|k| c.nodes[k % 3].url()).collect();
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = urls
            .iter()
            .enumerate()
            .map(|(k, url)| {
                let id = id.clone();
                s.spawn(move || {
                    let mut errors = Vec::new();
                    for i in 0..per {
                        // Each call reads the state in the container and
                        // returns it incremented: any interleaving of two
                        // calls would lose an increment.
                        match smol::block_on(capy::http::call(
                            &format!("{url}/api/obj/{id}/play"),
                            Method::POST,
                            None,
                            Duration::from_secs(60),
                        )) {
                            Ok(r) if r.status == StatusCode::OK => {}
                            Ok(r) => errors.push(format!(
                                "client {k} call {i}: {} {}",
                                r.status,
                                r.message()
                            )),
                            Err(e) => errors.push(format!("client {k} call {i}: {e}")),
                        }
                    }
                    errors
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    assert!(errors.is_empty(), "failed calls: {errors:?}");
    let o = ok(&c, 2, Method::GET, &format!("/api/obj/{id}"), None);
    assert_eq!(
        o["state"]["plays"],
        (clients * per) as u64,
        "lost updates: {o}"
    );
    assert_eq!(o["version"], (clients * per + 1) as u64, "{o}");
}

fn root_of(c: &LocalCluster, via: usize, id: &str) -> usize {
    let v = ok(
        c,
        via,
        Method::GET,
        &format!("/api/root/{id}?bucket=capy.obj"),
        None,
    );
    let name = v["root"]["name"].as_str().unwrap().to_string();
    c.nodes
        .iter()
        .position(|n| n.name == name)
        .expect("root is a node of the cluster")
}

#[test]
fn async_calls_are_applied_exactly_once_across_a_sigkill_of_the_root() {
    let (mut c, dir) = cluster(4);
    deploy(&c, &dir);
    let id = new_obj(&c, 0, "video.Playlist", json!({}));
    let root = root_of(&c, 0, &id);
    let entries: Vec<usize> = (0..4).filter(|&n| n != root).collect();
    // Three clients submit concurrently through the other nodes, so the
    // root holds a backlog in its log when it is killed.
    let urls: Vec<String> = entries.iter().map(|&n| c.nodes[n].url()).collect();
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let per = 100u64;
    let results: Vec<(u64, Option<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = urls
            .iter()
            .enumerate()
            .map(|(k, url)| {
                let (id, sent) = (id.clone(), &sent);
                s.spawn(move || {
                    let mut out = Vec::new();
                    for j in 0..per {
                        let item = k as u64 * 1000 + j;
                        let r = smol::block_on(capy::http::call(
                            &format!("{url}/api/obj/{id}/add?async=1"),
                            Method::POST,
                            Some((
                                json!({ "item": item }).to_string().into_bytes(),
                                "application/json",
                            )),
                            Duration::from_secs(30),
                        ));
                        let inv = match r {
                            Ok(r) if r.status == StatusCode::ACCEPTED => {
                                serde_json::from_slice::<Value>(&r.body)
                                    .ok()
                                    .and_then(|v| v["invocation"].as_str().map(str::to_string))
                            }
                            _ => None,
                        };
                        out.push((item, inv));
                        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    out
                })
            })
            .collect();
        let at = |n: usize| {
            while sent.load(std::sync::atomic::Ordering::Relaxed) < n {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        at(80);
        c.kill(root);
        at(140);
        let during = root_of(&c, entries[0], &id);
        assert_ne!(during, root, "the killed node is still named the root");
        eprintln!(
            "root {} killed; {} took over",
            c.nodes[root].name, c.nodes[during].name
        );
        at(200);
        c.start(root).expect("restart the root");
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut accepted: BTreeMap<u64, String> = BTreeMap::new();
    let mut refused = 0;
    for (item, inv) in results {
        match inv {
            Some(i) => {
                accepted.insert(item, i);
            }
            None => refused += 1,
        }
    }
    c.wait_http(root, Duration::from_secs(30))
        .expect("root back");
    eprintln!("{} accepted, {refused} refused", accepted.len());
    assert!(
        accepted.len() >= 200,
        "too few accepted: {}",
        accepted.len()
    );
    // Wait until every accepted call is applied.
    let deadline = Instant::now() + Duration::from_secs(120);
    let o = loop {
        let (s, o) = call(&c, entries[0], Method::GET, &format!("/api/obj/{id}"), None);
        if s.is_success() && o["pending"] == 0 {
            break o;
        }
        assert!(Instant::now() < deadline, "log not drained: {s} {o}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let items: Vec<u64> = o["state"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for x in &items {
        *counts.entry(*x).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "applied twice: {twice:?}");
    let lost: Vec<_> = accepted
        .keys()
        .filter(|i| !counts.contains_key(i))
        .collect();
    assert!(lost.is_empty(), "accepted but lost: {lost:?}");
    let extra = items.len() - accepted.len();
    eprintln!(
        "{} applied; {extra} of them were not acknowledged to the client",
        items.len()
    );
    // Each client's calls are applied in the order they were accepted.
    for k in 0..3u64 {
        let acc: Vec<u64> = items
            .iter()
            .copied()
            .filter(|i| accepted.contains_key(i) && i / 1000 == k)
            .collect();
        let mut sorted = acc.clone();
        sorted.sort();
        assert_eq!(
            acc, sorted,
            "client {k}'s calls not applied in acceptance order"
        );
    }
    // Each accepted invocation reports its result.
    let (_, inv) = accepted.iter().next_back().unwrap();
    let s = ok(
        &c,
        entries[1],
        Method::GET,
        &format!("/api/inv/{inv}"),
        None,
    );
    assert_eq!(s["status"], "done", "{s}");
}

const METERS: &str = r#"
name: meters
classes:
  - name: Meter
    state:
      fields:
        - { name: reading, type: number, default: 0 }
        - { name: peak, type: number, default: 0 }
        - { name: owner, type: string }
        - { name: secret, type: string, access: PRIVATE }
    handler: |
      function createCb(caller, st)
        st.owner = caller
        st.secret = "kept from readers"
        return st
      end
      function updateCb(caller, st)
        if st.reading < 0 then error("a reading is never negative") end
        if st.reading > st.peak then st.peak = st.reading end
        return st
      end
      function readCb(caller, args)
        local o = sys.read(sys.key())
        o.unit = args.unit or "kWh"
        return o
      end
  - name: SubMeter
    parent: Meter
  - name: Stuck
    parent: Meter
    handler: |
      function updateCb(caller, st) while true do end end
  - name: Leaky
    parent: Meter
    handler: |
      function updateCb(caller, st) sys.write(nil, "elsewhere", st) return st end
  - name: Nosy
    parent: Meter
    handler: |
      function updateCb(caller, st)
        local other = sys.read("someone-else")
        return st
      end
  - name: Clip
    state:
      fields:
        - { name: size, type: integer, default: 0 }
        - { name: edits, type: integer, default: 0 }
      blobs:
        - { name: video }
    functions:
      - name: transcode
        type: TASK
        image: fn.tar
        config: {action: transcode, src: video, dst: video}
    handler: |
      function updateCb(caller, st)
        if st.size > 8 then error("clip too long: " .. st.size .. " bytes") end
        st.edits = sys.read(sys.key()).edits + 1
        return st
      end
"#;

#[test]
fn class_handlers_shape_object_state_and_a_failing_one_changes_nothing() {
    let (c, dir) = cluster(3);
    let deploy_text = |name: &str, text: &str| {
        let f = dir.join(name);
        std::fs::write(&f, text).unwrap();
        capy(&c, 0, &["pkg", "deploy", f.to_str().unwrap()])
    };
    // A handler that does not load, or wants a timer, is refused at deploy,
    // naming the class's handler field.
    let broken = METERS.replace(
        "return st\n      end\n      function updateCb",
        "return st\n      function updateCb",
    );
    let (code, _, err) = deploy_text("broken.yaml", &broken);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("classes[0].handler"), "{err}");
    let timer = "name: t\nclasses:\n  - name: A\n    handler: |\n      function timerCb() end\n";
    let (code, _, err) = deploy_text("timer.yaml", timer);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("timerCb"), "{err}");
    let (code, out, err) = deploy_text("meters.yaml", METERS);
    assert_eq!(code, 0, "{out} {err}");

    // createCb fills the owner and a PRIVATE field; readCb returns the whole
    // state with a unit added, of which a client gets all but that field.
    let id = new_obj(&c, 1, "meters.Meter", json!({}));
    let o = ok(&c, 2, Method::GET, &format!("/api/obj/{id}"), None);
    assert_eq!(o["state"]["owner"], "client", "{o}");
    assert_eq!(o["state"]["unit"], "kWh", "{o}");
    assert!(o["state"].get("secret").is_none(), "{o}");

    // updateCb keeps the peak, whichever node the call enters by.
    let up = |node: usize, v: f64| {
        call(
            &c,
            node,
            Method::POST,
            &format!("/api/obj/{id}/update"),
            Some(json!({ "reading": v })),
        )
    };
    let (s, r) = up(0, 5.0);
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["peak"], 5.0, "{r}");
    let (s, r) = up(1, 3.0);
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(
        (r["reading"].as_f64(), r["peak"].as_f64()),
        (Some(3.0), Some(5.0)),
        "{r}"
    );
    let before = ok(&c, 0, Method::GET, &format!("/api/obj/{id}"), None);

    // A refused update: a clear error, nothing committed.
    let (s, r) = up(2, -1.0);
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{r}");
    assert!(r.to_string().contains("never negative"), "{r}");
    // The same through the exactly-once log: the invocation fails.
    let a = ok(
        &c,
        1,
        Method::POST,
        &format!("/api/obj/{id}/update?async=1"),
        Some(json!({ "reading": -2 })),
    );
    let inv = a["invocation"].as_str().unwrap().to_string();
    let s = settled(&c, 2, &inv, Duration::from_secs(30));
    assert_eq!(s["status"], "failed", "{s}");
    assert!(s["error"].to_string().contains("never negative"), "{s}");
    let after = ok(&c, 0, Method::GET, &format!("/api/obj/{id}"), None);
    assert_eq!(
        after["state"], before["state"],
        "a failed update changed the state"
    );
    assert_eq!(after["version"], before["version"]);

    // readCb gets the built-in get's arguments.
    let g = ok(
        &c,
        1,
        Method::POST,
        &format!("/api/obj/{id}/get"),
        Some(json!({ "unit": "MWh" })),
    );
    assert_eq!(
        (g["unit"].as_str(), g["peak"].as_f64()),
        (Some("MWh"), Some(5.0)),
        "{g}"
    );

    // A subclass without a handler runs its parent's.
    let sub = new_obj(&c, 0, "meters.SubMeter", json!({}));
    let o = ok(&c, 1, Method::GET, &format!("/api/obj/{sub}"), None);
    assert_eq!(
        (o["state"]["owner"].as_str(), o["state"]["unit"].as_str()),
        (Some("client"), Some("kWh")),
        "{o}"
    );

    // An endless loop and an effect the object handler may not have: the
    // call fails, the object and the node go on.
    for (class, want) in [
        ("Stuck", "instructions"),
        ("Leaky", "sys.write"),
        ("Nosy", "read another key"),
    ] {
        let oid = new_obj(&c, 0, &format!("meters.{class}"), json!({}));
        let (s, r) = call(
            &c,
            2,
            Method::POST,
            &format!("/api/obj/{oid}/update"),
            Some(json!({ "reading": 7 })),
        );
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{class}: {r}");
        assert!(r.to_string().contains(want), "{class}: {r}");
        let o = ok(&c, 0, Method::GET, &format!("/api/obj/{oid}"), None);
        assert_eq!(o["state"]["reading"], 0, "{class}: {o}");
        assert_eq!(o["version"], 1, "{class}: {o}");
    }
    // A TASK's new state goes through updateCb too: accepted, the new blob
    // version is adopted; refused (through the exactly-once log), the old
    // blob version and state stay, and stay readable after later commits.
    let clip = new_obj(&c, 0, "meters.Clip", json!({}));
    let blob = format!("/api/obj/{clip}/blobs/video");
    let put = |body: &[u8]| {
        let r = c.http(1, Method::PUT, &blob, Some(body.to_vec())).unwrap();
        assert!(r.status.is_success(), "put blob: {}", r.status);
    };
    let get_blob = || {
        let r = c.http(2, Method::GET, &blob, None).unwrap();
        assert!(r.status.is_success(), "get blob: {}", r.status);
        String::from_utf8_lossy(&r.body).to_string()
    };
    put(b"abc");
    let r = ok(
        &c,
        0,
        Method::POST,
        &format!("/api/obj/{clip}/transcode"),
        None,
    );
    assert_eq!(get_blob(), "ABC+t", "{r}");
    let o = ok(&c, 0, Method::GET, &format!("/api/obj/{clip}"), None);
    assert_eq!(
        (o["state"]["size"].as_u64(), o["state"]["edits"].as_u64()),
        (Some(5), Some(1)),
        "{o}"
    );
    put(b"abcdefghij");
    let a = ok(
        &c,
        1,
        Method::POST,
        &format!("/api/obj/{clip}/transcode?async=1"),
        None,
    );
    let inv = a["invocation"].as_str().unwrap().to_string();
    let s = settled(&c, 2, &inv, Duration::from_secs(60));
    assert_eq!(s["status"], "failed", "{s}");
    assert!(s["error"].to_string().contains("clip too long"), "{s}");
    // Later commits on the object must not purge the version it points to.
    let (s, r) = call(
        &c,
        0,
        Method::POST,
        &format!("/api/obj/{clip}/update"),
        Some(json!({ "size": 3 })),
    );
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(get_blob(), "abcdefghij");
    let o = ok(&c, 0, Method::GET, &format!("/api/obj/{clip}"), None);
    assert_eq!(
        (o["state"]["size"].as_u64(), o["state"]["edits"].as_u64()),
        (Some(3), Some(2)),
        "{o}"
    );

    // The handler runs show in the metrics of the nodes that ran them.
    let runs: u64 = (0..3)
        .map(|n| {
            let r = c.http(n, Method::GET, "/metrics", None).expect("metrics");
            String::from_utf8_lossy(&r.body)
                .lines()
                .filter(|l| l.starts_with("capy_handler_runs_total{app=\"meters.Meter\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    assert!(
        runs >= 8,
        "handler runs of meters.Meter in /metrics: {runs}"
    );
}

//! On the gateway: board profiles and the storage limit, systemd's notify
//! protocol and unit, /metrics in Prometheus' text format, and the status
//! page in a real headless Chromium. All against real `capy` processes.

use capy::cli::cluster::{free_port, LocalCluster};
use hyper::{Method, StatusCode};
use std::collections::{BTreeMap, HashSet};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_capy"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn put(c: &LocalCluster, node: usize, key: &str, value: Vec<u8>) -> hyper::StatusCode {
    c.http(node, Method::PUT, &format!("/api/kv/{key}"), Some(value))
        .map(|r| r.status)
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
}

// ---- boards ---------------------------------------------------------------

#[test]
fn boards_are_listed_and_an_unknown_one_names_the_known() {
    let out = Command::new(bin()).arg("boards").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for b in ["rpi4", "rpi3", "gateway-a64", "x86-edge"] {
        assert!(text.contains(b), "{b} missing from:\n{text}");
    }
    assert!(text.contains("armv7-unknown-linux-musleabihf"), "{text}");

    let out = Command::new(bin())
        .args(["boards", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rpi4 = v
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "rpi4")
        .unwrap();
    assert_eq!(rpi4["capacity"], 1.0);
    assert_eq!(rpi4["storage_limit"], 64u64 << 30);

    let out = Command::new(bin())
        .args(["run", "--board", "rpi9", "--data"])
        .arg(std::env::temp_dir().join("capy-never-created"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown board \"rpi9\"") && err.contains("rpi4, rpi3, gateway-a64, x86-edge"),
        "{err}"
    );
}

/// Board from the config file, the file's own keys over the board's, flags
/// over both; a put past the storage limit gets 507 and a clear message,
/// and nothing is stored.
#[test]
fn board_layers_apply_and_storage_limit_refuses_with_507() {
    let mut c = LocalCluster::prepare(bin(), 0, 8).unwrap();
    c.add_node(8, "hall-a").unwrap();
    let cfg = c.root.join("capy.toml");
    std::fs::write(
        &cfg,
        "board = \"rpi3\"\nstorage_limit = \"2 KiB\"\nvnodes = 6\nmax_vnodes = 3\nvnode_game = false\n",
    )
    .unwrap();
    c.nodes[0].extra_args = vec!["--config".into(), cfg.display().to_string()];
    c.start_all().unwrap();
    c.wait_converged(Duration::from_secs(30)).unwrap();
    let s = c.status(0).unwrap();
    assert_eq!(s["node"]["board"], "rpi3");
    assert_eq!(s["node"]["zone"], "hall-a");
    assert_eq!(s["store"]["limit"], 2048);
    // vnodes = 6 asked, the file's max_vnodes = 3 (over the board's 32) caps it.
    assert_eq!(s["vnodes"].as_array().unwrap().len(), 3, "{s}");
    assert_eq!(s["node"]["max_vnodes"], 3);

    assert_eq!(put(&c, 0, "a", vec![b'a'; 1500]), StatusCode::OK);
    let r = c
        .http(0, Method::PUT, "/api/kv/b", Some(vec![b'b'; 1000]))
        .unwrap();
    assert_eq!(r.status, StatusCode::INSUFFICIENT_STORAGE);
    let msg = r.message();
    assert!(
        msg.contains("storage limit") && msg.contains("2048"),
        "{msg}"
    );
    let r = c.http(0, Method::GET, "/api/kv/b", None).unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Deletes free space and are never refused.
    let r = c.http(0, Method::DELETE, "/api/kv/a", None).unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(put(&c, 0, "b", vec![b'b'; 1000]), StatusCode::OK);
    let m = c.http(0, Method::GET, "/metrics", None).unwrap();
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("capy_store_errors_total{op=\"full\"} 1"),
        "{text}"
    );
}

// ---- systemd --------------------------------------------------------------

/// READY=1, then WATCHDOG=1 at half the watchdog period, then STOPPING=1 on
/// SIGTERM, all on a NOTIFY_SOCKET this test owns: the notify protocol
/// works without a running systemd.
#[test]
fn notify_socket_gets_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let quic = free_port().unwrap();
    let http = free_port().unwrap();
    // `exec` keeps the shell's pid, so WATCHDOG_PID names capy itself.
    let t0 = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" run --data \"$1\" --listen \"$2\" --http \"$3\"")
        .arg(bin())
        .arg(tmp.path().join("data"))
        .arg(format!("127.0.0.1:{quic}"))
        .arg(format!("127.0.0.1:{http}"))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env("CAPY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got: Vec<(Duration, String)> = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(20);
    let wants = |got: &Vec<(Duration, String)>, w: &str| got.iter().any(|(_, m)| m.contains(w));
    while Instant::now() < deadline && !(wants(&got, "READY=1") && wants(&got, "WATCHDOG=1")) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push((t0.elapsed(), String::from_utf8_lossy(&buf[..n]).to_string()));
        }
    }
    assert!(wants(&got, "READY=1"), "no READY=1: {got:?}");
    assert!(wants(&got, "WATCHDOG=1"), "no WATCHDOG=1: {got:?}");
    let ready_at = got.iter().find(|(_, m)| m.contains("READY=1")).unwrap().0;
    eprintln!("start to READY=1: {ready_at:?}");
    // Once ready, the status API answers.
    let status = smol::block_on(capy::http::call(
        &format!("http://127.0.0.1:{http}/api/status"),
        Method::GET,
        None,
        Duration::from_secs(5),
    ))
    .unwrap();
    assert_eq!(status.status, StatusCode::OK);
    // The watchdog keeps being petted: at least two more in 1 s (period 0.2 s).
    let t = Instant::now();
    let mut pets = 0;
    while t.elapsed() < Duration::from_secs(1) {
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                pets += 1;
            }
        }
    }
    assert!(pets >= 2, "{pets} watchdog pets in 1 s");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut stopping = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !stopping {
        if let Ok(n) = sock.recv(&mut buf) {
            stopping = String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    let st = child.wait().unwrap();
    assert!(st.success(), "capy exited with {st} after SIGTERM");
}

/// `systemd-analyze verify` on the shipped unit with ExecStart pointed at the
/// built binary: no error and no warning.
#[test]
fn systemd_unit_verifies_and_meets_the_checklist() {
    let unit = std::fs::read_to_string(repo().join("systemd/capy.service")).unwrap();
    for want in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=capy",
        "StateDirectory=capy",
        "ConfigurationDirectory=capy",
        "--config /etc/capy/capy.toml",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(unit.contains(want), "unit lacks {want}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let verify = |text: &str| {
        let path = tmp.path().join("capy.service");
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze (Debian package systemd) must be installed; scripts/test installs it");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let ours = unit.replace(
        "ExecStart=/usr/bin/capy",
        &format!("ExecStart={}", bin().display()),
    );
    assert_ne!(ours, unit, "ExecStart=/usr/bin/capy not found in the unit");
    let (ok, err) = verify(&ours);
    assert!(ok && err.trim().is_empty(), "systemd-analyze verify: {err}");
    // The check can fail: a misspelt directive is reported.
    let (_, err) = verify(&ours.replace("ProtectSystem=strict", "ProtectSystm=strict"));
    assert!(err.contains("ProtectSystm"), "{err}");
}

// ---- metrics --------------------------------------------------------------

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_name(n: &str) -> bool {
    let mut cs = n.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let eq = rest.find('=').ok_or(format!("label without '=': {s}"))?;
        let name = &rest[..eq];
        if !valid_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut chars = rest[eq + 1..].char_indices();
        if chars.next().map(|c| c.1) != Some('"') {
            return Err(format!("label value not quoted: {s}"));
        }
        let mut val = String::new();
        let mut end = None;
        let mut esc = false;
        for (i, c) in chars {
            match (esc, c) {
                (true, 'n') => {
                    val.push('\n');
                    esc = false
                }
                (true, '\\' | '"') => {
                    val.push(c);
                    esc = false
                }
                (true, _) => return Err(format!("bad escape in {s}")),
                (false, '\\') => esc = true,
                (false, '"') => {
                    end = Some(eq + 1 + i);
                    break;
                }
                (false, c) => val.push(c),
            }
        }
        let end = end.ok_or(format!("unterminated label value: {s}"))?;
        if out.insert(name.to_string(), val).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = rest[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&rest[end + 1..]);
    }
    Ok(out)
}

/// Parses Prometheus' text format (0.0.4) strictly enough to catch what a
/// scraper would reject: every sample belongs to a family declared by
/// `# TYPE` before it, names and labels are well formed, no series twice,
/// histogram buckets are cumulative and end in `+Inf` = `_count`.
fn parse_metrics(text: &str) -> Result<(BTreeMap<String, String>, Vec<Sample>), String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut seen = HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if kw == "TYPE" {
                let t = parts.next().unwrap_or("");
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                    return Err(format!("bad type: {line}"));
                }
                if types.insert(name.to_string(), t.to_string()).is_some() {
                    return Err(format!("family declared twice: {name}"));
                }
            } else if kw == "HELP" && !valid_name(name) {
                return Err(format!("bad HELP: {line}"));
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| format!("bad value: {line}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n,
                parse_labels(l.strip_suffix('}').ok_or(format!("bad labels: {line}"))?)?,
            ),
            None => (series, BTreeMap::new()),
        };
        if !valid_name(name) {
            return Err(format!("bad metric name: {line}"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            return Err(format!("sample before its # TYPE: {line}"));
        }
        if !seen.insert(series.to_string()) {
            return Err(format!("series twice: {series}"));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    for (fam, t) in &types {
        if t != "histogram" {
            continue;
        }
        let buckets: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == format!("{fam}_bucket"))
            .collect();
        let count = samples
            .iter()
            .find(|s| s.name == format!("{fam}_count"))
            .ok_or(format!("{fam}: no _count"))?;
        let mut last = (f64::NEG_INFINITY, 0.0);
        for b in &buckets {
            let le = match b.labels.get("le").map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(v) => v.parse().map_err(|_| format!("{fam}: bad le {v}"))?,
                None => return Err(format!("{fam}: bucket without le")),
            };
            if le <= last.0 || b.value < last.1 {
                return Err(format!("{fam}: buckets not cumulative at le={le}"));
            }
            last = (le, b.value);
        }
        if last.0 != f64::INFINITY || last.1 != count.value {
            return Err(format!(
                "{fam}: +Inf bucket {} != count {}",
                last.1, count.value
            ));
        }
    }
    Ok((types, samples))
}

fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v)))
        .map(|s| s.value)
        .sum()
}

#[test]
fn metrics_parse_and_cover_the_issue_list() {
    // The parser rejects what a scraper would.
    for bad in [
        "x 1\n",
        "# TYPE x counter\nx{a=\"1} 2\n",
        "# TYPE x counter\nx 1\nx 2\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n",
        "# TYPE 1x gauge\n1x 1\n",
    ] {
        assert!(parse_metrics(bad).is_err(), "accepted: {bad}");
    }

    let mut c = LocalCluster::prepare(bin(), 3, 1).unwrap();
    c.start_all().unwrap();
    c.wait_converged(Duration::from_secs(60)).unwrap();
    for i in 0..30 {
        assert_eq!(
            put(&c, i % 3, &format!("m{i}"), vec![b'v'; 100]),
            StatusCode::OK
        );
    }
    for i in 0..10 {
        let r = c
            .http(i % 3, Method::GET, &format!("/api/kv/m{i}"), None)
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
    // The third replica of the last writes may still be committing.
    let deadline = Instant::now() + Duration::from_secs(15);
    while (0..3).any(|n| c.status(n).unwrap()["store"]["keys"] != 30) {
        assert!(
            Instant::now() < deadline,
            "replicas did not all reach 30 keys"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut lag_total = 0.0;
    let mut hops_total = 0.0;
    for n in 0..3 {
        let r = c.http(n, Method::GET, "/metrics", None).unwrap();
        assert_eq!(r.status, StatusCode::OK);
        let text = String::from_utf8_lossy(&r.body).to_string();
        let (types, s) = parse_metrics(&text).unwrap_or_else(|e| panic!("node {n}: {e}\n{text}"));
        for (fam, t) in [
            ("capy_route_hops", "histogram"),
            ("capy_messages_in_total", "counter"),
            ("capy_messages_out_total", "counter"),
            ("capy_store_operations_total", "counter"),
            ("capy_put_latency_seconds", "histogram"),
            ("capy_get_latency_seconds", "histogram"),
            ("capy_replication_lag_seconds", "histogram"),
            ("capy_handler_runs_total", "counter"),
            ("capy_handler_errors_total", "counter"),
            ("capy_handler_latency_seconds", "histogram"),
            ("capy_container_starts_total", "counter"),
            ("capy_store_bytes", "gauge"),
        ] {
            assert_eq!(
                types.get(fam).map(String::as_str),
                Some(t),
                "node {n}: {fam}"
            );
        }
        assert!(value(&s, "capy_messages_in_total", None) > 0.0);
        assert!(value(&s, "capy_messages_out_total", None) > 0.0);
        assert_eq!(
            value(&s, "capy_store_operations_total", Some(("op", "put"))),
            10.0,
            "node {n}"
        );
        assert_eq!(value(&s, "capy_put_latency_seconds_count", None), 10.0);
        assert!(value(&s, "capy_container_starts_total", Some(("kind", "cold"))) == 0.0);
        // k = 3 on 3 nodes: every node holds every key.
        assert_eq!(value(&s, "capy_store_keys", None), 30.0, "node {n}");
        lag_total += value(&s, "capy_replication_lag_seconds_count", None);
        hops_total += value(&s, "capy_route_hops_count", None);
    }
    // Each of the 30 writes was committed by two replicas besides its root.
    assert!(lag_total >= 60.0, "replication lag samples: {lag_total}");
    assert!(hops_total >= 30.0, "routed deliveries: {hops_total}");
}

// ---- status page ------------------------------------------------------------

/// Installs playwright-core (from the lock file) next to the script once.
fn browser_deps() -> PathBuf {
    let dir = repo().join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        let st = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm (Node.js) must be installed; scripts/test installs it");
        assert!(st.success(), "npm ci in tests/browser failed");
    }
    dir
}

#[test]
fn status_page_in_headless_chromium_shows_live_values() {
    assert!(
        Path::new("/usr/bin/chromium").exists() || std::env::var_os("CHROMIUM").is_some(),
        "Debian's chromium is needed (apt-get install chromium; scripts/test does)"
    );
    let dir = browser_deps();
    let mut c = LocalCluster::prepare(bin(), 0, 2).unwrap();
    for zone in ["hall-a", "hall-b", "hall-b"] {
        c.add_node(2, zone).unwrap();
    }
    let cfg = c.root.join("capy.toml");
    std::fs::write(&cfg, "vnodes = 2\nvnode_game = false\n").unwrap();
    for n in &mut c.nodes {
        n.extra_args = vec![
            "--board".into(),
            "rpi4".into(),
            "--config".into(),
            cfg.display().to_string(),
        ];
    }
    c.start_all().unwrap();
    c.wait_converged(Duration::from_secs(60)).unwrap();
    for i in 0..5 {
        assert_eq!(
            put(&c, 1, &format!("seed{i}"), vec![b's'; 2000]),
            StatusCode::OK
        );
    }
    let shot = repo().join("target/status-page.png");
    let out = Command::new("node")
        .arg(dir.join("status_page.mjs"))
        .arg(c.nodes[0].url())
        .arg(&shot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["before"]["name"], "n0");
    assert_eq!(seen["before"]["keys"], 5);
    assert_eq!(seen["after"]["keys"], 6);
    assert!(seen["after"]["puts"].as_u64().unwrap() >= 1);
    let sections: Vec<&str> = seen["sections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    for want in [
        "Node",
        "Store",
        "Traffic",
        "Vnodes",
        "Leaf set",
        "Peers",
        "Apps",
        "Containers",
        "Vnode game",
    ] {
        assert!(sections.contains(&want), "{want} missing: {sections:?}");
    }
    assert_eq!(seen["vnodeRows"], 2, "{seen}");
    assert_eq!(seen["peerRows"], 2, "two other gateways: {seen}");
    assert!(seen["leafRows"].as_u64().unwrap() >= 4, "{seen}");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot"
    );
}

// ---- packaging ----------------------------------------------------------------

/// `scripts/package` lays out what an operator installs: binary, unit,
/// sysusers, podman drop-in, a config that names the board, the profile and
/// the install note; the .deb holds the same and its config resolves.
#[test]
fn package_holds_what_an_operator_installs() {
    let out = tempfile::tempdir().unwrap();
    // The layout is under test, not the binary: a stand-in keeps the
    // compression of a 100+ MiB debug build out of the test's time.
    let stub = out.path().join("capy-stub");
    std::fs::write(&stub, "#!/bin/sh\necho capy stand-in\n").unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let st = Command::new(repo().join("scripts/package"))
        .arg("gateway-a64")
        .env("CAPY_PACKAGE_BIN", &stub)
        .env("CAPY_PACKAGE_OUT", out.path())
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let printed = String::from_utf8_lossy(&st.stdout);
    let v = env!("CARGO_PKG_VERSION");
    let tar = out.path().join(format!("capy-{v}-gateway-a64.tar.gz"));
    let deb = out.path().join(format!("capy_{v}_arm64.deb"));
    assert!(printed.contains(&*tar.to_string_lossy()), "{printed}");
    assert!(printed.contains(&*deb.to_string_lossy()), "{printed}");

    let list = Command::new("tar").arg("tzf").arg(&tar).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    let dir = format!("capy-{v}-gateway-a64");
    for f in [
        "INSTALL",
        "install.sh",
        "rootfs/usr/bin/capy",
        "rootfs/usr/lib/systemd/system/capy.service",
        "rootfs/usr/lib/sysusers.d/capy.conf",
        "rootfs/etc/systemd/system/podman.socket.d/capy.conf",
        "rootfs/etc/capy/capy.toml",
        "rootfs/usr/share/capy/boards/gateway-a64.toml",
    ] {
        assert!(
            list.contains(&format!("{dir}/{f}\n")),
            "{f} missing:\n{list}"
        );
    }
    let contents = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let contents = String::from_utf8_lossy(&contents.stdout);
    for f in [
        "./usr/bin/capy",
        "./usr/lib/systemd/system/capy.service",
        "./etc/capy/capy.toml",
        "./usr/share/doc/capy/INSTALL",
    ] {
        assert!(
            contents.contains(f),
            "{f} missing from the .deb:\n{contents}"
        );
    }
    let info = Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .arg("Architecture")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), "arm64");

    // The shipped config resolves to the board's settings.
    let stage = out.path().join(&dir);
    let args = capy::cli::RunArgs {
        config: Some(stage.join("rootfs/etc/capy/capy.toml")),
        ..Default::default()
    };
    let cfg = capy::node::resolve_config(&args).unwrap();
    assert_eq!(cfg.board.as_deref(), Some("gateway-a64"));
    assert_eq!(cfg.storage_limit, Some(128 << 30));
    assert_eq!(cfg.max_vnodes, 64); // the profile's 128, within what certificates allow
    assert_eq!(cfg.data, Some(PathBuf::from("/var/lib/capy")));
    let note = std::fs::read_to_string(stage.join("INSTALL")).unwrap();
    assert!(
        note.contains("capy ca issue") && note.contains("systemctl start capy"),
        "{note}"
    );
}

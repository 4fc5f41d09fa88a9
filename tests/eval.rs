//! `capy eval`: every experiment of the paper runs on the real cores in
//! virtual time, writes its JSON, SVG and markdown files, and backs the
//! direction of each claim (adaptive keep-alive beats fixed windows,
//! functions at their data beat bin-packing, publishing through the tree
//! beats polling, replicas follow reads, the vnode game lowers imbalance,
//! the overlay recovers). A regression in any part that breaks a claim
//! fails here.

use std::path::Path;
use std::process::Command;

const EXPERIMENTS: [&str; 6] = [
    "keepalive",
    "locality",
    "subscriptions",
    "replication",
    "balance",
    "recovery",
];

fn capy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capy"))
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn eval_all_quick_backs_every_claim() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = capy()
        .args(["eval", "all", "--quick", "--seed", "1", "--out"])
        .arg(dir.path())
        .output()
        .expect("capy runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "capy eval failed:\n{stdout}\n{stderr}"
    );
    println!("{stdout}");
    for name in EXPERIMENTS {
        let v = json(&dir.path().join(format!("{name}.json")));
        assert_eq!(v["experiment"], name);
        assert_eq!(v["seed"], 1);
        let md = std::fs::read_to_string(dir.path().join(format!("{name}.md")))
            .unwrap_or_else(|e| panic!("{name}.md: {e}"));
        assert!(md.starts_with("# "), "{name}.md has no title");
        let claims = v["claims"].as_array().expect("claims");
        let measured = v["data"]["measured"] != false;
        if measured {
            assert!(!claims.is_empty(), "{name} checks no claim");
            let figs = v["figures"].as_array().expect("figures");
            assert!(!figs.is_empty(), "{name} draws no figure");
            for f in figs {
                let file = f["file"].as_str().expect("file name");
                let svg = std::fs::read_to_string(dir.path().join(file))
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
                assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{file}");
                assert!(md.contains(file), "{name}.md does not show {file}");
            }
        }
        for c in claims {
            assert_eq!(
                c["holds"], true,
                "{name}: claim not backed: {} ({})",
                c["claim"], c["detail"]
            );
        }
    }
    // Subscriptions, read from the figures' numbers rather than the
    // verdicts: the tree beats polling at every size, 100 to 6,400
    // subscribers, and its latency does not grow with the subscriber count.
    let sub = json(&dir.path().join("subscriptions.json"));
    let rows = sub["data"]["rows"].as_array().expect("rows");
    let counts: Vec<u64> = rows
        .iter()
        .map(|r| r["subscribers"].as_u64().expect("count"))
        .collect();
    assert_eq!(counts, [100, 200, 400, 800, 1600, 3200, 6400]);
    let ms = |r: &serde_json::Value, how: &str, q: &str| r[how][q].as_f64().expect("ms");
    for r in rows {
        for q in ["median_ms", "p90_ms", "p99_ms"] {
            assert!(
                ms(r, "publish", q) < ms(r, "polling", q),
                "tree not faster than polling at {} ({q})",
                r["subscribers"]
            );
        }
    }
    let (first, last) = (&rows[0], &rows[rows.len() - 1]);
    let growth = ms(last, "publish", "median_ms") / ms(first, "publish", "median_ms");
    assert!(
        growth < 2.0,
        "64x the subscribers made the tree's median {growth:.2}x slower"
    );
    assert!(ms(last, "publish", "median_ms") <= 100.0);
    let index = std::fs::read_to_string(dir.path().join("index.md")).expect("index.md");
    assert!(index.contains("keepalive.md"));
    // The generated trace is in the Azure format and replays as one.
    let trace = dir.path().join("keepalive-trace");
    assert!(trace
        .join("invocations_per_function_md.anon.d01.csv")
        .exists());
}

#[test]
fn azure_trace_files_replay() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("azure");
    std::fs::create_dir_all(&trace).expect("mkdir");
    // Three apps over two days: a 30-minute timer, a busy app, one call.
    for day in 1..=2 {
        let mut s = String::from("HashOwner,HashApp,HashFunction,Trigger");
        for m in 1..=1440 {
            s.push_str(&format!(",{m}"));
        }
        s.push('\n');
        for (app, f) in [("a1", "f1"), ("a2", "f2"), ("a3", "f3")] {
            s.push_str(&format!(
                "o,{app},{f},{}",
                if app == "a1" { "timer" } else { "http" }
            ));
            for m in 0..1440 {
                let c = match app {
                    "a1" => u32::from(m % 30 == 0),
                    "a2" => 3,
                    _ => u32::from(day == 1 && m == 100),
                };
                s.push_str(&format!(",{c}"));
            }
            s.push('\n');
        }
        std::fs::write(
            trace.join(format!("invocations_per_function_md.anon.d{day:02}.csv")),
            s,
        )
        .expect("write");
    }
    let out_dir = dir.path().join("out");
    let out = capy()
        .args(["eval", "keepalive", "--azure-dir"])
        .arg(&trace)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("capy runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out_dir.join("keepalive.json"));
    assert_eq!(v["data"]["apps_in_trace"], 3);
    // The one-call app is below one call a day and is left out.
    assert_eq!(v["data"]["apps_measured"], 2);
    let fixed10 = &v["data"]["policies"][0];
    assert_eq!(fixed10["policy"], "fixed 10 min");
    // The busy app never goes cold after its first call; the 30-minute
    // timer is cold every time under a 10-minute window.
    let cold = fixed10["cold_pct"].as_array().expect("per app");
    let mut cold: Vec<f64> = cold.iter().filter_map(|x| x.as_f64()).collect();
    cold.sort_by(|a, b| a.total_cmp(b));
    assert!(cold[0] < 0.1, "{cold:?}");
    assert_eq!(cold[1], 100.0);
}

#[test]
fn bad_input_is_refused_with_a_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = capy()
        .args(["eval", "nonsense", "--out"])
        .arg(dir.path())
        .output()
        .expect("capy runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown experiment"));
    // The real-cluster experiment says what it needs.
    let out = capy()
        .args(["eval", "fnrecovery", "--out"])
        .arg(dir.path())
        .output()
        .expect("capy runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fn-image"));
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(
        bad.join("invocations_per_function_md.anon.d01.csv"),
        "HashOwner,HashApp,HashFunction,Trigger,1\no,a,f,http,x\n",
    )
    .expect("write");
    let out = capy()
        .args(["eval", "keepalive", "--azure-dir"])
        .arg(&bad)
        .arg("--out")
        .arg(dir.path().join("o"))
        .output()
        .expect("capy runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1") && err.contains("columns"), "{err}");
    let out = capy()
        .args(["eval", "keepalive", "--azure-dir"])
        .arg(dir.path().join("missing"))
        .arg("--out")
        .arg(dir.path().join("o"))
        .output()
        .expect("capy runs");
    assert_eq!(out.status.code(), Some(2));
}

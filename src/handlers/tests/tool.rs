use super::super::tool::{bench, bench_with, handler_run, RunError};
use super::*;
use serde_json::json;
use std::io::Write;

fn file(code: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(code.as_bytes()).unwrap();
    f
}

#[test]
fn handler_run_prints_result_effects_and_state() {
    let f = file(
        "function readCb(caller, args) state.n = args.n sys.log('hi', caller) \
         sys.write(nil, sys.key(), args) return {got = sys.read(sys.key()), by = caller} end",
    );
    let out = match handler_run(f.path(), "read", Some(r#"{"v":1}"#), Some(r#"{"n":5}"#)) {
        Ok(v) => v,
        Err(_) => panic!("run failed"),
    };
    assert_eq!(out["result"], json!({"got": {"v": 1}, "by": "cli"}));
    assert_eq!(out["logs"], json!(["hi\tcli"]));
    assert_eq!(out["policy_state"], json!({"n": 5}));
    assert_eq!(out["effects"][0]["effect"], json!("write"));
    assert_eq!(
        out["effects"][0]["key"],
        json!({"app": "local", "name": "key"})
    );
    assert_eq!(handler_run_cmd(f.path(), "read", None, Some("{}")), 0);
}

#[test]
fn handler_run_exit_codes() {
    let bad = file("function updateCb() while true do end end");
    assert!(matches!(
        handler_run(bad.path(), "update", None, Some("1")),
        Err(RunError::Handler(HandlerError::Instructions(_)))
    ));
    assert_eq!(handler_run_cmd(bad.path(), "update", None, Some("1")), 1);
    assert_eq!(handler_run_cmd(bad.path(), "remove", None, None), 2);
    assert_eq!(
        handler_run_cmd(bad.path(), "update", None, Some("{nope")),
        2
    );
    assert_eq!(
        handler_run_cmd(
            std::path::Path::new("/nonexistent/x.lua"),
            "timer",
            None,
            None
        ),
        2
    );
    let syntax = file("function (");
    assert_eq!(handler_run_cmd(syntax.path(), "timer", None, None), 1);
}

#[test]
fn bench_covers_every_callback_of_every_policy() {
    let report = match bench(50) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let rows = report["callbacks"].as_array().unwrap();
    let names: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["policy"].as_str().unwrap(),
                r["callback"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "adaptive-keepalive:readCb",
            "adaptive-keepalive:timerCb",
            "subscription:readCb",
            "subscription:updateCb",
            "subscription:timerCb",
            "smart-replication:createCb",
            "smart-replication:readCb",
            "smart-replication:timerCb",
        ]
    );
    for r in rows {
        let (p50, p99) = (r["p50_us"].as_f64().unwrap(), r["p99_us"].as_f64().unwrap());
        assert!(p50 > 0.0 && p50 <= p99, "{r}");
    }
    for (_, v) in report["idle_state"].as_object().unwrap() {
        assert!(v["fresh_bytes"].as_u64().unwrap() > 0);
    }
}

/// Release figures: `cargo test --release --lib handlers::tests::tool::release_figures -- --ignored --nocapture`
#[test]
#[ignore]
fn release_figures() {
    use std::time::{Duration, Instant};
    assert_eq!(bench_handlers(true), 0);
    let incremental = bench_with(5000, |rt| {
        rt.lua().gc_inc(0, 0, 0);
    })
    .unwrap();
    println!("incremental gc: {incremental}");
    // hook interval: cost on a CPU-bound handler, and wall-clock overshoot
    // on a handler whose every concatenation copies 8 MB
    for every in [100u32, 250, 1000] {
        let limits = Limits {
            hook_interval: every,
            instructions: u64::MAX,
            ..Limits::default()
        };
        let mut rt = lua_with(
            "function readCb() local x = 0 for i = 1, 200000 do x = x + i % 7 end return x end",
            limits.clone(),
        );
        let h = host();
        let t0 = Instant::now();
        for _ in 0..20 {
            read(&mut rt, &h, json!(null)).unwrap();
        }
        let cpu = t0.elapsed() / 20;
        let limits = Limits {
            wall: Duration::from_millis(100),
            ..limits
        };
        let mut rt = lua_with(
            "function readCb() local s = string.rep('x', 4000000) while true do local t = s .. s end end",
            limits,
        );
        let t0 = Instant::now();
        let e = read(&mut rt, &h, json!(null)).unwrap_err();
        println!(
            "hook_interval {every}: 200k-iteration loop {cpu:?}; concat churn stopped after {:?} ({e})",
            t0.elapsed()
        );
    }
}

//! `capy handler run` (try one callback locally, in the same sandbox with
//! the same limits as on a node) and `capy bench handlers` (per-callback
//! latency of every shipped policy, and what an idle app's state costs).

use super::{
    AppKey, AppRuntime, CallCtx, Event, EventKind, HandlerError, HandlerSource, Limits, MemHost,
    Outcome, SysHost, MAX_SOURCE_BYTES, POLICIES,
};
use crate::id::NodeId;
use futures_lite::future::block_on;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The app name local runs use.
const LOCAL_APP: &str = "local";

/// `capy handler run FILE --event E [--state JSON] [--args JSON]`.
///
/// `state` is the key's stored data (what `sys.read(sys.key())` returns,
/// and the proposed data for `create`); `args` is readCb's `args` or
/// updateCb's `new_data`. Prints the outcome as one JSON object on stdout
/// and returns 0; on failure prints `error: ...` on stderr and returns 1
/// (the handler failed) or 2 (bad input).
pub fn handler_run_cmd(file: &Path, event: &str, state: Option<&str>, args: Option<&str>) -> i32 {
    match handler_run(file, event, state, args) {
        Ok(out) => {
            println!("{out}");
            0
        }
        Err(RunError::Input(m)) => {
            eprintln!("error: {m}");
            2
        }
        Err(RunError::Handler(e)) => {
            eprintln!("error: {e}");
            1
        }
    }
}

pub(super) enum RunError {
    Input(String),
    Handler(HandlerError),
}

fn parse_json(what: &str, s: Option<&str>) -> Result<Option<Value>, RunError> {
    match s {
        None => Ok(None),
        Some(s) => serde_json::from_str(s)
            .map(Some)
            .map_err(|e| RunError::Input(format!("--{what} is not valid JSON: {e}"))),
    }
}

pub(super) fn handler_run(
    file: &Path,
    event: &str,
    state: Option<&str>,
    args: Option<&str>,
) -> Result<Value, RunError> {
    let input = |m: String| RunError::Input(m);
    let kind: EventKind = event
        .parse()
        .map_err(|e: HandlerError| input(e.to_string()))?;
    let data = parse_json("state", state)?;
    let args = parse_json("args", args)?.unwrap_or(Value::Null);
    let meta = std::fs::metadata(file).map_err(|e| input(format!("{}: {e}", file.display())))?;
    if meta.len() > MAX_SOURCE_BYTES as u64 {
        return Err(input(format!(
            "{}: {} bytes is more than the {MAX_SOURCE_BYTES} a handler may have",
            file.display(),
            meta.len()
        )));
    }
    let code =
        std::fs::read_to_string(file).map_err(|e| input(format!("{}: {e}", file.display())))?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "handler".into());
    let mut rt = AppRuntime::new(
        LOCAL_APP,
        &HandlerSource::Lua { name, code },
        Limits::default(),
    )
    .map_err(RunError::Handler)?;
    let host = MemHost::with_leaves(NodeId::hash(b"capy handler run"), 4);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    host.set_now(now);
    let host: Arc<dyn SysHost> = Arc::new(host);
    let key = AppKey::new(LOCAL_APP, "key");
    let caller = if kind == EventKind::Timer { "" } else { "cli" };
    let ctx = CallCtx::new(key.clone(), caller).with_data(data);
    let event = match kind {
        EventKind::Create => Event::Create,
        EventKind::Read => Event::Read { args },
        EventKind::Update => Event::Update { new_data: args },
        EventKind::Timer => Event::Timer,
    };
    let out = block_on(rt.call(event, ctx, host)).map_err(RunError::Handler)?;
    let policy_state = rt.export_state(&key).map_err(RunError::Handler)?;
    Ok(outcome_json(kind, &out, policy_state))
}

fn outcome_json(kind: EventKind, out: &Outcome, policy_state: Option<Value>) -> Value {
    json!({
        "event": kind.name(),
        "ran": out.ran,
        "result": out.result,
        "effects": out.effects,
        "logs": out.logs,
        "policy_state": policy_state,
        "instructions": out.instructions,
    })
}

/// `capy bench handlers [--json]`: p50/p99 latency of every callback of
/// every shipped policy, and the bytes an idle app's Lua state holds.
/// Returns 0 when every call succeeded (goals missed are reported, not
/// failed), 1 otherwise.
pub fn bench_handlers(json_out: bool) -> i32 {
    match bench(BENCH_CALLS) {
        Ok(report) => {
            if json_out {
                println!("{report}");
            } else {
                print_table(&report);
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// Calls measured per callback (after as many again to warm up).
const BENCH_CALLS: usize = 5000;
const GOAL_P99_US: f64 = 50.0;
const GOAL_IDLE_BYTES: usize = 256 * 1024;
const MINUTE: u64 = 60_000_000;

pub(super) fn bench(calls: usize) -> Result<Value, HandlerError> {
    bench_with(calls, |_| {})
}

/// `bench`, with `tweak` applied to every app state before it is measured.
pub(super) fn bench_with(calls: usize, tweak: impl Fn(&AppRuntime)) -> Result<Value, HandlerError> {
    let mut rows = Vec::new();
    let mut idle = serde_json::Map::new();
    let mut ok = true;
    for (name, _) in POLICIES {
        let mut rt = AppRuntime::new(
            "bench",
            &HandlerSource::Policy(name.into()),
            Limits::default(),
        )?;
        tweak(&rt);
        rt.gc();
        let fresh = rt.memory_used();
        let host = Arc::new(MemHost::with_leaves(NodeId::hash(b"bench"), 8));
        host.set_now(1);
        let dyn_host: Arc<dyn SysHost> = host.clone();
        let key = AppKey::new("bench", "key");
        let data = json!({"temperature": 21.5, "unit": "C", "tags": ["a", "b"]});
        for kind in EventKind::ALL {
            if !rt.defines(kind) {
                continue;
            }
            let mut lat = Vec::with_capacity(calls);
            for i in 0..2 * calls {
                // keep-alive reads and timers see the clock move, so the
                // histogram and window paths run
                host.advance(match kind {
                    EventKind::Read => (i as u64 % 37 + 1) * MINUTE / 2,
                    _ => MINUTE,
                });
                let caller = format!("node-{}", i % 64);
                let ctx = CallCtx::new(key.clone(), caller).with_data(Some(data.clone()));
                let event = match kind {
                    EventKind::Create => Event::Create,
                    EventKind::Read => Event::Read {
                        args: json!({"subscribe": i % 2 == 0}),
                    },
                    EventKind::Update => Event::Update {
                        new_data: data.clone(),
                    },
                    EventKind::Timer => Event::Timer,
                };
                let t0 = Instant::now();
                let res = block_on(rt.call(event, ctx, Arc::clone(&dyn_host)));
                let dt = t0.elapsed();
                res?;
                if i >= calls {
                    lat.push(dt.as_nanos() as u64);
                }
            }
            let ns = crate::stats::sorted(lat.iter().map(|&x| x as f64).collect());
            // µs with one decimal
            let pct = |p: f64| (crate::stats::percentile(&ns, p) / 100.0).round() / 10.0;
            let (p50, p99) = (pct(0.50), pct(0.99));
            ok &= p99 <= GOAL_P99_US;
            rows.push(json!({
                "policy": name,
                "callback": kind.callback(),
                "calls": lat.len(),
                "p50_us": p50,
                "p99_us": p99,
            }));
        }
        rt.gc();
        let after = rt.memory_used();
        ok &= fresh <= GOAL_IDLE_BYTES && after <= GOAL_IDLE_BYTES;
        idle.insert(
            name.to_string(),
            json!({"fresh_bytes": fresh, "after_calls_bytes": after}),
        );
    }
    Ok(json!({
        "callbacks": rows,
        "idle_state": idle,
        "goal_p99_us": GOAL_P99_US,
        "goal_idle_bytes": GOAL_IDLE_BYTES,
        "goals_met": ok,
        "optimized_build": !cfg!(debug_assertions),
    }))
}

fn print_table(report: &Value) {
    println!(
        "{:<20} {:<10} {:>9} {:>9}",
        "policy", "callback", "p50 µs", "p99 µs"
    );
    if let Some(rows) = report["callbacks"].as_array() {
        for r in rows {
            println!(
                "{:<20} {:<10} {:>9} {:>9}",
                r["policy"].as_str().unwrap_or(""),
                r["callback"].as_str().unwrap_or(""),
                r["p50_us"],
                r["p99_us"]
            );
        }
    }
    if let Some(idle) = report["idle_state"].as_object() {
        for (name, v) in idle {
            println!(
                "idle state {name}: {} bytes fresh, {} bytes after the bench",
                v["fresh_bytes"], v["after_calls_bytes"]
            );
        }
    }
    println!(
        "goals (p99 <= {} µs, idle <= {} bytes): {}",
        report["goal_p99_us"],
        report["goal_idle_bytes"],
        if report["goals_met"] == json!(true) {
            "met"
        } else {
            "NOT met"
        }
    );
}

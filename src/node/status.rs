//! The node's status as people read it: a plain-text rendering for `capy
//! status` and the self-contained HTML page served at `/` (no external
//! assets, so it works on a gateway with no internet; it polls
//! `/api/status` and redraws itself).

use serde_json::Value;
use std::fmt::Write;

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `capy status` without `--json`.
pub fn render_text(v: &Value) -> String {
    let mut o = String::new();
    let n = &v["node"];
    let _ = writeln!(
        o,
        "node      {} (zone {}, board {}, up {} s)",
        s(&n["name"]),
        s(&n["zone"]),
        s(&n["board"]),
        s(&v["uptime_s"])
    );
    let _ = writeln!(
        o,
        "address   quic {}  http {}",
        s(&n["quic"]),
        s(&n["http"])
    );
    let _ = writeln!(o, "joined    {}", s(&v["joined"]));
    if let Some(vn) = v["vnodes"].as_array() {
        let _ = writeln!(o, "vnodes    {} (max {})", vn.len(), s(&n["max_vnodes"]));
        for x in vn {
            let fill: Vec<String> = x["routing_fill"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "  {}  leaf set {}  routing rows [{}]",
                s(&x["id"]),
                x["leaf_set"].as_array().map(|a| a.len()).unwrap_or(0),
                fill.join(" ")
            );
        }
    }
    if let Some(peers) = v["peers"].as_array() {
        let _ = writeln!(o, "peers     {}", peers.len());
        for p in peers.iter().take(32) {
            let _ = writeln!(
                o,
                "  {:<24} {}  {} vnodes seen  rtt {} us",
                s(&p["addr"]),
                s(&p["id"]),
                s(&p["vnodes"]),
                s(&p["rtt_us"])
            );
        }
    }
    let st = &v["store"];
    let _ = writeln!(
        o,
        "store     {} keys, {} bytes (limit {})",
        s(&st["keys"]),
        s(&st["bytes"]),
        s(&st["limit"])
    );
    if let Some(b) = st["buckets"].as_array() {
        for x in b {
            let _ = writeln!(
                o,
                "  {:<24} {} keys, {} bytes",
                s(&x["name"]),
                s(&x["keys"]),
                s(&x["bytes"])
            );
        }
    }
    o.push_str(&super::functions::render_text(v));
    if let Some(apps) = v["apps"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(o, "apps      {} (handler runs here, as a root)", apps.len());
        for a in apps {
            let _ = writeln!(
                o,
                "  {:<24} {} calls, {} errors, p50 {} us",
                s(&a["name"]),
                s(&a["calls"]),
                s(&a["errors"]),
                s(&a["p50_us"])
            );
        }
    }
    let ps = &v["pubsub"];
    if ps["watched_keys"].as_u64().unwrap_or(0) > 0 || ps["tree_topics"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            o,
            "pub/sub   {} trees, {} watched keys, {} SSE clients, {} delivered",
            s(&ps["tree_topics"]),
            s(&ps["watched_keys"]),
            s(&ps["sse_clients"]),
            s(&ps["delivered"])
        );
    }
    o
}

/// The status page: one HTML document with its style and script inline.
pub const PAGE: &str = include_str!("status.html");

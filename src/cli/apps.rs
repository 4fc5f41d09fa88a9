//! `capy app register|ls|show|rm|state` and `capy watch`: apps over a
//! node's HTTP API.
//!
//! An app file is TOML:
//!
//! ```toml
//! name = "sensors"
//! owner = "alice"
//! # salt = "..."              # generated when absent
//! replicas = 3
//! policy = "subscription"     # a shipped policy, or
//! # handler = "sensors.lua"   # a Lua file, relative to this file
//! timer_interval_s = 60       # may be fractional, at least 0.1
//! # clock_scale = 1           # handler clock speed-up, for trying policies
//! [limits]                    # all optional
//! instructions = 1000000
//! memory_mb = 16
//! wall_ms = 200
//! checkpoint_s = 600
//! ```

use super::*;
use crate::http::{self, percent_encode};
use crate::node::apps::{AppSpec, LimitsSpec};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use serde::Deserialize;
use smol_hyper::rt::FuturesIo;
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFile {
    name: String,
    owner: String,
    salt: Option<String>,
    replicas: Option<u8>,
    policy: Option<String>,
    handler: Option<std::path::PathBuf>,
    timer_interval_s: Option<f64>,
    clock_scale: Option<u32>,
    #[serde(default)]
    limits: LimitsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    instructions: Option<u64>,
    memory_mb: Option<u64>,
    wall_ms: Option<u64>,
    checkpoint_s: Option<f64>,
}

/// Reads an app file (and its handler file) into what the node takes.
pub fn read_app_file(path: &Path) -> Result<AppSpec, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f: AppFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let (source, source_name) = match &f.handler {
        None => (None, None),
        Some(h) => {
            let p = match path.parent() {
                Some(dir) if h.is_relative() => dir.join(h),
                _ => h.clone(),
            };
            let meta = std::fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            if meta.len() > crate::handlers::MAX_SOURCE_BYTES as u64 {
                return Err(format!(
                    "{}: {} bytes is more than the {} a handler may have",
                    p.display(),
                    meta.len(),
                    crate::handlers::MAX_SOURCE_BYTES
                ));
            }
            let code = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "handler.lua".into());
            (Some(code), Some(name))
        }
    };
    let secs = |what: &str, s: f64| -> Result<u64, String> {
        if !s.is_finite() || s <= 0.0 {
            return Err(format!(
                "{what} = {s}: must be a positive number of seconds"
            ));
        }
        Ok((s * 1000.0).round() as u64)
    };
    let spec = AppSpec {
        name: f.name,
        owner: f.owner,
        salt: f.salt,
        replicas: f.replicas,
        policy: f.policy,
        source,
        source_name,
        timer_interval_ms: f
            .timer_interval_s
            .map(|s| secs("timer_interval_s", s))
            .transpose()?,
        limits: LimitsSpec {
            instructions: f.limits.instructions,
            memory_bytes: f.limits.memory_mb.map(|m| m.saturating_mul(1 << 20)),
            wall_ms: f.limits.wall_ms,
            checkpoint_ms: f
                .limits
                .checkpoint_s
                .map(|s| secs("limits.checkpoint_s", s))
                .transpose()?,
        },
        clock_scale: f.clock_scale,
    };
    spec.validate()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(spec)
}

use super::client::{failed, print_reply};

fn call(url: &str, method: Method, body: Option<Vec<u8>>) -> Result<http::Reply, i32> {
    let body = body.map(|b| (b, "application/json"));
    super::client::request_within(url, method, body, TIMEOUT)
}

fn base(node: &str) -> &str {
    node.trim_end_matches('/')
}

pub fn app(cmd: AppCmd) -> i32 {
    match cmd {
        AppCmd::Register { file, node } => {
            let spec = match read_app_file(&file) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("capy: {e}");
                    return EXIT_USAGE;
                }
            };
            let body = serde_json::to_vec(&spec).unwrap_or_default();
            let r = match call(
                &format!("{}/api/apps", base(&node)),
                Method::POST,
                Some(body),
            ) {
                Ok(r) => r,
                Err(c) => return c,
            };
            if !r.status.is_success() {
                return failed(&format!("register {}", spec.name), &r);
            }
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            println!(
                "registered {} (app id {}, revision {}, {} replicas)",
                spec.name,
                v["app_id"].as_str().unwrap_or("?"),
                v["revision"],
                v["replicas"]
            );
            EXIT_OK
        }
        AppCmd::Ls { json, node } => {
            let r = match call(&format!("{}/api/apps", base(&node)), Method::GET, None) {
                Ok(r) => r,
                Err(c) => return c,
            };
            if !r.status.is_success() {
                return failed("ls", &r);
            }
            if json {
                println!("{}", String::from_utf8_lossy(&r.body));
                return EXIT_OK;
            }
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            let apps = v["apps"].as_array().cloned().unwrap_or_default();
            if apps.is_empty() {
                println!("no apps");
            }
            for a in apps {
                let handler = match (&a["handler"]["policy"], &a["handler"]["source"]) {
                    (serde_json::Value::String(p), _) => format!("policy {p}"),
                    (_, serde_json::Value::String(s)) => format!("lua {s}"),
                    _ => "-".into(),
                };
                println!(
                    "{:<20} owner {:<12} k={} timer {} ms  {}  id {}",
                    a["name"].as_str().unwrap_or("?"),
                    a["owner"].as_str().unwrap_or("?"),
                    a["replicas"],
                    a["timer_interval_ms"],
                    handler,
                    a["app_id"].as_str().unwrap_or("?"),
                );
            }
            EXIT_OK
        }
        AppCmd::Show { name, node } => {
            let url = format!("{}/api/apps/{}", base(&node), percent_encode(&name));
            print_reply(&format!("show {name}"), call(&url, Method::GET, None))
        }
        AppCmd::Rm { name, owner, node } => {
            let mut url = format!("{}/api/apps/{}", base(&node), percent_encode(&name));
            if let Some(o) = owner {
                url.push_str(&format!("?owner={}", percent_encode(&o)));
            }
            match call(&url, Method::DELETE, None) {
                Ok(r) if r.status.is_success() => {
                    println!("removed {name} (its keys stay in the store)");
                    EXIT_OK
                }
                Ok(r) => failed(&format!("rm {name}"), &r),
                Err(c) => c,
            }
        }
        AppCmd::State { app, key, node } => {
            let url = format!(
                "{}/api/apps/{}/state/{}",
                base(&node),
                percent_encode(&app),
                percent_encode(&key)
            );
            print_reply(&format!("state {app}/{key}"), call(&url, Method::GET, None))
        }
    }
}

/// One parsed server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Splits complete events off the front of `buf` (comments skipped).
pub fn parse_sse(buf: &mut String) -> Vec<SseEvent> {
    let mut out = Vec::new();
    while let Some(i) = buf.find("\n\n") {
        let block: String = buf[..i].to_string();
        buf.drain(..i + 2);
        let mut ev = SseEvent {
            event: "message".into(),
            id: None,
            data: String::new(),
        };
        let mut any = false;
        for line in block.lines() {
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            any = true;
            match field {
                "event" => ev.event = value.to_string(),
                "id" => ev.id = Some(value.to_string()),
                "data" => {
                    if !ev.data.is_empty() {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(value);
                }
                _ => {}
            }
        }
        if any {
            out.push(ev);
        }
    }
    out
}

/// Streams the events of `GET url` to `on_event` until the stream ends or
/// `on_event` returns false.
pub async fn stream_sse(
    url: &str,
    mut on_event: impl FnMut(SseEvent) -> bool,
) -> Result<(), String> {
    let (authority, target) = http::split_url(url).map_err(|e| e.to_string())?;
    let stream = smol::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("cannot reach {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(FuturesIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = smol::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(Method::GET)
        .uri(target)
        .header(hyper::header::HOST, authority.as_str())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let b = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        let r = http::Reply {
            status,
            content_type: String::new(),
            body: b,
        };
        return Err(format!("{} ({status})", r.message()));
    }
    let mut buf = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(d) = frame.data_ref() {
            buf.push_str(&String::from_utf8_lossy(d));
            if buf.len() > 16 << 20 {
                return Err("event larger than 16 MiB".into());
            }
            for ev in parse_sse(&mut buf) {
                if !on_event(ev) {
                    drop(driver);
                    return Ok(());
                }
            }
        }
    }
    drop(driver);
    Ok(())
}

/// `capy watch KEY --bucket APP`: one JSON line per event.
pub fn watch(key: &str, bucket: &str, node: &str, count: Option<u64>) -> i32 {
    let url = format!(
        "{}/api/watch/{}?bucket={}",
        base(node),
        percent_encode(key),
        percent_encode(bucket)
    );
    let mut updates = 0u64;
    let res = smol::block_on(stream_sse(&url, |ev| {
        let data: serde_json::Value =
            serde_json::from_str(&ev.data).unwrap_or(serde_json::Value::String(ev.data.clone()));
        println!(
            "{}",
            serde_json::json!({ "event": ev.event, "id": ev.id, "data": data })
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if ev.event == "update" {
            updates += 1;
        }
        ev.event != "dropped" && count.is_none_or(|c| updates < c)
    }));
    match res {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("capy: watch {key}: {e}");
            if e.contains("404") {
                EXIT_NOT_FOUND
            } else if e.contains("cannot reach") {
                EXIT_UNREACHABLE
            } else {
                EXIT_FAILED
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_blocks_parse_across_chunks() {
        let mut buf =
            String::from("event: subscribed\ndata: {\"a\":1}\n\n: keep-alive\n\nid: 7\nevent: upd");
        let evs = parse_sse(&mut buf);
        assert_eq!(
            evs,
            vec![SseEvent {
                event: "subscribed".into(),
                id: None,
                data: "{\"a\":1}".into()
            }]
        );
        buf.push_str("ate\ndata: x\ndata: y\n\n");
        let evs = parse_sse(&mut buf);
        assert_eq!(evs[0].id.as_deref(), Some("7"));
        assert_eq!(evs[0].event, "update");
        assert_eq!(evs[0].data, "x\ny");
        assert!(buf.is_empty());
    }

    #[test]
    fn app_files_read_with_their_handler() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("h.lua"), "function readCb() return 1 end").unwrap();
        std::fs::write(
            d.path().join("app.toml"),
            "name = \"t1\"\nowner = \"me\"\nhandler = \"h.lua\"\ntimer_interval_s = 0.5\n[limits]\nmemory_mb = 8\n",
        )
        .unwrap();
        let s = read_app_file(&d.path().join("app.toml")).unwrap();
        assert_eq!(s.source.as_deref(), Some("function readCb() return 1 end"));
        assert_eq!(s.source_name.as_deref(), Some("h.lua"));
        assert_eq!(s.timer_interval_ms, Some(500));
        assert_eq!(s.limits.memory_bytes, Some(8 << 20));
        std::fs::write(
            d.path().join("bad.toml"),
            "name = \"t1\"\nowner = \"me\"\npolicy = \"x\"\ntypo = 1\n",
        )
        .unwrap();
        let e = read_app_file(&d.path().join("bad.toml")).unwrap_err();
        assert!(e.contains("typo"), "{e}");
        std::fs::write(
            d.path().join("none.toml"),
            "name = \"t1\"\nowner = \"me\"\n",
        )
        .unwrap();
        let e = read_app_file(&d.path().join("none.toml")).unwrap_err();
        assert!(e.contains("no handler"), "{e}");
    }
}

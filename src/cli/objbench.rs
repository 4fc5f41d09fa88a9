//! `capy bench obj`: real nodes on loopback. (1) The built-in `update` on
//! one hot object from concurrent clients: every call goes to the object's
//! root and through its queue, committed before it is answered. (2) A
//! JSON-update TASK function (the test image's `incr`) called through the
//! node (HTTP -> node -> root -> container -> commit), against the same
//! container's `/run` called directly with the same input.

use super::bench::{figures, OpFigures as Figures};
use super::cluster::LocalCluster;
use crate::containers::{run_envelope, Engine, FnSpec, Podman, LABEL_FUNCTION};
use crate::http::Client;
use clap::Args;
use hyper::{Method, StatusCode};
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct ObjBenchArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Built-in update calls on the hot object.
    #[arg(long, default_value_t = 20000)]
    pub ops: usize,
    /// Concurrent clients of the hot object.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// TASK calls (each way).
    #[arg(long, default_value_t = 500)]
    pub task_ops: usize,
    /// Image the TASK function runs (podman must have it, or
    /// CAPY_FN_IMAGE must name its archive).
    #[arg(long, default_value = "localhost/capy-fn-runtime:test")]
    pub image: String,
    /// Skip the TASK part (no podman here).
    #[arg(long)]
    pub no_task: bool,
    /// Give the class a Lua handler whose `updateCb` runs on every update
    /// (counts them in the state): what a class handler costs per call.
    #[arg(long)]
    pub class_handler: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
pub struct TaskFigures {
    pub via_node: Figures,
    pub direct: Figures,
    /// p50 through the node minus p50 of the direct call.
    pub overhead_p50_ms: f64,
    pub overhead_p99_ms: f64,
}

#[derive(Serialize)]
pub struct ObjReport {
    pub nodes: usize,
    pub clients: usize,
    /// Whether the class ran a Lua `updateCb` on every call.
    pub class_handler: bool,
    pub update: Figures,
    /// Store commits per update call (group commit makes it < 1).
    pub commits_per_call: Option<f64>,
    pub task: Option<TaskFigures>,
}

const PKG: &str = r#"
name: bench
classes:
  - name: Counter
    state:
      fields:
        - {name: n, type: integer, default: 0}
        - {name: note, type: string, default: ""}
    functions:
      - name: jsonupdate
        type: TASK
        image: IMAGE
        config: {action: incr, field: n}
"#;

/// Added to [`PKG`] with `--class-handler`.
const HANDLER: &str = r#"        - {name: updates, type: integer, default: 0}
    handler: |
      function updateCb(caller, st)
        st.updates = (st.updates or 0) + 1
        return st
      end
"#;

async fn post(c: &mut Client, path: &str, body: &str) -> Result<serde_json::Value, String> {
    let r = c
        .request(
            Method::POST,
            path,
            Some((body.as_bytes().to_vec(), "application/json")),
        )
        .await
        .map_err(|e| e.to_string())?;
    if !r.status.is_success() {
        return Err(format!("{path}: {} {}", r.status, r.message()));
    }
    serde_json::from_slice(&r.body).map_err(|e| e.to_string())
}

pub fn run(a: ObjBenchArgs) -> i32 {
    match bench(&a) {
        Ok(r) => {
            if a.json {
                return super::print_json(&r);
            } else {
                println!(
                    "{} nodes; built-in update on one object, {} clients{}: {:.0} calls/s, p50 {:.3} ms, p99 {:.3} ms ({} errors)",
                    r.nodes, r.clients, if r.class_handler { ", with a class updateCb" } else { "" },
                    r.update.ops_per_s, r.update.p50_ms, r.update.p99_ms, r.update.errors
                );
                if let Some(t) = &r.task {
                    println!(
                        "TASK json update: via node p50 {:.3} ms p99 {:.3} ms; container direct p50 {:.3} ms p99 {:.3} ms; overhead p50 {:.3} ms",
                        t.via_node.p50_ms, t.via_node.p99_ms, t.direct.p50_ms, t.direct.p99_ms, t.overhead_p50_ms
                    );
                }
            }
            super::EXIT_OK
        }
        Err(e) => {
            eprintln!("capy: bench obj: {e}");
            super::EXIT_FAILED
        }
    }
}

fn bench(a: &ObjBenchArgs) -> Result<ObjReport, String> {
    if a.nodes == 0 || a.clients == 0 {
        return Err("--nodes and --clients must be at least 1".into());
    }
    let bin = std::env::current_exe().map_err(|e| format!("finding the capy binary: {e}"))?;
    let mut cluster = LocalCluster::prepare(&bin, a.nodes, 1)?;
    cluster.start_all()?;
    cluster.wait_converged(Duration::from_secs(60))?;
    let addr = cluster.nodes[0].http.to_string();
    let socket = std::env::var("CAPY_PODMAN_SOCKET")
        .unwrap_or_else(|_| crate::containers::DEFAULT_SOCKET.to_string());
    smol::block_on(async {
        if !a.no_task {
            ensure_image(&socket, &a.image).await?;
        }
        let mut c = Client::connect(&addr, Duration::from_secs(60))
            .await
            .map_err(|e| e.to_string())?;
        let mut text = PKG.replace("IMAGE", &a.image);
        if a.class_handler {
            // The extra field and the handler go after the last field.
            text = text.replace(
                "        - {name: note, type: string, default: \"\"}\n",
                &format!("        - {{name: note, type: string, default: \"\"}}\n{HANDLER}"),
            );
        }
        let r = c
            .request(
                Method::POST,
                "/api/pkg?file=bench.yaml",
                Some((text.into_bytes(), "application/yaml")),
            )
            .await
            .map_err(|e| e.to_string())?;
        if r.status != StatusCode::OK {
            return Err(format!("deploy: {}", r.message()));
        }
        let v = post(&mut c, "/api/obj", r#"{"class": "bench.Counter"}"#).await?;
        let id = v["id"].as_str().ok_or("no object id")?.to_string();
        let commits_before = commits(&cluster);

        // (1) built-in update on the hot object.
        let started = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..a.clients {
            let addr = cluster.nodes[k % cluster.nodes.len()].http.to_string();
            let (id, ops, clients) = (id.clone(), a.ops, a.clients);
            tasks.push(smol::spawn(async move {
                let mut c = Client::connect(&addr, Duration::from_secs(60))
                    .await
                    .map_err(|e| e.to_string())?;
                let (mut lat, mut errors) = (Vec::new(), 0usize);
                let mut i = k;
                while i < ops {
                    let body = format!("{{\"note\": \"c{k}-{i}\"}}");
                    let t = Instant::now();
                    match post(&mut c, &format!("/api/obj/{id}/update"), &body).await {
                        Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(_) => errors += 1,
                    }
                    i += clients;
                }
                Ok::<_, String>((lat, errors))
            }));
        }
        let (mut lat, mut errors) = (Vec::new(), 0);
        for t in tasks {
            let (l, e) = t.await?;
            lat.extend(l);
            errors += e;
        }
        let update = figures(lat, errors, started.elapsed());
        if a.class_handler {
            // The handler must have run once per acknowledged update.
            let r = c
                .request(Method::GET, &format!("/api/obj/{id}"), None)
                .await
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value =
                serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
            let counted = v["state"]["updates"].as_u64().unwrap_or(0);
            if counted != update.ops as u64 {
                return Err(format!(
                    "the class handler counted {counted} updates, {} were acknowledged",
                    update.ops
                ));
            }
        }
        let commits_per_call = match (commits_before, commits(&cluster)) {
            (Some(b), Some(a2)) if update.ops > 0 => Some((a2 - b) as f64 / update.ops as f64),
            _ => None,
        };

        // (2) TASK through the node vs the container directly.
        let task = if a.no_task {
            None
        } else {
            let path = format!("/api/obj/{id}/jsonupdate");
            // Warm the container up.
            post(&mut c, &path, "{}").await?;
            let (mut lat, mut errors) = (Vec::new(), 0);
            let t0 = Instant::now();
            for _ in 0..a.task_ops {
                let t = Instant::now();
                match post(&mut c, &path, "{}").await {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => errors += 1,
                }
            }
            let via_node = figures(lat, errors, t0.elapsed());
            let direct = direct_calls(&socket, &id, a.task_ops).await?;
            Some(TaskFigures {
                overhead_p50_ms: via_node.p50_ms - direct.p50_ms,
                overhead_p99_ms: via_node.p99_ms - direct.p99_ms,
                via_node,
                direct,
            })
        };
        Ok(ObjReport {
            nodes: a.nodes,
            clients: a.clients,
            class_handler: a.class_handler,
            update,
            commits_per_call,
            task,
        })
    })
}

fn commits(c: &LocalCluster) -> Option<u64> {
    let mut sum = 0;
    for i in 0..c.nodes.len() {
        sum += c.status(i).ok()?["objects"]["commits"].as_u64()?;
    }
    Some(sum)
}

/// Loads the test image from `$CAPY_FN_IMAGE` when podman lacks it.
async fn ensure_image(socket: &str, image: &str) -> Result<(), String> {
    let p = Podman::new(socket);
    if p.image_exists(image).await.map_err(|e| e.to_string())? {
        return Ok(());
    }
    let archive = std::env::var("CAPY_FN_IMAGE").map_err(|_| {
        format!(
            "podman has no {image} and CAPY_FN_IMAGE names no archive (run scripts/build-fn-image)"
        )
    })?;
    p.load_image(std::path::PathBuf::from(archive).into())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The same `/run` input the node sends, straight to the container the
/// node started for the function.
async fn direct_calls(socket: &str, id: &str, n: usize) -> Result<Figures, String> {
    let p = Podman::new(socket);
    let list = p
        .list(&[(LABEL_FUNCTION, "bench/Counter.jsonupdate")])
        .await
        .map_err(|e| e.to_string())?;
    let port = list
        .iter()
        .find_map(|c| c.host_port)
        .ok_or("no running container of bench/Counter.jsonupdate")?;
    let mut c = Client::connect(&format!("127.0.0.1:{port}"), Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    let spec = FnSpec::new("bench", "Counter.jsonupdate", "");
    let (mut lat, mut errors) = (Vec::new(), 0);
    let t0 = Instant::now();
    for i in 0..n {
        let input = run_envelope(
            &spec,
            json!({
                "action": "incr", "field": "n", "args": {},
                "state": {"n": i, "note": ""}, "blobs": {},
                "object": {"id": id, "class": "bench.Counter", "version": i},
                "function": "jsonupdate",
            }),
        );
        let t = Instant::now();
        match post(&mut c, "/run", &input.to_string()).await {
            Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
            Err(_) => errors += 1,
        }
    }
    Ok(figures(lat, errors, t0.elapsed()))
}

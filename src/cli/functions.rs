//! `capy fn ...` (deploy, invoke, info, rm, warm, cool: requests to a node's
//! `/api/fn/` routes) and `capy bench fn` (the container host's own figures
//! and the same through real nodes: HTTP -> node -> root -> container).

use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::http::{percent_encode, Client};
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum FnCmd {
    /// Store a function's image archive (`podman save` format) in the
    /// cluster, under the function's key.
    Deploy {
        /// APP/FN
        function: String,
        /// The image archive.
        #[arg(long)]
        image: PathBuf,
        /// Memory limit of each container, e.g. 128m (default 128 MiB).
        #[arg(long)]
        memory: Option<String>,
        /// Per-invocation timeout in seconds (default 60).
        #[arg(long)]
        timeout: Option<String>,
        /// Keep an idle container this many seconds (default: the node's).
        #[arg(long)]
        keep_alive: Option<String>,
        #[command(flatten)]
        c: NodeArg,
    },
    /// Run a function on its root and print its output.
    Invoke {
        /// APP/FN
        function: String,
        /// The input as JSON; `-` reads it from stdin; none sends null.
        input: Option<String>,
        /// Print where and how it ran, with the output.
        #[arg(long, short)]
        verbose: bool,
        #[command(flatten)]
        c: NodeArg,
    },
    /// Show a function's manifest and where it runs.
    Info {
        function: String,
        #[command(flatten)]
        c: NodeArg,
    },
    /// Remove a function: manifest, containers, image chunks.
    Rm {
        function: String,
        #[command(flatten)]
        c: NodeArg,
    },
    /// Start a container on the function's root now and keep it until
    /// `capy fn cool` (what a handler's `sys.deploy_container` does).
    Warm {
        function: String,
        #[command(flatten)]
        c: NodeArg,
    },
    /// Remove the function's containers on its root
    /// (`sys.delete_container`).
    Cool {
        function: String,
        #[command(flatten)]
        c: NodeArg,
    },
}

#[derive(Args, Debug)]
pub struct FnBenchArgs {
    /// Function image archive: an OpenWhisk-style runtime that echoes its
    /// input (scripts/build-fn-image makes one).
    #[arg(long, env = "CAPY_FN_IMAGE")]
    pub image: PathBuf,
    /// Podman's API socket.
    #[arg(long, env = "CAPY_PODMAN_SOCKET", default_value = crate::containers::DEFAULT_SOCKET)]
    pub podman_socket: PathBuf,
    /// Nodes of the local cluster for the node-path figures.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Cold starts measured, each way.
    #[arg(long, default_value_t = 5)]
    pub cold_runs: usize,
    /// Warm calls measured, each way.
    #[arg(long, default_value_t = 300)]
    pub warm_calls: usize,
    #[arg(long)]
    pub json: bool,
}

/// Longest a deploy may take (the upload and k copies of every chunk).
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest an invoke waits: the longest function timeout plus a cold start.
const INVOKE_TIMEOUT: Duration = Duration::from_secs(420);
const CONTROL_TIMEOUT: Duration = Duration::from_secs(120);

fn split_fn(s: &str) -> Result<(&str, &str), String> {
    match s.split_once('/') {
        Some((a, f)) if !a.is_empty() && !f.is_empty() && !f.contains('/') => Ok((a, f)),
        _ => Err(format!("{s:?}: expected APP/FN")),
    }
}

fn fn_url(node: &str, app: &str, name: &str, tail: &str) -> String {
    format!(
        "{}/api/fn/{}/{}{tail}",
        node,
        percent_encode(app),
        percent_encode(name)
    )
}

use super::client::{failed, request_within as request, NodeArg};

fn print_body(body: &[u8]) {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(_) => println!("{}", String::from_utf8_lossy(body)),
    }
}

pub fn run(cmd: FnCmd) -> i32 {
    match cmd {
        FnCmd::Deploy {
            function,
            image,
            memory,
            timeout,
            keep_alive,
            c,
        } => deploy(&c, &function, &image, memory, timeout, keep_alive),
        FnCmd::Invoke {
            function,
            input,
            verbose,
            c,
        } => invoke(&c, &function, input.as_deref(), verbose),
        FnCmd::Info { function, c } => simple(&c, &function, Method::GET, "", "info"),
        FnCmd::Rm { function, c } => simple(&c, &function, Method::DELETE, "", "rm"),
        FnCmd::Warm { function, c } => simple(&c, &function, Method::POST, "/containers", "warm"),
        FnCmd::Cool { function, c } => simple(&c, &function, Method::DELETE, "/containers", "cool"),
    }
}

fn deploy(
    c: &NodeArg,
    function: &str,
    image: &Path,
    memory: Option<String>,
    timeout: Option<String>,
    keep_alive: Option<String>,
) -> i32 {
    let (app, name) = match split_fn(function) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("capy: {e}");
            return EXIT_USAGE;
        }
    };
    let max = crate::node::functions::FunctionsConfig::default().max_image_bytes;
    let mut archive = Vec::new();
    let read = std::fs::File::open(image)
        .and_then(|f| f.take(max + 1).read_to_end(&mut archive))
        .map_err(|e| format!("{}: {e}", image.display()));
    if let Err(e) = read {
        eprintln!("capy: {e}");
        return EXIT_USAGE;
    }
    if archive.len() as u64 > max {
        eprintln!("capy: {}: larger than {max} bytes", image.display());
        return EXIT_USAGE;
    }
    let mut q = Vec::new();
    for (k, v) in [
        ("memory", memory),
        ("timeout", timeout),
        ("keep_alive", keep_alive),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", percent_encode(&v)));
        }
    }
    let tail = if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    };
    let url = fn_url(c.base(), app, name, &tail);
    let r = match request(
        &url,
        Method::PUT,
        Some((archive, "application/x-tar")),
        DEPLOY_TIMEOUT,
    ) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if !r.status.is_success() {
        return failed(&format!("deploy {function}"), &r);
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    println!(
        "deployed {function}: {} bytes in {} chunks, sha256 {}",
        v["size"],
        v["chunks"],
        v["sha256"].as_str().unwrap_or("?")
    );
    EXIT_OK
}

fn invoke(c: &NodeArg, function: &str, input: Option<&str>, verbose: bool) -> i32 {
    let (app, name) = match split_fn(function) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("capy: {e}");
            return EXIT_USAGE;
        }
    };
    let body = match input {
        None => b"null".to_vec(),
        Some("-") => {
            let mut b = Vec::new();
            if let Err(e) = std::io::stdin()
                .take(crate::node::functions::MAX_INPUT as u64 + 1)
                .read_to_end(&mut b)
            {
                eprintln!("capy: reading stdin: {e}");
                return EXIT_USAGE;
            }
            b
        }
        Some(s) => s.as_bytes().to_vec(),
    };
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&body) {
        eprintln!("capy: the input is not JSON: {e}");
        return EXIT_USAGE;
    }
    let tail = if verbose { "?verbose" } else { "" };
    let url = fn_url(c.base(), app, name, tail);
    let r = match request(
        &url,
        Method::POST,
        Some((body, "application/json")),
        INVOKE_TIMEOUT,
    ) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if !r.status.is_success() {
        return failed(&format!("invoke {function}"), &r);
    }
    print_body(&r.body);
    EXIT_OK
}

fn simple(c: &NodeArg, function: &str, method: Method, tail: &str, what: &str) -> i32 {
    let (app, name) = match split_fn(function) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("capy: {e}");
            return EXIT_USAGE;
        }
    };
    let r = match request(
        &fn_url(c.base(), app, name, tail),
        method,
        None,
        CONTROL_TIMEOUT,
    ) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if !r.status.is_success() {
        return failed(&format!("{what} {function}"), &r);
    }
    print_body(&r.body);
    EXIT_OK
}

// ---- capy bench fn -----------------------------------------------------------

/// Sample figures, as `capy bench fn`'s host part reports them.
pub type Figures = crate::containers::Percentiles;

/// Figures through real nodes: HTTP client -> node -> the function's root
/// -> container, against `/run` sent straight to the same container.
#[derive(Clone, Debug, Serialize)]
pub struct NodePathReport {
    pub nodes: usize,
    pub root: String,
    /// Invoke through the root's HTTP, no container, image in podman.
    pub cold_start_local_ms: Figures,
    /// The same with the image gone from podman: read from the store's
    /// chunks, checked, loaded.
    pub cold_start_from_store_ms: Figures,
    /// The image part of those cold starts: chunks read from the store,
    /// hash checked, loaded into podman.
    pub image_fetch_and_load_ms: Figures,
    /// Warm invoke through the root's own HTTP API.
    pub warm_via_root_us: Figures,
    /// Warm invoke through another node (one QUIC round trip to the root).
    pub warm_via_other_node_us: Figures,
    /// `/run` straight to the container, same connection reuse.
    pub warm_direct_us: Figures,
    pub warm_overhead_root_p50_us: f64,
    pub warm_overhead_root_p99_us: f64,
    pub warm_overhead_other_p50_us: f64,
    pub warm_overhead_other_p99_us: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FnBenchReport {
    /// The container host alone (src/containers' bench).
    pub host: crate::containers::BenchReport,
    pub node_path: NodePathReport,
}

/// The test image with `pad` more zero blocks: the same image to podman, a
/// new archive (so a reference of its own, which the bench may remove) to
/// capy.
fn padded(archive: &[u8], pad: usize) -> Vec<u8> {
    let mut v = archive.to_vec();
    v.resize(v.len() + 1024 * pad, 0);
    v
}

pub fn bench(a: FnBenchArgs) -> i32 {
    match smol::block_on(bench_all(&a)) {
        Ok(r) => {
            if a.json {
                return super::print_json(&r);
            } else {
                print_report(&r);
            }
            EXIT_OK
        }
        Err(e) => {
            eprintln!("capy: bench fn: {e}");
            EXIT_FAILED
        }
    }
}

fn print_report(r: &FnBenchReport) {
    let h = &r.host;
    let n = &r.node_path;
    println!("podman {}", h.podman);
    println!("container host alone:");
    println!(
        "  cold start, image local      p50 {:8.1} ms  p99 {:8.1} ms",
        h.cold_start_local_ms.p50, h.cold_start_local_ms.p99
    );
    println!(
        "  cold start, image loaded     p50 {:8.1} ms  p99 {:8.1} ms",
        h.cold_start_with_load_ms.p50, h.cold_start_with_load_ms.p99
    );
    println!(
        "  warm overhead over direct    p50 {:8.1} us  p99 {:8.1} us",
        h.warm_overhead_p50_us, h.warm_overhead_p99_us
    );
    println!("through {} nodes (root {}):", n.nodes, n.root);
    println!(
        "  cold start, image local      p50 {:8.1} ms  p99 {:8.1} ms",
        n.cold_start_local_ms.p50, n.cold_start_local_ms.p99
    );
    println!(
        "  cold start, image from store p50 {:7.1} ms  p99 {:8.1} ms  (image fetch + load p50 {:.1} ms)",
        n.cold_start_from_store_ms.p50, n.cold_start_from_store_ms.p99, n.image_fetch_and_load_ms.p50
    );
    println!(
        "  warm via root                p50 {:8.1} us  p99 {:8.1} us  (overhead p50 {:.1} us, p99 {:.1} us)",
        n.warm_via_root_us.p50, n.warm_via_root_us.p99, n.warm_overhead_root_p50_us, n.warm_overhead_root_p99_us
    );
    println!(
        "  warm via another node        p50 {:8.1} us  p99 {:8.1} us  (overhead p50 {:.1} us, p99 {:.1} us)",
        n.warm_via_other_node_us.p50, n.warm_via_other_node_us.p99, n.warm_overhead_other_p50_us, n.warm_overhead_other_p99_us
    );
    println!(
        "  direct to the container      p50 {:8.1} us  p99 {:8.1} us",
        n.warm_direct_us.p50, n.warm_direct_us.p99
    );
}

async fn bench_all(a: &FnBenchArgs) -> Result<FnBenchReport, String> {
    use crate::containers::{BenchConfig, Engine, ImageSource, Podman};
    if a.nodes < 2 {
        return Err("--nodes must be at least 2 (a root and another node)".into());
    }
    if a.cold_runs == 0 || a.warm_calls == 0 {
        return Err("--cold-runs and --warm-calls must be at least 1".into());
    }
    let archive = std::fs::read(&a.image).map_err(|e| format!("{}: {e}", a.image.display()))?;
    let engine: Arc<dyn Engine> = Arc::new(Podman::new(&a.podman_socket));
    let seed = 1 + (rand::random::<u16>() as usize) % 4000;
    let host = crate::containers::bench(
        engine.clone(),
        ImageSource::Bytes(padded(&archive, seed).into()),
        BenchConfig {
            cold_runs: a.cold_runs,
            warm_calls: a.warm_calls,
            ..BenchConfig::default()
        },
    )
    .await
    .map_err(|e| format!("container host: {e}"))?;
    let node_archive = padded(&archive, seed + 1);
    let node_path = node_bench(a, &engine, node_archive).await?;
    Ok(FnBenchReport { host, node_path })
}

async fn node_bench(
    a: &FnBenchArgs,
    engine: &Arc<dyn crate::containers::Engine>,
    archive: Vec<u8>,
) -> Result<NodePathReport, String> {
    use super::cluster::LocalCluster;
    let image_ref = crate::containers::FnSpec::image_ref_for(&archive);
    let bin = std::env::current_exe().map_err(|e| format!("finding the capy binary: {e}"))?;
    let mut cluster = LocalCluster::prepare(&bin, a.nodes, 1)?;
    for n in &mut cluster.nodes {
        n.extra_args = vec![
            "--podman-socket".into(),
            a.podman_socket.display().to_string(),
        ];
    }
    cluster.start_all()?;
    cluster.wait_converged(Duration::from_secs(60))?;
    let r = node_measure(&cluster, a, engine, archive, &image_ref).await;
    // Leave nothing behind: the function (and its containers), the image.
    let _ = cluster.http(0, Method::DELETE, "/api/fn/bench/echo", None);
    for i in 0..cluster.nodes.len() {
        cluster.stop(i);
    }
    let _ = engine.remove_image(&image_ref).await;
    r
}

async fn connect(addr: &std::net::SocketAddr) -> Result<Client, String> {
    Client::connect(&addr.to_string(), Duration::from_secs(120))
        .await
        .map_err(|e| e.to_string())
}

/// One invocation with `?verbose`; answers (wall ms, the reply's JSON).
async fn invoke_verbose(
    c: &mut Client,
    input: &serde_json::Value,
) -> Result<(f64, serde_json::Value), String> {
    let body = serde_json::to_vec(input).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let r = c
        .request(
            Method::POST,
            "/api/fn/bench/echo?verbose",
            Some((body, "application/json")),
        )
        .await
        .map_err(|e| e.to_string())?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if r.status != StatusCode::OK {
        return Err(format!("invoke: {} ({})", r.message(), r.status));
    }
    let v = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
    Ok((ms, v))
}

async fn node_measure(
    cluster: &super::cluster::LocalCluster,
    a: &FnBenchArgs,
    engine: &Arc<dyn crate::containers::Engine>,
    archive: Vec<u8>,
    image_ref: &str,
) -> Result<NodePathReport, String> {
    let r = cluster.http(
        0,
        Method::PUT,
        "/api/fn/bench/echo?timeout=30&memory=64m",
        Some(archive),
    )?;
    if r.status != StatusCode::OK {
        return Err(format!("deploy: {} ({})", r.message(), r.status));
    }
    let info = cluster.http(0, Method::GET, "/api/fn/bench/echo", None)?;
    let info: serde_json::Value = serde_json::from_slice(&info.body).map_err(|e| e.to_string())?;
    let root_name = info["root"]["node"]
        .as_str()
        .ok_or_else(|| format!("no root in {info}"))?
        .to_string();
    let root = cluster
        .nodes
        .iter()
        .position(|n| n.name == root_name)
        .ok_or_else(|| format!("root {root_name} is not a node of the bench cluster"))?;
    let other = (root + 1) % cluster.nodes.len();
    let mut via_root = connect(&cluster.nodes[root].http).await?;
    let mut via_other = connect(&cluster.nodes[other].http).await?;
    let input = |i: usize| serde_json::json!({ "action": "echo", "i": i });
    let cool = || -> Result<(), String> {
        let r = cluster.http(root, Method::DELETE, "/api/fn/bench/echo/containers", None)?;
        if r.status != StatusCode::OK {
            return Err(format!("removing containers: {}", r.message()));
        }
        Ok(())
    };

    // Cold, image local (the first invoke may load it; it is not counted).
    invoke_verbose(&mut via_root, &input(0)).await?;
    let mut cold_local = Vec::new();
    for i in 0..a.cold_runs {
        cool()?;
        let (ms, v) = invoke_verbose(&mut via_root, &input(i)).await?;
        if v["cold"] != true || !v["timings"]["image_load_us"].is_null() {
            return Err(format!("expected a cold start from a local image: {v}"));
        }
        cold_local.push(ms);
    }
    // Cold, image from the store.
    let mut cold_store = Vec::new();
    let mut store_read = Vec::new();
    for i in 0..a.cold_runs {
        cool()?;
        engine
            .remove_image(image_ref)
            .await
            .map_err(|e| format!("removing {image_ref} from podman: {e}"))?;
        let (ms, v) = invoke_verbose(&mut via_root, &input(i)).await?;
        if v["cold"] != true || v["timings"]["image_load_us"].is_null() {
            return Err(format!("expected a cold start loading the image: {v}"));
        }
        cold_store.push(ms);
        let load_ms = v["timings"]["image_load_us"].as_f64().unwrap_or(0.0) / 1e3;
        store_read.push(load_ms);
    }

    // Warm: the container's port from the root's status.
    invoke_verbose(&mut via_root, &input(0)).await?;
    let status = cluster.status(root)?;
    let port = status["containers"]
        .as_array()
        .and_then(|cs| {
            cs.iter()
                .find(|c| c["function"] == "bench/echo")
                .and_then(|c| c["host_port"].as_u64())
        })
        .ok_or_else(|| format!("no container of bench/echo on the root: {status}"))?;
    let direct_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port as u16));
    let mut direct = connect(&direct_addr).await?;
    let mut root_us = Vec::new();
    let mut other_us = Vec::new();
    let mut direct_us = Vec::new();
    for i in 0..a.warm_calls {
        let body = serde_json::to_vec(&input(i)).map_err(|e| e.to_string())?;
        for (c, out) in [
            (&mut via_root, &mut root_us),
            (&mut via_other, &mut other_us),
        ] {
            let t = Instant::now();
            let r = c
                .request(
                    Method::POST,
                    "/api/fn/bench/echo",
                    Some((body.clone(), "application/json")),
                )
                .await
                .map_err(|e| e.to_string())?;
            out.push(t.elapsed().as_secs_f64() * 1e6);
            if r.status != StatusCode::OK {
                return Err(format!("warm invoke: {} ({})", r.message(), r.status));
            }
        }
        let run = serde_json::to_vec(&serde_json::json!({ "value": input(i) }))
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        let r = direct
            .request(Method::POST, "/run", Some((run, "application/json")))
            .await
            .map_err(|e| e.to_string())?;
        direct_us.push(t.elapsed().as_secs_f64() * 1e6);
        if r.status != StatusCode::OK {
            return Err(format!("direct /run: {}", r.status));
        }
    }
    let (root_f, other_f, direct_f) = (
        Figures::of(root_us),
        Figures::of(other_us),
        Figures::of(direct_us),
    );
    Ok(NodePathReport {
        nodes: cluster.nodes.len(),
        root: root_name,
        cold_start_local_ms: Figures::of(cold_local),
        cold_start_from_store_ms: Figures::of(cold_store),
        image_fetch_and_load_ms: Figures::of(store_read),
        warm_overhead_root_p50_us: root_f.p50 - direct_f.p50,
        warm_overhead_root_p99_us: root_f.p99 - direct_f.p99,
        warm_overhead_other_p50_us: other_f.p50 - direct_f.p50,
        warm_overhead_other_p99_us: other_f.p99 - direct_f.p99,
        warm_via_root_us: root_f,
        warm_via_other_node_us: other_f,
        warm_direct_us: direct_f,
    })
}

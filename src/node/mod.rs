//! Node runtime: the one place that wires the parts together on one smol
//! executor. It owns the process: configuration, identity, the transport,
//! the store, the protocol cores, the HTTP server, systemd notifications and
//! signals. The cores never see a socket or a clock; this module feeds them.

pub mod api;
pub mod apps;
pub mod apps_api;
pub mod boards;
pub mod calls;
pub mod config;
pub mod functions;
pub mod metrics;
pub mod obj_handlers;
pub mod objects;
pub mod peers;
pub mod pubsub;
pub mod runtime;
pub mod status;
pub mod vnodes;

use crate::cli::{RunArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};
use crate::store::Db;
use crate::transport::{self, Identity, Transport, TransportConfig};
use config::NodeConfig;
use runtime::Node;
use serde_json::json;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

pub use runtime::OpError;

/// Defaults, then the board profile (named by `--board` or the file's
/// `board =`), then the config file, then flags.
pub fn resolve_config(args: &RunArgs) -> Result<NodeConfig, String> {
    let table = match &args.config {
        Some(p) => Some((p, NodeConfig::read_table(p).map_err(|e| e.to_string())?)),
        None => None,
    };
    let mut cfg = NodeConfig::default();
    let board = match (
        &args.board,
        table.as_ref().and_then(|(_, t)| t.get("board")),
    ) {
        (Some(b), _) => Some(b.clone()),
        (None, Some(toml::Value::String(b))) => Some(b.clone()),
        (None, Some(other)) => return Err(format!("board = {other}: expected a board name")),
        (None, None) => None,
    };
    if let Some(b) = board {
        boards::get(&b).map_err(|e| e.to_string())?.apply(&mut cfg);
    }
    if let Some((p, t)) = table {
        cfg = cfg
            .overlay(t)
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if let Some(d) = &args.data {
        cfg.data = Some(d.clone());
    }
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(a) = args.advertise {
        cfg.advertise = Some(a);
    }
    if let Some(h) = args.http {
        cfg.http = h;
    }
    if !args.join.is_empty() {
        cfg.join = args.join.clone();
    }
    if let Some(b) = &args.board {
        cfg.board = Some(b.clone());
    }
    if let Some(l) = &args.log {
        cfg.log = l.clone();
    }
    if let Some(s) = &args.podman_socket {
        cfg.functions.podman_socket = s.clone();
    }
    if let Some(a) = args.blob_http {
        cfg.blob_http = Some(a);
    }
    if let Some(u) = &args.blob_url {
        cfg.blob_url = Some(u.clone());
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn init_logging(filter: &str) {
    let f = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(f)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The address other nodes reach us at: `advertise`, or the listen address,
/// or for a wildcard listen the address of the interface that routes to the
/// outside (found without sending anything).
fn advertised(cfg: &NodeConfig, bound: SocketAddr) -> SocketAddr {
    if let Some(a) = cfg.advertise {
        return a;
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ip = UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, bound.port())
}

/// `capy run`: returns the exit code.
pub fn run_cmd(args: RunArgs) -> i32 {
    let cfg = match resolve_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("capy: {e}");
            return EXIT_USAGE;
        }
    };
    init_logging(&cfg.log);
    match smol::block_on(run(cfg)) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("capy: {e}");
            EXIT_FAILED
        }
    }
}

async fn run(cfg: NodeConfig) -> Result<(), String> {
    let dir = cfg.data_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("data dir {}: {e}", dir.display()))?;
    match transport::ensure_dev_identity(&dir) {
        Ok(true) => tracing::warn!(
            "no certificate in {}: created a local dev CA and a node certificate there \
             (fine for one node; issue real ones with `capy ca issue` for a cluster)",
            dir.display()
        ),
        Ok(false) => {}
        Err(e) => return Err(e.to_string()),
    }
    let identity = Identity::load(&dir).map_err(|e| e.to_string())?;
    let store_path = dir.join("store.redb");
    let mut quarantined = None;
    if store_path.exists() && !store_opens_in_child(&store_path) {
        quarantined = Some(crate::store::db::quarantine(&store_path).map_err(|e| e.to_string())?);
    }
    let (db, q) = Db::open_or_quarantine(&store_path).map_err(|e| e.to_string())?;
    let quarantined = quarantined.or(q);
    if let Some(q) = quarantined {
        tracing::error!(
            "the store file was unreadable; moved it to {} and started an empty store \
             (replicas on other nodes will refill it)",
            q.display()
        );
    }
    let tcfg = TransportConfig {
        // A frame carries one store message at most, plus the envelope.
        max_frame: crate::store::replica::MAX_MSG + 64 * 1024,
        ..TransportConfig::default()
    };
    let (transport, incoming) = Transport::bind(&identity, cfg.listen, tcfg)
        .map_err(|e| format!("binding {}: {e}", cfg.listen))?;
    let adv = advertised(&cfg, transport.local_addr());
    let http_listener = smol::net::TcpListener::bind(cfg.http)
        .await
        .map_err(|e| format!("binding HTTP on {}: {e}", cfg.http))?;
    let http_addr = http_listener.local_addr().map_err(|e| e.to_string())?;
    let join = cfg.join.clone();
    let node = Node::new(cfg, &identity, transport, adv, db);
    if let Ok(mut h) = node.http.lock() {
        *h = Some(http_addr);
    }
    let fc = Arc::new(functions::HandlerFunctions(Arc::downgrade(&node)));
    node.apps.set_functions(fc)?;
    tracing::info!(
        name = %node.name,
        zone = %node.zone,
        vnodes = ?node.vnode_ids().iter().map(|v| v.short()).collect::<Vec<_>>(),
        quic = %adv,
        http = %http_addr,
        "capy node starting"
    );

    smol::spawn(node.clone().receive_loop(incoming)).detach();
    smol::spawn(node.clone().tick_loop()).detach();
    smol::spawn(node.clone().remember_peers_loop()).detach();
    smol::spawn(node.clone().join_loop(join)).detach();
    smol::spawn(node.clone().functions_loop()).detach();
    smol::spawn(node.clone().apps_loop()).detach();
    let round = Duration::from_secs_f64(node.cfg.game_round_s);
    smol::spawn(node.clone().game_loop(round)).detach();
    objects::start(&node).await?;
    let api: Arc<dyn crate::http::Handler> = Arc::new(api::Api(node.clone()));
    smol::spawn(async move {
        if let Err(e) = crate::http::serve(http_listener, api).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    })
    .detach();

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut wd_us = 0;
    if sd_notify::watchdog_enabled(false, &mut wd_us) {
        let period = Duration::from_micros(wd_us / 2);
        let n = node.clone();
        smol::spawn(async move {
            loop {
                smol::Timer::after(period).await;
                // Only pet the watchdog while the executor and the cores
                // respond: a wedged node gets restarted.
                let _ = n.joined();
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        })
        .detach();
    }

    wait_for_signal().await;
    tracing::info!("stopping: leaving the overlay");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    node.leave().await;
    node.functions_shutdown().await;
    Ok(())
}

/// Exit code of `capy __check-store` for a file that is not a usable store.
const CHECK_UNREADABLE: i32 = 3;

/// `capy __check-store FILE`: 0 if the file opens as a store, 3 if it is
/// corrupt or foreign, 1 for other errors (locked, permissions).
pub fn check_store_cmd(path: &Path) -> i32 {
    match Db::open(path) {
        Ok(_) => 0,
        Err(e) if e.is_unreadable_file() => {
            eprintln!("{e}");
            CHECK_UNREADABLE
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_FAILED
        }
    }
}

/// Opens the store once in a child process first: some damaged files make
/// the storage engine abort rather than return an error, and with
/// panic=abort that would take the node down at every start. A child that
/// dies or reports the file unreadable means: quarantine it. Any other
/// failure is left for the real open to report.
fn store_opens_in_child(path: &Path) -> bool {
    let Ok(exe) = std::env::current_exe() else {
        return true;
    };
    match std::process::Command::new(exe)
        .arg("__check-store")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
    {
        Ok(out) => match out.status.code() {
            Some(CHECK_UNREADABLE) | None => {
                tracing::error!(
                    file = %path.display(),
                    "store file unreadable ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                false
            }
            Some(_) => true,
        },
        Err(e) => {
            tracing::warn!("cannot run the store check ({e}); opening directly");
            true
        }
    }
}

async fn wait_for_signal() {
    use async_signal::{Signal, Signals};
    use futures_lite::StreamExt;
    match Signals::new([Signal::Term, Signal::Int]) {
        Ok(mut s) => {
            let _ = s.next().await;
        }
        Err(e) => {
            tracing::warn!("cannot listen for signals ({e}); stop the node with SIGKILL");
            futures_lite::future::pending::<()>().await;
        }
    }
}

/// `GET /api/status`.
pub fn status_json(node: &Node) -> serde_json::Value {
    let cores = node.lock();
    // Peers are other gateways: one row per address, with the vnodes of it
    // this node knows and the best RTT measured to any of them.
    let mut by_addr: std::collections::BTreeMap<
        SocketAddr,
        (crate::id::NodeId, Vec<crate::id::NodeId>, u64),
    > = std::collections::BTreeMap::new();
    let mut vnodes = Vec::new();
    let mut min_leaf = usize::MAX;
    for p in cores.vnodes.values() {
        let leaf = p.leaf_set();
        min_leaf = min_leaf.min(leaf.len());
        for (h, rtt) in p.neighbours() {
            if h.addr == node.quic {
                continue;
            }
            let e = by_addr.entry(h.addr).or_insert((h.id, Vec::new(), rtt));
            if !e.1.contains(&h.id) {
                e.1.push(h.id);
            }
            if rtt < e.2 {
                e.2 = rtt;
            }
        }
        vnodes.push(json!({
            "id": p.me().id.to_string(),
            "joined": p.joined(),
            "leaf_set": leaf.iter().map(|h| json!({ "id": h.id.to_string(), "addr": h.addr.to_string() })).collect::<Vec<_>>(),
            "routing_fill": p.routing_fill(),
        }));
    }
    let mut peers: Vec<(u64, serde_json::Value)> = by_addr
        .into_iter()
        .map(|(addr, (id, ids, rtt))| {
            (
                rtt,
                json!({ "addr": addr.to_string(), "id": id.to_string(), "vnodes": ids.len(), "rtt_us": rtt }),
            )
        })
        .collect();
    peers.sort_by_key(|p| p.0);
    let peers: Vec<serde_json::Value> = peers.into_iter().map(|p| p.1).collect();
    let joined = cores.vnodes.values().all(|p| p.joined());
    let rstats = cores.replica.stats();
    drop(cores);
    let mut buckets = Vec::new();
    let (mut keys, mut bytes) = (0u64, 0u64);
    for b in node.db.buckets().unwrap_or_default() {
        if let Ok(s) = node.db.stats(&b) {
            keys += s.keys;
            bytes += s.bytes;
            buckets.push(json!({ "name": b, "keys": s.keys, "bytes": s.bytes }));
        }
    }
    let m = &node.metrics;
    json!({
        "node": {
            "name": node.name,
            "zone": node.zone,
            "max_vnodes": node.max_vnodes,
            "quic": node.quic.to_string(),
            "http": node.http.lock().ok().and_then(|h| *h).map(|h| h.to_string()),
            "version": env!("CARGO_PKG_VERSION"),
            "board": node.cfg.board,
            "arch": std::env::consts::ARCH,
        },
        "uptime_s": node.uptime().as_secs(),
        "joined": joined,
        "vnodes": vnodes,
        "leaf_set_size": if min_leaf == usize::MAX { 0 } else { min_leaf },
        "leaf_set_capacity": node.cfg.leaf_set,
        "peers": peers,
        "game": node.vnode_status(),
        "objects": objects::status(node),
        "store": {
            "keys": keys,
            "bytes": bytes,
            "buckets": buckets,
            "limit": node.cfg.storage_limit,
            "replicas": node.cfg.replicas,
            "replication": format!("{rstats:?}"),
            "replication_lag_p50_us": m.replication_lag.quantile_us(0.5),
        },
        "traffic": {
            "messages_in": m.msgs_in.snapshot().iter().map(|(_, v)| v).sum::<u64>(),
            "messages_out": m.msgs_out.snapshot().iter().map(|(_, v)| v).sum::<u64>(),
            "send_failures": m.send_failures.load(std::sync::atomic::Ordering::Relaxed),
            "puts": m.store_ops.get("put"),
            "gets": m.store_ops.get("get"),
            "deletes": m.store_ops.get("delete"),
            "put_p50_us": m.put_latency.quantile_us(0.5),
            "get_p50_us": m.get_latency.quantile_us(0.5),
            "routed_delivered": m.route_hops.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>(),
            "route_hops_mean": m.mean_hops(),
        },
        "apps": node.apps_status(),
        "pubsub": node.pubsub_status(),
        "functions": functions::status_json(node),
        "containers": functions::containers_json(node),
    })
}

/// `GET /metrics`.
pub fn metrics_text(node: &Node) -> String {
    let (vnodes, leaf) = {
        let c = node.lock();
        let leaf = c
            .vnodes
            .values()
            .map(|p| p.leaf_set().len())
            .min()
            .unwrap_or(0);
        (c.vnodes.len(), leaf)
    };
    let mut keys = 0u64;
    let mut bytes = 0u64;
    for b in node.db.buckets().unwrap_or_default() {
        if let Ok(s) = node.db.stats(&b) {
            keys += s.keys;
            bytes += s.bytes;
        }
    }
    let mut out = node.metrics.render(&[
        ("capy_vnodes", "Vnodes this node runs.", vnodes as f64),
        (
            "capy_leaf_set_size",
            "Smallest leaf set among this node's vnodes.",
            leaf as f64,
        ),
        (
            "capy_store_keys",
            "Keys held in the local store (tombstones included).",
            keys as f64,
        ),
        (
            "capy_store_bytes",
            "Bytes of values held in the local store.",
            bytes as f64,
        ),
        (
            "capy_transport_connections",
            "Open QUIC connections.",
            node.transport.connections() as f64,
        ),
        (
            "capy_uptime_seconds",
            "Seconds since the node started.",
            node.uptime().as_secs_f64(),
        ),
    ]);
    out.push_str(&functions::metrics_text(node));
    out.push_str(&node.apps_metrics());
    out
}

/// Wall-clock time, microseconds since the Unix epoch (0 if the clock is
/// before it).
pub(crate) fn wall_us() -> crate::id::Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Wall-clock time in milliseconds since the Unix epoch.
pub(crate) fn wall_ms() -> u64 {
    wall_us() / 1000
}

/// Locks a mutex, going on with the data after a panic elsewhere (panic =
/// abort in release, so a poisoned lock only happens in tests).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

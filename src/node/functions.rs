//! Functions in the running cluster: deploy an image archive into the
//! store, invoke a function on its key's root, keep containers alive, and
//! restart them elsewhere when the root dies. The container work itself is
//! `containers::FunctionHost`'s; this file wires it to the store, the
//! overlay's calls and the HTTP API.
//!
//! Placement. A function `FN` of app `APP` has the ring key
//! `NodeId::for_key(APP, FN)`: its root runs it, so the function and the
//! app's data under the key `FN` share a root (handlers that manage its
//! keep-alive run there too). What the store holds for it lives in the
//! app's bucket under keys whose names end in a nonce chosen so their ring
//! positions fall next to the function's key ([`ground_key`]): the manifest
//! (`FN#fn#NONCE`, the nonce found the same way by every node) and the
//! image chunks (`FN#img:SHA:I#NONCE`, listed in the manifest). So the
//! root and its leaf-set neighbours hold the image's replicas; a chunk
//! whose position lands past a vnode boundary (rare: the search brings it
//! within ~2^-17 of the ring) is only read from farther away.
//!
//! Deploy (`PUT /api/fn/{app}/{fn}`, any node): the archive is streamed to
//! a temporary file while its SHA-256 and tar structure are checked; an
//! archive that is not one is refused before anything is stored. Then the
//! chunks are written, and the manifest last, so a partial deploy is never
//! visible; the root is told to drop what it cached.
//!
//! Invoke (`POST /api/fn/{app}/{fn}`, any node): `call_root` carries it to
//! the root, which runs it on its `FunctionHost`, cold or warm, loading the
//! image from the chunks (hash checked) when podman lacks it. Load: when
//! every container the root may run for the function is busy, or the root
//! has no podman, it forwards the invocation to a neighbour of the replica
//! set (which holds the chunks), round robin; a neighbour runs forwarded
//! invocations itself and never forwards them again.
//!
//! Recovery: nothing is pinned to a node. When the root dies, the overlay
//! makes the next closest vnode the root; the next invocation reaches it,
//! it reads the manifest from the surviving replicas and cold-starts from
//! the image in the store.
//!
//! Keep-alive: the node's window (`[functions] keep_alive_s`), or the
//! function's own (`--keep-alive`), or none once an app's handler manages
//! the function through [`Node::deploy_function`] /
//! [`Node::undeploy_function`] (`sys.deploy_container` /
//! `sys.delete_container`): from then on containers stay until the handler
//! removes them (on that root; a new root starts from the window again
//! until the handler's next call).

use super::calls::Call;
use super::runtime::{Node, OpError};
use super::{lock, wall_ms};
use crate::containers::{
    AppStats, ContainerStatus, FnError, FnSpec, FunctionHost, HostConfig, ImageSource, KeepAlive,
    IMAGE_REPO,
};
use crate::http::BoxFuture;
use crate::http::{self, Resp};
use crate::id::{NodeHandle, NodeId};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Positions tried per ground key: the best of 2^16 is ~2^-17 of the ring
/// from its target.
const GRIND_TRIES: u32 = 1 << 16;
/// How long a node trusts a manifest it read before reading it again
/// (deploys and removals also tell the root at once).
const RECORD_TTL: Duration = Duration::from_secs(2);
/// Up to this age a cached manifest is still used while it is read again.
const RECORD_STALE: Duration = Duration::from_secs(60);
/// Manifests and manifest keys remembered at most (hostile names cannot
/// grow the caches without bound).
const CACHE_MAX: usize = 4096;
/// Largest invocation input, as JSON text.
pub const MAX_INPUT: usize = 1 << 20;
/// Largest manifest read from the store.
const MAX_MANIFEST: usize = 256 << 10;
/// What a caller waits beyond the function's own timeout: a cold start and
/// an image load from the store.
const CALL_SLACK: Duration = Duration::from_secs(95);
/// How often a node without podman tries to reach it again.
const RECONNECT_EVERY: Duration = Duration::from_secs(30);
/// Manifest format written by this version.
const FORMAT: u8 = 1;

/// `[functions]` in the node's config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionsConfig {
    /// Podman's REST API socket (`--podman-socket`).
    pub podman_socket: PathBuf,
    /// Default keep-alive window of an idle container, in seconds.
    pub keep_alive_s: u64,
    /// Most containers one function runs on this node; past it, the root
    /// forwards invocations to its replica neighbours.
    pub max_per_function: usize,
    /// Most containers this node runs.
    pub max_containers: usize,
    /// Size of the store values an image archive is cut into.
    pub chunk_bytes: usize,
    /// Largest image archive accepted by a deploy.
    pub max_image_bytes: u64,
}

impl Default for FunctionsConfig {
    fn default() -> Self {
        FunctionsConfig {
            podman_socket: PathBuf::from(crate::containers::DEFAULT_SOCKET),
            keep_alive_s: 600,
            max_per_function: 4,
            max_containers: 16,
            chunk_bytes: 1 << 20,
            max_image_bytes: 512 << 20,
        }
    }
}

impl FunctionsConfig {
    pub fn validate(&self) -> Result<(), String> {
        let bad = |m: String| Err(format!("[functions] {m}"));
        if self.keep_alive_s == 0 || self.keep_alive_s > 7 * 24 * 3600 {
            return bad(format!(
                "keep_alive_s = {}: must be between 1 and 604800",
                self.keep_alive_s
            ));
        }
        if !(1..=64).contains(&self.max_per_function) {
            return bad(format!(
                "max_per_function = {}: must be between 1 and 64",
                self.max_per_function
            ));
        }
        if !(1..=256).contains(&self.max_containers) {
            return bad(format!(
                "max_containers = {}: must be between 1 and 256",
                self.max_containers
            ));
        }
        if !(64 << 10..=crate::store::MAX_VALUE).contains(&self.chunk_bytes) {
            return bad(format!(
                "chunk_bytes = {}: must be between 65536 and {}",
                self.chunk_bytes,
                crate::store::MAX_VALUE
            ));
        }
        if self.max_image_bytes == 0 || self.max_image_bytes > 4 << 30 {
            return bad(format!(
                "max_image_bytes = {}: must be between 1 and 4 GiB",
                self.max_image_bytes
            ));
        }
        Ok(())
    }
}

/// What the store holds for a deployed function, under its manifest key.
/// Written after every chunk, so whoever reads one finds a whole image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FnRecord {
    pub format: u8,
    pub app: String,
    pub name: String,
    /// SHA-256 of the whole archive, hex.
    pub sha256: String,
    pub size: u64,
    pub chunk_bytes: u64,
    /// Store keys (in the app's bucket) of the chunks, in order.
    pub chunks: Vec<String>,
    pub memory_bytes: u64,
    pub timeout_ms: u64,
    /// The function's own keep-alive window; `None`: the node's.
    pub keep_alive_s: Option<u64>,
    pub deployed_at_ms: u64,
    /// The node the deploy came through.
    pub deployed_via: String,
}

impl FnRecord {
    /// Refuses a manifest that could not have been written by a deploy.
    fn check(&self, app: &str, name: &str) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("manifest format {} is not known", self.format));
        }
        if self.app != app || self.name != name {
            return Err(format!(
                "manifest names {}/{}, not {app}/{name}",
                self.app, self.name
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err("manifest has no valid SHA-256".into());
        }
        let cb = self.chunk_bytes;
        if cb == 0 || cb > crate::store::MAX_VALUE as u64 {
            return Err(format!("manifest chunk size {cb} is out of range"));
        }
        if self.chunks.len() as u64 != self.size.div_ceil(cb) {
            return Err(format!(
                "manifest lists {} chunks for {} bytes of {cb}",
                self.chunks.len(),
                self.size
            ));
        }
        if self.chunks.iter().any(|k| k.is_empty() || k.len() > 256) {
            return Err("manifest has an invalid chunk key".into());
        }
        if self.timeout_ms == 0 || self.memory_bytes == 0 {
            return Err("manifest has no timeout or memory limit".into());
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn image_ref(&self) -> String {
        format!("{IMAGE_REPO}:{}", self.sha256)
    }
}

/// A failed function operation as the caller is told: HTTP status, a short
/// machine-readable kind, and the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct FnFail {
    pub status: u16,
    pub kind: String,
    pub message: String,
}

impl FnFail {
    pub fn new(status: u16, kind: &str, message: impl Into<String>) -> FnFail {
        FnFail {
            status,
            kind: kind.into(),
            message: message.into(),
        }
    }

    fn not_deployed(app: &str, name: &str) -> FnFail {
        FnFail::new(
            404,
            "not_deployed",
            format!("function {app}/{name} is not deployed"),
        )
    }

    fn bad_request(m: impl Into<String>) -> FnFail {
        FnFail::new(400, "invalid", m)
    }
}

impl From<&FnError> for FnFail {
    fn from(e: &FnError) -> FnFail {
        let kind = match e {
            FnError::NotDeployed(_) => "not_deployed",
            FnError::Unavailable(_) => "unavailable",
            FnError::InvalidSpec(_) => "invalid",
            FnError::ImageInvalid { .. } => "image_invalid",
            FnError::ImageUnavailable { .. } => "image_unavailable",
            FnError::StartFailed { .. } => "start_failed",
            FnError::Timeout { .. } => "timeout",
            FnError::Crashed { .. } => "crashed",
            FnError::BadOutput { .. } => "bad_output",
            FnError::TooLarge { .. } => "too_large",
            FnError::Failed { .. } => "failed",
            FnError::Busy { .. } => "busy",
            FnError::Engine { .. } => "engine",
        };
        FnFail::new(e.http_status(), kind, e.to_string())
    }
}

/// Handlers' `sys.deploy_container` / `sys.delete_container` on the
/// cluster's functions: the handler's key names the function in its app.
/// Weak, because the node owns the apps that hold this.
pub struct HandlerFunctions(pub std::sync::Weak<Node>);

impl super::apps::FunctionControl for HandlerFunctions {
    fn deploy(&self, app: &str, function: &str) -> BoxFuture<Result<(), String>> {
        let (node, app, f) = (self.0.upgrade(), app.to_string(), function.to_string());
        Box::pin(async move {
            let node = node.ok_or("the node is stopping")?;
            node.deploy_function(&app, &f)
                .await
                .map(|_| ())
                .map_err(|e| format!("{} ({})", e.message, e.kind))
        })
    }

    fn undeploy(&self, app: &str, function: &str) -> BoxFuture<Result<(), String>> {
        let (node, app, f) = (self.0.upgrade(), app.to_string(), function.to_string());
        Box::pin(async move {
            let node = node.ok_or("the node is stopping")?;
            node.undeploy_function(&app, &f)
                .await
                .map(|_| ())
                .map_err(|e| format!("{} ({})", e.message, e.kind))
        })
    }
}

fn op_fail(what: &str, e: OpError) -> FnFail {
    match e {
        OpError::Invalid(m) => FnFail::new(400, "invalid", format!("{what}: {m}")),
        OpError::Unavailable(m) => FnFail::new(503, "unavailable", format!("{what}: {m}")),
        OpError::Timeout(m) => FnFail::new(504, "timeout", format!("{what}: {m}")),
        OpError::Full(m) => FnFail::new(507, "full", format!("{what}: {m}")),
        OpError::Internal(m) => FnFail::new(500, "internal", format!("{what}: {m}")),
    }
}

/// A successful invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FnOk {
    /// The function's output, JSON text.
    pub output: String,
    pub cold: bool,
    /// Name of the node whose container ran it.
    pub node: String,
    /// True if the root handed it to a neighbour.
    pub forwarded: bool,
    /// Where its time went, on the node that ran it.
    pub timings: crate::containers::Timings,
}

/// What the root says about a function it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FnPlace {
    pub node: String,
    pub addr: String,
    pub available: Result<(), String>,
    /// An app's handler manages its containers (no keep-alive window).
    pub managed: bool,
    /// Containers on the root: (name, state, idle seconds, invocations).
    pub containers: Vec<(String, String, f64, u64)>,
    /// Neighbours the root forwarded invocations to in the last 10 minutes.
    pub helpers: Vec<String>,
}

/// Requests between nodes about functions: one variant of [`Call`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FnCall {
    /// Run the function (at the root; `forwarded` at a neighbour, which
    /// runs it itself). Answers `Result<FnOk, FnFail>`.
    Invoke {
        app: String,
        name: String,
        input: String,
        forwarded: bool,
    },
    /// The manifest changed or went: drop what is cached and the
    /// containers of the old image. Answers `Result<usize, FnFail>`.
    Changed { app: String, name: String },
    /// Start a container now and keep it until `Undeploy` (handler-managed).
    /// Answers `Result<bool, FnFail>`.
    Deploy { app: String, name: String },
    /// Remove the function's containers; they stay handler-managed.
    /// Answers `Result<usize, FnFail>`.
    Undeploy { app: String, name: String },
    /// Where it runs. Answers `Result<FnPlace, FnFail>`.
    Where { app: String, name: String },
}

impl FnCall {
    fn names(&self) -> (&str, &str) {
        match self {
            FnCall::Invoke { app, name, .. }
            | FnCall::Changed { app, name }
            | FnCall::Deploy { app, name }
            | FnCall::Undeploy { app, name }
            | FnCall::Where { app, name } => (app, name),
        }
    }
}

type FnKey = (String, String);

/// The node's function state: one per node, a field of [`Node`].
pub struct Functions {
    cfg: FunctionsConfig,
    /// `capy.node` on this node's containers: name and first vnode id, so
    /// nodes of several clusters sharing one podman never touch each
    /// other's containers, and a restarted node finds its own.
    label: String,
    tmp: PathBuf,
    host: RwLock<Arc<FunctionHost>>,
    /// Set once the first attempt to reach podman ended.
    ready: smol::lock::OnceCell<()>,
    records: Mutex<HashMap<FnKey, (FnRecord, Instant)>>,
    manifest_keys: Mutex<HashMap<FnKey, String>>,
    managed: Mutex<HashSet<FnKey>>,
    inflight: Mutex<HashMap<FnKey, usize>>,
    helpers: Mutex<HashMap<FnKey, BTreeMap<String, Instant>>>,
    next_helper: AtomicUsize,
    forwarded_out: AtomicU64,
    forwarded_in: AtomicU64,
    deploys: AtomicU64,
}

impl Functions {
    pub fn new(cfg: &FunctionsConfig, data_dir: &Path, name: &str, first_vnode: NodeId) -> Self {
        let label = format!("{name}-{}", first_vnode.short());
        let placeholder = FunctionHost::new(None, HostConfig::default());
        Functions {
            cfg: cfg.clone(),
            tmp: data_dir.join("fn-tmp"),
            host: RwLock::new(Arc::new(placeholder)),
            ready: smol::lock::OnceCell::new(),
            records: Mutex::new(HashMap::new()),
            manifest_keys: Mutex::new(HashMap::new()),
            managed: Mutex::new(HashSet::new()),
            inflight: Mutex::new(HashMap::new()),
            helpers: Mutex::new(HashMap::new()),
            next_helper: AtomicUsize::new(0),
            forwarded_out: AtomicU64::new(0),
            forwarded_in: AtomicU64::new(0),
            deploys: AtomicU64::new(0),
            label,
        }
    }

    fn host_config(&self) -> HostConfig {
        HostConfig {
            node: self.label.clone(),
            keep_alive: Duration::from_secs(self.cfg.keep_alive_s),
            max_per_function: self.cfg.max_per_function,
            max_containers: self.cfg.max_containers,
            max_image_bytes: self.cfg.max_image_bytes,
            ..HostConfig::default()
        }
    }

    /// The host, once the first attempt to reach podman ended.
    pub(crate) async fn host(&self) -> Arc<FunctionHost> {
        self.ready.wait().await;
        self.current()
    }

    fn current(&self) -> Arc<FunctionHost> {
        match self.host.read() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_host(&self, h: FunctionHost) {
        match self.host.write() {
            Ok(mut g) => *g = Arc::new(h),
            Err(p) => *p.into_inner() = Arc::new(h),
        }
    }

    fn managed(&self, k: &FnKey) -> bool {
        lock(&self.managed).contains(k)
    }

    fn set_managed(&self, k: &FnKey, on: bool) {
        {
            let mut m = lock(&self.managed);
            if on {
                if m.len() < CACHE_MAX {
                    m.insert(k.clone());
                }
            } else {
                m.remove(k);
            }
        }
    }

    fn forget(&self, k: &FnKey) {
        {
            let mut r = lock(&self.records);
            r.remove(k);
        }
    }

    fn spec(&self, rec: &FnRecord) -> FnSpec {
        let mut s = FnSpec::new(&rec.app, &rec.name, &rec.image_ref());
        s.memory_bytes = rec.memory_bytes;
        s.timeout = rec.timeout();
        s.keep_alive = if self.managed(&(rec.app.clone(), rec.name.clone())) {
            KeepAlive::Managed
        } else {
            match rec.keep_alive_s {
                Some(secs) => KeepAlive::For(Duration::from_secs(secs)),
                None => KeepAlive::Default,
            }
        };
        s
    }

    fn tmp_file(&self, what: &str) -> PathBuf {
        self.tmp
            .join(format!("{what}-{:016x}.tar", rand::random::<u64>()))
    }
}

/// Counts one running invocation of a function on this node.
struct Inflight<'a> {
    f: &'a Functions,
    key: FnKey,
}

impl<'a> Inflight<'a> {
    fn enter(f: &'a Functions, key: &FnKey) -> (Inflight<'a>, usize) {
        let n = {
            let mut m = lock(&f.inflight);
            let c = m.entry(key.clone()).or_insert(0);
            *c += 1;
            *c
        };
        (
            Inflight {
                f,
                key: key.clone(),
            },
            n,
        )
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        {
            let mut m = lock(&self.f.inflight);
            if let Some(c) = m.get_mut(&self.key) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

// ---- names and keys --------------------------------------------------------

/// App and function names: they become a store bucket, store keys and
/// container names, so they are kept plain.
pub fn check_name(what: &str, s: &str) -> Result<(), FnFail> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(FnFail::bad_request(format!(
            "{what} name {:?} must be 1 to 64 ASCII letters, digits, '-', '_' or '.'",
            s.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// The store bucket of an app's functions: the app's own bucket.
pub fn bucket(app: &str) -> &str {
    app
}

/// The function's ring key: its root runs it.
pub fn fn_ring(app: &str, name: &str) -> NodeId {
    NodeId::for_key(bucket(app), name)
}

/// `base#NONCE` whose ring position in `bucket` is the closest to `target`
/// among [`GRIND_TRIES`] nonces (the first such nonce: every node finds
/// the same key). Costs that many SHA-1s of a short string.
pub fn ground_key(bucket: &str, target: NodeId, base: &str) -> String {
    use sha1::{Digest as _, Sha1};
    let mut pre = Sha1::new();
    pre.update(bucket.as_bytes());
    pre.update(b"\0");
    pre.update(base.as_bytes());
    pre.update(b"#");
    let mut best = (u128::MAX, 0u32);
    let mut buf = [0u8; 8];
    for n in 0..GRIND_TRIES {
        let digits = hex_digits(n, &mut buf);
        let mut h = pre.clone();
        h.update(digits);
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        let dist = target.distance(NodeId(u128::from_be_bytes(b)));
        if dist < best.0 {
            best = (dist, n);
        }
    }
    format!("{base}#{:x}", best.1)
}

/// `n` in lower-case hex without leading zeros, as `format!("{n:x}")`.
fn hex_digits(n: u32, buf: &mut [u8; 8]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    let mut v = n;
    loop {
        i -= 1;
        buf[i] = HEX[(v & 0xf) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

fn chunk_base(name: &str, sha: &str, i: usize) -> String {
    format!("{name}#img:{}:{i}", &sha[..16.min(sha.len())])
}

// ---- the node's side -------------------------------------------------------

impl Node {
    /// Reaches podman (retrying while it does not answer), removes what an
    /// earlier life of this node left, then enforces keep-alive windows.
    /// Spawned once at start.
    pub async fn functions_loop(self: Arc<Self>) {
        let f = &self.functions;
        if let Ok(entries) = std::fs::read_dir(&f.tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut last_try: Option<Instant> = None;
        let mut timer = smol::Timer::interval(Duration::from_secs(1));
        loop {
            if f.current().available().is_err()
                && last_try.is_none_or(|t| t.elapsed() >= RECONNECT_EVERY)
            {
                last_try = Some(Instant::now());
                let h = FunctionHost::connect(&f.cfg.podman_socket, f.host_config()).await;
                if h.available().is_ok() {
                    match h.cleanup_leftovers().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            "functions: removed {n} containers left by an earlier run of this node"
                        ),
                        Err(e) => tracing::warn!("functions: removing leftovers: {e}"),
                    }
                }
                f.set_host(h);
                let _ = f.ready.set(()).await;
            }
            let host = f.current();
            let n = host.tick(host.now()).await;
            if n > 0 {
                tracing::debug!("functions: {n} idle containers expired");
            }
            futures_lite::StreamExt::next(&mut timer).await;
        }
    }

    /// Graceful stop: remove this node's containers.
    pub async fn functions_shutdown(&self) {
        let host = self.functions.current();
        let mut fns: Vec<String> = host.status().into_iter().map(|c| c.function).collect();
        fns.dedup();
        for f in fns {
            if let Some((app, name)) = f.split_once('/') {
                host.undeploy(app, name).await;
            }
        }
    }

    async fn manifest_key(&self, app: &str, name: &str) -> String {
        let k = (app.to_string(), name.to_string());
        let cached = lock(&self.functions.manifest_keys).get(&k).cloned();
        if let Some(m) = cached {
            return m;
        }
        let (a, n) = k.clone();
        let key =
            smol::unblock(move || ground_key(bucket(&a), fn_ring(&a, &n), &format!("{n}#fn")))
                .await;
        {
            let mut m = lock(&self.functions.manifest_keys);
            if m.len() >= CACHE_MAX {
                m.clear();
            }
            m.insert(k, key.clone());
        }
        key
    }

    /// The function's manifest: cached for [`RECORD_TTL`] (and served up
    /// to [`RECORD_STALE`] while it is read again), else read from the
    /// store. `None`: not deployed.
    pub async fn fn_record(
        self: &Arc<Self>,
        app: &str,
        name: &str,
    ) -> Result<Option<FnRecord>, FnFail> {
        let k = (app.to_string(), name.to_string());
        let cached = lock(&self.functions.records).get(&k).cloned();
        if let Some((r, at)) = cached {
            let age = at.elapsed();
            if age < RECORD_TTL {
                return Ok(Some(r));
            }
            if age < RECORD_STALE {
                // Serve it and read it again in the background, so a warm
                // invocation never waits for the store; marked fresh now
                // so one reader refreshes it.
                {
                    let mut m = lock(&self.functions.records);
                    m.insert(k.clone(), (r.clone(), Instant::now()));
                }
                let (node, app, name) = (self.clone(), app.to_string(), name.to_string());
                smol::spawn(async move {
                    if let Err(e) = node.read_record(&app, &name).await {
                        tracing::debug!("{app}/{name}: refreshing the manifest: {e}");
                    }
                })
                .detach();
                return Ok(Some(r));
            }
        }
        self.read_record(app, name).await
    }

    /// Reads the manifest from the store into the cache.
    async fn read_record(
        self: &Arc<Self>,
        app: &str,
        name: &str,
    ) -> Result<Option<FnRecord>, FnFail> {
        let k = (app.to_string(), name.to_string());
        let key = self.manifest_key(app, name).await;
        let v = self
            .get(bucket(app), &key)
            .await
            .map_err(|e| op_fail("reading the function's manifest from the store", e))?;
        let Some(v) = v else {
            self.functions.forget(&k);
            return Ok(None);
        };
        if v.value.len() > MAX_MANIFEST {
            return Err(FnFail::new(
                500,
                "internal",
                format!("the manifest of {app}/{name} is too large"),
            ));
        }
        let rec: FnRecord = serde_json::from_slice(&v.value)
            .map_err(|e| e.to_string())
            .and_then(|r: FnRecord| r.check(app, name).map(|_| r))
            .map_err(|e| {
                FnFail::new(
                    500,
                    "internal",
                    format!("the stored manifest of {app}/{name} is unusable: {e}"),
                )
            })?;
        {
            let mut m = lock(&self.functions.records);
            if m.len() >= CACHE_MAX {
                m.clear();
            }
            m.insert(k, (rec.clone(), Instant::now()));
        }
        Ok(Some(rec))
    }

    /// Runs a function on its root (any node may call it): the HTTP API's
    /// and the CLI's invoke. `input` is JSON text.
    pub async fn invoke_function(
        self: &Arc<Self>,
        app: &str,
        name: &str,
        input: String,
    ) -> Result<FnOk, FnFail> {
        check_name("app", app)?;
        check_name("function", name)?;
        if input.len() > MAX_INPUT {
            return Err(FnFail::new(
                413,
                "too_large",
                format!("the input is larger than {MAX_INPUT} bytes"),
            ));
        }
        let rec = self
            .fn_record(app, name)
            .await?
            .ok_or_else(|| FnFail::not_deployed(app, name))?;
        let call = FnCall::Invoke {
            app: app.into(),
            name: name.into(),
            input,
            forwarded: false,
        };
        self.fn_call_root(app, name, call, rec.timeout() + CALL_SLACK)
            .await
    }

    /// `sys.deploy_container`: start a container of the function on its
    /// root now and keep it (no keep-alive window) until
    /// [`Node::undeploy_function`]. Answers whether one was started (false:
    /// one was there already).
    pub async fn deploy_function(self: &Arc<Self>, app: &str, name: &str) -> Result<bool, FnFail> {
        check_name("app", app)?;
        check_name("function", name)?;
        let call = FnCall::Deploy {
            app: app.into(),
            name: name.into(),
        };
        self.fn_call_root(app, name, call, CALL_SLACK).await
    }

    /// `sys.delete_container`: remove the function's containers on its
    /// root; later invocations start one that is again kept until the
    /// handler says. Answers how many were removed.
    pub async fn undeploy_function(
        self: &Arc<Self>,
        app: &str,
        name: &str,
    ) -> Result<usize, FnFail> {
        check_name("app", app)?;
        check_name("function", name)?;
        let call = FnCall::Undeploy {
            app: app.into(),
            name: name.into(),
        };
        self.fn_call_root(app, name, call, Duration::from_secs(30))
            .await
    }

    async fn fn_call_root<T: serde::de::DeserializeOwned>(
        self: &Arc<Self>,
        app: &str,
        name: &str,
        call: FnCall,
        timeout: Duration,
    ) -> Result<T, FnFail> {
        let bytes = self
            .call_root(fn_ring(app, name), Call::Fn(call), timeout)
            .await
            .map_err(|e| match e {
                // Names were checked: a refusal to route is this node's
                // state (not joined yet), not the caller's fault.
                OpError::Invalid(m) => OpError::Unavailable(m),
                e => e,
            })
            .map_err(|e| op_fail("the function's root", e))?;
        decode(&bytes)
    }

    /// Runs a [`FnCall`] that reached this node.
    pub(crate) async fn serve_fn(self: &Arc<Self>, call: FnCall) -> Result<Vec<u8>, String> {
        let (app, name) = call.names();
        let names = check_name("app", app).and_then(|_| check_name("function", name));
        let k = (app.to_string(), name.to_string());
        match call {
            FnCall::Invoke {
                app,
                name,
                input,
                forwarded,
            } => {
                let r = match names {
                    Ok(()) => self.serve_invoke(&app, &name, input, forwarded).await,
                    Err(e) => Err(e),
                };
                encode(&r)
            }
            FnCall::Changed { app, name } => {
                self.functions.forget(&k);
                let r = match names {
                    Ok(()) => {
                        if let Ok(None) = self.read_record(&app, &name).await {
                            self.functions.set_managed(&k, false);
                        }
                        Ok(self.functions.current().undeploy(&app, &name).await)
                    }
                    Err(e) => Err(e),
                };
                encode(&r)
            }
            FnCall::Deploy { app, name } => {
                let r = match names {
                    Ok(()) => self.serve_deploy(&app, &name).await,
                    Err(e) => Err(e),
                };
                encode(&r)
            }
            FnCall::Undeploy { app, name } => {
                let r: Result<usize, FnFail> = match names {
                    Ok(()) => {
                        self.functions.set_managed(&k, true);
                        Ok(self.functions.current().undeploy(&app, &name).await)
                    }
                    Err(e) => Err(e),
                };
                encode(&r)
            }
            FnCall::Where { app, name } => {
                let r = names.map(|_| self.fn_place(&app, &name));
                encode(&r)
            }
        }
    }

    fn fn_place(&self, app: &str, name: &str) -> FnPlace {
        let f = &self.functions;
        let k = (app.to_string(), name.to_string());
        let id = format!("{app}/{name}");
        let host = f.current();
        let containers = host
            .status()
            .into_iter()
            .filter(|c| c.function == id)
            .map(|c| (c.name, c.state.to_string(), c.idle_s, c.invocations))
            .collect();
        let helpers = lock(&f.helpers)
            .get(&k)
            .map(|m| {
                m.iter()
                    .filter(|(_, t)| t.elapsed() < Duration::from_secs(600))
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        FnPlace {
            node: self.name.clone(),
            addr: self.quic.to_string(),
            available: host.available(),
            managed: f.managed(&k),
            containers,
            helpers,
        }
    }

    async fn serve_deploy(self: &Arc<Self>, app: &str, name: &str) -> Result<bool, FnFail> {
        let rec = self
            .fn_record(app, name)
            .await?
            .ok_or_else(|| FnFail::not_deployed(app, name))?;
        let f = &self.functions;
        f.set_managed(&(app.to_string(), name.to_string()), true);
        let host = f.host().await;
        let spec = f.spec(&rec);
        let tmp = f.tmp_file("load");
        let loader = {
            let (node, rec, tmp) = (self.clone(), rec.clone(), tmp.clone());
            move || async move { node.fetch_image(&rec, &tmp).await }
        };
        let r = host.deploy(&spec, loader).await;
        let _ = smol::fs::remove_file(&tmp).await;
        r.map_err(|e| FnFail::from(&e))
    }

    async fn serve_invoke(
        self: &Arc<Self>,
        app: &str,
        name: &str,
        input: String,
        forwarded: bool,
    ) -> Result<FnOk, FnFail> {
        let f = &self.functions;
        if forwarded {
            f.forwarded_in.fetch_add(1, Ordering::Relaxed);
        }
        if input.len() > MAX_INPUT {
            return Err(FnFail::new(
                413,
                "too_large",
                format!("the input is larger than {MAX_INPUT} bytes"),
            ));
        }
        let value: serde_json::Value = serde_json::from_str(&input)
            .map_err(|e| FnFail::bad_request(format!("the input is not JSON: {e}")))?;
        let rec = self
            .fn_record(app, name)
            .await?
            .ok_or_else(|| FnFail::not_deployed(app, name))?;
        let key = (app.to_string(), name.to_string());
        let host = f.host().await;
        let (guard, running) = Inflight::enter(f, &key);
        if !forwarded {
            let unavailable = host.available().err();
            // `running` counts this invocation too.
            let saturated = running > f.cfg.max_per_function;
            if unavailable.is_some() || saturated {
                drop(guard);
                if let Some(r) = self.forward(&rec, &input).await {
                    return r;
                }
                if let Some(why) = unavailable {
                    return Err(FnFail::from(&FnError::Unavailable(format!(
                        "{why}; and no neighbour of the function's replica set could run it"
                    ))));
                }
                // No neighbour took it: wait here for a container.
                let _guard = Inflight::enter(f, &key);
                return self.run_local(&host, &rec, value, false).await;
            }
        }
        let r = self.run_local(&host, &rec, value, forwarded).await;
        drop(guard);
        r
    }

    async fn run_local(
        self: &Arc<Self>,
        host: &FunctionHost,
        rec: &FnRecord,
        input: serde_json::Value,
        forwarded: bool,
    ) -> Result<FnOk, FnFail> {
        let f = &self.functions;
        let spec = f.spec(rec);
        let tmp = f.tmp_file("load");
        let loader = {
            let (node, rec, tmp) = (self.clone(), rec.clone(), tmp.clone());
            move || async move { node.fetch_image(&rec, &tmp).await }
        };
        let r = host.invoke(&spec, input, loader).await;
        let _ = smol::fs::remove_file(&tmp).await;
        if let Ok(inv) = &r {
            let kind = if inv.cold { "cold" } else { "warm" };
            self.metrics.container_starts.inc(kind);
        }
        match r {
            Ok(inv) => Ok(FnOk {
                output: inv.output.to_string(),
                cold: inv.cold,
                node: self.name.clone(),
                forwarded,
                timings: inv.timings,
            }),
            Err(e) => Err(FnFail::from(&e)),
        }
    }

    /// Hands an invocation to a neighbour of the function's replica set
    /// (they hold the image's chunks). `None`: none could take it.
    async fn forward(
        self: &Arc<Self>,
        rec: &FnRecord,
        input: &str,
    ) -> Option<Result<FnOk, FnFail>> {
        let ring = fn_ring(&rec.app, &rec.name);
        let k = self.cfg.replicas.max(2);
        let peers: Vec<NodeHandle> = {
            let cores = self.lock();
            cores.placement(ring, k)
        }
        .into_iter()
        .filter(|h| h.addr != self.quic)
        .collect();
        if peers.is_empty() {
            return None;
        }
        let f = &self.functions;
        let start = f.next_helper.fetch_add(1, Ordering::Relaxed);
        for i in 0..peers.len() {
            let to = peers[(start + i) % peers.len()];
            let call = Call::Fn(FnCall::Invoke {
                app: rec.app.clone(),
                name: rec.name.clone(),
                input: input.to_string(),
                forwarded: true,
            });
            f.forwarded_out.fetch_add(1, Ordering::Relaxed);
            let r = match self.call_node(to, call, rec.timeout() + CALL_SLACK).await {
                Ok(bytes) => decode::<FnOk>(&bytes),
                // The neighbour may have run it: do not run it twice.
                Err(e) => return Some(Err(op_fail("the neighbour it was forwarded to", e))),
            };
            match r {
                Err(e) if e.kind == "unavailable" || e.kind == "busy" => {
                    tracing::debug!(to = %to.addr, "forwarded invocation refused: {e}");
                    continue;
                }
                Ok(ok) => {
                    {
                        let mut h = lock(&f.helpers);
                        let m = h.entry((rec.app.clone(), rec.name.clone())).or_default();
                        if m.len() < 64 || m.contains_key(&ok.node) {
                            m.insert(ok.node.clone(), Instant::now());
                        }
                    }
                    return Some(Ok(ok));
                }
                other => return Some(other),
            }
        }
        None
    }

    /// Reads the image's chunks from the store into `tmp`, checking sizes
    /// and the SHA-256: what the host loads into podman when it lacks it.
    async fn fetch_image(
        self: &Arc<Self>,
        rec: &FnRecord,
        tmp: &Path,
    ) -> Result<ImageSource, FnError> {
        use futures_lite::AsyncWriteExt;
        let function = format!("{}/{}", rec.app, rec.name);
        let unavailable = |reason: String| FnError::ImageUnavailable {
            function: function.clone(),
            reason,
        };
        if let Some(dir) = tmp.parent() {
            smol::fs::create_dir_all(dir)
                .await
                .map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        }
        let mut file = smol::fs::File::create(tmp)
            .await
            .map_err(|e| unavailable(format!("{}: {e}", tmp.display())))?;
        let mut hasher = Sha256::new();
        let n = rec.chunks.len();
        for (i, key) in rec.chunks.iter().enumerate() {
            let v = self
                .get(bucket(&rec.app), key)
                .await
                .map_err(|e| unavailable(format!("reading chunk {} of {n}: {e}", i + 1)))?
                .ok_or_else(|| {
                    unavailable(format!("chunk {} of {n} is missing from the store", i + 1))
                })?;
            let want = if i + 1 < n {
                rec.chunk_bytes
            } else {
                rec.size - rec.chunk_bytes * (n as u64 - 1)
            };
            if v.value.len() as u64 != want {
                return Err(unavailable(format!(
                    "chunk {} of {n} holds {} bytes, not {want}",
                    i + 1,
                    v.value.len()
                )));
            }
            let data = Arc::new(v.value);
            let d = data.clone();
            hasher = smol::unblock(move || {
                hasher.update(&d[..]);
                hasher
            })
            .await;
            file.write_all(&data)
                .await
                .map_err(|e| unavailable(format!("{}: {e}", tmp.display())))?;
        }
        file.flush()
            .await
            .map_err(|e| unavailable(format!("{}: {e}", tmp.display())))?;
        let got = hex::encode(hasher.finalize());
        if got != rec.sha256 {
            return Err(unavailable(format!(
                "the chunks in the store hash to {got}, not the deployed {} (corrupt store copy)",
                rec.sha256
            )));
        }
        Ok(ImageSource::File(tmp.to_path_buf()))
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    postcard::to_allocvec(v).map_err(|e| format!("encoding an answer: {e}"))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, FnFail> {
    postcard::from_bytes::<Result<T, FnFail>>(bytes).map_err(|e| {
        FnFail::new(
            502,
            "internal",
            format!("undecodable answer from a node: {e}"),
        )
    })?
}

// ---- deploying ---------------------------------------------------------------

/// Deploy settings, from the query string of `PUT /api/fn/{app}/{fn}`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployOpts {
    pub memory_bytes: u64,
    pub timeout: Duration,
    pub keep_alive_s: Option<u64>,
}

impl Default for DeployOpts {
    fn default() -> Self {
        DeployOpts {
            memory_bytes: FnSpec::DEFAULT_MEMORY,
            timeout: FnSpec::DEFAULT_TIMEOUT,
            keep_alive_s: None,
        }
    }
}

/// Largest per-invocation timeout a deploy may ask for (the host's bound).
pub fn max_timeout() -> Duration {
    HostConfig::default().max_timeout
}

/// `128m`, `1g`, `64MiB`, `6291456`: bytes (a bare number is bytes, as
/// podman's `--memory`).
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("memory {s:?}: expected a number with an optional unit (k, m, g)"))?;
    let mul: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("memory {s:?}: unknown unit {u:?} (use k, m or g)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("memory {s:?} is too large"))
}

/// `30`, `30s`, `1.5`: a duration in seconds.
pub fn parse_seconds(what: &str, s: &str) -> Result<Duration, String> {
    let t = s.trim().trim_end_matches('s');
    let v: f64 = t
        .parse()
        .map_err(|_| format!("{what} {s:?}: expected seconds, e.g. 30"))?;
    if !v.is_finite() || v <= 0.0 || v > 1e9 {
        return Err(format!(
            "{what} {s:?}: must be a positive number of seconds"
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

impl DeployOpts {
    pub fn validate(&self) -> Result<(), String> {
        if self.memory_bytes < 6 << 20 || self.memory_bytes > 64 << 30 {
            return Err(format!(
                "memory limit {} bytes: must be between 6 MiB (podman's minimum) and 64 GiB",
                self.memory_bytes
            ));
        }
        if self.timeout < Duration::from_millis(1) || self.timeout > max_timeout() {
            return Err(format!(
                "timeout {:?}: must be above zero and at most {:?}",
                self.timeout,
                max_timeout()
            ));
        }
        if let Some(k) = self.keep_alive_s {
            if k == 0 || k > 7 * 24 * 3600 {
                return Err(format!(
                    "keep-alive {k} s: must be between 1 and 604800 seconds"
                ));
            }
        }
        Ok(())
    }

    fn from_query(q: &str) -> Result<DeployOpts, String> {
        let mut o = DeployOpts::default();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = http::percent_decode(v)?;
            match k {
                "memory" => o.memory_bytes = parse_memory(&v)?,
                "timeout" => o.timeout = parse_seconds("timeout", &v)?,
                "keep_alive" => {
                    o.keep_alive_s = Some(parse_seconds("keep-alive", &v)?.as_secs().max(1))
                }
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        o.validate()?;
        Ok(o)
    }
}

/// Checks a tar stream's structure as it arrives: header checksums, entry
/// sizes, and whether it holds `manifest.json` (docker-archive, what
/// `podman save` writes) or `index.json` (OCI archive).
#[derive(Default)]
pub struct TarCheck {
    pos: u64,
    next: u64,
    head: Vec<u8>,
    zeros: u8,
    ended: bool,
    entries: u64,
    found: Option<&'static str>,
    error: Option<String>,
}

impl TarCheck {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.ended && self.error.is_none() {
            if self.pos < self.next {
                let skip = (self.next - self.pos).min(data.len() as u64) as usize;
                self.pos += skip as u64;
                data = &data[skip..];
                continue;
            }
            let take = (512 - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
            self.pos += take as u64;
            data = &data[take..];
            if self.head.len() == 512 {
                let h = std::mem::take(&mut self.head);
                self.header(&h);
            }
        }
    }

    fn header(&mut self, h: &[u8]) {
        self.next = self.pos;
        if h.iter().all(|&b| b == 0) {
            self.zeros += 1;
            if self.zeros >= 2 {
                self.ended = true;
            }
            return;
        }
        if self.zeros > 0 {
            self.error = Some(format!(
                "a lone zero block at offset {} inside the archive",
                self.pos - 1024
            ));
            return;
        }
        let at = self.pos - 512;
        let stored = parse_octal(&h[148..156]);
        let computed: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as u64
                }
            })
            .sum();
        if stored != Some(computed) {
            self.error = Some(format!("the tar header at offset {at} has a bad checksum"));
            return;
        }
        let Some(size) = parse_size(&h[124..136]) else {
            self.error = Some(format!("the tar header at offset {at} has a bad size"));
            return;
        };
        let typeflag = h[156];
        let size = match typeflag {
            b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => 0,
            _ => size,
        };
        let field = |r: std::ops::Range<usize>| {
            let f = &h[r];
            let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
            String::from_utf8_lossy(&f[..end]).to_string()
        };
        let mut name = field(0..100);
        if &h[257..262] == b"ustar" {
            let prefix = field(345..500);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let name = name.trim_start_matches("./");
        if matches!(typeflag, b'0' | 0 | b'7') {
            match name {
                "manifest.json" => self.found = Some("docker-archive"),
                "index.json" => self.found = self.found.or(Some("oci-archive")),
                _ => {}
            }
        }
        self.entries += 1;
        self.next = self.pos + size.div_ceil(512) * 512;
    }

    /// The archive's format once all of it was fed, or why it is not an
    /// image archive.
    pub fn finish(&self) -> Result<&'static str, String> {
        if let Some(e) = &self.error {
            return Err(format!("it is not a valid tar archive: {e}"));
        }
        if !self.ended && (self.pos < self.next || !self.head.is_empty()) {
            return Err(format!(
                "the tar archive is truncated (it ends inside an entry at {} bytes)",
                self.pos
            ));
        }
        if self.entries == 0 {
            return Err("the tar archive holds no files".into());
        }
        self.found.ok_or_else(|| {
            "it is a tar archive but holds no manifest.json or index.json, so not a container \
             image (make one with `podman save`)"
                .to_string()
        })
    }
}

fn parse_octal(f: &[u8]) -> Option<u64> {
    let s: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v: u64 = 0;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add((b - b'0') as u64)?;
    }
    Some(v)
}

/// A tar size field: octal, or GNU base-256 when the high bit is set.
fn parse_size(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        let mut v: u64 = (f[0] & 0x7f) as u64;
        for &b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    parse_octal(f)
}

/// An archive received into a temporary file, checked.
struct Received {
    size: u64,
    sha256: String,
    format: &'static str,
}

/// Streams the request body to `path`, hashing it and checking that it is
/// an image archive, within `max` bytes.
async fn receive_archive(
    req: Request<Incoming>,
    path: &Path,
    max: u64,
) -> Result<Received, FnFail> {
    use futures_lite::AsyncWriteExt;
    use http_body_util::BodyExt;
    if let Some(len) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max {
            return Err(too_large_image(len, max));
        }
    }
    let io = |e: std::io::Error| FnFail::new(500, "internal", format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        smol::fs::create_dir_all(dir).await.map_err(io)?;
    }
    let mut file = smol::fs::File::create(path).await.map_err(io)?;
    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut head: Vec<u8> = Vec::with_capacity(512);
    let mut tar = TarCheck::default();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| FnFail::bad_request(format!("reading the image archive: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len() as u64;
        if size > max {
            return Err(too_large_image(size, max));
        }
        if head.len() < 512 {
            let take = (512 - head.len()).min(data.len());
            head.extend_from_slice(&data[..take]);
        }
        hasher.update(&data);
        tar.feed(&data);
        file.write_all(&data).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    let invalid = |reason: String| {
        FnFail::new(
            422,
            "image_invalid",
            format!("the image is not a container image archive (podman save / docker save format): {reason}"),
        )
    };
    crate::containers::check_archive_magic(&head).map_err(invalid)?;
    let format = if head.len() >= 262 && &head[257..262] == b"ustar" {
        tar.finish().map_err(invalid)?
    } else {
        // Compressed: podman judges the inside when it loads it.
        "compressed"
    };
    Ok(Received {
        size,
        sha256: hex::encode(hasher.finalize()),
        format,
    })
}

fn too_large_image(len: u64, max: u64) -> FnFail {
    FnFail::new(
        413,
        "too_large",
        format!("the image archive is {len} bytes or more; this node accepts at most {max}"),
    )
}

impl Node {
    /// Stores a checked archive file as chunks, then the manifest; tells
    /// the root; removes the chunks of the image it replaces.
    pub(crate) async fn deploy_archive(
        self: &Arc<Self>,
        app: &str,
        name: &str,
        file: &Path,
        got: (u64, String),
        opts: &DeployOpts,
    ) -> Result<(FnRecord, u64), FnFail> {
        use futures_lite::AsyncReadExt;
        let (size, sha) = got;
        let f = &self.functions;
        let previous = self.fn_record_fresh(app, name).await?;
        let cb = f.cfg.chunk_bytes as u64;
        let n = size.div_ceil(cb) as usize;
        let io =
            |e: std::io::Error| FnFail::new(500, "internal", format!("{}: {e}", file.display()));
        let mut src = smol::fs::File::open(file).await.map_err(io)?;
        let ring = fn_ring(app, name);
        let mut keys: Vec<String> = Vec::with_capacity(n);
        for i in 0..n {
            let len = if i + 1 < n {
                cb
            } else {
                size - cb * (n as u64 - 1)
            };
            let mut buf = vec![0u8; len as usize];
            src.read_exact(&mut buf).await.map_err(io)?;
            let base = chunk_base(name, &sha, i);
            let b = bucket(app).to_string();
            let key = smol::unblock(move || ground_key(&b, ring, &base)).await;
            if let Err(e) = self.put(bucket(app), &key, Some(buf)).await {
                self.delete_keys(app, keys);
                return Err(op_fail(
                    &format!("storing chunk {} of {n} of the image", i + 1),
                    e,
                ));
            }
            keys.push(key);
        }
        let rec = FnRecord {
            format: FORMAT,
            app: app.into(),
            name: name.into(),
            sha256: sha,
            size,
            chunk_bytes: cb,
            chunks: keys,
            memory_bytes: opts.memory_bytes,
            timeout_ms: opts.timeout.as_millis().max(1) as u64,
            keep_alive_s: opts.keep_alive_s,
            deployed_at_ms: wall_ms(),
            deployed_via: self.name.clone(),
        };
        let body = serde_json::to_vec(&rec)
            .map_err(|e| FnFail::new(500, "internal", format!("encoding the manifest: {e}")))?;
        let mkey = self.manifest_key(app, name).await;
        let version = match self.put(bucket(app), &mkey, Some(body)).await {
            Ok(v) => v,
            Err(e) => {
                self.delete_keys(app, rec.chunks.clone());
                return Err(op_fail("storing the function's manifest", e));
            }
        };
        f.deploys.fetch_add(1, Ordering::Relaxed);
        self.functions.forget(&(app.to_string(), name.to_string()));
        self.tell_root(app, name).await;
        if let Some(old) = previous {
            let keep: HashSet<&String> = rec.chunks.iter().collect();
            let gone: Vec<String> = old
                .chunks
                .iter()
                .filter(|k| !keep.contains(k))
                .cloned()
                .collect();
            self.delete_keys(app, gone);
        }
        Ok((rec, version))
    }

    /// Removes a function: its manifest first (from then on it is not
    /// deployed), then its containers on the root, then its chunks.
    pub async fn remove_function(self: &Arc<Self>, app: &str, name: &str) -> Result<(), FnFail> {
        check_name("app", app)?;
        check_name("function", name)?;
        let rec = self
            .fn_record_fresh(app, name)
            .await?
            .ok_or_else(|| FnFail::not_deployed(app, name))?;
        let mkey = self.manifest_key(app, name).await;
        self.put(bucket(app), &mkey, None)
            .await
            .map_err(|e| op_fail("removing the function's manifest", e))?;
        self.functions.forget(&(app.to_string(), name.to_string()));
        self.tell_root(app, name).await;
        self.delete_keys(app, rec.chunks);
        Ok(())
    }

    async fn fn_record_fresh(
        self: &Arc<Self>,
        app: &str,
        name: &str,
    ) -> Result<Option<FnRecord>, FnFail> {
        self.read_record(app, name).await
    }

    async fn tell_root(self: &Arc<Self>, app: &str, name: &str) {
        let call = FnCall::Changed {
            app: app.into(),
            name: name.into(),
        };
        if let Err(e) = self
            .fn_call_root::<usize>(app, name, call, Duration::from_secs(30))
            .await
        {
            tracing::warn!(
                "{app}/{name}: could not tell the root about the change ({e}); it notices within {RECORD_TTL:?}"
            );
        }
    }

    /// Deletes store keys in the background (chunks nobody names any more).
    fn delete_keys(self: &Arc<Self>, app: &str, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let (node, app) = (self.clone(), app.to_string());
        smol::spawn(async move {
            for k in keys {
                if let Err(e) = node.put(bucket(&app), &k, None).await {
                    tracing::warn!("{app}: deleting the unused image chunk {k}: {e}");
                }
            }
        })
        .detach();
    }
}

// ---- HTTP ------------------------------------------------------------------

fn fail_resp(e: &FnFail) -> Resp {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    http::json(status, &json!({ "error": e.message, "kind": e.kind }))
}

/// Everything under `/api/fn/`.
pub async fn http_route(node: Arc<Node>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let rest = path.strip_prefix("/api/fn/").unwrap_or("");
    let parts: Vec<&str> = rest.split('/').collect();
    let (app, name, sub) = match parts.as_slice() {
        [a, f] => (*a, *f, false),
        [a, f, "containers"] => (*a, *f, true),
        _ => {
            return http::error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {path} (functions are at /api/fn/APP/FN)"),
            )
        }
    };
    let decoded = http::percent_decode(app)
        .and_then(|a| http::percent_decode(name).map(|n| (a, n)))
        .map_err(FnFail::bad_request)
        .and_then(|(a, n)| {
            check_name("app", &a)?;
            check_name("function", &n)?;
            Ok((a, n))
        });
    let (app, name) = match decoded {
        Ok(x) => x,
        Err(e) => return fail_resp(&e),
    };
    match (method.clone(), sub) {
        (Method::PUT, false) => deploy_http(node, &app, &name, req).await,
        (Method::POST, false) => invoke_http(node, &app, &name, req).await,
        (Method::GET, false) => info_http(node, &app, &name).await,
        (Method::DELETE, false) => match node.remove_function(&app, &name).await {
            Ok(()) => http::json(
                StatusCode::OK,
                &json!({ "app": app, "function": name, "removed": true }),
            ),
            Err(e) => fail_resp(&e),
        },
        (Method::POST | Method::PUT, true) => match node.deploy_function(&app, &name).await {
            Ok(started) => http::json(
                StatusCode::OK,
                &json!({ "app": app, "function": name, "started": started, "managed": true }),
            ),
            Err(e) => fail_resp(&e),
        },
        (Method::DELETE, true) => match node.undeploy_function(&app, &name).await {
            Ok(n) => http::json(
                StatusCode::OK,
                &json!({ "app": app, "function": name, "removed": n, "managed": true }),
            ),
            Err(e) => fail_resp(&e),
        },
        (m, _) => http::error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{m} is not allowed on {path}"),
        ),
    }
}

async fn deploy_http(node: Arc<Node>, app: &str, name: &str, req: Request<Incoming>) -> Resp {
    let opts = match DeployOpts::from_query(req.uri().query().unwrap_or("")) {
        Ok(o) => o,
        Err(e) => return fail_resp(&FnFail::bad_request(e)),
    };
    let tmp = node.functions.tmp_file("deploy");
    let max = node.functions.cfg.max_image_bytes;
    let r = async {
        let got = receive_archive(req, &tmp, max).await?;
        tracing::info!(
            "{app}/{name}: deploying a {} of {} bytes (sha256 {})",
            got.format,
            got.size,
            &got.sha256[..12]
        );
        let (rec, version) = node
            .deploy_archive(app, name, &tmp, (got.size, got.sha256), &opts)
            .await?;
        Ok::<_, FnFail>((rec, version, got.format))
    }
    .await;
    let _ = smol::fs::remove_file(&tmp).await;
    match r {
        Ok((rec, version, format)) => http::json(
            StatusCode::OK,
            &json!({
                "app": app,
                "function": name,
                "version": version,
                "format": format,
                "sha256": rec.sha256,
                "size": rec.size,
                "chunks": rec.chunks.len(),
                "memory_bytes": rec.memory_bytes,
                "timeout_ms": rec.timeout_ms,
                "keep_alive_s": rec.keep_alive_s,
                "ring_id": fn_ring(app, name).to_string(),
            }),
        ),
        Err(e) => fail_resp(&e),
    }
}

async fn invoke_http(node: Arc<Node>, app: &str, name: &str, req: Request<Incoming>) -> Resp {
    let verbose = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "verbose" || p == "verbose=1"));
    let body = match http::read_body(req, MAX_INPUT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let input = if body.iter().all(|b| b.is_ascii_whitespace()) {
        "null".to_string()
    } else {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) => v.to_string(),
            Err(e) => {
                return fail_resp(&FnFail::bad_request(format!("the input is not JSON: {e}")))
            }
        }
    };
    match node.invoke_function(app, name, input).await {
        Ok(ok) if verbose => {
            let output: serde_json::Value =
                serde_json::from_str(&ok.output).unwrap_or(serde_json::Value::Null);
            http::json(
                StatusCode::OK,
                &json!({
                    "output": output,
                    "cold": ok.cold,
                    "node": ok.node,
                    "forwarded": ok.forwarded,
                    "timings": ok.timings,
                }),
            )
        }
        Ok(ok) => {
            let mut r = http::full(StatusCode::OK, "application/json", ok.output);
            let h = r.headers_mut();
            if let Ok(v) = hyper::header::HeaderValue::from_str(&ok.node) {
                h.insert("x-capy-node", v);
            }
            h.insert(
                "x-capy-cold",
                hyper::header::HeaderValue::from_static(if ok.cold { "1" } else { "0" }),
            );
            r
        }
        Err(e) => fail_resp(&e),
    }
}

async fn info_http(node: Arc<Node>, app: &str, name: &str) -> Resp {
    let rec = match node.fn_record(app, name).await {
        Ok(Some(r)) => r,
        Ok(None) => return fail_resp(&FnFail::not_deployed(app, name)),
        Err(e) => return fail_resp(&e),
    };
    let call = FnCall::Where {
        app: app.into(),
        name: name.into(),
    };
    let place = node
        .fn_call_root::<FnPlace>(app, name, call, Duration::from_secs(10))
        .await;
    let root = match place {
        Ok(p) => json!({
            "node": p.node,
            "addr": p.addr,
            "functions_available": p.available.is_ok(),
            "unavailable_reason": p.available.err(),
            "managed": p.managed,
            "containers": p.containers.iter().map(|(n, s, idle, inv)| json!({
                "name": n, "state": s, "idle_s": idle, "invocations": inv,
            })).collect::<Vec<_>>(),
            "helpers": p.helpers,
        }),
        Err(e) => json!({ "error": e.message }),
    };
    http::json(
        StatusCode::OK,
        &json!({
            "app": app,
            "function": name,
            "ring_id": fn_ring(app, name).to_string(),
            "image": {
                "ref": rec.image_ref(),
                "sha256": rec.sha256,
                "size": rec.size,
                "chunks": rec.chunks.len(),
                "chunk_bytes": rec.chunk_bytes,
            },
            "memory_bytes": rec.memory_bytes,
            "timeout_ms": rec.timeout_ms,
            "keep_alive_s": rec.keep_alive_s,
            "deployed_at_ms": rec.deployed_at_ms,
            "deployed_via": rec.deployed_via,
            "root": root,
        }),
    )
}

// ---- status and metrics ------------------------------------------------------

/// `"containers"` of `/api/status`: this node's containers.
pub fn containers_json(node: &Node) -> serde_json::Value {
    let list: Vec<ContainerStatus> = node.functions.current().status();
    serde_json::to_value(list).unwrap_or_default()
}

/// `"functions"` of `/api/status`: availability and per-app counters.
pub fn status_json(node: &Node) -> serde_json::Value {
    let f = &node.functions;
    let host = f.current();
    let stats: BTreeMap<String, AppStats> = host.stats();
    json!({
        "available": host.available().is_ok(),
        "unavailable_reason": host.available().err(),
        "podman_socket": f.cfg.podman_socket.display().to_string(),
        "container_label": f.label,
        "keep_alive_s": f.cfg.keep_alive_s,
        "max_per_function": f.cfg.max_per_function,
        "max_containers": f.cfg.max_containers,
        "forwarded_out": f.forwarded_out.load(Ordering::Relaxed),
        "forwarded_in": f.forwarded_in.load(Ordering::Relaxed),
        "deploys": f.deploys.load(Ordering::Relaxed),
        "apps": stats,
    })
}

/// The functions' lines of `capy status`.
pub fn render_text(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let f = &v["functions"];
    let mut o = String::new();
    if f.is_null() {
        return o;
    }
    if f["available"] == true {
        let _ = writeln!(
            o,
            "functions podman at {}, keep-alive {} s",
            f["podman_socket"].as_str().unwrap_or("?"),
            f["keep_alive_s"]
        );
    } else {
        let _ = writeln!(
            o,
            "functions unavailable: {}",
            f["unavailable_reason"].as_str().unwrap_or("?")
        );
    }
    if let Some(apps) = f["apps"].as_object() {
        for (app, s) in apps {
            let _ = writeln!(
                o,
                "  {app:<24} {} cold, {} warm, {} errors, {:.0} s idle, {} containers",
                s["cold_starts"],
                s["warm_starts"],
                s["errors"],
                s["idle_seconds"].as_f64().unwrap_or(0.0),
                s["containers"]
            );
        }
    }
    for c in v["containers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "  {:<24} {} {:.0} s idle",
            c["function"].as_str().unwrap_or("?"),
            c["state"].as_str().unwrap_or("?"),
            c["idle_s"].as_f64().unwrap_or(0.0)
        );
    }
    o
}

/// A per-app series: name, type, help, value.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&AppStats) -> f64,
);

/// The functions' lines of `/metrics`.
pub fn metrics_text(node: &Node) -> String {
    use std::fmt::Write;
    let f = &node.functions;
    let host = f.current();
    let stats = host.stats();
    let mut o = String::new();
    let series: [Series; 8] = [
        (
            "capy_fn_cold_starts_total",
            "counter",
            "Invocations that started a container.",
            |s| s.cold_starts as f64,
        ),
        (
            "capy_fn_warm_starts_total",
            "counter",
            "Invocations served by a kept-alive container.",
            |s| s.warm_starts as f64,
        ),
        (
            "capy_fn_invocations_total",
            "counter",
            "Invocations run on this node.",
            |s| s.invocations as f64,
        ),
        (
            "capy_fn_errors_total",
            "counter",
            "Invocations that failed.",
            |s| s.errors as f64,
        ),
        (
            "capy_fn_timeouts_total",
            "counter",
            "Invocations that ran past their timeout.",
            |s| s.timeouts as f64,
        ),
        (
            "capy_fn_expired_total",
            "counter",
            "Containers removed when their keep-alive window passed.",
            |s| s.expired as f64,
        ),
        (
            "capy_fn_idle_seconds_total",
            "counter",
            "Seconds containers spent idle, kept alive.",
            |s| s.idle_seconds,
        ),
        (
            "capy_fn_containers",
            "gauge",
            "Function containers on this node now.",
            |s| s.containers as f64,
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (app, s) in &stats {
            let _ = writeln!(o, "{name}{{app=\"{}\"}} {}", app.replace('"', ""), get(s));
        }
    }
    let _ = writeln!(
        o,
        "# HELP capy_fn_available Whether this node can run functions (podman answers).\n# TYPE capy_fn_available gauge\ncapy_fn_available {}",
        u8::from(host.available().is_ok())
    );
    let _ = writeln!(
        o,
        "# HELP capy_fn_forwarded_total Invocations this root handed to a neighbour.\n# TYPE capy_fn_forwarded_total counter\ncapy_fn_forwarded_total {}",
        f.forwarded_out.load(Ordering::Relaxed)
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containers::tar_entry;

    #[test]
    fn ground_keys_land_next_to_their_target_and_are_stable() {
        let target = fn_ring("shop", "resize");
        let k = ground_key("shop", target, "resize#fn");
        assert_eq!(k, ground_key("shop", target, "resize#fn"));
        assert!(k.starts_with("resize#fn#"), "{k}");
        let d = target.distance(NodeId::for_key("shop", &k));
        // The inputs are fixed, so this never varies: the best of 2^16
        // positions lands within 2^-12 of the ring (distance both ways).
        assert!(d < 1u128 << 116, "ground key lands {d:x} away");
        // A plain key would be anywhere on the ring.
        let plain = target.distance(NodeId::for_key("shop", "resize#fn#0"));
        assert!(d < plain, "{d:x} vs {plain:x}");
        let mut buf = [0u8; 8];
        for n in [0u32, 9, 10, 255, 4096, u32::MAX] {
            assert_eq!(hex_digits(n, &mut buf), format!("{n:x}").as_bytes());
        }
    }

    fn check_in_pieces(bytes: &[u8], piece: usize) -> Result<&'static str, String> {
        let mut t = TarCheck::default();
        for c in bytes.chunks(piece) {
            t.feed(c);
        }
        t.finish()
    }

    #[test]
    fn tar_check_tells_image_archives_from_other_files() {
        let mut img = tar_entry("layer.tar", &[7u8; 1500]);
        img.extend(tar_entry("manifest.json", b"[]"));
        img.extend([0u8; 1024]);
        // Padding after the end (as test archives carry) is ignored.
        img.extend([0u8; 4096]);
        for piece in [1, 7, 511, 512, 513, 100_000] {
            assert_eq!(check_in_pieces(&img, piece), Ok("docker-archive"));
        }
        let mut oci = tar_entry("./oci-layout", b"{}");
        oci.extend(tar_entry("./index.json", b"{}"));
        oci.extend([0u8; 1024]);
        assert_eq!(check_in_pieces(&oci, 64), Ok("oci-archive"));

        let mut plain = tar_entry("notes.txt", b"hello");
        plain.extend([0u8; 1024]);
        let e = check_in_pieces(&plain, 512).unwrap_err();
        assert!(e.contains("no manifest.json"), "{e}");

        let mut bad = img.clone();
        bad[0] ^= 1; // breaks the first header's checksum
        let e = check_in_pieces(&bad, 512).unwrap_err();
        assert!(e.contains("checksum"), "{e}");

        let cut = &img[..600];
        let e = check_in_pieces(cut, 512).unwrap_err();
        assert!(e.contains("truncated"), "{e}");

        assert!(check_in_pieces(&[], 512).is_err());
    }

    #[test]
    fn deploy_options_parse_and_refuse_nonsense() {
        assert_eq!(parse_memory("128m"), Ok(128 << 20));
        assert_eq!(parse_memory("1GiB"), Ok(1 << 30));
        assert_eq!(parse_memory("6291456"), Ok(6 << 20));
        assert!(parse_memory("12x").unwrap_err().contains("unit"));
        assert!(parse_memory("lots").is_err());
        assert_eq!(
            parse_seconds("timeout", "1.5s"),
            Ok(Duration::from_millis(1500))
        );
        assert!(parse_seconds("timeout", "-1").is_err());
        let o = DeployOpts::from_query("memory=64m&timeout=5&keep_alive=30").unwrap();
        assert_eq!(
            o,
            DeployOpts {
                memory_bytes: 64 << 20,
                timeout: Duration::from_secs(5),
                keep_alive_s: Some(30),
            }
        );
        assert!(DeployOpts::from_query("memory=1k")
            .unwrap_err()
            .contains("6 MiB"));
        assert!(DeployOpts::from_query("timeout=100000")
            .unwrap_err()
            .contains("at most"));
        assert!(DeployOpts::from_query("colour=red")
            .unwrap_err()
            .contains("colour"));
    }

    #[test]
    fn names_and_manifests_are_checked() {
        assert!(check_name("app", "shop-1.v2_x").is_ok());
        for bad in ["", "a/b", "a b", "ü", &"x".repeat(65)] {
            let e = check_name("app", bad).unwrap_err();
            assert_eq!(e.status, 400, "{bad:?}");
        }
        let rec = FnRecord {
            format: FORMAT,
            app: "shop".into(),
            name: "f".into(),
            sha256: "a".repeat(64),
            size: 10,
            chunk_bytes: 4,
            chunks: vec!["a".into(), "b".into(), "c".into()],
            memory_bytes: 1 << 27,
            timeout_ms: 1000,
            keep_alive_s: None,
            deployed_at_ms: 0,
            deployed_via: "n0".into(),
        };
        assert!(rec.check("shop", "f").is_ok());
        assert!(rec.check("shop", "g").is_err());
        let mut short = rec.clone();
        short.chunks.pop();
        assert!(short.check("shop", "f").unwrap_err().contains("chunks"));
        let mut sha = rec.clone();
        sha.sha256 = "zz".into();
        assert!(sha.check("shop", "f").is_err());
    }

    #[test]
    fn host_errors_keep_their_status_and_kind() {
        let f = FnFail::from(&FnError::Timeout {
            function: "a/b".into(),
            after: Duration::from_secs(2),
        });
        assert_eq!((f.status, f.kind.as_str()), (504, "timeout"));
        let f = FnFail::from(&FnError::BadOutput {
            function: "a/b".into(),
            reason: "x".into(),
        });
        assert_eq!((f.status, f.kind.as_str()), (502, "bad_output"));
        let f = FnFail::from(&FnError::NotDeployed("a/b".into()));
        assert_eq!(f.status, 404);
        let f = FnFail::from(&FnError::Unavailable("no podman".into()));
        assert_eq!((f.status, f.kind.as_str()), (503, "unavailable"));
        // The wire form round-trips.
        let r: Result<FnOk, FnFail> = Err(f.clone());
        let b = encode(&r).unwrap();
        assert_eq!(decode::<FnOk>(&b), Err(f));
    }
}

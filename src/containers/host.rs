//! The function host: runs functions in containers through an [`Engine`],
//! with cold and warm starts, a per-function container pool, keep-alive and
//! per-app counters. The node runtime calls it; it never touches the store
//! (the image archive comes from a closure the caller passes).
//!
//! Concurrency: one container serves one invocation at a time (OpenWhisk
//! semantics). Concurrent invocations of a function start more containers,
//! up to `max_per_function`; past that they queue (at most `max_queue`
//! waiting, each for at most the function's timeout) for the next free
//! container. The node holds at most `max_containers`; at that cap a cold
//! start evicts the least recently used idle container of any function, or
//! fails as busy if none is idle.

use super::conn::{self, Conn, ConnError};
use super::engine::*;
use bytes::Bytes;
use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use smol::lock::{Semaphore, SemaphoreGuardArc};
use smol::net::TcpStream;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::id::Micros;

/// Repository of the images capy loads; the tag is the archive's SHA-256,
/// so a changed archive is a new image.
pub const IMAGE_REPO: &str = "localhost/capy-fn";
/// Largest reply to `/init`.
const MAX_INIT_REPLY: usize = 64 << 10;
/// Unknown containers labelled with this node are looked for this often.
const RECONCILE_EVERY: Micros = 60_000_000;

#[derive(Clone, Debug)]
pub struct HostConfig {
    /// This node's name, put on every container as `capy.node`.
    pub node: String,
    /// How long an idle container is kept when its function says
    /// `KeepAlive::Default`.
    pub keep_alive: Duration,
    /// Most containers one function runs on this node at once.
    pub max_per_function: usize,
    /// Most containers this node runs at once (memory is the gateway's
    /// scarce resource).
    pub max_containers: usize,
    /// Most invocations of one function waiting for a container.
    pub max_queue: usize,
    /// Bound on create + start + the first answer to `/init`.
    pub start_timeout: Duration,
    /// Bound on a function's own timeout.
    pub max_timeout: Duration,
    /// Largest input (`{"value": ...}` as sent).
    pub max_input: usize,
    /// Largest output read from `/run`.
    pub max_output: usize,
    /// Largest image archive loaded.
    pub max_image_bytes: u64,
    /// The port the action runtime listens on inside the container.
    pub port: u16,
    /// SIGTERM grace before SIGKILL when podman stops a container.
    pub stop_timeout: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            node: "capy".into(),
            keep_alive: Duration::from_secs(600),
            max_per_function: 4,
            max_containers: 16,
            max_queue: 64,
            start_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            max_input: 1 << 20,
            max_output: 1 << 20,
            max_image_bytes: 512 << 20,
            port: 8080,
            stop_timeout: Duration::from_secs(1),
        }
    }
}

/// How long an idle container of a function is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum KeepAlive {
    /// The node's fixed window (`HostConfig::keep_alive`).
    #[default]
    Default,
    /// This function's own fixed window.
    For(Duration),
    /// Never expired by a window: the app's handler deploys and undeploys
    /// containers itself (adaptive keep-alive).
    Managed,
}

/// A function as the host needs to know it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FnSpec {
    pub app: String,
    pub name: String,
    /// Image reference, normally [`FnSpec::image_ref_for`] of the archive.
    pub image: String,
    pub memory_bytes: u64,
    /// Per-invocation bound on `/run`.
    pub timeout: Duration,
    pub keep_alive: KeepAlive,
    pub env: BTreeMap<String, String>,
}

impl FnSpec {
    pub const DEFAULT_MEMORY: u64 = 128 << 20;
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    pub fn new(app: &str, name: &str, image: &str) -> FnSpec {
        FnSpec {
            app: app.into(),
            name: name.into(),
            image: image.into(),
            memory_bytes: Self::DEFAULT_MEMORY,
            timeout: Self::DEFAULT_TIMEOUT,
            keep_alive: KeepAlive::Default,
            env: BTreeMap::new(),
        }
    }

    /// `APP/FN`, as in labels and messages.
    pub fn id(&self) -> String {
        format!("{}/{}", self.app, self.name)
    }

    /// The image reference for an archive: its content hash as the tag.
    pub fn image_ref_for(archive: &[u8]) -> String {
        format!("{IMAGE_REPO}:{}", hex::encode(Sha256::digest(archive)))
    }

    /// [`FnSpec::image_ref_for`] of a file, read in pieces.
    pub fn image_ref_for_file(path: &Path) -> std::io::Result<String> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(format!("{IMAGE_REPO}:{}", hex::encode(h.finalize())))
    }

    fn validate(&self, cfg: &HostConfig) -> Result<(), FnError> {
        let bad = |m: String| Err(FnError::InvalidSpec(m));
        for (what, s) in [("app", &self.app), ("function", &self.name)] {
            if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control() || c == '/') {
                return bad(format!(
                    "{what} name {s:?} must be 1 to 128 characters, without '/' or control characters"
                ));
            }
        }
        if self.image.is_empty() || self.image.len() > 255 {
            return bad(format!("image reference {:?} is not valid", self.image));
        }
        if self.memory_bytes < 6 << 20 {
            return bad(format!(
                "memory limit {} bytes is below podman's minimum of 6 MiB",
                self.memory_bytes
            ));
        }
        if self.timeout.is_zero() || self.timeout > cfg.max_timeout {
            return bad(format!(
                "timeout {:?} must be above zero and at most {:?}",
                self.timeout, cfg.max_timeout
            ));
        }
        Ok(())
    }

    fn expected_digest(&self) -> Option<&str> {
        let tag = self.image.strip_prefix(IMAGE_REPO)?.strip_prefix(':')?;
        (tag.len() == 64 && tag.bytes().all(|c| c.is_ascii_hexdigit())).then_some(tag)
    }
}

/// Why an invocation (or deployment) failed, in words a user understands.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FnError {
    #[error("function {0} is not deployed")]
    NotDeployed(String),
    #[error("functions are unavailable on this node: {0}")]
    Unavailable(String),
    #[error("invalid function: {0}")]
    InvalidSpec(String),
    #[error("the image of {function} is not a container image archive (podman save / docker save format): {reason}")]
    ImageInvalid { function: String, reason: String },
    #[error("the image of {function} could not be fetched: {reason}")]
    ImageUnavailable { function: String, reason: String },
    #[error("function {function} failed to start: {reason}")]
    StartFailed { function: String, reason: String },
    #[error("function {function} did not answer within {after:?}")]
    Timeout { function: String, after: Duration },
    #[error("function {function} crashed: {reason}")]
    Crashed { function: String, reason: String },
    #[error("function {function} returned output that is not JSON: {reason}")]
    BadOutput { function: String, reason: String },
    #[error("the {what} of {function} is larger than the limit of {limit} bytes")]
    TooLarge {
        function: String,
        what: &'static str,
        limit: usize,
    },
    #[error("function {function} reported an error: {message}")]
    Failed { function: String, message: String },
    #[error("function {function} is busy: {reason}")]
    Busy { function: String, reason: String },
    #[error("podman failed while handling {function}: {err}")]
    Engine { function: String, err: EngineError },
}

impl FnError {
    /// The HTTP status a front end should answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            FnError::NotDeployed(_) => 404,
            FnError::InvalidSpec(_) | FnError::ImageInvalid { .. } => 422,
            FnError::TooLarge { what: "input", .. } => 413,
            FnError::Timeout { .. } => 504,
            FnError::Unavailable(_) | FnError::Busy { .. } | FnError::ImageUnavailable { .. } => {
                503
            }
            _ => 502,
        }
    }
}

/// What an invocation returned.
#[derive(Clone, Debug, Serialize)]
pub struct Invocation {
    pub output: Value,
    /// True if a container was started for it.
    pub cold: bool,
    pub timings: Timings,
}

/// Where an invocation's time went, in microseconds (also carried between
/// nodes with a forwarded invocation's answer).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Waiting for a free container slot.
    pub queued_us: u64,
    /// Loading the image archive into podman (cold start, image missing).
    pub image_load_us: Option<u64>,
    /// Create + start + first `/init` answer (cold start).
    pub start_us: Option<u64>,
    /// The `/run` request.
    pub run_us: u64,
    pub total_us: u64,
}

/// The body of `POST /run` for `input`: the fields OpenWhisk's invoker
/// sends with every activation (some runtimes expose them to the action as
/// `__OW_*` variables). Benches that call a container directly use it too,
/// so their baseline gets what the host sends.
pub fn run_envelope(spec: &FnSpec, input: Value) -> Value {
    let deadline_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(spec.timeout)
        .as_millis() as u64;
    serde_json::json!({
        "value": input,
        "action_name": format!("/{}/{}", spec.app, spec.name),
        "namespace": spec.app,
        "activation_id": format!("{:032x}", rand::random::<u128>()),
        "deadline": deadline_ms.to_string(),
    })
}

/// Per-app counters for metrics and the status page.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct AppStats {
    pub invocations: u64,
    pub cold_starts: u64,
    pub warm_starts: u64,
    /// Containers started ahead of use by `deploy`.
    pub prewarms: u64,
    pub errors: u64,
    pub timeouts: u64,
    /// Containers removed because their keep-alive window passed.
    pub expired: u64,
    /// Seconds containers of this app spent idle (kept alive, unused).
    pub idle_seconds: f64,
    /// Containers of this app now.
    pub containers: usize,
}

/// One container, for the status page.
#[derive(Clone, Debug, Serialize)]
pub struct ContainerStatus {
    /// `APP/FN`.
    pub function: String,
    pub name: String,
    /// `starting`, `idle` or `busy`.
    pub state: &'static str,
    pub idle_s: f64,
    pub invocations: u64,
    pub host_port: Option<u16>,
}

/// A running, initialised container.
struct Warm {
    id: String,
    name: String,
    image: String,
    addr: SocketAddr,
    conn: Option<Conn>,
    idle_since: Micros,
    invocations: u64,
}

struct Busy {
    name: String,
    port: u16,
    invocations: u64,
}

struct Pool {
    spec: FnSpec,
    sem: Arc<Semaphore>,
    idle: Vec<Warm>,
    busy: Vec<Busy>,
    /// Names of containers being started.
    starting: Vec<String>,
    waiting: usize,
    /// Undeployed: containers coming back from an invocation are removed.
    retired: bool,
}

impl Pool {
    fn is_empty(&self) -> bool {
        self.idle.is_empty()
            && self.busy.is_empty()
            && self.starting.is_empty()
            && self.waiting == 0
    }
    fn size(&self) -> usize {
        self.idle.len() + self.busy.len() + self.starting.len()
    }
}

#[derive(Default)]
struct Counters {
    stats: AppStats,
    idle_us: u64,
}

#[derive(Default)]
struct State {
    pools: HashMap<String, Pool>,
    apps: BTreeMap<String, Counters>,
    /// Containers on this node, starting ones included.
    total: usize,
    last_reconcile: Micros,
}

impl State {
    fn app(&mut self, app: &str) -> &mut AppStats {
        &mut self.apps.entry(app.to_string()).or_default().stats
    }
    fn add_idle(&mut self, app: &str, us: u64) {
        self.apps.entry(app.to_string()).or_default().idle_us += us;
    }
}

pub struct FunctionHost {
    engine: Option<Arc<dyn Engine>>,
    unavailable: String,
    cfg: HostConfig,
    epoch: Instant,
    state: Mutex<State>,
    seq: AtomicU64,
    /// One image load at a time: concurrent cold starts of a missing image
    /// load it once.
    image_lock: smol::lock::Mutex<()>,
}

impl FunctionHost {
    /// A host on `engine`; `None` means this node has no container engine
    /// and every call answers [`FnError::Unavailable`].
    pub fn new(engine: Option<Arc<dyn Engine>>, cfg: HostConfig) -> FunctionHost {
        FunctionHost {
            engine,
            unavailable: "this node has no container engine configured".into(),
            cfg,
            epoch: Instant::now(),
            state: Mutex::new(State::default()),
            seq: AtomicU64::new(0),
            image_lock: smol::lock::Mutex::new(()),
        }
    }

    /// A host on podman's socket if podman answers there within 5 s;
    /// otherwise a host that reports functions as unavailable, saying why.
    pub async fn connect(socket: impl Into<PathBuf>, cfg: HostConfig) -> FunctionHost {
        let socket = socket.into();
        let podman = super::Podman::new(socket.clone());
        let answer = conn::within(Duration::from_secs(5), podman.ping()).await;
        match answer {
            Some(Ok(version)) => {
                tracing::info!("functions: podman {version} at {}", socket.display());
                FunctionHost::new(Some(Arc::new(podman)), cfg)
            }
            other => {
                let err = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => format!("no answer from podman at {} within 5s", socket.display()),
                };
                tracing::warn!("functions unavailable: {err}");
                let mut h = FunctionHost::new(None, cfg);
                h.unavailable = err;
                h
            }
        }
    }

    pub fn config(&self) -> &HostConfig {
        &self.cfg
    }

    /// `Err(reason)` if this node cannot run functions.
    pub fn available(&self) -> Result<(), String> {
        match self.engine {
            Some(_) => Ok(()),
            None => Err(self.unavailable.clone()),
        }
    }

    /// Microseconds on this host's monotonic clock; `tick` takes times on it.
    pub fn now(&self) -> Micros {
        self.epoch.elapsed().as_micros() as u64
    }

    fn engine(&self) -> Result<&Arc<dyn Engine>, FnError> {
        self.engine
            .as_ref()
            .ok_or_else(|| FnError::Unavailable(self.unavailable.clone()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `spec` on `input`. `load_image` is called only when podman lacks
    /// the image; it answers the archive (from the store) or an error such
    /// as [`FnError::NotDeployed`].
    pub async fn invoke<F, Fut>(
        &self,
        spec: &FnSpec,
        input: Value,
        load_image: F,
    ) -> Result<Invocation, FnError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<ImageSource, FnError>>,
    {
        let engine = self.engine()?.clone();
        spec.validate(&self.cfg)?;
        let function = spec.id();
        let body = serde_json::to_vec(&run_envelope(spec, input))
            .map_err(|e| FnError::InvalidSpec(format!("input: {e}")))?;
        if body.len() > self.cfg.max_input {
            return Err(FnError::TooLarge {
                function,
                what: "input",
                limit: self.cfg.max_input,
            });
        }
        let t0 = Instant::now();
        let result = self
            .invoke_inner(&engine, spec, body.into(), load_image)
            .await;
        let mut st = self.lock();
        let app = st.app(&spec.app);
        app.invocations += 1;
        match result {
            Ok(mut inv) => {
                if inv.cold {
                    app.cold_starts += 1;
                } else {
                    app.warm_starts += 1;
                }
                inv.timings.total_us = t0.elapsed().as_micros() as u64;
                Ok(inv)
            }
            Err((e, cold)) => {
                match cold {
                    Some(true) => app.cold_starts += 1,
                    Some(false) => app.warm_starts += 1,
                    None => {}
                }
                app.errors += 1;
                if matches!(e, FnError::Timeout { .. }) {
                    app.timeouts += 1;
                }
                Err(e)
            }
        }
    }

    /// The error carries whether a container was started cold (`Some(true)`),
    /// reused (`Some(false)`), or none was had.
    async fn invoke_inner<F, Fut>(
        &self,
        engine: &Arc<dyn Engine>,
        spec: &FnSpec,
        body: Bytes,
        load_image: F,
    ) -> Result<Invocation, (FnError, Option<bool>)>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<ImageSource, FnError>>,
    {
        let function = spec.id();
        let t0 = Instant::now();
        let permit = self.acquire(spec).await.map_err(|e| (e, None))?;
        let queued_us = t0.elapsed().as_micros() as u64;
        let mut timings = Timings {
            queued_us,
            ..Timings::default()
        };
        let mut load_image = Some(load_image);
        let (mut lease, cold) = match self.take_idle(spec, permit) {
            Ok(lease) => (lease, false),
            Err(permit) => {
                let (lease, load, start) = self
                    .start_container(engine, spec, permit, &mut load_image)
                    .await
                    .map_err(|e| (e, Some(true)))?;
                timings.image_load_us = load.map(|d| d.as_micros() as u64);
                timings.start_us = Some(start.as_micros() as u64);
                (lease, true)
            }
        };
        let t_run = Instant::now();
        let mut outcome = self.run(engine, &mut lease, &body, spec.timeout).await;
        let mut cold = cold;
        if let (false, Err((RunFail::Unreachable(why), _))) = (cold, &outcome) {
            // A warm container that died while idle (killed, out of memory,
            // podman restarted): nothing was sent, so start a fresh one.
            tracing::info!("{function}: idle container gone ({why}); starting another");
            let permit = lease.permit.take();
            drop(lease);
            let permit = match permit {
                Some(p) => p,
                None => self.acquire(spec).await.map_err(|e| (e, Some(false)))?,
            };
            let (fresh, load, start) = self
                .start_container(engine, spec, permit, &mut load_image)
                .await
                .map_err(|e| (e, Some(true)))?;
            timings.image_load_us = load.map(|d| d.as_micros() as u64);
            timings.start_us = Some(start.as_micros() as u64);
            lease = fresh;
            cold = true;
            outcome = self.run(engine, &mut lease, &body, spec.timeout).await;
        }
        timings.run_us = t_run.elapsed().as_micros() as u64;
        match outcome {
            Ok(output) => {
                self.give_back(lease);
                Ok(Invocation {
                    output,
                    cold,
                    timings,
                })
            }
            Err((kind, keep)) => {
                if keep {
                    self.give_back(lease);
                } else {
                    // Dropping the lease removes the container.
                    drop(lease);
                }
                Err((kind.into_error(&function, spec.timeout), Some(cold)))
            }
        }
    }

    /// A slot to use one container of the function, waiting (bounded) when
    /// all are busy.
    async fn acquire(&self, spec: &FnSpec) -> Result<SemaphoreGuardArc, FnError> {
        let key = spec.id();
        let sem = {
            let mut st = self.lock();
            let (stale, got) = {
                let pool = self.pool(&mut st, spec);
                let stale = pool_update(pool, spec);
                let got = if let Some(p) = pool.sem.try_acquire_arc() {
                    Ok(Ok(p))
                } else if pool.waiting >= self.cfg.max_queue {
                    Err(pool.waiting)
                } else {
                    pool.waiting += 1;
                    Ok(Err(pool.sem.clone()))
                };
                (stale, got)
            };
            self.discard(&mut st, &spec.app, stale);
            match got {
                Ok(Ok(permit)) => return Ok(permit),
                Ok(Err(sem)) => sem,
                Err(waiting) => {
                    return Err(FnError::Busy {
                        function: key,
                        reason: format!("{waiting} invocations already wait for a container"),
                    })
                }
            }
        };
        let got = conn::within(spec.timeout, sem.acquire_arc()).await;
        let mut st = self.lock();
        if let Some(pool) = st.pools.get_mut(&key) {
            pool.waiting = pool.waiting.saturating_sub(1);
        }
        got.ok_or_else(|| FnError::Busy {
            function: key,
            reason: format!(
                "no container became free within the function's timeout of {:?}",
                spec.timeout
            ),
        })
    }

    /// The function's pool, made if new.
    fn pool<'s>(&self, st: &'s mut State, spec: &FnSpec) -> &'s mut Pool {
        let max = self.cfg.max_per_function.max(1);
        st.pools.entry(spec.id()).or_insert_with(|| Pool {
            spec: spec.clone(),
            sem: Arc::new(Semaphore::new(max)),
            idle: Vec::new(),
            busy: Vec::new(),
            starting: Vec::new(),
            waiting: 0,
            retired: false,
        })
    }

    /// An idle container of the function, or the permit back.
    fn take_idle<'a>(
        &'a self,
        spec: &FnSpec,
        permit: SemaphoreGuardArc,
    ) -> Result<Lease<'a>, SemaphoreGuardArc> {
        let now = self.now();
        let key = spec.id();
        let mut st = self.lock();
        let Some(pool) = st.pools.get_mut(&key) else {
            return Err(permit);
        };
        let Some(w) = pool.idle.pop() else {
            return Err(permit);
        };
        pool.busy.push(Busy {
            name: w.name.clone(),
            port: w.addr.port(),
            invocations: w.invocations,
        });
        let idle = now.saturating_sub(w.idle_since);
        st.add_idle(&spec.app, idle);
        Ok(Lease {
            host: self,
            key,
            app: spec.app.clone(),
            warm: Some(w),
            permit: Some(permit),
        })
    }

    /// Reserves room for a new container (evicting the least recently used
    /// idle one at the node's cap) and starts it.
    async fn start_container<'a, F, Fut>(
        &'a self,
        engine: &Arc<dyn Engine>,
        spec: &FnSpec,
        permit: SemaphoreGuardArc,
        load_image: &mut Option<F>,
    ) -> Result<(Lease<'a>, Option<Duration>, Duration), FnError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<ImageSource, FnError>>,
    {
        let name = self.container_name(spec);
        let guard = self.reserve(spec, &name)?;
        let (warm, load, start) = self.cold_start(engine, spec, &name, load_image).await?;
        guard.finish(&warm);
        Ok((
            Lease {
                host: self,
                key: spec.id(),
                app: spec.app.clone(),
                warm: Some(warm),
                permit: Some(permit),
            },
            load,
            start,
        ))
    }

    fn reserve(&self, spec: &FnSpec, name: &str) -> Result<StartGuard<'_>, FnError> {
        let key = spec.id();
        let mut st = self.lock();
        if st.total >= self.cfg.max_containers {
            // Evict the least recently used idle container of any function.
            let victim = st
                .pools
                .iter()
                .filter_map(|(k, p)| {
                    p.idle
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, w)| w.idle_since)
                        .map(|(i, w)| (w.idle_since, k.clone(), i))
                })
                .min();
            match victim {
                Some((_, k, i)) => {
                    if let Some(pool) = st.pools.get_mut(&k) {
                        let w = pool.idle.remove(i);
                        let app = pool.spec.app.clone();
                        self.discard(&mut st, &app, vec![w]);
                    }
                }
                None => {
                    return Err(FnError::Busy {
                        function: key,
                        reason: format!(
                            "all {} containers this node may run are busy",
                            self.cfg.max_containers
                        ),
                    })
                }
            }
        }
        st.total += 1;
        if let Some(pool) = st.pools.get_mut(&key) {
            pool.starting.push(name.to_string());
        }
        Ok(StartGuard {
            host: self,
            key,
            name: name.to_string(),
            done: false,
        })
    }

    fn container_name(&self, spec: &FnSpec) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let r: u16 = rand::random();
        format!(
            "capy-{}-{}-{}-{n}-{r:04x}",
            sanitize(&self.cfg.node),
            sanitize(&spec.app),
            sanitize(&spec.name)
        )
    }

    /// Image (if missing), create, start, and wait for `/init` to answer.
    async fn cold_start<F, Fut>(
        &self,
        engine: &Arc<dyn Engine>,
        spec: &FnSpec,
        name: &str,
        loader: &mut Option<F>,
    ) -> Result<(Warm, Option<Duration>, Duration), FnError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<ImageSource, FnError>>,
    {
        let function = spec.id();
        let mut loaded: Option<ImageSource> = None;
        let mut load = self.ensure_image(engine, spec, loader, &mut loaded).await?;
        let t = Instant::now();
        let deadline = t + self.cfg.start_timeout;
        let mut env = spec.env.clone();
        env.insert("CAPY_APP".into(), spec.app.clone());
        env.insert("CAPY_FUNCTION".into(), spec.name.clone());
        env.insert(
            "__OW_ACTION_NAME".into(),
            format!("/{}/{}", spec.app, spec.name),
        );
        let cspec = ContainerSpec {
            name: name.to_string(),
            image: spec.image.clone(),
            labels: BTreeMap::from([
                (LABEL_FUNCTION.to_string(), function.clone()),
                (LABEL_NODE.to_string(), self.cfg.node.clone()),
                (LABEL_IMAGE.to_string(), spec.image.clone()),
            ]),
            env,
            memory_bytes: Some(spec.memory_bytes),
            port: self.cfg.port,
            stop_timeout: self.cfg.stop_timeout,
        };
        let start_failed = |reason: String| FnError::StartFailed {
            function: function.clone(),
            reason,
        };
        let mut run = conn::within(self.cfg.start_timeout, engine.run(&cspec)).await;
        if matches!(&run, Some(Err(e)) if image_missing(e)) {
            // Another node sharing this podman re-loaded or dropped the
            // image between our check and our create: make sure once more.
            let again = self.ensure_image(engine, spec, loader, &mut loaded).await?;
            load = load.or(again);
            run = conn::within(deadline - Instant::now(), engine.run(&cspec)).await;
        }
        drop(loaded);
        let id = match run {
            Some(Ok(id)) => id,
            Some(Err(e)) => return Err(start_failed(e.to_string())),
            None => {
                // It may still appear; remove it by name.
                self.spawn_remove(engine, name.to_string());
                return Err(start_failed(format!(
                    "podman did not create and start the container within {:?}",
                    self.cfg.start_timeout
                )));
            }
        };
        match self.wait_ready(engine, spec, &id, deadline).await {
            Ok((addr, c)) => Ok((
                Warm {
                    id,
                    name: name.to_string(),
                    image: spec.image.clone(),
                    addr,
                    conn: Some(c),
                    idle_since: self.now(),
                    invocations: 0,
                },
                load,
                t.elapsed(),
            )),
            Err(reason) => {
                self.spawn_remove(engine, id);
                Err(start_failed(reason))
            }
        }
    }

    /// Polls the container's published port until `/init` answers, watching
    /// for the container exiting meanwhile.
    async fn wait_ready(
        &self,
        engine: &Arc<dyn Engine>,
        spec: &FnSpec,
        id: &str,
        deadline: Instant,
    ) -> Result<(SocketAddr, Conn), String> {
        let init = serde_json::json!({ "value": {
            "name": spec.id(),
            "main": "main",
            "code": "",
            "binary": false,
            "env": spec.env,
        }})
        .to_string();
        let mut port: Option<u16> = None;
        let mut last_inspect: Option<Instant> = None;
        let mut pause = Duration::from_millis(2);
        loop {
            let now = Instant::now();
            if now >= deadline {
                // One last look: if it exited meanwhile, say that instead.
                let logs = self.tail_logs(engine, id).await;
                if let Some(status) = exit_status(engine, id, 1).await {
                    return Err(format!(
                        "the container exited ({status}) before answering /init{logs}"
                    ));
                }
                return Err(format!(
                    "the container did not answer /init on port {} within {:?}{logs}",
                    self.cfg.port, self.cfg.start_timeout
                ));
            }
            if port.is_none()
                || last_inspect.is_none_or(|t| t.elapsed() >= Duration::from_millis(100))
            {
                last_inspect = Some(Instant::now());
                let Some(info) = conn::within(deadline - now, engine.inspect(id)).await else {
                    continue; // the deadline passed: said at the loop's top
                };
                let info = info.map_err(|e| e.to_string())?;
                if info.state.is_down() {
                    let logs = self.tail_logs(engine, id).await;
                    return Err(format!(
                        "the container exited ({}) before answering /init{logs}",
                        describe_exit(&info)
                    ));
                }
                port = port.or(info.host_port);
            }
            if let Some(p) = port {
                let addr = SocketAddr::from(([127, 0, 0, 1], p));
                let left = deadline.saturating_duration_since(Instant::now());
                match conn::within(left, try_init(addr, &init)).await {
                    Some(Ok(c)) => return Ok((addr, c)),
                    Some(Err(InitErr::Refused(m))) => {
                        return Err(format!("/init answered with an error: {m}"))
                    }
                    Some(Err(InitErr::NotYet)) | None => {}
                }
            }
            smol::Timer::after(pause).await;
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }

    async fn tail_logs(&self, engine: &Arc<dyn Engine>, id: &str) -> String {
        match conn::within(Duration::from_secs(2), engine.logs(id, 10)).await {
            Some(Ok(l)) if !l.trim().is_empty() => {
                let l: String = l.trim().chars().take(1000).collect();
                format!("; it printed: {l}")
            }
            _ => String::new(),
        }
    }

    /// Makes sure podman has `spec.image`, loading the archive from
    /// `load_image` if not. Answers how long a load took, if one was needed.
    /// `load_image` is called at most once over the retries of one cold
    /// start; what it gave is kept in `loaded` for a second load.
    async fn ensure_image<F, Fut>(
        &self,
        engine: &Arc<dyn Engine>,
        spec: &FnSpec,
        load_image: &mut Option<F>,
        loaded: &mut Option<ImageSource>,
    ) -> Result<Option<Duration>, FnError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<ImageSource, FnError>>,
    {
        let function = spec.id();
        let engine_err = |err| FnError::Engine {
            function: function.clone(),
            err,
        };
        let invalid = |reason: String| FnError::ImageInvalid {
            function: function.clone(),
            reason,
        };
        let _g = self.image_lock.lock().await;
        if engine.image_exists(&spec.image).await.map_err(engine_err)? {
            return Ok(None);
        }
        let t = Instant::now();
        let src = match loaded.take() {
            Some(src) => src,
            None => {
                let f = load_image.take().ok_or_else(|| FnError::ImageUnavailable {
                    function: function.clone(),
                    reason: "the image vanished from podman during the invocation".into(),
                })?;
                let src = f().await?;
                let (head, len) = archive_head(&src).await.map_err(&invalid)?;
                if len > self.cfg.max_image_bytes {
                    return Err(invalid(format!(
                        "{len} bytes is more than the {} bytes a node loads",
                        self.cfg.max_image_bytes
                    )));
                }
                check_archive_magic(&head).map_err(&invalid)?;
                if let Some(want) = spec.expected_digest() {
                    let got = archive_digest(&src).await.map_err(&invalid)?;
                    if got != want {
                        return Err(invalid(format!(
                            "its SHA-256 is {got}, not the {want} it was deployed with (corrupt or wrong archive)"
                        )));
                    }
                }
                src
            }
        };
        *loaded = Some(src.clone());
        // Another node sharing this podman may move or drop the archive's
        // own name between our load and our tag: then load again.
        for attempt in 1..=3 {
            let names = match engine.load_image(src.clone()).await {
                Ok(n) => n,
                Err(EngineError::BadImage(m)) => return Err(invalid(m)),
                Err(e) => return Err(engine_err(e)),
            };
            if names.contains(&spec.image) {
                break;
            }
            let first = names.first().cloned().unwrap_or_default();
            match engine.tag_image(&first, &spec.image).await {
                Ok(()) => {}
                Err(EngineError::NotFound(_)) if attempt < 3 => continue,
                Err(e) => return Err(engine_err(e)),
            }
            // The archive's own names mean nothing to capy; take them off so
            // the image goes when its capy name does.
            for n in names
                .iter()
                .filter(|n| is_plain_name(n) && **n != spec.image)
            {
                let _ = engine.untag_image(n).await;
            }
            break;
        }
        Ok(Some(t.elapsed()))
    }

    /// Sends `/run`. On failure, says whether the container can be kept.
    async fn run(
        &self,
        engine: &Arc<dyn Engine>,
        lease: &mut Lease<'_>,
        body: &Bytes,
        timeout: Duration,
    ) -> Result<Value, (RunFail, bool)> {
        let Some(w) = lease.warm.as_mut() else {
            return Err((RunFail::Crashed("container lost".into()), false));
        };
        w.invocations += 1;
        let limit = self.cfg.max_output;
        let addr = w.addr;
        let mut unreachable = false;
        let attempt = async {
            if !w.conn.as_ref().is_some_and(Conn::is_open) {
                // Nothing is sent before this succeeds, so a failure here
                // can be retried on another container.
                unreachable = true;
                let s = TcpStream::connect(addr)
                    .await
                    .map_err(|e| ConnError::Request(format!("connecting to {addr}: {e}")))?;
                let _ = s.set_nodelay(true);
                w.conn = Some(Conn::handshake(s, &addr.to_string()).await?);
                unreachable = false;
            }
            match w.conn.as_mut() {
                Some(c) => {
                    c.request(
                        Method::POST,
                        "/run",
                        conn::full(body.clone()),
                        Some("application/json"),
                        limit,
                    )
                    .await
                }
                None => Err(ConnError::Request("no connection".into())),
            }
        };
        let reply = conn::within(timeout, attempt).await;
        let (status, out) = match reply {
            None => return Err((RunFail::Timeout, false)),
            Some(Ok(r)) => r,
            Some(Err(ConnError::TooLarge(n))) => {
                w.conn = None;
                return Err((RunFail::TooLarge(n), true));
            }
            Some(Err(e)) => {
                w.conn = None;
                let id = w.id.clone();
                let reason = match exit_status(engine, &id, 10).await {
                    Some(status) => format!("the container exited ({status})"),
                    None => format!("the connection to the container failed: {e}"),
                };
                if unreachable {
                    return Err((RunFail::Unreachable(reason), false));
                }
                return Err((RunFail::Crashed(reason), false));
            }
        };
        let parsed: Result<Value, _> = serde_json::from_slice(&out);
        if status.is_success() {
            parsed.map_err(|e| {
                (
                    RunFail::BadOutput(format!("{e} (output starts {})", snippet(&out))),
                    true,
                )
            })
        } else {
            let message = parsed
                .ok()
                .and_then(|v| {
                    v.get("error").map(|e| match e {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                })
                .unwrap_or_else(|| format!("HTTP {status}: {}", snippet(&out)));
            Err((RunFail::Failed(message), true))
        }
    }

    /// A container back from an invocation: idle again, or removed if its
    /// function was undeployed or changed image meanwhile.
    fn give_back(&self, mut lease: Lease<'_>) {
        let Some(mut w) = lease.warm.take() else {
            return;
        };
        let now = self.now();
        let mut st = self.lock();
        let keep = match st.pools.get_mut(&lease.key) {
            Some(pool) => {
                pool.busy.retain(|b| b.name != w.name);
                !pool.retired && pool.spec.image == w.image
            }
            None => false,
        };
        if keep {
            w.idle_since = now;
            if let Some(pool) = st.pools.get_mut(&lease.key) {
                pool.idle.push(w);
            }
        } else {
            w.idle_since = now;
            let app = lease.app.clone();
            self.discard(&mut st, &app, vec![w]);
        }
    }

    /// Removes idle containers already taken out of their pool: counted
    /// out of `total`, their idle time added, removed in the background.
    fn discard(&self, st: &mut State, app: &str, ws: Vec<Warm>) {
        let now = self.now();
        for w in ws {
            st.total = st.total.saturating_sub(1);
            st.add_idle(app, now.saturating_sub(w.idle_since));
            if let Some(engine) = &self.engine {
                self.spawn_remove(engine, w.id);
            }
        }
    }

    fn spawn_remove(&self, engine: &Arc<dyn Engine>, id: String) {
        let engine = engine.clone();
        smol::spawn(async move {
            if let Err(e) = engine.remove(&id).await {
                tracing::warn!("removing container {id}: {e}");
            }
        })
        .detach();
    }

    /// Starts a container for `spec` now unless one is already there, so the
    /// next invocation is warm. With `KeepAlive::Managed` it stays until
    /// `undeploy`. Answers whether a container was started.
    pub async fn deploy<F, Fut>(&self, spec: &FnSpec, load_image: F) -> Result<bool, FnError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<ImageSource, FnError>>,
    {
        let engine = self.engine()?.clone();
        spec.validate(&self.cfg)?;
        let permit = {
            let mut st = self.lock();
            let (stale, permit) = {
                let pool = self.pool(&mut st, spec);
                let stale = pool_update(pool, spec);
                let permit = if pool.size() > 0 {
                    None
                } else {
                    pool.sem.try_acquire_arc()
                };
                (stale, permit)
            };
            self.discard(&mut st, &spec.app, stale);
            match permit {
                Some(p) => p,
                None => return Ok(false),
            }
        };
        let (lease, _, _) = self
            .start_container(&engine, spec, permit, &mut Some(load_image))
            .await?;
        self.lock().app(&spec.app).prewarms += 1;
        self.give_back(lease);
        Ok(true)
    }

    /// Stops and removes the function's containers (busy ones when their
    /// invocation ends). Answers how many were removed now.
    pub async fn undeploy(&self, app: &str, name: &str) -> usize {
        let key = format!("{app}/{name}");
        let now = self.now();
        let idle = {
            let mut st = self.lock();
            let Some(pool) = st.pools.get_mut(&key) else {
                return 0;
            };
            pool.retired = true;
            let idle = std::mem::take(&mut pool.idle);
            if pool.is_empty() && Arc::strong_count(&pool.sem) == 1 {
                st.pools.remove(&key);
            }
            st.total = st.total.saturating_sub(idle.len());
            let us: u64 = idle.iter().map(|w| now.saturating_sub(w.idle_since)).sum();
            st.add_idle(app, us);
            idle
        };
        self.remove_now(idle).await
    }

    async fn remove_now(&self, ws: Vec<Warm>) -> usize {
        let Some(engine) = &self.engine else {
            return 0;
        };
        let mut n = 0;
        for w in ws {
            match engine.remove(&w.id).await {
                Ok(()) => n += 1,
                Err(e) => tracing::warn!("removing container {}: {e}", w.name),
            }
        }
        n
    }

    /// Enforces keep-alive windows at `now` (on [`FunctionHost::now`]'s
    /// clock): idle containers past their function's window are removed.
    /// Once a minute it also removes containers labelled with this node that
    /// the host does not know (left by a cancelled start). Answers how many
    /// containers expired.
    pub async fn tick(&self, now: Micros) -> usize {
        let (expired, reconcile) = {
            let mut st = self.lock();
            let mut expired: Vec<(String, Warm)> = Vec::new();
            for pool in st.pools.values_mut() {
                let window = match &pool.spec.keep_alive {
                    KeepAlive::Managed => continue,
                    KeepAlive::Default => self.cfg.keep_alive,
                    KeepAlive::For(d) => *d,
                };
                let window = window.as_micros() as u64;
                let (gone, kept): (Vec<Warm>, Vec<Warm>) = std::mem::take(&mut pool.idle)
                    .into_iter()
                    .partition(|w| now.saturating_sub(w.idle_since) >= window);
                pool.idle = kept;
                expired.extend(gone.into_iter().map(|w| (pool.spec.app.clone(), w)));
            }
            // A pool with no container and nobody holding or awaiting a slot
            // (the semaphore is shared with both) goes.
            st.pools
                .retain(|_, p| !(p.is_empty() && Arc::strong_count(&p.sem) == 1));
            for (app, w) in &expired {
                let us = now.saturating_sub(w.idle_since);
                st.add_idle(app, us);
                st.app(app).expired += 1;
            }
            st.total = st.total.saturating_sub(expired.len());
            let reconcile = now.saturating_sub(st.last_reconcile) >= RECONCILE_EVERY;
            if reconcile {
                st.last_reconcile = now;
            }
            (expired, reconcile)
        };
        let n = expired.len();
        self.remove_now(expired.into_iter().map(|(_, w)| w).collect())
            .await;
        if reconcile {
            if let Err(e) = self.reconcile().await {
                tracing::warn!("functions: reconciling containers: {e}");
            }
        }
        n
    }

    /// Removes containers labelled with this node that the host does not
    /// know. Answers how many.
    async fn reconcile(&self) -> Result<usize, FnError> {
        let engine = self.engine()?.clone();
        let node = self.cfg.node.clone();
        let listed = engine
            .list(&[(LABEL_NODE, node.as_str())])
            .await
            .map_err(|err| FnError::Engine {
                function: "*".into(),
                err,
            })?;
        let unknown: Vec<String> = {
            let st = self.lock();
            let known: std::collections::HashSet<&str> = st
                .pools
                .values()
                .flat_map(|p| {
                    p.idle
                        .iter()
                        .map(|w| w.name.as_str())
                        .chain(p.busy.iter().map(|b| b.name.as_str()))
                        .chain(p.starting.iter().map(String::as_str))
                })
                .collect();
            listed
                .into_iter()
                .filter(|c| !known.contains(c.name.trim_start_matches('/')))
                .map(|c| c.id)
                .collect()
        };
        let mut n = 0;
        for id in unknown {
            if engine.remove(&id).await.is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes every container a previous life of this node left behind
    /// (they cannot be adopted: an OpenWhisk runtime takes `/init` once, and
    /// their state is unknown). Call once at start. Answers how many.
    pub async fn cleanup_leftovers(&self) -> Result<usize, FnError> {
        self.reconcile().await
    }

    /// Per-app counters.
    pub fn stats(&self) -> BTreeMap<String, AppStats> {
        let now = self.now();
        let st = self.lock();
        let mut out: BTreeMap<String, AppStats> = st
            .apps
            .iter()
            .map(|(app, c)| {
                let mut s = c.stats.clone();
                s.idle_seconds = c.idle_us as f64 / 1e6;
                (app.clone(), s)
            })
            .collect();
        for pool in st.pools.values() {
            let s = out.entry(pool.spec.app.clone()).or_default();
            s.containers += pool.size();
            let idle: u64 = pool
                .idle
                .iter()
                .map(|w| now.saturating_sub(w.idle_since))
                .sum();
            s.idle_seconds += idle as f64 / 1e6;
        }
        out
    }

    /// Every container the host runs and what it is doing.
    pub fn status(&self) -> Vec<ContainerStatus> {
        let now = self.now();
        let st = self.lock();
        let mut out = Vec::new();
        let mut keys: Vec<&String> = st.pools.keys().collect();
        keys.sort();
        for k in keys {
            let p = &st.pools[k];
            for n in &p.starting {
                out.push(ContainerStatus {
                    function: k.clone(),
                    name: n.clone(),
                    state: "starting",
                    idle_s: 0.0,
                    invocations: 0,
                    host_port: None,
                });
            }
            for b in &p.busy {
                out.push(ContainerStatus {
                    function: k.clone(),
                    name: b.name.clone(),
                    state: "busy",
                    idle_s: 0.0,
                    invocations: b.invocations,
                    host_port: Some(b.port),
                });
            }
            for w in &p.idle {
                out.push(ContainerStatus {
                    function: k.clone(),
                    name: w.name.clone(),
                    state: "idle",
                    idle_s: now.saturating_sub(w.idle_since) as f64 / 1e6,
                    invocations: w.invocations,
                    host_port: Some(w.addr.port()),
                });
            }
        }
        out
    }
}

/// Brings a pool to the function's current spec; answers the idle
/// containers that run an image it no longer names.
fn pool_update(pool: &mut Pool, spec: &FnSpec) -> Vec<Warm> {
    pool.retired = false;
    if pool.spec == *spec {
        return Vec::new();
    }
    let image_changed = pool.spec.image != spec.image;
    pool.spec = spec.clone();
    if image_changed {
        std::mem::take(&mut pool.idle)
    } else {
        Vec::new()
    }
}

/// A container in use by one invocation. Dropped without being given back
/// (a failure, or the caller cancelled the invocation), its container is
/// removed: its state is unknown.
struct Lease<'a> {
    host: &'a FunctionHost,
    key: String,
    app: String,
    warm: Option<Warm>,
    permit: Option<SemaphoreGuardArc>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.warm.take() {
            let mut st = self.host.lock();
            if let Some(pool) = st.pools.get_mut(&self.key) {
                pool.busy.retain(|b| b.name != w.name);
            }
            let mut w = w;
            w.idle_since = self.host.now();
            let app = self.app.clone();
            self.host.discard(&mut st, &app, vec![w]);
        }
    }
}

/// A container slot being started; dropped before `finish`, the slot is
/// freed (the container itself, if created, is removed by whoever failed).
struct StartGuard<'a> {
    host: &'a FunctionHost,
    key: String,
    name: String,
    done: bool,
}

impl StartGuard<'_> {
    /// The container is up: it moves from starting to busy.
    fn finish(mut self, w: &Warm) {
        let mut st = self.host.lock();
        if let Some(pool) = st.pools.get_mut(&self.key) {
            pool.starting.retain(|n| *n != self.name);
            pool.busy.push(Busy {
                name: w.name.clone(),
                port: w.addr.port(),
                invocations: 0,
            });
        }
        self.done = true;
    }
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.host.lock();
        if let Some(pool) = st.pools.get_mut(&self.key) {
            pool.starting.retain(|n| *n != self.name);
        }
        st.total = st.total.saturating_sub(1);
    }
}

enum RunFail {
    Timeout,
    /// The container could not be reached; nothing was sent.
    Unreachable(String),
    TooLarge(usize),
    Crashed(String),
    BadOutput(String),
    Failed(String),
}

impl RunFail {
    fn into_error(self, function: &str, timeout: Duration) -> FnError {
        let function = function.to_string();
        match self {
            RunFail::Timeout => FnError::Timeout {
                function,
                after: timeout,
            },
            RunFail::TooLarge(limit) => FnError::TooLarge {
                function,
                what: "output",
                limit,
            },
            RunFail::Crashed(reason) | RunFail::Unreachable(reason) => {
                FnError::Crashed { function, reason }
            }
            RunFail::BadOutput(reason) => FnError::BadOutput { function, reason },
            RunFail::Failed(message) => FnError::Failed { function, message },
        }
    }
}

/// Podman's answer to a create whose image it does not have.
fn image_missing(e: &EngineError) -> bool {
    match e {
        EngineError::NotFound(m) | EngineError::Api { message: m, .. } => {
            m.contains("image not known")
        }
        _ => false,
    }
}

fn describe_exit(info: &ContainerInfo) -> String {
    let oom = if info.oom_killed {
        ", out of memory"
    } else {
        ""
    };
    let code = info.exit_code.map_or("?".to_string(), |c| c.to_string());
    format!("code {code}{oom}")
}

/// How a container ended, if it did within `tries` looks 100 ms apart: a
/// closed connection is seen before podman has reaped the process.
async fn exit_status(engine: &Arc<dyn Engine>, id: &str, tries: usize) -> Option<String> {
    for _ in 0..tries {
        match conn::within(Duration::from_secs(2), engine.inspect(id)).await {
            Some(Ok(info)) if info.state.is_down() => return Some(describe_exit(&info)),
            Some(Ok(_)) => smol::Timer::after(Duration::from_millis(100)).await,
            _ => return None,
        };
    }
    None
}

enum InitErr {
    /// Nothing listening yet (refused, reset, closed).
    NotYet,
    /// `/init` answered with an error.
    Refused(String),
}

async fn try_init(addr: SocketAddr, body: &str) -> Result<Conn, InitErr> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|_| InitErr::NotYet)?;
    let _ = s.set_nodelay(true);
    let mut c = Conn::handshake(s, &addr.to_string())
        .await
        .map_err(|_| InitErr::NotYet)?;
    match c
        .request(
            Method::POST,
            "/init",
            conn::full(body.to_string()),
            Some("application/json"),
            MAX_INIT_REPLY,
        )
        .await
    {
        Ok((status, _)) if status.is_success() => Ok(c),
        Ok((status, b)) => Err(InitErr::Refused(format!("HTTP {status}: {}", snippet(&b)))),
        Err(ConnError::TooLarge(_)) => Err(InitErr::Refused("reply too large".into())),
        Err(_) => Err(InitErr::NotYet),
    }
}

/// The first bytes of some output, printable, for an error message.
fn snippet(b: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(&b[..b.len().min(80)])
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    format!("{s:?}")
}

/// Container names allow `[a-zA-Z0-9_.-]`.
fn sanitize(s: &str) -> String {
    s.chars()
        .take(32)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A name (not an id or digest) that can be untagged without deleting.
fn is_plain_name(n: &str) -> bool {
    let hex_id = n.len() == 64 && n.bytes().all(|c| c.is_ascii_hexdigit());
    !(n.starts_with("sha256:") || hex_id)
}

/// The first 512 bytes and the length of an archive.
async fn archive_head(src: &ImageSource) -> Result<(Vec<u8>, u64), String> {
    match src {
        ImageSource::Bytes(b) => Ok((b[..b.len().min(512)].to_vec(), b.len() as u64)),
        ImageSource::File(p) => {
            let p = p.clone();
            smol::unblock(move || {
                use std::io::Read;
                let f = std::fs::File::open(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let mut head = Vec::with_capacity(512);
                f.take(512)
                    .read_to_end(&mut head)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
                Ok((head, len))
            })
            .await
        }
    }
}

async fn archive_digest(src: &ImageSource) -> Result<String, String> {
    match src {
        ImageSource::Bytes(b) => {
            let b = b.clone();
            Ok(smol::unblock(move || hex::encode(Sha256::digest(&b))).await)
        }
        ImageSource::File(p) => {
            let p = p.clone();
            smol::unblock(move || {
                FnSpec::image_ref_for_file(&p)
                    .map(|r| r.rsplit(':').next().unwrap_or_default().to_string())
                    .map_err(|e| format!("{}: {e}", p.display()))
            })
            .await
        }
    }
}

/// One regular file as a ustar entry (header and data padded to 512-byte
/// blocks); entries put one after another plus 1,024 zero bytes make an
/// archive. For tests and tools that need a tar that is not an image.
pub fn tar_entry(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name.as_bytes()[..n]);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len() as u64 & 0o77777777777).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A tar archive (`ustar` at offset 257), or one compressed with gzip, zstd,
/// xz or bzip2 (podman load takes those too). Anything else is refused
/// before podman sees it.
pub(crate) fn check_archive_magic(head: &[u8]) -> Result<(), String> {
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Ok(());
    }
    let compressed: [&[u8]; 4] = [
        &[0x1f, 0x8b],
        &[0x28, 0xb5, 0x2f, 0xfd],
        &[0xfd, b'7', b'z', b'X', b'Z', 0],
        b"BZh",
    ];
    if compressed.iter().any(|m| head.starts_with(m)) {
        return Ok(());
    }
    if head.is_empty() {
        return Err("the archive is empty".into());
    }
    Err(format!(
        "it is not a tar archive (it starts {})",
        snippet(&head[..head.len().min(16)])
    ))
}

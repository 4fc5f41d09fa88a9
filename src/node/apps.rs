//! Apps on the running cluster: definitions registered in the DHT, handler
//! events run on the root of the key they concern, timers, and per-app
//! counters. Calls the handlers engine (`handlers`), the store through
//! `Node::get_k`/`Node::put_k`, other nodes through `call_root`, and the
//! multicast trees (`pubsub`); functions through [`FunctionControl`].
//!
//! Where things live:
//! - an app's definition (and its Lua source) is the value of key `NAME` in
//!   bucket `_apps`, kept on `max(k, cluster default)` replicas; the names
//!   of all apps are the key `.index` there. Registration and removal run
//!   on the index key's root, one at a time, so the two stay consistent;
//! - an app's data is its bucket (named like the app), each key on the
//!   app's `k` replicas (or what `sys.set_replicas` chose for it), values
//!   JSON;
//! - a key's policy checkpoint is key `APP/KEY` of bucket `_state`, read
//!   back by whichever node next becomes the key's root.
//!
//! Events: every read, create and update of an app's key is routed to the
//! key's root, which runs the callback there (one event per key at a time),
//! then stores the result and applies the effects only when the callback
//! succeeded. Handler code runs on the blocking pool under the sandbox's
//! budgets, so a hostile handler never stalls the executor. Deletes run no
//! callback. Writes that effects make to other keys of the app go straight
//! to the store (their callbacks do not run).
//!
//! Effects, in order, after the result is stored (a failing one is logged
//! and counted, the caller still gets the result):
//! - `write(node, key, v)`: through the store, which places copies on the
//!   key's root and its closest leaf-set members; `node` is advisory (a copy
//!   of the call's own result "on node n" is the replication already done);
//! - `set_replicas(key, n)`: the key is rewritten with `n` replicas; the
//!   store's anti-entropy adds or hands off copies to match;
//! - `deploy_container` / `delete_container`: through [`FunctionControl`]
//!   ("functions unavailable" until one is installed);
//! - `publish(key, v)`: down the key's multicast tree from its root;
//! - `subscribe` / `unsubscribe`: noted; the subscribing node joins the tree
//!   itself (its read with `{subscribe = true}` is what the policy saw).
//!
//! Timers fire on the key's current root only, every `timer_interval_ms`,
//! for apps whose handler defines `timerCb`. With `clock_scale` > 1 the
//! handler's clock (and so `checkpoint_ms`) runs that much faster than real
//! time; timer intervals stay in real time.

use super::calls::Call;
use super::metrics::{Histogram, Labeled};
use super::pubsub::PubSub;
use super::runtime::{Node, OpError};
use super::{lock, wall_us};
use crate::handlers::{
    AppKey, AppRuntime, CallCtx, Effect, Event, EventKind, HandlerError, HandlerSource, Limits,
    Outcome, ReadFuture, ReadResult, SysHost, POLICIES,
};
use crate::id::{Micros, NodeId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Bucket of app definitions and of the app index.
pub const APPS_BUCKET: &str = "_apps";
/// Bucket of policy checkpoints.
pub const STATE_BUCKET: &str = "_state";
/// Key of the list of app names in [`APPS_BUCKET`].
const INDEX_KEY: &str = ".index";
/// Most apps a cluster registers.
pub const MAX_APPS: usize = 10_000;
/// Timer intervals an app may ask for.
pub const MIN_TIMER_MS: u64 = 100;
pub const MAX_TIMER_MS: u64 = 24 * 3600 * 1000;
/// Fastest accelerated handler clock (see [`AppSpec::clock_scale`]).
pub const MAX_CLOCK_SCALE: u32 = 10_000;
/// How long a node trusts its copy of an app definition.
const DEF_TTL: Duration = Duration::from_secs(5);
/// How long a node trusts that a bucket is no app.
const NO_APP_TTL: Duration = Duration::from_secs(3);
/// Definitions a node keeps at most.
const MAX_CACHED: usize = 4096;
/// Longest an event may take from the receiving node's view.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a handler's remote read may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Start of the accelerated clock: 2024-01-01, in µs since the epoch.
const CLOCK_BASE: Micros = 1_704_067_200_000_000;

/// Resource limits an app may set; unset ones take the sandbox defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    #[serde(default)]
    pub instructions: Option<u64>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub wall_ms: Option<u64>,
    /// Least time between two policy checkpoints of a key.
    #[serde(default)]
    pub checkpoint_ms: Option<u64>,
}

/// What a client asks to register (`POST /api/apps`, `capy app register`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    pub name: String,
    pub owner: String,
    /// Generated when absent (and kept across re-registrations).
    #[serde(default)]
    pub salt: Option<String>,
    /// Replication factor of the app's keys.
    #[serde(default)]
    pub replicas: Option<u8>,
    /// A shipped policy by name, or ...
    #[serde(default)]
    pub policy: Option<String>,
    /// ... Lua source.
    #[serde(default)]
    pub source: Option<String>,
    /// File name of the source, for error messages.
    #[serde(default)]
    pub source_name: Option<String>,
    #[serde(default)]
    pub timer_interval_ms: Option<u64>,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// The handler's clock (`sys.now()`) runs this many times faster than
    /// real time, from 2024-01-01: for trying time-driven policies (hours
    /// of keep-alive history) in minutes. 1 in production.
    #[serde(default)]
    pub clock_scale: Option<u32>,
}

/// A registered app, as stored in the DHT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppDef {
    pub name: String,
    pub owner: String,
    pub salt: String,
    /// Hex SHA-1 of name, owner and salt.
    pub app_id: String,
    pub replicas: u8,
    pub policy: Option<String>,
    pub source: Option<String>,
    pub source_name: Option<String>,
    pub timer_interval_ms: u64,
    pub instructions: u64,
    pub memory_bytes: u64,
    pub wall_ms: u64,
    pub checkpoint_ms: u64,
    pub clock_scale: u32,
    /// Grows with every registration under this name.
    pub revision: u64,
    pub registered_at_ms: u64,
}

fn app_id(name: &str, owner: &str, salt: &str) -> String {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    for (i, part) in [name, owner, salt].iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

impl AppDef {
    pub fn limits(&self) -> Limits {
        let d = Limits::default();
        Limits {
            instructions: self.instructions,
            memory_bytes: self.memory_bytes as usize,
            wall: Duration::from_millis(self.wall_ms),
            checkpoint_every: Duration::from_millis(self.checkpoint_ms),
            ..d
        }
    }

    pub fn handler_source(&self) -> HandlerSource {
        match (&self.policy, &self.source) {
            (Some(p), _) => HandlerSource::Policy(p.clone()),
            (None, Some(code)) => HandlerSource::Lua {
                name: self
                    .source_name
                    .clone()
                    .unwrap_or_else(|| format!("{}.lua", self.name)),
                code: code.clone(),
            },
            (None, None) => HandlerSource::Lua {
                name: format!("{}.lua", self.name),
                code: String::new(),
            },
        }
    }

    /// The definition as listed (the source is summarised, not shown).
    pub fn summary(&self) -> Json {
        json!({
            "name": self.name,
            "owner": self.owner,
            "app_id": self.app_id,
            "salt": self.salt,
            "replicas": self.replicas,
            "handler": match (&self.policy, &self.source) {
                (Some(p), _) => json!({ "policy": p }),
                (None, Some(s)) => json!({ "source": self.source_name, "bytes": s.len() }),
                (None, None) => json!(null),
            },
            "timer_interval_ms": self.timer_interval_ms,
            "limits": {
                "instructions": self.instructions,
                "memory_bytes": self.memory_bytes,
                "wall_ms": self.wall_ms,
                "checkpoint_ms": self.checkpoint_ms,
            },
            "clock_scale": self.clock_scale,
            "revision": self.revision,
            "registered_at_ms": self.registered_at_ms,
        })
    }
}

/// Whether `name` can be an app's name (it is also its bucket's).
pub fn check_app_name(name: &str) -> Result<(), String> {
    crate::store::entry::check_bucket(name).map_err(|e| format!("app name: {e}"))?;
    if name.starts_with(['_', '.']) || name == "default" {
        return Err(format!(
            "app name {name:?} is reserved (names starting with '_' or '.', and \"default\")"
        ));
    }
    Ok(())
}

fn bounded(what: &str, v: u64, lo: u64, hi: u64) -> Result<u64, String> {
    if v < lo || v > hi {
        return Err(format!("{what} = {v}: must be between {lo} and {hi}"));
    }
    Ok(v)
}

impl AppSpec {
    /// Every bound, before anything is stored or compiled.
    pub fn validate(&self) -> Result<(), String> {
        check_app_name(&self.name)?;
        if self.owner.is_empty() || self.owner.len() > 128 {
            return Err("owner must be 1 to 128 bytes".into());
        }
        if let Some(s) = &self.salt {
            if s.is_empty() || s.len() > 128 {
                return Err("salt must be 1 to 128 bytes".into());
            }
        }
        if let Some(k) = self.replicas {
            bounded("replicas", k as u64, 1, crate::store::entry::MAX_K as u64)?;
        }
        match (&self.policy, &self.source) {
            (Some(_), Some(_)) => return Err("give a policy or a handler source, not both".into()),
            (None, None) => {
                return Err(format!(
                    "no handler: give `policy` (one of {}) or a Lua `handler` file",
                    POLICIES.map(|p| p.0).join(", ")
                ))
            }
            (Some(p), None) if crate::handlers::policy_source(p).is_none() => {
                return Err(HandlerError::UnknownPolicy(p.clone()).to_string())
            }
            (None, Some(src)) if src.len() > crate::handlers::MAX_SOURCE_BYTES => {
                return Err(format!(
                    "handler source of {} bytes, at most {}",
                    src.len(),
                    crate::handlers::MAX_SOURCE_BYTES
                ))
            }
            _ => {}
        }
        if let Some(n) = &self.source_name {
            if n.len() > 256 {
                return Err("source_name longer than 256 bytes".into());
            }
        }
        if let Some(t) = self.timer_interval_ms {
            bounded("timer_interval_ms", t, MIN_TIMER_MS, MAX_TIMER_MS)?;
        }
        if let Some(c) = self.clock_scale {
            bounded("clock_scale", c as u64, 1, MAX_CLOCK_SCALE as u64)?;
        }
        let l = &self.limits;
        if let Some(v) = l.instructions {
            bounded("limits.instructions", v, 1_000, 1_000_000_000)?;
        }
        if let Some(v) = l.memory_bytes {
            bounded("limits.memory_bytes", v, 1 << 20, 256 << 20)?;
        }
        if let Some(v) = l.wall_ms {
            bounded("limits.wall_ms", v, 1, 10_000)?;
        }
        if let Some(v) = l.checkpoint_ms {
            bounded("limits.checkpoint_ms", v, 100, 7 * 24 * 3600 * 1000)?;
        }
        Ok(())
    }

    /// The definition this spec makes, given what is registered under its
    /// name already.
    fn to_def(&self, existing: Option<&AppDef>, now_ms: u64) -> Result<AppDef, Answer> {
        if let Some(e) = existing {
            if e.owner != self.owner {
                return Err(Answer::error(
                    409,
                    &format!(
                        "app {:?} is registered by another owner ({:?})",
                        e.name, e.owner
                    ),
                ));
            }
        }
        let salt = self
            .salt
            .clone()
            .or_else(|| existing.map(|e| e.salt.clone()))
            .unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
        let d = Limits::default();
        let l = &self.limits;
        Ok(AppDef {
            app_id: app_id(&self.name, &self.owner, &salt),
            name: self.name.clone(),
            owner: self.owner.clone(),
            salt,
            replicas: self.replicas.unwrap_or(crate::store::entry::DEFAULT_K),
            policy: self.policy.clone(),
            source: self.source.clone(),
            source_name: self.source_name.clone(),
            timer_interval_ms: self
                .timer_interval_ms
                .unwrap_or(crate::handlers::DEFAULT_TIMER_INTERVAL.as_millis() as u64),
            instructions: l.instructions.unwrap_or(d.instructions),
            memory_bytes: l.memory_bytes.unwrap_or(d.memory_bytes as u64),
            wall_ms: l.wall_ms.unwrap_or(d.wall.as_millis() as u64),
            checkpoint_ms: l
                .checkpoint_ms
                .unwrap_or(d.checkpoint_every.as_millis() as u64),
            clock_scale: self.clock_scale.unwrap_or(1),
            revision: existing.map_or(1, |e| e.revision + 1),
            registered_at_ms: now_ms,
        })
    }
}

/// What a client operation on an app answers: an HTTP status and a JSON
/// body (`{"error": ...}` when it failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    pub fn ok(v: &Json) -> Answer {
        Answer {
            status: 200,
            body: v.to_string(),
        }
    }

    pub fn error(status: u16, msg: &str) -> Answer {
        Answer {
            status,
            body: json!({ "error": msg }).to_string(),
        }
    }

    fn from_op(e: OpError) -> Answer {
        Answer::error(e.status().as_u16(), &e.to_string())
    }

    pub fn is_ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The message of an error answer.
    pub fn message(&self) -> String {
        serde_json::from_str::<Json>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_else(|| self.body.clone())
    }
}

/// A client operation on one key of an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyOp {
    /// readCb with these args (JSON text).
    Read {
        args: String,
    },
    /// createCb or updateCb with this value (JSON text).
    Write {
        value: String,
    },
    Delete,
}

/// The requests of this module between nodes (inside [`Call::App`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppCall {
    Register(AppSpec),
    Remove {
        name: String,
        owner: Option<String>,
    },
    Event {
        app: String,
        key: String,
        op: KeyOp,
        caller: String,
    },
    /// The live policy state of a key, at its root.
    State {
        app: String,
        key: String,
    },
    /// Publish to the tree of `app/key`, at its root.
    Publish {
        app: String,
        key: String,
        value: String,
    },
}

/// Starts and stops function containers for handlers
/// (`sys.deploy_container` / `sys.delete_container`). The functions part
/// implements it and installs it with [`Apps::set_functions`].
pub trait FunctionControl: Send + Sync {
    fn deploy(&self, app: &str, function: &str) -> crate::http::BoxFuture<Result<(), String>>;
    fn undeploy(&self, app: &str, function: &str) -> crate::http::BoxFuture<Result<(), String>>;
}

/// Per-app counters of this node (the handler runs it served as a root).
#[derive(Default)]
pub struct AppCounters {
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    pub events: Labeled,
    pub effects: Labeled,
    pub effect_errors: AtomicU64,
    pub latency: Histogram,
}

struct Cached {
    def: Option<Arc<AppDef>>,
    at: Instant,
}

/// One app's handler on this node.
pub(crate) struct Slot {
    def: Arc<AppDef>,
    rt: Arc<smol::lock::Mutex<AppRuntime>>,
    has_timer: bool,
    /// Keys whose checkpoint this node has looked for (and may hold live
    /// policy state of).
    touched: Mutex<HashSet<String>>,
}

#[derive(Default)]
struct TimerState {
    next: Option<Instant>,
    running: bool,
}

/// One async lock per (app, key) with events in progress.
type KeyLocks = HashMap<(String, String), Arc<smol::lock::Mutex<()>>>;

/// This node's part of every app: caches, handler states, locks, counters,
/// the multicast trees and their SSE clients.
pub struct Apps {
    cache: Mutex<HashMap<String, Cached>>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    stats: Mutex<BTreeMap<String, Arc<AppCounters>>>,
    key_locks: Mutex<KeyLocks>,
    registry: smol::lock::Mutex<()>,
    timers: Mutex<HashMap<String, TimerState>>,
    /// Local buckets the timer scan found not to be apps, and when.
    scan_misses: Mutex<HashMap<String, Instant>>,
    functions: OnceLock<Arc<dyn FunctionControl>>,
    pub pubsub: PubSub,
}

impl Default for Apps {
    fn default() -> Self {
        Self::new()
    }
}

impl Apps {
    pub fn new() -> Apps {
        Apps {
            cache: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            stats: Mutex::new(BTreeMap::new()),
            key_locks: Mutex::new(HashMap::new()),
            registry: smol::lock::Mutex::new(()),
            timers: Mutex::new(HashMap::new()),
            scan_misses: Mutex::new(HashMap::new()),
            functions: OnceLock::new(),
            pubsub: PubSub::default(),
        }
    }

    /// Installs the function host handlers' container effects go to.
    pub fn set_functions(&self, f: Arc<dyn FunctionControl>) -> Result<(), String> {
        self.functions
            .set(f)
            .map_err(|_| "a function host is installed already".to_string())
    }

    /// The replication factor of `bucket` if it is a known app's.
    pub fn replicas_of(&self, bucket: &str) -> Option<u8> {
        let c = lock(&self.cache);
        c.get(bucket)
            .and_then(|x| x.def.as_ref())
            .map(|d| d.replicas)
    }

    fn remember(&self, name: &str, def: Option<Arc<AppDef>>) {
        let mut c = lock(&self.cache);
        if c.len() >= MAX_CACHED && !c.contains_key(name) {
            c.retain(|_, v| v.def.is_some());
            if c.len() >= MAX_CACHED {
                c.clear();
            }
        }
        c.insert(
            name.to_string(),
            Cached {
                def,
                at: Instant::now(),
            },
        );
    }

    fn cached(&self, name: &str) -> Option<Option<Arc<AppDef>>> {
        let c = lock(&self.cache);
        let x = c.get(name)?;
        let ttl = if x.def.is_some() { DEF_TTL } else { NO_APP_TTL };
        (x.at.elapsed() < ttl).then(|| x.def.clone())
    }

    pub fn counters(&self, app: &str) -> Arc<AppCounters> {
        let mut s = lock(&self.stats);
        if let Some(c) = s.get(app) {
            return c.clone();
        }
        let c = Arc::new(AppCounters::default());
        if s.len() < 1024 {
            s.insert(app.to_string(), c.clone());
        }
        c
    }

    pub fn all_counters(&self) -> Vec<(String, Arc<AppCounters>)> {
        lock(&self.stats)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn key_lock(&self, app: &str, key: &str) -> Arc<smol::lock::Mutex<()>> {
        let mut m = lock(&self.key_locks);
        // locks nobody holds or waits for are dropped as we go
        if m.len() > 256 {
            m.retain(|_, l| Arc::strong_count(l) > 1);
        }
        m.entry((app.to_string(), key.to_string()))
            .or_insert_with(|| Arc::new(smol::lock::Mutex::new(())))
            .clone()
    }
}

/// `sys` for a handler running on this node, as root of its key.
struct NodeHost {
    node: Arc<Node>,
    vnode: NodeId,
    app: String,
    k: u8,
    scale: u32,
    /// Object class handlers read nothing but their own object (passed
    /// with the call): other reads get this refusal, and the flag is set so
    /// that the call fails even if the handler ignores the error.
    reads_refused: Option<(&'static str, Arc<std::sync::atomic::AtomicBool>)>,
}

impl Node {
    /// The `sys` host of an object class's handler: the node's facts as for
    /// an app, and no reads beyond the object itself.
    pub(crate) fn object_host(
        self: &Arc<Self>,
        vnode: NodeId,
        refused: Arc<std::sync::atomic::AtomicBool>,
    ) -> Arc<dyn SysHost> {
        Arc::new(NodeHost {
            node: self.clone(),
            vnode,
            app: String::new(),
            k: 0,
            scale: 1,
            reads_refused: Some((
                "an object's handler reads only its own object: sys.read(sys.key())",
                refused,
            )),
        })
    }
}

/// The handler clock: wall time, sped up by `scale` from 2024-01-01.
fn handler_now(scale: u32) -> Micros {
    let w = wall_us();
    if scale <= 1 {
        return w;
    }
    CLOCK_BASE.saturating_add(w.saturating_sub(CLOCK_BASE).saturating_mul(scale as u64))
}

impl SysHost for NodeHost {
    fn now(&self) -> Micros {
        handler_now(self.scale)
    }
    fn node_id(&self) -> NodeId {
        self.vnode
    }
    fn local_ip(&self) -> IpAddr {
        self.node.quic.ip()
    }
    fn leaf_set(&self, n: usize) -> Vec<NodeId> {
        let c = self.node.lock();
        let Some(p) = c.vnodes.get(&self.vnode) else {
            return Vec::new();
        };
        p.closest(self.vnode, n.saturating_add(1))
            .into_iter()
            .filter(|h| h.id != self.vnode && h.addr != self.node.quic)
            .take(n)
            .map(|h| h.id)
            .collect()
    }
    fn neighbor(&self, n: usize) -> Vec<NodeId> {
        let c = self.node.lock();
        c.vnodes
            .get(&self.vnode)
            .map(|p| {
                p.neighbours()
                    .into_iter()
                    .take(n)
                    .map(|(h, _)| h.id)
                    .collect()
            })
            .unwrap_or_default()
    }
    fn read<'a>(&'a self, key: &AppKey) -> ReadFuture<'a> {
        let key = key.clone();
        Box::pin(async move {
            if let Some((why, flag)) = &self.reads_refused {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
                return Err(why.to_string());
            }
            if key.app != self.app {
                return Err(format!("key {key} is not of app {:?}", self.app));
            }
            let got = futures_lite::future::or(
                async { Some(self.node.get_k(&key.app, &key.name, self.k).await) },
                async {
                    smol::Timer::after(READ_TIMEOUT).await;
                    None
                },
            )
            .await;
            let v = match got {
                None => return Err(format!("reading {key}: no answer within {READ_TIMEOUT:?}")),
                Some(Err(e)) => return Err(format!("reading {key}: {e}")),
                Some(Ok(v)) => v,
            };
            let value = match v {
                None => None,
                Some(v) => Some(
                    serde_json::from_slice(&v.value)
                        .map_err(|e| format!("stored value of {key} is not JSON: {e}"))?,
                ),
            };
            let holders = {
                let c = self.node.lock();
                c.placement(key.ring_id(), self.k as usize)
                    .into_iter()
                    .map(|h| h.id)
                    .collect()
            };
            Ok(ReadResult { value, holders })
        })
    }
}

/// HTTP status of a failed handler call: the app's code failed (422), or
/// it could not even be loaded (500).
pub(crate) fn handler_status(e: &HandlerError) -> u16 {
    match e {
        HandlerError::Load(_) | HandlerError::UnknownPolicy(_) => 500,
        _ => 422,
    }
}

fn parse_stored(bucket: &str, key: &str, bytes: &[u8]) -> Result<Json, Answer> {
    serde_json::from_slice(bytes).map_err(|e| {
        Answer::error(
            500,
            &format!(
                "stored value of {bucket}/{key} is not JSON ({e}); rewrite it with a JSON value"
            ),
        )
    })
}

fn to_bytes(v: &Json) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl Node {
    // ---- definitions ------------------------------------------------------

    /// The definition of app `name`, from this node's cache (a few seconds
    /// old at most) or the DHT.
    pub async fn app_def(self: &Arc<Self>, name: &str) -> Result<Option<Arc<AppDef>>, OpError> {
        if check_app_name(name).is_err() {
            return Ok(None);
        }
        if let Some(d) = self.apps.cached(name) {
            return Ok(d);
        }
        self.app_def_fresh(name).await
    }

    /// The definition of app `name` as the DHT has it now.
    pub async fn app_def_fresh(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<Option<Arc<AppDef>>, OpError> {
        self.fetch_def(name, true).await
    }

    /// Like `app_def`, but a miss is not remembered: for the timer scan of
    /// local buckets, which would otherwise mark a bucket "not an app" on
    /// every replica holder for `NO_APP_TTL` right before its app is
    /// registered (a function's image, stored first, makes the bucket).
    async fn app_def_quiet(self: &Arc<Self>, name: &str) -> Result<Option<Arc<AppDef>>, OpError> {
        if let Some(d) = self.apps.cached(name) {
            return Ok(d);
        }
        self.fetch_def(name, false).await
    }

    async fn fetch_def(
        self: &Arc<Self>,
        name: &str,
        remember_none: bool,
    ) -> Result<Option<Arc<AppDef>>, OpError> {
        if check_app_name(name).is_err() {
            return Ok(None);
        }
        let k = self.registry_k();
        let got = match self.get_k(APPS_BUCKET, name, k).await {
            Ok(g) => g,
            Err(e) => {
                // keep serving from a stale copy rather than failing
                let stale = lock(&self.apps.cache).get(name).and_then(|c| c.def.clone());
                return match stale {
                    Some(d) => Ok(Some(d)),
                    None => Err(e),
                };
            }
        };
        let def = match got {
            None => None,
            Some(v) => match serde_json::from_slice::<AppDef>(&v.value) {
                Ok(d) => Some(Arc::new(d)),
                Err(e) => {
                    tracing::warn!(app = name, "unreadable app definition in the store: {e}");
                    None
                }
            },
        };
        if def.is_some() || remember_none {
            self.apps.remember(name, def.clone());
        }
        Ok(def)
    }

    /// Registers (or re-registers) an app: checks the spec and that its
    /// handler loads here, then has the index's root store it.
    pub async fn register_app(self: &Arc<Self>, spec: AppSpec) -> Answer {
        if let Err(e) = spec.validate() {
            return Answer::error(400, &e);
        }
        // Load it once here, with its limits, so a broken handler is
        // refused before anything is stored.
        let probe = match spec.to_def(None, 0) {
            Ok(d) => d,
            Err(a) => return a,
        };
        let (src, limits, name) = (probe.handler_source(), probe.limits(), probe.name.clone());
        let loaded = smol::unblock(move || AppRuntime::new(&name, &src, limits).map(|_| ())).await;
        if let Err(e) = loaded {
            return Answer::error(422, &e.to_string());
        }
        self.index_call(AppCall::Register(spec)).await
    }

    pub async fn remove_app(self: &Arc<Self>, name: &str, owner: Option<String>) -> Answer {
        if let Err(e) = check_app_name(name) {
            return Answer::error(400, &e);
        }
        self.index_call(AppCall::Remove {
            name: name.to_string(),
            owner,
        })
        .await
    }

    /// The registered apps (from the index).
    pub async fn list_apps(self: &Arc<Self>) -> Answer {
        let names = match self.app_index().await {
            Ok(n) => n,
            Err(e) => return Answer::from_op(e),
        };
        let mut apps = Vec::new();
        for n in names {
            match self.app_def_fresh(&n).await {
                Ok(Some(d)) => apps.push(d.summary()),
                Ok(None) => {}
                Err(e) => apps.push(json!({ "name": n, "error": e.to_string() })),
            }
        }
        Answer::ok(&json!({ "apps": apps }))
    }

    async fn app_index(self: &Arc<Self>) -> Result<Vec<String>, OpError> {
        let k = self.registry_k();
        match self.get_k(APPS_BUCKET, INDEX_KEY, k).await? {
            None => Ok(Vec::new()),
            Some(v) => serde_json::from_slice::<Vec<String>>(&v.value)
                .map_err(|e| OpError::Internal(format!("unreadable app index: {e}"))),
        }
    }

    async fn index_call(self: &Arc<Self>, call: AppCall) -> Answer {
        let ring = NodeId::for_key(APPS_BUCKET, INDEX_KEY);
        self.app_call(ring, call).await
    }

    /// Runs an [`AppCall`] at the root of `ring`.
    pub(crate) async fn app_call(self: &Arc<Self>, ring: NodeId, call: AppCall) -> Answer {
        match self
            .call_root(ring, Call::App(Box::new(call)), EVENT_TIMEOUT)
            .await
        {
            Ok(bytes) => postcard::from_bytes::<Answer>(&bytes).unwrap_or_else(|e| {
                Answer::error(502, &format!("undecodable answer from the key's root: {e}"))
            }),
            Err(e) => Answer::from_op(e),
        }
    }

    /// Serves an [`AppCall`] routed here (this node is the root).
    pub(crate) async fn serve_app(self: &Arc<Self>, call: AppCall) -> Answer {
        match call {
            AppCall::Register(spec) => self.serve_register(spec).await,
            AppCall::Remove { name, owner } => self.serve_remove(&name, owner).await,
            AppCall::Event {
                app,
                key,
                op,
                caller,
            } => self.serve_event(&app, &key, op, &caller).await,
            AppCall::State { app, key } => self.serve_state(&app, &key).await,
            AppCall::Publish { app, key, value } => {
                let topic = NodeId::for_key(&app, &key);
                self.publish_local(topic, value.into_bytes());
                Answer::ok(&json!({ "published": true }))
            }
        }
    }

    /// Copies of the registry (`_apps`) and of policy checkpoints at least:
    /// the node's replication factor (1..=16, checked in the config).
    fn registry_k(&self) -> u8 {
        self.cfg.replicas as u8
    }

    /// The stored definition of `name` for a registry change. One this
    /// node cannot decode (written by a newer version, say) is an error,
    /// not "no app": that would let another owner take the name over.
    async fn stored_def(self: &Arc<Self>, name: &str) -> Result<Option<AppDef>, Answer> {
        let k = self.registry_k();
        match self.get_k(APPS_BUCKET, name, k).await {
            Ok(None) => Ok(None),
            Ok(Some(v)) => serde_json::from_slice::<AppDef>(&v.value).map(Some).map_err(|e| {
                Answer::error(
                    500,
                    &format!("the stored definition of app {name:?} is unreadable here ({e}); nothing changed"),
                )
            }),
            Err(e) => Err(Answer::from_op(e)),
        }
    }

    async fn serve_register(self: &Arc<Self>, spec: AppSpec) -> Answer {
        if let Err(e) = spec.validate() {
            return Answer::error(400, &e);
        }
        let _one_at_a_time = self.apps.registry.lock().await;
        let existing = match self.stored_def(&spec.name).await {
            Ok(d) => d,
            Err(a) => return a,
        };
        let mut names = match self.app_index().await {
            Ok(n) => n,
            Err(e) => return Answer::from_op(e),
        };
        if existing.is_none() && !names.contains(&spec.name) && names.len() >= MAX_APPS {
            return Answer::error(507, &format!("the cluster holds {MAX_APPS} apps already"));
        }
        let def = match spec.to_def(existing.as_ref(), wall_us() / 1000) {
            Ok(d) => d,
            Err(a) => return a,
        };
        let k = self.registry_k();
        let def_k = def.replicas.max(k);
        if let Err(e) = self
            .put_k(APPS_BUCKET, &def.name, Some(to_bytes(&json!(def))), def_k)
            .await
        {
            return Answer::from_op(e);
        }
        if !names.contains(&def.name) {
            names.push(def.name.clone());
            names.sort();
            if let Err(e) = self
                .put_k(APPS_BUCKET, INDEX_KEY, Some(to_bytes(&json!(names))), k)
                .await
            {
                return Answer::from_op(e);
            }
        }
        tracing::info!(app = %def.name, owner = %def.owner, revision = def.revision, "app registered");
        self.apps.remember(&def.name, Some(Arc::new(def.clone())));
        Answer::ok(&def.summary())
    }

    async fn serve_remove(self: &Arc<Self>, name: &str, owner: Option<String>) -> Answer {
        let _one_at_a_time = self.apps.registry.lock().await;
        let existing = match self.stored_def(name).await {
            Ok(d) => d,
            Err(a) => return a,
        };
        let Some(def) = existing else {
            return Answer::error(404, &format!("no app named {name:?}"));
        };
        if let Some(o) = owner {
            if o != def.owner {
                return Answer::error(
                    403,
                    &format!("app {name:?} belongs to {:?}, not {o:?}", def.owner),
                );
            }
        }
        let mut names = match self.app_index().await {
            Ok(n) => n,
            Err(e) => return Answer::from_op(e),
        };
        names.retain(|n| n != name);
        if let Err(e) = self
            .put_k(
                APPS_BUCKET,
                INDEX_KEY,
                Some(to_bytes(&json!(names))),
                self.registry_k(),
            )
            .await
        {
            return Answer::from_op(e);
        }
        if let Err(e) = self
            .put_k(APPS_BUCKET, name, None, def.replicas.max(self.registry_k()))
            .await
        {
            return Answer::from_op(e);
        }
        self.apps.remember(name, None);
        lock(&self.apps.slots).remove(name);
        tracing::info!(app = %name, "app removed");
        Answer::ok(&json!({ "removed": name, "app_id": def.app_id }))
    }

    // ---- events -----------------------------------------------------------

    /// A client's read, write or delete of `app/key`, from any node: runs
    /// at the key's root.
    pub async fn app_event(
        self: &Arc<Self>,
        app: &str,
        key: &str,
        op: KeyOp,
        caller: &str,
    ) -> Answer {
        if let Err(e) = crate::store::entry::check_key(key) {
            return Answer::error(400, &e.to_string());
        }
        match self.app_def(app).await {
            Ok(Some(_)) => {}
            Ok(None) => return Answer::error(404, &format!("no app named {app:?}")),
            Err(e) => return Answer::from_op(e),
        }
        let caller: String = caller.chars().take(128).collect();
        let ring = NodeId::for_key(app, key);
        self.app_call(
            ring,
            AppCall::Event {
                app: app.to_string(),
                key: key.to_string(),
                op,
                caller,
            },
        )
        .await
    }

    /// The handler slot of an app, built (or rebuilt for a new revision)
    /// on first use.
    async fn slot(self: &Arc<Self>, def: &Arc<AppDef>) -> Result<Arc<Slot>, Answer> {
        if let Some(s) = lock(&self.apps.slots).get(&def.name) {
            if s.def.revision == def.revision && s.def.owner == def.owner {
                return Ok(s.clone());
            }
        }
        let (name, src, limits) = (def.name.clone(), def.handler_source(), def.limits());
        let rt = smol::unblock(move || AppRuntime::new(&name, &src, limits))
            .await
            .map_err(|e| {
                tracing::error!(app = %def.name, "handler does not load: {e}");
                Answer::error(500, &e.to_string())
            })?;
        let slot = Arc::new(Slot {
            def: def.clone(),
            has_timer: rt.defines(EventKind::Timer),
            rt: Arc::new(smol::lock::Mutex::new(rt)),
            touched: Mutex::new(HashSet::new()),
        });
        lock(&self.apps.slots).insert(def.name.clone(), slot.clone());
        Ok(slot)
    }

    /// The vnode of this node closest to `ring`, if this node is its root.
    pub(crate) fn root_vnode(&self, ring: NodeId) -> Option<NodeId> {
        let c = self.lock();
        let v = c.nearest_vnode(ring)?;
        let p = c.vnodes.get(&v)?;
        (p.joined() && p.is_root(ring)).then_some(v)
    }

    /// Replication factor of a stored key: what its live copy here says,
    /// else the app's.
    fn key_k(&self, app: &str, key: &str, default: u8) -> u8 {
        match self.db.get(app, key) {
            Ok(Some(e)) if !e.deleted => e.k,
            _ => default,
        }
    }

    /// Picks up the key's policy checkpoint the first time this node
    /// handles the key.
    async fn restore(self: &Arc<Self>, slot: &Arc<Slot>, key: &AppKey) {
        let name = key.to_string();
        if !lock(&slot.touched).insert(name.clone()) {
            return;
        }
        let k = slot.def.replicas.max(self.registry_k());
        match self.get_k(STATE_BUCKET, &name, k).await {
            Ok(Some(v)) => match serde_json::from_slice::<Json>(&v.value) {
                Ok(st) => {
                    let mut rt = slot.rt.lock().await;
                    if !rt.has_state(key) {
                        match rt.restore_state(key, st) {
                            Ok(()) => tracing::debug!(key = %name, "policy state restored"),
                            Err(e) => tracing::warn!(key = %name, "policy checkpoint refused: {e}"),
                        }
                    }
                }
                Err(e) => tracing::warn!(key = %name, "unreadable policy checkpoint: {e}"),
            },
            Ok(None) => {}
            Err(e) => {
                // try again on the next event
                lock(&slot.touched).remove(&name);
                tracing::warn!(key = %name, "reading the policy checkpoint: {e}");
            }
        }
    }

    /// Runs one callback on the blocking pool and counts it.
    async fn run_handler(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        vnode: NodeId,
        event: Event,
        ctx: CallCtx,
    ) -> Result<Outcome, HandlerError> {
        let kind = event.kind();
        let host: Arc<dyn SysHost> = Arc::new(NodeHost {
            node: self.clone(),
            vnode,
            app: slot.def.name.clone(),
            k: slot.def.replicas,
            scale: slot.def.clock_scale,
            reads_refused: None,
        });
        let guard = slot.rt.lock_arc().await;
        let t0 = Instant::now();
        let res = smol::unblock(move || {
            let mut rt = guard;
            futures_lite::future::block_on(rt.call(event, ctx, host))
        })
        .await;
        let c = self.apps.counters(&slot.def.name);
        c.calls.fetch_add(1, Relaxed);
        c.events.inc(kind.name());
        c.latency.record_us(t0.elapsed().as_micros() as u64);
        if let Err(e) = &res {
            c.errors.fetch_add(1, Relaxed);
            tracing::warn!(app = %slot.def.name, key = %kind.name(), "handler {} failed: {e}", kind.callback());
        }
        for l in res.as_ref().map(|o| o.logs.as_slice()).unwrap_or(&[]) {
            tracing::info!(app = %slot.def.name, "handler: {l}");
        }
        res
    }

    async fn serve_event(
        self: &Arc<Self>,
        app: &str,
        key: &str,
        op: KeyOp,
        caller: &str,
    ) -> Answer {
        let def = match self.app_def(app).await {
            Ok(Some(d)) => d,
            Ok(None) => return Answer::error(404, &format!("no app named {app:?}")),
            Err(e) => return Answer::from_op(e),
        };
        let slot = match self.slot(&def).await {
            Ok(s) => s,
            Err(a) => return a,
        };
        let ring = NodeId::for_key(app, key);
        let vnode = self
            .root_vnode(ring)
            .or_else(|| self.identity_vnodes.first().copied())
            .unwrap_or(ring);
        let akey = AppKey::new(app, key);
        let key_lock = self.apps.key_lock(app, key);
        let _one_event_per_key = key_lock.lock().await;
        self.restore(&slot, &akey).await;
        let k = self.key_k(app, key, def.replicas);
        if op == KeyOp::Delete {
            return match self.put_k(app, key, None, k).await {
                Ok(version) => {
                    let name = akey.to_string();
                    let _ = self
                        .put_k(
                            STATE_BUCKET,
                            &name,
                            None,
                            def.replicas.max(self.registry_k()),
                        )
                        .await;
                    slot.rt.lock().await.forget(&akey);
                    lock(&slot.touched).remove(&name);
                    Answer::ok(
                        &json!({ "bucket": app, "key": key, "deleted": true, "version": version }),
                    )
                }
                Err(e) => Answer::from_op(e),
            };
        }
        let current = match self.get_k(app, key, k).await {
            Ok(v) => v,
            Err(e) => return Answer::from_op(e),
        };
        let data = match &current {
            Some(v) => match parse_stored(app, key, &v.value) {
                Ok(j) => Some(j),
                Err(a) => return a,
            },
            None => None,
        };
        let holders = {
            let c = self.lock();
            c.placement(ring, k as usize)
                .into_iter()
                .map(|h| h.id)
                .collect()
        };
        let (event, ctx_data, is_write) = match op {
            KeyOp::Read { args } => match serde_json::from_str::<Json>(&args) {
                Ok(a) => (Event::Read { args: a }, data.clone(), false),
                Err(e) => return Answer::error(400, &format!("args are not JSON: {e}")),
            },
            KeyOp::Write { value } => match serde_json::from_str::<Json>(&value) {
                Ok(v) if data.is_none() => (Event::Create, Some(v), true),
                Ok(v) => (Event::Update { new_data: v }, data.clone(), true),
                Err(e) => return Answer::error(400, &format!("value is not JSON: {e}")),
            },
            KeyOp::Delete => return Answer::error(500, "unreachable"),
        };
        let kind = event.kind();
        let ctx = CallCtx {
            key: akey.clone(),
            caller: caller.to_string(),
            data: ctx_data,
            holders,
        };
        let out = match self.run_handler(&slot, vnode, event, ctx).await {
            Ok(o) => o,
            Err(e) => {
                return Answer {
                    status: handler_status(&e),
                    body: json!({
                        "error": e.to_string(),
                        "app": app,
                        "key": key,
                        "event": kind.name(),
                    })
                    .to_string(),
                }
            }
        };
        if is_write {
            let mut version = current.as_ref().map(|v| v.version);
            let stored = out.result.is_some();
            if let Some(v) = &out.result {
                match self.put_k(app, key, Some(to_bytes(v)), k).await {
                    Ok(ver) => version = Some(ver),
                    Err(e) => return Answer::from_op(e),
                }
            }
            let now_stored = if stored { out.result.clone() } else { data };
            self.apply_effects(&def, &akey, now_stored.as_ref(), out.effects)
                .await;
            Answer::ok(&json!({
                "bucket": app,
                "key": key,
                "event": kind.name(),
                "stored": stored,
                "version": version,
            }))
        } else {
            self.apply_effects(&def, &akey, data.as_ref(), out.effects)
                .await;
            match out.result {
                Some(v) => Answer::ok(&v),
                None => Answer::error(404, &format!("no such key: {key}")),
            }
        }
    }

    /// Carries out a successful call's effects, in order. The call's result
    /// is stored already, so a failed effect is logged and counted, not
    /// reported to the caller.
    async fn apply_effects(
        self: &Arc<Self>,
        def: &Arc<AppDef>,
        own: &AppKey,
        stored: Option<&Json>,
        effects: Vec<Effect>,
    ) {
        let c = self.apps.counters(&def.name);
        for e in effects {
            let kind = e.name();
            c.effects.inc(kind);
            if let Err(err) = self.apply_effect(def, own, stored, e).await {
                c.effect_errors.fetch_add(1, Relaxed);
                tracing::warn!(app = %def.name, key = %own, "effect {kind} failed: {err}");
            }
        }
    }

    async fn apply_effect(
        self: &Arc<Self>,
        def: &Arc<AppDef>,
        own: &AppKey,
        stored: Option<&Json>,
        e: Effect,
    ) -> Result<(), String> {
        match e {
            Effect::Write { node, key, value } => {
                // Copies go where the store places them (the key's root and
                // its closest leaf-set members): a copy of the call's own
                // result "on node n" is already there.
                if node.is_some() && &key == own && Some(&value) == stored {
                    return Ok(());
                }
                let k = self.key_k(&key.app, &key.name, def.replicas);
                self.put_k(&key.app, &key.name, Some(to_bytes(&value)), k)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Effect::Delete { key } => {
                let k = self.key_k(&key.app, &key.name, def.replicas);
                self.put_k(&key.app, &key.name, None, k)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Effect::DeployContainer { key } => match self.apps.functions.get() {
                Some(f) => f.deploy(&key.app, &key.name).await,
                None => Err("functions unavailable: no function host on this node".into()),
            },
            Effect::DeleteContainer { key } => match self.apps.functions.get() {
                Some(f) => f.undeploy(&key.app, &key.name).await,
                None => Err("functions unavailable: no function host on this node".into()),
            },
            Effect::Publish { key, value } => {
                let ring = key.ring_id();
                let text = value.to_string();
                if text.len() > crate::overlay::scribe::MAX_DATA {
                    return Err(format!("publication of {} bytes is too large", text.len()));
                }
                if self.root_vnode(ring).is_some() {
                    self.publish_local(ring, text.into_bytes());
                    Ok(())
                } else {
                    let a = self
                        .app_call(
                            ring,
                            AppCall::Publish {
                                app: key.app,
                                key: key.name,
                                value: text,
                            },
                        )
                        .await;
                    if a.is_ok() {
                        Ok(())
                    } else {
                        Err(a.message())
                    }
                }
            }
            // The subscribing node joins the key's tree itself (its read
            // carrying {subscribe = true} is what the policy saw).
            Effect::Subscribe { key, subscriber } | Effect::Unsubscribe { key, subscriber } => {
                tracing::debug!(key = %key, subscriber = %subscriber, "subscription noted");
                Ok(())
            }
            Effect::SetReplicas { key, n } => {
                let n = n.clamp(1, crate::store::entry::MAX_K as u32) as u8;
                let value = if &key == own {
                    stored.map(to_bytes)
                } else {
                    let k = self.key_k(&key.app, &key.name, def.replicas);
                    self.get_k(&key.app, &key.name, k)
                        .await
                        .map_err(|e| e.to_string())?
                        .map(|v| v.value)
                };
                let Some(value) = value else {
                    return Ok(());
                };
                if self.key_k(&key.app, &key.name, def.replicas) == n {
                    return Ok(());
                }
                tracing::info!(key = %key, replicas = n, "replication factor changed by the handler");
                self.put_k(&key.app, &key.name, Some(value), n)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// `GET /api/apps/{app}/state/{key}` at the key's root.
    async fn serve_state(self: &Arc<Self>, app: &str, key: &str) -> Answer {
        let def = match self.app_def(app).await {
            Ok(Some(d)) => d,
            Ok(None) => return Answer::error(404, &format!("no app named {app:?}")),
            Err(e) => return Answer::from_op(e),
        };
        let slot = match self.slot(&def).await {
            Ok(s) => s,
            Err(a) => return a,
        };
        let akey = AppKey::new(app, key);
        self.restore(&slot, &akey).await;
        let st = slot.rt.lock().await.export_state(&akey);
        match st {
            Ok(s) => Answer::ok(&json!({
                "app": app,
                "key": key,
                "root": self.name,
                "state": s,
            })),
            Err(e) => Answer::error(500, &e.to_string()),
        }
    }

    // ---- timers -----------------------------------------------------------

    /// Fires due timers: for every app with a `timerCb` whose bucket this
    /// node holds, on each key this node is root of. Called by the apps
    /// loop; a pass of one app runs on its own task.
    pub(crate) async fn fire_timers(self: &Arc<Self>) {
        let Ok(buckets) = self.db.buckets() else {
            return;
        };
        for b in buckets {
            if b.starts_with('_') || check_app_name(&b).is_err() {
                continue;
            }
            let due = {
                let t = lock(&self.apps.timers);
                t.get(&b)
                    .is_none_or(|s| !s.running && s.next.is_none_or(|n| Instant::now() >= n))
            };
            if !due {
                continue;
            }
            let missed = lock(&self.apps.scan_misses)
                .get(&b)
                .is_some_and(|t| t.elapsed() < NO_APP_TTL);
            if missed {
                continue;
            }
            let def = match self.app_def_quiet(&b).await {
                Ok(Some(d)) => d,
                Ok(None) => {
                    // removed (or never an app): drop what we held for it
                    lock(&self.apps.slots).remove(&b);
                    let mut m = lock(&self.apps.scan_misses);
                    if m.len() >= 4096 {
                        m.clear();
                    }
                    m.insert(b.clone(), Instant::now());
                    continue;
                }
                Err(_) => continue,
            };
            let slot = match self.slot(&def).await {
                Ok(s) => s,
                Err(_) => {
                    self.schedule(&b, Duration::from_millis(def.timer_interval_ms));
                    continue;
                }
            };
            {
                let mut t = lock(&self.apps.timers);
                let s = t.entry(b.clone()).or_default();
                if s.next.is_none() {
                    // the first pass waits one interval, like every other
                    s.next = Some(Instant::now() + Duration::from_millis(def.timer_interval_ms));
                    continue;
                }
                s.running = true;
                s.next = Some(Instant::now() + Duration::from_millis(def.timer_interval_ms));
            }
            let node = self.clone();
            smol::spawn(async move {
                node.timer_pass(&slot).await;
                if let Some(s) = lock(&node.apps.timers).get_mut(&slot.def.name) {
                    s.running = false;
                }
            })
            .detach();
        }
    }

    fn schedule(&self, app: &str, after: Duration) {
        let mut t = lock(&self.apps.timers);
        let s = t.entry(app.to_string()).or_default();
        s.next = Some(Instant::now() + after);
    }

    async fn timer_pass(self: &Arc<Self>, slot: &Arc<Slot>) {
        let app = slot.def.name.clone();
        // live state of keys this node is no longer root of goes
        let touched: Vec<String> = lock(&slot.touched).iter().cloned().collect();
        for name in touched {
            let Ok(k) = AppKey::parse(&app, &name) else {
                continue;
            };
            if self.root_vnode(k.ring_id()).is_none() {
                slot.rt.lock().await.forget(&k);
                lock(&slot.touched).remove(&name);
            }
        }
        if !slot.has_timer {
            return;
        }
        let mut after: Option<(NodeId, String)> = None;
        loop {
            let page = match self
                .db
                .scan(&app, after.as_ref().map(|(r, k)| (*r, k.as_str())), 256)
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(app = %app, "timer scan: {e}");
                    return;
                }
            };
            let last = page.len() < 256;
            for (key, entry) in &page {
                after = Some((NodeId::for_key(&app, key), key.clone()));
                if entry.deleted || self.stopping.load(Relaxed) {
                    continue;
                }
                if let Some(v) = self.root_vnode(NodeId::for_key(&app, key)) {
                    self.fire_timer(slot, v, key).await;
                }
            }
            if last {
                return;
            }
        }
    }

    async fn fire_timer(self: &Arc<Self>, slot: &Arc<Slot>, vnode: NodeId, key: &str) {
        let def = &slot.def;
        let app = def.name.as_str();
        let akey = AppKey::new(app, key);
        let key_lock = self.apps.key_lock(app, key);
        let _one_event_per_key = key_lock.lock().await;
        self.restore(slot, &akey).await;
        // The root's own copy: timers need no round trip to the replicas.
        let (data, k) = match self.db.get(app, key) {
            Ok(Some(e)) if !e.deleted => match serde_json::from_slice::<Json>(&e.value) {
                Ok(j) => (Some(j), e.k),
                Err(_) => return,
            },
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(key = %akey, "timer skipped: {e}");
                return;
            }
        };
        let holders = {
            let c = self.lock();
            c.placement(akey.ring_id(), k as usize)
                .into_iter()
                .map(|h| h.id)
                .collect()
        };
        let ctx = CallCtx {
            key: akey.clone(),
            caller: String::new(),
            data: data.clone(),
            holders,
        };
        let Ok(out) = self.run_handler(slot, vnode, Event::Timer, ctx).await else {
            return;
        };
        if let Some(st) = &out.state {
            let sk = def.replicas.max(self.registry_k());
            let name = akey.to_string();
            if crate::store::entry::check_key(&name).is_ok() {
                if let Err(e) = self
                    .put_k(STATE_BUCKET, &name, Some(to_bytes(st)), sk)
                    .await
                {
                    tracing::warn!(key = %akey, "storing the policy checkpoint: {e}");
                }
            }
        }
        self.apply_effects(def, &akey, data.as_ref(), out.effects)
            .await;
    }

    /// The apps' background work: timers, tree maintenance, SSE upkeep.
    pub async fn apps_loop(self: Arc<Self>) {
        let mut t = smol::Timer::interval(Duration::from_millis(50));
        let mut n = 0u64;
        loop {
            futures_lite::StreamExt::next(&mut t).await;
            if self.stopping.load(Relaxed) {
                return;
            }
            n += 1;
            if n % 10 == 0 {
                self.pubsub_tick();
            }
            if self.joined() {
                self.fire_timers().await;
            }
        }
    }

    /// `apps` of `/api/status`: what this node ran as a root.
    pub fn apps_status(&self) -> Json {
        let list: Vec<Json> = self
            .apps
            .all_counters()
            .into_iter()
            .map(|(name, c)| {
                json!({
                    "name": name,
                    "calls": c.calls.load(Relaxed),
                    "errors": c.errors.load(Relaxed),
                    "p50_us": c.latency.quantile_us(0.5),
                    "p99_us": c.latency.quantile_us(0.99),
                    "events": c.events.snapshot().into_iter().collect::<BTreeMap<_, _>>(),
                    "effects": c.effects.snapshot().into_iter().collect::<BTreeMap<_, _>>(),
                    "effect_errors": c.effect_errors.load(Relaxed),
                })
            })
            .collect();
        json!(list)
    }

    /// Handler and pub/sub lines of `/metrics`.
    pub fn apps_metrics(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let counters = self.apps.all_counters();
        let esc = super::metrics::escape_label;
        let _ = writeln!(o, "# HELP capy_handler_runs_total Handler callbacks run on this node.\n# TYPE capy_handler_runs_total counter");
        for (app, c) in &counters {
            for (ev, v) in c.events.snapshot() {
                let _ = writeln!(
                    o,
                    "capy_handler_runs_total{{app=\"{}\",event=\"{}\"}} {v}",
                    esc(app),
                    esc(&ev)
                );
            }
        }
        let _ = writeln!(o, "# HELP capy_handler_errors_total Handler callbacks that failed.\n# TYPE capy_handler_errors_total counter");
        for (app, c) in &counters {
            let _ = writeln!(
                o,
                "capy_handler_errors_total{{app=\"{}\"}} {}",
                esc(app),
                c.errors.load(Relaxed)
            );
        }
        let _ = writeln!(o, "# HELP capy_handler_effects_total Handler effects applied (or attempted).\n# TYPE capy_handler_effects_total counter");
        for (app, c) in &counters {
            for (e, v) in c.effects.snapshot() {
                let _ = writeln!(
                    o,
                    "capy_handler_effects_total{{app=\"{}\",effect=\"{}\"}} {v}",
                    esc(app),
                    esc(&e)
                );
            }
        }
        // A histogram family without samples is one a scraper may refuse.
        if !counters.is_empty() {
            let _ = writeln!(o, "# HELP capy_handler_latency_seconds Handler callback run time (remote reads included).\n# TYPE capy_handler_latency_seconds histogram");
        }
        for (app, c) in &counters {
            c.latency.render(
                &mut o,
                "capy_handler_latency_seconds",
                &format!("app=\"{}\"", esc(app)),
            );
        }
        o.push_str(&self.pubsub_metrics());
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AppSpec {
        AppSpec {
            name: "sensors".into(),
            owner: "alice".into(),
            policy: Some("subscription".into()),
            ..AppSpec::default()
        }
    }

    #[test]
    fn specs_are_checked() {
        assert!(spec().validate().is_ok());
        let bad = |f: &dyn Fn(&mut AppSpec), want: &str| {
            let mut s = spec();
            f(&mut s);
            let e = s.validate().unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        };
        bad(&|s| s.name = "_apps".into(), "reserved");
        bad(&|s| s.name = "a/b".into(), "app name");
        bad(&|s| s.owner.clear(), "owner");
        bad(&|s| s.replicas = Some(9), "replicas = 9");
        bad(&|s| s.policy = Some("nope".into()), "no shipped policy");
        bad(&|s| s.source = Some("x".into()), "not both");
        bad(&|s| s.policy = None, "no handler");
        bad(&|s| s.timer_interval_ms = Some(5), "timer_interval_ms");
        bad(&|s| s.clock_scale = Some(0), "clock_scale");
        bad(&|s| s.limits.memory_bytes = Some(1), "memory_bytes");
    }

    #[test]
    fn definitions_keep_salt_and_owner() {
        let d1 = spec().to_def(None, 5).unwrap();
        assert_eq!(d1.revision, 1);
        assert_eq!(d1.replicas, 3);
        assert_eq!(d1.app_id, app_id("sensors", "alice", &d1.salt));
        assert_eq!(d1.app_id.len(), 40);
        // re-registration keeps the salt, so the AppId stays
        let d2 = spec().to_def(Some(&d1), 6).unwrap();
        assert_eq!(
            (d2.salt.clone(), d2.app_id.clone(), d2.revision),
            (d1.salt.clone(), d1.app_id.clone(), 2)
        );
        // another owner may not take the name
        let mut other = spec();
        other.owner = "mallory".into();
        let a = other.to_def(Some(&d1), 7).unwrap_err();
        assert_eq!(a.status, 409);
        // a different salt is a different app id
        let mut salted = spec();
        salted.salt = Some("pepper".into());
        assert_ne!(salted.to_def(None, 0).unwrap().app_id, d1.app_id);
        // the stored form reads back
        let text = serde_json::to_vec(&d1).unwrap();
        assert_eq!(serde_json::from_slice::<AppDef>(&text).unwrap(), d1);
        // and crosses the wire inside a call
        let call = AppCall::Register(spec());
        let bytes = postcard::to_allocvec(&call).unwrap();
        assert_eq!(postcard::from_bytes::<AppCall>(&bytes).unwrap(), call);
    }

    #[test]
    fn the_handler_clock_speeds_up_from_its_base() {
        let real = wall_us();
        let t1 = handler_now(1);
        assert!(t1 >= real && t1 - real < 1_000_000);
        let fast = handler_now(600);
        let expect = CLOCK_BASE + (real - CLOCK_BASE) * 600;
        assert!(fast >= expect, "{fast} < {expect}");
        assert!(fast - expect < 600 * 1_000_000);
    }
}

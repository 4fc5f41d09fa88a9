//! Objects in the running node: packages, objects, invocations and blobs
//! on top of the store, `calls` and the containers layer.
//!
//! Where things live (store buckets, all refused by `/api/kv`):
//! - `capy.pkg`: one key per package (the validated, resolved package and
//!   its source) and `_index`, the list of package names. Deploys and
//!   removals run at the root of `_index`, one at a time.
//! - `capy.obj`: one key per object id: the whole [`ObjectRecord`] (state,
//!   blob pointers, invocation log, sequencer, applied offset), so one
//!   store write commits a call's effect together with its offset.
//! - `capy.blob`: `OBJECT/BLOB/VERSION`, one value per blob version (at
//!   most the store's value size).
//! - `capy.sys`: `presign-key`, the cluster's key for presigned URLs.
//! - `capy.img`: TASK image archives a package uploaded: `PKG/IMAGE` is a
//!   manifest (SHA-256, size, pieces), written after the 1 MiB pieces
//!   `PKG/IMAGE/SHA/i`, so a half-done upload is never used. A TASK whose
//!   `image` has no manifest is taken as an image reference podman knows.
//!   TASK containers run on the node's one function host (`functions`):
//!   one pool, one set of limits and keep-alive, one status view.
//!
//! Object ids are 32 hex digits. Placement follows the class's `locality`:
//! `spread` (default) draws ids at random, so objects spread evenly over
//! the ring; `class` draws ids until the object's ring position shares its
//! first 12 bits with the class's own key (`PKG.CLASS`), so all objects of
//! the class fall in one 1/4096 arc of the ring: on one root and its leaf
//! set in fleets of up to a few hundred vnodes (4,096 draws, one SHA-1
//! each, per new object on average: calculated, not measured).
//!
//! Every call to an object is routed to the root of its key. There, one
//! worker task per object (created on demand, gone after 30 s idle) takes
//! calls in arrival order and runs them one at a time against a working
//! copy of the record; calls that arrive together are committed with one
//! store write (group commit) and answered only after it: the per-object
//! FIFO with no cluster-wide lock. Async calls are sequenced into the
//! record's log and acknowledged once that is committed; the worker
//! applies them in order, moving the offset in the same write as the state.
//! After a crash, the next root loads the newest copy among the replicas
//! and goes on with the log. TASK functions run in a container on the
//! root; MACRO calls are orchestrated at the root outside the queue (their
//! steps are ordinary calls on their objects, so a step on the calling
//! object queues behind nothing it waits for).
//!
//! The presigned-URL key is created once per cluster by the root of
//! `capy.sys/presign-key` and fetched by every node from there, so any
//! node verifies URLs any other node signed. It is as secret as the store:
//! keep the node's main HTTP API on a trusted interface; `--blob-http`
//! opens a listener that serves presigned URLs only.

use super::calls::Call;
use super::runtime::{Node, OpError};
use super::wall_ms;
use crate::containers::{FnError, FnSpec};
use crate::http::{self, Resp};
use crate::id::NodeId;
use crate::objects::presign::is_object_id;
use crate::objects::{
    package::BUILTINS, BlobMethod, BlobRef, Body, Caller, Class, Effect, Function, Grant,
    InvStatus, Level, Locality, Macro, MacroRun, ObjectRecord, Package, Refusal, Signer,
    StepResult, Task,
};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const OBJ_BUCKET: &str = "capy.obj";
pub const PKG_BUCKET: &str = "capy.pkg";
pub const BLOB_BUCKET: &str = "capy.blob";
pub const SYS_BUCKET: &str = "capy.sys";
pub const IMG_BUCKET: &str = "capy.img";
const PKG_INDEX: &str = "_index";
/// Image archives are stored in pieces of this size.
const IMG_CHUNK: usize = 1 << 20;
/// Largest image archive a package may upload.
pub const MAX_IMAGE: usize = 64 << 20;
const PRESIGN_KEY: &str = "presign-key";
/// Ring bits an object of a `locality: class` class shares with its class.
pub const LOCALITY_BITS: u32 = 12;
/// Calls one worker takes (and commits) together.
const MAX_BATCH: usize = 256;
/// A worker with nothing to do for this long stops.
const IDLE: Duration = Duration::from_secs(30);
/// Largest arguments / state / answer carried in one call.
const MAX_JSON: usize = 1 << 20;
/// Package cache lifetime on a node.
const PKG_TTL: Duration = Duration::from_secs(2);
/// Longest a call waits (TASK timeouts are at most 300 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(330);
/// Longest wait for any other call.
const SHORT_TIMEOUT: Duration = Duration::from_secs(15);
/// Retry of a log entry whose function was unavailable.
const RETRY: Duration = Duration::from_secs(1);

// ---- calls between nodes ------------------------------------------------

/// Object requests between nodes (`Call::Obj`). JSON travels as text:
/// postcard cannot carry self-describing values.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ObjCall {
    Deploy {
        file: String,
        text: String,
    },
    RemovePkg {
        name: String,
    },
    ListPkgs,
    New {
        id: String,
        pkg: String,
        class: String,
        state: String,
        caller: Caller,
        created_by: Option<String>,
    },
    Get {
        id: String,
        caller: Caller,
    },
    Invoke {
        id: String,
        function: String,
        args: String,
        caller: Caller,
        asynchronous: bool,
        output_id: Option<String>,
    },
    Status {
        id: String,
        seq: u64,
    },
    CommitBlob {
        id: String,
        blob: String,
        version: u64,
        size: u64,
        caller: Caller,
    },
    Secret,
}

/// The answer to an [`ObjCall`]: an HTTP status and a JSON body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    fn json(status: StatusCode, v: &Value) -> Answer {
        Answer {
            status: status.as_u16(),
            body: v.to_string(),
        }
    }
    fn ok(v: Value) -> Answer {
        Self::json(StatusCode::OK, &v)
    }
    pub(super) fn err(status: StatusCode, msg: impl std::fmt::Display) -> Answer {
        Self::json(status, &json!({ "error": msg.to_string() }))
    }
    fn is_ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
    fn value(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn message(&self) -> String {
        match self.value().get("error").and_then(Value::as_str) {
            Some(s) => s.to_string(),
            None => self.body.chars().take(300).collect(),
        }
    }
    fn from_op(e: OpError) -> Answer {
        Answer::err(e.status(), e)
    }
    fn from_refusal(r: Refusal) -> Answer {
        let status = match r {
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::Invalid(_) => StatusCode::BAD_REQUEST,
            Refusal::NotFound(_) => StatusCode::NOT_FOUND,
        };
        Answer::err(status, r)
    }
}

pub(super) fn ring(id: &str) -> NodeId {
    NodeId::for_key(OBJ_BUCKET, id)
}

fn blob_key(id: &str, blob: &str, version: u64) -> String {
    format!("{id}/{blob}/{version}")
}

/// A new object id for `class` of `pkg` under its locality setting.
pub fn new_object_id(pkg: &str, class: &str, locality: Locality) -> String {
    let draw = || format!("{:032x}", rand::random::<u128>());
    if locality == Locality::Spread {
        return draw();
    }
    let shift = 128 - LOCALITY_BITS;
    let want = NodeId::for_key(OBJ_BUCKET, &format!("{pkg}.{class}")).0 >> shift;
    loop {
        let id = draw();
        if ring(&id).0 >> shift == want {
            return id;
        }
    }
}

impl Node {
    /// Sends an object call to the root of `key` and returns its answer.
    async fn obj_call(self: &Arc<Self>, key: NodeId, call: ObjCall) -> Answer {
        // Only a synchronous function call may take long; anything else
        // that gets no answer soon met a failed root.
        let timeout = match &call {
            ObjCall::Invoke {
                asynchronous: false,
                ..
            } => CALL_TIMEOUT,
            _ => SHORT_TIMEOUT,
        };
        match self.call_root(key, Call::Obj(call), timeout).await {
            Ok(bytes) => match postcard::from_bytes::<Answer>(&bytes) {
                Ok(a) => a,
                Err(e) => Answer::err(StatusCode::BAD_GATEWAY, format!("undecodable answer: {e}")),
            },
            Err(e) => Answer::from_op(e),
        }
    }
}

// ---- per-node state -------------------------------------------------------

type Tx = async_channel::Sender<Reply>;

enum Reply {
    Answer(Answer),
    /// Run this MACRO outside the object's queue.
    Macro {
        pkg: Arc<Package>,
        class: String,
        defined_in: String,
        m: Macro,
        args: Value,
    },
}

enum Job {
    Create {
        pkg: String,
        class: String,
        state: Value,
        caller: Caller,
        created_by: Option<String>,
        reply: Tx,
    },
    Get {
        caller: Caller,
        reply: Tx,
    },
    Invoke {
        function: String,
        args: Value,
        caller: Caller,
        asynchronous: bool,
        output_id: Option<String>,
        reply: Tx,
    },
    Status {
        seq: u64,
        reply: Tx,
    },
    CommitBlob {
        blob: String,
        version: u64,
        size: u64,
        caller: Caller,
        reply: Tx,
    },
    /// Go on with the log (after a transient failure).
    Kick,
}

impl Job {
    fn reply(&self) -> Option<&Tx> {
        match self {
            Job::Create { reply, .. }
            | Job::Get { reply, .. }
            | Job::Invoke { reply, .. }
            | Job::Status { reply, .. }
            | Job::CommitBlob { reply, .. } => Some(reply),
            Job::Kick => None,
        }
    }
}

/// Counters for `/api/status` and the bench.
#[derive(Default)]
pub struct ObjStats {
    pub calls: AtomicU64,
    pub batches: AtomicU64,
    pub commits: AtomicU64,
    pub task_calls: AtomicU64,
}

#[derive(Default)]
pub struct Objects {
    actors: Mutex<HashMap<String, async_channel::Sender<Job>>>,
    pkgs: Mutex<HashMap<String, (Arc<Package>, Instant)>>,
    signer: Mutex<Option<(Signer, Instant)>>,
    /// Serialises deploys at the package index's root and the key
    /// creation at the key's root.
    admin: smol::lock::Mutex<()>,
    pub stats: ObjStats,
    /// Loaded class handlers.
    pub(super) handlers: super::obj_handlers::ClassHandlers,
}

/// The `objects` part of `/api/status`.
pub fn status(node: &Node) -> Value {
    let s = &node.objects.stats;
    let workers = node.objects.actors.lock().map(|a| a.len()).unwrap_or(0);
    json!({
        "calls": s.calls.load(Ordering::Relaxed),
        "batches": s.batches.load(Ordering::Relaxed),
        "commits": s.commits.load(Ordering::Relaxed),
        "task_calls": s.task_calls.load(Ordering::Relaxed),
        "active_objects": workers,
    })
}

/// Starts what objects need beside the main HTTP server: the blob listener.
pub async fn start(node: &Arc<Node>) -> Result<(), String> {
    if let Some(addr) = node.cfg.blob_http {
        let l = smol::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("binding the blob listener on {addr}: {e}"))?;
        let bound = l.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(addr = %bound, "presigned blob URLs served");
        let h: Arc<dyn http::Handler> = Arc::new(BlobsOnly(node.clone()));
        smol::spawn(async move {
            if let Err(e) = http::serve(l, h).await {
                tracing::error!("blob listener stopped: {e}");
            }
        })
        .detach();
    }
    Ok(())
}

struct BlobsOnly(Arc<Node>);

impl http::Handler for BlobsOnly {
    fn call(&self, req: Request<Incoming>, _peer: std::net::SocketAddr) -> http::BoxFuture<Resp> {
        let node = self.0.clone();
        Box::pin(async move {
            if req
                .uri()
                .path()
                .starts_with(crate::objects::presign::PREFIX)
            {
                presigned(node, req).await
            } else {
                http::error(
                    StatusCode::NOT_FOUND,
                    "this listener serves presigned blob URLs only",
                )
            }
        })
    }
}

// ---- serving calls at a root ----------------------------------------------

/// Answers an object call at this node (the root of its key).
pub(crate) async fn serve(node: &Arc<Node>, call: ObjCall) -> Vec<u8> {
    node.objects.stats.calls.fetch_add(1, Ordering::Relaxed);
    let a = serve_inner(node, call).await;
    postcard::to_allocvec(&a).unwrap_or_default()
}

fn parse_json(text: &str, what: &str) -> Result<Value, Answer> {
    if text.len() > MAX_JSON {
        return Err(Answer::err(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{what} larger than {MAX_JSON} bytes"),
        ));
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text)
        .map_err(|e| Answer::err(StatusCode::BAD_REQUEST, format!("{what} is not JSON: {e}")))
}

async fn serve_inner(node: &Arc<Node>, call: ObjCall) -> Answer {
    match call {
        ObjCall::Deploy { file, text } => deploy(node, &file, &text).await,
        ObjCall::RemovePkg { name } => remove_pkg(node, &name).await,
        ObjCall::ListPkgs => list_pkgs(node).await,
        ObjCall::Secret => match root_secret(node).await {
            Ok(k) => Answer::ok(json!({ "key": hex::encode(k) })),
            Err(e) => Answer::err(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        ObjCall::New {
            id,
            pkg,
            class,
            state,
            caller,
            created_by,
        } => {
            let state = match parse_json(&state, "the state") {
                Ok(s) => s,
                Err(a) => return a,
            };
            ask(node, &id, |reply| Job::Create {
                pkg: pkg.clone(),
                class: class.clone(),
                state: state.clone(),
                caller: caller.clone(),
                created_by: created_by.clone(),
                reply,
            })
            .await
        }
        ObjCall::Get { id, caller } => {
            ask(node, &id, |reply| Job::Get {
                caller: caller.clone(),
                reply,
            })
            .await
        }
        ObjCall::Status { id, seq } => ask(node, &id, |reply| Job::Status { seq, reply }).await,
        ObjCall::CommitBlob {
            id,
            blob,
            version,
            size,
            caller,
        } => {
            ask(node, &id, |reply| Job::CommitBlob {
                blob: blob.clone(),
                version,
                size,
                caller: caller.clone(),
                reply,
            })
            .await
        }
        ObjCall::Invoke {
            id,
            function,
            args,
            caller,
            asynchronous,
            output_id,
        } => {
            let args = match parse_json(&args, "the arguments") {
                Ok(a) => a,
                Err(a) => return a,
            };
            let reply = ask_raw(node, &id, |reply| Job::Invoke {
                function: function.clone(),
                args: args.clone(),
                caller: caller.clone(),
                asynchronous,
                output_id: output_id.clone(),
                reply,
            })
            .await;
            match reply {
                Reply::Answer(a) => a,
                Reply::Macro {
                    pkg,
                    class,
                    defined_in,
                    m,
                    args,
                } => run_macro(node, &id, pkg, &class, &defined_in, m, args).await,
            }
        }
    }
}

async fn ask(node: &Arc<Node>, id: &str, job: impl Fn(Tx) -> Job) -> Answer {
    match ask_raw(node, id, job).await {
        Reply::Answer(a) => a,
        Reply::Macro { .. } => Answer::err(StatusCode::INTERNAL_SERVER_ERROR, "unexpected reply"),
    }
}

/// Queues a job on the object's worker (starting one if needed). A job
/// that meets a worker just stopping is sent again to a fresh one.
async fn ask_raw(node: &Arc<Node>, id: &str, job: impl Fn(Tx) -> Job) -> Reply {
    if !is_object_id(id) {
        return Reply::Answer(Answer::err(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not an object id (32 lowercase hex digits)"),
        ));
    }
    for _ in 0..3 {
        let (tx, rx) = async_channel::bounded(1);
        let sender = {
            let mut actors = node
                .objects
                .actors
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match actors.get(id) {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let (s, r) = async_channel::unbounded();
                    actors.insert(id.to_string(), s.clone());
                    smol::spawn(worker(node.clone(), id.to_string(), r)).detach();
                    s
                }
            }
        };
        if sender.send(job(tx)).await.is_err() {
            continue;
        }
        if let Ok(r) = rx.recv().await {
            return r;
        }
    }
    Reply::Answer(Answer::err(
        StatusCode::SERVICE_UNAVAILABLE,
        "the object's worker stopped; try again",
    ))
}

fn answer(tx: &Tx, a: Answer) {
    let _ = tx.try_send(Reply::Answer(a));
}

/// The package `name`, from a short-lived cache.
async fn package(node: &Arc<Node>, name: &str) -> Result<Arc<Package>, Answer> {
    if let Some((p, at)) = node
        .objects
        .pkgs
        .lock()
        .ok()
        .and_then(|m| m.get(name).cloned())
    {
        if at.elapsed() < PKG_TTL {
            return Ok(p);
        }
    }
    let v = node
        .get(PKG_BUCKET, name)
        .await
        .map_err(Answer::from_op)?
        .ok_or_else(|| Answer::err(StatusCode::NOT_FOUND, format!("no package {name:?}")))?;
    let stored: StoredPkg = serde_json::from_slice(&v.value).map_err(|e| {
        Answer::err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored package {name} is unreadable: {e}"),
        )
    })?;
    let p = Arc::new(stored.package);
    if let Ok(mut m) = node.objects.pkgs.lock() {
        m.insert(name.to_string(), (p.clone(), Instant::now()));
    }
    Ok(p)
}

// ---- the per-object worker --------------------------------------------------

async fn worker(node: Arc<Node>, id: String, rx: async_channel::Receiver<Job>) {
    // The last committed record (None: not loaded yet), and the replica
    // set it was loaded under: a change means another root may have
    // written since, so load again.
    let mut committed: Option<Option<ObjectRecord>> = None;
    let mut placed: Vec<std::net::SocketAddr> = Vec::new();
    loop {
        let first = futures_lite::future::or(async { rx.recv().await.ok() }, async {
            smol::Timer::after(IDLE).await;
            None
        })
        .await;
        let Some(first) = first else {
            let mut actors = node
                .objects
                .actors
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if rx.is_empty() {
                actors.remove(&id);
                rx.close();
                drop(actors);
                // A job that slipped in after the check is dropped
                // unanswered: its sender then tries a fresh worker.
                while rx.try_recv().is_ok() {}
                return;
            }
            continue;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        node.objects.stats.batches.fetch_add(1, Ordering::Relaxed);
        let now_placed: Vec<std::net::SocketAddr> = node
            .lock()
            .placement(ring(&id), node.cfg.replicas)
            .iter()
            .map(|h| h.addr)
            .collect();
        if now_placed != placed {
            committed = None;
            placed = now_placed;
        }
        if committed.is_none() {
            match load(&node, &id).await {
                Ok(r) => committed = Some(r),
                Err(a) => {
                    for j in &batch {
                        if let Some(t) = j.reply() {
                            answer(t, a.clone());
                        }
                    }
                    continue;
                }
            }
        }
        let rec = committed.take().flatten();
        let mut b = Batch::new(&node, &id, rec);
        for job in batch {
            if b.failed {
                if let Some(t) = job.reply() {
                    answer(
                        t,
                        Answer::err(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the object's commit failed; try again",
                        ),
                    );
                }
                continue;
            }
            b.handle(job).await;
        }
        if !b.failed {
            b.drain_log().await;
            b.flush().await;
        }
        if b.retry_log {
            let node = node.clone();
            let id = id.clone();
            smol::spawn(async move {
                smol::Timer::after(RETRY).await;
                let sender = node
                    .objects
                    .actors
                    .lock()
                    .ok()
                    .and_then(|a| a.get(&id).cloned());
                if let Some(s) = sender {
                    let _ = s.send(Job::Kick).await;
                }
            })
            .detach();
        }
        // After a failed commit nobody knows what the store holds: load
        // the newest copy next time.
        committed = if b.failed { None } else { Some(b.committed) };
    }
}

/// The newest committed record among the replicas (None: no such object).
async fn load(node: &Arc<Node>, id: &str) -> Result<Option<ObjectRecord>, Answer> {
    // Not a lone copy: one that missed the last acknowledged write could
    // apply a logged call twice. `get_newest` fails only when no replica
    // answers at all; the caller then tries again.
    let v = node.get_newest(OBJ_BUCKET, id).await.map_err(|e| {
        Answer::err(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no replica of object {id} answered ({e}); try again"),
        )
    })?;
    match v {
        None => Ok(None),
        Some(v) => ObjectRecord::decode(&v.value)
            .map(Some)
            .map_err(|e| Answer::err(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}

/// Work after a commit (or after a failed call).
enum Cleanup {
    DeleteBlob(String),
}

struct Batch<'a> {
    node: &'a Arc<Node>,
    id: &'a str,
    committed: Option<ObjectRecord>,
    work: Option<ObjectRecord>,
    dirty: bool,
    /// Answers held until the next commit.
    waiting: Vec<(Tx, Answer)>,
    after_commit: Vec<Cleanup>,
    failed: bool,
    retry_log: bool,
}

impl<'a> Batch<'a> {
    fn new(node: &'a Arc<Node>, id: &'a str, rec: Option<ObjectRecord>) -> Batch<'a> {
        Batch {
            node,
            id,
            work: rec.clone(),
            committed: rec,
            dirty: false,
            waiting: Vec::new(),
            after_commit: Vec::new(),
            failed: false,
            retry_log: false,
        }
    }

    fn hold(&mut self, tx: Tx, a: Answer) {
        if self.dirty {
            self.waiting.push((tx, a));
        } else {
            answer(&tx, a);
        }
    }

    /// Commits the working copy if it changed, then sends the held answers.
    async fn flush(&mut self) {
        if self.dirty {
            let write = match &self.work {
                Some(w) => w.encode().map(Some),
                None => Ok(None),
            };
            let res = match write {
                Ok(v) => self
                    .node
                    .put(OBJ_BUCKET, self.id, v)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            self.node
                .objects
                .stats
                .commits
                .fetch_add(1, Ordering::Relaxed);
            match res {
                Ok(_) => {
                    self.committed = self.work.clone();
                    self.dirty = false;
                    for c in self.after_commit.drain(..) {
                        spawn_cleanup(self.node, c);
                    }
                }
                Err(e) => {
                    tracing::warn!(object = %self.id, "commit failed: {e}");
                    for (tx, _) in self.waiting.drain(..) {
                        answer(
                            &tx,
                            Answer::err(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("the object's state could not be committed ({e}); nothing was applied"),
                            ),
                        );
                    }
                    self.after_commit.clear();
                    self.failed = true;
                    self.dirty = false;
                    return;
                }
            }
        }
        for (tx, a) in self.waiting.drain(..) {
            answer(&tx, a);
        }
    }

    async fn handle(&mut self, job: Job) {
        match job {
            Job::Kick => {}
            Job::Create {
                pkg,
                class,
                state,
                caller,
                created_by,
                reply,
            } => {
                if let Some(w) = &self.work {
                    let same = created_by.is_some() && w.created_by == created_by;
                    let a = if same {
                        Answer::ok(json!({ "id": w.id, "existed": true }))
                    } else {
                        Answer::err(StatusCode::CONFLICT, format!("object {} exists", self.id))
                    };
                    return self.hold(reply, a);
                }
                let p = match package(self.node, &pkg).await {
                    Ok(p) => p,
                    Err(a) => return answer(&reply, a),
                };
                let Some(c) = p.class(&class) else {
                    return answer(
                        &reply,
                        Answer::err(
                            StatusCode::NOT_FOUND,
                            format!("package {pkg} has no class {class:?}"),
                        ),
                    );
                };
                let level = p.level(&class, &caller);
                if let Err(r) = c.callable("new", level) {
                    return answer(&reply, Answer::from_refusal(r));
                }
                let given = (!state.is_null()).then_some(&state);
                let st = match c.initial_state(given, level) {
                    Ok(s) => s,
                    Err(r) => return answer(&reply, Answer::from_refusal(r)),
                };
                let st = match self
                    .node
                    .class_state_hook(&pkg, c, self.id, &caller, None, st)
                    .await
                {
                    Ok(s) => s,
                    Err(a) => return answer(&reply, a),
                };
                let mut rec = ObjectRecord::new(self.id, &pkg, &class, st);
                rec.created_by = created_by;
                self.work = Some(rec);
                self.dirty = true;
                self.hold(
                    reply,
                    Answer::ok(json!({ "id": self.id, "existed": false })),
                );
            }
            Job::Get { caller, reply } => {
                self.drain_log().await;
                let a = match self.view(&caller).await {
                    Ok(v) => Answer::ok(v),
                    Err(a) => a,
                };
                self.hold(reply, a);
            }
            Job::Status { seq, reply } => {
                let a = match &self.work {
                    None => Answer::err(StatusCode::NOT_FOUND, format!("no object {}", self.id)),
                    Some(w) => status_answer(w, seq),
                };
                self.hold(reply, a);
            }
            Job::CommitBlob {
                blob,
                version,
                size,
                caller,
                reply,
            } => {
                let (p, c) = match self.class().await {
                    Ok(x) => x,
                    Err(a) => return answer(&reply, a),
                };
                let level = p.level(&c.name, &caller);
                if let Err(r) = c.blob(&blob, level) {
                    return answer(&reply, Answer::from_refusal(r));
                }
                self.drain_log().await;
                let Some(w) = self.work.as_mut() else {
                    return answer(&reply, Answer::err(StatusCode::NOT_FOUND, "object deleted"));
                };
                if let Some(old) = w.blobs.get(&blob) {
                    self.after_commit.push(Cleanup::DeleteBlob(blob_key(
                        self.id,
                        &blob,
                        old.version,
                    )));
                }
                let mut b = BTreeMap::new();
                b.insert(blob.clone(), BlobRef { version, size });
                w.change(None, b);
                let v = w.version;
                self.dirty = true;
                self.hold(
                    reply,
                    Answer::ok(json!({ "blob": blob, "version": version, "object_version": v })),
                );
            }
            Job::Invoke {
                function,
                args,
                caller,
                asynchronous,
                output_id,
                reply,
            } => {
                let (p, c) = match self.class().await {
                    Ok(x) => x,
                    Err(a) => return answer(&reply, a),
                };
                let level = p.level(&c.name, &caller);
                let f = match c.callable(&function, level) {
                    Ok(f) => f.clone(),
                    Err(r) => return answer(&reply, Answer::from_refusal(r)),
                };
                if function == "new" {
                    return answer(
                        &reply,
                        Answer::err(
                            StatusCode::BAD_REQUEST,
                            "create objects with POST /api/obj (capy obj new)",
                        ),
                    );
                }
                if asynchronous {
                    if matches!(f.body, Body::Macro(_)) || function == "delete" {
                        return answer(
                            &reply,
                            Answer::err(
                                StatusCode::BAD_REQUEST,
                                format!("{function} can only be called synchronously"),
                            ),
                        );
                    }
                    let Some(w) = self.work.as_mut() else {
                        return answer(
                            &reply,
                            Answer::err(StatusCode::NOT_FOUND, "object deleted"),
                        );
                    };
                    match w.accept(&function, args, caller, wall_ms()) {
                        Ok(seq) => {
                            self.dirty = true;
                            let inv = format!("{}-{seq}", self.id);
                            self.hold(
                                reply,
                                Answer::json(
                                    StatusCode::ACCEPTED,
                                    &json!({ "invocation": inv, "seq": seq }),
                                ),
                            );
                        }
                        Err(e) => answer(&reply, Answer::err(StatusCode::SERVICE_UNAVAILABLE, e)),
                    }
                    return;
                }
                // Earlier async calls come first.
                self.drain_log().await;
                if self.failed {
                    return answer(
                        &reply,
                        Answer::err(StatusCode::SERVICE_UNAVAILABLE, "commit failed"),
                    );
                }
                if let Body::Macro(m) = &f.body {
                    let _ = reply.try_send(Reply::Macro {
                        pkg: p.clone(),
                        class: c.name.clone(),
                        defined_in: f.defined_in.clone(),
                        m: m.clone(),
                        args,
                    });
                    return;
                }
                let out = self
                    .run(&p, &c, &f, args, level, &caller, output_id, None)
                    .await;
                match out {
                    Ok(a) => self.hold(reply, a),
                    Err(a) => answer(&reply, a),
                }
            }
        }
    }

    async fn class(&self) -> Result<(Arc<Package>, Class), Answer> {
        let Some(w) = &self.work else {
            return Err(Answer::err(
                StatusCode::NOT_FOUND,
                format!("no object {}", self.id),
            ));
        };
        let p = package(self.node, &w.pkg).await?;
        let c = p.class(&w.class).cloned().ok_or_else(|| {
            Answer::err(
                StatusCode::NOT_FOUND,
                format!("package {} no longer has class {}", w.pkg, w.class),
            )
        })?;
        Ok((p, c))
    }

    async fn view(&self, caller: &Caller) -> Result<Value, Answer> {
        let (p, c) = self.class().await?;
        let w = self
            .work
            .as_ref()
            .ok_or_else(|| Answer::err(StatusCode::NOT_FOUND, "no object"))?;
        let level = p.level(&c.name, caller);
        c.callable("get", level).map_err(Answer::from_refusal)?;
        let blobs: Map<String, Value> = w
            .blobs
            .iter()
            .filter(|(n, _)| c.blob(n, level).is_ok())
            .map(|(n, b)| (n.clone(), json!({ "version": b.version, "size": b.size })))
            .collect();
        let state = match self
            .node
            .class_read_hook(&p.name, &c, &w.id, caller, level, &w.state, json!({}))
            .await?
        {
            Some(v) => v,
            None => Value::Object(c.visible(&w.state, level)),
        };
        Ok(json!({
            "id": w.id,
            "class": format!("{}.{}", w.pkg, w.class),
            "version": w.version,
            "state": state,
            "blobs": blobs,
            "pending": w.log.len(),
            "applied": w.applied,
        }))
    }

    /// Applies every logged invocation it can, in order.
    async fn drain_log(&mut self) {
        while !self.failed {
            let Some(e) = self.work.as_ref().and_then(|w| w.next_pending().cloned()) else {
                return;
            };
            let (p, c) = match self.class().await {
                Ok(x) => x,
                Err(a) => {
                    // The package is gone or unreadable: record the failure.
                    if let Some(w) = self.work.as_mut() {
                        let _ = w.apply(e.seq, Effect::Failed(a.message()));
                        self.dirty = true;
                    }
                    continue;
                }
            };
            let level = p.level(&c.name, &e.caller);
            let f = match c.callable(&e.function, level) {
                Ok(f) => f.clone(),
                Err(r) => {
                    if let Some(w) = self.work.as_mut() {
                        let _ = w.apply(e.seq, Effect::Failed(r.to_string()));
                        self.dirty = true;
                    }
                    continue;
                }
            };
            // Output objects of logged calls get ids fixed by the call, so a
            // re-run after a crash creates the same object.
            let out_id = f
                .output
                .as_ref()
                .map(|_| MacroRun::output_id(&format!("{}-{}", self.id, e.seq), &e.function));
            match self
                .run(
                    &p,
                    &c,
                    &f,
                    e.args.clone(),
                    level,
                    &e.caller,
                    out_id,
                    Some(e.seq),
                )
                .await
            {
                Ok(_) => {}
                Err(a) if a.status == 503 => {
                    // Functions unavailable here for now: the entry stays
                    // in the log and is tried again.
                    tracing::info!(object = %self.id, seq = e.seq, "logged call deferred: {}", a.message());
                    self.retry_log = true;
                    return;
                }
                Err(_) => {}
            }
        }
    }

    /// Runs one call on the working copy. `seq` is set for logged calls,
    /// whose effect (or failure) is applied with the offset. Returns the
    /// answer to hold until the commit, or an error answer to send now.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        p: &Arc<Package>,
        c: &Class,
        f: &Function,
        args: Value,
        level: Level,
        caller: &Caller,
        output_id: Option<String>,
        seq: Option<u64>,
    ) -> Result<Answer, Answer> {
        let res = match &f.body {
            Body::Builtin => self.builtin(c, &f.name, &args, level),
            Body::Task(t) => {
                // Answer everyone waiting before the slow part.
                self.flush().await;
                if self.failed {
                    return Err(Answer::err(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "commit failed",
                    ));
                }
                self.task(p, c, f, t, &args, caller, output_id).await
            }
            Body::Macro(_) => Err(Answer::err(
                StatusCode::BAD_REQUEST,
                "MACRO functions cannot be queued",
            )),
        };
        let res = match res {
            Ok(r) if c.handler.is_some() => {
                self.class_hooks(p, c, f, caller, level, &args, r).await
            }
            other => other,
        };
        match (res, seq) {
            (Ok((state, blobs, output)), Some(seq)) => {
                if let Some(w) = self.work.as_mut() {
                    let eff = Effect::Ok {
                        state,
                        blobs,
                        output: output.clone(),
                    };
                    if let Err(e) = w.apply(seq, eff) {
                        tracing::error!(object = %self.id, "{e}");
                    }
                    self.dirty = true;
                }
                Ok(Answer::ok(output))
            }
            (Ok((state, blobs, output)), None) => {
                if let Some(w) = self.work.as_mut() {
                    if state.is_some() || !blobs.is_empty() {
                        w.change(state, blobs);
                        self.dirty = true;
                    }
                }
                Ok(Answer::ok(output))
            }
            (Err(a), Some(seq)) => {
                if a.status != 503 {
                    if let Some(w) = self.work.as_mut() {
                        let _ = w.apply(seq, Effect::Failed(a.message()));
                        self.dirty = true;
                    }
                }
                Err(a)
            }
            (Err(a), None) => Err(a),
        }
    }

    /// The class handler's say on a call's result: `readCb` shapes what
    /// the built-in `get` returns, `updateCb` the state a call commits.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    async fn class_hooks(
        &self,
        p: &Arc<Package>,
        c: &Class,
        f: &Function,
        caller: &Caller,
        level: Level,
        args: &Value,
        (state, blobs, output): (Option<Map<String, Value>>, BTreeMap<String, BlobRef>, Value),
    ) -> Result<(Option<Map<String, Value>>, BTreeMap<String, BlobRef>, Value), Answer> {
        let Some(w) = self.work.as_ref() else {
            return Ok((state, blobs, output));
        };
        let builtin = matches!(f.body, Body::Builtin);
        if builtin && f.name == "get" {
            let out = self
                .node
                .class_read_hook(&p.name, c, self.id, caller, level, &w.state, args.clone())
                .await?;
            return Ok((state, blobs, out.unwrap_or(output)));
        }
        // TASK results went through updateCb in `task`.
        let (true, Some(st)) = (builtin, state.as_ref()) else {
            return Ok((state, blobs, output));
        };
        let st = self
            .node
            .class_state_hook(&p.name, c, self.id, caller, Some(&w.state), st.clone())
            .await?;
        // The built-in update answers with the state as committed.
        let output = if f.name == "update" {
            Value::Object(c.visible(&st, level))
        } else {
            output
        };
        Ok((Some(st), blobs, output))
    }

    #[allow(clippy::type_complexity)]
    fn builtin(
        &mut self,
        c: &Class,
        name: &str,
        args: &Value,
        level: Level,
    ) -> Result<(Option<Map<String, Value>>, BTreeMap<String, BlobRef>, Value), Answer> {
        let w = self
            .work
            .as_ref()
            .ok_or_else(|| Answer::err(StatusCode::NOT_FOUND, format!("no object {}", self.id)))?;
        match name {
            "get" => Ok((
                None,
                BTreeMap::new(),
                Value::Object(c.visible(&w.state, level)),
            )),
            "update" => {
                let patch = args.as_object().ok_or_else(|| {
                    Answer::err(
                        StatusCode::BAD_REQUEST,
                        "update takes a JSON object of fields",
                    )
                })?;
                c.check_patch(patch, level).map_err(Answer::from_refusal)?;
                let mut st = w.state.clone();
                for (k, v) in patch {
                    if v.is_null() {
                        st.remove(k);
                    } else {
                        st.insert(k.clone(), v.clone());
                    }
                }
                let out = Value::Object(c.visible(&st, level));
                Ok((Some(st), BTreeMap::new(), out))
            }
            "delete" => {
                for (n, b) in &w.blobs {
                    self.after_commit
                        .push(Cleanup::DeleteBlob(blob_key(self.id, n, b.version)));
                }
                self.work = None;
                self.dirty = true;
                Ok((None, BTreeMap::new(), json!({ "deleted": self.id })))
            }
            other => Err(Answer::err(
                StatusCode::BAD_REQUEST,
                format!("{other} is not a built-in function (built-ins: {BUILTINS:?})"),
            )),
        }
    }

    /// Runs a TASK function on the object's state in a container. Blobs the
    /// function writes through its PUT URLs become new versions, adopted
    /// only if the call succeeds (and the class handler's `updateCb`, if
    /// any, accepts the new state).
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    async fn task(
        &mut self,
        p: &Arc<Package>,
        c: &Class,
        f: &Function,
        t: &Task,
        args: &Value,
        caller: &Caller,
        output_id: Option<String>,
    ) -> Result<(Option<Map<String, Value>>, BTreeMap<String, BlobRef>, Value), Answer> {
        let node = self.node;
        node.objects
            .stats
            .task_calls
            .fetch_add(1, Ordering::Relaxed);
        let w = self
            .work
            .clone()
            .ok_or_else(|| Answer::err(StatusCode::NOT_FOUND, format!("no object {}", self.id)))?;
        let signer = signer(node)
            .await
            .map_err(|e| Answer::err(StatusCode::SERVICE_UNAVAILABLE, e))?;
        let base = blob_base(node);
        let expires = wall_ms() / 1000 + t.timeout_s as u64 + 60;
        let mut urls = Map::new();
        let mut fresh: Vec<(String, u64)> = Vec::new();
        for name in c.blobs.keys() {
            let put_v = rand::random::<u64>() >> 1 | 1;
            fresh.push((name.clone(), put_v));
            let get = w.blobs.get(name).map(|b| {
                let g = Grant {
                    method: BlobMethod::Get,
                    object: self.id.to_string(),
                    blob: name.clone(),
                    version: b.version,
                    expires,
                };
                Value::String(format!("{base}{}", signer.path(&g)))
            });
            let g = Grant {
                method: BlobMethod::Put,
                object: self.id.to_string(),
                blob: name.clone(),
                version: put_v,
                expires,
            };
            urls.insert(
                name.clone(),
                json!({ "get": get, "put": format!("{base}{}", signer.path(&g)) }),
            );
        }
        let mut input = t.config.clone();
        if let Some(a) = args.as_object() {
            for (k, v) in a {
                input.insert(k.clone(), v.clone());
            }
        }
        input.insert("args".into(), args.clone());
        input.insert("state".into(), Value::Object(w.state.clone()));
        input.insert("blobs".into(), Value::Object(urls));
        input.insert(
            "object".into(),
            json!({ "id": self.id, "class": format!("{}.{}", p.name, c.name), "version": w.version }),
        );
        input.insert("function".into(), Value::String(f.name.clone()));
        let manifest = image_manifest(node, &p.name, &t.image).await;
        let image_ref = match &manifest {
            Ok(Some(m)) => format!("{}:{}", crate::containers::IMAGE_REPO, m.sha256),
            Ok(None) => t.image.clone(),
            Err(a) => return Err(a.clone()),
        };
        let mut spec = FnSpec::new(&p.name, &format!("{}.{}", f.defined_in, f.name), &image_ref);
        spec.timeout = Duration::from_secs(t.timeout_s as u64);
        spec.memory_bytes = t.memory_mib as u64 * (1 << 20);
        // The node's one function host: TASK containers share its pool,
        // limits, keep-alive and reconnects with the functions part.
        let host = node.functions.host().await;
        let (pkg_name, image) = (p.name.clone(), t.image.clone());
        let res = host
            .invoke(&spec, Value::Object(input), || async move {
                let m = match manifest {
                    Ok(Some(m)) => m,
                    _ => {
                        return Err(FnError::ImageUnavailable {
                            function: image.clone(),
                            reason: format!(
                                "podman on this node does not have image {image}, and package {pkg_name} uploaded no archive by that name"
                            ),
                        })
                    }
                };
                load_image_chunks(node, &pkg_name, &image, &m)
                    .await
                    .map(|b| crate::containers::ImageSource::Bytes(b.into()))
                    .map_err(|reason| FnError::ImageUnavailable {
                        function: image.clone(),
                        reason,
                    })
            })
            .await;
        // Which of the fresh versions the function wrote.
        let mut written = BTreeMap::new();
        for (name, v) in &fresh {
            if let Ok(Some(val)) = node.get(BLOB_BUCKET, &blob_key(self.id, name, *v)).await {
                written.insert(
                    name.clone(),
                    BlobRef {
                        version: *v,
                        size: val.value.len() as u64,
                    },
                );
            }
        }
        let discard = |node: &Arc<Node>, written: &BTreeMap<String, BlobRef>| {
            for (n, b) in written {
                spawn_cleanup(node, Cleanup::DeleteBlob(blob_key(self.id, n, b.version)));
            }
        };
        let inv = match res {
            Ok(i) => i,
            Err(e) => {
                discard(node, &written);
                let status =
                    StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
                return Err(Answer::err(status, e));
            }
        };
        let (state, output) = match inv.output {
            Value::Object(mut o) if o.contains_key("state") || o.contains_key("output") => {
                let st = match o.remove("state") {
                    None | Some(Value::Null) => None,
                    Some(s) => match c.check_state(&s) {
                        Ok(m) => Some(m),
                        Err(r) => {
                            discard(node, &written);
                            return Err(Answer::err(
                                StatusCode::BAD_GATEWAY,
                                format!(
                                    "function {} returned a state the class refuses: {r}",
                                    f.name
                                ),
                            ));
                        }
                    },
                };
                (st, o.remove("output").unwrap_or(Value::Null))
            }
            other => (None, other),
        };
        // The class handler's updateCb, before anything outlives a refusal
        // (the output object, the old blob versions' deletion).
        let state = match state {
            Some(st) if c.handler.is_some() => {
                match node
                    .class_state_hook(&p.name, c, self.id, caller, Some(&w.state), st)
                    .await
                {
                    Ok(s) => Some(s),
                    Err(a) => {
                        discard(node, &written);
                        return Err(a);
                    }
                }
            }
            other => other,
        };
        let mut output = output;
        if output.is_null() && f.output.is_none() {
            // No output: answer what the caller may see of the new state.
            let st = state.as_ref().unwrap_or(&w.state);
            output = json!({ "state": c.visible(st, Level::Public) });
        }
        if let Some(oc) = &f.output {
            // The output becomes an object of the output class.
            let oid = output_id.unwrap_or_else(|| {
                let loc = p.class(oc).map(|k| k.locality).unwrap_or_default();
                new_object_id(&p.name, oc, loc)
            });
            let a = node
                .obj_call(
                    ring(&oid),
                    ObjCall::New {
                        id: oid.clone(),
                        pkg: p.name.clone(),
                        class: oc.clone(),
                        state: output.to_string(),
                        caller: Caller::Function {
                            pkg: p.name.clone(),
                            class: c.name.clone(),
                        },
                        created_by: Some(oid.clone()),
                    },
                )
                .await;
            if !a.is_ok() {
                discard(node, &written);
                return Err(Answer::err(
                    StatusCode::BAD_GATEWAY,
                    format!("creating the output object of class {oc}: {}", a.message()),
                ));
            }
            output = json!({ "id": oid, "output": output });
        }
        for (n, _) in written.iter() {
            if let Some(old) = w.blobs.get(n) {
                self.after_commit
                    .push(Cleanup::DeleteBlob(blob_key(self.id, n, old.version)));
            }
        }
        Ok((state, written, output))
    }
}

fn status_answer(w: &ObjectRecord, seq: u64) -> Answer {
    let inv = format!("{}-{seq}", w.id);
    match w.status(seq) {
        InvStatus::Pending { ahead } => {
            Answer::ok(json!({ "invocation": inv, "status": "pending", "ahead": ahead }))
        }
        InvStatus::Done(r) => Answer::ok(json!({
            "invocation": inv,
            "status": if r.ok { "done" } else { "failed" },
            if r.ok { "output" } else { "error" }: r.output,
        })),
        InvStatus::Applied => Answer::ok(
            json!({ "invocation": inv, "status": "done", "output": null, "note": "result no longer kept" }),
        ),
        InvStatus::Unknown => Answer::err(StatusCode::NOT_FOUND, format!("no invocation {inv}")),
    }
}

fn spawn_cleanup(node: &Arc<Node>, c: Cleanup) {
    let node = node.clone();
    smol::spawn(async move {
        match c {
            Cleanup::DeleteBlob(k) => {
                if let Err(e) = node.put(BLOB_BUCKET, &k, None).await {
                    tracing::debug!(blob = %k, "purging a blob version: {e}");
                }
            }
        }
    })
    .detach();
}

// ---- MACRO ------------------------------------------------------------------

async fn run_macro(
    node: &Arc<Node>,
    id: &str,
    pkg: Arc<Package>,
    class: &str,
    defined_in: &str,
    m: Macro,
    args: Value,
) -> Answer {
    let inv = format!("{id}-m{:016x}", rand::random::<u64>());
    let inv = match args.get("invocation").and_then(Value::as_str) {
        // A caller retrying a MACRO may pass its own id to reuse outputs.
        Some(s) if !s.is_empty() && s.len() <= 128 => s.to_string(),
        _ => inv,
    };
    let caller = Caller::Function {
        pkg: pkg.name.clone(),
        class: if defined_in.is_empty() {
            class.to_string()
        } else {
            defined_in.to_string()
        },
    };
    let mut run = MacroRun::new(m, id, args, &inv);
    let (tx, rx) = async_channel::unbounded::<(usize, Answer)>();
    let mut running = 0usize;
    loop {
        for call in run.ready() {
            let node = node.clone();
            let caller = caller.clone();
            let tx = tx.clone();
            running += 1;
            smol::spawn(async move {
                let a = node
                    .obj_call(
                        ring(&call.object),
                        ObjCall::Invoke {
                            id: call.object.clone(),
                            function: call.function.clone(),
                            args: call.args.to_string(),
                            caller,
                            asynchronous: false,
                            output_id: call.output_id.clone(),
                        },
                    )
                    .await;
                let _ = tx.send((call.index, a)).await;
            })
            .detach();
        }
        if let Some(done) = run.finished() {
            return match done {
                Ok(v) => Answer::ok(v),
                Err(e) => Answer::err(StatusCode::BAD_GATEWAY, e),
            };
        }
        if running == 0 {
            return Answer::err(StatusCode::INTERNAL_SERVER_ERROR, "MACRO stalled");
        }
        // Whichever step finishes first.
        let Ok((i, a)) = rx.recv().await else {
            return Answer::err(StatusCode::INTERNAL_SERVER_ERROR, "MACRO steps lost");
        };
        running -= 1;
        if a.is_ok() {
            let v = a.value();
            // A function with an output class answers {"id", "output"}.
            let created = v
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| is_object_id(s) && v.get("output").is_some())
                .map(str::to_string);
            let output = if created.is_some() {
                v.get("output").cloned().unwrap_or(Value::Null)
            } else {
                v
            };
            run.done(i, StepResult { created, output });
        } else {
            run.failed(i, &a.message());
        }
    }
}

// ---- TASK images ------------------------------------------------------------

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ImageManifest {
    sha256: String,
    size: u64,
    chunks: u32,
}

fn image_key(pkg: &str, image: &str) -> String {
    format!("{pkg}/{image}")
}

async fn image_manifest(
    node: &Arc<Node>,
    pkg: &str,
    image: &str,
) -> Result<Option<ImageManifest>, Answer> {
    match node.get(IMG_BUCKET, &image_key(pkg, image)).await {
        Ok(None) => Ok(None),
        Ok(Some(v)) => serde_json::from_slice(&v.value).map(Some).map_err(|e| {
            Answer::err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("image manifest of {image}: {e}"),
            )
        }),
        Err(e) => Err(Answer::from_op(e)),
    }
}

async fn load_image_chunks(
    node: &Arc<Node>,
    pkg: &str,
    image: &str,
    m: &ImageManifest,
) -> Result<Vec<u8>, String> {
    use sha2::{Digest, Sha256};
    let mut out = Vec::with_capacity(m.size as usize);
    for i in 0..m.chunks {
        let k = format!("{}/{}/{i}", image_key(pkg, image), m.sha256);
        match node.get(IMG_BUCKET, &k).await {
            Ok(Some(v)) => out.extend_from_slice(&v.value),
            Ok(None) => return Err(format!("piece {i} of the image archive is missing")),
            Err(e) => return Err(format!("reading piece {i} of the image archive: {e}")),
        }
    }
    let got = hex::encode(Sha256::digest(&out));
    if got != m.sha256 || out.len() as u64 != m.size {
        return Err(format!(
            "the stored archive does not match its manifest (SHA-256 {got})"
        ));
    }
    Ok(out)
}

/// `PUT /api/pkg/{pkg}/images?name=IMAGE`: stores an image archive a
/// package's TASK functions name; pieces first, manifest last.
async fn upload_image(node: &Arc<Node>, pkg: &str, req: Request<Incoming>) -> Resp {
    use sha2::{Digest, Sha256};
    let Some(image) = query_param(&req, "name").filter(|n| !n.is_empty() && n.len() <= 255) else {
        return http::error(
            StatusCode::BAD_REQUEST,
            "name=IMAGE (as the package's image field says) is required",
        );
    };
    if !crate::objects::package::is_package_name(pkg) {
        return http::error(StatusCode::BAD_REQUEST, "bad package name");
    }
    let body = match http::read_body(req, MAX_IMAGE).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let sha = hex::encode(Sha256::digest(&body));
    let chunks = body.chunks(IMG_CHUNK).count() as u32;
    for (i, c) in body.chunks(IMG_CHUNK).enumerate() {
        let k = format!("{}/{sha}/{i}", image_key(pkg, &image));
        if let Err(e) = node.put(IMG_BUCKET, &k, Some(c.to_vec())).await {
            return reply(Answer::from_op(e));
        }
    }
    let m = ImageManifest {
        sha256: sha.clone(),
        size: body.len() as u64,
        chunks,
    };
    let v = serde_json::to_vec(&m).unwrap_or_default();
    if let Err(e) = node.put(IMG_BUCKET, &image_key(pkg, &image), Some(v)).await {
        return reply(Answer::from_op(e));
    }
    http::json(
        StatusCode::OK,
        &json!({ "package": pkg, "image": image, "sha256": sha, "size": body.len(), "chunks": chunks }),
    )
}

// ---- packages -----------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct StoredPkg {
    package: Package,
    file: String,
    source: String,
    deployed_ms: u64,
}

fn index_key() -> NodeId {
    NodeId::for_key(PKG_BUCKET, PKG_INDEX)
}

async fn read_index(node: &Arc<Node>) -> Result<Vec<String>, Answer> {
    match node
        .get_newest(PKG_BUCKET, PKG_INDEX)
        .await
        .map_err(Answer::from_op)?
    {
        None => Ok(Vec::new()),
        Some(v) => serde_json::from_slice(&v.value).map_err(|e| {
            Answer::err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("package index: {e}"),
            )
        }),
    }
}

async fn write_index(node: &Arc<Node>, names: &[String]) -> Result<(), Answer> {
    let v = serde_json::to_vec(names).unwrap_or_default();
    node.put(PKG_BUCKET, PKG_INDEX, Some(v))
        .await
        .map(|_| ())
        .map_err(Answer::from_op)
}

/// Validates the whole package, then stores it, then lists it.
async fn deploy(node: &Arc<Node>, file: &str, text: &str) -> Answer {
    // Validation loads every class handler (Lua): off the executor.
    let (f, t) = (file.to_string(), text.to_string());
    let parsed = smol::unblock(move || crate::objects::parse_package(&f, &t)).await;
    let pkg = match parsed {
        Ok(p) => p,
        Err(errs) => {
            let list: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            return Answer::json(
                StatusCode::BAD_REQUEST,
                &json!({ "error": format!("{} is not a valid package:\n{}", file, list.join("\n")), "errors": errs }),
            );
        }
    };
    let _g = node.objects.admin.lock().await;
    let stored = StoredPkg {
        package: pkg.clone(),
        file: file.to_string(),
        source: text.to_string(),
        deployed_ms: wall_ms(),
    };
    let bytes = match serde_json::to_vec(&stored) {
        Ok(b) => b,
        Err(e) => return Answer::err(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    if let Err(e) = node.put(PKG_BUCKET, &pkg.name, Some(bytes)).await {
        return Answer::from_op(e);
    }
    let mut names = match read_index(node).await {
        Ok(n) => n,
        Err(a) => return a,
    };
    if !names.contains(&pkg.name) {
        names.push(pkg.name.clone());
        names.sort();
        if let Err(a) = write_index(node, &names).await {
            return a;
        }
    }
    if let Ok(mut m) = node.objects.pkgs.lock() {
        m.remove(&pkg.name);
    }
    Answer::ok(summary(&pkg))
}

fn summary(p: &Package) -> Value {
    let classes: Vec<Value> = p
        .classes
        .values()
        .map(|c| {
            json!({
                "name": c.name,
                "parent": c.parent,
                "locality": c.locality,
                "fields": c.fields.keys().collect::<Vec<_>>(),
                "blobs": c.blobs.keys().collect::<Vec<_>>(),
                "functions": c.functions.values().map(|f| json!({
                    "name": f.name,
                    "type": match f.body { Body::Builtin => "BUILTIN", Body::Task(_) => "TASK", Body::Macro(_) => "MACRO" },
                    "access": f.access,
                    "defined_in": if f.defined_in.is_empty() { None } else { Some(&f.defined_in) },
                    "output": f.output,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "name": p.name, "classes": classes })
}

async fn remove_pkg(node: &Arc<Node>, name: &str) -> Answer {
    let _g = node.objects.admin.lock().await;
    let mut names = match read_index(node).await {
        Ok(n) => n,
        Err(a) => return a,
    };
    if !names.iter().any(|n| n == name) {
        return Answer::err(StatusCode::NOT_FOUND, format!("no package {name:?}"));
    }
    names.retain(|n| n != name);
    if let Err(a) = write_index(node, &names).await {
        return a;
    }
    if let Err(e) = node.put(PKG_BUCKET, name, None).await {
        return Answer::from_op(e);
    }
    Answer::ok(json!({ "removed": name }))
}

async fn list_pkgs(node: &Arc<Node>) -> Answer {
    let names = match read_index(node).await {
        Ok(n) => n,
        Err(a) => return a,
    };
    let mut out = Vec::new();
    for n in names {
        match package(node, &n).await {
            Ok(p) => out.push(json!({
                "name": n,
                "classes": p.classes.keys().collect::<Vec<_>>(),
            })),
            Err(a) => out.push(json!({ "name": n, "error": a.message() })),
        }
    }
    Answer::ok(json!({ "packages": out }))
}

// ---- the presigned-URL key --------------------------------------------------

/// At the key's root: the cluster key, created on first use.
async fn root_secret(node: &Arc<Node>) -> Result<Vec<u8>, String> {
    let _g = node.objects.admin.lock().await;
    if let Some(v) = node
        .get_newest(SYS_BUCKET, PRESIGN_KEY)
        .await
        .map_err(|e| e.to_string())?
    {
        if v.value.len() == 32 {
            return Ok(v.value);
        }
    }
    let key: [u8; 32] = rand::random();
    node.put(SYS_BUCKET, PRESIGN_KEY, Some(key.to_vec()))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("created the cluster's key for presigned blob URLs");
    Ok(key.to_vec())
}

/// This node's signer for the cluster key (fetched from the key's root,
/// kept for a minute).
async fn signer(node: &Arc<Node>) -> Result<Signer, String> {
    if let Some((s, at)) = node.objects.signer.lock().ok().and_then(|g| g.clone()) {
        if at.elapsed() < Duration::from_secs(60) {
            return Ok(s);
        }
    }
    let a = node
        .obj_call(NodeId::for_key(SYS_BUCKET, PRESIGN_KEY), ObjCall::Secret)
        .await;
    if !a.is_ok() {
        return Err(format!("the cluster key is unavailable: {}", a.message()));
    }
    let key = a
        .value()
        .get("key")
        .and_then(Value::as_str)
        .and_then(|k| hex::decode(k).ok())
        .filter(|k| k.len() == 32)
        .ok_or("the cluster key's root sent no key")?;
    let s = Signer::new(&key);
    if let Ok(mut g) = node.objects.signer.lock() {
        *g = Some((s.clone(), Instant::now()));
    }
    Ok(s)
}

fn blob_base(node: &Arc<Node>) -> String {
    if let Some(u) = &node.cfg.blob_url {
        return u.trim_end_matches('/').to_string();
    }
    let addr = node
        .cfg
        .blob_http
        .or_else(|| node.http.lock().ok().and_then(|h| *h))
        .unwrap_or(node.cfg.http);
    format!("http://{addr}")
}

// ---- HTTP -----------------------------------------------------------------------

/// True for the paths [`route`] serves.
pub fn handles(path: &str) -> bool {
    path == "/api/pkg"
        || path.starts_with("/api/pkg/")
        || path == "/api/obj"
        || path.starts_with("/api/obj/")
        || path.starts_with("/api/inv/")
        || path.starts_with(crate::objects::presign::PREFIX)
}

fn reply(a: Answer) -> Resp {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    http::full(status, "application/json", a.body)
}

/// A query parameter; one that does not decode counts as absent.
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    http::query_param(req.uri().query(), name).ok().flatten()
}

async fn body_text(req: Request<Incoming>, limit: usize) -> Result<String, Resp> {
    let b = http::read_body(req, limit).await?;
    String::from_utf8(b.to_vec())
        .map_err(|_| http::error(StatusCode::BAD_REQUEST, "the body is not UTF-8"))
}

pub async fn route(node: Arc<Node>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path.starts_with(crate::objects::presign::PREFIX) {
        return presigned(node, req).await;
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Method::GET, ["api", "pkg"]) => reply(node.obj_call(index_key(), ObjCall::ListPkgs).await),
        (Method::POST | Method::PUT, ["api", "pkg"]) => {
            let file = query_param(&req, "file").unwrap_or_else(|| "package".into());
            let text = match body_text(req, crate::objects::yaml::MAX_TEXT).await {
                Ok(t) => t,
                Err(r) => return r,
            };
            reply(
                node.obj_call(index_key(), ObjCall::Deploy { file, text })
                    .await,
            )
        }
        (Method::PUT | Method::POST, ["api", "pkg", name, "images"]) => {
            let name = name.to_string();
            upload_image(&node, &name, req).await
        }
        (Method::GET, ["api", "pkg", name]) => match package(&node, name).await {
            Ok(p) => http::json(StatusCode::OK, &summary(&p)),
            Err(a) => reply(a),
        },
        (Method::DELETE, ["api", "pkg", name]) => reply(
            node.obj_call(
                index_key(),
                ObjCall::RemovePkg {
                    name: name.to_string(),
                },
            )
            .await,
        ),
        (Method::POST, ["api", "obj"]) => {
            let text = match body_text(req, MAX_JSON).await {
                Ok(t) => t,
                Err(r) => return r,
            };
            reply(create(&node, &text).await)
        }
        (Method::GET, ["api", "obj", id]) => reply(
            node.obj_call(
                ring(id),
                ObjCall::Get {
                    id: id.to_string(),
                    caller: Caller::External,
                },
            )
            .await,
        ),
        (Method::DELETE, ["api", "obj", id]) => {
            reply(invoke(&node, id, "delete", String::new(), false).await)
        }
        (Method::GET, ["api", "obj", id, "blobs", blob]) => get_blob(&node, id, blob).await,
        (Method::PUT, ["api", "obj", id, "blobs", blob]) => put_blob(&node, id, blob, req).await,
        (Method::GET, ["api", "obj", id, "blobs", blob, "url"]) => {
            let ttl = query_param(&req, "ttl")
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(300)
                .clamp(1, 86_400);
            blob_url(&node, id, blob, ttl).await
        }
        (Method::POST, ["api", "obj", id, function]) => {
            let asynchronous = matches!(query_param(&req, "async").as_deref(), Some("1" | "true"));
            let text = match body_text(req, MAX_JSON).await {
                Ok(t) => t,
                Err(r) => return r,
            };
            reply(invoke(&node, id, function, text, asynchronous).await)
        }
        (Method::GET, ["api", "inv", inv]) => {
            let Some((id, seq)) = inv
                .rsplit_once('-')
                .and_then(|(i, s)| Some((i, s.parse::<u64>().ok()?)))
            else {
                return http::error(StatusCode::BAD_REQUEST, "an invocation id is OBJECT-SEQ");
            };
            reply(
                node.obj_call(
                    ring(id),
                    ObjCall::Status {
                        id: id.to_string(),
                        seq,
                    },
                )
                .await,
            )
        }
        (m, _) => http::error(
            StatusCode::NOT_FOUND,
            &format!("no such endpoint: {m} {path}"),
        ),
    }
}

/// `POST /api/obj` with `{"class": "PKG.CLASS", "state": {...}}`.
async fn create(node: &Arc<Node>, text: &str) -> Answer {
    let v = match parse_json(text, "the body") {
        Ok(v) => v,
        Err(a) => return a,
    };
    let Some((pkg, class)) = v
        .get("class")
        .and_then(Value::as_str)
        .and_then(|c| c.split_once('.'))
    else {
        return Answer::err(
            StatusCode::BAD_REQUEST,
            "expected {\"class\": \"PKG.CLASS\", \"state\": {...}}",
        );
    };
    let p = match package(node, pkg).await {
        Ok(p) => p,
        Err(a) => return a,
    };
    let Some(c) = p.class(class) else {
        return Answer::err(
            StatusCode::NOT_FOUND,
            format!("package {pkg} has no class {class:?}"),
        );
    };
    let id = new_object_id(pkg, class, c.locality);
    let state = v.get("state").cloned().unwrap_or(Value::Null);
    node.obj_call(
        ring(&id),
        ObjCall::New {
            id: id.clone(),
            pkg: pkg.to_string(),
            class: class.to_string(),
            state: state.to_string(),
            caller: Caller::External,
            created_by: None,
        },
    )
    .await
}

async fn invoke(
    node: &Arc<Node>,
    id: &str,
    function: &str,
    args: String,
    asynchronous: bool,
) -> Answer {
    node.obj_call(
        ring(id),
        ObjCall::Invoke {
            id: id.to_string(),
            function: function.to_string(),
            args,
            caller: Caller::External,
            asynchronous,
            output_id: None,
        },
    )
    .await
}

/// The current version of a blob a client may see.
async fn visible_blob(node: &Arc<Node>, id: &str, blob: &str) -> Result<u64, Answer> {
    let a = node
        .obj_call(
            ring(id),
            ObjCall::Get {
                id: id.to_string(),
                caller: Caller::External,
            },
        )
        .await;
    if !a.is_ok() {
        return Err(a);
    }
    let v = a.value();
    v["blobs"][blob]["version"].as_u64().ok_or_else(|| {
        Answer::err(
            StatusCode::NOT_FOUND,
            format!("object {id} has no blob {blob:?} (or it is not PUBLIC, or not written yet)"),
        )
    })
}

async fn get_blob(node: &Arc<Node>, id: &str, blob: &str) -> Resp {
    let version = match visible_blob(node, id, blob).await {
        Ok(v) => v,
        Err(a) => return reply(a),
    };
    match node.get(BLOB_BUCKET, &blob_key(id, blob, version)).await {
        Ok(Some(v)) => http::full(StatusCode::OK, "application/octet-stream", v.value),
        Ok(None) => http::error(StatusCode::NOT_FOUND, "the blob's content is missing"),
        Err(e) => reply(Answer::from_op(e)),
    }
}

async fn blob_url(node: &Arc<Node>, id: &str, blob: &str, ttl: u64) -> Resp {
    let version = match visible_blob(node, id, blob).await {
        Ok(v) => v,
        Err(a) => return reply(a),
    };
    let s = match signer(node).await {
        Ok(s) => s,
        Err(e) => return http::error(StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    let g = Grant {
        method: BlobMethod::Get,
        object: id.to_string(),
        blob: blob.to_string(),
        version,
        expires: wall_ms() / 1000 + ttl,
    };
    http::json(
        StatusCode::OK,
        &json!({ "url": format!("{}{}", blob_base(node), s.path(&g)), "expires": g.expires }),
    )
}

/// `PUT /api/obj/{id}/blobs/{name}`: writes a new version, then has the
/// object's root move the pointer (in order with the object's calls).
async fn put_blob(node: &Arc<Node>, id: &str, blob: &str, req: Request<Incoming>) -> Resp {
    if !is_object_id(id) || !crate::objects::package::is_ident(blob) {
        return http::error(StatusCode::BAD_REQUEST, "bad object id or blob name");
    }
    let body = match http::read_body(req, node.cfg.max_value.min(crate::store::MAX_VALUE)).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let version = rand::random::<u64>() >> 1 | 1;
    let key = blob_key(id, blob, version);
    if let Err(e) = node.put(BLOB_BUCKET, &key, Some(body.to_vec())).await {
        return reply(Answer::from_op(e));
    }
    let a = node
        .obj_call(
            ring(id),
            ObjCall::CommitBlob {
                id: id.to_string(),
                blob: blob.to_string(),
                version,
                size: body.len() as u64,
                caller: Caller::External,
            },
        )
        .await;
    if !a.is_ok() {
        spawn_cleanup(node, Cleanup::DeleteBlob(key));
    }
    reply(a)
}

/// `GET|PUT /blob/...`: a presigned URL. Any node checks any node's URL.
async fn presigned(node: Arc<Node>, req: Request<Incoming>) -> Resp {
    let used = match *req.method() {
        Method::GET => BlobMethod::Get,
        Method::PUT => BlobMethod::Put,
        _ => {
            return http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "presigned URLs take GET or PUT",
            )
        }
    };
    let s = match signer(&node).await {
        Ok(s) => s,
        Err(e) => return http::error(StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let g = match s.verify(&path, query.as_deref(), used, wall_ms() / 1000) {
        Ok(g) => g,
        Err(e) => return http::error(StatusCode::FORBIDDEN, &e.to_string()),
    };
    let key = blob_key(&g.object, &g.blob, g.version);
    match used {
        BlobMethod::Get => match node.get(BLOB_BUCKET, &key).await {
            Ok(Some(v)) => http::full(StatusCode::OK, "application/octet-stream", v.value),
            Ok(None) => http::error(StatusCode::NOT_FOUND, "no such blob version"),
            Err(e) => reply(Answer::from_op(e)),
        },
        BlobMethod::Put => {
            let body =
                match http::read_body(req, node.cfg.max_value.min(crate::store::MAX_VALUE)).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
            // Versions are written once: a replayed URL cannot change a
            // version that may already be committed.
            match node.get(BLOB_BUCKET, &key).await {
                Ok(Some(_)) => {
                    return http::error(
                        StatusCode::CONFLICT,
                        "this blob version is already written",
                    )
                }
                Ok(None) => {}
                Err(e) => return reply(Answer::from_op(e)),
            }
            match node.put(BLOB_BUCKET, &key, Some(body.to_vec())).await {
                Ok(_) => http::json(
                    StatusCode::OK,
                    &json!({ "object": g.object, "blob": g.blob, "version": g.version, "size": body.len() }),
                ),
                Err(e) => reply(Answer::from_op(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_locality_puts_objects_in_the_class_arc() {
        let want = NodeId::for_key(OBJ_BUCKET, "p.C").0 >> (128 - LOCALITY_BITS);
        for _ in 0..20 {
            let id = new_object_id("p", "C", Locality::Class);
            assert!(is_object_id(&id), "{id}");
            assert_eq!(ring(&id).0 >> (128 - LOCALITY_BITS), want);
        }
        // Spread ids land all over the ring.
        let arcs: std::collections::BTreeSet<u128> = (0..50)
            .map(|_| ring(&new_object_id("p", "C", Locality::Spread)).0 >> (128 - LOCALITY_BITS))
            .collect();
        assert!(arcs.len() > 40, "{}", arcs.len());
    }

    #[test]
    fn answers_map_refusals_to_statuses() {
        let a = Answer::from_refusal(Refusal::Forbidden("field x is PRIVATE".into()));
        assert_eq!(a.status, 403);
        assert_eq!(a.message(), "field x is PRIVATE");
        assert_eq!(
            Answer::from_refusal(Refusal::NotFound("n".into())).status,
            404
        );
        assert_eq!(
            Answer::from_refusal(Refusal::Invalid("i".into())).status,
            400
        );
    }
}

//! The sans-IO replication core: one [`Replicator`] per physical node
//! serves all of its vnodes. It coordinates writes at a key's root
//! (versions, majority acknowledgement), serves reads (with fetch from the
//! other replicas and read repair), runs anti-entropy and hand-off, and
//! collects old tombstones. It reads the local store through [`Backend`];
//! every change leaves as [`Action::Persist`], which the runtime commits and
//! reports back through [`Replicator::persisted`]. It never touches a
//! socket, clock, file or thread, so the simulator drives the same code.
//!
//! Replica sets come from the runtime as `Fn(key, k) -> Vec<NodeHandle>`
//! (closest first, distinct nodes). When fewer than `k` distinct nodes
//! exist, the majority is taken of those that do: a lone node acknowledges
//! its own writes.

use super::entry::{
    check_bucket, check_k, check_key, check_value, Entry, Meta, Pos, Stamp, WriteOp, MAX_VALUE,
};
use super::error::StoreError;
use crate::id::{Micros, NodeHandle, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

/// What the replication core reads from the local store. Implemented by
/// [`super::Db`] (redb) and [`super::MemBackend`] (tests, simulator).
pub trait Backend {
    fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError>;
    /// The entry without its value.
    fn meta(&self, bucket: &str, key: &str) -> Result<Option<Meta>, StoreError>;
    /// Up to `limit` stored keys strictly after `after`, in [`Pos`] order.
    fn scan_meta(&self, after: Option<&Pos>, limit: usize) -> Result<Vec<(Pos, Meta)>, StoreError>;
}

/// The replica set of a ring position for a replication factor, as the
/// local overlay sees it: closest vnode (the root) first.
pub type Placement<'a> = &'a dyn Fn(NodeId, usize) -> Vec<NodeHandle>;

/// Request ids on the wire. Ids the core sends are unique per core (they
/// start from a seed the runtime picks, so a restarted node does not reuse
/// ids of its previous life).
pub type ReqId = u64;

/// Most items in one digest, pull, push or reply.
pub const MAX_ITEMS: usize = 1024;
/// Largest encoded store message: a push of up to `MAX_VALUE` bytes plus
/// one maximal entry and headroom. The transport's frame bound must admit it.
pub const MAX_MSG: usize = 2 * MAX_VALUE + 256 * 1024;
/// Rounds a root tries when it finds a newer copy it did not know of.
const MAX_ATTEMPTS: u8 = 4;
/// Keys whose last assigned version a root remembers.
const ASSIGNED_MAX: usize = 16384;

/// A key inside a bucket, on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyRef {
    pub bucket: String,
    pub key: String,
}

/// One offered copy in an anti-entropy digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestItem {
    pub bucket: String,
    pub key: String,
    pub stamp: Stamp,
    /// A tombstone past the collection age on the sender's clock: a peer
    /// that holds nothing for the key need not fetch it.
    pub gc: bool,
}

/// What a peer holds of an offered key: `None` only for a collectable
/// tombstone it does not hold (as good as holding it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveItem {
    pub bucket: String,
    pub key: String,
    pub stamp: Option<Stamp>,
}

/// A whole entry on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub bucket: String,
    pub key: String,
    pub entry: Entry,
}

/// A live value as a reader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Value {
    pub version: u64,
    pub value: Vec<u8>,
}

/// Why a store request failed, as the requester is told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RemoteError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("this node does not hold the key's replicas (root here: {root:?})")]
    NotHere { root: Option<NodeHandle> },
    #[error("write timed out: {committed} of {replicas} replicas committed, {needed} needed")]
    Timeout {
        committed: u8,
        needed: u8,
        replicas: u8,
    },
    #[error("read failed: {answered} of {asked} other replicas answered, none held the key")]
    Unavailable { answered: u8, asked: u8 },
    #[error("write kept meeting newer concurrent writes ({attempts} attempts)")]
    Conflict { attempts: u8 },
    #[error("the key's root did not answer in time")]
    NoAnswer,
    #[error("too many requests in flight at the root")]
    Busy,
    #[error("storage error at the replica: {0}")]
    Storage(String),
}

/// Messages between the replication cores of different nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreMsg {
    /// Requester to the key's root (overlay-routed). `value: None` deletes.
    Put {
        req: ReqId,
        bucket: String,
        key: String,
        value: Option<Vec<u8>>,
        k: u8,
    },
    /// Requester to the key's root (overlay-routed).
    Get {
        req: ReqId,
        bucket: String,
        key: String,
        k: u8,
    },
    /// Root to requester: the version the write got.
    PutReply {
        req: ReqId,
        result: Result<u64, RemoteError>,
    },
    GetReply {
        req: ReqId,
        result: Result<Option<Value>, RemoteError>,
    },
    /// Root to the other replicas.
    Replicate {
        req: ReqId,
        bucket: String,
        key: String,
        entry: Entry,
    },
    /// Replica to root, after its commit: what it now holds.
    ReplicateAck {
        req: ReqId,
        ok: bool,
        held: Option<Stamp>,
    },
    /// To any node, sent directly: its local copy, no forwarding. The root
    /// uses it when it lacks a key; a requester whose root is silent uses
    /// it through [`Replicator::get_from`].
    Fetch {
        req: ReqId,
        bucket: String,
        key: String,
    },
    FetchReply {
        req: ReqId,
        entry: Option<Entry>,
    },
    /// Anti-entropy: copies the sender holds, offered to a replica.
    Digest {
        items: Vec<DigestItem>,
    },
    /// Answer to a digest: what to push, and what the peer already holds.
    DigestReply {
        want: Vec<KeyRef>,
        have: Vec<HaveItem>,
    },
    /// Ask for whole entries (the peer holds newer ones).
    Pull {
        items: Vec<KeyRef>,
    },
    Push {
        items: Vec<Item>,
    },
    /// After committing a push: what the receiver now holds.
    PushAck {
        have: Vec<HaveItem>,
    },
}

fn check_items(n: usize) -> Result<(), StoreError> {
    if n > MAX_ITEMS {
        return Err(StoreError::Wire(format!(
            "{n} items in one message, at most {MAX_ITEMS}"
        )));
    }
    Ok(())
}

fn check_names(bucket: &str, key: &str) -> Result<(), StoreError> {
    check_bucket(bucket)?;
    check_key(key)
}

impl StoreMsg {
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        postcard::to_allocvec(self).map_err(|e| StoreError::Wire(e.to_string()))
    }

    /// Decodes and validates a message from a peer.
    pub fn decode(bytes: &[u8]) -> Result<StoreMsg, StoreError> {
        if bytes.len() > MAX_MSG {
            return Err(StoreError::Wire(format!(
                "message of {} bytes, at most {MAX_MSG}",
                bytes.len()
            )));
        }
        let msg: StoreMsg =
            postcard::from_bytes(bytes).map_err(|e| StoreError::Wire(e.to_string()))?;
        msg.validate()?;
        Ok(msg)
    }

    /// Every bound a message must respect, wherever it came from.
    pub fn validate(&self) -> Result<(), StoreError> {
        match self {
            StoreMsg::Put {
                bucket,
                key,
                value,
                k,
                ..
            } => {
                check_names(bucket, key)?;
                check_k(*k)?;
                check_value(value.as_ref().map_or(0, Vec::len))
            }
            StoreMsg::Get { bucket, key, k, .. } => {
                check_names(bucket, key)?;
                check_k(*k)
            }
            StoreMsg::Fetch { bucket, key, .. } => check_names(bucket, key),
            StoreMsg::Replicate {
                bucket, key, entry, ..
            } => {
                check_names(bucket, key)?;
                entry.validate()
            }
            StoreMsg::PutReply { result, .. } => match result {
                Err(e) => check_remote(e),
                Ok(_) => Ok(()),
            },
            StoreMsg::GetReply { result, .. } => match result {
                Ok(Some(v)) => check_value(v.value.len()),
                Ok(None) => Ok(()),
                Err(e) => check_remote(e),
            },
            StoreMsg::ReplicateAck { .. } => Ok(()),
            StoreMsg::FetchReply { entry, .. } => entry.as_ref().map_or(Ok(()), Entry::validate),
            StoreMsg::Digest { items } => {
                check_items(items.len())?;
                items
                    .iter()
                    .try_for_each(|i| check_names(&i.bucket, &i.key))
            }
            StoreMsg::DigestReply { want, have } => {
                check_items(want.len() + have.len())?;
                want.iter()
                    .try_for_each(|i| check_names(&i.bucket, &i.key))?;
                have.iter().try_for_each(|i| check_names(&i.bucket, &i.key))
            }
            StoreMsg::Pull { items } => {
                check_items(items.len())?;
                items
                    .iter()
                    .try_for_each(|i| check_names(&i.bucket, &i.key))
            }
            StoreMsg::Push { items } => {
                check_items(items.len())?;
                items.iter().try_for_each(|i| {
                    check_names(&i.bucket, &i.key)?;
                    i.entry.validate()
                })
            }
            StoreMsg::PushAck { have } => {
                check_items(have.len())?;
                have.iter().try_for_each(|i| check_names(&i.bucket, &i.key))
            }
        }
    }
}

fn check_remote(e: &RemoteError) -> Result<(), StoreError> {
    match e {
        RemoteError::Invalid(s) | RemoteError::Storage(s) if s.len() > 4096 => {
            Err(StoreError::Wire("error text longer than 4096 bytes".into()))
        }
        _ => Ok(()),
    }
}

/// How a finished request of this node's own requester ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Put(Result<u64, RemoteError>),
    Get(Result<Option<Value>, RemoteError>),
}

/// What the runtime must do for the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send directly to a node.
    Send { to: NodeHandle, msg: StoreMsg },
    /// Route through the overlay to the root of `key`.
    Route { key: NodeId, msg: StoreMsg },
    /// Commit these ops (group commit), then call
    /// [`Replicator::persisted`] with `token`.
    Persist { token: u64, ops: Vec<WriteOp> },
    /// A request started with [`Replicator::put`], [`Replicator::get`] or
    /// [`Replicator::get_from`] finished; `req` is the caller's id.
    Done { req: ReqId, outcome: Outcome },
}

/// Timing and size knobs. Times are in the core's clock (µs); tombstone
/// ages compare `now` with the roots' clocks, so the runtime feeds wall
/// time (µs since the Unix epoch).
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// A root answers a write with an error after this long.
    pub put_timeout: Micros,
    /// A root (or `get_from`) stops waiting for other replicas after this.
    pub get_timeout: Micros,
    /// A requester gives up on a silent root after this.
    pub request_timeout: Micros,
    /// Unanswered replicate/fetch messages are resent this often.
    pub resend_every: Micros,
    /// A full anti-entropy pass starts this often (and after
    /// [`Replicator::membership_changed`]).
    pub maintain_every: Micros,
    /// Keys examined per [`Replicator::maintain`] call.
    pub scan_budget: usize,
    /// Items per digest message.
    pub digest_batch: usize,
    /// Bytes per push message, at most `MAX_VALUE` (one entry is always
    /// sent, however large).
    pub push_bytes: usize,
    /// Hand-off and collection confirmations older than this are dropped
    /// (the next pass asks again).
    pub confirm_ttl: Micros,
    /// Tombstones older than this are collected once every replica has
    /// them. A replica that stays cut off for longer may bring the key back.
    pub tombstone_gc_age_ms: u64,
    /// Writes and reads a root coordinates at once.
    pub max_ops: usize,
    /// Hand-off and collection confirmations tracked at once.
    pub max_confirms: usize,
    /// Answered requests remembered so a duplicate is answered, not redone.
    pub dedupe_for: Micros,
    pub dedupe_max: usize,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            put_timeout: 2_000_000,
            get_timeout: 1_000_000,
            request_timeout: 3_000_000,
            resend_every: 500_000,
            maintain_every: 10_000_000,
            scan_budget: 512,
            digest_batch: 256,
            push_bytes: MAX_VALUE,
            confirm_ttl: 30_000_000,
            tombstone_gc_age_ms: 24 * 3600 * 1000,
            max_ops: 4096,
            max_confirms: 16384,
            dedupe_for: 60_000_000,
            dedupe_max: 8192,
        }
    }
}

#[derive(Clone, Debug)]
enum ReplyTo {
    Remote { to: NodeHandle, req: ReqId },
    Local { req: ReqId },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Local {
    Pending,
    Done,
    Failed,
}

struct PutOp {
    reply_to: ReplyTo,
    dedupe: Option<(SocketAddr, ReqId)>,
    bucket: String,
    key: String,
    entry: Entry,
    /// Distinct nodes of the replica set, this node among them.
    replicas: Vec<NodeHandle>,
    /// Wire id of the current round; acks of older rounds are ignored.
    round: ReqId,
    acked: Vec<SocketAddr>,
    local: Local,
    attempts: u8,
    deadline: Micros,
    resend_at: Micros,
}

struct GetOp {
    reply_to: ReplyTo,
    dedupe: Option<(SocketAddr, ReqId)>,
    bucket: String,
    key: String,
    asked: Vec<NodeHandle>,
    answered: Vec<SocketAddr>,
    best: Option<Entry>,
    /// The root's own (empty) copy counts towards a majority.
    root_set: Option<usize>,
    wire: ReqId,
    deadline: Micros,
    resend_at: Micros,
}

enum AfterPersist {
    PutLocal {
        op: u64,
        round: ReqId,
    },
    AckReplicate {
        to: NodeHandle,
        req: ReqId,
        bucket: String,
        key: String,
    },
    AckPush {
        to: NodeHandle,
        keys: Vec<KeyRef>,
    },
    Nothing,
}

struct Confirm {
    stamp: Stamp,
    gc: bool,
    need: Vec<SocketAddr>,
    got: Vec<SocketAddr>,
    since: Micros,
}

#[derive(Default)]
struct Scan {
    cursor: Option<Pos>,
    active: bool,
    next_at: Micros,
    dirty: bool,
    passes: u64,
}

struct ClientOp {
    req: ReqId,
    is_put: bool,
    deadline: Micros,
}

/// Counters for status pages and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    pub puts_ok: u64,
    pub puts_failed: u64,
    pub gets: u64,
    pub read_repairs: u64,
    pub handed_off: u64,
    pub tombstones_collected: u64,
    pub passes: u64,
}

/// The replication state machine of one physical node.
pub struct Replicator {
    me: SocketAddr,
    cfg: ReplicaConfig,
    next_id: u64,
    puts: HashMap<u64, PutOp>,
    gets: HashMap<u64, GetOp>,
    /// Wire id of an outgoing replicate or fetch -> the op waiting on it.
    wire: HashMap<ReqId, u64>,
    persists: HashMap<u64, AfterPersist>,
    /// Highest version handed out per key, for the most recent keys.
    assigned: HashMap<(String, String), u64>,
    assigned_order: VecDeque<(String, String)>,
    in_progress: HashMap<(SocketAddr, ReqId), u64>,
    recent: HashMap<(SocketAddr, ReqId), StoreMsg>,
    recent_order: VecDeque<((SocketAddr, ReqId), Micros)>,
    client: HashMap<ReqId, ClientOp>,
    confirms: HashMap<Pos, Confirm>,
    scan: Scan,
    stats: ReplicaStats,
}

fn distinct(mut set: Vec<NodeHandle>) -> Vec<NodeHandle> {
    let mut seen: Vec<SocketAddr> = Vec::with_capacity(set.len());
    set.retain(|h| {
        if seen.contains(&h.addr) {
            false
        } else {
            seen.push(h.addr);
            true
        }
    });
    set
}

fn majority(n: usize) -> usize {
    n / 2 + 1
}

fn small(n: usize) -> u8 {
    n.min(u8::MAX as usize) as u8
}

fn live(e: Option<Entry>) -> Option<Value> {
    e.filter(|e| !e.deleted).map(|e| Value {
        version: e.version,
        value: e.value,
    })
}

impl Replicator {
    /// `me` is this node's address (how replica sets name it); `seed`
    /// starts the request-id counter (pick it at random, or from the clock).
    pub fn new(me: SocketAddr, cfg: ReplicaConfig, seed: u64) -> Replicator {
        Replicator {
            me,
            cfg,
            next_id: seed | 1,
            puts: HashMap::new(),
            gets: HashMap::new(),
            wire: HashMap::new(),
            persists: HashMap::new(),
            assigned: HashMap::new(),
            assigned_order: VecDeque::new(),
            in_progress: HashMap::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            client: HashMap::new(),
            confirms: HashMap::new(),
            scan: Scan::default(),
            stats: ReplicaStats::default(),
        }
    }

    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }

    pub fn stats(&self) -> ReplicaStats {
        ReplicaStats {
            passes: self.scan.passes,
            ..self.stats
        }
    }

    /// Requests coordinated, awaited or being confirmed right now.
    pub fn in_flight(&self) -> usize {
        self.puts.len() + self.gets.len() + self.client.len() + self.persists.len()
    }

    /// True while a maintenance pass is under way or one is due.
    pub fn maintenance_pending(&self, now: Micros) -> bool {
        self.scan.active || self.scan.dirty || now >= self.scan.next_at
    }

    fn id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    // ---- requester side -------------------------------------------------

    /// Writes `value` (None deletes) under `key`; the answer comes as
    /// [`Action::Done`] with `req`.
    pub fn put(
        &mut self,
        now: Micros,
        req: ReqId,
        bucket: &str,
        key: &str,
        value: Option<Vec<u8>>,
        k: u8,
    ) -> Result<Vec<Action>, StoreError> {
        let wire = self.id();
        let msg = StoreMsg::Put {
            req: wire,
            bucket: bucket.to_string(),
            key: key.to_string(),
            value,
            k,
        };
        msg.validate()?;
        self.client.insert(
            wire,
            ClientOp {
                req,
                is_put: true,
                deadline: now + self.cfg.request_timeout,
            },
        );
        Ok(vec![Action::Route {
            key: NodeId::for_key(bucket, key),
            msg,
        }])
    }

    /// Reads `key` through its root; the answer comes as [`Action::Done`].
    /// When it is [`RemoteError::NoAnswer`], the runtime can ask replicas
    /// it knows of directly with [`Replicator::get_from`].
    pub fn get(
        &mut self,
        now: Micros,
        req: ReqId,
        bucket: &str,
        key: &str,
        k: u8,
    ) -> Result<Vec<Action>, StoreError> {
        let wire = self.id();
        let msg = StoreMsg::Get {
            req: wire,
            bucket: bucket.to_string(),
            key: key.to_string(),
            k,
        };
        msg.validate()?;
        self.client.insert(
            wire,
            ClientOp {
                req,
                is_put: false,
                deadline: now + self.cfg.request_timeout,
            },
        );
        Ok(vec![Action::Route {
            key: NodeId::for_key(bucket, key),
            msg,
        }])
    }

    /// Reads `key` from the given replicas directly (fallback when the
    /// root is silent): the newest copy among those that answer within
    /// `get_timeout`. No repair is done from here.
    pub fn get_from(
        &mut self,
        now: Micros,
        req: ReqId,
        bucket: &str,
        key: &str,
        replicas: &[NodeHandle],
    ) -> Result<Vec<Action>, StoreError> {
        check_names(bucket, key)?;
        let asked = distinct(replicas.to_vec());
        let op = GetOp {
            reply_to: ReplyTo::Local { req },
            dedupe: None,
            bucket: bucket.to_string(),
            key: key.to_string(),
            asked,
            answered: Vec::new(),
            best: None,
            root_set: None,
            wire: 0,
            deadline: now + self.cfg.get_timeout,
            resend_at: now + self.cfg.resend_every,
        };
        Ok(self.start_fetch(op))
    }

    // ---- messages -------------------------------------------------------

    /// Feeds one message from `from`. Invalid messages are dropped (a
    /// request gets an `Invalid` answer).
    pub fn handle(
        &mut self,
        now: Micros,
        from: NodeHandle,
        msg: StoreMsg,
        backend: &dyn Backend,
        placement: Placement,
    ) -> Vec<Action> {
        if let Err(e) = msg.validate() {
            tracing::debug!(from = ?from, error = %e, "dropping invalid store message");
            return match msg {
                StoreMsg::Put { req, .. } => vec![send(
                    from,
                    StoreMsg::PutReply {
                        req,
                        result: Err(RemoteError::Invalid(e.to_string())),
                    },
                )],
                StoreMsg::Get { req, .. } => vec![send(
                    from,
                    StoreMsg::GetReply {
                        req,
                        result: Err(RemoteError::Invalid(e.to_string())),
                    },
                )],
                _ => Vec::new(),
            };
        }
        match msg {
            StoreMsg::Put {
                req,
                bucket,
                key,
                value,
                k,
            } => self.on_put(now, from, req, bucket, key, value, k, backend, placement),
            StoreMsg::Get {
                req,
                bucket,
                key,
                k,
            } => self.on_get(now, from, req, bucket, key, k, backend, placement),
            StoreMsg::PutReply { req, result } => self.on_client_reply(req, Outcome::Put(result)),
            StoreMsg::GetReply { req, result } => self.on_client_reply(req, Outcome::Get(result)),
            StoreMsg::Replicate {
                req,
                bucket,
                key,
                entry,
            } => {
                // Another write already holds this version (or a later
                // one): storing ours would order two writes by id alone,
                // so say what is held and let the root write above it.
                if let Ok(Some(m)) = backend.meta(&bucket, &key) {
                    if m.version >= entry.version && m.stamp() != entry.stamp() {
                        return vec![send(
                            from,
                            StoreMsg::ReplicateAck {
                                req,
                                ok: true,
                                held: Some(m.stamp()),
                            },
                        )];
                    }
                }
                let token = self.id();
                self.persists.insert(
                    token,
                    AfterPersist::AckReplicate {
                        to: from,
                        req,
                        bucket: bucket.clone(),
                        key: key.clone(),
                    },
                );
                vec![Action::Persist {
                    token,
                    ops: vec![WriteOp::Put { bucket, key, entry }],
                }]
            }
            StoreMsg::ReplicateAck { req, ok, held } => {
                self.on_replicate_ack(now, from, req, ok, held, backend)
            }
            StoreMsg::Fetch { req, bucket, key } => match backend.get(&bucket, &key) {
                Ok(entry) => vec![send(from, StoreMsg::FetchReply { req, entry })],
                Err(e) => {
                    tracing::warn!(bucket = %bucket, error = %e, "fetch: local read failed");
                    Vec::new()
                }
            },
            StoreMsg::FetchReply { req, entry } => self.on_fetch_reply(from, req, entry),
            StoreMsg::Digest { items } => self.on_digest(from, items, backend),
            StoreMsg::DigestReply { want, have } => {
                let mut out = self.push_items(from, &want, backend);
                out.extend(self.on_have(now, from, have, true, backend, placement));
                out
            }
            StoreMsg::Pull { items } => self.push_items(from, &items, backend),
            StoreMsg::Push { items } => {
                let keys = items
                    .iter()
                    .map(|i| KeyRef {
                        bucket: i.bucket.clone(),
                        key: i.key.clone(),
                    })
                    .collect();
                let token = self.id();
                self.persists
                    .insert(token, AfterPersist::AckPush { to: from, keys });
                let ops = items
                    .into_iter()
                    .map(|i| WriteOp::Put {
                        bucket: i.bucket,
                        key: i.key,
                        entry: i.entry,
                    })
                    .collect();
                vec![Action::Persist { token, ops }]
            }
            StoreMsg::PushAck { have } => self.on_have(now, from, have, false, backend, placement),
        }
    }

    /// The runtime committed (or failed to commit) the ops of
    /// [`Action::Persist`] `token`.
    pub fn persisted(
        &mut self,
        now: Micros,
        token: u64,
        ok: bool,
        backend: &dyn Backend,
    ) -> Vec<Action> {
        let Some(after) = self.persists.remove(&token) else {
            return Vec::new();
        };
        match after {
            AfterPersist::PutLocal { op, round } => {
                let held = if ok { self.held(backend, op) } else { None };
                let Some(p) = self.puts.get_mut(&op) else {
                    return Vec::new();
                };
                if p.round != round {
                    return Vec::new();
                }
                if !ok {
                    p.local = Local::Failed;
                    return Vec::new();
                }
                let ours = p.entry.stamp();
                match held {
                    Some(h) if h == ours => {
                        p.local = Local::Done;
                        self.check_put(now, op)
                    }
                    Some(h) if h.version >= ours.version => self.restart_put(now, op, h, backend),
                    _ => {
                        p.local = Local::Failed;
                        Vec::new()
                    }
                }
            }
            AfterPersist::AckReplicate {
                to,
                req,
                bucket,
                key,
            } => {
                let held = if ok {
                    backend
                        .meta(&bucket, &key)
                        .ok()
                        .flatten()
                        .map(|m| m.stamp())
                } else {
                    None
                };
                vec![send(
                    to,
                    StoreMsg::ReplicateAck {
                        req,
                        ok: ok && held.is_some(),
                        held,
                    },
                )]
            }
            AfterPersist::AckPush { to, keys } => {
                if !ok {
                    return Vec::new();
                }
                let have = keys
                    .into_iter()
                    .filter_map(|k| {
                        let m = backend.meta(&k.bucket, &k.key).ok().flatten()?;
                        Some(HaveItem {
                            bucket: k.bucket,
                            key: k.key,
                            stamp: Some(m.stamp()),
                        })
                    })
                    .collect::<Vec<_>>();
                if have.is_empty() {
                    Vec::new()
                } else {
                    vec![send(to, StoreMsg::PushAck { have })]
                }
            }
            AfterPersist::Nothing => Vec::new(),
        }
    }

    fn held(&self, backend: &dyn Backend, op: u64) -> Option<Stamp> {
        let p = self.puts.get(&op)?;
        backend
            .meta(&p.bucket, &p.key)
            .ok()
            .flatten()
            .map(|m| m.stamp())
    }

    // ---- root: writes ---------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn on_put(
        &mut self,
        now: Micros,
        from: NodeHandle,
        req: ReqId,
        bucket: String,
        key: String,
        value: Option<Vec<u8>>,
        k: u8,
        backend: &dyn Backend,
        placement: Placement,
    ) -> Vec<Action> {
        let dedupe = (from.addr, req);
        if let Some(reply) = self.recent.get(&dedupe) {
            return vec![send(from, reply.clone())];
        }
        if self.in_progress.contains_key(&dedupe) {
            return Vec::new();
        }
        let fail = |e: RemoteError| {
            vec![send(
                from,
                StoreMsg::PutReply {
                    req,
                    result: Err(e),
                },
            )]
        };
        let ring = NodeId::for_key(&bucket, &key);
        let replicas = distinct(placement(ring, k as usize));
        let Some(mine) = replicas.iter().find(|h| h.addr == self.me).copied() else {
            return fail(RemoteError::NotHere {
                root: replicas.first().copied(),
            });
        };
        if self.puts.len() + self.gets.len() >= self.cfg.max_ops {
            return fail(RemoteError::Busy);
        }
        let stored = match backend.meta(&bucket, &key) {
            Ok(m) => m.map_or(0, |m| m.version),
            Err(e) => return fail(RemoteError::Storage(e.to_string())),
        };
        let slot = (bucket.clone(), key.clone());
        let version = stored.max(self.assigned_version(&slot)) + 1;
        self.assign(slot, version);
        let entry = Entry {
            version,
            origin: mine.id,
            write_id: self.id(),
            deleted: value.is_none(),
            k,
            written_at_ms: now / 1000,
            value: value.unwrap_or_default(),
        };
        let op_id = self.id();
        self.in_progress.insert(dedupe, op_id);
        self.puts.insert(
            op_id,
            PutOp {
                reply_to: ReplyTo::Remote { to: from, req },
                dedupe: Some(dedupe),
                bucket,
                key,
                entry,
                replicas,
                round: 0,
                acked: Vec::new(),
                local: Local::Pending,
                attempts: 0,
                deadline: now + self.cfg.put_timeout,
                resend_at: 0,
            },
        );
        self.start_round(now, op_id)
    }

    /// Persists locally and sends the entry to the other replicas, under a
    /// fresh round id.
    fn start_round(&mut self, now: Micros, op_id: u64) -> Vec<Action> {
        let round = self.id();
        let token = self.id();
        let me = self.me;
        let resend_every = self.cfg.resend_every;
        let Some(p) = self.puts.get_mut(&op_id) else {
            return Vec::new();
        };
        self.wire.remove(&p.round);
        p.round = round;
        p.acked.clear();
        p.local = Local::Pending;
        p.attempts += 1;
        p.resend_at = now + resend_every;
        self.wire.insert(round, op_id);
        self.persists
            .insert(token, AfterPersist::PutLocal { op: op_id, round });
        let mut out = vec![Action::Persist {
            token,
            ops: vec![WriteOp::Put {
                bucket: p.bucket.clone(),
                key: p.key.clone(),
                entry: p.entry.clone(),
            }],
        }];
        for r in p.replicas.iter().filter(|h| h.addr != me) {
            out.push(send(
                *r,
                StoreMsg::Replicate {
                    req: round,
                    bucket: p.bucket.clone(),
                    key: p.key.clone(),
                    entry: p.entry.clone(),
                },
            ));
        }
        out
    }

    /// A replica (or the local store) holds a newer copy than the one
    /// being written: the write is re-issued above it, so a write
    /// acknowledged later is never hidden under an older one.
    fn restart_put(
        &mut self,
        now: Micros,
        op_id: u64,
        newer: Stamp,
        backend: &dyn Backend,
    ) -> Vec<Action> {
        let Some(p) = self.puts.get_mut(&op_id) else {
            return Vec::new();
        };
        if p.attempts >= MAX_ATTEMPTS {
            let attempts = p.attempts;
            return self.finish_put(now, op_id, Err(RemoteError::Conflict { attempts }));
        }
        let stored = backend
            .meta(&p.bucket, &p.key)
            .ok()
            .flatten()
            .map_or(0, |m| m.version);
        let slot = (p.bucket.clone(), p.key.clone());
        let version = newer.version.max(stored).max(self.assigned_version(&slot)) + 1;
        self.assign(slot, version);
        let write_id = self.id();
        if let Some(p) = self.puts.get_mut(&op_id) {
            p.entry.version = version;
            p.entry.write_id = write_id;
            p.entry.written_at_ms = now / 1000;
        }
        self.start_round(now, op_id)
    }

    fn on_replicate_ack(
        &mut self,
        now: Micros,
        from: NodeHandle,
        req: ReqId,
        ok: bool,
        held: Option<Stamp>,
        backend: &dyn Backend,
    ) -> Vec<Action> {
        let Some(&op_id) = self.wire.get(&req) else {
            return Vec::new();
        };
        let Some(p) = self.puts.get_mut(&op_id) else {
            return Vec::new();
        };
        if p.round != req || !p.replicas.iter().any(|h| h.addr == from.addr) {
            return Vec::new();
        }
        let ours = p.entry.stamp();
        match held {
            Some(h) if ok && h == ours => {
                if !p.acked.contains(&from.addr) {
                    p.acked.push(from.addr);
                }
                self.check_put(now, op_id)
            }
            Some(h) if h.version >= ours.version => self.restart_put(now, op_id, h, backend),
            _ => Vec::new(),
        }
    }

    fn check_put(&mut self, now: Micros, op_id: u64) -> Vec<Action> {
        let Some(p) = self.puts.get(&op_id) else {
            return Vec::new();
        };
        let committed = p.acked.len() + usize::from(p.local == Local::Done);
        if committed >= majority(p.replicas.len()) {
            let v = p.entry.version;
            self.finish_put(now, op_id, Ok(v))
        } else {
            Vec::new()
        }
    }

    fn finish_put(
        &mut self,
        now: Micros,
        op_id: u64,
        result: Result<u64, RemoteError>,
    ) -> Vec<Action> {
        let Some(p) = self.puts.remove(&op_id) else {
            return Vec::new();
        };
        self.wire.remove(&p.round);
        if result.is_ok() {
            self.stats.puts_ok += 1;
        } else {
            self.stats.puts_failed += 1;
        }
        match p.reply_to {
            ReplyTo::Remote { to, req } => {
                let msg = StoreMsg::PutReply { req, result };
                if let Some(d) = p.dedupe {
                    self.in_progress.remove(&d);
                    self.remember(now, d, msg.clone());
                }
                vec![send(to, msg)]
            }
            ReplyTo::Local { req } => vec![Action::Done {
                req,
                outcome: Outcome::Put(result),
            }],
        }
    }

    /// Highest version this root handed out for a key lately. Kept past
    /// the write's answer because the local commit may still be pending.
    fn assigned_version(&self, slot: &(String, String)) -> u64 {
        self.assigned.get(slot).copied().unwrap_or(0)
    }

    fn assign(&mut self, slot: (String, String), version: u64) {
        if self.assigned.insert(slot.clone(), version).is_none() {
            self.assigned_order.push_back(slot);
            while self.assigned_order.len() > ASSIGNED_MAX {
                if let Some(old) = self.assigned_order.pop_front() {
                    self.assigned.remove(&old);
                }
            }
        }
    }

    fn remember(&mut self, now: Micros, key: (SocketAddr, ReqId), reply: StoreMsg) {
        // Bounded: the oldest answers go first.
        while self.recent_order.len() >= self.cfg.dedupe_max {
            if let Some((old, _)) = self.recent_order.pop_front() {
                self.recent.remove(&old);
            }
        }
        self.recent.insert(key, reply);
        self.recent_order.push_back((key, now));
    }

    // ---- root: reads ----------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn on_get(
        &mut self,
        now: Micros,
        from: NodeHandle,
        req: ReqId,
        bucket: String,
        key: String,
        k: u8,
        backend: &dyn Backend,
        placement: Placement,
    ) -> Vec<Action> {
        let dedupe = (from.addr, req);
        if self.in_progress.contains_key(&dedupe) {
            return Vec::new();
        }
        let reply = |result| vec![send(from, StoreMsg::GetReply { req, result })];
        let replicas = distinct(placement(NodeId::for_key(&bucket, &key), k as usize));
        if !replicas.iter().any(|h| h.addr == self.me) {
            return reply(Err(RemoteError::NotHere {
                root: replicas.first().copied(),
            }));
        }
        self.stats.gets += 1;
        match backend.get(&bucket, &key) {
            Ok(Some(e)) => return reply(Ok(live(Some(e)))),
            Ok(None) => {}
            Err(e) => return reply(Err(RemoteError::Storage(e.to_string()))),
        }
        let asked: Vec<NodeHandle> = replicas
            .iter()
            .filter(|h| h.addr != self.me)
            .copied()
            .collect();
        if asked.is_empty() {
            return reply(Ok(None));
        }
        if self.puts.len() + self.gets.len() >= self.cfg.max_ops {
            return reply(Err(RemoteError::Busy));
        }
        let op = GetOp {
            reply_to: ReplyTo::Remote { to: from, req },
            dedupe: Some(dedupe),
            bucket,
            key,
            asked,
            answered: Vec::new(),
            best: None,
            root_set: Some(replicas.len()),
            wire: 0,
            deadline: now + self.cfg.get_timeout,
            resend_at: now + self.cfg.resend_every,
        };
        self.start_fetch(op)
    }

    fn start_fetch(&mut self, mut op: GetOp) -> Vec<Action> {
        let op_id = self.id();
        op.wire = self.id();
        self.wire.insert(op.wire, op_id);
        if let Some(d) = op.dedupe {
            self.in_progress.insert(d, op_id);
        }
        let out = fetch_msgs(&op, &[]);
        if op.asked.is_empty() {
            self.gets.insert(op_id, op);
            return self.finish_get(op_id, true);
        }
        self.gets.insert(op_id, op);
        out
    }

    fn on_fetch_reply(
        &mut self,
        from: NodeHandle,
        req: ReqId,
        entry: Option<Entry>,
    ) -> Vec<Action> {
        let Some(&op_id) = self.wire.get(&req) else {
            return Vec::new();
        };
        let Some(g) = self.gets.get_mut(&op_id) else {
            return Vec::new();
        };
        if !g.asked.iter().any(|h| h.addr == from.addr) || g.answered.contains(&from.addr) {
            return Vec::new();
        }
        g.answered.push(from.addr);
        if let Some(e) = entry {
            if g.best.as_ref().is_none_or(|b| e.stamp() > b.stamp()) {
                g.best = Some(e);
            }
        }
        if g.answered.len() == g.asked.len() {
            self.finish_get(op_id, true)
        } else {
            Vec::new()
        }
    }

    fn finish_get(&mut self, op_id: u64, all_answered: bool) -> Vec<Action> {
        let Some(g) = self.gets.remove(&op_id) else {
            return Vec::new();
        };
        self.wire.remove(&g.wire);
        let mut out = Vec::new();
        let result = if let Some(best) = g.best {
            if g.root_set.is_some() {
                // Read repair: the root keeps the newest copy it found.
                let token = self.id();
                self.persists.insert(token, AfterPersist::Nothing);
                self.stats.read_repairs += 1;
                out.push(Action::Persist {
                    token,
                    ops: vec![WriteOp::Put {
                        bucket: g.bucket.clone(),
                        key: g.key.clone(),
                        entry: best.clone(),
                    }],
                });
            }
            Ok(live(Some(best)))
        } else {
            let answered = g.answered.len() + usize::from(g.root_set.is_some());
            let enough = match g.root_set {
                Some(n) => answered >= majority(n),
                None => !g.answered.is_empty(),
            };
            if all_answered || enough {
                Ok(None)
            } else {
                Err(RemoteError::Unavailable {
                    answered: small(g.answered.len()),
                    asked: small(g.asked.len()),
                })
            }
        };
        match g.reply_to {
            ReplyTo::Remote { to, req } => {
                if let Some(d) = g.dedupe {
                    self.in_progress.remove(&d);
                }
                out.push(send(to, StoreMsg::GetReply { req, result }));
            }
            ReplyTo::Local { req } => out.push(Action::Done {
                req,
                outcome: Outcome::Get(result),
            }),
        }
        out
    }

    fn on_client_reply(&mut self, wire: ReqId, outcome: Outcome) -> Vec<Action> {
        match self.client.get(&wire) {
            Some(c) if c.is_put == matches!(outcome, Outcome::Put(_)) => {}
            _ => return Vec::new(),
        }
        match self.client.remove(&wire) {
            Some(c) => vec![Action::Done {
                req: c.req,
                outcome,
            }],
            None => Vec::new(),
        }
    }

    // ---- timers ---------------------------------------------------------

    /// Timeouts and resends. Call every ~100 ms.
    pub fn tick(&mut self, now: Micros) -> Vec<Action> {
        let mut out = Vec::new();
        let me = self.me;
        let put_ids: Vec<u64> = self.puts.keys().copied().collect();
        for id in put_ids {
            let Some(p) = self.puts.get_mut(&id) else {
                continue;
            };
            if now >= p.deadline {
                let committed = small(p.acked.len() + usize::from(p.local == Local::Done));
                let needed = small(majority(p.replicas.len()));
                let replicas = small(p.replicas.len());
                out.extend(self.finish_put(
                    now,
                    id,
                    Err(RemoteError::Timeout {
                        committed,
                        needed,
                        replicas,
                    }),
                ));
            } else if now >= p.resend_at {
                p.resend_at = now + self.cfg.resend_every;
                for r in p.replicas.iter() {
                    if r.addr != me && !p.acked.contains(&r.addr) {
                        out.push(send(
                            *r,
                            StoreMsg::Replicate {
                                req: p.round,
                                bucket: p.bucket.clone(),
                                key: p.key.clone(),
                                entry: p.entry.clone(),
                            },
                        ));
                    }
                }
                if p.local == Local::Failed {
                    let (round, ops) = (
                        p.round,
                        vec![WriteOp::Put {
                            bucket: p.bucket.clone(),
                            key: p.key.clone(),
                            entry: p.entry.clone(),
                        }],
                    );
                    p.local = Local::Pending;
                    let token = self.id();
                    self.persists
                        .insert(token, AfterPersist::PutLocal { op: id, round });
                    out.push(Action::Persist { token, ops });
                }
            }
        }
        let get_ids: Vec<u64> = self.gets.keys().copied().collect();
        for id in get_ids {
            let Some(g) = self.gets.get_mut(&id) else {
                continue;
            };
            if now >= g.deadline {
                out.extend(self.finish_get(id, false));
            } else if now >= g.resend_at {
                g.resend_at = now + self.cfg.resend_every;
                let answered = g.answered.clone();
                out.extend(fetch_msgs(g, &answered));
            }
        }
        let expired: Vec<ReqId> = self
            .client
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(w, _)| *w)
            .collect();
        for w in expired {
            if let Some(c) = self.client.remove(&w) {
                let outcome = if c.is_put {
                    Outcome::Put(Err(RemoteError::NoAnswer))
                } else {
                    Outcome::Get(Err(RemoteError::NoAnswer))
                };
                out.push(Action::Done {
                    req: c.req,
                    outcome,
                });
            }
        }
        let ttl = self.cfg.confirm_ttl;
        self.confirms.retain(|_, c| now < c.since + ttl);
        while let Some((key, at)) = self.recent_order.front() {
            if now >= at + self.cfg.dedupe_for {
                let key = *key;
                self.recent.remove(&key);
                self.recent_order.pop_front();
            } else {
                break;
            }
        }
        out
    }

    // ---- anti-entropy and hand-off --------------------------------------

    /// The leaf set changed: start a fresh maintenance pass.
    pub fn membership_changed(&mut self) {
        self.scan.dirty = true;
    }

    /// One bounded step of anti-entropy, hand-off and tombstone collection
    /// (at most `scan_budget` keys). Does nothing unless a pass is under
    /// way or due; call it on every tick.
    pub fn maintain(
        &mut self,
        now: Micros,
        backend: &dyn Backend,
        placement: Placement,
    ) -> Vec<Action> {
        if !self.scan.active {
            if !(self.scan.dirty || now >= self.scan.next_at) {
                return Vec::new();
            }
            // A change during a pass leaves `dirty` set, so the keys the
            // pass had already passed are seen again right after it ends
            // (restarting instead could starve the tail under churn).
            self.scan.active = true;
            self.scan.dirty = false;
            self.scan.cursor = None;
        }
        let chunk = match backend.scan_meta(self.scan.cursor.as_ref(), self.cfg.scan_budget) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "anti-entropy scan failed; retrying next pass");
                self.end_pass(now);
                return Vec::new();
            }
        };
        if chunk.len() < self.cfg.scan_budget {
            self.end_pass(now);
        } else {
            self.scan.cursor = chunk.last().map(|(p, _)| p.clone());
        }
        let now_ms = now / 1000;
        let mut batches: Vec<(NodeHandle, Vec<DigestItem>)> = Vec::new();
        let mut removes = Vec::new();
        for (pos, meta) in chunk {
            let set = distinct(placement(pos.ring, meta.k as usize));
            if set.is_empty() {
                continue;
            }
            let member = set.iter().any(|h| h.addr == self.me);
            let peers: Vec<NodeHandle> = set.into_iter().filter(|h| h.addr != self.me).collect();
            let gc = meta.deleted
                && now_ms.saturating_sub(meta.written_at_ms) >= self.cfg.tombstone_gc_age_ms;
            if !member || gc {
                if peers.is_empty() {
                    if gc && member {
                        // A lone replica: nobody else to wait for.
                        self.confirms.remove(&pos);
                        self.stats.tombstones_collected += 1;
                        removes.push(remove_op(&pos, meta.stamp()));
                    }
                    continue;
                }
                self.track(now, &pos, meta.stamp(), gc, &peers);
            }
            let item = DigestItem {
                bucket: pos.bucket.clone(),
                key: pos.key.clone(),
                stamp: meta.stamp(),
                gc,
            };
            for p in peers {
                match batches.iter_mut().find(|(h, _)| h.addr == p.addr) {
                    Some((_, items)) => items.push(item.clone()),
                    None => batches.push((p, vec![item.clone()])),
                }
            }
        }
        let per = self.cfg.digest_batch.clamp(1, MAX_ITEMS);
        let mut out = Vec::new();
        if !removes.is_empty() {
            let token = self.id();
            self.persists.insert(token, AfterPersist::Nothing);
            out.push(Action::Persist {
                token,
                ops: removes,
            });
        }
        for (to, items) in batches {
            for c in items.chunks(per) {
                out.push(send(to, StoreMsg::Digest { items: c.to_vec() }));
            }
        }
        out
    }

    fn end_pass(&mut self, now: Micros) {
        self.scan.active = false;
        self.scan.cursor = None;
        self.scan.next_at = now + self.cfg.maintain_every;
        self.scan.passes += 1;
    }

    /// Starts (or keeps) waiting for every peer to confirm a copy at least
    /// as new as `stamp` before the local copy may go.
    fn track(&mut self, now: Micros, pos: &Pos, stamp: Stamp, gc: bool, peers: &[NodeHandle]) {
        let need: Vec<SocketAddr> = peers.iter().map(|h| h.addr).collect();
        if let Some(c) = self.confirms.get_mut(pos) {
            if c.stamp == stamp && c.gc == gc && c.need == need {
                return;
            }
        } else if self.confirms.len() >= self.cfg.max_confirms {
            return;
        }
        self.confirms.insert(
            pos.clone(),
            Confirm {
                stamp,
                gc,
                need,
                got: Vec::new(),
                since: now,
            },
        );
    }

    fn on_digest(
        &mut self,
        from: NodeHandle,
        items: Vec<DigestItem>,
        backend: &dyn Backend,
    ) -> Vec<Action> {
        let mut want = Vec::new();
        let mut have = Vec::new();
        for it in items {
            match backend.meta(&it.bucket, &it.key) {
                Ok(Some(m)) if m.stamp() >= it.stamp => have.push(HaveItem {
                    bucket: it.bucket,
                    key: it.key,
                    stamp: Some(m.stamp()),
                }),
                Ok(None) if it.gc => have.push(HaveItem {
                    bucket: it.bucket,
                    key: it.key,
                    stamp: None,
                }),
                Ok(_) => want.push(KeyRef {
                    bucket: it.bucket,
                    key: it.key,
                }),
                Err(e) => {
                    tracing::warn!(bucket = %it.bucket, error = %e, "digest: local read failed")
                }
            }
        }
        if want.is_empty() && have.is_empty() {
            return Vec::new();
        }
        vec![send(from, StoreMsg::DigestReply { want, have })]
    }

    /// Sends whole entries for `keys`, in pushes bounded by `push_bytes`
    /// (never above one maximal value, so every push fits in `MAX_MSG`).
    fn push_items(
        &mut self,
        to: NodeHandle,
        keys: &[KeyRef],
        backend: &dyn Backend,
    ) -> Vec<Action> {
        let budget = self.cfg.push_bytes.min(MAX_VALUE);
        let mut out = Vec::new();
        let mut items = Vec::new();
        let mut bytes = 0usize;
        for k in keys {
            let Ok(Some(entry)) = backend.get(&k.bucket, &k.key) else {
                continue;
            };
            let len = entry.value.len() + k.key.len() + k.bucket.len() + 64;
            if !items.is_empty() && (bytes + len > budget || items.len() >= MAX_ITEMS) {
                out.push(send(
                    to,
                    StoreMsg::Push {
                        items: std::mem::take(&mut items),
                    },
                ));
                bytes = 0;
            }
            bytes += len;
            items.push(Item {
                bucket: k.bucket.clone(),
                key: k.key.clone(),
                entry,
            });
        }
        if !items.is_empty() {
            out.push(send(to, StoreMsg::Push { items }));
        }
        out
    }

    /// A peer says what it holds: count confirmations for hand-off and
    /// collection, and pull copies newer than ours when we are a replica.
    fn on_have(
        &mut self,
        _now: Micros,
        from: NodeHandle,
        have: Vec<HaveItem>,
        may_pull: bool,
        backend: &dyn Backend,
        placement: Placement,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let mut pull = Vec::new();
        for h in have {
            let pos = Pos::new(&h.bucket, &h.key);
            if let Some(c) = self.confirms.get_mut(&pos) {
                let ok = match h.stamp {
                    Some(s) => s >= c.stamp,
                    None => c.gc,
                };
                if ok && c.need.contains(&from.addr) && !c.got.contains(&from.addr) {
                    c.got.push(from.addr);
                }
                if c.got.len() == c.need.len() {
                    let (stamp, gc) = (c.stamp, c.gc);
                    self.confirms.remove(&pos);
                    if gc {
                        self.stats.tombstones_collected += 1;
                    } else {
                        self.stats.handed_off += 1;
                    }
                    let token = self.id();
                    self.persists.insert(token, AfterPersist::Nothing);
                    out.push(Action::Persist {
                        token,
                        ops: vec![remove_op(&pos, stamp)],
                    });
                    continue;
                }
            }
            if !may_pull {
                continue;
            }
            let Some(theirs) = h.stamp else { continue };
            let ours = match backend.meta(&h.bucket, &h.key) {
                Ok(m) => m,
                Err(_) => continue,
            };
            if ours.is_some_and(|m| m.stamp() >= theirs) {
                continue;
            }
            let k = ours.map_or(super::entry::DEFAULT_K, |m| m.k);
            let set = placement(pos.ring, k as usize);
            if set.iter().any(|s| s.addr == self.me) {
                pull.push(KeyRef {
                    bucket: h.bucket,
                    key: h.key,
                });
            }
        }
        if !pull.is_empty() {
            out.push(send(from, StoreMsg::Pull { items: pull }));
        }
        out
    }
}

fn remove_op(pos: &Pos, upto: Stamp) -> WriteOp {
    WriteOp::Remove {
        bucket: pos.bucket.clone(),
        key: pos.key.clone(),
        upto,
    }
}

fn send(to: NodeHandle, msg: StoreMsg) -> Action {
    Action::Send { to, msg }
}

fn fetch_msgs(g: &GetOp, skip: &[SocketAddr]) -> Vec<Action> {
    g.asked
        .iter()
        .filter(|h| !skip.contains(&h.addr))
        .map(|h| {
            send(
                *h,
                StoreMsg::Fetch {
                    req: g.wire,
                    bucket: g.bucket.clone(),
                    key: g.key.clone(),
                },
            )
        })
        .collect()
}

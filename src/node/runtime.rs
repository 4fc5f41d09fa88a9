//! The node runtime: feeds the sans-IO cores (one Pastry instance per vnode,
//! one replication core for the node) from QUIC, a clock and redb, and
//! carries out what they ask. All cores sit behind one mutex that is only
//! held while a core runs, never across an await.

use super::calls::Call;
use super::config::NodeConfig;
use super::metrics::Metrics;
use super::wall_us;
use crate::id::{Micros, NodeHandle, NodeId};
use crate::overlay::{self, Pastry};
use crate::store::replica::{
    self, Outcome, RemoteError, ReplicaConfig, Replicator, StoreMsg, Value,
};
use crate::store::{Db, StoreError};
use crate::transport::{Frame, Identity, Incoming, Transport};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

// A routed store request carries one value; a frame carries one store
// message. Checked at compile time so the layers' bounds cannot drift apart.
const _: () = assert!(overlay::MAX_PAYLOAD >= crate::store::MAX_VALUE + 32 * 1024);
const _: () = assert!(overlay::MAX_FRAME <= crate::store::replica::MAX_MSG + 64 * 1024);

/// Every message between nodes: the frame body.
#[derive(Debug, Serialize, Deserialize)]
pub enum Wire {
    Overlay(overlay::Msg),
    Store(StoreMsg),
    /// A request to this very node (see `calls`).
    Call {
        req: u64,
        call: Call,
    },
    /// The answer to a `Call`, routed or direct.
    CallReply {
        req: u64,
        result: Result<Vec<u8>, String>,
    },
    /// Multicast trees (see `pubsub`).
    Scribe(overlay::scribe::Msg),
    /// One round of the vnode game, between nodes' vnode 0.
    Game(crate::game::GameMsg),
}

/// What travels inside an overlay-routed message, opaque to the overlay.
#[derive(Debug, Serialize, Deserialize)]
pub enum Routed {
    Store(StoreMsg),
    /// A request for whichever node is the key's root.
    Call {
        req: u64,
        call: Call,
    },
}

impl Wire {
    fn kind(&self) -> &'static str {
        match self {
            Wire::Overlay(_) => "overlay",
            Wire::Store(_) => "store",
            Wire::Call { .. } => "call",
            Wire::CallReply { .. } => "call_reply",
            Wire::Scribe(m) => m.kind(),
            Wire::Game(_) => "game",
        }
    }
}

/// A client operation that failed, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
    /// The node's storage limit (board profile or config) would be passed.
    #[error("{0}")]
    Full(String),
}

impl OpError {
    /// The HTTP status a client gets for it.
    pub fn status(&self) -> hyper::StatusCode {
        match self {
            OpError::Invalid(_) => hyper::StatusCode::BAD_REQUEST,
            OpError::Unavailable(_) => hyper::StatusCode::SERVICE_UNAVAILABLE,
            OpError::Timeout(_) => hyper::StatusCode::GATEWAY_TIMEOUT,
            OpError::Full(_) => hyper::StatusCode::INSUFFICIENT_STORAGE,
            OpError::Internal(_) => hyper::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::BadBucket { .. }
            | StoreError::BadKey { .. }
            | StoreError::ValueTooLarge { .. }
            | StoreError::BadK { .. } => OpError::Invalid(e.to_string()),
            _ => OpError::Internal(e.to_string()),
        }
    }
}

impl From<RemoteError> for OpError {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::Invalid(s) => OpError::Invalid(s),
            RemoteError::Timeout { .. } | RemoteError::NoAnswer => OpError::Timeout(e.to_string()),
            _ => OpError::Unavailable(e.to_string()),
        }
    }
}

/// Where the answer to one outstanding call goes.
pub(crate) type CallWaiter = async_channel::Sender<Result<Vec<u8>, String>>;

pub(crate) struct Cores {
    pub vnodes: BTreeMap<NodeId, Pastry>,
    pub replica: Replicator,
}

impl Cores {
    /// The local vnode closest to `key`: the best place to start routing.
    pub(crate) fn nearest_vnode(&self, key: NodeId) -> Option<NodeId> {
        let mut best: Option<NodeId> = None;
        for id in self.vnodes.keys() {
            best = match best {
                Some(b) if !key.closer(*id, b) => Some(b),
                _ => Some(*id),
            };
        }
        best
    }

    pub fn placement(&self, key: NodeId, k: usize) -> Vec<NodeHandle> {
        placement(&self.vnodes, key, k)
    }
}

/// The replica set of `key` as this node sees it: the `k` closest vnodes
/// on distinct physical nodes, closest first.
pub(crate) fn placement(
    vnodes: &BTreeMap<NodeId, Pastry>,
    key: NodeId,
    k: usize,
) -> Vec<NodeHandle> {
    {
        let mut cand: Vec<NodeHandle> = Vec::new();
        for p in vnodes.values() {
            cand.extend(p.closest(key, k * 4 + 4));
        }
        cand.sort_by(|a, b| key.by_closeness(a.id, b.id));
        let mut out: Vec<NodeHandle> = Vec::with_capacity(k);
        for c in cand {
            if out.iter().all(|o| o.addr != c.addr) {
                out.push(c);
                if out.len() == k {
                    break;
                }
            }
        }
        out
    }
}

/// Work found while running a core that must run another core on this node
/// (a message between two of our own vnodes, a routed message delivered
/// here) or leave it (a send, a commit).
enum Work {
    Overlay {
        vnode: NodeId,
        from: NodeHandle,
        msg: overlay::Msg,
    },
    Store {
        from: NodeHandle,
        msg: StoreMsg,
    },
}

#[derive(Default)]
pub(crate) struct Ctx {
    queue: VecDeque<Work>,
    effects: Vec<Effect>,
}

impl Ctx {
    pub(crate) fn push_send(&mut self, from: NodeId, to: NodeHandle, wire: Wire) {
        self.effects.push(Effect::Send { from, to, wire });
    }
}

pub(crate) enum Effect {
    Send {
        from: NodeId,
        to: NodeHandle,
        wire: Wire,
    },
    Persist {
        token: u64,
        ops: Vec<crate::store::WriteOp>,
    },
    Done {
        req: u64,
        outcome: Outcome,
    },
    Joined(NodeId),
    LeafSetChanged,
    /// Serve a call and answer `origin`.
    Serve {
        origin: NodeHandle,
        req: u64,
        call: Call,
    },
}

pub struct Node {
    pub cfg: NodeConfig,
    pub name: String,
    pub zone: String,
    pub max_vnodes: u32,
    pub quic: SocketAddr,
    pub http: Mutex<Option<SocketAddr>>,
    pub transport: Transport,
    pub db: Db,
    pub metrics: Metrics,
    pub(crate) cores: Mutex<Cores>,
    pending: Mutex<HashMap<u64, async_channel::Sender<Outcome>>>,
    pub(crate) calls: Mutex<HashMap<u64, CallWaiter>>,
    pub(crate) next_req: AtomicU64,
    epoch: Instant,
    pub(crate) stopping: AtomicBool,
    pub(crate) identity_vnodes: Vec<NodeId>,
    pub functions: super::functions::Functions,
    /// Apps, handlers, timers and pub/sub (see `apps`).
    pub apps: super::apps::Apps,
    pub(crate) vnode_control: Mutex<super::vnodes::VnodeControl>,
    pub(crate) objects: super::objects::Objects,
}

/// Wall-clock microseconds: the replication core compares tombstone ages
/// across nodes, so it runs on wall time; the overlay runs on a monotonic
/// clock.
impl Node {
    pub fn new(
        cfg: NodeConfig,
        identity: &Identity,
        transport: Transport,
        advertise: SocketAddr,
        db: Db,
    ) -> Arc<Node> {
        let max_vnodes = identity.max_vnodes().min(cfg.max_vnodes);
        let vnodes_n = cfg.vnodes.min(max_vnodes).max(1);
        let ocfg = overlay::Config {
            leaf_set_size: cfg.leaf_set,
            ..overlay::Config::default()
        };
        let mut vnodes = BTreeMap::new();
        for i in 0..vnodes_n {
            let me = NodeHandle {
                id: identity.vnode_id(i),
                addr: advertise,
            };
            // Probe tags must not be predictable from the id.
            let c = overlay::Config {
                seed: rand::random(),
                ..ocfg.clone()
            };
            vnodes.insert(me.id, Pastry::new(me, c));
        }
        // Request ids must not repeat those of an earlier life of this node.
        let seed = wall_us() ^ ((std::process::id() as u64) << 40);
        let replica = Replicator::new(advertise, ReplicaConfig::default(), seed);
        Arc::new(Node {
            name: identity.name().to_string(),
            zone: identity.zone().to_string(),
            max_vnodes,
            quic: advertise,
            http: Mutex::new(None),
            transport,
            db,
            metrics: Metrics::default(),
            cores: Mutex::new(Cores { vnodes, replica }),
            pending: Mutex::new(HashMap::new()),
            calls: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            epoch: Instant::now(),
            stopping: AtomicBool::new(false),
            identity_vnodes: identity.vnode_ids().to_vec(),
            functions: super::functions::Functions::new(
                &cfg.functions,
                &cfg.data_dir(),
                identity.name(),
                identity.vnode_id(0),
            ),
            apps: super::apps::Apps::new(),
            vnode_control: Mutex::new(super::vnodes::VnodeControl::new(
                identity.vnode_id(0),
                cfg.capacity,
                identity.max_vnodes().min(cfg.max_vnodes),
                cfg.fleet,
                if cfg.vnode_game {
                    super::vnodes::Mode::Auto
                } else {
                    super::vnodes::Mode::Pinned(vnodes_n)
                },
            )),
            objects: super::objects::Objects::default(),
            cfg,
        })
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    pub fn now(&self) -> Micros {
        self.epoch.elapsed().as_micros() as u64
    }

    pub fn uptime(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Cores> {
        // A panic while holding the lock aborts the process (panic = abort
        // in release), so a poisoned mutex only happens in tests; go on.
        self.cores.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn vnode_ids(&self) -> Vec<NodeId> {
        self.lock().vnodes.keys().copied().collect()
    }

    pub fn joined(&self) -> bool {
        self.lock().vnodes.values().all(|p| p.joined())
    }

    // ---- running the cores ---------------------------------------------

    /// Runs `f` on the cores, then everything it leads to on this node (a
    /// message between two of our vnodes, a routed message delivered here),
    /// all under one lock; then carries out the effects outside it.
    pub(crate) fn drive(self: &Arc<Self>, f: impl FnOnce(&Self, &mut Cores, &mut Ctx)) {
        let effects = {
            let mut guard = self.lock();
            let cores = &mut *guard;
            let mut ctx = Ctx::default();
            f(self, cores, &mut ctx);
            let (now, wall) = (self.now(), wall_us());
            while let Some(w) = ctx.queue.pop_front() {
                match w {
                    Work::Overlay { vnode, from, msg } => {
                        let Some(p) = cores.vnodes.get_mut(&vnode) else {
                            tracing::debug!(to = %vnode.short(), "message for a vnode this node does not run");
                            continue;
                        };
                        let acts = p.handle(now, from, msg);
                        self.overlay_actions(cores, vnode, acts, &mut ctx);
                    }
                    Work::Store { from, msg } => {
                        let vn = &cores.vnodes;
                        let place = |key: NodeId, k: usize| placement(vn, key, k);
                        let acts = cores.replica.handle(wall, from, msg, &self.db, &place);
                        self.store_actions(cores, acts, &mut ctx);
                    }
                }
            }
            ctx.effects
        };
        self.apply(effects);
    }

    pub(crate) fn overlay_actions(
        &self,
        cores: &mut Cores,
        vnode: NodeId,
        acts: Vec<overlay::Action>,
        ctx: &mut Ctx,
    ) {
        for a in acts {
            match a {
                overlay::Action::Send { to, msg } => {
                    if cores.vnodes.contains_key(&to.id) && to.addr == self.quic {
                        let from = NodeHandle {
                            id: vnode,
                            addr: self.quic,
                        };
                        ctx.queue.push_back(Work::Overlay {
                            vnode: to.id,
                            from,
                            msg,
                        });
                    } else {
                        ctx.effects.push(Effect::Send {
                            from: vnode,
                            to,
                            wire: Wire::Overlay(msg),
                        });
                    }
                }
                overlay::Action::Deliver {
                    key: _,
                    origin,
                    hops,
                    payload,
                } => {
                    self.metrics.record_hops(hops);
                    match postcard::from_bytes::<Routed>(&payload) {
                        Ok(Routed::Store(msg)) => {
                            ctx.queue.push_back(Work::Store { from: origin, msg })
                        }
                        Ok(Routed::Call { req, call }) => {
                            ctx.effects.push(Effect::Serve { origin, req, call })
                        }
                        Err(e) => tracing::warn!(from = ?origin, "undecodable routed message: {e}"),
                    }
                }
                overlay::Action::Joined => ctx.effects.push(Effect::Joined(vnode)),
                overlay::Action::LeafSetChanged => {
                    cores.replica.membership_changed();
                    ctx.effects.push(Effect::LeafSetChanged);
                }
                overlay::Action::NodeFailed(h) => {
                    tracing::info!(peer = ?h, "peer declared failed");
                }
            }
        }
    }

    fn store_actions(&self, cores: &mut Cores, acts: Vec<replica::Action>, ctx: &mut Ctx) {
        let now = self.now();
        for a in acts {
            match a {
                replica::Action::Send { to, msg } => {
                    let me = NodeHandle {
                        id: to.id,
                        addr: self.quic,
                    };
                    if to.addr == self.quic {
                        ctx.queue.push_back(Work::Store { from: me, msg });
                    } else {
                        let from = cores
                            .nearest_vnode(to.id)
                            .unwrap_or(self.identity_vnodes[0]);
                        ctx.effects.push(Effect::Send {
                            from,
                            to,
                            wire: Wire::Store(msg),
                        });
                    }
                }
                replica::Action::Route { key, msg } => {
                    let payload = match postcard::to_allocvec(&Routed::Store(msg)) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::error!("encoding a routed store message: {e}");
                            continue;
                        }
                    };
                    let Some(v) = cores.nearest_vnode(key) else {
                        continue;
                    };
                    let acts = match cores.vnodes.get_mut(&v).map(|p| p.route(now, key, payload)) {
                        Some(Ok(a)) => a,
                        Some(Err(e)) => {
                            tracing::warn!("cannot route a store message: {e}");
                            continue;
                        }
                        None => continue,
                    };
                    self.overlay_actions(cores, v, acts, ctx);
                }
                replica::Action::Persist { token, ops } => {
                    ctx.effects.push(Effect::Persist { token, ops })
                }
                replica::Action::Done { req, outcome } => {
                    ctx.effects.push(Effect::Done { req, outcome })
                }
            }
        }
    }

    fn apply(self: &Arc<Self>, effects: Vec<Effect>) {
        let mut maintenance = false;
        for e in effects {
            match e {
                Effect::Send { from, to, wire } => self.spawn_send(from, to, wire),
                Effect::Persist { token, ops } => {
                    let node = self.clone();
                    smol::spawn(async move {
                        let t = Instant::now();
                        let written = super::metrics::replica_writes(&ops, &node.identity_vnodes);
                        let res = node.db.commit(ops).await;
                        node.metrics
                            .commit_latency
                            .record_us(t.elapsed().as_micros() as u64);
                        match &res {
                            Ok(()) => node.metrics.record_replication_lag(&written, wall_us()),
                            Err(e) => tracing::error!("store commit failed: {e}"),
                        }
                        node.drive(|n, cores, ctx| {
                            let acts =
                                cores
                                    .replica
                                    .persisted(wall_us(), token, res.is_ok(), &n.db);
                            n.store_actions(cores, acts, ctx);
                        });
                    })
                    .detach();
                }
                Effect::Done { req, outcome } => {
                    let tx = self.pending.lock().ok().and_then(|mut p| p.remove(&req));
                    if let Some(tx) = tx {
                        let _ = tx.try_send(outcome);
                    }
                }
                Effect::Joined(v) => {
                    tracing::info!(vnode = %v, "joined the overlay");
                    maintenance = true;
                }
                Effect::LeafSetChanged => maintenance = true,
                Effect::Serve { origin, req, call } => self.spawn_serve(origin, req, call),
            }
        }
        if maintenance {
            self.lock().replica.membership_changed();
        }
    }

    pub(crate) fn spawn_send(self: &Arc<Self>, from: NodeId, to: NodeHandle, wire: Wire) {
        let kind = wire.kind();
        let body = match postcard::to_allocvec(&wire) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("encoding a {kind} message: {e}");
                return;
            }
        };
        self.metrics.msgs_out.inc(kind);
        let node = self.clone();
        smol::spawn(async move {
            let frame = Frame {
                from,
                to: to.id,
                body,
            };
            if let Err(e) = node.transport.send(to.addr, Some(to.id), frame).await {
                node.metrics.send_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(to = ?to, "send failed: {e}");
                if node.stopping.load(Ordering::Relaxed) {
                    return;
                }
                match wire {
                    Wire::Overlay(msg) => node.drive(|n, cores, ctx| {
                        if let Some(p) = cores.vnodes.get_mut(&from) {
                            let acts = p.send_failed(n.now(), to, msg);
                            n.overlay_actions(cores, from, acts, ctx);
                        }
                    }),
                    // The overlay forgets `to` and the multicast trees
                    // through it are repaired (as `sim::subscribe` does).
                    Wire::Scribe(_) => {
                        node.drive(|n, cores, ctx| {
                            if let Some(p) = cores.vnodes.get_mut(&from) {
                                let acts = p.peer_failed(n.now(), to);
                                n.overlay_actions(cores, from, acts, ctx);
                            }
                        });
                        node.scribe_send_failed(to);
                    }
                    _ => {}
                }
            }
        })
        .detach();
    }

    /// Feeds frames from the transport to the cores.
    pub async fn receive_loop(self: Arc<Self>, incoming: Incoming) {
        while let Ok(rcv) = incoming.recv().await {
            let wire: Wire = match postcard::from_bytes(&rcv.frame.body) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(peer = %rcv.peer.addr, "undecodable message: {e}");
                    self.metrics.msgs_in.inc("malformed");
                    continue;
                }
            };
            self.metrics.msgs_in.inc(wire.kind());
            if let Some(&id0) = rcv.peer.vnode_ids().first() {
                self.learn_peer(rcv.peer.addr, id0);
            }
            let from = NodeHandle {
                id: rcv.frame.from,
                addr: rcv.peer.addr,
            };
            let work = match wire {
                Wire::Overlay(msg) => Work::Overlay {
                    vnode: rcv.frame.to,
                    from,
                    msg,
                },
                Wire::Store(msg) => {
                    if let Err(e) = msg.validate() {
                        tracing::warn!(peer = %rcv.peer.addr, "invalid store message: {e}");
                        self.metrics.msgs_in.inc("malformed");
                        continue;
                    }
                    Work::Store { from, msg }
                }
                Wire::Call { req, call } => {
                    self.spawn_serve(from, req, call);
                    continue;
                }
                Wire::CallReply { req, result } => {
                    self.complete_call(req, result);
                    continue;
                }
                Wire::Scribe(msg) => {
                    self.scribe_received(from, msg);
                    continue;
                }
                Wire::Game(m) => {
                    self.game_message(rcv.frame.from, m);
                    continue;
                }
            };
            self.drive(|_, _, ctx| ctx.queue.push_back(work));
        }
        tracing::info!("transport closed; receive loop ends");
    }

    /// Periodic work of every core: probes, repair, timeouts, anti-entropy.
    pub async fn tick_loop(self: Arc<Self>) {
        let mut timer = smol::Timer::interval(Duration::from_millis(50));
        loop {
            futures_lite::StreamExt::next(&mut timer).await;
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            self.drive(|n, cores, ctx| {
                let (now, wall) = (n.now(), wall_us());
                let ids: Vec<NodeId> = cores.vnodes.keys().copied().collect();
                for v in ids {
                    if let Some(p) = cores.vnodes.get_mut(&v) {
                        let acts = p.tick(now);
                        n.overlay_actions(cores, v, acts, ctx);
                    }
                }
                let acts = cores.replica.tick(wall);
                n.store_actions(cores, acts, ctx);
                // Anti-entropy only once this node has a place in the ring.
                if cores.vnodes.values().all(|p| p.joined()) {
                    let vn = &cores.vnodes;
                    let place = |key: NodeId, k: usize| placement(vn, key, k);
                    let acts = cores.replica.maintain(wall, &n.db, &place);
                    n.store_actions(cores, acts, ctx);
                }
            });
        }
    }

    // ---- joining ----------------------------------------------------------

    /// Joins through the given peers (and those remembered from an earlier
    /// run); with none, starts a new ring.
    pub async fn join_loop(self: Arc<Self>, join: Vec<String>) {
        let remembered = super::peers::load(&self.cfg.data_dir());
        if join.is_empty() && remembered.is_empty() {
            self.bootstrap_alone();
            return;
        }
        let mut backoff = Duration::from_millis(500);
        let mut rounds = 0u32;
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            let mut candidates: Vec<String> = join.clone();
            candidates.extend(remembered.iter().map(|a| a.to_string()));
            for c in &candidates {
                match self.try_join(c).await {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => tracing::warn!("joining through {c}: {e}"),
                }
            }
            rounds += 1;
            if join.is_empty() && rounds >= 3 {
                tracing::warn!(
                    "no remembered peer answered after {rounds} rounds; starting a new ring"
                );
                self.bootstrap_alone();
                return;
            }
            smol::Timer::after(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    }

    fn bootstrap_alone(self: &Arc<Self>) {
        self.drive(|n, cores, ctx| {
            let ids: Vec<NodeId> = cores.vnodes.keys().copied().collect();
            let now = n.now();
            let Some(first) = ids.first().copied() else {
                return;
            };
            let first_h = NodeHandle {
                id: first,
                addr: n.quic,
            };
            for v in ids {
                if let Some(p) = cores.vnodes.get_mut(&v) {
                    let acts = if v == first {
                        p.bootstrap_alone();
                        vec![overlay::Action::Joined]
                    } else {
                        p.join(now, first_h)
                    };
                    n.overlay_actions(cores, v, acts, ctx);
                }
            }
        });
        tracing::info!("started a new ring");
    }

    async fn try_join(self: &Arc<Self>, peer: &str) -> Result<bool, String> {
        let addr = resolve(peer).await?;
        if addr == self.quic {
            return Err("that is this node's own address".into());
        }
        let info = self
            .transport
            .peer_info(addr)
            .await
            .map_err(|e| e.to_string())?;
        let Some(&via_id) = info.vnode_ids().first() else {
            return Err("peer certificate grants no vnodes".into());
        };
        let via = NodeHandle { id: via_id, addr };
        tracing::info!(peer = %addr, name = %info.name, "joining through");
        self.drive(|n, cores, ctx| {
            let now = n.now();
            let ids: Vec<NodeId> = cores.vnodes.keys().copied().collect();
            for v in ids {
                if let Some(p) = cores.vnodes.get_mut(&v) {
                    if !p.joined() {
                        let acts = p.join(now, via);
                        n.overlay_actions(cores, v, acts, ctx);
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.joined() {
                return Ok(true);
            }
            smol::Timer::after(Duration::from_millis(50)).await;
        }
        Ok(false)
    }

    /// Remembers the addresses of the leaf set so a restart can rejoin with
    /// no `--join`.
    pub async fn remember_peers_loop(self: Arc<Self>) {
        loop {
            smol::Timer::after(Duration::from_secs(10)).await;
            let addrs: Vec<SocketAddr> = {
                let cores = self.lock();
                let mut a: Vec<SocketAddr> = cores
                    .vnodes
                    .values()
                    .flat_map(|p| p.leaf_set())
                    .map(|h| h.addr)
                    .filter(|a| *a != self.quic)
                    .collect();
                a.sort();
                a.dedup();
                a
            };
            if !addrs.is_empty() {
                if let Err(e) = super::peers::save(&self.cfg.data_dir(), &addrs) {
                    tracing::warn!("saving known peers: {e}");
                }
            }
        }
    }

    /// Graceful stop: tell the leaf sets, give the messages a moment.
    pub async fn leave(self: &Arc<Self>) {
        self.drive(|n, cores, ctx| {
            let now = n.now();
            let ids: Vec<NodeId> = cores.vnodes.keys().copied().collect();
            for v in ids {
                if let Some(p) = cores.vnodes.get_mut(&v) {
                    let acts = p.leave(now);
                    n.overlay_actions(cores, v, acts, ctx);
                }
            }
        });
        self.stopping.store(true, Ordering::Relaxed);
        smol::Timer::after(Duration::from_millis(300)).await;
        self.transport.close();
    }

    // ---- client operations ---------------------------------------------

    fn register(&self) -> (u64, async_channel::Receiver<Outcome>) {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = async_channel::bounded(1);
        if let Ok(mut p) = self.pending.lock() {
            p.insert(req, tx);
        }
        (req, rx)
    }

    async fn wait(
        &self,
        req: u64,
        rx: async_channel::Receiver<Outcome>,
    ) -> Result<Outcome, OpError> {
        let out = futures_lite::future::or(async { rx.recv().await.ok() }, async {
            smol::Timer::after(Duration::from_secs(30)).await;
            None
        })
        .await;
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&req);
        }
        out.ok_or_else(|| OpError::Timeout("no answer from the store within 30 s".into()))
    }

    /// Replication factor of `bucket`: its app's, else the node's default.
    pub fn k_of(&self, bucket: &str) -> u8 {
        self.apps
            .replicas_of(bucket)
            .unwrap_or(self.cfg.replicas as u8)
    }

    /// Writes (or with `None` deletes) a key with its bucket's replication
    /// factor; returns its new version once a majority of its replicas
    /// committed it.
    pub async fn put(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        value: Option<Vec<u8>>,
    ) -> Result<u64, OpError> {
        self.put_k(bucket, key, value, self.k_of(bucket)).await
    }

    /// [`Node::put`] with `k` replicas.
    pub async fn put_k(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        value: Option<Vec<u8>>,
        k: u8,
    ) -> Result<u64, OpError> {
        let t = Instant::now();
        let op = if value.is_some() { "put" } else { "delete" };
        let mut last = None;
        if let Some(v) = &value {
            super::boards::check_storage(self, v.len() as u64)?;
        }
        // A silent root is retried once: the overlay may have just lost it.
        for attempt in 0..2 {
            let (req, rx) = self.register();
            let acts = {
                let mut cores = self.lock();
                cores
                    .replica
                    .put(wall_us(), req, bucket, key, value.clone(), k)?
            };
            self.store_acts(acts);
            match self.wait(req, rx).await? {
                Outcome::Put(Ok(v)) => {
                    self.metrics.store_ops.inc(op);
                    self.metrics
                        .put_latency
                        .record_us(t.elapsed().as_micros() as u64);
                    return Ok(v);
                }
                Outcome::Put(Err(e @ (RemoteError::NoAnswer | RemoteError::Timeout { .. })))
                    if attempt == 0 =>
                {
                    tracing::debug!("{op} {bucket}/{key}: {e}; retrying");
                    last = Some(e);
                    smol::Timer::after(Duration::from_millis(300)).await;
                }
                Outcome::Put(Err(e)) => {
                    self.metrics.store_errors.inc(op);
                    return Err(e.into());
                }
                Outcome::Get(_) => return Err(OpError::Internal("reply of the wrong kind".into())),
            }
        }
        self.metrics.store_errors.inc(op);
        Err(last
            .map(OpError::from)
            .unwrap_or_else(|| OpError::Timeout("no answer".into())))
    }

    /// Reads a key from its root, falling back to the replicas this node
    /// knows when the root is silent.
    pub async fn get(self: &Arc<Self>, bucket: &str, key: &str) -> Result<Option<Value>, OpError> {
        self.get_k(bucket, key, self.k_of(bucket)).await
    }

    /// [`Node::get`] of a key kept on `k` replicas.
    pub async fn get_k(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        k: u8,
    ) -> Result<Option<Value>, OpError> {
        let t = Instant::now();
        let (req, rx) = self.register();
        let acts = {
            let mut cores = self.lock();
            cores.replica.get(wall_us(), req, bucket, key, k)?
        };
        self.store_acts(acts);
        let res = match self.wait(req, rx).await? {
            // The root is silent: ask the replicas directly.
            Outcome::Get(Err(RemoteError::NoAnswer)) => {
                self.get_from_replicas(bucket, key, k).await?
            }
            other => other,
        };
        match res {
            Outcome::Get(Ok(v)) => {
                self.metrics.store_ops.inc("get");
                self.metrics
                    .get_latency
                    .record_us(t.elapsed().as_micros() as u64);
                Ok(v)
            }
            Outcome::Get(Err(e)) => {
                self.metrics.store_errors.inc("get");
                Err(e.into())
            }
            Outcome::Put(_) => Err(OpError::Internal("reply of the wrong kind".into())),
        }
    }

    /// Reads the newest copy of a key among all its replicas, this node's
    /// included: for a new owner of the key that must not act on a copy
    /// that missed the last acknowledged write.
    pub async fn get_newest(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Value>, OpError> {
        match self
            .get_from_replicas(bucket, key, self.k_of(bucket))
            .await?
        {
            Outcome::Get(Ok(v)) => Ok(v),
            Outcome::Get(Err(e)) => Err(e.into()),
            Outcome::Put(_) => Err(OpError::Internal("reply of the wrong kind".into())),
        }
    }

    /// The newest copy among the `k` replicas that answer in time.
    async fn get_from_replicas(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        k: u8,
    ) -> Result<Outcome, OpError> {
        let (req, rx) = self.register();
        let acts = {
            let mut cores = self.lock();
            let replicas = cores.placement(NodeId::for_key(bucket, key), k as usize);
            cores
                .replica
                .get_from(wall_us(), req, bucket, key, &replicas)?
        };
        self.store_acts(acts);
        self.wait(req, rx).await
    }

    fn store_acts(self: &Arc<Self>, acts: Vec<replica::Action>) {
        self.drive(|n, cores, ctx| n.store_actions(cores, acts, ctx));
    }
}

/// `host:port` to a socket address, without blocking the executor.
pub async fn resolve(peer: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = peer.parse::<SocketAddr>() {
        return Ok(a);
    }
    let p = peer.to_string();
    let addrs = smol::unblock(move || {
        std::net::ToSocketAddrs::to_socket_addrs(&p).map(|i| i.collect::<Vec<_>>())
    })
    .await
    .map_err(|e| format!("cannot resolve {peer:?}: {e}"))?;
    addrs
        .into_iter()
        .next()
        .ok_or_else(|| format!("{peer:?} resolves to no address"))
}

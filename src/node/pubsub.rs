//! Pub/sub on the node: the Scribe core (`overlay::scribe`) fed from QUIC
//! and a clock, and the server-sent-event clients of `GET /api/watch/{key}`
//! that hang off it. Capy nodes are the tree's members; an HTTP client is
//! served by the node it connected to, which subscribes once for all of
//! its clients of a key.
//!
//! Each client has a bounded queue; a client that falls that far behind is
//! sent a `dropped` event and disconnected, so one slow reader costs
//! bounded memory and never slows the tree. The Scribe core runs on wall
//! time, so sequence numbers keep growing when a key's root changes.

use super::apps::KeyOp;
use super::runtime::{Node, Wire};
use super::{lock, wall_us};
use crate::id::{NodeHandle, NodeId};
use crate::overlay::scribe::{self, Action, Hop, Router, Scribe, ScribeConfig};
use bytes::Bytes;
use futures_lite::Stream;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame as BodyFrame};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

// A publication carries one store value.
const _: () = assert!(scribe::MAX_DATA >= crate::store::MAX_VALUE);

/// Events queued per SSE client before it is dropped as too slow.
pub const CLIENT_QUEUE: usize = 256;
/// SSE clients a node serves at once.
pub const MAX_CLIENTS: usize = 1024;
/// A comment line this often keeps idle streams (and proxies) alive.
const KEEPALIVE: Duration = Duration::from_secs(15);

struct Client {
    id: u64,
    tx: async_channel::Sender<Bytes>,
    dropped: Arc<AtomicBool>,
    /// Told that the subscription reached the tree.
    told_attached: bool,
    /// Events held until the client's first value is queued.
    pending: Option<VecDeque<Bytes>>,
}

struct Watched {
    app: String,
    key: String,
    clients: Vec<Client>,
}

/// The node's multicast state.
pub struct PubSub {
    scribe: Mutex<Scribe>,
    watched: Mutex<HashMap<NodeId, Watched>>,
    next_client: AtomicU64,
    last_keepalive: Mutex<Option<Instant>>,
    pub delivered: AtomicU64,
    pub dropped_clients: AtomicU64,
    pub gaps: AtomicU64,
}

impl Default for PubSub {
    fn default() -> Self {
        PubSub {
            scribe: Mutex::new(Scribe::new(ScribeConfig::default())),
            watched: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(1),
            last_keepalive: Mutex::new(None),
            delivered: AtomicU64::new(0),
            dropped_clients: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
        }
    }
}

/// The overlay as this node's vnodes see it. A next hop that is another
/// vnode of this node is followed inside the node.
struct NodeRouter<'a>(&'a Node);

impl Router for NodeRouter<'_> {
    fn hop(&self, key: NodeId) -> Option<Hop> {
        let c = self.0.lock();
        if !c.vnodes.values().all(|p| p.joined()) {
            return None;
        }
        let mut v = c.nearest_vnode(key)?;
        for _ in 0..8 {
            match c.vnodes.get(&v)?.hop(key)? {
                Hop::Next(h) if h.addr == self.0.quic => {
                    if !c.vnodes.contains_key(&h.id) {
                        return None;
                    }
                    v = h.id;
                }
                other => return Some(other),
            }
        }
        None
    }
}

/// One server-sent event.
pub fn sse(event: &str, id: Option<u64>, data: &str) -> Bytes {
    let mut s = String::with_capacity(data.len() + 32);
    if let Some(id) = id {
        s.push_str(&format!("id: {id}\n"));
    }
    s.push_str(&format!("event: {event}\n"));
    for line in data.split('\n') {
        s.push_str("data: ");
        s.push_str(line);
        s.push('\n');
    }
    s.push('\n');
    Bytes::from(s)
}

/// Queues `ev` for a client; false when the client is gone or too slow
/// (then it is closed, after its `dropped` flag is set).
fn push(c: &mut Client, ev: Bytes) -> bool {
    if let Some(p) = c.pending.as_mut() {
        if p.len() >= CLIENT_QUEUE {
            c.dropped.store(true, Relaxed);
            c.tx.close();
            return false;
        }
        p.push_back(ev);
        return true;
    }
    match c.tx.try_send(ev) {
        Ok(()) => true,
        Err(async_channel::TrySendError::Full(_)) => {
            c.dropped.store(true, Relaxed);
            c.tx.close();
            false
        }
        Err(async_channel::TrySendError::Closed(_)) => false,
    }
}

/// The streaming body of one SSE client: its queue, then a final `dropped`
/// event if it was cut off for being slow.
pub struct SseBody {
    rx: Pin<Box<async_channel::Receiver<Bytes>>>,
    dropped: Arc<AtomicBool>,
    done: bool,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, std::io::Error>>> {
        let me = self.get_mut();
        if me.done {
            return Poll::Ready(None);
        }
        match me.rx.as_mut().poll_next(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(BodyFrame::data(b)))),
            Poll::Ready(None) => {
                me.done = true;
                if me.dropped.load(Relaxed) {
                    let ev = sse(
                        "dropped",
                        None,
                        &serde_json::json!({
                            "error": format!("this client fell more than {CLIENT_QUEUE} events behind and was disconnected; reconnect to resume")
                        })
                        .to_string(),
                    );
                    Poll::Ready(Some(Ok(BodyFrame::data(ev))))
                } else {
                    Poll::Ready(None)
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Node {
    fn scribe_actions(self: &Arc<Self>, acts: Vec<Action>) {
        for a in acts {
            match a {
                Action::Send { to, msg } => self.send_scribe(to, msg),
                Action::Deliver {
                    topic, seq, data, ..
                } => {
                    self.apps.pubsub.delivered.fetch_add(1, Relaxed);
                    let text = String::from_utf8_lossy(&data);
                    let ev = sse("update", Some(seq), &text);
                    self.to_clients(topic, ev);
                }
                Action::Gap { topic, after, seq } => {
                    self.apps.pubsub.gaps.fetch_add(1, Relaxed);
                    tracing::warn!(topic = %topic.short(), after, seq, "publications lost in the tree");
                    let ev = sse(
                        "gap",
                        None,
                        &serde_json::json!({ "after": after, "next": seq }).to_string(),
                    );
                    self.to_clients(topic, ev);
                }
                Action::Attached { topic } => {
                    let mut w = lock(&self.apps.pubsub.watched);
                    if let Some(t) = w.get_mut(&topic) {
                        let data = serde_json::json!({ "bucket": t.app, "key": t.key }).to_string();
                        for c in t.clients.iter_mut().filter(|c| !c.told_attached) {
                            c.told_attached = true;
                            push(c, sse("subscribed", None, &data));
                        }
                    }
                }
            }
        }
    }

    fn to_clients(&self, topic: NodeId, ev: Bytes) {
        let mut w = lock(&self.apps.pubsub.watched);
        if let Some(t) = w.get_mut(&topic) {
            let before = t.clients.len();
            t.clients.retain_mut(|c| push(c, ev.clone()));
            let gone = before - t.clients.len();
            if gone > 0 {
                self.apps
                    .pubsub
                    .dropped_clients
                    .fetch_add(gone as u64, Relaxed);
            }
        }
    }

    /// Sends a Scribe message; a failed send repairs the trees through it
    /// (`spawn_send` calls [`Self::scribe_send_failed`]).
    fn send_scribe(self: &Arc<Self>, to: NodeHandle, msg: scribe::Msg) {
        let from = {
            let c = self.lock();
            c.nearest_vnode(to.id)
        }
        .or_else(|| self.identity_vnodes.first().copied());
        let Some(from) = from else { return };
        self.spawn_send(from, to, Wire::Scribe(msg));
    }

    /// A Scribe message could not reach `to`.
    pub(crate) fn scribe_send_failed(self: &Arc<Self>, to: NodeHandle) {
        let acts = {
            let mut s = lock(&self.apps.pubsub.scribe);
            s.send_failed(wall_us(), to, &NodeRouter(self))
        };
        self.scribe_actions(acts);
    }

    /// A Scribe message from a peer.
    pub(crate) fn scribe_received(self: &Arc<Self>, from: NodeHandle, msg: scribe::Msg) {
        if let Err(e) = msg.validate() {
            tracing::warn!(peer = %from.addr, "invalid scribe message: {e}");
            self.metrics.msgs_in.inc("malformed");
            return;
        }
        let acts = {
            let mut s = lock(&self.apps.pubsub.scribe);
            s.handle(wall_us(), from, msg, &NodeRouter(self))
        };
        self.scribe_actions(acts);
    }

    /// Publishes `data` (JSON text) to the tree of `topic`, as its root.
    pub(crate) fn publish_local(self: &Arc<Self>, topic: NodeId, data: Vec<u8>) {
        let (_, acts) = lock(&self.apps.pubsub.scribe).publish(wall_us(), topic, data);
        self.scribe_actions(acts);
    }

    /// Tree heartbeats and repair, and SSE upkeep: clients that went away
    /// are forgotten, and a key nobody here watches is left.
    pub(crate) fn pubsub_tick(self: &Arc<Self>) {
        let now = wall_us();
        let keepalive = {
            let mut k = lock(&self.apps.pubsub.last_keepalive);
            let due = k.is_none_or(|t| t.elapsed() >= KEEPALIVE);
            if due {
                *k = Some(Instant::now());
            }
            due
        };
        let mut leave = Vec::new();
        {
            let mut w = lock(&self.apps.pubsub.watched);
            for (topic, t) in w.iter_mut() {
                t.clients.retain(|c| !c.tx.is_closed());
                if keepalive {
                    for c in t.clients.iter_mut() {
                        let _ = c.tx.try_send(Bytes::from_static(b": keep-alive\n\n"));
                    }
                }
                if t.clients.is_empty() {
                    leave.push((*topic, t.app.clone(), t.key.clone()));
                }
            }
            for (topic, _, _) in &leave {
                w.remove(topic);
            }
        }
        let mut acts = Vec::new();
        {
            let mut s = lock(&self.apps.pubsub.scribe);
            for (topic, _, _) in &leave {
                acts.extend(s.unsubscribe(now, *topic));
            }
            acts.extend(s.tick(now, &NodeRouter(self)));
        }
        self.scribe_actions(acts);
        for (_, app, key) in leave {
            // tell the policy, best effort
            let node = self.clone();
            let caller = self.caller_id();
            smol::spawn(async move {
                let args = serde_json::json!({ "unsubscribe": true }).to_string();
                let _ = node
                    .app_event(&app, &key, KeyOp::Read { args }, &caller)
                    .await;
            })
            .detach();
        }
    }

    /// How this node names itself as a handler's caller.
    pub(crate) fn caller_id(&self) -> String {
        format!(
            "node:{}",
            self.identity_vnodes
                .first()
                .map(|v| v.to_string())
                .unwrap_or_default()
        )
    }

    /// `GET /api/watch/{key}?bucket=APP`: a server-sent-event stream of
    /// the key's publications. Events: `subscribed` (the node joined the
    /// key's tree), `value` (the key's value when the watch started, as
    /// its readCb returns it), `update` (each publication, `id` = its
    /// sequence number), `gap`, `dropped`, `error`.
    pub async fn watch(self: &Arc<Self>, app: &str, key: &str) -> Result<SseBody, (u16, String)> {
        crate::store::entry::check_key(key).map_err(|e| (400, e.to_string()))?;
        match self.app_def(app).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err((
                    404,
                    format!("no app named {app:?}: only an app's keys can be watched"),
                ))
            }
            Err(e) => return Err((503, e.to_string())),
        }
        let topic = NodeId::for_key(app, key);
        let (tx, rx) = async_channel::bounded(CLIENT_QUEUE);
        let dropped = Arc::new(AtomicBool::new(false));
        let id = self.apps.pubsub.next_client.fetch_add(1, Relaxed);
        let first = {
            let mut w = lock(&self.apps.pubsub.watched);
            let total: usize = w.values().map(|t| t.clients.len()).sum();
            if total >= MAX_CLIENTS {
                return Err((
                    503,
                    format!("this node serves {MAX_CLIENTS} watchers already"),
                ));
            }
            let t = w.entry(topic).or_insert_with(|| Watched {
                app: app.to_string(),
                key: key.to_string(),
                clients: Vec::new(),
            });
            t.clients.push(Client {
                id,
                tx,
                dropped: dropped.clone(),
                told_attached: false,
                pending: Some(VecDeque::new()),
            });
            t.clients.len() == 1
        };
        let acts = {
            let mut s = lock(&self.apps.pubsub.scribe);
            s.subscribe(wall_us(), topic, &NodeRouter(self))
        };
        self.scribe_actions(acts);
        // The key's value as the watch starts, through its readCb; the
        // first watcher on this node also registers with the policy.
        let node = self.clone();
        let (app, key) = (app.to_string(), key.to_string());
        smol::spawn(async move {
            let args = if first {
                serde_json::json!({ "subscribe": true })
            } else {
                serde_json::json!({})
            };
            let caller = node.caller_id();
            let a = node
                .app_event(
                    &app,
                    &key,
                    KeyOp::Read {
                        args: args.to_string(),
                    },
                    &caller,
                )
                .await;
            let ev = match a.status {
                200 => sse("value", None, &a.body),
                404 => sse("value", None, "null"),
                _ => sse("error", None, &a.body),
            };
            let mut w = lock(&node.apps.pubsub.watched);
            if let Some(t) = w.get_mut(&topic) {
                if let Some(c) = t.clients.iter_mut().find(|c| c.id == id) {
                    let held = c.pending.take().unwrap_or_default();
                    let mut ok = push(c, ev);
                    for e in held {
                        ok = ok && push(c, e);
                    }
                    if !ok {
                        t.clients.retain(|c| c.id != id);
                    }
                }
            }
        })
        .detach();
        Ok(SseBody {
            rx: Box::pin(rx),
            dropped,
            done: false,
        })
    }

    /// `pubsub` of `/api/status`.
    pub fn pubsub_status(&self) -> serde_json::Value {
        let (topics, stats) = {
            let s = lock(&self.apps.pubsub.scribe);
            (s.topics(), s.stats())
        };
        let (watched, clients) = {
            let w = lock(&self.apps.pubsub.watched);
            (w.len(), w.values().map(|t| t.clients.len()).sum::<usize>())
        };
        let p = &self.apps.pubsub;
        serde_json::json!({
            "tree_topics": topics,
            "watched_keys": watched,
            "sse_clients": clients,
            "delivered": p.delivered.load(Relaxed),
            "forwarded": stats.forwarded,
            "reordered": stats.reordered,
            "gaps": p.gaps.load(Relaxed),
            "dropped_clients": p.dropped_clients.load(Relaxed),
        })
    }

    pub(crate) fn pubsub_metrics(&self) -> String {
        let s = lock(&self.apps.pubsub.scribe).stats();
        let clients: usize = lock(&self.apps.pubsub.watched)
            .values()
            .map(|t| t.clients.len())
            .sum();
        let p = &self.apps.pubsub;
        format!(
            "# HELP capy_pubsub_delivered_total Publications handed to this node's watchers.\n# TYPE capy_pubsub_delivered_total counter\ncapy_pubsub_delivered_total {}\n\
             # HELP capy_pubsub_forwarded_total Publications forwarded down multicast trees.\n# TYPE capy_pubsub_forwarded_total counter\ncapy_pubsub_forwarded_total {}\n\
             # HELP capy_pubsub_gaps_total Publications given up on (never arrived).\n# TYPE capy_pubsub_gaps_total counter\ncapy_pubsub_gaps_total {}\n\
             # HELP capy_sse_dropped_total SSE clients disconnected for being too slow.\n# TYPE capy_sse_dropped_total counter\ncapy_sse_dropped_total {}\n\
             # HELP capy_sse_clients SSE clients connected now.\n# TYPE capy_sse_clients gauge\ncapy_sse_clients {clients}\n",
            p.delivered.load(Relaxed),
            s.forwarded,
            p.gaps.load(Relaxed),
            p.dropped_clients.load(Relaxed),
        )
    }
}

/// The SSE response for a watch.
pub fn sse_response(body: SseBody) -> crate::http::Resp {
    let mut r = hyper::Response::new(body.boxed());
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    r
}

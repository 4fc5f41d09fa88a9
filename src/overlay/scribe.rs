//! Scribe-style multicast trees over the overlay, sans-IO: one [`Scribe`]
//! per physical node, fed by the node runtime or the simulator.
//!
//! A node that wants a topic (a key's ring position) sends `Subscribe` to
//! its next hop toward the topic's root; that hop adopts it as a child and,
//! unless it is in the tree already, subscribes in turn to its own next hop.
//! The tree is the union of the overlay routes from the subscribers to the
//! root, so its depth is the route length, O(log N), and no routing is done
//! here: the next hop comes from the overlay through [`Router`].
//!
//! Soft state keeps it whole: a child re-sends `Subscribe` to its parent
//! every `refresh`, a parent drops children it has not heard from in
//! `child_timeout`, and every tick each member checks that its parent is
//! still its next hop toward the root. So when a forwarder dies or a closer
//! node joins, the overlay's repaired routes rebuild the tree; a failed
//! send re-routes at once. A parent answers `Ack` only once it is itself
//! connected to the root, and a member that moves to a new parent stays
//! with the old one until the new one answers (make before break), so a
//! moving tree loses nothing.
//!
//! Order: the root numbers each publication `seq = max(last + 1, now)` and
//! names the one before it (`prev`). Forwarders pass everything on as it
//! comes; where a subscriber sits, a publication whose predecessor has not
//! been delivered yet is held (at most `reorder_wait`), so local
//! subscribers see every publication once, in order, even when the links
//! reorder messages. A predecessor that never comes is reported as a
//! [`Action::Gap`]. `now` must grow across roots (wall time in the node) so
//! that a new root's numbers continue the old one's.

use crate::id::{Micros, NodeHandle, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Largest publication carried: one store value (4 MiB; the node checks
/// the two agree).
pub const MAX_DATA: usize = 4 << 20;

/// Timers and bounds. Times in the caller's clock (µs).
#[derive(Clone, Debug)]
pub struct ScribeConfig {
    /// A child re-subscribes (heartbeat) this often.
    pub refresh: Micros,
    /// A child not heard from this long is dropped.
    pub child_timeout: Micros,
    /// Longest a publication waits for its predecessor.
    pub reorder_wait: Micros,
    /// Topics this node takes part in.
    pub max_topics: usize,
    /// Children per topic.
    pub max_children: usize,
    /// Publications held per topic while a predecessor is missing.
    pub max_held: usize,
}

impl Default for ScribeConfig {
    fn default() -> Self {
        ScribeConfig {
            refresh: 2_000_000,
            child_timeout: 7_000_000,
            reorder_wait: 1_000_000,
            max_topics: 4096,
            max_children: 1024,
            max_held: 256,
        }
    }
}

/// Where the overlay sends a message for `key` from this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// This node is the key's root.
    Root,
    /// The next node on the route (never this node itself).
    Next(NodeHandle),
}

/// The overlay as Scribe needs it. `None`: no route now (not joined yet).
pub trait Router {
    fn hop(&self, key: NodeId) -> Option<Hop>;
}

/// One Pastry node as Scribe's router: its next hop toward `key`, or the
/// root; nothing until it has joined. The simulator uses it as is; the
/// node runtime follows it across its own vnodes.
impl Router for super::Pastry {
    fn hop(&self, key: NodeId) -> Option<Hop> {
        if !self.joined() {
            return None;
        }
        Some(match self.next_hop(key) {
            None => Hop::Root,
            Some(h) => Hop::Next(h),
        })
    }
}

/// What Scribe nodes tell each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Child to parent: adopt me (also the heartbeat).
    Subscribe { topic: NodeId },
    /// Parent to child: adopted; `last` is the newest publication seen.
    Ack { topic: NodeId, last: u64 },
    /// Child to parent: drop me.
    Unsubscribe { topic: NodeId },
    /// Down the tree. `hops` counts the tree edges travelled so far.
    Publish {
        topic: NodeId,
        seq: u64,
        prev: u64,
        hops: u8,
        data: Vec<u8>,
    },
}

impl Msg {
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Subscribe { .. } => "scribe_subscribe",
            Msg::Ack { .. } => "scribe_ack",
            Msg::Unsubscribe { .. } => "scribe_unsubscribe",
            Msg::Publish { .. } => "scribe_publish",
        }
    }

    /// The bounds a message from a peer must respect.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Msg::Publish { data, seq, .. } => {
                if data.len() > MAX_DATA {
                    return Err(format!(
                        "publication of {} bytes, at most {MAX_DATA}",
                        data.len()
                    ));
                }
                if *seq == 0 {
                    return Err("publication with sequence number 0".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send {
        to: NodeHandle,
        msg: Msg,
    },
    /// Hand a publication to this node's local subscribers (in order).
    Deliver {
        topic: NodeId,
        seq: u64,
        hops: u8,
        data: Vec<u8>,
    },
    /// Publications after `after` and before `seq` never arrived.
    Gap {
        topic: NodeId,
        after: u64,
        seq: u64,
    },
    /// The local subscription is connected to the tree (the parent
    /// answered, or this node is the root).
    Attached {
        topic: NodeId,
    },
}

#[derive(Clone, Debug)]
struct Child {
    h: NodeHandle,
    heard: Micros,
    /// Told it is connected to the tree (sent once this node is).
    acked: bool,
}

#[derive(Clone, Debug)]
struct Parent {
    h: NodeHandle,
    sent: Micros,
    acked: Option<Micros>,
}

#[derive(Clone, Debug)]
struct Held {
    prev: u64,
    hops: u8,
    data: Vec<u8>,
    since: Micros,
}

#[derive(Default, Debug)]
struct Topic {
    local: bool,
    children: Vec<Child>,
    parent: Option<Parent>,
    /// The parent before a switch, kept until the new one answers, so no
    /// publication is lost while the tree moves.
    old_parent: Option<NodeHandle>,
    root: bool,
    attached: bool,
    /// Newest publication seen here (what a new child is told).
    last_seen: u64,
    /// Last publication handed to local subscribers.
    delivered: u64,
    held: BTreeMap<u64, Held>,
    /// Recently forwarded publications, to drop duplicates (two parents
    /// during a switch).
    recent: VecDeque<u64>,
}

const RECENT: usize = 64;

/// Counters for status pages and the simulator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScribeStats {
    pub delivered: u64,
    pub forwarded: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub gaps: u64,
    pub parent_switches: u64,
    pub refused: u64,
}

/// One node's part in every multicast tree it belongs to.
pub struct Scribe {
    cfg: ScribeConfig,
    /// Ordered, so ticks act in the same order on every run (the
    /// simulator replays exactly).
    topics: BTreeMap<NodeId, Topic>,
    /// Last sequence number this node published per topic, as a root.
    published: HashMap<NodeId, u64>,
    stats: ScribeStats,
}

impl Scribe {
    pub fn new(cfg: ScribeConfig) -> Scribe {
        Scribe {
            cfg,
            topics: BTreeMap::new(),
            published: HashMap::new(),
            stats: ScribeStats::default(),
        }
    }

    pub fn config(&self) -> &ScribeConfig {
        &self.cfg
    }

    pub fn stats(&self) -> ScribeStats {
        self.stats
    }

    /// Topics this node is part of (subscriber, forwarder or root).
    pub fn topics(&self) -> usize {
        self.topics.len()
    }

    /// Whether local subscribers of `topic` are connected to its tree.
    pub fn is_attached(&self, topic: NodeId) -> bool {
        self.topics
            .get(&topic)
            .is_some_and(|t| t.local && t.attached)
    }

    pub fn children(&self, topic: NodeId) -> Vec<NodeHandle> {
        self.topics
            .get(&topic)
            .map(|t| t.children.iter().map(|c| c.h).collect())
            .unwrap_or_default()
    }

    pub fn parent(&self, topic: NodeId) -> Option<NodeHandle> {
        self.topics
            .get(&topic)
            .and_then(|t| t.parent.as_ref().map(|p| p.h))
    }

    pub fn is_tree_root(&self, topic: NodeId) -> bool {
        self.topics.get(&topic).is_some_and(|t| t.root)
    }

    fn topic_mut(&mut self, topic: NodeId) -> Option<&mut Topic> {
        if !self.topics.contains_key(&topic) {
            if self.topics.len() >= self.cfg.max_topics {
                self.stats.refused += 1;
                return None;
            }
            self.topics.insert(topic, Topic::default());
        }
        self.topics.get_mut(&topic)
    }

    /// This node wants the publications of `topic`. An
    /// [`Action::Attached`] follows once it is connected to the tree.
    pub fn subscribe(&mut self, now: Micros, topic: NodeId, r: &dyn Router) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(t) = self.topic_mut(topic) else {
            return out;
        };
        t.local = true;
        if t.attached {
            out.push(Action::Attached { topic });
        } else if t.parent.is_none() {
            attach(t, now, topic, r, &mut out);
        }
        out
    }

    /// This node no longer wants `topic` (it may stay a forwarder).
    pub fn unsubscribe(&mut self, _now: Micros, topic: NodeId) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(t) = self.topics.get_mut(&topic) {
            t.local = false;
            t.held.clear();
            if t.children.is_empty() {
                self.leave(topic, &mut out);
            }
        }
        out
    }

    fn leave(&mut self, topic: NodeId, out: &mut Vec<Action>) {
        if let Some(t) = self.topics.remove(&topic) {
            for to in t.parent.map(|p| p.h).into_iter().chain(t.old_parent) {
                out.push(Action::Send {
                    to,
                    msg: Msg::Unsubscribe { topic },
                });
            }
        }
    }

    /// Publishes `data` to every subscriber of `topic`, as its root.
    /// Returns the publication's sequence number.
    pub fn publish(&mut self, now: Micros, topic: NodeId, data: Vec<u8>) -> (u64, Vec<Action>) {
        let prev = self.published.get(&topic).copied().unwrap_or(0);
        let seq = prev.saturating_add(1).max(now);
        if self.published.len() >= self.cfg.max_topics && !self.published.contains_key(&topic) {
            // Forgetting costs only the order check of the next publication.
            self.published.clear();
        }
        self.published.insert(topic, seq);
        let mut out = Vec::new();
        if let Some(t) = self.topics.get_mut(&topic) {
            remember(t, seq);
            for c in &t.children {
                out.push(Action::Send {
                    to: c.h,
                    msg: Msg::Publish {
                        topic,
                        seq,
                        prev,
                        hops: 1,
                        data: data.clone(),
                    },
                });
            }
            self.stats.forwarded += t.children.len() as u64;
            if t.local {
                accept(
                    t,
                    &mut self.stats,
                    &self.cfg,
                    now,
                    topic,
                    seq,
                    prev,
                    0,
                    data,
                    &mut out,
                );
            }
        }
        (seq, out)
    }

    /// A message from `from` (as the transport authenticated it).
    pub fn handle(
        &mut self,
        now: Micros,
        from: NodeHandle,
        msg: Msg,
        r: &dyn Router,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if msg.validate().is_err() {
            self.stats.refused += 1;
            return out;
        }
        match msg {
            Msg::Subscribe { topic } => {
                let max_children = self.cfg.max_children;
                let Some(t) = self.topic_mut(topic) else {
                    return out;
                };
                if t.parent.as_ref().is_some_and(|p| p.h.addr == from.addr) {
                    // Our own parent routes through us: a loop while routes
                    // change. Refuse; the next tick re-routes one of us.
                    self.stats.refused += 1;
                    return out;
                }
                let connected = t.attached || t.root;
                if let Some(c) = t.children.iter_mut().find(|c| c.h.addr == from.addr) {
                    c.h = from;
                    c.heard = now;
                    c.acked = connected;
                } else if t.children.len() < max_children {
                    t.children.push(Child {
                        h: from,
                        heard: now,
                        acked: connected,
                    });
                } else {
                    let unused = t.children.is_empty() && !t.local && t.parent.is_none();
                    self.stats.refused += 1;
                    if unused {
                        self.topics.remove(&topic);
                    }
                    return out;
                }
                if connected {
                    out.push(Action::Send {
                        to: from,
                        msg: Msg::Ack {
                            topic,
                            last: t.last_seen,
                        },
                    });
                } else if t.parent.is_none() {
                    attach(t, now, topic, r, &mut out);
                }
            }
            Msg::Ack { topic, last } => match self.topics.get_mut(&topic) {
                Some(t) if t.parent.as_ref().is_some_and(|p| p.h.addr == from.addr) => {
                    let first = t.parent.as_ref().is_some_and(|p| p.acked.is_none());
                    if let Some(p) = t.parent.as_mut() {
                        p.acked = Some(now);
                    }
                    let old = t.old_parent.take();
                    if let Some(o) = old {
                        out.push(Action::Send {
                            to: o,
                            msg: Msg::Unsubscribe { topic },
                        });
                    }
                    // Back in the tree after losing the path to the root:
                    // what the new parent saw before adopting us never
                    // comes, so do not hold later publications for it.
                    if first && old.is_none() && t.attached && t.local && last > t.delivered {
                        catch_up(t, &mut self.stats, topic, last, &mut out);
                    }
                    if !t.attached {
                        t.attached = true;
                        if t.local && t.delivered == 0 {
                            t.delivered = last;
                        }
                        connected(t, topic, &mut out);
                    }
                }
                // The parent we are leaving: it still feeds us meanwhile.
                Some(t) if t.old_parent.is_some_and(|o| o.addr == from.addr) => {}
                // Not (or no longer) our parent: tell it to forget us.
                _ => out.push(Action::Send {
                    to: from,
                    msg: Msg::Unsubscribe { topic },
                }),
            },
            Msg::Unsubscribe { topic } => {
                if let Some(t) = self.topics.get_mut(&topic) {
                    t.children.retain(|c| c.h.addr != from.addr);
                    if t.children.is_empty() && !t.local {
                        self.leave(topic, &mut out);
                    }
                }
            }
            Msg::Publish {
                topic,
                seq,
                prev,
                hops,
                data,
            } => {
                let Some(t) = self.topics.get_mut(&topic) else {
                    // Not in this tree (any more): prune the sender's link.
                    out.push(Action::Send {
                        to: from,
                        msg: Msg::Unsubscribe { topic },
                    });
                    return out;
                };
                if t.recent.contains(&seq) {
                    self.stats.duplicates += 1;
                    return out;
                }
                remember(t, seq);
                let hops = hops.saturating_add(1);
                for c in t.children.iter().filter(|c| c.h.addr != from.addr) {
                    out.push(Action::Send {
                        to: c.h,
                        msg: Msg::Publish {
                            topic,
                            seq,
                            prev,
                            hops,
                            data: data.clone(),
                        },
                    });
                    self.stats.forwarded += 1;
                }
                if t.local {
                    accept(
                        t,
                        &mut self.stats,
                        &self.cfg,
                        now,
                        topic,
                        seq,
                        prev,
                        hops - 1,
                        data,
                        &mut out,
                    );
                }
            }
        }
        out
    }

    /// Heartbeats, timeouts, and moving to the overlay's current route.
    /// Call it about every `refresh / 4`.
    pub fn tick(&mut self, now: Micros, r: &dyn Router) -> Vec<Action> {
        let mut out = Vec::new();
        let ids: Vec<NodeId> = self.topics.keys().copied().collect();
        for topic in ids {
            let cfg = self.cfg.clone();
            let Some(t) = self.topics.get_mut(&topic) else {
                continue;
            };
            t.children
                .retain(|c| now.saturating_sub(c.heard) < cfg.child_timeout);
            if !t.local && t.children.is_empty() {
                self.leave(topic, &mut out);
                continue;
            }
            flush_expired(t, &mut self.stats, now, topic, &cfg, &mut out);
            match r.hop(topic) {
                None => {}
                Some(Hop::Root) => {
                    for o in t
                        .parent
                        .take()
                        .map(|p| p.h)
                        .into_iter()
                        .chain(t.old_parent.take())
                    {
                        out.push(Action::Send {
                            to: o,
                            msg: Msg::Unsubscribe { topic },
                        });
                        self.stats.parent_switches += 1;
                    }
                    t.root = true;
                    if !t.attached {
                        t.attached = true;
                        connected(t, topic, &mut out);
                    }
                }
                Some(Hop::Next(h)) => {
                    t.root = false;
                    let same = t.parent.as_ref().is_some_and(|p| p.h.addr == h.addr);
                    if !same {
                        if let Some(p) = t.parent.take() {
                            self.stats.parent_switches += 1;
                            // keep a parent that answered until the new one
                            // does; one that never answered is just dropped
                            let keep = p.acked.is_some() && t.old_parent.is_none();
                            if keep {
                                t.old_parent = Some(p.h);
                            } else {
                                out.push(Action::Send {
                                    to: p.h,
                                    msg: Msg::Unsubscribe { topic },
                                });
                            }
                        }
                        t.parent = Some(Parent {
                            h,
                            sent: now,
                            acked: None,
                        });
                        out.push(Action::Send {
                            to: h,
                            msg: Msg::Subscribe { topic },
                        });
                    } else if let Some(p) = t.parent.as_mut() {
                        // Heartbeat; it also re-adopts us at a parent that
                        // restarted and lost its state.
                        if now.saturating_sub(p.sent) >= cfg.refresh {
                            p.sent = now;
                            out.push(Action::Send {
                                to: p.h,
                                msg: Msg::Subscribe { topic },
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// A send to `to` failed: it is gone as a child, and trees that went
    /// through it subscribe again through the overlay's route.
    pub fn send_failed(&mut self, now: Micros, to: NodeHandle, r: &dyn Router) -> Vec<Action> {
        let mut out = Vec::new();
        let ids: Vec<NodeId> = self.topics.keys().copied().collect();
        for topic in ids {
            let Some(t) = self.topics.get_mut(&topic) else {
                continue;
            };
            t.children.retain(|c| c.h.addr != to.addr);
            if t.old_parent.is_some_and(|o| o.addr == to.addr) {
                t.old_parent = None;
            }
            if t.parent.as_ref().is_some_and(|p| p.h.addr == to.addr) {
                t.parent = None;
                self.stats.parent_switches += 1;
                match r.hop(topic) {
                    // Routes still lead through the dead node: the next
                    // ticks retry once the overlay has repaired them.
                    Some(Hop::Next(h)) if h.addr == to.addr => {}
                    _ => attach(t, now, topic, r, &mut out),
                }
            }
            if !t.local && t.children.is_empty() {
                self.leave(topic, &mut out);
            }
        }
        out
    }
}

/// Connects `t` toward the root: root here, or subscribe to the next hop.
fn attach(t: &mut Topic, now: Micros, topic: NodeId, r: &dyn Router, out: &mut Vec<Action>) {
    match r.hop(topic) {
        None => {}
        Some(Hop::Root) => {
            t.root = true;
            t.parent = None;
            if !t.attached {
                t.attached = true;
                connected(t, topic, out);
            }
        }
        Some(Hop::Next(h)) => {
            t.root = false;
            t.parent = Some(Parent {
                h,
                sent: now,
                acked: None,
            });
            out.push(Action::Send {
                to: h,
                msg: Msg::Subscribe { topic },
            });
        }
    }
}

/// `t` just got connected to the root: tell the local subscribers and the
/// children waiting for it.
fn connected(t: &mut Topic, topic: NodeId, out: &mut Vec<Action>) {
    if t.local {
        out.push(Action::Attached { topic });
    }
    for c in t.children.iter_mut().filter(|c| !c.acked) {
        c.acked = true;
        out.push(Action::Send {
            to: c.h,
            msg: Msg::Ack {
                topic,
                last: t.last_seen,
            },
        });
    }
}

fn remember(t: &mut Topic, seq: u64) {
    t.last_seen = t.last_seen.max(seq);
    if t.recent.len() >= RECENT {
        t.recent.pop_front();
    }
    t.recent.push_back(seq);
}

/// Delivers a publication locally in order, holding it while its
/// predecessor is missing.
#[allow(clippy::too_many_arguments)]
fn accept(
    t: &mut Topic,
    stats: &mut ScribeStats,
    cfg: &ScribeConfig,
    now: Micros,
    topic: NodeId,
    seq: u64,
    prev: u64,
    hops: u8,
    data: Vec<u8>,
    out: &mut Vec<Action>,
) {
    if seq <= t.delivered {
        stats.duplicates += 1;
        return;
    }
    if prev == 0 || prev <= t.delivered {
        deliver(t, stats, topic, seq, hops, data, out);
        drain(t, stats, topic, out);
        return;
    }
    stats.reordered += 1;
    t.held.insert(
        seq,
        Held {
            prev,
            hops,
            data,
            since: now,
        },
    );
    flush_expired(t, stats, now, topic, cfg, out);
}

fn deliver(
    t: &mut Topic,
    stats: &mut ScribeStats,
    topic: NodeId,
    seq: u64,
    hops: u8,
    data: Vec<u8>,
    out: &mut Vec<Action>,
) {
    t.delivered = seq;
    stats.delivered += 1;
    out.push(Action::Deliver {
        topic,
        seq,
        hops,
        data,
    });
}

/// Skips to `last`: held publications up to it are delivered in order, the
/// rest up to it is reported lost.
fn catch_up(
    t: &mut Topic,
    stats: &mut ScribeStats,
    topic: NodeId,
    last: u64,
    out: &mut Vec<Action>,
) {
    while let Some((&seq, _)) = t.held.iter().next() {
        if seq > last {
            break;
        }
        if let Some(h) = t.held.remove(&seq) {
            if seq > t.delivered {
                deliver(t, stats, topic, seq, h.hops, h.data, out);
            }
        }
    }
    if last > t.delivered {
        stats.gaps += 1;
        out.push(Action::Gap {
            topic,
            after: t.delivered,
            seq: last.saturating_add(1),
        });
        t.delivered = last;
    }
    drain(t, stats, topic, out);
}

/// Delivers held publications whose predecessor is now delivered.
fn drain(t: &mut Topic, stats: &mut ScribeStats, topic: NodeId, out: &mut Vec<Action>) {
    loop {
        let Some((&seq, h)) = t.held.iter().next() else {
            return;
        };
        if seq <= t.delivered {
            t.held.remove(&seq);
            stats.duplicates += 1;
            continue;
        }
        if h.prev > t.delivered {
            return;
        }
        if let Some(h) = t.held.remove(&seq) {
            deliver(t, stats, topic, seq, h.hops, h.data, out);
        }
    }
}

/// Gives up waiting for predecessors that are overdue (or when too many
/// publications are held): delivers the oldest held one after a gap.
fn flush_expired(
    t: &mut Topic,
    stats: &mut ScribeStats,
    now: Micros,
    topic: NodeId,
    cfg: &ScribeConfig,
    out: &mut Vec<Action>,
) {
    loop {
        let Some((&seq, h)) = t.held.iter().next() else {
            return;
        };
        let overdue = now.saturating_sub(h.since) >= cfg.reorder_wait;
        if !overdue && t.held.len() <= cfg.max_held {
            return;
        }
        if let Some(h) = t.held.remove(&seq) {
            stats.gaps += 1;
            out.push(Action::Gap {
                topic,
                after: t.delivered,
                seq,
            });
            deliver(t, stats, topic, seq, h.hops, h.data, out);
            drain(t, stats, topic, out);
        }
    }
}

#[cfg(test)]
#[path = "scribe_tests.rs"]
mod tests;

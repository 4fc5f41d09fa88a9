//! The Pastry state machine of one vnode.

use super::table::{Entry, LeafEntry, LeafSet, Offer, RoutingTable, Side, NO_PROBE, UNKNOWN_RTT};
use super::wire::{
    Bounded, JoinList, LeafList, Msg, Payload, RowList, Stamp, MAX_JOIN_ENTRIES, MAX_LEAF_SET,
    MAX_SLOT_ENTRIES,
};
use crate::id::{Micros, NodeHandle, NodeId, DIGITS};
use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

const SECOND: Micros = 1_000_000;
/// Most ids remembered as recently failed.
const DEAD_MEMORY: usize = 64;
/// Most messages queued by `route` before the join completes.
const MAX_PENDING_ROUTES: usize = 64;
/// Second-hand nodes contacted lately (RTT probe or leaf-set check),
/// remembered so one rumour does not trigger a message each time.
const RECENT_PROBES: usize = 64;
/// Routing candidates met while joining that are probed when it completes.
const JOIN_CANDIDATES: usize = 32;
/// Upper bound of `Config::candidate_probes`.
pub const MAX_CANDIDATE_PROBES: u32 = 1024;
/// Most neighbourhood-set members.
pub const MAX_NEIGHBOURS: usize = 64;

/// Tuning of one overlay instance. [`Pastry::new`] clamps out-of-range
/// values; [`Config::validate`] reports them for config files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Leaf-set members, both sides together (even, 2..=64).
    pub leaf_set_size: usize,
    /// Lowest-RTT nodes kept as the neighbourhood set (1..=64).
    pub neighbourhood_size: usize,
    /// Entries kept per routing-table slot, the lowest-RTT candidates
    /// (1..=4). Routing picks among them the one nearest the key, which
    /// shortens routes; the spare also survives a failure.
    pub slot_entries: usize,
    /// A leaf-set member not heard from for this long gets a probe.
    pub probe_interval: Micros,
    /// A member that answers none of its probes for this long is declared
    /// failed; the probe is re-sent `probe_retries` times in between.
    pub probe_timeout: Micros,
    pub probe_retries: u8,
    /// Period of routing-table row exchange.
    pub maintenance_interval: Micros,
    /// Period of leaf-set exchange with the farthest member of a side.
    pub leaf_gossip_interval: Micros,
    /// RTT probes to routing candidates allowed per `probe_interval` once
    /// joined (the join itself probes up to 32 at once).
    pub candidate_probes: u32,
    /// Re-send the Join to the bootstrap after this long without a reply.
    pub join_timeout: Micros,
    /// Routed messages are dropped after this many hops (loop guard).
    pub max_hops: u8,
    /// Second-hand mentions of a failed node are ignored for this long.
    pub dead_ttl: Micros,
    /// Seeds the instance's choices and its probe-tag key; the runtime
    /// should give each instance a fresh random value.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            leaf_set_size: 24,
            neighbourhood_size: 32,
            slot_entries: 2,
            probe_interval: SECOND,
            probe_timeout: 3 * SECOND,
            probe_retries: 2,
            maintenance_interval: 30 * SECOND,
            leaf_gossip_interval: 5 * SECOND,
            candidate_probes: 8,
            join_timeout: 10 * SECOND,
            max_hops: 40,
            dead_ttl: 30 * SECOND,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("overlay leaf_set_size must be even and within 2..={MAX_LEAF_SET}, got {0}")]
    LeafSet(usize),
    #[error("overlay neighbourhood_size must be within 1..={MAX_NEIGHBOURS}, got {0}")]
    Neighbourhood(usize),
    #[error("overlay slot_entries must be within 1..={MAX_SLOT_ENTRIES}, got {0}")]
    SlotEntries(usize),
    #[error("overlay candidate_probes must be at most {MAX_CANDIDATE_PROBES}, got {0}")]
    CandidateProbes(u32),
    #[error("overlay {0} must be positive")]
    Zero(&'static str),
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.leaf_set_size < 2
            || self.leaf_set_size > MAX_LEAF_SET
            || self.leaf_set_size % 2 != 0
        {
            return Err(ConfigError::LeafSet(self.leaf_set_size));
        }
        if self.neighbourhood_size == 0 || self.neighbourhood_size > MAX_NEIGHBOURS {
            return Err(ConfigError::Neighbourhood(self.neighbourhood_size));
        }
        if self.slot_entries == 0 || self.slot_entries > MAX_SLOT_ENTRIES {
            return Err(ConfigError::SlotEntries(self.slot_entries));
        }
        for (name, v) in [
            ("probe_interval", self.probe_interval),
            ("probe_timeout", self.probe_timeout),
            ("maintenance_interval", self.maintenance_interval),
            ("leaf_gossip_interval", self.leaf_gossip_interval),
            ("join_timeout", self.join_timeout),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.candidate_probes > MAX_CANDIDATE_PROBES {
            return Err(ConfigError::CandidateProbes(self.candidate_probes));
        }
        if self.max_hops == 0 {
            return Err(ConfigError::Zero("max_hops"));
        }
        Ok(())
    }

    fn clamped(mut self) -> Self {
        self.leaf_set_size = (self.leaf_set_size.clamp(2, MAX_LEAF_SET) / 2) * 2;
        self.neighbourhood_size = self.neighbourhood_size.clamp(1, MAX_NEIGHBOURS);
        self.slot_entries = self.slot_entries.clamp(1, MAX_SLOT_ENTRIES);
        self.probe_interval = self.probe_interval.max(1);
        self.probe_timeout = self.probe_timeout.max(1);
        self.maintenance_interval = self.maintenance_interval.max(1);
        self.leaf_gossip_interval = self.leaf_gossip_interval.max(1);
        self.candidate_probes = self.candidate_probes.min(MAX_CANDIDATE_PROBES);
        self.join_timeout = self.join_timeout.max(1);
        self.max_hops = self.max_hops.max(1);
        self
    }
}

/// What the runtime must do after feeding the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send {
        to: NodeHandle,
        msg: Msg,
    },
    /// I am the root of `key`: hand the payload to the layer above.
    Deliver {
        key: NodeId,
        origin: NodeHandle,
        hops: u8,
        payload: Vec<u8>,
    },
    /// The join completed; the tables are filled.
    Joined,
    /// Leaf-set membership changed; replica sets may have moved.
    LeafSetChanged,
    /// Declared dead (probe timeout, send failure or leave).
    NodeFailed(NodeHandle),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("routed payload of {0} bytes exceeds the {max}-byte limit", max = super::wire::MAX_PAYLOAD)]
    PayloadTooLarge(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Joining {
        via: NodeHandle,
        started: Micros,
        /// JoinRows messages the root said to expect, once its reply came.
        expected: Option<u8>,
        got: u8,
        reply_at: Micros,
    },
    Joined,
    Left,
}

/// Rows still missing this long after the root's reply are given up on.
const ROW_WAIT: Micros = 2 * SECOND;

/// One vnode's Pastry instance (b = 4): routing table, leaf set and
/// neighbourhood set, fed by the runtime or the simulator.
pub struct Pastry {
    me: NodeHandle,
    cfg: Config,
    state: State,
    rt: RoutingTable,
    leaf: LeafSet,
    /// Lowest-RTT nodes known, sorted by id (looked up far more often
    /// than ranked).
    nbrs: Vec<Entry>,
    dead: VecDeque<(NodeId, Micros)>,
    rng: u64,
    secret: u64,
    tokens: u32,
    tokens_at: Micros,
    next_maint: Micros,
    maint_row: usize,
    next_gossip: Micros,
    gossip_right: bool,
    /// Candidates for full slots met while joining, probed once joined.
    candidates: Vec<NodeHandle>,
    /// Second-hand nodes contacted lately: not contacted again meanwhile.
    probed: VecDeque<(NodeId, Micros)>,
    pending: Vec<(NodeId, Payload)>,
    leaf_dirty: bool,
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Pastry {
    pub fn new(me: NodeHandle, cfg: Config) -> Self {
        let cfg = cfg.clamped();
        let mut rng = cfg.seed ^ (me.id.0 as u64) ^ ((me.id.0 >> 64) as u64);
        let secret = splitmix(&mut rng);
        Pastry {
            me,
            state: State::Idle,
            rt: RoutingTable::new(me.id, cfg.slot_entries),
            leaf: LeafSet::new(me.id, cfg.leaf_set_size),
            nbrs: Vec::new(),
            dead: VecDeque::new(),
            rng,
            secret,
            tokens: cfg.candidate_probes,
            tokens_at: 0,
            next_maint: 0,
            maint_row: 0,
            next_gossip: 0,
            gossip_right: false,
            candidates: Vec::new(),
            probed: VecDeque::new(),
            pending: Vec::new(),
            leaf_dirty: false,
            cfg,
        }
    }

    // ---- read-only views ----

    pub fn me(&self) -> NodeHandle {
        self.me
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn joined(&self) -> bool {
        self.state == State::Joined
    }

    /// Both sides, in ring order (farthest counter-clockwise first).
    pub fn leaf_set(&self) -> Vec<NodeHandle> {
        self.leaf.ring_order()
    }

    /// Counter-clockwise and clockwise members, each closest first.
    pub fn leaf_sides(&self) -> (Vec<NodeHandle>, Vec<NodeHandle>) {
        (
            self.leaf.side(Side::Left).iter().map(|e| e.h).collect(),
            self.leaf.side(Side::Right).iter().map(|e| e.h).collect(),
        )
    }

    /// Entries per routing-table row, up to the last non-empty row.
    pub fn routing_fill(&self) -> Vec<usize> {
        self.rt.fill()
    }

    pub fn routing_entries(&self) -> Vec<NodeHandle> {
        self.rt.iter().map(|e| e.h).collect()
    }

    pub fn neighbours(&self) -> Vec<(NodeHandle, Micros)> {
        let mut v: Vec<(NodeHandle, Micros)> =
            self.nbrs.iter().map(|e| (e.h, e.rtt as Micros)).collect();
        v.sort_by_key(|x| x.1);
        v
    }

    pub fn rtt(&self, id: NodeId) -> Option<Micros> {
        let known = |r: u32| (r != UNKNOWN_RTT).then_some(r as Micros);
        self.rt
            .get(id)
            .and_then(|e| known(e.rtt))
            .or_else(|| self.nbr(id).and_then(|e| known(e.rtt)))
            .or_else(|| self.leaf.get(id).and_then(|e| known(e.rtt)))
    }

    fn nbr(&self, id: NodeId) -> Option<&Entry> {
        let i = self.nbrs.binary_search_by(|e| e.h.id.cmp(&id)).ok()?;
        Some(&self.nbrs[i])
    }

    /// Next node toward the root of `key`; `None` when I am the root.
    pub fn next_hop(&self, key: NodeId) -> Option<NodeHandle> {
        self.next_hop_skipping(key, None)
    }

    pub fn is_root(&self, key: NodeId) -> bool {
        self.next_hop(key).is_none()
    }

    /// The `n` nodes closest to `key` among me and my leaf set, closest
    /// first: the replica set when I am the key's root.
    pub fn closest(&self, key: NodeId, n: usize) -> Vec<NodeHandle> {
        let mut v: Vec<NodeHandle> = std::iter::once(self.me)
            .chain(self.leaf.members().map(|e| e.h))
            .collect();
        v.sort_by(|a, b| key.by_closeness(a.id, b.id));
        v.truncate(n);
        v
    }

    // ---- entry points ----

    /// First node of a ring: ready at once.
    pub fn bootstrap_alone(&mut self) {
        if self.state != State::Left {
            self.state = State::Joined;
        }
    }

    /// Start joining through a known peer, ideally a nearby one (its
    /// neighbourhood set seeds mine).
    pub fn join(&mut self, now: Micros, via: NodeHandle) -> Vec<Action> {
        if via.id == self.me.id || self.state == State::Joined || self.state == State::Left {
            return Vec::new();
        }
        self.state = State::Joining {
            via,
            started: now,
            expected: None,
            got: 0,
            reply_at: 0,
        };
        vec![self.join_msg(via)]
    }

    fn join_msg(&self, via: NodeHandle) -> Action {
        Action::Send {
            to: via,
            msg: Msg::Join {
                joiner: self.me,
                hops: 0,
                min_row: 0,
            },
        }
    }

    /// Originate a message to the root of `key`; delivers at once when I
    /// am the root. Before the join completes, messages wait (bounded).
    pub fn route(
        &mut self,
        now: Micros,
        key: NodeId,
        payload: Vec<u8>,
    ) -> Result<Vec<Action>, RouteError> {
        let len = payload.len();
        let payload = Payload::new(payload).ok_or(RouteError::PayloadTooLarge(len))?;
        let mut out = Vec::new();
        match self.state {
            State::Joined => self.forward_route(now, key, self.me, 0, payload, &mut out),
            State::Joining { .. } | State::Idle if self.pending.len() < MAX_PENDING_ROUTES => {
                self.pending.push((key, payload))
            }
            _ => {}
        }
        Ok(out)
    }

    /// Graceful leave: hand my leaf set to its members and go quiet.
    pub fn leave(&mut self, now: Micros) -> Vec<Action> {
        let mut out = Vec::new();
        if self.state == State::Joined {
            let list = self.leaf_list(now);
            for e in self.leaf.members() {
                out.push(Action::Send {
                    to: e.h,
                    msg: Msg::Leave {
                        leaf_set: list.clone(),
                    },
                });
            }
        }
        self.state = State::Left;
        out
    }

    /// The runtime could not deliver `msg` to `to`: `to` is treated as
    /// failed, the tables are repaired, and routed messages (Route, Join)
    /// go out again through another hop.
    /// `to` failed to take a message of another protocol riding on this
    /// overlay (Scribe): forget it and repair as for a failed send.
    pub fn peer_failed(&mut self, now: Micros, to: NodeHandle) -> Vec<Action> {
        self.send_failed(now, to, Msg::LeafSetRequest)
    }

    pub fn send_failed(&mut self, now: Micros, to: NodeHandle, msg: Msg) -> Vec<Action> {
        let mut out = Vec::new();
        if to.id == self.me.id || self.state == State::Left {
            return out;
        }
        self.fail_node(now, to.id, &mut out);
        match msg {
            Msg::Route {
                key,
                origin,
                hops,
                payload,
            } => {
                self.forward_route(now, key, origin, hops.saturating_sub(1), payload, &mut out);
            }
            // hops already counts my JoinRows.
            Msg::Join {
                joiner,
                hops,
                min_row,
            } if joiner.id != self.me.id && self.joined() => {
                self.route_join(now, joiner, hops, min_row, &mut out);
            }
            _ => {}
        }
        self.finish(&mut out);
        out
    }

    /// Timers: keep-alive probes and failure detection on the leaf set,
    /// routing-row exchange, leaf-set gossip, join retries. Call at least
    /// every `probe_interval / 4`.
    pub fn tick(&mut self, now: Micros) -> Vec<Action> {
        let mut out = Vec::new();
        match self.state {
            State::Joining {
                via,
                started,
                expected,
                reply_at,
                ..
            } => {
                if expected.is_some() && now.saturating_sub(reply_at) >= ROW_WAIT {
                    self.finish_join(now, &mut out);
                } else if expected.is_none() && now.saturating_sub(started) >= self.cfg.join_timeout
                {
                    self.state = State::Joining {
                        via,
                        started: now,
                        expected: None,
                        got: 0,
                        reply_at: 0,
                    };
                    out.push(self.join_msg(via));
                }
            }
            State::Joined => {
                self.keep_alive(now, &mut out);
                // After a long pause without ticks, missed rounds are not
                // made up: the next one gets a fresh phase.
                if now >= self.next_maint {
                    if now - self.next_maint > self.cfg.maintenance_interval {
                        self.next_maint = now + self.jitter(self.cfg.maintenance_interval);
                    } else {
                        self.maintain(now, &mut out);
                    }
                }
                if now >= self.next_gossip {
                    if now - self.next_gossip > self.cfg.leaf_gossip_interval {
                        self.next_gossip = now + self.jitter(self.cfg.leaf_gossip_interval);
                    } else {
                        self.gossip(now, &mut out);
                    }
                }
            }
            State::Idle | State::Left => {}
        }
        self.finish(&mut out);
        out
    }

    /// A message from `from` (authenticated by the transport). Any message
    /// counts as a sign of life; hostile content is bounded and ignored
    /// where it does not fit, never a panic.
    pub fn handle(&mut self, now: Micros, from: NodeHandle, msg: Msg) -> Vec<Action> {
        let mut out = Vec::new();
        if from.id == self.me.id || self.state == State::Left {
            return out;
        }
        self.leaf.update(from.id, |e| {
            e.last_heard = now;
            e.probe_sent = NO_PROBE;
            e.probes = 0;
        });
        let joined = self.joined();
        match msg {
            Msg::Join {
                joiner,
                hops,
                min_row,
            } => {
                if joined && joiner.id != self.me.id && hops < self.cfg.max_hops {
                    self.on_join(now, joiner, hops, min_row, &mut out);
                }
            }
            Msg::JoinRows { entries } => {
                if let State::Joining { expected, got, .. } = &mut self.state {
                    *got = got.saturating_add(1);
                    let done = expected.is_some_and(|x| *got >= x);
                    self.absorb(now, from, &entries, &[], &mut out);
                    if done {
                        self.finish_join(now, &mut out);
                    }
                }
            }
            Msg::JoinReply {
                expected: x,
                leaf_set,
                entries,
            } => {
                if let State::Joining {
                    expected,
                    got,
                    reply_at,
                    ..
                } = &mut self.state
                {
                    if expected.is_none() {
                        *expected = Some(x);
                        *reply_at = now;
                        let done = *got >= x;
                        self.absorb(now, from, &entries, &leaf_set, &mut out);
                        if done {
                            self.finish_join(now, &mut out);
                        }
                    }
                }
            }
            Msg::Announce { stamp } | Msg::Probe { stamp } => {
                let announce = matches!(msg, Msg::Announce { .. });
                let mut back = None;
                let mut leaf_set = None;
                if joined {
                    let was_leaf = self.leaf.contains(from.id);
                    if self.learn(now, from, true, None, &mut out) {
                        back = Some(self.stamp(now, from.id));
                    }
                    if announce && !was_leaf && self.leaf.contains(from.id) {
                        leaf_set = Some(self.leaf_list(now));
                    }
                }
                out.push(Action::Send {
                    to: from,
                    msg: Msg::ProbeAck {
                        echo: stamp,
                        back,
                        leaf_set,
                    },
                });
            }
            Msg::ProbeAck {
                echo,
                back,
                leaf_set,
            } => {
                let rtt = (echo.tag == self.tag(from.id, echo.sent) && echo.sent <= now)
                    .then(|| (now - echo.sent).clamp(1, UNKNOWN_RTT as Micros - 1) as u32);
                if joined {
                    self.learn(now, from, true, rtt, &mut out);
                    if let Some(list) = leaf_set {
                        for h in list.iter() {
                            self.learn(now, *h, false, None, &mut out);
                        }
                    }
                }
                if let Some(b) = back {
                    out.push(Action::Send {
                        to: from,
                        msg: Msg::ProbeAck {
                            echo: b,
                            back: None,
                            leaf_set: None,
                        },
                    });
                }
            }
            Msg::Route {
                key,
                origin,
                hops,
                payload,
            } => {
                // A node that has not joined is nobody's root yet.
                if joined && hops <= self.cfg.max_hops {
                    self.forward_route(now, key, origin, hops, payload, &mut out);
                }
            }
            Msg::LeafSetRequest => {
                if joined {
                    self.learn_and_measure(now, from, &mut out);
                    out.push(Action::Send {
                        to: from,
                        msg: Msg::LeafSetReply {
                            leaf_set: self.leaf_list(now),
                        },
                    });
                }
            }
            Msg::LeafSetReply { leaf_set } => {
                if joined {
                    self.learn_and_measure(now, from, &mut out);
                    for h in leaf_set.iter() {
                        self.learn(now, *h, false, None, &mut out);
                    }
                }
            }
            Msg::RowRequest { row, col } => {
                if joined {
                    self.learn_and_measure(now, from, &mut out);
                    let r = row as usize;
                    let entries = RowList::truncating(
                        self.rt
                            .row(r)
                            .iter()
                            .filter(|e| col.is_none_or(|c| e.h.id.digit(r) == c as usize))
                            .map(|e| e.h),
                    );
                    out.push(Action::Send {
                        to: from,
                        msg: Msg::RowReply { row, entries },
                    });
                }
            }
            Msg::RowReply { entries, .. } => {
                if joined {
                    self.learn_and_measure(now, from, &mut out);
                    for h in entries.iter() {
                        self.learn(now, *h, false, None, &mut out);
                    }
                }
            }
            Msg::Leave { leaf_set } => {
                self.fail_node(now, from.id, &mut out);
                if joined {
                    for h in leaf_set.iter().filter(|h| h.id != from.id) {
                        self.learn(now, *h, false, None, &mut out);
                    }
                }
            }
        }
        self.finish(&mut out);
        out
    }

    // ---- routing ----

    fn next_hop_skipping(&self, key: NodeId, skip: Option<NodeId>) -> Option<NodeHandle> {
        let me = self.me.id;
        if self.leaf.in_range(key) {
            let mut best = self.me;
            for e in self.leaf.members() {
                if Some(e.h.id) != skip && key.closer(e.h.id, best.id) {
                    best = e.h;
                }
            }
            return (best.id != me).then_some(best);
        }
        let l = me.shared_prefix(key);
        if l >= DIGITS {
            return None;
        }
        if let Some(h) = self.rt.best_for(key, l, skip) {
            return Some(h);
        }
        // Rare case: anything known that is at least as good a prefix
        // match and numerically closer than me.
        let mut best: Option<(usize, NodeHandle)> = None;
        let all = self
            .leaf
            .members()
            .map(|e| e.h)
            .chain(self.rt.iter().map(|e| e.h))
            .chain(self.nbrs.iter().map(|e| e.h));
        for h in all {
            if Some(h.id) == skip {
                continue;
            }
            let p = h.id.shared_prefix(key);
            if p < l || !key.closer(h.id, me) {
                continue;
            }
            let better = match best {
                None => true,
                Some((bp, b)) => p > bp || (p == bp && key.closer(h.id, b.id)),
            };
            if better {
                best = Some((p, h));
            }
        }
        best.map(|(_, h)| h)
    }

    fn forward_route(
        &mut self,
        _now: Micros,
        key: NodeId,
        origin: NodeHandle,
        hops: u8,
        payload: Payload,
        out: &mut Vec<Action>,
    ) {
        match self.next_hop(key) {
            None => out.push(Action::Deliver {
                key,
                origin,
                hops,
                payload: payload.into_vec(),
            }),
            Some(next) => {
                if hops < self.cfg.max_hops {
                    out.push(Action::Send {
                        to: next,
                        msg: Msg::Route {
                            key,
                            origin,
                            hops: hops + 1,
                            payload,
                        },
                    });
                }
            }
        }
    }

    // ---- join ----

    fn on_join(
        &mut self,
        now: Micros,
        joiner: NodeHandle,
        hops: u8,
        min_row: u8,
        out: &mut Vec<Action>,
    ) {
        let shl = self.me.id.shared_prefix(joiner.id).min(DIGITS - 1);
        let mut entries: Vec<NodeHandle> = Vec::new();
        for r in (min_row as usize)..=shl {
            entries.extend(self.rt.row(r).iter().map(|e| e.h));
        }
        if hops == 0 {
            // The first hop is near the joiner: its neighbours are too.
            entries.extend(self.nbrs.iter().map(|e| e.h));
        }
        entries.retain(|h| h.id != joiner.id);
        let entries = JoinList::truncating(entries);
        let next_min = (shl as u8 + 1).max(min_row);
        match self.next_hop_skipping(joiner.id, Some(joiner.id)) {
            Some(next) => {
                out.push(Action::Send {
                    to: joiner,
                    msg: Msg::JoinRows { entries },
                });
                out.push(Action::Send {
                    to: next,
                    msg: Msg::Join {
                        joiner,
                        hops: hops + 1,
                        min_row: next_min,
                    },
                });
            }
            None => out.push(Action::Send {
                to: joiner,
                msg: Msg::JoinReply {
                    expected: hops,
                    leaf_set: self.leaf_list(now),
                    entries,
                },
            }),
        }
    }

    /// Re-routes a Join whose next hop failed; my rows already went out.
    fn route_join(
        &mut self,
        now: Micros,
        joiner: NodeHandle,
        hops: u8,
        min_row: u8,
        out: &mut Vec<Action>,
    ) {
        match self.next_hop_skipping(joiner.id, Some(joiner.id)) {
            Some(next) => out.push(Action::Send {
                to: next,
                msg: Msg::Join {
                    joiner,
                    hops,
                    min_row,
                },
            }),
            None => out.push(Action::Send {
                to: joiner,
                msg: Msg::JoinReply {
                    expected: hops,
                    leaf_set: self.leaf_list(now),
                    entries: JoinList::new(),
                },
            }),
        }
    }

    /// Takes in what a join-path node sent.
    fn absorb(
        &mut self,
        now: Micros,
        from: NodeHandle,
        entries: &[NodeHandle],
        leaf: &[NodeHandle],
        out: &mut Vec<Action>,
    ) {
        self.learn(now, from, true, None, out);
        for h in leaf.iter().chain(entries) {
            self.learn(now, *h, false, None, out);
        }
    }

    fn finish_join(&mut self, now: Micros, out: &mut Vec<Action>) {
        self.state = State::Joined;
        out.push(Action::Joined);
        self.leaf_dirty = true;
        // Announce myself to everyone in my state; the answers measure RTTs.
        let mut seen: Vec<NodeId> = Vec::new();
        let targets: Vec<NodeHandle> = self
            .leaf
            .members()
            .map(|e| e.h)
            .chain(self.rt.iter().map(|e| e.h))
            .chain(self.nbrs.iter().map(|e| e.h))
            .collect();
        for h in targets {
            if seen.contains(&h.id) {
                continue;
            }
            seen.push(h.id);
            self.leaf.update(h.id, |e| {
                e.probe_sent = now;
                e.probes = 1;
            });
            let stamp = self.stamp(now, h.id);
            out.push(Action::Send {
                to: h,
                msg: Msg::Announce { stamp },
            });
        }
        for h in std::mem::take(&mut self.candidates) {
            if !seen.contains(&h.id) {
                self.probe(now, h, out);
            }
        }
        self.tokens_at = now;
        self.next_maint = now + self.jitter(self.cfg.maintenance_interval);
        self.next_gossip = now + self.jitter(self.cfg.leaf_gossip_interval);
        for (key, payload) in std::mem::take(&mut self.pending) {
            self.forward_route(now, key, self.me, 0, payload, out);
        }
    }

    // ---- learning and measuring ----

    /// Takes `h` into whatever tables want it. `direct`: `h` itself spoke
    /// to us (authenticated by the transport). Returns whether an RTT
    /// measurement of `h` would be useful. Second-hand leaf-set newcomers
    /// get an Announce (liveness check plus introduction); second-hand
    /// routing candidates get a budgeted probe.
    fn learn(
        &mut self,
        now: Micros,
        h: NodeHandle,
        direct: bool,
        rtt: Option<u32>,
        out: &mut Vec<Action>,
    ) -> bool {
        if h.id == self.me.id {
            return false;
        }
        if direct {
            if let Some(i) = self.dead.iter().position(|(id, _)| *id == h.id) {
                self.dead.remove(i);
            }
        } else if self.is_dead(now, h.id) {
            return false;
        }
        let joined = self.joined();
        // Once joined, a node enters my leaf set only after it answered me
        // itself: second-hand news of a dead (or made-up) node cannot
        // displace a live member, and repair needs no timeout per rumour.
        let verify = joined && !direct;
        let mut contact = false;
        if verify {
            contact = self.leaf.would_fit(h.id) && !self.leaf.contains(h.id);
        } else {
            let entry = LeafEntry {
                h,
                rtt: rtt.unwrap_or(UNKNOWN_RTT),
                last_heard: now,
                probe_sent: if direct { NO_PROBE } else { now },
                probes: if direct { 0 } else { 1 },
            };
            if self.leaf.insert(entry, direct) {
                self.leaf_dirty = true;
            }
        }
        if let Some(r) = rtt {
            self.leaf.update(h.id, |e| e.rtt = r);
            self.offer_neighbour(h, r);
        }
        // An RTT measured earlier (say, as a leaf-set member) still counts.
        let known = rtt.or_else(|| self.rtt(h.id).map(|r| r as u32));
        let mut wants = match self.rt.offer(h, known, direct) {
            Offer::Inserted | Offer::Full | Offer::Present => known.is_none(),
            Offer::Replaced(_) | Offer::Rejected => false,
        };
        if known.is_none()
            && self.nbrs.len() < self.cfg.neighbourhood_size
            && self.nbr(h.id).is_none()
        {
            wants = true;
        }
        if contact {
            // Short memory here: the rumour says it fits now, and an
            // answer takes one round trip.
            if !self.contacted(now, h.id, self.probe_step() / 2) {
                self.remember_contact(now, h.id);
                let stamp = self.stamp(now, h.id);
                out.push(Action::Send {
                    to: h,
                    msg: Msg::Announce { stamp },
                });
            }
            return false;
        }
        if !wants || self.contacted(now, h.id, self.cfg.probe_timeout) {
            return false;
        }
        if direct {
            return true;
        }
        if joined {
            self.probe(now, h, out);
        } else if self.candidates.len() < JOIN_CANDIDATES
            && !self.candidates.iter().any(|c| c.id == h.id)
        {
            self.candidates.push(h);
        }
        false
    }

    /// `learn` for a direct message that carries no probe: measure with a
    /// budgeted probe if useful.
    fn learn_and_measure(&mut self, now: Micros, h: NodeHandle, out: &mut Vec<Action>) {
        if self.learn(now, h, true, None, out) {
            self.probe(now, h, out);
        }
    }

    /// A budgeted RTT probe to a candidate.
    fn probe(&mut self, now: Micros, h: NodeHandle, out: &mut Vec<Action>) {
        let per = self.cfg.candidate_probes as u128;
        let elapsed = now.saturating_sub(self.tokens_at) as u128;
        let refill = elapsed * per / self.cfg.probe_interval as u128;
        if refill > 0 {
            self.tokens = (self.tokens as u128 + refill).min(per) as u32;
            self.tokens_at = now;
        }
        if self.tokens == 0 {
            return;
        }
        self.tokens -= 1;
        self.remember_contact(now, h.id);
        let stamp = self.stamp(now, h.id);
        out.push(Action::Send {
            to: h,
            msg: Msg::Probe { stamp },
        });
    }

    fn remember_contact(&mut self, now: Micros, id: NodeId) {
        if self.probed.len() >= RECENT_PROBES {
            self.probed.pop_front();
        }
        self.probed.push_back((id, now));
    }

    /// Contacted within `ttl` (at most the probe timeout, which bounds the
    /// memory): the answer may be on its way.
    fn contacted(&mut self, now: Micros, id: NodeId, ttl: Micros) -> bool {
        let keep = self.cfg.probe_timeout;
        while self
            .probed
            .front()
            .is_some_and(|(_, t)| now.saturating_sub(*t) >= keep)
        {
            self.probed.pop_front();
        }
        self.probed
            .iter()
            .any(|(x, t)| *x == id && now.saturating_sub(*t) < ttl)
    }

    fn offer_neighbour(&mut self, h: NodeHandle, rtt: u32) {
        match self.nbrs.binary_search_by(|e| e.h.id.cmp(&h.id)) {
            Ok(i) => self.nbrs[i].rtt = rtt,
            Err(i) if self.nbrs.len() < self.cfg.neighbourhood_size => {
                self.nbrs.insert(i, Entry { h, rtt })
            }
            Err(_) => {
                let mut w = 0;
                for (j, e) in self.nbrs.iter().enumerate() {
                    if e.rtt > self.nbrs[w].rtt {
                        w = j;
                    }
                }
                if rtt < self.nbrs[w].rtt {
                    self.nbrs.remove(w);
                    let i = self.nbrs.partition_point(|e| e.h.id < h.id);
                    self.nbrs.insert(i, Entry { h, rtt });
                }
            }
        }
    }

    fn is_dead(&mut self, now: Micros, id: NodeId) -> bool {
        let ttl = self.cfg.dead_ttl;
        while self
            .dead
            .front()
            .is_some_and(|(_, t)| now.saturating_sub(*t) >= ttl)
        {
            self.dead.pop_front();
        }
        self.dead.iter().any(|(d, _)| *d == id)
    }

    // ---- failure and repair ----

    /// Drops `id` from every table; repairs what it leaves behind.
    fn fail_node(&mut self, now: Micros, id: NodeId, out: &mut Vec<Action>) {
        let handle = self
            .leaf
            .get(id)
            .map(|e| e.h)
            .or_else(|| self.rt.get(id).map(|e| e.h))
            .or_else(|| self.nbr(id).map(|e| e.h));
        let (left, right) = self.leaf.remove(id);
        let slot = self.rt.remove(id);
        self.nbrs.retain(|e| e.h.id != id);
        self.candidates.retain(|h| h.id != id);
        let Some(h) = handle else {
            return;
        };
        if !self.dead.iter().any(|(d, _)| *d == id) {
            if self.dead.len() >= DEAD_MEMORY {
                self.dead.pop_front();
            }
            self.dead.push_back((id, now));
        }
        out.push(Action::NodeFailed(h));
        if !self.joined() {
            return;
        }
        if left || right {
            self.leaf_dirty = true;
            for (changed, side) in [(left, Side::Left), (right, Side::Right)] {
                if changed {
                    self.repair_leaf(side, out);
                }
            }
        }
        if let Some((r, c)) = slot {
            self.repair_slot(r, c, out);
        }
    }

    /// Ask the farthest live member on `side` for its leaf set; it knows
    /// the nodes beyond the gap.
    fn repair_leaf(&mut self, side: Side, out: &mut Vec<Action>) {
        let other = match side {
            Side::Left => Side::Right,
            Side::Right => Side::Left,
        };
        let target = self
            .leaf
            .farthest(side)
            .or_else(|| self.leaf.farthest(other))
            .or_else(|| {
                // Nothing left in the leaf set: the numerically closest
                // node we still know.
                let me = self.me.id;
                self.rt
                    .iter()
                    .map(|e| e.h)
                    .min_by(|a, b| me.distance(a.id).cmp(&me.distance(b.id)))
            });
        if let Some(t) = target {
            out.push(Action::Send {
                to: t,
                msg: Msg::LeafSetRequest,
            });
        }
    }

    /// Ask another entry of row r (else of row r+1) for its slot (r, c):
    /// sharing at least r digits with me, its slot holds exactly what mine
    /// needs.
    fn repair_slot(&mut self, r: usize, c: usize, out: &mut Vec<Action>) {
        let pick = |rt: &RoutingTable, row: usize, rng: &mut u64| -> Option<NodeHandle> {
            let v: Vec<&Entry> = rt
                .row(row)
                .iter()
                .filter(|e| e.h.id.digit(row) != c || row != r)
                .collect();
            if v.is_empty() {
                None
            } else {
                Some(v[(splitmix(rng) % v.len() as u64) as usize].h)
            }
        };
        let target =
            pick(&self.rt, r, &mut self.rng).or_else(|| pick(&self.rt, r + 1, &mut self.rng));
        if let Some(t) = target {
            out.push(Action::Send {
                to: t,
                msg: Msg::RowRequest {
                    row: r as u8,
                    col: Some(c as u8),
                },
            });
        }
    }

    fn keep_alive(&mut self, now: Micros, out: &mut Vec<Action>) {
        let interval = self.cfg.probe_interval;
        let timeout = self.cfg.probe_timeout;
        let step = self.probe_step();
        let retries = self.cfg.probe_retries;
        let mut send: Vec<NodeHandle> = Vec::new();
        let mut failed: Vec<NodeId> = Vec::new();
        let members: Vec<LeafEntry> = self.leaf.members().copied().collect();
        for e in members {
            let id = e.h.id;
            if e.probe_sent != NO_PROBE {
                let waited = now.saturating_sub(e.probe_sent);
                if waited >= timeout {
                    failed.push(id);
                } else if e.probes <= retries && waited >= step * e.probes as Micros {
                    self.leaf.update(id, |x| x.probes += 1);
                    send.push(e.h);
                }
            } else if now.saturating_sub(e.last_heard) >= interval {
                self.leaf.update(id, |x| {
                    x.probe_sent = now;
                    x.probes = 1;
                });
                send.push(e.h);
            }
        }
        for h in send {
            let stamp = self.stamp(now, h.id);
            out.push(Action::Send {
                to: h,
                msg: Msg::Probe { stamp },
            });
        }
        for id in failed {
            self.fail_node(now, id, out);
        }
    }

    /// Periodic: exchange one routing-table row (proximity gets better and
    /// holes get filled).
    fn maintain(&mut self, now: Micros, out: &mut Vec<Action>) {
        self.next_maint = now + self.jitter(self.cfg.maintenance_interval);
        let rows = self.rt.rows();
        if rows > 0 {
            for i in 0..rows {
                let r = (self.maint_row + i) % rows;
                let row = self.rt.row(r);
                if !row.is_empty() {
                    let e = row[(splitmix(&mut self.rng) % row.len() as u64) as usize].h;
                    out.push(Action::Send {
                        to: e,
                        msg: Msg::RowRequest {
                            row: r as u8,
                            col: None,
                        },
                    });
                    self.maint_row = r + 1;
                    break;
                }
            }
        }
    }

    /// Periodic: ask the farthest member of one side (alternating) for its
    /// leaf set. It knows the nodes just beyond my range, so a live node
    /// that stale replies kept out during a repair is found within two
    /// rounds, and so are nodes missed by racing joins.
    fn gossip(&mut self, now: Micros, out: &mut Vec<Action>) {
        self.next_gossip = now + self.jitter(self.cfg.leaf_gossip_interval);
        self.gossip_right = !self.gossip_right;
        let side = if self.gossip_right {
            Side::Right
        } else {
            Side::Left
        };
        if let Some(t) = self.leaf.farthest(side) {
            out.push(Action::Send {
                to: t,
                msg: Msg::LeafSetRequest,
            });
        }
    }

    // ---- helpers ----

    fn finish(&mut self, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.leaf_dirty) {
            out.push(Action::LeafSetChanged);
        }
    }

    /// My leaf set as I vouch for it: members with a probe unanswered for
    /// a retry step are left out, so a failure I am about to detect does
    /// not spread to the node that asked.
    fn leaf_list(&self, now: Micros) -> LeafList {
        let step = self.probe_step();
        Bounded::truncating(
            self.leaf
                .members()
                .filter(|e| e.probe_sent == NO_PROBE || now.saturating_sub(e.probe_sent) < step)
                .map(|e| e.h),
        )
    }

    fn probe_step(&self) -> Micros {
        (self.cfg.probe_timeout / (self.cfg.probe_retries as Micros + 1)).max(1)
    }

    fn tag(&self, peer: NodeId, sent: Micros) -> u64 {
        let mut h = DefaultHasher::new();
        (self.secret, peer.0, sent, self.me.id.0).hash(&mut h);
        h.finish()
    }

    fn stamp(&self, now: Micros, peer: NodeId) -> Stamp {
        Stamp {
            sent: now,
            tag: self.tag(peer, now),
        }
    }

    /// `d` scaled by a random factor in [0.75, 1.25).
    fn jitter(&mut self, d: Micros) -> Micros {
        let f = splitmix(&mut self.rng) % 1000;
        d / 4 * 3 + d / 2 * f / 1000
    }
}

const _: () = assert!(MAX_JOIN_ENTRIES >= 2 * 16 * MAX_SLOT_ENTRIES);

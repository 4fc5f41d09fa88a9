//! `GameNode`: one node's side of the distributed equilibrium search.
//!
//! Variant chosen (aggregative game with tracked averages): a node's cost
//! depends on the others only through the aggregate X = sum_j x_j, so
//! instead of estimating the whole action profile (a vector of N entries per
//! node and per message: 80 KB per neighbour at N = 10,000, and each entry
//! learnt only by diffusion) every node tracks a few cluster averages with
//! dynamic average consensus (Metropolis weights) and steps on its own
//! action with the aggregate they give. The estimate vector has DIM entries:
//!
//! * mean of x_j (the aggregate, divided by N),
//! * mean of the anchor indicator: 1 at the node that serves the root of key
//!   0, 0 elsewhere, so it converges to 1/N and gives N without any node
//!   having to know it,
//! * mean of 1/(2Q_j + eps), which gives kappa = eps sum_j 1/(2Q_j + eps),
//!   the strength of the price feedback, and so the step size,
//! * mean of the served vnode counts (the cluster's vnode total, for status),
//! * mean capacity, which gives each node its fair share c_i / sum_j c_j of
//!   the keys to measure its load against.
//!
//! With ~32 random-ish neighbours the Metropolis matrix mixes fast (second
//! eigenvalue ~0.4) and every message is at most 96 bytes.
//!
//! Consensus runs as flows on edges (flow updating): node i keeps f_ij, the
//! amount it has passed to j, and its estimate is z_i = r_i - sum_j f_ij
//! where r_i is its own signal. One round on edge (i, j) adds
//! w_ij (z_i - z_j) to f_ij, which is exactly z <- W z + (r(k+1) - r(k)),
//! the tracking update. Flows are antisymmetric (f_ji = -f_ij), so
//! sum_i z_i = sum_i r_i holds at every round; when a neighbour leaves its
//! flows are dropped and the sum is again that of the nodes still there:
//! departures leave no stale mass behind. The node with the smaller id owns
//! the flow of an edge; the other adopts it from each message, so a lost
//! message perturbs one round and never accumulates.

use super::math::{metropolis_weight, projected_step, Player};
use super::params::{GameSettings, NodeParams, LOAD_FACTOR_MAX, LOAD_FACTOR_MIN, MAX_VNODES};
use crate::id::{Micros, NodeId};
use serde::{Deserialize, Serialize};

/// Length of the estimate vector: mean x, anchor indicator, sensitivity,
/// vnode count.
pub const DIM: usize = 5;
const IX: usize = 0;
const IE: usize = 1;
const IS: usize = 2;
const IV: usize = 3;
const IC: usize = 4;

/// Most peers a node exchanges with: the overlay's neighbourhood and leaf
/// sets plus the nodes that list this one (edges must be mutual).
pub const MAX_PEERS: usize = 128;
/// Rounds without a message after which a peer counts as gone and its flow
/// is dropped.
pub const STALE_ROUNDS: u64 = 3;
/// Largest node count an estimate may claim; below 1/this the anchor's
/// signal has not arrived yet and the node holds its action.
pub const MAX_NODES_ESTIMATE: f64 = 1.0e6;
/// The vnode count moves only when x is further than 0.5 + this from it.
pub const HYSTERESIS: f64 = 0.3;
/// Fewest rounds between two vnode count changes.
pub const DWELL_ROUNDS: u64 = 3;
/// The count moves only once x moves by less than this fraction per round:
/// keys are not handed over while the loop is still in its transient.
pub const SETTLED_STEP: f64 = 0.02;
/// Counts whose measured load the node remembers. A node whose marginal
/// vnode owns a wide arc would otherwise swing between two counts, each
/// time learning again that the other one was worse.
pub const LOAD_MEMORY: usize = 8;
/// Rounds a remembered load stays valid: others' vnodes move the arcs.
pub const LOAD_MEMORY_ROUNDS: u64 = 400;
/// Exponent of the load factor's integral step: below 1 so that a marginal
/// vnode with a wide arc (local slope up to ~3 times the mean) still
/// converges.
pub const LOAD_GAIN: f64 = 0.5;
/// Dead band of the load controller, in vnodes' worth of load.
pub const LOAD_DEAD_BAND: f64 = 0.5;
/// Bound on any number taken from the wire.
pub const WIRE_CAP: f64 = 1.0e9;

/// What a node sends each neighbour each round: its estimate vector, its
/// degree (for the Metropolis weight) and the flow it holds on this edge.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GameMsg {
    pub round: u64,
    pub degree: u16,
    pub estimate: [f64; DIM],
    pub flow: [f64; DIM],
}

/// Why a game message was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GameMsgError {
    #[error("game message of {0} bytes exceeds the {max} byte bound", max = GameMsg::MAX_BYTES)]
    TooLong(usize),
    #[error("game message does not decode: {0}")]
    Decode(String),
    #[error("game message degree {0} exceeds {MAX_PEERS}")]
    Degree(u16),
    #[error("game message carries a non-finite or out-of-range number")]
    Number,
    #[error("game message from this node itself")]
    FromSelf,
    #[error("peer table full ({MAX_PEERS}); message from {0:?} ignored")]
    PeerTableFull(NodeId),
}

impl GameMsg {
    /// Upper bound on an encoded message (postcard: two varints, 10 f64s).
    pub const MAX_BYTES: usize = 96;

    pub fn encode(&self) -> Result<Vec<u8>, GameMsgError> {
        postcard::to_allocvec(self).map_err(|e| GameMsgError::Decode(e.to_string()))
    }

    /// Decodes and validates a message from the wire.
    pub fn decode(bytes: &[u8]) -> Result<GameMsg, GameMsgError> {
        if bytes.len() > Self::MAX_BYTES {
            return Err(GameMsgError::TooLong(bytes.len()));
        }
        let m: GameMsg =
            postcard::from_bytes(bytes).map_err(|e| GameMsgError::Decode(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<(), GameMsgError> {
        if usize::from(self.degree) > MAX_PEERS {
            return Err(GameMsgError::Degree(self.degree));
        }
        let ok = |v: &f64| v.is_finite() && v.abs() <= WIRE_CAP;
        if !self.estimate.iter().all(ok) || !self.flow.iter().all(ok) {
            return Err(GameMsgError::Number);
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Peer {
    id: NodeId,
    /// What this node has passed to the peer, per estimate entry.
    flow: [f64; DIM],
    /// Listed by the runtime (overlay neighbourhood or leaf set).
    given: bool,
    /// Sent to in the current round: only these edges update at the tick.
    recipient: bool,
    last_heard: Option<u64>,
    fresh: Option<GameMsg>,
}

/// The node's view of the cluster, derived from its estimate vector.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Estimates {
    /// Estimated number of nodes (None until the anchor's signal arrives).
    pub nodes: Option<f64>,
    /// Estimated mean x over the cluster.
    pub mean_x: f64,
    /// Estimated aggregate X = sum_j x_j.
    pub aggregate: Option<f64>,
    /// Estimated number of vnodes served in the cluster.
    pub vnodes_total: Option<f64>,
    /// Estimated price feedback eps * sum_j 1/(2Q_j + eps).
    pub kappa: Option<f64>,
    /// Estimated sum of the nodes' capacities.
    pub capacity_total: Option<f64>,
    /// Raw estimate vector (mean x, anchor mean, sensitivity mean, mean
    /// vnodes).
    pub vector: [f64; DIM],
}

/// A change of the served vnode count that the runtime must carry out
/// (join the new vnodes, or hand the keys of the dropped ones off first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VnodeChange {
    pub from: u32,
    pub to: u32,
}

/// Outcome of one round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GameStep {
    pub round: u64,
    pub x: f64,
    pub vnodes: u32,
    pub change: Option<VnodeChange>,
    pub price: Option<f64>,
}

/// What the status API and page show.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GameStatus {
    pub round: u64,
    pub x: f64,
    pub vnodes: u32,
    pub max_vnodes: u32,
    pub price: Option<f64>,
    pub q: f64,
    pub l: f64,
    pub load_factor: f64,
    pub anchor: bool,
    pub peers: usize,
    pub estimates: Estimates,
    pub last_tick: Micros,
}

/// One node's player in the vnode game. Sans-IO: the runtime tells it its
/// neighbours, carries its messages and calls `tick` once per round.
///
/// Round protocol: `set_neighbours` (optional; the last set is kept), then
/// for each of `recipients()` send `round_msg(to)`, feed every message
/// received to `handle`, then `tick`.
#[derive(Clone, Debug)]
pub struct GameNode {
    id: NodeId,
    settings: GameSettings,
    params: NodeParams,
    x: f64,
    anchor: bool,
    peers: heapless::Vec<Peer, MAX_PEERS>,
    round: u64,
    sent_estimate: [f64; DIM],
    sent_degree: u16,
    vnodes: u32,
    last_change: u64,
    /// (count, |ln rho| measured at that count, round measured).
    memory: heapless::Vec<(u32, f64, u64), LOAD_MEMORY>,
    last_step: f64,
    last_tick: Micros,
}

impl GameNode {
    /// A node joining with one vnode (x = 1).
    pub fn new(id: NodeId, params: NodeParams, settings: GameSettings) -> GameNode {
        let mut n = GameNode {
            id,
            settings,
            params,
            x: 1.0f64.min(params.s()),
            anchor: false,
            peers: heapless::Vec::new(),
            round: 0,
            sent_estimate: [0.0; DIM],
            sent_degree: 0,
            vnodes: 1,
            last_change: 0,
            memory: heapless::Vec::new(),
            last_step: f64::INFINITY,
            last_tick: 0,
        };
        n.snapshot();
        n
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The offer x_i, a real number in [0, S_i].
    pub fn x(&self) -> f64 {
        self.x
    }

    /// Vnodes served: x rounded with hysteresis and a dwell time, at least 1
    /// so the node stays reachable in the overlay.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    pub fn params(&self) -> &NodeParams {
        &self.params
    }

    pub fn settings(&self) -> &GameSettings {
        &self.settings
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    fn player(&self) -> Player {
        Player {
            q: self.params.q(&self.settings),
            l: self.params.l(&self.settings),
            s: self.params.s(),
        }
    }

    fn signal(&self) -> [f64; DIM] {
        let p = self.player();
        [
            self.x,
            if self.anchor { 1.0 } else { 0.0 },
            1.0 / (2.0 * p.q + self.settings.eps),
            f64::from(self.vnodes),
            self.params.capacity,
        ]
    }

    fn estimate_vector(&self) -> [f64; DIM] {
        let mut z = self.signal();
        for p in &self.peers {
            for (zk, fk) in z.iter_mut().zip(p.flow) {
                *zk -= fk;
            }
        }
        z
    }

    /// The cluster view from the current estimate vector.
    pub fn estimates(&self) -> Estimates {
        let z = self.estimate_vector();
        let nodes = (z[IE] > 1.0 / MAX_NODES_ESTIMATE).then(|| 1.0 / z[IE]);
        Estimates {
            nodes,
            mean_x: z[IX],
            aggregate: nodes.map(|n| z[IX] * n),
            vnodes_total: nodes.map(|n| z[IV] * n),
            kappa: nodes.map(|n| (self.settings.eps * z[IS] * n).max(0.0)),
            capacity_total: nodes.map(|n| z[IC] * n),
            vector: z,
        }
    }

    /// The price this node sees: R - eps * (estimated X).
    pub fn price(&self) -> Option<f64> {
        self.estimates()
            .aggregate
            .map(|a| self.settings.r - self.settings.eps * a)
    }

    pub fn status(&self) -> GameStatus {
        let p = self.player();
        GameStatus {
            round: self.round,
            x: self.x,
            vnodes: self.vnodes,
            max_vnodes: self.params.max_vnodes,
            price: self.price(),
            q: p.q,
            l: p.l,
            load_factor: self.params.load_factor,
            anchor: self.anchor,
            peers: self.peers.len(),
            estimates: self.estimates(),
            last_tick: self.last_tick,
        }
    }

    /// Whether this node serves the root of key 0 (the overlay knows). Exactly
    /// one node should say yes; a short overlap or gap only delays the
    /// estimate of N.
    pub fn set_anchor(&mut self, anchor: bool) {
        self.anchor = anchor;
    }

    /// New capacity, limit or background load (e.g. a profile change or a
    /// smoothed utilisation reading). The load factor is kept.
    pub fn set_params(&mut self, mut params: NodeParams) {
        params.load_factor = self.params.load_factor;
        self.params = params;
        self.x = self.x.min(self.params.s());
        self.vnodes = self.vnodes.min(self.params.max_vnodes.max(1));
    }

    /// Feeds the measured share of the key space (or of the stored keys) this
    /// node holds, in [0, 1]. Against its fair share c_i / sum_j c_j it gives
    /// rho = load relative to capacity, and the load factor a in
    /// Q = q0 a / c moves by rho^LOAD_GAIN: an integral controller, so the
    /// loop settles where load follows capacity whatever the arcs of the
    /// vnodes added or dropped turn out to be. Inside a dead band of half a
    /// vnode's worth of load nothing moves: one vnode more or less could not
    /// do better, and integrating there would only wind up.
    pub fn observe_load(&mut self, share: f64) {
        let Some(total_c) = self.estimates().capacity_total else {
            return;
        };
        let rho = share * total_c / self.params.capacity;
        if !(rho.is_finite() && rho > 0.0) {
            return;
        }
        let err = rho.ln().abs();
        self.remember(self.vnodes, err);
        let k = f64::from(self.vnodes.max(1));
        if err <= LOAD_DEAD_BAND / k {
            return;
        }
        // The next count in the direction rho asks for is known to be
        // worse: stay, and do not wind the factor up against it.
        let next = if rho > 1.0 {
            self.vnodes.saturating_sub(1)
        } else {
            self.vnodes + 1
        };
        if self.remembered(next).is_some_and(|e| e >= err) {
            return;
        }
        let a = self.params.load_factor * rho.powf(LOAD_GAIN);
        self.params.load_factor = a.clamp(LOAD_FACTOR_MIN, LOAD_FACTOR_MAX);
    }

    fn remember(&mut self, count: u32, err: f64) {
        let round = self.round;
        self.memory
            .retain(|m| m.0 != count && round.saturating_sub(m.2) <= LOAD_MEMORY_ROUNDS);
        if self.memory.is_full() {
            // Forget the oldest.
            if let Some(pos) = (0..self.memory.len()).min_by_key(|&i| self.memory[i].2) {
                self.memory.remove(pos);
            }
        }
        let _ = self.memory.push((count, err, round));
    }

    fn remembered(&self, count: u32) -> Option<f64> {
        self.memory
            .iter()
            .find(|m| m.0 == count && self.round.saturating_sub(m.2) <= LOAD_MEMORY_ROUNDS)
            .map(|m| m.1)
    }

    /// The overlay's current neighbours for this game (neighbourhood set and
    /// leaf set, any vnode's; the runtime maps them to their nodes' ids).
    /// Nodes that message this one are added by `handle`, so edges are
    /// mutual even where the overlay's sets are not.
    pub fn set_neighbours(&mut self, ids: &[NodeId]) {
        for p in self.peers.iter_mut() {
            p.given = false;
        }
        for &id in ids {
            if id == self.id {
                continue;
            }
            if let Some(p) = self.peers.iter_mut().find(|p| p.id == id) {
                p.given = true;
            } else {
                // A full table ignores the rest; they are not sent to either,
                // so no edge is half-used.
                let _ = self.peers.push(Peer {
                    id,
                    flow: [0.0; DIM],
                    given: true,
                    recipient: false,
                    last_heard: None,
                    fresh: None,
                });
            }
        }
        self.snapshot();
    }

    /// Drops peers gone silent and fixes the round's recipients, degree and
    /// the estimate every message of this round carries.
    fn snapshot(&mut self) {
        let round = self.round;
        let stale = |p: &Peer| {
            p.last_heard
                .is_none_or(|h| round.saturating_sub(h) > STALE_ROUNDS)
        };
        for p in self.peers.iter_mut() {
            if stale(p) {
                p.flow = [0.0; DIM];
            }
        }
        self.peers.retain(|p| p.given || !stale(p));
        for p in self.peers.iter_mut() {
            p.recipient = true;
        }
        self.sent_degree = self.peers.len() as u16;
        self.sent_estimate = self.estimate_vector();
    }

    /// Peers to send this round's message to.
    pub fn recipients(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.peers.iter().filter(|p| p.recipient).map(|p| p.id)
    }

    /// This round's message for peer `to` (None if `to` is not a recipient).
    pub fn round_msg(&self, to: NodeId) -> Option<GameMsg> {
        let p = self.peers.iter().find(|p| p.id == to && p.recipient)?;
        Some(GameMsg {
            round: self.round,
            degree: self.sent_degree,
            estimate: self.sent_estimate,
            flow: p.flow,
        })
    }

    /// A neighbour's message for this round.
    pub fn handle(&mut self, _now: Micros, from: NodeId, msg: GameMsg) -> Result<(), GameMsgError> {
        msg.validate()?;
        if from == self.id {
            return Err(GameMsgError::FromSelf);
        }
        let round = self.round;
        if let Some(p) = self.peers.iter_mut().find(|p| p.id == from) {
            p.fresh = Some(msg);
            p.last_heard = Some(round);
            return Ok(());
        }
        self.peers
            .push(Peer {
                id: from,
                flow: [0.0; DIM],
                given: false,
                recipient: false,
                last_heard: Some(round),
                fresh: Some(msg),
            })
            .map_err(|_| GameMsgError::PeerTableFull(from))
    }

    /// Ends the round: mixes the estimates over the mutual edges heard from,
    /// takes the projected gradient step, updates the vnode count and fixes
    /// the next round's messages.
    pub fn tick(&mut self, now: Micros) -> GameStep {
        self.last_tick = now;
        let d_i = usize::from(self.sent_degree);
        let z_sent = self.sent_estimate;
        let me = self.id;
        for p in self.peers.iter_mut() {
            let Some(m) = p.fresh.take() else { continue };
            if !p.recipient {
                // It did not hear from this node this round, so it does not
                // update the edge either; next round it is a recipient.
                continue;
            }
            let w = metropolis_weight(d_i, usize::from(m.degree));
            // The smaller id owns the edge's flow; the other side adopts
            // it, then both apply the same update.
            let lower = me < p.id;
            for (k, f) in p.flow.iter_mut().enumerate() {
                let delta = w * (z_sent[k] - m.estimate[k]);
                *f = if lower {
                    *f + delta
                } else {
                    -m.flow[k] + delta
                };
            }
        }

        let est = self.estimates();
        let x_old = self.x;
        if let (Some(agg), Some(kappa)) = (est.aggregate, est.kappa) {
            // gamma = 1/(1 + kappa) puts the aggregate mode of the
            // full-information iteration at 0 and the others at
            // kappa/(1 + kappa); see math::projected_step.
            let gamma = 1.0 / (1.0 + kappa);
            let s = &self.settings;
            self.x = projected_step(&self.player(), s.r, s.eps, self.x, agg, gamma);
        }
        self.last_step = (self.x - x_old).abs();
        let change = self.update_vnodes();
        self.round += 1;
        self.snapshot();
        GameStep {
            round: self.round,
            x: self.x,
            vnodes: self.vnodes,
            change,
            price: self.price(),
        }
    }

    fn update_vnodes(&mut self) -> Option<VnodeChange> {
        let cap = self.params.max_vnodes.clamp(1, MAX_VNODES);
        let cur = f64::from(self.vnodes);
        let settled = self.last_step <= SETTLED_STEP * self.x.max(1.0);
        let dwelt = self.round.saturating_sub(self.last_change) >= DWELL_ROUNDS;
        if !settled || !dwelt || (self.x - cur).abs() <= 0.5 + HYSTERESIS {
            return None;
        }
        let to = (self.x.round() as u32).clamp(1, cap);
        if to == self.vnodes {
            return None;
        }
        // A count already tried and measured worse than this one is not
        // taken again while the measurement holds.
        if let (Some(here), Some(there)) = (self.remembered(self.vnodes), self.remembered(to)) {
            if there >= here {
                return None;
            }
        }
        let change = VnodeChange {
            from: self.vnodes,
            to,
        };
        self.vnodes = to;
        self.last_change = self.round;
        Some(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(i: u128, cap: f64) -> GameNode {
        let s = GameSettings::for_fleet(4);
        GameNode::new(NodeId(i), NodeParams::new(cap, 64).unwrap(), s)
    }

    fn exchange(nodes: &mut [GameNode], drop: &dyn Fn(usize, usize) -> bool) {
        let mut msgs = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            for to in n.recipients() {
                if let (Some(m), Some(j)) = (n.round_msg(to), nodes.iter().position(|x| x.id == to))
                {
                    if !drop(i, j) {
                        msgs.push((j, n.id, m));
                    }
                }
            }
        }
        for (j, from, m) in msgs {
            nodes[j].handle(0, from, m).unwrap();
        }
        for n in nodes.iter_mut() {
            n.tick(0);
        }
    }

    #[test]
    fn message_roundtrip_and_bounds() {
        let m = GameMsg {
            round: 7,
            degree: 3,
            estimate: [1.0, 0.5, 0.25, 2.0, 1.5],
            flow: [-1.0, 0.0, 3.0, 1e6, -2.0],
        };
        let b = m.encode().unwrap();
        assert!(b.len() <= GameMsg::MAX_BYTES);
        assert_eq!(GameMsg::decode(&b), Ok(m));
        assert!(matches!(
            GameMsg::decode(&[0u8; 200]),
            Err(GameMsgError::TooLong(200))
        ));
        assert!(matches!(
            GameMsg::decode(&b[..5]),
            Err(GameMsgError::Decode(_))
        ));
        let mut bad = m;
        bad.estimate[1] = f64::NAN;
        assert_eq!(
            GameMsg::decode(&bad.encode().unwrap()),
            Err(GameMsgError::Number)
        );
        bad = m;
        bad.degree = 1000;
        assert_eq!(bad.validate(), Err(GameMsgError::Degree(1000)));
        let mut n = node(1, 1.0);
        assert_eq!(n.handle(0, NodeId(1), m), Err(GameMsgError::FromSelf));
    }

    #[test]
    fn edges_become_mutual_and_sums_are_conserved() {
        // A path 0-1-2-3 given one way only; the reverse edges come from
        // the messages.
        let mut nodes: Vec<GameNode> = (0..4).map(|i| node(10 + i, 1.0 + i as f64)).collect();
        nodes[0].set_anchor(true);
        for i in 0..3 {
            let next = nodes[i + 1].id;
            nodes[i].set_neighbours(&[next]);
        }
        for _ in 0..3 {
            exchange(&mut nodes, &|_, _| false);
        }
        assert_eq!(nodes[1].recipients().count(), 2);
        // The sum of estimates equals the sum of signals, entry by entry.
        let zsum: f64 = nodes.iter().map(|n| n.estimate_vector()[IE]).sum();
        assert!((zsum - 1.0).abs() < 1e-12, "{zsum}");
        for _ in 0..200 {
            exchange(&mut nodes, &|_, _| false);
        }
        for n in &nodes {
            let e = n.estimates();
            assert!((e.nodes.unwrap() - 4.0).abs() < 1e-6, "{:?}", e);
            let xs: f64 = nodes.iter().map(|m| m.x()).sum();
            assert!((e.aggregate.unwrap() - xs).abs() < 1e-6 * xs);
        }
    }

    #[test]
    fn lost_messages_do_not_leak_mass() {
        let mut nodes: Vec<GameNode> = (0..6).map(|i| node(100 + i, 1.0)).collect();
        nodes[3].set_anchor(true);
        let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
        for n in nodes.iter_mut() {
            n.set_neighbours(&ids);
        }
        let mut seed = 12345u64;
        for _ in 0..60 {
            // Drop about a fifth of all messages, one direction at a time.
            exchange(&mut nodes, &|i, j| {
                let h = (i as u64 * 31 + j as u64 + seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                (h >> 60) < 3
            });
            seed = seed.wrapping_add(7);
        }
        for _ in 0..40 {
            exchange(&mut nodes, &|_, _| false);
        }
        let zsum: f64 = nodes.iter().map(|n| n.estimate_vector()[IE]).sum();
        assert!((zsum - 1.0).abs() < 1e-9, "anchor mass {zsum}");
        for n in &nodes {
            assert!((n.estimates().nodes.unwrap() - 6.0).abs() < 1e-6);
        }
    }

    #[test]
    fn departed_peer_flows_are_dropped() {
        let mut nodes: Vec<GameNode> = (0..5).map(|i| node(200 + i, 1.0)).collect();
        nodes[0].set_anchor(true);
        let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
        for n in nodes.iter_mut() {
            n.set_neighbours(&ids);
        }
        for _ in 0..30 {
            exchange(&mut nodes, &|_, _| false);
        }
        // Node 4 leaves without a word; the others still list it.
        nodes.pop();
        for _ in 0..(STALE_ROUNDS as usize + 40) {
            exchange(&mut nodes, &|_, _| false);
        }
        for n in &nodes {
            let e = n.estimates();
            assert!((e.nodes.unwrap() - 4.0).abs() < 1e-6, "{e:?}");
            let xs: f64 = nodes.iter().map(|m| m.x()).sum();
            assert!((e.aggregate.unwrap() - xs).abs() < 1e-6 * xs);
        }
    }

    #[test]
    fn vnode_count_moves_with_hysteresis_and_dwell() {
        let mut n = node(1, 1.0);
        n.last_step = 0.0;
        n.round = 10;
        n.x = 1.7; // within 0.5 + HYSTERESIS of 1
        assert_eq!(n.update_vnodes(), None);
        n.x = 1.9;
        assert_eq!(n.update_vnodes(), Some(VnodeChange { from: 1, to: 2 }));
        n.x = 3.9;
        n.round = 11; // dwell not over
        assert_eq!(n.update_vnodes(), None);
        n.round = 13;
        assert_eq!(n.update_vnodes(), Some(VnodeChange { from: 2, to: 4 }));
        // Oscillating around 4.5 does not flap.
        for (k, x) in [4.6, 4.4, 4.7, 4.3, 4.75, 3.25].iter().enumerate() {
            n.x = *x;
            n.round = 20 + 5 * k as u64;
            assert_eq!(n.update_vnodes(), None);
        }
        // Still moving fast: no change yet.
        n.x = 9.0;
        n.last_step = 2.0;
        assert_eq!(n.update_vnodes(), None);
        // Never below 1.
        n.last_step = 0.0;
        n.x = 0.0;
        assert_eq!(n.update_vnodes(), Some(VnodeChange { from: 4, to: 1 }));
    }

    #[test]
    fn a_count_measured_worse_is_not_taken_again() {
        let mut n = node(1, 1.0);
        n.last_step = 0.0;
        n.round = 10;
        n.vnodes = 5;
        n.remember(5, 0.05);
        n.remember(6, 0.30);
        n.x = 6.0;
        assert_eq!(n.update_vnodes(), None);
        // Once the memory is stale the count may be tried again.
        n.round = 10 + LOAD_MEMORY_ROUNDS + 1;
        assert_eq!(n.update_vnodes(), Some(VnodeChange { from: 5, to: 6 }));
        // A better-measured count is taken.
        n.remember(6, 0.30);
        n.remember(7, 0.01);
        n.round += DWELL_ROUNDS;
        n.x = 7.0;
        assert_eq!(n.update_vnodes(), Some(VnodeChange { from: 6, to: 7 }));
    }

    #[test]
    fn load_factor_follows_measured_share() {
        let mut nodes: Vec<GameNode> = (0..4).map(|i| node(300 + i, 1.0)).collect();
        nodes[0].set_anchor(true);
        let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
        for n in nodes.iter_mut() {
            n.set_neighbours(&ids);
        }
        for _ in 0..50 {
            exchange(&mut nodes, &|_, _| false);
        }
        // Four equal nodes: the fair share is 1/4. Node 0 holds half the
        // ring, rho = 2, so a moves by sqrt(2).
        assert!((nodes[0].estimates().capacity_total.unwrap() - 4.0).abs() < 1e-6);
        nodes[0].observe_load(0.5);
        let a = nodes[0].params().load_factor;
        assert!((a - 2f64.sqrt()).abs() < 1e-6, "{a}");
        nodes[0].observe_load(f64::NAN);
        assert_eq!(nodes[0].params().load_factor, a);
        // Inside the dead band (half a vnode's worth) nothing moves.
        let k = f64::from(nodes[0].vnodes());
        nodes[0].observe_load(0.25 * (1.0 + 0.2 / k));
        assert_eq!(nodes[0].params().load_factor, a);
        // A higher load factor lowers the offer.
        let x_before = nodes[0].x();
        for _ in 0..30 {
            exchange(&mut nodes, &|_, _| false);
        }
        assert!(
            nodes[0].x() < 0.8 * x_before,
            "{} vs {x_before}",
            nodes[0].x()
        );
    }
}

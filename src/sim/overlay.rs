//! The overlay simulator: N [`Pastry`] instances, the very code the node
//! runs, on a virtual network in virtual time.
//!
//! Network model (all one-way delays; parameters in [`OverlaySimOpts`]):
//! - nodes sit in `zones` zones (20 by default), each zone at a random
//!   point of the unit square; a node's zone is drawn uniformly;
//! - every node has an access delay drawn uniformly in 0.5..2.5 ms, so two
//!   nodes of one zone are 1..5 ms apart;
//! - two zones are `10 ms + 140 ms * d / sqrt(2)` apart (d = distance of
//!   their points), i.e. 10..150 ms, on top of both access delays;
//! - each message adds jitter, uniform in 0..(2 % of the delay + 0.1 ms);
//! - failed nodes drop everything; a send to a failed node (or one that
//!   fails while the message is in flight) comes back to the sender as
//!   `send_failed` after `send_fail_delay` (2 s), as QUIC would report it.
//!
//! Phases: (1) build by joins, each through a node of the joiner's own
//! zone, `join_concurrency` at a time; nodes are not ticked during the
//! build (no failures happen, and a million ticks per virtual second of
//! keep-alives would dominate the cost), so everything during the build is
//! driven by messages; (2) `lookups` random keys from random nodes; (3)
//! `fail_fraction` of the nodes fail at once and the lookups are repeated
//! at once, with no repair beyond what `send_failed` triggers on the way;
//! (4) every live node is ticked every `tick_interval` (keep-alive probes,
//! repair, maintenance) until every leaf set equals the true one (the
//! first ticks after the idle build probe every leaf-set member, and
//! maintenance rounds missed meanwhile are not made up), then ticking
//! stops; (5) the lookups are repeated. Phases without ticks run until no
//! event is left. A lookup succeeds when delivered at the live node
//! numerically closest to its key.

use super::net::{access_delay, zone_delays};
use super::queue::Queue;
use crate::id::{Micros, NodeHandle, NodeId};
use crate::overlay::{Action, Config, Msg, Pastry};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

const MS: Micros = 1_000;
const SEC: Micros = 1_000_000;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct OverlaySimOpts {
    pub nodes: usize,
    pub lookups: usize,
    /// Share of nodes failing at once after the first lookups (0 = none).
    pub fail_fraction: f64,
    pub seed: u64,
    pub zones: usize,
    /// Joins in flight at once during the build.
    pub join_concurrency: usize,
    /// Delay after which a send to a failed node is reported back.
    pub send_fail_delay: Micros,
    /// How often each node is ticked during the repair phase.
    pub tick_interval: Micros,
    /// Give up waiting for exact leaf sets after this much virtual time.
    pub repair_limit: Micros,
    pub overlay: Config,
}

impl Default for OverlaySimOpts {
    fn default() -> Self {
        OverlaySimOpts {
            nodes: 1000,
            lookups: 10_000,
            fail_fraction: 0.0,
            seed: 1,
            zones: 20,
            join_concurrency: 4,
            send_fail_delay: 2 * SEC,
            tick_interval: 250 * MS,
            repair_limit: 300 * SEC,
            overlay: Config::default(),
        }
    }
}

/// What one run measured. Times are wall-clock seconds unless named
/// `virtual`.
#[derive(Clone, Debug, Serialize)]
pub struct OverlayReport {
    pub nodes: usize,
    pub joined: usize,
    pub lookups: usize,
    pub fail_fraction: f64,
    pub seed: u64,
    pub zones: usize,
    pub leaf_set_size: usize,
    pub slot_entries: usize,
    pub mean_hops: f64,
    pub p99_hops: u32,
    pub max_hops: u32,
    pub success_rate: f64,
    /// Mean over lookups of (sum of one-way hop delays) / (direct delay
    /// origin -> root); lookups whose origin is the root are left out.
    pub rdp: f64,
    pub mean_lookup_ms: f64,
    pub failed_nodes: usize,
    pub success_after_failure: Option<f64>,
    pub mean_hops_after_failure: Option<f64>,
    pub repair_virtual_seconds: Option<f64>,
    pub success_after_repair: Option<f64>,
    /// Share of nodes whose leaf set equals the true one.
    pub leaf_sets_exact_after_build: f64,
    pub leaf_sets_exact_after_repair: Option<f64>,
    /// (virtual seconds since ticking started, share of exact leaf sets),
    /// sampled every half second of the repair phase.
    pub repair_curve: Vec<[f64; 2]>,
    pub mean_routing_entries: f64,
    pub messages: u64,
    pub messages_build: u64,
    pub messages_per_join: f64,
    pub messages_by_kind: BTreeMap<&'static str, u64>,
    pub events: u64,
    pub build_seconds: f64,
    pub build_virtual_seconds: f64,
    /// Wall-clock seconds of the phases after the build.
    pub lookup_seconds: f64,
    pub failure_lookup_seconds: f64,
    pub repair_seconds: f64,
    pub total_seconds: f64,
    pub peak_rss_mb: f64,
}

pub(super) struct SplitMix(pub(super) u64);

impl SplitMix {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub(super) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub(super) fn id(&mut self) -> NodeId {
        NodeId(((self.next() as u128) << 64) | self.next() as u128)
    }
}

/// Node `i`'s fabricated address: 10.x.y.z, port 7000.
fn addr_of(i: usize) -> SocketAddr {
    let n = (i + 1) as u32;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8),
        7000 + (n >> 24) as u16,
    ))
}

pub(super) fn index_of(a: &SocketAddr) -> Option<usize> {
    match a {
        SocketAddr::V4(v) => {
            let o = v.ip().octets();
            let n = ((v.port().checked_sub(7000)? as u32) << 24)
                | (o[1] as u32) << 16
                | (o[2] as u32) << 8
                | o[3] as u32;
            (o[0] == 10 && n > 0).then(|| n as usize - 1)
        }
        SocketAddr::V6(_) => None,
    }
}

pub(super) struct Node {
    pub(super) p: Pastry,
    zone: u16,
    access: u32,
    pub(super) alive: bool,
    joined: bool,
}

enum Ev {
    Msg { to: u32, from: NodeHandle, msg: Msg },
    Failed { at: u32, to: NodeHandle, msg: Msg },
    Tick(u32),
}

#[derive(Clone, Copy)]
struct Lookup {
    key: NodeId,
    origin: u32,
    /// Sum of the base delays of the hops taken.
    path: Micros,
    /// When it was delivered (virtual time).
    at: Micros,
    delivered: Option<(u32, u8)>,
}

pub(super) struct Sim {
    pub(super) nodes: Vec<Node>,
    zone_delay: Vec<Micros>,
    zones: usize,
    queue: Queue<Ev>,
    pub(super) now: Micros,
    pub(super) rng: SplitMix,
    pub(super) send_fail_delay: Micros,
    tick_interval: Micros,
    ticking: bool,
    messages: u64,
    by_kind: BTreeMap<&'static str, u64>,
    events: u64,
    lookups: Vec<Lookup>,
    // build bookkeeping
    next_join: usize,
    in_flight: usize,
    concurrency: usize,
    joined_by_zone: Vec<Vec<u32>>,
    joined_all: Vec<u32>,
}

impl Sim {
    fn new(opts: &OverlaySimOpts) -> Sim {
        let mut rng = SplitMix(opts.seed ^ 0x005e_ed0f_ca9f);
        let zones = opts.zones.max(1);
        let zone_delay = zone_delays(zones, &mut rng);
        let nodes = (0..opts.nodes)
            .map(|i| {
                let id = rng.id();
                let cfg = Config {
                    seed: rng.next(),
                    ..opts.overlay.clone()
                };
                Node {
                    p: Pastry::new(
                        NodeHandle {
                            id,
                            addr: addr_of(i),
                        },
                        cfg,
                    ),
                    zone: rng.below(zones) as u16,
                    access: access_delay(&mut rng),
                    alive: true,
                    joined: false,
                }
            })
            .collect();
        Sim {
            nodes,
            zone_delay,
            zones,
            // 1 ms buckets (every one-way delay is at least 1 ms) over 4 s.
            queue: Queue::new(MS, 4096),
            now: 0,
            rng,
            send_fail_delay: opts.send_fail_delay,
            tick_interval: opts.tick_interval.max(1),
            ticking: false,
            messages: 0,
            by_kind: BTreeMap::new(),
            events: 0,
            lookups: Vec::new(),
            next_join: 1,
            in_flight: 0,
            concurrency: opts.join_concurrency.max(1),
            joined_by_zone: vec![Vec::new(); zones],
            joined_all: Vec::new(),
        }
    }

    /// One-way delay between nodes without jitter.
    fn base_delay(&self, a: usize, b: usize) -> Micros {
        let (na, nb) = (&self.nodes[a], &self.nodes[b]);
        let z = self.zone_delay[na.zone as usize * self.zones + nb.zone as usize];
        na.access as Micros + nb.access as Micros + z
    }

    fn push(&mut self, at: Micros, ev: Ev) {
        self.queue.push(at, ev);
    }

    /// One message's one-way delay from `a` to `b`: the base delay plus
    /// jitter, as every overlay message gets.
    pub(super) fn delay(&mut self, a: usize, b: usize) -> Micros {
        let base = self.base_delay(a, b);
        base + self.rng.below((base / 50 + 100) as usize) as Micros
    }

    pub(super) fn apply(&mut self, who: usize, acts: Vec<Action>) {
        for a in acts {
            match a {
                Action::Send { to, msg } => self.send(who, to, msg),
                Action::Deliver { hops, payload, .. } => {
                    if let Some(l) = lookup_index(&payload).and_then(|i| self.lookups.get_mut(i)) {
                        if l.delivered.is_none() {
                            l.delivered = Some((who as u32, hops));
                            l.at = self.now;
                        }
                    }
                }
                Action::Joined => {
                    let n = &mut self.nodes[who];
                    if !n.joined {
                        n.joined = true;
                        let z = n.zone as usize;
                        self.joined_by_zone[z].push(who as u32);
                        self.joined_all.push(who as u32);
                        self.in_flight = self.in_flight.saturating_sub(1);
                        self.start_joins();
                    }
                }
                Action::LeafSetChanged | Action::NodeFailed(_) => {}
            }
        }
    }

    fn send(&mut self, from: usize, to: NodeHandle, msg: Msg) {
        self.messages += 1;
        *self.by_kind.entry(msg.kind()).or_insert(0) += 1;
        let target = index_of(&to.addr).filter(|&j| {
            j < self.nodes.len() && self.nodes[j].alive && self.nodes[j].p.me().id == to.id
        });
        match target {
            Some(j) => {
                let base = self.base_delay(from, j);
                if let Msg::Route { payload, .. } = &msg {
                    if let Some(l) = lookup_index(payload).and_then(|i| self.lookups.get_mut(i)) {
                        l.path += base;
                    }
                }
                let jitter = self.rng.below((base / 50 + 100) as usize) as Micros;
                let at = self.now + base + jitter;
                let from = self.nodes[from].p.me();
                self.push(
                    at,
                    Ev::Msg {
                        to: j as u32,
                        from,
                        msg,
                    },
                );
            }
            None => {
                let at = self.now + self.send_fail_delay;
                self.push(
                    at,
                    Ev::Failed {
                        at: from as u32,
                        to,
                        msg,
                    },
                );
            }
        }
    }

    fn start_joins(&mut self) {
        while self.in_flight < self.concurrency && self.next_join < self.nodes.len() {
            let i = self.next_join;
            self.next_join += 1;
            let z = self.nodes[i].zone as usize;
            let pool = if self.joined_by_zone[z].is_empty() {
                &self.joined_all
            } else {
                &self.joined_by_zone[z]
            };
            let via = pool[self.rng.below(pool.len())] as usize;
            let via = self.nodes[via].p.me();
            let acts = self.nodes[i].p.join(self.now, via);
            self.in_flight += 1;
            self.apply(i, acts);
        }
    }

    /// Runs events up to `until` (or until none are left).
    pub(super) fn run(&mut self, until: Micros) {
        while let Some((t, ev)) = self.queue.pop(until) {
            self.now = t;
            self.events += 1;
            match ev {
                Ev::Msg { to, from, msg } => {
                    let j = to as usize;
                    if self.nodes[j].alive {
                        let acts = self.nodes[j].p.handle(t, from, msg);
                        self.apply(j, acts);
                    } else if let Some(i) = index_of(&from.addr) {
                        // Lost in flight: the sender hears of it later.
                        let at = t + self.send_fail_delay;
                        let to = self.nodes[j].p.me();
                        self.push(
                            at,
                            Ev::Failed {
                                at: i as u32,
                                to,
                                msg,
                            },
                        );
                    }
                }
                Ev::Failed { at, to, msg } => {
                    let i = at as usize;
                    if self.nodes[i].alive {
                        let acts = self.nodes[i].p.send_failed(t, to, msg);
                        self.apply(i, acts);
                    }
                }
                Ev::Tick(i) => {
                    let i = i as usize;
                    if self.ticking && self.nodes[i].alive {
                        let acts = self.nodes[i].p.tick(t);
                        self.apply(i, acts);
                        let next = t + self.tick_interval;
                        self.push(next, Ev::Tick(i as u32));
                    }
                }
            }
        }
        if until != Micros::MAX {
            self.now = self.now.max(until);
        }
    }

    pub(super) fn live_sorted(&self) -> Vec<(NodeId, u32)> {
        let mut v: Vec<(NodeId, u32)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive && n.joined)
            .map(|(i, n)| (n.p.me().id, i as u32))
            .collect();
        v.sort_unstable();
        v
    }

    /// Routes `m` random keys from random live nodes, all at once, and
    /// waits for the network to go quiet.
    fn lookups(&mut self, m: usize) -> LookupStats {
        let live = self.live_sorted();
        let origins: Vec<u32> = live.iter().map(|x| x.1).collect();
        self.lookups = (0..m)
            .map(|_| Lookup {
                key: self.rng.id(),
                origin: origins[self.rng.below(origins.len())],
                path: 0,
                delivered: None,
                at: 0,
            })
            .collect();
        for i in 0..m {
            let l = self.lookups[i];
            let o = l.origin as usize;
            // A 4-byte payload stays far under the limit.
            if let Ok(acts) =
                self.nodes[o]
                    .p
                    .route(self.now, l.key, (i as u32).to_le_bytes().to_vec())
            {
                self.apply(o, acts);
            }
        }
        self.run(Micros::MAX);
        let mut hops: Vec<u32> = Vec::new();
        let mut ok = 0;
        let mut rdp = (0.0, 0usize);
        let mut total_ms = 0.0;
        for l in &self.lookups {
            let Some((at, h)) = l.delivered else {
                continue;
            };
            let root = true_root(&live, l.key);
            hops.push(h as u32);
            if at == root {
                ok += 1;
            }
            total_ms += l.path as f64 / MS as f64;
            if h > 0 && at != l.origin {
                let direct = self.base_delay(l.origin as usize, at as usize);
                rdp.0 += l.path as f64 / direct as f64;
                rdp.1 += 1;
            }
        }
        hops.sort_unstable();
        let n = hops.len().max(1);
        LookupStats {
            success: ok as f64 / m.max(1) as f64,
            mean_hops: hops.iter().map(|&h| h as f64).sum::<f64>() / n as f64,
            p99_hops: hops
                .get((hops.len() * 99).div_ceil(100).saturating_sub(1))
                .copied()
                .unwrap_or(0),
            max_hops: hops.last().copied().unwrap_or(0),
            rdp: rdp.0 / rdp.1.max(1) as f64,
            mean_ms: total_ms / n as f64,
        }
    }

    /// Share of live nodes whose leaf set is exactly the true one.
    pub(super) fn exact_leaf_sets(&self) -> f64 {
        let live = self.live_sorted();
        let n = live.len();
        if n == 0 {
            return 1.0;
        }
        let half = self.nodes[live[0].1 as usize].p.config().leaf_set_size / 2;
        let k = half.min(n - 1);
        let mut exact = 0;
        for (i, (_, idx)) in live.iter().enumerate() {
            let (l, r) = self.nodes[*idx as usize].p.leaf_sides();
            let ok = l.len() == k
                && r.len() == k
                && (1..=k).all(|d| r[d - 1].id == live[(i + d) % n].0)
                && (1..=k).all(|d| l[d - 1].id == live[(i + n - d) % n].0);
            if ok {
                exact += 1;
            }
        }
        exact as f64 / n as f64
    }
}

impl Sim {
    /// A network of `opts.nodes` nodes, every one joined through a node of
    /// its own zone (phase 1 of the module docs).
    pub(super) fn build(opts: &OverlaySimOpts) -> Sim {
        let mut sim = Sim::new(opts);
        if !sim.nodes.is_empty() {
            sim.nodes[0].p.bootstrap_alone();
            sim.apply(0, vec![Action::Joined]);
            sim.in_flight = 0;
            sim.start_joins();
        }
        sim.run(Micros::MAX);
        sim
    }

    /// From now on every live node is ticked every `tick_interval` (first
    /// at a random phase), until [`Sim::stop_ticking`].
    pub(super) fn start_ticking(&mut self) {
        self.ticking = true;
        let start = self.now;
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive {
                let at = start + self.rng.below(self.tick_interval as usize) as Micros;
                self.push(at, Ev::Tick(i as u32));
            }
        }
    }

    pub(super) fn stop_ticking(&mut self) {
        self.ticking = false;
    }

    /// Ticks every live node until every leaf set is exact (or `limit` of
    /// virtual time passed), then stops ticking and lets the network go
    /// quiet. Returns the virtual seconds it took (if it completed), the
    /// final share of exact leaf sets, and the curve of that share.
    pub(super) fn repair(&mut self, limit: Micros) -> (Option<f64>, f64, Vec<[f64; 2]>) {
        let start = self.now;
        self.start_ticking();
        let step = SEC / 2;
        let mut curve = Vec::new();
        let mut exact = self.exact_leaf_sets();
        curve.push([0.0, exact]);
        while exact < 1.0 && self.now - start < limit {
            let until = self.now + step;
            self.run(until);
            exact = self.exact_leaf_sets();
            curve.push([(self.now - start) as f64 / SEC as f64, exact]);
        }
        let done = (exact >= 1.0).then(|| (self.now - start) as f64 / SEC as f64);
        self.ticking = false;
        self.run(Micros::MAX);
        (done, exact, curve)
    }
}

struct LookupStats {
    success: f64,
    mean_hops: f64,
    p99_hops: u32,
    max_hops: u32,
    rdp: f64,
    mean_ms: f64,
}

fn lookup_index(payload: &[u8]) -> Option<usize> {
    let b: [u8; 4] = payload.try_into().ok()?;
    Some(u32::from_le_bytes(b) as usize)
}

/// Index of the live node numerically closest to `key`.
pub(super) fn true_root(live: &[(NodeId, u32)], key: NodeId) -> u32 {
    let n = live.len();
    let i = live.partition_point(|x| x.0 < key);
    let a = live[i % n];
    let b = live[(i + n - 1) % n];
    if key.closer(a.0, b.0) {
        a.1
    } else {
        b.1
    }
}

/// Peak resident memory of this process (VmHWM), 0 where unknown.
pub(super) fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Builds an overlay of `opts.nodes` nodes, measures lookups before and
/// after a mass failure, and after repair.
pub fn run_overlay(opts: &OverlaySimOpts) -> OverlayReport {
    let t0 = Instant::now();
    let mut sim = Sim::build(opts);
    let n = sim.nodes.len();
    let build_seconds = t0.elapsed().as_secs_f64();
    let build_virtual = sim.now as f64 / SEC as f64;
    let messages_build = sim.messages;
    let joined = sim.nodes.iter().filter(|x| x.joined).count();
    let exact_build = sim.exact_leaf_sets();
    let mean_routing_entries = sim
        .nodes
        .iter()
        .map(|x| x.p.routing_fill().iter().sum::<usize>())
        .sum::<usize>() as f64
        / n.max(1) as f64;

    let t1 = Instant::now();
    let before = sim.lookups(opts.lookups);
    let lookup_seconds = t1.elapsed().as_secs_f64();
    let mut failure_lookup_seconds = 0.0;
    let mut repair_seconds = 0.0;

    let mut failed_nodes = 0;
    let mut after_failure = None;
    let mut repair = None;
    let mut after_repair = None;
    let mut exact_repair = None;
    let mut repair_curve = Vec::new();
    if opts.fail_fraction > 0.0 && n > 1 {
        let live = sim.live_sorted();
        let k = ((opts.fail_fraction.min(1.0) * n as f64).round() as usize).min(live.len() - 1);
        let mut idx: Vec<u32> = live.iter().map(|x| x.1).collect();
        for i in 0..k {
            let j = i + sim.rng.below(idx.len() - i);
            idx.swap(i, j);
            sim.nodes[idx[i] as usize].alive = false;
        }
        failed_nodes = k;
        let t2 = Instant::now();
        after_failure = Some(sim.lookups(opts.lookups));
        failure_lookup_seconds = t2.elapsed().as_secs_f64();
        let t3 = Instant::now();

        let (r, exact, curve) = sim.repair(opts.repair_limit);
        repair = r;
        repair_curve = curve;
        exact_repair = Some(exact);
        repair_seconds = t3.elapsed().as_secs_f64();
        after_repair = Some(sim.lookups(opts.lookups));
    }

    OverlayReport {
        nodes: n,
        joined,
        lookups: opts.lookups,
        fail_fraction: opts.fail_fraction,
        seed: opts.seed,
        zones: sim.zones,
        leaf_set_size: opts.overlay.leaf_set_size,
        slot_entries: opts.overlay.slot_entries,
        mean_hops: before.mean_hops,
        p99_hops: before.p99_hops,
        max_hops: before.max_hops,
        success_rate: before.success,
        rdp: before.rdp,
        mean_lookup_ms: before.mean_ms,
        failed_nodes,
        success_after_failure: after_failure.as_ref().map(|s| s.success),
        mean_hops_after_failure: after_failure.as_ref().map(|s| s.mean_hops),
        repair_virtual_seconds: repair,
        success_after_repair: after_repair.as_ref().map(|s| s.success),
        leaf_sets_exact_after_build: exact_build,
        leaf_sets_exact_after_repair: exact_repair,
        repair_curve,
        mean_routing_entries,
        messages: sim.messages,
        messages_build,
        messages_per_join: messages_build as f64 / (joined.max(2) - 1) as f64,
        messages_by_kind: sim.by_kind,
        events: sim.events,
        build_seconds,
        build_virtual_seconds: build_virtual,
        lookup_seconds,
        failure_lookup_seconds,
        repair_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
        peak_rss_mb: peak_rss_mb(),
    }
}

/// Runs [`run_overlay`] and prints its report: one JSON object, or a few
/// readable lines.
/// `capy sim`: prints the report; returns the exit code.
pub fn print_overlay(opts: &OverlaySimOpts, json: bool) -> i32 {
    if opts.nodes == 0 || opts.nodes > 2_000_000 {
        eprintln!("capy: --nodes must be between 1 and 2000000");
        return 2;
    }
    if !(0.0..1.0).contains(&opts.fail_fraction) {
        eprintln!("capy: --fail-fraction must be at least 0 and below 1");
        return 2;
    }
    let r = run_overlay(opts);
    if json {
        return crate::cli::print_json(&r);
    }
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.2} %", v * 100.0));
    println!(
        "nodes                 {} ({} joined, {} zones)",
        r.nodes, r.joined, r.zones
    );
    println!("lookups               {}", r.lookups);
    println!(
        "hops                  mean {:.3}  p99 {}  max {}  (log16 N = {:.2})",
        r.mean_hops,
        r.p99_hops,
        r.max_hops,
        (r.nodes.max(1) as f64).log(16.0)
    );
    println!("success               {}", pct(Some(r.success_rate)));
    println!(
        "rdp                   {:.2}  (mean lookup {:.1} ms)",
        r.rdp, r.mean_lookup_ms
    );
    println!(
        "leaf sets exact       {}",
        pct(Some(r.leaf_sets_exact_after_build))
    );
    if r.failed_nodes > 0 {
        println!(
            "failed at once        {} ({:.1} %)",
            r.failed_nodes,
            r.fail_fraction * 100.0
        );
        println!("success after failure {}", pct(r.success_after_failure));
        println!(
            "repair                {}",
            r.repair_virtual_seconds
                .map_or("not complete".to_string(), |s| format!("{s:.1} s virtual"))
        );
        println!("success after repair  {}", pct(r.success_after_repair));
    }
    println!(
        "messages              {} ({:.0} per join)",
        r.messages, r.messages_per_join
    );
    println!(
        "time                  build {:.1} s, total {:.1} s, peak RSS {:.0} MB",
        r.build_seconds, r.total_seconds, r.peak_rss_mb
    );
    0
}

/// Recovery from simultaneous failures (`capy eval recovery`).
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryReport {
    pub nodes: usize,
    pub failed: usize,
    pub seed: u64,
    /// Lookups per batch; a batch starts every `batch_every` seconds.
    pub batch: usize,
    pub batch_every: f64,
    /// Virtual seconds from the failures until every live node's leaf set
    /// is exact again.
    pub leaf_sets_seconds: Option<f64>,
    /// Start (since the failures) of the first batch of lookups from which
    /// on every lookup of every batch reached its key's live root.
    pub lookups_seconds: Option<f64>,
    /// The later of the two: the overlay has recovered.
    pub recovered_seconds: Option<f64>,
    /// Lookups of the batches started before recovery that did not reach
    /// the right root (lost or delivered elsewhere).
    pub failed_lookups: usize,
    /// Mean lookup latency (ms) before the failures and in the first batch
    /// after them (detours around failed hops included).
    pub lookup_ms_before: f64,
    pub lookup_ms_first_batch: f64,
    /// (seconds since the failures, share of exact leaf sets, share of the
    /// batch started then that reached the right root, share of fixed
    /// probe lookups whose first try meets only live hops), per batch.
    pub curve: Vec<[f64; 4]>,
    pub messages_after_failure: u64,
}

impl Sim {
    /// Walks `key` from `origin` through the nodes' own next-hop choices
    /// (no messages): true when it ends at the live root over live nodes.
    fn probe(&self, origin: usize, key: NodeId, root: u32, max_hops: usize) -> bool {
        let mut cur = origin;
        for _ in 0..=max_hops {
            match self.nodes[cur].p.next_hop(key) {
                None => return cur as u32 == root,
                Some(h) => {
                    match index_of(&h.addr).filter(|&j| {
                        j < self.nodes.len()
                            && self.nodes[j].alive
                            && self.nodes[j].p.me().id == h.id
                    }) {
                        Some(j) => cur = j,
                        None => return false,
                    }
                }
            }
        }
        false
    }

    /// Routes `m` random lookups from random live nodes now, as real
    /// messages; returns their indices and true roots.
    fn launch(&mut self, m: usize, live: &[(NodeId, u32)]) -> (std::ops::Range<usize>, Vec<u32>) {
        let first = self.lookups.len();
        let mut roots = Vec::with_capacity(m);
        for _ in 0..m {
            let key = self.rng.id();
            let origin = live[self.rng.below(live.len())].1;
            roots.push(true_root(live, key));
            let i = self.lookups.len();
            self.lookups.push(Lookup {
                key,
                origin,
                path: 0,
                delivered: None,
                at: self.now,
            });
            if let Ok(acts) = self.nodes[origin as usize].p.route(
                self.now,
                key,
                (i as u32).to_le_bytes().to_vec(),
            ) {
                self.apply(origin as usize, acts);
            }
        }
        (first..first + m, roots)
    }
}

/// A batch of recovery lookups: (launch, lookups, true roots, share of
/// exact leaf sets then, share of first routes over live hops then).
type Batch = (Micros, std::ops::Range<usize>, Vec<u32>, f64, f64);

/// Builds an overlay, lets it tick for `warmup`, fails `fail` random nodes
/// at once, then starts a batch of `batch` lookups (real messages, with
/// the detour a failed hop causes) every `every` and checks leaf sets,
/// until leaf sets are exact and every batch since some point reached the
/// right roots within `window`, or `opts.repair_limit` has passed.
pub fn run_recovery(
    opts: &OverlaySimOpts,
    fail: usize,
    batch: usize,
    warmup: Micros,
    every: Micros,
) -> RecoveryReport {
    let window = 5 * SEC;
    let every = every.max(1);
    let mut sim = Sim::new(opts);
    let n = sim.nodes.len();
    if n > 0 {
        sim.nodes[0].p.bootstrap_alone();
        sim.apply(0, vec![Action::Joined]);
        sim.in_flight = 0;
        sim.start_joins();
    }
    sim.run(Micros::MAX);
    sim.ticking = true;
    let start = sim.now;
    for i in 0..n {
        if sim.nodes[i].alive {
            let at = start + sim.rng.below(sim.tick_interval as usize) as Micros;
            sim.push(at, Ev::Tick(i as u32));
        }
    }
    let until = sim.now + warmup;
    sim.run(until);
    // Lookup latency in steady state.
    let live = sim.live_sorted();
    sim.lookups.clear();
    let launched = sim.now;
    let (r, _) = sim.launch(batch, &live);
    let until = sim.now + window;
    sim.run(until);
    let before: Vec<f64> = sim.lookups[r]
        .iter()
        .filter(|l| l.delivered.is_some())
        .map(|l| (l.at - launched) as f64 / MS as f64)
        .collect();
    let lookup_ms_before = before.iter().sum::<f64>() / before.len().max(1) as f64;

    let k = fail.min(live.len().saturating_sub(1));
    let mut idx: Vec<u32> = live.iter().map(|x| x.1).collect();
    for i in 0..k {
        let j = i + sim.rng.below(idx.len() - i);
        idx.swap(i, j);
        sim.nodes[idx[i] as usize].alive = false;
    }
    let live = sim.live_sorted();
    let max_hops = opts.overlay.max_hops as usize;
    let probes: Vec<(usize, NodeId, u32)> = (0..batch)
        .map(|_| {
            let key = sim.rng.id();
            let origin = live[sim.rng.below(live.len())].1 as usize;
            (origin, key, true_root(&live, key))
        })
        .collect();
    let t0 = sim.now;
    let m0 = sim.messages;
    sim.lookups.clear();
    let secs = |t: Micros| (t - t0) as f64 / SEC as f64;
    let mut batches: Vec<Batch> = Vec::new();
    let mut leaf_at: Option<f64> = None;
    let mut streak: Option<Micros> = None;
    let mut judged = 0;
    let mut failed_lookups = 0;
    let mut curve = Vec::new();
    let mut lookup_ms_first_batch = f64::NAN;
    let mut exact = sim.exact_leaf_sets();
    loop {
        let first_try = probes
            .iter()
            .filter(|(o, key, root)| sim.probe(*o, *key, *root, max_hops))
            .count() as f64
            / batch.max(1) as f64;
        let (r, roots) = sim.launch(batch, &live);
        batches.push((sim.now, r, roots, exact, first_try));
        // Leaf sets are checked four times per batch.
        let end = sim.now + every;
        for q in 1..=4 {
            let until = sim.now.max(end - every + every * q / 4);
            sim.run(until);
            exact = sim.exact_leaf_sets();
            if exact < 1.0 {
                leaf_at = None;
            } else if leaf_at.is_none() {
                leaf_at = Some(secs(sim.now));
            }
        }
        // Judge the batches whose window has passed.
        while judged < batches.len() && batches[judged].0 + window <= sim.now {
            let (at, r, roots, exact, first_try) = &batches[judged];
            let ls = &sim.lookups[r.clone()];
            let ok = ls
                .iter()
                .zip(roots)
                .filter(|(l, root)| {
                    l.delivered.is_some_and(|(w, _)| w == **root) && l.at <= at + window
                })
                .count();
            if judged == 0 {
                let d: Vec<f64> = ls
                    .iter()
                    .filter(|l| l.delivered.is_some())
                    .map(|l| (l.at - at) as f64 / MS as f64)
                    .collect();
                lookup_ms_first_batch = d.iter().sum::<f64>() / d.len().max(1) as f64;
            }
            curve.push([
                secs(*at),
                *exact,
                ok as f64 / batch.max(1) as f64,
                *first_try,
            ]);
            if ok == batch {
                streak.get_or_insert(*at);
            } else {
                streak = None;
                failed_lookups += batch - ok;
            }
            judged += 1;
        }
        // Done once leaf sets are exact and a batch started after that
        // succeeded, with every batch since the streak began.
        let last = judged.checked_sub(1).map(|j| batches[j].0);
        let done = match (leaf_at, streak, last) {
            (Some(l), Some(_), Some(last)) => secs(last) >= l,
            _ => false,
        };
        if done || sim.now - t0 >= opts.repair_limit {
            break;
        }
    }
    let lookups_at = streak.map(secs);
    RecoveryReport {
        nodes: n,
        failed: k,
        seed: opts.seed,
        batch,
        batch_every: every as f64 / SEC as f64,
        leaf_sets_seconds: leaf_at,
        lookups_seconds: lookups_at,
        recovered_seconds: leaf_at.zip(lookups_at).map(|(a, b)| a.max(b)),
        failed_lookups,
        lookup_ms_before,
        lookup_ms_first_batch,
        curve,
        messages_after_failure: sim.messages - m0,
    }
}

//! Subscription latency: the node's own Scribe core (`overlay::scribe`) on
//! the simulated overlay, against polling the key's root.
//!
//! The overlay is built exactly as `capy sim` builds it (same Pastry code,
//! same WAN model: 20 zones on the unit square, 10..150 ms one way between
//! zones, 0.5..2.5 ms access delay per node, 2 % jitter; see `overlay`).
//! Then, for each subscriber count S, on `topics` random keys:
//!
//! - **publish**: S random nodes subscribe to the key through the tree
//!   (Subscribe routed hop by hop with Pastry's next hops, each hop a
//!   forwarder); once every subscriber is attached, the key's root
//!   publishes `publishes` updates, `publish_every` apart; latency is from
//!   the publish call at the root to delivery at each subscriber.
//! - **polling**: each subscriber asks the root every `poll_interval`
//!   (random phase), the request routed through the overlay and the answer
//!   sent straight back; latency is from the update at the root until the
//!   answer of the first poll that reached the root after it arrives.
//!
//! No heartbeats run while latency is measured (the tree is quiet). With
//! `fail_fraction`, the largest trees then run in steady state for 5 s
//! (overlay ticks, tree heartbeats) before a share of the nodes (never a
//! root) fails at once: the overlay repairs itself (Pastry ticks), trees
//! repair through heartbeats, failed sends and re-routing, and a probe
//! publication every 500 ms measures how many live subscribers it reaches.

use super::overlay::{index_of, peak_rss_mb, true_root, OverlaySimOpts, Sim};
use super::queue::Queue;
use crate::id::{Micros, NodeHandle, NodeId};
use crate::overlay::scribe::{Action, Msg, Scribe, ScribeConfig};
use crate::overlay::Pastry;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

const MS: Micros = 1_000;
const SEC: Micros = 1_000_000;

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SubscribeSimOpts {
    pub nodes: usize,
    pub subscribers: Vec<usize>,
    pub topics: usize,
    pub publishes: usize,
    pub publish_every: Micros,
    pub poll_interval: Micros,
    pub fail_fraction: f64,
    pub seed: u64,
    pub zones: usize,
}

impl Default for SubscribeSimOpts {
    fn default() -> Self {
        SubscribeSimOpts {
            nodes: 8000,
            subscribers: vec![100, 200, 400, 800, 1600, 3200, 6400],
            topics: 4,
            publishes: 20,
            publish_every: 500 * MS,
            poll_interval: SEC,
            fail_fraction: 0.05,
            seed: 1,
            zones: 20,
        }
    }
}

/// Latency percentiles over every (publication, subscriber) pair.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

fn latency(v: Vec<Micros>) -> Latency {
    if v.is_empty() {
        return Latency::default();
    }
    let ms = crate::stats::sorted(v.iter().map(|&x| x as f64 / MS as f64).collect());
    let q = |p: f64| crate::stats::percentile(&ms, p);
    Latency {
        samples: v.len(),
        median_ms: q(0.5),
        p90_ms: q(0.9),
        p99_ms: q(0.99),
        mean_ms: v.iter().sum::<Micros>() as f64 / v.len() as f64 / MS as f64,
    }
}

/// One subscriber count.
#[derive(Clone, Debug, Serialize)]
pub struct SubscribeRow {
    pub subscribers: usize,
    pub publish: Latency,
    pub polling: Latency,
    /// Deliveries over (publications x subscribers).
    pub delivered_ratio: f64,
    pub tree_depth_mean: f64,
    pub tree_depth_max: u8,
    /// Children of the root, mean over topics.
    pub root_children: f64,
    /// Tree members that are not subscribers, mean over topics.
    pub forwarders: f64,
    /// Tree messages per publication.
    pub messages_per_publish: f64,
    /// Messages to build the trees, per subscriber.
    pub subscribe_messages_per_subscriber: f64,
}

/// Trees after a mass failure.
#[derive(Clone, Debug, Serialize)]
pub struct RepairReport {
    pub subscribers: usize,
    pub failed_nodes: usize,
    /// Live subscribers whose tree path went through a failed node.
    pub cut_off: usize,
    /// Share of live subscribers the first probes (sent at the failure)
    /// reached, mean over the keys.
    pub first_probe_reach: f64,
    /// Virtual seconds from the failure until every later probe reached at
    /// least 99.9 % of the live subscribers; `None` if that never happened.
    pub repaired_after_s: Option<f64>,
    /// The same for 100 % (single publications may still be missed while
    /// routes settle, when a member changes parent at the wrong moment).
    pub full_reach_after_s: Option<f64>,
    /// (publication, subscriber) pairs missed after `repaired_after_s`, and
    /// how many there were in all.
    pub missed_after_repair: u64,
    pub deliveries_after_repair: u64,
    /// Reach of the probes in the last 5 s.
    pub final_reach: f64,
    pub overlay_repair_s: Option<f64>,
    /// (virtual seconds after the failure, mean reach of the probes sent
    /// then).
    pub reach_curve: Vec<[f64; 2]>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SubscribeReport {
    pub nodes: usize,
    pub zones: usize,
    pub wan: &'static str,
    pub topics: usize,
    pub publishes: usize,
    pub poll_interval_ms: f64,
    pub rows: Vec<SubscribeRow>,
    pub repair: Option<RepairReport>,
    pub build_seconds: f64,
    pub total_seconds: f64,
    pub peak_rss_mb: f64,
}

const WAN: &str = "20 zones on the unit square; one way: 10 ms + 140 ms x distance/sqrt(2) between zones, plus 0.5..2.5 ms access per node, plus jitter up to 2 % + 0.1 ms";

enum Ev {
    Msg { to: u32, from: NodeHandle, msg: Msg },
    Failed { at: u32, to: NodeHandle },
    Publish { topic: usize },
    Tick(u32),
}

/// Scribe on every node of a built overlay.
struct Net {
    sim: Sim,
    scribes: Vec<Scribe>,
    queue: Queue<Ev>,
    now: Micros,
    keys: Vec<NodeId>,
    roots: Vec<usize>,
    /// (topic, seq) -> publish time.
    published: HashMap<(usize, u64), Micros>,
    latencies: Vec<Micros>,
    depths: Vec<u8>,
    /// Deliveries per (topic, seq).
    reach: HashMap<(usize, u64), usize>,
    messages: u64,
    publish_messages: u64,
    attached: HashSet<(usize, u32)>,
    ticking: bool,
    tick_every: Micros,
}

impl Net {
    fn new(sim: Sim) -> Net {
        let n = sim.nodes.len();
        let now = sim.now;
        Net {
            sim,
            scribes: (0..n)
                .map(|_| Scribe::new(ScribeConfig::default()))
                .collect(),
            queue: Queue::new(MS, 4096),
            now,
            keys: Vec::new(),
            roots: Vec::new(),
            published: HashMap::new(),
            latencies: Vec::new(),
            depths: Vec::new(),
            reach: HashMap::new(),
            messages: 0,
            publish_messages: 0,
            attached: HashSet::new(),
            ticking: false,
            tick_every: 500 * MS,
        }
    }

    fn topic_of(&self, key: NodeId) -> Option<usize> {
        self.keys.iter().position(|k| *k == key)
    }

    fn apply(&mut self, i: usize, acts: Vec<Action>) {
        for a in acts {
            match a {
                Action::Send { to, msg } => {
                    self.messages += 1;
                    if matches!(msg, Msg::Publish { .. }) {
                        self.publish_messages += 1;
                    }
                    let target = index_of(&to.addr).filter(|&j| {
                        j < self.sim.nodes.len()
                            && self.sim.nodes[j].alive
                            && self.sim.nodes[j].p.me().id == to.id
                    });
                    match target {
                        Some(j) => {
                            let at = self.now + self.sim.delay(i, j);
                            let from = self.sim.nodes[i].p.me();
                            self.queue.push(
                                at,
                                Ev::Msg {
                                    to: j as u32,
                                    from,
                                    msg,
                                },
                            );
                        }
                        None => {
                            let at = self.now + self.sim.send_fail_delay;
                            self.queue.push(at, Ev::Failed { at: i as u32, to });
                        }
                    }
                }
                Action::Deliver {
                    topic, seq, hops, ..
                } => {
                    if let Some(t) = self.topic_of(topic) {
                        if let Some(&at) = self.published.get(&(t, seq)) {
                            self.latencies.push(self.now - at);
                            self.depths.push(hops);
                            *self.reach.entry((t, seq)).or_insert(0) += 1;
                        }
                    }
                }
                Action::Attached { topic } => {
                    if let Some(t) = self.topic_of(topic) {
                        self.attached.insert((t, i as u32));
                    }
                }
                Action::Gap { .. } => {}
            }
        }
    }

    fn with(&mut self, i: usize, f: impl FnOnce(&mut Scribe, &Pastry) -> Vec<Action>) {
        let r = &self.sim.nodes[i].p;
        let acts = f(&mut self.scribes[i], r);
        self.apply(i, acts);
    }

    /// Runs scribe events up to `until`.
    fn run(&mut self, until: Micros) {
        while let Some((t, ev)) = self.queue.pop(until) {
            self.now = t;
            match ev {
                Ev::Msg { to, from, msg } => {
                    let j = to as usize;
                    if self.sim.nodes[j].alive {
                        let now = self.now;
                        self.with(j, |s, r| s.handle(now, from, msg, r));
                    } else if let Some(i) = index_of(&from.addr) {
                        let at = t + self.sim.send_fail_delay;
                        let to = self.sim.nodes[j].p.me();
                        self.queue.push(at, Ev::Failed { at: i as u32, to });
                    }
                }
                Ev::Failed { at, to } => {
                    let i = at as usize;
                    if self.sim.nodes[i].alive {
                        // the overlay learns of the dead node too, as the
                        // node runtime tells it (`Node::spawn_send`)
                        self.sim.now = self.sim.now.max(t);
                        let acts = self.sim.nodes[i].p.peer_failed(t, to);
                        self.sim.apply(i, acts);
                        let now = self.now;
                        self.with(i, |s, r| s.send_failed(now, to, r));
                    }
                }
                Ev::Publish { topic } => {
                    let root = self.roots[topic];
                    let key = self.keys[topic];
                    let now = self.now;
                    let (seq, acts) = self.scribes[root].publish(now, key, vec![0; 64]);
                    self.published.insert((topic, seq), now);
                    self.apply(root, acts);
                }
                Ev::Tick(i) => {
                    let i = i as usize;
                    if self.ticking && self.sim.nodes[i].alive {
                        let now = self.now;
                        self.with(i, |s, r| s.tick(now, r));
                        self.queue.push(t + self.tick_every, Ev::Tick(i as u32));
                    }
                }
            }
        }
        if until != Micros::MAX {
            self.now = self.now.max(until);
        }
    }

    /// The overlay's route delay from `from` to the root of `key`, hop by
    /// hop with Pastry's next hops (one sample of jitter per hop).
    fn route_delay(&mut self, from: usize, key: NodeId) -> Micros {
        let mut cur = from;
        let mut total = 0;
        for _ in 0..64 {
            let Some(h) = self.sim.nodes[cur].p.next_hop(key) else {
                break;
            };
            let Some(j) = index_of(&h.addr) else { break };
            total += self.sim.delay(cur, j);
            cur = j;
        }
        total
    }
}

/// Picks `k` distinct live nodes other than `not`.
fn pick(sim: &mut Sim, live: &[(NodeId, u32)], k: usize, not: &[usize]) -> Vec<usize> {
    let mut idx: Vec<usize> = live
        .iter()
        .map(|x| x.1 as usize)
        .filter(|i| !not.contains(i))
        .collect();
    let k = k.min(idx.len());
    for i in 0..k {
        let j = i + sim.rng.below(idx.len() - i);
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx
}

/// Runs the whole experiment.
pub fn run_subscribe(opts: &SubscribeSimOpts) -> SubscribeReport {
    let t0 = Instant::now();
    let oopts = OverlaySimOpts {
        nodes: opts.nodes,
        seed: opts.seed,
        zones: opts.zones,
        ..OverlaySimOpts::default()
    };
    let sim = Sim::build(&oopts);
    let build_seconds = t0.elapsed().as_secs_f64();
    let mut net = Net::new(sim);
    let mut rows = Vec::new();
    let mut subs_by_topic: Vec<Vec<usize>> = Vec::new();
    let counts: Vec<usize> = opts.subscribers.clone();
    for &s in counts.iter() {
        let live = net.sim.live_sorted();
        // fresh trees for every size
        net.scribes = (0..net.sim.nodes.len())
            .map(|_| Scribe::new(ScribeConfig::default()))
            .collect();
        net.keys = (0..opts.topics).map(|_| net.sim.rng.id()).collect();
        net.roots = net
            .keys
            .iter()
            .map(|k| true_root(&live, *k) as usize)
            .collect();
        net.published.clear();
        net.latencies.clear();
        net.depths.clear();
        net.reach.clear();
        net.attached.clear();
        subs_by_topic.clear();
        // subscribe, staggered over a second
        let start = net.now;
        net.messages = 0;
        for t in 0..opts.topics {
            let root = net.roots[t];
            let subs = pick(&mut net.sim, &live, s, &[root]);
            for &i in &subs {
                net.now = start + net.sim.rng.below(SEC as usize) as Micros;
                let key = net.keys[t];
                let now = net.now;
                net.with(i, |sc, r| sc.subscribe(now, key, r));
            }
            subs_by_topic.push(subs);
        }
        net.now = start;
        net.run(Micros::MAX);
        let subscribe_messages = net.messages;
        let total_subs: usize = subs_by_topic.iter().map(|v| v.len()).sum();
        // publish
        let pub_start = net.now + SEC;
        net.publish_messages = 0;
        for p in 0..opts.publishes {
            for t in 0..opts.topics {
                let at = pub_start
                    + p as Micros * opts.publish_every
                    + net.sim.rng.below(opts.publish_every as usize / 2) as Micros;
                net.queue.push(at, Ev::Publish { topic: t });
            }
        }
        net.run(Micros::MAX);
        let pubs = (opts.topics * opts.publishes).max(1);
        let delivered = net.latencies.len();
        // polling, against the same publication times
        let mut poll = Vec::with_capacity(total_subs * opts.publishes);
        let mut times: Vec<(usize, Micros)> =
            net.published.iter().map(|(k, v)| (k.0, *v)).collect();
        times.sort_unstable();
        let phases: Vec<Vec<Micros>> = subs_by_topic
            .iter()
            .map(|v| {
                v.iter()
                    .map(|_| net.sim.rng.below(opts.poll_interval as usize) as Micros)
                    .collect()
            })
            .collect();
        for &(t, at) in &times {
            let key = net.keys[t];
            let root = net.roots[t];
            for (k, &j) in subs_by_topic[t].clone().iter().enumerate() {
                let route = net.route_delay(j, key);
                let back = net.sim.delay(root, j);
                let phase = phases[t][k];
                // first poll sent at phase + i * P that reaches the root at
                // or after `at`
                let base = phase + route;
                let i = if at <= base {
                    0
                } else {
                    (at - base).div_ceil(opts.poll_interval)
                };
                let arrive = base + i * opts.poll_interval;
                poll.push(arrive + back - at);
            }
        }
        let root_children = net
            .keys
            .iter()
            .zip(&net.roots)
            .map(|(k, &r)| net.scribes[r].children(*k).len() as f64)
            .sum::<f64>()
            / opts.topics.max(1) as f64;
        let mut forwarders = 0usize;
        for (t, key) in net.keys.iter().enumerate() {
            let subs: HashSet<usize> = subs_by_topic[t].iter().copied().collect();
            forwarders += (0..net.scribes.len())
                .filter(|&i| {
                    i != net.roots[t]
                        && !subs.contains(&i)
                        && !net.scribes[i].children(*key).is_empty()
                })
                .count();
        }
        let depth_max = net.depths.iter().copied().max().unwrap_or(0);
        let depth_mean =
            net.depths.iter().map(|&d| d as f64).sum::<f64>() / net.depths.len().max(1) as f64;
        rows.push(SubscribeRow {
            subscribers: s,
            publish: latency(std::mem::take(&mut net.latencies)),
            polling: latency(poll),
            delivered_ratio: delivered as f64 / (pubs * s).max(1) as f64,
            tree_depth_mean: depth_mean,
            tree_depth_max: depth_max,
            root_children,
            forwarders: forwarders as f64 / opts.topics.max(1) as f64,
            messages_per_publish: net.publish_messages as f64 / pubs as f64,
            subscribe_messages_per_subscriber: subscribe_messages as f64 / total_subs.max(1) as f64,
        });
    }
    let repair = (opts.fail_fraction > 0.0 && !rows.is_empty())
        .then(|| repair_phase(&mut net, opts, &subs_by_topic));
    SubscribeReport {
        nodes: opts.nodes,
        zones: opts.zones,
        wan: WAN,
        topics: opts.topics,
        publishes: opts.publishes,
        poll_interval_ms: opts.poll_interval as f64 / MS as f64,
        rows,
        repair,
        build_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
        peak_rss_mb: peak_rss_mb(),
    }
}

/// Fails a share of the nodes under the last (largest) trees and follows
/// their repair with a probe publication every 500 ms.
fn repair_phase(net: &mut Net, opts: &SubscribeSimOpts, subs: &[Vec<usize>]) -> RepairReport {
    // Steady state first: the overlay's ticks and the trees' heartbeats
    // run for a few seconds, as they always do on real nodes.
    let t0 = net.now.max(net.sim.now);
    net.now = t0;
    net.sim.now = t0;
    net.ticking = true;
    for i in 0..net.sim.nodes.len() {
        if net.sim.nodes[i].alive {
            let at = t0 + net.sim.rng.below(net.tick_every as usize) as Micros;
            net.queue.push(at, Ev::Tick(i as u32));
        }
    }
    net.sim.start_ticking();
    let mut t = t0;
    while t < t0 + 5 * SEC {
        let until = t + 10 * MS;
        net.run(until);
        net.sim.run(until);
        t = until;
    }
    let live = net.sim.live_sorted();
    let k = ((opts.fail_fraction.min(0.5) * live.len() as f64).round() as usize)
        .min(live.len().saturating_sub(opts.topics + 1));
    let victims = pick(&mut net.sim, &live, k, &net.roots.clone());
    let dead: HashSet<usize> = victims.iter().copied().collect();
    // who is cut off: a live subscriber with a dead node on its tree path
    let mut cut_off = 0;
    for (t, list) in subs.iter().enumerate() {
        let key = net.keys[t];
        for &s in list.iter().filter(|s| !dead.contains(s)) {
            let mut cur = s;
            for _ in 0..64 {
                match net.scribes[cur].parent(key).and_then(|p| index_of(&p.addr)) {
                    Some(p) if dead.contains(&p) => {
                        cut_off += 1;
                        break;
                    }
                    Some(p) => cur = p,
                    None => break,
                }
            }
        }
    }
    for &v in &victims {
        net.sim.nodes[v].alive = false;
    }
    let live_subs: usize = subs
        .iter()
        .map(|l| l.iter().filter(|s| !dead.contains(s)).count())
        .sum();
    // Overlay and trees repair together: Pastry ticks (in the overlay's
    // queue), Scribe heartbeats and probes (in ours), in 10 ms steps.
    net.published.clear();
    net.reach.clear();
    net.latencies.clear();
    let start = net.now;
    let horizon = 40 * SEC;
    let mut probes: Vec<(Micros, usize)> = Vec::new(); // (time, topic)
    let mut next_probe = start;
    let mut overlay_done = None;
    let mut t = start;
    while t < start + horizon {
        if t >= next_probe {
            for topic in 0..opts.topics {
                net.queue.push(t, Ev::Publish { topic });
                probes.push((t, topic));
            }
            next_probe += 500 * MS;
        }
        let until = t + 10 * MS;
        net.run(until);
        net.sim.run(until);
        if overlay_done.is_none()
            && (until - start) % (500 * MS) < 10 * MS
            && net.sim.exact_leaf_sets() >= 1.0
        {
            overlay_done = Some((until - start) as f64 / SEC as f64);
        }
        t = until;
    }
    net.ticking = false;
    net.sim.stop_ticking();
    // reach of each probe: deliveries over live subscribers of its topic
    let live_of = |topic: usize| subs[topic].iter().filter(|s| !dead.contains(s)).count();
    // (time, reach, live subscribers, deliveries)
    let mut by_time: Vec<(Micros, f64, u64, u64)> = Vec::new();
    let pub_times: HashMap<(usize, Micros), u64> = net
        .published
        .iter()
        .map(|(&(topic, seq), &at)| ((topic, at), seq))
        .collect();
    for &(at, topic) in &probes {
        let got = pub_times
            .get(&(topic, at))
            .and_then(|seq| net.reach.get(&(topic, *seq)))
            .copied()
            .unwrap_or(0);
        let want = live_of(topic);
        by_time.push((at, got as f64 / want.max(1) as f64, want as u64, got as u64));
    }
    by_time.sort_by_key(|x| x.0);
    let first_at = by_time.first().map(|x| x.0);
    let firsts: Vec<f64> = by_time
        .iter()
        .filter(|x| Some(x.0) == first_at)
        .map(|x| x.1)
        .collect();
    let first = firsts.iter().sum::<f64>() / firsts.len().max(1) as f64;
    // the earliest time after which every probe reached `share`
    let from = |share: f64| {
        (0..by_time.len())
            .find(|&i| by_time[i..].iter().all(|x| x.1 >= share))
            .map(|i| by_time[i].0)
    };
    let repaired_at = from(0.999);
    let full_at = from(1.0);
    let secs = |t: Micros| (t - start) as f64 / SEC as f64;
    let (mut missed, mut deliveries) = (0u64, 0u64);
    if let Some(r) = repaired_at {
        for x in by_time.iter().filter(|x| x.0 >= r) {
            missed += x.2.saturating_sub(x.3);
            deliveries += x.2;
        }
    }
    let tail_from = start + horizon - 5 * SEC;
    let tail: Vec<f64> = by_time
        .iter()
        .filter(|x| x.0 >= tail_from)
        .map(|x| x.1)
        .collect();
    let mut reach_curve: Vec<[f64; 2]> = Vec::new();
    for &(at, r, _, _) in &by_time {
        let x = (at - start) as f64 / SEC as f64;
        match reach_curve.last_mut() {
            Some(last) if last[0] == x => last[1] += r,
            _ => reach_curve.push([x, r]),
        }
    }
    for p in reach_curve.iter_mut() {
        p[1] /= opts.topics.max(1) as f64;
    }
    RepairReport {
        reach_curve,
        subscribers: live_subs,
        failed_nodes: victims.len(),
        cut_off,
        first_probe_reach: first,
        repaired_after_s: repaired_at.map(secs),
        full_reach_after_s: full_at.map(secs),
        missed_after_repair: missed,
        deliveries_after_repair: deliveries,
        final_reach: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        overlay_repair_s: overlay_done,
    }
}

/// `capy sim subscribe`: prints the report; returns the exit code.
pub fn print_subscribe(opts: &SubscribeSimOpts, json: bool) -> i32 {
    let max = opts.subscribers.iter().copied().max().unwrap_or(0);
    let min = opts.subscribers.iter().copied().min().unwrap_or(0);
    if opts.nodes < 2 || opts.nodes > 200_000 {
        eprintln!("capy: --nodes must be between 2 and 200000");
        return 2;
    }
    if min == 0 || max >= opts.nodes {
        eprintln!(
            "capy: subscriber counts must be positive and below the node count ({})",
            opts.nodes
        );
        return 2;
    }
    if opts.topics == 0 || opts.topics > 64 || opts.publishes == 0 || opts.publishes > 10_000 {
        eprintln!("capy: --topics must be 1..64 and --publishes 1..10000");
        return 2;
    }
    // An hour bounds the virtual times (microseconds) far from overflow.
    let hour = 3600 * SEC;
    if !(1..=hour).contains(&opts.poll_interval) || !(1..=hour).contains(&opts.publish_every) {
        eprintln!(
            "capy: the polling and publishing intervals must be positive and at most an hour"
        );
        return 2;
    }
    if !(0.0..0.5).contains(&opts.fail_fraction) {
        eprintln!("capy: --fail-fraction must be at least 0 and below 0.5");
        return 2;
    }
    let r = run_subscribe(opts);
    if json {
        return crate::cli::print_json(&r);
    }
    println!(
        "{} nodes, {} topics x {} publications, polling every {} ms",
        r.nodes, r.topics, r.publishes, r.poll_interval_ms
    );
    println!("WAN: {}", r.wan);
    println!(
        "{:>11}  {:>24}  {:>24}  {:>6} {:>6} {:>8}",
        "subscribers",
        "publish ms (p50/p90/p99)",
        "polling ms (p50/p90/p99)",
        "depth",
        "reach",
        "msgs/pub"
    );
    for row in &r.rows {
        println!(
            "{:>11}  {:>8.1} {:>7.1} {:>7.1}  {:>8.1} {:>7.1} {:>7.1}  {:>6} {:>5.1}% {:>8.0}",
            row.subscribers,
            row.publish.median_ms,
            row.publish.p90_ms,
            row.publish.p99_ms,
            row.polling.median_ms,
            row.polling.p90_ms,
            row.polling.p99_ms,
            row.tree_depth_max,
            row.delivered_ratio * 100.0,
            row.messages_per_publish
        );
    }
    if let Some(rep) = &r.repair {
        println!(
            "repair: {} nodes failed; {} of {} live subscribers cut off; first probe reached {:.1} %; every probe reached >= 99.9 % from {} on ({} of {} deliveries missed after that); last 5 s {:.3} %",
            rep.failed_nodes,
            rep.cut_off,
            rep.subscribers,
            rep.first_probe_reach * 100.0,
            rep.repaired_after_s.map_or("never".into(), |s| format!("{s:.1} s")),
            rep.missed_after_repair,
            rep.deliveries_after_repair,
            rep.final_reach * 100.0
        );
    }
    println!(
        "time: build {:.1} s, total {:.1} s, peak RSS {:.0} MB",
        r.build_seconds, r.total_seconds, r.peak_rss_mb
    );
    0
}

//! The replication core on a simulated fleet: one [`Replicator`] per node
//! over an in-memory backend, the very code the node runs, fed from the
//! simulator's zone latency model ([`super::net`]) in virtual time.
//!
//! Model: every node serves `vnodes` vnodes; a key's replica set is its
//! `k` closest vnodes on distinct nodes, as converged leaf sets give it.
//! A routed store message reaches the key's root in one hop (the overlay's
//! own routing is what `capy sim` measures). Each message takes the one-way
//! delay plus its encoded size over the link's bandwidth (`lan_mbps` within
//! a zone, `wan_mbps` between zones). A commit takes `commit_delay`. Every
//! node's core is ticked (timeouts, anti-entropy) every `tick_every`.

use super::net::{access_delay, zone_delays, SplitMix, MS};
use super::queue::Queue;
use crate::id::{Micros, NodeHandle, NodeId};
use crate::store::replica::{Action, Outcome, ReplicaConfig, Replicator, StoreMsg};
use crate::store::{MemBackend, WriteOp};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// The clock starts here: the core compares tombstone ages with wall time.
pub const EPOCH: Micros = 1_700_000_000_000_000;

#[derive(Clone, Debug)]
pub struct StoreSimOpts {
    pub nodes: usize,
    pub zones: usize,
    pub vnodes: usize,
    pub seed: u64,
    pub commit_delay: Micros,
    pub lan_mbps: f64,
    pub wan_mbps: f64,
    pub tick_every: Micros,
    pub replica: ReplicaConfig,
}

impl Default for StoreSimOpts {
    fn default() -> Self {
        StoreSimOpts {
            nodes: 100,
            zones: 20,
            vnodes: 1,
            seed: 1,
            commit_delay: 2 * MS,
            lan_mbps: 100.0,
            wan_mbps: 20.0,
            tick_every: 100 * MS,
            replica: ReplicaConfig {
                maintain_every: 2_000 * MS,
                ..ReplicaConfig::default()
            },
        }
    }
}

pub struct StoreNode {
    pub disk: MemBackend,
    pub vnodes: Vec<NodeId>,
    pub zone: usize,
    access: u32,
    pub addr: SocketAddr,
}

enum Ev {
    Msg {
        to: u32,
        from: NodeHandle,
        msg: StoreMsg,
    },
    Commit {
        node: u32,
        token: u64,
        ops: Vec<WriteOp>,
    },
    Tick,
}

pub struct StoreSim {
    pub nodes: Vec<StoreNode>,
    /// The replication core of each node (apart from `nodes`, so a core can
    /// run while the placement reads the others).
    pub cores: Vec<Replicator>,
    /// Every vnode id with its node, sorted by id.
    ring: Vec<(NodeId, u32)>,
    zone_delay: Vec<Micros>,
    pub zones: usize,
    queue: Queue<Ev>,
    pub now: Micros,
    rng: SplitMix,
    opts: StoreSimOpts,
    next_req: u64,
    /// req -> (node that asked, when it finished, how)
    done: HashMap<u64, (Micros, Outcome)>,
    ticking: bool,
    pub messages: u64,
    pub bytes: u64,
}

fn addr_of(i: usize) -> SocketAddr {
    let n = (i + 1) as u32;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8),
        7000,
    ))
}

impl StoreSim {
    pub fn new(opts: &StoreSimOpts) -> StoreSim {
        let mut rng = SplitMix(opts.seed ^ 0x0000_570e_5eed);
        let zones = opts.zones.max(1);
        let zone_delay = zone_delays(zones, &mut rng);
        let mut ring = Vec::new();
        let mut cores = Vec::new();
        let nodes: Vec<StoreNode> = (0..opts.nodes.max(1))
            .map(|i| {
                let vnodes: Vec<NodeId> = (0..opts.vnodes.max(1)).map(|_| rng.id()).collect();
                for v in &vnodes {
                    ring.push((*v, i as u32));
                }
                cores.push(Replicator::new(
                    addr_of(i),
                    opts.replica.clone(),
                    rng.next(),
                ));
                StoreNode {
                    disk: MemBackend::new(),
                    vnodes,
                    zone: rng.below(zones),
                    access: access_delay(&mut rng),
                    addr: addr_of(i),
                }
            })
            .collect();
        ring.sort_unstable();
        StoreSim {
            nodes,
            cores,
            ring,
            zone_delay,
            zones,
            queue: Queue::new(MS, 4096),
            now: EPOCH,
            rng,
            opts: opts.clone(),
            next_req: 1,
            done: HashMap::new(),
            ticking: false,
            messages: 0,
            bytes: 0,
        }
    }

    /// A seeded random number below `n` (the run's own stream).
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.below(n)
    }

    pub fn handle(&self, i: usize) -> NodeHandle {
        NodeHandle {
            id: self.nodes[i].vnodes[0],
            addr: self.nodes[i].addr,
        }
    }

    fn index(&self, a: &SocketAddr) -> Option<usize> {
        match a {
            SocketAddr::V4(v) => {
                let o = v.ip().octets();
                let n = (o[1] as usize) << 16 | (o[2] as usize) << 8 | o[3] as usize;
                (o[0] == 10 && n >= 1 && n <= self.nodes.len()).then(|| n - 1)
            }
            SocketAddr::V6(_) => None,
        }
    }

    /// The `k` vnodes closest to `key` on distinct nodes, closest first.
    pub fn placement(&self, key: NodeId, k: usize) -> Vec<NodeHandle> {
        placement(&self.ring, &self.nodes, key, k)
    }

    /// The node serving the root vnode of `key`.
    pub fn root(&self, key: NodeId) -> usize {
        self.placement(key, 1)
            .first()
            .and_then(|h| self.index(&h.addr))
            .unwrap_or(0)
    }

    /// One-way delay between two nodes, without transfer time.
    pub fn delay(&self, a: usize, b: usize) -> Micros {
        if a == b {
            return 0;
        }
        let (na, nb) = (&self.nodes[a], &self.nodes[b]);
        na.access as Micros + nb.access as Micros + self.zone_delay[na.zone * self.zones + nb.zone]
    }

    /// Time to move `bytes` from `a` to `b` once the first bit arrived.
    pub fn transfer(&self, a: usize, b: usize, bytes: usize) -> Micros {
        if a == b {
            return 0;
        }
        let mbps = if self.nodes[a].zone == self.nodes[b].zone {
            self.opts.lan_mbps
        } else {
            self.opts.wan_mbps
        };
        (bytes as f64 * 8.0 / mbps.max(1e-3)) as Micros
    }

    fn deliver(&mut self, from: usize, to: usize, msg: StoreMsg) {
        let size = msg.encode().map(|b| b.len()).unwrap_or(0);
        self.messages += 1;
        self.bytes += size as u64;
        let at = self.now + self.delay(from, to) + self.transfer(from, to, size);
        let from = self.handle(from);
        self.queue.push(
            at,
            Ev::Msg {
                to: to as u32,
                from,
                msg,
            },
        );
    }

    fn apply(&mut self, i: usize, acts: Vec<Action>) {
        for a in acts {
            match a {
                Action::Send { to, msg } => {
                    if let Some(j) = self.index(&to.addr) {
                        self.deliver(i, j, msg);
                    }
                }
                Action::Route { key, msg } => {
                    let j = self.root(key);
                    self.deliver(i, j, msg);
                }
                Action::Persist { token, ops } => {
                    let at = self.now + self.opts.commit_delay;
                    self.queue.push(
                        at,
                        Ev::Commit {
                            node: i as u32,
                            token,
                            ops,
                        },
                    );
                }
                Action::Done { req, outcome } => {
                    self.done.insert(req, (self.now, outcome));
                }
            }
        }
    }

    fn req(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    /// A client write through node `at`; returns its request id.
    pub fn put(&mut self, at: usize, bucket: &str, key: &str, value: Vec<u8>, k: u8) -> u64 {
        let req = self.req();
        let now = self.now;
        match self.cores[at].put(now, req, bucket, key, Some(value), k) {
            Ok(acts) => self.apply(at, acts),
            Err(e) => {
                self.done.insert(
                    req,
                    (
                        now,
                        Outcome::Put(Err(crate::store::RemoteError::Invalid(e.to_string()))),
                    ),
                );
            }
        }
        req
    }

    /// A client read through node `at`; returns its request id.
    pub fn get(&mut self, at: usize, bucket: &str, key: &str, k: u8) -> u64 {
        let req = self.req();
        let now = self.now;
        match self.cores[at].get(now, req, bucket, key, k) {
            Ok(acts) => self.apply(at, acts),
            Err(e) => {
                self.done.insert(
                    req,
                    (
                        now,
                        Outcome::Get(Err(crate::store::RemoteError::Invalid(e.to_string()))),
                    ),
                );
            }
        }
        req
    }

    /// When and how request `req` finished, if it did.
    pub fn result(&self, req: u64) -> Option<&(Micros, Outcome)> {
        self.done.get(&req)
    }

    /// Runs until `req` finished or `limit` of virtual time passed.
    pub fn wait(&mut self, req: u64, limit: Micros) -> Option<&(Micros, Outcome)> {
        let end = self.now + limit;
        while !self.done.contains_key(&req) && self.now < end {
            let until = (self.now + 5 * MS).min(end);
            self.run(until);
        }
        self.done.get(&req)
    }

    /// Nodes holding a live copy of the key.
    pub fn holders(&self, bucket: &str, key: &str) -> Vec<usize> {
        use crate::store::replica::Backend;
        (0..self.nodes.len())
            .filter(|&i| matches!(self.nodes[i].disk.get(bucket, key), Ok(Some(e)) if !e.deleted))
            .collect()
    }

    /// Ticks every node's core from now on.
    pub fn start_ticks(&mut self) {
        if !self.ticking {
            self.ticking = true;
            let at = self.now + self.opts.tick_every;
            self.queue.push(at, Ev::Tick);
        }
    }

    /// Runs events up to `until` (or until none are left).
    pub fn run(&mut self, until: Micros) {
        while let Some((t, ev)) = self.queue.pop(until) {
            self.now = t;
            match ev {
                Ev::Msg { to, from, msg } => {
                    let i = to as usize;
                    let (ring, nodes) = (&self.ring, &self.nodes);
                    let acts = self.cores[i].handle(t, from, msg, &nodes[i].disk, &|key, k| {
                        placement(ring, nodes, key, k)
                    });
                    self.apply(i, acts);
                }
                Ev::Commit { node, token, ops } => {
                    let i = node as usize;
                    let ok = self.nodes[i].disk.apply(&ops).is_ok();
                    let acts = self.cores[i].persisted(t, token, ok, &self.nodes[i].disk);
                    self.apply(i, acts);
                }
                Ev::Tick => {
                    for i in 0..self.nodes.len() {
                        let (ring, nodes) = (&self.ring, &self.nodes);
                        let mut acts = self.cores[i].tick(t);
                        acts.extend(
                            self.cores[i].maintain(t, &nodes[i].disk, &|key, k| {
                                placement(ring, nodes, key, k)
                            }),
                        );
                        self.apply(i, acts);
                    }
                    if self.ticking {
                        let at = t + self.opts.tick_every;
                        self.queue.push(at, Ev::Tick);
                    }
                }
            }
        }
        if until != Micros::MAX {
            self.now = self.now.max(until);
        }
    }
}

fn placement(
    ring: &[(NodeId, u32)],
    nodes: &[StoreNode],
    key: NodeId,
    k: usize,
) -> Vec<NodeHandle> {
    let n = ring.len();
    if n == 0 || k == 0 {
        return Vec::new();
    }
    // Walk outwards from the key's position, closest first.
    let pos = ring.partition_point(|x| x.0 < key);
    let (mut r, mut l) = (pos, pos + n - 1);
    let mut out: Vec<NodeHandle> = Vec::with_capacity(k);
    let mut steps = 0;
    while out.len() < k && steps < n {
        let a = ring[r % n];
        let b = ring[l % n];
        let pick = if key.closer(a.0, b.0) {
            r += 1;
            a
        } else {
            l = l + n - 1;
            b
        };
        steps += 1;
        let h = NodeHandle {
            id: pick.0,
            addr: nodes[pick.1 as usize].addr,
        };
        if out.iter().all(|o| o.addr != h.addr) {
            out.push(h);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reach_k_replicas_and_reads_come_back() {
        let mut s = StoreSim::new(&StoreSimOpts {
            nodes: 30,
            ..StoreSimOpts::default()
        });
        s.start_ticks();
        let req = s.put(4, "app", "k", vec![7; 1000], 3);
        let t0 = s.now;
        s.run(t0 + 5_000 * MS);
        let (at, out) = s.result(req).expect("put finished");
        assert!(matches!(out, Outcome::Put(Ok(_))), "{out:?}");
        assert!(*at > t0);
        let key = NodeId::for_key("app", "k");
        let want: Vec<usize> = s
            .placement(key, 3)
            .iter()
            .filter_map(|h| s.index(&h.addr))
            .collect();
        let mut held = s.holders("app", "k");
        held.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(held, want_sorted);
        let g = s.get(9, "app", "k", 3);
        s.run(s.now + 2_000 * MS);
        match s.result(g) {
            Some((_, Outcome::Get(Ok(Some(v))))) => assert_eq!(v.value.len(), 1000),
            other => panic!("{other:?}"),
        }
        // Raising k adds copies by anti-entropy after a rewrite.
        let req = s.put(want[0], "app", "k", vec![8; 1000], 5);
        s.run(s.now + 10_000 * MS);
        assert!(matches!(s.result(req), Some((_, Outcome::Put(Ok(_))))));
        assert_eq!(s.holders("app", "k").len(), 5);
    }

    #[test]
    fn placement_is_closest_first_on_distinct_nodes() {
        let s = StoreSim::new(&StoreSimOpts {
            nodes: 20,
            vnodes: 3,
            ..StoreSimOpts::default()
        });
        let key = NodeId(12345 << 90);
        let p = s.placement(key, 5);
        assert_eq!(p.len(), 5);
        for w in p.windows(2) {
            assert!(!key.closer(w[1].id, w[0].id));
            assert_ne!(w[0].addr, w[1].addr);
        }
        let mut all: Vec<NodeId> = s.ring.iter().map(|x| x.0).collect();
        all.sort_by(|a, b| {
            if key.closer(*a, *b) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        assert_eq!(p[0].id, all[0]);
    }
}

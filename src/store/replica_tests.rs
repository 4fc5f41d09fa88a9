//! A tiny in-test network of Replicators over in-memory backends: message
//! delays, drops and duplicates, crashes that lose everything not yet
//! committed, joins and leaves. Every message crosses the wire encoding.

use super::entry::{Entry, Pos, Stamp, WriteOp};
use super::mem::MemBackend;
use super::replica::{
    Action, Backend, Outcome, RemoteError, ReplicaConfig, Replicator, StoreMsg, Value,
};
use crate::id::{Micros, NodeHandle, NodeId};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

const BUCKET: &str = "default";
const MS: Micros = 1000;

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8 + 1], 7000))
}

fn test_cfg() -> ReplicaConfig {
    ReplicaConfig {
        maintain_every: 1_000 * MS,
        scan_budget: 4,
        digest_batch: 3,
        push_bytes: 200,
        confirm_ttl: 5_000 * MS,
        ..ReplicaConfig::default()
    }
}

struct Node {
    vnodes: Vec<NodeId>,
    core: Replicator,
    disk: MemBackend,
    alive: bool,
    /// Ops handed to the writer, not yet committed: lost on a crash.
    writing: Vec<(Micros, u64, Vec<WriteOp>)>,
    /// Last stamp seen per key since it was last removed here.
    seen: HashMap<Pos, Stamp>,
}

struct Msg {
    at: Micros,
    seq: u64,
    from: NodeHandle,
    to: SocketAddr,
    bytes: Vec<u8>,
}

struct Net {
    nodes: Vec<Node>,
    /// Vnodes the overlay currently places keys on.
    view: Vec<NodeHandle>,
    queue: Vec<Msg>,
    seq: u64,
    now: Micros,
    rng: StdRng,
    drop_p: f64,
    dup_p: f64,
    max_delay: Micros,
    cfg: ReplicaConfig,
    next_req: u64,
    done: BTreeMap<u64, Outcome>,
    /// Per key: the highest version any acknowledged put got.
    acked: HashMap<String, u64>,
    reqs: HashMap<u64, String>,
    /// Bumped by every membership change or lost disk.
    epoch: u64,
    /// Per key: newest acknowledged version and the epoch it was seen in.
    last_ack: HashMap<String, (u64, u64)>,
    /// Per put: the newest version acknowledged before it was issued.
    floor: HashMap<u64, (u64, u64)>,
}

fn closest(view: &[NodeHandle], ring: NodeId, k: usize) -> Vec<NodeHandle> {
    let mut v = view.to_vec();
    v.sort_by(|a, b| {
        if ring.closer(a.id, b.id) {
            std::cmp::Ordering::Less
        } else if ring.closer(b.id, a.id) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    let mut out: Vec<NodeHandle> = Vec::new();
    for h in v {
        if !out.iter().any(|o| o.addr == h.addr) {
            out.push(h);
        }
        if out.len() == k {
            break;
        }
    }
    out
}

impl Net {
    fn new(seed: u64, n: usize, vnodes_per: usize, cfg: ReplicaConfig) -> Net {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut nodes = Vec::new();
        let mut view = Vec::new();
        for i in 0..n {
            let vnodes: Vec<NodeId> = (0..vnodes_per).map(|_| NodeId(rng.gen())).collect();
            for v in &vnodes {
                view.push(NodeHandle {
                    id: *v,
                    addr: addr(i),
                });
            }
            nodes.push(Node {
                vnodes,
                core: Replicator::new(addr(i), cfg.clone(), rng.gen()),
                disk: MemBackend::new(),
                alive: true,
                writing: Vec::new(),
                seen: HashMap::new(),
            });
        }
        Net {
            nodes,
            view,
            queue: Vec::new(),
            seq: 0,
            now: 1_700_000_000_000_000,
            rng,
            drop_p: 0.0,
            dup_p: 0.0,
            max_delay: 20 * MS,
            cfg,
            next_req: 1,
            done: BTreeMap::new(),
            acked: HashMap::new(),
            reqs: HashMap::new(),
            epoch: 0,
            last_ack: HashMap::new(),
            floor: HashMap::new(),
        }
    }

    fn handle_of(&self, i: usize) -> NodeHandle {
        NodeHandle {
            id: self.nodes[i].vnodes[0],
            addr: addr(i),
        }
    }

    fn index(&self, a: SocketAddr) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| addr(i) == a)
    }

    fn enqueue(&mut self, from: NodeHandle, to: SocketAddr, msg: &StoreMsg) {
        let bytes = msg.encode().expect("encodable");
        let copies = if self.rng.gen_bool(self.dup_p) { 2 } else { 1 };
        for _ in 0..copies {
            if self.rng.gen_bool(self.drop_p) {
                continue;
            }
            self.seq += 1;
            let at = self.now + self.rng.gen_range(0..=self.max_delay);
            self.queue.push(Msg {
                at,
                seq: self.seq,
                from,
                to,
                bytes: bytes.clone(),
            });
        }
    }

    fn run_actions(&mut self, i: usize, actions: Vec<Action>) {
        let me = self.handle_of(i);
        for a in actions {
            match a {
                Action::Send { to, msg } => self.enqueue(me, to.addr, &msg),
                Action::Route { key, msg } => {
                    if let Some(root) = closest(&self.view, key, 1).first() {
                        let to = root.addr;
                        self.enqueue(me, to, &msg);
                    }
                }
                Action::Persist { token, ops } => {
                    let at = self.now + self.rng.gen_range(0..=10 * MS);
                    self.nodes[i].writing.push((at, token, ops));
                }
                Action::Done { req, outcome } => {
                    if let (Outcome::Put(Ok(v)), Some(key)) = (&outcome, self.reqs.get(&req)) {
                        let e = self.acked.entry(key.clone()).or_insert(0);
                        *e = (*e).max(*v);
                        // A put issued after another was acknowledged gets a
                        // higher version (while the replica set stood still).
                        if let Some((floor, epoch)) = self.floor.remove(&req) {
                            if epoch == self.epoch {
                                assert!(
                                    *v > floor,
                                    "{key}: put acknowledged at v{v} below the earlier v{floor}"
                                );
                            }
                        }
                        let last = self.last_ack.entry(key.clone()).or_insert((0, self.epoch));
                        if last.1 != self.epoch || *v > last.0 {
                            *last = (*v, self.epoch);
                        }
                    }
                    self.done.insert(req, outcome);
                }
            }
        }
    }

    /// Advances virtual time by `dt` in 10 ms steps.
    fn run(&mut self, dt: Micros) {
        let end = self.now + dt;
        while self.now < end {
            self.now += 10 * MS;
            self.step();
        }
    }

    fn step(&mut self) {
        let now = self.now;
        // commits
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                continue;
            }
            let due: Vec<_> = {
                let w = &mut self.nodes[i].writing;
                let (due, rest): (Vec<_>, Vec<_>) = w.drain(..).partition(|(at, _, _)| *at <= now);
                *w = rest;
                due
            };
            for (_, token, ops) in due {
                self.commit(i, &ops);
                let n = &mut self.nodes[i];
                let acts = n.core.persisted(now, token, true, &n.disk);
                self.run_actions(i, acts);
            }
        }
        // messages
        self.queue.sort_by_key(|m| (m.at, m.seq));
        let split = self.queue.partition_point(|m| m.at <= now);
        let due: Vec<Msg> = self.queue.drain(..split).collect();
        for m in due {
            let Some(i) = self.index(m.to) else { continue };
            if !self.nodes[i].alive {
                continue;
            }
            let msg = StoreMsg::decode(&m.bytes).expect("valid on the wire");
            let view = self.view.clone();
            let place = |ring: NodeId, k: usize| closest(&view, ring, k);
            let n = &mut self.nodes[i];
            let acts = n.core.handle(now, m.from, msg, &n.disk, &place);
            self.run_actions(i, acts);
        }
        // timers and maintenance
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                continue;
            }
            let view = self.view.clone();
            let place = |ring: NodeId, k: usize| closest(&view, ring, k);
            let n = &mut self.nodes[i];
            let mut acts = n.core.tick(now);
            acts.extend(n.core.maintain(now, &n.disk, &place));
            self.run_actions(i, acts);
        }
    }

    fn commit(&mut self, i: usize, ops: &[WriteOp]) {
        let n = &mut self.nodes[i];
        n.disk.apply(ops).expect("valid ops");
        for op in ops {
            let pos = Pos::new(op.bucket(), op.key());
            match n.disk.meta(op.bucket(), op.key()).unwrap() {
                Some(m) => {
                    if let Some(prev) = n.seen.get(&pos) {
                        assert!(
                            m.stamp() >= *prev,
                            "node {i} moved {pos:?} back from {prev:?} to {:?}",
                            m.stamp()
                        );
                    }
                    n.seen.insert(pos, m.stamp());
                }
                None => {
                    n.seen.remove(&pos);
                }
            }
        }
    }

    fn put(&mut self, i: usize, key: &str, value: Option<Vec<u8>>) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        self.reqs.insert(req, key.to_string());
        if let Some(&(v, epoch)) = self.last_ack.get(key) {
            if epoch == self.epoch {
                self.floor.insert(req, (v, epoch));
            }
        }
        let now = self.now;
        let acts = self.nodes[i]
            .core
            .put(now, req, BUCKET, key, value, 3)
            .unwrap();
        self.run_actions(i, acts);
        req
    }

    fn get(&mut self, i: usize, key: &str) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        let now = self.now;
        let acts = self.nodes[i].core.get(now, req, BUCKET, key, 3).unwrap();
        self.run_actions(i, acts);
        req
    }

    fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.alive = false;
        n.writing.clear();
    }

    fn restart(&mut self, i: usize) {
        let seed = self.rng.gen();
        let n = &mut self.nodes[i];
        if !n.alive {
            n.alive = true;
            n.core = Replicator::new(addr(i), self.cfg.clone(), seed);
        }
    }

    fn membership_changed(&mut self) {
        self.epoch += 1;
        for n in &mut self.nodes {
            n.core.membership_changed();
        }
    }

    fn leave(&mut self, i: usize) {
        let a = addr(i);
        self.view.retain(|h| h.addr != a);
        self.membership_changed();
    }

    fn join(&mut self, i: usize) {
        let a = addr(i);
        if !self.view.iter().any(|h| h.addr == a) {
            for v in self.nodes[i].vnodes.clone() {
                self.view.push(NodeHandle { id: v, addr: a });
            }
        }
        self.membership_changed();
    }

    fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let seed = self.rng.gen();
        self.nodes.push(Node {
            vnodes: vec![NodeId(self.rng.gen())],
            core: Replicator::new(addr(i), self.cfg.clone(), seed),
            disk: MemBackend::new(),
            alive: true,
            writing: Vec::new(),
            seen: HashMap::new(),
        });
        i
    }

    fn outcome(&self, req: u64) -> Option<&Outcome> {
        self.done.get(&req)
    }

    /// Heals the network and lets anti-entropy and hand-off settle.
    fn settle(&mut self) {
        self.drop_p = 0.0;
        self.dup_p = 0.0;
        for i in 0..self.nodes.len() {
            self.restart(i);
        }
        self.membership_changed();
        self.run(30_000 * MS);
    }

    /// Every key held anywhere sits, at its newest stamp, on each member
    /// of its replica set and nowhere else.
    fn check_placement(&self) {
        let mut newest: HashMap<Pos, Entry> = HashMap::new();
        for n in &self.nodes {
            for (p, e) in n.disk.iter() {
                let best = newest.entry(p.clone()).or_insert_with(|| e.clone());
                if e.stamp() > best.stamp() {
                    *best = e.clone();
                }
            }
        }
        for (pos, e) in &newest {
            let set = closest(&self.view, pos.ring, e.k as usize);
            for (i, n) in self.nodes.iter().enumerate() {
                let held = n.disk.get(&pos.bucket, &pos.key).unwrap();
                if set.iter().any(|h| h.addr == addr(i)) {
                    assert_eq!(
                        held.as_ref().map(Entry::stamp),
                        Some(e.stamp()),
                        "member {i} of {pos:?}'s set lacks the newest copy"
                    );
                } else {
                    assert!(
                        held.is_none(),
                        "node {i} outside {pos:?}'s set still holds it"
                    );
                }
            }
        }
    }
}

fn put_version(o: Option<&Outcome>) -> Option<u64> {
    match o {
        Some(Outcome::Put(Ok(v))) => Some(*v),
        _ => None,
    }
}

fn got(o: Option<&Outcome>) -> Option<&Result<Option<Value>, RemoteError>> {
    match o {
        Some(Outcome::Get(r)) => Some(r),
        _ => None,
    }
}

#[test]
fn put_then_get_through_the_root() {
    let mut net = Net::new(1, 5, 1, test_cfg());
    let a = net.put(0, "a", Some(b"one".to_vec()));
    net.run(200 * MS);
    assert_eq!(put_version(net.outcome(a)), Some(1));
    let b = net.put(3, "a", Some(b"two".to_vec()));
    net.run(200 * MS);
    assert_eq!(put_version(net.outcome(b)), Some(2));
    let g = net.get(4, "a");
    net.run(200 * MS);
    assert_eq!(
        got(net.outcome(g)),
        Some(&Ok(Some(Value {
            version: 2,
            value: b"two".to_vec()
        })))
    );
    // written on a majority at least, and on all three after resends
    net.run(1000 * MS);
    let holders = net
        .nodes
        .iter()
        .filter(|n| {
            n.disk
                .get(BUCKET, "a")
                .unwrap()
                .is_some_and(|e| e.version == 2)
        })
        .count();
    assert_eq!(holders, 3);
    let d = net.put(1, "a", None);
    net.run(200 * MS);
    assert_eq!(put_version(net.outcome(d)), Some(3));
    let g = net.get(2, "a");
    net.run(200 * MS);
    assert_eq!(got(net.outcome(g)), Some(&Ok(None)), "deleted");
}

#[test]
fn put_without_majority_times_out_naming_the_count() {
    let mut net = Net::new(2, 3, 1, test_cfg());
    let set = closest(&net.view, NodeId::for_key(BUCKET, "k"), 3);
    // the two other replicas are down
    for h in &set[1..] {
        let i = net.index(h.addr).unwrap();
        net.crash(i);
    }
    let root = net.index(set[0].addr).unwrap();
    let r = net.put(root, "k", Some(b"v".to_vec()));
    net.run(2_500 * MS);
    match net.outcome(r) {
        Some(Outcome::Put(Err(e @ RemoteError::Timeout { .. }))) => {
            assert_eq!(
                e,
                &RemoteError::Timeout {
                    committed: 1,
                    needed: 2,
                    replicas: 3
                }
            );
            assert!(e.to_string().contains("1 of 3 replicas committed"));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn lone_node_and_two_nodes_use_majority_of_what_exists() {
    let mut net = Net::new(3, 1, 1, test_cfg());
    let r = net.put(0, "k", Some(b"v".to_vec()));
    net.run(100 * MS);
    assert_eq!(put_version(net.outcome(r)), Some(1));

    let mut net = Net::new(4, 2, 1, test_cfg());
    net.crash(1);
    let set = closest(&net.view, NodeId::for_key(BUCKET, "k"), 3);
    assert_eq!(set.len(), 2);
    let r = net.put(0, "k", Some(b"v".to_vec()));
    net.run(2_500 * MS);
    // of two replicas both must commit: one alone is not a majority
    assert!(matches!(
        net.outcome(r),
        Some(Outcome::Put(Err(RemoteError::Timeout { .. })))
            | Some(Outcome::Put(Err(RemoteError::NoAnswer)))
    ));
}

#[test]
fn a_root_that_lags_writes_above_the_newest_copy() {
    let mut net = Net::new(5, 4, 1, test_cfg());
    let r = net.put(0, "k", Some(b"v1".to_vec()));
    net.run(300 * MS);
    let r2 = net.put(0, "k", Some(b"v2".to_vec()));
    net.run(300 * MS);
    assert_eq!(put_version(net.outcome(r)), Some(1));
    assert_eq!(put_version(net.outcome(r2)), Some(2));
    // the root restarts without its copy (as if it had just joined and
    // hand-off had not reached it yet)
    let root = closest(&net.view, NodeId::for_key(BUCKET, "k"), 1)[0];
    let ri = net.index(root.addr).unwrap();
    net.crash(ri);
    net.nodes[ri].disk = MemBackend::new();
    net.nodes[ri].seen.clear();
    net.restart(ri);
    let r3 = net.put(1, "k", Some(b"v3".to_vec()));
    net.run(500 * MS);
    assert_eq!(put_version(net.outcome(r3)), Some(3), "bumped above v2");
    net.nodes[ri].disk = MemBackend::new();
    net.nodes[ri].seen.clear();
    // a read at an empty root fetches from the others and repairs itself
    let g = net.get(2, "k");
    net.run(300 * MS);
    assert_eq!(
        got(net.outcome(g)),
        Some(&Ok(Some(Value {
            version: 3,
            value: b"v3".to_vec()
        })))
    );
    assert_eq!(
        net.nodes[ri]
            .disk
            .get(BUCKET, "k")
            .unwrap()
            .unwrap()
            .version,
        3
    );
    assert_eq!(net.nodes[ri].core.stats().read_repairs, 1);
}

#[test]
fn requester_falls_back_to_the_replicas_when_the_root_is_silent() {
    let mut net = Net::new(6, 5, 1, test_cfg());
    let r = net.put(0, "k", Some(b"v".to_vec()));
    net.run(1_000 * MS);
    assert_eq!(put_version(net.outcome(r)), Some(1));
    let set = closest(&net.view, NodeId::for_key(BUCKET, "k"), 3);
    let root = net.index(set[0].addr).unwrap();
    net.crash(root);
    let asker = (0..5)
        .find(|i| !set.iter().any(|h| h.addr == addr(*i)))
        .unwrap();
    let g = net.get(asker, "k");
    net.run(3_500 * MS);
    assert_eq!(got(net.outcome(g)), Some(&Err(RemoteError::NoAnswer)));
    let now = net.now;
    let acts = net.nodes[asker]
        .core
        .get_from(now, 999, BUCKET, "k", &set)
        .unwrap();
    assert_eq!(acts.len(), 3, "one fetch per replica");
    net.run_actions(asker, acts);
    net.run(1_500 * MS);
    assert_eq!(
        got(net.outcome(999)),
        Some(&Ok(Some(Value {
            version: 1,
            value: b"v".to_vec()
        })))
    );
}

#[test]
fn a_duplicated_put_is_answered_not_redone() {
    let mut net = Net::new(7, 3, 1, test_cfg());
    let root = closest(&net.view, NodeId::for_key(BUCKET, "k"), 1)[0];
    let ri = net.index(root.addr).unwrap();
    let from = net.handle_of((ri + 1) % 3);
    let msg = StoreMsg::Put {
        req: 77,
        bucket: BUCKET.into(),
        key: "k".into(),
        value: Some(b"v".to_vec()),
        k: 3,
    };
    net.enqueue(from, root.addr, &msg);
    net.run(300 * MS);
    let later = StoreMsg::Put {
        req: 78,
        bucket: BUCKET.into(),
        key: "k".into(),
        value: Some(b"w".to_vec()),
        k: 3,
    };
    net.enqueue(from, root.addr, &later);
    net.run(300 * MS);
    // the first request arrives again, late
    net.enqueue(from, root.addr, &msg);
    net.run(300 * MS);
    let e = net.nodes[ri].disk.get(BUCKET, "k").unwrap().unwrap();
    assert_eq!((e.version, e.value.as_slice()), (2, &b"w"[..]));
}

#[test]
fn hand_off_moves_keys_and_only_then_deletes() {
    let mut net = Net::new(8, 4, 2, test_cfg());
    let mut reqs = Vec::new();
    for i in 0..20 {
        reqs.push(net.put(i % 4, &format!("k{i}"), Some(vec![i as u8; 10])));
    }
    net.run(2_000 * MS);
    assert!(reqs.iter().all(|r| put_version(net.outcome(*r)).is_some()));
    net.check_placement();
    let newcomer = net.add_node();
    net.join(newcomer);
    net.leave(0);
    net.run(20_000 * MS);
    net.check_placement();
    assert!(
        net.nodes[0].disk.is_empty(),
        "the leaver handed everything off"
    );
    assert!(net.nodes[0].core.stats().handed_off > 0);
    assert!(
        !net.nodes[newcomer].disk.is_empty(),
        "the newcomer got its share"
    );
    for i in 0..20 {
        let g = net.get(1, &format!("k{i}"));
        net.run(200 * MS);
        assert_eq!(
            got(net.outcome(g)),
            Some(&Ok(Some(Value {
                version: 1,
                value: vec![i as u8; 10]
            })))
        );
    }
}

#[test]
fn hand_off_waits_for_every_member() {
    let mut net = Net::new(9, 4, 1, test_cfg());
    for i in 0..10 {
        net.put(0, &format!("k{i}"), Some(b"v".to_vec()));
    }
    net.run(2_000 * MS);
    // node 0 leaves while some new members are down: it must keep the
    // keys whose set has a silent member
    net.leave(0);
    net.crash(1);
    net.run(10_000 * MS);
    for (p, _) in net.nodes[0].disk.iter() {
        let set = closest(&net.view, p.ring, 3);
        assert!(
            set.iter().any(|h| h.addr == addr(1)),
            "{p:?} kept for no reason"
        );
    }
    let kept: Vec<Pos> = net.nodes[0].disk.iter().map(|(p, _)| p.clone()).collect();
    assert!(!kept.is_empty(), "node 1 is in every 3-set of 3 nodes");
    net.restart(1);
    net.membership_changed();
    net.run(10_000 * MS);
    assert!(net.nodes[0].disk.is_empty());
    net.check_placement();
}

#[test]
fn old_tombstones_are_collected_everywhere() {
    let cfg = ReplicaConfig {
        tombstone_gc_age_ms: 5_000,
        ..test_cfg()
    };
    let mut net = Net::new(10, 4, 1, cfg);
    net.put(0, "gone", Some(b"v".to_vec()));
    net.put(0, "stays", Some(b"v".to_vec()));
    net.run(500 * MS);
    net.put(1, "gone", None);
    net.run(2_000 * MS);
    let holders = |net: &Net| {
        net.nodes
            .iter()
            .filter(|n| n.disk.get(BUCKET, "gone").unwrap().is_some())
            .count()
    };
    assert_eq!(holders(&net), 3, "the tombstone is replicated first");
    net.run(10_000 * MS);
    assert_eq!(holders(&net), 0, "then collected");
    let stays = net
        .nodes
        .iter()
        .filter(|n| n.disk.get(BUCKET, "stays").unwrap().is_some())
        .count();
    assert_eq!(stays, 3);
    let collected: u64 = net
        .nodes
        .iter()
        .map(|n| n.core.stats().tombstones_collected)
        .sum();
    assert_eq!(collected, 3);
}

#[test]
fn wire_decode_enforces_bounds() {
    let ok = StoreMsg::Get {
        req: 1,
        bucket: BUCKET.into(),
        key: "k".into(),
        k: 3,
    };
    assert_eq!(StoreMsg::decode(&ok.encode().unwrap()), Ok(ok));
    let bad = StoreMsg::Get {
        req: 1,
        bucket: "no/slash".into(),
        key: "k".into(),
        k: 3,
    };
    assert!(StoreMsg::decode(&bad.encode().unwrap()).is_err());
    let too_many = StoreMsg::Pull {
        items: vec![
            super::replica::KeyRef {
                bucket: BUCKET.into(),
                key: "k".into()
            };
            super::replica::MAX_ITEMS + 1
        ],
    };
    let e = StoreMsg::decode(&too_many.encode().unwrap()).unwrap_err();
    assert!(e.to_string().contains("items"), "{e}");
    assert!(StoreMsg::decode(&[0xff; 16]).is_err());
    assert!(StoreMsg::decode(&vec![0; super::replica::MAX_MSG + 1]).is_err());
    // a hostile length prefix does not allocate what it claims
    assert!(StoreMsg::decode(&[10, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
}

#[test]
fn invalid_requests_get_a_clear_answer() {
    let mut core = Replicator::new(addr(0), test_cfg(), 1);
    let disk = MemBackend::new();
    let me = NodeHandle {
        id: NodeId(5),
        addr: addr(0),
    };
    let place = |_: NodeId, _: usize| vec![me];
    let acts = core.handle(
        0,
        me,
        StoreMsg::Put {
            req: 9,
            bucket: BUCKET.into(),
            key: "k".repeat(2000),
            value: None,
            k: 3,
        },
        &disk,
        &place,
    );
    match acts.as_slice() {
        [Action::Send {
            msg:
                StoreMsg::PutReply {
                    req: 9,
                    result: Err(RemoteError::Invalid(m)),
                },
            ..
        }] => assert!(m.contains("too long"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(core.put(0, 1, BUCKET, "", None, 3).is_err());
    assert!(core.put(0, 1, BUCKET, "k", None, 0).is_err());
}

#[derive(Clone, Debug)]
enum Op {
    Put {
        node: usize,
        key: u8,
        val: u8,
    },
    Delete {
        node: usize,
        key: u8,
    },
    Get {
        node: usize,
        key: u8,
    },
    Crash(usize),
    Restart(usize),
    Leave(usize),
    Join(usize),
    AddNode,
    /// Crash and lose the disk too (at most once per run).
    Wipe(usize),
    Wait(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..8usize, 0..6u8, any::<u8>()).prop_map(|(node, key, val)| Op::Put { node, key, val }),
        1 => (0..8usize, 0..6u8).prop_map(|(node, key)| Op::Delete { node, key }),
        2 => (0..8usize, 0..6u8).prop_map(|(node, key)| Op::Get { node, key }),
        1 => (0..8usize).prop_map(Op::Crash),
        1 => (0..8usize).prop_map(Op::Restart),
        1 => (0..8usize).prop_map(Op::Leave),
        1 => (0..8usize).prop_map(Op::Join),
        1 => Just(Op::AddNode),
        1 => (0..8usize).prop_map(Op::Wipe),
        3 => (10..1500u16).prop_map(Op::Wait),
    ]
}

fn chaos(
    seed: u64,
    n: usize,
    vnodes: usize,
    drop_pct: u32,
    dup_pct: u32,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let mut net = Net::new(seed, n, vnodes, test_cfg());
    net.drop_p = drop_pct as f64 / 100.0;
    net.dup_p = dup_pct as f64 / 100.0;
    net.max_delay = 50 * MS;
    let mut wiped = false;
    for op in ops {
        let count = net.nodes.len();
        match op {
            Op::Put { node, key, val } => {
                let i = node % count;
                if net.nodes[i].alive {
                    net.put(
                        i,
                        &format!("k{key}"),
                        Some(vec![val; 1 + val as usize % 40]),
                    );
                }
            }
            Op::Delete { node, key } => {
                let i = node % count;
                if net.nodes[i].alive {
                    net.put(i, &format!("k{key}"), None);
                }
            }
            Op::Get { node, key } => {
                let i = node % count;
                if net.nodes[i].alive {
                    net.get(i, &format!("k{key}"));
                }
            }
            Op::Crash(i) => {
                // keep a majority of the nodes up
                let up = net.nodes.iter().filter(|n| n.alive).count();
                if up * 2 > count + 2 {
                    net.crash(i % count);
                }
            }
            Op::Restart(i) => net.restart(i % count),
            Op::Leave(i) => {
                let members = net
                    .view
                    .iter()
                    .map(|h| h.addr)
                    .collect::<std::collections::HashSet<_>>()
                    .len();
                if members > 3 {
                    net.leave(i % count);
                }
            }
            Op::Join(i) => net.join(i % count),
            Op::AddNode => {
                if count < 8 {
                    let i = net.add_node();
                    net.join(i);
                }
            }
            Op::Wipe(i) => {
                if !wiped {
                    wiped = true;
                    let i = i % count;
                    net.crash(i);
                    net.nodes[i].disk = MemBackend::new();
                    net.nodes[i].seen.clear();
                    net.restart(i);
                    net.membership_changed();
                }
            }
            Op::Wait(ms) => net.run(ms as u64 * MS),
        }
        net.run(10 * MS);
    }
    net.settle();
    net.check_placement();
    let acked = net.acked.clone();
    let mut keys: Vec<_> = acked.keys().cloned().collect();
    keys.sort();
    for key in keys {
        let reader = (0..net.nodes.len()).find(|i| net.nodes[*i].alive).unwrap();
        let g = net.get(reader, &key);
        net.run(500 * MS);
        let newest = net
            .nodes
            .iter()
            .filter_map(|n| n.disk.get(BUCKET, &key).unwrap())
            .max_by_key(|e| e.stamp());
        let Some(newest) = newest else {
            prop_assert!(false, "{key}: acked v{} but no copy is left", acked[&key]);
            unreachable!()
        };
        prop_assert!(
            newest.version >= acked[&key],
            "{key}: acked v{} but newest stored is {newest:?}",
            acked[&key]
        );
        match got(net.outcome(g)) {
            Some(Ok(Some(v))) => prop_assert_eq!(v.version, newest.version),
            // a later delete wins
            Some(Ok(None)) => prop_assert!(
                newest.deleted,
                "{key}: read None, newest {newest:?}, copies {:?}",
                net.nodes
                    .iter()
                    .map(|n| n.disk.get(BUCKET, &key).unwrap())
                    .collect::<Vec<_>>()
            ),
            other => prop_assert!(false, "read of {key} failed after healing: {other:?}"),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Under delays, drops, duplicates, crashes (one with a lost disk),
    /// joins and leaves: every acknowledged put stays readable at its
    /// version or newer, no node moves a key backwards, and once the
    /// network heals every key sits on exactly its replica set.
    #[test]
    fn acknowledged_writes_survive_chaos(
        seed in any::<u64>(),
        n in 3usize..6,
        vnodes in 1usize..3,
        drop_pct in 0u32..20,
        dup_pct in 0u32..20,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        chaos(seed, n, vnodes, drop_pct, dup_pct, ops)?;
    }
}

#[test]
fn chaos_case_1() {
    use Op::*;
    let ops = vec![
        Leave(5),
        Delete { node: 0, key: 4 },
        Delete { node: 0, key: 5 },
        Put {
            node: 0,
            key: 0,
            val: 0,
        },
        Put {
            node: 0,
            key: 2,
            val: 0,
        },
        Wipe(7),
        Crash(4),
        Put {
            node: 0,
            key: 2,
            val: 0,
        },
        Put {
            node: 0,
            key: 5,
            val: 0,
        },
        Put {
            node: 0,
            key: 4,
            val: 15,
        },
        Wait(104),
        Put {
            node: 2,
            key: 2,
            val: 188,
        },
        Put {
            node: 1,
            key: 1,
            val: 127,
        },
        Delete { node: 5, key: 1 },
        Put {
            node: 1,
            key: 4,
            val: 39,
        },
        Leave(7),
    ];
    chaos(14820448478472456348, 5, 2, 0, 0, ops).unwrap();
}

#[test]
fn pushes_of_big_values_fit_the_wire_bound() {
    let cfg = ReplicaConfig {
        push_bytes: usize::MAX,
        ..ReplicaConfig::default()
    };
    let mut core = Replicator::new(addr(0), cfg, 1);
    let mut disk = MemBackend::new();
    let big = super::entry::MAX_VALUE;
    let mut want = Vec::new();
    let mut ops = Vec::new();
    for (i, len) in [big, big - 10, 1000, big, 5].iter().enumerate() {
        let key = format!("{}{i}", "k".repeat(1000));
        ops.push(WriteOp::Put {
            bucket: BUCKET.into(),
            key: key.clone(),
            entry: Entry {
                version: 1,
                origin: NodeId(1),
                write_id: 1,
                deleted: false,
                k: 3,
                written_at_ms: 0,
                value: vec![1; *len],
            },
        });
        want.push(super::replica::KeyRef {
            bucket: BUCKET.into(),
            key,
        });
    }
    disk.apply(&ops).unwrap();
    let peer = NodeHandle {
        id: NodeId(9),
        addr: addr(1),
    };
    let place = |_: NodeId, _: usize| Vec::new();
    let acts = core.handle(
        0,
        peer,
        StoreMsg::DigestReply {
            want,
            have: Vec::new(),
        },
        &disk,
        &place,
    );
    let mut pushed = 0;
    for a in acts {
        let Action::Send {
            msg: msg @ StoreMsg::Push { .. },
            ..
        } = a
        else {
            panic!("unexpected {a:?}")
        };
        let bytes = msg.encode().unwrap();
        assert!(
            bytes.len() <= super::replica::MAX_MSG,
            "{} bytes",
            bytes.len()
        );
        let StoreMsg::Push { items } = StoreMsg::decode(&bytes).unwrap() else {
            unreachable!()
        };
        pushed += items.len();
    }
    assert_eq!(pushed, 5);
}

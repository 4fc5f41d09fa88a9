use super::table::{LeafEntry, LeafSet, Offer, RoutingTable, Side, NO_PROBE, UNKNOWN_RTT};
use super::*;
use crate::id::{Micros, NodeHandle, NodeId};
use proptest::prelude::*;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;

const MS: Micros = 1_000;
const SEC: Micros = 1_000_000;

fn h(id: u128) -> NodeHandle {
    let a = (id as u32) ^ ((id >> 96) as u32);
    NodeHandle {
        id: NodeId(id),
        addr: SocketAddr::from(([10, (a >> 16) as u8, (a >> 8) as u8, a as u8], 7000)),
    }
}

fn leaf_entry(id: u128) -> LeafEntry {
    LeafEntry {
        h: h(id),
        rtt: UNKNOWN_RTT,
        last_heard: 0,
        probe_sent: NO_PROBE,
        probes: 0,
    }
}

/// True root of `key` among `ids`.
fn root_of(ids: &[NodeId], key: NodeId) -> NodeId {
    let mut best = ids[0];
    for &i in ids {
        if key.closer(i, best) {
            best = i;
        }
    }
    best
}

/// A joined Pastry instance that has heard from each of `others` directly.
fn node_knowing(me: u128, others: &[u128]) -> Pastry {
    let mut p = Pastry::new(h(me), Config::default());
    p.bootstrap_alone();
    for &o in others {
        let stamp = Stamp { sent: 0, tag: 0 };
        p.handle(0, h(o), Msg::Probe { stamp });
    }
    p
}

// ---------------------------------------------------------------- tables

#[test]
fn routing_table_places_by_prefix_and_digit() {
    let me = NodeId(0x1234_0000_0000_0000_0000_0000_0000_0000);
    let mut rt = RoutingTable::new(me, 2);
    assert_eq!(rt.place(me), None);
    assert_eq!(rt.offer(h(me.0), None, true), Offer::Rejected);
    let a = h(0x5000_0000_0000_0000_0000_0000_0000_0001);
    let b = h(0x1240_0000_0000_0000_0000_0000_0000_0001);
    let c = h(0x1234_5000_0000_0000_0000_0000_0000_0000);
    assert_eq!(rt.place(a.id), Some((0, 5)));
    assert_eq!(rt.place(b.id), Some((2, 4)));
    assert_eq!(rt.place(c.id), Some((4, 5)));
    assert_eq!(rt.offer(b, None, false), Offer::Inserted);
    // Rows are allocated up to the highest used one only.
    assert_eq!(rt.rows(), 3);
    assert_eq!(rt.fill(), vec![0, 0, 1]);
    assert_eq!(rt.offer(a, Some(50), false), Offer::Inserted);
    assert_eq!(rt.offer(c, None, false), Offer::Inserted);
    assert_eq!(rt.fill(), vec![1, 0, 1, 0, 1]);
    assert_eq!(rt.offer(a, Some(40), false), Offer::Present);
    assert_eq!(rt.get(a.id).map(|e| e.rtt), Some(40));
    assert_eq!(rt.slot(0, 5).count(), 1);
    assert_eq!(rt.remove(c.id), Some((4, 5)));
    assert_eq!(rt.rows(), 3, "trailing empty rows are freed");
}

#[test]
fn routing_slot_keeps_lowest_rtt_candidates() {
    let me = NodeId(0);
    let mut rt = RoutingTable::new(me, 2);
    let ids = [
        0x7000_0000_0000_0000_0000_0000_0000_0001u128,
        0x7100_0000_0000_0000_0000_0000_0000_0000,
        0x7f00_0000_0000_0000_0000_0000_0000_0000,
        0x7800_0000_0000_0000_0000_0000_0000_0000,
    ];
    assert_eq!(rt.offer(h(ids[0]), Some(900), false), Offer::Inserted);
    assert_eq!(rt.offer(h(ids[1]), None, false), Offer::Inserted);
    // Full: a slower candidate is refused, a faster one evicts the slowest
    // (the unmeasured entry counts as slowest).
    assert_eq!(
        rt.offer(h(ids[2]), Some(5000), false),
        Offer::Replaced(h(ids[1]))
    );
    assert_eq!(rt.offer(h(ids[3]), Some(6000), false), Offer::Full);
    assert_eq!(
        rt.offer(h(ids[3]), Some(300), false),
        Offer::Replaced(h(ids[2]))
    );
    let mut kept: Vec<u128> = rt.slot(0, 7).map(|e| e.h.id.0).collect();
    kept.sort();
    assert_eq!(kept, vec![ids[0], ids[3]]);
    // Per-key choice inside the slot: the numerically closer entry.
    let key = NodeId(0x7e00_0000_0000_0000_0000_0000_0000_0000);
    assert_eq!(rt.best_for(key, 0, None).map(|x| x.id.0), Some(ids[3]));
    let key = NodeId(0x7100_0000_0000_0000_0000_0000_0000_0000);
    assert_eq!(rt.best_for(key, 0, None).map(|x| x.id.0), Some(ids[0]));
    assert_eq!(
        rt.best_for(key, 0, Some(NodeId(ids[0]))).map(|x| x.id.0),
        Some(ids[3])
    );
}

#[test]
fn second_hand_address_does_not_override_direct() {
    let mut rt = RoutingTable::new(NodeId(0), 2);
    let a = h(0x9000 << 112);
    rt.offer(a, None, true);
    let mut forged = a;
    forged.addr = "192.0.2.1:1".parse().unwrap();
    rt.offer(forged, None, false);
    assert_eq!(rt.get(a.id).map(|e| e.h.addr), Some(a.addr));
    rt.offer(forged, None, true);
    assert_eq!(rt.get(a.id).map(|e| e.h.addr), Some(forged.addr));
}

#[test]
fn leaf_set_orders_sides_and_wraps_around_zero() {
    let me = u128::MAX - 10;
    let mut ls = LeafSet::new(NodeId(me), 4);
    for id in [
        u128::MAX - 20,
        u128::MAX - 30,
        5,
        1,
        u128::MAX - 5,
        100,
        u128::MAX - 40,
    ] {
        ls.insert(leaf_entry(id), false);
    }
    let ids = |ls: &LeafSet, s: Side| ls.side(s).iter().map(|e| e.h.id.0).collect::<Vec<_>>();
    assert_eq!(ids(&ls, Side::Left), vec![u128::MAX - 20, u128::MAX - 30]);
    assert_eq!(ids(&ls, Side::Right), vec![u128::MAX - 5, 1]);
    let ring: Vec<u128> = ls.ring_order().iter().map(|x| x.id.0).collect();
    assert_eq!(ring, vec![u128::MAX - 30, u128::MAX - 20, u128::MAX - 5, 1]);
    assert!(!ls.covers_ring());
    assert!(ls.in_range(NodeId(0)), "range crosses zero");
    assert!(ls.in_range(NodeId(u128::MAX - 25)));
    assert!(!ls.in_range(NodeId(3)));
    assert!(!ls.in_range(NodeId(u128::MAX - 35)));
    // A closer node evicts the farthest on its side.
    assert!(ls.insert(leaf_entry(0), false));
    assert_eq!(ids(&ls, Side::Right), vec![u128::MAX - 5, 0]);
    assert!(!ls.insert(leaf_entry(1000), false), "too far on both sides");
    assert_eq!(ls.remove(NodeId(0)), (false, true));
    assert_eq!(ids(&ls, Side::Right), vec![u128::MAX - 5]);
    assert!(ls.covers_ring(), "a side that is not full covers the ring");
}

#[test]
fn small_ring_puts_nodes_on_both_sides() {
    let mut ls = LeafSet::new(NodeId(1000), 8);
    for id in [10, 2000, 1 << 100] {
        ls.insert(leaf_entry(id), false);
    }
    assert_eq!(ls.side(Side::Left).len(), 3);
    assert_eq!(ls.side(Side::Right).len(), 3);
    assert_eq!(ls.len(), 3);
    assert_eq!(ls.ring_order().len(), 3);
    assert!(ls.covers_ring());
}

// ---------------------------------------------------------------- wire

#[test]
fn wire_roundtrip_and_bounds() {
    let m = Msg::Route {
        key: NodeId(42),
        origin: h(7),
        hops: 3,
        payload: Payload::new(vec![1, 2, 3]).unwrap(),
    };
    assert_eq!(Msg::decode(&m.encode().unwrap()).unwrap(), m);
    let m = Msg::JoinReply {
        expected: 2,
        leaf_set: LeafList::truncating((0..30).map(h)),
        entries: JoinList::truncating((100..140).map(h)),
    };
    assert_eq!(Msg::decode(&m.encode().unwrap()).unwrap(), m);

    // A leaf set one longer than the cap, encoded by hand, is refused.
    let too_many: Vec<NodeHandle> = (0..=MAX_LEAF_SET as u128).map(h).collect();
    let variant = 8u8; // LeafSetReply's index in Msg
    let mut bytes = vec![variant];
    bytes.extend(postcard::to_allocvec(&too_many).unwrap());
    assert!(matches!(
        Msg::LeafSetReply {
            leaf_set: LeafList::new()
        }
        .encode()
        .unwrap()[0],
        8
    ));
    assert!(Msg::decode(&bytes).is_err());
    let ok: Vec<NodeHandle> = (0..MAX_LEAF_SET as u128).map(h).collect();
    let mut bytes = vec![variant];
    bytes.extend(postcard::to_allocvec(&ok).unwrap());
    assert!(Msg::decode(&bytes).is_ok());

    // A huge length prefix is refused before any allocation.
    let mut bytes = vec![variant];
    bytes.extend(postcard::to_allocvec(&u32::MAX).unwrap());
    assert!(Msg::decode(&bytes).is_err());

    assert!(Payload::new(vec![0; MAX_PAYLOAD + 1]).is_none());
    assert!(Msg::decode(&vec![0; MAX_FRAME + 1]).is_err());
    let mut trailing = Msg::LeafSetRequest.encode().unwrap();
    trailing.push(0);
    assert!(matches!(
        Msg::decode(&trailing),
        Err(WireError::Trailing(1))
    ));
}

// ---------------------------------------------------------------- routing properties

fn ids_strategy() -> impl Strategy<Value = (u128, Vec<u128>)> {
    (any::<u128>(), prop::collection::vec(any::<u128>(), 1..300))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn next_hop_always_improves((me, others) in ids_strategy(), keys in prop::collection::vec(any::<u128>(), 1..50)) {
        let p = node_knowing(me, &others);
        let me = NodeId(me);
        for k in keys.into_iter().chain(others.iter().map(|o| o ^ 1)) {
            let key = NodeId(k);
            if let Some(n) = p.next_hop(key) {
                prop_assert_ne!(n.id, me);
                let longer = n.id.shared_prefix(key) > me.shared_prefix(key);
                prop_assert!(longer || key.closer(n.id, me), "hop to {:?} for {:?} does not improve", n, key);
            } else {
                prop_assert!(p.is_root(key));
            }
        }
    }

    #[test]
    fn closest_matches_brute_force((me, others) in ids_strategy(), key in any::<u128>(), n in 1usize..30) {
        let p = node_knowing(me, &others);
        let key = NodeId(key);
        let mut all: Vec<NodeId> = p.leaf_set().iter().map(|x| x.id).collect();
        all.push(NodeId(me));
        all.sort_by(|a, b| if key.closer(*a, *b) { std::cmp::Ordering::Less } else { std::cmp::Ordering::Greater });
        all.truncate(n);
        let got: Vec<NodeId> = p.closest(key, n).iter().map(|x| x.id).collect();
        prop_assert_eq!(got, all);
    }

    /// Inserting in any order keeps exactly the `half` nearest nodes on
    /// each side, sorted; removals keep the sides sorted and searchable.
    #[test]
    fn leaf_set_keeps_nearest_per_side(me in any::<u128>(), ids in prop::collection::hash_set(any::<u128>(), 0..80), half in 1usize..14) {
        let mut ls = LeafSet::new(NodeId(me), 2 * half);
        let ids: Vec<u128> = ids.into_iter().filter(|&i| i != me).collect();
        for &i in &ids {
            ls.insert(leaf_entry(i), false);
        }
        let mut right: Vec<u128> = ids.clone();
        right.sort_by_key(|&i| NodeId(me).cw(NodeId(i)));
        right.truncate(half);
        let mut left: Vec<u128> = ids.clone();
        left.sort_by_key(|&i| NodeId(i).cw(NodeId(me)));
        left.truncate(half);
        let got = |ls: &LeafSet, s: Side| ls.side(s).iter().map(|e| e.h.id.0).collect::<Vec<_>>();
        prop_assert_eq!(got(&ls, Side::Right), right.clone());
        prop_assert_eq!(got(&ls, Side::Left), left.clone());
        for &i in right.iter().step_by(2) {
            ls.remove(NodeId(i));
            prop_assert!(!ls.contains(NodeId(i)));
        }
        for s in [Side::Left, Side::Right] {
            for e in ls.side(s) {
                prop_assert!(ls.contains(e.h.id));
                prop_assert_eq!(ls.get(e.h.id).map(|x| x.h.id), Some(e.h.id));
            }
        }
    }

    /// With every node knowing every other, routes end at the true root.
    #[test]
    fn perfect_state_routes_to_true_root(ids in prop::collection::hash_set(any::<u128>(), 2..60), keys in prop::collection::vec(any::<u128>(), 1..40)) {
        let ids: Vec<u128> = ids.into_iter().collect();
        let nodes: HashMap<u128, Pastry> = ids.iter().map(|&i| (i, node_knowing(i, &ids))).collect();
        let all: Vec<NodeId> = ids.iter().map(|&i| NodeId(i)).collect();
        for (j, k) in keys.iter().enumerate() {
            let key = NodeId(*k);
            let mut at = ids[j % ids.len()];
            let mut hops = 0;
            while let Some(n) = nodes[&at].next_hop(key) {
                at = n.id.0;
                hops += 1;
                prop_assert!(hops < 20);
            }
            prop_assert_eq!(NodeId(at), root_of(&all, key));
        }
    }

    /// Hostile input: whatever decodes is handled without panicking.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), sender in any::<u128>()) {
        let mut p = node_knowing(1 << 127, &[5, 1 << 100, 3 << 126]);
        if let Ok(m) = Msg::decode(&bytes) {
            let _ = p.handle(10, h(sender), m.clone());
            let _ = p.send_failed(20, h(sender), m);
            let _ = p.tick(30 * SEC);
        }
    }

    #[test]
    fn hostile_lists_never_panic(
        list in prop::collection::vec(prop_oneof![Just(1u128 << 127), Just(0u128), any::<u128>()], 0..64),
        hops in any::<u8>(), row in any::<u8>(), min_row in any::<u8>(), expected in any::<u8>(),
    ) {
        let me = 1u128 << 127;
        let mut p = node_knowing(me, &[5, 1 << 100, 3 << 126]);
        let mut j = Pastry::new(h(77), Config::default());
        j.join(0, h(me));
        let handles: Vec<NodeHandle> = list.iter().map(|&i| h(i)).collect();
        let msgs = vec![
            Msg::Join { joiner: h(me), hops, min_row },
            Msg::Join { joiner: h(list.first().copied().unwrap_or(9)), hops, min_row },
            Msg::RowReply { row, entries: RowList::truncating(handles.clone()) },
            Msg::RowRequest { row, col: None },
            Msg::RowRequest { row, col: Some(min_row) },
            Msg::LeafSetReply { leaf_set: LeafList::truncating(handles.clone()) },
            Msg::Leave { leaf_set: LeafList::truncating(handles.clone()) },
            Msg::JoinReply { expected, leaf_set: LeafList::truncating(handles.clone()), entries: JoinList::truncating(handles.clone()) },
            Msg::JoinRows { entries: JoinList::truncating(handles.clone()) },
            Msg::ProbeAck { echo: Stamp { sent: u64::MAX, tag: 1 }, back: Some(Stamp { sent: 0, tag: 0 }), leaf_set: Some(LeafList::truncating(handles.clone())) },
            Msg::Route { key: NodeId(me), origin: h(me), hops, payload: Payload::default() },
        ];
        for m in msgs {
            for node in [&mut p, &mut j] {
                let acts = node.handle(5, h(3), m.clone());
                for a in acts {
                    if let Action::Send { to, .. } = a {
                        prop_assert_ne!(to.id, node.me().id, "never sends to itself");
                    }
                }
                let _ = node.send_failed(6, h(3), m.clone());
            }
        }
        prop_assert!(!p.leaf_set().iter().any(|x| x.id == NodeId(me)));
        prop_assert!(!p.routing_entries().iter().any(|x| x.id == NodeId(me)));
        prop_assert!(p.leaf_set().len() <= Config::default().leaf_set_size);
    }
}

// ---------------------------------------------------------------- a tiny network

/// A discrete-event network for tests: fixed per-pair latency derived from
/// ids, failed nodes drop everything and senders learn of it after a delay.
struct Net {
    nodes: BTreeMap<u128, Pastry>,
    dead: HashSet<u128>,
    queue: BinaryHeap<Reverse<(Micros, u64, usize)>>,
    events: Vec<Option<Ev>>,
    seq: u64,
    now: Micros,
    delivered: Vec<(u128, NodeId, u8)>,
    joined: HashSet<u128>,
    failed_reports: Vec<(u128, NodeId)>,
    sent: usize,
}

enum Ev {
    Msg {
        to: u128,
        from: NodeHandle,
        msg: Msg,
    },
    Failed {
        at: u128,
        to: NodeHandle,
        msg: Msg,
    },
}

impl Net {
    fn new() -> Self {
        Net {
            nodes: BTreeMap::new(),
            dead: HashSet::new(),
            queue: BinaryHeap::new(),
            events: Vec::new(),
            seq: 0,
            now: 0,
            delivered: Vec::new(),
            joined: HashSet::new(),
            failed_reports: Vec::new(),
            sent: 0,
        }
    }

    fn latency(a: u128, b: u128) -> Micros {
        2 * MS + ((a ^ b) % 40) as Micros * MS
    }

    fn push(&mut self, at: Micros, ev: Ev) {
        self.events.push(Some(ev));
        self.seq += 1;
        self.queue
            .push(Reverse((at, self.seq, self.events.len() - 1)));
    }

    fn apply(&mut self, who: u128, acts: Vec<Action>) {
        for a in acts {
            match a {
                Action::Send { to, msg } => {
                    assert_ne!(to.id.0, who, "node sent to itself: {msg:?}");
                    self.sent += 1;
                    if self.dead.contains(&to.id.0) || !self.nodes.contains_key(&to.id.0) {
                        let at = self.now + 500 * MS;
                        self.push(at, Ev::Failed { at: who, to, msg });
                    } else {
                        let at = self.now + Self::latency(who, to.id.0);
                        let from = self.nodes[&who].me();
                        self.push(
                            at,
                            Ev::Msg {
                                to: to.id.0,
                                from,
                                msg,
                            },
                        );
                    }
                }
                Action::Deliver { key, hops, .. } => self.delivered.push((who, key, hops)),
                Action::Joined => {
                    self.joined.insert(who);
                }
                Action::NodeFailed(x) => self.failed_reports.push((who, x.id)),
                Action::LeafSetChanged => {}
            }
        }
    }

    /// Runs events until `until` (ticking every node every 250 ms when
    /// `ticks`), or until the queue is empty when not ticking.
    fn run(&mut self, until: Micros, ticks: bool) {
        let mut next_tick = self.now;
        loop {
            let next_ev = self.queue.peek().map(|Reverse((t, _, _))| *t);
            if ticks && next_tick <= until && next_ev.is_none_or(|t| t >= next_tick) {
                self.now = next_tick;
                let ids: Vec<u128> = self
                    .nodes
                    .keys()
                    .copied()
                    .filter(|i| !self.dead.contains(i))
                    .collect();
                for i in ids {
                    let acts = self.nodes.get_mut(&i).unwrap().tick(self.now);
                    self.apply(i, acts);
                }
                next_tick += 250 * MS;
                continue;
            }
            let Some(t) = next_ev else { break };
            if t > until {
                break;
            }
            let Reverse((t, _, idx)) = self.queue.pop().unwrap();
            self.now = t;
            match self.events[idx].take().unwrap() {
                Ev::Msg { to, from, msg } => {
                    if self.dead.contains(&to) {
                        continue;
                    }
                    let acts = self.nodes.get_mut(&to).unwrap().handle(t, from, msg);
                    self.apply(to, acts);
                }
                Ev::Failed { at, to, msg } => {
                    if self.dead.contains(&at) {
                        continue;
                    }
                    let acts = self.nodes.get_mut(&at).unwrap().send_failed(t, to, msg);
                    self.apply(at, acts);
                }
            }
        }
        if self.queue.is_empty() {
            self.events.clear();
        }
        if until != Micros::MAX {
            self.now = self.now.max(until);
        }
    }

    fn settle(&mut self) {
        self.run(Micros::MAX, false);
    }

    fn add_first(&mut self, id: u128) {
        let mut p = Pastry::new(
            h(id),
            Config {
                seed: id as u64,
                ..Config::default()
            },
        );
        p.bootstrap_alone();
        self.nodes.insert(id, p);
        self.joined.insert(id);
    }

    fn join(&mut self, id: u128, via: u128) {
        let mut p = Pastry::new(
            h(id),
            Config {
                seed: id as u64,
                ..Config::default()
            },
        );
        let acts = p.join(self.now, h(via));
        self.nodes.insert(id, p);
        self.apply(id, acts);
    }

    fn live(&self) -> Vec<u128> {
        self.nodes
            .keys()
            .copied()
            .filter(|i| !self.dead.contains(i))
            .collect()
    }

    /// Nodes whose leaf set differs from the true `half` nearest live
    /// nodes on each side.
    fn wrong_leaf_sets(&self) -> Vec<u128> {
        let live = self.live();
        let n = live.len();
        let mut wrong = Vec::new();
        for (i, &id) in live.iter().enumerate() {
            let p = &self.nodes[&id];
            let half = Config::default().leaf_set_size / 2;
            let k = half.min(n - 1);
            let right: Vec<u128> = (1..=k).map(|d| live[(i + d) % n]).collect();
            let left: Vec<u128> = (1..=k).map(|d| live[(i + n - d) % n]).collect();
            let (l, r) = p.leaf_sides();
            let l: Vec<u128> = l.iter().map(|x| x.id.0).collect();
            let r: Vec<u128> = r.iter().map(|x| x.id.0).collect();
            if l != left || r != right {
                wrong.push(id);
            }
        }
        wrong
    }

    /// Routes `n` keys from random live nodes; returns (correct, mean hops).
    fn lookups(&mut self, n: usize, seed: u64) -> (usize, f64) {
        let mut rng = seed;
        let live = self.live();
        let ids: Vec<NodeId> = live.iter().map(|&i| NodeId(i)).collect();
        self.delivered.clear();
        let mut want = Vec::new();
        for _ in 0..n {
            let key = NodeId(rand_u128(&mut rng));
            let from = live[(rand_u128(&mut rng) % live.len() as u128) as usize];
            want.push((key, root_of(&ids, key)));
            let acts = self
                .nodes
                .get_mut(&from)
                .unwrap()
                .route(self.now, key, vec![])
                .unwrap();
            self.apply(from, acts);
        }
        self.settle();
        let mut ok = 0;
        let mut hops = 0usize;
        for (key, root) in want {
            if let Some((at, _, hp)) = self.delivered.iter().find(|d| d.1 == key) {
                if NodeId(*at) == root {
                    ok += 1;
                }
                hops += *hp as usize;
            }
        }
        (ok, hops as f64 / n as f64)
    }
}

fn rand_u128(s: &mut u64) -> u128 {
    let mut next = || {
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    ((next() as u128) << 64) | next() as u128
}

fn build(n: usize, seed: u64) -> Net {
    let mut rng = seed;
    let mut net = Net::new();
    let first = rand_u128(&mut rng);
    net.add_first(first);
    for _ in 1..n {
        let id = rand_u128(&mut rng);
        let ids: Vec<u128> = net
            .joined
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let via = ids[(rand_u128(&mut rng) % ids.len() as u128) as usize];
        net.join(id, via);
        net.settle();
        assert!(net.joined.contains(&id), "node {id:x} did not join");
    }
    net
}

#[test]
fn sequential_joins_build_exact_leaf_sets_and_route_to_roots() {
    let mut net = build(60, 1);
    assert_eq!(net.wrong_leaf_sets(), Vec::<u128>::new());
    for p in net.nodes.values() {
        assert!(p.joined());
        assert!(!p.routing_fill().is_empty());
        assert!(!p.neighbours().is_empty(), "RTTs were measured");
        for (n, rtt) in p.neighbours() {
            assert_eq!(
                rtt,
                2 * Net::latency(p.me().id.0, n.id.0),
                "RTT is measured, not guessed"
            );
        }
    }
    let (ok, hops) = net.lookups(400, 7);
    assert_eq!(ok, 400);
    assert!(hops < 2.5, "mean hops {hops}");
}

#[test]
fn concurrent_joins_converge() {
    let mut rng = 99;
    let mut net = Net::new();
    let first = rand_u128(&mut rng);
    net.add_first(first);
    // Twenty nodes join at once through the same bootstrap, then twenty
    // more through random members.
    let batch: Vec<u128> = (0..20).map(|_| rand_u128(&mut rng)).collect();
    for &id in &batch {
        net.join(id, first);
    }
    net.settle();
    for _ in 0..20 {
        let id = rand_u128(&mut rng);
        let via = batch[(rand_u128(&mut rng) % 20) as usize];
        net.join(id, via);
    }
    net.settle();
    assert_eq!(net.joined.len(), 41);
    // Leaf-set gossip in maintenance heals what racing joins missed.
    let t = net.now + 120 * SEC;
    net.run(t, true);
    assert_eq!(net.wrong_leaf_sets(), Vec::<u128>::new());
    let (ok, _) = net.lookups(300, 3);
    assert_eq!(ok, 300);
}

#[test]
fn failures_are_detected_and_repaired() {
    let mut net = build(80, 5);
    let t = net.now + 5 * SEC;
    net.run(t, true);
    let live = net.live();
    let victims: Vec<u128> = live.iter().copied().step_by(5).collect();
    for v in &victims {
        net.dead.insert(*v);
    }
    // Right after: routes still reach the live root through send_failed.
    let (ok, _) = net.lookups(300, 11);
    assert!(ok >= 297, "only {ok}/300 right after failure");
    let t = net.now + 30 * SEC;
    net.run(t, true);
    assert_eq!(
        net.wrong_leaf_sets(),
        Vec::<u128>::new(),
        "leaf sets repaired"
    );
    let reported: HashSet<NodeId> = net.failed_reports.iter().map(|r| r.1).collect();
    for v in &victims {
        assert!(reported.contains(&NodeId(*v)), "failure of {v:x} reported");
    }
    for p in net.live().iter().map(|i| &net.nodes[i]) {
        for e in p.leaf_set() {
            assert!(!net.dead.contains(&e.id.0));
        }
    }
    let (ok, _) = net.lookups(300, 12);
    assert_eq!(ok, 300);
}

#[test]
fn send_failed_reroutes_through_another_hop() {
    let mut net = build(40, 8);
    let live = net.live();
    let key = NodeId(rand_u128(&mut 1234));
    let from = *live.iter().find(|&&i| !net.nodes[&i].is_root(key)).unwrap();
    let next = net.nodes[&from].next_hop(key).unwrap();
    let ids: Vec<NodeId> = live
        .iter()
        .filter(|&&i| i != next.id.0)
        .map(|&i| NodeId(i))
        .collect();
    let p = net.nodes.get_mut(&from).unwrap();
    let msg = Msg::Route {
        key,
        origin: p.me(),
        hops: 1,
        payload: Payload::default(),
    };
    let acts = p.send_failed(net.now, next, msg);
    assert!(acts.contains(&Action::NodeFailed(next)));
    assert!(p.next_hop(key) != Some(next));
    net.dead.insert(next.id.0);
    net.delivered.clear();
    net.apply(from, acts);
    net.settle();
    assert_eq!(net.delivered.len(), 1);
    assert_eq!(NodeId(net.delivered[0].0), root_of(&ids, key));
}

#[test]
fn graceful_leave_repairs_without_probing() {
    let mut net = build(40, 21);
    let live = net.live();
    let leaver = live[7];
    let acts = net.nodes.get_mut(&leaver).unwrap().leave(net.now);
    assert!(!acts.is_empty());
    net.apply(leaver, acts);
    net.settle();
    net.dead.insert(leaver);
    // No ticks ran: the Leave message alone fixed the leaf sets.
    assert_eq!(net.wrong_leaf_sets(), Vec::<u128>::new());
    assert!(net.failed_reports.iter().any(|r| r.1 == NodeId(leaver)));
    assert!(!net.nodes[&leaver].joined());
}

#[test]
fn route_before_join_waits_for_it() {
    let mut net = Net::new();
    net.add_first(1 << 120);
    let id = 5u128 << 120;
    net.join(id, 1 << 120);
    let key = NodeId(6 << 120);
    let acts = net
        .nodes
        .get_mut(&id)
        .unwrap()
        .route(0, key, vec![9])
        .unwrap();
    assert!(acts.is_empty());
    net.settle();
    assert_eq!(net.delivered, vec![(id, key, 0)]);
    assert!(matches!(
        net.nodes
            .get_mut(&id)
            .unwrap()
            .route(0, key, vec![0; MAX_PAYLOAD + 1]),
        Err(RouteError::PayloadTooLarge(_))
    ));
}

#[test]
fn probe_timeout_declares_failure() {
    let mut net = build(10, 4);
    let live = net.live();
    let victim = live[3];
    net.dead.insert(victim);
    // Remove the runtime's send-failure path: the peer simply never answers.
    let watcher = live[4];
    let t0 = net.now;
    let mut failed_at = None;
    let mut t = t0;
    while t < t0 + 10 * SEC && failed_at.is_none() {
        t += 250 * MS;
        let acts = net.nodes.get_mut(&watcher).unwrap().tick(t);
        if acts
            .iter()
            .any(|a| matches!(a, Action::NodeFailed(x) if x.id.0 == victim))
        {
            failed_at = Some(t);
        }
    }
    let cfg = Config::default();
    let at = failed_at.expect("declared failed by probe timeout");
    assert!(
        at - t0 >= cfg.probe_timeout
            && at - t0 <= cfg.probe_interval + cfg.probe_timeout + 500 * MS
    );
}

#[test]
fn config_validation() {
    assert!(Config::default().validate().is_ok());
    let bad = Config {
        leaf_set_size: 7,
        ..Config::default()
    };
    assert_eq!(bad.validate(), Err(ConfigError::LeafSet(7)));
    let bad = Config {
        slot_entries: 9,
        ..Config::default()
    };
    assert!(bad.validate().is_err());
    let bad = Config {
        probe_interval: 0,
        ..Config::default()
    };
    assert!(bad.validate().is_err());
    // new() clamps instead of failing.
    let p = Pastry::new(
        h(1),
        Config {
            leaf_set_size: 1000,
            ..Config::default()
        },
    );
    assert_eq!(p.config().leaf_set_size, MAX_LEAF_SET);
}

#[test]
fn leaf_set_admits_rumoured_nodes_only_after_they_answer() {
    let me = 1u128 << 127;
    let mut p = node_knowing(me, &[me + 1000, me - 1000, 5]);
    let rumour = h(me + 10);
    let acts = p.handle(
        SEC,
        h(me + 1000),
        Msg::LeafSetReply {
            leaf_set: LeafList::truncating([rumour]),
        },
    );
    assert!(!p.leaf_set().contains(&rumour), "not before it answers");
    let stamp = acts
        .iter()
        .find_map(|a| match a {
            Action::Send {
                to,
                msg: Msg::Announce { stamp },
            } if *to == rumour => Some(*stamp),
            _ => None,
        })
        .expect("the rumoured node is contacted");
    // A forged answer (wrong tag) still proves the sender is alive (the
    // transport authenticated it) but measures nothing.
    let forged = Stamp {
        sent: stamp.sent,
        tag: stamp.tag ^ 1,
    };
    p.handle(
        SEC + 30 * MS,
        rumour,
        Msg::ProbeAck {
            echo: forged,
            back: None,
            leaf_set: None,
        },
    );
    assert!(p.leaf_set().contains(&rumour));
    assert_eq!(p.rtt(rumour.id), None);
    p.handle(
        SEC + 40 * MS,
        rumour,
        Msg::ProbeAck {
            echo: stamp,
            back: None,
            leaf_set: None,
        },
    );
    assert_eq!(p.rtt(rumour.id), Some(40 * MS));
    // A rumour about a node I declared failed is ignored for a while.
    let dead = h(me - 10);
    p.handle(
        2 * SEC,
        dead,
        Msg::Probe {
            stamp: Stamp { sent: 0, tag: 0 },
        },
    );
    assert!(p.leaf_set().contains(&dead));
    let acts = p.send_failed(3 * SEC, dead, Msg::LeafSetRequest);
    assert!(acts.contains(&Action::NodeFailed(dead)));
    assert!(acts.contains(&Action::LeafSetChanged));
    let acts = p.handle(
        4 * SEC,
        h(me + 1000),
        Msg::LeafSetReply {
            leaf_set: LeafList::truncating([dead]),
        },
    );
    assert!(!acts
        .iter()
        .any(|a| matches!(a, Action::Send { to, .. } if *to == dead)));
}

#[test]
fn row_request_can_ask_for_one_slot() {
    let me = 0u128;
    let others: Vec<u128> = (1..16u128)
        .flat_map(|d| [(d << 124) | 1, (d << 124) | 2])
        .collect();
    let mut p = node_knowing(me, &others);
    assert_eq!(p.routing_fill(), vec![30]);
    let reply = |acts: Vec<Action>| {
        acts.into_iter()
            .find_map(|a| match a {
                Action::Send {
                    msg: Msg::RowReply { entries, .. },
                    ..
                } => Some(entries.into_vec()),
                _ => None,
            })
            .expect("a row reply")
    };
    let asker = h(0x0100 << 112);
    let all = reply(p.handle(SEC, asker, Msg::RowRequest { row: 0, col: None }));
    assert_eq!(all.len(), 30);
    let slot = reply(p.handle(
        SEC,
        asker,
        Msg::RowRequest {
            row: 0,
            col: Some(7),
        },
    ));
    let mut ids: Vec<u128> = slot.iter().map(|x| x.id.0).collect();
    ids.sort();
    assert_eq!(ids, vec![(7 << 124) | 1, (7 << 124) | 2]);
    let none = reply(p.handle(
        SEC,
        asker,
        Msg::RowRequest {
            row: 31,
            col: Some(200),
        },
    ));
    assert!(none.is_empty());
}

#[test]
fn join_is_retried_after_a_timeout() {
    let via = h(1 << 100);
    let mut p = Pastry::new(h(5 << 100), Config::default());
    let first = p.join(0, via);
    assert!(
        matches!(&first[..], [Action::Send { to, msg: Msg::Join { hops: 0, .. } }] if *to == via)
    );
    assert!(p.tick(SEC).is_empty());
    let again = p.tick(Config::default().join_timeout);
    assert_eq!(again, first);
    assert!(!p.joined());
    // Messages routed meanwhile wait for the join.
    assert!(p.route(SEC, NodeId(9), vec![1]).unwrap().is_empty());
}

//! Scribe trees on a small in-test network whose routes improve the shared
//! prefix by at least one digit per hop, as Pastry's do.

use super::*;
use proptest::prelude::*;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

const SEC: Micros = 1_000_000;

fn addr(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8),
        7000,
    ))
}

fn index(a: &SocketAddr) -> usize {
    match a {
        SocketAddr::V4(v) => {
            let o = v.ip().octets();
            (o[2] as usize) << 8 | o[3] as usize
        }
        SocketAddr::V6(_) => usize::MAX,
    }
}

struct Net {
    ids: Vec<NodeId>,
    alive: Vec<bool>,
    nodes: Vec<Scribe>,
    /// (to, from, msg) in flight.
    wire: Vec<(usize, NodeHandle, Msg)>,
    /// Per node: (topic, seq, data) delivered, in order.
    got: Vec<Vec<(u64, Vec<u8>)>>,
    hops: Vec<u8>,
    attached: Vec<bool>,
    gaps: usize,
    now: Micros,
}

struct View<'a> {
    ids: &'a [NodeId],
    alive: &'a [bool],
    me: usize,
}

impl Router for View<'_> {
    fn hop(&self, key: NodeId) -> Option<Hop> {
        let live = || (0..self.ids.len()).filter(|&j| self.alive[j]);
        let root = live().reduce(|a, b| {
            if key.closer(self.ids[b], self.ids[a]) {
                b
            } else {
                a
            }
        })?;
        if root == self.me {
            return Some(Hop::Root);
        }
        let mine = key.shared_prefix(self.ids[self.me]);
        // one digit better at least, the smallest such step, lowest index
        let next = live()
            .filter(|&j| j != self.me && key.shared_prefix(self.ids[j]) > mine)
            .min_by_key(|&j| (key.shared_prefix(self.ids[j]), j))
            .unwrap_or(root);
        Some(Hop::Next(NodeHandle {
            id: self.ids[next],
            addr: addr(next),
        }))
    }
}

impl Net {
    fn new(n: usize, seed: u64) -> Net {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let ids = (0..n)
            .map(|_| NodeId(((rnd() as u128) << 64) | rnd() as u128))
            .collect();
        Net {
            ids,
            alive: vec![true; n],
            nodes: (0..n)
                .map(|_| Scribe::new(ScribeConfig::default()))
                .collect(),
            wire: Vec::new(),
            got: vec![Vec::new(); n],
            hops: Vec::new(),
            attached: vec![false; n],
            gaps: 0,
            now: SEC,
        }
    }

    fn me(&self, i: usize) -> NodeHandle {
        NodeHandle {
            id: self.ids[i],
            addr: addr(i),
        }
    }

    fn apply(&mut self, i: usize, acts: Vec<Action>) {
        for a in acts {
            match a {
                Action::Send { to, msg } => {
                    let j = index(&to.addr);
                    assert_ne!(j, i, "a node sent to itself: {msg:?}");
                    self.wire.push((j, self.me(i), msg));
                }
                Action::Deliver {
                    seq, data, hops, ..
                } => {
                    self.got[i].push((seq, data));
                    self.hops.push(hops);
                }
                Action::Gap { .. } => self.gaps += 1,
                Action::Attached { .. } => self.attached[i] = true,
            }
        }
    }

    fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut Scribe, &View) -> R) -> R {
        let v = View {
            ids: &self.ids,
            alive: &self.alive,
            me: i,
        };
        f(&mut self.nodes[i], &v)
    }

    /// Delivers one message in flight, chosen by `pick`.
    fn step(&mut self, pick: usize) {
        let (to, from, msg) = self.wire.remove(pick % self.wire.len());
        let now = self.now;
        if !self.alive[to] {
            let from_i = index(&from.addr);
            let dead = self.me(to);
            let acts = self.with(from_i, |s, v| s.send_failed(now, dead, v));
            self.apply(from_i, acts);
            return;
        }
        let acts = self.with(to, |s, v| s.handle(now, from, msg, v));
        self.apply(to, acts);
    }

    fn settle(&mut self) {
        let mut n = 0;
        while !self.wire.is_empty() {
            self.step(0);
            n += 1;
            assert!(n < 1_000_000, "messages never settle");
        }
    }

    fn subscribe(&mut self, i: usize, topic: NodeId) {
        let now = self.now;
        let acts = self.with(i, |s, v| s.subscribe(now, topic, v));
        self.apply(i, acts);
    }

    fn root_of(&self, topic: NodeId) -> usize {
        (0..self.ids.len())
            .filter(|&j| self.alive[j])
            .reduce(|a, b| {
                if topic.closer(self.ids[b], self.ids[a]) {
                    b
                } else {
                    a
                }
            })
            .unwrap()
    }

    fn publish(&mut self, topic: NodeId, data: &[u8]) -> u64 {
        let r = self.root_of(topic);
        self.now += 1;
        let now = self.now;
        let (seq, acts) = self.nodes[r].publish(now, topic, data.to_vec());
        self.apply(r, acts);
        seq
    }

    fn tick_all(&mut self, dt: Micros) {
        self.now += dt;
        let now = self.now;
        for i in 0..self.ids.len() {
            if self.alive[i] {
                let acts = self.with(i, |s, v| s.tick(now, v));
                self.apply(i, acts);
            }
        }
    }
}

fn topic() -> NodeId {
    NodeId::for_key("app", "temperature")
}

#[test]
fn every_subscriber_gets_every_publication_in_order() {
    let mut net = Net::new(200, 1);
    let t = topic();
    let root = net.root_of(t);
    let subs: Vec<usize> = (0..200).filter(|&i| i % 3 == 0 && i != root).collect();
    for &i in &subs {
        net.subscribe(i, t);
    }
    net.settle();
    for &i in &subs {
        assert!(net.attached[i], "subscriber {i} not attached");
    }
    let mut seqs = Vec::new();
    for k in 0..20u8 {
        seqs.push(net.publish(t, &[k]));
        net.settle();
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    for &i in &subs {
        let want: Vec<(u64, Vec<u8>)> = seqs
            .iter()
            .zip(0..20u8)
            .map(|(&s, k)| (s, vec![k]))
            .collect();
        assert_eq!(net.got[i], want, "subscriber {i}");
    }
    for i in (0..200).filter(|i| !subs.contains(i)) {
        assert!(net.got[i].is_empty(), "non-subscriber {i} got data");
    }
    // depth is the route length: a few prefix steps for 200 nodes
    let depth = *net.hops.iter().max().unwrap();
    assert!((1..=6).contains(&depth), "tree depth {depth}");
    // the root only talks to its children, not to every subscriber
    assert!(net.nodes[root].children(t).len() < subs.len());
}

#[test]
fn a_dead_forwarder_is_routed_around() {
    let mut net = Net::new(120, 7);
    let t = topic();
    let root = net.root_of(t);
    let subs: Vec<usize> = (0..120).filter(|&i| i % 2 == 1 && i != root).collect();
    for &i in &subs {
        net.subscribe(i, t);
    }
    net.settle();
    net.publish(t, b"before");
    net.settle();
    // a forwarder with children that is no subscriber itself
    let victim = (0..120)
        .find(|&i| i != root && !subs.contains(&i) && !net.nodes[i].children(t).is_empty())
        .or_else(|| (0..120).find(|&i| i != root && !net.nodes[i].children(t).is_empty()))
        .expect("a forwarder");
    let orphans: Vec<usize> = subs
        .iter()
        .copied()
        .filter(|&i| net.nodes[i].parent(t).map(|p| p.addr) == Some(addr(victim)))
        .collect();
    assert!(!orphans.is_empty());
    net.alive[victim] = false;
    // heartbeats find the dead parent; routes now avoid it
    for _ in 0..3 {
        net.tick_all(SEC);
        net.settle();
    }
    let live_subs: Vec<usize> = subs.iter().copied().filter(|&i| i != victim).collect();
    let seq = net.publish(t, b"after");
    net.settle();
    for &i in &live_subs {
        assert_eq!(
            net.got[i].last(),
            Some(&(seq, b"after".to_vec())),
            "subscriber {i} (orphan: {})",
            orphans.contains(&i)
        );
    }
}

#[test]
fn a_closer_node_becomes_root_and_the_tree_follows() {
    let mut net = Net::new(60, 3);
    let t = topic();
    // start with the would-be root dead, so another node roots the tree
    let real_root = net.root_of(t);
    net.alive[real_root] = false;
    let subs: Vec<usize> = (0..60).filter(|&i| i % 4 == 0 && i != real_root).collect();
    for &i in &subs {
        net.subscribe(i, t);
    }
    net.settle();
    let first = net.publish(t, b"one");
    net.settle();
    // the closer node arrives: everyone moves under it on the next tick
    net.alive[real_root] = true;
    net.tick_all(SEC);
    net.settle();
    assert!(net.nodes[real_root].is_tree_root(t));
    net.now += 5 * SEC; // a later root's clock is ahead: numbers keep growing
    let second = net.publish(t, b"two");
    net.settle();
    assert!(second > first);
    for &i in &subs {
        assert_eq!(
            net.got[i],
            vec![(first, b"one".to_vec()), (second, b"two".to_vec())],
            "subscriber {i}"
        );
    }
}

#[test]
fn unsubscribing_prunes_the_whole_tree() {
    let mut net = Net::new(80, 5);
    let t = topic();
    let subs: Vec<usize> = (0..80).filter(|&i| i % 5 == 2).collect();
    for &i in &subs {
        net.subscribe(i, t);
    }
    net.settle();
    assert!(net.nodes.iter().filter(|s| s.topics() > 0).count() >= subs.len());
    let now = net.now;
    for &i in &subs {
        let acts = net.nodes[i].unsubscribe(now, t);
        net.apply(i, acts);
    }
    net.settle();
    for (i, s) in net.nodes.iter().enumerate() {
        assert_eq!(s.topics(), 0, "node {i} still holds the topic");
    }
}

#[test]
fn soft_state_drops_silent_children() {
    let mut net = Net::new(40, 11);
    let t = topic();
    let root = net.root_of(t);
    let sub = (0..40).find(|&i| i != root).unwrap();
    net.subscribe(sub, t);
    net.settle();
    assert!(!net.nodes[root].children(t).is_empty());
    // the subscriber vanishes without a word; nobody keeps it forever
    net.alive[sub] = false;
    for _ in 0..10 {
        net.tick_all(SEC);
        net.settle();
    }
    for (i, s) in net.nodes.iter().enumerate() {
        if net.alive[i] {
            assert_eq!(s.topics(), 0, "node {i} still forwards to a dead child");
        }
    }
}

#[test]
fn a_missing_predecessor_is_reported_as_a_gap() {
    let ids = [NodeId(1), NodeId(2)];
    let alive = [true, true];
    let v = View {
        ids: &ids,
        alive: &alive,
        me: 0,
    };
    let t = NodeId(1 << 100);
    let mut s = Scribe::new(ScribeConfig::default());
    let parent = NodeHandle {
        id: ids[1],
        addr: addr(1),
    };
    let acts = s.subscribe(0, t, &v);
    assert!(matches!(
        &acts[..],
        [Action::Send {
            msg: Msg::Subscribe { .. },
            ..
        }]
    ));
    let acts = s.handle(1, parent, Msg::Ack { topic: t, last: 4 }, &v);
    assert_eq!(acts, vec![Action::Attached { topic: t }]);
    let p = |seq, prev| Msg::Publish {
        topic: t,
        seq,
        prev,
        hops: 1,
        data: vec![seq as u8],
    };
    // 6 arrives before 5: held, then both in order
    assert!(s.handle(2, parent, p(6, 5), &v).is_empty());
    let acts = s.handle(3, parent, p(5, 4), &v);
    let seqs: Vec<u64> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Deliver { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![5, 6]);
    // a duplicate is dropped
    assert!(s.handle(4, parent, p(6, 5), &v).is_empty());
    // 9 names 8, which never comes: delivered after the wait, with a gap
    assert!(s.handle(5, parent, p(9, 8), &v).is_empty());
    assert!(s
        .tick(10, &v)
        .iter()
        .all(|a| !matches!(a, Action::Deliver { .. })));
    let acts = s.tick(5 + SEC, &v);
    assert!(acts.contains(&Action::Gap {
        topic: t,
        after: 6,
        seq: 9
    }));
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Deliver { seq: 9, .. })));
    assert_eq!(s.stats().gaps, 1);
}

#[test]
fn strangers_and_oversized_messages_are_refused() {
    let ids = [NodeId(1), NodeId(2), NodeId(3)];
    let alive = [true, true, true];
    let v = View {
        ids: &ids,
        alive: &alive,
        me: 1,
    };
    let t = NodeId(5);
    let stranger = NodeHandle {
        id: ids[2],
        addr: addr(2),
    };
    let mut s = Scribe::new(ScribeConfig::default());
    // a publication for a topic we are not in: the sender is told to prune
    let acts = s.handle(
        1,
        stranger,
        Msg::Publish {
            topic: t,
            seq: 3,
            prev: 0,
            hops: 1,
            data: vec![],
        },
        &v,
    );
    assert_eq!(
        acts,
        vec![Action::Send {
            to: stranger,
            msg: Msg::Unsubscribe { topic: t }
        }]
    );
    // an ack from a node that is not our parent
    let acts = s.handle(1, stranger, Msg::Ack { topic: t, last: 0 }, &v);
    assert!(matches!(
        &acts[..],
        [Action::Send {
            msg: Msg::Unsubscribe { .. },
            ..
        }]
    ));
    // too large, or numbered 0: dropped
    let big = Msg::Publish {
        topic: t,
        seq: 1,
        prev: 0,
        hops: 0,
        data: vec![0; MAX_DATA + 1],
    };
    assert!(big.validate().is_err());
    assert!(s.handle(1, stranger, big, &v).is_empty());
    let zero = Msg::Publish {
        topic: t,
        seq: 0,
        prev: 0,
        hops: 0,
        data: vec![],
    };
    assert!(s.handle(1, stranger, zero, &v).is_empty());
    assert_eq!(s.stats().refused, 2);
    // the topic table is bounded
    let mut small = Scribe::new(ScribeConfig {
        max_topics: 4,
        ..ScribeConfig::default()
    });
    for k in 0..10u128 {
        small.handle(
            1,
            stranger,
            Msg::Subscribe {
                topic: NodeId(k << 64),
            },
            &v,
        );
    }
    assert_eq!(small.topics(), 4);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Links deliver messages in any order; subscribers still see every
    /// publication once, in order.
    #[test]
    fn any_delivery_order_keeps_publication_order(
        seed in 1u64..1000,
        picks in proptest::collection::vec(any::<usize>(), 0..4000),
        npub in 1usize..12,
    ) {
        let mut net = Net::new(50, seed);
        let t = topic();
        let root = net.root_of(t);
        let subs: Vec<usize> = (0..50).filter(|&i| (i as u64 + seed) % 4 == 0 && i != root).collect();
        for &i in &subs {
            net.subscribe(i, t);
        }
        net.settle();
        let mut seqs = Vec::new();
        for k in 0..npub {
            seqs.push(net.publish(t, &[k as u8]));
        }
        // deliver the publications in an arbitrary order
        let mut it = picks.into_iter();
        while !net.wire.is_empty() {
            let p = it.next().unwrap_or(0);
            net.step(p);
        }
        for &i in &subs {
            let got: Vec<u64> = net.got[i].iter().map(|g| g.0).collect();
            prop_assert_eq!(&got, &seqs, "subscriber {}", i);
        }
        prop_assert_eq!(net.gaps, 0);
    }
}

//! Event queue of the simulator: a calendar of fixed-width time buckets
//! (one ring spanning `horizon`) with a heap for the rare events beyond
//! it. Popping walks the buckets in order, so the events of one bucket sit
//! together in memory; a binary heap over a million pending events spent
//! most of its time on cache misses.

use crate::id::Micros;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

struct Bucket<E> {
    /// (time, seq, index into `evs`); sorted descending once the bucket
    /// becomes current, so the next event is the last.
    keys: Vec<(Micros, u64, u32)>,
    evs: Vec<Option<E>>,
}

impl<E> Bucket<E> {
    fn new() -> Self {
        Bucket {
            keys: Vec::new(),
            evs: Vec::new(),
        }
    }
}

struct Far<E>(Micros, u64, E);

impl<E> PartialEq for Far<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl<E> Eq for Far<E> {}
impl<E> PartialOrd for Far<E> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Far<E> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(o.0, o.1))
    }
}

/// Pops events in (time, insertion) order.
pub struct Queue<E> {
    width: Micros,
    ring: Vec<Bucket<E>>,
    cur: usize,
    cur_start: Micros,
    sorted: bool,
    in_ring: usize,
    far: BinaryHeap<Reverse<Far<E>>>,
    seq: u64,
}

/// Buckets whose storage grew past this many events give it back once
/// drained, so memory follows the events in flight.
const KEEP: usize = 128;

impl<E> Queue<E> {
    pub fn new(width: Micros, buckets: usize) -> Self {
        Queue {
            width: width.max(1),
            ring: (0..buckets.max(2)).map(|_| Bucket::new()).collect(),
            cur: 0,
            cur_start: 0,
            sorted: false,
            in_ring: 0,
            far: BinaryHeap::new(),
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.in_ring + self.far.len()
    }

    fn horizon_end(&self) -> Micros {
        self.cur_start + self.width * self.ring.len() as Micros
    }

    fn index(&self, t: Micros) -> usize {
        ((t / self.width) % self.ring.len() as Micros) as usize
    }

    /// Schedules `ev` at `t`, which must not precede the last popped time.
    pub fn push(&mut self, t: Micros, ev: E) {
        self.seq += 1;
        if self.len() == 0 {
            self.cur_start = t - t % self.width;
            self.cur = self.index(t);
            self.sorted = false;
        }
        let t = t.max(self.cur_start);
        if t >= self.horizon_end() {
            self.far.push(Reverse(Far(t, self.seq, ev)));
            return;
        }
        self.put(t, self.seq, ev);
    }

    fn put(&mut self, t: Micros, seq: u64, ev: E) {
        let i = self.index(t);
        let b = &mut self.ring[i];
        let k = (t, seq, b.evs.len() as u32);
        b.evs.push(Some(ev));
        if i == self.cur && self.sorted {
            let at = b.keys.partition_point(|x| (x.0, x.1) > (t, seq));
            b.keys.insert(at, k);
        } else {
            b.keys.push(k);
        }
        self.in_ring += 1;
    }

    /// Pops the next event if it is due at or before `until`.
    pub fn pop(&mut self, until: Micros) -> Option<(Micros, E)> {
        loop {
            if self.in_ring == 0 {
                let t = self.far.peek()?.0 .0;
                if t > until {
                    return None;
                }
                let len = self.ring.len();
                self.ring[self.cur] = Bucket::new();
                self.cur_start = t - t % self.width;
                self.cur = self.index(t);
                self.sorted = false;
                debug_assert!(self.cur < len);
                self.refill();
            }
            let b = &mut self.ring[self.cur];
            if !self.sorted {
                b.keys.sort_unstable_by_key(|y| Reverse((y.0, y.1)));
                self.sorted = true;
            }
            if let Some(&(t, _, i)) = b.keys.last() {
                if t > until {
                    return None;
                }
                b.keys.pop();
                self.in_ring -= 1;
                if let Some(ev) = b.evs[i as usize].take() {
                    return Some((t, ev));
                }
                continue;
            }
            if b.evs.capacity() > KEEP {
                *b = Bucket::new();
            } else {
                b.evs.clear();
            }
            if self.cur_start + self.width > until {
                return None;
            }
            self.cur = (self.cur + 1) % self.ring.len();
            self.cur_start += self.width;
            self.sorted = false;
            self.refill();
        }
    }

    /// Moves far events that now fall inside the ring into it.
    fn refill(&mut self) {
        let end = self.horizon_end();
        while self.far.peek().is_some_and(|Reverse(f)| f.0 < end) {
            if let Some(Reverse(Far(t, seq, ev))) = self.far.pop() {
                self.put(t, seq, ev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the mix of near and far events, pops come out in
        /// (time, insertion) order, also with pushes made between pops.
        #[test]
        fn pops_in_time_order(delays in prop::collection::vec((0u64..20_000, 0u64..3), 1..400)) {
            let mut q: Queue<usize> = Queue::new(100, 16);
            let mut model: Vec<(Micros, usize)> = Vec::new();
            let mut now = 0;
            let mut out = Vec::new();
            for (i, (d, pops)) in delays.iter().enumerate() {
                q.push(now + d, i);
                model.push((now + d, i));
                for _ in 0..*pops {
                    if let Some((t, e)) = q.pop(Micros::MAX) {
                        prop_assert!(t >= now);
                        now = t;
                        out.push((t, e));
                    }
                }
            }
            while let Some((t, e)) = q.pop(Micros::MAX) {
                prop_assert!(t >= now);
                now = t;
                out.push((t, e));
            }
            prop_assert_eq!(out.len(), model.len());
            prop_assert_eq!(q.len(), 0);
            // Equal times keep insertion order.
            for w in out.windows(2) {
                prop_assert!(w[0].0 < w[1].0 || (w[0].0 == w[1].0 && w[0].1 < w[1].1));
            }
        }
    }

    #[test]
    fn until_stops_without_losing_events() {
        let mut q: Queue<u32> = Queue::new(10, 8);
        q.push(5, 1);
        q.push(500, 2);
        q.push(55, 3);
        assert_eq!(q.pop(50), Some((5, 1)));
        assert_eq!(q.pop(50), None);
        q.push(60, 4);
        assert_eq!(q.pop(1000), Some((55, 3)));
        assert_eq!(q.pop(1000), Some((60, 4)));
        assert_eq!(q.pop(499), None);
        assert_eq!(q.pop(1000), Some((500, 2)));
        assert_eq!(q.pop(1000), None);
    }
}

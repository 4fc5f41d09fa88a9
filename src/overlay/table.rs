//! Routing table and leaf set: plain containers with the placement rules,
//! no protocol. Rows are allocated only when something lands in them and
//! hold at most 16 x `k` entries, so their size never depends on input.

use crate::id::{Micros, NodeHandle, NodeId, DIGITS};

/// RTT not measured yet; loses every comparison.
pub const UNKNOWN_RTT: u32 = u32::MAX;
/// No probe outstanding.
pub const NO_PROBE: Micros = Micros::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub h: NodeHandle,
    /// Round-trip time in microseconds, [`UNKNOWN_RTT`] if never measured.
    pub rtt: u32,
}

/// What [`RoutingTable::offer`] did with a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// My own id: no place for it.
    Rejected,
    /// Already there (its RTT or address may have been refreshed).
    Present,
    /// Took a free place in its slot.
    Inserted,
    /// Pushed out a slower entry (proximity neighbour selection).
    Replaced(NodeHandle),
    /// The slot is full of entries at least as close as the candidate.
    Full,
}

pub struct RoutingTable {
    me: NodeId,
    k: usize,
    /// Row r holds nodes sharing exactly r digits with me; slot = digit r.
    rows: Vec<Vec<Entry>>,
}

impl RoutingTable {
    pub fn new(me: NodeId, k: usize) -> Self {
        RoutingTable {
            me,
            k: k.max(1),
            rows: Vec::new(),
        }
    }

    /// (row, column) where `id` belongs, `None` for my own id.
    pub fn place(&self, id: NodeId) -> Option<(usize, usize)> {
        if id == self.me {
            return None;
        }
        let r = self.me.shared_prefix(id);
        Some((r, id.digit(r)))
    }

    pub fn row(&self, r: usize) -> &[Entry] {
        self.rows.get(r).map(|v| v.as_slice()).unwrap_or(&[])
    }

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Index range of slot c in row r: a row is sorted by id, and all its
    /// entries share r digits with me, so a slot is a contiguous run.
    fn slot_range(row: &[Entry], r: usize, c: usize) -> std::ops::Range<usize> {
        let a = row.partition_point(|e| e.h.id.digit(r) < c);
        let b = a + row[a..].partition_point(|e| e.h.id.digit(r) <= c);
        a..b
    }

    pub fn slot(&self, r: usize, c: usize) -> impl Iterator<Item = &Entry> {
        let row = self.row(r);
        row[Self::slot_range(row, r, c)].iter()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.rows.iter().flatten()
    }

    pub fn get(&self, id: NodeId) -> Option<&Entry> {
        let (r, _) = self.place(id)?;
        let row = self.row(r);
        row.binary_search_by(|e| e.h.id.cmp(&id))
            .ok()
            .map(|i| &row[i])
    }

    fn get_mut(&mut self, id: NodeId) -> Option<&mut Entry> {
        let (r, _) = self.place(id)?;
        let row = self.rows.get_mut(r)?;
        let i = row.binary_search_by(|e| e.h.id.cmp(&id)).ok()?;
        Some(&mut row[i])
    }

    /// Entries per row, up to the last non-empty one.
    pub fn fill(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.len()).collect()
    }

    /// Offers `h` for its slot. `rtt` is a fresh measurement when known;
    /// `direct` says `h` itself spoke to us, so its address can be trusted
    /// over the one we hold.
    pub fn offer(&mut self, h: NodeHandle, rtt: Option<u32>, direct: bool) -> Offer {
        let Some((r, c)) = self.place(h.id) else {
            return Offer::Rejected;
        };
        if let Some(e) = self.get_mut(h.id) {
            if let Some(rtt) = rtt {
                e.rtt = rtt;
            }
            if direct {
                e.h.addr = h.addr;
            }
            return Offer::Present;
        }
        if self.rows.len() <= r {
            self.rows.resize_with(r + 1, Vec::new);
        }
        let k = self.k;
        let row = &mut self.rows[r];
        let rtt = rtt.unwrap_or(UNKNOWN_RTT);
        let range = Self::slot_range(row, r, c);
        let at = row.partition_point(|e| e.h.id < h.id);
        if range.len() < k {
            row.insert(at, Entry { h, rtt });
            return Offer::Inserted;
        }
        let mut w = range.start;
        for i in range {
            if row[i].rtt > row[w].rtt {
                w = i;
            }
        }
        if rtt >= row[w].rtt {
            return Offer::Full;
        }
        let old = row.remove(w).h;
        let at = row.partition_point(|e| e.h.id < h.id);
        row.insert(at, Entry { h, rtt });
        Offer::Replaced(old)
    }

    /// Removes `id`; returns the (row, column) it held.
    pub fn remove(&mut self, id: NodeId) -> Option<(usize, usize)> {
        let (r, c) = self.place(id)?;
        let row = self.rows.get_mut(r)?;
        let i = row.binary_search_by(|e| e.h.id.cmp(&id)).ok()?;
        row.remove(i);
        while self.rows.last().is_some_and(|r| r.is_empty()) {
            self.rows.pop();
        }
        Some((r, c))
    }

    /// The entry of slot (l, key's digit l) that best serves `key`: longest
    /// shared prefix with it, then numerically closest. Holding `k` nearby
    /// entries per slot and picking per key shortens routes without giving
    /// up proximity.
    pub fn best_for(&self, key: NodeId, l: usize, skip: Option<NodeId>) -> Option<NodeHandle> {
        if l >= DIGITS {
            return None;
        }
        let c = key.digit(l);
        let mut best: Option<NodeHandle> = None;
        for e in self.slot(l, c) {
            if Some(e.h.id) == skip {
                continue;
            }
            best = match best {
                None => Some(e.h),
                Some(b) => {
                    let (pe, pb) = (e.h.id.shared_prefix(key), b.id.shared_prefix(key));
                    if pe > pb || (pe == pb && key.closer(e.h.id, b.id)) {
                        Some(e.h)
                    } else {
                        Some(b)
                    }
                }
            };
        }
        best
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafEntry {
    pub h: NodeHandle,
    pub rtt: u32,
    pub last_heard: Micros,
    /// When the oldest unanswered probe went out, or [`NO_PROBE`].
    pub probe_sent: Micros,
    /// Probes sent since `probe_sent`.
    pub probes: u8,
}

/// The `half` closest nodes on each side of me. When the ring has fewer
/// than `2 * half` other nodes, a node may sit on both sides.
pub struct LeafSet {
    me: NodeId,
    half: usize,
    /// Counter-clockwise neighbours, closest first.
    left: Vec<LeafEntry>,
    /// Clockwise neighbours, closest first.
    right: Vec<LeafEntry>,
    /// The ids of `left` and `right`, kept apart so that a search touches
    /// a few cache lines instead of every entry.
    ids: [Vec<NodeId>; 2],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Side {
    Left,
    Right,
}

impl LeafSet {
    pub fn new(me: NodeId, size: usize) -> Self {
        let half = (size / 2).max(1);
        LeafSet {
            me,
            half,
            left: Vec::with_capacity(half),
            right: Vec::with_capacity(half),
            ids: [Vec::with_capacity(half), Vec::with_capacity(half)],
        }
    }

    pub fn side(&self, s: Side) -> &[LeafEntry] {
        match s {
            Side::Left => &self.left,
            Side::Right => &self.right,
        }
    }

    fn dist(me: NodeId, s: Side, id: NodeId) -> u128 {
        match s {
            Side::Left => id.cw(me),
            Side::Right => me.cw(id),
        }
    }

    fn find(&self, s: Side, id: NodeId) -> Option<usize> {
        let d = Self::dist(self.me, s, id);
        let v = &self.ids[s as usize];
        let i = v.partition_point(|x| Self::dist(self.me, s, *x) < d);
        (i < v.len() && v[i] == id).then_some(i)
    }

    /// Whether `id` would get a place on some side.
    pub fn would_fit(&self, id: NodeId) -> bool {
        if id == self.me {
            return false;
        }
        [Side::Left, Side::Right].into_iter().any(|s| {
            let v = self.side(s);
            v.len() < self.half
                || v.last()
                    .is_some_and(|l| Self::dist(self.me, s, id) < Self::dist(self.me, s, l.h.id))
        })
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.find(Side::Left, id).is_some() || self.find(Side::Right, id).is_some()
    }

    /// Inserts `e` on each side where it ranks among the `half` closest;
    /// evicts what falls off. Returns whether membership changed. An entry
    /// already present keeps its state (its address is replaced only when
    /// `direct`).
    pub fn insert(&mut self, e: LeafEntry, direct: bool) -> bool {
        if e.h.id == self.me {
            return false;
        }
        let mut changed = false;
        for s in [Side::Left, Side::Right] {
            let me = self.me;
            let half = self.half;
            let ids = &mut self.ids[s as usize];
            let v = match s {
                Side::Left => &mut self.left,
                Side::Right => &mut self.right,
            };
            let d = Self::dist(me, s, e.h.id);
            match ids.binary_search_by(|x| Self::dist(me, s, *x).cmp(&d)) {
                Ok(i) => {
                    if direct {
                        v[i].h.addr = e.h.addr;
                    }
                }
                Err(i) if i < half => {
                    v.insert(i, e);
                    v.truncate(half);
                    ids.insert(i, e.h.id);
                    ids.truncate(half);
                    changed = true;
                }
                Err(_) => {}
            }
        }
        changed
    }

    /// Removes `id` from both sides; returns the sides it left.
    pub fn remove(&mut self, id: NodeId) -> (bool, bool) {
        let l = self.find(Side::Left, id).map(|i| {
            self.ids[Side::Left as usize].remove(i);
            self.left.remove(i)
        });
        let r = self.find(Side::Right, id).map(|i| {
            self.ids[Side::Right as usize].remove(i);
            self.right.remove(i)
        });
        (l.is_some(), r.is_some())
    }

    /// Applies `f` to every copy of `id`'s entry.
    pub fn update(&mut self, id: NodeId, mut f: impl FnMut(&mut LeafEntry)) {
        if let Some(i) = self.find(Side::Left, id) {
            f(&mut self.left[i]);
        }
        if let Some(i) = self.find(Side::Right, id) {
            f(&mut self.right[i]);
        }
    }

    pub fn get(&self, id: NodeId) -> Option<&LeafEntry> {
        self.find(Side::Left, id)
            .map(|i| &self.left[i])
            .or_else(|| self.find(Side::Right, id).map(|i| &self.right[i]))
    }

    /// Whether some node may sit on both sides: only when the two arcs
    /// together reach around the ring (a node on both sides has ccw + cw
    /// distance equal to the ring size).
    fn sides_may_overlap(&self) -> bool {
        match (self.left.last(), self.right.last()) {
            (Some(l), Some(r)) => l.h.id.cw(self.me).checked_add(self.me.cw(r.h.id)).is_none(),
            _ => false,
        }
    }

    /// Distinct members (a node on both sides appears once).
    pub fn members(&self) -> impl Iterator<Item = &LeafEntry> {
        let left = &self.left;
        let overlap = self.sides_may_overlap();
        left.iter().chain(
            self.right
                .iter()
                .filter(move |e| !overlap || !left.iter().any(|l| l.h.id == e.h.id)),
        )
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.members().count()
    }

    /// Both sides in ring order: farthest counter-clockwise first, then
    /// clockwise outward; each node once.
    pub fn ring_order(&self) -> Vec<NodeHandle> {
        let mut out: Vec<NodeHandle> = self.left.iter().rev().map(|e| e.h).collect();
        for e in &self.right {
            if !self.left.iter().any(|l| l.h.id == e.h.id) {
                out.push(e.h);
            }
        }
        out
    }

    /// True when the leaf set spans the whole ring: a side is not full (so
    /// I know fewer than `2 * half` other nodes) or the sides meet.
    pub fn covers_ring(&self) -> bool {
        self.left.len() < self.half || self.right.len() < self.half || self.sides_may_overlap()
    }

    /// Whether `key` lies between my farthest left and right members.
    pub fn in_range(&self, key: NodeId) -> bool {
        if self.covers_ring() {
            return true;
        }
        match (self.left.last(), self.right.last()) {
            (Some(l), Some(r)) => l.h.id.cw(key) <= l.h.id.cw(r.h.id),
            _ => true,
        }
    }

    pub fn farthest(&self, s: Side) -> Option<NodeHandle> {
        self.side(s).last().map(|e| e.h)
    }
}

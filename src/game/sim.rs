//! `capy sim game`: the vnode game on a heterogeneous fleet in virtual
//! rounds, measured against the exact equilibrium and by the key load it
//! leaves on each node.
//!
//! Each simulated node has a board class, a zone and a fake public key; its
//! vnode ids come from `NodeId::for_vnode` over that key, as on a real node.
//! Its game neighbours are what the overlay would give it: the 16 nodes
//! nearest its first vnode on the ring (leaf set) and 16 random nodes of its
//! own zone (neighbourhood set, chosen by latency). Messages are delivered
//! synchronously, one exchange per round.
//!
//! Run: cold start (x = 1, one vnode each) until the game converges; then
//! load epochs: every node measures the share of the ring its vnodes own,
//! updates its load factor, and the loop re-converges. Optional churn makes
//! a share of the nodes leave without notice in the middle of the cold start.

use super::math::{equilibrium, max_rel_error, Player};
use super::node::GameNode;
use super::params::{sim_boards, BoardClass, GameSettings, NodeParams};
use crate::id::NodeId;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashMap;

/// Options of one simulation run.
#[derive(Clone, Debug, Serialize)]
pub struct GameSimOpts {
    pub nodes: usize,
    pub seed: u64,
    /// Rounds of the cold start.
    pub rounds: u32,
    /// Load epochs after the cold start.
    pub epochs: u32,
    /// Rounds per load epoch.
    pub epoch_rounds: u32,
    /// Share of nodes that leave at round `rounds / 2` of the cold start.
    pub churn: f64,
    /// Relative error counted as converged.
    pub tol: f64,
    /// Leaf-set size (half on each side) and neighbourhood-set size.
    pub leaf: usize,
    pub neighbourhood: usize,
}

impl Default for GameSimOpts {
    fn default() -> Self {
        GameSimOpts {
            nodes: 1000,
            seed: 1,
            rounds: 100,
            epochs: 10,
            epoch_rounds: 20,
            churn: 0.0,
            tol: 0.01,
            leaf: 16,
            neighbourhood: 16,
        }
    }
}

/// One zone of the simulated fleet and the mix of boards in it (weights per
/// entry of `sim_boards()`).
struct Zone {
    name: &'static str,
    mix: [f64; 4],
}

const ZONES: [Zone; 4] = [
    Zone {
        name: "factory",
        mix: [0.6, 0.3, 0.1, 0.0],
    },
    Zone {
        name: "campus",
        mix: [0.2, 0.5, 0.25, 0.05],
    },
    Zone {
        name: "depot",
        mix: [0.4, 0.4, 0.2, 0.0],
    },
    Zone {
        name: "metro-edge",
        mix: [0.0, 0.1, 0.4, 0.5],
    },
];

/// Per board class at the end of the run.
#[derive(Clone, Debug, Serialize)]
pub struct ClassReport {
    pub class: String,
    pub nodes: usize,
    pub capacity: f64,
    pub mean_ne_x: f64,
    pub mean_vnodes: f64,
    pub min_vnodes: u32,
    pub max_vnodes: u32,
    /// Mean key load relative to capacity, over the cluster mean (1 = fair).
    pub mean_load_ratio: f64,
    pub max_load_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ZoneReport {
    pub zone: String,
    pub nodes: usize,
    pub mean_load_ratio: f64,
    pub key_share: f64,
    pub capacity_share: f64,
}

/// One load epoch.
#[derive(Clone, Debug, Serialize)]
pub struct EpochReport {
    pub epoch: u32,
    /// Imbalance measured at the start of the epoch (what the nodes saw).
    pub imbalance: f64,
    /// Rounds until the error against the epoch's equilibrium stayed within
    /// tolerance (None: not within the epoch).
    pub rounds_to_converge: Option<u32>,
    pub max_rel_error: f64,
    pub vnode_changes: u64,
    /// Changes that undid the direction of the node's previous change.
    pub vnode_reversals: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChurnReport {
    pub at_round: u32,
    pub left: usize,
    pub anchor_left: bool,
    /// Rounds after the departures until the error against the new
    /// equilibrium stayed within tolerance.
    pub rounds_to_reconverge: Option<u32>,
}

/// What `capy sim game` prints.
#[derive(Clone, Debug, Serialize)]
pub struct GameReport {
    pub nodes: usize,
    pub seed: u64,
    pub settings: GameSettings,
    /// Cold start: rounds until every node stayed within `tol` of the exact
    /// equilibrium (None: not within the cold start).
    pub rounds_to_converge: Option<u32>,
    /// At the end of the cold start, against its equilibrium.
    pub cold_rel_error: f64,
    /// At the end of the run, against the equilibrium of the final
    /// parameters (load factors included).
    pub max_rel_error: f64,
    /// Key load / capacity, max over mean, one vnode per node.
    pub imbalance_before: f64,
    /// After the cold start, before any load was measured.
    pub imbalance_game_only: f64,
    /// At the end of the run.
    pub imbalance_after: f64,
    pub rounds_total: u32,
    pub price_ne: f64,
    /// Largest relative gap between a node's price estimate and the price.
    pub price_estimate_error: f64,
    pub vnodes_total: u64,
    pub vnode_changes: u64,
    pub vnode_reversals: u64,
    pub churn: Option<ChurnReport>,
    pub epochs: Vec<EpochReport>,
    pub classes: Vec<ClassReport>,
    pub zones: Vec<ZoneReport>,
    /// Per live node, for plots (`capy eval balance`); not printed.
    #[serde(skip)]
    pub per_node: Vec<NodeLoad>,
}

/// One node's key load relative to its capacity, over the cluster mean
/// (1 = fair), at the three points of the run.
#[derive(Clone, Debug, Serialize)]
pub struct NodeLoad {
    pub class: String,
    pub capacity: f64,
    pub vnodes: u32,
    /// One vnode each.
    pub before: f64,
    /// After the cold start, before any load was measured.
    pub game_only: f64,
    pub after: f64,
}

struct SimNode {
    game: GameNode,
    spki: Vec<u8>,
    class: usize,
    zone: usize,
    ids: Vec<u128>,
    alive: bool,
}

impl SimNode {
    fn vnode_ids(&mut self, k: u32) -> &[u128] {
        while self.ids.len() < k as usize {
            let i = self.ids.len() as u32;
            self.ids.push(NodeId::for_vnode(&self.spki, i).0);
        }
        &self.ids[..k as usize]
    }
}

struct Sim {
    nodes: Vec<SimNode>,
    index: HashMap<NodeId, usize>,
    settings: GameSettings,
    boards: Vec<BoardClass>,
    round: u32,
    changes: u64,
    reversals: u64,
    last_dir: Vec<i8>,
    rng: StdRng,
    opts: GameSimOpts,
}

impl Sim {
    fn new(opts: &GameSimOpts) -> Sim {
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let boards = sim_boards();
        let settings = GameSettings::for_fleet(opts.nodes);
        let mut nodes = Vec::with_capacity(opts.nodes);
        let mut index = HashMap::new();
        for i in 0..opts.nodes {
            let zone = rng.gen_range(0..ZONES.len());
            let class = pick(&ZONES[zone].mix, &mut rng);
            let spki = format!("sim-game-key/{}/{}", opts.seed, i).into_bytes();
            let id = NodeId::for_vnode(&spki, 0);
            let b = &boards[class];
            // The sim's boards are valid by construction; fall back to the
            // reference board rather than panic if one is ever edited badly.
            let params = NodeParams::new(b.capacity(), b.max_vnodes)
                .or_else(|_| NodeParams::new(1.0, 1))
                .unwrap_or(NodeParams {
                    capacity: 1.0,
                    max_vnodes: 1,
                    load_factor: 1.0,
                    background: 0.0,
                });
            index.insert(id, i);
            nodes.push(SimNode {
                game: GameNode::new(id, params, settings),
                spki,
                class,
                zone,
                ids: Vec::new(),
                alive: true,
            });
        }
        let mut sim = Sim {
            nodes,
            index,
            settings,
            boards,
            round: 0,
            changes: 0,
            reversals: 0,
            last_dir: vec![0; opts.nodes],
            rng,
            opts: opts.clone(),
        };
        sim.rewire();
        sim
    }

    fn alive(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].alive)
    }

    /// What the overlay gives each live node: leaf set by its first vnode's
    /// id and a neighbourhood set from its zone; and who the anchor is.
    fn rewire(&mut self) {
        let mut ring: Vec<(u128, usize)> = self
            .alive()
            .map(|i| (self.nodes[i].game.id().0, i))
            .collect();
        ring.sort_unstable();
        let n = ring.len();
        if n == 0 {
            return;
        }
        let mut by_zone: Vec<Vec<usize>> = vec![Vec::new(); ZONES.len()];
        for &(_, i) in &ring {
            by_zone[self.nodes[i].zone].push(i);
        }
        // The anchor serves the root of key 0: the id closest to 0.
        let zero = NodeId(0);
        let anchor = ring
            .iter()
            .map(|&(id, i)| (NodeId(id), i))
            .reduce(|a, b| if zero.closer(b.0, a.0) { b } else { a })
            .map(|(_, i)| i);
        let half = self.opts.leaf / 2;
        for (pos, &(_, i)) in ring.iter().enumerate() {
            let mut set: Vec<NodeId> = Vec::with_capacity(self.opts.leaf + self.opts.neighbourhood);
            for d in 1..=half.min(n.saturating_sub(1)) {
                set.push(NodeId(ring[(pos + d) % n].0));
                set.push(NodeId(ring[(pos + n - d) % n].0));
            }
            let zone = &by_zone[self.nodes[i].zone];
            for &j in zone.choose_multiple(&mut self.rng, self.opts.neighbourhood + 1) {
                if j != i && set.len() < self.opts.leaf + self.opts.neighbourhood {
                    set.push(self.nodes[j].game.id());
                }
            }
            let node = &mut self.nodes[i].game;
            node.set_anchor(Some(i) == anchor);
            node.set_neighbours(&set);
        }
    }

    /// One synchronous round: every live node sends, every message is
    /// handled, every node ticks.
    fn round(&mut self) {
        let mut inbox: Vec<(usize, NodeId, super::node::GameMsg)> = Vec::new();
        for i in self.alive() {
            let g = &self.nodes[i].game;
            for to in g.recipients() {
                let Some(&j) = self.index.get(&to) else {
                    continue;
                };
                if !self.nodes[j].alive {
                    continue;
                }
                if let Some(m) = g.round_msg(to) {
                    inbox.push((j, g.id(), m));
                }
            }
        }
        let now = u64::from(self.round) * 1_000_000;
        for (j, from, m) in inbox {
            // Peer tables have room for every node the overlay lists; a
            // refusal would only drop an edge, which the game tolerates.
            let _ = self.nodes[j].game.handle(now, from, m);
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive {
                let step = self.nodes[i].game.tick(now);
                if let Some(c) = step.change {
                    self.changes += 1;
                    let dir = if c.to > c.from { 1 } else { -1 };
                    if self.last_dir[i] == -dir {
                        self.reversals += 1;
                    }
                    self.last_dir[i] = dir;
                }
            }
        }
        self.round += 1;
    }

    fn players(&self) -> Vec<Player> {
        self.alive()
            .map(|i| {
                let p = self.nodes[i].game.params();
                Player {
                    q: p.q(&self.settings),
                    l: p.l(&self.settings),
                    s: p.s(),
                }
            })
            .collect()
    }

    fn ne(&self) -> Vec<f64> {
        equilibrium(&self.players(), self.settings.r, self.settings.eps)
    }

    fn xs(&self) -> Vec<f64> {
        self.alive().map(|i| self.nodes[i].game.x()).collect()
    }

    fn error(&self, ne: &[f64]) -> f64 {
        max_rel_error(&self.xs(), ne)
    }

    /// Key share of each live node (fraction of the ring it is root for),
    /// given vnode counts.
    fn shares(&mut self, counts: &[u32]) -> Vec<f64> {
        let live: Vec<usize> = self.alive().collect();
        let mut ring: Vec<(u128, usize)> = Vec::new();
        for (k, &i) in live.iter().enumerate() {
            for &id in self.nodes[i].vnode_ids(counts[k]) {
                ring.push((id, k));
            }
        }
        ring.sort_unstable();
        let mut share = vec![0.0; live.len()];
        let n = ring.len();
        let scale = 2f64.powi(-128);
        for p in 0..n {
            let (id, k) = ring[p];
            let prev = ring[(p + n - 1) % n].0;
            let next = ring[(p + 1) % n].0;
            // The root of a key is the closest vnode: half of each gap.
            let gap_prev = if n == 1 {
                u128::MAX
            } else {
                id.wrapping_sub(prev)
            };
            let gap_next = if n == 1 { 0 } else { next.wrapping_sub(id) };
            share[k] += (gap_prev as f64 + gap_next as f64) * 0.5 * scale;
        }
        share
    }

    fn counts(&self) -> Vec<u32> {
        self.alive().map(|i| self.nodes[i].game.vnodes()).collect()
    }

    fn capacities(&self) -> Vec<f64> {
        self.alive()
            .map(|i| self.nodes[i].game.params().capacity)
            .collect()
    }

    /// (shares, load/capacity ratios over their mean, imbalance).
    fn load(&mut self, counts: &[u32]) -> (Vec<f64>, Vec<f64>, f64) {
        let share = self.shares(counts);
        let caps = self.capacities();
        let ratio: Vec<f64> = share.iter().zip(&caps).map(|(s, c)| s / c).collect();
        let mean = ratio.iter().sum::<f64>() / ratio.len().max(1) as f64;
        let rel: Vec<f64> = ratio.iter().map(|r| r / mean).collect();
        let imb = rel.iter().cloned().fold(0.0, f64::max);
        (share, rel, imb)
    }

    /// Runs `rounds` rounds against `ne`; returns the rounds until the error
    /// stayed within tolerance, and the final error.
    fn run_until(&mut self, rounds: u32, ne: &[f64]) -> (Option<u32>, f64) {
        let mut last_bad: Option<u32> = None;
        let mut err = self.error(ne);
        if err > self.opts.tol {
            last_bad = Some(0);
        }
        for r in 1..=rounds {
            self.round();
            err = self.error(ne);
            if err > self.opts.tol {
                last_bad = Some(r);
            }
        }
        let conv = match last_bad {
            None => Some(0),
            Some(r) if r < rounds => Some(r + 1),
            Some(_) => None,
        };
        (conv, err)
    }
}

fn pick(weights: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut t = rng.gen::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if t < *w {
            return i;
        }
        t -= w;
    }
    weights.len() - 1
}

/// Runs the game simulation described by `opts`.
pub fn run_game_sim(opts: &GameSimOpts) -> GameReport {
    let mut sim = Sim::new(opts);
    let ones = vec![1u32; opts.nodes];
    let (_, rel_before, imbalance_before) = sim.load(&ones);

    // Cold start, with the optional departures half way.
    let ne0 = sim.ne();
    let mut churn = None;
    let (rounds_to_converge, cold_rel_error) = if opts.churn > 0.0 && opts.nodes > 1 {
        let at = opts.rounds / 2;
        let _ = sim.run_until(at, &ne0);
        let live: Vec<usize> = sim.alive().collect();
        let leave = ((live.len() as f64 * opts.churn).round() as usize).min(live.len() - 1);
        let anchor_before = live
            .iter()
            .copied()
            .find(|&i| sim.nodes[i].game.status().anchor);
        let gone: Vec<usize> = live.choose_multiple(&mut sim.rng, leave).copied().collect();
        for &i in &gone {
            sim.nodes[i].alive = false;
        }
        sim.rewire();
        let ne1 = sim.ne();
        let (conv, err) = sim.run_until(opts.rounds - at, &ne1);
        churn = Some(ChurnReport {
            at_round: at,
            left: leave,
            anchor_left: anchor_before.is_some_and(|a| !sim.nodes[a].alive),
            rounds_to_reconverge: conv,
        });
        (conv.map(|c| c + at), err)
    } else {
        sim.run_until(opts.rounds, &ne0)
    };
    let counts = sim.counts();
    let (_, rel_game_only, imbalance_game_only) = sim.load(&counts);
    // Nodes that left during the cold start have no later load.
    let live_then: Vec<usize> = sim.alive().collect();

    // Load epochs: measure, update load factors, re-converge.
    let mut epochs = Vec::new();
    let mut err = cold_rel_error;
    for e in 0..opts.epochs {
        let counts = sim.counts();
        let (share, _, imb) = sim.load(&counts);
        let live: Vec<usize> = sim.alive().collect();
        for (k, &i) in live.iter().enumerate() {
            sim.nodes[i].game.observe_load(share[k]);
        }
        let ne = sim.ne();
        let (before, rev_before) = (sim.changes, sim.reversals);
        let (conv, e_err) = sim.run_until(opts.epoch_rounds, &ne);
        err = e_err;
        epochs.push(EpochReport {
            epoch: e + 1,
            imbalance: imb,
            rounds_to_converge: conv,
            max_rel_error: e_err,
            vnode_changes: sim.changes - before,
            vnode_reversals: sim.reversals - rev_before,
        });
    }

    let ne = sim.ne();
    let counts = sim.counts();
    let (share, rel, imbalance_after) = sim.load(&counts);
    let price_ne = sim.settings.r - sim.settings.eps * ne.iter().sum::<f64>();
    let price_estimate_error = sim
        .alive()
        .map(|i| match sim.nodes[i].game.price() {
            Some(p) => (p - price_ne).abs() / price_ne.abs().max(1e-9),
            None => f64::INFINITY,
        })
        .fold(0.0, f64::max);

    let live: Vec<usize> = sim.alive().collect();
    let caps = sim.capacities();
    let total_cap: f64 = caps.iter().sum();
    let mut classes = Vec::new();
    for (c, b) in sim.boards.iter().enumerate() {
        let ks: Vec<usize> = (0..live.len())
            .filter(|&k| sim.nodes[live[k]].class == c)
            .collect();
        if ks.is_empty() {
            continue;
        }
        let n = ks.len() as f64;
        classes.push(ClassReport {
            class: b.name.to_string(),
            nodes: ks.len(),
            capacity: b.capacity(),
            mean_ne_x: ks.iter().map(|&k| ne[k]).sum::<f64>() / n,
            mean_vnodes: ks.iter().map(|&k| f64::from(counts[k])).sum::<f64>() / n,
            min_vnodes: ks.iter().map(|&k| counts[k]).min().unwrap_or(0),
            max_vnodes: ks.iter().map(|&k| counts[k]).max().unwrap_or(0),
            mean_load_ratio: ks.iter().map(|&k| rel[k]).sum::<f64>() / n,
            max_load_ratio: ks.iter().map(|&k| rel[k]).fold(0.0, f64::max),
        });
    }
    let mut zones = Vec::new();
    for (z, zone) in ZONES.iter().enumerate() {
        let ks: Vec<usize> = (0..live.len())
            .filter(|&k| sim.nodes[live[k]].zone == z)
            .collect();
        if ks.is_empty() {
            continue;
        }
        zones.push(ZoneReport {
            zone: zone.name.to_string(),
            nodes: ks.len(),
            mean_load_ratio: ks.iter().map(|&k| rel[k]).sum::<f64>() / ks.len() as f64,
            key_share: ks.iter().map(|&k| share[k]).sum(),
            capacity_share: ks.iter().map(|&k| caps[k]).sum::<f64>() / total_cap,
        });
    }

    let per_node = live
        .iter()
        .enumerate()
        .map(|(k, &i)| NodeLoad {
            class: sim.boards[sim.nodes[i].class].name.to_string(),
            capacity: caps[k],
            vnodes: counts[k],
            before: rel_before.get(i).copied().unwrap_or(f64::NAN),
            game_only: live_then
                .iter()
                .position(|&j| j == i)
                .and_then(|p| rel_game_only.get(p).copied())
                .unwrap_or(f64::NAN),
            after: rel[k],
        })
        .collect();
    GameReport {
        per_node,
        nodes: opts.nodes,
        seed: opts.seed,
        settings: sim.settings,
        rounds_to_converge,
        cold_rel_error,
        max_rel_error: err,
        imbalance_before,
        imbalance_game_only,
        imbalance_after,
        rounds_total: sim.round,
        price_ne,
        price_estimate_error,
        vnodes_total: counts.iter().map(|&c| u64::from(c)).sum(),
        vnode_changes: sim.changes,
        vnode_reversals: sim.reversals,
        churn,
        epochs,
        classes,
        zones,
    }
}

/// Runs the simulation and prints its report, as JSON or as text; returns
/// the process exit code.
pub fn print_game_sim(opts: &GameSimOpts, json: bool) -> i32 {
    if opts.nodes < 2 || opts.nodes > 1_000_000 {
        eprintln!(
            "capy sim game: --nodes must be in 2..=1000000, got {}",
            opts.nodes
        );
        return 2;
    }
    if !(0.0..1.0).contains(&opts.churn) || opts.tol.is_nan() || opts.tol <= 0.0 {
        eprintln!("capy sim game: --churn must be in [0, 1) and --tol > 0");
        return 2;
    }
    let rep = run_game_sim(opts);
    if json {
        return crate::cli::print_json(&rep);
    }
    let opt = |v: Option<u32>| v.map_or("not reached".to_string(), |r| r.to_string());
    println!("capy sim game: {} nodes, seed {}", rep.nodes, rep.seed);
    println!(
        "  settings            R = {}, eps = {:.3e}, q0 = {}",
        rep.settings.r, rep.settings.eps, rep.settings.q0
    );
    println!("  rounds_to_converge  {}", opt(rep.rounds_to_converge));
    println!("  cold_rel_error      {:.2e}", rep.cold_rel_error);
    println!("  max_rel_error       {:.2e}", rep.max_rel_error);
    println!("  imbalance_before    {:.3}", rep.imbalance_before);
    println!("  imbalance_game_only {:.3}", rep.imbalance_game_only);
    println!("  imbalance_after     {:.3}", rep.imbalance_after);
    println!(
        "  price at NE         {:.3} (estimates within {:.1e})",
        rep.price_ne, rep.price_estimate_error
    );
    println!(
        "  vnodes              {} total, {} changes ({} reversals) in {} rounds",
        rep.vnodes_total, rep.vnode_changes, rep.vnode_reversals, rep.rounds_total
    );
    if let Some(c) = &rep.churn {
        println!(
            "  churn               {} left at round {} (anchor left: {}), re-converged in {}",
            c.left,
            c.at_round,
            c.anchor_left,
            opt(c.rounds_to_reconverge)
        );
    }
    for e in &rep.epochs {
        println!(
            "  epoch {:>2}            imbalance {:.3}, converged in {}, error {:.1e}, {} vnode changes ({} reversals)",
            e.epoch,
            e.imbalance,
            opt(e.rounds_to_converge),
            e.max_rel_error,
            e.vnode_changes,
            e.vnode_reversals
        );
    }
    println!("  class        nodes  cap   NE x   vnodes(min..max)   load/cap mean  max");
    for c in &rep.classes {
        println!(
            "  {:<12} {:>5} {:>5.2} {:>6.1} {:>6.1} ({}..{}) {:>12.3} {:>5.3}",
            c.class,
            c.nodes,
            c.capacity,
            c.mean_ne_x,
            c.mean_vnodes,
            c.min_vnodes,
            c.max_vnodes,
            c.mean_load_ratio,
            c.max_load_ratio
        );
    }
    for z in &rep.zones {
        println!(
            "  zone {:<11} {:>5} nodes, key share {:.3}, capacity share {:.3}",
            z.zone, z.nodes, z.key_share, z.capacity_share
        );
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(nodes: usize, seed: u64) -> GameSimOpts {
        GameSimOpts {
            nodes,
            seed,
            ..GameSimOpts::default()
        }
    }

    #[test]
    fn converges_to_the_exact_equilibrium_and_evens_load() {
        let rep = run_game_sim(&GameSimOpts {
            epochs: 6,
            ..opts(300, 3)
        });
        let conv = rep.rounds_to_converge.expect("cold start converges");
        assert!(conv <= 100, "{conv} rounds");
        assert!(rep.cold_rel_error < 1e-3, "{}", rep.cold_rel_error);
        assert!(rep.max_rel_error < 0.01, "{}", rep.max_rel_error);
        assert!(rep.price_estimate_error < 0.01);
        // One vnode each leaves some node many times its fair load.
        assert!(rep.imbalance_before > 3.0, "{}", rep.imbalance_before);
        assert!(rep.imbalance_after < 1.5, "{}", rep.imbalance_after);
        assert!(rep.imbalance_after < rep.imbalance_game_only);
        // Counts follow capacity: each class runs more than the one below.
        let means: Vec<f64> = rep.classes.iter().map(|c| c.mean_vnodes).collect();
        assert!(means.windows(2).all(|w| w[0] < w[1]), "{means:?}");
        // Each zone holds about its capacity share of the keys.
        for z in &rep.zones {
            assert!((z.key_share - z.capacity_share).abs() < 0.1 * z.capacity_share + 0.01);
        }
    }

    #[test]
    fn keeps_converging_when_a_tenth_of_the_nodes_leave() {
        let rep = run_game_sim(&GameSimOpts {
            churn: 0.1,
            epochs: 0,
            ..opts(300, 5)
        });
        let c = rep.churn.expect("churn ran");
        assert_eq!(c.left, 30);
        let re = c.rounds_to_reconverge.expect("re-converges");
        assert!(re <= 40, "{re} rounds after the departures");
        assert!(rep.cold_rel_error < 0.01, "{}", rep.cold_rel_error);
    }

    #[test]
    fn survives_the_anchor_leaving() {
        let mut sim = Sim::new(&opts(200, 9));
        let ne = sim.ne();
        let _ = sim.run_until(40, &ne);
        let anchor = sim
            .alive()
            .find(|&i| sim.nodes[i].game.status().anchor)
            .expect("one anchor");
        sim.nodes[anchor].alive = false;
        for i in (0..sim.nodes.len()).step_by(10).take(19) {
            sim.nodes[i].alive = false;
        }
        sim.rewire();
        let live = sim.alive().count();
        let ne = sim.ne();
        let (conv, err) = sim.run_until(60, &ne);
        assert!(conv.is_some_and(|c| c <= 40), "{conv:?}");
        assert!(err < 1e-3, "{err}");
        for i in sim.alive() {
            let n = sim.nodes[i].game.estimates().nodes.expect("N estimated");
            assert!(
                (n - live as f64).abs() < 0.01 * live as f64,
                "{n} vs {live}"
            );
        }
    }

    #[test]
    fn same_seed_same_report() {
        let a = run_game_sim(&GameSimOpts {
            epochs: 1,
            rounds: 30,
            ..opts(50, 1)
        });
        let b = run_game_sim(&GameSimOpts {
            epochs: 1,
            rounds: 30,
            ..opts(50, 1)
        });
        assert_eq!(a.imbalance_after, b.imbalance_after);
        assert_eq!(a.max_rel_error, b.max_rel_error);
    }
}

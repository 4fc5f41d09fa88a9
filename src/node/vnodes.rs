//! How many vnodes this node runs: the vnode game (src/game) decides, an
//! operator may pin a count instead, and this module carries the decision
//! out on the overlay. A new vnode joins with its certified id and the
//! store's anti-entropy moves its keys to it; a vnode that goes leaves the
//! overlay gracefully and the hand-off keeps every key on its new replica
//! set before any local copy is dropped (the store deletes only after the
//! new holders confirmed).

use super::runtime::{Node, Wire};
use crate::game::{GameMsg, GameNode, GameSettings, GameStatus, NodeParams};
use crate::id::{NodeHandle, NodeId};
use crate::overlay::{self, Pastry};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Who decides the vnode count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The vnode game.
    Auto,
    /// A fixed count set by the operator.
    Pinned(u32),
}

pub struct VnodeControl {
    pub game: GameNode,
    pub mode: Mode,
    /// Vnode-0 id of each peer address, learnt from their certificates.
    peer_ids: HashMap<SocketAddr, NodeId>,
    addrs: HashMap<NodeId, SocketAddr>,
    pub changes: u64,
}

#[derive(Serialize)]
pub struct VnodeStatus {
    pub mode: Mode,
    pub running: usize,
    pub changes: u64,
    #[serde(flatten)]
    pub game: GameStatus,
}

impl VnodeControl {
    pub fn new(
        id: NodeId,
        capacity: f64,
        max_vnodes: u32,
        fleet: usize,
        mode: Mode,
    ) -> VnodeControl {
        let params = NodeParams::new(capacity, max_vnodes.max(1)).unwrap_or(NodeParams {
            capacity: 1.0,
            max_vnodes: max_vnodes.max(1),
            load_factor: 1.0,
            background: 0.0,
        });
        VnodeControl {
            game: GameNode::new(id, params, GameSettings::for_fleet(fleet)),
            mode,
            peer_ids: HashMap::new(),
            addrs: HashMap::new(),
            changes: 0,
        }
    }

    /// Remembers whose vnode-0 id sits behind an address (bounded).
    pub fn learn_peer(&mut self, addr: SocketAddr, id: NodeId) {
        if self.peer_ids.len() >= 4096 && !self.peer_ids.contains_key(&addr) {
            return;
        }
        if let Some(old) = self.peer_ids.insert(addr, id) {
            if old != id {
                self.addrs.remove(&old);
            }
        }
        self.addrs.insert(id, addr);
    }
}

/// The share of the ring this node's vnodes are root of: for each vnode,
/// half the gap to its ring predecessor plus half the gap to its successor.
fn ring_share(vnodes: &std::collections::BTreeMap<NodeId, Pastry>) -> f64 {
    let mut total = 0.0;
    for p in vnodes.values() {
        let me = p.me().id;
        let (left, right) = p.leaf_sides();
        let (Some(pred), Some(succ)) = (left.first(), right.first()) else {
            // Alone on the ring: all of it.
            return 1.0;
        };
        let gap = |a: NodeId, b: NodeId| a.cw(b) as f64 / 2f64.powi(128);
        total += gap(pred.id, me) / 2.0 + gap(me, succ.id) / 2.0;
    }
    total.min(1.0)
}

impl Node {
    /// One round of the vnode game: exchange estimates with the overlay's
    /// neighbours, step, and apply the count it settles on.
    pub async fn game_loop(self: Arc<Self>, every: Duration) {
        loop {
            smol::Timer::after(every).await;
            if self.is_stopping() {
                return;
            }
            let (neighbours, anchor, share) = {
                let cores = self.lock();
                let mut addrs: Vec<SocketAddr> = Vec::new();
                for p in cores.vnodes.values() {
                    addrs.extend(p.leaf_set().iter().map(|h| h.addr));
                    addrs.extend(p.neighbours().iter().map(|(h, _)| h.addr));
                }
                addrs.retain(|a| *a != self.quic);
                addrs.sort();
                addrs.dedup();
                let anchor = cores
                    .vnodes
                    .values()
                    .any(|p| p.joined() && p.is_root(NodeId(0)));
                (addrs, anchor, ring_share(&cores.vnodes))
            };
            let (msgs, target) = {
                let Ok(mut vc) = self.vnode_control.lock() else {
                    return;
                };
                let ids: Vec<NodeId> = neighbours
                    .iter()
                    .filter_map(|a| vc.peer_ids.get(a).copied())
                    .collect();
                vc.game.set_neighbours(&ids);
                vc.game.set_anchor(anchor);
                vc.game.observe_load(share);
                let msgs: Vec<(NodeHandle, GameMsg)> = vc
                    .game
                    .recipients()
                    .filter_map(|to| {
                        let addr = *vc.addrs.get(&to)?;
                        Some((NodeHandle { id: to, addr }, vc.game.round_msg(to)?))
                    })
                    .collect();
                let step = vc.game.tick(self.now());
                let target = match vc.mode {
                    Mode::Auto => step.change.map(|c| c.to),
                    Mode::Pinned(n) => Some(n),
                };
                (msgs, target)
            };
            let from = self.identity_vnodes[0];
            for (to, m) in msgs {
                self.spawn_send(from, to, Wire::Game(m));
            }
            if let Some(n) = target {
                self.set_vnode_count(n);
            }
        }
    }

    /// A game message from a peer's vnode 0.
    pub(crate) fn game_message(&self, from: NodeId, msg: GameMsg) {
        let Ok(mut vc) = self.vnode_control.lock() else {
            return;
        };
        if let Err(e) = vc.game.handle(self.now(), from, msg) {
            tracing::debug!(from = %from.short(), "game message refused: {e}");
        }
    }

    pub(crate) fn learn_peer(&self, addr: SocketAddr, id: NodeId) {
        if let Ok(mut vc) = self.vnode_control.lock() {
            if vc.peer_ids.get(&addr) != Some(&id) {
                vc.learn_peer(addr, id);
            }
        }
    }

    /// Pins the count (`Some(n)`) or hands it back to the game (`None`).
    pub fn pin_vnodes(self: &Arc<Self>, n: Option<u32>) -> Result<u32, String> {
        let max = self.max_vnodes_allowed();
        let mode = match n {
            Some(0) => return Err("a node runs at least one vnode".into()),
            Some(n) if n > max => {
                return Err(format!(
                    "{n} vnodes asked, this node may run at most {max} (certificate and board)"
                ))
            }
            Some(n) => Mode::Pinned(n),
            None => Mode::Auto,
        };
        if let Ok(mut vc) = self.vnode_control.lock() {
            vc.mode = mode;
        }
        if let Some(n) = n {
            self.set_vnode_count(n);
        }
        Ok(self.lock().vnodes.len() as u32)
    }

    pub fn max_vnodes_allowed(&self) -> u32 {
        (self.identity_vnodes.len() as u32)
            .min(self.cfg.max_vnodes)
            .max(1)
    }

    /// Starts or stops vnodes until `n` run. Vnode 0 always stays: it is the
    /// node's name in the game and on the wire.
    pub fn set_vnode_count(self: &Arc<Self>, n: u32) {
        let n = n.clamp(1, self.max_vnodes_allowed()) as usize;
        let mut changed = false;
        self.drive(|node, cores, ctx| {
            let now = node.now();
            let have = cores.vnodes.len();
            if n > have {
                let Some(&first) = node.identity_vnodes.first() else {
                    return;
                };
                let via = NodeHandle {
                    id: first,
                    addr: node.quic,
                };
                let joined = cores.vnodes.get(&first).is_some_and(|p| p.joined());
                if !joined {
                    return;
                }
                let template = cores.vnodes.get(&first).map(|p| p.config().clone());
                let fresh: Vec<NodeId> = node
                    .identity_vnodes
                    .iter()
                    .filter(|id| !cores.vnodes.contains_key(id))
                    .take(n - have)
                    .copied()
                    .collect();
                for id in fresh {
                    let cfg = overlay::Config {
                        seed: rand::random(),
                        ..template.clone().unwrap_or_default()
                    };
                    let mut p = Pastry::new(
                        NodeHandle {
                            id,
                            addr: node.quic,
                        },
                        cfg,
                    );
                    let acts = p.join(now, via);
                    cores.vnodes.insert(id, p);
                    node.overlay_actions(cores, id, acts, ctx);
                    tracing::info!(vnode = %id.short(), "starting a vnode");
                    changed = true;
                }
            } else if n < have {
                // The highest-numbered vnodes go first.
                let going: Vec<NodeId> = node
                    .identity_vnodes
                    .iter()
                    .rev()
                    .filter(|id| cores.vnodes.contains_key(id) && **id != node.identity_vnodes[0])
                    .take(have - n)
                    .copied()
                    .collect();
                for id in going {
                    if let Some(mut p) = cores.vnodes.remove(&id) {
                        let acts = p.leave(now);
                        for a in acts {
                            if let overlay::Action::Send { to, msg } = a {
                                ctx_send(ctx, id, to, msg);
                            }
                        }
                        tracing::info!(vnode = %id.short(), "stopping a vnode");
                        changed = true;
                    }
                }
            }
            if changed {
                cores.replica.membership_changed();
            }
        });
        if changed {
            if let Ok(mut vc) = self.vnode_control.lock() {
                vc.changes += 1;
            }
            self.metrics.vnode_changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn vnode_status(&self) -> Option<VnodeStatus> {
        let running = self.lock().vnodes.len();
        let vc = self.vnode_control.lock().ok()?;
        Some(VnodeStatus {
            mode: vc.mode,
            running,
            changes: vc.changes,
            game: vc.game.status(),
        })
    }
}

/// A departing vnode's goodbye: sent from its own id even though it no
/// longer runs, which its certificate still allows.
fn ctx_send(ctx: &mut super::runtime::Ctx, from: NodeId, to: NodeHandle, msg: overlay::Msg) {
    ctx.push_send(from, to, Wire::Overlay(msg));
}

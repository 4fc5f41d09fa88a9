//! Game: the sans-IO Nash-equilibrium loop that sets how many vnodes this
//! node offers.
//!
//! Owns: the game's algebra and exact equilibrium (`math`), the mapping from
//! board profile and measured load to cost parameters (`params`), one node's
//! player (`node`: estimates, Metropolis mixing, projected gradient step,
//! damped vnode count) and the game simulator (`sim`). Calls only `crate::id`;
//! the node runtime feeds it neighbours, messages, load and rounds.
//!
//! The game: node i offers x_i in [0, S_i] vnodes at cost Q_i x_i^2 + L_i x_i
//! and is paid p = R - eps * sum_j x_j per vnode; it minimises
//! J_i = Q_i x_i^2 + L_i x_i - p x_i.
//!
//! Mapping (see `params`):
//! * c_i, capacity: geometric mean of the board profile's storage and CPU
//!   relative to the reference board (Pi 4 with SSD = 1).
//! * a_i, load factor: the node's measured share of the key space divided by
//!   the cluster's mean share per vnode (1 / estimated vnode total), per
//!   vnode served; 1 until measured, smoothed, held to [0.25, 4].
//! * u_i, background load: share of the box busy with other work, [0, 1).
//! * Q_i = q0 * a_i / c_i: serving is dearer on weak boards and for vnodes
//!   that happen to own wide arcs. With L = 0 the equilibrium gives
//!   x_i ~ c_i / a_i, i.e. key load a_i x_i proportional to capacity.
//! * L_i = R * u_i: a box busy with its own job offers fewer vnodes and, at
//!   u = 1, none.
//! * S_i = min(certificate's max vnodes, board profile's max vnodes).
//! * R, eps, q0: cluster settings; `GameSettings::for_fleet(n)` gives
//!   R = 80, q0 = 1, eps = 1.4 / n, for counts of about 8 (Pi 3) to 90 (x86).

pub mod math;
pub mod node;
pub mod params;
pub mod sim;

pub use math::{equilibrium, max_rel_error, Player};
pub use node::{Estimates, GameMsg, GameMsgError, GameNode, GameStatus, GameStep, VnodeChange};
pub use params::{BoardClass, GameSettings, NodeParams, ParamError};
pub use sim::{print_game_sim, run_game_sim, GameReport, GameSimOpts};

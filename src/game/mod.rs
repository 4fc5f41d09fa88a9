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
//! * a_i, load factor: an integral of the measured load relative to
//!   capacity. rho_i = (node's share of the keys) / (c_i / sum_j c_j), with
//!   sum_j c_j from the estimates; each measurement multiplies a_i by
//!   rho_i^0.5, outside a dead band of half a vnode's worth of load. 1 until
//!   measured, held to [0.25, 4].
//! * u_i, background load: share of the box busy with other work, [0, 1).
//! * Q_i = q0 * a_i / c_i: serving is dearer on weak boards and on nodes
//!   that already hold more than their share (their vnodes happen to own
//!   wide arcs). With L = 0 the equilibrium gives x_i ~ c_i / a_i, and the
//!   load controller settles where key load follows capacity.
//! * L_i = R * u_i: a box busy with its own job offers fewer vnodes and, at
//!   u = 1, none.
//! * S_i = min(certificate's max vnodes, board profile's max vnodes).
//! * R, eps, q0: cluster settings; `GameSettings::for_fleet(n)` gives
//!   R = 128, q0 = 1, eps = 1.4 / n: counts of about 12 (Pi 3 on SD) to 140
//!   (x86 gateway); fewer vnodes on the weakest boards leave their key share
//!   at the mercy of a few random arcs.
//!
//! Vnode count: round(x_i) with hysteresis (0.8 vnode), a dwell of 3 rounds,
//! no change while x still moves by over 2% a round, and a memory of the
//! load measured at recent counts so a count known to be worse is not taken
//! again. At least 1, at most S_i.

pub mod math;
pub mod node;
pub mod params;
pub mod sim;

pub use math::{equilibrium, max_rel_error, Player};
pub use node::{Estimates, GameMsg, GameMsgError, GameNode, GameStatus, GameStep, VnodeChange};
pub use params::{BoardClass, GameSettings, NodeParams, ParamError};
pub use sim::{print_game_sim, run_game_sim, GameReport, GameSimOpts};

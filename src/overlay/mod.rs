//! Overlay: a sans-IO Pastry core (routing table, leaf set, neighbourhood
//! set, join, route-to-root, probes, repair, leave). It never touches a
//! socket, clock or file; the node runtime and the simulator feed it.
//! It may call only `crate::id`; the runtime carries out its [`Action`]s.
//! [`scribe`] builds multicast trees on the routes Pastry chooses (sans-IO
//! as well; it asks the overlay for next hops through a small trait).
//!
//! One [`Pastry`] per vnode; the runtime dispatches by vnode id (an address
//! may serve several vnodes). The `from` handle given to [`Pastry::handle`]
//! is trusted: the transport checked it against the peer's certificate.
//! Handles inside messages are hearsay: they never overwrite what a node
//! said about itself, and once joined a node enters the leaf set only after
//! it answered a probe itself.
//!
//! Choices beyond textbook Pastry (b = 4):
//! - a routing-table slot keeps up to `slot_entries` (2) entries, the
//!   lowest-RTT candidates measured; a route picks among them the one
//!   sharing the longest prefix with the key, then the numerically closest.
//!   This cuts mean hops by about 6 % at 10^4..10^5 nodes while keeping
//!   proximity, and leaves a spare when one fails;
//! - RTT probes carry their send time and a keyed tag instead of per-probe
//!   state; an answer may ask for a probe back, so both ends measure;
//! - keep-alives go only to leaf-set members not heard from lately (any
//!   message counts), so each pair is probed about once per interval;
//! - the runtime must call [`Pastry::tick`] at least every
//!   `probe_interval / 4` and report undeliverable sends with
//!   [`Pastry::send_failed`].

mod pastry;
pub mod scribe;
mod table;
mod wire;

pub use pastry::{
    Action, Config, ConfigError, Pastry, RouteError, MAX_CANDIDATE_PROBES, MAX_NEIGHBOURS,
};
pub use wire::{
    Bounded, JoinList, LeafList, Msg, Payload, RowList, Stamp, WireError, MAX_FRAME,
    MAX_JOIN_ENTRIES, MAX_LEAF_SET, MAX_PAYLOAD, MAX_ROW, MAX_SLOT_ENTRIES,
};

#[cfg(test)]
mod tests;

//! Overlay: a sans-IO Pastry core (routing table, leaf set, neighbourhood
//! set, join, route-to-root, probes, repair, leave). It never touches a
//! socket, clock or file; the node runtime and the simulator feed it.
//! It may call only `crate::id`; the runtime owns delivery of [`Action`]s.
//!
//! One [`Pastry`] per vnode. Ids come from certificates, so the `from`
//! handle passed to [`Pastry::handle`] is trusted (the transport checked
//! it); handles inside messages are second-hand and never overwrite what a
//! node said about itself.

mod pastry;
mod table;
mod wire;

pub use pastry::{Action, Config, ConfigError, Pastry, RouteError, MAX_NEIGHBOURS};
pub use wire::{
    Bounded, JoinList, LeafList, Msg, Payload, RowList, Stamp, WireError, MAX_FRAME,
    MAX_JOIN_ENTRIES, MAX_LEAF_SET, MAX_PAYLOAD, MAX_ROW, MAX_SLOT_ENTRIES,
};

#[cfg(test)]
mod tests;

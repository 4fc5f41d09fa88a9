//! Simulator: the same protocol cores on a virtual network with a zone
//! latency model, in virtual time, in one process: the overlay (`capy
//! sim`) and subscriptions through Scribe trees against polling (`capy sim
//! subscribe`).
//! It may call the protocol cores (`overlay`) and `id`; it never opens a
//! socket or reads a clock inside a core (wall time is only measured
//! around a run, for the report).

mod overlay;
mod queue;
mod subscribe;

pub use overlay::{print_overlay, run_overlay, OverlayReport, OverlaySimOpts};
pub use subscribe::{
    print_subscribe, run_subscribe, Latency, RepairReport, SubscribeReport, SubscribeRow,
    SubscribeSimOpts,
};

#[cfg(test)]
mod tests;

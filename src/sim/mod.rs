//! Simulator: the same protocol cores on a virtual network with a zone
//! latency model, in virtual time, in one process: the overlay (`capy
//! sim`) and subscriptions through Scribe trees against polling (`capy sim
//! subscribe`).
//! It may call the protocol cores (`overlay`) and `id`; it never opens a
//! socket or reads a clock inside a core (wall time is only measured
//! around a run, for the report). `eval` (the paper's evaluations) also
//! drives the replication core, the vnode game's simulator and the
//! handler engine with the shipped policies, in virtual time; only its
//! `fnrecovery` runs real `capy` processes and podman (wall-clock time).

pub mod eval;
pub mod net;
mod overlay;
mod queue;
pub mod store;
mod subscribe;

pub use overlay::{
    print_overlay, run_overlay, run_recovery, OverlayReport, OverlaySimOpts, RecoveryReport,
};
pub use subscribe::{
    print_subscribe, run_subscribe, Latency, RepairReport, SubscribeReport, SubscribeRow,
    SubscribeSimOpts,
};

#[cfg(test)]
mod tests;

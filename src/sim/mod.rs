//! Simulator: the same protocol cores on a virtual network with a zone
//! latency model, in virtual time, in one process.
//! It may call the protocol cores (`overlay`) and `id`; it never opens a
//! socket or reads a clock inside a core (wall time is only measured
//! around a run, for the report).

mod overlay;
mod queue;

pub use overlay::{print_overlay, run_overlay, OverlayReport, OverlaySimOpts};

#[cfg(test)]
mod tests;

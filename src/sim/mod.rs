//! Simulator: the same protocol cores on a virtual network with a zone
//! latency model, in virtual time, in one process.

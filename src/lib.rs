//! capy: one executable that turns a fleet of edge gateways into a
//! decentralised, programmable object store and function host.
//!
//! The parts, bottom up (arrows point down only; `node` wires them):
//! `transport` (QUIC + mutual TLS, the admin CA), `game` (how many vnodes a
//! node offers), `overlay` (Pastry), `store` (redb + replication),
//! `containers` (podman), `handlers` (sandboxed Lua), `objects` (classes and
//! invocations), `http` (the node's HTTP server), `node` (the runtime), `sim`
//! (the same protocol cores in virtual time) and `cli`.

pub mod id;

pub mod cli;
pub mod containers;
pub mod game;
pub mod handlers;
pub mod http;
pub mod node;
pub mod objects;
pub mod overlay;
pub mod sim;
pub mod stats;
pub mod store;
pub mod transport;

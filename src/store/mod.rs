//! Store: redb buckets on each node, and the sans-IO replication core that
//! places every key on its root and the root's closest leaf-set neighbours.
//!
//! Owns: the on-disk record format ([`entry`]), the redb backend with its
//! group-commit writer ([`db`]), an in-memory backend for tests and the
//! simulator ([`mem`]) and the replication state machine ([`replica`]).
//! May call: `crate::id` only. It never imports the overlay: the runtime
//! hands it replica sets as lists of `NodeHandle`s, closest (the root) first.
//!
//! How the runtime drives it: feed every [`StoreMsg`] to
//! [`Replicator::handle`]; call [`Replicator::tick`] and
//! [`Replicator::maintain`] every ~100 ms, and
//! [`Replicator::membership_changed`] on every leaf-set change; carry out
//! the returned [`Action`]s: `Send` directly, `Route` via the overlay,
//! `Persist` through [`Db::commit`] then [`Replicator::persisted`], and
//! `Done` to whoever called [`Replicator::put`] / [`Replicator::get`] /
//! [`Replicator::get_from`].

pub mod bench;
pub mod db;
pub mod entry;
pub mod error;
pub mod mem;
pub mod replica;

#[cfg(test)]
mod replica_tests;

pub use db::{BucketStats, Db, WriterStats};
pub use entry::{Entry, Meta, Pos, Stamp, WriteOp, MAX_KEY, MAX_VALUE};
pub use error::StoreError;
pub use mem::MemBackend;
pub use replica::{
    Action, Backend, Outcome, Placement, RemoteError, ReplicaConfig, ReplicaStats, Replicator,
    StoreMsg, Value,
};

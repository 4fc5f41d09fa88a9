//! The sans-IO replication core.

use super::entry::{Entry, Meta, Pos};
use super::error::StoreError;

/// What the replication core reads from the local store. Implemented by
/// [`super::Db`] (redb) and [`super::MemBackend`] (tests, simulator).
pub trait Backend {
    fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError>;
    /// The entry without its value.
    fn meta(&self, bucket: &str, key: &str) -> Result<Option<Meta>, StoreError>;
    /// Up to `limit` stored keys strictly after `after`, in [`Pos`] order.
    fn scan_meta(&self, after: Option<&Pos>, limit: usize) -> Result<Vec<(Pos, Meta)>, StoreError>;
}

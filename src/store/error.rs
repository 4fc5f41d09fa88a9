//! Typed store errors. Cloneable (I/O causes are kept as text) because one
//! group commit may fail many waiting callers with the same cause.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("bad bucket name {bucket:?}: {why}")]
    BadBucket { bucket: String, why: &'static str },
    #[error("bad key: {why} (length {len}, at most {max} bytes)")]
    BadKey {
        len: usize,
        max: usize,
        why: &'static str,
    },
    #[error("value of {len} bytes is larger than the limit of {max} bytes")]
    ValueTooLarge { len: usize, max: usize },
    #[error("replication factor {k} is outside 1..={max}")]
    BadK { k: u8, max: u8 },
    #[error("store file {path} is corrupt or not a database: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("store file {path} is a database, but not a capy store: {detail}")]
    Foreign { path: PathBuf, detail: String },
    #[error("store file {path} has format {found}, this build reads up to {supported}; refusing to touch it")]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("store file {path} is already open in another process")]
    Locked { path: PathBuf },
    #[error("store file {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error("stored entry {key:?} in bucket {bucket:?} is unreadable: {detail}")]
    CorruptEntry {
        bucket: String,
        key: String,
        detail: String,
    },
    #[error("bad entry record: {0}")]
    BadRecord(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("the store writer has stopped")]
    WriterGone,
    #[error("bad store message: {0}")]
    Wire(String),
}

impl StoreError {
    /// True for the errors that mean the file itself cannot be used as a
    /// capy store (as opposed to a lock, permission or disk problem).
    pub fn is_unreadable_file(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt { .. } | StoreError::Foreign { .. }
        )
    }
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Storage(e.to_string())
            }
        }
    )*};
}
storage_from!(
    redb::Error,
    redb::StorageError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError
);

//! The stored record and the rules every copy of it obeys: size limits,
//! bucket names, the on-disk encoding (with a format byte so it can evolve)
//! and the apply rule that never moves a key backwards.

use super::error::StoreError;
use crate::id::NodeId;
use serde::{Deserialize, Serialize};

/// Longest user key, in bytes.
pub const MAX_KEY: usize = 1024;
/// Largest value, in bytes.
pub const MAX_VALUE: usize = 4 * 1024 * 1024;
/// Longest bucket name.
pub const MAX_BUCKET: usize = 64;
/// Largest replication factor (the leaf set holds 8 neighbours a side).
pub const MAX_K: u8 = 8;
/// Default replication factor.
pub const DEFAULT_K: u8 = 3;
/// Format byte of the current record encoding.
pub const FORMAT_V1: u8 = 1;
/// Bytes before the value in a V1 record.
pub const HEADER_LEN: usize = 1 + 8 + 16 + 8 + 1 + 1 + 8;

const FLAG_DELETED: u8 = 1;

/// Bucket names become redb table names and log fields: keep them short
/// and plain so no name can collide with the store's own tables.
pub fn check_bucket(bucket: &str) -> Result<(), StoreError> {
    let bad = |why| {
        Err(StoreError::BadBucket {
            bucket: bucket.chars().take(80).collect(),
            why,
        })
    };
    if bucket.is_empty() {
        return bad("empty");
    }
    if bucket.len() > MAX_BUCKET {
        return bad("longer than 64 bytes");
    }
    if !bucket
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return bad("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

pub fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::BadKey {
            len: 0,
            max: MAX_KEY,
            why: "empty",
        });
    }
    if key.len() > MAX_KEY {
        return Err(StoreError::BadKey {
            len: key.len(),
            max: MAX_KEY,
            why: "too long",
        });
    }
    Ok(())
}

pub fn check_value(len: usize) -> Result<(), StoreError> {
    if len > MAX_VALUE {
        return Err(StoreError::ValueTooLarge {
            len,
            max: MAX_VALUE,
        });
    }
    Ok(())
}

pub fn check_k(k: u8) -> Result<(), StoreError> {
    if k == 0 || k > MAX_K {
        return Err(StoreError::BadK { k, max: MAX_K });
    }
    Ok(())
}

/// One version of one key, as every replica stores it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Assigned by the root; grows by one per write of the key.
    pub version: u64,
    /// The root vnode that assigned `version`; breaks ties between two
    /// roots that assigned the same version during a membership change.
    pub origin: NodeId,
    /// Unique per write at its root: a root that crashed before its own
    /// commit may hand out the same version again after restart, and the
    /// two writes must still be told apart and ordered the same everywhere.
    pub write_id: u64,
    /// A tombstone: kept (with its version) so a delete replicates and a
    /// stale copy can never bring the key back.
    pub deleted: bool,
    /// Replication factor of the key's app, so hand-off can recompute the
    /// replica set without knowing the app.
    pub k: u8,
    /// Root's clock when the version was assigned; drives tombstone GC.
    pub written_at_ms: u64,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Entry(v{} by {}#{:x}{}, k={}, {} bytes)",
            self.version,
            self.origin.short(),
            self.write_id,
            if self.deleted { ", deleted" } else { "" },
            self.k,
            self.value.len()
        )
    }
}

impl Entry {
    /// The (version, origin) pair that orders every copy of a key.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            version: self.version,
            origin: self.origin,
            write_id: self.write_id,
        }
    }

    pub fn meta(&self) -> Meta {
        Meta {
            version: self.version,
            origin: self.origin,
            write_id: self.write_id,
            deleted: self.deleted,
            k: self.k,
            written_at_ms: self.written_at_ms,
            len: self.value.len() as u32,
        }
    }

    /// Checks the invariants every entry must hold, wherever it came from.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_k(self.k)?;
        check_value(self.value.len())?;
        if self.deleted && !self.value.is_empty() {
            return Err(StoreError::BadRecord("a tombstone carries a value".into()));
        }
        if self.version == 0 {
            return Err(StoreError::BadRecord("version 0 is never assigned".into()));
        }
        Ok(())
    }

    /// V1 record: format, version, origin, write_id, flags, k,
    /// written_at_ms (all big-endian), then the value bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.value.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.origin.0.to_be_bytes());
        out.extend_from_slice(&self.write_id.to_be_bytes());
        out.push(if self.deleted { FLAG_DELETED } else { 0 });
        out.push(self.k);
        out.extend_from_slice(&self.written_at_ms.to_be_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Entry, StoreError> {
        let meta = Meta::decode(bytes)?;
        Ok(Entry {
            version: meta.version,
            origin: meta.origin,
            write_id: meta.write_id,
            deleted: meta.deleted,
            k: meta.k,
            written_at_ms: meta.written_at_ms,
            value: bytes[HEADER_LEN..].to_vec(),
        })
    }
}

/// Total order of the copies of one key: higher version wins, then the
/// higher origin id, then the higher write id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub version: u64,
    pub origin: NodeId,
    pub write_id: u64,
}

/// An entry without its value: what digests and scans need, read without
/// copying the value out of the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub version: u64,
    pub origin: NodeId,
    pub write_id: u64,
    pub deleted: bool,
    pub k: u8,
    pub written_at_ms: u64,
    pub len: u32,
}

impl Meta {
    pub fn stamp(&self) -> Stamp {
        Stamp {
            version: self.version,
            origin: self.origin,
            write_id: self.write_id,
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Meta, StoreError> {
        let bad = |s: &str| Err(StoreError::BadRecord(s.to_string()));
        let Some(&format) = bytes.first() else {
            return bad("empty record");
        };
        if format != FORMAT_V1 {
            return Err(StoreError::BadRecord(format!(
                "unknown record format {format}"
            )));
        }
        if bytes.len() < HEADER_LEN {
            return bad("record shorter than its header");
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let mut o = [0u8; 16];
        o.copy_from_slice(&bytes[9..25]);
        let flags = bytes[33];
        if flags & !FLAG_DELETED != 0 {
            return bad("unknown flag bits");
        }
        let meta = Meta {
            version: u64_at(1),
            origin: NodeId(u128::from_be_bytes(o)),
            write_id: u64_at(25),
            deleted: flags & FLAG_DELETED != 0,
            k: bytes[34],
            written_at_ms: u64_at(35),
            len: (bytes.len() - HEADER_LEN) as u32,
        };
        check_k(meta.k)?;
        check_value(meta.len as usize)?;
        if meta.deleted && meta.len != 0 {
            return bad("a tombstone carries a value");
        }
        Ok(meta)
    }
}

/// Where a stored key sits in a full scan: buckets by name, then ring
/// position, then key bytes (the order of the redb table keys).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub bucket: String,
    pub ring: NodeId,
    pub key: String,
}

impl Pos {
    pub fn new(bucket: &str, key: &str) -> Pos {
        Pos {
            bucket: bucket.to_string(),
            ring: NodeId::for_key(bucket, key),
            key: key.to_string(),
        }
    }
}

/// The redb table key: 16-byte ring position then the user key, so a
/// range of the ring is a range of the table.
pub fn table_key(ring: NodeId, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + key.len());
    k.extend_from_slice(&ring.to_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

/// Splits a table key back into ring position and user key.
pub fn split_table_key(raw: &[u8]) -> Option<(NodeId, String)> {
    if raw.len() < 17 {
        return None;
    }
    let mut r = [0u8; 16];
    r.copy_from_slice(&raw[..16]);
    let key = std::str::from_utf8(&raw[16..]).ok()?;
    Some((NodeId(u128::from_be_bytes(r)), key.to_string()))
}

/// A change to the local store. Every op is conditional, so replaying or
/// reordering ops can never move a key backwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// Store `entry` if it is newer than what is held (or nothing is).
    Put {
        bucket: String,
        key: String,
        entry: Entry,
    },
    /// Drop the key if what is held is not newer than `upto` (hand-off
    /// done, or tombstone collected); a newer copy that arrived meanwhile
    /// stays.
    Remove {
        bucket: String,
        key: String,
        upto: Stamp,
    },
}

impl WriteOp {
    pub fn bucket(&self) -> &str {
        match self {
            WriteOp::Put { bucket, .. } | WriteOp::Remove { bucket, .. } => bucket,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            WriteOp::Put { key, .. } | WriteOp::Remove { key, .. } => key,
        }
    }

    pub fn validate(&self) -> Result<(), StoreError> {
        check_bucket(self.bucket())?;
        check_key(self.key())?;
        if let WriteOp::Put { entry, .. } = self {
            entry.validate()?;
        }
        Ok(())
    }

    /// The apply rule: does this op change a key currently holding `held`?
    pub fn applies_over(&self, held: Option<Stamp>) -> bool {
        match (self, held) {
            (WriteOp::Put { .. }, None) => true,
            (WriteOp::Put { entry, .. }, Some(h)) => entry.stamp() > h,
            (WriteOp::Remove { .. }, None) => false,
            (WriteOp::Remove { upto, .. }, Some(h)) => h <= *upto,
        }
    }

    /// Approximate bytes this op writes; bounds one group commit.
    pub fn size(&self) -> usize {
        match self {
            WriteOp::Put { entry, key, .. } => HEADER_LEN + entry.value.len() + key.len() + 16,
            WriteOp::Remove { key, .. } => key.len() + 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(version: u64, value: &[u8]) -> Entry {
        Entry {
            version,
            origin: NodeId(7),
            write_id: 99,
            deleted: false,
            k: 3,
            written_at_ms: 1234,
            value: value.to_vec(),
        }
    }

    #[test]
    fn record_roundtrip_and_meta() {
        let e = entry(42, b"hello");
        let bytes = e.encode();
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(Entry::decode(&bytes), Ok(e.clone()));
        let m = Meta::decode(&bytes).unwrap();
        assert_eq!(m, e.meta());
        assert_eq!(m.len, 5);
    }

    #[test]
    fn record_rejects_garbage() {
        let mut bytes = entry(1, b"x").encode();
        bytes[0] = 9;
        assert!(
            matches!(Entry::decode(&bytes), Err(StoreError::BadRecord(m)) if m.contains("format 9"))
        );
        assert!(Entry::decode(&[FORMAT_V1, 0, 0]).is_err());
        assert!(Entry::decode(&[]).is_err());
        let mut t = entry(1, b"x");
        t.deleted = true;
        assert!(Entry::decode(&t.encode()).is_err(), "tombstone with value");
        let mut bad_k = entry(1, b"").encode();
        bad_k[34] = 0;
        assert!(matches!(
            Entry::decode(&bad_k),
            Err(StoreError::BadK { k: 0, .. })
        ));
    }

    #[test]
    fn names_and_sizes() {
        assert!(check_bucket("default").is_ok());
        assert!(check_bucket("app-1.v2_x").is_ok());
        assert!(check_bucket("").is_err());
        assert!(check_bucket("kv/evil").is_err());
        assert!(check_bucket(&"a".repeat(65)).is_err());
        assert!(check_key("k").is_ok());
        assert!(check_key(&"k".repeat(MAX_KEY)).is_ok());
        assert!(check_key(&"k".repeat(MAX_KEY + 1)).is_err());
        assert!(check_key("").is_err());
        assert!(check_value(MAX_VALUE).is_ok());
        assert!(check_value(MAX_VALUE + 1).is_err());
        assert!(check_k(0).is_err() && check_k(3).is_ok() && check_k(MAX_K + 1).is_err());
    }

    #[test]
    fn apply_rule_never_goes_back() {
        let put = |v, o| WriteOp::Put {
            bucket: "b".into(),
            key: "k".into(),
            entry: Entry {
                origin: NodeId(o),
                ..entry(v, b"")
            },
        };
        let st = |v, o| {
            Some(Stamp {
                version: v,
                origin: NodeId(o),
                write_id: 99,
            })
        };
        assert!(put(1, 1).applies_over(None));
        assert!(put(2, 1).applies_over(st(1, 9)));
        assert!(!put(1, 9).applies_over(st(2, 1)));
        assert!(put(2, 9).applies_over(st(2, 1)), "origin breaks ties");
        assert!(!put(2, 1).applies_over(st(2, 1)), "same stamp is a no-op");
        let mut other = entry(2, b"");
        other.origin = NodeId(1);
        other.write_id = 100;
        let later = WriteOp::Put {
            bucket: "b".into(),
            key: "k".into(),
            entry: other,
        };
        assert!(later.applies_over(st(2, 1)), "write id breaks the last tie");
        let rm = WriteOp::Remove {
            bucket: "b".into(),
            key: "k".into(),
            upto: Stamp {
                version: 5,
                origin: NodeId(1),
                write_id: 99,
            },
        };
        assert!(rm.applies_over(st(5, 1)));
        assert!(rm.applies_over(st(4, 9)));
        assert!(!rm.applies_over(st(6, 0)), "newer copy survives a remove");
        assert!(!rm.applies_over(None));
    }

    #[test]
    fn table_keys_follow_the_ring() {
        let a = table_key(NodeId(1), "zzz");
        let b = table_key(NodeId(2), "aaa");
        assert!(a < b);
        assert_eq!(split_table_key(&a), Some((NodeId(1), "zzz".to_string())));
        assert_eq!(split_table_key(&a[..10]), None);
    }
}

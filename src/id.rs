//! Identifiers shared by every layer: 128-bit ring positions (NodeIds and
//! keys) and the handle that pairs a vnode's id with the address of the node
//! that serves it. Kept at the top level because the overlay, the store, the
//! transport and the simulator all speak in these terms and none of them may
//! own the others.

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// Bits per routing digit (Pastry's b).
pub const DIGIT_BITS: u32 = 4;
/// Digits in an id: 128 / b.
pub const DIGITS: usize = 32;
/// Columns of a routing-table row: 2^b.
pub const BASE: usize = 16;

/// A position on the 128-bit ring: a vnode's id or a key's hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct NodeId(pub u128);

impl NodeId {
    /// First 128 bits of SHA-1 over `bytes`.
    pub fn hash(bytes: &[u8]) -> NodeId {
        Self::hash_parts(&[bytes])
    }

    /// First 128 bits of SHA-1 over the concatenation of `parts`.
    pub fn hash_parts(parts: &[&[u8]]) -> NodeId {
        let mut h = Sha1::new();
        for p in parts {
            h.update(p);
        }
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        NodeId(u128::from_be_bytes(b))
    }

    /// The id of vnode `index` of the node whose public key (DER SPKI) is
    /// `spki`: vnode 0 hashes the key alone, vnode i > 0 hashes the key
    /// followed by i as a big-endian u32. Anyone holding the certificate can
    /// recompute it, which is what makes ids unforgeable.
    pub fn for_vnode(spki: &[u8], index: u32) -> NodeId {
        if index == 0 {
            Self::hash(spki)
        } else {
            Self::hash_parts(&[spki, &index.to_be_bytes()])
        }
    }

    /// The ring position of `key` inside the namespace `bucket` (an app).
    pub fn for_key(bucket: &str, key: &str) -> NodeId {
        Self::hash_parts(&[bucket.as_bytes(), b"\0", key.as_bytes()])
    }

    /// Digit `i` (0 = most significant) in base 2^b.
    #[inline]
    pub fn digit(self, i: usize) -> usize {
        debug_assert!(i < DIGITS);
        ((self.0 >> (128 - DIGIT_BITS as usize * (i + 1))) & 0xf) as usize
    }

    /// Number of leading digits `self` and `other` share.
    #[inline]
    pub fn shared_prefix(self, other: NodeId) -> usize {
        ((self.0 ^ other.0).leading_zeros() / DIGIT_BITS) as usize
    }

    /// Clockwise distance from `self` to `other` on the ring.
    #[inline]
    pub fn cw(self, other: NodeId) -> u128 {
        other.0.wrapping_sub(self.0)
    }

    /// Shortest distance between `self` and `other` in either direction.
    #[inline]
    pub fn distance(self, other: NodeId) -> u128 {
        let a = self.cw(other);
        let b = other.cw(self);
        a.min(b)
    }

    /// True when `a` is strictly closer to `self` than `b`, with the smaller
    /// id winning ties so every node agrees on a key's root.
    #[inline]
    pub fn closer(self, a: NodeId, b: NodeId) -> bool {
        let (da, db) = (self.distance(a), self.distance(b));
        da < db || (da == db && a.0 < b.0)
    }

    /// Orders ids by closeness to `self` (closest first), for sorting.
    pub fn by_closeness(self, a: NodeId, b: NodeId) -> std::cmp::Ordering {
        if a == b {
            std::cmp::Ordering::Equal
        } else if self.closer(a, b) {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Greater
        }
    }

    /// Short form for logs: the first 8 hex digits.
    pub fn short(self) -> String {
        format!("{:08x}", (self.0 >> 96) as u32)
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a node id: expected 32 hex digits, got {0:?}")]
pub struct BadId(pub String);

impl FromStr for NodeId {
    type Err = BadId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 {
            return Err(BadId(s.to_string()));
        }
        u128::from_str_radix(s, 16)
            .map(NodeId)
            .map_err(|_| BadId(s.to_string()))
    }
}

/// A vnode as other vnodes know it: its id and the UDP address of the node
/// that serves it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeHandle {
    pub id: NodeId,
    pub addr: SocketAddr,
}

impl fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id.short(), self.addr)
    }
}

/// Microseconds on the clock the caller feeds a protocol core: real time in
/// the node runtime, virtual time in the simulator.
pub type Micros = u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_and_prefix() {
        let a = NodeId(0x1234_5678_9abc_def0_0000_0000_0000_0000);
        assert_eq!(a.digit(0), 1);
        assert_eq!(a.digit(3), 4);
        assert_eq!(a.digit(15), 0);
        let b = NodeId(0x1235_0000_0000_0000_0000_0000_0000_0000);
        assert_eq!(a.shared_prefix(b), 3);
        assert_eq!(a.shared_prefix(a), 32);
    }

    #[test]
    fn ring_distance_wraps() {
        let a = NodeId(u128::MAX - 1);
        let b = NodeId(2);
        assert_eq!(a.distance(b), 4);
        assert_eq!(b.distance(a), 4);
        assert!(NodeId(0).closer(b, NodeId(10)));
        // ties go to the smaller id
        assert!(NodeId(5).closer(NodeId(3), NodeId(7)));
        assert!(!NodeId(5).closer(NodeId(7), NodeId(3)));
    }

    #[test]
    fn vnode_ids_differ_and_are_stable() {
        let k = b"some spki bytes";
        assert_ne!(NodeId::for_vnode(k, 0), NodeId::for_vnode(k, 1));
        assert_eq!(NodeId::for_vnode(k, 3), NodeId::for_vnode(k, 3));
        assert_eq!(NodeId::for_vnode(k, 0), NodeId::hash(k));
    }

    #[test]
    fn parse_roundtrip() {
        let a = NodeId(0xdead_beef << 64);
        assert_eq!(a.to_string().parse::<NodeId>(), Ok(a));
        assert!("xyz".parse::<NodeId>().is_err());
    }
}

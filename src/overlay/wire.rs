//! Overlay messages and their bounded wire form. Every list and byte string
//! has a cap checked while decoding, so a hostile peer cannot make a node
//! allocate more than the cap, whatever length prefix it sends.

use crate::id::{Micros, NodeHandle, NodeId};
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

/// Most leaf-set members a message may carry (both sides).
pub const MAX_LEAF_SET: usize = 64;
/// Most entries per routing-table slot (`Config::slot_entries` upper bound).
pub const MAX_SLOT_ENTRIES: usize = 4;
/// Most handles in one routing-table row.
pub const MAX_ROW: usize = 16 * MAX_SLOT_ENTRIES;
/// Most handles a join-path node hands the joiner in one message.
pub const MAX_JOIN_ENTRIES: usize = 256;
/// Largest payload a routed message may carry.
pub const MAX_PAYLOAD: usize = (4 << 20) + (64 << 10);
/// Largest encoded message accepted by [`Msg::decode`].
pub const MAX_FRAME: usize = MAX_PAYLOAD + 4096;

/// A list that refuses, while decoding, to hold more than `N` items.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bounded<T, const N: usize>(Vec<T>);

impl<T, const N: usize> Bounded<T, N> {
    pub fn new() -> Self {
        Bounded(Vec::new())
    }
    /// Takes at most `N` items from `it`; the rest are dropped.
    pub fn truncating<I: IntoIterator<Item = T>>(it: I) -> Self {
        Bounded(it.into_iter().take(N).collect())
    }
    pub fn into_vec(self) -> Vec<T> {
        self.0
    }
}

impl<T, const N: usize> Deref for Bounded<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: fmt::Debug, const N: usize> fmt::Debug for Bounded<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: Serialize, const N: usize> Serialize for Bounded<T, N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(&self.0)
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Bounded<T, N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
            type Value = Bounded<T, N>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of at most {N} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > N {
                    return Err(de::Error::invalid_length(hint, &self));
                }
                let mut v = Vec::with_capacity(hint);
                while let Some(x) = seq.next_element()? {
                    if v.len() == N {
                        return Err(de::Error::invalid_length(N + 1, &self));
                    }
                    v.push(x);
                }
                Ok(Bounded(v))
            }
        }
        d.deserialize_seq(V::<T, N>(PhantomData))
    }
}

/// Bytes of a routed message, at most [`MAX_PAYLOAD`] of them.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Payload(Vec<u8>);

impl Payload {
    /// `None` when `bytes` is longer than [`MAX_PAYLOAD`].
    pub fn new(bytes: Vec<u8>) -> Option<Payload> {
        (bytes.len() <= MAX_PAYLOAD).then_some(Payload(bytes))
    }
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Payload;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "at most {MAX_PAYLOAD} bytes")
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Payload, E> {
                if b.len() > MAX_PAYLOAD {
                    return Err(E::invalid_length(b.len(), &self));
                }
                Ok(Payload(b.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<Payload, E> {
                Payload::new(b).ok_or_else(|| E::invalid_length(MAX_PAYLOAD + 1, &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Payload, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<u8>()? {
                    if v.len() == MAX_PAYLOAD {
                        return Err(de::Error::invalid_length(MAX_PAYLOAD + 1, &self));
                    }
                    v.push(x);
                }
                Ok(Payload(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// A probe's send time and a keyed tag over (peer, time): the prober keeps
/// no state per probe, and a peer cannot forge a later send time to look
/// closer than it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub sent: Micros,
    pub tag: u64,
}

pub type LeafList = Bounded<NodeHandle, MAX_LEAF_SET>;
pub type RowList = Bounded<NodeHandle, MAX_ROW>;
pub type JoinList = Bounded<NodeHandle, MAX_JOIN_ENTRIES>;

/// What overlay instances say to each other. The sender is not in the
/// message: the runtime gives it to `handle` from the authenticated peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Routed toward `joiner.id`; `hops` path nodes before the receiver have
    /// sent the joiner their rows, from row `min_row` on.
    Join {
        joiner: NodeHandle,
        hops: u8,
        min_row: u8,
    },
    /// A join-path node's routing rows (and, from the first hop, its
    /// neighbourhood set), flattened: the joiner places them by id.
    JoinRows {
        entries: JoinList,
    },
    /// From the joiner's root: its leaf set and rows; `expected` JoinRows
    /// messages were sent by the path before it.
    JoinReply {
        expected: u8,
        leaf_set: LeafList,
        entries: JoinList,
    },
    /// A (re)joined node introduces itself; also a probe.
    Announce {
        stamp: Stamp,
    },
    /// Keep-alive and RTT measurement.
    Probe {
        stamp: Stamp,
    },
    /// Answer to Probe/Announce. `back` asks the prober to answer in turn,
    /// so the receiver measures its RTT too; `leaf_set` is sent when the
    /// announcer has just entered the receiver's leaf set.
    ProbeAck {
        echo: Stamp,
        back: Option<Stamp>,
        leaf_set: Option<LeafList>,
    },
    /// A message for the root of `key`.
    Route {
        key: NodeId,
        origin: NodeHandle,
        hops: u8,
        payload: Payload,
    },
    LeafSetRequest,
    LeafSetReply {
        leaf_set: LeafList,
    },
    /// Asks for routing-table row `row`, or only its slot `col` (repair).
    RowRequest {
        row: u8,
        col: Option<u8>,
    },
    RowReply {
        row: u8,
        entries: RowList,
    },
    /// The sender leaves; its leaf set helps the receiver fill the gap.
    Leave {
        leaf_set: LeafList,
    },
}

/// Why bytes are not an overlay message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("overlay frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed overlay message: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("overlay message followed by {0} trailing bytes")]
    Trailing(usize),
}

impl Msg {
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let v = postcard::to_allocvec(self)?;
        if v.len() > MAX_FRAME {
            return Err(WireError::TooLarge(v.len()));
        }
        Ok(v)
    }

    pub fn decode(bytes: &[u8]) -> Result<Msg, WireError> {
        if bytes.len() > MAX_FRAME {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let (m, rest) = postcard::take_from_bytes(bytes)?;
        if !rest.is_empty() {
            return Err(WireError::Trailing(rest.len()));
        }
        Ok(m)
    }

    /// Short name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Join { .. } => "join",
            Msg::JoinRows { .. } => "join_rows",
            Msg::JoinReply { .. } => "join_reply",
            Msg::Announce { .. } => "announce",
            Msg::Probe { .. } => "probe",
            Msg::ProbeAck { .. } => "probe_ack",
            Msg::Route { .. } => "route",
            Msg::LeafSetRequest => "leaf_set_request",
            Msg::LeafSetReply { .. } => "leaf_set_reply",
            Msg::RowRequest { .. } => "row_request",
            Msg::RowReply { .. } => "row_reply",
            Msg::Leave { .. } => "leave",
        }
    }
}

//! The `sys` boundary: what a handler may learn from the node it runs on.
//! The node runtime implements [`SysHost`] over the overlay and the store,
//! the simulator over its virtual network, tests and `capy handler run` use
//! [`MemHost`].

use super::AppKey;
use crate::id::{Micros, NodeId};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};

/// A key's data and the nodes holding copies of it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReadResult {
    pub value: Option<serde_json::Value>,
    pub holders: Vec<NodeId>,
}

/// A pending read. Boxed so that [`SysHost`] stays object-safe.
pub type ReadFuture<'a> = Pin<Box<dyn Future<Output = Result<ReadResult, String>> + Send + 'a>>;

/// Node facts and remote reads, as a handler call needs them.
///
/// The synchronous methods are called while Lua runs and must return at
/// once. `read` may take a network round trip: the engine suspends the Lua
/// call meanwhile and the executor keeps serving. Implementations bound
/// their read futures in time (the engine does not read a clock to time
/// them out, so the simulator can run them in virtual time); an `Err` shows
/// up in Lua as `nil, {}, message`.
pub trait SysHost: Send + Sync {
    /// `sys.now()`, microseconds.
    fn now(&self) -> Micros;
    /// `sys.node_id()`: the vnode running the call (the key's root).
    fn node_id(&self) -> NodeId;
    /// `sys.local_ip()`.
    fn local_ip(&self) -> IpAddr;
    /// `sys.leaf_set(n)`: up to `n` leaf-set members, closest first.
    fn leaf_set(&self, n: usize) -> Vec<NodeId>;
    /// `sys.neighbor(n)`: up to `n` members of the neighbourhood set
    /// (closest by network proximity).
    fn neighbor(&self, n: usize) -> Vec<NodeId>;
    /// `sys.read(key)` of a key other than the call's own.
    fn read<'a>(&'a self, key: &AppKey) -> ReadFuture<'a>;
}

/// An in-memory [`SysHost`]: a settable clock, fixed node facts and a map of
/// keys. Reads can be made to suspend once before answering, so tests see a
/// real yield of the executor.
pub struct MemHost {
    now: AtomicU64,
    pub node: NodeId,
    pub ip: IpAddr,
    pub leaves: Vec<NodeId>,
    pub neighbors: Vec<NodeId>,
    data: Mutex<HashMap<AppKey, ReadResult>>,
    /// Reads that reached the host.
    pub reads: AtomicU64,
    /// When set, every read returns `Pending` once before answering.
    pub suspend_reads: bool,
}

impl MemHost {
    pub fn new(node: NodeId) -> MemHost {
        MemHost {
            now: AtomicU64::new(0),
            node,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            leaves: Vec::new(),
            neighbors: Vec::new(),
            data: Mutex::new(HashMap::new()),
            reads: AtomicU64::new(0),
            suspend_reads: false,
        }
    }

    /// A host with `n` made-up leaf-set members and neighbours.
    pub fn with_leaves(node: NodeId, n: usize) -> MemHost {
        let mut h = MemHost::new(node);
        h.leaves = (1..=n as u128)
            .map(|i| NodeId(node.0.wrapping_add(i)))
            .collect();
        h.neighbors = (1..=n as u128)
            .map(|i| NodeId(node.0 ^ (i << 64)))
            .collect();
        h
    }

    pub fn set_now(&self, t: Micros) {
        self.now.store(t, Ordering::Relaxed);
    }

    pub fn advance(&self, dt: Micros) {
        self.now.fetch_add(dt, Ordering::Relaxed);
    }

    pub fn put(&self, key: AppKey, value: serde_json::Value, holders: Vec<NodeId>) {
        if let Ok(mut m) = self.data.lock() {
            m.insert(
                key,
                ReadResult {
                    value: Some(value),
                    holders,
                },
            );
        }
    }
}

impl SysHost for MemHost {
    fn now(&self) -> Micros {
        self.now.load(Ordering::Relaxed)
    }
    fn node_id(&self) -> NodeId {
        self.node
    }
    fn local_ip(&self) -> IpAddr {
        self.ip
    }
    fn leaf_set(&self, n: usize) -> Vec<NodeId> {
        self.leaves.iter().take(n).copied().collect()
    }
    fn neighbor(&self, n: usize) -> Vec<NodeId> {
        self.neighbors.iter().take(n).copied().collect()
    }
    fn read<'a>(&'a self, key: &AppKey) -> ReadFuture<'a> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let found = match self.data.lock() {
            Ok(m) => Ok(m.get(key).cloned().unwrap_or_default()),
            Err(_) => Err("host store unavailable".to_string()),
        };
        let mut suspend = self.suspend_reads;
        Box::pin(std::future::poll_fn(move |cx: &mut Context<'_>| {
            if suspend {
                suspend = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(found.clone())
        }))
    }
}

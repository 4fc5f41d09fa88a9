//! Requests between nodes that need an answer: "whoever is the root of this
//! key, do X and tell me", or "node N, do X". The overlay carries routed
//! calls to the key's root; the answer comes straight back over QUIC. Parts
//! that need this (apps, functions, objects) add a variant to [`Call`] and
//! a branch in [`Node::serve`].

use super::runtime::{Ctx, Node, OpError, Routed, Wire};
use crate::id::{NodeHandle, NodeId};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Every request one node can make of another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Call {
    /// Who serves this key? Answers with a [`RootInfo`].
    Whois { key: NodeId },
    /// A function's invocation or control (see `functions`).
    Fn(super::functions::FnCall),
    /// Apps: registration, a key's events, policy state (see `apps`).
    /// Answers with an `apps::Answer`.
    App(Box<super::apps::AppCall>),
    /// Objects: answered by `objects::serve` at an object's (or package
    /// index's) root.
    Obj(super::objects::ObjCall),
}

/// The answer to [`Call::Whois`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootInfo {
    pub name: String,
    pub zone: String,
    pub vnode: NodeId,
    pub addr: std::net::SocketAddr,
}

impl Node {
    /// Runs `call` at the root of `key` and returns its encoded answer.
    pub async fn call_root(
        self: &Arc<Self>,
        key: NodeId,
        call: Call,
        timeout: Duration,
    ) -> Result<Vec<u8>, OpError> {
        let (req, rx) = self.register_call();
        let payload = postcard::to_allocvec(&Routed::Call { req, call })
            .map_err(|e| OpError::Internal(format!("encoding a call: {e}")))?;
        let mut err = None;
        self.drive(|n, cores, ctx: &mut Ctx| {
            let Some(v) = cores.nearest_vnode(key) else {
                err = Some("this node runs no vnode".to_string());
                return;
            };
            let acts = match cores
                .vnodes
                .get_mut(&v)
                .map(|p| p.route(n.now(), key, payload))
            {
                Some(Ok(a)) => a,
                Some(Err(e)) => {
                    err = Some(e.to_string());
                    return;
                }
                None => return,
            };
            n.overlay_actions(cores, v, acts, ctx);
        });
        if let Some(e) = err {
            self.forget_call(req);
            return Err(OpError::Invalid(e));
        }
        self.await_call(req, rx, timeout).await
    }

    /// Runs `call` on the node serving `to` and returns its encoded answer.
    pub async fn call_node(
        self: &Arc<Self>,
        to: NodeHandle,
        call: Call,
        timeout: Duration,
    ) -> Result<Vec<u8>, OpError> {
        let (req, rx) = self.register_call();
        if to.addr == self.quic {
            self.spawn_serve(
                NodeHandle {
                    id: self.identity_vnodes[0],
                    addr: self.quic,
                },
                req,
                call,
            );
        } else {
            self.spawn_send(self.identity_vnodes[0], to, Wire::Call { req, call });
        }
        self.await_call(req, rx, timeout).await
    }

    fn register_call(&self) -> (u64, async_channel::Receiver<Result<Vec<u8>, String>>) {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = async_channel::bounded(1);
        if let Ok(mut c) = self.calls.lock() {
            c.insert(req, tx);
        }
        (req, rx)
    }

    fn forget_call(&self, req: u64) {
        if let Ok(mut c) = self.calls.lock() {
            c.remove(&req);
        }
    }

    async fn await_call(
        &self,
        req: u64,
        rx: async_channel::Receiver<Result<Vec<u8>, String>>,
        timeout: Duration,
    ) -> Result<Vec<u8>, OpError> {
        let out = futures_lite::future::or(async { rx.recv().await.ok() }, async {
            smol::Timer::after(timeout).await;
            None
        })
        .await;
        self.forget_call(req);
        match out {
            Some(Ok(b)) => Ok(b),
            Some(Err(e)) => Err(OpError::Unavailable(e)),
            None => Err(OpError::Timeout(format!("no answer within {timeout:?}"))),
        }
    }

    /// An answer arrived (or was produced here for ourselves).
    pub(crate) fn complete_call(&self, req: u64, result: Result<Vec<u8>, String>) {
        let tx = self.calls.lock().ok().and_then(|mut c| c.remove(&req));
        match tx {
            Some(tx) => {
                let _ = tx.try_send(result);
            }
            None => tracing::debug!(req, "answer to a call nobody waits for"),
        }
    }

    /// Serves a call on its own task and sends the answer to `origin`.
    pub(crate) fn spawn_serve(self: &Arc<Self>, origin: NodeHandle, req: u64, call: Call) {
        let node = self.clone();
        smol::spawn(async move {
            let result = node.serve(origin, call).await;
            if origin.addr == node.quic {
                node.complete_call(req, result);
            } else {
                let from = node.identity_vnodes[0];
                node.spawn_send(from, origin, Wire::CallReply { req, result });
            }
        })
        .detach();
    }

    async fn serve(self: &Arc<Self>, _origin: NodeHandle, call: Call) -> Result<Vec<u8>, String> {
        match call {
            Call::Whois { key } => {
                let vnode = {
                    let cores = self.lock();
                    cores.nearest_vnode(key)
                }
                .ok_or("this node runs no vnode")?;
                let info = RootInfo {
                    name: self.name.clone(),
                    zone: self.zone.clone(),
                    vnode,
                    addr: self.quic,
                };
                postcard::to_allocvec(&info).map_err(|e| e.to_string())
            }
            Call::Fn(c) => self.serve_fn(c).await,
            Call::App(c) => {
                postcard::to_allocvec(&self.serve_app(*c).await).map_err(|e| e.to_string())
            }
            Call::Obj(c) => Ok(super::objects::serve(self, c).await),
        }
    }
}

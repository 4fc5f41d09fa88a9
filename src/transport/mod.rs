//! Transport: QUIC (quinn on smol) with mutual TLS (rustls, ring), and the
//! admin CA (rcgen) that certifies every node. Owns identity: a peer's vnode
//! ids are derived here from its certificate. Calls nothing above it.
//!
//! - `ca`: create the admin CA, issue node certificates, the dev identity.
//! - `cert`: the capy X.509 extension and certificate checks.
//! - `identity`: this node's `Identity` and a peer's `PeerInfo`.
//! - `quic`: the `Transport` endpoint, `Frame`s, requests and replies.

mod ca;
mod cert;
mod error;
mod identity;
mod quic;

pub use ca::{
    ca_init, ca_issue, ensure_dev_identity, fingerprint, CaInfo, IssueRequest, NodeCertInfo,
    CA_CERT, CA_KEY, DEV_CA_DIR, DEV_MAX_VNODES, NODE_CERT, NODE_KEY,
};
pub use cert::{CAPY_EXT_OID, MAX_LABEL, MAX_VNODES, SERVER_NAME};
pub use error::{SendError, TransportError};
pub use identity::{Identity, PeerInfo};
pub use quic::{Frame, Incoming, Received, Responder, Transport, TransportConfig, ALPN};

#[cfg(test)]
mod tests;

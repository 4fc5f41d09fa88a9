//! Typed errors of the transport: identity files, the admin CA, and sends.
//! Every variant names the file or peer it is about, so an operator can act
//! on the message alone.

use crate::id::NodeId;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors from the admin CA, node identities and binding the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0} is missing")]
    Missing(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refusing to overwrite existing {0}")]
    Exists(PathBuf),
    #[error("{path} is not valid PEM: {reason}")]
    NotPem { path: PathBuf, reason: String },
    #[error("{path}: bad private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path}: bad certificate: {reason}")]
    BadCert { path: PathBuf, reason: String },
    #[error("private key {key} does not match the certificate {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{cert} is not accepted under the CA in {ca}: {reason}")]
    NotSignedByCa {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("{path} expired at unix time {not_after}")]
    Expired { path: PathBuf, not_after: i64 },
    #[error("{path} is not valid before unix time {not_before} (check the clock)")]
    NotYetValid { path: PathBuf, not_before: i64 },
    #[error("invalid certificate request: {0}")]
    InvalidRequest(String),
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("invalid transport configuration: {0}")]
    Config(String),
    #[error("TLS configuration failed: {0}")]
    Tls(String),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Errors of one send, request or connect.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("transport is closed")]
    Closed,
    #[error("refusing to connect to our own address {0}")]
    SelfAddress(SocketAddr),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{addr}: timed out {what}")]
    Timeout {
        addr: SocketAddr,
        what: &'static str,
    },
    #[error("{addr} does not own {expected:?} (certificate of {name:?})")]
    WrongPeer {
        addr: SocketAddr,
        expected: NodeId,
        name: String,
    },
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("{addr}: connection lost: {reason}")]
    ConnectionLost { addr: SocketAddr, reason: String },
    #[error("{addr} refused the frame: {reason}")]
    Refused { addr: SocketAddr, reason: String },
    #[error("{addr}: stream failed: {reason}")]
    Stream { addr: SocketAddr, reason: String },
    #[error("{addr} sent a bad reply: {reason}")]
    BadReply { addr: SocketAddr, reason: String },
}

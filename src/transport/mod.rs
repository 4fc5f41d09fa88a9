//! Transport: QUIC (quinn on smol) with mutual TLS (rustls, ring), and the
//! admin CA (rcgen) that certifies every node. Owns identity: a peer's vnode
//! ids are derived here from its certificate. Calls nothing above it.

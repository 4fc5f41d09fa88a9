//! A node's own identity (its key and CA-signed certificate, loaded from the
//! data dir) and what a peer's certificate proves about it.

use super::ca::{self, CA_CERT, NODE_CERT, NODE_KEY};
use super::cert::{self, CertFields};
use super::error::TransportError;
use crate::id::NodeId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// This node's certificate, key and trust root. Debug never shows the key.
pub struct Identity {
    dir: PathBuf,
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) ca: CertificateDer<'static>,
    fields: CertFields,
    ids: Vec<NodeId>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            dir: self.dir.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
            fields: self.fields.clone(),
            ids: self.ids.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .field("name", &self.fields.name)
            .field("zone", &self.fields.zone)
            .field("max_vnodes", &self.fields.max_vnodes)
            .field("vnode0", &self.ids.first())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads `node.key`, `node.crt` and `ca.crt` from `dir` and checks them
    /// as a peer would: the key is private (0600) and matches the
    /// certificate, the certificate carries the capy extension, is within
    /// its validity period and chains to `ca.crt`.
    pub fn load(dir: &Path) -> Result<Identity, TransportError> {
        let id = Self::read(dir)?;
        let cert_path = dir.join(NODE_CERT);
        let now = UnixTime::now().as_secs() as i64;
        if now < id.fields.not_before {
            return Err(TransportError::NotYetValid {
                path: cert_path,
                not_before: id.fields.not_before,
            });
        }
        if now > id.fields.not_after {
            return Err(TransportError::Expired {
                path: cert_path,
                not_after: id.fields.not_after,
            });
        }
        cert::verify_chain(&id.ca, &id.cert, UnixTime::now()).map_err(|reason| {
            TransportError::NotSignedByCa {
                cert: cert_path,
                ca: dir.join(CA_CERT),
                reason,
            }
        })?;
        Ok(id)
    }

    /// Reads and parses the files with every check but time and chain, so
    /// tests can build identities a peer must refuse.
    pub(crate) fn read(dir: &Path) -> Result<Identity, TransportError> {
        let key_path = dir.join(NODE_KEY);
        let cert_path = dir.join(NODE_CERT);
        let ca_path = dir.join(CA_CERT);
        let cert = ca::read_one_cert(&cert_path)?;
        let ca_der = ca::read_one_cert(&ca_path)?;
        match cert::is_ca_cert(&ca_der) {
            Ok(true) => {}
            Ok(false) => {
                return Err(TransportError::BadCert {
                    path: ca_path,
                    reason: "not a CA certificate".into(),
                })
            }
            Err(reason) => {
                return Err(TransportError::BadCert {
                    path: ca_path,
                    reason,
                })
            }
        }
        ca::check_key_mode(&key_path)?;
        let key_bytes = ca::read_bytes(&key_path)?;
        let key = match rustls_pemfile::private_key(&mut key_bytes.as_slice()) {
            Ok(Some(k)) => k,
            Ok(None) => {
                return Err(TransportError::NotPem {
                    path: key_path,
                    reason: "no PRIVATE KEY block found".into(),
                })
            }
            Err(e) => {
                return Err(TransportError::NotPem {
                    path: key_path,
                    reason: e.to_string(),
                })
            }
        };
        let bad_key = |reason: String| TransportError::BadKey {
            path: key_path.clone(),
            reason,
        };
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| bad_key(e.to_string()))?;
        let fields = cert::parse_node_cert(&cert).map_err(|reason| TransportError::BadCert {
            path: cert_path.clone(),
            reason,
        })?;
        let public = signer
            .public_key()
            .ok_or_else(|| bad_key("cannot derive its public key".into()))?;
        if public.as_ref() != fields.spki.as_slice() {
            return Err(TransportError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        let ids = vnode_ids(&fields);
        Ok(Identity {
            dir: dir.to_path_buf(),
            cert,
            key,
            ca: ca_der,
            fields,
            ids,
        })
    }

    /// DER SubjectPublicKeyInfo of this node's key.
    pub fn spki(&self) -> &[u8] {
        &self.fields.spki
    }
    pub fn vnode_id(&self, i: u32) -> NodeId {
        NodeId::for_vnode(&self.fields.spki, i)
    }
    /// Ids of vnodes 0..max_vnodes.
    pub fn vnode_ids(&self) -> &[NodeId] {
        &self.ids
    }
    pub fn max_vnodes(&self) -> u32 {
        self.fields.max_vnodes
    }
    pub fn zone(&self) -> &str {
        &self.fields.zone
    }
    pub fn name(&self) -> &str {
        &self.fields.name
    }
    /// Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.fields.not_after
    }
    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn vnode_ids(f: &CertFields) -> Vec<NodeId> {
    (0..f.max_vnodes)
        .map(|i| NodeId::for_vnode(&f.spki, i))
        .collect()
}

/// What a peer's certificate, verified by the handshake, proves: where it
/// is, its key, and so which vnode ids it may claim.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub spki: Vec<u8>,
    pub max_vnodes: u32,
    pub zone: String,
    pub name: String,
    ids: Vec<NodeId>,
}

impl fmt::Debug for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{} ({} vnodes, zone {})",
            self.name, self.addr, self.max_vnodes, self.zone
        )
    }
}

impl PeerInfo {
    /// Reads a peer certificate that the TLS handshake already verified.
    pub fn from_cert(addr: SocketAddr, der: &[u8]) -> Result<PeerInfo, String> {
        let f = cert::parse_node_cert(der)?;
        let ids = vnode_ids(&f);
        Ok(PeerInfo {
            addr,
            spki: f.spki,
            max_vnodes: f.max_vnodes,
            zone: f.zone,
            name: f.name,
            ids,
        })
    }

    /// True when `id` is `for_vnode(spki, i)` for some `i < max_vnodes`.
    pub fn owns(&self, id: NodeId) -> bool {
        self.ids.contains(&id)
    }

    /// All ids the peer may serve, vnode 0 first.
    pub fn vnode_ids(&self) -> &[NodeId] {
        &self.ids
    }
}

//! The admin CA: creating it, issuing node certificates, and the dev
//! identity a single node makes for itself when it has none.
//!
//! Files (PEM; keys are PKCS#8 ECDSA P-256, written with mode 0600):
//! - CA dir: `ca.key`, `ca.crt`.
//! - node dir: `node.key`, `node.crt`, `ca.crt` (a copy of the CA's
//!   certificate, the only trust root of the node).

use super::cert::{self, CapyExt, CertFields, SERVER_NAME};
use super::error::TransportError;
use crate::id::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub const CA_KEY: &str = "ca.key";
pub const CA_CERT: &str = "ca.crt";
pub const NODE_KEY: &str = "node.key";
pub const NODE_CERT: &str = "node.crt";
/// Sub-directory of a data dir holding the dev CA of
/// [`ensure_dev_identity`].
pub const DEV_CA_DIR: &str = "dev-ca";
/// Vnodes granted to a dev identity: enough for the vnode game to have
/// something to decide on a single machine.
pub const DEV_MAX_VNODES: u32 = 8;

const DAY: u64 = 86_400;
/// The CA outlives the default node certificate (10 years) with margin.
const CA_VALID_DAYS: u64 = 30 * 365;
/// Node certificates start an hour in the past so a gateway whose clock is
/// slightly behind the CA host's still accepts a fresh certificate.
const BACKDATE: Duration = Duration::from_secs(3600);

/// What `ca_init` created.
#[derive(Debug, Clone)]
pub struct CaInfo {
    pub key_path: PathBuf,
    pub cert_path: PathBuf,
    /// SHA-256 of the CA certificate's DER, hex: what an operator compares.
    pub fingerprint: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// What a node certificate should say.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// Subject common name: 1..=64 of `[A-Za-z0-9._-]`.
    pub name: String,
    /// 1..=[`cert::MAX_VNODES`]; default 1.
    pub max_vnodes: u32,
    /// Same alphabet as the name; default "default".
    pub zone: String,
    /// Validity from now; default 3650. Capped at the CA's own expiry.
    pub valid_days: u32,
    /// Overrides for tests (and for pre-dating); when set they are used as
    /// given, without the cap.
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
}

impl IssueRequest {
    pub fn new(name: impl Into<String>) -> Self {
        IssueRequest {
            name: name.into(),
            max_vnodes: 1,
            zone: "default".into(),
            valid_days: 3650,
            not_before: None,
            not_after: None,
        }
    }
}

/// What `ca_issue` wrote.
#[derive(Debug, Clone)]
pub struct NodeCertInfo {
    pub key_path: PathBuf,
    pub cert_path: PathBuf,
    pub ca_path: PathBuf,
    pub name: String,
    pub zone: String,
    pub max_vnodes: u32,
    /// DER SubjectPublicKeyInfo of the new key.
    pub spki: Vec<u8>,
    /// Unix seconds.
    pub not_after: i64,
}

impl NodeCertInfo {
    /// Id of vnode `i` of the new node.
    pub fn vnode_id(&self, i: u32) -> NodeId {
        NodeId::for_vnode(&self.spki, i)
    }
}

/// Creates the CA key (0600) and self-signed CA certificate in `dir`,
/// creating `dir` (0700) if needed. Refuses if either file exists: a CA is
/// never silently replaced, since every node trusts exactly one.
pub fn ca_init(dir: &Path) -> Result<CaInfo, TransportError> {
    let key_path = dir.join(CA_KEY);
    let cert_path = dir.join(CA_CERT);
    for p in [&key_path, &cert_path] {
        if p.exists() {
            return Err(TransportError::Exists(p.clone()));
        }
    }
    create_private_dir(dir)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    // A distinct name per CA: verifiers match issuers by name, so two CAs
    // sharing one would make "wrong CA" look like "bad signature".
    let tag: [u8; 4] = rand::random();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("capy admin CA {}", hex::encode(tag)),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + Duration::from_secs(CA_VALID_DAYS * DAY)).into();
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(gen_err)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_path, cert.pem().as_bytes(), 0o644) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    let not_after = x509_parser::parse_x509_certificate(cert.der())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .map_err(|e| TransportError::Generate(e.to_string()))?;
    Ok(CaInfo {
        key_path,
        cert_path,
        fingerprint: fingerprint(cert.der()),
        not_after,
    })
}

/// Issues a node certificate signed by the CA in `ca_dir` and writes
/// `node.key` (0600), `node.crt` and `ca.crt` into `out_dir`. Refuses to
/// overwrite a node key or certificate; an existing `ca.crt` is accepted
/// only if it is this CA's.
pub fn ca_issue(
    ca_dir: &Path,
    req: &IssueRequest,
    out_dir: &Path,
) -> Result<NodeCertInfo, TransportError> {
    cert::check_label("name", &req.name).map_err(TransportError::InvalidRequest)?;
    let ext = CapyExt {
        max_vnodes: req.max_vnodes,
        zone: req.zone.clone(),
    }
    .encode()
    .map_err(TransportError::InvalidRequest)?;
    if req.valid_days == 0 {
        return Err(TransportError::InvalidRequest(
            "valid_days must be at least 1".into(),
        ));
    }

    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_cert_path = ca_dir.join(CA_CERT);
    check_key_mode(&ca_key_path)?;
    let ca_key_pem = read_text(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TransportError::BadKey {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let ca_der = read_one_cert(&ca_cert_path)?;
    let bad_ca = |reason: String| TransportError::BadCert {
        path: ca_cert_path.clone(),
        reason,
    };
    if !cert::is_ca_cert(&ca_der).map_err(&bad_ca)? {
        return Err(bad_ca("not a CA certificate".into()));
    }
    let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| bad_ca(format!("not X.509: {e}")))?;
    if ca_x509.public_key().raw != ca_key.public_key_der().as_slice() {
        return Err(TransportError::KeyMismatch {
            key: ca_key_path,
            cert: ca_cert_path,
        });
    }
    let ca_not_after = ca_x509.validity().not_after.timestamp();
    let ca_params = CertificateParams::from_ca_cert_der(&ca_der)
        .map_err(|e| bad_ca(format!("cannot use as issuer: {e}")))?;
    let issuer = ca_params.self_signed(&ca_key).map_err(gen_err)?;

    let key_path = out_dir.join(NODE_KEY);
    let cert_path = out_dir.join(NODE_CERT);
    let ca_path = out_dir.join(CA_CERT);
    for p in [&key_path, &cert_path] {
        if p.exists() {
            return Err(TransportError::Exists(p.clone()));
        }
    }
    let ca_pem = read_text(&ca_cert_path)?;
    let write_ca = match fs::read(&ca_path) {
        Ok(existing) if existing == ca_pem.as_bytes() => false,
        Ok(_) => return Err(TransportError::Exists(ca_path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(source) => {
            return Err(TransportError::Read {
                path: ca_path,
                source,
            })
        }
    };

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(gen_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, req.name.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            cert::CAPY_EXT_OID,
            ext,
        ));
    let now = SystemTime::now();
    let not_before = req.not_before.unwrap_or(now - BACKDATE);
    let not_after = match req.not_after {
        Some(t) => t,
        None => {
            let wanted = now + Duration::from_secs(u64::from(req.valid_days) * DAY);
            let cap = SystemTime::UNIX_EPOCH + Duration::from_secs(ca_not_after.max(0) as u64);
            wanted.min(cap)
        }
    };
    if not_after <= not_before {
        return Err(TransportError::InvalidRequest(
            "not_after must be later than not_before".into(),
        ));
    }
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let node_cert = params.signed_by(&key, &issuer, &ca_key).map_err(gen_err)?;
    let fields: CertFields =
        cert::parse_node_cert(node_cert.der()).map_err(TransportError::Generate)?;

    fs::create_dir_all(out_dir).map_err(|source| TransportError::Write {
        path: out_dir.to_path_buf(),
        source,
    })?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_path, node_cert.pem().as_bytes(), 0o644) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    if write_ca {
        write_new(&ca_path, ca_pem.as_bytes(), 0o644)?;
    }
    Ok(NodeCertInfo {
        key_path,
        cert_path,
        ca_path,
        name: fields.name,
        zone: fields.zone,
        max_vnodes: fields.max_vnodes,
        spki: fields.spki,
        not_after: fields.not_after,
    })
}

/// When `data_dir` has no `node.crt`, creates a dev CA in
/// `data_dir/dev-ca` (unless one is there) and issues a node certificate
/// into `data_dir` with [`DEV_MAX_VNODES`]. Returns whether it created one,
/// so the caller can say so in its log: a node on a dev CA only talks to
/// nodes issued by that same dev CA.
pub fn ensure_dev_identity(data_dir: &Path) -> Result<bool, TransportError> {
    if data_dir.join(NODE_CERT).exists() {
        return Ok(false);
    }
    fs::create_dir_all(data_dir).map_err(|source| TransportError::Write {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let ca_dir = data_dir.join(DEV_CA_DIR);
    if !ca_dir.join(CA_KEY).exists() {
        ca_init(&ca_dir)?;
    }
    let mut req = IssueRequest::new("dev-node");
    req.max_vnodes = DEV_MAX_VNODES;
    ca_issue(&ca_dir, &req, data_dir)?;
    Ok(true)
}

/// Hex SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(der))
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    // positive and exactly 16 bytes long in DER
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

fn gen_err(e: rcgen::Error) -> TransportError {
    TransportError::Generate(e.to_string())
}

fn create_private_dir(dir: &Path) -> Result<(), TransportError> {
    let existed = dir.exists();
    fs::create_dir_all(dir).map_err(|source| TransportError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    if !existed {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            TransportError::Write {
                path: dir.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Writes a file that must not exist yet, with `mode` from the start (no
/// window where a key is world-readable).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TransportError> {
    let werr = |source| TransportError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TransportError::Exists(path.to_path_buf())
            } else {
                werr(e)
            }
        })?;
    f.write_all(bytes).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    Ok(())
}

pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, TransportError> {
    fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TransportError::Missing(path.to_path_buf())
        } else {
            TransportError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn read_text(path: &Path) -> Result<String, TransportError> {
    String::from_utf8(read_bytes(path)?).map_err(|_| TransportError::NotPem {
        path: path.to_path_buf(),
        reason: "not text".into(),
    })
}

/// Refuses a private key that group or others can read, like ssh does.
pub(crate) fn check_key_mode(path: &Path) -> Result<(), TransportError> {
    let meta = fs::metadata(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TransportError::Missing(path.to_path_buf())
        } else {
            TransportError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TransportError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Reads a PEM file that must hold exactly one certificate and nothing else.
pub(crate) fn read_one_cert(
    path: &Path,
) -> Result<rustls::pki_types::CertificateDer<'static>, TransportError> {
    let bytes = read_bytes(path)?;
    let not_pem = |reason: String| TransportError::NotPem {
        path: path.to_path_buf(),
        reason,
    };
    let mut certs = Vec::new();
    let mut others = 0usize;
    for item in rustls_pemfile::read_all(&mut bytes.as_slice()) {
        match item.map_err(|e| not_pem(format!("{e:?}")))? {
            rustls_pemfile::Item::X509Certificate(c) => certs.push(c),
            _ => others += 1,
        }
    }
    if certs.is_empty() && others == 0 {
        return Err(not_pem("no PEM block found".into()));
    }
    if certs.len() != 1 || others != 0 {
        return Err(TransportError::BadCert {
            path: path.to_path_buf(),
            reason: format!(
                "expected exactly one CERTIFICATE block, found {} certificate(s) and {} other block(s)",
                certs.len(),
                others
            ),
        });
    }
    Ok(certs.remove(0))
}

//! What a capy node certificate says and how it is checked: the capy X.509
//! extension (max vnodes, zone), the fields read back from a certificate, and
//! chain verification against the admin CA with the same verifiers the TLS
//! handshake uses.

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::sync::Arc;
use x509_parser::der_parser::oid::Oid;

/// Arc of the capy node extension. A project-private arc in the IANA private
/// enterprise space, not registered; only the capy admin CA issues
/// certificates carrying it, so a clash cannot confuse a capy verifier.
pub const CAPY_EXT_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 59595, 1, 1];

/// TLS server name every node certificate carries: nodes are addressed by
/// id and address, never by DNS.
pub const SERVER_NAME: &str = "capy.node";

/// Most vnodes a certificate may grant. Bounds the work of recomputing a
/// peer's ids and what a single key can claim on the ring.
pub const MAX_VNODES: u32 = 64;

/// Longest node name or zone, in bytes.
pub const MAX_LABEL: usize = 64;

/// Version of the extension encoding below.
const EXT_VERSION: u8 = 1;

/// The capy fields a node certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapyExt {
    pub max_vnodes: u32,
    pub zone: String,
}

/// Checks a node name or zone: 1..=64 bytes of `[A-Za-z0-9._-]`, so it is
/// safe in a subject, a log line and a file name.
pub fn check_label(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_LABEL {
        return Err(format!(
            "{what} must be 1..={MAX_LABEL} bytes, got {}",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {s:?} contains {c:?}; allowed: A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

impl CapyExt {
    /// DER of `SEQUENCE { version INTEGER (1), maxVnodes INTEGER (1..64),
    /// zone UTF8String (SIZE (1..64)) }`. Every value fits a one-byte
    /// integer and a short-form length, which keeps the decoder trivial to
    /// make strict.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        check_vnodes(self.max_vnodes)?;
        check_label("zone", &self.zone)?;
        let z = self.zone.as_bytes();
        let mut inner = vec![0x02, 0x01, EXT_VERSION, 0x02, 0x01, self.max_vnodes as u8];
        inner.push(0x0c);
        inner.push(z.len() as u8);
        inner.extend_from_slice(z);
        let mut out = vec![0x30, inner.len() as u8];
        out.extend_from_slice(&inner);
        Ok(out)
    }

    /// Strict inverse of [`CapyExt::encode`]: any other byte string is an
    /// error, including trailing bytes and non-minimal encodings.
    pub fn decode(der: &[u8]) -> Result<CapyExt, String> {
        let bad = |what: &str| format!("capy extension: {what}");
        let [0x30, len, rest @ ..] = der else {
            return Err(bad("not a DER SEQUENCE"));
        };
        if *len as usize != rest.len() || *len >= 0x80 {
            return Err(bad("SEQUENCE length does not match its content"));
        }
        let [0x02, 0x01, version, 0x02, 0x01, vn, 0x0c, zlen, zone @ ..] = rest else {
            return Err(bad(
                "expected INTEGER version, INTEGER maxVnodes, UTF8String zone",
            ));
        };
        if *version != EXT_VERSION {
            return Err(bad(&format!("unsupported version {version}")));
        }
        let max_vnodes = u32::from(*vn);
        check_vnodes(max_vnodes).map_err(|e| bad(&e))?;
        if *zlen as usize != zone.len() || *zlen >= 0x80 {
            return Err(bad("zone length does not match"));
        }
        let zone = std::str::from_utf8(zone)
            .map_err(|_| bad("zone is not UTF-8"))?
            .to_string();
        check_label("zone", &zone).map_err(|e| bad(&e))?;
        Ok(CapyExt { max_vnodes, zone })
    }
}

/// 1..=MAX_VNODES.
pub fn check_vnodes(n: u32) -> Result<(), String> {
    if n == 0 || n > MAX_VNODES {
        return Err(format!("max_vnodes must be 1..={MAX_VNODES}, got {n}"));
    }
    Ok(())
}

/// Fields of a node certificate, read back with x509-parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFields {
    /// DER SubjectPublicKeyInfo: what vnode ids are hashed from.
    pub spki: Vec<u8>,
    pub name: String,
    pub max_vnodes: u32,
    pub zone: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// Parses a node certificate and its capy extension. Does not check the
/// signature or validity period; [`verify_chain`] does.
pub fn parse_node_cert(der: &[u8]) -> Result<CertFields, String> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not X.509: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ));
    }
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or("no common name in the subject")?
        .as_str()
        .map_err(|e| format!("common name is not a string: {e}"))?
        .to_string();
    check_label("name", &name)?;
    let oid = Oid::from(CAPY_EXT_OID).map_err(|e| format!("capy OID: {e:?}"))?;
    let mut found = cert.extensions().iter().filter(|e| e.oid == oid);
    let ext = found.next().ok_or("no capy extension (max vnodes, zone)")?;
    if found.next().is_some() {
        return Err("capy extension appears twice".into());
    }
    let capy = CapyExt::decode(ext.value)?;
    let v = cert.validity();
    Ok(CertFields {
        spki: cert.public_key().raw.to_vec(),
        name,
        max_vnodes: capy.max_vnodes,
        zone: capy.zone,
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
    })
}

/// True when `der` parses as a certificate marked as a CA.
pub fn is_ca_cert(der: &[u8]) -> Result<bool, String> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not X.509: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ));
    }
    Ok(cert.is_ca())
}

/// The one crypto provider of the transport: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The admin CA as the only trust root.
pub fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| format!("CA certificate rejected as a trust root: {e}"))?;
    Ok(Arc::new(roots))
}

/// Checks `cert` the way both ends of a handshake will: as a client
/// certificate and as a server certificate for [`SERVER_NAME`], chained to
/// `ca` alone, at `now`.
pub fn verify_chain(
    ca: &CertificateDer<'static>,
    cert: &CertificateDer<'static>,
    now: UnixTime,
) -> Result<(), String> {
    let roots = roots(ca)?;
    let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| e.to_string())?;
    client
        .verify_client_cert(cert, &[], now)
        .map_err(|e| describe_tls_error(&e))?;
    let server = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| e.to_string())?;
    server
        .verify_server_cert(cert, &[], &name, &[], now)
        .map_err(|e| describe_tls_error(&e))?;
    Ok(())
}

/// Words for the certificate errors an operator will meet.
pub fn describe_tls_error(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "not signed by this CA (unknown issuer)".into()
        }
        rustls::Error::InvalidCertificate(C::BadSignature) => {
            "not signed by this CA (signature does not verify against its key)".into()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ext_roundtrip_and_exact_bytes() {
        let e = CapyExt {
            max_vnodes: 8,
            zone: "eu-1".into(),
        };
        let der = e.encode().unwrap();
        assert_eq!(
            der,
            [0x30, 12, 2, 1, 1, 2, 1, 8, 0x0c, 4, b'e', b'u', b'-', b'1']
        );
        assert_eq!(CapyExt::decode(&der).unwrap(), e);
    }

    #[test]
    fn ext_rejects_bad_values() {
        let mut e = CapyExt {
            max_vnodes: 0,
            zone: "z".into(),
        };
        assert!(e.encode().is_err());
        e.max_vnodes = MAX_VNODES + 1;
        assert!(e.encode().is_err());
        e.max_vnodes = 1;
        e.zone = "a b".into();
        assert!(e.encode().is_err());
        e.zone = "z".repeat(MAX_LABEL + 1);
        assert!(e.encode().is_err());
        // version 2, maxVnodes 65, trailing byte, truncated
        assert!(CapyExt::decode(&[0x30, 9, 2, 1, 2, 2, 1, 1, 0x0c, 1, b'z']).is_err());
        assert!(CapyExt::decode(&[0x30, 9, 2, 1, 1, 2, 1, 65, 0x0c, 1, b'z']).is_err());
        assert!(CapyExt::decode(&[0x30, 9, 2, 1, 1, 2, 1, 1, 0x0c, 1, b'z', 0]).is_err());
        assert!(CapyExt::decode(&[0x30, 9, 2, 1, 1, 2, 1, 1, 0x0c, 1]).is_err());
        assert!(CapyExt::decode(&[0x30, 9, 2, 1, 1, 2, 1, 1, 0x0c, 1, b'z']).is_ok());
    }

    proptest! {
        #[test]
        fn ext_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(e) = CapyExt::decode(&bytes) {
                // anything accepted re-encodes to exactly the same bytes
                prop_assert_eq!(e.encode().unwrap(), bytes);
            }
        }

        #[test]
        fn ext_roundtrips(n in 1u32..=MAX_VNODES, zone in "[a-zA-Z0-9._-]{1,64}") {
            let e = CapyExt { max_vnodes: n, zone };
            prop_assert_eq!(CapyExt::decode(&e.encode().unwrap()).unwrap(), e);
        }
    }
}

//! Presigned blob URLs: HMAC-SHA256 over the method, the object, the blob,
//! the blob version and the expiry time, so a URL grants exactly one
//! operation (GET or PUT) on one version of one blob until it expires. The
//! key is the cluster's: every node holds the same one, so any node can
//! check a URL another node signed (see `node::objects` for where the key
//! comes from). Verification compares in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

/// The operation a URL grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobMethod {
    Get,
    Put,
}

impl fmt::Display for BlobMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlobMethod::Get => "GET",
            BlobMethod::Put => "PUT",
        })
    }
}

impl BlobMethod {
    pub fn parse(s: &str) -> Option<BlobMethod> {
        match s {
            "GET" | "get" => Some(BlobMethod::Get),
            "PUT" | "put" => Some(BlobMethod::Put),
            _ => None,
        }
    }
}

/// What a valid URL grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub method: BlobMethod,
    pub object: String,
    pub blob: String,
    pub version: u64,
    pub expires: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PresignError {
    #[error("not a presigned blob URL: {0}")]
    Malformed(String),
    #[error("the URL's signature does not match (tampered, or signed by another cluster)")]
    BadSignature,
    #[error("the URL expired {0} s ago")]
    Expired(u64),
    #[error("the URL grants {granted}, not {used}")]
    WrongMethod {
        granted: BlobMethod,
        used: BlobMethod,
    },
}

/// Path prefix of blob URLs on a node's HTTP server.
pub const PREFIX: &str = "/blob/";

#[derive(Clone)]
pub struct Signer {
    /// Keyed once; cloned per URL.
    mac: HmacSha256,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signer(..)")
    }
}

/// An object id: 32 lowercase hex digits.
pub(crate) fn is_object_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

impl Signer {
    /// A signer whose key is derived from the cluster secret (SHA-256 under
    /// a label), so the same secret can serve other purposes without the
    /// keys meeting.
    pub fn new(secret: &[u8]) -> Signer {
        use sha2::Digest;
        let mut h = Sha256::new();
        h.update(b"capy presigned blob urls v1\0");
        h.update(secret);
        // HMAC pads a short key with zeros to the block size: do it here so
        // keying cannot fail.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&h.finalize());
        Signer {
            mac: <HmacSha256 as hmac::digest::KeyInit>::new(&block.into()),
        }
    }

    fn mac(&self, g: &Grant) -> HmacSha256 {
        let mut m = self.mac.clone();
        m.update(
            format!(
                "v1\n{}\n{}\n{}\n{}\n{}",
                g.method, g.object, g.blob, g.version, g.expires
            )
            .as_bytes(),
        );
        m
    }

    /// Path and query of the URL granting `g` (append to a node's base URL).
    pub fn path(&self, g: &Grant) -> String {
        let sig = hex::encode(self.mac(g).finalize().into_bytes());
        format!(
            "{PREFIX}{}/{}/{}?method={}&expires={}&sig={sig}",
            g.object, g.blob, g.version, g.method, g.expires
        )
    }

    /// Checks the path and query of a request made with `used` at
    /// `now` (Unix seconds).
    pub fn verify(
        &self,
        path: &str,
        query: Option<&str>,
        used: BlobMethod,
        now: u64,
    ) -> Result<Grant, PresignError> {
        let bad = |m: &str| PresignError::Malformed(m.to_string());
        let rest = path.strip_prefix(PREFIX).ok_or_else(|| bad("path"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [object, blob, version] = parts.as_slice() else {
            return Err(bad("expected /blob/OBJECT/BLOB/VERSION"));
        };
        if !is_object_id(object) {
            return Err(bad("object id"));
        }
        if !super::package::is_ident(blob) {
            return Err(bad("blob name"));
        }
        let version: u64 = version.parse().map_err(|_| bad("version"))?;
        let (mut method, mut expires, mut sig) = (None, None, None);
        for pair in query.unwrap_or("").split('&') {
            match pair.split_once('=') {
                Some(("method", v)) => method = BlobMethod::parse(v),
                Some(("expires", v)) => expires = v.parse::<u64>().ok(),
                Some(("sig", v)) => sig = hex::decode(v).ok(),
                _ => {}
            }
        }
        let (Some(method), Some(expires), Some(sig)) = (method, expires, sig) else {
            return Err(bad("method, expires and sig are required"));
        };
        let g = Grant {
            method,
            object: object.to_string(),
            blob: blob.to_string(),
            version,
            expires,
        };
        self.mac(&g)
            .verify_slice(&sig)
            .map_err(|_| PresignError::BadSignature)?;
        if now > expires {
            return Err(PresignError::Expired(now - expires));
        }
        if method != used {
            return Err(PresignError::WrongMethod {
                granted: method,
                used,
            });
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(method: BlobMethod) -> Grant {
        Grant {
            method,
            object: "0123456789abcdef0123456789abcdef".into(),
            blob: "video".into(),
            version: 7,
            expires: 1_000,
        }
    }

    fn split(url: &str) -> (&str, Option<&str>) {
        match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        }
    }

    #[test]
    fn a_signed_url_verifies_on_another_node_with_the_same_secret() {
        let a = Signer::new(b"cluster secret");
        let b = Signer::new(b"cluster secret");
        let url = a.path(&grant(BlobMethod::Put));
        let (p, q) = split(&url);
        assert_eq!(
            b.verify(p, q, BlobMethod::Put, 999),
            Ok(grant(BlobMethod::Put))
        );
        assert_eq!(
            b.verify(p, q, BlobMethod::Put, 1_000),
            Ok(grant(BlobMethod::Put))
        );
    }

    #[test]
    fn tamper_expiry_method_and_other_clusters_are_refused() {
        let s = Signer::new(b"k");
        let url = s.path(&grant(BlobMethod::Get));
        let (p, q) = split(&url);
        assert_eq!(
            s.verify(p, q, BlobMethod::Get, 1_005),
            Err(PresignError::Expired(5))
        );
        assert!(matches!(
            s.verify(p, q, BlobMethod::Put, 10),
            Err(PresignError::WrongMethod { .. })
        ));
        assert_eq!(
            Signer::new(b"other").verify(p, q, BlobMethod::Get, 10),
            Err(PresignError::BadSignature)
        );
        // Every field is covered by the signature.
        let tampered = [
            url.replace("/7?", "/8?"),
            url.replace("/video/", "/audio/"),
            url.replace(
                "0123456789abcdef0123456789abcdef",
                "1123456789abcdef0123456789abcdef",
            ),
            url.replace("expires=1000", "expires=9000"),
            url.replace("method=GET", "method=PUT"),
        ];
        for t in &tampered {
            assert_ne!(t, &url);
            let (p, q) = split(t);
            let used = if t.contains("method=PUT") {
                BlobMethod::Put
            } else {
                BlobMethod::Get
            };
            assert_eq!(
                s.verify(p, q, used, 10),
                Err(PresignError::BadSignature),
                "{t}"
            );
        }
        let mut sig_flip = url.clone();
        let last = sig_flip.pop().unwrap();
        sig_flip.push(if last == '0' { '1' } else { '0' });
        let (p, q) = split(&sig_flip);
        assert_eq!(
            s.verify(p, q, BlobMethod::Get, 10),
            Err(PresignError::BadSignature)
        );
        for junk in [
            "/blob/x/y/z",
            "/blob/0123456789abcdef0123456789abcdef/video",
            "/other",
        ] {
            assert!(matches!(
                s.verify(junk, q, BlobMethod::Get, 10),
                Err(PresignError::Malformed(_))
            ));
        }
        assert!(matches!(
            s.verify(p, None, BlobMethod::Get, 10),
            Err(PresignError::Malformed(_))
        ));
    }
}

//! Real files and real QUIC sockets on 127.0.0.1.

use super::*;
use crate::id::NodeId;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;

const DAY: Duration = Duration::from_secs(86_400);

fn new_ca(root: &Path, name: &str) -> PathBuf {
    // Install the log capture before any test reaches a log call site, so
    // no call site caches "no subscriber" while it is being installed.
    captured_logs();
    let dir = root.join(name);
    ca_init(&dir).unwrap();
    dir
}

fn issue(ca: &Path, root: &Path, name: &str, max_vnodes: u32) -> PathBuf {
    let out = root.join(name);
    let mut req = IssueRequest::new(name);
    req.max_vnodes = max_vnodes;
    ca_issue(ca, &req, &out).unwrap();
    out
}

fn node(ca: &Path, root: &Path, name: &str, max_vnodes: u32) -> Identity {
    Identity::load(&issue(ca, root, name, max_vnodes)).unwrap()
}

fn cfg() -> TransportConfig {
    TransportConfig {
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(3),
        ..TransportConfig::default()
    }
}

fn bind(id: &Identity) -> (Transport, Incoming) {
    bind_cfg(id, cfg())
}

fn bind_cfg(id: &Identity, c: TransportConfig) -> (Transport, Incoming) {
    Transport::bind(id, "127.0.0.1:0".parse().unwrap(), c).unwrap()
}

fn frame(from: NodeId, to: NodeId, body: &[u8]) -> Frame {
    Frame {
        from,
        to,
        body: body.to_vec(),
    }
}

async fn recv(inc: &Incoming) -> Received {
    match futures_lite::future::or(async { Some(inc.recv().await) }, async {
        smol::Timer::after(Duration::from_secs(5)).await;
        None
    })
    .await
    {
        Some(Ok(r)) => r,
        Some(Err(_)) => panic!("incoming closed"),
        None => panic!("nothing received within 5 s"),
    }
}

/// Nothing arrives within `d`.
async fn quiet(inc: &Incoming, d: Duration) -> bool {
    futures_lite::future::or(async { inc.recv().await.is_err() }, async {
        smol::Timer::after(d).await;
        true
    })
    .await
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Answers every request with its body reversed, from vnode 0 of `id`.
fn echo(id: &Identity, inc: Incoming) {
    let me = id.vnode_id(0);
    smol::spawn(async move {
        while let Ok(r) = inc.recv().await {
            if let Some(reply) = r.reply {
                let mut body = r.frame.body.clone();
                body.reverse();
                let _ = reply.send(frame(me, r.frame.from, &body)).await;
            }
        }
    })
    .detach();
}

// ---------------------------------------------------------------- CA files

#[test]
fn ca_init_and_issue_write_private_keys_that_load_back() {
    let t = TempDir::new().unwrap();
    let ca = t.path().join("ca");
    let info = ca_init(&ca).unwrap();
    assert_eq!(info.key_path, ca.join(CA_KEY));
    assert_eq!(mode(&info.key_path), 0o600);
    assert_eq!(mode(&ca), 0o700);
    assert_eq!(info.fingerprint.len(), 64);
    assert!(
        info.not_after
            > (SystemTime::now() + 20 * 365 * DAY)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
    );
    // a CA is never replaced
    match ca_init(&ca) {
        Err(TransportError::Exists(p)) => assert_eq!(p, ca.join(CA_KEY)),
        other => panic!("expected Exists, got {other:?}"),
    }

    let out = t.path().join("gw1");
    let mut req = IssueRequest::new("gw1");
    req.max_vnodes = 5;
    req.zone = "eu-west".into();
    let n = ca_issue(&ca, &req, &out).unwrap();
    assert_eq!(mode(&out.join(NODE_KEY)), 0o600);
    assert!(out.join(NODE_CERT).exists() && out.join(CA_CERT).exists());
    assert_eq!(
        fs::read(out.join(CA_CERT)).unwrap(),
        fs::read(ca.join(CA_CERT)).unwrap()
    );

    let id = Identity::load(&out).unwrap();
    assert_eq!(id.name(), "gw1");
    assert_eq!(id.zone(), "eu-west");
    assert_eq!(id.max_vnodes(), 5);
    assert_eq!(id.spki(), n.spki.as_slice());
    assert_eq!(id.vnode_ids().len(), 5);
    for i in 0..5 {
        assert_eq!(id.vnode_id(i), NodeId::for_vnode(id.spki(), i));
        assert_eq!(id.vnode_ids()[i as usize], n.vnode_id(i));
    }
    let ten_years = SystemTime::now() + 3650 * DAY;
    let expect = ten_years
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (id.not_after() - expect).abs() < 120,
        "{} vs {}",
        id.not_after(),
        expect
    );
    assert!(!format!("{id:?}").contains("PRIVATE"));

    // the node's key is never overwritten
    match ca_issue(&ca, &req, &out) {
        Err(TransportError::Exists(p)) => assert_eq!(p, out.join(NODE_KEY)),
        other => panic!("expected Exists, got {other:?}"),
    }
    // two nodes get different keys and so different ids
    let other = node(&ca, t.path(), "gw2", 1);
    assert_ne!(other.vnode_id(0), id.vnode_id(0));
}

#[test]
fn issue_rejects_bad_requests() {
    let t = TempDir::new().unwrap();
    let ca = new_ca(t.path(), "ca");
    let bad = [
        IssueRequest {
            max_vnodes: 0,
            ..IssueRequest::new("a")
        },
        IssueRequest {
            max_vnodes: MAX_VNODES + 1,
            ..IssueRequest::new("a")
        },
        IssueRequest::new("has space"),
        IssueRequest::new(""),
        IssueRequest::new("x".repeat(MAX_LABEL + 1)),
        IssueRequest {
            zone: "a/b".into(),
            ..IssueRequest::new("a")
        },
        IssueRequest {
            valid_days: 0,
            ..IssueRequest::new("a")
        },
    ];
    for req in &bad {
        match ca_issue(&ca, req, &t.path().join("out")) {
            Err(TransportError::InvalidRequest(_)) => {}
            other => panic!("{req:?}: expected InvalidRequest, got {other:?}"),
        }
    }
    assert!(
        !t.path().join("out").exists(),
        "nothing written for bad requests"
    );
    let ok = IssueRequest {
        max_vnodes: MAX_VNODES,
        ..IssueRequest::new("a")
    };
    ca_issue(&ca, &ok, &t.path().join("out")).unwrap();
    // an issuer dir without its key
    fs::remove_file(ca.join(CA_KEY)).unwrap();
    let e = ca_issue(&ca, &IssueRequest::new("b"), &t.path().join("b")).unwrap_err();
    assert!(
        matches!(e, TransportError::Missing(ref p) if *p == ca.join(CA_KEY)),
        "{e}"
    );
}

/// The message of `Identity::load(dir)`'s error, which must name `file`.
fn load_err(dir: &Path, file: &str) -> (TransportError, String) {
    let e = Identity::load(dir).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&dir.join(file).display().to_string()),
        "error {msg:?} does not name {file}"
    );
    (e, msg)
}

#[test]
fn load_errors_name_the_file_and_the_problem() {
    let t = TempDir::new().unwrap();
    let ca = new_ca(t.path(), "ca");
    let ca2 = new_ca(t.path(), "ca2");
    let fresh = |name: &str| issue(&ca, t.path(), name, 1);

    // missing files
    let d = fresh("missing-crt");
    fs::remove_file(d.join(NODE_CERT)).unwrap();
    let (e, _) = load_err(&d, NODE_CERT);
    assert!(matches!(e, TransportError::Missing(_)));
    let d = fresh("missing-key");
    fs::remove_file(d.join(NODE_KEY)).unwrap();
    assert!(matches!(
        load_err(&d, NODE_KEY).0,
        TransportError::Missing(_)
    ));
    let d = fresh("missing-ca");
    fs::remove_file(d.join(CA_CERT)).unwrap();
    assert!(matches!(
        load_err(&d, CA_CERT).0,
        TransportError::Missing(_)
    ));

    // not PEM, PEM with a broken body, a key where a certificate should be
    let d = fresh("garbage");
    fs::write(d.join(NODE_CERT), b"hello world\n").unwrap();
    let (e, msg) = load_err(&d, NODE_CERT);
    assert!(matches!(e, TransportError::NotPem { .. }), "{msg}");
    let d = fresh("bad-der");
    fs::write(
        d.join(NODE_CERT),
        b"-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(matches!(
        load_err(&d, NODE_CERT).0,
        TransportError::BadCert { .. }
    ));
    let d = fresh("key-as-cert");
    fs::copy(d.join(NODE_KEY), d.join("k")).unwrap();
    fs::write(d.join(NODE_CERT), fs::read(d.join("k")).unwrap()).unwrap();
    assert!(matches!(
        load_err(&d, NODE_CERT).0,
        TransportError::BadCert { .. }
    ));
    let d = fresh("garbage-key");
    fs::write(d.join(NODE_KEY), b"not a key").unwrap();
    fs::set_permissions(d.join(NODE_KEY), fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        load_err(&d, NODE_KEY).0,
        TransportError::NotPem { .. }
    ));
    // a CA file that is a node certificate
    let d = fresh("node-as-ca");
    fs::copy(d.join(NODE_CERT), d.join(CA_CERT)).unwrap();
    let (e, msg) = load_err(&d, CA_CERT);
    assert!(
        matches!(e, TransportError::BadCert { .. }) && msg.contains("not a CA"),
        "{msg}"
    );

    // a readable key
    let d = fresh("open-key");
    fs::set_permissions(d.join(NODE_KEY), fs::Permissions::from_mode(0o644)).unwrap();
    let (e, msg) = load_err(&d, NODE_KEY);
    assert!(
        matches!(e, TransportError::KeyPermissions { mode: 0o644, .. }),
        "{msg}"
    );
    assert!(msg.contains("chmod 600"));

    // someone else's key
    let d = fresh("swapped-key");
    let other = fresh("other");
    fs::remove_file(d.join(NODE_KEY)).unwrap();
    fs::copy(other.join(NODE_KEY), d.join(NODE_KEY)).unwrap();
    let (e, msg) = load_err(&d, NODE_KEY);
    assert!(matches!(e, TransportError::KeyMismatch { .. }), "{msg}");
    assert!(msg.contains(&d.join(NODE_CERT).display().to_string()));

    // a certificate from another CA than ca.crt
    let d = fresh("wrong-ca");
    fs::remove_file(d.join(CA_CERT)).unwrap();
    fs::copy(ca2.join(CA_CERT), d.join(CA_CERT)).unwrap();
    let (e, msg) = load_err(&d, NODE_CERT);
    assert!(matches!(e, TransportError::NotSignedByCa { .. }), "{msg}");
    assert!(msg.contains("not signed by this CA"), "{msg}");
    assert!(
        msg.contains(&d.join(CA_CERT).display().to_string()),
        "{msg}"
    );

    // expired and not yet valid
    let now = SystemTime::now();
    let out = t.path().join("expired");
    let req = IssueRequest {
        not_before: Some(now - 10 * DAY),
        not_after: Some(now - DAY),
        ..IssueRequest::new("expired")
    };
    ca_issue(&ca, &req, &out).unwrap();
    let (e, msg) = load_err(&out, NODE_CERT);
    assert!(matches!(e, TransportError::Expired { .. }), "{msg}");
    let out = t.path().join("future");
    let req = IssueRequest {
        not_before: Some(now + DAY),
        not_after: Some(now + 10 * DAY),
        ..IssueRequest::new("future")
    };
    ca_issue(&ca, &req, &out).unwrap();
    let (e, msg) = load_err(&out, NODE_CERT);
    assert!(matches!(e, TransportError::NotYetValid { .. }), "{msg}");
}

#[test]
fn dev_identity_is_created_once() {
    let t = TempDir::new().unwrap();
    let data = t.path().join("data");
    assert!(ensure_dev_identity(&data).unwrap());
    assert_eq!(mode(&data.join(DEV_CA_DIR).join(CA_KEY)), 0o600);
    let id = Identity::load(&data).unwrap();
    assert_eq!(id.max_vnodes(), DEV_MAX_VNODES);
    assert!(!ensure_dev_identity(&data).unwrap());
    assert_eq!(Identity::load(&data).unwrap().spki(), id.spki());
}

// ---------------------------------------------------------------- QUIC

#[test]
fn two_nodes_exchange_frames_both_ways_and_a_request() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let a = node(&ca, t.path(), "a", 2);
        let b = node(&ca, t.path(), "b", 3);
        let (ta, ia) = bind(&a);
        let (tb, ib) = bind(&b);

        // a -> b, one way, from a's second vnode
        ta.send(
            tb.local_addr(),
            Some(b.vnode_id(2)),
            frame(a.vnode_id(1), b.vnode_id(2), b"hello"),
        )
        .await
        .unwrap();
        let r = recv(&ib).await;
        assert_eq!(r.frame, frame(a.vnode_id(1), b.vnode_id(2), b"hello"));
        assert!(r.reply.is_none());
        assert_eq!(r.peer.name, "a");
        assert_eq!(r.peer.spki, a.spki());
        assert_eq!(r.peer.vnode_ids(), a.vnode_ids());
        assert_eq!(r.peer.addr, ta.local_addr());
        assert!(r.peer.owns(a.vnode_id(0)) && r.peer.owns(a.vnode_id(1)));
        assert!(!r.peer.owns(a.vnode_id(2)));

        // b -> a, one way
        tb.send(
            ta.local_addr(),
            Some(a.vnode_id(0)),
            frame(b.vnode_id(0), a.vnode_id(0), b"back"),
        )
        .await
        .unwrap();
        let r = recv(&ia).await;
        assert_eq!(r.frame.body, b"back");
        assert_eq!(r.peer.name, "b");

        // request/response, both directions
        echo(&b, ib);
        let reply = ta
            .request(
                tb.local_addr(),
                None,
                frame(a.vnode_id(0), b.vnode_id(0), b"abc"),
            )
            .await
            .unwrap();
        assert_eq!(reply, frame(b.vnode_id(0), a.vnode_id(0), b"cba"));
        echo(&a, ia);
        let reply = tb
            .request(
                ta.local_addr(),
                Some(a.vnode_id(1)),
                frame(b.vnode_id(1), a.vnode_id(1), b"xy"),
            )
            .await
            .unwrap();
        assert_eq!(reply.body, b"yx");

        // a large frame under the limit
        let big = vec![7u8; 3 << 20];
        let reply = ta
            .request(
                tb.local_addr(),
                None,
                frame(a.vnode_id(0), b.vnode_id(0), &big),
            )
            .await
            .unwrap();
        assert_eq!(reply.body.len(), big.len());

        // who is there
        let p = ta.peer_info(tb.local_addr()).await.unwrap();
        assert_eq!(p.vnode_ids(), b.vnode_ids());
        assert_eq!((p.max_vnodes, p.zone.as_str()), (3, "default"));

        // a peer that does not own the expected id is refused
        let e = ta
            .send(
                tb.local_addr(),
                Some(a.vnode_id(0)),
                frame(a.vnode_id(0), a.vnode_id(0), b""),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::WrongPeer { .. }), "{e}");
        let e = ta
            .request(
                tb.local_addr(),
                Some(b.vnode_id(3)),
                frame(a.vnode_id(0), b.vnode_id(3), b""),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::WrongPeer { .. }), "{e}");
    });
}

#[test]
fn dropped_responder_tells_the_requester() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let (a, b) = (node(&ca, t.path(), "a", 1), node(&ca, t.path(), "b", 1));
        let (ta, _ia) = bind(&a);
        let (tb, ib) = bind(&b);
        smol::spawn(async move {
            while let Ok(r) = ib.recv().await {
                drop(r);
            }
        })
        .detach();
        let started = Instant::now();
        let e = ta
            .request(
                tb.local_addr(),
                None,
                frame(a.vnode_id(0), b.vnode_id(0), b"?"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, SendError::Refused { ref reason, .. } if reason.contains("no reply")),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "not a timeout");
    });
}

/// A directory holding a node certificate from `issuer` next to
/// `trusted`'s ca.crt: a node that trusts our CA but is not certified by
/// it, so each side's verifier is tested on its own.
fn foreign_node(issuer: &Path, trusted: &Path, root: &Path, name: &str) -> Identity {
    let d = issue(issuer, root, name, 1);
    fs::remove_file(d.join(CA_CERT)).unwrap();
    fs::copy(trusted.join(CA_CERT), d.join(CA_CERT)).unwrap();
    assert!(Identity::load(&d).is_err());
    Identity::read(&d).unwrap()
}

/// `x` and `y` cannot talk in either direction, and neither receives
/// anything.
async fn refused_both_ways(x: &Identity, y: &Identity) -> (SendError, SendError) {
    let (tx, ix) = bind(x);
    let (ty, iy) = bind(y);
    let e1 = tx
        .send(
            ty.local_addr(),
            None,
            frame(x.vnode_id(0), y.vnode_id(0), b"x->y"),
        )
        .await
        .unwrap_err();
    let e2 = ty
        .request(
            tx.local_addr(),
            None,
            frame(y.vnode_id(0), x.vnode_id(0), b"y->x"),
        )
        .await
        .unwrap_err();
    assert!(quiet(&ix, Duration::from_millis(300)).await);
    assert!(quiet(&iy, Duration::from_millis(10)).await);
    assert_eq!(tx.connections() + ty.connections(), 0);
    (e1, e2)
}

#[test]
fn certificates_from_another_ca_are_refused() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let ca2 = new_ca(t.path(), "ca2");
        let a = node(&ca, t.path(), "a", 1);
        // trusts our CA, certified by another: refused by our verifiers
        let f = foreign_node(&ca2, &ca, t.path(), "f");
        let (f_as_client, a_as_client) = refused_both_ways(&f, &a).await;
        for e in [&f_as_client, &a_as_client] {
            assert!(matches!(e, SendError::Connect { .. }), "{e}");
        }
        // a as client rejects f's server certificate itself
        assert!(
            a_as_client.to_string().contains("UnknownIssuer"),
            "{a_as_client}"
        );
        // f as client is rejected by a's client-certificate check
        assert!(
            f_as_client.to_string().contains("refused by the peer"),
            "{f_as_client}"
        );

        // wholly from another CA
        let g = node(&ca2, t.path(), "g", 1);
        refused_both_ways(&g, &a).await;
    });
}

#[test]
fn expired_certificates_are_refused() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let a = node(&ca, t.path(), "a", 1);
        let now = SystemTime::now();
        let out = t.path().join("old");
        let req = IssueRequest {
            not_before: Some(now - 10 * DAY),
            not_after: Some(now - DAY),
            ..IssueRequest::new("old")
        };
        ca_issue(&ca, &req, &out).unwrap();
        let old = Identity::read(&out).unwrap();
        let (old_as_client, a_as_client) = refused_both_ways(&old, &a).await;
        assert!(
            matches!(old_as_client, SendError::Connect { .. }),
            "{old_as_client}"
        );
        assert!(
            a_as_client.to_string().to_lowercase().contains("expired"),
            "{a_as_client}"
        );
    });
}

#[test]
fn a_client_without_certificate_is_refused() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let a = node(&ca, t.path(), "a", 1);
        let (ta, ia) = bind(&a);

        let ca_der = super::ca::read_one_cert(&ca.join(CA_CERT)).unwrap();
        let roots = super::cert::roots(&ca_der).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(super::cert::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            sock,
            std::sync::Arc::new(quinn::SmolRuntime),
        )
        .unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(tls)));

        // TLS 1.3 lets the client finish before the server has checked it,
        // so the refusal may arrive as a close right after.
        let refused = match ep.connect(ta.local_addr(), SERVER_NAME).unwrap().await {
            Err(_) => true,
            Ok(conn) => {
                if let Ok(mut s) = conn.open_uni().await {
                    let bytes = frame(a.vnode_id(0), a.vnode_id(0), b"anon").encode();
                    let _ = s.write_all(&bytes).await;
                    let _ = s.finish();
                }
                futures_lite::future::or(
                    async {
                        conn.closed().await;
                        true
                    },
                    async {
                        smol::Timer::after(Duration::from_secs(3)).await;
                        false
                    },
                )
                .await
            }
        };
        assert!(
            refused,
            "server kept a connection without a client certificate"
        );
        assert!(quiet(&ia, Duration::from_millis(200)).await);
        assert_eq!(ta.connections(), 0);
    });
}

#[test]
fn frames_claiming_ids_the_peer_cannot_own_are_dropped() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let a = node(&ca, t.path(), "a", 2);
        let b = node(&ca, t.path(), "b", 1);
        let c = node(&ca, t.path(), "c", 1);
        let (ta, _ia) = bind(&a);
        let (tb, ib) = bind(&b);
        let to = tb.local_addr();

        let forged = [
            c.vnode_id(0),                   // another node's id
            NodeId::for_vnode(a.spki(), 2),  // vnode index == max_vnodes
            NodeId::for_vnode(a.spki(), 63), // far beyond it
            NodeId(12345),                   // not derived at all
        ];
        for from in forged {
            // the sender may or may not see its connection close in time
            let _ = ta
                .send(to, None, frame(from, b.vnode_id(0), b"forged"))
                .await;
            assert!(
                quiet(&ib, Duration::from_millis(100)).await,
                "forged {from:?} delivered"
            );
            let e = ta
                .request(to, None, frame(from, b.vnode_id(0), b"forged"))
                .await;
            assert!(e.is_err(), "forged request from {from:?} answered");
            assert!(
                quiet(&ib, Duration::from_millis(100)).await,
                "forged {from:?} delivered"
            );
        }
        // the offender was disconnected; an honest frame still gets through
        // on a new connection
        ta.send(to, None, frame(a.vnode_id(1), b.vnode_id(0), b"honest"))
            .await
            .unwrap();
        let r = recv(&ib).await;
        assert_eq!(r.frame.body, b"honest");
    });
}

#[test]
fn oversized_frames_are_refused_and_the_receiver_keeps_serving() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let (a, b, c) = (
            node(&ca, t.path(), "a", 1),
            node(&ca, t.path(), "b", 1),
            node(&ca, t.path(), "c", 1),
        );
        let small = TransportConfig {
            max_frame: 64 << 10,
            ..cfg()
        };
        let big = TransportConfig {
            max_frame: 4 << 20,
            ..cfg()
        };
        let (ta, _ia) = bind_cfg(&a, big.clone());
        let (tb, ib) = bind_cfg(&b, small);
        let (tc, _ic) = bind_cfg(&c, big);
        let to = tb.local_addr();
        let body = vec![1u8; 1 << 20];

        let e = ta
            .send(to, None, frame(a.vnode_id(0), b.vnode_id(0), &body))
            .await
            .unwrap_err();
        assert!(
            matches!(e, SendError::Refused { ref reason, .. } if reason.contains("too large")),
            "{e}"
        );
        let e = ta
            .request(to, None, frame(a.vnode_id(0), b.vnode_id(0), &body))
            .await
            .unwrap_err();
        assert!(
            matches!(e, SendError::Refused { ref reason, .. } if reason.contains("too large")),
            "{e}"
        );
        assert!(quiet(&ib, Duration::from_millis(100)).await);

        // the sender's own limit is checked before anything is sent
        let e = tb
            .send(
                ta.local_addr(),
                None,
                frame(b.vnode_id(0), a.vnode_id(0), &body),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::TooLarge { .. }), "{e}");

        // b still serves c, and a on the same connection
        tc.send(to, None, frame(c.vnode_id(0), b.vnode_id(0), b"from c"))
            .await
            .unwrap();
        assert_eq!(recv(&ib).await.frame.body, b"from c");
        ta.send(
            to,
            None,
            frame(a.vnode_id(0), b.vnode_id(0), &body[..60 << 10]),
        )
        .await
        .unwrap();
        assert_eq!(recv(&ib).await.frame.body.len(), 60 << 10);
        assert_eq!(ta.connections(), 1);
    });
}

#[test]
fn sending_to_self_fails_fast() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let a = node(&ca, t.path(), "a", 1);
        let (ta, ia) = bind(&a);
        let started = Instant::now();
        let f = frame(a.vnode_id(0), a.vnode_id(0), b"me");
        let e = ta.send(ta.local_addr(), None, f.clone()).await.unwrap_err();
        assert!(matches!(e, SendError::SelfAddress(_)), "{e}");

        // bound to every address: loopback is still us
        let (tw, iw) = Transport::bind(&a, "0.0.0.0:0".parse().unwrap(), cfg()).unwrap();
        let lo: SocketAddr = format!("127.0.0.1:{}", tw.local_addr().port())
            .parse()
            .unwrap();
        let e = tw.request(lo, None, f.clone()).await.unwrap_err();
        assert!(matches!(e, SendError::SelfAddress(_)), "{e}");
        // another transport with the same key is found out after the handshake
        let e = tw.send(ta.local_addr(), None, f).await.unwrap_err();
        assert!(matches!(e, SendError::SelfAddress(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(quiet(&ia, Duration::from_millis(100)).await);
        assert!(quiet(&iw, Duration::from_millis(10)).await);
    });
}

#[test]
fn a_restarted_peer_is_reached_again() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let (a, b) = (node(&ca, t.path(), "a", 1), node(&ca, t.path(), "b", 1));
        let (ta, _ia) = bind(&a);
        let (tb, ib) = bind(&b);
        let addr = tb.local_addr();
        let f = frame(a.vnode_id(0), b.vnode_id(0), b"1");
        ta.send(addr, None, f.clone()).await.unwrap();
        recv(&ib).await;

        tb.close();
        drop(tb);
        assert!(ib.recv().await.is_err(), "incoming ends on close");
        // same identity, same port
        let mut again = None;
        for _ in 0..50 {
            match Transport::bind(&b, addr, cfg()) {
                Ok(x) => {
                    again = Some(x);
                    break;
                }
                Err(_) => smol::Timer::after(Duration::from_millis(50)).await,
            };
        }
        let (_tb2, ib2) = again.expect("port not released");
        ta.send(addr, Some(b.vnode_id(0)), f).await.unwrap();
        assert_eq!(recv(&ib2).await.frame.body, b"1");
    });
}

#[test]
fn the_connection_cache_is_bounded() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let a = node(&ca, t.path(), "a", 1);
        let (ta, _ia) = bind_cfg(
            &a,
            TransportConfig {
                max_connections: 2,
                ..cfg()
            },
        );
        let mut peers = Vec::new();
        for i in 0..4 {
            let id = node(&ca, t.path(), &format!("p{i}"), 1);
            let (tp, ip) = bind(&id);
            peers.push((id, tp, ip));
        }
        for round in 0..2 {
            for (id, tp, ip) in &peers {
                ta.send(
                    tp.local_addr(),
                    None,
                    frame(a.vnode_id(0), id.vnode_id(0), b"x"),
                )
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
                recv(ip).await;
                assert!(ta.connections() <= 2);
            }
        }
    });
}

#[test]
fn close_ends_incoming_and_refuses_sends() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let (a, b) = (node(&ca, t.path(), "a", 1), node(&ca, t.path(), "b", 1));
        let (ta, ia) = bind(&a);
        let (tb, _ib) = bind(&b);
        ta.close();
        assert!(ia.recv().await.is_err());
        let e = ta
            .send(
                tb.local_addr(),
                None,
                frame(a.vnode_id(0), b.vnode_id(0), b""),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::Closed), "{e}");
        let e = tb
            .send(
                ta.local_addr(),
                None,
                frame(b.vnode_id(0), a.vnode_id(0), b""),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, SendError::Connect { .. } | SendError::Timeout { .. }),
            "{e}"
        );
    });
}

#[test]
fn frame_decoding_is_strict() {
    let f = frame(NodeId(1), NodeId(u128::MAX), b"body");
    let bytes = f.encode();
    assert_eq!(Frame::decode(&bytes).unwrap(), f);
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(Frame::decode(&longer).is_err());
    assert!(Frame::decode(&bytes[..bytes.len() - 1]).is_err());
    // a body length pointing past the end
    let mut lying = frame(NodeId(1), NodeId(2), b"").encode();
    let n = lying.len();
    lying[n - 1] = 0x7f;
    assert!(Frame::decode(&lying).is_err());
}

/// Round trip of a small request over loopback. Run with
/// `cargo test --release --lib transport::tests::rtt -- --ignored --nocapture`.
#[test]
#[ignore]
fn rtt() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let (a, b) = (node(&ca, t.path(), "a", 1), node(&ca, t.path(), "b", 1));
        let (ta, _ia) = bind(&a);
        let (tb, ib) = bind(&b);
        echo(&b, ib);
        let to = tb.local_addr();
        let f = frame(a.vnode_id(0), b.vnode_id(0), &[0u8; 64]);
        let started = Instant::now();
        ta.peer_info(to).await.unwrap();
        let connect = started.elapsed();
        for _ in 0..200 {
            ta.request(to, None, f.clone()).await.unwrap();
        }
        let n = 5000;
        let mut req = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Instant::now();
            ta.request(to, None, f.clone()).await.unwrap();
            req.push(s.elapsed());
        }
        let mut one_way = Vec::with_capacity(n / 5);
        for _ in 0..n / 5 {
            let s = Instant::now();
            ta.send(to, None, f.clone()).await.unwrap();
            one_way.push(s.elapsed());
        }
        let pct = |v: &mut Vec<Duration>, p: f64| {
            v.sort();
            v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
        };
        println!("connect+handshake: {connect:?}");
        println!(
            "request/response 64 B, {n} sequential: p50 {:?} p99 {:?} max {:?}",
            pct(&mut req, 0.50),
            pct(&mut req, 0.99),
            pct(&mut req, 1.0)
        );
        println!(
            "send (until acknowledged) 64 B, {} sequential: p50 {:?} p99 {:?}",
            one_way.len(),
            pct(&mut one_way, 0.50),
            pct(&mut one_way, 0.99)
        );
    });
}

/// Captures WARN and above for the whole test process; `None` if another
/// subscriber was installed first.
fn captured_logs() -> Option<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOGS: OnceLock<Option<Arc<Mutex<Vec<u8>>>>> = OnceLock::new();
    struct W(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || W(b.clone()))
            .finish();
        tracing::subscriber::set_global_default(sub)
            .ok()
            .map(|_| buf)
    })
    .clone()
}

#[test]
fn refusals_are_logged_with_the_peer_address_and_reason() {
    let Some(logs) = captured_logs() else {
        panic!("a global tracing subscriber was installed elsewhere in this test binary");
    };
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let ca2 = new_ca(t.path(), "ca2");
        let a = node(&ca, t.path(), "a", 1);
        let f = foreign_node(&ca2, &ca, t.path(), "f");
        let (ta, _ia) = bind(&a);
        let (tf, _if) = bind(&f);
        // the address and a space or end of line after it, so port 4000
        // does not match port 40001
        let f_addr = tf.local_addr().to_string();
        let names_f = |l: &str| l.split_whitespace().any(|w| w == format!("peer={f_addr}"));
        let e = tf
            .send(
                ta.local_addr(),
                None,
                frame(f.vnode_id(0), a.vnode_id(0), b""),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::Connect { .. }), "{e}");
        let e = ta
            .send(
                tf.local_addr(),
                None,
                frame(a.vnode_id(0), f.vnode_id(0), b""),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::Connect { .. }), "{e}");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let text = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
            // a refused f's client certificate, then f's server certificate
            let server_side = text.lines().any(|l| {
                l.contains("WARN")
                    && l.contains("inbound connection refused")
                    && names_f(l)
                    && l.contains("UnknownIssuer")
            });
            let client_side = text.lines().any(|l| {
                l.contains("WARN")
                    && l.contains("outbound connection refused")
                    && names_f(l)
                    && l.contains("UnknownIssuer")
            });
            if server_side && client_side {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "missing refusal logs in:\n{text}"
            );
            smol::Timer::after(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn silent_peers_time_out() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let (a, b) = (node(&ca, t.path(), "a", 1), node(&ca, t.path(), "b", 1));
        let short = TransportConfig {
            connect_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(300),
            ..cfg()
        };
        let (ta, _ia) = bind_cfg(&a, short);

        // a UDP socket that never answers
        let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let e = ta
            .send(
                hole.local_addr().unwrap(),
                None,
                frame(a.vnode_id(0), b.vnode_id(0), b""),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                SendError::Timeout {
                    what: "connecting",
                    ..
                }
            ),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));

        // a peer that takes requests and never answers them
        let (tb, ib) = bind(&b);
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = held.clone();
        smol::spawn(async move {
            while let Ok(r) = ib.recv().await {
                h.lock().unwrap().push(r);
            }
        })
        .detach();
        let started = Instant::now();
        let e = ta
            .request(
                tb.local_addr(),
                None,
                frame(a.vnode_id(0), b.vnode_id(0), b"?"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                SendError::Timeout {
                    what: "waiting for a reply",
                    ..
                }
            ),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(held.lock().unwrap().len(), 1, "the request did arrive");
    });
}

/// A UDP relay in front of a node, so a test can make the node vanish
/// without its goodbye reaching the other side, and put a restarted node
/// behind the same address.
struct Relay {
    addr: SocketAddr,
    target: std::sync::Arc<std::sync::Mutex<Option<SocketAddr>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn new(target: SocketAddr) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let target = Arc::new(Mutex::new(Some(target)));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (target.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut servers: Vec<SocketAddr> = Vec::new();
            let mut client = None;
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::SeqCst) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let current = *t.lock().unwrap();
                if let Some(c) = current {
                    if !servers.contains(&c) {
                        servers.push(c);
                    }
                }
                if Some(from) == current {
                    if let Some(c) = client {
                        let _ = sock.send_to(&buf[..n], c);
                    }
                } else if !servers.contains(&from) {
                    client = Some(from);
                    if let Some(c) = current {
                        let _ = sock.send_to(&buf[..n], c);
                    }
                }
            }
        });
        Relay { addr, target, stop }
    }

    /// `None` drops everything.
    fn point_to(&self, t: Option<SocketAddr>) {
        *self.target.lock().unwrap() = t;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_crashed_and_restarted_peer_is_reached_on_the_next_send() {
    smol::block_on(async {
        let t = TempDir::new().unwrap();
        let ca = new_ca(t.path(), "ca");
        let (a, b) = (node(&ca, t.path(), "a", 1), node(&ca, t.path(), "b", 1));
        let (ta, _ia) = bind(&a);
        let (tb, ib) = bind(&b);
        let relay = Relay::new(tb.local_addr());
        let f = frame(a.vnode_id(0), b.vnode_id(0), b"before");
        ta.send(relay.addr, None, f).await.unwrap();
        assert_eq!(recv(&ib).await.frame.body, b"before");
        assert_eq!(ta.connections(), 1);

        // b vanishes: its close never reaches a
        relay.point_to(None);
        tb.close();
        drop(tb);
        smol::Timer::after(Duration::from_millis(100)).await;
        // b comes back, same key, behind the same address
        let (_tb2, ib2) = bind(&b);
        relay.point_to(Some(_tb2.local_addr()));

        // a's cached connection is dead but a does not know it yet: the
        // restarted b answers it with a stateless reset, and a reconnects
        let started = Instant::now();
        let f = frame(a.vnode_id(0), b.vnode_id(0), b"after");
        ta.send(relay.addr, Some(b.vnode_id(0)), f).await.unwrap();
        assert_eq!(recv(&ib2).await.frame.body, b"after");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    });
}

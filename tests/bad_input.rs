//! Hostile and broken input against a real node: garbage HTTP, oversized
//! and malformed requests, garbage and malformed cluster messages from a
//! certified peer, a corrupt data dir. Each gets a clear error; the node
//! keeps serving and keeps every acknowledged write.

use capy::cli::cluster::LocalCluster;
use capy::id::NodeId;
use capy::transport::{ca_issue, Frame, Identity, IssueRequest, Transport, TransportConfig};
use hyper::{Method, StatusCode};
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_capy"))
}

fn one_node() -> LocalCluster {
    let mut c = LocalCluster::prepare(bin(), 1, 1).expect("prepare");
    c.start_all().expect("start");
    c.wait_converged(Duration::from_secs(30)).expect("converge");
    c
}

fn still_serving(c: &LocalCluster, key: &str, value: &[u8]) {
    let r = c
        .http(0, Method::GET, &format!("/api/kv/{key}"), None)
        .expect("node answers");
    assert_eq!(r.status, StatusCode::OK, "{}", r.message());
    assert_eq!(&r.body[..], value);
}

#[test]
fn bad_http_gets_clear_errors_and_the_node_keeps_serving() {
    let c = one_node();
    let r = c
        .http(0, Method::PUT, "/api/kv/kept", Some(b"safe".to_vec()))
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);

    // Garbage on the HTTP port.
    let mut s = TcpStream::connect(c.nodes[0].http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\x16\x03\x01 this is not http\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 4"),
        "garbage answered with {text:?}"
    );

    // Oversized value: refused from its Content-Length, before the body.
    let mut s = TcpStream::connect(c.nodes[0].http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PUT /api/kv/big HTTP/1.1\r\nHost: x\r\nContent-Length: 5242880\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
    assert!(text.contains("larger than"), "{text:?}");
    // And when the body is streamed without a length.
    let mut s = TcpStream::connect(c.nodes[0].http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PUT /api/kv/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..5 {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let n = s.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");

    // Key too long, bad bucket, bad escapes, unknown endpoints, bad method.
    let long = "k".repeat(2000);
    let r = c
        .http(
            0,
            Method::PUT,
            &format!("/api/kv/{long}"),
            Some(b"x".to_vec()),
        )
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.message());
    assert!(r.message().contains("key"), "{}", r.message());
    let r = c
        .http(
            0,
            Method::PUT,
            "/api/kv/x?bucket=Bad%20Bucket!",
            Some(b"x".to_vec()),
        )
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.message());
    assert!(r.message().contains("bucket"), "{}", r.message());
    let r = c.http(0, Method::GET, "/api/kv/%zz", None).unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = c.http(0, Method::GET, "/api/nothing", None).unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.message().contains("/api/nothing"));
    let r = c.http(0, Method::PATCH, "/api/kv/kept", None).unwrap();
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);

    // Garbage datagrams on the QUIC port.
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..1200).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
        let _ = u.send_to(&junk, c.nodes[0].quic);
    }
    still_serving(&c, "kept", b"safe");
}

#[test]
fn malformed_cluster_messages_from_a_certified_peer_are_dropped() {
    let c = one_node();
    let r = c
        .http(0, Method::PUT, "/api/kv/kept", Some(b"safe".to_vec()))
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let status = c.status(0).unwrap();
    let target: NodeId = status["vnodes"][0]["id"].as_str().unwrap().parse().unwrap();

    // A peer with a certificate from the cluster's CA, sending nonsense.
    let dir = c.root.join("prober");
    let mut req = IssueRequest::new("prober");
    req.max_vnodes = 2;
    ca_issue(&c.root.join("ca"), &req, &dir).unwrap();
    let me = Identity::load(&dir).unwrap();
    let (t, _incoming) = Transport::bind(
        &me,
        "127.0.0.1:0".parse().unwrap(),
        TransportConfig::default(),
    )
    .unwrap();
    smol::block_on(async {
        let to = c.nodes[0].quic;
        // Bodies that are not a capy message at all.
        for body in [
            vec![],
            vec![0xff; 64],
            b"\x00\x05hello".to_vec(),
            vec![7u8; 100_000],
        ] {
            t.send(
                to,
                Some(target),
                Frame {
                    from: me.vnode_id(0),
                    to: target,
                    body,
                },
            )
            .await
            .expect("the transport delivers; the node must drop it");
        }
        // A well-formed overlay message addressed to a vnode that is not there.
        let _ = t
            .send(
                to,
                None,
                Frame {
                    from: me.vnode_id(1),
                    to: NodeId(12345),
                    body: vec![0, 0],
                },
            )
            .await;
        // A frame larger than any node accepts.
        let huge = Frame {
            from: me.vnode_id(0),
            to: target,
            body: vec![1u8; 20 << 20],
        };
        assert!(
            t.send(to, Some(target), huge).await.is_err(),
            "oversized frame accepted"
        );
        // An id this certificate cannot own: refused by the sender's own check
        // or dropped by the node; either way nothing happens.
        let _ = t
            .send(
                to,
                Some(target),
                Frame {
                    from: NodeId(42),
                    to: target,
                    body: vec![0],
                },
            )
            .await;
    });
    std::thread::sleep(Duration::from_millis(300));
    still_serving(&c, "kept", b"safe");
    let m = c.http(0, Method::GET, "/metrics", None).unwrap();
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("capy_messages_in_total{kind=\"malformed\"}"),
        "{text}"
    );
    let log = std::fs::read_to_string(c.nodes[0].dir.join("node.log")).unwrap();
    assert!(log.contains("undecodable"), "{log}");
}

#[test]
fn a_corrupt_data_dir_gets_a_clear_error_or_a_quarantine() {
    let mut c = LocalCluster::prepare(bin(), 1, 1).expect("prepare");
    c.start_all().unwrap();
    c.wait_converged(Duration::from_secs(30)).unwrap();
    let r = c
        .http(0, Method::PUT, "/api/kv/a", Some(b"1".to_vec()))
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    c.stop(0);

    // A store file that is not a database: moved aside, node starts empty.
    let store = c.nodes[0].dir.join("store.redb");
    std::fs::write(&store, b"this is not a redb file at all, just text").unwrap();
    c.start(0).unwrap();
    c.wait_http(0, Duration::from_secs(20)).unwrap();
    let log = c.log_tail(0, 50);
    assert!(
        log.contains("unreadable") && log.contains("corrupt-"),
        "{log}"
    );
    let quarantined = std::fs::read_dir(&c.nodes[0].dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("store.redb.corrupt-")
        });
    assert!(quarantined, "the bad file was not kept aside");
    let r = c
        .http(0, Method::PUT, "/api/kv/b", Some(vec![7u8; 100_000]))
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    c.stop(0);

    // A store file cut short (a torn write, a full disk): also moved aside.
    let len = std::fs::metadata(&store).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&store)
        .unwrap();
    f.set_len(len / 3).unwrap();
    drop(f);
    c.start(0).unwrap();
    c.wait_http(0, Duration::from_secs(20)).unwrap();
    let r = c
        .http(0, Method::PUT, "/api/kv/c", Some(b"after".to_vec()))
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.message());
    let n = std::fs::read_dir(&c.nodes[0].dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("store.redb.corrupt-")
        })
        .count();
    assert_eq!(
        n,
        2,
        "the truncated file was not kept aside:\n{}",
        c.log_tail(0, 30)
    );
    c.stop(0);

    // A garbage certificate: the node refuses to start and names the file.
    std::fs::write(
        c.nodes[0].dir.join("node.crt"),
        b"-----BEGIN CERTIFICATE-----\ngarbage\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["run", "--data"])
        .arg(&c.nodes[0].dir)
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node.crt"), "{err}");

    // A config file with a typo names the key.
    let cfg = c.root.join("bad.toml");
    std::fs::write(&cfg, "replicas = 3\nlisten_addr = \"x\"\n").unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_addr"), "{err}");
}

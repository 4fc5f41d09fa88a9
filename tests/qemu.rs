//! The static ARM builds under qemu-user: each answers `--version`, and
//! three ARM nodes (aarch64, armv7, aarch64) under emulation form a cluster
//! and exchange a key. The binaries come from `scripts/build-release`;
//! scripts/test builds them first and sets CAPY_REQUIRE_CROSS=1, so there a
//! missing binary fails the run. In a plain `cargo test` without them the
//! test says so and does nothing.

use capy::cli::cluster::LocalCluster;
use hyper::{Method, StatusCode};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Arm {
    target: &'static str,
    qemu: &'static str,
    file_says: &'static str,
}

const ARMS: [Arm; 2] = [
    Arm {
        target: "aarch64-unknown-linux-musl",
        qemu: "qemu-aarch64-static",
        file_says: "ARM aarch64",
    },
    Arm {
        target: "armv7-unknown-linux-musleabihf",
        qemu: "qemu-arm-static",
        file_says: "ARM, EABI5",
    },
];

fn binary(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(target)
        .join("release/capy")
}

/// The binaries, or None (with a note) when they are not built and not
/// required.
fn binaries() -> Option<Vec<PathBuf>> {
    let bins: Vec<PathBuf> = ARMS.iter().map(|a| binary(a.target)).collect();
    let missing: Vec<&PathBuf> = bins.iter().filter(|b| !b.exists()).collect();
    if missing.is_empty() {
        return Some(bins);
    }
    let msg = format!(
        "ARM binaries not built: {missing:?}; run scripts/build-release aarch64-unknown-linux-musl \
         and scripts/build-release armv7-unknown-linux-musleabihf"
    );
    if std::env::var_os("CAPY_REQUIRE_CROSS").is_some() {
        panic!("{msg}");
    }
    eprintln!("note: {msg}; nothing to test here");
    None
}

/// A script that runs `bin` under `qemu`: what LocalCluster starts.
fn wrapper(dir: &Path, qemu: &str, bin: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!("#!/bin/sh\nexec {qemu} {} \"$@\"\n", bin.display()),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn arm_binaries_answer_and_three_emulated_nodes_exchange_a_key() {
    let Some(bins) = binaries() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut wrappers = Vec::new();
    for (arm, bin) in ARMS.iter().zip(&bins) {
        let file = Command::new("file").arg("-b").arg(bin).output().unwrap();
        let file = String::from_utf8_lossy(&file.stdout).to_string();
        assert!(
            file.contains(arm.file_says) && file.contains("statically linked"),
            "{}: {file}",
            arm.target
        );
        let w = wrapper(tmp.path(), arm.qemu, bin, &format!("capy-{}", arm.target));
        let out = Command::new(&w)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("{} (is qemu-user-static installed?): {e}", arm.qemu));
        let v = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}: {out:?}", arm.target);
        assert_eq!(
            v.trim(),
            format!("capy {}", env!("CARGO_PKG_VERSION")),
            "{}",
            arm.target
        );
        wrappers.push(w);
    }

    // aarch64, armv7, aarch64: the two architectures talk to each other.
    let order = [0usize, 1, 0];
    let mut c = LocalCluster::prepare(&wrappers[0], 3, 1).unwrap();
    let t0 = Instant::now();
    for (i, &arch) in order.iter().enumerate() {
        c.bin = wrappers[arch].clone();
        c.start(i).unwrap();
        c.wait_http(i, Duration::from_secs(120)).unwrap();
    }
    c.wait_converged(Duration::from_secs(240))
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nlogs:\n{}",
                (0..3)
                    .map(|i| c.log_tail(i, 20))
                    .collect::<Vec<_>>()
                    .join("\n--\n")
            )
        });
    eprintln!("3 emulated nodes up and converged in {:?}", t0.elapsed());
    for (i, s) in (0..3).map(|i| (i, c.status(i).unwrap())) {
        let want = if order[i] == 0 { "aarch64" } else { "arm" };
        assert_eq!(s["node"]["arch"], want, "node {i}");
    }

    let r = c
        .http(
            0,
            Method::PUT,
            "/api/kv/from-aarch64",
            Some(b"hello arm".to_vec()),
        )
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.message());
    let r = c
        .http(
            1,
            Method::PUT,
            "/api/kv/from-armv7",
            Some(b"hello aarch64".to_vec()),
        )
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.message());
    for n in 0..3 {
        for (k, v) in [
            ("from-aarch64", "hello arm"),
            ("from-armv7", "hello aarch64"),
        ] {
            let r = c
                .http(n, Method::GET, &format!("/api/kv/{k}"), None)
                .unwrap();
            assert_eq!(r.status, StatusCode::OK, "node {n} {k}: {}", r.message());
            assert_eq!(String::from_utf8_lossy(&r.body), v, "node {n} {k}");
        }
    }
    eprintln!("qemu cluster test done in {:?}", t0.elapsed());
}

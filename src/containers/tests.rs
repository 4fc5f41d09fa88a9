//! Tests against the real podman socket with the image that
//! `scripts/build-fn-image` makes. The socket comes from
//! `CAPY_PODMAN_SOCKET` (default the rootful one) and the image archive from
//! `CAPY_FN_IMAGE`; when they are not there, the set-up scripts are run.
//! If podman cannot be made to answer, the tests fail: they are never
//! skipped.

use super::*;
use bytes::Bytes;
use serde_json::{json, Value};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env() -> &'static testenv::TestEnv {
    testenv::test_env()
}

/// The test image with `k` extra zero blocks at its end: the same image to
/// podman, another archive (and so another image reference) to capy, so each
/// test owns its reference and can remove it.
fn archive(k: usize) -> Bytes {
    let mut v = env().archive.clone();
    v.resize(v.len() + 1024 * k, 0);
    v.into()
}

/// Deleting an image races with putting a name on it (podman checks the
/// names, then deletes), so tests that delete images hold this for writing
/// and all others for reading.
static IMAGES: smol::lock::RwLock<()> = smol::lock::RwLock::new(());

fn engine() -> Arc<dyn Engine> {
    Arc::new(Podman::new(&env().socket))
}

fn host(node: &str, tweak: impl FnOnce(&mut HostConfig)) -> FunctionHost {
    let mut cfg = HostConfig {
        node: format!("test-{}-{node}", std::process::id()),
        ..HostConfig::default()
    };
    tweak(&mut cfg);
    FunctionHost::new(Some(engine()), cfg)
}

fn spec(app: &str, name: &str, archive: &Bytes) -> FnSpec {
    let mut s = FnSpec::new(app, name, &FnSpec::image_ref_for(archive));
    s.memory_bytes = 32 << 20;
    s.timeout = Duration::from_secs(10);
    s
}

/// A loader that hands out `archive` and counts its calls.
fn loader(
    archive: &Bytes,
    calls: &Arc<AtomicUsize>,
) -> impl FnOnce() -> futures_lite::future::Ready<Result<ImageSource, FnError>> {
    let a = archive.clone();
    let calls = calls.clone();
    move || {
        calls.fetch_add(1, Ordering::SeqCst);
        futures_lite::future::ready(Ok(ImageSource::Bytes(a)))
    }
}

/// Containers podman has for this host's node.
async fn listed(h: &FunctionHost) -> Vec<ContainerInfo> {
    let node = h.config().node.clone();
    engine()
        .list(&[(LABEL_NODE, node.as_str())])
        .await
        .expect("listing containers")
}

/// Waits until podman has no container of this host's node (removal of a
/// failed container runs in the background).
async fn wait_gone(h: &FunctionHost) {
    let t = Instant::now();
    loop {
        let l = listed(h).await;
        if l.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "containers not removed: {:?}",
            l.iter().map(|c| &c.name).collect::<Vec<_>>()
        );
        smol::Timer::after(Duration::from_millis(100)).await;
    }
}

#[test]
fn cold_then_warm_invocations_load_the_image_once() {
    smol::block_on(async {
        let _images = IMAGES.write().await;
        let a = archive(1);
        let h = host("coldwarm", |_| {});
        let s = spec("shop", "counter", &a);
        let e = engine();
        let _ = e.remove_image(&s.image).await;
        let calls = Arc::new(AtomicUsize::new(0));

        let first = h
            .invoke(&s, json!({"hello": "world"}), loader(&a, &calls))
            .await
            .unwrap();
        assert!(first.cold);
        assert_eq!(first.output, json!({"hello": "world"}));
        assert!(first.timings.image_load_us.is_some(), "image was loaded");
        assert!(first.timings.start_us.is_some());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(e.image_exists(&s.image).await.unwrap());

        let second = h
            .invoke(
                &s,
                json!({"action": "incr", "state": {"count": 41, "name": "x"}}),
                loader(&a, &calls),
            )
            .await
            .unwrap();
        assert!(!second.cold);
        assert_eq!(second.output, json!({"state": {"count": 42, "name": "x"}}));
        assert!(second.timings.start_us.is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no second load");

        let l = listed(&h).await;
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].state, ContainerState::Running);
        let info = e.inspect(&l[0].id).await.unwrap();
        assert_eq!(info.memory_bytes, Some(32 << 20), "memory limit applied");
        assert!(info.host_port.is_some());
        assert_eq!(
            l[0].labels.get(LABEL_FUNCTION).map(String::as_str),
            Some("shop/counter")
        );
        let st = h.stats()["shop"].clone();
        assert_eq!((st.invocations, st.cold_starts, st.warm_starts), (2, 1, 1));
        assert_eq!((st.errors, st.containers), (0, 1));
        let status = h.status();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].state, "idle");
        assert_eq!(status[0].invocations, 2);

        assert_eq!(h.undeploy("shop", "counter").await, 1);
        assert!(listed(&h).await.is_empty());
        assert!(h.status().is_empty());
    })
}

#[test]
fn keep_alive_window_expires_idle_containers_but_not_managed_ones() {
    smol::block_on(async {
        let _images = IMAGES.read().await;
        let a = archive(2);
        let h = host("keepalive", |_| {});
        let calls = Arc::new(AtomicUsize::new(0));
        let mut fixed = spec("ka", "fixed", &a);
        fixed.keep_alive = KeepAlive::For(Duration::from_secs(5));
        let mut managed = spec("ka", "managed", &a);
        managed.keep_alive = KeepAlive::Managed;

        h.invoke(&fixed, json!(1), loader(&a, &calls))
            .await
            .unwrap();
        assert!(h.deploy(&managed, loader(&a, &calls)).await.unwrap());
        assert!(
            !h.deploy(&managed, loader(&a, &calls)).await.unwrap(),
            "already warm"
        );
        assert_eq!(listed(&h).await.len(), 2);

        assert_eq!(h.tick(h.now()).await, 0, "inside the window");
        assert_eq!(listed(&h).await.len(), 2);
        let later = h.now() + 6_000_000;
        assert_eq!(h.tick(later).await, 1, "the fixed window passed");
        let left = listed(&h).await;
        assert_eq!(left.len(), 1);
        assert_eq!(
            left[0].labels.get(LABEL_FUNCTION).map(String::as_str),
            Some("ka/managed")
        );
        assert_eq!(
            h.tick(later + 86_400_000_000).await,
            0,
            "managed never expires"
        );

        let st = h.stats()["ka"].clone();
        assert_eq!((st.expired, st.prewarms, st.containers), (1, 1, 1));
        assert!(
            st.idle_seconds >= 6.0,
            "idle time counted: {}",
            st.idle_seconds
        );

        let warm = h
            .invoke(&managed, json!(2), loader(&a, &calls))
            .await
            .unwrap();
        assert!(!warm.cold, "the deployed container served it");
        let cold = h
            .invoke(&fixed, json!(3), loader(&a, &calls))
            .await
            .unwrap();
        assert!(cold.cold, "the expired function starts again");

        assert_eq!(h.undeploy("ka", "managed").await, 1);
        assert_eq!(h.undeploy("ka", "fixed").await, 1);
        assert!(listed(&h).await.is_empty());
    })
}

#[test]
fn a_crashed_container_is_removed_and_the_next_call_cold_starts() {
    smol::block_on(async {
        let _images = IMAGES.read().await;
        let a = archive(3);
        let h = host("crash", |_| {});
        let s = spec("c", "exit", &a);
        let calls = Arc::new(AtomicUsize::new(0));
        h.invoke(&s, json!(0), loader(&a, &calls)).await.unwrap();
        let err = h
            .invoke(&s, json!({"action": "exit", "code": 7}), loader(&a, &calls))
            .await
            .unwrap_err();
        match &err {
            FnError::Crashed { function, reason } => {
                assert_eq!(function, "c/exit");
                assert!(reason.contains("code 7"), "{reason}");
            }
            e => panic!("expected Crashed, got {e}"),
        }
        assert_eq!(err.http_status(), 502);
        wait_gone(&h).await;
        assert!(h.status().is_empty());
        let again = h
            .invoke(&s, json!("back"), loader(&a, &calls))
            .await
            .unwrap();
        assert!(again.cold);
        assert_eq!(again.output, json!("back"));
        let st = h.stats()["c"].clone();
        assert_eq!((st.invocations, st.errors, st.cold_starts), (3, 1, 2));
        h.undeploy("c", "exit").await;
    })
}

#[test]
fn a_hanging_function_times_out_and_its_container_goes() {
    smol::block_on(async {
        let _images = IMAGES.read().await;
        let a = archive(4);
        let h = host("hang", |_| {});
        let mut s = spec("h", "sleepy", &a);
        s.timeout = Duration::from_millis(1500);
        let calls = Arc::new(AtomicUsize::new(0));
        h.invoke(&s, json!(0), loader(&a, &calls)).await.unwrap();
        let t = Instant::now();
        let err = h
            .invoke(
                &s,
                json!({"action": "sleep", "ms": 20000}),
                loader(&a, &calls),
            )
            .await
            .unwrap_err();
        let took = t.elapsed();
        assert!(matches!(err, FnError::Timeout { .. }), "{err}");
        assert_eq!(err.http_status(), 504);
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
            "{took:?}"
        );
        wait_gone(&h).await;
        assert_eq!(h.stats()["h"].timeouts, 1);
        let again = h.invoke(&s, json!(1), loader(&a, &calls)).await.unwrap();
        assert!(again.cold);
        h.undeploy("h", "sleepy").await;
    })
}

#[test]
fn bad_output_errors_keep_the_container() {
    smol::block_on(async {
        let _images = IMAGES.read().await;
        let a = archive(5);
        let h = host("garbage", |c| c.max_output = 10_000);
        let s = spec("g", "odd", &a);
        let calls = Arc::new(AtomicUsize::new(0));

        let err = h
            .invoke(&s, json!({"action": "garbage"}), loader(&a, &calls))
            .await
            .unwrap_err();
        match &err {
            FnError::BadOutput { reason, .. } => {
                assert!(reason.contains("this is not json"), "{reason}")
            }
            e => panic!("expected BadOutput, got {e}"),
        }
        let err = h
            .invoke(
                &s,
                json!({"action": "big", "bytes": 20_000}),
                loader(&a, &calls),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                FnError::TooLarge {
                    what: "output",
                    limit: 10_000,
                    ..
                }
            ),
            "{err}"
        );
        let err = h
            .invoke(
                &s,
                json!({"action": "fail", "message": "no stock"}),
                loader(&a, &calls),
            )
            .await
            .unwrap_err();
        match &err {
            FnError::Failed { message, .. } => assert_eq!(message, "no stock"),
            e => panic!("expected Failed, got {e}"),
        }
        let err = h
            .invoke(&s, json!("x".repeat(2 << 20)), loader(&a, &calls))
            .await
            .unwrap_err();
        assert!(
            matches!(err, FnError::TooLarge { what: "input", .. }),
            "{err}"
        );
        assert_eq!(err.http_status(), 413);

        // The one container survived all of that and still answers.
        let ok = h
            .invoke(&s, json!({"fine": true}), loader(&a, &calls))
            .await
            .unwrap();
        assert!(!ok.cold);
        assert_eq!(ok.output, json!({"fine": true}));
        assert_eq!(listed(&h).await.len(), 1);
        let st = h.stats()["g"].clone();
        assert_eq!((st.cold_starts, st.errors), (1, 3));
        h.undeploy("g", "odd").await;
    })
}

#[test]
fn archives_that_are_not_images_are_refused() {
    smol::block_on(async {
        let _images = IMAGES.read().await;
        let h = host("badimage", |_| {});
        let calls = Arc::new(AtomicUsize::new(0));

        // Not a tar at all: refused before podman sees it.
        let junk = Bytes::from_static(b"this is not an image archive at all");
        let s = spec("b", "junk", &junk);
        let err = h
            .invoke(&s, json!(0), loader(&junk, &calls))
            .await
            .unwrap_err();
        assert!(matches!(err, FnError::ImageInvalid { .. }), "{err}");
        assert_eq!(err.http_status(), 422);

        // A real tar holding no image: podman refuses it.
        let tar = one_file_tar("hello.txt", b"hello");
        let s = spec("b", "tar", &tar);
        let err = h
            .invoke(&s, json!(0), loader(&tar, &calls))
            .await
            .unwrap_err();
        match &err {
            FnError::ImageInvalid { reason, .. } => assert!(!reason.is_empty()),
            e => panic!("expected ImageInvalid, got {e}"),
        }

        // Bytes that do not match the reference they were deployed under.
        let a = archive(6);
        let s = spec("b", "mismatch", &junk);
        let err = h
            .invoke(&s, json!(0), loader(&a, &calls))
            .await
            .unwrap_err();
        match &err {
            FnError::ImageInvalid { reason, .. } => assert!(reason.contains("SHA-256"), "{reason}"),
            e => panic!("expected ImageInvalid, got {e}"),
        }

        // The store does not have it.
        let s = spec("b", "missing", &a);
        let err = h
            .invoke(&s, json!(0), || async {
                Err::<ImageSource, _>(FnError::NotDeployed("b/missing".into()))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, FnError::NotDeployed(_)), "{err}");
        assert_eq!(err.http_status(), 404);

        assert!(listed(&h).await.is_empty(), "no container was made");
        assert_eq!(h.stats()["b"].errors, 4);
    })
}

/// A tar archive with one regular file.
fn one_file_tar(name: &str, data: &[u8]) -> Bytes {
    let mut v = super::tar_entry(name, data);
    v.extend([0u8; 1024]);
    v.into()
}

#[test]
fn a_container_that_never_becomes_ready_fails_to_start() {
    smol::block_on(async {
        let _images = IMAGES.read().await;
        let a = archive(7);
        let h = host("neverready", |c| c.start_timeout = Duration::from_secs(5));
        let calls = Arc::new(AtomicUsize::new(0));

        let mut s = spec("n", "silent", &a);
        s.env.insert("CAPY_FN_NEVER_LISTEN".into(), "1".into());
        let t = Instant::now();
        let err = h
            .invoke(&s, json!(0), loader(&a, &calls))
            .await
            .unwrap_err();
        match &err {
            FnError::StartFailed { reason, .. } => assert!(reason.contains("/init"), "{reason}"),
            e => panic!("expected StartFailed, got {e}"),
        }
        assert!(t.elapsed() < Duration::from_secs(12), "{:?}", t.elapsed());

        // One that exits at once: the error says so, with what it printed.
        let mut s2 = spec("n", "exits", &a);
        s2.env.insert("PORT".into(), "not-a-port".into());
        let err = h
            .invoke(&s2, json!(0), loader(&a, &calls))
            .await
            .unwrap_err();
        match &err {
            FnError::StartFailed { reason, .. } => {
                assert!(reason.contains("exited (code 1)"), "{reason}");
                assert!(reason.contains("cannot listen"), "{reason}");
            }
            e => panic!("expected StartFailed, got {e}"),
        }
        wait_gone(&h).await;
        assert!(h.status().is_empty());
        assert_eq!(h.stats()["n"].cold_starts, 2);
    })
}

#[test]
fn without_podman_functions_are_unavailable() {
    smol::block_on(async {
        let _images = IMAGES.read().await;
        let h = FunctionHost::connect("/nonexistent/podman.sock", HostConfig::default()).await;
        let reason = h.available().unwrap_err();
        assert!(reason.contains("/nonexistent/podman.sock"), "{reason}");
        let s = FnSpec::new("a", "f", "localhost/capy-fn:x");
        let err = h
            .invoke(&s, json!(0), || async {
                Ok::<_, FnError>(ImageSource::Bytes(Bytes::new()))
            })
            .await
            .unwrap_err();
        match &err {
            FnError::Unavailable(m) => assert!(m.contains("podman"), "{m}"),
            e => panic!("expected Unavailable, got {e}"),
        }
        assert_eq!(err.http_status(), 503);
        let none = FunctionHost::new(None, HostConfig::default());
        assert!(matches!(
            none.deploy(&s, || async {
                Ok::<_, FnError>(ImageSource::Bytes(Bytes::new()))
            })
            .await,
            Err(FnError::Unavailable(_))
        ));
        assert_eq!(none.tick(none.now()).await, 0);
    })
}

#[test]
fn concurrent_invocations_share_a_bounded_pool() {
    smol::block_on(async {
        let _images = IMAGES.read().await;
        let a = archive(8);
        let h = Arc::new(host("pool", |c| c.max_per_function = 2));
        let s = spec("p", "slow", &a);
        let calls = Arc::new(AtomicUsize::new(0));
        // Image and first container in place, so the burst measures the pool.
        h.invoke(&s, json!(0), loader(&a, &calls)).await.unwrap();
        let tasks: Vec<_> = (0..5)
            .map(|i| {
                let (h, s, a, calls) = (h.clone(), s.clone(), a.clone(), calls.clone());
                smol::spawn(async move {
                    h.invoke(
                        &s,
                        json!({"action": "sleep", "ms": 300, "i": i}),
                        loader(&a, &calls),
                    )
                    .await
                })
            })
            .collect();
        let mut outs = Vec::new();
        for t in tasks {
            outs.push(t.await.unwrap());
        }
        for (i, o) in outs.iter().enumerate() {
            assert_eq!(o.output["i"], json!(i));
        }
        let colds = outs.iter().filter(|o| o.cold).count();
        assert_eq!(colds, 1, "one more container, then queued for the two");
        assert!(
            outs.iter().any(|o| o.timings.queued_us > 100_000),
            "some waited"
        );
        assert_eq!(listed(&h).await.len(), 2);
        assert_eq!(h.status().len(), 2);
        assert!(
            calls.load(Ordering::SeqCst) <= 1,
            "the image is loaded at most once"
        );
        assert_eq!(h.undeploy("p", "slow").await, 2);
    })
}

#[test]
fn a_restarted_node_removes_what_its_previous_life_left() {
    smol::block_on(async {
        let _images = IMAGES.write().await;
        let a = archive(9);
        let s = spec("r", "left", &a);
        let before = host("restart", |_| {});
        // This time the archive comes from a file, streamed to podman.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fn.tar");
        std::fs::write(&path, &a).unwrap();
        assert_eq!(FnSpec::image_ref_for_file(&path).unwrap(), s.image);
        let _ = engine().remove_image(&s.image).await;
        let p2 = path.clone();
        let inv = before
            .invoke(&s, json!(0), move || async move {
                Ok::<_, FnError>(ImageSource::File(p2))
            })
            .await
            .unwrap();
        assert!(inv.cold && inv.timings.image_load_us.is_some());
        drop(before); // the process died; its container runs on
        let after = host("restart", |_| {});
        assert_eq!(listed(&after).await.len(), 1);
        assert_eq!(after.cleanup_leftovers().await.unwrap(), 1);
        assert!(listed(&after).await.is_empty());
    })
}

#[test]
fn bench_reports_sane_figures() {
    smol::block_on(async {
        let _images = IMAGES.write().await;
        let a = archive(10);
        let r = bench(
            engine(),
            ImageSource::Bytes(a),
            BenchConfig {
                cold_runs: 1,
                warm_calls: 20,
                node: format!("test-{}-bench", std::process::id()),
            },
        )
        .await
        .unwrap();
        assert_eq!(r.warm_host_us.n, 20);
        assert!(r.cold_start_local_ms.p50 > 1.0, "{r:?}");
        assert!(r.cold_start_with_load_ms.p50 > 1.0, "{r:?}");
        assert!(r.warm_direct_us.p50 > 0.0 && r.warm_host_us.p50 > 0.0);
        let v: Value = serde_json::to_value(&r).unwrap();
        assert!(v["warm_overhead_p50_us"].is_number());
        let _ = engine().remove_image(&r.image).await;
    })
}

#[test]
fn archive_magic_is_checked() {
    assert!(host::check_archive_magic(&one_file_tar("a", b"b")).is_ok());
    assert!(host::check_archive_magic(&[0x1f, 0x8b, 8, 0]).is_ok());
    assert!(host::check_archive_magic(b"").is_err());
    assert!(host::check_archive_magic(b"{\"not\": \"a tar\"}").is_err());
}

/// The full measurement, printed as JSON:
/// `cargo test --release --lib containers::tests::bench_figures -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_figures() {
    smol::block_on(async {
        let _images = IMAGES.write().await;
        let r = bench(
            engine(),
            ImageSource::Bytes(env().archive.clone().into()),
            BenchConfig {
                cold_runs: 10,
                warm_calls: 500,
                ..BenchConfig::default()
            },
        )
        .await
        .unwrap();
        println!("{}", serde_json::to_string_pretty(&r).unwrap());
        let _ = engine().remove_image(&r.image).await;
    })
}

#[test]
fn an_idle_container_that_died_is_replaced_without_an_error() {
    smol::block_on(async {
        let _images = IMAGES.read().await;
        let a = archive(11);
        let h = host("diedidle", |_| {});
        let s = spec("d", "gone", &a);
        let calls = Arc::new(AtomicUsize::new(0));
        h.invoke(&s, json!(0), loader(&a, &calls)).await.unwrap();
        let l = listed(&h).await;
        assert_eq!(l.len(), 1);
        // Killed behind the host's back while idle.
        engine().remove(&l[0].id).await.unwrap();
        let inv = h
            .invoke(&s, json!("again"), loader(&a, &calls))
            .await
            .unwrap();
        assert!(inv.cold, "a fresh container served it");
        assert_eq!(inv.output, json!("again"));
        let now = listed(&h).await;
        assert_eq!(now.len(), 1);
        assert_ne!(now[0].id, l[0].id);
        let st = h.stats()["d"].clone();
        assert_eq!((st.invocations, st.errors, st.cold_starts), (2, 0, 2));
        assert_eq!(h.undeploy("d", "gone").await, 1);
    })
}

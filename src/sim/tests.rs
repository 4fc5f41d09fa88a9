use super::*;

#[test]
fn small_overlay_routes_exactly_and_repairs() {
    let opts = OverlaySimOpts {
        nodes: 300,
        lookups: 2000,
        fail_fraction: 0.1,
        seed: 3,
        ..OverlaySimOpts::default()
    };
    let r = run_overlay(&opts);
    assert_eq!(r.joined, 300);
    assert_eq!(r.success_rate, 1.0);
    assert_eq!(r.leaf_sets_exact_after_build, 1.0);
    assert!(
        r.mean_hops > 0.5 && r.mean_hops < 2.5,
        "mean hops {}",
        r.mean_hops
    );
    assert!(r.rdp >= 1.0, "rdp {}", r.rdp);
    assert_eq!(r.failed_nodes, 30);
    assert!(r.success_after_failure.unwrap() >= 0.99);
    assert!(r.repair_virtual_seconds.is_some());
    assert_eq!(r.success_after_repair, Some(1.0));
    let v = serde_json::to_value(&r).unwrap();
    for k in [
        "nodes",
        "mean_hops",
        "p99_hops",
        "max_hops",
        "success_rate",
        "success_after_failure",
        "success_after_repair",
        "rdp",
        "build_seconds",
        "peak_rss_mb",
    ] {
        assert!(v.get(k).is_some(), "{k} missing from the report");
    }
}

#[test]
fn same_seed_same_result() {
    let opts = OverlaySimOpts {
        nodes: 120,
        lookups: 300,
        seed: 9,
        ..OverlaySimOpts::default()
    };
    let a = run_overlay(&opts);
    let b = run_overlay(&opts);
    assert_eq!(a.messages, b.messages);
    assert_eq!(a.mean_hops, b.mean_hops);
}

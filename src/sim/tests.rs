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

#[test]
fn trees_beat_polling_reach_everyone_and_repair() {
    let opts = SubscribeSimOpts {
        nodes: 600,
        subscribers: vec![50, 400],
        topics: 2,
        publishes: 5,
        fail_fraction: 0.1,
        seed: 4,
        ..SubscribeSimOpts::default()
    };
    let r = run_subscribe(&opts);
    assert_eq!(r.rows.len(), 2);
    for row in &r.rows {
        assert_eq!(row.delivered_ratio, 1.0, "{row:?}");
        assert_eq!(row.publish.samples, row.subscribers * 2 * 5);
        assert!(
            row.publish.median_ms < row.polling.median_ms,
            "publish {:?} vs polling {:?}",
            row.publish,
            row.polling
        );
        // the route length: a few hops for 600 nodes
        assert!((1..=6).contains(&row.tree_depth_max), "{row:?}");
        // one message per tree edge, not per subscriber from the root
        assert!(row.root_children < row.subscribers as f64, "{row:?}");
        assert!(row.messages_per_publish >= row.subscribers as f64);
    }
    // polling at 1 s waits half an interval on average
    assert!(
        r.rows[0].polling.median_ms > 400.0,
        "{:?}",
        r.rows[0].polling
    );
    let rep = r.repair.expect("repair phase");
    assert_eq!(rep.failed_nodes, 60);
    assert!(rep.cut_off > 0, "{rep:?}");
    assert!(rep.repaired_after_s.is_some_and(|s| s < 20.0), "{rep:?}");
    assert!(rep.final_reach >= 0.999, "{rep:?}");
    assert!(
        rep.missed_after_repair * 1000 <= rep.deliveries_after_repair,
        "{rep:?}"
    );
}

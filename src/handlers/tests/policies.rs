//! The shipped policies, driven through the engine with an in-memory host.

use super::*;
use serde_json::json;

const MIN: u64 = 60_000_000;

fn policy(name: &str) -> AppRuntime {
    match AppRuntime::new(APP, &HandlerSource::Policy(name.into()), Limits::default()) {
        Ok(rt) => rt,
        Err(e) => panic!("{name}: {e}"),
    }
}

fn ctx() -> CallCtx {
    CallCtx::new(key("f"), "client").with_data(Some(json!({"v": 1})))
}

fn containers(effects: &[Effect]) -> Vec<&'static str> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::DeployContainer { .. } => Some("deploy"),
            Effect::DeleteContainer { .. } => Some("delete"),
            _ => None,
        })
        .collect()
}

/// Invokes the key every `period` minutes for `n` periods, with a timer
/// tick every minute; returns (cold starts after the first `warmup`
/// invocations, minutes loaded while idle after warmup, the last state).
fn keepalive_run(period: u64, n: u64, warmup: u64) -> (u64, u64, serde_json::Value) {
    let mut rt = policy("adaptive-keepalive");
    let h = host();
    let (mut loaded, mut cold, mut idle) = (false, 0, 0);
    let mut last_state = json!(null);
    for minute in 0..period * n {
        h.set_now(minute * MIN + 1);
        let counting = minute >= period * warmup;
        if minute % period == 0 {
            if !loaded && counting {
                cold += 1;
            }
            let out = call(&mut rt, Event::Read { args: json!(null) }, ctx(), &h).unwrap();
            assert_eq!(out.result, Some(json!({"v": 1})));
            loaded = true; // an invocation loads the container anyway
            for c in containers(&out.effects) {
                loaded = c == "deploy";
            }
        }
        h.set_now(minute * MIN + 30_000_000);
        let out = call(&mut rt, Event::Timer, CallCtx::new(key("f"), ""), &h).unwrap();
        for c in containers(&out.effects) {
            loaded = c == "deploy";
        }
        if out.state.is_some() {
            last_state = rt.export_state(&key("f")).unwrap().unwrap();
        }
        if loaded && counting && minute % period != 0 {
            idle += 1;
        }
    }
    let _ = last_state;
    (cold, idle, rt.export_state(&key("f")).unwrap().unwrap())
}

#[test]
fn keepalive_prewarms_a_periodic_function() {
    // every 90 minutes: longer than the fixed 60-minute fallback, so every
    // call is cold until the histogram takes over
    let (cold, idle, st) = keepalive_run(90, 30, 6);
    assert_eq!(cold, 0, "state: {st}");
    let (pw, ka) = (st["pw"].as_u64().unwrap(), st["ka"].as_u64().unwrap());
    assert!((60..90).contains(&pw), "pre-warm window {pw}");
    assert!((91..130).contains(&ka), "keep-alive window {ka}");
    // loaded only from the pre-warm point to the next call, not all along
    let per_gap = idle as f64 / 24.0;
    assert!(per_gap < 40.0, "idle minutes per gap {per_gap}");
}

#[test]
fn keepalive_trusts_a_regular_pattern_early() {
    // every 3 hours: two equal idle times are enough to pre-warm the
    // fourth call; only the first three are cold
    let (cold, idle, st) = keepalive_run(180, 8, 3);
    assert_eq!(cold, 0, "state: {st}");
    assert!(st["pw"].as_u64().unwrap() > 60, "{st}");
    assert!(idle < 5 * 60, "idle minutes {idle}");
    // irregular idle times (20 and 150 minutes) are not trusted that early
    let mut rt = policy("adaptive-keepalive");
    let h = host();
    for t in [0, 20, 170] {
        h.set_now(t * MIN);
        call(&mut rt, Event::Read { args: json!(null) }, ctx(), &h).unwrap();
    }
    let st = rt.export_state(&key("f")).unwrap().unwrap();
    assert_eq!((st["pw"].clone(), st["ka"].clone()), (json!(0), json!(60)));
}

#[test]
fn keepalive_falls_back_while_samples_are_few() {
    let mut rt = policy("adaptive-keepalive");
    let h = host();
    let out = call(&mut rt, Event::Read { args: json!(null) }, ctx(), &h).unwrap();
    assert_eq!(containers(&out.effects), vec!["deploy"]);
    let mut unloaded_at = None;
    for minute in 1..=70 {
        h.set_now(minute * MIN);
        let out = call(&mut rt, Event::Timer, CallCtx::new(key("f"), ""), &h).unwrap();
        if containers(&out.effects) == vec!["delete"] {
            unloaded_at = Some(minute);
            break;
        }
        assert!(out.effects.is_empty(), "minute {minute}: {:?}", out.effects);
    }
    assert_eq!(unloaded_at, Some(60));
}

#[test]
fn keepalive_keeps_frequent_functions_warm() {
    let (cold, idle, st) = keepalive_run(3, 100, 1);
    assert_eq!(cold, 0, "{st}");
    assert_eq!(st["pw"], json!(0), "no unloading for short gaps");
    assert!(idle > 0);
}

#[test]
fn keepalive_state_survives_a_root_change() {
    let (_, _, st) = keepalive_run(90, 10, 0);
    let mut rt = policy("adaptive-keepalive");
    rt.restore_state(&key("f"), st.clone()).unwrap();
    let h = host();
    h.set_now(10 * 90 * MIN + 75 * MIN);
    let out = call(&mut rt, Event::Timer, CallCtx::new(key("f"), ""), &h).unwrap();
    assert_eq!(out.state.as_ref().unwrap()["pw"], st["pw"]);
    assert_eq!(out.state.as_ref().unwrap()["hist"], st["hist"]);
}

#[test]
fn subscription_registers_and_publishes_in_order() {
    let mut rt = policy("subscription");
    let h = host();
    let k = key("topic");
    for who in ["n1", "n2", "n3"] {
        let ctx = CallCtx::new(k.clone(), who).with_data(Some(json!("v0")));
        let out = call(
            &mut rt,
            Event::Read {
                args: json!({"subscribe": true}),
            },
            ctx,
            &h,
        )
        .unwrap();
        assert_eq!(out.result, Some(json!("v0")));
        assert_eq!(
            out.effects,
            vec![Effect::Subscribe {
                key: k.clone(),
                subscriber: who.into()
            }]
        );
    }
    // a plain read does not subscribe
    let out = call(
        &mut rt,
        Event::Read { args: json!({}) },
        CallCtx::new(k.clone(), "n4"),
        &h,
    )
    .unwrap();
    assert!(out.effects.is_empty());
    let mut seqs = Vec::new();
    for (i, v) in ["a", "b", "c"].iter().enumerate() {
        h.set_now(0);
        let out = call(
            &mut rt,
            Event::Update { new_data: json!(v) },
            CallCtx::new(k.clone(), "writer"),
            &h,
        )
        .unwrap();
        assert_eq!(out.result, Some(json!(v)));
        match &out.effects[..] {
            [Effect::Publish { key, value }] => {
                assert_eq!(key, &k);
                assert_eq!(value["value"], json!(v));
                seqs.push(value["seq"].as_i64().unwrap());
            }
            other => panic!("update {i}: {other:?}"),
        }
    }
    assert_eq!(seqs, vec![1, 2, 3]);
    let out = call(&mut rt, Event::Timer, CallCtx::new(k.clone(), ""), &h).unwrap();
    assert_eq!(out.state, Some(json!({"seq": 3, "subscribers": 3})));
    // a new root continues the sequence from the checkpoint and its clock
    let mut rt2 = policy("subscription");
    rt2.restore_state(&k, out.state.unwrap()).unwrap();
    h.set_now(1_000);
    let out = call(
        &mut rt2,
        Event::Update {
            new_data: json!("d"),
        },
        CallCtx::new(k.clone(), "w"),
        &h,
    )
    .unwrap();
    assert!(
        matches!(&out.effects[..], [Effect::Publish { value, .. }] if value["seq"] == json!(1000))
    );
}

#[test]
fn smart_replication_follows_popularity() {
    let mut rt = policy("smart-replication");
    let h = host();
    let k = key("obj");
    let ctx = CallCtx::new(k.clone(), "c").with_data(Some(json!({"x": 1})));
    let out = call(&mut rt, Event::Create, ctx, &h).unwrap();
    assert_eq!(out.result, Some(json!({"x": 1})));
    assert_eq!(
        out.effects,
        vec![
            Effect::Write {
                node: Some(h.leaves[0]),
                key: k.clone(),
                value: json!({"x": 1})
            },
            Effect::Write {
                node: Some(h.leaves[1]),
                key: k.clone(),
                value: json!({"x": 1})
            },
        ]
    );
    let mut replicas = 3;
    let mut history = Vec::new();
    let mut tick = |rt: &mut AppRuntime, reads: usize| {
        for _ in 0..reads {
            call(
                rt,
                Event::Read { args: json!(null) },
                CallCtx::new(k.clone(), "c"),
                &h,
            )
            .unwrap();
        }
        let out = call(rt, Event::Timer, CallCtx::new(k.clone(), ""), &h).unwrap();
        for e in out.effects {
            match e {
                Effect::SetReplicas { n, .. } => replicas = n,
                other => panic!("{other:?}"),
            }
        }
        history.push(replicas);
    };
    for _ in 0..4 {
        tick(&mut rt, 500); // hot
    }
    for _ in 0..8 {
        tick(&mut rt, 0); // cold again
    }
    assert_eq!(history[0], 6, "{history:?}");
    assert!(history[3] >= 6, "{history:?}");
    // falls back one replica per tick, down to the base
    assert!(history.windows(2).all(|w| w[1] + 1 >= w[0]), "{history:?}");
    assert_eq!(*history.last().unwrap(), 3, "{history:?}");
}

#[test]
fn every_policy_loads_and_idles_small() {
    for (name, _) in POLICIES {
        let rt = policy(name);
        rt.gc();
        let used = rt.memory_used();
        assert!(used <= 256 * 1024, "{name}: {used} bytes");
    }
}

#[test]
fn keepalive_survives_a_clock_that_steps_back() {
    let mut rt = policy("adaptive-keepalive");
    let h = host();
    for t in [100 * MIN, 50 * MIN, 120 * MIN, 10 * MIN] {
        h.set_now(t);
        call(&mut rt, Event::Read { args: json!(null) }, ctx(), &h).unwrap();
        call(&mut rt, Event::Timer, CallCtx::new(key("f"), ""), &h).unwrap();
    }
    let st = rt.export_state(&key("f")).unwrap().unwrap();
    assert_eq!(st["n"], json!(3));
}

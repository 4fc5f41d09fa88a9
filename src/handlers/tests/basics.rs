use super::*;
use serde_json::json;

#[test]
fn callbacks_get_their_arguments_and_return_json() {
    let mut rt = lua(r#"
        function readCb(caller, args)
          return { who = caller, n = args.n + 1, list = {1, 2, 3}, empty = args.empty }
        end
        function updateCb(caller, new) new.seen = true return new end
        "#);
    let h = host();
    let out = read(&mut rt, &h, json!({"n": 41, "empty": []})).unwrap();
    assert!(out.ran);
    assert_eq!(
        out.result,
        Some(json!({"who": "client-1", "n": 42, "list": [1, 2, 3], "empty": []}))
    );
    let out = call(
        &mut rt,
        Event::Update {
            new_data: json!({"a": 1.5}),
        },
        CallCtx::new(key("k"), "c"),
        &h,
    )
    .unwrap();
    assert_eq!(out.result, Some(json!({"a": 1.5, "seen": true})));
}

#[test]
fn missing_callbacks_fall_back_to_the_default() {
    let mut rt = lua("function timerCb() end");
    assert!(rt.defines(EventKind::Timer));
    assert!(!rt.defines(EventKind::Read));
    let h = host();
    let ctx = CallCtx::new(key("k"), "c").with_data(Some(json!("stored")));
    let out = call(&mut rt, Event::Read { args: json!(null) }, ctx, &h).unwrap();
    assert!(!out.ran);
    assert_eq!(out.result, Some(json!("stored")));
    let out = call(
        &mut rt,
        Event::Update { new_data: json!(7) },
        CallCtx::new(key("k"), "c"),
        &h,
    )
    .unwrap();
    assert_eq!(out.result, Some(json!(7)));
}

#[test]
fn sys_facts_and_effects() {
    let mut rt = lua(r#"
        function readCb(caller, args)
          local leaves = sys.leaf_set(3)
          sys.write(leaves[1], sys.key(), {copy = true})
          sys.write(nil, "other-key", 5)
          sys.delete("app/gone")
          sys.deploy_container(sys.key())
          sys.delete_container(sys.key())
          sys.publish(sys.key(), "hello")
          sys.subscribe(sys.key(), caller)
          sys.set_replicas(sys.key(), 4)
          sys.log("now", sys.now(), "ip", sys.local_ip())
          return { node = sys.node_id(), n = #leaves, nb = #sys.neighbor(2), app = sys.app() }
        end
        "#);
    let h = host();
    h.set_now(1_234_567);
    let out = read(&mut rt, &h, json!({})).unwrap();
    let r = out.result.unwrap();
    assert_eq!(r["node"], json!(h.node.to_string()));
    assert_eq!(r["n"], json!(3));
    assert_eq!(r["nb"], json!(2));
    assert_eq!(r["app"], json!("app"));
    assert_eq!(out.logs, vec!["now\t1234567\tip\t127.0.0.1".to_string()]);
    let k = key("k");
    assert_eq!(
        out.effects,
        vec![
            Effect::Write {
                node: Some(h.leaves[0]),
                key: k.clone(),
                value: json!({"copy": true})
            },
            Effect::Write {
                node: None,
                key: key("other-key"),
                value: json!(5)
            },
            Effect::Delete { key: key("gone") },
            Effect::DeployContainer { key: k.clone() },
            Effect::DeleteContainer { key: k.clone() },
            Effect::Publish {
                key: k.clone(),
                value: json!("hello")
            },
            Effect::Subscribe {
                key: k.clone(),
                subscriber: "client-1".into()
            },
            Effect::SetReplicas { key: k, n: 4 },
        ]
    );
}

#[test]
fn own_key_reads_come_from_the_context_and_others_suspend() {
    let mut rt = lua(r#"
        function readCb(caller, args)
          local mine, holders = sys.read(sys.key())
          local other, oh = sys.read("peer")
          local missing, mh, err = sys.read("nothing")
          return { mine = mine, holders = holders, other = other, oh = oh, missing = missing == nil }
        end
        "#);
    let mut h = MemHost::with_leaves(NodeId(7), 2);
    h.suspend_reads = true;
    let h = Arc::new(h);
    h.put(key("peer"), json!({"v": 2}), vec![NodeId(9)]);
    let mut ctx = CallCtx::new(key("k"), "c").with_data(Some(json!([1, 2])));
    ctx.holders = vec![NodeId(7)];
    let out = call(&mut rt, Event::Read { args: json!(null) }, ctx, &h).unwrap();
    let r = out.result.unwrap();
    assert_eq!(r["mine"], json!([1, 2]));
    assert_eq!(r["holders"], json!([NodeId(7).to_string()]));
    assert_eq!(r["other"], json!({"v": 2}));
    assert_eq!(r["oh"], json!([NodeId(9).to_string()]));
    assert_eq!(r["missing"], json!(true));
    // the own key never reached the host
    assert_eq!(h.reads.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn policy_state_persists_per_key_and_checkpoints_on_timer() {
    let mut rt = lua(r#"
        function readCb() state.n = (state.n or 0) + 1 return state.n end
        function timerCb() state.ticks = (state.ticks or 0) + 1 end
        "#);
    let h = host();
    for i in 1..=3 {
        assert_eq!(
            read(&mut rt, &h, json!(null)).unwrap().result,
            Some(json!(i))
        );
    }
    let other = CallCtx::new(key("k2"), "c");
    let out = call(&mut rt, Event::Read { args: json!(null) }, other, &h).unwrap();
    assert_eq!(out.result, Some(json!(1)), "state is per key");
    let out = call(&mut rt, Event::Timer, CallCtx::new(key("k"), ""), &h).unwrap();
    assert_eq!(out.state, Some(json!({"n": 3, "ticks": 1})));

    // a new root continues from the checkpoint
    let mut rt2 = lua("function readCb() state.n = (state.n or 0) + 1 return state.n end");
    assert!(!rt2.has_state(&key("k")));
    rt2.restore_state(&key("k"), out.state.unwrap()).unwrap();
    assert_eq!(
        read(&mut rt2, &h, json!(null)).unwrap().result,
        Some(json!(4))
    );
}

#[test]
fn a_failed_call_rolls_state_back_to_the_checkpoint() {
    let mut rt = lua(r#"
        function readCb(caller, args)
          state.n = (state.n or 0) + 1
          sys.write(nil, sys.key(), state.n)
          if args.fail then error("boom") end
          return state.n
        end
        function timerCb() end
        "#);
    let h = host();
    read(&mut rt, &h, json!({})).unwrap();
    call(&mut rt, Event::Timer, CallCtx::new(key("k"), ""), &h).unwrap(); // checkpoint n=1
    read(&mut rt, &h, json!({})).unwrap(); // n=2, not checkpointed
    let err = read(&mut rt, &h, json!({"fail": true})).unwrap_err();
    assert!(
        matches!(&err, HandlerError::Lua(m) if m.contains("boom")),
        "{err}"
    );
    let out = read(&mut rt, &h, json!({})).unwrap();
    assert_eq!(
        out.result,
        Some(json!(2)),
        "back to the checkpoint, then +1"
    );
    assert_eq!(out.effects.len(), 1);
}

#[test]
fn load_errors_are_reported() {
    let e = AppRuntime::new(
        APP,
        &HandlerSource::Lua {
            name: "bad".into(),
            code: "function readCb( end".into(),
        },
        Limits::default(),
    )
    .err()
    .unwrap();
    assert!(
        matches!(&e, HandlerError::Load(m) if m.contains("bad:1")),
        "{e}"
    );
    let e = AppRuntime::new(
        APP,
        &HandlerSource::Policy("nope".into()),
        Limits::default(),
    )
    .err()
    .unwrap();
    assert_eq!(e, HandlerError::UnknownPolicy("nope".into()));
}

#[test]
fn values_are_bounded() {
    let mut rt = lua(r#"
        function readCb(caller, args)
          if args.deep then
            local t = {} local cur = t
            for i = 1, 200 do cur.x = {} cur = cur.x end
            return t
          end
          if args.fn then return { f = print } end
          return string.rep("x", 2000000)
        end
        "#);
    let h = host();
    let e = read(&mut rt, &h, json!({"deep": true})).unwrap_err();
    assert!(
        matches!(&e, HandlerError::Value(m) if m.contains("deeper")),
        "{e}"
    );
    let e = read(&mut rt, &h, json!({"fn": true})).unwrap_err();
    assert!(
        matches!(&e, HandlerError::Value(m) if m.contains("function")),
        "{e}"
    );
    let e = read(&mut rt, &h, json!({})).unwrap_err();
    assert!(
        matches!(&e, HandlerError::Value(m) if m.contains("larger")),
        "{e}"
    );
}

#[test]
fn reads_work_inside_pcall_and_fail_cleanly_across_c_calls() {
    let mut rt = lua(r#"
        function readCb(caller, args)
          if args.sort then
            local t = {"b", "a"}
            table.sort(t, function(x, y) sys.read("peer") return x < y end)
          end
          local ok, v = pcall(sys.read, "peer")
          return { ok = ok, v = v }
        end
        "#);
    let mut h = MemHost::with_leaves(NodeId(7), 2);
    h.suspend_reads = true;
    let h = Arc::new(h);
    h.put(key("peer"), json!(5), vec![]);
    let out = read(&mut rt, &h, json!({})).unwrap();
    assert_eq!(out.result, Some(json!({"ok": true, "v": 5})));
    let e = read(&mut rt, &h, json!({"sort": true})).unwrap_err();
    assert!(
        matches!(&e, HandlerError::Lua(m) if m.contains("yield")),
        "{e}"
    );
}

#[test]
fn the_call_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let mut rt = lua("function readCb() return 1 end");
    let h: Arc<dyn SysHost> = host();
    let fut = rt.call(Event::Timer, CallCtx::new(key("k"), ""), h);
    assert_send(&fut);
}

#[test]
fn a_dropped_call_is_rolled_back() {
    use std::future::Future;
    use std::task::{Context, Waker};
    let mut rt = lua(r#"
        function readCb(caller, args)
          state.n = (state.n or 0) + 1
          if args.wait then sys.read("peer") end
          return state.n
        end
        function timerCb() end
        "#);
    let mut h = MemHost::with_leaves(NodeId(7), 2);
    h.suspend_reads = true;
    let h = Arc::new(h);
    read(&mut rt, &h, json!({})).unwrap();
    call(&mut rt, Event::Timer, CallCtx::new(key("k"), ""), &h).unwrap(); // checkpoint n=1
    {
        let dh: Arc<dyn SysHost> = h.clone();
        let mut fut = Box::pin(rt.call(
            Event::Read {
                args: json!({"wait": true}),
            },
            CallCtx::new(key("k"), "c"),
            dh,
        ));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            fut.as_mut().poll(&mut cx).is_pending(),
            "suspended on the read"
        );
    } // dropped mid-call, with state.n = 2 in Lua
    let out = read(&mut rt, &h, json!({})).unwrap();
    assert_eq!(out.result, Some(json!(2)), "rolled back to n=1, then +1");
}

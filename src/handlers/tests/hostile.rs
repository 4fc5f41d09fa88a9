//! Hostile handlers: each must end its own call with a clear error, and the
//! same app state must serve the next call normally.

use super::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// Loads `body` as the failing branch of readCb, checks the error and that
/// the state still answers a normal read afterwards.
fn hostile(body: &str, check: impl Fn(&HandlerError) -> bool) -> HandlerError {
    // a generous wall clock: these tests are about the other limits, and an
    // unoptimised build copies memory slowly
    let limits = Limits {
        wall: Duration::from_secs(20),
        ..Limits::default()
    };
    hostile_with(body, limits, check)
}

fn hostile_with(body: &str, limits: Limits, check: impl Fn(&HandlerError) -> bool) -> HandlerError {
    let code = format!(
        "function readCb(caller, args)\n if args.ok then state.ok = (state.ok or 0) + 1 return 'alive' end\n do {body}\n end\n return 'not stopped'\nend"
    );
    let mut rt = lua_with(&code, limits);
    let h = host();
    let ctx = CallCtx::new(key("k"), "c").with_data(Some(json!("stored")));
    let err = match call(&mut rt, Event::Read { args: json!({}) }, ctx, &h) {
        Ok(o) => panic!("hostile handler was not stopped: {:?}", o.result),
        Err(e) => e,
    };
    assert!(check(&err), "unexpected error: {err}");
    for _ in 0..2 {
        let out = read(&mut rt, &h, json!({"ok": true})).unwrap();
        assert_eq!(out.result, Some(json!("alive")));
    }
    err
}

fn is_budget(e: &HandlerError) -> bool {
    matches!(e, HandlerError::Instructions(1_000_000))
}
fn is_memory(e: &HandlerError) -> bool {
    matches!(e, HandlerError::Memory(_))
}
fn lua_says(s: &'static str) -> impl Fn(&HandlerError) -> bool {
    move |e| matches!(e, HandlerError::Lua(m) if m.contains(s))
}

#[test]
fn endless_loop() {
    hostile("while true do end", is_budget);
}

#[test]
fn endless_loop_that_swallows_errors_with_pcall() {
    hostile(
        "while true do pcall(function() while true do end end) end",
        is_budget,
    );
}

#[test]
fn endless_loop_in_an_error_handler() {
    hostile(
        "while true do xpcall(function() while true do end end, function(e) while true do end end) end",
        is_budget,
    );
}

#[test]
fn endless_loop_in_a_coroutine() {
    // the library is not offered, so no coroutine can escape the call's hook
    hostile(
        "local co = coroutine.wrap(function() while true do end end) co()",
        lua_says("coroutine"),
    );
}

#[test]
fn endless_loop_in_metamethods() {
    hostile(
        "local t = setmetatable({}, {__index = function() while true do end end}) return t.x",
        is_budget,
    );
    hostile(
        "local t = setmetatable({}, {__add = function() while true do end end}) return t + 1",
        is_budget,
    );
    hostile(
        "local mt = {__lt = function() while true do end end}
         local a = {setmetatable({}, mt), setmetatable({}, mt), setmetatable({}, mt)}
         table.sort(a)",
        is_budget,
    );
    hostile(
        "local t = setmetatable({}, {__tostring = function() while true do end end}) return tostring(t)",
        is_budget,
    );
    hostile(
        "local t <close> = setmetatable({}, {__close = function() while true do end end}) error('x')",
        is_budget,
    );
    // an error object whose __tostring never returns: never called by the host
    hostile(
        "error(setmetatable({}, {__tostring = function() while true do end end}))",
        lua_says("error object is a table value"),
    );
}

#[test]
fn endless_loop_in_gc_is_refused() {
    hostile(
        "setmetatable({}, {__gc = function() while true do end end}) collectgarbage('collect')",
        lua_says("__gc"),
    );
    hostile("collectgarbage('collect')", lua_says("only \"count\""));
    hostile("collectgarbage('stop')", lua_says("only \"count\""));
}

#[test]
fn endless_loop_at_load_time() {
    let e = AppRuntime::new(
        APP,
        &HandlerSource::Lua {
            name: "t".into(),
            code: "while true do end".into(),
        },
        Limits::default(),
    )
    .err()
    .unwrap();
    assert!(
        matches!(&e, HandlerError::Load(m) if m.contains("budget")),
        "{e}"
    );
}

#[test]
fn wall_clock_cap() {
    let limits = Limits {
        instructions: u64::MAX,
        wall: Duration::from_millis(50),
        ..Limits::default()
    };
    let t0 = Instant::now();
    hostile_with(
        "while true do end",
        limits,
        |e| matches!(e, HandlerError::WallClock(d) if *d == Duration::from_millis(50)),
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn memory_bombs() {
    hostile(
        "local t, s = {}, string.rep('x', 100000) local i = 0 while true do i = i + 1 t[i] = s .. i end",
        is_memory,
    );
    hostile("local s = 'x' while true do s = s .. s end", is_memory);
    hostile(
        "local t = {} for i = 1, 64 do t[i] = string.rep('y', 1000000) .. i end",
        is_memory,
    );
    // pcall does not keep a memory abort from ending the call
    hostile(
        "local t = {} while true do pcall(function() local s = 'x' while true do s = s .. s end end) end",
        is_memory,
    );
}

#[test]
fn huge_string_rep() {
    let t0 = Instant::now();
    hostile("return string.rep('x', 1e12)", is_memory);
    hostile("return ('x'):rep(2^40, ',')", is_memory);
    // many smaller ones are charged by size and run out of budget
    hostile(
        "while true do local s = string.rep('x', 8000000) end",
        is_budget,
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn deep_recursion() {
    hostile(
        "local function f(n) return 1 + f(n + 1) end return f(1)",
        |e| matches!(e, HandlerError::Lua(m) if m.contains("stack overflow")) || is_memory(e),
    );
    hostile(
        "local function f() return pcall(f) end f() error('deep')",
        lua_says("deep"),
    );
    hostile(
        "local t = setmetatable({}, {}) getmetatable(t).__index = t return t.x",
        |e| matches!(e, HandlerError::Lua(m) if m.contains("loop") || m.contains("overflow")),
    );
}

#[test]
fn forbidden_libraries_are_absent() {
    hostile("os.execute('true')", lua_says("'os'"));
    hostile("io.open('/etc/passwd')", lua_says("'io'"));
    hostile("require('os')", lua_says("'require'"));
    hostile(
        "package.loadlib('libc.so.6', 'system')",
        lua_says("'package'"),
    );
    hostile("debug.sethook()", lua_says("'debug'"));
    hostile("dofile('/etc/passwd')", lua_says("'dofile'"));
    hostile("loadfile('/etc/passwd')", lua_says("'loadfile'"));
    hostile("string.dump(print)", lua_says("'dump'"));
}

#[test]
fn bytecode_is_refused() {
    hostile("load('\\27Lua\\84\\0')", lua_says("binary chunks"));
    hostile("load('return 1', 'x', 'b')", lua_says("only text chunks"));
    hostile("load('return 1', 'x', 'bt')", lua_says("only text chunks"));
    // a reader function cannot sneak bytecode in either
    hostile(
        "local done = false
         local f, err = load(function() if done then return nil end done = true return '\\27Lua' end)
         assert(f, err)",
        lua_says("binary chunk"),
    );
}

#[test]
fn text_load_stays_in_the_sandbox() {
    let mut rt = lua(
        "function readCb() local f = assert(load('return os == nil and io == nil and x', 'c', 't', {x = 3})) return f() end",
    );
    let h = host();
    // the env table has no os/io either, and x comes from it
    assert_eq!(
        read(&mut rt, &h, json!(null)).unwrap().result,
        Some(json!(3))
    );
    hostile("local f = load('while true do end') f()", is_budget);
}

#[test]
fn other_apps_keys_are_refused() {
    let forbidden =
        |e: &HandlerError| matches!(e, HandlerError::Forbidden(m) if m.contains("other/"));
    hostile("sys.write(nil, 'other/k', 1)", forbidden);
    hostile("sys.read('other/k')", forbidden);
    hostile("sys.delete('other/k')", forbidden);
    hostile("sys.publish('other/k', 1)", forbidden);
    hostile("sys.deploy_container('other/k')", forbidden);
    hostile("sys.set_replicas('other/k', 3)", forbidden);
    // and pcall does not hide the attempt
    hostile("pcall(sys.write, nil, 'other/k', 1)", forbidden);
}

#[test]
fn refused_writes_leave_no_effects() {
    let mut rt =
        lua("function readCb() sys.write(nil, sys.key(), 1) sys.write(nil, 'other/x', 2) end");
    let h = host();
    assert!(read(&mut rt, &h, json!(null)).is_err());
    let mut rt = lua("function readCb() sys.write(nil, sys.key(), 1) error('late') end");
    assert!(read(&mut rt, &h, json!(null)).is_err());
}

#[test]
fn effect_and_read_counts_are_bounded() {
    hostile("while true do sys.write(nil, sys.key(), 1) end", |e| {
        matches!(e, HandlerError::TooManyEffects(256))
    });
    hostile("for i = 1, 100 do sys.read('k' .. i) end", |e| {
        matches!(e, HandlerError::TooManyReads(32))
    });
}

#[test]
fn many_failures_do_not_leak_memory() {
    let mut rt = lua(
        "function readCb(c, args) if args.bomb then local s = 'x' while true do s = s .. s end end state.n = 1 return 1 end",
    );
    let h = host();
    read(&mut rt, &h, json!({})).unwrap();
    rt.gc();
    let before = rt.memory_used();
    for _ in 0..20 {
        assert!(read(&mut rt, &h, json!({"bomb": true})).is_err());
    }
    read(&mut rt, &h, json!({})).unwrap();
    rt.gc();
    let after = rt.memory_used();
    assert!(after < before + 64 * 1024, "before {before}, after {after}");
}

#[test]
fn wall_clock_cap_with_expensive_instructions() {
    // every CONCAT copies 8 MB: few instructions, much time between hooks
    let limits = Limits {
        instructions: u64::MAX,
        wall: Duration::from_millis(100),
        ..Limits::default()
    };
    let t0 = Instant::now();
    hostile_with(
        "local s = string.rep('x', 4000000) while true do local t = s .. s end",
        limits,
        |e| matches!(e, HandlerError::WallClock(_)),
    );
    let took = t0.elapsed();
    eprintln!("concat churn stopped after {took:?} (cap 100 ms)");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn costly_library_calls_are_charged() {
    let t0 = Instant::now();
    let big = "local t = {string.byte(string.rep('x', 400000), 1, -1)}";
    hostile(&format!("{big} while true do table.sort(t) end"), is_budget);
    hostile(
        &format!("{big} while true do table.insert(t, 1, 0) table.remove(t, 1) end"),
        is_budget,
    );
    hostile(
        &format!("{big} while true do local s = table.concat(t, ',') end"),
        |e| is_budget(e) || is_memory(e),
    );
    hostile(
        "local s = string.rep('x', 4e6) while true do local u = s:upper() end",
        is_budget,
    );
    hostile(
        "local s = string.rep(' ', 8e6) while true do tonumber(s) end",
        is_budget,
    );
    hostile(
        "local s = string.rep('x = 1 ', 1e6) while true do load(s) end",
        is_budget,
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
}

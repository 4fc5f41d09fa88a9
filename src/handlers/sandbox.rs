//! The sandboxed Lua state: which libraries exist, the budget meter behind
//! the instruction hook, and the Rust side of the `sys` table.
//!
//! Budget rules that are easy to get wrong, and how they are kept:
//! - Hooks fire per Lua thread, so every call runs in a fresh coroutine with
//!   the hook set on it; the `coroutine` library itself is not offered.
//! - Hooks do not fire inside C functions: the costly library functions
//!   are charged by their work (`charged`), the pattern functions are a
//!   metered port (`pattern`), `string.rep` is refused past the memory limit
//!   before it copies, and the wall clock is checked at every hook. What a
//!   single VM instruction can still do (a concatenation copying up to the
//!   memory limit) bounds how far past the wall-clock cap a call can run:
//!   about `Limits::hook_interval` such instructions.
//! - Lua calls a message handler with hooks off when the error came from a
//!   hook, so `xpcall`'s handler is called after the stack unwinds instead.
//! - Hooks are off inside finalizers, so `__gc` metamethods are refused.
//! - `pcall` cannot swallow an abort; the abort flag stays set, so the hook
//!   keeps failing the call until it unwinds.
//! - Host code never calls a handler's metamethods: tables are read raw and
//!   error objects are turned into strings inside the budgeted coroutine.

use super::convert;
use super::host::SysHost;
use super::{AppKey, Effect, HandlerError, Limits, MAX_NODES};
use crate::id::NodeId;
use mlua::{
    Function, HookTriggers, Lua, LuaOptions, MultiValue, StdLib, Table, Value as LuaValue, VmState,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Instructions between two hook calls by default: the granularity of the
/// instruction budget and of the wall-clock check.
pub const DEFAULT_HOOK_INTERVAL: u32 = 250;

/// Bytes of `string.rep` output charged as one instruction.
const REP_BYTES_PER_INSTRUCTION: u64 = 64;

/// Most replicas a handler may ask for.
pub const MAX_REPLICAS: i64 = 16;

/// Longest `sys.log` line kept.
const MAX_LOG_LINE: usize = 1024;

const PRELUDE: &str = include_str!("lua/prelude.lua");

/// The meter and per-call context shared by the hook and the `sys`
/// functions of one app state.
pub struct Shared {
    used: AtomicU64,
    budget: AtomicU64,
    /// Nanoseconds since `epoch` after which the hook stops the call.
    deadline: AtomicU64,
    epoch: Instant,
    aborted: AtomicBool,
    pub call: Mutex<CallState>,
}

/// What the `sys` functions of the running call see and produce.
pub struct CallState {
    pub app: String,
    pub limits: Limits,
    pub host: Option<Arc<dyn SysHost>>,
    pub key: Option<AppKey>,
    pub key_str: String,
    pub data: Option<serde_json::Value>,
    pub holders: Vec<NodeId>,
    pub effects: Vec<Effect>,
    pub logs: Vec<String>,
    pub logs_dropped: usize,
    pub reads: usize,
    pub abort: Option<HandlerError>,
}

impl Shared {
    pub(super) fn new(app: &str, limits: &Limits) -> Shared {
        Shared {
            used: AtomicU64::new(0),
            budget: AtomicU64::new(limits.instructions),
            deadline: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            aborted: AtomicBool::new(false),
            call: Mutex::new(CallState {
                app: app.to_string(),
                limits: limits.clone(),
                host: None,
                key: None,
                key_str: String::new(),
                data: None,
                holders: Vec::new(),
                effects: Vec::new(),
                logs: Vec::new(),
                logs_dropped: 0,
                reads: 0,
                abort: None,
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, CallState> {
        // A panic while holding the lock cannot leave CallState half-made in
        // a way that matters: every call resets it.
        self.call.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts metering a call: fresh budget, no abort.
    pub fn start(&self, budget: u64) {
        self.used.store(0, Ordering::Relaxed);
        self.budget.store(budget, Ordering::Relaxed);
        self.aborted.store(false, Ordering::Relaxed);
    }

    /// Lets Lua run for `left` more wall-clock time from now.
    pub fn arm_clock(&self, left: std::time::Duration) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let d = now.saturating_add(left.as_nanos().min(u64::MAX as u128) as u64);
        self.deadline.store(d, Ordering::Relaxed);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Relaxed)
    }

    /// Records why the call must end (the first reason wins) and returns
    /// the Lua error that unwinds it.
    pub fn abort(&self, why: HandlerError) -> mlua::Error {
        let msg = why.to_string();
        let mut c = self.lock();
        if c.abort.is_none() {
            c.abort = Some(why);
        }
        self.aborted.store(true, Ordering::Relaxed);
        mlua::Error::runtime(msg)
    }

    /// Adds `n` instructions; fails the call once over budget or past the
    /// deadline.
    pub fn charge(&self, n: u64) -> mlua::Result<()> {
        if self.aborted.load(Ordering::Relaxed) {
            return Err(mlua::Error::runtime("handler call aborted"));
        }
        let used = self.used.fetch_add(n, Ordering::Relaxed).saturating_add(n);
        let budget = self.budget.load(Ordering::Relaxed);
        if used > budget {
            return Err(self.abort(HandlerError::Instructions(budget)));
        }
        let now = self.epoch.elapsed().as_nanos() as u64;
        if now > self.deadline.load(Ordering::Relaxed) {
            let wall = self.lock().limits.wall;
            return Err(self.abort(HandlerError::WallClock(wall)));
        }
        Ok(())
    }

    /// The hook for a call's coroutine.
    pub fn hook(
        self: &Arc<Self>,
        every: u32,
    ) -> (
        HookTriggers,
        impl Fn(&Lua, mlua::Debug) -> mlua::Result<VmState> + Send + 'static,
    ) {
        let me = Arc::clone(self);
        let every = every.max(1);
        (
            HookTriggers::new().every_nth_instruction(every),
            move |_lua: &Lua, _d: mlua::Debug| me.charge(every as u64).map(|_| VmState::Continue),
        )
    }
}

/// A fresh app state with the sandbox in place and no handler code yet.
pub struct Sandbox {
    pub lua: Lua,
    pub shared: Arc<Shared>,
    /// `run(f, ...)` from the prelude.
    pub runner: Function,
    /// The token `sys.read` yields with.
    pub read_token: Table,
    /// Marks empty tables that came from JSON arrays.
    pub array_mt: Table,
}

impl Sandbox {
    pub fn new(app: &str, limits: &Limits) -> Result<Sandbox, HandlerError> {
        let setup = |e: mlua::Error| HandlerError::Load(format!("sandbox setup: {e}"));
        let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE;
        let lua = Lua::new_with(libs, LuaOptions::default()).map_err(setup)?;
        let shared = Arc::new(Shared::new(app, limits));
        let array_mt = lua.create_table().map_err(setup)?;
        array_mt.raw_set("__name", "array").map_err(setup)?;
        super::pattern::install(&lua, &shared).map_err(setup)?;
        super::charged::install(&lua, &shared).map_err(setup)?;
        let rt = runtime_table(&lua, &shared, &array_mt).map_err(setup)?;
        let (runner, read_token): (Function, Table) = lua
            .load(PRELUDE)
            .set_name("=sandbox")
            .set_mode(mlua::ChunkMode::Text)
            .call(rt)
            .map_err(setup)?;
        let g = lua.globals();
        g.raw_set("coroutine", LuaValue::Nil).map_err(setup)?;
        lua.set_memory_limit(limits.memory_bytes).map_err(setup)?;
        // Generational collection: most of a call's garbage dies young, and
        // it measured a lower p99 per call than the incremental default.
        lua.gc_gen(0, 0);
        Ok(Sandbox {
            lua,
            shared,
            runner,
            read_token,
            array_mt,
        })
    }
}

fn bad_arg(f: &str, what: &str) -> mlua::Error {
    mlua::Error::runtime(format!("sys.{f}: {what}"))
}

/// Parses a key argument and refuses other apps' keys (ending the call).
fn scoped_key(shared: &Shared, f: &str, v: &LuaValue) -> mlua::Result<AppKey> {
    let s = match v {
        LuaValue::String(s) => s.to_str()?.to_owned(),
        other => {
            return Err(bad_arg(
                f,
                &format!("key must be a string, got {}", other.type_name()),
            ))
        }
    };
    let app = shared.lock().app.clone();
    let key = AppKey::parse(&app, &s).map_err(|e| bad_arg(f, &e.to_string()))?;
    if key.app != app {
        return Err(shared.abort(HandlerError::Forbidden(format!(
            "sys.{f}: the handler of app {app:?} may not touch key {key} of app {:?}",
            key.app
        ))));
    }
    Ok(key)
}

fn value_arg(
    shared: &Shared,
    array_mt: &Table,
    f: &str,
    v: &LuaValue,
) -> mlua::Result<serde_json::Value> {
    let max = shared.lock().limits.max_value_bytes;
    match convert::from_lua(v, max, array_mt) {
        Ok(Some(j)) => Ok(j),
        Ok(None) => Ok(serde_json::Value::Null),
        Err(e) => Err(bad_arg(f, &e)),
    }
}

fn push_effect(shared: &Shared, e: Effect) -> mlua::Result<()> {
    let mut c = shared.lock();
    if c.effects.len() >= c.limits.max_effects {
        let max = c.limits.max_effects;
        drop(c);
        return Err(shared.abort(HandlerError::TooManyEffects(max)));
    }
    c.effects.push(e);
    Ok(())
}

fn host(shared: &Shared, f: &str) -> mlua::Result<Arc<dyn SysHost>> {
    shared
        .lock()
        .host
        .clone()
        .ok_or_else(|| bad_arg(f, "only available inside a callback"))
}

fn node_list(lua: &Lua, ids: Vec<NodeId>) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(ids.len(), 0)?;
    for (i, id) in ids.into_iter().enumerate() {
        t.raw_set(i + 1, id.to_string())?;
    }
    Ok(t)
}

fn count_arg(f: &str, n: Option<i64>) -> mlua::Result<usize> {
    match n {
        None => Ok(MAX_NODES),
        Some(n) if n >= 0 => Ok((n as usize).min(MAX_NODES)),
        Some(n) => Err(bad_arg(f, &format!("count must not be negative, got {n}"))),
    }
}

/// One `sys.log` line from Lua values, without calling any metamethod.
fn log_line(args: &MultiValue) -> String {
    let mut line = String::new();
    for (i, v) in args.iter().enumerate() {
        if i > 0 {
            line.push('\t');
        }
        match v {
            LuaValue::Nil => line.push_str("nil"),
            LuaValue::Boolean(b) => line.push_str(if *b { "true" } else { "false" }),
            LuaValue::Integer(n) => line.push_str(&n.to_string()),
            LuaValue::Number(n) => line.push_str(&n.to_string()),
            LuaValue::String(s) => line.push_str(&String::from_utf8_lossy(&s.as_bytes())),
            other => line.push_str(other.type_name()),
        }
        if line.len() > MAX_LOG_LINE {
            break;
        }
    }
    if line.len() > MAX_LOG_LINE {
        let mut cut = MAX_LOG_LINE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

/// The Rust functions the prelude wires into `sys` and the base library.
fn runtime_table(lua: &Lua, shared: &Arc<Shared>, array_mt: &Table) -> mlua::Result<Table> {
    let rt = lua.create_table()?;
    let sys = lua.create_table()?;

    let s = Arc::clone(shared);
    sys.raw_set(
        "now",
        lua.create_function(move |_, ()| Ok(host(&s, "now")?.now() as i64))?,
    )?;
    let s = Arc::clone(shared);
    sys.raw_set(
        "node_id",
        lua.create_function(move |_, ()| Ok(host(&s, "node_id")?.node_id().to_string()))?,
    )?;
    let s = Arc::clone(shared);
    sys.raw_set(
        "local_ip",
        lua.create_function(move |_, ()| Ok(host(&s, "local_ip")?.local_ip().to_string()))?,
    )?;
    let s = Arc::clone(shared);
    sys.raw_set(
        "key",
        lua.create_function(move |_, ()| {
            let c = s.lock();
            match &c.key {
                Some(_) => Ok(Some(c.key_str.clone())),
                None => Ok(None),
            }
        })?,
    )?;
    let s = Arc::clone(shared);
    sys.raw_set(
        "app",
        lua.create_function(move |_, ()| Ok(s.lock().app.clone()))?,
    )?;
    let s = Arc::clone(shared);
    sys.raw_set(
        "leaf_set",
        lua.create_function(move |lua, n: Option<i64>| {
            let n = count_arg("leaf_set", n)?;
            node_list(
                lua,
                host(&s, "leaf_set")?
                    .leaf_set(n)
                    .into_iter()
                    .take(n)
                    .collect(),
            )
        })?,
    )?;
    let s = Arc::clone(shared);
    sys.raw_set(
        "neighbor",
        lua.create_function(move |lua, n: Option<i64>| {
            let n = count_arg("neighbor", n)?;
            node_list(
                lua,
                host(&s, "neighbor")?
                    .neighbor(n)
                    .into_iter()
                    .take(n)
                    .collect(),
            )
        })?,
    )?;

    let (s, mt) = (Arc::clone(shared), array_mt.clone());
    sys.raw_set(
        "write",
        lua.create_function(
            move |_, (node, key, value): (LuaValue, LuaValue, LuaValue)| {
                let node = match node {
                    LuaValue::Nil => None,
                    LuaValue::String(n) => Some(
                        n.to_str()?
                            .parse::<NodeId>()
                            .map_err(|e| bad_arg("write", &e.to_string()))?,
                    ),
                    other => {
                        return Err(bad_arg(
                            "write",
                            &format!(
                                "node must be an id string or nil, got {}",
                                other.type_name()
                            ),
                        ))
                    }
                };
                let key = scoped_key(&s, "write", &key)?;
                let value = value_arg(&s, &mt, "write", &value)?;
                push_effect(&s, Effect::Write { node, key, value })
            },
        )?,
    )?;
    let s = Arc::clone(shared);
    sys.raw_set(
        "delete",
        lua.create_function(move |_, key: LuaValue| {
            let key = scoped_key(&s, "delete", &key)?;
            push_effect(&s, Effect::Delete { key })
        })?,
    )?;
    let s = Arc::clone(shared);
    sys.raw_set(
        "deploy_container",
        lua.create_function(move |_, key: LuaValue| {
            let key = scoped_key(&s, "deploy_container", &key)?;
            push_effect(&s, Effect::DeployContainer { key })
        })?,
    )?;
    let s = Arc::clone(shared);
    sys.raw_set(
        "delete_container",
        lua.create_function(move |_, key: LuaValue| {
            let key = scoped_key(&s, "delete_container", &key)?;
            push_effect(&s, Effect::DeleteContainer { key })
        })?,
    )?;
    let (s, mt) = (Arc::clone(shared), array_mt.clone());
    sys.raw_set(
        "publish",
        lua.create_function(move |_, (key, value): (LuaValue, LuaValue)| {
            let key = scoped_key(&s, "publish", &key)?;
            let value = value_arg(&s, &mt, "publish", &value)?;
            push_effect(&s, Effect::Publish { key, value })
        })?,
    )?;
    for (name, on) in [("subscribe", true), ("unsubscribe", false)] {
        let s = Arc::clone(shared);
        sys.raw_set(
            name,
            lua.create_function(move |_, (key, who): (LuaValue, mlua::String)| {
                let key = scoped_key(&s, name, &key)?;
                let who = who.to_str()?.to_owned();
                if who.is_empty() || who.len() > super::MAX_KEY_BYTES {
                    return Err(bad_arg(
                        name,
                        "subscriber must be a non-empty name of at most 1024 bytes",
                    ));
                }
                let e = if on {
                    Effect::Subscribe {
                        key,
                        subscriber: who,
                    }
                } else {
                    Effect::Unsubscribe {
                        key,
                        subscriber: who,
                    }
                };
                push_effect(&s, e)
            })?,
        )?;
    }
    let s = Arc::clone(shared);
    sys.raw_set(
        "set_replicas",
        lua.create_function(move |_, (key, n): (LuaValue, i64)| {
            let key = scoped_key(&s, "set_replicas", &key)?;
            if !(1..=MAX_REPLICAS).contains(&n) {
                return Err(bad_arg(
                    "set_replicas",
                    &format!("replicas must be 1..={MAX_REPLICAS}, got {n}"),
                ));
            }
            push_effect(&s, Effect::SetReplicas { key, n: n as u32 })
        })?,
    )?;
    let s = Arc::clone(shared);
    let log = lua.create_function(move |_, args: MultiValue| {
        let line = log_line(&args);
        let mut c = s.lock();
        tracing::info!(target: "capy::handlers", app = %c.app, key = %c.key_str, "{line}");
        if c.logs.len() < c.limits.max_log_lines {
            c.logs.push(line);
        } else {
            c.logs_dropped += 1;
        }
        Ok(())
    })?;
    sys.raw_set("log", log.clone())?;
    rt.raw_set("log", log)?;
    rt.raw_set("sys", sys)?;
    rt.raw_set("null", LuaValue::NULL)?;

    // read_local(key) -> true, value, holders | false, "app/name"
    let (s, mt) = (Arc::clone(shared), array_mt.clone());
    rt.raw_set(
        "read_local",
        lua.create_function(move |lua, key: LuaValue| {
            let key = scoped_key(&s, "read", &key)?;
            let mut c = s.lock();
            if c.key.as_ref() == Some(&key) {
                let value = match &c.data {
                    Some(v) => convert::to_lua(lua, v, &mt)?,
                    None => LuaValue::Nil,
                };
                let holders = node_list(lua, c.holders.clone())?;
                return Ok((true, value, LuaValue::Table(holders)));
            }
            if c.host.is_none() {
                return Err(bad_arg("read", "only available inside a callback"));
            }
            if c.reads >= c.limits.max_reads {
                let max = c.limits.max_reads;
                drop(c);
                return Err(s.abort(HandlerError::TooManyReads(max)));
            }
            c.reads += 1;
            let k = lua.create_string(key.to_string())?;
            Ok((false, LuaValue::String(k), LuaValue::Nil))
        })?,
    )?;

    // aborting(err): true when the error must end the call.
    let s = Arc::clone(shared);
    rt.raw_set(
        "aborting",
        lua.create_function(move |_, err: LuaValue| {
            if s.is_aborted() {
                return Ok(true);
            }
            let out_of_memory = match &err {
                LuaValue::String(m) => m.as_bytes().as_ref() == b"not enough memory",
                LuaValue::Error(e) => is_memory_error(e),
                _ => false,
            };
            if out_of_memory {
                let limit = s.lock().limits.memory_bytes;
                s.abort(HandlerError::Memory(limit));
            }
            Ok(out_of_memory)
        })?,
    )?;

    // string.rep, charged by the bytes it makes and refused past the memory
    // limit before any byte is copied.
    let string: Table = lua.globals().raw_get("string")?;
    let raw_rep: Function = string.raw_get("rep")?;
    let s = Arc::clone(shared);
    rt.raw_set(
        "rep",
        lua.create_function(
            move |_, (st, n, sep): (mlua::String, i64, Option<mlua::String>)| {
                let n = n.max(0) as u128;
                let sep_len = sep.as_ref().map(|x| x.as_bytes().len()).unwrap_or(0) as u128;
                let total = (st.as_bytes().len() as u128) * n + sep_len * n.saturating_sub(1);
                let limit = s.lock().limits.memory_bytes;
                if total > limit as u128 {
                    return Err(s.abort(HandlerError::Memory(limit)));
                }
                s.charge((total as u64) / REP_BYTES_PER_INSTRUCTION)?;
                raw_rep.call::<LuaValue>((st, n as i64, sep))
            },
        )?,
    )?;
    Ok(rt)
}

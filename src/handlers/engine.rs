//! One app's handler: a sandboxed Lua state built from the app's source,
//! and the driver that runs a callback in it, suspending on remote reads.

use super::convert;
use super::host::SysHost;
use super::policies::policy_source;
use super::sandbox::Sandbox;
use super::{AppKey, CallCtx, Event, EventKind, HandlerError, HandlerSource, Limits, Outcome};
use crate::id::Micros;
use mlua::{Function, MultiValue, Table, ThreadStatus, Value as LuaValue};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One app's handler state. Calls take `&mut self`: an app's callbacks run
/// one at a time (a call waiting on a remote read holds the app), which
/// keeps per-call budgets and effects apart without locking inside Lua.
///
/// After a failed call the Lua state stays in use: the failed coroutine is
/// dropped, the key's policy state is rolled back to its last checkpoint
/// and garbage is collected, so the next call starts clean. Handler code
/// outside `state` (other globals) is a per-node cache and is not rolled
/// back.
pub struct AppRuntime {
    app: String,
    limits: Limits,
    sb: Sandbox,
    /// key ("app/name") -> live policy state table.
    states: Table,
    /// key -> last checkpoint of its policy state, and when (host time;
    /// `None` when restored from elsewhere).
    checkpoints: HashMap<String, (Option<Micros>, serde_json::Value)>,
    defined: [bool; 4],
    /// The coroutine of the last successful call, reused by the next one.
    spare: Option<mlua::Thread>,
    /// The key of a call that has started and not finished: if the caller
    /// dropped that call's future (while it waited on a read), the next
    /// call rolls the key back first.
    in_flight: Option<String>,
}

/// What one run of a function in the sandbox ended with.
struct Run {
    values: MultiValue,
}

impl AppRuntime {
    /// Builds the app's state: sandbox first, then the handler's top-level
    /// code, under the same budgets as a call.
    pub fn new(
        app: &str,
        source: &HandlerSource,
        limits: Limits,
    ) -> Result<AppRuntime, HandlerError> {
        let (name, code) = match source {
            HandlerSource::Policy(p) => (
                format!("policy:{p}"),
                policy_source(p)
                    .ok_or_else(|| HandlerError::UnknownPolicy(p.clone()))?
                    .to_string(),
            ),
            HandlerSource::Lua { name, code } => (name.clone(), code.clone()),
        };
        Self::from_code(app, &name, &code, limits)
    }

    fn from_code(
        app: &str,
        name: &str,
        code: &str,
        limits: Limits,
    ) -> Result<AppRuntime, HandlerError> {
        if app.is_empty() || app.contains('/') || app.len() > super::MAX_KEY_BYTES {
            return Err(HandlerError::Load(format!(
                "app name {app:?} must be non-empty, without '/'"
            )));
        }
        if code.len() > super::MAX_SOURCE_BYTES {
            return Err(HandlerError::Load(format!(
                "{name}: {} bytes of source is more than {}",
                code.len(),
                super::MAX_SOURCE_BYTES
            )));
        }
        let sb = Sandbox::new(app, &limits)?;
        let f = sb
            .lua
            .load(code)
            .set_name(format!("={name}"))
            .set_mode(mlua::ChunkMode::Text)
            .into_function()
            .map_err(|e| HandlerError::Load(lua_message(&e)))?;
        let states = sb
            .lua
            .create_table()
            .map_err(|e| HandlerError::Load(e.to_string()))?;
        let mut rt = AppRuntime {
            app: app.to_string(),
            limits,
            sb,
            states,
            checkpoints: HashMap::new(),
            defined: [false; 4],
            spare: None,
            in_flight: None,
        };
        let mut spent = Duration::ZERO;
        if let Err(e) = rt.run_sync(f, MultiValue::new(), &mut spent) {
            return Err(HandlerError::Load(e.to_string()));
        }
        let g = rt.sb.lua.globals();
        for (i, k) in EventKind::ALL.iter().enumerate() {
            rt.defined[i] = matches!(
                g.raw_get::<LuaValue>(k.callback()),
                Ok(LuaValue::Function(_))
            );
        }
        rt.gc();
        Ok(rt)
    }

    pub fn app(&self) -> &str {
        &self.app
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether the handler defines the callback for `kind` (as loaded).
    pub fn defines(&self, kind: EventKind) -> bool {
        self.defined[kind as usize]
    }

    #[cfg(test)]
    pub(super) fn lua(&self) -> &mlua::Lua {
        &self.sb.lua
    }

    /// Bytes the app's Lua state holds now.
    pub fn memory_used(&self) -> usize {
        self.sb.lua.used_memory()
    }

    /// Full garbage collection; what an idle app is then measured at.
    pub fn gc(&self) {
        let _ = self.sb.lua.gc_collect();
        let _ = self.sb.lua.gc_collect();
    }

    /// Whether this node holds live policy state for `key`.
    pub fn has_state(&self, key: &AppKey) -> bool {
        let k = key.to_string();
        self.checkpoints.contains_key(&k)
            || matches!(self.states.raw_get::<LuaValue>(k), Ok(LuaValue::Table(_)))
    }

    /// Continues a policy from a checkpoint another root produced.
    pub fn restore_state(
        &mut self,
        key: &AppKey,
        state: serde_json::Value,
    ) -> Result<(), HandlerError> {
        self.check_app(key)?;
        let k = key.to_string();
        let t = convert::to_lua(&self.sb.lua, &state, &self.sb.array_mt)
            .map_err(|e| HandlerError::Value(format!("policy state: {e}")))?;
        if !t.is_table() {
            return Err(HandlerError::Value(
                "policy state must be a JSON object".into(),
            ));
        }
        self.states
            .raw_set(k.as_str(), t)
            .map_err(|e| HandlerError::Value(e.to_string()))?;
        self.checkpoints.insert(k, (None, state));
        Ok(())
    }

    /// The key's live policy state as JSON (for a hand-off or shutdown).
    pub fn export_state(&self, key: &AppKey) -> Result<Option<serde_json::Value>, HandlerError> {
        match self.states.raw_get::<LuaValue>(key.to_string()) {
            Ok(v @ LuaValue::Table(_)) => {
                convert::from_lua(&v, self.limits.max_value_bytes, &self.sb.array_mt)
                    .map_err(|e| HandlerError::Value(format!("policy state: {e}")))
            }
            _ => Ok(None),
        }
    }

    /// Drops everything held for `key` (this vnode is no longer its root).
    pub fn forget(&mut self, key: &AppKey) {
        let k = key.to_string();
        let _ = self.states.raw_set(k.as_str(), LuaValue::Nil);
        self.checkpoints.remove(&k);
    }

    fn check_app(&self, key: &AppKey) -> Result<(), HandlerError> {
        if key.app != self.app {
            return Err(HandlerError::Forbidden(format!(
                "the handler of app {:?} was called for key {key} of another app",
                self.app
            )));
        }
        Ok(())
    }

    /// Runs the event's callback. On `Ok` the caller applies
    /// `Outcome::effects` and uses `Outcome::result`; on `Err` it applies
    /// nothing and reports the error: the stored data stays as it was.
    pub async fn call(
        &mut self,
        event: Event,
        ctx: CallCtx,
        host: Arc<dyn SysHost>,
    ) -> Result<Outcome, HandlerError> {
        self.check_app(&ctx.key)?;
        if let Some(abandoned) = self.in_flight.take() {
            tracing::warn!(target: "capy::handlers", app = %self.app, key = %abandoned,
                "a call was dropped before it finished; its policy state is rolled back");
            self.rollback(&abandoned);
        }
        let kind = event.kind();
        let g = self.sb.lua.globals();
        let cb = match g.raw_get::<LuaValue>(kind.callback()) {
            Ok(LuaValue::Function(f)) => f,
            _ => return Ok(default_outcome(event, ctx)),
        };
        let key_str = ctx.key.to_string();
        self.in_flight = Some(key_str.clone());
        let res = self.call_inner(&event, ctx, host, cb, &key_str).await;
        self.in_flight = None;
        {
            let mut c = self.sb.shared.lock();
            c.host = None;
            c.data = None;
        }
        match res {
            Ok(o) => Ok(o),
            Err(e) => {
                self.rollback(&key_str);
                tracing::warn!(target: "capy::handlers", app = %self.app, key = %key_str,
                    event = kind.name(), "call failed: {e}");
                Err(e)
            }
        }
    }

    async fn call_inner(
        &mut self,
        event: &Event,
        ctx: CallCtx,
        host: Arc<dyn SysHost>,
        cb: Function,
        key_str: &str,
    ) -> Result<Outcome, HandlerError> {
        let lua = self.sb.lua.clone();
        let lua_err = |e: mlua::Error| HandlerError::Lua(lua_message(&e));
        let state = self.state_for(key_str)?;
        lua.globals().raw_set("state", state).map_err(lua_err)?;
        let mt = &self.sb.array_mt;
        let mut args = MultiValue::new();
        let caller = LuaValue::String(lua.create_string(&ctx.caller).map_err(lua_err)?);
        let json = |v: &serde_json::Value| {
            convert::to_lua(&lua, v, mt).map_err(|e| HandlerError::Value(e.to_string()))
        };
        match event {
            Event::Create => {
                args.push_back(caller);
                args.push_back(match &ctx.data {
                    Some(d) => json(d)?,
                    None => LuaValue::Nil,
                });
            }
            Event::Read { args: a } => {
                args.push_back(caller);
                args.push_back(json(a)?);
            }
            Event::Update { new_data } => {
                args.push_back(caller);
                args.push_back(json(new_data)?);
            }
            Event::Timer => {}
        }
        {
            let mut c = self.sb.shared.lock();
            c.host = Some(Arc::clone(&host));
            c.key = Some(ctx.key.clone());
            c.key_str = key_str.to_string();
            c.data = ctx.data;
            c.holders = ctx.holders;
            c.effects.clear();
            c.logs.clear();
            c.logs_dropped = 0;
            c.reads = 0;
            c.abort = None;
        }
        let mut spent = Duration::ZERO;
        let run = self.run(cb, args, &host, &mut spent).await?;
        let result = convert::from_lua(
            run.values.get(1).unwrap_or(&LuaValue::Nil),
            self.limits.max_value_bytes,
            &self.sb.array_mt,
        )
        .map_err(|e| HandlerError::Value(format!("{} result: {e}", event.kind().callback())))?;
        // whatever `state` now refers to is the key's state from here on
        let st = lua
            .globals()
            .raw_get::<LuaValue>("state")
            .map_err(lua_err)?;
        if !st.is_table() {
            return Err(HandlerError::Lua(
                "the global `state` must stay a table".into(),
            ));
        }
        self.states.raw_set(key_str, st).map_err(lua_err)?;
        let mut out = Outcome {
            result,
            ran: true,
            instructions: self.sb.shared.used(),
            ..Outcome::default()
        };
        {
            let mut c = self.sb.shared.lock();
            out.effects = std::mem::take(&mut c.effects);
            out.logs = std::mem::take(&mut c.logs);
            if c.logs_dropped > 0 {
                out.logs
                    .push(format!("({} more log lines dropped)", c.logs_dropped));
            }
        }
        if event.kind() == EventKind::Timer {
            let now = host.now();
            let every = self.limits.checkpoint_every.as_micros() as u64;
            let due = match self.checkpoints.get(key_str) {
                Some((Some(at), _)) => now.saturating_sub(*at) >= every,
                _ => true,
            };
            if due {
                let snap = self
                    .export_state(&ctx.key)?
                    .unwrap_or_else(|| serde_json::json!({}));
                self.checkpoints
                    .insert(key_str.to_string(), (Some(now), snap.clone()));
                out.state = Some(snap);
            }
        }
        Ok(out)
    }

    /// The key's live state table, made from its checkpoint (or empty) when
    /// this node has none yet.
    fn state_for(&self, key_str: &str) -> Result<Table, HandlerError> {
        let lua_err = |e: mlua::Error| HandlerError::Lua(e.to_string());
        if let Ok(LuaValue::Table(t)) = self.states.raw_get::<LuaValue>(key_str) {
            return Ok(t);
        }
        let t = match self.checkpoints.get(key_str) {
            Some((_, j)) => match convert::to_lua(&self.sb.lua, j, &self.sb.array_mt) {
                Ok(LuaValue::Table(t)) => t,
                _ => self.sb.lua.create_table().map_err(lua_err)?,
            },
            None => self.sb.lua.create_table().map_err(lua_err)?,
        };
        self.states.raw_set(key_str, &t).map_err(lua_err)?;
        Ok(t)
    }

    fn rollback(&mut self, key_str: &str) {
        let _ = self.states.raw_set(key_str, LuaValue::Nil);
        let _ = self.sb.lua.globals().raw_set("state", LuaValue::Nil);
        self.gc();
    }

    /// Runs top-level code: no host, so no reads (and no `sys` facts).
    fn run_sync(
        &mut self,
        f: Function,
        args: MultiValue,
        spent: &mut Duration,
    ) -> Result<Run, HandlerError> {
        {
            let mut c = self.sb.shared.lock();
            c.host = None;
            c.key = None;
            c.key_str.clear();
            c.abort = None;
            c.effects.clear();
            c.logs.clear();
        }
        let th = self.start()?;
        let mut args = args;
        args.push_front(LuaValue::Function(f));
        match self.step(&th, args, spent)? {
            Step::Done(run) => {
                self.spare = Some(th);
                Ok(run)
            }
            Step::Read(_) => Err(HandlerError::Lua(
                "sys.read is only available inside callbacks".into(),
            )),
        }
    }

    /// Runs `f(args)` in a fresh budgeted coroutine, awaiting reads.
    async fn run(
        &mut self,
        f: Function,
        args: MultiValue,
        host: &Arc<dyn SysHost>,
        spent: &mut Duration,
    ) -> Result<Run, HandlerError> {
        let th = self.start()?;
        let mut args = args;
        args.push_front(LuaValue::Function(f));
        let mut next = self.step(&th, args, spent)?;
        loop {
            match next {
                Step::Done(run) => {
                    self.spare = Some(th);
                    return Ok(run);
                }
                Step::Read(key) => {
                    let answer = match AppKey::parse(&self.app, &key) {
                        Ok(k) => host.read(&k).await,
                        Err(e) => Err(e.to_string()),
                    };
                    let lua = &self.sb.lua;
                    let mt = &self.sb.array_mt;
                    let conv = |e: mlua::Error| HandlerError::Value(format!("read {key}: {e}"));
                    let mut back = MultiValue::new();
                    match answer {
                        Ok(r) => {
                            back.push_back(match &r.value {
                                Some(v) => convert::to_lua(lua, v, mt).map_err(conv)?,
                                None => LuaValue::Nil,
                            });
                            let t = lua.create_table().map_err(conv)?;
                            for (i, h) in r.holders.iter().take(super::MAX_NODES).enumerate() {
                                t.raw_set(i + 1, h.to_string()).map_err(conv)?;
                            }
                            back.push_back(LuaValue::Table(t));
                        }
                        Err(msg) => {
                            back.push_back(LuaValue::Nil);
                            back.push_back(LuaValue::Table(lua.create_table().map_err(conv)?));
                            back.push_back(LuaValue::String(
                                lua.create_string(&msg).map_err(conv)?,
                            ));
                        }
                    }
                    next = self.step(&th, back, spent)?;
                }
            }
        }
    }

    fn start(&mut self) -> Result<mlua::Thread, HandlerError> {
        // only a coroutine that finished cleanly is reused: resetting one
        // that failed would run its pending __close handlers unmetered
        let reused = self.spare.take().filter(|t| {
            t.status() == ThreadStatus::Finished && t.reset(self.sb.runner.clone()).is_ok()
        });
        let th = match reused {
            Some(t) => t,
            None => self
                .sb
                .lua
                .create_thread(self.sb.runner.clone())
                .map_err(|e| self.map_error(e))?,
        };
        let (triggers, hook) = self.sb.shared.hook(self.limits.hook_interval);
        th.set_hook(triggers, hook);
        self.sb.shared.start(self.limits.instructions);
        Ok(th)
    }

    /// Resumes the call's coroutine once, metering the time it runs.
    fn step(
        &mut self,
        th: &mlua::Thread,
        args: MultiValue,
        spent: &mut Duration,
    ) -> Result<Step, HandlerError> {
        let left = self.limits.wall.saturating_sub(*spent);
        self.sb.shared.arm_clock(left);
        let t0 = Instant::now();
        let res = th.resume::<MultiValue>(args);
        *spent += t0.elapsed();
        if let Some(e) = self.sb.shared.lock().abort.take() {
            return Err(e);
        }
        let values = res.map_err(|e| self.map_error(e))?;
        match th.status() {
            ThreadStatus::Resumable => {
                // the only yield a handler can reach is sys.read's
                let is_read = matches!(values.front(), Some(LuaValue::Table(t)) if t.to_pointer() == self.sb.read_token.to_pointer());
                match (is_read, values.get(1)) {
                    (true, Some(LuaValue::String(k))) => Ok(Step::Read(k.to_string_lossy())),
                    _ => Err(HandlerError::Lua("handler yielded outside sys.read".into())),
                }
            }
            _ => match values.front() {
                Some(LuaValue::Boolean(true)) => Ok(Step::Done(Run { values })),
                _ => Err(self.error_value(values.get(1))),
            },
        }
    }

    fn error_value(&self, v: Option<&LuaValue>) -> HandlerError {
        match v {
            Some(LuaValue::String(s)) => {
                let m = s.to_string_lossy();
                if m == "not enough memory" {
                    HandlerError::Memory(self.limits.memory_bytes)
                } else {
                    HandlerError::Lua(m)
                }
            }
            Some(LuaValue::Error(e)) => self.map_error((**e).clone()),
            Some(other) => {
                HandlerError::Lua(format!("error object is a {} value", other.type_name()))
            }
            None => HandlerError::Lua("handler failed without a message".into()),
        }
    }

    fn map_error(&self, e: mlua::Error) -> HandlerError {
        match e {
            mlua::Error::MemoryError(_) => HandlerError::Memory(self.limits.memory_bytes),
            mlua::Error::CallbackError { cause, .. } => self.map_error((*cause).clone()),
            other => HandlerError::Lua(lua_message(&other)),
        }
    }
}

enum Step {
    Done(Run),
    Read(String),
}

/// What the runtime does for an event the app has no callback for.
fn default_outcome(event: Event, ctx: CallCtx) -> Outcome {
    let result = match event {
        Event::Create | Event::Read { .. } => ctx.data,
        Event::Update { new_data } => Some(new_data),
        Event::Timer => None,
    };
    Outcome {
        result,
        ..Outcome::default()
    }
}

/// An mlua error as a one-line message (the first line of a traceback).
fn lua_message(e: &mlua::Error) -> String {
    let s = match e {
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::CallbackError { cause, .. } => return lua_message(cause),
        other => other.to_string(),
    };
    s.lines().next().unwrap_or("").to_string()
}

//! Lua handlers of object classes, run by the handlers layer's sandbox at
//! the object's root, inside the object's call queue.
//!
//! A class's `handler` (or, if it has none, its nearest ancestor's) may
//! define:
//! - `createCb(caller, state)` on `new`: `state` is the initial state
//!   (defaults and the given fields); returns the state to store.
//! - `readCb(caller, args)` on `get` (the built-in function and
//!   `capy obj get`): `sys.read(sys.key())` is the whole state; returns
//!   what the reader gets as the object's state. Declared fields the
//!   caller may not see are dropped from it, so returning the whole state
//!   leaks no PRIVATE field; other keys (derived values) pass.
//! - `updateCb(caller, state)` on every state change a call makes (the
//!   built-in `update`, a TASK's new state, logged async calls included):
//!   `state` is the new state, `sys.read(sys.key())` the current one;
//!   returns the state to commit.
//!
//! Returning nil keeps the default (the given state, or what `get` shows);
//! `error(...)` refuses the call with the handler's message and the object
//! stays as it was (a TASK's new blob versions are dropped, its output
//! object is not made). A returned state is checked against the class's
//! fields like a TASK's. `caller` is `"client"` or the calling function's
//! `PKG.CLASS`. A handler that overruns its limits fails the call the same
//! way; for a logged async call that failure is final (recorded once), as
//! for any failed function: the wall-clock cap (200 ms by default) is far
//! above what a state-shaping callback needs.
//!
//! These handlers shape an object's state; they act on nothing else. The
//! `sys` effects (`write`, `delete`, `publish`, containers, replicas) and
//! reads of other keys belong to app handlers: an object handler that asks
//! for one fails its call with a clear error. `timerCb` is refused at deploy.
//! The Lua `state` global starts empty on every call: what must last
//! belongs in the object's state (a per-object table would grow with every
//! object the class's root has seen).

use super::apps::handler_status;
use super::objects::Answer;
use super::runtime::Node;
use crate::handlers::{AppKey, AppRuntime, CallCtx, Event};
use crate::objects::package::{load_handler as load, runtime_name};
use crate::objects::{Caller, Class, Level};
use hyper::StatusCode;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The loaded handlers of this node's object classes, by `PKG.CLASS`.
#[derive(Default)]
pub struct ClassHandlers {
    slots: Mutex<HashMap<String, Arc<ClassSlot>>>,
}

struct ClassSlot {
    source: String,
    rt: Arc<smol::lock::Mutex<AppRuntime>>,
}

fn caller_name(c: &Caller) -> String {
    match c {
        Caller::External => "client".into(),
        Caller::Function { pkg, class } => runtime_name(pkg, class),
    }
}

impl Node {
    async fn class_slot(
        &self,
        pkg: &str,
        c: &Class,
        source: &str,
    ) -> Result<Arc<ClassSlot>, Answer> {
        let name = runtime_name(pkg, &c.name);
        let cached = self
            .objects
            .handlers
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .cloned();
        if let Some(s) = cached.filter(|s| s.source == source) {
            return Ok(s);
        }
        let (p, k, src) = (pkg.to_string(), c.name.clone(), source.to_string());
        let rt = smol::unblock(move || load(&p, &k, &src))
            .await
            .map_err(|e| {
                Answer::err(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("class {name}: {e}"),
                )
            })?;
        let slot = Arc::new(ClassSlot {
            source: source.to_string(),
            rt: Arc::new(smol::lock::Mutex::new(rt)),
        });
        let mut slots = self
            .objects
            .handlers
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Bounded: at most 1,024 loaded handlers, all dropped when full.
        if slots.len() >= 1024 {
            slots.clear();
        }
        slots.insert(name, slot.clone());
        Ok(slot)
    }

    /// Runs the class's callback for `event` on object `id`, whose current
    /// state is `data`. `Ok(None)`: the class has no handler or no such
    /// callback, or it returned nil.
    async fn class_handler(
        self: &Arc<Self>,
        pkg: &str,
        c: &Class,
        id: &str,
        caller: &Caller,
        data: &Map<String, Value>,
        event: Event,
    ) -> Result<Option<Value>, Answer> {
        let Some(source) = &c.handler else {
            return Ok(None);
        };
        let slot = self.class_slot(pkg, c, source).await?;
        let kind = event.kind();
        let mut rt = slot.rt.lock_arc().await;
        if !rt.defines(kind) {
            return Ok(None);
        }
        let name = runtime_name(pkg, &c.name);
        // sys.node_id() is the object's root vnode.
        let ring = super::objects::ring(id);
        let vnode = self
            .root_vnode(ring)
            .or_else(|| self.identity_vnodes.first().copied())
            .unwrap_or(ring);
        let key = AppKey::new(name.clone(), id);
        let ctx = CallCtx {
            key: key.clone(),
            caller: caller_name(caller),
            data: Some(Value::Object(data.clone())),
            holders: Vec::new(),
        };
        let refused_read = Arc::new(AtomicBool::new(false));
        let host = self.object_host(vnode, refused_read.clone());
        let t0 = Instant::now();
        let res = smol::unblock(move || {
            let out = futures_lite::future::block_on(rt.call(event, ctx, host));
            // No per-object Lua state outlives the call (see the module doc).
            rt.forget(&key);
            drop(rt);
            out
        })
        .await;
        let counters = self.apps.counters(&name);
        counters.calls.fetch_add(1, Relaxed);
        counters.events.inc(kind.name());
        counters.latency.record_us(t0.elapsed().as_micros() as u64);
        let out = match res {
            Ok(o) => o,
            Err(e) => {
                return Err(self.refused(
                    &name,
                    id,
                    handler_status(&e),
                    format!(
                        "{} of class {name}: {e}; the object is unchanged",
                        kind.callback()
                    ),
                ))
            }
        };
        for l in &out.logs {
            tracing::info!(class = %name, object = %id, "handler: {l}");
        }
        if refused_read.load(Relaxed) {
            return Err(self.refused(
                &name,
                id,
                422,
                format!(
                    "{} of class {name} read another key: an object's handler reads only its own \
                     object, sys.read(sys.key()); the object is unchanged",
                    kind.callback()
                ),
            ));
        }
        if let Some(e) = out.effects.first() {
            return Err(self.refused(
                &name,
                id,
                422,
                format!(
                    "{} of class {name} asked for sys.{}: object handlers only shape their \
                     object's state (sys effects are for app handlers); the object is unchanged",
                    kind.callback(),
                    e.name()
                ),
            ));
        }
        Ok(out.result)
    }

    /// A failed handler call: counted, logged, answered.
    fn refused(&self, class: &str, id: &str, status: u16, msg: String) -> Answer {
        self.apps.counters(class).errors.fetch_add(1, Relaxed);
        tracing::warn!(class = %class, object = %id, "{msg}");
        Answer::err(
            StatusCode::from_u16(status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
            msg,
        )
    }

    /// `createCb` (no `old` state) or `updateCb`: the state to store
    /// instead of `new`.
    pub(super) async fn class_state_hook(
        self: &Arc<Self>,
        pkg: &str,
        c: &Class,
        id: &str,
        caller: &Caller,
        old: Option<&Map<String, Value>>,
        new: Map<String, Value>,
    ) -> Result<Map<String, Value>, Answer> {
        if c.handler.is_none() {
            return Ok(new);
        }
        let (event, data) = match old {
            None => (Event::Create, &new),
            Some(old) => (
                Event::Update {
                    new_data: Value::Object(new.clone()),
                },
                old,
            ),
        };
        let cb = event.kind().callback();
        match self.class_handler(pkg, c, id, caller, data, event).await? {
            None => Ok(new),
            Some(v) => c.check_state(&v).map_err(|r| {
                self.refused(
                    &runtime_name(pkg, &c.name),
                    id,
                    422,
                    format!("{cb} of class {pkg}.{} returned a state the class refuses: {r}; the object is unchanged", c.name),
                )
            }),
        }
    }

    /// `readCb`: what a reader at `level` gets as the object's state, if
    /// the handler says (fields `level` may not see are dropped).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn class_read_hook(
        self: &Arc<Self>,
        pkg: &str,
        c: &Class,
        id: &str,
        caller: &Caller,
        level: Level,
        state: &Map<String, Value>,
        args: Value,
    ) -> Result<Option<Value>, Answer> {
        if c.handler.is_none() {
            return Ok(None);
        }
        let out = self
            .class_handler(pkg, c, id, caller, state, Event::Read { args })
            .await?;
        Ok(out.map(|v| match v {
            Value::Object(m) => Value::Object(
                m.into_iter()
                    .filter(|(k, _)| c.fields.get(k).is_none_or(|f| level.admits(f.access)))
                    .collect(),
            ),
            other => other,
        }))
    }
}

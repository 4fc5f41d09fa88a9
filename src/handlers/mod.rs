//! Handlers: per-app Lua (mlua, sandboxed) run on create/read/update/timer
//! events, with the `sys` API and the shipped policies.
//!
//! Owns the sandbox (which parts of Lua a handler may use, and its
//! instruction, memory and wall-clock budgets), the `sys` boundary
//! ([`SysHost`], implemented by the node runtime and the simulator), the
//! policies embedded in the binary, `capy handler run` and `capy bench
//! handlers`. Calls only `id`: it never touches the store or the network
//! itself. Reads go through [`SysHost`]; writes come back as [`Effect`]s that
//! the caller applies only when the call succeeded, so a callback's writes
//! take effect together with its result or not at all.
//!
//! Where policy state lives: each app's Lua state keeps a table per key,
//! reachable as the global `state` during a call on that key. It is
//! checkpointed as JSON by successful `timerCb` calls, at most once per
//! [`Limits::checkpoint_every`] ([`Outcome::state`]); the runtime stores that
//! checkpoint with the key so a new root resumes the policy from it
//! ([`AppRuntime::restore_state`]). A failed call rolls the key's table back
//! to the last checkpoint.
//!
//! How the node runtime uses it: one [`AppRuntime`] per app on each node
//! (built from the app's policy name or Lua source), kept behind an async
//! mutex since calls take `&mut self`. For each event on a key it is root
//! of, it calls [`AppRuntime::call`] with a [`CallCtx`] and its [`SysHost`];
//! on `Ok` it applies [`Outcome::effects`] with the result and stores
//! [`Outcome::state`] when present; on `Err` it answers the caller with the
//! error and changes nothing. It fires [`Event::Timer`] per key every
//! timer interval ([`DEFAULT_TIMER_INTERVAL`] unless the app says
//! otherwise), and on becoming a key's root calls
//! [`AppRuntime::restore_state`] with the stored checkpoint.

mod charged;
mod convert;
mod engine;
mod host;
mod pattern;
mod policies;
mod sandbox;
mod tool;

#[cfg(test)]
mod tests;

pub use engine::AppRuntime;
pub use host::{MemHost, ReadFuture, ReadResult, SysHost};
pub use policies::{policy_source, POLICIES};
pub use tool::{bench_handlers, handler_run_cmd};

use crate::id::NodeId;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// How often the runtime fires `timerCb` when the app does not say.
pub const DEFAULT_TIMER_INTERVAL: Duration = Duration::from_secs(60);

/// Largest handler source accepted.
pub const MAX_SOURCE_BYTES: usize = 1 << 20;

/// Longest key (app and name together) a handler may name.
pub const MAX_KEY_BYTES: usize = 1024;

/// Most leaf-set or neighbour entries a handler may ask for at once.
pub const MAX_NODES: usize = 32;

/// What a handler may spend. Per app; the defaults are the issue's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Lua VM instructions per call (counted in steps of the hook interval).
    pub instructions: u64,
    /// Bytes the app's whole Lua state may hold.
    pub memory_bytes: usize,
    /// Time one call may keep the executor busy running Lua. Time spent
    /// waiting for a remote read is not counted: it does not block anyone.
    pub wall: Duration,
    /// Largest JSON value crossing the boundary either way.
    pub max_value_bytes: usize,
    /// Most effects one call may produce.
    pub max_effects: usize,
    /// Most remote reads one call may make.
    pub max_reads: usize,
    /// Most `sys.log` lines one call keeps (later lines are counted, not kept).
    pub max_log_lines: usize,
    /// VM instructions between two budget and clock checks. Hooks cannot
    /// interrupt a single instruction, and one instruction (a concatenation,
    /// a C library call) may copy up to `memory_bytes`, so the wall-clock cap
    /// can be overshot by about this many such instructions; smaller values
    /// check more often at some cost per call.
    pub hook_interval: u32,
    /// Least host time between two checkpoints of a key's policy state
    /// ([`Outcome::state`]): each is a store write, and a failed call rolls
    /// back to the last one.
    pub checkpoint_every: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            instructions: 1_000_000,
            memory_bytes: 16 << 20,
            wall: Duration::from_millis(200),
            max_value_bytes: 1 << 20,
            max_effects: 256,
            max_reads: 32,
            max_log_lines: 64,
            hook_interval: sandbox::DEFAULT_HOOK_INTERVAL,
            checkpoint_every: Duration::from_secs(600),
        }
    }
}

/// Where an app's handler code comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerSource {
    /// A policy shipped in the binary, by name (see [`POLICIES`]).
    Policy(String),
    /// Lua source; `name` shows up in error messages.
    Lua { name: String, code: String },
}

/// A key as handlers see it: a name inside an app's namespace. In Lua it is
/// the string `"app/name"`; a string without `/` names a key of the
/// handler's own app.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AppKey {
    pub app: String,
    pub name: String,
}

impl AppKey {
    pub fn new(app: impl Into<String>, name: impl Into<String>) -> AppKey {
        AppKey {
            app: app.into(),
            name: name.into(),
        }
    }

    /// Parses a key written by a handler of `own_app`. Refuses empty parts
    /// and over-long keys, but not other apps: scope is checked by the caller
    /// so the error can say who tried what.
    pub fn parse(own_app: &str, s: &str) -> Result<AppKey, HandlerError> {
        if s.len() > MAX_KEY_BYTES {
            return Err(HandlerError::Value(format!(
                "key of {} bytes is longer than {MAX_KEY_BYTES}",
                s.len()
            )));
        }
        let (app, name) = match s.split_once('/') {
            Some((app, name)) => (app, name),
            None => (own_app, s),
        };
        if app.is_empty() || name.is_empty() {
            return Err(HandlerError::Value(format!(
                "key {s:?} must be \"name\" or \"app/name\""
            )));
        }
        Ok(AppKey::new(app, name))
    }

    /// The key's position on the ring.
    pub fn ring_id(&self) -> NodeId {
        NodeId::for_key(&self.app, &self.name)
    }
}

impl fmt::Display for AppKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.app, self.name)
    }
}

/// Which callback an event runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Create,
    Read,
    Update,
    Timer,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [
        EventKind::Create,
        EventKind::Read,
        EventKind::Update,
        EventKind::Timer,
    ];

    /// The Lua global the callback is looked up under.
    pub fn callback(self) -> &'static str {
        match self {
            EventKind::Create => "createCb",
            EventKind::Read => "readCb",
            EventKind::Update => "updateCb",
            EventKind::Timer => "timerCb",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Create => "create",
            EventKind::Read => "read",
            EventKind::Update => "update",
            EventKind::Timer => "timer",
        }
    }
}

impl std::str::FromStr for EventKind {
    type Err = HandlerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                HandlerError::Value(format!(
                    "unknown event {s:?}: expected create, read, update or timer"
                ))
            })
    }
}

/// One event for a key's handler.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// First creation of the key's data: `createCb(caller, proposed)`, where
    /// `proposed` is [`CallCtx::data`]. Returns the data to store, or nil.
    Create,
    /// `readCb(caller, args)`: returns what the reader gets.
    Read { args: serde_json::Value },
    /// `updateCb(caller, new_data)`: returns the data to store.
    Update { new_data: serde_json::Value },
    /// `timerCb()`, periodically on the key's root.
    Timer,
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Create => EventKind::Create,
            Event::Read { .. } => EventKind::Read,
            Event::Update { .. } => EventKind::Update,
            Event::Timer => EventKind::Timer,
        }
    }
}

/// What the runtime knows about the call besides the event itself.
#[derive(Debug, Clone, PartialEq)]
pub struct CallCtx {
    /// The key the event is about; `sys.key()`.
    pub key: AppKey,
    /// Who caused the event (a node id or a client name); empty for timers.
    pub caller: String,
    /// The key's stored data as the root has it (for `Create`: the data the
    /// client proposes). `sys.read(sys.key())` returns it without a round
    /// trip.
    pub data: Option<serde_json::Value>,
    /// The nodes holding copies of the key, returned with `data`.
    pub holders: Vec<NodeId>,
}

impl CallCtx {
    pub fn new(key: AppKey, caller: impl Into<String>) -> CallCtx {
        CallCtx {
            key,
            caller: caller.into(),
            data: None,
            holders: Vec::new(),
        }
    }

    pub fn with_data(mut self, data: Option<serde_json::Value>) -> CallCtx {
        self.data = data;
        self
    }
}

/// A change a callback asks for. The runtime applies a call's effects, in
/// order, only when the call returned `Ok`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Store `value` under `key`: on `node` when given, else on the key's
    /// replica set.
    Write {
        node: Option<NodeId>,
        key: AppKey,
        value: serde_json::Value,
    },
    Delete {
        key: AppKey,
    },
    /// Start (pre-warm) the function container stored under `key`.
    DeployContainer {
        key: AppKey,
    },
    /// Stop the function container stored under `key`.
    DeleteContainer {
        key: AppKey,
    },
    /// Multicast `value` to the subscribers of `key` (the runtime's tree).
    Publish {
        key: AppKey,
        value: serde_json::Value,
    },
    /// Attach `subscriber` to the multicast tree of `key`.
    Subscribe {
        key: AppKey,
        subscriber: String,
    },
    Unsubscribe {
        key: AppKey,
        subscriber: String,
    },
    /// Keep `n` copies of `key` (root included).
    SetReplicas {
        key: AppKey,
        n: u32,
    },
}

impl Effect {
    /// The `sys` function that asks for it (without `sys.`).
    pub fn name(&self) -> &'static str {
        match self {
            Effect::Write { .. } => "write",
            Effect::Delete { .. } => "delete",
            Effect::DeployContainer { .. } => "deploy_container",
            Effect::DeleteContainer { .. } => "delete_container",
            Effect::Publish { .. } => "publish",
            Effect::Subscribe { .. } => "subscribe",
            Effect::Unsubscribe { .. } => "unsubscribe",
            Effect::SetReplicas { .. } => "set_replicas",
        }
    }
}

/// What a successful call produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// The callback's return value: the data to store (create, update) or
    /// what the reader gets (read). `None` is Lua's nil: nothing to store.
    /// When the app defines no callback for the event the runtime's default
    /// is filled in: the proposed/stored data for create and read, the new
    /// data for update, nothing for timer.
    pub result: Option<serde_json::Value>,
    /// Changes to apply, in order.
    pub effects: Vec<Effect>,
    /// `sys.log`/`print` lines of this call (also emitted through tracing).
    pub logs: Vec<String>,
    /// After a successful timer call that took a checkpoint: the key's
    /// policy state as JSON, for the runtime to store with the key (see the
    /// module docs).
    pub state: Option<serde_json::Value>,
    /// Whether the app defines a callback for the event.
    pub ran: bool,
    /// VM instructions the call used (in hook-interval steps).
    pub instructions: u64,
}

/// Why a call (or loading a handler) failed. The message is meant for the
/// caller of the operation that triggered the handler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    #[error("handler failed to load: {0}")]
    Load(String),
    #[error("handler error: {0}")]
    Lua(String),
    #[error("handler stopped: it used more than its budget of {0} instructions")]
    Instructions(u64),
    #[error("handler stopped: it ran longer than its wall-clock cap of {0:?}")]
    WallClock(Duration),
    #[error("handler stopped: it needed more than its memory limit of {0} bytes")]
    Memory(usize),
    #[error("handler refused: {0}")]
    Forbidden(String),
    #[error("handler value rejected: {0}")]
    Value(String),
    #[error("handler stopped: more than {0} effects in one call")]
    TooManyEffects(usize),
    #[error("handler stopped: more than {0} remote reads in one call")]
    TooManyReads(usize),
    #[error("no shipped policy named {0:?} (known: adaptive-keepalive, subscription, smart-replication)")]
    UnknownPolicy(String),
}

//! Tests of the handler engine with an in-memory host.

mod basics;
mod hostile;
mod keepalive_trace;
mod pattern;
mod policies;
mod tool;

use super::*;
use crate::id::NodeId;
use futures_lite::future::block_on;
use std::sync::Arc;

pub(super) const APP: &str = "app";

pub(super) fn host() -> Arc<MemHost> {
    Arc::new(MemHost::with_leaves(NodeId(0xabcd << 100), 8))
}

pub(super) fn lua(code: &str) -> AppRuntime {
    lua_with(code, Limits::default())
}

pub(super) fn lua_with(code: &str, limits: Limits) -> AppRuntime {
    match AppRuntime::new(
        APP,
        &HandlerSource::Lua {
            name: "test".into(),
            code: code.into(),
        },
        limits,
    ) {
        Ok(rt) => rt,
        Err(e) => panic!("handler did not load: {e}"),
    }
}

pub(super) fn key(name: &str) -> AppKey {
    AppKey::new(APP, name)
}

pub(super) fn call(
    rt: &mut AppRuntime,
    event: Event,
    ctx: CallCtx,
    host: &Arc<MemHost>,
) -> Result<Outcome, HandlerError> {
    let h: Arc<dyn SysHost> = host.clone();
    block_on(rt.call(event, ctx, h))
}

pub(super) fn read(
    rt: &mut AppRuntime,
    host: &Arc<MemHost>,
    args: serde_json::Value,
) -> Result<Outcome, HandlerError> {
    call(
        rt,
        Event::Read { args },
        CallCtx::new(key("k"), "client-1"),
        host,
    )
}

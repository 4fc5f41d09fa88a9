//! Handlers: per-app Lua (mlua, sandboxed) run on create/read/update/timer
//! events, with the `sys` API and the shipped policies.

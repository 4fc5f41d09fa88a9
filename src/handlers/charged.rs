//! Library functions whose cost is not one VM instruction. A hook only
//! fires between instructions, so one `table.sort` of a million elements,
//! or a `string.upper` of 16 MB, would otherwise count as a single
//! instruction and could be repeated hundreds of times before the next
//! budget check. Each is wrapped to charge the call's budget in proportion
//! to its work: before the call where the work is known from the arguments
//! (so an unaffordable call is refused before it starts), after it from the
//! size of what it returned.

use super::sandbox::Shared;
use mlua::{Function, Lua, MultiValue, Table, Value as LuaValue};
use std::sync::Arc;

/// Bytes handled per charged instruction.
const BYTES: u64 = 64;

fn int(args: &MultiValue, i: usize) -> Option<i64> {
    match args.get(i) {
        Some(LuaValue::Integer(n)) => Some(*n),
        Some(LuaValue::Number(f)) if f.is_finite() => Some(*f as i64),
        _ => None,
    }
}

fn table_len(args: &MultiValue, i: usize) -> u64 {
    match args.get(i) {
        Some(LuaValue::Table(t)) => t.raw_len() as u64,
        _ => 0,
    }
}

fn str_len(args: &MultiValue, i: usize) -> u64 {
    match args.get(i) {
        Some(LuaValue::String(s)) => s.as_bytes().len() as u64,
        _ => 0,
    }
}

/// Work done before the call, from its arguments.
fn pre_cost(name: &str, a: &MultiValue) -> u64 {
    match name {
        "sort" => {
            let n = table_len(a, 0);
            n * (64 - n.leading_zeros() as u64)
        }
        // elements are visited even when they are empty strings
        "concat" => table_len(a, 0),
        // shifting: O(#t - pos) when a position is given
        "insert" if a.len() >= 3 => {
            let n = table_len(a, 0) as i64;
            (n - int(a, 1).unwrap_or(n)).max(0) as u64 + 1
        }
        "remove" if a.len() >= 2 => {
            let n = table_len(a, 0) as i64;
            (n - int(a, 1).unwrap_or(n)).max(0) as u64 + 1
        }
        "move" => {
            let (f, e) = (int(a, 1).unwrap_or(1), int(a, 2).unwrap_or(0));
            e.saturating_sub(f).saturating_add(1).max(0) as u64
        }
        // scans of the input
        "len" | "offset" | "tonumber" => str_len(a, 0) / BYTES + 1,
        "load" => str_len(a, 0) / 8 + 1,
        _ => 1,
    }
}

/// Work done, from what the call returned.
fn post_cost(out: &MultiValue) -> u64 {
    out.iter()
        .map(|v| match v {
            LuaValue::String(s) => s.as_bytes().len() as u64 / BYTES + 1,
            LuaValue::Table(t) => t.raw_len() as u64 + 1,
            _ => 1,
        })
        .sum()
}

fn wrap(lua: &Lua, shared: &Arc<Shared>, lib: &Table, name: &'static str) -> mlua::Result<()> {
    let orig: Function = match lib.raw_get(name)? {
        LuaValue::Function(f) => f,
        _ => return Ok(()),
    };
    let s = Arc::clone(shared);
    let f = lua.create_function(move |_, args: MultiValue| {
        s.charge(pre_cost(name, &args))?;
        let out: MultiValue = orig.call(args)?;
        s.charge(post_cost(&out))?;
        Ok(out)
    })?;
    lib.raw_set(name, f)
}

/// Wraps the costly functions of the loaded libraries. Runs before the
/// prelude, so the prelude's own locals (`load`) are the charged ones.
pub fn install(lua: &Lua, shared: &Arc<Shared>) -> mlua::Result<()> {
    let g = lua.globals();
    let string: Table = g.raw_get("string")?;
    for name in [
        "byte", "char", "format", "lower", "upper", "reverse", "sub", "pack", "unpack",
    ] {
        wrap(lua, shared, &string, name)?;
    }
    let table: Table = g.raw_get("table")?;
    for name in [
        "concat", "insert", "remove", "move", "sort", "unpack", "pack",
    ] {
        wrap(lua, shared, &table, name)?;
    }
    let utf8: Table = g.raw_get("utf8")?;
    for name in ["char", "codepoint", "len", "offset"] {
        wrap(lua, shared, &utf8, name)?;
    }
    for name in ["select", "tonumber", "load"] {
        wrap(lua, shared, &g, name)?;
    }
    Ok(())
}

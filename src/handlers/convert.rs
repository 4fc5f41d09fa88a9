//! JSON values across the Lua boundary, both ways, bounded in depth and
//! size. Written by hand rather than through mlua's serde support because a
//! handler-built table must not drive the host's stack (deep nesting) or
//! memory (huge output), and must not run Lua code: only raw table access is
//! used, so no metamethod fires outside the call's budget.

use mlua::{Lua, Table, Value as LuaValue};
use serde_json::{Map, Number, Value};

/// Deepest nesting accepted either way.
pub const MAX_DEPTH: usize = 64;

/// JSON to Lua. Objects become tables, arrays become sequences (an empty
/// array carries `array_mt` so it comes back as `[]`), null inside a
/// container becomes `sys.null`.
pub fn to_lua(lua: &Lua, v: &Value, array_mt: &Table) -> mlua::Result<LuaValue> {
    to_lua_at(lua, v, array_mt, 0)
}

fn to_lua_at(lua: &Lua, v: &Value, array_mt: &Table, depth: usize) -> mlua::Result<LuaValue> {
    if depth > MAX_DEPTH {
        return Err(mlua::Error::runtime(format!(
            "value nested deeper than {MAX_DEPTH} levels"
        )));
    }
    Ok(match v {
        Value::Null => LuaValue::NULL,
        Value::Bool(b) => LuaValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => LuaValue::Integer(i),
            None => LuaValue::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => LuaValue::String(lua.create_string(s)?),
        Value::Array(a) => {
            let t = lua.create_table_with_capacity(a.len(), 0)?;
            for (i, x) in a.iter().enumerate() {
                t.raw_set(i + 1, to_lua_at(lua, x, array_mt, depth + 1)?)?;
            }
            if a.is_empty() {
                t.set_metatable(Some(array_mt.clone()));
            }
            LuaValue::Table(t)
        }
        Value::Object(o) => {
            let t = lua.create_table_with_capacity(0, o.len())?;
            for (k, x) in o {
                t.raw_set(k.as_str(), to_lua_at(lua, x, array_mt, depth + 1)?)?;
            }
            LuaValue::Table(t)
        }
    })
}

/// Lua to JSON, at most `max_bytes` of (approximate) JSON text. `nil` is
/// `None` at the top and `null` inside containers.
pub fn from_lua(v: &LuaValue, max_bytes: usize, array_mt: &Table) -> Result<Option<Value>, String> {
    if v.is_nil() {
        return Ok(None);
    }
    let mut left = max_bytes;
    from_lua_at(v, &mut left, max_bytes, array_mt, 0).map(Some)
}

fn spend(left: &mut usize, n: usize, max: usize) -> Result<(), String> {
    if *left < n {
        return Err(format!("value is larger than {max} bytes"));
    }
    *left -= n;
    Ok(())
}

fn from_lua_at(
    v: &LuaValue,
    left: &mut usize,
    max: usize,
    array_mt: &Table,
    depth: usize,
) -> Result<Value, String> {
    match v {
        LuaValue::Nil => {
            spend(left, 4, max)?;
            Ok(Value::Null)
        }
        LuaValue::LightUserData(p) if p.0.is_null() => {
            spend(left, 4, max)?;
            Ok(Value::Null)
        }
        LuaValue::Boolean(b) => {
            spend(left, 5, max)?;
            Ok(Value::Bool(*b))
        }
        LuaValue::Integer(i) => {
            spend(left, 8, max)?;
            Ok(Value::Number((*i).into()))
        }
        LuaValue::Number(f) => {
            spend(left, 8, max)?;
            Number::from_f64(*f)
                .map(Value::Number)
                .ok_or_else(|| format!("cannot encode the number {f} as JSON"))
        }
        LuaValue::String(s) => {
            let b = s.as_bytes();
            spend(left, b.len() + 2, max)?;
            std::str::from_utf8(&b)
                .map(|s| Value::String(s.to_owned()))
                .map_err(|_| "cannot encode a string that is not UTF-8 as JSON".to_string())
        }
        LuaValue::Table(t) => {
            if depth >= MAX_DEPTH {
                return Err(format!("value nested deeper than {MAX_DEPTH} levels"));
            }
            table_to_json(t, left, max, array_mt, depth)
        }
        other => Err(format!("cannot encode a {} as JSON", other.type_name())),
    }
}

fn table_to_json(
    t: &Table,
    left: &mut usize,
    max: usize,
    array_mt: &Table,
    depth: usize,
) -> Result<Value, String> {
    spend(left, 2, max)?;
    let mut entries: Vec<(LuaValue, LuaValue)> = Vec::new();
    let mut all_seq = true;
    let mut walk = t.for_each(|k: LuaValue, v: LuaValue| {
        // every entry costs at least a separator and a value
        if *left < 2 * (entries.len() + 1) {
            return Err(mlua::Error::runtime(format!(
                "value is larger than {max} bytes"
            )));
        }
        if !matches!(k, LuaValue::Integer(i) if i >= 1) {
            all_seq = false;
        }
        entries.push((k, v));
        Ok(())
    });
    if let Err(e) = walk.as_mut() {
        return Err(match e {
            mlua::Error::RuntimeError(m) => m.clone(),
            other => other.to_string(),
        });
    }
    let n = entries.len();
    if n == 0 {
        let is_array = t
            .metatable()
            .map(|m| m.to_pointer() == array_mt.to_pointer())
            .unwrap_or(false);
        return Ok(if is_array {
            Value::Array(Vec::new())
        } else {
            Value::Object(Map::new())
        });
    }
    if all_seq
        && entries
            .iter()
            .all(|(k, _)| matches!(k, LuaValue::Integer(i) if (*i as usize) <= n))
    {
        // n distinct keys, all in 1..=n: a proper sequence
        let mut slots: Vec<Option<Value>> = vec![None; n];
        for (k, v) in &entries {
            if let LuaValue::Integer(i) = k {
                spend(left, 1, max)?;
                slots[(*i as usize) - 1] = Some(from_lua_at(v, left, max, array_mt, depth + 1)?);
            }
        }
        return Ok(Value::Array(
            slots
                .into_iter()
                .map(|s| s.unwrap_or(Value::Null))
                .collect(),
        ));
    }
    let mut map = Map::new();
    for (k, v) in &entries {
        let key = match k {
            LuaValue::String(s) => std::str::from_utf8(&s.as_bytes())
                .map(str::to_owned)
                .map_err(|_| "cannot encode a table key that is not UTF-8 as JSON".to_string())?,
            LuaValue::Integer(i) => i.to_string(),
            LuaValue::Number(f) if f.is_finite() => f.to_string(),
            other => {
                return Err(format!(
                    "cannot encode a {} table key as JSON",
                    other.type_name()
                ))
            }
        };
        spend(left, key.len() + 3, max)?;
        let val = from_lua_at(v, left, max, array_mt, depth + 1)?;
        map.insert(key, val);
    }
    Ok(Value::Object(map))
}

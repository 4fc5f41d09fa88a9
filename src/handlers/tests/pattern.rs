//! The metered pattern functions against Lua's own, and their budget.

use super::*;
use mlua::{Lua, MultiValue, Value as LuaValue};
use proptest::prelude::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// Runs `code` (returning any values) in a plain Lua and in one with the
/// metered functions; both must agree, errors included.
fn both(code: &str) -> (Result<String, String>, Result<String, String>) {
    let run = |lua: &Lua| -> Result<String, String> {
        let vals: MultiValue = lua
            .load(code)
            .eval()
            .map_err(|e| e.to_string().lines().next().unwrap_or("").to_string())?;
        Ok(vals
            .iter()
            .map(|v| match v {
                LuaValue::String(s) => format!("{:?}", s.as_bytes().to_vec()),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join(","))
    };
    let plain = Lua::new();
    let metered = Lua::new();
    let limits = Limits::default();
    let meter = super::super::pattern::test_meter(&limits);
    super::super::pattern::install(&metered, &meter).unwrap();
    (run(&plain), run(&metered))
}

fn same(code: &str) {
    let (a, b) = both(code);
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert_eq!(x, y, "{code}"),
        (Err(_), Err(_)) => {}
        _ => panic!("{code}: lua {a:?} vs metered {b:?}"),
    }
}

#[test]
fn agrees_with_lua_on_examples() {
    for code in [
        r#"return string.find("hello world", "o w")"#,
        r#"return string.find("hello world", "l+")"#,
        r#"return string.find("hello", "l", -2)"#,
        r#"return string.find("hello", "", 10)"#,
        r#"return string.find("hello", "", 6)"#,
        r#"return string.find("a.b", ".", 1, true)"#,
        r#"return string.find("key=val", "(%w+)=(%w+)")"#,
        r#"return string.match("  trim  ", "^%s*(.-)%s*$")"#,
        r#"return string.match("2024-01-05", "(%d+)-(%d+)-(%d+)")"#,
        r#"return string.match("hello", "()ll()")"#,
        r#"return string.match("THE (quick) fox", "%((%a+)%)")"#,
        r#"return string.match("f(a(b)c)d", "%b()")"#,
        r#"return string.match("THE (quick) fox", "%f[%a]%a+", 5)"#,
        r#"return string.match("abcabc", "(abc)%1")"#,
        r#"return string.match("x", "[%]]")"#,
        r#"return string.match("a]b", "[]]")"#,
        r#"return string.match("a-b", "[a-]+")"#,
        r#"return string.match("hello", "[^aeiou]+")"#,
        r#"return string.gsub("hello world", "o", "0")"#,
        r#"return string.gsub("hello world", "(%w+)", "<%1>")"#,
        r#"return string.gsub("hello world", "%w+", "%0 %0", 1)"#,
        r#"return string.gsub("abc", "", "-")"#,
        r#"return string.gsub("abc", "b*", "-")"#,
        r#"return string.gsub("hello", "l", {l = "L"})"#,
        r#"return string.gsub("$name is $age", "%$(%w+)", {name = "bob", age = 3})"#,
        r#"return string.gsub("abc", "%w", function(c) return c:upper() .. "." end)"#,
        r#"return string.gsub("abc", "%w", function(c) if c == "b" then return false end return 1.5 end)"#,
        r#"return string.gsub("hello world", "^h", "H")"#,
        r#"return string.gsub("x = 1", "(%w+)%s*=%s*(%w+)", "%2 = %1")"#,
        r#"local t = {} for k, v in string.gmatch("a=1, b=2", "(%w+)=(%w+)") do t[#t+1] = k .. v end return table.concat(t, ";")"#,
        r#"local t = {} for w in string.gmatch("one two  three", "%a+") do t[#t+1] = w end return table.concat(t, ",")"#,
        r#"local t = {} for w in string.gmatch("abc", "") do t[#t+1] = "." end return #t"#,
        r#"local t = {} for w in ("hello"):gmatch("l*") do t[#t+1] = "[" .. w .. "]" end return table.concat(t)"#,
        r#"return string.find("abc", "[a")"#,
        r#"return string.find("abc", "%")"#,
        r#"return string.gsub("abc", "a", "%2")"#,
        r#"return string.gsub("abc", "a", "%x")"#,
        r#"return string.find("abc", "(()")"#,
        r#"return string.find("abc", "%b")"#,
        r#"return string.find("abc", "%f")"#,
        r#"return string.match("a", "(a)%2")"#,
    ] {
        same(code);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn agrees_with_lua_on_random_patterns(
        subject in "[ab. ()%-]{0,12}",
        pattern in "([ab.]|%[aAsSdw.%]|\\[\\^?[ab%]{1,3}\\]|\\(|\\)|\\(\\)|%b\\(\\)|%f\\[a\\]|%1)([*+?-])?{0,5}\\$?",
        init in -4i64..14,
        repl in "[ab%0-2]{0,4}",
    ) {
        let s = format!("{subject:?}");
        let p = format!("{pattern:?}");
        let r = format!("{repl:?}");
        same(&format!("return string.find({s}, {p}, {init})"));
        same(&format!("return string.match({s}, {p}, {init})"));
        same(&format!("return string.gsub({s}, {p}, {r})"));
        same(&format!("local t = {{}} for a, b in string.gmatch({s}, {p}) do t[#t+1] = tostring(a) .. tostring(b) end return table.concat(t, '|')"));
    }
}

#[test]
fn catastrophic_patterns_are_stopped_by_the_budget() {
    let mut rt = lua(r#"function readCb(caller, args)
             local s = string.rep("a", args.n)
             if args.op == "find" then return s:find(".-.-.-.-b") end
             if args.op == "gsub" then return (s:gsub("(.-)(.-)(.-)b", "")) end
             if args.op == "gmatch" then for x in s:gmatch("(.-)(.-)(.-)b") do end return 0 end
             if args.op == "plain" then return s:find(string.rep("a", 5000) .. "b", 1, true) end
             return s:match("^(a-)(a-)(a-)(a-)b")
           end"#);
    let h = host();
    for op in ["find", "gsub", "gmatch", "plain", "match"] {
        let t0 = Instant::now();
        let e = read(&mut rt, &h, json!({"n": 100000, "op": op})).unwrap_err();
        assert!(
            matches!(
                e,
                HandlerError::Instructions(_) | HandlerError::WallClock(_)
            ),
            "{op}: {e}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{op}: {:?}",
            t0.elapsed()
        );
    }
    // and ordinary matching on the same state still works
    let mut ok = lua(r#"function readCb() return (("a=1, b=2"):gsub("(%w+)=(%w+)", "%2=%1")) end"#);
    assert_eq!(
        read(&mut ok, &h, json!(null)).unwrap().result,
        Some(json!("1=a, 2=b"))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    /// Arbitrary special-heavy patterns: never a panic, and the same answer
    /// (or an error on both sides) as Lua's matcher.
    #[test]
    fn agrees_with_lua_on_arbitrary_patterns(
        subject in "[ab%\\[\\]()\\-\\^$.\\x00]{0,10}",
        pattern in "[ab%\\[\\]()\\-\\^$.*+?bf0-3\\x00]{0,10}",
        init in -12i64..12,
    ) {
        let s = format!("{subject:?}").replace("\\u{0}", "\\0");
        let p = format!("{pattern:?}").replace("\\u{0}", "\\0");
        same(&format!("return string.find({s}, {p}, {init})"));
        same(&format!("return string.match({s}, {p}, {init})"));
        same(&format!("return string.gsub({s}, {p}, '%0%0')"));
        same(&format!("local n = 0 for a in string.gmatch({s}, {p}) do n = n + 1 if n > 50 then break end end return n"));
    }
}

//! `string.find`, `string.match`, `string.gmatch` and `string.gsub` with a
//! metered matcher. Lua's own matcher is C and backtracks without ever
//! reaching a hook, so `("a"):rep(1e5):find(".-.-.-b")` would hold the
//! executor for hours. This is a port of Lua 5.4's lstrlib matcher with the
//! same semantics, charging the call's budget as it goes (which also checks
//! the wall clock).

use super::sandbox::Shared;
use mlua::{Function, Lua, MultiValue, Table, Value as LuaValue};
use std::sync::Arc;

/// Matcher steps charged as one instruction.
const STEPS_PER_INSTRUCTION: u64 = 4;
/// Steps between two charges.
const CHARGE_EVERY: u64 = 1024;
/// Lua's MAXCCALLS for patterns.
const MAX_DEPTH: usize = 200;
const MAX_CAPTURES: usize = 32;
const SPECIALS: &[u8] = b"^$*+?.([%-";

#[derive(Clone, Copy)]
enum CapLen {
    Unfinished,
    Position,
    Len(usize),
}

#[derive(Clone, Copy)]
struct Capture {
    init: usize,
    len: CapLen,
}

/// Runs one match attempt over `src` with pattern `pat` (both byte
/// slices), counting steps.
struct Matcher<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    depth: usize,
    level: usize,
    caps: [Capture; MAX_CAPTURES],
    steps: u64,
    meter: &'a Shared,
}

fn err(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::runtime(msg.into())
}

fn class_matches(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        _ => return cl == c,
    };
    if cl.is_ascii_uppercase() {
        !res
    } else {
        res
    }
}

impl<'a> Matcher<'a> {
    fn new(src: &'a [u8], pat: &'a [u8], meter: &'a Shared) -> Self {
        Matcher {
            src,
            pat,
            depth: MAX_DEPTH,
            level: 0,
            caps: [Capture {
                init: 0,
                len: CapLen::Unfinished,
            }; MAX_CAPTURES],
            steps: 0,
            meter,
        }
    }

    fn reset(&mut self) {
        self.level = 0;
        self.depth = MAX_DEPTH;
    }

    fn step(&mut self, n: u64) -> mlua::Result<()> {
        self.steps += n;
        if self.steps >= CHARGE_EVERY {
            let s = std::mem::take(&mut self.steps);
            self.meter.charge(s / STEPS_PER_INSTRUCTION)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> mlua::Result<()> {
        let s = std::mem::take(&mut self.steps);
        self.meter.charge(s / STEPS_PER_INSTRUCTION)
    }

    /// Pattern byte at `i`, 0 past the end (C reads the terminator).
    fn p(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    fn class_end(&self, mut p: usize) -> mlua::Result<usize> {
        let c = self.p(p);
        p += 1;
        if c == b'%' {
            if p >= self.pat.len() {
                return Err(err("malformed pattern (ends with '%')"));
            }
            return Ok(p + 1);
        }
        if c == b'[' {
            if self.p(p) == b'^' {
                p += 1;
            }
            loop {
                if p >= self.pat.len() {
                    return Err(err("malformed pattern (missing ']')"));
                }
                let c = self.pat[p];
                p += 1;
                if c == b'%' && p < self.pat.len() {
                    p += 1;
                }
                if self.p(p) == b']' {
                    break;
                }
            }
            return Ok(p + 1);
        }
        Ok(p)
    }

    /// `p` points at '[', `ec` at the closing ']'.
    fn bracket(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut sig = true;
        if self.p(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        p += 1;
        while p < ec {
            if self.pat[p] == b'%' {
                p += 1;
                if class_matches(c, self.p(p)) {
                    return sig;
                }
            } else if self.p(p + 1) == b'-' && p + 2 < ec {
                if self.pat[p] <= c && c <= self.pat[p + 2] {
                    return sig;
                }
                p += 2;
            } else if self.pat[p] == c {
                return sig;
            }
            p += 1;
        }
        !sig
    }

    fn single(&self, s: usize, p: usize, ep: usize) -> bool {
        if s >= self.src.len() {
            return false;
        }
        let c = self.src[s];
        match self.pat[p] {
            b'.' => true,
            b'%' => class_matches(c, self.p(p + 1)),
            b'[' => self.bracket(c, p, ep - 1),
            pc => pc == c,
        }
    }

    fn do_match(&mut self, s: usize, p: usize) -> mlua::Result<Option<usize>> {
        if self.depth == 0 {
            return Err(err("pattern too complex"));
        }
        self.depth -= 1;
        let r = self.match_inner(s, p);
        self.depth += 1;
        r
    }

    fn match_inner(&mut self, mut s: usize, mut p: usize) -> mlua::Result<Option<usize>> {
        loop {
            self.step(1)?;
            if p == self.pat.len() {
                return Ok(Some(s));
            }
            match self.pat[p] {
                b'(' => {
                    return if self.p(p + 1) == b')' {
                        self.start_capture(s, p + 2, CapLen::Position)
                    } else {
                        self.start_capture(s, p + 1, CapLen::Unfinished)
                    };
                }
                b')' => return self.end_capture(s, p + 1),
                b'$' if p + 1 == self.pat.len() => {
                    return Ok((s == self.src.len()).then_some(s));
                }
                b'%' if self.p(p + 1) == b'b' => match self.balance(s, p + 2)? {
                    Some(ns) => {
                        s = ns;
                        p += 4;
                        continue;
                    }
                    None => return Ok(None),
                },
                b'%' if self.p(p + 1) == b'f' => {
                    p += 2;
                    if self.p(p) != b'[' {
                        return Err(err("missing '[' after '%f' in pattern"));
                    }
                    let ep = self.class_end(p)?;
                    let prev = if s == 0 { 0 } else { self.src[s - 1] };
                    let cur = self.src.get(s).copied().unwrap_or(0);
                    if !self.bracket(prev, p, ep - 1) && self.bracket(cur, p, ep - 1) {
                        p = ep;
                        continue;
                    }
                    return Ok(None);
                }
                b'%' if self.p(p + 1).is_ascii_digit() => {
                    match self.match_capture(s, self.p(p + 1))? {
                        Some(ns) => {
                            s = ns;
                            p += 2;
                            continue;
                        }
                        None => return Ok(None),
                    }
                }
                _ => {
                    let ep = self.class_end(p)?;
                    let suffix = self.p(ep);
                    if !self.single(s, p, ep) {
                        if matches!(suffix, b'*' | b'?' | b'-') {
                            p = ep + 1;
                            continue;
                        }
                        return Ok(None);
                    }
                    match suffix {
                        b'?' => {
                            if let Some(r) = self.do_match(s + 1, ep + 1)? {
                                return Ok(Some(r));
                            }
                            p = ep + 1;
                            continue;
                        }
                        b'+' => return self.max_expand(s + 1, p, ep),
                        b'*' => return self.max_expand(s, p, ep),
                        b'-' => return self.min_expand(s, p, ep),
                        _ => {
                            s += 1;
                            p = ep;
                            continue;
                        }
                    }
                }
            }
        }
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> mlua::Result<Option<usize>> {
        let mut i = 0;
        while self.single(s + i, p, ep) {
            i += 1;
        }
        self.step(i as u64)?;
        loop {
            if let Some(r) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(r));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> mlua::Result<Option<usize>> {
        loop {
            if let Some(r) = self.do_match(s, ep + 1)? {
                return Ok(Some(r));
            }
            if self.single(s, p, ep) {
                s += 1;
            } else {
                return Ok(None);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: CapLen) -> mlua::Result<Option<usize>> {
        if self.level >= MAX_CAPTURES {
            return Err(err("too many captures"));
        }
        self.caps[self.level] = Capture { init: s, len: what };
        self.level += 1;
        let r = self.do_match(s, p)?;
        if r.is_none() {
            self.level -= 1;
        }
        Ok(r)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> mlua::Result<Option<usize>> {
        let l = (0..self.level)
            .rev()
            .find(|&l| matches!(self.caps[l].len, CapLen::Unfinished))
            .ok_or_else(|| err("invalid pattern capture"))?;
        self.caps[l].len = CapLen::Len(s - self.caps[l].init);
        let r = self.do_match(s, p)?;
        if r.is_none() {
            self.caps[l].len = CapLen::Unfinished;
        }
        Ok(r)
    }

    fn balance(&mut self, s: usize, p: usize) -> mlua::Result<Option<usize>> {
        if p + 1 >= self.pat.len() {
            return Err(err("malformed pattern (missing arguments to '%b')"));
        }
        let (b, e) = (self.pat[p], self.pat[p + 1]);
        if s >= self.src.len() || self.src[s] != b {
            return Ok(None);
        }
        let mut cont = 1;
        let mut i = s + 1;
        while i < self.src.len() {
            let c = self.src[i];
            if c == e {
                cont -= 1;
                if cont == 0 {
                    self.step((i - s) as u64)?;
                    return Ok(Some(i + 1));
                }
            } else if c == b {
                cont += 1;
            }
            i += 1;
        }
        self.step((i - s) as u64)?;
        Ok(None)
    }

    fn match_capture(&mut self, s: usize, l: u8) -> mlua::Result<Option<usize>> {
        let l = self.check_capture(l)?;
        let (init, len) = match self.caps[l].len {
            CapLen::Len(n) => (self.caps[l].init, n),
            // C reads a position capture's length as a huge size: no match
            _ => return Ok(None),
        };
        self.step(len as u64)?;
        if self.src.len() - s >= len && self.src[init..init + len] == self.src[s..s + len] {
            Ok(Some(s + len))
        } else {
            Ok(None)
        }
    }

    fn check_capture(&self, l: u8) -> mlua::Result<usize> {
        let i = l as i32 - b'1' as i32;
        if i < 0
            || i as usize >= self.level
            || matches!(self.caps[i as usize].len, CapLen::Unfinished)
        {
            return Err(err(format!("invalid capture index %{}", i + 1)));
        }
        Ok(i as usize)
    }

    /// Capture `i` of the match `s..e` as a Lua value.
    fn capture(&self, lua: &Lua, i: usize, s: usize, e: usize) -> mlua::Result<LuaValue> {
        if i >= self.level {
            if i != 0 {
                return Err(err(format!("invalid capture index %{}", i + 1)));
            }
            return Ok(LuaValue::String(lua.create_string(&self.src[s..e])?));
        }
        let c = self.caps[i];
        match c.len {
            CapLen::Unfinished => Err(err("unfinished capture")),
            CapLen::Position => Ok(LuaValue::Integer(c.init as i64 + 1)),
            CapLen::Len(n) => Ok(LuaValue::String(
                lua.create_string(&self.src[c.init..c.init + n])?,
            )),
        }
    }

    /// All captures (or the whole match when there are none and `whole`).
    fn captures(&self, lua: &Lua, s: usize, e: usize, whole: bool) -> mlua::Result<MultiValue> {
        let n = if self.level == 0 && whole {
            1
        } else {
            self.level
        };
        let mut out = MultiValue::new();
        for i in 0..n {
            out.push_back(self.capture(lua, i, s, e)?);
        }
        Ok(out)
    }
}

/// Lua's posrelatI: a 1-based start position from a possibly negative one.
fn start_pos(init: Option<i64>, len: usize) -> usize {
    let len = len as i64;
    match init.unwrap_or(1) {
        p if p > 0 => p as usize,
        0 => 1,
        p if p < -len => 1,
        p => (len + p + 1) as usize,
    }
}

/// Plain substring search, metered per byte compared.
fn find_plain(m: &mut Matcher<'_>, from: usize) -> mlua::Result<Option<usize>> {
    let (s, p) = (m.src, m.pat);
    if p.is_empty() {
        return Ok(Some(from));
    }
    if p.len() > s.len() - from {
        return Ok(None);
    }
    for i in from..=s.len() - p.len() {
        m.step(1)?;
        if s[i] == p[0] {
            let mut k = 1;
            while k < p.len() && s[i + k] == p[k] {
                k += 1;
            }
            m.step(k as u64)?;
            if k == p.len() {
                return Ok(Some(i));
            }
        }
    }
    Ok(None)
}

fn find_aux(
    lua: &Lua,
    meter: &Shared,
    (s, p, init, plain): (mlua::String, mlua::String, Option<i64>, Option<LuaValue>),
    find: bool,
) -> mlua::Result<MultiValue> {
    let (sb, pb) = (s.as_bytes(), p.as_bytes());
    let (src, pat): (&[u8], &[u8]) = (&sb, &pb);
    let init = start_pos(init, src.len()) - 1;
    let fail = || {
        let mut m = MultiValue::new();
        m.push_back(LuaValue::Nil);
        m
    };
    if init > src.len() {
        return Ok(fail());
    }
    let plain = plain
        .map(|v| !matches!(v, LuaValue::Nil | LuaValue::Boolean(false)))
        .unwrap_or(false);
    if find && (plain || !pat.iter().any(|c| SPECIALS.contains(c))) {
        let mut m = Matcher::new(src, pat, meter);
        let r = find_plain(&mut m, init)?;
        m.finish()?;
        return Ok(match r {
            Some(i) => {
                let mut out = MultiValue::new();
                out.push_back(LuaValue::Integer(i as i64 + 1));
                out.push_back(LuaValue::Integer((i + pat.len()) as i64));
                out
            }
            None => fail(),
        });
    }
    let anchor = pat.first() == Some(&b'^');
    let pat = if anchor { &pat[1..] } else { pat };
    let mut m = Matcher::new(src, pat, meter);
    let mut s1 = init;
    loop {
        m.reset();
        if let Some(e) = m.do_match(s1, 0)? {
            m.finish()?;
            if find {
                let mut out = m.captures(lua, 0, 0, false)?;
                out.push_front(LuaValue::Integer(e as i64));
                out.push_front(LuaValue::Integer(s1 as i64 + 1));
                return Ok(out);
            }
            return m.captures(lua, s1, e, true);
        }
        s1 += 1;
        if anchor || s1 > src.len() {
            break;
        }
    }
    m.finish()?;
    Ok(fail())
}

fn gsub(
    lua: &Lua,
    meter: &Shared,
    (s, p, repl, max): (mlua::String, mlua::String, LuaValue, Option<i64>),
) -> mlua::Result<(LuaValue, i64)> {
    let (sb, pb) = (s.as_bytes(), p.as_bytes());
    let (src, pat): (&[u8], &[u8]) = (&sb, &pb);
    let repl_str = match &repl {
        LuaValue::String(r) => Some(r.as_bytes().to_vec()),
        LuaValue::Integer(_) | LuaValue::Number(_) => lua
            .coerce_string(repl.clone())?
            .map(|x| x.as_bytes().to_vec()),
        LuaValue::Table(_) | LuaValue::Function(_) => None,
        other => {
            return Err(err(format!(
                "bad argument #3 to 'gsub' (string/function/table expected, got {})",
                other.type_name()
            )))
        }
    };
    let max = max.unwrap_or(src.len() as i64 + 1);
    let anchor = pat.first() == Some(&b'^');
    let pat = if anchor { &pat[1..] } else { pat };
    let mut m = Matcher::new(src, pat, meter);
    let mut out: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    let mut last: Option<usize> = None;
    let mut n = 0i64;
    let limit = meter.lock().limits.memory_bytes;
    while n < max {
        m.reset();
        match m.do_match(pos, 0)? {
            Some(e) if Some(e) != last => {
                n += 1;
                add_value(lua, &mut m, &mut out, pos, e, &repl, repl_str.as_deref())?;
                pos = e;
                last = Some(e);
            }
            _ if pos < src.len() => {
                out.push(src[pos]);
                pos += 1;
            }
            _ => break,
        }
        if out.len() > limit {
            return Err(meter.abort(super::HandlerError::Memory(limit)));
        }
        if anchor {
            break;
        }
    }
    m.step(out.len() as u64)?;
    m.finish()?;
    if n == 0 {
        return Ok((LuaValue::String(s), 0));
    }
    out.extend_from_slice(&src[pos..]);
    Ok((LuaValue::String(lua.create_string(&out)?), n))
}

fn add_value(
    lua: &Lua,
    m: &mut Matcher<'_>,
    out: &mut Vec<u8>,
    s: usize,
    e: usize,
    repl: &LuaValue,
    repl_str: Option<&[u8]>,
) -> mlua::Result<()> {
    let value = match (repl, repl_str) {
        (_, Some(r)) => {
            let mut i = 0;
            while i < r.len() {
                let c = r[i];
                i += 1;
                if c != b'%' {
                    out.push(c);
                    continue;
                }
                let d = r.get(i).copied().unwrap_or(0);
                i += 1;
                if d == b'%' {
                    out.push(b'%');
                } else if d.is_ascii_digit() {
                    if d == b'0' {
                        out.extend_from_slice(&m.src[s..e]);
                    } else {
                        match m.capture(lua, (d - b'1') as usize, s, e)? {
                            LuaValue::String(x) => out.extend_from_slice(&x.as_bytes()),
                            LuaValue::Integer(x) => out.extend_from_slice(x.to_string().as_bytes()),
                            _ => {}
                        }
                    }
                } else {
                    return Err(err("invalid use of '%' in replacement string"));
                }
            }
            return Ok(());
        }
        (LuaValue::Function(f), None) => {
            let caps = m.captures(lua, s, e, true)?;
            f.call::<LuaValue>(caps)?
        }
        (LuaValue::Table(t), None) => {
            let k = m.capture(lua, 0, s, e)?;
            t.get::<LuaValue>(k)?
        }
        _ => LuaValue::Nil,
    };
    match value {
        LuaValue::Nil | LuaValue::Boolean(false) => out.extend_from_slice(&m.src[s..e]),
        LuaValue::String(x) => out.extend_from_slice(&x.as_bytes()),
        LuaValue::Integer(_) | LuaValue::Number(_) => {
            if let Some(x) = lua.coerce_string(value)? {
                out.extend_from_slice(&x.as_bytes());
            }
        }
        other => {
            return Err(err(format!(
                "invalid replacement value (a {})",
                other.type_name()
            )))
        }
    }
    Ok(())
}

/// Replaces the four pattern functions of `string` with metered ones.
pub fn install(lua: &Lua, shared: &Arc<Shared>) -> mlua::Result<()> {
    let string: Table = lua.globals().raw_get("string")?;
    let s = Arc::clone(shared);
    string.raw_set(
        "find",
        lua.create_function(move |lua, a| find_aux(lua, &s, a, true))?,
    )?;
    let s = Arc::clone(shared);
    string.raw_set(
        "match",
        lua.create_function(
            move |lua, (st, p, init): (mlua::String, mlua::String, Option<i64>)| {
                find_aux(lua, &s, (st, p, init, None), false)
            },
        )?,
    )?;
    let s = Arc::clone(shared);
    string.raw_set("gsub", lua.create_function(move |lua, a| gsub(lua, &s, a))?)?;
    let s = Arc::clone(shared);
    string.raw_set(
        "gmatch",
        lua.create_function(
            move |lua, (st, p, init): (mlua::String, mlua::String, Option<i64>)| {
                let len = st.as_bytes().len();
                let mut pos = start_pos(init, len) - 1;
                if pos > len {
                    pos = len + 1;
                }
                let mut last: Option<usize> = None;
                let s = Arc::clone(&s);
                let it: Function = lua.create_function_mut(move |lua, ()| {
                    let (sb, pb) = (st.as_bytes(), p.as_bytes());
                    let mut m = Matcher::new(&sb, &pb, &s);
                    while pos <= sb.len() {
                        m.reset();
                        if let Some(e) = m.do_match(pos, 0)? {
                            if Some(e) != last {
                                let start = pos;
                                pos = e;
                                last = Some(e);
                                m.finish()?;
                                return m.captures(lua, start, e, true);
                            }
                        }
                        pos += 1;
                    }
                    m.finish()?;
                    Ok(MultiValue::new())
                })?;
                Ok(it)
            },
        )?,
    )?;
    Ok(())
}

#[cfg(test)]
pub(super) fn test_meter(limits: &super::Limits) -> Arc<Shared> {
    let s = Arc::new(Shared::new("test", limits));
    s.start(limits.instructions);
    s.arm_clock(limits.wall);
    s
}

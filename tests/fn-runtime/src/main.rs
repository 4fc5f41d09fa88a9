//! A tiny server that speaks the OpenWhisk action runtime interface, used as
//! capy's test function. It listens on :8080 (or `$PORT`) and serves
//!
//! - `POST /init` with `{"value": {...}}`: answers `{"ok": true}`;
//! - `POST /run` with `{"value": X}`: behaves as `X.action` says:
//!   - `"echo"` (or no action): answers X itself;
//!   - `"incr"`: answers `{"state": S}` where S is `X.state` with the number
//!     in field `X.field` (default `"count"`) incremented by one;
//!   - `"sleep"`: sleeps `X.ms` milliseconds, then answers X;
//!   - `"garbage"`: answers 200 with a body that is not JSON;
//!   - `"big"`: answers `{"big": "xxx…"}` with `X.bytes` characters;
//!   - `"fail"`: answers 502 `{"error": X.message}` (an action error);
//!   - `"exit"`: exits the process with code `X.code` (default 3) without
//!     answering;
//!   - `"append"`: answers `{"state": S}` with `X.item` appended to the
//!     array in field `X.field` (default `"items"`) of `X.state`;
//!   - `"emit"`: answers `{"output": X.emit}`;
//!   - `"transcode"`: reads blob `X.src` (default `"video"`) through its
//!     presigned GET URL in `X.blobs` (empty if it has none), upper-cases
//!     it and appends `X.suffix` (default `"+t"`), writes it through the
//!     PUT URL of blob `X.dst` (default `X.src`), and answers `{"state": S,
//!     "output": {"bytes": N}}` with N also in field `X.field` (default
//!     `"size"`); with `X.fail_after_put` it then answers an action error;
//! - `GET /health`: answers `{"ok": true}`.
//!
//! With the argument `--never-listen`, or `CAPY_FN_NEVER_LISTEN=1` in the
//! environment, it never opens its port: a cold start that never becomes
//! ready. Only std, so it links statically and runs in a `FROM scratch` image.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// Largest request body accepted; capy's host bounds its own inputs further.
const MAX_BODY: usize = 64 << 20;
const MAX_HEADER_LINE: usize = 8 << 10;
const MAX_DEPTH: usize = 128;

fn main() {
    let never_listen = std::env::args().any(|a| a == "--never-listen")
        || std::env::var("CAPY_FN_NEVER_LISTEN").is_ok_and(|v| v == "1");
    if never_listen {
        eprintln!("capy-fn-runtime: never listening, as asked");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = match TcpListener::bind(format!("0.0.0.0:{port}")) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("capy-fn-runtime: cannot listen on :{port}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("capy-fn-runtime: listening on :{port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || serve(stream));
    }
}

/// Serves requests on one kept-alive connection until the peer closes it.
fn serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut reader = match stream.try_clone() {
        Ok(s) => BufReader::new(s),
        Err(_) => return,
    };
    let mut writer = stream;
    loop {
        let req = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(msg) => {
                let _ = respond(&mut writer, 400, &error_json(&msg));
                return;
            }
        };
        let (status, body) = route(&req);
        if respond(&mut writer, status, &body).is_err() {
            return;
        }
    }
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

fn read_line(r: &mut BufReader<TcpStream>) -> Result<Option<String>, String> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_HEADER_LINE as u64)
        .read_until(b'\n', &mut line)
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        return Err("header line too long".into());
    }
    let s = String::from_utf8(line).map_err(|_| "header is not UTF-8".to_string())?;
    Ok(Some(s.trim_end_matches(['\r', '\n']).to_string()))
}

fn read_request(r: &mut BufReader<TcpStream>) -> Result<Option<Request>, String> {
    let first = match read_line(r)? {
        Some(l) => l,
        None => return Ok(None),
    };
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut len = 0usize;
    let mut headers = 0;
    loop {
        let line = read_line(r)?.ok_or("connection closed in headers")?;
        if line.is_empty() {
            break;
        }
        headers += 1;
        if headers > 100 {
            return Err("too many headers".into());
        }
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                len = v.trim().parse().map_err(|_| "bad content-length")?;
            } else if k == "transfer-encoding" {
                return Err("chunked bodies are not supported".into());
            }
        }
    }
    if len > MAX_BODY {
        return Err(format!("body larger than {MAX_BODY} bytes"));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(Some(Request { method, path, body }))
}

fn respond(w: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Bad Gateway",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

fn error_json(msg: &str) -> Vec<u8> {
    let mut m = BTreeMap::new();
    m.insert("error".to_string(), Json::Str(msg.to_string()));
    Json::Obj(m).to_string().into_bytes()
}

fn ok_json() -> Vec<u8> {
    b"{\"ok\":true}".to_vec()
}

fn route(req: &Request) -> (u16, Vec<u8>) {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/health") => (200, ok_json()),
        ("POST", "/init") => match parse_value(&req.body) {
            Ok(_) => (200, ok_json()),
            Err(e) => (400, error_json(&e)),
        },
        ("POST", "/run") => match parse_value(&req.body) {
            Ok(v) => run(v),
            Err(e) => (400, error_json(&e)),
        },
        _ => (404, error_json("no such route")),
    }
}

/// The `value` field of an OpenWhisk request body.
fn parse_value(body: &[u8]) -> Result<Json, String> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_string())?;
    match Json::parse(text)? {
        Json::Obj(mut m) => Ok(m.remove("value").unwrap_or(Json::Null)),
        _ => Err("body is not a JSON object".into()),
    }
}

fn run(v: Json) -> (u16, Vec<u8>) {
    let action = v.get("action").and_then(Json::as_str).unwrap_or("echo");
    match action {
        "echo" => (200, v.to_string().into_bytes()),
        "incr" => {
            let field = v
                .get("field")
                .and_then(Json::as_str)
                .unwrap_or("count")
                .to_string();
            let mut state = match v.get("state") {
                Some(Json::Obj(m)) => m.clone(),
                _ => BTreeMap::new(),
            };
            let n = state.get(&field).and_then(Json::as_f64).unwrap_or(0.0);
            state.insert(field, Json::Num(n + 1.0));
            let mut out = BTreeMap::new();
            out.insert("state".to_string(), Json::Obj(state));
            (200, Json::Obj(out).to_string().into_bytes())
        }
        "sleep" => {
            let ms = v.get("ms").and_then(Json::as_f64).unwrap_or(1000.0);
            std::thread::sleep(Duration::from_millis(ms.max(0.0) as u64));
            (200, v.to_string().into_bytes())
        }
        "garbage" => (200, b"<<this is not json>> \x01\x02".to_vec()),
        "big" => {
            let n = v.get("bytes").and_then(Json::as_f64).unwrap_or(1e6) as usize;
            let mut out = Vec::with_capacity(n.min(MAX_BODY) + 10);
            out.extend_from_slice(b"{\"big\":\"");
            out.resize(out.len() + n.min(MAX_BODY), b'x');
            out.extend_from_slice(b"\"}");
            (200, out)
        }
        "fail" => {
            let msg = v
                .get("message")
                .and_then(Json::as_str)
                .unwrap_or("the action failed");
            (502, error_json(msg))
        }
        "exit" => {
            let code = v.get("code").and_then(Json::as_f64).unwrap_or(3.0) as i32;
            eprintln!("capy-fn-runtime: exiting with {code}, as asked");
            std::process::exit(code);
        }
        "append" => {
            let field = v.get("field").and_then(Json::as_str).unwrap_or("items").to_string();
            let mut state = match v.get("state") {
                Some(Json::Obj(m)) => m.clone(),
                _ => BTreeMap::new(),
            };
            let mut list = match state.get(&field) {
                Some(Json::Arr(a)) => a.clone(),
                _ => Vec::new(),
            };
            list.push(v.get("item").cloned().unwrap_or(Json::Null));
            state.insert(field, Json::Arr(list));
            let mut out = BTreeMap::new();
            out.insert("state".to_string(), Json::Obj(state));
            (200, Json::Obj(out).to_string().into_bytes())
        }
        "emit" => {
            let mut out = BTreeMap::new();
            out.insert("output".to_string(), v.get("emit").cloned().unwrap_or(Json::Null));
            (200, Json::Obj(out).to_string().into_bytes())
        }
        "transcode" => match transcode(&v) {
            Ok(r) => r,
            Err(e) => (502, error_json(&e)),
        },
        other => (502, error_json(&format!("unknown action {other:?}"))),
    }
}

fn transcode(v: &Json) -> Result<(u16, Vec<u8>), String> {
    let src = v.get("src").and_then(Json::as_str).unwrap_or("video");
    let dst = v.get("dst").and_then(Json::as_str).unwrap_or(src);
    let field = v.get("field").and_then(Json::as_str).unwrap_or("size");
    let suffix = v.get("suffix").and_then(Json::as_str).unwrap_or("+t");
    let blobs = v.get("blobs").ok_or("no blobs in the input")?;
    let input = match blobs.get(src).and_then(|b| b.get("get")).and_then(Json::as_str) {
        Some(url) => {
            let (status, body) = http("GET", url, &[])?;
            if status != 200 {
                return Err(format!("GET {src}: HTTP {status}"));
            }
            body
        }
        None => Vec::new(),
    };
    let mut out = input.to_ascii_uppercase();
    out.extend_from_slice(suffix.as_bytes());
    let put = blobs
        .get(dst)
        .and_then(|b| b.get("put"))
        .and_then(Json::as_str)
        .ok_or_else(|| format!("no PUT URL for blob {dst}"))?;
    let (status, body) = http("PUT", put, &out)?;
    if status != 200 {
        return Err(format!("PUT {dst}: HTTP {status}: {}", String::from_utf8_lossy(&body)));
    }
    if v.get("fail_after_put").is_some() {
        return Ok((502, error_json("failing after the blob write, as asked")));
    }
    let mut state = match v.get("state") {
        Some(Json::Obj(m)) => m.clone(),
        _ => BTreeMap::new(),
    };
    state.insert(field.to_string(), Json::Num(out.len() as f64));
    let mut o = BTreeMap::new();
    o.insert("bytes".to_string(), Json::Num(out.len() as f64));
    let mut r = BTreeMap::new();
    r.insert("state".to_string(), Json::Obj(state));
    r.insert("output".to_string(), Json::Obj(o));
    Ok((200, Json::Obj(r).to_string().into_bytes()))
}

/// A one-shot HTTP/1.1 request (`http://` only), for presigned URLs.
fn http(method: &str, url: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = TcpStream::connect(host).map_err(|e| format!("connecting to {host}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| format!("sending to {host}: {e}"))?;
    let mut resp = Vec::new();
    s.take(MAX_BODY as u64)
        .read_to_end(&mut resp)
        .map_err(|e| format!("reading from {host}: {e}"))?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header in the answer")?;
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("no HTTP status in the answer")?;
    Ok((status, resp[split + 4..].to_vec()))
}

/// Just enough JSON for the test function: parse, look up, print.
#[derive(Clone, Debug)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(BTreeMap<String, Json>),
}

impl Json {
    fn get(&self, k: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.get(k),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }

    fn parse(s: &str) -> Result<Json, String> {
        let mut p = Parser {
            b: s.as_bytes(),
            i: 0,
        };
        let v = p.value(0)?;
        p.ws();
        if p.i != p.b.len() {
            return Err(format!("trailing characters at byte {}", p.i));
        }
        Ok(v)
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => {
                if n.fract() == 0.0 && n.abs() < 9.0e15 {
                    out.push_str(&format!("{}", *n as i64));
                } else if n.is_finite() {
                    out.push_str(&format!("{n}"));
                } else {
                    out.push_str("null");
                }
            }
            Json::Str(s) => write_str(s, out),
            Json::Arr(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Json::Obj(m) => {
                out.push('{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(k, out);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

impl std::fmt::Display for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        self.write(&mut s);
        f.write_str(&s)
    }
}

fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn lit(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.b[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(format!("bad literal at byte {}", self.i))
        }
    }
    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > MAX_DEPTH {
            return Err("JSON nested too deep".into());
        }
        self.ws();
        match self.peek().ok_or("unexpected end of JSON")? {
            b'n' => self.lit("null", Json::Null),
            b't' => self.lit("true", Json::Bool(true)),
            b'f' => self.lit("false", Json::Bool(false)),
            b'"' => Ok(Json::Str(self.string()?)),
            b'[' => {
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(Json::Arr(a));
                }
                loop {
                    a.push(self.value(depth + 1)?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(a));
                        }
                        _ => return Err(format!("expected , or ] at byte {}", self.i)),
                    }
                }
            }
            b'{' => {
                self.i += 1;
                let mut m = BTreeMap::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(m));
                }
                loop {
                    self.ws();
                    if self.peek() != Some(b'"') {
                        return Err(format!("expected a key at byte {}", self.i));
                    }
                    let k = self.string()?;
                    self.ws();
                    if self.peek() != Some(b':') {
                        return Err(format!("expected : at byte {}", self.i));
                    }
                    self.i += 1;
                    let v = self.value(depth + 1)?;
                    m.insert(k, v);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(m));
                        }
                        _ => return Err(format!("expected , or }} at byte {}", self.i)),
                    }
                }
            }
            _ => self.number(),
        }
    }
    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        while self.i < self.b.len()
            && matches!(
                self.b[self.i],
                b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
            )
        {
            self.i += 1;
        }
        std::str::from_utf8(&self.b[start..self.i])
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .map(Json::Num)
            .ok_or_else(|| format!("bad number at byte {start}"))
    }
    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.i < self.b.len() && self.b[self.i] != b'"' && self.b[self.i] != b'\\' {
                self.i += 1;
            }
            out.push_str(std::str::from_utf8(&self.b[start..self.i]).map_err(|e| e.to_string())?);
            match self.peek() {
                None => return Err("unterminated string".into()),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(_) => {
                    let e = *self.b.get(self.i + 1).ok_or("unterminated escape")?;
                    self.i += 2;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hex = self
                                .b
                                .get(self.i..self.i + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or("bad \\u escape")?;
                            self.i += 4;
                            out.push(char::from_u32(hex).unwrap_or('\u{fffd}'));
                        }
                        _ => return Err("bad escape".into()),
                    }
                }
            }
        }
    }
}

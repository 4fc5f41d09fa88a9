//! The commands that talk to a node over its HTTP API, and the thin glue of
//! the ones that run locally.

use super::*;
use crate::http::{self, percent_encode, ClientError, Reply};
use hyper::{Method, StatusCode};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Longest a CLI request waits for the node; a put waits for replicas.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest value `capy put` reads (the store's own bound).
const MAX_VALUE: u64 = crate::store::MAX_VALUE as u64;

fn kv_url(c: &ClientArgs, key: &str) -> String {
    let mut u = format!(
        "{}/api/kv/{}",
        c.node.trim_end_matches('/'),
        percent_encode(key)
    );
    if c.bucket != "default" {
        u.push_str(&format!("?bucket={}", percent_encode(&c.bucket)));
    }
    u
}

fn request(url: &str, method: Method, body: Option<(Vec<u8>, &str)>) -> Result<Reply, i32> {
    smol::block_on(http::call(url, method, body, CLI_TIMEOUT)).map_err(|e| {
        eprintln!("capy: {e}");
        match e {
            ClientError::BadUrl(_) => EXIT_USAGE,
            ClientError::Connect { .. } | ClientError::Timeout(..) => EXIT_UNREACHABLE,
            ClientError::Http { .. } => EXIT_FAILED,
        }
    })
}

/// Maps a non-success reply to a message and an exit code.
fn failed(what: &str, r: &Reply) -> i32 {
    eprintln!("capy: {what}: {} ({})", r.message(), r.status);
    match r.status {
        StatusCode::NOT_FOUND => EXIT_NOT_FOUND,
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => EXIT_USAGE,
        _ => EXIT_FAILED,
    }
}

fn read_value(file: Option<&Path>) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    match file {
        None => {}
        Some(p) if p == Path::new("-") => {
            std::io::stdin()
                .take(MAX_VALUE + 1)
                .read_to_end(&mut buf)
                .map_err(|e| format!("reading stdin: {e}"))?;
        }
        Some(p) => {
            let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
            f.take(MAX_VALUE + 1)
                .read_to_end(&mut buf)
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    if buf.len() as u64 > MAX_VALUE {
        return Err(format!("value larger than {MAX_VALUE} bytes"));
    }
    Ok(buf)
}

pub fn put(c: &ClientArgs, key: &str, file: Option<&Path>) -> i32 {
    let value = match read_value(file) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("capy: {e}");
            return EXIT_USAGE;
        }
    };
    let r = match request(
        &kv_url(c, key),
        Method::PUT,
        Some((value, "application/octet-stream")),
    ) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if !r.status.is_success() {
        return failed(&format!("put {key:?}"), &r);
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    match v.get("version") {
        Some(ver) => println!("stored {key} version {ver}"),
        None => println!("stored {key}"),
    }
    EXIT_OK
}

pub fn get(c: &ClientArgs, key: &str, out: Option<&Path>) -> i32 {
    let r = match request(&kv_url(c, key), Method::GET, None) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if !r.status.is_success() {
        return failed(&format!("get {key:?}"), &r);
    }
    let res = match out {
        Some(p) => std::fs::write(p, &r.body).map_err(|e| format!("{}: {e}", p.display())),
        None => std::io::stdout()
            .write_all(&r.body)
            .and_then(|_| std::io::stdout().flush())
            .map_err(|e| format!("writing stdout: {e}")),
    };
    match res {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("capy: {e}");
            EXIT_FAILED
        }
    }
}

pub fn rm(c: &ClientArgs, key: &str) -> i32 {
    let r = match request(&kv_url(c, key), Method::DELETE, None) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if !r.status.is_success() {
        return failed(&format!("rm {key:?}"), &r);
    }
    println!("deleted {key}");
    EXIT_OK
}

pub fn status(c: &ClientArgs, json: bool) -> i32 {
    let url = format!("{}/api/status", c.node.trim_end_matches('/'));
    let r = match request(&url, Method::GET, None) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if !r.status.is_success() {
        return failed("status", &r);
    }
    if json {
        println!("{}", String::from_utf8_lossy(&r.body));
        return EXIT_OK;
    }
    match serde_json::from_slice::<serde_json::Value>(&r.body) {
        Ok(v) => {
            print!("{}", crate::node::status::render_text(&v));
            EXIT_OK
        }
        Err(e) => {
            eprintln!("capy: status: the node sent something that is not JSON: {e}");
            EXIT_FAILED
        }
    }
}

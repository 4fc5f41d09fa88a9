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
    request_within(url, method, body, CLI_TIMEOUT)
}

/// One request of a client command; a failure to get any answer is
/// printed and mapped to the exit code.
/// `--node`, for the commands that talk to one node.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArg {
    /// The node's HTTP address.
    #[arg(long, env = "CAPY_NODE", default_value = "http://127.0.0.1:7070")]
    pub node: String,
}

impl NodeArg {
    /// The address without a trailing `/`, to append paths to.
    pub fn base(&self) -> &str {
        self.node.trim_end_matches('/')
    }
}

/// Prints a successful reply's body; a failed one the way `failed` does.
pub(super) fn print_reply(what: &str, r: Result<Reply, i32>) -> i32 {
    match r {
        Ok(r) if r.status.is_success() => {
            println!("{}", String::from_utf8_lossy(&r.body));
            EXIT_OK
        }
        Ok(r) => failed(what, &r),
        Err(code) => code,
    }
}

/// Reads a file, or stdin for `-`, refusing more than `limit` bytes.
pub(super) fn read_limited(p: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let res = if p == Path::new("-") {
        std::io::stdin().take(limit + 1).read_to_end(&mut buf)
    } else {
        std::fs::File::open(p).and_then(|f| f.take(limit + 1).read_to_end(&mut buf))
    };
    res.map_err(|e| format!("{}: {e}", p.display()))?;
    if buf.len() as u64 > limit {
        return Err(format!("{}: larger than {limit} bytes", p.display()));
    }
    Ok(buf)
}

pub(super) fn request_within(
    url: &str,
    method: Method,
    body: Option<(Vec<u8>, &str)>,
    timeout: Duration,
) -> Result<Reply, i32> {
    smol::block_on(http::call(url, method, body, timeout)).map_err(|e| {
        eprintln!("capy: {e}");
        match e {
            ClientError::BadUrl(_) => EXIT_USAGE,
            ClientError::Connect { .. } | ClientError::Timeout(..) => EXIT_UNREACHABLE,
            ClientError::Http { .. } => EXIT_FAILED,
        }
    })
}

/// Maps a non-success reply to a message and an exit code.
pub(super) fn failed(what: &str, r: &Reply) -> i32 {
    eprintln!("capy: {what}: {} ({})", r.message(), r.status);
    match r.status {
        StatusCode::NOT_FOUND => EXIT_NOT_FOUND,
        StatusCode::BAD_REQUEST
        | StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::UNPROCESSABLE_ENTITY => EXIT_USAGE,
        _ => EXIT_FAILED,
    }
}

fn read_value(file: Option<&Path>) -> Result<Vec<u8>, String> {
    match file {
        None => Ok(Vec::new()),
        Some(p) => read_limited(p, MAX_VALUE),
    }
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

pub fn vnodes(c: &ClientArgs, count: Option<&str>) -> i32 {
    let url = format!("{}/api/vnodes", c.node.trim_end_matches('/'));
    let r = match count {
        None => request(&url, Method::GET, None),
        Some(s) => {
            let body = if s == "auto" {
                serde_json::json!({ "count": "auto" })
            } else {
                match s.parse::<u32>() {
                    Ok(n) => serde_json::json!({ "count": n }),
                    Err(_) => {
                        eprintln!("capy: vnodes: {s:?} is neither a count nor `auto`");
                        return EXIT_USAGE;
                    }
                }
            };
            request(
                &url,
                Method::PUT,
                Some((body.to_string().into_bytes(), "application/json")),
            )
        }
    };
    let r = match r {
        Ok(r) => r,
        Err(code) => return code,
    };
    if !r.status.is_success() {
        return failed("vnodes", &r);
    }
    println!("{}", String::from_utf8_lossy(&r.body));
    EXIT_OK
}

pub fn ca(c: CaCmd) -> i32 {
    use crate::transport::{ca_init, ca_issue, IssueRequest};
    match c {
        CaCmd::Init { dir } => match ca_init(&dir) {
            Ok(info) => {
                println!("created CA in {}", dir.display());
                println!(
                    "  key          {} (mode 0600: keep it offline)",
                    info.key_path.display()
                );
                println!("  certificate  {}", info.cert_path.display());
                println!("  fingerprint  sha256:{}", info.fingerprint);
                EXIT_OK
            }
            Err(e) => {
                eprintln!("capy: {e}");
                EXIT_FAILED
            }
        },
        CaCmd::Issue {
            dir,
            name,
            max_vnodes,
            zone,
            days,
            out,
        } => {
            let mut req = IssueRequest::new(name);
            req.max_vnodes = max_vnodes;
            req.zone = zone;
            req.valid_days = days;
            match ca_issue(&dir, &req, &out) {
                Ok(info) => {
                    println!(
                        "issued a certificate for {} into {}",
                        info.name,
                        out.display()
                    );
                    println!("  zone {}, at most {} vnodes", info.zone, info.max_vnodes);
                    println!("  node id {}", info.vnode_id(0));
                    EXIT_OK
                }
                Err(e) => {
                    eprintln!("capy: {e}");
                    EXIT_FAILED
                }
            }
        }
    }
}

pub fn sim(s: SimArgs) -> i32 {
    match s.what {
        Some(SimCmd::Subscribe {
            nodes,
            subscribers,
            topics,
            publishes,
            poll_ms,
            fail_fraction,
            seed,
            json,
        }) => {
            let opts = crate::sim::SubscribeSimOpts {
                nodes,
                subscribers,
                topics,
                publishes,
                poll_interval: poll_ms.saturating_mul(1000),
                fail_fraction,
                seed,
                ..Default::default()
            };
            crate::sim::print_subscribe(&opts, json)
        }
        Some(SimCmd::Game {
            nodes,
            seed,
            rounds,
            epochs,
            epoch_rounds,
            churn,
            json,
        }) => {
            let opts = crate::game::GameSimOpts {
                nodes,
                seed,
                rounds,
                epochs,
                epoch_rounds,
                churn,
                ..Default::default()
            };
            crate::game::print_game_sim(&opts, json)
        }
        None => {
            let opts = crate::sim::OverlaySimOpts {
                nodes: s.nodes,
                lookups: s.lookups,
                fail_fraction: s.fail_fraction,
                seed: s.seed,
                ..Default::default()
            };
            crate::sim::print_overlay(&opts, s.json)
        }
    }
}

pub fn bench(b: BenchCmd) -> i32 {
    match b {
        BenchCmd::Obj(a) => super::objbench::run(a),
        BenchCmd::Handlers { json } => crate::handlers::bench_handlers(json),
        BenchCmd::Fn(a) => super::functions::bench(a),
        BenchCmd::Kv {
            nodes,
            ops,
            clients,
            value_size,
            json,
        } => match super::bench::kv(nodes, ops, clients, value_size) {
            Ok(r) => {
                if json {
                    return super::print_json(&r);
                } else {
                    println!(
                        "{} nodes, {} clients, {}-byte values\nput: p50 {:.3} ms  p99 {:.3} ms  {:.0} ops/s  ({} errors)\nget: p50 {:.3} ms  p99 {:.3} ms  {:.0} ops/s  ({} errors)\nidle RSS of one node: {:.1} MiB (after load {:.1} MiB)",
                        r.nodes, r.clients, r.value_size,
                        r.put.p50_ms, r.put.p99_ms, r.put.ops_per_s, r.put.errors,
                        r.get.p50_ms, r.get.p99_ms, r.get.ops_per_s, r.get.errors,
                        r.idle_rss_mb, r.loaded_rss_mb
                    );
                }
                EXIT_OK
            }
            Err(e) => {
                eprintln!("capy: bench kv: {e}");
                EXIT_FAILED
            }
        },
    }
}

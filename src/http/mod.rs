//! HTTP plumbing for the node's local server (status page, JSON API,
//! metrics, presigned blobs) and the small client the CLI and benchmarks use:
//! hyper 1 driven by smol through smol-hyper's adapters, so there is no second
//! runtime. Routing lives with the node runtime (`node::api`); this module
//! knows nothing of capy's parts.

use bytes::Bytes;
use futures_lite::future::{self, Future};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use smol::net::{TcpListener, TcpStream};
use smol_hyper::rt::{FuturesIo, SmolTimer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub type Body = BoxBody<Bytes, std::io::Error>;
pub type Resp = Response<Body>;
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Most connections served at once; beyond it new ones are closed at once so
/// a flood cannot exhaust a small gateway's memory.
pub const MAX_CONNECTIONS: usize = 512;

/// What the server calls for every request.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, req: Request<Incoming>, peer: SocketAddr) -> BoxFuture<Resp>;
}

/// Accepts connections until the listener fails; each connection is served
/// on its own task with a header-read timeout.
pub async fn serve(listener: TcpListener, handler: Arc<dyn Handler>) -> std::io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!("http accept failed: {e}");
                smol::Timer::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::warn!("http: too many connections, refusing {peer}");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        active.fetch_add(1, Ordering::Relaxed);
        let handler = handler.clone();
        let active = active.clone();
        smol::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let fut = handler.call(req, peer);
                async move { Ok::<_, std::convert::Infallible>(fut.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(SmolTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024)
                .serve_connection(FuturesIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("http connection from {peer}: {e}");
            }
            active.fetch_sub(1, Ordering::Relaxed);
        })
        .detach();
    }
}

/// A whole-body response.
pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

/// A JSON response.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Resp {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => full(status, "application/json", body),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding reply: {e}"),
        ),
    }
}

/// A JSON error: `{"error": "..."}`.
pub fn error(status: StatusCode, msg: &str) -> Resp {
    let body = serde_json::json!({ "error": msg });
    full(
        status,
        "application/json",
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// Reads a request body of at most `limit` bytes, or answers 413 / 400.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Resp> {
    if let Some(len) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large(limit));
        }
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large(limit))
        }
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("reading request body: {e}"),
        )),
    }
}

fn too_large(limit: usize) -> Resp {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body larger than {limit} bytes"),
    )
}

/// Splits `http://host:port/path?query` into the address to dial and the
/// request target. Only plain http: the node's HTTP listens on localhost or
/// a trusted interface; the cluster's own traffic is QUIC with mutual TLS.
pub fn split_url(url: &str) -> Result<(String, String), ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::BadUrl(format!("{url:?} does not start with http://")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(ClientError::BadUrl(format!("{url:?} has no host")));
    }
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL: {0}")]
    BadUrl(String),
    #[error("cannot reach {addr}: {err}")]
    Connect { addr: String, err: std::io::Error },
    #[error("HTTP error talking to {addr}: {err}")]
    Http { addr: String, err: hyper::Error },
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
}

/// A reply as the client sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Bytes,
}

impl Reply {
    /// The error message of a JSON error body, or the body as text.
    pub fn message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string())
    }
}

/// One kept-alive HTTP/1 connection: the CLI makes one request, benchmarks
/// reuse it for many.
pub struct Client {
    addr: String,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    timeout: Duration,
}

impl Client {
    pub async fn connect(authority: &str, timeout: Duration) -> Result<Client, ClientError> {
        let addr = authority.to_string();
        let connect = async {
            let stream = TcpStream::connect(&addr)
                .await
                .map_err(|err| ClientError::Connect {
                    addr: addr.clone(),
                    err,
                })?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(FuturesIo::new(stream))
                .await
                .map_err(|err| ClientError::Http {
                    addr: addr.clone(),
                    err,
                })?;
            smol::spawn(async move {
                let _ = conn.await;
            })
            .detach();
            Ok(sender)
        };
        let sender = with_timeout(connect, timeout, &addr).await?;
        Ok(Client {
            addr,
            sender,
            timeout,
        })
    }

    pub async fn request(
        &mut self,
        method: Method,
        target: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<Reply, ClientError> {
        let mut b = Request::builder()
            .method(method)
            .uri(target)
            .header(hyper::header::HOST, self.addr.as_str());
        let payload = match body {
            Some((bytes, ct)) => {
                b = b.header(CONTENT_TYPE, ct);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let req = b
            .body(Full::new(payload))
            .map_err(|e| ClientError::BadUrl(format!("{target:?}: {e}")))?;
        let addr = self.addr.clone();
        let sender = &mut self.sender;
        let fut = async {
            sender.ready().await.map_err(|err| ClientError::Http {
                addr: addr.clone(),
                err,
            })?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|err| ClientError::Http {
                    addr: addr.clone(),
                    err,
                })?;
            let status = resp.status();
            let content_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|err| ClientError::Http {
                    addr: addr.clone(),
                    err,
                })?
                .to_bytes();
            Ok(Reply {
                status,
                content_type,
                body,
            })
        };
        with_timeout(fut, self.timeout, &self.addr).await
    }
}

/// One request on a fresh connection: what the CLI does.
pub async fn call(
    url: &str,
    method: Method,
    body: Option<(Vec<u8>, &str)>,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    let (authority, target) = split_url(url)?;
    let mut c = Client::connect(&authority, timeout).await?;
    c.request(method, &target, body).await
}

async fn with_timeout<T>(
    fut: impl Future<Output = Result<T, ClientError>>,
    timeout: Duration,
    addr: &str,
) -> Result<T, ClientError> {
    future::or(fut, async {
        smol::Timer::after(timeout).await;
        Err(ClientError::Timeout(addr.to_string(), timeout))
    })
    .await
}

/// Percent-decodes a path segment (keys may hold any bytes a URL can carry).
pub fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// Query parameter `name` of a URL's query, percent-decoded (`+` is a
/// space, as in forms); `Ok(None)` when absent.
pub fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, String> {
    let Some(q) = query else {
        return Ok(None);
    };
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return percent_decode(&v.replace('+', " ")).map(Some);
        }
    }
    Ok(None)
}

/// Percent-encodes everything but unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-_.~".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_decode_and_refuse_bad_escapes() {
        let q = Some("bucket=a%2Fb&args=%7B%7D&x=a+b&bad=%zz");
        assert_eq!(query_param(q, "bucket"), Ok(Some("a/b".into())));
        assert_eq!(query_param(q, "args"), Ok(Some("{}".into())));
        assert_eq!(query_param(q, "x"), Ok(Some("a b".into())));
        assert_eq!(query_param(q, "buck"), Ok(None));
        assert_eq!(query_param(None, "x"), Ok(None));
        assert!(query_param(q, "bad").is_err());
    }

    #[test]
    fn urls_split() {
        assert_eq!(
            split_url("http://127.0.0.1:7070/api/kv/a").unwrap(),
            ("127.0.0.1:7070".into(), "/api/kv/a".into())
        );
        assert_eq!(
            split_url("http://localhost").unwrap(),
            ("localhost:80".into(), "/".into())
        );
        assert!(split_url("https://x").is_err());
        assert!(split_url("http:///x").is_err());
    }

    #[test]
    fn percent_roundtrip() {
        for s in ["plain", "a/b c?d", "ünï", "%41"] {
            assert_eq!(percent_decode(&percent_encode(s)).unwrap(), s);
        }
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%4").is_err());
    }

    struct Echo;
    impl Handler for Echo {
        fn call(&self, req: Request<Incoming>, _peer: SocketAddr) -> BoxFuture<Resp> {
            Box::pin(async move {
                match read_body(req, 16).await {
                    Ok(b) => full(StatusCode::OK, "text/plain", b),
                    Err(r) => r,
                }
            })
        }
    }

    #[test]
    fn server_and_client_roundtrip_and_body_limit() {
        smol::block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let task = smol::spawn(serve(l, Arc::new(Echo)));
            let url = format!("http://{addr}/x");
            let r = call(
                &url,
                Method::POST,
                Some((b"hi".to_vec(), "text/plain")),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(&r.body[..], b"hi");
            let r = call(
                &url,
                Method::POST,
                Some((vec![b'x'; 17], "text/plain")),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
            assert!(r.message().contains("16 bytes"), "{}", r.message());
            drop(task);
        });
    }
}

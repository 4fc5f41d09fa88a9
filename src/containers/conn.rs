//! One HTTP/1 connection over any byte stream (podman's unix socket, a
//! container's TCP port), driven by smol through smol-hyper. Unlike
//! `crate::http::Client` it bounds the reply body, since a function's output
//! is hostile input, and it can stream a request body from a file.

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite, Future};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use smol_hyper::rt::FuturesIo;
use std::time::Duration;

/// Request bodies need only be `Send` (a file stream is not `Sync`).
pub(crate) type ReqBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// A request body held in memory.
pub(crate) fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> ReqBody {
    full(Bytes::new())
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("reply body larger than {0} bytes")]
    TooLarge(usize),
    #[error("bad request: {0}")]
    Request(String),
}

pub(crate) struct Conn {
    sender: SendRequest<ReqBody>,
    host: HeaderValue,
}

impl Conn {
    /// HTTP/1 handshake on an open stream; the connection task runs detached
    /// and ends when the `Conn` is dropped or the peer closes.
    pub(crate) async fn handshake<S>(stream: S, host: &str) -> Result<Conn, ConnError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(FuturesIo::new(stream)).await?;
        smol::spawn(async move {
            let _ = conn.await;
        })
        .detach();
        let host = HeaderValue::from_str(host).map_err(|e| ConnError::Request(e.to_string()))?;
        Ok(Conn { sender, host })
    }

    /// False once the peer closed the connection or it failed.
    pub(crate) fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    /// One request; the reply body is read up to `limit` bytes.
    pub(crate) async fn request(
        &mut self,
        method: Method,
        target: &str,
        body: ReqBody,
        content_type: Option<&str>,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), ConnError> {
        let mut b = Request::builder()
            .method(method)
            .uri(target)
            .header(HOST, self.host.clone());
        if let Some(ct) = content_type {
            b = b.header(CONTENT_TYPE, ct);
        }
        let req = b
            .body(body)
            .map_err(|e| ConnError::Request(format!("{target:?}: {e}")))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        if let Some(len) = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > limit as u64 {
                return Err(ConnError::TooLarge(limit));
            }
        }
        match Limited::new(resp.into_body(), limit).collect().await {
            Ok(c) => Ok((status, c.to_bytes())),
            Err(e) => match e.downcast::<hyper::Error>() {
                Ok(h) => Err(ConnError::Http(*h)),
                Err(_) => Err(ConnError::TooLarge(limit)),
            },
        }
    }
}

/// `Some(output)`, or `None` if `fut` did not finish within `d`.
pub(crate) async fn within<T>(d: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        smol::Timer::after(d).await;
        None
    })
    .await
}

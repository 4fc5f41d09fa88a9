//! The node's HTTP routes: status page, JSON API, metrics. Every error is a
//! JSON body `{"error": "..."}` with a status a client can act on.

use super::runtime::{Node, OpError};
use crate::http::{self, BoxFuture, Handler, Resp};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub struct Api(pub Arc<Node>);

impl Handler for Api {
    fn call(&self, req: Request<Incoming>, _peer: SocketAddr) -> BoxFuture<Resp> {
        let node = self.0.clone();
        Box::pin(async move {
            node.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
            route(node, req).await
        })
    }
}

fn op_error(e: OpError) -> Resp {
    http::error(e.status(), &e.to_string())
}

/// The `bucket` query parameter, default "default".
fn bucket_of(req: &Request<Incoming>) -> Result<String, String> {
    Ok(http::query_param(req.uri().query(), "bucket")?.unwrap_or_else(|| "default".into()))
}

async fn route(node: Arc<Node>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (method.clone(), path.as_str()) {
        (Method::GET, "/") => http::full(
            StatusCode::OK,
            "text/html; charset=utf-8",
            super::status::PAGE,
        ),
        (Method::GET, "/api/status") => http::json(StatusCode::OK, &super::status_json(&node)),
        (Method::GET, "/metrics") => http::full(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            super::metrics_text(&node),
        ),
        (_, p) if p.starts_with("/api/kv/") => {
            let raw = &p["/api/kv/".len()..];
            let key = match http::percent_decode(raw) {
                Ok(k) if !k.is_empty() => k,
                Ok(_) => return http::error(StatusCode::BAD_REQUEST, "empty key"),
                Err(e) => return http::error(StatusCode::BAD_REQUEST, &e),
            };
            let bucket = match bucket_of(&req) {
                Ok(b) => b,
                Err(e) => return http::error(StatusCode::BAD_REQUEST, &e),
            };
            if bucket.starts_with("capy.") {
                return http::error(
                    StatusCode::FORBIDDEN,
                    "buckets named capy.* hold objects, packages and keys: use /api/obj and /api/pkg",
                );
            }
            match super::apps_api::kv_route(&node, &method, &bucket).await {
                super::apps_api::KvRoute::Plain => kv(node, method, &bucket, &key, req).await,
                super::apps_api::KvRoute::App => {
                    super::apps_api::app_kv(&node, method, &bucket, &key, req).await
                }
                super::apps_api::KvRoute::Refuse(r) => *r,
            }
        }
        (_, p) if p.starts_with("/api/apps") || p.starts_with("/api/watch/") => {
            super::apps_api::route(&node, req).await
        }
        (Method::GET, "/api/vnodes") => match node.vnode_status() {
            Some(v) => http::json(StatusCode::OK, &v),
            None => http::error(StatusCode::INTERNAL_SERVER_ERROR, "vnode state unavailable"),
        },
        (Method::PUT | Method::POST, "/api/vnodes") => set_vnodes(node, req).await,
        (Method::GET, p) if p.starts_with("/api/root/") => {
            let key = match http::percent_decode(&p["/api/root/".len()..]) {
                Ok(k) if !k.is_empty() => k,
                Ok(_) => return http::error(StatusCode::BAD_REQUEST, "empty key"),
                Err(e) => return http::error(StatusCode::BAD_REQUEST, &e),
            };
            let bucket = match bucket_of(&req) {
                Ok(b) => b,
                Err(e) => return http::error(StatusCode::BAD_REQUEST, &e),
            };
            root_of(node, &bucket, &key).await
        }
        (_, p) if p.starts_with("/api/fn/") => super::functions::http_route(node, req).await,
        (_, p) if super::objects::handles(p) => super::objects::route(node, req).await,
        (_, "/" | "/api/status" | "/metrics") => http::error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {path}"),
        ),
        _ => http::error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

async fn kv(
    node: Arc<Node>,
    method: Method,
    bucket: &str,
    key: &str,
    req: Request<Incoming>,
) -> Resp {
    match method {
        Method::PUT | Method::POST => {
            let body = match http::read_body(req, node.cfg.max_value).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            match node.put(bucket, key, Some(body.to_vec())).await {
                Ok(version) => http::json(
                    StatusCode::OK,
                    &json!({ "bucket": bucket, "key": key, "version": version }),
                ),
                Err(e) => op_error(e),
            }
        }
        Method::GET => match node.get(bucket, key).await {
            Ok(Some(v)) => {
                let mut r = http::full(StatusCode::OK, "application/octet-stream", v.value);
                if let Ok(h) = hyper::header::HeaderValue::from_str(&v.version.to_string()) {
                    r.headers_mut().insert("x-capy-version", h);
                }
                r
            }
            Ok(None) => http::error(StatusCode::NOT_FOUND, &format!("no such key: {key}")),
            Err(e) => op_error(e),
        },
        Method::DELETE => match node.put(bucket, key, None).await {
            Ok(version) => http::json(
                StatusCode::OK,
                &json!({ "bucket": bucket, "key": key, "deleted": true, "version": version }),
            ),
            Err(e) => op_error(e),
        },
        m => http::error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{m} is not allowed on /api/kv/"),
        ),
    }
}

/// `GET /api/root/{key}`: which node is the key's root right now.
async fn root_of(node: Arc<Node>, bucket: &str, key: &str) -> Resp {
    let id = crate::id::NodeId::for_key(bucket, key);
    let call = super::calls::Call::Whois { key: id };
    match node
        .call_root(id, call, std::time::Duration::from_secs(10))
        .await
    {
        Ok(bytes) => match postcard::from_bytes::<super::calls::RootInfo>(&bytes) {
            Ok(info) => http::json(
                StatusCode::OK,
                &json!({
                    "bucket": bucket,
                    "key": key,
                    "ring_id": id.to_string(),
                    "root": { "name": info.name, "zone": info.zone, "vnode": info.vnode.to_string(), "addr": info.addr.to_string() },
                }),
            ),
            Err(e) => http::error(StatusCode::BAD_GATEWAY, &format!("undecodable answer: {e}")),
        },
        Err(e) => op_error(e),
    }
}

/// `PUT /api/vnodes` with `{"count": N}` pins the vnode count, `{"count":
/// "auto"}` hands it back to the vnode game.
async fn set_vnodes(node: Arc<Node>, req: Request<Incoming>) -> Resp {
    let body = match http::read_body(req, 1024).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return http::error(StatusCode::BAD_REQUEST, &format!("body is not JSON: {e}")),
    };
    let want = match &v["count"] {
        serde_json::Value::String(s) if s == "auto" => None,
        serde_json::Value::Number(n) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Some(n),
            None => {
                return http::error(
                    StatusCode::BAD_REQUEST,
                    "count must be a whole number or \"auto\"",
                )
            }
        },
        _ => {
            return http::error(
                StatusCode::BAD_REQUEST,
                "expected {\"count\": N} or {\"count\": \"auto\"}",
            )
        }
    };
    match node.pin_vnodes(want) {
        Ok(running) => http::json(
            StatusCode::OK,
            &json!({ "mode": if want.is_some() { "pinned" } else { "auto" }, "running": running }),
        ),
        Err(e) => http::error(StatusCode::BAD_REQUEST, &e),
    }
}

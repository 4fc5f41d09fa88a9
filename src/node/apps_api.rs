//! HTTP routes of apps: registration and listing (`/api/apps`), a key's
//! events (`/api/apps/{app}/kv/{key}`, and `/api/kv/{key}?bucket=APP` for
//! a registered app's bucket), a key's policy state, and watching a key
//! (`/api/watch/{key}?bucket=APP`, server-sent events).
//!
//! Reads take readCb's arguments as the JSON query parameter `args` (`{}`
//! when absent); writes carry a JSON body. The `x-capy-caller` header names the caller
//! to the handler (default "http").

use super::apps::{check_app_name, Answer, AppCall, AppSpec, KeyOp, APPS_BUCKET, STATE_BUCKET};
use super::runtime::Node;
use crate::http::{self, Resp};
use crate::id::NodeId;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use std::sync::Arc;

/// Largest registration body: the handler source plus the definition.
const MAX_SPEC: usize = crate::handlers::MAX_SOURCE_BYTES + 64 * 1024;

fn answer(a: Answer) -> Resp {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    http::full(status, "application/json", a.body)
}

fn query(req: &Request<Incoming>, name: &str) -> Result<Option<String>, String> {
    http::query_param(req.uri().query(), name)
}

fn caller(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-capy-caller")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(128).collect())
        .unwrap_or_else(|| "http".to_string())
}

fn segment(raw: &str, what: &str) -> Result<String, String> {
    match http::percent_decode(raw) {
        Ok(s) if !s.is_empty() => Ok(s),
        Ok(_) => Err(format!("empty {what}")),
        Err(e) => Err(e),
    }
}

fn bad(msg: &str) -> Resp {
    http::error(StatusCode::BAD_REQUEST, msg)
}

/// What to do with a `/api/kv` request.
pub enum KvRoute {
    /// A plain bucket: the store as is.
    Plain,
    /// A registered app's bucket: its handler runs ([`app_kv`]).
    App,
    /// Refused (the registry's own buckets).
    Refuse(Box<Resp>),
}

/// Whether a `/api/kv` request on `bucket` is for a registered app.
pub async fn kv_route(node: &Arc<Node>, method: &Method, bucket: &str) -> KvRoute {
    if (bucket == APPS_BUCKET || bucket == STATE_BUCKET) && method != Method::GET {
        return KvRoute::Refuse(Box::new(http::error(
            StatusCode::FORBIDDEN,
            &format!("bucket {bucket} is kept by the node; use /api/apps"),
        )));
    }
    if bucket == "default" || check_app_name(bucket).is_err() {
        return KvRoute::Plain;
    }
    match node.app_def(bucket).await {
        Ok(Some(_)) => KvRoute::App,
        Ok(None) => KvRoute::Plain,
        Err(e) => KvRoute::Refuse(Box::new(http::error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot tell whether {bucket} is an app: {e}"),
        ))),
    }
}

/// A client's event on `app/key`.
pub async fn app_kv(
    node: &Arc<Node>,
    method: Method,
    app: &str,
    key: &str,
    req: Request<Incoming>,
) -> Resp {
    let who = caller(&req);
    let op = match method {
        Method::GET => {
            let args = match query(&req, "args") {
                Ok(a) => a.unwrap_or_else(|| "{}".into()),
                Err(e) => return http::error(StatusCode::BAD_REQUEST, &e),
            };
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&args) {
                return http::error(StatusCode::BAD_REQUEST, &format!("args are not JSON: {e}"));
            }
            KeyOp::Read { args }
        }
        Method::PUT | Method::POST => {
            let body = match http::read_body(req, node.cfg.max_value).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let text = match std::str::from_utf8(&body) {
                Ok(t) => t.to_string(),
                Err(_) => {
                    return http::error(StatusCode::BAD_REQUEST, "an app's values are JSON text")
                }
            };
            if let Err(e) = serde_json::from_str::<serde_json::Value>(&text) {
                return http::error(
                    StatusCode::BAD_REQUEST,
                    &format!("an app's values are JSON: {e}"),
                );
            }
            KeyOp::Write { value: text }
        }
        Method::DELETE => KeyOp::Delete,
        m => {
            return http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{m} is not allowed on an app's key"),
            )
        }
    };
    answer(node.app_event(app, key, op, &who).await)
}

/// Routes under `/api/apps` and `/api/watch/`.
pub async fn route(node: &Arc<Node>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    match route_inner(node, req).await {
        Some(r) => r,
        None => http::error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

async fn route_inner(node: &Arc<Node>, req: Request<Incoming>) -> Option<Resp> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some(raw) = path.strip_prefix("/api/watch/") {
        if method != Method::GET {
            return Some(http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "watch with GET",
            ));
        }
        let key = match segment(raw, "key") {
            Ok(k) => k,
            Err(e) => return Some(bad(&e)),
        };
        let app = match query(&req, "bucket") {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Some(http::error(
                    StatusCode::BAD_REQUEST,
                    "say which app's key to watch: ?bucket=APP",
                ))
            }
            Err(e) => return Some(http::error(StatusCode::BAD_REQUEST, &e)),
        };
        return Some(match node.watch(&app, &key).await {
            Ok(body) => super::pubsub::sse_response(body),
            Err((status, msg)) => http::error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                &msg,
            ),
        });
    }
    let rest = path.strip_prefix("/api/apps")?;
    if rest.is_empty() || rest == "/" {
        return Some(match method {
            Method::GET => answer(node.list_apps().await),
            Method::POST | Method::PUT => {
                let body = match http::read_body(req, MAX_SPEC).await {
                    Ok(b) => b,
                    Err(r) => return Some(r),
                };
                match serde_json::from_slice::<AppSpec>(&body) {
                    Ok(spec) => answer(node.register_app(spec).await),
                    Err(e) => http::error(
                        StatusCode::BAD_REQUEST,
                        &format!("not an app definition: {e}"),
                    ),
                }
            }
            m => http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{m} is not allowed on /api/apps"),
            ),
        });
    }
    let rest = rest.strip_prefix('/')?;
    let (name_raw, tail) = match rest.split_once('/') {
        Some((n, t)) => (n, Some(t)),
        None => (rest, None),
    };
    let name = match segment(name_raw, "app name") {
        Ok(n) => n,
        Err(e) => return Some(bad(&e)),
    };
    Some(match tail {
        None => match method {
            Method::GET => match node.app_def_fresh(&name).await {
                Ok(Some(d)) => http::json(StatusCode::OK, &d.summary()),
                Ok(None) => http::error(StatusCode::NOT_FOUND, &format!("no app named {name:?}")),
                Err(e) => http::error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
            },
            Method::DELETE => {
                let owner = match query(&req, "owner") {
                    Ok(o) => o,
                    Err(e) => return Some(http::error(StatusCode::BAD_REQUEST, &e)),
                };
                answer(node.remove_app(&name, owner).await)
            }
            m => http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{m} is not allowed on an app"),
            ),
        },
        Some(t) => {
            if let Some(k) = t.strip_prefix("kv/") {
                let key = match segment(k, "key") {
                    Ok(k) => k,
                    Err(e) => return Some(bad(&e)),
                };
                app_kv(node, method, &name, &key, req).await
            } else if let Some(k) = t.strip_prefix("state/") {
                let key = match segment(k, "key") {
                    Ok(k) => k,
                    Err(e) => return Some(bad(&e)),
                };
                if method != Method::GET {
                    return Some(http::error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "a key's policy state is read-only",
                    ));
                }
                if let Err(e) = crate::store::entry::check_key(&key) {
                    return Some(http::error(StatusCode::BAD_REQUEST, &e.to_string()));
                }
                let ring = NodeId::for_key(&name, &key);
                answer(node.app_call(ring, AppCall::State { app: name, key }).await)
            } else {
                http::error(
                    StatusCode::NOT_FOUND,
                    &format!("no such endpoint: {path} (try /api/apps/APP/kv/KEY or /api/apps/APP/state/KEY)"),
                )
            }
        }
    })
}

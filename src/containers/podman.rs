//! The podman engine: libpod's REST API (v4) over podman's unix socket,
//! spoken with the crate's own hyper 1 on smol. One fresh connection per
//! call: these calls are on the cold path only (a warm invocation talks to
//! the container directly), and a local unix connect costs microseconds.

use super::conn::{self, Conn, ConnError, ReqBody};
use super::engine::*;
use bytes::Bytes;
use futures_lite::AsyncReadExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use smol::net::unix::UnixStream;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where rootful podman listens when `podman.socket` is enabled or
/// `scripts/setup-podman` started the service.
pub const DEFAULT_SOCKET: &str = "/run/podman/podman.sock";

const API: &str = "/v4.0.0/libpod";
/// Largest reply read from podman (inspect and list answers are a few KiB).
const MAX_REPLY: usize = 8 << 20;
const LOG_LIMIT: usize = 64 << 10;

pub struct Podman {
    socket: PathBuf,
    /// Bound on every call but image loads.
    timeout: Duration,
    /// Bound on an image load (a large archive takes a while to unpack).
    load_timeout: Duration,
}

impl Podman {
    pub fn new(socket: impl Into<PathBuf>) -> Podman {
        Podman {
            socket: socket.into(),
            timeout: Duration::from_secs(60),
            load_timeout: Duration::from_secs(600),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn unreachable(&self, err: impl ToString) -> EngineError {
        EngineError::Unreachable {
            socket: self.socket.display().to_string(),
            err: err.to_string(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
        content_type: Option<&str>,
        timeout: Duration,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), EngineError> {
        let target = format!("{API}{path}");
        let fut = async {
            let stream = UnixStream::connect(&self.socket)
                .await
                .map_err(|e| self.unreachable(e))?;
            let mut c = Conn::handshake(stream, "podman")
                .await
                .map_err(|e| self.unreachable(e))?;
            c.request(method, &target, body, content_type, limit)
                .await
                .map_err(|e| match e {
                    ConnError::TooLarge(n) => {
                        EngineError::Protocol(format!("reply to {path} larger than {n} bytes"))
                    }
                    e => self.unreachable(e),
                })
        };
        conn::within(timeout, fut)
            .await
            .unwrap_or(Err(EngineError::Timeout(timeout)))
    }

    /// A call whose success is any 2xx (or one of `also_ok`); other
    /// statuses become typed errors carrying podman's message.
    async fn expect(
        &self,
        method: Method,
        path: &str,
        body: ReqBody,
        content_type: Option<&str>,
        also_ok: &[u16],
    ) -> Result<Bytes, EngineError> {
        let (status, b) = self
            .call(method, path, body, content_type, self.timeout, MAX_REPLY)
            .await?;
        if status.is_success() || also_ok.contains(&status.as_u16()) {
            Ok(b)
        } else {
            Err(api_error(status, &b))
        }
    }

    async fn get_json(&self, path: &str) -> Result<Value, EngineError> {
        let b = self
            .expect(Method::GET, path, conn::empty(), None, &[])
            .await?;
        serde_json::from_slice(&b).map_err(|e| EngineError::Protocol(format!("{path}: {e}")))
    }

    async fn do_load(&self, archive: ImageSource) -> Result<Vec<String>, EngineError> {
        let body = match archive {
            ImageSource::Bytes(b) => conn::full(b),
            ImageSource::File(p) => {
                let f = smol::fs::File::open(&p)
                    .await
                    .map_err(|e| EngineError::Io {
                        path: p.display().to_string(),
                        err: e.to_string(),
                    })?;
                file_body(f)
            }
        };
        let (status, b) = self
            .call(
                Method::POST,
                "/images/load",
                body,
                Some("application/x-tar"),
                self.load_timeout,
                MAX_REPLY,
            )
            .await?;
        if !status.is_success() {
            let msg = message(&b);
            return Err(
                if status.is_server_error() || status == StatusCode::BAD_REQUEST {
                    EngineError::BadImage(msg)
                } else {
                    EngineError::Api {
                        status: status.as_u16(),
                        message: msg,
                    }
                },
            );
        }
        let v: Value = serde_json::from_slice(&b)
            .map_err(|e| EngineError::Protocol(format!("image load reply: {e}")))?;
        let names: Vec<String> = v
            .get("Names")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            return Err(EngineError::BadImage(
                "the archive holds no image".to_string(),
            ));
        }
        Ok(names)
    }

    async fn do_run(&self, spec: &ContainerSpec) -> Result<String, EngineError> {
        check_ref(&spec.image)?;
        let mut body = json!({
            "name": spec.name,
            "image": spec.image,
            "labels": spec.labels,
            "env": spec.env,
            "portmappings": [{
                "host_ip": "127.0.0.1",
                "container_port": spec.port,
                "host_port": 0,
                "protocol": "tcp",
            }],
            "stop_timeout": spec.stop_timeout.as_secs(),
        });
        if let Some(m) = spec.memory_bytes {
            body["resource_limits"] = json!({ "memory": { "limit": m } });
        }
        let b = self
            .expect(
                Method::POST,
                "/containers/create",
                conn::full(body.to_string()),
                Some("application/json"),
                &[],
            )
            .await?;
        let v: Value = serde_json::from_slice(&b)
            .map_err(|e| EngineError::Protocol(format!("create reply: {e}")))?;
        let id = v
            .get("Id")
            .and_then(Value::as_str)
            .filter(|id| is_id(id))
            .ok_or_else(|| EngineError::Protocol("create reply without an id".into()))?
            .to_string();
        if let Err(e) = self
            .expect(
                Method::POST,
                &format!("/containers/{id}/start"),
                conn::empty(),
                None,
                &[304],
            )
            .await
        {
            let _ = self.do_remove(&id).await;
            return Err(e);
        }
        Ok(id)
    }

    async fn do_remove(&self, id: &str) -> Result<(), EngineError> {
        check_name(id)?;
        match self
            .expect(
                Method::DELETE,
                &format!("/containers/{id}?force=true&timeout=0"),
                conn::empty(),
                None,
                &[],
            )
            .await
        {
            // Podman answers 200 with per-container reports; a failure is
            // an `Err` inside one of them.
            Ok(b) => match serde_json::from_slice::<Value>(&b) {
                Ok(v) => match v.as_array().and_then(|a| {
                    a.iter().find_map(|r| {
                        r.get("Err")
                            .and_then(Value::as_str)
                            .filter(|e| !e.is_empty())
                    })
                }) {
                    Some(err) if err.contains("no such container") => Ok(()),
                    Some(err) => Err(EngineError::Api {
                        status: 200,
                        message: format!("removing container {id}: {err}"),
                    }),
                    None => Ok(()),
                },
                Err(_) => Ok(()),
            },
            Err(EngineError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn do_list(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerInfo>, EngineError> {
        let filter: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let filters = json!({ "label": filter }).to_string();
        let v = self
            .get_json(&format!(
                "/containers/json?all=true&filters={}",
                crate::http::percent_encode(&filters)
            ))
            .await?;
        let arr = v
            .as_array()
            .ok_or_else(|| EngineError::Protocol("container list is not a list".into()))?;
        Ok(arr.iter().filter_map(parse_list_entry).collect())
    }
}

impl Engine for Podman {
    fn ping(&self) -> BoxFut<'_, Result<String, EngineError>> {
        Box::pin(async move {
            let v = self.get_json("/version").await?;
            v.get("Version")
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| EngineError::Protocol("version reply without Version".into()))
        })
    }

    fn image_exists<'a>(&'a self, reference: &'a str) -> BoxFut<'a, Result<bool, EngineError>> {
        Box::pin(async move {
            check_ref(reference)?;
            match self
                .expect(
                    Method::GET,
                    &format!("/images/{reference}/exists"),
                    conn::empty(),
                    None,
                    &[],
                )
                .await
            {
                Ok(_) => Ok(true),
                Err(EngineError::NotFound(_)) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn load_image(&self, archive: ImageSource) -> BoxFut<'_, Result<Vec<String>, EngineError>> {
        Box::pin(self.do_load(archive))
    }

    fn tag_image<'a>(
        &'a self,
        image: &'a str,
        reference: &'a str,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            check_ref(image)?;
            check_ref(reference)?;
            let (repo, tag) = split_ref(reference);
            self.expect(
                Method::POST,
                &format!(
                    "/images/{image}/tag?repo={}&tag={}",
                    crate::http::percent_encode(repo),
                    crate::http::percent_encode(tag)
                ),
                conn::empty(),
                None,
                &[],
            )
            .await
            .map(|_| ())
        })
    }

    fn untag_image<'a>(&'a self, reference: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            check_ref(reference)?;
            let (repo, tag) = split_ref(reference);
            self.expect(
                Method::POST,
                &format!(
                    "/images/{reference}/untag?repo={}&tag={}",
                    crate::http::percent_encode(repo),
                    crate::http::percent_encode(tag)
                ),
                conn::empty(),
                None,
                &[],
            )
            .await
            .map(|_| ())
        })
    }

    fn remove_image<'a>(&'a self, reference: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            check_ref(reference)?;
            self.expect(
                Method::DELETE,
                &format!("/images/{reference}"),
                conn::empty(),
                None,
                &[],
            )
            .await
            .map(|_| ())
        })
    }

    fn run<'a>(&'a self, spec: &'a ContainerSpec) -> BoxFut<'a, Result<String, EngineError>> {
        Box::pin(self.do_run(spec))
    }

    fn inspect<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<ContainerInfo, EngineError>> {
        Box::pin(async move {
            check_name(id)?;
            let v = self.get_json(&format!("/containers/{id}/json")).await?;
            parse_inspect(&v)
                .ok_or_else(|| EngineError::Protocol("inspect reply without Id".into()))
        })
    }

    fn logs<'a>(&'a self, id: &'a str, tail: usize) -> BoxFut<'a, Result<String, EngineError>> {
        Box::pin(async move {
            check_name(id)?;
            let (status, b) = self
                .call(
                    Method::GET,
                    &format!("/containers/{id}/logs?stdout=true&stderr=true&tail={tail}"),
                    conn::empty(),
                    None,
                    self.timeout,
                    LOG_LIMIT,
                )
                .await?;
            if !status.is_success() {
                return Err(api_error(status, &b));
            }
            Ok(demux_logs(&b))
        })
    }

    fn stop<'a>(&'a self, id: &'a str, timeout: Duration) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            check_name(id)?;
            self.expect(
                Method::POST,
                &format!("/containers/{id}/stop?timeout={}", timeout.as_secs()),
                conn::empty(),
                None,
                &[304],
            )
            .await
            .map(|_| ())
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(self.do_remove(id))
    }

    fn list<'a>(
        &'a self,
        labels: &'a [(&'a str, &'a str)],
    ) -> BoxFut<'a, Result<Vec<ContainerInfo>, EngineError>> {
        Box::pin(self.do_list(labels))
    }
}

/// Streams a file as a request body, 64 KiB at a time, so a large image
/// archive never sits whole in memory.
fn file_body(file: smol::fs::File) -> ReqBody {
    let stream = futures_lite::stream::unfold(Some(file), |state| async move {
        let mut f = state?;
        let mut buf = vec![0u8; 64 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Frame::data(Bytes::from(buf))), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    // StreamBody is not Sync; wrap it so the body type stays one.
    BodyExt::boxed_unsync(StreamBody::new(stream))
}

fn message(b: &[u8]) -> String {
    serde_json::from_slice::<Value>(b)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(String::from))
        .unwrap_or_else(|| {
            let s = String::from_utf8_lossy(b);
            s.trim().chars().take(500).collect()
        })
}

fn api_error(status: StatusCode, b: &[u8]) -> EngineError {
    let message = message(b);
    if status == StatusCode::NOT_FOUND {
        EngineError::NotFound(message)
    } else {
        EngineError::Api {
            status: status.as_u16(),
            message,
        }
    }
}

/// Container ids and names go into request paths: only the characters
/// podman allows in them.
fn check_name(s: &str) -> Result<(), EngineError> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(EngineError::Protocol(format!(
            "{s:?} is not a container id or name"
        )))
    }
}

/// Image references (`host/repo:tag`, ids, digests) go into request paths.
fn check_ref(s: &str) -> Result<(), EngineError> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-/:@".contains(&c))
        && !s.contains("..");
    if ok {
        Ok(())
    } else {
        Err(EngineError::Protocol(format!(
            "{s:?} is not an image reference"
        )))
    }
}

fn is_id(s: &str) -> bool {
    check_name(s).is_ok()
}

/// `host/repo:tag` into (`host/repo`, `tag`); no tag means `latest`.
fn split_ref(r: &str) -> (&str, &str) {
    let slash = r.rfind('/').map(|i| i + 1).unwrap_or(0);
    match r[slash..].rfind(':') {
        Some(i) => (&r[..slash + i], &r[slash + i + 1..]),
        None => (r, "latest"),
    }
}

fn labels_of(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn parse_inspect(v: &Value) -> Option<ContainerInfo> {
    let id = v.get("Id")?.as_str()?.to_string();
    let state = v.get("State");
    let status = state
        .and_then(|s| s.get("Status"))
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    let ns = v.get("NetworkSettings");
    let host_port = ns
        .and_then(|n| n.get("Ports"))
        .and_then(Value::as_object)
        .and_then(|ports| {
            ports.values().find_map(|bindings| {
                bindings.as_array()?.iter().find_map(|b| {
                    b.get("HostPort")
                        .and_then(Value::as_str)
                        .and_then(|p| p.parse::<u16>().ok())
                        .filter(|p| *p != 0)
                })
            })
        });
    let ip = ns
        .and_then(|n| n.get("IPAddress"))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok());
    Some(ContainerInfo {
        id,
        name: v
            .get("Name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        state: ContainerState::parse(status),
        exit_code: state
            .and_then(|s| s.get("ExitCode"))
            .and_then(Value::as_i64),
        oom_killed: state
            .and_then(|s| s.get("OOMKilled"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        memory_bytes: v
            .get("HostConfig")
            .and_then(|h| h.get("Memory"))
            .and_then(Value::as_u64)
            .filter(|m| *m > 0),
        host_port,
        ip,
        labels: labels_of(v.get("Config").and_then(|c| c.get("Labels"))),
    })
}

fn parse_list_entry(v: &Value) -> Option<ContainerInfo> {
    let id = v.get("Id")?.as_str()?.to_string();
    let host_port = v.get("Ports").and_then(Value::as_array).and_then(|a| {
        a.iter().find_map(|p| {
            p.get("host_port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
        })
    });
    Some(ContainerInfo {
        id,
        name: v
            .get("Names")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        state: ContainerState::parse(v.get("State").and_then(Value::as_str).unwrap_or("")),
        exit_code: v.get("ExitCode").and_then(Value::as_i64),
        oom_killed: false,
        memory_bytes: None,
        host_port,
        ip: None,
        labels: labels_of(v.get("Labels")),
    })
}

/// Podman multiplexes a non-tty container's log stream into frames of
/// `[stream, 0, 0, 0, len u32 BE]` + payload; plain text is passed through.
pub(crate) fn demux_logs(b: &[u8]) -> String {
    let framed = b.len() >= 8 && b[0] <= 2 && b[1..4] == [0, 0, 0];
    if !framed {
        return String::from_utf8_lossy(b).into_owned();
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i + 8 <= b.len() {
        let len = u32::from_be_bytes([b[i + 4], b[i + 5], b[i + 6], b[i + 7]]) as usize;
        let end = (i + 8).saturating_add(len).min(b.len());
        out.extend_from_slice(&b[i + 8..end]);
        i = end;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_split_and_check() {
        assert_eq!(
            split_ref("localhost/capy-fn:abc"),
            ("localhost/capy-fn", "abc")
        );
        assert_eq!(split_ref("host:5000/repo"), ("host:5000/repo", "latest"));
        assert_eq!(split_ref("repo:1"), ("repo", "1"));
        assert!(check_ref("localhost/capy-fn:abc").is_ok());
        assert!(check_ref("../../containers/x").is_err());
        assert!(check_ref("a?b").is_err());
        assert!(check_name("abc123_x.y-z").is_ok());
        assert!(check_name("a/b").is_err());
        assert!(check_name("").is_err());
    }

    #[test]
    fn log_frames_are_joined() {
        let mut b = vec![1, 0, 0, 0, 0, 0, 0, 6];
        b.extend_from_slice(b"hello\n");
        b.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 4]);
        b.extend_from_slice(b"err\n");
        assert_eq!(demux_logs(&b), "hello\nerr\n");
        assert_eq!(demux_logs(b"plain text"), "plain text");
        // A frame claiming more than there is stops at the end.
        assert_eq!(demux_logs(&[1, 0, 0, 0, 0, 0, 1, 0, b'x']), "x");
    }

    #[test]
    fn inspect_reply_parses() {
        let v = json!({
            "Id": "abc", "Name": "n",
            "State": {"Status": "exited", "ExitCode": 3, "OOMKilled": true},
            "NetworkSettings": {"IPAddress": "10.88.0.2",
                "Ports": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "40931"}]}},
            "Config": {"Labels": {"capy.node": "x"}},
            "HostConfig": {"Memory": 33554432}
        });
        let i = parse_inspect(&v).unwrap();
        assert_eq!(i.state, ContainerState::Exited);
        assert_eq!(i.exit_code, Some(3));
        assert!(i.oom_killed);
        assert_eq!(i.memory_bytes, Some(32 << 20));
        assert_eq!(i.host_port, Some(40931));
        assert_eq!(i.ip, Some("10.88.0.2".parse().unwrap()));
        assert_eq!(i.labels.get("capy.node").map(String::as_str), Some("x"));
        assert!(parse_inspect(&json!({"State": {}})).is_none());
    }
}

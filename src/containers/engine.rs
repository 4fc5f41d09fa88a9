//! The container engine boundary: the few operations capy needs from podman,
//! object-safe so the function host holds an `Arc<dyn Engine>` and tests or
//! another engine can stand in.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Label naming the function a container serves: `APP/FN`.
pub const LABEL_FUNCTION: &str = "capy.function";
/// Label naming the node that started a container, so a restarted node finds
/// its leftovers.
pub const LABEL_NODE: &str = "capy.node";
/// Label naming the image reference the container runs.
pub const LABEL_IMAGE: &str = "capy.image";

/// An image archive (`podman save` / `docker save` format, possibly
/// compressed) in memory or in a file.
#[derive(Clone, Debug)]
pub enum ImageSource {
    Bytes(Bytes),
    File(PathBuf),
}

impl From<Vec<u8>> for ImageSource {
    fn from(v: Vec<u8>) -> Self {
        ImageSource::Bytes(v.into())
    }
}
impl From<Bytes> for ImageSource {
    fn from(v: Bytes) -> Self {
        ImageSource::Bytes(v)
    }
}
impl From<PathBuf> for ImageSource {
    fn from(v: PathBuf) -> Self {
        ImageSource::File(v)
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    /// Memory limit in bytes (podman's minimum is 6 MiB).
    pub memory_bytes: Option<u64>,
    /// Container port published on 127.0.0.1 at a port the engine picks.
    pub port: u16,
    /// Grace period between SIGTERM and SIGKILL on stop.
    pub stop_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running,
    Paused,
    Exited,
    Stopped,
    Other(String),
}

impl ContainerState {
    pub fn parse(s: &str) -> ContainerState {
        match s.to_ascii_lowercase().as_str() {
            "created" | "configured" | "initialized" => ContainerState::Created,
            "running" => ContainerState::Running,
            "paused" => ContainerState::Paused,
            "exited" => ContainerState::Exited,
            "stopped" => ContainerState::Stopped,
            other => ContainerState::Other(other.to_string()),
        }
    }

    /// Exited or stopped: it will not answer again.
    pub fn is_down(&self) -> bool {
        matches!(self, ContainerState::Exited | ContainerState::Stopped)
    }
}

/// What the engine knows about one container.
#[derive(Clone, Debug)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub state: ContainerState,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    /// Memory limit in bytes, when known and set.
    pub memory_bytes: Option<u64>,
    /// Host port the container's port is published on (127.0.0.1).
    pub host_port: Option<u16>,
    /// The container's own address on the engine's network, if it has one.
    pub ip: Option<IpAddr>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach podman at {socket}: {err} (is `podman system service` running? see scripts/setup-podman)")]
    Unreachable { socket: String, err: String },
    #[error("podman has no {0}")]
    NotFound(String),
    #[error("podman refused: {message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("podman could not load the image archive: {0}")]
    BadImage(String),
    #[error("podman did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply from podman: {0}")]
    Protocol(String),
    #[error("reading {path}: {err}")]
    Io { path: String, err: String },
}

/// The operations capy needs from a container engine. All calls are bounded
/// in time by the implementation.
pub trait Engine: Send + Sync + 'static {
    /// The engine's version; fails if it cannot be reached.
    fn ping(&self) -> BoxFut<'_, Result<String, EngineError>>;
    fn image_exists<'a>(&'a self, reference: &'a str) -> BoxFut<'a, Result<bool, EngineError>>;
    /// Loads an archive; answers the names (or ids) of the images in it.
    fn load_image(&self, archive: ImageSource) -> BoxFut<'_, Result<Vec<String>, EngineError>>;
    /// Gives `image` the extra name `reference` (`repo:tag`).
    fn tag_image<'a>(
        &'a self,
        image: &'a str,
        reference: &'a str,
    ) -> BoxFut<'a, Result<(), EngineError>>;
    /// Takes the name `reference` off its image; the image itself stays
    /// (unlike `remove_image`, this never deletes an image another name
    /// is being put on at the same moment).
    fn untag_image<'a>(&'a self, reference: &'a str) -> BoxFut<'a, Result<(), EngineError>>;
    /// Removes the name `reference`; the image goes with its last name,
    /// unless a container still uses it.
    fn remove_image<'a>(&'a self, reference: &'a str) -> BoxFut<'a, Result<(), EngineError>>;
    /// Creates and starts a container; answers its id.
    fn run<'a>(&'a self, spec: &'a ContainerSpec) -> BoxFut<'a, Result<String, EngineError>>;
    fn inspect<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<ContainerInfo, EngineError>>;
    /// The last `tail` lines the container printed (stdout and stderr).
    fn logs<'a>(&'a self, id: &'a str, tail: usize) -> BoxFut<'a, Result<String, EngineError>>;
    fn stop<'a>(&'a self, id: &'a str, timeout: Duration) -> BoxFut<'a, Result<(), EngineError>>;
    /// Kills (if running) and removes; a container already gone is fine.
    fn remove<'a>(&'a self, id: &'a str) -> BoxFut<'a, Result<(), EngineError>>;
    /// Containers (running or not) carrying every one of these labels.
    fn list<'a>(
        &'a self,
        labels: &'a [(&'a str, &'a str)],
    ) -> BoxFut<'a, Result<Vec<ContainerInfo>, EngineError>>;
}

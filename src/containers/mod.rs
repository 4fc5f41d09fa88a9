//! Containers: podman control for function containers.
//!
//! Owns the container engine boundary ([`Engine`], with the podman
//! implementation [`Podman`]) and the [`FunctionHost`] the node runtime calls
//! to invoke, pre-warm and retire functions: cold and warm starts, keep-alive,
//! per-app counters. It may call `http` (helpers) and `id`; it never touches
//! the store or the overlay: image archives come in through a closure the
//! node passes, fetched from wherever the node keeps them.
//!
//! Functions speak the OpenWhisk action runtime interface: the container
//! listens on port 8080; capy sends `POST /init` once (`{"value": {"name",
//! "main", "code", "binary", "env"}}`, any 2xx means ready) and then one
//! `POST /run` per invocation (`{"value": INPUT, "action_name", "namespace",
//! "activation_id", "deadline"}`); a 2xx JSON reply is the output, a non-2xx
//! reply `{"error": MSG}` is the function's own error.
//! So existing OpenWhisk runtimes (and `tests/fn-runtime`) work unchanged.
//!
//! Podman is reached over its REST API (libpod v4) on a unix socket, default
//! the rootful `/run/podman/podman.sock` (`systemctl enable --now
//! podman.socket`, or `scripts/setup-podman` on machines without systemd).
//! A node without podman keeps running; the host answers
//! [`FnError::Unavailable`] with the reason.
//!
//! Why not the `podman-api` crate: it works with podman 4.3 here (ping,
//! version, list, image exists, create, start, inspect, delete and load all
//! answered), but it sits on tokio and hyper 0.14, so it needs a second
//! runtime (async-compat's tokio thread) beside the node's one smol executor,
//! and 106 more crates. Measured on a minimal x86_64 release binary with
//! capy's profile (opt-level z, LTO, strip): 597,288 bytes without it,
//! 1,082,792 with it: +474 KiB for the dozen REST calls in `podman.rs`,
//! which take ~650 lines on the hyper 1 client capy already has. Doing them
//! directly also bounds every reply and streams image archives from files.
//! This whole module (engine, host, bench) adds 282,000 bytes to capy's
//! x86_64 release binary once the node calls it (4,350,616 -> 4,632,616).

mod bench;
mod conn;
mod engine;
mod host;
mod podman;
#[doc(hidden)]
pub mod testenv;

#[cfg(test)]
mod tests;

pub use bench::{bench, BenchConfig, BenchReport, Percentiles};
pub use engine::{
    BoxFut, ContainerInfo, ContainerSpec, ContainerState, Engine, EngineError, ImageSource,
    LABEL_FUNCTION, LABEL_IMAGE, LABEL_NODE,
};
pub use host::run_envelope;
pub use host::{
    AppStats, ContainerStatus, FnError, FnSpec, FunctionHost, HostConfig, Invocation, KeepAlive,
    Timings, IMAGE_REPO,
};
pub use podman::{Podman, DEFAULT_SOCKET};

pub(crate) use host::check_archive_magic;
pub use host::tar_entry;

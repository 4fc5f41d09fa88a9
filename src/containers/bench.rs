//! `capy bench fn`: cold-start latency with the image already in podman, cold
//! start including loading the image archive, and the overhead a warm
//! invocation through the host adds over calling the container's `/run`
//! directly on a kept-alive connection.

use super::conn::{self, Conn};
use super::engine::{Engine, ImageSource};
use super::host::{FnError, FnSpec, FunctionHost, HostConfig, KeepAlive};
use hyper::Method;
use serde::Serialize;
use smol::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Cold starts measured, each way.
    pub cold_runs: usize,
    /// Warm calls measured, each way (host and direct, interleaved).
    pub warm_calls: usize,
    /// Node name on the bench's containers (`capy.node` label).
    pub node: String,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            cold_runs: 5,
            warm_calls: 300,
            node: format!("bench-{}", std::process::id()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(v: Vec<f64>) -> Percentiles {
        use crate::stats::{percentile, sorted};
        let v = sorted(v);
        Percentiles {
            n: v.len(),
            p50: percentile(&v, 0.50),
            p99: percentile(&v, 0.99),
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub podman: String,
    pub image: String,
    /// Invoke with no container, image already in podman.
    pub cold_start_local_ms: Percentiles,
    /// Invoke with no container and no image: the archive is loaded first.
    pub cold_start_with_load_ms: Percentiles,
    /// Warm invoke through the host, as its caller sees it.
    pub warm_host_us: Percentiles,
    /// The same `/run` sent straight to the container.
    pub warm_direct_us: Percentiles,
    /// `warm_host_us - warm_direct_us` at p50 and p99.
    pub warm_overhead_p50_us: f64,
    pub warm_overhead_p99_us: f64,
}

/// Runs the measurement on `engine` with the function image `archive` (the
/// test image of `scripts/build-fn-image`, or any OpenWhisk-style image
/// that echoes its input). It removes and reloads that image, so run it
/// where no container uses it; the load figure is a full load only if no
/// other name points to the same image (else podman keeps its layers).
pub async fn bench(
    engine: Arc<dyn Engine>,
    archive: ImageSource,
    cfg: BenchConfig,
) -> Result<BenchReport, FnError> {
    let version = engine
        .ping()
        .await
        .map_err(|e| FnError::Unavailable(e.to_string()))?;
    let image = match &archive {
        ImageSource::Bytes(b) => FnSpec::image_ref_for(b),
        ImageSource::File(p) => {
            let p = p.clone();
            smol::unblock(move || FnSpec::image_ref_for_file(&p))
                .await
                .map_err(|e| FnError::ImageUnavailable {
                    function: "bench/echo".into(),
                    reason: e.to_string(),
                })?
        }
    };
    let mut spec = FnSpec::new("bench", "echo", &image);
    spec.keep_alive = KeepAlive::Managed;
    spec.timeout = Duration::from_secs(30);
    let host = FunctionHost::new(
        Some(engine.clone()),
        HostConfig {
            node: cfg.node.clone(),
            ..HostConfig::default()
        },
    );
    let r = measure(&host, &engine, &spec, &archive, &cfg).await;
    // Leave nothing running, whatever happened.
    host.undeploy(&spec.app, &spec.name).await;
    let (local, with_load, via_host, raw) = r?;
    let warm_host_us = Percentiles::of(via_host);
    let warm_direct_us = Percentiles::of(raw);
    Ok(BenchReport {
        podman: version,
        image,
        cold_start_local_ms: Percentiles::of(local),
        cold_start_with_load_ms: Percentiles::of(with_load),
        warm_overhead_p50_us: warm_host_us.p50 - warm_direct_us.p50,
        warm_overhead_p99_us: warm_host_us.p99 - warm_direct_us.p99,
        warm_host_us,
        warm_direct_us,
    })
}

type Samples = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// Cold (local), cold (with load), warm via host, warm direct.
async fn measure(
    host: &FunctionHost,
    engine: &Arc<dyn Engine>,
    spec: &FnSpec,
    archive: &ImageSource,
    cfg: &BenchConfig,
) -> Result<Samples, FnError> {
    let image = &spec.image;
    let load = || {
        let a = archive.clone();
        async move { Ok::<_, FnError>(a) }
    };
    let input = |i: usize| serde_json::json!({ "action": "echo", "i": i });

    let mut with_load = Vec::new();
    for i in 0..cfg.cold_runs {
        host.undeploy(&spec.app, &spec.name).await;
        let _ = engine.remove_image(image).await;
        let t = Instant::now();
        let inv = host.invoke(spec, input(i), load).await?;
        with_load.push(t.elapsed().as_secs_f64() * 1e3);
        if inv.timings.image_load_us.is_none() || !inv.cold {
            return Err(FnError::Busy {
                function: spec.id(),
                reason: "the image could not be removed before a load measurement (is a container using it?)".into(),
            });
        }
    }
    let mut local = Vec::new();
    for i in 0..cfg.cold_runs {
        host.undeploy(&spec.app, &spec.name).await;
        let t = Instant::now();
        let inv = host.invoke(spec, input(i), load).await?;
        local.push(t.elapsed().as_secs_f64() * 1e3);
        if !inv.cold || inv.timings.image_load_us.is_some() {
            return Err(FnError::Busy {
                function: spec.id(),
                reason: "a local cold-start measurement did not start cold from a present image"
                    .into(),
            });
        }
    }

    // Warm: one idle container; the direct client talks to the same one.
    host.invoke(spec, input(0), load).await?;
    let port = host
        .status()
        .iter()
        .find_map(|c| c.host_port)
        .ok_or_else(|| FnError::Crashed {
            function: spec.id(),
            reason: "no warm container after an invocation".into(),
        })?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let direct_err = |e: String| FnError::Crashed {
        function: spec.id(),
        reason: format!("direct call: {e}"),
    };
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| direct_err(e.to_string()))?;
    let _ = s.set_nodelay(true);
    let mut direct = Conn::handshake(s, &addr.to_string())
        .await
        .map_err(|e| direct_err(e.to_string()))?;
    let mut via_host = Vec::with_capacity(cfg.warm_calls);
    let mut raw = Vec::with_capacity(cfg.warm_calls);
    for i in 0..cfg.warm_calls {
        let t = Instant::now();
        let inv = host.invoke(spec, input(i), load).await?;
        via_host.push(t.elapsed().as_secs_f64() * 1e6);
        if inv.cold {
            return Err(direct_err("a warm call started a container".into()));
        }
        let body = serde_json::to_vec(&serde_json::json!({ "value": input(i) }))
            .map_err(|e| direct_err(e.to_string()))?;
        let t = Instant::now();
        let (status, _) = direct
            .request(
                Method::POST,
                "/run",
                conn::full(body),
                Some("application/json"),
                1 << 20,
            )
            .await
            .map_err(|e| direct_err(e.to_string()))?;
        raw.push(t.elapsed().as_secs_f64() * 1e6);
        if !status.is_success() {
            return Err(direct_err(format!("HTTP {status}")));
        }
    }
    Ok((local, with_load, via_host, raw))
}

#[cfg(test)]
mod tests {
    use super::Percentiles;

    #[test]
    fn percentiles_pick_ranks() {
        let p = Percentiles::of((1..=100).rev().map(f64::from).collect());
        assert_eq!(
            (p.n, p.p50, p.p99, p.min, p.max),
            (100, 51.0, 99.0, 1.0, 100.0)
        );
        let e = Percentiles::of(Vec::new());
        assert_eq!((e.n, e.p50), (0, 0.0));
    }
}

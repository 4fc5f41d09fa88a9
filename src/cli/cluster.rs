//! A cluster of real `capy` processes on loopback, each with its own
//! CA-issued certificate and data dir: what `capy bench` measures and what
//! the integration tests drive. Nodes are separate processes so a test can
//! SIGKILL one and restart it from its data dir.

use crate::http::{self, Reply};
use hyper::Method;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LocalNode {
    pub name: String,
    pub dir: PathBuf,
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub join: Option<SocketAddr>,
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

impl LocalNode {
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

pub struct LocalCluster {
    pub bin: PathBuf,
    pub root: PathBuf,
    pub nodes: Vec<LocalNode>,
    /// Keep the temporary directory alive as long as the cluster.
    _tmp: Option<tempdir::TempDir>,
}

/// A tiny self-deleting temporary directory (the library cannot depend on
/// dev-dependencies).
pub mod tempdir {
    use std::path::{Path, PathBuf};
    pub struct TempDir(PathBuf);
    impl TempDir {
        pub fn new(prefix: &str) -> std::io::Result<TempDir> {
            let base = std::env::temp_dir();
            for i in 0..1000u32 {
                let p = base.join(format!("{prefix}-{}-{i}", std::process::id()));
                match std::fs::create_dir(&p) {
                    Ok(()) => return Ok(TempDir(p)),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(std::io::Error::other("no free temporary directory name"))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            if std::env::var_os("CAPY_KEEP_TMP").is_none() {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}

/// A port free for both UDP and TCP right now, chosen below the kernel's
/// ephemeral range (32768+) so that outgoing connections of other processes
/// do not take it while a node is down between a kill and its restart.
pub fn free_port() -> std::io::Result<u16> {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(20_000..32_000);
        let Ok(_u) = UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free port"))
}

fn run_ok(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

impl LocalCluster {
    /// Creates a CA and `n` node dirs with certificates (nothing started).
    pub fn prepare(bin: &Path, n: usize, max_vnodes: u32) -> Result<LocalCluster, String> {
        let tmp = tempdir::TempDir::new("capy-cluster").map_err(|e| e.to_string())?;
        let root = tmp.path().to_path_buf();
        let mut c = LocalCluster {
            bin: bin.to_path_buf(),
            root: root.clone(),
            nodes: Vec::new(),
            _tmp: Some(tmp),
        };
        run_ok(
            Command::new(bin)
                .args(["ca", "init", "--dir"])
                .arg(root.join("ca")),
        )?;
        for _ in 0..n {
            c.add_node(max_vnodes, "default")?;
        }
        Ok(c)
    }

    /// Issues a certificate for one more node (not started).
    pub fn add_node(&mut self, max_vnodes: u32, zone: &str) -> Result<usize, String> {
        let i = self.nodes.len();
        let name = format!("n{i}");
        let dir = self.root.join(&name);
        run_ok(
            Command::new(&self.bin)
                .args(["ca", "issue", "--dir"])
                .arg(self.root.join("ca"))
                .args(["--name", &name, "--zone", zone])
                .args(["--max-vnodes", &max_vnodes.to_string()])
                .arg("--out")
                .arg(&dir),
        )?;
        let quic = SocketAddr::from(([127, 0, 0, 1], free_port().map_err(|e| e.to_string())?));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port().map_err(|e| e.to_string())?));
        let join = self.nodes.first().map(|n| n.quic);
        self.nodes.push(LocalNode {
            name,
            dir,
            quic,
            http,
            join,
            extra_args: Vec::new(),
            child: None,
        });
        Ok(i)
    }

    /// Starts node `i` (again, after a kill) with its data dir.
    pub fn start(&mut self, i: usize) -> Result<(), String> {
        let bin = self.bin.clone();
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.dir.join("node.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--data")
            .arg(&n.dir)
            .args(["--listen", &n.quic.to_string()])
            .args(["--http", &n.http.to_string()])
            .args(&n.extra_args)
            .env(
                "CAPY_LOG",
                std::env::var("CAPY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(j) = n.join {
            cmd.args(["--join", &j.to_string()]);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", n.name))?;
        n.child = Some(child);
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.start(i)?;
            // The first node must be up before the others join through it.
            if i == 0 {
                self.wait_http(0, Duration::from_secs(20))?;
            }
        }
        for i in 0..self.nodes.len() {
            self.wait_http(i, Duration::from_secs(20))?;
        }
        Ok(())
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM to every running node at once, then SIGKILL to those still
    /// running after `grace`.
    pub fn stop_all(&mut self, grace: Duration) {
        let mut running: Vec<Child> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .collect();
        for c in &running {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            running.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
            if running.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for mut c in running {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn http(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, String> {
        let url = format!("{}{}", self.nodes[i].url(), path);
        smol::block_on(http::call(
            &url,
            method,
            body.map(|b| (b, "application/octet-stream")),
            Duration::from_secs(30),
        ))
        .map_err(|e| e.to_string())
    }

    pub fn status(&self, i: usize) -> Result<serde_json::Value, String> {
        let r = self.http(i, Method::GET, "/api/status", None)?;
        serde_json::from_slice(&r.body).map_err(|e| e.to_string())
    }

    /// Waits until node `i` answers its status API.
    pub fn wait_http(&self, i: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status(i).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {} did not answer within {timeout:?}; log:\n{}",
                    self.nodes[i].name,
                    self.log_tail(i, 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every running node reports it joined and its leaf set
    /// holds all other running nodes' vnodes (for small clusters) or is full.
    pub fn wait_converged(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .collect();
        loop {
            let mut ok = true;
            let mut total_vnodes = 0u64;
            let mut views = Vec::new();
            for &i in &running {
                match self.status(i) {
                    Ok(s) => {
                        total_vnodes += s["vnodes"].as_array().map(|a| a.len()).unwrap_or(0) as u64;
                        views.push(s);
                    }
                    Err(_) => ok = false,
                }
            }
            if ok {
                for s in &views {
                    let joined = s["joined"].as_bool().unwrap_or(false);
                    let own = s["vnodes"].as_array().map(|a| a.len()).unwrap_or(0) as u64;
                    let leaf = s["leaf_set_size"].as_u64().unwrap_or(0);
                    let cap = s["leaf_set_capacity"].as_u64().unwrap_or(24);
                    let want = (total_vnodes - own).min(cap);
                    if !joined || leaf < want {
                        ok = false;
                    }
                }
            }
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("cluster did not converge within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(self.nodes[i].dir.join("node.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for LocalCluster {
    /// Graceful, so nodes remove their function containers; a test that
    /// wants a crash calls `kill` itself.
    fn drop(&mut self) {
        self.stop_all(Duration::from_secs(10));
    }
}

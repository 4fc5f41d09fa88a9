//! Podman for capy's own tests, unit and integration alike: a socket that
//! answers (`CAPY_PODMAN_SOCKET`, default the rootful one) and the test
//! function image archive (`CAPY_FN_IMAGE`), made with the repository's
//! `scripts/setup-podman` and `scripts/build-fn-image` when missing. If
//! podman cannot be made to answer, the tests that ask fail: they are never
//! skipped. Not used by the node itself.

use super::{Engine, Podman, DEFAULT_SOCKET};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What the container tests share.
pub struct TestEnv {
    pub socket: PathBuf,
    /// The test image archive (`podman save` format) and its bytes.
    pub archive_path: PathBuf,
    pub archive: Vec<u8>,
}

/// Runs `scripts/NAME ARGS` of this checkout; its trimmed stdout.
pub fn run_script(name: &str, args: &[&str]) -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    let out = std::process::Command::new(script)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("running scripts/{name}: {e}"))?;
    if !out.status.success() {
        return Err(format!("scripts/{name} failed: {}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn setup() -> Result<TestEnv, String> {
    let socket = PathBuf::from(
        std::env::var("CAPY_PODMAN_SOCKET").unwrap_or_else(|_| DEFAULT_SOCKET.to_string()),
    );
    let ping = |s: &Path| smol::block_on(Podman::new(s).ping());
    if ping(&socket).is_err() {
        run_script("setup-podman", &[&socket.display().to_string()])?;
        ping(&socket).map_err(|e| format!("podman still unreachable after setup: {e}"))?;
    }
    let archive_path = match std::env::var("CAPY_FN_IMAGE") {
        Ok(p) => PathBuf::from(p),
        Err(_) => PathBuf::from(run_script("build-fn-image", &[])?),
    };
    let archive = std::fs::read(&archive_path)
        .map_err(|e| format!("reading the function image {}: {e}", archive_path.display()))?;
    Ok(TestEnv {
        socket,
        archive_path,
        archive,
    })
}

/// Sets podman up once per test process; panics (failing the test) with
/// the reason when it cannot.
pub fn test_env() -> &'static TestEnv {
    static ENV: OnceLock<Result<TestEnv, String>> = OnceLock::new();
    match ENV.get_or_init(setup) {
        Ok(e) => e,
        Err(e) => panic!("podman is needed for these tests and could not be set up: {e}"),
    }
}

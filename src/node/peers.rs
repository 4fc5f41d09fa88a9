//! Remembered peers: the leaf set's addresses, saved in the data dir so a
//! node that restarts (after a crash or a reboot) rejoins without `--join`.

use std::net::SocketAddr;
use std::path::Path;

const FILE: &str = "peers.json";
/// Never read back more than this many addresses.
const MAX: usize = 64;

pub fn load(dir: &Path) -> Vec<SocketAddr> {
    let path = dir.join(FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    match serde_json::from_str::<Vec<SocketAddr>>(&text) {
        Ok(mut v) => {
            v.truncate(MAX);
            v
        }
        Err(e) => {
            tracing::warn!("{}: ignoring unreadable peer list: {e}", path.display());
            Vec::new()
        }
    }
}

/// Writes atomically (temp file + rename) so a crash never leaves half a list.
pub fn save(dir: &Path, peers: &[SocketAddr]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    let list: Vec<&SocketAddr> = peers.iter().take(MAX).collect();
    let body = serde_json::to_vec(&list).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, dir.join(FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_garbage() {
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path()).is_empty());
        let a: Vec<SocketAddr> = vec!["127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap()];
        save(d.path(), &a).unwrap();
        assert_eq!(load(d.path()), a);
        std::fs::write(d.path().join(FILE), b"{not json").unwrap();
        assert!(load(d.path()).is_empty());
    }
}

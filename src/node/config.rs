//! Node configuration: built-in defaults, then a board profile, then the
//! TOML config file, then command-line flags, each overriding the one before.

use serde::{Deserialize, Deserializer, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default UDP port of the cluster's QUIC traffic.
pub const DEFAULT_QUIC_PORT: u16 = 7071;
/// Default TCP port of the local HTTP status page and API.
pub const DEFAULT_HTTP_PORT: u16 = 7070;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub data: Option<PathBuf>,
    pub listen: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub http: SocketAddr,
    pub join: Vec<String>,
    pub board: Option<String>,
    pub log: String,
    /// Replication factor of buckets that do not set their own.
    pub replicas: usize,
    /// Leaf-set size (both sides together).
    pub leaf_set: usize,
    /// How many vnodes to start with (the vnode game then decides).
    pub vnodes: u32,
    /// Let the vnode game set the vnode count; false keeps `vnodes`.
    pub vnode_game: bool,
    /// Most vnodes, whatever the certificate allows (board profile).
    pub max_vnodes: u32,
    /// Capacity relative to the reference board (Pi 4 with SSD = 1): the
    /// vnode game's weight for this node (board profile).
    pub capacity: f64,
    /// Expected number of nodes in the cluster: sets the game's price slope
    /// (eps = 1.4 / fleet). Every node of a cluster should use the same.
    pub fleet: usize,
    /// Seconds between two rounds of the vnode game.
    pub game_round_s: f64,
    /// Largest value a put may carry, in bytes.
    pub max_value: usize,
    /// Most bytes of live values the local store may hold before client
    /// puts are refused (507); `"8 GiB"` or a number of bytes. None: no limit.
    #[serde(deserialize_with = "de_size", skip_serializing_if = "Option::is_none")]
    pub storage_limit: Option<u64>,
    /// `[functions]`: podman's socket, keep-alive, container limits.
    pub functions: super::functions::FunctionsConfig,
    /// Objects: a second HTTP listener serving only presigned blob URLs
    /// (for function containers, which cannot reach a loopback `http`).
    pub blob_http: Option<SocketAddr>,
    /// Objects: the base URL written into presigned blob URLs (default:
    /// `http://` + `blob_http`, else + `http`).
    pub blob_url: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data: None,
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_QUIC_PORT)),
            advertise: None,
            http: SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT)),
            join: Vec::new(),
            board: None,
            log: "info".into(),
            replicas: 3,
            leaf_set: 24,
            vnodes: 1,
            vnode_game: true,
            max_vnodes: 64,
            capacity: 1.0,
            fleet: 100,
            game_round_s: 2.0,
            max_value: crate::store::MAX_VALUE,
            storage_limit: None,
            functions: Default::default(),
            blob_http: None,
            blob_url: None,
        }
    }
}

/// Parses a size such as `512`, `"64 MiB"`, `"8GiB"`, `"1.5 GB"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as \"8 GiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 1.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?}: size out of range"));
    }
    Ok(v as u64)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        N(u64),
        S(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::N(0)) => Err(serde::de::Error::custom("size must be > 0")),
        Some(Size::N(n)) => Ok(Some(n)),
        Some(Size::S(s)) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("{path}: {err}")]
    Parse { path: String, err: toml::de::Error },
    #[error("{0}")]
    Invalid(String),
}

impl NodeConfig {
    /// Reads a TOML config file; unknown keys are errors so typos surface.
    pub fn from_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        Self::default().overlay_file(path)
    }

    /// The keys a config file sets, as a table (not yet checked).
    pub fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.display().to_string(),
            err,
        })?;
        text.parse::<toml::Table>()
            .map_err(|err| ConfigError::Parse {
                path: path.display().to_string(),
                err,
            })
    }

    /// This config with the keys of the file at `path` set over it: keys the
    /// file leaves out keep their value here (a board's, say).
    pub fn overlay_file(&self, path: &Path) -> Result<NodeConfig, ConfigError> {
        let table = Self::read_table(path)?;
        self.overlay(table).map_err(|err| ConfigError::Parse {
            path: path.display().to_string(),
            err,
        })
    }

    /// This config with `table`'s keys set over it; unknown keys are errors.
    pub fn overlay(&self, table: toml::Table) -> Result<NodeConfig, toml::de::Error> {
        let mut base = match toml::Table::try_from(self) {
            Ok(t) => t,
            Err(e) => return Err(serde::de::Error::custom(e)),
        };
        // One level deep, so `[functions] keep_alive_s = 60` in a file keeps
        // the socket a board set.
        for (k, v) in table {
            match (base.get_mut(&k), v) {
                (Some(toml::Value::Table(b)), toml::Value::Table(t)) => b.extend(t),
                (_, v) => {
                    base.insert(k, v);
                }
            }
        }
        base.try_into()
    }

    /// Refuses settings the node cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=16).contains(&self.replicas) {
            return Err(ConfigError::Invalid(format!(
                "replicas = {}: must be between 1 and 16",
                self.replicas
            )));
        }
        if !(4..=64).contains(&self.leaf_set) || self.leaf_set % 2 != 0 {
            return Err(ConfigError::Invalid(format!(
                "leaf_set = {}: must be an even number between 4 and 64",
                self.leaf_set
            )));
        }
        if self.vnodes == 0 || self.vnodes > 64 {
            return Err(ConfigError::Invalid(format!(
                "vnodes = {}: must be between 1 and 64",
                self.vnodes
            )));
        }
        if !(self.capacity.is_finite() && self.capacity > 0.0 && self.capacity <= 1000.0) {
            return Err(ConfigError::Invalid(format!(
                "capacity = {}: must be a number above 0 (1 = a Pi 4 with SSD)",
                self.capacity
            )));
        }
        if self.fleet == 0 || self.fleet > 10_000_000 {
            return Err(ConfigError::Invalid(format!(
                "fleet = {}: must be at least 1",
                self.fleet
            )));
        }
        if !(0.1..=3600.0).contains(&self.game_round_s) {
            return Err(ConfigError::Invalid(format!(
                "game_round_s = {}: must be between 0.1 and 3600",
                self.game_round_s
            )));
        }
        if self.max_vnodes == 0 || self.max_vnodes > 64 {
            return Err(ConfigError::Invalid(format!(
                "max_vnodes = {}: must be between 1 and 64",
                self.max_vnodes
            )));
        }
        if self.max_value == 0 || self.max_value > crate::store::MAX_VALUE {
            return Err(ConfigError::Invalid(format!(
                "max_value = {}: must be between 1 and {}",
                self.max_value,
                crate::store::MAX_VALUE
            )));
        }
        self.functions.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// Where the node keeps its state when nothing says: systemd's
    /// StateDirectory, then the user's data dir, then `./capy-data`.
    pub fn default_data_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
            // systemd may pass several, colon-separated; the first is ours.
            let s = d.to_string_lossy().to_string();
            if let Some(first) = s.split(':').next().filter(|f| !f.is_empty()) {
                return PathBuf::from(first);
            }
        }
        if let Some(h) = std::env::var_os("XDG_DATA_HOME") {
            return PathBuf::from(h).join("capy");
        }
        if let Some(h) = std::env::var_os("HOME") {
            return PathBuf::from(h).join(".local/share/capy");
        }
        PathBuf::from("capy-data")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.clone().unwrap_or_else(Self::default_data_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = toml::from_str::<NodeConfig>("replicas = 3\nlistne = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("listne"), "{e}");
        let c: NodeConfig = toml::from_str("replicas = 0").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("replicas = 0"), "{e}");
        let c: NodeConfig = toml::from_str("listen = \"127.0.0.1:9000\"").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn sizes_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64 MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5 kb").unwrap(), 1500);
        for bad in ["", "GiB", "8 parsecs", "-1 GiB", "0", "1e30 TiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let c: NodeConfig = toml::from_str("storage_limit = \"2 KiB\"").unwrap();
        assert_eq!(c.storage_limit, Some(2048));
        let c: NodeConfig = toml::from_str("storage_limit = 4096").unwrap();
        assert_eq!(c.storage_limit, Some(4096));
        let e = toml::from_str::<NodeConfig>("storage_limit = \"lots\"").unwrap_err();
        assert!(e.to_string().contains("lots"), "{e}");
    }

    #[test]
    fn overlay_keeps_what_the_file_leaves_out() {
        let base = NodeConfig {
            storage_limit: Some(1 << 30),
            max_vnodes: 8,
            replicas: 2,
            ..NodeConfig::default()
        };
        let t: toml::Table = "replicas = 5\nlisten = \"127.0.0.1:9\"".parse().unwrap();
        let c = base.overlay(t).unwrap();
        assert_eq!(c.replicas, 5);
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.storage_limit, Some(1 << 30));
        assert_eq!(c.max_vnodes, 8);
        let t: toml::Table = "storage_limit = \"1 MiB\"\nreplicsa = 1".parse().unwrap();
        let e = base.overlay(t).unwrap_err().to_string();
        assert!(e.contains("replicsa"), "{e}");
    }
}

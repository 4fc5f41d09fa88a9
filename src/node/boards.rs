//! Board profiles (`boards/*.toml`), embedded in the binary so a gateway
//! needs no file besides its config: `capy run --board NAME` or `board =
//! "NAME"` in the config applies one (defaults < board < config file <
//! flags), `capy boards` lists them. The vnode game reads the same files for
//! its capacity inputs (`game::params::BoardClass::from_profile`).

use super::config::NodeConfig;
use crate::game::{BoardClass, NodeParams};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The shipped profiles: (name, TOML text).
pub const PROFILES: [(&str, &str); 4] = [
    ("rpi4", include_str!("../../boards/rpi4.toml")),
    ("rpi3", include_str!("../../boards/rpi3.toml")),
    ("gateway-a64", include_str!("../../boards/gateway-a64.toml")),
    ("x86-edge", include_str!("../../boards/x86-edge.toml")),
];

/// One board profile as written in `boards/NAME.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    pub name: String,
    pub description: String,
    /// Rust target triple of the static binary for this board.
    pub target: String,
    /// Most bytes of live values in the local store ("64 GiB" or bytes).
    #[serde(deserialize_with = "de_size")]
    pub storage_limit: u64,
    pub max_vnodes: u32,
    pub data_dir: PathBuf,
    pub podman_socket: PathBuf,
    pub game: GameInputs,
}

/// Capacity inputs of the vnode game, relative to the reference board.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GameInputs {
    pub storage_rel: f64,
    pub cpu_rel: f64,
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        N(u64),
        S(String),
    }
    match Size::deserialize(d)? {
        Size::N(0) => Err(serde::de::Error::custom("size must be > 0")),
        Size::N(n) => Ok(n),
        Size::S(s) => super::config::parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("unknown board {name:?}; known boards: {known}")]
    Unknown { name: String, known: String },
    #[error("board profile {name}: {err}")]
    Bad { name: String, err: String },
}

impl Board {
    /// Parses and checks a profile's text.
    pub fn parse(name: &str, text: &str) -> Result<Board, BoardError> {
        let bad = |err: String| BoardError::Bad {
            name: name.to_string(),
            err,
        };
        let b: Board = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if b.name != name {
            return Err(bad(format!("names itself {:?}", b.name)));
        }
        // The game's own reading of the file must accept it too.
        BoardClass::from_profile(text).map_err(|e| bad(e.to_string()))?;
        Ok(b)
    }

    /// The game's capacity figure for this board (reference board = 1).
    pub fn capacity(&self) -> f64 {
        NodeParams::capacity_of(self.game.storage_rel, self.game.cpu_rel)
    }

    /// Sets what the board says on `cfg`; a config file and flags applied
    /// afterwards override it.
    pub fn apply(&self, cfg: &mut NodeConfig) {
        cfg.board = Some(self.name.clone());
        cfg.data = Some(self.data_dir.clone());
        cfg.storage_limit = Some(self.storage_limit);
        // Certificates grant at most transport::MAX_VNODES today; the
        // profile's figure is also the game simulator's bound S_i.
        cfg.max_vnodes = self.max_vnodes.min(crate::transport::MAX_VNODES);
        cfg.capacity = self.capacity();
        cfg.functions.podman_socket = self.podman_socket.clone();
    }
}

/// Bytes of live values in the local store, over all buckets.
pub fn stored_bytes(db: &crate::store::Db) -> u64 {
    db.buckets()
        .unwrap_or_default()
        .iter()
        .filter_map(|b| db.stats(b).ok())
        .map(|s| s.bytes)
        .sum()
}

/// Refuses a client put of `incoming` bytes that would take the local store
/// past the node's storage limit. Counted: live value bytes (what clients
/// stored); redb's own overhead (keys, versions, free pages) is not.
pub(crate) fn check_storage(
    node: &super::runtime::Node,
    incoming: u64,
) -> Result<(), super::OpError> {
    let Some(limit) = node.cfg.storage_limit else {
        return Ok(());
    };
    let used = stored_bytes(&node.db);
    if used.saturating_add(incoming) > limit {
        node.metrics.store_errors.inc("full");
        return Err(super::OpError::Full(format!(
            "storage limit reached: this node holds {used} bytes of {limit} allowed \
             (storage_limit of its board or config); a value of {incoming} bytes does not fit"
        )));
    }
    Ok(())
}

/// Names of the shipped boards, comma-separated, for error messages.
pub fn known() -> String {
    PROFILES
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The shipped profile called `name`.
pub fn get(name: &str) -> Result<Board, BoardError> {
    match PROFILES.iter().find(|(n, _)| *n == name) {
        Some((n, text)) => Board::parse(n, text),
        None => Err(BoardError::Unknown {
            name: name.to_string(),
            known: known(),
        }),
    }
}

/// All shipped profiles, in listing order.
pub fn all() -> Result<Vec<Board>, BoardError> {
    PROFILES.iter().map(|(n, t)| Board::parse(n, t)).collect()
}

fn human(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes % GIB == 0 {
        format!("{} GiB", bytes / GIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// `capy boards [--json]`: returns the exit code.
pub fn list_cmd(json: bool) -> i32 {
    let boards = match all() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("capy: {e}");
            return crate::cli::EXIT_FAILED;
        }
    };
    if json {
        let v: Vec<serde_json::Value> = boards
            .iter()
            .map(|b| {
                let mut v = serde_json::to_value(b).unwrap_or_default();
                v["capacity"] = serde_json::json!(b.capacity());
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| "[]".into())
        );
        return crate::cli::EXIT_OK;
    }
    println!(
        "{:<12} {:<32} {:>9} {:>6} {:>8}  description",
        "board", "target", "storage", "vnodes", "capacity"
    );
    for b in &boards {
        println!(
            "{:<12} {:<32} {:>9} {:>6} {:>8.2}  {}",
            b.name,
            b.target,
            human(b.storage_limit),
            b.max_vnodes,
            b.capacity(),
            b.description
        );
    }
    crate::cli::EXIT_OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_profile_parses_and_matches_the_game() {
        let boards = all().unwrap();
        assert_eq!(boards.len(), PROFILES.len());
        let sim = crate::game::params::sim_boards();
        for b in &boards {
            assert!(b.storage_limit >= 1 << 30, "{}", b.name);
            assert!(
                b.target.contains("-linux-musl"),
                "{}: static target",
                b.name
            );
            // The simulator's class of the same name has the same numbers.
            let c = sim.iter().find(|c| c.name == b.name).unwrap();
            assert_eq!(c.max_vnodes, b.max_vnodes);
            assert!((c.capacity() - b.capacity()).abs() < 1e-12);
        }
        assert_eq!(get("rpi4").unwrap().capacity(), 1.0);
        assert_eq!(
            get("rpi3").unwrap().target,
            "armv7-unknown-linux-musleabihf"
        );
    }

    #[test]
    fn unknown_board_names_the_known_ones() {
        let e = get("rpi9").unwrap_err().to_string();
        assert!(
            e.contains("rpi9") && e.contains("rpi4") && e.contains("x86-edge"),
            "{e}"
        );
    }

    #[test]
    fn bad_profiles_are_refused_with_the_reason() {
        let good = PROFILES[0].1;
        assert!(Board::parse("rpi4", good).is_ok());
        let cases = [
            (good.replace("64 GiB", "64 parsecs"), "parsecs"),
            (
                good.replace("max_vnodes = 64", "max_vnodes = 0"),
                "max vnodes",
            ),
            (good.replace("cpu_rel = 1.0", "cpu_rel = -1.0"), "cpu_rel"),
            (format!("{good}\nflavour = 1\n"), "flavour"),
        ];
        for (text, want) in cases {
            let e = Board::parse("rpi4", &text).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = Board::parse("rpi3", good).unwrap_err().to_string();
        assert!(e.contains("names itself"), "{e}");
    }

    #[test]
    fn layers_defaults_board_file_flags() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("capy.toml");
        std::fs::write(&file, "board = \"x86-edge\"\nstorage_limit = \"1 MiB\"\n").unwrap();
        let args = crate::cli::RunArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        let c = super::super::resolve_config(&args).unwrap();
        assert_eq!(c.board.as_deref(), Some("x86-edge"));
        assert_eq!(
            c.max_vnodes, 64,
            "from the board, within what certificates allow"
        );
        assert!((c.capacity - get("x86-edge").unwrap().capacity()).abs() < 1e-12);
        assert_eq!(c.storage_limit, Some(1 << 20), "the file over the board");
        // A --board flag picks the board; the file's keys still win over it,
        // and flags over both.
        let args = crate::cli::RunArgs {
            config: Some(file.clone()),
            board: Some("rpi3".into()),
            data: Some(d.path().join("data")),
            ..Default::default()
        };
        let c = super::super::resolve_config(&args).unwrap();
        assert_eq!(c.board.as_deref(), Some("rpi3"));
        assert_eq!(c.max_vnodes, 32);
        assert_eq!(c.storage_limit, Some(1 << 20));
        assert_eq!(c.data, Some(d.path().join("data")));
        // No board: nothing of a board's is set.
        let c = super::super::resolve_config(&Default::default()).unwrap();
        assert_eq!((c.board, c.storage_limit), (None, None));
        assert_eq!((c.max_vnodes, c.capacity), (64, 1.0));
        std::fs::write(&file, "board = 4\n").unwrap();
        let args = crate::cli::RunArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        let e = super::super::resolve_config(&args).unwrap_err();
        assert!(e.contains("board = 4"), "{e}");
        std::fs::write(&file, "board = \"pi\"\n").unwrap();
        let e = super::super::resolve_config(&args).unwrap_err();
        assert!(e.contains("unknown board \"pi\""), "{e}");
    }

    #[test]
    fn apply_sets_the_board_values() {
        let mut c = NodeConfig::default();
        get("rpi3").unwrap().apply(&mut c);
        assert_eq!(c.board.as_deref(), Some("rpi3"));
        assert_eq!(c.storage_limit, Some(8 << 30));
        assert_eq!(c.max_vnodes, 32);
        assert!((c.capacity - get("rpi3").unwrap().capacity()).abs() < 1e-12);
        assert_eq!(c.data, Some(PathBuf::from("/var/lib/capy")));
    }
}

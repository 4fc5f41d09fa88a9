//! Cluster settings (R, eps, step) and the mapping from a node's board
//! profile and measured load to its cost parameters Q_i, L_i and bound S_i.
//! Board capacities come from the shipped profiles in `boards/`.

use serde::{Deserialize, Serialize};

/// Most vnodes any node may run, whatever its certificate says: bounds the
/// estimates taken from the wire and the work a vnode change can cause.
pub const MAX_VNODES: u32 = 1024;

/// Settings every node of a cluster shares: the price curve
/// `p = R - eps * sum_j x_j` and the cost scale `q0`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GameSettings {
    /// Price of a vnode when the cluster offers none.
    pub r: f64,
    /// How fast the price falls per vnode offered in the whole cluster.
    pub eps: f64,
    /// Cost scale: `Q_i = q0 * a_i / c_i`.
    pub q0: f64,
}

/// Price intercept: with `q0 = 1` a reference board (capacity 1) ends near
/// `R / (2 (1 + kappa))` ~ 31 vnodes, a Pi 3 near 12 and an x86 gateway
/// near 140. Fewer would be lighter, but a node's key share is the sum of
/// random arcs: with ~8 vnodes on the weakest boards the worst of 1,000
/// nodes ends 30% above the mean however well the game does.
pub const DEFAULT_R: f64 = 128.0;
/// `eps * N`: chosen so that the price feedback `kappa = eps * sum_j
/// 1/(2 Q_j + eps)` is about 1 on a fleet of mean capacity ~1.5, i.e. the
/// price at equilibrium is about half of R. Much larger kappa would make the
/// market, not capacity, set the counts and slow the loop down; much smaller
/// would make the price irrelevant.
pub const DEFAULT_EPS_TIMES_N: f64 = 1.4;

impl GameSettings {
    /// Defaults for a fleet of about `nodes` gateways. `eps` must shrink with
    /// the fleet: the total vnode count at which the price reaches zero is
    /// `R / eps`, and it should grow in proportion to the number of nodes.
    pub fn for_fleet(nodes: usize) -> Self {
        GameSettings {
            r: DEFAULT_R,
            eps: DEFAULT_EPS_TIMES_N / nodes.max(1) as f64,
            q0: 1.0,
        }
    }

    /// Checks the settings are usable: positive and finite.
    pub fn validate(&self) -> Result<(), ParamError> {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        if !(ok(self.r) && ok(self.q0) && self.eps.is_finite() && self.eps >= 0.0) {
            return Err(ParamError::Settings(*self));
        }
        Ok(())
    }
}

/// What a node knows about itself: its board's capacity, what its
/// certificate allows and what it measures. Everything the cost depends on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeParams {
    /// Capacity relative to the reference board (1.0), from the profile.
    pub capacity: f64,
    /// Most vnodes: min of the certificate's and the board profile's limit.
    pub max_vnodes: u32,
    /// Load factor a_i: integral of the measured key load relative to the
    /// node's fair share (1.0 until measured; > 1 when its vnodes own wide
    /// arcs). Set by `GameNode::observe_load`.
    pub load_factor: f64,
    /// Measured share of the box busy with work other than capy, in [0, 1).
    pub background: f64,
}

/// Errors from parameters: a bad profile or settings is refused, never
/// silently clamped into a game that cannot converge.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    #[error("game settings must be finite with r > 0, q0 > 0, eps >= 0: {0:?}")]
    Settings(GameSettings),
    #[error("board capacity must be finite and > 0, got {0}")]
    Capacity(f64),
    #[error("max vnodes must be in 1..={MAX_VNODES}, got {0}")]
    MaxVnodes(u32),
    #[error("board profile: {0}")]
    Profile(String),
}

impl NodeParams {
    /// A fresh node: nothing measured yet (average load, idle box).
    pub fn new(capacity: f64, max_vnodes: u32) -> Result<Self, ParamError> {
        if !(capacity.is_finite() && capacity > 0.0) {
            return Err(ParamError::Capacity(capacity));
        }
        if max_vnodes == 0 || max_vnodes > MAX_VNODES {
            return Err(ParamError::MaxVnodes(max_vnodes));
        }
        Ok(NodeParams {
            capacity,
            max_vnodes,
            load_factor: 1.0,
            background: 0.0,
        })
    }

    /// The board profile's capacity: geometric mean of storage and CPU
    /// relative to the reference board, because serving keys needs both and
    /// the scarcer one should pull the figure down.
    pub fn capacity_of(storage_rel: f64, cpu_rel: f64) -> f64 {
        (storage_rel.max(0.0) * cpu_rel.max(0.0)).sqrt()
    }

    /// Quadratic cost: `q0 * a / c`. Serving x vnodes costs more the weaker
    /// the board and the wider the arcs its vnodes own; with L = 0 this makes
    /// the equilibrium's key load (a * x) proportional to capacity.
    pub fn q(&self, s: &GameSettings) -> f64 {
        s.q0 * self.load_factor.clamp(LOAD_FACTOR_MIN, LOAD_FACTOR_MAX) / self.capacity
    }

    /// Linear cost: `R * u`. A box fully busy with other work prices itself
    /// out (best response 0); an idle one adds nothing.
    pub fn l(&self, s: &GameSettings) -> f64 {
        s.r * self.background.clamp(0.0, 1.0)
    }

    /// Upper bound S_i as a real number.
    pub fn s(&self) -> f64 {
        f64::from(self.max_vnodes.min(MAX_VNODES))
    }
}

/// Range the measured load factor is held to, so one bad measurement cannot
/// push a node to 0 or to its bound by itself.
pub const LOAD_FACTOR_MIN: f64 = 0.25;
pub const LOAD_FACTOR_MAX: f64 = 4.0;

/// One kind of gateway: what a board profile says about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoardClass {
    pub name: String,
    /// Storage relative to the reference board (a Pi 4 with an SSD).
    pub storage_rel: f64,
    /// CPU throughput relative to the reference board.
    pub cpu_rel: f64,
    /// The profile's limit on vnodes.
    pub max_vnodes: u32,
}

/// The part of a board profile (`boards/*.toml`) the game reads; the node
/// reads the rest.
#[derive(Deserialize)]
struct ProfileView {
    name: String,
    max_vnodes: u32,
    game: ProfileGame,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileGame {
    storage_rel: f64,
    cpu_rel: f64,
}

impl BoardClass {
    pub fn capacity(&self) -> f64 {
        NodeParams::capacity_of(self.storage_rel, self.cpu_rel)
    }

    /// Reads the game's inputs from a board profile's TOML text, so the
    /// simulator and the node take their numbers from the same file.
    pub fn from_profile(text: &str) -> Result<BoardClass, ParamError> {
        let v: ProfileView =
            toml::from_str(text).map_err(|e| ParamError::Profile(e.to_string()))?;
        let b = BoardClass {
            name: v.name,
            storage_rel: v.game.storage_rel,
            cpu_rel: v.game.cpu_rel,
            max_vnodes: v.max_vnodes,
        };
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !(ok(b.storage_rel) && ok(b.cpu_rel)) {
            return Err(ParamError::Profile(format!(
                "{}: storage_rel and cpu_rel must be finite and > 0",
                b.name
            )));
        }
        NodeParams::new(b.capacity(), b.max_vnodes)?;
        Ok(b)
    }
}

/// The shipped board profiles the simulator mixes, weakest first: a Pi 3 on
/// an SD card, a Pi 4 with an SSD (the reference), an RK3588-class gateway
/// and an x86 edge box. The simulator's zone mixes index this order.
pub const SIM_PROFILES: [&str; 4] = [
    include_str!("../../boards/rpi3.toml"),
    include_str!("../../boards/rpi4.toml"),
    include_str!("../../boards/gateway-a64.toml"),
    include_str!("../../boards/x86-edge.toml"),
];

/// The board classes the simulator mixes, read from `SIM_PROFILES`. The
/// profiles are checked by tests, so a broken one cannot ship; should one
/// still fail to parse, it is replaced by the reference board.
pub fn sim_boards() -> Vec<BoardClass> {
    SIM_PROFILES
        .iter()
        .map(|t| {
            BoardClass::from_profile(t).unwrap_or_else(|_| BoardClass {
                name: "reference".into(),
                storage_rel: 1.0,
                cpu_rel: 1.0,
                max_vnodes: 64,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_follows_capacity_and_load() {
        let s = GameSettings::for_fleet(100);
        let weak = NodeParams::new(0.5, 16).unwrap();
        let strong = NodeParams::new(2.0, 64).unwrap();
        assert!((weak.q(&s) / strong.q(&s) - 4.0).abs() < 1e-12);
        let mut fat = strong;
        fat.load_factor = 2.0;
        assert!((fat.q(&s) / strong.q(&s) - 2.0).abs() < 1e-12);
        assert_eq!(strong.l(&s), 0.0);
        let mut busy = strong;
        busy.background = 0.5;
        assert!((busy.l(&s) - s.r / 2.0).abs() < 1e-12);
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(NodeParams::new(0.0, 4).is_err());
        assert!(NodeParams::new(f64::NAN, 4).is_err());
        assert!(NodeParams::new(1.0, 0).is_err());
        assert!(NodeParams::new(1.0, MAX_VNODES + 1).is_err());
        let mut s = GameSettings::for_fleet(10);
        assert!(s.validate().is_ok());
        s.eps = f64::INFINITY;
        assert!(s.validate().is_err());
    }

    #[test]
    fn capacity_is_the_geometric_mean() {
        assert!((NodeParams::capacity_of(4.0, 1.0) - 2.0).abs() < 1e-12);
        let b = &sim_boards()[1];
        assert!((b.capacity() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn shipped_profiles_parse_weakest_first() {
        let boards = sim_boards();
        let names: Vec<&str> = boards.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["rpi3", "rpi4", "gateway-a64", "x86-edge"]);
        for t in SIM_PROFILES {
            BoardClass::from_profile(t).unwrap();
        }
        for w in boards.windows(2) {
            assert!(w[0].capacity() < w[1].capacity(), "{w:?}");
            assert!(w[0].max_vnodes <= w[1].max_vnodes, "{w:?}");
        }
    }

    #[test]
    fn bad_profiles_are_refused() {
        let ok = "name = \"x\"\nmax_vnodes = 8\n[game]\nstorage_rel = 1.0\ncpu_rel = 1.0\n";
        assert!(BoardClass::from_profile(ok).is_ok());
        for bad in [
            ok.replace("cpu_rel = 1.0", "cpu_rel = 0.0"),
            ok.replace("cpu_rel = 1.0", "cpu_rel = nan"),
            ok.replace("max_vnodes = 8", "max_vnodes = 0"),
            ok.replace("[game]", "[gaem]"),
            ok.replace("storage_rel", "storage"),
        ] {
            let e = BoardClass::from_profile(&bad).unwrap_err();
            assert!(
                e.to_string().starts_with("board profile")
                    || matches!(e, ParamError::MaxVnodes(0) | ParamError::Capacity(_)),
                "{bad}: {e}"
            );
        }
    }
}

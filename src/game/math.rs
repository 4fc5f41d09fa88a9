//! The game's algebra: gradient, projection, Metropolis weights, the damped
//! projected step, and the exact equilibrium every test and the simulator
//! measure against.
//!
//! Node i offers x_i in [0, S_i]; J_i = Q_i x_i^2 + L_i x_i - p x_i with
//! p = R - eps X, X = sum_j x_j. The pseudo-gradient's Jacobian is
//! diag(2Q + eps) + eps 1 1^T, positive definite, so the game is strongly
//! monotone and has exactly one Nash equilibrium.

/// Cost coefficients of one player.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Player {
    pub q: f64,
    pub l: f64,
    pub s: f64,
}

/// dJ_i/dx_i = 2 Q_i x_i + L_i - R + eps X + eps x_i, with X the aggregate
/// including x_i.
pub fn gradient(p: &Player, r: f64, eps: f64, x_i: f64, aggregate: f64) -> f64 {
    2.0 * p.q * x_i + p.l - r + eps * aggregate + eps * x_i
}

/// Euclidean projection onto the box [0, s].
pub fn project(x: f64, s: f64) -> f64 {
    if x.is_nan() {
        return 0.0;
    }
    x.clamp(0.0, s.max(0.0))
}

/// Metropolis weight of the edge between nodes of degrees `d_i` and `d_j`:
/// symmetric, and `sum_j w_ij <= d_i / (1 + d_i) < 1` so the self weight
/// `w_ii = 1 - sum_j w_ij` stays positive: the mixing matrix is doubly
/// stochastic whatever the degrees.
pub fn metropolis_weight(d_i: usize, d_j: usize) -> f64 {
    1.0 / (1.0 + d_i.max(d_j) as f64)
}

/// Self weight given the neighbours' degrees.
pub fn metropolis_self_weight(d_i: usize, neighbour_degrees: &[usize]) -> f64 {
    1.0 - neighbour_degrees
        .iter()
        .map(|&d_j| metropolis_weight(d_i, d_j))
        .sum::<f64>()
}

/// Best response to an aggregate X that already contains x_i (the
/// unconstrained root of the gradient, clipped): (R - L - eps X)/(2Q + eps).
pub fn best_response(p: &Player, r: f64, eps: f64, aggregate: f64) -> f64 {
    project((r - p.l - eps * aggregate) / (2.0 * p.q + eps), p.s)
}

/// One projected gradient step with the per-node step size
/// `alpha_i = gamma / (2 Q_i + eps)`. Algebraically this is the damped move
/// `(1 - gamma) x_i + gamma * (R - L - eps X)/(2Q + eps)`, projected, so the
/// step needs only the node's own coefficients.
pub fn projected_step(p: &Player, r: f64, eps: f64, x_i: f64, aggregate: f64, gamma: f64) -> f64 {
    let alpha = gamma / (2.0 * p.q + eps);
    project(x_i - alpha * gradient(p, r, eps, x_i, aggregate), p.s)
}

/// The Nash equilibrium, exactly. At the equilibrium every x_i is the
/// clipped best response to the same aggregate X, so X solves the 1-D
/// equation X = sum_i clip((R - L_i - eps X)/(2Q_i + eps), 0, S_i), whose
/// right side falls monotonically in X: bisection finds the active set, and
/// the linear system on that set gives X in closed form.
pub fn equilibrium(players: &[Player], r: f64, eps: f64) -> Vec<f64> {
    let resp = |x_agg: f64| -> f64 {
        players
            .iter()
            .map(|p| best_response(p, r, eps, x_agg))
            .sum::<f64>()
    };
    let mut lo = 0.0f64;
    let mut hi = players.iter().map(|p| p.s.max(0.0)).sum::<f64>();
    // f(X) = resp(X) - X is strictly decreasing: f(0) >= 0, f(sum S) <= 0.
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if resp(mid) > mid {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut agg = 0.5 * (lo + hi);
    // Closed form on the active set found: X (1 + eps sum_F 1/(2Q+eps)) =
    // sum_F (R - L)/(2Q + eps) + sum_{at S} S.
    let (mut num, mut den) = (0.0, 1.0);
    for p in players {
        let raw = (r - p.l - eps * agg) / (2.0 * p.q + eps);
        if raw >= p.s {
            num += p.s;
        } else if raw > 0.0 {
            num += (r - p.l) / (2.0 * p.q + eps);
            den += eps / (2.0 * p.q + eps);
        }
    }
    let exact = num / den;
    if (exact - agg).abs() <= 1e-9 * agg.max(1.0) {
        agg = exact;
    }
    players
        .iter()
        .map(|p| best_response(p, r, eps, agg))
        .collect()
}

/// Largest error of `x` against the equilibrium, relative to each node's
/// equilibrium value with a floor of one vnode (a node whose equilibrium is
/// 0 is off by |x_i| vnodes).
pub fn max_rel_error(x: &[f64], ne: &[f64]) -> f64 {
    x.iter()
        .zip(ne)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pl(q: f64, l: f64, s: f64) -> Player {
        Player { q, l, s }
    }

    #[test]
    fn gradient_matches_finite_difference_of_cost() {
        // J_i(x_i) with the others fixed at `rest`.
        let p = pl(0.7, 3.0, 50.0);
        let (r, eps, rest) = (80.0, 0.01, 400.0);
        let j = |x: f64| p.q * x * x + p.l * x - (r - eps * (rest + x)) * x;
        for x in [0.0, 1.5, 10.0, 33.3] {
            let h = 1e-5;
            let fd = (j(x + h) - j(x - h)) / (2.0 * h);
            let g = gradient(&p, r, eps, x, rest + x);
            assert!((fd - g).abs() < 1e-6, "x={x}: fd {fd} vs {g}");
        }
    }

    #[test]
    fn projection_clips_to_the_box() {
        assert_eq!(project(-3.0, 10.0), 0.0);
        assert_eq!(project(12.0, 10.0), 10.0);
        assert_eq!(project(4.5, 10.0), 4.5);
        assert_eq!(project(f64::NAN, 10.0), 0.0);
        assert_eq!(project(f64::INFINITY, 10.0), 10.0);
    }

    #[test]
    fn metropolis_weights_are_symmetric_and_doubly_stochastic() {
        assert_eq!(metropolis_weight(3, 7), metropolis_weight(7, 3));
        assert_eq!(metropolis_weight(3, 7), 1.0 / 8.0);
        // A small irregular graph: rows and columns of W sum to 1, all >= 0.
        let edges = [(0, 1), (0, 2), (0, 3), (1, 2), (3, 4)];
        let n = 5;
        let mut deg = vec![0usize; n];
        for &(a, b) in &edges {
            deg[a] += 1;
            deg[b] += 1;
        }
        let mut w = vec![vec![0.0; n]; n];
        for &(a, b) in &edges {
            w[a][b] = metropolis_weight(deg[a], deg[b]);
            w[b][a] = metropolis_weight(deg[b], deg[a]);
        }
        for i in 0..n {
            let nd: Vec<usize> = (0..n).filter(|&j| w[i][j] > 0.0).map(|j| deg[j]).collect();
            w[i][i] = metropolis_self_weight(deg[i], &nd);
            assert!(w[i][i] > 0.0);
        }
        for (i, row) in w.iter().enumerate() {
            let row: f64 = row.iter().sum();
            let col: f64 = w.iter().map(|r| r[i]).sum();
            assert!((row - 1.0).abs() < 1e-12 && (col - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn step_is_damped_best_response() {
        let p = pl(0.5, 0.0, 40.0);
        let (r, eps, agg) = (80.0, 0.002, 600.0);
        let br = (r - eps * agg) / (2.0 * p.q + eps);
        let x = 5.0;
        let got = projected_step(&p, r, eps, x, agg, 0.25);
        assert!((got - (0.75 * x + 0.25 * br)).abs() < 1e-9);
        // A step that would leave the box lands on its face.
        assert_eq!(
            projected_step(&pl(0.01, 0.0, 3.0), r, eps, 2.0, 10.0, 1.0),
            3.0
        );
        assert_eq!(
            projected_step(&pl(0.5, 200.0, 3.0), r, eps, 2.0, 10.0, 1.0),
            0.0
        );
    }

    #[test]
    fn equilibrium_of_symmetric_interior_game() {
        // n identical players: x = (R - L)/(2Q + eps + n eps).
        let n = 10;
        let (q, l, r, eps) = (0.5, 2.0, 80.0, 0.1);
        let ne = equilibrium(&vec![pl(q, l, 1e6); n], r, eps);
        let want = (r - l) / (2.0 * q + eps * (n as f64 + 1.0));
        for x in ne {
            assert!((x - want).abs() < 1e-9, "{x} vs {want}");
        }
    }

    proptest! {
        /// KKT at the computed point: interior players have zero gradient,
        /// players at 0 a non-negative one, players at S a non-positive one.
        #[test]
        fn equilibrium_satisfies_kkt(
            ps in prop::collection::vec((0.05f64..5.0, 0.0f64..60.0, 1.0f64..100.0), 1..60),
            eps in 0.0f64..0.5,
        ) {
            let players: Vec<Player> = ps.iter().map(|&(q, l, s)| pl(q, l, s)).collect();
            let r = 80.0;
            let ne = equilibrium(&players, r, eps);
            let agg: f64 = ne.iter().sum();
            for (p, &x) in players.iter().zip(&ne) {
                let g = gradient(p, r, eps, x, agg);
                let tol = 1e-6 * (1.0 + r);
                if x <= 0.0 {
                    prop_assert!(g >= -tol, "at 0 with gradient {}", g);
                } else if x >= p.s {
                    prop_assert!(g <= tol, "at S with gradient {}", g);
                } else {
                    prop_assert!(g.abs() <= tol, "interior with gradient {}", g);
                }
            }
        }

        /// Full-information projected gradient play converges to the
        /// computed equilibrium: the two routes agree.
        #[test]
        fn gradient_play_reaches_the_equilibrium(
            ps in prop::collection::vec((0.05f64..5.0, 0.0f64..60.0, 1.0f64..100.0), 1..30),
            eps in 0.0f64..0.2,
        ) {
            let players: Vec<Player> = ps.iter().map(|&(q, l, s)| pl(q, l, s)).collect();
            let r = 80.0;
            let ne = equilibrium(&players, r, eps);
            let kappa: f64 = players.iter().map(|p| eps / (2.0 * p.q + eps)).sum();
            let gamma = 1.0 / (1.0 + kappa);
            let mut x = vec![1.0; players.len()];
            for _ in 0..5_000 {
                let agg: f64 = x.iter().sum();
                x = players.iter().zip(&x).map(|(p, &xi)| projected_step(p, r, eps, xi, agg, gamma)).collect();
            }
            prop_assert!(max_rel_error(&x, &ne) < 1e-6, "err {}", max_rel_error(&x, &ne));
        }
    }
}

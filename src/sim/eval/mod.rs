//! `capy eval`: the Capybara paper's evaluations (its section 6, figures 3
//! to 8) run on capy's own code, each writing `NAME.json` (the figures'
//! numbers and the claims checked), SVG plots and `NAME.md` (a short
//! summary) into the output directory.
//!
//! Every experiment drives the real cores in virtual time: the overlay
//! ([`crate::overlay::Pastry`] through the overlay simulator) and its
//! Scribe trees (the subscription simulator behind `capy sim subscribe`), the
//! replication core ([`crate::store::Replicator`] on in-memory backends),
//! the vnode game's simulator, and the shipped Lua policies through
//! [`crate::handlers::AppRuntime`] with a virtual-time host. The one
//! exception, `fnrecovery`, measures function recovery on a real local
//! cluster with podman, as the paper does. Baselines the
//! paper compares against (fixed keep-alive, the hybrid histogram policy,
//! bin-packing placement) are written here, as baselines; polling is the
//! subscription simulator's.

pub mod balance;
pub mod fnrecovery;
pub mod keepalive;
pub mod locality;
pub mod plot;
pub mod recovery;
pub mod replication;
pub mod subscriptions;

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The experiments, in the paper's order of claims.
pub const EXPERIMENTS: [&str; 6] = [
    "keepalive",
    "locality",
    "subscriptions",
    "replication",
    "balance",
    "recovery",
];

/// Experiments on a real cluster (podman): run by name, or by `all` when
/// a function image is given.
pub const CLUSTER_EXPERIMENTS: [&str; 1] = ["fnrecovery"];

/// What `capy eval` was asked for.
#[derive(Clone, Debug)]
pub struct EvalOpts {
    pub seed: u64,
    /// Smaller runs that keep `capy eval all` within a few minutes.
    pub quick: bool,
    pub out: PathBuf,
    /// Azure Functions 2019 trace files to replay instead of a generated
    /// trace (keep-alive experiment).
    pub azure_dir: Option<PathBuf>,
    /// Apps sampled from an Azure trace (0: all).
    pub azure_apps: usize,
    /// Function image archive for the real-cluster experiments.
    pub fn_image: Option<PathBuf>,
    pub podman_socket: PathBuf,
}

/// One claim of the paper and whether this run backs it.
#[derive(Clone, Debug, Serialize)]
pub struct Claim {
    pub claim: String,
    pub holds: bool,
    /// The numbers the verdict rests on.
    pub detail: String,
}

impl Claim {
    pub fn new(claim: impl Into<String>, holds: bool, detail: impl Into<String>) -> Claim {
        Claim {
            claim: claim.into(),
            holds,
            detail: detail.into(),
        }
    }
}

/// A figure: its file name (without directory), caption and the plot.
pub struct Figure {
    pub file: String,
    pub caption: String,
    pub plot: plot::Plot,
}

/// What one experiment produced.
pub struct Report {
    pub name: &'static str,
    pub title: String,
    /// The figures' numbers and the run's parameters.
    pub data: serde_json::Value,
    pub claims: Vec<Claim>,
    pub figures: Vec<Figure>,
    /// Markdown paragraphs: the model, the headline numbers.
    pub summary: String,
}

/// Why an evaluation could not run or be written.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("unknown experiment {0:?} (known: all, {list}, {cluster})", list = EXPERIMENTS.join(", "), cluster = CLUSTER_EXPERIMENTS.join(", "))]
    Unknown(String),
    #[error("{0}")]
    Input(String),
    #[error("cannot write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Draw(String),
    #[error("{0}")]
    Run(String),
}

/// Runs one experiment.
pub fn run(name: &str, opts: &EvalOpts) -> Result<Report, EvalError> {
    match name {
        "keepalive" => keepalive::run(opts),
        "locality" => locality::run(opts),
        "subscriptions" => subscriptions::run(opts),
        "replication" => replication::run(opts),
        "balance" => balance::run(opts),
        "recovery" => recovery::run(opts),
        "fnrecovery" => fnrecovery::run(opts),
        _ => Err(EvalError::Unknown(name.to_string())),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    std::fs::write(path, bytes).map_err(|err| EvalError::Write {
        path: path.to_path_buf(),
        err,
    })
}

/// Writes `NAME.json`, the figures and `NAME.md` into `dir`.
pub fn write_report(
    r: &Report,
    dir: &Path,
    seconds: f64,
    opts: &EvalOpts,
) -> Result<(), EvalError> {
    let mut figures = Vec::new();
    for f in &r.figures {
        let svg = plot::svg(&f.plot).map_err(EvalError::Draw)?;
        write(&dir.join(&f.file), svg.as_bytes())?;
        figures.push(serde_json::json!({"file": f.file, "caption": f.caption}));
    }
    let json = serde_json::json!({
        "experiment": r.name,
        "title": r.title,
        "seed": opts.seed,
        "quick": opts.quick,
        "wall_seconds": seconds,
        "claims": r.claims,
        "figures": figures,
        "data": r.data,
    });
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| EvalError::Run(format!("cannot encode the report: {e}")))?;
    write(&dir.join(format!("{}.json", r.name)), text.as_bytes())?;
    write(
        &dir.join(format!("{}.md", r.name)),
        markdown(r, seconds, opts).as_bytes(),
    )
}

fn markdown(r: &Report, seconds: f64, opts: &EvalOpts) -> String {
    let mut s = format!(
        "# {}\n\n`capy eval {} --seed {}{}` ({:.0} s)\n\n{}\n\n## Claims\n\n",
        r.title,
        r.name,
        opts.seed,
        if opts.quick { " --quick" } else { "" },
        seconds,
        r.summary.trim()
    );
    for c in &r.claims {
        s.push_str(&format!(
            "- {} **{}** — {}\n",
            if c.holds { "✅" } else { "❌" },
            c.claim,
            c.detail
        ));
    }
    s.push_str("\n## Figures\n\n");
    for f in &r.figures {
        s.push_str(&format!(
            "![{}]({})\n\n*{}*\n\n",
            f.caption, f.file, f.caption
        ));
    }
    s
}

/// `capy eval NAME|all`: runs, writes, prints one line per claim; returns
/// the exit code (1 when `check` is set and a claim does not hold).
pub fn eval_cmd(name: &str, opts: &EvalOpts, check: bool) -> i32 {
    // `capy sim subscribe` names the same experiment.
    let name = if name == "subscribe" {
        "subscriptions"
    } else {
        name
    };
    let names: Vec<&str> = if name == "all" {
        let mut v = EXPERIMENTS.to_vec();
        if opts.fn_image.is_some() {
            v.extend(CLUSTER_EXPERIMENTS);
        }
        v
    } else if EXPERIMENTS.contains(&name) || CLUSTER_EXPERIMENTS.contains(&name) {
        vec![name]
    } else {
        eprintln!("capy eval: {}", EvalError::Unknown(name.to_string()));
        return 2;
    };
    if let Err(err) = std::fs::create_dir_all(&opts.out) {
        eprintln!("capy eval: cannot create {}: {err}", opts.out.display());
        return 1;
    }
    if names.contains(&"fnrecovery") {
        if let Err(e) = fnrecovery::check(opts) {
            eprintln!("capy eval fnrecovery: {e}");
            return 2;
        }
    }
    let t_all = Instant::now();
    let mut failed = 0;
    let mut index = String::from(
        "# capy eval\n\n| experiment | claim | holds | numbers |\n|---|---|---|---|\n",
    );
    for n in names {
        let t = Instant::now();
        eprintln!("capy eval: {n} ...");
        let r = match run(n, opts) {
            Ok(r) => r,
            Err(e @ EvalError::Input(_)) => {
                eprintln!("capy eval {n}: {e}");
                return 2;
            }
            Err(e) => {
                eprintln!("capy eval {n}: {e}");
                return 1;
            }
        };
        let secs = t.elapsed().as_secs_f64();
        if let Err(e) = write_report(&r, &opts.out, secs, opts) {
            eprintln!("capy eval {n}: {e}");
            return 1;
        }
        println!("{n} ({secs:.0} s): {}", r.title);
        for c in &r.claims {
            println!(
                "  [{}] {} — {}",
                if c.holds { "ok" } else { "FAILED" },
                c.claim,
                c.detail
            );
            index.push_str(&format!(
                "| [{n}]({n}.md) | {} | {} | {} |\n",
                c.claim,
                if c.holds { "yes" } else { "**no**" },
                c.detail
            ));
            if !c.holds {
                failed += 1;
            }
        }
    }
    if name == "all" {
        if let Err(e) = write(&opts.out.join("index.md"), index.as_bytes()) {
            eprintln!("capy eval: {e}");
            return 1;
        }
    }
    println!(
        "capy eval: {:.0} s, {failed} claim(s) not backed; results in {}",
        t_all.elapsed().as_secs_f64(),
        opts.out.display()
    );
    if check && failed > 0 {
        1
    } else {
        0
    }
}

/// `p`-quantile (0..=1) of `v` by nearest rank; NaN for an empty slice.
pub fn quantile(v: &[f64], p: f64) -> f64 {
    let s = crate::stats::sorted(v.iter().copied().filter(|x| !x.is_nan()).collect());
    if s.is_empty() {
        return f64::NAN;
    }
    crate::stats::percentile(&s, p)
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

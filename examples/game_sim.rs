//! `capy sim game` until the CLI wires it: runs the vnode game simulator.
//!
//! cargo run --release --example game_sim -- --nodes 1000 --seed 1 --json

use capy::game::{print_game_sim, GameSimOpts};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Simulate the vnode game on a heterogeneous fleet")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Cold-start rounds.
    #[arg(long, default_value_t = 100)]
    rounds: u32,
    /// Load epochs after the cold start.
    #[arg(long, default_value_t = 10)]
    epochs: u32,
    #[arg(long, default_value_t = 20)]
    epoch_rounds: u32,
    /// Share of nodes leaving half way through the cold start.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    #[arg(long)]
    json: bool,
}

fn main() {
    let a = Args::parse();
    let opts = GameSimOpts {
        nodes: a.nodes,
        seed: a.seed,
        rounds: a.rounds,
        epochs: a.epochs,
        epoch_rounds: a.epoch_rounds,
        churn: a.churn,
        ..GameSimOpts::default()
    };
    std::process::exit(print_game_sim(&opts, a.json));
}

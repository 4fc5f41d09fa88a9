//! Runs the overlay simulator until `capy sim` is wired:
//! `cargo run --release --example overlay_sim -- --nodes N --lookups M
//! [--fail-fraction F] [--seed S] [--zones Z] [--concurrency C]
//! [--leaf-set L] [--slot-entries K] [--candidate-probes P] [--json]`.

use capy::sim::{print_overlay, OverlaySimOpts};

fn main() {
    let mut o = OverlaySimOpts::default();
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--json" {
            json = true;
            continue;
        }
        let Some(v) = args.next() else {
            eprintln!("error: {a} needs a value");
            std::process::exit(2);
        };
        let bad = |e: &dyn std::fmt::Display| -> ! {
            eprintln!("error: bad value {v:?} for {a}: {e}");
            std::process::exit(2)
        };
        match a.as_str() {
            "--nodes" => o.nodes = v.parse().unwrap_or_else(|e| bad(&e)),
            "--lookups" => o.lookups = v.parse().unwrap_or_else(|e| bad(&e)),
            "--fail-fraction" => o.fail_fraction = v.parse().unwrap_or_else(|e| bad(&e)),
            "--seed" => o.seed = v.parse().unwrap_or_else(|e| bad(&e)),
            "--zones" => o.zones = v.parse().unwrap_or_else(|e| bad(&e)),
            "--concurrency" => o.join_concurrency = v.parse().unwrap_or_else(|e| bad(&e)),
            "--leaf-set" => o.overlay.leaf_set_size = v.parse().unwrap_or_else(|e| bad(&e)),
            "--slot-entries" => o.overlay.slot_entries = v.parse().unwrap_or_else(|e| bad(&e)),
            "--candidate-probes" => {
                o.overlay.candidate_probes = v.parse().unwrap_or_else(|e| bad(&e))
            }
            _ => {
                eprintln!("error: unknown option {a}");
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = o.overlay.validate() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    print_overlay(&o, json);
}

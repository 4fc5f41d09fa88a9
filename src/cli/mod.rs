//! Command line: `capy run` (the node), `capy ca` (the admin CA), the client
//! commands that talk to a node's HTTP API (`put`, `get`, `rm`, `status`,
//! `app`, `watch`), `capy sim` and `capy bench`. Parsing lives here; the work is done by the
//! parts the commands name.
//!
//! Exit codes: 0 success; 1 the operation failed (the node's message is
//! printed); 2 bad usage or bad input file; 3 the node could not be reached;
//! 4 the key (or object) does not exist.

pub mod apps;
mod bench;
mod client;
pub mod cluster;
mod functions;
mod objbench;
mod objects;

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_UNREACHABLE: i32 = 3;
pub const EXIT_NOT_FOUND: i32 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "capy",
    version,
    about = "A decentralised, programmable object store and function host for edge gateways",
    long_about = "With no command, runs a node (`capy run`): `capy --join host:port` joins a cluster.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run a node (the default command).
    Run(RunArgs),
    /// The admin CA: create it, issue node certificates.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Store a value: from FILE, from stdin with `-`, or empty.
    Put {
        key: String,
        /// File to read the value from; `-` for stdin.
        file: Option<PathBuf>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Print a value to stdout (or to --out FILE).
    Get {
        key: String,
        #[arg(short, long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Delete a key.
    Rm {
        key: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Show a node's status.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// List the built-in board profiles (`capy run --board NAME`).
    Boards {
        #[arg(long)]
        json: bool,
    },
    /// Show the vnode count, pin it (`capy vnodes 4`) or let the vnode game
    /// decide (`capy vnodes auto`).
    Vnodes {
        /// A count, or `auto`.
        count: Option<String>,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Packages of classes and functions: deploy, list, remove.
    #[command(subcommand)]
    Pkg(objects::PkgCmd),
    /// Objects: create, read, invoke functions, blobs.
    #[command(subcommand)]
    Obj(objects::ObjCmd),
    /// Where an async invocation stands.
    Inv {
        id: String,
        #[command(flatten)]
        n: client::NodeArg,
    },
    /// Simulate the overlay (or the vnode game) in virtual time.
    Sim(SimArgs),
    /// Benchmarks that print their figures.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The paper's evaluations in virtual time: JSON, SVG plots, summaries.
    Eval(EvalArgs),
    /// Try a Lua handler locally, in the node's sandbox and limits.
    #[command(subcommand)]
    Handler(HandlerCmd),
    /// Functions: deploy an image, invoke, inspect, remove.
    #[command(subcommand, name = "fn")]
    Fn(functions::FnCmd),
    /// Register, list and remove apps (handlers and their settings).
    #[command(subcommand)]
    App(AppCmd),
    /// Follow an app's key: one JSON line per server-sent event.
    Watch {
        key: String,
        /// The app (bucket) of the key.
        #[arg(long)]
        bucket: String,
        /// Exit after this many updates.
        #[arg(long)]
        count: Option<u64>,
        #[arg(long, env = "CAPY_NODE", default_value = "http://127.0.0.1:7070")]
        node: String,
    },
    /// Opens a store file and exits: run by `capy run` in a child process,
    /// because the storage engine may abort on some damaged files.
    #[command(name = "__check-store", hide = true)]
    CheckStore { path: PathBuf },
}

#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Data directory: certificates, store, known peers.
    #[arg(long, env = "CAPY_DATA")]
    pub data: Option<PathBuf>,
    /// UDP address for the cluster's QUIC traffic.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address other nodes reach this one at, when --listen is a wildcard.
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// TCP address of the HTTP status page and API.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// A node of the cluster to join through (repeatable).
    #[arg(long, value_name = "HOST:PORT")]
    pub join: Vec<String>,
    /// Configuration file (TOML).
    #[arg(long, env = "CAPY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Board profile to apply (`capy boards` lists them).
    #[arg(long)]
    pub board: Option<String>,
    /// Log filter, e.g. `info` or `capy=debug`.
    #[arg(long, env = "CAPY_LOG")]
    pub log: Option<String>,
    /// Podman's API socket for function containers.
    #[arg(long, env = "CAPY_PODMAN_SOCKET", value_name = "PATH")]
    pub podman_socket: Option<PathBuf>,
    /// Extra HTTP listener serving only presigned blob URLs.
    #[arg(long, value_name = "ADDR")]
    pub blob_http: Option<SocketAddr>,
    /// Base URL put into presigned blob URLs (e.g. as function containers
    /// reach this node).
    #[arg(long, value_name = "URL")]
    pub blob_url: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The node's HTTP address.
    #[arg(long, env = "CAPY_NODE", default_value = "http://127.0.0.1:7070")]
    pub node: String,
    /// Bucket (app) of the key.
    #[arg(long, default_value = "default")]
    pub bucket: String,
}

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Create a CA in DIR (its key is written with mode 0600).
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate signed by the CA in DIR into OUT.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 1)]
        max_vnodes: u32,
        #[arg(long, default_value = "default")]
        zone: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct SimArgs {
    #[command(subcommand)]
    pub what: Option<SimCmd>,
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    #[arg(long, default_value_t = 10000)]
    pub lookups: usize,
    #[arg(long, default_value_t = 0.0)]
    pub fail_fraction: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum SimCmd {
    /// Subscription latency: publish through Scribe trees vs polling.
    Subscribe {
        #[arg(long, default_value_t = 8000)]
        nodes: usize,
        /// Subscriber counts to measure, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "100,200,400,800,1600,3200,6400"
        )]
        subscribers: Vec<usize>,
        /// Keys (trees) per subscriber count.
        #[arg(long, default_value_t = 4)]
        topics: usize,
        /// Publications per key.
        #[arg(long, default_value_t = 20)]
        publishes: usize,
        /// Polling interval of the baseline, in ms.
        #[arg(long, default_value_t = 1000)]
        poll_ms: u64,
        /// Share of nodes failing at once after the measurement (0: skip).
        #[arg(long, default_value_t = 0.05)]
        fail_fraction: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// The vnode game on a heterogeneous fleet.
    Game {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Cold-start rounds.
        #[arg(long, default_value_t = 100)]
        rounds: u32,
        /// Load-measurement epochs after the cold start.
        #[arg(long, default_value_t = 10)]
        epochs: u32,
        #[arg(long, default_value_t = 20)]
        epoch_rounds: u32,
        /// Share of nodes leaving half way through the cold start.
        #[arg(long, default_value_t = 0.0)]
        churn: f64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// keepalive, locality, subscriptions (or subscribe), replication,
    /// balance, recovery, fnrecovery (real cluster, needs --fn-image) or
    /// all (fnrecovery only with --fn-image).
    pub name: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Smaller runs (all of them within minutes).
    #[arg(long)]
    pub quick: bool,
    /// Directory for the JSON, SVG and markdown files.
    #[arg(long, default_value = "eval-out")]
    pub out: PathBuf,
    /// Azure Functions 2019 trace (invocations_per_function_md.anon.dNN.csv
    /// files) for the keep-alive replay instead of a generated trace.
    #[arg(long)]
    pub azure_dir: Option<PathBuf>,
    /// Apps sampled from the Azure trace (0: all of them).
    #[arg(long, default_value_t = 500)]
    pub azure_apps: usize,
    /// Exit with 1 when a claim is not backed by the run.
    #[arg(long)]
    pub check: bool,
    /// Function image archive (scripts/build-fn-image) for the
    /// real-cluster experiment.
    #[arg(long)]
    pub fn_image: Option<PathBuf>,
    #[arg(long, env = "CAPY_PODMAN_SOCKET", default_value = crate::containers::DEFAULT_SOCKET)]
    pub podman_socket: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum AppCmd {
    /// Register (or update) an app from its TOML file.
    Register {
        file: PathBuf,
        #[arg(long, env = "CAPY_NODE", default_value = "http://127.0.0.1:7070")]
        node: String,
    },
    /// List the registered apps.
    Ls {
        #[arg(long)]
        json: bool,
        #[arg(long, env = "CAPY_NODE", default_value = "http://127.0.0.1:7070")]
        node: String,
    },
    /// Show one app's definition.
    Show {
        name: String,
        #[arg(long, env = "CAPY_NODE", default_value = "http://127.0.0.1:7070")]
        node: String,
    },
    /// Remove an app (its keys stay in the store).
    Rm {
        name: String,
        /// Refuse unless the app belongs to this owner.
        #[arg(long)]
        owner: Option<String>,
        #[arg(long, env = "CAPY_NODE", default_value = "http://127.0.0.1:7070")]
        node: String,
    },
    /// Print the live policy state of one key, from its root.
    State {
        app: String,
        key: String,
        #[arg(long, env = "CAPY_NODE", default_value = "http://127.0.0.1:7070")]
        node: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum HandlerCmd {
    /// Run one callback and print its result, effects and logs as JSON.
    Run {
        file: PathBuf,
        #[arg(long, value_parser = ["create", "read", "update", "timer"])]
        event: String,
        /// The key's stored data (JSON).
        #[arg(long)]
        state: Option<String>,
        /// readCb's args or updateCb's new data (JSON).
        #[arg(long)]
        args: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Every callback of every shipped handler policy.
    Handlers {
        #[arg(long)]
        json: bool,
    },
    /// Start real nodes on loopback and measure put/get latency.
    Kv {
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        #[arg(long, default_value_t = 20000)]
        ops: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        #[arg(long)]
        json: bool,
    },
    /// Function cold starts and warm overhead: the container host alone,
    /// and through real nodes.
    Fn(functions::FnBenchArgs),
    /// Objects on real nodes: built-in update on one hot object, and a
    /// TASK function against the same container called directly.
    Obj(objbench::ObjBenchArgs),
}

/// Entry point of the `capy` binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    if !matches!(cli.cmd, None | Some(Cmd::Run(_))) {
        restore_sigpipe();
    }
    match cli.cmd {
        None => crate::node::run_cmd(cli.run),
        Some(Cmd::Run(args)) => crate::node::run_cmd(args),
        Some(Cmd::Ca(c)) => client::ca(c),
        Some(Cmd::Put { key, file, c }) => client::put(&c, &key, file.as_deref()),
        Some(Cmd::Get { key, out, c }) => client::get(&c, &key, out.as_deref()),
        Some(Cmd::Rm { key, c }) => client::rm(&c, &key),
        Some(Cmd::Status { json, c }) => client::status(&c, json),
        Some(Cmd::Boards { json }) => crate::node::boards::list_cmd(json),
        Some(Cmd::Vnodes { count, c }) => client::vnodes(&c, count.as_deref()),
        Some(Cmd::Pkg(c)) => objects::pkg(c),
        Some(Cmd::Obj(c)) => objects::obj(c),
        Some(Cmd::Inv { id, n }) => objects::inv(&id, &n),
        Some(Cmd::Sim(s)) => client::sim(s),
        Some(Cmd::Bench(b)) => client::bench(b),
        Some(Cmd::Eval(e)) => crate::sim::eval::eval_cmd(
            &e.name,
            &crate::sim::eval::EvalOpts {
                seed: e.seed,
                quick: e.quick,
                out: e.out,
                azure_dir: e.azure_dir,
                azure_apps: e.azure_apps,
                fn_image: e.fn_image,
                podman_socket: e.podman_socket,
            },
            e.check,
        ),
        Some(Cmd::Handler(HandlerCmd::Run {
            file,
            event,
            state,
            args,
        })) => crate::handlers::handler_run_cmd(&file, &event, state.as_deref(), args.as_deref()),
        Some(Cmd::App(c)) => apps::app(c),
        Some(Cmd::Watch {
            key,
            bucket,
            count,
            node,
        }) => apps::watch(&key, &bucket, &node, count),
        Some(Cmd::CheckStore { path }) => crate::node::check_store_cmd(&path),
        Some(Cmd::Fn(c)) => functions::run(c),
    }
}

/// Lets `capy get KEY | head` end quietly when the reader goes away, as
/// shell users expect, instead of failing on every later write. Only for
/// the short-lived client commands: a node keeps SIGPIPE ignored.
fn restore_sigpipe() {
    // SAFETY: called from main before this process starts any thread (no
    // executor, no runtime yet), so no other code can be changing signal
    // dispositions concurrently; SIG_DFL is a valid disposition for SIGPIPE
    // and `signal` has no other preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Prints a command's report as pretty JSON on stdout; the exit code
/// (`EXIT_FAILED`, with the reason on stderr, if it cannot be encoded).
pub fn print_json<T: serde::Serialize>(report: &T) -> i32 {
    match serde_json::to_string_pretty(report) {
        Ok(s) => {
            println!("{s}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("capy: cannot encode the report: {e}");
            EXIT_FAILED
        }
    }
}

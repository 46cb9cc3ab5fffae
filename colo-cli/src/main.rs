//! The `colo` command: runs COLO nodes (primary, secondary), the demo, and inspects streams.
//!
//! Exit codes: 0 success; 1 a runtime failure (a node lost its guest, a verification failed);
//! 2 bad usage or input (a bad flag, a missing file, an unreachable peer, a malformed stream).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use colo_cli::mock::{MockSpec, WorkloadKind};
use colo_cli::node::{new_status, NodeOptions, PrimaryNode, SecondaryNode, SecondaryOutcome};
use colo_cli::status::Shared;
use colo_core::compare::CompareConfig;
use colo_core::engine::{Liveness, SyncMode};
use colo_core::policy::CheckpointPolicy;

mod demo;

/// COLO virtual-machine replication: a primary and a secondary VM run side by side, their
/// outputs are compared, and a checkpoint makes the secondary an exact copy of the primary
/// whenever they differ.
#[derive(Debug, Parser)]
#[command(name = "colo", version, about, long_about = None, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXAMPLES: &str = "\
Examples:
  colo demo                                   a replicated pair on loopback, live view
  colo demo --duration 10 --json              run 10 s, print one JSON summary
  colo secondary --listen 127.0.0.1:7000 --ram 64M --client 127.0.0.1:7101
  colo primary --peer 127.0.0.1:7000 --ram 64M --client 127.0.0.1:7100
  colo stream dump checkpoint.bin             inspect a libxc migration stream

Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=colo=debug) for more.
Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the primary node: runs the PVM, connects to the secondary, sends checkpoints.
    Primary(PrimaryArgs),
    /// Run the secondary node: runs the SVM, receives checkpoints, takes over if the primary dies.
    Secondary(SecondaryArgs),
    /// Start a primary, a secondary and a client on this machine and show them live.
    Demo(demo::DemoArgs),
    /// Ask a running node for its role, state, peer, protection and recent checkpoints.
    Status {
        /// The node's name (its control socket is <runtime dir>/<name>.sock).
        #[arg(long, default_value = "primary")]
        name: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Force a failover on a running node: a secondary takes over, a primary drops protection.
    Failover {
        /// The node's name.
        #[arg(long)]
        name: String,
    },
    /// Inspect Xen libxc migration streams.
    Stream {
        #[command(subcommand)]
        command: StreamCommand,
    },
}

#[derive(Debug, Subcommand)]
enum StreamCommand {
    /// Print a stream's headers and records; exit 2 if it is malformed.
    Dump {
        /// The stream file, or `-` for standard input.
        file: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Settings shared by both node roles.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Guest RAM size (e.g. 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub ram: u64,
    /// Back guest RAM by this file (under /dev/shm, kept for inspection) instead of a memfd.
    #[arg(long)]
    pub ram_file: Option<PathBuf>,
    /// The guest's workload.
    #[arg(long, value_enum, default_value = "kv")]
    pub workload: WorkloadKind,
    /// kv: place entries by per-VM randomness so the replicas' memories differ.
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub memory_divergence: bool,
    /// kv: fraction of responses carrying a per-VM value, so outputs differ.
    #[arg(long, default_value_t = 0.0)]
    pub output_divergence: f64,
    /// dirty: pages dirtied per millisecond.
    #[arg(long, default_value_t = 100)]
    pub dirty_rate: u64,
    /// Per-VM entropy seed (default: random).
    #[arg(long)]
    pub vm_seed: Option<u64>,
    /// Client-facing address of the mock network path.
    #[arg(long)]
    pub client: Option<String>,
    /// Digest all memory after every checkpoint and compare both sides.
    #[arg(long)]
    pub verify: bool,
    /// File holding the link's pre-shared key (both nodes need the same).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Heartbeat interval, ms.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_interval_ms: u64,
    /// Declare the peer lost after this much silence, ms.
    #[arg(long, default_value_t = 500)]
    pub heartbeat_timeout_ms: u64,
    /// Command run before taking over; no takeover if it fails (split-brain fencing).
    #[arg(long)]
    pub fence_cmd: Option<String>,
    /// Write this node's status as JSON to this file every 200 ms.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// How long to wait for the peer, s.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// Node name for the control socket (`colo status --name`, `colo failover --name`);
    /// default: the role.
    #[arg(long)]
    pub name: Option<String>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9100).
    #[arg(long)]
    pub metrics: Option<String>,
}

#[derive(Debug, Args)]
struct PrimaryArgs {
    /// The secondary's replication address (HOST:PORT).
    #[arg(long)]
    peer: String,
    #[command(flatten)]
    node: NodeArgs,
    /// backchannel (D = A ∪ B, correct) or primary-only (D = A, to show why B is needed).
    #[arg(long, default_value = "backchannel")]
    sync_mode: SyncMode,
    /// Minimum time between checkpoints, ms.
    #[arg(long, default_value_t = CheckpointPolicy::default().min_interval.as_millis() as u64)]
    min_interval_ms: u64,
    /// Maximum time between checkpoints (periodic checkpoint), ms.
    #[arg(long, default_value_t = CheckpointPolicy::default().max_interval.as_millis() as u64)]
    max_interval_ms: u64,
    /// A primary frame held this long without its secondary twin forces a checkpoint, ms.
    #[arg(long, default_value_t = CompareConfig::default().timeout.as_millis() as u64)]
    compare_timeout_ms: u64,
}

#[derive(Debug, Args)]
struct SecondaryArgs {
    /// Address to listen on for the primary (HOST:PORT).
    #[arg(long)]
    listen: String,
    #[command(flatten)]
    node: NodeArgs,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let unit = t[i..].to_ascii_lowercase();
            let m = match unit.as_str() {
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                _ => return Err(format!("`{s}`: unknown unit (use K, M or G)")),
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 64M, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("`{s}`: expected on or off")),
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("colo: error: {e:#}");
            2
        }
    });
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Primary(a) => run_primary(a),
        Command::Secondary(a) => run_secondary(a),
        Command::Demo(a) => demo::run(a),
        Command::Status { name, json } => {
            let v = colo_cli::control::request(&colo_cli::control::socket_path(&name), "status")?;
            if json {
                println!("{v}");
            } else {
                print!("{}", colo_cli::control::format_status(&v));
            }
            Ok(0)
        }
        Command::Failover { name } => {
            colo_cli::control::request(&colo_cli::control::socket_path(&name), "failover")?;
            println!("failover requested on {name}");
            Ok(0)
        }
        Command::Stream {
            command: StreamCommand::Dump { file, json },
        } => stream_dump(&file, json),
    }
}

fn stream_dump(file: &str, json: bool) -> Result<i32> {
    let mut input: Box<dyn std::io::Read> = if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("opening stream file `{file}`"))?,
        ))
    };
    let mut out = std::io::stdout().lock();
    match colo_cli::dump::dump(&mut input, json, &mut out) {
        Ok(_) => Ok(0),
        Err(e) => {
            eprintln!("colo: {file}: {e}");
            Ok(2)
        }
    }
}

fn node_options(a: &NodeArgs) -> Result<NodeOptions> {
    let key = match &a.key_file {
        Some(p) => {
            let k =
                std::fs::read(p).with_context(|| format!("reading key file `{}`", p.display()))?;
            let k = k.trim_ascii().to_vec();
            anyhow::ensure!(!k.is_empty(), "key file `{}` is empty", p.display());
            Some(k)
        }
        None => None,
    };
    anyhow::ensure!(
        a.heartbeat_timeout_ms > a.heartbeat_interval_ms,
        "--heartbeat-timeout-ms ({}) must exceed --heartbeat-interval-ms ({})",
        a.heartbeat_timeout_ms,
        a.heartbeat_interval_ms
    );
    Ok(NodeOptions {
        liveness: Liveness {
            interval: Duration::from_millis(a.heartbeat_interval_ms),
            timeout: Duration::from_millis(a.heartbeat_timeout_ms),
            ..Liveness::default()
        },
        verify: a.verify,
        key,
        client_addr: a.client.clone(),
        fence_cmd: a.fence_cmd.clone(),
        connect_timeout: Duration::from_secs(a.connect_timeout),
        ..NodeOptions::default()
    })
}

fn mock_spec(a: &NodeArgs) -> MockSpec {
    MockSpec {
        ram: a.ram,
        ram_file: a.ram_file.clone(),
        workload: a.workload,
        vm_seed: a.vm_seed.unwrap_or_else(rand::random),
        memory_divergence: a.memory_divergence,
        output_divergence: a.output_divergence,
        dirty_rate: a.dirty_rate,
    }
}

/// Writes the status as JSON to `path` every 200 ms (atomically, by rename).
fn status_writer(path: Option<PathBuf>, status: Shared) {
    let Some(path) = path else { return };
    let _ = std::thread::Builder::new()
        .name("colo-status".into())
        .spawn(move || loop {
            let v = colo_cli::status::to_json(&status.lock());
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, v.to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
            std::thread::sleep(Duration::from_millis(200));
        });
}

/// Starts the control socket and the metrics endpoint of a node.
fn control(
    a: &NodeArgs,
    role: &str,
    status: &Shared,
) -> Result<(
    colo_cli::control::ControlServer,
    crossbeam_channel::Receiver<colo_cli::control::ControlCommand>,
)> {
    let name = a.name.clone().unwrap_or_else(|| role.to_string());
    let (tx, rx) = crossbeam_channel::unbounded();
    let server =
        colo_cli::control::serve(&colo_cli::control::socket_path(&name), status.clone(), tx)?;
    if let Some(addr) = &a.metrics {
        colo_cli::metrics::serve(addr, status.clone())?;
    }
    Ok((server, rx))
}

fn install_ctrlc(flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
}

fn run_primary(a: PrimaryArgs) -> Result<i32> {
    anyhow::ensure!(
        a.max_interval_ms >= a.min_interval_ms,
        "--max-interval-ms ({}) must be at least --min-interval-ms ({})",
        a.max_interval_ms,
        a.min_interval_ms
    );
    let mut opts = node_options(&a.node)?;
    opts.sync_mode = a.sync_mode;
    opts.policy = CheckpointPolicy {
        min_interval: Duration::from_millis(a.min_interval_ms),
        max_interval: Duration::from_millis(a.max_interval_ms),
    };
    opts.compare.timeout = Duration::from_millis(a.compare_timeout_ms);
    let mut guest = colo_mock_guest(&a.node)?;
    colo_core::Domain::resume(&mut guest)?;
    let status = new_status();
    status_writer(a.node.status_file.clone(), status.clone());
    let (_control, commands) = control(&a.node, "primary", &status)?;
    let mut node = PrimaryNode::connect(guest, &a.peer, opts, status)?;
    node.set_commands(commands);
    install_ctrlc(node.stop_flag());
    node.run()?;
    Ok(0)
}

fn colo_mock_guest(a: &NodeArgs) -> Result<colo_mock::MockDomain> {
    colo_cli::mock::build(&mock_spec(a))
}

fn run_secondary(a: SecondaryArgs) -> Result<i32> {
    let opts = node_options(&a.node)?;
    let guest = colo_mock_guest(&a.node)?;
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("listening on `{}`", a.listen))?;
    let status = new_status();
    status_writer(a.node.status_file.clone(), status.clone());
    let (_control, commands) = control(&a.node, "secondary", &status)?;
    let mut node = SecondaryNode::accept(guest, &listener, opts, status)?;
    node.set_commands(commands);
    let stop = node.stop_flag();
    install_ctrlc(stop.clone());
    match node.run()? {
        SecondaryOutcome::Stopped => Ok(0),
        SecondaryOutcome::TookOver(mut primary) => {
            let flag = primary.stop_flag();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                flag.store(true, Ordering::Relaxed);
            });
            primary.run()?;
            Ok(0)
        }
    }
}

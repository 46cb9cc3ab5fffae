//! The `colo` command: runs COLO nodes (primary, secondary), the demo, and inspects streams.
//!
//! Exit codes: 0 success; 1 a runtime failure (a node lost its guest, a verification failed);
//! 2 bad usage or input (a bad flag, a missing file, an unreachable peer, a malformed or
//! truncated stream). `colo protect` exits 1 when the node answers that protection did not start.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use colo_cli::config::{parse_size, Config};
use colo_cli::mock::{MockSpec, WorkloadKind};
use colo_cli::node::{new_status, NodeOptions, PrimaryNode, SecondaryNode, SecondaryOutcome};
use colo_cli::status::Shared;
use colo_core::compare::CompareConfig;
use colo_core::engine::{Liveness, SyncMode};
use colo_core::policy::CheckpointPolicy;
use colo_core::stream::{Codec, PageCoding};
use colo_core::{Guest, Snapshot};

mod demo;
mod save;

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
  colo primary --config /etc/colo/primary.toml
  colo status --name primary                  ask a running node how it is doing
  colo save --ram 64M --workload kv --seconds 2 --out vm.img
  colo stream dump vm.img                     inspect a libxc migration stream

Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=colo=debug) for more.
Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input.";

const PRIMARY_EXAMPLES: &str = "\
Examples:
  colo primary --peer 10.0.0.2:7000 --ram 1G --client 0.0.0.0:7100 --key-file /etc/colo/key
  colo primary --config /etc/colo/node.toml --verify      flags win over the file
  colo primary --backend xen --domid 7 --peer 10.0.0.2:7000    (built with --features xen)
  colo primary --backend xen --domid 7 --vif vif7.0 --service-if colo0 --peer 10.0.0.2:7000
                  the guest's service through colo: requests from colo0 (a port on the service
                  bridge) go to vif7.0 and are mirrored; its answers leave on colo0 once
                  released (see docs/operations.md, \"Xen: the network path\")
  colo primary --peer 10.0.0.2:7000 --key-file /etc/colo/key --insecure-plaintext ...
                  benchmarks only: the records go unencrypted (give it to both nodes)

Config file (TOML): every key is the flag's name with '-' written as '_', e.g.
  peer = \"10.0.0.2:7000\"
  ram = \"1G\"
  key_file = \"/etc/colo/key\"
  max_interval_ms = 2000
Keys that do not apply to the primary (listen) are ignored, so one file can serve both nodes.
Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input (incl. an unreachable peer).";

const SECONDARY_EXAMPLES: &str = "\
Examples:
  colo secondary --listen 0.0.0.0:7000 --ram 1G --client 0.0.0.0:7100 --key-file /etc/colo/key
  colo secondary --config /etc/colo/node.toml --heartbeat-timeout-ms 1000
  colo secondary --listen 0.0.0.0:7000 --fence-cmd 'ssh pvm-bmc power off'
  colo secondary --backend xen --domid 9 --vif vif9.0 --service-if colo0 --listen 0.0.0.0:7000
                  the SVM's vif; after a takeover the guest serves on colo0 and its addresses
                  are announced there (gratuitous ARP, unsolicited NA)

Config file (TOML): every key is the flag's name with '-' written as '_', e.g.
  listen = \"0.0.0.0:7000\"
  ram = \"1G\"
  heartbeat_timeout_ms = 1000
Keys that only the primary uses (peer, sync_mode, min_interval_ms, max_interval_ms,
compare_timeout_ms) are ignored, so one file can serve both nodes.
Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input.";

const STATUS_EXAMPLES: &str = "\
Examples:
  colo status                        the node named `primary`
  colo status --name secondary --json";

const PROTECT_EXAMPLES: &str = "\
Examples:
  colo secondary --listen 10.0.0.3:7000 --ram 64M --client 10.0.0.3:7100   (new secondary)
  colo protect --name secondary --peer 10.0.0.3:7000   (on the survivor of a failover)

It waits for the node's answer: the node connects (on a helper thread: it keeps serving its
clients meanwhile) and runs the link handshake with the new secondary.
Exit codes: 0 protection started (connected, handshake passed: re-synchronising); 1 it did not
(the node is not an unprotected primary, the peer could not be reached within
--connect-timeout, or the handshake refused it; the reason is printed); 2 bad usage or no node
of that name.";

const FAILOVER_EXAMPLES: &str = "\
Examples:
  colo failover --name secondary     the secondary takes over now
  colo failover --name primary       the primary drops the secondary and runs unprotected";

const SAVE_EXAMPLES: &str = "\
Examples:
  colo save --ram 64M --workload kv --seconds 2 --out vm.img
  colo save --backend xen --domid 7 --out dom7.img     (built with --features xen)
  colo stream dump vm.img && colo restore --in vm.img --ram 64M --workload kv

The file is a plain libxc migration stream v3 (image and domain header, CPUID/MSR policies,
STATIC_DATA_END, PAGE_DATA for every page, X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS, END).
A mock guest's vCPU state travels in HVM_CONTEXT.";

const RESTORE_EXAMPLES: &str = "\
Examples:
  colo restore --in vm.img --ram 64M --workload kv --seconds 2
  colo restore --in vm.img --ram 64M --workload dirty --seconds 0   load and verify only

--ram and --workload must match the saved guest. Exit 2 on a malformed stream (the error
names the byte offset), 1 if the restored guest's memory differs from the stream or it faults.";

const DUMP_EXAMPLES: &str = "\
Examples:
  colo stream dump vm.img
  colo stream dump --json - < vm.img

Exit codes: 0 a whole stream (it ends with an END record); 2 the file cannot be read, the
stream is malformed (the error names the byte offset), or it is truncated: it stops without an
END record, as Xen's verify-stream-v2 reports (the records read are printed first).";

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the primary node: runs the PVM, connects to the secondary, sends checkpoints.
    #[command(after_help = PRIMARY_EXAMPLES)]
    Primary(PrimaryArgs),
    /// Run the secondary node: runs the SVM, receives checkpoints, takes over if the primary dies.
    #[command(after_help = SECONDARY_EXAMPLES)]
    Secondary(SecondaryArgs),
    /// Start a primary, a secondary and a client on this machine and show them live.
    #[command(after_help = demo::EXAMPLES)]
    Demo(demo::DemoArgs),
    /// Ask a running node for its role, state, peer, protection and recent checkpoints.
    #[command(after_help = STATUS_EXAMPLES)]
    Status {
        /// The node's name (its control socket is <runtime dir>/<name>.sock).
        #[arg(long, default_value = "primary")]
        name: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Force a failover on a running node: a secondary takes over, a primary drops protection.
    #[command(after_help = FAILOVER_EXAMPLES)]
    Failover {
        /// The node's name.
        #[arg(long)]
        name: String,
    },
    /// Re-protect an unprotected primary (e.g. the survivor of a failover): it connects to a
    /// new secondary and re-synchronises it while its guest keeps running.
    #[command(after_help = PROTECT_EXAMPLES)]
    Protect {
        /// The running node's name.
        #[arg(long)]
        name: String,
        /// The new secondary's replication address (HOST:PORT).
        #[arg(long)]
        peer: String,
        /// How long the node keeps trying to reach the new secondary, s.
        #[arg(long, default_value_t = 30)]
        connect_timeout: u64,
        /// Check with the pair's arbiter first (etcd://HOST:PORT[,...]): the node must be the
        /// one holding the pair's serving key, or nothing is asked of it.
        #[arg(long, value_name = "URL")]
        arbiter: Option<String>,
        /// The pair's name in the arbiter.
        #[arg(long, value_name = "NAME", default_value = "colo")]
        arbiter_pair: String,
    },
    /// Write a full snapshot of a VM in Xen's libxc migration stream format.
    #[command(after_help = SAVE_EXAMPLES)]
    Save(SaveArgs),
    /// Load a snapshot written by `colo save` into a fresh mock VM, verify it and run it.
    #[command(after_help = RESTORE_EXAMPLES)]
    Restore(RestoreArgs),
    /// Inspect Xen libxc migration streams.
    Stream {
        #[command(subcommand)]
        command: StreamCommand,
    },
}

#[derive(Debug, Subcommand)]
enum StreamCommand {
    /// Print a stream's headers and records; exit 2 if it is malformed or truncated (no END).
    #[command(after_help = DUMP_EXAMPLES)]
    Dump {
        /// The stream file, or `-` for standard input.
        file: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Which hypervisor runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// colo-mock: a simulated VM in this process (for development, tests and the demo).
    Mock,
    /// A live Xen domain (`--domid`); needs a colo built with `--features xen`, run in dom0.
    Xen,
}

/// Page compression on the link (`--compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compress {
    /// Raw pages.
    None,
    /// lz4 (fast; about 2–3 GB/s per core to decompress).
    Lz4,
}

#[cfg(not(feature = "xen"))]
const NO_XEN: &str = "this colo was built without Xen support; rebuild with --features xen";

/// Settings shared by both node roles.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Read settings from this TOML file; flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The guest's hypervisor.
    #[arg(long, value_enum, default_value = "mock")]
    pub backend: Backend,
    /// Xen domain id of the guest (--backend xen).
    #[arg(long)]
    pub domid: Option<u32>,
    /// Xen: the guest's event-channel upcall vector, delivered to every vCPU when a domain
    /// resumes from a loaded checkpoint (the copied memory may show events pending that this
    /// domain's Xen never raised, and Xen then skips the upcall for new ones). 0xf3 is Linux's
    /// (HYPERVISOR_CALLBACK_VECTOR); `none` delivers nothing. A vector the guest registered in
    /// HVM_PARAM_CALLBACK_IRQ takes precedence.
    #[arg(long, default_value = "0xf3", value_parser = colo_cli::config::parse_vector)]
    pub upcall_vector: colo_cli::config::UpcallVector,
    /// Guest RAM size (e.g. 64M, 1G; --backend mock).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub ram: u64,
    /// Back guest RAM by this file (under /dev/shm, kept for inspection) instead of a memfd.
    #[arg(long)]
    pub ram_file: Option<PathBuf>,
    /// The guest's workload (--backend mock).
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
    /// Give the mock guest a virtual disk of this size (e.g. 64MiB), replicated with every
    /// checkpoint (the kv workload persists its table to it). Both nodes need one; the
    /// secondary's must be at least as large.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub disk: Option<u64>,
    /// The disk's image file (sparse; created if missing). A primary keeps what it holds and
    /// sends it; a secondary empties it first. Default: an anonymous in-memory file.
    #[arg(long, value_name = "PATH")]
    pub disk_file: Option<PathBuf>,
    /// dirty: disk blocks (4 KiB) written per millisecond (needs --disk).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub disk_rate: u64,
    /// Per-VM entropy seed (default: random).
    #[arg(long)]
    pub vm_seed: Option<u64>,
    /// Client-facing address of the mock network path.
    #[arg(long)]
    pub client: Option<String>,
    /// Xen: the guest's vif in dom0 (e.g. vif7.0, created by netback; not on a bridge): colo
    /// injects requests into it and reads the guest's frames from it. Needs --service-if.
    #[arg(long, value_name = "IFACE")]
    pub vif: Option<String>,
    /// Xen: colo serves the guest's network device itself: a PV vif with this MAC (e.g.
    /// 00:16:3e:12:34:56) is plugged into the domain, its xenstore nodes under
    /// backend/colo-vif, and the guest's netfront connects to colo (no netback, no vifD.0).
    /// Both nodes plug it at start, so the guest must have booted with xen-netfront. Needs
    /// --service-if; instead of --vif.
    #[arg(long, value_name = "MAC")]
    pub pv_vif: Option<String>,
    /// Seconds to wait for the guest's netfront to connect to --pv-vif.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub pv_vif_timeout: u64,
    /// Xen: colo serves the guest's disk itself from this image (a plain file, a multiple of
    /// 4096 bytes): a PV disk xvda is plugged into the domain, its xenstore nodes under
    /// backend/colo-vbd, and the guest's blkfront connects to colo (no blkback, no `disk=` in
    /// the xl config). The image is replicated like the mock's --disk; the secondary's image
    /// is emptied at start (keeping its size, at least the primary's) and filled from the
    /// primary's. Both nodes plug it at start, after --pv-vif.
    #[arg(long, value_name = "IMAGE")]
    pub pv_vbd: Option<PathBuf>,
    /// Seconds to wait for the guest's blkfront to connect to --pv-vbd.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub pv_vbd_timeout: u64,
    /// Xen: the service network's interface (e.g. colo0, a tap or veth port on the service
    /// bridge, or a NIC): frames arriving there are requests for the guest, released output
    /// leaves there, and a secondary that took over serves and announces the guest there.
    #[arg(long, value_name = "IFACE")]
    pub service_if: Option<String>,
    /// Digest all memory after every checkpoint and compare both sides.
    #[arg(long)]
    pub verify: bool,
    /// Secondary, diagnostic: do not align TCP sequence numbers between the PVM and the SVM.
    /// Every TCP connection opened since the last checkpoint then costs a mismatch checkpoint
    /// (the figure `mismatch_checkpoints` shows the cost of going without).
    #[arg(long)]
    pub no_tcp_align: bool,
    /// Primary: sweep all memory at this many first captures (checkpoint 0 included) for pages
    /// the hypervisor writes behind the dirty log; they are re-read at every later capture.
    /// Default: 3 with --backend xen (Xen writes vcpu_info and shared_info unlogged), 0 with
    /// --backend mock.
    #[arg(long, value_name = "N")]
    pub unlogged_sweeps: Option<u32>,
    /// File holding the link's pre-shared key (both nodes need the same). With a key, the
    /// handshake authenticates the peer and every record after it is encrypted and
    /// authenticated (AES-256-GCM); without one the link is plain TCP, open to anyone on the
    /// path.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Keep the records after the authenticated handshake unencrypted (for benchmarks, or to
    /// read the stream with Xen's verify-stream-v2). Both nodes need it, or neither: a
    /// mismatch is refused at the handshake.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Compress page data on the link (none or lz4): for links slower than memory. Both nodes
    /// need the same; the handshake refuses a mismatch.
    #[arg(long, value_enum, default_value = "none")]
    pub compress: Compress,
    /// Send zero pages as a marker without their 4096 bytes. Both nodes need it, or neither.
    #[arg(long)]
    pub zero_pages: bool,
    /// Carry the link on N TCP connections (1–16): after the handshake each side's bytes go
    /// round-robin in frames over them (the order of the records is kept), for links where one
    /// connection is slower than the link. The side that connects opens the other N-1. Both
    /// nodes need the same; the handshake refuses a mismatch.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=16))]
    pub streams: u8,
    /// How the disk's blocks travel (with --disk): `continuous` sends the blocks the guest
    /// writes while it runs (every --disk-mirror-interval-ms), so a checkpoint's pause copies
    /// only those written since the last round; `checkpoint` copies every block written since
    /// the last checkpoint within the pause. Both nodes need the same; the handshake refuses a
    /// mismatch.
    #[arg(long, value_name = "MODE", default_value = "continuous")]
    pub disk_mirror: colo_core::disk::DiskMirror,
    /// Primary, --disk-mirror continuous: how often the blocks written since the last round
    /// are sent, ms.
    #[arg(long, value_name = "MS", default_value_t = 2)]
    pub disk_mirror_interval_ms: u64,
    /// Heartbeat interval, ms.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_interval_ms: u64,
    /// Declare the peer lost after this much silence, ms.
    #[arg(long, default_value_t = 500)]
    pub heartbeat_timeout_ms: u64,
    /// Declare the peer stuck when a checkpoint step awaited from it takes longer than this, ms
    /// (a live but hung peer; raise it for huge guests or slow hypervisors).
    #[arg(long, default_value_t = 10_000)]
    pub progress_timeout_ms: u64,
    /// Command run before this node goes on alone (a secondary's takeover, a primary's
    /// unprotected run); if it fails the node stops instead (split-brain fencing).
    #[arg(long)]
    pub fence_cmd: Option<String>,
    /// Let an etcd v3 cluster decide which node serves: etcd://HOST:PORT[,HOST:PORT...]. The
    /// primary holds the pair's serving key under a lease; a secondary takes over only once it
    /// holds the key (see docs/operations.md, "The arbiter").
    #[arg(long, value_name = "URL")]
    pub arbiter: Option<String>,
    /// The pair's name in the arbiter (the key is /colo/NAME/serving); the same on both nodes.
    #[arg(long, value_name = "NAME", default_value = "colo")]
    pub arbiter_pair: String,
    /// The arbiter lease's time to live, s: a dead primary's key passes after about this long.
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    pub arbiter_ttl: u64,
    /// When a failure finds the arbiter unreachable (no takeover without it): keep trying
    /// (`wait`) or exit 1 (`exit`).
    #[arg(long, value_enum, default_value = "wait")]
    pub arbiter_unreachable: colo_cli::arbiter::Unreachable,
    /// Write this node's status as JSON to this file every 200 ms.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// How long to wait for the peer, s. A node that has to wait says so once (the address and
    /// the time left), then retries quietly.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// Node name for the control socket (`colo status --name`, `colo failover --name`);
    /// default: the role.
    #[arg(long)]
    pub name: Option<String>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9100).
    #[arg(long)]
    pub metrics: Option<String>,
    /// When the node stops while it is the primary, save its VM to this file (`colo demo
    /// --save`).
    #[arg(long, hide = true)]
    pub save_on_exit: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PrimaryArgs {
    /// The secondary's replication address (HOST:PORT); required, here or in the config file.
    #[arg(long)]
    peer: Option<String>,
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
    /// Address to listen on for the primary (HOST:PORT); required, here or in the config file.
    #[arg(long)]
    listen: Option<String>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
struct SaveArgs {
    /// The VM's hypervisor: a fresh mock guest, or a live Xen domain.
    #[arg(long, value_enum, default_value = "mock")]
    backend: Backend,
    /// Xen domain id (--backend xen).
    #[arg(long)]
    domid: Option<u32>,
    /// Mock guest RAM size.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    ram: u64,
    /// Mock guest workload.
    #[arg(long, value_enum, default_value = "kv")]
    workload: WorkloadKind,
    /// Let the mock guest run this many seconds before it is paused and saved.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Mock guest entropy seed (default: random).
    #[arg(long)]
    vm_seed: Option<u64>,
    /// The snapshot file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// The snapshot file (`-` for standard input).
    #[arg(long = "in", value_name = "FILE")]
    input: String,
    /// RAM size of the new mock guest (must hold every saved pfn).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    ram: u64,
    /// Workload of the new mock guest (must match the saved one).
    #[arg(long, value_enum, default_value = "kv")]
    workload: WorkloadKind,
    /// Run the restored guest this many seconds (0: load and verify only).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("`{s}`: expected on or off")),
    }
}

/// Config keys only one role uses; the other ignores them.
const PRIMARY_ONLY: &[&str] = &[
    "peer",
    "sync_mode",
    "min_interval_ms",
    "max_interval_ms",
    "compare_timeout_ms",
];
const SECONDARY_ONLY: &[&str] = &["listen"];

/// Config keys that are flags without a value (given when true).
const BOOLEAN_FLAGS: &[&str] = &["verify", "insecure_plaintext"];

/// The config file's settings as `--flag=value` arguments, for every key set in the file whose
/// flag was not given on the command line (`matches` are the subcommand's).
fn config_args(cfg: &Config, role: &str, matches: &ArgMatches) -> Vec<OsString> {
    let os = |p: &Path| p.as_os_str().to_owned();
    let entries: Vec<(&str, Option<OsString>)> = vec![
        ("backend", cfg.backend.clone().map(Into::into)),
        ("ram", cfg.ram.map(|v| v.to_string().into())),
        ("ram_file", cfg.ram_file.as_deref().map(os)),
        ("workload", cfg.workload.clone().map(Into::into)),
        ("domid", cfg.domid.map(|v| v.to_string().into())),
        ("upcall_vector", cfg.upcall_vector.clone().map(Into::into)),
        ("peer", cfg.peer.clone().map(Into::into)),
        ("listen", cfg.listen.clone().map(Into::into)),
        ("client", cfg.client.clone().map(Into::into)),
        ("vif", cfg.vif.clone().map(Into::into)),
        ("pv_vif", cfg.pv_vif.clone().map(Into::into)),
        ("pv_vbd", cfg.pv_vbd.as_deref().map(os)),
        ("service_if", cfg.service_if.clone().map(Into::into)),
        ("sync_mode", cfg.sync_mode.clone().map(Into::into)),
        ("key_file", cfg.key_file.as_deref().map(os)),
        // A boolean flag: present or absent, no value.
        ("verify", cfg.verify.filter(|&v| v).map(|_| OsString::new())),
        (
            "insecure_plaintext",
            cfg.insecure_plaintext
                .filter(|&v| v)
                .map(|_| OsString::new()),
        ),
        (
            "min_interval_ms",
            cfg.min_interval_ms.map(|v| v.to_string().into()),
        ),
        (
            "max_interval_ms",
            cfg.max_interval_ms.map(|v| v.to_string().into()),
        ),
        (
            "compare_timeout_ms",
            cfg.compare_timeout_ms.map(|v| v.to_string().into()),
        ),
        (
            "heartbeat_interval_ms",
            cfg.heartbeat_interval_ms.map(|v| v.to_string().into()),
        ),
        (
            "heartbeat_timeout_ms",
            cfg.heartbeat_timeout_ms.map(|v| v.to_string().into()),
        ),
        ("fence_cmd", cfg.fence_cmd.clone().map(Into::into)),
        ("arbiter", cfg.arbiter.clone().map(Into::into)),
        ("arbiter_pair", cfg.arbiter_pair.clone().map(Into::into)),
        ("arbiter_ttl", cfg.arbiter_ttl.map(|v| v.to_string().into())),
        (
            "arbiter_unreachable",
            cfg.arbiter_unreachable.clone().map(Into::into),
        ),
        ("metrics", cfg.metrics.clone().map(Into::into)),
        ("name", cfg.name.clone().map(Into::into)),
        (
            "output_divergence",
            cfg.output_divergence.map(|v| v.to_string().into()),
        ),
        (
            "memory_divergence",
            cfg.memory_divergence
                .map(|v| if v { "on" } else { "off" }.into()),
        ),
    ];
    let skip = if role == "primary" {
        SECONDARY_ONLY
    } else {
        PRIMARY_ONLY
    };
    let mut out = Vec::new();
    for (key, value) in entries {
        let Some(value) = value else { continue };
        if skip.contains(&key) || matches.value_source(key) == Some(ValueSource::CommandLine) {
            continue;
        }
        let mut arg = OsString::from(format!("--{}", key.replace('_', "-")));
        if !value.is_empty() || !BOOLEAN_FLAGS.contains(&key) {
            arg.push("=");
            arg.push(value);
        }
        out.push(arg);
    }
    out
}

/// Exits on a clap outcome: --help/--version print as clap does (exit 0); a usage error prints
/// one line (exit 2).
fn clap_exit(e: clap::Error) -> ! {
    if !e.use_stderr() {
        let _ = e.print();
        std::process::exit(0);
    }
    let msg = e.to_string();
    let first = msg.lines().next().unwrap_or("bad usage");
    eprintln!("colo: {first} (see `colo --help` or `colo <command> --help`)",);
    std::process::exit(2);
}

/// Parses the command line, merging a node's `--config` file under its flags.
fn parse_cli() -> Result<Cli> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let matches = Cli::command()
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| clap_exit(e));
    if let Some((role @ ("primary" | "secondary"), sub)) = matches.subcommand() {
        if let Some(path) = sub.get_one::<PathBuf>("config") {
            let cfg = colo_cli::config::load(path)?;
            let extra = config_args(&cfg, role, sub);
            if !extra.is_empty() {
                args.extend(extra);
                let merged = Cli::command().try_get_matches_from(&args).map_err(|e| {
                    let msg = e.to_string();
                    let first = msg
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim_start_matches("error: ");
                    anyhow::anyhow!("config file {}: {first}", path.display())
                })?;
                return Cli::from_arg_matches(&merged).map_err(|e| anyhow::anyhow!("{e}"));
            }
        }
    }
    Cli::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{e}"))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = parse_cli().and_then(run);
    std::process::exit(match result {
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
            let report: colo_cli::status::StatusReport = serde_json::from_value(v.clone())
                .with_context(|| format!("node `{name}` answered a malformed status"))?;
            if json {
                println!("{v}");
            } else {
                print!("{}", colo_cli::control::format_status(&report));
            }
            Ok(0)
        }
        Command::Failover { name } => {
            colo_cli::control::request(&colo_cli::control::socket_path(&name), "failover")?;
            println!("failover requested on {name}");
            Ok(0)
        }
        Command::Protect {
            name,
            peer,
            connect_timeout,
            arbiter,
            arbiter_pair,
        } => {
            if let Some(url) = arbiter {
                if let Err(e) = protect_check_arbiter(&name, &url, &arbiter_pair) {
                    eprintln!("colo: error: {e:#}");
                    return Ok(1);
                }
            }
            protect(&name, &peer, connect_timeout)
        }
        Command::Save(a) => run_save(a),
        Command::Restore(a) => run_restore(a),
        Command::Stream {
            command: StreamCommand::Dump { file, json },
        } => stream_dump(&file, json),
    }
}

/// `colo protect --arbiter`: the node asked to re-protect must be the one the arbiter names as
/// serving (it holds the pair's key under its lease); a node that lost the key must not pull a
/// new secondary into a pair another node serves.
fn protect_check_arbiter(name: &str, url: &str, pair: &str) -> Result<()> {
    let mut etcd = colo_cli::etcd::Etcd::parse(url, Duration::from_secs(2)).context("--arbiter")?;
    let key = format!("/colo/{pair}/serving");
    let holder = etcd
        .get(&key)
        .context("asking the arbiter who serves")?
        .map(|kv| kv.value);
    let v = colo_cli::control::request(&colo_cli::control::socket_path(name), "status")?;
    let node: colo_cli::status::StatusReport =
        serde_json::from_value(v).context("reading the node's status")?;
    let Some(arb) = node.node.arbiter else {
        bail!("{name} runs without --arbiter; start it with the pair's arbiter to use one here");
    };
    anyhow::ensure!(
        arb.key == key,
        "{name} uses the arbiter key {}, not {key} (another --arbiter-pair?)",
        arb.key
    );
    match holder {
        Some(h) if arb.holding && arb.holder.as_deref() == Some(h.as_str()) => {
            println!(
                "{name}: holds {key} (lease {:.1} s left)",
                arb.lease_remaining_ms as f64 / 1e3
            );
            Ok(())
        }
        Some(h) => bail!(
            "the arbiter names {h} as the serving node of {key}, not {name}: it must not be \
             re-protected"
        ),
        None => bail!("nobody holds {key}: {name} is not serving under the arbiter"),
    }
}

/// `colo protect`: 0 once the node started re-protecting, 1 when it answered that it did not.
fn protect(name: &str, peer: &str, connect_timeout: u64) -> Result<i32> {
    anyhow::ensure!(
        connect_timeout <= 86_400,
        "--connect-timeout must be at most 86400 s, got {connect_timeout}"
    );
    let timeout = Duration::from_secs(connect_timeout);
    let res = colo_cli::control::request_json_within(
        &colo_cli::control::socket_path(name),
        "protect",
        serde_json::json!({
            "cmd": "protect",
            "peer": peer,
            "connect_timeout_ms": timeout.as_millis() as u64,
        }),
        // The node answers within the connect timeout plus its margin for the handshake.
        timeout + colo_cli::control::PROTECT_MARGIN + Duration::from_secs(5),
    );
    match res {
        Ok(v) => {
            let what = v["message"].as_str().unwrap_or("re-protection started");
            println!("{name}: {what}; see `colo status --name {name}`");
            Ok(0)
        }
        Err(e) if e.is::<colo_cli::control::Refused>() => {
            eprintln!("colo: error: {e:#}");
            Ok(1)
        }
        Err(e) => Err(e),
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

/// Opens Xen domain `domid` (HVM or PVH, from dom0) as a node's guest; `vector` is delivered
/// when it resumes from a loaded checkpoint (see `XenDomain::wake`).
#[cfg(feature = "xen")]
fn open_xen(domid: u32, vector: colo_cli::config::UpcallVector) -> Result<colo_xen::XenDomain> {
    let mut dom =
        colo_xen::XenDomain::open(domid).with_context(|| format!("opening Xen domain {domid}"))?;
    dom.set_wake_vector(vector.0);
    Ok(dom)
}

/// Pauses `dom`, saves it to `path`, prints one line, and resumes it if it was running.
fn save_guest<G: Snapshot>(dom: &mut G, path: &Path) -> Result<save::SaveFigures> {
    let was_paused = dom.is_paused();
    dom.pause().context("pausing the guest")?;
    let res = dom
        .platform()
        .context("reading the guest's vCPU and platform state")
        .and_then(|p| save::save_to_file(dom, &p, path));
    if !was_paused {
        dom.resume().context("resuming the guest")?;
    }
    let f = res?;
    eprintln!(
        "colo: saved {} pages{} ({} bytes) to {}; memory digest {:032x}",
        f.pages,
        if f.xtab > 0 {
            format!(" and {} unmappable", f.xtab)
        } else {
            String::new()
        },
        f.bytes,
        path.display(),
        f.digest
    );
    Ok(f)
}

fn workload_name(w: WorkloadKind) -> &'static str {
    match w {
        WorkloadKind::Kv => "kv",
        WorkloadKind::Dirty => "dirty",
    }
}

fn check_seconds(s: f64) -> Result<Duration> {
    if !(0.0..=86_400.0).contains(&s) {
        bail!("--seconds must be between 0 and 86400, got {s}");
    }
    Ok(Duration::from_secs_f64(s))
}

fn mock_for(ram: u64, workload: WorkloadKind, vm_seed: u64) -> Result<colo_mock::MockDomain> {
    colo_cli::mock::build(&MockSpec {
        ram,
        ram_file: None,
        workload,
        vm_seed,
        memory_divergence: true,
        output_divergence: 0.0,
        dirty_rate: 100,
    })
}

fn run_save(a: SaveArgs) -> Result<i32> {
    match a.backend {
        Backend::Mock => {
            let run_for = check_seconds(a.seconds)?;
            let mut dom = mock_for(a.ram, a.workload, a.vm_seed.unwrap_or_else(rand::random))?;
            colo_core::Domain::resume(&mut dom)?;
            std::thread::sleep(run_for);
            colo_core::Domain::pause(&mut dom)?;
            if let Some(f) = dom.fault() {
                bail!("the mock guest faulted before it was saved: {f}");
            }
            let figures = save_guest(&mut dom, &a.out)?;
            if figures.digest != dom.digest() {
                bail!("the saved pages do not match the guest's memory digest");
            }
            Ok(0)
        }
        Backend::Xen => save_xen(a.domid, &a.out),
    }
}

#[cfg(feature = "xen")]
fn save_xen(domid: Option<u32>, out: &Path) -> Result<i32> {
    let domid = domid.context("--backend xen needs --domid")?;
    let mut dom = open_xen(domid, colo_cli::config::UpcallVector(None))?;
    save_guest(&mut dom, out)?;
    Ok(0)
}

#[cfg(not(feature = "xen"))]
fn save_xen(_domid: Option<u32>, _out: &Path) -> Result<i32> {
    bail!("{NO_XEN}")
}

fn run_restore(a: RestoreArgs) -> Result<i32> {
    let run_for = check_seconds(a.seconds)?;
    let mut input: Box<dyn std::io::Read> = if a.input == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(&a.input)
                .with_context(|| format!("cannot open snapshot file {}", a.input))?,
        )
    };
    let mut dom = mock_for(a.ram, a.workload, rand::random())?;
    let restored = save::read_snapshot(&mut dom, &mut input).with_context(|| a.input.clone())?;
    let ctx = restored.hvm_context.as_deref().unwrap_or_default();
    colo_core::Domain::set_state(&mut dom, ctx).with_context(|| {
        format!(
            "{}: the snapshot's vCPU state does not fit a {} MiB {} mock guest (check --ram and \
             --workload)",
            a.input,
            a.ram >> 20,
            workload_name(a.workload)
        )
    })?;
    let digest = dom.digest();
    let verified = match restored.digest {
        Some(d) if d == digest => "verified: memory digest matches the stream",
        Some(d) => {
            eprintln!(
                "colo: {}: restored memory digest {digest:032x} differs from the stream's {d:032x}",
                a.input
            );
            return Ok(1);
        }
        None => "not verified: the stream does not hold every page once in order",
    };
    println!(
        "restored {} pages ({} bytes) from {}; memory digest {digest:032x}; {verified}",
        restored.pages, restored.bytes, a.input
    );
    if !run_for.is_zero() {
        let before = dom.steps();
        let start = Instant::now();
        colo_core::Domain::resume(&mut dom)?;
        std::thread::sleep(run_for);
        colo_core::Domain::pause(&mut dom)?;
        if let Some(f) = dom.fault() {
            eprintln!("colo: the restored guest faulted: {f}");
            return Ok(1);
        }
        println!(
            "ran the restored guest {:.1} s: {} workload steps, no fault",
            start.elapsed().as_secs_f64(),
            dom.steps() - before
        );
    }
    Ok(0)
}

/// Starts a primary's arbiter and waits until it holds the pair's serving key: a primary
/// serves no one before. A key held by another node for longer than one TTL is renewed by a
/// live node, and this one refuses to start.
fn hold_serving_key(
    cfg: colo_cli::arbiter::ArbiterConfig,
) -> Result<Arc<colo_cli::arbiter::Arbiter>> {
    use colo_cli::arbiter::{Arbiter, Unreachable};
    let (key, ttl, unreachable) = (cfg.key(), cfg.ttl, cfg.unreachable);
    let arbiter = Arbiter::start(cfg, true).context("--arbiter")?;
    let start = Instant::now();
    let mut told = false;
    loop {
        let now = Instant::now();
        if arbiter.holds_key(now) {
            return Ok(Arc::new(arbiter));
        }
        if let Some((holder, held)) = arbiter.held_by_other(now) {
            if held > ttl + Duration::from_secs(1) {
                bail!(
                    "the arbiter names {holder} as the serving node ({key} held and renewed for \
                     {:.1} s); refusing to serve beside it",
                    held.as_secs_f64()
                );
            }
            if !told {
                told = true;
                eprintln!(
                    "colo: {holder} holds {key}; waiting up to {} s for it to lapse",
                    ttl.as_secs() + 1
                );
            }
        } else if let Some(err) = arbiter.unreachable() {
            if now - start > ttl {
                if unreachable == Unreachable::Exit {
                    bail!("the arbiter cannot be reached: {err}");
                }
                if !told {
                    told = true;
                    eprintln!("colo: the arbiter cannot be reached ({err}); waiting for it");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The arbiter settings of a node (None without `--arbiter`); `role` names it in the key.
fn arbiter_config(a: &NodeArgs, role: &str) -> Result<Option<colo_cli::arbiter::ArbiterConfig>> {
    let Some(url) = &a.arbiter else {
        return Ok(None);
    };
    colo_cli::etcd::Etcd::parse(url, Duration::from_secs(1)).context("--arbiter")?;
    anyhow::ensure!(
        (1..=3600).contains(&a.arbiter_ttl),
        "--arbiter-ttl must be 1..3600 seconds, got {}",
        a.arbiter_ttl
    );
    anyhow::ensure!(
        !a.arbiter_pair.is_empty()
            && a.arbiter_pair
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "--arbiter-pair must be letters, digits, '-', '_' or '.', got {:?}",
        a.arbiter_pair
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    Ok(Some(colo_cli::arbiter::ArbiterConfig {
        url: url.clone(),
        pair: a.arbiter_pair.clone(),
        ttl: Duration::from_secs(a.arbiter_ttl),
        name: format!(
            "{}@{} pid {}",
            a.name.as_deref().unwrap_or(role),
            host.trim(),
            std::process::id()
        ),
        unreachable: a.arbiter_unreachable,
    }))
}

fn node_options(a: &NodeArgs) -> Result<NodeOptions> {
    let key = match &a.key_file {
        Some(p) => Some(colo_cli::config::read_key_file(p)?),
        None => None,
    };
    if key.is_some() && a.insecure_plaintext {
        tracing::warn!(
            "--insecure-plaintext: the peer is authenticated at the handshake, but the records \
             after it (guest memory, client traffic) cross the network unencrypted and \
             unauthenticated"
        );
    }
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
            progress_timeout: Duration::from_millis(a.progress_timeout_ms),
        },
        verify: a.verify,
        tcp_align: !a.no_tcp_align,
        unlogged_sweeps: a.unlogged_sweeps.unwrap_or(match a.backend {
            Backend::Xen => 3,
            Backend::Mock => 0,
        }),
        key,
        key_file: a.key_file.clone(),
        insecure_plaintext: a.insecure_plaintext,
        page_coding: PageCoding {
            zero_pages: a.zero_pages,
            codec: match a.compress {
                Compress::None => Codec::None,
                Compress::Lz4 => Codec::Lz4,
            },
        },
        disk_mirror: a.disk_mirror,
        streams: a.streams,
        disk_mirror_interval: Duration::from_millis(a.disk_mirror_interval_ms.max(1)),
        client_addr: a.client.clone(),
        service_if: a.service_if.clone(),
        fence_cmd: a.fence_cmd.clone(),
        connect_timeout: Duration::from_secs(a.connect_timeout),
        ..NodeOptions::default()
    })
}

/// The mock guest's disk from the flags; a primary keeps its image's content (`keep`).
fn disk_spec(a: &NodeArgs, keep: bool) -> colo_cli::mock::DiskSpec {
    colo_cli::mock::DiskSpec {
        size: a.disk.unwrap_or(0),
        file: a.disk_file.clone(),
        keep,
        rate: a.disk_rate,
    }
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

/// Saves the guest of a node that stopped as the primary, if `--save-on-exit` asks for it.
fn save_on_exit<G: Snapshot>(a: &NodeArgs, guest: &mut G) -> Result<()> {
    if let Some(path) = &a.save_on_exit {
        save_guest(guest, path)?;
    }
    Ok(())
}

/// Flags that do not fit the chosen backend, checked before a guest is opened.
fn check_backend(a: &NodeArgs) -> Result<()> {
    if a.backend == Backend::Xen && a.client.is_some() {
        bail!(
            "--client is the mock's network path; with --backend xen give the guest's vif and \
             the service interface: --vif vifD.0 --service-if IFACE"
        );
    }
    if a.backend == Backend::Mock && (a.vif.is_some() || a.service_if.is_some()) {
        bail!("--vif and --service-if need --backend xen (the mock's clients use --client)");
    }
    if let (Some(v), Some(m)) = (&a.vif, &a.pv_vif) {
        bail!("--vif {v} and --pv-vif {m} exclude each other: the guest's NIC is a netback vif or one colo serves");
    }
    if a.backend == Backend::Mock && a.pv_vif.is_some() {
        bail!("--pv-vif needs --backend xen");
    }
    if a.backend == Backend::Mock && a.pv_vbd.is_some() {
        bail!("--pv-vbd needs --backend xen (the mock's disk is --disk)");
    }
    if let Some(img) = &a.pv_vbd {
        colo_cli::vbd::check_image(img)?;
    }
    if let Some(m) = &a.pv_vif {
        parse_mac(m)?;
    }
    let nic = a
        .vif
        .as_ref()
        .map(|v| format!("--vif {v}"))
        .or(a.pv_vif.as_ref().map(|m| format!("--pv-vif {m}")));
    match (nic, &a.service_if) {
        (Some(v), None) => bail!("{v} needs --service-if (where the guest's service is)"),
        (None, Some(s)) => bail!("--service-if {s} needs --vif or --pv-vif (the guest's NIC)"),
        _ => {}
    }
    for (flag, name) in [("--vif", &a.vif), ("--service-if", &a.service_if)] {
        if let Some(n) = name {
            let valid = !n.is_empty() && !n.contains('/') && n != "." && n != "..";
            if !valid || !Path::new("/sys/class/net").join(n).exists() {
                bail!(
                    "{flag} {n}: no network interface `{n}` on this host (see `ip link`; a Xen \
                     guest's vif is vifDOMID.N in dom0, created when the guest starts)"
                );
            }
        }
    }
    if a.backend == Backend::Xen && (a.disk.is_some() || a.disk_file.is_some()) {
        bail!(
            "--disk is the mock's disk; with --backend xen give the guest's disk image: \
             --pv-vbd IMAGE"
        );
    }
    Ok(())
}

fn run_primary(a: PrimaryArgs) -> Result<i32> {
    check_backend(&a.node)?;
    match a.node.backend {
        Backend::Mock => {
            let spec = mock_spec(&a.node);
            let mut guest = colo_cli::mock::build_with_disk(&spec, &disk_spec(&a.node, true))?;
            colo_core::Domain::resume(&mut guest)?;
            primary_with(a, guest)
        }
        Backend::Xen => primary_xen(a),
    }
}

/// A MAC address as `--pv-vif` takes it: six hex bytes separated by colons.
fn parse_mac(m: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = m
        .split(':')
        .map(|b| if b.len() == 2 { u8::from_str_radix(b, 16).ok() } else { None })
        .collect::<Option<_>>()
        .filter(|v: &Vec<u8>| v.len() == 6)
        .with_context(|| format!("--pv-vif {m}: not a MAC address (six hex bytes with colons, e.g. 00:16:3e:12:34:56)"))?;
    if bytes[0] & 1 != 0 {
        bail!("--pv-vif {m}: a multicast address cannot be a NIC's");
    }
    let mut mac = [0; 6];
    mac.copy_from_slice(&bytes);
    Ok(mac)
}

/// The Xen guest with a vif colo serves itself (`--pv-vif`): plugged now, connected once the
/// guest's netfront answers.
#[cfg(feature = "xen")]
fn with_pv_vif(
    dom: colo_xen::XenDomain,
    a: &NodeArgs,
    mac: &str,
    shinfo: Option<u64>,
) -> Result<colo_xen::PvVifGuest<colo_xen::XenDomain>> {
    let domid = a.domid.context("--backend xen needs --domid")?;
    let mut vif = colo_xen::pvnet::PvVif::create(
        domid,
        0,
        parse_mac(mac)?,
        Duration::from_secs(a.pv_vif_timeout),
    )
    .with_context(|| format!("--pv-vif {mac}"))?;
    if let Some(gfn) = shinfo {
        vif.watch_event_bits(gfn).with_context(|| {
            format!("--pv-vif {mac}: mapping domain {domid}'s shared-info page")
        })?;
    }
    colo_xen::PvVifGuest::new(dom, vif).with_context(|| format!("--pv-vif {mac}"))
}

/// The guest's shared-info frame, when colo serves one of its devices (`--pv-vif`,
/// `--pv-vbd`): those ports' pending and mask bits travel with each checkpoint
/// (`colo_xen::evtbits`). None without such a device, or (with a warning) when the guest has
/// no shared-info page mapped.
#[cfg(feature = "xen")]
fn shared_info_gfn(dom: &mut colo_xen::XenDomain, a: &NodeArgs) -> Result<Option<u64>> {
    if a.pv_vif.is_none() && a.pv_vbd.is_none() {
        return Ok(None);
    }
    let gfn = dom
        .info()
        .context("reading the domain's shared-info frame")?
        .shared_info_frame;
    if gfn >= colo_core::Domain::page_count(dom) {
        tracing::warn!(
            "the domain has no shared-info page mapped (frame {gfn:#x}): the event bits of the ports colo serves are not carried with checkpoints"
        );
        return Ok(None);
    }
    Ok(Some(gfn))
}

/// The Xen guest `dom` (any wrapper) with the disk colo serves itself (`--pv-vbd`): the image
/// opened (`keep`: the primary's), the disk plugged now, connected once the guest's blkfront
/// answers.
#[cfg(feature = "xen")]
fn with_pv_vbd<D: colo_core::Domain>(
    dom: D,
    a: &NodeArgs,
    image: &Path,
    keep: bool,
    shinfo: Option<u64>,
) -> Result<colo_xen::PvVbdGuest<D, colo_xen::pvblk::PvVbd>> {
    let domid = a.domid.context("--backend xen needs --domid")?;
    let disk = colo_cli::vbd::open_image(image, keep)?;
    let vbd = colo_xen::pvblk::PvVbd::create(
        domid,
        colo_xen::pvblk::XVDA,
        Box::new(colo_cli::vbd::ImageStore(disk.clone())),
        Duration::from_secs(a.pv_vbd_timeout),
    )
    .with_context(|| format!("--pv-vbd {}", image.display()))?;
    if let Some(gfn) = shinfo {
        vbd.watch_event_bits(gfn).with_context(|| {
            format!(
                "--pv-vbd {}: mapping domain {domid}'s shared-info page",
                image.display()
            )
        })?;
    }
    tracing::info!(
        "pv-vbd: xvda of domain {domid} served from {} ({} MiB)",
        image.display(),
        disk.blocks() >> 8
    );
    Ok(colo_xen::PvVbdGuest::new(
        dom,
        vbd,
        Box::new(colo_cli::vbd::guest_disk(&disk)),
    ))
}

/// The Xen guest with its NIC: an AF_PACKET port on its vif (`--vif`).
#[cfg(feature = "xen")]
fn with_vif(
    dom: colo_xen::XenDomain,
    vif: &str,
) -> Result<colo_xen::VifGuest<colo_xen::XenDomain>> {
    colo_xen::VifGuest::new(dom, vif).with_context(|| format!("--vif {vif}"))
}

#[cfg(feature = "xen")]
fn primary_xen(a: PrimaryArgs) -> Result<i32> {
    let domid = a.node.domid.context("--backend xen needs --domid")?;
    let mut guest = open_xen(domid, a.node.upcall_vector)?;
    colo_core::Domain::resume(&mut guest)?;
    let shinfo = shared_info_gfn(&mut guest, &a.node)?;
    let vbd = a.node.pv_vbd.clone();
    if let Some(mac) = a.node.pv_vif.clone() {
        let g = with_pv_vif(guest, &a.node, &mac, shinfo)?;
        return match vbd {
            Some(img) => {
                let g = with_pv_vbd(g, &a.node, &img, true, shinfo)?;
                primary_with(a, g)
            }
            None => primary_with(a, g),
        };
    }
    match (a.node.vif.clone(), vbd) {
        (Some(vif), Some(img)) => {
            let g = with_pv_vbd(with_vif(guest, &vif)?, &a.node, &img, true, shinfo)?;
            primary_with(a, g)
        }
        (Some(vif), None) => primary_with(a, with_vif(guest, &vif)?),
        (None, Some(img)) => {
            let g = with_pv_vbd(guest, &a.node, &img, true, shinfo)?;
            primary_with(a, g)
        }
        (None, None) => primary_with(a, guest),
    }
}

#[cfg(not(feature = "xen"))]
fn primary_xen(_a: PrimaryArgs) -> Result<i32> {
    bail!("{NO_XEN}")
}

fn primary_with<G: Guest + Snapshot>(a: PrimaryArgs, guest: G) -> Result<i32> {
    let peer = a
        .peer
        .clone()
        .context("--peer is required (or `peer` in the --config file)")?;
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
    let status = new_status();
    status_writer(a.node.status_file.clone(), status.clone());
    let (_control, commands) = control(&a.node, "primary", &status)?;
    if let Some(cfg) = arbiter_config(&a.node, "primary")? {
        opts.arbiter = Some(hold_serving_key(cfg)?);
    }
    let mut node = PrimaryNode::connect(guest, &peer, opts, status)?;
    node.set_commands(commands);
    install_ctrlc(node.stop_flag());
    if let Err(e) = node.run() {
        eprintln!("colo: error: the primary stopped: {e:#}");
        return Ok(1);
    }
    save_on_exit(&a.node, node.guest())?;
    Ok(0)
}

fn run_secondary(a: SecondaryArgs) -> Result<i32> {
    check_backend(&a.node)?;
    match a.node.backend {
        Backend::Mock => {
            let spec = mock_spec(&a.node);
            let guest = colo_cli::mock::build_with_disk(&spec, &disk_spec(&a.node, false))?;
            secondary_with(a, guest)
        }
        Backend::Xen => secondary_xen(a),
    }
}

#[cfg(feature = "xen")]
fn secondary_xen(a: SecondaryArgs) -> Result<i32> {
    let domid = a.node.domid.context("--backend xen needs --domid")?;
    let mut guest = open_xen(domid, a.node.upcall_vector)?;
    let shinfo = shared_info_gfn(&mut guest, &a.node)?;
    let vbd = a.node.pv_vbd.clone();
    if let Some(mac) = a.node.pv_vif.clone() {
        let g = with_pv_vif(guest, &a.node, &mac, shinfo)?;
        return match vbd {
            Some(img) => {
                let g = with_pv_vbd(g, &a.node, &img, false, shinfo)?;
                secondary_with(a, g)
            }
            None => secondary_with(a, g),
        };
    }
    match (a.node.vif.clone(), vbd) {
        (Some(vif), Some(img)) => {
            let g = with_pv_vbd(with_vif(guest, &vif)?, &a.node, &img, false, shinfo)?;
            secondary_with(a, g)
        }
        (Some(vif), None) => secondary_with(a, with_vif(guest, &vif)?),
        (None, Some(img)) => {
            let g = with_pv_vbd(guest, &a.node, &img, false, shinfo)?;
            secondary_with(a, g)
        }
        (None, None) => secondary_with(a, guest),
    }
}

#[cfg(not(feature = "xen"))]
fn secondary_xen(_a: SecondaryArgs) -> Result<i32> {
    bail!("{NO_XEN}")
}

fn secondary_with<G: Guest + Snapshot>(a: SecondaryArgs, guest: G) -> Result<i32> {
    let listen = a
        .listen
        .clone()
        .context("--listen is required (or `listen` in the --config file)")?;
    let mut opts = node_options(&a.node)?;
    let listener =
        TcpListener::bind(&listen).with_context(|| format!("listening on `{listen}`"))?;
    if let Some(cfg) = arbiter_config(&a.node, "secondary")? {
        opts.arbiter = Some(Arc::new(
            colo_cli::arbiter::Arbiter::start(cfg, false).context("--arbiter")?,
        ));
    }
    let status = new_status();
    status_writer(a.node.status_file.clone(), status.clone());
    let (_control, commands) = control(&a.node, "secondary", &status)?;
    let mut node = SecondaryNode::accept(guest, &listener, opts, status)?;
    node.set_commands(commands);
    let stop = node.stop_flag();
    install_ctrlc(stop.clone());
    let outcome = match node.run() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("colo: error: the secondary stopped: {e:#}");
            return Ok(1);
        }
    };
    match outcome {
        SecondaryOutcome::Stopped => Ok(0),
        SecondaryOutcome::TookOver(mut primary) => {
            let flag = primary.stop_flag();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                flag.store(true, Ordering::Relaxed);
            });
            if let Err(e) = primary.run() {
                eprintln!("colo: error: the node stopped after taking over: {e:#}");
                return Ok(1);
            }
            save_on_exit(&a.node, primary.guest())?;
            Ok(0)
        }
    }
}

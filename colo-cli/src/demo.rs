//! `colo demo`: a primary and a secondary as separate processes on loopback with `kv` guests, a
//! verifying load-generating client, a live view that refreshes in place, optional fault
//! injection (kill either node), and a JSON summary. The pair shares a fresh random key, so its
//! link runs as production's should: authenticated and encrypted.
//!
//! Ctrl-C (SIGINT), SIGTERM or SIGHUP end the demo in order, within about a second: the client
//! abandons its request in flight (a stop, not a failure), reads back what it wrote, the summary
//! is printed, then the nodes are stopped. The nodes run in their own process group, so a
//! terminal's Ctrl-C reaches the demo alone and the nodes stay up for the read-back.

use std::io::{IsTerminal, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use colo_cli::kvclient::{is_cancelled, ClientStats, KvClient};
use colo_cli::mock::WorkloadKind;
use colo_cli::status::{CheckpointFigures, NodeStatus, StatusReport};
use colo_core::engine::SyncMode;
use parking_lot::Mutex;
use serde_json::json;

/// Examples shown by `colo demo --help`.
pub const EXAMPLES: &str = "\
Examples:
  colo demo                                   live view until Ctrl-C
  colo demo --duration 10 --json              one JSON summary after 10 s
  colo demo --kill-primary-after 5 --duration 10    watch the secondary take over
  colo demo --sync-mode primary-only --verify       see why the back channel is needed
  colo demo --duration 5 --save vm.img        also save the primary VM at the end
  colo demo --disk 64MiB --verify --json      replicate a disk too, and compare both disks

Ctrl-C (or SIGTERM) stops it within about a second and prints the summary.
Exit codes: 0 ok, 1 an acknowledged write was lost or a verification failed, 2 bad usage.";

/// Flags of `colo demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Run this many seconds (default: until Ctrl-C).
    #[arg(long)]
    duration: Option<f64>,
    /// Guest RAM size of each VM.
    #[arg(long, default_value = "64M")]
    ram: String,
    /// The guests' workload.
    #[arg(long, value_enum, default_value = "kv")]
    workload: WorkloadKind,
    /// Fraction of responses that differ between the VMs (forces checkpoints).
    #[arg(long, default_value_t = 0.01)]
    output_divergence: f64,
    /// Whether the VMs' memories diverge (entry placement by per-VM randomness).
    #[arg(long, default_value = "on")]
    memory_divergence: String,
    /// backchannel (D = A ∪ B) or primary-only (D = A).
    #[arg(long, default_value = "backchannel")]
    sync_mode: SyncMode,
    /// Compare both memories after every checkpoint (and both disks, with --disk).
    #[arg(long)]
    verify: bool,
    /// Give each VM a virtual disk of this size (e.g. 64MiB), replicated with every
    /// checkpoint; the kv guests persist their tables to it. The images are kept in the logs
    /// directory (primary.disk, secondary.disk).
    #[arg(long, value_name = "SIZE")]
    disk: Option<String>,
    /// How the disk's blocks travel (passed to both nodes): `continuous` while the guests run,
    /// `checkpoint` within each checkpoint's pause.
    #[arg(long, value_name = "MODE", default_value = "continuous")]
    disk_mirror: colo_core::disk::DiskMirror,
    /// Kill the primary after this many seconds (the secondary takes over).
    #[arg(long)]
    kill_primary_after: Option<f64>,
    /// Kill the secondary after this many seconds (the primary goes on alone).
    #[arg(long)]
    kill_secondary_after: Option<f64>,
    /// Declare a silent peer lost after this many ms (passed to both nodes); raise it on a
    /// loaded machine, lower it for a faster failover.
    #[arg(long, default_value_t = 500)]
    heartbeat_timeout_ms: u64,
    /// Maximum interval between checkpoints, ms (passed to the primary).
    #[arg(long)]
    max_interval_ms: Option<u64>,
    /// At the end, save a full snapshot of the primary VM (the survivor after a failover) to
    /// this file, in Xen's libxc stream format.
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
    /// Print one JSON object at the end instead of the live view.
    #[arg(long)]
    json: bool,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// A node's status file, typed; None before the node wrote it (or while it is replaced).
fn read_status(path: &Path) -> Option<StatusReport> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

struct Proc {
    child: Option<Child>,
    status_file: PathBuf,
    log: PathBuf,
}

impl Proc {
    fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks the node to stop (SIGINT, which its Ctrl-C handler turns into an orderly stop),
    /// waits up to `grace`, then kills it.
    fn stop(&mut self, grace: Duration) {
        let Some(c) = self.child.as_mut() else { return };
        if !matches!(c.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-INT", &c.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(c.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a random 256-bit key (hex, mode 0600) for the demo's pair into `dir`.
fn fresh_key(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("link.key");
    let _ = std::fs::remove_file(&path);
    let hex: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(hex.as_bytes()))
        .with_context(|| format!("writing the demo's link key {}", path.display()))?;
    Ok(path)
}

fn spawn(name: &'static str, dir: &Path, args: &[String]) -> Result<Proc> {
    let exe = std::env::current_exe().context("locating the colo binary")?;
    let log = dir.join(format!("{name}.log"));
    let status_file = dir.join(format!("{name}.json"));
    let logf =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(exe)
        .args(args)
        .arg("--status-file")
        .arg(&status_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        // Its own process group: a terminal's Ctrl-C goes to the demo alone, which stops the
        // nodes once the client is done with them.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the {name}"))?;
    Ok(Proc {
        child: Some(child),
        status_file,
        log,
    })
}

/// Runs the demo; returns the exit code.
pub fn run(a: DemoArgs) -> Result<i32> {
    if let Some(d) = a.duration {
        anyhow::ensure!(d > 0.0, "--duration must be positive, got {d}");
    }
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.output_divergence),
        "--output-divergence must be between 0 and 1, got {}",
        a.output_divergence
    );
    anyhow::ensure!(
        matches!(a.memory_divergence.as_str(), "on" | "off"),
        "--memory-divergence must be on or off, got `{}`",
        a.memory_divergence
    );
    let dir = std::env::temp_dir().join(format!("colo-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (repl, c1, c2) = (free_port()?, free_port()?, free_port()?);
    let c1a = format!("127.0.0.1:{c1}");
    let c2a = format!("127.0.0.1:{c2}");
    let workload = match a.workload {
        WorkloadKind::Kv => "kv",
        WorkloadKind::Dirty => "dirty",
    };
    let mut common = vec![
        "--key-file".to_string(),
        fresh_key(&dir)?.display().to_string(),
        "--ram".into(),
        a.ram.clone(),
        "--workload".into(),
        workload.into(),
        "--output-divergence".into(),
        a.output_divergence.to_string(),
        "--memory-divergence".into(),
        a.memory_divergence.clone(),
        "--heartbeat-timeout-ms".into(),
        a.heartbeat_timeout_ms.to_string(),
    ];
    if a.verify {
        common.push("--verify".into());
    }
    if let Some(size) = &a.disk {
        colo_cli::config::parse_size(size).map_err(|e| anyhow::anyhow!("--disk: {e}"))?;
        common.extend(["--disk".into(), size.clone()]);
        common.extend(["--disk-mirror".into(), a.disk_mirror.to_string()]);
    }
    // Each node's own disk image, kept for inspection.
    let disk_file = |role: &str| -> Vec<String> {
        match &a.disk {
            Some(_) => vec![
                "--disk-file".into(),
                dir.join(format!("{role}.disk")).display().to_string(),
            ],
            None => Vec::new(),
        }
    };
    // Absolute, as the nodes may resolve it elsewhere.
    let save = a.save.as_ref().map(|p| {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.clone())
    });
    if let Some(p) = &save {
        // Both nodes get it; only the one that stops as the primary writes it.
        let _ = std::fs::remove_file(p);
        common.push("--save-on-exit".into());
        common.push(p.display().to_string());
    }
    let mut sargs = vec![
        "secondary".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{repl}"),
        "--client".into(),
        c2a.clone(),
        "--name".into(),
        format!("demo-{}-secondary", std::process::id()),
    ];
    sargs.extend(common.iter().cloned());
    sargs.extend(disk_file("secondary"));
    let mut pargs = vec![
        "primary".to_string(),
        "--peer".into(),
        format!("127.0.0.1:{repl}"),
        "--client".into(),
        c1a.clone(),
        "--sync-mode".into(),
        a.sync_mode.to_string(),
        "--name".into(),
        format!("demo-{}-primary", std::process::id()),
    ];
    if let Some(m) = a.max_interval_ms {
        pargs.extend(["--max-interval-ms".into(), m.to_string()]);
    }
    pargs.extend(common);
    let _ = std::fs::remove_file(dir.join("primary.disk"));
    pargs.extend(disk_file("primary"));
    let mut secondary = spawn("secondary", &dir, &sargs)?;
    std::thread::sleep(Duration::from_millis(100));
    let mut primary = spawn("primary", &dir, &pargs)?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let s = stop.clone();
        let _ = ctrlc::set_handler(move || s.store(true, Ordering::Relaxed));
    }

    // Wait until the pair is protected (initial synchronisation done).
    let live = !a.json && std::io::stdout().is_terminal();
    let start = Instant::now();
    let (plog, slog) = (primary.log.clone(), secondary.log.clone());
    let node_logs = || {
        let p = std::fs::read_to_string(&plog).unwrap_or_default();
        let s = std::fs::read_to_string(&slog).unwrap_or_default();
        format!("primary:\n{p}secondary:\n{s}")
    };
    loop {
        let st = read_status(&primary.status_file);
        if st.as_ref().is_some_and(|s| s.node.protected) {
            break;
        }
        if let Some(reason) = st.as_ref().and_then(|s| s.node.failover_reason.as_deref()) {
            anyhow::bail!(
                "the nodes lost each other during the initial synchronisation ({reason}); on a \
                 slow or loaded machine raise --heartbeat-timeout-ms (e.g. 5000) or lower --ram; \
                 node logs:\n{}",
                node_logs()
            );
        }
        if !primary.alive() || !secondary.alive() || start.elapsed() > Duration::from_secs(60) {
            anyhow::bail!(
                "the pair did not reach protection; node logs:\n{}",
                node_logs()
            );
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if live {
            let mut out = std::io::stdout().lock();
            let _ = write!(
                out,
                "\r\x1b[2Kcolo demo: synchronising the secondary ({} of RAM)… {:.1} s",
                a.ram,
                start.elapsed().as_secs_f64()
            );
            let _ = out.flush();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if live {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r\x1b[2K");
        let _ = out.flush();
    }
    let sync_s = start.elapsed().as_secs_f64();
    let stopped_early = stop.load(Ordering::Relaxed);
    if !live && !a.json && !stopped_early {
        eprintln!(
            "colo demo: the pair is protected (initial synchronisation {sync_s:.1} s); {}",
            match a.duration {
                Some(d) => format!("running {d} s"),
                None => "running until Ctrl-C".to_string(),
            }
        );
    }

    // The load-generating, verifying client. When the demo stops it abandons its request in
    // flight (a node may be gone by then): that is the end of the run, not a failure.
    let client_stats = Arc::new(Mutex::new(ClientStats::default()));
    let client_stop = Arc::new(AtomicBool::new(false));
    let client_thread = (a.workload == WorkloadKind::Kv && !stopped_early).then(|| {
        let (cs, stop) = (client_stats.clone(), client_stop.clone());
        let addrs = vec![c1a.clone(), c2a.clone()];
        std::thread::spawn(move || -> (KvClient, Result<()>) {
            let mut client = KvClient::new(addrs, 40000, Duration::from_millis(1500));
            client.set_cancel(Some(stop.clone()));
            let mut rng = 0x9E37_79B9_7F4A_7C15u64;
            while !stop.load(Ordering::Relaxed) {
                match client.random_op(&mut rng, 512, Instant::now() + Duration::from_secs(20)) {
                    Ok(()) => *cs.lock() = client.stats.clone(),
                    Err(e) if is_cancelled(&e) => break,
                    Err(e) => return (client, Err(e)),
                }
            }
            (client, Ok(()))
        })
    });

    let run_start = Instant::now();
    let mut killed: Option<(&'static str, f64)> = None;
    let mut prev: Option<(Instant, Status, Status, u64)> = None;
    let mut lines_drawn = 0usize;
    loop {
        let t = run_start.elapsed().as_secs_f64();
        if stop.load(Ordering::Relaxed) || a.duration.is_some_and(|d| t >= d) {
            break;
        }
        if killed.is_none() {
            if a.kill_primary_after.is_some_and(|k| t >= k) {
                // The clock is read before the kill: kill() also waits for the process to exit,
                // and the survivor may notice the death before that wait returns.
                let at = now_ms();
                primary.kill();
                killed = Some(("primary", at));
            } else if a.kill_secondary_after.is_some_and(|k| t >= k) {
                let at = now_ms();
                secondary.kill();
                killed = Some(("secondary", at));
            }
        }
        std::thread::sleep(Duration::from_millis(if live { 500 } else { 100 }));
        if live {
            let ps = read_status(&primary.status_file);
            let ss = read_status(&secondary.status_file);
            let (ops, acked) = {
                let c = client_stats.lock();
                (c.ops, c.acked_writes)
            };
            let now = Instant::now();
            let extras = ViewExtras {
                elapsed: run_start.elapsed().as_secs_f64(),
                ops,
                acked,
                killed,
                dir: &dir,
            };
            let text = render(&ps, &ss, prev.as_ref(), now, &extras);
            let mut out = std::io::stdout().lock();
            if lines_drawn > 0 {
                let _ = write!(out, "\x1b[{lines_drawn}A");
            }
            for l in text.lines() {
                let _ = writeln!(out, "\x1b[2K{l}");
            }
            let _ = out.flush();
            lines_drawn = text.lines().count();
            prev = Some((now, ps, ss, ops));
        }
    }

    // Stop the client, then read back every key it wrote (the nodes are still up: they run in
    // their own process group, so a Ctrl-C at the terminal did not reach them). A second signal
    // abandons the read-back.
    client_stop.store(true, Ordering::Relaxed);
    stop.store(false, Ordering::Relaxed);
    let mut client_result = None;
    if let Some(h) = client_thread {
        match h.join() {
            Ok((mut c, res)) => {
                match res {
                    Ok(()) => {
                        c.set_cancel(Some(stop.clone()));
                        match c.verify_all(Instant::now() + Duration::from_secs(20)) {
                            Err(e) if is_cancelled(&e) => {
                                eprintln!("colo demo: final read-back interrupted")
                            }
                            Err(e) => eprintln!("colo demo: final read-back failed: {e:#}"),
                            Ok(()) => {}
                        }
                    }
                    Err(e) => eprintln!("colo demo: client failed: {e:#}"),
                }
                client_result = Some(c.stats.clone());
            }
            Err(_) => eprintln!("colo demo: client thread panicked"),
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let ps = read_status(&primary.status_file);
    let ss = read_status(&secondary.status_file);
    // Saving a snapshot on the way out takes a moment (about 1 s per GiB).
    let grace = Duration::from_secs(if save.is_some() { 30 } else { 3 });
    primary.stop(grace);
    secondary.stop(grace);
    let snapshot = save.as_ref().filter(|p| p.is_file());
    if let (Some(p), None) = (&save, snapshot) {
        eprintln!(
            "colo demo: no snapshot was written to {}; see the node logs in {}",
            p.display(),
            dir.display()
        );
    }
    let cs = client_result.unwrap_or_else(|| client_stats.lock().clone());

    let failover = killed.map(|(who, at)| {
        let survivor = if who == "primary" { &ss } else { &ps };
        let detect = survivor
            .as_ref()
            .and_then(|s| s.failover_at_unix_ms)
            .map(|f| f - at);
        json!({
            "survivor": if who == "primary" { "secondary" } else { "primary" },
            "detect_ms": detect,
            "takeover_ms": survivor.as_ref().and_then(|s| s.node.takeover_ms),
            "client_gap_ms": cs.failover_gap_ms,
        })
    });
    let pn = ps.as_ref().map(|s| s.node.clone()).unwrap_or_default();
    let summary = json!({
        "duration_s": run_start.elapsed().as_secs_f64(),
        "initial_sync_s": sync_s,
        "sync_mode": a.sync_mode.to_string(),
        "disk_mirror": a.disk_mirror.to_string(),
        "checkpoints": pn.checkpoints,
        "mismatch_checkpoints": pn.mismatch_checkpoints,
        "periodic_checkpoints": pn.periodic_checkpoints,
        "manual_checkpoints": pn.manual_checkpoints,
        "verified_identical": pn.verified_identical,
        "verify_failures": pn.verify_failures,
        "disk_blocks_sent": pn.disk_blocks_sent,
        "disk_verified_identical": pn.disk_verified_identical,
        "disk_verify_failures": pn.disk_verify_failures,
        "pages_sent": pn.pages_sent,
        "backchannel_pages": pn.backchannel_pages,
        "bytes_sent": pn.bytes_sent,
        "pause_ms_p50": ps.as_ref().and_then(|s| s.pause_ms_p50),
        "pause_ms_p99": ps.as_ref().and_then(|s| s.pause_ms_p99),
        "client_ops": cs.ops,
        "acked_writes": cs.acked_writes,
        "lost_acked_writes": cs.lost_acked_writes,
        "failover": failover,
        "snapshot": snapshot.map(|p| p.display().to_string()),
        "logs": dir.display().to_string(),
    });
    if a.json {
        println!("{summary}");
    } else {
        println!("\n{}", serde_json::to_string_pretty(&summary)?);
    }
    let bad = cs.lost_acked_writes > 0
        || pn.verify_failures > 0
        || pn.disk_verify_failures > 0
        || (save.is_some() && snapshot.is_none());
    Ok(if bad { 1 } else { 0 })
}

/// A node's status as the live view reads it (None: not written yet).
type Status = Option<StatusReport>;

/// A whole number for the live view, or "-" while the node has not reported.
fn num(s: &Status, get: impl Fn(&NodeStatus) -> u64) -> String {
    s.as_ref()
        .map_or_else(|| "-".to_string(), |s| get(&s.node).to_string())
}

/// Shortens `s` to at most `max` characters.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// What the live view shows besides the nodes' status files.
struct ViewExtras<'a> {
    elapsed: f64,
    ops: u64,
    acked: u64,
    killed: Option<(&'static str, f64)>,
    dir: &'a Path,
}

/// The live view: always the same number of lines, so it can be redrawn in place.
fn render(
    ps: &Status,
    ss: &Status,
    prev: Option<&(Instant, Status, Status, u64)>,
    now: Instant,
    x: &ViewExtras<'_>,
) -> String {
    let dt = prev.map(|(t, ..)| now.duration_since(*t).as_secs_f64().max(1e-3));
    let survivor_is_secondary = x.killed.map(|(w, _)| w) == Some("primary");
    let value = |s: &Status, get: &dyn Fn(&NodeStatus) -> u64| {
        s.as_ref().map_or(0.0, |s| get(&s.node) as f64)
    };
    // A rate compares a node's figures with the same node's previous figures.
    let rate = |get: &dyn Fn(&NodeStatus) -> u64, cur: &Status| -> f64 {
        match (prev, dt) {
            (Some((_, p, s, _)), Some(dt)) => {
                let before = if survivor_is_secondary { s } else { p };
                ((value(cur, get) - value(before, get)) / dt).max(0.0)
            }
            _ => 0.0,
        }
    };
    let ops_rate = match (prev, dt) {
        (Some((_, _, _, o)), Some(dt)) => x.ops.saturating_sub(*o) as f64 / dt,
        _ => 0.0,
    };
    let killed_who = x.killed.map(|(w, _)| w);
    let node = |name: &str, s: &Status| {
        if killed_who == Some(name) {
            return format!(
                "  {name:<10} {:<10} {:<21} {:<9} {}",
                "-", "killed", "-", "-"
            );
        }
        let n = s.as_ref().map(|s| &s.node);
        let text = |t: Option<&str>, none: &'static str| match t {
            Some(t) if !t.is_empty() => t.to_string(),
            _ => none.to_string(),
        };
        format!(
            "  {name:<10} {:<10} {:<21} {:<9} {}",
            text(n.map(|n| n.role.as_str()), "-"),
            text(n.map(|n| n.state.as_str()), "starting"),
            if n.is_some_and(|n| n.protected) {
                "yes"
            } else {
                "no"
            },
            num(s, |n| n.epoch)
        )
    };
    // After a failover the survivor is the one whose figures move.
    let cur = if killed_who == Some("primary") {
        ss
    } else {
        ps
    };
    let last = cur.as_ref().and_then(|s| s.node.last.clone());
    let last_num = |get: fn(&CheckpointFigures) -> u64| {
        last.as_ref()
            .map_or_else(|| "-".to_string(), |l| get(l).to_string())
    };
    let pause = |get: fn(&StatusReport) -> Option<f64>| cur.as_ref().and_then(get).unwrap_or(0.0);
    let mut out = String::new();
    out.push_str(&format!(
        "colo demo — a replicated pair on loopback · {:.0} s · Ctrl-C to stop\n",
        x.elapsed
    ));
    out.push_str("  node       role       state                 protected epoch\n");
    out.push_str(&node("primary", ps));
    out.push('\n');
    out.push_str(&node("secondary", ss));
    out.push('\n');
    out.push_str(&format!(
        "  checkpoints  {:>6} total  {:>6.1}/s   mismatch {}   periodic {}   manual {}\n",
        num(cur, |n| n.checkpoints),
        rate(&|n| n.checkpoints, cur),
        num(cur, |n| n.mismatch_checkpoints),
        num(cur, |n| n.periodic_checkpoints),
        num(cur, |n| n.manual_checkpoints),
    ));
    out.push_str(&format!(
        "  pause        p50 {:>7.3} ms   p99 {:>7.3} ms\n",
        pause(|s| s.pause_ms_p50),
        pause(|s| s.pause_ms_p99),
    ));
    out.push_str(&format!(
        "  last ckpt    |A| {:>6}   |B| {:>6}   |D| {:>6} pages\n",
        last_num(|l| l.dirty_primary),
        last_num(|l| l.dirty_secondary),
        last_num(|l| l.pages_sent),
    ));
    out.push_str(&format!(
        "  link         {:>8.2} MB/s out   {:>8.2} MB/s in\n",
        rate(&|n| n.link_bytes_out, cur) / 1e6,
        rate(&|n| n.link_bytes_in, cur) / 1e6,
    ));
    out.push_str(&format!(
        "  client       {:>8.0} ops/s   {} ops   {} acknowledged writes\n",
        ops_rate, x.ops, x.acked
    ));
    out.push_str(&format!(
        "  verify       {} identical   {} failed   disk: {} identical   {} failed\n",
        num(cur, |n| n.verified_identical),
        num(cur, |n| n.verify_failures),
        num(cur, |n| n.disk_verified_identical),
        num(cur, |n| n.disk_verify_failures),
    ));
    out.push_str(&format!(
        "  disk         {} blocks   {} blocks sent\n",
        num(cur, |n| n.disk_blocks),
        num(cur, |n| n.disk_blocks_sent),
    ));
    let event = match x.killed {
        Some((who, _)) => {
            let survivor = if who == "primary" { ss } else { ps };
            format!(
                "killed the {who}; {}",
                survivor
                    .as_ref()
                    .and_then(|s| s.node.failover_reason.as_deref())
                    .map_or_else(
                        || "waiting for the survivor to notice…".to_string(),
                        |r| format!("survivor: {r}")
                    )
            )
        }
        None => "none".to_string(),
    };
    out.push_str(&format!("  events       {}\n", clip(&event, 90)));
    out.push_str(&format!("  node logs    {}\n", x.dir.display()));
    out
}

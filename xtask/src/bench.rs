//! `cargo xtask bench [--quick] [--link-only] [--only SECTIONS] [--json FILE]`: colo's end-to-end speed figures
//! on the mock backend over loopback, each beside a raw loopback TCP baseline measured in the
//! same run.
//!
//! The outer command re-runs this module as an optimized build (`cargo run --release -p xtask
//! -- bench --inner …`), so every figure comes from release code. The inner run measures, in
//! order: raw TCP throughput, pause time against dirty pages per checkpoint (a 1 GiB `dirty`
//! guest pair whose workload is stopped, with exactly N pages written by a vCPU before each
//! checkpoint), the highest sustained checkpoint rate, the guest's slowdown, dirty harvest time
//! against RAM size and dirty fraction, comparator throughput, failover time, and what the
//! sealed link costs: the initial-sync rate, the 10,000-page pause and checkpoint throughput of
//! a pair with encrypted records beside one with `--insecure-plaintext` (`--link-only` runs
//! just that, after the TCP baseline), the pause beside its memory-bound floor (`floor.rs`),
//! the CPU time of an idle pair, checkpoints over links slower than memory (`shaped.rs`), and
//! the disk figures (`bench/disk.rs`). `--only disk,floor,idle,shaped,throughput` runs just those sections. It
//! prints a table, optionally writes a JSON object, and always writes
//! `target/colo-bench/pause.svg`.

mod floor;
mod shaped;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use colo_cli::mock::{build, MockSpec, WorkloadKind};
use colo_cli::node::{new_status, NodeOptions, PrimaryNode, SecondaryOutcome};
use colo_cli::status::{percentile, CheckpointFigures, Shared};
use colo_cli::testing::spawn_secondary;
use colo_core::compare::{Comparator, CompareConfig};
use colo_core::engine::{Liveness, PrimaryState};
use colo_core::policy::CheckpointPolicy;
use colo_core::{DirtyBitmap, Domain, PAGE_SIZE};
use colo_mock::guest::DATA_PFN;
use colo_mock::{DirtyConfig, MockConfig, MockDomain, Workload};
use serde_json::{json, Value};

mod disk;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The paced guest-slowdown run's dirty rate (pages/ms): the `dirty` workload's default.
const PACED_RATE: u64 = 100;

/// Entry point of `cargo xtask bench`.
pub fn run(args: &[String]) -> Result<()> {
    let mut quick = false;
    let mut link_only = false;
    let mut only: Option<String> = None;
    let mut json_path: Option<PathBuf> = None;
    let mut inner = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--link-only" => link_only = true,
            "--inner" => inner = true,
            "--json" => {
                let v = it.next().context("--json needs a file name")?;
                json_path = Some(PathBuf::from(v));
            }
            "--only" => {
                let v = it
                    .next()
                    .context("--only needs sections: disk,floor,idle,shaped,throughput")?;
                if let Some(bad) = v.split(',').find(|s| !SECTIONS.contains(s)) {
                    bail!(
                        "bench: unknown section `{bad}` (expected {})",
                        SECTIONS.join(", ")
                    );
                }
                only = Some(v.clone());
            }
            other => bail!(
                "bench: unknown argument `{other}` (expected --quick, --link-only, --only \
                 SECTIONS, --json FILE)"
            ),
        }
    }
    if let (true, Some(sections)) = (inner, only.as_deref()) {
        return run_sections(quick, sections, json_path.as_deref());
    }
    if inner && link_only {
        return run_link_only(quick, json_path.as_deref());
    }
    if inner {
        return run_inner(quick, json_path.as_deref());
    }
    // Re-run as an optimized build; a relative --json path stays relative to the caller's cwd.
    let mut inner_args: Vec<String> = vec![
        "run".into(),
        "--release".into(),
        "--quiet".into(),
        "-p".into(),
        "xtask".into(),
        "--".into(),
        "bench".into(),
        "--inner".into(),
    ];
    if quick {
        inner_args.push("--quick".into());
    }
    if link_only {
        inner_args.push("--link-only".into());
    }
    if let Some(o) = only {
        inner_args.push("--only".into());
        inner_args.push(o);
    }
    if let Some(p) = json_path {
        let abs = if p.is_absolute() {
            p
        } else {
            std::env::current_dir()
                .context("current directory")?
                .join(p)
        };
        inner_args.push("--json".into());
        inner_args.push(abs.to_string_lossy().into_owned());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask bench: building and running the optimized bench (cargo run --release)");
    // The idle-pair figure runs real `colo` processes, built beside the bench.
    let status = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "colo-cli",
            "--bin",
            "colo",
        ])
        .current_dir(crate::root())
        .status()
        .with_context(|| format!("running {cargo} build --release -p colo-cli"))?;
    if !status.success() {
        bail!("building the optimized colo binary failed ({status})");
    }
    let status = Command::new(&cargo)
        .args(&inner_args)
        .current_dir(crate::root())
        .status()
        .with_context(|| format!("running {cargo} {}", inner_args.join(" ")))?;
    if !status.success() {
        bail!("the optimized bench failed ({status})");
    }
    Ok(())
}

/// The sections `--only` may name.
const SECTIONS: &[&str] = &["disk", "floor", "idle", "shaped", "throughput"];

/// `--only`: the named sections alone, each beside its own baselines.
fn run_sections(quick: bool, sections: &str, json_path: Option<&Path>) -> Result<()> {
    if !optimized() {
        eprintln!("xtask bench: warning: not an optimized build; figures are not representative");
    }
    let started = Instant::now();
    let mut j = json!({ "quick": quick });
    let has = |s: &str| sections.split(',').any(|x| x == s);
    let floor = has("floor")
        .then(|| floor::pause_floor_alone(quick))
        .transpose()?;
    let idle = has("idle")
        .then(|| floor::idle_cpu(idle_secs(quick)))
        .transpose()?;
    let shaped = has("shaped").then(|| shaped::run(quick)).transpose()?;
    if has("throughput") {
        extend(&mut j, throughput_alone(quick)?);
    }
    if has("disk") {
        let tcp_gbps = tcp_baseline(if quick { 256 } else { 1024 })?;
        j["tcp_gbps"] = json!(tcp_gbps);
        j["disk"] = disk::figures(quick, tcp_gbps)?;
    }
    if let Some(f) = &floor {
        f.print();
        extend(&mut j, floor_json(f));
    }
    if let Some(i) = idle {
        print_idle(i);
        extend(&mut j, idle_json(i));
    }
    if let Some(s) = &shaped {
        s.print();
        extend(&mut j, s.json());
    }
    println!("bench finished in {:.1} s", started.elapsed().as_secs_f64());
    if let Some(p) = json_path {
        std::fs::write(p, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("json: {}", p.display());
    }
    Ok(())
}

/// `--only throughput`: the initial synchronisation of a 1 GiB pair whose RAM exists, then
/// checkpoints of 10,000 scattered pages on it: their throughput (NEW → SVM_READY) and phases,
/// each beside raw loopback TCP measured right before; for plaintext records
/// (`--insecure-plaintext`, the headline) and then for a sealed link (AES-256-GCM).
fn throughput_alone(quick: bool) -> Result<Value> {
    let plain = throughput_pair(quick, true)?;
    let sealed = throughput_pair(quick, false)?;
    let streams = throughput_streams(quick)?;
    let mut j = plain;
    extend(&mut j, json!({ "sealed": sealed }));
    extend(&mut j, streams);
    Ok(j)
}

/// 10,000-page checkpoints (plaintext records) on unshaped loopback over one connection and
/// over two (`--streams 2`): two 256 MiB pairs, checkpoints taken on them in turn.
fn throughput_streams(quick: bool) -> Result<Value> {
    let reps = if quick { 8 } else { 30 };
    let mut pairs = Vec::new();
    for streams in [1u8, 2] {
        let pair = Pair::start_setup(
            256 * MIB,
            &format!("throughput, --streams {streams}"),
            Some(true),
            &|o| o.streams = streams,
            None,
        )?;
        pairs.push((streams, pair, Vec::new()));
    }
    let mut seed = 0x7374_7265_616d_u64;
    for _ in 0..reps {
        seed = splitmix(seed);
        for (_, pair, ms) in &mut pairs {
            pair.dirty(10_000, seed)?;
            ms.push(pair.checkpoint()?.total_ms);
        }
    }
    let mut j = json!({});
    let mut line = String::new();
    for (streams, mut pair, ms) in pairs {
        pair.stop();
        let p50 = percentile(ms, 50.0).unwrap_or(0.0);
        line.push_str(&format!(" --streams {streams}: {p50:.1} ms;"));
        j[format!("checkpoint_10k_total_ms_256mib_streams{streams}")] = json!(p50);
    }
    println!(
        "\nplaintext records, unshaped loopback, 256 MiB pairs taken in turn ({reps} each): \
         10,000-page checkpoint NEW → SVM_READY p50{line}"
    );
    Ok(j)
}

/// [`throughput_alone`] for one pair: plaintext records or a sealed link.
fn throughput_pair(quick: bool, plaintext: bool) -> Result<Value> {
    let link = if plaintext {
        "plaintext records"
    } else {
        "sealed link"
    };
    let tcp_mib = if quick { 256 } else { 2048 };
    let sync_tcp = tcp_baseline(tcp_mib)?;
    // Every page of both guests existing.
    let mut pair = Pair::start_with(GIB, "throughput", Some(plaintext))?;
    let sync_gbps = GIB as f64 / pair.synced_in.as_secs_f64() / 1e9;
    let tcp = tcp_baseline(tcp_mib)?;
    let reps = if quick { 12 } else { 50 };
    let mut figs = Vec::with_capacity(reps);
    let mut applies = Vec::with_capacity(reps);
    let mut seed = 0x7470_7574_u64;
    for _ in 0..reps {
        seed = splitmix(seed);
        pair.dirty(10_000, seed)?;
        figs.push(pair.checkpoint()?);
        // Set before the secondary sent SVM_READY, so it is this checkpoint's.
        applies.extend(pair.sstatus.lock().last_apply_ms);
    }
    pair.stop();
    let apply = percentile(applies, 50.0).unwrap_or(0.0);
    let p = |g: fn(&CheckpointFigures) -> f64| {
        percentile(figs.iter().map(g).collect(), 50.0).unwrap_or(0.0)
    };
    let gbps = p(|f| f.bytes_sent as f64 / (f.total_ms / 1e3) / 1e9);
    let phases = [
        p(|f| f.harvest_ms),
        p(|f| f.capture_ms),
        p(|f| f.backchannel_ms),
        p(|f| f.send_ms),
        p(|f| f.commit_ms),
        p(|f| f.total_ms),
    ];
    let tcp_ms = p(|f| f.bytes_sent as f64) / (tcp * 1e9) * 1e3;
    let kept = kept_buffers_baseline(p(|f| f.bytes_sent as f64) as u64)?;
    println!(
        "\n{link}: checkpoints of 10,000 pages ({reps}), p50 ms: harvest {:.1} + capture {:.1} + \
         back channel {:.1} + send {:.1} + commit {:.1} (of which the secondary's apply \
         {apply:.1}); NEW → SVM_READY {:.1} (raw TCP {tcp_ms:.1}; the same bytes into one 1 MiB buffer {:.1}, into {} buffers in turn as the \
         secondary keeps them {:.1})",
        phases[0],
        phases[1],
        phases[2],
        phases[3],
        phases[4],
        phases[5],
        kept.one_ms,
        kept.bufs,
        kept.kept_ms
    );
    println!(
        "{link}: checkpoint throughput {gbps:.2} GB/s = {:.2} × raw TCP ({tcp:.2} GB/s); initial \
         sync (1 GiB) {sync_gbps:.2} GB/s = {:.2} × raw TCP ({sync_tcp:.2} GB/s)",
        gbps / tcp,
        sync_gbps / sync_tcp
    );
    Ok(json!({
        "throughput_ratio_vs_tcp": gbps / tcp,
        "checkpoint_throughput_gbps": gbps,
        "initial_sync_ratio_vs_tcp": sync_gbps / sync_tcp,
        "initial_sync_gbps": sync_gbps,
        "checkpoint_10k_phases_ms_p50": {
            "harvest": phases[0], "capture": phases[1], "backchannel": phases[2],
            "send": phases[3], "commit": phases[4], "total": phases[5], "apply": apply,
        },
        "raw_tcp_ms": tcp_ms,
        "raw_tcp_one_buffer_ms": kept.one_ms,
        "raw_tcp_kept_buffers_ms": kept.kept_ms,
    }))
}

/// Raw TCP of a checkpoint's bytes read into one 1 MiB buffer, and into as many buffers as the
/// secondary keeps for it, ms (median of 5 each, alternating): how much of the send phase is
/// receiving into memory that is not in the cache.
struct KeptBaseline {
    bufs: usize,
    one_ms: f64,
    kept_ms: f64,
}

fn kept_buffers_baseline(bytes: u64) -> Result<KeptBaseline> {
    let bufs = bytes.div_ceil(MIB).max(1) as usize;
    let (mut one, mut kept) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        one.push(bytes as f64 / raw_tcp_into(bytes, 1)? / 1e6);
        kept.push(bytes as f64 / raw_tcp_into(bytes, bufs)? / 1e6);
    }
    Ok(KeptBaseline {
        bufs,
        one_ms: percentile(one, 50.0).unwrap_or(0.0),
        kept_ms: percentile(kept, 50.0).unwrap_or(0.0),
    })
}

/// How long the idle pair is watched, s.
fn idle_secs(quick: bool) -> f64 {
    if quick {
        10.0
    } else {
        30.0
    }
}

fn print_idle(i: [f64; 2]) {
    println!(
        "
idle protected pair (64 MiB kv guests, checkpoint every 1 s, no clients), CPU per \
         node: primary {:.2} %, secondary {:.2} % of one core (target ≤ 1 %)",
        i[0], i[1]
    );
}

fn idle_json(i: [f64; 2]) -> Value {
    json!({
        "idle_cpu_pct_per_node": i[0].max(i[1]),
        "idle_cpu_pct_primary": i[0],
        "idle_cpu_pct_secondary": i[1],
    })
}

fn floor_json(f: &floor::Floor) -> Value {
    json!({
        "pause_floor_ratio_10k": f.tenk.ratio(),
        "pause_floor_ratio_full": f.full.ratio(),
        "pause_floor": { "10k": f.tenk.json(), "full": f.full.json() },
    })
}

/// Adds `more`'s keys to the object `j`.
fn extend(j: &mut Value, more: Value) {
    if let (Value::Object(m), Value::Object(p)) = (j, more) {
        m.extend(p);
    }
}

/// Guards against a debug build producing figures.
fn optimized() -> bool {
    !cfg!(debug_assertions)
}

/// Everything the run measured, for the table, the JSON and the plot.
struct Report {
    quick: bool,
    tcp_gbps: f64,
    /// Guest RAM fully populated (as a real guest's is): the headline figures.
    populated: Sweep,
    /// Guest RAM sparse (only written pages exist): shows the cost of the mock's hole probe.
    sparse: Sweep,
    /// The dirty workload flat out.
    slowdown: Slowdown,
    /// The dirty workload at [`PACED_RATE`].
    paced: Slowdown,
    harvest: Vec<HarvestRow>,
    cmp_fps: f64,
    /// Client response latency through a replicated pair vs a primary alone, ms.
    latency: Latency,
    failover_ms: Vec<f64>,
    /// Plaintext beside sealed records.
    link: LinkCost,
    /// The pause beside its memory-bound floor.
    floor: floor::Floor,
    /// CPU of an idle protected pair, % of a core: [primary, secondary].
    idle: [f64; 2],
    /// Checkpoints over rate-limited links.
    shaped: shaped::Shaped,
    total_s: f64,
}

/// One pair's figures in the sealed-link comparison.
#[derive(Debug, Clone, Copy, Default)]
struct LinkRow {
    /// Guest RAM ÷ the initial synchronisation (connect to checkpoint 0 committed), GB/s.
    sync_gbps: f64,
    /// The 10,000-page checkpoint's pause, p50, ms.
    pause_p50: f64,
    /// Its whole duration (NEW → SVM_READY), p50, ms.
    total_p50: f64,
    /// Its bytes ÷ its whole duration, p50, GB/s.
    throughput_gbps: f64,
    reps: usize,
}

/// The sealed link's cost: `[plaintext, sealed]`, measured alternately on two pairs of the
/// same size in one run.
#[derive(Debug, Clone, Copy, Default)]
struct LinkCost {
    ram: u64,
    rows: [LinkRow; 2],
}

impl LinkCost {
    /// sealed ÷ plaintext for a figure.
    fn ratio(&self, f: fn(&LinkRow) -> f64) -> f64 {
        f(&self.rows[1]) / f(&self.rows[0]).max(f64::MIN_POSITIVE)
    }
}

/// Response latency of kv requests (one outstanding at a time), ms.
struct Latency {
    replicated_p50: f64,
    replicated_p99: f64,
    alone_p50: f64,
    alone_p99: f64,
}

/// Pause sweep, checkpoint throughput and maximum rate on one pair.
struct Sweep {
    /// The raw TCP baseline measured right before this sweep, GB/s.
    tcp_gbps: f64,
    /// Bytes ÷ the send phase (after resume, until CHECKPOINT is written) of the largest
    /// checkpoints, as a ratio to raw TCP: the link's own efficiency.
    send_ratio: f64,
    rows: Vec<PauseRow>,
    throughput_ratio: f64,
    throughput_gbps: f64,
    max_cps: f64,
    max_cps_pages_max: u64,
    max_cps_pause_p50: f64,
}

struct PauseRow {
    dirty: u64,
    reps: usize,
    pages_sent_mean: f64,
    bytes_mean: f64,
    p50: f64,
    p99: f64,
    total_p50: f64,
    /// p50 of each phase: harvest, capture, back channel, send, commit (ms).
    phases: [f64; 5],
    tcp_ms: f64,
    target_ms: Option<f64>,
}

struct HarvestRow {
    ram: u64,
    fraction: f64,
    pages: u64,
    p50_ms: f64,
}

struct Slowdown {
    alone_sps: f64,
    replicated_sps: f64,
    checkpoints: u64,
    pages_per_cp: f64,
    pause_p50: f64,
}

fn run_inner(quick: bool, json_path: Option<&Path>) -> Result<()> {
    if !optimized() {
        eprintln!("xtask bench: warning: not an optimized build; figures are not representative");
    }
    let started = Instant::now();
    println!(
        "colo bench ({}), {} cores, kernel {}",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel()
    );

    // 1. Raw loopback TCP.
    let tcp_mib = if quick { 256 } else { 2048 };
    let tcp_gbps = tcp_baseline(tcp_mib)?;

    // 2–3. Pause time against dirty pages, checkpoint throughput and the highest sustained
    // checkpoint rate, on a 1 GiB pair with sparse RAM, then with populated RAM.
    // One pair: sparse first, then every page of the primary's RAM is made to exist.
    let mut pair = Pair::start(GIB, "pause sweeps")?;
    let sparse = sweep_pair(&mut pair, quick, tcp_baseline(tcp_mib)? * 1e9)?;
    let first_full = pair.populate()?;
    let populated = sweep_pair(&mut pair, quick, tcp_baseline(tcp_mib)? * 1e9)?;
    let floor = floor::pause_floor(&mut pair, quick, Some(first_full))?;
    // 4. Guest slowdown: the dirty workload flat out, alone vs tracked and replicated.
    let slow_secs = if quick { 1.0 } else { 8.0 };
    let period = Duration::from_millis(50);
    let replicated = pair.replicated_steps(slow_secs, period, DirtyConfig::UNLIMITED)?;
    let paced_rep = pair.replicated_steps(slow_secs, period, PACED_RATE)?;
    pair.stop();
    let slowdown = Slowdown {
        alone_sps: alone_steps(GIB, slow_secs, DirtyConfig::UNLIMITED)?,
        ..replicated
    };
    let paced = Slowdown {
        alone_sps: alone_steps(GIB, slow_secs, PACED_RATE)?,
        ..paced_rep
    };
    println!(
        "  guest steps/s at {PACED_RATE} pages/ms: {:.0} alone, {:.0} replicated (ratio {:.3})",
        paced.alone_sps,
        paced.replicated_sps,
        paced.replicated_sps / paced.alone_sps.max(1.0)
    );
    println!(
        "  guest steps/s: {:.0} alone, {:.0} replicated (ratio {:.3})",
        slowdown.alone_sps,
        slowdown.replicated_sps,
        slowdown.replicated_sps / slowdown.alone_sps.max(1.0)
    );

    // 5. Dirty harvest time against RAM size and dirty fraction.
    let harvest = harvest_sweep(quick)?;

    // 6. Comparator throughput.
    let cmp_fps = comparator_fps(if quick { 200_000 } else { 2_000_000 })?;
    println!("  comparator: {:.2} M frame pairs/s", cmp_fps / 1e6);

    // 6b. Latency the comparator (waiting for the secondary's twin) adds to a response.
    let latency = response_latency(if quick { 2000 } else { 20_000 })?;
    println!(
        "  response latency: replicated p50 {:.3} ms p99 {:.3} ms; alone p50 {:.3} ms p99 {:.3} ms",
        latency.replicated_p50, latency.replicated_p99, latency.alone_p50, latency.alone_p99
    );

    // 7. Failover.
    let mut failover_ms = Vec::new();
    for i in 0..if quick { 5 } else { 10 } {
        let ms = failover_once(64 * MIB).with_context(|| format!("failover run {i}"))?;
        failover_ms.push(ms);
    }
    println!("  failover: {:.2?} ms", failover_ms);

    // 8. The sealed link's cost.
    let link = link_cost(quick)?;

    // 9. Disk replication (bench/disk.rs); 10. an idle pair's CPU; 11. links slower than memory.
    let disk = disk::figures(quick, tcp_gbps)?;
    let idle = floor::idle_cpu(idle_secs(quick))?;
    let shaped = shaped::run(quick)?;

    let report = Report {
        quick,
        tcp_gbps,
        populated,
        sparse,
        slowdown,
        paced,
        harvest,
        cmp_fps,
        latency,
        failover_ms,
        link,
        floor,
        idle,
        shaped,
        total_s: started.elapsed().as_secs_f64(),
    };
    print_table(&report);
    let out_dir = crate::target_dir().join("colo-bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let svg = out_dir.join("pause.svg");
    std::fs::write(&svg, plot_svg(&report))
        .with_context(|| format!("writing {}", svg.display()))?;
    println!("plot: {}", svg.display());
    let mut j = to_json(&report);
    j["disk"] = disk;
    let last = out_dir.join("last.json");
    let text = serde_json::to_string_pretty(&j)?;
    std::fs::write(&last, &text).with_context(|| format!("writing {}", last.display()))?;
    if let Some(p) = json_path {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
        println!("json: {}", p.display());
    }
    Ok(())
}

/// `--link-only`: the TCP baseline and the sealed link's cost, nothing else.
fn run_link_only(quick: bool, json_path: Option<&Path>) -> Result<()> {
    if !optimized() {
        eprintln!("xtask bench: warning: not an optimized build; figures are not representative");
    }
    let started = Instant::now();
    let tcp_gbps = tcp_baseline(if quick { 256 } else { 2048 })?;
    let link = link_cost(quick)?;
    println!("\nraw loopback TCP throughput (baseline, this run)      {tcp_gbps:>10.2} GB/s");
    print_link(&link);
    println!("bench finished in {:.1} s", started.elapsed().as_secs_f64());
    if let Some(p) = json_path {
        let j = json!({ "quick": quick, "tcp_gbps": tcp_gbps, "link": link_json(&link) });
        std::fs::write(p, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("json: {}", p.display());
    }
    Ok(())
}

/// The pre-shared key of the bench's sealed-link pairs.
const BENCH_KEY: &[u8] = b"colo bench link key";

/// Pairs of the same size, one with sealed records and one with `--insecure-plaintext` (both
/// with a key, so only the records' encryption differs): the initial-sync rate of each, then
/// blocks of 10,000-page checkpoints taken on each in turn (so a change in the machine's load
/// moves both).
fn link_cost(quick: bool) -> Result<LinkCost> {
    let ram = if quick { 256 * MIB } else { GIB };
    let (blocks, per_block) = if quick { (24, 1) } else { (60, 1) };
    let mut pairs = Vec::new();
    let mut rows = [LinkRow::default(); 2];
    // Two rounds, the modes in turn: the initial-sync rate is the better of each mode's two
    // (the machine's load varies), and the second round's pairs take the checkpoints.
    for round in 0..2 {
        for (i, sealed) in [false, true].into_iter().enumerate() {
            let what = if sealed {
                "sealed link"
            } else {
                "plaintext link"
            };
            let mut pair = Pair::start_with(ram, what, Some(!sealed))?;
            let gbps = ram as f64 / pair.synced_in.as_secs_f64() / 1e9;
            rows[i].sync_gbps = rows[i].sync_gbps.max(gbps);
            if round == 0 {
                pair.stop();
            } else {
                pairs.push(pair);
            }
        }
    }
    let mut figs: [Vec<CheckpointFigures>; 2] = [Vec::new(), Vec::new()];
    let mut seed = 0x5eed_u64;
    for _ in 0..blocks {
        for (i, pair) in pairs.iter_mut().enumerate() {
            for _ in 0..per_block {
                seed = splitmix(seed);
                pair.dirty(10_000, seed)?;
                figs[i].push(pair.checkpoint()?);
            }
        }
    }
    for mut pair in pairs {
        pair.stop();
    }
    for (row, figs) in rows.iter_mut().zip(&figs) {
        let p50 = |g: &dyn Fn(&CheckpointFigures) -> f64| {
            percentile(figs.iter().map(g).collect(), 50.0).unwrap_or(0.0)
        };
        row.pause_p50 = p50(&|f| f.pause_ms);
        row.total_p50 = p50(&|f| f.total_ms);
        row.throughput_gbps = p50(&|f| f.bytes_sent as f64 / (f.total_ms / 1e3) / 1e9);
        row.reps = figs.len();
    }
    let cost = LinkCost { ram, rows };
    println!(
        "  sealed link: 10,000-page pause {:.3} vs {:.3} ms plaintext ({:+.1} %), throughput \
         {:.2} vs {:.2} GB/s (× {:.3}), initial sync {:.2} vs {:.2} GB/s (× {:.3})",
        rows[1].pause_p50,
        rows[0].pause_p50,
        (cost.ratio(|r| r.pause_p50) - 1.0) * 100.0,
        rows[1].throughput_gbps,
        rows[0].throughput_gbps,
        cost.ratio(|r| r.throughput_gbps),
        rows[1].sync_gbps,
        rows[0].sync_gbps,
        cost.ratio(|r| r.sync_gbps),
    );
    Ok(cost)
}

fn print_link(l: &LinkCost) {
    println!(
        "\nsealed link (AES-256-GCM) beside --insecure-plaintext, {} MiB pairs, 10,000 dirty \
         pages per checkpoint ({} each)",
        l.ram >> 20,
        l.rows[1].reps
    );
    println!(
        "{:>22} {:>12} {:>12} {:>14} {:>14}",
        "", "pause p50", "NEW→READY", "throughput", "initial sync"
    );
    for (name, r) in [("plaintext", &l.rows[0]), ("sealed", &l.rows[1])] {
        println!(
            "{name:>22} {:>9} ms {:>9} ms {:>9.2} GB/s {:>9.2} GB/s",
            ms(r.pause_p50),
            ms(r.total_p50),
            r.throughput_gbps,
            r.sync_gbps
        );
    }
    println!(
        "{:>22} {:>11.3}× {:>11.3}× {:>12.3}× {:>12.3}×   (targets: pause ≤ 1.10×, throughput ≥ 0.90×)",
        "sealed ÷ plaintext",
        l.ratio(|r| r.pause_p50),
        l.ratio(|r| r.total_p50),
        l.ratio(|r| r.throughput_gbps),
        l.ratio(|r| r.sync_gbps)
    );
}

fn link_json(l: &LinkCost) -> Value {
    let row = |r: &LinkRow| {
        json!({
            "initial_sync_gbps": r.sync_gbps,
            "pause_10k_ms_p50": r.pause_p50,
            "checkpoint_10k_ms_p50": r.total_p50,
            "throughput_gbps": r.throughput_gbps,
            "checkpoints": r.reps,
        })
    };
    json!({
        "ram_mib": l.ram >> 20,
        "plaintext": row(&l.rows[0]),
        "sealed": row(&l.rows[1]),
        "pause_ratio": l.ratio(|r| r.pause_p50),
        "throughput_ratio": l.ratio(|r| r.throughput_gbps),
        "initial_sync_ratio": l.ratio(|r| r.sync_gbps),
    })
}

/// Pause time against dirty pages (exactly N pages written before each checkpoint), checkpoint
/// throughput, and the highest sustained rate with 50 dirty pages per checkpoint, on `pair`.
///
/// `tcp_bps` is a raw TCP baseline measured just before, so that a change in the machine's load
/// between the sweeps moves both sides together.
fn sweep_pair(pair: &mut Pair, quick: bool, tcp_bps: f64) -> Result<Sweep> {
    let sweep: &[(u64, usize)] = if quick {
        &[(0, 30), (100, 30), (1_000, 20), (10_000, 12), (50_000, 4)]
    } else {
        &[
            (0, 200),
            (100, 200),
            (1_000, 100),
            (10_000, 50),
            (50_000, 20),
        ]
    };
    let mut pause_rows = Vec::new();
    let mut tput = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for &(n, reps) in sweep {
        let mut figs = Vec::with_capacity(reps);
        for _ in 0..reps {
            seed = splitmix(seed);
            pair.dirty(n, seed)?;
            figs.push(pair.checkpoint()?);
        }
        let pauses: Vec<f64> = figs.iter().map(|f| f.pause_ms).collect();
        let totals: Vec<f64> = figs.iter().map(|f| f.total_ms).collect();
        let pages_mean = figs.iter().map(|f| f.pages_sent as f64).sum::<f64>() / reps as f64;
        let bytes_mean = figs.iter().map(|f| f.bytes_sent as f64).sum::<f64>() / reps as f64;
        if n >= 10_000 {
            for f in &figs {
                tput.push(f.bytes_sent as f64 / (f.total_ms / 1e3));
            }
        }
        let tcp_ms = bytes_mean / tcp_bps * 1e3;
        let row = PauseRow {
            dirty: n,
            reps,
            pages_sent_mean: pages_mean,
            bytes_mean,
            p50: percentile(pauses.clone(), 50.0).unwrap_or(0.0),
            p99: percentile(pauses, 99.0).unwrap_or(0.0),
            total_p50: percentile(totals, 50.0).unwrap_or(0.0),
            phases: {
                let p = |g: fn(&CheckpointFigures) -> f64| {
                    percentile(figs.iter().map(g).collect(), 50.0).unwrap_or(0.0)
                };
                [
                    p(|f| f.harvest_ms),
                    p(|f| f.capture_ms),
                    p(|f| f.backchannel_ms),
                    p(|f| f.send_ms),
                    p(|f| f.commit_ms),
                ]
            },
            tcp_ms,
            target_ms: match n {
                0..=99 => Some(1.0),
                10_000 => Some(1.25 * tcp_ms + 2.0),
                _ => None,
            },
        };
        println!(
            "  {:>6} dirty pages: pause p50 {:.3} ms, p99 {:.3} ms ({} reps, |D| {:.0})",
            n, row.p50, row.p99, reps, pages_mean
        );
        pause_rows.push(row);
    }
    // Throughput: bytes of a large checkpoint over its whole duration (NEW → SVM_READY).
    let throughput_bps = percentile(tput, 50.0).unwrap_or(0.0);
    let throughput_ratio = throughput_bps / tcp_bps;

    // 3. Highest sustained checkpoint rate with ≤ 100 dirty pages each (policy min_interval 0).
    let rate_secs = if quick { 1.0 } else { 10.0 };
    let (max_cps, max_cps_pages_max, max_cps_pause_p50) = pair.max_rate(rate_secs, 50)?;
    println!(
        "  max sustained rate: {max_cps:.0} checkpoints/s (50 pages each, |D| ≤ {max_cps_pages_max})"
    );

    let send_ratio = pause_rows
        .last()
        .filter(|r| r.phases[3] > 0.0)
        .map_or(0.0, |r| r.bytes_mean / (r.phases[3] / 1e3) / tcp_bps);
    Ok(Sweep {
        tcp_gbps: tcp_bps / 1e9,
        send_ratio,
        rows: pause_rows,
        throughput_ratio,
        throughput_gbps: throughput_bps / 1e9,
        max_cps,
        max_cps_pages_max,
        max_cps_pause_p50,
    })
}

/// Raw loopback TCP: median of 3 transfers of `mib` MiB, GB/s.
fn tcp_baseline(mib: u64) -> Result<f64> {
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(raw_tcp_gbps(mib * MIB)?);
    }
    let gbps = percentile(runs.clone(), 50.0).unwrap_or(0.0);
    println!("raw loopback TCP: {gbps:.2} GB/s (median of 3 × {mib} MiB; runs {runs:.2?})");
    Ok(gbps)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `n` distinct workload-data pfns of a `pages`-page guest, scattered (a stride permutation
/// from a random start).
fn scattered_pfns(pages: u64, n: u64, seed: u64) -> Result<Vec<u64>> {
    let span = pages.saturating_sub(DATA_PFN);
    if n > span {
        bail!("cannot dirty {n} distinct pages of a {pages}-page guest");
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut stride = 7919 + (seed % 4096) * 2;
    while gcd(stride, span) != 1 {
        stride += 1;
    }
    let start = splitmix(seed) % span;
    Ok((0..n)
        .map(|i| DATA_PFN + (start + i * stride) % span)
        .collect())
}

/// Writes one word into each of `pfns` from a vCPU (as guest code, so dirty tracking sees it).
fn dirty_pfns(dom: &MockDomain, pfns: Vec<u64>, value: u64) -> Result<()> {
    if pfns.is_empty() {
        return Ok(());
    }
    let res = dom
        .exec_on_vcpu(move |mem| {
            for p in pfns {
                mem.write(p as usize * PAGE_SIZE + 8, &value.to_le_bytes())?;
            }
            Ok::<(), colo_mock::MockError>(())
        })
        .context("running the dirtying job on a vCPU")?;
    res.context("writing guest RAM")
}

/// Raw loopback TCP: one thread writes `bytes` in 1 MiB writes, another reads them; both
/// sockets with TCP_NODELAY and 4 MiB buffers. GB/s (10^9 bytes/s).
fn raw_tcp_gbps(bytes: u64) -> Result<f64> {
    raw_tcp_into(bytes, 1)
}

/// Raw loopback TCP, GB/s, of `bytes` read into `bufs` 1 MiB buffers in turn (each one filled
/// before the next; all written once before the clock starts, so no page faults): 1 is the
/// usual baseline, one hot buffer; a checkpoint's size in MiB is what the secondary does,
/// which keeps every receive buffer of a checkpoint until its apply.
fn raw_tcp_into(bytes: u64, bufs: usize) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    let mut ring: Vec<Vec<u8>> = (0..bufs.max(1)).map(|_| vec![1u8; MIB as usize]).collect();
    let reader = std::thread::spawn(move || -> Result<u64> {
        let (mut s, _) = listener.accept()?;
        tune(&s)?;
        let (mut got, mut k, mut fill) = (0u64, 0, 0);
        loop {
            let buf = &mut ring[k];
            let n = s.read(&mut buf[fill..])?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
            fill += n;
            if fill == buf.len() {
                fill = 0;
                k = (k + 1) % ring.len();
            }
        }
    });
    let mut s = TcpStream::connect(addr)?;
    tune(&s)?;
    let buf = vec![0x5au8; MIB as usize];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(MIB) as usize;
        s.write_all(&buf[..n])?;
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let got = reader
        .join()
        .map_err(|_| anyhow!("TCP reader thread panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    if got != bytes {
        bail!("raw TCP: sent {bytes} bytes, received {got}");
    }
    Ok(bytes as f64 / secs / 1e9)
}

fn tune(s: &TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let r = socket2::SockRef::from(s);
    r.set_send_buffer_size(4 * MIB as usize)?;
    r.set_recv_buffer_size(4 * MIB as usize)?;
    Ok(())
}

fn dirty_spec(ram: u64, rate: u64, seed: u64) -> MockSpec {
    MockSpec {
        ram,
        ram_file: None,
        workload: WorkloadKind::Dirty,
        vm_seed: seed,
        memory_divergence: false,
        output_divergence: 0.0,
        dirty_rate: rate,
    }
}

/// Writes zeros over all of a paused guest's RAM so that its pages exist (a fresh memfd is
/// sparse, and first-touch allocation would otherwise be charged to whatever runs first).
fn prefault(dom: &mut MockDomain) -> Result<()> {
    let pages = dom.page_count();
    let zeros = vec![0u8; 1024 * PAGE_SIZE];
    let mut pfns = Vec::with_capacity(1024);
    let mut p = 0;
    while p < pages {
        pfns.clear();
        pfns.extend(p..(p + 1024).min(pages));
        dom.write_pages(&pfns, &zeros[..pfns.len() * PAGE_SIZE])?;
        p += 1024;
    }
    Ok(())
}

/// Node options for the bench: only the bench's own requests trigger checkpoints. `silence`
/// replaces the liveness timeout for the 1 GiB pair (see [`Pair::start`]).
fn bench_opts(silence: Option<Duration>) -> NodeOptions {
    let mut liveness = Liveness::default();
    if let Some(s) = silence {
        // A whole-guest checkpoint of 1 GiB takes seconds on a loaded machine.
        liveness.timeout = s;
        liveness.progress_timeout = liveness.progress_timeout.max(s);
    }
    NodeOptions {
        liveness,
        policy: CheckpointPolicy {
            min_interval: Duration::ZERO,
            max_interval: Duration::from_secs(3600),
        },
        compare: CompareConfig::default(),
        ..NodeOptions::default()
    }
}

/// Gives the address the primary connects to, for the secondary's (a proxy in between).
type Via<'a> = dyn Fn(&str) -> Result<String> + 'a;

/// A replicated pair in this process: the secondary in a thread, the primary driven here.
struct Pair {
    primary: Option<PrimaryNode<MockDomain>>,
    status: Shared,
    /// The secondary's status (its last apply's duration).
    sstatus: Shared,
    secondary: Option<JoinHandle<Result<Option<Instant>>>>,
    sec_stop: Arc<AtomicBool>,
    pages: u64,
    value: u64,
    /// From the connection to checkpoint 0 committed.
    synced_in: Duration,
}

impl Pair {
    /// Builds two `ram`-byte dirty guests with their workload stopped, connects them and waits
    /// for the initial synchronisation to commit.
    ///
    /// Pairs larger than 256 MiB use a 60 s silence timeout: the driver blocks while it writes a
    /// pre-copy round or a whole-RAM checkpoint (seconds for 1 GiB on a loaded 2-core machine),
    /// and an older driver judged liveness before reading the heartbeats that arrived meanwhile.
    /// Failover is measured on small pairs with the default liveness settings.
    fn start(ram: u64, what: &str) -> Result<Self> {
        Self::start_with(ram, what, None)
    }

    /// [`Pair::start`]; with `plaintext` Some, both nodes hold [`BENCH_KEY`] (their records
    /// sealed unless it is `Some(true)`, `--insecure-plaintext`) and both guests' RAM is made
    /// to exist first, so the initial synchronisation carries every page.
    fn start_with(ram: u64, what: &str, plaintext: Option<bool>) -> Result<Self> {
        Self::start_setup(ram, what, plaintext, &|_| {}, None)
    }

    /// [`Pair::start_with`]; `tweak` changes both nodes' options, and with `via` the primary
    /// connects to the address it returns for the secondary's (a proxy in between).
    fn start_setup(
        ram: u64,
        what: &str,
        plaintext: Option<bool>,
        tweak: &dyn Fn(&mut NodeOptions),
        via: Option<&Via<'_>>,
    ) -> Result<Self> {
        let silence = (ram > 256 * MIB).then_some(Duration::from_secs(60));
        let mut opts = NodeOptions {
            key: plaintext.map(|_| BENCH_KEY.to_vec()),
            insecure_plaintext: plaintext.unwrap_or(false),
            ..bench_opts(silence)
        };
        tweak(&mut opts);
        let t = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut sguest = build(&dirty_spec(ram, 0, 2))?;
        let mut guest = build(&dirty_spec(ram, 0, 1))?;
        if plaintext.is_some() {
            prefault(&mut sguest)?;
            prefault(&mut guest)?;
        }
        let sstatus = new_status();
        let secondary = spawn_secondary(
            sguest,
            opts.clone(),
            sstatus.clone(),
            move |node| -> Result<Option<Instant>> {
                let _ = tx.send(node.stop_flag());
                match node.run()? {
                    SecondaryOutcome::Stopped => Ok(None),
                    SecondaryOutcome::TookOver(mut p) => {
                        // Serving: the new primary has completed one loop iteration.
                        p.step(Duration::ZERO)?;
                        Ok(Some(Instant::now()))
                    }
                }
            },
        )?;
        let addr = match via {
            Some(f) => f(&secondary.addr)?,
            None => secondary.addr.clone(),
        };
        let secondary = secondary.handle;
        guest.resume()?;
        let status = new_status();
        let connected = Instant::now();
        let primary = PrimaryNode::connect(guest, &addr, opts, status.clone())?;
        let sec_stop = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| anyhow!("the secondary did not accept the connection"))?;
        let mut pair = Pair {
            pages: ram / PAGE_SIZE as u64,
            primary: Some(primary),
            status,
            sstatus,
            secondary: Some(secondary),
            sec_stop,
            value: 1,
            synced_in: Duration::ZERO,
        };
        if let Err(e) = pair.sync(what) {
            // Say why the secondary left, if it did.
            pair.sec_stop.store(true, Ordering::Relaxed);
            pair.primary = None;
            if let Some(h) = pair.secondary.take() {
                match h.join() {
                    Ok(Err(se)) => return Err(e.context(format!("secondary: {se:#}"))),
                    Err(_) => return Err(e.context("the secondary thread panicked")),
                    Ok(Ok(_)) => {}
                }
            }
            return Err(e);
        }
        pair.synced_in = connected.elapsed();
        println!(
            "{what}: {} MiB pair synchronised in {:.2} s",
            ram >> 20,
            t.elapsed().as_secs_f64()
        );
        Ok(pair)
    }

    /// Makes every page of the primary's RAM exist (as in a real guest) and checkpoints it;
    /// returns that checkpoint's pause, ms. Done after the initial synchronisation: the mock's
    /// hole probe makes pre-copy reads of a populated file slow (see the report), while one
    /// checkpoint of every page reads it in a single call.
    fn populate(&mut self) -> Result<f64> {
        let pages = self.pages;
        let t = Instant::now();
        // Zeros into zero pages: every page (NIC pages included) comes to exist, and no content
        // changes.
        dirty_pfns(self.node()?.guest(), (0..pages).collect(), 0)?;
        let written = t.elapsed().as_secs_f64();
        let f = self
            .checkpoint()
            .context("the checkpoint that populates RAM")?;
        println!(
            "populated the primary's RAM: written in {written:.2} s; its checkpoint: pause \
             {:.0} ms, NEW → SVM_READY {:.0} ms",
            f.pause_ms, f.total_ms
        );
        Ok(f.pause_ms)
    }

    /// Drives the primary until the initial synchronisation has committed.
    fn sync(&mut self, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let p = self.node()?;
            p.step(Duration::from_micros(200))?;
            let synced = p.engine().state() == PrimaryState::Running;
            if synced && self.status.lock().last.is_some() {
                return Ok(());
            }
            if self.node()?.engine().state() == PrimaryState::Unprotected {
                let why = self.status.lock().failover_reason.clone();
                bail!(
                    "{what}: the pair broke during initial synchronisation: {}",
                    why.unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("{what}: initial synchronisation took over 120 s");
            }
        }
    }

    fn node(&mut self) -> Result<&mut PrimaryNode<MockDomain>> {
        self.primary
            .as_mut()
            .ok_or_else(|| anyhow!("the primary is gone"))
    }

    /// Dirties exactly `n` distinct pages of the primary.
    fn dirty(&mut self, n: u64, seed: u64) -> Result<()> {
        let pfns = scattered_pfns(self.pages, n, seed)?;
        self.value += 1;
        let v = self.value;
        dirty_pfns(self.node()?.guest(), pfns, v)
    }

    /// Requests one checkpoint and drives the primary until it commits.
    fn checkpoint(&mut self) -> Result<CheckpointFigures> {
        let status = self.status.clone();
        let before = status.lock().checkpoints;
        let node = self.node()?;
        node.request_checkpoint();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            node.step(Duration::from_micros(100))?;
            {
                let st = status.lock();
                if st.checkpoints > before {
                    return st
                        .last
                        .clone()
                        .ok_or_else(|| anyhow!("a checkpoint committed without figures"));
                }
            }
            if node.engine().state() == PrimaryState::Unprotected {
                let why = status.lock().failover_reason.clone();
                bail!(
                    "the secondary was lost during a checkpoint: {}",
                    why.unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("a checkpoint took over 60 s");
            }
        }
    }

    /// Back-to-back checkpoints for `secs`, each after dirtying `n` pages. Returns (rate, the
    /// largest |D| seen, pause p50).
    fn max_rate(&mut self, secs: f64, n: u64) -> Result<(f64, u64, f64)> {
        let t = Instant::now();
        let mut count = 0u64;
        let mut max_d = 0;
        let mut pauses = Vec::new();
        let mut seed = 42;
        while t.elapsed().as_secs_f64() < secs {
            seed = splitmix(seed);
            self.dirty(n, seed)?;
            let f = self.checkpoint()?;
            max_d = max_d.max(f.pages_sent);
            pauses.push(f.pause_ms);
            count += 1;
        }
        Ok((
            count as f64 / t.elapsed().as_secs_f64(),
            max_d,
            percentile(pauses, 50.0).unwrap_or(0.0),
        ))
    }

    /// The primary's workload flat out for `secs` with a checkpoint every `period`: guest
    /// steps/s and checkpoint figures.
    fn replicated_steps(&mut self, secs: f64, period: Duration, rate: u64) -> Result<Slowdown> {
        let node = self.node()?;
        node.guest().set_dirty_rate(rate);
        // One checkpoint first, so that no earlier dirt is carried into the measured ones.
        self.checkpoint()?;
        let node = self.node()?;
        let steps0 = node.guest().steps();
        let t = Instant::now();
        let mut pauses = Vec::new();
        let mut pages = 0u64;
        let mut last = Instant::now();
        while t.elapsed().as_secs_f64() < secs {
            while last.elapsed() < period {
                self.node()?.step(Duration::from_micros(500))?;
            }
            last = Instant::now();
            let f = self.checkpoint()?;
            pauses.push(f.pause_ms);
            pages += f.pages_sent;
        }
        let node = self.node()?;
        let steps = node.guest().steps() - steps0;
        let secs = t.elapsed().as_secs_f64();
        node.guest().set_dirty_rate(0);
        self.checkpoint()?;
        let n = pauses.len() as u64;
        Ok(Slowdown {
            alone_sps: 0.0,
            replicated_sps: steps as f64 / secs,
            checkpoints: n,
            pages_per_cp: pages as f64 / n.max(1) as f64,
            pause_p50: percentile(pauses, 50.0).unwrap_or(0.0),
        })
    }

    /// Stops the secondary and drops both nodes.
    fn stop(&mut self) {
        self.sec_stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.secondary.take() {
            let _ = h.join();
        }
        self.primary = None;
    }

    /// Kills the primary (its socket closes) and returns the time until the secondary, having
    /// taken over, has served one loop iteration as the new primary.
    fn kill_primary(&mut self) -> Result<f64> {
        let p = self
            .primary
            .take()
            .ok_or_else(|| anyhow!("the primary is gone"))?;
        let t0 = Instant::now();
        drop(p);
        let h = self
            .secondary
            .take()
            .ok_or_else(|| anyhow!("the secondary is gone"))?;
        let served = h
            .join()
            .map_err(|_| anyhow!("the secondary thread panicked"))??
            .ok_or_else(|| anyhow!("the secondary stopped instead of taking over"))?;
        Ok(served.saturating_duration_since(t0).as_secs_f64() * 1e3)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The dirty workload flat out with no tracking and no replication: steps/s.
fn alone_steps(ram: u64, secs: f64, rate: u64) -> Result<f64> {
    let mut dom = build(&dirty_spec(ram, 0, 1))?;
    prefault(&mut dom)?;
    dom.resume()?;
    dom.set_dirty_rate(rate);
    let s0 = dom.steps();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let steps = dom.steps() - s0;
    let e = t.elapsed().as_secs_f64();
    dom.pause()?;
    Ok(steps as f64 / e)
}

fn harvest_sweep(quick: bool) -> Result<Vec<HarvestRow>> {
    let sizes = [256 * MIB, GIB, 4 * GIB];
    let all = [0.0, 0.001, 0.01, 0.1];
    let reps = if quick { 3 } else { 10 };
    let mut rows = Vec::new();
    for &ram in &sizes {
        let fractions: &[f64] = if quick && ram != GIB { &[0.01] } else { &all };
        let pages = ram / PAGE_SIZE as u64;
        let cfg = MockConfig::new(
            pages,
            Workload::Dirty(DirtyConfig {
                pages_per_ms: 0,
                vcpus: 1,
            }),
            3,
        );
        let mut dom = MockDomain::create(cfg).context("creating the harvest guest")?;
        dom.start_dirty_log()?;
        dom.resume()?;
        let mut bm = DirtyBitmap::new(pages);
        for &fraction in fractions {
            let n = (pages as f64 * fraction) as u64;
            let mut times = Vec::new();
            for r in 0..reps {
                dirty_pfns(&dom, scattered_pfns(pages, n, r as u64 + 11)?, r as u64 + 1)?;
                dom.pause()?;
                bm.clear_all();
                let t = Instant::now();
                dom.harvest_dirty(&mut bm)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                if bm.count() < n {
                    bail!("harvest found {} dirty pages, {n} were written", bm.count());
                }
                dom.resume()?;
            }
            let row = HarvestRow {
                ram,
                fraction,
                pages: n,
                p50_ms: percentile(times, 50.0).unwrap_or(0.0),
            };
            println!(
                "  harvest {:>5} MiB, {:>5.1} % dirty: {:.3} ms ({})",
                ram >> 20,
                fraction * 100.0,
                row.p50_ms,
                dom.tracker_kind()
            );
            rows.push(row);
        }
        dom.pause()?;
    }
    Ok(rows)
}

/// Matching UDP frames through the comparator (both sides, release): frame pairs per second.
fn kv_spec(seed: u64) -> MockSpec {
    MockSpec {
        ram: 16 * MIB,
        ram_file: None,
        workload: WorkloadKind::Kv,
        vm_seed: seed,
        memory_divergence: true,
        output_divergence: 0.0,
        dirty_rate: 0,
    }
}

/// Times `ops` sequential kv requests from a client to `addr` (the client address of `node`),
/// ms each, stepping `node` meanwhile.
fn client_latencies<G: colo_core::Guest>(
    node: &mut PrimaryNode<G>,
    addr: String,
    ops: usize,
) -> Result<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    let client = std::thread::spawn(move || -> Result<Vec<f64>> {
        let mut c = colo_cli::kvclient::KvClient::new(vec![addr], 42000, Duration::from_secs(5));
        let mut rng = 11u64;
        let mut out = Vec::with_capacity(ops);
        let res = (0..ops).try_for_each(|_| {
            let t = Instant::now();
            c.random_op(&mut rng, 256, Instant::now() + Duration::from_secs(30))?;
            out.push(t.elapsed().as_secs_f64() * 1e3);
            Ok::<_, anyhow::Error>(())
        });
        done.store(true, Ordering::Relaxed);
        res.map(|()| out)
    });
    while !stop.load(Ordering::Relaxed) {
        node.step(Duration::from_micros(200))?;
    }
    client.join().map_err(|_| anyhow!("client panicked"))?
}

/// Response latency through a replicated pair (the comparator releases a response once the
/// secondary produced its twin) and through the same primary node without a secondary.
fn response_latency(ops: usize) -> Result<Latency> {
    let free =
        || -> Result<String> { Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string()) };
    // Alone: an unprotected primary.
    let caddr = free()?;
    let mut g = build(&kv_spec(1))?;
    g.resume()?;
    let opts = NodeOptions {
        client_addr: Some(caddr.clone()),
        ..NodeOptions::default()
    };
    let mut alone = PrimaryNode::with_link(g, None, opts, new_status())?;
    let alone_ms = client_latencies(&mut alone, caddr, ops)?;
    drop(alone);

    // Replicated.
    let sg = build(&kv_spec(2))?;
    let secondary = spawn_secondary(sg, NodeOptions::default(), new_status(), |node| {
        node.run().map(|_| ())
    })?;
    let repl = secondary.addr.clone();
    let caddr = free()?;
    let mut g = build(&kv_spec(1))?;
    g.resume()?;
    let opts = NodeOptions {
        client_addr: Some(caddr.clone()),
        ..NodeOptions::default()
    };
    let status = new_status();
    let mut primary = PrimaryNode::connect(g, &repl, opts, status.clone())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !status.lock().protected {
        if Instant::now() > deadline {
            bail!("latency pair did not reach protection");
        }
        primary.step(Duration::from_micros(200))?;
    }
    let rep_ms = client_latencies(&mut primary, caddr, ops)?;
    primary.stop_flag().store(true, Ordering::Relaxed);
    primary.run()?;
    drop(primary);
    secondary.join()?;
    let p = |v: &Vec<f64>, q| percentile(v.clone(), q).unwrap_or(f64::NAN);
    Ok(Latency {
        replicated_p50: p(&rep_ms, 50.0),
        replicated_p99: p(&rep_ms, 99.0),
        alone_p50: p(&alone_ms, 50.0),
        alone_p99: p(&alone_ms, 99.0),
    })
}

fn comparator_fps(n: usize) -> Result<f64> {
    let mut frames = Vec::with_capacity(256);
    for i in 0..256u32 {
        let mut payload = vec![0u8; 100];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        let mut f = Vec::new();
        colo_mock::frame::build_udp(
            (
                &colo_mock::frame::GUEST_MAC,
                &colo_mock::frame::GUEST_IP,
                7000,
            ),
            (&[2, 0, 0, 0, 0, 9], &[10, 0, 0, 9], 40000 + (i % 8) as u16),
            &payload,
            &mut f,
        )?;
        frames.push(f);
    }
    let mut c = Comparator::new(CompareConfig::default());
    let mut out = Vec::new();
    let mut released = 0usize;
    let t = Instant::now();
    let mut now = Instant::now();
    for i in 0..n {
        if i % 64 == 0 {
            now = Instant::now();
            released += out.len();
            out.clear();
            c.drain_released(&mut out);
        }
        let f = &frames[i % frames.len()];
        c.push_primary(now, f.clone());
        c.push_secondary(now, c.epoch(), f.clone());
    }
    released += out.len();
    out.clear();
    c.drain_released(&mut out);
    released += out.len();
    let secs = t.elapsed().as_secs_f64();
    if released != n {
        bail!("comparator released {released} of {n} matching frames");
    }
    if c.stats().mismatches != 0 {
        bail!("comparator saw mismatches on identical frames");
    }
    Ok(n as f64 / secs)
}

fn failover_once(ram: u64) -> Result<f64> {
    let mut pair = Pair::start(ram, "failover")?;
    pair.checkpoint()?;
    pair.kill_primary()
}

fn ms(v: f64) -> String {
    format!("{v:.3}")
}

fn print_sweep(title: &str, sw: &Sweep) {
    println!("\npause time against dirty pages per checkpoint (primary pause → resume), {title}");
    println!(
        "raw loopback TCP measured right before: {:.2} GB/s",
        sw.tcp_gbps
    );
    println!(
        "{:>8} {:>5} {:>9} {:>10} {:>10} {:>10} {:>12} {:>11} {:>8}",
        "dirty", "reps", "|D|", "MiB", "p50 ms", "p99 ms", "raw TCP ms", "target ms", "met"
    );
    for row in &sw.rows {
        let (target, met) = match row.target_ms {
            Some(t) => (ms(t), if row.p50 <= t { "yes" } else { "NO" }),
            None => ("-".into(), "-"),
        };
        println!(
            "{:>8} {:>5} {:>9.0} {:>10.2} {:>10} {:>10} {:>12} {:>11} {:>8}",
            row.dirty,
            row.reps,
            row.pages_sent_mean,
            row.bytes_mean / MIB as f64,
            ms(row.p50),
            ms(row.p99),
            ms(row.tcp_ms),
            target,
            met
        );
    }
    println!("  phases, p50 ms (pause = harvest + capture + pause/resume)");
    println!(
        "{:>8} {:>10} {:>10} {:>12} {:>10} {:>10} {:>12}",
        "dirty", "harvest", "capture", "back chan.", "send", "commit", "NEW→READY"
    );
    for row in &sw.rows {
        let [h, c, b, s, m] = row.phases;
        println!(
            "{:>8} {:>10} {:>10} {:>12} {:>10} {:>10} {:>12}",
            row.dirty,
            ms(h),
            ms(c),
            ms(b),
            ms(s),
            ms(m),
            ms(row.total_p50)
        );
    }
    println!(
        "checkpoint page throughput (≥10k pages, NEW → SVM_READY) {:>8.2} GB/s = {:.2} × raw TCP",
        sw.throughput_gbps, sw.throughput_ratio
    );
    println!(
        "send phase alone (largest checkpoints)                {:>10.2} × raw TCP",
        sw.send_ratio
    );
    println!(
        "max sustained checkpoint rate (50 dirty pages each)   {:>10.0} /s  (|D| ≤ {}, pause p50 {} ms; target ≥ 100: {})",
        sw.max_cps,
        sw.max_cps_pages_max,
        ms(sw.max_cps_pause_p50),
        if sw.max_cps >= 100.0 { "met" } else { "NOT met" }
    );
}

fn print_table(r: &Report) {
    let line = "-".repeat(96);
    println!("\n{line}");
    println!(
        "colo bench{} — mock backend, loopback TCP, 1 GiB dirty guests",
        if r.quick { " --quick" } else { "" }
    );
    println!("{line}");
    println!(
        "raw loopback TCP throughput (baseline, this run)      {:>10.2} GB/s",
        r.tcp_gbps
    );
    print_sweep(
        "populated RAM (every page exists, as in a real guest)",
        &r.populated,
    );
    print_sweep(
        "sparse RAM (only written pages exist; the mock's hole probe is cheap)",
        &r.sparse,
    );
    println!();
    for (what, s) in [("flat out", &r.slowdown), ("100 pages/ms", &r.paced)] {
        println!(
            "guest speed, dirty {what:<12} (checkpoint every 50 ms) {:>7.3} × alone ({:.0} vs {:.0} steps/s; {} checkpoints, {:.0} pages each, pause p50 {} ms)",
            s.replicated_sps / s.alone_sps.max(1.0),
            s.replicated_sps,
            s.alone_sps,
            s.checkpoints,
            s.pages_per_cp,
            ms(s.pause_p50)
        );
    }
    println!("\ndirty harvest time (paused guest, p50)");
    println!(
        "{:>10} {:>9} {:>10} {:>10}",
        "RAM MiB", "dirty %", "pages", "ms"
    );
    for h in &r.harvest {
        println!(
            "{:>10} {:>9.1} {:>10} {:>10}",
            h.ram >> 20,
            h.fraction * 100.0,
            h.pages,
            ms(h.p50_ms)
        );
    }
    println!(
        "\ncomparator (matching UDP frame pairs)                 {:>10.2} M/s",
        r.cmp_fps / 1e6
    );
    println!(
        "failover (primary killed → secondary serving), p50    {:>10} ms  (runs {:?})",
        ms(percentile(r.failover_ms.clone(), 50.0).unwrap_or(0.0)),
        r.failover_ms
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
    );
    print_link(&r.link);
    r.floor.print();
    print_idle(r.idle);
    r.shaped.print();
    println!("{line}");
    println!("bench finished in {:.1} s", r.total_s);
}

fn harvest_1g_1pct(r: &Report) -> Option<f64> {
    r.harvest
        .iter()
        .find(|h| h.ram == GIB && (h.fraction - 0.01).abs() < 1e-9)
        .map(|h| h.p50_ms)
}

fn sweep_json(sw: &Sweep) -> Value {
    let row = |n: u64| sw.rows.iter().find(|p| p.dirty == n);
    let idle = row(0);
    let tenk = row(10_000);
    json!({
        "throughput_ratio_vs_tcp": sw.throughput_ratio,
        "sweep_tcp_gbps": sw.tcp_gbps,
        "checkpoint_throughput_gbps": sw.throughput_gbps,
        "send_throughput_ratio_vs_tcp": sw.send_ratio,
        "idle_pause_ms_p50": idle.map(|p| p.p50),
        "idle_pause_ms_p99": idle.map(|p| p.p99),
        "pause_ms_p50_10k": tenk.map(|p| p.p50),
        "pause_ms_p99_10k": tenk.map(|p| p.p99),
        "pause_target_ms_10k": tenk.and_then(|p| p.target_ms),
        "max_checkpoints_per_s": sw.max_cps,
        "max_checkpoints_pages_max": sw.max_cps_pages_max,
        "pause": sw.rows.iter().map(|p| json!({
            "dirty_pages": p.dirty,
            "reps": p.reps,
            "pages_sent_mean": p.pages_sent_mean,
            "bytes_mean": p.bytes_mean,
            "pause_ms_p50": p.p50,
            "pause_ms_p99": p.p99,
            "checkpoint_ms_p50": p.total_p50,
            "harvest_ms_p50": p.phases[0],
            "capture_ms_p50": p.phases[1],
            "backchannel_ms_p50": p.phases[2],
            "send_ms_p50": p.phases[3],
            "commit_ms_p50": p.phases[4],
            "raw_tcp_ms": p.tcp_ms,
            "target_ms": p.target_ms,
        })).collect::<Vec<_>>(),
        "targets": {
            "pause_10k": tenk.and_then(|p| p.target_ms.map(|t| p.p50 <= t)),
            "idle_pause_1ms": idle.map(|p| p.p50 <= 1.0),
            "checkpoints_100_per_s": sw.max_cps >= 100.0,
        },
    })
}

/// The JSON object: the headline keys come from the populated-RAM pair; `sparse` repeats the
/// pause figures for sparse RAM.
fn to_json(r: &Report) -> Value {
    let mut j = json!({
        "quick": r.quick,
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "kernel": kernel(),
        },
        "tcp_gbps": r.tcp_gbps,
        "link": link_json(&r.link),
        "harvest_ms_1gib_1pct": harvest_1g_1pct(r),
        "failover_ms_p50": percentile(r.failover_ms.clone(), 50.0),
        "failover_ms_runs": r.failover_ms,
        "guest_slowdown_ratio": r.slowdown.replicated_sps / r.slowdown.alone_sps.max(1.0),
        "guest_steps_per_s_alone": r.slowdown.alone_sps,
        "guest_steps_per_s_replicated": r.slowdown.replicated_sps,
        "guest_slowdown_checkpoints": r.slowdown.checkpoints,
        "guest_slowdown_pages_per_checkpoint": r.slowdown.pages_per_cp,
        "guest_slowdown_pause_ms_p50": r.slowdown.pause_p50,
        "guest_slowdown_ratio_paced": r.paced.replicated_sps / r.paced.alone_sps.max(1.0),
        "guest_paced_pages_per_ms": PACED_RATE,
        "guest_paced_checkpoints": r.paced.checkpoints,
        "guest_paced_pages_per_checkpoint": r.paced.pages_per_cp,
        "guest_paced_pause_ms_p50": r.paced.pause_p50,
        "comparator_frames_per_s": r.cmp_fps,
        "response_latency_ms_p50": r.latency.replicated_p50,
        "response_latency_ms_p99": r.latency.replicated_p99,
        "response_latency_alone_ms_p50": r.latency.alone_p50,
        "response_latency_alone_ms_p99": r.latency.alone_p99,
        "response_latency_added_ms_p50": r.latency.replicated_p50 - r.latency.alone_p50,
        "harvest": r.harvest.iter().map(|h| json!({
            "ram_mib": h.ram >> 20,
            "dirty_fraction": h.fraction,
            "pages": h.pages,
            "ms_p50": h.p50_ms,
        })).collect::<Vec<_>>(),
        "sparse": sweep_json(&r.sparse),
        "total_s": r.total_s,
    });
    extend(&mut j, sweep_json(&r.populated));
    extend(&mut j, floor_json(&r.floor));
    extend(&mut j, idle_json(r.idle));
    extend(&mut j, r.shaped.json());
    j
}

/// The smallest 5 × (1, 2 or 5) × 10^k (k ≥ 0) that is at least `v`: five round axis ticks.
fn nice_ceil(v: f64) -> f64 {
    let mut step = 1.0;
    loop {
        for m in [1.0, 2.0, 5.0] {
            if m * step * 5.0 >= v {
                return m * step * 5.0;
            }
        }
        step *= 10.0;
    }
}

/// Pause p50 against dirty pages, with the raw-TCP time for the same bytes and the 10k target
/// line (1.25 × raw TCP + 2 ms). Hand-written SVG.
fn plot_svg(r: &Report) -> String {
    let (w, h) = (720.0, 440.0);
    let (l, rt, t, b) = (70.0, 20.0, 40.0, 60.0);
    let all = || r.populated.rows.iter().chain(r.sparse.rows.iter());
    let xmax = nice_ceil(all().map(|p| p.dirty as f64).fold(1.0, f64::max));
    let ymax = nice_ceil(
        all()
            .flat_map(|p| [p.p50, p.tcp_ms * 1.25 + 2.0])
            .fold(1.0, f64::max)
            * 1.05,
    );
    let x = |v: f64| l + v / xmax * (w - l - rt);
    let y = |v: f64| h - b - v / ymax * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">colo checkpoint pause vs \
         dirty pages (1 GiB guests, loopback; raw TCP {:.2} GB/s)</text>\n",
        w / 2.0,
        r.populated.tcp_gbps
    );
    // Axes and grid.
    for i in 0..=5 {
        let v = xmax * i as f64 / 5.0;
        s += &format!(
            "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#ddd\"/>\
             <text x=\"{0:.1}\" y=\"{3}\" text-anchor=\"middle\">{4:.0}</text>\n",
            x(v),
            t,
            h - b,
            h - b + 16.0,
            v
        );
        let u = ymax * i as f64 / 5.0;
        s += &format!(
            "<line x1=\"{1}\" y1=\"{0:.1}\" x2=\"{2}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{3}\" y=\"{4:.1}\" text-anchor=\"end\">{5}</text>\n",
            y(u),
            l,
            w - rt,
            l - 6.0,
            y(u) + 4.0,
            u
        );
    }
    s += &format!(
        "<line x1=\"{l}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\
         <line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{0}\" stroke=\"black\"/>\n\
         <text x=\"{2}\" y=\"{3}\" text-anchor=\"middle\">dirty pages per checkpoint (|D| = that + 1)</text>\n\
         <text x=\"16\" y=\"{4}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {4})\">ms</text>\n",
        h - b,
        w - rt,
        (l + w - rt) / 2.0,
        h - 18.0,
        (t + h - b) / 2.0
    );
    let series = |pts: Vec<(f64, f64)>, color: &str, dash: &str| -> String {
        let p: Vec<String> = pts
            .iter()
            .map(|(a, c)| format!("{:.1},{:.1}", x(*a), y(*c)))
            .collect();
        let mut out = format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" {dash} points=\"{}\"/>\n",
            p.join(" ")
        );
        for (a, c) in &pts {
            out += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n",
                x(*a),
                y(*c)
            );
        }
        out
    };
    let rows = &r.populated.rows;
    s += &series(
        rows.iter().map(|p| (p.dirty as f64, p.tcp_ms)).collect(),
        "#888",
        "stroke-dasharray=\"6 4\"",
    );
    s += &series(
        rows.iter()
            .map(|p| (p.dirty as f64, 1.25 * p.tcp_ms + 2.0))
            .collect(),
        "#d62728",
        "stroke-dasharray=\"2 3\"",
    );
    s += &series(
        rows.iter().map(|p| (p.dirty as f64, p.p50)).collect(),
        "#1f77b4",
        "",
    );
    s += &series(
        r.sparse
            .rows
            .iter()
            .map(|p| (p.dirty as f64, p.p50))
            .collect(),
        "#2ca02c",
        "",
    );
    let legend = [
        ("#1f77b4", "pause p50, populated RAM"),
        ("#2ca02c", "pause p50, sparse RAM"),
        ("#888", "raw TCP time for the same bytes"),
        ("#d62728", "target: 1.25 × raw TCP + 2 ms"),
    ];
    for (i, (c, label)) in legend.iter().enumerate() {
        let ly = t + 14.0 + i as f64 * 18.0;
        s += &format!(
            "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{c}\" stroke-width=\"3\"/>\
             <text x=\"{3}\" y=\"{4}\">{label}</text>\n",
            l + 14.0,
            ly,
            l + 40.0,
            l + 46.0,
            ly + 4.0
        );
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scattered_pfns_are_distinct_data_pages() {
        for (pages, n) in [(4096u64, 4000u64), (262_144, 50_000), (1000, 0)] {
            for seed in [0, 1, 77, u64::MAX] {
                let mut v = scattered_pfns(pages, n, seed).unwrap();
                assert_eq!(v.len() as u64, n);
                assert!(v.iter().all(|&p| (DATA_PFN..pages).contains(&p)));
                v.sort_unstable();
                v.dedup();
                assert_eq!(v.len() as u64, n, "duplicates for seed {seed}");
            }
        }
        assert!(scattered_pfns(100, 100, 0).is_err());
    }

    #[test]
    fn nice_ceil_rounds_up_to_five_round_ticks() {
        assert_eq!(nice_ceil(50_000.0), 50_000.0);
        assert_eq!(nice_ceil(50_001.0), 100_000.0);
        assert_eq!(nice_ceil(137.6), 250.0);
        assert_eq!(nice_ceil(0.5), 5.0);
    }

    #[test]
    fn raw_tcp_moves_every_byte() {
        assert!(raw_tcp_gbps(8 * MIB).unwrap() > 0.0);
    }

    #[test]
    fn comparator_releases_every_matching_frame() {
        assert!(comparator_fps(5_000).unwrap() > 0.0);
    }
}

//! `cargo xtask bench`'s disk figures (`--only disk` runs just these), in both disk mirror
//! modes (`--disk-mirror checkpoint|continuous`) on pairs of 64 MiB `dirty` guests with 64 MiB
//! disk images (files under `target/colo-bench/`), beside what the same run measures of the
//! image alone and of raw loopback TCP:
//!
//! - the pause a checkpoint adds after N written 4 KiB blocks (0, 100, 10,000): written while
//!   the PVM runs, three mirror intervals plus twice the raw TCP time of the blocks before the
//!   checkpoint ("kept up": continuous mirroring has had the time to send them), and, continuous only, written right after NEW (the
//!   worst case: every block is in the unsent tail), each beside the raw TCP time of the tail
//!   the pause copied and of all N blocks, and the image's raw write (pwrite + fdatasync) and
//!   read-back times;
//! - the guest's disk write throughput, the `dirty` workload writing blocks flat out for a few
//!   seconds, alone (no replication) and replicated in each mode with a checkpoint every 20 ms,
//!   with the blocks each mode sent.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use colo_cli::mock::{build_with_disk, DiskSpec};
use colo_cli::node::{new_status, NodeOptions, PrimaryNode, SecondaryOutcome};
use colo_cli::status::{percentile, CheckpointFigures, Shared};
use colo_cli::testing::spawn_secondary;
use colo_core::disk::{DiskMirror, BLOCK_SIZE};
use colo_core::policy::CheckpointPolicy;
use colo_core::Domain;
use colo_mock::{DirtyConfig, MockDomain};
use serde_json::{json, Value};

use super::{bench_opts, dirty_spec, MIB};

/// Size of each guest's RAM and disk.
const SIZE: u64 = 64 * MIB;
/// Blocks of the disk.
const BLOCKS: u64 = SIZE / BLOCK_SIZE as u64;
/// The primary's mirror interval in these runs (the default).
const MIRROR_INTERVAL: Duration = colo_cli::node::DEFAULT_DISK_MIRROR_INTERVAL;
const MODES: [DiskMirror; 2] = [DiskMirror::Checkpoint, DiskMirror::Continuous];

/// `n` distinct blocks spread over the disk (an odd stride is coprime to a power of two).
fn scattered(n: u64, round: u64) -> Vec<u64> {
    (0..n).map(|i| (round * 4099 + i * 7919) % BLOCKS).collect()
}

/// The image alone: ms to pwrite `n` scattered blocks into a fresh file and fdatasync it, and
/// ms to pread them back.
fn raw_image(path: &Path, n: u64) -> Result<(f64, f64)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.set_len(SIZE)?;
    let block = vec![0xA5u8; BLOCK_SIZE];
    let blocks = scattered(n, 1);
    let t = Instant::now();
    for &b in &blocks {
        f.write_all_at(&block, b * BLOCK_SIZE as u64)?;
    }
    f.sync_data()?;
    let write_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut buf = vec![0u8; BLOCK_SIZE];
    let t = Instant::now();
    for &b in &blocks {
        f.read_exact_at(&mut buf, b * BLOCK_SIZE as u64)?;
    }
    let read_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(f);
    let _ = std::fs::remove_file(path);
    Ok((write_ms, read_ms))
}

/// A pair of disk guests in `mode`: the primary driven here, the secondary in a thread.
struct DiskPair {
    p: PrimaryNode<MockDomain>,
    status: Shared,
    secondary: JoinHandle<Result<bool>>,
    dir: PathBuf,
}

impl DiskPair {
    fn start(dir: &Path, mode: DiskMirror, policy: Option<CheckpointPolicy>) -> Result<Self> {
        let disk = |name: &str| DiskSpec {
            size: SIZE,
            file: Some(dir.join(name)),
            keep: false,
            rate: 0,
        };
        let sguest = build_with_disk(&dirty_spec(SIZE, 0, 2), &disk("bench-s.disk"))?;
        let mut pguest = build_with_disk(&dirty_spec(SIZE, 0, 1), &disk("bench-p.disk"))?;
        let mut opts: NodeOptions = bench_opts(None);
        opts.disk_mirror = mode;
        opts.disk_mirror_interval = MIRROR_INTERVAL;
        if let Some(policy) = policy {
            opts.policy = policy;
        }
        let secondary = spawn_secondary(sguest, opts.clone(), new_status(), |node| {
            Ok(matches!(node.run()?, SecondaryOutcome::Stopped))
        })?;
        pguest.resume()?;
        let status = new_status();
        let mut p = PrimaryNode::connect(pguest, &secondary.addr, opts, status.clone())?;
        let give_up = Instant::now() + Duration::from_secs(120);
        while !status.lock().protected {
            p.step(Duration::from_micros(200))?;
            if Instant::now() > give_up {
                bail!("disk bench: no initial synchronisation in 120 s");
            }
        }
        Ok(Self {
            p,
            status,
            secondary: secondary.handle,
            dir: dir.to_path_buf(),
        })
    }

    /// Steps the primary for `d` (its mirror rounds run meanwhile).
    fn run_for(&mut self, d: Duration) -> Result<()> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.p.step(Duration::from_micros(100))?;
            self.check()?;
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        match self.status.lock().failover_reason.clone() {
            Some(why) => bail!("disk bench: the pair broke: {why}"),
            None => Ok(()),
        }
    }

    /// The guest writes `blocks` (from this thread, the PVM running).
    fn write(&mut self, blocks: &[u64]) -> Result<()> {
        let data = vec![0x5Au8; BLOCK_SIZE];
        let d = self
            .p
            .guest()
            .disk_image()
            .ok_or_else(|| anyhow!("the bench guest has no disk"))?;
        for &b in blocks {
            d.guest_write(b, &data)?;
        }
        Ok(())
    }

    /// Requests a checkpoint and steps the primary until it commits; with `after_new`, the
    /// guest writes those blocks once NEW is out (the PVM runs until B arrives). Its figures.
    fn checkpoint(&mut self, after_new: Option<&[u64]>) -> Result<CheckpointFigures> {
        let before = self.status.lock().checkpoints;
        self.p.request_checkpoint();
        let mut pending = after_new;
        let give_up = Instant::now() + Duration::from_secs(60);
        while self.status.lock().checkpoints == before {
            self.p.step(Duration::from_micros(100))?;
            if pending.is_some() && self.status.lock().state == "AwaitingBackChannel" {
                if let Some(blocks) = pending.take() {
                    self.write(blocks)?;
                }
            }
            self.check()?;
            if Instant::now() > give_up {
                bail!("disk bench: a checkpoint took over 60 s");
            }
        }
        if pending.is_some() {
            bail!("disk bench: the checkpoint never awaited B (no place to write after NEW)");
        }
        let last = self.status.lock().last.clone();
        last.ok_or_else(|| anyhow!("a checkpoint committed without figures"))
    }

    fn stop(mut self) -> Result<()> {
        self.p
            .stop_flag()
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.p.run()?;
        drop(self.p);
        let _ = self.secondary.join();
        for f in ["bench-p.disk", "bench-s.disk"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        Ok(())
    }
}

/// Pauses of `reps` checkpoints after `n` blocks written each: (p50, p99, most blocks in the
/// pause, most mirrored) in ms / blocks.
fn pauses(
    pair: &mut DiskPair,
    n: u64,
    reps: usize,
    tail: bool,
    round: &mut u64,
    tcp_gbps: f64,
) -> Result<(f64, f64, u64, u64)> {
    let link_time = Duration::from_secs_f64((n * BLOCK_SIZE as u64) as f64 / (tcp_gbps * 1e9));
    let mut ms = Vec::with_capacity(reps);
    let (mut copied, mut mirrored) = (0, 0);
    for _ in 0..reps {
        *round += 1;
        let blocks = scattered(n, *round);
        let f = if tail {
            pair.run_for(MIRROR_INTERVAL * 3)?;
            pair.checkpoint(Some(&blocks))?
        } else {
            pair.write(&blocks)?;
            // The PVM runs on: three mirror intervals, plus twice the raw TCP time of the
            // blocks (time for the link to carry them: written at that pace or slower, a
            // mirror keeps up).
            pair.run_for(MIRROR_INTERVAL * 3 + link_time.mul_f64(2.0))?;
            pair.checkpoint(None)?
        };
        ms.push(f.pause_ms);
        copied = copied.max(f.disk_blocks);
        mirrored = mirrored.max(f.disk_mirrored);
    }
    Ok((
        percentile(ms.clone(), 50.0).unwrap_or(0.0),
        percentile(ms, 99.0).unwrap_or(0.0),
        copied,
        mirrored,
    ))
}

/// The guest's disk writes per second over `secs`, written flat out by the `dirty` workload:
/// alone (`mode` None: no node at all) or replicated with a checkpoint every 20 ms. With
/// replication also the blocks sent per second and the pause p50.
fn throughput(dir: &Path, mode: Option<DiskMirror>, secs: f64) -> Result<Value> {
    let span = Duration::from_secs_f64(secs);
    let Some(mode) = mode else {
        let spec = DiskSpec {
            size: SIZE,
            file: Some(dir.join("bench-alone.disk")),
            keep: false,
            rate: 0,
        };
        let mut g = build_with_disk(&dirty_spec(SIZE, 0, 1), &spec)?;
        g.set_disk_rate(DirtyConfig::UNLIMITED);
        let before = disk_writes(&g)?;
        let t = Instant::now();
        g.resume()?;
        std::thread::sleep(span);
        g.pause()?;
        let per_s = (disk_writes(&g)? - before) as f64 / t.elapsed().as_secs_f64();
        drop(g);
        let _ = std::fs::remove_file(dir.join("bench-alone.disk"));
        println!(
            "  disk: guest writes flat out, alone: {:.0} blocks/s",
            per_s
        );
        return Ok(json!({ "mode": "alone", "writes_per_s": per_s }));
    };
    let policy = CheckpointPolicy {
        min_interval: Duration::from_millis(1),
        max_interval: Duration::from_millis(20),
    };
    let mut pair = DiskPair::start(dir, mode, Some(policy))?;
    let (w0, c0, s0) = {
        let st = pair.status.lock();
        (st.checkpoints, st.disk_blocks_sent, st.disk_blocks_mirrored)
    };
    let before = disk_writes(pair.p.guest())?;
    pair.p.guest().set_disk_rate(DirtyConfig::UNLIMITED);
    let t = Instant::now();
    let mut ms = Vec::new();
    let mut seen = w0;
    while t.elapsed() < span {
        pair.p.step(Duration::from_micros(100))?;
        pair.check()?;
        let st = pair.status.lock();
        if st.checkpoints != seen {
            seen = st.checkpoints;
            if let Some(f) = &st.last {
                ms.push(f.pause_ms);
            }
        }
    }
    pair.p.guest().set_disk_rate(0);
    let elapsed = t.elapsed().as_secs_f64();
    let per_s = (disk_writes(pair.p.guest())? - before) as f64 / elapsed;
    let (cps, sent, mirrored) = {
        let st = pair.status.lock();
        (
            st.checkpoints - w0,
            st.disk_blocks_sent - c0,
            st.disk_blocks_mirrored - s0,
        )
    };
    pair.stop()?;
    let p50 = percentile(ms, 50.0).unwrap_or(0.0);
    println!(
        "  disk: guest writes flat out, replicated ({mode}): {per_s:.0} blocks/s; {cps} \
         checkpoints, pause p50 {p50:.2} ms; blocks sent {:.0}/s ({:.0}/s mirrored)",
        sent as f64 / elapsed,
        mirrored as f64 / elapsed
    );
    Ok(json!({
        "mode": mode.name(),
        "writes_per_s": per_s,
        "checkpoints": cps,
        "pause_p50_ms": p50,
        "blocks_sent_per_s": sent as f64 / elapsed,
        "blocks_mirrored_per_s": mirrored as f64 / elapsed,
    }))
}

/// Blocks the guest has written so far.
fn disk_writes(g: &MockDomain) -> Result<u64> {
    g.disk_image()
        .map(|d| d.guest_io().0)
        .ok_or_else(|| anyhow!("the bench guest has no disk"))
}

/// The disk figures, as JSON (printed as they are measured).
pub(super) fn figures(quick: bool, tcp_gbps: f64) -> Result<Value> {
    let dir = crate::root().join("target").join("colo-bench");
    std::fs::create_dir_all(&dir)?;
    let tcp_ms = |blocks: u64| (blocks * BLOCK_SIZE as u64) as f64 / (tcp_gbps * 1e9) * 1e3;
    let reps: [(u64, usize); 3] = if quick {
        [(0, 30), (100, 30), (10_000, 6)]
    } else {
        [(0, 200), (100, 200), (10_000, 30)]
    };
    let mut rows = Vec::new();
    for mode in MODES {
        let mut pair = DiskPair::start(&dir, mode, None)?;
        let mut round = 0;
        let mut base = 0.0;
        let scenarios: &[bool] = match mode {
            DiskMirror::Checkpoint => &[false],
            DiskMirror::Continuous => &[false, true],
        };
        for &tail in scenarios {
            for (n, reps) in reps {
                if tail && n == 0 {
                    continue;
                }
                let (p50, p99, copied, mirrored) =
                    pauses(&mut pair, n, reps, tail, &mut round, tcp_gbps)?;
                if n == 0 {
                    base = p50;
                }
                let (raw_write_ms, raw_read_ms) = raw_image(&dir.join("bench-raw.disk"), n)?;
                let how = if tail { "after NEW" } else { "kept up" };
                println!(
                    "  disk ({mode}, {how}): {n:>6} blocks written: pause p50 {p50:.3} ms \
                     (+{:.3} ms over 0 blocks), p99 {p99:.3} ms; in the pause {copied} blocks \
                     (raw TCP {:.2} ms), mirrored {mirrored}; the image alone: write+fdatasync \
                     {raw_write_ms:.2} ms, read back {raw_read_ms:.2} ms; raw TCP of all {n}: \
                     {:.2} ms",
                    p50 - base,
                    tcp_ms(copied),
                    tcp_ms(n)
                );
                rows.push(json!({
                    "mode": mode.name(),
                    "written": if tail { "after_new" } else { "kept_up" },
                    "blocks": n,
                    "reps": reps,
                    "blocks_in_pause_max": copied,
                    "blocks_mirrored_max": mirrored,
                    "pause_p50_ms": p50,
                    "pause_p99_ms": p99,
                    "pause_added_p50_ms": p50 - base,
                    "tail_tcp_ms": tcp_ms(copied),
                    "image_write_fdatasync_ms": raw_write_ms,
                    "image_read_ms": raw_read_ms,
                    "tcp_ms": tcp_ms(n),
                }));
            }
        }
        pair.stop()?;
    }
    // Alternating runs (alone, checkpoint, continuous, ...), each figure the median of its
    // runs: a shared machine's load moves between runs.
    let (secs, runs) = if quick { (1.5, 1) } else { (3.0, 3) };
    let mut tput: Vec<Vec<Value>> = vec![Vec::new(); 3];
    for _ in 0..runs {
        tput[0].push(throughput(&dir, None, secs)?);
        for (i, mode) in MODES.into_iter().enumerate() {
            tput[i + 1].push(throughput(&dir, Some(mode), secs)?);
        }
    }
    let median = |runs: &[Value], key: &str| {
        percentile(runs.iter().filter_map(|r| r[key].as_f64()).collect(), 50.0).unwrap_or(0.0)
    };
    let alone = median(&tput[0], "writes_per_s");
    let mut summary = vec![json!({ "mode": "alone", "writes_per_s": alone })];
    for (i, mode) in MODES.into_iter().enumerate() {
        let r = &tput[i + 1];
        let w = median(r, "writes_per_s");
        println!(
            "  disk: guest writes flat out, median of {runs}: replicated ({mode}) {w:.0} blocks/s \
             = {:.2} × alone ({alone:.0}/s); pause p50 {:.2} ms; blocks sent {:.0}/s",
            w / alone.max(1.0),
            median(r, "pause_p50_ms"),
            median(r, "blocks_sent_per_s")
        );
        summary.push(json!({
            "mode": mode.name(),
            "writes_per_s": w,
            "ratio_to_alone": w / alone.max(1.0),
            "pause_p50_ms": median(r, "pause_p50_ms"),
            "blocks_sent_per_s": median(r, "blocks_sent_per_s"),
            "runs": r,
        }));
    }
    let tput = summary;
    Ok(json!({
        "disk_mib": SIZE / MIB,
        "mirror_interval_ms": MIRROR_INTERVAL.as_secs_f64() * 1e3,
        "rows": rows,
        "write_throughput": tput,
    }))
}

//! `cargo xtask bench`'s disk figures: the pause a checkpoint adds after N written 4 KiB blocks
//! (0, 100, 10,000) on a pair of 64 MiB `dirty` guests with 64 MiB disk images (files under
//! `target/colo-bench/`), beside what the same run measures of the image alone: the raw speed
//! of writing those blocks into it (pwrite + fdatasync) and of reading them back (the copy
//! within the pause), and the raw TCP time of their bytes.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use colo_cli::mock::{build_with_disk, DiskSpec};
use colo_cli::node::{new_status, PrimaryNode, SecondaryOutcome};
use colo_cli::status::{percentile, CheckpointFigures, Shared};
use colo_cli::testing::spawn_secondary;
use colo_core::disk::BLOCK_SIZE;
use colo_core::Domain;
use colo_mock::MockDomain;
use serde_json::{json, Value};

use super::{bench_opts, dirty_spec, MIB};

/// Size of each guest's RAM and disk.
const SIZE: u64 = 64 * MIB;
/// Blocks of the disk.
const BLOCKS: u64 = SIZE / BLOCK_SIZE as u64;

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

/// Requests a checkpoint and steps the primary until it commits; its figures.
fn one_checkpoint(p: &mut PrimaryNode<MockDomain>, status: &Shared) -> Result<CheckpointFigures> {
    let before = status.lock().checkpoints;
    p.request_checkpoint();
    let give_up = Instant::now() + Duration::from_secs(60);
    while status.lock().checkpoints == before {
        p.step(Duration::from_micros(100))?;
        if let Some(why) = status.lock().failover_reason.clone() {
            bail!("disk bench: the pair broke: {why}");
        }
        if Instant::now() > give_up {
            bail!("disk bench: a checkpoint took over 60 s");
        }
    }
    let last = status.lock().last.clone();
    last.ok_or_else(|| anyhow!("a checkpoint committed without figures"))
}

/// The disk figures, as JSON (printed as they are measured).
pub(super) fn figures(quick: bool, tcp_gbps: f64) -> Result<Value> {
    let dir = crate::root().join("target").join("colo-bench");
    std::fs::create_dir_all(&dir)?;
    let disk = |name: &str| DiskSpec {
        size: SIZE,
        file: Some(dir.join(name)),
        keep: false,
        rate: 0,
    };
    let sguest = build_with_disk(&dirty_spec(SIZE, 0, 2), &disk("bench-s.disk"))?;
    let mut pguest = build_with_disk(&dirty_spec(SIZE, 0, 1), &disk("bench-p.disk"))?;
    let opts = bench_opts(None);
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
    let reps: [(u64, usize); 3] = if quick {
        [(0, 30), (100, 30), (10_000, 6)]
    } else {
        [(0, 200), (100, 200), (10_000, 30)]
    };
    let data = vec![0x5Au8; BLOCK_SIZE];
    let mut rows = Vec::new();
    let mut base = 0.0;
    let mut round = 0;
    for (n, reps) in reps {
        let mut pauses = Vec::with_capacity(reps);
        let mut sent = 0;
        for _ in 0..reps {
            round += 1;
            let d = p
                .guest()
                .disk_image()
                .ok_or_else(|| anyhow!("the bench guest has no disk"))?;
            for b in scattered(n, round) {
                d.guest_write(b, &data)?;
            }
            let f = one_checkpoint(&mut p, &status)?;
            pauses.push(f.pause_ms);
            sent = sent.max(f.disk_blocks);
        }
        let p50 = percentile(pauses.clone(), 50.0).unwrap_or(0.0);
        let p99 = percentile(pauses, 99.0).unwrap_or(0.0);
        if n == 0 {
            base = p50;
        }
        let (raw_write_ms, raw_read_ms) = raw_image(&dir.join("bench-raw.disk"), n)?;
        let tcp_ms = (n * BLOCK_SIZE as u64) as f64 / (tcp_gbps * 1e9) * 1e3;
        println!(
            "  disk: {n:>6} blocks written: pause p50 {p50:.3} ms (+{:.3} ms over 0 blocks), p99 \
             {p99:.3} ms; the image alone: write+fdatasync {raw_write_ms:.2} ms, read back \
             {raw_read_ms:.2} ms; raw TCP {tcp_ms:.2} ms",
            p50 - base
        );
        rows.push(json!({
            "blocks": n,
            "reps": reps,
            "blocks_sent_max": sent,
            "pause_p50_ms": p50,
            "pause_p99_ms": p99,
            "pause_added_p50_ms": p50 - base,
            "image_write_fdatasync_ms": raw_write_ms,
            "image_read_ms": raw_read_ms,
            "tcp_ms": tcp_ms,
        }));
    }
    p.stop_flag()
        .store(true, std::sync::atomic::Ordering::Relaxed);
    p.run()?;
    drop(p);
    let _ = secondary.join();
    for f in ["bench-p.disk", "bench-s.disk"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    Ok(json!({ "disk_mib": SIZE / MIB, "rows": rows }))
}

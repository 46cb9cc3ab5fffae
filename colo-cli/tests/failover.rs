//! Failover fault injection over real loopback sockets: a primary and a secondary node (kv mock
//! guests) on threads, a fault proxy on the replication link and one in front of the primary's
//! clients, and a verifying kv client. The primary (or the secondary) is killed at seeded moments
//! spread over every protocol phase — at a chosen backend call (pause, harvest, capture reads,
//! state capture, resume, input injection, output drain, apply writes) or by cutting the
//! replication stream at a byte offset in either direction — and each time the survivor must
//! serve on: the secondary takes over from a complete checkpoint only (every checkpoint it
//! applied equals the primary's capture of that epoch, byte for byte), the primary goes on
//! unprotected, and every write the client saw acknowledged reads back afterwards. The proxy
//! also stalls (heartbeat timeout), delays (no failover) and drops the link. Failover times are
//! printed as distributions (no timed assertions).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use colo_cli::faultproxy::Direction;
use common::{
    distribution, histogram, scaled, ClientThread, Op, Pair, PairConfig, Rng, SecondaryEnd, Victim,
    When,
};

/// How a node dies.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// At the `n`th call of a backend operation.
    Trip(Op, When, u64),
    /// When the replication stream has carried `n` more bytes in a direction.
    Cut(Direction, u64),
}

#[derive(Debug)]
struct Trial {
    phase: String,
    /// Failure → the survivor's loop runs as primary (secondary: run() returned TookOver;
    /// primary: its state became Unprotected).
    detect_ms: f64,
    /// Failure → the client's first answer from the survivor.
    serve_ms: Option<f64>,
    checkpoints_compared: usize,
}

/// What a quiet machine needs at most for any wait of a trial (the waits stretch it by the
/// measured slowness).
const LIMIT: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn trial(seed: u64, victim: Victim, kill: Kill) -> Result<Trial> {
    let dbg = |s: &str| {
        if std::env::var_os("COLO_FAILOVER_DEBUG").is_some() {
            eprintln!("  [{seed:#x}] {s}");
        }
    };
    let mut rng = Rng(seed);
    let mut cfg = PairConfig::new(seed, victim);
    // Kills and cuts are seen at once (EOF), so the silence timeout plays no part here; it is
    // long because a loaded 2-core machine starves the node threads for hundreds of ms and a
    // blocking send keeps a node from reading heartbeats (see the report), which otherwise
    // declares a live peer dead before the injected failure.
    cfg.liveness.timeout = scaled(Duration::from_secs(2));
    if let Kill::Trip(op, w, n) = kill {
        cfg.trip = Some((op, w, n));
    }
    let pair = Pair::start(&cfg)?;
    dbg("started");
    pair.wait_checkpoints(1, LIMIT)?;
    dbg("protected");
    let addrs = match victim {
        Victim::Primary => pair.client_addrs.clone(),
        // The secondary never serves clients unless it takes over.
        Victim::Secondary => pair.client_addrs[..1].to_vec(),
    };
    let client = ClientThread::start(addrs, seed, pair.switch.clone())?;
    let warm = rng.range(2, 10);
    pair.wait_checkpoints(1 + warm, LIMIT)?;
    match kill {
        Kill::Trip(..) => pair.arm(victim),
        Kill::Cut(dir, n) => pair.repl.cut_after(dir, n),
    }
    dbg("armed");
    // The primary's state as last seen before the failure (published once per loop step).
    let mut state_at_kill = String::new();
    let mut sstate_at_kill = String::new();
    let t = Instant::now();
    let limit = scaled(LIMIT);
    while !pair.switch.is_killed() {
        if t.elapsed() > limit {
            bail!("the injected failure did not happen in {limit:?}");
        }
        let (pstate, reason) = {
            let st = pair.pstatus.lock();
            (st.state.clone(), st.failover_reason.clone())
        };
        let sstate = pair.sstatus.lock().state.clone();
        // The switch is set before any socket is cut: what was read while it is still unset
        // happened before the injection.
        if pair.switch.is_killed() {
            break;
        }
        if let Some(r) = reason {
            bail!("the primary lost the secondary before the injected failure: {r}");
        }
        state_at_kill = pstate;
        sstate_at_kill = sstate;
        std::thread::sleep(Duration::from_micros(200));
    }
    let killed_at = pair.switch.killed_at().context("kill time")?;
    let phase = match kill {
        Kill::Trip(op, w, _) => format!("{w:?} {op:?}"),
        Kill::Cut(d, _) => {
            let dir = match d {
                Direction::ToTarget => "P→S",
                Direction::FromTarget => "S→P",
            };
            format!("cut {dir} P:{state_at_kill}/S:{sstate_at_kill}")
        }
    };
    let detect_ms = match victim {
        Victim::Primary => {
            pair.wait_for("the takeover", LIMIT, |p| {
                p.took_over_at.lock().is_some() || p.secondary_finished()
            })?;
            let Some(t) = *pair.took_over_at.lock() else {
                let (_, s) = pair.stop();
                bail!("the secondary did not take over ({phase}): {s:?}");
            };
            ms(t.saturating_duration_since(killed_at))
        }
        Victim::Secondary => {
            pair.wait_for("the primary to go on unprotected", LIMIT, |p| {
                p.pstatus.lock().state == "Unprotected" || p.primary_finished()
            })?;
            if pair.primary_finished() {
                let (p, _) = pair.stop();
                bail!("the primary stopped after the secondary died ({phase}): {p:?}");
            }
            ms(killed_at.elapsed())
        }
    };
    dbg("survivor up");
    // The client goes on against the survivor.
    pair.wait_for("the client to go on after the failure", LIMIT, |_| {
        client.ops_after_kill.load(Ordering::SeqCst) >= 10
    })
    .with_context(|| phase.clone())?;
    let report = client
        .finish()
        .with_context(|| format!("client ({phase})"))?;
    let compared = pair.check_snapshots().with_context(|| phase.clone())?;
    let takeover_epoch = *pair.takeover_epoch.lock();
    if victim == Victim::Primary {
        // Every checkpoint the primary committed (and released output for) was applied whole
        // by the secondary before it took over.
        let committed = pair.pstatus.lock().last.as_ref().map(|l| l.epoch);
        if committed > takeover_epoch {
            bail!(
                "the primary committed checkpoint {committed:?} but the secondary took over from \
                 {takeover_epoch:?} ({phase})"
            );
        }
    }
    dbg("verified");
    let (p, s) = pair.stop();
    dbg("stopped");
    match victim {
        Victim::Primary => match s {
            Ok(SecondaryEnd::TookOver) => {}
            other => bail!("secondary after the primary's death ({phase}): {other:?}"),
        },
        Victim::Secondary => {
            p.with_context(|| format!("the surviving primary failed ({phase})"))?;
        }
    }
    if report.stats.lost_acked_writes != 0 {
        bail!(
            "{} acknowledged writes lost ({phase}; takeover from epoch {takeover_epoch:?})",
            report.stats.lost_acked_writes
        );
    }
    if report.stats.acked_writes == 0 {
        bail!("the client had no write acknowledged ({phase})");
    }
    Ok(Trial {
        phase,
        detect_ms,
        serve_ms: report.serve_after_kill.map(ms),
        checkpoints_compared: compared,
    })
}

fn run_trials(name: &str, victim: Victim, kills: &[(u64, Kill)]) {
    let mut failures = Vec::new();
    let mut results = Vec::new();
    // COLO_FAILOVER_TRIALS=n runs only the first n trials (for debugging).
    let limit = std::env::var("COLO_FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    for &(seed, kill) in kills.iter().take(limit) {
        let t = Instant::now();
        match trial(seed, victim, kill) {
            Ok(r) => {
                eprintln!(
                    "{name}: {kill:?}: {} detect {:.1} ms serve {:?} ms ({:.0} ms)",
                    r.phase,
                    r.detect_ms,
                    r.serve_ms,
                    ms(t.elapsed())
                );
                results.push(r)
            }
            Err(e) => {
                eprintln!("{name}: {kill:?}: FAILED {e:#}");
                failures.push(format!("seed {seed:#x} {kill:?}: {e:#}"))
            }
        }
    }
    let mut detect: Vec<f64> = results.iter().map(|t| t.detect_ms).collect();
    let mut serve: Vec<f64> = results.iter().filter_map(|t| t.serve_ms).collect();
    let phases: Vec<String> = results.iter().map(|t| t.phase.clone()).collect();
    let compared: usize = results.iter().map(|t| t.checkpoints_compared).sum();
    eprintln!(
        "{name}: {} kills, {} failed; {compared} applied checkpoints compared with the PVM's",
        kills.len(),
        failures.len()
    );
    eprintln!("{name}: phases: {}", histogram(&phases));
    eprintln!(
        "{name}: failure → survivor running as primary: {}",
        distribution(&mut detect)
    );
    eprintln!(
        "{name}: failure → first client answer from the survivor: {}",
        distribution(&mut serve)
    );
    assert!(
        failures.is_empty(),
        "{name}: {} of {} trials failed:\n{}",
        failures.len(),
        kills.len(),
        failures.join("\n")
    );
}

const PRIMARY_OPS: [(Op, When); 12] = [
    (Op::Pause, When::Before),
    (Op::Pause, When::After),
    (Op::Harvest, When::Before),
    (Op::Harvest, When::After),
    (Op::ReadPages, When::Before),
    (Op::ReadPages, When::After),
    (Op::GetState, When::Before),
    (Op::GetState, When::After),
    (Op::Resume, When::Before),
    (Op::Resume, When::After),
    (Op::Inject, When::After),
    (Op::DrainTx, When::Before),
];

const SECONDARY_OPS: [(Op, When); 9] = [
    (Op::Pause, When::After),
    (Op::Harvest, When::After),
    (Op::WritePages, When::Before),
    (Op::SetState, When::After),
    (Op::ReadPages, When::After),
    (Op::Resume, When::Before),
    (Op::Resume, When::After),
    (Op::Inject, When::After),
    (Op::DrainTx, When::Before),
];

fn trip_kills(base: u64, ops: &[(Op, When)], per_op: u64) -> Vec<(u64, Kill)> {
    let mut rng = Rng(base);
    let mut v = Vec::new();
    for &(op, w) in ops {
        for _ in 0..per_op {
            // Drains run every loop step; the others a few times per checkpoint.
            let n = if op == Op::DrainTx {
                rng.range(1, 400)
            } else {
                rng.range(1, 4)
            };
            v.push((rng.next(), Kill::Trip(op, w, n)));
        }
    }
    v
}

fn cut_kills(base: u64, to_target: usize, from_target: usize) -> Vec<(u64, Kill)> {
    let mut rng = Rng(base);
    let mut v = Vec::new();
    for _ in 0..to_target {
        // A checkpoint of this workload is a few to a few tens of KiB; the range spans many.
        let n = rng.range(0, 256 << 10);
        v.push((rng.next(), Kill::Cut(Direction::ToTarget, n)));
    }
    for _ in 0..from_target {
        let n = rng.range(0, 4 << 10);
        v.push((rng.next(), Kill::Cut(Direction::FromTarget, n)));
    }
    v
}

#[test]
fn primary_killed_at_backend_calls_in_every_phase() {
    run_trials(
        "primary killed at a backend call",
        Victim::Primary,
        &trip_kills(0xC010_0001, &PRIMARY_OPS, 4),
    );
}

#[test]
fn primary_killed_at_replication_stream_offsets() {
    run_trials(
        "primary killed at a stream offset",
        Victim::Primary,
        &cut_kills(0xC010_0002, 40, 12),
    );
}

#[test]
fn secondary_killed_at_backend_calls_and_stream_offsets() {
    let mut kills = trip_kills(0xC010_0003, &SECONDARY_OPS, 2);
    kills.extend(cut_kills(0xC010_0004, 8, 6));
    run_trials("secondary killed", Victim::Secondary, &kills);
}

/// The link misbehaves while both nodes live: what each side concludes, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkFault {
    Stall,
    Drop,
}

/// Both nodes alive; the link stalls or drops. Each side must notice: the primary goes on
/// unprotected and keeps serving; the secondary takes over when its fence command allows
/// (split brain: that is what fencing is for) and gives up otherwise. Returns the time from the
/// fault to (primary unprotected, secondary taken over).
fn link_fault_trial(seed: u64, fault: LinkFault, fence_ok: bool) -> Result<(f64, Option<f64>)> {
    let mut cfg = PairConfig::new(seed, Victim::Secondary);
    // Short enough to show heartbeat detection, long enough that a loaded 2-core CI machine
    // does not declare a busy peer dead before the fault (see the report on false detection).
    cfg.liveness.timeout = stall_timeout();
    cfg.fence_cmd = Some(if fence_ok { "true" } else { "exit 1" }.into());
    let pair = Pair::start(&cfg)?;
    pair.wait_checkpoints(1, LIMIT)?;
    let marker = colo_cli::faultproxy::KillSwitch::new();
    let client = ClientThread::start(pair.client_addrs[..1].to_vec(), seed, marker.clone())?;
    pair.wait_checkpoints(5, LIMIT)?;
    marker.kill();
    let t0 = Instant::now();
    match fault {
        LinkFault::Stall => pair.repl.stall(true),
        LinkFault::Drop => pair.repl.drop_connections(),
    }
    pair.wait_for("the primary to go on unprotected", LIMIT, |p| {
        p.pstatus.lock().state == "Unprotected" || p.primary_finished()
    })?;
    let primary_ms = ms(t0.elapsed());
    pair.wait_for("the secondary to decide", LIMIT, |p| {
        p.took_over_at.lock().is_some() || p.secondary_finished()
    })?;
    let secondary_ms = pair
        .took_over_at
        .lock()
        .map(|t| ms(t.saturating_duration_since(t0)));
    pair.wait_for("the client to go on after the link fault", LIMIT, |_| {
        client.ops_after_kill.load(Ordering::SeqCst) >= 10
    })?;
    let report = client.finish()?;
    pair.check_snapshots()?;
    let (p, s) = pair.stop();
    p.context("the primary must go on after a link fault")?;
    match (fence_ok, s) {
        (true, Ok(SecondaryEnd::TookOver)) => {}
        (false, Err(e)) if format!("{e:#}").contains("fence") => {}
        (_, other) => bail!("secondary after {fault:?} (fence ok: {fence_ok}): {other:?}"),
    }
    if report.stats.lost_acked_writes != 0 {
        bail!(
            "{} acknowledged writes lost after {fault:?}",
            report.stats.lost_acked_writes
        );
    }
    Ok((primary_ms, secondary_ms))
}

/// A slow backend is not a dead peer: with every apply on the secondary and every page read on
/// the primary taking three times the silence timeout (a nested hypervisor copying a large
/// checkpoint), the link's keepalive speaks for the busy node and the pair stays protected.
#[test]
fn backend_calls_longer_than_the_silence_timeout_are_not_taken_for_death() {
    let cfg = PairConfig::new(0x5_10E, Victim::Secondary);
    let slow = cfg.liveness.timeout * 3;
    let pair = Pair::start(&cfg).expect("pair");
    pair.wait_checkpoints(2, LIMIT)
        .expect("checkpoints before slowing down");
    pair.strip.slow_down(Op::WritePages, slow);
    pair.ptrip.slow_down(Op::ReadPages, slow);
    let before = pair.pstatus.lock().checkpoints;
    pair.wait_checkpoints(before + 5, LIMIT)
        .expect("checkpoints while the backends are slow");
    for (who, st) in [("primary", &pair.pstatus), ("secondary", &pair.sstatus)] {
        let st = st.lock();
        assert_eq!(
            st.failover_reason, None,
            "the {who} declared its peer lost although both were alive"
        );
    }
    assert!(
        pair.took_over_at.lock().is_none(),
        "the secondary took over"
    );
    let compared = pair.check_snapshots().expect("memories identical");
    eprintln!(
        "slow backend ({} ms per call, silence timeout {} ms): {} checkpoints compared, no failover",
        slow.as_millis(),
        cfg.liveness.timeout.as_millis(),
        compared
    );
    let (p, s) = pair.stop();
    p.expect("primary");
    s.expect("secondary");
}

/// Four trials of `fault`, fencing succeeding in every other one (from the first when
/// `fence_first`); checks the secondary takes over exactly when fencing succeeds and prints
/// both sides' detection times under `label`.
fn link_fault_trials(label: &str, fault: LinkFault, seed: u64, fence_first: bool) {
    let mut prim = Vec::new();
    let mut sec = Vec::new();
    for i in 0..4u64 {
        let (p, s) = link_fault_trial(seed + i, fault, (i % 2 == 0) == fence_first)
            .unwrap_or_else(|e| panic!("{fault:?} trial {i}: {e:#}"));
        prim.push(p);
        sec.extend(s);
    }
    assert_eq!(
        sec.len(),
        2,
        "the secondary takes over exactly when fencing succeeds"
    );
    eprintln!(
        "{label}: primary unprotected after {}",
        distribution(&mut prim)
    );
    eprintln!(
        "{label}: secondary took over after {}",
        distribution(&mut sec)
    );
}

/// The silence timeout of the link fault trials: 300 ms on a quiet machine.
fn stall_timeout() -> Duration {
    scaled(Duration::from_millis(300))
}

#[test]
fn stalled_link_is_detected_by_heartbeat_timeout_on_both_sides() {
    link_fault_trials(
        &format!(
            "stall (heartbeat timeout {} ms)",
            stall_timeout().as_millis()
        ),
        LinkFault::Stall,
        0x57A1_0000,
        true,
    );
}

#[test]
fn dropped_link_is_detected_at_once_and_fencing_decides_the_takeover() {
    link_fault_trials("drop", LinkFault::Drop, 0xD209_0000, false);
}

#[test]
fn delay_below_the_heartbeat_timeout_causes_no_failover() {
    let mut cfg = PairConfig::new(0xDE1A_0001, Victim::Secondary);
    cfg.liveness.timeout = scaled(Duration::from_millis(600));
    let pair = Pair::start(&cfg).expect("pair");
    pair.wait_checkpoints(1, LIMIT).expect("protection");
    let marker = colo_cli::faultproxy::KillSwitch::new();
    let client =
        ClientThread::start(pair.client_addrs[..1].to_vec(), 0xDE1A, marker).expect("client");
    // 40–60 ms each way: a round trip of up to 120 ms, well under the timeout (600 ms on a
    // quiet machine, more on a busy one, where the nodes' own threads are late as well).
    pair.repl
        .set_delay(Duration::from_millis(40), Duration::from_millis(20));
    let before = pair.pstatus.lock().checkpoints;
    pair.wait_checkpoints(before + 15, LIMIT)
        .expect("checkpoints go on over the delayed link");
    {
        let st = pair.pstatus.lock();
        assert!(
            st.protected,
            "the primary dropped protection: {:?}",
            st.failover_reason
        );
        assert_ne!(st.state, "Unprotected");
    }
    assert!(
        pair.took_over_at.lock().is_none(),
        "the secondary took over"
    );
    assert!(!pair.primary_finished() && !pair.secondary_finished());
    let report = client.finish().expect("client");
    assert_eq!(report.stats.lost_acked_writes, 0);
    assert!(report.stats.acked_writes > 0);
    let compared = pair.check_snapshots().expect("snapshots");
    assert!(compared >= 15, "compared {compared} checkpoints");
    let (p, s) = pair.stop();
    p.expect("primary");
    assert!(
        matches!(s, Ok(SecondaryEnd::Stopped)),
        "secondary after an orderly stop: {s:?}"
    );
}

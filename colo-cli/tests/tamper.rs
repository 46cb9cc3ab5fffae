//! Tamper tests: a pair with a sealed link (a pre-shared key) runs checkpoints; the replication
//! proxy, knowing the key only to find where each record kind sits, changes one byte of a
//! record of that kind in either direction, or replays, reorders, drops, truncates a frame or
//! injects a forged one. The receiving node must refuse it, end the link naming the
//! authentication failure (or the truncation), and never apply it: every checkpoint the SVM
//! applied equals the PVM's capture, and none at or after the tampered frame was applied.

mod common;

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use colo_cli::faultproxy::Direction;
use colo_cli::tamper::{Action, Plan, Target};
use colo_core::engine::messages::{colo_type, Control, Role};
use colo_core::engine::Liveness;
use colo_core::stream::rec_type;
use common::{scaled, Pair, PairConfig, Victim};

const KEY: &[u8] = b"tamper-test pre-shared key";

/// Runs a sealed pair, tampers once as `plan` says, and checks what the receiver did.
fn tamper(seed: u64, dir: Direction, target: Target, action: Action) -> Result<()> {
    let sender = match dir {
        Direction::ToTarget => Role::Primary,
        Direction::FromTarget => Role::Secondary,
    };
    let mut cfg = PairConfig::new(seed, Victim::Secondary);
    // Generous liveness: on a loaded machine a slow peer must not be declared lost first.
    cfg.liveness = Liveness {
        interval: Duration::from_millis(50),
        timeout: scaled(Duration::from_secs(5)),
        progress_timeout: scaled(Duration::from_secs(20)),
    };
    cfg.key = Some(KEY.to_vec());
    cfg.tamper = Some(Plan {
        dir,
        sender,
        target,
        action,
    });
    let what = format!("{action:?} on {target:?} from the {sender}");
    let pair = Pair::start(&cfg)?;
    let Some(t) = pair.tampering.clone() else {
        bail!("no tampering plan");
    };
    pair.wait_checkpoints(3, Duration::from_secs(60))?;
    t.arm();
    let receiver = match sender {
        Role::Primary => pair.sstatus.clone(),
        Role::Secondary => pair.pstatus.clone(),
    };
    pair.wait_for(&what, Duration::from_secs(60), |_| {
        t.fired().is_some() && receiver.lock().failover_reason.is_some()
    })?;
    let reason = receiver.lock().failover_reason.clone().unwrap_or_default();
    let fired = t.fired();
    let snapshots = pair.check_snapshots();
    let last_applied = pair.ssnap.lock().keys().next_back().copied();
    let (p, s) = pair.stop();
    let want = match action {
        Action::Truncate => "the stream was truncated",
        _ => "record authentication failed",
    };
    ensure!(
        reason.contains(want),
        "{what}: the {} ended the link for another reason: {reason}",
        sender.peer()
    );
    ensure!(p.is_ok(), "{what}: the primary failed: {p:?}");
    ensure!(s.is_ok(), "{what}: the secondary failed: {s:?}");
    // Nothing tampered was applied: every checkpoint the SVM applied is the PVM's, and none
    // whose CHECKPOINT record came at or after the tampered frame.
    snapshots?;
    if sender == Role::Primary {
        let before = fired.map_or(0, |f| f.checkpoints_before);
        ensure!(
            last_applied.is_some_and(|e| e < before),
            "{what}: the SVM applied checkpoint {last_applied:?}, but only {before} checkpoints \
             passed before the tampered frame"
        );
    }
    eprintln!("{what}: refused ({reason})");
    Ok(())
}

/// A byte changed in each record kind of `targets`, sent in `dir`: one pair each.
fn flip_each(seed: u64, dir: Direction, targets: &[Target]) -> Result<()> {
    for (i, &target) in targets.iter().enumerate() {
        tamper(seed + i as u64, dir, target, Action::Flip)?;
    }
    Ok(())
}

/// A byte changed in each kind of record the primary sends.
#[test]
fn a_changed_byte_in_any_record_from_the_primary_is_refused() -> Result<()> {
    let targets = [
        Target::Page,
        Target::Record(colo_type::VCPU_STATE),
        Target::Record(rec_type::CHECKPOINT),
        Target::Control(Control::New),
        Target::Record(colo_type::HEARTBEAT),
    ];
    flip_each(100, Direction::ToTarget, &targets)
}

/// A byte changed in each kind of record of the back channel.
#[test]
fn a_changed_byte_in_any_record_from_the_secondary_is_refused() -> Result<()> {
    let targets = [
        Target::Record(rec_type::CHECKPOINT_DIRTY_PFN_LIST),
        Target::Control(Control::SvmSuspended),
        Target::Control(Control::SvmReady),
        Target::Control(Control::SvmResumed),
        Target::Record(colo_type::HEARTBEAT),
    ];
    flip_each(200, Direction::FromTarget, &targets)
}

/// Whole frames replayed, reordered, dropped, injected or cut, both ways.
#[test]
fn replayed_reordered_dropped_injected_and_truncated_frames_are_refused() -> Result<()> {
    let actions = [
        Action::Replay,
        Action::Reorder,
        Action::Drop,
        Action::Inject,
        Action::Truncate,
    ];
    for (i, action) in actions.into_iter().enumerate() {
        tamper(300 + i as u64, Direction::ToTarget, Target::Page, action)?;
    }
    for (i, action) in actions.into_iter().enumerate() {
        let target = Target::Control(Control::SvmReady);
        tamper(400 + i as u64, Direction::FromTarget, target, action)?;
    }
    Ok(())
}

//! `--streams N` end to end: a pair whose nodes both carry the link on three connections
//! replicates a `dirty` guest byte for byte (the PVM's memory at each capture against the SVM's
//! right after applying), sealed, plaintext with a key and without a key; a pair whose nodes
//! ask for different counts is refused at the handshake, naming both, and does not hang.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_cli::mock::{build, MockSpec, WorkloadKind};
use colo_cli::node::{new_status, NodeOptions, PrimaryNode};
use colo_cli::testing::spawn_secondary;
use colo_core::engine::PrimaryState;
use colo_core::policy::CheckpointPolicy;
use colo_core::stream::{Codec, PageCoding};
use parking_lot::Mutex;

type Snapshots = Arc<Mutex<HashMap<u64, Vec<u8>>>>;

mod common;

/// An 8 MiB `dirty` guest writing 20 pages/ms.
fn dirty_guest(seed: u64) -> MockSpec {
    MockSpec {
        workload: WorkloadKind::Dirty,
        memory_divergence: false,
        dirty_rate: 20,
        ..common::spec(seed, 8 << 20, 0.0)
    }
}

/// How the link is protected in a run.
#[derive(Debug, Clone, Copy)]
enum Keying {
    Sealed,
    PlaintextWithKey,
    NoKey,
}

fn opts(streams: u8, keying: Keying, coding: PageCoding, snaps: &Snapshots) -> NodeOptions {
    let s = snaps.clone();
    let base = common::node_options();
    NodeOptions {
        // Failure detection is not under test: a silence timeout of seconds, so a test thread
        // starved by a busy machine is not taken for a dead peer.
        liveness: colo_core::engine::Liveness {
            timeout: common::scaled(Duration::from_secs(10)),
            progress_timeout: common::scaled(Duration::from_secs(60)),
            ..base.liveness
        },
        streams,
        page_coding: coding,
        key: match keying {
            Keying::NoKey => None,
            _ => Some(b"streams test key".to_vec()),
        },
        insecure_plaintext: matches!(keying, Keying::PlaintextWithKey),
        policy: CheckpointPolicy {
            min_interval: Duration::from_millis(2),
            max_interval: Duration::from_millis(10),
        },
        snapshot: Some(Arc::new(move |epoch, ram, _state| {
            s.lock().insert(epoch, ram);
        })),
        ..base
    }
}

/// Runs a pair on `streams` connections for `checkpoints` checkpoints; returns how many
/// checkpoints were compared byte for byte.
fn replicate(streams: u8, keying: Keying, coding: PageCoding, checkpoints: u64) -> usize {
    let (psnap, ssnap): (Snapshots, Snapshots) = Default::default();
    let sguest = build(&dirty_guest(2)).unwrap();
    let secondary = spawn_secondary(
        sguest,
        opts(streams, keying, coding, &ssnap),
        new_status(),
        |n| n.run().map(|_| ()),
    )
    .unwrap();
    let mut guest = build(&dirty_guest(1)).unwrap();
    colo_core::Domain::resume(&mut guest).unwrap();
    let status = new_status();
    let mut primary = PrimaryNode::connect(
        guest,
        &secondary.addr,
        opts(streams, keying, coding, &psnap),
        status.clone(),
    )
    .unwrap();
    let budget = common::scaled(Duration::from_secs(120));
    let deadline = Instant::now() + budget;
    while status.lock().checkpoints < checkpoints {
        assert!(
            Instant::now() < deadline,
            "{checkpoints} checkpoints took over {budget:?}"
        );
        primary.step(Duration::from_millis(1)).unwrap();
        assert_ne!(
            primary.engine().state(),
            PrimaryState::Unprotected,
            "the pair broke: {:?}",
            status.lock().failover_reason
        );
    }
    assert_eq!(
        status.lock().link_streams,
        u64::from(streams),
        "{keying:?}: the records did not travel on {streams} connections"
    );
    primary
        .stop_flag()
        .store(true, std::sync::atomic::Ordering::Relaxed);
    primary.run().unwrap();
    drop(primary);
    secondary.join().unwrap();
    let (p, s) = (psnap.lock(), ssnap.lock());
    let mut compared = 0;
    for (epoch, pram) in p.iter() {
        if let Some(sram) = s.get(epoch) {
            assert!(pram == sram, "{keying:?}: checkpoint {epoch} differs");
            compared += 1;
        }
    }
    compared
}

#[test]
fn three_streams_replicate_byte_for_byte() {
    let lz4 = PageCoding {
        zero_pages: true,
        codec: Codec::Lz4,
    };
    for (keying, coding) in [
        (Keying::Sealed, PageCoding::PLAIN),
        (Keying::NoKey, PageCoding::PLAIN),
        (Keying::PlaintextWithKey, lz4),
    ] {
        let n = replicate(3, keying, coding, 15);
        assert!(n >= 10, "{keying:?}: only {n} checkpoints compared");
    }
}

/// A primary and a secondary asking for `p` and `s` connections: the primary's reason for
/// staying unprotected.
fn refused(p: u8, s: u8, keying: Keying) -> String {
    let none: Snapshots = Arc::default();
    let sguest = build(&dirty_guest(2)).unwrap();
    let sopts = opts(s, keying, PageCoding::PLAIN, &none);
    let secondary = spawn_secondary(sguest, sopts, new_status(), |n| n.run().map(|_| ())).unwrap();
    let guest = build(&dirty_guest(1)).unwrap();
    let status = new_status();
    let mut primary = PrimaryNode::connect(
        guest,
        &secondary.addr,
        opts(p, keying, PageCoding::PLAIN, &none),
        status.clone(),
    )
    .unwrap();
    let deadline = Instant::now() + common::scaled(Duration::from_secs(60));
    while primary.engine().state() != PrimaryState::Unprotected {
        assert!(Instant::now() < deadline, "the mismatch was not refused");
        primary.step(Duration::from_millis(5)).unwrap();
    }
    // The refused secondary waits for another primary (until its connect timeout): left
    // running, it ends with the test process.
    drop(primary);
    drop(secondary);
    let why = status.lock().failover_reason.clone().unwrap_or_default();
    why
}

#[test]
fn different_stream_counts_are_refused_at_the_handshake_naming_both() {
    let why = refused(4, 1, Keying::NoKey);
    assert!(
        why.contains("--streams differs")
            && why.contains("the primary has --streams 4, the secondary has --streams 1"),
        "{why}"
    );
    let why = refused(1, 3, Keying::Sealed);
    assert!(
        why.contains("the primary has --streams 1, the secondary has --streams 3"),
        "{why}"
    );
    let why = refused(2, 3, Keying::PlaintextWithKey);
    assert!(
        why.contains("the primary has --streams 2, the secondary has --streams 3"),
        "{why}"
    );
}

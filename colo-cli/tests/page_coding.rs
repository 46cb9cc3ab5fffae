//! The link's page codings end to end: a pair whose nodes agree on `--zero-pages` and
//! `--compress lz4` replicates a `dirty` guest byte for byte (the PVM's memory at each capture
//! against the SVM's right after applying), sealed and plaintext; a pair whose nodes disagree
//! is refused at the handshake, naming both codings.

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

/// An 8 MiB `dirty` guest writing 20 pages/ms: most pages stay zero, the written ones hold a
/// few random words (compressible).
fn dirty_guest(seed: u64) -> MockSpec {
    MockSpec {
        workload: WorkloadKind::Dirty,
        memory_divergence: false,
        dirty_rate: 20,
        ..common::spec(seed, 8 << 20, 0.0)
    }
}

fn opts(coding: PageCoding, key: Option<&[u8]>, snaps: &Snapshots) -> NodeOptions {
    let s = snaps.clone();
    let base = common::node_options();
    NodeOptions {
        // Failure detection is not under test here and both nodes end with GOODBYE: a silence
        // timeout of seconds, not the default half second, so that a test thread starved by a
        // busy machine is not taken for a dead peer (seen once at load 10: "sending the
        // checkpoint failed: Broken pipe").
        liveness: colo_core::engine::Liveness {
            timeout: common::scaled(Duration::from_secs(10)),
            progress_timeout: common::scaled(Duration::from_secs(60)),
            ..base.liveness
        },
        page_coding: coding,
        key: key.map(<[u8]>::to_vec),
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

/// Runs a pair coding pages as `coding` (both nodes) for `checkpoints` checkpoints; returns how
/// many checkpoints were compared.
fn replicate(coding: PageCoding, key: Option<&[u8]>, checkpoints: u64) -> usize {
    let (psnap, ssnap): (Snapshots, Snapshots) = Default::default();
    let sguest = build(&dirty_guest(2)).unwrap();
    let secondary = spawn_secondary(sguest, opts(coding, key, &ssnap), new_status(), |n| {
        n.run().map(|_| ())
    })
    .unwrap();
    let mut guest = build(&dirty_guest(1)).unwrap();
    colo_core::Domain::resume(&mut guest).unwrap();
    let status = new_status();
    let mut primary = PrimaryNode::connect(
        guest,
        &secondary.addr,
        opts(coding, key, &psnap),
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
            assert!(pram == sram, "{coding}: checkpoint {epoch} differs");
            compared += 1;
        }
    }
    compared
}

#[test]
fn every_page_coding_replicates_byte_for_byte() {
    let lz4_zero = PageCoding {
        zero_pages: true,
        codec: Codec::Lz4,
    };
    let zero = PageCoding {
        zero_pages: true,
        codec: Codec::None,
    };
    let lz4 = PageCoding {
        zero_pages: false,
        codec: Codec::Lz4,
    };
    for (coding, key) in [
        (lz4_zero, Some(&b"k"[..])),
        (zero, None),
        (lz4, Some(&b"k"[..])),
    ] {
        let n = replicate(coding, key, 15);
        assert!(n >= 10, "{coding}: only {n} checkpoints compared");
    }
}

#[test]
fn different_page_codings_are_refused_at_the_handshake() {
    let none: Snapshots = Arc::default();
    let sguest = build(&dirty_guest(2)).unwrap();
    let sopts = opts(PageCoding::PLAIN, None, &none);
    let secondary = spawn_secondary(sguest, sopts, new_status(), |n| n.run().map(|_| ())).unwrap();
    let guest = build(&dirty_guest(1)).unwrap();
    let status = new_status();
    let lz4 = PageCoding {
        zero_pages: false,
        codec: Codec::Lz4,
    };
    let mut primary = PrimaryNode::connect(
        guest,
        &secondary.addr,
        opts(lz4, None, &none),
        status.clone(),
    )
    .unwrap();
    let deadline = Instant::now() + common::scaled(Duration::from_secs(60));
    while primary.engine().state() != PrimaryState::Unprotected {
        assert!(Instant::now() < deadline, "the mismatch was not refused");
        primary.step(Duration::from_millis(5)).unwrap();
    }
    let why = status.lock().failover_reason.clone().unwrap_or_default();
    assert!(
        why.contains("page coding differs") && why.contains("--compress lz4"),
        "{why}"
    );
    // The refused secondary waits for another primary (until its connect timeout): left
    // running, it ends with the test process.
    drop(primary);
    drop(secondary);
}

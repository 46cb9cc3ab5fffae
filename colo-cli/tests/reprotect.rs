//! Failover then re-protection, over real loopback sockets: the primary dies, the secondary
//! takes over and keeps its guest running, a new secondary joins, the survivor re-synchronises
//! it without stopping, and the new pair's memories are byte-identical after every checkpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_cli::mock::{build, MockSpec, WorkloadKind};
use colo_cli::node::{new_status, NodeOptions, PrimaryNode, SecondaryOutcome};
use colo_cli::testing::SecondaryThread;
use colo_core::policy::CheckpointPolicy;
use colo_core::Domain;
use colo_mock::MockDomain;
use parking_lot::Mutex;

mod common;
use common::{node_options, scaled};

type Snapshots = Arc<Mutex<HashMap<u64, Vec<u8>>>>;

fn guest(seed: u64) -> MockDomain {
    build(&MockSpec {
        ram: 4 << 20,
        ram_file: None,
        workload: WorkloadKind::Dirty,
        vm_seed: seed,
        memory_divergence: false,
        output_divergence: 0.0,
        dirty_rate: 20,
    })
    .unwrap()
}

fn opts(snap: Option<Snapshots>) -> NodeOptions {
    let mut o = NodeOptions {
        policy: CheckpointPolicy {
            min_interval: Duration::from_millis(1),
            max_interval: Duration::from_millis(5),
        },
        ..node_options()
    };
    if let Some(s) = snap {
        o.snapshot = Some(Arc::new(move |e, ram, _| {
            s.lock().insert(e, ram);
        }));
    }
    o
}

fn spawn_secondary(
    seed: u64,
    snap: Option<Snapshots>,
) -> (String, SecondaryThread<SecondaryOutcome<MockDomain>>) {
    let s = colo_cli::testing::spawn_secondary(guest(seed), opts(snap), new_status(), |node| {
        node.run()
    })
    .unwrap();
    (s.addr.clone(), s)
}

#[test]
fn survivor_takes_over_then_reprotects_with_a_new_secondary() {
    // Pair 1: primary P and secondary S1.
    let (s1_addr, s1) = spawn_secondary(2, None);
    let mut pg = guest(1);
    pg.resume().unwrap();
    let pstatus = new_status();
    let mut p = PrimaryNode::connect(pg, &s1_addr, opts(None), pstatus.clone()).unwrap();
    let deadline = Instant::now() + scaled(Duration::from_secs(60));
    while pstatus.lock().checkpoints < 10 {
        assert!(Instant::now() < deadline);
        p.step(Duration::from_micros(500)).unwrap();
    }
    // The primary dies: its socket closes without GOODBYE.
    drop(p);
    let SecondaryOutcome::TookOver(survivor) = s1.join().unwrap() else {
        panic!("the secondary did not take over");
    };
    let mut survivor = *survivor;
    let steps_at_takeover = survivor.guest().steps();
    // It runs unprotected for a while (at least 200 ms, and until its guest made progress,
    // which a busy machine may delay): the guest keeps running.
    let t = Instant::now();
    let until = t + scaled(Duration::from_secs(10));
    while t.elapsed() < Duration::from_millis(200)
        || (survivor.guest().steps() == steps_at_takeover && Instant::now() < until)
    {
        survivor.step(Duration::from_micros(500)).unwrap();
    }
    assert!(
        survivor.guest().steps() > steps_at_takeover,
        "the survivor's guest must run"
    );
    assert!(!survivor.engine().is_protected());

    // Pair 2: the survivor re-protects itself with a new secondary S2.
    let ssnap: Snapshots = Arc::default();
    let (s2_addr, s2) = spawn_secondary(3, Some(ssnap.clone()));
    let psnap: Snapshots = Arc::default();
    let ps = psnap.clone();
    survivor.set_snapshot(Some(Arc::new(move |e, ram, _| {
        ps.lock().insert(e, ram);
    })));
    survivor.protect(&s2_addr).unwrap();
    let before = survivor.guest().steps();
    let deadline = Instant::now() + scaled(Duration::from_secs(60));
    while psnap.lock().len() < 20 || !survivor.engine().is_protected() {
        assert!(Instant::now() < deadline, "re-protection did not complete");
        survivor.step(Duration::from_micros(500)).unwrap();
    }
    assert!(
        survivor.guest().steps() > before,
        "the guest must keep running during re-synchronisation"
    );
    survivor
        .stop_flag()
        .store(true, std::sync::atomic::Ordering::Relaxed);
    survivor.run().unwrap();
    drop(survivor);
    assert!(matches!(s2.join().unwrap(), SecondaryOutcome::Stopped));
    let (p, s) = (psnap.lock(), ssnap.lock());
    let mut compared = 0;
    for (e, ram) in p.iter() {
        if let Some(sram) = s.get(e) {
            compared += 1;
            assert!(
                ram == sram,
                "memories differ after checkpoint {e} of the new pair"
            );
        }
    }
    assert!(compared >= 15, "compared {compared} checkpoints");
}

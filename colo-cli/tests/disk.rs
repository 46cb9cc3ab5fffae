//! Disk replication end to end with real nodes: a primary and a secondary on two threads over a
//! loopback socket, mock guests with virtual disks.
//!
//! - kv guests (memory divergence on) and a verifying client: after every checkpoint the PVM's
//!   disk image at the capture and the SVM's right after the apply are compared byte for byte,
//!   each side's on-disk kv table equals its in-RAM table (no torn checkpoint: the disk and the
//!   memory of one checkpoint travel together), and `--verify`'s disk digests all match.
//! - dirty guests writing disk blocks fast (megabytes of blocks per checkpoint): byte for byte
//!   after every checkpoint, then the replication stream is cut at a seeded offset (mostly in
//!   the middle of a checkpoint's DISK_BLOCKS) and the secondary takes over: its image is then
//!   exactly the PVM's disk at the last checkpoint it applied, nothing of the partial one.
//! - a secondary whose disk is missing or smaller than the primary's is refused at the
//!   handshake, by both nodes, with a clear error.
//!
//! The first two run in both disk mirror modes (`--disk-mirror checkpoint|continuous`); with
//! continuous mirroring the cut lands mostly among blocks mirrored between checkpoints, staged
//! for a checkpoint that never completes. A third, continuous only: dirty guests whose vCPU
//! threads write blocks while the primary mirrors every millisecond (mirror reads race with
//! guest writes), compared byte for byte after every checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use colo_cli::faultproxy::{Direction, FaultProxy, KillSwitch};
use colo_cli::kvclient::KvClient;
use colo_cli::mock::{build_with_disk, DiskSpec, MockSpec, WorkloadKind};
use colo_cli::node::{new_status, NodeOptions, PrimaryNode, SecondaryOutcome};
use colo_cli::testing::spawn_secondary;
use colo_core::disk::DiskMirror;
use colo_core::engine::Liveness;
use colo_core::policy::CheckpointPolicy;
use colo_core::Domain;
use colo_mock::guest::{kv_table_from_disk, kv_table_from_ram};
use colo_mock::MockDomain;
use parking_lot::Mutex;

const STEP: Duration = Duration::from_micros(500);
/// A guard against a hang, not a timing assertion (a loaded 2-core machine is slow).
const LIMIT: Duration = Duration::from_secs(600);

fn guest(workload: WorkloadKind, seed: u64, disk: u64, disk_rate: u64) -> MockDomain {
    let spec = MockSpec {
        ram: 8 << 20,
        ram_file: None,
        workload,
        vm_seed: seed,
        memory_divergence: true,
        output_divergence: 0.01,
        dirty_rate: 20,
    };
    let disk = DiskSpec {
        size: disk,
        rate: disk_rate,
        ..DiskSpec::default()
    };
    build_with_disk(&spec, &disk).unwrap()
}

/// The two sides' disk images of each checkpoint, compared byte for byte as the second of the
/// pair arrives (an image is kept only until its twin comes).
#[derive(Default)]
struct Matcher {
    waiting: HashMap<u64, (bool, Vec<u8>)>,
    compared: Vec<u64>,
    differing: Vec<u64>,
    /// The primary's images of the last few checkpoints (for the takeover check).
    primary: BTreeMap<u64, Vec<u8>>,
    /// The last epoch the secondary applied.
    applied: Option<u64>,
}

impl Matcher {
    fn offer(&mut self, primary: bool, epoch: u64, image: Vec<u8>) {
        if primary {
            self.primary.insert(epoch, image.clone());
            while self.primary.len() > 8 {
                self.primary.pop_first();
            }
        } else {
            self.applied = Some(epoch);
        }
        match self.waiting.remove(&epoch) {
            Some((side, other)) if side != primary => {
                self.compared.push(epoch);
                if other != image {
                    self.differing.push(epoch);
                }
            }
            _ => {
                self.waiting.insert(epoch, (primary, image));
            }
        }
    }
}

type Shared<T> = Arc<Mutex<T>>;

/// A kv table, key → value.
type Table = BTreeMap<Vec<u8>, Vec<u8>>;

/// Each side's kv tables of a checkpoint, from its disk and from its memory, compared as the
/// second arrives (the two hooks run in either order).
#[derive(Default)]
struct Tables {
    waiting: HashMap<(bool, u64), Table>,
    compared: usize,
    differing: Vec<u64>,
}

impl Tables {
    fn offer(&mut self, primary: bool, epoch: u64, table: Table) {
        match self.waiting.remove(&(primary, epoch)) {
            Some(other) => {
                self.compared += 1;
                if other != table {
                    self.differing.push(epoch);
                }
            }
            None => {
                self.waiting.insert((primary, epoch), table);
            }
        }
    }
}

/// Options with disk and memory snapshot hooks: images into `m`; with `tables`, each side's
/// on-disk kv table is compared with its in-RAM one at every checkpoint.
fn hooks(
    opts: &mut NodeOptions,
    primary: bool,
    m: &Shared<Matcher>,
    tables: Option<&Shared<Tables>>,
) {
    let m = m.clone();
    let t = tables.cloned();
    opts.disk_snapshot = Some(Arc::new(move |epoch, image| {
        if let Some(t) = &t {
            let disk = kv_table_from_disk(&image).unwrap();
            t.lock().offer(primary, epoch, disk);
        }
        m.lock().offer(primary, epoch, image);
    }));
    if let Some(t) = tables {
        let t = t.clone();
        opts.snapshot = Some(Arc::new(move |epoch, ram, _| {
            let table = kv_table_from_ram(&ram, 256);
            t.lock().offer(primary, epoch, table);
        }));
    }
}

fn fast_policy() -> CheckpointPolicy {
    CheckpointPolicy {
        min_interval: Duration::from_millis(1),
        max_interval: Duration::from_millis(5),
    }
}

fn kv_trial(mode: DiskMirror) {
    let m: Shared<Matcher> = Arc::default();
    let tables: Shared<Tables> = Arc::default();
    let mut sopts = NodeOptions {
        verify: true,
        disk_mirror: mode,
        ..NodeOptions::default()
    };
    hooks(&mut sopts, false, &m, Some(&tables));
    let secondary = spawn_secondary(
        guest(WorkloadKind::Kv, 2, 2 << 20, 0),
        sopts,
        new_status(),
        |node| node.run(),
    )
    .unwrap();
    let mut popts = NodeOptions {
        verify: true,
        client_addr: Some("127.0.0.1:0".into()),
        policy: fast_policy(),
        disk_mirror: mode,
        disk_mirror_interval: Duration::from_millis(1),
        ..NodeOptions::default()
    };
    hooks(&mut popts, true, &m, Some(&tables));
    let mut pguest = guest(WorkloadKind::Kv, 1, 2 << 20, 0);
    pguest.resume().unwrap();
    let pstatus = new_status();
    let mut primary =
        PrimaryNode::connect(pguest, &secondary.addr, popts, pstatus.clone()).unwrap();
    let addr = pstatus.lock().client_addr.clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let client = std::thread::spawn(move || {
        let mut c = KvClient::new(vec![addr], 41500, Duration::from_secs(5));
        let mut rng = 11u64;
        while !s2.load(Ordering::Relaxed) {
            c.random_op(&mut rng, 64, Instant::now() + Duration::from_secs(30))
                .unwrap();
        }
        c.verify_all(Instant::now() + Duration::from_secs(30))
            .unwrap();
        c.stats
    });
    let deadline = Instant::now() + LIMIT;
    while pstatus.lock().checkpoints < 40 {
        assert!(Instant::now() < deadline, "checkpoints too slow");
        primary.step(STEP).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    while !client.is_finished() {
        assert!(Instant::now() < deadline, "the client did not finish");
        primary.step(STEP).unwrap();
    }
    let stats = client.join().unwrap();
    primary.stop_flag().store(true, Ordering::Relaxed);
    primary.run().unwrap();
    drop(primary);
    assert!(matches!(
        secondary.join().unwrap(),
        SecondaryOutcome::Stopped
    ));
    let m = m.lock();
    let st = pstatus.lock();
    assert!(
        m.compared.len() >= 40,
        "compared {} checkpoints",
        m.compared.len()
    );
    assert!(
        m.differing.is_empty(),
        "the SVM's disk differed from the PVM's after checkpoints {:?}",
        m.differing
    );
    let t = tables.lock();
    assert!(t.compared >= 2 * 40, "compared {} tables", t.compared);
    assert!(
        t.differing.is_empty(),
        "a disk's kv table differed from its memory's at checkpoints {:?}",
        t.differing
    );
    assert_eq!(st.disk_verify_failures, 0);
    assert!(
        st.disk_verified_identical >= 40,
        "{}",
        st.disk_verified_identical
    );
    assert_eq!(st.verify_failures, 0);
    assert!(st.disk_blocks_sent > 0 && st.disk_blocks == 512);
    assert_eq!(stats.lost_acked_writes, 0);
    assert!(stats.acked_writes > 0);
    match mode {
        DiskMirror::Checkpoint => assert_eq!(st.disk_blocks_mirrored, 0),
        DiskMirror::Continuous => assert!(st.disk_blocks_mirrored > 0, "nothing was mirrored"),
    }
}

#[test]
fn kv_disks_are_identical_after_every_checkpoint_and_hold_their_memorys_table() {
    kv_trial(DiskMirror::Checkpoint);
}

#[test]
fn kv_disks_mirrored_continuously_are_identical_after_every_checkpoint() {
    kv_trial(DiskMirror::Continuous);
}

/// Dirty guests writing `rate` blocks per ms on their vCPU threads while the primary mirrors
/// every millisecond: the mirror's reads race with the guest's writes. The disks are compared
/// byte for byte after each of `checkpoints` checkpoints. Returns (compared, blocks mirrored,
/// blocks copied within the pauses).
fn race_trial(rate: u64, checkpoints: u64) -> (usize, u64, u64) {
    let m: Shared<Matcher> = Arc::default();
    let mut sopts = NodeOptions {
        disk_mirror: DiskMirror::Continuous,
        ..NodeOptions::default()
    };
    hooks(&mut sopts, false, &m, None);
    let secondary = spawn_secondary(
        guest(WorkloadKind::Dirty, 2, 1 << 20, 0),
        sopts,
        new_status(),
        |node| node.run(),
    )
    .unwrap();
    let mut popts = NodeOptions {
        policy: CheckpointPolicy {
            min_interval: Duration::from_millis(5),
            max_interval: Duration::from_millis(20),
        },
        disk_mirror: DiskMirror::Continuous,
        disk_mirror_interval: Duration::from_millis(1),
        ..NodeOptions::default()
    };
    hooks(&mut popts, true, &m, None);
    // 256 blocks written at `rate` per ms: every block is rewritten many times per checkpoint,
    // often while a mirror round reads it.
    let mut pguest = guest(WorkloadKind::Dirty, 1, 1 << 20, rate);
    pguest.resume().unwrap();
    let pstatus = new_status();
    let mut primary =
        PrimaryNode::connect(pguest, &secondary.addr, popts, pstatus.clone()).unwrap();
    let deadline = Instant::now() + LIMIT;
    while pstatus.lock().checkpoints < checkpoints {
        assert!(Instant::now() < deadline, "checkpoints too slow");
        primary.step(STEP).unwrap();
    }
    primary.stop_flag().store(true, Ordering::Relaxed);
    primary.run().unwrap();
    drop(primary);
    assert!(matches!(
        secondary.join().unwrap(),
        SecondaryOutcome::Stopped
    ));
    let m = m.lock();
    assert!(
        m.differing.is_empty(),
        "the SVM's disk differed from the PVM's after checkpoints {:?}",
        m.differing
    );
    let st = pstatus.lock();
    (
        m.compared.len(),
        st.disk_blocks_mirrored,
        st.disk_blocks_sent - st.disk_blocks_mirrored,
    )
}

#[test]
fn guest_writes_racing_continuous_mirror_reads_leave_identical_disks_at_every_checkpoint() {
    let (compared, mirrored, tail) = race_trial(40, 60);
    eprintln!("{compared} checkpoints compared; {mirrored} blocks mirrored, {tail} in the pauses");
    assert!(compared >= 60, "compared {compared}");
    assert!(mirrored > 0 && tail > 0, "mirrored {mirrored}, tail {tail}");
}

/// A dirty pair writing disk blocks fast; after `warm` checkpoints compared byte for byte the
/// replication stream (primary → secondary) is cut `cut` bytes later and the secondary takes
/// over. Returns (checkpoints compared, the secondary's state at the cut).
fn cut_trial(seed: u64, cut: u64, mode: DiskMirror) -> Result<(usize, String)> {
    let m: Shared<Matcher> = Arc::default();
    let liveness = Liveness {
        interval: Duration::from_millis(20),
        timeout: Duration::from_secs(2),
        progress_timeout: Duration::from_secs(10),
    };
    let dir = std::env::temp_dir().join(format!(
        "colo-disk-cut-{mode}-{}-{seed}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let simage = dir.join("s.disk");
    let mut sopts = NodeOptions {
        liveness,
        disk_mirror: mode,
        ..NodeOptions::default()
    };
    hooks(&mut sopts, false, &m, None);
    let sguest = {
        let spec = MockSpec {
            ram: 8 << 20,
            ram_file: None,
            workload: WorkloadKind::Dirty,
            vm_seed: seed ^ 7,
            memory_divergence: false,
            output_divergence: 0.0,
            dirty_rate: 20,
        };
        // The SVM writes no blocks of its own (a host knob): after the takeover its image must
        // be the PVM's at the checkpoint it ran from, byte for byte.
        let disk = DiskSpec {
            size: 4 << 20,
            file: Some(simage.clone()),
            ..DiskSpec::default()
        };
        build_with_disk(&spec, &disk)?
    };
    let sstatus = new_status();
    let secondary = spawn_secondary(sguest, sopts, sstatus.clone(), |node| {
        Ok(match node.run()? {
            SecondaryOutcome::Stopped => false,
            SecondaryOutcome::TookOver(mut p) => {
                p.guest().pause()?;
                true
            }
        })
    })?;
    let switch = KillSwitch::new();
    let proxy = FaultProxy::start(secondary.addr.parse()?, switch.clone(), seed)?;
    let mut popts = NodeOptions {
        liveness,
        policy: CheckpointPolicy {
            min_interval: Duration::from_millis(2),
            max_interval: Duration::from_millis(10),
        },
        disk_mirror: mode,
        disk_mirror_interval: Duration::from_millis(1),
        ..NodeOptions::default()
    };
    hooks(&mut popts, true, &m, None);
    let mut pguest = guest(WorkloadKind::Dirty, seed, 4 << 20, 60);
    pguest.resume()?;
    let pstatus = new_status();
    let mut primary =
        PrimaryNode::connect(pguest, &proxy.addr().to_string(), popts, pstatus.clone())?;
    let deadline = Instant::now() + LIMIT;
    while pstatus.lock().checkpoints < 5 {
        anyhow::ensure!(Instant::now() < deadline, "checkpoints too slow");
        primary.step(STEP)?;
    }
    proxy.cut_after(Direction::ToTarget, cut);
    let mut at_cut = String::new();
    while !switch.is_killed() {
        anyhow::ensure!(Instant::now() < deadline, "the cut never came");
        at_cut = sstatus.lock().state.clone();
        primary.step(STEP)?;
    }
    // The primary is "killed": it stops at once, without a word.
    drop(primary);
    let took_over = secondary.join()?;
    anyhow::ensure!(took_over, "the secondary did not take over");
    let m = m.lock();
    anyhow::ensure!(m.differing.is_empty(), "differing: {:?}", m.differing);
    let epoch = m.applied.unwrap_or(0);
    let want = m
        .primary
        .get(&epoch)
        .ok_or_else(|| anyhow::anyhow!("no primary image of checkpoint {epoch}"))?;
    let got = std::fs::read(&simage)?;
    anyhow::ensure!(
        &got == want,
        "seed {seed}: after the takeover the survivor's image is not the PVM's disk at \
         checkpoint {epoch}, the last it applied"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok((m.compared.len(), at_cut))
}

#[test]
fn a_stream_cut_amid_disk_blocks_leaves_the_survivor_the_last_checkpoints_disk() {
    cuts(DiskMirror::Checkpoint);
}

#[test]
fn a_stream_cut_amid_mirrored_blocks_leaves_the_survivor_the_last_checkpoints_disk() {
    cuts(DiskMirror::Continuous);
}

fn cuts(mode: DiskMirror) {
    let mut phases: BTreeMap<String, u32> = BTreeMap::new();
    let mut rng = 0x5EED_u64;
    for seed in 1..=10u64 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Checkpoints carry about 0.5–2 MB of blocks here: offsets up to 4 MB land mostly in
        // the middle of DISK_BLOCKS records.
        let cut = rng % (4 << 20);
        let (compared, phase) = cut_trial(seed, cut, mode).unwrap();
        assert!(compared >= 5, "seed {seed}: compared {compared}");
        *phases.entry(phase).or_default() += 1;
    }
    eprintln!("{mode}: the secondary's state at the cut: {phases:?}");
}

/// The handshake's verdicts on a primary with a disk of `pdisk` bytes and a secondary with
/// `sdisk` (0: none): (the primary's failover reason, the secondary's error).
fn refused(pdisk: u64, sdisk: u64) -> (String, String) {
    let secondary = spawn_secondary(
        guest(WorkloadKind::Kv, 2, sdisk, 0),
        NodeOptions::default(),
        new_status(),
        |node| node.run().map(|_| ()),
    )
    .unwrap();
    let mut pguest = guest(WorkloadKind::Kv, 1, pdisk, 0);
    pguest.resume().unwrap();
    let pstatus = new_status();
    let mut primary = PrimaryNode::connect(
        pguest,
        &secondary.addr,
        NodeOptions::default(),
        pstatus.clone(),
    )
    .unwrap();
    let deadline = Instant::now() + LIMIT;
    while pstatus.lock().failover_reason.is_none() {
        assert!(Instant::now() < deadline, "the primary was not refused");
        primary.step(STEP).unwrap();
    }
    assert!(!pstatus.lock().protected);
    let reason = pstatus.lock().failover_reason.clone().unwrap();
    let err = format!("{:#}", secondary.join().unwrap_err());
    (reason, err)
}

#[test]
fn a_secondary_disk_smaller_than_the_primarys_or_missing_is_refused_at_the_handshake() {
    let (p, s) = refused(4 << 20, 2 << 20);
    for text in [&p, &s] {
        assert!(
            text.contains(
                "the secondary's disk (512 blocks, 2 MiB) is smaller than the primary's (1024 \
                 blocks, 4 MiB)"
            ),
            "{text}"
        );
    }
    let (p, s) = refused(4 << 20, 0);
    for text in [&p, &s] {
        assert!(
            text.contains(
                "the primary has a disk of 1024 blocks (4 MiB) but the secondary has none"
            ),
            "{text}"
        );
    }
}

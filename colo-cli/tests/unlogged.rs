//! Pages written behind the dirty log: a "hypervisor" writes the paused PVM's RAM through the
//! RAM file (as Xen writes a paused domain's `vcpu_info`), which the dirty log never sees. With
//! verification on, the primary's sweep must find and send those pages, so the SVM's memory
//! equals the PVM's byte for byte after every checkpoint; without it the same writes leave the
//! memories different (the check below is able to fail). In production mode (no verification)
//! a hypervisor that writes a fixed set of frames (as Xen writes each vCPU's `vcpu_info`)
//! is matched by the watch set: the first sweeps learn the frames, every capture re-reads them.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_cli::mock::build;
use colo_cli::node::{new_status, NodeOptions, PrimaryNode, SecondaryOutcome};
use colo_cli::testing::spawn_secondary;
use colo_core::backend::PageVisitor;
use colo_core::policy::CheckpointPolicy;
use colo_core::{BackendError, DirtyBitmap, Domain, GuestNic, PAGE_SIZE};
use colo_mock::MockDomain;
use parking_lot::Mutex;

mod common;
use common::{node_options, scaled, spec, Rng};

/// A mock guest whose RAM file someone else writes while the guest is paused: once right after
/// each pause (before the harvest and the capture) and once right before each resume (after
/// the capture), a few bytes of a random page, or of every page of a fixed set (as Xen updates
/// each vCPU's `vcpu_info` whenever it schedules the vCPU).
struct BehindTheLog {
    inner: MockDomain,
    file: std::fs::File,
    rng: Rng,
    writes: u64,
    /// Empty: any page.
    fixed: Vec<u64>,
}

impl BehindTheLog {
    fn scribble(&mut self) {
        if !self.inner.dirty_log_enabled() {
            return;
        }
        let pages = if self.fixed.is_empty() {
            vec![self.rng.range(0, self.inner.page_count() - 1)]
        } else {
            self.fixed.clone()
        };
        for pfn in pages {
            let off = pfn * PAGE_SIZE as u64 + self.rng.range(0, PAGE_SIZE as u64 - 8);
            let bytes = self.rng.next().to_le_bytes();
            self.file
                .write_at(&bytes, off)
                .expect("writing the RAM file");
            self.writes += 1;
        }
    }
}

impl Domain for BehindTheLog {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }
    fn pause(&mut self) -> Result<(), BackendError> {
        self.inner.pause()?;
        self.scribble();
        Ok(())
    }
    fn resume(&mut self) -> Result<(), BackendError> {
        self.scribble();
        self.inner.resume()
    }
    fn is_paused(&self) -> bool {
        self.inner.is_paused()
    }
    fn start_dirty_log(&mut self) -> Result<(), BackendError> {
        self.inner.start_dirty_log()
    }
    fn stop_dirty_log(&mut self) -> Result<(), BackendError> {
        self.inner.stop_dirty_log()
    }
    fn harvest_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.inner.harvest_dirty(into)
    }
    fn peek_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.inner.peek_dirty(into)
    }
    fn read_pages(
        &mut self,
        pfns: &[u64],
        visit: &mut PageVisitor<'_>,
    ) -> Result<(), BackendError> {
        self.inner.read_pages(pfns, visit)
    }
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), BackendError> {
        self.inner.write_pages(pfns, data)
    }
    fn get_state(&mut self, out: &mut Vec<u8>) -> Result<(), BackendError> {
        self.inner.get_state(out)
    }
    fn set_state(&mut self, blob: &[u8]) -> Result<(), BackendError> {
        self.inner.set_state(blob)
    }
}

impl GuestNic for BehindTheLog {
    fn rx_next_seq(&self) -> u64 {
        GuestNic::rx_next_seq(&self.inner)
    }
    fn inject(&mut self, seq: u64, frame: &[u8]) -> Result<bool, BackendError> {
        GuestNic::inject(&mut self.inner, seq, frame)
    }
    fn drain_tx(&mut self, out: &mut dyn FnMut(&[u8])) {
        GuestNic::drain_tx(&mut self.inner, out)
    }
}

type Snapshots = Arc<Mutex<BTreeMap<u64, Vec<u8>>>>;

struct Run {
    checkpoints: u64,
    /// Checkpoints whose snapshots were compared, and those that differed.
    compared: usize,
    differing: Vec<u64>,
    writes: u64,
    verified_identical: u64,
    verify_failures: u64,
    unlogged_pages: u64,
    watched_pages: u64,
    watch_set: u64,
}

/// How the primary looks for pages written behind the log, and where they are written.
#[derive(Clone, Copy)]
struct Mode {
    verify: bool,
    sweeps: u32,
    /// Pages the "hypervisor" writes (None: random pages).
    fixed: Option<&'static [u64]>,
}

fn run(mode: Mode, checkpoints: u64) -> Run {
    let verify = mode.verify;
    let psnap: Snapshots = Arc::default();
    let ssnap: Snapshots = Arc::default();

    let hook = |into: &Snapshots| {
        let into = into.clone();
        Arc::new(move |e, ram: Vec<u8>, _state: Vec<u8>| {
            into.lock().insert(e, ram);
        })
    };
    let sopts = NodeOptions {
        verify,
        snapshot: Some(hook(&ssnap)),
        ..node_options()
    };
    let sguest = build(&spec(2, 4 << 20, 0.0)).unwrap();
    let secondary = spawn_secondary(sguest, sopts, new_status(), |node| node.run()).unwrap();
    let repl = secondary.addr.clone();

    let popts = NodeOptions {
        verify,
        unlogged_sweeps: mode.sweeps,
        snapshot: Some(hook(&psnap)),
        policy: CheckpointPolicy {
            min_interval: Duration::from_millis(1),
            max_interval: Duration::from_millis(5),
        },
        ..node_options()
    };
    let path = PathBuf::from(format!(
        "/dev/shm/colo-test-unlogged-{}-{verify}-{}",
        std::process::id(),
        mode.sweeps
    ));
    let mut pspec = spec(1, 4 << 20, 0.0);
    pspec.ram_file = Some(path.clone());
    let mut inner = build(&pspec).unwrap();
    inner.resume().unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let pguest = BehindTheLog {
        inner,
        file,
        rng: Rng(0x5eed + u64::from(verify)),
        writes: 0,
        fixed: mode.fixed.unwrap_or_default().to_vec(),
    };
    let pstatus = new_status();
    let mut primary = PrimaryNode::connect(pguest, &repl, popts, pstatus.clone()).unwrap();
    let stop = primary.stop_flag();
    let deadline = Instant::now() + scaled(Duration::from_secs(120));
    while pstatus.lock().checkpoints < checkpoints {
        assert!(Instant::now() < deadline, "checkpoints too slow");
        primary.step(Duration::from_micros(500)).unwrap();
    }
    // With verification, the verdict of the last checkpoint arrives with the secondary's next
    // message: step until it is in (the assertions judge the verdicts, this only waits).
    let counted = pstatus.lock().checkpoints;
    let verdicts = |st: &colo_cli::status::NodeStatus| {
        st.verified_identical + st.verify_failures + st.verify_unsettled
    };
    let until = Instant::now() + scaled(Duration::from_secs(2));
    while verify && verdicts(&pstatus.lock()) < counted && Instant::now() < until {
        primary.step(Duration::from_micros(500)).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = primary.guest().writes;
    primary.run().unwrap();
    match secondary.join().unwrap() {
        SecondaryOutcome::Stopped => {}
        SecondaryOutcome::TookOver(_) => panic!("the secondary took over after an orderly stop"),
    }
    let _ = std::fs::remove_file(&path);

    let (p, s) = (psnap.lock(), ssnap.lock());
    let mut compared = 0;
    let mut differing = Vec::new();
    for (epoch, pram) in p.iter() {
        if let Some(sram) = s.get(epoch) {
            compared += 1;
            if pram != sram {
                if differing.is_empty() {
                    let pages: Vec<usize> = (0..pram.len() / PAGE_SIZE)
                        .filter(|&i| {
                            pram[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                                != sram[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                        })
                        .take(8)
                        .collect();
                    eprintln!("checkpoint {epoch}: pages {pages:?} differ");
                }
                differing.push(*epoch);
            }
        }
    }
    let st = pstatus.lock();
    Run {
        checkpoints: st.checkpoints,
        compared,
        differing,
        writes,
        verified_identical: st.verified_identical,
        verify_failures: st.verify_failures,
        unlogged_pages: st.unlogged_pages,
        watched_pages: st.watched_pages,
        watch_set: st.watch_set,
    }
}

#[test]
fn the_verification_sweep_sends_pages_written_behind_the_dirty_log() {
    let r = run(
        Mode {
            verify: true,
            sweeps: 0,
            fixed: None,
        },
        60,
    );
    assert!(r.writes >= 100, "only {} writes behind the log", r.writes);
    assert!(r.compared >= 55, "only {} checkpoints compared", r.compared);
    assert!(
        r.differing.is_empty(),
        "memories differ after checkpoints {:?}",
        r.differing
    );
    assert_eq!(r.verify_failures, 0);
    assert!(
        r.verified_identical + 5 >= r.checkpoints,
        "{} of {} verified identical",
        r.verified_identical,
        r.checkpoints
    );
    // Most scribbles land outside D; each such page is found once.
    assert!(
        r.unlogged_pages >= r.writes / 4,
        "{} pages found for {} writes",
        r.unlogged_pages,
        r.writes
    );
}

#[test]
fn without_the_sweep_writes_behind_the_dirty_log_leave_the_memories_different() {
    let r = run(
        Mode {
            verify: false,
            sweeps: 0,
            fixed: None,
        },
        30,
    );
    assert!(r.writes >= 50);
    assert_eq!(r.unlogged_pages, 0);
    assert!(
        r.differing.len() * 2 >= r.compared,
        "only {} of {} checkpoints differed",
        r.differing.len(),
        r.compared
    );
}

/// Frames the "hypervisor" writes in the fixed-set tests (as Xen writes the `vcpu_info`
/// of several vCPUs).
const XEN_LIKE: &[u64] = &[3, 200, 777];

#[test]
fn production_mode_learns_the_frames_written_behind_the_log_and_stays_exact() {
    let r = run(
        Mode {
            verify: false,
            sweeps: 3,
            fixed: Some(XEN_LIKE),
        },
        40,
    );
    assert!(r.writes >= 60, "only {} writes behind the log", r.writes);
    assert!(r.compared >= 35, "only {} checkpoints compared", r.compared);
    assert!(
        r.differing.is_empty(),
        "memories differ after checkpoints {:?}",
        r.differing
    );
    assert_eq!(r.watch_set, XEN_LIKE.len() as u64, "watch set");
    // After the sweeps every checkpoint carries the frames A ∪ B does not already hold.
    assert!(
        r.watched_pages >= r.checkpoints,
        "{} watched pages carried in {} checkpoints",
        r.watched_pages,
        r.checkpoints
    );
}

#[test]
fn without_sweeps_the_same_fixed_frames_leave_the_memories_different() {
    let r = run(
        Mode {
            verify: false,
            sweeps: 0,
            fixed: Some(XEN_LIKE),
        },
        30,
    );
    assert_eq!(r.watch_set, 0);
    assert!(
        r.differing.len() * 2 >= r.compared,
        "only {} of {} checkpoints differed",
        r.differing.len(),
        r.compared
    );
}

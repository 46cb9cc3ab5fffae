//! Tests of `PvVbdGuest` without Xen: a recording domain and disk device check the order of
//! quiesce/pause and resume/release, colo's written frames in every harvest, and the state
//! trailer from `get_state` to `set_state` (stacked after an inner blob, as on the vif's).

use std::sync::{Arc, Mutex};

use colo_core::{BackendError, DirtyBitmap, Domain, GuestDisk, PageVisitor};

use super::*;

type Log = Arc<Mutex<Vec<String>>>;

fn push(log: &Log, what: impl Into<String>) {
    log.lock().unwrap().push(what.into());
}

struct FakeDom {
    log: Log,
    paused: bool,
    fail_pause: bool,
    state: Vec<u8>,
}

impl Domain for FakeDom {
    fn page_count(&self) -> u64 {
        64
    }
    fn pause(&mut self) -> Result<(), BackendError> {
        push(&self.log, "dom.pause");
        if self.fail_pause {
            return Err(BackendError::BadState {
                op: "pause",
                reason: "injected".into(),
            });
        }
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), BackendError> {
        push(&self.log, "dom.resume");
        self.paused = false;
        Ok(())
    }
    fn is_paused(&self) -> bool {
        self.paused
    }
    fn start_dirty_log(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn stop_dirty_log(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn harvest_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        into.set(3).unwrap();
        Ok(())
    }
    fn peek_dirty(&mut self, _into: &mut DirtyBitmap) -> Result<(), BackendError> {
        Ok(())
    }
    fn read_pages(&mut self, _: &[u64], _: &mut PageVisitor<'_>) -> Result<(), BackendError> {
        Ok(())
    }
    fn write_pages(&mut self, _: &[u64], _: &[u8]) -> Result<(), BackendError> {
        Ok(())
    }
    fn get_state(&mut self, out: &mut Vec<u8>) -> Result<(), BackendError> {
        out.extend_from_slice(&self.state);
        Ok(())
    }
    fn set_state(&mut self, blob: &[u8]) -> Result<(), BackendError> {
        push(&self.log, format!("dom.set_state {}", blob.len()));
        self.state = blob.to_vec();
        Ok(())
    }
}

struct FakeVbd {
    log: Log,
    written: Mutex<Vec<u64>>,
    ring_gfn: u64,
    port: u32,
}

impl ServedDisk for FakeVbd {
    fn quiesce(&self) {
        push(&self.log, "vbd.quiesce");
    }
    fn release(&self) {
        push(&self.log, "vbd.release");
    }
    fn take_written(&self, each: &mut dyn FnMut(u64)) {
        for g in self.written.lock().unwrap().drain(..) {
            each(g);
        }
        each(self.ring_gfn);
    }
    fn export(&self, out: &mut Vec<u8>) {
        VbdTrailer {
            ring_ref: 8,
            port: self.port,
            port_bits: 0,
            grant_frames: &[7; 4096],
        }
        .encode(out);
    }
    fn import(&self, t: &VbdTrailer<'_>) -> Result<(), String> {
        push(&self.log, format!("vbd.import {} {}", t.ring_ref, t.port));
        if t.port != self.port {
            return Err(format!("port {} is not {}", t.port, self.port));
        }
        Ok(())
    }
}

struct NoDisk;

impl GuestDisk for NoDisk {
    fn block_count(&self) -> u64 {
        5
    }
    fn start_write_log(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn harvest_written(&mut self, _: &mut DirtyBitmap) -> Result<(), BackendError> {
        Ok(())
    }
    fn allocated(&mut self, _: &mut DirtyBitmap) -> Result<(), BackendError> {
        Ok(())
    }
    fn read_blocks(&mut self, _: &[u64], _: &mut [u8]) -> Result<(), BackendError> {
        Ok(())
    }
    fn write_blocks(&mut self, _: &[u64], _: &[u8]) -> Result<(), BackendError> {
        Ok(())
    }
    fn reset_overlay(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn merge_overlay(&mut self) -> Result<u64, BackendError> {
        Ok(0)
    }
}

fn guest(log: &Log, port: u32) -> PvVbdGuest<FakeDom, FakeVbd> {
    PvVbdGuest::new(
        FakeDom {
            log: log.clone(),
            paused: false,
            fail_pause: false,
            state: b"inner".to_vec(),
        },
        FakeVbd {
            log: log.clone(),
            written: Mutex::new(vec![40, 41, 40]),
            ring_gfn: 9,
            port,
        },
        Box::new(NoDisk),
    )
}

fn taken(log: &Log) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap())
}

#[test]
fn the_disk_is_quiesced_before_the_pause_and_released_after_the_resume() {
    let log = Log::default();
    let mut g = guest(&log, 5);
    g.pause().unwrap();
    assert!(g.is_paused());
    g.resume().unwrap();
    assert_eq!(
        taken(&log),
        ["vbd.quiesce", "dom.pause", "dom.resume", "vbd.release"]
    );
    // A pause that fails leaves the domain running, and its disk served.
    g.domain().fail_pause = true;
    assert!(g.pause().is_err());
    assert_eq!(taken(&log), ["vbd.quiesce", "dom.pause", "vbd.release"]);
}

#[test]
fn every_harvest_adds_the_frames_colo_wrote_and_the_ring() {
    let log = Log::default();
    let mut g = guest(&log, 5);
    let mut d = DirtyBitmap::new(64);
    g.harvest_dirty(&mut d).unwrap();
    assert_eq!(d.iter().collect::<Vec<_>>(), [3, 9, 40, 41]);
    let mut d = DirtyBitmap::new(64);
    g.harvest_dirty(&mut d).unwrap();
    assert_eq!(
        d.iter().collect::<Vec<_>>(),
        [3, 9],
        "the ring's frame, always"
    );
    // A frame beyond the guest is an error, not a panic.
    g.vbd.written.lock().unwrap().push(64);
    let mut d = DirtyBitmap::new(64);
    assert!(matches!(
        g.harvest_dirty(&mut d),
        Err(BackendError::PfnOutOfRange { pfn: 64, .. })
    ));
}

#[test]
fn the_trailer_goes_from_get_state_to_set_state_and_a_port_mismatch_is_refused() {
    let log = Log::default();
    let (mut pvm, mut svm) = (guest(&log, 5), guest(&log, 5));
    let mut blob = Vec::new();
    pvm.get_state(&mut blob).unwrap();
    svm.set_state(&blob).unwrap();
    assert_eq!(taken(&log), ["dom.set_state 5", "vbd.import 8 5"]);
    assert_eq!(svm.domain().state, b"inner");
    let mut other = guest(&log, 6);
    let e = other.set_state(&blob).unwrap_err().to_string();
    assert!(e.contains("port 5 is not 6"), "{e}");
    // A state without the disk's trailer (a peer without --pv-vbd) is refused by name.
    let e = svm.set_state(b"inner").unwrap_err().to_string();
    assert!(e.contains("--pv-vbd"), "{e}");
    assert_eq!(svm.disk().map(|d| d.block_count()), Some(5));
}

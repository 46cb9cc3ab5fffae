//! A Xen guest whose network device is served by colo itself: [`PvVifGuest`] puts a
//! [`PvVif`] (colo as the backend of the guest's netfront, see `pvnet.rs`) in front of any
//! [`Domain`] and implements colo-core's [`GuestNic`] on it, so the node mirrors, compares and
//! releases the guest's frames exactly as with an AF_PACKET port on a netback vif
//! ([`crate::VifGuest`]) — but with nothing of the device's state outside what a checkpoint
//! carries:
//!
//! - the rings are guest memory; the backend keeps no state beside them (`netif.rs`);
//! - the frames colo writes into the guest (receive buffers, ring answers and event indices)
//!   are added to the dirty set at every harvest, because Xen's log does not see dom0's writes
//!   through a foreign mapping;
//! - [`Domain::get_state`] appends the vif's trailer (`pvstate.rs`): the request number, the
//!   frontend's ring refs and event channel, and the grant frames in use; on the secondary
//!   [`Domain::set_state`] copies those grant frames into the SVM's own grant table and serves
//!   the copied rings from there.
//!
//! Both domains are booted the same way and each gets its vif plugged by its node at start, so
//! the SVM's netfront has bound the same event-channel port as the PVM's (checked at every
//! load, refused by name otherwise).

use colo_core::{
    BackendError, DirtyBitmap, Domain, GuestDisk, GuestNic, OutputSignal, PageVisitor,
    PlatformRecords, Snapshot,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::pvnet::{PvVif, PvVifError};
use crate::pvstate::VifTrailer;

/// A domain and the vif colo serves for it.
#[derive(Debug)]
pub struct PvVifGuest<D> {
    dom: D,
    vif: PvVif,
    rx_seq: u64,
    signal: crossbeam_channel::Receiver<()>,
    stop: Arc<AtomicBool>,
    /// Frames for the guest lost to its own receive buffers (a grant that did not permit
    /// the write); counted as delivered, as a NIC drops what it cannot place.
    pub rx_faults: u64,
    /// Times polling the guest's TX ring failed (the frontend broke the ring).
    pub tx_errors: u64,
}

fn backend_error(e: PvVifError) -> BackendError {
    BackendError::BadState {
        op: "pv-vif",
        reason: e.to_string(),
    }
}

impl<D: Domain> PvVifGuest<D> {
    /// Serves `vif` (already plugged and connected) for `dom`.
    pub fn new(dom: D, vif: PvVif) -> Result<Self, PvVifError> {
        let (signal, stop) = vif.signal()?;
        Ok(Self {
            dom,
            vif,
            rx_seq: 0,
            signal,
            stop,
            rx_faults: 0,
            tx_errors: 0,
        })
    }

    /// The domain behind the vif.
    pub fn domain(&mut self) -> &mut D {
        &mut self.dom
    }

    fn add_written(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        let mut bad = None;
        self.vif.take_written(|g| {
            if into.set(g).is_err() {
                bad = Some(g);
            }
        });
        match bad {
            Some(g) => Err(BackendError::PfnOutOfRange {
                pfn: g,
                pages: into.len(),
            }),
            None => Ok(()),
        }
    }
}

impl<D> Drop for PvVifGuest<D> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl<D: Domain> Domain for PvVifGuest<D> {
    fn page_count(&self) -> u64 {
        self.dom.page_count()
    }
    fn pause(&mut self) -> Result<(), BackendError> {
        self.dom.pause()
    }
    fn resume(&mut self) -> Result<(), BackendError> {
        self.dom.resume()
    }
    fn is_paused(&self) -> bool {
        self.dom.is_paused()
    }
    fn start_dirty_log(&mut self) -> Result<(), BackendError> {
        self.dom.start_dirty_log()
    }
    fn stop_dirty_log(&mut self) -> Result<(), BackendError> {
        self.dom.stop_dirty_log()
    }
    fn harvest_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.dom.harvest_dirty(into)?;
        self.add_written(into)
    }
    fn peek_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.dom.peek_dirty(into)
    }
    fn read_pages(
        &mut self,
        pfns: &[u64],
        visit: &mut PageVisitor<'_>,
    ) -> Result<(), BackendError> {
        self.dom.read_pages(pfns, visit)
    }
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), BackendError> {
        self.dom.write_pages(pfns, data)
    }
    fn get_state(&mut self, out: &mut Vec<u8>) -> Result<(), BackendError> {
        self.dom.get_state(out)?;
        self.vif.export(self.rx_seq, out);
        Ok(())
    }
    fn set_state(&mut self, blob: &[u8]) -> Result<(), BackendError> {
        let (inner, t) = VifTrailer::decode(blob)?;
        self.dom.set_state(inner)?;
        self.vif.import(&t).map_err(backend_error)?;
        self.rx_seq = t.rx_seq;
        Ok(())
    }
    fn disk(&mut self) -> Option<&mut dyn GuestDisk> {
        self.dom.disk()
    }
}

impl<D: Domain> GuestNic for PvVifGuest<D> {
    fn rx_next_seq(&self) -> u64 {
        self.rx_seq
    }

    fn inject(&mut self, seq: u64, frame: &[u8]) -> Result<bool, BackendError> {
        if seq != self.rx_seq {
            return Err(BackendError::BadState {
                op: "inject",
                reason: format!("request {seq} given, the PV vif is at {}", self.rx_seq),
            });
        }
        let (n, faults) = self.vif.deliver(&[frame]).map_err(backend_error)?;
        for f in faults {
            self.rx_faults += 1;
            if self.rx_faults < 10 || self.rx_faults.is_power_of_two() {
                eprintln!(
                    "colo-xen: pv-vif: a frame for the guest was lost: {f} ({} such)",
                    self.rx_faults
                );
            }
        }
        if n == 0 {
            return Ok(false);
        }
        self.rx_seq += 1;
        Ok(true)
    }

    fn drain_tx(&mut self, out: &mut dyn FnMut(&[u8])) {
        if let Err(e) = self.vif.poll_tx(|f| out(f)) {
            self.tx_errors += 1;
            if self.tx_errors < 10 || self.tx_errors.is_power_of_two() {
                eprintln!(
                    "colo-xen: pv-vif: the guest's TX ring: {e} ({} such)",
                    self.tx_errors
                );
            }
        }
    }

    fn output_ready(&self) -> Option<OutputSignal> {
        Some(self.signal.clone())
    }
}

/// The inner domain's platform records (its own state, without the vif's trailer).
impl<D: Snapshot> Snapshot for PvVifGuest<D> {
    fn platform(&mut self) -> Result<PlatformRecords, BackendError> {
        self.dom.platform()
    }
}

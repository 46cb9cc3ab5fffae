//! A Xen guest whose disk is served by colo itself: [`PvVbdGuest`] puts a [`PvVbd`] (colo as
//! the backend of the guest's blkfront, see `pvblk.rs`) in front of any [`Domain`] and hands
//! the node the disk behind it as colo-core's [`GuestDisk`] ([`Domain::disk`]), so the node
//! replicates it exactly as the mock's disk: the write log on the primary, the overlay on the
//! secondary, DISK_BLOCKS with each checkpoint, the overlay kept at a takeover.
//!
//! - [`Domain::pause`] first quiesces the disk's serving thread (a serve in progress finishes,
//!   nothing more reaches guest memory), then pauses the domain; [`Domain::resume`] resumes the
//!   domain, then serves again (what the guest queued meanwhile first). No response is ever
//!   written into guest memory between a pause and the capture that reads it.
//! - the frames colo writes into the guest (READ data, the ring) are added to the dirty set at
//!   every harvest (Xen's log does not see dom0's foreign writes);
//! - [`Domain::get_state`] appends the disk's trailer (`pvblkstate.rs`) after the inner
//!   domain's blob; [`Domain::set_state`] takes it off, loads the inner domain, then serves the
//!   copied ring.
//!
//! It stacks with the vif's wrapper: `PvVbdGuest<PvVifGuest<XenDomain>>` is a guest with both
//! devices (the vif plugged first on both nodes, so that both guests bind the same ports);
//! [`GuestNic`] and [`Snapshot`] are the inner domain's.

use colo_core::{
    BackendError, DirtyBitmap, Domain, GuestDisk, GuestNic, OutputSignal, PageVisitor,
    PlatformRecords, Snapshot,
};

use crate::pvblk::{PvVbd, PvVbdError};
use crate::pvblkstate::VbdTrailer;

/// A domain, the disk colo serves for it, and that disk's store as the node replicates it.
pub struct PvVbdGuest<D> {
    dom: D,
    vbd: PvVbd,
    disk: Box<dyn GuestDisk + Send>,
}

impl<D: std::fmt::Debug> std::fmt::Debug for PvVbdGuest<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvVbdGuest")
            .field("dom", &self.dom)
            .field("vbd", &self.vbd)
            .finish()
    }
}

fn backend_error(e: PvVbdError) -> BackendError {
    BackendError::BadState {
        op: "pv-vbd",
        reason: e.to_string(),
    }
}

impl<D: Domain> PvVbdGuest<D> {
    /// Serves `vbd` (plugged and connected) for `dom`; `disk` is the same store the vbd
    /// serves, as the node's replication sees it.
    pub fn new(dom: D, vbd: PvVbd, disk: Box<dyn GuestDisk + Send>) -> Self {
        Self { dom, vbd, disk }
    }

    /// The domain behind the disk.
    pub fn domain(&mut self) -> &mut D {
        &mut self.dom
    }

    /// The disk device.
    pub fn vbd(&self) -> &PvVbd {
        &self.vbd
    }
}

impl<D: Domain> Domain for PvVbdGuest<D> {
    fn page_count(&self) -> u64 {
        self.dom.page_count()
    }
    fn pause(&mut self) -> Result<(), BackendError> {
        self.vbd.quiesce();
        let r = self.dom.pause();
        if r.is_err() {
            // Still running: keep serving it.
            self.vbd.release();
        }
        r
    }
    fn resume(&mut self) -> Result<(), BackendError> {
        self.dom.resume()?;
        self.vbd.release();
        Ok(())
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
        let mut bad = None;
        self.vbd.take_written(|g| {
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
        self.vbd.export(out);
        Ok(())
    }
    fn set_state(&mut self, blob: &[u8]) -> Result<(), BackendError> {
        let (inner, t) = VbdTrailer::decode(blob)?;
        self.dom.set_state(inner)?;
        self.vbd.import(&t).map_err(backend_error)
    }
    fn disk(&mut self) -> Option<&mut dyn GuestDisk> {
        Some(self.disk.as_mut())
    }
}

/// The inner domain's NIC (a vif colo serves, a netback vif's port, or none).
impl<D: Domain + GuestNic> GuestNic for PvVbdGuest<D> {
    fn rx_next_seq(&self) -> u64 {
        self.dom.rx_next_seq()
    }
    fn inject(&mut self, seq: u64, frame: &[u8]) -> Result<bool, BackendError> {
        self.dom.inject(seq, frame)
    }
    fn drain_tx(&mut self, out: &mut dyn FnMut(&[u8])) {
        self.dom.drain_tx(out)
    }
    fn output_ready(&self) -> Option<OutputSignal> {
        self.dom.output_ready()
    }
}

/// The inner domain's platform records (its own state, without the devices' trailers).
impl<D: Snapshot> Snapshot for PvVbdGuest<D> {
    fn platform(&mut self) -> Result<PlatformRecords, BackendError> {
        self.dom.platform()
    }
}

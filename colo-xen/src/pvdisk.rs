//! A Xen guest whose disk is served by colo itself: [`PvVbdGuest`] puts a `PvVbd` (colo as
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

use crate::pvblkstate::VbdTrailer;

/// What the wrapper needs of the served disk (`PvVbd` on Xen; a recording fake in the tests).
pub trait ServedDisk {
    /// Stops answering the guest; returns once a serve in progress has finished.
    fn quiesce(&self);
    /// Answers the guest again, what it queued meanwhile first.
    fn release(&self);
    /// Hands out every frame written into the guest since the last call (and the ring's).
    fn take_written(&self, each: &mut dyn FnMut(u64));
    /// Appends the disk's trailer to `out`.
    fn export(&self, out: &mut Vec<u8>);
    /// Serves the ring the PVM's trailer names (the domain is paused and loaded).
    fn import(&self, t: &VbdTrailer<'_>) -> Result<(), String>;
}

#[cfg(feature = "xen")]
impl ServedDisk for crate::pvblk::PvVbd {
    fn quiesce(&self) {
        crate::pvblk::PvVbd::quiesce(self)
    }
    fn release(&self) {
        crate::pvblk::PvVbd::release(self)
    }
    fn take_written(&self, each: &mut dyn FnMut(u64)) {
        crate::pvblk::PvVbd::take_written(self, each)
    }
    fn export(&self, out: &mut Vec<u8>) {
        crate::pvblk::PvVbd::export(self, out)
    }
    fn import(&self, t: &VbdTrailer<'_>) -> Result<(), String> {
        crate::pvblk::PvVbd::import(self, t).map_err(|e| e.to_string())
    }
}

/// A domain, the disk colo serves for it (`V`: `PvVbd` on Xen), and that disk's store as the
/// node replicates it.
pub struct PvVbdGuest<D, V> {
    dom: D,
    vbd: V,
    disk: Box<dyn GuestDisk + Send>,
}

impl<D: std::fmt::Debug, V: std::fmt::Debug> std::fmt::Debug for PvVbdGuest<D, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvVbdGuest")
            .field("dom", &self.dom)
            .field("vbd", &self.vbd)
            .finish()
    }
}

impl<D: Domain, V: ServedDisk> PvVbdGuest<D, V> {
    /// Serves `vbd` (plugged and connected) for `dom`; `disk` is the same store the vbd
    /// serves, as the node's replication sees it.
    pub fn new(dom: D, vbd: V, disk: Box<dyn GuestDisk + Send>) -> Self {
        Self { dom, vbd, disk }
    }

    /// The domain behind the disk.
    pub fn domain(&mut self) -> &mut D {
        &mut self.dom
    }

    /// The disk device.
    pub fn vbd(&self) -> &V {
        &self.vbd
    }
}

impl<D: Domain, V: ServedDisk> Domain for PvVbdGuest<D, V> {
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
        self.vbd.take_written(&mut |g| {
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
        self.vbd
            .import(&t)
            .map_err(|reason| BackendError::BadState {
                op: "pv-vbd",
                reason,
            })
    }
    fn disk(&mut self) -> Option<&mut dyn GuestDisk> {
        Some(self.disk.as_mut())
    }
}

/// The inner domain's NIC (a vif colo serves, a netback vif's port, or none).
impl<D: Domain + GuestNic, V: ServedDisk> GuestNic for PvVbdGuest<D, V> {
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
impl<D: Snapshot, V: ServedDisk> Snapshot for PvVbdGuest<D, V> {
    fn platform(&mut self) -> Result<PlatformRecords, BackendError> {
        self.dom.platform()
    }
}

#[cfg(test)]
#[path = "pvdisk_tests.rs"]
mod tests;

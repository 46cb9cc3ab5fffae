//! A guest whose NIC is an AF_PACKET port on its vif: [`VifGuest`] puts a [`PacketPort`] in
//! front of any [`Domain`] (a [`crate::XenDomain`] with `vifD.0`; in the tests, a colo-mock
//! domain beside a veth whose other end is in a network namespace) and implements colo-core's
//! [`GuestNic`] on it.
//!
//! - [`GuestNic::inject`] sends the frame out of the port, towards the guest (netback delivers
//!   it into the guest's RX ring); a full queue answers `Ok(false)`.
//! - [`GuestNic::drain_tx`] reads every frame the guest sent (what the port receives).
//! - The request number: a vif keeps no counter in guest memory, so this value counts the
//!   frames injected and the counter travels with the guest's state: [`Domain::get_state`]
//!   appends it to the inner domain's blob (a trailer: the tag `COLOVIF1` and the number, u64
//!   little-endian), [`Domain::set_state`] takes it off and restores it. A checkpoint (memory
//!   and state) therefore carries it, as colo-core's contract asks; a blob without the trailer
//!   (a peer without `--vif`) is refused, naming why.
//!
//! Frames injected just before a capture may still sit in netback's queue (or the guest's RX
//! ring, unprocessed) when the PVM pauses: the checkpoint counts them as delivered, the PVM
//! processes them after it resumes, and the SVM, loaded from that checkpoint, never sees them.
//! The two replicas differ until the next checkpoint; their outputs' comparison catches what
//! the difference changes (at most a mismatch, hence one early checkpoint). On a failover in
//! that window the frames are lost, as a network may lose frames: the client's TCP retransmits.
//! The same holds for output: a frame the PVM emitted just before the pause may reach dom0
//! after the capture, and is compared in the next epoch.

use colo_core::{
    BackendError, DirtyBitmap, Domain, GuestDisk, GuestNic, OutputSignal, PageVisitor,
    PlatformRecords, Snapshot,
};

use crate::vif::{PacketPort, PortSignal, VifError, MAX_PORT_FRAME};

/// The tag before the request number at the end of a [`VifGuest`]'s state blob.
pub const STATE_TAG: &[u8; 8] = b"COLOVIF1";
const TRAILER: usize = STATE_TAG.len() + 8;

/// A domain and the AF_PACKET port on its vif (see the module docs).
#[derive(Debug)]
pub struct VifGuest<D> {
    dom: D,
    port: PacketPort,
    signal: PortSignal,
    rx_seq: u64,
    buf: Vec<u8>,
    /// Frames the guest sent that were too large to keep whole, or could not be read.
    pub rx_errors: u64,
    /// Frames refused by the interface (too large for its MTU) and dropped.
    pub tx_dropped: u64,
}

impl<D: Domain> VifGuest<D> {
    /// Puts a port on interface `vif` in front of `dom`.
    pub fn new(dom: D, vif: &str) -> Result<Self, VifError> {
        let port = PacketPort::open(vif)?;
        let signal = port.signal()?;
        Ok(Self {
            dom,
            port,
            signal,
            rx_seq: 0,
            buf: vec![0; MAX_PORT_FRAME],
            rx_errors: 0,
            tx_dropped: 0,
        })
    }

    /// The domain behind the port.
    pub fn domain(&mut self) -> &mut D {
        &mut self.dom
    }

    /// The vif's name.
    pub fn vif(&self) -> &str {
        self.port.name()
    }
}

/// Splits a [`VifGuest`]'s state blob into the inner domain's blob and the request number.
pub fn split_state(blob: &[u8]) -> Result<(&[u8], u64), BackendError> {
    let Some(cut) = blob.len().checked_sub(TRAILER) else {
        return Err(BackendError::InvalidState(format!(
            "a {}-byte state is too short to carry the vif's request number (does the peer \
             run with --vif?)",
            blob.len()
        )));
    };
    let (inner, trailer) = blob.split_at(cut);
    let (tag, seq) = trailer.split_at(STATE_TAG.len());
    if tag != STATE_TAG {
        return Err(BackendError::InvalidState(
            "the state carries no vif request number (does the peer run with --vif?)".into(),
        ));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(seq);
    Ok((inner, u64::from_le_bytes(n)))
}

impl<D: Domain> Domain for VifGuest<D> {
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
        self.dom.harvest_dirty(into)
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
        out.extend_from_slice(STATE_TAG);
        out.extend_from_slice(&self.rx_seq.to_le_bytes());
        Ok(())
    }
    fn set_state(&mut self, blob: &[u8]) -> Result<(), BackendError> {
        let (inner, seq) = split_state(blob)?;
        self.dom.set_state(inner)?;
        self.rx_seq = seq;
        Ok(())
    }
    fn disk(&mut self) -> Option<&mut dyn GuestDisk> {
        self.dom.disk()
    }
}

impl<D: Domain> GuestNic for VifGuest<D> {
    fn rx_next_seq(&self) -> u64 {
        self.rx_seq
    }

    fn inject(&mut self, seq: u64, frame: &[u8]) -> Result<bool, BackendError> {
        if seq != self.rx_seq {
            return Err(BackendError::BadState {
                op: "inject",
                reason: format!(
                    "request {seq} given, the vif `{}` is at {}",
                    self.port.name(),
                    self.rx_seq
                ),
            });
        }
        match self.port.send(frame) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(VifError::TooBig { name, len }) => {
                // Counted as delivered and lost, as a switch drops a frame above its MTU.
                self.tx_dropped += 1;
                tracing_free_warn(&format!(
                    "dropped a {len}-byte frame for `{name}`: above MTU"
                ));
            }
            Err(e) => return Err(e.into()),
        }
        self.rx_seq += 1;
        Ok(true)
    }

    fn drain_tx(&mut self, out: &mut dyn FnMut(&[u8])) {
        loop {
            match self.port.recv(&mut self.buf) {
                Ok(Some(n)) => out(&self.buf[..n]),
                Ok(None) => return,
                Err(e) => {
                    self.rx_errors += 1;
                    tracing_free_warn(&e.to_string());
                    if !matches!(e, VifError::TooBig { .. }) {
                        return;
                    }
                }
            }
        }
    }

    fn output_ready(&self) -> Option<OutputSignal> {
        Some(self.signal.receiver().clone())
    }
}

/// colo-xen logs nothing itself (no logging dependency); a dropped or unreadable frame is
/// counted ([`VifGuest::tx_dropped`], [`VifGuest::rx_errors`]) and said on stderr once in a
/// while so it is never silent.
fn tracing_free_warn(msg: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SAID: AtomicU64 = AtomicU64::new(0);
    let n = SAID.fetch_add(1, Ordering::Relaxed);
    if n < 10 || n.is_power_of_two() {
        eprintln!("colo-xen: vif: {msg} ({} such events)", n + 1);
    }
}

/// The inner domain's platform records (its own state, without the vif's trailer).
impl<D: Snapshot> Snapshot for VifGuest<D> {
    fn platform(&mut self) -> Result<PlatformRecords, BackendError> {
        self.dom.platform()
    }
}

//! The backend contract: what colo needs from a hypervisor, written from the caller's side, in
//! one place.
//!
//! - [`Domain`]: one guest's memory, dirty log, pause and vCPU/platform state (a Xen domain, or
//!   a colo-mock VM). The node driver in colo-cli owns it and calls it when a state machine in
//!   [`crate`] asks for an action; colo-core itself never calls a backend. Each method names the
//!   libxenctrl call that colo-xen makes for it, so a Xen engineer can map the trait to the
//!   hypervisor at a glance.
//! - [`GuestNic`]: the guest's network interface, where mirrored client requests go in and the
//!   guest's output comes out (the mock's rings, or an AF_PACKET port on a Xen vif); [`Guest`]
//!   is both, what a node runs. A backend without a network
//!   path implements it as an empty NIC that refuses [`GuestNic::inject`].
//! - [`GuestDisk`]: the guest's disk, when it has one colo replicates: its write log, block
//!   reads and writes, and the SVM's overlay (see [`crate::disk`] for the rule). A domain hands
//!   it out through [`Domain::disk`]; a backend without a replicated disk returns None.
//! - [`Snapshot`]: the platform records (TSC, HVM context, HVM params) that `colo save` writes
//!   beside the pages, as [`PlatformRecords`].
//!
//! Contract shared by all methods: a pfn at or beyond [`Domain::page_count`] is
//! [`BackendError::PfnOutOfRange`], never a panic; no method allocates per page. Backends prove
//! it with `crate::conformance` (feature `conformance`).
//!
//! The one non-`std` type here is the output signal, a crossbeam channel's receiver
//! ([`OutputSignal`]): no IO, but the node loop waits on it together with its other event
//! sources in one `crossbeam_channel::Select`, which a backend-neutral callback could not join
//! without a channel of its own in every backend's output path.

use crate::bitmap::DirtyBitmap;
use crate::stream::TscInfo;

/// Errors a backend reports. Backends map their own errors into these variants.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A system or hypervisor call failed.
    #[error("{op} failed")]
    Os {
        /// The call that failed, e.g. `xc_domain_pause` or `PAGEMAP_SCAN`.
        op: &'static str,
        /// The errno behind it.
        #[source]
        source: std::io::Error,
    },
    /// A pfn at or beyond the guest's page count.
    #[error("pfn {pfn:#x} is beyond the guest's {pages} pages")]
    PfnOutOfRange {
        /// The offending pfn.
        pfn: u64,
        /// The guest's page count.
        pages: u64,
    },
    /// The call does not fit the domain's state (e.g. harvesting while logging is off).
    #[error("{op} is not possible now: {reason}")]
    BadState {
        /// The method called.
        op: &'static str,
        /// Why not.
        reason: String,
    },
    /// The guest or platform cannot do this (e.g. log-dirty on a Xen PV guest).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A vCPU/platform state blob was rejected.
    #[error("invalid vCPU/platform state: {0}")]
    InvalidState(String),
    /// Page data for a write had the wrong size.
    #[error("page data is {got} bytes, {want} expected for {pages} pages")]
    DataLength {
        /// Bytes supplied.
        got: usize,
        /// Bytes expected.
        want: usize,
        /// Pages being written.
        pages: usize,
    },
}

/// The callback of [`Domain::read_pages`]: `(index into pfns, the page or None if unmappable)`.
pub type PageVisitor<'a> = dyn FnMut(usize, Option<&[u8]>) -> Result<(), BackendError> + 'a;

/// One guest, as the checkpoint engine's driver sees it.
///
/// | method | colo-xen (Xen 4.17 libxenctrl) | colo-mock |
/// |---|---|---|
/// | [`page_count`](Domain::page_count) | `xc_domain_maximum_gpfn` + 1 | RAM size / 4096 |
/// | [`pause`](Domain::pause) | `xc_domain_pause` | vCPU threads parked between steps |
/// | [`resume`](Domain::resume) | `xc_domain_unpause` | vCPU threads released |
/// | [`start_dirty_log`](Domain::start_dirty_log) | `xc_shadow_control(ENABLE_LOGDIRTY)` | userfaultfd WP-async register + protect |
/// | [`stop_dirty_log`](Domain::stop_dirty_log) | `xc_shadow_control(OFF)` | unregister |
/// | [`harvest_dirty`](Domain::harvest_dirty) | `xc_logdirty_control(CLEAN)` | `PAGEMAP_SCAN` with WP matching |
/// | [`peek_dirty`](Domain::peek_dirty) | `xc_logdirty_control(PEEK)` | `PAGEMAP_SCAN` without WP |
/// | [`read_pages`](Domain::read_pages) | `xenforeignmemory_map(PROT_READ)`, ≤ 1024 pfns a batch | borrowed slices of the mmap |
/// | [`copy_pages`](Domain::copy_pages) | `read_pages` (the default) | one memcpy per run of consecutive pfns |
/// | [`write_pages`](Domain::write_pages) | `xenforeignmemory_map(PROT_WRITE)` + copy | a memcpy per run, through the host's mapping while the dirty log is on |
/// | [`write_pages_from`](Domain::write_pages_from) | `write_pages` on gathered batches (the default) | a memcpy per page, from where it lies |
/// | [`get_state`](Domain::get_state) | `xc_domain_hvm_getcontext` + HVM params | vCPU registers, clock, RNG |
/// | [`set_state`](Domain::set_state) | `xc_domain_hvm_setcontext` + HVM params | same |
pub trait Domain {
    /// The guest's size in 4 KiB pages; every pfn is below it.
    fn page_count(&self) -> u64;

    /// Stops every vCPU; returns only when none runs, so guest memory no longer changes.
    /// Pausing a paused domain is a no-op.
    fn pause(&mut self) -> Result<(), BackendError>;

    /// Lets the vCPUs run again. Resuming a running domain is a no-op.
    fn resume(&mut self) -> Result<(), BackendError>;

    /// True while the domain is paused by [`Domain::pause`].
    fn is_paused(&self) -> bool;

    /// Starts dirty logging. Every page counts as clean from this moment.
    fn start_dirty_log(&mut self) -> Result<(), BackendError>;

    /// Stops dirty logging.
    fn stop_dirty_log(&mut self) -> Result<(), BackendError>;

    /// ORs the pages written since the last harvest into `into` and clears them in the backend.
    ///
    /// `into` must have [`Domain::page_count`] pages. If the backend fails part-way, every dirty
    /// bit it had already cleared is either in `into` or merged back into the backend's log:
    /// a failed harvest never loses a dirty page.
    fn harvest_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError>;

    /// ORs the pages written since the last harvest into `into` without clearing them.
    fn peek_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError>;

    /// Reads the pages `pfns`, calling `visit(i, page)` for each in order, where `i` is the
    /// index into `pfns` and `page` is the page's 4096 bytes, or `None` if the hypervisor cannot
    /// map it (Xen's XTAB). The slices are borrowed from guest memory where the backend can; they
    /// are only stable while the domain is paused.
    fn read_pages(&mut self, pfns: &[u64], visit: &mut PageVisitor<'_>)
        -> Result<(), BackendError>;

    /// Appends the pages `pfns` to `out` in order: each page's 4096 bytes; a page the
    /// hypervisor cannot map is zero-filled when `present` is None, else left out of `out` and
    /// marked `false` in `present` (which gets one entry per pfn). The copy is stable only
    /// while the domain is paused: it is the primary's capture, the hot path of the pause.
    ///
    /// The default goes through [`Domain::read_pages`], a callback per page; a backend that
    /// maps guest memory copies each run of consecutive pfns with one memcpy instead.
    fn copy_pages(
        &mut self,
        pfns: &[u64],
        out: &mut Vec<u8>,
        mut present: Option<&mut Vec<bool>>,
    ) -> Result<(), BackendError> {
        out.reserve(pfns.len() * crate::PAGE_SIZE);
        let mut next = 0;
        self.read_pages(pfns, &mut |i, page| {
            if i != next {
                return Err(BackendError::BadState {
                    op: "read_pages",
                    reason: format!("page {i} delivered out of order"),
                });
            }
            next += 1;
            match page {
                Some(p) if p.len() == crate::PAGE_SIZE => out.extend_from_slice(p),
                Some(p) => {
                    return Err(BackendError::DataLength {
                        got: p.len(),
                        want: crate::PAGE_SIZE,
                        pages: 1,
                    })
                }
                None if present.is_none() => out.resize(out.len() + crate::PAGE_SIZE, 0),
                None => {}
            }
            if let Some(v) = present.as_deref_mut() {
                v.push(page.is_some());
            }
            Ok(())
        })?;
        if next != pfns.len() {
            return Err(BackendError::BadState {
                op: "read_pages",
                reason: format!("{next} of {} pages delivered", pfns.len()),
            });
        }
        Ok(())
    }

    /// Writes `data` (exactly `pfns.len()` × 4096 bytes, the pages in `pfns` order) into guest
    /// memory. Only called while the domain is paused.
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), BackendError>;

    /// [`Domain::write_pages`] with the pages wherever they lie: page `i` of `pfns` is
    /// `page(i)` (4096 bytes). The secondary applies a checkpoint's pages this way, straight
    /// from the buffers they were received in. Only called while the domain is paused.
    ///
    /// The default gathers batches of up to 1024 pages into one buffer (allocated once per
    /// call) and calls [`Domain::write_pages`] for each; a backend that maps guest memory
    /// copies each page in directly instead.
    fn write_pages_from<'d>(
        &mut self,
        pfns: &[u64],
        page: &mut dyn FnMut(usize) -> &'d [u8],
    ) -> Result<(), BackendError> {
        const BATCH: usize = 1024;
        let mut buf = Vec::with_capacity(pfns.len().min(BATCH) * crate::PAGE_SIZE);
        for (n, batch) in pfns.chunks(BATCH).enumerate() {
            buf.clear();
            for i in n * BATCH..n * BATCH + batch.len() {
                buf.extend_from_slice(page(i));
            }
            self.write_pages(batch, &buf)?;
        }
        Ok(())
    }

    /// Appends the vCPU/platform state, an opaque blob, to `out`.
    fn get_state(&mut self, out: &mut Vec<u8>) -> Result<(), BackendError>;

    /// Replaces the vCPU/platform state with a blob from [`Domain::get_state`] of a domain of
    /// the same shape. Only called while the domain is paused.
    fn set_state(&mut self, blob: &[u8]) -> Result<(), BackendError>;

    /// The guest's disk, if it has one that colo replicates. The default: none (the guest's
    /// storage, if any, is not replicated, and the handshake says so: the peer's must be none
    /// too).
    fn disk(&mut self) -> Option<&mut dyn GuestDisk> {
        None
    }
}

/// A guest's disk as the node sees it: an image of [`GuestDisk::block_count`] blocks of
/// [`crate::disk::BLOCK_SIZE`] bytes that the guest reads and writes, with a write log (the
/// primary) and an overlay (the secondary). The rule these calls serve is in [`crate::disk`].
///
/// Contract: a block at or beyond [`GuestDisk::block_count`] is
/// [`BackendError::PfnOutOfRange`] (naming the block), never a panic; data lengths are whole
/// blocks ([`BackendError::DataLength`] otherwise); the guest's own FLUSH / FUA requests are
/// honoured by the backend (`fdatasync` of the image) before it reports their completion.
///
/// | method | colo-mock | colo-xen |
/// |---|---|---|
/// | [`block_count`](GuestDisk::block_count) | `--disk` size / 4096 | `--pv-vbd` image size / 4096 (`PvVbdGuest`: colo-mock's disk behind colo's blkif backend, so as the mock below); a bare `XenDomain` has none |
/// | [`start_write_log`](GuestDisk::start_write_log) | clear the written-block bitmap | - |
/// | [`harvest_written`](GuestDisk::harvest_written) | swap the bitmap's words with 0 | - |
/// | [`allocated`](GuestDisk::allocated) | `lseek(SEEK_DATA/SEEK_HOLE)` on the image | - |
/// | [`read_blocks`](GuestDisk::read_blocks) | overlay, then `pread` of the image | - |
/// | [`write_blocks`](GuestDisk::write_blocks) | `pwrite` into the image | - |
/// | [`reset_overlay`](GuestDisk::reset_overlay) | drop the in-memory overlay | - |
/// | [`merge_overlay`](GuestDisk::merge_overlay) | `pwrite` the overlay, `fdatasync` | - |
pub trait GuestDisk {
    /// The disk's size in blocks; every block number is below it.
    fn block_count(&self) -> u64;

    /// Starts the write log: every block counts as unwritten from this moment, and each block
    /// the guest writes to the image from now on is marked (a write into the overlay is not:
    /// it never reaches the image).
    fn start_write_log(&mut self) -> Result<(), BackendError>;

    /// ORs the blocks the guest wrote to the image since the last harvest into `into` (of
    /// [`GuestDisk::block_count`] bits) and clears them in the backend.
    fn harvest_written(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError>;

    /// ORs every block of the image that may hold data (everything but holes) into `into`: what
    /// an initial synchronisation must send.
    fn allocated(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError>;

    /// Reads `blocks` as the guest sees them (the overlay first, then the image) into `out`,
    /// exactly `blocks.len()` × 4096 bytes, in order. Callable while the guest runs (a block
    /// read while the guest writes it may be torn; that write marks it for the next harvest).
    fn read_blocks(&mut self, blocks: &[u64], out: &mut [u8]) -> Result<(), BackendError>;

    /// Writes `data` (exactly `blocks.len()` × 4096 bytes, in `blocks` order; a later copy of a
    /// block wins) into the image, not the overlay, unlogged (a checkpoint's apply, or the
    /// initial synchronisation). Only called while the guest is paused.
    fn write_blocks(&mut self, blocks: &[u64], data: &[u8]) -> Result<(), BackendError>;

    /// Drops the overlay (the SVM's writes since the last checkpoint) and sends the guest's
    /// writes from now on to a fresh one: a checkpoint was applied. Only while paused.
    fn reset_overlay(&mut self) -> Result<(), BackendError>;

    /// Keeps the overlay: writes it into the image, syncs the image, and sends the guest's
    /// writes to the image from now on (a takeover). Returns the blocks merged; 0 without an
    /// overlay.
    fn merge_overlay(&mut self) -> Result<u64, BackendError>;
}

/// A message arrives on it whenever the guest emitted output since the last message was taken
/// (a bounded channel of one: many frames, one wake-up). See [`GuestNic::output_ready`].
pub type OutputSignal = crossbeam_channel::Receiver<()>;

/// A guest's network interface as the node sees it. Two implementations: colo-mock's vif
/// rings (`MockDomain`), and an AF_PACKET port on a Xen guest's vif in dom0 (colo-xen's
/// `VifGuest`, which puts the port in front of any [`Domain`]); a backend without a network path
/// implements it as an empty NIC that refuses [`GuestNic::inject`]. The node, the comparator path
/// and the tests do not know which one runs.
///
/// Contract (`crate::conformance` checks it): requests are numbered; the next number the
/// guest expects is guest state, carried by a checkpoint: a restore of memory and state
/// ([`Domain::write_pages`] + [`Domain::set_state`]) restores it. Where it lives is the
/// backend's business: the mock keeps it in guest memory (its ring's index); a vif keeps no
/// counter the guest could hold, so `VifGuest` counts the frames injected and appends the
/// count to the state blob ([`Domain::get_state`]), taking it off again in
/// [`Domain::set_state`]. [`GuestNic::inject`] takes exactly that number and moves it on by
/// one, or answers `Ok(false)` (ring or queue full) and changes nothing; every frame the guest
/// emits is handed out once, in order.
///
/// Frames injected into the PVM just before a capture: a ring in guest memory holds them in
/// the checkpoint; a vif's netback may still hold them when the PVM pauses, so the checkpoint
/// counts them as delivered while only the PVM processes them (after it resumes). The SVM
/// misses them; the comparison of outputs catches what that changes (one early checkpoint at
/// most), and a failover in that window loses them as a network may (TCP retransmits).
pub trait GuestNic {
    /// Sequence number of the next request the guest expects (guest state: a checkpoint
    /// carries it, in guest memory or in the state blob).
    fn rx_next_seq(&self) -> u64;
    /// Gives request `seq` to the guest; `Ok(false)` when its ring is full. A `seq` other than
    /// [`GuestNic::rx_next_seq`] is an error; a NIC without a network path answers
    /// [`BackendError::Unsupported`].
    fn inject(&mut self, seq: u64, frame: &[u8]) -> Result<bool, BackendError>;
    /// Hands every frame the guest emitted since the last call to `out`, in order.
    fn drain_tx(&mut self, out: &mut dyn FnMut(&[u8]));
    /// A channel holding a message whenever the guest emitted output since the last message
    /// was taken, so the node loop can sleep until then. None (a guest without the signal, or
    /// without a NIC): the loop looks for output whenever it wakes, at least every 100 ms.
    fn output_ready(&self) -> Option<OutputSignal> {
        None
    }
}

/// What a node needs from its guest: memory, dirty log, state, and the NIC.
pub trait Guest: Domain + GuestNic {}
impl<T: Domain + GuestNic> Guest for T {}

/// The platform records of a saved guest (`colo save`): X86_TSC_INFO, HVM_CONTEXT and
/// HVM_PARAMS of a libxc stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformRecords {
    /// Body of X86_TSC_INFO.
    pub tsc: TscInfo,
    /// Body of HVM_CONTEXT (never empty: Xen's verifier rejects an empty context).
    pub hvm_context: Vec<u8>,
    /// Entries of HVM_PARAMS, (index, value).
    pub hvm_params: Vec<(u64, u64)>,
}

impl PlatformRecords {
    /// The records for an opaque backend state blob (the mock's): the blob as HVM_CONTEXT, a
    /// placeholder TSC and no HVM params.
    pub fn opaque(blob: Vec<u8>) -> Result<Self, BackendError> {
        if blob.is_empty() {
            return Err(BackendError::InvalidState(
                "the backend returned an empty vCPU state".into(),
            ));
        }
        Ok(Self {
            tsc: TscInfo {
                mode: 0,
                khz: 1_000_000,
                nsec: 0,
                incarnation: 0,
            },
            hvm_context: blob,
            hvm_params: Vec::new(),
        })
    }
}

/// A guest that `colo save` (and a node's `--save-on-exit`) can write as a libxc stream: its
/// pages through [`Domain::read_pages`], and its platform records from here.
pub trait Snapshot: Domain {
    /// The stream's platform records for the guest's current state (guest paused).
    fn platform(&mut self) -> Result<PlatformRecords, BackendError>;
}

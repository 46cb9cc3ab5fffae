//! [`XenDomain`]: colo-core's [`Domain`] on one Xen domain, written against the [`XcApi`] seam.
//!
//! Everything here is plain Rust: pfn range checks, batching of foreign mappings, log-dirty
//! buffer conversion and merge-back, the state blob. The C calls are behind [`XcApi`].

use colo_core::backend::PageVisitor;
use colo_core::{BackendError, DirtyBitmap, Domain, PAGE_SIZE};

use crate::api::{dominf, pfinfo, DomInfo, LogDirtyOp, ShadowOp, XcApi, MAX_BATCH};
use crate::error::XenError;
use crate::state::{encode_state, XenState, SAVED_HVM_PARAMS};

/// One Xen HVM/PVH domain under colo's control.
///
/// Owns the libxenctrl and libxenforeignmemory handles (closed on drop), the log-dirty
/// hypercall buffer (allocated once at open) and all per-call scratch, so no method allocates
/// per page.
///
/// * Pausing is tracked: [`Domain::pause`] pauses once, [`Domain::resume`] undoes only that.
///   A domain that is already paused when opened (e.g. `xl create -p`) counts as paused by
///   this handle, so `resume` unpauses it.
/// * The page count is fixed at open (`xc_domain_maximum_gpfn` + 1).
/// * Dropping the handle turns log-dirty off if this handle turned it on; it does not change
///   whether the domain runs.
pub struct XenDomain {
    api: Box<dyn XcApi + Send>,
    domid: u32,
    pages: u64,
    paused: bool,
    logging: bool,
    /// `set_state` ran since the last resume: wake the vCPUs on resume.
    restored: bool,
    /// Loaded vLAPICs whose upcall vector was pending and cleared for the wake (diagnostics).
    vectors_cleared: u64,
    /// The guest's timer VIRQ ports (found once, on the first wake).
    timer_ports: Option<Vec<u32>>,
    /// Wakes that raised the timer VIRQ (diagnostics).
    timers_raised: u64,
    wake_vector: Option<u8>,
    /// Bits Xen already cleared that no caller has received yet (a failed harvest).
    pending: DirtyBitmap,
    errs: Vec<i32>,
    types: Vec<u64>,
    with_data: Vec<u64>,
    with_data_at: Vec<usize>,
    ctx: Vec<u8>,
}

impl std::fmt::Debug for XenDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenDomain")
            .field("domid", &self.domid)
            .field("pages", &self.pages)
            .field("paused", &self.paused)
            .field("logging", &self.logging)
            .finish()
    }
}

impl XenDomain {
    /// Opens domain `domid` through the real libraries.
    ///
    /// Refuses PV guests ([`XenError::PvGuest`]), HVM guests without HAP, dying domains and
    /// missing ones.
    #[cfg(feature = "xen")]
    pub fn open(domid: u32) -> Result<Self, XenError> {
        let api = crate::sys::RealXc::open()?;
        Self::with_api(Box::new(api), domid)
    }

    /// Opens `domid` through any [`XcApi`] (the fake in tests).
    pub(crate) fn with_api(mut api: Box<dyn XcApi + Send>, domid: u32) -> Result<Self, XenError> {
        let info = api.domain_info(domid)?.ok_or(XenError::NoSuchDomain {
            op: "xc_domain_getinfolist",
            domid,
        })?;
        check_info(domid, &info)?;
        let max_gpfn = api.maximum_gpfn(domid)?;
        let pages = max_gpfn.checked_add(1).ok_or(XenError::Protocol {
            op: "xc_domain_maximum_gpfn",
            detail: format!("maximum gpfn {max_gpfn:#x}"),
        })?;
        // 2^52 pfns is the architectural limit (52-bit physical addresses).
        if pages > 1 << 40 {
            return Err(XenError::Protocol {
                op: "xc_domain_maximum_gpfn",
                detail: format!("{pages} pages is beyond any supported guest"),
            });
        }
        api.alloc_dirty_buffer(DirtyBitmap::xen_bytes_len(pages))?;
        Ok(XenDomain {
            api,
            domid,
            pages,
            paused: info.flags & dominf::PAUSED != 0,
            logging: false,
            restored: false,
            vectors_cleared: 0,
            timer_ports: None,
            timers_raised: 0,
            wake_vector: None,
            pending: DirtyBitmap::new(pages),
            errs: vec![0; MAX_BATCH],
            types: vec![0; MAX_BATCH],
            with_data: Vec::with_capacity(MAX_BATCH),
            with_data_at: Vec::with_capacity(MAX_BATCH),
            ctx: Vec::new(),
        })
    }

    /// The domain id.
    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// Fresh domain information from Xen.
    pub fn info(&mut self) -> Result<DomInfo, XenError> {
        self.api
            .domain_info(self.domid)?
            .ok_or(XenError::NoSuchDomain {
                op: "xc_domain_getinfolist",
                domid: self.domid,
            })
    }

    fn check_pfns(&self, pfns: &[u64]) -> Result<(), XenError> {
        match pfns.iter().find(|&&p| p >= self.pages) {
            Some(&pfn) => Err(XenError::PfnOutOfRange {
                pfn,
                pages: self.pages,
            }),
            None => Ok(()),
        }
    }

    fn check_len(&self, op: &'static str, into: &DirtyBitmap) -> Result<(), XenError> {
        if !self.logging {
            return Err(XenError::BadState {
                op,
                reason: "dirty logging is off".into(),
            });
        }
        if into.len() != self.pages {
            return Err(XenError::BadState {
                op,
                reason: format!(
                    "bitmap has {} pages, domain {} has {}",
                    into.len(),
                    self.domid,
                    self.pages
                ),
            });
        }
        Ok(())
    }

    fn require_paused(&self, op: &'static str) -> Result<(), XenError> {
        if self.paused {
            Ok(())
        } else {
            Err(XenError::BadState {
                op,
                reason: format!("domain {} is running; pause it first", self.domid),
            })
        }
    }

    fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<(), XenError> {
        self.check_len("harvest_dirty", into)?;
        self.api.dirty_buffer().fill(0);
        let res = self
            .api
            .logdirty_control(self.domid, LogDirtyOp::Clean, self.pages);
        if let Err(e) = res {
            // Xen may have cleared (and copied out) part of the log before failing.
            self.pending.or_xen_prefix(self.api.dirty_buffer());
            return Err(e);
        }
        if let Err(e) = into.or_xen_bytes(self.api.dirty_buffer()) {
            self.pending.or_xen_prefix(self.api.dirty_buffer());
            return Err(e.into());
        }
        if self.pending.count() != 0 {
            into.union_with(&self.pending)?;
            self.pending.clear_all();
        }
        Ok(())
    }

    fn peek(&mut self, into: &mut DirtyBitmap) -> Result<(), XenError> {
        self.check_len("peek_dirty", into)?;
        self.api.dirty_buffer().fill(0);
        self.api
            .logdirty_control(self.domid, LogDirtyOp::Peek, self.pages)?;
        into.or_xen_bytes(self.api.dirty_buffer())?;
        into.union_with(&self.pending)?;
        Ok(())
    }

    fn start_log(&mut self) -> Result<(), XenError> {
        if self.logging {
            // Already on: "clean from this moment" means dropping what was logged so far.
            self.api.dirty_buffer().fill(0);
            self.api
                .logdirty_control(self.domid, LogDirtyOp::Clean, self.pages)?;
        } else {
            match self
                .api
                .shadow_control(self.domid, ShadowOp::EnableLogDirty)
            {
                Ok(()) => {}
                // EINVAL: log-dirty was left on (e.g. by a crashed run); restart it.
                Err(e) if e.errno() == Some(libc::EINVAL) => {
                    self.api.shadow_control(self.domid, ShadowOp::Off)?;
                    self.api
                        .shadow_control(self.domid, ShadowOp::EnableLogDirty)?;
                }
                Err(XenError::NotSupported { .. }) => {
                    return Err(XenError::NotSupported {
                        op: "xc_shadow_control(ENABLE_LOGDIRTY)",
                        domid: self.domid,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        self.logging = true;
        self.pending.clear_all();
        Ok(())
    }

    fn stop_log(&mut self) -> Result<(), XenError> {
        if self.logging {
            self.api.shadow_control(self.domid, ShadowOp::Off)?;
            self.logging = false;
            self.pending.clear_all();
        }
        Ok(())
    }

    fn read(&mut self, pfns: &[u64], visit: &mut PageVisitor<'_>) -> Result<(), XenError> {
        self.check_pfns(pfns)?;
        let mut base = 0;
        for chunk in pfns.chunks(MAX_BATCH) {
            // Like libxc's saver: ask Xen which pages hold data, map only those (mapping a
            // hole costs as much as mapping a page), report the others as unmappable.
            let types = &mut self.types[..chunk.len()];
            self.api.pfn_types(self.domid, chunk, types)?;
            self.with_data.clear();
            self.with_data_at.clear();
            for (j, (&pfn, &t)) in chunk.iter().zip(types.iter()).enumerate() {
                if pfinfo::has_data(t) {
                    self.with_data.push(pfn);
                    self.with_data_at.push(j);
                }
            }
            // Visit in pfns order: holes before each mapped page, then the page.
            let mut next = 0;
            let at = &self.with_data_at;
            let errs = &mut self.errs[..self.with_data.len()];
            errs.fill(0);
            self.api
                .map_read(self.domid, &self.with_data, errs, &mut |k, page| {
                    let j = at[k];
                    while next < j {
                        visit(base + next, None).map_err(XenError::Visit)?;
                        next += 1;
                    }
                    next = j + 1;
                    visit(base + j, page.ok()).map_err(XenError::Visit)
                })?;
            let start = self.with_data_at.last().map_or(0, |&j| j + 1);
            for j in start..chunk.len() {
                visit(base + j, None).map_err(XenError::Visit)?;
            }
            base += chunk.len();
        }
        Ok(())
    }

    fn write(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), XenError> {
        self.require_paused("write_pages")?;
        let want = pfns.len().saturating_mul(PAGE_SIZE);
        if data.len() != want {
            return Err(XenError::DataLength {
                got: data.len(),
                want,
                pages: pfns.len(),
            });
        }
        self.check_pfns(pfns)?;
        let domid = self.domid;
        for (chunk, chunk_data) in pfns
            .chunks(MAX_BATCH)
            .zip(data.chunks(MAX_BATCH * PAGE_SIZE))
        {
            let errs = &mut self.errs[..chunk.len()];
            errs.fill(0);
            self.api
                .map_write(domid, chunk, errs, &mut |j, page| match page {
                    Ok(dst) => {
                        let src = &chunk_data[j * PAGE_SIZE..(j + 1) * PAGE_SIZE];
                        dst.copy_from_slice(src);
                        Ok(())
                    }
                    Err(errno) => Err(XenError::PageUnmappable {
                        domid,
                        pfn: chunk[j],
                        source: std::io::Error::from_raw_os_error(errno),
                    }),
                })?;
        }
        Ok(())
    }

    fn get(&mut self, out: &mut Vec<u8>) -> Result<(), XenError> {
        let tsc = self.api.tsc_info_get(self.domid)?;
        let size = self.api.hvm_context_size(self.domid)?;
        if size == 0 || size > crate::state::MAX_HVM_CONTEXT {
            return Err(XenError::Protocol {
                op: "xc_domain_hvm_getcontext",
                detail: format!("context size {size}"),
            });
        }
        self.ctx.clear();
        self.ctx.resize(size, 0);
        let got = self.api.hvm_get_context(self.domid, &mut self.ctx)?;
        if got == 0 || got > size {
            return Err(XenError::Protocol {
                op: "xc_domain_hvm_getcontext",
                detail: format!("wrote {got} bytes into a {size}-byte buffer"),
            });
        }
        let mut params = [(0u32, 0u64); SAVED_HVM_PARAMS.len()];
        let mut n = 0;
        for index in SAVED_HVM_PARAMS {
            let value = self.api.hvm_param_get(self.domid, index)?;
            // Like libxc's saver, zero-valued params are not recorded.
            if value != 0 {
                params[n] = (index, value);
                n += 1;
            }
        }
        encode_state(out, &tsc, &self.ctx[..got], &params[..n])?;
        Ok(())
    }

    fn set(&mut self, blob: &[u8]) -> Result<(), XenError> {
        self.require_paused("set_state")?;
        let state = XenState::decode(blob)?;
        self.api.tsc_info_set(self.domid, &state.tsc)?;
        for (index, value) in state.params() {
            // Several params may only be set once; set only what differs.
            if self.api.hvm_param_get(self.domid, index)? != value {
                self.api.hvm_param_set(self.domid, index, value)?;
            }
        }
        self.ctx.clear();
        self.ctx.extend_from_slice(state.hvm_context);
        // The wake that follows must find the upcall vector not yet pending, or it does not
        // kick a halted vCPU (see `clear_pending_vector`); it sets the bit again.
        if let Some(v) = self.upcall_vector()? {
            self.vectors_cleared += crate::state::clear_pending_vector(&mut self.ctx, v) as u64;
        }
        self.api.hvm_set_context(self.domid, &mut self.ctx)?;
        self.restored = true;
        Ok(())
    }

    /// The vector to deliver after `set_state` when the guest registered its event upcall
    /// per vCPU (`HVMOP_set_evtchn_upcall_vector`, which Xen does not expose) rather than in
    /// `HVM_PARAM_CALLBACK_IRQ`; Linux ≥ 6.0 on Xen ≥ 4.17 does that, with vector `0xf3`.
    /// Default `None`: nothing is delivered then. (Measured on Xen 4.17 with Linux 6.1: the
    /// wake alone did not keep a secondary running; see the crate docs.)
    pub fn set_wake_vector(&mut self, vector: Option<u8>) {
        self.wake_vector = vector;
    }

    /// How many loaded vLAPICs had the upcall vector pending, cleared so that the wake after
    /// the load kicks a halted vCPU (see [`crate::state::clear_pending_vector`]).
    pub fn vectors_cleared(&self) -> u64 {
        self.vectors_cleared
    }

    /// A raw HVM parameter (`xc_hvm_param_get`), for diagnostics.
    pub fn hvm_param(&mut self, index: u32) -> Result<u64, XenError> {
        self.api.hvm_param_get(self.domid, index)
    }

    /// After `set_state`, a vCPU may still be blocked inside Xen (it was idle when paused)
    /// while the restored memory holds pending events: Xen wakes a blocked vCPU only when an
    /// event *becomes* pending. [`XenDomain::wake`] unblocks them.
    ///
    /// The timer VIRQs are raised only when an upcall follows. A pending bit that no upcall
    /// delivers is worse than none: Xen sets a port's bit and raises the upcall only if the bit
    /// was clear (`evtchn_2l_set_pending`), so every later timer event of that port would be
    /// dropped, and an idle guest would never run again (seen on Xen 4.17: the selftest, which
    /// loaded a domain's own state without a wake vector, left the guest silent after tick 6).
    fn wake_restored(&mut self) -> Result<(), XenError> {
        if self.upcall_vector()?.is_none() {
            return Ok(());
        }
        self.raise_timer_virqs()?;
        self.wake().map(|_| ())
    }

    /// How many wakes raised the timer VIRQ (see [`XenDomain::raise_timer_virqs`]).
    pub fn timers_raised(&self) -> u64 {
        self.timers_raised
    }

    /// The guest's ports bound to VIRQ_TIMER, found once by asking Xen about every port
    /// until the first one past the domain's last.
    fn find_timer_ports(&mut self) -> Vec<u32> {
        let mut ports = Vec::new();
        for port in 1..MAX_EVTCHN_2L {
            match self.api.evtchn_status(self.domid, port) {
                Ok(st) if st.status == EVTCHNSTAT_VIRQ && st.virq == VIRQ_TIMER => ports.push(port),
                Ok(_) => {}
                // Past the domain's last port (Xen allocates them from 1 upwards).
                Err(_) => break,
            }
        }
        ports
    }

    /// Marks the guest's timer VIRQ pending in its shared-info page, so that the upcall the
    /// wake delivers runs the guest's timer interrupt, which programs the next timer event in
    /// *this* domain's Xen. A replica loaded from a checkpoint holds the primary's idea of its
    /// next timer: its kernel believes the one-shot timer armed (in the primary's Xen), while
    /// this Xen has none armed, so an idle replica would block forever (seen on Xen 4.17: vCPU
    /// blocked, no event pending, no timer). Linux checks the timer port first on every upcall
    /// (`evtchn_2l_handle_events`), so no selector bit is needed. Returns how many ports were
    /// raised (0 when the guest has no timer VIRQ or no shared-info page mapped yet).
    pub fn raise_timer_virqs(&mut self) -> Result<usize, XenError> {
        // Taken out and put back: no allocation per loaded checkpoint.
        let ports = match self.timer_ports.take() {
            Some(p) => p,
            None => self.find_timer_ports(),
        };
        let res = self.raise_ports(&ports);
        self.timer_ports = Some(ports);
        res
    }

    fn raise_ports(&mut self, ports: &[u32]) -> Result<usize, XenError> {
        if ports.is_empty() {
            return Ok(0);
        }
        let gfn = self.info()?.shared_info_frame;
        if gfn >= self.pages {
            return Ok(0);
        }
        let mut errs = [0i32; 1];
        let mut raised = 0;
        let domid = self.domid;
        self.api
            .map_write(self.domid, &[gfn], &mut errs, &mut |_, page| {
                let page = page.map_err(|errno| {
                    XenError::from_errno("xenforeignmemory_map(shared_info)", domid, errno)
                })?;
                for &port in ports {
                    let bit = port as usize % 64;
                    let at = SHINFO_EVTCHN_PENDING + (port as usize / 64) * 8 + bit / 8;
                    let Some(byte) = page.get_mut(at) else {
                        continue;
                    };
                    // SAFETY: `byte` is a valid, exclusively borrowed u8 of the mapped page;
                    // AtomicU8 has u8's size and alignment. The OR is atomic (a locked
                    // instruction) because Xen sets other bits of the same word concurrently.
                    let a = unsafe { std::sync::atomic::AtomicU8::from_ptr(byte) };
                    a.fetch_or(1 << (bit % 8), std::sync::atomic::Ordering::SeqCst);
                    raised += 1;
                }
                Ok(())
            })?;
        self.timers_raised += 1;
        Ok(raised)
    }

    /// The guest's event-channel upcall vector: `HVM_PARAM_CALLBACK_IRQ` if it holds a vector,
    /// else [`XenDomain::set_wake_vector`]'s.
    fn upcall_vector(&mut self) -> Result<Option<u8>, XenError> {
        const CALLBACK_IRQ: u32 = 0;
        const TYPE_VECTOR: u64 = 2;
        let via = self.api.hvm_param_get(self.domid, CALLBACK_IRQ)?;
        Ok(if via >> 56 == TYPE_VECTOR {
            Some((via & 0xff) as u8)
        } else {
            self.wake_vector
        })
    }

    /// Delivers the guest's own event-channel upcall vector (`HVM_PARAM_CALLBACK_IRQ` if it
    /// holds one, else [`XenDomain::set_wake_vector`]) as an MSI to every vCPU; the guest's
    /// upcall handler then scans for whatever is pending (and finds nothing, harmlessly, if
    /// nothing is). Used after a restore and when a replica takes over: event bits the copied
    /// memory shows pending make Xen skip the upcall for new events on that word. Returns
    /// whether a vector was known (nothing is delivered otherwise).
    pub fn wake(&mut self) -> Result<bool, XenError> {
        let Some(vector) = self.upcall_vector()? else {
            return Ok(false);
        };
        let vector = u32::from(vector);
        let max_vcpu = self.info()?.max_vcpu_id;
        for vcpu in 0..=u64::from(max_vcpu) {
            // Xen numbers vLAPIC ids vcpu_id * 2; fixed delivery, physical destination.
            let addr = 0xFEE0_0000 | ((vcpu * 2) & 0xff) << 12;
            self.api.inject_msi(self.domid, addr, vector)?;
        }
        Ok(true)
    }
}

/// Ports of the 2-level event-channel ABI (64-bit guests).
const MAX_EVTCHN_2L: u32 = 4096;
/// `EVTCHNSTAT_virq` (public/event_channel.h).
const EVTCHNSTAT_VIRQ: u32 = 4;
/// `VIRQ_TIMER` (public/xen.h).
const VIRQ_TIMER: u32 = 0;
/// Offset of `evtchn_pending[]` in a 64-bit guest's shared-info page, after the 32 legacy
/// 64-byte `vcpu_info` slots.
const SHINFO_EVTCHN_PENDING: usize = 32 * 64;

fn check_info(domid: u32, info: &DomInfo) -> Result<(), XenError> {
    if info.domid != domid {
        return Err(XenError::NoSuchDomain {
            op: "xc_domain_getinfolist",
            domid,
        });
    }
    if info.flags & dominf::DYING != 0 {
        return Err(XenError::Dying { domid });
    }
    if info.flags & dominf::HVM_GUEST == 0 {
        return Err(XenError::PvGuest { domid });
    }
    if info.flags & dominf::HAP == 0 {
        return Err(XenError::NoHap { domid });
    }
    Ok(())
}

impl Drop for XenDomain {
    fn drop(&mut self) {
        if self.logging {
            // Best effort: a domain left in log-dirty mode runs slower; the next open's
            // start_dirty_log copes with it either way.
            let _ = self.api.shadow_control(self.domid, ShadowOp::Off);
        }
    }
}

impl Domain for XenDomain {
    fn page_count(&self) -> u64 {
        self.pages
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        if !self.paused {
            self.api.pause(self.domid)?;
            self.paused = true;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        // The wake goes in while the domain is still paused: the injected vector kicks a
        // vCPU that was halted (Xen clears its blocked flag), so it runs once unpaused.
        if self.restored {
            self.restored = false;
            self.wake_restored()?;
        }
        if self.paused {
            self.api.unpause(self.domid)?;
            self.paused = false;
        }
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    fn start_dirty_log(&mut self) -> Result<(), BackendError> {
        Ok(self.start_log()?)
    }

    fn stop_dirty_log(&mut self) -> Result<(), BackendError> {
        Ok(self.stop_log()?)
    }

    fn harvest_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        Ok(self.harvest(into)?)
    }

    fn peek_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        Ok(self.peek(into)?)
    }

    fn read_pages(
        &mut self,
        pfns: &[u64],
        visit: &mut PageVisitor<'_>,
    ) -> Result<(), BackendError> {
        Ok(self.read(pfns, visit)?)
    }

    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), BackendError> {
        Ok(self.write(pfns, data)?)
    }

    fn get_state(&mut self, out: &mut Vec<u8>) -> Result<(), BackendError> {
        Ok(self.get(out)?)
    }

    fn set_state(&mut self, blob: &[u8]) -> Result<(), BackendError> {
        Ok(self.set(blob)?)
    }

    /// A bare domain has no disk colo replicates: a disk behind xen-blkback does not pass
    /// through colo. The disk colo serves itself (`--pv-vbd`) is `crate::PvVbdGuest`'s, which
    /// wraps this domain; without it a Xen node offers no disk at the handshake (HELLO's disk
    /// size 0) and a peer with a disk is refused there.
    fn disk(&mut self) -> Option<&mut dyn colo_core::GuestDisk> {
        None
    }
}

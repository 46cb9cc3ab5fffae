//! An in-memory fake of the libxenctrl/libxenforeignmemory calls ([`XcApi`]), for unit tests.
//!
//! A test keeps a [`FakeHandle`] to the shared state to dirty guest pages, inject errnos and
//! inspect what colo-xen asked for (e.g. the size of every foreign-mapping batch).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use colo_core::{DirtyBitmap, PAGE_SIZE};

use crate::api::{
    dominf, pfinfo, DomInfo, EvtchnStatus, LogDirtyOp, ReadPage, ShadowOp, WritePage, XcApi,
};
use crate::error::XenError;
use crate::state::TscInfo;

/// The fake hypervisor's state for one domain.
#[derive(Debug)]
pub(crate) struct FakeState {
    pub domid: u32,
    pub flags: u32,
    pub pages: u64,
    pub memory: Vec<u8>,
    /// Pfns Xen reports as XTAB (no page).
    pub unmappable: HashSet<u64>,
    /// Pfns with a page that nevertheless fail to map (per-page error from the map call).
    pub map_fails: HashSet<u64>,
    /// Pfns asked about with `pfn_types`, in order.
    pub typed: usize,
    pub logdirty: bool,
    pub dirty: DirtyBitmap,
    pub pause_count: u32,
    /// Sizes of every map_read/map_write call, in order.
    pub map_batches: Vec<usize>,
    /// Next call of the named op fails with this errno.
    pub fail: HashMap<&'static str, i32>,
    /// The next CLEAN clears every bit but copies out only the first N bytes, then fails.
    pub clean_partial_then_fail: Option<usize>,
    /// The dirty buffer (as seen by both sides) is this many bytes too short.
    pub short_buffer: usize,
    pub hvm_context: Vec<u8>,
    pub params: HashMap<u32, u64>,
    pub param_sets: Vec<(u32, u64)>,
    /// MSIs injected, as (address, data).
    pub msis: Vec<(u64, u32)>,
    /// Event channels by port (index 0 is port 0); a port past the end is an error.
    pub ports: Vec<EvtchnStatus>,
    /// The gfn `domain_info` reports for the shared-info page.
    pub shared_info_frame: u64,
    /// MSIs injected while the domain was paused.
    pub msis_while_paused: usize,
    pub max_vcpu_id: u32,
    pub tsc: TscInfo,
}

/// Shared handle to the fake's state.
#[derive(Debug, Clone)]
pub(crate) struct FakeHandle(Arc<Mutex<FakeState>>);

impl FakeHandle {
    pub fn new(domid: u32, pages: u64) -> Self {
        let mut memory = vec![0u8; pages as usize * PAGE_SIZE];
        for (i, page) in memory.chunks_mut(PAGE_SIZE).enumerate() {
            page[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
        FakeHandle(Arc::new(Mutex::new(FakeState {
            domid,
            flags: dominf::HVM_GUEST | dominf::HAP,
            pages,
            memory,
            unmappable: HashSet::new(),
            map_fails: HashSet::new(),
            typed: 0,
            logdirty: false,
            dirty: DirtyBitmap::new(pages),
            pause_count: 0,
            map_batches: Vec::new(),
            fail: HashMap::new(),
            clean_partial_then_fail: None,
            short_buffer: 0,
            hvm_context: vec![0xAB; 1000],
            params: HashMap::from([(1, 0xfeffc), (17, 0xfeffd)]),
            param_sets: Vec::new(),
            msis: Vec::new(),
            ports: Vec::new(),
            shared_info_frame: u64::MAX,
            msis_while_paused: 0,
            max_vcpu_id: 0,
            tsc: TscInfo {
                mode: 0,
                khz: 2_400_000,
                elapsed_nsec: 123,
                incarnation: 1,
            },
        })))
    }

    pub fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn api(&self) -> Box<FakeXc> {
        Box::new(FakeXc {
            state: self.clone(),
            buffer: Vec::new(),
        })
    }

    /// A guest write: changes the page and marks it dirty if logging.
    pub fn guest_write(&self, pfn: u64, byte: u8) {
        let mut s = self.lock();
        let at = pfn as usize * PAGE_SIZE + 100;
        s.memory[at] = byte;
        if s.logdirty {
            let _ = s.dirty.set(pfn);
        }
    }
}

/// The fake [`XcApi`].
#[derive(Debug)]
pub(crate) struct FakeXc {
    state: FakeHandle,
    /// The "hypercall buffer".
    buffer: Vec<u8>,
}

fn check(s: &mut FakeState, op: &'static str, domid: u32) -> Result<(), XenError> {
    if domid != s.domid {
        return Err(XenError::from_errno(op, domid, libc::ESRCH));
    }
    match s.fail.remove(op) {
        Some(errno) => Err(XenError::from_errno(op, domid, errno)),
        None => Ok(()),
    }
}

impl FakeXc {
    fn map(
        &mut self,
        domid: u32,
        op: &'static str,
        pfns: &[u64],
        errs: &mut [i32],
        each: &mut dyn FnMut(usize, WritePage<'_>) -> Result<(), XenError>,
    ) -> Result<(), XenError> {
        let mut s = self.state.lock();
        check(&mut s, op, domid)?;
        assert!(
            pfns.len() <= crate::api::MAX_BATCH,
            "batch of {}",
            pfns.len()
        );
        s.map_batches.push(pfns.len());
        for (j, &pfn) in pfns.iter().enumerate() {
            errs[j] = if pfn >= s.pages || s.unmappable.contains(&pfn) || s.map_fails.contains(&pfn)
            {
                -libc::EINVAL
            } else {
                0
            };
        }
        let st = &mut *s;
        for (j, &pfn) in pfns.iter().enumerate() {
            if errs[j] == 0 {
                let at = pfn as usize * PAGE_SIZE;
                each(j, Ok(&mut st.memory[at..at + PAGE_SIZE]))?;
            } else {
                each(j, Err(-errs[j]))?;
            }
        }
        Ok(())
    }
}

impl XcApi for FakeXc {
    fn domain_info(&mut self, domid: u32) -> Result<Option<DomInfo>, XenError> {
        let mut s = self.state.lock();
        if let Some(errno) = s.fail.remove("xc_domain_getinfolist") {
            return Err(XenError::from_errno("xc_domain_getinfolist", domid, errno));
        }
        if domid != s.domid {
            return Ok(None);
        }
        let paused = if s.pause_count > 0 { dominf::PAUSED } else { 0 };
        Ok(Some(DomInfo {
            domid,
            flags: s.flags | paused,
            max_vcpu_id: s.max_vcpu_id,
            tot_pages: s.pages,
            shared_info_frame: s.shared_info_frame,
        }))
    }

    fn evtchn_status(&mut self, domid: u32, port: u32) -> Result<EvtchnStatus, XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_evtchn_status", domid)?;
        match s.ports.get(port as usize) {
            Some(&st) => Ok(st),
            None => Err(XenError::from_errno(
                "xc_evtchn_status",
                domid,
                libc::EINVAL,
            )),
        }
    }

    fn maximum_gpfn(&mut self, domid: u32) -> Result<u64, XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_domain_maximum_gpfn", domid)?;
        Ok(s.pages - 1)
    }

    fn pause(&mut self, domid: u32) -> Result<(), XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_domain_pause", domid)?;
        s.pause_count += 1;
        Ok(())
    }

    fn unpause(&mut self, domid: u32) -> Result<(), XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_domain_unpause", domid)?;
        if s.pause_count == 0 {
            return Err(XenError::from_errno(
                "xc_domain_unpause",
                domid,
                libc::EINVAL,
            ));
        }
        s.pause_count -= 1;
        Ok(())
    }

    fn shadow_control(&mut self, domid: u32, op: ShadowOp) -> Result<(), XenError> {
        let mut s = self.state.lock();
        let name = match op {
            ShadowOp::Off => "xc_shadow_control(OFF)",
            ShadowOp::EnableLogDirty => "xc_shadow_control(ENABLE_LOGDIRTY)",
        };
        check(&mut s, name, domid)?;
        match op {
            ShadowOp::Off => {
                s.logdirty = false;
                s.dirty.clear_all();
            }
            ShadowOp::EnableLogDirty => {
                if s.logdirty {
                    return Err(XenError::from_errno(name, domid, libc::EINVAL));
                }
                s.logdirty = true;
                s.dirty.clear_all();
            }
        }
        Ok(())
    }

    fn alloc_dirty_buffer(&mut self, bytes: usize) -> Result<(), XenError> {
        self.buffer = vec![0; bytes];
        Ok(())
    }

    fn dirty_buffer(&mut self) -> &mut [u8] {
        let short = self.state.lock().short_buffer;
        let n = self.buffer.len().saturating_sub(short);
        &mut self.buffer[..n]
    }

    fn logdirty_control(
        &mut self,
        domid: u32,
        op: LogDirtyOp,
        pages: u64,
    ) -> Result<u64, XenError> {
        let mut s = self.state.lock();
        check(&mut s, op.name(), domid)?;
        if !s.logdirty {
            return Err(XenError::from_errno(op.name(), domid, libc::EINVAL));
        }
        let bytes = s.dirty.to_xen_bytes();
        let usable = self.buffer.len().saturating_sub(s.short_buffer);
        let n = bytes.len().min(usable).min(pages.div_ceil(8) as usize);
        if op == LogDirtyOp::Clean {
            if let Some(k) = s.clean_partial_then_fail.take() {
                let k = k.min(n);
                self.buffer[..k].copy_from_slice(&bytes[..k]);
                s.dirty.clear_all();
                return Err(XenError::from_errno(op.name(), domid, libc::EFAULT));
            }
        }
        self.buffer[..n].copy_from_slice(&bytes[..n]);
        if op == LogDirtyOp::Clean {
            s.dirty.clear_all();
        }
        Ok(pages.min(s.pages))
    }

    fn pfn_types(&mut self, domid: u32, pfns: &[u64], types: &mut [u64]) -> Result<(), XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_get_pfn_type_batch", domid)?;
        assert!(
            pfns.len() <= crate::api::MAX_BATCH,
            "batch of {}",
            pfns.len()
        );
        s.typed += pfns.len();
        for (t, p) in types.iter_mut().zip(pfns) {
            *t = if *p >= s.pages || s.unmappable.contains(p) {
                pfinfo::XTAB
            } else {
                0
            };
        }
        Ok(())
    }

    fn map_read(
        &mut self,
        domid: u32,
        pfns: &[u64],
        errs: &mut [i32],
        each: &mut dyn FnMut(usize, ReadPage<'_>) -> Result<(), XenError>,
    ) -> Result<(), XenError> {
        self.map(domid, "xenforeignmemory_map", pfns, errs, &mut |j, p| {
            each(j, p.map(|p| &*p))
        })
    }

    fn map_write(
        &mut self,
        domid: u32,
        pfns: &[u64],
        errs: &mut [i32],
        each: &mut dyn FnMut(usize, WritePage<'_>) -> Result<(), XenError>,
    ) -> Result<(), XenError> {
        self.map(domid, "xenforeignmemory_map", pfns, errs, each)
    }

    fn hvm_context_size(&mut self, domid: u32) -> Result<usize, XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_domain_hvm_getcontext(size)", domid)?;
        Ok(s.hvm_context.len())
    }

    fn hvm_get_context(&mut self, domid: u32, buf: &mut [u8]) -> Result<usize, XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_domain_hvm_getcontext", domid)?;
        let n = s.hvm_context.len();
        if buf.len() < n {
            return Err(XenError::from_errno(
                "xc_domain_hvm_getcontext",
                domid,
                libc::ENOSPC,
            ));
        }
        buf[..n].copy_from_slice(&s.hvm_context);
        Ok(n)
    }

    fn hvm_set_context(&mut self, domid: u32, buf: &mut [u8]) -> Result<(), XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_domain_hvm_setcontext", domid)?;
        s.hvm_context = buf.to_vec();
        Ok(())
    }

    fn hvm_param_get(&mut self, domid: u32, index: u32) -> Result<u64, XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_hvm_param_get", domid)?;
        Ok(s.params.get(&index).copied().unwrap_or(0))
    }

    fn hvm_param_set(&mut self, domid: u32, index: u32, value: u64) -> Result<(), XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_hvm_param_set", domid)?;
        s.params.insert(index, value);
        s.param_sets.push((index, value));
        Ok(())
    }

    fn inject_msi(&mut self, domid: u32, addr: u64, data: u32) -> Result<(), XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xendevicemodel_inject_msi", domid)?;
        s.msis.push((addr, data));
        if s.pause_count > 0 {
            s.msis_while_paused += 1;
        }
        Ok(())
    }

    fn tsc_info_get(&mut self, domid: u32) -> Result<TscInfo, XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_domain_get_tsc_info", domid)?;
        Ok(s.tsc)
    }

    fn tsc_info_set(&mut self, domid: u32, tsc: &TscInfo) -> Result<(), XenError> {
        let mut s = self.state.lock();
        check(&mut s, "xc_domain_set_tsc_info", domid)?;
        s.tsc = *tsc;
        Ok(())
    }
}

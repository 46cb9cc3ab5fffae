//! The seam between colo-xen's logic and the C libraries: the [`XcApi`] trait, one method per
//! libxenctrl/libxenforeignmemory call colo-xen makes, with safe Rust signatures.
//!
//! `crate::sys::RealXc` implements it over FFI (feature `xen`); `crate::fake::FakeXc`
//! implements it in memory for the unit tests, so batching, bitmap conversion, per-page errors,
//! errno mapping and merge-back are tested on any machine.

use crate::error::XenError;
use crate::state::TscInfo;

/// Most pfns mapped by one `xenforeignmemory_map` call (libxc's saver uses the same batch).
pub const MAX_BATCH: usize = 1024;

/// `XEN_DOMINF_*` flags of `xc_domaininfo_t` (Xen public `domctl.h`).
pub mod dominf {
    /// The domain is being destroyed.
    pub const DYING: u32 = 1 << 0;
    /// HVM or PVH guest (not PV).
    pub const HVM_GUEST: u32 = 1 << 1;
    /// The domain has shut down.
    pub const SHUTDOWN: u32 = 1 << 2;
    /// The domain is paused by the toolstack.
    pub const PAUSED: u32 = 1 << 3;
    /// Hardware-assisted paging is in use.
    pub const HAP: u32 = 1 << 8;
}

/// `XEN_DOMCTL_SHADOW_OP_*` codes for `xc_shadow_control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOp {
    /// Turn log-dirty (and any shadow mode) off.
    Off = 0,
    /// Turn log-dirty mode on.
    EnableLogDirty = 2,
}

/// `XEN_DOMCTL_SHADOW_OP_*` codes for `xc_logdirty_control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDirtyOp {
    /// Read and clear the dirty bitmap.
    Clean = 11,
    /// Read the dirty bitmap without clearing it.
    Peek = 12,
}

impl LogDirtyOp {
    /// The C name of the operation, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            LogDirtyOp::Clean => "xc_logdirty_control(CLEAN)",
            LogDirtyOp::Peek => "xc_logdirty_control(PEEK)",
        }
    }
}

/// Page types from `xc_get_pfn_type_batch` (`XEN_DOMCTL_PFINFO_*` >> 28) that carry no data:
/// libxc's saver sends these without contents, and colo-xen reports them as unmappable.
pub mod pfinfo {
    /// Broken (poisoned) page.
    pub const BROKEN: u64 = 0xd;
    /// Allocated but not yet populated.
    pub const XALLOC: u64 = 0xe;
    /// Invalid: no page at this pfn.
    pub const XTAB: u64 = 0xf;

    /// True if a page of this type has contents to read.
    pub fn has_data(t: u64) -> bool {
        !matches!(t, BROKEN | XALLOC | XTAB)
    }
}

/// What colo-xen needs from `xc_domaininfo_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomInfo {
    /// The domain's id.
    pub domid: u32,
    /// `XEN_DOMINF_*` flags, see [`dominf`].
    pub flags: u32,
    /// Highest vCPU id.
    pub max_vcpu_id: u32,
    /// Pages currently allocated to the domain.
    pub tot_pages: u64,
    /// Where the guest mapped its shared-info page: a gfn for HVM/PVH guests (meaningless
    /// before the guest mapped it; check it against the page count).
    pub shared_info_frame: u64,
}

/// An event channel's binding, from `xc_evtchn_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvtchnStatus {
    /// `EVTCHNSTAT_*`: 0 closed, 1 unbound, 2 interdomain, 3 pirq, 4 virq, 5 ipi.
    pub status: u32,
    /// The vCPU the port notifies.
    pub vcpu: u32,
    /// The VIRQ number when `status` is 4 (virq).
    pub virq: u32,
}

/// One page of a foreign mapping handed to a visitor: the page's bytes, or the positive errno
/// `xenforeignmemory_map` reported for it.
pub type ReadPage<'a> = Result<&'a [u8], i32>;
/// A writable page of a foreign mapping, or the positive errno reported for it.
pub type WritePage<'a> = Result<&'a mut [u8], i32>;

/// The libxenctrl/libxenforeignmemory calls colo-xen makes. Errors are already mapped with
/// [`XenError::from_errno`].
pub trait XcApi {
    /// `xc_domain_getinfolist(domid, 1)`; `None` if no domain has that id.
    fn domain_info(&mut self, domid: u32) -> Result<Option<DomInfo>, XenError>;
    /// `xc_domain_maximum_gpfn`.
    fn maximum_gpfn(&mut self, domid: u32) -> Result<u64, XenError>;
    /// `xc_domain_pause`.
    fn pause(&mut self, domid: u32) -> Result<(), XenError>;
    /// `xc_domain_unpause`.
    fn unpause(&mut self, domid: u32) -> Result<(), XenError>;
    /// `xc_evtchn_status` of `port` in `domid`; an error past the domain's last port.
    fn evtchn_status(&mut self, domid: u32, port: u32) -> Result<EvtchnStatus, XenError>;
    /// `xc_shadow_control(op)`.
    fn shadow_control(&mut self, domid: u32, op: ShadowOp) -> Result<(), XenError>;
    /// Allocates (once) the hypercall-safe buffer for at least `bytes` bytes of log-dirty bitmap
    /// (`xc__hypercall_buffer_alloc_pages`).
    fn alloc_dirty_buffer(&mut self, bytes: usize) -> Result<(), XenError>;
    /// The log-dirty buffer; empty before [`XcApi::alloc_dirty_buffer`].
    fn dirty_buffer(&mut self) -> &mut [u8];
    /// `xc_logdirty_control(op)` for `pages` pfns into the dirty buffer; returns the page count
    /// Xen reports. On failure the buffer may hold the bits Xen copied out before failing.
    fn logdirty_control(&mut self, domid: u32, op: LogDirtyOp, pages: u64)
        -> Result<u64, XenError>;
    /// `xc_get_pfn_type_batch` (`XEN_DOMCTL_getpageframeinfo3`) for `pfns` (≤ [`MAX_BATCH`]):
    /// writes each page's type, see [`pfinfo`], into `types[..pfns.len()]`.
    fn pfn_types(&mut self, domid: u32, pfns: &[u64], types: &mut [u64]) -> Result<(), XenError>;
    /// Maps `pfns` (≤ [`MAX_BATCH`]) read-only, calls `each(j, page)` for every `j` in order,
    /// unmaps. `errs` is scratch of at least `pfns.len()` entries.
    fn map_read(
        &mut self,
        domid: u32,
        pfns: &[u64],
        errs: &mut [i32],
        each: &mut dyn FnMut(usize, ReadPage<'_>) -> Result<(), XenError>,
    ) -> Result<(), XenError>;
    /// Like [`XcApi::map_read`] with a writable mapping.
    fn map_write(
        &mut self,
        domid: u32,
        pfns: &[u64],
        errs: &mut [i32],
        each: &mut dyn FnMut(usize, WritePage<'_>) -> Result<(), XenError>,
    ) -> Result<(), XenError>;
    /// `xc_domain_hvm_getcontext(NULL, 0)`: the size of the HVM context.
    fn hvm_context_size(&mut self, domid: u32) -> Result<usize, XenError>;
    /// `xc_domain_hvm_getcontext` into `buf`; returns the bytes written.
    fn hvm_get_context(&mut self, domid: u32, buf: &mut [u8]) -> Result<usize, XenError>;
    /// `xc_domain_hvm_setcontext` from `buf` (the C API takes a mutable pointer).
    fn hvm_set_context(&mut self, domid: u32, buf: &mut [u8]) -> Result<(), XenError>;
    /// `xc_hvm_param_get`.
    fn hvm_param_get(&mut self, domid: u32, index: u32) -> Result<u64, XenError>;
    /// `xc_hvm_param_set`.
    fn hvm_param_set(&mut self, domid: u32, index: u32, value: u64) -> Result<(), XenError>;
    /// `xendevicemodel_inject_msi`: delivers an MSI (`addr`, `data`) to the domain's LAPICs,
    /// which wakes a vCPU blocked in Xen.
    fn inject_msi(&mut self, domid: u32, addr: u64, data: u32) -> Result<(), XenError>;
    /// `xc_domain_get_tsc_info`.
    fn tsc_info_get(&mut self, domid: u32) -> Result<TscInfo, XenError>;
    /// `xc_domain_set_tsc_info`.
    fn tsc_info_set(&mut self, domid: u32, tsc: &TscInfo) -> Result<(), XenError>;
}

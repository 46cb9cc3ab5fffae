//! The real [`XcApi`]: libxenctrl through `xenctrl-sys` and libxenforeignmemory declared here.
//! Every FFI call is made once, in this file, with its `// SAFETY:` argument.
//!
//! ABI: Xen 4.17 (`libxenctrl.so.4.17`, `libxenforeignmemory.so.1`); see the crate docs.

use std::ffi::{c_int, c_uint, c_void};
use std::ptr::NonNull;

use xenctrl_sys as xc;

use crate::api::{DomInfo, EvtchnStatus, LogDirtyOp, ReadPage, ShadowOp, WritePage, XcApi};
use crate::error::XenError;
use crate::state::TscInfo;

const PAGE: usize = colo_core::PAGE_SIZE;

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("colo-xen's `xen` feature supports x86_64 Linux dom0 only");

/// Opaque `xenforeignmemory_handle`.
#[repr(C)]
struct XfmHandle {
    _opaque: [u8; 0],
}

// Exported by libxenctrl.so.4.17 (symbol version VERS_4.17.0) but declared only in its private
// header, so bindgen does not see it; libxc's own saver uses it to skip pages without data.
#[link(name = "xenctrl")]
extern "C" {
    fn xc_get_pfn_type_batch(
        xch: *mut xc::xc_interface,
        dom: u32,
        num: c_uint,
        arr: *mut xc::xen_pfn_t,
    ) -> c_int;
}

/// Opaque `xendevicemodel_handle`.
#[repr(C)]
struct DmHandle {
    _opaque: [u8; 0],
}

#[link(name = "xendevicemodel")]
extern "C" {
    fn xendevicemodel_open(logger: *mut c_void, open_flags: c_uint) -> *mut DmHandle;
    fn xendevicemodel_close(dmod: *mut DmHandle) -> c_int;
    fn xendevicemodel_inject_msi(dmod: *mut DmHandle, domid: u16, addr: u64, data: u32) -> c_int;
}

#[link(name = "xenforeignmemory")]
extern "C" {
    fn xenforeignmemory_open(logger: *mut c_void, open_flags: c_uint) -> *mut XfmHandle;
    fn xenforeignmemory_close(fmem: *mut XfmHandle) -> c_int;
    fn xenforeignmemory_map(
        fmem: *mut XfmHandle,
        dom: u32,
        prot: c_int,
        pages: usize,
        arr: *const xc::xen_pfn_t,
        err: *mut c_int,
    ) -> *mut c_void;
    fn xenforeignmemory_unmap(fmem: *mut XfmHandle, addr: *mut c_void, pages: usize) -> c_int;
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn fail(op: &'static str, domid: u32) -> XenError {
    XenError::from_errno(op, domid, errno())
}

/// libxenctrl + libxenforeignmemory handles and the log-dirty hypercall buffer.
pub(crate) struct RealXc {
    xch: NonNull<xc::xc_interface>,
    fmem: NonNull<XfmHandle>,
    /// libxendevicemodel, opened on first use.
    dmod: Option<NonNull<DmHandle>>,
    /// `hbuf.hbuf` is the hypercall buffer once allocated, `hbuf_pages` pages long.
    hbuf: xc::xc_hypercall_buffer,
    hbuf_pages: c_int,
    hbuf_bytes: usize,
}

// SAFETY: the handles are plain heap objects of libxenctrl/libxenforeignmemory, usable from any
// thread as long as calls are not concurrent; RealXc owns them exclusively and every method
// takes `&mut self`, so moving it to another thread cannot produce concurrent calls.
unsafe impl Send for RealXc {}

/// Unmaps a foreign mapping when dropped, so a visitor's error cannot leak it.
struct Mapping {
    fmem: NonNull<XfmHandle>,
    addr: NonNull<u8>,
    pages: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr` was returned by xenforeignmemory_map on `fmem` for exactly `pages`
        // pages, is unmapped only here, and no slice into it outlives this guard (the visitor
        // borrows pages only inside `map_with`'s loop, which ends before the guard drops).
        unsafe {
            xenforeignmemory_unmap(self.fmem.as_ptr(), self.addr.as_ptr().cast(), self.pages);
        }
    }
}

impl RealXc {
    /// Opens both libraries.
    pub(crate) fn open() -> Result<Self, XenError> {
        // SAFETY: NULL loggers select the libraries' default stderr logger; flags 0 is the
        // documented default. The result is checked for NULL.
        let xch = unsafe { xc::xc_interface_open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        let xch = NonNull::new(xch).ok_or_else(|| XenError::Open {
            lib: "xc_interface_open",
            source: std::io::Error::last_os_error(),
        })?;
        // SAFETY: as above, for libxenforeignmemory.
        let fmem = unsafe { xenforeignmemory_open(std::ptr::null_mut(), 0) };
        let Some(fmem) = NonNull::new(fmem) else {
            let source = std::io::Error::last_os_error();
            // SAFETY: xch was opened above, is not used again, and is closed exactly once.
            unsafe { xc::xc_interface_close(xch.as_ptr()) };
            return Err(XenError::Open {
                lib: "xenforeignmemory_open",
                source,
            });
        };
        Ok(RealXc {
            xch,
            fmem,
            dmod: None,
            hbuf: xc::xc_hypercall_buffer {
                hbuf: std::ptr::null_mut(),
                param_shadow: std::ptr::null_mut(),
                dir: 0,
                // DECLARE_HYPERCALL_BUFFER's HYPERCALL_BUFFER_INIT_NO_BOUNCE: ubuf = (void *)-1.
                ubuf: usize::MAX as *mut c_void,
                sz: 0,
            },
            hbuf_pages: 0,
            hbuf_bytes: 0,
        })
    }

    fn map_with(
        &mut self,
        domid: u32,
        prot: c_int,
        pfns: &[u64],
        errs: &mut [i32],
        each: &mut dyn FnMut(usize, Option<*mut u8>, i32) -> Result<(), XenError>,
    ) -> Result<(), XenError> {
        let n = pfns.len();
        if n == 0 {
            return Ok(());
        }
        let slots = errs.len();
        let errs = errs.get_mut(..n).ok_or_else(|| XenError::Protocol {
            op: "xenforeignmemory_map",
            detail: format!("{slots} error slots for {n} pfns"),
        })?;
        // SAFETY: fmem is an open handle; `pfns` and `errs` are valid for `n` elements
        // (xen_pfn_t is u64 on x86_64 Linux); Xen writes only `errs[..n]`; the result is checked.
        let addr = unsafe {
            xenforeignmemory_map(
                self.fmem.as_ptr(),
                domid,
                prot,
                n,
                pfns.as_ptr(),
                errs.as_mut_ptr(),
            )
        };
        let addr =
            NonNull::new(addr.cast::<u8>()).ok_or_else(|| fail("xenforeignmemory_map", domid))?;
        let guard = Mapping {
            fmem: self.fmem,
            addr,
            pages: n,
        };
        for (j, &e) in errs.iter().enumerate() {
            if e == 0 {
                // SAFETY: j < n, so the page lies inside the n-page mapping.
                let page = unsafe { guard.addr.as_ptr().add(j * PAGE) };
                each(j, Some(page), 0)?;
            } else {
                each(j, None, e.saturating_abs())?;
            }
        }
        drop(guard);
        Ok(())
    }
}

impl Drop for RealXc {
    fn drop(&mut self) {
        if self.hbuf_pages > 0 {
            // SAFETY: hbuf was allocated by xc__hypercall_buffer_alloc_pages on this xch with
            // hbuf_pages pages and is freed exactly once, here; no slice of it outlives &mut self.
            unsafe {
                xc::xc__hypercall_buffer_free_pages(
                    self.xch.as_ptr(),
                    &mut self.hbuf,
                    self.hbuf_pages,
                )
            };
        }
        if let Some(dmod) = self.dmod.take() {
            // SAFETY: opened by xendevicemodel_open in inject_msi and closed exactly once.
            unsafe { xendevicemodel_close(dmod.as_ptr()) };
        }
        // SAFETY: both handles were opened in `open`, no mapping is live (Mapping guards end
        // within map_with), and each is closed exactly once.
        unsafe {
            xenforeignmemory_close(self.fmem.as_ptr());
            xc::xc_interface_close(self.xch.as_ptr());
        }
    }
}

impl XcApi for RealXc {
    fn domain_info(&mut self, domid: u32) -> Result<Option<DomInfo>, XenError> {
        let mut info = xc::xc_domaininfo_t::default();
        // SAFETY: xch is open; `info` is one valid xc_domaininfo_t and max_domains is 1.
        let n = unsafe { xc::xc_domain_getinfolist(self.xch.as_ptr(), domid, 1, &mut info) };
        if n < 0 {
            return Err(fail("xc_domain_getinfolist", domid));
        }
        // getinfolist returns the first domain >= domid; a different id means no such domain.
        if n == 0 || u32::from(info.domain) != domid {
            return Ok(None);
        }
        Ok(Some(DomInfo {
            domid,
            flags: info.flags,
            max_vcpu_id: info.max_vcpu_id,
            tot_pages: info.tot_pages,
            shared_info_frame: info.shared_info_frame,
        }))
    }

    fn maximum_gpfn(&mut self, domid: u32) -> Result<u64, XenError> {
        let mut gpfn: xc::xen_pfn_t = 0;
        // SAFETY: xch is open; gpfn is a valid out-pointer.
        let rc = unsafe { xc::xc_domain_maximum_gpfn(self.xch.as_ptr(), domid, &mut gpfn) };
        if rc < 0 {
            return Err(fail("xc_domain_maximum_gpfn", domid));
        }
        Ok(gpfn)
    }

    fn pause(&mut self, domid: u32) -> Result<(), XenError> {
        // SAFETY: xch is open; the call takes no pointers.
        if unsafe { xc::xc_domain_pause(self.xch.as_ptr(), domid) } != 0 {
            return Err(fail("xc_domain_pause", domid));
        }
        Ok(())
    }

    fn evtchn_status(&mut self, domid: u32, port: u32) -> Result<EvtchnStatus, XenError> {
        let dom = u16::try_from(domid).map_err(|_| XenError::NoSuchDomain {
            op: "xc_evtchn_status",
            domid,
        })?;
        let mut st = xc::xc_evtchn_status_t {
            dom,
            port,
            status: 0,
            vcpu: 0,
            // SAFETY: the union is plain integers; all-zero is a valid value of every member.
            u: unsafe { std::mem::zeroed() },
        };
        // SAFETY: xch is open; `st` is a valid, writable evtchn_status for the call.
        if unsafe { xc::xc_evtchn_status(self.xch.as_ptr(), &mut st) } < 0 {
            return Err(fail("xc_evtchn_status", domid));
        }
        // SAFETY: every member of the union is plain integers, so reading `virq` is defined
        // whatever Xen wrote (it is meaningful only for status virq, which the caller checks).
        let virq = unsafe { st.u.virq };
        Ok(EvtchnStatus {
            status: st.status,
            vcpu: st.vcpu,
            virq,
        })
    }

    fn unpause(&mut self, domid: u32) -> Result<(), XenError> {
        // SAFETY: xch is open; the call takes no pointers.
        if unsafe { xc::xc_domain_unpause(self.xch.as_ptr(), domid) } != 0 {
            return Err(fail("xc_domain_unpause", domid));
        }
        Ok(())
    }

    fn shadow_control(&mut self, domid: u32, op: ShadowOp) -> Result<(), XenError> {
        let name = match op {
            ShadowOp::Off => "xc_shadow_control(OFF)",
            ShadowOp::EnableLogDirty => "xc_shadow_control(ENABLE_LOGDIRTY)",
        };
        // SAFETY: xch is open; a NULL `mb` is allowed (only allocation ops use it).
        let rc = unsafe {
            xc::xc_shadow_control(
                self.xch.as_ptr(),
                domid,
                op as c_uint,
                std::ptr::null_mut(),
                0,
            )
        };
        if rc < 0 {
            return Err(fail(name, domid));
        }
        Ok(())
    }

    fn alloc_dirty_buffer(&mut self, bytes: usize) -> Result<(), XenError> {
        if self.hbuf_pages > 0 {
            if bytes <= self.hbuf_bytes {
                return Ok(());
            }
            return Err(XenError::Protocol {
                op: "xc__hypercall_buffer_alloc_pages",
                detail: format!(
                    "buffer of {} bytes already allocated, {bytes} asked",
                    self.hbuf_bytes
                ),
            });
        }
        let pages = bytes.div_ceil(PAGE).max(1);
        let nr = c_int::try_from(pages).map_err(|_| XenError::Protocol {
            op: "xc__hypercall_buffer_alloc_pages",
            detail: format!("{pages} pages"),
        })?;
        // SAFETY: xch is open; hbuf is a NO_BOUNCE xc_hypercall_buffer owned by self that
        // outlives the allocation (freed in Drop); the result is checked for NULL.
        let p =
            unsafe { xc::xc__hypercall_buffer_alloc_pages(self.xch.as_ptr(), &mut self.hbuf, nr) };
        if p.is_null() {
            return Err(fail("xc__hypercall_buffer_alloc_pages", 0));
        }
        self.hbuf.hbuf = p;
        self.hbuf_pages = nr;
        self.hbuf_bytes = bytes;
        Ok(())
    }

    fn dirty_buffer(&mut self) -> &mut [u8] {
        if self.hbuf_pages == 0 {
            return &mut [];
        }
        // SAFETY: hbuf.hbuf points to hbuf_pages × 4096 bytes (≥ hbuf_bytes) of memory owned
        // by self until Drop; the returned borrow is tied to &mut self, so it is unique, and
        // Xen writes it only during logdirty_control, which needs &mut self too.
        unsafe { std::slice::from_raw_parts_mut(self.hbuf.hbuf.cast::<u8>(), self.hbuf_bytes) }
    }

    fn logdirty_control(
        &mut self,
        domid: u32,
        op: LogDirtyOp,
        pages: u64,
    ) -> Result<u64, XenError> {
        if (pages.div_ceil(8) as usize) > self.hbuf_bytes {
            return Err(XenError::Protocol {
                op: op.name(),
                detail: format!("{pages} pages do not fit a {}-byte buffer", self.hbuf_bytes),
            });
        }
        let mut stats = xc::xc_shadow_op_stats_t::default();
        // SAFETY: xch is open; hbuf is a hypercall buffer large enough for `pages` bits
        // (checked above); stats is a valid out-pointer.
        let rc = unsafe {
            xc::xc_logdirty_control(
                self.xch.as_ptr(),
                domid,
                op as c_uint,
                &mut self.hbuf,
                pages,
                0,
                &mut stats,
            )
        };
        if rc < 0 {
            return Err(fail(op.name(), domid));
        }
        Ok(rc as u64)
    }

    fn pfn_types(&mut self, domid: u32, pfns: &[u64], types: &mut [u64]) -> Result<(), XenError> {
        let n = pfns.len();
        let slots = types.len();
        let types = types.get_mut(..n).ok_or_else(|| XenError::Protocol {
            op: "xc_get_pfn_type_batch",
            detail: format!("{slots} type slots for {n} pfns"),
        })?;
        if n == 0 {
            return Ok(());
        }
        let num = c_uint::try_from(n).map_err(|_| XenError::Protocol {
            op: "xc_get_pfn_type_batch",
            detail: format!("{n} pfns"),
        })?;
        types.copy_from_slice(pfns);
        // SAFETY: xch is open; `types` is valid for `n` xen_pfn_t (u64 on x86_64 Linux), which
        // Xen reads as pfns and overwrites with their types; libxc bounces it through a
        // hypercall buffer itself.
        let rc =
            unsafe { xc_get_pfn_type_batch(self.xch.as_ptr(), domid, num, types.as_mut_ptr()) };
        if rc < 0 {
            return Err(fail("xc_get_pfn_type_batch", domid));
        }
        for t in types.iter_mut() {
            *t = (*t >> 28) & 0xf;
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
        self.map_with(
            domid,
            libc::PROT_READ,
            pfns,
            errs,
            &mut |j, page, e| match page {
                // SAFETY: `page` is a mapped, readable 4096-byte page of the mapping, which stays
                // mapped until map_with returns; the slice does not escape `each`. Guest vCPUs may
                // write it concurrently unless the domain is paused, as the Domain trait documents.
                Some(p) => each(j, Ok(unsafe { std::slice::from_raw_parts(p, PAGE) })),
                None => each(j, Err(e)),
            },
        )
    }

    fn map_write(
        &mut self,
        domid: u32,
        pfns: &[u64],
        errs: &mut [i32],
        each: &mut dyn FnMut(usize, WritePage<'_>) -> Result<(), XenError>,
    ) -> Result<(), XenError> {
        self.map_with(
            domid,
            libc::PROT_READ | libc::PROT_WRITE,
            pfns,
            errs,
            &mut |j, page, e| {
                match page {
                    // SAFETY: `page` is a mapped, writable 4096-byte page of this mapping, unique
                    // to this iteration, valid until map_with returns; the slice does not escape.
                    Some(p) => each(j, Ok(unsafe { std::slice::from_raw_parts_mut(p, PAGE) })),
                    None => each(j, Err(e)),
                }
            },
        )
    }

    fn hvm_context_size(&mut self, domid: u32) -> Result<usize, XenError> {
        // SAFETY: xch is open; a NULL buffer of size 0 asks for the context size.
        let rc = unsafe {
            xc::xc_domain_hvm_getcontext(self.xch.as_ptr(), domid, std::ptr::null_mut(), 0)
        };
        if rc < 0 {
            return Err(fail("xc_domain_hvm_getcontext(size)", domid));
        }
        Ok(rc as usize)
    }

    fn hvm_get_context(&mut self, domid: u32, buf: &mut [u8]) -> Result<usize, XenError> {
        let size = u32::try_from(buf.len()).map_err(|_| XenError::Protocol {
            op: "xc_domain_hvm_getcontext",
            detail: format!("{} bytes", buf.len()),
        })?;
        // SAFETY: xch is open; buf is valid for `size` writable bytes.
        let rc = unsafe {
            xc::xc_domain_hvm_getcontext(self.xch.as_ptr(), domid, buf.as_mut_ptr(), size)
        };
        if rc < 0 {
            return Err(fail("xc_domain_hvm_getcontext", domid));
        }
        Ok(rc as usize)
    }

    fn hvm_set_context(&mut self, domid: u32, buf: &mut [u8]) -> Result<(), XenError> {
        let size = u32::try_from(buf.len()).map_err(|_| XenError::Protocol {
            op: "xc_domain_hvm_setcontext",
            detail: format!("{} bytes", buf.len()),
        })?;
        // SAFETY: xch is open; buf is valid for `size` bytes (the C API only reads them).
        let rc = unsafe {
            xc::xc_domain_hvm_setcontext(self.xch.as_ptr(), domid, buf.as_mut_ptr(), size)
        };
        if rc < 0 {
            return Err(fail("xc_domain_hvm_setcontext", domid));
        }
        Ok(())
    }

    fn hvm_param_get(&mut self, domid: u32, index: u32) -> Result<u64, XenError> {
        let mut value = 0u64;
        // SAFETY: xch is open; value is a valid out-pointer.
        let rc = unsafe { xc::xc_hvm_param_get(self.xch.as_ptr(), domid, index, &mut value) };
        if rc < 0 {
            return Err(fail("xc_hvm_param_get", domid));
        }
        Ok(value)
    }

    fn hvm_param_set(&mut self, domid: u32, index: u32, value: u64) -> Result<(), XenError> {
        // SAFETY: xch is open; the call takes no pointers.
        let rc = unsafe { xc::xc_hvm_param_set(self.xch.as_ptr(), domid, index, value) };
        if rc < 0 {
            return Err(fail("xc_hvm_param_set", domid));
        }
        Ok(())
    }

    fn inject_msi(&mut self, domid: u32, addr: u64, data: u32) -> Result<(), XenError> {
        let dmod = match self.dmod {
            Some(d) => d,
            None => {
                // SAFETY: a NULL logger selects the default; flags 0; the result is checked.
                let d = unsafe { xendevicemodel_open(std::ptr::null_mut(), 0) };
                let d = NonNull::new(d).ok_or_else(|| XenError::Open {
                    lib: "xendevicemodel_open",
                    source: std::io::Error::last_os_error(),
                })?;
                self.dmod = Some(d);
                d
            }
        };
        let dom = u16::try_from(domid).map_err(|_| XenError::NoSuchDomain {
            op: "xendevicemodel_inject_msi",
            domid,
        })?;
        // SAFETY: dmod is an open handle; the call takes no pointers.
        let rc = unsafe { xendevicemodel_inject_msi(dmod.as_ptr(), dom, addr, data) };
        if rc < 0 {
            return Err(fail("xendevicemodel_inject_msi", domid));
        }
        Ok(())
    }

    fn tsc_info_get(&mut self, domid: u32) -> Result<TscInfo, XenError> {
        let mut t = TscInfo::default();
        // SAFETY: xch is open; the four out-pointers are valid and distinct.
        let rc = unsafe {
            xc::xc_domain_get_tsc_info(
                self.xch.as_ptr(),
                domid,
                &mut t.mode,
                &mut t.elapsed_nsec,
                &mut t.khz,
                &mut t.incarnation,
            )
        };
        if rc < 0 {
            return Err(fail("xc_domain_get_tsc_info", domid));
        }
        Ok(t)
    }

    fn tsc_info_set(&mut self, domid: u32, t: &TscInfo) -> Result<(), XenError> {
        // SAFETY: xch is open; the call takes no pointers.
        let rc = unsafe {
            xc::xc_domain_set_tsc_info(
                self.xch.as_ptr(),
                domid,
                t.mode,
                t.elapsed_nsec,
                t.khz,
                t.incarnation,
            )
        };
        if rc < 0 {
            return Err(fail("xc_domain_set_tsc_info", domid));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The crate's own constants against the values bindgen read from the installed headers.
    use super::xc;
    use crate::api::{dominf, pfinfo, LogDirtyOp, ShadowOp};
    use crate::state::SAVED_HVM_PARAMS;

    #[test]
    fn constants_match_the_installed_headers() {
        assert_eq!(dominf::DYING, xc::XEN_DOMINF_dying);
        assert_eq!(dominf::HVM_GUEST, xc::XEN_DOMINF_hvm_guest);
        assert_eq!(dominf::SHUTDOWN, xc::XEN_DOMINF_shutdown);
        assert_eq!(dominf::PAUSED, xc::XEN_DOMINF_paused);
        assert_eq!(dominf::HAP, xc::XEN_DOMINF_hap);
        assert_eq!(ShadowOp::Off as u32, xc::XEN_DOMCTL_SHADOW_OP_OFF);
        assert_eq!(
            ShadowOp::EnableLogDirty as u32,
            xc::XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY
        );
        assert_eq!(LogDirtyOp::Clean as u32, xc::XEN_DOMCTL_SHADOW_OP_CLEAN);
        assert_eq!(LogDirtyOp::Peek as u32, xc::XEN_DOMCTL_SHADOW_OP_PEEK);
        assert_eq!(pfinfo::XTAB << 28, u64::from(xc::XEN_DOMCTL_PFINFO_XTAB));
        assert_eq!(
            pfinfo::XALLOC << 28,
            u64::from(xc::XEN_DOMCTL_PFINFO_XALLOC)
        );
        assert_eq!(
            pfinfo::BROKEN << 28,
            u64::from(xc::XEN_DOMCTL_PFINFO_BROKEN)
        );
        assert_eq!(
            SAVED_HVM_PARAMS,
            [
                xc::HVM_PARAM_STORE_PFN,
                xc::HVM_PARAM_IOREQ_PFN,
                xc::HVM_PARAM_BUFIOREQ_PFN,
                xc::HVM_PARAM_PAGING_RING_PFN,
                xc::HVM_PARAM_MONITOR_RING_PFN,
                xc::HVM_PARAM_SHARING_RING_PFN,
                xc::HVM_PARAM_VM86_TSS_SIZED,
                xc::HVM_PARAM_CONSOLE_PFN,
                xc::HVM_PARAM_ACPI_IOPORTS_LOCATION,
                xc::HVM_PARAM_VIRIDIAN,
                xc::HVM_PARAM_IDENT_PT,
                xc::HVM_PARAM_VM_GENERATION_ID_ADDR,
                xc::HVM_PARAM_IOREQ_SERVER_PFN,
                xc::HVM_PARAM_NR_IOREQ_SERVER_PAGES,
                xc::HVM_PARAM_X87_FIP_WIDTH,
                xc::HVM_PARAM_MCA_CAP,
            ]
        );
    }
}

//! The C calls colo needs to serve a guest's PV devices from dom0: libxenstore (device nodes,
//! the frontend/backend handshake), libxenevtchn (the device's event channel) and
//! libxenforeignmemory (the guest's grant table as a resource, its ring and data frames).
//! Every FFI call of these libraries is made once, here, with its `// SAFETY:` argument.

use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::error::XenError;
use crate::netif::{FrameError, GuestFrames};

const PAGE: usize = colo_core::PAGE_SIZE;

#[repr(C)]
struct XsHandle {
    _opaque: [u8; 0],
}
#[repr(C)]
struct EvtHandle {
    _opaque: [u8; 0],
}
#[repr(C)]
struct FmemHandle {
    _opaque: [u8; 0],
}
#[repr(C)]
struct ResHandle {
    _opaque: [u8; 0],
}

/// `struct xs_permissions`.
#[repr(C)]
struct XsPerm {
    id: c_uint,
    perms: c_uint,
}

#[link(name = "xenstore")]
extern "C" {
    fn xs_open(flags: std::ffi::c_ulong) -> *mut XsHandle;
    fn xs_close(h: *mut XsHandle);
    fn xs_read(h: *mut XsHandle, t: u32, path: *const c_char, len: *mut c_uint) -> *mut c_void;
    fn xs_write(
        h: *mut XsHandle,
        t: u32,
        path: *const c_char,
        data: *const c_void,
        len: c_uint,
    ) -> bool;
    fn xs_rm(h: *mut XsHandle, t: u32, path: *const c_char) -> bool;
    fn xs_set_permissions(
        h: *mut XsHandle,
        t: u32,
        path: *const c_char,
        perms: *const XsPerm,
        num: c_uint,
    ) -> bool;
    fn xs_transaction_start(h: *mut XsHandle) -> u32;
    fn xs_transaction_end(h: *mut XsHandle, t: u32, abort: bool) -> bool;
}

#[link(name = "xenevtchn")]
extern "C" {
    fn xenevtchn_open(logger: *mut c_void, flags: c_uint) -> *mut EvtHandle;
    fn xenevtchn_close(h: *mut EvtHandle) -> c_int;
    fn xenevtchn_fd(h: *mut EvtHandle) -> c_int;
    fn xenevtchn_notify(h: *mut EvtHandle, port: u32) -> c_int;
    fn xenevtchn_bind_interdomain(h: *mut EvtHandle, domid: u32, remote: u32) -> c_int;
    fn xenevtchn_unbind(h: *mut EvtHandle, port: u32) -> c_int;
    fn xenevtchn_pending(h: *mut EvtHandle) -> c_int;
    fn xenevtchn_unmask(h: *mut EvtHandle, port: u32) -> c_int;
}

#[link(name = "xenforeignmemory")]
extern "C" {
    fn xenforeignmemory_open(logger: *mut c_void, flags: c_uint) -> *mut FmemHandle;
    fn xenforeignmemory_close(h: *mut FmemHandle) -> c_int;
    fn xenforeignmemory_map(
        h: *mut FmemHandle,
        dom: u32,
        prot: c_int,
        pages: usize,
        arr: *const u64,
        err: *mut c_int,
    ) -> *mut c_void;
    fn xenforeignmemory_unmap(h: *mut FmemHandle, addr: *mut c_void, pages: usize) -> c_int;
    fn xenforeignmemory_map_resource(
        h: *mut FmemHandle,
        domid: u16,
        kind: c_uint,
        id: c_uint,
        frame: std::ffi::c_ulong,
        nr_frames: std::ffi::c_ulong,
        paddr: *mut *mut c_void,
        prot: c_int,
        flags: c_int,
    ) -> *mut ResHandle;
    fn xenforeignmemory_unmap_resource(h: *mut FmemHandle, res: *mut ResHandle) -> c_int;
}

/// `XENMEM_resource_grant_table`, and its `id` for the shared (v1 entry) frames.
const RESOURCE_GRANT_TABLE: c_uint = 1;
const GRANT_TABLE_SHARED: c_uint = 0;

fn os_err(op: &'static str, domid: u32) -> XenError {
    XenError::from_errno(
        op,
        domid,
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

fn cpath(path: &str) -> Result<CString, XenError> {
    CString::new(path).map_err(|_| XenError::Protocol {
        op: "xenstore path",
        detail: format!("{path:?} holds a NUL"),
    })
}

/// A xenstore connection (`xs_open(0)`).
#[derive(Debug)]
pub struct XenStore {
    h: NonNull<XsHandle>,
}

// SAFETY: an xs_handle may be used from any thread (libxenstore locks internally); XenStore
// owns it and closes it once.
unsafe impl Send for XenStore {}

/// Who may do what with a node: the owner (full access), then every other domain's right.
#[derive(Debug, Clone, Copy)]
pub struct NodePerms {
    /// The owning domain.
    pub owner: u32,
    /// A domain that may read besides the owner (the device's other end).
    pub reader: u32,
}

impl XenStore {
    /// Connects to xenstored.
    pub fn open() -> Result<Self, XenError> {
        // SAFETY: flags 0 is the documented default; the result is checked for NULL.
        let h = unsafe { xs_open(0) };
        NonNull::new(h)
            .map(|h| Self { h })
            .ok_or_else(|| XenError::Open {
                lib: "xs_open",
                source: std::io::Error::last_os_error(),
            })
    }

    /// The value at `path`, or `None` if it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<String>, XenError> {
        let p = cpath(path)?;
        let mut len: c_uint = 0;
        // SAFETY: the handle is open, `p` is NUL-terminated and outlives the call, `len` is a
        // valid out-pointer; the result is NULL or a malloc'd buffer of `len` bytes we free.
        let v = unsafe { xs_read(self.h.as_ptr(), 0, p.as_ptr(), &mut len) };
        if v.is_null() {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(None)
            } else {
                Err(XenError::Call {
                    op: "xs_read",
                    domid: 0,
                    source: e,
                })
            };
        }
        // SAFETY: libxenstore returned `len` readable bytes at `v`.
        let s = unsafe { std::slice::from_raw_parts(v.cast::<u8>(), len as usize) };
        let out = String::from_utf8_lossy(s).into_owned();
        // SAFETY: `v` was malloc'd by libxenstore and is freed once, after its last use.
        unsafe { libc::free(v) };
        Ok(Some(out))
    }

    /// Writes every `(path, value)` and gives each node `perms`, in one transaction (retried
    /// while xenstored reports a conflict).
    pub fn write_all(&self, nodes: &[(String, String)], perms: NodePerms) -> Result<(), XenError> {
        let table = [
            XsPerm {
                id: perms.owner,
                perms: 0,
            },
            XsPerm {
                id: perms.reader,
                perms: 1,
            },
        ];
        for _ in 0..16 {
            // SAFETY: the handle is open; 0 means failure and is checked.
            let t = unsafe { xs_transaction_start(self.h.as_ptr()) };
            if t == 0 {
                return Err(os_err("xs_transaction_start", 0));
            }
            let mut failed = None;
            for (path, value) in nodes {
                let p = cpath(path)?;
                // SAFETY: open handle, live transaction, NUL-terminated path, `value` valid for
                // its length, `table` valid for 2 entries; results checked.
                let ok = unsafe {
                    xs_write(
                        self.h.as_ptr(),
                        t,
                        p.as_ptr(),
                        value.as_ptr().cast(),
                        value.len() as c_uint,
                    ) && xs_set_permissions(self.h.as_ptr(), t, p.as_ptr(), table.as_ptr(), 2)
                };
                if !ok {
                    failed = Some(os_err("xs_write", 0));
                    break;
                }
            }
            if let Some(e) = failed {
                // SAFETY: ends the transaction opened above, once (abort).
                unsafe { xs_transaction_end(self.h.as_ptr(), t, true) };
                return Err(e);
            }
            // SAFETY: ends the transaction opened above, once (commit).
            if unsafe { xs_transaction_end(self.h.as_ptr(), t, false) } {
                return Ok(());
            }
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                return Err(os_err("xs_transaction_end", 0));
            }
        }
        Err(XenError::Protocol {
            op: "xs_transaction_end",
            detail: "16 conflicts in a row".into(),
        })
    }

    /// Removes `path` and everything under it (absent is fine).
    pub fn remove(&self, path: &str) -> Result<(), XenError> {
        let p = cpath(path)?;
        // SAFETY: open handle, no transaction, NUL-terminated path.
        if unsafe { xs_rm(self.h.as_ptr(), 0, p.as_ptr()) } {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(())
        } else {
            Err(XenError::Call {
                op: "xs_rm",
                domid: 0,
                source: e,
            })
        }
    }
}

impl Drop for XenStore {
    fn drop(&mut self) {
        // SAFETY: the handle was opened by xs_open and is closed once, here.
        unsafe { xs_close(self.h.as_ptr()) };
    }
}

/// One event channel bound to a guest's port (`/dev/xen/evtchn` through libxenevtchn).
#[derive(Debug)]
pub struct EventChannel {
    h: NonNull<EvtHandle>,
    port: u32,
    domid: u32,
}

// SAFETY: the handle is used through `&self` only for notify/pending/unmask, which the library
// allows from any thread (they are ioctls/reads on one fd); EventChannel owns it.
unsafe impl Send for EventChannel {}
// SAFETY: as above: notify (an ioctl), pending (a read) and unmask (a write) on the handle's fd
// keep no state in the handle, so two threads may call them at once (the node kicks the guest
// while the signal thread waits for the guest's kicks).
unsafe impl Sync for EventChannel {}

impl EventChannel {
    /// Binds a local port to `remote` of domain `domid`.
    pub fn bind(domid: u32, remote: u32) -> Result<Self, XenError> {
        // SAFETY: NULL logger selects the default; flags 0; result checked.
        let h = unsafe { xenevtchn_open(std::ptr::null_mut(), 0) };
        let h = NonNull::new(h).ok_or_else(|| XenError::Open {
            lib: "xenevtchn_open",
            source: std::io::Error::last_os_error(),
        })?;
        // SAFETY: open handle; the result is a port or -1 (checked).
        let port = unsafe { xenevtchn_bind_interdomain(h.as_ptr(), domid, remote) };
        if port < 0 {
            let e = os_err("xenevtchn_bind_interdomain", domid);
            // SAFETY: closes the handle opened above, once.
            unsafe { xenevtchn_close(h.as_ptr()) };
            return Err(e);
        }
        Ok(Self {
            h,
            port: port as u32,
            domid,
        })
    }

    /// Kicks the guest.
    pub fn notify(&self) -> Result<(), XenError> {
        // SAFETY: open handle, a port bound on it.
        if unsafe { xenevtchn_notify(self.h.as_ptr(), self.port) } < 0 {
            return Err(os_err("xenevtchn_notify", self.domid));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the guest's kick; re-arms the port when one came.
    pub fn wait(&self, timeout: std::time::Duration) -> Result<bool, XenError> {
        // SAFETY: open handle; the fd stays the handle's.
        let fd = unsafe { xenevtchn_fd(self.h.as_ptr()) };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            return Ok(false);
        }
        // SAFETY: open handle; returns a pending port or -1.
        let p = unsafe { xenevtchn_pending(self.h.as_ptr()) };
        if p < 0 {
            return Err(os_err("xenevtchn_pending", self.domid));
        }
        // SAFETY: open handle, a port it returned.
        unsafe { xenevtchn_unmask(self.h.as_ptr(), p as u32) };
        Ok(true)
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: the port was bound on this handle; both are released once, here.
        unsafe {
            xenevtchn_unbind(self.h.as_ptr(), self.port);
            xenevtchn_close(self.h.as_ptr());
        }
    }
}

/// An open libxenforeignmemory handle, closed when its last user (a [`ForeignFrames`] or a
/// [`Mapped`]) is gone.
#[derive(Debug)]
struct Fmem(NonNull<FmemHandle>);

// SAFETY: the handle is a plain heap object; libxenforeignmemory's map and unmap calls are
// ioctls on its fd and may come from any thread.
unsafe impl Send for Fmem {}
// SAFETY: as above: no call mutates the handle's own memory.
unsafe impl Sync for Fmem {}

impl Drop for Fmem {
    fn drop(&mut self) {
        // SAFETY: the last owner closes the handle, once; no mapping outlives it (each holds
        // an Arc of it).
        unsafe { xenforeignmemory_close(self.0.as_ptr()) };
    }
}

/// A guest's frames as colo's PV backends reach them: foreign mappings from dom0.
///
/// The frames a backend reads and writes (receive buffers, packet and block data) are the same
/// few hundred pages over and over, so their mappings are kept ([`MAPPING_CACHE`] of them,
/// least recently used out) instead of a map and an unmap (two hypercalls) per touch. They are
/// all dropped by [`ForeignFrames::forget_mappings`], which the backends call at every harvest:
/// no mapping outlives a checkpoint, so a frame the guest gave back (ballooned out) is not
/// written through a stale mapping for longer than an epoch, and never across a load.
#[derive(Debug)]
pub struct ForeignFrames {
    h: Arc<Fmem>,
    domid: u32,
    cache: std::collections::HashMap<u64, (Mapped, u64)>,
    tick: u64,
    /// Mappings made (cache misses), for the figures.
    pub maps: u64,
    /// Touches served by a kept mapping.
    pub hits: u64,
}

/// Mappings [`ForeignFrames`] keeps between touches (netfront posts 256 receive buffers).
pub const MAPPING_CACHE: usize = 512;

/// Pages mapped from a guest, unmapped on drop, seen as 32-bit words shared with the guest.
#[derive(Debug)]
pub struct Mapped {
    h: Arc<Fmem>,
    addr: NonNull<u8>,
    pages: usize,
    res: Option<NonNull<ResHandle>>,
}

// SAFETY: the mapping is plain memory shared with the guest, touched only through atomics.
unsafe impl Send for Mapped {}

impl Mapped {
    /// Page `i` as 1024 words.
    pub fn words(&self, i: usize) -> &[AtomicU32] {
        assert!(i < self.pages, "page {i} of a {}-page mapping", self.pages);
        // SAFETY: the mapping is `pages` pages long, page-aligned (so word-aligned) and lives
        // as long as `self`; AtomicU32 has u32's layout, and every access goes through it, so
        // the guest writing concurrently is no data race in Rust's model.
        unsafe {
            std::slice::from_raw_parts(
                self.addr.as_ptr().add(i * PAGE).cast::<AtomicU32>(),
                PAGE / 4,
            )
        }
    }

    /// Pages mapped.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// These pages as a guest's grant table (v1 entries).
    pub fn grant_table(&self) -> crate::grant::GrantTable<'_> {
        let words = (0..self.pages).map(|i| self.words(i)).collect();
        // Every mapped page is 1024 words, so `new` cannot refuse.
        crate::grant::GrantTable::new(words)
            .unwrap_or_else(|| unreachable!("mapped grant frames are whole pages"))
    }

    /// Appends the pages up to the last one holding a non-zero word (a grant table's frames in
    /// use) to `out`, straight from the mapping; returns how many.
    pub fn export_in_use(&self, out: &mut Vec<u8>) -> usize {
        let n = (0..self.pages)
            .rposition(|i| self.words(i).iter().any(|w| w.load(Ordering::Relaxed) != 0))
            .map_or(0, |i| i + 1);
        out.reserve(n * PAGE + 64);
        for i in 0..n {
            for w in self.words(i) {
                out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
        }
        n
    }

    /// Loads `src` (whole pages, as [`Mapped::export_in_use`] wrote them) into these pages
    /// and zeroes the pages after them that are not already zero. Err(pages given) when
    /// `src` holds more pages than are mapped.
    pub fn load(&self, src: &[u8]) -> Result<(), usize> {
        let n = src.len() / PAGE;
        if n > self.pages {
            return Err(n);
        }
        for i in 0..self.pages {
            let words = self.words(i);
            match src.get(i * PAGE..(i + 1) * PAGE) {
                Some(page) => {
                    for (w, b) in words.iter().zip(page.chunks_exact(4)) {
                        w.store(
                            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                            Ordering::Relaxed,
                        );
                    }
                }
                None => {
                    if words.iter().any(|w| w.load(Ordering::Relaxed) != 0) {
                        words.iter().for_each(|w| w.store(0, Ordering::Relaxed));
                    }
                }
            }
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what was mapped on this handle, once; no slice outlives self.
        unsafe {
            match self.res {
                Some(r) => {
                    xenforeignmemory_unmap_resource(self.h.0.as_ptr(), r.as_ptr());
                }
                None => {
                    xenforeignmemory_unmap(
                        self.h.0.as_ptr(),
                        self.addr.as_ptr().cast(),
                        self.pages,
                    );
                }
            }
        }
    }
}

impl ForeignFrames {
    /// A handle for `domid`'s frames.
    pub fn open(domid: u32) -> Result<Self, XenError> {
        // SAFETY: NULL logger, flags 0; result checked.
        let h = unsafe { xenforeignmemory_open(std::ptr::null_mut(), 0) };
        NonNull::new(h)
            .map(|h| Self {
                h: Arc::new(Fmem(h)),
                domid,
                cache: std::collections::HashMap::new(),
                tick: 0,
                maps: 0,
                hits: 0,
            })
            .ok_or_else(|| XenError::Open {
                lib: "xenforeignmemory_open",
                source: std::io::Error::last_os_error(),
            })
    }

    /// Maps `gfns` writable.
    pub fn map(&self, gfns: &[u64]) -> Result<Mapped, XenError> {
        let mut errs = vec![0 as c_int; gfns.len()];
        // SAFETY: open handle; `gfns` and `errs` valid for len elements; result checked.
        let a = unsafe {
            xenforeignmemory_map(
                self.h.0.as_ptr(),
                self.domid,
                libc::PROT_READ | libc::PROT_WRITE,
                gfns.len(),
                gfns.as_ptr(),
                errs.as_mut_ptr(),
            )
        };
        let addr = NonNull::new(a.cast::<u8>())
            .ok_or_else(|| os_err("xenforeignmemory_map", self.domid))?;
        let m = Mapped {
            h: self.h.clone(),
            addr,
            pages: gfns.len(),
            res: None,
        };
        if let Some((i, e)) = errs.iter().enumerate().find(|(_, e)| **e != 0) {
            return Err(XenError::PageUnmappable {
                domid: self.domid,
                pfn: gfns[i],
                source: std::io::Error::from_raw_os_error(e.saturating_abs()),
            });
        }
        Ok(m)
    }

    /// Maps the first `frames` shared (v1 entry) frames of the guest's grant table writable.
    pub fn map_grant_table(&self, frames: usize) -> Result<Mapped, XenError> {
        let domid = u16::try_from(self.domid).map_err(|_| XenError::Protocol {
            op: "map grant table",
            detail: format!("domid {} out of range", self.domid),
        })?;
        let mut addr: *mut c_void = std::ptr::null_mut();
        // SAFETY: open handle; `addr` is a valid in/out pointer (NULL hint); result checked.
        let r = unsafe {
            xenforeignmemory_map_resource(
                self.h.0.as_ptr(),
                domid,
                RESOURCE_GRANT_TABLE,
                GRANT_TABLE_SHARED,
                0,
                frames as std::ffi::c_ulong,
                &mut addr,
                libc::PROT_READ | libc::PROT_WRITE,
                0,
            )
        };
        let res = NonNull::new(r)
            .ok_or_else(|| os_err("xenforeignmemory_map_resource(grant table)", self.domid))?;
        let addr = NonNull::new(addr.cast::<u8>()).ok_or_else(|| XenError::Protocol {
            op: "xenforeignmemory_map_resource",
            detail: "returned no address".into(),
        })?;
        Ok(Mapped {
            h: self.h.clone(),
            addr,
            pages: frames,
            res: Some(res),
        })
    }

    /// Drops every kept mapping (see [`ForeignFrames`]).
    pub fn forget_mappings(&mut self) {
        self.cache.clear();
    }

    fn with_page<T>(&mut self, gfn: u64, f: impl FnOnce(*mut u8) -> T) -> Result<T, FrameError> {
        self.tick += 1;
        let tick = self.tick;
        if let Some((m, used)) = self.cache.get_mut(&gfn) {
            *used = tick;
            self.hits += 1;
            return Ok(f(m.addr.as_ptr()));
        }
        let m = self.map(&[gfn]).map_err(|e| FrameError {
            gfn,
            reason: e.to_string(),
        })?;
        self.maps += 1;
        if self.cache.len() >= MAPPING_CACHE {
            // The least recently used goes (a scan of the kept ones costs far less than the
            // hypercalls a mapping does).
            if let Some(old) = self
                .cache
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(g, _)| *g)
            {
                self.cache.remove(&old);
            }
        }
        let p = m.addr.as_ptr();
        self.cache.insert(gfn, (m, tick));
        Ok(f(p))
    }
}

impl GuestFrames for ForeignFrames {
    fn read(&mut self, gfn: u64, offset: usize, out: &mut [u8]) -> Result<(), FrameError> {
        if offset + out.len() > PAGE {
            return Err(FrameError {
                gfn,
                reason: format!("{} bytes at {offset} pass the page", out.len()),
            });
        }
        // SAFETY: the page is mapped for the closure's duration and the range is inside it
        // (checked above); the guest may write it concurrently, which a byte copy tolerates.
        self.with_page(gfn, |p| unsafe {
            std::ptr::copy_nonoverlapping(p.add(offset), out.as_mut_ptr(), out.len())
        })
    }

    fn write(&mut self, gfn: u64, offset: usize, data: &[u8]) -> Result<(), FrameError> {
        if offset + data.len() > PAGE {
            return Err(FrameError {
                gfn,
                reason: format!("{} bytes at {offset} pass the page", data.len()),
            });
        }
        // SAFETY: as for read; the mapping is writable.
        self.with_page(gfn, |p| unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(offset), data.len())
        })
    }
}

/// Reads a decimal number from xenstore node `path`.
pub fn read_num(xs: &XenStore, path: &str) -> Result<Option<u64>, XenError> {
    Ok(match xs.read(path)? {
        None => None,
        Some(s) => Some(s.trim().parse().map_err(|_| XenError::Protocol {
            op: "xenstore",
            detail: format!("{path} = {s:?} is not a number"),
        })?),
    })
}

/// The path of `domid`'s home in xenstore.
pub fn home(domid: u32) -> String {
    format!("/local/domain/{domid}")
}

//! colo-xen's error type: every libxenctrl/libxenforeignmemory failure, typed, and its mapping
//! into colo-core's [`BackendError`].

use colo_core::{BackendError, BitmapError};
use std::io;

use crate::state::StateError;

/// Errors from the Xen backend.
#[derive(Debug, thiserror::Error)]
pub enum XenError {
    /// `xc_interface_open` or `xenforeignmemory_open` failed (not root, not dom0, or the
    /// `xen-privcmd` module is not loaded).
    #[error("{lib} failed (colo-xen must run as root in dom0 with xen-privcmd loaded)")]
    Open {
        /// The open call that failed.
        lib: &'static str,
        /// The errno behind it.
        #[source]
        source: io::Error,
    },
    /// A libxc call failed with an errno that has no more specific variant.
    #[error("{op} on domain {domid} failed")]
    Call {
        /// The C function.
        op: &'static str,
        /// The domain it was called for.
        domid: u32,
        /// The errno behind it.
        #[source]
        source: io::Error,
    },
    /// The domain does not exist (ESRCH, or absent from `xc_domain_getinfolist`).
    #[error("domain {domid} does not exist ({op})")]
    NoSuchDomain {
        /// The call that found out.
        op: &'static str,
        /// The domain.
        domid: u32,
    },
    /// The caller may not control the domain (EPERM/EACCES).
    #[error("{op} on domain {domid}: permission denied (run as root in dom0)")]
    PermissionDenied {
        /// The call that was refused.
        op: &'static str,
        /// The domain.
        domid: u32,
    },
    /// Xen refused an operation it does not implement for this domain (EOPNOTSUPP/ENOSYS).
    #[error("{op} on domain {domid} is not supported by this hypervisor")]
    NotSupported {
        /// The call that was refused.
        op: &'static str,
        /// The domain.
        domid: u32,
    },
    /// The domain is a PV guest; Debian's Xen has no shadow paging, so log-dirty cannot work.
    #[error(
        "domain {domid} is a PV guest: log-dirty needs shadow paging, which Debian's Xen lacks; \
         use a PVH or HVM guest (type=\"pvh\")"
    )]
    PvGuest {
        /// The domain.
        domid: u32,
    },
    /// The HVM/PVH domain runs without hardware-assisted paging (HAP).
    #[error("domain {domid} runs without hardware-assisted paging (hap=0); log-dirty needs HAP")]
    NoHap {
        /// The domain.
        domid: u32,
    },
    /// The domain is being destroyed.
    #[error("domain {domid} is dying")]
    Dying {
        /// The domain.
        domid: u32,
    },
    /// A page could not be mapped for writing.
    #[error("pfn {pfn:#x} of domain {domid} cannot be mapped for writing")]
    PageUnmappable {
        /// The domain.
        domid: u32,
        /// The page.
        pfn: u64,
        /// The per-page errno from `xenforeignmemory_map`.
        #[source]
        source: io::Error,
    },
    /// A pfn beyond the domain's page count.
    #[error("pfn {pfn:#x} is beyond domain's {pages} pages")]
    PfnOutOfRange {
        /// The offending pfn.
        pfn: u64,
        /// The domain's page count.
        pages: u64,
    },
    /// The call does not fit the handle's state.
    #[error("{op} is not possible now: {reason}")]
    BadState {
        /// The method called.
        op: &'static str,
        /// Why not.
        reason: String,
    },
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
    /// Converting Xen's log-dirty buffer failed (the bits were kept for the next harvest).
    #[error("log-dirty buffer conversion failed: {0}")]
    Bitmap(#[from] BitmapError),
    /// A vCPU/platform state blob was malformed.
    #[error("vCPU/platform state blob: {0}")]
    State(#[from] StateError),
    /// Xen returned something colo-xen cannot use (e.g. an impossible size).
    #[error("{op} returned an unusable result: {detail}")]
    Protocol {
        /// The call.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// An error raised by the caller's page visitor, passed through unchanged.
    #[error(transparent)]
    Visit(BackendError),
}

impl XenError {
    /// Maps an errno from `op` on `domid` to the most specific variant.
    pub fn from_errno(op: &'static str, domid: u32, errno: i32) -> Self {
        match errno {
            libc::ESRCH => XenError::NoSuchDomain { op, domid },
            libc::EPERM | libc::EACCES => XenError::PermissionDenied { op, domid },
            libc::EOPNOTSUPP | libc::ENOSYS => XenError::NotSupported { op, domid },
            _ => XenError::Call {
                op,
                domid,
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }

    /// The errno this error carries, if it came from a failed call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            XenError::NoSuchDomain { .. } => Some(libc::ESRCH),
            XenError::PermissionDenied { .. } => Some(libc::EPERM),
            XenError::NotSupported { .. } => Some(libc::EOPNOTSUPP),
            XenError::Call { source, .. }
            | XenError::Open { source, .. }
            | XenError::PageUnmappable { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl From<XenError> for BackendError {
    fn from(e: XenError) -> Self {
        match e {
            XenError::Visit(inner) => inner,
            XenError::PfnOutOfRange { pfn, pages } => BackendError::PfnOutOfRange { pfn, pages },
            XenError::BadState { op, reason } => BackendError::BadState { op, reason },
            XenError::DataLength { got, want, pages } => {
                BackendError::DataLength { got, want, pages }
            }
            XenError::State(s) => BackendError::InvalidState(s.to_string()),
            e @ (XenError::PvGuest { .. }
            | XenError::NoHap { .. }
            | XenError::NotSupported { .. }) => BackendError::Unsupported(e.to_string()),
            XenError::Call { op, source, .. } | XenError::Open { lib: op, source } => {
                BackendError::Os { op, source }
            }
            e @ XenError::PageUnmappable { .. } => BackendError::BadState {
                op: "write_pages",
                reason: e.to_string(),
            },
            XenError::PermissionDenied { op, .. } => BackendError::Os {
                op,
                source: io::Error::from_raw_os_error(libc::EPERM),
            },
            XenError::NoSuchDomain { op, .. } => BackendError::Os {
                op,
                source: io::Error::from_raw_os_error(libc::ESRCH),
            },
            e @ XenError::Dying { .. } => BackendError::BadState {
                op: "xen domain",
                reason: e.to_string(),
            },
            e @ (XenError::Bitmap(_) | XenError::Protocol { .. }) => BackendError::BadState {
                op: "xen backend",
                reason: e.to_string(),
            },
        }
    }
}

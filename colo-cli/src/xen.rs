//! The Xen backend of the `colo` command (feature `xen`): a live Xen domain as a node's guest
//! and as the source of `colo save --backend xen`.
//!
//! [`XenGuest`] wraps colo-xen's `XenDomain` (the wrapper exists because neither the
//! `GuestNic` trait nor `XenDomain` belongs to this binary). Its network interface is empty:
//! the Xen guest's network path (mirroring client packets to the SVM and comparing the vifs'
//! output, COLO-proxy's job) is not part of this release. So on Xen, checkpoints are periodic
//! or manual (`colo status`/the control socket's `checkpoint`), never triggered by an output
//! mismatch, and `--client` must not be given.

use anyhow::{Context, Result};
use colo_cli::node::GuestNic;
use colo_core::backend::PageVisitor;
use colo_core::bitmap::DirtyBitmap;
use colo_core::stream::TscInfo;
use colo_core::{BackendError, Domain};
use colo_xen::{XenDomain, XenState};

use crate::save::PlatformRecords;
use colo_cli::config::UpcallVector;

/// A Xen domain as a colo node's guest.
#[derive(Debug)]
pub struct XenGuest(pub XenDomain);

/// Opens domain `domid` (HVM or PVH, from dom0); `vector` is delivered when it resumes from a
/// loaded checkpoint (see `XenDomain::wake`).
pub fn open(domid: u32, vector: UpcallVector) -> Result<XenGuest> {
    let mut dom = XenDomain::open(domid).with_context(|| format!("opening Xen domain {domid}"))?;
    dom.set_wake_vector(vector.0);
    Ok(XenGuest(dom))
}

/// Splits colo-xen's state blob into the stream's X86_TSC_INFO, HVM_CONTEXT and HVM_PARAMS.
pub fn platform(blob: &[u8]) -> Result<PlatformRecords> {
    let st = XenState::decode(blob).context("decoding the Xen domain's state")?;
    Ok(PlatformRecords {
        tsc: TscInfo {
            mode: st.tsc.mode,
            khz: st.tsc.khz,
            nsec: st.tsc.elapsed_nsec,
            incarnation: st.tsc.incarnation,
        },
        hvm_context: st.hvm_context.to_vec(),
        hvm_params: st.params().map(|(i, v)| (u64::from(i), v)).collect(),
    })
}

impl Domain for XenGuest {
    fn page_count(&self) -> u64 {
        self.0.page_count()
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        self.0.pause()
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        self.0.resume()
    }

    fn is_paused(&self) -> bool {
        self.0.is_paused()
    }

    fn start_dirty_log(&mut self) -> Result<(), BackendError> {
        self.0.start_dirty_log()
    }

    fn stop_dirty_log(&mut self) -> Result<(), BackendError> {
        self.0.stop_dirty_log()
    }

    fn harvest_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.0.harvest_dirty(into)
    }

    fn peek_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.0.peek_dirty(into)
    }

    fn read_pages(
        &mut self,
        pfns: &[u64],
        visit: &mut PageVisitor<'_>,
    ) -> Result<(), BackendError> {
        self.0.read_pages(pfns, visit)
    }

    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), BackendError> {
        self.0.write_pages(pfns, data)
    }

    fn get_state(&mut self, out: &mut Vec<u8>) -> Result<(), BackendError> {
        self.0.get_state(out)
    }

    fn set_state(&mut self, blob: &[u8]) -> Result<(), BackendError> {
        self.0.set_state(blob)
    }
}

/// No network path on Xen in this release: the guest never receives mirrored requests and
/// nothing is compared.
impl GuestNic for XenGuest {
    fn rx_next_seq(&self) -> u64 {
        0
    }

    fn inject(&mut self, _seq: u64, _frame: &[u8]) -> Result<bool, BackendError> {
        Err(BackendError::Unsupported(
            "the Xen backend has no client network path in this release (omit --client)".into(),
        ))
    }

    fn drain_tx(&mut self, _out: &mut dyn FnMut(&[u8])) {}
}

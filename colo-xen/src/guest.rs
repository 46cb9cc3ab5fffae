//! The rest of colo-core's backend contract on a [`XenDomain`]: its guest NIC when colo is not
//! given the guest's vif (an empty one) and the platform records `colo save` writes
//! ([`colo_core::Snapshot`]).
//!
//! A bare `XenDomain` has no network path: a node run without `--vif` replicates memory and
//! state only, its checkpoints are periodic or manual, never triggered by an output mismatch;
//! [`GuestNic::inject`] says why if it is called anyway. With `--vif vifD.0` the node runs a
//! [`crate::VifGuest`] instead, whose NIC is an AF_PACKET port on the vif (`nic.rs`).

use colo_core::stream::TscInfo;
use colo_core::{BackendError, Domain, GuestNic, PlatformRecords, Snapshot};

use crate::{XenDomain, XenState};

/// No network path without a vif port: the guest never receives mirrored requests, emits
/// nothing to compare, and offers no output signal.
impl GuestNic for XenDomain {
    fn rx_next_seq(&self) -> u64 {
        0
    }

    fn inject(&mut self, _seq: u64, _frame: &[u8]) -> Result<bool, BackendError> {
        Err(BackendError::Unsupported(
            "this Xen guest has no network path in colo (give its vif: --vif vifD.0)".into(),
        ))
    }

    fn drain_tx(&mut self, _out: &mut dyn FnMut(&[u8])) {}
}

/// The state blob split into the stream's X86_TSC_INFO, HVM_CONTEXT and HVM_PARAMS.
impl Snapshot for XenDomain {
    fn platform(&mut self) -> Result<PlatformRecords, BackendError> {
        let mut blob = Vec::new();
        self.get_state(&mut blob)?;
        platform(&blob)
    }
}

/// Splits colo-xen's state blob into the stream's platform records.
pub(crate) fn platform(blob: &[u8]) -> Result<PlatformRecords, BackendError> {
    let st = XenState::decode(blob)
        .map_err(|e| BackendError::InvalidState(format!("the Xen domain's state: {e}")))?;
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

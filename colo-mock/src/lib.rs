//! colo-mock: a mock hypervisor whose guest RAM is an mmap'd shmem file with kernel-tracked
//! dirty pages, and whose guests are deterministic workloads on their own threads.
//!
//! - [`MockDomain`] implements colo-core's backend contract ([`colo_core::Domain`],
//!   [`colo_core::GuestNic`], [`colo_core::Snapshot`]); create it with a [`MockConfig`].
//! - Dirty tracking ([`tracker`]): userfaultfd WP-async + `PAGEMAP_SCAN`, falling back to page
//!   hashing; [`MockDomain::tracker_kind`] says which.
//! - Guests ([`guest`]): the `kv` server and the `dirty` page writer; all guest state is guest
//!   RAM plus the vCPU registers (the state blob). Per-VM nondeterminism comes from host devices
//!   that are not checkpointed.
//! - The guest NIC: [`MockDomain::inject`] / [`MockDomain::drain_tx`] move Ethernet/IPv4/UDP
//!   frames ([`frame`]) through RX/TX rings that live in guest RAM.
//! - The disk ([`disk`], optional: [`MockConfig::disk`]): a sparse image of 4 KiB blocks with a
//!   written-block log and the SVM's overlay; the `kv` workload persists its table to it.

pub mod disk;
mod domain;
pub mod frame;
pub mod guest;
mod ram;
mod sys;
pub mod tcp;
pub mod tracker;
mod vcpu;

pub use disk::{DiskConfig, DiskHandle, MockDisk};
pub use domain::{MockConfig, MockDomain};
pub use frame::{
    build_request_frame, build_tcp, frame_stream_message, next_stream_message,
    parse_response_frame, parse_tcp, ClientAddr, KvOp, KvRequest, KvResponse, KvStatus, TcpFlags,
    TcpView, GUEST_IP, GUEST_MAC, KV_PORT,
};
pub use guest::{DirtyConfig, KvConfig, VcpuRegs, Workload};
pub use ram::GuestMem;
pub use tracker::{TrackerChoice, TrackerKind};

use colo_core::BackendError;

/// Errors of the mock hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// A system call failed.
    #[error("{op} failed")]
    Os {
        /// What was attempted.
        op: &'static str,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot be built.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A guest-RAM access beyond the end of RAM.
    #[error("access of {len} bytes at {offset:#x} is outside guest RAM ({ram} bytes)")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Bytes accessed.
        len: u64,
        /// RAM size.
        ram: u64,
    },
    /// `inject` with a sequence number other than the ring's next.
    #[error("request sequence {got} is not the ring's next expected {expected}")]
    SeqMismatch {
        /// `rx_next_seq()`.
        expected: u64,
        /// The caller's.
        got: u64,
    },
    /// A frame longer than a ring slot.
    #[error("frame of {len} bytes exceeds the ring slot's {max}")]
    FrameTooLarge {
        /// Frame length.
        len: usize,
        /// Slot capacity.
        max: usize,
    },
    /// Ring indices in guest RAM are inconsistent (guest memory corrupted).
    #[error("{ring} ring indices are inconsistent: prod {prod}, cons {cons}")]
    RingCorrupt {
        /// "rx" or "tx".
        ring: &'static str,
        /// Producer index.
        prod: u64,
        /// Consumer index.
        cons: u64,
    },
    /// The call needs a running domain.
    #[error("{0} needs a running domain, it is paused")]
    Paused(&'static str),
    /// The guest faulted or could not run host-requested code.
    #[error("guest fault: {0}")]
    Guest(String),
    /// A backend-trait error.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl From<MockError> for BackendError {
    fn from(e: MockError) -> Self {
        match e {
            MockError::Backend(b) => b,
            MockError::Os { op, source } => BackendError::Os { op, source },
            other => BackendError::BadState {
                op: "colo-mock",
                reason: other.to_string(),
            },
        }
    }
}

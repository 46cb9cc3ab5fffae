//! colo-core: the COLO protocol without IO — dirty-page bitmaps, backend traits, the Xen stream
//! codec, output comparison, checkpoint policy, the primary/secondary state machines, the disk
//! replication rule and the sealed (encrypted, authenticated) framing of the link.
//!
//! Nothing in this crate touches a socket, a file or the clock: callers feed it events and the
//! current time, and it answers with what to do. See `ARCHITECTURE.md` at the repository root.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod align;
pub mod announce;
pub mod backend;
pub mod bitmap;
pub mod compare;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod disk;
pub mod engine;
pub mod lease;
pub mod policy;
pub mod seal;
pub mod stream;
pub mod stripe;

pub use align::{AlignConfig, AlignStats, Aligner};
pub use backend::{
    BackendError, Domain, Guest, GuestDisk, GuestNic, OutputSignal, PageVisitor, PlatformRecords,
    Snapshot,
};
pub use bitmap::{BitmapError, DirtyBitmap};

/// Size of a guest page in bytes. colo only supports 4 KiB pages (Xen's `page_shift` 12).
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

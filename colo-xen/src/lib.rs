//! colo-xen: colo's backend on a real Xen domain through libxenctrl and libxenforeignmemory.
//!
//! [`XenDomain`] implements [`colo_core::Domain`] for one HVM or PVH domain, from dom0:
//!
//! | `Domain` method | Xen call |
//! |---|---|
//! | `page_count` | `xc_domain_maximum_gpfn` + 1 (fixed at [`XenDomain::open`]) |
//! | `pause` / `resume` | `xc_domain_pause` / `xc_domain_unpause` |
//! | `start_dirty_log` / `stop_dirty_log` | `xc_shadow_control(ENABLE_LOGDIRTY / OFF)` |
//! | `harvest_dirty` / `peek_dirty` | `xc_logdirty_control(CLEAN / PEEK)` into one hypercall buffer |
//! | `read_pages` | `xenforeignmemory_map(PROT_READ)`, ≤ 1024 pfns a call; per-page errors → `None` |
//! | `write_pages` | `xenforeignmemory_map(PROT_READ\|PROT_WRITE)` + copy |
//! | `get_state` / `set_state` | TSC info, `xc_domain_hvm_{get,set}context`, HVM params ([`state`]) |
//!
//! # Build
//! Without the `xen` feature only the pure parts compile (errors, the state-blob codec,
//! batching and bitmap logic, tested against an in-memory fake of the C API); no Xen headers
//! are needed. With `xen`, `xenctrl-sys` runs bindgen over the system's `xenctrl.h` (Debian:
//! `libxen-dev` and `libclang-dev`), libxenctrl and libxenforeignmemory are linked, and
//! [`XenDomain::open`] exists.
//!
//! # Supported Xen versions
//! * **Xen 4.17** (Debian 12's `xen-hypervisor-4.17-amd64`): supported and exercised on a real
//!   hypervisor by `cargo xtask xen-test` (Xen under QEMU TCG, PVH guests).
//! * **4.18 and later** are not supported: libxenctrl's ABI is tied to its version
//!   (`libxenctrl.so.4.17`), `xc_domain_getinfo` was removed in 4.18 (colo-xen already uses
//!   `xc_domain_getinfolist`), and 4.18+ write a 16-byte header for the
//!   CHECKPOINT_DIRTY_PFN_LIST back-channel record instead of 4.17's 8-byte one, so their COLO
//!   streams do not interoperate with colo's (which emits and accepts the 4.17 layout).
//! * Older than 4.17: untested.
//!
//! # Guests
//! HVM and PVH guests with hardware-assisted paging only. PV guests are refused
//! ([`XenError::PvGuest`]): Debian's Xen is built without shadow paging, so log-dirty fails
//! with EOPNOTSUPP for them. HVM guests' device-model (QEMU) state is not captured.

#![warn(missing_docs)]
// Without `xen` nothing outside the tests constructs a XenDomain, so the seam looks unused.
#![cfg_attr(not(feature = "xen"), allow(dead_code))]

mod api;
mod domain;
mod error;
pub mod state;
#[cfg(feature = "xen")]
mod sys;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use api::{dominf, DomInfo, MAX_BATCH};
pub use domain::XenDomain;
pub use error::XenError;
pub use state::{StateError, TscInfo, XenState};

//! colo-xen: colo's backend on a real Xen domain through libxenctrl and libxenforeignmemory.
//!
//! [`XenDomain`] implements colo-core's backend contract for one HVM or PVH domain, from dom0:
//! [`colo_core::Domain`] (below), [`colo_core::Snapshot`] (the state blob split into the
//! stream's platform records) and [`colo_core::GuestNic`] (empty on a bare `XenDomain`, see
//! `guest.rs`; [`VifGuest`] puts an AF_PACKET port on the guest's vif in front of it, see
//! `nic.rs` and `vif.rs`, which need no Xen and are tested on veth pairs; with the `xen`
//! feature, `PvVifGuest` gives the guest a vif colo serves itself — `netif.rs` (the ring
//! protocol), `grant.rs`, `pvstate.rs`, `pvnet.rs`, `pvguest.rs`; and `PvVbdGuest` (over a
//! `pvblk::PvVbd`) a disk colo serves itself, whose store the node replicates — `blkif.rs` (the ring protocol),
//! `pvblkstate.rs`, `pvblk.rs`, `pvdisk.rs`).
//!
//! | `Domain` method | Xen call |
//! |---|---|
//! | `page_count` | `xc_domain_maximum_gpfn` + 1 (fixed at [`XenDomain::open`]) |
//! | `pause` / `resume` | `xc_domain_pause` / `xc_domain_unpause` |
//! | `start_dirty_log` / `stop_dirty_log` | `xc_shadow_control(ENABLE_LOGDIRTY / OFF)` |
//! | `harvest_dirty` / `peek_dirty` | `xc_logdirty_control(CLEAN / PEEK)` into one hypercall buffer |
//! | `read_pages` | `xc_get_pfn_type_batch`, then `xenforeignmemory_map(PROT_READ)` of the pages with data, ≤ 1024 pfns a call; holes (XTAB) and per-page errors → `None` |
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
//!   hypervisor by `cargo xtask xen-test` (Xen under QEMU TCG, PVH guests): the selftest of
//!   every method, colo-core's conformance suite, 20 checkpoints verified page by page, then
//!   `colo primary`/`colo secondary` with 20 digest-verified checkpoints and a failover.
//!   `xc_get_pfn_type_batch` is declared here: libxenctrl exports it but only its private
//!   header declares it.
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
//!
//! # What replication needs from the guest (learned on a real Xen 4.17)
//! A checkpoint carries guest memory, the HVM context, TSC info and HVM params — not the
//! state a PVH kernel registers inside Xen by hypercall (event-channel bindings, vCPU-info and
//! runstate areas, grant frames, the one-shot PV timer). So:
//! * the secondary domain is created from the same configuration and boots the same kernel
//!   the same way as the primary, so that Xen holds equivalent registrations for it;
//! * guests boot with `nokaslr`: Xen keeps some registrations by guest-virtual address, which
//!   must mean the same in the primary's memory image;
//! * guests use 2-level event channels (`xen.fifo_events=0` on Linux): the FIFO ABI keeps
//!   each queue's head and tail inside Xen, pointing into event arrays in guest memory; a
//!   replica's Xen would link new events after a tail the copied arrays do not have, and the
//!   replica would never see an event again. With 2-level channels the pending bitmap lives in
//!   each domain's own shared_info page (not guest RAM, never copied) and the per-vCPU
//!   selector in `vcpu_info`. For the ports of the devices colo serves itself (`--pv-vif`,
//!   `--pv-vbd`) the PVM's pending and mask bits travel in the state blob and are restored
//!   in the SVM's page at every load ([`evtbits`]): Linux masks a "late EOI" port while its
//!   handler runs, and a replica whose page kept its own mask bit lost its vif for good;
//! * a replica resumed from a loaded checkpoint must be woken, and its timer re-armed, by
//!   colo: the copied memory and vLAPIC say what the *primary's* Xen had raised and armed, not
//!   this domain's. `resume` after `set_state` therefore (1) clears the upcall vector's bit in
//!   every loaded vLAPIC's IRR ([`state::clear_pending_vector`]): Xen kicks a halted vCPU
//!   only when the vector becomes pending, so a context captured with it pending left the
//!   replica blocked; (2) marks the guest's VIRQ_TIMER ports pending in its shared-info page
//!   ([`XenDomain::raise_timer_virqs`]), so the upcall runs the guest's timer interrupt,
//!   which arms the one-shot timer in *this* Xen (a replica was seen blocked with no event
//!   pending and no timer armed: its kernel believed the timer armed in the primary's Xen and,
//!   idle, never reprogrammed it); (3) injects the upcall vector ([`XenDomain::wake`],
//!   `--upcall-vector`, Linux uses 0xf3) to every vCPU while still paused; then unpauses.
//!   (2) is done only with (3): a timer port left pending without an upcall makes Xen drop
//!   every later event of that port (it raises the upcall only when the bit turns from clear
//!   to set), which left a guest whose own state was loaded back silent for good;
//!   Before (1)–(2), with the wake alone, the replica went on after a takeover in 17 of 19 runs;
//!   without any of it, in 1 of 4;
//! * Xen writes a domain's `vcpu_info` (pending bits, and the time info when a vCPU is
//!   scheduled in) through its own mapping without marking the page in the dirty log; colo's
//!   sweeps find such pages at the first captures and carry them in every checkpoint after
//!   (`colo-cli`'s `verify.rs`, the watch set). With Linux 6.1 PVH guests the page is also one
//!   the guest dirties itself (its per-cpu area) at every checkpoint, and the set stayed empty;
//!   `cargo xtask xen-test` compares both paused domains page by page after a final
//!   checkpoint in production mode;
//! * Xen writes event-channel pending bits into a domain's memory even while it is paused,
//!   so two paused domains' memories can differ by a few bytes right after a checkpoint;
//! * a paused guest's clock keeps running: `get_state` twice is not byte-identical, and
//!   `set_state` bumps the TSC incarnation (as every libxc restore does).

#![warn(missing_docs)]
// Without `xen` nothing outside the tests constructs a XenDomain, so the seam looks unused.
#![cfg_attr(not(feature = "xen"), allow(dead_code))]

mod api;
pub mod blkif;
mod domain;
mod error;
pub mod evtbits;
pub mod grant;
mod guest;
pub mod kvdisk;
pub mod netif;
mod nic;
#[cfg(feature = "xen")]
pub mod pvblk;
pub mod pvblkstate;
pub mod pvdisk;
#[cfg(feature = "xen")]
mod pvguest;
#[cfg(feature = "xen")]
pub mod pvnet;
pub mod pvstate;
#[cfg(feature = "xen")]
pub mod pvsys;
pub mod state;
#[cfg(feature = "xen")]
mod sys;
pub mod vif;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vif_tests;

pub use api::{dominf, DomInfo, MAX_BATCH};
pub use domain::XenDomain;
pub use error::XenError;
pub use nic::{split_state, VifGuest, STATE_TAG};
pub use pvdisk::PvVbdGuest;
#[cfg(feature = "xen")]
pub use pvguest::PvVifGuest;
pub use state::{StateError, TscInfo, XenState};
pub use vif::{enter_netns, PacketPort, PortSignal, VifError, MAX_PORT_FRAME};

//! The node runtime: the IO around colo-core's state machines. One thread per node owns the
//! backend, the replication link, the comparator and the client hub, and executes the
//! machines' actions in order. Everything the hot path (the primary's pause) touches is
//! allocated once and reused: the copy buffer, the state buffer, the bitmaps inside the
//! machines.
//!
//! Files: `driver.rs` is the one driver both roles share ([`Node`]: the loop, the event wait,
//! the outbox flush, the status) and the `Role` interface; `primary.rs` and
//! `secondary.rs` are the two roles, one method per action of their machine; `protect.rs` the
//! primary's re-protection and GOODBYE; `capture.rs` the primary's capture and the sweeps of
//! all memory (digests, pages written behind the dirty log); `pages.rs` the page copies and
//! PAGE_DATA writes. This file holds the options both roles take.

mod capture;
mod disk;
mod driver;
mod pages;
mod primary;
mod protect;
mod secondary;

pub use driver::Node;
pub use primary::PrimaryNode;
pub use secondary::{SecondaryNode, SecondaryOutcome};

use std::sync::Arc;
use std::time::Duration;

use colo_core::compare::CompareConfig;
use colo_core::disk::DiskMirror;
use colo_core::engine::{Liveness, SyncMode};
use colo_core::policy::CheckpointPolicy;
use colo_core::stream::PageCoding;
use colo_core::{BackendError, Domain};
use parking_lot::Mutex;

use crate::status::{NodeStatus, Shared};

/// The longest a node loop sleeps when no deadline and no event is due: the latency of a stop
/// request and of output from a guest without an output signal.
pub const MAX_SLEEP: Duration = Duration::from_millis(100);

/// How often a primary mirroring its disk continuously sends the blocks written since the last
/// mirror round, by default.
pub const DEFAULT_DISK_MIRROR_INTERVAL: Duration = Duration::from_millis(2);

/// Called with (epoch, every page of guest memory, the state blob) at each checkpoint: on the
/// primary at the capture (PVM paused), on the secondary right after applying (SVM paused).
/// For tests that compare both memories byte for byte; costs a copy of all RAM per checkpoint.
#[cfg(feature = "test-support")]
pub type SnapshotHook = Arc<dyn Fn(u64, Vec<u8>, Vec<u8>) + Send + Sync>;

/// Called with (epoch, the whole disk image) at each checkpoint of a guest with a disk: on the
/// primary at the capture (PVM paused), on the secondary right after applying (SVM paused).
/// For tests that compare both disks byte for byte; costs a read of the whole disk.
#[cfg(feature = "test-support")]
pub type DiskSnapshotHook = Arc<dyn Fn(u64, Vec<u8>) + Send + Sync>;

/// Called with every frame the PVM emits, before comparison (for tests that check what clients
/// see against what the primary produced).
#[cfg(feature = "test-support")]
pub type OutputTap = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Settings common to both roles.
#[derive(Clone)]
pub struct NodeOptions {
    /// Heartbeats and failure detection.
    pub liveness: Liveness,
    /// Digest all memory at every checkpoint and compare.
    pub verify: bool,
    /// Captures (the initial synchronisation's first) at which the primary sweeps all memory
    /// for pages the hypervisor wrote behind the dirty log; what they find is re-read at every
    /// later capture. With `verify` every capture sweeps.
    pub unlogged_sweeps: u32,
    /// Pre-shared key.
    pub key: Option<Vec<u8>>,
    /// Where `key` was read from: a primary reads it again before each re-protection, so a
    /// rotated key takes effect without a restart.
    pub key_file: Option<std::path::PathBuf>,
    /// Leave the link's records unsealed although there is a key (`--insecure-plaintext`; both
    /// nodes must agree).
    pub insecure_plaintext: bool,
    /// How page data travels on the link (`--zero-pages`, `--compress`; both nodes must agree).
    pub page_coding: PageCoding,
    /// How disk blocks travel (`--disk-mirror`; both nodes must agree): at the checkpoint, or
    /// mirrored while the PVM runs (see colo-core's `disk.rs`).
    pub disk_mirror: DiskMirror,
    /// TCP connections for the link (`--streams`, 1–16; both nodes must agree): the bytes after
    /// the handshake go round-robin in frames over them (see `link.rs`).
    pub streams: u8,
    /// With continuous mirroring, how often the primary harvests the disk's write log and
    /// sends the blocks written since (`--disk-mirror-interval-ms`).
    pub disk_mirror_interval: Duration,
    /// Checkpoint policy (primary).
    pub policy: CheckpointPolicy,
    /// Comparator settings (primary).
    pub compare: CompareConfig,
    /// D = A ∪ B or D = A (primary).
    pub sync_mode: SyncMode,
    /// Client-facing address for the mock network path (primary; a secondary binds it when it
    /// takes over).
    pub client_addr: Option<String>,
    /// The service network's interface (`--service-if`, Xen): an AF_PACKET port that takes the
    /// place of `client_addr` (primary; a secondary opens it when it takes over).
    pub service_if: Option<String>,
    /// Command run before this node goes on alone (takeover, or a primary running
    /// unprotected); the node stops instead if it fails (split-brain fencing).
    pub fence_cmd: Option<String>,
    /// How long to wait for the peer to appear.
    pub connect_timeout: Duration,
    /// The pair's arbiter (`--arbiter`): a primary releases output alone only under its lease,
    /// a secondary takes over only once it holds the serving key. Shared by the node a
    /// secondary becomes when it takes over.
    pub arbiter: Option<Arc<crate::arbiter::Arbiter>>,
    /// TCP alignment on the secondary (colo-core's `align.rs`; on by default). Off
    /// (`--no-tcp-align`, a diagnostic): mirrored input reaches the SVM as the client sent it,
    /// so every TCP connection opened since the last checkpoint costs a mismatch checkpoint.
    pub tcp_align: bool,
    /// Memory snapshots at each checkpoint, for tests (feature `test-support`).
    #[cfg(feature = "test-support")]
    pub snapshot: Option<SnapshotHook>,
    /// Every PVM output frame, for tests (feature `test-support`).
    #[cfg(feature = "test-support")]
    pub output_tap: Option<OutputTap>,
    /// Disk snapshots at each checkpoint, for tests (feature `test-support`).
    #[cfg(feature = "test-support")]
    pub disk_snapshot: Option<DiskSnapshotHook>,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("liveness", &self.liveness)
            .field("verify", &self.verify)
            .field("has_key", &self.key.is_some())
            .field("insecure_plaintext", &self.insecure_plaintext)
            .field("page_coding", &self.page_coding)
            .field("disk_mirror", &self.disk_mirror)
            .field("streams", &self.streams)
            .field("policy", &self.policy)
            .field("sync_mode", &self.sync_mode)
            .field("client_addr", &self.client_addr)
            .field("service_if", &self.service_if)
            .field("arbiter", &self.arbiter.is_some())
            .finish()
    }
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            liveness: Liveness::default(),
            verify: false,
            unlogged_sweeps: 0,
            key: None,
            key_file: None,
            insecure_plaintext: false,
            page_coding: PageCoding::PLAIN,
            disk_mirror: DiskMirror::default(),
            streams: 1,
            disk_mirror_interval: DEFAULT_DISK_MIRROR_INTERVAL,
            policy: CheckpointPolicy::default(),
            compare: CompareConfig::default(),
            sync_mode: SyncMode::Backchannel,
            client_addr: None,
            service_if: None,
            fence_cmd: None,
            connect_timeout: Duration::from_secs(30),
            arbiter: None,
            tcp_align: true,
            #[cfg(feature = "test-support")]
            snapshot: None,
            #[cfg(feature = "test-support")]
            output_tap: None,
            #[cfg(feature = "test-support")]
            disk_snapshot: None,
        }
    }
}

/// The test hooks, which are no-ops in a build without `test-support` (the shipped binary).
impl NodeOptions {
    /// A memory snapshot is wanted at each checkpoint.
    fn snapshots(&self) -> bool {
        #[cfg(feature = "test-support")]
        return self.snapshot.is_some();
        #[cfg(not(feature = "test-support"))]
        false
    }

    /// Hands (epoch, all of `dom`'s memory, `state`) to the snapshot hook, if there is one.
    #[cfg_attr(not(feature = "test-support"), allow(unused_variables))]
    fn take_snapshot(
        &self,
        dom: &mut dyn Domain,
        epoch: u64,
        state: &[u8],
    ) -> Result<(), BackendError> {
        #[cfg(feature = "test-support")]
        if let Some(hook) = &self.snapshot {
            let pfns: Vec<u64> = (0..dom.page_count()).collect();
            let mut ram = Vec::new();
            pages::copy_pages(dom, &pfns, &mut ram, None)?;
            hook(epoch, ram, state.to_vec());
        }
        Ok(())
    }

    /// Hands a frame the PVM emitted to the output tap, if there is one.
    #[cfg_attr(not(feature = "test-support"), allow(unused_variables))]
    fn tap(&self, frame: &[u8]) {
        #[cfg(feature = "test-support")]
        if let Some(tap) = &self.output_tap {
            tap(frame);
        }
    }
}

/// Builds a status handle.
pub fn new_status() -> Shared {
    Arc::new(Mutex::new(NodeStatus::default()))
}

#[cfg(test)]
mod tests {
    use super::pages::write_typed_pages;
    use super::*;
    use colo_core::stream::{Decoder, DecoderConfig, Event, PageType};
    use colo_core::PAGE_SIZE;

    #[test]
    fn a_secondary_turned_primary_publishes_role_and_state_together() {
        // The status a secondary leaves behind when it takes over.
        let status = new_status();
        {
            let mut st = status.lock();
            st.role = "secondary".into();
            st.state = "AwaitingNew".into();
            st.protected = true;
        }
        let guest = crate::mock::build(&crate::mock::MockSpec {
            ram: 4 << 20,
            ram_file: None,
            workload: crate::mock::WorkloadKind::Kv,
            vm_seed: 1,
            memory_divergence: false,
            output_divergence: 0.0,
            dirty_rate: 0,
        })
        .unwrap();
        let _node =
            PrimaryNode::with_link(guest, None, NodeOptions::default(), status.clone()).unwrap();
        let st = status.lock();
        assert_eq!(st.role, "primary");
        assert_eq!(st.state, "Unprotected");
        assert!(!st.protected);
    }

    #[test]
    fn unmappable_pages_travel_as_xtab_without_data() {
        // 1030 pfns (two records); every third page cannot be mapped.
        let pfns: Vec<u64> = (0..1030).collect();
        let present: Vec<bool> = pfns.iter().map(|p| p % 3 != 0).collect();
        let mut data = Vec::new();
        for (&p, &ok) in pfns.iter().zip(&present) {
            if ok {
                data.extend(std::iter::repeat_n(p as u8, PAGE_SIZE));
            }
        }
        let mut wire = Vec::new();
        let (mut scratch, mut entries) = (Vec::new(), Vec::new());
        let n = write_typed_pages(
            &mut wire,
            &pfns,
            &present,
            &data,
            &mut scratch,
            &mut entries,
        )
        .unwrap();
        assert_eq!(n as usize, wire.len());
        let mut dec = Decoder::new(DecoderConfig {
            expect_headers: false,
            page_count: Some(2048),
        });
        let mut seen = Vec::new();
        let mut input = &wire[..];
        loop {
            let (used, ev) = dec.feed(input).unwrap();
            input = &input[used..];
            match ev {
                Some(Event::Page {
                    pfn,
                    page_type,
                    data,
                }) => {
                    match data {
                        Some(d) => assert!(d.iter().all(|&b| b == pfn as u8)),
                        None => assert_eq!(page_type, PageType::Xtab),
                    }
                    seen.push((pfn, data.is_some()));
                }
                Some(_) => {}
                None if input.is_empty() => break,
                None => {}
            }
        }
        let want: Vec<(u64, bool)> = pfns.iter().copied().zip(present.iter().copied()).collect();
        assert_eq!(seen, want);
    }
}

//! The node drivers: the IO around colo-core's state machines. One thread per node owns the
//! backend, the replication link, the comparator and the client hub, and executes the machines'
//! actions in order. Everything the hot path (the primary's pause) touches is allocated once and
//! reused: the copy buffer, the state buffer, the bitmaps inside the machines.
//!
//! Files: this one holds what both roles share (the guest contract, options, the event wait,
//! the outbox flush); `primary.rs` the primary's driver (capture and the sweeps for pages
//! written behind the dirty log included), `secondary.rs` the secondary's, `pages.rs` the page
//! copies and PAGE_DATA writes both use.

mod pages;
mod primary;
mod secondary;

use pages::{copy_pages, flush_sync_pages, write_typed_pages};
pub use primary::PrimaryNode;
pub use secondary::{SecondaryNode, SecondaryOutcome};

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use colo_core::compare::CompareConfig;
use colo_core::engine::{Liveness, SyncMode};
use colo_core::policy::CheckpointPolicy;
use colo_core::stream::{
    encode_page_data_header, DecoderConfig, Event, PageType, MAX_PAGES_PER_RECORD,
};
use colo_core::{BackendError, Domain};
use parking_lot::Mutex;

use crate::link::Link;
use crate::status::{NodeStatus, Shared};

/// A guest's network interface as the node sees it (the mock's vif; Xen frames would come from
/// the guest's vif through the same calls).
pub trait GuestNic {
    /// Sequence number of the next request the guest expects (kept in guest memory, so a
    /// checkpoint carries it).
    fn rx_next_seq(&self) -> u64;
    /// Gives request `seq` to the guest; `Ok(false)` when its ring is full.
    fn inject(&mut self, seq: u64, frame: &[u8]) -> Result<bool, BackendError>;
    /// Hands every frame the guest emitted since the last call to `out`, in order.
    fn drain_tx(&mut self, out: &mut dyn FnMut(&[u8]));
    /// A channel holding a message whenever the guest emitted output since the last message
    /// was taken, so the node loop can sleep until then. None (a guest without the signal, or
    /// without a NIC): the loop looks for output whenever it wakes, at least every
    /// [`MAX_SLEEP`].
    fn output_ready(&self) -> Option<crossbeam_channel::Receiver<()>> {
        None
    }
}

/// The longest a node loop sleeps when no deadline and no event is due: the latency of a stop
/// request and of output from a guest without an output signal.
pub const MAX_SLEEP: Duration = Duration::from_millis(100);

/// The loop's sleep while requests wait for room in the guest's RX ring (the guest frees room
/// as it answers, which the output signal announces; this bounds a guest that drops a request).
const RING_RETRY: Duration = Duration::from_millis(1);

/// Sleeps until `wait` has passed or one of a node's event sources has something: bytes on
/// the link, a client request, a control command, guest output. The loop then looks at all of
/// them; deadlines (heartbeats, timeouts, the checkpoint policy) bound `wait`.
fn wait_for_events<C, K>(
    wait: Duration,
    link: Option<&Link>,
    clients: Option<&crossbeam_channel::Receiver<C>>,
    commands: Option<&crossbeam_channel::Receiver<K>>,
    output: Option<&crossbeam_channel::Receiver<()>>,
) {
    if wait.is_zero() {
        return;
    }
    let mut sel = crossbeam_channel::Select::new();
    let mut sources = 0;
    if let Some(l) = link {
        match l.wait_handle() {
            Some(rx) => {
                sel.recv(rx);
                sources += 1;
            }
            None => return,
        }
    }
    if let Some(rx) = clients {
        sel.recv(rx);
        sources += 1;
    }
    if let Some(rx) = commands {
        sel.recv(rx);
        sources += 1;
    }
    if let Some(rx) = output {
        sel.recv(rx);
        sources += 1;
    }
    if sources == 0 {
        std::thread::sleep(wait);
    } else {
        let _ = sel.ready_timeout(wait);
    }
}

/// What a node needs from its guest.
pub trait Guest: Domain + GuestNic {}
impl<T: Domain + GuestNic> Guest for T {}

/// Called with (epoch, every page of guest memory, the state blob) at each checkpoint: on the
/// primary at the capture (PVM paused), on the secondary right after applying (SVM paused).
/// For tests that compare both memories byte for byte; costs a copy of all RAM per checkpoint.
pub type SnapshotHook = Arc<dyn Fn(u64, Vec<u8>, Vec<u8>) + Send + Sync>;

/// Called with every frame the PVM emits, before comparison (for tests that check what clients
/// see against what the primary produced).
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
    /// Checkpoint policy (primary).
    pub policy: CheckpointPolicy,
    /// Comparator settings (primary).
    pub compare: CompareConfig,
    /// D = A ∪ B or D = A (primary).
    pub sync_mode: SyncMode,
    /// Client-facing address for the mock network path (primary; a secondary binds it when it
    /// takes over).
    pub client_addr: Option<String>,
    /// Command run before this node goes on alone (takeover, or a primary running
    /// unprotected); the node stops instead if it fails (split-brain fencing).
    pub fence_cmd: Option<String>,
    /// How long to wait for the peer to appear.
    pub connect_timeout: Duration,
    /// Memory snapshots at each checkpoint, for tests.
    pub snapshot: Option<SnapshotHook>,
    /// Every PVM output frame, for tests.
    pub output_tap: Option<OutputTap>,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("liveness", &self.liveness)
            .field("verify", &self.verify)
            .field("has_key", &self.key.is_some())
            .field("insecure_plaintext", &self.insecure_plaintext)
            .field("policy", &self.policy)
            .field("sync_mode", &self.sync_mode)
            .field("client_addr", &self.client_addr)
            .finish()
    }
}

fn snapshot(
    dom: &mut dyn Domain,
    hook: &Option<SnapshotHook>,
    epoch: u64,
    state: &[u8],
) -> Result<(), BackendError> {
    let Some(hook) = hook else { return Ok(()) };
    let pfns: Vec<u64> = (0..dom.page_count()).collect();
    let mut ram = Vec::new();
    copy_pages(dom, &pfns, &mut ram, None)?;
    hook(epoch, ram, state.to_vec());
    Ok(())
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
            policy: CheckpointPolicy::default(),
            compare: CompareConfig::default(),
            sync_mode: SyncMode::Backchannel,
            client_addr: None,
            fence_cmd: None,
            connect_timeout: Duration::from_secs(30),
            snapshot: None,
            output_tap: None,
        }
    }
}

fn nonce() -> [u8; 32] {
    use rand::RngCore;
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// Longest stretch the loop spends consuming the link before it looks at timers again.
const MAX_READ_SLICE: Duration = Duration::from_millis(20);

/// Why the link to `peer` ("primary" or "secondary") ends after the machine refused its input:
/// a refusal at the handshake (a setting that differs) is not a broken protocol.
fn protocol_error(peer: &str, e: &colo_core::engine::EngineError) -> String {
    match e {
        colo_core::engine::EngineError::Link(l) => {
            format!("the link handshake refused the {peer}: {l}")
        }
        e => format!("{peer} broke the protocol: {e}"),
    }
}

fn run_fence(cmd: &Option<String>, instead: &str) -> Result<()> {
    let Some(cmd) = cmd else { return Ok(()) };
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .with_context(|| format!("running fence command `{cmd}`"))?;
    if !status.success() {
        bail!("fence command `{cmd}` failed ({status}); {instead}");
    }
    Ok(())
}

/// Writes a state machine's outbox to the link (or drops it when there is no link) and clears it;
/// once the handshake is over (`keepalive`: the heartbeat interval), makes sure the link's
/// keepalive runs.
fn flush_outbox(
    link: Option<&mut Link>,
    out: &mut Vec<u8>,
    keepalive: Option<Duration>,
) -> std::io::Result<()> {
    let Some(link) = link else {
        out.clear();
        return Ok(());
    };
    let res = link.send(out);
    out.clear();
    res?;
    match keepalive {
        Some(interval) => link.start_keepalive(interval).map_err(|e| {
            std::io::Error::new(e.kind(), format!("starting the link keepalive: {e}"))
        }),
        None => Ok(()),
    }
}

/// Builds a status handle.
pub fn new_status() -> Shared {
    Arc::new(Mutex::new(NodeStatus::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_core::stream::Decoder;
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

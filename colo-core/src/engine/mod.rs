//! The COLO checkpoint engine: sans-IO state machines for the primary and the secondary.
//!
//! The machines never touch a socket, a backend or the clock. The node driver (colo-cli) feeds
//! them what happened — a record from the peer, a backend operation finished, the current time —
//! and executes the [`PrimaryAction`]s / [`SecondaryAction`]s they queue, in order.
//!
//! # One checkpoint
//!
//! ```text
//!  PRIMARY (PVM runs)                                   SECONDARY (SVM runs, epoch n-1)
//!  policy says "checkpoint"
//!  ── CONTROL NEW(n) ─────────────────────────────────▶  pause SVM, harvest B
//!  PVM keeps running meanwhile                          ◀── CONTROL SVM_SUSPENDED(n)
//!                                                       ◀── CHECKPOINT_DIRTY_PFN_LIST(B)  (back channel)
//!  ┌ pause PVM ─ drain its output ─ harvest A
//!  │ D = A ∪ B   (primary-only mode: D = A)
//!  │ copy D's pages + vCPU state into the send buffer [and the disk blocks written, E]
//!  └ resume PVM            ◀── the pause ends here
//!  ── PAGE_DATA(D)… [DISK_BLOCKS(E)…] VCPU_STATE, CHECKPOINT(n) ─▶  stage everything (bounded
//!                                                       by |D|, the disk by its block count)
//!                                                       on CHECKPOINT: write pages, set state
//!                                                       [disk: drop the SVM's overlay, write E]
//!                                                       [verify: digest RAM + state (+ disk)]
//!                                                       ◀── CONTROL SVM_READY(n) [DIGEST(n)]
//!  release the PVM output held at the pause             resume SVM (epoch n)
//!                                                       ◀── CONTROL SVM_RESUMED(n)
//! ```
//!
//! Why the primary pauses only after B arrives: B is fixed once the SVM is suspended, and A is
//! whatever the PVM dirtied up to its own pause, so the PVM can keep running during the round
//! trip for B. Why it resumes before sending: the pages are copied out while paused (a memcpy,
//! several times faster than the link), so the pause is bounded by memory bandwidth instead of
//! the network. Output produced after the resume is held by the comparator until the secondary
//! acknowledges the checkpoint with SVM_READY, so a primary crash before that loses nothing that
//! any client saw. The initial synchronisation is checkpoint 0: pre-copy rounds of pages while
//! the PVM runs, then a final pause-copy-resume whose CHECKPOINT(0) starts the SVM. The disk
//! (when the guest has one) follows the same rule; see [`crate::disk`].
//!
//! # States
//!
//! Each state is named for what the machine awaits in it, and carries the data it uses: a
//! checkpoint's figures, instants and digests live in the states between its start and its
//! commit, so no flag can claim a step the state has not reached. The big buffers (A, B, the
//! capture set, the staged pages) stay in the machine and are reused. The `tidy` test in xtask
//! fails when a state of [`PrimaryState`] or [`SecondaryState`] or a field one carries is missing
//! from these diagrams, or when they name a state that does not exist.
//!
//! ```text
//! PRIMARY
//!  AwaitingHandshake ──HELLO [AUTH]──▶ PreCopySending(0)
//!  PreCopySending(r) ──pages_sent──▶ PreCopyHarvesting(r)
//!  PreCopyHarvesting(r) ──harvested──▶ PreCopySending(r+1)   (another round is worth it)
//!                                    └▶ Pausing(0)           (converged: checkpoint 0)
//!  Running ──start_checkpoint──▶ AwaitingBackChannel(n) ──SVM_SUSPENDED + B──▶ Pausing(n)
//!  Pausing(n) ──paused──▶ Harvesting(n) ──harvested──▶ Capturing(n) ──captured──▶ Resuming(n)
//!  Resuming(n) ──resumed──▶ Sending(n) ──capture_sent──▶ AwaitingSvmReady(n)
//!  AwaitingSvmReady(n) ──SVM_READY──▶ AwaitingSvmResumed(n) ──SVM_RESUMED──▶ Running
//!  any state ──peer lost (silence, stuck progress, broken protocol, GOODBYE)──▶ Unprotected
//!                                                (a paused PVM is resumed first)
//!
//!  state                                  carries (flight: the checkpoint's figures and start)
//!  PreCopySending, PreCopyHarvesting      round, flight (checkpoint 0, from the handshake's end)
//!  AwaitingBackChannel                    flight, suspended (SVM_SUSPENDED came, B is next)
//!  Pausing                                flight
//!  Harvesting                             flight, paused_at
//!  Capturing                              flight, paused_at, harvested_at
//!  Resuming                               flight, paused_at, digest (ours, when verifying)
//!  Sending                                flight, resumed_at, digest
//!  AwaitingSvmReady                       flight, sent_at, digest, peer_digest
//!  AwaitingSvmResumed                     the epoch only: the checkpoint is committed
//!
//! SECONDARY
//!  AwaitingHandshake ──headers, HELLO [AUTH]──▶ InitialSync ──CHECKPOINT(0)──▶ Applying(0)
//!  Applying(n) ──applied──▶ Resuming(n) ──resumed──▶ AwaitingNew(n)
//!  AwaitingNew(n) ──NEW(n+1)──▶ Pausing(n+1) ──paused──▶ Harvesting(n+1) ──harvested, B sent──▶
//!  ReceivingCheckpoint(n+1) ──CHECKPOINT(n+1)──▶ Applying(n+1)
//!  Applying(n) ──primary lost──▶ Applying(n) ──applied──▶ TakenOver   (it is complete: apply it)
//!  any state after the handshake ──GOODBYE──▶ Closed
//!  any other state ──primary lost──▶ TakenOver (a complete checkpoint is held: the SVM serves,
//!                                              resumed first if paused)
//!                                  └▶ Failed    (none is held yet: nothing to serve from)
//!
//!  state                                  carries
//!  InitialSync, ReceivingCheckpoint       state_staged (VCPU_STATE came: CHECKPOINT may follow)
//!  Applying                               primary_lost (why, when the primary was lost meanwhile)
//! ```
//!
//! An event that is not valid in a state is [`EngineError::Unexpected`], naming both.

mod common;
pub mod link;
pub mod messages;
mod primary;
mod secondary;

pub use common::LinkConfig;
pub use primary::{InFlight, Primary, PrimaryAction, PrimaryConfig, PrimaryState, Verdict};
pub use secondary::{
    Delivery, Secondary, SecondaryAction, SecondaryConfig, SecondaryState, GOODBYE_DROPPED,
};

use std::time::Duration;
use thiserror::Error;

use crate::stream::StreamError;
use link::LinkError;
use messages::MessageError;

/// How the primary chooses the pages of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// D = A ∪ B: the secondary's dirty set comes over the back channel (Xen's design; correct).
    #[default]
    Backchannel,
    /// D = A: the secondary's own writes are never undone. Exists to show why the back channel
    /// is needed; the memory check fails in this mode.
    PrimaryOnly,
}

impl std::str::FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "backchannel" => Ok(SyncMode::Backchannel),
            "primary-only" => Ok(SyncMode::PrimaryOnly),
            other => Err(format!(
                "unknown sync mode `{other}` (expected backchannel or primary-only)"
            )),
        }
    }
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncMode::Backchannel => "backchannel",
            SyncMode::PrimaryOnly => "primary-only",
        })
    }
}

/// Heartbeat and failure-detection settings shared by both roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A heartbeat is sent when nothing else was sent for this long.
    pub interval: Duration,
    /// The peer is declared lost when nothing arrived from it for this long.
    pub timeout: Duration,
    /// The peer is declared stuck when a checkpoint makes no progress for this long although
    /// the link is alive.
    pub progress_timeout: Duration,
}

impl Default for Liveness {
    /// 50 ms heartbeats and a 500 ms silence timeout: ten missed heartbeats, far above loopback
    /// and LAN jitter, while keeping failover well under a second. A checkpoint of a 4 GiB guest
    /// with everything dirty takes seconds on a slow link, hence the longer progress timeout.
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            progress_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a checkpoint was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The initial synchronisation (checkpoint 0).
    InitialSync,
    /// The outputs differed (or a frame waited too long, or the comparator's queue filled).
    Mismatch,
    /// The maximum interval passed.
    Periodic,
    /// An operator or test asked.
    Manual,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trigger::InitialSync => "initial-sync",
            Trigger::Mismatch => "mismatch",
            Trigger::Periodic => "periodic",
            Trigger::Manual => "manual",
        })
    }
}

/// Figures of one checkpoint, as the primary saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointStats {
    /// The checkpoint's number (0 = initial synchronisation).
    pub epoch: u64,
    /// Why it was taken.
    pub trigger: Trigger,
    /// |A|: pages the PVM dirtied.
    pub dirty_primary: u64,
    /// |B|: pages the SVM dirtied (0 for the initial synchronisation).
    pub dirty_secondary: u64,
    /// |B − A|: pages only the SVM dirtied (what primary-only mode would miss).
    pub secondary_only: u64,
    /// |D|: pages sent.
    pub pages_sent: u64,
    /// Pages outside D whose contents changed behind the dirty log since they were last sent
    /// (the hypervisor wrote them), found by a sweep of all memory and sent as well (counted in
    /// `pages_sent`; a sweep runs at every capture with verification, else at the first few).
    pub unlogged: u64,
    /// Pages outside A ∪ B carried because earlier sweeps found the hypervisor writing them
    /// behind the dirty log (the watch set; counted in `pages_sent`).
    pub watched: u64,
    /// Disk blocks copied within the pause and sent after it (the blocks the PVM wrote since
    /// the last capture, or with continuous mirroring since the last mirror harvest: the unsent
    /// tail; see [`crate::disk`]).
    pub disk_blocks: u64,
    /// Disk blocks sent for this checkpoint while the PVM ran (continuous mirroring; 0 at the
    /// checkpoint mode).
    pub disk_mirrored: u64,
    /// Bytes sent for this checkpoint (records included).
    pub bytes_sent: u64,
    /// From NEW to the arrival of B (0 for the initial synchronisation).
    pub backchannel: Duration,
    /// From the PVM's pause to its resume: the figure of merit.
    pub pause: Duration,
    /// Harvesting A (within the pause).
    pub harvest: Duration,
    /// Copying D's pages and the state (within the pause).
    pub capture: Duration,
    /// Writing the checkpoint to the link (after the resume).
    pub send: Duration,
    /// From the end of sending to SVM_READY.
    pub commit: Duration,
    /// From the start (NEW) to SVM_READY.
    pub total: Duration,
}

/// Errors of the engine: the peer broke the protocol, or the driver misused the machine.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// An event that is not valid in the current state.
    #[error("in state {state}, unexpected {event}")]
    Unexpected {
        /// The state, named for what it awaits.
        state: &'static str,
        /// The event.
        event: String,
    },
    /// The handshake failed.
    #[error("link handshake: {0}")]
    Link(#[from] LinkError),
    /// A malformed stream from the peer.
    #[error("stream from peer: {0}")]
    Stream(#[from] StreamError),
    /// A malformed colo record from the peer.
    #[error("colo record from peer: {0}")]
    Message(#[from] MessageError),
    /// A control message for the wrong checkpoint.
    #[error("{msg} for checkpoint {got} while checkpoint {want} is in progress")]
    WrongEpoch {
        /// The message.
        msg: &'static str,
        /// Its epoch.
        got: u64,
        /// The epoch in progress.
        want: u64,
    },
    /// The peer named a pfn beyond the guest.
    #[error("peer sent pfn {pfn:#x}, beyond the guest's {pages} pages")]
    PfnOutOfRange {
        /// The pfn.
        pfn: u64,
        /// The page count.
        pages: u64,
    },
    /// The primary sent more pages in one checkpoint than the guest has (a lying or broken peer).
    #[error("checkpoint {epoch} carries more than the guest's {pages} pages")]
    CheckpointTooLarge {
        /// The checkpoint.
        epoch: u64,
        /// The page count.
        pages: u64,
    },
    /// The peer named a disk block beyond the disk.
    #[error("peer sent disk block {block}, beyond the disk's {blocks} blocks")]
    BlockOutOfRange {
        /// The block.
        block: u64,
        /// The disk's size in blocks.
        blocks: u64,
    },
    /// The driver's addition to the capture set breaks its invariants (a driver bug).
    #[error("capture_also: pfn {pfn:#x} {reason}")]
    BadCapture {
        /// The offending pfn.
        pfn: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl EngineError {
    pub(crate) fn unexpected(state: &'static str, event: impl Into<String>) -> Self {
        EngineError::Unexpected {
            state,
            event: event.into(),
        }
    }
}

/// Length of a verification digest.
pub use messages::DIGEST_LEN;

/// Digest of a whole guest (every page, in pfn order, then the vCPU/platform state) for the
/// verification option: xxh3-128 over the sequence of per-page xxh3-64 hashes, and xxh3-128 over
/// the state. A page the backend cannot map counts as a zero page, at the cost of one 8-byte
/// update: a guest of 4 GiB of pfns with 100 MiB populated digests in the time of its 100 MiB.
pub struct Digester {
    pages: xxhash_rust::xxh3::Xxh3,
    zero_page: [u8; 8],
}

impl std::fmt::Debug for Digester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Digester")
    }
}

impl Default for Digester {
    fn default() -> Self {
        Self::new()
    }
}

impl Digester {
    /// An empty digest.
    pub fn new() -> Self {
        Self {
            pages: xxhash_rust::xxh3::Xxh3::new(),
            zero_page: xxhash_rust::xxh3::xxh3_64(&[0u8; crate::stream::PAGE_SIZE]).to_le_bytes(),
        }
    }

    /// Adds the next page (pfn order).
    pub fn page(&mut self, data: &[u8]) {
        self.page_hash(Self::hash_page(data));
    }

    /// Adds the next page (pfn order) by its [`Digester::hash_page`].
    pub fn page_hash(&mut self, hash: u64) {
        self.pages.update(&hash.to_le_bytes());
    }

    /// The hash a page contributes to the digest.
    pub fn hash_page(data: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(data)
    }

    /// The hash an unmappable page contributes (that of a page of zeros).
    pub fn absent_hash(&self) -> u64 {
        u64::from_le_bytes(self.zero_page)
    }

    /// Adds the next page (pfn order) when it cannot be mapped: the same as a page of zeros.
    pub fn absent_page(&mut self) {
        self.pages.update(&self.zero_page);
    }

    /// The final digest, given the state blob.
    pub fn finish(&self, state: &[u8]) -> [u8; DIGEST_LEN] {
        let mut out = [0u8; DIGEST_LEN];
        out[..16].copy_from_slice(&self.pages.digest128().to_le_bytes());
        out[16..].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(state).to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_page_digests_as_zeros_and_order_and_content_count() {
        let zero = [0u8; crate::stream::PAGE_SIZE];
        let mut one = [0u8; crate::stream::PAGE_SIZE];
        one[100] = 1;
        let digest = |pages: &[Option<&[u8]>], state: &[u8]| {
            let mut d = Digester::new();
            for p in pages {
                match p {
                    Some(p) => d.page(p),
                    None => d.absent_page(),
                }
            }
            d.finish(state)
        };
        let base = digest(&[Some(&one), None], b"s");
        assert_eq!(base, digest(&[Some(&one), Some(&zero)], b"s"));
        assert_ne!(base, digest(&[None, Some(&one)], b"s"), "order counts");
        assert_ne!(
            base,
            digest(&[Some(&one), Some(&one)], b"s"),
            "content counts"
        );
        assert_ne!(base, digest(&[Some(&one), None], b"t"), "state counts");
        assert_ne!(base, digest(&[Some(&one)], b"s"), "length counts");
    }
}

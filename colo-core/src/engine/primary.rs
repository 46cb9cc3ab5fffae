//! The primary's state machine: initial synchronisation (pre-copy + checkpoint 0), then one
//! checkpoint after another, each computing D = A ∪ B from its own dirty log and the secondary's
//! back channel. See the module docs of [`super`] for the diagram.

use std::collections::VecDeque;
use std::time::Instant;

use super::common::{check_epoch, message_event, record_name, EngineState, LinkConfig, Peer};
use super::messages::{Control, Message, Role, DIGEST_LEN};
use super::{CheckpointStats, EngineError, SyncMode, Trigger};
use crate::bitmap::DirtyBitmap;
use crate::disk::{DiskCheck, DiskMirror, DISK_DIGEST_LEN};
use crate::stream::{encode_record, rec_type, DomainHeader, DomainType, ImageHeader, Record};

/// Settings of the primary.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// The link: geometry, liveness, verification, key.
    pub link: LinkConfig,
    /// Backchannel (D = A ∪ B) or primary-only (D = A).
    pub sync_mode: SyncMode,
    /// Pre-copy stops after this many rounds...
    pub precopy_max_rounds: u32,
    /// ...or as soon as a round leaves at most this many dirty pages for the final pause.
    pub precopy_target_pages: u64,
}

impl PrimaryConfig {
    /// Defaults for a guest of `page_count` pages: 8 pre-copy rounds or ≤ 1024 pages left.
    pub fn new(page_count: u64) -> Self {
        Self {
            link: LinkConfig::new(page_count),
            sync_mode: SyncMode::Backchannel,
            precopy_max_rounds: 8,
            precopy_target_pages: 1024,
        }
    }
}

/// The checkpoint in flight, carried by the states that own it: its figures so far and when it
/// started (NEW sent; the handshake's end for checkpoint 0). Committing it ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    stats: CheckpointStats,
    started: Instant,
}

impl InFlight {
    fn new(epoch: u64, trigger: Trigger, now: Instant) -> Self {
        let zero = std::time::Duration::ZERO;
        let stats = CheckpointStats {
            epoch,
            trigger,
            dirty_primary: 0,
            dirty_secondary: 0,
            secondary_only: 0,
            unlogged: 0,
            watched: 0,
            pages_sent: 0,
            disk_blocks: 0,
            disk_mirrored: 0,
            bytes_sent: 0,
            backchannel: zero,
            pause: zero,
            harvest: zero,
            capture: zero,
            send: zero,
            commit: zero,
            total: zero,
        };
        Self {
            stats,
            started: now,
        }
    }

    /// The checkpoint's figures so far.
    pub fn stats(&self) -> &CheckpointStats {
        &self.stats
    }
}

/// What the primary awaits. A state in which a checkpoint is in flight carries it ([`InFlight`])
/// and the instants and digests of its steps so far; a state carries nothing it does not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryState {
    /// The secondary's HELLO / AUTH.
    AwaitingHandshake,
    /// The driver to finish sending a pre-copy round (`pages_sent`).
    PreCopySending {
        /// Round number, from 0 (all pages).
        round: u32,
        /// Checkpoint 0.
        flight: InFlight,
    },
    /// The driver to harvest the pages dirtied during a pre-copy round (`harvested`).
    PreCopyHarvesting {
        /// Round just sent.
        round: u32,
        /// Checkpoint 0.
        flight: InFlight,
    },
    /// A checkpoint trigger (`start_checkpoint`); the pair is protected.
    Running,
    /// SVM_SUSPENDED and the secondary's dirty pfn list for checkpoint `epoch`.
    AwaitingBackChannel {
        /// The checkpoint in progress.
        epoch: u64,
        /// SVM_SUSPENDED already arrived.
        suspended: bool,
        /// Its figures so far.
        flight: InFlight,
    },
    /// The driver to pause the PVM (`paused`).
    Pausing {
        /// The checkpoint in progress.
        epoch: u64,
        /// Its figures so far.
        flight: InFlight,
    },
    /// The driver to harvest A (`harvested`).
    Harvesting {
        /// The checkpoint in progress.
        epoch: u64,
        /// Its figures so far.
        flight: InFlight,
        /// When the PVM paused.
        paused_at: Instant,
    },
    /// The driver to copy D's pages and the state (`captured`).
    Capturing {
        /// The checkpoint in progress.
        epoch: u64,
        /// Its figures so far.
        flight: InFlight,
        /// When the PVM paused.
        paused_at: Instant,
        /// When A was harvested.
        harvested_at: Instant,
    },
    /// The driver to resume the PVM (`resumed`).
    Resuming {
        /// The checkpoint in progress.
        epoch: u64,
        /// Its figures so far.
        flight: InFlight,
        /// When the PVM paused.
        paused_at: Instant,
        /// Our digest of memory and state, when verifying and settled.
        digest: Option<[u8; DIGEST_LEN]>,
    },
    /// The driver to send the captured checkpoint (`capture_sent`).
    Sending {
        /// The checkpoint in progress.
        epoch: u64,
        /// Its figures so far.
        flight: InFlight,
        /// When the PVM resumed.
        resumed_at: Instant,
        /// Our digest of memory and state, when verifying and settled.
        digest: Option<[u8; DIGEST_LEN]>,
    },
    /// SVM_READY: the secondary holds the checkpoint complete.
    AwaitingSvmReady {
        /// The checkpoint in progress.
        epoch: u64,
        /// Its figures so far.
        flight: InFlight,
        /// When CHECKPOINT was queued.
        sent_at: Instant,
        /// Our digest of memory and state, when verifying and settled.
        digest: Option<[u8; DIGEST_LEN]>,
        /// The secondary's digest (DIGEST precedes SVM_READY), if it sent one.
        peer_digest: Option<[u8; DIGEST_LEN]>,
    },
    /// SVM_RESUMED.
    AwaitingSvmResumed {
        /// The checkpoint just committed.
        epoch: u64,
    },
    /// Nothing: the secondary is lost and the PVM runs alone.
    Unprotected,
}

impl PrimaryState {
    /// The state's name, for errors and status output.
    pub fn name(&self) -> &'static str {
        match self {
            PrimaryState::AwaitingHandshake => "AwaitingHandshake",
            PrimaryState::PreCopySending { .. } => "PreCopySending",
            PrimaryState::PreCopyHarvesting { .. } => "PreCopyHarvesting",
            PrimaryState::Running => "Running",
            PrimaryState::AwaitingBackChannel { .. } => "AwaitingBackChannel",
            PrimaryState::Pausing { .. } => "Pausing",
            PrimaryState::Harvesting { .. } => "Harvesting",
            PrimaryState::Capturing { .. } => "Capturing",
            PrimaryState::Resuming { .. } => "Resuming",
            PrimaryState::Sending { .. } => "Sending",
            PrimaryState::AwaitingSvmReady { .. } => "AwaitingSvmReady",
            PrimaryState::AwaitingSvmResumed { .. } => "AwaitingSvmResumed",
            PrimaryState::Unprotected => "Unprotected",
        }
    }

    /// The checkpoint in flight, if any.
    fn flight_mut(&mut self) -> Option<&mut InFlight> {
        match self {
            PrimaryState::PreCopySending { flight, .. }
            | PrimaryState::PreCopyHarvesting { flight, .. }
            | PrimaryState::AwaitingBackChannel { flight, .. }
            | PrimaryState::Pausing { flight, .. }
            | PrimaryState::Harvesting { flight, .. }
            | PrimaryState::Capturing { flight, .. }
            | PrimaryState::Resuming { flight, .. }
            | PrimaryState::Sending { flight, .. }
            | PrimaryState::AwaitingSvmReady { flight, .. } => Some(flight),
            PrimaryState::AwaitingHandshake
            | PrimaryState::Running
            | PrimaryState::AwaitingSvmResumed { .. }
            | PrimaryState::Unprotected => None,
        }
    }

    /// The driver paused the PVM and has not resumed it yet.
    fn pvm_paused(&self) -> bool {
        matches!(
            self,
            PrimaryState::Harvesting { .. }
                | PrimaryState::Capturing { .. }
                | PrimaryState::Resuming { .. }
        )
    }
}

impl EngineState for PrimaryState {
    fn name(&self) -> &'static str {
        PrimaryState::name(self)
    }

    fn handshaking(&self) -> bool {
        *self == PrimaryState::AwaitingHandshake
    }

    fn is_over(&self) -> bool {
        *self == PrimaryState::Unprotected
    }
}

/// The outcome of comparing both sides' digests after a checkpoint (the verification option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Both memories and states are identical.
    Identical,
    /// They differ: the checkpoint did not make the SVM a copy of the PVM.
    Different,
    /// No comparison: a side's memory changed while it computed its digest (a hypervisor
    /// wrote the paused domain), so that side sent none. The pages are in the next checkpoint.
    Unsettled,
}

/// What the driver must do next, in order. Before executing any action and after every call into
/// the machine, the driver writes [`Primary::outbox_mut`] to the link and clears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Start the domain's dirty log (and the disk's write log, with a disk).
    StartDirtyLog,
    /// Pre-copy while the PVM runs: send every page (`all`) or the pages of
    /// [`Primary::dirty_pages`] as PAGE_DATA, then call [`Primary::pages_sent`]. With a disk,
    /// also every block that holds data (`all`, after starting the disk's write log) or the
    /// blocks written since the last round, as DISK_BLOCKS.
    SendPages {
        /// Every page of the guest.
        all: bool,
    },
    /// Harvest the dirty log into [`Primary::harvest_target`], then call [`Primary::harvested`].
    HarvestDirty,
    /// Pause the PVM, then call [`Primary::paused`].
    Pause,
    /// The PVM is paused for checkpoint `epoch`: drain its pending output into the comparator
    /// and start the comparator's new epoch (epoch 0: start comparing).
    BeginEpoch {
        /// The checkpoint.
        epoch: u64,
    },
    /// Copy the pages of [`Primary::capture_pfns`] and the vCPU state into the send buffer (and,
    /// when verifying, digest all of memory and the state), then call [`Primary::captured`].
    /// With a disk ([`Primary::disk_blocks`] > 0), also harvest the disk's write log and copy
    /// the blocks written since the last capture, or since the last mirror harvest with
    /// continuous mirroring (count them with
    /// [`Primary::disk_blocks_sent`]; when verifying, digest the disk:
    /// [`Primary::disk_digest`]). See [`crate::disk`].
    Capture,
    /// Resume the PVM, then call [`Primary::resumed`].
    Resume,
    /// Write the captured pages as PAGE_DATA, the captured disk blocks as DISK_BLOCKS and the
    /// state as VCPU_STATE, then call [`Primary::capture_sent`].
    SendCapture {
        /// The checkpoint.
        epoch: u64,
    },
    /// The secondary holds checkpoint `stats.epoch` complete: release the PVM output held for it.
    Committed(CheckpointStats),
    /// The secondary's digest after checkpoint `epoch` was compared with ours.
    Verified {
        /// The checkpoint.
        epoch: u64,
        /// What the comparison showed.
        verdict: Verdict,
        /// The same for the disks (None: the guest has no disk).
        disk: Option<Verdict>,
    },
    /// The secondary is lost: release all held output, stop comparing, run unprotected.
    PeerLost {
        /// Why.
        reason: String,
    },
}

/// The primary's checkpoint state machine.
#[derive(Debug)]
pub struct Primary {
    cfg: PrimaryConfig,
    state: PrimaryState,
    peer: Peer,
    actions: VecDeque<PrimaryAction>,
    /// A during checkpoints, the pre-copy round's dirty set before.
    a: DirtyBitmap,
    /// B from the back channel.
    b: DirtyBitmap,
    capture: Vec<u64>,
    /// Scratch for `capture_also`'s merge.
    merge_scratch: Vec<u64>,
    /// Both sides' disk digests, by checkpoint (verification with a disk).
    disk_check: DiskCheck,
    /// Disk blocks and bytes mirrored for the next checkpoint before it paused the PVM
    /// (figures, counted into its stats at the pause).
    mirrored: (u64, u64),
    /// The last checkpoint started.
    epoch: u64,
}

/// Xen 4.17, the version whose stream colo writes.
const XEN_MAJOR: u32 = 4;
const XEN_MINOR: u32 = 17;

impl Primary {
    /// A primary that starts its stream (image and domain headers, HELLO) in the outbox.
    pub fn new(cfg: PrimaryConfig, now: Instant) -> Self {
        let mut outbox = Vec::with_capacity(4096);
        outbox.extend_from_slice(&ImageHeader { version: 3 }.encode());
        outbox.extend_from_slice(
            &DomainHeader {
                domain_type: DomainType::X86Hvm,
                page_shift: 12,
                xen_major: XEN_MAJOR,
                xen_minor: XEN_MINOR,
            }
            .encode(),
        );
        Self {
            a: DirtyBitmap::new(cfg.link.page_count),
            b: DirtyBitmap::new(cfg.link.page_count),
            peer: Peer::new(Role::Primary, &cfg.link, now, outbox),
            cfg,
            state: PrimaryState::AwaitingHandshake,
            actions: VecDeque::new(),
            capture: Vec::new(),
            merge_scratch: Vec::new(),
            disk_check: DiskCheck::default(),
            mirrored: (0, 0),
            epoch: 0,
        }
    }

    /// What the machine awaits.
    pub fn state(&self) -> PrimaryState {
        self.state
    }

    /// The number of the last checkpoint started (0 before and during initial synchronisation).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// True once checkpoint 0 is committed and until the secondary is lost.
    pub fn is_protected(&self) -> bool {
        let committed_0 = matches!(
            self.state,
            PrimaryState::Running | PrimaryState::AwaitingSvmResumed { .. }
        );
        !self.state.is_over() && (self.epoch > 0 || committed_0)
    }

    /// True between the handshake and the loss of the secondary: client input must be mirrored.
    pub fn mirrors_input(&self) -> bool {
        !self.state.handshaking() && !self.state.is_over()
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<PrimaryAction> {
        self.actions.pop_front()
    }

    /// Bytes to write to the link (then clear the vector).
    pub fn outbox_mut(&mut self) -> &mut Vec<u8> {
        self.peer.outbox_mut()
    }

    /// The bitmap the driver harvests into.
    pub fn harvest_target(&mut self) -> &mut DirtyBitmap {
        &mut self.a
    }

    /// The pre-copy round's pages (for `SendPages { all: false }`).
    pub fn dirty_pages(&self) -> &DirtyBitmap {
        &self.a
    }

    /// The pfns to capture, ascending.
    pub fn capture_pfns(&self) -> &[u64] {
        &self.capture
    }

    /// Whether captures include a digest of all memory.
    pub fn verifying(&self) -> bool {
        self.cfg.link.verify
    }

    /// The guest's disk in blocks (0: none): the handshake made sure the secondary's can hold
    /// it.
    pub fn disk_blocks(&self) -> u64 {
        self.cfg.link.disk_blocks
    }

    /// The driver sent (or captured, to send) `blocks` disk blocks for the checkpoint in flight
    /// (pre-copy rounds included).
    pub fn disk_blocks_sent(&mut self, blocks: u64) {
        if let Some(flight) = self.state.flight_mut() {
            flight.stats.disk_blocks += blocks;
        }
    }

    /// How disk blocks travel (`--disk-mirror`, agreed at the handshake).
    pub fn disk_mirror(&self) -> DiskMirror {
        self.cfg.link.disk_mirror
    }

    /// With continuous mirroring, the checkpoint that DISK_BLOCKS written now belong to, if
    /// the driver may mirror now: the pair is protected, the PVM runs and no checkpoint's
    /// records are being written. On the wire, blocks between CHECKPOINT(n) and CHECKPOINT(n + 1)
    /// belong to checkpoint n + 1 (see [`crate::disk`]): after checkpoint n's capture was sent
    /// (`AwaitingSvmReady`, `AwaitingSvmResumed`, `Running`) that is n + 1; between NEW(n + 1)
    /// and the pause (`AwaitingBackChannel`) it is n + 1 as well. Never during the initial
    /// synchronisation (its rounds send the blocks) nor from `Pausing` to `Sending` (the PVM is
    /// paused, or its capture is being written).
    pub fn mirror_epoch(&self) -> Option<u64> {
        if self.cfg.link.disk_mirror != DiskMirror::Continuous || self.disk_blocks() == 0 {
            return None;
        }
        match self.state {
            PrimaryState::Running => Some(self.epoch + 1),
            PrimaryState::AwaitingSvmReady { epoch, .. }
            | PrimaryState::AwaitingSvmResumed { epoch } => Some(epoch + 1),
            PrimaryState::AwaitingBackChannel { epoch, .. } => Some(epoch),
            _ => None,
        }
    }

    /// The driver mirrored `blocks` disk blocks (`bytes` bytes of DISK_BLOCKS) while the PVM
    /// ran; only when [`Primary::mirror_epoch`] allows. They count into that checkpoint's
    /// figures (`disk_mirrored`, `bytes_sent`).
    pub fn disk_mirrored(&mut self, blocks: u64, bytes: u64) -> Result<(), EngineError> {
        if self.mirror_epoch().is_none() {
            return Err(self.state.unexpected("disk_mirrored"));
        }
        self.mirrored.0 += blocks;
        self.mirrored.1 += bytes;
        Ok(())
    }

    /// Our digest of the disk at this capture (verification with a disk); only while
    /// capturing.
    pub fn disk_digest(&mut self, digest: [u8; DISK_DIGEST_LEN]) -> Result<(), EngineError> {
        let PrimaryState::Capturing { epoch, .. } = self.state else {
            return Err(self.state.unexpected("disk_digest"));
        };
        self.disk_check.ours(epoch, digest);
        Ok(())
    }

    /// Sends `m`, counting its bytes into the checkpoint in flight.
    fn send(&mut self, now: Instant, m: &Message<'_>) {
        let bytes = self.peer.send(now, m);
        if let Some(flight) = self.state.flight_mut() {
            flight.stats.bytes_sent += bytes;
        }
    }

    /// A record from the secondary. Returns data-path messages (OUTPUT frames) for the driver to
    /// route; everything else is consumed here.
    pub fn on_record<'a>(
        &mut self,
        now: Instant,
        rec: &Record<'a>,
    ) -> Result<Option<Message<'a>>, EngineError> {
        self.peer.heard(now);
        match rec {
            Record::CheckpointDirtyPfnList(list) => {
                let PrimaryState::AwaitingBackChannel {
                    epoch,
                    suspended,
                    mut flight,
                } = self.state
                else {
                    return Err(self.state.unexpected("CHECKPOINT_DIRTY_PFN_LIST"));
                };
                if !suspended {
                    return Err(self
                        .state
                        .unexpected("CHECKPOINT_DIRTY_PFN_LIST before SVM_SUSPENDED"));
                }
                self.b.clear_all();
                for pfn in list.iter() {
                    self.b.set(pfn).map_err(|_| EngineError::PfnOutOfRange {
                        pfn,
                        pages: self.cfg.link.page_count,
                    })?;
                }
                flight.stats.backchannel = now.saturating_duration_since(flight.started);
                self.state = PrimaryState::Pausing { epoch, flight };
                self.actions.push_back(PrimaryAction::Pause);
                Ok(None)
            }
            Record::Optional { rtype, body } => match Message::parse(*rtype, body)? {
                Some(m) => self.on_message(now, m),
                None => Ok(None),
            },
            other => Err(self
                .state
                .unexpected(format!("{} record from the secondary", record_name(other)))),
        }
    }

    fn on_message<'a>(
        &mut self,
        now: Instant,
        m: Message<'a>,
    ) -> Result<Option<Message<'a>>, EngineError> {
        if self.state.handshaking() {
            if self.peer.handshake(&m)? {
                self.state = PrimaryState::PreCopySending {
                    round: 0,
                    flight: InFlight::new(0, Trigger::InitialSync, now),
                };
                self.actions.push_back(PrimaryAction::StartDirtyLog);
                self.actions
                    .push_back(PrimaryAction::SendPages { all: true });
            }
            return Ok(None);
        }
        match m {
            Message::Heartbeat(_) => {}
            Message::Output { .. } if self.mirrors_input() => return Ok(Some(m)),
            Message::Digest { epoch: got, digest } => {
                // DIGEST(n) precedes SVM_READY(n); one for another checkpoint is stale.
                if let PrimaryState::AwaitingSvmReady {
                    epoch, peer_digest, ..
                } = &mut self.state
                {
                    if *epoch == got {
                        *peer_digest = Some(digest);
                    }
                }
            }
            // DISK_DIGEST(n) precedes SVM_READY(n) too; it is compared with ours of n only.
            Message::DiskDigest { epoch, digest } => self.disk_check.theirs(epoch, digest),
            Message::Goodbye(_) => self.lose("the secondary shut down (GOODBYE)".into()),
            _ if self.state.is_over() => {}
            Message::Control { msg, epoch } => self.on_control(now, msg, epoch)?,
            other => return Err(self.state.unexpected(message_event(&other))),
        }
        Ok(None)
    }

    fn on_control(&mut self, now: Instant, msg: Control, got: u64) -> Result<(), EngineError> {
        match (self.state, msg) {
            (
                PrimaryState::AwaitingBackChannel {
                    epoch,
                    suspended: false,
                    flight,
                },
                Control::SvmSuspended,
            ) => {
                check_epoch("SVM_SUSPENDED", got, epoch)?;
                self.state = PrimaryState::AwaitingBackChannel {
                    epoch,
                    suspended: true,
                    flight,
                };
            }
            (
                PrimaryState::AwaitingSvmReady {
                    epoch,
                    flight,
                    sent_at,
                    digest,
                    peer_digest,
                },
                Control::SvmReady,
            ) => {
                check_epoch("SVM_READY", got, epoch)?;
                let mut stats = flight.stats;
                stats.commit = now.saturating_duration_since(sent_at);
                stats.total = now.saturating_duration_since(flight.started);
                self.actions.push_back(PrimaryAction::Committed(stats));
                if self.cfg.link.verify {
                    let verdict = match (digest, peer_digest) {
                        (Some(ours), Some(theirs)) if ours == theirs => Verdict::Identical,
                        (Some(_), Some(_)) => Verdict::Different,
                        // A side whose memory changed while it digested (a hypervisor writes
                        // a paused domain's event-channel bits) sends no digest for the epoch.
                        _ => Verdict::Unsettled,
                    };
                    let disk = (self.disk_blocks() > 0).then(|| self.disk_check.verdict(epoch));
                    self.actions.push_back(PrimaryAction::Verified {
                        epoch,
                        verdict,
                        disk,
                    });
                }
                self.state = PrimaryState::AwaitingSvmResumed { epoch };
                self.peer.awaiting_progress(Some(now));
            }
            (PrimaryState::AwaitingSvmResumed { epoch }, Control::SvmResumed) => {
                check_epoch("SVM_RESUMED", got, epoch)?;
                self.state = PrimaryState::Running;
                self.peer.awaiting_progress(None);
            }
            _ => return Err(self.state.unexpected(format!("CONTROL {msg}({got})"))),
        }
        Ok(())
    }

    /// The driver finished a pre-copy round of `bytes` bytes.
    pub fn pages_sent(&mut self, now: Instant, bytes: u64) -> Result<(), EngineError> {
        let PrimaryState::PreCopySending { round, mut flight } = self.state else {
            return Err(self.state.unexpected("pages_sent"));
        };
        let _ = now;
        flight.stats.bytes_sent += bytes;
        flight.stats.pages_sent += if round == 0 {
            self.cfg.link.page_count
        } else {
            self.a.count()
        };
        self.a.clear_all();
        self.state = PrimaryState::PreCopyHarvesting { round, flight };
        self.actions.push_back(PrimaryAction::HarvestDirty);
        Ok(())
    }

    /// The driver harvested the dirty log into [`Primary::harvest_target`].
    pub fn harvested(&mut self, now: Instant) -> Result<(), EngineError> {
        match self.state {
            PrimaryState::PreCopyHarvesting { round, flight } => {
                let left = self.a.count();
                if left <= self.cfg.precopy_target_pages || round + 1 >= self.cfg.precopy_max_rounds
                {
                    self.state = PrimaryState::Pausing { epoch: 0, flight };
                    self.actions.push_back(PrimaryAction::Pause);
                } else {
                    let round = round + 1;
                    self.state = PrimaryState::PreCopySending { round, flight };
                    self.actions
                        .push_back(PrimaryAction::SendPages { all: false });
                }
                Ok(())
            }
            PrimaryState::Harvesting {
                epoch,
                mut flight,
                paused_at,
            } => {
                self.harvest_into_capture(epoch, &mut flight.stats);
                flight.stats.harvest = now.saturating_duration_since(paused_at);
                self.state = PrimaryState::Capturing {
                    epoch,
                    flight,
                    paused_at,
                    harvested_at: now,
                };
                self.actions.push_back(PrimaryAction::Capture);
                Ok(())
            }
            _ => Err(self.state.unexpected("harvested")),
        }
    }

    /// D = A ∪ B (A alone in primary-only mode and for checkpoint 0) becomes the capture set;
    /// A is cleared for the next harvest.
    fn harvest_into_capture(&mut self, epoch: u64, stats: &mut CheckpointStats) {
        stats.dirty_primary = self.a.count();
        if epoch > 0 {
            stats.dirty_secondary = self.b.count();
            stats.secondary_only = self.b.count_difference(&self.a).unwrap_or(0);
            if self.cfg.sync_mode == SyncMode::Backchannel {
                // Lengths are equal by construction.
                let _ = self.a.union_with(&self.b);
            }
        }
        self.capture.clear();
        self.a.extend_pfns(&mut self.capture);
        self.a.clear_all();
        stats.pages_sent += self.capture.len() as u64;
    }

    /// The driver paused the PVM.
    pub fn paused(&mut self, now: Instant) -> Result<(), EngineError> {
        let PrimaryState::Pausing { epoch, mut flight } = self.state else {
            return Err(self.state.unexpected("paused"));
        };
        let (blocks, bytes) = std::mem::take(&mut self.mirrored);
        flight.stats.disk_mirrored += blocks;
        flight.stats.bytes_sent += bytes;
        self.state = PrimaryState::Harvesting {
            epoch,
            flight,
            paused_at: now,
        };
        self.actions.push_back(PrimaryAction::BeginEpoch { epoch });
        self.actions.push_back(PrimaryAction::HarvestDirty);
        Ok(())
    }

    /// The driver's sweep (while capturing) found `pfns` changed behind the dirty log since they
    /// were last sent: the hypervisor wrote them, so neither A nor B names them. They join this
    /// checkpoint's capture set, which stays ascending; the driver's page buffer must follow
    /// [`Primary::capture_pfns`] as it reads afterwards. Pfns already in the set or beyond the
    /// guest are refused.
    pub fn capture_also(&mut self, pfns: &[u64]) -> Result<(), EngineError> {
        let (stats, added) = self.merge_capture("capture_also", pfns, false)?;
        stats.unlogged += added;
        Ok(())
    }

    /// Pages the hypervisor is known to write behind the dirty log (`pfns`, ascending: what
    /// earlier sweeps found) join this checkpoint's capture set, so that production mode carries
    /// them at every checkpoint without sweeping all memory. Pfns already in the set are skipped;
    /// pfns beyond the guest are refused.
    pub fn capture_watched(&mut self, pfns: &[u64]) -> Result<(), EngineError> {
        let (stats, added) = self.merge_capture("capture_watched", pfns, true)?;
        stats.watched += added;
        Ok(())
    }

    /// Merges ascending `pfns` into the capture set (only while capturing); returns the
    /// checkpoint's figures and how many pfns were new. A pfn already in the set is an error
    /// unless `dup_ok`.
    fn merge_capture(
        &mut self,
        event: &'static str,
        pfns: &[u64],
        dup_ok: bool,
    ) -> Result<(&mut CheckpointStats, u64), EngineError> {
        let state = self.state.name();
        let PrimaryState::Capturing { flight, .. } = &mut self.state else {
            return Err(EngineError::unexpected(state, event));
        };
        let (capture, scratch) = (&mut self.capture, &mut self.merge_scratch);
        let added = merge_ascending(capture, scratch, pfns, self.a.len(), dup_ok)?;
        flight.stats.pages_sent += added;
        Ok((&mut flight.stats, added))
    }

    /// The driver copied the capture set and the state; `digest` is the digest of all memory and
    /// the state when verifying (None if the memory changed while paused: the verification of
    /// this checkpoint is then unsettled).
    pub fn captured(
        &mut self,
        now: Instant,
        digest: Option<[u8; DIGEST_LEN]>,
    ) -> Result<(), EngineError> {
        let PrimaryState::Capturing {
            epoch,
            mut flight,
            paused_at,
            harvested_at,
        } = self.state
        else {
            return Err(self.state.unexpected("captured"));
        };
        flight.stats.capture = now.saturating_duration_since(harvested_at);
        self.state = PrimaryState::Resuming {
            epoch,
            flight,
            paused_at,
            digest,
        };
        self.actions.push_back(PrimaryAction::Resume);
        Ok(())
    }

    /// The driver resumed the PVM.
    pub fn resumed(&mut self, now: Instant) -> Result<(), EngineError> {
        let PrimaryState::Resuming {
            epoch,
            mut flight,
            paused_at,
            digest,
        } = self.state
        else {
            return Err(self.state.unexpected("resumed"));
        };
        flight.stats.pause = now.saturating_duration_since(paused_at);
        self.state = PrimaryState::Sending {
            epoch,
            flight,
            resumed_at: now,
            digest,
        };
        self.actions.push_back(PrimaryAction::SendCapture { epoch });
        Ok(())
    }

    /// The driver wrote the captured pages and state (`bytes` bytes); CHECKPOINT follows.
    pub fn capture_sent(&mut self, now: Instant, bytes: u64) -> Result<(), EngineError> {
        let PrimaryState::Sending {
            epoch,
            mut flight,
            resumed_at,
            digest,
        } = self.state
        else {
            return Err(self.state.unexpected("capture_sent"));
        };
        let record = self
            .peer
            .write(now, |out| encode_record(out, rec_type::CHECKPOINT, &[]));
        flight.stats.bytes_sent += bytes + record;
        flight.stats.send = now.saturating_duration_since(resumed_at);
        self.state = PrimaryState::AwaitingSvmReady {
            epoch,
            flight,
            sent_at: now,
            digest,
            peer_digest: None,
        };
        self.peer.awaiting_progress(Some(now));
        Ok(())
    }

    /// Starts checkpoint `epoch + 1` because of `trigger`. Only valid in `Running`.
    pub fn start_checkpoint(&mut self, now: Instant, trigger: Trigger) -> Result<u64, EngineError> {
        if self.state != PrimaryState::Running {
            return Err(self
                .state
                .unexpected(format!("start_checkpoint({trigger})")));
        }
        self.epoch += 1;
        let epoch = self.epoch;
        self.state = PrimaryState::AwaitingBackChannel {
            epoch,
            suspended: false,
            flight: InFlight::new(epoch, trigger, now),
        };
        self.send(
            now,
            &Message::Control {
                msg: Control::New,
                epoch,
            },
        );
        self.peer.awaiting_progress(Some(now));
        Ok(epoch)
    }

    /// Appends a mirrored client request to the outbox (only while [`Primary::mirrors_input`]).
    pub fn mirror_input(&mut self, now: Instant, seq: u64, frame: &[u8]) {
        if self.mirrors_input() {
            self.send(now, &Message::Input { seq, frame });
        }
    }

    /// Bytes from the secondary arrived at `at` (the driver's receiving thread saw them, even if
    /// they are not decoded yet): the peer is alive. Call it before [`Self::handle_timeout`] so a
    /// driver that spent a while in a backend call does not take its own delay for the peer's
    /// silence.
    pub fn peer_heard(&mut self, at: Instant) {
        self.peer.heard(at);
    }

    /// Time passed: sends heartbeats and detects a lost or stuck secondary.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(reason) = self.peer.tick(now, &self.state) {
            self.lose(reason);
        }
    }

    /// When [`Primary::handle_timeout`] should be called next.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.peer.next_timeout(&self.state)
    }

    /// The link failed (reset, EOF, write error, malformed input): go on alone.
    pub fn peer_lost(&mut self, now: Instant, reason: String) {
        let _ = now;
        self.lose(reason);
    }

    /// The operator forces a failover: stop protecting and go on alone.
    pub fn failover(&mut self, now: Instant) {
        self.peer_lost(now, "failover requested by the operator".into());
    }

    fn lose(&mut self, reason: String) {
        if self.state.is_over() {
            return;
        }
        self.mirrored = (0, 0);
        self.actions.clear();
        if self.state.pvm_paused() {
            self.actions.push_back(PrimaryAction::Resume);
        }
        self.peer.hang_up(&self.state);
        self.state = PrimaryState::Unprotected;
        self.actions.push_back(PrimaryAction::PeerLost { reason });
    }
}

/// Merges ascending `pfns` into the ascending `capture` set of a guest of `pages` pages through
/// `scratch` (kept across checkpoints and swapped in: no allocation once warm). A pfn already in
/// the set is skipped if `dup_ok`, else refused. Returns how many pfns were new; on error
/// `capture` is as it was.
fn merge_ascending(
    capture: &mut Vec<u64>,
    scratch: &mut Vec<u64>,
    pfns: &[u64],
    pages: u64,
    dup_ok: bool,
) -> Result<u64, EngineError> {
    if pfns.is_empty() {
        return Ok(0);
    }
    scratch.clear();
    let bad = |pfn, reason| EngineError::BadCapture { pfn, reason };
    let (mut i, mut j) = (0, 0);
    loop {
        let next = match (capture.get(i), pfns.get(j)) {
            (Some(&x), Some(&y)) if x == y => {
                if !dup_ok {
                    return Err(bad(y, "is already captured"));
                }
                i += 1;
                j += 1;
                x
            }
            (Some(&x), Some(&y)) if x < y => {
                i += 1;
                x
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (_, Some(&y)) => {
                if y >= pages {
                    return Err(bad(y, "is beyond the guest"));
                }
                j += 1;
                y
            }
            (None, None) => break,
        };
        if scratch.last().is_some_and(|&l| l >= next) {
            return Err(bad(next, "is out of order"));
        }
        scratch.push(next);
    }
    let added = (scratch.len() - capture.len()) as u64;
    std::mem::swap(capture, scratch);
    Ok(added)
}

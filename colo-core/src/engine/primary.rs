//! The primary's state machine: initial synchronisation (pre-copy + checkpoint 0), then one
//! checkpoint after another, each computing D = A ∪ B from its own dirty log and the secondary's
//! back channel. See the module docs of [`super`] for the diagram.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::link::{message_name, Handshake};
use super::messages::{Control, Message, Role, DIGEST_LEN};
use super::{CheckpointStats, EngineError, Heartbeat, Liveness, SyncMode, Trigger};
use crate::bitmap::DirtyBitmap;
use crate::stream::{encode_record, rec_type, DomainHeader, DomainType, ImageHeader, Record};

/// Settings of the primary.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// The guest's page count.
    pub page_count: u64,
    /// Backchannel (D = A ∪ B) or primary-only (D = A).
    pub sync_mode: SyncMode,
    /// Pre-copy stops after this many rounds...
    pub precopy_max_rounds: u32,
    /// ...or as soon as a round leaves at most this many dirty pages for the final pause.
    pub precopy_target_pages: u64,
    /// Heartbeats and failure detection.
    pub liveness: Liveness,
    /// Digest all of memory at every checkpoint and compare with the secondary's digest.
    pub verify: bool,
    /// Pre-shared key for the link, if any.
    pub key: Option<Vec<u8>>,
    /// Leave the records after the handshake unsealed (`--insecure-plaintext`; both sides).
    pub plaintext: bool,
    /// A fresh random nonce for the handshake.
    pub nonce: [u8; 32],
}

impl PrimaryConfig {
    /// Defaults for a guest of `page_count` pages: 8 pre-copy rounds or ≤ 1024 pages left.
    pub fn new(page_count: u64) -> Self {
        Self {
            page_count,
            sync_mode: SyncMode::Backchannel,
            precopy_max_rounds: 8,
            precopy_target_pages: 1024,
            liveness: Liveness::default(),
            verify: false,
            key: None,
            plaintext: false,
            nonce: [0; 32],
        }
    }
}

/// What the primary awaits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryState {
    /// The secondary's HELLO / AUTH.
    AwaitingHandshake,
    /// The driver to finish sending a pre-copy round (`pages_sent`).
    PreCopySending {
        /// Round number, from 0 (all pages).
        round: u32,
    },
    /// The driver to harvest the pages dirtied during a pre-copy round (`harvested`).
    PreCopyHarvesting {
        /// Round just sent.
        round: u32,
    },
    /// A checkpoint trigger (`start_checkpoint`); the pair is protected.
    Running,
    /// SVM_SUSPENDED and the secondary's dirty pfn list for checkpoint `epoch`.
    AwaitingBackChannel {
        /// The checkpoint in progress.
        epoch: u64,
        /// SVM_SUSPENDED already arrived.
        suspended: bool,
    },
    /// The driver to pause the PVM (`paused`).
    Pausing {
        /// The checkpoint in progress.
        epoch: u64,
    },
    /// The driver to harvest A (`harvested`).
    Harvesting {
        /// The checkpoint in progress.
        epoch: u64,
    },
    /// The driver to copy D's pages and the state (`captured`).
    Capturing {
        /// The checkpoint in progress.
        epoch: u64,
    },
    /// The driver to resume the PVM (`resumed`).
    Resuming {
        /// The checkpoint in progress.
        epoch: u64,
    },
    /// The driver to send the captured checkpoint (`capture_sent`).
    Sending {
        /// The checkpoint in progress.
        epoch: u64,
    },
    /// SVM_READY: the secondary holds the checkpoint complete.
    AwaitingSvmReady {
        /// The checkpoint in progress.
        epoch: u64,
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
    /// Start the domain's dirty log.
    StartDirtyLog,
    /// Pre-copy while the PVM runs: send every page (`all`) or the pages of
    /// [`Primary::dirty_pages`] as PAGE_DATA, then call [`Primary::pages_sent`].
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
    Capture,
    /// Resume the PVM, then call [`Primary::resumed`].
    Resume,
    /// Write the captured pages as PAGE_DATA and the state as VCPU_STATE, then call
    /// [`Primary::capture_sent`].
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
    handshake: Handshake,
    heartbeat: Heartbeat,
    outbox: Vec<u8>,
    actions: VecDeque<PrimaryAction>,
    /// A during checkpoints, the pre-copy round's dirty set before.
    a: DirtyBitmap,
    /// B from the back channel.
    b: DirtyBitmap,
    capture: Vec<u64>,
    /// Scratch for `capture_also`'s merge.
    merge_scratch: Vec<u64>,
    epoch: u64,
    paused: bool,
    cur: CheckpointStats,
    t_start: Instant,
    t_mark: Instant,
    pause_at: Instant,
    protected: bool,
    digest: Option<(u64, [u8; DIGEST_LEN])>,
    peer_digest: Option<(u64, [u8; DIGEST_LEN])>,
}

fn empty_stats(epoch: u64, trigger: Trigger) -> CheckpointStats {
    CheckpointStats {
        epoch,
        trigger,
        dirty_primary: 0,
        dirty_secondary: 0,
        secondary_only: 0,
        unlogged: 0,
        watched: 0,
        pages_sent: 0,
        bytes_sent: 0,
        backchannel: Duration::ZERO,
        pause: Duration::ZERO,
        harvest: Duration::ZERO,
        capture: Duration::ZERO,
        send: Duration::ZERO,
        commit: Duration::ZERO,
        total: Duration::ZERO,
    }
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
        let handshake = Handshake::start(
            Role::Primary,
            cfg.page_count,
            cfg.verify,
            cfg.plaintext,
            cfg.key.clone(),
            cfg.nonce,
            &mut outbox,
        );
        let mut heartbeat = Heartbeat::new(cfg.liveness, now);
        heartbeat.awaiting_progress(Some(now));
        Self {
            a: DirtyBitmap::new(cfg.page_count),
            b: DirtyBitmap::new(cfg.page_count),
            cfg,
            state: PrimaryState::AwaitingHandshake,
            handshake,
            heartbeat,
            outbox,
            actions: VecDeque::new(),
            capture: Vec::new(),
            merge_scratch: Vec::new(),
            epoch: 0,
            paused: false,
            cur: empty_stats(0, Trigger::InitialSync),
            t_start: now,
            t_mark: now,
            pause_at: now,
            protected: false,
            digest: None,
            peer_digest: None,
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
        self.protected
    }

    /// True between the handshake and the loss of the secondary: client input must be mirrored.
    pub fn mirrors_input(&self) -> bool {
        !matches!(
            self.state,
            PrimaryState::AwaitingHandshake | PrimaryState::Unprotected
        )
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<PrimaryAction> {
        self.actions.pop_front()
    }

    /// Bytes to write to the link (then clear the vector).
    pub fn outbox_mut(&mut self) -> &mut Vec<u8> {
        &mut self.outbox
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
        self.cfg.verify
    }

    fn err(&self, event: impl Into<String>) -> EngineError {
        EngineError::unexpected(self.state.name(), event)
    }

    fn send(&mut self, now: Instant, m: &Message<'_>) {
        let before = self.outbox.len();
        m.encode(&mut self.outbox);
        self.cur.bytes_sent += (self.outbox.len() - before) as u64;
        self.heartbeat.sent(now);
    }

    /// A record from the secondary. Returns data-path messages (OUTPUT frames) for the driver to
    /// route; everything else is consumed here.
    pub fn on_record<'a>(
        &mut self,
        now: Instant,
        rec: &Record<'a>,
    ) -> Result<Option<Message<'a>>, EngineError> {
        self.heartbeat.heard(now);
        match rec {
            Record::CheckpointDirtyPfnList(list) => {
                let PrimaryState::AwaitingBackChannel { epoch, suspended } = self.state else {
                    return Err(self.err("CHECKPOINT_DIRTY_PFN_LIST"));
                };
                if !suspended {
                    return Err(self.err("CHECKPOINT_DIRTY_PFN_LIST before SVM_SUSPENDED"));
                }
                self.b.clear_all();
                for pfn in list.iter() {
                    self.b.set(pfn).map_err(|_| EngineError::PfnOutOfRange {
                        pfn,
                        pages: self.cfg.page_count,
                    })?;
                }
                self.cur.backchannel = now.saturating_duration_since(self.t_start);
                self.state = PrimaryState::Pausing { epoch };
                self.actions.push_back(PrimaryAction::Pause);
                Ok(None)
            }
            Record::Optional { rtype, body } => match Message::parse(*rtype, body)? {
                Some(m) => self.on_message(now, m),
                None => Ok(None),
            },
            other => Err(self.err(format!("{} record from the secondary", record_name(other)))),
        }
    }

    fn on_message<'a>(
        &mut self,
        now: Instant,
        m: Message<'a>,
    ) -> Result<Option<Message<'a>>, EngineError> {
        match (&self.state, &m) {
            (PrimaryState::AwaitingHandshake, _) => {
                if self.handshake.on_message(&m, &mut self.outbox)? {
                    self.heartbeat.awaiting_progress(None);
                    self.state = PrimaryState::PreCopySending { round: 0 };
                    self.actions.push_back(PrimaryAction::StartDirtyLog);
                    self.actions
                        .push_back(PrimaryAction::SendPages { all: true });
                    self.t_start = now;
                }
                Ok(None)
            }
            (_, Message::Heartbeat(_)) => Ok(None),
            (_, Message::Output { .. }) if self.mirrors_input() => Ok(Some(m)),
            (_, Message::Digest { epoch, digest }) => {
                self.peer_digest = Some((*epoch, *digest));
                Ok(None)
            }
            (
                PrimaryState::AwaitingBackChannel {
                    epoch,
                    suspended: false,
                },
                Message::Control {
                    msg: Control::SvmSuspended,
                    epoch: got,
                },
            ) => {
                let epoch = *epoch;
                check_epoch("SVM_SUSPENDED", *got, epoch)?;
                self.state = PrimaryState::AwaitingBackChannel {
                    epoch,
                    suspended: true,
                };
                Ok(None)
            }
            (
                PrimaryState::AwaitingSvmReady { epoch },
                Message::Control {
                    msg: Control::SvmReady,
                    epoch: got,
                },
            ) => {
                let epoch = *epoch;
                check_epoch("SVM_READY", *got, epoch)?;
                self.cur.commit = now.saturating_duration_since(self.t_mark);
                self.cur.total = now.saturating_duration_since(self.t_start);
                self.actions.push_back(PrimaryAction::Committed(self.cur));
                self.protected = true;
                if self.cfg.verify {
                    let verdict = match (self.digest, self.peer_digest) {
                        (Some((e1, d1)), Some((e2, d2))) if e1 == epoch && e2 == epoch => {
                            if d1 == d2 {
                                Verdict::Identical
                            } else {
                                Verdict::Different
                            }
                        }
                        // A side whose memory changed while it digested (a hypervisor writes
                        // a paused domain's event-channel bits) sends no digest for the epoch.
                        _ => Verdict::Unsettled,
                    };
                    self.actions
                        .push_back(PrimaryAction::Verified { epoch, verdict });
                }
                self.state = PrimaryState::AwaitingSvmResumed { epoch };
                self.heartbeat.awaiting_progress(Some(now));
                Ok(None)
            }
            (
                PrimaryState::AwaitingSvmResumed { epoch },
                Message::Control {
                    msg: Control::SvmResumed,
                    epoch: got,
                },
            ) => {
                check_epoch("SVM_RESUMED", *got, *epoch)?;
                self.state = PrimaryState::Running;
                self.heartbeat.awaiting_progress(None);
                Ok(None)
            }
            (_, Message::Goodbye(_)) => {
                self.lose(now, "the secondary shut down (GOODBYE)".into());
                Ok(None)
            }
            (PrimaryState::Unprotected, _) => Ok(None),
            (_, m) => Err(self.err(match m {
                Message::Control { msg, epoch } => format!("CONTROL {msg}({epoch})"),
                other => message_name(other).to_string(),
            })),
        }
    }

    /// The driver finished a pre-copy round of `bytes` bytes.
    pub fn pages_sent(&mut self, now: Instant, bytes: u64) -> Result<(), EngineError> {
        let PrimaryState::PreCopySending { round } = self.state else {
            return Err(self.err("pages_sent"));
        };
        let _ = now;
        self.cur.bytes_sent += bytes;
        self.cur.pages_sent += if round == 0 {
            self.cfg.page_count
        } else {
            self.a.count()
        };
        self.a.clear_all();
        self.state = PrimaryState::PreCopyHarvesting { round };
        self.actions.push_back(PrimaryAction::HarvestDirty);
        Ok(())
    }

    /// The driver harvested the dirty log into [`Primary::harvest_target`].
    pub fn harvested(&mut self, now: Instant) -> Result<(), EngineError> {
        match self.state {
            PrimaryState::PreCopyHarvesting { round } => {
                let left = self.a.count();
                if left <= self.cfg.precopy_target_pages || round + 1 >= self.cfg.precopy_max_rounds
                {
                    self.state = PrimaryState::Pausing { epoch: 0 };
                    self.actions.push_back(PrimaryAction::Pause);
                } else {
                    self.state = PrimaryState::PreCopySending { round: round + 1 };
                    self.actions
                        .push_back(PrimaryAction::SendPages { all: false });
                }
                Ok(())
            }
            PrimaryState::Harvesting { epoch } => {
                self.cur.harvest = now.saturating_duration_since(self.t_mark);
                self.cur.dirty_primary = self.a.count();
                if epoch > 0 {
                    self.cur.dirty_secondary = self.b.count();
                    self.cur.secondary_only = self.b.count_difference(&self.a).unwrap_or(0);
                    if self.cfg.sync_mode == SyncMode::Backchannel {
                        // Lengths are equal by construction.
                        let _ = self.a.union_with(&self.b);
                    }
                }
                self.capture.clear();
                self.a.extend_pfns(&mut self.capture);
                self.a.clear_all();
                self.cur.pages_sent += self.capture.len() as u64;
                self.state = PrimaryState::Capturing { epoch };
                self.actions.push_back(PrimaryAction::Capture);
                self.t_mark = now;
                Ok(())
            }
            _ => Err(self.err("harvested")),
        }
    }

    /// The driver paused the PVM.
    pub fn paused(&mut self, now: Instant) -> Result<(), EngineError> {
        let PrimaryState::Pausing { epoch } = self.state else {
            return Err(self.err("paused"));
        };
        self.paused = true;
        self.cur.pause = Duration::ZERO;
        self.t_mark = now;
        self.pause_at = now;
        self.state = PrimaryState::Harvesting { epoch };
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
        let added = self.merge_capture("capture_also", pfns, false)?;
        self.cur.unlogged += added;
        Ok(())
    }

    /// Pages the hypervisor is known to write behind the dirty log (`pfns`, ascending: what
    /// earlier sweeps found) join this checkpoint's capture set, so that production mode carries
    /// them at every checkpoint without sweeping all memory. Pfns already in the set are skipped;
    /// pfns beyond the guest are refused.
    pub fn capture_watched(&mut self, pfns: &[u64]) -> Result<(), EngineError> {
        let added = self.merge_capture("capture_watched", pfns, true)?;
        self.cur.watched += added;
        Ok(())
    }

    /// Merges ascending `pfns` into the capture set; returns how many were new. A pfn already in
    /// the set is an error unless `dup_ok`.
    fn merge_capture(
        &mut self,
        event: &'static str,
        pfns: &[u64],
        dup_ok: bool,
    ) -> Result<u64, EngineError> {
        if !matches!(self.state, PrimaryState::Capturing { .. }) {
            return Err(self.err(event));
        }
        if pfns.is_empty() {
            return Ok(0);
        }
        let pages = self.a.len();
        let bad = |pfn, reason| EngineError::BadCapture { pfn, reason };
        // Merged into scratch kept across checkpoints, then swapped in: no allocation once warm.
        let mut merged = std::mem::take(&mut self.merge_scratch);
        merged.clear();
        let before = self.capture.len();
        let (mut i, mut j) = (0, 0);
        loop {
            let next = match (self.capture.get(i), pfns.get(j)) {
                (Some(&x), Some(&y)) if x == y => {
                    if !dup_ok {
                        self.merge_scratch = merged;
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
                        self.merge_scratch = merged;
                        return Err(bad(y, "is beyond the guest"));
                    }
                    j += 1;
                    y
                }
                (None, None) => break,
            };
            if merged.last().is_some_and(|&l| l >= next) {
                self.merge_scratch = merged;
                return Err(bad(next, "is out of order"));
            }
            merged.push(next);
        }
        let added = (merged.len() - before) as u64;
        self.merge_scratch = std::mem::replace(&mut self.capture, merged);
        self.cur.pages_sent += added;
        Ok(added)
    }

    /// The driver copied the capture set and the state; `digest` is the digest of all memory and
    /// the state when verifying (None if the memory changed while paused: the verification of
    /// this checkpoint is then unsettled).
    pub fn captured(
        &mut self,
        now: Instant,
        digest: Option<[u8; DIGEST_LEN]>,
    ) -> Result<(), EngineError> {
        let PrimaryState::Capturing { epoch } = self.state else {
            return Err(self.err("captured"));
        };
        self.cur.capture = now.saturating_duration_since(self.t_mark);
        self.digest = digest.map(|d| (epoch, d));
        self.state = PrimaryState::Resuming { epoch };
        self.actions.push_back(PrimaryAction::Resume);
        Ok(())
    }

    /// The driver resumed the PVM.
    pub fn resumed(&mut self, now: Instant) -> Result<(), EngineError> {
        let PrimaryState::Resuming { epoch } = self.state else {
            return Err(self.err("resumed"));
        };
        self.paused = false;
        self.cur.pause = now.saturating_duration_since(self.pause_at);
        self.t_mark = now;
        self.state = PrimaryState::Sending { epoch };
        self.actions.push_back(PrimaryAction::SendCapture { epoch });
        Ok(())
    }

    /// The driver wrote the captured pages and state (`bytes` bytes); CHECKPOINT follows.
    pub fn capture_sent(&mut self, now: Instant, bytes: u64) -> Result<(), EngineError> {
        let PrimaryState::Sending { epoch } = self.state else {
            return Err(self.err("capture_sent"));
        };
        self.cur.bytes_sent += bytes;
        let before = self.outbox.len();
        encode_record(&mut self.outbox, rec_type::CHECKPOINT, &[]);
        self.cur.bytes_sent += (self.outbox.len() - before) as u64;
        self.heartbeat.sent(now);
        self.cur.send = now.saturating_duration_since(self.t_mark);
        self.t_mark = now;
        self.state = PrimaryState::AwaitingSvmReady { epoch };
        self.heartbeat.awaiting_progress(Some(now));
        Ok(())
    }

    /// Starts checkpoint `epoch + 1` because of `trigger`. Only valid in `Running`.
    pub fn start_checkpoint(&mut self, now: Instant, trigger: Trigger) -> Result<u64, EngineError> {
        if self.state != PrimaryState::Running {
            return Err(self.err(format!("start_checkpoint({trigger})")));
        }
        self.epoch += 1;
        let epoch = self.epoch;
        self.cur = empty_stats(epoch, trigger);
        self.t_start = now;
        self.send(
            now,
            &Message::Control {
                msg: Control::New,
                epoch,
            },
        );
        self.state = PrimaryState::AwaitingBackChannel {
            epoch,
            suspended: false,
        };
        self.heartbeat.awaiting_progress(Some(now));
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
        self.heartbeat.heard(at);
    }

    /// Time passed: sends heartbeats and detects a lost or stuck secondary.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == PrimaryState::Unprotected {
            return;
        }
        if let Some(reason) = self.heartbeat.lost(now) {
            self.lose(now, reason);
            return;
        }
        if self.state != PrimaryState::AwaitingHandshake {
            if let Some(seq) = self.heartbeat.due(now) {
                Message::Heartbeat(seq).encode(&mut self.outbox);
            }
        }
    }

    /// When [`Primary::handle_timeout`] should be called next.
    pub fn next_timeout(&self) -> Option<Instant> {
        (self.state != PrimaryState::Unprotected).then(|| self.heartbeat.next_deadline())
    }

    /// The link failed (reset, EOF, write error, malformed input): go on alone.
    pub fn peer_lost(&mut self, now: Instant, reason: String) {
        self.lose(now, reason);
    }

    /// The operator forces a failover: stop protecting and go on alone.
    pub fn failover(&mut self, now: Instant) {
        self.lose(now, "failover requested by the operator".into());
    }

    fn lose(&mut self, now: Instant, reason: String) {
        if self.state == PrimaryState::Unprotected {
            return;
        }
        let _ = now;
        self.actions.clear();
        if self.paused {
            self.actions.push_back(PrimaryAction::Resume);
            self.paused = false;
        }
        // During the handshake the outbox holds this node's HELLO/AUTH: it still goes out (see
        // the secondary's `lose`).
        if !matches!(self.state, PrimaryState::AwaitingHandshake) {
            self.outbox.clear();
        }
        self.protected = false;
        self.state = PrimaryState::Unprotected;
        self.actions.push_back(PrimaryAction::PeerLost { reason });
    }
}

fn check_epoch(msg: &'static str, got: u64, want: u64) -> Result<(), EngineError> {
    if got == want {
        Ok(())
    } else {
        Err(EngineError::WrongEpoch { msg, got, want })
    }
}

/// A record's name, for errors.
pub(crate) fn record_name(r: &Record<'_>) -> String {
    match r {
        Record::End => "END".into(),
        Record::Checkpoint => "CHECKPOINT".into(),
        Record::StaticDataEnd => "STATIC_DATA_END".into(),
        Record::Verify => "VERIFY".into(),
        Record::TscInfo(_) => "X86_TSC_INFO".into(),
        Record::HvmContext(_) => "HVM_CONTEXT".into(),
        Record::HvmParams(_) => "HVM_PARAMS".into(),
        Record::CheckpointDirtyPfnList(_) => "CHECKPOINT_DIRTY_PFN_LIST".into(),
        Record::CpuidPolicy(_) => "X86_CPUID_POLICY".into(),
        Record::MsrPolicy(_) => "X86_MSR_POLICY".into(),
        Record::OtherXen { rtype, .. } => format!("Xen record {rtype:#x}"),
        Record::Optional { rtype, .. } => format!("optional record {rtype:#x}"),
    }
}

//! The secondary's state machine: applies the initial synchronisation, then stages each
//! checkpoint and applies it only when its CHECKPOINT record arrives (all or nothing), and
//! answers NEW with its own dirty set B on the back channel. See [`super`] for the diagram.

use std::collections::VecDeque;
use std::time::Instant;

use super::link::{message_name, Handshake};
use super::messages::{Control, Message, Role, DIGEST_LEN};
use super::primary::record_name;
use super::{EngineError, Heartbeat, Liveness};
use crate::bitmap::DirtyBitmap;
use crate::stream::{encode_dirty_pfn_list, DomainType, Event, Record};
use crate::PAGE_SIZE;

/// Settings of the secondary.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    /// The guest's page count.
    pub page_count: u64,
    /// Heartbeats and failure detection.
    pub liveness: Liveness,
    /// Digest all of memory after every checkpoint and send it to the primary.
    pub verify: bool,
    /// Pre-shared key for the link, if any.
    pub key: Option<Vec<u8>>,
    /// Leave the records after the handshake unsealed (`--insecure-plaintext`; both sides).
    pub plaintext: bool,
    /// A fresh random nonce for the handshake.
    pub nonce: [u8; 32],
}

impl SecondaryConfig {
    /// Defaults for a guest of `page_count` pages.
    pub fn new(page_count: u64) -> Self {
        Self {
            page_count,
            liveness: Liveness::default(),
            verify: false,
            key: None,
            plaintext: false,
            nonce: [0; 32],
        }
    }
}

/// GOODBYE's reason when the primary drops its secondary on purpose.
pub const GOODBYE_DROPPED: u32 = 1;

/// What the secondary awaits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondaryState {
    /// The primary's stream headers, HELLO and AUTH.
    AwaitingHandshake,
    /// Pages of the initial synchronisation, written straight to the SVM, until CHECKPOINT(0).
    InitialSync,
    /// The driver to apply checkpoint `epoch` (`applied`).
    Applying {
        /// The checkpoint.
        epoch: u64,
    },
    /// The driver to resume the SVM (`resumed`).
    Resuming {
        /// The checkpoint just applied.
        epoch: u64,
    },
    /// NEW: the SVM runs in `epoch`.
    AwaitingNew {
        /// The last checkpoint applied.
        epoch: u64,
    },
    /// The driver to pause the SVM (`paused`).
    Pausing {
        /// The checkpoint announced.
        epoch: u64,
    },
    /// The driver to harvest B (`harvested`).
    Harvesting {
        /// The checkpoint announced.
        epoch: u64,
    },
    /// The records of checkpoint `epoch`, staged until its CHECKPOINT.
    ReceivingCheckpoint {
        /// The checkpoint.
        epoch: u64,
    },
    /// Nothing: the primary is lost and this node serves as the new primary.
    TakenOver,
    /// Nothing: the primary was lost before the SVM held any complete checkpoint.
    Failed,
    /// Nothing: the primary ended replication in order (GOODBYE); this node stops.
    Closed,
}

impl SecondaryState {
    /// The state's name, for errors and status output.
    pub fn name(&self) -> &'static str {
        match self {
            SecondaryState::AwaitingHandshake => "AwaitingHandshake",
            SecondaryState::InitialSync => "InitialSync",
            SecondaryState::Applying { .. } => "Applying",
            SecondaryState::Resuming { .. } => "Resuming",
            SecondaryState::AwaitingNew { .. } => "AwaitingNew",
            SecondaryState::Pausing { .. } => "Pausing",
            SecondaryState::Harvesting { .. } => "Harvesting",
            SecondaryState::ReceivingCheckpoint { .. } => "ReceivingCheckpoint",
            SecondaryState::TakenOver => "TakenOver",
            SecondaryState::Failed => "Failed",
            SecondaryState::Closed => "Closed",
        }
    }
}

/// What the driver must do next, in order. Before executing any action and after every call into
/// the machine, the driver writes [`Secondary::outbox_mut`] to the link and clears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecondaryAction {
    /// Start the SVM's dirty log.
    StartDirtyLog,
    /// Pause the SVM, then call [`Secondary::paused`].
    Pause,
    /// Harvest the dirty log into [`Secondary::harvest_target`], then call [`Secondary::harvested`].
    HarvestDirty,
    /// Write [`Secondary::staged_pfns`] / [`Secondary::staged_data`] into the SVM and set its state
    /// to [`Secondary::staged_state`] (when verifying, then digest all memory and the state), then
    /// call [`Secondary::applied`]. The SVM is paused.
    Apply {
        /// The checkpoint.
        epoch: u64,
    },
    /// Resume the SVM, then call [`Secondary::resumed`].
    Resume,
    /// The SVM now runs in `epoch`: tag its output with it and inject the mirrored requests the
    /// guest has not seen yet.
    Running {
        /// The epoch.
        epoch: u64,
    },
    /// The primary is lost: this node takes over as the new primary (the SVM runs).
    TakeOver {
        /// Why.
        reason: String,
    },
    /// The primary ended replication on purpose (GOODBYE): stop this node, never take over.
    Close {
        /// The primary dropped this secondary on purpose (GOODBYE reason 1, `colo failover` on
        /// the primary): it must never take over. Otherwise the primary stopped in order.
        dropped: bool,
    },
    /// The primary is lost and the SVM holds no complete checkpoint: it cannot take over.
    GiveUp {
        /// Why.
        reason: String,
    },
}

/// What the driver must route itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery<'a> {
    /// A mirrored client request for the SVM.
    Input {
        /// Its position in the input order.
        seq: u64,
        /// The frame.
        frame: &'a [u8],
    },
    /// Initial synchronisation: write this page into the SVM now.
    WritePage {
        /// The pfn.
        pfn: u64,
        /// 4096 bytes.
        data: &'a [u8],
    },
}

/// The secondary's checkpoint state machine.
#[derive(Debug)]
pub struct Secondary {
    cfg: SecondaryConfig,
    state: SecondaryState,
    handshake: Handshake,
    heartbeat: Heartbeat,
    outbox: Vec<u8>,
    actions: VecDeque<SecondaryAction>,
    headers: u8,
    b: DirtyBitmap,
    staged_pfns: Vec<u64>,
    staged_data: Vec<u8>,
    staged_state: Vec<u8>,
    has_state: bool,
    paused: bool,
    applied_any: bool,
    b_list: Vec<u64>,
    pending_loss: Option<String>,
}

impl Secondary {
    /// A secondary whose HELLO is in the outbox. The SVM starts paused.
    pub fn new(cfg: SecondaryConfig, now: Instant) -> Self {
        let mut outbox = Vec::with_capacity(4096);
        let handshake = Handshake::start(
            Role::Secondary,
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
            b: DirtyBitmap::new(cfg.page_count),
            cfg,
            state: SecondaryState::AwaitingHandshake,
            handshake,
            heartbeat,
            outbox,
            actions: VecDeque::new(),
            headers: 0,
            staged_pfns: Vec::new(),
            staged_data: Vec::new(),
            staged_state: Vec::new(),
            has_state: false,
            paused: true,
            applied_any: false,
            b_list: Vec::new(),
            pending_loss: None,
        }
    }

    /// What the machine awaits.
    pub fn state(&self) -> SecondaryState {
        self.state
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<SecondaryAction> {
        self.actions.pop_front()
    }

    /// Bytes to write to the link (then clear the vector).
    pub fn outbox_mut(&mut self) -> &mut Vec<u8> {
        &mut self.outbox
    }

    /// The bitmap the driver harvests into.
    pub fn harvest_target(&mut self) -> &mut DirtyBitmap {
        &mut self.b
    }

    /// Staged pfns of the checkpoint to apply, in arrival order (a later copy of a pfn wins).
    pub fn staged_pfns(&self) -> &[u64] {
        &self.staged_pfns
    }

    /// Staged page data, 4096 bytes per staged pfn.
    pub fn staged_data(&self) -> &[u8] {
        &self.staged_data
    }

    /// The staged vCPU/platform state.
    pub fn staged_state(&self) -> &[u8] {
        &self.staged_state
    }

    /// Whether applies include a digest.
    pub fn verifying(&self) -> bool {
        self.cfg.verify
    }

    /// Pages currently staged (bounded by the checkpoint's |D|).
    pub fn staged_pages(&self) -> usize {
        self.staged_pfns.len()
    }

    fn err(&self, event: impl Into<String>) -> EngineError {
        EngineError::unexpected(self.state.name(), event)
    }

    fn send(&mut self, now: Instant, m: &Message<'_>) {
        m.encode(&mut self.outbox);
        self.heartbeat.sent(now);
    }

    fn stage_page(&mut self, epoch: u64, pfn: u64, data: &[u8]) -> Result<(), EngineError> {
        if pfn >= self.cfg.page_count {
            return Err(EngineError::PfnOutOfRange {
                pfn,
                pages: self.cfg.page_count,
            });
        }
        if self.staged_pfns.len() as u64 >= self.cfg.page_count {
            return Err(EngineError::CheckpointTooLarge {
                epoch,
                pages: self.cfg.page_count,
            });
        }
        self.staged_pfns.push(pfn);
        self.staged_data
            .extend_from_slice(&data[..PAGE_SIZE.min(data.len())]);
        if data.len() < PAGE_SIZE {
            // The decoder always yields whole pages; keep the invariant regardless.
            self.staged_data
                .resize(self.staged_pfns.len() * PAGE_SIZE, 0);
        }
        Ok(())
    }

    fn drop_staged(&mut self) {
        self.staged_pfns.clear();
        self.staged_data.clear();
        self.staged_state.clear();
        self.has_state = false;
    }

    /// One decoded event of the primary's stream.
    pub fn on_event<'a>(
        &mut self,
        now: Instant,
        ev: &Event<'a>,
    ) -> Result<Option<Delivery<'a>>, EngineError> {
        self.heartbeat.heard(now);
        match ev {
            Event::ImageHeader(_) if self.headers == 0 => {
                self.headers = 1;
                Ok(None)
            }
            Event::DomainHeader(h) if self.headers == 1 => {
                if h.domain_type != DomainType::X86Hvm {
                    return Err(self.err(
                        "a domain header for a PV guest (colo replicates HVM/PVH guests only)",
                    ));
                }
                self.headers = 2;
                Ok(None)
            }
            Event::ImageHeader(_) | Event::DomainHeader(_) => {
                Err(self.err("a repeated stream header"))
            }
            _ if self.headers < 2 => Err(self.err("a record before the stream headers")),
            Event::PageDataStart { .. } | Event::PageDataEnd => match self.state {
                SecondaryState::InitialSync | SecondaryState::ReceivingCheckpoint { .. } => {
                    Ok(None)
                }
                _ => Err(self.err("PAGE_DATA")),
            },
            Event::Page { pfn, data, .. } => {
                let Some(data) = *data else {
                    // Pages without data (XTAB, BROKEN, XALLOC) leave the SVM's page as it is.
                    return match self.state {
                        SecondaryState::InitialSync
                        | SecondaryState::ReceivingCheckpoint { .. } => Ok(None),
                        _ => Err(self.err("PAGE_DATA")),
                    };
                };
                match self.state {
                    SecondaryState::InitialSync => {
                        if *pfn >= self.cfg.page_count {
                            return Err(EngineError::PfnOutOfRange {
                                pfn: *pfn,
                                pages: self.cfg.page_count,
                            });
                        }
                        Ok(Some(Delivery::WritePage { pfn: *pfn, data }))
                    }
                    SecondaryState::ReceivingCheckpoint { epoch } => {
                        self.stage_page(epoch, *pfn, data)?;
                        Ok(None)
                    }
                    _ => Err(self.err("PAGE_DATA")),
                }
            }
            Event::Record(rec) => self.on_record(now, rec),
        }
    }

    fn on_record<'a>(
        &mut self,
        now: Instant,
        rec: &Record<'a>,
    ) -> Result<Option<Delivery<'a>>, EngineError> {
        match rec {
            Record::Checkpoint => {
                let epoch = match self.state {
                    SecondaryState::InitialSync => 0,
                    SecondaryState::ReceivingCheckpoint { epoch } => epoch,
                    _ => return Err(self.err("CHECKPOINT")),
                };
                if !self.has_state {
                    return Err(self.err("CHECKPOINT without the vCPU state (VCPU_STATE record)"));
                }
                self.state = SecondaryState::Applying { epoch };
                self.actions.push_back(SecondaryAction::Apply { epoch });
                Ok(None)
            }
            Record::Optional { rtype, body } => match Message::parse(*rtype, body)? {
                Some(m) => self.on_message(now, m),
                None => Ok(None),
            },
            // Xen's own vCPU/platform records are accepted and skipped: colo carries the
            // backend's state in VCPU_STATE.
            Record::TscInfo(_)
            | Record::HvmContext(_)
            | Record::HvmParams(_)
            | Record::CpuidPolicy(_)
            | Record::MsrPolicy(_)
            | Record::StaticDataEnd
            | Record::Verify
                if matches!(
                    self.state,
                    SecondaryState::InitialSync | SecondaryState::ReceivingCheckpoint { .. }
                ) =>
            {
                Ok(None)
            }
            other => Err(self.err(format!("{} record from the primary", record_name(other)))),
        }
    }

    fn on_message<'a>(
        &mut self,
        now: Instant,
        m: Message<'a>,
    ) -> Result<Option<Delivery<'a>>, EngineError> {
        match (self.state, &m) {
            (SecondaryState::AwaitingHandshake, _) => {
                if self.handshake.on_message(&m, &mut self.outbox)? {
                    // The initial synchronisation is as long as the guest is big: only silence
                    // counts against it, not its duration.
                    self.heartbeat.awaiting_progress(None);
                    self.state = SecondaryState::InitialSync;
                }
                Ok(None)
            }
            (_, Message::Heartbeat(_)) => Ok(None),
            (SecondaryState::TakenOver | SecondaryState::Failed | SecondaryState::Closed, _) => {
                Ok(None)
            }
            (_, Message::Input { seq, frame }) => Ok(Some(Delivery::Input { seq: *seq, frame })),
            (
                SecondaryState::InitialSync | SecondaryState::ReceivingCheckpoint { .. },
                Message::VcpuState(blob),
            ) => {
                self.staged_state.clear();
                self.staged_state.extend_from_slice(blob);
                self.has_state = true;
                Ok(None)
            }
            (
                SecondaryState::AwaitingNew { epoch },
                Message::Control {
                    msg: Control::New,
                    epoch: got,
                },
            ) => {
                if *got != epoch + 1 {
                    return Err(EngineError::WrongEpoch {
                        msg: "NEW",
                        got: *got,
                        want: epoch + 1,
                    });
                }
                self.state = SecondaryState::Pausing { epoch: *got };
                self.heartbeat.awaiting_progress(Some(now));
                self.actions.push_back(SecondaryAction::Pause);
                Ok(None)
            }
            (_, Message::Goodbye(reason)) => {
                self.drop_staged();
                self.actions.clear();
                self.state = SecondaryState::Closed;
                self.actions.push_back(SecondaryAction::Close {
                    dropped: *reason == GOODBYE_DROPPED,
                });
                Ok(None)
            }
            (_, m) => Err(self.err(match m {
                Message::Control { msg, epoch } => format!("CONTROL {msg}({epoch})"),
                other => message_name(other).to_string(),
            })),
        }
    }

    /// The driver paused the SVM.
    pub fn paused(&mut self, _now: Instant) -> Result<(), EngineError> {
        let SecondaryState::Pausing { epoch } = self.state else {
            return Err(self.err("paused"));
        };
        self.paused = true;
        self.b.clear_all();
        self.state = SecondaryState::Harvesting { epoch };
        self.actions.push_back(SecondaryAction::HarvestDirty);
        Ok(())
    }

    /// The driver harvested B: send SVM_SUSPENDED and B on the back channel.
    pub fn harvested(&mut self, now: Instant) -> Result<(), EngineError> {
        let SecondaryState::Harvesting { epoch } = self.state else {
            return Err(self.err("harvested"));
        };
        self.send(
            now,
            &Message::Control {
                msg: Control::SvmSuspended,
                epoch,
            },
        );
        self.b_list.clear();
        self.b.extend_pfns(&mut self.b_list);
        encode_dirty_pfn_list(&mut self.outbox, self.b_list.iter().copied());
        self.drop_staged();
        self.state = SecondaryState::ReceivingCheckpoint { epoch };
        Ok(())
    }

    /// The driver applied the staged checkpoint; `digest` of all memory and the state when
    /// verifying (None if the memory changed while it was digested: the primary then reports
    /// the checkpoint's verification as unsettled).
    pub fn applied(
        &mut self,
        now: Instant,
        digest: Option<[u8; DIGEST_LEN]>,
    ) -> Result<(), EngineError> {
        let SecondaryState::Applying { epoch } = self.state else {
            return Err(self.err("applied"));
        };
        self.applied_any = true;
        self.drop_staged();
        if let Some(reason) = self.pending_loss.take() {
            // The primary died after sending this checkpoint whole: it is applied, and this node
            // takes over from it.
            self.state = SecondaryState::Resuming { epoch };
            self.lose(reason);
            return Ok(());
        }
        if let Some(digest) = digest {
            self.send(now, &Message::Digest { epoch, digest });
        }
        self.send(
            now,
            &Message::Control {
                msg: Control::SvmReady,
                epoch,
            },
        );
        if epoch == 0 {
            self.actions.push_back(SecondaryAction::StartDirtyLog);
        }
        self.state = SecondaryState::Resuming { epoch };
        self.actions.push_back(SecondaryAction::Resume);
        Ok(())
    }

    /// The driver resumed the SVM.
    pub fn resumed(&mut self, now: Instant) -> Result<(), EngineError> {
        let SecondaryState::Resuming { epoch } = self.state else {
            return Err(self.err("resumed"));
        };
        self.paused = false;
        self.send(
            now,
            &Message::Control {
                msg: Control::SvmResumed,
                epoch,
            },
        );
        self.heartbeat.awaiting_progress(None);
        self.state = SecondaryState::AwaitingNew { epoch };
        self.actions.push_back(SecondaryAction::Running { epoch });
        Ok(())
    }

    /// Appends a frame the SVM emitted to the outbox, tagged with its epoch.
    pub fn send_output(&mut self, now: Instant, frame: &[u8]) {
        if let SecondaryState::AwaitingNew { epoch } = self.state {
            self.send(now, &Message::Output { epoch, frame });
        }
    }

    /// The epoch the SVM runs in, if it runs.
    pub fn running_epoch(&self) -> Option<u64> {
        match self.state {
            SecondaryState::AwaitingNew { epoch } => Some(epoch),
            _ => None,
        }
    }

    /// Bytes from the primary arrived at `at` (the driver's receiving thread saw them, even if
    /// they are not decoded yet): the peer is alive. Call it before [`Self::handle_timeout`] so a
    /// driver that spent a while in a backend call does not take its own delay for the peer's
    /// silence.
    pub fn peer_heard(&mut self, at: Instant) {
        self.heartbeat.heard(at);
    }

    /// Time passed: sends heartbeats and detects a lost or stuck primary.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(
            self.state,
            SecondaryState::TakenOver | SecondaryState::Failed | SecondaryState::Closed
        ) {
            return;
        }
        if let Some(reason) = self.heartbeat.lost(now) {
            self.lose(reason);
            return;
        }
        if self.state != SecondaryState::AwaitingHandshake {
            if let Some(seq) = self.heartbeat.due(now) {
                Message::Heartbeat(seq).encode(&mut self.outbox);
            }
        }
    }

    /// When [`Secondary::handle_timeout`] should be called next.
    pub fn next_timeout(&self) -> Option<Instant> {
        (!matches!(
            self.state,
            SecondaryState::TakenOver | SecondaryState::Failed | SecondaryState::Closed
        ))
        .then(|| self.heartbeat.next_deadline())
    }

    /// The link failed (reset, EOF, malformed input): take over if the SVM holds a complete
    /// checkpoint.
    pub fn peer_lost(&mut self, reason: String) {
        self.lose(reason);
    }

    /// The operator forces a failover.
    pub fn failover(&mut self) {
        self.lose("failover requested by the operator".into());
    }

    fn lose(&mut self, reason: String) {
        if matches!(
            self.state,
            SecondaryState::TakenOver | SecondaryState::Failed | SecondaryState::Closed
        ) {
            return;
        }
        if let SecondaryState::Applying { .. } = self.state {
            // The checkpoint is complete and queued for applying: apply it, then take over.
            self.pending_loss = Some(reason);
            return;
        }
        // A torn checkpoint is never applied: whatever was staged is dropped.
        self.drop_staged();
        self.actions.clear();
        // During the handshake the outbox holds this node's HELLO/AUTH: it still goes out, so
        // a peer this node refused (another key, size, --verify) learns why from its own check
        // instead of seeing the link close.
        if self.state != SecondaryState::AwaitingHandshake {
            self.outbox.clear();
        }
        if !self.applied_any {
            self.state = SecondaryState::Failed;
            self.actions.push_back(SecondaryAction::GiveUp {
                reason: format!("{reason}; the secondary never held a complete checkpoint"),
            });
            return;
        }
        if self.paused {
            self.actions.push_back(SecondaryAction::Resume);
            self.paused = false;
        }
        self.state = SecondaryState::TakenOver;
        self.actions.push_back(SecondaryAction::TakeOver { reason });
    }
}

//! The secondary's state machine: applies the initial synchronisation, then stages each
//! checkpoint and applies it only when its CHECKPOINT record arrives (all or nothing), and
//! answers NEW with its own dirty set B on the back channel. See [`super`] for the diagram.

use std::collections::VecDeque;
use std::time::Instant;

use super::common::{check_epoch, message_event, record_name, EngineState, LinkConfig, Peer};
use super::messages::{Control, Message, Role, DIGEST_LEN};
use super::EngineError;
use crate::bitmap::DirtyBitmap;
use crate::disk::{DiskBlocks, DiskMirror, DiskStaging, DISK_DIGEST_LEN};
use crate::stream::{encode_dirty_pfn_list, DomainType, Event, Record};
use crate::PAGE_SIZE;

/// Settings of the secondary: those of its link.
pub type SecondaryConfig = LinkConfig;

/// GOODBYE's reason when the primary drops its secondary on purpose.
pub const GOODBYE_DROPPED: u32 = 1;

/// What the secondary awaits. A state that receives a checkpoint carries whether its vCPU state
/// has arrived; `Applying` carries the loss of the primary that arrived while applying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecondaryState {
    /// The primary's stream headers, HELLO and AUTH.
    AwaitingHandshake,
    /// Pages of the initial synchronisation, written straight to the SVM, until CHECKPOINT(0).
    InitialSync {
        /// VCPU_STATE arrived (it is staged).
        state_staged: bool,
    },
    /// The driver to apply checkpoint `epoch` (`applied`).
    Applying {
        /// The checkpoint.
        epoch: u64,
        /// The primary was lost meanwhile (why): the checkpoint is complete, so it is applied
        /// and this node takes over from it.
        primary_lost: Option<String>,
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
        /// VCPU_STATE arrived (it is staged).
        state_staged: bool,
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
            SecondaryState::InitialSync { .. } => "InitialSync",
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

    /// The primary's stream is being received (pages, records, the vCPU state).
    fn receiving(&self) -> bool {
        matches!(
            self,
            SecondaryState::InitialSync { .. } | SecondaryState::ReceivingCheckpoint { .. }
        )
    }

    /// The SVM is paused: it starts paused, the driver pauses it after NEW and resumes it after
    /// each apply.
    fn svm_paused(&self) -> bool {
        match self {
            SecondaryState::AwaitingNew { .. }
            | SecondaryState::Pausing { .. }
            | SecondaryState::TakenOver => false,
            SecondaryState::AwaitingHandshake
            | SecondaryState::InitialSync { .. }
            | SecondaryState::Harvesting { .. }
            | SecondaryState::ReceivingCheckpoint { .. }
            | SecondaryState::Applying { .. }
            | SecondaryState::Resuming { .. }
            | SecondaryState::Failed
            | SecondaryState::Closed => true,
        }
    }

    /// The SVM holds a complete checkpoint (checkpoint 0 was applied).
    fn holds_checkpoint(&self) -> bool {
        match self {
            SecondaryState::AwaitingHandshake
            | SecondaryState::InitialSync { .. }
            | SecondaryState::Failed => false,
            SecondaryState::Applying { epoch, .. } => *epoch > 0,
            SecondaryState::Resuming { .. }
            | SecondaryState::AwaitingNew { .. }
            | SecondaryState::Pausing { .. }
            | SecondaryState::Harvesting { .. }
            | SecondaryState::ReceivingCheckpoint { .. }
            | SecondaryState::TakenOver
            | SecondaryState::Closed => true,
        }
    }
}

impl EngineState for SecondaryState {
    fn name(&self) -> &'static str {
        SecondaryState::name(self)
    }

    fn handshaking(&self) -> bool {
        *self == SecondaryState::AwaitingHandshake
    }

    fn is_over(&self) -> bool {
        matches!(
            self,
            SecondaryState::TakenOver | SecondaryState::Failed | SecondaryState::Closed
        )
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
    /// Write the pages of [`Secondary::staged_pfns`] (page `i` is the data of the `i`-th
    /// [`Delivery::StagePage`] of this checkpoint, kept by the driver) into the SVM and set its state
    /// to [`Secondary::staged_state`] (when verifying, then digest all memory and the state), then
    /// call [`Secondary::applied`]. The SVM is paused. With a disk: drop the SVM's overlay and
    /// write [`Secondary::staged_disk_blocks`] / [`Secondary::staged_disk_data`] into the disk
    /// image (when verifying, digest the disk and call [`Secondary::disk_digest`] first); the
    /// SVM's writes from its resume on go to a fresh overlay. See [`crate::disk`].
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
    /// The primary is lost: this node takes over as the new primary (the SVM runs). With a
    /// disk, the SVM's overlay (its writes since the checkpoint it runs from) is kept: merged
    /// into the disk image before the node serves.
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
    /// A checkpoint's page (its pfn checked and counted): the driver keeps `data` (or a
    /// reference to the buffer it was received in) for the [`SecondaryAction::Apply`] of this
    /// checkpoint, as the `i`-th page of [`Secondary::staged_pfns`]. Nothing is written into the
    /// SVM before that; a torn checkpoint's pages are simply dropped.
    StagePage {
        /// The pfn.
        pfn: u64,
        /// 4096 bytes.
        data: &'a [u8],
    },
    /// Initial synchronisation: write these disk blocks into the disk image now (every block
    /// number was checked against the disk).
    WriteBlocks(DiskBlocks<'a>),
}

/// How far the primary's stream is through its two headers, which precede every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamHeaders {
    /// The image header comes first.
    AwaitingImage,
    /// Then the domain header.
    AwaitingDomain,
    /// Both are read: records follow.
    Read,
}

/// The checkpoint being received, staged until its CHECKPOINT, and applied after it. The
/// buffers are kept across checkpoints; they hold at most the checkpoint's |D| pfns, never more
/// than the guest has. The pages' data stays with the driver ([`Delivery::StagePage`]), which
/// receives it.
#[derive(Debug, Default)]
struct Staging {
    pfns: Vec<u64>,
    state: Vec<u8>,
    /// The disk's blocks of the checkpoint being applied (bounded by the disk's block count):
    /// what [`Secondary::next_disk`] held when its CHECKPOINT arrived.
    disk: DiskStaging,
}

impl Staging {
    /// Stages page `pfn` of checkpoint `epoch` of a guest of `pages` pages (its data, whole
    /// pages only, goes to the driver).
    fn page(&mut self, epoch: u64, pages: u64, pfn: u64, data: &[u8]) -> Result<(), EngineError> {
        if pfn >= pages {
            return Err(EngineError::PfnOutOfRange { pfn, pages });
        }
        if self.pfns.len() as u64 >= pages {
            return Err(EngineError::CheckpointTooLarge { epoch, pages });
        }
        if data.len() != PAGE_SIZE {
            // The decoder always yields whole pages.
            return Err(EngineError::unexpected(
                "ReceivingCheckpoint",
                format!("a page of {} bytes", data.len()),
            ));
        }
        self.pfns.push(pfn);
        Ok(())
    }

    /// Stages the vCPU/platform state (a later copy replaces an earlier one).
    fn vcpu_state(&mut self, blob: &[u8]) {
        self.state.clear();
        self.state.extend_from_slice(blob);
    }

    fn clear(&mut self) {
        self.pfns.clear();
        self.state.clear();
        self.disk.clear();
    }
}

/// The secondary's checkpoint state machine.
#[derive(Debug)]
pub struct Secondary {
    cfg: SecondaryConfig,
    state: SecondaryState,
    peer: Peer,
    actions: VecDeque<SecondaryAction>,
    headers: StreamHeaders,
    staged: Staging,
    /// The disk blocks of the next CHECKPOINT, keyed by block (bounded by the disk's block
    /// count): every DISK_BLOCKS record after CHECKPOINT(n) belongs to checkpoint n + 1, sent
    /// at its capture or, with continuous mirroring, from CHECKPOINT(n) on while the PVM ran.
    next_disk: DiskStaging,
    b: DirtyBitmap,
    b_list: Vec<u64>,
}

impl Secondary {
    /// A secondary whose HELLO is in the outbox. The SVM starts paused.
    pub fn new(cfg: SecondaryConfig, now: Instant) -> Self {
        Self {
            b: DirtyBitmap::new(cfg.page_count),
            peer: Peer::new(Role::Secondary, &cfg, now, Vec::with_capacity(4096)),
            cfg,
            state: SecondaryState::AwaitingHandshake,
            actions: VecDeque::new(),
            headers: StreamHeaders::AwaitingImage,
            staged: Staging::default(),
            next_disk: DiskStaging::default(),
            b_list: Vec::new(),
        }
    }

    /// What the machine awaits.
    pub fn state(&self) -> SecondaryState {
        self.state.clone()
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<SecondaryAction> {
        self.actions.pop_front()
    }

    /// Bytes to write to the link (then clear the vector).
    pub fn outbox_mut(&mut self) -> &mut Vec<u8> {
        self.peer.outbox_mut()
    }

    /// The bitmap the driver harvests into.
    pub fn harvest_target(&mut self) -> &mut DirtyBitmap {
        &mut self.b
    }

    /// Staged pfns of the checkpoint to apply, in arrival order (a later copy of a pfn wins).
    pub fn staged_pfns(&self) -> &[u64] {
        &self.staged.pfns
    }

    /// The staged vCPU/platform state.
    pub fn staged_state(&self) -> &[u8] {
        &self.staged.state
    }

    /// Whether applies include a digest.
    pub fn verifying(&self) -> bool {
        self.cfg.verify
    }

    /// The replicated disk's size in blocks (the primary's, once the handshake is done; 0: no
    /// disk).
    pub fn disk_blocks(&self) -> u64 {
        self.peer.disk_blocks()
    }

    /// Staged disk blocks of the checkpoint to apply, in arrival order (a later copy of a block
    /// wins).
    pub fn staged_disk_blocks(&self) -> &[u64] {
        self.staged.disk.blocks()
    }

    /// Staged disk data, 4096 bytes per staged block.
    pub fn staged_disk_data(&self) -> &[u8] {
        self.staged.disk.data()
    }

    /// Disk blocks staged for the next checkpoint so far (mirrored ones included).
    pub fn staged_next_disk_blocks(&self) -> usize {
        self.next_disk.len()
    }

    /// The digest of the disk after applying the checkpoint (verification with a disk): sent
    /// to the primary as DISK_DIGEST before SVM_READY. Only while applying.
    pub fn disk_digest(
        &mut self,
        now: Instant,
        digest: [u8; DISK_DIGEST_LEN],
    ) -> Result<(), EngineError> {
        let SecondaryState::Applying { epoch, .. } = self.state else {
            return Err(self.state.unexpected("disk_digest"));
        };
        self.peer.send(now, &Message::DiskDigest { epoch, digest });
        Ok(())
    }

    /// Pages currently staged (bounded by the checkpoint's |D|).
    pub fn staged_pages(&self) -> usize {
        self.staged.pfns.len()
    }

    /// One decoded event of the primary's stream.
    pub fn on_event<'a>(
        &mut self,
        now: Instant,
        ev: &Event<'a>,
    ) -> Result<Option<Delivery<'a>>, EngineError> {
        self.peer.heard(now);
        match ev {
            Event::ImageHeader(_) | Event::DomainHeader(_) => self.on_header(ev).map(|()| None),
            _ if self.headers != StreamHeaders::Read => {
                Err(self.state.unexpected("a record before the stream headers"))
            }
            Event::PageDataStart { .. } | Event::PageDataEnd if self.state.receiving() => Ok(None),
            // Pages without data (XTAB, BROKEN, XALLOC) leave the SVM's page as it is.
            Event::Page { data: None, .. } if self.state.receiving() => Ok(None),
            Event::Page {
                pfn,
                data: Some(data),
                ..
            } => self.on_page(*pfn, data),
            Event::PageDataStart { .. } | Event::PageDataEnd | Event::Page { .. } => {
                Err(self.state.unexpected("PAGE_DATA"))
            }
            Event::Record(rec) => self.on_record(now, rec),
        }
    }

    /// The image header, then the domain header (an HVM guest's), each once.
    fn on_header(&mut self, ev: &Event<'_>) -> Result<(), EngineError> {
        match (self.headers, ev) {
            (StreamHeaders::AwaitingImage, Event::ImageHeader(_)) => {
                self.headers = StreamHeaders::AwaitingDomain;
            }
            (StreamHeaders::AwaitingDomain, Event::DomainHeader(h)) => {
                if h.domain_type != DomainType::X86Hvm {
                    return Err(self.state.unexpected(
                        "a domain header for a PV guest (colo replicates HVM/PVH guests only)",
                    ));
                }
                self.headers = StreamHeaders::Read;
            }
            _ => return Err(self.state.unexpected("a repeated stream header")),
        }
        Ok(())
    }

    /// A page with data: written now during the initial synchronisation, else staged.
    fn on_page<'a>(
        &mut self,
        pfn: u64,
        data: &'a [u8],
    ) -> Result<Option<Delivery<'a>>, EngineError> {
        let pages = self.cfg.page_count;
        match self.state {
            SecondaryState::InitialSync { .. } if pfn >= pages => {
                Err(EngineError::PfnOutOfRange { pfn, pages })
            }
            SecondaryState::InitialSync { .. } => Ok(Some(Delivery::WritePage { pfn, data })),
            SecondaryState::ReceivingCheckpoint { epoch, .. } => {
                self.staged.page(epoch, pages, pfn, data)?;
                Ok(Some(Delivery::StagePage { pfn, data }))
            }
            _ => Err(self.state.unexpected("PAGE_DATA")),
        }
    }

    fn on_record<'a>(
        &mut self,
        now: Instant,
        rec: &Record<'a>,
    ) -> Result<Option<Delivery<'a>>, EngineError> {
        match rec {
            Record::Checkpoint => {
                let (epoch, state_staged) = match self.state {
                    SecondaryState::InitialSync { state_staged } => (0, state_staged),
                    SecondaryState::ReceivingCheckpoint {
                        epoch,
                        state_staged,
                    } => (epoch, state_staged),
                    _ => return Err(self.state.unexpected("CHECKPOINT")),
                };
                if !state_staged {
                    return Err(self
                        .state
                        .unexpected("CHECKPOINT without the vCPU state (VCPU_STATE record)"));
                }
                // The blocks staged since the last CHECKPOINT are this checkpoint's.
                self.staged.disk.clear();
                std::mem::swap(&mut self.staged.disk, &mut self.next_disk);
                self.state = SecondaryState::Applying {
                    epoch,
                    primary_lost: None,
                };
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
                if self.state.receiving() =>
            {
                Ok(None)
            }
            other => Err(self
                .state
                .unexpected(format!("{} record from the primary", record_name(other)))),
        }
    }

    fn on_message<'a>(
        &mut self,
        now: Instant,
        m: Message<'a>,
    ) -> Result<Option<Delivery<'a>>, EngineError> {
        if self.state.handshaking() {
            if self.peer.handshake(&m)? {
                self.state = SecondaryState::InitialSync {
                    state_staged: false,
                };
            }
            return Ok(None);
        }
        match (&mut self.state, m) {
            (_, Message::Heartbeat(_)) => {}
            (s, _) if s.is_over() => {}
            (_, Message::Input { seq, frame }) => return Ok(Some(Delivery::Input { seq, frame })),
            (SecondaryState::InitialSync { .. }, Message::DiskBlocks(d)) => {
                d.check(self.peer.disk_blocks())?;
                return Ok(Some(Delivery::WriteBlocks(d)));
            }
            (SecondaryState::ReceivingCheckpoint { .. }, Message::DiskBlocks(d)) => {
                self.next_disk.stage(self.peer.disk_blocks(), &d)?;
            }
            // Continuous mirroring: blocks the PVM wrote since CHECKPOINT(n), sent while it ran,
            // for checkpoint n + 1; staged, never applied before its CHECKPOINT.
            (
                SecondaryState::Applying { .. }
                | SecondaryState::Resuming { .. }
                | SecondaryState::AwaitingNew { .. }
                | SecondaryState::Pausing { .. }
                | SecondaryState::Harvesting { .. },
                Message::DiskBlocks(d),
            ) if self.cfg.disk_mirror == DiskMirror::Continuous => {
                self.next_disk.stage(self.peer.disk_blocks(), &d)?;
            }
            (
                SecondaryState::InitialSync { state_staged }
                | SecondaryState::ReceivingCheckpoint { state_staged, .. },
                Message::VcpuState(blob),
            ) => {
                self.staged.vcpu_state(blob);
                *state_staged = true;
            }
            (
                SecondaryState::AwaitingNew { epoch },
                Message::Control {
                    msg: Control::New,
                    epoch: got,
                },
            ) => {
                check_epoch("NEW", got, *epoch + 1)?;
                self.state = SecondaryState::Pausing { epoch: got };
                self.peer.awaiting_progress(Some(now));
                self.actions.push_back(SecondaryAction::Pause);
            }
            (_, Message::Goodbye(reason)) => self.close(reason),
            (_, m) => return Err(self.state.unexpected(message_event(&m))),
        }
        Ok(None)
    }

    /// GOODBYE: the primary ends replication on purpose.
    fn close(&mut self, reason: u32) {
        self.staged.clear();
        self.next_disk.clear();
        self.actions.clear();
        self.state = SecondaryState::Closed;
        self.actions.push_back(SecondaryAction::Close {
            dropped: reason == GOODBYE_DROPPED,
        });
    }

    /// The driver paused the SVM.
    pub fn paused(&mut self, _now: Instant) -> Result<(), EngineError> {
        let SecondaryState::Pausing { epoch } = self.state else {
            return Err(self.state.unexpected("paused"));
        };
        self.b.clear_all();
        self.state = SecondaryState::Harvesting { epoch };
        self.actions.push_back(SecondaryAction::HarvestDirty);
        Ok(())
    }

    /// The driver harvested B: send SVM_SUSPENDED and B on the back channel.
    pub fn harvested(&mut self, now: Instant) -> Result<(), EngineError> {
        let SecondaryState::Harvesting { epoch } = self.state else {
            return Err(self.state.unexpected("harvested"));
        };
        self.peer.send(
            now,
            &Message::Control {
                msg: Control::SvmSuspended,
                epoch,
            },
        );
        self.b_list.clear();
        self.b.extend_pfns(&mut self.b_list);
        let b = &self.b_list;
        self.peer
            .write(now, |out| encode_dirty_pfn_list(out, b.iter().copied()));
        self.staged.clear();
        self.state = SecondaryState::ReceivingCheckpoint {
            epoch,
            state_staged: false,
        };
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
        let SecondaryState::Applying {
            epoch,
            primary_lost,
        } = &mut self.state
        else {
            return Err(self.state.unexpected("applied"));
        };
        let (epoch, primary_lost) = (*epoch, primary_lost.take());
        self.staged.clear();
        self.state = SecondaryState::Resuming { epoch };
        if let Some(reason) = primary_lost {
            // The primary died after sending this checkpoint whole: it is applied, and this node
            // takes over from it.
            self.lose(reason);
            return Ok(());
        }
        if let Some(digest) = digest {
            self.peer.send(now, &Message::Digest { epoch, digest });
        }
        self.peer.send(
            now,
            &Message::Control {
                msg: Control::SvmReady,
                epoch,
            },
        );
        if epoch == 0 {
            self.actions.push_back(SecondaryAction::StartDirtyLog);
        }
        self.actions.push_back(SecondaryAction::Resume);
        Ok(())
    }

    /// The driver resumed the SVM.
    pub fn resumed(&mut self, now: Instant) -> Result<(), EngineError> {
        let SecondaryState::Resuming { epoch } = self.state else {
            return Err(self.state.unexpected("resumed"));
        };
        self.peer.send(
            now,
            &Message::Control {
                msg: Control::SvmResumed,
                epoch,
            },
        );
        self.peer.awaiting_progress(None);
        self.state = SecondaryState::AwaitingNew { epoch };
        self.actions.push_back(SecondaryAction::Running { epoch });
        Ok(())
    }

    /// Appends a frame the SVM emitted to the outbox, tagged with its epoch.
    pub fn send_output(&mut self, now: Instant, frame: &[u8]) {
        if let Some(epoch) = self.running_epoch() {
            self.peer.send(now, &Message::Output { epoch, frame });
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
        self.peer.heard(at);
    }

    /// Time passed: sends heartbeats and detects a lost or stuck primary.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(reason) = self.peer.tick(now, &self.state) {
            self.lose(reason);
        }
    }

    /// When [`Secondary::handle_timeout`] should be called next.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.peer.next_timeout(&self.state)
    }

    /// The link failed (reset, EOF, malformed input): take over if the SVM holds a complete
    /// checkpoint.
    pub fn peer_lost(&mut self, now: Instant, reason: String) {
        let _ = now;
        self.lose(reason);
    }

    /// The operator forces a failover.
    pub fn failover(&mut self, now: Instant) {
        self.peer_lost(now, "failover requested by the operator".into());
    }

    fn lose(&mut self, reason: String) {
        match &mut self.state {
            s if s.is_over() => return,
            SecondaryState::Applying { primary_lost, .. } => {
                // The checkpoint is complete and queued for applying: apply it, then take over.
                *primary_lost = Some(reason);
                return;
            }
            _ => {}
        }
        // A torn checkpoint is never applied: whatever was staged is dropped, the blocks
        // mirrored for the next checkpoint with it.
        self.staged.clear();
        self.next_disk.clear();
        self.actions.clear();
        self.peer.hang_up(&self.state);
        if !self.state.holds_checkpoint() {
            self.state = SecondaryState::Failed;
            self.actions.push_back(SecondaryAction::GiveUp {
                reason: format!("{reason}; the secondary never held a complete checkpoint"),
            });
            return;
        }
        if self.state.svm_paused() {
            self.actions.push_back(SecondaryAction::Resume);
        }
        self.state = SecondaryState::TakenOver;
        self.actions.push_back(SecondaryAction::TakeOver { reason });
    }
}

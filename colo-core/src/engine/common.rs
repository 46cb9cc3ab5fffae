//! The plumbing both engines share: the link's settings, the peer (handshake, heartbeats and
//! failure detection, the outbox of bytes for it), the trait their states implement, and the
//! names of records and messages for errors.

use std::time::Instant;

use super::link::{message_name, Handshake, Offer};
use super::messages::{Message, Role};
use super::{EngineError, Liveness};
use crate::disk::DiskMirror;
use crate::stream::{PageCoding, Record};

/// Settings both roles share: what the link handshake checks and how the peer is watched.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The guest's page count.
    pub page_count: u64,
    /// The guest's disk in 4 KiB blocks (0: none that colo replicates; see [`crate::disk`]). A
    /// secondary's must be at least the primary's; the handshake checks.
    pub disk_blocks: u64,
    /// Heartbeats and failure detection.
    pub liveness: Liveness,
    /// Digest all of memory at every checkpoint: the secondary sends its digest, the primary
    /// compares it with its own. Both sides must agree (the handshake checks).
    pub verify: bool,
    /// Pre-shared key for the link, if any.
    pub key: Option<Vec<u8>>,
    /// Leave the records after the handshake unsealed (`--insecure-plaintext`; both sides must
    /// agree, the handshake checks).
    pub plaintext: bool,
    /// How page data travels (`--zero-pages`, `--compress`; both sides must agree, the
    /// handshake checks). The primary's driver codes the pages; the secondary's decoder reads
    /// any coding.
    pub coding: PageCoding,
    /// How disk blocks travel: at the checkpoint or mirrored while the PVM runs
    /// (`--disk-mirror`; both sides must agree, the handshake checks; see [`crate::disk`]).
    pub disk_mirror: DiskMirror,
    /// Connections the transport uses for the link (`--streams`; both sides must agree, the
    /// handshake checks). The engines see one byte stream whatever the count.
    pub streams: u8,
    /// A fresh random nonce for the handshake.
    pub nonce: [u8; 32],
}

impl LinkConfig {
    /// Defaults for a guest of `page_count` pages: default liveness, no verification, no key.
    pub fn new(page_count: u64) -> Self {
        Self {
            page_count,
            disk_blocks: 0,
            liveness: Liveness::default(),
            verify: false,
            key: None,
            plaintext: false,
            coding: PageCoding::PLAIN,
            disk_mirror: DiskMirror::default(),
            streams: 1,
            nonce: [0; 32],
        }
    }
}

/// What both engines ask of their state enum.
pub(crate) trait EngineState {
    /// The state's name, for errors and status output.
    fn name(&self) -> &'static str;
    /// The link handshake is not complete yet: only HELLO / AUTH may be sent.
    fn handshaking(&self) -> bool;
    /// The peer is gone (lost, or it said goodbye): nothing is sent to it or awaited from it.
    fn is_over(&self) -> bool;
    /// `event` is not valid in this state.
    fn unexpected(&self, event: impl Into<String>) -> EngineError {
        EngineError::unexpected(self.name(), event)
    }
}

/// The engine's side of the link: the handshake, heartbeats and failure detection, and the
/// outbox of bytes the driver writes to the peer.
#[derive(Debug)]
pub(crate) struct Peer {
    handshake: Handshake,
    heartbeat: Heartbeat,
    outbox: Vec<u8>,
}

impl Peer {
    /// Starts the handshake as `role`: our HELLO is appended to `outbox` (which may already hold
    /// the stream's headers). A handshake is a protocol step: it must progress in time.
    pub(crate) fn new(role: Role, cfg: &LinkConfig, now: Instant, mut outbox: Vec<u8>) -> Self {
        let offer = Offer {
            page_count: cfg.page_count,
            disk_blocks: cfg.disk_blocks,
            verify: cfg.verify,
            plaintext: cfg.plaintext,
            coding: cfg.coding,
            disk_mirror: cfg.disk_mirror,
            streams: cfg.streams,
        };
        let handshake = Handshake::offer(role, offer, cfg.key.clone(), cfg.nonce, &mut outbox);
        let mut heartbeat = Heartbeat::new(cfg.liveness, now);
        heartbeat.awaiting_progress(Some(now));
        Self {
            handshake,
            heartbeat,
            outbox,
        }
    }

    /// The replicated disk's size in blocks (the primary's), once the handshake is done.
    pub(crate) fn disk_blocks(&self) -> u64 {
        self.handshake.disk_blocks()
    }

    /// Bytes to write to the link (the driver clears the vector).
    pub(crate) fn outbox_mut(&mut self) -> &mut Vec<u8> {
        &mut self.outbox
    }

    /// Appends what `encode` writes to the outbox; returns how many bytes that was.
    pub(crate) fn write(&mut self, now: Instant, encode: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let before = self.outbox.len();
        encode(&mut self.outbox);
        self.heartbeat.sent(now);
        (self.outbox.len() - before) as u64
    }

    /// Appends `m` to the outbox; returns its length.
    pub(crate) fn send(&mut self, now: Instant, m: &Message<'_>) -> u64 {
        self.write(now, |out| m.encode(out))
    }

    /// Something arrived from the peer at `at`.
    pub(crate) fn heard(&mut self, at: Instant) {
        self.heartbeat.heard(at);
    }

    /// A protocol step is awaited from `since` (Some) or none is (None).
    pub(crate) fn awaiting_progress(&mut self, since: Option<Instant>) {
        self.heartbeat.awaiting_progress(since);
    }

    /// Feeds a message to the handshake. Returns true once the link is trusted; from then on
    /// only silence counts against the peer until the engine awaits a step again.
    pub(crate) fn handshake(&mut self, m: &Message<'_>) -> Result<bool, EngineError> {
        let done = self.handshake.on_message(m, &mut self.outbox)?;
        if done {
            self.heartbeat.awaiting_progress(None);
        }
        Ok(done)
    }

    /// Time passed in `state`: Some(reason) if the peer is lost, else a heartbeat goes out when
    /// one is due.
    pub(crate) fn tick(&mut self, now: Instant, state: &impl EngineState) -> Option<String> {
        if state.is_over() {
            return None;
        }
        if let Some(reason) = self.heartbeat.lost(now) {
            return Some(reason);
        }
        if !state.handshaking() {
            if let Some(seq) = self.heartbeat.due(now) {
                Message::Heartbeat(seq).encode(&mut self.outbox);
            }
        }
        None
    }

    /// When [`Peer::tick`] should run next in `state`.
    pub(crate) fn next_timeout(&self, state: &impl EngineState) -> Option<Instant> {
        (!state.is_over()).then(|| self.heartbeat.next_deadline())
    }

    /// The peer is lost in `state`: what was queued for it is dropped, except during the
    /// handshake, when the outbox holds this node's HELLO/AUTH: that still goes out, so a peer
    /// this node refused (another key, size, --verify) learns why from its own check instead of
    /// seeing the link close.
    pub(crate) fn hang_up(&mut self, state: &impl EngineState) {
        if !state.handshaking() {
            self.outbox.clear();
        }
    }
}

/// Tracks when we last sent and heard, for heartbeats and failure detection.
#[derive(Debug, Clone, Copy)]
struct Heartbeat {
    cfg: Liveness,
    last_sent: Instant,
    last_heard: Instant,
    progress_since: Option<Instant>,
    seq: u64,
}

impl Heartbeat {
    fn new(cfg: Liveness, now: Instant) -> Self {
        Self {
            cfg,
            last_sent: now,
            last_heard: now,
            progress_since: None,
            seq: 0,
        }
    }

    fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    fn sent(&mut self, now: Instant) {
        self.last_sent = self.last_sent.max(now);
    }

    /// A protocol step is awaited from now (Some) or none is (None).
    fn awaiting_progress(&mut self, since: Option<Instant>) {
        self.progress_since = since;
    }

    /// Some(reason) if the peer must be considered lost at `now`.
    fn lost(&self, now: Instant) -> Option<String> {
        let silent = now.saturating_duration_since(self.last_heard);
        if silent >= self.cfg.timeout {
            return Some(format!(
                "nothing heard from the peer for {} ms (timeout {} ms)",
                silent.as_millis(),
                self.cfg.timeout.as_millis()
            ));
        }
        if let Some(since) = self.progress_since {
            let stuck = now.saturating_duration_since(since);
            if stuck >= self.cfg.progress_timeout {
                return Some(format!(
                    "peer alive but made no checkpoint progress for {} ms",
                    stuck.as_millis()
                ));
            }
        }
        None
    }

    /// Returns the next heartbeat sequence number if one is due at `now`.
    fn due(&mut self, now: Instant) -> Option<u64> {
        if now.saturating_duration_since(self.last_sent) >= self.cfg.interval {
            self.seq += 1;
            self.last_sent = now;
            Some(self.seq)
        } else {
            None
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut d = (self.last_sent + self.cfg.interval).min(self.last_heard + self.cfg.timeout);
        if let Some(since) = self.progress_since {
            d = d.min(since + self.cfg.progress_timeout);
        }
        d
    }
}

/// A control message for checkpoint `got` where `want` is in progress is an error.
pub(crate) fn check_epoch(msg: &'static str, got: u64, want: u64) -> Result<(), EngineError> {
    if got == want {
        Ok(())
    } else {
        Err(EngineError::WrongEpoch { msg, got, want })
    }
}

/// A message as an unexpected event: CONTROL with its kind and epoch, others by name.
pub(crate) fn message_event(m: &Message<'_>) -> String {
    match m {
        Message::Control { msg, epoch } => format!("CONTROL {msg}({epoch})"),
        other => message_name(other).to_string(),
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

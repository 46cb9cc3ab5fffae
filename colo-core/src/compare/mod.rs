//! Output comparison: release the PVM's frames to the outside world only once the SVM has
//! produced the same output, and ask for a checkpoint when the two differ.
//!
//! ```text
//!  PVM frames ──push_primary──▶ ┌────────────┐ ──drain_released──▶ outside world (PVM order)
//!                               │ Comparator │
//!  SVM frames ─push_secondary─▶ └────────────┘ ──checkpoint_wanted──▶ driver / CheckpointPolicy
//! ```
//!
//! What "the same output" means (QEMU's colo-compare semantics, tightened):
//! - **TCP**: per connection (the 5-tuple), on the payload as a byte stream, from each side's own
//!   initial sequence number: different segmentation, a different ISN on the SVM and
//!   retransmissions are not differences; SYN, FIN and RST must agree (see the `tcp` submodule's
//!   docs for the exact rule, including acknowledgments).
//! - **UDP and ICMP**: from the end of the IP header to the end of the IP payload (ports, length,
//!   checksum, payload; not the Ethernet padding). The i-th PVM frame of a flow is paired with the
//!   i-th SVM frame of the same flow. IP fragments likewise, per (addresses, protocol).
//! - **Anything else** (other IP protocols, non-IP frames, frames etherparse rejects): the whole
//!   frame, paired in order.
//! - **ARP, IPv6 neighbour discovery and multicast membership (MLD, IGMP)** from the PVM are
//!   released at once (ahead of held frames); the SVM's are dropped. Membership reports are sent
//!   after random delays, so the VMs' timing differs; they carry no application state.
//!
//! Frames of different flows may interleave differently on the two sides. Released frames keep
//! the PVM's order exactly (a frame waits for every earlier PVM frame), so the outside world sees
//! the PVM's output stream unchanged.
//!
//! Checkpoints: a mismatch, a frame (of either side) waiting longer than
//! [`CompareConfig::timeout`], or `max_queue` frames pending on one side make
//! [`Comparator::checkpoint_wanted`] return a reason; nothing is ever dropped from the PVM. At
//! [`Comparator::begin_checkpoint`] the PVM's held frames are set aside until the secondary confirms
//! the checkpoint ([`Comparator::checkpoint_committed`]): from then on the SVM is a copy of the
//! PVM, which is authoritative. The SVM's held frames are dropped.
//!
//! Cost: one etherparse slice and one hash lookup per frame, frames are moved in and out (never
//! copied) and each byte is compared once. Flow tables are keyed with std's randomly seeded
//! SipHash, because flow keys are chosen by outside parties.

mod classify;
mod store;
mod tcp;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub use crate::policy::CheckpointReason;
use classify::{classify, Class, FlowId, FlowKey};
use store::Store;
use tcp::TcpConn;

/// Datagram flow table size below which empty flows are not swept.
const DATAGRAM_SWEEP_MIN: usize = 1024;

/// Comparator settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareConfig {
    /// A frame waiting longer than this for its counterpart asks for a checkpoint.
    ///
    /// Default 50 ms. The SVM normally emits the same frame within about a millisecond of the
    /// PVM (same inputs, similar speed; the replication link adds its round trip), so 50 ms is far
    /// above normal skew even on a loaded host, yet the delay a silent divergence adds
    /// (timeout + checkpoint pause) stays below Linux's 200 ms minimum TCP retransmission timeout,
    /// so a client never retransmits because of it. QEMU's 3 s default stalls a client for 3 s.
    pub timeout: Duration,
    /// Pending (not yet matched) frames per side in the current epoch at which a checkpoint is
    /// asked for. Frames beyond it are still accepted. Default 4096: about 6 MiB of MTU-sized
    /// frames, some 50 ms of 1 Gbit/s traffic.
    pub max_queue: usize,
    /// A TCP connection with no segment for this long is forgotten at the next checkpoint
    /// (default 120 s, twice Linux's TIME_WAIT). If it resumes, it is picked up mid-stream.
    pub tcp_idle: Duration,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            timeout: Duration::from_millis(50),
            max_queue: 4096,
            tcp_idle: Duration::from_secs(120),
        }
    }
}

/// Counters since the comparator was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompareStats {
    /// Frames pushed by the PVM.
    pub primary_frames: u64,
    /// Frames pushed by the SVM.
    pub secondary_frames: u64,
    /// PVM frames cleared by a matching SVM output.
    pub matched_frames: u64,
    /// TCP payload bytes (plus SYN/FIN) found equal.
    pub tcp_bytes_matched: u64,
    /// Differences found (each asks for a checkpoint).
    pub mismatches: u64,
    /// PVM frames handed out by `drain_released`.
    pub released: u64,
    /// Of those, frames released without comparison (ARP/NDP, or after `stop_comparing`).
    pub passed_through: u64,
    /// Of those, frames released because a checkpoint covering them was committed.
    pub released_by_checkpoint: u64,
    /// SVM frames dropped because they belonged to an older epoch.
    pub svm_stale: u64,
    /// SVM frames dropped unmatched when a checkpoint began or comparison stopped.
    pub svm_dropped: u64,
    /// SVM frames ignored: ARP/NDP, a future epoch, or after `stop_comparing`.
    pub svm_ignored: u64,
    /// Checkpoints begun.
    pub checkpoints: u64,
    /// Largest number of PVM frames held at once.
    pub max_held: usize,
    /// PVM frames held now (pending, set aside, or cleared but not yet drained).
    pub held: usize,
    /// SVM frames waiting now.
    pub svm_waiting: usize,
}

/// FIFO pairing for non-TCP flows: frame ids and compared ranges.
#[derive(Debug, Default)]
struct DatagramFlow {
    pvm: VecDeque<(u64, u32, u32)>,
    svm: VecDeque<(u64, u32, u32)>,
    mismatched: bool,
}

/// Compares the PVM's output with the SVM's; see the module docs.
#[derive(Debug)]
pub struct Comparator {
    cfg: CompareConfig,
    epoch: u64,
    store: Store,
    /// First current-epoch PVM id that may not be cleared yet (for the timeout).
    oldest: u64,
    /// (epoch, end id): PVM frames below `end` set aside until `epoch` is committed.
    barriers: VecDeque<(u64, u64)>,
    /// PVM frames below this id are released regardless of comparison.
    release_below: u64,
    /// ARP/NDP and pass-through frames, released ahead of the queue.
    immediate: Vec<Vec<u8>>,
    tcp: HashMap<FlowKey, TcpConn>,
    datagrams: HashMap<FlowId, DatagramFlow>,
    /// Table size at which empty datagram flows are swept.
    sweep_at: usize,
    mismatch: bool,
    passthrough: bool,
    last_now: Option<Instant>,
    stats: CompareStats,
}

impl Comparator {
    /// A comparator at epoch 0 with nothing held.
    pub fn new(cfg: CompareConfig) -> Self {
        Comparator {
            cfg,
            epoch: 0,
            store: Store::default(),
            oldest: 0,
            barriers: VecDeque::new(),
            release_below: 0,
            immediate: Vec::new(),
            tcp: HashMap::new(),
            datagrams: HashMap::new(),
            sweep_at: DATAGRAM_SWEEP_MIN,
            mismatch: false,
            passthrough: false,
            last_now: None,
            stats: CompareStats::default(),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &CompareConfig {
        &self.cfg
    }

    /// The epoch whose SVM frames are being compared.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// True once [`stop_comparing`](Self::stop_comparing) has been called.
    pub fn is_passthrough(&self) -> bool {
        self.passthrough
    }

    fn note_time(&mut self, now: Instant) {
        self.last_now = Some(self.last_now.map_or(now, |t| t.max(now)));
    }

    /// A frame the PVM emitted (belongs to the current epoch). Always accepted.
    pub fn push_primary(&mut self, now: Instant, frame: Vec<u8>) {
        self.stats.primary_frames += 1;
        self.note_time(now);
        if self.passthrough {
            self.stats.passed_through += 1;
            self.immediate.push(frame);
            return;
        }
        let class = classify(&frame);
        match class {
            Class::Pass => {
                self.stats.passed_through += 1;
                self.immediate.push(frame);
                return;
            }
            Class::Tcp(seg) => {
                let id = self.store.push_pvm(now, frame);
                let conn = self.tcp.entry(seg.key).or_insert_with(|| TcpConn::new(now));
                conn.last_seen = now;
                let p = conn.push(&mut self.store, true, id, &seg);
                self.note_tcp(p);
            }
            Class::Datagram { flow, from, to } => {
                let id = self.store.push_pvm(now, frame);
                self.push_datagram(true, flow, (id, from, to));
            }
        }
        self.stats.max_held = self.stats.max_held.max(self.store.pvm.len());
        self.advance_oldest();
    }

    /// A frame the SVM emitted while running in `epoch`. Frames of an older epoch are dropped
    /// (counted in `svm_stale`); frames of a newer one (a driver bug) are ignored.
    pub fn push_secondary(&mut self, now: Instant, epoch: u64, frame: Vec<u8>) {
        self.stats.secondary_frames += 1;
        self.note_time(now);
        if epoch < self.epoch {
            self.stats.svm_stale += 1;
            return;
        }
        if epoch > self.epoch || self.passthrough {
            self.stats.svm_ignored += 1;
            return;
        }
        match classify(&frame) {
            Class::Pass => self.stats.svm_ignored += 1,
            Class::Tcp(seg) => {
                let id = self.store.push_svm(now, frame);
                let conn = self.tcp.entry(seg.key).or_insert_with(|| TcpConn::new(now));
                conn.last_seen = now;
                let p = conn.push(&mut self.store, false, id, &seg);
                self.note_tcp(p);
            }
            Class::Datagram { flow, from, to } => {
                let id = self.store.push_svm(now, frame);
                self.push_datagram(false, flow, (id, from, to));
            }
        }
        self.advance_oldest();
    }

    fn note_tcp(&mut self, p: tcp::TcpProgress) {
        self.stats.tcp_bytes_matched += p.bytes_matched;
        if p.mismatch {
            self.stats.mismatches += 1;
            self.mismatch = true;
        }
    }

    fn push_datagram(&mut self, primary: bool, flow: FlowId, item: (u64, u32, u32)) {
        if self.datagrams.len() >= self.sweep_at && !self.datagrams.contains_key(&flow) {
            // Empty flows are kept (no allocation per frame) but swept when the table grows.
            self.datagrams
                .retain(|_, f| !(f.pvm.is_empty() && f.svm.is_empty()));
            self.sweep_at = (2 * self.datagrams.len()).max(DATAGRAM_SWEEP_MIN);
        }
        let f = self.datagrams.entry(flow).or_default();
        let (mine, theirs) = if primary {
            (&mut f.pvm, &mut f.svm)
        } else {
            (&mut f.svm, &mut f.pvm)
        };
        let partner = if f.mismatched {
            None
        } else {
            theirs.front().copied()
        };
        let Some(other) = partner else {
            mine.push_back(item);
            return;
        };
        let (p, s) = if primary {
            (item, other)
        } else {
            (other, item)
        };
        let equal = match (
            self.store.pvm_bytes(p.0, p.1, p.2),
            self.store.svm_bytes(s.0, s.1, s.2),
        ) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        if equal {
            theirs.pop_front();
            self.store.clear_pvm(p.0);
            self.store.svm_done(s.0);
        } else {
            mine.push_back(item);
            f.mismatched = true;
            self.mismatch = true;
            self.stats.mismatches += 1;
        }
    }

    /// Moves `oldest` past cleared frames so the timeout looks at the oldest pending one.
    fn advance_oldest(&mut self) {
        let next = self.store.pvm_next();
        let mut id = self
            .oldest
            .max(self.store.pvm_head)
            .max(self.store.epoch_start);
        while id < next {
            let i = (id - self.store.pvm_head) as usize;
            if !self.store.pvm[i].cleared {
                break;
            }
            id += 1;
        }
        self.oldest = id;
    }

    /// Frames now cleared for release to the outside world, in PVM order (ARP/NDP and
    /// pass-through frames first). Appends to `out`.
    pub fn drain_released(&mut self, out: &mut Vec<Vec<u8>>) {
        self.stats.released += self.immediate.len() as u64;
        out.append(&mut self.immediate);
        while let Some(e) = self.store.pvm.front() {
            let id = self.store.pvm_head;
            let by_checkpoint = id < self.release_below;
            if !(self.passthrough || e.cleared || by_checkpoint) {
                break;
            }
            let Some(e) = self.store.pvm.pop_front() else {
                break;
            };
            self.store.pvm_head += 1;
            self.stats.released += 1;
            if !e.cleared {
                if by_checkpoint {
                    self.stats.released_by_checkpoint += 1;
                } else {
                    self.stats.passed_through += 1;
                }
            }
            out.push(e.frame);
        }
    }

    /// Some(reason) when a checkpoint is wanted: a mismatch, a full queue, or a frame held longer
    /// than the timeout (in that order of precedence). Level-triggered until `begin_checkpoint`.
    pub fn checkpoint_wanted(&self, now: Instant) -> Option<CheckpointReason> {
        if self.passthrough {
            return None;
        }
        if self.mismatch {
            return Some(CheckpointReason::Mismatch);
        }
        let full = |n: usize| n > 0 && n >= self.cfg.max_queue;
        if full(self.store.pvm_pending) || full(self.store.svm_pending) {
            return Some(CheckpointReason::QueueFull);
        }
        match self.next_deadline() {
            Some(d) if now >= d => Some(CheckpointReason::HeldTooLong),
            _ => None,
        }
    }

    /// Earliest instant at which `checkpoint_wanted` may become true by timeout (None if no
    /// frame is waiting).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.passthrough {
            return None;
        }
        let pvm = (self.oldest < self.store.pvm_next())
            .then(|| usize::try_from(self.oldest - self.store.pvm_head).ok())
            .flatten()
            .and_then(|i| self.store.pvm.get(i))
            .map(|e| e.at);
        let oldest = match (pvm, self.store.oldest_svm()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        // An unrepresentable deadline is as good as never.
        oldest.checked_add(self.cfg.timeout)
    }

    /// Both VMs paused for the checkpoint moving to `new_epoch`: every PVM frame held now is set
    /// aside until `checkpoint_committed(new_epoch)`; SVM frames held now are dropped; later
    /// pushes are compared in the new epoch. `new_epoch` should exceed [`epoch`](Self::epoch);
    /// the epoch never goes back.
    pub fn begin_checkpoint(&mut self, new_epoch: u64) {
        self.stats.checkpoints += 1;
        self.epoch = self.epoch.max(new_epoch);
        if self.passthrough {
            return;
        }
        let end = self.store.pvm_next();
        if self.barriers.back().is_none_or(|&(_, e)| e < end) && end > self.release_below {
            self.barriers.push_back((new_epoch, end));
        }
        self.store.epoch_start = end;
        self.store.pvm_pending = 0;
        self.oldest = end;
        self.stats.svm_dropped += self.store.drop_svm() as u64;
        self.datagrams.clear();
        let idle = self.cfg.tcp_idle;
        let now = self.last_now;
        self.tcp.retain(|_, c| {
            let stale = now.is_some_and(|n| n.saturating_duration_since(c.last_seen) > idle);
            !stale && c.reset_for_checkpoint()
        });
        self.mismatch = false;
    }

    /// The secondary confirmed it holds checkpoint `epoch` complete: the PVM frames set aside by
    /// `begin_checkpoint(e)` for every `e <= epoch` become releasable.
    pub fn checkpoint_committed(&mut self, epoch: u64) {
        while let Some(&(e, end)) = self.barriers.front() {
            if e > epoch {
                break;
            }
            self.release_below = self.release_below.max(end);
            self.barriers.pop_front();
        }
    }

    /// Secondary lost / failover: release every held PVM frame and pass everything through from
    /// now on.
    pub fn stop_comparing(&mut self) {
        self.passthrough = true;
        self.stats.svm_dropped += self.store.drop_svm() as u64;
        self.tcp.clear();
        self.datagrams.clear();
        self.barriers.clear();
        self.mismatch = false;
    }

    /// Counters.
    pub fn stats(&self) -> CompareStats {
        CompareStats {
            matched_frames: self.store.cleared_total,
            held: self.store.pvm.len(),
            svm_waiting: self.store.svm_pending,
            ..self.stats
        }
    }
}

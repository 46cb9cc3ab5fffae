//! A node's live figures, shared between its loop, the control socket, the metrics endpoint and
//! the demo's live view.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use colo_core::engine::{CheckpointStats, Trigger};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Shared handle on a node's status.
pub type Shared = Arc<Mutex<NodeStatus>>;

/// How many recent checkpoints are kept for percentiles.
const HISTORY: usize = 4096;

/// One checkpoint, as reported by `colo status` and the demo.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointFigures {
    /// Checkpoint number.
    pub epoch: u64,
    /// initial-sync, mismatch, periodic or manual.
    pub trigger: String,
    /// |A|.
    pub dirty_primary: u64,
    /// |B|.
    pub dirty_secondary: u64,
    /// |B − A|.
    pub secondary_only: u64,
    /// |D|.
    pub pages_sent: u64,
    /// Disk blocks copied within the pause (written by the PVM since the last capture, or with
    /// continuous mirroring since the last mirror round: the unsent tail).
    pub disk_blocks: u64,
    /// Disk blocks sent for this checkpoint while the PVM ran (continuous mirroring).
    pub disk_mirrored: u64,
    /// Of which found changed behind the dirty log by a sweep of all memory.
    pub unlogged: u64,
    /// Of which carried because the hypervisor is known to write them (the watch set).
    pub watched: u64,
    /// Bytes on the link.
    pub bytes_sent: u64,
    /// PVM pause, ms.
    pub pause_ms: f64,
    /// Harvest of A, ms.
    pub harvest_ms: f64,
    /// Copy of D and state, ms.
    pub capture_ms: f64,
    /// Waiting for B, ms.
    pub backchannel_ms: f64,
    /// Sending after resume, ms.
    pub send_ms: f64,
    /// Sent → SVM_READY, ms.
    pub commit_ms: f64,
    /// NEW → SVM_READY, ms.
    pub total_ms: f64,
}

impl From<CheckpointStats> for CheckpointFigures {
    fn from(s: CheckpointStats) -> Self {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        Self {
            epoch: s.epoch,
            trigger: match s.trigger {
                Trigger::InitialSync => "initial-sync",
                Trigger::Mismatch => "mismatch",
                Trigger::Periodic => "periodic",
                Trigger::Manual => "manual",
            }
            .into(),
            dirty_primary: s.dirty_primary,
            dirty_secondary: s.dirty_secondary,
            secondary_only: s.secondary_only,
            pages_sent: s.pages_sent,
            disk_blocks: s.disk_blocks,
            disk_mirrored: s.disk_mirrored,
            unlogged: s.unlogged,
            watched: s.watched,
            bytes_sent: s.bytes_sent,
            pause_ms: ms(s.pause),
            harvest_ms: ms(s.harvest),
            capture_ms: ms(s.capture),
            backchannel_ms: ms(s.backchannel),
            send_ms: ms(s.send),
            commit_ms: ms(s.commit),
            total_ms: ms(s.total),
        }
    }
}

/// Everything a node publishes about itself. Read back typed (a field renamed on one side is an
/// error on the other, not a silent zero); see [`StatusReport`] for the wire form.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    /// primary or secondary (a secondary that took over says primary).
    pub role: String,
    /// The state machine's state.
    pub state: String,
    /// The peer's address, while connected.
    pub peer: Option<String>,
    /// The client-facing address.
    pub client_addr: Option<String>,
    /// True while a secondary holds the last checkpoint and outputs are compared.
    pub protected: bool,
    /// Current checkpoint number.
    pub epoch: u64,
    /// Checkpoints committed (excluding the initial synchronisation).
    pub checkpoints: u64,
    /// Of which triggered by an output mismatch (or a held frame, or a full queue).
    pub mismatch_checkpoints: u64,
    /// Of which periodic.
    pub periodic_checkpoints: u64,
    /// Of which manual.
    pub manual_checkpoints: u64,
    /// Checkpoints whose digests matched.
    pub verified_identical: u64,
    /// Checkpoints whose digests differed.
    pub verify_failures: u64,
    /// Checkpoints not compared: a side's memory changed while it was digested (a hypervisor
    /// wrote the paused domain); the pages travel in the next checkpoint.
    pub verify_unsettled: u64,
    /// The guest's disk in 4 KiB blocks (0: none replicated).
    pub disk_blocks: u64,
    /// Disk blocks sent in checkpoints, mirrored ones included (initial synchronisation
    /// excluded).
    pub disk_blocks_sent: u64,
    /// Of which mirrored while the PVM ran (continuous mirroring).
    pub disk_blocks_mirrored: u64,
    /// Checkpoints whose disk digests matched.
    pub disk_verified_identical: u64,
    /// Checkpoints whose disk digests differed.
    pub disk_verify_failures: u64,
    /// Checkpoints whose disks were not compared (a side sent no disk digest).
    pub disk_verify_unsettled: u64,
    /// Pages sent in checkpoints (initial synchronisation excluded).
    pub pages_sent: u64,
    /// Pages sent because the secondary dirtied them (|B|, summed).
    pub backchannel_pages: u64,
    /// Pages a sweep of all memory found changed behind the dirty log (the hypervisor wrote
    /// them) and sent as well, initial synchronisation included.
    pub unlogged_pages: u64,
    /// Pages carried because earlier sweeps found the hypervisor writing them (the watch set),
    /// summed over checkpoints.
    pub watched_pages: u64,
    /// Size of the watch set: pages the hypervisor was found writing behind the dirty log,
    /// re-read at every capture.
    pub watch_set: u64,
    /// Sweeps of all memory for pages written behind the dirty log, so far.
    pub sweeps: u64,
    /// Bytes sent in checkpoints.
    pub bytes_sent: u64,
    /// Link bytes written.
    pub link_bytes_out: u64,
    /// Link bytes read.
    pub link_bytes_in: u64,
    /// TCP connections the link's records travel on (`--streams`; 0: no link).
    #[serde(default)]
    pub link_streams: u64,
    /// Output mismatches seen by the comparator.
    pub mismatches: u64,
    /// The PVM's frames that went to the comparator (the primary, while protected).
    pub frames_compared: u64,
    /// Of those, frames cleared by an equal frame of the SVM.
    pub frames_matched: u64,
    /// Frames the SVM emitted that reached the comparator.
    pub svm_frames: u64,
    /// Client requests injected.
    pub requests: u64,
    /// Frames delivered to clients.
    pub frames_delivered: u64,
    /// Guest workload steps.
    pub guest_steps: u64,
    /// The last checkpoint.
    pub last: Option<CheckpointFigures>,
    /// The arbiter, with `--arbiter`: the serving key's holder, this node's lease.
    pub arbiter: Option<crate::arbiter::ArbiterStatus>,
    /// The node has been protected (a completed handshake and initial synchronisation) at
    /// least once. A primary that says false here never protected its guest: a refused
    /// handshake (another key, guest size, flag) leaves it running alone.
    pub ever_protected: bool,
    /// Connections a secondary refused before the handshake completed (strays, wrong keys).
    pub refused_connections: u64,
    /// Output frames held back because a primary running alone could not be sure of its
    /// arbiter lease (they go out once it is renewed).
    pub output_withheld: u64,
    /// TCP alignment (a secondary, and the primary it becomes): connections whose sequence
    /// offset was learned.
    pub tcp_aligned: u64,
    /// Frames the aligner rewrote: mirrored or client input into the guest's space.
    pub tcp_rewritten_in: u64,
    /// Frames the aligner rewrote: the guest's output into the clients' space (after a
    /// takeover).
    pub tcp_rewritten_out: u64,
    /// Connections the aligner tracks now (awaiting a handshake, open or closed).
    pub tcp_tracked: u64,
    /// Aligner entries evicted because their class was full.
    pub tcp_align_evicted: u64,
    /// Why the peer was declared lost.
    pub failover_reason: Option<String>,
    /// When.
    #[serde(skip)]
    pub failover_at: Option<SystemTime>,
    /// Takeover duration on a secondary, ms.
    pub takeover_ms: Option<f64>,
    /// On a secondary, how long its last checkpoint's apply took (pages, state, disk, digest
    /// when verifying), ms.
    pub last_apply_ms: Option<f64>,
    /// Recent pause times, ms.
    #[serde(skip)]
    pub pauses: VecDeque<f64>,
}

impl NodeStatus {
    /// The TCP aligner's figures.
    pub fn record_align(&mut self, a: &colo_core::Aligner) {
        let s = a.stats();
        self.tcp_aligned = s.aligned;
        self.tcp_rewritten_in = s.rewritten_in;
        self.tcp_rewritten_out = s.rewritten_out;
        self.tcp_align_evicted = s.evicted;
        self.tcp_tracked = a.tracked() as u64;
    }

    /// Adds a committed checkpoint.
    pub fn record_checkpoint(&mut self, s: CheckpointStats) {
        let f = CheckpointFigures::from(s);
        self.unlogged_pages += s.unlogged;
        self.watched_pages += s.watched;
        if s.trigger != Trigger::InitialSync {
            self.checkpoints += 1;
            match s.trigger {
                Trigger::Mismatch => self.mismatch_checkpoints += 1,
                Trigger::Periodic => self.periodic_checkpoints += 1,
                Trigger::Manual => self.manual_checkpoints += 1,
                Trigger::InitialSync => {}
            }
            self.pages_sent += s.pages_sent;
            self.disk_blocks_sent += s.disk_blocks + s.disk_mirrored;
            self.disk_blocks_mirrored += s.disk_mirrored;
            self.backchannel_pages += s.dirty_secondary;
            self.bytes_sent += s.bytes_sent;
            if self.pauses.len() == HISTORY {
                self.pauses.pop_front();
            }
            self.pauses.push_back(f.pause_ms);
        }
        self.last = Some(f);
    }

    /// The p-th percentile (0–100) of recent pause times, ms.
    pub fn pause_percentile(&self, p: f64) -> Option<f64> {
        percentile(self.pauses.iter().copied().collect(), p)
    }
}

/// The p-th percentile (nearest rank) of `v`.
pub fn percentile(mut v: Vec<f64>, p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// A node's status as the control socket, the status file and the demo carry it: the figures
/// plus what is computed from them (pause percentiles, the failover time). `colo status`, the
/// demo and the tests read it back with serde.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// The figures.
    #[serde(flatten)]
    pub node: NodeStatus,
    /// Median of recent pauses, ms.
    pub pause_ms_p50: Option<f64>,
    /// 99th percentile of recent pauses, ms.
    pub pause_ms_p99: Option<f64>,
    /// When the peer was declared lost, ms since the Unix epoch.
    pub failover_at_unix_ms: Option<f64>,
}

impl StatusReport {
    /// The report of `s`.
    pub fn of(s: &NodeStatus) -> Self {
        Self {
            node: s.clone(),
            pause_ms_p50: s.pause_percentile(50.0),
            pause_ms_p99: s.pause_percentile(99.0),
            failover_at_unix_ms: s.failover_at.and_then(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs_f64() * 1e3)
            }),
        }
    }
}

/// The status as JSON ([`StatusReport`]).
pub fn to_json(s: &NodeStatus) -> serde_json::Value {
    serde_json::to_value(StatusReport::of(s)).unwrap_or(serde_json::Value::Null)
}

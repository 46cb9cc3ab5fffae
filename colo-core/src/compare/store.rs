//! The comparator's frame store: every PVM frame held for release and every SVM frame awaiting
//! its counterpart, each in arrival order and named by a monotonically increasing id.
//!
//! Flows refer to frames by id, so a frame's bytes are stored once (moved in, never copied) and
//! found in O(1) (`id - head` indexes the deque).

use std::collections::VecDeque;
use std::time::Instant;

#[derive(Debug)]
pub(crate) struct PvmEntry {
    pub frame: Vec<u8>,
    pub at: Instant,
    /// The SVM's matching output has been seen: releasable once everything before it is.
    pub cleared: bool,
}

#[derive(Debug)]
pub(crate) struct SvmEntry {
    /// Emptied (freed) once the entry is done.
    pub frame: Vec<u8>,
    pub at: Instant,
    /// Matched, or known to need no counterpart.
    pub done: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Store {
    pub pvm: VecDeque<PvmEntry>,
    /// Id of `pvm[0]`.
    pub pvm_head: u64,
    /// First id of the current epoch: older frames are set aside by a checkpoint.
    pub epoch_start: u64,
    /// Current-epoch PVM frames not cleared yet.
    pub pvm_pending: usize,
    pub svm: VecDeque<SvmEntry>,
    /// Id of `svm[0]`.
    pub svm_head: u64,
    /// SVM frames not done yet.
    pub svm_pending: usize,
    /// PVM frames cleared by comparison (statistics).
    pub cleared_total: u64,
}

impl Store {
    /// Id the next PVM frame will get.
    pub fn pvm_next(&self) -> u64 {
        self.pvm_head + self.pvm.len() as u64
    }

    pub fn push_pvm(&mut self, at: Instant, frame: Vec<u8>) -> u64 {
        let id = self.pvm_next();
        self.pvm.push_back(PvmEntry {
            frame,
            at,
            cleared: false,
        });
        self.pvm_pending += 1;
        id
    }

    pub fn push_svm(&mut self, at: Instant, frame: Vec<u8>) -> u64 {
        let id = self.svm_head + self.svm.len() as u64;
        self.svm.push_back(SvmEntry {
            frame,
            at,
            done: false,
        });
        self.svm_pending += 1;
        id
    }

    fn pvm_index(&self, id: u64) -> Option<usize> {
        usize::try_from(id.checked_sub(self.pvm_head)?)
            .ok()
            .filter(|&i| i < self.pvm.len())
    }

    fn svm_index(&self, id: u64) -> Option<usize> {
        usize::try_from(id.checked_sub(self.svm_head)?)
            .ok()
            .filter(|&i| i < self.svm.len())
    }

    /// `frame[from..to]` of PVM frame `id`, if it is still held and the range is inside it.
    pub fn pvm_bytes(&self, id: u64, from: u32, to: u32) -> Option<&[u8]> {
        let e = &self.pvm[self.pvm_index(id)?];
        e.frame.get(from as usize..to as usize)
    }

    /// `frame[from..to]` of SVM frame `id`, if it is still held and the range is inside it.
    pub fn svm_bytes(&self, id: u64, from: u32, to: u32) -> Option<&[u8]> {
        let e = &self.svm[self.svm_index(id)?];
        e.frame.get(from as usize..to as usize)
    }

    /// Marks PVM frame `id` as matched.
    pub fn clear_pvm(&mut self, id: u64) {
        let Some(i) = self.pvm_index(id) else { return };
        let e = &mut self.pvm[i];
        if !e.cleared {
            e.cleared = true;
            self.cleared_total += 1;
            if id >= self.epoch_start {
                self.pvm_pending = self.pvm_pending.saturating_sub(1);
            }
        }
    }

    /// Marks SVM frame `id` as done, frees its bytes and pops finished entries off the front.
    pub fn svm_done(&mut self, id: u64) {
        let Some(i) = self.svm_index(id) else { return };
        let e = &mut self.svm[i];
        if !e.done {
            e.done = true;
            e.frame = Vec::new();
            self.svm_pending = self.svm_pending.saturating_sub(1);
        }
        while self.svm.front().is_some_and(|e| e.done) {
            self.svm.pop_front();
            self.svm_head += 1;
        }
    }

    /// Drops every SVM frame; returns how many were not done.
    pub fn drop_svm(&mut self) -> usize {
        let n = self.svm_pending;
        self.svm_head += self.svm.len() as u64;
        self.svm.clear();
        self.svm_pending = 0;
        n
    }

    /// Arrival time of the oldest SVM frame still waiting.
    pub fn oldest_svm(&self) -> Option<Instant> {
        self.svm.front().map(|e| e.at)
    }
}

//! TCP comparison: one connection's two output byte streams (PVM and SVM) compared by stream
//! offset, so that different segmentation, a different initial sequence number on the SVM and
//! retransmissions do not count as differences.
//!
//! Offsets: each side maps its sequence numbers to stream offsets from its own `base` (the SYN's
//! sequence number; the SYN occupies offset 0 and a FIN the offset after the last data byte, so
//! flags are compared like bytes). `verified` is the offset up to which both streams have been
//! seen and agree. A PVM segment is cleared for release once
//! - every offset it covers is below `verified`,
//! - if it carries an ACK, the SVM has acknowledged at least as much (acknowledgment numbers are
//!   in the peer's sequence space, which both VMs share since they receive the same inputs),
//! - if it is a RST, the SVM has reset the connection too.
//!
//! Bytes below `verified` are never compared again: a retransmission of verified data (or of data
//! a checkpoint made common to both VMs) is cleared without comparison.
//!
//! A connection first seen without a SYN (it existed when comparison started, or its state was
//! evicted) takes one base for both sides from the first segment seen: after a checkpoint the SVM
//! continues the PVM's sequence space, so the two agree.

use std::collections::VecDeque;
use std::time::Instant;

use super::classify::TcpSeg;
use super::store::Store;

/// A segment starting further than this beyond `verified`, or ending further than this before it,
/// is not a plausible part of the stream (TCP's largest window is 2^30 bytes): it counts as a
/// mismatch rather than being taken for new data or for a retransmission.
const MAX_AHEAD: i64 = 1 << 30;

/// `a >= b` in sequence-number space.
fn seq_ge(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

/// Part of one side's stream not yet verified, pointing into a held frame.
#[derive(Debug, Clone, Copy)]
struct Seg {
    id: u64,
    start: u64,
    syn: bool,
    /// Offset of the (remaining) payload in the frame.
    off: u32,
    len: u32,
    fin: bool,
}

impl Seg {
    fn end(&self) -> u64 {
        self.start + u64::from(self.syn) + u64::from(self.len) + u64::from(self.fin)
    }
}

#[derive(Debug, Default)]
struct Side {
    base: Option<u32>,
    /// Highest stream offset this side has sent up to (exclusive).
    high: u64,
    max_ack: Option<u32>,
    rst: bool,
    /// Unverified segments, sorted by `start`.
    segs: VecDeque<Seg>,
}

/// A PVM segment not yet cleared, in push order.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    id: u64,
    /// `verified` must reach this.
    need: u64,
    ack: Option<u32>,
    rst: bool,
}

enum Piece<'a> {
    Syn,
    Data(&'a [u8]),
    Fin,
}

fn piece_at<'a>(seg: &Seg, bytes: Option<&'a [u8]>, at: u64) -> Option<Piece<'a>> {
    let mut pos = seg.start;
    if seg.syn {
        if at == pos {
            return Some(Piece::Syn);
        }
        pos += 1;
    }
    let data_end = pos + u64::from(seg.len);
    if at >= pos && at < data_end {
        let skip = usize::try_from(at - pos).ok()?;
        let data = bytes?.get(skip..)?;
        return (!data.is_empty()).then_some(Piece::Data(data));
    }
    (seg.fin && at == data_end).then_some(Piece::Fin)
}

/// One TCP connection (one direction: the VMs' output) under comparison.
#[derive(Debug)]
pub(crate) struct TcpConn {
    pvm: Side,
    svm: Side,
    verified: u64,
    waiting: VecDeque<Waiter>,
    /// SVM RST frames, held until the PVM resets the connection too.
    svm_rst: Vec<u64>,
    mismatched: bool,
    pub last_seen: Instant,
}

/// What one push found.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct TcpProgress {
    pub mismatch: bool,
    pub bytes_matched: u64,
}

impl TcpConn {
    pub fn new(now: Instant) -> Self {
        TcpConn {
            pvm: Side::default(),
            svm: Side::default(),
            verified: 0,
            waiting: VecDeque::new(),
            svm_rst: Vec::new(),
            mismatched: false,
            last_seen: now,
        }
    }

    /// Adds frame `id` (already in `store`) holding segment `seg` from the PVM (`primary`) or the SVM.
    pub fn push(&mut self, store: &mut Store, primary: bool, id: u64, seg: &TcpSeg) -> TcpProgress {
        let mut progress = TcpProgress::default();
        if self.pvm.base.is_none() && self.svm.base.is_none() && !seg.syn {
            let base = seg.seq.wrapping_sub(1);
            self.pvm.base = Some(base);
            self.svm.base = Some(base);
            self.verified = self.verified.max(1);
        }
        let v = self.verified;
        let vi = i64::try_from(v).unwrap_or(i64::MAX);
        let side = if primary {
            &mut self.pvm
        } else {
            &mut self.svm
        };
        let base = *side.base.get_or_insert(if seg.syn {
            seg.seq
        } else {
            seg.seq.wrapping_sub(1)
        });
        let delta = i64::from(seg.seq.wrapping_sub(base).wrapping_sub(v as u32) as i32);
        let start_i = vi.saturating_add(delta);
        let body = if seg.rst {
            0
        } else {
            i64::from(seg.len) + i64::from(seg.syn) + i64::from(seg.fin)
        };
        let end_i = start_i + body;
        if let Some(a) = seg.ack {
            side.max_ack = Some(match side.max_ack {
                Some(m) if seq_ge(m, a) => m,
                _ => a,
            });
        }
        if start_i > vi.saturating_add(MAX_AHEAD) || end_i < vi.saturating_sub(MAX_AHEAD) {
            // Not a plausible part of this stream: never cleared by comparison (a checkpoint
            // sets it aside), never counted into `high`.
            if primary {
                self.waiting.push_back(Waiter {
                    id,
                    need: u64::MAX,
                    ack: None,
                    rst: false,
                });
            }
            self.mismatched = true;
            progress.mismatch = true;
            return progress;
        }
        let start_u = u64::try_from(start_i.max(0)).unwrap_or(0);
        let end_u = u64::try_from(end_i.max(0)).unwrap_or(0);
        if seg.rst {
            side.rst = true;
            if primary {
                self.waiting.push_back(Waiter {
                    id,
                    need: start_u,
                    ack: seg.ack,
                    rst: true,
                });
            } else {
                self.svm_rst.push(id);
            }
        } else {
            side.high = side.high.max(end_u);
            if body > 0 && end_i > vi {
                let mut s = Seg {
                    id,
                    start: start_u,
                    syn: seg.syn,
                    off: seg.off,
                    len: seg.len,
                    fin: seg.fin,
                };
                if start_i < vi {
                    // Trim what is already verified; what remains starts at `v`.
                    let mut cut = vi - start_i;
                    if s.syn {
                        s.syn = false;
                        cut -= 1;
                    }
                    let data_cut = u32::try_from(cut.clamp(0, i64::from(s.len))).unwrap_or(0);
                    s.off += data_cut;
                    s.len -= data_cut;
                    s.start = v;
                }
                let mut i = side.segs.len();
                while i > 0 && side.segs[i - 1].start > s.start {
                    i -= 1;
                }
                side.segs.insert(i, s);
            } else if !primary {
                store.svm_done(id);
            }
            if primary {
                let need = if body > 0 { end_u } else { 0 };
                self.waiting.push_back(Waiter {
                    id,
                    need,
                    ack: seg.ack,
                    rst: false,
                });
            }
        }
        progress.mismatch = self.advance(store, &mut progress.bytes_matched);
        self.settle(store);
        progress
    }

    /// Compares both streams as far as both have been seen. Returns true on a new mismatch.
    fn advance(&mut self, store: &mut Store, bytes_matched: &mut u64) -> bool {
        if self.mismatched {
            return false;
        }
        loop {
            let v = self.verified;
            while self.pvm.segs.front().is_some_and(|s| s.end() <= v) {
                self.pvm.segs.pop_front();
            }
            while let Some(s) = self.svm.segs.front().filter(|s| s.end() <= v) {
                let id = s.id;
                self.svm.segs.pop_front();
                store.svm_done(id);
            }
            let (Some(p), Some(s)) = (self.pvm.segs.front(), self.svm.segs.front()) else {
                return false;
            };
            if p.start > v || s.start > v {
                return false;
            }
            let pb = store.pvm_bytes(p.id, p.off, p.off.saturating_add(p.len));
            let sb = store.svm_bytes(s.id, s.off, s.off.saturating_add(s.len));
            let step = match (piece_at(p, pb, v), piece_at(s, sb, v)) {
                (Some(Piece::Syn), Some(Piece::Syn)) | (Some(Piece::Fin), Some(Piece::Fin)) => {
                    Some(1)
                }
                (Some(Piece::Data(a)), Some(Piece::Data(b))) => {
                    let n = a.len().min(b.len());
                    (a[..n] == b[..n]).then_some(n as u64)
                }
                _ => None,
            };
            match step {
                Some(n) if n > 0 => {
                    self.verified += n;
                    *bytes_matched += n;
                }
                _ => {
                    self.mismatched = true;
                    return true;
                }
            }
        }
    }

    /// Clears the PVM frames whose conditions now hold, in push order.
    fn settle(&mut self, store: &mut Store) {
        while let Some(w) = self.waiting.front() {
            if w.need > self.verified {
                break;
            }
            if let Some(a) = w.ack {
                if !self.svm.max_ack.is_some_and(|m| seq_ge(m, a)) {
                    break;
                }
            }
            if w.rst && !self.svm.rst {
                break;
            }
            store.clear_pvm(w.id);
            self.waiting.pop_front();
        }
        if self.pvm.rst {
            for id in self.svm_rst.drain(..) {
                store.svm_done(id);
            }
        }
    }

    /// A checkpoint makes the SVM a copy of the PVM: the SVM's side of the stream becomes the
    /// PVM's, everything the PVM sent so far counts as verified and nothing is pending.
    /// Returns false if the connection should be forgotten (the PVM never sent on it).
    pub fn reset_for_checkpoint(&mut self) -> bool {
        let Some(base) = self.pvm.base else {
            return false;
        };
        self.pvm.segs.clear();
        self.verified = self.verified.max(self.pvm.high);
        self.svm = Side {
            base: Some(base),
            high: self.pvm.high,
            max_ack: self.pvm.max_ack,
            rst: self.pvm.rst,
            segs: VecDeque::new(),
        };
        self.waiting.clear();
        self.svm_rst.clear();
        self.mismatched = false;
        true
    }
}

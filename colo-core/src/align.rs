//! TCP alignment on the secondary (what QEMU's filter-rewriter does): the SVM picks its own
//! initial sequence numbers, so a connection opened since the last checkpoint has two sequence
//! spaces, the PVM's (which clients see) and the SVM's. [`Aligner`] keeps each such connection's
//! offset and rewrites the frames that cross between the spaces, fixing the TCP checksum
//! incrementally (RFC 1624). Sans-IO: it is handed Ethernet frames and rewrites them in place.
//!
//! # What is rewritten
//!
//! `off = SVM's ISN − PVM's ISN` (mod 2^32), and likewise for the TCP timestamp clocks when
//! both ends use timestamps (RFC 7323; the SVM's clock offset differs from the PVM's too).
//!
//! - **Input** (client → guest, [`Aligner::input`]): the acknowledgement number `+ off`, every
//!   SACK block's edges `+ off` (they acknowledge the guest's sequence numbers), the timestamp
//!   echo (TSecr) `+ ts_off`. Sequence numbers, TSval and window are the client's, untouched.
//! - **Output** (guest → client, [`Aligner::output`]): the sequence number `− off` and TSval
//!   `− ts_off`; the acknowledgement number and SACK blocks are the client's space, untouched.
//!   Output is rewritten only once the aligner is [`serving`](Aligner::take_over): while the
//!   pair runs, the SVM's output goes to the primary's comparator, which compares each side's
//!   stream from that side's own SYN (`compare/tcp.rs`), so it needs the SVM's own numbers —
//!   the SVM's SYN-ACK leaves before the offset can be known (the client's ACK that teaches it
//!   comes only after the PVM's SYN-ACK was released, which needs the SVM's SYN-ACK first), and
//!   rewriting the segments after it would split the SVM's stream across two spaces. Output is
//!   still observed then: it is where SYNs, SYN-ACKs, FINs and RSTs of the guest are learned.
//!
//! Everything else — non-TCP frames (the mock's kv service over UDP), IP fragments, frames that
//! do not parse (truncated, bad lengths, unknown extension headers) and TCP segments of
//! connections without an offset — passes unchanged. Nothing panics on any input.
//!
//! # Lifecycle of a connection
//!
//! Keys are (guest address, guest port, peer address, peer port), IPv4 or IPv6.
//!
//! ```text
//!   guest's SYN-ACK (output, ISN s)             guest's SYN (output, ISN s)
//!             │                                          │
//!             ▼                                          ▼
//!     AwaitingAck { isn, tsval }              AwaitingSynAck { isn, tsval }
//!             │ peer's ACK (input): it acks               │ peer's SYN-ACK or RST+ACK
//!             │ the PVM's ISN p + 1                       │ (input): acks p + 1
//!             └──────────────┬────────────────────────────┘
//!                            ▼        off = s + 1 − ack; ts_off = tsval − TSecr
//!          (off = 0 and ts_off = 0: forgotten, nothing to rewrite)
//!     AwaitingClose { off, fin_in, fin_out }  ── rewrites both ways
//!                            │ FIN seen both ways, or RST either way
//!                            ▼
//!     AwaitingReuse { off }  ── still rewrites (retransmitted FINs, TIME_WAIT's ACKs)
//!                            │ a new SYN on the same key (the entry starts over),
//!                            ▼ or evicted (see below)
//!                        forgotten
//! ```
//!
//! Before the offset is known, the guest's RST or the peer's RST without ACK forgets the entry;
//! the peer's RST+ACK teaches the offset (so that the SVM, whose SYN it refuses, accepts it)
//! and closes. A peer's retransmitted SYN leaves an awaiting entry alone; a guest's
//! retransmitted SYN or SYN-ACK updates its ISN. A peer's SYN on an open connection (a stray
//! duplicate) passes unchanged and changes nothing; on a closed one it starts a new connection.
//! Sequence arithmetic is mod 2^32 throughout, so wraparound needs no case of its own.
//!
//! # Checkpoints and takeover
//!
//! [`Aligner::checkpoint`] forgets every entry. The secondary calls it when a checkpoint has
//! been applied to the SVM — its pages and vCPU state written, the old epoch's SVM output
//! drained and discarded — and before the SVM resumes: from then on the SVM is a copy of the
//! PVM, so its sequence space *is* the PVM's and no offset remains. Inputs are rewritten when
//! they are injected into the SVM (not when they arrive), so a mirrored input that waited in
//! the queue across the checkpoint is rewritten with the new (empty) table.
//!
//! [`Aligner::take_over`] keeps every entry: the survivor's guest goes on talking, in its own
//! sequence space, to clients that know the PVM's. From then on the survivor rewrites the
//! clients' frames with [`Aligner::input`] before they reach the guest (and before they are
//! mirrored, if it protects itself again: its new secondary's SVM starts as a copy of this
//! guest, in this guest's space) and the guest's frames with [`Aligner::output`] when they are
//! released to the clients (after comparison). Entries still awaiting the handshake keep
//! learning (a client's ACK of the PVM's SYN-ACK still teaches the offset); connections the
//! survivor's guest opens later learn an offset of zero and are forgotten at once. No
//! checkpoint makes the survivor's entries obsolete: they end with their connections.
//!
//! # Bounds
//!
//! Keys are chosen by outsiders, so the table is a hash map with a randomly seeded hasher
//! (std's `RandomState`, SipHash) and three capped classes, each evicted oldest first: entries
//! awaiting a handshake ([`AlignConfig::max_awaiting`]), open connections
//! ([`AlignConfig::max_open`], by when their offset was learned) and closed ones
//! ([`AlignConfig::max_closed`]). A SYN flood therefore evicts only other half-open entries,
//! never an aligned connection. An evicted connection's next input reaches the SVM unaligned,
//! the SVM answers differently from the PVM, and the comparator asks for a checkpoint — which
//! is what every new connection costs without alignment, and which makes the SVM a copy of
//! the PVM again. All memory is reserved by [`Aligner::new`]: a frame allocates nothing.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// Caps of the connection table (see the module docs, `# Bounds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlignConfig {
    /// Connections whose handshake has not completed (SYN or SYN-ACK seen from the guest).
    pub max_awaiting: usize,
    /// Connections with an offset, open.
    pub max_open: usize,
    /// Connections with an offset, closed (FIN both ways or RST), kept for retransmissions.
    pub max_closed: usize,
}

impl Default for AlignConfig {
    fn default() -> Self {
        AlignConfig {
            max_awaiting: 1024,
            max_open: 8192,
            max_closed: 1024,
        }
    }
}

/// What the aligner did so far (cumulative).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AlignStats {
    /// Connections whose offset was learned (non-zero: they needed rewriting).
    pub aligned: u64,
    /// Input frames rewritten (client → guest).
    pub rewritten_in: u64,
    /// Output frames rewritten (guest → client; only once serving).
    pub rewritten_out: u64,
    /// Entries evicted because their class was full.
    pub evicted: u64,
    /// Entries dropped by checkpoints.
    pub dropped_at_checkpoint: u64,
}

/// Sequence and timestamp offsets of one connection: the SVM's value minus the PVM's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Offsets {
    seq: u32,
    /// None: timestamps not in use on this connection (or not learnable).
    ts: Option<u32>,
}

impl Offsets {
    fn is_zero(&self) -> bool {
        self.seq == 0 && self.ts.unwrap_or(0) == 0
    }
}

/// One connection's state, named for what it awaits (the project's rule for protocol states,
/// hence the shared prefix).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// The guest answered the peer's SYN with ISN `isn`; awaits the peer's handshake ACK.
    AwaitingAck { isn: u32, tsval: Option<u32> },
    /// The guest opened the connection with ISN `isn`; awaits the peer's SYN-ACK.
    AwaitingSynAck { isn: u32, tsval: Option<u32> },
    /// Offsets known; awaits the end of the connection (FIN both ways, or RST).
    AwaitingClose {
        off: Offsets,
        fin_in: bool,
        fin_out: bool,
    },
    /// Closed; still rewrites retransmissions; awaits a new SYN on the key or eviction.
    AwaitingReuse { off: Offsets },
}

/// The capped classes of entries, one FIFO each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Awaiting = 0,
    Open = 1,
    Closed = 2,
}

impl ConnState {
    /// A connection closing, one segment on: both FINs seen (`fin_in` from the peer, `fin_out`
    /// from the guest), or a RST, end it; its offsets wait for the key's reuse.
    fn close_step(off: Offsets, fin_in: bool, fin_out: bool, rst: bool) -> Self {
        if rst || (fin_in && fin_out) {
            Self::AwaitingReuse { off }
        } else {
            Self::AwaitingClose {
                off,
                fin_in,
                fin_out,
            }
        }
    }

    fn class(&self) -> Class {
        match self {
            ConnState::AwaitingAck { .. } | ConnState::AwaitingSynAck { .. } => Class::Awaiting,
            ConnState::AwaitingClose { .. } => Class::Open,
            ConnState::AwaitingReuse { .. } => Class::Closed,
        }
    }

    fn offsets(&self) -> Option<Offsets> {
        match *self {
            ConnState::AwaitingClose { off, .. } | ConnState::AwaitingReuse { off } => Some(off),
            _ => None,
        }
    }
}

/// A connection seen from the guest: (guest address, peer address, guest port, peer port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConnKey {
    v6: bool,
    guest: [u8; 16],
    peer: [u8; 16],
    gport: u16,
    pport: u16,
}

impl Hash for ConnKey {
    /// One `write` of the key's bytes (13 for IPv4, 37 for IPv6): a third of the cost of
    /// hashing the fields one by one.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 37];
        b[0] = u8::from(self.v6);
        b[1..3].copy_from_slice(&self.gport.to_be_bytes());
        b[3..5].copy_from_slice(&self.pport.to_be_bytes());
        let n = if self.v6 {
            b[5..21].copy_from_slice(&self.guest);
            b[21..37].copy_from_slice(&self.peer);
            37
        } else {
            b[5..9].copy_from_slice(&self.guest[..4]);
            b[9..13].copy_from_slice(&self.peer[..4]);
            13
        };
        state.write(&b[..n]);
    }
}

#[derive(Debug, Clone, Copy)]
struct Conn {
    /// Distinguishes this entry from an earlier one on the same key in the eviction FIFOs.
    gen: u64,
    state: ConnState,
}

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const FIN: u8 = 0x01;
const ACK: u8 = 0x10;

const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;
const OPT_TIMESTAMP: u8 = 8;

/// A parsed TCP segment: where its header lies in the frame and the fields the aligner reads.
#[derive(Debug, Clone, Copy)]
struct Seg {
    key: ConnKey,
    /// Offset of the TCP header in the frame.
    at: usize,
    /// TCP header length (20..=60, within the frame).
    hlen: usize,
    flags: u8,
    seq: u32,
    ack: u32,
    /// (TSval, TSecr) if the segment carries a timestamp option.
    ts: Option<(u32, u32)>,
}

impl Seg {
    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

/// Offset of `sub` inside `frame`, if `sub` lies inside it.
fn offset_in(frame: &[u8], sub: &[u8]) -> Option<usize> {
    let start = (sub.as_ptr() as usize).checked_sub(frame.as_ptr() as usize)?;
    (start.checked_add(sub.len())? <= frame.len()).then_some(start)
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_be_bytes)
}

/// Walks the options in `opts` (the bytes after the 20-byte header), calling `f(kind, offset of
/// the option's data in opts, data length)` for each well-formed option; stops at END or at the
/// first malformed length.
fn walk_options(opts: &[u8], mut f: impl FnMut(u8, usize, usize)) {
    let mut i = 0;
    while let Some(&kind) = opts.get(i) {
        match kind {
            OPT_END => return,
            OPT_NOP => i += 1,
            _ => {
                let Some(&len) = opts.get(i + 1) else { return };
                let len = usize::from(len);
                if len < 2 || i + len > opts.len() {
                    return;
                }
                f(kind, i + 2, len - 2);
                i += len;
            }
        }
    }
}

/// Parses `frame` as Ethernet → IPv4/IPv6 → TCP; `output`: the guest is the source. None for
/// anything else (non-TCP, fragments, malformed).
fn parse(frame: &[u8], output: bool) -> Option<Seg> {
    let pkt = SlicedPacket::from_ethernet(frame).ok()?;
    let (v6, src, dst, fragmented) = match pkt.net.as_ref()? {
        NetSlice::Ipv4(s) => {
            let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
            a[..4].copy_from_slice(&s.header().source());
            b[..4].copy_from_slice(&s.header().destination());
            (false, a, b, s.payload().fragmented)
        }
        NetSlice::Ipv6(s) => (
            true,
            s.header().source(),
            s.header().destination(),
            s.payload().fragmented,
        ),
    };
    if fragmented {
        return None;
    }
    let Some(TransportSlice::Tcp(t)) = pkt.transport.as_ref() else {
        return None;
    };
    let at = offset_in(frame, t.slice())?;
    let hlen = usize::from(t.data_offset()) * 4;
    if hlen < 20 || at + hlen > frame.len() {
        return None;
    }
    let (sport, dport) = (t.source_port(), t.destination_port());
    let key = if output {
        ConnKey {
            v6,
            guest: src,
            peer: dst,
            gport: sport,
            pport: dport,
        }
    } else {
        ConnKey {
            v6,
            guest: dst,
            peer: src,
            gport: dport,
            pport: sport,
        }
    };
    let mut ts = None;
    walk_options(t.options(), |kind, data, len| {
        if kind == OPT_TIMESTAMP && len == 8 {
            let o = t.options();
            ts = Some((be32(o, data), be32(o, data + 4)));
        }
    });
    Some(Seg {
        key,
        at,
        hlen,
        flags: *frame.get(at + 13)?,
        seq: t.sequence_number(),
        ack: t.acknowledgment_number(),
        ts,
    })
}

/// Accumulates the RFC 1624 checksum change of rewritten 32-bit fields of one TCP header.
struct Patch<'a> {
    frame: &'a mut [u8],
    /// Offset of the TCP header (checksum words are aligned to it).
    at: usize,
    /// One's-complement sum of (~old word + new word) over every changed word.
    sum: u32,
    /// A field changed.
    changed: bool,
}

impl Patch<'_> {
    /// The 16-bit words (aligned to the TCP header) covering `[pos, pos + 4)`.
    fn words(&self, pos: usize) -> (usize, usize) {
        let first = self.at + ((pos - self.at) & !1);
        let end = pos + 4;
        let last = self.at + ((end - self.at + 1) & !1);
        (first, last)
    }

    /// Sum of the words in `[from, to)` (`to - from` even, within the frame).
    fn sum_words(&self, from: usize, to: usize) -> u32 {
        self.frame
            .get(from..to)
            .unwrap_or(&[])
            .chunks_exact(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum()
    }

    /// Adds `delta` (mod 2^32) to the big-endian field at `pos`.
    fn add(&mut self, pos: usize, delta: u32) {
        if delta == 0 || pos + 4 > self.frame.len() {
            return;
        }
        let (first, last) = self.words(pos);
        if last > self.frame.len() {
            return;
        }
        let old = self.sum_words(first, last);
        let v = be32(self.frame, pos).wrapping_add(delta);
        self.frame[pos..pos + 4].copy_from_slice(&v.to_be_bytes());
        let new = self.sum_words(first, last);
        self.changed = true;
        // ~old as a one's-complement sum of the same number of words: (0xffff * n) - old.
        let n = u32::try_from((last - first) / 2).unwrap_or(0);
        self.sum += 0xffff * n - old + new;
        self.fold();
    }

    fn fold(&mut self) {
        while self.sum > 0xffff {
            self.sum = (self.sum & 0xffff) + (self.sum >> 16);
        }
    }

    /// Writes the checksum: HC' = ~(~HC + Σ(~m + m')) (RFC 1624, eqn. 3). Returns whether
    /// the frame changed.
    fn finish(mut self) -> bool {
        if !self.changed {
            return false;
        }
        let Some(ck) = self.frame.get_mut(self.at + 16..self.at + 18) else {
            return true;
        };
        let hc = u16::from_be_bytes([ck[0], ck[1]]);
        self.sum += u32::from(!hc);
        while self.sum > 0xffff {
            self.sum = (self.sum & 0xffff) + (self.sum >> 16);
        }
        let v = !(u16::try_from(self.sum).unwrap_or(0xffff));
        ck.copy_from_slice(&v.to_be_bytes());
        true
    }
}

/// Rewrites `seg` in `frame` as input (client → guest) with `off`.
fn rewrite_input(frame: &mut [u8], seg: &Seg, off: Offsets) -> bool {
    if !seg.has(ACK) {
        // No acknowledgement (a bare SYN, an RST without ACK): nothing in the guest's space.
        return false;
    }
    let at = seg.at;
    let mut p = Patch {
        frame,
        at,
        sum: 0,
        changed: false,
    };
    p.add(at + 8, off.seq);
    let opts = at + 20;
    let end = at + seg.hlen;
    // (position, delta, whether a zero value is left alone) of each option field to rewrite.
    let mut fields = [(0usize, 0u32, false); 9];
    let mut n = 0;
    if let Some(o) = p.frame.get(opts..end) {
        walk_options(o, |kind, data, len| match kind {
            OPT_SACK if len % 8 == 0 => {
                for k in 0..len / 4 {
                    if n < fields.len() {
                        fields[n] = (opts + data + 4 * k, off.seq, false);
                        n += 1;
                    }
                }
            }
            OPT_TIMESTAMP if len == 8 => {
                if let (Some(d), true) = (off.ts, n < fields.len()) {
                    // A zero echo means "nothing to echo" (RFC 7323): left alone.
                    fields[n] = (opts + data + 4, d, true);
                    n += 1;
                }
            }
            _ => {}
        });
    }
    for &(pos, d, keep_zero) in &fields[..n] {
        if !(keep_zero && be32(p.frame, pos) == 0) {
            p.add(pos, d);
        }
    }
    p.finish()
}

/// Rewrites `seg` in `frame` as output (guest → client) with `off`.
fn rewrite_output(frame: &mut [u8], seg: &Seg, off: Offsets) -> bool {
    let at = seg.at;
    let mut p = Patch {
        frame,
        at,
        sum: 0,
        changed: false,
    };
    p.add(at + 4, off.seq.wrapping_neg());
    if let Some(d) = off.ts {
        let opts = at + 20;
        let end = at + seg.hlen;
        let mut tsval = None;
        if let Some(o) = p.frame.get(opts..end) {
            walk_options(o, |kind, data, len| {
                if kind == OPT_TIMESTAMP && len == 8 {
                    tsval = Some(opts + data);
                }
            });
        }
        if let Some(pos) = tsval {
            p.add(pos, d.wrapping_neg());
        }
    }
    p.finish()
}

/// The per-connection TCP offsets of the secondary (see the module docs).
#[derive(Debug)]
pub struct Aligner {
    cfg: AlignConfig,
    conns: HashMap<ConnKey, Conn, RandomState>,
    /// One FIFO per [`Class`]: (key, gen) in the order entries joined the class.
    fifos: [VecDeque<(ConnKey, u64)>; 3],
    next_gen: u64,
    serving: bool,
    stats: AlignStats,
}

impl Aligner {
    /// An empty table with every byte it will ever use reserved.
    pub fn new(cfg: AlignConfig) -> Self {
        let cfg = AlignConfig {
            max_awaiting: cfg.max_awaiting.max(1),
            max_open: cfg.max_open.max(1),
            max_closed: cfg.max_closed.max(1),
        };
        let total = cfg.max_awaiting + cfg.max_open + cfg.max_closed;
        Aligner {
            cfg,
            // Twice the entries: with at most half its capacity in use, the map reclaims
            // deleted slots in place instead of growing.
            conns: HashMap::with_capacity_and_hasher(2 * total, RandomState::new()),
            fifos: [
                VecDeque::with_capacity(cfg.max_awaiting),
                VecDeque::with_capacity(cfg.max_open),
                VecDeque::with_capacity(cfg.max_closed),
            ],
            next_gen: 0,
            serving: false,
            stats: AlignStats::default(),
        }
    }

    /// The caps in force.
    pub fn config(&self) -> &AlignConfig {
        &self.cfg
    }

    /// Figures so far.
    pub fn stats(&self) -> AlignStats {
        self.stats
    }

    /// Connections tracked now (awaiting, open and closed).
    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    /// Whether output is rewritten (after [`take_over`](Self::take_over)).
    pub fn serving(&self) -> bool {
        self.serving
    }

    /// A checkpoint was applied to the SVM: every offset is obsolete (see the module docs).
    pub fn checkpoint(&mut self) {
        self.stats.dropped_at_checkpoint += self.conns.len() as u64;
        self.conns.clear();
        for f in &mut self.fifos {
            f.clear();
        }
    }

    /// The secondary took over: offsets are kept, and from now on output is rewritten too.
    pub fn take_over(&mut self) {
        self.serving = true;
    }

    /// A frame from a client to the guest (mirrored input on the secondary, a client's frame
    /// on a survivor), rewritten in place into the guest's sequence space. Returns whether it
    /// changed.
    pub fn input(&mut self, frame: &mut [u8]) -> bool {
        let Some(seg) = parse(frame, false) else {
            return false;
        };
        let Some(slot) = self.conns.get_mut(&seg.key) else {
            return false;
        };
        let conn = *slot;
        let syn_only = seg.has(SYN) && !seg.has(ACK);
        let state = match conn.state {
            ConnState::AwaitingAck { isn, tsval } | ConnState::AwaitingSynAck { isn, tsval } => {
                let synack = matches!(conn.state, ConnState::AwaitingSynAck { .. });
                // The segment that teaches the offset: the handshake's ACK (the guest answered
                // the SYN) or the peer's SYN-ACK / RST+ACK (the guest opened the connection).
                let teaches = seg.has(ACK) && (seg.has(SYN) == synack || seg.has(RST));
                if !teaches {
                    if seg.has(RST) {
                        self.conns.remove(&seg.key);
                    }
                    return false;
                }
                let off = Offsets {
                    seq: isn.wrapping_add(1).wrapping_sub(seg.ack),
                    ts: match (tsval, seg.ts) {
                        (Some(v), Some((_, ecr))) if ecr != 0 => Some(v.wrapping_sub(ecr)),
                        _ => None,
                    },
                };
                if off.is_zero() {
                    self.conns.remove(&seg.key);
                    return false;
                }
                self.stats.aligned += 1;
                let open = ConnState::AwaitingClose {
                    off,
                    fin_in: seg.has(FIN),
                    fin_out: false,
                };
                if seg.has(RST) {
                    ConnState::AwaitingReuse { off }
                } else {
                    open
                }
            }
            ConnState::AwaitingReuse { .. } if syn_only => {
                // The peer opens a new connection on this key: the old offsets are void.
                self.conns.remove(&seg.key);
                return false;
            }
            ConnState::AwaitingClose {
                off,
                fin_in,
                fin_out,
            } => ConnState::close_step(off, fin_in || seg.has(FIN), fin_out, seg.has(RST)),
            s @ ConnState::AwaitingReuse { .. } => s,
        };
        slot.state = state;
        if state.class() != conn.state.class() {
            self.enlist(state.class(), seg.key, conn.gen);
        }
        let Some(off) = state.offsets() else {
            return false;
        };
        let changed = rewrite_input(frame, &seg, off);
        self.stats.rewritten_in += u64::from(changed);
        changed
    }

    /// A frame from the guest toward a client: observed (SYN, SYN-ACK, FIN, RST), and once
    /// [`serving`](Self::serving) rewritten in place into the PVM's sequence space. Returns
    /// whether it changed.
    pub fn output(&mut self, frame: &mut [u8]) -> bool {
        let Some(seg) = parse(frame, true) else {
            return false;
        };
        let opens = seg.has(SYN) && !seg.has(RST);
        let awaiting = || {
            let tsval = seg.ts.map(|(v, _)| v);
            if seg.has(ACK) {
                ConnState::AwaitingAck {
                    isn: seg.seq,
                    tsval,
                }
            } else {
                ConnState::AwaitingSynAck {
                    isn: seg.seq,
                    tsval,
                }
            }
        };
        let Some(slot) = self.conns.get_mut(&seg.key) else {
            if opens {
                self.insert(seg.key, awaiting());
            }
            return false;
        };
        let conn = *slot;
        let state = match conn.state {
            ConnState::AwaitingAck { .. } | ConnState::AwaitingSynAck { .. } => {
                if opens {
                    // A retransmission, or a new ISN: the latest SYN is the one answered.
                    slot.state = awaiting();
                } else if seg.has(RST) {
                    self.conns.remove(&seg.key);
                }
                return false;
            }
            ConnState::AwaitingReuse { .. } if opens && !seg.has(ACK) => {
                // The guest opens a new connection on this key.
                self.conns.remove(&seg.key);
                self.insert(seg.key, awaiting());
                return false;
            }
            ConnState::AwaitingClose {
                off,
                fin_in,
                fin_out,
            } => ConnState::close_step(off, fin_in, fin_out || seg.has(FIN), seg.has(RST)),
            s @ ConnState::AwaitingReuse { .. } => s,
        };
        slot.state = state;
        if state.class() != conn.state.class() {
            self.enlist(state.class(), seg.key, conn.gen);
        }
        let Some(off) = state.offsets().filter(|_| self.serving) else {
            return false;
        };
        let changed = rewrite_output(frame, &seg, off);
        self.stats.rewritten_out += u64::from(changed);
        changed
    }

    /// A new entry (a fresh generation) at `key`.
    fn insert(&mut self, key: ConnKey, state: ConnState) {
        let gen = self.next_gen;
        self.next_gen += 1;
        // Enlist first: an eviction must never take the entry being inserted.
        self.enlist(state.class(), key, gen);
        self.conns.insert(key, Conn { gen, state });
    }

    /// Appends (key, gen) to `class`'s FIFO, evicting the class's oldest entry if it is full.
    fn enlist(&mut self, class: Class, key: ConnKey, gen: u64) {
        let cap = match class {
            Class::Awaiting => self.cfg.max_awaiting,
            Class::Open => self.cfg.max_open,
            Class::Closed => self.cfg.max_closed,
        };
        let fifo = &mut self.fifos[class as usize];
        if fifo.len() >= cap {
            if let Some((k, g)) = fifo.pop_front() {
                // Items whose entry moved on (another class, a newer generation) are stale.
                let live = self
                    .conns
                    .get(&k)
                    .is_some_and(|c| c.gen == g && c.state.class() == class);
                if live {
                    self.conns.remove(&k);
                    self.stats.evicted += 1;
                }
            }
        }
        fifo.push_back((key, gen));
    }
}

#[cfg(test)]
mod tests;

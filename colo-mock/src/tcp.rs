//! The kv guest's TCP service: a minimal deterministic TCP responder on [`KV_PORT`] whose whole
//! state — every connection's control block and the bytes of a request not yet complete — lives
//! in guest RAM (one page after the kv table and its heap pages), so a checkpoint carries it.
//! Requests and responses are the kv messages of `frame.rs`, each preceded on the stream by its
//! length (big-endian u16).
//!
//! What it does, one input segment at a time and at most one segment out:
//! - a SYN for a new connection takes a free slot and is answered with a SYN-ACK whose initial
//!   sequence number comes from the per-VM entropy device (like a kernel's random ISN: it is what
//!   makes the SVM's sequence space differ from the PVM's); no free slot: RST;
//! - the handshake's ACK must acknowledge exactly the ISN + 1, else the segment is answered with
//!   a RST (RFC 9293 §3.10.7.4), the connection staying in `SynReceived`;
//! - in `Established`, in-order data is appended to the connection's request buffer, complete
//!   requests are executed and their responses sent in one segment that also acknowledges the
//!   data; out-of-order data or an acknowledgement of bytes never sent gets a bare ACK and is
//!   dropped; a length prefix no kv message can have resets the connection;
//! - a FIN is answered with FIN+ACK (`LastAck`), whose acknowledgement frees the slot; a RST
//!   frees it at once; a segment for no connection gets a RST, unless it is one;
//! - anything else that does not parse is ignored.
//!
//! The responder never retransmits (the mock's network path loses nothing while both nodes
//! live); a client retransmits and the responder answers retransmitted SYNs and FINs again.
//!
//! Connection table page: [`CONN_SLOTS`] slots of [`CONN_BYTES`] bytes, little-endian:
//! `state:u8 buffered:u8 port:u16 ip[4] mac[6] 0[2] isn:u32 snd_nxt:u32 rcv_nxt:u32 0[4]
//! buffer[224]`; state 0 = free.
//!
//! ```text
//!   (free) ── SYN ──▶ SynReceived ── ACK of ISN + 1 ──▶ Established ── FIN ──▶ LastAck
//!                          │                                 │                     │
//!                          └───────── RST ─────────┬─────────┘   ACK of our FIN    │
//!                                                  ▼             or RST            │
//!                                               (free) ◀───────────────────────────┘
//! ```

use crate::frame::{
    self, KvStatus, TcpFlags, TcpView, GUEST_IP, GUEST_MAC, HEADER_LEN, KV_PORT, MAX_VALUE,
};
use crate::guest::{kv_execute, HostDevices, KvConfig, DATA_PFN, KV_HEAP_PAGES};
use crate::ram::GuestMem;
use crate::MockError;
use colo_core::PAGE_SIZE;

/// Bytes per connection slot.
pub const CONN_BYTES: usize = 256;
/// Connections the service holds at once.
pub const CONN_SLOTS: usize = PAGE_SIZE / CONN_BYTES;
const BUF_OFF: usize = 32;
const BUF_BYTES: usize = CONN_BYTES - BUF_OFF;
const _: () = assert!(BUF_BYTES >= 2 + frame::MAX_STREAM_MESSAGE);
/// Most response bytes put in one segment (within a 1500-byte MTU).
const MAX_SEGMENT: usize = 1400;
/// Longest response message on the stream, its length prefix included.
const MAX_RESPONSE: usize = 2 + HEADER_LEN + MAX_VALUE;

/// Where a connection is (byte 0 of its slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnState {
    /// The slot is free.
    Free = 0,
    /// SYN-ACK sent, awaiting the ACK of our ISN.
    SynReceived = 1,
    /// Open: awaiting requests.
    Established = 2,
    /// The peer's FIN answered with ours, awaiting its ACK.
    LastAck = 3,
}

impl ConnState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::SynReceived,
            2 => Self::Established,
            3 => Self::LastAck,
            _ => Self::Free,
        }
    }
}

/// The pfn of the connection table page of a kv guest.
pub fn tcb_pfn(cfg: &KvConfig) -> u64 {
    DATA_PFN + cfg.table_pages.max(1) + KV_HEAP_PAGES
}

/// One connection slot, as read from guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tcb {
    /// State.
    pub state: ConnState,
    /// Bytes of an incomplete request in the buffer.
    pub buffered: u8,
    /// The peer's port.
    pub port: u16,
    /// The peer's IPv4 address.
    pub ip: [u8; 4],
    /// The peer's MAC.
    pub mac: [u8; 6],
    /// Our initial sequence number.
    pub isn: u32,
    /// Next sequence number we send.
    pub snd_nxt: u32,
    /// Next sequence number we expect.
    pub rcv_nxt: u32,
}

impl Tcb {
    fn decode(b: &[u8]) -> Self {
        let u32le = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[8..14]);
        Tcb {
            state: ConnState::from_u8(b[0]),
            buffered: b[1].min(BUF_BYTES as u8),
            port: u16::from_le_bytes([b[2], b[3]]),
            ip: [b[4], b[5], b[6], b[7]],
            mac,
            isn: u32le(16),
            snd_nxt: u32le(20),
            rcv_nxt: u32le(24),
        }
    }

    fn encode(&self, b: &mut [u8]) {
        b[0] = self.state as u8;
        b[1] = self.buffered;
        b[2..4].copy_from_slice(&self.port.to_le_bytes());
        b[4..8].copy_from_slice(&self.ip);
        b[8..14].copy_from_slice(&self.mac);
        b[14..16].fill(0);
        b[16..20].copy_from_slice(&self.isn.to_le_bytes());
        b[20..24].copy_from_slice(&self.snd_nxt.to_le_bytes());
        b[24..28].copy_from_slice(&self.rcv_nxt.to_le_bytes());
        b[28..32].fill(0);
    }
}

/// The connection table of a kv guest's RAM (`ram`: all of it), slot by slot (free ones too).
pub fn connections(ram: &[u8], cfg: &KvConfig) -> Vec<Tcb> {
    let start = tcb_pfn(cfg) as usize * PAGE_SIZE;
    ram.get(start..start + PAGE_SIZE)
        .map(|p| p.chunks_exact(CONN_BYTES).map(Tcb::decode).collect())
        .unwrap_or_default()
}

/// `a > b` in sequence space.
fn seq_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Answers the TCP segment `rx` into `tx`; false = nothing to send (ignored, or consumed
/// silently). `out` and `page` are scratch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn answer(
    cfg: &KvConfig,
    mem: &GuestMem,
    dev: &mut HostDevices,
    rx: &[u8],
    tx: &mut Vec<u8>,
    out: &mut Vec<u8>,
    page: &mut [u8],
    touched: &mut Vec<u64>,
) -> Result<bool, MockError> {
    let Ok(v) = frame::parse_tcp(rx) else {
        return Ok(false);
    };
    if v.dst_port != KV_PORT || v.dst_ip != GUEST_IP {
        return Ok(false);
    }
    let base = tcb_pfn(cfg) as usize * PAGE_SIZE;
    let mut slots = [0u8; PAGE_SIZE];
    mem.read(base, &mut slots)?;
    let found = (0..CONN_SLOTS).find(|&i| {
        let t = Tcb::decode(&slots[i * CONN_BYTES..]);
        t.state != ConnState::Free && t.port == v.src_port && t.ip == v.src_ip
    });
    out.clear();
    let Some(i) = found else {
        return no_connection(mem, dev, &v, &slots, base, tx);
    };
    let slot_off = base + i * CONN_BYTES;
    let mut t = Tcb::decode(&slots[i * CONN_BYTES..]);
    let flags = v.flags;
    let send = |t: &Tcb, seq: u32, f: TcpFlags, payload: &[u8], tx: &mut Vec<u8>| {
        frame::build_tcp(
            (&GUEST_MAC, &GUEST_IP, KV_PORT),
            (&t.mac, &t.ip, t.port),
            seq,
            Some(t.rcv_nxt),
            f,
            payload,
            tx,
        )
        .map_err(|e| MockError::Guest(e.to_string()))
        .map(|()| true)
    };
    if flags.rst {
        mem.write(slot_off, &[ConnState::Free as u8])?;
        return Ok(false);
    }
    if flags.syn {
        // A retransmitted SYN gets the SYN-ACK again; any other SYN on a live connection an
        // ACK of where we are (RFC 5961's challenge ACK).
        if t.state == ConnState::SynReceived && v.seq.wrapping_add(1) == t.rcv_nxt {
            let f = TcpFlags {
                syn: true,
                ack: true,
                ..TcpFlags::default()
            };
            return send(&t, t.isn, f, &[], tx);
        }
        return send(&t, t.snd_nxt, ack_only(), &[], tx);
    }
    if !flags.ack {
        return Ok(false);
    }
    match t.state {
        ConnState::Free => return Ok(false),
        ConnState::SynReceived => {
            if v.ack != t.snd_nxt {
                return reset_for(&v, tx);
            }
            t.state = ConnState::Established;
        }
        ConnState::LastAck => {
            if v.ack == t.snd_nxt {
                mem.write(slot_off, &[ConnState::Free as u8])?;
                return Ok(false);
            }
            if flags.fin && v.seq.wrapping_add(1) == t.rcv_nxt {
                let f = TcpFlags {
                    fin: true,
                    ack: true,
                    ..TcpFlags::default()
                };
                return send(&t, t.snd_nxt.wrapping_sub(1), f, &[], tx);
            }
            return Ok(false);
        }
        ConnState::Established => {}
    }
    // Established (possibly just now).
    let has_data = !v.payload.is_empty() || flags.fin;
    if seq_gt(v.ack, t.snd_nxt) || (has_data && v.seq != t.rcv_nxt) {
        t.encode(&mut slots[i * CONN_BYTES..i * CONN_BYTES + BUF_OFF]);
        mem.write(slot_off, &slots[i * CONN_BYTES..i * CONN_BYTES + BUF_OFF])?;
        return send(&t, t.snd_nxt, ack_only(), &[], tx);
    }
    let mut buf = [0u8; BUF_BYTES];
    buf.copy_from_slice(&slots[i * CONN_BYTES + BUF_OFF..(i + 1) * CONN_BYTES]);
    let mut buffered = usize::from(t.buffered);
    let mut taken = 0;
    let mut msg = Vec::with_capacity(HEADER_LEN + MAX_VALUE);
    loop {
        match frame::next_stream_message(&buf[..buffered]) {
            Err(_) => {
                // No kv message has this length: the stream cannot be followed any further.
                mem.write(slot_off, &[ConnState::Free as u8])?;
                let f = TcpFlags {
                    rst: true,
                    ack: true,
                    ..TcpFlags::default()
                };
                t.rcv_nxt = t.rcv_nxt.wrapping_add(taken as u32);
                return send(&t, t.snd_nxt, f, &[], tx);
            }
            Ok(Some((m, used))) => {
                let mut value = [0u8; MAX_VALUE];
                let (id, status, n) = match frame::decode_request(m) {
                    Err((id, _)) => (id.unwrap_or(0), KvStatus::BadRequest, 0),
                    Ok(req) => {
                        let (st, n) = kv_execute(cfg, mem, dev, &req, page, touched, &mut value)?;
                        (req.id, st, n)
                    }
                };
                frame::encode_response(id, status, &value[..n], None, &mut msg)
                    .map_err(|e| MockError::Guest(e.to_string()))?;
                frame::frame_stream_message(&msg, out);
                buf.copy_within(used..buffered, 0);
                buffered -= used;
            }
            Ok(None) => {
                let rest = &v.payload[taken..];
                if rest.is_empty() || out.len() + MAX_RESPONSE > MAX_SEGMENT {
                    break;
                }
                // Move only what completes the message under way (or its length prefix), so
                // a completed request always has room for its response in this segment.
                let want = match buffered {
                    0 | 1 => 2 - buffered,
                    _ => {
                        let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                        (2 + len).saturating_sub(buffered).max(1)
                    }
                };
                let n = want.min(rest.len()).min(BUF_BYTES - buffered);
                buf[buffered..buffered + n].copy_from_slice(&rest[..n]);
                buffered += n;
                taken += n;
            }
        }
    }
    t.buffered = buffered as u8;
    t.rcv_nxt = t.rcv_nxt.wrapping_add(taken as u32);
    let mut f = ack_only();
    // A FIN counts once every byte before it was taken.
    if flags.fin && taken == v.payload.len() {
        t.rcv_nxt = t.rcv_nxt.wrapping_add(1);
        t.state = ConnState::LastAck;
        f.fin = true;
    }
    let seq = t.snd_nxt;
    t.snd_nxt = t
        .snd_nxt
        .wrapping_add(out.len() as u32)
        .wrapping_add(u32::from(f.fin));
    let s = &mut slots[i * CONN_BYTES..(i + 1) * CONN_BYTES];
    t.encode(&mut s[..BUF_OFF]);
    s[BUF_OFF..].copy_from_slice(&buf);
    mem.write(slot_off, s)?;
    if taken == 0 && !f.fin && out.is_empty() {
        // A bare ACK: nothing to answer.
        return Ok(false);
    }
    send(&t, seq, f, out, tx)
}

fn ack_only() -> TcpFlags {
    TcpFlags {
        ack: true,
        ..TcpFlags::default()
    }
}

/// The RST answering `v` (RFC 9293 §3.10.7.1): `seq = ack` for a segment with an ACK, else
/// `ack = seq + len` with the ACK flag.
fn reset_for(v: &TcpView<'_>, tx: &mut Vec<u8>) -> Result<bool, MockError> {
    let (seq, ack, f) = if v.flags.ack {
        (
            v.ack,
            None,
            TcpFlags {
                rst: true,
                ..TcpFlags::default()
            },
        )
    } else {
        let len = v.payload.len() as u32 + u32::from(v.flags.syn) + u32::from(v.flags.fin);
        (
            0,
            Some(v.seq.wrapping_add(len)),
            TcpFlags {
                rst: true,
                ack: true,
                ..TcpFlags::default()
            },
        )
    };
    frame::build_tcp(
        (&GUEST_MAC, &GUEST_IP, KV_PORT),
        (&v.src_mac, &v.src_ip, v.src_port),
        seq,
        ack,
        f,
        &[],
        tx,
    )
    .map_err(|e| MockError::Guest(e.to_string()))?;
    Ok(true)
}

/// A segment for no connection: a SYN opens one in a free slot, a RST is ignored, anything
/// else is reset.
fn no_connection(
    mem: &GuestMem,
    dev: &mut HostDevices,
    v: &TcpView<'_>,
    slots: &[u8],
    base: usize,
    tx: &mut Vec<u8>,
) -> Result<bool, MockError> {
    if v.flags.rst {
        return Ok(false);
    }
    if !v.flags.syn || v.flags.ack {
        return reset_for(v, tx);
    }
    let Some(i) = (0..CONN_SLOTS).find(|&i| slots[i * CONN_BYTES] == ConnState::Free as u8) else {
        return reset_for(v, tx);
    };
    let isn = dev.entropy() as u32;
    let t = Tcb {
        state: ConnState::SynReceived,
        buffered: 0,
        port: v.src_port,
        ip: v.src_ip,
        mac: v.src_mac,
        isn,
        snd_nxt: isn.wrapping_add(1),
        rcv_nxt: v.seq.wrapping_add(1),
    };
    let mut b = [0u8; BUF_OFF];
    t.encode(&mut b);
    mem.write(base + i * CONN_BYTES, &b)?;
    frame::build_tcp(
        (&GUEST_MAC, &GUEST_IP, KV_PORT),
        (&v.src_mac, &v.src_ip, v.src_port),
        isn,
        Some(t.rcv_nxt),
        TcpFlags {
            syn: true,
            ack: true,
            ..TcpFlags::default()
        },
        &[],
        tx,
    )
    .map_err(|e| MockError::Guest(e.to_string()))?;
    Ok(true)
}

/// What a segment from the guest did to a [`TcpClientConn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEvent {
    /// Not a segment of this connection (another port, not TCP): ignored.
    Other,
    /// The SYN-ACK: the connection is open (send [`TcpClientConn::ack`]).
    Open,
    /// An ACK, or data (in order or not; responses are read with
    /// [`TcpClientConn::next_response`]).
    Segment,
    /// The guest's FIN: every byte before it was received.
    Fin,
    /// The guest reset the connection.
    Reset,
}

/// The client end of one TCP connection to the kv service, sans-IO (tests and colo-cli's TCP
/// client): it builds the segments to send and consumes the guest's, keeping the numbers.
/// It retransmits nothing itself: [`TcpClientConn::last`] is the segment to resend.
#[derive(Debug, Clone)]
pub struct TcpClientConn {
    me: frame::ClientAddr,
    snd_nxt: u32,
    rcv_nxt: u32,
    /// The guest's ISN, once the SYN-ACK came.
    pub guest_isn: Option<u32>,
    /// Received stream bytes not yet taken as responses.
    stream: Vec<u8>,
    last: Vec<u8>,
    fin_received: bool,
}

impl TcpClientConn {
    /// A connection from `me` with initial sequence number `iss`; `out` gets the SYN.
    pub fn open(me: frame::ClientAddr, iss: u32, out: &mut Vec<u8>) -> Result<Self, MockError> {
        let mut c = TcpClientConn {
            me,
            snd_nxt: iss.wrapping_add(1),
            rcv_nxt: 0,
            guest_isn: None,
            stream: Vec::new(),
            last: Vec::new(),
            fin_received: false,
        };
        let syn = TcpFlags {
            syn: true,
            ..TcpFlags::default()
        };
        c.build(iss, None, syn, &[], out)?;
        Ok(c)
    }

    fn build(
        &mut self,
        seq: u32,
        ack: Option<u32>,
        f: TcpFlags,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), MockError> {
        frame::build_tcp(
            (&self.me.mac, &self.me.ip, self.me.port),
            (&GUEST_MAC, &GUEST_IP, KV_PORT),
            seq,
            ack,
            f,
            payload,
            out,
        )
        .map_err(|e| MockError::Guest(e.to_string()))?;
        self.last.clear();
        self.last.extend_from_slice(out);
        Ok(())
    }

    /// The last segment built (to retransmit it).
    pub fn last(&self) -> &[u8] {
        &self.last
    }

    /// The next sequence number the client sends.
    pub fn snd_nxt(&self) -> u32 {
        self.snd_nxt
    }

    /// Whether the guest's FIN came.
    pub fn fin_received(&self) -> bool {
        self.fin_received
    }

    /// Takes in a frame the guest emitted.
    pub fn receive(&mut self, f: &[u8]) -> ClientEvent {
        let Ok(v) = frame::parse_tcp(f) else {
            return ClientEvent::Other;
        };
        if v.dst_port != self.me.port || v.src_port != KV_PORT || v.dst_ip != self.me.ip {
            return ClientEvent::Other;
        }
        if v.flags.rst {
            return ClientEvent::Reset;
        }
        if v.flags.syn {
            if v.flags.ack && v.ack == self.snd_nxt && self.guest_isn.is_none() {
                self.guest_isn = Some(v.seq);
                self.rcv_nxt = v.seq.wrapping_add(1);
                return ClientEvent::Open;
            }
            return ClientEvent::Segment;
        }
        if self.guest_isn.is_none() {
            return ClientEvent::Other;
        }
        // Only what continues the stream is taken; a retransmission's old bytes are trimmed.
        let late = self.rcv_nxt.wrapping_sub(v.seq) as usize;
        if (self.rcv_nxt.wrapping_sub(v.seq) as i32) >= 0 && late <= v.payload.len() {
            let new = &v.payload[late..];
            self.stream.extend_from_slice(new);
            self.rcv_nxt = self.rcv_nxt.wrapping_add(new.len() as u32);
            if v.flags.fin && !self.fin_received {
                self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
                self.fin_received = true;
                return ClientEvent::Fin;
            }
        }
        ClientEvent::Segment
    }

    /// A bare ACK of everything received, into `out`.
    pub fn ack(&mut self, out: &mut Vec<u8>) -> Result<(), MockError> {
        let a = self.rcv_nxt;
        self.build(self.snd_nxt, Some(a), ack_only(), &[], out)
    }

    /// Sends `req` on the stream: one segment into `out`.
    pub fn request(
        &mut self,
        req: &frame::KvRequest<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), MockError> {
        let mut msg = Vec::new();
        frame::encode_request(req, &mut msg).map_err(|e| MockError::Guest(e.to_string()))?;
        let mut payload = Vec::with_capacity(msg.len() + 2);
        frame::frame_stream_message(&msg, &mut payload);
        let (seq, a) = (self.snd_nxt, self.rcv_nxt);
        self.snd_nxt = seq.wrapping_add(payload.len() as u32);
        self.build(seq, Some(a), ack_only(), &payload, out)
    }

    /// Closes the sending side: a FIN into `out`.
    pub fn fin(&mut self, out: &mut Vec<u8>) -> Result<(), MockError> {
        let (seq, a) = (self.snd_nxt, self.rcv_nxt);
        self.snd_nxt = seq.wrapping_add(1);
        let f = TcpFlags {
            fin: true,
            ack: true,
            ..TcpFlags::default()
        };
        self.build(seq, Some(a), f, &[], out)
    }

    /// The next complete response on the stream, if one is there.
    pub fn next_response(&mut self) -> Result<Option<frame::KvResponse>, frame::FrameError> {
        let Some((m, used)) = frame::next_stream_message(&self.stream)? else {
            return Ok(None);
        };
        let r = frame::decode_response(m)?;
        self.stream.drain(..used);
        Ok(Some(r))
    }
}

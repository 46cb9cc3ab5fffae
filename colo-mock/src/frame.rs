//! The kv service's wire format: requests and responses as Ethernet II / IPv4 / UDP frames
//! (built and parsed with etherparse), used by clients, by the guest, and by the output comparison.
//!
//! UDP payloads, all integers big-endian:
//!
//! ```text
//! request  = "KV" ver:u8=1 op:u8 id:u64 klen:u8 0:u8 vlen:u16 key[klen] value[vlen]
//! response = "KR" ver:u8=1 status:u8 id:u64 vlen:u16 flags:u8 0:u8 value[vlen] [extra:u64]
//! ```
//! `flags` bit 0 says an `extra` u64 follows (the per-VM value of output divergence).
//! Parsers reject short, long (trailing bytes) and over-limit messages.
//!
//! Over TCP (the same port, [`KV_PORT`]) the same messages travel on the byte stream, each
//! preceded by its length as a big-endian u16 ([`frame_stream_message`]); [`parse_tcp`] and
//! [`build_tcp`] slice and build the segments.

use etherparse::{LinkSlice, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

/// The guest NIC's MAC address.
pub const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0xc0, 0x10, 0x01];
/// The guest's IPv4 address.
pub const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
/// The UDP port the kv service listens on.
pub const KV_PORT: u16 = 7000;
/// Longest key, bytes.
pub const MAX_KEY: usize = 32;
/// Longest value, bytes.
pub const MAX_VALUE: usize = 92;
/// kv message header length.
pub const HEADER_LEN: usize = 16;
/// Time-to-live of frames the guest emits.
const TTL: u8 = 64;

/// Errors from building or parsing kv frames.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not an Ethernet II / IPv4 / UDP frame.
    #[error("not an Ethernet/IPv4/UDP frame: {0}")]
    NotUdp(String),
    /// Not an Ethernet II / IPv4 / TCP frame.
    #[error("not an Ethernet/IPv4/TCP frame: {0}")]
    NotTcp(String),
    /// A stream message's length prefix is outside what a kv message can be.
    #[error("kv stream message length {0} is outside {HEADER_LEN}..={max}", max = MAX_STREAM_MESSAGE + 8)]
    StreamLength(usize),
    /// The UDP payload is shorter than the header or than its declared lengths.
    #[error("kv message of {got} bytes is too short, {need} needed")]
    Short {
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Bytes after the declared end of the message.
    #[error("kv message has {0} trailing bytes")]
    Trailing(usize),
    /// Wrong magic or version.
    #[error("bad kv magic/version {0:02x?}")]
    BadMagic([u8; 3]),
    /// Unknown opcode or status.
    #[error("unknown kv code {0}")]
    BadCode(u8),
    /// Key or value beyond the limits.
    #[error("key {key} / value {value} bytes exceed the limits ({MAX_KEY}/{MAX_VALUE})")]
    TooLong {
        /// Key length.
        key: usize,
        /// Value length.
        value: usize,
    },
    /// etherparse failed to build the frame.
    #[error("building frame: {0}")]
    Build(String),
}

/// A kv operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KvOp {
    /// Look a key up.
    Get = 1,
    /// Insert or replace a key's value.
    Put = 2,
    /// Remove a key.
    Delete = 3,
}

impl KvOp {
    fn from_u8(v: u8) -> Result<Self, FrameError> {
        match v {
            1 => Ok(Self::Get),
            2 => Ok(Self::Put),
            3 => Ok(Self::Delete),
            o => Err(FrameError::BadCode(o)),
        }
    }
}

/// Outcome of a kv request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KvStatus {
    /// Done; a GET carries the value.
    Ok = 0,
    /// GET or DELETE of a missing key.
    NotFound = 1,
    /// The request could not be parsed.
    BadRequest = 2,
    /// PUT of a new key into a full table.
    TableFull = 3,
}

impl KvStatus {
    fn from_u8(v: u8) -> Result<Self, FrameError> {
        match v {
            0 => Ok(Self::Ok),
            1 => Ok(Self::NotFound),
            2 => Ok(Self::BadRequest),
            3 => Ok(Self::TableFull),
            o => Err(FrameError::BadCode(o)),
        }
    }
}

/// A client's link/network/transport address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    /// Client MAC.
    pub mac: [u8; 6],
    /// Client IPv4 address.
    pub ip: [u8; 4],
    /// Client UDP port.
    pub port: u16,
}

/// A kv request (borrowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvRequest<'a> {
    /// Client-chosen request id, echoed in the response.
    pub id: u64,
    /// Operation.
    pub op: KvOp,
    /// Key, at most [`MAX_KEY`] bytes.
    pub key: &'a [u8],
    /// Value for PUT (empty otherwise), at most [`MAX_VALUE`] bytes.
    pub value: &'a [u8],
}

/// A parsed kv response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvResponse {
    /// The request id it answers.
    pub id: u64,
    /// Outcome.
    pub status: KvStatus,
    /// Value of a successful GET, else empty.
    pub value: Vec<u8>,
    /// The per-VM value a divergent response carries (the guest's host clock), if any.
    pub extra: Option<u64>,
}

/// Encodes a request's UDP payload into `out` (cleared first).
pub fn encode_request(req: &KvRequest<'_>, out: &mut Vec<u8>) -> Result<(), FrameError> {
    if req.key.len() > MAX_KEY || req.value.len() > MAX_VALUE {
        return Err(FrameError::TooLong {
            key: req.key.len(),
            value: req.value.len(),
        });
    }
    out.clear();
    out.extend_from_slice(b"KV\x01");
    out.push(req.op as u8);
    out.extend_from_slice(&req.id.to_be_bytes());
    out.push(req.key.len() as u8);
    out.push(0);
    out.extend_from_slice(&(req.value.len() as u16).to_be_bytes());
    out.extend_from_slice(req.key);
    out.extend_from_slice(req.value);
    Ok(())
}

fn header(p: &[u8], magic: &[u8; 2]) -> Result<[u8; HEADER_LEN], FrameError> {
    let h: [u8; HEADER_LEN] =
        p.get(..HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(FrameError::Short {
                got: p.len(),
                need: HEADER_LEN,
            })?;
    if &h[..2] != magic || h[2] != 1 {
        return Err(FrameError::BadMagic([h[0], h[1], h[2]]));
    }
    Ok(h)
}

fn exact_len(p: &[u8], need: usize) -> Result<(), FrameError> {
    match p.len().cmp(&need) {
        std::cmp::Ordering::Less => Err(FrameError::Short { got: p.len(), need }),
        std::cmp::Ordering::Greater => Err(FrameError::Trailing(p.len() - need)),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decodes a request's UDP payload. On error, returns the request id too when the header had one.
pub fn decode_request(p: &[u8]) -> Result<KvRequest<'_>, (Option<u64>, FrameError)> {
    let h = header(p, b"KV").map_err(|e| (None, e))?;
    let id = be_u64(&h[4..12]);
    let fail = |e| (Some(id), e);
    let op = KvOp::from_u8(h[3]).map_err(fail)?;
    let klen = usize::from(h[12]);
    let vlen = usize::from(u16::from_be_bytes([h[14], h[15]]));
    if klen > MAX_KEY || vlen > MAX_VALUE {
        return Err(fail(FrameError::TooLong {
            key: klen,
            value: vlen,
        }));
    }
    exact_len(p, HEADER_LEN + klen + vlen).map_err(fail)?;
    Ok(KvRequest {
        id,
        op,
        key: &p[HEADER_LEN..HEADER_LEN + klen],
        value: &p[HEADER_LEN + klen..],
    })
}

/// Encodes a response's UDP payload into `out` (cleared first).
pub fn encode_response(
    id: u64,
    status: KvStatus,
    value: &[u8],
    extra: Option<u64>,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    if value.len() > MAX_VALUE {
        return Err(FrameError::TooLong {
            key: 0,
            value: value.len(),
        });
    }
    out.clear();
    out.extend_from_slice(b"KR\x01");
    out.push(status as u8);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.push(u8::from(extra.is_some()));
    out.push(0);
    out.extend_from_slice(value);
    if let Some(x) = extra {
        out.extend_from_slice(&x.to_be_bytes());
    }
    Ok(())
}

/// Decodes a response's UDP payload.
pub fn decode_response(p: &[u8]) -> Result<KvResponse, FrameError> {
    let h = header(p, b"KR")?;
    let status = KvStatus::from_u8(h[3])?;
    let id = be_u64(&h[4..12]);
    let vlen = usize::from(u16::from_be_bytes([h[12], h[13]]));
    if vlen > MAX_VALUE {
        return Err(FrameError::TooLong {
            key: 0,
            value: vlen,
        });
    }
    let flags = h[14];
    if flags & !1 != 0 {
        return Err(FrameError::BadCode(flags));
    }
    let has_extra = flags & 1 != 0;
    exact_len(p, HEADER_LEN + vlen + if has_extra { 8 } else { 0 })?;
    let value = p[HEADER_LEN..HEADER_LEN + vlen].to_vec();
    let extra = has_extra.then(|| be_u64(&p[HEADER_LEN + vlen..]));
    Ok(KvResponse {
        id,
        status,
        value,
        extra,
    })
}

/// The addresses and UDP payload of a frame.
#[derive(Debug, Clone, Copy)]
pub struct UdpView<'a> {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source IPv4.
    pub src_ip: [u8; 4],
    /// Destination IPv4.
    pub dst_ip: [u8; 4],
    /// Source UDP port.
    pub src_port: u16,
    /// Destination UDP port.
    pub dst_port: u16,
    /// UDP payload.
    pub payload: &'a [u8],
}

/// Slices an Ethernet II / IPv4 / UDP frame.
pub fn parse_udp(frame: &[u8]) -> Result<UdpView<'_>, FrameError> {
    let s = SlicedPacket::from_ethernet(frame).map_err(|e| FrameError::NotUdp(e.to_string()))?;
    let Some(LinkSlice::Ethernet2(eth)) = &s.link else {
        return Err(FrameError::NotUdp("no Ethernet II header".into()));
    };
    let Some(NetSlice::Ipv4(ip)) = &s.net else {
        return Err(FrameError::NotUdp("not IPv4".into()));
    };
    let Some(TransportSlice::Udp(udp)) = &s.transport else {
        return Err(FrameError::NotUdp("not UDP".into()));
    };
    Ok(UdpView {
        src_mac: eth.source(),
        dst_mac: eth.destination(),
        src_ip: ip.header().source(),
        dst_ip: ip.header().destination(),
        src_port: udp.source_port(),
        dst_port: udp.destination_port(),
        payload: udp.payload(),
    })
}

/// Builds an Ethernet/IPv4/UDP frame around `payload` into `out` (cleared first).
pub fn build_udp(
    src: (&[u8; 6], &[u8; 4], u16),
    dst: (&[u8; 6], &[u8; 4], u16),
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    out.clear();
    PacketBuilder::ethernet2(*src.0, *dst.0)
        .ipv4(*src.1, *dst.1, TTL)
        .udp(src.2, dst.2)
        .write(out, payload)
        .map_err(|e| FrameError::Build(e.to_string()))
}

/// The addresses, numbers, flags and payload of a TCP segment.
#[derive(Debug, Clone, Copy)]
pub struct TcpView<'a> {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Source IPv4.
    pub src_ip: [u8; 4],
    /// Destination IPv4.
    pub dst_ip: [u8; 4],
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number (meaningful when `flags.ack`).
    pub ack: u32,
    /// Control flags.
    pub flags: TcpFlags,
    /// Payload.
    pub payload: &'a [u8],
}

/// The TCP control flags the kv service uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpFlags {
    /// SYN.
    pub syn: bool,
    /// ACK.
    pub ack: bool,
    /// FIN.
    pub fin: bool,
    /// RST.
    pub rst: bool,
}

/// Slices an Ethernet II / IPv4 / TCP frame.
pub fn parse_tcp(frame: &[u8]) -> Result<TcpView<'_>, FrameError> {
    let s = SlicedPacket::from_ethernet(frame).map_err(|e| FrameError::NotTcp(e.to_string()))?;
    let Some(LinkSlice::Ethernet2(eth)) = &s.link else {
        return Err(FrameError::NotTcp("no Ethernet II header".into()));
    };
    let Some(NetSlice::Ipv4(ip)) = &s.net else {
        return Err(FrameError::NotTcp("not IPv4".into()));
    };
    let Some(TransportSlice::Tcp(tcp)) = &s.transport else {
        return Err(FrameError::NotTcp("not TCP".into()));
    };
    Ok(TcpView {
        src_mac: eth.source(),
        src_ip: ip.header().source(),
        dst_ip: ip.header().destination(),
        src_port: tcp.source_port(),
        dst_port: tcp.destination_port(),
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        flags: TcpFlags {
            syn: tcp.syn(),
            ack: tcp.ack(),
            fin: tcp.fin(),
            rst: tcp.rst(),
        },
        payload: tcp.payload(),
    })
}

/// The window every segment of the kv service and its test client advertises.
pub const TCP_WINDOW: u16 = 8192;

/// Builds an Ethernet/IPv4/TCP segment (checksums computed) into `out` (cleared first).
/// `ack` is sent (with the ACK flag) when it is `Some`.
pub fn build_tcp(
    src: (&[u8; 6], &[u8; 4], u16),
    dst: (&[u8; 6], &[u8; 4], u16),
    seq: u32,
    ack: Option<u32>,
    flags: TcpFlags,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    out.clear();
    let mut b = PacketBuilder::ethernet2(*src.0, *dst.0)
        .ipv4(*src.1, *dst.1, TTL)
        .tcp(src.2, dst.2, seq, TCP_WINDOW);
    if flags.syn {
        b = b.syn();
    }
    if flags.fin {
        b = b.fin();
    }
    if flags.rst {
        b = b.rst();
    }
    if !payload.is_empty() {
        b = b.psh();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    b.write(out, payload)
        .map_err(|e| FrameError::Build(e.to_string()))
}

/// Longest kv message on a TCP stream (a request with the longest key and value).
pub const MAX_STREAM_MESSAGE: usize = HEADER_LEN + MAX_KEY + MAX_VALUE;

/// Appends `msg` to `out` as one stream message: its length (big-endian u16), then the bytes.
pub fn frame_stream_message(msg: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// The first complete stream message in `buf`: `Ok(Some((message, bytes used)))`,
/// `Ok(None)` when more bytes are needed, or an error when the length prefix is outside
/// `HEADER_LEN..=MAX_STREAM_MESSAGE + 8` (a response may carry an extra u64).
pub fn next_stream_message(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(l) = buf.get(..2) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([l[0], l[1]]));
    if !(HEADER_LEN..=MAX_STREAM_MESSAGE + 8).contains(&len) {
        return Err(FrameError::StreamLength(len));
    }
    Ok(buf.get(2..2 + len).map(|m| (m, 2 + len)))
}

/// Builds a kv request frame from `client` to the guest into `out`. `scratch` holds the payload.
pub fn build_request_frame(
    client: &ClientAddr,
    req: &KvRequest<'_>,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let mut payload = Vec::with_capacity(HEADER_LEN + req.key.len() + req.value.len());
    encode_request(req, &mut payload)?;
    build_udp(
        (&client.mac, &client.ip, client.port),
        (&GUEST_MAC, &GUEST_IP, KV_PORT),
        &payload,
        out,
    )
}

/// Parses a kv response frame emitted by the guest.
pub fn parse_response_frame(frame: &[u8]) -> Result<KvResponse, FrameError> {
    let v = parse_udp(frame)?;
    decode_response(v.payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: ClientAddr = ClientAddr {
        mac: [2, 0, 0, 0, 0, 9],
        ip: [10, 0, 0, 9],
        port: 40000,
    };

    #[test]
    fn request_round_trip_and_rejects() {
        let req = KvRequest {
            id: 0x0102_0304_0506_0708,
            op: KvOp::Put,
            key: b"alpha",
            value: b"beta",
        };
        let mut f = Vec::new();
        build_request_frame(&C, &req, &mut f).unwrap();
        let v = parse_udp(&f).unwrap();
        assert_eq!((v.dst_port, v.src_port, v.src_ip), (KV_PORT, 40000, C.ip));
        assert_eq!(decode_request(v.payload).unwrap(), req);
        let mut long = v.payload.to_vec();
        long.push(0);
        assert_eq!(
            decode_request(&long).unwrap_err(),
            (Some(req.id), FrameError::Trailing(1))
        );
        assert!(matches!(
            decode_request(&v.payload[..10]),
            Err((None, FrameError::Short { .. }))
        ));
        let big = [0u8; MAX_KEY + 1];
        let bad = KvRequest { key: &big, ..req };
        assert!(build_request_frame(&C, &bad, &mut f).is_err());
    }

    #[test]
    fn tcp_round_trip_and_stream_messages() {
        let mut f = Vec::new();
        let flags = TcpFlags {
            syn: true,
            ack: true,
            ..TcpFlags::default()
        };
        build_tcp(
            (&C.mac, &C.ip, C.port),
            (&GUEST_MAC, &GUEST_IP, KV_PORT),
            0xffff_fff0,
            Some(7),
            flags,
            b"xy",
            &mut f,
        )
        .unwrap();
        let v = parse_tcp(&f).unwrap();
        assert_eq!(
            (v.src_port, v.dst_port, v.seq, v.ack, v.flags, v.payload),
            (C.port, KV_PORT, 0xffff_fff0, 7, flags, &b"xy"[..])
        );
        assert!(matches!(parse_udp(&f), Err(FrameError::NotUdp(_))));
        let mut u = Vec::new();
        build_udp((&C.mac, &C.ip, 1), (&GUEST_MAC, &GUEST_IP, 2), b"", &mut u).unwrap();
        assert!(matches!(parse_tcp(&u), Err(FrameError::NotTcp(_))));
        assert!(parse_tcp(&f[..20]).is_err());

        let mut msg = Vec::new();
        encode_response(3, KvStatus::Ok, b"v", None, &mut msg).unwrap();
        let mut stream = Vec::new();
        frame_stream_message(&msg, &mut stream);
        frame_stream_message(&msg, &mut stream);
        let (m, used) = next_stream_message(&stream).unwrap().unwrap();
        assert_eq!((m, used), (&msg[..], msg.len() + 2));
        assert_eq!(next_stream_message(&stream[..used - 1]).unwrap(), None);
        assert_eq!(next_stream_message(&stream[..1]).unwrap(), None);
        assert_eq!(
            next_stream_message(&[0, 3, 0, 0, 0]),
            Err(FrameError::StreamLength(3))
        );
        assert_eq!(
            next_stream_message(&[0xff, 0xff]),
            Err(FrameError::StreamLength(0xffff))
        );
    }

    #[test]
    fn response_round_trip() {
        let mut p = Vec::new();
        encode_response(7, KvStatus::Ok, b"v", Some(99), &mut p).unwrap();
        let r = decode_response(&p).unwrap();
        assert_eq!(
            (r.id, r.status, r.value.as_slice(), r.extra),
            (7, KvStatus::Ok, &b"v"[..], Some(99))
        );
        encode_response(8, KvStatus::NotFound, b"", None, &mut p).unwrap();
        assert_eq!(decode_response(&p).unwrap().extra, None);
        p[3] = 77;
        assert_eq!(decode_response(&p).unwrap_err(), FrameError::BadCode(77));
    }
}

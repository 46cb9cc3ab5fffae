//! Frame classification for the comparator: which flow a frame belongs to and which of its bytes
//! are compared. Parsing uses etherparse; anything it rejects is compared whole.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use etherparse::{EtherType, NetSlice, SlicedPacket, TransportSlice};

/// RARP's EtherType, passed through like ARP.
const ETHERTYPE_RARP: u16 = 0x8035;
/// ICMPv6 types 133..=137: router/neighbour solicitation and advertisement, redirect (RFC 4861).
const NDP_TYPES: std::ops::RangeInclusive<u8> = 133..=137;
/// ICMPv6 multicast listener query/report/done (MLDv1) and MLDv2 report: sent after random
/// delays, so the two VMs' timing differs; idempotent link-local state, passed through like NDP.
const MLD_TYPES: [u8; 4] = [130, 131, 132, 143];
/// IGMP (IPv4's MLD): passed through for the same reason.
const PROTO_IGMP: u8 = 2;

/// A directional IP flow: for TCP and UDP the 5-tuple, for other protocols ports are 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

fn put_addr(buf: &mut [u8], a: &IpAddr) {
    match a {
        IpAddr::V4(v4) => buf[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => buf.copy_from_slice(&v6.octets()),
    }
}

impl Hash for FlowKey {
    /// One `write` of a fixed-size buffer: a third of the cost of hashing the fields one by one.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 38];
        b[0] = match (self.src, self.dst) {
            (IpAddr::V4(_), IpAddr::V4(_)) => 4,
            (IpAddr::V6(_), IpAddr::V6(_)) => 6,
            _ => 10,
        };
        b[1] = self.proto;
        b[2..4].copy_from_slice(&self.sport.to_be_bytes());
        b[4..6].copy_from_slice(&self.dport.to_be_bytes());
        put_addr(&mut b[6..22], &self.src);
        put_addr(&mut b[22..38], &self.dst);
        let len = if b[0] == 4 { 14 } else { 38 };
        if b[0] == 4 {
            b.copy_within(22..26, 10);
        }
        state.write(&b[..len]);
    }
}

/// Which queue a non-TCP frame is paired in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlowId {
    /// An IP flow (UDP, ICMP, fragments, other IP protocols).
    Ip(FlowKey),
    /// Non-IP frames and frames etherparse rejects: one FIFO, compared whole.
    Raw,
}

impl Hash for FlowId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            FlowId::Ip(k) => k.hash(state),
            FlowId::Raw => state.write_u8(0),
        }
    }
}

/// The parts of a TCP segment the stream comparison needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpSeg {
    pub key: FlowKey,
    pub seq: u32,
    /// The acknowledgment number if the ACK flag is set.
    pub ack: Option<u32>,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    /// Offset of the payload in the frame.
    pub off: u32,
    /// Payload length.
    pub len: u32,
}

/// What the comparator does with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// ARP, IPv6 neighbour discovery, MLD, IGMP: released at once, never compared.
    Pass,
    /// A TCP segment, compared as part of its connection's byte stream.
    Tcp(TcpSeg),
    /// Paired i-th with i-th within `flow`; `frame[from..to]` is compared.
    Datagram { flow: FlowId, from: u32, to: u32 },
}

/// Offset of `sub` inside `frame`, if `sub` lies inside it.
fn offset_in(frame: &[u8], sub: &[u8]) -> Option<u32> {
    let start = (sub.as_ptr() as usize).checked_sub(frame.as_ptr() as usize)?;
    let end = start.checked_add(sub.len())?;
    if end > frame.len() {
        return None;
    }
    u32::try_from(start).ok()
}

fn whole(frame: &[u8], flow: FlowId) -> Class {
    Class::Datagram {
        flow,
        from: 0,
        to: u32::try_from(frame.len()).unwrap_or(u32::MAX),
    }
}

/// Classifies one Ethernet frame. Never panics; unparsable frames are compared whole.
pub(crate) fn classify(frame: &[u8]) -> Class {
    let Ok(pkt) = SlicedPacket::from_ethernet(frame) else {
        return whole(frame, FlowId::Raw);
    };
    let Some(net) = &pkt.net else {
        let ether_type = match &pkt.vlan {
            Some(v) => Some(v.payload().ether_type),
            None => pkt
                .link
                .as_ref()
                .and_then(|l| l.ether_payload())
                .map(|p| p.ether_type),
        };
        return match ether_type {
            Some(t) if t == EtherType::ARP || t.0 == ETHERTYPE_RARP => Class::Pass,
            _ => whole(frame, FlowId::Raw),
        };
    };
    let (src, dst, payload) = match net {
        NetSlice::Ipv4(s) => (
            IpAddr::from(s.header().source()),
            IpAddr::from(s.header().destination()),
            s.payload(),
        ),
        NetSlice::Ipv6(s) => (
            IpAddr::from(s.header().source()),
            IpAddr::from(s.header().destination()),
            s.payload(),
        ),
    };
    let proto = payload.ip_number.0;
    let mut key = FlowKey {
        src,
        dst,
        sport: 0,
        dport: 0,
        proto,
    };
    let Some(from) = offset_in(frame, payload.payload) else {
        return whole(frame, FlowId::Raw);
    };
    // `from + len` cannot overflow: offset_in checked it lies inside the frame.
    let to = from + u32::try_from(payload.payload.len()).unwrap_or(0);
    let datagram = |key| Class::Datagram {
        flow: FlowId::Ip(key),
        from,
        to,
    };
    if payload.fragmented {
        return datagram(key);
    }
    match &pkt.transport {
        Some(TransportSlice::Tcp(t)) => {
            key.sport = t.source_port();
            key.dport = t.destination_port();
            let body = t.payload();
            let Some(off) = offset_in(frame, body) else {
                return whole(frame, FlowId::Ip(key));
            };
            Class::Tcp(TcpSeg {
                key,
                seq: t.sequence_number(),
                ack: t.ack().then(|| t.acknowledgment_number()),
                syn: t.syn(),
                fin: t.fin(),
                rst: t.rst(),
                off,
                len: u32::try_from(body.len()).unwrap_or(0),
            })
        }
        Some(TransportSlice::Udp(u)) => {
            key.sport = u.source_port();
            key.dport = u.destination_port();
            datagram(key)
        }
        Some(TransportSlice::Icmpv4(_)) => datagram(key),
        Some(TransportSlice::Icmpv6(i))
            if NDP_TYPES.contains(&i.type_u8()) || MLD_TYPES.contains(&i.type_u8()) =>
        {
            Class::Pass
        }
        Some(TransportSlice::Icmpv6(_)) => datagram(key),
        None if proto == PROTO_IGMP => Class::Pass,
        None => whole(frame, FlowId::Ip(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    #[test]
    fn udp_compared_from_ip_payload_without_padding() {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(5, 7);
        let mut f = Vec::new();
        b.write(&mut f, &[1, 2]).unwrap_or_else(|e| panic!("{e}"));
        let ip_end = f.len();
        f.resize(60, 0xee); // Ethernet padding is not compared
        match classify(&f) {
            Class::Datagram {
                flow: FlowId::Ip(k),
                from,
                to,
            } => {
                assert_eq!((k.sport, k.dport, k.proto), (5, 7, 17));
                assert_eq!((from, to), (14 + 20, ip_end as u32));
            }
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn tcp_fields() {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6([1; 16], [2; 16], 64)
            .tcp(80, 4000, 1234, 100)
            .syn()
            .ack(99);
        let mut f = Vec::new();
        b.write(&mut f, b"xy").unwrap_or_else(|e| panic!("{e}"));
        match classify(&f) {
            Class::Tcp(s) => {
                assert_eq!(
                    (s.seq, s.ack, s.syn, s.fin, s.rst, s.len),
                    (1234, Some(99), true, false, false, 2)
                );
                assert_eq!(&f[s.off as usize..][..2], b"xy");
            }
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn arp_and_ndp_pass_garbage_is_raw() {
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC_A);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(classify(&arp), Class::Pass);
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6([1; 16], [2; 16], 255)
            .icmpv6_raw(135, 0, [0; 4]);
        let mut ns = Vec::new();
        b.write(&mut ns, &[0; 16]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(classify(&ns), Class::Pass);
        for f in [&[][..], &[1, 2, 3][..], &[0x45; 40][..]] {
            assert_eq!(
                classify(f),
                Class::Datagram {
                    flow: FlowId::Raw,
                    from: 0,
                    to: f.len() as u32
                }
            );
        }
    }
}

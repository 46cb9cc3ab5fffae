//! What a survivor says on the service network when it takes over: the guest's addresses,
//! learnt from the guest's own frames, announced as a gratuitous ARP (IPv4) and an unsolicited
//! neighbour advertisement (IPv6), so switches and neighbours send the guest's traffic to the
//! port the survivor serves from.
//!
//! [`Neighbours::learn`] looks at a frame the guest emitted (the secondary feeds it every frame
//! of the SVM's output) and keeps its unicast source MAC with the IPv4 address (an ARP sender, or
//! an IPv4 source) or IPv6 address (an IPv6 source, the unspecified and multicast addresses
//! left out) it speaks for; at most [`MAX_ADDRESSES`] of each, the first ones seen.
//! [`Neighbours::announcements`] builds the frames. Pure: no IO, the node sends them.
//!
//! Frame layouts (RFC 5227 §3 for the ARP announcement: an ARP request with sender and target
//! protocol address both the guest's, broadcast; RFC 4861 §4.4 and §7.2.6 for the unsolicited
//! NA: to ff02::1, hop limit 255, the override flag, the target link-layer address option).

/// The most IPv4 (and, separately, IPv6) addresses kept.
pub const MAX_ADDRESSES: usize = 16;

const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
/// The smallest Ethernet frame without its FCS; shorter announcements are zero-padded.
const MIN_FRAME: usize = 60;

/// A MAC address.
pub type Mac = [u8; 6];

/// The guest's addresses as its frames showed them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Neighbours {
    v4: Vec<(Mac, [u8; 4])>,
    v6: Vec<(Mac, [u8; 16])>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn take<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at + N)?.try_into().ok()
}

impl Neighbours {
    /// Learns from one frame the guest emitted (anything else it ignores: short, VLAN-tagged,
    /// multicast source, or not ARP/IPv4/IPv6).
    pub fn learn(&mut self, frame: &[u8]) {
        let Some(src) = take::<6>(frame, 6) else {
            return;
        };
        if src[0] & 1 != 0 || src == [0; 6] {
            return;
        }
        match be16(frame, 12) {
            Some(ETHERTYPE_ARP) => {
                // htype 1, ptype IPv4, hlen 6, plen 4; the sender's address at 14 + 14.
                let ok = be16(frame, ETH_HDR) == Some(1)
                    && be16(frame, ETH_HDR + 2) == Some(ETHERTYPE_IPV4)
                    && frame.get(ETH_HDR + 4..ETH_HDR + 6) == Some(&[6, 4]);
                if let (true, Some(ip)) = (ok, take::<4>(frame, ETH_HDR + 14)) {
                    self.add_v4(src, ip);
                }
            }
            Some(ETHERTYPE_IPV4) if frame.get(ETH_HDR).is_some_and(|v| v >> 4 == 4) => {
                if let Some(ip) = take::<4>(frame, ETH_HDR + 12) {
                    self.add_v4(src, ip);
                }
            }
            Some(ETHERTYPE_IPV6) if frame.get(ETH_HDR).is_some_and(|v| v >> 4 == 6) => {
                if let Some(ip) = take::<16>(frame, ETH_HDR + 8) {
                    self.add_v6(src, ip);
                }
            }
            _ => {}
        }
    }

    fn add_v4(&mut self, mac: Mac, ip: [u8; 4]) {
        let unicast = ip != [0; 4] && ip != [255; 4] && !(224..=239).contains(&ip[0]);
        if unicast && self.v4.len() < MAX_ADDRESSES && !self.v4.contains(&(mac, ip)) {
            self.v4.push((mac, ip));
        }
    }

    fn add_v6(&mut self, mac: Mac, ip: [u8; 16]) {
        let unicast = ip != [0; 16] && ip[0] != 0xff;
        if unicast && self.v6.len() < MAX_ADDRESSES && !self.v6.contains(&(mac, ip)) {
            self.v6.push((mac, ip));
        }
    }

    /// The IPv4 addresses learnt, with their MACs.
    pub fn ipv4(&self) -> &[(Mac, [u8; 4])] {
        &self.v4
    }

    /// The IPv6 addresses learnt, with their MACs.
    pub fn ipv6(&self) -> &[(Mac, [u8; 16])] {
        &self.v6
    }

    /// One announcement per address learnt: gratuitous ARPs, then unsolicited NAs.
    pub fn announcements(&self) -> Vec<Vec<u8>> {
        let v4 = self.v4.iter().map(|(m, ip)| gratuitous_arp(*m, *ip));
        let v6 = self.v6.iter().map(|(m, ip)| unsolicited_na(*m, *ip));
        v4.chain(v6).collect()
    }
}

/// A gratuitous ARP (an ARP announcement, RFC 5227): a broadcast ARP request from `mac` whose
/// sender and target protocol addresses are both `ip`; padded to 60 bytes.
pub fn gratuitous_arp(mac: Mac, ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&1u16.to_be_bytes()); // request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.resize(MIN_FRAME, 0);
    f
}

/// An unsolicited neighbour advertisement (RFC 4861 §7.2.6) for `ip` from `mac`: to the
/// all-nodes group, hop limit 255, override flag set, with the target link-layer address option.
pub fn unsolicited_na(mac: Mac, ip: [u8; 16]) -> Vec<u8> {
    const ICMP_LEN: u16 = 32; // type..checksum 4, flags 4, target 16, option 8
    let all_nodes: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let mut f = Vec::with_capacity(ETH_HDR + 40 + ICMP_LEN as usize);
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&ICMP_LEN.to_be_bytes());
    f.extend_from_slice(&[58, 255]); // next header ICMPv6, hop limit 255
    f.extend_from_slice(&ip);
    f.extend_from_slice(&all_nodes);
    let icmp = f.len();
    f.extend_from_slice(&[136, 0, 0, 0]); // NA, code 0, checksum later
    f.extend_from_slice(&0x2000_0000u32.to_be_bytes()); // override
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[2, 1]); // target link-layer address, 8 bytes
    f.extend_from_slice(&mac);
    let sum = icmpv6_checksum(&ip, &all_nodes, &f[icmp..]);
    f[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The ICMPv6 checksum of `body` (its checksum field zero) from `src` to `dst` (RFC 4443 §2.3).
pub fn icmpv6_checksum(src: &[u8; 16], dst: &[u8; 16], body: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            sum += u32::from(w);
        }
    };
    add(src);
    add(dst);
    add(&(body.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(body);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x00, 0x16, 0x3e, 0x12, 0x34, 0x56];

    #[test]
    fn gratuitous_arp_parses_as_an_arp_announcement() {
        let f = gratuitous_arp(MAC, [10, 9, 0, 2]);
        assert_eq!(f.len(), 60);
        let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = p.link else {
            panic!("no Ethernet header")
        };
        assert_eq!(eth.destination(), [0xff; 6]);
        assert_eq!(eth.source(), MAC);
        assert_eq!(eth.ether_type(), etherparse::EtherType(0x0806));
        // etherparse 0.16 has no ARP: the RFC 826 fields by offset.
        let arp = &f[14..42];
        assert_eq!(arp[..8], [0, 1, 8, 0, 6, 4, 0, 1], "Ethernet/IPv4 request");
        assert_eq!(arp[8..14], MAC, "sender hardware address");
        assert_eq!(arp[14..18], [10, 9, 0, 2], "sender protocol address");
        assert_eq!(arp[18..24], [0; 6], "target hardware address");
        assert_eq!(arp[24..28], [10, 9, 0, 2], "target protocol address");
        assert!(f[42..].iter().all(|&b| b == 0), "zero padding");
    }

    #[test]
    fn unsolicited_na_has_a_valid_checksum_and_the_override_flag() {
        let ip = [
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 2, 0x16, 0x3e, 0xff, 0xfe, 0x12, 0x34, 0x56,
        ];
        let f = unsolicited_na(MAC, ip);
        let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Ipv6(v6)) = &p.net else {
            panic!("not IPv6")
        };
        assert_eq!(v6.header().hop_limit(), 255);
        assert_eq!(v6.header().source(), ip);
        assert_eq!(v6.header().destination()[..2], [0xff, 2]);
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("not ICMPv6")
        };
        assert_eq!(icmp.type_u8(), 136);
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv6Type::Unknown {
                type_u8: 136,
                code_u8: 0,
                bytes5to8: [0x20, 0, 0, 0]
            }
        );
        // etherparse recomputes the checksum over the pseudo-header.
        let want = icmp
            .header()
            .icmp_type
            .calc_checksum(ip, v6.header().destination(), icmp.payload())
            .unwrap();
        assert_eq!(icmp.checksum(), want);
        assert_eq!(&icmp.payload()[..16], &ip);
        assert_eq!(
            &icmp.payload()[16..],
            &[2, 1, 0x00, 0x16, 0x3e, 0x12, 0x34, 0x56]
        );
    }

    #[test]
    fn learns_arp_ipv4_and_ipv6_sources_once_each() {
        let mut n = Neighbours::default();
        let arp = gratuitous_arp(MAC, [10, 9, 0, 2]);
        n.learn(&arp);
        n.learn(&arp);
        // An IPv4/UDP frame from the same guest, another address.
        let mut udp = Vec::new();
        etherparse::PacketBuilder::ethernet2(MAC, [2; 6])
            .ipv4([10, 9, 0, 3], [10, 9, 0, 1], 64)
            .udp(7, 9)
            .write(&mut udp, b"x")
            .unwrap();
        n.learn(&udp);
        let ip6 = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        n.learn(&unsolicited_na(MAC, ip6));
        assert_eq!(n.ipv4(), &[(MAC, [10, 9, 0, 2]), (MAC, [10, 9, 0, 3])]);
        assert_eq!(n.ipv6(), &[(MAC, ip6)]);
        let frames = n.announcements();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], arp);
    }

    #[test]
    fn ignores_multicast_sources_unspecified_addresses_and_short_frames() {
        let mut n = Neighbours::default();
        n.learn(&gratuitous_arp([1, 0, 0, 0, 0, 1], [10, 0, 0, 1]));
        n.learn(&gratuitous_arp(MAC, [0; 4]));
        n.learn(&unsolicited_na(MAC, [0; 16]));
        n.learn(&gratuitous_arp(MAC, [10, 0, 0, 1])[..20]);
        n.learn(&[]);
        assert_eq!(n, Neighbours::default());
    }

    #[test]
    fn keeps_at_most_max_addresses() {
        let mut n = Neighbours::default();
        for i in 0..100u8 {
            n.learn(&gratuitous_arp(MAC, [10, 0, 1, i + 1]));
        }
        assert_eq!(n.ipv4().len(), MAX_ADDRESSES);
        assert_eq!(n.ipv4()[0].1, [10, 0, 1, 1]);
    }

    proptest::proptest! {
        #[test]
        fn learning_from_any_bytes_never_panics(frame in proptest::collection::vec(0u8..=255, 0..128)) {
            let mut n = Neighbours::default();
            n.learn(&frame);
            proptest::prop_assert!(n.ipv4().len() + n.ipv6().len() <= 1);
        }
    }
}

//! Fuzz target: the TCP aligner (`colo_core::align`) fed arbitrary frames both ways, with
//! checkpoints and a takeover in between, must never panic, never change a frame's length, leave
//! frames it does not rewrite byte for byte as they were, and keep a TCP checksum that was valid
//! valid. A selector can first teach it the frame's own connection (a guest's SYN-ACK built for
//! the frame's addresses and ports), so the rewriting paths see arbitrary headers and options.
#![no_main]

use colo_core::{AlignConfig, Aligner};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use libfuzzer_sys::fuzz_target;

/// Whether `f` is a TCP segment with a right checksum (None: not a TCP segment).
fn tcp_checksum_ok(f: &[u8]) -> Option<bool> {
    let pkt = SlicedPacket::from_ethernet(f).ok()?;
    let Some(TransportSlice::Tcp(t)) = &pkt.transport else {
        return None;
    };
    let want = match &pkt.net {
        Some(NetSlice::Ipv4(s)) => t
            .calc_checksum_ipv4(s.header().source(), s.header().destination())
            .ok()?,
        Some(NetSlice::Ipv6(s)) => t
            .calc_checksum_ipv6(s.header().source(), s.header().destination())
            .ok()?,
        None => return None,
    };
    Some(t.checksum() == want)
}

/// The guest's SYN-ACK (ISN `isn`) of the connection `f` (a frame toward the guest) is on.
fn synack_for(f: &[u8], isn: u32) -> Option<Vec<u8>> {
    let pkt = SlicedPacket::from_ethernet(f).ok()?;
    let Some(TransportSlice::Tcp(t)) = &pkt.transport else {
        return None;
    };
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 9]);
    let b = match &pkt.net {
        Some(NetSlice::Ipv4(s)) => eth.ipv4(s.header().destination(), s.header().source(), 64),
        Some(NetSlice::Ipv6(s)) => eth.ipv6(s.header().destination(), s.header().source(), 64),
        None => return None,
    };
    let b = b
        .tcp(t.destination_port(), t.source_port(), isn, 1000)
        .syn()
        .ack(t.sequence_number());
    let mut out = Vec::new();
    b.write(&mut out, &[]).ok()?;
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let mut a = Aligner::new(AlignConfig {
        max_awaiting: 4,
        max_open: 4,
        max_closed: 4,
    });
    let mut rest = data;
    // Chunks: [op][len: u16 BE][frame].
    while let [op, l0, l1, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*l0, *l1])).min(tail.len());
        let (frame, next) = tail.split_at(len);
        rest = next;
        match op % 6 {
            4 => {
                a.checkpoint();
                continue;
            }
            5 => {
                a.take_over();
                continue;
            }
            _ => {}
        }
        if op % 6 == 2 {
            if let Some(mut s) = synack_for(frame, u32::from(*op) << 24 | 0x5a5a) {
                a.output(&mut s);
            }
        }
        let mut f = frame.to_vec();
        let valid = tcp_checksum_ok(frame);
        let changed = if op % 6 == 1 || op % 6 == 3 {
            a.output(&mut f)
        } else {
            a.input(&mut f)
        };
        assert_eq!(f.len(), frame.len(), "a rewrite changed the length");
        assert_eq!(changed, f != frame, "the return value says whether it changed");
        if changed {
            assert!(valid.is_some(), "a frame that is no TCP segment was changed");
        }
        if valid == Some(true) {
            assert_eq!(tcp_checksum_ok(&f), Some(true), "a valid checksum was broken");
        }
    }
});

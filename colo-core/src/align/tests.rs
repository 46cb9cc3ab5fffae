//! Tests of the TCP aligner: hand-built segments (etherparse) through `Aligner::input` /
//! `output`, checksums recomputed after every rewrite, and proptests.

use super::*;
use etherparse::{PacketBuilder, TcpOptionElement as Opt};
use proptest::prelude::*;

const MAC_G: [u8; 6] = [2, 0, 0, 0, 0, 2];
const MAC_C: [u8; 6] = [2, 0, 0, 0, 0, 9];
const GUEST4: [u8; 4] = [10, 0, 0, 2];
const CLIENT4: [u8; 4] = [10, 0, 0, 9];
const GUEST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const GPORT: u16 = 80;
const CPORT: u16 = 40000;

/// One hand-built segment.
#[derive(Debug, Clone)]
struct S {
    v6: bool,
    /// From the guest (true) or to it.
    out: bool,
    seq: u32,
    ack: Option<u32>,
    syn: bool,
    fin: bool,
    rst: bool,
    opts: Vec<Opt>,
    raw_opts: Option<Vec<u8>>,
    data: Vec<u8>,
    cport: u16,
}

fn seg(out: bool, seq: u32, ack: Option<u32>) -> S {
    S {
        v6: false,
        out,
        seq,
        ack,
        syn: false,
        fin: false,
        rst: false,
        opts: Vec::new(),
        raw_opts: None,
        data: Vec::new(),
        cport: CPORT,
    }
}

impl S {
    fn syn(mut self) -> Self {
        self.syn = true;
        self
    }
    fn fin(mut self) -> Self {
        self.fin = true;
        self
    }
    fn rst(mut self) -> Self {
        self.rst = true;
        self
    }
    fn v6(mut self) -> Self {
        self.v6 = true;
        self
    }
    fn data(mut self, d: &[u8]) -> Self {
        self.data = d.to_vec();
        self
    }
    fn opts(mut self, o: &[Opt]) -> Self {
        self.opts = o.to_vec();
        self
    }
    fn raw(mut self, o: &[u8]) -> Self {
        self.raw_opts = Some(o.to_vec());
        self
    }
    fn port(mut self, p: u16) -> Self {
        self.cport = p;
        self
    }

    fn build(&self) -> Vec<u8> {
        let (smac, dmac) = if self.out {
            (MAC_G, MAC_C)
        } else {
            (MAC_C, MAC_G)
        };
        let (sport, dport) = if self.out {
            (GPORT, self.cport)
        } else {
            (self.cport, GPORT)
        };
        let eth = PacketBuilder::ethernet2(smac, dmac);
        let ip = if self.v6 {
            let (s, d) = if self.out {
                (GUEST6, CLIENT6)
            } else {
                (CLIENT6, GUEST6)
            };
            eth.ipv6(s, d, 64)
        } else {
            let (s, d) = if self.out {
                (GUEST4, CLIENT4)
            } else {
                (CLIENT4, GUEST4)
            };
            eth.ipv4(s, d, 64)
        };
        let mut b = ip.tcp(sport, dport, self.seq, 64000);
        if self.syn {
            b = b.syn();
        }
        if self.fin {
            b = b.fin();
        }
        if self.rst {
            b = b.rst();
        }
        if let Some(a) = self.ack {
            b = b.ack(a);
        }
        let b = match &self.raw_opts {
            Some(r) => b.options_raw(r),
            None => b.options(&self.opts),
        }
        .unwrap_or_else(|e| panic!("{e}"));
        let mut f = Vec::new();
        b.write(&mut f, &self.data)
            .unwrap_or_else(|e| panic!("{e}"));
        f
    }
}

/// What a frame says, read back with etherparse.
#[derive(Debug, PartialEq, Eq)]
struct Read {
    seq: u32,
    ack: u32,
    ts: Option<(u32, u32)>,
    sack: Vec<(u32, u32)>,
    checksum_ok: bool,
}

/// Whether `f` is a TCP segment whose checksum is right (None: not a TCP segment).
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

fn read(f: &[u8]) -> Read {
    let pkt = SlicedPacket::from_ethernet(f).unwrap_or_else(|e| panic!("{e}"));
    let Some(TransportSlice::Tcp(t)) = pkt.transport else {
        panic!("not tcp")
    };
    let mut ts = None;
    let mut sack = Vec::new();
    for o in t.options_iterator() {
        match o {
            Ok(Opt::Timestamp(v, e)) => ts = Some((v, e)),
            Ok(Opt::SelectiveAcknowledgement(first, rest)) => {
                sack.push(first);
                sack.extend(rest.iter().flatten());
            }
            _ => {}
        }
    }
    Read {
        seq: t.sequence_number(),
        ack: t.acknowledgment_number(),
        ts,
        sack,
        checksum_ok: tcp_checksum_ok(f) == Some(true),
    }
}

/// Runs `s` through the aligner; returns the frame after and whether it changed.
fn run(a: &mut Aligner, s: &S) -> (Vec<u8>, bool) {
    let mut f = s.build();
    let before = f.clone();
    let changed = if s.out {
        a.output(&mut f)
    } else {
        a.input(&mut f)
    };
    assert_eq!(
        changed,
        f != before,
        "the return value says whether it changed"
    );
    assert!(read(&f).checksum_ok, "checksum valid after {s:?}");
    (f, changed)
}

fn aligner() -> Aligner {
    Aligner::new(AlignConfig::default())
}

const C: u32 = 7_000; // the client's ISN
const S_ISN: u32 = 1_000_000; // the SVM's ISN
const P_ISN: u32 = 3_000_000; // the PVM's ISN

/// A handshake where the guest accepts: the SVM's SYN-ACK out, the client's ACK of the PVM's
/// SYN-ACK in.
fn accept(a: &mut Aligner, s: u32, p: u32, v6: bool) {
    let mut synack = seg(true, s, Some(C + 1)).syn();
    let mut ackseg = seg(false, C + 1, Some(p.wrapping_add(1)));
    if v6 {
        synack = synack.v6();
        ackseg = ackseg.v6();
    }
    let (_, changed) = run(a, &synack);
    assert!(!changed, "the SVM's SYN-ACK leaves as it is");
    let (f, changed) = run(a, &ackseg);
    assert_eq!(changed, s != p);
    assert_eq!(
        read(&f).ack,
        s.wrapping_add(1),
        "the ACK now acks the SVM's SYN"
    );
}

#[test]
fn learns_from_syn_ack_and_handshake_ack_then_rewrites_both_ways() {
    let mut a = aligner();
    accept(&mut a, S_ISN, P_ISN, false);
    assert_eq!(a.stats().aligned, 1);
    // The client's data, acking nothing new: its ack moves into the SVM's space.
    let (f, _) = run(&mut a, &seg(false, C + 1, Some(P_ISN + 1)).data(b"GET /"));
    assert_eq!(read(&f).ack, S_ISN + 1);
    assert_eq!(
        read(&f).seq,
        C + 1,
        "the client's own numbers are untouched"
    );
    // The SVM's answer goes to the comparator unchanged while the pair runs...
    let out = seg(true, S_ISN + 1, Some(C + 6)).data(b"200 OK");
    let (f, changed) = run(&mut a, &out);
    assert!(!changed);
    assert_eq!(read(&f).seq, S_ISN + 1);
    // ...and to the client in the PVM's space once serving.
    a.take_over();
    let (f, changed) = run(&mut a, &out);
    assert!(changed);
    assert_eq!(read(&f).seq, P_ISN + 1);
    assert_eq!(read(&f).ack, C + 6, "the ack is the client's space");
    let (f, _) = run(&mut a, &seg(false, C + 6, Some(P_ISN + 7)));
    assert_eq!(read(&f).ack, S_ISN + 7);
    assert_eq!(a.stats().rewritten_in, 3);
    assert_eq!(a.stats().rewritten_out, 1);
}

#[test]
fn learns_when_the_guest_opens_the_connection() {
    let mut a = aligner();
    let (_, changed) = run(&mut a, &seg(true, S_ISN, None).syn());
    assert!(!changed);
    // The server's SYN-ACK acks the PVM's SYN.
    let (f, changed) = run(&mut a, &seg(false, C, Some(P_ISN + 1)).syn());
    assert!(changed);
    assert_eq!(read(&f).ack, S_ISN + 1);
    let (f, _) = run(&mut a, &seg(false, C + 1, Some(P_ISN + 11)).data(b"x"));
    assert_eq!(read(&f).ack, S_ISN + 11);
}

#[test]
fn a_refused_connect_is_reset_in_the_svm_space() {
    let mut a = aligner();
    run(&mut a, &seg(true, S_ISN, None).syn());
    // RST+ACK acking the PVM's SYN: the SVM accepts it only with its own ISN + 1.
    let (f, changed) = run(&mut a, &seg(false, 0, Some(P_ISN + 1)).rst());
    assert!(changed);
    assert_eq!(read(&f).ack, S_ISN + 1);
}

#[test]
fn wraparound_at_2_pow_32() {
    let s = u32::MAX - 5;
    let p = 10;
    let mut a = aligner();
    accept(&mut a, s, p, false);
    // 100 bytes later the client's ack and the SVM's sequence numbers have wrapped.
    let (f, _) = run(&mut a, &seg(false, C + 1, Some(p + 101)));
    assert_eq!(read(&f).ack, s.wrapping_add(101));
    a.take_over();
    let (f, _) = run(
        &mut a,
        &seg(true, s.wrapping_add(101), Some(C + 1)).data(b"z"),
    );
    assert_eq!(read(&f).seq, p + 101);
    // And the other way round: the PVM's space wraps, the SVM's does not.
    let mut b = aligner();
    accept(&mut b, 10, u32::MAX - 5, false);
    let (f, _) = run(
        &mut b,
        &seg(false, C + 1, Some((u32::MAX - 5).wrapping_add(101))),
    );
    assert_eq!(read(&f).ack, 111);
}

#[test]
fn retransmissions_are_rewritten_alike() {
    let mut a = aligner();
    // The SVM retransmits its SYN-ACK: still one entry, same ISN.
    run(&mut a, &seg(true, S_ISN, Some(C + 1)).syn());
    run(&mut a, &seg(true, S_ISN, Some(C + 1)).syn());
    // The client retransmits its SYN meanwhile: the entry waits on.
    run(&mut a, &seg(false, C, None).syn());
    assert_eq!(a.tracked(), 1);
    let ack = seg(false, C + 1, Some(P_ISN + 1));
    let (first, _) = run(&mut a, &ack);
    let (again, _) = run(&mut a, &ack);
    assert_eq!(
        first, again,
        "a retransmitted ACK is rewritten the same way"
    );
    let data = seg(false, C + 1, Some(P_ISN + 1)).data(b"abc");
    assert_eq!(run(&mut a, &data).0, run(&mut a, &data).0);
    assert_eq!(a.stats().aligned, 1);
    // Once serving, a late retransmission of the SVM's SYN-ACK carries the PVM's ISN.
    a.take_over();
    let (f, _) = run(&mut a, &seg(true, S_ISN, Some(C + 1)).syn());
    assert_eq!(read(&f).seq, P_ISN);
    // A guest's SYN-ACK with a new ISN before the handshake completes replaces the old one.
    let mut b = aligner();
    run(&mut b, &seg(true, 5, Some(C + 1)).syn());
    run(&mut b, &seg(true, S_ISN, Some(C + 1)).syn());
    let (f, _) = run(&mut b, &seg(false, C + 1, Some(P_ISN + 1)));
    assert_eq!(read(&f).ack, S_ISN + 1);
}

#[test]
fn rst_closes_and_a_new_syn_forgets() {
    let mut a = aligner();
    accept(&mut a, S_ISN, P_ISN, false);
    let rst = seg(false, C + 1, Some(P_ISN + 1)).rst();
    let (f, changed) = run(&mut a, &rst);
    assert!(changed, "an RST+ACK is rewritten (the SVM checks its ack)");
    assert_eq!(read(&f).ack, S_ISN + 1);
    // Closed: a retransmitted RST is still rewritten.
    assert!(run(&mut a, &rst).1);
    // A client's new SYN on the same ports: the offset is void, the new handshake teaches anew.
    assert!(!run(&mut a, &seg(false, C + 100, None).syn()).1);
    assert_eq!(a.tracked(), 0);
    accept(&mut a, 77, 99, false);
    // An RST from the guest before the handshake completes forgets the entry.
    let mut b = aligner();
    run(&mut b, &seg(true, S_ISN, Some(C + 1)).syn());
    run(&mut b, &seg(true, S_ISN + 1, Some(C + 1)).rst());
    assert_eq!(b.tracked(), 0);
    assert!(!run(&mut b, &seg(false, C + 1, Some(P_ISN + 1))).1);
    // So does the client's RST without ACK.
    let mut c = aligner();
    run(&mut c, &seg(true, S_ISN, Some(C + 1)).syn());
    run(&mut c, &seg(false, C + 1, None).rst());
    assert_eq!(c.tracked(), 0);
}

#[test]
fn fin_both_ways_closes_but_retransmissions_stay_aligned() {
    let mut a = aligner();
    accept(&mut a, S_ISN, P_ISN, false);
    a.take_over();
    let fin_out = seg(true, S_ISN + 1, Some(C + 1)).fin();
    let (f, _) = run(&mut a, &fin_out);
    assert_eq!(read(&f).seq, P_ISN + 1);
    let fin_in = seg(false, C + 1, Some(P_ISN + 2)).fin();
    let (f, _) = run(&mut a, &fin_in);
    assert_eq!(read(&f).ack, S_ISN + 2);
    assert!(matches!(
        a.conns.values().next().map(|c| c.state),
        Some(ConnState::AwaitingReuse { .. })
    ));
    // TIME_WAIT: the client retransmits its FIN, the guest re-ACKs.
    assert_eq!(read(&run(&mut a, &fin_in).0).ack, S_ISN + 2);
    let last_ack = seg(true, S_ISN + 2, Some(C + 2));
    assert_eq!(read(&run(&mut a, &last_ack).0).seq, P_ISN + 2);
    // The guest opens a new connection on the same ports later: learned anew.
    run(&mut a, &seg(true, 42, None).syn());
    let (f, _) = run(&mut a, &seg(false, 9, Some(1001)).syn());
    assert_eq!(read(&f).ack, 43);
}

#[test]
fn sack_blocks_in_input_are_moved_too() {
    let mut a = aligner();
    accept(&mut a, S_ISN, P_ISN, false);
    let sack = Opt::SelectiveAcknowledgement(
        (P_ISN + 101, P_ISN + 201),
        [Some((P_ISN + 301, P_ISN + 401)), Some((u32::MAX, 3)), None],
    );
    let s = seg(false, C + 1, Some(P_ISN + 1)).opts(&[Opt::Noop, Opt::Noop, sack]);
    let (f, _) = run(&mut a, &s);
    let d = S_ISN.wrapping_sub(P_ISN);
    assert_eq!(
        read(&f).sack,
        vec![
            (S_ISN + 101, S_ISN + 201),
            (S_ISN + 301, S_ISN + 401),
            (u32::MAX.wrapping_add(d), 3u32.wrapping_add(d)),
        ]
    );
    // A SACK block at an odd offset (one NOP before the option): the 16-bit checksum words
    // straddle its fields.
    let mut raw = vec![OPT_NOP, OPT_SACK, 10];
    raw.extend_from_slice(&(P_ISN + 5).to_be_bytes());
    raw.extend_from_slice(&(P_ISN + 9).to_be_bytes());
    raw.push(OPT_NOP);
    let s = seg(false, C + 1, Some(P_ISN + 1)).raw(&raw).data(b"odd");
    let (f, _) = run(&mut a, &s);
    assert_eq!(read(&f).sack, vec![(S_ISN + 5, S_ISN + 9)]);
    // SACK blocks in the guest's output acknowledge the client's bytes: untouched.
    a.take_over();
    let s = seg(true, S_ISN + 1, Some(C + 1)).opts(&[
        Opt::Noop,
        Opt::Noop,
        Opt::SelectiveAcknowledgement((C + 10, C + 20), [None; 3]),
    ]);
    assert_eq!(read(&run(&mut a, &s).0).sack, vec![(C + 10, C + 20)]);
}

#[test]
fn timestamps_are_aligned_like_sequence_numbers() {
    let (svm_ts, pvm_ts, client_ts) = (90_000u32, 5_000u32, 777u32);
    let mut a = aligner();
    let ts = |v, e| [Opt::Noop, Opt::Noop, Opt::Timestamp(v, e)];
    run(
        &mut a,
        &seg(true, S_ISN, Some(C + 1))
            .syn()
            .opts(&ts(svm_ts, client_ts)),
    );
    // The client echoes the PVM's TSval.
    let (f, _) = run(
        &mut a,
        &seg(false, C + 1, Some(P_ISN + 1)).opts(&ts(client_ts + 1, pvm_ts)),
    );
    assert_eq!(read(&f).ts, Some((client_ts + 1, svm_ts)));
    let (f, _) = run(
        &mut a,
        &seg(false, C + 1, Some(P_ISN + 1)).opts(&ts(client_ts + 2, pvm_ts + 40)),
    );
    assert_eq!(read(&f).ts, Some((client_ts + 2, svm_ts + 40)));
    // A zero echo stays zero.
    let (f, _) = run(
        &mut a,
        &seg(false, C + 1, Some(P_ISN + 1)).opts(&ts(client_ts + 3, 0)),
    );
    assert_eq!(read(&f).ts, Some((client_ts + 3, 0)));
    // Serving: the guest's TSval moves to the PVM's clock, its echo stays the client's.
    a.take_over();
    let (f, _) = run(
        &mut a,
        &seg(true, S_ISN + 1, Some(C + 1)).opts(&ts(svm_ts + 50, client_ts + 3)),
    );
    assert_eq!(read(&f).ts, Some((pvm_ts + 50, client_ts + 3)));
    assert_eq!(read(&f).seq, P_ISN + 1);
}

#[test]
fn timestamps_only_on_one_side_are_left_alone() {
    let mut a = aligner();
    run(&mut a, &seg(true, S_ISN, Some(C + 1)).syn());
    let o = [Opt::Noop, Opt::Noop, Opt::Timestamp(1, 2)];
    let (f, _) = run(&mut a, &seg(false, C + 1, Some(P_ISN + 1)).opts(&o));
    assert_eq!(read(&f).ts, Some((1, 2)));
    assert_eq!(read(&f).ack, S_ISN + 1);
}

#[test]
fn ipv6_is_aligned_and_v4_v6_keys_differ() {
    let mut a = aligner();
    accept(&mut a, S_ISN, P_ISN, true);
    let (f, _) = run(&mut a, &seg(false, C + 1, Some(P_ISN + 9)).v6().data(b"q"));
    assert_eq!(read(&f).ack, S_ISN + 9);
    // The same ports over IPv4 are another connection, unknown.
    assert!(!run(&mut a, &seg(false, C + 1, Some(P_ISN + 9))).1);
    a.take_over();
    let (f, _) = run(&mut a, &seg(true, S_ISN + 1, Some(C + 2)).v6().data(b"r"));
    assert_eq!(read(&f).seq, P_ISN + 1);
}

#[test]
fn an_ipv6_extension_header_is_walked() {
    // Hop-by-hop options before TCP: the header is found behind it.
    let mut a = aligner();
    accept(&mut a, S_ISN, P_ISN, true);
    let plain = seg(false, C + 1, Some(P_ISN + 1)).v6().build();
    let mut f = plain[..14 + 40].to_vec();
    f[14 + 6] = 0; // next header: hop-by-hop
    let payload_len = u16::from_be_bytes([f[14 + 4], f[14 + 5]]) + 8;
    f[14 + 4..14 + 6].copy_from_slice(&payload_len.to_be_bytes());
    f.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // next: TCP; PadN
    f.extend_from_slice(&plain[14 + 40..]);
    let before = f.clone();
    assert!(a.input(&mut f));
    assert!(read(&f).checksum_ok);
    assert_eq!(read(&f).ack, S_ISN + 1);
    assert_eq!(read(&before).ack, P_ISN + 1);
}

#[test]
fn zero_offset_is_forgotten() {
    let mut a = aligner();
    accept(&mut a, S_ISN, S_ISN, false);
    assert_eq!(a.tracked(), 0);
    assert_eq!(a.stats().aligned, 0);
}

#[test]
fn checkpoint_drops_takeover_keeps() {
    let mut a = aligner();
    accept(&mut a, S_ISN, P_ISN, false);
    run(&mut a, &seg(true, 5, Some(1)).syn().port(1234));
    assert_eq!(a.tracked(), 2);
    a.checkpoint();
    assert_eq!(a.tracked(), 0);
    assert_eq!(a.stats().dropped_at_checkpoint, 2);
    // After the checkpoint the SVM continues the PVM's space: input passes unchanged.
    assert!(!run(&mut a, &seg(false, C + 1, Some(P_ISN + 1))).1);
    accept(&mut a, S_ISN, P_ISN, false);
    a.take_over();
    assert!(a.serving());
    assert_eq!(a.tracked(), 1);
    assert!(run(&mut a, &seg(false, C + 1, Some(P_ISN + 1))).1);
}

#[test]
fn other_frames_pass_untouched() {
    let mut a = aligner();
    accept(&mut a, S_ISN, P_ISN, false);
    a.take_over();
    // UDP between the same addresses and ports (the mock's kv service).
    let mut udp = Vec::new();
    PacketBuilder::ethernet2(MAC_C, MAC_G)
        .ipv4(CLIENT4, GUEST4, 64)
        .udp(CPORT, GPORT)
        .write(&mut udp, b"kv")
        .unwrap_or_else(|e| panic!("{e}"));
    let tcp_in = seg(false, C + 1, Some(P_ISN + 1))
        .data(b"0123456789")
        .build();
    let tcp_out = seg(true, S_ISN + 1, Some(C + 1))
        .data(b"0123456789")
        .build();
    let mut frames = vec![udp, Vec::new(), vec![0x45; 40], vec![0xff; 14]];
    // Every truncation of aligned TCP segments (their IP lengths then disagree).
    for t in [&tcp_in, &tcp_out] {
        for n in 0..t.len() {
            frames.push(t[..n].to_vec());
        }
    }
    // An IPv4 fragment (more-fragments set).
    let mut frag = tcp_in.clone();
    frag[14 + 6] |= 0x20;
    frames.push(frag);
    for f in frames {
        for output in [false, true] {
            let mut g = f.clone();
            let changed = if output {
                a.output(&mut g)
            } else {
                a.input(&mut g)
            };
            assert!(!changed && g == f, "{f:?} changed");
        }
    }
}

#[test]
fn a_syn_flood_evicts_only_half_open_entries() {
    let mut a = Aligner::new(AlignConfig {
        max_awaiting: 4,
        max_open: 2,
        max_closed: 1,
    });
    accept(&mut a, S_ISN, P_ISN, false);
    for p in 0..100 {
        run(&mut a, &seg(true, p, Some(1)).syn().port(1000 + p as u16));
    }
    assert_eq!(a.tracked(), 5, "4 half-open + the aligned one");
    assert_eq!(a.stats().evicted, 96);
    assert!(
        run(&mut a, &seg(false, C + 1, Some(P_ISN + 1))).1,
        "still aligned"
    );
    // The newest half-open entries survived, the oldest went first.
    assert!(run(&mut a, &seg(false, 1, Some(1000)).port(1099)).1);
    assert!(!run(&mut a, &seg(false, 1, Some(1000)).port(1000)).1);
    // Open connections beyond the cap evict the oldest open one.
    let mut b = Aligner::new(AlignConfig {
        max_awaiting: 4,
        max_open: 2,
        max_closed: 1,
    });
    for p in 0..3u16 {
        run(&mut b, &seg(true, 100, Some(C + 1)).syn().port(p));
        run(&mut b, &seg(false, C + 1, Some(201)).port(p));
    }
    assert_eq!(b.tracked(), 2);
    assert!(!run(&mut b, &seg(false, C + 1, Some(201)).port(0)).1);
    assert!(run(&mut b, &seg(false, C + 1, Some(201)).port(2)).1);
}

#[test]
fn incremental_checksum_matches_rfc1624_corner_cases() {
    // Fields whose old or new value is all ones or all zeros.
    for (s, p) in [
        (0, u32::MAX),
        (u32::MAX, 0),
        (0xffff_0000, 0x0000_ffff),
        (1, 0),
    ] {
        let mut a = aligner();
        accept(&mut a, s, p, false);
        for ack in [0u32, u32::MAX, 0xffff, 0xffff_0000] {
            let (f, _) = run(&mut a, &seg(false, C + 1, Some(ack)).data(&[0xff; 7]));
            assert_eq!(read(&f).ack, ack.wrapping_add(s.wrapping_sub(p)));
        }
    }
}

/// A segment of an arbitrary stream, for the proptests: (from the guest, offset in the guest's
/// stream, offset in the client's, payload, a SACK block, flags selector).
type ArbSeg = (bool, u32, u32, Vec<u8>, Option<(u32, u32)>, u8);

fn arb_seg() -> impl Strategy<Value = ArbSeg> {
    (
        any::<bool>(),
        0u32..100_000,
        0u32..100_000,
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::option::of((any::<u32>(), any::<u32>())),
        0u8..4,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// For arbitrary ISNs and segment streams: every rewrite keeps the checksum valid, input
    /// adds the offset to acks (and SACK edges, and TSecr), output subtracts it from sequence
    /// numbers (and TSval), so output(input(x)) = x.
    #[test]
    fn rewrites_are_inverse_and_keep_checksums(
        s in any::<u32>(),
        p in any::<u32>(),
        (sv, pv) in (any::<u32>(), any::<u32>()),
        v6 in any::<bool>(),
        stream in proptest::collection::vec(arb_seg(), 1..20),
    ) {
        let mut a = aligner();
        let tso = |v, e| vec![Opt::Noop, Opt::Noop, Opt::Timestamp(v, e)];
        let mut synack = seg(true, s, Some(C + 1)).syn().opts(&tso(sv, 1));
        let mut ackseg = seg(false, C + 1, Some(p.wrapping_add(1))).opts(&tso(2, pv));
        if v6 {
            synack = synack.v6();
            ackseg = ackseg.v6();
        }
        run(&mut a, &synack);
        run(&mut a, &ackseg);
        a.take_over();
        let off = s.wrapping_sub(p);
        let ts_off = if pv == 0 { 0 } else { sv.wrapping_sub(pv) };
        for (out, k, j, data, sack, fl) in stream {
            let mut x = if out {
                seg(true, s.wrapping_add(k), Some(C + 1 + j))
            } else {
                seg(false, C + 1 + j, Some(p.wrapping_add(k)))
            };
            if v6 {
                x = x.v6();
            }
            let mut opts = vec![Opt::Noop, Opt::Noop, Opt::Timestamp(k, j.max(1))];
            if let Some((l, r)) = sack {
                opts.extend([Opt::Noop, Opt::Noop, Opt::SelectiveAcknowledgement((l, r), [None; 3])]);
            }
            x = x.data(&data).opts(&opts);
            x.fin = fl == 1;
            let (f, _) = run(&mut a, &x);
            let r = read(&f);
            if out {
                prop_assert_eq!(r.seq, s.wrapping_add(k).wrapping_sub(off));
                prop_assert_eq!(r.ts, Some((k.wrapping_sub(ts_off), j.max(1))));
                prop_assert_eq!(r.sack, sack.into_iter().collect::<Vec<_>>());
                // Back into the guest's space as the client's ack of it: the SVM's number.
                let echo = seg(false, C + 1, Some(r.seq)).opts(&tso(1, k.wrapping_sub(ts_off)));
                let echo = if v6 { echo.v6() } else { echo };
                let (g, _) = run(&mut a, &echo);
                prop_assert_eq!(read(&g).ack, s.wrapping_add(k));
                if k.wrapping_sub(ts_off) != 0 {
                    prop_assert_eq!(read(&g).ts.map(|t| t.1), Some(k));
                }
            } else {
                prop_assert_eq!(r.ack, p.wrapping_add(k).wrapping_add(off));
                prop_assert_eq!(r.seq, C + 1 + j);
                prop_assert_eq!(r.ts, Some((k, j.max(1).wrapping_add(ts_off))));
                let want: Vec<_> = sack
                    .into_iter()
                    .map(|(l, r)| (l.wrapping_add(off), r.wrapping_add(off)))
                    .collect();
                prop_assert_eq!(r.sack, want);
            }
        }
    }

    /// Arbitrary bytes, and arbitrary corruptions of a valid aligned segment, never panic;
    /// whatever is rewritten keeps a valid checksum if it had one, and keeps its length.
    #[test]
    fn never_panics_and_keeps_checksums(
        noise in proptest::collection::vec(any::<u8>(), 0..200),
        flips in proptest::collection::vec((0usize..120, any::<u8>()), 0..4),
        cut in 0usize..130,
    ) {
        let mut a = aligner();
        accept(&mut a, S_ISN, P_ISN, false);
        for output in [false, true] {
            let mut f = noise.clone();
            let changed = if output { a.output(&mut f) } else { a.input(&mut f) };
            prop_assert_eq!(f.len(), noise.len());
            if !changed {
                prop_assert_eq!(&f, &noise);
            }
        }
        a.take_over();
        let mut f = seg(false, C + 1, Some(P_ISN + 1))
            .opts(&[Opt::Noop, Opt::Noop, Opt::SelectiveAcknowledgement((P_ISN, P_ISN + 9), [None; 3])])
            .data(b"hello")
            .build();
        for (i, b) in flips {
            if let Some(x) = f.get_mut(i) {
                *x = b;
            }
        }
        f.truncate(cut.max(1));
        let valid_before = tcp_checksum_ok(&f);
        let len = f.len();
        a.input(&mut f);
        a.output(&mut f);
        prop_assert_eq!(f.len(), len);
        if valid_before == Some(true) {
            prop_assert_eq!(tcp_checksum_ok(&f), Some(true));
        }
    }
}

//! Comparator unit tests with hand-built frames (etherparse builders): TCP stream semantics,
//! datagram pairing, pass-through, timeouts, queue bound and checkpoint epochs.

use std::time::{Duration, Instant};

use colo_core::compare::{CheckpointReason, Comparator, CompareConfig};
use etherparse::PacketBuilder;

const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const VM_IP: [u8; 4] = [10, 0, 0, 1];
const CLIENT_IP: [u8; 4] = [10, 0, 0, 2];

#[derive(Clone, Copy, Default)]
struct Flags {
    syn: bool,
    fin: bool,
    rst: bool,
    ack: Option<u32>,
}

const DATA: Flags = Flags {
    syn: false,
    fin: false,
    rst: false,
    ack: Some(7000),
};

fn tcp(sport: u16, seq: u32, flags: Flags, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv4(VM_IP, CLIENT_IP, 64)
        .tcp(sport, 40000, seq, 65535);
    if flags.syn {
        b = b.syn();
    }
    if flags.fin {
        b = b.fin();
    }
    if flags.rst {
        b = b.rst();
    }
    if let Some(a) = flags.ack {
        b = b.ack(a);
    }
    let mut f = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut f, payload).expect("building a test frame");
    f
}

fn udp(sport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv4(VM_IP, CLIENT_IP, 64)
        .udp(sport, 53);
    let mut f = Vec::new();
    b.write(&mut f, payload).expect("building a test frame");
    f
}

fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&VM_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&[0; 20]);
    f
}

/// A comparator with a simulated clock.
struct H {
    c: Comparator,
    t0: Instant,
    now: Instant,
}

impl H {
    fn new() -> Self {
        Self::with(CompareConfig::default())
    }
    fn with(cfg: CompareConfig) -> Self {
        let t0 = Instant::now();
        H {
            c: Comparator::new(cfg),
            t0,
            now: t0,
        }
    }
    fn p(&mut self, f: &[u8]) {
        self.c.push_primary(self.now, f.to_vec());
    }
    fn s(&mut self, f: &[u8]) {
        let e = self.c.epoch();
        self.c.push_secondary(self.now, e, f.to_vec());
    }
    fn drain(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        self.c.drain_released(&mut out);
        out
    }
    fn wanted(&self) -> Option<CheckpointReason> {
        self.c.checkpoint_wanted(self.now)
    }
}

#[test]
fn tcp_different_segmentation_and_isn() {
    let mut h = H::new();
    let syn = Flags { syn: true, ..DATA };
    let p = [
        tcp(80, 1000, syn, b""),
        tcp(80, 1001, DATA, b"hello "),
        tcp(80, 1007, DATA, b"world!"),
        tcp(80, 1013, Flags { fin: true, ..DATA }, b""),
    ];
    for f in &p {
        h.p(f);
    }
    assert!(h.drain().is_empty(), "nothing leaves before the SVM agrees");
    let isn = 4_000_000_000u32; // wraps around 2^32 within the stream
    h.s(&tcp(80, isn, syn, b""));
    h.s(&tcp(80, isn.wrapping_add(1), DATA, b"hell"));
    assert_eq!(
        h.drain(),
        p[..1].to_vec(),
        "the SYN matched; 'hello ' is half covered"
    );
    h.s(&tcp(80, isn.wrapping_add(5), DATA, b"o wo"));
    assert_eq!(h.drain(), p[1..2].to_vec());
    h.s(&tcp(
        80,
        isn.wrapping_add(9),
        Flags { fin: true, ..DATA },
        b"rld!",
    ));
    assert_eq!(h.drain(), p[2..].to_vec());
    assert_eq!(h.wanted(), None);
    let st = h.c.stats();
    assert_eq!(
        (st.released, st.mismatches, st.held, st.svm_waiting),
        (4, 0, 0, 0)
    );
    assert_eq!(st.tcp_bytes_matched, 1 + 12 + 1);
}

#[test]
fn tcp_retransmissions_are_not_mismatches() {
    let mut h = H::new();
    let a = tcp(80, 100, DATA, b"abcd");
    let b = tcp(80, 104, DATA, b"efgh");
    let ab = tcp(80, 100, DATA, b"abcdefgh"); // repacketized retransmission
    h.p(&a);
    h.p(&a);
    h.p(&b);
    h.s(&a);
    h.s(&b);
    h.p(&ab);
    h.s(&ab);
    h.s(&a);
    assert_eq!(h.drain(), vec![a.clone(), a.clone(), b.clone(), ab]);
    assert_eq!(h.wanted(), None);
    assert_eq!(
        h.c.stats().svm_waiting,
        0,
        "retransmitted SVM bytes already verified are dropped"
    );
}

#[test]
fn tcp_mismatch_in_last_byte() {
    let mut h = H::new();
    h.p(&tcp(80, 100, DATA, b"abcdefgh"));
    h.s(&tcp(80, 100, DATA, b"abcdefgX"));
    assert_eq!(h.wanted(), Some(CheckpointReason::Mismatch));
    assert!(h.drain().is_empty());
    assert_eq!(h.c.stats().mismatches, 1);
}

#[test]
fn tcp_flags_must_agree() {
    // FIN on one side, data on the other at the same offset.
    let mut h = H::new();
    h.p(&tcp(80, 100, Flags { fin: true, ..DATA }, b"ab"));
    h.s(&tcp(80, 100, DATA, b"abc"));
    assert_eq!(h.wanted(), Some(CheckpointReason::Mismatch));
    // SYN against data.
    let mut h = H::new();
    h.p(&tcp(80, 100, Flags { syn: true, ..DATA }, b""));
    h.s(&tcp(80, 100, Flags { syn: true, ..DATA }, b""));
    h.p(&tcp(80, 101, DATA, b"x"));
    h.s(&tcp(80, 100, Flags { syn: true, ..DATA }, b""));
    h.s(&tcp(80, 101, DATA, b"x"));
    assert_eq!(
        h.drain().len(),
        2,
        "a retransmitted SYN is not a difference"
    );
    assert_eq!(h.wanted(), None);
    // A RST is held until the SVM resets too.
    let rst = tcp(80, 101, Flags { rst: true, ..DATA }, b"");
    h.p(&rst);
    assert!(h.drain().is_empty());
    h.s(&rst);
    assert_eq!(h.drain(), vec![rst]);
    assert_eq!(h.c.stats().svm_waiting, 0);
}

#[test]
fn tcp_ack_needs_the_svm_to_have_acknowledged_as_much() {
    let mut h = H::new();
    let ack = |a| Flags {
        ack: Some(a),
        ..DATA
    };
    h.p(&tcp(80, 100, ack(5000), b"abc"));
    h.p(&tcp(80, 103, ack(5100), b"")); // pure ACK
    h.s(&tcp(80, 100, ack(5000), b"abc"));
    assert_eq!(
        h.drain().len(),
        1,
        "the pure ACK waits: the SVM has acknowledged only 5000"
    );
    h.s(&tcp(80, 103, ack(5200), b""));
    assert_eq!(h.drain().len(), 1);
    assert_eq!(h.wanted(), None);
}

#[test]
fn reordering_across_connections_keeps_pvm_order() {
    let mut h = H::new();
    let a1 = tcp(80, 100, DATA, b"a1");
    let b1 = udp(9, b"b1");
    let a2 = tcp(80, 102, DATA, b"a2");
    let b2 = udp(9, b"b2");
    for f in [&a1, &b1, &a2, &b2] {
        h.p(f);
    }
    h.s(&b1);
    h.s(&b2);
    assert!(h.drain().is_empty(), "b1 and b2 matched but a1 comes first");
    h.s(&a1);
    assert_eq!(h.drain(), vec![a1, b1]);
    h.s(&a2);
    assert_eq!(h.drain(), vec![a2, b2]);
    assert_eq!(h.wanted(), None);
}

#[test]
fn udp_pairs_ith_with_ith_per_flow() {
    let mut h = H::new();
    h.p(&udp(1, b"x1"));
    h.p(&udp(2, b"y1"));
    h.p(&udp(1, b"x2"));
    h.s(&udp(2, b"y1"));
    h.s(&udp(1, b"x1"));
    h.s(&udp(1, b"x2"));
    assert_eq!(h.drain().len(), 3);
    assert_eq!(h.wanted(), None);
    h.p(&udp(1, b"x3"));
    h.s(&udp(1, b"x4"));
    assert_eq!(h.wanted(), Some(CheckpointReason::Mismatch));
    assert!(h.drain().is_empty());
}

#[test]
fn udp_ignores_ethernet_padding_and_ip_id() {
    let mut h = H::new();
    let mut p = udp(1, b"x");
    let mut s = p.clone();
    p.resize(60, 0);
    s.resize(60, 0xaa);
    s[14 + 4] ^= 0x55; // IP identification differs
    h.p(&p);
    h.s(&s);
    assert_eq!(h.drain(), vec![p]);
    assert_eq!(h.wanted(), None);
}

#[test]
fn arp_passes_through_ahead_of_held_frames() {
    let mut h = H::new();
    h.p(&udp(1, b"held"));
    h.p(&arp());
    assert_eq!(h.drain(), vec![arp()]);
    h.s(&arp());
    assert_eq!(h.c.stats().svm_ignored, 1);
    assert_eq!(h.c.stats().svm_waiting, 0);
}

#[test]
fn malformed_frames_compared_whole() {
    let mut h = H::new();
    let junk = vec![1u8, 2, 3, 4, 5];
    let mut bad_ip = udp(1, b"abc");
    bad_ip.truncate(bad_ip.len() - 2); // IP total length now exceeds the frame
    h.p(&junk);
    h.p(&bad_ip);
    h.s(&junk);
    h.s(&bad_ip);
    assert_eq!(h.drain(), vec![junk, bad_ip.clone()]);
    let mut other = bad_ip.clone();
    other[14 + 4] ^= 1; // the whole frame counts, IP id included
    h.p(&bad_ip);
    h.s(&other);
    assert_eq!(h.wanted(), Some(CheckpointReason::Mismatch));
}

#[test]
fn held_too_long_asks_for_a_checkpoint() {
    let mut h = H::with(CompareConfig {
        timeout: Duration::from_millis(50),
        ..Default::default()
    });
    assert_eq!(h.c.next_deadline(), None);
    h.p(&udp(1, b"x"));
    let deadline = h.t0 + Duration::from_millis(50);
    assert_eq!(h.c.next_deadline(), Some(deadline));
    assert_eq!(
        h.c.checkpoint_wanted(deadline - Duration::from_millis(1)),
        None
    );
    assert_eq!(
        h.c.checkpoint_wanted(deadline),
        Some(CheckpointReason::HeldTooLong)
    );
    h.s(&udp(1, b"x"));
    assert_eq!(h.c.checkpoint_wanted(deadline), None);
    assert_eq!(h.c.next_deadline(), None);
    // An SVM frame with no PVM counterpart also times out.
    h.now = h.t0 + Duration::from_millis(10);
    h.s(&udp(3, b"only the SVM"));
    assert_eq!(h.c.next_deadline(), Some(h.now + Duration::from_millis(50)));
}

#[test]
fn full_queue_asks_instead_of_dropping() {
    let mut h = H::with(CompareConfig {
        max_queue: 3,
        ..Default::default()
    });
    let frames: Vec<_> = (0..5u8).map(|i| udp(1, &[i])).collect();
    for f in &frames {
        h.p(f);
    }
    assert_eq!(h.wanted(), Some(CheckpointReason::QueueFull));
    assert_eq!(h.c.stats().held, 5, "nothing dropped");
    for f in &frames {
        h.s(f);
    }
    assert_eq!(h.wanted(), None);
    assert_eq!(h.drain(), frames);
}

#[test]
fn checkpoint_epochs() {
    let mut h = H::new();
    let u1 = udp(1, b"u1");
    let u2 = udp(1, b"u2");
    h.p(&u1);
    h.c.begin_checkpoint(1);
    assert_eq!(h.c.epoch(), 1);
    assert_eq!(h.wanted(), None);
    assert!(h.drain().is_empty(), "set aside, not released at begin");
    h.c.push_secondary(h.now, 0, u1.clone());
    assert_eq!(h.c.stats().svm_stale, 1);
    h.p(&u2);
    h.s(&u2);
    assert!(h.drain().is_empty(), "u2 matched but waits behind u1");
    h.c.checkpoint_committed(0);
    assert!(
        h.drain().is_empty(),
        "committing an older epoch releases nothing"
    );
    h.c.checkpoint_committed(1);
    assert_eq!(h.drain(), vec![u1, u2]);
    let st = h.c.stats();
    assert_eq!(
        (st.released, st.released_by_checkpoint, st.checkpoints),
        (2, 1, 1)
    );
}

#[test]
fn svm_frames_held_at_begin_are_dropped() {
    let mut h = H::new();
    h.s(&udp(1, b"svm first"));
    h.c.begin_checkpoint(1);
    assert_eq!(h.c.stats().svm_dropped, 1);
    h.p(&udp(1, b"svm first"));
    assert!(
        h.drain().is_empty(),
        "the old SVM frame is gone; the new PVM frame waits"
    );
    assert_eq!(
        h.c.next_deadline(),
        Some(h.now + CompareConfig::default().timeout)
    );
}

#[test]
fn tcp_after_checkpoint_continues_in_the_pvm_sequence_space() {
    let mut h = H::new();
    let syn = Flags { syn: true, ..DATA };
    h.p(&tcp(80, 1000, syn, b""));
    h.s(&tcp(80, 9000, syn, b""));
    h.p(&tcp(80, 1001, DATA, b"pvm"));
    h.s(&tcp(80, 9001, DATA, b"svm"));
    assert_eq!(h.wanted(), Some(CheckpointReason::Mismatch));
    h.c.begin_checkpoint(1);
    assert_eq!(h.wanted(), None);
    // The SVM is now a copy of the PVM: same sequence numbers. It may retransmit old bytes.
    let next = tcp(80, 1004, DATA, b"next");
    h.p(&next);
    h.s(&tcp(80, 1001, DATA, b"pvm"));
    h.s(&next);
    assert_eq!(h.wanted(), None);
    assert!(
        h.drain().len() == 1,
        "only the matched SYN, before the mismatch"
    );
    h.c.checkpoint_committed(1);
    let out = h.drain();
    assert_eq!(out.len(), 2);
    assert_eq!(out[1], next);
}

#[test]
fn stop_comparing_releases_everything() {
    let mut h = H::new();
    h.p(&udp(1, b"a"));
    h.p(&tcp(80, 5, DATA, b"b"));
    h.c.begin_checkpoint(1);
    h.p(&udp(1, b"c"));
    h.s(&udp(2, b"svm"));
    h.c.stop_comparing();
    assert_eq!(h.drain().len(), 3);
    h.p(&udp(1, b"d"));
    assert_eq!(h.drain(), vec![udp(1, b"d")]);
    assert_eq!(h.wanted(), None);
    assert_eq!(h.c.next_deadline(), None);
}

fn ndp(icmp_type: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv6([0xfe; 16], [0xff; 16], 255)
        .icmpv6_raw(icmp_type, 0, [0; 4]);
    let mut f = Vec::new();
    b.write(&mut f, &[0; 16]).expect("building a test frame");
    f
}

fn ping_reply(seq: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv4(VM_IP, CLIENT_IP, 64)
        .icmpv4_echo_reply(7, seq);
    let mut f = Vec::new();
    b.write(&mut f, payload).expect("building a test frame");
    f
}

#[test]
fn neighbour_discovery_and_mld_pass_other_icmpv6_is_compared() {
    let mut h = H::new();
    h.p(&udp(1, b"held"));
    for t in [135, 136, 143] {
        h.p(&ndp(t));
    }
    assert_eq!(h.drain().len(), 3);
    h.p(&ndp(129)); // echo reply: compared
    assert!(h.drain().is_empty());
    h.s(&udp(1, b"held"));
    h.s(&ndp(129));
    assert_eq!(h.drain().len(), 2);
}

#[test]
fn icmp_compared_from_the_ip_header_end() {
    let mut h = H::new();
    h.p(&ping_reply(1, b"abc"));
    h.s(&ping_reply(1, b"abc"));
    assert_eq!(h.drain().len(), 1);
    h.p(&ping_reply(2, b"abc"));
    h.s(&ping_reply(3, b"abc")); // ICMP sequence number differs
    assert_eq!(h.wanted(), Some(CheckpointReason::Mismatch));
}

#[test]
fn nested_checkpoints_release_on_the_later_commit() {
    let mut h = H::new();
    let (a, b, c) = (udp(1, b"a"), udp(1, b"b"), udp(1, b"c"));
    h.p(&a);
    h.c.begin_checkpoint(1);
    h.p(&b);
    h.c.begin_checkpoint(2); // checkpoint 1 never confirmed; retried as 2
    h.p(&c);
    h.s(&c);
    assert!(h.drain().is_empty());
    h.c.checkpoint_committed(2);
    assert_eq!(h.drain(), vec![a, b, c]);
}

#[test]
fn queue_bound_counts_only_the_current_epoch() {
    let mut h = H::with(CompareConfig {
        max_queue: 2,
        ..Default::default()
    });
    h.p(&udp(1, b"1"));
    h.p(&udp(1, b"2"));
    assert_eq!(h.wanted(), Some(CheckpointReason::QueueFull));
    h.c.begin_checkpoint(1);
    assert_eq!(
        h.wanted(),
        None,
        "set-aside frames wait for the commit, not another checkpoint"
    );
    h.p(&udp(1, b"3"));
    assert_eq!(h.wanted(), None);
    h.s(&udp(1, b"only svm"));
    h.s(&udp(1, b"only svm 2"));
    assert_eq!(h.wanted(), Some(CheckpointReason::Mismatch));
}

#[test]
fn tcp_pushed_after_begin_compared_in_new_epoch() {
    let mut h = H::new();
    let syn = Flags { syn: true, ..DATA };
    h.p(&tcp(80, 10, syn, b""));
    h.p(&tcp(80, 11, DATA, b"before"));
    h.c.begin_checkpoint(1);
    // A late SVM frame of epoch 0 is stale and ignored.
    h.c.push_secondary(h.now, 0, tcp(80, 5000, syn, b""));
    h.p(&tcp(80, 17, DATA, b"after"));
    h.s(&tcp(80, 17, DATA, b"aftXr"));
    assert_eq!(
        h.wanted(),
        Some(CheckpointReason::Mismatch),
        "new-epoch bytes are compared"
    );
    h.c.checkpoint_committed(1);
    assert_eq!(
        h.drain().len(),
        2,
        "the set-aside frames leave; the mismatched one stays"
    );
}

#[test]
fn implausible_sequence_jump_is_a_mismatch_not_a_release() {
    let mut h = H::new();
    h.p(&tcp(80, 100, DATA, b"a"));
    h.s(&tcp(80, 100, DATA, b"a"));
    let wild = tcp(
        80,
        100u32.wrapping_add(1 << 31).wrapping_sub(5),
        DATA,
        b"zz",
    );
    h.p(&wild);
    h.s(&wild);
    assert_eq!(h.wanted(), Some(CheckpointReason::Mismatch));
    assert_eq!(h.drain().len(), 1);
}

#[test]
fn implausible_sequence_far_behind_is_not_taken_for_a_retransmission() {
    let mut h = H::new();
    h.p(&tcp(80, 100, DATA, b"a"));
    h.s(&tcp(80, 100, DATA, b"a"));
    let wild = tcp(
        80,
        100u32.wrapping_add(1 << 31).wrapping_add(5),
        DATA,
        b"zz",
    );
    h.p(&wild);
    assert_eq!(h.wanted(), Some(CheckpointReason::Mismatch));
    assert_eq!(h.drain().len(), 1, "the wild segment is held");
}

//! Comparator property tests: equal PVM/SVM output (with different segmentation, ISNs,
//! interleaving and retransmissions) releases every PVM frame exactly once, in PVM order, with no
//! checkpoint wanted; arbitrary input and call sequences never panic and never lose or duplicate a
//! PVM frame.

use std::time::{Duration, Instant};

use colo_core::compare::{Comparator, CompareConfig};
use etherparse::PacketBuilder;
use proptest::prelude::*;

const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

/// Small deterministic generator for the choices proptest does not need to shrink.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn tcp_frame(port: u16, seq: u32, syn: bool, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(port, 40000, seq, 65535)
        .ack(777);
    if syn {
        b = b.syn();
    }
    if fin {
        b = b.fin();
    }
    let mut f = Vec::new();
    b.write(&mut f, payload).expect("test frame");
    f
}

fn udp_frame(port: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv6([1; 16], [2; 16], 64)
        .udp(port, 53);
    let mut f = Vec::new();
    b.write(&mut f, payload).expect("test frame");
    f
}

fn arp_frame(n: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&VM_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[n; 28]);
    f
}

/// One side's segments of a TCP stream: random cut points, random retransmissions.
fn segment(port: u16, isn: u32, syn: bool, fin: bool, data: &[u8], rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut seq = isn;
    if syn {
        out.push(tcp_frame(port, seq, true, false, b""));
        seq = seq.wrapping_add(1);
    }
    let mut at = 0;
    while at < data.len() {
        let n = 1 + rng.below((data.len() - at).min(1448));
        let is_last = at + n == data.len();
        let f = tcp_frame(
            port,
            seq.wrapping_add(at as u32),
            false,
            fin && is_last,
            &data[at..at + n],
        );
        out.push(f);
        if rng.below(6) == 0 {
            // retransmit something already sent
            let k = rng.below(out.len());
            out.push(out[k].clone());
        }
        at += n;
    }
    if fin && data.is_empty() {
        out.push(tcp_frame(port, seq, false, true, b""));
    }
    out
}

/// Merges per-flow sequences into one, keeping each flow's order.
fn interleave(mut flows: Vec<std::collections::VecDeque<Vec<u8>>>, rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let live: Vec<usize> = (0..flows.len()).filter(|&i| !flows[i].is_empty()).collect();
        if live.is_empty() {
            return out;
        }
        let i = live[rng.below(live.len())];
        if let Some(f) = flows[i].pop_front() {
            out.push(f);
        }
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    tcp: Vec<(Vec<u8>, bool, bool, u32)>, // data, starts with SYN, ends with FIN, SVM ISN offset
    udp: Vec<Vec<Vec<u8>>>,
    arps: usize,
    seed: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let tcp = prop::collection::vec(
        (
            prop::collection::vec(any::<u8>(), 0..4000),
            any::<bool>(),
            any::<bool>(),
            any::<u32>(),
        ),
        0..4,
    );
    let udp = prop::collection::vec(
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..6),
        0..3,
    );
    (tcp, udp, 0..3usize, any::<u64>()).prop_map(|(tcp, udp, arps, seed)| Scenario {
        tcp,
        udp,
        arps,
        seed: seed | 1,
    })
}

fn non_arp(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter(|f| f.get(12..14) != Some(&[0x08, 0x06][..]))
        .cloned()
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn equal_streams_release_everything_in_order(sc in scenario()) {
        let mut rng = Rng(sc.seed);
        let mut pvm_flows = Vec::new();
        let mut svm_flows = Vec::new();
        for (i, (data, syn, fin, isn_off)) in sc.tcp.iter().enumerate() {
            let port = 1000 + i as u16;
            let isn = rng.next() as u32;
            // Without a SYN the connection predates the last checkpoint: same sequence space.
            let svm_isn = if *syn { isn.wrapping_add(*isn_off) } else { isn };
            pvm_flows.push(segment(port, isn, *syn, *fin, data, &mut rng).into());
            svm_flows.push(segment(port, svm_isn, *syn, *fin, data, &mut rng).into());
        }
        for (i, dgrams) in sc.udp.iter().enumerate() {
            let frames: Vec<_> = dgrams.iter().map(|d| udp_frame(2000 + i as u16, d)).collect();
            pvm_flows.push(frames.clone().into());
            svm_flows.push(frames.into());
        }
        pvm_flows.push((0..sc.arps).map(|n| arp_frame(n as u8)).collect());
        let pvm = interleave(pvm_flows, &mut rng);
        let svm = interleave(svm_flows, &mut rng);

        let now = Instant::now();
        let mut c = Comparator::new(CompareConfig::default());
        let mut released = Vec::new();
        let (mut pi, mut si) = (0, 0);
        while pi < pvm.len() || si < svm.len() {
            let primary = si >= svm.len() || (pi < pvm.len() && rng.below(2) == 0);
            if primary {
                c.push_primary(now, pvm[pi].clone());
                pi += 1;
            } else {
                c.push_secondary(now, 0, svm[si].clone());
                si += 1;
            }
            if rng.below(3) == 0 {
                c.drain_released(&mut released);
            }
            prop_assert_eq!(c.checkpoint_wanted(now), None);
            let expected = non_arp(&pvm[..pi]);
            let got = non_arp(&released);
            prop_assert!(got.len() <= expected.len());
            prop_assert!(got[..] == expected[..got.len()], "released frames are a prefix of the PVM's");
        }
        c.drain_released(&mut released);
        prop_assert_eq!(non_arp(&released), non_arp(&pvm));
        prop_assert_eq!(released.len(), pvm.len());
        prop_assert_eq!(c.checkpoint_wanted(now + Duration::from_secs(3600)), None);
        let st = c.stats();
        prop_assert_eq!((st.mismatches, st.held, st.svm_waiting), (0, 0, 0));
    }

    #[test]
    fn no_input_panics_and_no_pvm_frame_is_lost(
        ops in prop::collection::vec((0u8..9, any::<u32>(), prop::collection::vec(any::<u8>(), 0..120)), 0..200)
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut c = Comparator::new(CompareConfig { max_queue: 16, ..CompareConfig::default() });
        let mut pushed = Vec::new();
        let mut released = Vec::new();
        let mut epoch = 0u64;
        for (op, x, bytes) in ops {
            now += Duration::from_micros(u64::from(x % 20_000));
            // Frames that parse most of the way, then get corrupted, or plain junk.
            let frame = match x % 4 {
                0 => bytes.clone(),
                1 => {
                    let mut f = tcp_frame(80, x, x & 8 != 0, x & 16 != 0, &bytes);
                    if let Some(b) = f.get_mut(x as usize % 60) { *b ^= bytes.first().copied().unwrap_or(1); }
                    f
                }
                2 => tcp_frame(80 + (x % 3) as u16, x >> 8, x & 8 != 0, x & 16 != 0, &bytes),
                _ => udp_frame((x % 3) as u16, &bytes),
            };
            match op {
                0 | 1 => { pushed.push(frame.clone()); c.push_primary(now, frame); }
                2 | 3 => c.push_secondary(now, epoch.saturating_sub(u64::from(x % 2)), frame),
                4 => c.drain_released(&mut released),
                5 => { epoch += 1; c.begin_checkpoint(epoch); }
                6 => c.checkpoint_committed(u64::from(x) % (epoch + 1)),
                7 => { let _ = c.checkpoint_wanted(now); let _ = c.next_deadline(); }
                _ => if x % 16 == 0 { c.stop_comparing() },
            }
            prop_assert!(released.len() <= pushed.len());
        }
        c.stop_comparing();
        c.drain_released(&mut released);
        prop_assert_eq!(c.checkpoint_wanted(now), None);
        pushed.sort();
        released.sort();
        prop_assert_eq!(pushed, released);
    }
}

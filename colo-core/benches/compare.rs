//! Criterion benchmark of the output comparator on matching PVM/SVM streams: UDP 100-byte
//! frames and TCP 1448-byte segments (same and different segmentation on the SVM, different ISN),
//! beside a plain memcmp of the same frame bytes measured in the same run. Throughput is in PVM
//! frame bytes; frames/s = frames in the group name / time. Each iteration builds a fresh
//! comparator and pushes about 200–800 KiB per side, so frames are cache-warm as they would be
//! straight off a socket; released frames are freed outside the timed section (the driver's cost),
//! matched SVM frames inside it (the comparator frees them).
use std::time::Instant;

use colo_core::compare::{Comparator, CompareConfig};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use etherparse::PacketBuilder;

const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

fn udp(port: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(port, 53);
    let mut f = Vec::new();
    b.write(&mut f, payload).expect("bench frame");
    f
}

fn tcp(port: u16, seq: u32, syn: bool, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(VM_MAC, CLIENT_MAC)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(port, 40000, seq, 65535)
        .ack(1);
    if syn {
        b = b.syn();
    }
    let mut f = Vec::new();
    b.write(&mut f, payload).expect("bench frame");
    f
}

fn payload(n: usize, seed: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(31) ^ seed) as u8).collect()
}

/// `frames` UDP datagrams of 100 bytes on the wire, over 16 flows.
fn udp_case(frames: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let pvm: Vec<_> = (0..frames)
        .map(|i| udp(1000 + (i % 16) as u16, &payload(100 - 42, i)))
        .collect();
    (pvm.clone(), pvm)
}

/// `conns` TCP connections each sending a SYN and `per_conn` segments of 1448 bytes; the SVM has another ISN
/// and, if `svm_mss` differs, another segmentation of the same bytes.
fn tcp_case(conns: usize, per_conn: usize, svm_mss: usize) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut pvm = Vec::new();
    let mut svm = Vec::new();
    let streams: Vec<Vec<u8>> = (0..conns).map(|c| payload(per_conn * 1448, c)).collect();
    for c in 0..conns {
        pvm.push(tcp(80 + c as u16, 1000, true, b""));
        svm.push(tcp(80 + c as u16, 77_000, true, b""));
    }
    for k in 0..per_conn {
        for (c, s) in streams.iter().enumerate() {
            let seq = 1001 + (k * 1448) as u32;
            pvm.push(tcp(80 + c as u16, seq, false, &s[k * 1448..(k + 1) * 1448]));
        }
    }
    let mut at = vec![0usize; conns];
    while at.iter().zip(&streams).any(|(&a, s)| a < s.len()) {
        for (c, s) in streams.iter().enumerate() {
            if at[c] < s.len() {
                let end = (at[c] + svm_mss).min(s.len());
                svm.push(tcp(
                    80 + c as u16,
                    77_001 + at[c] as u32,
                    false,
                    &s[at[c]..end],
                ));
                at[c] = end;
            }
        }
    }
    (pvm, svm)
}

/// Pushes PVM and SVM frames alternately (the SVM a few frames behind) and drains every 32.
/// Returns the released frames (criterion drops them outside the timed section: freeing what
/// was sent is the driver's cost, not the comparator's).
fn run(pvm: Vec<Vec<u8>>, svm: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let now = Instant::now();
    let mut c = Comparator::new(CompareConfig {
        max_queue: 1 << 20,
        ..CompareConfig::default()
    });
    let mut out = Vec::with_capacity(pvm.len());
    let mut s = svm.into_iter();
    for (i, f) in pvm.into_iter().enumerate() {
        c.push_primary(now, f);
        if i >= 4 {
            if let Some(f) = s.next() {
                c.push_secondary(now, 0, f);
            }
        }
        if i % 32 == 31 {
            c.drain_released(&mut out);
        }
    }
    for f in s {
        c.push_secondary(now, 0, f);
    }
    c.drain_released(&mut out);
    assert!(
        c.checkpoint_wanted(now).is_none(),
        "bench streams must match"
    );
    out
}

fn bench_case(c: &mut Criterion, name: &str, (pvm, svm): (Vec<Vec<u8>>, Vec<Vec<u8>>)) {
    let bytes: usize = pvm.iter().map(Vec::len).sum();
    let frame = bytes / pvm.len();
    assert_eq!(
        run(pvm.clone(), svm.clone()),
        pvm,
        "every PVM frame is released"
    );
    let mut g = c.benchmark_group(format!("compare_{name}_{}frames_{frame}B", pvm.len()));
    g.throughput(Throughput::Bytes(bytes as u64));
    // Baseline: memcmp of each PVM frame with an equal copy (the SVM's bytes).
    let copy = pvm.clone();
    g.bench_function("memcmp_baseline", |b| {
        b.iter(|| {
            let mut eq = 0usize;
            for (x, y) in black_box(&pvm).iter().zip(black_box(&copy)) {
                eq += usize::from(x == y);
            }
            black_box(eq)
        })
    });
    g.bench_function("comparator", |b| {
        b.iter_batched(
            || (pvm.clone(), svm.clone()),
            |(p, s)| run(p, s),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    bench_case(c, "udp", udp_case(2048));
    bench_case(c, "tcp_same_segmentation", tcp_case(4, 128, 1448));
    bench_case(c, "tcp_svm_resegmented", tcp_case(4, 128, 1000));
}

criterion_group!(benches, bench);
criterion_main!(benches);

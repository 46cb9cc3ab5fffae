//! Criterion benchmark of the TCP aligner (`colo_core::align`): frames per second through it on
//! the secondary's path — copy the frame into a reused buffer, rewrite it there — beside the
//! copy alone (a memcpy of the same frames into the same buffer) measured in the same run.
//! Cases: payload-less ACKs with timestamps (66 bytes) and 1448-byte data segments with a SACK
//! block and timestamps into the guest (input, 1024 aligned connections), the guest's 1448-byte
//! segments toward clients once serving (output), and UDP datagrams (passed through untouched).
//! Throughput is in frames.
use colo_core::{AlignConfig, Aligner};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use etherparse::{PacketBuilder, TcpOptionElement as Opt};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const GUEST: [u8; 4] = [10, 0, 0, 1];
const CLIENT: [u8; 4] = [10, 0, 0, 2];
const CONNS: u16 = 1024;
const SVM_ISN: u32 = 1_000_000;
const PVM_ISN: u32 = 3_000_000;

/// A segment from the guest (`out`) or to it, client port `port`.
fn tcp(out: bool, port: u16, seq: u32, ack: u32, syn: bool, opts: &[Opt], data: &[u8]) -> Vec<u8> {
    let b = if out {
        PacketBuilder::ethernet2(GUEST_MAC, CLIENT_MAC)
            .ipv4(GUEST, CLIENT, 64)
            .tcp(80, port, seq, 65535)
    } else {
        PacketBuilder::ethernet2(CLIENT_MAC, GUEST_MAC)
            .ipv4(CLIENT, GUEST, 64)
            .tcp(port, 80, seq, 65535)
    };
    let mut b = b.ack(ack);
    if syn {
        b = b.syn();
    }
    let b = b.options(opts).expect("bench options");
    let mut f = Vec::new();
    b.write(&mut f, data).expect("bench frame");
    f
}

fn ts(v: u32, e: u32) -> [Opt; 3] {
    [Opt::Noop, Opt::Noop, Opt::Timestamp(v, e)]
}

/// An aligner that learned `CONNS` connections (the guest accepted each).
fn taught() -> Aligner {
    let mut a = Aligner::new(AlignConfig::default());
    for c in 0..CONNS {
        let port = 40000 + c;
        a.output(&mut tcp(true, port, SVM_ISN, 8, true, &ts(90_000, 1), &[]));
        a.input(&mut tcp(
            false,
            port,
            8,
            PVM_ISN + 1,
            false,
            &ts(2, 5_000),
            &[],
        ));
    }
    assert_eq!(a.stats().aligned, u64::from(CONNS));
    a
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31) as u8).collect()
}

/// Copies each frame into `buf` and hands it to `f` (the aligner or nothing).
fn pass(frames: &[Vec<u8>], buf: &mut Vec<u8>, mut f: impl FnMut(&mut [u8]) -> bool) -> usize {
    let mut changed = 0;
    for fr in frames {
        buf.clear();
        buf.extend_from_slice(fr);
        changed += usize::from(f(buf));
    }
    changed
}

fn case(c: &mut Criterion, name: &str, frames: Vec<Vec<u8>>, serving: bool, rewrites: bool) {
    let mut a = taught();
    if serving {
        a.take_over();
    }
    let output = serving;
    let mut buf = Vec::with_capacity(2048);
    let mut step = |f: &mut [u8]| if output { a.output(f) } else { a.input(f) };
    let changed = pass(&frames, &mut buf, &mut step);
    assert_eq!(changed, if rewrites { frames.len() } else { 0 });
    let size = frames.iter().map(Vec::len).sum::<usize>() / frames.len();
    let mut g = c.benchmark_group(format!("align_{name}_{}frames_{size}B", frames.len()));
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function("memcpy_baseline", |b| {
        b.iter(|| pass(black_box(&frames), &mut buf, |f| black_box(f).is_empty()))
    });
    g.bench_function("aligner", |b| {
        b.iter(|| pass(black_box(&frames), &mut buf, &mut step))
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let n = 4096u32;
    let port = |i: u32| 40000 + (i % u32::from(CONNS)) as u16;
    let acks = (0..n)
        .map(|i| {
            tcp(
                false,
                port(i),
                9,
                PVM_ISN + 1 + i,
                false,
                &ts(3 + i, 5_000 + i),
                &[],
            )
        })
        .collect();
    case(c, "input_ack_ts", acks, false, true);
    let data = payload(1448);
    let sack = [
        Opt::Noop,
        Opt::Noop,
        Opt::Timestamp(7, 5_010),
        Opt::Noop,
        Opt::Noop,
        Opt::SelectiveAcknowledgement((PVM_ISN + 3000, PVM_ISN + 4448), [None; 3]),
    ];
    let segs = (0..n)
        .map(|i| {
            tcp(
                false,
                port(i),
                9 + 1448 * i,
                PVM_ISN + 1,
                false,
                &sack,
                &data,
            )
        })
        .collect();
    case(c, "input_data_sack_ts", segs, false, true);
    let outs = (0..n)
        .map(|i| {
            let seq = SVM_ISN + 1 + 1448 * i;
            tcp(true, port(i), seq, 9, false, &ts(90_100 + i, 3), &data)
        })
        .collect();
    case(c, "output_serving_data_ts", outs, true, true);
    let udp = (0..n)
        .map(|i| {
            let b = PacketBuilder::ethernet2(CLIENT_MAC, GUEST_MAC)
                .ipv4(CLIENT, GUEST, 64)
                .udp(port(i), 7000);
            let mut f = Vec::new();
            b.write(&mut f, &data[..58]).expect("bench frame");
            f
        })
        .collect();
    case(c, "input_udp", udp, false, false);
}

criterion_group!(benches, bench);
criterion_main!(benches);

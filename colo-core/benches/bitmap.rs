//! Criterion benchmark of the dirty bitmap on a 64 GiB guest (16 Mi pages, 2 MiB of bitmap):
//! union and run iteration, beside a plain memcpy of the same bytes measured in the same run.

use colo_core::DirtyBitmap;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const PAGES: u64 = 16 << 20;

/// A bitmap with about 1 % of pages set, in runs of 1–16 pages, from a fixed seed.
fn sample(seed: u64) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(PAGES);
    let mut x = seed;
    for _ in 0..(PAGES / 100 / 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let start = x % (PAGES - 16);
        let _ = b.set_range(start, start + 1 + (x >> 40) % 16);
    }
    b
}

fn bench(c: &mut Criterion) {
    let a = sample(1);
    let b = sample(2);
    let bytes = PAGES / 8;
    let mut g = c.benchmark_group("bitmap_64GiB_guest");
    g.throughput(Throughput::Bytes(bytes));
    let src = vec![0x5au8; bytes as usize];
    let mut dst = vec![0u8; bytes as usize];
    g.bench_function("memcpy_baseline", |bn| {
        bn.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
    let mut u = a.clone();
    g.bench_function("union_with", |bn| {
        bn.iter(|| {
            u.union_with(black_box(&b)).unwrap();
            black_box(&u);
        })
    });
    g.bench_function("runs", |bn| bn.iter(|| black_box(&a).runs().count()));
    g.bench_function("iter_pfns", |bn| bn.iter(|| black_box(&a).iter().count()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

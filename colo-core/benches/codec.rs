//! Criterion benchmark of the stream codec on 10 000 pages (40 MB) of PAGE_DATA: encode and
//! decode throughput beside a plain memcpy of the same bytes measured in the same run.
//!
//! Decoding copies each page once into a guest-memory buffer at `pfn * 4096`, as the secondary
//! does; `decode_64k_chunks` feeds socket-sized slices, so pages that straddle two slices take
//! the decoder's one-page buffer (a second copy for those pages only).

use colo_core::stream::{write_page_data, Decoder, DecoderConfig, Event, PAGE_SIZE};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const PAGES: usize = 10_000;

fn guest() -> Vec<u8> {
    (0..PAGES * PAGE_SIZE)
        .map(|i| {
            (i as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(17) as u8
        })
        .collect()
}

fn decode_into(input: &[u8], chunk: usize, mem: &mut [u8]) -> usize {
    let mut dec = Decoder::new(DecoderConfig {
        expect_headers: false,
        page_count: Some(PAGES as u64),
    });
    let mut pages = 0;
    for mut c in input.chunks(chunk) {
        loop {
            let (n, ev) = dec.feed(c).expect("benchmark stream is valid");
            c = &c[n..];
            match ev {
                Some(Event::Page {
                    pfn, data: Some(d), ..
                }) => {
                    let at = pfn as usize * PAGE_SIZE;
                    mem[at..at + PAGE_SIZE].copy_from_slice(d);
                    pages += 1;
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    dec.finish().expect("benchmark stream ends on a boundary");
    pages
}

fn bench(c: &mut Criterion) {
    let mem = guest();
    let refs: Vec<&[u8]> = mem.chunks_exact(PAGE_SIZE).collect();
    let pfns: Vec<u64> = (0..PAGES as u64).collect();
    let mut scratch = Vec::new();
    let mut stream = Vec::with_capacity(mem.len() + PAGES * 16);
    write_page_data(&mut stream, &pfns, &refs, &mut scratch).expect("encode");

    let mut g = c.benchmark_group("page_data_10k_pages");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(stream.len() as u64));

    let mut dst = vec![0u8; stream.len()];
    g.bench_function("memcpy_baseline", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&stream));
            black_box(&dst);
        })
    });

    let mut out = Vec::with_capacity(stream.len());
    g.bench_function("encode_to_vec", |b| {
        b.iter(|| {
            out.clear();
            let n = write_page_data(&mut out, black_box(&pfns), &refs, &mut scratch).unwrap();
            black_box(n);
        })
    });

    g.bench_function("encode_to_sink_zero_copy", |b| {
        b.iter(|| {
            let n = write_page_data(&mut std::io::sink(), black_box(&pfns), &refs, &mut scratch)
                .unwrap();
            black_box(n);
        })
    });

    let mut guest_mem = vec![0u8; mem.len()];
    g.bench_function("decode_whole_buffer", |b| {
        b.iter(|| black_box(decode_into(black_box(&stream), usize::MAX, &mut guest_mem)))
    });
    g.bench_function("decode_64k_chunks", |b| {
        b.iter(|| black_box(decode_into(black_box(&stream), 64 << 10, &mut guest_mem)))
    });
    g.finish();
    assert!(
        guest_mem == mem,
        "decoded guest memory differs from the source"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);

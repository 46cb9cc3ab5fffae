//! Fuzz target: the libxc stream decoder fed arbitrary bytes in chunk sizes derived from the
//! input must never panic, and must yield the same events and result as one whole-buffer feed.
#![no_main]

use colo_core::stream::{Decoder, DecoderConfig, Event, StreamError};
use libfuzzer_sys::fuzz_target;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// A fingerprint of one event (page data and record bodies hashed, not copied).
fn digest(e: &Event<'_>) -> u64 {
    let mut h = DefaultHasher::new();
    format!("{:?}", std::mem::discriminant(e)).hash(&mut h);
    match e {
        Event::ImageHeader(x) => x.version.hash(&mut h),
        Event::DomainHeader(x) => (
            x.domain_type.to_u32(),
            x.page_shift,
            x.xen_major,
            x.xen_minor,
        )
            .hash(&mut h),
        Event::PageDataStart { count } => count.hash(&mut h),
        Event::Page {
            pfn,
            page_type,
            data,
        } => (pfn, page_type.bits(), data).hash(&mut h),
        Event::PageDataEnd => {}
        Event::Record(r) => {
            r.rtype().hash(&mut h);
            let mut body = Vec::new();
            r.encode(&mut body);
            body.hash(&mut h);
        }
    }
    h.finish()
}

fn run(cfg: DecoderConfig, input: &[u8], sizes: &[usize]) -> (Vec<u64>, Result<(), StreamError>) {
    let mut dec = Decoder::new(cfg);
    let mut evs = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    loop {
        let size = sizes[i % sizes.len()];
        i += 1;
        let end = input.len().min(pos + size);
        let mut chunk = &input[pos..end];
        loop {
            match dec.feed(chunk) {
                Err(e) => return (evs, Err(e)),
                Ok((n, ev)) => {
                    assert!(n <= chunk.len());
                    chunk = &chunk[n..];
                    match ev {
                        Some(ev) => evs.push(digest(&ev)),
                        None => {
                            assert!(chunk.is_empty());
                            break;
                        }
                    }
                }
            }
        }
        pos = end;
        if pos == input.len() {
            let r = dec.finish();
            assert_eq!(dec.offset(), input.len() as u64);
            return (evs, r);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (ctl, input) = data.split_at(4);
    let cfg = DecoderConfig {
        expect_headers: ctl[0] & 1 != 0,
        page_count: (ctl[0] & 2 != 0).then_some(u64::from(ctl[1]) << (ctl[0] >> 4)),
    };
    let sizes = [
        usize::from(ctl[2]) + 1,
        usize::from(ctl[3]) * 37 + 1,
        (usize::from(ctl[2]) << 4) + 4096,
    ];
    let whole = run(cfg, input, &[usize::MAX]);
    let chunked = run(cfg, input, &sizes);
    assert_eq!(whole, chunked);
    if input.len() < 4096 {
        assert_eq!(whole, run(cfg, input, &[1]));
    }
});

//! Fuzz target: colo's PACKED_PAGES record (zero-page markers, lz4 page data). Arbitrary bytes
//! as a record body must decode or fail with a typed error, never panic nor unpack more than
//! the pages the record names; and records the encoder builds from the input (entries, page
//! contents, codec) must decode back to exactly those pages, fed in pieces the input chooses.
#![no_main]

use colo_core::stream::{
    encode_packed_pages, padded_len, rec_type, Codec, Decoder, DecoderConfig, Event, PackedKind,
    PAGE_SIZE,
};
use libfuzzer_sys::fuzz_target;

/// Every page event of `rec` fed `step` bytes at a time, or None on a decoding error.
fn decode(rec: &[u8], step: usize) -> Option<Vec<(u64, Option<Vec<u8>>)>> {
    let mut d = Decoder::new(DecoderConfig {
        expect_headers: false,
        page_count: Some(1 << 20),
    });
    let mut out = Vec::new();
    for chunk in rec.chunks(step.max(1)) {
        let mut pos = 0;
        loop {
            let (n, ev) = d.feed(&chunk[pos..]).ok()?;
            pos += n;
            match ev {
                Some(Event::Page { pfn, data, .. }) => {
                    assert!(data.is_none_or(|p| p.len() == PAGE_SIZE));
                    out.push((pfn, data.map(<[u8]>::to_vec)));
                }
                Some(_) => {}
                None if pos >= chunk.len() => break,
                None => {}
            }
        }
    }
    d.finish().ok()?;
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    // 1. The input as a body.
    let mut rec = rec_type::PACKED_PAGES.to_le_bytes().to_vec();
    rec.extend_from_slice(&(data.len() as u32).to_le_bytes());
    rec.extend_from_slice(data);
    rec.resize(8 + padded_len(data.len()), 0);
    if let Some(pages) = decode(&rec, rec.len()) {
        assert!(pages.len() <= 1024);
    }

    // 2. A round trip of a record built from the input.
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let codec = if head & 1 == 0 { Codec::None } else { Codec::Lz4 };
    let step = usize::from(head >> 1) * 13 + 1;
    let mut entries = Vec::new();
    let mut pages = Vec::new();
    let mut want = Vec::new();
    for (i, c) in rest.chunks(3).take(64).enumerate() {
        let pfn = (i as u64) * 5 + u64::from(c[0]);
        let kind = match c[0] % 3 {
            0 => PackedKind::Data,
            1 => PackedKind::Zero,
            _ => PackedKind::Absent,
        };
        entries.push((pfn, kind));
        match kind {
            PackedKind::Data => {
                // A page from the input's bytes: runs (compressible) or noise.
                let fill = c.get(1).copied().unwrap_or(0);
                let noise = c.get(2).copied().unwrap_or(0);
                let page: Vec<u8> = (0..PAGE_SIZE)
                    .map(|b| fill ^ ((b as u8).wrapping_mul(noise)))
                    .collect();
                pages.extend_from_slice(&page);
                want.push((pfn, Some(page)));
            }
            PackedKind::Zero => want.push((pfn, Some(vec![0; PAGE_SIZE]))),
            PackedKind::Absent => want.push((pfn, None)),
        }
    }
    if entries.is_empty() {
        return;
    }
    let mut rec = Vec::new();
    encode_packed_pages(&mut rec, &entries, &pages, codec).expect("valid entries encode");
    assert_eq!(decode(&rec, step).expect("an encoded record decodes"), want);
});

//! Helpers shared by the stream codec tests: owned events and whole-stream decoding.
#![allow(dead_code)]

use colo_core::stream::{
    Decoder, DecoderConfig, DomainHeader, Event, ImageHeader, PageType, Record, StreamError,
    TscInfo,
};

/// An owned copy of a decoder event, for comparing event sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    Image(ImageHeader),
    Domain(DomainHeader),
    PageStart(u32),
    Page(u64, PageType, Option<Vec<u8>>),
    PageEnd,
    End,
    Checkpoint,
    StaticDataEnd,
    Verify,
    Tsc(TscInfo),
    HvmContext(Vec<u8>),
    HvmParams(Vec<(u64, u64)>),
    DirtyPfns(Vec<u64>),
    Cpuid(Vec<u8>),
    Msr(Vec<u8>),
    Other(u32, Vec<u8>),
    Optional(u32, Vec<u8>),
}

pub fn own(e: &Event<'_>) -> Ev {
    match e {
        Event::ImageHeader(h) => Ev::Image(*h),
        Event::DomainHeader(h) => Ev::Domain(*h),
        Event::PageDataStart { count } => Ev::PageStart(*count),
        Event::Page {
            pfn,
            page_type,
            data,
        } => Ev::Page(*pfn, *page_type, data.map(<[u8]>::to_vec)),
        Event::PageDataEnd => Ev::PageEnd,
        Event::Record(r) => match r {
            Record::End => Ev::End,
            Record::Checkpoint => Ev::Checkpoint,
            Record::StaticDataEnd => Ev::StaticDataEnd,
            Record::Verify => Ev::Verify,
            Record::TscInfo(t) => Ev::Tsc(*t),
            Record::HvmContext(b) => Ev::HvmContext(b.to_vec()),
            Record::HvmParams(p) => Ev::HvmParams(p.iter().collect()),
            Record::CheckpointDirtyPfnList(l) => Ev::DirtyPfns(l.iter().collect()),
            Record::CpuidPolicy(b) => Ev::Cpuid(b.to_vec()),
            Record::MsrPolicy(b) => Ev::Msr(b.to_vec()),
            Record::OtherXen { rtype, body } => Ev::Other(*rtype, body.to_vec()),
            Record::Optional { rtype, body } => Ev::Optional(*rtype, body.to_vec()),
        },
    }
}

/// Feeds `input` in chunks whose sizes cycle through `chunks` (0 entries are treated as 1),
/// then calls finish. Returns the events and the result.
pub fn decode_chunked(
    cfg: DecoderConfig,
    input: &[u8],
    chunks: &[usize],
) -> (Vec<Ev>, Result<(), StreamError>) {
    let mut dec = Decoder::new(cfg);
    let mut evs = Vec::new();
    let mut pos = 0;
    let mut ci = 0;
    loop {
        let size = chunks
            .get(ci % chunks.len().max(1))
            .copied()
            .unwrap_or(usize::MAX)
            .max(1);
        ci += 1;
        let end = pos + size.min(input.len() - pos);
        let mut chunk = &input[pos..end];
        loop {
            match dec.feed(chunk) {
                Err(e) => return (evs, Err(e)),
                Ok((n, ev)) => {
                    assert!(n <= chunk.len(), "consumed more than fed");
                    chunk = &chunk[n..];
                    match ev {
                        Some(ev) => evs.push(own(&ev)),
                        None => {
                            assert!(chunk.is_empty(), "None before input was used up");
                            break;
                        }
                    }
                }
            }
        }
        pos = end;
        if pos == input.len() {
            // Drain zero-byte events (a trailing PageDataEnd, pages without data).
            loop {
                match dec.feed(&[]) {
                    Err(e) => return (evs, Err(e)),
                    Ok((_, Some(ev))) => evs.push(own(&ev)),
                    Ok((_, None)) => break,
                }
            }
            return (evs, dec.finish());
        }
    }
}

/// Decodes a whole buffer in one feed sequence.
pub fn decode_all(cfg: DecoderConfig, input: &[u8]) -> (Vec<Ev>, Result<(), StreamError>) {
    decode_chunked(cfg, input, &[usize::MAX])
}

pub fn headers_cfg() -> DecoderConfig {
    DecoderConfig {
        expect_headers: true,
        page_count: None,
    }
}

pub fn records_cfg() -> DecoderConfig {
    DecoderConfig {
        expect_headers: false,
        page_count: None,
    }
}

/// A page whose bytes are derived from `seed`.
pub fn page(seed: u64) -> Vec<u8> {
    (0..4096u64)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(0x9E37_79B9)) as u8)
        .collect()
}

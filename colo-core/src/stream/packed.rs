//! colo's PACKED_PAGES record: page data for links slower than memory, with zero pages sent as
//! a marker and the data optionally compressed (lz4), and the page coding both nodes agree on
//! at the handshake.
//!
//! A record in the optional range (type [`rec_type::PACKED_PAGES`]), sent only when both HELLOs
//! carry the same [`PageCoding`] and it is not [`PageCoding::PLAIN`]. Body, little-endian:
//!
//! ```text
//! u32 count (1..=1024) | u8 codec (0 none, 1 lz4) | u8 reserved[3] = 0 | u32 raw_len | u32 packed_len
//! u64 entry[count]: bits 63..60 kind (0: data, 1: zero page, 0xF: absent, as Xen's XTAB),
//!                   bits 59..52 reserved (0), bits 51..0 pfn
//! u8 packed[packed_len]: the data entries' pages in entry order, raw (codec none) or one lz4
//!                        block
//! ```
//!
//! `raw_len` is exactly 4096 × the data entries and the body exactly `16 + 8·count +
//! packed_len`; with codec none `packed_len == raw_len`. The decoder checks all of it before it
//! allocates, and decompresses into at most 4 MiB (1024 pages): the lz4 block must yield
//! exactly `raw_len` bytes, so a record cannot expand beyond the pages it names (no
//! decompression bomb). The decoder then yields the record as PAGE_DATA's events: a zero page
//! as a page of zeros, an absent one as XTAB.

use super::error::StreamError;
use super::types::{le_u32, le_u64, rec_type};
use super::{MAX_PAGES_PER_RECORD, PAGE_SIZE, PAGE_TYPE_SHIFT, PFN_MASK, PFN_RESERVED_MASK};

/// How page data travels on the link; both nodes must agree (HELLO flags bits 3–5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageCoding {
    /// Zero pages travel as a marker without data (`--zero-pages`).
    pub zero_pages: bool,
    /// Page data is compressed (`--compress`).
    pub codec: Codec,
}

/// A page-data compressor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// Raw pages.
    #[default]
    None,
    /// One lz4 block per record (lz4_flex, pure Rust).
    Lz4,
}

impl Codec {
    fn wire(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
        }
    }

    fn from_wire(v: u8) -> Option<Self> {
        match v {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            _ => None,
        }
    }

    /// The name `--compress` takes.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
        }
    }
}

impl std::fmt::Display for PageCoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--compress {}{}",
            self.codec.name(),
            if self.zero_pages { " --zero-pages" } else { "" }
        )
    }
}

/// HELLO flag bit of `zero_pages`.
const FLAG_ZERO: u32 = 1 << 3;
/// HELLO flag bits of the codec.
const CODEC_SHIFT: u32 = 4;
const CODEC_MASK: u32 = 0b11 << CODEC_SHIFT;

impl PageCoding {
    /// Xen's own PAGE_DATA records only.
    pub const PLAIN: Self = Self {
        zero_pages: false,
        codec: Codec::None,
    };

    /// Whether this coding sends PAGE_DATA only.
    pub fn is_plain(&self) -> bool {
        *self == Self::PLAIN
    }

    /// The HELLO flag bits (3: zero pages, 4–5: codec).
    pub fn flags(&self) -> u32 {
        (if self.zero_pages { FLAG_ZERO } else { 0 })
            | (u32::from(self.codec.wire()) << CODEC_SHIFT)
    }

    /// The coding in HELLO `flags`; an unknown codec reads as None (and the handshake refuses
    /// it, since it differs from this node's).
    pub fn from_flags(flags: u32) -> Option<Self> {
        Some(Self {
            zero_pages: flags & FLAG_ZERO != 0,
            codec: Codec::from_wire(((flags & CODEC_MASK) >> CODEC_SHIFT) as u8)?,
        })
    }
}

/// What one PACKED_PAGES entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedKind {
    /// 4096 bytes of data in the packed block.
    Data,
    /// A page of zeros, without data.
    Zero,
    /// A page the sender cannot read (Xen's XTAB): the receiver leaves it as it is.
    Absent,
}

impl PackedKind {
    fn wire(self) -> u64 {
        match self {
            PackedKind::Data => 0,
            PackedKind::Zero => 1,
            PackedKind::Absent => 0xF,
        }
    }

    fn from_wire(v: u64) -> Option<Self> {
        match v {
            0 => Some(PackedKind::Data),
            1 => Some(PackedKind::Zero),
            0xF => Some(PackedKind::Absent),
            _ => None,
        }
    }
}

/// Length of the PACKED_PAGES body's fixed header.
pub const PACKED_HEADER_LEN: usize = 16;

/// A bound on an lz4 block's size for `n` input bytes, at least lz4_flex's own
/// (`get_maximum_output_size`: 1.1 n + 20).
const fn lz4_bound(n: usize) -> usize {
    n + n / 8 + 64
}

/// The longest PACKED_PAGES body a reader accepts: 1024 entries and the lz4 bound of their
/// pages. Longer bodies are refused before anything is allocated.
pub const MAX_PACKED_BODY: usize =
    PACKED_HEADER_LEN + 8 * MAX_PAGES_PER_RECORD + lz4_bound(MAX_PAGES_PER_RECORD * PAGE_SIZE);

/// A page of zeros: what a zero-page entry decodes to.
pub(super) static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Appends one PACKED_PAGES record (header, body, padding) to `out`: `entries` (1 to 1024, pfns
/// below 2^52) and `data`, the data entries' pages in order, compressed with `codec`. Returns
/// the record's length; fails on a count or pfn Xen's PAGE_DATA would refuse too, or `data` of
/// the wrong length.
pub fn encode_packed_pages(
    out: &mut Vec<u8>,
    entries: &[(u64, PackedKind)],
    data: &[u8],
    codec: Codec,
) -> Result<usize, StreamError> {
    let count = entries.len();
    if count == 0 || count > MAX_PAGES_PER_RECORD {
        return Err(StreamError::EncodeEntryCount { count });
    }
    let data_pages = entries
        .iter()
        .filter(|(_, k)| *k == PackedKind::Data)
        .count();
    if data.len() != data_pages * PAGE_SIZE {
        return Err(StreamError::BadPackedPages {
            offset: 0,
            reason: format!(
                "{} bytes of data for {data_pages} data pages (encoding)",
                data.len()
            ),
        });
    }
    let start = out.len();
    out.extend_from_slice(&rec_type::PACKED_PAGES.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // body length, set below
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&[codec.wire(), 0, 0, 0]);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let packed_len_at = out.len();
    out.extend_from_slice(&0u32.to_le_bytes()); // packed length, set below
    for (index, &(pfn, kind)) in entries.iter().enumerate() {
        if pfn > PFN_MASK {
            out.truncate(start);
            return Err(StreamError::EncodePfnTooLarge { index, pfn });
        }
        out.extend_from_slice(&((kind.wire() << PAGE_TYPE_SHIFT) | pfn).to_le_bytes());
    }
    let packed_at = out.len();
    match codec {
        Codec::None => out.extend_from_slice(data),
        Codec::Lz4 => {
            out.resize(packed_at + lz4_bound(data.len()), 0);
            let n = lz4_flex::block::compress_into(data, &mut out[packed_at..]).map_err(|e| {
                StreamError::BadPackedPages {
                    offset: 0,
                    reason: format!("lz4 compression failed: {e}"),
                }
            })?;
            out.truncate(packed_at + n);
        }
    }
    let packed_len = (out.len() - packed_at) as u32;
    out[packed_len_at..packed_len_at + 4].copy_from_slice(&packed_len.to_le_bytes());
    let body = (out.len() - start - 8) as u32;
    out[start + 4..start + 8].copy_from_slice(&body.to_le_bytes());
    out.resize(start + 8 + super::padded_len(body as usize), 0);
    Ok(out.len() - start)
}

/// Checks a PACKED_PAGES body (at stream offset `body_off`) against the guest's `page_count`
/// and unpacks it: its entries into `entries` (replaced), the data pages into the front of
/// `raw` (grown, never shrunk, so it is not zeroed again; at most 4 MiB). Returns the bytes of
/// data unpacked.
pub(super) fn unpack(
    body: &[u8],
    body_off: u64,
    page_count: Option<u64>,
    entries: &mut Vec<u64>,
    raw: &mut Vec<u8>,
) -> Result<usize, StreamError> {
    let bad = |at: u64, reason: String| StreamError::BadPackedPages {
        offset: body_off + at,
        reason,
    };
    if body.len() < PACKED_HEADER_LEN {
        return Err(bad(
            0,
            format!("body of {} bytes, at least 16 needed", body.len()),
        ));
    }
    let count = le_u32(body, 0) as usize;
    if count == 0 || count > MAX_PAGES_PER_RECORD {
        return Err(bad(0, format!("{count} entries (1 to 1024 allowed)")));
    }
    let codec = Codec::from_wire(body[4]).ok_or_else(|| bad(4, format!("codec {}", body[4])))?;
    if body[5..8] != [0, 0, 0] {
        return Err(bad(5, "reserved bytes are not zero".into()));
    }
    let raw_len = le_u32(body, 8) as usize;
    let packed_len = le_u32(body, 12) as usize;
    let want = PACKED_HEADER_LEN + 8 * count + packed_len;
    if body.len() != want {
        return Err(bad(
            12,
            format!(
                "body of {} bytes, {want} expected for {count} entries and {packed_len} packed bytes",
                body.len()
            ),
        ));
    }
    entries.clear();
    let mut data_pages = 0usize;
    for i in 0..count {
        let at = PACKED_HEADER_LEN + 8 * i;
        let e = le_u64(body, at);
        let kind = PackedKind::from_wire(e >> PAGE_TYPE_SHIFT).ok_or_else(|| {
            bad(
                at as u64,
                format!("entry {i}: kind {:#x}", e >> PAGE_TYPE_SHIFT),
            )
        })?;
        if e & PFN_RESERVED_MASK != 0 {
            return Err(bad(
                at as u64,
                format!("entry {i}: reserved bits in {e:#x}"),
            ));
        }
        let pfn = e & PFN_MASK;
        if let Some(pages) = page_count {
            if pfn >= pages {
                return Err(StreamError::PfnOutOfRange {
                    offset: body_off + at as u64,
                    pfn,
                    page_count: pages,
                });
            }
        }
        if kind == PackedKind::Data {
            data_pages += 1;
        }
        entries.push(e);
    }
    if raw_len != data_pages * PAGE_SIZE {
        return Err(bad(
            8,
            format!("raw length {raw_len} for {data_pages} data pages"),
        ));
    }
    let packed = &body[PACKED_HEADER_LEN + 8 * count..];
    if raw.len() < raw_len {
        raw.resize(raw_len, 0);
    }
    match codec {
        Codec::None if packed_len != raw_len => {
            return Err(bad(
                12,
                format!("{packed_len} packed bytes for {raw_len} raw bytes without a codec"),
            ))
        }
        Codec::None => raw[..raw_len].copy_from_slice(packed),
        Codec::Lz4 => {
            let at = (PACKED_HEADER_LEN + 8 * count) as u64;
            let n = lz4_flex::block::decompress_into(packed, &mut raw[..raw_len])
                .map_err(|e| bad(at, format!("lz4 block: {e}")))?;
            if n != raw_len {
                return Err(bad(
                    at,
                    format!("lz4 block of {n} bytes, {raw_len} expected"),
                ));
            }
        }
    }
    Ok(raw_len)
}

/// The kind and pfn of an entry [`unpack`] accepted.
pub(super) fn entry(e: u64) -> (u64, PackedKind) {
    (
        e & PFN_MASK,
        PackedKind::from_wire(e >> PAGE_TYPE_SHIFT).unwrap_or(PackedKind::Absent),
    )
}

/// Whether a page is all zeros (64 bytes at a time, which the compiler vectorises; stops at
/// the first non-zero block).
pub fn is_zero_page(page: &[u8]) -> bool {
    let blocks = page.chunks_exact(64);
    let tail = blocks.remainder();
    blocks
        .into_iter()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{Decoder, DecoderConfig, Event, PageType};

    /// A decoded page: pfn, type, data.
    type Page = (u64, PageType, Option<Vec<u8>>);

    /// Decodes `bytes` fed `step` bytes at a time: every page.
    fn decode(bytes: &[u8], step: usize, pages: u64) -> Result<Vec<Page>, StreamError> {
        let mut d = Decoder::new(DecoderConfig {
            expect_headers: false,
            page_count: Some(pages),
        });
        let mut out = Vec::new();
        for chunk in bytes.chunks(step.max(1)) {
            let mut pos = 0;
            loop {
                let (n, ev) = d.feed(&chunk[pos..])?;
                pos += n;
                match ev {
                    Some(Event::Page {
                        pfn,
                        page_type,
                        data,
                    }) => out.push((pfn, page_type, data.map(<[u8]>::to_vec))),
                    Some(_) => {}
                    None if pos >= chunk.len() => break,
                    None => {}
                }
            }
        }
        d.finish()?;
        Ok(out)
    }

    fn page(seed: u8, compressible: bool) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| {
                if compressible {
                    (i / 64) as u8 ^ seed
                } else {
                    (i as u32)
                        .wrapping_mul(2_654_435_761)
                        .rotate_left(u32::from(seed)) as u8
                }
            })
            .collect()
    }

    #[test]
    fn packed_pages_round_trip_in_any_pieces() {
        let kinds = [
            PackedKind::Data,
            PackedKind::Zero,
            PackedKind::Absent,
            PackedKind::Data,
            PackedKind::Data,
            PackedKind::Zero,
        ];
        for codec in [Codec::None, Codec::Lz4] {
            for compressible in [false, true] {
                let entries: Vec<(u64, PackedKind)> = kinds
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| (100 + 3 * i as u64, k))
                    .collect();
                let mut data = Vec::new();
                let mut want = Vec::new();
                for (i, &(pfn, k)) in entries.iter().enumerate() {
                    match k {
                        PackedKind::Data => {
                            let p = page(i as u8, compressible);
                            data.extend_from_slice(&p);
                            want.push((pfn, PageType::Notab, Some(p)));
                        }
                        PackedKind::Zero => {
                            want.push((pfn, PageType::Notab, Some(vec![0; PAGE_SIZE])))
                        }
                        PackedKind::Absent => want.push((pfn, PageType::Xtab, None)),
                    }
                }
                let mut rec = Vec::new();
                let n = encode_packed_pages(&mut rec, &entries, &data, codec).unwrap();
                assert_eq!(n, rec.len());
                assert_eq!(rec.len() % 8, 0);
                if codec == Codec::Lz4 && compressible {
                    assert!(rec.len() < data.len() / 4, "{} bytes", rec.len());
                }
                // Twice in a row, fed whole, a byte at a time and in odd pieces.
                let two = [rec.clone(), rec].concat();
                for step in [two.len(), 1, 7, 4099] {
                    let got = decode(&two, step, 1000).unwrap();
                    assert_eq!(got.len(), 2 * want.len());
                    assert_eq!(got[..want.len()], want[..], "{codec:?} step {step}");
                    assert_eq!(got[want.len()..], want[..]);
                }
            }
        }
    }

    /// A record with `body` (the padding added here).
    fn record(body: &[u8]) -> Vec<u8> {
        let mut r = rec_type::PACKED_PAGES.to_le_bytes().to_vec();
        r.extend_from_slice(&(body.len() as u32).to_le_bytes());
        r.extend_from_slice(body);
        r.resize(8 + super::super::padded_len(body.len()), 0);
        r
    }

    fn body(count: u32, codec: u8, raw: u32, entries: &[u64], packed: &[u8]) -> Vec<u8> {
        let mut b = count.to_le_bytes().to_vec();
        b.extend_from_slice(&[codec, 0, 0, 0]);
        b.extend_from_slice(&raw.to_le_bytes());
        b.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        for e in entries {
            b.extend_from_slice(&e.to_le_bytes());
        }
        b.extend_from_slice(packed);
        b
    }

    fn refused(b: &[u8]) -> StreamError {
        let r = record(b);
        let e = decode(&r, r.len(), 1000).unwrap_err();
        assert!(e.offset().is_some(), "{e}");
        e
    }

    #[test]
    fn malformed_packed_pages_are_refused_with_their_offset() {
        let zero = 1u64 << 60;
        // Counts, codec, reserved bytes.
        assert!(matches!(
            refused(&body(0, 0, 0, &[], &[])),
            StreamError::BadPackedPages { .. }
        ));
        assert!(matches!(
            refused(&body(1, 9, 0, &[zero], &[])),
            StreamError::BadPackedPages { .. }
        ));
        let mut b = body(1, 0, 0, &[zero], &[]);
        b[6] = 1;
        assert!(matches!(
            refused(&b),
            StreamError::BadPackedPages { offset: 13, .. }
        ));
        // Lengths that disagree: raw length vs data entries, body vs packed length.
        assert!(matches!(
            refused(&body(1, 0, 4096, &[zero], &[])),
            StreamError::BadPackedPages { .. }
        ));
        assert!(matches!(
            refused(&body(2, 0, 0, &[zero], &[])),
            StreamError::BadPackedPages { .. }
        ));
        assert!(matches!(
            refused(&body(1, 0, 4096, &[5], &[1; 100])),
            StreamError::BadPackedPages { .. }
        ));
        // Unknown kind, reserved pfn bits, pfn beyond the guest.
        assert!(matches!(
            refused(&body(1, 0, 0, &[2 << 60], &[])),
            StreamError::BadPackedPages { .. }
        ));
        assert!(matches!(
            refused(&body(1, 0, 0, &[zero | 1 << 55], &[])),
            StreamError::BadPackedPages { .. }
        ));
        assert!(matches!(
            refused(&body(1, 0, 0, &[zero | 1000], &[])),
            StreamError::PfnOutOfRange { pfn: 1000, .. }
        ));
        // An lz4 block that yields less or more than the pages it names, or is garbage.
        let one = lz4_flex::block::compress(&page(1, true));
        let two = lz4_flex::block::compress(&[page(1, true), page(2, true)].concat());
        assert!(matches!(
            refused(&body(2, 1, 8192, &[1, 2], &one)),
            StreamError::BadPackedPages { .. }
        ));
        assert!(matches!(
            refused(&body(1, 1, 4096, &[1], &two)),
            StreamError::BadPackedPages { .. }
        ));
        assert!(matches!(
            refused(&body(1, 1, 4096, &[1], &[0xff; 40])),
            StreamError::BadPackedPages { .. }
        ));
        // A body beyond the limit is refused from its header, before anything is read.
        let mut hdr = rec_type::PACKED_PAGES.to_le_bytes().to_vec();
        hdr.extend_from_slice(&(MAX_PACKED_BODY as u32 + 8).to_le_bytes());
        let e = decode(&hdr, hdr.len(), 1000);
        assert!(
            matches!(e, Err(StreamError::BadPackedPages { offset: 4, .. })),
            "{e:?}"
        );
        // A record cut short is a truncation at the end of input.
        let mut rec = Vec::new();
        encode_packed_pages(
            &mut rec,
            &[(1, PackedKind::Data)],
            &page(3, true),
            Codec::Lz4,
        )
        .unwrap();
        rec.truncate(rec.len() - 8);
        assert!(matches!(
            decode(&rec, 3, 1000),
            Err(StreamError::Truncated { .. })
        ));
    }

    #[test]
    fn page_coding_flags_round_trip() {
        for zero_pages in [false, true] {
            for codec in [Codec::None, Codec::Lz4] {
                let c = PageCoding { zero_pages, codec };
                assert_eq!(PageCoding::from_flags(c.flags() | 0b111), Some(c));
            }
        }
        assert_eq!(PageCoding::from_flags(2 << 4), None);
        assert!(PageCoding::PLAIN.is_plain());
    }

    #[test]
    fn zero_pages_are_recognised() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero_page(&p));
    }
}

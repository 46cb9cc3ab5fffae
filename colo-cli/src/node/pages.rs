//! Page copies out of a guest and PAGE_DATA records onto the link (the primary), and the
//! initial synchronisation's pages into a guest (the secondary).

use colo_core::stream::{
    encode_packed_pages, encode_page_data_header, is_zero_page, Codec, PackedKind, PageCoding,
    PageType, MAX_PAGES_PER_RECORD,
};
use colo_core::{BackendError, Domain, PAGE_SIZE};

use anyhow::{bail, Result};

use crate::link::{Link, Span};

/// Checks that a backend's `read_pages` visitor got page `i` when page `next` was due, and
/// moves `next` on: the page buffers are laid out in request order.
pub(super) fn in_order(next: &mut usize, i: usize) -> Result<(), BackendError> {
    if i != *next {
        return Err(BackendError::BadState {
            op: "read_pages",
            reason: format!("page {i} delivered out of order"),
        });
    }
    *next += 1;
    Ok(())
}

/// Reads pages of `pfns` from `dom` into `out`, in order ([`Domain::copy_pages`]). A page the
/// backend cannot map (Xen's holes: MMIO, beyond RAM) is zero-filled when `present` is None, or
/// else left out of `out` and marked `false` in `present` (then it travels as an XTAB entry
/// without data). The buffers keep their capacity across checkpoints, so the pause neither
/// allocates nor zero-fills.
pub(super) fn copy_pages(
    dom: &mut dyn Domain,
    pfns: &[u64],
    out: &mut Vec<u8>,
    present: Option<&mut Vec<bool>>,
) -> Result<(), BackendError> {
    dom.copy_pages(pfns, out, present)
}

/// Writes PAGE_DATA records for `pfns` (batches of at most 1024): present pages as NOTAB with
/// their data (consecutive in `data`), the others as XTAB without data. Two writes per batch,
/// the header and the batch's data, straight from `data`.
pub(super) fn write_typed_pages(
    w: &mut impl std::io::Write,
    pfns: &[u64],
    present: &[bool],
    data: &[u8],
    scratch: &mut Vec<u8>,
    entries: &mut Vec<(u64, PageType)>,
) -> std::io::Result<u64> {
    let mut bytes = 0u64;
    for batch in batches(pfns, present, data) {
        let (ps, ok, chunk) = batch?;
        entries.clear();
        entries.extend(
            ps.iter()
                .zip(ok)
                .map(|(&p, &ok)| (p, if ok { PageType::Notab } else { PageType::Xtab })),
        );
        scratch.clear();
        encode_page_data_header(scratch, entries).map_err(|e| invalid(&e.to_string()))?;
        w.write_all(scratch)?;
        w.write_all(chunk)?;
        bytes += (scratch.len() + chunk.len()) as u64;
    }
    Ok(bytes)
}

/// `pfns` in batches of at most 1024, each with its `present` flags and its pages of `data`
/// (laid out as [`copy_pages`] does).
fn batches<'a>(
    pfns: &'a [u64],
    present: &'a [bool],
    data: &'a [u8],
) -> impl Iterator<Item = std::io::Result<(&'a [u64], &'a [bool], &'a [u8])>> {
    let mut off = 0;
    pfns.chunks(MAX_PAGES_PER_RECORD)
        .zip(present.chunks(MAX_PAGES_PER_RECORD))
        .map(move |(ps, ok)| {
            let n = ok.iter().filter(|x| **x).count() * PAGE_SIZE;
            let chunk = data
                .get(off..off + n)
                .ok_or_else(|| invalid("page data shorter than its pfns"))?;
            off += n;
            Ok((ps, ok, chunk))
        })
}

/// Pages of a batch lz4 compresses first, as a sample: the batch is compressed only if they
/// shrink by a tenth (an incompressible guest pays for 1/64 of a compression).
const LZ4_SAMPLE: usize = 16;

/// Writes pages as the link's page coding says (see [`colo_core::stream::PageCoding`]), with
/// its buffers kept across checkpoints: plain PAGE_DATA; zero pages as PACKED_PAGES markers;
/// batches compressed with lz4 as PACKED_PAGES, or as PAGE_DATA when a sample of the batch
/// does not compress.
#[derive(Debug)]
pub(super) struct PageWriter {
    coding: PageCoding,
    scratch: Vec<u8>,
    entries: Vec<(u64, PageType)>,
    packed: Vec<(u64, PackedKind)>,
    /// The data pages of a batch with zero pages left out.
    gather: Vec<u8>,
    /// A raw batch with zero pages: their markers, and the other entries.
    markers: Vec<(u64, PackedKind)>,
    rest_pfns: Vec<u64>,
    rest_present: Vec<bool>,
}

impl PageWriter {
    pub(super) fn new(coding: PageCoding) -> Self {
        Self {
            coding,
            scratch: Vec::new(),
            entries: Vec::with_capacity(MAX_PAGES_PER_RECORD),
            packed: Vec::with_capacity(MAX_PAGES_PER_RECORD),
            gather: Vec::new(),
            markers: Vec::new(),
            rest_pfns: Vec::new(),
            rest_present: Vec::new(),
        }
    }

    /// Writes `pfns` (`present` and `data` as [`copy_pages`] lays them out) in records of at
    /// most 1024 pages; returns the bytes written.
    pub(super) fn write(
        &mut self,
        w: &mut impl std::io::Write,
        pfns: &[u64],
        present: &[bool],
        data: &[u8],
    ) -> std::io::Result<u64> {
        if self.coding.is_plain() {
            return write_typed_pages(w, pfns, present, data, &mut self.scratch, &mut self.entries);
        }
        let mut bytes = 0;
        for batch in batches(pfns, present, data) {
            let (ps, ok, chunk) = batch?;
            bytes += self.write_batch(w, ps, ok, chunk)?;
        }
        Ok(bytes)
    }

    /// One batch of at most 1024 pages in the link's coding.
    fn write_batch(
        &mut self,
        w: &mut impl std::io::Write,
        pfns: &[u64],
        present: &[bool],
        data: &[u8],
    ) -> std::io::Result<u64> {
        // Each entry's kind; the data pages (zero pages left out when they travel as markers)
        // go to `gather` only when some were left out.
        self.packed.clear();
        self.gather.clear();
        let mut pages = data.chunks_exact(PAGE_SIZE);
        let mut zeros = 0;
        for (&pfn, &ok) in pfns.iter().zip(present) {
            let kind = match ok.then(|| pages.next()).flatten() {
                None => PackedKind::Absent,
                Some(p) if self.coding.zero_pages && is_zero_page(p) => PackedKind::Zero,
                Some(_) => PackedKind::Data,
            };
            zeros += usize::from(kind == PackedKind::Zero);
            self.packed.push((pfn, kind));
        }
        if zeros > 0 {
            let mut pages = data.chunks_exact(PAGE_SIZE);
            for &(_, kind) in &self.packed {
                if kind == PackedKind::Absent {
                    continue;
                }
                let p = pages.next().unwrap_or_default();
                if kind == PackedKind::Data {
                    self.gather.extend_from_slice(p);
                }
            }
        }
        let body = if zeros > 0 { &self.gather[..] } else { data };
        if self.coding.codec == Codec::Lz4 && shrinks(&mut self.scratch, body) {
            self.scratch.clear();
            encode_packed_pages(&mut self.scratch, &self.packed, body, Codec::Lz4)
                .map_err(|e| invalid(&e.to_string()))?;
            let raw = body.len() + 8 * pfns.len();
            if self.scratch.len() * 10 < raw * 9 {
                w.write_all(&self.scratch)?;
                return Ok(self.scratch.len() as u64);
            }
        }
        // Raw: the zero pages (if any) as markers, the others as PAGE_DATA.
        if zeros == 0 {
            let (scratch, entries) = (&mut self.scratch, &mut self.entries);
            return write_typed_pages(w, pfns, present, data, scratch, entries);
        }
        self.markers.clear();
        self.rest_pfns.clear();
        self.rest_present.clear();
        for &(pfn, kind) in &self.packed {
            match kind {
                PackedKind::Zero => self.markers.push((pfn, kind)),
                _ => {
                    self.rest_pfns.push(pfn);
                    self.rest_present.push(kind == PackedKind::Data);
                }
            }
        }
        self.scratch.clear();
        encode_packed_pages(&mut self.scratch, &self.markers, &[], Codec::None)
            .map_err(|e| invalid(&e.to_string()))?;
        w.write_all(&self.scratch)?;
        let mut bytes = self.scratch.len() as u64;
        if !self.rest_pfns.is_empty() {
            let (scratch, entries) = (&mut self.scratch, &mut self.entries);
            let (pfns, present) = (&self.rest_pfns, &self.rest_present);
            bytes += write_typed_pages(w, pfns, present, &self.gather, scratch, entries)?;
        }
        Ok(bytes)
    }

    /// A record's bytes to build in place (cleared).
    pub(super) fn scratch(&mut self) -> &mut Vec<u8> {
        self.scratch.clear();
        &mut self.scratch
    }
}

/// Whether lz4 shrinks a sample of `data` (its first pages) by a tenth; `scratch` is
/// overwritten.
fn shrinks(scratch: &mut Vec<u8>, data: &[u8]) -> bool {
    let sample = &data[..data.len().min(LZ4_SAMPLE * PAGE_SIZE)];
    if sample.is_empty() {
        return true;
    }
    scratch.clear();
    scratch.resize(lz4_flex::block::get_maximum_output_size(sample.len()), 0);
    match lz4_flex::block::compress_into(sample, scratch) {
        Ok(n) => n * 10 < sample.len() * 9,
        Err(_) => false,
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string())
}

/// The initial synchronisation's pages on the secondary, written into the guest a record's
/// worth at a time ([`SyncPages::due`]) from where they were received (see [`StagedPages`]).
#[derive(Debug, Default)]
pub(super) struct SyncPages {
    pfns: Vec<u64>,
    pages: StagedPages,
}

impl SyncPages {
    /// Buffers page `pfn`, `data` decoded from the bytes of `span`.
    pub(super) fn push(&mut self, pfn: u64, data: &[u8], span: Span) {
        self.pfns.push(pfn);
        self.pages.push(data, span);
    }

    /// A record's worth is buffered: time to [`SyncPages::flush`].
    pub(super) fn due(&self) -> bool {
        self.pfns.len() >= MAX_PAGES_PER_RECORD
    }

    /// The first receive buffer the buffered pages need.
    pub(super) fn first_buffer(&self) -> Option<u64> {
        self.pages.first_buffer()
    }

    /// Writes the buffered pages to the guest, from `link`'s receive buffers.
    pub(super) fn flush(&mut self, guest: &mut dyn Domain, link: Option<&Link>) -> Result<()> {
        if !self.pfns.is_empty() {
            self.pages.write(guest, &self.pfns, link)?;
        }
        self.pfns.clear();
        self.pages.clear();
        Ok(())
    }
}

/// Where a staged page lies.
#[derive(Debug, Clone, Copy)]
enum PageAt {
    /// In the link's receive buffer `seq`, at `off`.
    Buffer { seq: u64, off: usize },
    /// In [`StagedPages::copied`], at this offset.
    Copied(usize),
}

/// A checkpoint's pages on the secondary until its CHECKPOINT: each where it was received, in
/// the link's receive buffer (which the link keeps until the apply), or copied when the
/// decoder handed it out of its own buffer (a page that straddled two receive buffers, or one
/// unpacked from PACKED_PAGES). The apply copies each page once, from there into the SVM.
#[derive(Debug, Default)]
pub(super) struct StagedPages {
    at: Vec<PageAt>,
    copied: Vec<u8>,
    /// The first receive buffer a page lies in.
    first: Option<u64>,
}

impl StagedPages {
    /// Stages the next page, `data` (4096 bytes), decoded from the bytes of `span`.
    pub(super) fn push(&mut self, data: &[u8], span: Span) {
        match span.offset_of(data) {
            Some(off) => {
                self.first.get_or_insert(span.seq);
                self.at.push(PageAt::Buffer { seq: span.seq, off });
            }
            None => {
                self.at.push(PageAt::Copied(self.copied.len()));
                self.copied.extend_from_slice(data);
            }
        }
    }

    /// The first receive buffer the staged pages need (see [`Link::keep_from`]).
    pub(super) fn first_buffer(&self) -> Option<u64> {
        self.first
    }

    /// Drops the staged pages (the buffers keep their capacity).
    pub(super) fn clear(&mut self) {
        self.at.clear();
        self.copied.clear();
        self.first = None;
    }

    /// Writes the staged pages into `guest` as the pages of `pfns` (one staged page per pfn,
    /// in order), from `link`'s kept receive buffers and the copies.
    pub(super) fn write(
        &self,
        guest: &mut dyn Domain,
        pfns: &[u64],
        link: Option<&Link>,
    ) -> Result<()> {
        if pfns.len() != self.at.len() {
            bail!(
                "{} pfns staged but {} pages (the secondary's staging is out of step)",
                pfns.len(),
                self.at.len()
            );
        }
        // Every page's bytes are looked up first, so the copy below cannot miss one.
        let page = |at: &PageAt| -> Option<&[u8]> {
            match *at {
                PageAt::Buffer { seq, off } => link?.buffer(seq)?.get(off..off + PAGE_SIZE),
                PageAt::Copied(off) => self.copied.get(off..off + PAGE_SIZE),
            }
        };
        if let Some(i) = self.at.iter().position(|a| page(a).is_none()) {
            bail!("staged page {i} (pfn {}) is no longer received", pfns[i]);
        }
        guest.write_pages_from(pfns, &mut |i| {
            self.at.get(i).and_then(page).unwrap_or_default()
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_core::stream::{Decoder, DecoderConfig, Event};

    /// Every (pfn, data) the decoder yields for `bytes` (None: a page without data).
    fn decode(bytes: &[u8], pages: u64) -> Vec<(u64, Option<Vec<u8>>)> {
        let mut d = Decoder::new(DecoderConfig {
            expect_headers: false,
            page_count: Some(pages),
        });
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let (n, ev) = d.feed(&bytes[pos..]).expect("the writer's records decode");
            pos += n;
            match ev {
                Some(Event::Page { pfn, data, .. }) => out.push((pfn, data.map(<[u8]>::to_vec))),
                Some(_) => {}
                None if pos >= bytes.len() => break,
                None => {}
            }
        }
        d.finish().expect("whole records");
        out
    }

    #[test]
    fn every_page_coding_round_trips_through_the_decoder() {
        // 2,500 pages (three records): zero pages, absent ones, compressible and random ones.
        let n = 2500u64;
        let pfns: Vec<u64> = (0..n).map(|i| i * 3).collect();
        let present: Vec<bool> = (0..n).map(|i| i % 97 != 5).collect();
        let mut data = Vec::new();
        let mut want = Vec::new();
        let mut x = 7u64;
        for (i, (&pfn, &ok)) in pfns.iter().zip(&present).enumerate() {
            if !ok {
                want.push((pfn, None));
                continue;
            }
            let page: Vec<u8> = match i % 4 {
                0 => vec![0; PAGE_SIZE],
                1 => (0..PAGE_SIZE).map(|b| (b / 100) as u8).collect(),
                _ => (0..PAGE_SIZE)
                    .map(|_| {
                        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        (x >> 56) as u8
                    })
                    .collect(),
            };
            data.extend_from_slice(&page);
            want.push((pfn, Some(page)));
        }
        let mut sizes = Vec::new();
        for zero_pages in [false, true] {
            for codec in [Codec::None, Codec::Lz4] {
                let mut w = PageWriter::new(PageCoding { zero_pages, codec });
                let mut out = Vec::new();
                let bytes = w.write(&mut out, &pfns, &present, &data).unwrap();
                assert_eq!(bytes, out.len() as u64);
                let mut got = decode(&out, n * 3);
                // Zero markers travel apart from the batch's other pages.
                got.sort_by_key(|(p, _)| *p);
                assert_eq!(got, want, "zero pages {zero_pages}, {codec:?}");
                sizes.push(out.len());
            }
        }
        // Plain is the largest; zero markers and lz4 each send less.
        assert!(sizes[1..].iter().all(|&s| s < sizes[0]), "{sizes:?}");
    }

    #[test]
    fn incompressible_batches_go_raw() {
        let mut x = 1u64;
        let data: Vec<u8> = (0..64 * PAGE_SIZE)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect();
        let pfns: Vec<u64> = (0..64).collect();
        let present = vec![true; 64];
        let mut w = PageWriter::new(PageCoding {
            zero_pages: false,
            codec: Codec::Lz4,
        });
        let mut out = Vec::new();
        w.write(&mut out, &pfns, &present, &data).unwrap();
        let mut plain = Vec::new();
        PageWriter::new(PageCoding::PLAIN)
            .write(&mut plain, &pfns, &present, &data)
            .unwrap();
        assert_eq!(out, plain, "random pages are sent as PAGE_DATA");
    }

    /// Staged pages decoded out of the decoder's own buffer are copied and written back in
    /// order; a page that lies in a receive buffer needs the link that keeps it.
    #[test]
    fn staged_pages_copies_and_references() {
        use colo_mock::{MockConfig, MockDomain, Workload};
        let mut dom = MockDomain::create(MockConfig::new(512, Workload::Idle, 1)).unwrap();
        let pages: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; PAGE_SIZE]).collect();
        let mut staged = StagedPages::default();
        for p in &pages {
            staged.push(p, Span::NONE);
        }
        assert_eq!(staged.first_buffer(), None, "copies need no receive buffer");
        assert!(
            staged.write(&mut dom, &[9, 3], None).is_err(),
            "one pfn per page"
        );
        staged.write(&mut dom, &[9, 3, 9], None).unwrap();
        let ram = dom.ram().unwrap();
        assert!(ram[9 * PAGE_SIZE..10 * PAGE_SIZE].iter().all(|&x| x == 3));
        assert!(ram[3 * PAGE_SIZE..4 * PAGE_SIZE].iter().all(|&x| x == 2));
        staged.clear();
        let received = vec![7u8; 2 * PAGE_SIZE];
        staged.push(&received[PAGE_SIZE..], Span::over(5, &received));
        assert_eq!(staged.first_buffer(), Some(5));
        let err = staged.write(&mut dom, &[1], None).unwrap_err();
        assert!(err.to_string().contains("no longer received"), "{err}");
    }
}

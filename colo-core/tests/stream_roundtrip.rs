//! Round-trip tests of the stream codec: what the encoder writes, the decoder reads back, in any
//! chunking.

mod stream_common;

use colo_core::stream::{
    encode_dirty_pfn_list, encode_hvm_params, encode_page_data_header, encode_record,
    encode_tsc_info, rec_type, write_page_data, DomainHeader, DomainType, HvmParams, ImageHeader,
    PageType, PfnList, Record, TscInfo, MAX_PAGES_PER_RECORD,
};
use proptest::prelude::*;
use stream_common::*;

fn headers(out: &mut Vec<u8>) -> Vec<Ev> {
    let ih = ImageHeader { version: 3 };
    let dh = DomainHeader {
        domain_type: DomainType::X86Hvm,
        page_shift: 12,
        xen_major: 4,
        xen_minor: 17,
    };
    out.extend_from_slice(&ih.encode());
    out.extend_from_slice(&dh.encode());
    vec![Ev::Image(ih), Ev::Domain(dh)]
}

/// A full HVM stream with every record kind colo writes, and the events it must decode to.
fn sample_stream() -> (Vec<u8>, Vec<Ev>) {
    let mut out = Vec::new();
    let mut ev = headers(&mut out);
    Record::CpuidPolicy(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).encode(&mut out);
    ev.push(Ev::Cpuid(vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]));
    Record::MsrPolicy(&[0xAA; 16]).encode(&mut out);
    ev.push(Ev::Msr(vec![0xAA; 16]));
    Record::StaticDataEnd.encode(&mut out);
    ev.push(Ev::StaticDataEnd);
    let entries = [
        (5, PageType::Notab),
        (6, PageType::Xtab),
        (7, PageType::L1Pinned),
        (9, PageType::Broken),
        (10, PageType::Xalloc),
    ];
    encode_page_data_header(&mut out, &entries).unwrap();
    ev.push(Ev::PageStart(5));
    for (pfn, ty) in entries {
        if ty.has_data() {
            out.extend_from_slice(&page(pfn));
            ev.push(Ev::Page(pfn, ty, Some(page(pfn))));
        } else {
            ev.push(Ev::Page(pfn, ty, None));
        }
    }
    ev.push(Ev::PageEnd);
    let tsc = TscInfo {
        mode: 1,
        khz: 2_400_000,
        nsec: 123_456_789,
        incarnation: 3,
    };
    encode_tsc_info(&mut out, &tsc);
    ev.push(Ev::Tsc(tsc));
    Record::HvmContext(&[9; 13]).encode(&mut out);
    ev.push(Ev::HvmContext(vec![9; 13]));
    encode_hvm_params(&mut out, &[(1, 2), (3, 4)]);
    ev.push(Ev::HvmParams(vec![(1, 2), (3, 4)]));
    Record::Verify.encode(&mut out);
    ev.push(Ev::Verify);
    Record::OtherXen {
        rtype: rec_type::SHARED_INFO,
        body: &[7; 4096],
    }
    .encode(&mut out);
    ev.push(Ev::Other(rec_type::SHARED_INFO, vec![7; 4096]));
    Record::Optional {
        rtype: 0x8000_0C01,
        body: b"colo",
    }
    .encode(&mut out);
    ev.push(Ev::Optional(0x8000_0C01, b"colo".to_vec()));
    Record::Checkpoint.encode(&mut out);
    ev.push(Ev::Checkpoint);
    encode_dirty_pfn_list(&mut out, [1u64, 5, 3].into_iter());
    ev.push(Ev::DirtyPfns(vec![1, 5, 3]));
    Record::End.encode(&mut out);
    ev.push(Ev::End);
    (out, ev)
}

#[test]
fn sample_stream_round_trips_whole() {
    let (bytes, want) = sample_stream();
    assert_eq!(bytes.len() % 8, 0);
    let (got, res) = decode_all(headers_cfg(), &bytes);
    assert_eq!(res, Ok(()));
    assert_eq!(got, want);
}

#[test]
fn one_byte_at_a_time_matches_whole() {
    let (bytes, want) = sample_stream();
    let (got, res) = decode_chunked(headers_cfg(), &bytes, &[1]);
    assert_eq!(res, Ok(()));
    assert_eq!(got, want);
}

#[test]
fn odd_chunk_sizes_match_whole() {
    let (bytes, want) = sample_stream();
    for chunks in [&[3usize, 4095, 7][..], &[4096], &[4097, 1], &[8191, 2, 13]] {
        let (got, res) = decode_chunked(headers_cfg(), &bytes, chunks);
        assert_eq!(res, Ok(()), "chunks {chunks:?}");
        assert_eq!(got, want, "chunks {chunks:?}");
    }
}

#[test]
fn record_encode_matches_helpers() {
    let mut a = Vec::new();
    let mut b = Vec::new();
    encode_hvm_params(&mut a, &[(0x10, 0x20)]);
    let mut entries = Vec::new();
    entries.extend_from_slice(&0x10u64.to_le_bytes());
    entries.extend_from_slice(&0x20u64.to_le_bytes());
    Record::HvmParams(HvmParams::new(&entries).unwrap()).encode(&mut b);
    assert_eq!(a, b);

    a.clear();
    b.clear();
    encode_dirty_pfn_list(&mut a, [7u64, 8].into_iter());
    let mut raw = Vec::new();
    raw.extend_from_slice(&7u64.to_le_bytes());
    raw.extend_from_slice(&8u64.to_le_bytes());
    Record::CheckpointDirtyPfnList(PfnList::new(&raw).unwrap()).encode(&mut b);
    assert_eq!(a, b);

    a.clear();
    encode_record(&mut a, rec_type::HVM_CONTEXT, &[1, 2, 3]);
    assert_eq!(a, [9, 0, 0, 0, 3, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 0]);
}

/// A writer that accepts at most `max` bytes per call, to exercise partial vectored writes.
struct Dribble {
    out: Vec<u8>,
    max: usize,
    calls: usize,
}

impl std::io::Write for Dribble {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.max);
        self.out.extend_from_slice(&buf[..n]);
        self.calls += 1;
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.calls += 1;
        let mut left = self.max;
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(left);
            self.out.extend_from_slice(&b[..take]);
            left -= take;
            n += take;
            if left == 0 {
                break;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn write_page_data_batches_and_survives_partial_writes() {
    let n = MAX_PAGES_PER_RECORD + 5;
    let pages: Vec<Vec<u8>> = (0..n as u64).map(page).collect();
    let refs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
    let pfns: Vec<u64> = (0..n as u64).map(|i| i * 3).collect();
    let mut w = Dribble {
        out: Vec::new(),
        max: 10_000,
        calls: 0,
    };
    let mut scratch = Vec::new();
    let written = write_page_data(&mut w, &pfns, &refs, &mut scratch).unwrap();
    assert_eq!(written as usize, w.out.len());
    assert!(w.calls > 1);
    let (evs, res) = decode_all(records_cfg(), &w.out);
    assert_eq!(res, Ok(()));
    let mut want = vec![Ev::PageStart(MAX_PAGES_PER_RECORD as u32)];
    for i in 0..n {
        if i == MAX_PAGES_PER_RECORD {
            want.push(Ev::PageEnd);
            want.push(Ev::PageStart(5));
        }
        want.push(Ev::Page(pfns[i], PageType::Notab, Some(pages[i].clone())));
    }
    want.push(Ev::PageEnd);
    assert_eq!(evs, want);
}

#[test]
fn write_page_data_rejects_bad_arguments() {
    let p = page(1);
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    assert!(write_page_data(&mut out, &[1, 2], &[&p], &mut scratch).is_err());
    assert!(write_page_data(&mut out, &[1], &[&p[..100]], &mut scratch).is_err());
    assert!(write_page_data(&mut out, &[1 << 52], &[&p], &mut scratch).is_err());
    assert!(out.is_empty());
}

fn arb_page_type() -> impl Strategy<Value = PageType> {
    prop::sample::select(PageType::ALL.to_vec())
}

#[derive(Debug, Clone)]
enum Item {
    Pages(Vec<(u64, PageType, u8)>),
    Tsc(u32, u32, u64, u32),
    Params(Vec<(u64, u64)>),
    Dirty(Vec<u64>),
    Blob(u8, Vec<u8>),
    Optional(u32, Vec<u8>),
    Empty(u8),
}

fn arb_item() -> impl Strategy<Value = Item> {
    prop_oneof![
        prop::collection::vec((0u64..(1 << 52), arb_page_type(), any::<u8>()), 1..6)
            .prop_map(Item::Pages),
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>())
            .prop_map(|(a, b, c, d)| Item::Tsc(a, b, c, d)),
        prop::collection::vec(any::<(u64, u64)>(), 0..8).prop_map(Item::Params),
        prop::collection::vec(any::<u64>(), 0..20).prop_map(Item::Dirty),
        (0u8..3, prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(k, b)| Item::Blob(k, b)),
        (
            0x8000_0000u32..=u32::MAX,
            prop::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(t, b)| Item::Optional(t, b)),
        (0u8..3).prop_map(Item::Empty),
    ]
}

fn build(items: &[Item]) -> (Vec<u8>, Vec<Ev>) {
    let mut out = Vec::new();
    let mut ev = headers(&mut out);
    for it in items {
        match it {
            Item::Pages(entries) => {
                let e: Vec<(u64, PageType)> = entries.iter().map(|&(p, t, _)| (p, t)).collect();
                encode_page_data_header(&mut out, &e).unwrap();
                ev.push(Ev::PageStart(e.len() as u32));
                for &(pfn, ty, fill) in entries {
                    if ty.has_data() {
                        out.extend_from_slice(&[fill; 4096]);
                        ev.push(Ev::Page(pfn, ty, Some(vec![fill; 4096])));
                    } else {
                        ev.push(Ev::Page(pfn, ty, None));
                    }
                }
                ev.push(Ev::PageEnd);
            }
            &Item::Tsc(mode, khz, nsec, incarnation) => {
                let t = TscInfo {
                    mode,
                    khz,
                    nsec,
                    incarnation,
                };
                Record::TscInfo(t).encode(&mut out);
                ev.push(Ev::Tsc(t));
            }
            Item::Params(p) => {
                encode_hvm_params(&mut out, p);
                ev.push(Ev::HvmParams(p.clone()));
            }
            Item::Dirty(p) => {
                encode_dirty_pfn_list(&mut out, p.iter().copied());
                ev.push(Ev::DirtyPfns(p.clone()));
            }
            Item::Blob(k, b) => match k {
                0 => {
                    Record::HvmContext(b).encode(&mut out);
                    ev.push(Ev::HvmContext(b.clone()));
                }
                1 => {
                    Record::CpuidPolicy(b).encode(&mut out);
                    ev.push(Ev::Cpuid(b.clone()));
                }
                _ => {
                    Record::MsrPolicy(b).encode(&mut out);
                    ev.push(Ev::Msr(b.clone()));
                }
            },
            Item::Optional(t, b) => {
                Record::Optional { rtype: *t, body: b }.encode(&mut out);
                ev.push(Ev::Optional(*t, b.clone()));
            }
            Item::Empty(k) => {
                let (r, e) = match k {
                    0 => (Record::Checkpoint, Ev::Checkpoint),
                    1 => (Record::StaticDataEnd, Ev::StaticDataEnd),
                    _ => (Record::Verify, Ev::Verify),
                };
                r.encode(&mut out);
                ev.push(e);
            }
        }
    }
    Record::End.encode(&mut out);
    ev.push(Ev::End);
    (out, ev)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn encoded_streams_decode_to_the_same_records(
        items in prop::collection::vec(arb_item(), 0..8),
        chunks in prop::collection::vec(1usize..5000, 1..6),
    ) {
        let (bytes, want) = build(&items);
        prop_assert_eq!(bytes.len() % 8, 0);
        let (whole, res) = decode_all(headers_cfg(), &bytes);
        prop_assert_eq!(res, Ok(()));
        prop_assert_eq!(&whole, &want);
        let (chunked, res) = decode_chunked(headers_cfg(), &bytes, &chunks);
        prop_assert_eq!(res, Ok(()));
        prop_assert_eq!(&chunked, &want);
    }
}

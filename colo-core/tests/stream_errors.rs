//! Every malformation the decoder must reject, each as its typed error at the right offset, in
//! whole-buffer and one-byte-at-a-time feeding; plus encoder argument errors.

mod stream_common;

use colo_core::stream::{
    encode_dirty_pfn_list, encode_page_data_header, encode_record, rec_type, Decoder,
    DecoderConfig, DomainHeader, DomainType, ImageHeader, PageType, Record, StreamError,
    MAX_BODY_LEN,
};
use stream_common::*;

fn headers() -> Vec<u8> {
    let mut v = ImageHeader { version: 3 }.encode().to_vec();
    v.extend_from_slice(
        &DomainHeader {
            domain_type: DomainType::X86Hvm,
            page_shift: 12,
            xen_major: 4,
            xen_minor: 17,
        }
        .encode(),
    );
    v
}

/// Decodes whole and byte by byte; both must fail with `want`.
fn expect_err(cfg: DecoderConfig, bytes: &[u8], want: StreamError) {
    let (_, whole) = decode_all(cfg, bytes);
    assert_eq!(whole, Err(want.clone()), "whole buffer");
    let (_, bytewise) = decode_chunked(cfg, bytes, &[1]);
    assert_eq!(bytewise, Err(want.clone()), "one byte at a time");
    let (_, odd) = decode_chunked(cfg, bytes, &[3, 4097]);
    assert_eq!(odd, Err(want.clone()), "odd chunks");
    let msg = want.to_string();
    let offset = want.offset().unwrap();
    assert!(
        msg.starts_with(&format!("at byte {offset}: ")),
        "message {msg:?} must lead with the offset"
    );
}

fn rec(rtype: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_record(&mut v, rtype, body);
    v
}

fn raw_header(rtype: u32, len: u32) -> Vec<u8> {
    let mut v = rtype.to_le_bytes().to_vec();
    v.extend_from_slice(&len.to_le_bytes());
    v
}

#[test]
fn bad_marker() {
    let mut s = headers();
    s[3] = 0xFE;
    expect_err(
        headers_cfg(),
        &s,
        StreamError::BadMarker {
            offset: 0,
            marker: 0xFFFF_FFFE_FFFF_FFFF,
        },
    );
}

#[test]
fn bad_id() {
    let mut s = headers();
    s[11] = b'G';
    expect_err(
        headers_cfg(),
        &s,
        StreamError::BadId {
            offset: 8,
            id: 0x5845_4E47,
        },
    );
}

#[test]
fn versions() {
    for version in [0u32, 1, 4, 0x0300_0000] {
        let mut s = headers();
        s[12..16].copy_from_slice(&version.to_be_bytes());
        expect_err(
            headers_cfg(),
            &s,
            StreamError::BadVersion {
                offset: 12,
                version,
            },
        );
    }
    let mut s = headers();
    s[12..16].copy_from_slice(&2u32.to_be_bytes());
    let (evs, res) = decode_all(headers_cfg(), &s);
    assert_eq!(res, Ok(()));
    assert_eq!(evs[0], Ev::Image(ImageHeader { version: 2 }));
}

#[test]
fn big_endian_and_reserved_options() {
    let mut s = headers();
    s[17] = 1;
    expect_err(
        headers_cfg(),
        &s,
        StreamError::BigEndian {
            offset: 16,
            options: 1,
        },
    );
    let mut s = headers();
    s[16] = 0x80;
    expect_err(
        headers_cfg(),
        &s,
        StreamError::ReservedNonZero {
            offset: 16,
            field: "image header option bits",
            value: 0x8000,
        },
    );
}

#[test]
fn image_reserved_fields() {
    let mut s = headers();
    s[19] = 1;
    expect_err(
        headers_cfg(),
        &s,
        StreamError::ReservedNonZero {
            offset: 18,
            field: "image header u16",
            value: 1,
        },
    );
    let mut s = headers();
    s[20] = 1;
    expect_err(
        headers_cfg(),
        &s,
        StreamError::ReservedNonZero {
            offset: 20,
            field: "image header u32",
            value: 0x0100_0000,
        },
    );
}

#[test]
fn domain_type_reserved_or_unknown() {
    for t in [0u32, 3, 4, 0xFFFF_FFFF] {
        let mut s = headers();
        s[24..28].copy_from_slice(&t.to_le_bytes());
        expect_err(
            headers_cfg(),
            &s,
            StreamError::BadDomainType {
                offset: 24,
                domain_type: t,
            },
        );
    }
}

#[test]
fn page_shift_not_12() {
    for shift in [0u16, 11, 13, 21] {
        let mut s = headers();
        s[28..30].copy_from_slice(&shift.to_le_bytes());
        expect_err(
            headers_cfg(),
            &s,
            StreamError::BadPageShift {
                offset: 28,
                page_shift: shift,
            },
        );
    }
}

#[test]
fn domain_reserved_field() {
    let mut s = headers();
    s[30] = 7;
    expect_err(
        headers_cfg(),
        &s,
        StreamError::ReservedNonZero {
            offset: 30,
            field: "domain header field",
            value: 7,
        },
    );
}

#[test]
fn body_over_128_mib_rejected_at_the_header() {
    for rtype in [rec_type::HVM_CONTEXT, rec_type::PAGE_DATA, 0x8000_0001] {
        let mut s = headers();
        s.extend_from_slice(&raw_header(rtype, MAX_BODY_LEN + 1));
        expect_err(
            headers_cfg(),
            &s,
            StreamError::BodyTooLong {
                offset: 44,
                rtype,
                len: MAX_BODY_LEN + 1,
            },
        );
    }
    // Exactly 128 MiB is accepted: the decoder only asks for more bytes.
    let mut dec = Decoder::new(records_cfg());
    let h = raw_header(rec_type::HVM_CONTEXT, MAX_BODY_LEN);
    let (n, ev) = dec.feed(&h).unwrap();
    assert_eq!((n, ev.is_none()), (8, true));
    assert!(matches!(
        dec.finish(),
        Err(StreamError::Truncated { missing, .. }) if missing == u64::from(MAX_BODY_LEN)
    ));
}

#[test]
fn non_zero_padding() {
    let mut s = headers();
    s.extend_from_slice(&rec(rec_type::HVM_CONTEXT, &[1, 2, 3]));
    // Record at 40: header 40..48, body 48..51, padding 51..56.
    s[53] = 0x44;
    expect_err(
        headers_cfg(),
        &s,
        StreamError::NonZeroPadding {
            offset: 53,
            byte: 0x44,
        },
    );
    let mut s = rec(0x8000_0002, &[9]);
    s[15] = 1;
    expect_err(
        records_cfg(),
        &s,
        StreamError::NonZeroPadding {
            offset: 15,
            byte: 1,
        },
    );
}

fn page_data(entries: &[(u64, PageType)]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_page_data_header(&mut v, entries).unwrap();
    for (pfn, t) in entries {
        if t.has_data() {
            v.extend_from_slice(&page(*pfn));
        }
    }
    v
}

#[test]
fn page_data_count_zero() {
    let mut s = raw_header(rec_type::PAGE_DATA, 16);
    s.extend_from_slice(&[0; 16]);
    expect_err(
        records_cfg(),
        &s,
        StreamError::PageDataCountZero { offset: 8 },
    );
}

#[test]
fn page_data_too_short() {
    for len in [0u32, 8, 15] {
        let mut s = raw_header(rec_type::PAGE_DATA, len);
        s.extend_from_slice(&[0; 16]);
        expect_err(
            records_cfg(),
            &s,
            StreamError::PageDataTooShort { offset: 4, len },
        );
    }
}

#[test]
fn page_data_reserved_field() {
    let mut s = page_data(&[(1, PageType::Notab)]);
    s[12] = 1;
    expect_err(
        records_cfg(),
        &s,
        StreamError::ReservedNonZero {
            offset: 12,
            field: "PAGE_DATA reserved field",
            value: 1,
        },
    );
}

#[test]
fn page_data_length_mismatch() {
    // One NOTAB entry needs 8 + 8 + 4096; claim no data at all.
    let mut s = page_data(&[(1, PageType::Notab)]);
    s[4..8].copy_from_slice(&16u32.to_le_bytes());
    expect_err(
        records_cfg(),
        &s,
        StreamError::PageDataLength {
            offset: 4,
            len: 16,
            count: 1,
            data_pages: 1,
            expected: 16 + 4096,
        },
    );
    // One XTAB entry needs 16; claim a data page.
    let mut s = page_data(&[(1, PageType::Xtab)]);
    s[4..8].copy_from_slice(&(16u32 + 4096).to_le_bytes());
    s.extend_from_slice(&[0; 4096]);
    expect_err(
        records_cfg(),
        &s,
        StreamError::PageDataLength {
            offset: 4,
            len: 16 + 4096,
            count: 1,
            data_pages: 0,
            expected: 16,
        },
    );
    // Not 8 + 8*count + 4096*N for any N: rejected at the PAGE_DATA header.
    let mut s = page_data(&[(1, PageType::Notab)]);
    s[4..8].copy_from_slice(&(16u32 + 4096 + 8).to_le_bytes());
    expect_err(
        records_cfg(),
        &s,
        StreamError::PageDataLength {
            offset: 4,
            len: 16 + 4096 + 8,
            count: 1,
            data_pages: 1,
            expected: 16 + 4096,
        },
    );
    // More data pages than entries.
    let mut s = page_data(&[(1, PageType::Notab)]);
    s[4..8].copy_from_slice(&(16u32 + 2 * 4096).to_le_bytes());
    expect_err(
        records_cfg(),
        &s,
        StreamError::PageDataLength {
            offset: 4,
            len: 16 + 2 * 4096,
            count: 1,
            data_pages: 1,
            expected: 16 + 4096,
        },
    );
    // count 3 cannot fit in a 24-byte body.
    let mut s = raw_header(rec_type::PAGE_DATA, 24);
    s.extend_from_slice(&3u32.to_le_bytes());
    s.extend_from_slice(&[0; 20]);
    expect_err(
        records_cfg(),
        &s,
        StreamError::PageDataLength {
            offset: 4,
            len: 24,
            count: 3,
            data_pages: 0,
            expected: 32,
        },
    );
}

#[test]
fn page_types_5_to_8_are_invalid() {
    for t in 5u64..=8 {
        let mut s = page_data(&[(1, PageType::Xtab), (2, PageType::Xtab)]);
        let entry = (t << 60) | 2;
        s[24..32].copy_from_slice(&entry.to_le_bytes());
        expect_err(
            records_cfg(),
            &s,
            StreamError::BadPageType {
                offset: 24,
                index: 1,
                page_type: t as u8,
            },
        );
    }
}

#[test]
fn reserved_pfn_bits() {
    for bit in 52..60 {
        let mut s = page_data(&[(1, PageType::Xtab)]);
        let entry = (0xF << 60) | (1u64 << bit) | 1;
        s[16..24].copy_from_slice(&entry.to_le_bytes());
        expect_err(
            records_cfg(),
            &s,
            StreamError::ReservedPfnBits {
                offset: 16,
                index: 0,
                entry,
            },
        );
    }
}

#[test]
fn pfn_beyond_page_count() {
    let cfg = DecoderConfig {
        expect_headers: false,
        page_count: Some(100),
    };
    let s = page_data(&[(99, PageType::Notab), (100, PageType::Notab)]);
    expect_err(
        cfg,
        &s,
        StreamError::PfnOutOfRange {
            offset: 24,
            pfn: 100,
            page_count: 100,
        },
    );
    let mut s = Vec::new();
    encode_dirty_pfn_list(&mut s, [5u64, 99, 1000].into_iter());
    expect_err(
        cfg,
        &s,
        StreamError::PfnOutOfRange {
            offset: 24,
            pfn: 1000,
            page_count: 100,
        },
    );
    // Without a page count both are fine.
    let (_, res) = decode_all(records_cfg(), &s);
    assert_eq!(res, Ok(()));
}

#[test]
fn fixed_size_bodies() {
    for (rtype, expected) in [
        (rec_type::END, 0u32),
        (rec_type::CHECKPOINT, 0),
        (rec_type::VERIFY, 0),
        (rec_type::STATIC_DATA_END, 0),
        (rec_type::X86_TSC_INFO, 24),
    ] {
        for len in [expected + 8, expected + 1, expected.saturating_sub(8)] {
            if len == expected {
                continue;
            }
            let s = rec(rtype, &vec![0; len as usize]);
            expect_err(
                records_cfg(),
                &s,
                StreamError::BadRecordLength {
                    offset: 4,
                    rtype,
                    len,
                    expected,
                },
            );
        }
    }
}

#[test]
fn tsc_info_reserved() {
    let mut body = [0u8; 24];
    body[23] = 1;
    expect_err(
        records_cfg(),
        &rec(rec_type::X86_TSC_INFO, &body),
        StreamError::ReservedNonZero {
            offset: 28,
            field: "X86_TSC_INFO reserved field",
            value: 0x0100_0000,
        },
    );
}

#[test]
fn hvm_params_sizes() {
    for len in [0u32, 4, 9, 16, 33] {
        expect_err(
            records_cfg(),
            &rec(rec_type::HVM_PARAMS, &vec![0; len as usize]),
            StreamError::HvmParamsLength { offset: 4, len },
        );
    }
    let mut body = vec![0u8; 8 + 32];
    body[0] = 3;
    expect_err(
        records_cfg(),
        &rec(rec_type::HVM_PARAMS, &body),
        StreamError::HvmParamsCount {
            offset: 8,
            count: 3,
            entries: 2,
        },
    );
    let mut body = vec![0u8; 8 + 16];
    body[0] = 1;
    body[4] = 2;
    expect_err(
        records_cfg(),
        &rec(rec_type::HVM_PARAMS, &body),
        StreamError::ReservedNonZero {
            offset: 12,
            field: "HVM_PARAMS reserved field",
            value: 2,
        },
    );
}

#[test]
fn dirty_pfn_list_length_not_multiple_of_8() {
    for len in [1u32, 7, 12, 20] {
        expect_err(
            records_cfg(),
            &rec(rec_type::CHECKPOINT_DIRTY_PFN_LIST, &vec![0; len as usize]),
            StreamError::DirtyPfnListLength { offset: 4, len },
        );
    }
}

#[test]
fn xen_4_18_dirty_pfn_list_header_is_not_the_layout() {
    // Xen 4.18+ writes a 16-byte header: the 8-byte header then 8 bytes of a leaked pointer,
    // counted in neither length. Read as 4.17 layout, the pointer becomes the first "pfn", so
    // with a known page count the list is rejected rather than silently misread.
    let cfg = DecoderConfig {
        expect_headers: false,
        page_count: Some(1 << 20),
    };
    let mut s = raw_header(rec_type::CHECKPOINT_DIRTY_PFN_LIST, 16);
    s.extend_from_slice(&0xFFFF_8880_1234_5678u64.to_le_bytes());
    s.extend_from_slice(&5u64.to_le_bytes());
    expect_err(
        cfg,
        &s,
        StreamError::PfnOutOfRange {
            offset: 8,
            pfn: 0xFFFF_8880_1234_5678,
            page_count: 1 << 20,
        },
    );
}

#[test]
fn unknown_mandatory_record() {
    for rtype in [0x13u32, 0x100, 0x7FFF_FFFF] {
        let mut s = rec(rec_type::CHECKPOINT, &[]);
        s.extend_from_slice(&rec(rtype, &[1, 2, 3]));
        expect_err(
            records_cfg(),
            &s,
            StreamError::UnknownMandatory { offset: 8, rtype },
        );
    }
    // Optional records are skipped (surfaced, never an error).
    for rtype in [0x8000_0000u32, 0x8000_0013, 0xFFFF_FFFF] {
        let (evs, res) = decode_all(records_cfg(), &rec(rtype, &[1, 2, 3]));
        assert_eq!(res, Ok(()));
        assert_eq!(evs, [Ev::Optional(rtype, vec![1, 2, 3])]);
    }
}

#[test]
fn trailing_data_after_end() {
    let mut s = rec(rec_type::END, &[]);
    s.extend_from_slice(&rec(rec_type::CHECKPOINT, &[]));
    expect_err(records_cfg(), &s, StreamError::TrailingData { offset: 8 });
}

/// Every proper prefix of a valid stream: feeding it asks for more, and finish() reports
/// truncation, except exactly at record boundaries.
#[test]
fn truncated_streams() {
    let mut s = headers();
    s.extend_from_slice(&rec(rec_type::HVM_CONTEXT, &[1, 2, 3]));
    let pd_start = s.len();
    s.extend_from_slice(&page_data(&[(1, PageType::Notab), (2, PageType::Broken)]));
    let pd_end = s.len();
    s.extend_from_slice(&rec(rec_type::END, &[]));
    let boundaries = [40, 56, pd_end, s.len()];
    for cut in 0..s.len() {
        let (_, res) = decode_chunked(headers_cfg(), &s[..cut], &[7]);
        if boundaries.contains(&cut) {
            assert_eq!(res, Ok(()), "cut at {cut}");
            continue;
        }
        let Err(StreamError::Truncated {
            offset,
            what,
            missing,
        }) = res
        else {
            panic!("cut at {cut}: {res:?}");
        };
        assert_eq!(offset, cut as u64);
        let want_what = match cut {
            0..=23 => "image header",
            24..=39 => "domain header",
            41..=47 | 57..=63 => "record header",
            48..=55 => "record body",
            c if c > pd_start && c < pd_end => "PAGE_DATA record",
            _ => "record header",
        };
        assert_eq!(what, want_what, "cut at {cut}");
        let record_starts = [40usize, 56, pd_end];
        let want_missing = match what {
            "image header" => 24 - cut,
            "domain header" => 40 - cut,
            "record header" => {
                let start = record_starts
                    .iter()
                    .copied()
                    .filter(|&b| b <= cut)
                    .max()
                    .unwrap();
                start + 8 - cut
            }
            "record body" => 56 - cut,
            _ => pd_end - cut,
        };
        assert_eq!(missing, want_missing as u64, "cut at {cut}");
    }
    // A records-only link that has sent nothing is not truncated; a headed stream is.
    assert_eq!(decode_all(records_cfg(), &[]).1, Ok(()));
    assert!(matches!(
        decode_all(headers_cfg(), &[]).1,
        Err(StreamError::Truncated { offset: 0, .. })
    ));
}

#[test]
fn need_more_is_not_an_error() {
    let s = page_data(&[(1, PageType::Notab)]);
    let mut dec = Decoder::new(records_cfg());
    let (n, ev) = dec.feed(&s[..100]).unwrap();
    assert_eq!(n, 24);
    assert!(matches!(
        ev,
        Some(colo_core::stream::Event::PageDataStart { count: 1 })
    ));
    let (n, ev) = dec.feed(&s[24..100]).unwrap();
    assert_eq!((n, ev), (76, None));
    assert_eq!(dec.offset(), 100);
    assert!(dec.finish().is_err());
}

#[test]
fn errors_are_sticky() {
    let s = rec(0x13, &[]);
    let mut dec = Decoder::new(records_cfg());
    let e1 = dec.feed(&s).unwrap_err();
    let e2 = dec.feed(&rec(rec_type::END, &[])).unwrap_err();
    assert_eq!(e1, e2);
    assert_eq!(dec.finish(), Err(e1));
}

#[test]
fn encoder_argument_errors() {
    let mut out = Vec::new();
    assert_eq!(
        encode_page_data_header(&mut out, &[]),
        Err(StreamError::EncodeEntryCount { count: 0 })
    );
    let many = vec![(1u64, PageType::Notab); 1025];
    assert_eq!(
        encode_page_data_header(&mut out, &many),
        Err(StreamError::EncodeEntryCount { count: 1025 })
    );
    assert_eq!(
        encode_page_data_header(
            &mut out,
            &[(1, PageType::Notab), (1 << 52, PageType::Notab)]
        ),
        Err(StreamError::EncodePfnTooLarge {
            index: 1,
            pfn: 1 << 52
        })
    );
    assert!(out.is_empty(), "a failed encode leaves nothing behind");
    assert!(encode_page_data_header(&mut out, &many[..1024]).is_ok());
    assert_eq!(out.len(), 16 + 8 * 1024);
    Record::End.encode(&mut out);
}

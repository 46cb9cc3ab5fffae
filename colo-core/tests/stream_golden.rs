//! Golden fixtures: every record type written by hand from Xen's spec as byte arrays (not by the
//! encoder), decoded and compared, and encoded and compared byte for byte.

mod stream_common;

use colo_core::stream::{
    encode_dirty_pfn_list, encode_hvm_params, encode_page_data_header, encode_tsc_info, rec_type,
    DomainHeader, DomainType, HvmParams, ImageHeader, PageType, PfnList, Record, TscInfo,
};
use stream_common::*;

/// Image header, version 3, little-endian stream. All fields big-endian.
const IMAGE_V3: [u8; 24] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // marker
    0x58, 0x45, 0x4E, 0x46, // "XENF"
    0x00, 0x00, 0x00, 0x03, // version 3
    0x00, 0x00, // options: little-endian
    0x00, 0x00, // reserved
    0x00, 0x00, 0x00, 0x00, // reserved
];

/// Domain header: x86 HVM, page_shift 12, Xen 4.17. Little-endian.
const DOMAIN_HVM_4_17: [u8; 16] = [
    0x02, 0x00, 0x00, 0x00, // type 2 = x86 HVM
    0x0C, 0x00, // page_shift 12
    0x00, 0x00, // reserved
    0x04, 0x00, 0x00, 0x00, // xen_major 4
    0x11, 0x00, 0x00, 0x00, // xen_minor 17
];

/// Domain header: x86 PV, Xen 4.16.
const DOMAIN_PV_4_16: [u8; 16] = [
    0x01, 0x00, 0x00, 0x00, 0x0C, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00,
];

const END: [u8; 8] = [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
const VERIFY: [u8; 8] = [0x0D, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
const CHECKPOINT: [u8; 8] = [0x0E, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
const STATIC_DATA_END: [u8; 8] = [0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];

/// X86_TSC_INFO: mode 1, 2 400 000 kHz, nsec 0x0102030405060708, incarnation 5.
const TSC_INFO: [u8; 32] = [
    0x08, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00, // type 8, length 24
    0x01, 0x00, 0x00, 0x00, // mode
    0x00, 0x9F, 0x24, 0x00, // khz = 0x249F00
    0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // nsec
    0x05, 0x00, 0x00, 0x00, // incarnation
    0x00, 0x00, 0x00, 0x00, // reserved
];

/// HVM_CONTEXT with a 3-byte blob: 5 bytes of padding.
const HVM_CONTEXT: [u8; 16] = [
    0x09, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0xAB, 0xCD, 0xEF, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// HVM_PARAMS: (2, 0xFEE00000), (0x13, 1).
const HVM_PARAMS: [u8; 48] = [
    0x0A, 0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00, // type 0xA, length 40
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // count 2, reserved
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // index 2
    0x00, 0x00, 0xE0, 0xFE, 0x00, 0x00, 0x00, 0x00, // value 0xFEE00000
    0x13, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // index 0x13
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // value 1
];

/// CHECKPOINT_DIRTY_PFN_LIST, Xen 4.17 layout: plain 8-byte header, pfns 0x1234 and 0x10.
const DIRTY_PFN_LIST: [u8; 24] = [
    0x0F, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, // type 0xF, length 16
    0x34, 0x12, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // pfn 0x1234
    0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // pfn 0x10
];

/// X86_CPUID_POLICY holding one xen_cpuid_leaf {leaf 0, subleaf ~0, a, b, c, d}.
const CPUID_POLICY: [u8; 32] = [
    0x11, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00, // type 0x11, length 24
    0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, // leaf 0, subleaf none
    0x0D, 0x00, 0x00, 0x00, 0x47, 0x65, 0x6E, 0x75, // eax 13, ebx "Genu"
    0x6E, 0x74, 0x65, 0x6C, 0x69, 0x6E, 0x65, 0x49, // ecx "ntel", edx "ineI"
];

/// X86_MSR_POLICY holding one xen_msr_entry {idx 0xCE, flags 0, val 0x80000000}.
const MSR_POLICY: [u8; 24] = [
    0x12, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, // type 0x12, length 16
    0xCE, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // idx, flags
    0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, // val
];

/// X86_PV_INFO: guest width 8, 4 levels (surfaced as OtherXen).
const PV_INFO: [u8; 16] = [
    0x02, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x08, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// Optional record 0x8000_0001 with body "ab".
const OPTIONAL: [u8; 16] = [
    0x01, 0x00, 0x00, 0x80, 0x02, 0x00, 0x00, 0x00, 0x61, 0x62, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// PAGE_DATA header and pfn array: 3 entries, NOTAB 0x10, XTAB 0x11, L2TAB pinned 0x12;
/// two data pages follow, so length = 8 + 24 + 8192 = 0x2020.
const PAGE_DATA_HEAD: [u8; 40] = [
    0x01, 0x00, 0x00, 0x00, 0x20, 0x20, 0x00, 0x00, // type 1, length 0x2020
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // count 3, reserved
    0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // NOTAB pfn 0x10
    0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xF0, // XTAB pfn 0x11
    0x12, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xA0, // L2TAB|pinned pfn 0x12
];

/// PAGE_DATA of only no-data entries: BROKEN 7, XALLOC 8. Length 8 + 16 = 24.
const PAGE_DATA_NO_DATA: [u8; 32] = [
    0x01, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xD0, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xE0,
];

fn page_data_fixture() -> Vec<u8> {
    let mut v = PAGE_DATA_HEAD.to_vec();
    v.extend_from_slice(&[0x5A; 4096]);
    v.extend_from_slice(&[0xC3; 4096]);
    v
}

fn decode_one(bytes: &[u8]) -> Vec<Ev> {
    let (evs, res) = decode_all(records_cfg(), bytes);
    assert_eq!(res, Ok(()), "fixture {bytes:02x?}");
    let (evs1, res1) = decode_chunked(records_cfg(), bytes, &[1]);
    assert_eq!(res1, Ok(()));
    assert_eq!(evs, evs1, "byte-at-a-time differs");
    evs
}

fn encoded(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::new();
    f(&mut v);
    v
}

#[test]
fn image_header() {
    let (evs, res) = decode_chunked(headers_cfg(), &IMAGE_V3, &[1]);
    assert!(res.is_err(), "image header alone is a truncated stream");
    assert_eq!(evs, [Ev::Image(ImageHeader { version: 3 })]);
    assert_eq!(ImageHeader { version: 3 }.encode(), IMAGE_V3);
}

#[test]
fn domain_headers() {
    let hvm = DomainHeader {
        domain_type: DomainType::X86Hvm,
        page_shift: 12,
        xen_major: 4,
        xen_minor: 17,
    };
    let pv = DomainHeader {
        domain_type: DomainType::X86Pv,
        page_shift: 12,
        xen_major: 4,
        xen_minor: 16,
    };
    for (bytes, want) in [(DOMAIN_HVM_4_17, hvm), (DOMAIN_PV_4_16, pv)] {
        let mut s = IMAGE_V3.to_vec();
        s.extend_from_slice(&bytes);
        let (evs, res) = decode_all(headers_cfg(), &s);
        assert_eq!(res, Ok(()), "stream ends on a record boundary");
        assert_eq!(
            evs,
            [Ev::Image(ImageHeader { version: 3 }), Ev::Domain(want)]
        );
        assert_eq!(want.encode(), bytes);
    }
}

#[test]
fn empty_records() {
    for (bytes, ev, rec) in [
        (END, Ev::End, Record::End),
        (VERIFY, Ev::Verify, Record::Verify),
        (CHECKPOINT, Ev::Checkpoint, Record::Checkpoint),
        (STATIC_DATA_END, Ev::StaticDataEnd, Record::StaticDataEnd),
    ] {
        assert_eq!(decode_one(&bytes), [ev]);
        assert_eq!(encoded(|v| rec.encode(v)), bytes);
    }
}

#[test]
fn tsc_info() {
    let t = TscInfo {
        mode: 1,
        khz: 2_400_000,
        nsec: 0x0102_0304_0506_0708,
        incarnation: 5,
    };
    assert_eq!(decode_one(&TSC_INFO), [Ev::Tsc(t)]);
    assert_eq!(encoded(|v| encode_tsc_info(v, &t)), TSC_INFO);
    assert_eq!(encoded(|v| Record::TscInfo(t).encode(v)), TSC_INFO);
}

#[test]
fn hvm_context() {
    assert_eq!(
        decode_one(&HVM_CONTEXT),
        [Ev::HvmContext(vec![0xAB, 0xCD, 0xEF])]
    );
    assert_eq!(
        encoded(|v| Record::HvmContext(&[0xAB, 0xCD, 0xEF]).encode(v)),
        HVM_CONTEXT
    );
}

#[test]
fn hvm_params() {
    let p = [(2, 0xFEE0_0000), (0x13, 1)];
    assert_eq!(decode_one(&HVM_PARAMS), [Ev::HvmParams(p.to_vec())]);
    assert_eq!(encoded(|v| encode_hvm_params(v, &p)), HVM_PARAMS);
    let rec = Record::HvmParams(HvmParams::new(&HVM_PARAMS[16..]).unwrap());
    assert_eq!(encoded(|v| rec.encode(v)), HVM_PARAMS);
}

#[test]
fn dirty_pfn_list_4_17_layout() {
    assert_eq!(
        decode_one(&DIRTY_PFN_LIST),
        [Ev::DirtyPfns(vec![0x1234, 0x10])]
    );
    assert_eq!(
        encoded(|v| encode_dirty_pfn_list(v, [0x1234u64, 0x10].into_iter())),
        DIRTY_PFN_LIST
    );
    let rec = Record::CheckpointDirtyPfnList(PfnList::new(&DIRTY_PFN_LIST[8..]).unwrap());
    assert_eq!(encoded(|v| rec.encode(v)), DIRTY_PFN_LIST);
}

#[test]
fn cpuid_and_msr_policies() {
    assert_eq!(
        decode_one(&CPUID_POLICY),
        [Ev::Cpuid(CPUID_POLICY[8..].to_vec())]
    );
    assert_eq!(
        encoded(|v| Record::CpuidPolicy(&CPUID_POLICY[8..]).encode(v)),
        CPUID_POLICY
    );
    assert_eq!(decode_one(&MSR_POLICY), [Ev::Msr(MSR_POLICY[8..].to_vec())]);
    assert_eq!(
        encoded(|v| Record::MsrPolicy(&MSR_POLICY[8..]).encode(v)),
        MSR_POLICY
    );
}

#[test]
fn other_xen_and_optional_records() {
    assert_eq!(
        decode_one(&PV_INFO),
        [Ev::Other(
            rec_type::X86_PV_INFO,
            vec![8, 4, 0, 0, 0, 0, 0, 0]
        )]
    );
    let rec = Record::OtherXen {
        rtype: rec_type::X86_PV_INFO,
        body: &PV_INFO[8..],
    };
    assert_eq!(encoded(|v| rec.encode(v)), PV_INFO);
    assert_eq!(
        decode_one(&OPTIONAL),
        [Ev::Optional(0x8000_0001, b"ab".to_vec())]
    );
    let rec = Record::Optional {
        rtype: 0x8000_0001,
        body: b"ab",
    };
    assert_eq!(encoded(|v| rec.encode(v)), OPTIONAL);
}

#[test]
fn page_data() {
    let bytes = page_data_fixture();
    assert_eq!(
        decode_one(&bytes),
        [
            Ev::PageStart(3),
            Ev::Page(0x10, PageType::Notab, Some(vec![0x5A; 4096])),
            Ev::Page(0x11, PageType::Xtab, None),
            Ev::Page(0x12, PageType::L2Pinned, Some(vec![0xC3; 4096])),
            Ev::PageEnd,
        ]
    );
    let head = encoded(|v| {
        encode_page_data_header(
            v,
            &[
                (0x10, PageType::Notab),
                (0x11, PageType::Xtab),
                (0x12, PageType::L2Pinned),
            ],
        )
        .unwrap()
    });
    assert_eq!(head, PAGE_DATA_HEAD);
}

#[test]
fn page_data_without_data_pages() {
    assert_eq!(
        decode_one(&PAGE_DATA_NO_DATA),
        [
            Ev::PageStart(2),
            Ev::Page(7, PageType::Broken, None),
            Ev::Page(8, PageType::Xalloc, None),
            Ev::PageEnd,
        ]
    );
    let head = encoded(|v| {
        encode_page_data_header(v, &[(7, PageType::Broken), (8, PageType::Xalloc)]).unwrap()
    });
    assert_eq!(head, PAGE_DATA_NO_DATA);
}

#[test]
fn every_page_type_bits_and_data() {
    let want: [(PageType, u64, bool); 12] = [
        (PageType::Notab, 0x0, true),
        (PageType::L1, 0x1, true),
        (PageType::L2, 0x2, true),
        (PageType::L3, 0x3, true),
        (PageType::L4, 0x4, true),
        (PageType::L1Pinned, 0x9, true),
        (PageType::L2Pinned, 0xA, true),
        (PageType::L3Pinned, 0xB, true),
        (PageType::L4Pinned, 0xC, true),
        (PageType::Broken, 0xD, false),
        (PageType::Xalloc, 0xE, false),
        (PageType::Xtab, 0xF, false),
    ];
    for (t, bits, data) in want {
        assert_eq!(t.bits(), bits, "{t:?}");
        assert_eq!(t.has_data(), data, "{t:?}");
        assert_eq!(PageType::from_bits(bits), Some(t));
    }
    for bad in 5..=8 {
        assert_eq!(PageType::from_bits(bad), None);
    }
}

/// A whole hand-written HVM stream in Xen's order decodes to the expected event sequence.
#[test]
fn whole_hvm_stream() {
    let mut s = Vec::new();
    for part in [
        &IMAGE_V3[..],
        &DOMAIN_HVM_4_17,
        &CPUID_POLICY,
        &MSR_POLICY,
        &STATIC_DATA_END,
        &page_data_fixture(),
        &TSC_INFO,
        &HVM_CONTEXT,
        &HVM_PARAMS,
        &CHECKPOINT,
        &END,
    ] {
        s.extend_from_slice(part);
    }
    let (evs, res) = decode_all(headers_cfg(), &s);
    assert_eq!(res, Ok(()));
    assert_eq!(evs.len(), 2 + 3 + 5 + 5);
    assert_eq!(evs.last(), Some(&Ev::End));
    let (evs1, res1) = decode_chunked(headers_cfg(), &s, &[1]);
    assert_eq!(res1, Ok(()));
    assert_eq!(evs, evs1);
}

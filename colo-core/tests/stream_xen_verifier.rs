//! Writes streams for Xen's own verifier (`tools/python/scripts/verify-stream-v2`), which is not
//! vendored here. Run `cargo test -p colo-core --test stream_xen_verifier -- --ignored`, then
//! `python3 verify-stream-v2 -v -i /tmp/colo-stream.bin` with xen's `tools/python` on PYTHONPATH.
//! The non-ignored test checks that our own decoder accepts the same bytes.

mod stream_common;

use colo_core::stream::{
    encode_hvm_params, encode_page_data_header, encode_tsc_info, write_page_data, DomainHeader,
    DomainType, ImageHeader, PageType, Record, TscInfo,
};
use stream_common::*;

/// A plain HVM migration stream in Xen's order; with `checkpoints`, that many checkpoints of
/// PAGE_DATA .. HVM_PARAMS, CHECKPOINT follow the first, before END.
fn verifier_stream(checkpoints: usize) -> Vec<u8> {
    let mut out = ImageHeader { version: 3 }.encode().to_vec();
    out.extend_from_slice(
        &DomainHeader {
            domain_type: DomainType::X86Hvm,
            page_shift: 12,
            xen_major: 4,
            xen_minor: 17,
        }
        .encode(),
    );
    // Two xen_cpuid_leaf_t (24 bytes each) and two xen_msr_entry_t (16 bytes each).
    let mut cpuid = Vec::new();
    for (leaf, sub, a, b, c, d) in [
        (
            0u32,
            u32::MAX,
            0xD_u32,
            0x756E_6547_u32,
            0x6C65_746E_u32,
            0x4965_6E69_u32,
        ),
        (
            1,
            u32::MAX,
            0x000A_06A4,
            0x0010_0800,
            0x7FFA_FBFF,
            0xBFEB_FBFF,
        ),
    ] {
        for v in [leaf, sub, a, b, c, d] {
            cpuid.extend_from_slice(&v.to_le_bytes());
        }
    }
    Record::CpuidPolicy(&cpuid).encode(&mut out);
    let mut msr = Vec::new();
    for (idx, val) in [(0xCEu32, 0x8000_0000u64), (0x10A, 0)] {
        msr.extend_from_slice(&idx.to_le_bytes());
        msr.extend_from_slice(&0u32.to_le_bytes());
        msr.extend_from_slice(&val.to_le_bytes());
    }
    Record::MsrPolicy(&msr).encode(&mut out);
    Record::StaticDataEnd.encode(&mut out);
    for round in 0..=checkpoints {
        let n = if round == 0 { 1030 } else { 7 };
        let pages: Vec<Vec<u8>> = (0..n as u64).map(|i| page(i + round as u64)).collect();
        let refs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
        let pfns: Vec<u64> = (0..n as u64).map(|i| i * 2).collect();
        let mut scratch = Vec::new();
        write_page_data(&mut out, &pfns, &refs, &mut scratch).unwrap();
        let mixed = [
            (5000, PageType::L1),
            (5001, PageType::Xtab),
            (5002, PageType::L4Pinned),
            (5003, PageType::Broken),
            (5004, PageType::Xalloc),
        ];
        encode_page_data_header(&mut out, &mixed).unwrap();
        for (pfn, t) in mixed {
            if t.has_data() {
                out.extend_from_slice(&page(pfn));
            }
        }
        encode_tsc_info(
            &mut out,
            &TscInfo {
                mode: 0,
                khz: 2_400_000,
                nsec: 1_000_000 * (round as u64 + 1),
                incarnation: 1,
            },
        );
        Record::HvmContext(&[0x5A; 1234]).encode(&mut out);
        encode_hvm_params(&mut out, &[(2, 0xFEFF_F000), (5, 1), (0x13, 0xFEFF_E000)]);
        if checkpoints > 0 {
            Record::Checkpoint.encode(&mut out);
        }
    }
    Record::End.encode(&mut out);
    out
}

#[test]
fn verifier_streams_decode() {
    for c in [0, 2] {
        let s = verifier_stream(c);
        let (evs, res) = decode_all(headers_cfg(), &s);
        assert_eq!(res, Ok(()));
        assert_eq!(evs.last(), Some(&Ev::End));
        assert_eq!(
            evs.iter().filter(|e| **e == Ev::Checkpoint).count(),
            if c == 0 { 0 } else { c + 1 }
        );
    }
}

#[test]
#[ignore = "writes /tmp/colo-stream.bin and /tmp/colo-stream-ckpt.bin for Xen's verifier"]
fn write_verifier_streams() {
    std::fs::write("/tmp/colo-stream.bin", verifier_stream(0)).unwrap();
    std::fs::write("/tmp/colo-stream-ckpt.bin", verifier_stream(2)).unwrap();
}

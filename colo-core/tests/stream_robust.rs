//! Property tests: arbitrary bytes and mutated valid streams, fed in random chunk sizes, give Ok
//! or a typed error — never a panic — and the same events and result as one whole-buffer feed.

mod stream_common;

use colo_core::stream::{
    encode_dirty_pfn_list, encode_hvm_params, encode_page_data_header, encode_tsc_info,
    DecoderConfig, DomainHeader, DomainType, ImageHeader, PageType, Record, TscInfo,
};
use proptest::prelude::*;
use stream_common::*;

fn valid_stream() -> Vec<u8> {
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
    Record::CpuidPolicy(&[1; 24]).encode(&mut out);
    Record::StaticDataEnd.encode(&mut out);
    encode_page_data_header(
        &mut out,
        &[(3, PageType::Notab), (4, PageType::Xtab), (5, PageType::L1)],
    )
    .unwrap();
    out.extend_from_slice(&page(3));
    out.extend_from_slice(&page(5));
    encode_tsc_info(
        &mut out,
        &TscInfo {
            mode: 0,
            khz: 1000,
            nsec: 5,
            incarnation: 1,
        },
    );
    Record::HvmContext(&[5; 21]).encode(&mut out);
    encode_hvm_params(&mut out, &[(1, 2)]);
    Record::Checkpoint.encode(&mut out);
    encode_dirty_pfn_list(&mut out, [1u64, 2].into_iter());
    Record::Optional {
        rtype: 0x8000_0001,
        body: &[3; 5],
    }
    .encode(&mut out);
    Record::End.encode(&mut out);
    out
}

fn cfgs() -> impl Strategy<Value = DecoderConfig> {
    (any::<bool>(), prop::option::of(0u64..64)).prop_map(|(expect_headers, page_count)| {
        DecoderConfig {
            expect_headers,
            page_count,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        chunks in prop::collection::vec(1usize..64, 1..8),
        cfg in cfgs(),
    ) {
        let whole = decode_all(cfg, &bytes);
        let chunked = decode_chunked(cfg, &bytes, &chunks);
        prop_assert_eq!(whole, chunked);
    }

    #[test]
    fn record_like_bytes_never_panic(
        // Plausible record headers with small types and lengths reach deeper states than
        // uniformly random bytes.
        recs in prop::collection::vec(
            (0u32..0x14, 0u32..80, prop::collection::vec(any::<u8>(), 0..80)), 1..6),
        chunks in prop::collection::vec(1usize..32, 1..8),
        cfg in cfgs(),
    ) {
        let mut bytes = Vec::new();
        for (t, l, body) in recs {
            bytes.extend_from_slice(&t.to_le_bytes());
            bytes.extend_from_slice(&l.to_le_bytes());
            bytes.extend_from_slice(&body);
        }
        let cfg = DecoderConfig { expect_headers: false, ..cfg };
        prop_assert_eq!(decode_all(cfg, &bytes), decode_chunked(cfg, &bytes, &chunks));
    }

    #[test]
    fn mutated_valid_streams_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        chunks in prop::collection::vec(1usize..5000, 1..8),
        page_count in prop::option::of(0u64..16),
    ) {
        let mut bytes = valid_stream();
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= b;
        }
        if truncate {
            let c = cut.index(bytes.len());
            bytes.truncate(c);
        }
        let cfg = DecoderConfig { expect_headers: true, page_count };
        let whole = decode_all(cfg, &bytes);
        let chunked = decode_chunked(cfg, &bytes, &chunks);
        prop_assert_eq!(&whole, &chunked);
        let bytewise = decode_chunked(cfg, &bytes, &[1]);
        prop_assert_eq!(&whole, &bytewise);
    }
}

#[test]
fn the_unmutated_stream_is_valid() {
    let (evs, res) = decode_all(
        DecoderConfig {
            expect_headers: true,
            page_count: Some(16),
        },
        &valid_stream(),
    );
    assert_eq!(res, Ok(()));
    assert_eq!(evs.last(), Some(&Ev::End));
}

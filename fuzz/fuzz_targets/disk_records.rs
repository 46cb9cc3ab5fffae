//! Fuzz target: colo's disk records (DISK_BLOCKS, DISK_DIGEST) and HELLO with its disk size,
//! parsed from arbitrary bodies, must never panic; a body that parses must encode back to the
//! same bytes, and every block it names is either within the disk the input chooses or refused.
#![no_main]

use colo_core::disk::{Overlay, BLOCK_SIZE};
use colo_core::engine::messages::{colo_type, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&sel, rest)) = input.split_first() else {
        return;
    };
    let Some((disk, body)) = rest.split_at_checked(8) else {
        return;
    };
    let disk_blocks = u64::from_le_bytes(disk.try_into().unwrap_or([0; 8])) % 4096;
    let rtype = match sel % 3 {
        0 => colo_type::DISK_BLOCKS,
        1 => colo_type::DISK_DIGEST,
        _ => colo_type::HELLO,
    };
    let Ok(Some(m)) = Message::parse(rtype, body) else {
        return;
    };
    let mut out = Vec::new();
    m.encode(&mut out);
    let len = u32::from_le_bytes([out[4], out[5], out[6], out[7]]) as usize;
    assert_eq!(&out[8..8 + len], body, "a parsed body encodes back to itself");
    if let Message::DiskBlocks(d) = m {
        let ok = d.check(disk_blocks).is_ok();
        assert_eq!(ok, d.numbers().all(|b| b < disk_blocks));
        let mut overlay = Overlay::new();
        for (b, data) in d.iter() {
            assert_eq!(data.len(), BLOCK_SIZE);
            overlay.write(b, data).expect("whole blocks");
            assert_eq!(overlay.read(b), Some(data));
        }
        assert!(overlay.len() <= d.len());
    }
});

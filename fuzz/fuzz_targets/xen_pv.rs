//! Fuzz target: what colo's Xen PV network path takes from others — the vif trailer of a
//! checkpoint's state blob (the primary's) must decode or be refused, never panic, and encode
//! back to the same bytes; a guest's TX and RX rings and grant entries (the guest's, untrusted)
//! must never make the netif backend panic, hang or hand out a frame over 64 KiB.
#![no_main]

use std::sync::atomic::AtomicU32;

use colo_xen::grant::GrantTable;
use colo_xen::netif::{FrameError, GuestFrames, NetifBackend, SharedRing};
use colo_xen::pvstate::VifTrailer;
use libfuzzer_sys::fuzz_target;

/// Guest memory: every frame reads as a pattern; writes land nowhere.
struct Mem;

impl GuestFrames for Mem {
    fn read(&mut self, gfn: u64, offset: usize, out: &mut [u8]) -> Result<(), FrameError> {
        assert!(offset + out.len() <= 4096, "read past the page");
        out.iter_mut().for_each(|b| *b = gfn as u8);
        Ok(())
    }
    fn write(&mut self, _gfn: u64, offset: usize, data: &[u8]) -> Result<(), FrameError> {
        assert!(offset + data.len() <= 4096, "write past the page");
        Ok(())
    }
}

fn page(data: &[u8], at: usize) -> Vec<AtomicU32> {
    (0..1024)
        .map(|i| {
            let mut w = [0u8; 4];
            for (j, b) in w.iter_mut().enumerate() {
                *b = data.get(at + 4 * i + j).copied().unwrap_or(0);
            }
            AtomicU32::new(u32::from_le_bytes(w))
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    if let Ok((inner, t)) = VifTrailer::decode(data) {
        let mut again = inner.to_vec();
        t.encode(&mut again);
        assert_eq!(again, data, "a decoded trailer encodes back to other bytes");
    }
    let (tx, rx, gnt) = (page(data, 0), page(data, 4096), page(data, 8192));
    let (Ok(txr), Ok(rxr)) = (SharedRing::tx(&tx), SharedRing::rx(&rx)) else {
        return;
    };
    let Some(table) = GrantTable::new(vec![&gnt]) else {
        return;
    };
    if let Ok(mut be) = NetifBackend::attach(&txr, &rxr, 0) {
        let _ = be.poll_tx(&txr, &table, &mut Mem, |f| assert!(f.len() <= 65535));
        let frame = data.get(12288..).unwrap_or(&[]);
        let _ = be.deliver(&rxr, &table, &mut Mem, &frame[..frame.len().min(5000)]);
        be.push_rx(&rxr);
    }
});

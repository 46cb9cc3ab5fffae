//! Fuzz target: what colo's Xen PV disk path takes from the guest — a blkif ring and grant
//! entries (untrusted) — must never make the backend panic or hang, never touch a frame
//! outside its page or a block outside the disk, and leave the backend's index equal to the
//! `rsp_prod` it published; the vbd trailer of a checkpoint's state blob (the primary's) must
//! decode or be refused, never panic, and encode back to the same bytes.
#![no_main]

use std::sync::atomic::{AtomicU32, Ordering};

use colo_xen::blkif::{BlkRing, BlkifBackend, StoreError, VbdStore, BLOCK};
use colo_xen::grant::GrantTable;
use colo_xen::netif::{FrameError, GuestFrames};
use colo_xen::pvblkstate::VbdTrailer;
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

/// A 16-block disk that checks every access is inside it and whole blocks.
struct Disk([u8; 16 * BLOCK]);

impl VbdStore for Disk {
    fn block_count(&self) -> u64 {
        16
    }
    fn read(&mut self, first: u64, out: &mut [u8]) -> Result<(), StoreError> {
        assert!(out.len() % BLOCK == 0 && first as usize * BLOCK + out.len() <= self.0.len());
        let at = first as usize * BLOCK;
        out.copy_from_slice(&self.0[at..at + out.len()]);
        Ok(())
    }
    fn write(&mut self, first: u64, data: &[u8]) -> Result<(), StoreError> {
        assert!(data.len() % BLOCK == 0 && first as usize * BLOCK + data.len() <= self.0.len());
        let at = first as usize * BLOCK;
        self.0[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StoreError> {
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
    if let Ok((inner, t)) = VbdTrailer::decode(data) {
        let mut again = inner.to_vec();
        t.encode(&mut again);
        assert_eq!(again, data, "a decoded trailer encodes back to other bytes");
    }
    let (ring, gnt) = (page(data, 0), page(data, 4096));
    let Ok(r) = BlkRing::new(&ring) else { return };
    let Some(table) = GrantTable::new(vec![&gnt]) else {
        return;
    };
    let mut disk = Box::new(Disk([0; 16 * BLOCK]));
    if let Ok(mut be) = BlkifBackend::attach(&r, 0) {
        if be.serve(&r, &table, &mut Mem, disk.as_mut()).is_ok() {
            assert_eq!(be.consumed(), ring[2].load(Ordering::Relaxed));
        }
    }
});

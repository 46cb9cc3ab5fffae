//! Tests of colo's blkif backend against a blkfront written here from blkif.h and ring.h's
//! rules (what Linux's xen-blkfront does): grants, requests, the event indices, then the
//! backend's answers, checked against a plain byte model of the disk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use proptest::prelude::*;

use super::*;
use crate::grant::{permit, write_entry, GrantEntry, GrantTable};

fn page() -> Vec<AtomicU32> {
    (0..1024).map(|_| AtomicU32::new(0)).collect()
}

/// The guest's memory: frames by gfn.
#[derive(Default, Clone, PartialEq, Eq, Debug)]
struct Guest {
    frames: HashMap<u64, Vec<u8>>,
}

impl GuestFrames for Guest {
    fn read(&mut self, gfn: u64, offset: usize, out: &mut [u8]) -> Result<(), FrameError> {
        assert!(offset + out.len() <= 4096, "read past the page");
        let f = self.frames.get(&gfn).ok_or(FrameError {
            gfn,
            reason: "no such frame".into(),
        })?;
        out.copy_from_slice(&f[offset..offset + out.len()]);
        Ok(())
    }
    fn write(&mut self, gfn: u64, offset: usize, data: &[u8]) -> Result<(), FrameError> {
        assert!(offset + data.len() <= 4096, "write past the page");
        let f = self.frames.get_mut(&gfn).ok_or(FrameError {
            gfn,
            reason: "no such frame".into(),
        })?;
        f[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// An in-memory disk: what is written, what a flush made durable, and a switch to fail.
#[derive(Clone, PartialEq, Eq, Debug)]
struct MemStore {
    data: Vec<u8>,
    durable: Vec<u8>,
    flushes: u32,
    fail: bool,
}

impl MemStore {
    fn new(blocks: usize) -> Self {
        Self {
            data: vec![0; blocks * BLOCK],
            durable: vec![0; blocks * BLOCK],
            flushes: 0,
            fail: false,
        }
    }
}

impl VbdStore for MemStore {
    fn block_count(&self) -> u64 {
        (self.data.len() / BLOCK) as u64
    }
    fn read(&mut self, first: u64, out: &mut [u8]) -> Result<(), StoreError> {
        assert_eq!(out.len() % BLOCK, 0, "a read of part of a block");
        if self.fail {
            return Err(StoreError("injected".into()));
        }
        let at = first as usize * BLOCK;
        out.copy_from_slice(&self.data[at..at + out.len()]);
        Ok(())
    }
    fn write(&mut self, first: u64, data: &[u8]) -> Result<(), StoreError> {
        assert_eq!(data.len() % BLOCK, 0, "a write of part of a block");
        if self.fail {
            return Err(StoreError("injected".into()));
        }
        let at = first as usize * BLOCK;
        self.data[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.fail {
            return Err(StoreError("injected".into()));
        }
        self.durable.clone_from(&self.data);
        self.flushes += 1;
        Ok(())
    }
}

/// A blkfront: its ring, one grant frame, its memory and its private indices.
struct Front {
    ring: Vec<AtomicU32>,
    gnt: Vec<AtomicU32>,
    guest: Guest,
    next_gref: u32,
    next_gfn: u64,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

fn set(w: &[AtomicU32], at: usize, v: u32) {
    w[at].store(v, Ordering::Release);
}
fn get(w: &[AtomicU32], at: usize) -> u32 {
    w[at].load(Ordering::Acquire)
}

/// One response as the frontend reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rsp {
    id: u64,
    op: u8,
    status: i16,
}

/// A segment a test asks for: sectors `first..=last` of a fresh page.
type Seg = (u8, u8);

impl Front {
    /// A ring initialised with every index at `start` (SHARED_RING_INIT uses 0; a large start
    /// exercises the wrap of the 32-bit indices).
    fn new(start: u32) -> Self {
        let f = Front {
            ring: page(),
            gnt: page(),
            guest: Guest::default(),
            next_gref: 8,
            next_gfn: 0x2000,
            req_prod_pvt: start,
            rsp_cons: start,
        };
        set(&f.ring, 0, start);
        set(&f.ring, 1, start.wrapping_add(1));
        set(&f.ring, 2, start);
        set(&f.ring, 3, start.wrapping_add(1));
        f
    }

    fn grant(&mut self, readonly: bool, domid: u16) -> (u32, u64) {
        let (gref, gfn) = (self.next_gref, self.next_gfn);
        self.next_gref = 8 + (self.next_gref - 8 + 1) % 504;
        self.next_gfn += 1;
        self.guest.frames.insert(gfn, vec![0; 4096]);
        write_entry(
            &self.gnt,
            gref,
            GrantEntry {
                flags: permit(readonly),
                domid,
                frame: gfn as u32,
            },
        );
        (gref, gfn)
    }

    /// Writes a raw request at the next slot (not published).
    fn put_raw(&mut self, op: u8, nseg: u8, id: u64, sector: u64, segs: &[(u32, u8, u8)]) {
        let at = 16 + (self.req_prod_pvt % RING_SIZE) as usize * 28;
        let w = &self.ring[at..at + 28];
        w.iter()
            .for_each(|x| x.store(0xdead_beef, Ordering::Relaxed));
        w[0].store(
            u32::from(op) | u32::from(nseg) << 8 | 0x33 << 16,
            Ordering::Relaxed,
        );
        w[2].store(id as u32, Ordering::Relaxed);
        w[3].store((id >> 32) as u32, Ordering::Relaxed);
        w[4].store(sector as u32, Ordering::Relaxed);
        w[5].store((sector >> 32) as u32, Ordering::Relaxed);
        for (i, &(gref, f, l)) in segs.iter().enumerate().take(MAX_SEGMENTS) {
            w[6 + 2 * i].store(gref, Ordering::Relaxed);
            w[7 + 2 * i].store(u32::from(f) | u32::from(l) << 8, Ordering::Relaxed);
        }
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }

    /// Queues a read or write of `segs` (each a fresh page granted to dom0; a write's data is
    /// `data`, laid out over the segments in order). Returns each segment's gfn.
    fn put(&mut self, op: u8, id: u64, sector: u64, segs: &[Seg], data: &[u8]) -> Vec<u64> {
        let mut pos = 0;
        let mut raw = Vec::new();
        let mut gfns = Vec::new();
        for &(f, l) in segs {
            let (gref, gfn) = self.grant(false, 0);
            let (off, len) = (
                usize::from(f) * 512,
                (usize::from(l) + 1 - usize::from(f)) * 512,
            );
            if op != OP_READ {
                let page = self.guest.frames.get_mut(&gfn).unwrap();
                page[off..off + len].copy_from_slice(&data[pos..pos + len]);
            }
            pos += len;
            raw.push((gref, f, l));
            gfns.push(gfn);
        }
        self.put_raw(op, segs.len() as u8, id, sector, &raw);
        gfns
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`.
    fn publish(&mut self) -> bool {
        let old = get(&self.ring, 0);
        let new = self.req_prod_pvt;
        set(&self.ring, 0, new);
        let event = get(&self.ring, 1);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// Takes every published response, then `RING_FINAL_CHECK_FOR_RESPONSES`.
    fn responses(&mut self) -> Vec<Rsp> {
        let mut out = Vec::new();
        loop {
            let prod = get(&self.ring, 2);
            while self.rsp_cons != prod {
                let at = 16 + (self.rsp_cons % RING_SIZE) as usize * 28;
                let w = |i: usize| self.ring[at + i].load(Ordering::Relaxed);
                out.push(Rsp {
                    id: u64::from(w(0)) | u64::from(w(1)) << 32,
                    op: w(2) as u8,
                    status: (w(2) >> 16) as u16 as i16,
                });
                self.rsp_cons = self.rsp_cons.wrapping_add(1);
            }
            set(&self.ring, 3, self.rsp_cons.wrapping_add(1));
            if get(&self.ring, 2) == self.rsp_cons {
                return out;
            }
        }
    }

    fn serve(&mut self, be: &mut BlkifBackend, store: &mut MemStore) -> Served {
        let ring = BlkRing::new(&self.ring).unwrap();
        let table = GrantTable::new(vec![&self.gnt]).unwrap();
        let s = be.serve(&ring, &table, &mut self.guest, store).unwrap();
        assert_eq!(
            be.consumed(),
            get(&self.ring, 2),
            "the backend's index is not the published rsp_prod"
        );
        s
    }

    /// Reads back what a read request put into its segments' pages.
    fn gathered(&self, gfns: &[u64], segs: &[Seg]) -> Vec<u8> {
        let mut out = Vec::new();
        for (&gfn, &(f, l)) in gfns.iter().zip(segs) {
            let p = &self.guest.frames[&gfn];
            out.extend_from_slice(&p[usize::from(f) * 512..(usize::from(l) + 1) * 512]);
        }
        out
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn sectors(segs: &[Seg]) -> usize {
    segs.iter()
        .map(|&(f, l)| usize::from(l) + 1 - usize::from(f))
        .sum()
}

fn attach(front: &Front) -> BlkifBackend {
    BlkifBackend::attach(&BlkRing::new(&front.ring).unwrap(), 0).unwrap()
}

#[test]
fn the_slot_layout_is_the_x86_64_abi() {
    // blkif_request: 112 bytes; 32 of them after the 64-byte header fit a page.
    assert_eq!(
        HDR_WORDS * 4 + RING_SIZE as usize * SLOT_WORDS * 4,
        64 + 32 * 112
    );
    assert!((4096 - 64) / 112 >= RING_SIZE as usize && (4096 - 64) / 112 < 2 * RING_SIZE as usize);
    let mut f = Front::new(0);
    f.put_raw(
        OP_WRITE,
        2,
        0x0102_0304_0506_0708,
        0x1122_3344_5566_7788,
        &[(9, 1, 6), (10, 0, 7)],
    );
    let bytes: Vec<u8> = f.ring[16..16 + 28]
        .iter()
        .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
        .collect();
    assert_eq!(&bytes[0..4], &[1, 2, 0x33, 0]);
    assert_eq!(&bytes[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&bytes[16..24], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(&bytes[24..30], &[9, 0, 0, 0, 1, 6]);
    assert_eq!(&bytes[32..38], &[10, 0, 0, 0, 0, 7]);
    let r = read_request(&BlkRing::new(&f.ring).unwrap(), 0);
    assert_eq!(
        (r.op, r.nr_segments, r.id, r.sector),
        (1, 2, 0x0102_0304_0506_0708, 0x1122_3344_5566_7788)
    );
    // blkif_response: id u64 @0, operation u8 @8, status i16 @10.
    write_response(
        &BlkRing::new(&f.ring).unwrap(),
        0,
        0xaabb_ccdd_eeff_0011,
        3,
        -2,
    );
    let bytes: Vec<u8> = f.ring[16..19]
        .iter()
        .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
        .collect();
    assert_eq!(&bytes[0..8], &0xaabb_ccdd_eeff_0011u64.to_le_bytes());
    assert_eq!(bytes[8], 3);
    assert_eq!(&bytes[10..12], &(-2i16).to_le_bytes());
}

#[test]
fn writes_then_reads_round_trip_across_index_wraparound() {
    let mut f = Front::new(u32::MAX - 40);
    let mut store = MemStore::new(64);
    let mut be = attach(&f);
    let mut model = vec![0u8; 64 * BLOCK];
    // Three rounds of a ring's worth each, the indices wrap in the second.
    for round in 0..3u64 {
        let mut expect = Vec::new();
        for i in 0..RING_SIZE as u64 {
            let block = (round * 7 + i) % 60;
            let segs: &[Seg] = if i % 2 == 0 {
                &[(0, 7)]
            } else {
                &[(0, 3), (4, 7), (0, 7)]
            };
            let data = pattern(sectors(segs) * 512, (round * 40 + i) as u8);
            f.put(OP_WRITE, round << 32 | i, block * 8, segs, &data);
            let at = block as usize * BLOCK;
            model[at..at + data.len()].copy_from_slice(&data);
            expect.push(Rsp {
                id: round << 32 | i,
                op: OP_WRITE,
                status: RSP_OKAY,
            });
        }
        assert!(
            f.publish(),
            "the backend asked for a notification at its last check"
        );
        let s = f.serve(&mut be, &mut store);
        assert_eq!(s.ok, RING_SIZE);
        assert!(s.notify);
        assert_eq!(f.responses(), expect);
    }
    assert_eq!(store.data, model);
    // Read the whole disk back, 11 segments of 8 sectors (one block each) per request.
    let mut got = Vec::new();
    for r in 0..6u64 {
        let segs = [(0u8, 7u8); 11];
        let gfns = f.put(
            OP_READ,
            100 + r,
            r * 88,
            &segs[..if r == 5 { 9 } else { 11 }],
            &[],
        );
        f.publish();
        let s = f.serve(&mut be, &mut store);
        assert_eq!((s.ok, s.errors), (1, 0));
        assert_eq!(
            f.responses(),
            [Rsp {
                id: 100 + r,
                op: OP_READ,
                status: RSP_OKAY
            }]
        );
        got.extend(f.gathered(&gfns, &segs[..gfns.len()]));
    }
    assert_eq!(got, model);
}

#[test]
fn sector_granular_requests_keep_the_rest_of_their_blocks() {
    let mut f = Front::new(0);
    let mut store = MemStore::new(8);
    store.data = pattern(8 * BLOCK, 7);
    let mut model = store.data.clone();
    let mut be = attach(&f);
    // 5 sectors from sector 3 (inside block 0), then 13 sectors from sector 13 (blocks 1–3,
    // both ends partial), in segments not aligned to their pages either.
    for (sector, segs) in [(3u64, vec![(2u8, 6u8)]), (13, vec![(7, 7), (0, 5), (1, 6)])] {
        let data = pattern(sectors(&segs) * 512, sector as u8);
        f.put(OP_WRITE, sector, sector, &segs, &data);
        let at = sector as usize * 512;
        model[at..at + data.len()].copy_from_slice(&data);
    }
    f.publish();
    assert_eq!(f.serve(&mut be, &mut store).ok, 2);
    assert_eq!(store.data, model);
    let segs = [(1u8, 7u8), (0, 7), (0, 2)];
    let gfns = f.put(OP_READ, 9, 11, &segs, &[]);
    f.publish();
    let s = f.serve(&mut be, &mut store);
    assert_eq!((s.ok, s.sectors_read), (1, 18));
    assert_eq!(f.gathered(&gfns, &segs), model[11 * 512..29 * 512]);
}

#[test]
fn a_flush_makes_earlier_writes_durable_before_it_is_answered() {
    let mut f = Front::new(5);
    let mut store = MemStore::new(4);
    let mut be = attach(&f);
    let data = pattern(BLOCK, 1);
    f.put(OP_WRITE, 1, 8, &[(0, 7)], &data);
    f.publish();
    f.serve(&mut be, &mut store);
    assert_eq!(
        store.durable,
        vec![0; 4 * BLOCK],
        "a plain write is not flushed"
    );
    f.put_raw(OP_FLUSH_DISKCACHE, 0, 2, 0, &[]);
    f.publish();
    let s = f.serve(&mut be, &mut store);
    assert_eq!((s.ok, s.flushes), (1, 1));
    assert_eq!(&store.durable[BLOCK..2 * BLOCK], &data[..]);
    assert_eq!(
        f.responses()[1],
        Rsp {
            id: 2,
            op: OP_FLUSH_DISKCACHE,
            status: RSP_OKAY
        }
    );
    // A flush carrying data (blkfront's FUA write): written, then flushed.
    let data2 = pattern(BLOCK, 2);
    f.put(OP_FLUSH_DISKCACHE, 3, 24, &[(0, 7)], &data2);
    f.put(OP_WRITE_BARRIER, 4, 0, &[(0, 7)], &data2);
    f.publish();
    let s = f.serve(&mut be, &mut store);
    assert_eq!((s.ok, s.flushes, s.sectors_written), (2, 2, 16));
    assert_eq!(store.flushes, 3);
    assert_eq!(&store.durable[3 * BLOCK..], &data2[..]);
    assert_eq!(&store.durable[..BLOCK], &data2[..]);
}

#[test]
fn bad_requests_are_answered_error_or_eopnotsupp_and_the_ring_goes_on() {
    let mut f = Front::new(0);
    let mut store = MemStore::new(4);
    let mut be = attach(&f);
    let (g, _) = f.grant(false, 0);
    let (ro, _) = f.grant(true, 0);
    let (other, _) = f.grant(false, 9);
    /// operation, nr_segments, sector, segments, expected status.
    type Case = (u8, u8, u64, Vec<(u32, u8, u8)>, i16);
    let cases: Vec<Case> = vec![
        (OP_READ, 0, 0, vec![], RSP_ERROR),
        (OP_WRITE, 12, 0, vec![(g, 0, 7); 11], RSP_ERROR),
        (OP_READ, 1, 0, vec![(g, 5, 4)], RSP_ERROR),
        (OP_READ, 1, 0, vec![(g, 0, 8)], RSP_ERROR),
        (OP_READ, 1, 25, vec![(g, 0, 7)], RSP_ERROR),
        (OP_READ, 1, u64::MAX - 3, vec![(g, 0, 7)], RSP_ERROR),
        (OP_READ, 1, 0, vec![(ro, 0, 7)], RSP_ERROR),
        (OP_WRITE, 1, 0, vec![(other, 0, 7)], RSP_ERROR),
        (OP_WRITE, 1, 0, vec![(5000, 0, 7)], RSP_ERROR),
        (OP_DISCARD, 0, 0, vec![], RSP_EOPNOTSUPP),
        (OP_INDIRECT, 3, 0, vec![], RSP_EOPNOTSUPP),
        (4, 0, 0, vec![], RSP_EOPNOTSUPP),
        (200, 0, 0, vec![], RSP_EOPNOTSUPP),
        // A read-only grant is fine for a write, and the last sector of the disk is inside.
        (OP_WRITE, 1, 31, vec![(ro, 7, 7)], RSP_OKAY),
    ];
    for (i, (op, n, sector, segs, _)) in cases.iter().enumerate() {
        f.put_raw(*op, *n, 1000 + i as u64, *sector, segs);
    }
    f.publish();
    let s = f.serve(&mut be, &mut store);
    assert_eq!((s.ok, s.errors, s.unsupported), (1, 9, 4));
    let got = f.responses();
    let want: Vec<Rsp> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| Rsp {
            id: 1000 + i as u64,
            op: c.0,
            status: c.4,
        })
        .collect();
    assert_eq!(got, want);
    assert!(be.take_last_error().is_some());
    assert_eq!(
        store.data,
        vec![0; 4 * BLOCK],
        "nothing but zeros was written"
    );
    // A store failing: ERROR, and the next request after it is served.
    store.fail = true;
    f.put(OP_WRITE, 1, 0, &[(0, 7)], &pattern(BLOCK, 3));
    f.publish();
    assert_eq!(f.serve(&mut be, &mut store).errors, 1);
    store.fail = false;
    f.put(OP_WRITE, 2, 0, &[(0, 7)], &pattern(BLOCK, 3));
    f.publish();
    assert_eq!(f.serve(&mut be, &mut store).ok, 1);
    assert_eq!(&store.data[..BLOCK], &pattern(BLOCK, 3)[..]);
    assert_eq!(
        f.responses().iter().map(|r| r.status).collect::<Vec<_>>(),
        [RSP_ERROR, RSP_OKAY]
    );
}

#[test]
fn a_partly_published_batch_is_served_up_to_req_prod_and_the_rest_notifies() {
    let mut f = Front::new(1000);
    let mut store = MemStore::new(4);
    let mut be = attach(&f);
    for i in 0..3 {
        f.put(OP_WRITE, i, i * 8, &[(0, 7)], &pattern(BLOCK, i as u8));
    }
    // Publish only the first two (as a frontend between two RING_PUSH_REQUESTS).
    let pvt = f.req_prod_pvt;
    f.req_prod_pvt = pvt - 1;
    f.publish();
    assert_eq!(f.serve(&mut be, &mut store).ok, 2);
    assert_eq!(
        get(&f.ring, 1),
        1003,
        "req_event asks for the request after the last consumed"
    );
    assert_eq!(f.responses().len(), 2);
    f.req_prod_pvt = pvt;
    assert!(f.publish(), "the third request must notify");
    assert_eq!(f.serve(&mut be, &mut store).ok, 1);
    assert_eq!(&store.data[2 * BLOCK..3 * BLOCK], &pattern(BLOCK, 2)[..]);
    // Nothing new: no requests, no notification.
    let s = f.serve(&mut be, &mut store);
    assert_eq!((s.ok, s.notify), (0, false));
}

#[test]
fn responses_notify_only_when_the_frontend_waits_for_them() {
    let mut f = Front::new(0);
    let mut store = MemStore::new(2);
    let mut be = attach(&f);
    f.put_raw(OP_FLUSH_DISKCACHE, 0, 1, 0, &[]);
    f.publish();
    assert!(f.serve(&mut be, &mut store).notify);
    // The frontend has not looked at the response: its rsp_event still says 1.
    f.put_raw(OP_FLUSH_DISKCACHE, 0, 2, 0, &[]);
    f.publish();
    assert!(!f.serve(&mut be, &mut store).notify);
    f.responses();
    f.put_raw(OP_FLUSH_DISKCACHE, 0, 3, 0, &[]);
    f.publish();
    assert!(f.serve(&mut be, &mut store).notify);
}

#[test]
fn a_broken_ring_is_a_typed_error() {
    let mut f = Front::new(7);
    let mut store = MemStore::new(2);
    let mut be = attach(&f);
    set(&f.ring, 0, 7 + RING_SIZE + 1);
    let ring = BlkRing::new(&f.ring).unwrap();
    let table = GrantTable::new(vec![&f.gnt]).unwrap();
    assert_eq!(
        be.serve(&ring, &table, &mut f.guest, &mut store),
        Err(BlkifError::Overrun {
            req_prod: 7 + RING_SIZE + 1,
            req_cons: 7
        })
    );
    // Behind the backend.
    set(&f.ring, 0, 6);
    assert!(be.serve(&ring, &table, &mut f.guest, &mut store).is_err());
    assert!(BlkifBackend::attach(&ring, 0).is_err());
    // A full ring of flushes is fine.
    set(&f.ring, 0, 7 + RING_SIZE);
    let s = be.serve(&ring, &table, &mut f.guest, &mut store).unwrap();
    assert_eq!(s.ok + s.errors + s.unsupported, RING_SIZE);
    assert_eq!(get(&f.ring, 2), 7 + RING_SIZE);
    assert!(BlkRing::new(&f.ring[..1000]).is_err());
}

#[test]
fn a_replica_attached_to_copied_ring_bytes_answers_identically() {
    let mut f = Front::new(u32::MAX - 3);
    let mut store = MemStore::new(16);
    let mut be = attach(&f);
    for i in 0..5u64 {
        f.put(OP_WRITE, i, i * 8, &[(0, 7)], &pattern(BLOCK, i as u8));
    }
    f.publish();
    f.serve(&mut be, &mut store);
    f.responses();
    // Requests queued but not served when the checkpoint is taken.
    let segs = [(0u8, 7u8), (0, 7)];
    let gfns = f.put(OP_READ, 50, 8, &segs, &[]);
    f.put(OP_WRITE, 51, 64, &[(2, 5)], &pattern(2048, 9));
    f.put_raw(OP_FLUSH_DISKCACHE, 0, 52, 0, &[]);
    f.publish();
    // The checkpoint: ring, grant frame, guest memory and disk copied; a fresh backend.
    let copy = |w: &[AtomicU32]| -> Vec<AtomicU32> {
        w.iter()
            .map(|x| AtomicU32::new(x.load(Ordering::Relaxed)))
            .collect()
    };
    let mut g = Front {
        ring: copy(&f.ring),
        gnt: copy(&f.gnt),
        guest: f.guest.clone(),
        next_gref: f.next_gref,
        next_gfn: f.next_gfn,
        req_prod_pvt: f.req_prod_pvt,
        rsp_cons: f.rsp_cons,
    };
    let mut store2 = store.clone();
    let mut be2 = attach(&g);
    assert_eq!(be2.consumed(), be.consumed());
    let (a, b) = (f.serve(&mut be, &mut store), g.serve(&mut be2, &mut store2));
    assert_eq!(a, b);
    assert_eq!(a.ok, 3);
    let words = |w: &[AtomicU32]| {
        w.iter()
            .map(|x| x.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    };
    assert_eq!(words(&f.ring), words(&g.ring));
    assert_eq!(f.guest, g.guest);
    assert_eq!(store, store2);
    assert_eq!(
        f.gathered(&gfns, &segs),
        [pattern(BLOCK, 1), pattern(BLOCK, 2)].concat()
    );
    assert_eq!(f.responses(), g.responses());
}

/// One operation of a random workload.
#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        segs: Vec<Seg>,
        seed: u8,
    },
    Read {
        sector: u64,
        segs: Vec<Seg>,
    },
    Flush,
}

fn seg() -> impl Strategy<Value = Seg> {
    (0u8..8, 0u8..8).prop_map(|(a, b)| (a.min(b), a.max(b)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            0u64..140,
            proptest::collection::vec(seg(), 1..=11),
            any::<u8>()
        )
            .prop_map(|(sector, segs, seed)| Op::Write { sector, segs, seed }),
        (0u64..140, proptest::collection::vec(seg(), 1..=11))
            .prop_map(|(sector, segs)| Op::Read { sector, segs }),
        Just(Op::Flush),
    ]
}

proptest! {
    #[test]
    fn random_workloads_match_a_byte_model(
        start in any::<u32>(),
        batches in proptest::collection::vec(proptest::collection::vec(op(), 1..8), 1..12),
    ) {
        let blocks = 20usize;
        let mut f = Front::new(start);
        let mut store = MemStore::new(blocks);
        let mut be = attach(&f);
        let mut model = vec![0u8; blocks * BLOCK];
        let mut durable = model.clone();
        let mut id = 0u64;
        for batch in batches {
            let mut expect = Vec::new();
            let mut reads = Vec::new();
            for o in &batch {
                id += 1;
                match o {
                    Op::Write { sector, segs, seed } => {
                        let n = sectors(segs);
                        let data = pattern(n * 512, *seed);
                        f.put(OP_WRITE, id, *sector, segs, &data);
                        let fits = (*sector as usize + n) * 512 <= model.len();
                        if fits {
                            let at = *sector as usize * 512;
                            model[at..at + data.len()].copy_from_slice(&data);
                        }
                        expect.push(Rsp { id, op: OP_WRITE, status: if fits { RSP_OKAY } else { RSP_ERROR } });
                    }
                    Op::Read { sector, segs } => {
                        let n = sectors(segs);
                        let gfns = f.put(OP_READ, id, *sector, segs, &[]);
                        let fits = (*sector as usize + n) * 512 <= model.len();
                        if fits {
                            let at = *sector as usize * 512;
                            reads.push((gfns, segs.clone(), model[at..at + n * 512].to_vec()));
                        }
                        expect.push(Rsp { id, op: OP_READ, status: if fits { RSP_OKAY } else { RSP_ERROR } });
                    }
                    Op::Flush => {
                        durable.clone_from(&model);
                        f.put_raw(OP_FLUSH_DISKCACHE, 0, id, 0, &[]);
                        expect.push(Rsp { id, op: OP_FLUSH_DISKCACHE, status: RSP_OKAY });
                    }
                }
            }
            f.publish();
            f.serve(&mut be, &mut store);
            prop_assert_eq!(f.responses(), expect);
            for (gfns, segs, want) in reads {
                prop_assert_eq!(f.gathered(&gfns, &segs), want);
            }
            prop_assert_eq!(&store.data, &model);
            // Exactly what came before the last flush is durable.
            prop_assert_eq!(&store.durable, &durable);
        }
    }

    #[test]
    fn a_ring_of_garbage_never_panics_and_keeps_the_indices(
        words in proptest::collection::vec(any::<u32>(), 1024),
        gnt in proptest::collection::vec(any::<u32>(), 1024),
    ) {
        let ring: Vec<AtomicU32> = words.into_iter().map(AtomicU32::new).collect();
        let gnt: Vec<AtomicU32> = gnt.into_iter().map(AtomicU32::new).collect();
        let r = BlkRing::new(&ring).unwrap();
        let table = GrantTable::new(vec![&gnt]).unwrap();
        let mut store = MemStore::new(4);
        let mut guest = Guest::default();
        if let Ok(mut be) = BlkifBackend::attach(&r, 0) {
            if be.serve(&r, &table, &mut guest, &mut store).is_ok() {
                prop_assert_eq!(be.consumed(), get(&ring, 2));
                prop_assert_eq!(get(&ring, 0), get(&ring, 2));
            }
        }
    }
}

//! The backend half of Xen's PV block protocol (`blkif`, xen/include/public/io/blkif.h and
//! io/ring.h), served by colo from dom0 instead of the kernel's blkback: the requests a guest's
//! blkfront queues on its ring are read, done against a [`VbdStore`] and answered by
//! [`BlkifBackend::serve`].
//!
//! Like the vif's backend (`netif.rs`), this one keeps **no state outside the ring**: every
//! request is answered in the call that consumes it (synchronous I/O against the store), so
//! the backend's private indices (`req_cons`, `rsp_prod_pvt`) always equal the `rsp_prod` it
//! published in guest memory, and a replica's backend [`BlkifBackend::attach`]es to the
//! copied ring and derives them from it. Granted pages are resolved by colo
//! ([`crate::grant`]) and touched through the caller's [`GuestFrames`], never through grant
//! operations.
//!
//! # Ring layout (x86_64 ABI, `protocol = x86_64-abi`, little-endian, one 4 KiB page)
//! ```text
//!  bytes 0..16   req_prod u32, req_event u32, rsp_prod u32, rsp_event u32; 48 bytes pad
//!  then 32 slots of 112 bytes ((4096 - 64) / 112 = 36, rounded down to a power of two):
//!   request   operation u8 @0, nr_segments u8 @1, handle u16 @2, id u64 @8,
//!             sector_number u64 @16, seg[11] @24: gref u32, first_sect u8, last_sect u8 (8 each)
//!   response  id u64 @0, operation u8 @8, status i16 @10
//! ```
//! Every other request type (discard, indirect, "other") also has its `id` at byte 8, so even
//! an operation this backend does not serve is answered with the id the frontend gave.
//! `sector_number`, `first_sect` and `last_sect` count 512-byte sectors whatever the disk's
//! `sector-size`; a segment covers sectors `first_sect..=last_sect` of its 4 KiB page.
//!
//! # Operations
//! `READ` and `WRITE` (1–11 segments, a contiguous run of sectors from `sector_number`), and
//! `FLUSH_DISKCACHE` (the store is flushed before the answer; a flush that carries segments,
//! as blkfront sends for a FUA write when the backend offers barriers, writes them first).
//! `WRITE_BARRIER` is served as a flush (every earlier request is already done, since each is
//! answered when it is consumed); colo does not advertise it. `DISCARD`, `INDIRECT` and unknown
//! operations are not advertised and answered `EOPNOTSUPP`. Requests need not be 4 KiB
//! aligned: a write covering part of a block reads the block, patches it and writes it back.
//!
//! # Errors
//! Nothing the guest wrote is trusted. A request the guest described wrongly (no or more than
//! 11 segments, `first_sect > last_sect` or `last_sect > 7`, sectors past the disk, a grant
//! that does not permit the access), or one whose frames or store I/O failed, is answered
//! `ERROR` and the ring goes on, as blkback does. A ring the frontend broke (`req_prod` more
//! than a ring ahead) is a [`BlkifError`]: the caller stops serving that disk.

use std::sync::atomic::{fence, AtomicU32, Ordering};

use crate::grant::{Access, GrantTable};
use crate::netif::{FrameError, GuestFrames};

/// Slots per ring.
pub const RING_SIZE: u32 = 32;
/// The most segments one request may carry (`BLKIF_MAX_SEGMENTS_PER_REQUEST`).
pub const MAX_SEGMENTS: usize = 11;
/// Bytes of the store's blocks (and of the `sector-size` colo advertises).
pub const BLOCK: usize = 4096;
/// Bytes of one protocol sector.
pub const SECTOR: usize = 512;
const SECTORS_PER_BLOCK: u64 = (BLOCK / SECTOR) as u64;
const PAGE: usize = 4096;

const HDR_WORDS: usize = 16;
const SLOT_WORDS: usize = 28;
const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 1;
const RSP_PROD: usize = 2;
const RSP_EVENT: usize = 3;

/// `BLKIF_OP_READ`.
pub const OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`.
pub const OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER`.
pub const OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE`.
pub const OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_DISCARD`.
pub const OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT`.
pub const OP_INDIRECT: u8 = 6;

/// `BLKIF_RSP_OKAY`.
pub const RSP_OKAY: i16 = 0;
/// `BLKIF_RSP_ERROR`.
pub const RSP_ERROR: i16 = -1;
/// `BLKIF_RSP_EOPNOTSUPP`.
pub const RSP_EOPNOTSUPP: i16 = -2;

/// A ring the frontend broke, or a page too short to be one; the disk cannot be served on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlkifError {
    /// A ring page shorter than 4 KiB.
    #[error("a blkif ring page must be 1024 words, got {words}")]
    ShortPage {
        /// Words given.
        words: usize,
    },
    /// The frontend claims more requests than a ring holds, or moved its index back.
    #[error("blkif ring: the frontend's req_prod {req_prod} is more than {RING_SIZE} requests ahead of the backend, or behind its {req_cons}")]
    Overrun {
        /// The frontend's producer index.
        req_prod: u32,
        /// The backend's consumer index.
        req_cons: u32,
    },
}

/// The store's failure (I/O on the image, the overlay); the request is answered `ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("disk store: {0}")]
pub struct StoreError(pub String);

/// The disk behind the ring, as the backend uses it: 4 KiB blocks, read and written in runs
/// of consecutive blocks, and a flush that makes every write before it durable.
pub trait VbdStore {
    /// The disk's size in 4 KiB blocks.
    fn block_count(&self) -> u64;
    /// Reads `out.len() / 4096` blocks from `first` (`out` is whole blocks, inside the disk).
    fn read(&mut self, first: u64, out: &mut [u8]) -> Result<(), StoreError>;
    /// Writes `data` (whole blocks, inside the disk) from block `first`.
    fn write(&mut self, first: u64, data: &[u8]) -> Result<(), StoreError>;
    /// Makes every write done so far durable before returning.
    fn flush(&mut self) -> Result<(), StoreError>;
}

/// One ring page, as 1024 little-endian words the frontend writes concurrently.
#[derive(Debug, Clone, Copy)]
pub struct BlkRing<'a> {
    words: &'a [AtomicU32],
}

impl<'a> BlkRing<'a> {
    /// The ring in `words` (a 4 KiB page).
    pub fn new(words: &'a [AtomicU32]) -> Result<Self, BlkifError> {
        if words.len() < PAGE / 4 {
            return Err(BlkifError::ShortPage { words: words.len() });
        }
        Ok(Self { words })
    }

    fn load(&self, at: usize) -> u32 {
        self.words[at].load(Ordering::Acquire)
    }

    fn store(&self, at: usize, v: u32) {
        self.words[at].store(v, Ordering::Release);
    }

    fn slot(&self, idx: u32) -> &'a [AtomicU32] {
        let at = HDR_WORDS + (idx % RING_SIZE) as usize * SLOT_WORDS;
        &self.words[at..at + SLOT_WORDS]
    }

    /// Requests produced beyond `cons`, or the frontend's lie: a frontend may be at most a
    /// ring ahead of `published`, the responses it has seen (so one call never consumes more
    /// than a ring's worth, however the guest moves its index).
    fn unconsumed(&self, cons: u32, published: u32) -> Result<u32, BlkifError> {
        let prod = self.load(REQ_PROD);
        let ahead = prod.wrapping_sub(published);
        let n = prod.wrapping_sub(cons);
        // `n > ahead`: the index went back behind requests already consumed.
        if ahead > RING_SIZE || n > ahead {
            return Err(BlkifError::Overrun {
                req_prod: prod,
                req_cons: cons,
            });
        }
        Ok(n)
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publishes responses up to `pvt`; whether the
    /// frontend asked to be notified.
    fn push_responses(&self, pvt: u32) -> bool {
        let old = self.load(RSP_PROD);
        if old == pvt {
            return false;
        }
        self.store(RSP_PROD, pvt);
        fence(Ordering::SeqCst);
        let event = self.load(RSP_EVENT);
        pvt.wrapping_sub(event) < pvt.wrapping_sub(old)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: asks for a notification at the next request after
    /// `cons`, then looks once more.
    fn final_check(&self, cons: u32, published: u32) -> Result<bool, BlkifError> {
        self.store(REQ_EVENT, cons.wrapping_add(1));
        fence(Ordering::SeqCst);
        Ok(self.unconsumed(cons, published)? > 0)
    }
}

/// One segment as read from its request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Segment {
    gref: u32,
    first: u8,
    last: u8,
}

/// One request, copied out of its slot before anything is checked (the guest may rewrite
/// the slot at any time; the copy is what is served).
#[derive(Debug, Clone, Copy, Default)]
struct Request {
    op: u8,
    nr_segments: u8,
    id: u64,
    sector: u64,
    segs: [Segment; MAX_SEGMENTS],
}

fn read_request(ring: &BlkRing<'_>, idx: u32) -> Request {
    let s = ring.slot(idx);
    let w = |i: usize| s[i].load(Ordering::Relaxed);
    let mut r = Request {
        op: w(0) as u8,
        nr_segments: (w(0) >> 8) as u8,
        id: u64::from(w(2)) | u64::from(w(3)) << 32,
        sector: u64::from(w(4)) | u64::from(w(5)) << 32,
        ..Request::default()
    };
    for (i, seg) in r.segs.iter_mut().enumerate() {
        let (gref, b) = (w(6 + 2 * i), w(7 + 2 * i));
        *seg = Segment {
            gref,
            first: b as u8,
            last: (b >> 8) as u8,
        };
    }
    r
}

fn write_response(ring: &BlkRing<'_>, idx: u32, id: u64, op: u8, status: i16) {
    let s = ring.slot(idx);
    s[0].store(id as u32, Ordering::Relaxed);
    s[1].store((id >> 32) as u32, Ordering::Relaxed);
    s[2].store(
        u32::from(op) | u32::from(status as u16) << 16,
        Ordering::Relaxed,
    );
}

/// What one [`BlkifBackend::serve`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests answered `OKAY`.
    pub ok: u32,
    /// Requests answered `ERROR` (the guest's inconsistency, or a failed frame or store).
    pub errors: u32,
    /// Requests answered `EOPNOTSUPP`.
    pub unsupported: u32,
    /// Sectors read for the guest.
    pub sectors_read: u64,
    /// Sectors written for the guest.
    pub sectors_written: u64,
    /// Flushes of the store.
    pub flushes: u32,
    /// Whether the frontend must be notified of the responses (kick its event channel).
    pub notify: bool,
}

/// Why one request was answered `ERROR` (for the caller's log; the guest only sees `ERROR`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refused {
    Guest(&'static str),
    Grant(String),
    Frame(FrameError),
    Store(StoreError),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Guest(w) => f.write_str(w),
            Refused::Grant(e) => f.write_str(e),
            Refused::Frame(e) => write!(f, "{e}"),
            Refused::Store(e) => write!(f, "{e}"),
        }
    }
}

/// colo's backend for one disk's ring (one queue, one page, no indirect segments, no
/// persistent grants).
#[derive(Debug)]
pub struct BlkifBackend {
    /// The domain the guest granted its pages to (dom0: 0).
    backend_domid: u16,
    req_cons: u32,
    /// A request's blocks, reused (at most 12: 88 sectors from the last sector of a block).
    buf: Vec<u8>,
    /// The last request answered `ERROR` and why (for the caller's log).
    last_error: Option<String>,
}

impl BlkifBackend {
    /// A backend for a ring the frontend has just set up (or a replica's copied ring): its
    /// index is the ring's published `rsp_prod`, since it answers every request it consumes.
    pub fn attach(ring: &BlkRing<'_>, backend_domid: u16) -> Result<Self, BlkifError> {
        let req_cons = ring.load(RSP_PROD);
        ring.unconsumed(req_cons, req_cons)?;
        Ok(Self {
            backend_domid,
            req_cons,
            buf: Vec::with_capacity(12 * BLOCK),
            last_error: None,
        })
    }

    /// The index consumed (and answered, and published) up to.
    pub fn consumed(&self) -> u32 {
        self.req_cons
    }

    /// Why the last request answered `ERROR` was, taken (None if none since the last call).
    pub fn take_last_error(&mut self) -> Option<String> {
        self.last_error.take()
    }

    /// Serves every request the frontend published: each read, done against `store` and
    /// answered in ring order; the answers published once at the end, after the final check
    /// for requests (so the frontend notifies at its next request). Returns what was done and
    /// whether to notify the frontend.
    pub fn serve(
        &mut self,
        ring: &BlkRing<'_>,
        grants: &GrantTable<'_>,
        mem: &mut impl GuestFrames,
        store: &mut (impl VbdStore + ?Sized),
    ) -> Result<Served, BlkifError> {
        let mut done = Served::default();
        let r = self.consume(ring, grants, mem, store, &mut done);
        // Published even when the ring broke midway: what was answered stays answered.
        done.notify = ring.push_responses(self.req_cons);
        r.map(|()| done)
    }

    fn consume(
        &mut self,
        ring: &BlkRing<'_>,
        grants: &GrantTable<'_>,
        mem: &mut impl GuestFrames,
        store: &mut (impl VbdStore + ?Sized),
        done: &mut Served,
    ) -> Result<(), BlkifError> {
        let published = self.req_cons;
        loop {
            let avail = ring.unconsumed(self.req_cons, published)?;
            if avail == 0 {
                if ring.final_check(self.req_cons, published)? {
                    continue;
                }
                return Ok(());
            }
            for _ in 0..avail {
                let idx = self.req_cons;
                let req = read_request(ring, idx);
                let status = self.execute(&req, grants, mem, store, done);
                match status {
                    RSP_OKAY => done.ok += 1,
                    RSP_EOPNOTSUPP => done.unsupported += 1,
                    _ => done.errors += 1,
                }
                write_response(ring, idx, req.id, req.op, status);
                self.req_cons = idx.wrapping_add(1);
            }
        }
    }

    fn execute(
        &mut self,
        req: &Request,
        grants: &GrantTable<'_>,
        mem: &mut impl GuestFrames,
        store: &mut (impl VbdStore + ?Sized),
        done: &mut Served,
    ) -> i16 {
        let r = match req.op {
            OP_READ => self.read(req, grants, mem, store, done),
            OP_WRITE => self.write(req, grants, mem, store, done),
            OP_FLUSH_DISKCACHE | OP_WRITE_BARRIER => {
                let w = if req.nr_segments == 0 {
                    Ok(())
                } else {
                    self.write(req, grants, mem, store, done)
                };
                w.and_then(|()| {
                    done.flushes += 1;
                    store.flush().map_err(Refused::Store)
                })
            }
            _ => return RSP_EOPNOTSUPP,
        };
        match r {
            Ok(()) => RSP_OKAY,
            Err(why) => {
                self.last_error = Some(format!(
                    "request {:#x} (operation {}, sector {}): {why}",
                    req.id, req.op, req.sector
                ));
                RSP_ERROR
            }
        }
    }

    /// Checks the request's segments and sector range; returns (sectors, first block, blocks).
    fn layout(req: &Request, store_blocks: u64) -> Result<(u64, u64, u64), Refused> {
        let n = usize::from(req.nr_segments);
        if n == 0 {
            return Err(Refused::Guest("a read or write of no segments"));
        }
        if n > MAX_SEGMENTS {
            return Err(Refused::Guest("more than 11 segments"));
        }
        let mut sectors = 0u64;
        for s in &req.segs[..n] {
            if s.first > s.last || u64::from(s.last) >= SECTORS_PER_BLOCK {
                return Err(Refused::Guest(
                    "a segment's sectors are not first <= last <= 7",
                ));
            }
            sectors += u64::from(s.last - s.first) + 1;
        }
        let disk_sectors = store_blocks.saturating_mul(SECTORS_PER_BLOCK);
        match req.sector.checked_add(sectors) {
            Some(end) if end <= disk_sectors => {}
            _ => return Err(Refused::Guest("sectors past the end of the disk")),
        }
        let first_block = req.sector / SECTORS_PER_BLOCK;
        let end_block = (req.sector + sectors).div_ceil(SECTORS_PER_BLOCK);
        Ok((sectors, first_block, end_block - first_block))
    }

    fn gfns(
        &self,
        req: &Request,
        grants: &GrantTable<'_>,
        access: Access,
    ) -> Result<[u64; MAX_SEGMENTS], Refused> {
        let mut out = [0u64; MAX_SEGMENTS];
        for (o, s) in out
            .iter_mut()
            .zip(&req.segs[..usize::from(req.nr_segments)])
        {
            *o = grants
                .resolve(s.gref, self.backend_domid, access)
                .map_err(|e| Refused::Grant(e.to_string()))?;
        }
        Ok(out)
    }

    fn read(
        &mut self,
        req: &Request,
        grants: &GrantTable<'_>,
        mem: &mut impl GuestFrames,
        store: &mut (impl VbdStore + ?Sized),
        done: &mut Served,
    ) -> Result<(), Refused> {
        let (sectors, first, blocks) = Self::layout(req, store.block_count())?;
        let gfns = self.gfns(req, grants, Access::Write)?;
        self.buf.clear();
        self.buf.resize(blocks as usize * BLOCK, 0);
        store.read(first, &mut self.buf).map_err(Refused::Store)?;
        let mut pos = (req.sector % SECTORS_PER_BLOCK) as usize * SECTOR;
        for (s, &gfn) in req.segs[..usize::from(req.nr_segments)].iter().zip(&gfns) {
            let off = usize::from(s.first) * SECTOR;
            let len = (usize::from(s.last - s.first) + 1) * SECTOR;
            mem.write(gfn, off, &self.buf[pos..pos + len])
                .map_err(Refused::Frame)?;
            pos += len;
        }
        done.sectors_read += sectors;
        Ok(())
    }

    fn write(
        &mut self,
        req: &Request,
        grants: &GrantTable<'_>,
        mem: &mut impl GuestFrames,
        store: &mut (impl VbdStore + ?Sized),
        done: &mut Served,
    ) -> Result<(), Refused> {
        let (sectors, first, blocks) = Self::layout(req, store.block_count())?;
        let gfns = self.gfns(req, grants, Access::Read)?;
        self.buf.clear();
        self.buf.resize(blocks as usize * BLOCK, 0);
        let head = (req.sector % SECTORS_PER_BLOCK) as usize * SECTOR;
        let end = head + sectors as usize * SECTOR;
        // A block the request covers only in part keeps the rest of what it holds.
        if head != 0 {
            store
                .read(first, &mut self.buf[..BLOCK])
                .map_err(Refused::Store)?;
        }
        if end % BLOCK != 0 && (head == 0 || blocks > 1) {
            let last = self.buf.len() - BLOCK;
            store
                .read(first + blocks - 1, &mut self.buf[last..])
                .map_err(Refused::Store)?;
        }
        let mut pos = head;
        for (s, &gfn) in req.segs[..usize::from(req.nr_segments)].iter().zip(&gfns) {
            let off = usize::from(s.first) * SECTOR;
            let len = (usize::from(s.last - s.first) + 1) * SECTOR;
            mem.read(gfn, off, &mut self.buf[pos..pos + len])
                .map_err(Refused::Frame)?;
            pos += len;
        }
        store.write(first, &self.buf).map_err(Refused::Store)?;
        done.sectors_written += sectors;
        Ok(())
    }
}

#[cfg(test)]
#[path = "blkif_tests.rs"]
mod tests;

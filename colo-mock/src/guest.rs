//! Guest code: the RAM layout, the vCPU registers (the state blob) and the deterministic
//! workloads (`kv`, `dirty`, `idle`) executed one step at a time by the vCPU threads. The kv
//! service answers on UDP and on TCP (the TCP responder is `tcp.rs`), port [`KV_PORT`].
//!
//! Guest RAM layout (4 KiB pages):
//!
//! | pfn | content |
//! |---|---|
//! | 0 | NIC control: `rx_prod` @64 (host), `rx_cons` @128 (guest), `tx_prod` @192 (guest), `tx_cons` @256 (host); free-running u64 counters |
//! | 1..33 | RX ring: 64 slots × 2048 bytes (`len: u16 LE`, frame) |
//! | 33..65 | TX ring: 64 slots × 2048 bytes |
//! | 65.. | workload data: the kv hash table (`table_pages` buckets), then [`KV_HEAP_PAGES`], then the TCP service's connection table (one page, see `tcp.rs`); or the dirty workload's pages |
//!
//! Determinism: a step reads only guest RAM, the vCPU registers and host devices. Host devices
//! ([`HostDevices`]: an entropy source seeded by `vm_seed` and the wall clock) are per-VM and are
//! NOT part of the state blob, like RDRAND and a TSC, so replicas keep diverging after a
//! checkpoint. With the divergence knobs off, only RAM and registers matter.
//!
//! The disk (a host device too, when the VM has one): the `kv` workload persists its table to
//! it, write-through: after a PUT or DELETE it writes every table page the operation changed to
//! the disk block of that bucket and flushes the disk before it answers, so an acknowledged
//! write is on the disk. Disk layout ([`KV_DISK_MAGIC`]): block 0 is a header (`"COLOKVD1"`,
//! u64 table pages), block `1 + i` holds bucket page `i` exactly as in RAM (see
//! [`kv_table_from_disk`]). The `dirty` workload writes whole blocks at a rate of its own
//! ([`crate::DiskConfig::blocks_per_ms`]). Neither touches guest RAM or registers for the disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::disk::MockDisk;
use crate::frame::{self, KvOp, KvStatus, GUEST_IP, GUEST_MAC, KV_PORT, MAX_VALUE};
use crate::ram::GuestMem;
use crate::MockError;
use colo_core::PAGE_SIZE;

/// Byte offset of `rx_prod` (next request sequence number; written by the host).
pub const RX_PROD: usize = 64;
/// Byte offset of `rx_cons` (requests consumed by the guest).
pub const RX_CONS: usize = 128;
/// Byte offset of `tx_prod` (frames emitted by the guest).
pub const TX_PROD: usize = 192;
/// Byte offset of `tx_cons` (frames drained by the host).
pub const TX_CONS: usize = 256;
/// Slots per ring.
pub const RING_SLOTS: u64 = 64;
/// Bytes per ring slot.
pub const SLOT_BYTES: usize = 2048;
/// Longest frame a slot holds.
pub const MAX_FRAME: usize = SLOT_BYTES - 2;
/// Byte offset of the RX ring.
pub const RX_RING: usize = PAGE_SIZE;
/// Byte offset of the TX ring.
pub const TX_RING: usize = RX_RING + RING_SLOTS as usize * SLOT_BYTES;
/// First pfn of workload data.
pub const DATA_PFN: u64 = ((TX_RING + RING_SLOTS as usize * SLOT_BYTES) / PAGE_SIZE) as u64;

/// Pages after the kv table that model the guest allocator's bookkeeping: with memory
/// divergence each PUT also touches one of them, picked by the per-VM entropy device, the way a
/// real guest's allocator and caches touch different pages on two replicas. This is what makes
/// the secondary dirty pages the primary did not (B − A ≠ ∅).
pub const KV_HEAP_PAGES: u64 = 64;

const SLOT: usize = 128;
const SLOTS_PER_PAGE: usize = PAGE_SIZE / SLOT;
const KEY_OFF: usize = 4;
const VAL_OFF: usize = KEY_OFF + frame::MAX_KEY;
const _: () = assert!(VAL_OFF + MAX_VALUE == SLOT);
const _: () = assert!(DATA_PFN == 65);

/// What the guest runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// Nothing: RAM never changes.
    Idle,
    /// The key-value server.
    Kv(KvConfig),
    /// Random page writer for benchmarks.
    Dirty(DirtyConfig),
}

impl Workload {
    fn tag(&self) -> u8 {
        match self {
            Workload::Idle => 0,
            Workload::Kv(_) => 1,
            Workload::Dirty(_) => 2,
        }
    }

    /// Number of vCPU threads.
    pub fn vcpus(&self) -> usize {
        match self {
            Workload::Dirty(d) => d.vcpus.clamp(1, 64) as usize,
            _ => 1,
        }
    }

    /// Pages of RAM the workload needs at least.
    pub fn min_pages(&self) -> u64 {
        match self {
            Workload::Idle => DATA_PFN,
            Workload::Kv(k) => crate::tcp::tcb_pfn(k) + 1,
            Workload::Dirty(_) => DATA_PFN + 1,
        }
    }
}

/// Configuration of the kv workload.
#[derive(Debug, Clone, PartialEq)]
pub struct KvConfig {
    /// Hash-table buckets, one page each (31 entries per page).
    pub table_pages: u64,
    /// Place new entries in a slot chosen by the per-VM entropy device, so replicas' memories
    /// differ while their answers stay identical.
    pub memory_divergence: bool,
    /// Fraction (0..=1) of responses that carry the per-VM clock, so answers differ.
    pub output_divergence: f64,
}

impl Default for KvConfig {
    fn default() -> Self {
        Self {
            table_pages: 256,
            memory_divergence: false,
            output_divergence: 0.0,
        }
    }
}

/// Configuration of the dirty workload.
#[derive(Debug, Clone, PartialEq)]
pub struct DirtyConfig {
    /// Pages dirtied per millisecond across all vCPUs; 0 = none (the vCPUs idle),
    /// [`DirtyConfig::UNLIMITED`] = as fast as possible.
    pub pages_per_ms: u64,
    /// vCPU threads (1..=64); each writes its own 8-byte lane of a page, so the result is
    /// deterministic for given per-vCPU step counts.
    pub vcpus: u32,
}

impl DirtyConfig {
    /// `pages_per_ms` value for "as fast as the vCPUs can".
    pub const UNLIMITED: u64 = u64::MAX;
}

impl Default for DirtyConfig {
    fn default() -> Self {
        Self {
            pages_per_ms: 100,
            vcpus: 1,
        }
    }
}

/// One vCPU's registers: the guest state outside RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VcpuRegs {
    /// Program counter: steps executed.
    pub pc: u64,
    /// The guest's own clock (virtual ns; advances 1 µs per step).
    pub clock: u64,
    /// The guest's RNG state (splitmix64).
    pub rng: u64,
    /// General registers (kv: r0 requests answered, r1 frames dropped, r2 divergent answers).
    pub r: [u64; 4],
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl VcpuRegs {
    /// Registers of a freshly booted vCPU `idx` (identical on every replica).
    pub fn boot(idx: usize) -> Self {
        Self {
            rng: 0x00C0_10C0_10C0_10C0 ^ (idx as u64).wrapping_mul(0x9E37_79B9),
            ..Self::default()
        }
    }

    fn rand(&mut self) -> u64 {
        splitmix(&mut self.rng)
    }
}

/// Per-VM host devices: not checkpointed (like RDRAND and the TSC), and the VM's disk.
#[derive(Debug)]
pub struct HostDevices {
    entropy: u64,
    disk: Option<Arc<MockDisk>>,
}

impl HostDevices {
    /// Devices of vCPU `idx` of a VM with `vm_seed`.
    pub fn new(vm_seed: u64, idx: usize) -> Self {
        Self {
            entropy: vm_seed ^ (idx as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93),
            disk: None,
        }
    }

    /// The same devices with `disk` attached.
    pub fn with_disk(mut self, disk: Option<Arc<MockDisk>>) -> Self {
        self.disk = disk;
        self
    }

    /// The VM's disk, if it has one.
    pub fn disk(&self) -> Option<&MockDisk> {
        self.disk.as_deref()
    }

    /// A random number from the per-VM entropy device.
    pub fn entropy(&mut self) -> u64 {
        splitmix(&mut self.entropy)
    }

    /// The host wall clock, ns since the Unix epoch.
    pub fn clock_ns(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}

/// Outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Guest state changed.
    Progress,
    /// Guest state changed and a frame went into the TX ring.
    Emitted,
    /// Nothing to do (no request, TX full, idle workload); nothing changed.
    Idle,
}

/// Per-vCPU working buffers (host memory, empty between steps, so not guest state).
#[derive(Debug)]
pub struct Scratch {
    rx: Vec<u8>,
    tx: Vec<u8>,
    payload: Vec<u8>,
    page: Vec<u8>,
    /// Table pages the current kv operation changed (to persist).
    touched: Vec<u64>,
    /// Disk blocks the dirty workload wrote (host-side counter, stamped into each block).
    disk_writes: u64,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            rx: vec![0; MAX_FRAME],
            tx: Vec::with_capacity(SLOT_BYTES),
            payload: Vec::with_capacity(SLOT_BYTES),
            page: vec![0; PAGE_SIZE],
            touched: Vec::with_capacity(4),
            disk_writes: 0,
        }
    }
}

/// Runs one step of `workload` on vCPU `idx` of `nvcpus`.
pub fn step(
    workload: &Workload,
    mem: &GuestMem,
    regs: &mut VcpuRegs,
    dev: &mut HostDevices,
    scratch: &mut Scratch,
    idx: usize,
    nvcpus: usize,
) -> Result<Step, MockError> {
    match workload {
        Workload::Idle => Ok(Step::Idle),
        Workload::Kv(cfg) => kv_step(cfg, mem, regs, dev, scratch),
        Workload::Dirty(_) => {
            let pages = mem.pages();
            let r = regs.rand();
            let pfn = DATA_PFN + r % (pages - DATA_PFN).max(1);
            let lanes = (PAGE_SIZE / 8 / nvcpus.max(1)) as u64;
            let word = ((r >> 32) % lanes.max(1)) as usize * nvcpus + idx;
            mem.write_u64(pfn as usize * PAGE_SIZE + word * 8, regs.pc ^ r)?;
            regs.pc += 1;
            regs.clock += 1000;
            Ok(Step::Progress)
        }
    }
}

fn kv_step(
    cfg: &KvConfig,
    mem: &GuestMem,
    regs: &mut VcpuRegs,
    dev: &mut HostDevices,
    s: &mut Scratch,
) -> Result<Step, MockError> {
    let rx_prod = mem.atomic_u64(RX_PROD)?;
    let rx_cons = mem.atomic_u64(RX_CONS)?;
    let tx_prod = mem.atomic_u64(TX_PROD)?;
    let tx_cons = mem.atomic_u64(TX_CONS)?;
    use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
    let cons = rx_cons.load(Relaxed);
    if cons == rx_prod.load(Acquire) {
        return Ok(Step::Idle);
    }
    let tp = tx_prod.load(Relaxed);
    if tp.wrapping_sub(tx_cons.load(Acquire)) >= RING_SLOTS {
        return Ok(Step::Idle);
    }
    let slot = RX_RING + (cons % RING_SLOTS) as usize * SLOT_BYTES;
    let mut lb = [0u8; 2];
    mem.read(slot, &mut lb)?;
    let len = usize::from(u16::from_le_bytes(lb)).min(MAX_FRAME);
    mem.read(slot + 2, &mut s.rx[..len])?;
    // The RNG draw happens for every request so both replicas stay in lockstep.
    let diverge_draw = regs.rand();
    let mut emitted = false;
    if kv_answer(cfg, mem, regs, dev, s, len, diverge_draw)? {
        let tslot = TX_RING + (tp % RING_SLOTS) as usize * SLOT_BYTES;
        let n = s.tx.len().min(MAX_FRAME);
        mem.write(tslot, &(n as u16).to_le_bytes())?;
        mem.write(tslot + 2, &s.tx[..n])?;
        tx_prod.store(tp + 1, Release);
        regs.r[0] += 1;
        emitted = true;
    } else {
        regs.r[1] += 1;
    }
    rx_cons.store(cons + 1, Release);
    regs.pc += 1;
    regs.clock += 1000;
    Ok(if emitted {
        Step::Emitted
    } else {
        Step::Progress
    })
}

/// Builds the response to the request in `s.rx[..len]` into `s.tx`; false = frame dropped.
fn kv_answer(
    cfg: &KvConfig,
    mem: &GuestMem,
    regs: &mut VcpuRegs,
    dev: &mut HostDevices,
    s: &mut Scratch,
    len: usize,
    diverge_draw: u64,
) -> Result<bool, MockError> {
    let Scratch {
        rx,
        tx,
        payload,
        page,
        touched,
        ..
    } = s;
    let Ok(v) = frame::parse_udp(&rx[..len]) else {
        return crate::tcp::answer(cfg, mem, dev, &rx[..len], tx, payload, page, touched);
    };
    if v.dst_port != KV_PORT || v.dst_ip != GUEST_IP {
        return Ok(false);
    }
    let mut value = [0u8; MAX_VALUE];
    let (id, status, vlen) = match frame::decode_request(v.payload) {
        Err((id, _)) => (id.unwrap_or(0), KvStatus::BadRequest, 0),
        Ok(req) => {
            let (st, n) = kv_execute(cfg, mem, dev, &req, page, touched, &mut value)?;
            (req.id, st, n)
        }
    };
    let diverge = ((diverge_draw >> 11) as f64 / (1u64 << 53) as f64) < cfg.output_divergence;
    let extra = if diverge {
        regs.r[2] += 1;
        Some(dev.clock_ns())
    } else {
        None
    };
    frame::encode_response(id, status, &value[..vlen], extra, payload)
        .and_then(|()| {
            frame::build_udp(
                (&GUEST_MAC, &GUEST_IP, KV_PORT),
                (&v.src_mac, &v.src_ip, v.src_port),
                payload,
                tx,
            )
        })
        .map_err(|e| MockError::Guest(e.to_string()))?;
    Ok(true)
}

/// Executes one kv request on the table in guest RAM (and its disk, write-through): the
/// status and the length of the value a GET put in `value`. Shared by the UDP and TCP services.
pub(crate) fn kv_execute(
    cfg: &KvConfig,
    mem: &GuestMem,
    dev: &mut HostDevices,
    req: &frame::KvRequest<'_>,
    page: &mut [u8],
    touched: &mut Vec<u64>,
    value: &mut [u8; MAX_VALUE],
) -> Result<(KvStatus, usize), MockError> {
    let t = Table {
        mem,
        pages: cfg.table_pages.max(1),
    };
    touched.clear();
    let (st, n) = match req.op {
        KvOp::Get => t.get(req.key, page, value)?,
        KvOp::Put => (
            t.put(
                req.key,
                req.value,
                page,
                touched,
                cfg.memory_divergence.then_some(&mut *dev),
            )?,
            0,
        ),
        KvOp::Delete => (t.delete(req.key, page, touched)?, 0),
    };
    if let Some(disk) = dev.disk() {
        t.persist(disk, touched, page)?;
    }
    Ok((st, n))
}

/// The kv hash table: bucket = page; slot 0 of a page is its header (byte 0: overflow flag),
/// slots 1..32 hold entries `[used:u8][klen:u8][vlen:u16 LE][key; 32][value; 92]`.
struct Table<'a> {
    mem: &'a GuestMem,
    pages: u64,
}

impl Table<'_> {
    fn page_off(&self, i: u64) -> usize {
        (DATA_PFN + i) as usize * PAGE_SIZE
    }

    fn bucket(&self, key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(key) % self.pages
    }

    fn matches(page: &[u8], slot: usize, key: &[u8]) -> bool {
        let e = &page[slot * SLOT..(slot + 1) * SLOT];
        e[0] == 1 && usize::from(e[1]) == key.len() && &e[KEY_OFF..KEY_OFF + key.len()] == key
    }

    /// Finds `key`: (bucket index, slot). Leaves the bucket's page in `page`.
    fn find(&self, key: &[u8], page: &mut [u8]) -> Result<Option<(u64, usize)>, MockError> {
        let b = self.bucket(key);
        for i in 0..self.pages {
            let p = (b + i) % self.pages;
            self.mem.read(self.page_off(p), page)?;
            if let Some(slot) = (1..SLOTS_PER_PAGE).find(|&s| Self::matches(page, s, key)) {
                return Ok(Some((p, slot)));
            }
            if page[0] == 0 {
                break;
            }
        }
        Ok(None)
    }

    fn get(
        &self,
        key: &[u8],
        page: &mut [u8],
        out: &mut [u8; MAX_VALUE],
    ) -> Result<(KvStatus, usize), MockError> {
        match self.find(key, page)? {
            None => Ok((KvStatus::NotFound, 0)),
            Some((_, slot)) => {
                let e = &page[slot * SLOT..(slot + 1) * SLOT];
                let n = usize::from(u16::from_le_bytes([e[2], e[3]])).min(MAX_VALUE);
                out[..n].copy_from_slice(&e[VAL_OFF..VAL_OFF + n]);
                Ok((KvStatus::Ok, n))
            }
        }
    }

    fn write_entry(&self, p: u64, slot: usize, key: &[u8], value: &[u8]) -> Result<(), MockError> {
        let mut e = [0u8; SLOT];
        e[0] = 1;
        e[1] = key.len() as u8;
        e[2..4].copy_from_slice(&(value.len() as u16).to_le_bytes());
        e[KEY_OFF..KEY_OFF + key.len()].copy_from_slice(key);
        e[VAL_OFF..VAL_OFF + value.len()].copy_from_slice(value);
        self.mem.write(self.page_off(p) + slot * SLOT, &e)
    }

    /// Write-through: the table pages in `touched` go to their disk blocks, then the disk is
    /// flushed, before the answer leaves the guest. Nothing to do for a read.
    fn persist(&self, disk: &MockDisk, touched: &[u64], page: &mut [u8]) -> Result<(), MockError> {
        if touched.is_empty() {
            return Ok(());
        }
        for &p in touched {
            self.mem.read(self.page_off(p), page)?;
            disk.guest_write(1 + p, page)?;
        }
        disk.guest_flush()
    }

    fn put(
        &self,
        key: &[u8],
        value: &[u8],
        page: &mut [u8],
        touched: &mut Vec<u64>,
        mut entropy: Option<&mut HostDevices>,
    ) -> Result<KvStatus, MockError> {
        if let Some((p, slot)) = self.find(key, page)? {
            self.write_entry(p, slot, key, value)?;
            touched.push(p);
            return Ok(KvStatus::Ok);
        }
        let b = self.bucket(key);
        for i in 0..self.pages {
            let p = (b + i) % self.pages;
            self.mem.read(self.page_off(p), page)?;
            let mut free = [0usize; SLOTS_PER_PAGE];
            let mut n = 0;
            for s in 1..SLOTS_PER_PAGE {
                if page[s * SLOT] == 0 {
                    free[n] = s;
                    n += 1;
                }
            }
            if n > 0 {
                let pick = match entropy.as_deref_mut() {
                    Some(d) => free[(d.entropy() % n as u64) as usize],
                    None => free[0],
                };
                self.write_entry(p, pick, key, value)?;
                touched.push(p);
                if let Some(d) = entropy.as_deref_mut() {
                    let r = d.entropy();
                    let heap = self.page_off(self.pages + r % KV_HEAP_PAGES);
                    let off = ((r >> 32) % (PAGE_SIZE as u64 / 8)) as usize * 8;
                    self.mem.write(heap + off, &r.to_le_bytes())?;
                }
                return Ok(KvStatus::Ok);
            }
            if page[0] == 0 {
                self.mem.write(self.page_off(p), &[1])?;
                touched.push(p);
            }
        }
        Ok(KvStatus::TableFull)
    }

    fn delete(
        &self,
        key: &[u8],
        page: &mut [u8],
        touched: &mut Vec<u64>,
    ) -> Result<KvStatus, MockError> {
        match self.find(key, page)? {
            None => Ok(KvStatus::NotFound),
            Some((p, slot)) => {
                self.mem
                    .write(self.page_off(p) + slot * SLOT, &[0u8; SLOT])?;
                touched.push(p);
                Ok(KvStatus::Ok)
            }
        }
    }
}

/// Magic of block 0 of a kv guest's disk.
pub const KV_DISK_MAGIC: [u8; 8] = *b"COLOKVD1";

/// Disk blocks a kv table of `table_pages` pages needs: the header and one per bucket.
pub fn kv_disk_blocks(table_pages: u64) -> u64 {
    1 + table_pages.max(1)
}

/// Block 0 of a kv guest's disk for a table of `table_pages` pages.
pub fn kv_disk_header(table_pages: u64) -> [u8; PAGE_SIZE] {
    let mut b = [0u8; PAGE_SIZE];
    b[..8].copy_from_slice(&KV_DISK_MAGIC);
    b[8..16].copy_from_slice(&table_pages.max(1).to_le_bytes());
    b
}

/// Adds the entries of one bucket page (as in RAM, as on disk) to `out`.
fn bucket_entries(page: &[u8], out: &mut BTreeMap<Vec<u8>, Vec<u8>>) {
    for s in 1..SLOTS_PER_PAGE {
        let e = &page[s * SLOT..(s + 1) * SLOT];
        if e[0] != 1 {
            continue;
        }
        let k = usize::from(e[1]).min(frame::MAX_KEY);
        let v = usize::from(u16::from_le_bytes([e[2], e[3]])).min(MAX_VALUE);
        out.insert(
            e[KEY_OFF..KEY_OFF + k].to_vec(),
            e[VAL_OFF..VAL_OFF + v].to_vec(),
        );
    }
}

/// The kv table a disk image holds (read offline: key → value), from its header on.
pub fn kv_table_from_disk(image: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, String> {
    let header = image
        .get(..PAGE_SIZE)
        .ok_or_else(|| format!("a disk image of {} bytes has no header block", image.len()))?;
    if header[..8] != KV_DISK_MAGIC {
        return Err(format!(
            "block 0 is not a kv disk header: {:02x?}",
            &header[..8]
        ));
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&header[8..16]);
    let pages = u64::from_le_bytes(w);
    let need = kv_disk_blocks(pages) as usize * PAGE_SIZE;
    if image.len() < need {
        return Err(format!(
            "the header names {pages} table pages but the image has {} bytes",
            image.len()
        ));
    }
    let mut out = BTreeMap::new();
    for page in image[PAGE_SIZE..need].chunks_exact(PAGE_SIZE) {
        bucket_entries(page, &mut out);
    }
    Ok(out)
}

/// The kv table in guest RAM (`ram`: all of it) of a table of `table_pages` pages.
pub fn kv_table_from_ram(ram: &[u8], table_pages: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let start = DATA_PFN as usize * PAGE_SIZE;
    let end = (start + table_pages.max(1) as usize * PAGE_SIZE).min(ram.len());
    for page in ram[start.min(end)..end].chunks_exact(PAGE_SIZE) {
        bucket_entries(page, &mut out);
    }
    out
}

/// The dirty workload's disk write: one whole block chosen by the per-VM entropy device,
/// stamped with a counter (host state: neither RAM nor registers change).
pub(crate) fn dirty_disk_write(dev: &mut HostDevices, s: &mut Scratch) -> Result<(), MockError> {
    let HostDevices { entropy, disk } = dev;
    let Some(disk) = disk.as_deref() else {
        return Ok(());
    };
    let block = splitmix(entropy) % disk.blocks();
    s.disk_writes += 1;
    s.page[..8].copy_from_slice(&s.disk_writes.to_le_bytes());
    s.page[8..16].copy_from_slice(&block.to_le_bytes());
    disk.guest_write(block, &s.page)
}

/// State blob: `"CMVS" ver:u16=1 workload:u8 nvcpus:u8 pages:u64`, then per vCPU
/// `pc clock rng r0 r1 r2 r3` (u64 each); all little-endian.
pub const STATE_MAGIC: [u8; 4] = *b"CMVS";
/// State blob version.
pub const STATE_VERSION: u16 = 1;
const STATE_HDR: usize = 16;
const VCPU_REC: usize = 7 * 8;

/// Appends the state blob of `regs` to `out`.
pub fn encode_state(workload: &Workload, pages: u64, regs: &[VcpuRegs], out: &mut Vec<u8>) {
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.push(workload.tag());
    out.push(regs.len() as u8);
    out.extend_from_slice(&pages.to_le_bytes());
    for r in regs {
        for v in [r.pc, r.clock, r.rng, r.r[0], r.r[1], r.r[2], r.r[3]] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Decodes a state blob for a domain of this shape; every mismatch is a clear error.
pub fn decode_state(
    workload: &Workload,
    pages: u64,
    nvcpus: usize,
    blob: &[u8],
) -> Result<Vec<VcpuRegs>, String> {
    let need = STATE_HDR + nvcpus * VCPU_REC;
    if blob.len() < STATE_HDR {
        return Err(format!(
            "blob is {} bytes, header needs {STATE_HDR}",
            blob.len()
        ));
    }
    if blob[..4] != STATE_MAGIC {
        return Err(format!("bad magic {:02x?}", &blob[..4]));
    }
    let ver = u16::from_le_bytes([blob[4], blob[5]]);
    if ver != STATE_VERSION {
        return Err(format!("version {ver}, expected {STATE_VERSION}"));
    }
    if blob[6] != workload.tag() {
        return Err(format!(
            "workload tag {} does not match this domain's {}",
            blob[6],
            workload.tag()
        ));
    }
    if usize::from(blob[7]) != nvcpus {
        return Err(format!("{} vCPUs in blob, domain has {nvcpus}", blob[7]));
    }
    let mut p8 = [0u8; 8];
    p8.copy_from_slice(&blob[8..16]);
    let bp = u64::from_le_bytes(p8);
    if bp != pages {
        return Err(format!("blob is for {bp} pages, domain has {pages}"));
    }
    if blob.len() != need {
        return Err(format!("blob is {} bytes, {need} expected", blob.len()));
    }
    let word = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&blob[i..i + 8]);
        u64::from_le_bytes(a)
    };
    Ok((0..nvcpus)
        .map(|v| {
            let o = STATE_HDR + v * VCPU_REC;
            VcpuRegs {
                pc: word(o),
                clock: word(o + 8),
                rng: word(o + 16),
                r: [word(o + 24), word(o + 32), word(o + 40), word(o + 48)],
            }
        })
        .collect())
}

//! [`MockDomain`]: one mock VM — guest RAM, its dirty tracker, the vCPU threads, the guest NIC,
//! its optional disk — and its implementation of colo-core's backend contract:
//! [`colo_core::Domain`] (with [`colo_core::GuestDisk`] behind `Domain::disk`),
//! [`colo_core::GuestNic`] and [`colo_core::Snapshot`].

use crate::disk::{DiskConfig, DiskHandle, MockDisk};
use crate::guest::{self, HostDevices, VcpuRegs, Workload, MAX_FRAME, RING_SLOTS, SLOT_BYTES};
use crate::ram::{self, GuestMem, Holes, ZERO_PAGE};
use crate::tracker::{Tracker, TrackerChoice, TrackerKind};
use crate::vcpu::{self, Shared};
use crate::MockError;
use colo_core::backend::PageVisitor;
use colo_core::{
    BackendError, DirtyBitmap, Domain, GuestDisk, GuestNic, OutputSignal, PlatformRecords,
    Snapshot, PAGE_SIZE,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

/// How to build a [`MockDomain`].
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// RAM size in 4 KiB pages.
    pub pages: u64,
    /// Back RAM by a file at this path (e.g. under /dev/shm; created or truncated, kept after the
    /// domain is dropped for inspection); `None` = an anonymous memfd.
    pub ram_path: Option<PathBuf>,
    /// What the guest runs.
    pub workload: Workload,
    /// Per-VM entropy for the host devices (must differ between PVM and SVM).
    pub vm_seed: u64,
    /// Dirty-tracking mechanism.
    pub tracker: TrackerChoice,
    /// The VM's disk, if it has one (see [`crate::disk`]).
    pub disk: Option<DiskConfig>,
}

impl MockConfig {
    /// A config of `pages` pages running `workload`, memfd RAM, automatic tracker.
    pub fn new(pages: u64, workload: Workload, vm_seed: u64) -> Self {
        Self {
            pages,
            ram_path: None,
            workload,
            vm_seed,
            tracker: TrackerChoice::Auto,
            disk: None,
        }
    }
}

/// A mock VM. Created paused; call [`Domain::resume`] to start the vCPUs.
///
/// Concurrency: the domain is driven from one host thread (`&mut self`); its vCPUs run on their
/// own threads. `inject`, `drain_tx`, `read_pages` and the dirty-log methods may be called while
/// the guest runs; `write_pages` and `set_state` require it paused.
pub struct MockDomain {
    pages: u64,
    path: Option<PathBuf>,
    // Declared before `mem` holders so that it unregisters before the mapping goes away.
    tracker: Tracker,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    paused: bool,
    bounce: Vec<u8>,
    tx_buf: Vec<u8>,
    holes: Holes,
    /// Pages known to hold data (reported dirty, written by the host, or probed): data never
    /// turns back into a hole, so these need no `lseek` probe when read.
    known_data: DirtyBitmap,
    /// The RAM's data pages are mapped into the host's mapping ([`GuestMem::populate_host`]).
    host_populated: bool,
    /// The disk, shared with the vCPUs' host devices.
    disk: Option<DiskHandle>,
}

impl std::fmt::Debug for MockDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockDomain")
            .field("pages", &self.pages)
            .field("path", &self.path)
            .field("tracker", &self.tracker)
            .field("paused", &self.paused)
            .finish()
    }
}

fn bad_state(op: &'static str, reason: &str) -> BackendError {
    BackendError::BadState {
        op,
        reason: reason.to_string(),
    }
}

impl MockDomain {
    /// Creates the domain: sparse RAM (no page is touched), tracker set up (logging off),
    /// vCPU threads started and parked.
    pub fn create(cfg: MockConfig) -> Result<Self, MockError> {
        let min = cfg.workload.min_pages();
        if cfg.pages < min {
            return Err(MockError::Config(format!(
                "{} pages is too small; this workload needs at least {min}",
                cfg.pages
            )));
        }
        if let Workload::Kv(k) = &cfg.workload {
            if !(0.0..=1.0).contains(&k.output_divergence) {
                return Err(MockError::Config(format!(
                    "output_divergence {} is outside 0..=1",
                    k.output_divergence
                )));
            }
        }
        let bytes = cfg
            .pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| MockError::Config(format!("{} pages overflow", cfg.pages)))?;
        let disk = cfg
            .disk
            .as_ref()
            .map(|d| open_disk(d, &cfg.workload))
            .transpose()?;
        let file = ram::open_backing(cfg.ram_path.as_deref(), bytes as u64)?;
        let mem = GuestMem::map(file, bytes)?;
        let tracker = Tracker::new(mem.share(), cfg.tracker)?;
        let shared = Arc::new(Shared::new(mem, cfg.workload));
        if let Some(d) = &cfg.disk {
            shared.disk_rate.store(d.blocks_per_ms, Ordering::Relaxed);
        }
        let mut threads = Vec::new();
        for idx in 0..shared.regs.len() {
            let sh = Arc::clone(&shared);
            let dev = HostDevices::new(cfg.vm_seed, idx).with_disk(disk.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{idx}"))
                .spawn(move || vcpu::run(sh, idx, dev))
                .map_err(|e| MockError::Os {
                    op: "spawn vCPU thread",
                    source: e,
                })?;
            threads.push(t);
        }
        Ok(Self {
            pages: cfg.pages,
            path: cfg.ram_path,
            tracker,
            shared,
            threads,
            paused: true,
            bounce: vec![0; PAGE_SIZE],
            tx_buf: vec![0; MAX_FRAME],
            holes: Holes::default(),
            known_data: DirtyBitmap::new(cfg.pages),
            host_populated: false,
            disk: disk.map(DiskHandle),
        })
    }

    /// The VM's disk, if it has one (for its image's path and figures).
    pub fn disk_image(&self) -> Option<&MockDisk> {
        self.disk.as_ref().map(|d| &*d.0)
    }

    /// Changes the dirty workload's disk rate (blocks/ms over all vCPUs; 0 = no disk writes).
    /// A host knob, not guest state; ignored without a disk or by other workloads.
    pub fn set_disk_rate(&self, blocks_per_ms: u64) {
        self.shared
            .disk_rate
            .store(blocks_per_ms, Ordering::Relaxed);
        let _c = self.shared.ctl.lock();
        self.shared.cv.notify_all();
    }

    /// The dirty-tracking mechanism in use.
    pub fn tracker_kind(&self) -> TrackerKind {
        self.tracker.kind()
    }

    /// True while dirty logging is on.
    pub fn dirty_log_enabled(&self) -> bool {
        self.tracker.logging()
    }

    /// The RAM file's path, if RAM is a named file.
    pub fn ram_path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// All of guest RAM, borrowed; `None` while the guest runs. The borrow keeps the domain from
    /// being resumed (or written by the host) while it lives.
    pub fn ram(&self) -> Option<&[u8]> {
        if !self.paused {
            return None;
        }
        // SAFETY: paused ⇒ every vCPU is parked (pause waited for it) and cannot pass its gate
        // until `resume(&mut self)`; host writes need `&mut self` too; jobs only run on running
        // vCPUs. So nothing writes guest RAM while this shared borrow of `self` lives.
        Some(unsafe { self.shared.mem.slice_unchecked() })
    }

    /// xxh3-128 of all of guest RAM (stable only while paused). Holes of the RAM file are
    /// hashed as zero pages without touching (allocating) them.
    pub fn digest(&self) -> u128 {
        let mem = &self.shared.mem;
        let ram = self.ram();
        let mut holes = Holes::default();
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut page = [0u8; PAGE_SIZE];
        for p in 0..self.pages {
            let o = p as usize * PAGE_SIZE;
            if holes.is_hole(mem, p) {
                h.update(&ZERO_PAGE);
            } else if let Some(r) = ram {
                h.update(&r[o..o + PAGE_SIZE]);
            } else {
                // In range by construction.
                let _ = mem.read(o, &mut page);
                h.update(&page);
            }
        }
        h.digest128()
    }

    /// Workload steps executed so far by all vCPUs (progress counter; not guest state).
    pub fn steps(&self) -> u64 {
        self.shared.steps.load(Ordering::Relaxed)
    }

    /// The vCPU registers (program counters etc.), as in the state blob.
    pub fn vcpu_regs(&self) -> Vec<VcpuRegs> {
        self.shared.regs.iter().map(|r| *r.lock()).collect()
    }

    /// The first vCPU fault, if a vCPU crashed.
    pub fn fault(&self) -> Option<String> {
        self.shared.ctl.lock().fault.clone()
    }

    /// Changes the dirty workload's rate (pages/ms over all vCPUs; 0 = stop writing,
    /// [`crate::DirtyConfig::UNLIMITED`] = flat out). A host knob, not guest state; ignored by
    /// other workloads.
    pub fn set_dirty_rate(&self, pages_per_ms: u64) {
        if !matches!(self.shared.workload, Workload::Dirty(_)) {
            return;
        }
        self.shared
            .dirty_rate
            .store(pages_per_ms, Ordering::Relaxed);
        let _c = self.shared.ctl.lock();
        self.shared.cv.notify_all();
    }

    /// Host knob for tests and benchmarks: each vCPU stops making progress (idles) once its
    /// program counter reaches `limit`; `None` removes the limit. Not guest state.
    pub fn set_step_limit(&self, limit: Option<u64>) {
        self.shared
            .step_limit
            .store(limit.unwrap_or(u64::MAX), Ordering::Relaxed);
        let _c = self.shared.ctl.lock();
        self.shared.cv.notify_all();
    }

    /// Runs `f` on a vCPU between two workload steps (as guest code) and returns its result.
    /// Fails if the domain is paused or a vCPU faulted.
    pub fn exec_on_vcpu<R, F>(&self, f: F) -> Result<R, MockError>
    where
        R: Send + 'static,
        F: FnOnce(&GuestMem) -> R + Send + 'static,
    {
        let (tx, rx) = crossbeam_channel::bounded(1);
        {
            let mut c = self.shared.ctl.lock();
            while c.job.is_some() && c.run && c.fault.is_none() {
                self.shared.cv.wait(&mut c);
            }
            if !c.run {
                return Err(MockError::Paused("exec_on_vcpu"));
            }
            if let Some(f) = &c.fault {
                return Err(MockError::Guest(f.clone()));
            }
            c.job = Some(Box::new(move |m: &GuestMem| {
                let _ = tx.send(f(m));
            }));
            self.shared.cv.notify_all();
        }
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(r) => return Ok(r),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(MockError::Guest("vCPU dropped the job".into()))
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let c = self.shared.ctl.lock();
                    if c.stop || (c.fault.is_some() && c.parked == self.threads.len()) {
                        return Err(MockError::Guest("no vCPU can run the job".into()));
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- guest NIC (host side)

    /// Sequence number of the next request the guest's RX ring expects (`rx_prod`, stored in
    /// guest RAM, so a checkpoint carries it over to the SVM).
    pub fn rx_next_seq(&self) -> u64 {
        self.shared
            .mem
            .atomic_u64(guest::RX_PROD)
            .map(|a| a.load(Ordering::Acquire))
            .unwrap_or(0)
    }

    /// Frames the guest has consumed from its RX ring (`rx_cons`, in guest RAM).
    pub fn rx_consumed(&self) -> u64 {
        self.shared
            .mem
            .atomic_u64(guest::RX_CONS)
            .map(|a| a.load(Ordering::Acquire))
            .unwrap_or(0)
    }

    /// Posts request `frame` with sequence number `seq` into the guest's RX ring, like DMA.
    /// Returns `Ok(false)` if the ring is full (retry later). `seq` must equal
    /// [`MockDomain::rx_next_seq`].
    pub fn inject(&mut self, seq: u64, frame: &[u8]) -> Result<bool, MockError> {
        if frame.len() > MAX_FRAME {
            return Err(MockError::FrameTooLarge {
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        let mem = &self.shared.mem;
        let prod_a = mem.atomic_u64(guest::RX_PROD)?;
        let prod = prod_a.load(Ordering::Relaxed);
        if seq != prod {
            return Err(MockError::SeqMismatch {
                expected: prod,
                got: seq,
            });
        }
        let cons = mem.atomic_u64(guest::RX_CONS)?.load(Ordering::Acquire);
        let used = prod.wrapping_sub(cons);
        if used > RING_SLOTS {
            return Err(MockError::RingCorrupt {
                ring: "rx",
                prod,
                cons,
            });
        }
        if used == RING_SLOTS {
            return Ok(false);
        }
        let slot = guest::RX_RING + (prod % RING_SLOTS) as usize * SLOT_BYTES;
        mem.write(slot, &(frame.len() as u16).to_le_bytes())?;
        mem.write(slot + 2, frame)?;
        prod_a.store(prod + 1, Ordering::Release);
        self.shared.ring_doorbell();
        Ok(true)
    }

    /// A channel that holds a message whenever the guest emitted a frame since the last
    /// message was taken: wait on it (with other sources) instead of polling
    /// [`MockDomain::drain_tx`].
    pub fn output_ready(&self) -> crossbeam_channel::Receiver<()> {
        self.shared.tx_ready.1.clone()
    }

    /// Hands every frame the guest emitted since the last drain to `out`, in order, and frees
    /// their TX slots.
    pub fn drain_tx(&mut self, out: &mut dyn FnMut(&[u8])) -> Result<usize, MockError> {
        let mem = &self.shared.mem;
        let cons_a = mem.atomic_u64(guest::TX_CONS)?;
        let mut cons = cons_a.load(Ordering::Relaxed);
        let prod = mem.atomic_u64(guest::TX_PROD)?.load(Ordering::Acquire);
        if prod.wrapping_sub(cons) > RING_SLOTS {
            return Err(MockError::RingCorrupt {
                ring: "tx",
                prod,
                cons,
            });
        }
        let mut n = 0;
        while cons != prod {
            let slot = guest::TX_RING + (cons % RING_SLOTS) as usize * SLOT_BYTES;
            let mut lb = [0u8; 2];
            mem.read(slot, &mut lb)?;
            let len = usize::from(u16::from_le_bytes(lb)).min(MAX_FRAME);
            mem.read(slot + 2, &mut self.tx_buf[..len])?;
            out(&self.tx_buf[..len]);
            cons += 1;
            n += 1;
        }
        cons_a.store(cons, Ordering::Release);
        if n > 0 {
            // A guest stalled on a full TX ring may continue.
            self.shared.ring_doorbell();
        }
        Ok(n)
    }

    fn check_pfns(&self, pfns: &[u64]) -> Result<(), BackendError> {
        match pfns.iter().find(|&&p| p >= self.pages) {
            Some(&pfn) => Err(BackendError::PfnOutOfRange {
                pfn,
                pages: self.pages,
            }),
            None => Ok(()),
        }
    }

    /// Writes `pfns` (checked, the domain paused) from `run(i, n)`: the bytes of pages
    /// `i..i + n` of a run of consecutive pfns (`by_page`: of page `i` alone, then the next
    /// page is asked for); then marks them clean in the dirty log.
    fn write_checked<'d>(
        &mut self,
        pfns: &[u64],
        by_page: bool,
        run: &mut dyn FnMut(usize, usize) -> &'d [u8],
    ) -> Result<(), BackendError> {
        let mut runs = 0;
        let mut i = 0;
        let mut j = 0;
        while i < pfns.len() {
            if j <= i {
                // A new run of consecutive pfns: `i..j`.
                j = i + 1;
                while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
                    j += 1;
                }
                runs += 1;
            }
            let n = if by_page { 1 } else { j - i };
            let data = run(i, n);
            if data.len() != n * PAGE_SIZE {
                return Err(BackendError::DataLength {
                    got: data.len(),
                    want: n * PAGE_SIZE,
                    pages: n,
                });
            }
            let (off, mem) = (pfns[i] as usize * PAGE_SIZE, &self.shared.mem);
            let r = if self.tracker.logging() {
                if !self.host_populated {
                    // The first write through the host's mapping maps all RAM that holds
                    // data into it at once (a secondary's first checkpoint after the initial
                    // synchronisation), rather than a page fault per page in every apply.
                    mem.populate_host();
                    self.host_populated = true;
                }
                mem.write_host(off, data)
            } else {
                // No write protection to fault on: the guest's own mapping will do.
                mem.write(off, data)
            }
            .map_err(|e| bad_state("write_pages", &e.to_string()));
            if let Err(e) = r {
                self.shared.mem.host_writes_done();
                return Err(e);
            }
            i += n;
        }
        self.shared.mem.host_writes_done();
        for &p in pfns {
            let _ = self.known_data.set(p);
        }
        self.tracker.mark_clean_pfns(pfns, runs)
    }

    /// Test hook: the tracker, for failure injection.
    #[cfg(test)]
    pub(crate) fn tracker_mut(&mut self) -> &mut Tracker {
        &mut self.tracker
    }

    /// Test hook: a host-side write into RAM, bypassing the NIC.
    #[cfg(test)]
    pub(crate) fn poke(&self, pfn: u64, off: usize, data: &[u8]) -> Result<(), MockError> {
        self.shared.mem.write(pfn as usize * PAGE_SIZE + off, data)
    }
}

/// Opens the disk of a VM running `workload`: a kv guest's disk must hold its table, and gets
/// the table's header block when it has none yet.
fn open_disk(cfg: &DiskConfig, workload: &Workload) -> Result<Arc<MockDisk>, MockError> {
    let disk = MockDisk::open(cfg)?;
    if let Workload::Kv(k) = workload {
        let need = guest::kv_disk_blocks(k.table_pages);
        if disk.blocks() < need {
            return Err(MockError::Config(format!(
                "a disk of {} blocks cannot hold the kv table ({need} blocks of 4 KiB needed)",
                disk.blocks()
            )));
        }
        let header = guest::kv_disk_header(k.table_pages);
        let mut block0 = vec![0u8; PAGE_SIZE];
        disk.guest_read(0, &mut block0)?;
        if block0 != header {
            disk.guest_write(0, &header)?;
        }
    }
    Ok(Arc::new(disk))
}

/// Is `pfn` a never-written page? Pages known to hold data answer without a syscall.
fn probe_hole(known: &mut DirtyBitmap, holes: &mut Holes, mem: &GuestMem, pfn: u64) -> bool {
    if known.test(pfn).unwrap_or(false) {
        return false;
    }
    let hole = holes.is_hole(mem, pfn);
    if !hole {
        let _ = known.set(pfn);
    }
    hole
}

impl Domain for MockDomain {
    fn page_count(&self) -> u64 {
        self.pages
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        let n = self.threads.len();
        let mut c = self.shared.ctl.lock();
        c.run = false;
        self.shared.cv.notify_all();
        while c.parked < n {
            self.shared.cv.wait(&mut c);
        }
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        let mut c = self.shared.ctl.lock();
        c.run = true;
        self.shared.cv.notify_all();
        self.paused = false;
        Ok(())
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    fn start_dirty_log(&mut self) -> Result<(), BackendError> {
        self.tracker.start()
    }

    fn stop_dirty_log(&mut self) -> Result<(), BackendError> {
        self.tracker.stop()
    }

    fn harvest_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.tracker.collect(into, true)?;
        // Lengths are equal (collect checked them).
        let _ = self.known_data.union_with(into);
        Ok(())
    }

    fn peek_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.tracker.collect(into, false)
    }

    /// Paused: borrows each page straight from the mapping (zero-copy). Running (pre-copy):
    /// copies each page into a bounce page first, so the slice is stable even though the guest
    /// may be writing the page (the copy may then be torn; the write re-dirties the page).
    /// Never-written pages (holes of the RAM file) are served as a static zero page without
    /// touching them, so reading a sparse multi-GiB guest allocates nothing.
    fn read_pages(
        &mut self,
        pfns: &[u64],
        visit: &mut PageVisitor<'_>,
    ) -> Result<(), BackendError> {
        self.check_pfns(pfns)?;
        self.holes.reset();
        if self.paused {
            // SAFETY: paused — see `ram()`; `&mut self` is held for the whole call.
            let ram = unsafe { self.shared.mem.slice_unchecked() };
            for (i, &p) in pfns.iter().enumerate() {
                let o = p as usize * PAGE_SIZE;
                if probe_hole(&mut self.known_data, &mut self.holes, &self.shared.mem, p) {
                    visit(i, Some(&ZERO_PAGE))?;
                } else {
                    visit(i, Some(&ram[o..o + PAGE_SIZE]))?;
                }
            }
        } else {
            for (i, &p) in pfns.iter().enumerate() {
                if probe_hole(&mut self.known_data, &mut self.holes, &self.shared.mem, p) {
                    visit(i, Some(&ZERO_PAGE))?;
                    continue;
                }
                self.shared
                    .mem
                    .read(p as usize * PAGE_SIZE, &mut self.bounce)
                    .map_err(|e| bad_state("read_pages", &e.to_string()))?;
                visit(i, Some(&self.bounce))?;
            }
        }
        Ok(())
    }

    /// One memcpy per run of consecutive pfns that hold data (straight from the mapping while
    /// paused; while running, a raw copy that may be torn, as `read_pages`'s bounce copy);
    /// holes are served as zero pages without touching them. Every page is present.
    fn copy_pages(
        &mut self,
        pfns: &[u64],
        out: &mut Vec<u8>,
        present: Option<&mut Vec<bool>>,
    ) -> Result<(), BackendError> {
        self.check_pfns(pfns)?;
        self.holes.reset();
        out.reserve(pfns.len() * PAGE_SIZE);
        let mem = &self.shared.mem;
        let mut i = 0;
        while i < pfns.len() {
            let start = pfns[i];
            if probe_hole(&mut self.known_data, &mut self.holes, mem, start) {
                out.extend_from_slice(&ZERO_PAGE);
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < pfns.len()
                && pfns[j] == start + (j - i) as u64
                && !probe_hole(&mut self.known_data, &mut self.holes, mem, pfns[j])
            {
                j += 1;
            }
            let (off, n) = (start as usize * PAGE_SIZE, (j - i) * PAGE_SIZE);
            if self.paused {
                // SAFETY: paused — see `ram()`; `&mut self` is held for the whole call.
                let ram = unsafe { mem.slice_unchecked() };
                out.extend_from_slice(&ram[off..off + n]);
            } else {
                let at = out.len();
                out.resize(at + n, 0);
                mem.read(off, &mut out[at..])
                    .map_err(|e| bad_state("copy_pages", &e.to_string()))?;
            }
            i = j;
        }
        if let Some(p) = present {
            p.resize(p.len() + pfns.len(), true);
        }
        Ok(())
    }

    /// Copies the pages in, one copy per run of consecutive pfns: while the dirty log is on, a
    /// copy through the host's own mapping of the RAM file with non-temporal stores (through the
    /// guest's mapping every write-protected page would take a fault), else a memcpy into the
    /// guest's mapping. They count as clean in the dirty log afterwards (as Xen does not log
    /// foreign-mapping writes), so a checkpoint's apply does not reappear in the next harvest.
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), BackendError> {
        if !self.paused {
            return Err(bad_state("write_pages", "the domain is running"));
        }
        let want = pfns.len().saturating_mul(PAGE_SIZE);
        if data.len() != want {
            return Err(BackendError::DataLength {
                got: data.len(),
                want,
                pages: pfns.len(),
            });
        }
        self.check_pfns(pfns)?;
        self.write_checked(pfns, false, &mut |i, n| {
            &data[i * PAGE_SIZE..(i + n) * PAGE_SIZE]
        })
    }

    /// Each page straight from where it lies (one copy per page, no gathering).
    fn write_pages_from<'d>(
        &mut self,
        pfns: &[u64],
        page: &mut dyn FnMut(usize) -> &'d [u8],
    ) -> Result<(), BackendError> {
        if !self.paused {
            return Err(bad_state("write_pages_from", "the domain is running"));
        }
        self.check_pfns(pfns)?;
        self.write_checked(pfns, true, &mut |i, _| page(i))
    }

    fn get_state(&mut self, out: &mut Vec<u8>) -> Result<(), BackendError> {
        if !self.paused {
            return Err(bad_state("get_state", "the domain is running"));
        }
        let regs = self.vcpu_regs();
        guest::encode_state(&self.shared.workload, self.pages, &regs, out);
        Ok(())
    }

    fn set_state(&mut self, blob: &[u8]) -> Result<(), BackendError> {
        if !self.paused {
            return Err(bad_state("set_state", "the domain is running"));
        }
        let regs = guest::decode_state(&self.shared.workload, self.pages, self.threads.len(), blob)
            .map_err(BackendError::InvalidState)?;
        for (slot, r) in self.shared.regs.iter().zip(regs) {
            *slot.lock() = r;
        }
        Ok(())
    }

    fn disk(&mut self) -> Option<&mut dyn GuestDisk> {
        self.disk.as_mut().map(|d| d as &mut dyn GuestDisk)
    }
}

/// The guest NIC as colo-core's backend contract has it: the inherent methods above, with the
/// mock's errors turned into [`BackendError`]s.
impl GuestNic for MockDomain {
    fn rx_next_seq(&self) -> u64 {
        MockDomain::rx_next_seq(self)
    }

    fn inject(&mut self, seq: u64, frame: &[u8]) -> Result<bool, BackendError> {
        MockDomain::inject(self, seq, frame).map_err(|e| BackendError::BadState {
            op: "guest NIC",
            reason: e.to_string(),
        })
    }

    fn drain_tx(&mut self, out: &mut dyn FnMut(&[u8])) {
        if let Err(e) = MockDomain::drain_tx(self, out) {
            tracing::error!("draining the guest's output failed: {e}");
        }
    }

    fn output_ready(&self) -> Option<OutputSignal> {
        Some(MockDomain::output_ready(self))
    }
}

/// `colo save` of a mock guest: its state blob travels opaque, as HVM_CONTEXT.
impl Snapshot for MockDomain {
    fn platform(&mut self) -> Result<PlatformRecords, BackendError> {
        let mut blob = Vec::new();
        self.get_state(&mut blob)?;
        PlatformRecords::opaque(blob)
    }
}

impl Drop for MockDomain {
    fn drop(&mut self) {
        {
            let mut c = self.shared.ctl.lock();
            c.stop = true;
            self.shared.cv.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The node driver moves a domain to its own thread: it must stay `Send`.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<MockDomain>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn dom(tracker: TrackerChoice) -> MockDomain {
        let mut c = MockConfig::new(512, Workload::Idle, 1);
        c.tracker = tracker;
        MockDomain::create(c).unwrap()
    }

    /// A harvest that fails part-way loses nothing: the next harvest reports every page.
    fn failed_harvest_merges_back(tracker: TrackerChoice, fail_at: u32) {
        let mut d = dom(tracker);
        d.start_dirty_log().unwrap();
        let pfns: Vec<u64> = (0..512).filter(|p| p % 3 == 0).collect();
        for &p in &pfns {
            d.poke(p, 8, &(p | 0x100).to_le_bytes()).unwrap();
        }
        d.tracker_mut().set_region_capacity(4);
        d.tracker_mut().inject_failure(Some(fail_at));
        let mut b = DirtyBitmap::new(512);
        assert!(d.harvest_dirty(&mut b).is_err());
        assert_eq!(b.count(), 0, "a failed harvest leaves `into` alone");
        d.tracker_mut().inject_failure(None);
        let mut peek = DirtyBitmap::new(512);
        d.peek_dirty(&mut peek).unwrap();
        d.harvest_dirty(&mut b).unwrap();
        assert_eq!(b.to_pfns(), pfns);
        assert_eq!(peek.to_pfns(), pfns);
        let mut again = DirtyBitmap::new(512);
        d.harvest_dirty(&mut again).unwrap();
        assert_eq!(again.count(), 0);
    }

    #[test]
    fn failed_harvest_uffd() {
        let d = dom(TrackerChoice::Auto);
        if d.tracker_kind() != TrackerKind::UffdWpAsync {
            eprintln!("uffd unavailable here; covered by the hash variant");
            return;
        }
        drop(d);
        // Fails after 3 ioctls: 12 regions already re-protected and must come back.
        failed_harvest_merges_back(TrackerChoice::Uffd, 3);
    }

    #[test]
    fn failed_harvest_hash() {
        failed_harvest_merges_back(TrackerChoice::Fallback, 300);
    }

    #[test]
    fn write_pages_leaves_pages_clean() {
        for t in [TrackerChoice::Auto, TrackerChoice::Fallback] {
            let mut d = dom(t);
            d.start_dirty_log().unwrap();
            d.poke(7, 0, &[1]).unwrap();
            let data = vec![0xAB; 3 * PAGE_SIZE];
            d.write_pages(&[7, 8, 100], &data).unwrap();
            d.poke(9, 0, &[1]).unwrap();
            let mut b = DirtyBitmap::new(512);
            d.harvest_dirty(&mut b).unwrap();
            assert_eq!(b.to_pfns(), vec![9], "{:?}", d.tracker_kind());
            let ram = d.ram().unwrap();
            assert!(ram[100 * PAGE_SIZE..101 * PAGE_SIZE]
                .iter()
                .all(|&x| x == 0xAB));
        }
    }

    #[test]
    fn write_pages_with_many_runs_keeps_other_dirty_pages() {
        for t in [TrackerChoice::Auto, TrackerChoice::Fallback] {
            let mut d = dom(t);
            d.start_dirty_log().unwrap();
            // Guest-side writes before and between the host's writes, outside its page set.
            d.poke(1, 0, &[1]).unwrap();
            d.poke(511, 0, &[1]).unwrap();
            let pfns: Vec<u64> = (0..100).map(|i| 3 + i * 5).collect();
            let data = vec![0xCD; pfns.len() * PAGE_SIZE];
            d.write_pages(&pfns, &data).unwrap();
            let mut b = DirtyBitmap::new(512);
            d.harvest_dirty(&mut b).unwrap();
            assert_eq!(b.to_pfns(), vec![1, 511], "{:?}", d.tracker_kind());
        }
    }

    /// Pages written from wherever they lie land where `write_pages` puts them, count as
    /// clean, leave the guest's own writes dirty, and a page of the wrong length is refused.
    #[test]
    fn write_pages_from_scattered_buffers() {
        for t in [TrackerChoice::Auto, TrackerChoice::Fallback] {
            let mut d = dom(t);
            d.start_dirty_log().unwrap();
            d.poke(1, 0, &[1]).unwrap();
            let pfns = [40u64, 41, 42, 7, 300, 301, 5];
            let bufs: Vec<Vec<u8>> = (0..pfns.len())
                .map(|i| vec![0x30 + i as u8; PAGE_SIZE])
                .collect();
            d.pause().unwrap();
            d.write_pages_from(&pfns, &mut |i| &bufs[i]).unwrap();
            let ram = d.ram().unwrap();
            for (i, &p) in pfns.iter().enumerate() {
                let page = &ram[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE];
                assert!(page.iter().all(|&x| x == 0x30 + i as u8), "pfn {p}");
            }
            let short = [0u8; 100];
            assert!(matches!(
                d.write_pages_from(&[9], &mut |_| &short),
                Err(BackendError::DataLength { .. })
            ));
            assert!(matches!(
                d.write_pages_from(&[512], &mut |i| &bufs[i]),
                Err(BackendError::PfnOutOfRange { .. })
            ));
            let mut b = DirtyBitmap::new(512);
            d.harvest_dirty(&mut b).unwrap();
            assert_eq!(b.to_pfns(), vec![1], "{:?}", d.tracker_kind());
        }
    }
}

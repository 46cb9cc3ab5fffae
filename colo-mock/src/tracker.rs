//! Dirty-page tracking of guest RAM: userfaultfd write-protect in async mode plus `PAGEMAP_SCAN`
//! (Linux ≥ 6.7), or, where that is unavailable, page hashing.
//!
//! Both trackers catch every write through the mapping — by guest threads through raw pointers,
//! by the host, and by the kernel (`read(2)` into guest RAM). The uffd tracker reports pages
//! *written* (exact to 4 KiB on shmem, first write ~1 µs, re-writes free); the hash tracker reports
//! pages whose *content changed* (xxh3-128 of every page per harvest, ~80 ms per GiB), which is
//! what a checkpoint needs: a page rewritten with identical bytes need not be sent.
//!
//! A harvest first collects into a scratch bitmap; only on success is it ORed into the caller's
//! bitmap. If the kernel walk fails part-way, the pages it already re-protected are kept in a
//! `pending` bitmap that every later harvest and peek reports, so a failed harvest never loses a
//! dirty page.

use crate::ram::{GuestMem, Holes, ZERO_PAGE};
use crate::sys::{self, PageRegion, PmScanArg};
use colo_core::{BackendError, DirtyBitmap, PAGE_SIZE};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

/// Which dirty-tracking mechanism a [`crate::MockDomain`] should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrackerChoice {
    /// userfaultfd WP-async + PAGEMAP_SCAN when the kernel has it, else page hashing.
    #[default]
    Auto,
    /// userfaultfd WP-async + PAGEMAP_SCAN or fail at create.
    Uffd,
    /// Page hashing even where uffd would work.
    Fallback,
}

/// The mechanism a domain actually uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerKind {
    /// userfaultfd write-protect (async mode) with PAGEMAP_SCAN get-and-clear.
    UffdWpAsync,
    /// xxh3-128 of every page, compared with the last harvest's hashes.
    PageHash,
}

impl std::fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrackerKind::UffdWpAsync => "uffd-wp-async+PAGEMAP_SCAN",
            TrackerKind::PageHash => "page-hash(xxh3-128)",
        })
    }
}

/// Regions per PAGEMAP_SCAN call; the walk resumes at `walk_end` when the vector fills.
const REGIONS: usize = 1 << 14;

struct Uffd {
    fd: OwnedFd,
    pagemap: File,
    regions: Vec<PageRegion>,
    /// Test hook: fail the harvest walk before its n-th ioctl.
    #[cfg(test)]
    fail_at_call: Option<u32>,
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> BackendError {
    move |source| BackendError::Os { op, source }
}

impl Uffd {
    fn new(mem: &GuestMem) -> io::Result<Self> {
        let fd = sys::userfaultfd()?;
        let want = sys::UFFD_FEATURE_WP_ASYNC
            | sys::UFFD_FEATURE_WP_UNPOPULATED
            | sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let got = sys::uffd_api(&fd, want)?;
        if got & want != want {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("kernel grants uffd features {got:#x}, need {want:#x}"),
            ));
        }
        sys::uffd_register_wp(&fd, mem.addr(), mem.len() as u64)?;
        let pagemap = File::open("/proc/self/pagemap")?;
        let mut me = Self {
            fd,
            pagemap,
            regions: Vec::new(),
            #[cfg(test)]
            fail_at_call: None,
        };
        // Probe PAGEMAP_SCAN itself (ENOTTY before 6.7) on the first page, without protecting.
        let mut a = PmScanArg {
            flags: sys::PM_SCAN_CHECK_WPASYNC,
            start: mem.addr(),
            end: mem.addr() + PAGE_SIZE as u64,
            category_mask: sys::PAGE_IS_WRITTEN,
            ..Default::default()
        };
        sys::pagemap_scan(&me.pagemap, &mut a, &mut [])?;
        me.regions = vec![PageRegion::default(); REGIONS];
        Ok(me)
    }

    /// Walks all of RAM; ORs written pages into `into`; re-protects them when `clear`.
    fn scan(&mut self, mem: &GuestMem, into: &mut DirtyBitmap, clear: bool) -> io::Result<()> {
        let base = mem.addr();
        let end = base + mem.len() as u64;
        let mut cur = base;
        let mut _calls = 0u32;
        while cur < end {
            #[cfg(test)]
            if self.fail_at_call.is_some_and(|n| _calls >= n) {
                return Err(io::Error::other("injected PAGEMAP_SCAN failure"));
            }
            let mut a = PmScanArg {
                flags: if clear {
                    sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC
                } else {
                    sys::PM_SCAN_CHECK_WPASYNC
                },
                start: cur,
                end,
                category_mask: sys::PAGE_IS_WRITTEN,
                return_mask: sys::PAGE_IS_WRITTEN,
                ..Default::default()
            };
            let n = sys::pagemap_scan(&self.pagemap, &mut a, &mut self.regions)?;
            _calls += 1;
            for r in &self.regions[..n] {
                if r.start < base || r.end > end || r.start > r.end {
                    return Err(io::Error::other(
                        "PAGEMAP_SCAN returned a region outside RAM",
                    ));
                }
                let (s, e) = ((r.start - base) >> 12, (r.end - base).div_ceil(4096));
                into.set_range(s, e).map_err(io::Error::other)?;
            }
            if a.walk_end <= cur {
                return Err(io::Error::other(format!(
                    "PAGEMAP_SCAN made no progress at {cur:#x} (walk_end {:#x})",
                    a.walk_end
                )));
            }
            cur = a.walk_end;
        }
        Ok(())
    }

    /// Write-protects all of RAM: every page counts as clean.
    fn protect_all(&mut self, mem: &GuestMem) -> io::Result<()> {
        let base = mem.addr();
        let end = base + mem.len() as u64;
        let mut cur = base;
        while cur < end {
            let mut a = PmScanArg {
                flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                start: cur,
                end,
                category_mask: sys::PAGE_IS_WRITTEN,
                ..Default::default()
            };
            sys::pagemap_scan(&self.pagemap, &mut a, &mut [])?;
            if a.walk_end <= cur {
                return Err(io::Error::other("PAGEMAP_SCAN protect made no progress"));
            }
            cur = a.walk_end;
        }
        Ok(())
    }
}

struct Hasher {
    hashes: Vec<u128>,
    bounce: Vec<u8>,
    holes: Holes,
    zero_hash: u128,
    #[cfg(test)]
    fail_at_page: Option<u64>,
}

impl Hasher {
    fn page_hash(&mut self, mem: &GuestMem, pfn: u64) -> Result<u128, BackendError> {
        if self.holes.is_hole(mem, pfn) {
            return Ok(self.zero_hash);
        }
        mem.read(pfn as usize * PAGE_SIZE, &mut self.bounce)
            .map_err(|e| BackendError::BadState {
                op: "hash page",
                reason: e.to_string(),
            })?;
        Ok(xxhash_rust::xxh3::xxh3_128(&self.bounce))
    }

    fn rehash_all(&mut self, mem: &GuestMem) -> Result<(), BackendError> {
        self.holes.reset();
        for p in 0..mem.pages() {
            let h = self.page_hash(mem, p)?;
            self.hashes[p as usize] = h;
        }
        Ok(())
    }

    fn scan(
        &mut self,
        mem: &GuestMem,
        into: &mut DirtyBitmap,
        clear: bool,
    ) -> Result<(), BackendError> {
        self.holes.reset();
        for p in 0..mem.pages() {
            #[cfg(test)]
            if self.fail_at_page == Some(p) {
                return Err(BackendError::Os {
                    op: "page hash",
                    source: io::Error::other("injected hash failure"),
                });
            }
            let h = self.page_hash(mem, p)?;
            if h != self.hashes[p as usize] {
                // p < pages == into.len(), checked by the caller.
                let _ = into.set(p);
                if clear {
                    self.hashes[p as usize] = h;
                }
            }
        }
        Ok(())
    }
}

enum Imp {
    Uffd(Uffd),
    Hash(Hasher),
}

/// The tracker of one domain's RAM.
pub(crate) struct Tracker {
    mem: GuestMem,
    imp: Imp,
    logging: bool,
    scratch: DirtyBitmap,
    pending: DirtyBitmap,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("kind", &self.kind())
            .field("logging", &self.logging)
            .finish()
    }
}

impl Tracker {
    /// Sets up tracking per `choice`. Logging starts off.
    pub(crate) fn new(mem: GuestMem, choice: TrackerChoice) -> Result<Self, crate::MockError> {
        let pages = mem.pages();
        let imp = match choice {
            TrackerChoice::Fallback => None,
            TrackerChoice::Uffd => Some(Uffd::new(&mem).map_err(|e| crate::MockError::Os {
                op: "userfaultfd WP-async + PAGEMAP_SCAN setup",
                source: e,
            })?),
            TrackerChoice::Auto => match Uffd::new(&mem) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::warn!("uffd WP-async tracking unavailable ({e}); using page hashing");
                    None
                }
            },
        };
        let imp = match imp {
            Some(u) => Imp::Uffd(u),
            None => Imp::Hash(Hasher {
                hashes: Vec::new(),
                bounce: vec![0; PAGE_SIZE],
                holes: Holes::default(),
                zero_hash: xxhash_rust::xxh3::xxh3_128(&ZERO_PAGE),
                #[cfg(test)]
                fail_at_page: None,
            }),
        };
        Ok(Self {
            mem,
            imp,
            logging: false,
            scratch: DirtyBitmap::new(pages),
            pending: DirtyBitmap::new(pages),
        })
    }

    pub(crate) fn kind(&self) -> TrackerKind {
        match self.imp {
            Imp::Uffd(_) => TrackerKind::UffdWpAsync,
            Imp::Hash(_) => TrackerKind::PageHash,
        }
    }

    pub(crate) fn logging(&self) -> bool {
        self.logging
    }

    pub(crate) fn start(&mut self) -> Result<(), BackendError> {
        match &mut self.imp {
            Imp::Uffd(u) => u
                .protect_all(&self.mem)
                .map_err(os("PAGEMAP_SCAN protect"))?,
            Imp::Hash(h) => {
                if h.hashes.len() != self.mem.pages() as usize {
                    h.hashes = vec![0; self.mem.pages() as usize];
                }
                h.rehash_all(&self.mem)?;
            }
        }
        self.pending.clear_all();
        self.logging = true;
        Ok(())
    }

    pub(crate) fn stop(&mut self) -> Result<(), BackendError> {
        if !self.logging {
            return Ok(());
        }
        match &mut self.imp {
            Imp::Uffd(u) => {
                sys::uffd_writeprotect(&u.fd, self.mem.addr(), self.mem.len() as u64, false)
                    .map_err(os("UFFDIO_WRITEPROTECT unprotect"))?
            }
            Imp::Hash(h) => h.hashes = Vec::new(),
        }
        self.logging = false;
        Ok(())
    }

    /// ORs the dirty pages into `into`, clearing them in the tracker when `clear`.
    pub(crate) fn collect(
        &mut self,
        into: &mut DirtyBitmap,
        clear: bool,
    ) -> Result<(), BackendError> {
        let op = if clear { "harvest_dirty" } else { "peek_dirty" };
        if !self.logging {
            return Err(BackendError::BadState {
                op,
                reason: "dirty logging is off".into(),
            });
        }
        if into.len() != self.mem.pages() {
            return Err(BackendError::BadState {
                op,
                reason: format!(
                    "bitmap covers {} pages, the guest has {}",
                    into.len(),
                    self.mem.pages()
                ),
            });
        }
        self.scratch.clear_all();
        let r = match &mut self.imp {
            Imp::Uffd(u) => u
                .scan(&self.mem, &mut self.scratch, clear)
                .map_err(os("PAGEMAP_SCAN")),
            Imp::Hash(h) => h.scan(&self.mem, &mut self.scratch, clear),
        };
        // Lengths are equal (checked above), so the unions cannot fail.
        if let Err(e) = r {
            if clear {
                let _ = self.pending.union_with(&self.scratch);
            }
            return Err(e);
        }
        let _ = into.union_with(&self.scratch);
        let _ = into.union_with(&self.pending);
        if clear {
            self.pending.clear_all();
        }
        Ok(())
    }

    /// Marks `pfns start..start+n` clean after the host overwrote them (checkpoint apply):
    /// pages written by `write_pages` are not logged, as with Xen's foreign mappings.
    pub(crate) fn mark_clean(&mut self, start: u64, n: u64) -> Result<(), BackendError> {
        if !self.logging || n == 0 {
            return Ok(());
        }
        match &mut self.imp {
            Imp::Uffd(u) => sys::uffd_writeprotect(
                &u.fd,
                self.mem.addr() + start * PAGE_SIZE as u64,
                n * PAGE_SIZE as u64,
                true,
            )
            .map_err(os("UFFDIO_WRITEPROTECT protect"))?,
            Imp::Hash(h) => {
                h.holes.reset();
                for p in start..start + n {
                    let v = h.page_hash(&self.mem, p)?;
                    h.hashes[p as usize] = v;
                }
            }
        }
        for p in start..start + n {
            let _ = self.pending.clear(p);
        }
        Ok(())
    }

    /// Marks the pages `pfns` (ascending runs counted in `runs`) clean after the host wrote them.
    /// With uffd and many runs, one PAGEMAP_SCAN walk re-protects the whole RAM instead of one
    /// ioctl per run (10,000 scattered pages: ~1 ms instead of ~35 ms); whatever that walk finds
    /// dirty besides `pfns` stays dirty (kept in `pending`), so no guest write is lost.
    pub(crate) fn mark_clean_pfns(
        &mut self,
        pfns: &[u64],
        runs: usize,
    ) -> Result<(), BackendError> {
        const MANY_RUNS: usize = 64;
        if !self.logging || pfns.is_empty() {
            return Ok(());
        }
        if runs <= MANY_RUNS || !matches!(self.imp, Imp::Uffd(_)) {
            let mut i = 0;
            while i < pfns.len() {
                let mut j = i + 1;
                while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
                    j += 1;
                }
                self.mark_clean(pfns[i], (j - i) as u64)?;
                i = j;
            }
            return Ok(());
        }
        self.scratch.clear_all();
        let r = match &mut self.imp {
            Imp::Uffd(u) => u
                .scan(&self.mem, &mut self.scratch, true)
                .map_err(os("PAGEMAP_SCAN")),
            Imp::Hash(_) => Ok(()),
        };
        for &p in pfns {
            let _ = self.scratch.clear(p);
            let _ = self.pending.clear(p);
        }
        // Lengths are equal by construction.
        let _ = self.pending.union_with(&self.scratch);
        r
    }

    /// Test hook: make the next harvests fail after `n` kernel calls (uffd) or at page `n` (hash).
    #[cfg(test)]
    pub(crate) fn inject_failure(&mut self, n: Option<u32>) {
        match &mut self.imp {
            Imp::Uffd(u) => u.fail_at_call = n,
            Imp::Hash(h) => h.fail_at_page = n.map(u64::from),
        }
    }

    /// Test hook: shrink the PAGEMAP_SCAN output vector so a walk needs many calls.
    #[cfg(test)]
    pub(crate) fn set_region_capacity(&mut self, n: usize) {
        if let Imp::Uffd(u) = &mut self.imp {
            u.regions = vec![PageRegion::default(); n.max(1)];
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if let Imp::Uffd(u) = &self.imp {
            // Closing the uffd unregisters too; unregistering first keeps the order explicit.
            let _ = sys::uffd_unregister(&u.fd, self.mem.addr(), self.mem.len() as u64);
        }
    }
}

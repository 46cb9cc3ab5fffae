//! The primary's capture of a paused guest, and the sweeps of all guest memory around it:
//! digests of a paused guest's memory (the verification option, both roles), and the
//! primary's record of what the secondary holds, which finds pages the hypervisor wrote behind
//! the dirty log and sends them with the checkpoint (the watch set).
//!
//! A hypervisor may write a guest's memory without marking the page in the dirty log: Xen sets
//! event-channel bits and the vCPU time info in the `vcpu_info` area that a guest registered
//! in its own RAM, through its own mapping, even while the domain is paused. Such a write is
//! in neither A nor B, so a checkpoint would leave the secondary's copy of that page stale
//! until the guest happens to write it again. With verification on, the primary keeps the
//! hash of what it last sent of every page and, at each capture, reads every page once: a
//! page outside D whose hash changed is sent too, and the digest is taken from the same reads.
//!
//! Production mode (no verification) sweeps only at its first captures (checkpoint 0, the end
//! of the initial synchronisation, included): the pages those sweeps find form the watch set,
//! which joins D at every later capture. The hypervisor's unlogged writes go to a fixed set of
//! frames (Xen: each vCPU's registered `vcpu_info`; shared info is not guest RAM), so re-reading that
//! set keeps the secondary exact at the cost of a few page copies per checkpoint instead of a
//! read of all memory.

use anyhow::Result;
use colo_core::bitmap::DirtyBitmap;
use colo_core::engine::{Digester, Primary, DIGEST_LEN};
use colo_core::{BackendError, Domain, PAGE_SIZE};

use super::pages::{copy_pages, in_order};
use crate::status::Shared;

/// Pages per read call in a sweep.
const BATCH: u64 = 1024;

/// What the primary reads of its paused guest at a capture (and of the running guest in a
/// pre-copy round), with the sweeps' record of what the secondary holds. The buffers are
/// allocated once and reused: the capture is the hot path.
#[derive(Debug)]
pub(super) struct Capture {
    /// The pages read, in pfn order; an unmappable page is left out (see `present`).
    pub(super) copy: Vec<u8>,
    /// Whether each pfn read had data.
    pub(super) present: Vec<bool>,
    /// The vCPU/platform state read at the capture.
    pub(super) state: Vec<u8>,
    /// Digest every capture (`--verify`).
    verify: bool,
    /// Dirty-log scratch for the digest's settledness.
    late: Option<DirtyBitmap>,
    /// Dirty-log scratch for sizing the copy buffer before a pause.
    peek: Option<DirtyBitmap>,
    /// What the secondary holds of each page, while sweeps run (verification, or the first
    /// captures).
    sent: Option<SentPages>,
    /// The pages found written behind the dirty log, and the sweeps still to run.
    unlogged: WatchSet,
}

impl Capture {
    /// For a guest of `pages` pages; `sweeps`: see [`crate::node::NodeOptions::unlogged_sweeps`].
    pub(super) fn new(pages: u64, verify: bool, sweeps: u32) -> Self {
        let unlogged = WatchSet::new(sweeps);
        let sent = (verify || unlogged.sweeps_left > 0).then(|| SentPages::new(pages));
        Self {
            copy: Vec::new(),
            present: Vec::new(),
            state: Vec::new(),
            verify,
            late: None,
            peek: None,
            sent,
            unlogged,
        }
    }

    /// Before a checkpoint's pause, while the PVM runs: makes the copy buffer hold the pages
    /// the dirty log shows so far and a margin, every byte of it written once, so that the
    /// pause neither allocates nor takes page faults for a checkpoint larger than any before
    /// (a 1 GiB checkpoint into a fresh buffer spent ~90 % of its pause faulting the buffer in).
    /// The peek runs while the secondary suspends its SVM, so it costs the checkpoint little;
    /// it stops once the buffer holds the whole guest.
    pub(super) fn prepare(&mut self, guest: &mut dyn Domain) -> Result<(), BackendError> {
        let pages = guest.page_count();
        let have = (self.copy.capacity() / PAGE_SIZE) as u64;
        if have >= pages {
            return Ok(());
        }
        let peek = self.peek.get_or_insert_with(|| DirtyBitmap::new(pages));
        peek.clear_all();
        guest.peek_dirty(peek)?;
        let dirty = peek.count();
        let want = (dirty + dirty / 4 + 1024).min(pages);
        if want > have {
            self.copy.clear();
            self.copy.resize(want as usize * PAGE_SIZE, 0);
            self.copy.clear();
            self.present.reserve(want as usize);
        }
        Ok(())
    }

    /// Reads `pfns` of the running guest for a pre-copy round (into `copy` and `present`).
    pub(super) fn read(
        &mut self,
        guest: &mut dyn Domain,
        pfns: &[u64],
    ) -> Result<(), BackendError> {
        self.copy.clear();
        self.present.clear();
        copy_pages(guest, pfns, &mut self.copy, Some(&mut self.present))
    }

    /// Notes that the pages last [`Capture::read`] were sent.
    pub(super) fn sent(&mut self, pfns: &[u64]) {
        if let Some(sent) = self.sent.as_mut() {
            sent.record(pfns, &self.present, &self.copy);
        }
    }

    /// Copies the capture set and the state of the paused PVM. A sweep of all memory (at every
    /// capture with verification, else at the first [`crate::node::NodeOptions::unlogged_sweeps`])
    /// also finds the pages the hypervisor wrote behind the dirty log and adds them to the watch
    /// set; every other capture re-reads the watch set. Returns the digest of memory and state
    /// when sweeping (None when unsettled, or without a sweep).
    pub(super) fn capture(
        &mut self,
        guest: &mut dyn Domain,
        engine: &mut Primary,
        status: &Shared,
    ) -> Result<Option<[u8; DIGEST_LEN]>> {
        self.copy.clear();
        self.present.clear();
        let sweep = self.verify || self.unlogged.sweeps_left > 0;
        if !sweep || self.sent.is_none() {
            engine.capture_watched(&self.unlogged.known)?;
            copy_pages(
                guest,
                engine.capture_pfns(),
                &mut self.copy,
                Some(&mut self.present),
            )?;
            self.state.clear();
            guest.get_state(&mut self.state)?;
            return Ok(None);
        }
        let grown = self.sweep(guest, engine)?;
        self.state.clear();
        guest.get_state(&mut self.state)?;
        let digest = self.digest_if_settled(guest)?;
        self.count_sweep(status, grown);
        Ok(digest)
    }

    /// Reads every page once: the capture set, and each page whose contents differ from what
    /// the secondary holds (written behind the dirty log), which joins the capture set and the
    /// watch set. Returns how many pages the watch set gained.
    fn sweep(&mut self, guest: &mut dyn Domain, engine: &mut Primary) -> Result<usize> {
        let Some(sent) = self.sent.as_mut() else {
            return Ok(0);
        };
        let late = self
            .late
            .get_or_insert_with(|| DirtyBitmap::new(guest.page_count()));
        late.clear_all();
        let unlogged = sent.sweep(
            guest,
            engine.capture_pfns(),
            &mut self.copy,
            &mut self.present,
        )?;
        if !unlogged.is_empty() {
            tracing::info!(
                "checkpoint {}: {} page(s) changed behind the dirty log since they were sent \
                 (the hypervisor wrote them); sending them too",
                engine.epoch(),
                unlogged.len()
            );
            tracing::debug!("written behind the dirty log: {unlogged:x?}");
        }
        engine.capture_also(unlogged)?;
        Ok(self.unlogged.learn(unlogged))
    }

    /// The sweep's digest of memory and the state, unless a page was logged dirty since the
    /// harvest: the guest is paused, so someone else wrote it while the sweep ran and the
    /// digest may mix old and new.
    fn digest_if_settled(&mut self, guest: &mut dyn Domain) -> Result<Option<[u8; DIGEST_LEN]>> {
        let (Some(sent), Some(late)) = (self.sent.as_ref(), self.late.as_mut()) else {
            return Ok(None);
        };
        guest.peek_dirty(late)?;
        if late.count() == 0 {
            return Ok(Some(sent.digest(&self.state)));
        }
        tracing::debug!(
            "{} pages written while the paused guest was swept",
            late.count()
        );
        Ok(None)
    }

    /// One sweep less to run; after the last one in production mode, the record of what was
    /// sent goes (no sweep follows). Publishes the sweep count and the watch set's size.
    fn count_sweep(&mut self, status: &Shared, grown: usize) {
        if self.unlogged.sweeps_left > 0 {
            self.unlogged.sweeps_left -= 1;
            if self.unlogged.sweeps_left == 0 && !self.verify {
                tracing::info!(
                    "watch set after the last sweep: {} page(s) the hypervisor writes behind \
                     the dirty log, re-read at every capture: {:x?}",
                    self.unlogged.known.len(),
                    self.unlogged.known
                );
                self.sent = None;
            }
        }
        let mut st = status.lock();
        st.sweeps += 1;
        st.watch_set = self.unlogged.known.len() as u64;
        if grown > 0 {
            tracing::debug!("watch set now {:x?}", self.unlogged.known);
        }
    }
}

/// Calls `visit(pfn, page)` for every pfn of `dom` in order (None: unmappable).
fn for_each_page<F>(
    dom: &mut dyn Domain,
    batch: &mut Vec<u64>,
    mut visit: F,
) -> Result<(), BackendError>
where
    F: FnMut(u64, Option<&[u8]>) -> Result<(), BackendError>,
{
    let pages = dom.page_count();
    let mut start = 0;
    while start < pages {
        batch.clear();
        batch.extend(start..(start + BATCH).min(pages));
        let mut next = 0;
        dom.read_pages(batch, &mut |i, page| {
            in_order(&mut next, i)?;
            visit(start + i as u64, page)
        })?;
        if next != batch.len() {
            return Err(BackendError::BadState {
                op: "read_pages",
                reason: format!("{} of {} pages delivered", next, batch.len()),
            });
        }
        start += BATCH;
    }
    Ok(())
}

/// Digest of all of a paused domain's memory and `state`.
fn digest_domain(dom: &mut dyn Domain, state: &[u8]) -> Result<[u8; DIGEST_LEN], BackendError> {
    let mut d = Digester::new();
    let mut batch = Vec::with_capacity(BATCH as usize);
    for_each_page(dom, &mut batch, |_, page| {
        match page {
            Some(p) => d.page(p),
            None => d.absent_page(),
        }
        Ok(())
    })?;
    Ok(d.finish(state))
}

/// The pages sweeps found written behind the dirty log, re-read at every capture.
#[derive(Debug, Default)]
pub(super) struct WatchSet {
    /// Sweeps still to run in production mode.
    pub(super) sweeps_left: u32,
    /// Every pfn a sweep found written behind the log, ascending.
    pub(super) known: Vec<u64>,
}

impl WatchSet {
    pub(super) fn new(sweeps: u32) -> Self {
        Self {
            sweeps_left: sweeps,
            known: Vec::new(),
        }
    }

    /// Adds the pfns a sweep found (ascending); returns how many were new.
    pub(super) fn learn(&mut self, found: &[u64]) -> usize {
        let before = self.known.len();
        for &pfn in found {
            if let Err(at) = self.known.binary_search(&pfn) {
                self.known.insert(at, pfn);
            }
        }
        self.known.len() - before
    }
}

/// Which dirty pages make a digest unsettled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Watch {
    /// Pages dirtied from now on (the secondary's own checkpoint writes may show in its log).
    FromNow,
    /// None: the dirty log is off (a secondary starts it after checkpoint 0).
    Off,
}

/// [`digest_domain`] of a paused guest, or None if its memory changed meanwhile: pages the dirty
/// log shows written after the digest began were written by someone other than the paused guest,
/// so the digest may mix old and new contents. `late` is scratch space (allocated on first use,
/// verification only).
pub(super) fn settled_digest(
    dom: &mut dyn Domain,
    state: &[u8],
    late: &mut Option<DirtyBitmap>,
    watch: Watch,
) -> Result<Option<[u8; DIGEST_LEN]>, BackendError> {
    if watch == Watch::Off {
        return digest_domain(dom, state).map(Some);
    }
    let pages = dom.page_count();
    let late = late.get_or_insert_with(|| DirtyBitmap::new(pages));
    late.clear_all();
    dom.peek_dirty(late)?;
    let before = late.count();
    let digest = digest_domain(dom, state)?;
    dom.peek_dirty(late)?;
    let after = late.count();
    if after > before {
        tracing::debug!(
            "{} pages written while the paused guest was digested",
            after - before
        );
        return Ok(None);
    }
    Ok(Some(digest))
}

/// What the primary last sent the secondary of every page, as the hash the page contributes to
/// the digest (an unmappable page counts as zeros). Verification only: 8 bytes per pfn.
#[derive(Debug)]
pub(super) struct SentPages {
    hashes: Vec<u64>,
    absent: u64,
    batch: Vec<u64>,
    unlogged: Vec<u64>,
    /// The capture's digest of all pages; `finish` adds the state.
    digester: Digester,
}

impl SentPages {
    /// A record for a guest of `pages` pages of which nothing was sent yet.
    pub(super) fn new(pages: u64) -> Self {
        let digester = Digester::new();
        let absent = digester.absent_hash();
        Self {
            hashes: vec![absent; usize::try_from(pages).unwrap_or(0)],
            absent,
            batch: Vec::with_capacity(BATCH as usize),
            unlogged: Vec::new(),
            digester,
        }
    }

    /// Notes pages just sent: `pfns[i]` had data iff `present[i]` (then its bytes are next in
    /// `data`), as [`copy_pages`] lays them out.
    pub(super) fn record(&mut self, pfns: &[u64], present: &[bool], data: &[u8]) {
        let mut pages = data.chunks_exact(PAGE_SIZE);
        for (&pfn, &ok) in pfns.iter().zip(present) {
            let h = if ok {
                pages.next().map_or(self.absent, Digester::hash_page)
            } else {
                self.absent
            };
            if let Some(slot) = self.hashes.get_mut(pfn as usize) {
                *slot = h;
            }
        }
    }

    /// The capture with verification, in one pass over every page of the paused guest: the
    /// pages of `capture` (ascending) and every other page whose contents differ from what was
    /// last sent are appended to `out` (with `present`, as `copy_pages` does), everything is
    /// hashed for the digest from the same read, and the record is updated. Returns the pages
    /// outside `capture` that were taken (ascending): written behind the dirty log.
    pub(super) fn sweep(
        &mut self,
        dom: &mut dyn Domain,
        capture: &[u64],
        out: &mut Vec<u8>,
        present: &mut Vec<bool>,
    ) -> Result<&[u64], BackendError> {
        if self.hashes.len() as u64 != dom.page_count() {
            return Err(BackendError::BadState {
                op: "verification sweep",
                reason: format!(
                    "record for {} pages, guest has {}",
                    self.hashes.len(),
                    dom.page_count()
                ),
            });
        }
        self.digester = Digester::new();
        self.unlogged.clear();
        out.reserve(capture.len() * PAGE_SIZE);
        let mut wanted = capture.iter().copied().peekable();
        let (hashes, unlogged, digester, absent) = (
            &mut self.hashes,
            &mut self.unlogged,
            &mut self.digester,
            self.absent,
        );
        for_each_page(dom, &mut self.batch, |pfn, page| {
            let h = match page {
                Some(p) if p.len() == PAGE_SIZE => Digester::hash_page(p),
                Some(p) => {
                    return Err(BackendError::DataLength {
                        got: p.len(),
                        want: PAGE_SIZE,
                        pages: 1,
                    })
                }
                None => absent,
            };
            let in_capture = wanted.next_if_eq(&pfn).is_some();
            let slot = &mut hashes[pfn as usize];
            if in_capture || *slot != h {
                if let Some(p) = page {
                    out.extend_from_slice(p);
                }
                present.push(page.is_some());
                if !in_capture {
                    unlogged.push(pfn);
                }
            }
            *slot = h;
            digester.page_hash(h);
            Ok(())
        })?;
        if let Some(pfn) = wanted.next() {
            return Err(BackendError::PfnOutOfRange {
                pfn,
                pages: dom.page_count(),
            });
        }
        Ok(&self.unlogged)
    }

    /// The digest of the last sweep's pages and `state`.
    pub(super) fn digest(&self, state: &[u8]) -> [u8; DIGEST_LEN] {
        self.digester.finish(state)
    }
}

//! The backend conformance suite: checks every [`Domain`] implementation must pass, run by
//! colo-mock's tests and by colo-xen against a live domain.
//!
//! The suite does no IO and spawns no threads. It drives the backend through the [`Domain`]
//! trait and drives the *guest* through a [`ConformanceGuest`] that the backend's test supplies
//! (colo-mock: code run on a vCPU thread; colo-xen: an agent inside the guest). Checks:
//!
//! | check | what it proves |
//! |---|---|
//! | [`pause_stops_writes`] | after `pause` returns, no page changes and nothing is logged dirty, although the guest was busy writing |
//! | [`every_write_reported`] | every page the guest wrote is in the next harvest (exactly those, for an exact guest) |
//! | [`nothing_twice_after_clear`] | a harvest clears: the next harvest holds only newer writes |
//! | [`read_after_write`] | `read_pages` returns what the guest wrote, and what `write_pages` wrote |
//! | [`harvest_peek_agree`] | `peek_dirty` does not clear and agrees with the following harvest |
//! | [`state_round_trip`] | `get_state` → `set_state` → `get_state` gives the same state ([`ConformanceGuest::state_difference`]: bytes, or a backend's clock-free comparison); bad blobs are rejected |
//! | [`rejects_bad_arguments`] | out-of-range pfns, wrong data lengths and wrong bitmap sizes are errors |
//!
//! [`run_all`] runs them in order; the domain must be freshly created, paused, logging off.
//!
//! The guest NIC ([`GuestNic`]) has checks of its own. A backend whose guest has a network path
//! supplies a [`NicConformanceGuest`] (colo-mock: the kv guest) and passes [`run_nic`]:
//!
//! | check | what it proves |
//! |---|---|
//! | [`nic_seq_is_guest_state`] | the next request number lives in guest memory or in the state blob (a vif's counter): restoring both restores it |
//! | [`nic_requests_answered`] | `inject` takes exactly the next number and moves it on by one (a full ring: `Ok(false)`, nothing changes); the guest's answers come out of `drain_tx` once each, in order; the output signal, if any, fired |
//!
//! A backend without a network path (colo-xen in this release) passes [`nic_absent`]: its
//! `inject` is refused as unsupported, nothing ever comes out, and there is no output signal.

use crate::backend::{BackendError, Domain, GuestNic};
use crate::bitmap::DirtyBitmap;
use crate::PAGE_SIZE;

/// Why a conformance check failed.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// The backend returned an error where it should have succeeded.
    #[error("{check}: backend error")]
    Backend {
        /// The check.
        check: &'static str,
        /// The error.
        #[source]
        source: BackendError,
    },
    /// The guest driver failed.
    #[error("{check}: guest driver failed: {reason}")]
    Guest {
        /// The check.
        check: &'static str,
        /// Why.
        reason: String,
    },
    /// The backend behaved wrongly.
    #[error("{check}: {detail}")]
    Violated {
        /// The check.
        check: &'static str,
        /// What was expected and what happened.
        detail: String,
    },
}

/// The guest side of a conformance run: what only code inside the guest can do.
pub trait ConformanceGuest {
    /// The backend under test.
    type Dom: Domain;

    /// The domain.
    fn domain(&mut self) -> &mut Self::Dom;

    /// At least 64 pfns the guest may overwrite freely (ascending, distinct).
    fn scratch_pfns(&self) -> Vec<u64>;

    /// True if, with background writes off, the guest writes no page except those it is asked
    /// to write, so harvests can be compared for equality rather than inclusion.
    fn exact(&self) -> bool;

    /// Makes the guest itself set every byte of each page in `pfns` to `pattern`; returns when
    /// the writes are done. Called only while the domain runs.
    fn guest_write(&mut self, pfns: &[u64], pattern: u8) -> Result<(), String>;

    /// Turns on or off a guest activity that keeps writing memory while the guest runs.
    fn set_background_writes(&mut self, on: bool) -> Result<(), String>;

    /// Lets some time pass (e.g. 20–50 ms) so a running guest makes progress.
    fn let_time_pass(&mut self);

    /// How two state blobs of this backend differ as vCPU and device state, or `None` if they
    /// are the same. The default compares bytes. A backend whose paused guest's clock still
    /// runs (Xen computes the guest's TSC and timer counts at every save) compares everything
    /// but those clock fields, and must name them in its docs.
    fn state_difference(&self, a: &[u8], b: &[u8]) -> Option<String> {
        byte_difference(a, b)
    }
}

/// Where two byte strings differ: `None` if equal, else the lengths or the count of differing
/// bytes and the first offset.
pub fn byte_difference(a: &[u8], b: &[u8]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("{} bytes against {}", a.len(), b.len()));
    }
    let first = a.iter().zip(b).position(|(x, y)| x != y)?;
    let count = a.iter().zip(b).filter(|(x, y)| x != y).count();
    Some(format!(
        "{count} bytes differ, the first at offset {first:#x}"
    ))
}

type Check = Result<(), ConformanceError>;

fn be(check: &'static str) -> impl FnOnce(BackendError) -> ConformanceError {
    move |source| ConformanceError::Backend { check, source }
}

fn guest(check: &'static str) -> impl FnOnce(String) -> ConformanceError {
    move |reason| ConformanceError::Guest { check, reason }
}

fn violated(check: &'static str, detail: String) -> ConformanceError {
    ConformanceError::Violated { check, detail }
}

fn harvest<D: Domain>(d: &mut D, check: &'static str) -> Result<DirtyBitmap, ConformanceError> {
    let mut b = DirtyBitmap::new(d.page_count());
    d.harvest_dirty(&mut b).map_err(be(check))?;
    Ok(b)
}

fn peek<D: Domain>(d: &mut D, check: &'static str) -> Result<DirtyBitmap, ConformanceError> {
    let mut b = DirtyBitmap::new(d.page_count());
    d.peek_dirty(&mut b).map_err(be(check))?;
    Ok(b)
}

/// xxh3-128 of every page of the domain, read in batches of 1024.
fn digest<D: Domain>(d: &mut D, check: &'static str) -> Result<u128, ConformanceError> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let n = d.page_count();
    let mut pfns = Vec::with_capacity(1024);
    let mut start = 0;
    while start < n {
        pfns.clear();
        pfns.extend(start..n.min(start + 1024));
        d.read_pages(&pfns, &mut |_, page| {
            match page {
                Some(p) => h.update(p),
                None => h.update(&[0xFF]),
            }
            Ok(())
        })
        .map_err(be(check))?;
        start += 1024;
    }
    Ok(h.digest128())
}

/// Checks that the pages `pfns` read back entirely as `pattern`.
fn expect_pattern<D: Domain>(d: &mut D, pfns: &[u64], pattern: u8, check: &'static str) -> Check {
    let mut bad = None;
    d.read_pages(pfns, &mut |i, page| {
        if bad.is_none()
            && !page.is_some_and(|p| p.len() == PAGE_SIZE && p.iter().all(|&b| b == pattern))
        {
            bad = Some(i);
        }
        Ok(())
    })
    .map_err(be(check))?;
    match bad {
        Some(i) => Err(violated(
            check,
            format!("pfn {:#x} does not read back as {pattern:#04x}", pfns[i]),
        )),
        None => Ok(()),
    }
}

fn expect_reported(got: &DirtyBitmap, want: &[u64], exact: bool, check: &'static str) -> Check {
    let missing: Vec<u64> = want
        .iter()
        .copied()
        .filter(|&p| !got.test(p).unwrap_or(false))
        .take(8)
        .collect();
    if !missing.is_empty() {
        return Err(violated(
            check,
            format!("written pages not reported (first 8): {missing:#x?}"),
        ));
    }
    if exact && got.count() != want.len() as u64 {
        let want_b =
            DirtyBitmap::from_pfns(got.len(), want).map_err(|e| violated(check, e.to_string()))?;
        let mut extra = got.clone();
        let _ = extra.difference_with(&want_b);
        let first: Vec<u64> = extra.iter().take(8).collect();
        return Err(violated(
            check,
            format!(
                "{} pages reported that were not written (first 8: {first:#x?})",
                extra.count()
            ),
        ));
    }
    Ok(())
}

/// Splits the guest's scratch pfns into `k` disjoint groups of (nearly) equal size.
fn groups<G: ConformanceGuest>(g: &G, k: usize) -> Vec<Vec<u64>> {
    let all = g.scratch_pfns();
    let mut out = vec![Vec::new(); k];
    for (i, p) in all.into_iter().enumerate() {
        out[i % k].push(p);
    }
    out
}

/// After `pause` returns, guest memory does not change and no page is logged dirty, even though
/// the guest was writing busily right before.
pub fn pause_stops_writes<G: ConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "pause_stops_writes";
    g.set_background_writes(true).map_err(guest(C))?;
    g.domain().resume().map_err(be(C))?;
    g.let_time_pass();
    g.domain().pause().map_err(be(C))?;
    g.domain().pause().map_err(be(C))?; // idempotent
    if !g.domain().is_paused() {
        return Err(violated(C, "is_paused() is false after pause()".into()));
    }
    let before = harvest(g.domain(), C)?;
    if before.count() == 0 {
        return Err(violated(
            C,
            "the guest's background writes were not reported at all".into(),
        ));
    }
    let h1 = digest(g.domain(), C)?;
    g.let_time_pass();
    let h2 = digest(g.domain(), C)?;
    let after = harvest(g.domain(), C)?;
    g.set_background_writes(false).map_err(guest(C))?;
    if h1 != h2 {
        return Err(violated(C, "guest memory changed while paused".into()));
    }
    if after.count() != 0 {
        return Err(violated(
            C,
            format!("{} pages logged dirty while paused", after.count()),
        ));
    }
    Ok(())
}

/// Every page the guest writes appears in the next harvest (and, for an exact guest, nothing
/// else does).
pub fn every_write_reported<G: ConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "every_write_reported";
    let gr = groups(g, 2);
    let exact = g.exact();
    g.domain().resume().map_err(be(C))?;
    let _ = harvest(g.domain(), C)?;
    g.guest_write(&gr[0], 0xA1).map_err(guest(C))?;
    g.domain().pause().map_err(be(C))?;
    let got = harvest(g.domain(), C)?;
    expect_reported(&got, &gr[0], exact, C)
}

/// A harvest clears what it returned: a second harvest while paused is empty, and after new
/// writes it holds only those.
pub fn nothing_twice_after_clear<G: ConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "nothing_twice_after_clear";
    let gr = groups(g, 2);
    let exact = g.exact();
    g.domain().resume().map_err(be(C))?;
    g.guest_write(&gr[0], 0xB2).map_err(guest(C))?;
    g.domain().pause().map_err(be(C))?;
    let first = harvest(g.domain(), C)?;
    expect_reported(&first, &gr[0], exact, C)?;
    let second = harvest(g.domain(), C)?;
    if second.count() != 0 {
        return Err(violated(
            C,
            format!(
                "{} pages reported again right after a harvest",
                second.count()
            ),
        ));
    }
    g.domain().resume().map_err(be(C))?;
    g.guest_write(&gr[1], 0xB3).map_err(guest(C))?;
    g.domain().pause().map_err(be(C))?;
    let third = harvest(g.domain(), C)?;
    expect_reported(&third, &gr[1], exact, C)
}

/// `read_pages` returns what the guest wrote, and what the host wrote with `write_pages`.
pub fn read_after_write<G: ConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "read_after_write";
    let gr = groups(g, 2);
    g.domain().resume().map_err(be(C))?;
    g.guest_write(&gr[0], 0xC4).map_err(guest(C))?;
    g.domain().pause().map_err(be(C))?;
    expect_pattern(g.domain(), &gr[0], 0xC4, C)?;
    let data = vec![0xC5u8; gr[1].len() * PAGE_SIZE];
    g.domain().write_pages(&gr[1], &data).map_err(be(C))?;
    expect_pattern(g.domain(), &gr[1], 0xC5, C)?;
    expect_pattern(g.domain(), &gr[0], 0xC4, C)?;
    let _ = harvest(g.domain(), C)?;
    Ok(())
}

/// `copy_pages` yields what `read_pages` does, in order, for runs and scattered pfns alike.
pub fn copy_agrees_with_read<G: ConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "copy_agrees_with_read";
    let gr = groups(g, 2);
    let mut pfns: Vec<u64> = gr[0].iter().chain(&gr[1]).copied().collect();
    pfns.sort_unstable();
    // A run, a gap, the rest; plus the same pfns in reverse.
    let mut rev = pfns.clone();
    rev.reverse();
    for list in [&pfns, &rev] {
        let mut want = Vec::new();
        let mut want_present = Vec::new();
        g.domain()
            .read_pages(list, &mut |_, page| {
                want_present.push(page.is_some());
                if let Some(p) = page {
                    want.extend_from_slice(p);
                }
                Ok(())
            })
            .map_err(be(C))?;
        let (mut got, mut present) = (vec![7u8; 3], Vec::new());
        g.domain()
            .copy_pages(list, &mut got, Some(&mut present))
            .map_err(be(C))?;
        if got[..3] != [7, 7, 7] || got[3..] != want[..] || present != want_present {
            return Err(violated(
                C,
                format!("copy_pages of {} pfns differs from read_pages", list.len()),
            ));
        }
    }
    Ok(())
}

/// `peek_dirty` does not clear and agrees with the harvest that follows it.
pub fn harvest_peek_agree<G: ConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "harvest_peek_agree";
    let gr = groups(g, 3);
    g.domain().resume().map_err(be(C))?;
    let _ = harvest(g.domain(), C)?;
    g.guest_write(&gr[2], 0xD6).map_err(guest(C))?;
    g.domain().pause().map_err(be(C))?;
    let p1 = peek(g.domain(), C)?;
    let p2 = peek(g.domain(), C)?;
    let h = harvest(g.domain(), C)?;
    let p3 = peek(g.domain(), C)?;
    if p1 != p2 {
        return Err(violated(C, "two peeks while paused differ".into()));
    }
    if p1 != h {
        return Err(violated(
            C,
            format!("peek saw {} pages, the harvest {}", p1.count(), h.count()),
        ));
    }
    expect_reported(&h, &gr[2], g.exact(), C)?;
    if p3.count() != 0 {
        return Err(violated(C, "a peek after a harvest is not empty".into()));
    }
    Ok(())
}

/// `get_state` → `set_state` → `get_state` gives the same state; malformed blobs are rejected and
/// leave the state as it was.
pub fn state_round_trip<G: ConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "state_round_trip";
    g.domain().pause().map_err(be(C))?;
    let mut s1 = Vec::new();
    g.domain().get_state(&mut s1).map_err(be(C))?;
    if s1.is_empty() {
        return Err(violated(C, "empty state blob".into()));
    }
    g.domain().set_state(&s1).map_err(be(C))?;
    let mut s2 = Vec::new();
    g.domain().get_state(&mut s2).map_err(be(C))?;
    if let Some(diff) = g.state_difference(&s1, &s2) {
        return Err(violated(
            C,
            format!("state changed across set_state(get_state()): {diff}"),
        ));
    }
    for (what, bad) in [
        ("empty", Vec::new()),
        ("truncated", s1[..s1.len() - 1].to_vec()),
        ("garbage", vec![0x5Au8; s1.len()]),
    ] {
        if g.domain().set_state(&bad).is_ok() {
            return Err(violated(C, format!("a {what} state blob was accepted")));
        }
    }
    let mut s3 = Vec::new();
    g.domain().get_state(&mut s3).map_err(be(C))?;
    if let Some(diff) = g.state_difference(&s1, &s3) {
        return Err(violated(
            C,
            format!("a rejected blob changed the state: {diff}"),
        ));
    }
    Ok(())
}

/// Out-of-range pfns, wrong data lengths and wrong bitmap sizes are errors, not panics.
pub fn rejects_bad_arguments<G: ConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "rejects_bad_arguments";
    let d = g.domain();
    d.pause().map_err(be(C))?;
    let n = d.page_count();
    let r = d.read_pages(&[0, n], &mut |_, _| Ok(()));
    if !matches!(r, Err(BackendError::PfnOutOfRange { pfn, .. }) if pfn == n) {
        return Err(violated(C, format!("read_pages of pfn {n:#x}: {r:?}")));
    }
    let r = d.write_pages(&[n], &[0u8; PAGE_SIZE]);
    if !matches!(r, Err(BackendError::PfnOutOfRange { .. })) {
        return Err(violated(C, format!("write_pages of pfn {n:#x}: {r:?}")));
    }
    let r = d.write_pages(&[0], &[0u8; PAGE_SIZE - 1]);
    if !matches!(r, Err(BackendError::DataLength { .. })) {
        return Err(violated(C, format!("write_pages with short data: {r:?}")));
    }
    let mut wrong = DirtyBitmap::new(n + 1);
    if d.harvest_dirty(&mut wrong).is_ok() || d.peek_dirty(&mut wrong).is_ok() {
        return Err(violated(
            C,
            "a bitmap of the wrong size was accepted".into(),
        ));
    }
    Ok(())
}

/// Runs every check on a freshly created, paused domain (dirty logging is started here and
/// stopped at the end).
pub fn run_all<G: ConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "run_all";
    if g.scratch_pfns().len() < 64 {
        return Err(violated(
            C,
            "the guest offers fewer than 64 scratch pfns".into(),
        ));
    }
    g.domain().pause().map_err(be(C))?;
    g.domain().start_dirty_log().map_err(be(C))?;
    pause_stops_writes(g)?;
    every_write_reported(g)?;
    nothing_twice_after_clear(g)?;
    read_after_write(g)?;
    copy_agrees_with_read(g)?;
    harvest_peek_agree(g)?;
    state_round_trip(g)?;
    rejects_bad_arguments(g)?;
    g.domain().stop_dirty_log().map_err(be(C))?;
    Ok(())
}

/// The guest side of a NIC conformance run: a guest with a network path that answers requests.
pub trait NicConformanceGuest {
    /// The backend under test.
    type Dom: Domain + GuestNic;

    /// The domain.
    fn domain(&mut self) -> &mut Self::Dom;

    /// A request frame the guest answers with exactly one frame, told apart by `id`.
    fn request(&mut self, id: u64) -> Vec<u8>;

    /// The `id` of the request that `frame` (a frame the guest emitted) answers, if any.
    fn answered(&self, frame: &[u8]) -> Option<u64>;

    /// Lets some time pass (e.g. 20–50 ms) so a running guest makes progress.
    fn let_time_pass(&mut self);

    /// The most requests injected at once into the paused guest. A ring in guest memory says
    /// "full" itself (the default, 4096, finds its end); a port on a vif never does (the
    /// host's queues decide, and drop beyond their size), so its guest names a number its
    /// queues hold.
    fn most_requests(&self) -> u64 {
        4096
    }
}

/// Every page of `d` in pfn order (an unmappable page left out: it cannot be written back).
fn read_all<D: Domain>(
    d: &mut D,
    check: &'static str,
) -> Result<(Vec<u64>, Vec<u8>), ConformanceError> {
    let all: Vec<u64> = (0..d.page_count()).collect();
    let (mut pfns, mut data) = (Vec::new(), Vec::new());
    for batch in all.chunks(1024) {
        d.read_pages(batch, &mut |i, page| {
            if let Some(p) = page {
                pfns.push(batch[i]);
                data.extend_from_slice(p);
            }
            Ok(())
        })
        .map_err(be(check))?;
    }
    Ok((pfns, data))
}

/// The next request number is guest state: a request injected into a paused guest is undone,
/// number included, by writing back the memory and state read before it.
pub fn nic_seq_is_guest_state<G: NicConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "nic_seq_is_guest_state";
    g.domain().pause().map_err(be(C))?;
    let seq = g.domain().rx_next_seq();
    let (pfns, data) = read_all(g.domain(), C)?;
    let mut state = Vec::new();
    g.domain().get_state(&mut state).map_err(be(C))?;
    let frame = g.request(seq);
    if !g.domain().inject(seq, &frame).map_err(be(C))? {
        return Err(violated(C, "the RX ring of a fresh guest is full".into()));
    }
    if g.domain().rx_next_seq() != seq + 1 {
        return Err(violated(
            C,
            format!(
                "after injecting request {seq} the guest expects {}",
                g.domain().rx_next_seq()
            ),
        ));
    }
    g.domain().write_pages(&pfns, &data).map_err(be(C))?;
    g.domain().set_state(&state).map_err(be(C))?;
    let after = g.domain().rx_next_seq();
    if after != seq {
        return Err(violated(
            C,
            format!("memory and state restored, yet the guest expects request {after}, not {seq}"),
        ));
    }
    Ok(())
}

/// Fills the paused guest's RX ring (at most `most` requests) from its next number on; returns
/// the numbers accepted.
fn fill_ring<G: NicConformanceGuest>(
    g: &mut G,
    most: u64,
    check: &'static str,
) -> Result<Vec<u64>, ConformanceError> {
    let first = g.domain().rx_next_seq();
    let frame = g.request(first);
    let wrong = g.domain().inject(first + 1, &frame);
    if wrong.is_ok() || g.domain().rx_next_seq() != first {
        return Err(violated(
            check,
            format!(
                "request {} injected while {first} was due: {wrong:?}",
                first + 1
            ),
        ));
    }
    let mut accepted = Vec::new();
    for seq in first..first + most {
        let frame = g.request(seq);
        let taken = g.domain().inject(seq, &frame).map_err(be(check))?;
        let next = g.domain().rx_next_seq();
        let want = if taken { seq + 1 } else { seq };
        if next != want {
            return Err(violated(
                check,
                format!(
                    "inject({seq}) answered {taken}, then the guest expects {next}, not {want}"
                ),
            ));
        }
        if !taken {
            break;
        }
        accepted.push(seq);
    }
    if accepted.is_empty() {
        return Err(violated(
            check,
            "the RX ring of an idle guest is full".into(),
        ));
    }
    Ok(accepted)
}

/// `inject` takes exactly the next request number and moves it on by one; a full ring answers
/// `Ok(false)` and changes nothing; the running guest's answers come out of `drain_tx` once
/// each, in order; the output signal, if the NIC has one, fired.
pub fn nic_requests_answered<G: NicConformanceGuest>(g: &mut G) -> Check {
    const C: &str = "nic_requests_answered";
    g.domain().pause().map_err(be(C))?;
    g.domain().drain_tx(&mut |_| {});
    let signal = g.domain().output_ready();
    if let Some(rx) = &signal {
        while rx.try_recv().is_ok() {}
    }
    let most = g.most_requests();
    let accepted = fill_ring(g, most, C)?;
    g.domain().resume().map_err(be(C))?;
    let mut answers = Vec::new();
    let mut signalled = false;
    for _ in 0..200 {
        if answers.len() >= accepted.len() {
            break;
        }
        g.let_time_pass();
        signalled |= signal.as_ref().is_some_and(|rx| rx.try_recv().is_ok());
        let mut frames = Vec::new();
        g.domain().drain_tx(&mut |f| frames.push(f.to_vec()));
        answers.extend(frames.iter().filter_map(|f| g.answered(f)));
    }
    g.domain().pause().map_err(be(C))?;
    signalled |= signal.as_ref().is_some_and(|rx| rx.try_recv().is_ok());
    let mut again = 0;
    g.domain().drain_tx(&mut |_| again += 1);
    if answers != accepted {
        return Err(violated(
            C,
            format!(
                "requests {:?}..={:?} injected, answers seen for {} of them{}",
                accepted.first(),
                accepted.last(),
                answers.len(),
                if answers.len() == accepted.len() {
                    ", out of order or twice"
                } else {
                    ""
                }
            ),
        ));
    }
    if again != 0 {
        return Err(violated(
            C,
            format!("{again} frames came out of a paused guest after all were drained"),
        ));
    }
    if signal.is_some() && !signalled {
        return Err(violated(
            C,
            "the guest emitted output but the output signal never fired".into(),
        ));
    }
    Ok(())
}

/// Runs the NIC checks on a freshly created, paused domain.
pub fn run_nic<G: NicConformanceGuest>(g: &mut G) -> Check {
    nic_seq_is_guest_state(g)?;
    nic_requests_answered(g)
}

/// The contract of a NIC without a network path: `inject` is refused as unsupported and
/// changes nothing, nothing ever comes out, and there is no output signal to wait on.
pub fn nic_absent<N: GuestNic>(nic: &mut N) -> Check {
    const C: &str = "nic_absent";
    let seq = nic.rx_next_seq();
    let r = nic.inject(seq, &[0u8; 64]);
    if !matches!(r, Err(BackendError::Unsupported(_))) {
        return Err(violated(
            C,
            format!("inject({seq}) answered {r:?}, not unsupported"),
        ));
    }
    if nic.rx_next_seq() != seq {
        return Err(violated(
            C,
            "a refused inject moved the request number on".into(),
        ));
    }
    let mut frames = 0;
    nic.drain_tx(&mut |_| frames += 1);
    if frames != 0 {
        return Err(violated(
            C,
            format!("{frames} frames came out of a NIC without a network path"),
        ));
    }
    if nic.output_ready().is_some() {
        return Err(violated(
            C,
            "a NIC without a network path offers an output signal".into(),
        ));
    }
    Ok(())
}

//! Drives a primary and a secondary state machine against each other in memory, with two
//! simulated guests, to check the protocol itself: D = A ∪ B makes the memories identical after
//! every checkpoint, primary-only mode does not, and a torn checkpoint is never applied.

use std::time::{Duration, Instant};

use colo_core::engine::Delivery;
use colo_core::engine::{
    CheckpointStats, Primary, PrimaryAction, PrimaryConfig, PrimaryState, Secondary,
    SecondaryAction, SecondaryConfig, SecondaryState, SyncMode, Trigger, Verdict,
};
use colo_core::stream::{write_page_data, Decoder, DecoderConfig, Event};
use colo_core::{DirtyBitmap, PAGE_SIZE};

/// A guest: memory, a dirty log, a paused flag and a tiny state.
struct SimGuest {
    mem: Vec<u8>,
    dirty: DirtyBitmap,
    paused: bool,
    state: Vec<u8>,
    rng: u64,
}

impl SimGuest {
    fn new(pages: u64, seed: u64) -> Self {
        Self {
            mem: vec![0; pages as usize * PAGE_SIZE],
            dirty: DirtyBitmap::new(pages),
            paused: false,
            state: seed.to_le_bytes().to_vec(),
            rng: seed,
        }
    }

    fn pages(&self) -> u64 {
        (self.mem.len() / PAGE_SIZE) as u64
    }

    /// The guest writes `n` random pages.
    fn run(&mut self, n: usize) {
        assert!(!self.paused);
        for _ in 0..n {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let pfn = self.rng % self.pages();
            let off = pfn as usize * PAGE_SIZE + (self.rng >> 40) as usize % PAGE_SIZE;
            self.mem[off] = self.mem[off].wrapping_add(1 + (self.rng >> 20) as u8 % 250);
            self.dirty.set(pfn).unwrap();
        }
        self.state = self.rng.to_le_bytes().to_vec();
    }

    fn page(&self, pfn: u64) -> &[u8] {
        &self.mem[pfn as usize * PAGE_SIZE..(pfn as usize + 1) * PAGE_SIZE]
    }
}

struct Pair {
    p: Primary,
    s: Secondary,
    pg: SimGuest,
    sg: SimGuest,
    /// Bytes in flight primary → secondary, and back.
    to_s: Vec<u8>,
    to_p: Vec<u8>,
    dec_s: Decoder,
    dec_p: Decoder,
    copy: Vec<u8>,
    state: Vec<u8>,
    /// The PVM's memory at the last capture.
    snapshot: Vec<u8>,
    /// Pfns the next capture adds with `capture_also` (written behind the dirty log).
    also: Vec<u64>,
    /// Pfns every capture adds with `capture_watched` (the watch set), and how many the last
    /// committed checkpoint carried that way.
    watched: Vec<u64>,
    last_watched: u64,
    /// Additions the next capture tries first, each expected to be refused, and the errors.
    probes: Vec<Vec<u64>>,
    probe_errors: Vec<String>,
    committed: Vec<u64>,
    /// The figures of every committed checkpoint, and the verdicts of verified ones.
    stats: Vec<CheckpointStats>,
    verdicts: Vec<Verdict>,
    /// The digests each side reports at its capture / apply (with verification).
    p_digest: Option<[u8; 32]>,
    s_digest: Option<[u8; 32]>,
    /// The secondary driver's copy of the staged pages (`Delivery::StagePage`), in order.
    s_staged: Vec<u8>,
    now: Instant,
}

impl Pair {
    fn new(pages: u64, mode: SyncMode) -> Self {
        Self::build(pages, mode, false)
    }

    fn build(pages: u64, mode: SyncMode, verify: bool) -> Self {
        let now = Instant::now();
        let mut pc = PrimaryConfig::new(pages);
        pc.sync_mode = mode;
        pc.link.nonce = [1; 32];
        pc.link.verify = verify;
        let mut sc = SecondaryConfig::new(pages);
        sc.nonce = [2; 32];
        sc.verify = verify;
        Self {
            p: Primary::new(pc, now),
            s: Secondary::new(sc, now),
            pg: SimGuest::new(pages, 11),
            sg: SimGuest::new(pages, 99),
            to_s: Vec::new(),
            to_p: Vec::new(),
            dec_s: Decoder::new(DecoderConfig {
                expect_headers: true,
                page_count: Some(pages),
            }),
            dec_p: Decoder::new(DecoderConfig {
                expect_headers: false,
                page_count: Some(pages),
            }),
            copy: Vec::new(),
            state: Vec::new(),
            snapshot: Vec::new(),
            also: Vec::new(),
            watched: Vec::new(),
            last_watched: 0,
            probes: Vec::new(),
            probe_errors: Vec::new(),
            committed: Vec::new(),
            stats: Vec::new(),
            verdicts: Vec::new(),
            p_digest: None,
            s_digest: None,
            s_staged: Vec::new(),
            now,
        }
    }

    fn tick(&mut self) {
        self.now += Duration::from_millis(1);
    }

    /// Runs the primary's queued actions.
    fn primary_actions(&mut self) {
        self.to_s.append(self.p.outbox_mut());
        while let Some(a) = self.p.poll_action() {
            match a {
                PrimaryAction::StartDirtyLog => self.pg.dirty.clear_all(),
                PrimaryAction::SendPages { all } => {
                    let pfns: Vec<u64> = if all {
                        (0..self.pg.pages()).collect()
                    } else {
                        self.p.dirty_pages().to_pfns()
                    };
                    let pages: Vec<&[u8]> = pfns.iter().map(|&p| self.pg.page(p)).collect();
                    let mut scratch = Vec::new();
                    let n = write_page_data(&mut self.to_s, &pfns, &pages, &mut scratch).unwrap();
                    self.p.pages_sent(self.now, n).unwrap();
                }
                PrimaryAction::HarvestDirty => {
                    let t = self.p.harvest_target();
                    t.union_with(&self.pg.dirty).unwrap();
                    self.pg.dirty.clear_all();
                    self.p.harvested(self.now).unwrap();
                }
                PrimaryAction::Pause => {
                    self.pg.paused = true;
                    self.p.paused(self.now).unwrap();
                }
                PrimaryAction::BeginEpoch { .. } => {}
                PrimaryAction::Capture => {
                    for probe in std::mem::take(&mut self.probes) {
                        let err = self.p.capture_also(&probe).unwrap_err();
                        self.probe_errors.push(err.to_string());
                    }
                    let also = std::mem::take(&mut self.also);
                    self.p.capture_also(&also).unwrap();
                    self.p.capture_watched(&self.watched).unwrap();
                    self.copy.clear();
                    for &pfn in self.p.capture_pfns() {
                        self.copy.extend_from_slice(self.pg.page(pfn));
                    }
                    self.state = self.pg.state.clone();
                    self.snapshot = self.pg.mem.clone();
                    self.p.captured(self.now, self.p_digest).unwrap();
                }
                PrimaryAction::Resume => {
                    self.pg.paused = false;
                    self.p.resumed(self.now).unwrap();
                }
                PrimaryAction::SendCapture { .. } => {
                    let pfns = self.p.capture_pfns().to_vec();
                    let pages: Vec<&[u8]> = self.copy.chunks(PAGE_SIZE).collect();
                    let mut scratch = Vec::new();
                    let mut n = 0;
                    if !pfns.is_empty() {
                        n = write_page_data(&mut self.to_s, &pfns, &pages, &mut scratch).unwrap();
                    }
                    colo_core::engine::messages::Message::VcpuState(&self.state)
                        .encode(&mut self.to_s);
                    self.p.capture_sent(self.now, n).unwrap();
                }
                PrimaryAction::Committed(st) => {
                    self.committed.push(st.epoch);
                    self.last_watched = st.watched;
                    self.stats.push(st);
                }
                PrimaryAction::Verified { verdict, .. } => self.verdicts.push(verdict),
                PrimaryAction::PeerLost { reason } => panic!("primary lost peer: {reason}"),
            }
            self.to_s.append(self.p.outbox_mut());
        }
    }

    fn secondary_actions(&mut self) {
        self.to_p.append(self.s.outbox_mut());
        while let Some(a) = self.s.poll_action() {
            match a {
                SecondaryAction::StartDirtyLog => self.sg.dirty.clear_all(),
                SecondaryAction::Pause => {
                    self.sg.paused = true;
                    self.s.paused(self.now).unwrap();
                }
                SecondaryAction::HarvestDirty => {
                    self.s.harvest_target().union_with(&self.sg.dirty).unwrap();
                    self.sg.dirty.clear_all();
                    // A new checkpoint: a torn one's pages are dropped.
                    self.s_staged.clear();
                    self.s.harvested(self.now).unwrap();
                }
                SecondaryAction::Apply { .. } => self.apply(),
                SecondaryAction::Resume => {
                    self.sg.paused = false;
                    self.s.resumed(self.now).unwrap();
                }
                SecondaryAction::Running { .. } => {}
                SecondaryAction::TakeOver { reason } | SecondaryAction::GiveUp { reason } => {
                    panic!("secondary lost peer: {reason}")
                }
                SecondaryAction::Close { .. } => panic!("unexpected GOODBYE"),
            }
            self.to_p.append(self.s.outbox_mut());
        }
    }

    /// Writes the staged checkpoint into the SVM and tells the secondary.
    fn apply(&mut self) {
        let pfns = self.s.staged_pfns().to_vec();
        let data = std::mem::take(&mut self.s_staged);
        assert_eq!(
            data.len(),
            pfns.len() * PAGE_SIZE,
            "one staged page per pfn"
        );
        for (i, pfn) in pfns.iter().enumerate() {
            let o = *pfn as usize * PAGE_SIZE;
            self.sg.mem[o..o + PAGE_SIZE]
                .copy_from_slice(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
        }
        self.sg.state = self.s.staged_state().to_vec();
        self.s.applied(self.now, self.s_digest).unwrap();
    }

    /// Feeds `bytes` of the primary's stream to the secondary, without running its actions.
    fn feed_secondary(&mut self, bytes: &[u8]) {
        let mut chunk = bytes;
        while !chunk.is_empty() {
            let (n, ev) = self.dec_s.feed(chunk).unwrap();
            if let Some(ev) = ev {
                if let Some(Delivery::StagePage { data, .. }) =
                    self.s.on_event(self.now, &ev).unwrap()
                {
                    self.s_staged.extend_from_slice(data);
                }
            }
            chunk = &chunk[n..];
        }
    }

    /// Feeds `bytes` of the secondary's back channel to the primary, without running its
    /// actions.
    fn feed_primary(&mut self, bytes: &[u8]) {
        let mut chunk = bytes;
        while !chunk.is_empty() {
            let (n, ev) = self.dec_p.feed(chunk).unwrap();
            if let Some(Event::Record(rec)) = ev {
                self.p.on_record(self.now, &rec).unwrap();
            }
            chunk = &chunk[n..];
        }
    }

    /// Delivers all bytes in flight to each side, one byte at a time when `bytewise`.
    fn deliver(&mut self, bytewise: bool) {
        let input = std::mem::take(&mut self.to_s);
        let mut pos = 0;
        while pos < input.len() {
            let end = if bytewise { pos + 1 } else { input.len() };
            let mut chunk = &input[pos..end];
            while !chunk.is_empty() {
                let (n, ev) = self.dec_s.feed(chunk).unwrap();
                if let Some(ev) = ev {
                    match self.s.on_event(self.now, &ev).unwrap() {
                        Some(Delivery::WritePage { pfn, data }) => {
                            let o = pfn as usize * PAGE_SIZE;
                            self.sg.mem[o..o + PAGE_SIZE].copy_from_slice(data);
                        }
                        Some(Delivery::StagePage { data, .. }) => {
                            self.s_staged.extend_from_slice(data);
                        }
                        Some(Delivery::Input { .. } | Delivery::WriteBlocks(_)) | None => {}
                    }
                }
                chunk = &chunk[n..];
            }
            pos = end;
            self.secondary_actions();
        }
        let input = std::mem::take(&mut self.to_p);
        self.feed_primary(&input);
        self.primary_actions();
    }

    fn settle(&mut self) {
        for _ in 0..20 {
            self.primary_actions();
            self.secondary_actions();
            self.deliver(false);
            if self.to_s.is_empty() && self.to_p.is_empty() {
                break;
            }
        }
    }

    fn sync(&mut self) {
        self.settle();
        assert_eq!(self.p.state(), PrimaryState::Running);
        assert_eq!(self.s.state(), SecondaryState::AwaitingNew { epoch: 0 });
        assert_eq!(self.sg.mem, self.snapshot);
    }

    fn checkpoint(&mut self) {
        self.tick();
        self.p
            .start_checkpoint(self.now, Trigger::Periodic)
            .unwrap();
        self.settle();
        assert_eq!(self.p.state(), PrimaryState::Running);
    }
}

#[test]
fn backchannel_makes_memories_identical_after_every_checkpoint() {
    let mut pair = Pair::new(64, SyncMode::Backchannel);
    pair.pg.run(200);
    pair.sync();
    for i in 0..50 {
        pair.pg.run(5 + i % 7);
        pair.sg.run(3 + i % 5);
        pair.checkpoint();
        assert_eq!(
            pair.sg.mem, pair.snapshot,
            "memory differs after checkpoint {i}"
        );
        assert_eq!(pair.sg.state, pair.state);
    }
    assert_eq!(pair.committed.len(), 51);
}

#[test]
fn pages_added_to_a_capture_reach_the_secondary() {
    let mut pair = Pair::new(64, SyncMode::Backchannel);
    pair.sync();
    for i in 0..10u64 {
        pair.pg.run(2);
        // "The hypervisor" writes a page the dirty log does not show.
        let pfn = (i * 7) % 64;
        pair.pg.mem[pfn as usize * PAGE_SIZE + 9] ^= 0x5a;
        // The driver's sweep names only pages outside D.
        if !pair.pg.dirty.test(pfn).unwrap() {
            pair.also = vec![pfn];
        }
        pair.checkpoint();
        assert_eq!(
            pair.sg.mem, pair.snapshot,
            "memory differs after checkpoint {i}"
        );
    }
}

#[test]
fn capture_additions_are_checked() {
    let mut pair = Pair::new(64, SyncMode::Backchannel);
    pair.sync();
    let err = pair.p.capture_also(&[1]).unwrap_err().to_string();
    assert!(
        err.contains("Running") && err.contains("capture_also"),
        "{err}"
    );
    pair.pg.run(1);
    let dirty = pair.pg.dirty.to_pfns()[0];
    let free = (dirty + 1) % 64;
    pair.probes = vec![vec![dirty], vec![64], vec![free, free]];
    pair.checkpoint();
    let errs = std::mem::take(&mut pair.probe_errors);
    assert_eq!(errs.len(), 3, "{errs:?}");
    for (err, what) in errs
        .iter()
        .zip(["already captured", "beyond the guest", "out of order"])
    {
        assert!(err.contains(what), "{err}");
    }
    // Refused additions change nothing: the checkpoint went through with D alone.
    assert_eq!(pair.sg.mem, pair.snapshot);
}

#[test]
fn the_watch_set_joins_every_capture_without_duplicates() {
    let mut pair = Pair::new(64, SyncMode::Backchannel);
    pair.sync();
    let err = pair.p.capture_watched(&[1]).unwrap_err().to_string();
    assert!(err.contains("capture_watched"), "{err}");
    for round in 0..5 {
        pair.pg.run(2);
        pair.sg.run(2);
        // The "hypervisor" writes the watched frames behind the dirty log.
        let dirty = pair.pg.dirty.to_pfns();
        let watched: Vec<u64> = [5, 40, 63].into_iter().collect();
        for &pfn in &watched {
            pair.pg.mem[pfn as usize * PAGE_SIZE] = round as u8 + 1;
        }
        pair.watched = watched.clone();
        pair.checkpoint();
        assert_eq!(pair.sg.mem, pair.snapshot, "round {round}");
        let already = watched.iter().filter(|p| dirty.contains(p)).count() as u64;
        assert_eq!(pair.last_watched, 3 - already, "round {round}");
    }
    pair.watched = vec![64];
    pair.probes = vec![];
    let before = pair.committed.len();
    pair.pg.run(1);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pair.checkpoint()));
    assert!(
        res.is_err(),
        "a watched pfn beyond the guest must be refused"
    );
    assert_eq!(pair.committed.len(), before);
}

#[test]
fn primary_only_mode_leaves_the_secondarys_own_writes() {
    let mut pair = Pair::new(64, SyncMode::PrimaryOnly);
    pair.sync();
    let mut differed = false;
    for _ in 0..10 {
        pair.pg.run(3);
        pair.sg.run(6);
        pair.checkpoint();
        differed |= pair.sg.mem != pair.snapshot;
    }
    assert!(differed, "primary-only mode should leave B − A stale");
}

#[test]
fn one_byte_at_a_time_delivery_works() {
    let mut pair = Pair::new(16, SyncMode::Backchannel);
    pair.primary_actions();
    pair.secondary_actions();
    for _ in 0..10 {
        pair.deliver(true);
    }
    assert_eq!(pair.p.state(), PrimaryState::Running);
    pair.pg.run(4);
    pair.sg.run(4);
    pair.tick();
    pair.p.start_checkpoint(pair.now, Trigger::Manual).unwrap();
    for _ in 0..10 {
        pair.primary_actions();
        pair.deliver(true);
    }
    assert_eq!(pair.sg.mem, pair.snapshot);
}

#[test]
fn invalid_events_are_typed_errors_naming_state_and_event() {
    let mut pair = Pair::new(8, SyncMode::Backchannel);
    pair.sync();
    let err = pair.p.paused(pair.now).unwrap_err().to_string();
    assert!(err.contains("Running") && err.contains("paused"), "{err}");
    let err = pair.s.harvested(pair.now).unwrap_err().to_string();
    assert!(
        err.contains("AwaitingNew") && err.contains("harvested"),
        "{err}"
    );
}

#[test]
fn a_lying_back_channel_is_rejected() {
    let mut pair = Pair::new(8, SyncMode::Backchannel);
    pair.sync();
    pair.p.start_checkpoint(pair.now, Trigger::Manual).unwrap();
    pair.primary_actions();
    // SVM_SUSPENDED then a dirty list naming pfn 8 of an 8-page guest.
    let mut bytes = Vec::new();
    colo_core::engine::messages::Message::Control {
        msg: colo_core::engine::messages::Control::SvmSuspended,
        epoch: 1,
    }
    .encode(&mut bytes);
    colo_core::stream::encode_dirty_pfn_list(&mut bytes, [3u64, 8].into_iter());
    let mut dec = Decoder::new(DecoderConfig {
        expect_headers: false,
        page_count: None,
    });
    let mut chunk = &bytes[..];
    let mut last = Ok(None);
    while !chunk.is_empty() {
        let (n, ev) = dec.feed(chunk).unwrap();
        if let Some(Event::Record(rec)) = ev {
            last = pair.p.on_record(pair.now, &rec).map(|_| None::<()>);
        }
        chunk = &chunk[n..];
    }
    let err = last.unwrap_err().to_string();
    assert!(err.contains("pfn 0x8"), "{err}");
}

#[test]
fn torn_checkpoint_is_dropped_and_the_secondary_takes_over_from_its_own_state() {
    let mut pair = Pair::new(32, SyncMode::Backchannel);
    pair.sync();
    pair.pg.run(20);
    pair.sg.run(20);
    pair.p.start_checkpoint(pair.now, Trigger::Manual).unwrap();
    pair.primary_actions();
    pair.deliver(false); // NEW reaches S, B comes back, P captures and sends the checkpoint
    let before = pair.sg.mem.clone();
    // Cut the stream before CHECKPOINT: deliver all but the last record (8 bytes).
    let all = std::mem::take(&mut pair.to_s);
    assert!(all.len() > 16);
    pair.feed_secondary(&all[..all.len() - 8]);
    assert!(matches!(
        pair.s.state(),
        SecondaryState::ReceivingCheckpoint { .. }
    ));
    pair.s.peer_lost(pair.now, "cut".into());
    let actions: Vec<_> = std::iter::from_fn(|| pair.s.poll_action()).collect();
    assert!(matches!(actions[0], SecondaryAction::Resume));
    assert!(matches!(actions[1], SecondaryAction::TakeOver { .. }));
    assert_eq!(
        pair.sg.mem, before,
        "a torn checkpoint must not touch the SVM"
    );
    assert_eq!(pair.s.staged_pages(), 0);
}

/// Builds a pair, syncs it, and runs one checkpoint up to the point where the primary has sent
/// the whole checkpoint; returns the pair (nothing delivered to the secondary yet), the bytes of
/// the checkpoint, and the SVM's memory before it.
fn pair_with_checkpoint_in_flight() -> (Pair, Vec<u8>, Vec<u8>) {
    let mut pair = Pair::new(24, SyncMode::Backchannel);
    pair.pg.run(40);
    pair.sync();
    pair.pg.run(15);
    pair.sg.run(15);
    pair.p.start_checkpoint(pair.now, Trigger::Manual).unwrap();
    pair.primary_actions();
    // NEW to S; S pauses, harvests and answers with B; P captures and sends the checkpoint.
    let new = std::mem::take(&mut pair.to_s);
    pair.feed_secondary(&new);
    pair.secondary_actions();
    let back = std::mem::take(&mut pair.to_p);
    pair.feed_primary(&back);
    pair.primary_actions();
    let ckpt = std::mem::take(&mut pair.to_s);
    let before = pair.sg.mem.clone();
    (pair, ckpt, before)
}

/// Offsets at which each record of `bytes` (a records-only stream) starts.
fn record_boundaries(bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 8 <= bytes.len() {
        out.push(pos);
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().unwrap()) as usize;
        pos += 8 + len.div_ceil(8) * 8;
    }
    out.push(bytes.len());
    out
}

#[test]
fn a_checkpoint_cut_anywhere_leaves_the_svm_old_or_entirely_new() {
    let (_, ckpt, _) = pair_with_checkpoint_in_flight();
    let mut cuts = record_boundaries(&ckpt);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..150 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        cuts.push((x % ckpt.len() as u64) as usize);
    }
    let (mut old, mut new) = (0, 0);
    for cut in cuts {
        let (mut pair, bytes, before) = pair_with_checkpoint_in_flight();
        assert_eq!(bytes, ckpt, "the simulation must be deterministic");
        let mut chunk = &bytes[..cut];
        while !chunk.is_empty() {
            let (n, ev) = pair.dec_s.feed(chunk).unwrap();
            if let Some(ev) = ev {
                match pair.s.on_event(pair.now, &ev).unwrap() {
                    Some(Delivery::WritePage { .. }) => {
                        panic!("a checkpoint's page must be staged, not written")
                    }
                    Some(Delivery::StagePage { data, .. }) => pair.s_staged.extend_from_slice(data),
                    _ => {}
                }
            }
            chunk = &chunk[n..];
            pair.secondary_actions();
        }
        pair.s.peer_lost(pair.now, format!("cut at byte {cut}"));
        while let Some(a) = pair.s.poll_action() {
            match a {
                SecondaryAction::Apply { .. } => unreachable!("apply is queued before the cut"),
                SecondaryAction::Resume | SecondaryAction::TakeOver { .. } => {}
                other => panic!("unexpected action after the cut: {other:?}"),
            }
        }
        if pair.sg.mem == before {
            old += 1;
        } else {
            assert_eq!(
                pair.sg.mem, pair.snapshot,
                "cut at {cut}: SVM memory is torn"
            );
            new += 1;
        }
    }
    // Only a cut after the final CHECKPOINT record yields the new memory.
    assert!(old > 100 && new >= 1, "old {old}, new {new}");
}

/// Liveness is judged by when bytes last arrived as the driver reports it with `peer_heard`,
/// not by when the driver decoded them: a secondary whose driver was busy past the silence
/// timeout does not take over while the primary's bytes sat in its receive buffer.
#[test]
fn silence_counts_from_the_last_arrival_the_driver_reports() {
    let mut pair = Pair::new(32, SyncMode::Backchannel);
    pair.sync();
    let timeout = colo_core::engine::Liveness::default().timeout;
    let t0 = pair.now;
    // The driver spent 1.5 timeouts in a backend call; bytes kept arriving meanwhile.
    pair.s.peer_heard(t0 + timeout);
    pair.s.handle_timeout(t0 + timeout * 3 / 2);
    assert!(
        std::iter::from_fn(|| pair.s.poll_action())
            .all(|a| !matches!(a, SecondaryAction::TakeOver { .. })),
        "the secondary took over although the primary's bytes had arrived"
    );
    assert!(matches!(pair.s.state(), SecondaryState::AwaitingNew { .. }));
    // Real silence is still detected, counted from that arrival.
    pair.s
        .handle_timeout(t0 + timeout * 2 + Duration::from_millis(1));
    assert!(std::iter::from_fn(|| pair.s.poll_action())
        .any(|a| matches!(a, SecondaryAction::TakeOver { .. })));
    // The same on the primary's side.
    pair.p.peer_heard(t0 + timeout);
    pair.p.handle_timeout(t0 + timeout * 3 / 2);
    assert_ne!(pair.p.state(), PrimaryState::Unprotected);
    pair.p
        .handle_timeout(t0 + timeout * 2 + Duration::from_millis(1));
    assert_eq!(pair.p.state(), PrimaryState::Unprotected);
}

/// A primary lost while it applies a complete checkpoint: the checkpoint is applied, then the
/// SVM resumes and serves; nothing more is said to the dead primary.
#[test]
fn a_loss_while_applying_applies_the_checkpoint_then_takes_over() {
    let (mut pair, ckpt, _) = pair_with_checkpoint_in_flight();
    pair.feed_secondary(&ckpt);
    assert!(matches!(
        pair.s.state(),
        SecondaryState::Applying {
            epoch: 1,
            primary_lost: None
        }
    ));
    pair.s.peer_lost(pair.now, "the primary died".into());
    assert!(matches!(
        pair.s.state(),
        SecondaryState::Applying {
            primary_lost: Some(_),
            ..
        }
    ));
    assert_eq!(
        pair.s.poll_action(),
        Some(SecondaryAction::Apply { epoch: 1 })
    );
    pair.apply();
    let actions: Vec<_> = std::iter::from_fn(|| pair.s.poll_action()).collect();
    assert_eq!(
        actions,
        [
            SecondaryAction::Resume,
            SecondaryAction::TakeOver {
                reason: "the primary died".into()
            }
        ]
    );
    assert_eq!(pair.s.state(), SecondaryState::TakenOver);
    assert!(
        pair.s.outbox_mut().is_empty(),
        "no SVM_READY to a dead primary"
    );
    assert_eq!(
        pair.sg.mem, pair.snapshot,
        "the complete checkpoint is applied"
    );
}

/// A primary that loses its secondary while the PVM is paused resumes it before going on alone.
#[test]
fn a_loss_while_paused_resumes_the_pvm_then_runs_unprotected() {
    let mut pair = Pair::new(16, SyncMode::Backchannel);
    pair.sync();
    assert!(pair.p.is_protected());
    pair.p.start_checkpoint(pair.now, Trigger::Manual).unwrap();
    let new = std::mem::take(pair.p.outbox_mut());
    pair.feed_secondary(&new);
    pair.secondary_actions();
    let back = std::mem::take(&mut pair.to_p);
    pair.feed_primary(&back);
    assert_eq!(pair.p.poll_action(), Some(PrimaryAction::Pause));
    pair.p.paused(pair.now).unwrap();
    assert!(matches!(
        pair.p.state(),
        PrimaryState::Harvesting { epoch: 1, .. }
    ));
    pair.p.peer_lost(pair.now, "cut".into());
    let actions: Vec<_> = std::iter::from_fn(|| pair.p.poll_action()).collect();
    assert_eq!(
        actions,
        [
            PrimaryAction::Resume,
            PrimaryAction::PeerLost {
                reason: "cut".into()
            }
        ]
    );
    assert_eq!(pair.p.state(), PrimaryState::Unprotected);
    assert!(!pair.p.is_protected() && !pair.p.mirrors_input());
    assert!(
        pair.p.resumed(pair.now).is_err(),
        "the checkpoint is gone with its state"
    );
}

/// With verification, the secondary's digest of a checkpoint is compared with the primary's;
/// a side that sent none leaves the checkpoint unsettled.
#[test]
fn verification_compares_both_digests_of_the_same_checkpoint() {
    let mut pair = Pair::build(16, SyncMode::Backchannel, true);
    pair.p_digest = Some([7; 32]);
    pair.s_digest = Some([7; 32]);
    pair.sync();
    pair.s_digest = Some([8; 32]);
    pair.checkpoint();
    pair.s_digest = None;
    pair.checkpoint();
    pair.p_digest = None;
    pair.s_digest = Some([7; 32]);
    pair.checkpoint();
    assert_eq!(
        pair.verdicts,
        [
            Verdict::Identical,
            Verdict::Different,
            Verdict::Unsettled,
            Verdict::Unsettled
        ]
    );
}

/// Each committed checkpoint reports its own figures: what each side dirtied, what was sent.
#[test]
fn a_committed_checkpoint_reports_its_own_figures() {
    let mut pair = Pair::new(32, SyncMode::Backchannel);
    pair.sync();
    let initial = pair.stats[0];
    assert_eq!((initial.epoch, initial.trigger), (0, Trigger::InitialSync));
    assert!(initial.pages_sent >= 32, "pre-copy sends every page");
    pair.pg.run(10);
    pair.sg.run(10);
    let mut d = pair.pg.dirty.clone();
    d.union_with(&pair.sg.dirty).unwrap();
    let only_b = pair.sg.dirty.count_difference(&pair.pg.dirty).unwrap();
    let (a, b) = (pair.pg.dirty.count(), pair.sg.dirty.count());
    pair.checkpoint();
    let st = pair.stats[1];
    assert_eq!((st.epoch, st.trigger), (1, Trigger::Periodic));
    assert_eq!(
        (st.dirty_primary, st.dirty_secondary, st.secondary_only),
        (a, b, only_b)
    );
    assert_eq!(st.pages_sent, d.count());
    assert!(st.bytes_sent > st.pages_sent * PAGE_SIZE as u64);
}

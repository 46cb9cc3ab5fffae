//! Drives a primary and a secondary state machine with simulated disks against each other in
//! memory, to check the disk rule at the protocol level: after every checkpoint the SVM's disk
//! equals the PVM's at the capture while the SVM's own writes stay in an overlay that the apply
//! drops; a primary lost in the middle of a checkpoint's disk blocks leaves the secondary with
//! the last checkpoint's disk plus its overlay (nothing of the partial checkpoint); a block
//! beyond the primary's disk is refused; with verification both disk digests are compared.
//! With continuous mirroring (blocks sent while the PVM runs, between checkpoints): the same
//! rule at every checkpoint with mirror rounds at every state that allows them, the staging
//! bounded by the disk however often a block is rewritten, mirrored blocks dropped with a lost
//! primary, and the write log's ordering (mark after the data) that re-sends a block a mirror
//! read raced with, shown against the wrong order, which loses the write.

use std::time::{Duration, Instant};

use colo_core::disk::{encode_disk_blocks_header, DiskDigester, DiskMirror, Overlay, BLOCK_SIZE};
use colo_core::engine::messages::Message;
use colo_core::engine::{
    Delivery, EngineError, Primary, PrimaryAction, PrimaryConfig, PrimaryState, Secondary,
    SecondaryAction, SecondaryConfig, SecondaryState, Trigger, Verdict,
};
use colo_core::stream::{Decoder, DecoderConfig, Event, Record};
use colo_core::DirtyBitmap;

const PAGES: u64 = 16;

/// A disk: its image, the written-block log, and an overlay (the SVM's).
struct SimDisk {
    image: Vec<u8>,
    written: DirtyBitmap,
    overlay: Option<Overlay>,
}

impl SimDisk {
    fn new(blocks: u64) -> Self {
        Self {
            image: vec![0; blocks as usize * BLOCK_SIZE],
            written: DirtyBitmap::new(blocks),
            overlay: None,
        }
    }

    fn block(&self, b: u64) -> Vec<u8> {
        if let Some(d) = self.overlay.as_ref().and_then(|o| o.read(b)) {
            return d.to_vec();
        }
        self.image[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE].to_vec()
    }

    /// The guest writes block `b`.
    fn guest_write(&mut self, b: u64, fill: u8) {
        let data = vec![fill; BLOCK_SIZE];
        match self.overlay.as_mut() {
            Some(o) => o.write(b, &data).unwrap(),
            None => {
                self.write(b, &data);
                self.written.set(b).unwrap();
            }
        }
    }

    fn write(&mut self, b: u64, data: &[u8]) {
        self.image[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE].copy_from_slice(data);
    }

    /// The first `blocks` blocks as the guest sees them.
    fn view(&self, blocks: u64) -> Vec<u8> {
        (0..blocks).flat_map(|b| self.block(b)).collect()
    }
}

struct Pair {
    p: Primary,
    s: Secondary,
    pd: SimDisk,
    sd: SimDisk,
    to_s: Vec<u8>,
    to_p: Vec<u8>,
    dec_s: Decoder,
    dec_p: Decoder,
    /// The PVM's disk at each capture, and the disk verdicts.
    captured: Vec<(u64, Vec<u8>)>,
    disk_verdicts: Vec<Option<Verdict>>,
    /// Disk blocks captured, to send.
    blocks: Vec<u64>,
    now: Instant,
}

impl Pair {
    fn new(pdisk: u64, sdisk: u64, verify: bool) -> Self {
        Self::with_mirror(pdisk, sdisk, verify, DiskMirror::Checkpoint)
    }

    fn with_mirror(pdisk: u64, sdisk: u64, verify: bool, mirror: DiskMirror) -> Self {
        let now = Instant::now();
        let mut pc = PrimaryConfig::new(PAGES);
        pc.link.disk_blocks = pdisk;
        pc.link.verify = verify;
        pc.link.disk_mirror = mirror;
        pc.link.nonce = [1; 32];
        let mut sc = SecondaryConfig::new(PAGES);
        sc.disk_blocks = sdisk;
        sc.verify = verify;
        sc.disk_mirror = mirror;
        sc.nonce = [2; 32];
        let config = |expect_headers| DecoderConfig {
            expect_headers,
            page_count: Some(PAGES),
        };
        Self {
            p: Primary::new(pc, now),
            s: Secondary::new(sc, now),
            pd: SimDisk::new(pdisk),
            sd: SimDisk::new(sdisk),
            to_s: Vec::new(),
            to_p: Vec::new(),
            dec_s: Decoder::new(config(true)),
            dec_p: Decoder::new(config(false)),
            captured: Vec::new(),
            disk_verdicts: Vec::new(),
            blocks: Vec::new(),
            now,
        }
    }

    fn digest(disk: &SimDisk, blocks: u64) -> [u8; 16] {
        let mut d = DiskDigester::new();
        for b in 0..blocks {
            d.block(&disk.block(b));
        }
        d.finish()
    }

    /// DISK_BLOCKS records for `blocks` of the PVM's disk (as the guest sees it), 3 a record.
    fn send_blocks(&mut self, blocks: &[u64]) {
        for chunk in blocks.chunks(3) {
            let out = self.p.outbox_mut();
            encode_disk_blocks_header(out, chunk);
            for &b in chunk {
                out.extend_from_slice(&self.pd.block(b));
            }
        }
    }

    /// A mirror round while the PVM runs, if the primary allows one now: the write log is
    /// harvested (cleared), then the blocks are read and sent. Returns the blocks sent.
    fn mirror(&mut self) -> Option<usize> {
        self.p.mirror_epoch()?;
        let blocks = self.pd.written.to_pfns();
        self.pd.written.clear_all();
        self.send_blocks(&blocks);
        self.p.disk_mirrored(blocks.len() as u64, 0).unwrap();
        self.to_s.append(self.p.outbox_mut());
        Some(blocks.len())
    }

    fn primary_actions(&mut self) {
        while let Some(a) = self.p.poll_action() {
            let now = self.now;
            match a {
                PrimaryAction::StartDirtyLog => self.pd.written.clear_all(),
                PrimaryAction::SendPages { all } => {
                    if all {
                        let every: Vec<u64> = (0..self.pd.written.len()).collect();
                        self.send_blocks(&every);
                    }
                    self.p.pages_sent(now, 0).unwrap();
                }
                PrimaryAction::HarvestDirty => self.p.harvested(now).unwrap(),
                PrimaryAction::Pause => self.p.paused(now).unwrap(),
                PrimaryAction::BeginEpoch { .. } => {}
                PrimaryAction::Capture => {
                    self.blocks = self.pd.written.to_pfns();
                    self.pd.written.clear_all();
                    self.p.disk_blocks_sent(self.blocks.len() as u64);
                    let blocks = self.p.disk_blocks();
                    if self.p.verifying() {
                        self.p.disk_digest(Self::digest(&self.pd, blocks)).unwrap();
                    }
                    self.captured.push((self.p.epoch(), self.pd.view(blocks)));
                    self.p.captured(now, None).unwrap();
                }
                PrimaryAction::Resume => self.p.resumed(now).unwrap(),
                PrimaryAction::SendCapture { .. } => {
                    let blocks = std::mem::take(&mut self.blocks);
                    self.send_blocks(&blocks);
                    Message::VcpuState(&[1]).encode(self.p.outbox_mut());
                    self.p.capture_sent(now, 0).unwrap();
                }
                PrimaryAction::Committed(_) => {}
                PrimaryAction::Verified { disk, .. } => self.disk_verdicts.push(disk),
                PrimaryAction::PeerLost { reason } => panic!("primary lost: {reason}"),
            }
        }
        self.to_s.append(self.p.outbox_mut());
    }

    /// Runs the secondary's actions; returns the takeover's reason, if it took over.
    fn secondary_actions(&mut self) -> Option<String> {
        let mut took_over = None;
        while let Some(a) = self.s.poll_action() {
            let now = self.now;
            match a {
                SecondaryAction::StartDirtyLog | SecondaryAction::Running { .. } => {}
                SecondaryAction::Pause => self.s.paused(now).unwrap(),
                SecondaryAction::HarvestDirty => self.s.harvested(now).unwrap(),
                SecondaryAction::Apply { .. } => {
                    // The overlay is dropped, the staged blocks written into the image.
                    self.sd.overlay = Some(Overlay::new());
                    let data = self.s.staged_disk_data().to_vec();
                    for (i, &b) in self.s.staged_disk_blocks().to_vec().iter().enumerate() {
                        self.sd
                            .write(b, &data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
                    }
                    if self.s.verifying() {
                        let d = Self::digest(&self.sd, self.s.disk_blocks());
                        self.s.disk_digest(now, d).unwrap();
                    }
                    self.s.applied(now, None).unwrap();
                }
                SecondaryAction::Resume => {
                    if matches!(self.s.state(), SecondaryState::Resuming { .. }) {
                        self.s.resumed(now).unwrap();
                    }
                }
                SecondaryAction::TakeOver { reason } => took_over = Some(reason),
                other => panic!("secondary: {other:?}"),
            }
        }
        self.to_p.append(self.s.outbox_mut());
        took_over
    }

    /// Feeds the secondary at most `limit` bytes in flight (all with None).
    fn feed_secondary(&mut self, limit: Option<usize>) -> Result<(), EngineError> {
        let n = limit.unwrap_or(self.to_s.len()).min(self.to_s.len());
        let input: Vec<u8> = self.to_s.drain(..n).collect();
        let mut chunk = &input[..];
        while !chunk.is_empty() {
            let (used, ev) = self.dec_s.feed(chunk).unwrap();
            if let Some(ev) = ev {
                if let Some(Delivery::WriteBlocks(d)) = self.s.on_event(self.now, &ev)? {
                    for (b, data) in d.iter() {
                        self.sd.write(b, data);
                    }
                }
            }
            chunk = &chunk[used..];
            self.secondary_actions();
        }
        Ok(())
    }

    fn feed_primary(&mut self) {
        let input = std::mem::take(&mut self.to_p);
        let mut chunk = &input[..];
        while !chunk.is_empty() {
            let (used, ev) = self.dec_p.feed(chunk).unwrap();
            if let Some(Event::Record(rec)) = ev {
                self.p.on_record(self.now, &rec).unwrap();
            }
            chunk = &chunk[used..];
        }
        self.primary_actions();
    }

    fn settle(&mut self) {
        for _ in 0..30 {
            self.primary_actions();
            self.feed_secondary(None).unwrap();
            self.feed_primary();
            if self.to_s.is_empty() && self.to_p.is_empty() {
                break;
            }
        }
    }

    fn checkpoint(&mut self) {
        self.now += Duration::from_millis(1);
        self.p
            .start_checkpoint(self.now, Trigger::Periodic)
            .unwrap();
        self.settle();
        assert_eq!(self.p.state(), PrimaryState::Running);
    }

    /// The SVM's image equals the PVM's disk at the last capture, and its overlay is empty.
    fn assert_svm_holds_last_capture(&self) {
        let (epoch, want) = self.captured.last().unwrap();
        let blocks = self.p.disk_blocks() as usize;
        assert_eq!(
            &self.sd.image[..blocks * BLOCK_SIZE],
            &want[..],
            "checkpoint {epoch}: the SVM's disk differs from the PVM's at the capture"
        );
        assert!(self.sd.overlay.as_ref().is_some_and(Overlay::is_empty));
    }
}

#[test]
fn the_svm_disk_equals_the_pvm_disk_at_every_capture_and_its_own_writes_are_dropped() {
    let mut pair = Pair::new(64, 96, true);
    for b in [0, 5, 63] {
        pair.pd.guest_write(b, b as u8 + 1);
    }
    pair.settle();
    assert_eq!(pair.p.state(), PrimaryState::Running);
    pair.assert_svm_holds_last_capture();
    for n in 1..=20u64 {
        // Both guests write; the SVM's writes land in its overlay only.
        for i in 0..(n % 5) {
            pair.pd.guest_write((n * 7 + i * 13) % 64, (n + i) as u8);
        }
        pair.sd.guest_write(n % 64, 0xEE);
        pair.sd.guest_write(70, 0xEF);
        assert_eq!(
            pair.sd.block(n % 64),
            vec![0xEE; BLOCK_SIZE],
            "reads see the overlay"
        );
        pair.checkpoint();
        pair.assert_svm_holds_last_capture();
        assert_eq!(
            &pair.sd.image[70 * BLOCK_SIZE..71 * BLOCK_SIZE],
            &[0; BLOCK_SIZE]
        );
    }
    assert_eq!(pair.disk_verdicts.len(), 21);
    assert!(pair
        .disk_verdicts
        .iter()
        .all(|v| *v == Some(Verdict::Identical)));
}

#[test]
fn a_primary_lost_amid_a_checkpoints_blocks_leaves_the_last_checkpoint_and_the_overlay() {
    let mut pair = Pair::new(64, 64, false);
    pair.settle();
    pair.pd.guest_write(1, 1);
    pair.checkpoint();
    pair.assert_svm_holds_last_capture();
    let held = pair.sd.image.clone();
    // Checkpoint 2 carries 9 blocks (3 records); the SVM writes block 40 meanwhile.
    for b in 10..19 {
        pair.pd.guest_write(b, 0xAB);
    }
    pair.sd.guest_write(40, 0x40);
    pair.now += Duration::from_millis(1);
    pair.p
        .start_checkpoint(pair.now, Trigger::Periodic)
        .unwrap();
    pair.primary_actions();
    pair.feed_secondary(None).unwrap();
    pair.feed_primary();
    // Up to the second DISK_BLOCKS record: the first is staged, the rest never arrives.
    let mut cut = None;
    let mut dec = Decoder::new(DecoderConfig {
        expect_headers: false,
        page_count: Some(PAGES),
    });
    let mut pos = 0;
    let mut seen = 0;
    while pos < pair.to_s.len() {
        let (used, ev) = dec.feed(&pair.to_s[pos..]).unwrap();
        pos += used;
        if let Some(Event::Record(Record::Optional { rtype, .. })) = ev {
            if rtype == colo_core::engine::messages::colo_type::DISK_BLOCKS {
                seen += 1;
                if seen == 2 {
                    cut = Some(pos);
                    break;
                }
            }
        }
    }
    pair.feed_secondary(cut).unwrap();
    assert!(matches!(
        pair.s.state(),
        SecondaryState::ReceivingCheckpoint { epoch: 2, .. }
    ));
    assert_eq!(pair.s.staged_next_disk_blocks(), 6, "two records staged");
    assert_eq!(pair.sd.image, held, "nothing applied before CHECKPOINT");
    pair.s.peer_lost(pair.now, "killed".into());
    assert!(pair.secondary_actions().is_some(), "it takes over");
    assert!(
        pair.s.staged_disk_blocks().is_empty() && pair.s.staged_next_disk_blocks() == 0,
        "the partial checkpoint is dropped"
    );
    assert_eq!(pair.sd.image, held);
    assert_eq!(
        pair.sd.block(40),
        vec![0x40; BLOCK_SIZE],
        "the overlay is kept"
    );
}

#[test]
fn blocks_beyond_the_primarys_disk_are_refused_even_within_the_secondarys() {
    let mut pair = Pair::new(8, 64, false);
    pair.settle();
    pair.now += Duration::from_millis(1);
    pair.p
        .start_checkpoint(pair.now, Trigger::Periodic)
        .unwrap();
    pair.primary_actions();
    pair.feed_secondary(None).unwrap();
    pair.feed_primary();
    // A forged record: block 20 is inside the secondary's disk but beyond the primary's.
    let mut rec = Vec::new();
    encode_disk_blocks_header(&mut rec, &[20]);
    rec.extend_from_slice(&[9; BLOCK_SIZE]);
    pair.to_s.clear();
    pair.to_s.extend_from_slice(&rec);
    assert_eq!(
        pair.feed_secondary(None),
        Err(EngineError::BlockOutOfRange {
            block: 20,
            blocks: 8
        })
    );
    // And a DISK_BLOCKS record outside a checkpoint is a protocol error naming the state.
    let mut pair = Pair::new(8, 8, false);
    pair.settle();
    let mut rec = Vec::new();
    encode_disk_blocks_header(&mut rec, &[1]);
    rec.extend_from_slice(&[9; BLOCK_SIZE]);
    pair.to_s.extend_from_slice(&rec);
    let err = pair.feed_secondary(None).unwrap_err();
    assert!(
        matches!(&err, EngineError::Unexpected { state: "AwaitingNew", event } if event == "DISK_BLOCKS"),
        "{err}"
    );
}

/// Steps the pair through checkpoint `n`'s exchange one message at a time, mirroring at every
/// step the primary allows (running, awaiting B, awaiting SVM_READY/SVM_RESUMED) with the PVM
/// writing between mirrors. Returns the mirror rounds that ran.
fn checkpoint_with_mirrors(pair: &mut Pair, n: u64) -> usize {
    let mut rounds = 0;
    let write = |pair: &mut Pair, k: u64| {
        // Rewrites of hot blocks 0..4 and a spread of others.
        pair.pd.guest_write(k % 4, (n * 31 + k) as u8);
        pair.pd.guest_write((n * 7 + k * 13) % 64, (n + k) as u8);
    };
    for k in 0..3 {
        write(pair, k);
        rounds += usize::from(pair.mirror().is_some());
    }
    pair.now += Duration::from_millis(1);
    pair.p
        .start_checkpoint(pair.now, Trigger::Periodic)
        .unwrap();
    for k in 3..40 {
        pair.primary_actions();
        write(pair, k);
        rounds += usize::from(pair.mirror().is_some());
        pair.feed_secondary(None).unwrap();
        pair.feed_primary();
        if pair.p.state() == PrimaryState::Running && pair.to_s.is_empty() && pair.to_p.is_empty() {
            break;
        }
    }
    assert_eq!(pair.p.state(), PrimaryState::Running);
    rounds
}

#[test]
fn continuous_mirroring_keeps_the_svm_disk_equal_to_the_pvm_disk_at_every_capture() {
    let mut pair = Pair::with_mirror(64, 64, true, DiskMirror::Continuous);
    pair.pd.guest_write(9, 9);
    pair.settle();
    assert_eq!(pair.p.mirror_epoch(), Some(1));
    pair.assert_svm_holds_last_capture();
    let mut rounds = 0;
    let mut mirrored = 0;
    for n in 1..=25u64 {
        pair.sd.guest_write(n % 64, 0xEE);
        rounds += checkpoint_with_mirrors(&mut pair, n);
        pair.assert_svm_holds_last_capture();
        // Blocks mirrored after CHECKPOINT(n) are staged for n + 1, never applied yet.
        mirrored = mirrored.max(pair.s.staged_next_disk_blocks());
        assert!(pair.s.staged_next_disk_blocks() <= 64);
    }
    assert!(rounds > 25 * 3, "{rounds} mirror rounds");
    assert!(
        mirrored > 0,
        "no blocks were staged ahead of their checkpoint"
    );
    assert!(pair
        .disk_verdicts
        .iter()
        .all(|v| *v == Some(Verdict::Identical)));
    assert_eq!(pair.disk_verdicts.len(), 26);
}

#[test]
fn mirrored_rewrites_stage_each_block_once_and_a_lost_primary_drops_them() {
    let mut pair = Pair::with_mirror(64, 64, false, DiskMirror::Continuous);
    pair.settle();
    pair.pd.guest_write(1, 1);
    pair.checkpoint();
    pair.assert_svm_holds_last_capture();
    let held = pair.sd.image.clone();
    // The PVM rewrites 8 blocks 500 times, each time mirrored: 4000 blocks on the wire, 8
    // staged.
    let mut sent = 0;
    for i in 0..500u64 {
        for b in 20..28 {
            pair.pd.guest_write(b, (i % 250) as u8 + 1);
        }
        sent += pair.mirror().unwrap();
        pair.feed_secondary(None).unwrap();
    }
    assert_eq!(sent, 4000);
    assert_eq!(pair.s.staged_next_disk_blocks(), 8);
    assert!(matches!(
        pair.s.state(),
        SecondaryState::AwaitingNew { epoch: 1 }
    ));
    assert_eq!(
        pair.sd.image, held,
        "nothing mirrored is applied before its CHECKPOINT"
    );
    pair.sd.guest_write(40, 0x40);
    // The primary dies with the blocks staged: they are dropped, the overlay is kept.
    pair.s.peer_lost(pair.now, "killed".into());
    assert!(pair.secondary_actions().is_some(), "it takes over");
    assert_eq!(pair.s.staged_next_disk_blocks(), 0);
    assert_eq!(pair.sd.image, held);
    assert_eq!(pair.sd.block(40), vec![0x40; BLOCK_SIZE]);

    // The same rewrites, then the checkpoint: they are applied once, with their memory.
    let mut pair = Pair::with_mirror(64, 64, false, DiskMirror::Continuous);
    pair.settle();
    for i in 0..50u64 {
        for b in 20..28 {
            pair.pd.guest_write(b, i as u8 + 1);
        }
        pair.mirror().unwrap();
        pair.feed_secondary(None).unwrap();
    }
    pair.pd.guest_write(21, 0xFF);
    pair.checkpoint();
    pair.assert_svm_holds_last_capture();
    assert_eq!(pair.sd.block(21), vec![0xFF; BLOCK_SIZE]);
}

#[test]
fn a_checkpoint_mode_secondary_refuses_mirrored_blocks() {
    let mut pair = Pair::with_mirror(8, 8, false, DiskMirror::Checkpoint);
    pair.settle();
    assert_eq!(
        pair.p.mirror_epoch(),
        None,
        "no mirroring at the checkpoint mode"
    );
    // A continuous secondary accepts the same bytes.
    let mut ok = Pair::with_mirror(8, 8, false, DiskMirror::Continuous);
    ok.settle();
    for pair in [&mut pair, &mut ok] {
        let mut rec = Vec::new();
        encode_disk_blocks_header(&mut rec, &[1]);
        rec.extend_from_slice(&[9; BLOCK_SIZE]);
        pair.to_s.extend_from_slice(&rec);
    }
    assert!(pair.feed_secondary(None).is_err());
    assert_eq!(ok.feed_secondary(None), Ok(()));
    assert_eq!(ok.s.staged_next_disk_blocks(), 1);
}

/// A guest write in two steps, as a backend does it: the data into the image, and the mark in
/// the write log; `mark_first` is the wrong order. Between them a mirror round harvests the log
/// and reads the block (it sees the data of whichever steps came before it). Returns whether
/// the SVM's disk equals the PVM's after the next checkpoint.
fn race(mark_first: bool, mirror_between: bool) -> bool {
    let mut pair = Pair::with_mirror(16, 16, false, DiskMirror::Continuous);
    pair.settle();
    pair.pd.guest_write(3, 1);
    pair.mirror().unwrap();
    let (mark, data) = (
        |pair: &mut Pair| pair.pd.written.set(3).unwrap(),
        |pair: &mut Pair| {
            pair.pd.write(3, &[2; BLOCK_SIZE]);
        },
    );
    if mark_first {
        mark(&mut pair);
    } else {
        data(&mut pair);
    }
    if mirror_between {
        pair.mirror().unwrap();
    }
    if mark_first {
        data(&mut pair);
    } else {
        mark(&mut pair);
    }
    pair.checkpoint();
    let (_, want) = pair.captured.last().unwrap();
    pair.sd.image[..16 * BLOCK_SIZE] == want[..]
}

#[test]
fn a_write_that_races_a_mirror_read_is_marked_again_and_sent_with_the_capture() {
    // Marked after the data: a mirror between the two steps read the old data, but the mark
    // comes after its harvest, so the block is sent again (here with the capture's tail).
    assert!(race(false, true));
    assert!(race(false, false));
    // The wrong order loses the write: the harvest took the mark, the read saw the old data,
    // and nothing marks the block again.
    assert!(
        !race(true, true),
        "marking before the data must lose the write here"
    );
    assert!(race(true, false));
}

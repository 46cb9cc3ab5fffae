//! Disk replication in the node (the rule is in `colo_core::disk`): the primary's disk side —
//! the write log started with the dirty log, every block holding data sent with the first
//! pre-copy round and the blocks written since with each later one, the blocks written since
//! the last capture copied within the pause and written as DISK_BLOCKS after the pages — and the
//! continuous mirroring's rounds while the PVM runs (`--disk-mirror continuous`: the blocks
//! written since the last round, sent for the coming checkpoint; the capture then copies only
//! the unsent tail) — and the secondary's — the initial blocks straight into its image, the apply (the checkpoint's blocks
//! into the image, the SVM's overlay dropped) and the takeover (the overlay kept) — with the
//! disk digests of `--verify` and the disk verdicts. A guest without a disk makes every call
//! here a no-op.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use colo_core::disk::{
    encode_disk_blocks_header, DiskBlocks, DiskDigester, BLOCK_SIZE, DISK_DIGEST_LEN,
    MAX_BLOCKS_PER_RECORD,
};
use colo_core::engine::{Primary, Secondary, Verdict};
use colo_core::{BackendError, DirtyBitmap, Domain, GuestDisk};

use super::driver::Io;
use crate::link::Link;

/// Most blocks one continuous mirror round sends (1 MiB: about a millisecond of loopback TCP).
const MIRROR_ROUND_BLOCKS: usize = MAX_BLOCKS_PER_RECORD;

/// The guest's disk in blocks (0: it has none).
pub(super) fn blocks(guest: &mut dyn Domain) -> u64 {
    guest.disk().map_or(0, |d| d.block_count())
}

/// Reads `blocks` of `disk` into the front of `buf` (grown as needed, never shrunk or
/// re-zeroed: the capture is the hot path) and returns that part.
fn read_into<'b>(
    disk: &mut dyn GuestDisk,
    blocks: &[u64],
    buf: &'b mut Vec<u8>,
) -> Result<&'b [u8], BackendError> {
    let n = blocks.len() * BLOCK_SIZE;
    if buf.len() < n {
        buf.resize(n, 0);
    }
    disk.read_blocks(blocks, &mut buf[..n])?;
    Ok(&buf[..n])
}

/// The digest of the first `blocks` blocks of `disk` as the guest sees them; holes (blocks the
/// image does not hold) are hashed without being read.
fn digest(
    disk: &mut dyn GuestDisk,
    blocks: u64,
    buf: &mut Vec<u8>,
) -> Result<[u8; DISK_DIGEST_LEN]> {
    let mut data = DirtyBitmap::new(disk.block_count());
    disk.allocated(&mut data)?;
    let mut d = DiskDigester::new();
    let mut batch = Vec::with_capacity(MAX_BLOCKS_PER_RECORD);
    let mut b = 0;
    while b < blocks {
        batch.clear();
        while b < blocks && batch.len() < MAX_BLOCKS_PER_RECORD {
            if data.test(b).unwrap_or(true) {
                batch.push(b);
            } else if batch.is_empty() {
                d.hole();
            } else {
                break;
            }
            b += 1;
        }
        if !batch.is_empty() {
            let bytes = read_into(disk, &batch, buf)?;
            for block in bytes.chunks_exact(BLOCK_SIZE) {
                d.block(block);
            }
        }
    }
    Ok(d.finish())
}

/// The whole disk as the guest sees it (test snapshots).
#[cfg(feature = "test-support")]
fn image(disk: &mut dyn GuestDisk, blocks: u64) -> Result<Vec<u8>, BackendError> {
    let all: Vec<u64> = (0..blocks).collect();
    let mut out = vec![0; all.len() * BLOCK_SIZE];
    disk.read_blocks(&all, &mut out)?;
    Ok(out)
}

/// Hands (epoch, the disk's first `blocks` blocks) to the disk snapshot hook, if there is one.
#[cfg_attr(not(feature = "test-support"), allow(unused_variables))]
fn snapshot(
    opts: &super::NodeOptions,
    disk: &mut dyn GuestDisk,
    epoch: u64,
    blocks: u64,
) -> Result<(), BackendError> {
    #[cfg(feature = "test-support")]
    if let Some(hook) = &opts.disk_snapshot {
        hook(epoch, image(disk, blocks)?);
    }
    Ok(())
}

/// The primary's disk side: the write log's harvest (E), the blocks captured and their data.
/// The buffers are allocated once and reused.
#[derive(Debug)]
pub(super) struct PrimaryDisk {
    written: DirtyBitmap,
    blocks: Vec<u64>,
    copy: Vec<u8>,
    header: Vec<u8>,
}

impl Default for PrimaryDisk {
    fn default() -> Self {
        Self {
            written: DirtyBitmap::new(0),
            blocks: Vec::new(),
            copy: Vec::new(),
            header: Vec::new(),
        }
    }
}

impl PrimaryDisk {
    /// `StartDirtyLog`: the disk's write log starts with the dirty log, before the first round
    /// reads anything.
    pub(super) fn start_log(&mut self, guest: &mut dyn Domain) -> Result<()> {
        if let Some(disk) = guest.disk() {
            disk.start_write_log()?;
            self.written = DirtyBitmap::new(disk.block_count());
        }
        Ok(())
    }

    /// `SendPages`' disk part, while the PVM runs: every block that holds data (`all`), else
    /// the blocks written since the last round, as DISK_BLOCKS. Returns the bytes written.
    pub(super) fn send_round<G: Domain>(
        &mut self,
        io: &mut Io<G>,
        all: bool,
        engine: &mut Primary,
    ) -> Result<u64> {
        let (Some(disk), Some(link)) = (io.guest.disk(), io.link.as_mut()) else {
            return Ok(0);
        };
        if engine.disk_blocks() == 0 {
            return Ok(0);
        }
        if all {
            disk.allocated(&mut self.written)?;
        } else {
            disk.harvest_written(&mut self.written)?;
        }
        self.blocks.clear();
        self.written.extend_pfns(&mut self.blocks);
        self.written.clear_all();
        let mut bytes = 0;
        for batch in self.blocks.chunks(MAX_BLOCKS_PER_RECORD) {
            let data = read_into(disk, batch, &mut self.copy)?;
            bytes += write_blocks(link, &mut self.header, batch, data)
                .context("sending the disk's pre-copy blocks")?;
        }
        engine.disk_blocks_sent(self.blocks.len() as u64);
        self.blocks.clear();
        Ok(bytes)
    }

    /// A continuous mirror round (PVM running): the write log is harvested into the blocks
    /// not sent yet, then at most [`MIRROR_ROUND_BLOCKS`] of them are read and sent as
    /// DISK_BLOCKS (a round stays short, so the node loop goes on serving the link and the
    /// checkpoints between rounds; the rest waits for the next round or the capture). The
    /// harvest clears the log before the read, and the backend marks a block only after its
    /// data is in the image: a guest write that races with the read is marked again and sent
    /// again (next round or the capture). Returns ((blocks, bytes) sent, whether blocks are
    /// left for another round), or the link's error (the backend's fail the node).
    pub(super) fn mirror<G: Domain>(
        &mut self,
        io: &mut Io<G>,
    ) -> Result<std::io::Result<(u64, u64, bool)>> {
        let (Some(disk), Some(link)) = (io.guest.disk(), io.link.as_mut()) else {
            return Ok(Ok((0, 0, false)));
        };
        disk.harvest_written(&mut self.written)?;
        self.blocks.clear();
        // One pass over the bitmap: the round's blocks, then whether any is left.
        let mut pending = self.written.iter();
        self.blocks
            .extend(pending.by_ref().take(MIRROR_ROUND_BLOCKS));
        let left = pending.next().is_some();
        for &b in &self.blocks {
            // In range: the bitmap named it.
            let _ = self.written.clear(b);
        }
        let mut bytes = 0;
        for batch in self.blocks.chunks(MAX_BLOCKS_PER_RECORD) {
            let data = read_into(disk, batch, &mut self.copy)?;
            match write_blocks(link, &mut self.header, batch, data) {
                Ok(b) => bytes += b,
                Err(e) => return Ok(Err(e)),
            }
        }
        let n = self.blocks.len() as u64;
        self.blocks.clear();
        Ok(Ok((n, bytes, left)))
    }

    /// `Capture`'s disk part (PVM paused): E, the blocks written since the last capture, and
    /// their data into the send buffer; with `--verify`, the disk's digest.
    pub(super) fn capture<G: Domain>(
        &mut self,
        io: &mut Io<G>,
        engine: &mut Primary,
    ) -> Result<()> {
        self.blocks.clear();
        let Some(disk) = io.guest.disk() else {
            return Ok(());
        };
        let blocks = engine.disk_blocks();
        if blocks == 0 {
            return Ok(());
        }
        disk.harvest_written(&mut self.written)?;
        self.written.extend_pfns(&mut self.blocks);
        self.written.clear_all();
        read_into(disk, &self.blocks, &mut self.copy)?;
        engine.disk_blocks_sent(self.blocks.len() as u64);
        if engine.verifying() {
            let mut buf = Vec::new();
            engine.disk_digest(digest(disk, blocks, &mut buf)?)?;
        }
        snapshot(&io.opts, disk, engine.epoch(), blocks)?;
        Ok(())
    }

    /// `SendCapture`'s disk part: the captured blocks as DISK_BLOCKS records (after the pages,
    /// before VCPU_STATE). Returns the bytes written.
    pub(super) fn write(&mut self, link: &mut Link) -> std::io::Result<u64> {
        let mut bytes = 0;
        let mut off = 0;
        for batch in self.blocks.chunks(MAX_BLOCKS_PER_RECORD) {
            let n = batch.len() * BLOCK_SIZE;
            let data = self.copy.get(off..off + n).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "disk copy too short")
            })?;
            bytes += write_blocks(link, &mut self.header, batch, data)?;
            off += n;
        }
        Ok(bytes)
    }
}

/// One DISK_BLOCKS record for `blocks` (≤ 256) with `data`, header and data in one batch of the
/// link (the data straight from the caller's buffer).
fn write_blocks(
    link: &mut Link,
    header: &mut Vec<u8>,
    blocks: &[u64],
    data: &[u8],
) -> std::io::Result<u64> {
    header.clear();
    let n = encode_disk_blocks_header(header, blocks);
    let mut w = link.writer();
    w.write_all(header)?;
    w.write_all(&data[..n])?;
    w.finish()?;
    Ok((header.len() + n) as u64)
}

/// The initial synchronisation's blocks, straight into the secondary's image (the SVM has never
/// run). A guest without a disk cannot receive them (the handshake refuses such a pair).
pub(super) fn write_initial(guest: &mut dyn Domain, blocks: &DiskBlocks<'_>) -> Result<()> {
    let Some(disk) = guest.disk() else {
        return Err(
            BackendError::Unsupported("disk blocks for a guest without a disk".into()).into(),
        );
    };
    let numbers: Vec<u64> = blocks.numbers().collect();
    disk.write_blocks(&numbers, blocks.data())?;
    Ok(())
}

/// `Apply`'s disk part (SVM paused, after the pages and the state): the SVM's overlay is
/// dropped and the checkpoint's blocks written into the image; from the resume on the SVM
/// writes a fresh overlay. With `--verify`, the disk's digest goes to the primary.
pub(super) fn apply<G: Domain>(io: &mut Io<G>, engine: &mut Secondary, epoch: u64) -> Result<()> {
    let blocks = engine.disk_blocks();
    let Some(disk) = io.guest.disk() else {
        return Ok(());
    };
    if blocks == 0 {
        return Ok(());
    }
    disk.reset_overlay()?;
    disk.write_blocks(engine.staged_disk_blocks(), engine.staged_disk_data())?;
    if engine.verifying() {
        let mut buf = Vec::new();
        engine.disk_digest(Instant::now(), digest(disk, blocks, &mut buf)?)?;
    }
    snapshot(&io.opts, disk, epoch, blocks)?;
    Ok(())
}

/// The takeover's disk part: the SVM's writes since the checkpoint it runs from are kept,
/// merged into the image (synced) before this node serves.
pub(super) fn keep_overlay(guest: &mut dyn Domain) -> Result<()> {
    if let Some(disk) = guest.disk() {
        let n = disk
            .merge_overlay()
            .context("keeping the SVM's disk writes")?;
        tracing::info!("takeover: {n} disk blocks the SVM wrote since the checkpoint kept");
    }
    Ok(())
}

/// `Verified`'s disk part: the disks' digests after checkpoint `epoch` (None: no disk).
pub(super) fn verified<G>(io: &Io<G>, epoch: u64, verdict: Option<Verdict>) {
    let Some(verdict) = verdict else { return };
    let mut st = io.status.lock();
    match verdict {
        Verdict::Identical => st.disk_verified_identical += 1,
        Verdict::Different => {
            st.disk_verify_failures += 1;
            tracing::error!("checkpoint {epoch}: the secondary's disk differs from the primary's");
        }
        Verdict::Unsettled => st.disk_verify_unsettled += 1,
    }
}

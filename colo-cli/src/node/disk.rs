//! Disk replication in the node (see `colo_core::disk` for the rule): the primary's disk
//! capture and DISK_BLOCKS writes, the secondary's initial blocks, its apply (drop the overlay,
//! write the checkpoint's blocks) and its takeover (keep the overlay), and the disk verdicts.

use anyhow::Result;
use colo_core::disk::DiskBlocks;
use colo_core::engine::Verdict;
use colo_core::{BackendError, Domain};

use super::driver::Io;

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

/// `Verified`'s disk part: the disks' digests after checkpoint `epoch` (None: no disk).
pub(super) fn verified<G>(io: &Io<G>, epoch: u64, verdict: Option<Verdict>) {
    let _ = io;
    match verdict {
        None | Some(Verdict::Identical) | Some(Verdict::Unsettled) => {}
        Some(Verdict::Different) => {
            tracing::error!("checkpoint {epoch}: the secondary's disk differs from the primary's")
        }
    }
}

//! The disk image behind `--pv-vbd` (a Xen guest's disk that colo serves itself): opened as
//! colo-mock's [`MockDisk`] — the same image, written-block log and SVM overlay the mock's
//! `--disk` uses, so the node replicates it by the same code — and handed to colo-xen's blkif
//! backend through [`ImageStore`] (colo-xen's `VbdStore`, with the `xen` feature) and to the
//! node through colo-mock's [`DiskHandle`] (colo-core's `GuestDisk`).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use colo_mock::{DiskConfig, DiskHandle, MockDisk};

const BLOCK: u64 = 4096;

/// Checks `--pv-vbd`'s image before anything else is set up; returns its size in bytes.
pub fn check_image(path: &Path) -> Result<u64> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--pv-vbd {}: no such image (create one, e.g. `truncate -s 1G {}`; the secondary's \
             must be at least the primary's size)",
            path.display(),
            path.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("--pv-vbd {}", path.display()));
        }
    };
    if !meta.is_file() {
        bail!(
            "--pv-vbd {}: not a plain file (the guest's disk is an image file in dom0)",
            path.display()
        );
    }
    let bytes = meta.len();
    if bytes == 0 || bytes % BLOCK != 0 {
        bail!(
            "--pv-vbd {}: the image is {bytes} bytes, not a positive multiple of 4096 (resize it, \
             e.g. `truncate -s 1G {}`)",
            path.display(),
            path.display()
        );
    }
    Ok(bytes)
}

/// Opens the plain image file `path` for `--pv-vbd`. `keep`: the primary's image keeps its
/// content; a secondary's is emptied (keeping its size), as the initial synchronisation fills
/// it, and its overlay is on from the start: unlike the mock's, a Xen SVM runs before the first
/// checkpoint, and what it writes then must not reach the image the primary's blocks fill (the
/// first checkpoint's apply drops it). The image must exist and be a positive multiple of 4096
/// bytes.
pub fn open_image(path: &Path, keep: bool) -> Result<Arc<MockDisk>> {
    let bytes = check_image(path)?;
    let disk = Arc::new(
        MockDisk::open(&DiskConfig {
            bytes,
            path: Some(path.to_path_buf()),
            keep,
            blocks_per_ms: 0,
        })
        .with_context(|| format!("--pv-vbd {}", path.display()))?,
    );
    if !keep {
        colo_core::GuestDisk::reset_overlay(&mut guest_disk(&disk))?;
    }
    Ok(disk)
}

/// The node's view of the image (write log, overlay, block reads and writes).
pub fn guest_disk(disk: &Arc<MockDisk>) -> DiskHandle {
    DiskHandle(disk.clone())
}

/// The image as colo-xen's blkif backend uses it: the guest's reads and writes go through
/// [`MockDisk::guest_read`] / [`MockDisk::guest_write`] (the overlay while the secondary's
/// is on, else the image, marked in the write log) and its flushes through
/// [`MockDisk::guest_flush`] (`fdatasync`).
#[cfg(feature = "xen")]
#[derive(Debug)]
pub struct ImageStore(pub Arc<MockDisk>);

#[cfg(feature = "xen")]
impl colo_xen::blkif::VbdStore for ImageStore {
    fn block_count(&self) -> u64 {
        self.0.blocks()
    }

    fn read(&mut self, first: u64, out: &mut [u8]) -> Result<(), colo_xen::blkif::StoreError> {
        for (i, b) in out.chunks_exact_mut(BLOCK as usize).enumerate() {
            self.0
                .guest_read(first + i as u64, b)
                .map_err(|e| colo_xen::blkif::StoreError(e.to_string()))?;
        }
        Ok(())
    }

    fn write(&mut self, first: u64, data: &[u8]) -> Result<(), colo_xen::blkif::StoreError> {
        for (i, b) in data.chunks_exact(BLOCK as usize).enumerate() {
            self.0
                .guest_write(first + i as u64, b)
                .map_err(|e| colo_xen::blkif::StoreError(e.to_string()))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), colo_xen::blkif::StoreError> {
        self.0
            .guest_flush()
            .map_err(|e| colo_xen::blkif::StoreError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_core::{DirtyBitmap, GuestDisk};

    fn image(bytes: u64) -> (std::path::PathBuf, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let p = dir.0.join("xvda.img");
        std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
        (p, dir)
    }

    /// A private temporary directory, removed on drop.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "colo-vbd-test-{}-{:x}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_missing_empty_or_odd_sized_image_is_refused_by_name() {
        let (p, _d) = image(8192);
        let missing = p.with_file_name("nope.img");
        let e = format!("{:#}", open_image(&missing, true).unwrap_err());
        assert!(e.contains("no such image"), "{e}");
        let e = format!("{:#}", open_image(p.parent().unwrap(), true).unwrap_err());
        assert!(e.contains("not a plain file"), "{e}");
        for bytes in [0, 4097, 12_000] {
            std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
            let e = format!("{:#}", open_image(&p, true).unwrap_err());
            assert!(e.contains("not a positive multiple of 4096"), "{e}");
        }
    }

    #[test]
    fn the_primary_keeps_its_image_and_the_secondary_empties_its_own() {
        let (p, _d) = image(4 * BLOCK);
        let mut block = vec![0u8; BLOCK as usize];
        block[0] = 0xaa;
        {
            let d = open_image(&p, true).unwrap();
            d.guest_write(2, &block).unwrap();
            d.guest_flush().unwrap();
        }
        let d = open_image(&p, true).unwrap();
        assert_eq!(d.blocks(), 4);
        let mut h = guest_disk(&d);
        let mut out = vec![0u8; BLOCK as usize];
        h.read_blocks(&[2], &mut out).unwrap();
        assert_eq!(out[0], 0xaa);
        drop((h, d));
        let d = open_image(&p, false).unwrap();
        assert_eq!(d.blocks(), 4, "emptied, not shrunk");
        let mut h = guest_disk(&d);
        h.read_blocks(&[2], &mut out).unwrap();
        assert_eq!(out[0], 0);
        // The SVM's writes before the first checkpoint stay in the overlay, off the image.
        d.guest_write(1, &block).unwrap();
        assert_eq!(d.overlay_blocks(), 1);
        let mut all = DirtyBitmap::new(4);
        h.allocated(&mut all).unwrap();
        assert_eq!(all.count(), 0);
        h.reset_overlay().unwrap();
        d.guest_read(1, &mut out).unwrap();
        assert_eq!(out[0], 0, "the first apply drops what the SVM wrote");
    }

    #[cfg(feature = "xen")]
    #[test]
    fn the_store_writes_through_the_write_log_and_reads_the_overlay() {
        use colo_xen::blkif::VbdStore;
        let (p, _d) = image(4 * BLOCK);
        let d = open_image(&p, true).unwrap();
        let (mut store, mut h) = (ImageStore(d.clone()), guest_disk(&d));
        h.start_write_log().unwrap();
        let data: Vec<u8> = (0..2 * BLOCK).map(|i| i as u8).collect();
        store.write(1, &data).unwrap();
        store.flush().unwrap();
        let mut log = DirtyBitmap::new(4);
        h.harvest_written(&mut log).unwrap();
        assert_eq!(log.iter().collect::<Vec<_>>(), [1, 2]);
        let mut back = vec![0u8; 2 * BLOCK as usize];
        store.read(1, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(d.guest_io(), (2, 1));
    }
}

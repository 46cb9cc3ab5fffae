//! Guest RAM stays sparse: creating a domain, digesting it, reading every page, and the hash
//! tracker's passes allocate only the pages the guest wrote. Also covers `ram_path` (a file under
//! /dev/shm that is kept after the domain is dropped, for inspection).

use colo_core::{DirtyBitmap, Domain, PAGE_SIZE};
use colo_mock::{MockConfig, MockDomain, TrackerChoice, Workload};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn allocated_pages(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512 / PAGE_SIZE as u64
}

fn sparse(choice: TrackerChoice) {
    let dir = Path::new("/dev/shm");
    if !dir.is_dir() {
        eprintln!("no /dev/shm here; skipping");
        return;
    }
    let path = dir.join(format!(
        "colo-mock-sparse-{}-{choice:?}",
        std::process::id()
    ));
    let pages = 4096; // 16 MiB
    let mut cfg = MockConfig::new(pages, Workload::Idle, 1);
    cfg.ram_path = Some(path.clone());
    cfg.tracker = choice;
    let mut d = MockDomain::create(cfg).unwrap();
    assert_eq!(allocated_pages(&path), 0, "create touches no page");
    d.start_dirty_log().unwrap();
    d.resume().unwrap();
    let written: Vec<u64> = (0..pages).step_by(331).collect();
    let w = written.clone();
    d.exec_on_vcpu(move |m| {
        for &p in &w {
            m.write(p as usize * PAGE_SIZE + 5, &[0xEE]).unwrap();
        }
    })
    .unwrap();
    d.pause().unwrap();
    let mut b = DirtyBitmap::new(pages);
    d.harvest_dirty(&mut b).unwrap();
    assert_eq!(b.to_pfns(), written);
    let h1 = d.digest();
    let all: Vec<u64> = (0..pages).collect();
    let mut nonzero = Vec::new();
    d.read_pages(&all, &mut |i, pg| {
        if pg.unwrap().iter().any(|&x| x != 0) {
            nonzero.push(all[i]);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(nonzero, written);
    assert_eq!(d.digest(), h1);
    d.resume().unwrap();
    d.harvest_dirty(&mut b).unwrap();
    d.pause().unwrap();
    assert_eq!(
        allocated_pages(&path),
        written.len() as u64,
        "reads allocated pages ({})",
        d.tracker_kind()
    );
    drop(d);
    assert!(path.exists(), "the RAM file is kept for inspection");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn sparse_auto() {
    sparse(TrackerChoice::Auto);
}

#[test]
fn sparse_hash_fallback() {
    sparse(TrackerChoice::Fallback);
}

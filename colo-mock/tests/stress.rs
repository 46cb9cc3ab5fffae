//! Stress: guest vCPUs make ≥ 1,000,000 random writes while this thread repeatedly harvests the
//! dirty set and copies the reported pages into a shadow (pre-copy style, guest running). After a
//! final paused round the shadow must equal guest RAM page for page.

use colo_core::{DirtyBitmap, Domain, PAGE_SIZE};
use colo_mock::{DirtyConfig, MockConfig, MockDomain, TrackerChoice, Workload};

fn stress(choice: TrackerChoice, pages: u64, writes: u64, rate: u64) {
    let mut cfg = MockConfig::new(
        pages,
        Workload::Dirty(DirtyConfig {
            pages_per_ms: rate,
            vcpus: 2,
        }),
        77,
    );
    cfg.tracker = choice;
    let mut d = MockDomain::create(cfg).unwrap();
    let kind = d.tracker_kind();
    let mut shadow = vec![0u8; pages as usize * PAGE_SIZE];
    d.start_dirty_log().unwrap();
    d.resume().unwrap();
    let mut bm = DirtyBitmap::new(pages);
    let mut pfns = Vec::new();
    let (mut rounds, mut copied) = (0u64, 0u64);
    let mut copy = |d: &mut MockDomain, bm: &mut DirtyBitmap, pfns: &mut Vec<u64>| {
        bm.clear_all();
        d.harvest_dirty(bm).unwrap();
        pfns.clear();
        bm.extend_pfns(pfns);
        d.read_pages(pfns, &mut |i, page| {
            let o = pfns[i] as usize * PAGE_SIZE;
            shadow[o..o + PAGE_SIZE].copy_from_slice(page.unwrap());
            Ok(())
        })
        .unwrap();
        pfns.len() as u64
    };
    while d.steps() < writes {
        copied += copy(&mut d, &mut bm, &mut pfns);
        rounds += 1;
    }
    d.pause().unwrap();
    let last = copy(&mut d, &mut bm, &mut pfns);
    let ram = d.ram().unwrap();
    let bad = ram
        .chunks(PAGE_SIZE)
        .zip(shadow.chunks(PAGE_SIZE))
        .filter(|(a, b)| a != b)
        .count();
    eprintln!(
        "[{kind}] {} writes, {rounds} harvest+copy rounds while running, {copied} pages copied, \
         {last} in the final round; mismatching pages: {bad}",
        d.steps()
    );
    assert!(rounds > 1, "the harvester never overlapped the writers");
    assert_eq!(bad, 0);
}

#[test]
fn stress_uffd_or_auto() {
    stress(TrackerChoice::Auto, 8192, 1_000_000, DirtyConfig::UNLIMITED);
}

#[test]
fn stress_hash_fallback() {
    // Hashing is slow in debug builds: pace the writers so many rounds overlap them.
    stress(TrackerChoice::Fallback, 1024, 1_000_000, 1500);
}

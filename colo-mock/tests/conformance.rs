//! colo-core's backend conformance suite run on MockDomain, with each dirty tracker.

use colo_core::conformance::{run_all, ConformanceGuest};
use colo_core::PAGE_SIZE;
use colo_mock::{DirtyConfig, MockConfig, MockDomain, TrackerChoice, TrackerKind, Workload};
use std::time::Duration;

/// A dirty-workload guest whose background writer is the workload's rate knob and whose
/// `guest_write` runs on a vCPU thread.
struct MockGuest {
    dom: MockDomain,
}

impl ConformanceGuest for MockGuest {
    type Dom = MockDomain;

    fn domain(&mut self) -> &mut MockDomain {
        &mut self.dom
    }

    fn scratch_pfns(&self) -> Vec<u64> {
        (200..200 + 96).collect()
    }

    fn exact(&self) -> bool {
        true
    }

    fn guest_write(&mut self, pfns: &[u64], pattern: u8) -> Result<(), String> {
        let pfns = pfns.to_vec();
        self.dom
            .exec_on_vcpu(move |m| -> Result<(), String> {
                let page = [pattern; PAGE_SIZE];
                for p in pfns {
                    m.write(p as usize * PAGE_SIZE, &page)
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?
    }

    fn set_background_writes(&mut self, on: bool) -> Result<(), String> {
        self.dom.set_dirty_rate(if on { 200 } else { 0 });
        Ok(())
    }

    fn let_time_pass(&mut self) {
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn run(choice: TrackerChoice) -> TrackerKind {
    let mut cfg = MockConfig::new(
        1024,
        Workload::Dirty(DirtyConfig {
            pages_per_ms: 0,
            vcpus: 2,
        }),
        11,
    );
    cfg.tracker = choice;
    let dom = MockDomain::create(cfg).unwrap();
    let kind = dom.tracker_kind();
    let mut g = MockGuest { dom };
    if let Err(e) = run_all(&mut g) {
        panic!("conformance failed with {kind}: {e}");
    }
    kind
}

#[test]
fn conformance_auto_tracker() {
    let kind = run(TrackerChoice::Auto);
    eprintln!("conformance passed with {kind}");
}

#[test]
fn conformance_hash_fallback() {
    assert_eq!(run(TrackerChoice::Fallback), TrackerKind::PageHash);
}

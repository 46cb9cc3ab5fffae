//! colo-core's backend conformance suite run on MockDomain, with each dirty tracker, and its
//! NIC checks on a kv guest.

use colo_core::conformance::{run_all, run_nic, ConformanceGuest, NicConformanceGuest};
use colo_core::PAGE_SIZE;
use colo_mock::{
    build_request_frame, parse_response_frame, ClientAddr, DirtyConfig, KvConfig, KvOp, KvRequest,
    MockConfig, MockDomain, TrackerChoice, TrackerKind, Workload,
};
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

/// A kv guest: it answers every request with one response carrying the request's id.
struct KvGuest {
    dom: MockDomain,
}

impl NicConformanceGuest for KvGuest {
    type Dom = MockDomain;

    fn domain(&mut self) -> &mut MockDomain {
        &mut self.dom
    }

    fn request(&mut self, id: u64) -> Vec<u8> {
        let client = ClientAddr {
            mac: [0x02, 0, 0, 0, 0, 0x09],
            ip: [10, 0, 0, 9],
            port: 40_000,
        };
        let req = KvRequest {
            id,
            op: KvOp::Put,
            key: b"conformance",
            value: &id.to_le_bytes(),
        };
        let mut frame = Vec::new();
        build_request_frame(&client, &req, &mut frame).unwrap();
        frame
    }

    fn answered(&self, frame: &[u8]) -> Option<u64> {
        parse_response_frame(frame).ok().map(|r| r.id)
    }

    fn let_time_pass(&mut self) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nic_conformance() {
    let cfg = MockConfig::new(1024, Workload::Kv(KvConfig::default()), 12);
    let mut g = KvGuest {
        dom: MockDomain::create(cfg).unwrap(),
    };
    if let Err(e) = run_nic(&mut g) {
        panic!("NIC conformance failed: {e}");
    }
}

//! Basic behaviour of MockDomain: the kv service over the NIC rings, pause, dirty-tracking
//! exactness (guest pointer writes and read(2) into RAM), state blob, determinism.

use colo_core::{DirtyBitmap, Domain, PAGE_SIZE};
use colo_mock::{
    build_request_frame, parse_response_frame, ClientAddr, DirtyConfig, KvConfig, KvOp, KvRequest,
    KvResponse, KvStatus, MockConfig, MockDomain, TrackerChoice, Workload,
};
use std::time::{Duration, Instant};

const CLIENT: ClientAddr = ClientAddr {
    mac: [2, 0, 0, 0, 0, 0x42],
    ip: [10, 0, 0, 42],
    port: 41000,
};

fn kv(seed: u64, memory_divergence: bool, output_divergence: f64) -> MockDomain {
    let cfg = MockConfig::new(
        1024,
        Workload::Kv(KvConfig {
            table_pages: 64,
            memory_divergence,
            output_divergence,
        }),
        seed,
    );
    MockDomain::create(cfg).unwrap()
}

/// Sends `reqs` one after another and collects the raw response frames.
fn serve(d: &mut MockDomain, reqs: &[(KvOp, &str, &str)], first_id: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut frame = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while out.len() < reqs.len() {
        if i < reqs.len() {
            let (op, k, v) = reqs[i];
            let r = KvRequest {
                id: first_id + i as u64,
                op,
                key: k.as_bytes(),
                value: v.as_bytes(),
            };
            build_request_frame(&CLIENT, &r, &mut frame).unwrap();
            let seq = d.rx_next_seq();
            if d.inject(seq, &frame).unwrap() {
                i += 1;
                continue;
            }
        }
        d.drain_tx(&mut |f| out.push(f.to_vec())).unwrap();
        assert!(Instant::now() < deadline, "guest stopped answering");
        std::thread::yield_now();
    }
    out
}

fn workload_reqs(n: usize) -> Vec<(KvOp, String, String)> {
    (0..n)
        .map(|i| {
            let k = format!("key{}", (i * 7) % 97);
            match i % 4 {
                0 | 1 => (KvOp::Put, k, format!("value-{i}")),
                2 => (KvOp::Get, k, String::new()),
                _ => (KvOp::Delete, k, String::new()),
            }
        })
        .collect()
}

fn as_refs(v: &[(KvOp, String, String)]) -> Vec<(KvOp, &str, &str)> {
    v.iter()
        .map(|(o, k, x)| (*o, k.as_str(), x.as_str()))
        .collect()
}

#[test]
fn kv_answers_in_order() {
    let mut d = kv(1, false, 0.0);
    d.resume().unwrap();
    let frames = serve(
        &mut d,
        &[
            (KvOp::Get, "a", ""),
            (KvOp::Put, "a", "1"),
            (KvOp::Get, "a", ""),
            (KvOp::Put, "a", "22"),
            (KvOp::Get, "a", ""),
            (KvOp::Delete, "a", ""),
            (KvOp::Delete, "a", ""),
            (KvOp::Get, "a", ""),
        ],
        100,
    );
    let r: Vec<KvResponse> = frames
        .iter()
        .map(|f| parse_response_frame(f).unwrap())
        .collect();
    let got: Vec<(u64, KvStatus, &[u8])> =
        r.iter().map(|x| (x.id, x.status, &x.value[..])).collect();
    assert_eq!(
        got,
        vec![
            (100, KvStatus::NotFound, &b""[..]),
            (101, KvStatus::Ok, b""),
            (102, KvStatus::Ok, b"1"),
            (103, KvStatus::Ok, b""),
            (104, KvStatus::Ok, b"22"),
            (105, KvStatus::Ok, b""),
            (106, KvStatus::NotFound, b""),
            (107, KvStatus::NotFound, b""),
        ]
    );
    assert!(r.iter().all(|x| x.extra.is_none()));
    assert_eq!(d.rx_next_seq(), 8);
    // Wrong sequence numbers are refused.
    assert!(d.inject(3, &frames[0]).is_err());
}

#[test]
fn kv_is_deterministic_and_memory_diverges_only_with_the_knob() {
    let reqs = workload_reqs(400);
    let reqs = as_refs(&reqs);
    let run = |seed: u64, mem_div: bool| {
        let mut d = kv(seed, mem_div, 0.0);
        d.resume().unwrap();
        let out = serve(&mut d, &reqs, 1);
        d.pause().unwrap();
        let mut st = Vec::new();
        d.get_state(&mut st).unwrap();
        (d.digest(), out, st)
    };
    let a = run(1, false);
    let b = run(2, false);
    assert_eq!(a, b, "no divergence knob: seeds must not matter");
    let c = run(1, true);
    let d = run(1, true);
    assert_eq!(c, d, "same seeds: identical");
    let e = run(2, true);
    assert_eq!(c.1, e.1, "memory divergence keeps answers identical");
    assert_ne!(c.0, e.0, "memory divergence changes RAM");
}

#[test]
fn output_divergence_changes_the_given_fraction() {
    let reqs = workload_reqs(400);
    let reqs = as_refs(&reqs);
    let mut a = kv(1, false, 0.25);
    let mut b = kv(2, false, 0.25);
    a.resume().unwrap();
    b.resume().unwrap();
    let ra = serve(&mut a, &reqs, 1);
    let rb = serve(&mut b, &reqs, 1);
    let differ = ra.iter().zip(&rb).filter(|(x, y)| x != y).count();
    // ~100 expected; bounds wide enough that the RNG cannot fail them by chance.
    assert!((50..=150).contains(&differ), "{differ} of 400 differ");
    for (x, y) in ra.iter().zip(&rb) {
        let (x, y) = (
            parse_response_frame(x).unwrap(),
            parse_response_frame(y).unwrap(),
        );
        assert_eq!((x.id, x.status, &x.value), (y.id, y.status, &y.value));
        assert_eq!(x.extra.is_some(), y.extra.is_some());
    }
}

#[test]
fn checkpoint_copy_makes_the_secondary_an_exact_copy() {
    let reqs = workload_reqs(300);
    let reqs = as_refs(&reqs);
    let (first, second) = reqs.split_at(150);
    let mut p = kv(1, true, 0.0);
    let mut s = kv(2, true, 0.0);
    p.start_dirty_log().unwrap();
    s.start_dirty_log().unwrap();
    p.resume().unwrap();
    s.resume().unwrap();
    serve(&mut p, first, 1);
    serve(&mut s, &first[..40], 1);
    p.pause().unwrap();
    s.pause().unwrap();
    assert_ne!(p.digest(), s.digest());
    // Checkpoint: D = A ∪ B, copy D and the state.
    let mut dset = DirtyBitmap::new(p.page_count());
    p.harvest_dirty(&mut dset).unwrap();
    s.harvest_dirty(&mut dset).unwrap();
    let pfns = dset.to_pfns();
    let mut data = Vec::new();
    p.read_pages(&pfns, &mut |_, pg| {
        data.extend_from_slice(pg.unwrap());
        Ok(())
    })
    .unwrap();
    s.write_pages(&pfns, &data).unwrap();
    let mut st = Vec::new();
    p.get_state(&mut st).unwrap();
    s.set_state(&st).unwrap();
    assert_eq!(p.digest(), s.digest());
    assert_eq!(s.rx_next_seq(), 150);
    let mut after = DirtyBitmap::new(s.page_count());
    s.peek_dirty(&mut after).unwrap();
    assert_eq!(after.count(), 0, "applied pages are not logged as dirty");
    p.resume().unwrap();
    s.resume().unwrap();
    let rp = serve(&mut p, second, 151);
    let rs = serve(&mut s, second, 151);
    assert_eq!(rp, rs);
}

#[test]
fn pause_freezes_ram() {
    let cfg = MockConfig::new(
        2048,
        Workload::Dirty(DirtyConfig {
            pages_per_ms: DirtyConfig::UNLIMITED,
            vcpus: 2,
        }),
        5,
    );
    let mut d = MockDomain::create(cfg).unwrap();
    d.resume().unwrap();
    while d.steps() < 10_000 {
        std::thread::yield_now();
    }
    for _ in 0..3 {
        d.pause().unwrap();
        let (h, s) = (d.digest(), d.steps());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(d.digest(), h);
        assert_eq!(d.steps(), s);
        d.resume().unwrap();
        let s0 = d.steps();
        while d.steps() < s0 + 1000 {
            std::thread::yield_now();
        }
    }
}

fn exact_tracking(choice: TrackerChoice) {
    let mut cfg = MockConfig::new(4096, Workload::Idle, 3);
    cfg.tracker = choice;
    let mut d = MockDomain::create(cfg).unwrap();
    d.start_dirty_log().unwrap();
    d.resume().unwrap();
    let pages: Vec<u64> = (0..4096)
        .filter(|p| (p * 2654435761u64) % 17 == 3)
        .collect();
    let pp = pages.clone();
    // Guest code writes through raw pointers, on its vCPU thread; untouched pages included.
    d.exec_on_vcpu(move |m| {
        for &p in &pp {
            m.write(p as usize * PAGE_SIZE + 123, &[0x5A, p as u8 | 1])
                .unwrap();
        }
    })
    .unwrap();
    let mut b = DirtyBitmap::new(4096);
    d.harvest_dirty(&mut b).unwrap();
    assert_eq!(b.to_pfns(), pages, "{}", d.tracker_kind());
    b.clear_all();
    d.harvest_dirty(&mut b).unwrap();
    assert_eq!(b.count(), 0, "nothing twice");
    // The kernel writes into guest RAM: read(2) from a file into pages 1000..1003 (+ a bit).
    let path = std::env::temp_dir().join(format!(
        "colo-mock-read2-{}-{:?}",
        std::process::id(),
        choice
    ));
    std::fs::write(&path, vec![0xC3u8; 3 * PAGE_SIZE + 10]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let n = d
        .exec_on_vcpu(move |m| {
            use std::os::fd::AsFd;
            let want = 3 * PAGE_SIZE + 10;
            let mut total = 0;
            while total < want {
                let n = m
                    .read_from_fd(file.as_fd(), 1000 * PAGE_SIZE + total, want - total)
                    .unwrap();
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        })
        .unwrap();
    assert_eq!(n, 3 * PAGE_SIZE + 10);
    d.pause().unwrap();
    d.harvest_dirty(&mut b).unwrap();
    assert_eq!(
        b.to_pfns(),
        vec![1000, 1001, 1002, 1003],
        "{}",
        d.tracker_kind()
    );
}

#[test]
fn exact_tracking_auto() {
    let d = MockDomain::create(MockConfig::new(128, Workload::Idle, 0)).unwrap();
    eprintln!("tracker in use: {}", d.tracker_kind());
    exact_tracking(TrackerChoice::Auto);
}

#[test]
fn exact_tracking_fallback() {
    exact_tracking(TrackerChoice::Fallback);
}

#[test]
fn state_blob_round_trip_and_rejects() {
    let mut d = kv(1, false, 0.0);
    d.resume().unwrap();
    serve(&mut d, &[(KvOp::Put, "x", "y")], 1);
    assert!(d.set_state(&[]).is_err(), "running: refused");
    d.pause().unwrap();
    let mut st = Vec::new();
    d.get_state(&mut st).unwrap();
    let mut e = kv(9, false, 0.0);
    e.set_state(&st).unwrap();
    let mut st2 = Vec::new();
    e.get_state(&mut st2).unwrap();
    assert_eq!(st, st2);
    assert!(e.set_state(&st[..st.len() - 1]).is_err());
    let mut bad = st.clone();
    bad[0] ^= 1;
    assert!(e.set_state(&bad).is_err());
    let mut bad = st.clone();
    bad[8] ^= 1; // page count
    assert!(e.set_state(&bad).is_err());
    let idle = MockDomain::create(MockConfig::new(1024, Workload::Idle, 0));
    assert!(idle.unwrap().set_state(&st).is_err(), "workload mismatch");
}

#[test]
fn dirty_workload_is_deterministic() {
    let run = |seed: u64, limit: u64| {
        let cfg = MockConfig::new(
            2048,
            Workload::Dirty(DirtyConfig {
                pages_per_ms: DirtyConfig::UNLIMITED,
                vcpus: 2,
            }),
            seed,
        );
        let mut d = MockDomain::create(cfg).unwrap();
        d.set_step_limit(Some(limit));
        d.resume().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while d.vcpu_regs().iter().any(|r| r.pc < limit) {
            assert!(Instant::now() < deadline, "vCPUs stopped early");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Interrupted by pauses or not, the result only depends on the step counts.
        d.pause().unwrap();
        let mut st = Vec::new();
        d.get_state(&mut st).unwrap();
        (d.digest(), st)
    };
    let a = run(1, 30_000);
    assert_eq!(
        a,
        run(2, 30_000),
        "vm_seed does not influence the dirty workload"
    );
    assert_ne!(a.0, run(1, 30_001).0);
}

/// The host can sleep on `output_ready` instead of polling the TX ring: every answer is
/// announced, and nothing is announced while the guest is idle.
#[test]
fn output_ready_announces_every_answer_and_stays_quiet_when_idle() {
    let mut d = kv(5, false, 0.0);
    let ready = d.output_ready();
    d.resume().unwrap();
    assert!(
        ready.recv_timeout(Duration::from_millis(200)).is_err(),
        "an idle guest announced output"
    );
    let mut frame = Vec::new();
    for id in 0..20u64 {
        let r = KvRequest {
            id,
            op: KvOp::Put,
            key: b"k",
            value: b"v",
        };
        build_request_frame(&CLIENT, &r, &mut frame).unwrap();
        let seq = d.rx_next_seq();
        assert!(d.inject(seq, &frame).unwrap());
        // Blocks until the guest answered (a generous bound: only a lost signal exceeds it).
        ready
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("answer {id} was not announced"));
        let mut got = 0;
        d.drain_tx(&mut |_| got += 1).unwrap();
        assert_eq!(got, 1, "request {id}");
    }
}

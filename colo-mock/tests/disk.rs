//! The mock's disk under its workloads: the kv guest persists every acknowledged write to its
//! disk before answering (the image, read offline, holds the same table as RAM, and a FLUSH
//! follows every write), the dirty workload writes blocks at its disk rate, and the node's view
//! (`Domain::disk`) logs exactly the blocks written.

use std::time::{Duration, Instant};

use colo_core::disk::BLOCK_SIZE;
use colo_core::{DirtyBitmap, Domain};
use colo_mock::guest::{kv_table_from_disk, kv_table_from_ram};
use colo_mock::{
    build_request_frame, parse_response_frame, ClientAddr, DirtyConfig, DiskConfig, KvConfig, KvOp,
    KvRequest, KvStatus, MockConfig, MockDomain, Workload,
};

const CLIENT: ClientAddr = ClientAddr {
    mac: [2, 0, 0, 0, 0, 0x43],
    ip: [10, 0, 0, 43],
    port: 41001,
};

fn image(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn an_acknowledged_kv_write_is_on_the_disk_image_when_its_answer_leaves() {
    let path = std::env::temp_dir().join(format!("colo-mock-kv-{}.disk", std::process::id()));
    let mut cfg = MockConfig::new(
        1024,
        Workload::Kv(KvConfig {
            table_pages: 64,
            memory_divergence: true,
            output_divergence: 0.0,
        }),
        5,
    );
    cfg.disk = Some(DiskConfig {
        path: Some(path.clone()),
        ..DiskConfig::new(1 << 20)
    });
    let mut d = MockDomain::create(cfg).unwrap();
    d.start_dirty_log().unwrap();
    d.disk().unwrap().start_write_log().unwrap();
    d.resume().unwrap();
    let mut frame = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..200u64 {
        let key = format!("k{}", i % 37);
        let value = format!("v{i}");
        let op = if i % 5 == 4 { KvOp::Delete } else { KvOp::Put };
        let req = KvRequest {
            id: i,
            op,
            key: key.as_bytes(),
            value: value.as_bytes(),
        };
        build_request_frame(&CLIENT, &req, &mut frame).unwrap();
        let seq = d.rx_next_seq();
        assert!(d.inject(seq, &frame).unwrap());
        let mut answer = None;
        while answer.is_none() {
            d.drain_tx(&mut |f| answer = Some(f.to_vec())).unwrap();
            assert!(Instant::now() < deadline, "the guest stopped answering");
        }
        let r = parse_response_frame(&answer.unwrap()).unwrap();
        assert_eq!(r.id, i);
        if r.status == KvStatus::Ok || op == KvOp::Delete {
            // The answer is out: the image, read by another reader, already holds the write.
            let table = kv_table_from_disk(&image(&path)).unwrap();
            match op {
                KvOp::Put => assert_eq!(table.get(key.as_bytes()), Some(&value.into_bytes())),
                _ => assert_eq!(table.get(key.as_bytes()), None),
            }
        }
    }
    d.pause().unwrap();
    let on_disk = kv_table_from_disk(&image(&path)).unwrap();
    assert_eq!(on_disk, kv_table_from_ram(d.ram().unwrap(), 64));
    assert!(on_disk.len() > 10);
    let (writes, flushes) = d.disk_image().unwrap().guest_io();
    // Every PUT (160) and every DELETE that found its key flushed; a miss writes nothing.
    assert!(
        flushes >= 160 && writes > flushes,
        "{writes} writes, {flushes} flushes"
    );
    let mut log = DirtyBitmap::new(256);
    d.disk().unwrap().harvest_written(&mut log).unwrap();
    assert!(log.count() > 0 && log.iter().all(|b| (1..=64).contains(&b)));
    drop(d);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_dirty_workload_writes_blocks_at_its_disk_rate() {
    let mut cfg = MockConfig::new(
        512,
        Workload::Dirty(DirtyConfig {
            pages_per_ms: 0,
            vcpus: 2,
        }),
        9,
    );
    cfg.disk = Some(DiskConfig {
        blocks_per_ms: 20,
        ..DiskConfig::new(4 << 20)
    });
    let mut d = MockDomain::create(cfg).unwrap();
    d.disk().unwrap().start_write_log().unwrap();
    d.resume().unwrap();
    let t = Instant::now();
    while d.disk_image().unwrap().guest_io().0 < 200 {
        assert!(t.elapsed() < Duration::from_secs(60), "no disk writes");
        std::thread::sleep(Duration::from_millis(5));
    }
    d.pause().unwrap();
    let (writes, _) = d.disk_image().unwrap().guest_io();
    let mut log = DirtyBitmap::new(1024);
    d.disk().unwrap().harvest_written(&mut log).unwrap();
    assert!(log.count() > 0 && log.count() <= writes);
    let blocks: Vec<u64> = log.iter().take(4).collect();
    let mut out = vec![0; blocks.len() * BLOCK_SIZE];
    d.disk().unwrap().read_blocks(&blocks, &mut out).unwrap();
    for (b, data) in blocks.iter().zip(out.chunks(BLOCK_SIZE)) {
        assert_eq!(
            data[8..16],
            b.to_le_bytes(),
            "each block is stamped with its number"
        );
    }
    // Paused, nothing more is written; the rate knob stops it for good.
    d.set_disk_rate(0);
    d.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    d.pause().unwrap();
    let still = d.disk_image().unwrap().guest_io().0;
    d.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    d.pause().unwrap();
    assert_eq!(d.disk_image().unwrap().guest_io().0, still);
}

#[test]
fn a_kv_disk_too_small_for_the_table_is_refused() {
    let mut cfg = MockConfig::new(1024, Workload::Kv(KvConfig::default()), 1);
    cfg.disk = Some(DiskConfig::new(64 * BLOCK_SIZE as u64));
    let e = MockDomain::create(cfg).unwrap_err().to_string();
    assert!(e.contains("cannot hold the kv table"), "{e}");
}

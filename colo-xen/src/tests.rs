//! Unit tests of [`XenDomain`] against the in-memory fake of the C API: bitmap conversion,
//! batching, per-page errors, errno mapping, merge-back of harvested bits, state blobs, and the
//! rest of the backend contract (the empty NIC, the snapshot's platform records).

use colo_core::{BackendError, DirtyBitmap, Domain, PAGE_SIZE};

use crate::api::{dominf, EvtchnStatus};
use crate::fake::FakeHandle;
use crate::{XenDomain, XenError};

const DOMID: u32 = 7;

fn open(pages: u64) -> (FakeHandle, XenDomain) {
    let fake = FakeHandle::new(DOMID, pages);
    let dom = XenDomain::with_api(fake.api(), DOMID).expect("fake domain opens");
    (fake, dom)
}

fn pfn_of(page: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&page[..8]);
    u64::from_le_bytes(a)
}

#[test]
fn page_count_is_max_gpfn_plus_one() {
    let (_f, dom) = open(1000);
    assert_eq!(dom.page_count(), 1000);
    assert_eq!(dom.domid(), DOMID);
}

#[test]
fn refuses_pv_missing_dying_and_no_hap_domains() {
    let fake = FakeHandle::new(DOMID, 64);
    fake.lock().flags = dominf::HAP; // no HVM_GUEST: a PV guest
    let err = XenDomain::with_api(fake.api(), DOMID).expect_err("PV refused");
    assert!(matches!(err, XenError::PvGuest { domid: DOMID }));
    assert!(err.to_string().contains("PVH"), "{err}");
    assert!(matches!(
        BackendError::from(err),
        BackendError::Unsupported(_)
    ));

    fake.lock().flags = dominf::HVM_GUEST;
    let err = XenDomain::with_api(fake.api(), DOMID).expect_err("no HAP refused");
    assert!(matches!(err, XenError::NoHap { .. }));

    fake.lock().flags = dominf::HVM_GUEST | dominf::HAP | dominf::DYING;
    let err = XenDomain::with_api(fake.api(), DOMID).expect_err("dying refused");
    assert!(matches!(err, XenError::Dying { .. }));

    let err = XenDomain::with_api(fake.api(), DOMID + 1).expect_err("missing refused");
    assert!(matches!(err, XenError::NoSuchDomain { domid, .. } if domid == DOMID + 1));
}

#[test]
fn errno_mapping() {
    let op = "xc_domain_pause";
    assert!(matches!(
        XenError::from_errno(op, 1, libc::ESRCH),
        XenError::NoSuchDomain { .. }
    ));
    assert!(matches!(
        XenError::from_errno(op, 1, libc::EPERM),
        XenError::PermissionDenied { .. }
    ));
    assert!(matches!(
        XenError::from_errno(op, 1, libc::EACCES),
        XenError::PermissionDenied { .. }
    ));
    assert!(matches!(
        XenError::from_errno(op, 1, libc::EOPNOTSUPP),
        XenError::NotSupported { .. }
    ));
    let e = XenError::from_errno(op, 1, libc::ENOMEM);
    assert_eq!(e.errno(), Some(libc::ENOMEM));
    match BackendError::from(e) {
        BackendError::Os { op: o, source } => {
            assert_eq!(o, op);
            assert_eq!(source.raw_os_error(), Some(libc::ENOMEM));
        }
        other => panic!("unexpected {other:?}"),
    }
    match BackendError::from(XenError::from_errno(op, 1, libc::ESRCH)) {
        BackendError::Os { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::ESRCH)),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn failing_calls_surface_as_typed_backend_errors() {
    let (fake, mut dom) = open(64);
    fake.lock().fail.insert("xc_domain_pause", libc::EPERM);
    match dom.pause() {
        Err(BackendError::Os { op, source }) => {
            assert_eq!(op, "xc_domain_pause");
            assert_eq!(source.raw_os_error(), Some(libc::EPERM));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!dom.is_paused(), "a failed pause is not recorded");

    fake.lock()
        .fail
        .insert("xc_shadow_control(ENABLE_LOGDIRTY)", libc::EOPNOTSUPP);
    assert!(matches!(
        dom.start_dirty_log(),
        Err(BackendError::Unsupported(_))
    ));
}

#[test]
fn pause_and_resume_are_idempotent_and_adopt_an_existing_pause() {
    let (fake, mut dom) = open(64);
    assert!(!dom.is_paused());
    dom.pause().expect("pause");
    dom.pause().expect("pause again");
    assert_eq!(fake.lock().pause_count, 1);
    assert!(dom.is_paused());
    dom.resume().expect("resume");
    dom.resume().expect("resume again");
    assert_eq!(fake.lock().pause_count, 0);
    drop(dom);

    // Created paused (xl create -p): the handle owns that pause.
    fake.lock().pause_count = 1;
    let mut dom = XenDomain::with_api(fake.api(), DOMID).expect("opens");
    assert!(dom.is_paused());
    dom.resume().expect("resume");
    assert_eq!(fake.lock().pause_count, 0);
}

#[test]
fn harvest_converts_xen_layout_exactly_and_clears() {
    // 1000 pages: the Xen buffer is 125 bytes, not a multiple of 8, so the tail path is used.
    let (fake, mut dom) = open(1000);
    let mut b = DirtyBitmap::new(1000);
    assert!(matches!(
        dom.harvest_dirty(&mut b),
        Err(BackendError::BadState { .. })
    ));
    dom.start_dirty_log().expect("log on");
    let dirty = [0u64, 1, 7, 8, 63, 64, 65, 511, 512, 999];
    for &p in &dirty {
        fake.guest_write(p, 1);
    }
    let mut peeked = DirtyBitmap::new(1000);
    dom.peek_dirty(&mut peeked).expect("peek");
    assert_eq!(peeked.to_pfns(), dirty);
    assert_eq!(
        fake.lock().dirty.count(),
        dirty.len() as u64,
        "peek keeps bits"
    );

    dom.harvest_dirty(&mut b).expect("harvest");
    assert_eq!(b.to_pfns(), dirty);
    assert_eq!(fake.lock().dirty.count(), 0, "clean clears");

    // A second harvest ORs: old bits stay in `into`, new ones are added.
    fake.guest_write(300, 2);
    dom.harvest_dirty(&mut b).expect("harvest");
    assert_eq!(b.count(), dirty.len() as u64 + 1);
    let mut fresh = DirtyBitmap::new(1000);
    dom.harvest_dirty(&mut fresh).expect("harvest");
    assert_eq!(fresh.count(), 0);

    let mut wrong = DirtyBitmap::new(999);
    assert!(matches!(
        dom.harvest_dirty(&mut wrong),
        Err(BackendError::BadState { .. })
    ));
}

#[test]
fn start_dirty_log_restarts_a_log_left_on() {
    let (fake, mut dom) = open(128);
    fake.lock().logdirty = true; // left on by a crashed run: ENABLE gives EINVAL
    fake.guest_write(5, 1);
    dom.start_dirty_log().expect("restarts");
    let mut b = DirtyBitmap::new(128);
    dom.harvest_dirty(&mut b).expect("harvest");
    assert_eq!(b.count(), 0, "clean from the moment logging starts");
    // Starting again while on also starts from clean.
    fake.guest_write(6, 1);
    dom.start_dirty_log().expect("again");
    dom.harvest_dirty(&mut b).expect("harvest");
    assert_eq!(b.count(), 0);
    dom.stop_dirty_log().expect("off");
    assert!(!fake.lock().logdirty);
    dom.stop_dirty_log().expect("off twice is a no-op");
}

#[test]
fn a_failed_clean_loses_no_bits() {
    let (fake, mut dom) = open(4096);
    dom.start_dirty_log().expect("log on");
    for p in [3u64, 100, 2000, 4095] {
        fake.guest_write(p, 1);
    }
    // CLEAN clears all four in "Xen" but copies out only the first 16 bytes (pfns < 128).
    fake.lock().clean_partial_then_fail = Some(16);
    let mut b = DirtyBitmap::new(4096);
    assert!(dom.harvest_dirty(&mut b).is_err());
    assert_eq!(fake.lock().dirty.count(), 0, "Xen's log was cleared");
    // The bits copied out before the failure are kept and delivered by the next peek/harvest.
    let mut peek = DirtyBitmap::new(4096);
    dom.peek_dirty(&mut peek).expect("peek");
    assert_eq!(peek.to_pfns(), vec![3, 100]);
    fake.guest_write(50, 1);
    dom.harvest_dirty(&mut b).expect("harvest");
    assert_eq!(b.to_pfns(), vec![3, 50, 100]);
    let mut again = DirtyBitmap::new(4096);
    dom.harvest_dirty(&mut again).expect("harvest");
    assert_eq!(again.count(), 0, "merged-back bits are delivered once");
}

#[test]
fn a_failed_conversion_merges_the_cleared_bits_back() {
    let (fake, mut dom) = open(4096);
    dom.start_dirty_log().expect("log on");
    for p in [1u64, 64, 4000] {
        fake.guest_write(p, 1);
    }
    // The buffer Xen fills is 8 bytes short of the 512 the bitmap needs: CLEAN succeeds (and
    // clears Xen's log), the conversion into a 4096-page bitmap fails.
    fake.lock().short_buffer = 8;
    let mut b = DirtyBitmap::new(4096);
    match dom.harvest_dirty(&mut b) {
        Err(BackendError::BadState { reason, .. }) => assert!(reason.contains("504"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(b.count(), 0, "nothing half-delivered");
    assert_eq!(fake.lock().dirty.count(), 0, "Xen's log was cleared");
    fake.lock().short_buffer = 0;
    fake.guest_write(2, 1);
    dom.harvest_dirty(&mut b).expect("harvest");
    assert_eq!(
        b.to_pfns(),
        vec![1, 2, 64, 4000],
        "merged-back bits are delivered"
    );
}

#[test]
fn reads_are_batched_by_1024_in_order() {
    let (fake, mut dom) = open(3000);
    let pfns: Vec<u64> = (0..2500u64).map(|i| (i * 7) % 3000).collect();
    let mut seen = Vec::new();
    dom.read_pages(&pfns, &mut |i, page| {
        let page = page.expect("mappable");
        assert_eq!(page.len(), PAGE_SIZE);
        seen.push((i, pfn_of(page)));
        Ok(())
    })
    .expect("read");
    assert_eq!(fake.lock().map_batches, vec![1024, 1024, 452]);
    assert_eq!(seen.len(), 2500);
    for (k, &(i, pfn)) in seen.iter().enumerate() {
        assert_eq!(i, k);
        assert_eq!(pfn, pfns[k]);
    }
}

#[test]
fn unmappable_pages_are_none_not_a_failed_batch() {
    let (fake, mut dom) = open(2048);
    fake.lock().unmappable.extend([5u64, 1500]);
    let pfns: Vec<u64> = (0..2048).collect();
    let mut none = Vec::new();
    let mut some = 0;
    dom.read_pages(&pfns, &mut |i, page| {
        match page {
            None => none.push(i),
            Some(p) => {
                assert_eq!(pfn_of(p), pfns[i]);
                some += 1;
            }
        }
        Ok(())
    })
    .expect("read");
    assert_eq!(none, vec![5, 1500]);
    assert_eq!(some, 2046);
    // Pages Xen types as XTAB are not mapped at all.
    assert_eq!(fake.lock().map_batches, vec![1023, 1023]);
    assert_eq!(fake.lock().typed, 2048);

    // A page with data whose mapping fails is None too, and holes at the ends of a batch are
    // visited in order.
    fake.lock().map_fails.insert(7);
    fake.lock().unmappable.extend([0u64, 2047]);
    let mut order = Vec::new();
    dom.read_pages(&pfns, &mut |i, page| {
        order.push(i);
        if page.is_none() {
            none.push(i);
        }
        Ok(())
    })
    .expect("read");
    assert_eq!(order, (0..2048).collect::<Vec<_>>());
    assert_eq!(&none[2..], &[0, 5, 7, 1500, 2047]);

    // Writing needs every page.
    dom.pause().expect("pause");
    let data = vec![0u8; 2 * PAGE_SIZE];
    let err = dom
        .write_pages(&[4, 7], &data)
        .expect_err("pfn 7 unmappable");
    assert!(err.to_string().contains("pfn 0x7"), "{err}");
}

#[test]
fn visitor_errors_pass_through_and_stop_the_read() {
    let (_fake, mut dom) = open(2048);
    let pfns: Vec<u64> = (0..2048).collect();
    let mut calls = 0;
    let err = dom
        .read_pages(&pfns, &mut |i, _| {
            calls += 1;
            if i == 10 {
                Err(BackendError::Unsupported("stop".into()))
            } else {
                Ok(())
            }
        })
        .expect_err("visitor error");
    assert!(matches!(err, BackendError::Unsupported(ref s) if s == "stop"));
    assert_eq!(calls, 11);
}

#[test]
fn out_of_range_pfns_fail_before_any_mapping() {
    let (fake, mut dom) = open(100);
    let err = dom
        .read_pages(&[1, 2, 100], &mut |_, _| Ok(()))
        .expect_err("out of range");
    assert!(matches!(
        err,
        BackendError::PfnOutOfRange {
            pfn: 100,
            pages: 100
        }
    ));
    dom.pause().expect("pause");
    let err = dom
        .write_pages(&[u64::MAX], &[0u8; PAGE_SIZE])
        .expect_err("out of range");
    assert!(matches!(err, BackendError::PfnOutOfRange { .. }));
    assert!(fake.lock().map_batches.is_empty());
}

#[test]
fn writes_land_in_guest_memory_in_batches() {
    let (fake, mut dom) = open(3000);
    let pfns: Vec<u64> = (0..2100u64).rev().collect();
    let mut data = vec![0u8; pfns.len() * PAGE_SIZE];
    for (k, page) in data.chunks_mut(PAGE_SIZE).enumerate() {
        page.fill((k % 251) as u8);
    }
    assert!(matches!(
        dom.write_pages(&pfns, &data),
        Err(BackendError::BadState { .. })
    ));
    dom.pause().expect("pause");
    assert!(matches!(
        dom.write_pages(&pfns, &data[1..]),
        Err(BackendError::DataLength { .. })
    ));
    dom.write_pages(&pfns, &data).expect("write");
    let s = fake.lock();
    assert_eq!(s.map_batches, vec![1024, 1024, 52]);
    for (k, &pfn) in pfns.iter().enumerate() {
        let at = pfn as usize * PAGE_SIZE;
        assert!(s.memory[at..at + PAGE_SIZE]
            .iter()
            .all(|&b| b == (k % 251) as u8));
    }
}

#[test]
fn state_round_trips_between_two_domains() {
    let (src_fake, mut src) = open(64);
    src_fake.lock().hvm_context = (0..=255u8).cycle().take(3000).collect();
    src_fake.lock().params.insert(36, 1); // X87_FIP_WIDTH
    let mut blob = vec![0xEE]; // get_state appends
    src.get_state(&mut blob).expect("get");
    assert_eq!(blob[0], 0xEE);
    let blob = &blob[1..];

    let (dst_fake, mut dst) = open(64);
    dst_fake.lock().params.insert(1, 0xfeffc); // same STORE_PFN already: not set again
    dst_fake.lock().params.insert(17, 0x1234); // differs: set
    assert!(matches!(
        dst.set_state(blob),
        Err(BackendError::BadState { .. })
    ));
    dst.pause().expect("pause");
    dst.set_state(blob).expect("set");
    let d = dst_fake.lock();
    let s = src_fake.lock();
    assert_eq!(d.hvm_context, s.hvm_context);
    assert_eq!(d.tsc, s.tsc);
    assert_eq!(d.param_sets, vec![(17, 0xfeffd), (36, 1)]);
    drop(d);
    drop(s);

    assert!(matches!(
        dst.set_state(&blob[..blob.len() - 1]),
        Err(BackendError::InvalidState(_))
    ));
}

#[test]
fn resume_after_set_state_delivers_the_upcall_vector_to_every_vcpu() {
    let (src_fake, mut src) = open(64);
    let mut blob = Vec::new();
    src.get_state(&mut blob).expect("get");
    let _ = src_fake;

    let (fake, mut dom) = open(64);
    fake.lock().max_vcpu_id = 1;
    // No callback registered and no wake vector: nothing is injected, and no timer port is
    // raised either (a pending bit that no upcall delivers makes Xen drop later timer events).
    fake.lock().ports = vec![
        EvtchnStatus {
            status: 0,
            vcpu: 0,
            virq: 0,
        },
        EvtchnStatus {
            status: 4,
            vcpu: 0,
            virq: 0,
        },
    ];
    fake.lock().shared_info_frame = 9;
    let page = |f: &FakeHandle| f.lock().memory[9 * 4096..10 * 4096].to_vec();
    let before = page(&fake);
    dom.set_wake_vector(None);
    dom.pause().expect("pause");
    dom.set_state(&blob).expect("set");
    dom.resume().expect("resume");
    assert!(fake.lock().msis.is_empty());
    assert_eq!(dom.timers_raised(), 0);
    assert_eq!(page(&fake), before, "shared info written without a wake");

    // Vector callback 0xf3 registered (type 2 in bits 63..56).
    fake.lock().params.insert(0, (2 << 56) | 0xf3);
    dom.pause().expect("pause");
    dom.set_state(&blob).expect("set");
    dom.resume().expect("resume");
    assert_eq!(
        fake.lock().msis,
        vec![(0xFEE0_0000, 0xf3), (0xFEE0_0000 | 2 << 12, 0xf3)]
    );
    // Delivered before the unpause, so a halted vCPU is kicked before it is let run.
    assert_eq!(fake.lock().msis_while_paused, 2);
    // A plain pause/resume does not inject again.
    dom.pause().expect("pause");
    dom.resume().expect("resume");
    assert_eq!(fake.lock().msis.len(), 2);
    // Per-vCPU upcall registration (no CALLBACK_IRQ): the wake vector is used.
    fake.lock().params.insert(0, 0);
    dom.set_wake_vector(Some(0xf3));
    dom.pause().expect("pause");
    dom.set_state(&blob).expect("set");
    dom.resume().expect("resume");
    assert_eq!(fake.lock().msis.len(), 4);
}

#[test]
fn resume_after_set_state_raises_the_timer_virq_in_shared_info_before_the_wake() {
    let (src_fake, mut src) = open(64);
    let mut blob = Vec::new();
    src.get_state(&mut blob).expect("get");
    let _ = src_fake;

    let (fake, mut dom) = open(64);
    {
        let mut f = fake.lock();
        f.params.insert(0, (2 << 56) | 0xf3);
        let virq = |vcpu, virq| EvtchnStatus {
            status: 4,
            vcpu,
            virq,
        };
        let closed = EvtchnStatus {
            status: 0,
            vcpu: 0,
            virq: 0,
        };
        // Port 0 is never used; the timer on port 3 (vCPU 0), another VIRQ on port 6, and the
        // timer of a second vCPU on port 70 (word 1 of the pending array).
        f.ports = vec![closed; 71];
        f.ports[3] = virq(0, 0);
        f.ports[6] = virq(0, 1);
        f.ports[70] = virq(1, 0);
        f.shared_info_frame = 9;
    }
    dom.pause().expect("pause");
    dom.set_state(&blob).expect("set");
    let shinfo = |f: &FakeHandle| f.lock().memory[9 * 4096..10 * 4096].to_vec();
    let before = shinfo(&fake);
    dom.resume().expect("resume");
    let after = shinfo(&fake);
    // Exactly the two timer ports' pending bits were set; nothing else in the page changed.
    let mut changed = Vec::new();
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        for bit in 0..8 {
            if (a ^ b) & (1 << bit) != 0 {
                assert!(b & (1 << bit) != 0, "a bit was cleared at byte {i}");
                changed.push((i - 2048) * 8 + bit);
            }
        }
    }
    let was_set = |port: usize| before[2048 + port / 8] & (1 << (port % 8)) != 0;
    let want: Vec<usize> = [3, 70].into_iter().filter(|&p| !was_set(p)).collect();
    assert_eq!(changed, want, "pending bits raised");
    let pending = |port: usize| after[2048 + port / 8] & (1 << (port % 8)) != 0;
    assert!(pending(3) && pending(70), "timer ports not raised");
    assert_eq!(dom.timers_raised(), 1);
    assert_eq!(fake.lock().msis_while_paused, 1);
    // A plain pause/resume raises nothing.
    dom.pause().expect("pause");
    dom.resume().expect("resume");
    assert_eq!(dom.timers_raised(), 1);
    // No shared-info page mapped yet (an out-of-range gfn): nothing is written.
    fake.lock().shared_info_frame = u64::MAX;
    dom.pause().expect("pause");
    dom.set_state(&blob).expect("set");
    dom.resume().expect("resume");
    assert_eq!(dom.timers_raised(), 1);
}

#[test]
fn the_nic_is_the_documented_empty_one() {
    let (_f, mut dom) = open(64);
    colo_core::conformance::nic_absent(&mut dom).expect("no network path, said so");
}

#[test]
fn the_snapshot_splits_the_state_blob_into_platform_records() {
    use colo_core::Snapshot;
    let (fake, mut dom) = open(64);
    fake.lock().hvm_context = vec![0xAB; 300];
    fake.lock().params.insert(36, 1); // X87_FIP_WIDTH
    dom.pause().expect("pause");
    let p = dom.platform().expect("platform records");
    assert_eq!(p.hvm_context, vec![0xAB; 300]);
    assert!(p.hvm_params.contains(&(36, 1)), "{:?}", p.hvm_params);
    assert_eq!(p.tsc.khz, fake.lock().tsc.khz);
    assert!(matches!(
        crate::guest::platform(&[1, 2, 3]),
        Err(BackendError::InvalidState(_))
    ));
}

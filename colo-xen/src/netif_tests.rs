//! Tests of colo's netif backend against a frontend written here from netif.h's rules (what
//! Linux's netfront does): grants, requests, the event indices, then the backend's answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use proptest::prelude::*;

use super::*;
use crate::grant::{permit, write_entry, GrantEntry, GrantTable};

fn page() -> Vec<AtomicU32> {
    (0..1024).map(|_| AtomicU32::new(0)).collect()
}

/// The guest's memory: frames by gfn.
#[derive(Default, Clone)]
struct Guest {
    frames: HashMap<u64, Vec<u8>>,
    broken: Option<u64>,
}

impl GuestFrames for Guest {
    fn read(&mut self, gfn: u64, offset: usize, out: &mut [u8]) -> Result<(), FrameError> {
        if self.broken == Some(gfn) {
            return Err(FrameError {
                gfn,
                reason: "unmappable".into(),
            });
        }
        let f = self.frames.get(&gfn).ok_or(FrameError {
            gfn,
            reason: "no such frame".into(),
        })?;
        out.copy_from_slice(&f[offset..offset + out.len()]);
        Ok(())
    }
    fn write(&mut self, gfn: u64, offset: usize, data: &[u8]) -> Result<(), FrameError> {
        if self.broken == Some(gfn) {
            return Err(FrameError {
                gfn,
                reason: "unmappable".into(),
            });
        }
        let f = self.frames.get_mut(&gfn).ok_or(FrameError {
            gfn,
            reason: "no such frame".into(),
        })?;
        f[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// A netfront: its rings, one grant frame, and its own indices.
struct Front {
    tx: Vec<AtomicU32>,
    rx: Vec<AtomicU32>,
    gnt: Vec<AtomicU32>,
    guest: Guest,
    next_gref: u32,
    next_gfn: u64,
    tx_prod: u32,
    tx_rsp_cons: u32,
    rx_prod: u32,
    rx_rsp_cons: u32,
    next_id: u16,
    /// rx id → gfn of its buffer.
    rx_bufs: HashMap<u16, u64>,
}

fn set(w: &[AtomicU32], at: usize, v: u32) {
    w[at].store(v, Ordering::Release);
}
fn get(w: &[AtomicU32], at: usize) -> u32 {
    w[at].load(Ordering::Acquire)
}

impl Front {
    /// Rings initialised with every index at `start` (SHARED_RING_INIT uses 0; a large start
    /// exercises the wrap of the 32-bit indices).
    fn new(start: u32) -> Self {
        let f = Front {
            tx: page(),
            rx: page(),
            gnt: page(),
            guest: Guest::default(),
            next_gref: 8, // refs 0–7 reserved, as Linux does
            next_gfn: 0x1000,
            tx_prod: start,
            tx_rsp_cons: start,
            rx_prod: start,
            rx_rsp_cons: start,
            next_id: 0,
            rx_bufs: HashMap::new(),
        };
        for r in [&f.tx, &f.rx] {
            for at in 0..4 {
                set(r, at, start);
            }
            set(r, 1, start.wrapping_add(1)); // req_event
            set(r, 3, start.wrapping_add(1)); // rsp_event
        }
        f
    }

    fn grant(&mut self, readonly: bool, domid: u16) -> (u32, u64) {
        let (gref, gfn) = (self.next_gref, self.next_gfn);
        // Refs are reused round the table (every earlier use has been answered by then).
        self.next_gref = 8 + (self.next_gref - 8 + 1) % 504;
        self.next_gfn += 1;
        self.guest.frames.insert(gfn, vec![0; 4096]);
        write_entry(
            &self.gnt,
            gref,
            GrantEntry {
                flags: permit(readonly),
                domid,
                frame: gfn as u32,
            },
        );
        (gref, gfn)
    }

    fn tx_slot(&self, idx: u32, w: [u32; 3]) {
        let at = 16 + (idx % 256) as usize * 3;
        for (i, v) in w.into_iter().enumerate() {
            self.tx[at + i].store(v, Ordering::Relaxed);
        }
    }

    /// Queues `frame` (first slot at `offset` in its page, then whole pages), with `extras`
    /// extra-info slots; publishes only if `publish`.
    fn queue(
        &mut self,
        frame: &[u8],
        offset: usize,
        extras: u32,
        flags: u16,
        publish: bool,
    ) -> usize {
        let mut chunks = vec![&frame[..frame.len().min(4096 - offset)]];
        let mut rest = &frame[chunks[0].len()..];
        while !rest.is_empty() {
            let n = rest.len().min(4096);
            chunks.push(&rest[..n]);
            rest = &rest[n..];
        }
        for (i, c) in chunks.iter().enumerate() {
            let (gref, gfn) = self.grant(true, 0);
            let off = if i == 0 { offset } else { 0 };
            self.guest.frames.get_mut(&gfn).unwrap()[off..off + c.len()].copy_from_slice(c);
            let size = if i == 0 { frame.len() } else { c.len() } as u32;
            let mut fl = if i + 1 < chunks.len() {
                NETTXF_MORE_DATA
            } else {
                0
            };
            if i == 0 {
                fl |= flags;
                if extras > 0 {
                    fl |= NETTXF_EXTRA_INFO;
                }
            }
            let id = u32::from(self.next_id);
            self.next_id = self.next_id.wrapping_add(1);
            self.tx_slot(
                self.tx_prod,
                [gref, off as u32 | u32::from(fl) << 16, id | size << 16],
            );
            self.tx_prod = self.tx_prod.wrapping_add(1);
            if i == 0 {
                for e in 0..extras {
                    let more = if e + 1 < extras {
                        u32::from(EXTRA_FLAG_MORE)
                    } else {
                        0
                    };
                    self.tx_slot(self.tx_prod, [2 | more << 8, 0xdead, 0xbeef]);
                    self.tx_prod = self.tx_prod.wrapping_add(1);
                }
            }
        }
        if publish {
            set(&self.tx, 0, self.tx_prod);
        }
        chunks.len() + extras as usize
    }

    fn send(&mut self, frame: &[u8], offset: usize) -> usize {
        self.queue(frame, offset, 0, 0, true)
    }

    /// Answers published on the TX ring since the last look: (id, status).
    fn tx_answers(&mut self) -> Vec<(u16, i16)> {
        let prod = get(&self.tx, 2);
        let mut v = Vec::new();
        while self.tx_rsp_cons != prod {
            let w = self.tx[16 + (self.tx_rsp_cons % 256) as usize * 3].load(Ordering::Relaxed);
            v.push((w as u16, (w >> 16) as u16 as i16));
            self.tx_rsp_cons = self.tx_rsp_cons.wrapping_add(1);
        }
        set(&self.tx, 3, self.tx_rsp_cons.wrapping_add(1));
        v
    }

    fn post_rx(&mut self, n: usize, readonly: bool) {
        for _ in 0..n {
            let (gref, gfn) = self.grant(readonly, 0);
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            self.rx_bufs.insert(id, gfn);
            let at = 16 + (self.rx_prod % 256) as usize * 2;
            self.rx[at].store(u32::from(id), Ordering::Relaxed);
            self.rx[at + 1].store(gref, Ordering::Relaxed);
            self.rx_prod = self.rx_prod.wrapping_add(1);
        }
        set(&self.rx, 0, self.rx_prod);
    }

    /// Answers on the RX ring: (id, status, the bytes received when status > 0).
    fn rx_answers(&mut self) -> Vec<(u16, i16, Vec<u8>)> {
        let prod = get(&self.rx, 2);
        let mut v = Vec::new();
        while self.rx_rsp_cons != prod {
            let at = 16 + (self.rx_rsp_cons % 256) as usize * 2;
            let (w0, w1) = (
                self.rx[at].load(Ordering::Relaxed),
                self.rx[at + 1].load(Ordering::Relaxed),
            );
            let (id, offset, status) = (w0 as u16, (w0 >> 16) as usize, (w1 >> 16) as u16 as i16);
            let data = if status > 0 {
                let gfn = self.rx_bufs[&id];
                self.guest.frames[&gfn][offset..offset + status as usize].to_vec()
            } else {
                Vec::new()
            };
            v.push((id, status, data));
            self.rx_rsp_cons = self.rx_rsp_cons.wrapping_add(1);
        }
        set(&self.rx, 3, self.rx_rsp_cons.wrapping_add(1));
        v
    }

    fn rings(&self) -> (SharedRing<'_>, SharedRing<'_>, GrantTable<'_>) {
        (
            SharedRing::tx(&self.tx).unwrap(),
            SharedRing::rx(&self.rx).unwrap(),
            GrantTable::new(vec![&self.gnt]).unwrap(),
        )
    }

    fn backend(&self) -> NetifBackend {
        let (tx, rx, _) = self.rings();
        NetifBackend::attach(&tx, &rx, 0).unwrap()
    }

    fn poll(&mut self, be: &mut NetifBackend) -> Result<(TxPoll, Vec<Vec<u8>>), NetifError> {
        let mut got = Vec::new();
        let mut guest = self.guest.clone();
        let (tx, _, g) = self.rings();
        let p = be.poll_tx(&tx, &g, &mut guest, |f| got.push(f.to_vec()))?;
        Ok((p, got))
    }

    fn deliver(&mut self, be: &mut NetifBackend, frame: &[u8]) -> Result<Delivery, NetifError> {
        let mut guest = std::mem::take(&mut self.guest);
        let r = {
            let (_, rx, g) = self.rings();
            be.deliver(&rx, &g, &mut guest, frame)
        };
        self.guest = guest;
        r
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn frames_come_out_whole_in_order_and_every_slot_is_answered() {
    let mut f = Front::new(0);
    let mut be = f.backend();
    let frames = [pattern(60, 1), pattern(1514, 2), pattern(9000, 3)];
    assert_eq!(f.send(&frames[0], 0), 1);
    assert_eq!(
        f.send(&frames[1], 4000),
        2,
        "crosses its first page: 96 bytes, then 1418"
    );
    assert_eq!(f.send(&frames[2], 100), 3);
    let (p, got) = f.poll(&mut be).unwrap();
    assert_eq!(got, frames);
    assert_eq!(
        p,
        TxPoll {
            frames: 3,
            errors: 0,
            notify: true
        }
    );
    let answers = f.tx_answers();
    assert_eq!(answers, (0..6).map(|id| (id, RSP_OKAY)).collect::<Vec<_>>());
    assert_eq!(be.consumed().0, 6);
    // Nothing more: no frame, no answer, and the frontend is asked to notify at its next one.
    let (p, got) = f.poll(&mut be).unwrap();
    assert!(got.is_empty() && !p.notify);
    assert_eq!(get(&f.tx, 1), 7, "req_event");
}

#[test]
fn no_notification_when_the_frontend_did_not_ask() {
    let mut f = Front::new(0);
    let mut be = f.backend();
    f.send(&pattern(100, 0), 0);
    set(&f.tx, 3, 50); // rsp_event far ahead: the frontend polls by itself
    let (p, _) = f.poll(&mut be).unwrap();
    assert!(!p.notify);
}

#[test]
fn extra_info_slots_are_answered_null_and_skipped() {
    let mut f = Front::new(0);
    let mut be = f.backend();
    let frame = pattern(5000, 9);
    assert_eq!(f.queue(&frame, 0, 2, 0, true), 4);
    let (p, got) = f.poll(&mut be).unwrap();
    assert_eq!(got, vec![frame]);
    assert_eq!(p.frames, 1);
    let a = f.tx_answers();
    assert_eq!(
        a.iter().map(|x| x.1).collect::<Vec<_>>(),
        [RSP_OKAY, RSP_NULL, RSP_NULL, RSP_OKAY]
    );
    assert_eq!((a[0].0, a[3].0), (0, 1));
}

/// The one's-complement sum of `b` folded to 16 bits (not complemented).
fn ones_sum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

#[test]
fn blank_checksums_are_completed_for_tcp_over_ipv4_and_udp_over_ipv6() {
    use etherparse::PacketBuilder;
    let mut tcp = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(40000, 80, 12345, 1000)
        .write(&mut tcp, &pattern(700, 5))
        .unwrap();
    let mut udp = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv6([1; 16], [2; 16], 64)
        .udp(5000, 53)
        .write(&mut udp, &pattern(301, 6))
        .unwrap();
    // As a NIC offload sender leaves them: the field holds the pseudo-header sum.
    let mut blank_tcp = tcp.clone();
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&tcp[26..34]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((tcp.len() - 34) as u16).to_be_bytes());
    blank_tcp[34 + 16..34 + 18].copy_from_slice(&ones_sum(&pseudo).to_be_bytes());
    let mut blank_udp = udp.clone();
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&udp[22..54]);
    pseudo.extend_from_slice(&((udp.len() - 54) as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    blank_udp[54 + 6..54 + 8].copy_from_slice(&ones_sum(&pseudo).to_be_bytes());
    assert_ne!(blank_tcp, tcp);

    let mut f = Front::new(0);
    let mut be = f.backend();
    f.queue(
        &blank_tcp,
        3000,
        0,
        NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED,
        true,
    );
    f.queue(&blank_udp, 0, 0, NETTXF_CSUM_BLANK, true);
    f.queue(&tcp, 0, 0, 0, true); // not blank: left alone
    let (_, got) = f.poll(&mut be).unwrap();
    assert_eq!(got, vec![tcp.clone(), udp, tcp]);
}

#[test]
fn frames_fill_posted_buffers_and_wait_for_more() {
    let mut f = Front::new(0);
    let mut be = f.backend();
    let (_, rx, _) = f.rings();
    assert!(!be.push_rx(&rx), "nothing to publish");
    assert_eq!(
        f.deliver(&mut be, &pattern(64, 0)).unwrap(),
        Delivery::NoBuffer
    );
    assert_eq!(
        get(&f.rx, 1),
        1,
        "the frontend is asked to notify when it posts a buffer"
    );
    f.post_rx(4, false);
    let frames: Vec<Vec<u8>> = (0..5).map(|i| pattern(60 + i * 300, i as u8)).collect();
    for fr in &frames[..4] {
        assert_eq!(f.deliver(&mut be, fr).unwrap(), Delivery::Delivered);
    }
    assert_eq!(f.deliver(&mut be, &frames[4]).unwrap(), Delivery::NoBuffer);
    let (_, rx, _) = f.rings();
    assert!(be.push_rx(&rx));
    let got = f.rx_answers();
    assert_eq!(got.len(), 4);
    for (i, (id, status, data)) in got.into_iter().enumerate() {
        assert_eq!(id, i as u16);
        assert_eq!(status as usize, frames[i].len());
        assert_eq!(data, frames[i]);
    }
    assert_eq!(
        f.deliver(&mut be, &[0; 4097]),
        Err(NetifError::FrameTooBig { len: 4097 })
    );
}

#[test]
fn a_grant_that_does_not_permit_the_access_is_answered_error_and_the_ring_goes_on() {
    let mut f = Front::new(0);
    let mut be = f.backend();
    // TX: a request naming a ref beyond the table, then a good frame.
    f.tx_slot(0, [9999, 0, 7 | 60 << 16]);
    f.tx_prod = 1;
    f.send(&pattern(60, 1), 0);
    // TX: a ref granted to another domain.
    let (gref, _) = f.grant(true, 5);
    f.tx_slot(f.tx_prod, [gref, 0, 8 | 60 << 16]);
    f.tx_prod += 1;
    set(&f.tx, 0, f.tx_prod);
    let (p, got) = f.poll(&mut be).unwrap();
    assert_eq!(got, vec![pattern(60, 1)]);
    assert_eq!((p.frames, p.errors), (1, 2));
    assert_eq!(
        f.tx_answers(),
        vec![(7, RSP_ERROR), (0, RSP_OKAY), (8, RSP_ERROR)]
    );
    // RX: a read-only buffer, then a writable one.
    f.post_rx(1, true);
    f.post_rx(1, false);
    let d = f.deliver(&mut be, &pattern(60, 2)).unwrap();
    assert!(
        matches!(&d, Delivery::GuestFault(w) if w.contains("read-only")),
        "{d:?}"
    );
    assert_eq!(
        f.deliver(&mut be, &pattern(60, 3)).unwrap(),
        Delivery::Delivered
    );
    let (_, rx, _) = f.rings();
    be.push_rx(&rx);
    let a = f.rx_answers();
    assert_eq!(
        (a[0].1, a[1].1, a[1].2.clone()),
        (RSP_ERROR, 60, pattern(60, 3))
    );
    // A frame whose mapping fails is answered ERROR too.
    f.post_rx(1, false);
    f.guest.broken = Some(f.next_gfn - 1);
    assert!(
        matches!(f.deliver(&mut be, &[1; 60]).unwrap(), Delivery::GuestFault(w) if w.contains("unmappable"))
    );
}

#[test]
fn sizes_the_guest_got_wrong_drop_the_packet_only() {
    let mut f = Front::new(0);
    let mut be = f.backend();
    let (g1, _) = f.grant(true, 0);
    let (g2, _) = f.grant(true, 0);
    // First says 100 bytes in all, its fragment alone says 200.
    f.tx_slot(0, [g1, u32::from(NETTXF_MORE_DATA) << 16, 1 | 100 << 16]);
    f.tx_slot(1, [g2, 0, 2 | 200 << 16]);
    // A single slot crossing its page.
    f.tx_slot(2, [g1, 4000, 3 | 200 << 16]);
    f.tx_prod = 3;
    f.send(&pattern(80, 4), 0);
    let (p, got) = f.poll(&mut be).unwrap();
    assert_eq!(got, vec![pattern(80, 4)]);
    assert_eq!(p.errors, 2);
    assert_eq!(
        f.tx_answers(),
        vec![
            (1, RSP_ERROR),
            (2, RSP_ERROR),
            (3, RSP_ERROR),
            (0, RSP_OKAY)
        ]
    );
}

#[test]
fn a_broken_ring_is_an_error_naming_it() {
    let mut f = Front::new(0);
    let mut be = f.backend();
    set(&f.tx, 0, 257);
    assert_eq!(
        f.poll(&mut be).unwrap_err(),
        NetifError::Overrun {
            ring: "tx",
            req_prod: 257,
            req_cons: 0
        }
    );
    let (tx, rx, _) = f.rings();
    assert!(matches!(
        NetifBackend::attach(&tx, &rx, 0),
        Err(NetifError::Overrun { ring: "tx", .. })
    ));
    set(&f.tx, 0, 0);
    set(&f.rx, 0, 300);
    assert!(matches!(
        f.deliver(&mut be, &[0; 60]),
        Err(NetifError::Overrun { ring: "rx", .. })
    ));
    let short = &f.tx[..1000];
    assert_eq!(
        SharedRing::tx(short).unwrap_err(),
        NetifError::ShortPage {
            ring: "tx",
            words: 1000
        }
    );
}

#[test]
fn a_packet_of_too_many_slots_or_endless_extras_is_malformed() {
    let mut f = Front::new(0);
    let mut be = f.backend();
    let (g, _) = f.grant(true, 0);
    for i in 0..(MAX_SLOTS as u32 + 1) {
        f.tx_slot(i, [g, u32::from(NETTXF_MORE_DATA) << 16, i | 1 << 16]);
    }
    set(&f.tx, 0, MAX_SLOTS as u32 + 1);
    assert!(
        matches!(f.poll(&mut be), Err(NetifError::Malformed { at: 0, why }) if why.contains("more slots"))
    );

    let mut f = Front::new(0);
    let mut be = f.backend();
    f.tx_slot(0, [g, u32::from(NETTXF_EXTRA_INFO) << 16, 1 << 16]);
    for i in 1..8 {
        f.tx_slot(i, [2 | u32::from(EXTRA_FLAG_MORE) << 8, 0, 0]);
    }
    set(&f.tx, 0, 8);
    assert!(
        matches!(f.poll(&mut be), Err(NetifError::Malformed { why, .. }) if why.contains("extra-info"))
    );
}

#[test]
fn a_packet_published_in_part_waits_for_the_rest() {
    let mut f = Front::new(0);
    let mut be = f.backend();
    let frame = pattern(6000, 7);
    f.queue(&frame, 0, 0, 0, false);
    set(&f.tx, 0, 1); // only the first of its two slots
    let (p, got) = f.poll(&mut be).unwrap();
    assert!(got.is_empty() && p.frames == 0);
    assert_eq!(be.consumed().0, 0);
    assert_eq!(get(&f.tx, 1), 2, "notify when the next slot is published");
    set(&f.tx, 0, 2);
    let (_, got) = f.poll(&mut be).unwrap();
    assert_eq!(got, vec![frame]);
}

#[test]
fn indices_wrap_around_u32() {
    let mut f = Front::new(u32::MAX - 300);
    let mut be = f.backend();
    let mut sent = Vec::new();
    let mut got = Vec::new();
    for round in 0..20u32 {
        for i in 0..30u32 {
            let fr = pattern(50 + (i * 211 % 5000) as usize, round as u8);
            f.send(&fr, (i * 97 % 4096) as usize);
            sent.push(fr);
        }
        let (_, g) = f.poll(&mut be).unwrap();
        got.extend(g);
        f.tx_answers();
        f.post_rx(3, false);
        for _ in 0..3 {
            assert_eq!(
                f.deliver(&mut be, &[round as u8; 100]).unwrap(),
                Delivery::Delivered
            );
        }
        let (_, rx, _) = f.rings();
        be.push_rx(&rx);
        assert_eq!(f.rx_answers().len(), 3);
    }
    assert_eq!(got, sent);
    assert!(be.consumed().0 < 1000, "wrapped past zero");
}

#[test]
fn a_replica_attached_to_copied_rings_goes_on_exactly_as_the_primary() {
    let mut pvm = Front::new(0);
    let mut be = pvm.backend();
    for i in 0..10 {
        pvm.send(&pattern(1000 + i * 400, i as u8), i * 300);
    }
    pvm.poll(&mut be).unwrap();
    pvm.post_rx(5, false);
    for i in 0..3 {
        pvm.deliver(&mut be, &pattern(90, i)).unwrap();
    }
    let (_, rx, _) = pvm.rings();
    be.push_rx(&rx);
    // The checkpoint: rings, grant entries and memory copied; the guest's own indices too
    // (they are in its memory).
    let copy = |w: &Vec<AtomicU32>| -> Vec<AtomicU32> {
        w.iter()
            .map(|x| AtomicU32::new(x.load(Ordering::Relaxed)))
            .collect()
    };
    let mut svm = Front {
        tx: copy(&pvm.tx),
        rx: copy(&pvm.rx),
        gnt: copy(&pvm.gnt),
        guest: pvm.guest.clone(),
        rx_bufs: pvm.rx_bufs.clone(),
        ..Front::new(0)
    };
    (svm.next_gref, svm.next_gfn, svm.tx_prod, svm.tx_rsp_cons) =
        (pvm.next_gref, pvm.next_gfn, pvm.tx_prod, pvm.tx_rsp_cons);
    (svm.rx_prod, svm.rx_rsp_cons, svm.next_id) = (pvm.rx_prod, pvm.rx_rsp_cons, pvm.next_id);
    let mut replica = svm.backend();
    assert_eq!(replica.consumed(), be.consumed());
    // The same inputs from here on give the same outputs and the same ring bytes.
    for front_be in [(&mut pvm, &mut be), (&mut svm, &mut replica)] {
        let (f, b) = front_be;
        f.send(&pattern(3000, 42), 17);
        let (_, got) = f.poll(b).unwrap();
        assert_eq!(got, vec![pattern(3000, 42)]);
        assert_eq!(f.deliver(b, &pattern(77, 43)).unwrap(), Delivery::Delivered);
        let (_, rx, _) = f.rings();
        b.push_rx(&rx);
    }
    let words = |w: &Vec<AtomicU32>| {
        w.iter()
            .map(|x| x.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    };
    assert_eq!(words(&pvm.tx), words(&svm.tx));
    assert_eq!(words(&pvm.rx), words(&svm.rx));
    assert_eq!(pvm.rx_answers(), svm.rx_answers());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any sequence of frames (lengths, first-page offsets, extra slots, batch cuts) comes out
    /// whole and in order, and every slot is answered once.
    #[test]
    fn every_frame_comes_out_and_every_slot_is_answered(
        frames in proptest::collection::vec((1usize..9000, 0usize..4096, 0u32..3, any::<u8>()), 1..40),
        start in any::<u32>(),
        cut in 1usize..10,
    ) {
        let mut f = Front::new(start);
        let mut be = f.backend();
        let (mut sent, mut got, mut slots, mut answers) = (Vec::new(), Vec::new(), 0, 0);
        for (i, (len, off, extras, seed)) in frames.into_iter().enumerate() {
            let fr = pattern(len, seed);
            slots += f.queue(&fr, off, extras, 0, true);
            sent.push(fr);
            if i % cut == 0 {
                let (_, g) = f.poll(&mut be).unwrap();
                got.extend(g);
                answers += f.tx_answers().len();
            }
        }
        let (_, g) = f.poll(&mut be).unwrap();
        got.extend(g);
        answers += f.tx_answers().len();
        prop_assert_eq!(got, sent);
        prop_assert_eq!(answers, slots);
        prop_assert_eq!(be.consumed().0, start.wrapping_add(slots as u32));
    }
}

//! The kv guest's TCP service (`tcp.rs`) over the NIC rings: handshake with a per-VM ISN,
//! requests on the stream, FIN, RST, bad acknowledgements, the bounded connection table, and
//! the connection state living in guest RAM (a copied memory continues the connection).

use colo_core::Domain;
use colo_mock::tcp::{connections, ClientEvent, ConnState, TcpClientConn, CONN_SLOTS};
use colo_mock::{
    build_tcp, parse_tcp, ClientAddr, KvConfig, KvOp, KvRequest, KvStatus, MockConfig, MockDomain,
    TcpFlags, Workload, GUEST_IP, GUEST_MAC, KV_PORT,
};
use std::time::{Duration, Instant};

fn me(port: u16) -> ClientAddr {
    ClientAddr {
        mac: [2, 0, 0, 0, 0, 0x42],
        ip: [10, 0, 0, 42],
        port,
    }
}

fn cfg() -> KvConfig {
    KvConfig {
        table_pages: 16,
        ..KvConfig::default()
    }
}

fn guest(seed: u64) -> MockDomain {
    let mut d = MockDomain::create(MockConfig::new(1024, Workload::Kv(cfg()), seed)).unwrap();
    d.resume().unwrap();
    d
}

/// Injects `f` and returns the frames the guest emitted once it consumed it.
fn exchange(d: &mut MockDomain, f: &[u8]) -> Vec<Vec<u8>> {
    let seq = d.rx_next_seq();
    assert!(d.inject(seq, f).unwrap(), "RX ring full");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    loop {
        d.drain_tx(&mut |f| out.push(f.to_vec())).unwrap();
        if d.rx_consumed() > seq {
            d.drain_tx(&mut |f| out.push(f.to_vec())).unwrap();
            return out;
        }
        assert!(Instant::now() < deadline, "guest stopped consuming");
        std::thread::yield_now();
    }
}

/// All of guest RAM (pauses the guest for the copy).
fn ram_of(d: &mut MockDomain) -> Vec<u8> {
    d.pause().unwrap();
    let r = d.ram().unwrap().to_vec();
    d.resume().unwrap();
    r
}

fn one(d: &mut MockDomain, f: &[u8]) -> Vec<u8> {
    let mut v = exchange(d, f);
    assert_eq!(v.len(), 1, "one segment expected");
    v.pop().unwrap()
}

fn connect(d: &mut MockDomain, port: u16, iss: u32) -> TcpClientConn {
    let mut f = Vec::new();
    let mut c = TcpClientConn::open(me(port), iss, &mut f).unwrap();
    let synack = one(d, &f);
    assert_eq!(c.receive(&synack), ClientEvent::Open);
    c.ack(&mut f).unwrap();
    assert!(
        exchange(d, &f).is_empty(),
        "the handshake's ACK is not answered"
    );
    c
}

fn ask(
    d: &mut MockDomain,
    c: &mut TcpClientConn,
    id: u64,
    op: KvOp,
    k: &str,
    v: &str,
) -> (KvStatus, Vec<u8>) {
    let mut f = Vec::new();
    let req = KvRequest {
        id,
        op,
        key: k.as_bytes(),
        value: v.as_bytes(),
    };
    c.request(&req, &mut f).unwrap();
    let r = one(d, &f);
    assert_eq!(c.receive(&r), ClientEvent::Segment);
    let resp = c
        .next_response()
        .unwrap()
        .expect("a whole response in the segment");
    assert_eq!(resp.id, id);
    assert_eq!(c.next_response().unwrap(), None);
    (resp.status, resp.value)
}

#[test]
fn requests_on_a_connection_and_close() {
    let mut d = guest(1);
    let mut c = connect(&mut d, 40001, 0xffff_fff0);
    assert_eq!(ask(&mut d, &mut c, 1, KvOp::Put, "a", "x").0, KvStatus::Ok);
    assert_eq!(
        ask(&mut d, &mut c, 2, KvOp::Get, "a", ""),
        (KvStatus::Ok, b"x".to_vec())
    );
    assert_eq!(
        ask(&mut d, &mut c, 3, KvOp::Get, "b", "").0,
        KvStatus::NotFound
    );
    let ram = ram_of(&mut d);
    let t = connections(&ram, &cfg());
    assert_eq!(
        t.iter()
            .filter(|t| t.state == ConnState::Established)
            .count(),
        1
    );
    let mut f = Vec::new();
    c.fin(&mut f).unwrap();
    let finack = one(&mut d, &f);
    assert_eq!(c.receive(&finack), ClientEvent::Fin);
    c.ack(&mut f).unwrap();
    assert!(exchange(&mut d, &f).is_empty());
    let ram = ram_of(&mut d);
    assert!(connections(&ram, &cfg())
        .iter()
        .all(|t| t.state == ConnState::Free));
}

#[test]
fn isn_differs_per_vm_and_stream_is_otherwise_identical() {
    let (mut a, mut b) = (guest(1), guest(2));
    let mut f = Vec::new();
    let _ = TcpClientConn::open(me(40002), 5, &mut f).unwrap();
    let (sa, sb) = (one(&mut a, &f), one(&mut b, &f));
    let (va, vb) = (parse_tcp(&sa).unwrap(), parse_tcp(&sb).unwrap());
    assert!(va.flags.syn && va.flags.ack && vb.flags.syn);
    assert_eq!((va.ack, vb.ack), (6, 6));
    assert_ne!(va.seq, vb.seq, "two VMs picked the same ISN");
    // The same VM seed gives the same ISN (deterministic).
    let mut c = guest(1);
    assert_eq!(parse_tcp(&one(&mut c, &f)).unwrap().seq, va.seq);

    // B acknowledges A's ISN (what the SVM gets without alignment): B resets, A goes on.
    let mut ca = TcpClientConn::open(me(40002), 5, &mut Vec::new()).unwrap();
    assert_eq!(ca.receive(&sa), ClientEvent::Open);
    ca.ack(&mut f).unwrap();
    assert!(exchange(&mut a, &f).is_empty());
    let rst_frame = one(&mut b, &f);
    let rst = parse_tcp(&rst_frame).unwrap();
    assert!(rst.flags.rst && !rst.flags.ack);
    assert_eq!(rst.seq, va.seq.wrapping_add(1));
    assert_eq!(ask(&mut a, &mut ca, 9, KvOp::Put, "k", "v").0, KvStatus::Ok);
}

#[test]
fn copied_memory_continues_the_connection() {
    // A checkpoint carries the connection: a VM with another seed, given the first one's RAM
    // and registers, answers on the connection the first one opened.
    let mut a = guest(1);
    let mut c = connect(&mut a, 40003, 77);
    assert_eq!(ask(&mut a, &mut c, 1, KvOp::Put, "k", "v1").0, KvStatus::Ok);
    a.pause().unwrap();
    let ram = a.ram().unwrap().to_vec();
    let mut state = Vec::new();
    a.get_state(&mut state).unwrap();
    let mut b = MockDomain::create(MockConfig::new(1024, Workload::Kv(cfg()), 99)).unwrap();
    let pfns: Vec<u64> = (0..1024).collect();
    b.write_pages(&pfns, &ram).unwrap();
    b.set_state(&state).unwrap();
    b.resume().unwrap();
    assert_eq!(
        ask(&mut b, &mut c, 2, KvOp::Get, "k", ""),
        (KvStatus::Ok, b"v1".to_vec())
    );
}

#[test]
fn rst_frees_the_slot_and_strays_are_reset() {
    let mut d = guest(3);
    let mut c = connect(&mut d, 40004, 1000);
    let mut f = Vec::new();
    let rst = TcpFlags {
        rst: true,
        ..TcpFlags::default()
    };
    build_tcp(
        (&me(40004).mac, &me(40004).ip, 40004),
        (&GUEST_MAC, &GUEST_IP, KV_PORT),
        c.snd_nxt(),
        None,
        rst,
        &[],
        &mut f,
    )
    .unwrap();
    assert!(exchange(&mut d, &f).is_empty());
    assert!(connections(&ram_of(&mut d), &cfg())
        .iter()
        .all(|t| t.state == ConnState::Free));
    // The connection is gone: a request on it is reset.
    c.request(
        &KvRequest {
            id: 1,
            op: KvOp::Get,
            key: b"k",
            value: b"",
        },
        &mut f,
    )
    .unwrap();
    let r = one(&mut d, &f);
    assert_eq!(c.receive(&r), ClientEvent::Reset);
    // A RST for no connection is not answered; garbage is ignored.
    build_tcp(
        (&me(40005).mac, &me(40005).ip, 40005),
        (&GUEST_MAC, &GUEST_IP, KV_PORT),
        1,
        None,
        rst,
        &[],
        &mut f,
    )
    .unwrap();
    assert!(exchange(&mut d, &f).is_empty());
    assert!(exchange(&mut d, &[0xde, 0xad, 0xbe, 0xef]).is_empty());
    // Another port of the guest: reset? No: not the kv service, ignored.
    build_tcp(
        (&me(40005).mac, &me(40005).ip, 40005),
        (&GUEST_MAC, &GUEST_IP, 22),
        1,
        None,
        TcpFlags {
            syn: true,
            ..TcpFlags::default()
        },
        &[],
        &mut f,
    )
    .unwrap();
    assert!(exchange(&mut d, &f).is_empty());
}

#[test]
fn bad_length_prefix_resets_and_out_of_order_gets_an_ack() {
    let mut d = guest(4);
    let c = connect(&mut d, 40006, 1);
    let m = me(40006);
    let mut f = Vec::new();
    let guest_next = c.guest_isn.unwrap().wrapping_add(1);
    let ack = TcpFlags {
        ack: true,
        ..TcpFlags::default()
    };
    // Data beyond rcv_nxt: a bare ACK of where the guest is, and nothing taken.
    build_tcp(
        (&m.mac, &m.ip, m.port),
        (&GUEST_MAC, &GUEST_IP, KV_PORT),
        c.snd_nxt().wrapping_add(10),
        Some(guest_next),
        ack,
        b"zz",
        &mut f,
    )
    .unwrap();
    let a_frame = one(&mut d, &f);
    let a = parse_tcp(&a_frame).unwrap();
    assert_eq!(
        (a.ack, a.seq, a.payload.len()),
        (c.snd_nxt(), guest_next, 0)
    );
    // A request split over two segments is answered once complete.
    let mut whole = Vec::new();
    c.clone()
        .request(
            &KvRequest {
                id: 5,
                op: KvOp::Put,
                key: b"s",
                value: b"t",
            },
            &mut whole,
        )
        .unwrap();
    let payload = parse_tcp(&whole).unwrap().payload.to_vec();
    let (p1, p2) = payload.split_at(3);
    build_tcp(
        (&m.mac, &m.ip, m.port),
        (&GUEST_MAC, &GUEST_IP, KV_PORT),
        c.snd_nxt(),
        Some(guest_next),
        ack,
        p1,
        &mut f,
    )
    .unwrap();
    let a1_frame = one(&mut d, &f);
    let a1 = parse_tcp(&a1_frame).unwrap();
    assert_eq!((a1.ack, a1.payload.len()), (c.snd_nxt().wrapping_add(3), 0));
    build_tcp(
        (&m.mac, &m.ip, m.port),
        (&GUEST_MAC, &GUEST_IP, KV_PORT),
        c.snd_nxt().wrapping_add(3),
        Some(guest_next),
        ack,
        p2,
        &mut f,
    )
    .unwrap();
    let r = one(&mut d, &f);
    assert!(!parse_tcp(&r).unwrap().payload.is_empty());
    // A length no kv message has: the connection is reset.
    let next = c.snd_nxt().wrapping_add(payload.len() as u32);
    build_tcp(
        (&m.mac, &m.ip, m.port),
        (&GUEST_MAC, &GUEST_IP, KV_PORT),
        next,
        Some(
            parse_tcp(&r)
                .unwrap()
                .seq
                .wrapping_add(parse_tcp(&r).unwrap().payload.len() as u32),
        ),
        ack,
        &[0xff, 0xff, 1],
        &mut f,
    )
    .unwrap();
    let rst_frame = one(&mut d, &f);
    let rst = parse_tcp(&rst_frame).unwrap();
    assert!(rst.flags.rst);
    assert!(connections(&ram_of(&mut d), &cfg())
        .iter()
        .all(|t| t.state == ConnState::Free));
}

#[test]
fn connection_table_is_bounded() {
    let mut d = guest(5);
    let mut f = Vec::new();
    for i in 0..CONN_SLOTS as u16 {
        let _ = TcpClientConn::open(me(41000 + i), 1, &mut f).unwrap();
        assert!(parse_tcp(&one(&mut d, &f)).unwrap().flags.syn);
    }
    let mut c = TcpClientConn::open(me(42000), 1, &mut f).unwrap();
    let r = one(&mut d, &f);
    assert_eq!(c.receive(&r), ClientEvent::Reset);
    // A retransmitted SYN gets the same SYN-ACK.
    let _ = TcpClientConn::open(me(41000), 1, &mut f).unwrap();
    let again_frame = one(&mut d, &f);
    let again = parse_tcp(&again_frame).unwrap();
    assert!(again.flags.syn && again.flags.ack);
}

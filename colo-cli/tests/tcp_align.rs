//! TCP alignment end to end: a pair of in-process nodes over real loopback sockets running kv
//! guests whose TCP service picks a per-VM random ISN, a client opening N new TCP connections
//! through the primary's client hub, each doing a few requests and closing. Every response is
//! checked, the memories are compared byte for byte after every checkpoint, and the mismatch
//! checkpoints are counted with the secondary's aligner on and off (`NodeOptions::tcp_align`,
//! `--no-tcp-align`). The figures are printed (run with `--nocapture`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colo_cli::mock::build;
use colo_cli::node::{new_status, NodeOptions, PrimaryNode, SecondaryOutcome};
use colo_cli::tcpclient::TcpKvClient;
use colo_cli::testing::spawn_secondary;
use colo_core::policy::CheckpointPolicy;
use colo_core::Domain;
use colo_mock::{ClientAddr, KvOp, KvRequest, KvStatus};
use parking_lot::Mutex;

mod common;
use common::{node_options, scaled, spec, STEP};

type Snapshots = Arc<Mutex<HashMap<u64, (Vec<u8>, Vec<u8>)>>>;

#[derive(Debug)]
struct Outcome {
    connections: u64,
    requests: u64,
    checkpoints: u64,
    mismatch_checkpoints: u64,
    mismatches: u64,
    compared: usize,
    differing: Vec<u64>,
    /// The secondary's aligner: connections it learnt an offset for.
    aligned: u64,
    retransmits: u64,
}

/// Runs a pair while a client opens `conns` TCP connections one after another, each doing a
/// PUT, a GET of it and a GET of the previous connection's key, then closing.
fn run(tcp_align: bool, conns: u64) -> Outcome {
    let psnap: Snapshots = Arc::default();
    let ssnap: Snapshots = Arc::default();
    let mut sopts = NodeOptions {
        tcp_align,
        ..node_options()
    };
    let s2 = ssnap.clone();
    sopts.snapshot = Some(Arc::new(move |e, ram, st| {
        s2.lock().insert(e, (ram, st));
    }));
    let sguest = build(&spec(2, 8 << 20, 0.0)).unwrap();
    let sstatus = new_status();
    let secondary = spawn_secondary(sguest, sopts, sstatus.clone(), |node| node.run()).unwrap();

    // Periodic checkpoints are rare next to a connection's life, so most connections open and
    // close within one epoch: what a new connection costs shows in the mismatch checkpoints.
    let mut popts = NodeOptions {
        client_addr: Some("127.0.0.1:0".into()),
        policy: CheckpointPolicy {
            min_interval: Duration::from_millis(1),
            max_interval: Duration::from_millis(300),
        },
        ..node_options()
    };
    let p2 = psnap.clone();
    popts.snapshot = Some(Arc::new(move |e, ram, st| {
        p2.lock().insert(e, (ram, st));
    }));
    let mut pguest = build(&spec(1, 8 << 20, 0.0)).unwrap();
    pguest.resume().unwrap();
    let pstatus = new_status();
    let repl = secondary.addr.clone();
    let mut primary = PrimaryNode::connect(pguest, &repl, popts, pstatus.clone()).unwrap();
    let stop = primary.stop_flag();
    let hub = pstatus.lock().client_addr.clone().unwrap();

    let timeout = scaled(Duration::from_secs(10));
    let client = std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
        let mut c = TcpKvClient::connect(&hub, timeout)?;
        let mut requests = 0;
        let mut iss = 0x1234_5678u32;
        for i in 0..conns {
            let me = ClientAddr {
                mac: [2, 0, 0, 0, 0, 0x77],
                ip: [10, 0, 0, 77],
                port: 45000 + i as u16,
            };
            iss = iss.wrapping_mul(0x9E37_79B9).wrapping_add(i as u32);
            let mut conn = c.open(me, iss)?;
            let key = format!("conn{i}");
            let value = format!("value of connection {i}");
            let put = KvRequest {
                id: i * 10 + 1,
                op: KvOp::Put,
                key: key.as_bytes(),
                value: value.as_bytes(),
            };
            let r = c.call(&mut conn, &put)?;
            anyhow::ensure!(r.status == KvStatus::Ok, "PUT {key}: {:?}", r.status);
            let get = KvRequest {
                id: i * 10 + 2,
                op: KvOp::Get,
                key: key.as_bytes(),
                value: b"",
            };
            let r = c.call(&mut conn, &get)?;
            anyhow::ensure!(
                r.status == KvStatus::Ok && r.value == value.as_bytes(),
                "GET {key}: {:?} {:?}",
                r.status,
                String::from_utf8_lossy(&r.value)
            );
            if i > 0 {
                let prev = format!("conn{}", i - 1);
                let get = KvRequest {
                    id: i * 10 + 3,
                    op: KvOp::Get,
                    key: prev.as_bytes(),
                    value: b"",
                };
                let r = c.call(&mut conn, &get)?;
                let want = format!("value of connection {}", i - 1);
                anyhow::ensure!(
                    r.status == KvStatus::Ok && r.value == want.as_bytes(),
                    "GET {prev} on connection {i}: {:?}",
                    r.status
                );
                requests += 1;
            }
            requests += 2;
            c.close(conn)?;
        }
        Ok((requests, c.retransmits))
    });

    let deadline = Instant::now() + scaled(Duration::from_secs(300));
    while !client.is_finished() {
        assert!(Instant::now() < deadline, "the client did not finish");
        primary.step(STEP).unwrap();
    }
    let (requests, retransmits) = client.join().unwrap().unwrap();
    // A few periodic checkpoints more, so the last connections' state is compared too.
    let target = pstatus.lock().checkpoints + 3;
    while pstatus.lock().checkpoints < target {
        assert!(Instant::now() < deadline, "checkpoints too slow");
        primary.step(STEP).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    primary.run().unwrap();
    drop(primary);
    match secondary.join().unwrap() {
        SecondaryOutcome::Stopped => {}
        SecondaryOutcome::TookOver(_) => panic!("the secondary took over after an orderly stop"),
    }
    let (p, s) = (psnap.lock(), ssnap.lock());
    let (compared, differing) = common::compare_epochs(&p, &s);
    let st = pstatus.lock();
    let sst = sstatus.lock();
    Outcome {
        connections: conns,
        requests,
        checkpoints: st.checkpoints,
        mismatch_checkpoints: st.mismatch_checkpoints,
        mismatches: st.mismatches,
        compared,
        differing,
        aligned: sst.tcp_aligned,
        retransmits,
    }
}

fn print(label: &str, o: &Outcome) {
    println!(
        "tcp alignment {label}: {} new connections, {} requests answered correctly, {} \
         checkpoints, {} mismatch checkpoints ({:.2} per new connection), {} mismatched \
         frames, {} connections aligned by the secondary, {} client retransmits, {} \
         checkpoints compared byte for byte",
        o.connections,
        o.requests,
        o.checkpoints,
        o.mismatch_checkpoints,
        o.mismatch_checkpoints as f64 / o.connections as f64,
        o.mismatches,
        o.aligned,
        o.retransmits,
        o.compared
    );
}

#[test]
fn new_tcp_connections_cost_no_mismatch_checkpoint_with_alignment() {
    const N: u64 = 20;
    let on = run(true, N);
    let off = run(false, N);
    print("on", &on);
    print("off", &off);
    for o in [&on, &off] {
        assert!(o.compared >= 3, "compared only {} checkpoints", o.compared);
        assert!(
            o.differing.is_empty(),
            "SVM memory differed from the PVM's after checkpoints {:?}",
            o.differing
        );
    }
    // With alignment the SVM's answers equal the PVM's on every connection: no frame differs.
    // (A frame whose SVM twin comes later than the compare timeout on a loaded machine may
    // still force a checkpoint: that counts in mismatch_checkpoints, not in mismatches.)
    assert_eq!(on.mismatches, 0, "an aligned connection's frames differed");
    assert!(
        on.aligned >= N / 2,
        "the secondary aligned only {} of {N} connections",
        on.aligned
    );
    // Without it the SVM resets the handshake's ACK of the PVM's ISN: a mismatch, and a
    // checkpoint, for every connection whose handshake falls within one epoch.
    assert!(off.mismatches > 0, "unaligned connections never differed");
    assert_eq!(off.aligned, 0);
    assert!(
        off.mismatch_checkpoints > on.mismatch_checkpoints,
        "without alignment {} mismatch checkpoints, with it {}",
        off.mismatch_checkpoints,
        on.mismatch_checkpoints
    );
}

#[test]
fn a_connection_opened_in_the_last_epoch_continues_on_the_survivor() {
    use common::{Pair, PairConfig, Victim};
    // Periodic checkpoints far apart: the connection is opened, used, and the primary killed
    // all within one epoch, so the survivor's guest (the SVM) holds the connection in its own
    // sequence space and only the inherited offsets make it the client's.
    let mut cfg = PairConfig::new(11, Victim::Primary);
    cfg.output_divergence = 0.0;
    cfg.policy = CheckpointPolicy {
        min_interval: Duration::from_millis(1),
        max_interval: scaled(Duration::from_secs(30)),
    };
    let pair = Pair::start(&cfg).unwrap();
    let until = Instant::now() + scaled(Duration::from_secs(30));
    while !pair.pstatus.lock().protected {
        assert!(Instant::now() < until, "the pair never got protected");
        std::thread::sleep(Duration::from_millis(5));
    }
    let timeout = scaled(Duration::from_secs(10));
    let mut c = TcpKvClient::connect(&pair.client_addrs[0], timeout).unwrap();
    let me = |i: u16| ClientAddr {
        mac: [2, 0, 0, 0, 0, 0x78],
        ip: [10, 0, 0, 78],
        port: 46000 + i,
    };
    let put = KvRequest {
        id: 1,
        op: KvOp::Put,
        key: b"kept",
        value: b"across the failover",
    };
    // The premise: no checkpoint between the handshake and the kill. A frame held past the
    // comparator's timeout on a loaded machine forces one; then the connection is closed and
    // another one tried.
    let mut tries = 0;
    let mut conn = loop {
        tries += 1;
        let before = pair.pstatus.lock().checkpoints;
        let mut conn = c.open(me(tries), 0xffff_ff00).unwrap();
        assert_eq!(c.call(&mut conn, &put).unwrap().status, KvStatus::Ok);
        if pair.pstatus.lock().checkpoints == before {
            break conn;
        }
        assert!(
            tries < 10,
            "a checkpoint came within each of {tries} connections"
        );
        c.close(conn).unwrap();
    };
    let aligned = pair.sstatus.lock().tcp_aligned;
    assert_eq!(
        aligned, 1,
        "the secondary did not learn the connection's offset"
    );
    assert!(pair.switch.kill());
    c.switch_hub(&pair.client_addrs[1], scaled(Duration::from_secs(30)))
        .unwrap();
    let get = KvRequest {
        id: 2,
        op: KvOp::Get,
        key: b"kept",
        value: b"",
    };
    let r = c.call(&mut conn, &get).unwrap();
    assert_eq!(
        (r.status, r.value.as_slice()),
        (KvStatus::Ok, &b"across the failover"[..])
    );
    let put2 = KvRequest {
        id: 3,
        op: KvOp::Put,
        key: b"after",
        value: b"on the survivor",
    };
    assert_eq!(c.call(&mut conn, &put2).unwrap().status, KvStatus::Ok);
    c.close(conn).unwrap();
    let (rin, rout) = {
        let s = pair.sstatus.lock();
        (s.tcp_rewritten_in, s.tcp_rewritten_out)
    };
    println!(
        "failover: the connection carried on through the survivor ({rin} client segments and \
         {rout} guest segments rewritten with the inherited offset, {} client retransmits)",
        c.retransmits
    );
    assert!(
        rin >= 3 && rout >= 3,
        "the survivor rewrote {rin} in, {rout} out"
    );
    pair.check_snapshots().unwrap();
    drop(c);
    let (_, s) = pair.stop();
    assert!(matches!(s.unwrap(), common::SecondaryEnd::TookOver));
}

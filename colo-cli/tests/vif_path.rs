//! The Xen network path without Xen (feature `xen`, root): veth pairs and network namespaces
//! stand for the guests' vifs and the service bridge, real frames cross them.
//!
//! Each replica is a composite guest: mock memory and state (colo-mock) with an AF_PACKET NIC
//! (colo-xen's `VifGuest`) on a veth whose other end sits in a namespace of its own, where a
//! deterministic UDP responder plays the guest's service (the same MAC and address in both).
//! A client namespace holds the service bridge, with one veth port to each node's service
//! interface (`--service-if`). The client's frames go through the primary into the PVM's
//! namespace and are mirrored to the secondary, which injects them into the SVM's; the SVM's
//! answers travel back and are compared; only released PVM frames reach the client (a `who`
//! request is answered differently by each replica, and the client only ever hears the PVM).
//! Then the primary dies (its service port down, its link cut, its node stopped): the survivor
//! announces the guest (a gratuitous ARP seen on the client's bridge), and the client's requests
//! are answered again, now by the SVM.

#![cfg(feature = "xen")]

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use colo_cli::faultproxy::{FaultProxy, KillSwitch};
use colo_cli::mock::{build, MockSpec, WorkloadKind};
use colo_cli::netlab::{in_netns, ip, Lab, UdpResponder};
use colo_cli::node::{new_status, NodeOptions, PrimaryNode, SecondaryOutcome};
use colo_cli::status::Shared;
use colo_cli::testing::spawn_secondary;
use colo_core::Domain;
use colo_xen::{PacketPort, VifGuest, MAX_PORT_FRAME};
use common::scaled;

const GUEST_MAC: &str = "02:00:00:77:00:02";
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const SERVICE: &str = "10.77.0.2:7777";

fn guest(seed: u64, vif: &str) -> Result<VifGuest<colo_mock::MockDomain>> {
    let dom = build(&MockSpec {
        ram: 4 << 20,
        ram_file: None,
        workload: WorkloadKind::Kv,
        vm_seed: seed,
        memory_divergence: false,
        output_divergence: 0.0,
        dirty_rate: 0,
    })?;
    Ok(VifGuest::new(dom, vif)?)
}

/// The namespaces and links of one run.
struct Net {
    lab: Lab,
    client: String,
    pvm: String,
    svm: String,
    /// Root-namespace ends: the PVM's and SVM's vifs, the two service interfaces.
    vif_p: String,
    vif_s: String,
    svc_p: String,
    svc_s: String,
}

fn build_net(mut lab: Lab) -> Result<Net> {
    let n = |b: &str| lab.name(b);
    let (client, pvm, svm) = (n("cg"), n("pg"), n("sg"));
    let (vif_p, vif_s, svc_p, svc_s) = (n("vp"), n("vs"), n("sp"), n("ss"));
    let (vif_pq, vif_sq, svc_pq, svc_sq) = (n("vq"), n("vt"), n("sq"), n("st"));
    for ns in [&client, &pvm, &svm] {
        lab.netns(ns)?;
    }
    lab.veth(&vif_p, &vif_pq, &pvm, "eth0")?;
    lab.veth(&vif_s, &vif_sq, &svm, "eth0")?;
    lab.veth(&svc_p, &svc_pq, &client, &svc_pq)?;
    lab.veth(&svc_s, &svc_sq, &client, &svc_sq)?;
    for ns in [&pvm, &svm] {
        ip(&["-n", ns, "link", "set", "eth0", "address", GUEST_MAC])?;
        ip(&["-n", ns, "addr", "add", "10.77.0.2/24", "dev", "eth0"])?;
    }
    ip(&["-n", &client, "link", "add", "br0", "type", "bridge"])?;
    for port in [&svc_pq, &svc_sq] {
        ip(&["-n", &client, "link", "set", port, "master", "br0"])?;
    }
    ip(&["-n", &client, "addr", "add", "10.77.0.1/24", "dev", "br0"])?;
    ip(&["-n", &client, "link", "set", "br0", "up"])?;
    Ok(Net {
        lab,
        client,
        pvm,
        svm,
        vif_p,
        vif_s,
        svc_p,
        svc_s,
    })
}

/// Sends each request from the client namespace and waits for its answer (re-sending after a
/// quiet while: UDP, and a failover may lose a frame); returns the answers in order.
fn ask(ns: &str, requests: Vec<String>, budget: Duration) -> Result<Vec<String>> {
    in_netns(ns, move || {
        let sock = UdpSocket::bind("10.77.0.1:0")?;
        sock.connect(SERVICE)?;
        sock.set_read_timeout(Some(scaled(Duration::from_millis(500))))?;
        let mut answers = Vec::new();
        let mut buf = [0u8; 2048];
        for r in &requests {
            let until = Instant::now() + budget;
            let answer = loop {
                if Instant::now() > until {
                    bail!("no answer to `{r}` within {budget:?}");
                }
                sock.send(r.as_bytes())?;
                // Answers to an earlier copy of an earlier request are skipped.
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        let a = String::from_utf8_lossy(&buf[..n]).into_owned();
                        if a == format!("echo:{r}")
                            || (r.starts_with("who") && a.starts_with("who:"))
                        {
                            break a;
                        }
                    }
                    Err(_) => continue,
                }
            };
            answers.push(answer);
        }
        Ok(answers)
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// Watches the client's bridge for a gratuitous ARP for the guest; returns when seen.
fn watch_garp(ns: &str, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<Result<bool>>> {
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let h = in_netns(ns, move || {
        let port = PacketPort::open("br0")?;
        let _ = ready_tx.send(());
        let mut buf = vec![0u8; MAX_PORT_FRAME];
        while !stop.load(Ordering::Relaxed) {
            match port.recv(&mut buf)? {
                Some(n) if n >= 42 => {
                    let f = &buf[..n];
                    let garp = f[12..14] == [0x08, 0x06]
                        && f[0..6] == [0xff; 6]
                        && f[28..32] == GUEST_IP
                        && f[38..42] == GUEST_IP;
                    if garp {
                        return Ok(true);
                    }
                }
                Some(_) => {}
                None => {
                    port.wait(Duration::from_millis(50))?;
                }
            }
        }
        Ok(false)
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("the ARP watcher did not start")?;
    Ok(h)
}

fn wait_for(what: &str, budget: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let until = Instant::now() + budget;
    while !f() {
        if Instant::now() > until {
            bail!("{what}: not within {budget:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn options(service_if: &str) -> NodeOptions {
    let mut o = common::node_options();
    o.service_if = Some(service_if.to_string());
    o
}

#[test]
fn frames_go_through_colo_and_the_survivor_serves_after_a_failover() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let Some(lab) = Lab::new() else { return };
    let net = build_net(lab).expect("the lab network");
    run(&net).expect("the network path");
    drop(net.lab);
}

fn run(net: &Net) -> Result<()> {
    let addr: SocketAddr = SERVICE.parse()?;
    let _pvm = UdpResponder::start(&net.pvm, addr, "pvm")?;
    let _svm = UdpResponder::start(&net.svm, addr, "svm")?;

    // The secondary, behind a proxy that the test cuts to kill the primary.
    let end = Arc::new(AtomicBool::new(false));
    let status_s = new_status();
    let end2 = end.clone();
    let sec = spawn_secondary(
        guest(2, &net.vif_s)?,
        options(&net.svc_s),
        status_s.clone(),
        move |node| {
            stop_when(&end2, node.stop_flag());
            match node.run()? {
                SecondaryOutcome::Stopped => bail!("the secondary stopped without a takeover"),
                SecondaryOutcome::TookOver(mut p) => {
                    stop_when(&end2, p.stop_flag());
                    p.run()?;
                    Ok(())
                }
            }
        },
    )?;
    let switch = KillSwitch::new();
    let proxy = FaultProxy::start(sec.addr.parse()?, switch.clone(), 1)?;
    let status_p: Shared = new_status();
    let mut g = guest(1, &net.vif_p)?;
    g.resume()?;
    let popts = options(&net.svc_p);
    let mut primary = PrimaryNode::connect(g, &proxy.addr().to_string(), popts, status_p.clone())?;
    let pstop = primary.stop_flag();
    let prim = std::thread::spawn(move || primary.run());

    let budget = scaled(Duration::from_secs(20));
    wait_for("two checkpoints", budget, || {
        status_p.lock().checkpoints >= 2
    })?;

    // Through the primary: echoes, and `who` answered by the PVM only.
    let reqs: Vec<String> = (0..30)
        .map(|i| {
            if i % 6 == 5 {
                format!("who {i}")
            } else {
                format!("req {i}")
            }
        })
        .collect();
    let answers = ask(&net.client, reqs.clone(), budget)?;
    for (r, a) in reqs.iter().zip(&answers) {
        if r.starts_with("who") {
            assert_eq!(a, "who:pvm", "the client heard the SVM (request `{r}`)");
        } else {
            assert_eq!(*a, format!("echo:{r}"));
        }
    }
    {
        let st = status_p.lock();
        eprintln!(
            "before the failover: {} checkpoints, {} mismatches, {} frames delivered",
            st.checkpoints, st.mismatches, st.frames_delivered
        );
        assert!(st.mismatches >= 1, "the `who` answers differ: a mismatch");
        assert!(
            st.frames_delivered >= 30,
            "{} delivered",
            st.frames_delivered
        );
    }

    // The primary dies: its host leaves the service network, the link breaks, the node stops.
    let seen_stop = Arc::new(AtomicBool::new(false));
    let garp = watch_garp(&net.client, seen_stop.clone())?;
    ip(&["link", "set", &net.svc_p, "down"])?;
    switch.kill();
    pstop.store(true, Ordering::Relaxed);
    let _ = prim.join();
    wait_for("the takeover", budget, || status_s.lock().role == "primary")?;
    let stopper = {
        let s = seen_stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(budget);
            s.store(true, Ordering::Relaxed);
        })
    };
    let announced = garp
        .join()
        .map_err(|_| anyhow::anyhow!("the ARP watcher panicked"))??;
    assert!(
        announced,
        "no gratuitous ARP for the guest on the service bridge"
    );

    // The same service, now from the SVM.
    let reqs: Vec<String> = vec!["after 1".into(), "who after".into(), "after 2".into()];
    let answers = ask(&net.client, reqs, budget)?;
    assert_eq!(answers, ["echo:after 1", "who:svm", "echo:after 2"]);

    end.store(true, Ordering::Relaxed);
    seen_stop.store(true, Ordering::Relaxed);
    sec.join()?;
    let _ = stopper;
    Ok(())
}

/// Sets `flag` once `end` is set (a watcher thread).
fn stop_when(end: &Arc<AtomicBool>, flag: Arc<AtomicBool>) {
    let end = end.clone();
    std::thread::spawn(move || {
        while !end.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        flag.store(true, Ordering::Relaxed);
    });
}

/// Round trips of one UDP request each from the client namespace: the sorted latencies.
fn round_trips(ns: &str, n: usize) -> Result<Vec<Duration>> {
    in_netns(ns, move || {
        let sock = UdpSocket::bind("10.77.0.1:0")?;
        sock.connect(SERVICE)?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 2048];
        let mut times = Vec::with_capacity(n);
        // Warm-up (ARP, caches).
        for _ in 0..20 {
            sock.send(b"warm")?;
            let _ = sock.recv(&mut buf);
        }
        for i in 0..n {
            let req = format!("req {i}");
            let t = Instant::now();
            sock.send(req.as_bytes())?;
            loop {
                let k = sock.recv(&mut buf).context("no answer")?;
                if buf[..k] == *format!("echo:{req}").as_bytes() {
                    break;
                }
            }
            times.push(t.elapsed());
        }
        times.sort();
        Ok(times)
    })?
    .join()
    .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

fn pct(v: &[Duration], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6
}

/// Frames/s from one AF_PACKET port to another across a veth pair, and the same number of UDP
/// datagrams through the kernel's stack between two namespaces over a veth (the baseline).
fn port_pair_rate(lab: &mut Lab, frames: usize) -> Result<(f64, f64)> {
    let (a, b) = (lab.name("ba"), lab.name("bb"));
    let host = lab.name("bh");
    lab.netns(&host)?;
    lab.veth(&a, &b, &host, "eth0")?;
    let rx_ns = host.clone();
    // AF_PACKET: a → veth → eth0 in the namespace, read there by a port.
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let reader = in_netns(&rx_ns, move || {
        let p = PacketPort::open("eth0")?;
        let _ = ready_tx.send(());
        let mut buf = vec![0u8; MAX_PORT_FRAME];
        let (mut got, mut first, mut last) = (0usize, None, Instant::now());
        while got < frames {
            match p.recv(&mut buf)? {
                Some(_) => {
                    got += 1;
                    last = Instant::now();
                    first.get_or_insert(last);
                }
                // Quiet for half a second: the sender is done (what it sent beyond the socket's
                // buffer was dropped).
                None if !p.wait(Duration::from_millis(500))? && first.is_some() => break,
                None => {}
            }
        }
        Ok((got, first.map_or(Duration::ZERO, |f| last - f)))
    })?;
    ready_rx.recv_timeout(Duration::from_secs(10))?;
    let tx = PacketPort::open(&a)?;
    let mut frame = vec![0u8; 64];
    frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 8]);
    frame[12..14].copy_from_slice(&[0x88, 0xb5]);
    let t = Instant::now();
    let mut sent = 0;
    while sent < frames {
        if tx.send(&frame)? {
            sent += 1;
        } else {
            std::thread::yield_now();
        }
    }
    let send_fps = frames as f64 / t.elapsed().as_secs_f64();
    let (got, span) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let port_fps = got as f64 / span.as_secs_f64().max(1e-9);
    println!(
        "vif bench: AF_PACKET: sent {frames} at {send_fps:.0} frames/s, received {got} ({:.1} %)",
        got as f64 * 100.0 / frames as f64
    );
    // Baseline: UDP datagrams of the same size between root and the namespace, same veth.
    ip(&["addr", "add", "10.78.0.1/24", "dev", &a])?;
    ip(&["-n", &host, "addr", "add", "10.78.0.2/24", "dev", "eth0"])?;
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let reader = in_netns(&host, move || {
        let s = UdpSocket::bind("10.78.0.2:9000")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 64];
        let (mut got, mut first, mut last) = (0usize, None, Instant::now());
        while got < frames && s.recv(&mut buf).is_ok() {
            got += 1;
            last = Instant::now();
            first.get_or_insert(last);
        }
        Ok((got, first.map_or(Duration::ZERO, |f| last - f)))
    })?;
    ready_rx.recv_timeout(Duration::from_secs(10))?;
    let s = UdpSocket::bind("10.78.0.1:0")?;
    let payload = [0u8; 22]; // 64-byte frames: 14 + 20 + 8 + 22
    let t = Instant::now();
    for _ in 0..frames {
        // ENOBUFS on a full queue: retry.
        while s.send_to(&payload, "10.78.0.2:9000").is_err() {
            std::thread::yield_now();
        }
    }
    let send_fps = frames as f64 / t.elapsed().as_secs_f64();
    let (got, span) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let udp_fps = got as f64 / span.as_secs_f64().max(1e-9);
    println!(
        "vif bench: kernel UDP: sent {frames} at {send_fps:.0} datagrams/s, received {got} ({:.1} %)",
        got as f64 * 100.0 / frames as f64
    );
    Ok((port_fps, udp_fps))
}

/// The vif bench: run with `cargo test --release -p colo-cli --features xen --test vif_path --
/// --ignored --nocapture` (root). Prints frames/s through an AF_PACKET port pair beside UDP
/// through the kernel over the same kind of veth, and the round trip of a UDP request through a
/// protected colo pair beside the same namespaces joined by a plain Linux bridge.
#[test]
#[ignore = "a benchmark: run it with --ignored --nocapture"]
fn bench_vif() {
    let Some(lab) = Lab::new() else { return };
    let mut net = build_net(lab).expect("the lab network");
    let (port_fps, udp_fps) = port_pair_rate(&mut net.lab, 200_000).expect("port pair");
    println!(
        "vif bench: 64-byte frames through an AF_PACKET port pair: {:.0} frames/s received \
         (kernel UDP over a veth, same run: {:.0} datagrams/s received)",
        port_fps, udp_fps
    );
    let n = 2000;
    let colo = colo_round_trips(&net, n).expect("through colo");
    // The same namespaces joined by a plain bridge: the PVM's vif and the primary's service
    // port as its ports.
    let br = net.lab.name("bx");
    ip(&["link", "add", &br, "type", "bridge"]).unwrap();
    let _br = BridgeGuard(br.clone());
    for port in [&net.vif_p, &net.svc_p] {
        ip(&["link", "set", port, "master", &br]).unwrap();
    }
    ip(&["link", "set", &br, "up"]).unwrap();
    let _pvm = UdpResponder::start(&net.pvm, SERVICE.parse().unwrap(), "pvm").unwrap();
    let plain = round_trips(&net.client, n).expect("through a bridge");
    println!(
        "vif bench: UDP request/response, {n} round trips: through colo (protected pair, \
         compared) p50 {:.0} µs p99 {:.0} µs; plain Linux bridge, same namespaces, same run: \
         p50 {:.0} µs p99 {:.0} µs; colo adds {:.0} µs at the median",
        pct(&colo, 0.5),
        pct(&colo, 0.99),
        pct(&plain, 0.5),
        pct(&plain, 0.99),
        pct(&colo, 0.5) - pct(&plain, 0.5)
    );
}

struct BridgeGuard(String);

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.0]);
    }
}

/// Round trips through a protected pair on the lab's network (stopped afterwards).
fn colo_round_trips(net: &Net, n: usize) -> Result<Vec<Duration>> {
    let addr: SocketAddr = SERVICE.parse()?;
    let _pvm = UdpResponder::start(&net.pvm, addr, "pvm")?;
    let _svm = UdpResponder::start(&net.svm, addr, "svm")?;
    let end = Arc::new(AtomicBool::new(false));
    let end2 = end.clone();
    let sec = spawn_secondary(
        guest(2, &net.vif_s)?,
        options(&net.svc_s),
        new_status(),
        move |node| {
            stop_when(&end2, node.stop_flag());
            let _ = node.run()?;
            Ok(())
        },
    )?;
    let status_p = new_status();
    let mut g = guest(1, &net.vif_p)?;
    g.resume()?;
    let mut primary = PrimaryNode::connect(g, &sec.addr, options(&net.svc_p), status_p.clone())?;
    let pstop = primary.stop_flag();
    let prim = std::thread::spawn(move || primary.run());
    wait_for("a checkpoint", scaled(Duration::from_secs(20)), || {
        status_p.lock().checkpoints >= 1
    })?;
    let times = round_trips(&net.client, n);
    {
        let st = status_p.lock();
        println!(
            "vif bench: the pair ran {} checkpoints ({} on mismatch), {} frames delivered",
            st.checkpoints, st.mismatch_checkpoints, st.frames_delivered
        );
    }
    pstop.store(true, Ordering::Relaxed);
    let _ = prim.join();
    end.store(true, Ordering::Relaxed);
    let _ = sec.join();
    times
}

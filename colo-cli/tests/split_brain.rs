//! Split brain, with real processes: `colo primary` and `colo secondary` over loopback with a
//! real etcd as their arbiter (Debian's etcd-server, started on loopback ports by the test), a
//! verifying kv client, and the failures that make both nodes see a silent peer: a cut
//! replication link, a primary cut from etcd, a stalled (SIGSTOPped) secondary, etcd down, a
//! killed primary. Each ends with one serving node and 0 lost acknowledged writes.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colo_cli::etcd_server::EtcdServer;
use colo_cli::faultproxy::{FaultProxy, KillSwitch};
use colo_cli::kvclient::KvClient;
use serde_json::Value;

mod common;
use common::speed::{scaled, scaled_secs, timeout_flags};

/// The lease TTL every trial uses on a quiet machine, s (a busy one stretches it, as it
/// stretches the heartbeat timeout: a live primary must not miss its renewals).
const QUIET_TTL: u64 = 2;
/// A hang guard for waits that a TTL or a heartbeat timeout bounds: many of them (on a quiet
/// machine; stretched by the measured slowness).
const BUDGET: Duration = Duration::from_secs(120);

struct Node {
    child: Child,
    status: PathBuf,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn status(&self) -> Value {
        std::fs::read(&self.status)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    fn wait_status(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + scaled(BUDGET);
        loop {
            let v = self.status();
            if f(&v) {
                return v;
            }
            assert!(
                Instant::now() < end,
                "gave up waiting for {what}: {v}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit; returns its exit code.
    fn wait_exit(&mut self, what: &str) -> i32 {
        let end = Instant::now() + scaled(BUDGET);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < end,
                "gave up waiting for {what}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

/// Distinct free loopback ports, all held while chosen.
fn ports<const N: usize>() -> [u16; N] {
    let l: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| l[i].local_addr().unwrap().port())
}

struct Trial {
    dir: PathBuf,
    primary: Node,
    secondary: Node,
    clients: Vec<String>,
    /// Between the primary and the secondary.
    link: FaultProxy,
    /// Between the primary and etcd.
    primary_etcd: FaultProxy,
    /// The nodes' lease TTL, s.
    ttl: u64,
}

fn spawn(dir: &Path, name: &str, args: &[String]) -> Node {
    let log = dir.join(format!("{name}.log"));
    let status = dir.join(format!("{name}.json"));
    let child = Command::new(env!("CARGO_BIN_EXE_colo"))
        .args(args)
        .arg("--status-file")
        .arg(&status)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Node { child, status, log }
}

fn start(etcd: &EtcdServer, tag: &str, extra_secondary: &[&str]) -> Trial {
    let dir = std::env::temp_dir().join(format!("colo-sb-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let [repl, c1, c2] = ports::<3>();
    let etcd_addr: SocketAddr = etcd.url().trim_start_matches("etcd://").parse().unwrap();
    let primary_etcd = FaultProxy::start(etcd_addr, KillSwitch::new(), 1).unwrap();
    let link = FaultProxy::start(
        format!("127.0.0.1:{repl}").parse().unwrap(),
        KillSwitch::new(),
        2,
    )
    .unwrap();
    let pair = format!("sb-{}-{tag}", std::process::id());
    let ttl = scaled_secs(QUIET_TTL);
    let timeouts = timeout_flags(1000);
    let common = |arbiter: &str, name: &str| -> Vec<String> {
        [
            "--ram",
            "8M",
            "--workload",
            "kv",
            "--output-divergence",
            "0.02",
            "--arbiter",
            arbiter,
            "--arbiter-pair",
            &pair,
            "--arbiter-ttl",
            &ttl.to_string(),
            "--name",
            &format!("{pair}-{name}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(timeouts.iter().cloned())
        .collect()
    };
    let mut sargs: Vec<String> = [
        "secondary",
        "--listen",
        &format!("127.0.0.1:{repl}"),
        "--client",
        &format!("127.0.0.1:{c2}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sargs.extend(common(&etcd.url(), "s"));
    sargs.extend(extra_secondary.iter().map(|s| s.to_string()));
    let secondary = spawn(&dir, "secondary", &sargs);
    let mut pargs: Vec<String> = [
        "primary",
        "--peer",
        &link.addr().to_string(),
        "--client",
        &format!("127.0.0.1:{c1}"),
        "--max-interval-ms",
        "50",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    pargs.extend(common(&format!("etcd://{}", primary_etcd.addr()), "p"));
    let primary = spawn(&dir, "primary", &pargs);
    primary.wait_status("protection", |v| v["protected"] == Value::Bool(true));
    primary.wait_status("the primary to hold the key", |v| {
        v["arbiter"]["holding"] == Value::Bool(true)
    });
    Trial {
        dir,
        primary,
        secondary,
        clients: vec![format!("127.0.0.1:{c1}"), format!("127.0.0.1:{c2}")],
        link,
        primary_etcd,
        ttl,
    }
}

fn deadline() -> Instant {
    Instant::now() + scaled(Duration::from_secs(60))
}

/// A verifying client of the pair (1.5 s per request on a quiet machine).
fn client(t: &Trial, port: u16) -> KvClient {
    KvClient::new(t.clients.clone(), port, scaled(Duration::from_millis(1500)))
}

/// Runs `n` random operations.
fn ops(client: &mut KvClient, rng: &mut u64, n: usize) {
    for _ in 0..n {
        client.random_op(rng, 64, deadline()).unwrap();
    }
}

/// The verdict every trial shares: no acknowledged write lost; then the trial's files go.
fn finish(t: Trial, client: &KvClient) {
    assert_eq!(
        client.stats.lost_acked_writes,
        0,
        "lost acknowledged writes; logs in {}",
        t.dir.display()
    );
    let _ = std::fs::remove_dir_all(&t.dir);
}

/// True when a node's log says it took over (the line that ends "; taking over").
fn took_over(log: &str) -> bool {
    log.lines().any(|l| l.trim_end().ends_with("; taking over"))
}

/// True when something answers a kv request on `addr` within a second (on a quiet machine).
fn answers(addr: &str) -> bool {
    let mut c = KvClient::new(
        vec![addr.to_string()],
        47000,
        scaled(Duration::from_millis(500)),
    );
    c.get(b"probe", Instant::now() + scaled(Duration::from_secs(1)))
        .is_ok()
}

#[test]
fn a_cut_replication_link_leaves_the_lease_holder_serving_alone() {
    let etcd = EtcdServer::start().unwrap();
    let mut t = start(&etcd, "cut", &[]);
    let mut client = client(&t, 43100);
    let mut rng = 0x5eed_0001u64;
    ops(&mut client, &mut rng, 100);
    // Both nodes alive; only the link fails (silently: both sockets stay open).
    t.link.stall(true);
    let code = t.secondary.wait_exit("the secondary to give up");
    assert_ne!(code, 0, "{}", t.secondary.log_text());
    let log = t.secondary.log_text();
    assert!(log.contains("not taking over"), "{log}");
    assert!(!took_over(&log), "the secondary took over:\n{log}");
    ops(&mut client, &mut rng, 200);
    client.verify_all(deadline()).unwrap();
    let p = t.primary.status();
    assert_eq!(p["role"], "primary", "{p}");
    assert!(!answers(&t.clients[1]), "the secondary answers clients");
    // `colo protect --arbiter` checks that the node it asks is the one serving.
    let name = p["arbiter"]["key"]
        .as_str()
        .unwrap()
        .split('/')
        .nth(2)
        .unwrap()
        .to_string();
    let protect = |pair: &str| {
        Command::new(env!("CARGO_BIN_EXE_colo"))
            .args([
                "protect",
                "--name",
                &format!("{name}-p"),
                "--peer",
                "127.0.0.1:1",
            ])
            .args(["--connect-timeout", "1", "--arbiter", &etcd.url()])
            .args(["--arbiter-pair", pair])
            .output()
            .unwrap()
    };
    let ok = protect(&name);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains("holds /colo/"), "{out}");
    let wrong = protect("another-pair");
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("another --arbiter-pair"), "{err}");
    finish(t, &client);
}

#[test]
fn a_primary_cut_from_etcd_stops_and_the_secondary_takes_over_after_expiry() {
    let etcd = EtcdServer::start().unwrap();
    let mut t = start(&etcd, "etcdcut", &[]);
    let mut client = client(&t, 43200);
    let mut rng = 0x5eed_0002u64;
    ops(&mut client, &mut rng, 100);
    t.primary_etcd.stall(true);
    t.primary_etcd.drop_connections();
    let cut = Instant::now();
    let s = t.secondary.wait_status("the secondary to take over", |v| {
        v["role"] == "primary" && v["arbiter"]["holding"] == Value::Bool(true)
    });
    let took = cut.elapsed();
    assert!(
        took >= Duration::from_secs(t.ttl) / 2,
        "the secondary took the key {took:?} after the cut: before the primary's lease could expire\n{s}"
    );
    ops(&mut client, &mut rng, 200);
    client.verify_all(deadline()).unwrap();
    // The old primary, alone and unsure of its lease, holds its output: nobody gets an answer
    // from it.
    assert!(!answers(&t.clients[0]), "the old primary answers clients");
    // Once it reaches etcd again it learns another node holds the key, and stops.
    t.primary_etcd.stall(false);
    let code = t.primary.wait_exit("the dropped primary to stop");
    assert_ne!(code, 0);
    assert!(t.primary.log_text().contains("dropped by the arbiter"));
    eprintln!(
        "primary cut from etcd: the secondary served {took:?} after the cut (ttl {} s)",
        t.ttl
    );
    finish(t, &client);
}

#[test]
fn a_stalled_secondary_wakes_up_dropped_and_does_not_take_over() {
    let etcd = EtcdServer::start().unwrap();
    let mut t = start(&etcd, "stall", &[]);
    let mut client = client(&t, 43300);
    let mut rng = 0x5eed_0003u64;
    ops(&mut client, &mut rng, 100);
    t.secondary.signal("-STOP");
    t.primary
        .wait_status("the primary to drop the stalled secondary", |v| {
            v["protected"] == Value::Bool(false) && v["failover_reason"].is_string()
        });
    ops(&mut client, &mut rng, 100);
    t.secondary.signal("-CONT");
    let code = t.secondary.wait_exit("the woken secondary to stop");
    assert_ne!(code, 0);
    assert!(!took_over(&t.secondary.log_text()));
    ops(&mut client, &mut rng, 100);
    client.verify_all(deadline()).unwrap();
    assert!(!answers(&t.clients[1]), "the secondary answers clients");
    finish(t, &client);
}

#[test]
fn with_etcd_down_the_pair_stays_protected_and_a_failure_has_no_takeover() {
    let mut etcd = EtcdServer::start().unwrap();
    let mut t = start(&etcd, "etcddown", &["--arbiter-unreachable", "exit"]);
    let mut client = client(&t, 43400);
    let mut rng = 0x5eed_0004u64;
    ops(&mut client, &mut rng, 50);
    etcd.stop();
    // Two TTLs without etcd: the primary's lease has certainly run down, but in lockstep
    // released output needs none, so the client goes on and checkpoints continue.
    let before = t.primary.status()["checkpoints"].as_u64().unwrap_or(0);
    let end = Instant::now() + Duration::from_secs(2 * t.ttl);
    while Instant::now() < end {
        ops(&mut client, &mut rng, 10);
    }
    let p = t.primary.wait_status("checkpoints to go on", |v| {
        v["checkpoints"].as_u64().unwrap_or(0) > before + 5
    });
    assert_eq!(p["protected"], Value::Bool(true), "{p}");
    assert!(p["arbiter"]["last_error"].is_string(), "{p}");
    client.verify_all(deadline()).unwrap();
    assert_eq!(client.stats.lost_acked_writes, 0);
    // Now the primary dies: without the arbiter there is no takeover.
    t.primary.child.kill().unwrap();
    let code = t.secondary.wait_exit("the secondary to give up");
    assert_eq!(code, 1);
    let log = t.secondary.log_text();
    assert!(log.contains("no takeover without the arbiter"), "{log}");
    assert!(!answers(&t.clients[1]));
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
fn a_killed_primarys_key_passes_to_the_secondary_after_its_ttl() {
    let etcd = EtcdServer::start().unwrap();
    let mut t = start(&etcd, "kill", &[]);
    let mut client = client(&t, 43500);
    let mut rng = 0x5eed_0005u64;
    ops(&mut client, &mut rng, 100);
    t.primary.child.kill().unwrap();
    let killed = Instant::now();
    ops(&mut client, &mut rng, 1);
    let served = killed.elapsed();
    ops(&mut client, &mut rng, 200);
    client.verify_all(deadline()).unwrap();
    t.secondary
        .wait_status("the survivor to publish its new role", |v| {
            v["role"] == "primary"
        });
    eprintln!(
        "primary killed, arbiter ttl {} s: first answer from the survivor {:.0} ms after the kill",
        t.ttl,
        served.as_secs_f64() * 1e3
    );
    finish(t, &client);
}

/// The first scenario without an arbiter: power fencing on both sides (each node's
/// `--fence-cmd` SIGKILLs the other) and a secondary that stalls for a second (SIGSTOP). The
/// primary fences it before it goes on alone, so the secondary never wakes to serve stale
/// state: one serving node, 0 lost acknowledged writes.
#[test]
fn with_fencing_on_both_sides_a_stalled_secondary_is_fenced_not_served_from() {
    let dir = std::env::temp_dir().join(format!("colo-sb-{}-fence", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let [repl, c1, c2] = ports::<3>();
    let ppid = dir.join("primary.pid");
    let common = [
        "--ram",
        "8M",
        "--workload",
        "kv",
        "--heartbeat-timeout-ms",
        "1000",
    ];
    let mut sargs: Vec<String> = ["secondary", "--listen", &format!("127.0.0.1:{repl}")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    sargs.extend(["--client".into(), format!("127.0.0.1:{c2}")]);
    sargs.extend([
        "--fence-cmd".into(),
        format!("kill -9 $(cat {})", ppid.display()),
    ]);
    sargs.extend(common.iter().map(|s| s.to_string()));
    let mut secondary = spawn(&dir, "secondary", &sargs);
    let mut pargs: Vec<String> = ["primary", "--peer", &format!("127.0.0.1:{repl}")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    pargs.extend(["--client".into(), format!("127.0.0.1:{c1}")]);
    pargs.extend(["--max-interval-ms".into(), "50".into()]);
    pargs.extend([
        "--fence-cmd".into(),
        format!("kill -9 {}", secondary.child.id()),
    ]);
    pargs.extend(common.iter().map(|s| s.to_string()));
    let primary = spawn(&dir, "primary", &pargs);
    std::fs::write(&ppid, primary.child.id().to_string()).unwrap();
    primary.wait_status("protection", |v| v["protected"] == Value::Bool(true));
    let clients = vec![format!("127.0.0.1:{c1}"), format!("127.0.0.1:{c2}")];
    let mut client = KvClient::new(clients.clone(), 43600, Duration::from_millis(1500));
    let mut rng = 0x5eed_0006u64;
    ops(&mut client, &mut rng, 100);
    secondary.signal("-STOP");
    primary.wait_status("the primary to go on alone", |v| {
        v["protected"] == Value::Bool(false) && v["failover_reason"].is_string()
    });
    let code = secondary.wait_exit("the fenced secondary to be gone");
    assert_eq!(code, -1, "the secondary was not killed by the fence");
    ops(&mut client, &mut rng, 200);
    client.verify_all(deadline()).unwrap();
    assert!(
        !answers(&clients[1]),
        "the fenced secondary answers clients"
    );
    assert_eq!(primary.status()["role"], "primary");
    assert_eq!(
        client.stats.lost_acked_writes,
        0,
        "logs in {}",
        dir.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

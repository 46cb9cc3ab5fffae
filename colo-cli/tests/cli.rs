//! Integration tests of the real `colo` binary: the demo's JSON summary (with and without a
//! failover) and its prompt, orderly end on SIGINT / SIGTERM, status and failover against a
//! running pair, a node waiting for its peer saying so once, `colo protect`'s answers (and a
//! node that keeps serving while it connects), `--verify` agreed at the handshake, config files
//! merged under flags, exit code 2 with one clear line for bad input, a save → dump → restore
//! round trip, and a stream without END reported truncated.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::speed::{scaled, scaled_ms, scaled_secs, timeout_flags};

const COLO: &str = env!("CARGO_BIN_EXE_colo");

/// A scratch directory, removed on drop; also the nodes' runtime dir (control sockets).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "colo-cli-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn colo(&self) -> Command {
        let mut c = Command::new(COLO);
        c.env("XDG_RUNTIME_DIR", &self.0)
            .env_remove("RUST_LOG")
            .current_dir(&self.0)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.colo().args(args).output().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port never handed out before in this test process (the kernel may give the
/// same free port to two binds in a row, and two addresses of one node must not collide).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let p = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&p) {
            given.push(p);
            return p;
        }
    }
}

/// Waits (at most 30 s on a quiet machine) for `node` to exit; its exit code. `what` names it
/// in the failure.
fn exit_code(node: &mut Node, what: &str) -> Option<i32> {
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    loop {
        if let Some(st) = node.0.try_wait().unwrap() {
            return st.code();
        }
        assert!(Instant::now() < deadline, "{what} did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everything `node` wrote to its (piped) stderr.
fn stderr_of(node: &mut Node) -> String {
    let mut err = String::new();
    if let Some(mut e) = node.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).unwrap();
    }
    err
}

/// A handshake refused over a setting that differs: the secondary refuses the connection,
/// says why (an ERROR naming `want`) and keeps waiting for its real primary; the primary says
/// the same in its status and that it was never protected.
fn refused_by_both(s: &Scratch, sec: &mut Node, pn: &str, want: &str) {
    let lines = stderr_lines(&mut sec.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains("ERROR") && l.contains(want) => {
                assert!(l.contains("waiting for the primary again"), "{l}");
                break;
            }
            Ok(l) => seen.push(l),
            Err(_) => panic!("the secondary never named `{want}`:\n{}", seen.join("\n")),
        }
    }
    assert!(
        sec.0.try_wait().unwrap().is_none(),
        "the secondary stopped after one refused connection"
    );
    let v = wait_for(s, pn, "refused", |v| v["failover_reason"].is_string());
    let reason = v["failover_reason"].as_str().unwrap();
    assert!(reason.contains(want), "primary: {v}");
    assert_eq!(v["protected"], false, "{v}");
    assert_eq!(v["ever_protected"], false, "{v}");
}

/// Writes a 0600 key file `name` of 32 `byte`s into the scratch directory (atomically, as an
/// operator rotating a key would) and returns its path.
fn key_file(s: &Scratch, name: &str, byte: u8) -> String {
    use std::os::unix::fs::PermissionsExt;
    let tmp = s.path(&format!("{name}.new"));
    std::fs::write(&tmp, [byte; 32]).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, s.path(name)).unwrap();
    s.path(name).display().to_string()
}

/// A node started with `args` and `--key-file key`, stdout discarded, stderr kept.
fn keyed_node(s: &Scratch, args: &[&str], key: &str) -> Node {
    Node(
        s.colo()
            .args(args)
            .args(["--key-file", key])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exit code 2 and exactly one non-empty stderr line containing every `needles`, no panic.
fn assert_usage_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one line, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` not in: {}", lines[0]);
    }
}

/// Exit code 2 after a node waited for `peer` in vain: one line saying it waits (naming the
/// address and the time left), retries that print nothing, then one error line naming it.
fn assert_unreachable(o: &Output, peer: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        2,
        "want a waiting line and an error, got: {err}"
    );
    assert!(
        lines[0].contains(&format!("cannot reach the peer at {peer} yet"))
            && lines[0].contains("giving up in"),
        "{err}"
    );
    assert!(
        lines[1].contains(peer) && lines[1].contains("error"),
        "{err}"
    );
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {v}"))
}

fn demo_json(s: &Scratch, extra: &[&str]) -> Value {
    // A generous heartbeat timeout: CI machines may be loaded during the initial sync.
    let timeout = scaled_ms(3000);
    let mut args = vec![
        "demo",
        "--json",
        "--ram",
        "16M",
        "--heartbeat-timeout-ms",
        &timeout,
    ];
    args.extend_from_slice(extra);
    let o = s.run(&args);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let line = stdout(&o);
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn demo_json_numbers_are_sane_and_consistent() {
    let s = Scratch::new("demo");
    let v = demo_json(&s, &["--duration", "3"]);
    let checkpoints = u(&v, "checkpoints");
    assert!(checkpoints >= 1, "{v}");
    assert_eq!(
        u(&v, "mismatch_checkpoints") + u(&v, "periodic_checkpoints") + u(&v, "manual_checkpoints"),
        checkpoints,
        "{v}"
    );
    assert_eq!(u(&v, "lost_acked_writes"), 0, "{v}");
    assert!(u(&v, "client_ops") > 0, "{v}");
    assert!(u(&v, "acked_writes") <= u(&v, "client_ops"), "{v}");
    assert!(u(&v, "pages_sent") >= u(&v, "backchannel_pages"), "{v}");
    assert!(u(&v, "bytes_sent") >= 4096 * u(&v, "pages_sent"), "{v}");
    let (p50, p99) = (
        v["pause_ms_p50"].as_f64().unwrap(),
        v["pause_ms_p99"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{v}");
    assert_eq!(u(&v, "verify_failures"), 0, "{v}");
    assert!(v["failover"].is_null(), "{v}");
    assert!(v["snapshot"].is_null(), "{v}");
}

#[test]
fn demo_kill_primary_fails_over_without_losing_writes() {
    let s = Scratch::new("kill");
    let v = demo_json(&s, &["--kill-primary-after", "2", "--duration", "4"]);
    let f = &v["failover"];
    assert_eq!(f["survivor"], "secondary", "{v}");
    assert!(f["detect_ms"].as_f64().is_some_and(|d| d >= 0.0), "{v}");
    assert!(f["takeover_ms"].as_f64().is_some(), "{v}");
    assert_eq!(u(&v, "lost_acked_writes"), 0, "{v}");
    assert!(u(&v, "acked_writes") > 0, "{v}");
}

/// Runs `colo demo` until it has checkpointed and served its client a while, then sends it
/// `signal` (to its whole process group when `group`, as a terminal's Ctrl-C does) and returns
/// its output and how long it took to exit. Fails if it is still running 20 s later.
fn demo_until_signal(s: &Scratch, signal: &str, group: bool) -> (Output, Duration) {
    use std::os::unix::process::CommandExt;
    let mut child = s
        .colo()
        .args([
            "demo",
            "--ram",
            "16M",
            "--heartbeat-timeout-ms",
            &scaled_ms(3000),
        ])
        .env("TMPDIR", &s.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id();
    let status_file = s.path(&format!("colo-demo-{pid}")).join("primary.json");
    let deadline = Instant::now() + scaled(Duration::from_secs(60));
    // Checkpoints, and the client served (a second answer delivered: its first op is done).
    loop {
        let st: Option<Value> = std::fs::read(&status_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
        if st.is_some_and(|v| n(&v, "checkpoints") >= 3 && n(&v, "frames_delivered") >= 2) {
            break;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("the demo never checkpointed: {}", stderr(&o));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let target = if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    let sent = Instant::now();
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), "--", &target])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{signal} {target} failed");
    // A safety kill after 20 s (the bug: about 21 s of ignoring Ctrl-C).
    let killer = {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(20);
            while Instant::now() < until {
                if d.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        });
        done
    };
    let o = child.wait_with_output().unwrap();
    let took = sent.elapsed();
    killer.store(true, Ordering::Relaxed);
    assert!(
        took < Duration::from_secs(20),
        "the demo ignored SIG{signal} for {took:?}; stderr: {}",
        stderr(&o)
    );
    // The nodes were stopped with it.
    for role in ["primary", "secondary"] {
        assert!(
            status(s, &format!("demo-{pid}-{role}")).is_none(),
            "the demo's {role} outlived it"
        );
    }
    (o, took)
}

#[test]
fn demo_stops_on_sigint_and_sigterm_with_its_summary_and_no_false_client_error() {
    let s = Scratch::new("demoint");
    for (signal, group) in [("INT", true), ("TERM", false)] {
        let (o, took) = demo_until_signal(&s, signal, group);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(0), "SIG{signal}: {err}");
        assert!(!err.contains("client failed"), "SIG{signal}: {err}");
        assert!(!err.contains("read-back failed"), "SIG{signal}: {err}");
        assert!(!err.contains("panicked"), "SIG{signal}: {err}");
        // It said how far it got before the signal.
        assert!(err.contains("the pair is protected"), "SIG{signal}: {err}");
        let out = stdout(&o);
        let v: Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("SIG{signal}: no JSON summary ({e}): {out}"));
        assert!(u(&v, "checkpoints") >= 3, "{v}");
        assert!(u(&v, "client_ops") > 0, "{v}");
        assert_eq!(u(&v, "lost_acked_writes"), 0, "{v}");
        eprintln!("SIG{signal}: the demo exited {took:?} after the signal");
    }
}

fn status(s: &Scratch, name: &str) -> Option<Value> {
    let o = s.run(&["status", "--name", name, "--json"]);
    if o.status.code() != Some(0) {
        return None;
    }
    serde_json::from_str(stdout(&o).trim()).ok()
}

fn wait_for(s: &Scratch, name: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    loop {
        let v = status(s, name);
        if let Some(v) = v.as_ref().filter(|v| ok(v)) {
            return v.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became {what}; last status: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn status_reaches_a_running_pair_and_failover_takes_over() {
    let s = Scratch::new("pair");
    let repl = format!("127.0.0.1:{}", free_port());
    let (pn, sn) = (
        format!("p{}", std::process::id()),
        format!("s{}", std::process::id()),
    );
    let common = [
        &["--ram".to_string(), "8M".into()][..],
        &timeout_flags(3000),
    ]
    .concat();
    let _sec = Node(
        s.colo()
            .args(["secondary", "--listen", &repl, "--name", &sn])
            .args(&common)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _pri = Node(
        s.colo()
            .args(["primary", "--peer", &repl, "--name", &pn])
            .args(&common)
            .args(["--connect-timeout", &scaled_secs(20).to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let p = wait_for(&s, &pn, "protected", |v| v["protected"] == true);
    assert_eq!(p["role"], "primary", "{p}");
    let sv = wait_for(&s, &sn, "a protected secondary", |v| {
        v["role"] == "secondary" && v["protected"] == true
    });
    assert!(sv["state"].is_string(), "{sv}");
    // The human form names the role too.
    let o = s.run(&["status", "--name", &pn]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("primary"), "{}", stdout(&o));

    let o = s.run(&["failover", "--name", &sn]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = wait_for(&s, &sn, "the primary after failover", |v| {
        v["role"] == "primary"
    });
    assert!(v["failover_reason"].is_string(), "{v}");
}

/// A `colo secondary` on `repl` named `name` with `ram`, output discarded.
fn secondary(s: &Scratch, repl: &str, name: &str, ram: &str) -> Node {
    Node(
        s.colo()
            .args(["secondary", "--listen", repl, "--name", name, "--ram", ram])
            .args(timeout_flags(2000))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A `colo primary` of `ram` named `name` replicating to `repl`, output discarded.
fn primary(s: &Scratch, repl: &str, name: &str, ram: &str) -> Node {
    Node(
        s.colo()
            .args(["primary", "--peer", repl, "--name", name, "--ram", ram])
            .args(timeout_flags(2000))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn protect_reports_the_nodes_answer_and_never_blocks_the_node() {
    let s = Scratch::new("protect");
    let id = std::process::id();
    let (pn, s1n) = (format!("pp{id}"), format!("ps1{id}"));
    let client = format!("127.0.0.1:{}", free_port());
    let repl1 = format!("127.0.0.1:{}", free_port());
    let s1 = secondary(&s, &repl1, &s1n, "8M");
    let _pri = Node(
        s.colo()
            .args(["primary", "--peer", &repl1, "--name", &pn, "--ram", "8M"])
            .args(["--client", &client])
            .args(timeout_flags(2000))
            .args(["--connect-timeout", &scaled_secs(20).to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&s, &pn, "protected", |v| v["protected"] == true);
    let protect = |name: &str, peer: &str, timeout: &str| {
        s.run(&[
            "protect",
            "--name",
            name,
            "--peer",
            peer,
            "--connect-timeout",
            timeout,
        ])
    };
    // A protected primary refuses, and so does a secondary: exit 1 with the node's reason.
    let o = protect(&pn, &repl1, "5");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("protecting already"), "{}", stderr(&o));
    let o = protect(&s1n, &repl1, "5");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is for a primary"), "{}", stderr(&o));
    // No such node: bad usage.
    assert_usage_error(&protect("nobody", &repl1, "5"), &["no colo node"]);

    // The secondary dies; the primary goes on alone.
    drop(s1);
    wait_for(&s, &pn, "unprotected", |v| {
        v["protected"] == false && v["failover_reason"].is_string()
    });

    // Towards an unreachable peer: exit 1 naming it, and the node answers its clients all along.
    let nowhere = format!("127.0.0.1:{}", free_port());
    // 4 s on a quiet machine: a client op must stay well under it while the node connects.
    let connect_timeout = Duration::from_secs(scaled_secs(4));
    let mut attempt = s
        .colo()
        .args(["protect", "--name", &pn, "--peer", &nowhere])
        .args(["--connect-timeout", &connect_timeout.as_secs().to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let budget = scaled(Duration::from_secs(30));
    let mut kv = colo_cli::kvclient::KvClient::new(vec![client.clone()], 44000, budget);
    let mut rng = 0x1234_5678_9abc_def1u64;
    let (mut ops, mut slowest) = (0u32, Duration::ZERO);
    let started = Instant::now();
    while attempt.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < connect_timeout * 5,
            "colo protect did not give up"
        );
        let t = Instant::now();
        kv.random_op(&mut rng, 64, Instant::now() + budget).unwrap();
        slowest = slowest.max(t.elapsed());
        ops += 1;
    }
    let o = attempt.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("cannot reach peer {nowhere}")),
        "{}",
        stderr(&o)
    );
    assert!(
        started.elapsed() >= connect_timeout,
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(ops > 0);
    assert!(
        slowest < connect_timeout / 2,
        "a client waited {slowest:?} while the node was connecting: the node loop blocked"
    );
    assert_eq!(kv.stats.lost_acked_writes, 0);

    // A secondary whose guest differs is refused at the handshake: exit 1 with the reason.
    let repl2 = format!("127.0.0.1:{}", free_port());
    let _s2 = secondary(&s, &repl2, &format!("ps2{id}"), "4M");
    let o = protect(&pn, &repl2, "20");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("geometry differs"), "{}", stderr(&o));

    // A good one: exit 0 once re-synchronisation started, and the pair is protected again.
    let repl3 = format!("127.0.0.1:{}", free_port());
    let _s3 = secondary(&s, &repl3, &format!("ps3{id}"), "8M");
    let o = protect(&pn, &repl3, "20");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("re-synchronising"), "{}", stdout(&o));
    let v = wait_for(&s, &pn, "protected again", |v| v["protected"] == true);
    assert_eq!(v["peer"], repl3.as_str(), "{v}");
    kv.verify_all(Instant::now() + budget).unwrap();
    assert_eq!(kv.stats.lost_acked_writes, 0);
}

#[test]
fn verify_on_one_node_only_is_refused_by_both() {
    let s = Scratch::new("verify");
    let repl = format!("127.0.0.1:{}", free_port());
    let pn = format!("vp{}", std::process::id());
    let mut sec = Node(
        s.colo()
            .args(["secondary", "--listen", &repl, "--ram", "8M"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let _pri = Node(
        s.colo()
            .args(["primary", "--peer", &repl, "--ram", "8M", "--verify"])
            .args([
                "--name",
                &pn,
                "--connect-timeout",
                &scaled_secs(20).to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    refused_by_both(
        &s,
        &mut sec,
        &pn,
        "--verify differs: the primary has it and the secondary does not",
    );
}

/// The real binaries on `--streams 3` (with a key): protected, checkpoints taken, the link on
/// three connections; a count on one node only is refused by both, naming both counts.
#[test]
fn streams_carry_a_pair_and_a_mismatch_is_refused_by_both() {
    let s = Scratch::new("streams");
    let key = key_file(&s, "streams.key", 7);
    let id = std::process::id();
    let (sn, pn) = (format!("ss{id}"), format!("sp{id}"));
    let repl = format!("127.0.0.1:{}", free_port());
    let tf = timeout_flags(2000);
    let tf: Vec<&str> = tf.iter().map(String::as_str).collect();
    let _sec = keyed_node(
        &s,
        &[
            &[
                "secondary",
                "--listen",
                &repl,
                "--name",
                &sn,
                "--ram",
                "8M",
                "--streams",
                "3",
            ][..],
            &tf,
        ]
        .concat(),
        &key,
    );
    let _pri = keyed_node(
        &s,
        &[
            &[
                "primary",
                "--peer",
                &repl,
                "--name",
                &pn,
                "--ram",
                "8M",
                "--streams",
                "3",
            ][..],
            &tf,
        ]
        .concat(),
        &key,
    );
    let v = wait_for(&s, &pn, "protected on three connections", |v| {
        v["protected"] == true && u(v, "checkpoints") >= 3 && u(v, "link_streams") == 3
    });
    assert_eq!(u(&v, "link_streams"), 3, "{v}");
    wait_for(&s, &sn, "the secondary on three connections", |v| {
        u(v, "link_streams") == 3
    });

    let repl = format!("127.0.0.1:{}", free_port());
    let pn = format!("sm{id}");
    let mut sec = Node(
        s.colo()
            .args(["secondary", "--listen", &repl, "--ram", "8M"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let _pri = Node(
        s.colo()
            .args(["primary", "--peer", &repl, "--ram", "8M", "--streams", "4"])
            .args([
                "--name",
                &pn,
                "--connect-timeout",
                &scaled_secs(20).to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Each side names both counts, its own first.
    refused_by_both(&s, &mut sec, &pn, "--streams differs");
    let v = wait_for(&s, &pn, "refused naming both counts", |v| {
        v["failover_reason"].is_string()
    });
    let why = v["failover_reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("the primary has --streams 4, the secondary has --streams 1"),
        "{why}"
    );
    assert_usage_error(
        &s.run(&["primary", "--peer", "127.0.0.1:1", "--streams", "17"]),
        &["--streams", "17"],
    );
}

/// Lines of a child's stderr, as they come.
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let err = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(err)) {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits up to `within` for a line containing `needle`; returns it and the lines before it.
fn wait_line(
    rx: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    within: Duration,
) -> (String, Vec<String>) {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return (l, seen),
            Ok(l) => seen.push(l),
            Err(_) => panic!("no line with `{needle}` within {within:?}; got: {seen:#?}"),
        }
    }
}

#[test]
fn a_node_waiting_for_its_peer_says_so_once() {
    let s = Scratch::new("wait");
    let repl = format!("127.0.0.1:{}", free_port());
    let pn = format!("wp{}", std::process::id());
    let common = [
        &["--ram".to_string(), "8M".into()][..],
        &timeout_flags(3000),
    ]
    .concat();
    let connect_timeout = scaled_secs(60);
    let mut pri = Node(
        s.colo()
            .args(["primary", "--peer", &repl, "--name", &pn])
            .args(&common)
            .args(["--connect-timeout", &connect_timeout.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = stderr_lines(&mut pri.0);
    // It says so at once (not after its timeout), naming the address and the time left.
    let (line, _) = wait_line(
        &lines,
        &format!("cannot reach the peer at {repl} yet"),
        scaled(Duration::from_secs(20)),
    );
    let left: u64 = line
        .split("giving up in ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no time left in: {line}"));
    assert!((1..=connect_timeout).contains(&left), "{line}");
    // Let it retry a while, quietly; then the secondary comes up and the pair forms.
    std::thread::sleep(Duration::from_millis(1500));
    let _sec = Node(
        s.colo()
            .args(["secondary", "--listen", &repl])
            .args(&common)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&s, &pn, "protected", |v| v["protected"] == true);
    drop(pri);
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(
        !rest.iter().any(|l| l.contains("cannot reach")),
        "the wait was announced more than once: {rest:#?}"
    );

    // A secondary waiting for its primary says so too.
    let port = free_port();
    let o = s.run(&[
        "secondary",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--name",
        "lonely",
        "--ram",
        "8M",
        "--connect-timeout",
        "1",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].contains(&format!(
            "waiting for the peer to connect to 127.0.0.1:{port}"
        )) && lines[0].contains("giving up in 1 s"),
        "{err}"
    );
    assert!(lines[1].contains("no peer connected"), "{err}");
}

#[test]
fn bad_input_exits_2_with_one_clear_line() {
    let s = Scratch::new("bad");
    assert_usage_error(&s.run(&["--bogus"]), &["--bogus"]);
    assert_usage_error(
        &s.run(&["primary", "--peer", "127.0.0.1:1", "--ram", "12Q"]),
        &["12Q"],
    );
    assert_usage_error(
        &s.run(&[
            "secondary",
            "--listen",
            "127.0.0.1:1",
            "--upcall-vector",
            "300",
        ]),
        &["--upcall-vector", "300", "16 to 255"],
    );
    assert_usage_error(
        &s.run(&["primary", "--peer", "127.0.0.1:1", "--key-file", "nokey"]),
        &["key file", "nokey"],
    );
    assert_usage_error(
        &s.run(&["secondary", "--config", "missing.toml"]),
        &["config file", "missing.toml"],
    );
    let port = free_port();
    let peer = format!("127.0.0.1:{port}");
    assert_unreachable(
        &s.run(&[
            "primary",
            "--peer",
            &peer,
            "--ram",
            "8M",
            "--connect-timeout",
            "1",
        ]),
        &peer,
    );
    assert_usage_error(&s.run(&["primary", "--ram", "8M"]), &["--peer"]);
    std::fs::write(s.path("bad.img"), b"definitely not a libxc stream").unwrap();
    assert_usage_error(
        &s.run(&["stream", "dump", "bad.img"]),
        &["bad.img", "malformed"],
    );
    assert_usage_error(&s.run(&["stream", "dump", "none.img"]), &["none.img"]);
}

#[cfg(not(feature = "xen"))]
#[test]
fn xen_backend_without_the_feature_is_a_clear_error() {
    let s = Scratch::new("xen");
    let want = "built without Xen support; rebuild with --features xen";
    assert_usage_error(
        &s.run(&[
            "primary",
            "--backend",
            "xen",
            "--domid",
            "1",
            "--peer",
            "x:1",
        ]),
        &[want],
    );
    assert_usage_error(
        &s.run(&["save", "--backend", "xen", "--domid", "1", "--out", "x"]),
        &[want],
    );
}

#[test]
fn network_path_flags_are_checked_and_a_missing_interface_is_named() {
    let s = Scratch::new("vif");
    let run = |extra: &[&str]| {
        let mut args = vec!["primary", "--peer", "127.0.0.1:1"];
        args.extend_from_slice(extra);
        s.run(&args)
    };
    assert_usage_error(
        &run(&["--vif", "lo", "--service-if", "lo"]),
        &["--vif and --service-if need --backend xen"],
    );
    let xen = ["--backend", "xen", "--domid", "1"];
    assert_usage_error(
        &run(&[&xen[..], &["--vif", "lo"]].concat()),
        &["--vif lo needs --service-if"],
    );
    assert_usage_error(
        &run(&[&xen[..], &["--service-if", "lo"]].concat()),
        &["--service-if lo needs --vif"],
    );
    assert_usage_error(
        &run(&[&xen[..], &["--vif", "colo-nosuch9", "--service-if", "lo"]].concat()),
        &["--vif colo-nosuch9", "no network interface `colo-nosuch9`"],
    );
    assert_usage_error(
        &run(&[&xen[..], &["--vif", "lo", "--service-if", "nosuch-svc"]].concat()),
        &[
            "--service-if nosuch-svc",
            "no network interface `nosuch-svc`",
        ],
    );
    assert_usage_error(
        &run(&[&xen[..], &["--client", "127.0.0.1:0"]].concat()),
        &["--client is the mock's network path", "--service-if"],
    );
}

#[test]
fn pv_vbd_flags_are_checked_and_a_bad_image_is_named() {
    let s = Scratch::new("pvvbd");
    let run = |extra: &[&str]| {
        let mut args = vec!["primary", "--peer", "127.0.0.1:1"];
        args.extend_from_slice(extra);
        s.run(&args)
    };
    let img = s.path("xvda.img");
    let img = img.to_str().unwrap();
    assert_usage_error(&run(&["--pv-vbd", img]), &["--pv-vbd needs --backend xen"]);
    let xen = ["--backend", "xen", "--domid", "1"];
    assert_usage_error(
        &run(&[&xen[..], &["--pv-vbd", img]].concat()),
        &["--pv-vbd", "no such image"],
    );
    std::fs::File::create(img).unwrap().set_len(4097).unwrap();
    assert_usage_error(
        &run(&[&xen[..], &["--pv-vbd", img]].concat()),
        &["is 4097 bytes, not a positive multiple of 4096"],
    );
    assert_usage_error(
        &run(&[&xen[..], &["--disk", "1M"]].concat()),
        &["--disk is the mock's disk", "--pv-vbd IMAGE"],
    );
}

/// Every key of the config file, from its own "unknown field" message.
fn config_keys() -> Vec<String> {
    let s = Scratch::new("keys");
    let p = s.path("k.toml");
    std::fs::write(&p, "zz_not_a_key = 1\n").unwrap();
    let e = format!("{:#}", colo_cli::config::load(&p).unwrap_err());
    let list = e
        .split("expected one of")
        .nth(1)
        .unwrap_or_else(|| panic!("no key list in: {e}"));
    let keys: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(keys.len() > 10, "{keys:?}");
    keys
}

#[test]
fn every_config_key_has_a_flag_and_every_help_has_examples() {
    let s = Scratch::new("help");
    let help = |args: &[&str]| {
        let o = s.run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        let h = stdout(&o);
        assert!(
            h.contains("Examples:"),
            "{args:?} --help has no examples:\n{h}"
        );
        h
    };
    let primary = help(&["primary", "--help"]);
    let secondary = help(&["secondary", "--help"]);
    for sub in [
        &["--help"][..],
        &["demo", "--help"],
        &["status", "--help"],
        &["failover", "--help"],
        &["save", "--help"],
        &["restore", "--help"],
        &["stream", "dump", "--help"],
    ] {
        help(sub);
    }
    for key in config_keys() {
        let flag = format!("--{} ", key.replace('_', "-"));
        assert!(
            primary.contains(&flag) || secondary.contains(&flag),
            "config key `{key}` has no flag {flag}"
        );
    }
}

#[test]
fn config_file_applies_and_flags_win() {
    let s = Scratch::new("cfg");
    let cfg = s.path("node.toml");
    let (p1, p2) = (free_port(), free_port());
    std::fs::write(
        &cfg,
        format!("peer = \"127.0.0.1:{p1}\"\nram = \"8M\"\nlisten = \"ignored by the primary\"\n"),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap();
    // From the file.
    let o = s.run(&["primary", "--config", cfg_s, "--connect-timeout", "1"]);
    assert_unreachable(&o, &format!("127.0.0.1:{p1}"));
    // The flag wins.
    let peer2 = format!("127.0.0.1:{p2}");
    let o = s.run(&[
        "primary",
        "--config",
        cfg_s,
        "--peer",
        &peer2,
        "--connect-timeout",
        "1",
    ]);
    assert_unreachable(&o, &peer2);
    // A bad value in the file names the file.
    std::fs::write(&cfg, "peer = \"127.0.0.1:1\"\nworkload = \"bogus\"\n").unwrap();
    let o = s.run(&["primary", "--config", cfg_s]);
    assert_usage_error(&o, &["node.toml", "bogus"]);
    // ... unless the flag overrides it.
    let o = s.run(&[
        "primary",
        "--config",
        cfg_s,
        "--workload",
        "kv",
        "--ram",
        "8M",
        "--connect-timeout",
        "1",
    ]);
    assert_unreachable(&o, "127.0.0.1:1");
}

fn dump_json(s: &Scratch, file: &Path) -> Value {
    let o = s.run(&["stream", "dump", "--json", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

#[test]
fn save_dump_restore_round_trip() {
    let s = Scratch::new("save");
    let img = s.path("vm.img");
    for workload in ["kv", "dirty"] {
        let o = s.run(&[
            "save",
            "--ram",
            "8M",
            "--workload",
            workload,
            "--seconds",
            "0.5",
            "--out",
            img.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let saved = stderr(&o);
        let digest = saved
            .split("memory digest ")
            .nth(1)
            .map(str::trim)
            .unwrap_or_else(|| panic!("no digest in: {saved}"))
            .to_string();

        let text = s.run(&["stream", "dump", img.to_str().unwrap()]);
        assert_eq!(text.status.code(), Some(0), "{}", stderr(&text));
        let text = stdout(&text);
        let order: Vec<&str> = [
            "X86_CPUID_POLICY",
            "X86_MSR_POLICY",
            "STATIC_DATA_END",
            "PAGE_DATA",
            "X86_TSC_INFO",
            "HVM_CONTEXT",
            "HVM_PARAMS",
            "END",
        ]
        .into_iter()
        .collect();
        let mut at = 0;
        for name in order {
            let pos = text[at..]
                .find(&format!(" {name} ("))
                .unwrap_or_else(|| panic!("{name} missing or out of order:\n{text}"));
            at += pos;
        }
        assert!(text.contains("x86 HVM"), "{text}");
        let v = dump_json(&s, &img);
        let sum = if v["summary"].is_object() {
            &v["summary"]
        } else {
            &v
        };
        assert_eq!(sum["data_pages"], 2048, "8M is 2048 pages: {v}");
        assert_eq!(sum["ended_with_end"], true, "{v}");

        let o = s.run(&[
            "restore",
            "--in",
            img.to_str().unwrap(),
            "--ram",
            "8M",
            "--workload",
            workload,
            "--seconds",
            "0.5",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let out = stdout(&o);
        assert!(
            out.contains(&digest),
            "restore digest differs: {out} vs {digest}"
        );
        assert!(out.contains("verified"), "{out}");
        assert!(out.contains("no fault"), "{out}");
    }

    // The wrong shape is refused clearly.
    let o = s.run(&[
        "restore",
        "--in",
        "vm.img",
        "--ram",
        "4M",
        "--workload",
        "dirty",
    ]);
    assert_usage_error(&o, &["beyond"]);
    let o = s.run(&[
        "restore",
        "--in",
        "vm.img",
        "--ram",
        "8M",
        "--workload",
        "kv",
    ]);
    assert_usage_error(&o, &["--workload"]);
    // A corrupted stream names the offset.
    let mut bytes = std::fs::read(&img).unwrap();
    let cut = bytes.len() / 2;
    bytes.truncate(cut);
    std::fs::write(s.path("cut.img"), &bytes).unwrap();
    let o = s.run(&[
        "restore",
        "--in",
        "cut.img",
        "--ram",
        "8M",
        "--workload",
        "dirty",
    ]);
    assert_usage_error(&o, &["cut.img", &format!("byte {cut}")]);
    bytes[0] = 0;
    std::fs::write(s.path("bad.img"), &bytes).unwrap();
    let o = s.run(&[
        "restore",
        "--in",
        "bad.img",
        "--ram",
        "8M",
        "--workload",
        "dirty",
    ]);
    assert_usage_error(&o, &["bad.img", "malformed"]);
}

#[test]
fn dump_of_a_stream_without_end_is_truncated_exit_2() {
    let s = Scratch::new("noend");
    let img = s.path("vm.img");
    let o = s.run(&[
        "save",
        "--ram",
        "4M",
        "--seconds",
        "0",
        "--out",
        img.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let whole = dump_json(&s, &img);
    let records = u(&whole["summary"], "records");
    // Cut the stream at the record boundary before END (an 8-byte record without a body).
    let mut bytes = std::fs::read(&img).unwrap();
    assert_eq!(
        bytes[bytes.len() - 8..],
        [0u8; 8],
        "the stream must end with END"
    );
    bytes.truncate(bytes.len() - 8);
    std::fs::write(s.path("noend.img"), &bytes).unwrap();
    let want = format!(
        "stream truncated: no END record after {} records, at byte {}",
        records - 1,
        bytes.len()
    );
    let o = s.run(&["stream", "dump", "noend.img"]);
    assert_usage_error(&o, &["noend.img", &want]);
    // What was read is still printed, the summary included.
    let out = stdout(&o);
    assert!(out.contains("HVM_PARAMS"), "{out}");
    assert!(out.contains("no END record (truncated)"), "{out}");
    let o = s.run(&["stream", "dump", "--json", "noend.img"]);
    assert_usage_error(&o, &[&want]);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["summary"]["ended_with_end"], false, "{v}");
    // The help names the exit code.
    let help = stdout(&s.run(&["stream", "dump", "--help"]));
    assert!(help.contains("truncated"), "{help}");
}

#[test]
fn demo_save_writes_a_snapshot_dump_accepts() {
    let s = Scratch::new("demosave");
    let v = demo_json(&s, &["--duration", "1.5", "--save", "demo.img"]);
    let img = s.path("demo.img");
    assert_eq!(v["snapshot"], img.display().to_string(), "{v}");
    let d = dump_json(&s, &img);
    let sum = if d["summary"].is_object() {
        &d["summary"]
    } else {
        &d
    };
    assert_eq!(sum["data_pages"], 4096, "16M is 4096 pages: {d}");
}

/// One stray connection (a port scanner, a health check) must not end the secondary's wait:
/// it drops the connection and the real primary still pairs with it.
#[test]
fn a_stray_connection_does_not_end_the_secondarys_wait() {
    use std::io::Write;
    let s = Scratch::new("stray");
    let id = std::process::id();
    let repl = format!("127.0.0.1:{}", free_port());
    let pn = format!("stp{id}");
    let mut sec = secondary(&s, &repl, &format!("sts{id}"), "8M");
    // A scanner that connects and leaves, then an HTTP health check.
    for probe in [&b""[..], b"GET /health HTTP/1.0\r\n\r\n"] {
        let deadline = Instant::now() + scaled(Duration::from_secs(30));
        let mut c = loop {
            match std::net::TcpStream::connect(&repl) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "the secondary never listened: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        c.write_all(probe).unwrap();
        drop(c);
        // Long enough for a secondary that ends its wait on the stray connection to exit.
        std::thread::sleep(scaled(Duration::from_millis(300)));
        assert!(
            sec.0.try_wait().unwrap().is_none(),
            "the secondary exited after a stray connection"
        );
    }
    let _pri = primary(&s, &repl, &pn, "8M");
    wait_for(&s, &pn, "protected", |v| v["protected"] == true);
}

/// A flood of connections that fail the handshake (garbage, and a HELLO of another protocol
/// version): the secondary refuses each, logs them at a limited rate with a count, and its
/// real primary protects the guest afterwards.
#[test]
fn a_flood_of_refused_connections_is_rate_limited_and_the_wait_goes_on() {
    use std::io::Write;
    let s = Scratch::new("flood");
    let id = std::process::id();
    let repl = format!("127.0.0.1:{}", free_port());
    let pn = format!("flp{id}");
    let mut sec = Node(
        s.colo()
            .args([
                "secondary",
                "--listen",
                &repl,
                "--name",
                &format!("fls{id}"),
            ])
            .args(["--ram", "8M", "--heartbeat-timeout-ms", "2000"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = stderr_lines(&mut sec.0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    while sent < 30 {
        match std::net::TcpStream::connect(&repl) {
            Ok(mut c) => {
                let _ = c.write_all(b"\x00garbage that is no libxc image header at all....");
                drop(c);
                sent += 1;
            }
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the secondary never listened: {e}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    // The secondary may still be working through the flood (a hundred a second at most): the
    // primary waits for its HELLO longer than usual.
    let _pri = Node(
        s.colo()
            .args(["primary", "--peer", &repl, "--name", &pn, "--ram", "8M"])
            .args(["--heartbeat-timeout-ms", "20000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&s, &pn, "protected", |v| v["protected"] == true);
    assert!(sec.0.try_wait().unwrap().is_none());
    let st = wait_for(&s, &format!("fls{id}"), "refusals counted", |v| {
        v["refused_connections"].as_u64().unwrap_or(0) >= 30
    });
    assert_eq!(st["refused_connections"], 30, "{st}");
    // Every refusal reaches the log: a line of its own, or the count of a later line (the
    // summary at the primary's handshake covers the flood's last second).
    let tally = |all: &[String]| {
        let logged = all
            .iter()
            .filter(|l| l.contains("waiting for the primary again"))
            .count();
        let counted: u64 = all
            .iter()
            .filter_map(|l| {
                let (before, _) =
                    l.split_once(" more connection(s) refused since the last report")?;
                before.rsplit(['(', ' ']).next()?.parse::<u64>().ok()
            })
            .sum();
        (logged, counted)
    };
    let mut all: Vec<String> = Vec::new();
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    let (logged, counted) = loop {
        let (logged, counted) = tally(&all);
        if logged as u64 + counted >= 30 || Instant::now() >= deadline {
            break (logged, counted);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(l) = lines.recv_timeout(left) {
            all.push(l);
        }
    };
    assert!(
        logged > 0 && logged < 30,
        "30 refusals, {logged} log lines:\n{}",
        all.join("\n")
    );
    assert_eq!(
        logged as u64 + counted,
        30,
        "every refusal is logged or counted:\n{}",
        all.join("\n")
    );
}

/// `colo failover` on the primary drops the secondary on purpose: the secondary is told so and
/// stops without taking over, and only the primary serves (no split brain).
#[test]
fn dropping_the_secondary_leaves_one_serving_node() {
    let s = Scratch::new("drop");
    let id = std::process::id();
    let repl = format!("127.0.0.1:{}", free_port());
    let (pn, sn) = (format!("dp{id}"), format!("ds{id}"));
    let mut sec = secondary(&s, &repl, &sn, "8M");
    let _pri = primary(&s, &repl, &pn, "8M");
    wait_for(&s, &pn, "protected", |v| v["protected"] == true);
    wait_for(&s, &sn, "a protected secondary", |v| v["protected"] == true);
    let o = s.run(&["failover", "--name", &pn]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The secondary stops in order (exit 0) instead of taking over.
    let code = exit_code(&mut sec, "the dropped secondary");
    assert_eq!(code, Some(0), "the dropped secondary failed");
    let v = wait_for(&s, &pn, "unprotected", |v| v["protected"] == false);
    assert_eq!(v["role"], "primary", "{v}");
}

/// A primary that loses its secondary goes on alone only once its fence succeeded: a failing
/// `--fence-cmd` stops it (exit 1, naming the fence) rather than serve beside a secondary that
/// may be taking over; a succeeding one lets it run unprotected.
#[test]
fn the_primary_fences_before_going_on_alone() {
    for (fence, survives) in [("true", true), ("false", false)] {
        let s = Scratch::new(&format!("fence-{fence}"));
        let id = std::process::id();
        let repl = format!("127.0.0.1:{}", free_port());
        let (pn, sn) = (format!("fp{fence}{id}"), format!("fs{fence}{id}"));
        let mut sec = secondary(&s, &repl, &sn, "8M");
        let mut pri = Node(
            s.colo()
                .args(["primary", "--peer", &repl, "--name", &pn, "--ram", "8M"])
                .args(timeout_flags(1000))
                .args(["--fence-cmd", fence])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        wait_for(&s, &pn, "protected", |v| v["protected"] == true);
        sec.0.kill().unwrap();
        sec.0.wait().unwrap();
        if survives {
            let v = wait_for(&s, &pn, "unprotected", |v| v["protected"] == false);
            assert!(v["failover_reason"].is_string(), "{v}");
            assert!(pri.0.try_wait().unwrap().is_none(), "the primary exited");
        } else {
            let deadline = Instant::now() + scaled(Duration::from_secs(30));
            let code = loop {
                if let Some(st) = pri.0.try_wait().unwrap() {
                    break st.code();
                }
                assert!(
                    Instant::now() < deadline,
                    "the unfenced primary went on alone"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let mut err = String::new();
            std::io::Read::read_to_string(&mut pri.0.stderr.take().unwrap(), &mut err).unwrap();
            assert_eq!(code, Some(1), "{err}");
            assert!(
                err.contains("fence command `false` failed") && err.contains("not going on alone"),
                "{err}"
            );
        }
    }
}

/// Nodes started with different keys: both say so (the refused side's own check, not "the
/// peer closed the link"), the secondary exits 1, and the primary reports loudly that the
/// guest was never protected.
#[test]
fn different_keys_are_named_by_both_nodes() {
    let s = Scratch::new("keys");
    let id = std::process::id();
    let repl = format!("127.0.0.1:{}", free_port());
    let pn = format!("kp{id}");
    let (k1, k2) = (key_file(&s, "k1", 1), key_file(&s, "k2", 2));
    let mut sec = keyed_node(&s, &["secondary", "--listen", &repl, "--ram", "8M"], &k1);
    let primary = ["primary", "--peer", &repl, "--ram", "8M", "--name", &pn];
    let mut pri = keyed_node(
        &s,
        &[
            &primary[..],
            &["--connect-timeout", &scaled_secs(20).to_string()],
        ]
        .concat(),
        &k2,
    );
    refused_by_both(&s, &mut sec, &pn, "HMAC proof does not match");
    pri.0.kill().unwrap();
    pri.0.wait().unwrap();
    let perr = stderr_of(&mut pri);
    assert!(
        perr.contains("ERROR") && perr.contains("protection did not start"),
        "{perr}"
    );
    // The secondary kept waiting: its real primary, with the right key, protects the guest.
    let pn2 = format!("kq{id}");
    let right = ["primary", "--peer", &repl, "--ram", "8M", "--name", &pn2];
    let _pri2 = keyed_node(&s, &right, &k1);
    let v = wait_for(&s, &pn2, "protected", |v| v["protected"] == true);
    assert_eq!(v["ever_protected"], true, "{v}");
}

/// `--insecure-plaintext` on one node only: both refuse at the handshake, naming the flag and
/// the side that has it. On both nodes: the pair is protected, and the node warns that its
/// records go unencrypted.
#[test]
fn insecure_plaintext_must_be_given_to_both_nodes() {
    let s = Scratch::new("plaintext");
    let id = std::process::id();
    let k = key_file(&s, "k", 7);
    for (primary_plain, pn) in [(false, format!("pp0{id}")), (true, format!("pp1{id}"))] {
        let repl = format!("127.0.0.1:{}", free_port());
        let sn = format!("ps{primary_plain}{id}");
        let timeout = timeout_flags(2000);
        let timeout = timeout.each_ref().map(String::as_str);
        let secondary = ["secondary", "--listen", &repl, "--ram", "8M", "--name", &sn];
        let plain = ["--insecure-plaintext"];
        let mut sec = keyed_node(&s, &[&secondary[..], &timeout, &plain].concat(), &k);
        let primary = ["primary", "--peer", &repl, "--ram", "8M", "--name", &pn];
        let flags: &[&str] = if primary_plain { &plain } else { &[] };
        let mut pri = keyed_node(&s, &[&primary[..], &timeout, flags].concat(), &k);
        if primary_plain {
            wait_for(&s, &pn, "protected", |v| v["protected"] == true);
            pri.0.kill().unwrap();
            pri.0.wait().unwrap();
            let err = stderr_of(&mut pri);
            assert!(
                err.contains("WARN") && err.contains("--insecure-plaintext"),
                "{err}"
            );
        } else {
            refused_by_both(
                &s,
                &mut sec,
                &pn,
                "--insecure-plaintext differs: the secondary has it and the primary does not",
            );
        }
    }
}

/// Key rotation as docs/operations.md tells it: new key file on both hosts, the primary drops
/// its secondary, a secondary started with the new key, `colo protect`: the primary reads its
/// key file again and the pair is protected under the new key.
#[test]
fn a_rotated_key_takes_effect_at_the_next_protect() {
    let s = Scratch::new("rotate");
    let id = std::process::id();
    let k = key_file(&s, "key", 1);
    let (pn, s1n, s2n) = (format!("rp{id}"), format!("rs1{id}"), format!("rs2{id}"));
    let timeout = timeout_flags(2000);
    let timeout = timeout.each_ref().map(String::as_str);
    let keyed_secondary = |repl: &str, name: &str| {
        let args = ["secondary", "--listen", repl, "--name", name, "--ram", "8M"];
        keyed_node(&s, &[&args[..], &timeout].concat(), &k)
    };
    let repl1 = format!("127.0.0.1:{}", free_port());
    let mut s1 = keyed_secondary(&repl1, &s1n);
    let primary = ["primary", "--peer", &repl1, "--name", &pn, "--ram", "8M"];
    let _pri = keyed_node(&s, &[&primary[..], &timeout].concat(), &k);
    wait_for(&s, &pn, "protected", |v| v["protected"] == true);
    key_file(&s, "key", 2);
    let o = s.run(&["failover", "--name", &pn]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(exit_code(&mut s1, "the dropped secondary"), Some(0));
    wait_for(&s, &pn, "unprotected", |v| v["protected"] == false);
    let repl2 = format!("127.0.0.1:{}", free_port());
    let _s2 = keyed_secondary(&repl2, &s2n);
    let o = s.run(&["protect", "--name", &pn, "--peer", &repl2]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    wait_for(&s, &pn, "protected under the new key", |v| {
        v["protected"] == true
    });
}

//! A node's control socket: a Unix socket (mode 0600, in a 0700 runtime directory) over which
//! `colo status` reads the node's status and `colo failover`, `colo protect` / a manual
//! checkpoint are requested.
//!
//! Protocol: the client sends one JSON line `{"cmd":"status"|"failover"|"checkpoint"}` and reads
//! one JSON line back: the node's status (plus `pause_ms_p50`/`pause_ms_p99`), or `{"ok":true}`,
//! or `{"error":"..."}`.
//!
//! `{"cmd":"protect","peer":"HOST:PORT","connect_timeout_ms":N}` (re-protection, a primary only)
//! is answered once the node knows the outcome: `{"ok":true,"message":"..."}` when it reached
//! the new secondary and the link handshake passed (re-synchronisation has started), else
//! `{"error":"..."}` with the reason (not a primary, already protected, the peer unreachable
//! within N ms, the handshake refused). The node connects on a helper thread, so its loop keeps
//! serving clients meanwhile; each connection is served on its own thread, so `status` answers
//! while a `protect` waits.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::{json, Value};

use crate::status::{Shared, StatusReport};

/// Longest request line the server reads, bytes.
const MAX_REQUEST: u64 = 4096;
/// Longest response the client reads, bytes.
const MAX_RESPONSE: u64 = 1 << 20;
/// Server-side read/write timeout per connection.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Client-side timeout.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// `protect`: how long the server waits for the node's answer beyond the connect timeout (the
/// handshake; a silent peer is declared lost after the heartbeat or progress timeout).
pub const PROTECT_MARGIN: Duration = Duration::from_secs(30);
/// `protect`: the connect timeout when the request names none.
const PROTECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a node answers a command the control socket waits on (`protect`): `Ok(what started)`
/// or `Err(why not)`.
#[derive(Clone)]
pub struct Reply(Sender<Result<String, String>>);

impl Reply {
    /// A reply handle and the receiver its answer arrives on.
    pub fn new() -> (Self, Receiver<Result<String, String>>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        (Self(tx), rx)
    }

    /// Sends the node's answer (dropped if nobody waits any more).
    pub fn send(&self, answer: Result<String, String>) {
        let _ = self.0.try_send(answer);
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

impl PartialEq for Reply {
    fn eq(&self, other: &Self) -> bool {
        self.0.same_channel(&other.0)
    }
}

impl Eq for Reply {}

/// The node on a control socket answered a command with an error (as opposed to there being
/// no node to ask): `colo protect` exits 1 on it, not 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The socket.
    pub path: PathBuf,
    /// The command.
    pub cmd: String,
    /// The node's reason.
    pub reason: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the node on {} refused {:?}: {}",
            self.path.display(),
            self.cmd,
            self.reason
        )
    }
}

impl std::error::Error for Refused {}

/// An action requested over the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlCommand {
    /// Report the status (answered by the server itself; never sent on the channel).
    Status,
    /// Declare the peer lost and take over (secondary) or run unprotected (primary).
    Failover,
    /// Take a checkpoint now.
    Checkpoint,
    /// Re-protection: an unprotected primary connects to a new secondary at `peer` and
    /// re-synchronises it while its guest keeps running.
    Protect {
        /// The new secondary's replication address.
        peer: String,
        /// How long to keep trying to reach it.
        connect_timeout: Duration,
        /// Gets the outcome: started (connected, handshake passed) or why not.
        reply: Reply,
    },
}

impl ControlCommand {
    /// Parses a request's `cmd` value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "status" => Some(Self::Status),
            "failover" => Some(Self::Failover),
            "checkpoint" => Some(Self::Checkpoint),
            _ => None,
        }
    }
}

/// The runtime directory for control sockets: `$XDG_RUNTIME_DIR/colo` if set, else `/run/colo`
/// when running as root, else `/tmp/colo-<uid>`.
pub fn runtime_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("colo");
    }
    match fs::metadata("/proc/self").map(|m| m.uid()) {
        Ok(0) => PathBuf::from("/run/colo"),
        Ok(uid) => PathBuf::from(format!("/tmp/colo-{uid}")),
        Err(_) => std::env::temp_dir().join("colo"),
    }
}

/// The control socket of the node called `name`: `<runtime_dir>/<name>.sock`. Characters other
/// than ASCII letters, digits, `.`, `_` and `-` in `name` are replaced by `_` (so a name can
/// never leave the directory).
pub fn socket_path(name: &str) -> PathBuf {
    let mut safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe.is_empty() || safe.starts_with('.') {
        safe.insert(0, '_');
    }
    runtime_dir().join(format!("{safe}.sock"))
}

/// A running control socket. Dropping it stops the server thread and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// (dev, ino) of the socket we bound, so Drop never removes someone else's file.
    ident: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let woke = UnixStream::connect(&self.path).is_ok();
        if let Some(t) = self.thread.take() {
            if woke {
                let _ = t.join();
            }
        }
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.ident {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Listens on `path` (creating its directory with mode 0700 if missing; replacing a stale socket
/// nobody listens on; refusing if a node already listens there), sets the socket to mode 0600 and
/// serves requests on a thread. `failover` and `checkpoint` are forwarded on `commands`.
pub fn serve(
    path: &Path,
    status: Shared,
    commands: Sender<ControlCommand>,
) -> anyhow::Result<ControlServer> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create runtime directory {}", dir.display()))?;
        }
    }
    if let Ok(m) = fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            bail!(
                "a colo node is already listening on {} (use another --name)",
                path.display()
            );
        }
        fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on control socket {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod control socket {}", path.display()))?;
    let m = fs::symlink_metadata(path)
        .with_context(|| format!("cannot stat control socket {}", path.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("colo-control".into())
            .spawn(move || accept_loop(listener, status, commands, stop))
            .context("cannot spawn the control socket thread")?
    };
    Ok(ControlServer {
        path: path.to_path_buf(),
        ident: (m.dev(), m.ino()),
        stop,
        thread: Some(thread),
    })
}

fn accept_loop(
    listener: UnixListener,
    status: Shared,
    commands: Sender<ControlCommand>,
    stop: Arc<AtomicBool>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(stream) => {
                // Its own thread: a `protect` waits for the node's answer, and `status` must
                // not wait behind it.
                let (status, commands) = (status.clone(), commands.clone());
                let spawned = std::thread::Builder::new()
                    .name("colo-control-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(stream, &status, &commands) {
                            tracing::debug!(error = %e, "control connection failed");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot spawn a control connection thread");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle(
    stream: UnixStream,
    status: &Shared,
    commands: &Sender<ControlCommand>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(MAX_REQUEST + 1)).read_until(b'\n', &mut line)?;
    let response = if line.len() as u64 > MAX_REQUEST {
        json!({ "error": format!("request longer than {MAX_REQUEST} bytes") })
    } else {
        respond(&line, status, commands)
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)?;
    (&stream).flush()
}

/// The response to one request line.
fn respond(line: &[u8], status: &Shared, commands: &Sender<ControlCommand>) -> Value {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return json!({ "error": format!("malformed request: {e}") }),
    };
    let Some(cmd) = req.get("cmd").and_then(Value::as_str) else {
        return json!({ "error": "malformed request: expected {\"cmd\":\"status\"|\"failover\"|\"checkpoint\"}" });
    };
    let parsed = match cmd {
        "protect" => return protect(&req, status, commands),
        other => ControlCommand::parse(other),
    };
    match parsed {
        None => {
            json!({ "error": format!("unknown command {cmd:?} (expected status, failover, checkpoint or protect)") })
        }
        Some(ControlCommand::Status) => status_json(status),
        Some(c) => match commands.send(c) {
            Ok(()) => json!({ "ok": true }),
            Err(_) => json!({ "error": "the node is shutting down" }),
        },
    }
}

/// `protect`: forwards it to the node (a primary) and waits for the outcome.
fn protect(req: &Value, status: &Shared, commands: &Sender<ControlCommand>) -> Value {
    let Some(peer) = req.get("peer").and_then(Value::as_str) else {
        return json!({ "error": "protect needs a \"peer\" address" });
    };
    let connect_timeout = match req.get("connect_timeout_ms") {
        None => PROTECT_CONNECT_TIMEOUT,
        Some(v) => match v.as_u64() {
            Some(ms) if ms <= 86_400_000 => Duration::from_millis(ms),
            _ => return json!({ "error": "connect_timeout_ms must be a number of ms up to a day" }),
        },
    };
    let role = status.lock().role.clone();
    if role != "primary" {
        let what = if role.is_empty() {
            "still starting (not yet connected to its peer)".to_string()
        } else {
            format!("a {role}")
        };
        return json!({ "error": format!("`protect` is for a primary; this node is {what}") });
    }
    let (reply, answer) = Reply::new();
    let cmd = ControlCommand::Protect {
        peer: peer.to_string(),
        connect_timeout,
        reply,
    };
    if commands.send(cmd).is_err() {
        return json!({ "error": "the node is shutting down" });
    }
    let wait = connect_timeout + PROTECT_MARGIN;
    match answer.recv_timeout(wait) {
        Ok(Ok(message)) => json!({ "ok": true, "message": message }),
        Ok(Err(e)) => json!({ "error": e }),
        Err(RecvTimeoutError::Timeout) => json!({
            "error": format!(
                "no outcome within {} s; see `colo status` for whether protection started",
                wait.as_secs()
            )
        }),
        Err(RecvTimeoutError::Disconnected) => json!({ "error": "the node is shutting down" }),
    }
}

/// The node's status as JSON, with the pause percentiles added.
pub fn status_json(status: &Shared) -> Value {
    let s = status.lock();
    let mut v = serde_json::to_value(&*s).unwrap_or_else(|e| json!({ "error": e.to_string() }));
    if let Value::Object(m) = &mut v {
        m.insert("pause_ms_p50".into(), json!(s.pause_percentile(50.0)));
        m.insert("pause_ms_p99".into(), json!(s.pause_percentile(99.0)));
    }
    v
}

/// Sends `cmd` to the node listening on `path` and returns its JSON answer. Fails (naming the
/// socket) if nothing listens there, on a 5 s timeout, or if the node answers `{"error":...}`.
pub fn request(path: &Path, cmd: &str) -> anyhow::Result<Value> {
    request_json(path, cmd, json!({ "cmd": cmd }))
}

/// Sends the request object `req` (whose command is `cmd`) to the node on `path`; see
/// [`request`].
pub fn request_json(path: &Path, cmd: &str, req: Value) -> anyhow::Result<Value> {
    request_json_within(path, cmd, req, CLIENT_TIMEOUT)
}

/// [`request_json`] waiting up to `timeout` for the answer. An `{"error":...}` answer is a
/// [`Refused`] error.
pub fn request_json_within(
    path: &Path,
    cmd: &str,
    req: Value,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(path).map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "no colo node is listening on {} (is it running? see --name)",
            path.display()
        ))
    })?;
    let ctx = || format!("control socket {}", path.display());
    stream.set_read_timeout(Some(timeout)).with_context(ctx)?;
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .with_context(ctx)?;
    let mut req = serde_json::to_vec(&req)?;
    req.push(b'\n');
    (&stream)
        .write_all(&req)
        .with_context(|| format!("cannot send to {}", path.display()))?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(MAX_RESPONSE))
        .read_until(b'\n', &mut line)
        .with_context(|| {
            format!(
                "no answer from {} within {} s",
                path.display(),
                timeout.as_secs()
            )
        })?;
    if line.is_empty() {
        bail!("{} closed the connection without answering", path.display());
    }
    let v: Value = serde_json::from_slice(&line)
        .with_context(|| format!("malformed answer from {}", path.display()))?;
    if let Some(e) = v.get("error") {
        let reason = e
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| e.to_string());
        return Err(Refused {
            path: path.to_path_buf(),
            cmd: cmd.to_string(),
            reason,
        }
        .into());
    }
    Ok(v)
}

/// Human-readable multi-line rendering of a status answer, for `colo status` without `--json`.
pub fn format_status(r: &StatusReport) -> String {
    let v = &r.node;
    let opt = |x: &Option<String>| x.clone().unwrap_or_else(|| "-".into());
    let ms = |x: Option<f64>| match x {
        Some(f) => format!("{f:.2} ms"),
        None => "-".into(),
    };
    let mut out = String::new();
    let mut line = |k: &str, val: String| out.push_str(&format!("{k:<17}{val}\n"));
    line("role:", v.role.clone());
    line("state:", v.state.clone());
    line("peer:", opt(&v.peer));
    if v.client_addr.is_some() {
        line("clients:", opt(&v.client_addr));
    }
    line(
        "protected:",
        match (v.protected, v.ever_protected) {
            (true, _) => "yes".into(),
            (false, true) => "no".into(),
            (false, false) => "no (never: protection has not started)".into(),
        },
    );
    if let Some(a) = &v.arbiter {
        let renewed = a
            .last_renewal_ms_ago
            .map_or("never".into(), |ms| format!("{:.1} s ago", ms as f64 / 1e3));
        line(
            "arbiter:",
            format!(
                "{} held by {}; this node {} (lease {:.1} s left, renewed {renewed}){}",
                a.key,
                a.holder.as_deref().unwrap_or("nobody"),
                if a.holding { "holds it" } else { "does not" },
                a.lease_remaining_ms as f64 / 1e3,
                a.last_error
                    .as_deref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            ),
        );
    }
    if v.output_withheld > 0 {
        line(
            "withheld:",
            format!("{} frames (lease uncertain)", v.output_withheld),
        );
    }
    if v.refused_connections > 0 {
        line("refused:", format!("{} connections", v.refused_connections));
    }
    if v.tcp_aligned > 0 || v.tcp_tracked > 0 {
        line(
            "tcp align:",
            format!(
                "{} connections aligned, {} tracked; frames rewritten {} in, {} out{}",
                v.tcp_aligned,
                v.tcp_tracked,
                v.tcp_rewritten_in,
                v.tcp_rewritten_out,
                if v.tcp_align_evicted > 0 {
                    format!("; {} evicted", v.tcp_align_evicted)
                } else {
                    String::new()
                }
            ),
        );
    }
    line("epoch:", v.epoch.to_string());
    line(
        "checkpoints:",
        format!(
            "{} (mismatch {}, periodic {}, manual {})",
            v.checkpoints, v.mismatch_checkpoints, v.periodic_checkpoints, v.manual_checkpoints,
        ),
    );
    if v.verified_identical + v.verify_failures + v.verify_unsettled > 0 {
        line(
            "verified:",
            format!(
                "{} identical, {} failures, {} unsettled; {} pages resent that changed behind \
                 the dirty log",
                v.verified_identical, v.verify_failures, v.verify_unsettled, v.unlogged_pages
            ),
        );
    }
    if v.disk_blocks > 0 {
        line(
            "disk:",
            format!(
                "{} MiB; {} blocks sent in checkpoints ({} mirrored); verified {} identical, {} \
                 failures",
                v.disk_blocks >> 8,
                v.disk_blocks_sent,
                v.disk_blocks_mirrored,
                v.disk_verified_identical,
                v.disk_verify_failures
            ),
        );
    }
    if v.watch_set + v.unlogged_pages > 0 {
        line(
            "behind the log:",
            format!(
                "{} pages found by {} sweeps; watch set {} pages, {} carried in all",
                v.unlogged_pages, v.sweeps, v.watch_set, v.watched_pages
            ),
        );
    }
    match &v.last {
        Some(l) => line(
            "last checkpoint:",
            format!(
                "#{} {} |A|={} |B|={} |D|={} pause {}",
                l.epoch,
                l.trigger,
                l.dirty_primary,
                l.dirty_secondary,
                l.pages_sent,
                ms(Some(l.pause_ms)),
            ),
        ),
        None => line("last checkpoint:", "-".into()),
    }
    line(
        "pause:",
        format!("p50 {}, p99 {}", ms(r.pause_ms_p50), ms(r.pause_ms_p99)),
    );
    line(
        "link:",
        format!(
            "{} bytes out, {} bytes in{}",
            v.link_bytes_out,
            v.link_bytes_in,
            if v.link_streams > 1 {
                format!(", {} connections (--streams)", v.link_streams)
            } else {
                String::new()
            }
        ),
    );
    if let Some(reason) = &v.failover_reason {
        let took = match v.takeover_ms {
            Some(t) => format!(" (takeover {t:.1} ms)"),
            None => String::new(),
        };
        line("failover:", format!("{reason}{took}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testdir::TestDir;
    use crate::status::NodeStatus;
    use colo_core::engine::{CheckpointStats, Trigger};
    use parking_lot::Mutex;

    fn shared() -> Shared {
        Arc::new(Mutex::new(NodeStatus {
            role: "primary".into(),
            state: "protected".into(),
            peer: Some("127.0.0.1:7000".into()),
            protected: true,
            ..NodeStatus::default()
        }))
    }

    fn stats(epoch: u64, pause_ms: u64) -> CheckpointStats {
        CheckpointStats {
            epoch,
            trigger: Trigger::Mismatch,
            dirty_primary: 10,
            dirty_secondary: 4,
            secondary_only: 2,
            unlogged: 0,
            watched: 0,
            pages_sent: 12,
            disk_blocks: 0,
            disk_mirrored: 0,
            bytes_sent: 12 * 4096,
            backchannel: Duration::ZERO,
            pause: Duration::from_millis(pause_ms),
            harvest: Duration::ZERO,
            capture: Duration::ZERO,
            send: Duration::ZERO,
            commit: Duration::ZERO,
            total: Duration::ZERO,
        }
    }

    #[test]
    fn round_trip_over_a_real_socket() {
        let d = TestDir::new();
        let path = d.path().join("run").join("pvm.sock");
        let st = shared();
        for (e, p) in [(1, 2), (2, 4), (3, 6)] {
            st.lock().record_checkpoint(stats(e, p));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let server = serve(&path, st.clone(), tx).unwrap();
        assert_eq!(server.path(), path);

        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
        let dmode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700, "dir mode {dmode:o}");

        let v = request(&path, "status").unwrap();
        assert_eq!(v["role"], "primary");
        assert_eq!(v["state"], "protected");
        assert_eq!(v["protected"], true);
        assert_eq!(v["checkpoints"], 3);
        assert_eq!(v["last"]["dirty_primary"], 10);
        assert_eq!(v["pause_ms_p50"], 4.0);
        assert_eq!(v["pause_ms_p99"], 6.0);
        let report: StatusReport = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(report.node.checkpoints, 3);
        let text = format_status(&report);
        assert!(text.contains("role:            primary"), "{text}");
        assert!(text.contains("protected:       yes"), "{text}");
        assert!(text.contains("|A|=10 |B|=4 |D|=12 pause 6.00 ms"), "{text}");
        assert!(text.contains("p50 4.00 ms, p99 6.00 ms"), "{text}");

        assert!(rx.try_recv().is_err());
        assert_eq!(request(&path, "failover").unwrap(), json!({ "ok": true }));
        assert_eq!(rx.try_recv(), Ok(ControlCommand::Failover));
        assert_eq!(request(&path, "checkpoint").unwrap(), json!({ "ok": true }));
        assert_eq!(rx.try_recv(), Ok(ControlCommand::Checkpoint));

        let e = format!("{:#}", request(&path, "reboot").unwrap_err());
        assert!(e.contains("unknown command"), "{e}");
        assert!(rx.try_recv().is_err());

        // A second server on the same path is refused while the first runs.
        let (tx2, _rx2) = crossbeam_channel::unbounded();
        let e = format!("{:#}", serve(&path, st.clone(), tx2).unwrap_err());
        assert!(e.contains("already listening"), "{e}");

        drop(server);
        assert!(!path.exists(), "socket file left behind");
        let e = format!("{:#}", request(&path, "status").unwrap_err());
        assert!(
            e.contains(&format!(
                "no colo node is listening on {} (is it running? see --name)",
                path.display()
            )),
            "{e}"
        );
    }

    #[test]
    fn protect_waits_for_the_nodes_answer_and_status_does_not_wait_behind_it() {
        let d = TestDir::new();
        let path = d.path().join("p.sock");
        let st = shared();
        let (tx, rx) = crossbeam_channel::unbounded();
        let _server = serve(&path, st.clone(), tx).unwrap();
        let req =
            |peer: &str| json!({ "cmd": "protect", "peer": peer, "connect_timeout_ms": 1000 });
        // The node answers later; meanwhile `status` is served.
        let p = path.clone();
        let asking = std::thread::spawn(move || {
            request_json_within(&p, "protect", req("10.0.0.3:7000"), Duration::from_secs(60))
        });
        let cmd = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let ControlCommand::Protect {
            peer,
            connect_timeout,
            reply,
        } = cmd
        else {
            panic!("{cmd:?}");
        };
        assert_eq!(peer, "10.0.0.3:7000");
        assert_eq!(connect_timeout, Duration::from_secs(1));
        assert_eq!(request(&path, "status").unwrap()["role"], "primary");
        reply.send(Ok("re-synchronising".into()));
        let v = asking.join().unwrap().unwrap();
        assert_eq!(v, json!({ "ok": true, "message": "re-synchronising" }));

        // A refusal is a `Refused` error carrying the node's reason.
        let p = path.clone();
        let asking = std::thread::spawn(move || {
            request_json_within(&p, "protect", req("x:1"), Duration::from_secs(60))
        });
        let ControlCommand::Protect { reply, .. } =
            rx.recv_timeout(Duration::from_secs(10)).unwrap()
        else {
            panic!("not a protect command");
        };
        reply.send(Err("cannot reach peer x:1".into()));
        let e = asking.join().unwrap().unwrap_err();
        let r = e.downcast_ref::<Refused>().expect("a Refused error");
        assert_eq!(r.reason, "cannot reach peer x:1");

        // Only a primary is asked at all.
        st.lock().role = "secondary".into();
        let e = format!(
            "{:#}",
            request_json(&path, "protect", req("x:1")).unwrap_err()
        );
        assert!(
            e.contains("is for a primary; this node is a secondary"),
            "{e}"
        );
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn malformed_requests_get_errors() {
        let d = TestDir::new();
        let path = d.path().join("n.sock");
        let (tx, rx) = crossbeam_channel::unbounded();
        let _server = serve(&path, shared(), tx).unwrap();
        let raw = |req: &[u8]| -> Value {
            let s = UnixStream::connect(&path).unwrap();
            (&s).write_all(req).unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap()
        };
        for req in [
            &b"not json\n"[..],
            b"{\"cmd\":3}\n",
            b"{}\n",
            b"[]\n",
            b"\n",
        ] {
            let v = raw(req);
            assert!(
                v["error"].as_str().unwrap().contains("malformed"),
                "{v} for {req:?}"
            );
        }
        let mut big = vec![b' '; MAX_REQUEST as usize + 10];
        big.push(b'\n');
        assert!(raw(&big)["error"].as_str().unwrap().contains("longer"));
        // The server still works afterwards, and nothing was forwarded.
        assert_eq!(raw(b"{\"cmd\":\"status\"}\n")["role"], "primary");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn stale_socket_is_replaced_and_other_files_are_not() {
        let d = TestDir::new();
        let path = d.path().join("s.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves a dead socket file
        let (tx, _rx) = crossbeam_channel::unbounded();
        let server = serve(&path, shared(), tx.clone()).unwrap();
        assert_eq!(request(&path, "status").unwrap()["role"], "primary");
        drop(server);

        let file = d.path().join("f.sock");
        fs::write(&file, b"x").unwrap();
        let e = format!("{:#}", serve(&file, shared(), tx).unwrap_err());
        assert!(e.contains("not a socket"), "{e}");
        assert!(file.exists());
    }

    #[test]
    fn closed_channel_reports_shutdown() {
        let d = TestDir::new();
        let path = d.path().join("c.sock");
        let (tx, rx) = crossbeam_channel::unbounded();
        drop(rx);
        let _server = serve(&path, shared(), tx).unwrap();
        let e = format!("{:#}", request(&path, "failover").unwrap_err());
        assert!(e.contains("shutting down"), "{e}");
    }

    #[test]
    fn socket_path_is_confined_to_the_runtime_dir() {
        let dir = runtime_dir();
        assert!(
            dir.ends_with("colo")
                || dir
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("colo-")
        );
        assert_eq!(socket_path("pvm"), dir.join("pvm.sock"));
        assert_eq!(socket_path("../x/y"), dir.join("_.._x_y.sock"));
        assert_eq!(socket_path(""), dir.join("_.sock"));
        assert_eq!(socket_path("a b"), dir.join("a_b.sock"));
    }

    #[test]
    fn status_is_read_back_typed_and_a_renamed_field_is_an_error() {
        let mut st = crate::status::NodeStatus {
            role: "secondary".into(),
            failover_reason: Some("peer silent for 1000 ms".into()),
            takeover_ms: Some(12.5),
            ..Default::default()
        };
        st.record_checkpoint(stats(4, 3));
        let v = crate::status::to_json(&st);
        let back: StatusReport = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back.node.checkpoints, 1);
        assert_eq!(back.node.last, st.last);
        assert_eq!(back.pause_ms_p50, Some(3.0));
        let text = format_status(&back);
        assert!(text.contains("peer:            -"), "{text}");
        assert!(
            text.contains("failover:        peer silent for 1000 ms (takeover 12.5 ms)"),
            "{text}"
        );
        // A field missing (renamed by one side) is refused, not read as zero.
        let mut renamed = v;
        let o = renamed.as_object_mut().unwrap();
        let n = o.remove("link_bytes_out").unwrap();
        o.insert("link_bytes_sent".into(), n);
        let err = serde_json::from_value::<StatusReport>(renamed).unwrap_err();
        assert!(err.to_string().contains("link_bytes_out"), "{err}");
    }

    #[test]
    fn status_shows_the_disk_only_when_there_is_one() {
        let mut node = NodeStatus {
            role: "primary".into(),
            ..NodeStatus::default()
        };
        assert!(!format_status(&StatusReport::of(&node)).contains("disk:"));
        node.disk_blocks = 16_384;
        node.disk_blocks_sent = 42;
        node.disk_blocks_mirrored = 40;
        node.disk_verified_identical = 3;
        let text = format_status(&StatusReport::of(&node));
        assert!(
            text.contains(
                "disk:            64 MiB; 42 blocks sent in checkpoints (40 mirrored); verified 3 \
                 identical, 0 failures"
            ),
            "{text}"
        );
    }
}

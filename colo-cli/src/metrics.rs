//! The optional Prometheus endpoint (`--metrics ADDR`): a tiny HTTP/1.1 server on std::net that
//! answers `GET /metrics` with the node's figures in the text exposition format 0.0.4.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::status::{NodeStatus, Shared};

/// Connections served at once; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 8;
/// Longest request head read, bytes.
const MAX_HEAD: usize = 8192;
/// Per-connection read/write timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `addr` (e.g. `127.0.0.1:9100`, port 0 for any) and serves `/metrics` on a background
/// thread for the rest of the process. Returns the bound address.
pub fn serve(addr: &str, status: Shared) -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("metrics listener on {addr}"))?;
    std::thread::Builder::new()
        .name("colo-metrics".into())
        .spawn(move || accept_loop(listener, status))
        .context("cannot spawn the metrics thread")?;
    Ok(local)
}

fn accept_loop(listener: TcpListener, status: Shared) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
            let _ = write_response(&stream, "503 Service Unavailable", "busy\n", false);
            continue;
        }
        let status = status.clone();
        let guard = ActiveGuard(active.clone());
        let spawned = std::thread::Builder::new()
            .name("colo-metrics-conn".into())
            .spawn(move || {
                let _guard = guard;
                if let Err(e) = handle(&stream, &status) {
                    tracing::debug!(error = %e, "metrics connection failed");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot spawn a metrics connection thread");
        }
    }
}

/// Decrements the active-connection count when the connection's thread ends.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn handle(stream: &TcpStream, status: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= MAX_HEAD {
            return write_response(
                stream,
                "431 Request Header Fields Too Large",
                "request too large\n",
                false,
            );
        }
        let n = (&*stream).read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let first = head.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let first = String::from_utf8_lossy(first);
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(&status.lock());
            write_response(stream, "200 OK", &body, method == "HEAD")
        }
        ("GET" | "HEAD", _) => write_response(stream, "404 Not Found", "not found\n", false),
        ("", _) => write_response(stream, "400 Bad Request", "bad request\n", false),
        _ => write_response(
            stream,
            "405 Method Not Allowed",
            "method not allowed\n",
            false,
        ),
    }
}

fn write_response(
    mut stream: &TcpStream,
    status: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let ctype = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

/// Escapes a label value for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Formats a float the way Prometheus expects (`NaN`, `+Inf`, `-Inf`).
fn float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{f}")
    }
}

/// The node's status in the Prometheus text exposition format 0.0.4.
pub fn render(s: &NodeStatus) -> String {
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(o, "{name}{labels} {value}");
        }
    };
    let one = |v: u64| vec![(String::new(), v.to_string())];

    family(
        "colo_info",
        "gauge",
        "The node's role and state (always 1).",
        &[(
            format!(
                "{{role=\"{}\",state=\"{}\"}}",
                escape(&s.role),
                escape(&s.state)
            ),
            "1".into(),
        )],
    );
    family(
        "colo_checkpoints_total",
        "counter",
        "Checkpoints committed (initial synchronisation excluded), by trigger.",
        &[
            (
                "{trigger=\"mismatch\"}".into(),
                s.mismatch_checkpoints.to_string(),
            ),
            (
                "{trigger=\"periodic\"}".into(),
                s.periodic_checkpoints.to_string(),
            ),
            (
                "{trigger=\"manual\"}".into(),
                s.manual_checkpoints.to_string(),
            ),
        ],
    );
    let q = |p: f64| float(s.pause_percentile(p).map_or(f64::NAN, |ms| ms / 1e3));
    family(
        "colo_pause_seconds",
        "summary",
        "Primary VM pause per checkpoint, over the recent checkpoints.",
        &[
            ("{quantile=\"0.5\"}".into(), q(50.0)),
            ("{quantile=\"0.99\"}".into(), q(99.0)),
        ],
    );
    let last = s.last.as_ref();
    family(
        "colo_last_checkpoint_pages",
        "gauge",
        "Pages in the last checkpoint: a = dirtied by the primary, b = by the secondary, d = sent.",
        &[
            (
                "{set=\"a\"}".into(),
                last.map_or(0, |l| l.dirty_primary).to_string(),
            ),
            (
                "{set=\"b\"}".into(),
                last.map_or(0, |l| l.dirty_secondary).to_string(),
            ),
            (
                "{set=\"d\"}".into(),
                last.map_or(0, |l| l.pages_sent).to_string(),
            ),
        ],
    );
    family(
        "colo_link_bytes_total",
        "counter",
        "Bytes on the replication link.",
        &[
            ("{dir=\"out\"}".into(), s.link_bytes_out.to_string()),
            ("{dir=\"in\"}".into(), s.link_bytes_in.to_string()),
        ],
    );
    family(
        "colo_protected",
        "gauge",
        "1 while a secondary holds the last checkpoint and outputs are compared.",
        &one(u64::from(s.protected)),
    );
    family(
        "colo_failovers_total",
        "counter",
        "Failovers this node performed (peer declared lost).",
        &one(u64::from(s.failover_reason.is_some())),
    );
    family(
        "colo_verify_failures_total",
        "counter",
        "Checkpoints whose memory digests differed.",
        &one(s.verify_failures),
    );
    family(
        "colo_verify_unsettled_total",
        "counter",
        "Checkpoints not compared because memory changed while it was digested.",
        &one(s.verify_unsettled),
    );
    family(
        "colo_verified_identical_total",
        "counter",
        "Checkpoints whose memory digests matched.",
        &one(s.verified_identical),
    );
    family(
        "colo_disk_blocks",
        "gauge",
        "The replicated disk's size in 4 KiB blocks (0: no disk).",
        &one(s.disk_blocks),
    );
    family(
        "colo_disk_blocks_sent_total",
        "counter",
        "Disk blocks sent for checkpoints, mirrored ones included (written by the PVM since the \
         last capture).",
        &one(s.disk_blocks_sent),
    );
    family(
        "colo_disk_blocks_mirrored_total",
        "counter",
        "Of which sent while the PVM ran (--disk-mirror continuous).",
        &one(s.disk_blocks_mirrored),
    );
    family(
        "colo_disk_verified_identical_total",
        "counter",
        "Checkpoints whose disk digests matched.",
        &one(s.disk_verified_identical),
    );
    family(
        "colo_disk_verify_failures_total",
        "counter",
        "Checkpoints whose disk digests differed.",
        &one(s.disk_verify_failures),
    );
    family(
        "colo_epoch",
        "gauge",
        "Current checkpoint number.",
        &one(s.epoch),
    );
    family(
        "colo_pages_sent_total",
        "counter",
        "Pages sent in checkpoints.",
        &one(s.pages_sent),
    );
    family(
        "colo_backchannel_pages_total",
        "counter",
        "Pages sent because the secondary dirtied them.",
        &one(s.backchannel_pages),
    );
    family(
        "colo_unlogged_pages_total",
        "counter",
        "Pages found changed behind the dirty log by a sweep of all memory, and sent.",
        &one(s.unlogged_pages),
    );
    family(
        "colo_watched_pages_total",
        "counter",
        "Pages carried because the hypervisor is known to write them behind the dirty log.",
        &one(s.watched_pages),
    );
    family(
        "colo_watch_set_pages",
        "gauge",
        "Pages the hypervisor was found writing behind the dirty log, re-read at every capture.",
        &one(s.watch_set),
    );
    family(
        "colo_output_mismatches_total",
        "counter",
        "Output mismatches seen by the comparator.",
        &one(s.mismatches),
    );
    family(
        "colo_ever_protected",
        "gauge",
        "1 once the node has been protected; a primary at 0 never protected its guest.",
        &one(u64::from(s.ever_protected)),
    );
    family(
        "colo_refused_connections_total",
        "counter",
        "Connections a secondary refused before the handshake completed.",
        &one(s.refused_connections),
    );
    family(
        "colo_tcp_connections_aligned_total",
        "counter",
        "TCP connections whose SVM sequence offset the secondary learned and rewrote.",
        &one(s.tcp_aligned),
    );
    family(
        "colo_tcp_frames_rewritten_total",
        "counter",
        "Frames the TCP aligner rewrote: input into the guest's sequence space, output (after a takeover) into the clients'.",
        &[
            (
                r#"{direction="in"}"#.to_string(),
                s.tcp_rewritten_in.to_string(),
            ),
            (
                r#"{direction="out"}"#.to_string(),
                s.tcp_rewritten_out.to_string(),
            ),
        ],
    );
    family(
        "colo_tcp_aligned_tracked",
        "gauge",
        "Connections the TCP aligner tracks now.",
        &one(s.tcp_tracked),
    );
    family(
        "colo_tcp_align_evicted_total",
        "counter",
        "TCP aligner entries evicted because their class was full.",
        &one(s.tcp_align_evicted),
    );
    family(
        "colo_output_withheld_total",
        "counter",
        "Output frames a lone primary held back while unsure of its arbiter lease.",
        &one(s.output_withheld),
    );
    if let Some(a) = &s.arbiter {
        family(
            "colo_arbiter_info",
            "gauge",
            "The arbiter's serving key and who holds it (always 1).",
            &[(
                format!(
                    "{{key=\"{}\",holder=\"{}\",state=\"{}\"}}",
                    escape(&a.key),
                    escape(a.holder.as_deref().unwrap_or("")),
                    escape(&a.state)
                ),
                "1".into(),
            )],
        );
        family(
            "colo_arbiter_holding",
            "gauge",
            "1 while this node certainly holds the pair's serving key.",
            &one(u64::from(a.holding)),
        );
        family(
            "colo_arbiter_lease_remaining_seconds",
            "gauge",
            "How long this node's lease is still certainly held.",
            &[(String::new(), float(a.lease_remaining_ms as f64 / 1e3))],
        );
        family(
            "colo_arbiter_last_renewal_age_seconds",
            "gauge",
            "Time since this node's lease was last granted or renewed (NaN: never).",
            &[(
                String::new(),
                float(a.last_renewal_ms_ago.map_or(f64::NAN, |ms| ms as f64 / 1e3)),
            )],
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::CheckpointFigures;
    use parking_lot::Mutex;
    use std::io::BufRead;

    fn get(addr: SocketAddr, req: &str) -> (String, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        (status, rest)
    }

    fn status() -> Shared {
        let mut s = NodeStatus {
            role: "primary".into(),
            state: "protected \"x\"".into(),
            protected: true,
            epoch: 42,
            checkpoints: 5,
            mismatch_checkpoints: 3,
            periodic_checkpoints: 1,
            manual_checkpoints: 1,
            verify_failures: 2,
            link_bytes_out: 1000,
            link_bytes_in: 77,
            failover_reason: Some("peer silent".into()),
            last: Some(CheckpointFigures {
                epoch: 42,
                trigger: "mismatch".into(),
                dirty_primary: 11,
                dirty_secondary: 5,
                secondary_only: 2,
                pages_sent: 13,
                disk_blocks: 0,
                disk_mirrored: 0,
                unlogged: 0,
                watched: 0,
                bytes_sent: 13 * 4096,
                pause_ms: 4.0,
                harvest_ms: 0.0,
                capture_ms: 0.0,
                backchannel_ms: 0.0,
                send_ms: 0.0,
                commit_ms: 0.0,
                total_ms: 0.0,
            }),
            ..NodeStatus::default()
        };
        s.pauses.extend([2.0, 4.0, 6.0]);
        Arc::new(Mutex::new(s))
    }

    #[test]
    fn get_metrics_returns_the_counters() {
        let addr = serve("127.0.0.1:0", status()).unwrap();
        let (line, rest) = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(line.trim_end(), "HTTP/1.1 200 OK");
        assert!(
            rest.contains(&format!("Content-Type: {CONTENT_TYPE}")),
            "{rest}"
        );
        let body = rest.split("\r\n\r\n").nth(1).unwrap();
        let len: usize = rest
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        for want in [
            "colo_checkpoints_total{trigger=\"mismatch\"} 3\n",
            "colo_checkpoints_total{trigger=\"periodic\"} 1\n",
            "colo_checkpoints_total{trigger=\"manual\"} 1\n",
            "# TYPE colo_pause_seconds summary\n",
            "colo_pause_seconds{quantile=\"0.5\"} 0.004\n",
            "colo_pause_seconds{quantile=\"0.99\"} 0.006\n",
            "colo_last_checkpoint_pages{set=\"a\"} 11\n",
            "colo_last_checkpoint_pages{set=\"b\"} 5\n",
            "colo_last_checkpoint_pages{set=\"d\"} 13\n",
            "colo_link_bytes_total{dir=\"out\"} 1000\n",
            "colo_link_bytes_total{dir=\"in\"} 77\n",
            "colo_protected 1\n",
            "colo_failovers_total 1\n",
            "colo_verify_failures_total 2\n",
            "colo_epoch 42\n",
            "colo_info{role=\"primary\",state=\"protected \\\"x\\\"\"} 1\n",
        ] {
            assert!(body.contains(want), "missing {want:?} in\n{body}");
        }
        // Every sample line is `name[{labels}] value` with a parsable value.
        for l in body.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap();
            assert!(v == "NaN" || v.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn empty_status_and_other_paths() {
        let st: Shared = Arc::new(Mutex::new(NodeStatus::default()));
        let addr = serve("127.0.0.1:0", st.clone()).unwrap();
        let (_, rest) = get(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n");
        assert!(
            rest.contains("colo_pause_seconds{quantile=\"0.5\"} NaN\n"),
            "{rest}"
        );
        assert!(rest.contains("colo_protected 0\n"), "{rest}");
        assert!(rest.contains("colo_failovers_total 0\n"), "{rest}");
        assert!(
            rest.contains("colo_last_checkpoint_pages{set=\"d\"} 0\n"),
            "{rest}"
        );

        st.lock().link_bytes_out = 5;
        let (_, rest) = get(addr, "GET /metrics HTTP/1.0\n\n");
        assert!(
            rest.contains("colo_link_bytes_total{dir=\"out\"} 5\n"),
            "{rest}"
        );

        let (line, _) = get(addr, "GET / HTTP/1.1\r\n\r\n");
        assert_eq!(line.trim_end(), "HTTP/1.1 404 Not Found");
        let (line, _) = get(addr, "POST /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(line.trim_end(), "HTTP/1.1 405 Method Not Allowed");
        let (line, rest) = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(line.trim_end(), "HTTP/1.1 200 OK");
        assert!(rest.ends_with("\r\n\r\n"), "{rest}");
        // Exactly MAX_HEAD bytes with no end of head (all read, so the close is clean).
        let (line, _) = get(addr, &format!("GET /{}", "a".repeat(MAX_HEAD - 5)));
        assert_eq!(
            line.trim_end(),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        // Still serving.
        let (line, _) = get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(line.trim_end(), "HTTP/1.1 200 OK");
    }

    #[test]
    fn bad_address_is_an_error() {
        let e = format!("{:#}", serve("not an address", status()).unwrap_err());
        assert!(
            e.contains("cannot listen for metrics on not an address"),
            "{e}"
        );
    }

    #[test]
    fn disk_figures_are_exported() {
        let s = NodeStatus {
            disk_blocks: 16_384,
            disk_blocks_sent: 120,
            disk_blocks_mirrored: 100,
            disk_verified_identical: 7,
            disk_verify_failures: 1,
            ..NodeStatus::default()
        };
        let body = render(&s);
        for want in [
            "colo_disk_blocks 16384\n",
            "colo_disk_blocks_sent_total 120\n",
            "colo_disk_blocks_mirrored_total 100\n",
            "colo_disk_verified_identical_total 7\n",
            "colo_disk_verify_failures_total 1\n",
        ] {
            assert!(body.contains(want), "missing {want:?} in\n{body}");
        }
    }
}

//! Test support (features `test-support` and `xen`): a throwaway network of namespaces and veth
//! pairs that stands for a Xen host's vifs and service bridge, for the network-path tests and
//! the vif bench. Everything a [`Lab`] creates is deleted when it drops (also after a failed
//! assertion), and its names carry the process id and a counter, so runs never collide.
//!
//! The guests' side: [`UdpResponder`] answers UDP requests from inside a namespace (a thread
//! that entered it), deterministically, so two replicas' answers compare equal; a request
//! starting with `who` is answered with the responder's own name, so replicas differ on it.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Whether this process runs as root (the lab needs it), from /proc/self/status.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Waits until `dev` (in namespace `ns`, or the root one) carries frames: its carrier is up and
/// the kernel's link watcher has replaced the `noop` qdisc, which drops every frame, as it
/// does some time after `ip link set up` (up to a second or more on a busy machine).
pub fn link_ready(ns: Option<&str>, dev: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let mut c = Command::new("ip");
        if let Some(ns) = ns {
            c.args(["-n", ns]);
        }
        let o = c
            .args(["link", "show", "dev", dev])
            .output()
            .context("running `ip` (iproute2)")?;
        let text = String::from_utf8_lossy(&o.stdout);
        if o.status.success() && text.contains("state UP") && !text.contains("qdisc noop") {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{dev} did not come up in 60 s: {}", text.trim());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// A set of namespaces and root-namespace links, deleted on drop.
#[derive(Debug)]
pub struct Lab {
    tag: String,
    namespaces: Vec<String>,
    links: Vec<String>,
}

impl Lab {
    /// A new lab, or None (with the reason printed) when not root.
    pub fn new() -> Option<Self> {
        if !is_root() {
            eprintln!("skipped: network namespaces and veth pairs need root (CI runs as root)");
            return None;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Some(Self {
            tag: format!("{:x}{n}", std::process::id() & 0xfffff),
            namespaces: Vec::new(),
            links: Vec::new(),
        })
    }

    /// `base` made unique to this lab (at most 15 bytes for a short base).
    pub fn name(&self, base: &str) -> String {
        format!("{base}{}", self.tag)
    }

    /// Creates namespace `name` (from [`Lab::name`]) with its loopback up.
    pub fn netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        for key in ["all", "default"] {
            ip_sysctl(Some(name), &format!("net/ipv6/conf/{key}/disable_ipv6"))?;
        }
        Ok(())
    }

    /// A veth pair: `a` in the root namespace (up, IPv6 off: the host's stack stays quiet on
    /// it), `b` moved into namespace `ns` as `b_name` and up.
    pub fn veth(&mut self, a: &str, b: &str, ns: &str, b_name: &str) -> Result<()> {
        ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
        self.links.push(a.to_string());
        ip_sysctl(None, &format!("net/ipv6/conf/{a}/disable_ipv6"))?;
        ip(&["link", "set", a, "up"])?;
        ip(&["link", "set", b, "netns", ns])?;
        if b != b_name {
            ip(&["-n", ns, "link", "set", b, "name", b_name])?;
        }
        ip(&["-n", ns, "link", "set", b_name, "up"])?;
        link_ready(None, a)?;
        link_ready(Some(ns), b_name)
    }

    /// The path `ip netns` keeps namespace `ns` under.
    pub fn ns_path(ns: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(ns)
    }
}

/// Writes 1 to /proc/sys/`key` inside namespace `ns` (or here).
fn ip_sysctl(ns: Option<&str>, key: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    match ns {
        None => std::fs::write(&path, "1").with_context(|| path.clone()),
        Some(ns) => {
            let p = path.clone();
            in_netns(ns, move || std::fs::write(&p, "1").map_err(Into::into))?
                .join()
                .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))?
                .with_context(|| format!("{path} in {ns}"))
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for l in self.links.drain(..) {
            let _ = Command::new("ip").args(["link", "del", &l]).output();
        }
        for ns in self.namespaces.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

/// Runs `f` on a new thread inside namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    let path = Lab::ns_path(ns);
    let ns = ns.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            colo_xen::enter_netns(&path).with_context(|| format!("entering netns {ns}"))?;
            f()
        })
        .context("spawning a namespace thread")
}

/// A deterministic UDP responder inside a namespace (see the module docs); stops on drop.
#[derive(Debug)]
pub struct UdpResponder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl UdpResponder {
    /// Answers on `addr` inside `ns`: `echo:` + the request, or `who:NAME` to a request
    /// starting with `who`.
    pub fn start(ns: &str, addr: SocketAddr, name: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, name) = (stop.clone(), name.to_string());
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let thread = in_netns(ns, move || {
            let sock = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let _ = ready_tx.send(());
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let req = &buf[..n];
                let mut out = Vec::with_capacity(n + 8);
                if req.starts_with(b"who") {
                    out.extend_from_slice(b"who:");
                    out.extend_from_slice(name.as_bytes());
                } else {
                    out.extend_from_slice(b"echo:");
                    out.extend_from_slice(req);
                }
                sock.send_to(&out, from)?;
            }
            Ok(())
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("the responder did not start")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! The arbiter runtime: one thread per node that holds, waits for, or watches the pair's serving
//! key in etcd, so that only one node of a pair ever serves (`--arbiter etcd://…`).
//!
//! The key is `/colo/<pair>/serving`; its value names the node holding it, and it is bound to
//! that node's lease (`--arbiter-ttl`). The rules, with colo-core's [`Lease`] doing the time
//! arithmetic:
//! - a primary puts the key before it serves and renews its lease every third of the TTL;
//!   alone (no secondary in lockstep) it releases output only while the lease is certainly
//!   held, and a primary that learns another node holds the key stops serving;
//! - a secondary takes over only once it has put the key itself — which etcd allows only after
//!   the old primary's lease expired (a dead primary: about one TTL; a primary cut from etcd:
//!   it stopped releasing a margin before that);
//! - while the pair is in lockstep, a secondary that sees the key vanish after a primary held
//!   it (the primary's lease expired: it is cut from etcd) takes the key and takes over.
//!
//! The thread never blocks the node loop: the node reads the outcome through [`Arbiter`]'s
//! methods, which take a lock for a few instructions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_core::lease::{Lease, LeaseConfig, LeaseState, LostReason};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::etcd::{Etcd, EtcdError, PutOutcome};

/// What a node does when a failure finds the arbiter unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Unreachable {
    /// Keep trying until the arbiter answers (a lone primary holds its output meanwhile; a
    /// secondary does not take over).
    #[default]
    Wait,
    /// Exit 1: "no takeover without the arbiter".
    Exit,
}

/// How a node reaches its arbiter.
#[derive(Debug, Clone)]
pub struct ArbiterConfig {
    /// `etcd://HOST:PORT[,HOST:PORT…]`.
    pub url: String,
    /// The pair's name: both nodes of a pair use the same one, different pairs differ.
    pub pair: String,
    /// The lease's time to live (whole seconds; at least 1 s).
    pub ttl: Duration,
    /// This node's name in the key (role and address, e.g. `primary@10.0.0.1:7000`).
    pub name: String,
    /// What to do when a failure finds the arbiter unreachable.
    pub unreachable: Unreachable,
}

impl ArbiterConfig {
    /// The serving key.
    pub fn key(&self) -> String {
        format!("/colo/{}/serving", self.pair)
    }
}

/// What `colo status` and the metrics show of the arbiter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArbiterStatus {
    /// The serving key.
    pub key: String,
    /// Who holds the key, as last seen (this node's name when it does).
    pub holder: Option<String>,
    /// True while this node certainly holds the key.
    pub holding: bool,
    /// How long this node's lease is still certainly held, in ms.
    pub lease_remaining_ms: u64,
    /// Milliseconds since this node's lease was last granted or renewed.
    pub last_renewal_ms_ago: Option<u64>,
    /// The lease's state (`AwaitingGrant`, `Holding`, `Lost`).
    pub state: String,
    /// The last failed request, until one succeeds.
    pub last_error: Option<String>,
}

#[derive(Debug)]
struct Inner {
    cfg: ArbiterConfig,
    lease: Mutex<Lease>,
    /// Who holds the key, as last seen; `seen_held` once anyone other than us was seen.
    holder: Mutex<Holder>,
    want: AtomicBool,
    stop: AtomicBool,
}

#[derive(Debug, Default)]
struct Holder {
    name: Option<String>,
    /// Another node was seen holding the key at some point.
    seen_other: bool,
    /// When this node first saw another node hold the key while it wanted it.
    other_since: Option<Instant>,
    /// The last read of the key succeeded.
    read_ok: bool,
}

/// The handle a node keeps; the thread stops when it is dropped.
#[derive(Debug)]
pub struct Arbiter {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Arbiter {
    /// Starts the thread. `want_key`: put the key as soon as it is free (a primary); otherwise
    /// only watch it until [`Arbiter::want_key`] (a secondary).
    pub fn start(cfg: ArbiterConfig, want_key: bool) -> Result<Arbiter, EtcdError> {
        let etcd = Etcd::parse(&cfg.url, request_timeout(cfg.ttl))?;
        let ttl = Duration::from_secs(cfg.ttl.as_secs().max(1));
        let inner = Arc::new(Inner {
            lease: Mutex::new(Lease::new(LeaseConfig::for_ttl(ttl))),
            cfg: ArbiterConfig { ttl, ..cfg },
            holder: Mutex::new(Holder::default()),
            want: AtomicBool::new(want_key),
            stop: AtomicBool::new(false),
        });
        let run = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("arbiter".into())
            .spawn(move || run.run(etcd))
            .map_err(|e| EtcdError::Unreachable {
                tried: "(no thread)".into(),
                last: e.to_string(),
            })?;
        tracing::info!(
            "arbiter: etcd {} key {} ttl {} s, {}",
            inner.cfg.url,
            inner.cfg.key(),
            ttl.as_secs(),
            if want_key {
                "putting the key before serving"
            } else {
                "watching the key"
            }
        );
        Ok(Arbiter {
            inner,
            thread: Some(thread),
        })
    }

    /// From now on, put the key as soon as it is free (a secondary about to take over).
    pub fn want_key(&self) {
        if !self.inner.want.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                "arbiter: this node wants the serving key {} (it takes over only once it holds it)",
                self.inner.cfg.key()
            );
        }
    }

    /// True while this node certainly holds the key.
    pub fn holds_key(&self, now: Instant) -> bool {
        self.inner.lease.lock().certainly_valid(now)
    }

    /// Whether a primary may release output now (see [`colo_core::lease::may_release`]).
    pub fn may_release(&self, lockstep: bool, now: Instant) -> bool {
        colo_core::lease::may_release(Some(&self.inner.lease.lock()), lockstep, now)
    }

    /// Why this node can never hold the key again in this run, if so: another node holds it
    /// (seen after this node held it), so this node was dropped.
    pub fn dropped(&self) -> Option<String> {
        match self.inner.lease.lock().state() {
            LeaseState::Lost(LostReason::TakenBy(who)) => Some(who.clone()),
            _ => None,
        }
    }

    /// True when the key vanished after another node was seen holding it: that node's lease
    /// expired (it died or is cut from etcd).
    pub fn lapsed(&self) -> bool {
        let h = self.inner.holder.lock();
        h.seen_other && h.read_ok && h.name.is_none()
    }

    /// While wanting the key: who else holds it, and for how long this node has seen that.
    pub fn held_by_other(&self, now: Instant) -> Option<(String, Duration)> {
        let h = self.inner.holder.lock();
        let since = h.other_since?;
        Some((h.name.clone()?, now.saturating_duration_since(since)))
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.inner.cfg.ttl
    }

    /// The settings.
    pub fn config(&self) -> &ArbiterConfig {
        &self.inner.cfg
    }

    /// True when this node's lease has run down unrenewed (past `sent + ttl` of the last
    /// success): the arbiter may have given the key to another node.
    pub fn run_down(&self, now: Instant) -> bool {
        self.inner.lease.lock().run_down(now)
    }

    /// True while the last request to the arbiter failed.
    pub fn unreachable(&self) -> Option<String> {
        let lease = self.inner.lease.lock();
        let h = self.inner.holder.lock();
        (!h.read_ok || lease.last_error().is_some())
            .then(|| lease.last_error().unwrap_or("no answer yet").to_string())
    }

    /// The state, for status and metrics.
    pub fn status(&self, now: Instant) -> ArbiterStatus {
        let lease = self.inner.lease.lock();
        let holder = self.inner.holder.lock();
        ArbiterStatus {
            key: self.inner.cfg.key(),
            holder: holder.name.clone(),
            holding: lease.certainly_valid(now),
            lease_remaining_ms: lease.remaining(now).as_millis() as u64,
            last_renewal_ms_ago: lease
                .renewed_at()
                .map(|t| now.saturating_duration_since(t).as_millis() as u64),
            state: lease.state_name().to_string(),
            last_error: lease.last_error().map(str::to_string),
        }
    }
}

impl Drop for Arbiter {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Each request's deadline: a third of the TTL, so a dead endpoint leaves time for another.
fn request_timeout(ttl: Duration) -> Duration {
    (ttl / 3).clamp(Duration::from_millis(200), Duration::from_secs(2))
}

impl Inner {
    fn run(&self, mut etcd: Etcd) {
        let poll = (self.cfg.ttl / 6).max(Duration::from_millis(100));
        let mut granted: Option<i64> = None;
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let state = self.lease.lock().state().clone();
            match state {
                LeaseState::Holding { .. } => self.renew(&mut etcd, now),
                _ if self.want.load(Ordering::SeqCst) => {
                    granted = self.acquire(&mut etcd, granted);
                }
                _ => self.watch(&mut etcd),
            }
            let due = {
                let l = self.lease.lock();
                match l.state() {
                    LeaseState::Holding { sent, .. } => {
                        (*sent + l.config().renew_every).saturating_duration_since(Instant::now())
                    }
                    _ => poll,
                }
            };
            sleep_unless_stopped(&self.stop, due.min(poll));
        }
        // An orderly stop gives the key up at once, so a successor need not wait a TTL.
        let lease = self.lease.lock().state().clone();
        if let LeaseState::Holding { id, .. } = lease {
            match etcd.revoke(id) {
                Ok(()) => tracing::info!("arbiter: gave up the serving key"),
                Err(e) => tracing::warn!("arbiter: giving up the serving key failed: {e}"),
            }
        }
    }

    fn renew(&self, etcd: &mut Etcd, now: Instant) {
        let id = {
            let mut l = self.lease.lock();
            if !l.renew_due(now) {
                return;
            }
            match l.renew_sent(now) {
                Ok(id) => id,
                Err(_) => return,
            }
        };
        let sent_at = now;
        let answer = etcd.keepalive(id);
        let mut l = self.lease.lock();
        match answer {
            Ok(ttl) => {
                if l.last_error().is_some() && !ttl.is_zero() {
                    tracing::warn!("arbiter: the lease is renewed again");
                }
                let _ = l.renewed(ttl, Instant::now());
                if ttl.is_zero() {
                    tracing::error!(
                        "arbiter: etcd let this node's lease expire; it stops releasing output \
                         alone and tries to put the key again"
                    );
                }
            }
            Err(e) => {
                // Said once per run of failures, and again when the lease runs out.
                let now = Instant::now();
                if l.last_error().is_none() {
                    tracing::warn!(
                        "arbiter: renewing the lease failed ({e}); certainly held for {} ms \
                         more; retrying",
                        l.remaining(now).as_millis()
                    );
                } else if l.certainly_valid(sent_at) && !l.certainly_valid(now) {
                    tracing::error!(
                        "arbiter: the lease is no longer certain ({e}); alone, this node holds \
                         its output until a renewal succeeds"
                    );
                }
                l.renew_failed(e.to_string());
            }
        }
    }

    /// Grants a lease (reusing one granted before that is still unused) and puts the key.
    fn acquire(&self, etcd: &mut Etcd, granted: Option<i64>) -> Option<i64> {
        let sent = Instant::now();
        let reused = granted.and_then(|id| {
            let ttl = etcd.keepalive(id).ok()?;
            (!ttl.is_zero()).then_some((id, ttl))
        });
        let (id, ttl) = match reused {
            Some(g) => g,
            None => self.grant(etcd)?,
        };
        let key = self.cfg.key();
        match etcd.put_if_absent(&key, &self.cfg.name, id) {
            Ok(PutOutcome::Put) => {
                self.lease.lock().granted(id, ttl, sent, Instant::now());
                let mut h = self.holder.lock();
                h.name = Some(self.cfg.name.clone());
                h.other_since = None;
                h.read_ok = true;
                tracing::warn!(
                    "arbiter: this node ({}) holds the serving key {key} (lease {id:#x}, ttl {} s)",
                    self.cfg.name,
                    ttl.as_secs()
                );
                None
            }
            Ok(PutOutcome::Held { value, .. }) => {
                self.saw(Some(value.clone()), true);
                // A node that held the key and finds another holding it was dropped.
                let mut l = self.lease.lock();
                if matches!(l.state(), LeaseState::Lost(_)) && value != self.cfg.name {
                    tracing::error!(
                        "arbiter: {value} holds the serving key: this node was dropped"
                    );
                    l.lost(LostReason::TakenBy(value));
                }
                Some(id)
            }
            Err(e) => {
                self.lease.lock().renew_failed(e.to_string());
                self.holder.lock().read_ok = false;
                Some(id)
            }
        }
    }

    fn grant(&self, etcd: &mut Etcd) -> Option<(i64, Duration)> {
        match etcd.grant(self.cfg.ttl) {
            Ok(g) => Some(g),
            Err(e) => {
                self.lease.lock().renew_failed(e.to_string());
                self.holder.lock().read_ok = false;
                None
            }
        }
    }

    fn watch(&self, etcd: &mut Etcd) {
        match etcd.get(&self.cfg.key()) {
            Ok(kv) => self.saw(kv.map(|kv| kv.value), false),
            Err(e) => {
                self.holder.lock().read_ok = false;
                self.lease.lock().renew_failed(e.to_string());
            }
        }
    }

    /// Records who holds the key (None: nobody).
    fn saw(&self, name: Option<String>, wanting: bool) {
        let mut h = self.holder.lock();
        if name != h.name {
            match &name {
                Some(n) => tracing::info!("arbiter: {n} holds the serving key"),
                None => tracing::warn!("arbiter: nobody holds the serving key"),
            }
        }
        let other = name.as_ref().is_some_and(|n| *n != self.cfg.name);
        h.seen_other |= other;
        h.other_since = match (other && wanting, h.other_since) {
            (true, Some(t)) => Some(t),
            (true, None) => Some(Instant::now()),
            (false, _) => None,
        };
        h.name = name;
        h.read_ok = true;
    }
}

fn sleep_unless_stopped(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

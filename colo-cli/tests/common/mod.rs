//! Shared helpers of the failover tests: a guest wrapper that kills its node at a chosen backend
//! call (so a node dies in a precise protocol phase), a replicated pair of in-process nodes over
//! real loopback sockets with fault proxies in between, a verifying kv client on its own thread,
//! seeded randomness and a distribution printer. `speed.rs` measures the machine's slowness,
//! which stretches every timeout and wait budget of the tests.

#![allow(dead_code)]

pub mod speed;

pub use speed::scaled;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use colo_cli::faultproxy::{FaultProxy, KillSwitch};
use colo_cli::kvclient::{ClientStats, KvClient};
use colo_cli::mock::{build, MockSpec, WorkloadKind};
use colo_cli::node::{new_status, NodeOptions, PrimaryNode, SecondaryOutcome, SnapshotHook};
use colo_cli::status::Shared;
use colo_cli::tamper::{Plan, Tampering};
use colo_cli::testing::spawn_secondary;
use colo_core::compare::CompareConfig;
use colo_core::engine::Liveness;
use colo_core::policy::CheckpointPolicy;
use colo_core::{BackendError, DirtyBitmap, Domain, GuestNic, PageVisitor};
use colo_mock::MockDomain;
use parking_lot::Mutex;

/// How long a node loop waits for input per step.
pub const STEP: Duration = Duration::from_micros(500);

/// splitmix64: the tests' seeded randomness.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A backend call at which a node can be made to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Pause,
    Resume,
    Harvest,
    ReadPages,
    WritePages,
    GetState,
    SetState,
    Inject,
    DrainTx,
}

/// Before or after the call does its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum When {
    Before,
    After,
}

/// When a node dies: at the `nth` call of `op` (`when` it) after the trip is armed. Once the
/// node's switch has fired, every backend call fails, so the node's loop ends at once.
#[derive(Debug)]
pub struct Trip {
    pub op: Op,
    pub when: When,
    pub nth: u64,
    armed: AtomicBool,
    count: AtomicU64,
    pub switch: Arc<KillSwitch>,
    /// Every call of this op sleeps this long first (a slow hypervisor), armed or not.
    slow: Mutex<Option<(Op, Duration)>>,
}

impl Trip {
    pub fn new(op: Op, when: When, nth: u64, switch: Arc<KillSwitch>) -> Arc<Self> {
        Arc::new(Self {
            op,
            when,
            nth,
            armed: AtomicBool::new(false),
            count: AtomicU64::new(0),
            switch,
            slow: Mutex::new(None),
        })
    }

    /// From now on every call of `op` takes at least `d`.
    pub fn slow_down(&self, op: Op, d: Duration) {
        *self.slow.lock() = Some((op, d));
    }

    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn check(&self, op: Op, when: When) -> Result<(), BackendError> {
        let dead = || BackendError::BadState {
            op: "fault injection",
            reason: "the node was killed".into(),
        };
        if self.switch.is_killed() {
            return Err(dead());
        }
        let slow = *self.slow.lock();
        if let Some((_, d)) = slow.filter(|(o, _)| *o == op && when == When::Before) {
            std::thread::sleep(d);
        }
        if self.armed.load(Ordering::SeqCst)
            && op == self.op
            && when == self.when
            && self.count.fetch_add(1, Ordering::SeqCst) + 1 == self.nth
        {
            self.switch.kill();
            return Err(dead());
        }
        Ok(())
    }
}

/// A guest that dies on its trip.
pub struct Faulty {
    pub inner: MockDomain,
    pub trip: Arc<Trip>,
}

impl Faulty {
    fn around<T>(
        &mut self,
        op: Op,
        f: impl FnOnce(&mut MockDomain) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.trip.check(op, When::Before)?;
        let r = f(&mut self.inner)?;
        self.trip.check(op, When::After)?;
        Ok(r)
    }
}

impl Domain for Faulty {
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }
    fn pause(&mut self) -> Result<(), BackendError> {
        self.around(Op::Pause, |d| d.pause())
    }
    fn resume(&mut self) -> Result<(), BackendError> {
        self.around(Op::Resume, |d| d.resume())
    }
    fn is_paused(&self) -> bool {
        self.inner.is_paused()
    }
    fn start_dirty_log(&mut self) -> Result<(), BackendError> {
        self.inner.start_dirty_log()
    }
    fn stop_dirty_log(&mut self) -> Result<(), BackendError> {
        self.inner.stop_dirty_log()
    }
    fn harvest_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.around(Op::Harvest, |d| d.harvest_dirty(into))
    }
    fn peek_dirty(&mut self, into: &mut DirtyBitmap) -> Result<(), BackendError> {
        self.inner.peek_dirty(into)
    }
    fn read_pages(
        &mut self,
        pfns: &[u64],
        visit: &mut PageVisitor<'_>,
    ) -> Result<(), BackendError> {
        self.around(Op::ReadPages, |d| d.read_pages(pfns, visit))
    }
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), BackendError> {
        self.around(Op::WritePages, |d| d.write_pages(pfns, data))
    }
    fn get_state(&mut self, out: &mut Vec<u8>) -> Result<(), BackendError> {
        self.around(Op::GetState, |d| d.get_state(out))
    }
    fn set_state(&mut self, blob: &[u8]) -> Result<(), BackendError> {
        self.around(Op::SetState, |d| d.set_state(blob))
    }
}

impl GuestNic for Faulty {
    fn rx_next_seq(&self) -> u64 {
        GuestNic::rx_next_seq(&self.inner)
    }
    fn inject(&mut self, seq: u64, frame: &[u8]) -> Result<bool, BackendError> {
        self.around(Op::Inject, |d| GuestNic::inject(d, seq, frame))
    }
    fn drain_tx(&mut self, out: &mut dyn FnMut(&[u8])) {
        // A dead node emits nothing.
        if self.trip.check(Op::DrainTx, When::Before).is_ok() {
            GuestNic::drain_tx(&mut self.inner, out);
        }
    }
}

/// Which node dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    Primary,
    Secondary,
}

/// (epoch → hash of RAM and state) recorded by a node's snapshot hook.
pub type Snapshots = Arc<Mutex<BTreeMap<u64, u64>>>;

fn snapshot_hook(into: Snapshots) -> SnapshotHook {
    Arc::new(move |epoch, ram, state| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ram.hash(&mut h);
        state.hash(&mut h);
        into.lock().insert(epoch, h.finish());
    })
}

/// Settings of a pair.
#[derive(Debug, Clone)]
pub struct PairConfig {
    pub seed: u64,
    pub ram: u64,
    pub victim: Victim,
    pub liveness: Liveness,
    pub policy: CheckpointPolicy,
    pub fence_cmd: Option<String>,
    pub output_divergence: f64,
    /// The trip of the victim's guest (the other node's never fires).
    pub trip: Option<(Op, When, u64)>,
    /// The link's pre-shared key (both nodes): the link is sealed.
    pub key: Option<Vec<u8>>,
    /// Tampering with the replication link's sealed records (needs `key`), armed by the test.
    pub tamper: Option<Plan>,
}

impl PairConfig {
    /// A pair whose silence and progress timeouts are what a quiet machine needs (100 ms, 5 s)
    /// stretched by the machine's measured [`speed::slowness`]: a busy machine starves a live
    /// node's threads for longer, and that must not pass for a dead peer.
    pub fn new(seed: u64, victim: Victim) -> Self {
        Self {
            seed,
            ram: 4 << 20,
            victim,
            liveness: Liveness {
                interval: Duration::from_millis(20),
                timeout: scaled(Duration::from_millis(100)),
                progress_timeout: scaled(Duration::from_secs(5)),
            },
            policy: CheckpointPolicy {
                min_interval: Duration::from_millis(1),
                max_interval: Duration::from_millis(4),
            },
            fence_cmd: None,
            output_divergence: 0.02,
            trip: None,
            key: None,
            tamper: None,
        }
    }
}

/// How the secondary's thread ended.
#[derive(Debug)]
pub enum SecondaryEnd {
    Stopped,
    /// Took over, then served as primary until stopped.
    TookOver,
}

/// A replicated pair on loopback: secondary ← repl proxy ← primary, and the primary's clients
/// through a client proxy. The victim's switch owns the repl proxy (and, when the primary is
/// the victim, the client proxy): when it fires, the victim is cut off from everything at once.
pub struct Pair {
    pub switch: Arc<KillSwitch>,
    pub repl: FaultProxy,
    pub client_proxy: FaultProxy,
    pub pstatus: Shared,
    pub sstatus: Shared,
    pub ptrip: Arc<Trip>,
    pub strip: Arc<Trip>,
    pub psnap: Snapshots,
    pub ssnap: Snapshots,
    /// Client addresses: the primary's (through the proxy), then the secondary's.
    pub client_addrs: Vec<String>,
    /// When the secondary's run() returned TookOver.
    pub took_over_at: Arc<Mutex<Option<Instant>>>,
    /// The last epoch the secondary had applied when it took over.
    pub takeover_epoch: Arc<Mutex<Option<u64>>>,
    /// The replication link's tampering plan, if the config has one.
    pub tampering: Option<Arc<Tampering>>,
    pstop: Arc<Mutex<Option<Arc<AtomicBool>>>>,
    sstop: Arc<AtomicBool>,
    sstop_node: Arc<Mutex<Option<Arc<AtomicBool>>>>,
    primary: Mutex<Option<JoinHandle<Result<()>>>>,
    secondary: Mutex<Option<JoinHandle<Result<SecondaryEnd>>>>,
}

/// A loopback address free now, for a node to bind later. Taken below Linux's ephemeral range
/// (32768–60999), so no outgoing connection of this or another test can take it meanwhile.
fn free_addr() -> Result<String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = 20000 + (u64::from(std::process::id()) * 97) % 12000;
    for _ in 0..12000 {
        let port = 20000 + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 12000;
        let addr = format!("127.0.0.1:{port}");
        if TcpListener::bind(&addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no free loopback port in 20000..32000")
}

/// The nodes' default options with every timeout in them (silence, progress, connect, the
/// comparator's hold) stretched by the machine's measured [`speed::slowness`]: what is far above a
/// quiet machine's delays must stay so on a busy one.
pub fn node_options() -> NodeOptions {
    let d = NodeOptions::default();
    NodeOptions {
        liveness: Liveness {
            timeout: scaled(d.liveness.timeout),
            progress_timeout: scaled(d.liveness.progress_timeout),
            ..d.liveness
        },
        connect_timeout: scaled(d.connect_timeout),
        compare: CompareConfig {
            timeout: scaled(d.compare.timeout),
            ..d.compare
        },
        ..d
    }
}

/// A kv guest with both divergences on.
pub fn spec(seed: u64, ram: u64, output_divergence: f64) -> MockSpec {
    MockSpec {
        ram,
        ram_file: None,
        workload: WorkloadKind::Kv,
        vm_seed: seed,
        memory_divergence: true,
        output_divergence,
        dirty_rate: 0,
    }
}

impl Pair {
    pub fn start(cfg: &PairConfig) -> Result<Self> {
        let pswitch = KillSwitch::new();
        let sswitch = KillSwitch::new();
        let (vswitch, other) = match cfg.victim {
            Victim::Primary => (pswitch.clone(), sswitch.clone()),
            Victim::Secondary => (sswitch.clone(), pswitch.clone()),
        };
        let _ = other;
        let (pt, st) = match (cfg.victim, cfg.trip) {
            (Victim::Primary, Some((op, w, n))) => (Some((op, w, n)), None),
            (Victim::Secondary, Some((op, w, n))) => (None, Some((op, w, n))),
            (_, None) => (None, None),
        };
        let never = (Op::Pause, When::Before, u64::MAX);
        let (op, w, n) = pt.unwrap_or(never);
        let ptrip = Trip::new(op, w, n, pswitch.clone());
        let (op, w, n) = st.unwrap_or(never);
        let strip = Trip::new(op, w, n, sswitch.clone());

        let c1 = free_addr()?;
        let c2 = free_addr()?;
        let client_proxy = FaultProxy::start(
            c1.parse()?,
            // A dead primary's clients are cut with it; a dead secondary's are not its own.
            pswitch.clone(),
            cfg.seed ^ 1,
        )?;

        let psnap: Snapshots = Arc::default();
        let ssnap: Snapshots = Arc::default();
        let base = NodeOptions {
            liveness: cfg.liveness,
            policy: cfg.policy,
            connect_timeout: scaled(Duration::from_secs(10)),
            key: cfg.key.clone(),
            ..NodeOptions::default()
        };
        let sopts = NodeOptions {
            client_addr: Some(c2.clone()),
            fence_cmd: cfg.fence_cmd.clone(),
            snapshot: Some(snapshot_hook(ssnap.clone())),
            ..base.clone()
        };
        let popts = NodeOptions {
            client_addr: Some(c1.clone()),
            snapshot: Some(snapshot_hook(psnap.clone())),
            ..base
        };

        let pstatus = new_status();
        let sstatus = new_status();
        let took_over_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let takeover_epoch: Arc<Mutex<Option<u64>>> = Arc::default();
        let sstop = Arc::new(AtomicBool::new(false));
        let sstop_node: Arc<Mutex<Option<Arc<AtomicBool>>>> = Arc::default();
        let pstop: Arc<Mutex<Option<Arc<AtomicBool>>>> = Arc::default();

        let sguest = Faulty {
            inner: build(&spec(
                cfg.seed.wrapping_mul(2) | 1,
                cfg.ram,
                cfg.output_divergence,
            ))?,
            trip: strip.clone(),
        };
        let secondary = {
            let (status, tat, tep, stop, slot, snaps) = (
                sstatus.clone(),
                took_over_at.clone(),
                takeover_epoch.clone(),
                sstop.clone(),
                sstop_node.clone(),
                ssnap.clone(),
            );
            spawn_secondary(sguest, sopts, status, move |node| -> Result<SecondaryEnd> {
                *slot.lock() = Some(node.stop_flag());
                if stop.load(Ordering::SeqCst) {
                    return Ok(SecondaryEnd::Stopped);
                }
                match node.run()? {
                    SecondaryOutcome::Stopped => Ok(SecondaryEnd::Stopped),
                    SecondaryOutcome::TookOver(mut p) => {
                        *tat.lock() = Some(Instant::now());
                        *tep.lock() = snaps.lock().keys().next_back().copied();
                        while !stop.load(Ordering::SeqCst) {
                            p.step(STEP)?;
                        }
                        Ok(SecondaryEnd::TookOver)
                    }
                }
            })?
        };
        let repl_target: SocketAddr = secondary.addr.parse()?;
        let repl = FaultProxy::start(repl_target, vswitch.clone(), cfg.seed)?;
        let tampering = cfg.tamper.map(|plan| {
            let t = Tampering::new(plan, cfg.key.as_deref().unwrap_or_default());
            repl.tamper(t.clone());
            t
        });

        let mut pguest = Faulty {
            inner: build(&spec(
                cfg.seed.wrapping_mul(2),
                cfg.ram,
                cfg.output_divergence,
            ))?,
            trip: ptrip.clone(),
        };
        pguest.inner.resume()?;
        let primary = {
            let (status, slot) = (pstatus.clone(), pstop.clone());
            let peer = repl.addr().to_string();
            std::thread::Builder::new()
                .name("primary".into())
                .spawn(move || -> Result<()> {
                    let mut node = PrimaryNode::connect(pguest, &peer, popts, status)?;
                    *slot.lock() = Some(node.stop_flag());
                    node.run()
                })?
        };
        Ok(Self {
            switch: vswitch,
            repl,
            client_addrs: vec![client_proxy.addr().to_string(), c2],
            client_proxy,
            pstatus,
            sstatus,
            ptrip,
            strip,
            psnap,
            ssnap,
            took_over_at,
            takeover_epoch,
            tampering,
            pstop,
            sstop,
            sstop_node,
            primary: Mutex::new(Some(primary)),
            secondary: Mutex::new(Some(secondary.handle)),
        })
    }

    /// Arms the victim's trip.
    pub fn arm(&self, victim: Victim) {
        match victim {
            Victim::Primary => self.ptrip.arm(),
            Victim::Secondary => self.strip.arm(),
        }
    }

    /// Waits until the primary committed `n` checkpoints; `limit` is what a quiet machine
    /// needs at most, stretched here by the measured [`speed::slowness`].
    pub fn wait_checkpoints(&self, n: u64, limit: Duration) -> Result<()> {
        let limit = scaled(limit);
        let t = Instant::now();
        while self.pstatus.lock().checkpoints < n {
            if t.elapsed() > limit {
                let (done, pstate, preason) = {
                    let st = self.pstatus.lock();
                    (st.checkpoints, st.state.clone(), st.failover_reason.clone())
                };
                let (sstate, sreason) = {
                    let st = self.sstatus.lock();
                    (st.state.clone(), st.failover_reason.clone())
                };
                bail!(
                    "only {done} of {n} checkpoints after {limit:?} (primary state {pstate}, \
                     lost: {preason:?}; secondary {sstate}, lost: {sreason:?})"
                );
            }
            self.check_threads()?;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Fails if a node thread ended although nobody killed it.
    fn check_threads(&self) -> Result<()> {
        if self.switch.is_killed() {
            return Ok(());
        }
        let reasons = format!(
            "primary lost the peer: {:?}; secondary: {:?}",
            self.pstatus.lock().failover_reason.clone(),
            self.sstatus.lock().failover_reason.clone()
        );
        if self.primary_finished() {
            if let Some(h) = self.primary.lock().take() {
                let r = h.join();
                bail!("the primary stopped although nothing was injected: {r:?} ({reasons})");
            }
        }
        if self.secondary_finished() {
            if let Some(h) = self.secondary.lock().take() {
                let r = h.join();
                bail!("the secondary stopped although nothing was injected: {r:?} ({reasons})");
            }
        }
        Ok(())
    }

    /// Waits for `cond`, polling; `limit` is what a quiet machine needs at most, stretched here
    /// by the measured [`speed::slowness`].
    pub fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&Self) -> bool,
    ) -> Result<()> {
        let limit = scaled(limit);
        let t = Instant::now();
        while !cond(self) {
            if t.elapsed() > limit {
                let pstate = self.pstatus.lock().state.clone();
                let sstate = self.sstatus.lock().state.clone();
                bail!(
                    "timed out after {limit:?} waiting for {what} (primary {pstate} / \
                     secondary {sstate})"
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    pub fn primary_finished(&self) -> bool {
        self.primary.lock().as_ref().is_none_or(|h| h.is_finished())
    }

    pub fn secondary_finished(&self) -> bool {
        self.secondary
            .lock()
            .as_ref()
            .is_none_or(|h| h.is_finished())
    }

    /// Every checkpoint the secondary applied equals the primary's capture of that epoch.
    pub fn check_snapshots(&self) -> Result<usize> {
        let (p, s) = (self.psnap.lock(), self.ssnap.lock());
        for (epoch, h) in s.iter() {
            match p.get(epoch) {
                Some(ph) if ph == h => {}
                Some(_) => bail!("the SVM applied checkpoint {epoch} but differs from the PVM's"),
                None if *epoch == 0 => {}
                None => bail!("the SVM applied checkpoint {epoch} the PVM never captured"),
            }
        }
        Ok(s.len())
    }

    /// Stops both nodes; returns (primary's result, secondary's result).
    pub fn stop(self) -> (Result<()>, Result<SecondaryEnd>) {
        self.sstop.store(true, Ordering::SeqCst);
        let t = Instant::now();
        let limit = scaled(Duration::from_secs(5));
        // The stop flags are set once the nodes exist; wait for them (bounded).
        while t.elapsed() < limit {
            let ps = self.pstop.lock().clone();
            let ss = self.sstop_node.lock().clone();
            if let Some(f) = &ps {
                f.store(true, Ordering::SeqCst);
            }
            if let Some(f) = &ss {
                f.store(true, Ordering::SeqCst);
            }
            if self.primary_finished() && self.secondary_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let join = |h: Option<JoinHandle<Result<()>>>| match h {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("primary thread panicked"))),
            None => Ok(()),
        };
        let p = join(self.primary.lock().take());
        let s = match self.secondary.lock().take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("secondary thread panicked"))),
            None => Ok(SecondaryEnd::Stopped),
        };
        (p, s)
    }
}

/// What the client thread saw.
#[derive(Debug)]
pub struct ClientReport {
    pub stats: ClientStats,
    /// From the kill to the first answer from the survivor (an answer after the client moved,
    /// or any answer after the kill when it did not need to move).
    pub serve_after_kill: Option<Duration>,
    pub ops_after_kill: u64,
}

/// A verifying kv client running random operations on its own thread until stopped, then
/// reading back every key it wrote.
pub struct ClientThread {
    stop: Arc<AtomicBool>,
    pub ops_after_kill: Arc<AtomicU64>,
    handle: JoinHandle<Result<ClientReport>>,
}

impl ClientThread {
    pub fn start(addrs: Vec<String>, seed: u64, switch: Arc<KillSwitch>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let after = Arc::new(AtomicU64::new(0));
        let (s2, a2) = (stop.clone(), after.clone());
        let port = 40000 + (seed % 20000) as u16;
        let (timeout, budget) = (
            scaled(Duration::from_secs(3)),
            scaled(Duration::from_secs(15)),
        );
        let handle = std::thread::Builder::new().name("kv-client".into()).spawn(
            move || -> Result<ClientReport> {
                let mut c = KvClient::new(addrs, port, timeout);
                let mut rng = seed | 1;
                let mut failovers_before: Option<u64> = None;
                let mut serve: Option<Duration> = None;
                while !s2.load(Ordering::SeqCst) {
                    let before = c.stats.failovers;
                    c.random_op(&mut rng, 48, Instant::now() + budget)?;
                    let done = Instant::now();
                    if let Some(k) = switch.killed_at() {
                        if done > k {
                            a2.fetch_add(1, Ordering::SeqCst);
                            let fb = *failovers_before.get_or_insert(before);
                            if serve.is_none() && (c.stats.failovers > fb || c.stats.failovers == 0)
                            {
                                serve = Some(done - k);
                            }
                        }
                    }
                }
                c.verify_all(Instant::now() + budget)?;
                Ok(ClientReport {
                    stats: c.stats.clone(),
                    serve_after_kill: serve,
                    ops_after_kill: a2.load(Ordering::SeqCst),
                })
            },
        )?;
        Ok(Self {
            stop,
            ops_after_kill: after,
            handle,
        })
    }

    pub fn finish(self) -> Result<ClientReport> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .unwrap_or_else(|_| Err(anyhow!("client thread panicked")))
    }
}

/// p50/p90/max of `v` (ms), or "n/a".
pub fn distribution(v: &mut [f64]) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!(
        "n={} p50={:.1} ms p90={:.1} ms max={:.1} ms",
        v.len(),
        q(0.5),
        q(0.9),
        v[v.len() - 1]
    )
}

/// Counts by label.
pub fn histogram(labels: &[String]) -> String {
    let mut m: HashMap<&str, usize> = HashMap::new();
    for l in labels {
        *m.entry(l.as_str()).or_default() += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort();
    v.iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The checkpoints both nodes recorded (`p`: the PVM at each capture, `s`: the SVM right after
/// applying it), compared: how many epochs both sides hold, and those whose records differ.
pub fn compare_epochs<V: PartialEq>(
    p: &std::collections::HashMap<u64, V>,
    s: &std::collections::HashMap<u64, V>,
) -> (usize, Vec<u64>) {
    let mut compared = 0;
    let mut differing = Vec::new();
    for (epoch, pv) in p {
        if let Some(sv) = s.get(epoch) {
            compared += 1;
            if pv != sv {
                differing.push(*epoch);
            }
        }
    }
    (compared, differing)
}

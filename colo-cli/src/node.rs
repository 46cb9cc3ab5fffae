//! The node drivers: the IO around colo-core's state machines. One thread per node owns the
//! backend, the replication link, the comparator and the client hub, and executes the machines'
//! actions in order. Everything the hot path (the primary's pause) touches is allocated once and
//! reused: the copy buffer, the state buffer, the bitmaps inside the machines.

use std::collections::VecDeque;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use colo_core::bitmap::DirtyBitmap;
use colo_core::compare::{Comparator, CompareConfig};
use colo_core::engine::messages::Message;
use colo_core::engine::{
    CheckpointStats, Delivery, Liveness, Primary, PrimaryAction, PrimaryConfig, PrimaryState,
    Secondary, SecondaryAction, SecondaryConfig, SecondaryState, SyncMode, Trigger, Verdict,
    DIGEST_LEN,
};
use colo_core::policy::{CheckpointPolicy, CheckpointReason};
use colo_core::stream::{
    encode_page_data_header, DecoderConfig, Event, PageType, MAX_PAGES_PER_RECORD,
};
use colo_core::{BackendError, Domain, PAGE_SIZE};
use parking_lot::Mutex;

use crate::clients::ClientHub;
use crate::control::{ControlCommand, Reply};
use crate::link::{Link, PendingLink, ReadSlice};
use crate::status::{NodeStatus, Shared};
use crate::verify::{in_order, settled_digest, SentPages, Watch, WatchSet};

/// A guest's network interface as the node sees it (the mock's vif; Xen frames would come from
/// the guest's vif through the same calls).
pub trait GuestNic {
    /// Sequence number of the next request the guest expects (kept in guest memory, so a
    /// checkpoint carries it).
    fn rx_next_seq(&self) -> u64;
    /// Gives request `seq` to the guest; `Ok(false)` when its ring is full.
    fn inject(&mut self, seq: u64, frame: &[u8]) -> Result<bool, BackendError>;
    /// Hands every frame the guest emitted since the last call to `out`, in order.
    fn drain_tx(&mut self, out: &mut dyn FnMut(&[u8]));
    /// A channel holding a message whenever the guest emitted output since the last message
    /// was taken, so the node loop can sleep until then. None (a guest without the signal, or
    /// without a NIC): the loop looks for output whenever it wakes, at least every
    /// [`MAX_SLEEP`].
    fn output_ready(&self) -> Option<crossbeam_channel::Receiver<()>> {
        None
    }
}

/// The longest a node loop sleeps when no deadline and no event is due: the latency of a stop
/// request and of output from a guest without an output signal.
pub const MAX_SLEEP: Duration = Duration::from_millis(100);

/// The loop's sleep while requests wait for room in the guest's RX ring (the guest frees room
/// as it answers, which the output signal announces; this bounds a guest that drops a request).
const RING_RETRY: Duration = Duration::from_millis(1);

/// Sleeps until `wait` has passed or one of a node's event sources has something: bytes on
/// the link, a client request, a control command, guest output. The loop then looks at all of
/// them; deadlines (heartbeats, timeouts, the checkpoint policy) bound `wait`.
fn wait_for_events<C, K>(
    wait: Duration,
    link: Option<&Link>,
    clients: Option<&crossbeam_channel::Receiver<C>>,
    commands: Option<&crossbeam_channel::Receiver<K>>,
    output: Option<&crossbeam_channel::Receiver<()>>,
) {
    if wait.is_zero() {
        return;
    }
    let mut sel = crossbeam_channel::Select::new();
    let mut sources = 0;
    if let Some(l) = link {
        match l.wait_handle() {
            Some(rx) => {
                sel.recv(rx);
                sources += 1;
            }
            None => return,
        }
    }
    if let Some(rx) = clients {
        sel.recv(rx);
        sources += 1;
    }
    if let Some(rx) = commands {
        sel.recv(rx);
        sources += 1;
    }
    if let Some(rx) = output {
        sel.recv(rx);
        sources += 1;
    }
    if sources == 0 {
        std::thread::sleep(wait);
    } else {
        let _ = sel.ready_timeout(wait);
    }
}

/// What a node needs from its guest.
pub trait Guest: Domain + GuestNic {}
impl<T: Domain + GuestNic> Guest for T {}

/// Called with (epoch, every page of guest memory, the state blob) at each checkpoint: on the
/// primary at the capture (PVM paused), on the secondary right after applying (SVM paused).
/// For tests that compare both memories byte for byte; costs a copy of all RAM per checkpoint.
pub type SnapshotHook = Arc<dyn Fn(u64, Vec<u8>, Vec<u8>) + Send + Sync>;

/// Called with every frame the PVM emits, before comparison (for tests that check what clients
/// see against what the primary produced).
pub type OutputTap = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Settings common to both roles.
#[derive(Clone)]
pub struct NodeOptions {
    /// Heartbeats and failure detection.
    pub liveness: Liveness,
    /// Digest all memory at every checkpoint and compare.
    pub verify: bool,
    /// Captures (the initial synchronisation's first) at which the primary sweeps all memory
    /// for pages the hypervisor wrote behind the dirty log; what they find is re-read at every
    /// later capture. With `verify` every capture sweeps.
    pub unlogged_sweeps: u32,
    /// Pre-shared key.
    pub key: Option<Vec<u8>>,
    /// Checkpoint policy (primary).
    pub policy: CheckpointPolicy,
    /// Comparator settings (primary).
    pub compare: CompareConfig,
    /// D = A ∪ B or D = A (primary).
    pub sync_mode: SyncMode,
    /// Client-facing address for the mock network path (primary; a secondary binds it when it
    /// takes over).
    pub client_addr: Option<String>,
    /// Command run before taking over; no takeover if it fails (split-brain fencing).
    pub fence_cmd: Option<String>,
    /// How long to wait for the peer to appear.
    pub connect_timeout: Duration,
    /// Memory snapshots at each checkpoint, for tests.
    pub snapshot: Option<SnapshotHook>,
    /// Every PVM output frame, for tests.
    pub output_tap: Option<OutputTap>,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("liveness", &self.liveness)
            .field("verify", &self.verify)
            .field("has_key", &self.key.is_some())
            .field("policy", &self.policy)
            .field("sync_mode", &self.sync_mode)
            .field("client_addr", &self.client_addr)
            .finish()
    }
}

fn snapshot(
    dom: &mut dyn Domain,
    hook: &Option<SnapshotHook>,
    epoch: u64,
    state: &[u8],
) -> Result<(), BackendError> {
    let Some(hook) = hook else { return Ok(()) };
    let pfns: Vec<u64> = (0..dom.page_count()).collect();
    let mut ram = Vec::new();
    copy_pages(dom, &pfns, &mut ram, None)?;
    hook(epoch, ram, state.to_vec());
    Ok(())
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            liveness: Liveness::default(),
            verify: false,
            unlogged_sweeps: 0,
            key: None,
            policy: CheckpointPolicy::default(),
            compare: CompareConfig::default(),
            sync_mode: SyncMode::Backchannel,
            client_addr: None,
            fence_cmd: None,
            connect_timeout: Duration::from_secs(30),
            snapshot: None,
            output_tap: None,
        }
    }
}

fn nonce() -> [u8; 32] {
    use rand::RngCore;
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// Longest stretch the loop spends consuming the link before it looks at timers again.
const MAX_READ_SLICE: Duration = Duration::from_millis(20);

/// Why the link to `peer` ("primary" or "secondary") ends after the machine refused its input:
/// a refusal at the handshake (a setting that differs) is not a broken protocol.
fn protocol_error(peer: &str, e: &colo_core::engine::EngineError) -> String {
    match e {
        colo_core::engine::EngineError::Link(l) => {
            format!("the link handshake refused the {peer}: {l}")
        }
        e => format!("{peer} broke the protocol: {e}"),
    }
}

fn run_fence(cmd: &Option<String>) -> Result<()> {
    let Some(cmd) = cmd else { return Ok(()) };
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .with_context(|| format!("running fence command `{cmd}`"))?;
    if !status.success() {
        bail!("fence command `{cmd}` failed ({status}); not taking over");
    }
    Ok(())
}

/// Reads pages of `pfns` from `dom` into `out`, in order. A page the backend cannot map (Xen's
/// holes: MMIO, beyond RAM) is zero-filled when `present` is None, or else left out of `out`
/// and marked `false` in `present` (then it travels as an XTAB entry without data). The
/// buffers keep their capacity across checkpoints, so the pause neither allocates nor
/// zero-fills.
fn copy_pages(
    dom: &mut dyn Domain,
    pfns: &[u64],
    out: &mut Vec<u8>,
    mut present: Option<&mut Vec<bool>>,
) -> Result<(), BackendError> {
    out.reserve(pfns.len() * PAGE_SIZE);
    let mut next = 0;
    dom.read_pages(pfns, &mut |i, page| {
        in_order(&mut next, i)?;
        match page {
            Some(p) if p.len() == PAGE_SIZE => out.extend_from_slice(p),
            Some(p) => {
                return Err(BackendError::DataLength {
                    got: p.len(),
                    want: PAGE_SIZE,
                    pages: 1,
                })
            }
            None if present.is_none() => out.resize(out.len() + PAGE_SIZE, 0),
            None => {}
        }
        if let Some(v) = present.as_deref_mut() {
            v.push(page.is_some());
        }
        Ok(())
    })
}

/// Writes PAGE_DATA records for `pfns` (batches of at most 1024): present pages as NOTAB with
/// their data (consecutive in `data`), the others as XTAB without data. Two writes per batch,
/// the header and the batch's data, straight from `data`.
fn write_typed_pages(
    w: &mut impl std::io::Write,
    pfns: &[u64],
    present: &[bool],
    data: &[u8],
    scratch: &mut Vec<u8>,
    entries: &mut Vec<(u64, PageType)>,
) -> std::io::Result<u64> {
    let mut off = 0;
    let mut bytes = 0u64;
    for (ps, ok) in pfns
        .chunks(MAX_PAGES_PER_RECORD)
        .zip(present.chunks(MAX_PAGES_PER_RECORD))
    {
        entries.clear();
        entries.extend(
            ps.iter()
                .zip(ok)
                .map(|(&p, &ok)| (p, if ok { PageType::Notab } else { PageType::Xtab })),
        );
        scratch.clear();
        encode_page_data_header(scratch, entries)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let n = ok.iter().filter(|x| **x).count() * PAGE_SIZE;
        let chunk = data.get(off..off + n).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "page data shorter than its pfns",
            )
        })?;
        w.write_all(scratch)?;
        w.write_all(chunk)?;
        off += n;
        bytes += (scratch.len() + n) as u64;
    }
    Ok(bytes)
}

/// Writes the initial synchronisation's buffered pages to the guest.
fn flush_sync_pages(
    guest: &mut dyn Domain,
    pfns: &mut Vec<u64>,
    data: &mut Vec<u8>,
) -> Result<(), BackendError> {
    if !pfns.is_empty() {
        guest.write_pages(pfns, data)?;
    }
    pfns.clear();
    data.clear();
    Ok(())
}

/// Writes a state machine's outbox to the link (or drops it when there is no link) and clears it;
/// once the handshake is over (`keepalive`: the heartbeat interval), makes sure the link's
/// keepalive runs.
fn flush_outbox(
    link: Option<&mut Link>,
    out: &mut Vec<u8>,
    keepalive: Option<Duration>,
) -> std::io::Result<()> {
    let Some(link) = link else {
        out.clear();
        return Ok(());
    };
    let res = link.send(out);
    out.clear();
    res?;
    match keepalive {
        Some(interval) => link.start_keepalive(interval).map_err(|e| {
            std::io::Error::new(e.kind(), format!("starting the link keepalive: {e}"))
        }),
        None => Ok(()),
    }
}

fn primary_config(opts: &NodeOptions, pages: u64) -> PrimaryConfig {
    let mut cfg = PrimaryConfig::new(pages);
    cfg.sync_mode = opts.sync_mode;
    cfg.liveness = opts.liveness;
    cfg.verify = opts.verify;
    cfg.key = opts.key.clone();
    cfg.nonce = nonce();
    cfg
}

/// A running primary.
pub struct PrimaryNode<G: Guest> {
    guest: G,
    engine: Primary,
    link: Option<Link>,
    clients: Option<ClientHub>,
    comparator: Option<Comparator>,
    opts: NodeOptions,
    next_seq: u64,
    queued: VecDeque<Vec<u8>>,
    copy: Vec<u8>,
    present: Vec<bool>,
    entries: Vec<(u64, PageType)>,
    state: Vec<u8>,
    scratch: Vec<u8>,
    /// Dirty-log scratch for the verification option.
    late: Option<DirtyBitmap>,
    /// What the secondary holds of each page, while sweeps run (verification, or the first
    /// captures).
    sent: Option<SentPages>,
    /// The pages found written behind the dirty log, and the sweeps still to run.
    unlogged: WatchSet,
    released: Vec<Vec<u8>>,
    last_cp_end: Instant,
    manual: bool,
    status: Shared,
    stop: Arc<AtomicBool>,
    commands: Option<crossbeam_channel::Receiver<ControlCommand>>,
    /// The guest's output signal (see [`GuestNic::output_ready`]).
    output: Option<crossbeam_channel::Receiver<()>>,
    /// A re-protection asked for over the control socket, until its outcome is known.
    protecting: Option<Protecting>,
}

/// A re-protection under way: connecting on a helper thread (`pending`), then the handshake.
/// `reply` gets the outcome.
#[derive(Debug)]
struct Protecting {
    peer: String,
    pending: Option<PendingLink>,
    reply: Reply,
}

impl<G: Guest> std::fmt::Debug for PrimaryNode<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryNode")
            .field("state", &self.engine.state())
            .finish()
    }
}

impl<G: Guest> PrimaryNode<G> {
    /// A primary for `guest` that will connect to the secondary at `peer`.
    pub fn connect(guest: G, peer: &str, opts: NodeOptions, status: Shared) -> Result<Self> {
        let pages = guest.page_count();
        let link = Link::connect(
            peer,
            opts.connect_timeout,
            DecoderConfig {
                expect_headers: false,
                page_count: Some(pages),
            },
        )?;
        Self::with_link(guest, Some(link), opts, status)
    }

    /// A primary over an established link (None: start unprotected, e.g. after a takeover).
    pub fn with_link(
        guest: G,
        link: Option<Link>,
        opts: NodeOptions,
        status: Shared,
    ) -> Result<Self> {
        let pages = guest.page_count();
        let now = Instant::now();
        let cfg = primary_config(&opts, pages);
        let mut engine = Primary::new(cfg, now);
        if link.is_none() {
            engine.peer_lost(now, "started without a secondary".into());
            while engine.poll_action().is_some() {}
        }
        let clients = match &opts.client_addr {
            Some(a) => Some(ClientHub::bind(a)?),
            None => None,
        };
        {
            let mut st = status.lock();
            st.role = "primary".into();
            // Published together with the role, so no reader sees the new role beside a
            // predecessor's state (a secondary that took over hands its status on).
            st.state = engine.state().name().into();
            st.protected = engine.is_protected();
            st.peer = link.as_ref().map(|l| l.peer().to_string());
            st.client_addr = clients.as_ref().map(|c| c.addr().to_string());
        }
        let unlogged = WatchSet::new(opts.unlogged_sweeps);
        let sent = (opts.verify || unlogged.sweeps_left > 0).then(|| SentPages::new(pages));
        let output = guest.output_ready();
        let mut node = Self {
            guest,
            engine,
            link,
            clients,
            comparator: None,
            opts,
            next_seq: 0,
            queued: VecDeque::new(),
            copy: Vec::new(),
            present: Vec::new(),
            entries: Vec::with_capacity(MAX_PAGES_PER_RECORD),
            state: Vec::new(),
            scratch: Vec::new(),
            late: None,
            sent,
            unlogged,
            released: Vec::new(),
            last_cp_end: now,
            manual: false,
            status,
            stop: Arc::new(AtomicBool::new(false)),
            commands: None,
            output,
            protecting: None,
        };
        // The HELLO goes out at once, before anything is read: a peer that refuses this node's
        // HELLO then still reads this node's and can say why it was refused too.
        node.flush();
        Ok(node)
    }

    /// Re-protection: an unprotected primary (for example the survivor of a failover) connects
    /// to a new secondary at `peer` and re-synchronises it (pre-copy while the guest runs, then
    /// checkpoint 0). Client output passes through unprotected until checkpoint 0 begins. This
    /// connects in the caller's thread; the node's loop does it on a helper thread instead
    /// (`ControlCommand::Protect`).
    pub fn protect(&mut self, peer: &str) -> Result<()> {
        self.may_protect().map_err(|e| anyhow!(e))?;
        let link = Link::connect(peer, self.opts.connect_timeout, self.link_config())?;
        self.start_link(peer, link);
        Ok(())
    }

    fn link_config(&self) -> DecoderConfig {
        DecoderConfig {
            expect_headers: false,
            page_count: Some(self.guest.page_count()),
        }
    }

    fn may_protect(&self) -> Result<(), String> {
        if self.engine.state() != PrimaryState::Unprotected || self.protecting.is_some() {
            let state = match &self.protecting {
                Some(p) => format!("connecting to {}", p.peer),
                None => self.engine.state().name().to_string(),
            };
            return Err(format!(
                "this primary is {state} (protected or protecting already)"
            ));
        }
        Ok(())
    }

    /// `ControlCommand::Protect`: starts connecting on a helper thread; [`Self::poll_protect`]
    /// takes it from there.
    fn start_protect(&mut self, peer: String, timeout: Duration, reply: Reply) {
        if let Err(e) = self.may_protect() {
            reply.send(Err(e));
            return;
        }
        match Link::connect_in_background(&peer, timeout, self.link_config()) {
            Ok(pending) => {
                self.protecting = Some(Protecting {
                    peer,
                    pending: Some(pending),
                    reply,
                })
            }
            Err(e) => reply.send(Err(format!("cannot start connecting to {peer}: {e}"))),
        }
    }

    /// Moves a re-protection on: a connection made is taken into use (handshake), and the
    /// outcome, once known, goes to the operator's reply.
    fn poll_protect(&mut self) {
        let Some(p) = self.protecting.as_mut() else {
            return;
        };
        if let Some(pending) = &p.pending {
            match pending.poll() {
                None => return,
                Some(Ok(link)) => {
                    p.pending = None;
                    let peer = p.peer.clone();
                    self.start_link(&peer, link);
                    return;
                }
                Some(Err(e)) => {
                    tracing::error!("re-protection with {} failed: {e:#}", p.peer);
                    p.reply.send(Err(format!("{e:#}")));
                    self.protecting = None;
                    return;
                }
            }
        }
        let answer = match self.engine.state() {
            PrimaryState::AwaitingHandshake => return,
            PrimaryState::Unprotected => Err(format!(
                "protection with the secondary at {} did not start: {}",
                p.peer,
                self.status
                    .lock()
                    .failover_reason
                    .clone()
                    .unwrap_or_else(|| "no reason given".into())
            )),
            _ => Ok(format!(
                "re-synchronising with the secondary at {} (the link handshake passed)",
                p.peer
            )),
        };
        p.reply.send(answer);
        self.protecting = None;
    }

    /// Starts protecting over `link`, a fresh connection to the secondary at `peer`.
    fn start_link(&mut self, peer: &str, link: Link) {
        let pages = self.guest.page_count();
        self.engine = Primary::new(primary_config(&self.opts, pages), Instant::now());
        self.comparator = None;
        {
            let mut st = self.status.lock();
            st.peer = Some(link.peer().to_string());
            st.failover_reason = None;
            st.failover_at = None;
        }
        self.link = Some(link);
        // The HELLO goes out at once (see with_link).
        self.flush();
        tracing::info!("re-protecting with the secondary at {peer}");
    }

    /// Takes operator commands (from the control socket).
    pub fn set_commands(&mut self, rx: crossbeam_channel::Receiver<ControlCommand>) {
        self.commands = Some(rx);
    }

    /// Replaces the memory-snapshot hook (for tests).
    pub fn set_snapshot(&mut self, hook: Option<SnapshotHook>) {
        self.opts.snapshot = hook;
    }

    fn poll_commands(&mut self) {
        while let Some(c) = self.commands.as_ref().and_then(|rx| rx.try_recv().ok()) {
            match c {
                ControlCommand::Failover => self.engine.failover(Instant::now()),
                ControlCommand::Checkpoint => self.manual = true,
                ControlCommand::Protect {
                    peer,
                    connect_timeout,
                    reply,
                } => self.start_protect(peer, connect_timeout, reply),
                ControlCommand::Status => {}
            }
        }
        self.poll_protect();
    }

    /// A flag that ends [`PrimaryNode::run`] when set.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The guest.
    pub fn guest(&mut self) -> &mut G {
        &mut self.guest
    }

    /// The state machine.
    pub fn engine(&self) -> &Primary {
        &self.engine
    }

    /// Asks for a checkpoint as soon as the protocol allows.
    pub fn request_checkpoint(&mut self) {
        self.manual = true;
    }

    fn flush(&mut self) {
        let talking = !matches!(
            self.engine.state(),
            PrimaryState::AwaitingHandshake | PrimaryState::Unprotected
        );
        let keepalive = talking.then_some(self.opts.liveness.interval);
        if let Err(e) = flush_outbox(self.link.as_mut(), self.engine.outbox_mut(), keepalive) {
            self.lost(format!("writing to the secondary failed: {e}"));
        }
    }

    fn lost(&mut self, reason: String) {
        self.engine.peer_lost(Instant::now(), reason);
    }

    /// Runs one iteration: link input, actions, clients, guest output, policy, timers.
    pub fn step(&mut self, wait: Duration) -> Result<()> {
        // Commands first: a command that woke the previous wait is handled now, and a
        // re-protection's verdict is read only after the last step's actions published why.
        self.poll_commands();
        self.poll_link(wait)?;
        // Liveness is judged right after reading the link, never after a long action (a
        // pre-copy round of a big guest) that kept the loop from reading what arrived meanwhile,
        // and by when bytes arrived, not when this loop got round to decoding them.
        if let Some(at) = self.link.as_ref().and_then(Link::last_arrival) {
            self.engine.peer_heard(at);
        }
        self.engine.handle_timeout(Instant::now());
        self.run_actions()?;
        self.pump_clients()?;
        self.pump_output();
        self.maybe_checkpoint()?;
        self.run_actions()?;
        self.flush();
        self.publish();
        Ok(())
    }

    /// Runs until stopped.
    pub fn run(&mut self) -> Result<()> {
        while !self.stop.load(Ordering::Relaxed) {
            let wait = self.next_wait();
            self.step(wait)?;
        }
        if let Some(link) = self.link.as_mut() {
            let mut bye = Vec::new();
            Message::Goodbye(0).encode(&mut bye);
            let _ = link.send(&bye);
            // Half-close and read until the secondary closes too: closing with unread bytes
            // would reset the connection and could destroy the GOODBYE in flight.
            link.shutdown_write();
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline
                && link.fill::<()>(Duration::from_millis(50), None).is_ok()
            {
                link.discard_buffered();
            }
        }
        Ok(())
    }

    fn poll_link(&mut self, wait: Duration) -> Result<()> {
        if self.engine.state() == PrimaryState::Unprotected && self.link.take().is_some() {
            tracing::warn!("replication link closed; running unprotected");
        }
        wait_for_events(
            wait,
            self.link.as_ref(),
            self.clients.as_ref().map(ClientHub::receiver),
            self.commands.as_ref(),
            self.output.as_ref(),
        );
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        if let Err(e) = link.fill::<()>(Duration::ZERO, None) {
            self.lost(format!("link to the secondary broke: {e}"));
            return Ok(());
        }
        // Return to the loop now and then, so heartbeats go out while a long stream (a big
        // initial synchronisation onto a slow hypervisor) is being consumed.
        let mut slice = ReadSlice::new(MAX_READ_SLICE);
        while let Some(link) = self.link.as_mut() {
            let ev = match link.next_event_until(&mut slice) {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    let reason = format!("malformed stream from the secondary: {e}");
                    self.engine.peer_lost(slice.refresh(), reason);
                    break;
                }
            };
            let now = slice.stamp(&ev);
            let res = match &ev {
                Event::Record(rec) => self.engine.on_record(now, rec),
                other => Err(colo_core::engine::EngineError::Unexpected {
                    state: self.engine.state().name(),
                    event: format!("{other:?} from the secondary"),
                }),
            };
            match res {
                Ok(Some(Message::Output { epoch, frame })) => {
                    if let Some(c) = self.comparator.as_mut() {
                        c.push_secondary(now, epoch, frame.to_vec());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.engine.peer_lost(now, protocol_error("secondary", &e));
                    break;
                }
            }
        }
        Ok(())
    }

    fn run_actions(&mut self) -> Result<()> {
        loop {
            self.flush();
            let Some(action) = self.engine.poll_action() else {
                return Ok(());
            };
            tracing::debug!(?action, "primary action");
            let t = Instant::now();
            self.execute(action)?;
            tracing::debug!(
                "primary action done in {:.1} ms, now {}",
                t.elapsed().as_secs_f64() * 1e3,
                self.engine.state().name()
            );
        }
    }

    fn execute(&mut self, action: PrimaryAction) -> Result<()> {
        let now = Instant::now;
        match action {
            PrimaryAction::StartDirtyLog => self.guest.start_dirty_log()?,
            PrimaryAction::SendPages { all } => {
                let t = now();
                let bytes = self.send_precopy(all)?;
                tracing::info!(
                    "pre-copy round ({}): {} MB in {:.1} s",
                    if all { "all pages" } else { "dirty pages" },
                    bytes / 1_000_000,
                    t.elapsed().as_secs_f64()
                );
                self.engine.pages_sent(now(), bytes)?;
            }
            PrimaryAction::HarvestDirty => {
                self.guest.harvest_dirty(self.engine.harvest_target())?;
                self.engine.harvested(now())?;
            }
            PrimaryAction::Pause => {
                self.guest.pause()?;
                self.engine.paused(now())?;
            }
            PrimaryAction::BeginEpoch { epoch } => {
                let t = now();
                let comparator = &mut self.comparator;
                let clients = &mut self.clients;
                let tap = &self.opts.output_tap;
                self.guest.drain_tx(&mut |f| {
                    if let Some(tap) = tap {
                        tap(f);
                    }
                    match comparator.as_mut() {
                        Some(c) => c.push_primary(t, f.to_vec()),
                        None => {
                            if let Some(cl) = clients.as_mut() {
                                cl.deliver(f);
                            }
                        }
                    }
                });
                match self.comparator.as_mut() {
                    Some(c) => c.begin_checkpoint(epoch),
                    None => self.comparator = Some(Comparator::new(self.opts.compare)),
                }
            }
            PrimaryAction::Capture => {
                let digest = self.capture()?;
                snapshot(
                    &mut self.guest,
                    &self.opts.snapshot,
                    self.engine.epoch(),
                    &self.state,
                )?;
                self.engine.captured(now(), digest)?;
            }
            PrimaryAction::Resume => {
                self.guest.resume()?;
                if self.engine.state() != PrimaryState::Unprotected {
                    self.engine.resumed(now())?;
                }
            }
            PrimaryAction::SendCapture { .. } => {
                let bytes = self.send_capture();
                match bytes {
                    Ok(b) => self.engine.capture_sent(now(), b)?,
                    Err(e) => self.lost(format!("sending the checkpoint failed: {e}")),
                }
            }
            PrimaryAction::Committed(stats) => {
                if let Some(c) = self.comparator.as_mut() {
                    c.checkpoint_committed(stats.epoch);
                }
                self.last_cp_end = now();
                self.record(stats);
            }
            PrimaryAction::Verified { epoch, verdict } => {
                let mut st = self.status.lock();
                match verdict {
                    Verdict::Identical => st.verified_identical += 1,
                    Verdict::Different => {
                        st.verify_failures += 1;
                        tracing::error!(
                            "checkpoint {epoch}: the secondary's memory differs from the primary's"
                        );
                    }
                    Verdict::Unsettled => {
                        st.verify_unsettled += 1;
                        tracing::info!(
                            "checkpoint {epoch}: not verified, memory changed while paused (the \
                             hypervisor wrote it); the next checkpoint carries those pages"
                        );
                    }
                }
            }
            PrimaryAction::PeerLost { reason } => {
                tracing::warn!("secondary lost: {reason}; running unprotected");
                if let Some(c) = self.comparator.as_mut() {
                    c.stop_comparing();
                }
                if let Some(l) = self.link.take() {
                    l.shutdown();
                }
                let mut st = self.status.lock();
                st.failover_reason = Some(reason);
                st.failover_at = Some(std::time::SystemTime::now());
            }
        }
        Ok(())
    }

    /// Copies the capture set and the state of the paused PVM into the send buffer. A sweep of
    /// all memory (at every capture with verification, else at the first
    /// [`NodeOptions::unlogged_sweeps`]) also finds the pages the hypervisor wrote behind the
    /// dirty log and adds them to the watch set; every other capture re-reads the watch set.
    /// Returns the digest of memory and state when verifying (None when unsettled).
    fn capture(&mut self) -> Result<Option<[u8; DIGEST_LEN]>> {
        self.copy.clear();
        self.present.clear();
        let sweep = self.opts.verify || self.unlogged.sweeps_left > 0;
        let Some(sent) = self.sent.as_mut().filter(|_| sweep) else {
            self.engine.capture_watched(&self.unlogged.known)?;
            copy_pages(
                &mut self.guest,
                self.engine.capture_pfns(),
                &mut self.copy,
                Some(&mut self.present),
            )?;
            self.state.clear();
            self.guest.get_state(&mut self.state)?;
            return Ok(None);
        };
        let pages = self.guest.page_count();
        let late = self.late.get_or_insert_with(|| DirtyBitmap::new(pages));
        late.clear_all();
        let unlogged = sent.sweep(
            &mut self.guest,
            self.engine.capture_pfns(),
            &mut self.copy,
            &mut self.present,
        )?;
        if !unlogged.is_empty() {
            tracing::info!(
                "checkpoint {}: {} page(s) changed behind the dirty log since they were sent \
                 (the hypervisor wrote them); sending them too",
                self.engine.epoch(),
                unlogged.len()
            );
            tracing::debug!("written behind the dirty log: {unlogged:x?}");
        }
        self.engine.capture_also(unlogged)?;
        let grown = self.unlogged.learn(unlogged);
        self.state.clear();
        self.guest.get_state(&mut self.state)?;
        // The guest is paused: a page logged since the harvest was written by someone else
        // while the sweep ran, so the digest may mix old and new.
        self.guest.peek_dirty(late)?;
        let digest = if late.count() == 0 {
            Some(sent.digest(&self.state))
        } else {
            tracing::debug!(
                "{} pages written while the paused guest was swept",
                late.count()
            );
            None
        };
        if self.unlogged.sweeps_left > 0 {
            self.unlogged.sweeps_left -= 1;
            if self.unlogged.sweeps_left == 0 && !self.opts.verify {
                tracing::info!(
                    "watch set after the last sweep: {} page(s) the hypervisor writes behind \
                     the dirty log, re-read at every capture: {:x?}",
                    self.unlogged.known.len(),
                    self.unlogged.known
                );
                // No sweep follows: the record of what was sent is not needed any more.
                self.sent = None;
            }
        }
        let mut st = self.status.lock();
        st.sweeps += 1;
        st.watch_set = self.unlogged.known.len() as u64;
        if grown > 0 {
            tracing::debug!("watch set now {:x?}", self.unlogged.known);
        }
        Ok(digest)
    }

    fn send_precopy(&mut self, all: bool) -> Result<u64> {
        let Some(link) = self.link.as_mut() else {
            return Ok(0);
        };
        let pages = self.guest.page_count();
        let mut bytes = 0u64;
        let mut pfns: Vec<u64> = Vec::with_capacity(1024);
        let mut iter_dirty = self.engine.dirty_pages().iter();
        let mut next = 0u64;
        loop {
            pfns.clear();
            if all {
                let end = (next + 1024).min(pages);
                pfns.extend(next..end);
                next = end;
            } else {
                pfns.extend(iter_dirty.by_ref().take(1024));
            }
            if pfns.is_empty() {
                break;
            }
            self.copy.clear();
            self.present.clear();
            copy_pages(
                &mut self.guest,
                &pfns,
                &mut self.copy,
                Some(&mut self.present),
            )?;
            bytes += write_typed_pages(
                &mut link.writer(),
                &pfns,
                &self.present,
                &self.copy,
                &mut self.scratch,
                &mut self.entries,
            )
            .context("sending pre-copy pages")?;
            if let Some(sent) = self.sent.as_mut() {
                sent.record(&pfns, &self.present, &self.copy);
            }
        }
        Ok(bytes)
    }

    fn send_capture(&mut self) -> std::io::Result<u64> {
        let Some(link) = self.link.as_mut() else {
            return Ok(0);
        };
        let pfns = self.engine.capture_pfns();
        let mut bytes = 0;
        if !pfns.is_empty() {
            bytes = write_typed_pages(
                &mut link.writer(),
                pfns,
                &self.present,
                &self.copy,
                &mut self.scratch,
                &mut self.entries,
            )?;
        }
        self.scratch.clear();
        Message::VcpuState(&self.state).encode(&mut self.scratch);
        link.send(&self.scratch)?;
        bytes += self.scratch.len() as u64;
        Ok(bytes)
    }

    fn pump_clients(&mut self) -> Result<()> {
        let Some(clients) = self.clients.as_mut() else {
            return Ok(());
        };
        while let Some(frame) = clients.try_recv() {
            self.queued.push_back(frame);
        }
        let now = Instant::now();
        while let Some(frame) = self.queued.front() {
            if self.guest.rx_next_seq() != self.next_seq {
                bail!(
                    "guest expects request {} but the node is at {}",
                    self.guest.rx_next_seq(),
                    self.next_seq
                );
            }
            if !self.guest.inject(self.next_seq, frame)? {
                break;
            }
            self.engine.mirror_input(now, self.next_seq, frame);
            self.next_seq += 1;
            self.queued.pop_front();
        }
        Ok(())
    }

    fn pump_output(&mut self) {
        // Take the signal before draining: output after the drain signals anew.
        if let Some(rx) = &self.output {
            while rx.try_recv().is_ok() {}
        }
        let now = Instant::now();
        let comparator = &mut self.comparator;
        let clients = &mut self.clients;
        let protected_cmp = self.engine.state() != PrimaryState::Unprotected;
        let tap = &self.opts.output_tap;
        self.guest.drain_tx(&mut |f| {
            if let Some(tap) = tap {
                tap(f);
            }
            match comparator.as_mut() {
                Some(c) if protected_cmp => c.push_primary(now, f.to_vec()),
                _ => {
                    if let Some(cl) = clients.as_mut() {
                        cl.deliver(f);
                    }
                }
            }
        });
        if let Some(c) = self.comparator.as_mut() {
            self.released.clear();
            c.drain_released(&mut self.released);
            if let Some(cl) = self.clients.as_mut() {
                for f in &self.released {
                    cl.deliver(f);
                }
            }
        }
    }

    /// How long the loop may sleep: until the engine's next timer (heartbeat, silence, progress),
    /// the checkpoint policy's next decision, or the comparator's hold timeout, whichever comes
    /// first, and at most [`MAX_SLEEP`]; events (link, clients, commands, output) wake it sooner.
    fn next_wait(&self) -> Duration {
        if !self.queued.is_empty() {
            return RING_RETRY;
        }
        let now = Instant::now();
        let mut until = now + MAX_SLEEP;
        if let Some(t) = self.engine.next_timeout() {
            until = until.min(t);
        }
        if self.engine.state() == PrimaryState::Running {
            let comparator = self.comparator.as_ref();
            let wanted = if self.manual {
                Some(CheckpointReason::Manual)
            } else {
                comparator.and_then(|c| c.checkpoint_wanted(now))
            };
            until = until.min(self.opts.policy.next_wakeup(now, self.last_cp_end, wanted));
            if let Some(t) = comparator.and_then(Comparator::next_deadline) {
                until = until.min(t);
            }
        }
        until.saturating_duration_since(now)
    }

    fn maybe_checkpoint(&mut self) -> Result<()> {
        if self.engine.state() != PrimaryState::Running {
            return Ok(());
        }
        let now = Instant::now();
        let wanted = if self.manual {
            Some(CheckpointReason::Manual)
        } else {
            self.comparator
                .as_ref()
                .and_then(|c| c.checkpoint_wanted(now))
        };
        if let Some(reason) = self.opts.policy.decide(now, self.last_cp_end, wanted) {
            let trigger = match reason {
                CheckpointReason::Periodic => Trigger::Periodic,
                CheckpointReason::Manual => Trigger::Manual,
                _ => Trigger::Mismatch,
            };
            self.manual = false;
            self.engine.start_checkpoint(now, trigger)?;
        }
        Ok(())
    }

    fn record(&mut self, stats: CheckpointStats) {
        let mut st = self.status.lock();
        st.record_checkpoint(stats);
    }

    fn publish(&mut self) {
        let mut st = self.status.lock();
        st.state = self.engine.state().name().into();
        st.protected = self.engine.is_protected();
        if self.engine.state() != PrimaryState::Unprotected {
            // An unprotected node keeps showing the last checkpoint it ran from.
            st.epoch = self.engine.epoch();
        }
        if let Some(l) = &self.link {
            st.link_bytes_out = l.bytes_out();
            st.link_bytes_in = l.bytes_in();
        }
        if let Some(c) = &self.clients {
            st.frames_delivered = c.delivered;
        }
        if let Some(c) = &self.comparator {
            let s = c.stats();
            st.mismatches = s.mismatches;
        }
        st.requests = self.next_seq;
    }
}

/// A running secondary.
pub struct SecondaryNode<G: Guest> {
    guest: G,
    engine: Secondary,
    link: Option<Link>,
    opts: NodeOptions,
    inputs: VecDeque<(u64, Vec<u8>)>,
    clients: Option<ClientHub>,
    status: Shared,
    stop: Arc<AtomicBool>,
    taken_over: bool,
    out_frames: Vec<Vec<u8>>,
    sync_pfns: Vec<u64>,
    sync_data: Vec<u8>,
    /// Dirty-log scratch for the verification option.
    late: Option<DirtyBitmap>,
    /// The SVM's dirty log is on.
    logging: bool,
    commands: Option<crossbeam_channel::Receiver<ControlCommand>>,
    /// The guest's output signal (see [`GuestNic::output_ready`]).
    output: Option<crossbeam_channel::Receiver<()>>,
}

impl<G: Guest> std::fmt::Debug for SecondaryNode<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecondaryNode")
            .field("state", &self.engine.state())
            .finish()
    }
}

/// What a secondary became when its loop ended.
#[derive(Debug)]
pub enum SecondaryOutcome<G: Guest> {
    /// Stopped by the operator or the primary's orderly shutdown.
    Stopped,
    /// The primary is lost; this node took over and now runs as an unprotected primary.
    TookOver(Box<PrimaryNode<G>>),
}

impl<G: Guest> SecondaryNode<G> {
    /// Waits for the primary on `listener`.
    pub fn accept(
        mut guest: G,
        listener: &TcpListener,
        opts: NodeOptions,
        status: Shared,
    ) -> Result<Self> {
        guest.pause()?;
        let pages = guest.page_count();
        let link = Link::accept(
            listener,
            Some(opts.connect_timeout),
            DecoderConfig {
                expect_headers: true,
                page_count: Some(pages),
            },
        )?;
        let now = Instant::now();
        let mut cfg = SecondaryConfig::new(pages);
        cfg.liveness = opts.liveness;
        cfg.verify = opts.verify;
        cfg.key = opts.key.clone();
        cfg.nonce = nonce();
        {
            let mut st = status.lock();
            st.role = "secondary".into();
            st.peer = Some(link.peer().to_string());
        }
        let output = guest.output_ready();
        let mut node = Self {
            guest,
            engine: Secondary::new(cfg, now),
            link: Some(link),
            opts,
            inputs: VecDeque::new(),
            clients: None,
            status,
            stop: Arc::new(AtomicBool::new(false)),
            taken_over: false,
            out_frames: Vec::new(),
            sync_pfns: Vec::with_capacity(MAX_PAGES_PER_RECORD),
            sync_data: Vec::with_capacity(MAX_PAGES_PER_RECORD * PAGE_SIZE),
            late: None,
            logging: false,
            commands: None,
            output,
        };
        // The HELLO goes out at once (see PrimaryNode::with_link).
        node.flush();
        Ok(node)
    }

    /// A flag that ends [`SecondaryNode::run`] when set.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The guest.
    pub fn guest(&mut self) -> &mut G {
        &mut self.guest
    }

    /// The state machine.
    pub fn engine(&self) -> &Secondary {
        &self.engine
    }

    /// Forces a failover (as `colo failover` does).
    pub fn failover(&mut self) {
        self.engine.failover();
    }

    /// Takes operator commands (from the control socket); they carry over to the node this one
    /// becomes after a takeover.
    pub fn set_commands(&mut self, rx: crossbeam_channel::Receiver<ControlCommand>) {
        self.commands = Some(rx);
    }

    fn flush(&mut self) {
        let talking = !matches!(
            self.engine.state(),
            SecondaryState::AwaitingHandshake
                | SecondaryState::TakenOver
                | SecondaryState::Failed
                | SecondaryState::Closed
        );
        let keepalive = talking.then_some(self.opts.liveness.interval);
        if let Err(e) = flush_outbox(self.link.as_mut(), self.engine.outbox_mut(), keepalive) {
            self.engine
                .peer_lost(format!("writing to the primary failed: {e}"));
        }
    }

    /// Runs one iteration. Returns false once the node took over or gave up.
    pub fn step(&mut self, wait: Duration) -> Result<bool> {
        if let Some(rx) = &self.commands {
            while let Ok(c) = rx.try_recv() {
                match c {
                    ControlCommand::Failover => self.engine.failover(),
                    ControlCommand::Protect { reply, .. } => reply.send(Err(
                        "`protect` is for a primary; this node is a secondary".into(),
                    )),
                    ControlCommand::Status | ControlCommand::Checkpoint => {}
                }
            }
        }
        self.poll_link(wait)?;
        // Liveness right after reading, never after a long apply (see PrimaryNode::step).
        if let Some(at) = self.link.as_ref().and_then(Link::last_arrival) {
            self.engine.peer_heard(at);
        }
        self.engine.handle_timeout(Instant::now());
        self.run_actions()?;
        if self.taken_over {
            return Ok(false);
        }
        self.pump_inputs()?;
        self.pump_output();
        self.run_actions()?;
        self.flush();
        self.publish();
        Ok(!self.taken_over)
    }

    /// Runs until stopped or the primary is lost; on loss, returns the node as a new primary.
    pub fn run(mut self) -> Result<SecondaryOutcome<G>> {
        while !self.stop.load(Ordering::Relaxed) {
            let wait = self.next_wait();
            if !self.step(wait)? {
                return self.into_primary();
            }
        }
        Ok(SecondaryOutcome::Stopped)
    }

    /// How long the loop may sleep: until the engine's next timer, and at most [`MAX_SLEEP`];
    /// events (link, commands, output) wake it sooner.
    fn next_wait(&self) -> Duration {
        if !self.inputs.is_empty() && self.engine.running_epoch().is_some() {
            return RING_RETRY;
        }
        let now = Instant::now();
        let mut until = now + MAX_SLEEP;
        if let Some(t) = self.engine.next_timeout() {
            until = until.min(t);
        }
        until.saturating_duration_since(now)
    }

    fn into_primary(mut self) -> Result<SecondaryOutcome<G>> {
        // Release the pending outputs the SVM produced since the last checkpoint: the client
        // may not have seen their PVM twins. Duplicates are harmless (requests carry ids).
        let pending = std::mem::take(&mut self.out_frames);
        let mut node = PrimaryNode::with_link(self.guest, None, self.opts, self.status)?;
        node.commands = self.commands.take();
        node.next_seq = node.guest.rx_next_seq();
        node.queued.extend(
            self.inputs
                .into_iter()
                .filter(|(seq, _)| *seq >= node.next_seq)
                .map(|(_, f)| f),
        );
        if let Some(c) = node.clients.as_mut() {
            for f in &pending {
                c.deliver(f);
            }
        }
        Ok(SecondaryOutcome::TookOver(Box::new(node)))
    }

    fn poll_link(&mut self, wait: Duration) -> Result<()> {
        wait_for_events::<(), _>(
            wait,
            self.link.as_ref(),
            None,
            self.commands.as_ref(),
            self.output.as_ref(),
        );
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        if let Err(e) = link.fill::<()>(Duration::ZERO, None) {
            self.engine
                .peer_lost(format!("link to the primary broke: {e}"));
            return Ok(());
        }
        // Return to the loop now and then, so heartbeats go out while a long stream (a big
        // initial synchronisation onto a slow hypervisor) is being consumed.
        let mut slice = ReadSlice::new(MAX_READ_SLICE);
        while let Some(link) = self.link.as_mut() {
            let ev = match link.next_event_until(&mut slice) {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    self.engine
                        .peer_lost(format!("malformed stream from the primary: {e}"));
                    break;
                }
            };
            let record_end = matches!(ev, Event::PageDataEnd);
            let now = slice.stamp(&ev);
            match self.engine.on_event(now, &ev) {
                Ok(Some(Delivery::WritePage { pfn, data })) => {
                    // Initial synchronisation: pages go to the guest a record (≤ 1024 pages)
                    // at a time, so a hypervisor maps them in one call, not one per page.
                    self.sync_pfns.push(pfn);
                    self.sync_data.extend_from_slice(data);
                    if self.sync_pfns.len() >= MAX_PAGES_PER_RECORD {
                        flush_sync_pages(
                            &mut self.guest,
                            &mut self.sync_pfns,
                            &mut self.sync_data,
                        )?;
                    }
                }
                Ok(Some(Delivery::Input { seq, frame })) => {
                    self.inputs.push_back((seq, frame.to_vec()));
                }
                Ok(None) => {}
                Err(e) => {
                    self.engine.peer_lost(protocol_error("primary", &e));
                    break;
                }
            }
            if record_end {
                flush_sync_pages(&mut self.guest, &mut self.sync_pfns, &mut self.sync_data)?;
            }
            // Apply a complete checkpoint before reading further.
            if matches!(self.engine.state(), SecondaryState::Applying { .. }) {
                break;
            }
        }
        Ok(())
    }

    fn run_actions(&mut self) -> Result<()> {
        loop {
            self.flush();
            let Some(action) = self.engine.poll_action() else {
                return Ok(());
            };
            tracing::debug!(?action, "secondary action");
            let now = Instant::now;
            match action {
                SecondaryAction::StartDirtyLog => {
                    self.guest.start_dirty_log()?;
                    self.logging = true;
                }
                SecondaryAction::Pause => {
                    // Outputs emitted before the pause still belong to the running epoch.
                    self.pump_output();
                    self.guest.pause()?;
                    self.pump_output();
                    self.engine.paused(now())?;
                }
                SecondaryAction::HarvestDirty => {
                    self.guest.harvest_dirty(self.engine.harvest_target())?;
                    self.engine.harvested(now())?;
                }
                SecondaryAction::Apply { epoch } => {
                    let t = now();
                    flush_sync_pages(&mut self.guest, &mut self.sync_pfns, &mut self.sync_data)?;
                    self.guest
                        .write_pages(self.engine.staged_pfns(), self.engine.staged_data())?;
                    self.guest.set_state(self.engine.staged_state())?;
                    // Frames the SVM emitted in the old epoch are superseded.
                    self.out_frames.clear();
                    self.guest.drain_tx(&mut |_| {});
                    if self.opts.snapshot.is_some() {
                        // Read back through the backend: tests check the state round trip too.
                        let mut st = Vec::new();
                        self.guest.get_state(&mut st)?;
                        snapshot(&mut self.guest, &self.opts.snapshot, epoch, &st)?;
                    }
                    // The digest covers the state as applied: a hypervisor's state read back
                    // later differs (Xen's clock runs on in a paused domain).
                    let digest = if self.engine.verifying() {
                        let st = self.engine.staged_state().to_vec();
                        let watch = if self.logging {
                            Watch::FromNow
                        } else {
                            Watch::Off
                        };
                        settled_digest(&mut self.guest, &st, &mut self.late, watch)?
                    } else {
                        None
                    };
                    tracing::debug!(
                        "checkpoint {epoch}: {} pages applied{} in {:.1} ms",
                        self.engine.staged_pfns().len(),
                        if digest.is_some() {
                            " and digested"
                        } else {
                            ""
                        },
                        t.elapsed().as_secs_f64() * 1e3
                    );
                    self.engine.applied(now(), digest)?;
                    self.status.lock().checkpoints += 1;
                }
                SecondaryAction::Resume => {
                    self.guest.resume()?;
                    if matches!(self.engine.state(), SecondaryState::Resuming { .. }) {
                        self.engine.resumed(now())?;
                    }
                }
                SecondaryAction::Running { epoch } => {
                    let _ = epoch;
                    self.pump_inputs()?;
                }
                SecondaryAction::TakeOver { reason } => {
                    let t0 = Instant::now();
                    if let Err(e) = run_fence(&self.opts.fence_cmd) {
                        tracing::error!("{e:#}");
                        return Err(e);
                    }
                    tracing::warn!("primary lost: {reason}; taking over");
                    if let Some(l) = self.link.take() {
                        l.shutdown();
                    }
                    let mut st = self.status.lock();
                    st.state = self.engine.state().name().into();
                    st.protected = false;
                    st.failover_reason = Some(reason);
                    st.failover_at = Some(std::time::SystemTime::now());
                    st.takeover_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
                    self.taken_over = true;
                }
                SecondaryAction::Close => {
                    tracing::info!("the primary ended replication; stopping");
                    if let Some(l) = self.link.take() {
                        l.shutdown();
                    }
                    self.stop.store(true, Ordering::Relaxed);
                }
                SecondaryAction::GiveUp { reason } => {
                    return Err(anyhow!(
                        "primary lost and no consistent state to take over from: {reason}"
                    ));
                }
            }
        }
    }

    fn pump_inputs(&mut self) -> Result<()> {
        if self.engine.running_epoch().is_none() {
            return Ok(());
        }
        let next = self.guest.rx_next_seq();
        while self.inputs.front().is_some_and(|(s, _)| *s < next) {
            self.inputs.pop_front();
        }
        while let Some((seq, frame)) = self.inputs.front() {
            let want = self.guest.rx_next_seq();
            if *seq != want {
                bail!("mirrored request {seq} arrived but the SVM expects {want}: input lost");
            }
            if !self.guest.inject(*seq, frame)? {
                break;
            }
            self.inputs.pop_front();
        }
        Ok(())
    }

    fn pump_output(&mut self) {
        if let Some(rx) = &self.output {
            while rx.try_recv().is_ok() {}
        }
        let now = Instant::now();
        let engine = &mut self.engine;
        let frames = &mut self.out_frames;
        self.guest.drain_tx(&mut |f| {
            engine.send_output(now, f);
            frames.push(f.to_vec());
        });
        // Only the current epoch's frames matter for a takeover; bound the memory.
        if frames.len() > 4096 {
            let cut = frames.len() - 4096;
            frames.drain(..cut);
        }
    }

    fn publish(&mut self) {
        let mut st = self.status.lock();
        st.state = self.engine.state().name().into();
        st.protected = self.engine.running_epoch().is_some();
        st.epoch = self.engine.running_epoch().unwrap_or(0);
        if let Some(l) = &self.link {
            st.link_bytes_out = l.bytes_out();
            st.link_bytes_in = l.bytes_in();
        }
        let _ = &self.clients;
    }
}

/// Builds a status handle.
pub fn new_status() -> Shared {
    Arc::new(Mutex::new(NodeStatus::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_core::stream::Decoder;

    #[test]
    fn a_secondary_turned_primary_publishes_role_and_state_together() {
        // The status a secondary leaves behind when it takes over.
        let status = new_status();
        {
            let mut st = status.lock();
            st.role = "secondary".into();
            st.state = "AwaitingNew".into();
            st.protected = true;
        }
        let guest = crate::mock::build(&crate::mock::MockSpec {
            ram: 4 << 20,
            ram_file: None,
            workload: crate::mock::WorkloadKind::Kv,
            vm_seed: 1,
            memory_divergence: false,
            output_divergence: 0.0,
            dirty_rate: 0,
        })
        .unwrap();
        let _node =
            PrimaryNode::with_link(guest, None, NodeOptions::default(), status.clone()).unwrap();
        let st = status.lock();
        assert_eq!(st.role, "primary");
        assert_eq!(st.state, "Unprotected");
        assert!(!st.protected);
    }

    #[test]
    fn unmappable_pages_travel_as_xtab_without_data() {
        // 1030 pfns (two records); every third page cannot be mapped.
        let pfns: Vec<u64> = (0..1030).collect();
        let present: Vec<bool> = pfns.iter().map(|p| p % 3 != 0).collect();
        let mut data = Vec::new();
        for (&p, &ok) in pfns.iter().zip(&present) {
            if ok {
                data.extend(std::iter::repeat_n(p as u8, PAGE_SIZE));
            }
        }
        let mut wire = Vec::new();
        let (mut scratch, mut entries) = (Vec::new(), Vec::new());
        let n = write_typed_pages(
            &mut wire,
            &pfns,
            &present,
            &data,
            &mut scratch,
            &mut entries,
        )
        .unwrap();
        assert_eq!(n as usize, wire.len());
        let mut dec = Decoder::new(DecoderConfig {
            expect_headers: false,
            page_count: Some(2048),
        });
        let mut seen = Vec::new();
        let mut input = &wire[..];
        loop {
            let (used, ev) = dec.feed(input).unwrap();
            input = &input[used..];
            match ev {
                Some(Event::Page {
                    pfn,
                    page_type,
                    data,
                }) => {
                    match data {
                        Some(d) => assert!(d.iter().all(|&b| b == pfn as u8)),
                        None => assert_eq!(page_type, PageType::Xtab),
                    }
                    seen.push((pfn, data.is_some()));
                }
                Some(_) => {}
                None if input.is_empty() => break,
                None => {}
            }
        }
        let want: Vec<(u64, bool)> = pfns.iter().copied().zip(present.iter().copied()).collect();
        assert_eq!(seen, want);
    }
}

//! The primary's node driver: the PVM, the comparator, the clients and the link to the
//! secondary around colo-core's `Primary` machine; the capture (with the sweeps for pages
//! written behind the dirty log) and re-protection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use colo_core::bitmap::DirtyBitmap;
use colo_core::compare::Comparator;
use colo_core::engine::messages::{Message, Role};
use colo_core::engine::{
    CheckpointStats, Primary, PrimaryAction, PrimaryConfig, PrimaryState, Trigger, Verdict,
    DIGEST_LEN, GOODBYE_DROPPED,
};
use colo_core::policy::CheckpointReason;

use crate::clients::ClientHub;
use crate::control::{ControlCommand, Reply};
use crate::link::{Link, PendingLink, ReadSlice};
use crate::status::Shared;
use crate::verify::{SentPages, WatchSet};

use super::*;

fn primary_config(opts: &NodeOptions, pages: u64) -> PrimaryConfig {
    let mut cfg = PrimaryConfig::new(pages);
    cfg.sync_mode = opts.sync_mode;
    cfg.liveness = opts.liveness;
    cfg.verify = opts.verify;
    cfg.key = opts.key.clone();
    cfg.plaintext = opts.insecure_plaintext;
    cfg.nonce = nonce();
    cfg
}

/// GOODBYE reason: the primary stops (the secondary stops too).
const GOODBYE_STOPPED: u32 = 0;

/// Ends replication on purpose: sends GOODBYE(`reason`), half-closes, and reads until the
/// secondary closes too (at most 2 s): closing with unread bytes would reset the connection
/// and could destroy the GOODBYE in flight.
fn goodbye(mut link: Link, reason: u32) {
    let mut bye = Vec::new();
    Message::Goodbye(reason).encode(&mut bye);
    let _ = link.send(&bye);
    link.shutdown_write();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && link.fill::<()>(Duration::from_millis(50), None).is_ok() {
        link.discard_buffered();
    }
}

/// [`goodbye`] on a thread of its own, so the node loop goes on serving meanwhile.
fn goodbye_in_background(link: Link, reason: u32) {
    let spawned = std::thread::Builder::new()
        .name("colo-goodbye".into())
        .spawn(move || goodbye(link, reason));
    if let Err(e) = spawned {
        tracing::warn!("could not say goodbye to the secondary: {e}");
    }
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
    /// The current link completed its handshake (a loss before that means protection never
    /// started: a setting that differs, or a peer that left during the handshake).
    handshaken: bool,
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
        mut link: Option<Link>,
        opts: NodeOptions,
        status: Shared,
    ) -> Result<Self> {
        if let Some(l) = link.as_mut() {
            l.set_key(Role::Primary, opts.key.as_deref());
        }
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
            handshaken: false,
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
        // The key file is read again: a rotated key is used from this connection on.
        if let Some(path) = &self.opts.key_file {
            match crate::config::read_key_file(path) {
                Ok(k) => self.opts.key = Some(k),
                Err(e) => {
                    reply.send(Err(format!("{e:#}")));
                    return;
                }
            }
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
    fn start_link(&mut self, peer: &str, mut link: Link) {
        link.set_key(Role::Primary, self.opts.key.as_deref());
        let pages = self.guest.page_count();
        self.engine = Primary::new(primary_config(&self.opts, pages), Instant::now());
        self.comparator = None;
        self.handshaken = false;
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
                ControlCommand::Failover => {
                    // A deliberate drop: the secondary is told so (GOODBYE) and stops instead
                    // of reading the closed link as a dead primary and taking over.
                    if let Some(link) = self.link.take() {
                        if !matches!(
                            self.engine.state(),
                            PrimaryState::AwaitingHandshake | PrimaryState::Unprotected
                        ) {
                            goodbye_in_background(link, GOODBYE_DROPPED);
                        }
                    }
                    self.engine.failover(Instant::now())
                }
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

    /// The primary a secondary becomes when it takes over: it serves `guest` alone, answers the
    /// control socket's `commands`, queues the mirrored `inputs` the SVM has not consumed yet,
    /// and releases the outputs the SVM produced since the last checkpoint (`pending`: the
    /// client may not have seen their PVM twins; duplicates are harmless, requests carry ids).
    pub(super) fn took_over(
        guest: G,
        opts: NodeOptions,
        status: Shared,
        commands: Option<crossbeam_channel::Receiver<ControlCommand>>,
        inputs: VecDeque<(u64, Vec<u8>)>,
        pending: &[Vec<u8>],
    ) -> Result<Self> {
        let mut node = Self::with_link(guest, None, opts, status)?;
        node.commands = commands;
        node.next_seq = node.guest.rx_next_seq();
        let next = node.next_seq;
        node.queued.extend(
            inputs
                .into_iter()
                .filter(|(seq, _)| *seq >= next)
                .map(|(_, f)| f),
        );
        if let Some(c) = node.clients.as_mut() {
            for f in pending {
                c.deliver(f);
            }
        }
        Ok(node)
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
        // Flushed before every action, so a handshake completed earlier is always seen.
        self.handshaken |= talking;
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
        if let Some(link) = self.link.take() {
            goodbye(link, GOODBYE_STOPPED);
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
            PrimaryAction::BeginEpoch { epoch } => self.begin_epoch(epoch),
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
            PrimaryAction::Verified { epoch, verdict } => self.verified(epoch, verdict),
            PrimaryAction::PeerLost { reason } => self.peer_lost(reason)?,
        }
        Ok(())
    }

    /// A checkpoint begins: the PVM's output so far goes to the comparator (or straight to
    /// the clients before the first checkpoint), and the comparator opens epoch `epoch`.
    fn begin_epoch(&mut self, epoch: u64) {
        let t = Instant::now();
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

    /// The verification of checkpoint `epoch` (with `--verify`).
    fn verified(&mut self, epoch: u64, verdict: Verdict) {
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

    /// The secondary is lost: fence it (with `--fence-cmd`), then run unprotected.
    fn peer_lost(&mut self, reason: String) -> Result<()> {
        // Going on alone first makes sure the secondary cannot serve later from an older
        // checkpoint (split brain): with --fence-cmd, the fence must succeed, or this node
        // stops with its guest paused and its held output unreleased.
        if let Err(e) = run_fence(&self.opts.fence_cmd, "not going on alone") {
            tracing::error!("secondary lost ({reason}); {e:#}");
            let _ = self.guest.pause();
            let mut st = self.status.lock();
            st.failover_reason = Some(format!("{reason}; {e:#}"));
            st.failover_at = Some(std::time::SystemTime::now());
            return Err(e.context(format!("secondary lost: {reason}")));
        }
        if !self.handshaken {
            // Lost during the handshake: usually a setting that differs (key, guest size,
            // --verify), an operator's mistake rather than a failure. Say so loudly: the guest
            // was never protected.
            tracing::error!(
                "protection did not start: {reason}. The guest runs UNPROTECTED; fix the \
                 cause and re-protect (`colo protect`)"
            );
        } else {
            tracing::warn!("secondary lost: {reason}; running unprotected");
        }
        if let Some(c) = self.comparator.as_mut() {
            c.stop_comparing();
        }
        if let Some(l) = self.link.take() {
            l.shutdown();
        }
        let mut st = self.status.lock();
        st.failover_reason = Some(reason);
        st.failover_at = Some(std::time::SystemTime::now());
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

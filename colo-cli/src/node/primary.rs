//! The primary's role: the PVM, the comparator, the clients and the link to the secondary
//! around colo-core's `Primary` machine. One method per action; the capture itself is in
//! `capture.rs`, re-protection (a new secondary for a primary running alone) in `protect.rs`.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use colo_core::compare::Comparator;
use colo_core::engine::messages::{Message, Role as LinkRole};
use colo_core::engine::{
    CheckpointStats, EngineError, Primary, PrimaryAction, PrimaryConfig, PrimaryState, Trigger,
    Verdict, GOODBYE_DROPPED,
};
use colo_core::policy::CheckpointReason;
use colo_core::stream::{DecoderConfig, Event};
use colo_core::{Aligner, Guest};
use crossbeam_channel::Receiver;

use super::capture::Capture;
use super::disk::{self, PrimaryDisk};
use super::driver::{flush, run_fence, Io, Next, Node, Role};
use super::pages::PageWriter;
use super::protect::{goodbye, goodbye_in_background, Protecting};
use super::NodeOptions;
use crate::arbiter::Unreachable;
use crate::control::ControlCommand;
use crate::link::{Link, Span};
use crate::service::Service;
use crate::status::{NodeStatus, Shared};

/// A running primary.
pub type PrimaryNode<G> = Node<G, PrimaryRole>;

/// How often a node waiting on its arbiter looks again.
pub(super) const ARBITER_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// GOODBYE reason: the primary stops (the secondary stops too).
const GOODBYE_STOPPED: u32 = 0;

/// The primary machine's settings from the node's options, for a guest of `pages` pages and a
/// disk of `disk_blocks` blocks.
pub(super) fn primary_config(opts: &NodeOptions, pages: u64, disk_blocks: u64) -> PrimaryConfig {
    let mut cfg = PrimaryConfig::new(pages);
    cfg.link.disk_blocks = disk_blocks;
    cfg.sync_mode = opts.sync_mode;
    cfg.link.liveness = opts.liveness;
    cfg.link.verify = opts.verify;
    cfg.link.key = opts.key.clone();
    cfg.link.plaintext = opts.insecure_plaintext;
    cfg.link.coding = opts.page_coding;
    cfg.link.streams = opts.streams;
    cfg.link.disk_mirror = opts.disk_mirror;
    cfg.link.nonce = super::driver::nonce();
    cfg
}

/// How the primary reads the secondary's stream.
pub(super) fn link_config(pages: u64) -> DecoderConfig {
    DecoderConfig {
        expect_headers: false,
        page_count: Some(pages),
    }
}

/// The primary's part of a node.
#[derive(Debug)]
pub struct PrimaryRole {
    pub(super) engine: Primary,
    /// The service side: the mock's clients or a port on the service network.
    clients: Option<Box<dyn Service>>,
    pub(super) comparator: Option<Comparator>,
    /// The number of the next client request into the PVM.
    next_seq: u64,
    /// Client requests waiting for room in the PVM's RX ring.
    queued: VecDeque<Vec<u8>>,
    capture: Capture,
    /// The disk's side of the capture (see `disk.rs`).
    disk: PrimaryDisk,
    writer: PageWriter,
    released: Vec<Vec<u8>>,
    last_cp_end: Instant,
    /// The next continuous mirror round of the disk (when the engine allows one).
    next_mirror: Instant,
    manual: bool,
    /// A re-protection asked for over the control socket, until its outcome is known.
    pub(super) protecting: Option<Protecting>,
    /// Output held back while this primary, alone, is not sure of its arbiter lease; it goes
    /// out, in order, before anything newer once the lease is certain again.
    withheld: Withheld,
    /// After a takeover: the TCP offsets of the connections the old secondary's SVM aligned
    /// (colo-core's `align.rs`). Clients' frames are rewritten into the guest's space as they
    /// arrive (before injection and mirroring), the guest's frames into the clients' space
    /// as they are released (after comparison).
    aligner: Option<Aligner>,
}

/// Frames a lone primary may not release yet (see [`crate::arbiter`]).
#[derive(Debug, Default)]
struct Withheld {
    frames: VecDeque<Vec<u8>>,
    /// Frames ever held back.
    count: u64,
    /// The lease was uncertain at the last look (a change is logged once).
    holding: bool,
}

/// What a secondary hands to the primary it becomes at a takeover.
pub(super) struct Handover<'a> {
    /// The mirrored inputs the SVM has not consumed yet: queued for the guest.
    pub inputs: VecDeque<(u64, Vec<u8>)>,
    /// The outputs the SVM produced since the last checkpoint: released at once (the client
    /// may not have seen their PVM twins; duplicates are harmless, requests carry ids).
    pub pending: &'a [Vec<u8>],
    /// The SVM's TCP offsets, now serving: clients' frames and the guest's go through it.
    pub aligner: Aligner,
    /// The guest's addresses learnt from its frames, as gratuitous ARPs and unsolicited NAs,
    /// sent on a service side with a link layer.
    pub announce: &'a [Vec<u8>],
}

impl<G: Guest> Node<G, PrimaryRole> {
    /// A primary for `guest` that will connect to the secondary at `peer`.
    pub fn connect(guest: G, peer: &str, opts: NodeOptions, status: Shared) -> Result<Self> {
        let pages = guest.page_count();
        let link = Link::connect(peer, opts.connect_timeout, link_config(pages))?;
        Self::with_link(guest, Some(link), opts, status)
    }

    /// A primary over an established link (None: start unprotected, e.g. after a takeover).
    pub fn with_link(
        mut guest: G,
        mut link: Option<Link>,
        opts: NodeOptions,
        status: Shared,
    ) -> Result<Self> {
        if let Some(l) = link.as_mut() {
            l.set_streams(opts.streams);
            l.set_key(LinkRole::Primary, opts.key.as_deref());
        }
        let pages = guest.page_count();
        let disk_blocks = disk::blocks(&mut guest);
        let now = Instant::now();
        let mut engine = Primary::new(primary_config(&opts, pages, disk_blocks), now);
        if link.is_none() {
            engine.peer_lost(now, "started without a secondary".into());
            while engine.poll_action().is_some() {}
        }
        let clients = crate::service::open(&opts)?;
        {
            let mut st = status.lock();
            st.role = "primary".into();
            // Published together with the role, so no reader sees the new role beside a
            // predecessor's state (a secondary that took over hands its status on).
            st.state = engine.state().name().into();
            st.protected = engine.is_protected();
            st.peer = link.as_ref().map(|l| l.peer().to_string());
            st.client_addr = clients.as_ref().map(|c| c.describe());
            st.disk_blocks = disk_blocks;
        }
        let role = PrimaryRole {
            engine,
            clients,
            comparator: None,
            next_seq: 0,
            queued: VecDeque::new(),
            capture: Capture::new(pages, opts.verify, opts.unlogged_sweeps),
            disk: PrimaryDisk::default(),
            writer: PageWriter::new(opts.page_coding),
            released: Vec::new(),
            last_cp_end: now,
            next_mirror: now,
            manual: false,
            protecting: None,
            withheld: Withheld::default(),
            aligner: None,
        };
        Ok(Node::start(Io::new(guest, link, opts, status), role))
    }

    /// The primary a secondary becomes when it takes over: it serves `guest` alone, answers the
    /// control socket's `commands`, and takes over what the secondary held (see [`Handover`]).
    pub(super) fn took_over(
        guest: G,
        opts: NodeOptions,
        status: Shared,
        commands: Option<Receiver<ControlCommand>>,
        handover: Handover<'_>,
    ) -> Result<Self> {
        let Handover {
            inputs,
            pending,
            mut aligner,
            announce,
        } = handover;
        let mut node = Self::with_link(guest, None, opts, status)?;
        node.io.commands = commands;
        let next = node.io.guest.rx_next_seq();
        let role = &mut node.role;
        role.next_seq = next;
        role.queued.extend(
            inputs
                .into_iter()
                .filter(|(seq, _)| *seq >= next)
                .map(|(_, mut f)| {
                    aligner.input(&mut f);
                    f
                }),
        );
        if let Some(c) = role.clients.as_mut() {
            let mut out = Vec::new();
            for f in pending {
                out.clear();
                out.extend_from_slice(f);
                aligner.output(&mut out);
                c.deliver(&out);
            }
            let sent = c.announce(announce);
            if sent > 0 {
                tracing::warn!(
                    "announced the guest's {sent} address(es) on {} (gratuitous ARP / \
                     unsolicited NA)",
                    c.describe()
                );
            }
        }
        role.aligner = Some(aligner);
        Ok(node)
    }

    /// Asks for a checkpoint as soon as the protocol allows.
    pub fn request_checkpoint(&mut self) {
        self.role.manual = true;
    }

    /// Replaces the memory-snapshot hook (for tests).
    #[cfg(feature = "test-support")]
    pub fn set_snapshot(&mut self, hook: Option<super::SnapshotHook>) {
        self.io.opts.snapshot = hook;
    }

    /// Runs until stopped, then ends replication with a GOODBYE.
    pub fn run(&mut self) -> Result<()> {
        self.run_loop()?;
        if let Some(link) = self.io.link.take() {
            goodbye(link, GOODBYE_STOPPED);
        }
        Ok(())
    }
}

impl Role for PrimaryRole {
    type Engine = Primary;
    type Action = PrimaryAction;
    const NAME: &'static str = "primary";
    const PEER: &'static str = "secondary";

    fn engine(&self) -> &Primary {
        &self.engine
    }

    fn state_name(&self) -> &'static str {
        self.engine.state().name()
    }

    fn talking(&self) -> bool {
        !matches!(
            self.engine.state(),
            PrimaryState::AwaitingHandshake | PrimaryState::Unprotected
        )
    }

    fn outbox(&mut self) -> &mut Vec<u8> {
        self.engine.outbox_mut()
    }

    fn peer_lost(&mut self, now: Instant, reason: String) {
        self.engine.peer_lost(now, reason);
    }

    fn peer_heard(&mut self, at: Instant) {
        self.engine.peer_heard(at);
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.engine.handle_timeout(now);
    }

    fn poll_action(&mut self) -> Option<PrimaryAction> {
        self.engine.poll_action()
    }

    fn execute<G: Guest>(&mut self, io: &mut Io<G>, action: PrimaryAction) -> Result<()> {
        match action {
            PrimaryAction::StartDirtyLog => {
                io.guest.start_dirty_log()?;
                self.disk.start_log(&mut io.guest)?;
            }
            PrimaryAction::SendPages { all } => self.send_pages(io, all)?,
            PrimaryAction::HarvestDirty => self.harvest(io)?,
            PrimaryAction::Pause => self.pause(io)?,
            PrimaryAction::BeginEpoch { epoch } => self.begin_epoch(io, epoch),
            PrimaryAction::Capture => self.capture(io)?,
            PrimaryAction::Resume => self.resume(io)?,
            PrimaryAction::SendCapture { .. } => self.send_capture(io)?,
            PrimaryAction::Committed(stats) => self.committed(io, stats),
            PrimaryAction::Verified {
                epoch,
                verdict,
                disk: disk_verdict,
            } => {
                verified(io, epoch, verdict);
                disk::verified(io, epoch, disk_verdict);
            }
            PrimaryAction::PeerLost { reason } => self.go_on_alone(io, reason)?,
        }
        Ok(())
    }

    fn on_command<G: Guest>(&mut self, io: &mut Io<G>, cmd: ControlCommand) {
        match cmd {
            ControlCommand::Failover => self.drop_secondary(io),
            ControlCommand::Checkpoint => self.manual = true,
            ControlCommand::Protect {
                peer,
                connect_timeout,
                reply,
            } => self.start_protect(io, peer, connect_timeout, reply),
            ControlCommand::Status => {}
        }
    }

    fn after_commands<G: Guest>(&mut self, io: &mut Io<G>) {
        self.poll_protect(io);
        if self.engine.state() == PrimaryState::Unprotected && io.link.take().is_some() {
            tracing::warn!("replication link closed; running unprotected");
        }
    }

    fn clients(&self) -> Option<&Receiver<(u64, Vec<u8>)>> {
        self.clients.as_ref().map(|c| c.receiver())
    }

    fn on_event<G: Guest>(
        &mut self,
        _guest: &mut G,
        now: Instant,
        ev: &Event<'_>,
        _span: Span,
    ) -> Result<Next> {
        let res = match ev {
            Event::Record(rec) => self.engine.on_record(now, rec),
            other => Err(EngineError::Unexpected {
                state: self.engine.state().name(),
                event: format!("{other:?} from the secondary"),
            }),
        };
        match res {
            Ok(Some(Message::Output { epoch, frame })) => {
                if let Some(c) = self.comparator.as_mut() {
                    c.push_secondary(now, epoch, frame.to_vec());
                }
                Ok(Next::ReadOn)
            }
            Ok(_) => Ok(Next::ReadOn),
            Err(e) => Ok(Next::Refused(e)),
        }
    }

    fn serve<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        self.check_arbiter(io)?;
        self.pump_clients(io)?;
        self.pump_output(io);
        self.maybe_mirror(io)?;
        self.maybe_checkpoint(io)
    }

    fn backlog(&self) -> bool {
        !self.queued.is_empty()
    }

    /// The engine's next timer (heartbeat, silence, progress) and, while running, the
    /// checkpoint policy's next decision and the comparator's hold timeout.
    fn next_deadline(&self, opts: &NodeOptions, now: Instant) -> Option<Instant> {
        let running = self.engine.state() == PrimaryState::Running;
        let policy = running.then(|| {
            opts.policy
                .next_wakeup(now, self.last_cp_end, self.wanted(now))
        });
        let hold = self.comparator.as_ref().and_then(Comparator::next_deadline);
        // Frames held back for the lease: look again soon (a renewal frees them).
        let withheld =
            (!self.withheld.frames.is_empty() || self.withheld.holding).then(|| now + ARBITER_POLL);
        let mirror = self.engine.mirror_epoch().map(|_| self.next_mirror);
        [
            self.engine.next_timeout(),
            policy,
            hold.filter(|_| running),
            withheld,
            mirror,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn publish(&self, st: &mut NodeStatus) {
        st.protected = self.engine.is_protected();
        st.ever_protected |= st.protected;
        if self.engine.state() != PrimaryState::Unprotected {
            // An unprotected node keeps showing the last checkpoint it ran from.
            st.epoch = self.engine.epoch();
        }
        if let Some(c) = &self.clients {
            st.frames_delivered = c.delivered();
        }
        if let Some(c) = &self.comparator {
            let cs = c.stats();
            st.mismatches = cs.mismatches;
            st.frames_compared = cs.primary_frames - cs.passed_through.min(cs.primary_frames);
            st.frames_matched = cs.matched_frames;
            st.svm_frames = cs.secondary_frames;
        }
        st.requests = self.next_seq;
        st.output_withheld = self.withheld.count;
        if let Some(a) = &self.aligner {
            st.record_align(a);
        }
    }
}

impl PrimaryRole {
    /// `SendPages`: a pre-copy round of the initial synchronisation.
    fn send_pages<G: Guest>(&mut self, io: &mut Io<G>, all: bool) -> Result<()> {
        let t = Instant::now();
        let bytes =
            self.send_precopy(io, all)? + self.disk.send_round(io, all, &mut self.engine)?;
        tracing::info!(
            "pre-copy round ({}): {} MB in {:.1} s",
            if all { "all pages" } else { "dirty pages" },
            bytes / 1_000_000,
            t.elapsed().as_secs_f64()
        );
        self.engine.pages_sent(Instant::now(), bytes)?;
        Ok(())
    }

    /// Sends all pages (`all`) or the dirty ones, 1024 at a time, while the PVM runs.
    fn send_precopy<G: Guest>(&mut self, io: &mut Io<G>, all: bool) -> Result<u64> {
        let Some(link) = io.link.as_mut() else {
            return Ok(0);
        };
        let pages = io.guest.page_count();
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
            self.capture.read(&mut io.guest, &pfns)?;
            let (present, copy) = (&self.capture.present, &self.capture.copy);
            bytes += self
                .writer
                .write(&mut link.writer(), &pfns, present, copy)
                .context("sending pre-copy pages")?;
            self.capture.sent(&pfns);
        }
        Ok(bytes)
    }

    /// `HarvestDirty`: the PVM's dirty log into the machine's bitmap.
    fn harvest<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        io.guest.harvest_dirty(self.engine.harvest_target())?;
        self.engine.harvested(Instant::now())?;
        Ok(())
    }

    /// `Pause`: the PVM stops for the capture.
    fn pause<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        io.guest.pause()?;
        self.engine.paused(Instant::now())?;
        Ok(())
    }

    /// `BeginEpoch`: a checkpoint begins: the PVM's output so far goes to the comparator (or
    /// straight to the clients before the first checkpoint), and the comparator opens epoch
    /// `epoch`.
    fn begin_epoch<G: Guest>(&mut self, io: &mut Io<G>, epoch: u64) {
        self.drain_output(io, Instant::now(), true);
        match self.comparator.as_mut() {
            Some(c) => c.begin_checkpoint(epoch),
            None => self.comparator = Some(Comparator::new(io.opts.compare)),
        }
    }

    /// `Capture`: the paused PVM's capture set and state into the send buffer (see
    /// `capture.rs`).
    fn capture<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        let digest = self
            .capture
            .capture(&mut io.guest, &mut self.engine, &io.status)?;
        let state = &self.capture.state;
        io.opts
            .take_snapshot(&mut io.guest, self.engine.epoch(), state)?;
        self.disk.capture(io, &mut self.engine)?;
        self.engine.captured(Instant::now(), digest)?;
        Ok(())
    }

    /// `Resume`: the PVM runs on while the checkpoint is sent.
    fn resume<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        io.guest.resume()?;
        if self.engine.state() != PrimaryState::Unprotected {
            self.engine.resumed(Instant::now())?;
        }
        Ok(())
    }

    /// `SendCapture`: the captured pages and state onto the link.
    fn send_capture<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        let sent = match io.link.as_mut() {
            Some(link) => self.write_capture(link),
            None => Ok(0),
        };
        match sent {
            Ok(b) => self.engine.capture_sent(Instant::now(), b)?,
            Err(e) => self.engine.peer_lost(
                Instant::now(),
                format!("sending the checkpoint failed: {e}"),
            ),
        }
        Ok(())
    }

    fn write_capture(&mut self, link: &mut Link) -> std::io::Result<u64> {
        let pfns = self.engine.capture_pfns();
        let (present, copy) = (&self.capture.present, &self.capture.copy);
        let mut bytes = 0;
        if !pfns.is_empty() {
            bytes = self.writer.write(&mut link.writer(), pfns, present, copy)?;
        }
        bytes += self.disk.write(link)?;
        let record = self.writer.scratch();
        Message::VcpuState(&self.capture.state).encode(record);
        link.send(record)?;
        Ok(bytes + record.len() as u64)
    }

    /// `Committed`: the secondary holds the checkpoint; output it covers is released.
    fn committed<G: Guest>(&mut self, io: &mut Io<G>, stats: CheckpointStats) {
        if let Some(c) = self.comparator.as_mut() {
            c.checkpoint_committed(stats.epoch);
        }
        self.last_cp_end = Instant::now();
        io.status.lock().record_checkpoint(stats);
    }

    /// `PeerLost`: the secondary is lost: fence it (with `--fence-cmd`), then run unprotected.
    fn go_on_alone<G: Guest>(&mut self, io: &mut Io<G>, reason: String) -> Result<()> {
        // Going on alone first makes sure the secondary cannot serve later from an older
        // checkpoint (split brain): with --fence-cmd, the fence must succeed, or this node
        // stops with its guest paused and its held output unreleased.
        if let Err(e) = run_fence(&io.opts.fence_cmd, "not going on alone") {
            tracing::error!("secondary lost ({reason}); {e:#}");
            let _ = io.guest.pause();
            io.note_loss(format!("{reason}; {e:#}"));
            return Err(e.context(format!("secondary lost: {reason}")));
        }
        if !io.handshaken {
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
        io.drop_link();
        // The reason and the end of protection in one lock: the status file never shows a
        // lost secondary's reason beside `protected: true`.
        let mut st = io.status.lock();
        st.failover_reason = Some(reason);
        st.failover_at = Some(std::time::SystemTime::now());
        st.protected = false;
        Ok(())
    }

    /// `colo failover` on the primary: a deliberate drop. The secondary is told so (GOODBYE)
    /// and stops instead of reading the closed link as a dead primary and taking over.
    fn drop_secondary<G: Guest>(&mut self, io: &mut Io<G>) {
        if let Some(link) = io.link.take() {
            if self.talking() {
                goodbye_in_background(link, GOODBYE_DROPPED);
            }
        }
        self.engine.failover(Instant::now());
    }

    /// Client requests into the PVM, in order, as its RX ring has room; each is mirrored to
    /// the secondary.
    fn pump_clients<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        let Some(clients) = self.clients.as_mut() else {
            return Ok(());
        };
        while let Some(mut frame) = clients.try_recv() {
            if let Some(a) = self.aligner.as_mut() {
                a.input(&mut frame);
            }
            self.queued.push_back(frame);
        }
        let now = Instant::now();
        while let Some(frame) = self.queued.front() {
            if io.guest.rx_next_seq() != self.next_seq {
                bail!(
                    "guest expects request {} but the node is at {}",
                    io.guest.rx_next_seq(),
                    self.next_seq
                );
            }
            if !io.guest.inject(self.next_seq, frame)? {
                break;
            }
            self.engine.mirror_input(now, self.next_seq, frame);
            self.next_seq += 1;
            self.queued.pop_front();
        }
        Ok(())
    }

    /// The PVM's output to the comparator (while protected) or the clients, and what the
    /// comparator releases to the clients.
    fn pump_output<G: Guest>(&mut self, io: &mut Io<G>) {
        io.take_output_signal();
        let protected = self.engine.state() != PrimaryState::Unprotected;
        self.drain_output(io, Instant::now(), protected);
        if let Some(c) = self.comparator.as_mut() {
            self.released.clear();
            c.drain_released(&mut self.released);
            let may = self.may_release(io);
            for mut f in self.released.drain(..) {
                if let Some(a) = self.aligner.as_mut() {
                    a.output(&mut f);
                }
                deliver(&mut self.clients, &mut self.withheld, may, f);
            }
        }
    }

    /// Every frame the PVM emitted: to the comparator when there is one and `compare`, else
    /// straight to the clients (or held back, see [`PrimaryRole::may_release`]).
    fn drain_output<G: Guest>(&mut self, io: &mut Io<G>, now: Instant, compare: bool) {
        let may = self.may_release(io);
        let comparator = &mut self.comparator;
        let clients = &mut self.clients;
        let withheld = &mut self.withheld;
        let aligner = &mut self.aligner;
        let opts = &io.opts;
        io.guest.drain_tx(&mut |f| {
            opts.tap(f);
            match (comparator.as_mut(), aligner.as_mut()) {
                (Some(c), _) if compare => c.push_primary(now, f.to_vec()),
                (_, Some(a)) => {
                    let mut f = f.to_vec();
                    a.output(&mut f);
                    deliver(clients, withheld, may, f);
                }
                _ if may && withheld.frames.is_empty() => {
                    if let Some(cl) = clients.as_mut() {
                        cl.deliver(f);
                    }
                }
                _ => deliver(clients, withheld, may, f.to_vec()),
            }
        });
    }

    /// Whether output may go out to clients now. In lockstep with the secondary, COLO's rule
    /// alone decides (the SVM holds every released reply). Alone with an arbiter, only while
    /// the lease is certain: frames held back meanwhile go out first once it is again.
    fn may_release<G>(&mut self, io: &Io<G>) -> bool {
        let Some(arbiter) = io.opts.arbiter.as_deref() else {
            return true;
        };
        let lockstep = self.engine.state() != PrimaryState::Unprotected;
        let may = arbiter.may_release(lockstep, Instant::now());
        if may == self.withheld.holding {
            self.withheld.holding = !may;
            if may {
                tracing::warn!(
                    "arbiter: the lease is certain again; releasing {} held frames",
                    self.withheld.frames.len()
                );
            } else {
                tracing::error!(
                    "arbiter: running alone without a certain lease; output is held until the \
                     lease is renewed"
                );
            }
        }
        if may {
            if let Some(cl) = self.clients.as_mut() {
                for f in self.withheld.frames.drain(..) {
                    cl.deliver(&f);
                }
            }
        }
        may
    }

    /// The arbiter's verdicts on a node that serves: a primary whose key another node holds
    /// was dropped and stops serving (its guest paused); a lone primary whose lease ran out
    /// with the arbiter unreachable exits when `--arbiter-unreachable exit` says so.
    fn check_arbiter<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        let Some(arbiter) = io.opts.arbiter.clone() else {
            return Ok(());
        };
        if let Some(holder) = arbiter.dropped() {
            let why = format!(
                "dropped by the arbiter: {holder} holds the pair's serving key; this node stops \
                 serving (its guest is paused)"
            );
            tracing::error!("{why}");
            let _ = io.guest.pause();
            io.note_loss(why.clone());
            io.drop_link();
            bail!(why);
        }
        let st = arbiter.status(Instant::now());
        if self.engine.state() == PrimaryState::Unprotected
            && !st.holding
            && st.state == "Holding"
            && arbiter.config().unreachable == Unreachable::Exit
            && arbiter.run_down(Instant::now())
        {
            let why = format!(
                "no arbiter: the lease ran out unrenewed ({}); exiting as \
                 --arbiter-unreachable exit asks (the guest is paused)",
                st.last_error.as_deref().unwrap_or("no answer")
            );
            tracing::error!("{why}");
            let _ = io.guest.pause();
            io.note_loss(why.clone());
            bail!(why);
        }
        Ok(())
    }

    /// Why a checkpoint is wanted now, if it is: asked for, or the comparator's verdict.
    fn wanted(&self, now: Instant) -> Option<CheckpointReason> {
        if self.manual {
            return Some(CheckpointReason::Manual);
        }
        self.comparator
            .as_ref()
            .and_then(|c| c.checkpoint_wanted(now))
    }

    /// Continuous mirroring: when the engine allows it and the interval has passed, the blocks
    /// the PVM wrote since the last mirror round (or capture) go to the secondary now, for the
    /// coming checkpoint (see `disk.rs`). A link that fails loses the secondary.
    fn maybe_mirror<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        if self.engine.mirror_epoch().is_none() {
            return Ok(());
        }
        let now = Instant::now();
        if now < self.next_mirror {
            return Ok(());
        }
        match self.disk.mirror(io)? {
            Ok((blocks, bytes, left)) => {
                // Blocks left over: the next round as soon as the loop has looked at the link.
                self.next_mirror = if left {
                    Instant::now()
                } else {
                    now + io.opts.disk_mirror_interval
                };
                self.engine.disk_mirrored(blocks, bytes)?;
            }
            Err(e) => self
                .engine
                .peer_lost(Instant::now(), format!("mirroring disk blocks failed: {e}")),
        }
        Ok(())
    }

    /// Starts a checkpoint when the policy says so; while NEW travels, sizes the copy buffer
    /// for it (see `Capture::prepare`).
    fn maybe_checkpoint<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        if self.engine.state() != PrimaryState::Running {
            return Ok(());
        }
        let now = Instant::now();
        let wanted = self.wanted(now);
        let Some(reason) = io.opts.policy.decide(now, self.last_cp_end, wanted) else {
            return Ok(());
        };
        let trigger = match reason {
            CheckpointReason::Periodic => Trigger::Periodic,
            CheckpointReason::Manual => Trigger::Manual,
            _ => Trigger::Mismatch,
        };
        self.manual = false;
        self.engine.start_checkpoint(now, trigger)?;
        // NEW goes out first: the secondary suspends its SVM meanwhile.
        flush(self, io);
        if let Err(e) = self.capture.prepare(&mut io.guest) {
            tracing::debug!("sizing the copy buffer before the pause: {e}");
        }
        Ok(())
    }
}

/// Hands `f` to the clients, or holds it back (behind any frame already held) unless `may`.
fn deliver(clients: &mut Option<Box<dyn Service>>, withheld: &mut Withheld, may: bool, f: Vec<u8>) {
    if may && withheld.frames.is_empty() {
        if let Some(cl) = clients.as_mut() {
            cl.deliver(&f);
        }
    } else {
        withheld.frames.push_back(f);
        withheld.count += 1;
    }
}

/// `Verified`: the verification of checkpoint `epoch` (with `--verify`).
fn verified<G>(io: &Io<G>, epoch: u64, verdict: Verdict) {
    let mut st = io.status.lock();
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

//! The secondary's role: the SVM and the link to the primary around colo-core's `Secondary`
//! machine, one method per action, and the takeover that turns the node into a primary.

use std::collections::VecDeque;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use colo_core::announce::Neighbours;
use colo_core::bitmap::DirtyBitmap;
use colo_core::engine::{
    Delivery, Secondary, SecondaryAction, SecondaryConfig, SecondaryState, DIGEST_LEN,
};
use colo_core::stream::{DecoderConfig, Event};
use colo_core::{AlignConfig, Aligner, Guest};

use super::capture::{settled_digest, Watch};
use super::disk;
use super::driver::{flush, nonce, run_fence, Io, Next, Node, Role};
use super::pages::{StagedPages, SyncPages};
use super::primary::{Handover, PrimaryNode, ARBITER_POLL};
use super::NodeOptions;
use crate::arbiter::Unreachable;
use crate::control::ControlCommand;
use crate::link::{Link, Span};
use crate::status::{NodeStatus, Shared};

/// A running secondary.
pub type SecondaryNode<G> = Node<G, SecondaryRole>;

/// What a secondary became when its loop ended.
#[derive(Debug)]
pub enum SecondaryOutcome<G: Guest> {
    /// Stopped by the operator or the primary's orderly shutdown.
    Stopped,
    /// The primary is lost; this node took over and now runs as an unprotected primary.
    TookOver(Box<PrimaryNode<G>>),
}

/// Only the current epoch's output matters for a takeover; this bounds its memory.
const MAX_HELD_FRAMES: usize = 4096;

/// The secondary's part of a node.
#[derive(Debug)]
pub struct SecondaryRole {
    engine: Secondary,
    /// Mirrored client requests, by number, until the SVM takes them.
    inputs: VecDeque<(u64, Vec<u8>)>,
    /// The SVM's output in the running epoch (released by a takeover).
    out_frames: Vec<Vec<u8>>,
    /// A checkpoint has been applied: the SVM's device rings are the ones its memory now says
    /// (the PVM's). Before that, nothing of the guest's NIC is touched: a backend that serves
    /// rings from guest memory (`--pv-vif`) would still write into the SVM's own ring frames,
    /// which the initial synchronisation may already have filled with other contents of the
    /// PVM's memory, and no dirty set would carry that write away (seen on Xen: one byte of
    /// such a page differed after a paused checkpoint).
    nic_live: bool,
    /// The guest's addresses, learnt from the SVM's output (announced by a takeover).
    learnt: Neighbours,
    sync: SyncPages,
    /// The initial synchronisation's buffered pages are to be written (a record's worth, or
    /// its PAGE_DATA ended).
    sync_due: bool,
    /// The pages of the checkpoint being received (`Delivery::StagePage`), until its apply.
    staged: StagedPages,
    /// Dirty-log scratch for the verification option.
    late: Option<DirtyBitmap>,
    /// The SVM's dirty log is on.
    logging: bool,
    /// Where the primary connects, kept until the handshake is done: a connection that fails
    /// it is dropped and the wait goes on.
    listener: Option<TcpListener>,
    /// When waiting for the primary gives up.
    waiting_until: Instant,
    /// Stream events decoded from the current connection.
    events_seen: u64,
    taken_over: bool,
    /// The primary is lost and this node waits for the arbiter's serving key before it takes
    /// over: why, and since when.
    awaiting_key: Option<AwaitingKey>,
    /// Connections refused before the handshake completed.
    refusals: Refusals,
    /// TCP alignment (colo-core's `align.rs`): mirrored input is rewritten into the SVM's
    /// sequence space as it is injected, the SVM's output observed as it is pumped; dropped
    /// when a checkpoint is applied, handed to the new primary at a takeover.
    aligner: Aligner,
    /// `NodeOptions::tcp_align`: false leaves mirrored input and the SVM's output unaligned
    /// (a diagnostic; after a takeover the survivor still gets the, empty, table).
    align: bool,
    /// The mirrored input being injected, as rewritten (reused: no allocation per frame).
    scratch: Vec<u8>,
}

/// The shortest gap between two refused connections looked at.
const REFUSAL_GAP: std::time::Duration = std::time::Duration::from_millis(10);
/// The shortest gap between two log lines about refused connections.
const REFUSAL_LOG_GAP: std::time::Duration = std::time::Duration::from_secs(1);

/// Connections that did not complete the handshake (see `SecondaryRole::wait_again`).
#[derive(Debug, Default)]
struct Refusals {
    total: u64,
    last: Option<Instant>,
    logged: Option<Instant>,
    unlogged: u64,
    reason: String,
}

/// A takeover waiting for the arbiter (see [`crate::arbiter`]).
#[derive(Debug)]
struct AwaitingKey {
    reason: String,
    since: Instant,
    /// "No takeover without the arbiter" was said.
    told_unreachable: bool,
}

/// The secondary machine's settings from the node's options, for a guest of `pages` pages and a
/// disk of `disk_blocks` blocks.
fn secondary_config(opts: &NodeOptions, pages: u64, disk_blocks: u64) -> SecondaryConfig {
    let mut cfg = SecondaryConfig::new(pages);
    cfg.disk_blocks = disk_blocks;
    cfg.liveness = opts.liveness;
    cfg.verify = opts.verify;
    cfg.key = opts.key.clone();
    cfg.plaintext = opts.insecure_plaintext;
    cfg.coding = opts.page_coding;
    cfg.streams = opts.streams;
    cfg.disk_mirror = opts.disk_mirror;
    cfg.nonce = nonce();
    cfg
}

/// Accepts the primary's connection on `listener`, waiting until `until`; the link seals
/// with the node's key and stripes over its `--streams` when the handshake says so.
fn accept_primary(
    listener: &TcpListener,
    until: Instant,
    pages: u64,
    opts: &NodeOptions,
) -> Result<Link> {
    let mut link = Link::accept(
        listener,
        Some(until.saturating_duration_since(Instant::now())),
        DecoderConfig {
            expect_headers: true,
            page_count: Some(pages),
        },
    )?;
    link.set_streams(opts.streams);
    link.set_key(
        colo_core::engine::messages::Role::Secondary,
        opts.key.as_deref(),
    );
    Ok(link)
}

impl<G: Guest> Node<G, SecondaryRole> {
    /// Waits for the primary on `listener`.
    pub fn accept(
        mut guest: G,
        listener: &TcpListener,
        opts: NodeOptions,
        status: Shared,
    ) -> Result<Self> {
        guest.pause()?;
        let pages = guest.page_count();
        let disk_blocks = disk::blocks(&mut guest);
        let waiting_until = Instant::now() + opts.connect_timeout;
        let link = accept_primary(listener, waiting_until, pages, &opts)?;
        {
            let mut st = status.lock();
            st.role = "secondary".into();
            st.peer = Some(link.peer().to_string());
            st.disk_blocks = disk_blocks;
        }
        let role = SecondaryRole {
            engine: Secondary::new(secondary_config(&opts, pages, disk_blocks), Instant::now()),
            inputs: VecDeque::new(),
            out_frames: Vec::new(),
            nic_live: false,
            learnt: Neighbours::default(),
            sync: SyncPages::default(),
            sync_due: false,
            staged: StagedPages::default(),
            late: None,
            logging: false,
            listener: listener.try_clone().ok(),
            waiting_until,
            events_seen: 0,
            taken_over: false,
            awaiting_key: None,
            refusals: Refusals::default(),
            aligner: Aligner::new(AlignConfig::default()),
            align: opts.tcp_align,
            scratch: Vec::new(),
        };
        Ok(Node::start(Io::new(guest, Some(link), opts, status), role))
    }

    /// Forces a failover (as `colo failover` does).
    pub fn failover(&mut self) {
        self.role.engine.failover(Instant::now());
    }

    /// Runs until stopped or the primary is lost; on loss, returns the node as a new primary.
    pub fn run(mut self) -> Result<SecondaryOutcome<G>> {
        if self.run_loop()? {
            return Ok(SecondaryOutcome::Stopped);
        }
        let Self { io, mut role } = self;
        role.aligner.take_over();
        let node = PrimaryNode::took_over(
            io.guest,
            io.opts,
            io.status,
            io.commands,
            Handover {
                inputs: role.inputs,
                pending: &role.out_frames,
                aligner: role.aligner,
                announce: &role.learnt.announcements(),
            },
        )?;
        Ok(SecondaryOutcome::TookOver(Box::new(node)))
    }
}

impl Role for SecondaryRole {
    type Engine = Secondary;
    type Action = SecondaryAction;
    const NAME: &'static str = "secondary";
    const PEER: &'static str = "primary";

    fn engine(&self) -> &Secondary {
        &self.engine
    }

    fn state_name(&self) -> &'static str {
        self.engine.state().name()
    }

    fn talking(&self) -> bool {
        !matches!(
            self.engine.state(),
            SecondaryState::AwaitingHandshake
                | SecondaryState::TakenOver
                | SecondaryState::Failed
                | SecondaryState::Closed
        )
    }

    /// The primary's handshake completed: refusals not yet reported (the last second of a
    /// flood) are reported now, so every refused connection reaches the log's count.
    fn handshake_done(&mut self) {
        let r = &mut self.refusals;
        if r.unlogged > 0 {
            tracing::warn!(
                "a primary completed the handshake ({} more connection(s) refused since the last \
                 report; {} in all, the last one {})",
                r.unlogged,
                r.total,
                r.reason
            );
            r.unlogged = 0;
            r.logged = Some(Instant::now());
        }
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

    fn poll_action(&mut self) -> Option<SecondaryAction> {
        self.engine.poll_action()
    }

    fn execute<G: Guest>(&mut self, io: &mut Io<G>, action: SecondaryAction) -> Result<()> {
        match action {
            SecondaryAction::StartDirtyLog => self.start_dirty_log(io)?,
            SecondaryAction::Pause => self.pause(io)?,
            SecondaryAction::HarvestDirty => self.harvest(io)?,
            SecondaryAction::Apply { epoch } => self.apply(io, epoch)?,
            SecondaryAction::Resume => self.resume(io)?,
            SecondaryAction::Running { epoch: _ } => self.pump_inputs(io)?,
            SecondaryAction::TakeOver { reason } => self.take_over(io, reason)?,
            SecondaryAction::Close { dropped } => self.close(io, dropped),
            SecondaryAction::GiveUp { reason } => self.give_up(io, &reason)?,
        }
        Ok(())
    }

    fn on_command<G: Guest>(&mut self, _io: &mut Io<G>, cmd: ControlCommand) {
        match cmd {
            ControlCommand::Failover => self.engine.failover(Instant::now()),
            ControlCommand::Protect { reply, .. } => reply.send(Err(
                "`protect` is for a primary; this node is a secondary".into(),
            )),
            ControlCommand::Status | ControlCommand::Checkpoint => {}
        }
    }

    fn on_event<G: Guest>(
        &mut self,
        guest: &mut G,
        now: Instant,
        ev: &Event<'_>,
        span: Span,
    ) -> Result<Next> {
        self.events_seen += 1;
        match self.engine.on_event(now, ev) {
            Ok(Some(Delivery::WritePage { pfn, data })) => self.sync.push(pfn, data, span),
            Ok(Some(Delivery::StagePage { data, .. })) => self.staged.push(data, span),
            Ok(Some(Delivery::Input { seq, frame })) => {
                self.inputs.push_back((seq, frame.to_vec()));
            }
            Ok(Some(Delivery::WriteBlocks(blocks))) => disk::write_initial(guest, &blocks)?,
            Ok(None) => {}
            Err(e) => return Ok(Next::Refused(e)),
        }
        // Written after this event (`after_event`), when the link's buffers can be reached.
        self.sync_due |= matches!(ev, Event::PageDataEnd) || self.sync.due();
        // Apply a complete checkpoint before reading further.
        if matches!(self.engine.state(), SecondaryState::Applying { .. }) {
            return Ok(Next::StopReading);
        }
        Ok(Next::ReadOn)
    }

    fn after_event<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        if std::mem::take(&mut self.sync_due) {
            self.sync.flush(&mut io.guest, io.link.as_ref())?;
        }
        Ok(())
    }

    fn keep_buffers_from(&self) -> Option<u64> {
        match (self.staged.first_buffer(), self.sync.first_buffer()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn serve<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        self.check_arbiter(io)?;
        self.pump_inputs(io)?;
        self.pump_output(io);
        Ok(())
    }

    fn finished(&self) -> bool {
        self.taken_over
    }

    fn backlog(&self) -> bool {
        !self.inputs.is_empty() && self.engine.running_epoch().is_some()
    }

    fn next_deadline(&self, opts: &NodeOptions, now: Instant) -> Option<Instant> {
        let arbiter = opts.arbiter.as_ref().map(|_| now + ARBITER_POLL);
        [self.engine.next_timeout(), arbiter]
            .into_iter()
            .flatten()
            .min()
    }

    fn publish(&self, st: &mut NodeStatus) {
        st.protected = self.engine.running_epoch().is_some();
        st.ever_protected |= st.protected;
        st.refused_connections = self.refusals.total;
        st.epoch = self.engine.running_epoch().unwrap_or(0);
        st.record_align(&self.aligner);
    }
}

impl SecondaryRole {
    /// `StartDirtyLog`: after checkpoint 0, the SVM's writes are logged (B).
    fn start_dirty_log<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        io.guest.start_dirty_log()?;
        self.logging = true;
        Ok(())
    }

    /// `Pause`: the SVM stops; outputs emitted before the pause still belong to the running
    /// epoch.
    fn pause<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        self.pump_output(io);
        io.guest.pause()?;
        self.pump_output(io);
        self.engine.paused(Instant::now())?;
        Ok(())
    }

    /// `HarvestDirty`: the SVM's dirty log (B) into the machine's bitmap.
    fn harvest<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        io.guest.harvest_dirty(self.engine.harvest_target())?;
        // A new checkpoint begins: pages of a torn one (never applied) are dropped.
        self.staged.clear();
        self.engine.harvested(Instant::now())?;
        Ok(())
    }

    /// `Apply`: the staged checkpoint `epoch` into the SVM (all of it: pages, then the state),
    /// digested when verifying; then the machine is told.
    fn apply<G: Guest>(&mut self, io: &mut Io<G>, epoch: u64) -> Result<()> {
        let t = Instant::now();
        self.sync.flush(&mut io.guest, io.link.as_ref())?;
        let kept = io.link.as_ref().map_or(0, Link::kept_buffers);
        self.staged
            .write(&mut io.guest, self.engine.staged_pfns(), io.link.as_ref())?;
        self.staged.clear();
        if let Some(link) = io.link.as_mut() {
            link.keep_from(None);
        }
        io.guest.set_state(self.engine.staged_state())?;
        disk::apply(io, &mut self.engine, epoch)?;
        // Frames the SVM emitted in the old epoch are superseded.
        self.out_frames.clear();
        self.nic_live = true;
        io.guest.drain_tx(&mut |_| {});
        // The SVM is now a copy of the PVM: its TCP sequence space is the PVM's. No frame of
        // the new epoch has crossed either way yet (the SVM resumes later, and inputs are
        // rewritten as they are injected).
        self.aligner.checkpoint();
        if io.opts.snapshots() {
            // Read back through the backend: tests check the state round trip too.
            let mut st = Vec::new();
            io.guest.get_state(&mut st)?;
            io.opts.take_snapshot(&mut io.guest, epoch, &st)?;
        }
        let digest = self.digest_applied(io)?;
        let took = t.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(
            "checkpoint {epoch}: {} pages applied (from {kept} kept receive buffers){} in {:.1} ms",
            self.engine.staged_pfns().len(),
            if digest.is_some() {
                " and digested"
            } else {
                ""
            },
            took
        );
        self.engine.applied(Instant::now(), digest)?;
        let mut st = io.status.lock();
        st.checkpoints += 1;
        st.last_apply_ms = Some(took);
        Ok(())
    }

    /// The digest of the checkpoint just applied, when verifying (None: unsettled). It covers
    /// the state as applied: a hypervisor's state read back later differs (Xen's clock runs on
    /// in a paused domain).
    fn digest_applied<G: Guest>(&mut self, io: &mut Io<G>) -> Result<Option<[u8; DIGEST_LEN]>> {
        if !self.engine.verifying() {
            return Ok(None);
        }
        let st = self.engine.staged_state().to_vec();
        let watch = if self.logging {
            Watch::FromNow
        } else {
            Watch::Off
        };
        Ok(settled_digest(&mut io.guest, &st, &mut self.late, watch)?)
    }

    /// `Resume`: the SVM runs the new epoch.
    fn resume<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        io.guest.resume()?;
        if matches!(self.engine.state(), SecondaryState::Resuming { .. }) {
            self.engine.resumed(Instant::now())?;
        }
        Ok(())
    }

    /// `TakeOver`: the primary is lost and a complete checkpoint is held: fence (with
    /// `--fence-cmd`), then serve as the new primary (the loop ends; `run` turns the node).
    /// `TakeOver`: the primary is lost and a complete checkpoint is held. With an arbiter,
    /// the takeover waits until this node holds the serving key; otherwise it goes on now.
    fn take_over<G: Guest>(&mut self, io: &mut Io<G>, reason: String) -> Result<()> {
        io.drop_link();
        match io.opts.arbiter.as_deref() {
            Some(arbiter) if !arbiter.holds_key(Instant::now()) => {
                tracing::warn!(
                    "primary lost: {reason}; taking over once this node holds the arbiter's \
                     serving key (the old primary's lease must expire first, ≤ {} s)",
                    arbiter.ttl().as_secs()
                );
                arbiter.want_key();
                self.awaiting_key = Some(AwaitingKey {
                    reason,
                    since: Instant::now(),
                    told_unreachable: false,
                });
                Ok(())
            }
            _ => self.serve_alone(io, reason),
        }
    }

    /// The arbiter's part of a secondary's loop: a primary whose lease expired while the pair
    /// ran (it is cut from the arbiter) is taken over; a takeover waiting for the key goes on
    /// once it is held, and is given up when the old primary keeps renewing (only the link
    /// failed) or, with `--arbiter-unreachable exit`, when the arbiter cannot be reached.
    fn check_arbiter<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        let Some(arbiter) = io.opts.arbiter.clone() else {
            return Ok(());
        };
        let now = Instant::now();
        let Some(wait) = self.awaiting_key.as_mut() else {
            if self.engine.running_epoch().is_some() && arbiter.lapsed() {
                tracing::warn!(
                    "arbiter: the primary's lease expired while the pair ran (the primary is \
                     cut from the arbiter); taking over"
                );
                self.engine.failover(now);
            }
            return Ok(());
        };
        if arbiter.holds_key(now) {
            let wait = self
                .awaiting_key
                .take()
                .map(|w| w.reason)
                .unwrap_or_default();
            return self.serve_alone(io, wait);
        }
        let ttl = arbiter.ttl();
        if let Some((holder, held)) = arbiter.held_by_other(now) {
            if held > 2 * ttl {
                let why = format!(
                    "not taking over: {holder} holds the pair's serving key and keeps renewing \
                     it (the primary is alive; only the replication link failed)"
                );
                tracing::error!("{why}");
                io.note_loss(why.clone());
                bail!(why);
            }
        } else if let Some(err) = arbiter.unreachable() {
            if now.saturating_duration_since(wait.since) > ttl {
                let why = format!("no takeover without the arbiter: {err}");
                if arbiter.config().unreachable == Unreachable::Exit {
                    tracing::error!("{why}");
                    io.note_loss(why.clone());
                    bail!(why);
                }
                if !wait.told_unreachable {
                    wait.told_unreachable = true;
                    tracing::error!("{why}; waiting for it (--arbiter-unreachable wait)");
                    io.note_loss(why);
                }
            }
        }
        Ok(())
    }

    /// The takeover proper: fence (with `--fence-cmd`), then serve as the new primary.
    fn serve_alone<G: Guest>(&mut self, io: &mut Io<G>, reason: String) -> Result<()> {
        let t0 = Instant::now();
        if let Err(e) = run_fence(&io.opts.fence_cmd, "not taking over") {
            tracing::error!("{e:#}");
            return Err(e);
        }
        disk::keep_overlay(&mut io.guest)?;
        tracing::warn!("primary lost: {reason}; taking over");
        io.drop_link();
        let mut st = io.status.lock();
        st.state = self.engine.state().name().into();
        st.protected = false;
        st.failover_reason = Some(reason);
        st.failover_at = Some(std::time::SystemTime::now());
        st.takeover_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        self.taken_over = true;
        Ok(())
    }

    /// `Close`: the primary ended replication on purpose (`dropped`: it dropped this
    /// secondary): stop.
    fn close<G: Guest>(&mut self, io: &mut Io<G>, dropped: bool) {
        let why = if dropped {
            "the primary dropped this secondary (colo failover on the primary); stopping \
             without taking over"
        } else {
            "the primary ended replication; stopping"
        };
        tracing::info!("{why}");
        io.status.lock().failover_reason = Some(why.into());
        io.drop_link();
        io.stop.store(true, Ordering::Relaxed);
    }

    /// `GiveUp`: the primary is lost and nothing consistent is held to take over from. When
    /// nothing decodable ever came, it was not a colo primary at all (a port scanner, a health
    /// check): the wait goes on. A colo peer that was refused (another key, size or --verify)
    /// ends the wait with that reason instead.
    fn give_up<G: Guest>(&mut self, io: &mut Io<G>, reason: &str) -> Result<()> {
        if !io.handshaken {
            return self.wait_again(io, reason);
        }
        Err(anyhow!(
            "primary lost and no consistent state to take over from: {reason}"
        ))
    }

    /// Drops a connection that did not complete the handshake — it sent nothing a colo
    /// stream decoder could read (a port scanner, a health check), or the handshake refused it
    /// (another key, version, guest size, `--verify` or `--insecure-plaintext`) — and waits for
    /// the primary again, on the same listener, until the first wait's deadline. Neither ends
    /// the protection before it starts. Refusals are rate-limited (at most a hundred connections
    /// a second are looked at) and logged at most once a second, with a count of the others.
    fn wait_again<G: Guest>(&mut self, io: &mut Io<G>, why: &str) -> Result<()> {
        let peer = io
            .link
            .take()
            .map(|l| {
                l.shutdown();
                l.peer().to_string()
            })
            .unwrap_or_default();
        let Some(listener) = self.listener.as_ref() else {
            bail!("primary lost before the handshake: {why}");
        };
        let now = Instant::now();
        let r = &mut self.refusals;
        if let Some(last) = r.last {
            // A connection flood costs at most a hundred handshakes a second.
            std::thread::sleep(REFUSAL_GAP.saturating_sub(now.saturating_duration_since(last)));
        }
        r.last = Some(Instant::now());
        r.total += 1;
        r.reason = format!("{peer}: {why}");
        if r.logged
            .is_none_or(|t| now.saturating_duration_since(t) >= REFUSAL_LOG_GAP)
        {
            let others = std::mem::take(&mut r.unlogged);
            let more = if others > 0 {
                format!(" ({others} more connection(s) refused since the last report)")
            } else {
                String::new()
            };
            if self.events_seen == 0 {
                tracing::warn!(
                    "the connection from {peer} sent nothing a colo primary sends ({why}); \
                     waiting for the primary again{more}"
                );
            } else {
                tracing::error!(
                    "refused the connection from {peer}: {why}; waiting for the primary \
                     again{more}"
                );
            }
            r.logged = Some(now);
        } else {
            r.unlogged += 1;
        }
        io.note_loss(format!("refused {peer}: {why}"));
        let pages = io.guest.page_count();
        let (total, last) = (self.refusals.total, self.refusals.reason.clone());
        let link =
            accept_primary(listener, self.waiting_until, pages, &io.opts).with_context(|| {
                format!("{total} connection(s) were refused, the last one ({last})")
            })?;
        let disk_blocks = disk::blocks(&mut io.guest);
        self.engine = Secondary::new(
            secondary_config(&io.opts, pages, disk_blocks),
            Instant::now(),
        );
        self.events_seen = 0;
        // Nothing staged refers to the new link's buffers.
        self.staged.clear();
        self.sync = SyncPages::default();
        io.attach(link);
        flush(self, io);
        Ok(())
    }

    /// Mirrored requests into the SVM, in order, as its RX ring has room (while an epoch
    /// runs); requests the checkpoint already carried are dropped. Each is aligned into the
    /// SVM's TCP sequence space on a copy as it is injected (a request that waits for room is
    /// aligned again at its next try, with the table of that moment: a checkpoint in between
    /// may have emptied it).
    fn pump_inputs<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()> {
        if self.engine.running_epoch().is_none() {
            return Ok(());
        }
        let next = io.guest.rx_next_seq();
        while self.inputs.front().is_some_and(|(s, _)| *s < next) {
            self.inputs.pop_front();
        }
        while let Some((seq, frame)) = self.inputs.front() {
            let want = io.guest.rx_next_seq();
            if *seq != want {
                bail!("mirrored request {seq} arrived but the SVM expects {want}: input lost");
            }
            self.scratch.clear();
            self.scratch.extend_from_slice(frame);
            if self.align {
                self.aligner.input(&mut self.scratch);
            }
            if !io.guest.inject(*seq, &self.scratch)? {
                break;
            }
            self.inputs.pop_front();
        }
        Ok(())
    }

    /// The SVM's output to the primary for comparison, kept until the next checkpoint. The
    /// aligner observes it (the guest's SYNs, SYN-ACKs, FINs and RSTs) and leaves it as it
    /// is: the comparator follows each VM's stream from its own SYN.
    fn pump_output<G: Guest>(&mut self, io: &mut Io<G>) {
        io.take_output_signal();
        if !self.nic_live {
            return;
        }
        let now = Instant::now();
        let engine = &mut self.engine;
        let frames = &mut self.out_frames;
        let aligner = &mut self.aligner;
        let align = self.align;
        let learnt = &mut self.learnt;
        io.guest.drain_tx(&mut |f| {
            learnt.learn(f);
            let mut f = f.to_vec();
            if align {
                aligner.output(&mut f);
            }
            engine.send_output(now, &f);
            frames.push(f);
        });
        if frames.len() > MAX_HELD_FRAMES {
            let cut = frames.len() - MAX_HELD_FRAMES;
            frames.drain(..cut);
        }
    }
}

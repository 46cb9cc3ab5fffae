//! The secondary's node driver: the SVM and the link to the primary around colo-core's
//! `Secondary` machine, and the takeover that turns it into a primary.

use std::collections::VecDeque;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use colo_core::bitmap::DirtyBitmap;
use colo_core::engine::{Delivery, Secondary, SecondaryAction, SecondaryConfig, SecondaryState};
use colo_core::PAGE_SIZE;

use crate::control::ControlCommand;
use crate::link::{Link, ReadSlice};
use crate::status::Shared;
use crate::verify::{settled_digest, Watch};

use super::*;

/// A running secondary.
pub struct SecondaryNode<G: Guest> {
    guest: G,
    engine: Secondary,
    link: Option<Link>,
    opts: NodeOptions,
    inputs: VecDeque<(u64, Vec<u8>)>,
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
    /// Where the primary connects, kept until the handshake is done: a connection that fails
    /// it is dropped and the wait goes on.
    listener: Option<TcpListener>,
    /// When waiting for the primary gives up.
    waiting_until: Instant,
    /// The handshake with the primary completed.
    handshaken: bool,
    /// Stream events decoded from the current connection.
    events_seen: u64,
}

/// The secondary machine's settings from the node's options.
fn secondary_config(opts: &NodeOptions, pages: u64) -> SecondaryConfig {
    let mut cfg = SecondaryConfig::new(pages);
    cfg.liveness = opts.liveness;
    cfg.verify = opts.verify;
    cfg.key = opts.key.clone();
    cfg.plaintext = opts.insecure_plaintext;
    cfg.nonce = nonce();
    cfg
}

/// Accepts the primary's connection on `listener`, waiting until `until`; the link seals
/// with `key` when the handshake says so.
fn accept_primary(
    listener: &TcpListener,
    until: Instant,
    pages: u64,
    key: Option<&[u8]>,
) -> Result<Link> {
    let mut link = Link::accept(
        listener,
        Some(until.saturating_duration_since(Instant::now())),
        DecoderConfig {
            expect_headers: true,
            page_count: Some(pages),
        },
    )?;
    link.set_key(colo_core::engine::messages::Role::Secondary, key);
    Ok(link)
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
        let waiting_until = Instant::now() + opts.connect_timeout;
        let link = accept_primary(listener, waiting_until, pages, opts.key.as_deref())?;
        let now = Instant::now();
        let cfg = secondary_config(&opts, pages);
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
            listener: listener.try_clone().ok(),
            waiting_until,
            handshaken: false,
            events_seen: 0,
        };
        // The HELLO goes out at once (see PrimaryNode::with_link).
        node.flush();
        Ok(node)
    }

    /// After a connection that sent nothing a colo stream decoder could read (a port scanner, a
    /// health check): drops it and waits for the primary again, on the same listener, until the
    /// first wait's deadline. One stray connection must not end the protection before it
    /// starts.
    fn wait_again(&mut self, why: &str) -> Result<()> {
        let peer = self
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
        tracing::warn!(
            "the connection from {peer} did not complete the colo handshake ({why}); waiting \
             for the primary again"
        );
        let pages = self.guest.page_count();
        let link = accept_primary(
            listener,
            self.waiting_until,
            pages,
            self.opts.key.as_deref(),
        )?;
        self.engine = Secondary::new(secondary_config(&self.opts, pages), Instant::now());
        self.events_seen = 0;
        {
            let mut st = self.status.lock();
            st.peer = Some(link.peer().to_string());
            st.failover_reason = None;
        }
        self.link = Some(link);
        self.flush();
        Ok(())
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
        if self.engine.state() != SecondaryState::AwaitingHandshake {
            self.handshaken = true;
        }
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

    fn into_primary(self) -> Result<SecondaryOutcome<G>> {
        let node = PrimaryNode::took_over(
            self.guest,
            self.opts,
            self.status,
            self.commands,
            self.inputs,
            &self.out_frames,
        )?;
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
            self.events_seen += 1;
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
                SecondaryAction::Apply { epoch } => self.apply(epoch)?,
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
                SecondaryAction::TakeOver { reason } => self.take_over(reason)?,
                SecondaryAction::Close { dropped } => self.close(dropped),
                // Nothing decodable ever came: not a colo primary at all (a port scanner, a
                // health check). A colo peer that was refused (another key, size or
                // --verify) ends the wait with that reason instead.
                SecondaryAction::GiveUp { reason } if !self.handshaken && self.events_seen == 0 => {
                    self.wait_again(&reason)?;
                }
                SecondaryAction::GiveUp { reason } => {
                    return Err(anyhow!(
                        "primary lost and no consistent state to take over from: {reason}"
                    ));
                }
            }
        }
    }

    /// Applies the staged checkpoint `epoch` to the SVM (all of it: pages, then the state),
    /// digests it when verifying, and tells the machine.
    fn apply(&mut self, epoch: u64) -> Result<()> {
        let t = Instant::now();
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
        // The digest covers the state as applied: a hypervisor's state read back later
        // differs (Xen's clock runs on in a paused domain).
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
        self.engine.applied(Instant::now(), digest)?;
        self.status.lock().checkpoints += 1;
        Ok(())
    }

    /// The primary is lost and a complete checkpoint is held: fence (with `--fence-cmd`), then
    /// serve as the new primary.
    fn take_over(&mut self, reason: String) -> Result<()> {
        let t0 = Instant::now();
        if let Err(e) = run_fence(&self.opts.fence_cmd, "not taking over") {
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
        Ok(())
    }

    /// The primary ended replication on purpose (`dropped`: it dropped this secondary): stop.
    fn close(&mut self, dropped: bool) {
        let why = if dropped {
            "the primary dropped this secondary (colo failover on the primary); stopping \
             without taking over"
        } else {
            "the primary ended replication; stopping"
        };
        tracing::info!("{why}");
        self.status.lock().failover_reason = Some(why.into());
        if let Some(l) = self.link.take() {
            l.shutdown();
        }
        self.stop.store(true, Ordering::Relaxed);
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
    }
}

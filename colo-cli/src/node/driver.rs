//! The node driver both roles share: [`Node`] owns the guest, the link, the status, the stop
//! flag and the operator's commands ([`Io`]) and runs the loop — wait for an event or a
//! deadline, read the link, run the machine's actions, serve, flush, publish. What differs
//! between the primary and the secondary sits behind [`Role`] (`primary.rs`, `secondary.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use colo_core::engine::EngineError;
use colo_core::stream::Event;
use colo_core::{Guest, OutputSignal};
use crossbeam_channel::Receiver;

use crate::control::ControlCommand;
use crate::link::{Link, ReadSlice, Span};
use crate::status::{NodeStatus, Shared};

use super::{NodeOptions, MAX_SLEEP};

/// The loop's sleep while requests wait for room in the guest's RX ring (the guest frees room
/// as it answers, which the output signal announces; this bounds a guest that drops a request).
const RING_RETRY: Duration = Duration::from_millis(1);

/// Longest stretch the loop spends consuming the link before it looks at timers again.
const MAX_READ_SLICE: Duration = Duration::from_millis(20);

/// What a node touches besides its state machine: the guest, the link to the peer, its
/// settings, its published status, and the operator (stop flag, control commands).
#[derive(Debug)]
pub struct Io<G> {
    pub(super) guest: G,
    pub(super) link: Option<Link>,
    pub(super) opts: NodeOptions,
    pub(super) status: Shared,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) commands: Option<Receiver<ControlCommand>>,
    /// The guest's output signal (see `GuestNic::output_ready`).
    pub(super) output: Option<OutputSignal>,
    /// The current link completed its handshake (a loss before that means protection never
    /// started: a setting that differs, or a peer that left during the handshake).
    pub(super) handshaken: bool,
}

impl<G: Guest> Io<G> {
    /// The parts of a node before its machine exists.
    pub(super) fn new(guest: G, link: Option<Link>, opts: NodeOptions, status: Shared) -> Self {
        let output = guest.output_ready();
        Self {
            guest,
            link,
            opts,
            status,
            stop: Arc::new(AtomicBool::new(false)),
            commands: None,
            output,
            handshaken: false,
        }
    }

    /// Takes a fresh connection to the peer into use: published, no handshake yet, and any
    /// earlier loss forgotten.
    pub(super) fn attach(&mut self, link: Link) {
        {
            let mut st = self.status.lock();
            st.peer = Some(link.peer().to_string());
            st.failover_reason = None;
            st.failover_at = None;
        }
        self.handshaken = false;
        self.link = Some(link);
    }

    /// Closes the link (if any) without a word to the peer.
    pub(super) fn drop_link(&mut self) {
        if let Some(l) = self.link.take() {
            l.shutdown();
        }
    }

    /// Records why the peer was lost (or why this node stopped), with the time.
    pub(super) fn note_loss(&self, reason: String) {
        let mut st = self.status.lock();
        st.failover_reason = Some(reason);
        st.failover_at = Some(std::time::SystemTime::now());
    }

    /// Empties the output signal before draining the guest's output: output after the drain
    /// signals anew.
    pub(super) fn take_output_signal(&self) {
        if let Some(rx) = &self.output {
            while rx.try_recv().is_ok() {}
        }
    }
}

/// What [`Role::on_event`] wants done next with the link's input.
#[derive(Debug)]
pub enum Next {
    /// Read on.
    ReadOn,
    /// Stop reading for this step (a complete checkpoint is to be applied first).
    StopReading,
    /// The machine refused the event: the peer broke the protocol, or the handshake failed.
    Refused(EngineError),
}

/// What makes a node a primary or a secondary: its state machine, what it does for each of the
/// machine's actions, and its part of each step of the loop. [`Node`] does the rest.
pub trait Role: Sized {
    /// The state machine.
    type Engine;
    /// What the machine asks for.
    type Action: std::fmt::Debug;
    /// This role ("primary") and the peer ("secondary"), for logs and messages.
    const NAME: &'static str;
    /// The peer's role.
    const PEER: &'static str;

    /// The state machine.
    fn engine(&self) -> &Self::Engine;
    /// The machine's state, by name.
    fn state_name(&self) -> &'static str;
    /// The machine talks to a peer: the handshake is over and the peer not lost.
    fn talking(&self) -> bool;
    /// The handshake with the peer just completed (once per connection).
    fn handshake_done(&mut self) {}
    /// What the machine has for the link.
    fn outbox(&mut self) -> &mut Vec<u8>;
    /// Tells the machine the peer is gone.
    fn peer_lost(&mut self, now: Instant, reason: String);
    /// Tells the machine bytes from the peer arrived at `at`.
    fn peer_heard(&mut self, at: Instant);
    /// Lets the machine act on its timers.
    fn handle_timeout(&mut self, now: Instant);
    /// The machine's next action.
    fn poll_action(&mut self) -> Option<Self::Action>;
    /// Does `action` (one method per action).
    fn execute<G: Guest>(&mut self, io: &mut Io<G>, action: Self::Action) -> Result<()>;
    /// One operator command from the control socket.
    fn on_command<G: Guest>(&mut self, io: &mut Io<G>, cmd: ControlCommand);
    /// After the commands, before the wait (the primary moves a re-protection on).
    fn after_commands<G: Guest>(&mut self, _io: &mut Io<G>) {}
    /// Client requests to wait on, if this role serves clients.
    fn clients(&self) -> Option<&Receiver<(u64, Vec<u8>)>> {
        None
    }
    /// One event from the link, stamped with its arrival, and the receive buffer it was
    /// decoded from.
    fn on_event<G: Guest>(
        &mut self,
        guest: &mut G,
        now: Instant,
        ev: &Event<'_>,
        span: Span,
    ) -> Result<Next>;
    /// Right after [`Role::on_event`], with the link reachable again (the initial
    /// synchronisation's pages are written from its buffers).
    fn after_event<G: Guest>(&mut self, _io: &mut Io<G>) -> Result<()> {
        Ok(())
    }
    /// The first receive buffer whose bytes the role still refers to (the link keeps it and
    /// every later one when used up; see [`Link::keep_from`]).
    fn keep_buffers_from(&self) -> Option<u64> {
        None
    }
    /// Between the two rounds of actions: requests into the guest, its output out, and (the
    /// primary) the checkpoint policy.
    fn serve<G: Guest>(&mut self, io: &mut Io<G>) -> Result<()>;
    /// The loop is over (the secondary took over).
    fn finished(&self) -> bool {
        false
    }
    /// Requests wait for room in the guest's RX ring.
    fn backlog(&self) -> bool;
    /// The earliest timer of the machine (and the policy, the comparator), if any.
    fn next_deadline(&self, opts: &NodeOptions, now: Instant) -> Option<Instant>;
    /// The role's figures into the status (the driver publishes state and link bytes).
    fn publish(&self, st: &mut NodeStatus);
}

/// A running node: the driver around a role's state machine. See [`crate::node::PrimaryNode`]
/// and [`crate::node::SecondaryNode`].
pub struct Node<G, R> {
    pub(super) io: Io<G>,
    pub(super) role: R,
}

impl<G, R: Role> std::fmt::Debug for Node<G, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(R::NAME)
            .field("state", &self.role.state_name())
            .finish()
    }
}

impl<G: Guest, R: Role> Node<G, R> {
    /// A node of `io` and `role`, whose HELLO goes out at once, before anything is read: a peer
    /// that refuses this node's HELLO then still reads this node's and can say why it was
    /// refused too.
    pub(super) fn start(io: Io<G>, role: R) -> Self {
        let mut node = Self { io, role };
        flush(&mut node.role, &mut node.io);
        node
    }

    /// A flag that ends the node's `run` when set.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.io.stop.clone()
    }

    /// The guest.
    pub fn guest(&mut self) -> &mut G {
        &mut self.io.guest
    }

    /// The state machine.
    pub fn engine(&self) -> &R::Engine {
        self.role.engine()
    }

    /// Takes operator commands (from the control socket); a secondary's carry over to the
    /// primary it becomes after a takeover.
    pub fn set_commands(&mut self, rx: Receiver<ControlCommand>) {
        self.io.commands = Some(rx);
    }

    /// Runs one iteration: commands, link input, actions, clients and guest (and the
    /// checkpoint policy), actions again, then flush and publish. Waits at most `wait` for an
    /// event first. Returns false once the loop is over (a secondary that took over).
    pub fn step(&mut self, wait: Duration) -> Result<bool> {
        // Commands first: a command that woke the previous wait is handled now, and a
        // re-protection's verdict is read only after the last step's actions published why.
        self.poll_commands();
        self.wait_for_events(wait);
        self.read_link()?;
        // Liveness is judged right after reading the link, never after a long action (a
        // pre-copy round of a big guest, a long apply) that kept the loop from reading what
        // arrived meanwhile, and by when bytes arrived, not when this loop decoded them.
        if let Some(at) = self.io.link.as_ref().and_then(Link::last_arrival) {
            self.role.peer_heard(at);
        }
        self.role.handle_timeout(Instant::now());
        self.run_actions()?;
        if self.role.finished() {
            return Ok(false);
        }
        self.role.serve(&mut self.io)?;
        self.run_actions()?;
        flush(&mut self.role, &mut self.io);
        self.publish();
        Ok(!self.role.finished())
    }

    /// Steps until the stop flag is set (true) or the loop is over (false).
    pub(super) fn run_loop(&mut self) -> Result<bool> {
        while !self.io.stop.load(Ordering::Relaxed) {
            let wait = self.next_wait();
            if !self.step(wait)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn poll_commands(&mut self) {
        while let Some(c) = self.io.commands.as_ref().and_then(|rx| rx.try_recv().ok()) {
            self.role.on_command(&mut self.io, c);
        }
        self.role.after_commands(&mut self.io);
    }

    /// How long the loop may sleep: until the role's next deadline, and at most [`MAX_SLEEP`];
    /// events (link, clients, commands, output) wake it sooner.
    fn next_wait(&self) -> Duration {
        if self.role.backlog() {
            return RING_RETRY;
        }
        let now = Instant::now();
        let mut until = now + MAX_SLEEP;
        if let Some(t) = self.role.next_deadline(&self.io.opts, now) {
            until = until.min(t);
        }
        until.saturating_duration_since(now)
    }

    /// Sleeps until `wait` has passed or one of the node's event sources has something: bytes
    /// on the link, a client request, a control command, guest output. The loop then looks at
    /// all of them; deadlines (heartbeats, timeouts, the checkpoint policy) bound `wait`.
    fn wait_for_events(&self, wait: Duration) {
        if wait.is_zero() {
            return;
        }
        let mut sel = crossbeam_channel::Select::new();
        let mut sources = 0;
        if let Some(l) = &self.io.link {
            match l.wait_handle() {
                Some(rx) => {
                    sel.recv(rx);
                    sources += 1;
                }
                None => return,
            }
        }
        if let Some(rx) = self.role.clients() {
            sel.recv(rx);
            sources += 1;
        }
        if let Some(rx) = &self.io.commands {
            sel.recv(rx);
            sources += 1;
        }
        if let Some(rx) = &self.io.output {
            sel.recv(rx);
            sources += 1;
        }
        if sources == 0 {
            std::thread::sleep(wait);
        } else {
            let _ = sel.ready_timeout(wait);
        }
    }

    /// Hands what arrived on the link to the role, event by event.
    fn read_link(&mut self) -> Result<()> {
        let Some(link) = self.io.link.as_mut() else {
            return Ok(());
        };
        if let Err(e) = link.fill::<()>(Duration::ZERO, None) {
            let reason = format!("link to the {} broke: {e}", R::PEER);
            self.role.peer_lost(Instant::now(), reason);
            return Ok(());
        }
        // Return to the loop now and then, so heartbeats go out while a long stream (a big
        // initial synchronisation onto a slow hypervisor) is being consumed.
        let mut slice = ReadSlice::new(MAX_READ_SLICE);
        while let Some(link) = self.io.link.as_mut() {
            let (ev, span) = match link.next_event_until(&mut slice) {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    let reason = format!("malformed stream from the {}: {e}", R::PEER);
                    self.role.peer_lost(slice.refresh(), reason);
                    break;
                }
            };
            let now = slice.stamp(&ev);
            let next = self.role.on_event(&mut self.io.guest, now, &ev, span)?;
            self.role.after_event(&mut self.io)?;
            if let Some(link) = self.io.link.as_mut() {
                link.keep_from(self.role.keep_buffers_from());
            }
            match next {
                Next::ReadOn => {}
                Next::StopReading => break,
                Next::Refused(e) => {
                    self.role.peer_lost(now, protocol_error(R::PEER, &e));
                    break;
                }
            }
        }
        Ok(())
    }

    fn run_actions(&mut self) -> Result<()> {
        loop {
            flush(&mut self.role, &mut self.io);
            let Some(action) = self.role.poll_action() else {
                return Ok(());
            };
            tracing::debug!(?action, "{} action", R::NAME);
            let t = Instant::now();
            self.role.execute(&mut self.io, action)?;
            tracing::debug!(
                "{} action done in {:.1} ms, now {}",
                R::NAME,
                t.elapsed().as_secs_f64() * 1e3,
                self.role.state_name()
            );
        }
    }

    fn publish(&mut self) {
        let arbiter = self
            .io
            .opts
            .arbiter
            .as_ref()
            .map(|a| a.status(Instant::now()));
        let mut st = self.io.status.lock();
        st.state = self.role.state_name().into();
        st.arbiter = arbiter;
        if let Some(l) = &self.io.link {
            st.link_bytes_out = l.bytes_out();
            st.link_bytes_in = l.bytes_in();
            st.link_streams = l.streams() as u64;
        }
        self.role.publish(&mut st);
    }
}

/// Writes the machine's outbox to the link (or drops it when there is no link); once the
/// handshake is over, makes sure the link's keepalive runs. Flushed before every action, so a
/// handshake completed earlier is always seen.
pub(super) fn flush<G, R: Role>(role: &mut R, io: &mut Io<G>) {
    let talking = role.talking();
    if talking && !io.handshaken {
        role.handshake_done();
    }
    io.handshaken |= talking;
    let keepalive = talking.then_some(io.opts.liveness.interval);
    if let Err(e) = flush_outbox(io.link.as_mut(), role.outbox(), keepalive) {
        role.peer_lost(
            Instant::now(),
            format!("writing to the {} failed: {e}", R::PEER),
        );
    }
}

/// Writes `out` to the link (or drops it when there is no link) and clears it; with
/// `keepalive` (the heartbeat interval), makes sure the link's keepalive runs.
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

/// Why the link to `peer` ("primary" or "secondary") ends after the machine refused its input:
/// a refusal at the handshake (a setting that differs) is not a broken protocol.
fn protocol_error(peer: &str, e: &EngineError) -> String {
    match e {
        EngineError::Link(l) => format!("the link handshake refused the {peer}: {l}"),
        e => format!("{peer} broke the protocol: {e}"),
    }
}

/// Runs the `--fence-cmd` before this node goes on alone; `instead` says what happens when it
/// fails.
pub(super) fn run_fence(cmd: &Option<String>, instead: &str) -> Result<()> {
    let Some(cmd) = cmd else { return Ok(()) };
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .with_context(|| format!("running fence command `{cmd}`"))?;
    if !status.success() {
        bail!("fence command `{cmd}` failed ({status}); {instead}");
    }
    Ok(())
}

/// A fresh nonce for the link handshake.
pub(super) fn nonce() -> [u8; 32] {
    use rand::RngCore;
    let mut n = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

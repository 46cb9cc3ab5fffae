//! The primary's links that start and end on purpose: re-protection (an unprotected primary,
//! for example the survivor of a failover, connects to a new secondary and re-synchronises it
//! while its guest keeps running) and the GOODBYE that ends replication.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use colo_core::engine::messages::Message;
use colo_core::engine::messages::Role;
use colo_core::engine::{Primary, PrimaryState};
use colo_core::Guest;

use super::driver::{flush, Io, Node};
use super::primary::{link_config, primary_config, PrimaryRole};
use crate::control::Reply;
use crate::link::{Link, PendingLink};

/// A re-protection under way: connecting on a helper thread (`pending`), then the handshake.
/// `reply` gets the outcome.
#[derive(Debug)]
pub(super) struct Protecting {
    peer: String,
    pending: Option<PendingLink>,
    reply: Reply,
}

impl<G: Guest> Node<G, PrimaryRole> {
    /// Re-protection: an unprotected primary (for example the survivor of a failover) connects
    /// to a new secondary at `peer` and re-synchronises it (pre-copy while the guest runs, then
    /// checkpoint 0). Client output passes through unprotected until checkpoint 0 begins. This
    /// connects in the caller's thread; the node's loop does it on a helper thread instead
    /// (`ControlCommand::Protect`).
    pub fn protect(&mut self, peer: &str) -> Result<()> {
        self.role.may_protect().map_err(|e| anyhow!(e))?;
        let pages = self.io.guest.page_count();
        let link = Link::connect(peer, self.io.opts.connect_timeout, link_config(pages))?;
        self.role.start_link(&mut self.io, peer, link);
        Ok(())
    }
}

impl PrimaryRole {
    /// Whether a re-protection may start now (else why not).
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
    pub(super) fn start_protect<G: Guest>(
        &mut self,
        io: &mut Io<G>,
        peer: String,
        timeout: Duration,
        reply: Reply,
    ) {
        if let Err(e) = self.may_protect() {
            reply.send(Err(e));
            return;
        }
        // The key file is read again: a rotated key is used from this connection on.
        if let Some(path) = &io.opts.key_file {
            match crate::config::read_key_file(path) {
                Ok(k) => io.opts.key = Some(k),
                Err(e) => {
                    reply.send(Err(format!("{e:#}")));
                    return;
                }
            }
        }
        let cfg = link_config(io.guest.page_count());
        match Link::connect_in_background(&peer, timeout, cfg) {
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
    pub(super) fn poll_protect<G: Guest>(&mut self, io: &mut Io<G>) {
        let Some(p) = self.protecting.as_mut() else {
            return;
        };
        if let Some(pending) = &p.pending {
            match pending.poll() {
                None => return,
                Some(Ok(link)) => {
                    p.pending = None;
                    let peer = p.peer.clone();
                    self.start_link(io, &peer, link);
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
                io.status
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
    fn start_link<G: Guest>(&mut self, io: &mut Io<G>, peer: &str, mut link: Link) {
        link.set_streams(io.opts.streams);
        link.set_key(Role::Primary, io.opts.key.as_deref());
        let pages = io.guest.page_count();
        let disk_blocks = super::disk::blocks(&mut io.guest);
        self.engine = Primary::new(primary_config(&io.opts, pages, disk_blocks), Instant::now());
        self.comparator = None;
        io.attach(link);
        // The HELLO goes out at once (see `Node::start`).
        flush(self, io);
        tracing::info!("re-protecting with the secondary at {peer}");
    }
}

/// Ends replication on purpose: sends GOODBYE(`reason`), half-closes, and reads until the
/// secondary closes too (at most 2 s): closing with unread bytes would reset the connection
/// and could destroy the GOODBYE in flight.
pub(super) fn goodbye(mut link: Link, reason: u32) {
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
pub(super) fn goodbye_in_background(link: Link, reason: u32) {
    let spawned = std::thread::Builder::new()
        .name("colo-goodbye".into())
        .spawn(move || goodbye(link, reason));
    if let Err(e) = spawned {
        tracing::warn!("could not say goodbye to the secondary: {e}");
    }
}

//! Tampering with a sealed replication link, for the tamper tests (feature `test-support`): a
//! fault proxy stage that follows one direction's handshake and sealed frames with the pair's
//! pre-shared key (only to find where a record of a chosen kind sits; it never re-seals), and
//! once armed changes the frame that carries the next such record: flips one of the record's
//! bytes, replays, reorders, drops or truncates the frame, or injects a forged one before it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use colo_core::engine::messages::{Control, Message, Role};
use colo_core::seal::{self, HandshakeTap, Opener, TapOutcome};
use colo_core::stream::{rec_type, Decoder, DecoderConfig, Event, Record};
use parking_lot::Mutex;

use crate::faultproxy::Direction;

/// Which record the tampering aims at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A page of a PAGE_DATA record (one of its data bytes).
    Page,
    /// A record of this type (a colo record or a Xen one: CHECKPOINT, the dirty pfn list).
    Record(u32),
    /// A CONTROL record with this message (NEW, SVM_SUSPENDED, SVM_READY, SVM_RESUMED).
    Control(Control),
}

/// What is done to the frame that carries the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// One byte of the target record changed (its last one; for a page, the page's last).
    Flip,
    /// The frame forwarded twice.
    Replay,
    /// The frame held back and forwarded after the next one.
    Reorder,
    /// The frame left out.
    Drop,
    /// A forged frame (a plausible length, random bytes) forwarded before it.
    Inject,
    /// Half the frame forwarded, then the connection closed.
    Truncate,
}

/// A tampering plan for one direction of a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The direction tampered with.
    pub dir: Direction,
    /// The role of the node that sends in that direction.
    pub sender: Role,
    /// The record aimed at.
    pub target: Target,
    /// What is done.
    pub action: Action,
}

/// What the tampering did, once it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The sealed frame's position in its direction.
    pub frame: u64,
    /// CHECKPOINT records that passed intact before it (in this direction).
    pub checkpoints_before: u64,
}

/// Shared between a plan's proxy stages and the test: the key, both directions' HELLOs, the
/// arming and the outcome.
#[derive(Debug)]
pub struct Tampering {
    plan: Plan,
    psk: Vec<u8>,
    hellos: Mutex<[Option<colo_core::engine::messages::Hello>; 2]>,
    armed: AtomicBool,
    fired: Mutex<Option<Fired>>,
}

impl Tampering {
    /// A plan for a link sealed with `psk`; acts once [`Self::arm`] was called.
    pub fn new(plan: Plan, psk: &[u8]) -> Arc<Self> {
        Arc::new(Self {
            plan,
            psk: psk.to_vec(),
            hellos: Mutex::new([None, None]),
            armed: AtomicBool::new(false),
            fired: Mutex::new(None),
        })
    }

    /// The plan.
    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// From now on, the next target record is tampered with.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// What was done, once done.
    pub fn fired(&self) -> Option<Fired> {
        self.fired.lock().clone()
    }
}

/// What a stage forwards.
#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    /// These bytes.
    Bytes(Vec<u8>),
    /// Nothing more: close the connection.
    Close,
}

enum Phase {
    Handshake(Box<HandshakeTap>),
    Frames {
        opener: Box<Opener>,
        dec: Box<Decoder>,
        /// Wire bytes of frames not complete yet.
        pending: Vec<u8>,
        /// A frame held back (reordering) until the next one passed.
        held: Option<Vec<u8>>,
        checkpoints: u64,
    },
    Through,
}

/// One direction's stage: fed what the proxy read, returns what to forward.
pub struct Stage {
    t: Arc<Tampering>,
    dir: Direction,
    phase: Phase,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage").field("dir", &self.dir).finish()
    }
}

fn index(d: Direction) -> usize {
    match d {
        Direction::ToTarget => 0,
        Direction::FromTarget => 1,
    }
}

fn other(d: Direction) -> Direction {
    match d {
        Direction::ToTarget => Direction::FromTarget,
        Direction::FromTarget => Direction::ToTarget,
    }
}

impl Stage {
    /// The stage for `dir` of a connection under `t`.
    pub fn new(t: Arc<Tampering>, dir: Direction) -> Self {
        let sender = if dir == t.plan.dir {
            t.plan.sender
        } else {
            t.plan.sender.peer()
        };
        Self {
            t,
            dir,
            phase: Phase::Handshake(Box::new(HandshakeTap::new(sender))),
        }
    }

    /// Takes the next bytes read in this direction.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Forward> {
        let mut out = Vec::new();
        match &mut self.phase {
            Phase::Through => out.push(Forward::Bytes(bytes.to_vec())),
            Phase::Handshake(tap) => {
                let step = tap.feed(bytes);
                if let Some(h) = tap.hello() {
                    self.t.hellos.lock()[index(self.dir)] = Some(*h);
                }
                match step {
                    TapOutcome::More => out.push(Forward::Bytes(bytes.to_vec())),
                    TapOutcome::Plain => {
                        out.push(Forward::Bytes(bytes.to_vec()));
                        self.phase = Phase::Through;
                    }
                    TapOutcome::SealAfter { used } => {
                        out.push(Forward::Bytes(bytes[..used].to_vec()));
                        self.phase = self.frames_phase();
                        if !matches!(self.phase, Phase::Frames { .. }) {
                            out.push(Forward::Bytes(bytes[used..].to_vec()));
                        } else {
                            out.extend(self.push(&bytes[used..]));
                        }
                    }
                }
            }
            Phase::Frames { .. } => self.frames(bytes, &mut out),
        }
        out
    }

    /// Only the tampered direction follows its frames; the other passes through.
    fn frames_phase(&self) -> Phase {
        if self.dir != self.t.plan.dir {
            return Phase::Through;
        }
        let hellos = self.t.hellos.lock();
        let (Some(mine), Some(theirs)) = (hellos[index(self.dir)], hellos[index(other(self.dir))])
        else {
            return Phase::Through;
        };
        let (p, s) = match mine.role {
            Role::Primary => (mine.nonce, theirs.nonce),
            Role::Secondary => (theirs.nonce, mine.nonce),
        };
        let key = seal::direction_key(&self.t.psk, &p, &s, mine.role);
        match key.and_then(Opener::new) {
            Ok(opener) => Phase::Frames {
                opener: Box::new(opener),
                dec: Box::new(Decoder::new(DecoderConfig {
                    expect_headers: false,
                    page_count: None,
                })),
                pending: Vec::new(),
                held: None,
                checkpoints: 0,
            },
            Err(_) => Phase::Through,
        }
    }

    fn frames(&mut self, bytes: &[u8], out: &mut Vec<Forward>) {
        let Phase::Frames {
            opener,
            dec,
            pending,
            held,
            checkpoints,
        } = &mut self.phase
        else {
            return;
        };
        pending.extend_from_slice(bytes);
        loop {
            let Some(h) = pending.get(..seal::HEADER_LEN) else {
                return;
            };
            let Ok(want) = opener.frame_len([h[0], h[1], h[2], h[3]]) else {
                // Not a stream this stage can follow: pass everything on.
                out.push(Forward::Bytes(std::mem::take(pending)));
                self.phase = Phase::Through;
                return;
            };
            if pending.len() < want {
                return;
            }
            let wire: Vec<u8> = pending.drain(..want).collect();
            let frame = opener.frames();
            let mut plain = wire.clone();
            let Ok(range) = opener.open(&mut plain) else {
                out.push(Forward::Bytes(wire));
                out.push(Forward::Bytes(std::mem::take(pending)));
                self.phase = Phase::Through;
                return;
            };
            let armed = self.t.armed.load(Ordering::SeqCst);
            let before = *checkpoints;
            let hit = scan(dec, &plain[range], self.t.plan.target, armed, checkpoints);
            if let Some(first) = held.take() {
                // Reordering: this frame goes first, then the held one; then straight through.
                out.push(Forward::Bytes(wire));
                out.push(Forward::Bytes(first));
                out.push(Forward::Bytes(std::mem::take(pending)));
                self.phase = Phase::Through;
                return;
            }
            let Some(at) = hit else {
                out.push(Forward::Bytes(wire));
                continue;
            };
            *self.t.fired.lock() = Some(Fired {
                frame,
                checkpoints_before: before,
            });
            let mut wire = wire;
            match self.t.plan.action {
                Action::Flip => {
                    wire[seal::HEADER_LEN + at] ^= 0x01;
                    out.push(Forward::Bytes(wire));
                }
                Action::Replay => {
                    out.push(Forward::Bytes(wire.clone()));
                    out.push(Forward::Bytes(wire));
                }
                Action::Reorder => {
                    *held = Some(wire);
                    continue;
                }
                Action::Drop => {}
                Action::Inject => {
                    let mut forged = vec![0, 0, 0, 24];
                    forged.extend((0..24 + seal::TAG_LEN).map(|i| (i as u8).wrapping_mul(37)));
                    out.push(Forward::Bytes(forged));
                    out.push(Forward::Bytes(wire));
                }
                Action::Truncate => {
                    wire.truncate(wire.len() / 2);
                    out.push(Forward::Bytes(wire));
                    out.push(Forward::Close);
                    self.phase = Phase::Through;
                    return;
                }
            }
            out.push(Forward::Bytes(std::mem::take(pending)));
            self.phase = Phase::Through;
            return;
        }
    }
}

/// Decodes one frame's plaintext; counts CHECKPOINT records; returns the index (in `plain`)
/// of the byte to change when `armed` and a target record ends in this frame.
fn scan(
    dec: &mut Decoder,
    mut plain: &[u8],
    target: Target,
    armed: bool,
    checkpoints: &mut u64,
) -> Option<usize> {
    let start = dec.offset();
    let mut hit = None;
    loop {
        let Ok((n, ev)) = dec.feed(plain) else {
            return hit;
        };
        plain = &plain[n..];
        let Some(ev) = ev else {
            return hit;
        };
        let matched = match (&ev, target) {
            (Event::Page { data: Some(_), .. }, Target::Page) => true,
            (Event::Record(r), Target::Record(t)) => r.rtype() == t,
            (Event::Record(Record::Optional { rtype, body }), Target::Control(c)) => {
                matches!(
                    Message::parse(*rtype, body),
                    Ok(Some(Message::Control { msg, .. })) if msg == c
                )
            }
            _ => false,
        };
        let is_checkpoint = matches!(&ev, Event::Record(r) if r.rtype() == rec_type::CHECKPOINT);
        let end = dec.offset();
        if armed && matched && hit.is_none() && end > start {
            hit = usize::try_from(end - start - 1).ok();
        }
        if is_checkpoint && hit.is_none() {
            *checkpoints += 1;
        }
    }
}

//! The link handshake: versions, roles, guest geometry (pages and disk), the verification and
//! plaintext options and an optional pre-shared key proven by HMAC-SHA256 challenge-response in
//! both directions.
//!
//! ```text
//!   primary                                        secondary
//!      | -- HELLO(v, role, pages, 4096, flags, nonce_p, disk_p) -->|
//!      |<-- HELLO(v, role, pages, 4096, flags, nonce_s, disk_s) -- |     (both send at once)
//!      | -- AUTH(HMAC(k, P, nonce_s, nonce_p, pages, disk_p, disk_s, verify, plaintext, coding, mirror)) -->|
//!      |<-- AUTH(HMAC(k, S, nonce_p, nonce_s, pages, disk_p, disk_s, verify, plaintext, coding, mirror)) -- |
//!                                                                      (AUTH only with a key)
//!   Done: the link is trusted; only now is a guest page read or written. With a key and
//!   without --insecure-plaintext, every byte after each side's AUTH is sealed (crate::seal).
//! ```
//!
//! Both sides check the peer's HELLO: same version, opposite roles, 4096-byte pages, the same
//! page count, a key on both sides or on neither, `--verify` on both sides or on neither
//! (flags bit 1): a primary that verifies beside a secondary that sends no digests, or the
//! reverse, would otherwise pass silently; and, with keys, `--insecure-plaintext` on both sides
//! or on neither (flags bit 2): one side would otherwise read the other's sealed frames as
//! records; and the same page coding (flags bits 3–5, `--zero-pages`, `--compress`): a
//! secondary must expect the primary's PACKED_PAGES; and the same disk mirror mode (flags bit
//! 6, `--disk-mirror`): a checkpoint-mode secondary refuses DISK_BLOCKS between checkpoints;
//! and the same number of connections (flags bits 7–10, `--streams`, see [`crate::stripe`]):
//! the transport would otherwise wait for connections that never come. A single connection
//! sets no bit and is left out of the proof, so it speaks exactly what a build without the
//! option speaks (which refuses a count above 1 as unknown flag bits).
//! A mismatch is refused by both, each naming
//! what differs and which side has it.
//! The disk (`--disk`, in 4 KiB blocks): a secondary whose disk is missing or smaller than the
//! primary's could not hold the primary's blocks, and a secondary with a disk beside a primary
//! without one would serve a disk nobody replicates; both are refused. A larger secondary disk
//! is accepted: only the primary's size is replicated ([`Handshake::disk_blocks`]).
//!
//! Each proof binds the prover's role, the verifier's fresh nonce (so it cannot be replayed), the
//! prover's nonce (so it cannot be reflected back), the geometry (both disk sizes included, as
//! the two sides may differ) and the verify, plaintext, page coding and disk mirror flags (so a man in the
//! middle cannot hide a mismatch, nor strip the encryption by setting both plaintext flags).
//! The machine is sans-IO: the caller supplies the nonce (from the OS's
//! RNG) and moves the encoded bytes.

use super::messages::{Hello, Message, Role, MAC_LEN, MAX_STREAMS, PROTOCOL_VERSION};
use crate::disk::DiskMirror;
use crate::stream::PageCoding;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// Why a peer was refused during the handshake.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The peer speaks another protocol version.
    #[error("peer speaks link protocol version {peer}, this node speaks {ours}")]
    Version {
        /// Ours.
        ours: u32,
        /// Theirs.
        peer: u32,
    },
    /// The peer's HELLO sets flag bits this build does not know (it speaks our version, so it
    /// is not a build of colo as released).
    #[error(
        "peer's HELLO sets flag bits {0:#x} that link protocol version {v} does not define",
        v = PROTOCOL_VERSION
    )]
    UnknownFlags(u32),
    /// Both sides claim the same role.
    #[error("peer is also a {0}: one node must be primary and the other secondary")]
    SameRole(Role),
    /// Different guest sizes.
    #[error("guest geometry differs: this node has {ours} pages, the peer {peer}")]
    Geometry {
        /// Ours.
        ours: u64,
        /// Theirs.
        peer: u64,
    },
    /// A page size other than 4096.
    #[error("peer uses {0}-byte pages; colo supports 4096 only")]
    PageSize(u32),
    /// One side has a key and the other has none.
    #[error("{0}")]
    KeyPresence(&'static str),
    /// One side verifies every checkpoint (`--verify`) and the other does not.
    #[error(
        "--verify differs: the {with} has it and the {without} does not; give --verify to both \
         nodes or to neither"
    )]
    Verify {
        /// The side with `--verify`.
        with: Role,
        /// The side without.
        without: Role,
    },
    /// One side seals the records after the handshake and the other asked for plaintext
    /// (`--insecure-plaintext`).
    #[error(
        "--insecure-plaintext differs: the {with} has it and the {without} does not, so one \
         would read the other's encrypted records as plaintext; give it to both nodes or to \
         neither"
    )]
    Plaintext {
        /// The side with `--insecure-plaintext`.
        with: Role,
        /// The side without.
        without: Role,
    },
    /// The primary has a disk and the secondary has none.
    #[error(
        "the primary has a disk of {primary} blocks ({} MiB) but the secondary has none; give the \
         secondary a disk (--disk) at least as large",
        primary >> 8
    )]
    DiskMissing {
        /// The primary's disk, in 4 KiB blocks.
        primary: u64,
    },
    /// The secondary's disk cannot hold the primary's.
    #[error(
        "the secondary's disk ({secondary} blocks, {} MiB) is smaller than the primary's \
         ({primary} blocks, {} MiB); it must be at least as large",
        secondary >> 8,
        primary >> 8
    )]
    DiskTooSmall {
        /// The primary's disk, in 4 KiB blocks.
        primary: u64,
        /// The secondary's.
        secondary: u64,
    },
    /// The secondary has a disk and the primary has none: nothing would replicate it.
    #[error(
        "the secondary has a disk of {secondary} blocks but the primary has none; give --disk to \
         both nodes or to neither"
    )]
    DiskUnexpected {
        /// The secondary's disk, in 4 KiB blocks.
        secondary: u64,
    },
    /// The two sides code page data differently (`--zero-pages`, `--compress`).
    #[error(
        "page coding differs: the {ours_role} has {ours}, the {peer_role} has {peer}; give both \
         nodes the same --compress and --zero-pages"
    )]
    Coding {
        /// This side.
        ours_role: Role,
        /// This side's coding.
        ours: PageCoding,
        /// The peer.
        peer_role: Role,
        /// The peer's coding.
        peer: PageCoding,
    },
    /// The two sides send disk blocks differently (`--disk-mirror`).
    #[error(
        "disk mirror mode differs: the {ours_role} has --disk-mirror {ours}, the {peer_role} has \
         --disk-mirror {peer}; give both nodes the same --disk-mirror"
    )]
    DiskMirror {
        /// This side.
        ours_role: Role,
        /// This side's mode.
        ours: DiskMirror,
        /// The peer.
        peer_role: Role,
        /// The peer's mode.
        peer: DiskMirror,
    },
    /// The two sides use different numbers of connections (`--streams`); a peer built
    /// before the option always says 1.
    #[error(
        "--streams differs: the {ours_role} has --streams {ours}, the {peer_role} has --streams \
         {peer}; give both nodes the same --streams (a build without the option counts as 1)"
    )]
    Streams {
        /// This side.
        ours_role: Role,
        /// This side's count.
        ours: u8,
        /// The peer.
        peer_role: Role,
        /// The peer's count.
        peer: u8,
    },
    /// The peer's proof is wrong: it does not hold the same key.
    #[error("peer failed authentication: its HMAC proof does not match this node's key")]
    BadProof,
    /// A message that does not belong in this handshake state.
    #[error("handshake awaiting {state} received {got}")]
    Unexpected {
        /// What the handshake was awaiting.
        state: &'static str,
        /// What came instead.
        got: &'static str,
    },
}

/// What the handshake awaits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeState {
    /// Our HELLO is out; awaiting the peer's.
    AwaitingHello,
    /// Our AUTH is out; awaiting the peer's proof.
    AwaitingAuth,
    /// The link is trusted.
    Done,
}

impl HandshakeState {
    fn name(self) -> &'static str {
        match self {
            HandshakeState::AwaitingHello => "HELLO",
            HandshakeState::AwaitingAuth => "AUTH",
            HandshakeState::Done => "nothing (handshake complete)",
        }
    }
}

/// What one side offers in its HELLO, besides its role, key and nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offer {
    /// The guest's size in pages.
    pub page_count: u64,
    /// The guest's disk in 4 KiB blocks (0: none).
    pub disk_blocks: u64,
    /// This side digests every checkpoint (`--verify`).
    pub verify: bool,
    /// This side asks for an unsealed link (`--insecure-plaintext`).
    pub plaintext: bool,
    /// How this side codes page data (`--zero-pages`, `--compress`).
    pub coding: PageCoding,
    /// How disk blocks travel (`--disk-mirror`).
    pub disk_mirror: DiskMirror,
    /// Connections for the link (`--streams`; 0 counts as 1).
    pub streams: u8,
}

/// One side's handshake.
#[derive(Clone)]
pub struct Handshake {
    role: Role,
    page_count: u64,
    disk_blocks: u64,
    /// The peer's disk, from its HELLO.
    peer_disk_blocks: u64,
    verify: bool,
    plaintext: bool,
    coding: PageCoding,
    disk_mirror: DiskMirror,
    streams: u8,
    key: Option<Vec<u8>>,
    nonce: [u8; 32],
    peer_nonce: [u8; 32],
    state: HandshakeState,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("page_count", &self.page_count)
            .field("disk_blocks", &self.disk_blocks)
            .field("verify", &self.verify)
            .field("plaintext", &self.plaintext)
            .field("coding", &self.coding)
            .field("disk_mirror", &self.disk_mirror)
            .field("streams", &self.streams)
            .field("has_key", &self.key.is_some())
            .field("state", &self.state)
            .finish()
    }
}

/// Short name of a message, for errors.
pub(crate) fn message_name(m: &Message<'_>) -> &'static str {
    match m {
        Message::Hello(_) => "HELLO",
        Message::Auth(_) => "AUTH",
        Message::Control { .. } => "CONTROL",
        Message::Input { .. } => "INPUT",
        Message::Output { .. } => "OUTPUT",
        Message::Heartbeat(_) => "HEARTBEAT",
        Message::VcpuState(_) => "VCPU_STATE",
        Message::Digest { .. } => "DIGEST",
        Message::Goodbye(_) => "GOODBYE",
        Message::DiskBlocks(_) => "DISK_BLOCKS",
        Message::DiskDigest { .. } => "DISK_DIGEST",
    }
}

impl Handshake {
    /// A handshake for `role` with a guest of `page_count` pages, whether this side verifies
    /// every checkpoint (`verify`), whether it asks for an unsealed link (`plaintext`,
    /// `--insecure-plaintext`), an optional pre-shared `key` and a fresh random `nonce`.
    /// Appends our HELLO to `out`. The guest has no disk; see [`Handshake::offer`].
    pub fn start(
        role: Role,
        page_count: u64,
        verify: bool,
        plaintext: bool,
        key: Option<Vec<u8>>,
        nonce: [u8; 32],
        out: &mut Vec<u8>,
    ) -> Self {
        let offer = Offer {
            page_count,
            disk_blocks: 0,
            verify,
            plaintext,
            coding: PageCoding::PLAIN,
            disk_mirror: DiskMirror::default(),
            streams: 1,
        };
        Self::offer(role, offer, key, nonce, out)
    }

    /// A handshake for `role` offering `offer`, with an optional pre-shared `key` and a fresh
    /// random `nonce`. Appends our HELLO to `out`.
    pub fn offer(
        role: Role,
        offer: Offer,
        key: Option<Vec<u8>>,
        nonce: [u8; 32],
        out: &mut Vec<u8>,
    ) -> Self {
        let hs = Self {
            role,
            page_count: offer.page_count,
            disk_blocks: offer.disk_blocks,
            peer_disk_blocks: 0,
            verify: offer.verify,
            plaintext: offer.plaintext,
            coding: offer.coding,
            disk_mirror: offer.disk_mirror,
            streams: offer.streams.clamp(1, MAX_STREAMS),
            key,
            nonce,
            peer_nonce: [0; 32],
            state: HandshakeState::AwaitingHello,
        };
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            role,
            page_count: offer.page_count,
            page_size: 4096,
            wants_auth: hs.key.is_some(),
            verify: offer.verify,
            plaintext: offer.plaintext,
            coding: offer.coding,
            disk_mirror: offer.disk_mirror,
            nonce,
            disk_blocks: offer.disk_blocks,
            streams: hs.streams,
            other_flags: 0,
        })
        .encode(out);
        hs
    }

    /// The replicated disk's size in blocks once the peer's HELLO passed: the primary's disk
    /// (a secondary's may be larger; only the primary's blocks are replicated). 0: no disk.
    pub fn disk_blocks(&self) -> u64 {
        self.disks().0
    }

    /// (the primary's disk, the secondary's), as this side knows them.
    fn disks(&self) -> (u64, u64) {
        match self.role {
            Role::Primary => (self.disk_blocks, self.peer_disk_blocks),
            Role::Secondary => (self.peer_disk_blocks, self.disk_blocks),
        }
    }

    /// Checks both disks once the peer's HELLO (`peer`'s disk) arrived.
    fn check_disks(&mut self, peer: u64) -> Result<(), LinkError> {
        self.peer_disk_blocks = peer;
        match self.disks() {
            (0, 0) => Ok(()),
            (primary, 0) => Err(LinkError::DiskMissing { primary }),
            (0, secondary) => Err(LinkError::DiskUnexpected { secondary }),
            (primary, secondary) if secondary < primary => {
                Err(LinkError::DiskTooSmall { primary, secondary })
            }
            _ => Ok(()),
        }
    }

    /// What the handshake awaits.
    pub fn state(&self) -> HandshakeState {
        self.state
    }

    fn proof(
        &self,
        prover: Role,
        verifier_nonce: &[u8; 32],
        prover_nonce: &[u8; 32],
    ) -> HmacSha256 {
        let key = self.key.as_deref().unwrap_or_default();
        // new_from_slice accepts keys of any length for HMAC.
        let mut mac = match HmacSha256::new_from_slice(key) {
            Ok(m) => m,
            Err(_) => unreachable_hmac(),
        };
        mac.update(b"colo-link-auth-v6");
        mac.update(&[match prover {
            Role::Primary => 1,
            Role::Secondary => 2,
        }]);
        mac.update(verifier_nonce);
        mac.update(prover_nonce);
        mac.update(&self.page_count.to_le_bytes());
        let (primary_disk, secondary_disk) = self.disks();
        mac.update(&primary_disk.to_le_bytes());
        mac.update(&secondary_disk.to_le_bytes());
        mac.update(&[u8::from(self.verify), u8::from(self.plaintext)]);
        mac.update(&self.coding.flags().to_le_bytes());
        mac.update(&[u8::from(self.disk_mirror == DiskMirror::Continuous)]);
        // Only a count above one is proven, so a single-stream link proves what it did before
        // the option existed (the HELLOs are the same too).
        if self.streams > 1 {
            mac.update(b"streams");
            mac.update(&[self.streams]);
        }
        mac
    }

    /// Feeds one message from the peer; appends any reply to `out`. Returns `Ok(true)` once the
    /// link is trusted.
    pub fn on_message(&mut self, msg: &Message<'_>, out: &mut Vec<u8>) -> Result<bool, LinkError> {
        match (self.state, msg) {
            (HandshakeState::AwaitingHello, Message::Hello(h)) => {
                if h.version != PROTOCOL_VERSION {
                    return Err(LinkError::Version {
                        ours: PROTOCOL_VERSION,
                        peer: h.version,
                    });
                }
                if h.other_flags != 0 {
                    return Err(LinkError::UnknownFlags(h.other_flags));
                }
                if h.role == self.role {
                    return Err(LinkError::SameRole(h.role));
                }
                if h.page_size != 4096 {
                    return Err(LinkError::PageSize(h.page_size));
                }
                if h.page_count != self.page_count {
                    return Err(LinkError::Geometry {
                        ours: self.page_count,
                        peer: h.page_count,
                    });
                }
                if h.verify != self.verify {
                    let (with, without) = if self.verify {
                        (self.role, h.role)
                    } else {
                        (h.role, self.role)
                    };
                    return Err(LinkError::Verify { with, without });
                }
                self.check_disks(h.disk_blocks)?;
                if h.coding != self.coding {
                    return Err(LinkError::Coding {
                        ours_role: self.role,
                        ours: self.coding,
                        peer_role: h.role,
                        peer: h.coding,
                    });
                }
                if h.streams != self.streams {
                    return Err(LinkError::Streams {
                        ours_role: self.role,
                        ours: self.streams,
                        peer_role: h.role,
                        peer: h.streams,
                    });
                }
                if h.disk_mirror != self.disk_mirror {
                    return Err(LinkError::DiskMirror {
                        ours_role: self.role,
                        ours: self.disk_mirror,
                        peer_role: h.role,
                        peer: h.disk_mirror,
                    });
                }
                match (self.key.is_some(), h.wants_auth) {
                    (true, false) => {
                        return Err(LinkError::KeyPresence(
                            "this node has a pre-shared key but the peer has none",
                        ))
                    }
                    (false, true) => {
                        return Err(LinkError::KeyPresence(
                            "the peer has a pre-shared key but this node has none (--key-file)",
                        ))
                    }
                    (false, false) => {
                        self.state = HandshakeState::Done;
                        return Ok(true);
                    }
                    (true, true) => {}
                }
                if h.plaintext != self.plaintext {
                    let (with, without) = if self.plaintext {
                        (self.role, h.role)
                    } else {
                        (h.role, self.role)
                    };
                    return Err(LinkError::Plaintext { with, without });
                }
                self.peer_nonce = h.nonce;
                let tag = self
                    .proof(self.role, &self.peer_nonce, &self.nonce)
                    .finalize()
                    .into_bytes();
                let mut mac = [0u8; MAC_LEN];
                mac.copy_from_slice(&tag);
                Message::Auth(mac).encode(out);
                self.state = HandshakeState::AwaitingAuth;
                Ok(false)
            }
            (HandshakeState::AwaitingAuth, Message::Auth(tag)) => {
                self.proof(self.role.peer(), &self.nonce, &self.peer_nonce)
                    .verify_slice(tag)
                    .map_err(|_| LinkError::BadProof)?;
                self.state = HandshakeState::Done;
                Ok(true)
            }
            (state, m) => Err(LinkError::Unexpected {
                state: state.name(),
                got: message_name(m),
            }),
        }
    }
}

/// HMAC-SHA256 accepts every key length; this cannot be reached.
#[cold]
fn unreachable_hmac() -> ! {
    unreachable!("HMAC-SHA256 accepts keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::messages::HELLO_VERIFY;

    fn parse(bytes: &[u8]) -> Message<'_> {
        let rtype = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        Message::parse(rtype, &bytes[8..8 + len]).unwrap().unwrap()
    }

    fn run(
        pk: Option<&[u8]>,
        sk: Option<&[u8]>,
        ppages: u64,
        spages: u64,
    ) -> (Result<bool, LinkError>, Result<bool, LinkError>) {
        run_verify(pk, sk, ppages, spages, (false, false))
    }

    /// `verify`: (primary's, secondary's).
    fn run_verify(
        pk: Option<&[u8]>,
        sk: Option<&[u8]>,
        ppages: u64,
        spages: u64,
        verify: (bool, bool),
    ) -> (Result<bool, LinkError>, Result<bool, LinkError>) {
        run_flags(pk, sk, (ppages, spages), verify, (false, false))
    }

    /// What each side's handshake answered to the other's messages.
    type Outcome = (Result<bool, LinkError>, Result<bool, LinkError>);

    /// A whole handshake between a primary offering `p` with key `pk` and a secondary offering
    /// `s` with `sk`: HELLOs exchanged, then the AUTHs when both sides went on. Returns both
    /// handshakes (to read what they agreed) and the outcome.
    fn run_offers(
        pk: Option<&[u8]>,
        sk: Option<&[u8]>,
        p: Offer,
        s: Offer,
    ) -> (Handshake, Handshake, Outcome) {
        let (mut po, mut so) = (Vec::new(), Vec::new());
        let mut ph = Handshake::offer(Role::Primary, p, pk.map(<[u8]>::to_vec), [1; 32], &mut po);
        let mut sh = Handshake::offer(Role::Secondary, s, sk.map(<[u8]>::to_vec), [2; 32], &mut so);
        let (p_hello, s_hello) = (po.clone(), so.clone());
        po.clear();
        so.clear();
        let pr = ph.on_message(&parse(&s_hello), &mut po);
        let sr = sh.on_message(&parse(&p_hello), &mut so);
        let out = match (pr, sr) {
            (Ok(false), Ok(false)) => (
                ph.on_message(&parse(&so), &mut Vec::new()),
                sh.on_message(&parse(&po), &mut Vec::new()),
            ),
            other => other,
        };
        (ph, sh, out)
    }

    /// `pages`, `verify`, `plaintext`: (primary's, secondary's).
    fn run_flags(
        pk: Option<&[u8]>,
        sk: Option<&[u8]>,
        pages: (u64, u64),
        verify: (bool, bool),
        plaintext: (bool, bool),
    ) -> Outcome {
        let offer = |page_count, verify, plaintext| Offer {
            page_count,
            verify,
            plaintext,
            ..Offer::default()
        };
        let p = offer(pages.0, verify.0, plaintext.0);
        let s = offer(pages.1, verify.1, plaintext.1);
        run_offers(pk, sk, p, s).2
    }

    #[test]
    fn no_key_on_either_side_is_done_after_hello() {
        assert_eq!(run(None, None, 10, 10), (Ok(true), Ok(true)));
    }

    #[test]
    fn same_key_authenticates_both_ways() {
        assert_eq!(run(Some(b"k"), Some(b"k"), 10, 10), (Ok(true), Ok(true)));
    }

    #[test]
    fn wrong_key_is_refused_by_both() {
        assert_eq!(
            run(Some(b"k1"), Some(b"k2"), 10, 10),
            (Err(LinkError::BadProof), Err(LinkError::BadProof))
        );
    }

    #[test]
    fn geometry_and_key_presence_mismatches_are_refused() {
        assert!(matches!(
            run(None, None, 10, 11).0,
            Err(LinkError::Geometry { .. })
        ));
        assert!(matches!(
            run(Some(b"k"), None, 10, 10).0,
            Err(LinkError::KeyPresence(_))
        ));
        assert!(matches!(
            run(None, Some(b"k"), 10, 10).0,
            Err(LinkError::KeyPresence(_))
        ));
    }

    #[test]
    fn verify_on_both_sides_or_neither() {
        for key in [None, Some(&b"k"[..])] {
            assert_eq!(
                run_verify(key, key, 10, 10, (true, true)),
                (Ok(true), Ok(true))
            );
            let only_primary = LinkError::Verify {
                with: Role::Primary,
                without: Role::Secondary,
            };
            assert_eq!(
                run_verify(key, key, 10, 10, (true, false)),
                (Err(only_primary.clone()), Err(only_primary.clone()))
            );
            let only_secondary = LinkError::Verify {
                with: Role::Secondary,
                without: Role::Primary,
            };
            assert_eq!(
                run_verify(key, key, 10, 10, (false, true)),
                (Err(only_secondary.clone()), Err(only_secondary))
            );
        }
        assert_eq!(
            LinkError::Verify {
                with: Role::Primary,
                without: Role::Secondary
            }
            .to_string(),
            "--verify differs: the primary has it and the secondary does not; give --verify to \
             both nodes or to neither"
        );
    }

    /// Both sides with a key, offering `p` and `s` (5 pages); a man in the middle flips HELLO
    /// flag `bit` on the way both ways. Returns what each side said to the other's AUTH (both
    /// HELLOs must have passed).
    fn flag_flipped_in_transit(
        p: Offer,
        s: Offer,
        bit: u32,
    ) -> (Result<bool, LinkError>, Result<bool, LinkError>) {
        let (mut po, mut so) = (Vec::new(), Vec::new());
        let key = Some(b"k".to_vec());
        let mut ph = Handshake::offer(Role::Primary, p, key.clone(), [1; 32], &mut po);
        let mut sh = Handshake::offer(Role::Secondary, s, key, [2; 32], &mut so);
        let flip = |bytes: &[u8]| -> Vec<u8> {
            let mut b = bytes.to_vec();
            for (i, x) in bit.to_le_bytes().into_iter().enumerate() {
                b[8 + 28 + i] ^= x;
            }
            b
        };
        let (p_hello, s_hello) = (flip(&po), flip(&so));
        po.clear();
        so.clear();
        assert_eq!(ph.on_message(&parse(&s_hello), &mut po), Ok(false));
        assert_eq!(sh.on_message(&parse(&p_hello), &mut so), Ok(false));
        (
            ph.on_message(&parse(&so), &mut Vec::new()),
            sh.on_message(&parse(&po), &mut Vec::new()),
        )
    }

    /// An offer of 5 pages with `--verify` and `--insecure-plaintext` as given, pages plain.
    fn flags(verify: bool, plaintext: bool) -> Offer {
        Offer {
            page_count: 5,
            verify,
            plaintext,
            ..Offer::default()
        }
    }

    /// A handshake between sides coding pages as `p` and `s`, with or without a key.
    fn run_coding(key: Option<&[u8]>, p: PageCoding, s: PageCoding) -> Outcome {
        let offer = |coding| Offer {
            page_count: 5,
            coding,
            ..Offer::default()
        };
        run_offers(key, key, offer(p), offer(s)).2
    }

    #[test]
    fn the_same_page_coding_on_both_sides() {
        use crate::stream::Codec;
        let lz4 = PageCoding {
            zero_pages: false,
            codec: Codec::Lz4,
        };
        let zero = PageCoding {
            zero_pages: true,
            codec: Codec::None,
        };
        for key in [None, Some(&b"k"[..])] {
            for c in [PageCoding::PLAIN, lz4, zero] {
                assert_eq!(run_coding(key, c, c), (Ok(true), Ok(true)));
            }
            let (a, b) = run_coding(key, lz4, PageCoding::PLAIN);
            assert!(matches!(a, Err(LinkError::Coding { .. })), "{a:?}");
            assert!(matches!(b, Err(LinkError::Coding { .. })), "{b:?}");
            assert!(matches!(
                run_coding(key, zero, lz4).0,
                Err(LinkError::Coding { .. })
            ));
        }
        let msg = run_coding(None, lz4, PageCoding::PLAIN).0.unwrap_err();
        assert_eq!(
            msg.to_string(),
            "page coding differs: the primary has --compress lz4, the secondary has --compress \
             none; give both nodes the same --compress and --zero-pages"
        );
    }

    #[test]
    fn the_proof_covers_the_page_coding() {
        // The primary codes zero pages, the secondary does not; a man in the middle flips the
        // zero-pages bit of both HELLOs, so each side sees its own coding; the proofs, each
        // bound to its own side's coding, then fail.
        let zero = Offer {
            coding: PageCoding {
                zero_pages: true,
                ..PageCoding::PLAIN
            },
            ..flags(false, false)
        };
        assert_eq!(
            flag_flipped_in_transit(zero, flags(false, false), zero.coding.flags()),
            (Err(LinkError::BadProof), Err(LinkError::BadProof))
        );
    }

    #[test]
    fn the_same_disk_mirror_mode_on_both_sides_and_the_proof_covers_it() {
        let offer = |disk_mirror| Offer {
            page_count: 5,
            disk_blocks: 8,
            disk_mirror,
            ..Offer::default()
        };
        let (c, k) = (DiskMirror::Continuous, DiskMirror::Checkpoint);
        for key in [None, Some(&b"k"[..])] {
            for m in [c, k] {
                assert_eq!(
                    run_offers(key, key, offer(m), offer(m)).2,
                    (Ok(true), Ok(true))
                );
            }
            let (a, b) = run_offers(key, key, offer(c), offer(k)).2;
            assert!(matches!(a, Err(LinkError::DiskMirror { .. })), "{a:?}");
            assert!(matches!(b, Err(LinkError::DiskMirror { .. })), "{b:?}");
        }
        let (a, _) = run_offers(None, None, offer(k), offer(c)).2;
        assert_eq!(
            a.unwrap_err().to_string(),
            "disk mirror mode differs: the primary has --disk-mirror checkpoint, the secondary \
             has --disk-mirror continuous; give both nodes the same --disk-mirror"
        );
        // A man in the middle flipping bit 6 of both HELLOs makes the modes agree on each
        // side; the proofs, each bound to its own side's mode, then fail.
        assert_eq!(
            flag_flipped_in_transit(
                offer(c),
                offer(k),
                crate::engine::messages::HELLO_DISK_MIRROR
            ),
            (Err(LinkError::BadProof), Err(LinkError::BadProof))
        );
    }

    #[test]
    fn the_same_stream_count_on_both_sides_and_the_proof_covers_it() {
        let offer = |streams| Offer {
            page_count: 5,
            streams,
            ..Offer::default()
        };
        for key in [None, Some(&b"k"[..])] {
            for n in [0, 1, 4, 16] {
                assert_eq!(
                    run_offers(key, key, offer(n), offer(n)).2,
                    (Ok(true), Ok(true)),
                    "{n} streams"
                );
            }
            let (a, b) = run_offers(key, key, offer(4), offer(1)).2;
            assert!(matches!(a, Err(LinkError::Streams { .. })), "{a:?}");
            assert!(matches!(b, Err(LinkError::Streams { .. })), "{b:?}");
        }
        let (a, b) = run_offers(None, None, offer(4), offer(1)).2;
        assert_eq!(
            a.unwrap_err().to_string(),
            "--streams differs: the primary has --streams 4, the secondary has --streams 1; give \
             both nodes the same --streams (a build without the option counts as 1)"
        );
        assert!(b
            .unwrap_err()
            .to_string()
            .contains("the secondary has --streams 1, the primary has --streams 4"));
        // A man in the middle rewriting both counts (4 <-> 1) makes them agree on each side;
        // the proofs, each bound to its own side's count, then fail.
        assert_eq!(
            flag_flipped_in_transit(
                offer(4),
                offer(1),
                crate::engine::messages::HELLO_STREAMS_MASK & (0b11 << 7)
            ),
            (Err(LinkError::BadProof), Err(LinkError::BadProof))
        );
    }

    #[test]
    fn the_proof_covers_the_verify_flag() {
        // A man in the middle that flips the secondary's verify bit in both HELLOs makes the
        // flags agree on each side; the proofs, each bound to its own side's flag, then fail.
        assert_eq!(
            flag_flipped_in_transit(flags(true, false), flags(false, false), HELLO_VERIFY),
            (Err(LinkError::BadProof), Err(LinkError::BadProof))
        );
    }

    #[test]
    fn same_role_and_out_of_order_messages_are_refused() {
        let mut out = Vec::new();
        let mut a = Handshake::start(Role::Primary, 1, false, false, None, [0; 32], &mut out);
        let hello = parse(&out).clone();
        assert_eq!(
            a.on_message(&hello, &mut Vec::new()),
            Err(LinkError::SameRole(Role::Primary))
        );
        let mut b = Handshake::start(
            Role::Secondary,
            1,
            false,
            false,
            Some(vec![1]),
            [0; 32],
            &mut Vec::new(),
        );
        assert_eq!(
            b.on_message(&Message::Auth([0; 32]), &mut Vec::new()),
            Err(LinkError::Unexpected {
                state: "HELLO",
                got: "AUTH"
            })
        );
    }

    #[test]
    fn hello_flag_bits_this_version_does_not_define_are_refused_by_name() {
        let mut out = Vec::new();
        Handshake::start(Role::Primary, 1, false, false, None, [0; 32], &mut out);
        out[8 + 31] |= 0x4e;
        let mut s = Handshake::start(
            Role::Secondary,
            1,
            false,
            false,
            None,
            [0; 32],
            &mut Vec::new(),
        );
        let err = s.on_message(&parse(&out), &mut Vec::new());
        assert_eq!(err, Err(LinkError::UnknownFlags(0x4e00_0000)));
        assert!(err.unwrap_err().to_string().contains("0x4e000000"));
    }

    #[test]
    fn a_reflected_proof_is_refused() {
        // A peer without the key that echoes our own AUTH back must fail.
        let mut po = Vec::new();
        let mut p = Handshake::start(
            Role::Primary,
            5,
            false,
            false,
            Some(b"k".to_vec()),
            [1; 32],
            &mut po,
        );
        let mut fake = Vec::new();
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: Role::Secondary,
            page_count: 5,
            page_size: 4096,
            wants_auth: true,
            verify: false,
            plaintext: false,
            coding: PageCoding::PLAIN,
            disk_mirror: DiskMirror::default(),
            nonce: [1; 32],
            disk_blocks: 0,
            streams: 1,
            other_flags: 0,
        })
        .encode(&mut fake);
        let mut auth = Vec::new();
        assert_eq!(p.on_message(&parse(&fake), &mut auth), Ok(false));
        let reflected = parse(&auth).clone();
        assert_eq!(
            p.on_message(&reflected, &mut Vec::new()),
            Err(LinkError::BadProof)
        );
    }

    #[test]
    fn insecure_plaintext_on_both_sides_or_neither() {
        let k = Some(&b"k"[..]);
        for plain in [false, true] {
            assert_eq!(
                run_flags(k, k, (4, 4), (false, false), (plain, plain)),
                (Ok(true), Ok(true))
            );
        }
        let only_secondary = LinkError::Plaintext {
            with: Role::Secondary,
            without: Role::Primary,
        };
        assert_eq!(
            run_flags(k, k, (4, 4), (false, false), (false, true)),
            (Err(only_secondary.clone()), Err(only_secondary.clone()))
        );
        assert!(only_secondary
            .to_string()
            .starts_with("--insecure-plaintext differs: the secondary has it"));
        // Without keys nothing is sealed either way: the flag is not compared.
        assert_eq!(
            run_flags(None, None, (4, 4), (false, false), (true, false)),
            (Ok(true), Ok(true))
        );
    }

    #[test]
    fn the_proof_covers_the_plaintext_flag() {
        // The primary asks for plaintext, the secondary does not. A man in the middle that
        // flips the plaintext bit in both HELLOs makes each side see its own setting (and the
        // primary would send records the secondary cannot open, or the reverse); the proofs,
        // each bound to its own side's flag, fail.
        let plaintext = crate::engine::messages::HELLO_PLAINTEXT;
        assert_eq!(
            flag_flipped_in_transit(flags(false, true), flags(false, false), plaintext),
            (Err(LinkError::BadProof), Err(LinkError::BadProof))
        );
    }

    /// Both sides with `key`, the primary's disk and the secondary's (in blocks).
    fn run_disks(key: Option<&[u8]>, p: u64, s: u64) -> Outcome {
        let offer = |disk_blocks| Offer {
            page_count: 8,
            disk_blocks,
            ..Offer::default()
        };
        let (ph, sh, out) = run_offers(key, key, offer(p), offer(s));
        if out == (Ok(true), Ok(true)) {
            assert_eq!(
                (ph.disk_blocks(), sh.disk_blocks()),
                (p, p),
                "the primary's size"
            );
        }
        out
    }

    #[test]
    fn a_secondary_disk_missing_or_smaller_than_the_primarys_is_refused_by_both() {
        for key in [None, Some(&b"k"[..])] {
            assert_eq!(run_disks(key, 0, 0), (Ok(true), Ok(true)));
            assert_eq!(run_disks(key, 256, 256), (Ok(true), Ok(true)));
            assert_eq!(
                run_disks(key, 256, 1024),
                (Ok(true), Ok(true)),
                "larger is fine"
            );
            let missing = LinkError::DiskMissing { primary: 256 };
            assert_eq!(run_disks(key, 256, 0), (Err(missing.clone()), Err(missing)));
            let small = LinkError::DiskTooSmall {
                primary: 1024,
                secondary: 256,
            };
            assert_eq!(run_disks(key, 1024, 256), (Err(small.clone()), Err(small)));
            let extra = LinkError::DiskUnexpected { secondary: 8 };
            assert_eq!(run_disks(key, 0, 8), (Err(extra.clone()), Err(extra)));
        }
        assert_eq!(
            LinkError::DiskTooSmall {
                primary: 16_384,
                secondary: 256
            }
            .to_string(),
            "the secondary's disk (256 blocks, 1 MiB) is smaller than the primary's (16384 \
             blocks, 64 MiB); it must be at least as large"
        );
        assert!(LinkError::DiskMissing { primary: 256 }
            .to_string()
            .starts_with(
                "the primary has a disk of 256 blocks (1 MiB) but the secondary has none"
            ));
    }

    #[test]
    fn the_proof_covers_both_disk_sizes() {
        // A man in the middle that shrinks the primary's disk in the HELLO the secondary reads
        // and grows the secondary's in the one the primary reads (so a secondary too small for
        // the primary's disk passes both checks) is caught by the proofs.
        let (mut po, mut so) = (Vec::new(), Vec::new());
        let key = Some(b"k".to_vec());
        let offer = |disk_blocks| Offer {
            page_count: 8,
            disk_blocks,
            ..Offer::default()
        };
        let mut ph = Handshake::offer(Role::Primary, offer(1024), key.clone(), [1; 32], &mut po);
        let mut sh = Handshake::offer(Role::Secondary, offer(512), key, [2; 32], &mut so);
        let mut forged = po.clone();
        forged[8 + 64..8 + 72].copy_from_slice(&16u64.to_le_bytes());
        let mut s_hello = so.clone();
        s_hello[8 + 64..8 + 72].copy_from_slice(&2048u64.to_le_bytes());
        po.clear();
        so.clear();
        assert_eq!(ph.on_message(&parse(&s_hello), &mut po), Ok(false));
        assert_eq!(sh.on_message(&parse(&forged), &mut so), Ok(false));
        assert_eq!(
            sh.on_message(&parse(&po), &mut Vec::new()),
            Err(LinkError::BadProof)
        );
        assert_eq!(
            ph.on_message(&parse(&so), &mut Vec::new()),
            Err(LinkError::BadProof)
        );
    }
}

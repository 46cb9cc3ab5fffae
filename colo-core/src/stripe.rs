//! The link over several TCP connections (`--streams N`): the pieces without IO. The byte
//! stream each direction sends is cut, below the record layer, into frames; frame `k` travels on
//! connection `k mod N` and the receiver takes frame `k` from connection `k mod N`, so its
//! decoder sees exactly the bytes that were written: record order, and with it the secondary's
//! all-or-nothing apply, is untouched.
//!
//! ```text
//!   connection 0      the handshake as always (HELLO, AUTH), then frames 0, N, 2N, ...
//!   connection i > 0  JOIN (from the side that connected), then frames i, N + i, ...
//!   JOIN  = "COLOJOIN" | index u8 | streams u8 | 0u16 | tag (32 bytes)
//!   tag   = HMAC-SHA256(key = PSK or empty, "colo-link-join-v1" | nonce_p | nonce_s | index | streams)
//!   frame = sealed: a [`crate::seal`] frame under the connection's own key ([`crate::seal::stream_key`])
//!           plain:  u32 length (little-endian) | that many stream bytes
//! ```
//!
//! Each direction switches to frames where its handshake ends ([`StripeTap`]): after its AUTH
//! when its HELLO carries a key, else after its HELLO. Both directions stripe. The count is
//! agreed in HELLO (flags bits 7–10, see [`crate::engine::messages::HELLO_STREAMS_SHIFT`]); one
//! connection (the default) sets no bit and sends no frame headers, so its bytes are those of a
//! build without the option.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::engine::messages::{colo_type, Hello, Message, Role};
use crate::seal;
use crate::stream::{Decoder, DecoderConfig, Event, Record};

type HmacSha256 = Hmac<Sha256>;

/// What a JOIN starts with.
pub const JOIN_MAGIC: [u8; 8] = *b"COLOJOIN";
/// Length of a JOIN.
pub const JOIN_LEN: usize = 8 + 1 + 1 + 2 + 32;
/// Length of a plain frame's length field.
pub const FRAME_HEADER: usize = 4;
/// The most bytes one plain frame may carry (the sealed frames' limit too).
pub const MAX_FRAME: usize = seal::MAX_FRAME;
const JOIN_LABEL: &[u8] = b"colo-link-join-v1";

/// Why a connection or a frame of a striped link was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StripeError {
    /// A connection to the link's port that does not start with a JOIN.
    #[error("the connection did not start with a JOIN of the link's connections")]
    NotAJoin,
    /// A JOIN whose tag does not match this link's handshake (another session, another key).
    #[error("the JOIN names another session (its tag does not match this link's handshake)")]
    OtherSession,
    /// The peer's JOIN is for a link of another size.
    #[error("the peer joined a link of {peer} connections, this link has {ours}")]
    Count {
        /// This link's count.
        ours: u8,
        /// The JOIN's.
        peer: u8,
    },
    /// A connection index outside 1..streams.
    #[error(
        "the peer joined connection {index}, but this link's extra connections are 1..{streams}"
    )]
    Index {
        /// The index the peer sent.
        index: u8,
        /// This link's count.
        streams: u8,
    },
    /// The same index joined twice.
    #[error("the peer joined connection {index} twice")]
    Duplicate {
        /// The index.
        index: u8,
    },
    /// A plain frame longer than [`MAX_FRAME`].
    #[error("connection {stream}: the peer announced a frame of {len} bytes, the most is {max}")]
    FrameTooLong {
        /// The connection.
        stream: u8,
        /// The length the peer sent.
        len: u64,
        /// The limit.
        max: usize,
    },
}

/// The tag of connection `index`'s JOIN.
fn join_tag(
    psk: Option<&[u8]>,
    primary_nonce: &[u8; 32],
    secondary_nonce: &[u8; 32],
    index: u8,
    streams: u8,
) -> HmacSha256 {
    // HMAC-SHA256 takes keys of any length.
    let mut mac = match HmacSha256::new_from_slice(psk.unwrap_or_default()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
    };
    mac.update(JOIN_LABEL);
    mac.update(primary_nonce);
    mac.update(secondary_nonce);
    mac.update(&[index, streams]);
    mac
}

/// The session a link's extra connections join: the pre-shared key (if any) and both HELLO
/// nonces, ordered primary first.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    psk: Option<Vec<u8>>,
    primary_nonce: [u8; 32],
    secondary_nonce: [u8; 32],
    streams: u8,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("has_key", &self.psk.is_some())
            .field("streams", &self.streams)
            .finish()
    }
}

impl Session {
    /// The session of a link of `streams` connections between the HELLOs `ours` and `theirs`
    /// (the key only counts when both carry one).
    pub fn new(psk: Option<&[u8]>, ours: &Hello, theirs: &Hello, streams: u8) -> Self {
        let (p, s) = match ours.role {
            Role::Primary => (ours.nonce, theirs.nonce),
            Role::Secondary => (theirs.nonce, ours.nonce),
        };
        let keyed = ours.wants_auth && theirs.wants_auth;
        Self {
            psk: psk.filter(|_| keyed).map(<[u8]>::to_vec),
            primary_nonce: p,
            secondary_nonce: s,
            streams,
        }
    }

    /// The link's connection count.
    pub fn streams(&self) -> u8 {
        self.streams
    }

    /// The JOIN that opens connection `index`.
    pub fn join(&self, index: u8) -> [u8; JOIN_LEN] {
        let tag = join_tag(
            self.psk.as_deref(),
            &self.primary_nonce,
            &self.secondary_nonce,
            index,
            self.streams,
        )
        .finalize()
        .into_bytes();
        let mut out = [0u8; JOIN_LEN];
        out[..8].copy_from_slice(&JOIN_MAGIC);
        out[8] = index;
        out[9] = self.streams;
        out[12..].copy_from_slice(&tag);
        out
    }

    /// Checks a JOIN received on a new connection; the connection's index if it belongs to
    /// this session.
    pub fn check_join(&self, msg: &[u8; JOIN_LEN]) -> Result<u8, StripeError> {
        if msg[..8] != JOIN_MAGIC || msg[10..12] != [0, 0] {
            return Err(StripeError::NotAJoin);
        }
        let (index, streams) = (msg[8], msg[9]);
        join_tag(
            self.psk.as_deref(),
            &self.primary_nonce,
            &self.secondary_nonce,
            index,
            streams,
        )
        .verify_slice(&msg[12..])
        .map_err(|_| StripeError::OtherSession)?;
        if streams != self.streams {
            return Err(StripeError::Count {
                ours: self.streams,
                peer: streams,
            });
        }
        if index == 0 || index >= self.streams {
            return Err(StripeError::Index {
                index,
                streams: self.streams,
            });
        }
        Ok(index)
    }
}

/// The extra connections joined so far (1..streams), refusing an index twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    streams: u8,
    seen: u32,
}

impl Joined {
    /// None joined yet, of a link of `streams`.
    pub fn new(streams: u8) -> Self {
        Self { streams, seen: 0 }
    }

    /// Counts connection `index` (checked by [`Session::check_join`]) as joined.
    pub fn admit(&mut self, index: u8) -> Result<(), StripeError> {
        if index == 0 || index >= self.streams {
            return Err(StripeError::Index {
                index,
                streams: self.streams,
            });
        }
        let bit = 1u32 << index;
        if self.seen & bit != 0 {
            return Err(StripeError::Duplicate { index });
        }
        self.seen |= bit;
        Ok(())
    }

    /// True once every extra connection joined.
    pub fn complete(&self) -> bool {
        self.seen.count_ones() + 1 >= u32::from(self.streams)
    }
}

/// The length field of a plain frame of `len` bytes.
pub fn frame_header(len: usize) -> [u8; FRAME_HEADER] {
    u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes()
}

/// The payload length of the plain frame whose length field is `header`, received on
/// connection `stream`; a length over [`MAX_FRAME`] is refused before anything is buffered.
pub fn frame_len(header: [u8; FRAME_HEADER], stream: u8) -> Result<usize, StripeError> {
    let len = u32::from_le_bytes(header);
    match usize::try_from(len) {
        Ok(n) if n <= MAX_FRAME => Ok(n),
        _ => Err(StripeError::FrameTooLong {
            stream,
            len: u64::from(len),
            max: MAX_FRAME,
        }),
    }
}

/// The connection that carries frame `k` of a link of `streams` connections.
pub fn stream_of(k: u64, streams: u8) -> usize {
    (k % u64::from(streams.max(1))) as usize
}

/// What [`StripeTap::feed`] found in the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndOutcome {
    /// All of them belong to the handshake; feed the next ones.
    More,
    /// The direction's handshake ends after the first `used` bytes: frames follow.
    End {
        /// Handshake bytes in this slice.
        used: usize,
    },
    /// Something other than the handshake came: the direction is not striped.
    Other,
}

/// Watches the start of one direction (the primary's image and domain headers, HELLO, AUTH) to
/// find where its handshake ends: after its AUTH when its HELLO carries a key, else after its
/// HELLO (unlike [`seal::HandshakeTap`], also when the records stay plaintext).
#[derive(Debug)]
pub struct StripeTap {
    dec: Decoder,
    hello: Option<Hello>,
    done: bool,
}

impl StripeTap {
    /// A tap on a direction that begins with Xen's image and domain headers (`headers`) or
    /// directly with HELLO.
    pub fn with_headers(headers: bool) -> Self {
        Self {
            dec: Decoder::new(DecoderConfig {
                expect_headers: headers,
                page_count: None,
            }),
            hello: None,
            done: false,
        }
    }

    /// The direction's HELLO, once it passed.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Feeds the direction's next bytes. After `End` or `Other` the tap is finished and
    /// answers `Other`.
    pub fn feed(&mut self, bytes: &[u8]) -> EndOutcome {
        if self.done {
            return EndOutcome::Other;
        }
        let out = self.scan(bytes);
        self.done = out != EndOutcome::More;
        out
    }

    fn scan(&mut self, mut bytes: &[u8]) -> EndOutcome {
        let mut used = 0;
        loop {
            let Ok((n, ev)) = self.dec.feed(bytes) else {
                return EndOutcome::Other;
            };
            used += n;
            bytes = &bytes[n..];
            let (rtype, body) = match ev {
                None => return EndOutcome::More,
                Some(Event::ImageHeader(_) | Event::DomainHeader(_)) => continue,
                Some(Event::Record(Record::Optional { rtype, body })) => (rtype, body),
                Some(_) => return EndOutcome::Other,
            };
            match (rtype, &self.hello) {
                (colo_type::HELLO, None) => match Message::parse(rtype, body) {
                    Ok(Some(Message::Hello(h))) => {
                        self.hello = Some(h);
                        if !h.wants_auth {
                            return EndOutcome::End { used };
                        }
                    }
                    _ => return EndOutcome::Other,
                },
                (colo_type::AUTH, Some(_)) => return EndOutcome::End { used },
                _ => return EndOutcome::Other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::link::{Handshake, Offer};

    fn hello(role: Role, key: bool, streams: u8, nonce: u8) -> Hello {
        let mut out = Vec::new();
        let offer = Offer {
            page_count: 4,
            streams,
            ..Offer::default()
        };
        Handshake::offer(
            role,
            offer,
            key.then(|| b"k".to_vec()),
            [nonce; 32],
            &mut out,
        );
        match Message::parse(colo_type::HELLO, &out[8..]) {
            Ok(Some(Message::Hello(h))) => h,
            other => panic!("{other:?}"),
        }
    }

    fn parse(b: &[u8]) -> Message<'_> {
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        Message::parse(u32::from_le_bytes([b[0], b[1], b[2], b[3]]), &b[8..8 + len])
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_join_names_its_session_and_index() {
        let (p, s) = (
            hello(Role::Primary, true, 4, 1),
            hello(Role::Secondary, true, 4, 2),
        );
        let at_p = Session::new(Some(b"k"), &p, &s, 4);
        let at_s = Session::new(Some(b"k"), &s, &p, 4);
        for i in 1..4 {
            assert_eq!(at_s.check_join(&at_p.join(i)), Ok(i));
        }
        assert_eq!(
            at_s.check_join(&at_p.join(0)),
            Err(StripeError::Index {
                index: 0,
                streams: 4
            })
        );
        assert_eq!(
            at_s.check_join(&at_p.join(4)),
            Err(StripeError::Index {
                index: 4,
                streams: 4
            })
        );
        // Another key, other nonces, a flipped byte anywhere in the tag or index.
        let other_key = Session::new(Some(b"x"), &p, &s, 4);
        assert_eq!(
            at_s.check_join(&other_key.join(1)),
            Err(StripeError::OtherSession)
        );
        let other_nonce = Session::new(Some(b"k"), &hello(Role::Primary, true, 4, 9), &s, 4);
        assert_eq!(
            at_s.check_join(&other_nonce.join(1)),
            Err(StripeError::OtherSession)
        );
        let mut j = at_p.join(2);
        j[8] = 3;
        assert_eq!(at_s.check_join(&j), Err(StripeError::OtherSession));
        let mut j = at_p.join(2);
        j[JOIN_LEN - 1] ^= 1;
        assert_eq!(at_s.check_join(&j), Err(StripeError::OtherSession));
        let mut j = at_p.join(2);
        j[0] = b'X';
        assert_eq!(at_s.check_join(&j), Err(StripeError::NotAJoin));
        // A peer of another count.
        let three = Session::new(Some(b"k"), &p, &s, 3);
        assert_eq!(
            at_s.check_join(&three.join(1)),
            Err(StripeError::Count { ours: 4, peer: 3 })
        );
        // Without keys the tag still binds the nonces.
        let (p, s) = (
            hello(Role::Primary, false, 2, 1),
            hello(Role::Secondary, false, 2, 2),
        );
        let at_s = Session::new(None, &s, &p, 2);
        assert_eq!(
            at_s.check_join(&Session::new(None, &p, &s, 2).join(1)),
            Ok(1)
        );
        let stale = Session::new(None, &hello(Role::Primary, false, 2, 7), &s, 2);
        assert_eq!(
            at_s.check_join(&stale.join(1)),
            Err(StripeError::OtherSession)
        );
    }

    #[test]
    fn each_index_joins_once() {
        let mut j = Joined::new(3);
        assert!(!j.complete());
        j.admit(2).unwrap();
        assert_eq!(j.admit(2), Err(StripeError::Duplicate { index: 2 }));
        assert_eq!(
            j.admit(3),
            Err(StripeError::Index {
                index: 3,
                streams: 3
            })
        );
        assert!(!j.complete());
        j.admit(1).unwrap();
        assert!(j.complete());
        assert!(Joined::new(1).complete());
    }

    #[test]
    fn frame_lengths_are_checked() {
        assert_eq!(frame_len(frame_header(0), 1), Ok(0));
        assert_eq!(frame_len(frame_header(MAX_FRAME), 1), Ok(MAX_FRAME));
        assert_eq!(frame_header(0x0102), [2, 1, 0, 0], "little-endian");
        assert_eq!(
            frame_len(frame_header(MAX_FRAME + 1), 2),
            Err(StripeError::FrameTooLong {
                stream: 2,
                len: MAX_FRAME as u64 + 1,
                max: MAX_FRAME
            })
        );
        assert!(frame_len([0xff; 4], 0)
            .unwrap_err()
            .to_string()
            .contains("4294967295"));
        assert_eq!(
            (0..7).map(|k| stream_of(k, 3)).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1, 2, 0]
        );
    }

    /// The tap ends each direction after AUTH with a key (plaintext or not), after HELLO
    /// without, wherever the bytes are split.
    #[test]
    fn the_tap_finds_the_end_of_each_handshake() {
        let run = |key: Option<Vec<u8>>, plaintext: bool| {
            let offer = Offer {
                page_count: 4,
                plaintext,
                streams: 2,
                ..Offer::default()
            };
            let (mut po, mut so) = (Vec::new(), Vec::new());
            let mut ph = Handshake::offer(Role::Primary, offer, key.clone(), [1; 32], &mut po);
            let mut sh = Handshake::offer(Role::Secondary, offer, key, [2; 32], &mut so);
            let (mut pa, mut sa) = (Vec::new(), Vec::new());
            ph.on_message(&parse(&so), &mut pa).unwrap();
            sh.on_message(&parse(&po), &mut sa).unwrap();
            // The secondary's direction: HELLO, AUTH (if any), then other bytes.
            let mut dir = so.clone();
            dir.extend_from_slice(&sa);
            let end = dir.len();
            dir.extend_from_slice(&[0xAB; 40]);
            for split in [1, 7, 64, end, dir.len()] {
                let mut tap = StripeTap::with_headers(false);
                let mut at = None;
                for (i, part) in dir.chunks(split).enumerate() {
                    match tap.feed(part) {
                        EndOutcome::More => {}
                        EndOutcome::End { used } => {
                            at = Some(i * split + used);
                            break;
                        }
                        EndOutcome::Other => panic!("not a handshake"),
                    }
                }
                assert_eq!(at, Some(end), "split {split}");
                assert_eq!(tap.hello().map(|h| h.streams), Some(2));
            }
        };
        run(Some(b"k".to_vec()), false);
        run(Some(b"k".to_vec()), true);
        run(None, false);
        let mut tap = StripeTap::with_headers(false);
        let mut hb = Vec::new();
        Message::Heartbeat(1).encode(&mut hb);
        assert_eq!(tap.feed(&hb), EndOutcome::Other);
    }

    #[test]
    fn stream_keys_differ_by_index() {
        let k = seal::direction_key(b"psk", &[1; 32], &[2; 32], Role::Primary).unwrap();
        let keys: Vec<_> = (0..4).map(|i| seal::stream_key(&k, i).unwrap()).collect();
        assert_eq!(keys[0], k, "connection 0 keeps the direction key");
        for a in 0..4 {
            for b in a + 1..4 {
                assert_ne!(keys[a], keys[b]);
            }
        }
        // A frame sealed for connection 1 does not open on connection 2.
        let mut s = seal::Sealer::new(keys[1].clone()).unwrap();
        let mut o = seal::Opener::new(keys[2].clone()).unwrap();
        let mut f = Vec::new();
        seal::Sealer::begin(&mut f);
        f.extend_from_slice(b"page data");
        s.seal(&mut f).unwrap();
        assert!(o.open(&mut f).is_err());
    }
}

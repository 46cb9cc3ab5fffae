//! colo's own records on the replication link, in the stream's optional range (bit 31 set).
//!
//! Xen's libxc stream carries pages, vCPU state and CHECKPOINT; libxl wraps it with
//! CHECKPOINT_STATE messages (NEW, SVM_SUSPENDED, SVM_READY, SVM_RESUMED). colo keeps one TCP
//! connection per pair, so it carries those control messages, and the few things Xen does not
//! need, as optional records that a Xen reader would skip:
//!
//! | type | name | direction | body (little-endian) |
//! |---|---|---|---|
//! | `0x8000_C001` | HELLO | both | magic `b"COLOLINK"`, u32 version, u32 role (1 primary, 2 secondary), u64 page_count, u32 page_size, u32 flags (bit 0: wants auth; bit 1: verifies every checkpoint, `--verify`; bit 2: will not seal the records after the handshake, `--insecure-plaintext`; bit 3: zero pages as markers, `--zero-pages`; bits 4–5: page compression, 0 none, 1 lz4, `--compress`; bit 6: disk blocks mirrored while the PVM runs, `--disk-mirror continuous`; both sides must agree on bits 1 to 6), 32-byte nonce, u64 disk_blocks (the guest's disk in 4 KiB blocks, 0: none) |
//! | `0x8000_C002` | AUTH | both | 32-byte HMAC-SHA256 proof (see [`super::link`]) |
//! | `0x8000_C003` | CONTROL | both | u32 id (libxl's CHECKPOINT_STATE ids: NEW 0, SVM_SUSPENDED 1, SVM_READY 2, SVM_RESUMED 3), u32 reserved, u64 epoch |
//! | `0x8000_C004` | INPUT | primary → secondary | u64 seq, then one Ethernet frame (a client request mirrored to the SVM) |
//! | `0x8000_C005` | OUTPUT | secondary → primary | u64 epoch, then one Ethernet frame the SVM emitted |
//! | `0x8000_C006` | HEARTBEAT | both | u64 sequence number |
//! | `0x8000_C007` | VCPU_STATE | primary → secondary | the backend's opaque vCPU/platform state blob |
//! | `0x8000_C008` | DIGEST | both | u64 epoch, 32-byte digest of all guest pages and the state (verification) |
//! | `0x8000_C009` | GOODBYE | both | u32 reason: an orderly shutdown, not a failure (0: the primary stops; 1: the primary dropped its secondary, which must never take over) |
//! | `0x8000_C00A` | DISK_BLOCKS | primary → secondary | u32 count (≤ 256), u32 reserved, count × u64 block, count × 4096 bytes (see [`crate::disk`]) |
//! | `0x8000_C00B` | DISK_DIGEST | secondary → primary | u64 epoch, 16-byte digest of the disk (verification, see [`crate::disk`]) |
//! | `0x8000_C00C` | PACKED_PAGES | primary → secondary | pages with zero markers and compressed data, only with an agreed page coding (decoded by the stream decoder: [`crate::stream::PageCoding`]) |
//!
//! Every parser checks the body length before reading and returns [`MessageError`] naming the
//! record and what was wrong; nothing a peer sent is unwrapped.

use crate::stream::PageCoding;
use thiserror::Error;

use crate::disk::{DiskBlocks, DiskMirror, DISK_DIGEST_LEN};

/// Record type numbers of colo's own records.
pub mod colo_type {
    /// Link handshake, first record in each direction.
    pub const HELLO: u32 = 0x8000_C001;
    /// Proof of the pre-shared key.
    pub const AUTH: u32 = 0x8000_C002;
    /// A checkpoint control message.
    pub const CONTROL: u32 = 0x8000_C003;
    /// A client request mirrored to the secondary.
    pub const INPUT: u32 = 0x8000_C004;
    /// A frame the SVM emitted, for the primary's comparator.
    pub const OUTPUT: u32 = 0x8000_C005;
    /// Liveness.
    pub const HEARTBEAT: u32 = 0x8000_C006;
    /// The backend's vCPU/platform state.
    pub const VCPU_STATE: u32 = 0x8000_C007;
    /// A digest of guest memory and state after a checkpoint.
    pub const DIGEST: u32 = 0x8000_C008;
    /// Orderly shutdown.
    pub const GOODBYE: u32 = 0x8000_C009;
    /// Disk blocks of a checkpoint (or of the initial synchronisation).
    pub const DISK_BLOCKS: u32 = 0x8000_C00A;
    /// A digest of the disk after a checkpoint.
    pub const DISK_DIGEST: u32 = 0x8000_C00B;
    /// Pages with zero markers and compressed data (decoded by the stream decoder).
    pub const PACKED_PAGES: u32 = crate::stream::rec_type::PACKED_PAGES;
}

/// Magic at the start of a HELLO body.
pub const HELLO_MAGIC: [u8; 8] = *b"COLOLINK";
/// The link protocol version this build speaks. Version 2 added HELLO's verify flag (bit 1),
/// which both sides must agree on and which the AUTH proof covers; a version 1 peer would
/// ignore a mismatch, so it is refused by version. Version 3 seals every record after the
/// handshake when both sides have a key (see [`crate::seal`]) and added the plaintext flag
/// (bit 2), agreed and proven like the verify flag. Version 4 added the disk's size to HELLO
/// (a secondary whose disk is missing or smaller than the primary's is refused; the proof
/// covers both sizes) and the DISK_BLOCKS and DISK_DIGEST records: a version 3 peer would
/// neither send nor apply the disk. Version 5 added the page coding (bits 3–5: zero-page
/// markers and compression in PACKED_PAGES records), agreed and proven the same way. Version 6
/// added the disk mirror mode (bit 6, `--disk-mirror`): with continuous mirroring DISK_BLOCKS
/// also travel between checkpoints, which a version 5 secondary would refuse mid-run.
pub const PROTOCOL_VERSION: u32 = 6;
/// HELLO flag: the sender has a pre-shared key and will authenticate.
pub const HELLO_WANTS_AUTH: u32 = 1 << 0;
/// HELLO flag: the sender digests memory at every checkpoint (`--verify`).
pub const HELLO_VERIFY: u32 = 1 << 1;
/// HELLO flag: the sender will not seal the records after the handshake
/// (`--insecure-plaintext`).
pub const HELLO_PLAINTEXT: u32 = 1 << 2;
/// HELLO flag: the sender mirrors disk blocks while the PVM runs (`--disk-mirror
/// continuous`); clear: at the checkpoint (see [`crate::disk`]).
pub const HELLO_DISK_MIRROR: u32 = 1 << 6;
/// HELLO flag bits 7–10: the sender's page-data connections (`--streams N`) less one, so a
/// single connection sets none and its HELLO is the same as before the option existed (a peer
/// that does not know the bits refuses them as unknown).
pub const HELLO_STREAMS_SHIFT: u32 = 7;
/// The mask of [`HELLO_STREAMS_SHIFT`]'s bits.
pub const HELLO_STREAMS_MASK: u32 = 0b1111 << HELLO_STREAMS_SHIFT;
/// The most connections one link may use (`--streams`).
pub const MAX_STREAMS: u8 = 16;
/// Every HELLO flag bit this build knows: auth, verify, plaintext, the page coding (bits 3–5),
/// the disk mirror mode (bit 6) and the stream count (bits 7–10). Other bits are kept in
/// [`Hello::other_flags`] and refused by the handshake.
pub const HELLO_KNOWN_FLAGS: u32 = 0b111_1111_1111;
/// Length of a HELLO body.
pub const HELLO_LEN: usize = 8 + 4 + 4 + 8 + 4 + 4 + 32 + 8;
/// Length of an HMAC-SHA256 proof.
pub const MAC_LEN: usize = 32;
/// Length of a digest.
pub const DIGEST_LEN: usize = 32;

/// Which side of the pair a node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs the PVM, sends checkpoints.
    Primary,
    /// Runs the SVM, receives checkpoints.
    Secondary,
}

impl Role {
    fn wire(self) -> u32 {
        match self {
            Role::Primary => 1,
            Role::Secondary => 2,
        }
    }

    /// The other role.
    pub fn peer(self) -> Role {
        match self {
            Role::Primary => Role::Secondary,
            Role::Secondary => Role::Primary,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        })
    }
}

/// libxl's CHECKPOINT_STATE ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Primary → secondary: a checkpoint begins; suspend the SVM.
    New,
    /// Secondary → primary: the SVM is suspended (its dirty pfn list follows).
    SvmSuspended,
    /// Secondary → primary: the checkpoint is applied; the SVM holds it complete.
    SvmReady,
    /// Secondary → primary: the SVM runs again.
    SvmResumed,
}

impl Control {
    fn wire(self) -> u32 {
        match self {
            Control::New => 0,
            Control::SvmSuspended => 1,
            Control::SvmReady => 2,
            Control::SvmResumed => 3,
        }
    }
}

impl std::fmt::Display for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::New => "NEW",
            Control::SvmSuspended => "SVM_SUSPENDED",
            Control::SvmReady => "SVM_READY",
            Control::SvmResumed => "SVM_RESUMED",
        })
    }
}

/// A parsed HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u32,
    /// The sender's role.
    pub role: Role,
    /// The sender's guest size in pages.
    pub page_count: u64,
    /// The sender's page size.
    pub page_size: u32,
    /// The sender has a pre-shared key and will authenticate.
    pub wants_auth: bool,
    /// The sender digests all memory at every checkpoint (`--verify`); both sides must agree.
    pub verify: bool,
    /// The sender will not seal the records after the handshake (`--insecure-plaintext`); both
    /// sides must agree. Without a key nothing is sealed, whatever this says.
    pub plaintext: bool,
    /// How the sender sends page data (`--zero-pages`, `--compress`); both sides must agree.
    pub coding: PageCoding,
    /// How the sender sends disk blocks (`--disk-mirror`); both sides must agree.
    pub disk_mirror: DiskMirror,
    /// The sender's challenge.
    pub nonce: [u8; 32],
    /// The sender's disk in 4 KiB blocks (0: the guest has none that colo replicates).
    pub disk_blocks: u64,
    /// The sender's connections for the link (`--streams`, 1..=[`MAX_STREAMS`]; a value out of
    /// range encodes clamped); both sides must agree.
    pub streams: u8,
    /// Flag bits outside [`HELLO_KNOWN_FLAGS`], kept as sent (so a parsed HELLO encodes back
    /// to the same bytes) for the handshake to refuse by name. 0 from this build.
    pub other_flags: u32,
}

/// One of colo's records, parsed. Frames and blobs are borrowed from the record body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// HMAC proof.
    Auth([u8; MAC_LEN]),
    /// A control message for checkpoint `epoch`.
    Control {
        /// Which message.
        msg: Control,
        /// The checkpoint it belongs to.
        epoch: u64,
    },
    /// A mirrored client request.
    Input {
        /// Its position in the primary's input order.
        seq: u64,
        /// The Ethernet frame.
        frame: &'a [u8],
    },
    /// A frame from the SVM.
    Output {
        /// The epoch in which the SVM emitted it.
        epoch: u64,
        /// The Ethernet frame.
        frame: &'a [u8],
    },
    /// Liveness.
    Heartbeat(u64),
    /// vCPU/platform state blob.
    VcpuState(&'a [u8]),
    /// Verification digest of checkpoint `epoch`.
    Digest {
        /// The checkpoint.
        epoch: u64,
        /// The digest.
        digest: [u8; DIGEST_LEN],
    },
    /// Orderly shutdown.
    Goodbye(u32),
    /// Disk blocks (see [`crate::disk`]).
    DiskBlocks(DiskBlocks<'a>),
    /// Verification digest of the disk after checkpoint `epoch`.
    DiskDigest {
        /// The checkpoint.
        epoch: u64,
        /// The digest.
        digest: [u8; DISK_DIGEST_LEN],
    },
}

/// A colo record that does not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// The body has the wrong length.
    #[error("{name} record body is {got} bytes, expected {want}")]
    Length {
        /// Record name.
        name: &'static str,
        /// Bytes received.
        got: usize,
        /// What the record needs (a minimum for variable-length records).
        want: usize,
    },
    /// HELLO without colo's magic.
    #[error("HELLO record has magic {0:02x?}, expected \"COLOLINK\"")]
    BadMagic([u8; 8]),
    /// An unknown role number.
    #[error("HELLO record names role {0}, expected 1 (primary) or 2 (secondary)")]
    BadRole(u32),
    /// An unknown control id.
    #[error("CONTROL record has id {0}, expected 0..=3")]
    BadControl(u32),
    /// Not one of colo's record types.
    #[error("record type {0:#x} is not one of colo's records")]
    UnknownType(u32),
    /// A DISK_BLOCKS record with more blocks than a record may carry.
    #[error("DISK_BLOCKS record claims {count} blocks, at most {max} are allowed")]
    TooManyBlocks {
        /// The count in the record.
        count: u32,
        /// The limit.
        max: usize,
    },
    /// A reserved field that is not zero.
    #[error("{name} record has {value:#x} in its reserved field, expected 0")]
    Reserved {
        /// Record name.
        name: &'static str,
        /// The field's value.
        value: u32,
    },
    /// HELLO names a page compression this build does not know.
    #[error("HELLO record has flags {0:#x}: an unknown page compression (bits 4–5)")]
    BadCoding(u32),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn exact(name: &'static str, body: &[u8], want: usize) -> Result<(), MessageError> {
    if body.len() == want {
        Ok(())
    } else {
        Err(MessageError::Length {
            name,
            got: body.len(),
            want,
        })
    }
}

fn at_least(name: &'static str, body: &[u8], want: usize) -> Result<(), MessageError> {
    if body.len() >= want {
        Ok(())
    } else {
        Err(MessageError::Length {
            name,
            got: body.len(),
            want,
        })
    }
}

impl<'a> Message<'a> {
    /// Parses the body of an optional record of type `rtype`. `Ok(None)` for an optional record
    /// that is not colo's (a reader skips those).
    pub fn parse(rtype: u32, body: &'a [u8]) -> Result<Option<Message<'a>>, MessageError> {
        use colo_type as t;
        let m = match rtype {
            t::HELLO => {
                exact("HELLO", body, HELLO_LEN)?;
                let mut magic = [0u8; 8];
                magic.copy_from_slice(&body[..8]);
                if magic != HELLO_MAGIC {
                    return Err(MessageError::BadMagic(magic));
                }
                let role = match u32_at(body, 12) {
                    1 => Role::Primary,
                    2 => Role::Secondary,
                    r => return Err(MessageError::BadRole(r)),
                };
                let mut nonce = [0u8; 32];
                nonce.copy_from_slice(&body[32..64]);
                let flags = u32_at(body, 28);
                let coding = PageCoding::from_flags(flags).ok_or(MessageError::BadCoding(flags))?;
                Message::Hello(Hello {
                    version: u32_at(body, 8),
                    role,
                    page_count: u64_at(body, 16),
                    page_size: u32_at(body, 24),
                    wants_auth: u32_at(body, 28) & HELLO_WANTS_AUTH != 0,
                    verify: u32_at(body, 28) & HELLO_VERIFY != 0,
                    plaintext: u32_at(body, 28) & HELLO_PLAINTEXT != 0,
                    coding,
                    disk_mirror: if flags & HELLO_DISK_MIRROR != 0 {
                        DiskMirror::Continuous
                    } else {
                        DiskMirror::Checkpoint
                    },
                    nonce,
                    disk_blocks: u64_at(body, 64),
                    // At most 15 + 1: the mask keeps four bits.
                    streams: ((flags & HELLO_STREAMS_MASK) >> HELLO_STREAMS_SHIFT) as u8 + 1,
                    other_flags: flags & !HELLO_KNOWN_FLAGS,
                })
            }
            t::AUTH => {
                exact("AUTH", body, MAC_LEN)?;
                let mut mac = [0u8; MAC_LEN];
                mac.copy_from_slice(body);
                Message::Auth(mac)
            }
            t::CONTROL => {
                exact("CONTROL", body, 16)?;
                let msg = match u32_at(body, 0) {
                    0 => Control::New,
                    1 => Control::SvmSuspended,
                    2 => Control::SvmReady,
                    3 => Control::SvmResumed,
                    x => return Err(MessageError::BadControl(x)),
                };
                Message::Control {
                    msg,
                    epoch: u64_at(body, 8),
                }
            }
            t::INPUT => {
                at_least("INPUT", body, 8)?;
                Message::Input {
                    seq: u64_at(body, 0),
                    frame: &body[8..],
                }
            }
            t::OUTPUT => {
                at_least("OUTPUT", body, 8)?;
                Message::Output {
                    epoch: u64_at(body, 0),
                    frame: &body[8..],
                }
            }
            t::HEARTBEAT => {
                exact("HEARTBEAT", body, 8)?;
                Message::Heartbeat(u64_at(body, 0))
            }
            t::VCPU_STATE => Message::VcpuState(body),
            t::DIGEST => {
                exact("DIGEST", body, 8 + DIGEST_LEN)?;
                let mut digest = [0u8; DIGEST_LEN];
                digest.copy_from_slice(&body[8..]);
                Message::Digest {
                    epoch: u64_at(body, 0),
                    digest,
                }
            }
            t::GOODBYE => {
                exact("GOODBYE", body, 4)?;
                Message::Goodbye(u32_at(body, 0))
            }
            t::DISK_BLOCKS => Message::DiskBlocks(DiskBlocks::parse(body)?),
            t::DISK_DIGEST => {
                exact("DISK_DIGEST", body, 8 + DISK_DIGEST_LEN)?;
                let mut digest = [0u8; DISK_DIGEST_LEN];
                digest.copy_from_slice(&body[8..]);
                Message::DiskDigest {
                    epoch: u64_at(body, 0),
                    digest,
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(m))
    }

    /// The record type of this message.
    pub fn rtype(&self) -> u32 {
        use colo_type as t;
        match self {
            Message::Hello(_) => t::HELLO,
            Message::Auth(_) => t::AUTH,
            Message::Control { .. } => t::CONTROL,
            Message::Input { .. } => t::INPUT,
            Message::Output { .. } => t::OUTPUT,
            Message::Heartbeat(_) => t::HEARTBEAT,
            Message::VcpuState(_) => t::VCPU_STATE,
            Message::Digest { .. } => t::DIGEST,
            Message::Goodbye(_) => t::GOODBYE,
            Message::DiskBlocks(_) => t::DISK_BLOCKS,
            Message::DiskDigest { .. } => t::DISK_DIGEST,
        }
    }

    /// Appends this message as a complete, padded stream record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.rtype().to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let body = out.len();
        match self {
            Message::Hello(h) => {
                out.extend_from_slice(&HELLO_MAGIC);
                out.extend_from_slice(&h.version.to_le_bytes());
                out.extend_from_slice(&h.role.wire().to_le_bytes());
                out.extend_from_slice(&h.page_count.to_le_bytes());
                out.extend_from_slice(&h.page_size.to_le_bytes());
                let mut flags = 0;
                if h.wants_auth {
                    flags |= HELLO_WANTS_AUTH;
                }
                if h.verify {
                    flags |= HELLO_VERIFY;
                }
                if h.plaintext {
                    flags |= HELLO_PLAINTEXT;
                }
                flags |= h.coding.flags();
                if h.disk_mirror == DiskMirror::Continuous {
                    flags |= HELLO_DISK_MIRROR;
                }
                let streams = u32::from(h.streams.clamp(1, MAX_STREAMS)) - 1;
                flags |= streams << HELLO_STREAMS_SHIFT;
                flags |= h.other_flags & !HELLO_KNOWN_FLAGS;
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(&h.nonce);
                out.extend_from_slice(&h.disk_blocks.to_le_bytes());
            }
            Message::Auth(mac) => out.extend_from_slice(mac),
            Message::Control { msg, epoch } => {
                out.extend_from_slice(&msg.wire().to_le_bytes());
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&epoch.to_le_bytes());
            }
            Message::Input { seq: n, frame } | Message::Output { epoch: n, frame } => {
                out.extend_from_slice(&n.to_le_bytes());
                out.extend_from_slice(frame);
            }
            Message::Heartbeat(n) => out.extend_from_slice(&n.to_le_bytes()),
            Message::VcpuState(blob) => out.extend_from_slice(blob),
            Message::Digest { epoch, digest } => {
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(digest);
            }
            Message::Goodbye(r) => out.extend_from_slice(&r.to_le_bytes()),
            Message::DiskBlocks(d) => d.encode_body(out),
            Message::DiskDigest { epoch, digest } => {
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(digest);
            }
        }
        let len = (out.len() - body) as u32;
        out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
        let pad = (8 - (out.len() - start) % 8) % 8;
        out.extend_from_slice(&[0u8; 8][..pad]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(m: Message<'_>) {
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(out.len() % 8, 0);
        let rtype = u32::from_le_bytes([out[0], out[1], out[2], out[3]]);
        let len = u32::from_le_bytes([out[4], out[5], out[6], out[7]]) as usize;
        let parsed = Message::parse(rtype, &out[8..8 + len]).unwrap().unwrap();
        assert_eq!(parsed, m);
    }

    #[test]
    fn every_message_round_trips() {
        for (wants_auth, verify) in [(false, false), (true, false), (false, true), (true, true)] {
            for plaintext in [false, true] {
                for coding in [
                    PageCoding::PLAIN,
                    PageCoding {
                        zero_pages: true,
                        codec: crate::stream::Codec::None,
                    },
                    PageCoding {
                        zero_pages: plaintext,
                        codec: crate::stream::Codec::Lz4,
                    },
                ] {
                    round_trip(Message::Hello(Hello {
                        version: PROTOCOL_VERSION,
                        role: Role::Secondary,
                        page_count: 262_144,
                        page_size: 4096,
                        wants_auth,
                        verify,
                        plaintext,
                        coding,
                        disk_mirror: if plaintext {
                            DiskMirror::Continuous
                        } else {
                            DiskMirror::Checkpoint
                        },
                        nonce: [7; 32],
                        disk_blocks: u64::from(verify) << 40 | 16_384,
                        streams: if plaintext { 1 } else { 16 },
                        other_flags: u32::from(verify) << 31,
                    }));
                }
            }
        }
        round_trip(Message::Auth([9; 32]));
        for msg in [
            Control::New,
            Control::SvmSuspended,
            Control::SvmReady,
            Control::SvmResumed,
        ] {
            round_trip(Message::Control { msg, epoch: 42 });
        }
        round_trip(Message::Input {
            seq: 5,
            frame: b"abc",
        });
        round_trip(Message::Output {
            epoch: 5,
            frame: &[1; 61],
        });
        round_trip(Message::Heartbeat(1));
        round_trip(Message::VcpuState(&[3; 17]));
        round_trip(Message::Digest {
            epoch: 3,
            digest: [4; 32],
        });
        round_trip(Message::Goodbye(0));
        let mut disk = Vec::new();
        crate::disk::encode_disk_blocks_header(&mut disk, &[7, 1]);
        disk.extend((0..2 * crate::disk::BLOCK_SIZE).map(|i| i as u8));
        round_trip(Message::DiskBlocks(DiskBlocks::parse(&disk[8..]).unwrap()));
        round_trip(Message::DiskDigest {
            epoch: 9,
            digest: [5; DISK_DIGEST_LEN],
        });
    }

    #[test]
    fn golden_control_record() {
        let mut out = Vec::new();
        Message::Control {
            msg: Control::SvmReady,
            epoch: 0x0102,
        }
        .encode(&mut out);
        assert_eq!(
            out,
            [
                0x03, 0xC0, 0x00, 0x80, 16, 0, 0, 0, // type, length
                2, 0, 0, 0, 0, 0, 0, 0, // SVM_READY, reserved
                0x02, 0x01, 0, 0, 0, 0, 0, 0, // epoch
            ]
        );
    }

    #[test]
    fn golden_hello_flags() {
        let mut out = Vec::new();
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: Role::Primary,
            page_count: 16,
            page_size: 4096,
            wants_auth: true,
            verify: true,
            plaintext: false,
            coding: PageCoding::PLAIN,
            disk_mirror: DiskMirror::Checkpoint,
            nonce: [0; 32],
            disk_blocks: 0x0102,
            streams: 1,
            other_flags: 0,
        })
        .encode(&mut out);
        assert_eq!(out.len(), 8 + HELLO_LEN);
        assert_eq!(
            out[8 + 64..8 + 72],
            [2, 1, 0, 0, 0, 0, 0, 0],
            "disk size last"
        );
        let body = &out[8..];
        assert_eq!(&body[..8], b"COLOLINK");
        assert_eq!(body[8..12], PROTOCOL_VERSION.to_le_bytes());
        assert_eq!(body[28..32], [3, 0, 0, 0], "flags: wants auth | verify");
        let Ok(Some(Message::Hello(h))) = Message::parse(colo_type::HELLO, body) else {
            panic!("HELLO does not parse");
        };
        assert!(h.wants_auth && h.verify);
        assert_eq!(h.disk_blocks, 0x0102);
        // Bits 3–5: the page coding; an unknown codec is refused, not read as another.
        let mut b = body.to_vec();
        b[28] = 3 | 1 << 3 | 1 << 4;
        let Ok(Some(Message::Hello(h))) = Message::parse(colo_type::HELLO, &b) else {
            panic!("HELLO with a page coding does not parse");
        };
        assert_eq!(
            h.coding,
            PageCoding {
                zero_pages: true,
                codec: crate::stream::Codec::Lz4
            }
        );
        // Bit 6: the disk mirror mode.
        b[28] = 3 | 1 << 6;
        let Ok(Some(Message::Hello(h))) = Message::parse(colo_type::HELLO, &b) else {
            panic!("HELLO with the disk mirror bit does not parse");
        };
        assert_eq!((h.disk_mirror, h.other_flags), (DiskMirror::Continuous, 0));
        // Bits 7–10: the stream count less one (one stream sets none: the HELLO of a build
        // without `--streams`).
        assert_eq!(h.streams, 1);
        b[28] = 3 | 0x80;
        b[29] = 0b1;
        let Ok(Some(Message::Hello(h))) = Message::parse(colo_type::HELLO, &b) else {
            panic!("HELLO with a stream count does not parse");
        };
        assert_eq!((h.streams, h.other_flags), (4, 0), "(0b11 << 7) + 1");
        b[28] = 3 | 0x80;
        b[29] = 0b111;
        let Ok(Some(Message::Hello(h))) = Message::parse(colo_type::HELLO, &b) else {
            panic!("HELLO with 16 streams does not parse");
        };
        assert_eq!(h.streams, 16);
        let mut again = Vec::new();
        Message::Hello(h).encode(&mut again);
        assert_eq!(&again[8..], &b[..], "16 streams encode back");
        b[29] = 0;
        b[28] = 3 | 2 << 4;
        assert!(matches!(
            Message::parse(colo_type::HELLO, &b),
            Err(MessageError::BadCoding(_))
        ));
        // Bits this version does not define are kept, not dropped: the body encodes back to
        // itself (found by the disk_records fuzz target) and the handshake refuses them.
        let mut b = body.to_vec();
        b[31] = 0x4e;
        let Ok(Some(m @ Message::Hello(h))) = Message::parse(colo_type::HELLO, &b) else {
            panic!("HELLO with unknown flag bits does not parse");
        };
        assert_eq!(h.other_flags, 0x4e00_0000);
        let mut again = Vec::new();
        m.encode(&mut again);
        assert_eq!(&again[8..], &b[..]);
        // A HELLO one byte short (or long) is a length error, not a panic.
        for len in [HELLO_LEN - 1, HELLO_LEN + 1] {
            let mut b = body.to_vec();
            b.resize(len, 0);
            assert_eq!(
                Message::parse(colo_type::HELLO, &b),
                Err(MessageError::Length {
                    name: "HELLO",
                    got: len,
                    want: HELLO_LEN
                })
            );
        }
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(matches!(
            Message::parse(colo_type::CONTROL, &[0; 15]),
            Err(MessageError::Length { .. })
        ));
        let mut body = [0u8; 16];
        body[0] = 9;
        assert_eq!(
            Message::parse(colo_type::CONTROL, &body),
            Err(MessageError::BadControl(9))
        );
        let mut hello = [0u8; HELLO_LEN];
        assert!(matches!(
            Message::parse(colo_type::HELLO, &hello),
            Err(MessageError::BadMagic(_))
        ));
        hello[..8].copy_from_slice(&HELLO_MAGIC);
        hello[12] = 3;
        assert_eq!(
            Message::parse(colo_type::HELLO, &hello),
            Err(MessageError::BadRole(3))
        );
        assert_eq!(Message::parse(0x8000_0001, &[]), Ok(None));
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(t in 0u32..14, body in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Message::parse(0x8000_C000 + t, &body);
        }
    }
}

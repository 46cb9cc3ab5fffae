//! The backend half of Xen's PV network protocol (`netif`, xen/include/public/io/netif.h),
//! served by colo from dom0 instead of the kernel's netback: frames a guest's netfront queues
//! on its TX ring come out of [`NetifBackend::poll_tx`], frames for the guest go into the
//! receive buffers it posted on its RX ring with [`NetifBackend::deliver`].
//!
//! Why colo serves the rings itself: a checkpoint copies the rings (guest memory) from the PVM
//! to the SVM, but a kernel backend's private indices and in-flight requests stay with the
//! SVM's own past, and netback disables the vif at the first checkpoint that carries ring
//! traffic (`docs/xen-pv-devices.md`). This backend keeps **no state outside the rings**: it
//! answers every request in the same call that consumes it, so its private indices
//! (`req_cons`, `rsp_prod_pvt`) always equal the `rsp_prod` it last published in guest
//! memory. A replica's backend [`NetifBackend::attach`]es to the copied rings and derives its
//! indices from them; nothing travels beside the checkpoint.
//!
//! Granted pages are resolved by colo ([`crate::grant`]) and read or written through the
//! caller's [`GuestFrames`] (a foreign mapping of the guest), not through grant operations.
//!
//! # Ring layout (little-endian, one 4 KiB page per ring)
//! ```text
//!  word 0 req_prod   word 1 req_event   word 2 rsp_prod   word 3 rsp_event   words 4..16 pad
//!  then 256 slots: TX 12 bytes (request gref u32, offset u16, flags u16, id u16, size u16;
//!                               response id u16, status i16)
//!                  RX  8 bytes (request id u16, pad u16, gref u32;
//!                               response id u16, offset u16, flags u16, status i16)
//! ```
//! A TX packet is a first request whose `size` is the whole packet's length, optionally
//! followed by extra-info slots (`NETTXF_extra_info`; answered `NULL`, their content — GSO
//! and multicast hints this backend does not advertise — is skipped) and by one request per
//! further fragment while `NETTXF_more_data` is set; the first slot carries what the
//! fragments' sizes leave. Every slot gets one response, in ring order.
//!
//! # Errors
//! A packet the guest described inconsistently (sizes, a slot crossing its page, a grant
//! that does not permit the access) is answered `ERROR` and dropped, and the ring goes on, as
//! netback does. A ring the frontend broke (`req_prod` more than a ring ahead, a packet of
//! more slots than [`MAX_SLOTS`], an extra-info chain that does not end) is a
//! [`NetifError`]: the caller stops serving that vif.

use std::sync::atomic::{fence, AtomicU32, Ordering};

use crate::grant::{Access, GrantError, GrantTable};

/// Slots per ring: `(4096 - 64) / slot size` rounded down to a power of two (256 for both).
pub const RING_SIZE: u32 = 256;
/// The most slots one TX packet may take (`XEN_NETBK_LEGACY_SLOTS_MAX`).
pub const MAX_SLOTS: usize = 18;
/// The most extra-info slots one packet may carry (one of each type Xen defines).
const MAX_EXTRAS: u32 = 5;
const PAGE: usize = 4096;

const HDR_WORDS: usize = 16;
const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 1;
const RSP_PROD: usize = 2;
const RSP_EVENT: usize = 3;
const TX_SLOT_WORDS: usize = 3;
const RX_SLOT_WORDS: usize = 2;

/// `NETTXF_csum_blank`: the transport checksum holds only the pseudo-header sum.
pub const NETTXF_CSUM_BLANK: u16 = 1 << 0;
/// `NETTXF_data_validated`.
pub const NETTXF_DATA_VALIDATED: u16 = 1 << 1;
/// `NETTXF_more_data`: another fragment follows.
pub const NETTXF_MORE_DATA: u16 = 1 << 2;
/// `NETTXF_extra_info`: an extra-info slot follows.
pub const NETTXF_EXTRA_INFO: u16 = 1 << 3;
/// `XEN_NETIF_EXTRA_FLAG_MORE`: another extra-info slot follows.
pub const EXTRA_FLAG_MORE: u8 = 1;

/// `NETIF_RSP_OKAY`.
pub const RSP_OKAY: i16 = 0;
/// `NETIF_RSP_ERROR`.
pub const RSP_ERROR: i16 = -1;
/// `NETIF_RSP_NULL`: the answer to an extra-info slot.
pub const RSP_NULL: i16 = 1;

/// A ring the frontend broke, or the backend's own misuse; the vif cannot be served on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetifError {
    /// A ring page shorter than 4 KiB.
    #[error("a {ring} ring page must be 1024 words, got {words}")]
    ShortPage {
        /// "tx" or "rx".
        ring: &'static str,
        /// Words given.
        words: usize,
    },
    /// The frontend claims more requests than a ring holds.
    #[error("{ring} ring: the frontend's req_prod {req_prod} is more than {RING_SIZE} requests ahead of the backend's {req_cons}")]
    Overrun {
        /// "tx" or "rx".
        ring: &'static str,
        /// The frontend's producer index.
        req_prod: u32,
        /// The backend's consumer index.
        req_cons: u32,
    },
    /// A TX packet the backend cannot take apart.
    #[error("tx ring: the packet at request {at} is malformed: {why}")]
    Malformed {
        /// Its first request's index.
        at: u32,
        /// What was wrong.
        why: &'static str,
    },
    /// A frame for the guest larger than one receive buffer.
    #[error("a {len}-byte frame does not fit one {PAGE}-byte receive buffer")]
    FrameTooBig {
        /// The frame's length.
        len: usize,
    },
}

/// A guest frame the backend could not read or write (its foreign mapping failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("guest frame {gfn:#x}: {reason}")]
pub struct FrameError {
    /// The frame.
    pub gfn: u64,
    /// Why.
    pub reason: String,
}

/// The guest's memory as the backend reaches it: a foreign mapping on Xen, plain memory in the
/// tests. `offset + len` never passes 4096 (the backend checks before calling).
pub trait GuestFrames {
    /// Copies `out.len()` bytes from `offset` of frame `gfn`.
    fn read(&mut self, gfn: u64, offset: usize, out: &mut [u8]) -> Result<(), FrameError>;
    /// Copies `data` to `offset` of frame `gfn`.
    fn write(&mut self, gfn: u64, offset: usize, data: &[u8]) -> Result<(), FrameError>;
}

/// One shared ring page, as 1024 little-endian words the frontend writes concurrently.
#[derive(Debug, Clone, Copy)]
pub struct SharedRing<'a> {
    words: &'a [AtomicU32],
    slot_words: usize,
    name: &'static str,
}

impl<'a> SharedRing<'a> {
    /// The TX ring in `words` (a 4 KiB page).
    pub fn tx(words: &'a [AtomicU32]) -> Result<Self, NetifError> {
        Self::new(words, TX_SLOT_WORDS, "tx")
    }

    /// The RX ring in `words` (a 4 KiB page).
    pub fn rx(words: &'a [AtomicU32]) -> Result<Self, NetifError> {
        Self::new(words, RX_SLOT_WORDS, "rx")
    }

    fn new(
        words: &'a [AtomicU32],
        slot_words: usize,
        name: &'static str,
    ) -> Result<Self, NetifError> {
        if words.len() < PAGE / 4 {
            return Err(NetifError::ShortPage {
                ring: name,
                words: words.len(),
            });
        }
        Ok(Self {
            words,
            slot_words,
            name,
        })
    }

    fn load(&self, at: usize) -> u32 {
        self.words[at].load(Ordering::Acquire)
    }

    fn store(&self, at: usize, v: u32) {
        self.words[at].store(v, Ordering::Release);
    }

    fn slot(&self, idx: u32) -> &'a [AtomicU32] {
        let at = HDR_WORDS + (idx % RING_SIZE) as usize * self.slot_words;
        &self.words[at..at + self.slot_words]
    }

    /// Requests the frontend has produced beyond `cons`, or the frontend's lie.
    fn unconsumed(&self, cons: u32) -> Result<u32, NetifError> {
        let prod = self.load(REQ_PROD);
        let n = prod.wrapping_sub(cons);
        if n > RING_SIZE {
            return Err(NetifError::Overrun {
                ring: self.name,
                req_prod: prod,
                req_cons: cons,
            });
        }
        Ok(n)
    }

    /// Publishes responses up to `pvt` and says whether the frontend asked to be notified
    /// (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).
    fn push_responses(&self, pvt: u32) -> bool {
        let old = self.load(RSP_PROD);
        if old == pvt {
            return false;
        }
        self.store(RSP_PROD, pvt);
        fence(Ordering::SeqCst);
        let event = self.load(RSP_EVENT);
        pvt.wrapping_sub(event) < pvt.wrapping_sub(old)
    }

    /// Asks the frontend to notify at its next request after `cons`, then looks once more
    /// (`RING_FINAL_CHECK_FOR_REQUESTS`): whether requests arrived meanwhile.
    fn final_check(&self, cons: u32) -> Result<bool, NetifError> {
        self.store(REQ_EVENT, cons.wrapping_add(1));
        fence(Ordering::SeqCst);
        Ok(self.unconsumed(cons)? > 0)
    }
}

/// One TX request as read from its slot.
#[derive(Debug, Clone, Copy, Default)]
struct TxReq {
    gref: u32,
    offset: u16,
    flags: u16,
    id: u16,
    size: u16,
}

fn read_tx(ring: &SharedRing<'_>, idx: u32) -> TxReq {
    let s = ring.slot(idx);
    let (w0, w1, w2) = (
        s[0].load(Ordering::Relaxed),
        s[1].load(Ordering::Relaxed),
        s[2].load(Ordering::Relaxed),
    );
    TxReq {
        gref: w0,
        offset: w1 as u16,
        flags: (w1 >> 16) as u16,
        id: w2 as u16,
        size: (w2 >> 16) as u16,
    }
}

/// What one [`NetifBackend::poll_tx`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxPoll {
    /// Frames handed to the caller.
    pub frames: u32,
    /// Packets answered `ERROR` and dropped (the guest's inconsistency).
    pub errors: u32,
    /// Whether the frontend must be notified of the responses (kick its event channel).
    pub notify: bool,
}

/// What one [`NetifBackend::deliver`] did with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// In the guest's next receive buffer (answered at the next [`NetifBackend::push_rx`]).
    Delivered,
    /// The guest has posted no receive buffer: the frame was not taken (keep it or drop it);
    /// the frontend will notify when it posts one.
    NoBuffer,
    /// The guest's receive buffer could not be written (its grant, or the mapping): the request
    /// was answered `ERROR` and the frame dropped.
    GuestFault(String),
}

/// colo's backend for one vif's ring pair (a single queue, one event channel).
#[derive(Debug)]
pub struct NetifBackend {
    /// The domain the guest granted its pages to (dom0: 0).
    backend_domid: u16,
    tx_cons: u32,
    rx_cons: u32,
    /// A packet's requests, reused (no allocation per packet).
    slots: Vec<TxReq>,
    /// A packet's bytes, reused.
    frame: Vec<u8>,
}

impl NetifBackend {
    /// A backend for rings the frontend has just set up (or a replica's copied rings): its
    /// indices are taken from the rings' published responses, since it answers every request
    /// it consumes at once.
    pub fn attach(
        tx: &SharedRing<'_>,
        rx: &SharedRing<'_>,
        backend_domid: u16,
    ) -> Result<Self, NetifError> {
        let tx_cons = tx.load(RSP_PROD);
        let rx_cons = rx.load(RSP_PROD);
        tx.unconsumed(tx_cons)?;
        rx.unconsumed(rx_cons)?;
        Ok(Self {
            backend_domid,
            tx_cons,
            rx_cons,
            slots: Vec::with_capacity(MAX_SLOTS),
            frame: Vec::with_capacity(1 << 16),
        })
    }

    /// The indices the backend has consumed up to: (TX, RX).
    pub fn consumed(&self) -> (u32, u32) {
        (self.tx_cons, self.rx_cons)
    }

    /// Takes every complete packet the guest queued on `tx`, hands each frame to `out`
    /// (checksums the guest left blank completed), answers every slot and publishes the
    /// answers. Returns when the ring is empty and the frontend has been asked to notify.
    pub fn poll_tx(
        &mut self,
        tx: &SharedRing<'_>,
        grants: &GrantTable<'_>,
        mem: &mut impl GuestFrames,
        mut out: impl FnMut(&[u8]),
    ) -> Result<TxPoll, NetifError> {
        let mut poll = TxPoll::default();
        loop {
            let avail = tx.unconsumed(self.tx_cons)?;
            if avail == 0 {
                if tx.final_check(self.tx_cons)? {
                    continue;
                }
                break;
            }
            match self.take_packet(tx, avail, grants, mem)? {
                Taken::Incomplete => {
                    // A frontend pushes whole packets; wait for the rest to be published.
                    tx.store(REQ_EVENT, self.tx_cons.wrapping_add(avail).wrapping_add(1));
                    break;
                }
                Taken::Frame => {
                    out(&self.frame);
                    poll.frames += 1;
                }
                Taken::Dropped => poll.errors += 1,
            }
        }
        poll.notify = tx.push_responses(self.tx_cons);
        Ok(poll)
    }

    /// Reads the packet at `tx_cons` (`avail` requests are published), answers its slots.
    fn take_packet(
        &mut self,
        tx: &SharedRing<'_>,
        avail: u32,
        grants: &GrantTable<'_>,
        mem: &mut impl GuestFrames,
    ) -> Result<Taken, NetifError> {
        let at = self.tx_cons;
        let first = read_tx(tx, at);
        let mut used = 1u32;
        let mut extras = 0u32;
        if first.flags & NETTXF_EXTRA_INFO != 0 {
            loop {
                if used == avail {
                    return Ok(Taken::Incomplete);
                }
                let flags = (tx.slot(at.wrapping_add(used))[0].load(Ordering::Relaxed) >> 8) as u8;
                used += 1;
                extras += 1;
                if flags & EXTRA_FLAG_MORE == 0 {
                    break;
                }
                if extras == MAX_EXTRAS {
                    return Err(NetifError::Malformed {
                        at,
                        why: "its extra-info chain does not end",
                    });
                }
            }
        }
        self.slots.clear();
        self.slots.push(first);
        let mut more = first.flags & NETTXF_MORE_DATA != 0;
        while more {
            if used == avail {
                return Ok(Taken::Incomplete);
            }
            if self.slots.len() == MAX_SLOTS {
                return Err(NetifError::Malformed {
                    at,
                    why: "it takes more slots than a packet may",
                });
            }
            let r = read_tx(tx, at.wrapping_add(used));
            used += 1;
            more = r.flags & NETTXF_MORE_DATA != 0;
            self.slots.push(r);
        }
        let ok = self.gather(grants, mem);
        // Answers in ring order: the first slot, its extras (NULL), then the fragments.
        let status = if ok { RSP_OKAY } else { RSP_ERROR };
        let mut idx = at;
        let mut answer = |id: u16, status: i16| {
            tx.slot(idx)[0].store(
                u32::from(id) | u32::from(status as u16) << 16,
                Ordering::Relaxed,
            );
            idx = idx.wrapping_add(1);
        };
        answer(first.id, status);
        for _ in 0..extras {
            answer(0, RSP_NULL);
        }
        for r in &self.slots[1..] {
            answer(r.id, status);
        }
        self.tx_cons = at.wrapping_add(used);
        Ok(if ok { Taken::Frame } else { Taken::Dropped })
    }

    /// Copies the packet's slots into `self.frame`; false if the guest described it wrongly.
    fn gather(&mut self, grants: &GrantTable<'_>, mem: &mut impl GuestFrames) -> bool {
        let total = usize::from(self.slots[0].size);
        let rest: usize = self.slots[1..].iter().map(|r| usize::from(r.size)).sum();
        let Some(first_len) = total.checked_sub(rest) else {
            return false;
        };
        self.frame.clear();
        self.frame.resize(total, 0);
        let mut pos = 0;
        for (i, r) in self.slots.iter().enumerate() {
            let len = if i == 0 {
                first_len
            } else {
                usize::from(r.size)
            };
            let off = usize::from(r.offset);
            if off + len > PAGE {
                return false;
            }
            if len == 0 {
                continue;
            }
            let Ok(gfn) = grants.resolve(r.gref, self.backend_domid, Access::Read) else {
                return false;
            };
            if mem.read(gfn, off, &mut self.frame[pos..pos + len]).is_err() {
                return false;
            }
            pos += len;
        }
        if self.slots[0].flags & NETTXF_CSUM_BLANK != 0 {
            complete_blank_checksum(&mut self.frame);
        }
        true
    }

    /// Puts `frame` into the guest's next posted receive buffer and answers that request; the
    /// answers become visible to the guest at [`NetifBackend::push_rx`] (one publication, and
    /// at most one notification, per batch).
    pub fn deliver(
        &mut self,
        rx: &SharedRing<'_>,
        grants: &GrantTable<'_>,
        mem: &mut impl GuestFrames,
        frame: &[u8],
    ) -> Result<Delivery, NetifError> {
        if frame.len() > PAGE {
            return Err(NetifError::FrameTooBig { len: frame.len() });
        }
        if rx.unconsumed(self.rx_cons)? == 0 && !rx.final_check(self.rx_cons)? {
            return Ok(Delivery::NoBuffer);
        }
        let s = rx.slot(self.rx_cons);
        let (id, gref) = (
            s[0].load(Ordering::Relaxed) as u16,
            s[1].load(Ordering::Relaxed),
        );
        let written = grants
            .resolve(gref, self.backend_domid, Access::Write)
            .map_err(|e: GrantError| e.to_string())
            .and_then(|gfn| mem.write(gfn, 0, frame).map_err(|e| e.to_string()));
        // status is the length for a received frame (≤ 4096 fits an i16).
        let (status, outcome) = match written {
            Ok(()) => (frame.len() as i16, Delivery::Delivered),
            Err(why) => (RSP_ERROR, Delivery::GuestFault(why)),
        };
        s[0].store(u32::from(id), Ordering::Relaxed); // id, offset 0
        s[1].store(u32::from(status as u16) << 16, Ordering::Relaxed); // flags 0, status
        self.rx_cons = self.rx_cons.wrapping_add(1);
        Ok(outcome)
    }

    /// Publishes the answers [`NetifBackend::deliver`] wrote; true if the frontend must be
    /// notified.
    pub fn push_rx(&self, rx: &SharedRing<'_>) -> bool {
        rx.push_responses(self.rx_cons)
    }
}

enum Taken {
    Frame,
    Dropped,
    Incomplete,
}

/// Completes the TCP or UDP checksum of an Ethernet frame whose sender left it blank (the
/// field holds the pseudo-header sum, as for a NIC's checksum offload). IPv4 and IPv6 (no
/// extension headers), optionally one VLAN tag; anything else is left as it is.
pub fn complete_blank_checksum(frame: &mut [u8]) {
    let mut l3 = 14;
    let Some(mut ty) = frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return;
    };
    if ty == 0x8100 {
        let Some(b) = frame.get(16..18) else { return };
        ty = u16::from_be_bytes([b[0], b[1]]);
        l3 = 18;
    }
    let (proto, l4) = match ty {
        0x0800 => {
            let Some(&vihl) = frame.get(l3) else { return };
            let Some(&proto) = frame.get(l3 + 9) else {
                return;
            };
            (proto, l3 + usize::from(vihl & 0x0f) * 4)
        }
        0x86dd => {
            let Some(&next) = frame.get(l3 + 6) else {
                return;
            };
            (next, l3 + 40)
        }
        _ => return,
    };
    let field = match proto {
        6 => l4 + 16,
        17 => l4 + 6,
        _ => return,
    };
    crate::vif::finish_l4_checksum(frame, l4, field);
}

#[cfg(test)]
#[path = "netif_tests.rs"]
mod tests;

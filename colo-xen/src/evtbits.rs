//! An event-channel port's pending and mask bits in a domain's shared-info page (2-level
//! event channels), read on the PVM and restored on the SVM with a checkpoint.
//!
//! Why colo carries them: the shared-info page is a Xen page, and Xen sets pending bits in it
//! through its own mapping, which the dirty log never sees; the page travels with a checkpoint
//! only when the guest itself wrote it in the epoch. A replica's bits for a device colo serves
//! can then disagree with the guest's memory that says what the kernel is doing with that
//! port. Seen on Xen 4.17 with Linux 6.1's netfront (its interrupt is a "late EOI" one: the
//! port is masked while the handler runs and unmasked by the EOI): after a takeover the
//! survivor's vif port was left pending *and masked* while its kernel believed it unmasked,
//! so no event of its vif was ever delivered again and its network died. The PVM's two bits
//! for the port, captured in the pause, are written into the SVM's page at every load; a
//! pending one is raised again through Xen ([`PortBits::pending`]: the caller notifies the
//! port), so that the selector and upcall follow as Xen would set them.
//!
//! Layout (public/xen.h, x86_64): `struct shared_info` starts with 32 `vcpu_info` of 64 bytes;
//! `evtchn_pending[64]` (xen_ulong_t) at byte 2048 and `evtchn_mask[64]` at byte 2560; port
//! p is bit p % 64 of word p / 64, little-endian, so bit p % 32 of 32-bit word p / 32.

use std::sync::atomic::{AtomicU32, Ordering};

/// 32-bit word index of `evtchn_pending[0]`.
const PENDING_WORD: usize = 2048 / 4;
/// 32-bit word index of `evtchn_mask[0]`.
const MASK_WORD: usize = 2560 / 4;
/// The ports a 2-level shared-info page has bits for.
pub const MAX_PORTS: u32 = 64 * 64;

/// One port's two bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortBits {
    /// An event is pending (not yet taken by the guest).
    pub pending: bool,
    /// The guest masked the port (events set it pending without an upcall).
    pub masked: bool,
}

impl PortBits {
    /// The bits as one byte: bit 0 pending, bit 1 masked, bit 7 set (the bits are known).
    pub fn to_byte(self) -> u8 {
        0x80 | u8::from(self.pending) | (u8::from(self.masked) << 1)
    }

    /// The bits from [`PortBits::to_byte`]; None when the byte says they are not known.
    pub fn from_byte(b: u8) -> Option<Self> {
        (b & 0x80 != 0).then_some(Self {
            pending: b & 1 != 0,
            masked: b & 2 != 0,
        })
    }
}

fn at(port: u32, base: usize) -> Option<(usize, u32)> {
    (port < MAX_PORTS).then(|| (base + port as usize / 32, 1u32 << (port % 32)))
}

/// `port`'s bits in a mapped shared-info page (`words`: its 1024 words); None for a port out
/// of the page's range.
pub fn read(words: &[AtomicU32], port: u32) -> Option<PortBits> {
    let (p, bit) = at(port, PENDING_WORD)?;
    let (m, _) = at(port, MASK_WORD)?;
    Some(PortBits {
        pending: words.get(p)?.load(Ordering::SeqCst) & bit != 0,
        masked: words.get(m)?.load(Ordering::SeqCst) & bit != 0,
    })
}

/// Sets `port`'s mask bit to `bits.masked` and clears its pending bit, atomically per bit
/// (Xen changes other ports' bits of the same words concurrently). The caller raises a
/// pending event again through Xen when `bits.pending`. False for a port out of range.
pub fn restore(words: &[AtomicU32], port: u32, bits: PortBits) -> bool {
    let (Some((p, bit)), Some((m, _))) = (at(port, PENDING_WORD), at(port, MASK_WORD)) else {
        return false;
    };
    let (Some(pw), Some(mw)) = (words.get(p), words.get(m)) else {
        return false;
    };
    if bits.masked {
        mw.fetch_or(bit, Ordering::SeqCst);
    } else {
        mw.fetch_and(!bit, Ordering::SeqCst);
    }
    pw.fetch_and(!bit, Ordering::SeqCst);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Vec<AtomicU32> {
        (0..1024).map(|_| AtomicU32::new(0)).collect()
    }

    #[test]
    fn bits_are_found_where_xen_keeps_them() {
        let w = page();
        // Port 8: bit 8 of evtchn_pending[0] (byte 2049) and of evtchn_mask[0] (byte 2561).
        w[512].store(1 << 8, Ordering::SeqCst);
        w[640].store(1 << 8, Ordering::SeqCst);
        assert_eq!(
            read(&w, 8),
            Some(PortBits {
                pending: true,
                masked: true
            })
        );
        assert_eq!(read(&w, 9), Some(PortBits::default()));
        // Port 70: word 1 of the 64-bit array, bit 6: 32-bit word 2, bit 6.
        w[514].store(1 << 6, Ordering::SeqCst);
        assert!(read(&w, 70).unwrap().pending);
        assert_eq!(read(&w, MAX_PORTS), None);
    }

    #[test]
    fn restore_sets_the_mask_clears_pending_and_leaves_other_ports_alone() {
        let w = page();
        w[512].store(u32::MAX, Ordering::SeqCst);
        w[640].store(1 << 8, Ordering::SeqCst);
        assert!(restore(&w, 8, PortBits::default()));
        assert_eq!(w[512].load(Ordering::SeqCst), !(1 << 8));
        assert_eq!(w[640].load(Ordering::SeqCst), 0);
        assert!(restore(
            &w,
            3,
            PortBits {
                pending: true,
                masked: true
            }
        ));
        assert_eq!(w[640].load(Ordering::SeqCst), 1 << 3);
        assert_eq!(w[512].load(Ordering::SeqCst), !(1 << 8) & !(1 << 3));
        assert!(!restore(&w, MAX_PORTS, PortBits::default()));
        assert!(!restore(&w[..600], 8, PortBits::default()));
    }

    #[test]
    fn the_byte_form_round_trips_and_knows_unknown() {
        for pending in [false, true] {
            for masked in [false, true] {
                let b = PortBits { pending, masked };
                assert_eq!(PortBits::from_byte(b.to_byte()), Some(b));
            }
        }
        assert_eq!(PortBits::from_byte(0), None);
    }
}

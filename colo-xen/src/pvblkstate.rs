//! What a colo-served PV disk adds to a checkpoint's state blob ([`VbdTrailer`]): the ring
//! ref and event channel the PVM's blkfront published, and the PVM's grant frames in use. The
//! SVM's colo copies the grant frames into the SVM's own grant table (as the vif's trailer
//! does, `pvstate.rs`; with both devices the same frames travel twice and are copied twice,
//! identically), re-resolves the ring ref there and derives its backend's index from the
//! copied ring. The disk's blocks are not here: they travel as DISK_BLOCKS records.
//!
//! Layout, appended after the domain's own blob (little-endian), found from the end:
//! `grant frames (n × 4096 bytes) | ring_ref u32 | port u32 | port bits u32 | n u32 |
//! "COLOVBD2"`; the port bits are the PVM's pending and mask bits of the port at the capture
//! ([`crate::evtbits::PortBits::to_byte`]; 0: not known). `n` is
//! checked (at most [`MAX_GRANT_FRAMES`]) before any slicing; a blob without the tag is
//! refused, naming the likely cause.

use colo_core::BackendError;

pub use crate::pvstate::MAX_GRANT_FRAMES;

/// The tag that ends a blob carrying a PV disk's trailer (distinct from the vif's `COLOPVF2`).
pub const VBD_TAG: &[u8; 8] = b"COLOVBD2";
const PAGE: usize = 4096;
const FIXED: usize = 4 + 4 + 4 + 4 + 8;

/// A PV disk's part of the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VbdTrailer<'a> {
    /// The frontend's `ring-ref`.
    pub ring_ref: u32,
    /// The frontend's `event-channel` (its port in its own domain).
    pub port: u32,
    /// The port's pending and mask bits in the PVM's shared-info page at the capture
    /// ([`crate::evtbits::PortBits::to_byte`]; 0 when not known).
    pub port_bits: u8,
    /// The grant frames in use, whole pages.
    pub grant_frames: &'a [u8],
}

impl VbdTrailer<'_> {
    /// Appends the trailer to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.grant_frames);
        self.encode_fields(self.grant_frames.len() / PAGE, out);
    }

    /// Appends everything after the grant frames, for a writer that has already appended `n`
    /// frames itself (straight from the mapped table).
    pub fn encode_fields(&self, n: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ring_ref.to_le_bytes());
        out.extend_from_slice(&self.port.to_le_bytes());
        out.extend_from_slice(&u32::from(self.port_bits).to_le_bytes());
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(VBD_TAG);
    }

    /// Splits `blob` into the domain's own blob and the trailer.
    pub fn decode(blob: &[u8]) -> Result<(&[u8], VbdTrailer<'_>), BackendError> {
        let bad = |why: String| BackendError::InvalidState(format!("the PV disk's state: {why}"));
        let Some(head) = blob.len().checked_sub(FIXED) else {
            return Err(bad(format!(
                "a {}-byte state is too short for it (does the peer run with --pv-vbd?)",
                blob.len()
            )));
        };
        let fixed = &blob[head..];
        if &fixed[FIXED - 8..] != VBD_TAG {
            return Err(bad(
                "the state carries none (does the peer run with --pv-vbd?)".into(),
            ));
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
        let bits = u32_at(8);
        let Ok(port_bits) = u8::try_from(bits) else {
            return Err(bad(format!("port bits {bits:#x} do not fit a byte")));
        };
        let n = u32_at(12) as usize;
        if n > MAX_GRANT_FRAMES {
            return Err(bad(format!("{n} grant frames, at most {MAX_GRANT_FRAMES}")));
        }
        let Some(start) = head.checked_sub(n * PAGE) else {
            return Err(bad(format!(
                "{n} grant frames announced, {head} bytes before the trailer"
            )));
        };
        Ok((
            &blob[..start],
            VbdTrailer {
                ring_ref: u32_at(0),
                port: u32_at(4),
                port_bits,
                grant_frames: &blob[start..head],
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pvstate::VifTrailer;
    use proptest::prelude::*;

    #[test]
    fn a_trailer_round_trips_after_the_domains_blob_and_stacks_on_the_vifs() {
        let frames: Vec<u8> = (0..2 * PAGE).map(|i| i as u8).collect();
        let t = VbdTrailer {
            ring_ref: 8,
            port: 6,
            port_bits: 0x81,
            grant_frames: &frames,
        };
        // A guest with both devices: the vif's trailer first, the disk's last.
        let mut blob = b"domain state".to_vec();
        let vif = VifTrailer {
            rx_seq: 3,
            tx_ref: 9,
            rx_ref: 10,
            port: 5,
            port_bits: 0,
            grant_frames: &frames[..PAGE],
        };
        vif.encode(&mut blob);
        t.encode(&mut blob);
        let (inner, back) = VbdTrailer::decode(&blob).unwrap();
        assert_eq!(back, t);
        let (dom, v) = VifTrailer::decode(inner).unwrap();
        assert_eq!((dom, v), (&b"domain state"[..], vif));
        // The vif's trailer alone is not the disk's.
        let e = VbdTrailer::decode(inner).unwrap_err().to_string();
        assert!(e.contains("--pv-vbd"), "{e}");
    }

    #[test]
    fn a_blob_without_or_with_a_lying_trailer_is_refused_by_name() {
        let e = VbdTrailer::decode(b"short").unwrap_err().to_string();
        assert!(e.contains("--pv-vbd"), "{e}");
        let mut blob = Vec::new();
        VbdTrailer {
            ring_ref: 0,
            port: 0,
            port_bits: 0,
            grant_frames: &[],
        }
        .encode(&mut blob);
        let at = blob.len() - 12;
        blob[at..at + 4].copy_from_slice(&3u32.to_le_bytes());
        let e = VbdTrailer::decode(&blob).unwrap_err().to_string();
        assert!(e.contains("3 grant frames announced"), "{e}");
        blob[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = VbdTrailer::decode(&blob).unwrap_err().to_string();
        assert!(e.contains("at most 64"), "{e}");
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_reencodes(blob in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok((inner, t)) = VbdTrailer::decode(&blob) {
                let mut again = inner.to_vec();
                t.encode(&mut again);
                prop_assert_eq!(again, blob);
            }
        }
    }
}

//! What a colo-served PV vif adds to a checkpoint's state blob ([`VifTrailer`]): the request
//! number of the next mirrored frame, the frontend's ring refs and event channel as the PVM's
//! netfront published them, and the PVM's grant frames in use. The SVM's colo copies the grant
//! frames into the SVM's own grant table (Xen pages, never part of guest RAM), so the grant refs
//! in the copied memory name the same frames there, then serves the copied rings.
//!
//! Layout, appended after the domain's own blob (little-endian), so that a reader finds it
//! from the end: `grant frames (n × 4096 bytes) | rx_seq u64 | tx_ref u32 | rx_ref u32 |
//! port u32 | port bits u32 | n u32 | "COLOPVF2"`. The port bits are the PVM's pending and mask
//! bits of the port at the capture ([`crate::evtbits::PortBits::to_byte`]; 0: not known). `n` is checked (at most [`MAX_GRANT_FRAMES`]) before any
//! slicing; a blob without the tag is refused, naming the likely cause.

use colo_core::BackendError;

/// The tag that ends a blob carrying a PV vif's trailer.
pub const PV_TAG: &[u8; 8] = b"COLOPVF2";
/// The most grant frames a trailer may carry (Xen's default `max_grant_frames`).
pub const MAX_GRANT_FRAMES: usize = 64;
const PAGE: usize = 4096;
const FIXED: usize = 8 + 4 + 4 + 4 + 4 + 4 + 8;

/// A PV vif's part of the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VifTrailer<'a> {
    /// The request number the next mirrored frame gets.
    pub rx_seq: u64,
    /// The frontend's `tx-ring-ref`.
    pub tx_ref: u32,
    /// The frontend's `rx-ring-ref`.
    pub rx_ref: u32,
    /// The frontend's `event-channel` (its port in its own domain).
    pub port: u32,
    /// The port's pending and mask bits in the PVM's shared-info page at the capture
    /// ([`crate::evtbits::PortBits::to_byte`]; 0 when not known).
    pub port_bits: u8,
    /// The grant frames in use, whole pages.
    pub grant_frames: &'a [u8],
}

impl VifTrailer<'_> {
    /// Appends the trailer to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.grant_frames);
        self.encode_fields(self.grant_frames.len() / PAGE, out);
    }

    /// Appends everything after the grant frames, for a writer that has already appended `n`
    /// frames itself (straight from the mapped table, with no copy in between).
    pub fn encode_fields(&self, n: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.rx_seq.to_le_bytes());
        out.extend_from_slice(&self.tx_ref.to_le_bytes());
        out.extend_from_slice(&self.rx_ref.to_le_bytes());
        out.extend_from_slice(&self.port.to_le_bytes());
        out.extend_from_slice(&u32::from(self.port_bits).to_le_bytes());
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(PV_TAG);
    }

    /// Splits `blob` into the domain's own blob and the trailer.
    pub fn decode(blob: &[u8]) -> Result<(&[u8], VifTrailer<'_>), BackendError> {
        let bad = |why: String| BackendError::InvalidState(format!("the PV vif's state: {why}"));
        let Some(head) = blob.len().checked_sub(FIXED) else {
            return Err(bad(format!(
                "a {}-byte state is too short for it (does the peer run with --pv-vif?)",
                blob.len()
            )));
        };
        let fixed = &blob[head..];
        if &fixed[FIXED - 8..] != PV_TAG {
            return Err(bad(
                "the state carries none (does the peer run with --pv-vif?)".into(),
            ));
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&fixed[..8]);
        let bits = u32_at(20);
        let Ok(port_bits) = u8::try_from(bits) else {
            return Err(bad(format!("port bits {bits:#x} do not fit a byte")));
        };
        let n = u32_at(24) as usize;
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
            VifTrailer {
                rx_seq: u64::from_le_bytes(seq),
                tx_ref: u32_at(8),
                rx_ref: u32_at(12),
                port: u32_at(16),
                port_bits,
                grant_frames: &blob[start..head],
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_trailer_round_trips_after_the_domains_blob() {
        let frames: Vec<u8> = (0..2 * PAGE).map(|i| i as u8).collect();
        let t = VifTrailer {
            rx_seq: 77,
            tx_ref: 8,
            rx_ref: 9,
            port: 5,
            port_bits: 0x83,
            grant_frames: &frames,
        };
        let mut blob = b"domain state".to_vec();
        t.encode(&mut blob);
        let (inner, back) = VifTrailer::decode(&blob).unwrap();
        assert_eq!(inner, b"domain state");
        assert_eq!(back, t);
    }

    #[test]
    fn a_blob_without_or_with_a_lying_trailer_is_refused_by_name() {
        let e = VifTrailer::decode(b"short").unwrap_err().to_string();
        assert!(e.contains("--pv-vif"), "{e}");
        let e = VifTrailer::decode(&[0; 64]).unwrap_err().to_string();
        assert!(e.contains("carries none"), "{e}");
        let mut blob = Vec::new();
        VifTrailer {
            rx_seq: 0,
            tx_ref: 0,
            rx_ref: 0,
            port: 0,
            port_bits: 0,
            grant_frames: &[],
        }
        .encode(&mut blob);
        // Claims 3 frames that are not there.
        let at = blob.len() - 12;
        blob[at..at + 4].copy_from_slice(&3u32.to_le_bytes());
        let e = VifTrailer::decode(&blob).unwrap_err().to_string();
        assert!(e.contains("3 grant frames announced"), "{e}");
        blob[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = VifTrailer::decode(&blob).unwrap_err().to_string();
        assert!(e.contains("at most 64"), "{e}");
        blob[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        blob[at - 4..at].copy_from_slice(&0x100u32.to_le_bytes());
        let e = VifTrailer::decode(&blob).unwrap_err().to_string();
        assert!(e.contains("port bits 0x100"), "{e}");
    }

    proptest! {
        #[test]
        fn decode_never_panics(blob in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = VifTrailer::decode(&blob);
        }
    }
}

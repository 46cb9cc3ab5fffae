//! The guest agent's key-value records on its raw disk (`/dev/xvda`, the disk colo serves with
//! `--pv-vbd`): one 4 KiB block per key, at the slot the agent gave the key on its first PUT,
//! written durably before the PUT is acknowledged. `colo-xen-check disk` reads an image file
//! offline with [`decode`] to show which acknowledged writes reached it.
//!
//! Record layout (little-endian, at byte `slot × 4096`): `"COLOKV01"` | slot u64 | version
//! u64 (the key's PUT count, from 1) | key length u16 | value length u16 | xxh3-64 of bytes
//! 0..28, key and value | key | value | zeros. A block without the magic is an empty slot; one
//! whose checksum, slot or lengths do not hold is reported as damaged, never trusted.

/// A slot's size: one block of the disk (its `sector-size`).
pub const SLOT: usize = 4096;
/// The first bytes of a record.
pub const MAGIC: &[u8; 8] = b"COLOKV01";
const HEAD: usize = 36;
/// The most key and value bytes one record holds.
pub const MAX_KV: usize = SLOT - HEAD;

/// One key's latest durable value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The slot (block) it lives in.
    pub slot: u64,
    /// How many PUTs of this key the agent had done.
    pub version: u64,
    /// The key.
    pub key: String,
    /// Its value.
    pub value: String,
}

/// What a block holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// No record (no magic).
    Empty,
    /// A record that checks.
    Record(Record),
    /// Magic, but the rest does not hold (why).
    Damaged(&'static str),
}

fn checksum(head: &[u8], kv: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(head);
    h.update(kv);
    h.digest()
}

/// The block for `r`, or None if key and value do not fit one.
pub fn encode(r: &Record) -> Option<Vec<u8>> {
    let (k, v) = (r.key.as_bytes(), r.value.as_bytes());
    if k.len() + v.len() > MAX_KV {
        return None;
    }
    let mut b = Vec::with_capacity(SLOT);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&r.slot.to_le_bytes());
    b.extend_from_slice(&r.version.to_le_bytes());
    b.extend_from_slice(&(k.len() as u16).to_le_bytes());
    b.extend_from_slice(&(v.len() as u16).to_le_bytes());
    let sum = checksum(&b[..28], &[k, v].concat());
    b.extend_from_slice(&sum.to_le_bytes());
    b.extend_from_slice(k);
    b.extend_from_slice(v);
    b.resize(SLOT, 0);
    Some(b)
}

/// Reads block `slot` (`block`, at least [`SLOT`] bytes are looked at; shorter is damaged).
pub fn decode(slot: u64, block: &[u8]) -> Slot {
    if block.len() < SLOT {
        return Slot::Damaged("a short block");
    }
    if &block[..8] != MAGIC {
        return Slot::Empty;
    }
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&block[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let u16_at = |i: usize| usize::from(u16::from_le_bytes([block[i], block[i + 1]]));
    let (kl, vl) = (u16_at(24), u16_at(26));
    if kl + vl > MAX_KV {
        return Slot::Damaged("lengths past the block");
    }
    let kv = &block[HEAD..HEAD + kl + vl];
    if checksum(&block[..28], kv) != u64_at(28) {
        return Slot::Damaged("checksum");
    }
    if u64_at(8) != slot {
        return Slot::Damaged("written for another slot");
    }
    match (
        std::str::from_utf8(&kv[..kl]),
        std::str::from_utf8(&kv[kl..]),
    ) {
        (Ok(k), Ok(v)) => Slot::Record(Record {
            slot,
            version: u64_at(16),
            key: k.into(),
            value: v.into(),
        }),
        _ => Slot::Damaged("not UTF-8"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_record_round_trips_and_damage_is_named() {
        let r = Record {
            slot: 7,
            version: 3,
            key: "k1".into(),
            value: "v1-9e3779b9".into(),
        };
        let mut b = encode(&r).unwrap();
        assert_eq!(b.len(), SLOT);
        assert_eq!(decode(7, &b), Slot::Record(r.clone()));
        assert_eq!(decode(8, &b), Slot::Damaged("written for another slot"));
        assert_eq!(decode(0, &[0u8; SLOT]), Slot::Empty);
        b[HEAD] ^= 1;
        assert_eq!(decode(7, &b), Slot::Damaged("checksum"));
        let big = Record {
            value: "x".repeat(MAX_KV),
            ..r
        };
        assert!(encode(&big).is_none());
    }

    proptest! {
        #[test]
        fn decode_never_panics(block in proptest::collection::vec(any::<u8>(), 0..4200), slot in any::<u64>()) {
            let mut b = block;
            if b.len() >= 8 {
                b[..8].copy_from_slice(MAGIC);
            }
            let _ = decode(slot, &b);
        }
    }
}

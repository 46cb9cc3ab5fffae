//! Grant references resolved by colo itself: a guest's v1 grant-table entries, read from its
//! shared grant frames, checked against the access a backend asks for and turned into the guest
//! frame (gfn) they name.
//!
//! colo serves a guest's PV rings from dom0 (see `docs/xen-pv-devices.md`, way 2). It does not
//! map or copy granted pages through Xen's grant operations: a privileged dom0 process can map
//! any frame of the guest, and a grant op would leave Xen-side state (a mapping's `GTF_reading`
//! / `GTF_writing`, a maptrack entry) in *this* domain's Xen that a replica's Xen would not
//! have. Instead colo checks each entry itself, exactly as Xen's `_set_status_v1` would for a
//! grant copy: the entry must permit access (`GTF_permit_access`), to the backend's domain,
//! and writably if the backend writes. Then colo reads or writes the named frame through its
//! foreign mapping of the guest, and the entry is left as the guest wrote it.
//!
//! Layout (xen/include/public/grant_table.h, `grant_entry_v1`, little-endian): 8 bytes per
//! entry, 512 per 4 KiB frame: `flags: u16`, `domid: u16`, `frame: u32`. Version 2 tables are
//! refused by the caller before it gets here (Linux uses v1 unless told otherwise).

use std::sync::atomic::{AtomicU32, Ordering};

/// Entries per 4 KiB grant frame (v1: 8 bytes each).
pub const ENTRIES_PER_FRAME: u32 = 512;

/// The entry's type bits (`GTF_type_mask`).
const GTF_TYPE_MASK: u16 = 3;
/// `GTF_permit_access`: the granted domain may map or copy the frame.
const GTF_PERMIT_ACCESS: u16 = 1;
/// `GTF_readonly`: the granted domain may only read.
const GTF_READONLY: u16 = 1 << 2;

/// What the backend does with a granted frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads it (a transmitted frame's data).
    Read,
    /// Writes it (a receive buffer).
    Write,
}

/// Why a grant reference does not give the backend the access it needs. Every variant is the
/// guest's fault (or its lie): the backend answers the request with an error, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The reference is beyond the grant frames the guest set up.
    #[error("grant ref {gref} is beyond the guest's {entries} grant entries")]
    OutOfRange {
        /// The reference.
        gref: u32,
        /// Entries in the guest's grant frames.
        entries: u32,
    },
    /// The entry does not permit access (invalid, or a transfer entry).
    #[error("grant ref {gref} does not permit access (flags {flags:#06x})")]
    NotPermitted {
        /// The reference.
        gref: u32,
        /// The entry's flags.
        flags: u16,
    },
    /// The entry grants access to another domain.
    #[error(
        "grant ref {gref} is granted to domain {domid}, not to the backend's domain {backend}"
    )]
    OtherDomain {
        /// The reference.
        gref: u32,
        /// The domain the entry names.
        domid: u16,
        /// The backend's domain.
        backend: u16,
    },
    /// The backend must write but the entry is read-only.
    #[error("grant ref {gref} is read-only, and the backend must write it")]
    ReadOnly {
        /// The reference.
        gref: u32,
    },
}

/// A guest's shared grant frames as the backend sees them: each a 4 KiB frame of 1024
/// little-endian words (a foreign mapping of the guest's table, or a test's own memory).
#[derive(Debug)]
pub struct GrantTable<'a> {
    frames: Vec<&'a [AtomicU32]>,
}

/// One v1 entry, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantEntry {
    /// `GTF_*` flags.
    pub flags: u16,
    /// The domain granted access.
    pub domid: u16,
    /// The guest frame (gfn) granted.
    pub frame: u32,
}

impl<'a> GrantTable<'a> {
    /// The table over `frames`; a frame shorter than 1024 words is refused (`None`).
    pub fn new(frames: Vec<&'a [AtomicU32]>) -> Option<Self> {
        frames
            .iter()
            .all(|f| f.len() >= 1024)
            .then_some(Self { frames })
    }

    /// Entries the table holds.
    pub fn entries(&self) -> u32 {
        u32::try_from(self.frames.len())
            .unwrap_or(u32::MAX / ENTRIES_PER_FRAME)
            .saturating_mul(ENTRIES_PER_FRAME)
    }

    /// Entry `gref` as it is now (the guest may change it at any time; a backend reads it once
    /// per use).
    pub fn entry(&self, gref: u32) -> Result<GrantEntry, GrantError> {
        let frame = usize::try_from(gref / ENTRIES_PER_FRAME).unwrap_or(usize::MAX);
        let Some(words) = self.frames.get(frame) else {
            return Err(GrantError::OutOfRange {
                gref,
                entries: self.entries(),
            });
        };
        let at = (gref % ENTRIES_PER_FRAME) as usize * 2;
        let w0 = words[at].load(Ordering::Acquire);
        let w1 = words[at + 1].load(Ordering::Relaxed);
        Ok(GrantEntry {
            flags: w0 as u16,
            domid: (w0 >> 16) as u16,
            frame: w1,
        })
    }

    /// The gfn `gref` grants `backend` for `access`, or why not.
    pub fn resolve(&self, gref: u32, backend: u16, access: Access) -> Result<u64, GrantError> {
        let e = self.entry(gref)?;
        if e.flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS {
            return Err(GrantError::NotPermitted {
                gref,
                flags: e.flags,
            });
        }
        if e.domid != backend {
            return Err(GrantError::OtherDomain {
                gref,
                domid: e.domid,
                backend,
            });
        }
        if access == Access::Write && e.flags & GTF_READONLY != 0 {
            return Err(GrantError::ReadOnly { gref });
        }
        Ok(u64::from(e.frame))
    }
}

/// Writes a v1 entry into `words` (a grant frame), as a guest does: frame and domain first,
/// the flags last with release order (Xen and backends read the flags first).
pub fn write_entry(words: &[AtomicU32], slot: u32, e: GrantEntry) {
    let at = (slot % ENTRIES_PER_FRAME) as usize * 2;
    words[at + 1].store(e.frame, Ordering::Relaxed);
    words[at].store(
        u32::from(e.flags) | u32::from(e.domid) << 16,
        Ordering::Release,
    );
}

/// Flags of an entry granting access (`GTF_permit_access`, plus `GTF_readonly` if `readonly`).
pub fn permit(readonly: bool) -> u16 {
    GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Vec<AtomicU32> {
        (0..1024).map(|_| AtomicU32::new(0)).collect()
    }

    #[test]
    fn entries_resolve_only_for_the_access_they_grant() {
        let (f0, f1) = (frame(), frame());
        write_entry(
            &f0,
            3,
            GrantEntry {
                flags: permit(false),
                domid: 0,
                frame: 0x1234,
            },
        );
        write_entry(
            &f1,
            513,
            GrantEntry {
                flags: permit(true),
                domid: 0,
                frame: 0x99,
            },
        );
        write_entry(
            &f0,
            4,
            GrantEntry {
                flags: permit(false),
                domid: 7,
                frame: 1,
            },
        );
        write_entry(
            &f0,
            5,
            GrantEntry {
                flags: 2,
                domid: 0,
                frame: 1,
            },
        );
        let t = GrantTable::new(vec![&f0, &f1]).unwrap();
        assert_eq!(t.entries(), 1024);
        assert_eq!(t.resolve(3, 0, Access::Write), Ok(0x1234));
        assert_eq!(t.resolve(513, 0, Access::Read), Ok(0x99));
        assert_eq!(
            t.resolve(513, 0, Access::Write),
            Err(GrantError::ReadOnly { gref: 513 })
        );
        assert_eq!(
            t.resolve(4, 0, Access::Read),
            Err(GrantError::OtherDomain {
                gref: 4,
                domid: 7,
                backend: 0
            })
        );
        assert_eq!(
            t.resolve(5, 0, Access::Read),
            Err(GrantError::NotPermitted { gref: 5, flags: 2 })
        );
        assert_eq!(
            t.resolve(0, 0, Access::Read),
            Err(GrantError::NotPermitted { gref: 0, flags: 0 })
        );
        assert_eq!(
            t.resolve(1024, 0, Access::Read),
            Err(GrantError::OutOfRange {
                gref: 1024,
                entries: 1024
            })
        );
        assert_eq!(
            t.resolve(u32::MAX, 0, Access::Read),
            Err(GrantError::OutOfRange {
                gref: u32::MAX,
                entries: 1024
            })
        );
    }

    #[test]
    fn a_short_frame_is_refused() {
        let short: Vec<AtomicU32> = (0..1000).map(|_| AtomicU32::new(0)).collect();
        assert!(GrantTable::new(vec![&short]).is_none());
    }

    #[test]
    fn the_layout_is_xens_little_endian_v1_entry() {
        let f = frame();
        write_entry(
            &f,
            1,
            GrantEntry {
                flags: 0x0105,
                domid: 0x0203,
                frame: 0x0a0b0c0d,
            },
        );
        let bytes: Vec<u8> = f[2..4]
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect();
        assert_eq!(bytes, [0x05, 0x01, 0x03, 0x02, 0x0d, 0x0c, 0x0b, 0x0a]);
    }
}

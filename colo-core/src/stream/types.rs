//! The stream's data types: headers, record type numbers, page types and decoded records/events.

use super::{IMAGE_ID, IMAGE_MARKER, PAGE_TYPE_SHIFT};

/// The image header. colo always writes a little-endian stream (`options` 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Stream version: colo writes 3; a reader accepts 2 and 3.
    pub version: u32,
}

impl ImageHeader {
    /// The 24 big-endian bytes of this header with `options` 0 (little-endian stream).
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&IMAGE_MARKER.to_be_bytes());
        b[8..12].copy_from_slice(&IMAGE_ID.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        // options (16..18) = 0: little-endian; reserved 18..24 = 0.
        b
    }
}

/// The guest type in the domain header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainType {
    /// x86 PV guest (type 1).
    X86Pv,
    /// x86 HVM guest (type 2).
    X86Hvm,
}

impl DomainType {
    /// The on-wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            DomainType::X86Pv => 1,
            DomainType::X86Hvm => 2,
        }
    }

    /// Parses the on-wire value; 0 and everything above 2 are reserved or unsupported.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(DomainType::X86Pv),
            2 => Some(DomainType::X86Hvm),
            _ => None,
        }
    }
}

/// The domain header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainHeader {
    /// Guest type.
    pub domain_type: DomainType,
    /// log2 of the page size; must be 12.
    pub page_shift: u16,
    /// Xen major version of the sender.
    pub xen_major: u32,
    /// Xen minor version of the sender.
    pub xen_minor: u32,
}

impl DomainHeader {
    /// The 16 little-endian bytes of this header (reserved field 0).
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.domain_type.to_u32().to_le_bytes());
        b[4..6].copy_from_slice(&self.page_shift.to_le_bytes());
        b[8..12].copy_from_slice(&self.xen_major.to_le_bytes());
        b[12..16].copy_from_slice(&self.xen_minor.to_le_bytes());
        b
    }
}

/// Record type numbers (Xen's `REC_TYPE_*`).
pub mod rec_type {
    /// Last record of a stream; empty body.
    pub const END: u32 = 0x00;
    /// Guest pages.
    pub const PAGE_DATA: u32 = 0x01;
    /// x86 PV guest width and page-table levels.
    pub const X86_PV_INFO: u32 = 0x02;
    /// x86 PV p2m frame list.
    pub const X86_PV_P2M_FRAMES: u32 = 0x03;
    /// x86 PV vCPU basic context.
    pub const X86_PV_VCPU_BASIC: u32 = 0x04;
    /// x86 PV vCPU extended context.
    pub const X86_PV_VCPU_EXTENDED: u32 = 0x05;
    /// x86 PV vCPU xsave state.
    pub const X86_PV_VCPU_XSAVE: u32 = 0x06;
    /// The shared info page.
    pub const SHARED_INFO: u32 = 0x07;
    /// TSC mode and frequency; 24-byte body.
    pub const X86_TSC_INFO: u32 = 0x08;
    /// Alias of [`X86_TSC_INFO`].
    pub const TSC_INFO: u32 = X86_TSC_INFO;
    /// HVM context blob (`xc_domain_hvm_getcontext`).
    pub const HVM_CONTEXT: u32 = 0x09;
    /// HVM parameters: count, reserved, (index, value) pairs.
    pub const HVM_PARAMS: u32 = 0x0A;
    /// Deprecated toolstack blob.
    pub const TOOLSTACK: u32 = 0x0B;
    /// x86 PV vCPU MSRs.
    pub const X86_PV_VCPU_MSRS: u32 = 0x0C;
    /// Debug verify marker; empty body.
    pub const VERIFY: u32 = 0x0D;
    /// End of one consistent checkpoint; empty body.
    pub const CHECKPOINT: u32 = 0x0E;
    /// Secondary's dirty pfns on the back channel: u64 pfn[length / 8].
    pub const CHECKPOINT_DIRTY_PFN_LIST: u32 = 0x0F;
    /// End of the static data (mandatory from version 3); empty body.
    pub const STATIC_DATA_END: u32 = 0x10;
    /// x86 CPUID policy (opaque array of leaves).
    pub const X86_CPUID_POLICY: u32 = 0x11;
    /// Alias of [`X86_CPUID_POLICY`].
    pub const CPUID_POLICY: u32 = X86_CPUID_POLICY;
    /// x86 MSR policy (opaque array of entries).
    pub const X86_MSR_POLICY: u32 = 0x12;
    /// Alias of [`X86_MSR_POLICY`].
    pub const MSR_POLICY: u32 = X86_MSR_POLICY;
    /// Highest record type Xen defines.
    pub const LAST_KNOWN: u32 = X86_MSR_POLICY;
    /// Bit 31: the record is optional and a reader that does not know it skips it.
    pub const OPTIONAL: u32 = 0x8000_0000;
    /// colo's PACKED_PAGES (optional range): pages with zero-page markers and compressed data,
    /// sent only when both nodes agreed on a page coding at the handshake (see
    /// [`crate::stream::PageCoding`]); the decoder yields its pages as PAGE_DATA's.
    pub const PACKED_PAGES: u32 = 0x8000_C00C;
}

/// Xen's name for a record type, e.g. `"PAGE_DATA"`; optional types are `"OPTIONAL"`, others
/// `"UNKNOWN"`.
pub fn rec_type_name(rtype: u32) -> &'static str {
    match rtype {
        rec_type::END => "END",
        rec_type::PAGE_DATA => "PAGE_DATA",
        rec_type::X86_PV_INFO => "X86_PV_INFO",
        rec_type::X86_PV_P2M_FRAMES => "X86_PV_P2M_FRAMES",
        rec_type::X86_PV_VCPU_BASIC => "X86_PV_VCPU_BASIC",
        rec_type::X86_PV_VCPU_EXTENDED => "X86_PV_VCPU_EXTENDED",
        rec_type::X86_PV_VCPU_XSAVE => "X86_PV_VCPU_XSAVE",
        rec_type::SHARED_INFO => "SHARED_INFO",
        rec_type::X86_TSC_INFO => "X86_TSC_INFO",
        rec_type::HVM_CONTEXT => "HVM_CONTEXT",
        rec_type::HVM_PARAMS => "HVM_PARAMS",
        rec_type::TOOLSTACK => "TOOLSTACK",
        rec_type::X86_PV_VCPU_MSRS => "X86_PV_VCPU_MSRS",
        rec_type::VERIFY => "VERIFY",
        rec_type::CHECKPOINT => "CHECKPOINT",
        rec_type::CHECKPOINT_DIRTY_PFN_LIST => "CHECKPOINT_DIRTY_PFN_LIST",
        rec_type::STATIC_DATA_END => "STATIC_DATA_END",
        rec_type::X86_CPUID_POLICY => "X86_CPUID_POLICY",
        rec_type::X86_MSR_POLICY => "X86_MSR_POLICY",
        t if t & rec_type::OPTIONAL != 0 => "OPTIONAL",
        _ => "UNKNOWN",
    }
}

/// The type of a PAGE_DATA entry (bits 63..60). Values 5..=8 are invalid on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageType {
    /// 0x0: an ordinary page.
    Notab,
    /// 0x1: L1 page table.
    L1,
    /// 0x2: L2 page table.
    L2,
    /// 0x3: L3 page table.
    L3,
    /// 0x4: L4 page table.
    L4,
    /// 0x9: pinned L1 page table.
    L1Pinned,
    /// 0xA: pinned L2 page table.
    L2Pinned,
    /// 0xB: pinned L3 page table.
    L3Pinned,
    /// 0xC: pinned L4 page table.
    L4Pinned,
    /// 0xD: broken page (no data).
    Broken,
    /// 0xE: allocate only (no data).
    Xalloc,
    /// 0xF: invalid / not present (no data).
    Xtab,
}

impl PageType {
    /// All page types, in wire-value order.
    pub const ALL: [PageType; 12] = [
        PageType::Notab,
        PageType::L1,
        PageType::L2,
        PageType::L3,
        PageType::L4,
        PageType::L1Pinned,
        PageType::L2Pinned,
        PageType::L3Pinned,
        PageType::L4Pinned,
        PageType::Broken,
        PageType::Xalloc,
        PageType::Xtab,
    ];

    /// Whether 4096 bytes of page data follow for an entry of this type.
    pub fn has_data(self) -> bool {
        !matches!(self, PageType::Broken | PageType::Xalloc | PageType::Xtab)
    }

    /// The 4-bit type value (bits 63..60 of the entry, shifted down).
    pub fn bits(self) -> u64 {
        match self {
            PageType::Notab => 0x0,
            PageType::L1 => 0x1,
            PageType::L2 => 0x2,
            PageType::L3 => 0x3,
            PageType::L4 => 0x4,
            PageType::L1Pinned => 0x9,
            PageType::L2Pinned => 0xA,
            PageType::L3Pinned => 0xB,
            PageType::L4Pinned => 0xC,
            PageType::Broken => 0xD,
            PageType::Xalloc => 0xE,
            PageType::Xtab => 0xF,
        }
    }

    /// Parses a 4-bit type value; `None` for 5..=8 and anything above 0xF.
    pub fn from_bits(bits: u64) -> Option<Self> {
        Some(match bits {
            0x0 => PageType::Notab,
            0x1 => PageType::L1,
            0x2 => PageType::L2,
            0x3 => PageType::L3,
            0x4 => PageType::L4,
            0x9 => PageType::L1Pinned,
            0xA => PageType::L2Pinned,
            0xB => PageType::L3Pinned,
            0xC => PageType::L4Pinned,
            0xD => PageType::Broken,
            0xE => PageType::Xalloc,
            0xF => PageType::Xtab,
            _ => return None,
        })
    }

    /// Xen's short name, e.g. `"NOTAB"`.
    pub fn name(self) -> &'static str {
        match self {
            PageType::Notab => "NOTAB",
            PageType::L1 => "L1TAB",
            PageType::L2 => "L2TAB",
            PageType::L3 => "L3TAB",
            PageType::L4 => "L4TAB",
            PageType::L1Pinned => "L1TAB_PIN",
            PageType::L2Pinned => "L2TAB_PIN",
            PageType::L3Pinned => "L3TAB_PIN",
            PageType::L4Pinned => "L4TAB_PIN",
            PageType::Broken => "BROKEN",
            PageType::Xalloc => "XALLOC",
            PageType::Xtab => "XTAB",
        }
    }

    /// The PAGE_DATA entry `(type << 60) | pfn` (the caller keeps `pfn` below 2^52).
    pub fn entry(self, pfn: u64) -> u64 {
        (self.bits() << PAGE_TYPE_SHIFT) | pfn
    }
}

/// Body of X86_TSC_INFO (the trailing reserved u32 is always 0 on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscInfo {
    /// TSC mode.
    pub mode: u32,
    /// TSC frequency in kHz.
    pub khz: u32,
    /// Elapsed nanoseconds.
    pub nsec: u64,
    /// TSC incarnation.
    pub incarnation: u32,
}

/// The (index, value) entries of an HVM_PARAMS record, borrowed, 16 little-endian bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HvmParams<'a> {
    entries: &'a [u8],
}

impl<'a> HvmParams<'a> {
    /// Wraps the entry bytes (after the 8-byte count/reserved header); `None` unless the length
    /// is a multiple of 16.
    pub fn new(entries: &'a [u8]) -> Option<Self> {
        (entries.len() % 16 == 0).then_some(HvmParams { entries })
    }

    /// Number of (index, value) pairs.
    pub fn len(&self) -> usize {
        self.entries.len() / 16
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The raw entry bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.entries
    }

    /// The (index, value) pairs in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        self.entries
            .chunks_exact(16)
            .map(|c| (le_u64(c, 0), le_u64(c, 8)))
    }
}

/// The pfns of a CHECKPOINT_DIRTY_PFN_LIST record, borrowed, 8 little-endian bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfnList<'a> {
    bytes: &'a [u8],
}

impl<'a> PfnList<'a> {
    /// Wraps the body bytes; `None` unless the length is a multiple of 8.
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        (bytes.len() % 8 == 0).then_some(PfnList { bytes })
    }

    /// Number of pfns.
    pub fn len(&self) -> usize {
        self.bytes.len() / 8
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The raw body bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The pfns in wire order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        self.bytes.chunks_exact(8).map(|c| le_u64(c, 0))
    }
}

/// Reads a little-endian u64 at `at`; 0 if out of range (callers pass checked slices).
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at.saturating_add(8))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes)
}

/// Reads a little-endian u32 at `at`; 0 if out of range (callers pass checked slices).
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at.saturating_add(4))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

/// A decoded non-PAGE_DATA record. Bodies are borrowed from the decoder or the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// END: the stream is over.
    End,
    /// CHECKPOINT: everything before it is one consistent view of the VM.
    Checkpoint,
    /// STATIC_DATA_END.
    StaticDataEnd,
    /// VERIFY (debug).
    Verify,
    /// X86_TSC_INFO.
    TscInfo(TscInfo),
    /// HVM_CONTEXT, opaque.
    HvmContext(&'a [u8]),
    /// HVM_PARAMS.
    HvmParams(HvmParams<'a>),
    /// CHECKPOINT_DIRTY_PFN_LIST (Xen 4.17's layout: the plain 8-byte record header).
    CheckpointDirtyPfnList(PfnList<'a>),
    /// X86_CPUID_POLICY, opaque.
    CpuidPolicy(&'a [u8]),
    /// X86_MSR_POLICY, opaque.
    MsrPolicy(&'a [u8]),
    /// Any other known Xen record (PV records, SHARED_INFO, TOOLSTACK ...), body uninterpreted.
    OtherXen {
        /// Record type.
        rtype: u32,
        /// Body without padding.
        body: &'a [u8],
    },
    /// A record with bit 31 set. colo's own records live here (the engine parses their bodies).
    Optional {
        /// Record type (bit 31 set).
        rtype: u32,
        /// Body without padding.
        body: &'a [u8],
    },
}

impl Record<'_> {
    /// The record type number.
    pub fn rtype(&self) -> u32 {
        match self {
            Record::End => rec_type::END,
            Record::Checkpoint => rec_type::CHECKPOINT,
            Record::StaticDataEnd => rec_type::STATIC_DATA_END,
            Record::Verify => rec_type::VERIFY,
            Record::TscInfo(_) => rec_type::X86_TSC_INFO,
            Record::HvmContext(_) => rec_type::HVM_CONTEXT,
            Record::HvmParams(_) => rec_type::HVM_PARAMS,
            Record::CheckpointDirtyPfnList(_) => rec_type::CHECKPOINT_DIRTY_PFN_LIST,
            Record::CpuidPolicy(_) => rec_type::X86_CPUID_POLICY,
            Record::MsrPolicy(_) => rec_type::X86_MSR_POLICY,
            Record::OtherXen { rtype, .. } | Record::Optional { rtype, .. } => *rtype,
        }
    }

    /// The body length on the wire (without padding).
    pub fn body_len(&self) -> usize {
        match self {
            Record::End | Record::Checkpoint | Record::StaticDataEnd | Record::Verify => 0,
            Record::TscInfo(_) => 24,
            Record::HvmParams(p) => 8 + p.as_bytes().len(),
            Record::CheckpointDirtyPfnList(l) => l.as_bytes().len(),
            Record::HvmContext(b) | Record::CpuidPolicy(b) | Record::MsrPolicy(b) => b.len(),
            Record::OtherXen { body, .. } | Record::Optional { body, .. } => body.len(),
        }
    }
}

/// What the decoder yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The image header.
    ImageHeader(ImageHeader),
    /// The domain header.
    DomainHeader(DomainHeader),
    /// A PAGE_DATA record begins; exactly `count` Page events follow, then PageDataEnd.
    PageDataStart {
        /// Entries in the record.
        count: u32,
    },
    /// One entry of a PAGE_DATA record, in array order. `data` is Some(4096 bytes) iff the type
    /// carries data. The slice is borrowed from the fed input when a whole page is available in
    /// it (zero copy), else from the decoder's one-page buffer.
    Page {
        /// The pfn (bits 51..0 of the entry).
        pfn: u64,
        /// The page type.
        page_type: PageType,
        /// The page's contents, for types that carry data.
        data: Option<&'a [u8]>,
    },
    /// The PAGE_DATA record that began with the last PageDataStart is complete.
    PageDataEnd,
    /// Any other record.
    Record(Record<'a>),
}

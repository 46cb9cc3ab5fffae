//! The stream codec's error type: one variant per malformation, each with its byte offset.

use super::types::rec_type_name;

/// A malformed stream (decoding) or an unencodable input (encoding).
///
/// Every decoding variant carries `offset`, the absolute byte offset in the stream of the field
/// at fault, and the offending value.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The image header's marker is not all ones.
    #[error("at byte {offset}: bad image marker {marker:#018x} (expected 0xffffffffffffffff)")]
    BadMarker {
        /// Offset of the marker.
        offset: u64,
        /// The marker read.
        marker: u64,
    },
    /// The image header's id is not "XENF".
    #[error("at byte {offset}: bad image id {id:#010x} (expected 0x58454e46 \"XENF\")")]
    BadId {
        /// Offset of the id.
        offset: u64,
        /// The id read.
        id: u32,
    },
    /// A stream version other than 2 or 3.
    #[error("at byte {offset}: unsupported stream version {version} (2 and 3 are supported)")]
    BadVersion {
        /// Offset of the version.
        offset: u64,
        /// The version read.
        version: u32,
    },
    /// The image header says the stream is big-endian.
    #[error("at byte {offset}: big-endian stream (options {options:#06x}); only little-endian streams are supported")]
    BigEndian {
        /// Offset of the options field.
        offset: u64,
        /// The options read.
        options: u16,
    },
    /// A reserved field or reserved bits are not zero.
    #[error("at byte {offset}: reserved {field} is {value:#x}, must be 0")]
    ReservedNonZero {
        /// Offset of the field.
        offset: u64,
        /// Which field.
        field: &'static str,
        /// The value read.
        value: u64,
    },
    /// The domain header's page_shift is not 12.
    #[error("at byte {offset}: page_shift {page_shift}, only 12 (4 KiB pages) is supported")]
    BadPageShift {
        /// Offset of page_shift.
        offset: u64,
        /// The value read.
        page_shift: u16,
    },
    /// A reserved, unknown or unsupported domain type.
    #[error("at byte {offset}: unknown or reserved domain type {domain_type:#x} (1 = x86 PV, 2 = x86 HVM)")]
    BadDomainType {
        /// Offset of the type.
        offset: u64,
        /// The type read.
        domain_type: u32,
    },
    /// A record body longer than 128 MiB.
    #[error("at byte {offset}: {} record body of {len} bytes exceeds the 128 MiB limit", rec_type_name(*rtype))]
    BodyTooLong {
        /// Offset of the length field.
        offset: u64,
        /// Record type.
        rtype: u32,
        /// The length read.
        len: u32,
    },
    /// A padding byte is not zero.
    #[error("at byte {offset}: padding byte is {byte:#04x}, must be 0")]
    NonZeroPadding {
        /// Offset of the padding byte.
        offset: u64,
        /// The byte read.
        byte: u8,
    },
    /// A record whose body must have a fixed size has another size.
    #[error("at byte {offset}: {} record body is {len} bytes, expected {expected}", rec_type_name(*rtype))]
    BadRecordLength {
        /// Offset of the length field.
        offset: u64,
        /// Record type.
        rtype: u32,
        /// The length read.
        len: u32,
        /// The required length.
        expected: u32,
    },
    /// A PAGE_DATA body too short to hold its count and reserved field plus one pfn.
    #[error("at byte {offset}: PAGE_DATA body of {len} bytes is shorter than the minimum 16")]
    PageDataTooShort {
        /// Offset of the length field.
        offset: u64,
        /// The length read.
        len: u32,
    },
    /// A PAGE_DATA record with count 0.
    #[error("at byte {offset}: PAGE_DATA count is 0")]
    PageDataCountZero {
        /// Offset of the count field.
        offset: u64,
    },
    /// A PAGE_DATA body length that is not 8 + 8·count + 4096·N.
    #[error("at byte {offset}: PAGE_DATA body is {len} bytes but {count} entries with {data_pages} data pages need {expected}")]
    PageDataLength {
        /// Offset of the length field.
        offset: u64,
        /// The length read.
        len: u32,
        /// The entry count.
        count: u32,
        /// Entries with data (N), or the most possible if the types are not read yet.
        data_pages: u32,
        /// 8 + 8·count + 4096·data_pages.
        expected: u64,
    },
    /// A PAGE_DATA entry with page type 5..=8.
    #[error("at byte {offset}: PAGE_DATA entry {index} has invalid page type {page_type:#x}")]
    BadPageType {
        /// Offset of the entry.
        offset: u64,
        /// Index in the pfn array.
        index: u32,
        /// The 4-bit type read.
        page_type: u8,
    },
    /// A PAGE_DATA entry with reserved bits 59..52 set.
    #[error(
        "at byte {offset}: PAGE_DATA entry {index} ({entry:#018x}) has reserved bits 59-52 set"
    )]
    ReservedPfnBits {
        /// Offset of the entry.
        offset: u64,
        /// Index in the pfn array.
        index: u32,
        /// The whole entry read.
        entry: u64,
    },
    /// A pfn at or beyond the guest's page count.
    #[error("at byte {offset}: pfn {pfn:#x} is beyond the guest's {page_count} pages")]
    PfnOutOfRange {
        /// Offset of the pfn.
        offset: u64,
        /// The pfn.
        pfn: u64,
        /// The guest's page count.
        page_count: u64,
    },
    /// An HVM_PARAMS body that is not 8 + 16·n bytes.
    #[error("at byte {offset}: HVM_PARAMS body of {len} bytes is not 8 + 16 x count")]
    HvmParamsLength {
        /// Offset of the length field.
        offset: u64,
        /// The length read.
        len: u32,
    },
    /// An HVM_PARAMS count that disagrees with the body length.
    #[error("at byte {offset}: HVM_PARAMS count {count} but the body holds {entries} entries")]
    HvmParamsCount {
        /// Offset of the count.
        offset: u64,
        /// The count read.
        count: u32,
        /// Entries the length implies.
        entries: u32,
    },
    /// A CHECKPOINT_DIRTY_PFN_LIST whose length is not a multiple of 8.
    #[error(
        "at byte {offset}: CHECKPOINT_DIRTY_PFN_LIST body of {len} bytes is not a multiple of 8"
    )]
    DirtyPfnListLength {
        /// Offset of the length field.
        offset: u64,
        /// The length read.
        len: u32,
    },
    /// A mandatory record type this reader does not know.
    #[error("at byte {offset}: unknown mandatory record type {rtype:#x}")]
    UnknownMandatory {
        /// Offset of the record header.
        offset: u64,
        /// The type read.
        rtype: u32,
    },
    /// Bytes after the END record.
    #[error("at byte {offset}: data after the END record")]
    TrailingData {
        /// Offset of the first byte after END.
        offset: u64,
    },
    /// The input ended inside a header or record (reported by `Decoder::finish`).
    #[error(
        "at byte {offset}: stream truncated inside the {what} ({missing} more bytes expected)"
    )]
    Truncated {
        /// Offset where the input ended.
        offset: u64,
        /// What was being read.
        what: &'static str,
        /// Bytes still missing from that item.
        missing: u64,
    },
    /// A PACKED_PAGES record (colo's zero-page markers and compressed page data) that is
    /// malformed: its lengths disagree, a field is out of range, or its data does not
    /// decompress to exactly the pages it names.
    #[error("at byte {offset}: bad PACKED_PAGES record: {reason}")]
    BadPackedPages {
        /// Offset of the field at fault.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Encoding: a PAGE_DATA record with 0 or more than 1024 entries.
    #[error("cannot encode a PAGE_DATA record of {count} entries (1 to 1024 allowed)")]
    EncodeEntryCount {
        /// Entries given.
        count: usize,
    },
    /// Encoding: a pfn that does not fit in 52 bits.
    #[error("cannot encode pfn {pfn:#x} (entry {index}): it does not fit in 52 bits")]
    EncodePfnTooLarge {
        /// Index of the entry.
        index: usize,
        /// The pfn.
        pfn: u64,
    },
}

impl StreamError {
    /// The byte offset the error refers to (`None` for encoding errors).
    pub fn offset(&self) -> Option<u64> {
        match self {
            StreamError::BadMarker { offset, .. }
            | StreamError::BadId { offset, .. }
            | StreamError::BadVersion { offset, .. }
            | StreamError::BigEndian { offset, .. }
            | StreamError::ReservedNonZero { offset, .. }
            | StreamError::BadPageShift { offset, .. }
            | StreamError::BadDomainType { offset, .. }
            | StreamError::BodyTooLong { offset, .. }
            | StreamError::NonZeroPadding { offset, .. }
            | StreamError::BadRecordLength { offset, .. }
            | StreamError::PageDataTooShort { offset, .. }
            | StreamError::PageDataCountZero { offset }
            | StreamError::PageDataLength { offset, .. }
            | StreamError::BadPageType { offset, .. }
            | StreamError::ReservedPfnBits { offset, .. }
            | StreamError::PfnOutOfRange { offset, .. }
            | StreamError::HvmParamsLength { offset, .. }
            | StreamError::HvmParamsCount { offset, .. }
            | StreamError::DirtyPfnListLength { offset, .. }
            | StreamError::UnknownMandatory { offset, .. }
            | StreamError::TrailingData { offset }
            | StreamError::BadPackedPages { offset, .. }
            | StreamError::Truncated { offset, .. } => Some(*offset),
            StreamError::EncodeEntryCount { .. } | StreamError::EncodePfnTooLarge { .. } => None,
        }
    }
}

//! Xen's libxc migration stream (version 3): types, an incremental sans-IO decoder and encoders.
//!
//! The layout follows Xen's `docs/specs/libxc-migration-stream.pandoc` (summarised in
//! `shared/docs/xen-stream-format.md`):
//!
//! ```text
//! image header (24 bytes, big-endian) | domain header (16 bytes, little-endian) |
//! record: u32 type, u32 body_length, body, 0..7 zero bytes padding to a multiple of 8 | ...
//! ```
//!
//! # Decoder states
//!
//! The [`Decoder`] is a state machine named for what it awaits next:
//!
//! ```text
//! ImageHeader -> DomainHeader -> RecordHeader --(PAGE_DATA)--> PageHeader -> PagePfns -> Pages --+
//!      (expect_headers = false starts here) ^  |--(PACKED_PAGES)--> Packed -> PackedPages -----+
//!                                           |  \--(other)--> Body ----------------------------+   |
//!                                           +-----------------------------------------------+---+
//! RecordHeader --(END)--> Done      any malformation --> Failed (sticky)
//! ```
//!
//! It is fed byte slices of any size (one byte at a time works), never does IO and never panics
//! on input. Page data is handed out borrowed from the fed slice when a whole page is in it, else
//! from a single one-page buffer: at most one copy between the socket buffer and guest memory.
//!
//! # colo's own records
//!
//! colo adds no mandatory record. Any colo-specific record lives in the optional range (bit 31
//! of the type set, [`rec_type::OPTIONAL`]) and is surfaced as [`Record::Optional`]; the engine
//! documents and parses those bodies itself. The one exception is PACKED_PAGES (`packed.rs`:
//! zero-page markers and compressed page data, sent only when both nodes agreed on a
//! [`PageCoding`]), which the decoder unpacks and yields as PAGE_DATA's events. Xen's own verifier rejects every record type it does
//! not know, so streams meant for Xen tools must not contain them.

mod decode;
mod encode;
mod error;
mod packed;
mod types;

pub use decode::{Decoder, DecoderConfig};
pub use encode::{
    encode_dirty_pfn_list, encode_hvm_params, encode_page_data_header, encode_record,
    encode_tsc_info, write_page_data,
};
pub use error::StreamError;
pub use packed::{
    encode_packed_pages, is_zero_page, Codec, PackedKind, PageCoding, MAX_PACKED_BODY,
    PACKED_HEADER_LEN,
};
pub use types::{
    rec_type, rec_type_name, DomainHeader, DomainType, Event, HvmParams, ImageHeader, PageType,
    PfnList, Record, TscInfo,
};

/// Size of a guest page in bytes (Xen's `page_shift` 12).
pub const PAGE_SIZE: usize = crate::PAGE_SIZE;
/// Largest record body a reader accepts (128 MiB); longer bodies are rejected before allocating.
pub const MAX_BODY_LEN: u32 = 128 << 20;
/// Most entries the encoder puts in one PAGE_DATA record (Xen's saver batch size).
pub const MAX_PAGES_PER_RECORD: usize = 1024;
/// Length of the image header in bytes.
pub const IMAGE_HEADER_LEN: usize = 24;
/// Length of the domain header in bytes.
pub const DOMAIN_HEADER_LEN: usize = 16;
/// Length of a record header (`u32 type`, `u32 body_length`).
pub const RECORD_HEADER_LEN: usize = 8;
/// The image header marker.
pub const IMAGE_MARKER: u64 = u64::MAX;
/// The image header id, "XENF".
pub const IMAGE_ID: u32 = 0x5845_4E46;
/// The stream version colo writes.
pub const STREAM_VERSION: u32 = 3;
/// Bits 51..0 of a PAGE_DATA entry: the pfn.
pub const PFN_MASK: u64 = (1 << 52) - 1;
/// Bits 59..52 of a PAGE_DATA entry: reserved, must be zero.
pub const PFN_RESERVED_MASK: u64 = ((1 << 60) - 1) & !PFN_MASK;
/// Shift of the 4-bit page type in a PAGE_DATA entry.
pub const PAGE_TYPE_SHIFT: u32 = 60;

/// Rounds a body length up to the record padding (a multiple of 8).
pub const fn padded_len(len: usize) -> usize {
    len.saturating_add(7) & !7
}

//! Encoders: records appended to a caller-owned `Vec<u8>`, and a vectored PAGE_DATA writer that
//! sends guest pages without copying them.

use std::io::{self, IoSlice, Write};

use super::error::StreamError;
use super::types::{rec_type, PageType, Record, TscInfo};
use super::{padded_len, MAX_PAGES_PER_RECORD, PAGE_SIZE, PFN_MASK};

const ZEROS: [u8; 8] = [0; 8];

/// Appends a record: header, `body`, and zero padding to a multiple of 8.
///
/// The caller keeps `body` within [`super::MAX_BODY_LEN`]; a reader rejects anything longer.
pub fn encode_record(out: &mut Vec<u8>, rtype: u32, body: &[u8]) {
    let padded = padded_len(body.len());
    out.reserve(8 + padded);
    out.extend_from_slice(&rtype.to_le_bytes());
    out.extend_from_slice(&wire_len(body.len()).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&ZEROS[..padded - body.len()]);
}

fn wire_len(len: usize) -> u32 {
    debug_assert!(len <= super::MAX_BODY_LEN as usize, "record body too long");
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Appends an X86_TSC_INFO record.
pub fn encode_tsc_info(out: &mut Vec<u8>, tsc: &TscInfo) {
    let mut b = [0u8; 24];
    b[0..4].copy_from_slice(&tsc.mode.to_le_bytes());
    b[4..8].copy_from_slice(&tsc.khz.to_le_bytes());
    b[8..16].copy_from_slice(&tsc.nsec.to_le_bytes());
    b[16..20].copy_from_slice(&tsc.incarnation.to_le_bytes());
    encode_record(out, rec_type::X86_TSC_INFO, &b);
}

/// Appends an HVM_PARAMS record holding `params` as (index, value) pairs.
pub fn encode_hvm_params(out: &mut Vec<u8>, params: &[(u64, u64)]) {
    let len = 8 + 16 * params.len();
    out.reserve(8 + len);
    out.extend_from_slice(&rec_type::HVM_PARAMS.to_le_bytes());
    out.extend_from_slice(&wire_len(len).to_le_bytes());
    out.extend_from_slice(&(params.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for &(index, value) in params {
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn encode_hvm_params_raw(out: &mut Vec<u8>, entries: &[u8]) {
    let len = 8 + entries.len();
    out.reserve(8 + len);
    out.extend_from_slice(&rec_type::HVM_PARAMS.to_le_bytes());
    out.extend_from_slice(&wire_len(len).to_le_bytes());
    out.extend_from_slice(&((entries.len() / 16) as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(entries);
}

/// Appends a CHECKPOINT_DIRTY_PFN_LIST record in Xen 4.17's layout (the plain 8-byte record
/// header, then `u64 pfn[]`). The length is taken from the pfns actually written.
pub fn encode_dirty_pfn_list(out: &mut Vec<u8>, pfns: impl ExactSizeIterator<Item = u64>) {
    let start = out.len();
    out.reserve(8 + 8 * pfns.len());
    out.extend_from_slice(&rec_type::CHECKPOINT_DIRTY_PFN_LIST.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for pfn in pfns {
        out.extend_from_slice(&pfn.to_le_bytes());
    }
    let len = wire_len(out.len() - start - 8);
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
}

/// Writes the PAGE_DATA record header and pfn array for `entries` (1..=1024 of them) —
/// everything up to the page data, whose length it includes in the record length. The caller
/// then writes the data pages (4096 bytes each for entries whose type has data), in order;
/// no padding follows (the body is a multiple of 8). Errors on 0 or > 1024 entries or a pfn
/// with reserved bits.
pub fn encode_page_data_header(
    out: &mut Vec<u8>,
    entries: &[(u64, PageType)],
) -> Result<(), StreamError> {
    encode_page_data_header_iter(out, entries.iter().copied())
}

fn encode_page_data_header_iter(
    out: &mut Vec<u8>,
    entries: impl ExactSizeIterator<Item = (u64, PageType)>,
) -> Result<(), StreamError> {
    let count = entries.len();
    if count == 0 || count > MAX_PAGES_PER_RECORD {
        return Err(StreamError::EncodeEntryCount { count });
    }
    let start = out.len();
    out.reserve(16 + 8 * count);
    out.extend_from_slice(&rec_type::PAGE_DATA.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut data_pages = 0usize;
    let mut written = 0usize;
    for (index, (pfn, ty)) in entries.enumerate() {
        if pfn & !PFN_MASK != 0 {
            out.truncate(start);
            return Err(StreamError::EncodePfnTooLarge { index, pfn });
        }
        if ty.has_data() {
            data_pages += 1;
        }
        out.extend_from_slice(&ty.entry(pfn).to_le_bytes());
        written += 1;
    }
    if written != count {
        out.truncate(start);
        return Err(StreamError::EncodeEntryCount { count: written });
    }
    let len = wire_len(8 + 8 * count + PAGE_SIZE * data_pages);
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

impl Record<'_> {
    /// Appends this record (header, body, padding) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::End | Record::Checkpoint | Record::StaticDataEnd | Record::Verify => {
                encode_record(out, self.rtype(), &[])
            }
            Record::TscInfo(t) => encode_tsc_info(out, t),
            Record::HvmParams(p) => encode_hvm_params_raw(out, p.as_bytes()),
            Record::CheckpointDirtyPfnList(l) => {
                encode_record(out, rec_type::CHECKPOINT_DIRTY_PFN_LIST, l.as_bytes())
            }
            Record::HvmContext(b) | Record::CpuidPolicy(b) | Record::MsrPolicy(b) => {
                encode_record(out, self.rtype(), b)
            }
            Record::OtherXen { rtype, body } | Record::Optional { rtype, body } => {
                encode_record(out, *rtype, body)
            }
        }
    }
}

/// Most buffers passed to one `write_vectored` call (Linux's IOV_MAX).
const MAX_IOV: usize = 1024;

/// Vectored writer: writes whole PAGE_DATA records for `pfns` (all NOTAB) whose data is
/// `pages[i]` (each 4096 bytes, borrowed straight from guest memory), in batches of <= 1024,
/// using `Write::write_vectored` of [header, page, page, ...]; loops on partial writes.
/// `scratch` holds the record headers (cleared first, reused across calls). Returns the bytes
/// written. `InvalidInput` if the slices differ in length, a page is not 4096 bytes or a pfn
/// does not fit in 52 bits; `WriteZero` if the writer stops accepting bytes.
pub fn write_page_data<W: Write>(
    w: &mut W,
    pfns: &[u64],
    pages: &[&[u8]],
    scratch: &mut Vec<u8>,
) -> io::Result<u64> {
    if pfns.len() != pages.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} pfns but {} pages", pfns.len(), pages.len()),
        ));
    }
    if let Some(i) = pages.iter().position(|p| p.len() != PAGE_SIZE) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("page {i} is {} bytes, not {PAGE_SIZE}", pages[i].len()),
        ));
    }
    scratch.clear();
    let mut header_ends = Vec::with_capacity(pfns.len().div_ceil(MAX_PAGES_PER_RECORD));
    for chunk in pfns.chunks(MAX_PAGES_PER_RECORD) {
        encode_page_data_header_iter(scratch, chunk.iter().map(|&p| (p, PageType::Notab)))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        header_ends.push(scratch.len());
    }
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(pages.len() + header_ends.len());
    let mut hstart = 0;
    for (chunk, &hend) in pages.chunks(MAX_PAGES_PER_RECORD).zip(&header_ends) {
        slices.push(IoSlice::new(&scratch[hstart..hend]));
        slices.extend(chunk.iter().map(|p| IoSlice::new(p)));
        hstart = hend;
    }
    let total = scratch.len() as u64 + (pages.len() * PAGE_SIZE) as u64;
    let mut bufs: &mut [IoSlice<'_>] = &mut slices;
    let mut written = 0u64;
    while !bufs.is_empty() {
        let window = bufs.len().min(MAX_IOV);
        match w.write_vectored(&bufs[..window]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "writer accepted no bytes of PAGE_DATA",
                ))
            }
            Ok(n) => {
                written += n as u64;
                IoSlice::advance_slices(&mut bufs, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    debug_assert_eq!(written, total);
    Ok(written)
}

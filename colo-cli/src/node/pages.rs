//! Page copies out of a guest and PAGE_DATA records onto the link, for both roles.

use anyhow::Result;
use colo_core::{BackendError, Domain, PAGE_SIZE};

use crate::verify::in_order;

use super::*;

/// Reads pages of `pfns` from `dom` into `out`, in order. A page the backend cannot map (Xen's
/// holes: MMIO, beyond RAM) is zero-filled when `present` is None, or else left out of `out`
/// and marked `false` in `present` (then it travels as an XTAB entry without data). The
/// buffers keep their capacity across checkpoints, so the pause neither allocates nor
/// zero-fills.
pub(super) fn copy_pages(
    dom: &mut dyn Domain,
    pfns: &[u64],
    out: &mut Vec<u8>,
    mut present: Option<&mut Vec<bool>>,
) -> Result<(), BackendError> {
    out.reserve(pfns.len() * PAGE_SIZE);
    let mut next = 0;
    dom.read_pages(pfns, &mut |i, page| {
        in_order(&mut next, i)?;
        match page {
            Some(p) if p.len() == PAGE_SIZE => out.extend_from_slice(p),
            Some(p) => {
                return Err(BackendError::DataLength {
                    got: p.len(),
                    want: PAGE_SIZE,
                    pages: 1,
                })
            }
            None if present.is_none() => out.resize(out.len() + PAGE_SIZE, 0),
            None => {}
        }
        if let Some(v) = present.as_deref_mut() {
            v.push(page.is_some());
        }
        Ok(())
    })
}

/// Writes PAGE_DATA records for `pfns` (batches of at most 1024): present pages as NOTAB with
/// their data (consecutive in `data`), the others as XTAB without data. Two writes per batch,
/// the header and the batch's data, straight from `data`.
pub(super) fn write_typed_pages(
    w: &mut impl std::io::Write,
    pfns: &[u64],
    present: &[bool],
    data: &[u8],
    scratch: &mut Vec<u8>,
    entries: &mut Vec<(u64, PageType)>,
) -> std::io::Result<u64> {
    let mut off = 0;
    let mut bytes = 0u64;
    for (ps, ok) in pfns
        .chunks(MAX_PAGES_PER_RECORD)
        .zip(present.chunks(MAX_PAGES_PER_RECORD))
    {
        entries.clear();
        entries.extend(
            ps.iter()
                .zip(ok)
                .map(|(&p, &ok)| (p, if ok { PageType::Notab } else { PageType::Xtab })),
        );
        scratch.clear();
        encode_page_data_header(scratch, entries)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let n = ok.iter().filter(|x| **x).count() * PAGE_SIZE;
        let chunk = data.get(off..off + n).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "page data shorter than its pfns",
            )
        })?;
        w.write_all(scratch)?;
        w.write_all(chunk)?;
        off += n;
        bytes += (scratch.len() + n) as u64;
    }
    Ok(bytes)
}

/// Writes the initial synchronisation's buffered pages to the guest.
pub(super) fn flush_sync_pages(
    guest: &mut dyn Domain,
    pfns: &mut Vec<u64>,
    data: &mut Vec<u8>,
) -> Result<(), BackendError> {
    if !pfns.is_empty() {
        guest.write_pages(pfns, data)?;
    }
    pfns.clear();
    data.clear();
    Ok(())
}

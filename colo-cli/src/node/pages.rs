//! Page copies out of a guest and PAGE_DATA records onto the link (the primary), and the
//! initial synchronisation's pages into a guest (the secondary).

use colo_core::stream::{encode_page_data_header, PageType, MAX_PAGES_PER_RECORD};
use colo_core::{BackendError, Domain, PAGE_SIZE};

/// Checks that a backend's `read_pages` visitor got page `i` when page `next` was due, and
/// moves `next` on: the page buffers are laid out in request order.
pub(super) fn in_order(next: &mut usize, i: usize) -> Result<(), BackendError> {
    if i != *next {
        return Err(BackendError::BadState {
            op: "read_pages",
            reason: format!("page {i} delivered out of order"),
        });
    }
    *next += 1;
    Ok(())
}

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

/// The buffers [`write_typed_pages`] needs, kept across checkpoints.
#[derive(Debug)]
pub(super) struct PageWriter {
    scratch: Vec<u8>,
    entries: Vec<(u64, PageType)>,
}

impl PageWriter {
    pub(super) fn new() -> Self {
        Self {
            scratch: Vec::new(),
            entries: Vec::with_capacity(MAX_PAGES_PER_RECORD),
        }
    }

    /// [`write_typed_pages`] with these buffers.
    pub(super) fn write(
        &mut self,
        w: &mut impl std::io::Write,
        pfns: &[u64],
        present: &[bool],
        data: &[u8],
    ) -> std::io::Result<u64> {
        write_typed_pages(w, pfns, present, data, &mut self.scratch, &mut self.entries)
    }

    /// A record's bytes to build in place (cleared).
    pub(super) fn scratch(&mut self) -> &mut Vec<u8> {
        self.scratch.clear();
        &mut self.scratch
    }
}

/// The initial synchronisation's pages on their way into the secondary's guest: written a
/// record (≤ 1024 pages) at a time, so a hypervisor maps them in one call, not one per page.
#[derive(Debug)]
pub(super) struct SyncPages {
    pfns: Vec<u64>,
    data: Vec<u8>,
}

impl SyncPages {
    pub(super) fn new() -> Self {
        Self {
            pfns: Vec::with_capacity(MAX_PAGES_PER_RECORD),
            data: Vec::with_capacity(MAX_PAGES_PER_RECORD * PAGE_SIZE),
        }
    }

    /// Buffers page `pfn`; writes the buffer out once it holds a record's worth.
    pub(super) fn push(
        &mut self,
        guest: &mut dyn Domain,
        pfn: u64,
        data: &[u8],
    ) -> Result<(), BackendError> {
        self.pfns.push(pfn);
        self.data.extend_from_slice(data);
        if self.pfns.len() >= MAX_PAGES_PER_RECORD {
            self.flush(guest)?;
        }
        Ok(())
    }

    /// Writes the buffered pages to the guest.
    pub(super) fn flush(&mut self, guest: &mut dyn Domain) -> Result<(), BackendError> {
        if !self.pfns.is_empty() {
            guest.write_pages(&self.pfns, &self.data)?;
        }
        self.pfns.clear();
        self.data.clear();
        Ok(())
    }
}

//! The incremental, sans-IO stream decoder: fed byte slices of any size, yields [`Event`]s.

use super::error::StreamError;
use super::packed::{self, PackedKind, MAX_PACKED_BODY, ZERO_PAGE};
use super::types::{
    le_u32, le_u64, rec_type, DomainHeader, DomainType, Event, HvmParams, ImageHeader, PageType,
    PfnList, Record, TscInfo,
};
use super::{
    padded_len, DOMAIN_HEADER_LEN, IMAGE_HEADER_LEN, IMAGE_ID, IMAGE_MARKER, MAX_BODY_LEN,
    PAGE_SIZE, PAGE_TYPE_SHIFT, PFN_MASK, PFN_RESERVED_MASK, RECORD_HEADER_LEN,
};

/// Decoder settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecoderConfig {
    /// true: the stream starts with the image and domain headers; false: records only
    /// (colo's replication link after its handshake uses records only).
    pub expect_headers: bool,
    /// When known, any pfn >= page_count (PAGE_DATA or dirty pfn list) is an error.
    pub page_count: Option<u64>,
}

/// What the decoder awaits next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The 24-byte image header.
    ImageHeader,
    /// The 16-byte domain header.
    DomainHeader,
    /// An 8-byte record header.
    RecordHeader,
    /// The body and padding of a non-PAGE_DATA record.
    Body { rtype: u32, len: u32 },
    /// PAGE_DATA's count and reserved field.
    PageHeader { len: u32 },
    /// PAGE_DATA's pfn array.
    PagePfns { count: u32, len: u32 },
    /// PAGE_DATA's entries; `idx` is the next one to yield. At `idx == count`, PageDataEnd.
    Pages { count: u32, idx: u32 },
    /// A PACKED_PAGES body and its padding (colo's zero markers and compressed data).
    Packed { len: u32 },
    /// A PACKED_PAGES record's entries, unpacked; `idx` is the next one to yield, `data` the
    /// next data page in the unpacked buffer. At `idx == count`, PageDataEnd.
    PackedPages { count: u32, idx: u32, data: u32 },
    /// END was read; nothing may follow.
    Done,
    /// A malformation was found; the error repeats.
    Failed,
}

/// Where an event's bytes are (resolved against the input or the decoder after mutation).
#[derive(Debug, Clone, Copy)]
enum At {
    /// `input[start..start + len]`.
    Input(usize, usize),
    /// `self.buf[..len]`.
    Buf(usize),
    /// `self.page`.
    PageBuf,
    /// Page `n` of `self.unpacked`.
    Unpacked(usize),
    /// A page of zeros.
    Zero,
}

/// An event described without borrows, so `step` can mutate freely before `feed` lends.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Image(ImageHeader),
    Domain(DomainHeader),
    PageStart(u32),
    Page(u64, PageType, Option<At>),
    PageEnd,
    Record(u32, At),
}

/// The incremental decoder. See the module docs for its states.
#[derive(Debug)]
pub struct Decoder {
    cfg: DecoderConfig,
    state: State,
    /// Bytes consumed so far.
    off: u64,
    /// Offset of the current record's header.
    rec_off: u64,
    /// Accumulator for fixed-size headers.
    hdr: [u8; IMAGE_HEADER_LEN],
    hdr_got: usize,
    /// Accumulator for a record body (with padding) or a PAGE_DATA pfn array.
    buf: Vec<u8>,
    /// One page, for page data split across fed slices.
    page: Box<[u8]>,
    page_got: usize,
    /// A PACKED_PAGES record's entries and its data pages, unpacked (at most 4 MiB; kept).
    packed_entries: Vec<u64>,
    unpacked: Vec<u8>,
    failed: Option<StreamError>,
}

impl Decoder {
    /// A decoder at the start of a stream (or of the records, if `cfg.expect_headers` is false).
    pub fn new(cfg: DecoderConfig) -> Self {
        Decoder {
            cfg,
            state: if cfg.expect_headers {
                State::ImageHeader
            } else {
                State::RecordHeader
            },
            off: 0,
            rec_off: 0,
            hdr: [0; IMAGE_HEADER_LEN],
            hdr_got: 0,
            buf: Vec::new(),
            page: vec![0u8; PAGE_SIZE].into_boxed_slice(),
            page_got: 0,
            packed_entries: Vec::new(),
            unpacked: Vec::new(),
            failed: None,
        }
    }

    /// The configuration this decoder was built with.
    pub fn config(&self) -> DecoderConfig {
        self.cfg
    }

    /// Total bytes consumed so far (the offset used in errors).
    pub fn offset(&self) -> u64 {
        self.off
    }

    /// Whether the END record has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the decoder sits between records (no partial header, record or PAGE_DATA).
    pub fn at_record_boundary(&self) -> bool {
        matches!(self.state, State::RecordHeader if self.hdr_got == 0) || self.state == State::Done
    }

    /// Consumes a prefix of `input` and returns (bytes consumed, next event if one is complete).
    /// Ok((n, None)) with n == input.len() means "feed me more". Never panics on any input.
    /// Any number of bytes per call works, including one at a time. Some events (a page of a
    /// type without data, PageDataEnd) consume no bytes, so keep calling until `None`.
    /// After an error every further call returns the same error.
    pub fn feed<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Event<'a>>), StreamError> {
        let (n, pending) = match self.step(input) {
            Ok(x) => x,
            Err(e) => {
                self.state = State::Failed;
                self.failed = Some(e.clone());
                return Err(e);
            }
        };
        let this: &'a Decoder = self;
        Ok((n, pending.map(|p| this.materialize(p, input))))
    }

    /// Call at end of input: Ok if the stream stopped on a record boundary, else the
    /// truncated-stream error (distinct from "need more").
    pub fn finish(&self) -> Result<(), StreamError> {
        let truncated = |what, missing: u64| {
            Err(StreamError::Truncated {
                offset: self.off,
                what,
                missing,
            })
        };
        let got = self.hdr_got as u64;
        match self.state {
            State::Failed => match &self.failed {
                Some(e) => Err(e.clone()),
                None => truncated("stream", 0),
            },
            State::Done => Ok(()),
            State::RecordHeader if self.hdr_got == 0 => Ok(()),
            State::RecordHeader => truncated("record header", RECORD_HEADER_LEN as u64 - got),
            State::ImageHeader => truncated("image header", IMAGE_HEADER_LEN as u64 - got),
            State::DomainHeader => truncated("domain header", DOMAIN_HEADER_LEN as u64 - got),
            State::Body { len, .. } => truncated(
                "record body",
                (padded_len(len as usize) - self.buf.len()) as u64,
            ),
            State::PageHeader { len } => truncated("PAGE_DATA record", u64::from(len) - got),
            State::Packed { len } => truncated(
                "PACKED_PAGES record",
                (padded_len(len as usize) - self.buf.len()) as u64,
            ),
            // Every byte of the record was read; only its events are left to yield.
            State::PackedPages { .. } => Ok(()),
            State::PagePfns { len, .. } => truncated(
                "PAGE_DATA record",
                u64::from(len).saturating_sub(8 + self.buf.len() as u64),
            ),
            State::Pages { count, idx } => {
                if idx >= count {
                    Ok(())
                } else {
                    let left = (idx..count)
                        .filter(|&i| {
                            let e = le_u64(&self.buf, i as usize * 8);
                            PageType::from_bits(e >> PAGE_TYPE_SHIFT).is_some_and(|t| t.has_data())
                        })
                        .count() as u64;
                    truncated(
                        "PAGE_DATA record",
                        left * PAGE_SIZE as u64 - self.page_got as u64,
                    )
                }
            }
        }
    }

    fn materialize<'a>(&'a self, p: Pending, input: &'a [u8]) -> Event<'a> {
        match p {
            Pending::Image(h) => Event::ImageHeader(h),
            Pending::Domain(h) => Event::DomainHeader(h),
            Pending::PageStart(count) => Event::PageDataStart { count },
            Pending::Page(pfn, page_type, at) => Event::Page {
                pfn,
                page_type,
                data: at.map(|at| self.slice(at, input)),
            },
            Pending::PageEnd => Event::PageDataEnd,
            Pending::Record(rtype, at) => Event::Record(make_record(rtype, self.slice(at, input))),
        }
    }

    fn slice<'a>(&'a self, at: At, input: &'a [u8]) -> &'a [u8] {
        match at {
            At::Input(start, len) => input
                .get(start..start.saturating_add(len))
                .unwrap_or_default(),
            At::Buf(len) => self.buf.get(..len).unwrap_or_default(),
            At::PageBuf => &self.page,
            At::Unpacked(n) => self
                .unpacked
                .get(n * PAGE_SIZE..(n + 1) * PAGE_SIZE)
                .unwrap_or_default(),
            At::Zero => &ZERO_PAGE,
        }
    }

    /// Accumulates up to `need` bytes of a fixed-size header; true once complete.
    fn fill_hdr(&mut self, need: usize, input: &[u8], pos: &mut usize) -> bool {
        let avail = input.len() - *pos;
        let take = (need - self.hdr_got).min(avail);
        self.hdr[self.hdr_got..self.hdr_got + take].copy_from_slice(&input[*pos..*pos + take]);
        self.hdr_got += take;
        *pos += take;
        self.off += take as u64;
        if self.hdr_got == need {
            self.hdr_got = 0;
            true
        } else {
            false
        }
    }

    /// Appends input to `buf` until it holds `need` bytes; true once complete.
    fn fill_buf(&mut self, need: usize, input: &[u8], pos: &mut usize) -> bool {
        let avail = input.len() - *pos;
        let take = (need - self.buf.len()).min(avail);
        self.buf.extend_from_slice(&input[*pos..*pos + take]);
        *pos += take;
        self.off += take as u64;
        self.buf.len() == need
    }

    fn step(&mut self, input: &[u8]) -> Result<(usize, Option<Pending>), StreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut pos = 0usize;
        loop {
            match self.state {
                State::Failed => {
                    return Err(StreamError::Truncated {
                        offset: self.off,
                        what: "stream",
                        missing: 0,
                    })
                }
                State::Done => {
                    if pos < input.len() {
                        return Err(StreamError::TrailingData { offset: self.off });
                    }
                    return Ok((pos, None));
                }
                State::ImageHeader => {
                    if !self.fill_hdr(IMAGE_HEADER_LEN, input, &mut pos) {
                        return Ok((pos, None));
                    }
                    let h = parse_image_header(&self.hdr, self.off - IMAGE_HEADER_LEN as u64)?;
                    self.state = State::DomainHeader;
                    return Ok((pos, Some(Pending::Image(h))));
                }
                State::DomainHeader => {
                    if !self.fill_hdr(DOMAIN_HEADER_LEN, input, &mut pos) {
                        return Ok((pos, None));
                    }
                    let h = parse_domain_header(&self.hdr, self.off - DOMAIN_HEADER_LEN as u64)?;
                    self.state = State::RecordHeader;
                    return Ok((pos, Some(Pending::Domain(h))));
                }
                State::RecordHeader => {
                    if !self.fill_hdr(RECORD_HEADER_LEN, input, &mut pos) {
                        return Ok((pos, None));
                    }
                    self.rec_off = self.off - RECORD_HEADER_LEN as u64;
                    let rtype = le_u32(&self.hdr, 0);
                    let len = le_u32(&self.hdr, 4);
                    self.state = check_record_header(rtype, len, self.rec_off)?;
                    self.buf.clear();
                }
                State::Body { rtype, len } => {
                    let body_len = len as usize;
                    let padded = padded_len(body_len);
                    let at = if self.buf.is_empty() && input.len() - pos >= padded {
                        let start = pos;
                        let whole = &input[start..start + padded];
                        check_padding(&whole[body_len..], self.rec_off + 8 + len as u64)?;
                        check_body(&self.cfg, rtype, &whole[..body_len], self.rec_off)?;
                        pos += padded;
                        self.off += padded as u64;
                        At::Input(start, body_len)
                    } else {
                        if !self.fill_buf(padded, input, &mut pos) {
                            return Ok((pos, None));
                        }
                        check_padding(&self.buf[body_len..], self.rec_off + 8 + len as u64)?;
                        check_body(&self.cfg, rtype, &self.buf[..body_len], self.rec_off)?;
                        At::Buf(body_len)
                    };
                    self.state = if rtype == rec_type::END {
                        State::Done
                    } else {
                        State::RecordHeader
                    };
                    return Ok((pos, Some(Pending::Record(rtype, at))));
                }
                State::Packed { len } => {
                    let padded = padded_len(len as usize);
                    let pad_off = self.rec_off + 8 + u64::from(len);
                    let body_off = self.rec_off + 8;
                    let (entries, raw) = (&mut self.packed_entries, &mut self.unpacked);
                    let pages = self.cfg.page_count;
                    if self.buf.is_empty() && input.len() - pos >= padded {
                        let whole = &input[pos..pos + padded];
                        check_padding(&whole[len as usize..], pad_off)?;
                        packed::unpack(&whole[..len as usize], body_off, pages, entries, raw)?;
                        pos += padded;
                        self.off += padded as u64;
                    } else {
                        if !self.fill_buf(padded, input, &mut pos) {
                            return Ok((pos, None));
                        }
                        let (entries, raw) = (&mut self.packed_entries, &mut self.unpacked);
                        check_padding(&self.buf[len as usize..], pad_off)?;
                        packed::unpack(&self.buf[..len as usize], body_off, pages, entries, raw)?;
                    }
                    let count = self.packed_entries.len() as u32;
                    self.state = State::PackedPages {
                        count,
                        idx: 0,
                        data: 0,
                    };
                    return Ok((pos, Some(Pending::PageStart(count))));
                }
                State::PackedPages { count, idx, data } => {
                    let Some(&e) = self.packed_entries.get(idx as usize) else {
                        self.state = State::RecordHeader;
                        return Ok((pos, Some(Pending::PageEnd)));
                    };
                    let (pfn, kind) = packed::entry(e);
                    let (ty, at, next) = match kind {
                        PackedKind::Data => {
                            (PageType::Notab, Some(At::Unpacked(data as usize)), data + 1)
                        }
                        PackedKind::Zero => (PageType::Notab, Some(At::Zero), data),
                        PackedKind::Absent => (PageType::Xtab, None, data),
                    };
                    self.state = State::PackedPages {
                        count,
                        idx: idx + 1,
                        data: next,
                    };
                    return Ok((pos, Some(Pending::Page(pfn, ty, at))));
                }
                State::PageHeader { len } => {
                    if !self.fill_hdr(8, input, &mut pos) {
                        return Ok((pos, None));
                    }
                    let count = le_u32(&self.hdr, 0);
                    let reserved = le_u32(&self.hdr, 4);
                    let r = self.rec_off;
                    if count == 0 {
                        return Err(StreamError::PageDataCountZero { offset: r + 8 });
                    }
                    if reserved != 0 {
                        return Err(StreamError::ReservedNonZero {
                            offset: r + 12,
                            field: "PAGE_DATA reserved field",
                            value: u64::from(reserved),
                        });
                    }
                    let min = 8 + 8 * u64::from(count);
                    let l = u64::from(len);
                    let page = PAGE_SIZE as u64;
                    if l < min || (l - min) % page != 0 || (l - min) / page > u64::from(count) {
                        let n = if l < min {
                            0
                        } else {
                            ((l - min) / page).min(u64::from(count))
                        };
                        return Err(StreamError::PageDataLength {
                            offset: r + 4,
                            len,
                            count,
                            data_pages: n as u32,
                            expected: min + n * page,
                        });
                    }
                    self.buf.clear();
                    self.state = State::PagePfns { count, len };
                }
                State::PagePfns { count, len } => {
                    if !self.fill_buf(count as usize * 8, input, &mut pos) {
                        return Ok((pos, None));
                    }
                    check_pfns(&self.cfg, &self.buf, count, len, self.rec_off)?;
                    self.page_got = 0;
                    self.state = State::Pages { count, idx: 0 };
                    return Ok((pos, Some(Pending::PageStart(count))));
                }
                State::Pages { count, idx } => {
                    if idx >= count {
                        self.state = State::RecordHeader;
                        return Ok((pos, Some(Pending::PageEnd)));
                    }
                    let entry = le_u64(&self.buf, idx as usize * 8);
                    let pfn = entry & PFN_MASK;
                    // check_pfns validated every type, so the fallback is never taken.
                    let ty =
                        PageType::from_bits(entry >> PAGE_TYPE_SHIFT).unwrap_or(PageType::Xtab);
                    let at = if !ty.has_data() {
                        None
                    } else if self.page_got == 0 && input.len() - pos >= PAGE_SIZE {
                        let start = pos;
                        pos += PAGE_SIZE;
                        self.off += PAGE_SIZE as u64;
                        Some(At::Input(start, PAGE_SIZE))
                    } else {
                        let take = (PAGE_SIZE - self.page_got).min(input.len() - pos);
                        self.page[self.page_got..self.page_got + take]
                            .copy_from_slice(&input[pos..pos + take]);
                        self.page_got += take;
                        pos += take;
                        self.off += take as u64;
                        if self.page_got < PAGE_SIZE {
                            return Ok((pos, None));
                        }
                        self.page_got = 0;
                        Some(At::PageBuf)
                    };
                    self.state = State::Pages {
                        count,
                        idx: idx + 1,
                    };
                    return Ok((pos, Some(Pending::Page(pfn, ty, at))));
                }
            }
        }
    }
}

fn parse_image_header(h: &[u8; IMAGE_HEADER_LEN], base: u64) -> Result<ImageHeader, StreamError> {
    let be64 = |a: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[a..a + 8]);
        u64::from_be_bytes(b)
    };
    let be32 = |a: usize| u32::from_be_bytes([h[a], h[a + 1], h[a + 2], h[a + 3]]);
    let be16 = |a: usize| u16::from_be_bytes([h[a], h[a + 1]]);
    let marker = be64(0);
    if marker != IMAGE_MARKER {
        return Err(StreamError::BadMarker {
            offset: base,
            marker,
        });
    }
    let id = be32(8);
    if id != IMAGE_ID {
        return Err(StreamError::BadId {
            offset: base + 8,
            id,
        });
    }
    let version = be32(12);
    if version != 2 && version != 3 {
        return Err(StreamError::BadVersion {
            offset: base + 12,
            version,
        });
    }
    let options = be16(16);
    if options & 1 != 0 {
        return Err(StreamError::BigEndian {
            offset: base + 16,
            options,
        });
    }
    if options != 0 {
        return Err(StreamError::ReservedNonZero {
            offset: base + 16,
            field: "image header option bits",
            value: u64::from(options),
        });
    }
    let res1 = be16(18);
    if res1 != 0 {
        return Err(StreamError::ReservedNonZero {
            offset: base + 18,
            field: "image header u16",
            value: u64::from(res1),
        });
    }
    let res2 = be32(20);
    if res2 != 0 {
        return Err(StreamError::ReservedNonZero {
            offset: base + 20,
            field: "image header u32",
            value: u64::from(res2),
        });
    }
    Ok(ImageHeader { version })
}

fn parse_domain_header(h: &[u8], base: u64) -> Result<DomainHeader, StreamError> {
    let dtype = le_u32(h, 0);
    let domain_type = DomainType::from_u32(dtype).ok_or(StreamError::BadDomainType {
        offset: base,
        domain_type: dtype,
    })?;
    let page_shift = u16::from_le_bytes([h[4], h[5]]);
    if page_shift != 12 {
        return Err(StreamError::BadPageShift {
            offset: base + 4,
            page_shift,
        });
    }
    let reserved = u16::from_le_bytes([h[6], h[7]]);
    if reserved != 0 {
        return Err(StreamError::ReservedNonZero {
            offset: base + 6,
            field: "domain header field",
            value: u64::from(reserved),
        });
    }
    Ok(DomainHeader {
        domain_type,
        page_shift,
        xen_major: le_u32(h, 8),
        xen_minor: le_u32(h, 12),
    })
}

/// Validates a record header and returns the state that reads its body.
fn check_record_header(rtype: u32, len: u32, rec_off: u64) -> Result<State, StreamError> {
    let len_off = rec_off + 4;
    if len > MAX_BODY_LEN {
        return Err(StreamError::BodyTooLong {
            offset: len_off,
            rtype,
            len,
        });
    }
    let fixed = |expected: u32| {
        if len == expected {
            Ok(State::Body { rtype, len })
        } else {
            Err(StreamError::BadRecordLength {
                offset: len_off,
                rtype,
                len,
                expected,
            })
        }
    };
    match rtype {
        rec_type::END | rec_type::CHECKPOINT | rec_type::VERIFY | rec_type::STATIC_DATA_END => {
            fixed(0)
        }
        rec_type::X86_TSC_INFO => fixed(24),
        rec_type::PAGE_DATA => {
            if len < 16 {
                Err(StreamError::PageDataTooShort {
                    offset: len_off,
                    len,
                })
            } else {
                Ok(State::PageHeader { len })
            }
        }
        rec_type::HVM_PARAMS => {
            if len < 8 || (len - 8) % 16 != 0 {
                Err(StreamError::HvmParamsLength {
                    offset: len_off,
                    len,
                })
            } else {
                Ok(State::Body { rtype, len })
            }
        }
        rec_type::PACKED_PAGES => {
            if len as usize > MAX_PACKED_BODY {
                Err(StreamError::BadPackedPages {
                    offset: len_off,
                    reason: format!("body of {len} bytes, at most {MAX_PACKED_BODY} allowed"),
                })
            } else {
                Ok(State::Packed { len })
            }
        }
        rec_type::CHECKPOINT_DIRTY_PFN_LIST => {
            if len % 8 != 0 {
                Err(StreamError::DirtyPfnListLength {
                    offset: len_off,
                    len,
                })
            } else {
                Ok(State::Body { rtype, len })
            }
        }
        t if t <= rec_type::LAST_KNOWN || t & rec_type::OPTIONAL != 0 => {
            Ok(State::Body { rtype, len })
        }
        _ => Err(StreamError::UnknownMandatory {
            offset: rec_off,
            rtype,
        }),
    }
}

fn check_padding(pad: &[u8], start: u64) -> Result<(), StreamError> {
    match pad.iter().position(|&b| b != 0) {
        Some(i) => Err(StreamError::NonZeroPadding {
            offset: start + i as u64,
            byte: pad[i],
        }),
        None => Ok(()),
    }
}

/// Checks the contents of a body whose length `check_record_header` already accepted.
fn check_body(
    cfg: &DecoderConfig,
    rtype: u32,
    body: &[u8],
    rec_off: u64,
) -> Result<(), StreamError> {
    let b = rec_off + 8;
    match rtype {
        rec_type::X86_TSC_INFO => {
            let reserved = le_u32(body, 20);
            if reserved != 0 {
                return Err(StreamError::ReservedNonZero {
                    offset: b + 20,
                    field: "X86_TSC_INFO reserved field",
                    value: u64::from(reserved),
                });
            }
        }
        rec_type::HVM_PARAMS => {
            let count = le_u32(body, 0);
            let entries = ((body.len() - 8) / 16) as u32;
            if count != entries {
                return Err(StreamError::HvmParamsCount {
                    offset: b,
                    count,
                    entries,
                });
            }
            let reserved = le_u32(body, 4);
            if reserved != 0 {
                return Err(StreamError::ReservedNonZero {
                    offset: b + 4,
                    field: "HVM_PARAMS reserved field",
                    value: u64::from(reserved),
                });
            }
        }
        rec_type::CHECKPOINT_DIRTY_PFN_LIST => {
            if let Some(page_count) = cfg.page_count {
                for (i, c) in body.chunks_exact(8).enumerate() {
                    let pfn = le_u64(c, 0);
                    if pfn >= page_count {
                        return Err(StreamError::PfnOutOfRange {
                            offset: b + 8 * i as u64,
                            pfn,
                            page_count,
                        });
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Checks every PAGE_DATA entry and the exact body length.
fn check_pfns(
    cfg: &DecoderConfig,
    pfns: &[u8],
    count: u32,
    len: u32,
    rec_off: u64,
) -> Result<(), StreamError> {
    let mut data_pages: u32 = 0;
    for (i, c) in pfns.chunks_exact(8).enumerate() {
        let entry = le_u64(c, 0);
        let offset = rec_off + 16 + 8 * i as u64;
        let index = i as u32;
        let bits = entry >> PAGE_TYPE_SHIFT;
        let Some(ty) = PageType::from_bits(bits) else {
            return Err(StreamError::BadPageType {
                offset,
                index,
                page_type: bits as u8,
            });
        };
        if entry & PFN_RESERVED_MASK != 0 {
            return Err(StreamError::ReservedPfnBits {
                offset,
                index,
                entry,
            });
        }
        let pfn = entry & PFN_MASK;
        if let Some(page_count) = cfg.page_count {
            if pfn >= page_count {
                return Err(StreamError::PfnOutOfRange {
                    offset,
                    pfn,
                    page_count,
                });
            }
        }
        if ty.has_data() {
            data_pages += 1;
        }
    }
    let expected = 8 + 8 * u64::from(count) + PAGE_SIZE as u64 * u64::from(data_pages);
    if u64::from(len) != expected {
        return Err(StreamError::PageDataLength {
            offset: rec_off + 4,
            len,
            count,
            data_pages,
            expected,
        });
    }
    Ok(())
}

/// Builds a record from a body that `check_record_header` and `check_body` accepted.
fn make_record(rtype: u32, body: &[u8]) -> Record<'_> {
    match rtype {
        rec_type::END => Record::End,
        rec_type::CHECKPOINT => Record::Checkpoint,
        rec_type::STATIC_DATA_END => Record::StaticDataEnd,
        rec_type::VERIFY => Record::Verify,
        rec_type::X86_TSC_INFO => Record::TscInfo(TscInfo {
            mode: le_u32(body, 0),
            khz: le_u32(body, 4),
            nsec: le_u64(body, 8),
            incarnation: le_u32(body, 16),
        }),
        rec_type::HVM_CONTEXT => Record::HvmContext(body),
        rec_type::HVM_PARAMS => match body.get(8..).and_then(HvmParams::new) {
            Some(p) => Record::HvmParams(p),
            None => Record::OtherXen { rtype, body },
        },
        rec_type::CHECKPOINT_DIRTY_PFN_LIST => match PfnList::new(body) {
            Some(l) => Record::CheckpointDirtyPfnList(l),
            None => Record::OtherXen { rtype, body },
        },
        rec_type::X86_CPUID_POLICY => Record::CpuidPolicy(body),
        rec_type::X86_MSR_POLICY => Record::MsrPolicy(body),
        t if t & rec_type::OPTIONAL != 0 => Record::Optional { rtype, body },
        _ => Record::OtherXen { rtype, body },
    }
}

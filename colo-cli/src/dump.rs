//! `colo stream dump`: reads a whole libxc migration stream and prints its headers, one line per
//! record and a summary (or one JSON object), using colo-core's incremental decoder.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use colo_core::stream::{
    padded_len, rec_type, rec_type_name, Decoder, DecoderConfig, DomainHeader, DomainType, Event,
    ImageHeader, Record, StreamError,
};
use serde::Serialize;

/// Why a dump failed. (Display and Error are written out because colo-cli does not depend on
/// thiserror.)
#[derive(Debug)]
pub enum DumpError {
    /// The stream is malformed (the error names the byte offset and the reason).
    Stream(StreamError),
    /// The stream stops at a record boundary without an END record: Xen's `verify-stream-v2`
    /// calls that truncated (a sender that died, or a checkpointed stream cut off).
    Truncated {
        /// Records read (END excluded, since there is none).
        records: u64,
        /// Where the stream stops, in bytes.
        offset: u64,
    },
    /// Reading the input or writing the output failed.
    Io(io::Error),
}

impl std::fmt::Display for DumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DumpError::Stream(e) => write!(f, "malformed stream: {e}"),
            DumpError::Truncated { records, offset } => write!(
                f,
                "stream truncated: no END record after {records} records, at byte {offset}"
            ),
            DumpError::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for DumpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DumpError::Stream(e) => Some(e),
            DumpError::Truncated { .. } => None,
            DumpError::Io(e) => Some(e),
        }
    }
}

impl From<StreamError> for DumpError {
    fn from(e: StreamError) -> Self {
        DumpError::Stream(e)
    }
}

impl From<io::Error> for DumpError {
    fn from(e: io::Error) -> Self {
        DumpError::Io(e)
    }
}

/// Totals over a dumped stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DumpSummary {
    /// Stream size in bytes.
    pub bytes: u64,
    /// Records, of every type.
    pub records: u64,
    /// Records per type name.
    pub by_type: BTreeMap<String, u64>,
    /// PAGE_DATA entries, over all records.
    pub pages: u64,
    /// PAGE_DATA entries that carried 4096 bytes of data.
    pub data_pages: u64,
    /// CHECKPOINT records.
    pub checkpoints: u64,
    /// Whether the stream ended with an END record (without one [`dump`] reports
    /// [`DumpError::Truncated`] after printing what it read).
    pub ended_with_end: bool,
}

#[derive(Debug, Serialize)]
struct JsonImage {
    version: u32,
    endianness: &'static str,
}

#[derive(Debug, Serialize)]
struct JsonDomain {
    domain_type: &'static str,
    page_shift: u16,
    xen_major: u32,
    xen_minor: u32,
}

/// One record, as printed.
#[derive(Debug, Serialize)]
struct RecordLine {
    offset: u64,
    rtype: u32,
    name: &'static str,
    length: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pfn_min: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pfn_max: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    page_types: BTreeMap<&'static str, u64>,
}

impl RecordLine {
    fn text(&self) -> String {
        let mut s = format!(
            "@{:<10} {} ({:#x}) length {}",
            self.offset, self.name, self.rtype, self.length
        );
        if self.rtype == rec_type::PAGE_DATA {
            let types: Vec<String> = self
                .page_types
                .iter()
                .map(|(t, n)| format!("{t} x{n}"))
                .collect();
            s.push_str(&format!(
                ": count {}, pfns {:#x}..={:#x}, types {}",
                self.count.unwrap_or(0),
                self.pfn_min.unwrap_or(0),
                self.pfn_max.unwrap_or(0),
                types.join(", ")
            ));
        } else if let Some(c) = self.count {
            s.push_str(&format!(": {c} entries"));
        }
        s
    }
}

#[derive(Debug, Serialize)]
struct JsonDump<'a> {
    image_header: Option<JsonImage>,
    domain_header: Option<JsonDomain>,
    records: &'a [RecordLine],
    summary: &'a DumpSummary,
}

fn image_json(h: &ImageHeader) -> JsonImage {
    JsonImage {
        version: h.version,
        endianness: "little",
    }
}

fn domain_json(h: &DomainHeader) -> JsonDomain {
    JsonDomain {
        domain_type: match h.domain_type {
            DomainType::X86Pv => "x86 PV",
            DomainType::X86Hvm => "x86 HVM",
        },
        page_shift: h.page_shift,
        xen_major: h.xen_major,
        xen_minor: h.xen_minor,
    }
}

/// Reads a full stream (with image and domain headers) from `input` and prints it to `out`:
/// text lines as records arrive, or with `json` one JSON object at the end. A malformed
/// stream is [`DumpError::Stream`] with the offset and reason; a stream that stops at a record
/// boundary without an END record is printed in full (summary included) and then reported as
/// [`DumpError::Truncated`], as Xen's `verify-stream-v2` does.
pub fn dump(
    input: &mut dyn Read,
    json: bool,
    out: &mut dyn Write,
) -> Result<DumpSummary, DumpError> {
    let mut dec = Decoder::new(DecoderConfig {
        expect_headers: true,
        page_count: None,
    });
    let mut summary = DumpSummary::default();
    let mut image = None;
    let mut domain = None;
    let mut lines: Vec<RecordLine> = Vec::new();
    let mut page_rec: Option<RecordLine> = None;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let got = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if got == 0 {
            dec.finish()?;
            break;
        }
        let mut chunk = &buf[..got];
        loop {
            let before = dec.offset();
            let (n, ev) = dec.feed(chunk)?;
            chunk = &chunk[n..];
            let end = before + n as u64;
            let Some(ev) = ev else { break };
            let line = match ev {
                Event::ImageHeader(h) => {
                    if !json {
                        writeln!(out, "image header: version {}, little-endian", h.version)?;
                    }
                    image = Some(image_json(&h));
                    None
                }
                Event::DomainHeader(h) => {
                    let d = domain_json(&h);
                    if !json {
                        writeln!(
                            out,
                            "domain header: {}, page_shift {}, Xen {}.{}",
                            d.domain_type, d.page_shift, d.xen_major, d.xen_minor
                        )?;
                    }
                    domain = Some(d);
                    None
                }
                Event::PageDataStart { count } => {
                    let start = end - 16 - 8 * u64::from(count);
                    page_rec = Some(RecordLine {
                        offset: start,
                        rtype: rec_type::PAGE_DATA,
                        name: "PAGE_DATA",
                        length: 0,
                        count: Some(u64::from(count)),
                        pfn_min: None,
                        pfn_max: None,
                        page_types: BTreeMap::new(),
                    });
                    None
                }
                Event::Page {
                    pfn,
                    page_type,
                    data,
                } => {
                    summary.pages += 1;
                    if data.is_some() {
                        summary.data_pages += 1;
                    }
                    if let Some(r) = page_rec.as_mut() {
                        r.pfn_min = Some(r.pfn_min.map_or(pfn, |m| m.min(pfn)));
                        r.pfn_max = Some(r.pfn_max.map_or(pfn, |m| m.max(pfn)));
                        *r.page_types.entry(page_type.name()).or_insert(0) += 1;
                    }
                    None
                }
                Event::PageDataEnd => page_rec.take().map(|mut r| {
                    r.length = end - r.offset - 8;
                    r
                }),
                Event::Record(r) => Some(record_line(&r, end)),
            };
            if let Some(line) = line {
                summary.records += 1;
                *summary.by_type.entry(line.name.to_string()).or_insert(0) += 1;
                if line.rtype == rec_type::CHECKPOINT {
                    summary.checkpoints += 1;
                }
                summary.ended_with_end = line.rtype == rec_type::END;
                if json {
                    lines.push(line);
                } else {
                    writeln!(out, "{}", line.text())?;
                }
            }
        }
    }
    summary.bytes = dec.offset();
    if json {
        let doc = JsonDump {
            image_header: image,
            domain_header: domain,
            records: &lines,
            summary: &summary,
        };
        serde_json::to_writer_pretty(&mut *out, &doc).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        let types: Vec<String> = summary
            .by_type
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        writeln!(
            out,
            "summary: {} bytes, {} records ({}), {} pages ({} with data), {} checkpoints, {}",
            summary.bytes,
            summary.records,
            types.join(", "),
            summary.pages,
            summary.data_pages,
            summary.checkpoints,
            if summary.ended_with_end {
                "ends with END"
            } else {
                "no END record (truncated)"
            }
        )?;
    }
    if !summary.ended_with_end {
        return Err(DumpError::Truncated {
            records: summary.records,
            offset: summary.bytes,
        });
    }
    Ok(summary)
}

fn record_line(r: &Record<'_>, end: u64) -> RecordLine {
    let len = r.body_len();
    let rtype = r.rtype();
    let count = match r {
        Record::HvmParams(p) => Some(p.len() as u64),
        Record::CheckpointDirtyPfnList(l) => Some(l.len() as u64),
        _ => None,
    };
    RecordLine {
        offset: end - 8 - padded_len(len) as u64,
        rtype,
        name: rec_type_name(rtype),
        length: len as u64,
        count,
        pfn_min: None,
        pfn_max: None,
        page_types: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_core::stream::{encode_dirty_pfn_list, encode_page_data_header, encode_tsc_info};
    use colo_core::stream::{PageType, TscInfo, PAGE_SIZE};

    fn stream(end: bool) -> Vec<u8> {
        let mut v = ImageHeader { version: 3 }.encode().to_vec();
        v.extend_from_slice(
            &DomainHeader {
                domain_type: DomainType::X86Hvm,
                page_shift: 12,
                xen_major: 4,
                xen_minor: 17,
            }
            .encode(),
        );
        Record::StaticDataEnd.encode(&mut v);
        encode_page_data_header(&mut v, &[(0x20, PageType::Notab), (0x10, PageType::Xtab)])
            .unwrap();
        v.extend_from_slice(&[1; PAGE_SIZE]);
        encode_tsc_info(
            &mut v,
            &TscInfo {
                mode: 0,
                khz: 1,
                nsec: 2,
                incarnation: 3,
            },
        );
        Record::Checkpoint.encode(&mut v);
        encode_dirty_pfn_list(&mut v, [1u64, 2, 3].into_iter());
        if end {
            Record::End.encode(&mut v);
        }
        v
    }

    #[test]
    fn text_dump_lists_every_record() {
        let s = stream(true);
        let mut out = Vec::new();
        let sum = dump(&mut &s[..], false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(sum.records, 6);
        assert_eq!(sum.pages, 2);
        assert_eq!(sum.data_pages, 1);
        assert_eq!(sum.checkpoints, 1);
        assert_eq!(sum.bytes, s.len() as u64);
        assert!(sum.ended_with_end);
        assert!(text.contains("domain header: x86 HVM, page_shift 12, Xen 4.17"));
        assert!(text.contains(
            "@48         PAGE_DATA (0x1) length 4120: count 2, pfns 0x10..=0x20, types NOTAB x1, XTAB x1"
        ), "{text}");
        assert!(text.contains("CHECKPOINT_DIRTY_PFN_LIST (0xf) length 24: 3 entries"));
        assert!(text.contains("ends with END"));
    }

    #[test]
    fn json_dump_is_one_object() {
        let s = stream(true);
        let mut out = Vec::new();
        let sum = dump(&mut &s[..], true, &mut out).unwrap();
        assert!(sum.ended_with_end);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["image_header"]["version"], 3);
        assert_eq!(v["records"].as_array().unwrap().len(), 6);
        assert_eq!(v["records"][1]["name"], "PAGE_DATA");
        assert_eq!(v["records"][1]["offset"], 48);
        assert_eq!(v["records"][1]["length"], 4120);
        assert_eq!(v["summary"]["pages"], 2);
        assert_eq!(v["summary"]["ended_with_end"], true);
    }

    #[test]
    fn a_stream_without_end_is_truncated_after_printing_it() {
        let s = stream(false);
        let mut out = Vec::new();
        let err = dump(&mut &s[..], false, &mut out).unwrap_err();
        assert!(matches!(
            err,
            DumpError::Truncated {
                records: 5,
                offset
            } if offset == s.len() as u64
        ));
        assert_eq!(
            err.to_string(),
            format!(
                "stream truncated: no END record after 5 records, at byte {}",
                s.len()
            )
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("CHECKPOINT_DIRTY_PFN_LIST"), "{text}");
        assert!(text.contains("no END record (truncated)"), "{text}");
        // JSON: the whole object is still printed, then the error.
        let mut out = Vec::new();
        let err = dump(&mut &s[..], true, &mut out).unwrap_err();
        assert!(matches!(err, DumpError::Truncated { records: 5, .. }));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["summary"]["ended_with_end"], false);
        assert_eq!(v["records"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn malformed_stream_reports_offset_and_reason() {
        let mut s = stream(true);
        s[28] = 13; // page_shift
        let err = dump(&mut &s[..], false, &mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed stream: at byte 28: page_shift 13, only 12 (4 KiB pages) is supported"
        );
        let s = stream(true);
        let err = dump(&mut &s[..s.len() - 3], true, &mut Vec::new()).unwrap_err();
        assert!(matches!(
            err,
            DumpError::Stream(StreamError::Truncated { .. })
        ));
    }
}

//! The vCPU/platform state blob that [`crate::XenDomain`]'s `get_state`/`set_state` exchange:
//! TSC info, the HVM context and the HVM parameters, versioned and little-endian.
//!
//! Layout of version 1 (every integer little-endian; the three parts are the bodies of the
//! libxc stream's X86_TSC_INFO, HVM_CONTEXT and HVM_PARAMS records, so a stream writer can
//! emit them unchanged):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `b"CXST"` |
//! | 4 | 2 | version, 1 |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 24 | TSC info: u32 mode, u32 khz, u64 elapsed_nsec, u32 incarnation, u32 reserved 0 |
//! | 32 | 4 | `ctx_len`: bytes of HVM context (≤ [`MAX_HVM_CONTEXT`]) |
//! | 36 | 4 | reserved, 0 |
//! | 40 | `ctx_len` | HVM context from `xc_domain_hvm_getcontext`, then zeros to a multiple of 8 |
//! | … | 8 | HVM_PARAMS header: u32 count (≤ [`SAVED_HVM_PARAMS`].len()), u32 reserved 0 |
//! | … | 16 × count | {u64 index, u64 value}; every index is one of [`SAVED_HVM_PARAMS`] |
//!
//! Nothing may follow. Decoding checks every length against the bytes present before slicing
//! and never allocates.

use std::ops::Range;

use thiserror::Error;

/// The blob's magic bytes.
pub const STATE_MAGIC: [u8; 4] = *b"CXST";
/// The blob version this crate writes and reads.
pub const STATE_VERSION: u16 = 1;
/// Largest HVM context accepted (Xen's context for 128 vCPUs is well below this).
pub const MAX_HVM_CONTEXT: usize = 16 << 20;

/// The HVM parameters saved and restored, exactly those libxc's x86 HVM saver records
/// (Xen 4.17 `xg_sr_save_x86_hvm.c`); `set_state` refuses any other index.
pub const SAVED_HVM_PARAMS: [u32; 16] = [
    1,  // HVM_PARAM_STORE_PFN
    5,  // HVM_PARAM_IOREQ_PFN
    6,  // HVM_PARAM_BUFIOREQ_PFN
    27, // HVM_PARAM_PAGING_RING_PFN
    28, // HVM_PARAM_MONITOR_RING_PFN
    29, // HVM_PARAM_SHARING_RING_PFN
    37, // HVM_PARAM_VM86_TSS_SIZED
    17, // HVM_PARAM_CONSOLE_PFN
    19, // HVM_PARAM_ACPI_IOPORTS_LOCATION
    9,  // HVM_PARAM_VIRIDIAN
    12, // HVM_PARAM_IDENT_PT
    34, // HVM_PARAM_VM_GENERATION_ID_ADDR
    32, // HVM_PARAM_IOREQ_SERVER_PFN
    33, // HVM_PARAM_NR_IOREQ_SERVER_PAGES
    36, // HVM_PARAM_X87_FIP_WIDTH
    38, // HVM_PARAM_MCA_CAP
];

const HEADER_LEN: usize = 40;
const TSC_LEN: usize = 24;
const PARAM_LEN: usize = 16;

/// Errors decoding a state blob. Each names the offending value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The blob ends before a field it declares.
    #[error("blob truncated: {need} bytes needed for {what}, {got} present")]
    Truncated {
        /// The part being read.
        what: &'static str,
        /// Bytes needed from the start of the blob.
        need: usize,
        /// Bytes in the blob.
        got: usize,
    },
    /// The blob does not start with [`STATE_MAGIC`].
    #[error("bad magic {0:02x?}, expected \"CXST\"")]
    BadMagic([u8; 4]),
    /// A version this crate does not read.
    #[error("state blob version {0} is not supported (this build reads version 1)")]
    Version(u16),
    /// A reserved field is not zero.
    #[error("reserved field {field} is {value:#x}, must be 0")]
    Reserved {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The HVM context is empty or larger than [`MAX_HVM_CONTEXT`].
    #[error("HVM context of {0} bytes is outside 1..={MAX_HVM_CONTEXT}")]
    ContextSize(usize),
    /// More parameters than colo-xen saves.
    #[error("{0} HVM params, at most 16 allowed")]
    TooManyParams(u32),
    /// An HVM parameter colo-xen does not save (setting arbitrary params is refused).
    #[error("HVM param index {0} is not one colo-xen saves")]
    UnknownParam(u64),
    /// Bytes after the last parameter.
    #[error("{0} trailing bytes after the HVM params")]
    Trailing(usize),
}

/// The domain's TSC configuration (`xc_domain_get_tsc_info`), as in X86_TSC_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TscInfo {
    /// TSC mode (0 default, 1 always emulate, 2 never emulate).
    pub mode: u32,
    /// Guest TSC frequency in kHz.
    pub khz: u32,
    /// Nanoseconds of guest time elapsed.
    pub elapsed_nsec: u64,
    /// TSC incarnation (bumped by every restore).
    pub incarnation: u32,
}

/// HVM save record type of a vCPU's local APIC registers (`struct hvm_hw_lapic_regs`, 1024
/// bytes: the APIC register page).
const HVM_SAVE_LAPIC_REGS: u16 = 6;
/// Offset of the interrupt request register (IRR) in the APIC register page: eight 32-bit
/// registers, each in a 16-byte slot, for vectors 0–255.
const APIC_IRR: usize = 0x200;

/// Clears `vector`'s bit in the IRR of every local APIC register record of `ctx` (an HVM
/// context as `xc_domain_hvm_getcontext` returns it: records of a u16 type code, a u16
/// instance, a u32 length, then the body). Returns how many records had it set. A malformed
/// record ends the walk (the hypervisor validates the whole context when it is loaded).
///
/// Why: a replica whose vCPU was halted is woken by Xen only when an interrupt becomes
/// pending in its vLAPIC (`vlapic_set_irq` kicks the vCPU only on an IRR bit going from 0 to
/// 1). A context captured while Xen had raised the event upcall on the paused primary carries
/// that IRR bit set, so the wake delivered after loading it would change nothing and the
/// replica would stay blocked; with the bit cleared, the wake sets it again and kicks.
pub fn clear_pending_vector(ctx: &mut [u8], vector: u8) -> usize {
    let byte = APIC_IRR + usize::from(vector / 32) * 0x10 + usize::from(vector % 32) / 8;
    let mask = 1u8 << (vector % 8);
    let mut cleared = 0;
    let mut at = 0;
    while let Some(Ok((code, _, body))) = record_at(ctx, at) {
        if code == 0 {
            break;
        }
        at = body.end;
        if code == HVM_SAVE_LAPIC_REGS && body.len() > byte {
            let b = &mut ctx[body.start + byte];
            if *b & mask != 0 {
                *b &= !mask;
                cleared += 1;
            }
        }
    }
    cleared
}

/// Byte ranges of HVM save records that a running clock moves, by record type code: the
/// vCPU's `tsc` (`struct hvm_hw_cpu`, type 2: the guest's rdtsc at the save), the local APIC
/// timer's current count (type 6, APIC register 0x390), the HPET main counter (type 12,
/// `mc64`) and the ACPI PM timer (type 13, `tmr_val`).
const CLOCK_FIELDS: [(u16, usize, usize); 4] = [
    (2, 1008, 1016),
    (6, 0x390, 0x394),
    (12, 240, 248),
    (13, 0, 4),
];

/// Names of the HVM save record types, for messages.
fn record_name(code: u16) -> &'static str {
    match code {
        0 => "END",
        1 => "HEADER",
        2 => "CPU",
        3 => "PIC",
        4 => "IOAPIC",
        5 => "LAPIC",
        6 => "LAPIC_REGS",
        7 => "PCI_IRQ",
        8 => "ISA_IRQ",
        9 => "PCI_LINK",
        10 => "PIT",
        11 => "RTC",
        12 => "HPET",
        13 => "PMTIMER",
        14 => "MTRR",
        15 => "VIRIDIAN_DOMAIN",
        16 => "CPU_XSAVE",
        17 => "VIRIDIAN_VCPU",
        18 => "VMCE_VCPU",
        19 => "TSC_ADJUST",
        20 => "CPU_MSR",
        _ => "record",
    }
}

/// A record's type code, instance and the byte range of its body in the context.
type RecordSpan = (u16, u16, Range<usize>);

/// The record of an HVM context (as `xc_domain_hvm_getcontext` returns it: a u16 type code, a
/// u16 instance, a u32 length, then the body) that starts at byte `at`: `(type code,
/// instance, the body's byte range)`; `None` at the end, an error naming a record cut short.
fn record_at(ctx: &[u8], at: usize) -> Option<Result<RecordSpan, String>> {
    if at >= ctx.len() {
        return None;
    }
    if at + 8 > ctx.len() {
        return Some(Err(format!("a record header cut short at byte {at}")));
    }
    let (code, inst) = (u16_at(ctx, at), u16_at(ctx, at + 2));
    let len = u32_at(ctx, at + 4) as usize;
    let body = at + 8;
    Some(match body.checked_add(len).filter(|&e| e <= ctx.len()) {
        Some(end) => Ok((code, inst, body..end)),
        None => Err(format!(
            "record {} #{inst} of {len} bytes runs past the context",
            record_name(code)
        )),
    })
}

/// Every record of an HVM context: type code, instance, body (see [`record_at`]); a record
/// cut short is the last item, an error.
pub fn records(ctx: &[u8]) -> impl Iterator<Item = Result<(u16, u16, &[u8]), String>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let r = record_at(ctx, at)?;
        at = r.as_ref().map_or(ctx.len(), |(_, _, body)| body.end);
        Some(r.map(|(code, inst, body)| (code, inst, &ctx[body])))
    })
}

/// Compares two state blobs as vCPU and platform state, leaving out what a running clock moves
/// even while the domain is paused (Xen computes it at every save): the TSC info's elapsed
/// nanoseconds and incarnation (a restore bumps it) and the record fields in
/// [`CLOCK_FIELDS`]. Every other byte must be equal: the same records in the same order, the
/// same parameters. Returns `None` when they are the same, otherwise what differs first.
pub fn clock_free_difference(a: &[u8], b: &[u8]) -> Option<String> {
    let sa = match XenState::decode(a) {
        Ok(s) => s,
        Err(e) => return Some(format!("the first blob does not decode: {e}")),
    };
    let sb = match XenState::decode(b) {
        Ok(s) => s,
        Err(e) => return Some(format!("the second blob does not decode: {e}")),
    };
    if (sa.tsc.mode, sa.tsc.khz) != (sb.tsc.mode, sb.tsc.khz) {
        return Some(format!(
            "TSC mode/kHz {}/{} against {}/{}",
            sa.tsc.mode, sa.tsc.khz, sb.tsc.mode, sb.tsc.khz
        ));
    }
    if sa.params != sb.params {
        return Some("the HVM parameters differ".into());
    }
    let mut ra = records(sa.hvm_context);
    let mut rb = records(sb.hvm_context);
    loop {
        let (x, y) = match (ra.next(), rb.next()) {
            (None, None) => return None,
            (Some(Err(e)), _) | (_, Some(Err(e))) => return Some(e),
            (Some(Ok(x)), Some(Ok(y))) => (x, y),
            (Some(Ok((c, i, _))), None) | (None, Some(Ok((c, i, _)))) => {
                return Some(format!(
                    "record {} #{i} is in one context only",
                    record_name(c)
                ))
            }
        };
        let ((ca, ia, ba), (cb, ib, bb)) = (x, y);
        if (ca, ia, ba.len()) != (cb, ib, bb.len()) {
            return Some(format!(
                "record {} #{ia} ({} bytes) against {} #{ib} ({} bytes)",
                record_name(ca),
                ba.len(),
                record_name(cb),
                bb.len()
            ));
        }
        let differing = (0..ba.len()).filter(|&k| {
            ba[k] != bb[k]
                && !CLOCK_FIELDS
                    .iter()
                    .any(|&(code, from, to)| code == ca && (from..to).contains(&k))
        });
        let (mut first, mut count) = (None, 0);
        for k in differing {
            first.get_or_insert(k);
            count += 1;
        }
        if let Some(first) = first {
            return Some(format!(
                "record {} #{ia}: {count} bytes differ outside the clock, the first at offset {first:#x}",
                record_name(ca)
            ));
        }
    }
}

/// A decoded state blob, borrowing from the bytes it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XenState<'a> {
    /// TSC configuration.
    pub tsc: TscInfo,
    /// The opaque HVM context (vCPU registers, LAPIC, platform timers, …).
    pub hvm_context: &'a [u8],
    params: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

fn need(what: &'static str, need: usize, blob: &[u8]) -> Result<(), StateError> {
    if blob.len() < need {
        return Err(StateError::Truncated {
            what,
            need,
            got: blob.len(),
        });
    }
    Ok(())
}

impl<'a> XenState<'a> {
    /// Decodes and fully validates a blob; every index read is bounds-checked first.
    pub fn decode(blob: &'a [u8]) -> Result<Self, StateError> {
        need("header", HEADER_LEN, blob)?;
        let magic = [blob[0], blob[1], blob[2], blob[3]];
        if magic != STATE_MAGIC {
            return Err(StateError::BadMagic(magic));
        }
        let version = u16_at(blob, 4);
        if version != STATE_VERSION {
            return Err(StateError::Version(version));
        }
        for (field, value) in [
            ("header.reserved", u64::from(u16_at(blob, 6))),
            ("tsc.reserved", u64::from(u32_at(blob, 8 + 20))),
            ("context.reserved", u64::from(u32_at(blob, 36))),
        ] {
            if value != 0 {
                return Err(StateError::Reserved { field, value });
            }
        }
        let tsc = TscInfo {
            mode: u32_at(blob, 8),
            khz: u32_at(blob, 12),
            elapsed_nsec: u64_at(blob, 16),
            incarnation: u32_at(blob, 24),
        };
        let ctx_len = u32_at(blob, 32) as usize;
        if ctx_len == 0 || ctx_len > MAX_HVM_CONTEXT {
            return Err(StateError::ContextSize(ctx_len));
        }
        let ctx_end = HEADER_LEN + ctx_len;
        let padded_end = HEADER_LEN + ctx_len.next_multiple_of(8);
        need("HVM context", padded_end, blob)?;
        if let Some(&nz) = blob[ctx_end..padded_end].iter().find(|&&b| b != 0) {
            return Err(StateError::Reserved {
                field: "context padding",
                value: u64::from(nz),
            });
        }
        let hvm_context = &blob[HEADER_LEN..ctx_end];
        need("HVM params header", padded_end + 8, blob)?;
        let count = u32_at(blob, padded_end);
        let reserved = u32_at(blob, padded_end + 4);
        if reserved != 0 {
            return Err(StateError::Reserved {
                field: "params.reserved",
                value: u64::from(reserved),
            });
        }
        if count as usize > SAVED_HVM_PARAMS.len() {
            return Err(StateError::TooManyParams(count));
        }
        let params_start = padded_end + 8;
        let params_end = params_start + count as usize * PARAM_LEN;
        need("HVM params", params_end, blob)?;
        if blob.len() > params_end {
            return Err(StateError::Trailing(blob.len() - params_end));
        }
        let params = &blob[params_start..params_end];
        for p in params.chunks_exact(PARAM_LEN) {
            let index = u64_at(p, 0);
            if !SAVED_HVM_PARAMS.iter().any(|&k| u64::from(k) == index) {
                return Err(StateError::UnknownParam(index));
            }
        }
        Ok(XenState {
            tsc,
            hvm_context,
            params,
        })
    }

    /// The HVM parameters as `(index, value)`; every index is one of [`SAVED_HVM_PARAMS`].
    pub fn params(&self) -> impl Iterator<Item = (u32, u64)> + 'a {
        // Indexes were validated against SAVED_HVM_PARAMS (all < 2^32) by `decode`.
        self.params
            .chunks_exact(PARAM_LEN)
            .map(|p| (u64_at(p, 0) as u32, u64_at(p, 8)))
    }

    /// The body of the libxc stream's HVM_PARAMS record for these parameters.
    pub fn hvm_params_record(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&((self.params.len() / PARAM_LEN) as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(self.params);
    }
}

/// Appends a version-1 blob to `out`. Fails if the context is empty or too large, if there
/// are too many params, or if one is not in [`SAVED_HVM_PARAMS`], exactly as
/// [`XenState::decode`] would.
pub fn encode_state(
    out: &mut Vec<u8>,
    tsc: &TscInfo,
    hvm_context: &[u8],
    params: &[(u32, u64)],
) -> Result<(), StateError> {
    if hvm_context.is_empty() || hvm_context.len() > MAX_HVM_CONTEXT {
        return Err(StateError::ContextSize(hvm_context.len()));
    }
    if params.len() > SAVED_HVM_PARAMS.len() {
        return Err(StateError::TooManyParams(params.len() as u32));
    }
    if let Some(&(bad, _)) = params.iter().find(|(i, _)| !SAVED_HVM_PARAMS.contains(i)) {
        return Err(StateError::UnknownParam(u64::from(bad)));
    }
    let padded = hvm_context.len().next_multiple_of(8);
    out.reserve(HEADER_LEN + padded + 8 + params.len() * PARAM_LEN);
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    let tsc_start = out.len();
    out.extend_from_slice(&tsc.mode.to_le_bytes());
    out.extend_from_slice(&tsc.khz.to_le_bytes());
    out.extend_from_slice(&tsc.elapsed_nsec.to_le_bytes());
    out.extend_from_slice(&tsc.incarnation.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    debug_assert_eq!(out.len() - tsc_start, TSC_LEN);
    out.extend_from_slice(&(hvm_context.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(hvm_context);
    out.resize(out.len() + (padded - hvm_context.len()), 0);
    out.extend_from_slice(&(params.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for &(index, value) in params {
        out.extend_from_slice(&u64::from(index).to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    /// An HVM context: a CPU record, a LAPIC_REGS record per vCPU, the END record.
    fn context(irr_byte: usize, bits: u8) -> Vec<u8> {
        let mut ctx = Vec::new();
        let mut record = |code: u16, inst: u16, body: &[u8]| {
            ctx.extend_from_slice(&code.to_le_bytes());
            ctx.extend_from_slice(&inst.to_le_bytes());
            ctx.extend_from_slice(&(body.len() as u32).to_le_bytes());
            ctx.extend_from_slice(body);
        };
        record(2, 0, &[0xff; 1024]);
        for vcpu in 0..2 {
            let mut regs = [0u8; 1024];
            regs[irr_byte] = bits;
            record(HVM_SAVE_LAPIC_REGS, vcpu, &regs);
        }
        record(0, 0, &[]);
        ctx
    }

    #[test]
    fn the_upcall_vector_is_cleared_from_every_vlapic_irr_and_nothing_else() {
        // Vector 0xf3: IRR register 7 (0x270), byte 2 of it (bits 16–23), bit 3.
        let mut ctx = context(0x272, 0b1000_1001);
        let before = ctx.clone();
        assert_eq!(clear_pending_vector(&mut ctx, 0xf3), 2);
        let changed: Vec<usize> = (0..ctx.len()).filter(|&i| ctx[i] != before[i]).collect();
        assert_eq!(changed.len(), 2, "{changed:?}");
        for i in changed {
            assert_eq!(ctx[i], 0b1000_0001);
        }
        // Already clear: nothing to do; the CPU record's 0xff bytes are never touched.
        assert_eq!(clear_pending_vector(&mut ctx, 0xf3), 0);
        let mut other = context(0x272, 0b0000_0001);
        assert_eq!(clear_pending_vector(&mut other, 0xf3), 0);
    }

    #[test]
    fn a_malformed_context_ends_the_walk_without_panicking() {
        let mut ctx = context(0x272, 0xff);
        // A record claiming more bytes than remain.
        ctx[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(clear_pending_vector(&mut ctx, 0xf3), 0);
        assert_eq!(clear_pending_vector(&mut [1, 2, 3], 0xf3), 0);
        let mut short = context(0x272, 0xff);
        short.truncate(1500);
        clear_pending_vector(&mut short, 0xf3);
    }

    use super::*;
    use proptest::prelude::*;

    fn blob(tsc: TscInfo, ctx: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_state(&mut v, &tsc, ctx, &[(1, 0xfeffc)])
            .map(|()| v)
            .unwrap_or_default()
    }

    #[test]
    fn the_clock_is_left_out_of_a_state_comparison_and_nothing_else() {
        let tsc = TscInfo {
            mode: 2,
            khz: 2_000_000,
            elapsed_nsec: 5,
            incarnation: 1,
        };
        let base = context(0, 0);
        let a = blob(tsc, &base);
        assert_eq!(clock_free_difference(&a, &a), None);
        // The TSC's elapsed time and incarnation, the vCPU's tsc, the APIC timer's count.
        let later = TscInfo {
            elapsed_nsec: 9_000,
            incarnation: 2,
            ..tsc
        };
        let mut moved = base.clone();
        moved[8 + 1008..8 + 1016].copy_from_slice(&[7; 8]);
        let lapic0 = 8 + 1024 + 8;
        moved[lapic0 + 0x390] = 0x55;
        assert_eq!(clock_free_difference(&a, &blob(later, &moved)), None);
        // Anything else is named: a register beside the tsc, an IRR bit, the TSC frequency.
        let mut rip = base.clone();
        rip[8 + 512 + 16 * 8] ^= 1;
        let d = clock_free_difference(&a, &blob(tsc, &rip)).unwrap_or_default();
        assert!(d.contains("CPU #0") && d.contains("0x280"), "{d}");
        let irr = blob(tsc, &context(APIC_IRR + 0x10, 1));
        let d = clock_free_difference(&a, &irr).unwrap_or_default();
        assert!(d.contains("LAPIC_REGS #0: 1 bytes"), "{d}");
        let khz = TscInfo { khz: 1, ..tsc };
        assert!(clock_free_difference(&a, &blob(khz, &base)).is_some());
        // Records missing, reordered or cut short, and blobs that do not decode.
        let short = blob(tsc, &base[..base.len() - 8]);
        assert!(clock_free_difference(&a, &short)
            .unwrap_or_default()
            .contains("in one context only"));
        let mut cut = base.clone();
        cut[4..8].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(clock_free_difference(&a, &blob(tsc, &cut))
            .unwrap_or_default()
            .contains("runs past"));
        assert!(clock_free_difference(&a, b"garbage").is_some());
    }

    fn sample() -> Vec<u8> {
        let mut v = Vec::new();
        let tsc = TscInfo {
            mode: 1,
            khz: 2_000_000,
            elapsed_nsec: 0x1122_3344_5566_7788,
            incarnation: 7,
        };
        encode_state(
            &mut v,
            &tsc,
            &[1, 2, 3, 4, 5],
            &[(1, 0xfeffc), (17, 0xfeff9)],
        )
        .map(|()| v)
        .unwrap_or_default()
    }

    #[test]
    fn round_trip_and_layout() {
        let blob = sample();
        // 40 header + 8 padded context + 8 params header + 2 × 16.
        assert_eq!(blob.len(), 40 + 8 + 8 + 32);
        assert_eq!(&blob[0..4], b"CXST");
        let s = XenState::decode(&blob).expect("decodes");
        assert_eq!(s.tsc.elapsed_nsec, 0x1122_3344_5566_7788);
        assert_eq!(s.tsc.incarnation, 7);
        assert_eq!(s.hvm_context, &[1, 2, 3, 4, 5]);
        assert_eq!(
            s.params().collect::<Vec<_>>(),
            vec![(1, 0xfeffc), (17, 0xfeff9)]
        );
        let mut rec = Vec::new();
        s.hvm_params_record(&mut rec);
        assert_eq!(rec.len(), 8 + 32);
        assert_eq!(&rec[0..8], &[2, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_malformed_blobs() {
        let good = sample();
        assert!(matches!(
            XenState::decode(&good[..good.len() - 1]),
            Err(StateError::Truncated { .. })
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(XenState::decode(&trailing), Err(StateError::Trailing(1)));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(
            XenState::decode(&magic),
            Err(StateError::BadMagic(_))
        ));
        let mut version = good.clone();
        version[4] = 2;
        assert_eq!(XenState::decode(&version), Err(StateError::Version(2)));
        // Param index 0 (CALLBACK_IRQ) is not one colo-xen restores.
        let mut unknown = good.clone();
        let first_param = 40 + 8 + 8;
        unknown[first_param] = 0;
        assert_eq!(XenState::decode(&unknown), Err(StateError::UnknownParam(0)));
        // A huge declared context length fails on size, before any slicing.
        let mut huge = good.clone();
        huge[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            XenState::decode(&huge),
            Err(StateError::ContextSize(_))
        ));
        let mut count = good.clone();
        count[48..52].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            XenState::decode(&count),
            Err(StateError::TooManyParams(1000))
        );
        let mut pad = good;
        pad[40 + 6] = 9;
        assert!(matches!(
            XenState::decode(&pad),
            Err(StateError::Reserved { .. })
        ));
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        let mut v = Vec::new();
        let tsc = TscInfo::default();
        assert_eq!(
            encode_state(&mut v, &tsc, &[], &[]),
            Err(StateError::ContextSize(0))
        );
        assert_eq!(
            encode_state(&mut v, &tsc, &[1], &[(0, 1)]),
            Err(StateError::UnknownParam(0))
        );
        assert!(v.is_empty());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = XenState::decode(&bytes);
        }

        #[test]
        fn round_trips(ctx in proptest::collection::vec(any::<u8>(), 1..100),
                       vals in proptest::collection::vec(any::<u64>(), 0..16),
                       mode in any::<u32>(), nsec in any::<u64>()) {
            let params: Vec<(u32, u64)> =
                SAVED_HVM_PARAMS.iter().copied().zip(vals.iter().copied()).collect();
            let tsc = TscInfo { mode, khz: 1, elapsed_nsec: nsec, incarnation: 3 };
            let mut blob = Vec::new();
            encode_state(&mut blob, &tsc, &ctx, &params).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let s = XenState::decode(&blob).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(s.tsc, tsc);
            prop_assert_eq!(s.hvm_context, &ctx[..]);
            prop_assert_eq!(s.params().collect::<Vec<_>>(), params);
        }
    }
}

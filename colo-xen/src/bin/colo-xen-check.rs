//! colo-xen-check: exercises colo-xen's `XenDomain` on live Xen domains from dom0 — the
//! real-hypervisor half of `cargo xtask xen-test` (which runs it inside a Xen-in-QEMU dom0).
//!
//! ```text
//! colo-xen-check info      --domid N
//! colo-xen-check selftest  --domid N [--vector 243]  every Domain method on a running guest
//! colo-xen-check digest    --domid N            xxh3 of every mappable page
//! colo-xen-check replicate --primary A --secondary B [--checkpoints 20] [--interval-ms 1000]
//!                          [--leave-paused] [--vector 243]  COLO checkpoints A → B in-process,
//!                                               each verified
//! colo-xen-check wake      --domid N [--vector 243]  deliver the upcall vector, unpause
//! colo-xen-check same      --primary A --secondary B    two paused domains: every pfn's
//!                                               contents and the vCPU registers identical
//! colo-xen-check logdirty  --domid N [--seconds 120] [--interval-ms 20] [--cycle 25]
//!                          [--pause]            log-dirty alone on a running guest (no
//!                                               page or state written; --pause: each
//!                                               harvest in a pause): does it survive?
//! ```
//! colo-xen-check netif     --domid N [--seconds 60] [--pings 10] [--burst 200]  plug a PV vif served by
//!                                               colo (`colo_xen::pvnet`) into a running
//!                                               guest whose init configures 10.99.0.2 on it;
//!                                               ARP and ICMP echo through the rings
//! colo-xen-check kv        --addr IP:PORT --stop-file F [--progress F] [--timeout 60]
//!                          [--new-every 5]      a client of the guest agent's key-value
//!                                               store: one long-lived TCP connection plus a
//!                                               new one every few requests, until F exists;
//!                                               then every acknowledged write must read back
//!                          [--acked F]          and append each acknowledged PUT to F
//!                                               (`key value` lines, in order)
//!                          [--latencies F]      and each answer's time to F (`PUT|GET ms`,
//!                                               a line per request)
//! colo-xen-check dsync     --file F [--count 200]  4 KiB O_DSYNC writes into F (the disk
//!                                               speed beside which a guest's writes are
//!                                               priced): p50 and p90
//! colo-xen-check disk      --image IMG [--expect F] [--all]  the guest agent's kv records
//!                                               on a disk image (offline): the first 20
//!                                               printed (--all: each); with F (as
//!                                               kv --acked writes it) every acknowledged
//!                                               write must be on the image
//! Output lines start with `check:`; the last is `check: OK …` or the error (exit status 1).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use colo_core::{BackendError, DirtyBitmap, Domain, PAGE_SIZE};
use colo_xen::{XenDomain, XenError, XenState};

#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("usage: {0}")]
    Usage(String),
    #[error(transparent)]
    Xen(#[from] XenError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Vif(#[from] colo_xen::pvnet::PvVifError),
    #[error("check failed: {0}")]
    Failed(String),
}

type Result<T> = std::result::Result<T, CheckError>;

fn fail<T>(msg: impl Into<String>) -> Result<T> {
    Err(CheckError::Failed(msg.into()))
}

struct Args {
    cmd: String,
    opts: Vec<(String, Option<String>)>,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut it = std::env::args().skip(1);
        let cmd = it
            .next()
            .ok_or_else(|| CheckError::Usage("colo-xen-check <command> [options]".into()))?;
        let mut opts = Vec::new();
        let rest: Vec<String> = it.collect();
        let mut i = 0;
        while i < rest.len() {
            let k = rest[i].clone();
            if !k.starts_with("--") {
                return Err(CheckError::Usage(format!("unexpected argument `{k}`")));
            }
            match rest.get(i + 1) {
                Some(v) if !v.starts_with("--") => {
                    opts.push((k, Some(v.clone())));
                    i += 2;
                }
                _ => {
                    opts.push((k, None));
                    i += 1;
                }
            }
        }
        Ok(Args { cmd, opts })
    }

    fn num(&self, key: &str, default: Option<u64>) -> Result<u64> {
        match self.opts.iter().find(|(k, _)| k == key) {
            Some((_, Some(v))) => v
                .parse()
                .map_err(|_| CheckError::Usage(format!("{key}: `{v}` is not a number"))),
            Some((_, None)) => Err(CheckError::Usage(format!("{key} needs a value"))),
            None => default.ok_or_else(|| CheckError::Usage(format!("{key} is required"))),
        }
    }

    fn flag(&self, key: &str) -> bool {
        self.opts.iter().any(|(k, v)| k == key && v.is_none())
    }

    fn domid(&self, key: &str) -> Result<u32> {
        let v = self.num(key, None)?;
        u32::try_from(v).map_err(|_| CheckError::Usage(format!("{key}: {v} is not a domid")))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Every pfn of `dom` that maps, found by trying them all.
fn mappable_pfns(dom: &mut XenDomain) -> Result<Vec<u64>> {
    let all: Vec<u64> = (0..dom.page_count()).collect();
    let mut out = Vec::new();
    dom.read_pages(&all, &mut |i, page| {
        if page.is_some() {
            out.push(all[i]);
        }
        Ok(())
    })?;
    Ok(out)
}

/// One xxh3 per page of `pfns` (0 for an unmappable page) and their combined digest.
fn page_hashes(dom: &mut XenDomain, pfns: &[u64], out: &mut Vec<u64>) -> Result<u64> {
    out.clear();
    out.resize(pfns.len(), 0);
    dom.read_pages(pfns, &mut |i, page| {
        if let Some(p) = page {
            out[i] = xxhash_rust::xxh3::xxh3_64_with_seed(p, pfns[i]);
        }
        Ok(())
    })?;
    let mut bytes = Vec::with_capacity(out.len() * 8);
    for h in out.iter() {
        bytes.extend_from_slice(&h.to_le_bytes());
    }
    Ok(xxhash_rust::xxh3::xxh3_64(&bytes))
}

/// The vCPU register part (FPU area, GPRs, rip, rflags, cr0/2/3/4) of every CPU record
/// (typecode 2) of an HVM context, by vCPU instance.
fn cpu_registers(ctx: &[u8]) -> Vec<(u16, &[u8])> {
    const CPU: u16 = 2;
    const REGS: usize = 512 + 22 * 8;
    colo_xen::state::records(ctx)
        .map_while(std::result::Result::ok)
        .take_while(|&(code, _, _)| code != 0)
        .filter(|&(code, _, body)| code == CPU && body.len() >= REGS)
        .map(|(_, inst, body)| (inst, &body[..REGS]))
        .collect()
}

const REG_NAMES: [&str; 22] = [
    "rax", "rbx", "rcx", "rdx", "rbp", "rsi", "rdi", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "rflags", "cr0", "cr2", "cr3", "cr4",
];

fn reg(regs: &[u8], name: &str) -> u64 {
    let k = REG_NAMES.iter().position(|n| *n == name).unwrap_or(0);
    let at = 512 + 8 * k;
    let mut a = [0u8; 8];
    a.copy_from_slice(&regs[at..at + 8]);
    u64::from_le_bytes(a)
}

fn compare_vcpus(a: &[u8], b: &[u8]) -> Result<usize> {
    let sa = XenState::decode(a).map_err(XenError::from)?;
    let sb = XenState::decode(b).map_err(XenError::from)?;
    let ra = cpu_registers(sa.hvm_context);
    let rb = cpu_registers(sb.hvm_context);
    if ra.is_empty() || ra.len() != rb.len() {
        return fail(format!(
            "vCPU records: primary {}, secondary {}",
            ra.len(),
            rb.len()
        ));
    }
    for ((ia, x), (ib, y)) in ra.iter().zip(&rb) {
        if ia != ib {
            return fail(format!("vCPU instance {ia} vs {ib}"));
        }
        if x[..512] != y[..512] {
            return fail(format!("vCPU {ia}: FPU state differs"));
        }
        for name in REG_NAMES {
            if reg(x, name) != reg(y, name) {
                return fail(format!(
                    "vCPU {ia}: {name} {:#x} on the primary, {:#x} on the secondary",
                    reg(x, name),
                    reg(y, name)
                ));
            }
        }
    }
    Ok(ra.len())
}

fn info(args: &Args) -> Result<()> {
    let mut dom = XenDomain::open(args.domid("--domid")?)?;
    let i = dom.info()?;
    println!(
        "check: domain {} pages {} flags {:#x} vcpus {} tot_pages {} paused {}",
        i.domid,
        dom.page_count(),
        i.flags,
        i.max_vcpu_id + 1,
        i.tot_pages,
        dom.is_paused()
    );
    Ok(())
}

/// Takes over a replica left paused at a checkpoint: delivers the guest's upcall vector to
/// every vCPU (see `XenDomain::wake`) and unpauses it.
fn wake(args: &Args) -> Result<()> {
    let mut dom = XenDomain::open(args.domid("--domid")?)?;
    dom.set_wake_vector(Some(upcall_vector(args)?));
    let delivered = dom.wake()?;
    dom.resume()?;
    println!(
        "check: OK wake domain {}: upcall vector {}delivered, unpaused",
        dom.domid(),
        if delivered { "" } else { "not " }
    );
    Ok(())
}

fn digest(args: &Args) -> Result<()> {
    let mut dom = XenDomain::open(args.domid("--domid")?)?;
    let t = Instant::now();
    let pfns = mappable_pfns(&mut dom)?;
    let mut h = Vec::new();
    let d = page_hashes(&mut dom, &pfns, &mut h)?;
    println!(
        "check: OK digest {d:016x} over {} mappable of {} pfns in {:.1} ms",
        pfns.len(),
        dom.page_count(),
        ms(t.elapsed())
    );
    Ok(())
}

/// Log-dirty alone on a running guest, as a replica's Xen sees it between checkpoints, with
/// nothing written into the guest: the log is turned on, harvested (Xen's CLEAN, which makes
/// every page read-only again, so the guest's next write to it is a nested page fault) every
/// `--interval-ms`, and turned off and on again every `--cycle` harvests, for `--seconds`.
/// Fails, naming when, if the domain shuts down (a triple fault) or goes away meanwhile: a
/// guest lost here was lost to the hypervisor (or its emulation), not to anything colo wrote.
fn logdirty(args: &Args) -> Result<()> {
    let domid = args.domid("--domid")?;
    let seconds = args.num("--seconds", Some(120))?;
    let interval = Duration::from_millis(args.num("--interval-ms", Some(20))?.max(1));
    let cycle = args.num("--cycle", Some(25))?.max(1);
    let pause = args.flag("--pause");
    let mut dom = XenDomain::open(domid)?;
    if dom.is_paused() {
        dom.resume()?;
    }
    let mut bits = DirtyBitmap::new(dom.page_count());
    let (mut harvests, mut toggles, mut pages) = (0u64, 0u64, 0u64);
    let t0 = Instant::now();
    let alive = |dom: &mut XenDomain, harvests: u64| -> Result<()> {
        let gone = match dom.info() {
            Ok(i) if i.flags & colo_xen::dominf::SHUTDOWN != 0 => {
                Some(format!("shut down (flags {:#x})", i.flags))
            }
            Ok(i) if i.flags & colo_xen::dominf::DYING != 0 => Some("dying".to_string()),
            Ok(_) => None,
            Err(e) => Some(format!("gone ({e})")),
        };
        match gone {
            Some(what) => fail(format!(
                "domain {domid} {what} after {:.1} s of log-dirty alone ({harvests} harvests)",
                t0.elapsed().as_secs_f64()
            )),
            None => Ok(()),
        }
    };
    while t0.elapsed() < Duration::from_secs(seconds) {
        dom.start_dirty_log()?;
        toggles += 1;
        for _ in 0..cycle {
            std::thread::sleep(interval);
            bits.clear_all();
            // --pause: each harvest in a pause, as a replica's checkpoint does.
            if pause {
                dom.pause()?;
            }
            let res = dom.harvest_dirty(&mut bits);
            if pause {
                dom.resume()?;
            }
            if let Err(e) = res {
                alive(&mut dom, harvests)?;
                return Err(e.into());
            }
            harvests += 1;
            pages += bits.count();
            alive(&mut dom, harvests)?;
        }
        dom.stop_dirty_log()?;
    }
    println!(
        "check: OK logdirty on domain {domid}: {:.1} s, {harvests} harvests{}, {toggles} times turned on, {pages} pages dirtied",
        t0.elapsed().as_secs_f64(),
        if pause { " each in a pause" } else { "" }
    );
    Ok(())
}

fn selftest(args: &Args) -> Result<()> {
    let domid = args.domid("--domid")?;
    let t = Instant::now();
    let mut dom = XenDomain::open(domid)?;
    // Loaded state is resumed as colo's nodes resume it: with the upcall vector delivered.
    dom.set_wake_vector(Some(upcall_vector(args)?));
    let pages = dom.page_count();
    println!(
        "check: open domain {domid}: {pages} pfns in {:.2} ms; HVM_PARAM_CALLBACK_IRQ {:#x}",
        ms(t.elapsed()),
        dom.hvm_param(0)?
    );
    if dom.is_paused() {
        dom.resume()?;
    }

    let t = Instant::now();
    dom.start_dirty_log()?;
    println!("check: start_dirty_log {:.2} ms", ms(t.elapsed()));
    std::thread::sleep(Duration::from_millis(1500));
    let mut peek = DirtyBitmap::new(pages);
    let t = Instant::now();
    dom.peek_dirty(&mut peek)?;
    println!(
        "check: peek_dirty {:.2} ms: {} dirty",
        ms(t.elapsed()),
        peek.count()
    );
    let mut harvest = DirtyBitmap::new(pages);
    let t = Instant::now();
    dom.harvest_dirty(&mut harvest)?;
    println!(
        "check: harvest_dirty {:.2} ms: {} dirty",
        ms(t.elapsed()),
        harvest.count()
    );
    if peek.count() == 0 || harvest.count() < peek.count() {
        return fail(format!(
            "a running guest dirtied {} pages by peek, {} by harvest",
            peek.count(),
            harvest.count()
        ));
    }
    let mut missing = peek.clone();
    missing.difference_with(&harvest).map_err(XenError::from)?;
    if missing.count() != 0 {
        return fail(format!(
            "{} peeked pages missing from the harvest",
            missing.count()
        ));
    }

    let t = Instant::now();
    dom.pause()?;
    let pause_ms = ms(t.elapsed());
    if dom.info()?.flags & colo_xen::dominf::PAUSED == 0 {
        return fail("Xen does not report the domain paused");
    }
    harvest.clear_all();
    dom.harvest_dirty(&mut harvest)?;
    harvest.clear_all();
    dom.harvest_dirty(&mut harvest)?;
    if harvest.count() != 0 {
        return fail(format!("a paused guest dirtied {} pages", harvest.count()));
    }
    println!("check: pause {pause_ms:.2} ms; paused guest dirties nothing");

    let t = Instant::now();
    let pfns = mappable_pfns(&mut dom)?;
    let tot = dom.info()?.tot_pages;
    println!(
        "check: read_pages over all {pages} pfns {:.1} ms: {} mappable (Xen: {tot} allocated)",
        ms(t.elapsed()),
        pfns.len()
    );
    // Xen's own pages in the guest's physmap (shared info, grant frames) map too, but are
    // not counted in tot_pages.
    if pfns.len() as u64 * 2 < tot || pfns.len() as u64 > tot + 256 {
        return fail(format!("{} mappable pfns, {tot} allocated", pfns.len()));
    }
    let mut h1 = Vec::new();
    let t = Instant::now();
    let d1 = page_hashes(&mut dom, &pfns, &mut h1)?;
    println!(
        "check: digest of {} pages {:.1} ms ({:.0} MB/s)",
        pfns.len(),
        ms(t.elapsed()),
        (pfns.len() * PAGE_SIZE) as f64 / t.elapsed().as_secs_f64() / 1e6
    );

    // Write pages back unchanged through PROT_WRITE mappings, then flip one byte and back.
    let sample: Vec<u64> = pfns.iter().copied().step_by(8).take(2048).collect();
    let mut data = vec![0u8; sample.len() * PAGE_SIZE];
    dom.read_pages(&sample, &mut |i, page| match page {
        Some(p) => {
            data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(p);
            Ok(())
        }
        None => Err(BackendError::Unsupported(format!(
            "pfn {:#x} vanished",
            sample[i]
        ))),
    })?;
    let t = Instant::now();
    dom.write_pages(&sample, &data)?;
    println!(
        "check: write_pages {} pages {:.1} ms",
        sample.len(),
        ms(t.elapsed())
    );
    let mut h2 = Vec::new();
    if page_hashes(&mut dom, &pfns, &mut h2)? != d1 {
        return fail("rewriting pages unchanged changed the digest");
    }
    let last = sample.len() - 1;
    data[last * PAGE_SIZE + 4095] ^= 0x5a;
    dom.write_pages(&sample[last..], &data[last * PAGE_SIZE..])?;
    if page_hashes(&mut dom, &pfns, &mut h2)? == d1 {
        return fail("a written byte did not reach guest memory");
    }
    data[last * PAGE_SIZE + 4095] ^= 0x5a;
    dom.write_pages(&sample[last..], &data[last * PAGE_SIZE..])?;
    if page_hashes(&mut dom, &pfns, &mut h2)? != d1 {
        return fail("restoring the byte did not restore the digest");
    }

    let mut blob = Vec::new();
    let t = Instant::now();
    dom.get_state(&mut blob)?;
    let get_ms = ms(t.elapsed());
    let st = XenState::decode(&blob).map_err(XenError::from)?;
    println!(
        "check: get_state {get_ms:.2} ms: {} bytes, HVM context {} bytes, {} params, tsc mode {} {} kHz",
        blob.len(),
        st.hvm_context.len(),
        st.params().count(),
        st.tsc.mode,
        st.tsc.khz
    );
    let t = Instant::now();
    dom.set_state(&blob)?;
    println!("check: set_state (same domain) {:.2} ms", ms(t.elapsed()));
    let mut again = Vec::new();
    dom.get_state(&mut again)?;
    let n = compare_vcpus(&blob, &again)?;
    println!("check: {n} vCPU(s) identical after set_state");

    dom.resume()?;
    std::thread::sleep(Duration::from_millis(500));
    harvest.clear_all();
    dom.harvest_dirty(&mut harvest)?;
    dom.stop_dirty_log()?;
    if harvest.count() == 0 {
        return fail("the guest dirtied nothing after resume: it did not survive set_state");
    }
    println!(
        "check: OK selftest on domain {domid} ({} dirty after resume)",
        harvest.count()
    );
    Ok(())
}

struct Pair {
    a: XenDomain,
    b: XenDomain,
}

impl Pair {
    fn pause(&mut self) -> Result<()> {
        self.a.pause()?;
        self.b.pause()?;
        Ok(())
    }
}

/// Copies `pfns` from `a` to `b`; returns the pages copied, with the hash of what was sent
/// for each (ascending by pfn when `pfns` is).
fn copy_pages(p: &mut Pair, pfns: &[u64], buf: &mut Vec<u8>) -> Result<Vec<(u64, u64)>> {
    buf.clear();
    buf.resize(pfns.len() * PAGE_SIZE, 0);
    let mut sent = Vec::with_capacity(pfns.len());
    let mut have = Vec::with_capacity(pfns.len());
    let mut n = 0;
    p.a.read_pages(pfns, &mut |i, page| {
        if let Some(src) = page {
            buf[n * PAGE_SIZE..(n + 1) * PAGE_SIZE].copy_from_slice(src);
            n += 1;
            have.push(pfns[i]);
            sent.push((pfns[i], xxhash_rust::xxh3::xxh3_64_with_seed(src, pfns[i])));
        }
        Ok(())
    })?;
    p.b.write_pages(&have, &buf[..n * PAGE_SIZE])?;
    Ok(sent)
}

fn read_one(dom: &mut XenDomain, pfn: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    dom.read_pages(&[pfn], &mut |_, page| {
        out.extend_from_slice(page.unwrap_or(&[]));
        Ok(())
    })?;
    Ok(out)
}

/// Which bytes of `pfn` differ between the two domains, for the failure message.
fn describe_diff(p: &mut Pair, pfn: u64, sent: &DirtyBitmap) -> Result<String> {
    let a = read_one(&mut p.a, pfn)?;
    let b = read_one(&mut p.b, pfn)?;
    if a.len() != b.len() {
        return Ok(format!("{pfn:#x}: mappable on one side only"));
    }
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            let start = i;
            while i < a.len() && a[i] != b[i] {
                i += 1;
            }
            ranges.push((start, i - start));
        } else {
            i += 1;
        }
    }
    let shown: Vec<String> = ranges
        .iter()
        .take(6)
        .map(|(o, n)| {
            let hex = |v: &[u8]| {
                v.iter()
                    .take(8)
                    .map(|x| format!("{x:02x}"))
                    .collect::<String>()
            };
            format!("+{o:#x}/{n} {}≠{}", hex(&a[*o..o + n]), hex(&b[*o..o + n]))
        })
        .collect();
    Ok(format!(
        "{pfn:#x} (sent this checkpoint: {}): {} ranges: {}",
        sent.test(pfn).unwrap_or(false),
        ranges.len(),
        shown.join(" ")
    ))
}

/// Pages that differed after a checkpoint only because Xen wrote one side while it was
/// paused (event-channel pending bits), by side.
#[derive(Default)]
struct XenWrites {
    primary: usize,
    secondary: usize,
}

fn differing_bytes(p: &mut Pair, pfn: u64) -> Result<usize> {
    let a = read_one(&mut p.a, pfn)?;
    let b = read_one(&mut p.b, pfn)?;
    if a.len() != b.len() {
        return Ok(PAGE_SIZE);
    }
    Ok(a.iter().zip(&b).filter(|(x, y)| x != y).count())
}

/// Compares every page of `pfns` on both domains. A difference is tolerated only if the page
/// was sent at this checkpoint, one side still holds exactly what was sent, and at most 64
/// bytes differ: then Xen wrote the other side after the copy although it was paused (it
/// raises event channels on paused domains). Anything else fails.
/// `primary`: the primary's digest when `ha` already holds its page hashes, taken while it was
/// paused for this checkpoint (the sweep for pages written behind the dirty log).
fn verify(
    p: &mut Pair,
    pfns: &[u64],
    sent: &[(u64, u64)],
    ha: &mut Vec<u64>,
    hb: &mut Vec<u64>,
    primary: Option<u64>,
) -> Result<(u64, XenWrites)> {
    let da = match primary {
        Some(d) => d,
        None => page_hashes(&mut p.a, pfns, ha)?,
    };
    let db = page_hashes(&mut p.b, pfns, hb)?;
    let mut xw = XenWrites::default();
    if da == db {
        return Ok((da, xw));
    }
    let diff: Vec<(u64, u64, u64)> = pfns
        .iter()
        .zip(ha.iter().zip(hb.iter()))
        .filter(|(_, (x, y))| x != y)
        .map(|(pfn, (x, y))| (*pfn, *x, *y))
        .collect();
    let mut bad = Vec::new();
    for &(pfn, x, y) in &diff {
        let sent_hash = sent
            .binary_search_by_key(&pfn, |&(q, _)| q)
            .ok()
            .map(|i| sent[i].1);
        let small = differing_bytes(p, pfn)? <= 64;
        match sent_hash {
            Some(s) if small && y == s => xw.primary += 1,
            Some(s) if small && x == s => xw.secondary += 1,
            _ => bad.push(pfn),
        }
    }
    if !bad.is_empty() {
        let mut lines = Vec::new();
        let mut sent_map = DirtyBitmap::new(p.a.page_count());
        for &(q, _) in sent {
            let _ = sent_map.set(q);
        }
        for &pfn in bad.iter().take(5) {
            lines.push(describe_diff(p, pfn, &sent_map)?);
        }
        return fail(format!(
            "memory differs in {} pages ({} explained by Xen writes while paused): {}",
            bad.len(),
            diff.len() - bad.len(),
            lines.join("; ")
        ));
    }
    Ok((da, xw))
}

/// `--vector` (decimal, default 243 = 0xf3, Linux's upcall vector).
/// Compares two domains that the caller paused (a replica and its primary after a final
/// checkpoint): every pfn's contents (a pfn mappable in one domain only differs) and the
/// vCPU registers of every vCPU.
fn same(args: &Args) -> Result<()> {
    let mut p = Pair {
        a: XenDomain::open(args.domid("--primary")?)?,
        b: XenDomain::open(args.domid("--secondary")?)?,
    };
    let pages = p.a.page_count();
    if p.b.page_count() != pages {
        return fail(format!(
            "primary has {pages} pfns, secondary {}: not the same shape",
            p.b.page_count()
        ));
    }
    let t = Instant::now();
    let all: Vec<u64> = (0..pages).collect();
    let (mut ha, mut hb) = (Vec::new(), Vec::new());
    let digest = page_hashes(&mut p.a, &all, &mut ha)?;
    page_hashes(&mut p.b, &all, &mut hb)?;
    let mapped = ha.iter().filter(|&&h| h != 0).count();
    let differing: Vec<u64> = all
        .iter()
        .zip(ha.iter().zip(&hb))
        .filter(|(_, (x, y))| x != y)
        .map(|(&pfn, _)| pfn)
        .collect();
    if !differing.is_empty() {
        let mut what = Vec::new();
        for &pfn in differing.iter().take(8) {
            let n = differing_bytes(&mut p, pfn)?;
            let (a, b) = (read_one(&mut p.a, pfn)?, read_one(&mut p.b, pfn)?);
            let first: Vec<String> = a
                .iter()
                .zip(&b)
                .enumerate()
                .filter(|(_, (x, y))| x != y)
                .take(4)
                .map(|(i, (x, y))| format!("+{i:#x}: {x:#04x}/{y:#04x}"))
                .collect();
            what.push(format!("{pfn:#x} ({n} bytes; {})", first.join(" ")));
        }
        return fail(format!(
            "{} of {pages} pfns differ: {}",
            differing.len(),
            what.join(", ")
        ));
    }
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    p.a.get_state(&mut sa)?;
    p.b.get_state(&mut sb)?;
    let vcpus = compare_vcpus(&sa, &sb)?;
    println!(
        "check: OK same: all {pages} pfns identical ({mapped} mappable, digest {digest:016x}), \
         {vcpus} vCPU(s) identical, compared in {:.0} ms",
        ms(t.elapsed())
    );
    Ok(())
}

fn upcall_vector(args: &Args) -> Result<u8> {
    let vector = args.num("--vector", Some(0xf3))?;
    match u8::try_from(vector) {
        Ok(v) if v >= 16 => Ok(v),
        _ => Err(CheckError::Usage(format!(
            "--vector {vector}: interrupt vectors run from 16 to 255"
        ))),
    }
}

fn replicate(args: &Args) -> Result<()> {
    let checkpoints = args.num("--checkpoints", Some(20))?;
    let interval = Duration::from_millis(args.num("--interval-ms", Some(1000))?);
    let mut p = Pair {
        a: XenDomain::open(args.domid("--primary")?)?,
        b: XenDomain::open(args.domid("--secondary")?)?,
    };
    // The secondary resumes from each loaded checkpoint with the upcall vector delivered, as
    // `colo secondary` does: without it, a replica whose copied vcpu_info shows events pending
    // stays blocked in Xen, stops arming its timer, and cannot take over later.
    p.b.set_wake_vector(Some(upcall_vector(args)?));
    let pages = p.a.page_count();
    if p.b.page_count() != pages {
        return fail(format!(
            "primary has {pages} pfns, secondary {}: not the same shape",
            p.b.page_count()
        ));
    }
    p.pause()?;
    let t = Instant::now();
    let pfns = mappable_pfns(&mut p.a)?;
    let pfns_b = mappable_pfns(&mut p.b)?;
    if pfns != pfns_b {
        return fail(format!(
            "populated pfns differ: primary {}, secondary {}",
            pfns.len(),
            pfns_b.len()
        ));
    }
    let mut buf = Vec::new();
    let sent = copy_pages(&mut p, &pfns, &mut buf)?;
    let n = sent.len();
    let mut blob = Vec::new();
    p.a.get_state(&mut blob)?;
    p.b.set_state(&blob)?;
    let (mut ha, mut hb) = (Vec::new(), Vec::new());
    let (d, _) = verify(&mut p, &pfns, &sent, &mut ha, &mut hb, None)?;
    let mut blob_b = Vec::new();
    p.b.get_state(&mut blob_b)?;
    compare_vcpus(&blob, &blob_b)?;
    println!(
        "check: initial full copy {n} pages + state in {:.0} ms, digest {d:016x}",
        ms(t.elapsed())
    );
    p.a.start_dirty_log()?;
    p.b.start_dirty_log()?;
    p.a.resume()?;
    p.b.resume()?;

    let (mut da, mut db) = (DirtyBitmap::new(pages), DirtyBitmap::new(pages));
    let mut dset = Vec::new();
    let mut pauses = Vec::new();
    let mut xen_writes = XenWrites::default();
    let mut secondary_alive = 0;
    // Xen writes some guest frames without marking them in the dirty log (the registered
    // vcpu_info's pvclock time area among them), so D = A ∪ B can miss a page: every capture
    // also hashes all of the paused primary's memory and adds the pages changed since the last
    // checkpoint that are not in D, as `colo primary` does with its sweeps. The hashes serve
    // the verification that follows, so the sweep costs no extra pass.
    let mut hnow = Vec::new();
    let mut unlogged_total = 0u64;
    for k in 1..=checkpoints {
        std::thread::sleep(interval);
        let t0 = Instant::now();
        p.pause()?;
        da.clear_all();
        db.clear_all();
        p.a.harvest_dirty(&mut da)?;
        p.b.harvest_dirty(&mut db)?;
        let (na, nb) = (da.count(), db.count());
        if nb > 0 {
            secondary_alive += 1;
        }
        da.union_with(&db).map_err(XenError::from)?;
        let dnow = page_hashes(&mut p.a, &pfns, &mut hnow)?;
        let mut unlogged = 0u64;
        for ((pfn, now), then) in pfns.iter().zip(&hnow).zip(&ha) {
            if now != then && !da.test(*pfn).map_err(XenError::from)? {
                da.set(*pfn).map_err(XenError::from)?;
                unlogged += 1;
            }
        }
        unlogged_total += unlogged;
        std::mem::swap(&mut ha, &mut hnow);
        dset.clear();
        da.extend_pfns(&mut dset);
        let sent = copy_pages(&mut p, &dset, &mut buf)?;
        let copied = sent.len();
        blob.clear();
        p.a.get_state(&mut blob)?;
        p.b.set_state(&blob)?;
        let pause = t0.elapsed();
        pauses.push(ms(pause));
        let t1 = Instant::now();
        let (d, xw) = verify(&mut p, &pfns, &sent, &mut ha, &mut hb, Some(dnow))?;
        xen_writes.primary += xw.primary;
        xen_writes.secondary += xw.secondary;
        let xen_note = if xw.primary + xw.secondary > 0 {
            format!(
                "; Xen wrote {} primary / {} secondary page(s) while paused",
                xw.primary, xw.secondary
            )
        } else {
            String::new()
        };
        blob_b.clear();
        p.b.get_state(&mut blob_b)?;
        let vcpus = compare_vcpus(&blob, &blob_b)?;
        let verify_ms = ms(t1.elapsed());
        let last = k == checkpoints && args.flag("--leave-paused");
        if !last {
            p.a.resume()?;
            p.b.resume()?;
        }
        println!(
            "check: checkpoint {k}: dirty primary {na} secondary {nb} unlogged {unlogged} sent \
             {copied}; pause {:.1} ms; verified {} pages + {vcpus} vCPU(s) in {verify_ms:.0} ms, digest {d:016x}{xen_note}",
            ms(pause),
            pfns.len()
        );
        if na == 0 {
            return fail(format!(
                "checkpoint {k}: the primary dirtied nothing; is it running?"
            ));
        }
    }
    pauses.sort_by(f64::total_cmp);
    let p50 = pauses.get(pauses.len() / 2).copied().unwrap_or(0.0);
    let max = pauses.last().copied().unwrap_or(0.0);
    println!(
        "check: OK replicate {checkpoints} checkpoints verified; pause p50 {p50:.1} ms max {max:.1} ms; \
         pages Xen wrote while paused (tolerated): {} primary, {} secondary; \
         pages written behind the dirty log (found by the sweeps, sent): {unlogged_total}; \
         secondary ran (dirtied pages) before {secondary_alive} of {checkpoints}",
        xen_writes.primary, xen_writes.secondary
    );
    Ok(())
}

fn main() -> ExitCode {
    let res = Args::parse().and_then(|args| match args.cmd.as_str() {
        "info" => info(&args),
        "digest" => digest(&args),
        "selftest" => selftest(&args),
        "replicate" => replicate(&args),
        "wake" => wake(&args),
        "same" => same(&args),
        "logdirty" => logdirty(&args),
        "netif" => netif(&args),
        "kv" => kv(&args),
        "disk" => disk(&args),
        "dsync" => dsync(&args),
        other => Err(CheckError::Usage(format!(
            "unknown command `{other}` (info, digest, selftest, replicate, wake, same, logdirty, netif, kv, disk)"
        ))),
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            println!("check: FAIL {msg}");
            ExitCode::FAILURE
        }
    }
}

/// dom0's side of the netif check: a MAC and an address on the guest's link.
const DOM0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x99, 0x01];
const DOM0_IP: [u8; 4] = [10, 99, 0, 1];
const GUEST_IP: [u8; 4] = [10, 99, 0, 2];
const PING_ID: u16 = 0x4242;

fn inet_sum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&DOM0_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&DOM0_MAC);
    f.extend_from_slice(&DOM0_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GUEST_IP);
    f.resize(60, 0);
    f
}

fn echo_request(guest_mac: [u8; 6], seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&PING_ID.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend((0..56u8).map(|i| i ^ seq as u8));
    let c = inet_sum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&DOM0_IP);
    ip.extend_from_slice(&GUEST_IP);
    let c = inet_sum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = guest_mac.to_vec();
    f.extend_from_slice(&DOM0_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// What a frame from the guest is, for the check.
enum FromGuest {
    ArpReply([u8; 6]),
    EchoReply(u16, bool),
    Other,
}

fn classify(f: &[u8]) -> FromGuest {
    if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == GUEST_IP {
        let mut mac = [0; 6];
        mac.copy_from_slice(&f[22..28]);
        return FromGuest::ArpReply(mac);
    }
    if f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[26..30] == GUEST_IP {
        let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
        if f.len() >= l4 + 8 && f[l4] == 0 && f[l4 + 4..l4 + 6] == PING_ID.to_be_bytes() {
            let seq = u16::from_be_bytes([f[l4 + 6], f[l4 + 7]]);
            let ok = inet_sum(&f[l4..]) == 0
                && f[l4 + 8..]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == (i as u8) ^ seq as u8);
            return FromGuest::EchoReply(seq, ok);
        }
    }
    FromGuest::Other
}

/// Plugs a colo-served PV vif into a running guest and pings it through the rings.
fn netif(args: &Args) -> Result<()> {
    let domid = args.domid("--domid")?;
    let seconds = args.num("--seconds", Some(60))?;
    let pings = args.num("--pings", Some(10))?.clamp(1, 1000) as u16;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let t0 = Instant::now();
    let mut vif = colo_xen::pvnet::PvVif::create(
        domid,
        0,
        [0x00, 0x16, 0x3e, 0xc0, 0x10, 0x01],
        Duration::from_secs(seconds),
    )?;
    let connected = t0.elapsed();
    println!(
        "check: netif: domain {domid}'s netfront connected to colo's backend in {:.1} s",
        connected.as_secs_f64()
    );
    let (mut guest_mac, mut other, mut bad, mut faults) = (None, 0u64, 0u64, 0usize);
    let mut sent: Vec<Option<Instant>> = vec![None; usize::from(pings)];
    let mut rtts: Vec<f64> = Vec::new();
    let (mut next_seq, mut last_send, mut arp_t) = (0u16, None::<Instant>, None::<Instant>);
    while Instant::now() < deadline && rtts.len() < usize::from(pings) {
        let now = Instant::now();
        if last_send.is_none_or(|t| now.duration_since(t) > Duration::from_millis(500)) {
            let frame = match guest_mac {
                None => {
                    arp_t.get_or_insert(now);
                    arp_request()
                }
                Some(mac) if next_seq < pings => {
                    sent[usize::from(next_seq)] = Some(now);
                    next_seq += 1;
                    echo_request(mac, next_seq - 1)
                }
                // Every request out; resend the oldest unanswered one.
                Some(mac) => match sent.iter().position(|s| s.is_some()) {
                    Some(i) => echo_request(mac, i as u16),
                    None => break,
                },
            };
            let (n, f) = vif.deliver(&[&frame])?;
            faults += f.len();
            if n == 1 {
                last_send = Some(now);
            }
        }
        vif.poll_tx(|f| match classify(f) {
            FromGuest::ArpReply(mac) => {
                if guest_mac.is_none() {
                    println!(
                        "check: netif: ARP answered in {:.1} s by {}",
                        arp_t.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                        mac.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":")
                    );
                }
                guest_mac = Some(mac);
                last_send = None;
            }
            FromGuest::EchoReply(seq, ok) => {
                match sent.get_mut(usize::from(seq)).and_then(Option::take) {
                    Some(t) if ok => rtts.push(ms(t.elapsed())),
                    _ => bad += u64::from(!ok),
                }
            }
            FromGuest::Other => other += 1,
        })?;
        vif.wait(Duration::from_millis(50))?;
    }
    if rtts.len() < usize::from(pings) {
        return fail(format!(
            "netif on domain {domid}: {} of {pings} echo replies in {seconds} s (ARP {}, {bad} corrupt replies, {other} other frames, {faults} receive faults)",
            rtts.len(),
            if guest_mac.is_some() { "answered" } else { "unanswered" }
        ));
    }
    rtts.sort_by(f64::total_cmp);
    // The frame rate of colo's own device path: a burst of echo requests put into the guest's
    // receive buffers as fast as it posts them, each reply taken from its TX ring.
    let burst = args.num("--burst", Some(200))?.min(4000) as u16;
    let mut rate = String::new();
    if let (Some(mac), true) = (guest_mac, burst > 0) {
        let frames: Vec<Vec<u8>> = (0..burst).map(|i| echo_request(mac, pings + i)).collect();
        let mut seen = vec![false; usize::from(burst)];
        let (mut put, mut got) = (0usize, 0usize);
        let t = Instant::now();
        let end = t + Duration::from_secs(seconds.min(30));
        // The rate is taken up to the last reply; a request the guest dropped (its backlog
        // overflowed) ends the wait 2 s after the last reply.
        let mut last = t;
        while got < frames.len()
            && Instant::now() < end
            && (put < frames.len() || last.elapsed() < Duration::from_secs(2))
        {
            if put < frames.len() {
                let refs: Vec<&[u8]> = frames[put..].iter().map(Vec::as_slice).collect();
                let (n, f) = vif.deliver(&refs)?;
                faults += f.len();
                put += n;
            }
            vif.poll_tx(|f| match classify(f) {
                FromGuest::EchoReply(seq, true) if seq >= pings => {
                    if let Some(s) = seen.get_mut(usize::from(seq - pings)) {
                        if !*s {
                            got += 1;
                            last = Instant::now();
                        }
                        *s = true;
                    }
                }
                _ => other += 1,
            })?;
            if got < frames.len() {
                vif.wait(Duration::from_millis(2))?;
            }
        }
        let secs = last.duration_since(t).as_secs_f64().max(1e-6);
        rate = format!(
            "; a burst of {burst} echo requests: {got} answered, the last after {secs:.2} s: {:.0} frames/s through colo's rings (both ways), {faults} receive faults",
            (put + got) as f64 / secs
        );
    }
    println!(
        "check: OK netif on domain {domid}: connected in {:.1} s; {pings} of {pings} echo replies through colo's rings (round trip p50 {:.1} ms, max {:.1} ms){rate}; {other} other frames from the guest; {bad} corrupt",
        connected.as_secs_f64(),
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1]
    );
    Ok(())
}

fn opt_str<'a>(args: &'a Args, key: &str) -> Result<&'a str> {
    match args.opts.iter().find(|(k, _)| k == key) {
        Some((_, Some(v))) => Ok(v),
        Some((_, None)) => Err(CheckError::Usage(format!("{key} needs a value"))),
        None => Err(CheckError::Usage(format!("{key} is required"))),
    }
}

/// `count` 4 KiB writes with O_DSYNC into `--file` (created, then removed): the speed of a
/// durable write on dom0's own storage, the baseline beside which the guest's writes through
/// colo's disk are priced.
fn dsync(args: &Args) -> Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let path = opt_str(args, "--file")?;
    let count = args.num("--count", Some(200))?.clamp(1, 100_000);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_DSYNC)
        .open(path)
        .map_err(|e| CheckError::Failed(format!("dsync: {path}: {e}")))?;
    let block = [0x5au8; 4096];
    let mut lat = Vec::with_capacity(count as usize);
    for i in 0..count {
        let t = Instant::now();
        f.write_all_at(&block, i * 4096)
            .map_err(|e| CheckError::Failed(format!("dsync: writing {path}: {e}")))?;
        lat.push(ms(t.elapsed()));
    }
    let _ = std::fs::remove_file(path);
    lat.sort_by(f64::total_cmp);
    println!(
        "check: OK dsync: {count} 4 KiB O_DSYNC writes into {path}: p50 {:.2} ms, p90 {:.2} ms",
        lat[lat.len() / 2],
        lat[lat.len() * 9 / 10]
    );
    Ok(())
}

/// The guest agent's kv records on a disk image, read offline; with `--expect`, every
/// acknowledged write (the last value acknowledged for each key) must be on it.
fn disk(args: &Args) -> Result<()> {
    use colo_xen::kvdisk::{decode, Slot, SLOT};
    use std::io::Read;
    let image = opt_str(args, "--image")?;
    let mut f = std::fs::File::open(image)
        .map_err(|e| CheckError::Failed(format!("disk: {image}: {e}")))?;
    let mut on_disk: std::collections::BTreeMap<String, (String, u64)> = Default::default();
    let (mut block, mut slot, mut damaged) = (vec![0u8; SLOT], 0u64, 0u64);
    loop {
        match f.read_exact(&mut block) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return fail(format!("disk: reading {image}: {e}")),
        }
        match decode(slot, &block) {
            Slot::Empty => {}
            Slot::Record(r) => {
                // The first records, as a sample (a long run writes hundreds).
                if on_disk.len() < 20 || args.flag("--all") {
                    println!(
                        "check: disk: slot {} {} = {} (PUT {})",
                        r.slot, r.key, r.value, r.version
                    );
                }
                on_disk.insert(r.key, (r.value, r.version));
            }
            Slot::Damaged(why) => {
                println!("check: disk: slot {slot} damaged: {why}");
                damaged += 1;
            }
        }
        slot += 1;
    }
    let Ok(expect) = opt_str(args, "--expect") else {
        println!(
            "check: OK disk: {} records in {image}, {damaged} damaged",
            on_disk.len()
        );
        return Ok(());
    };
    let text = std::fs::read_to_string(expect)
        .map_err(|e| CheckError::Failed(format!("disk: --expect {expect}: {e}")))?;
    let mut want: std::collections::BTreeMap<&str, &str> = Default::default();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let Some((k, v)) = line.split_once(' ') else {
            return fail(format!(
                "disk: --expect {expect}: `{line}` is not `key value`"
            ));
        };
        want.insert(k, v);
    }
    let missing: Vec<String> = want
        .iter()
        .filter(|(k, v)| on_disk.get(**k).map(|(d, _)| d.as_str()) != Some(**v))
        .map(|(k, v)| match on_disk.get(*k) {
            Some((d, _)) => format!("{k} (acknowledged `{v}`, on disk `{d}`)"),
            None => format!("{k} (acknowledged `{v}`, not on disk)"),
        })
        .collect();
    if !missing.is_empty() || damaged > 0 {
        return fail(format!(
            "disk: {} of {} acknowledged writes are not on {image}, {damaged} damaged records: {}",
            missing.len(),
            want.len(),
            missing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    println!(
        "check: OK disk: all {} acknowledged writes are on {image} ({} records)",
        want.len(),
        on_disk.len()
    );
    Ok(())
}

/// One line-oriented connection to the guest's key-value store.
struct KvConn {
    r: std::io::BufReader<std::net::TcpStream>,
    w: std::net::TcpStream,
}

impl KvConn {
    fn open(addr: &str, timeout: Duration) -> std::io::Result<Self> {
        let sa: std::net::SocketAddr = addr.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{addr}` is not IP:PORT"),
            )
        })?;
        let s = std::net::TcpStream::connect_timeout(&sa, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Self {
            w: s.try_clone()?,
            r: std::io::BufReader::new(s),
        })
    }

    fn ask(&mut self, req: &str) -> std::io::Result<String> {
        use std::io::{BufRead, Write};
        self.w.write_all(format!("{req}\n").as_bytes())?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed by the server",
            ));
        }
        Ok(line.trim_end().to_string())
    }
}

/// A client of the guest agent's key-value store that keeps one connection for its whole run
/// (across a failover, if one happens meanwhile) and opens new ones as it goes.
fn kv(args: &Args) -> Result<()> {
    let addr = opt_str(args, "--addr")?.to_string();
    let stop = std::path::PathBuf::from(opt_str(args, "--stop-file")?);
    let progress = opt_str(args, "--progress")
        .ok()
        .map(std::path::PathBuf::from);
    let timeout = Duration::from_secs(args.num("--timeout", Some(60))?.max(1));
    let every = args.num("--new-every", Some(5))?.max(1);
    let mut acked_file = match opt_str(args, "--acked") {
        Ok(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| CheckError::Failed(format!("kv: --acked {p}: {e}")))?,
        ),
        Err(_) => None,
    };
    // --latencies F: each answer's time in ms, a line per request, so the harness can split
    // them at the failover (the line count at the kill) and report each side's percentiles.
    let mut lat_file = match opt_str(args, "--latencies") {
        Ok(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| CheckError::Failed(format!("kv: --latencies {p}: {e}")))?,
        ),
        Err(_) => None,
    };
    let mut record = |k: &str, v: &str| -> Result<()> {
        if let Some(f) = acked_file.as_mut() {
            use std::io::Write;
            writeln!(f, "{k} {v}")
                .map_err(|e| CheckError::Failed(format!("kv: writing --acked: {e}")))?;
        }
        Ok(())
    };
    let t0 = Instant::now();
    let mut long = loop {
        match KvConn::open(&addr, timeout) {
            Ok(c) => break c,
            Err(e) if t0.elapsed() < timeout => {
                println!("check: kv: connecting to {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                return fail(format!(
                    "kv: cannot connect to {addr} within {} s: {e}",
                    timeout.as_secs()
                ))
            }
        }
    };
    let mut acked: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let (mut ops, mut fresh, mut slowest) = (0u64, 0u64, Duration::ZERO);
    let mut timed = |conn: &mut KvConn, req: &str, what: &str, ops: u64| -> Result<String> {
        let t = Instant::now();
        let a = conn
            .ask(req)
            .map_err(|e| CheckError::Failed(format!("kv: {what}, request {ops} ({req}): {e}")))?;
        let took = t.elapsed();
        slowest = slowest.max(took);
        if let Some(f) = lat_file.as_mut() {
            use std::io::Write;
            let op = req.split(' ').next().unwrap_or("?");
            let _ = writeln!(f, "{op} {:.2}", took.as_secs_f64() * 1e3);
        }
        Ok(a)
    };
    while !stop.exists() {
        ops += 1;
        let (k, v) = (
            format!("k{ops}"),
            format!("v{ops}-{:x}", ops.wrapping_mul(0x9e37_79b9)),
        );
        let a = timed(
            &mut long,
            &format!("PUT {k} {v}"),
            "the long-lived connection",
            ops,
        )?;
        if a != format!("OK {k}") {
            return fail(format!("kv: PUT {k} answered `{a}`"));
        }
        record(&k, &v)?;
        acked.insert(k, v);
        // Read back an earlier write: an answer must never contradict one acknowledged.
        let old = format!("k{}", 1 + ops.wrapping_mul(7919) % ops);
        let a = timed(
            &mut long,
            &format!("GET {old}"),
            "the long-lived connection",
            ops,
        )?;
        if a != format!("VAL {old} {}", acked[&old]) {
            return fail(format!(
                "kv: GET {old} answered `{a}`, acknowledged `{}`",
                acked[&old]
            ));
        }
        if ops % every == 0 {
            let mut c = KvConn::open(&addr, timeout).map_err(|e| {
                CheckError::Failed(format!("kv: new connection {} to {addr}: {e}", fresh + 1))
            })?;
            let (k, v) = (format!("n{ops}"), format!("new{ops}"));
            let a = timed(&mut c, &format!("PUT {k} {v}"), "a new connection", ops)?;
            if a != format!("OK {k}") {
                return fail(format!("kv: PUT {k} on a new connection answered `{a}`"));
            }
            record(&k, &v)?;
            acked.insert(k, v);
            fresh += 1;
        }
        if let Some(p) = &progress {
            let _ = std::fs::write(p, format!("{ops}\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut lost = Vec::new();
    for (k, v) in &acked {
        let a = timed(&mut long, &format!("GET {k}"), "the final read-back", ops)?;
        if a != format!("VAL {k} {v}") {
            lost.push(format!("{k}: `{a}`"));
        }
    }
    if !lost.is_empty() {
        return fail(format!(
            "kv: {} of {} acknowledged writes did not read back: {}",
            lost.len(),
            acked.len(),
            lost.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    println!(
        "check: OK kv: {ops} rounds on one TCP connection kept for {:.0} s, {fresh} new connections, {} acknowledged writes all read back; slowest answer {:.0} ms",
        t0.elapsed().as_secs_f64(),
        acked.len(),
        ms(slowest)
    );
    Ok(())
}

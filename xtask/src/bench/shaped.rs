//! The bench's links slower than memory: a token-bucket TCP proxy between the two nodes of a
//! pair (each direction limited to one rate, e.g. 1 or 10 Gbit/s, shared by every connection
//! the proxy carries, so `--streams 4` gets the link's rate, not four times it), and the
//! completion time (NEW → SVM_READY) of 10,000-page checkpoints of compressible and
//! incompressible pages with each page coding of the link (plain, zero-page markers, lz4),
//! on one connection and on four (`--streams 4`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use colo_cli::status::percentile;
use colo_core::stream::{Codec, PageCoding};
use colo_core::PAGE_SIZE;
use serde_json::{json, Value};

use super::{scattered_pfns, splitmix, Pair, MIB};

/// Bytes read (and then paced) at once.
const CHUNK: usize = 64 << 10;
/// The token bucket's depth: a thread that overslept (a loaded machine) catches up within it,
/// so the link keeps its rate (1 MiB: 8 ms at 1 Gbit/s, 0.8 ms at 10 Gbit/s).
const BUCKET: f64 = (1 << 20) as f64;

/// A rate shared by the proxy's threads, bytes/s (0: unlimited).
#[derive(Debug, Default)]
struct Rate(AtomicU64);

/// One direction of the shaped link: a token bucket every connection's pump in that
/// direction draws from (tokens in bytes, and when they were last counted).
#[derive(Debug)]
struct Bucket(Mutex<(f64, Instant)>);

impl Bucket {
    fn new() -> Self {
        Self(Mutex::new((BUCKET, Instant::now())))
    }

    /// Waits until `n` bytes may pass at `bps` (0: at once) and takes their tokens. Idle
    /// time earns no burst beyond the bucket.
    fn take(&self, n: usize, bps: f64) {
        if bps <= 0.0 {
            return;
        }
        let n = n as f64;
        loop {
            let wait = {
                let mut b = self.0.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * bps).min(BUCKET);
                b.1 = now;
                if b.0 >= n {
                    b.0 -= n;
                    return;
                }
                (n - b.0) / bps
            };
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

/// A proxy in front of one listener: every accepted connection is forwarded to the target,
/// each direction of all of them together paced to the current rate by one token bucket.
#[derive(Debug)]
pub(super) struct Shaper {
    addr: String,
    rate: Arc<Rate>,
    stop: Arc<AtomicBool>,
}

impl Shaper {
    /// A proxy toward `target`, unlimited until [`Shaper::set_gbit`].
    fn start(target: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the shaper")?;
        let addr = listener.local_addr()?.to_string();
        let rate = Arc::new(Rate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (target, r, st) = (target.to_string(), rate.clone(), stop.clone());
        listener.set_nonblocking(true)?;
        std::thread::Builder::new()
            .name("shaper".into())
            .spawn(move || {
                // The pair's replication link: one connection, or several (`--streams`), all
                // drawing on the same two buckets.
                let (up, down) = (Arc::new(Bucket::new()), Arc::new(Bucket::new()));
                while !st.load(Ordering::Relaxed) {
                    let a = match listener.accept() {
                        Ok((a, _)) => a,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        Err(_) => return,
                    };
                    let _ = a.set_nonblocking(false);
                    let Ok(b) = TcpStream::connect(&target) else {
                        continue;
                    };
                    for s in [&a, &b] {
                        let _ = s.set_nodelay(true);
                    }
                    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
                        let (r1, st1, u) = (r.clone(), st.clone(), up.clone());
                        std::thread::spawn(move || pump(a2, b2, &r1, &st1, &u));
                        let (r2, st2, d) = (r.clone(), st.clone(), down.clone());
                        std::thread::spawn(move || pump(b, a, &r2, &st2, &d));
                    }
                }
            })?;
        Ok(Self { addr, rate, stop })
    }

    /// Limits both directions to `gbit` Gbit/s (0: unlimited).
    fn set_gbit(&self, gbit: f64) {
        self.rate
            .0
            .store((gbit * 1e9 / 8.0) as u64, Ordering::Relaxed);
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Forwards `from` to `to` at the shared rate, drawing on `bucket`, until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream, rate: &Rate, stop: &AtomicBool, bucket: &Bucket) {
    let mut buf = vec![0u8; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        bucket.take(n, rate.0.load(Ordering::Relaxed) as f64);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// What the dirtied pages hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Laid out as the kv workload's table: half of each page's 32 slots used, text keys and
    /// values, the rest zeros (compressible).
    Kv,
    /// Random words in every byte, as the `dirty` workload leaves pages (incompressible).
    Random,
}

impl Content {
    fn name(self) -> &'static str {
        match self {
            Content::Kv => "kv",
            Content::Random => "random",
        }
    }

    /// Page `pfn`'s bytes for checkpoint `seed`.
    fn fill(self, page: &mut [u8], pfn: u64, seed: u64) {
        match self {
            Content::Random => {
                let mut x = seed ^ pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                for w in page.chunks_exact_mut(8) {
                    x = splitmix(x);
                    w.copy_from_slice(&x.to_le_bytes());
                }
            }
            Content::Kv => {
                page.fill(0);
                page[0] = 1;
                for slot in (1..32).step_by(2) {
                    let e = &mut page[slot * 128..(slot + 1) * 128];
                    let key = format!("user:{:08}:{slot:02}", pfn ^ (seed % 977));
                    let value = format!("{{\"n\":{},\"seen\":{seed},\"ok\":true}}", pfn * 31);
                    e[0] = 1;
                    e[1] = key.len() as u8;
                    e[2..4].copy_from_slice(&(value.len() as u16).to_le_bytes());
                    e[4..4 + key.len()].copy_from_slice(key.as_bytes());
                    e[36..36 + value.len()].copy_from_slice(value.as_bytes());
                }
            }
        }
    }
}

const LZ4: PageCoding = PageCoding {
    zero_pages: false,
    codec: Codec::Lz4,
};

/// The page codings and connection counts (`--streams`) compared.
const MODES: &[(&str, PageCoding, u8)] = &[
    ("plain", PageCoding::PLAIN, 1),
    (
        "zero",
        PageCoding {
            zero_pages: true,
            codec: Codec::None,
        },
        1,
    ),
    ("lz4", LZ4, 1),
    ("plain×4", PageCoding::PLAIN, 4),
    ("lz4×4", LZ4, 4),
];

/// One (rate, content, coding)'s completion times, ms.
#[derive(Debug, Clone)]
pub(super) struct ShapedRow {
    gbit: f64,
    content: Content,
    mode: &'static str,
    total_ms: Vec<f64>,
    bytes: f64,
}

impl ShapedRow {
    fn p50(&self) -> f64 {
        percentile(self.total_ms.clone(), 50.0).unwrap_or(0.0)
    }
}

/// Every row, and the baseline of each rate: raw TCP through the same proxy, ms for the bytes
/// of a plain 10,000-page checkpoint (median of 3).
#[derive(Debug, Default, Clone)]
pub(super) struct Shaped {
    rows: Vec<ShapedRow>,
    raw: Vec<(f64, f64)>,
    /// The same on four connections at once (the shaper holds them to the one rate).
    raw4: Vec<(f64, f64)>,
}

/// Bytes of a plain 10,000-page checkpoint, for the raw baseline.
const RAW_BYTES: usize = 41_000_000;

/// Milliseconds raw TCP takes for [`RAW_BYTES`] through a shaper at `gbit` on `conns`
/// connections at once, each carrying its share (median of 3).
fn raw_through(gbit: f64, conns: usize) -> Result<f64> {
    let mut runs = Vec::new();
    for _ in 0..3 {
        let sink = TcpListener::bind("127.0.0.1:0")?;
        let target = sink.local_addr()?.to_string();
        let reader = std::thread::spawn(move || -> std::io::Result<usize> {
            let mut readers = Vec::new();
            for _ in 0..conns {
                let (mut s, _) = sink.accept()?;
                readers.push(std::thread::spawn(move || -> std::io::Result<usize> {
                    let mut buf = vec![0u8; CHUNK];
                    let mut got = 0;
                    loop {
                        match s.read(&mut buf)? {
                            0 => return Ok(got),
                            n => got += n,
                        }
                    }
                }));
            }
            let mut got = 0;
            for r in readers {
                got += r
                    .join()
                    .map_err(|_| std::io::Error::other("a sink thread panicked"))??;
            }
            Ok(got)
        });
        let shaper = Shaper::start(&target)?;
        shaper.set_gbit(gbit);
        let mut socks = Vec::new();
        for _ in 0..conns {
            let s = TcpStream::connect(&shaper.addr)?;
            s.set_nodelay(true)?;
            socks.push(s);
        }
        let t = Instant::now();
        let share = RAW_BYTES / conns;
        let writers: Vec<_> = socks
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                let mine = if i == 0 {
                    RAW_BYTES - share * (conns - 1)
                } else {
                    share
                };
                std::thread::spawn(move || -> std::io::Result<()> {
                    let buf = vec![0x5au8; MIB as usize];
                    let mut sent = 0;
                    while sent < mine {
                        let n = (mine - sent).min(buf.len());
                        s.write_all(&buf[..n])?;
                        sent += n;
                    }
                    s.shutdown(Shutdown::Write)
                })
            })
            .collect();
        for w in writers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
        }
        let got = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the sink thread panicked"))??;
        runs.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            got == RAW_BYTES,
            "the shaper delivered {got} of {RAW_BYTES} bytes"
        );
    }
    Ok(percentile(runs, 50.0).unwrap_or(0.0))
}

impl Shaped {
    fn find(&self, gbit: f64, content: Content, mode: &str) -> Option<&ShapedRow> {
        self.rows
            .iter()
            .find(|r| r.gbit == gbit && r.content == content && r.mode == mode)
    }

    pub(super) fn print(&self) {
        println!(
            "\n10,000 dirty pages over a rate-limited link (token-bucket proxy, both directions), \
             completion NEW → SVM_READY, p50 ms (range); ×4: --streams 4 (the proxy shapes \
             the four connections together to the one rate)"
        );
        println!(
            "{:>8} {:>8} {:>8} {:>24} {:>12} {:>12}",
            "Gbit/s", "pages", "coding", "completion ms", "MB on link", "÷ plain"
        );
        for &(g, ms) in &self.raw {
            println!(
                "{g:>8} {:>8} {:>8} {ms:>10.1} {:>13} {:>12.2}   (baseline: raw TCP through the \
                 proxy, same run)",
                "raw TCP",
                "",
                "",
                RAW_BYTES as f64 / 1e6
            );
        }
        for &(g, ms) in &self.raw4 {
            println!(
                "{g:>8} {:>8} {:>8} {ms:>10.1} {:>13} {:>12.2}   (baseline: the same bytes on four \
                 connections at once, same run)",
                "raw ×4",
                "",
                "",
                RAW_BYTES as f64 / 1e6
            );
        }
        for r in &self.rows {
            let (lo, hi) = (
                r.total_ms.iter().copied().fold(f64::INFINITY, f64::min),
                r.total_ms.iter().copied().fold(0.0, f64::max),
            );
            let plain = self
                .find(r.gbit, r.content, "plain")
                .map_or(f64::NAN, ShapedRow::p50);
            println!(
                "{:>8} {:>8} {:>8} {:>10.1} ({:>5.1}–{:>5.1}) {:>12.2} {:>12.3}",
                r.gbit,
                r.content.name(),
                r.mode,
                r.p50(),
                lo,
                hi,
                r.bytes / 1e6,
                r.p50() / plain
            );
        }
        println!(
            "{:>8} target at 1 Gbit/s: lz4 ≤ 0.5 × plain on kv pages, ≤ 1.1 × plain on random \
             pages",
            ""
        );
    }

    pub(super) fn json(&self) -> Value {
        let get = |g: f64, c: Content, m: &str| self.find(g, c, m).map(ShapedRow::p50);
        json!({
            "raw_tcp_ms_41mb_1gbit": self.raw.iter().find(|r| r.0 == 1.0).map(|r| r.1),
            "raw_tcp_ms_41mb_10gbit": self.raw.iter().find(|r| r.0 == 10.0).map(|r| r.1),
            "raw_tcp_ms_41mb_1gbit_4conns": self.raw4.iter().find(|r| r.0 == 1.0).map(|r| r.1),
            "raw_tcp_ms_41mb_10gbit_4conns": self.raw4.iter().find(|r| r.0 == 10.0).map(|r| r.1),
            "completion_ms_10k_1gbit_plain": get(1.0, Content::Kv, "plain"),
            "completion_ms_10k_1gbit_lz4": get(1.0, Content::Kv, "lz4"),
            "completion_ms_10k_1gbit_zero": get(1.0, Content::Kv, "zero"),
            "completion_ms_10k_10gbit_plain": get(10.0, Content::Kv, "plain"),
            "completion_ms_10k_10gbit_lz4": get(10.0, Content::Kv, "lz4"),
            "completion_ms_10k_1gbit_plain_random": get(1.0, Content::Random, "plain"),
            "completion_ms_10k_1gbit_lz4_random": get(1.0, Content::Random, "lz4"),
            "completion_ms_10k_10gbit_plain_random": get(10.0, Content::Random, "plain"),
            "completion_ms_10k_10gbit_lz4_random": get(10.0, Content::Random, "lz4"),
            "completion_ms_10k_1gbit_streams4": get(1.0, Content::Kv, "plain×4"),
            "completion_ms_10k_10gbit_streams4": get(10.0, Content::Kv, "plain×4"),
            "completion_ms_10k_1gbit_lz4_streams4": get(1.0, Content::Kv, "lz4×4"),
            "completion_ms_10k_10gbit_lz4_streams4": get(10.0, Content::Kv, "lz4×4"),
            "completion_ms_10k_1gbit_streams4_random": get(1.0, Content::Random, "plain×4"),
            "completion_ms_10k_10gbit_streams4_random": get(10.0, Content::Random, "plain×4"),
            "completion_ms_10k_1gbit_lz4_streams4_random": get(1.0, Content::Random, "lz4×4"),
            "completion_ms_10k_10gbit_lz4_streams4_random": get(10.0, Content::Random, "lz4×4"),
            "shaped": self.rows.iter().map(|r| json!({
                "gbit": r.gbit,
                "pages": r.content.name(),
                "coding": r.mode,
                "completion_ms_p50": r.p50(),
                "completion_ms_runs": r.total_ms,
                "bytes_mean": r.bytes,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Writes `pfns` of the pair's primary with `content` (as guest code, so tracking sees it).
fn write_content(pair: &mut Pair, pfns: Vec<u64>, content: Content, seed: u64) -> Result<()> {
    let res = pair
        .node()?
        .guest()
        .exec_on_vcpu(move |mem| {
            let mut page = vec![0u8; PAGE_SIZE];
            for p in pfns {
                content.fill(&mut page, p, seed);
                mem.write(p as usize * PAGE_SIZE, &page)?;
            }
            Ok::<(), colo_mock::MockError>(())
        })
        .context("running the writing job on a vCPU")?;
    res.context("writing guest RAM")
}

/// One 256 MiB pair per coding, each behind its own shaper; for each rate, blocks of
/// checkpoints taken on the pairs in turn (so a change in the machine's load moves them all).
pub(super) fn run(quick: bool) -> Result<Shaped> {
    let ram = 256 * MIB;
    let reps = if quick { 3 } else { 7 };
    let mut pairs = Vec::new();
    for &(name, coding, streams) in MODES {
        let shaper = std::cell::RefCell::new(None);
        let pair = Pair::start_setup(
            ram,
            &format!("shaped link, {name}"),
            Some(true),
            &|o| {
                o.page_coding = coding;
                o.streams = streams;
                // A shared, loaded machine can starve a node's threads for a while.
                o.liveness.timeout = Duration::from_secs(10);
                o.liveness.progress_timeout = Duration::from_secs(60);
            },
            Some(&|addr: &str| {
                let s = Shaper::start(addr)?;
                let a = s.addr.clone();
                *shaper.borrow_mut() = Some(s);
                Ok(a)
            }),
        )?;
        let shaper = shaper.into_inner().context("the shaper was not started")?;
        pairs.push((name, pair, shaper));
    }
    let mut out = Shaped::default();
    let mut seed = 0x5ba9_ed00_u64;
    for gbit in [1.0, 10.0] {
        let raw = raw_through(gbit, 1)?;
        let raw4 = raw_through(gbit, 4)?;
        out.raw4.push((gbit, raw4));
        println!(
            "  {gbit} Gbit/s: raw TCP moves {RAW_BYTES} bytes through the proxy in {raw:.1} ms \
             ({raw4:.1} ms on four connections)"
        );
        out.raw.push((gbit, raw));
        for (_, _, s) in &pairs {
            s.set_gbit(gbit);
        }
        for content in [Content::Kv, Content::Random] {
            let mut rows: Vec<ShapedRow> = pairs
                .iter()
                .map(|(name, _, _)| ShapedRow {
                    gbit,
                    content,
                    mode: name,
                    total_ms: Vec::new(),
                    bytes: 0.0,
                })
                .collect();
            for _ in 0..reps {
                seed = splitmix(seed);
                for ((_, pair, _), row) in pairs.iter_mut().zip(&mut rows) {
                    let pfns = scattered_pfns(pair.pages, 10_000, seed)?;
                    write_content(pair, pfns, content, seed)?;
                    let f = pair.checkpoint()?;
                    row.total_ms.push(f.total_ms);
                    row.bytes += f.bytes_sent as f64 / reps as f64;
                }
            }
            for r in &rows {
                println!(
                    "  {gbit} Gbit/s, {} pages, {}: completion p50 {:.1} ms",
                    content.name(),
                    r.mode,
                    r.p50()
                );
            }
            out.rows.extend(rows);
        }
    }
    for (_, mut pair, _) in pairs {
        pair.stop();
    }
    Ok(out)
}

//! The bench's floors: the checkpoint pause beside what the memory allows (the harvest alone
//! plus a memcpy of the same pages, measured on a standalone guest of the same size in the same
//! run, interleaved with the pair's checkpoints), and the CPU time of an idle protected pair of
//! `colo` processes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use colo_cli::mock::build;
use colo_cli::status::percentile;
use colo_core::{DirtyBitmap, Domain, PAGE_SIZE};
use colo_mock::MockDomain;

use super::{dirty_pfns, dirty_spec, prefault, scattered_pfns, splitmix, Pair, GIB};

/// Pauses of one checkpoint size beside the floor's two parts, ms each.
#[derive(Debug, Default, Clone)]
pub(super) struct FloorRow {
    /// |D| of the pair's checkpoints.
    pub(super) pages: u64,
    pub(super) pause: Vec<f64>,
    pub(super) harvest: Vec<f64>,
    pub(super) memcpy: Vec<f64>,
    /// The first checkpoint of this size on the pair (the whole-guest row: the copy buffer
    /// grows to the guest's size there), not in `pause`.
    pub(super) first_pause: Option<f64>,
}

fn p50(v: &[f64]) -> f64 {
    percentile(v.to_vec(), 50.0).unwrap_or(0.0)
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    (if lo.is_finite() { lo } else { 0.0 }, hi)
}

impl FloorRow {
    /// harvest p50 + memcpy p50, ms.
    pub(super) fn floor(&self) -> f64 {
        p50(&self.harvest) + p50(&self.memcpy)
    }

    /// pause p50 ÷ the floor.
    pub(super) fn ratio(&self) -> f64 {
        p50(&self.pause) / self.floor().max(1e-9)
    }

    pub(super) fn print(&self, what: &str, target: f64) {
        let (lo, hi) = range(&self.pause);
        println!(
            "{what:>18} {:>8} {:>4} {:>10.3} {:>17} {:>10.3} {:>10.3} {:>8.3} {:>7}",
            self.pages,
            self.pause.len(),
            p50(&self.pause),
            format!("{lo:.2}–{hi:.2}"),
            p50(&self.harvest),
            p50(&self.memcpy),
            self.ratio(),
            if self.ratio() <= target { "yes" } else { "NO" },
        );
        if let Some(f) = self.first_pause {
            println!(
                "{:>18} first checkpoint of this size (copy buffer grown): pause {f:.1} ms = {:.2} × floor",
                "",
                f / self.floor().max(1e-9)
            );
        }
    }

    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "pages": self.pages,
            "pause_ms_p50": p50(&self.pause),
            "pause_ms_runs": self.pause,
            "harvest_ms_p50": p50(&self.harvest),
            "memcpy_ms_p50": p50(&self.memcpy),
            "floor_ms": self.floor(),
            "ratio": self.ratio(),
            "first_pause_ms": self.first_pause,
        })
    }
}

/// The 10,000-page and whole-guest pauses beside their floors.
#[derive(Debug, Default, Clone)]
pub(super) struct Floor {
    pub(super) tenk: FloorRow,
    pub(super) full: FloorRow,
}

impl Floor {
    pub(super) fn print(&self) {
        println!(
            "\npause beside its floor (harvest alone + memcpy of the same pages into a reused \
             buffer, a standalone guest of the same size, same run)"
        );
        println!(
            "{:>18} {:>8} {:>4} {:>10} {:>17} {:>10} {:>10} {:>8} {:>7}",
            "", "|D|", "reps", "pause p50", "pause range ms", "harvest", "memcpy", "ratio", "met"
        );
        self.tenk.print("10,000 pages", 1.25);
        self.full.print("whole guest", 1.5);
        println!(
            "{:>18} targets: ratio ≤ 1.25 (10,000 pages), ≤ 1.5 (whole guest)",
            ""
        );
    }
}

/// A standalone guest like the pair's, dirtied the same way, on which the harvest and the
/// memcpy of the harvested pages are timed while it is paused.
struct FloorGuest {
    dom: MockDomain,
    bm: DirtyBitmap,
    /// The memcpy's destination, written once beforehand (as the capture's reused buffer is).
    buf: Vec<u8>,
}

impl FloorGuest {
    fn new(ram: u64) -> Result<Self> {
        let mut dom = build(&dirty_spec(ram, 0, 3))?;
        prefault(&mut dom)?;
        dom.start_dirty_log()?;
        dom.resume()?;
        let pages = dom.page_count();
        Ok(Self {
            dom,
            bm: DirtyBitmap::new(pages),
            buf: vec![0x5a; usize::try_from(ram)?],
        })
    }

    /// Pauses the guest and times (harvest, memcpy of every harvested page, one copy per
    /// contiguous run), ms; resumes it.
    fn measure(&mut self) -> Result<(f64, f64)> {
        self.dom.pause()?;
        self.bm.clear_all();
        let t = Instant::now();
        self.dom.harvest_dirty(&mut self.bm)?;
        let harvest = t.elapsed().as_secs_f64() * 1e3;
        let ram = self.dom.ram().context("the floor guest is not paused")?;
        let t = Instant::now();
        let mut o = 0;
        for r in self.bm.runs() {
            let (start, end) = (r.start, r.end);
            let (s, n) = (
                start as usize * PAGE_SIZE,
                (end - start) as usize * PAGE_SIZE,
            );
            self.buf[o..o + n].copy_from_slice(&ram[s..s + n]);
            o += n;
        }
        let memcpy = t.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box(&self.buf);
        self.dom.resume()?;
        Ok((harvest, memcpy))
    }
}

/// Writes every page of `dom` without changing it (each page's word at offset 8 is written
/// back as it was), so that all of them are dirty.
pub(super) fn touch_all(dom: &MockDomain) -> Result<()> {
    let pages = dom.page_count();
    let res = dom
        .exec_on_vcpu(move |mem| {
            for p in 0..pages {
                let off = p as usize * PAGE_SIZE + 8;
                let v = mem.read_u64(off)?;
                mem.write_u64(off, v)?;
            }
            Ok::<(), colo_mock::MockError>(())
        })
        .context("running the touching job on a vCPU")?;
    res.context("writing guest RAM")
}

/// On `pair` (1 GiB, populated): 10,000-page checkpoints and whole-guest checkpoints, each
/// after the same dirtying of a standalone guest whose harvest and memcpy are timed.
/// `first_full`: the pause of the pair's first whole-guest checkpoint (its RAM's population).
pub(super) fn pause_floor(pair: &mut Pair, quick: bool, first_full: Option<f64>) -> Result<Floor> {
    let ram = pair.pages * PAGE_SIZE as u64;
    let mut fg = FloorGuest::new(ram)?;
    let mut floor = Floor::default();
    let (reps, full_reps) = if quick { (12, 2) } else { (40, 4) };
    let mut seed = 0x000f_100e_5eed_u64;
    for _ in 0..reps {
        seed = splitmix(seed);
        dirty_pfns(&fg.dom, scattered_pfns(pair.pages, 10_000, seed)?, seed)?;
        let (h, m) = fg.measure()?;
        pair.dirty(10_000, seed)?;
        let f = pair.checkpoint()?;
        floor.tenk.pages = f.pages_sent;
        floor.tenk.pause.push(f.pause_ms);
        floor.tenk.harvest.push(h);
        floor.tenk.memcpy.push(m);
    }
    floor.full.first_pause = first_full;
    for _ in 0..full_reps {
        touch_all(&fg.dom)?;
        let (h, m) = fg.measure()?;
        touch_all(pair.node()?.guest())?;
        let f = pair.checkpoint()?;
        floor.full.pages = f.pages_sent;
        floor.full.pause.push(f.pause_ms);
        floor.full.harvest.push(h);
        floor.full.memcpy.push(m);
    }
    println!(
        "  pause floor: 10,000 pages {:.3} ms vs floor {:.3} ms (× {:.2}); whole guest {:.1} ms \
         vs floor {:.1} ms (× {:.2})",
        p50(&floor.tenk.pause),
        floor.tenk.floor(),
        floor.tenk.ratio(),
        p50(&floor.full.pause),
        floor.full.floor(),
        floor.full.ratio()
    );
    Ok(floor)
}

/// A 1 GiB pair, populated, for the floor alone (`--only floor`).
pub(super) fn pause_floor_alone(quick: bool) -> Result<Floor> {
    let mut pair = Pair::start(GIB, "pause floor")?;
    let first = pair.populate()?;
    let floor = pause_floor(&mut pair, quick, Some(first))?;
    pair.stop();
    Ok(floor)
}

/// The `colo` binary next to this bench's own (the outer run builds both).
fn colo_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("the bench's own path")?;
    let colo = exe.with_file_name("colo");
    if !colo.exists() {
        bail!(
            "{} is missing: the outer `cargo xtask bench` builds it (cargo build --release -p \
             colo-cli)",
            colo.display()
        );
    }
    Ok(colo)
}

/// utime + stime of process `pid`, s.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; the state (field 3) is f[0].
    let ticks: u64 = f.get(11).context("no utime")?.parse::<u64>()?
        + f.get(12).context("no stime")?.parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// A child process killed when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time of an idle protected pair of `colo` processes (64 MiB kv guests, a checkpoint
/// every second, no clients) over `secs`, per node: [primary, secondary], % of one core.
pub(super) fn idle_cpu(secs: f64) -> Result<[f64; 2]> {
    let colo = colo_binary()?;
    let dir = std::env::temp_dir().join(format!("colo-bench-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let repl = format!("127.0.0.1:{port}");
    let tag = std::process::id();
    let spawn = |args: Vec<String>| -> Result<Reaped> {
        Ok(Reaped(
            Command::new(&colo)
                .args(&args)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", colo.display()))?,
        ))
    };
    let common = |role: &str| -> Vec<String> {
        let status = dir.join(format!("{role}.json"));
        [
            role,
            "--ram",
            "64M",
            "--name",
            &format!("bench-idle-{role}-{tag}"),
            "--status-file",
            &status.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut sargs = common("secondary");
    sargs.extend(["--listen".into(), repl.clone()]);
    let sec = spawn(sargs)?;
    let mut pargs = common("primary");
    pargs.extend([
        "--peer".into(),
        repl,
        "--max-interval-ms".into(),
        "1000".into(),
    ]);
    let pri = spawn(pargs)?;
    // Protected, and one periodic checkpoint behind it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = std::fs::read_to_string(dir.join("primary.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&st).unwrap_or_default();
        if v["protected"] == true && v["checkpoints"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the idle pair did not reach protection within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (p0, s0) = (cpu_secs(pri.0.id())?, cpu_secs(sec.0.id())?);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (p1, s1) = (cpu_secs(pri.0.id())?, cpu_secs(sec.0.id())?);
    let e = t.elapsed().as_secs_f64();
    drop(pri);
    drop(sec);
    let _ = std::fs::remove_dir_all(&dir);
    let pct = [(p1 - p0) / e * 100.0, (s1 - s0) / e * 100.0];
    println!(
        "  idle protected pair over {e:.0} s: primary {:.2} %, secondary {:.2} % of a core",
        pct[0], pct[1]
    );
    Ok(pct)
}

//! The machine's speed, measured in the same run: how many times longer than on a quiet machine
//! a fixed piece of work takes here and now (a slower CPU, other processes, other tests of this
//! binary). The tests stretch every heartbeat timeout, progress timeout and wait budget by it,
//! so a test that passes on a quiet machine passes on a slow or busy one and asserts the same.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// CPU time the calibration's work takes one thread of a quiet machine of the class the tests'
/// base durations were chosen on (a 2-core CI runner, debug build). A faster CPU does not make
/// the budgets shorter; a slower one makes them longer.
const QUIET_CPU: Duration = Duration::from_millis(40);

/// A measurement is reused this long before the next one.
const FRESH: Duration = Duration::from_secs(15);

/// The slowness is the largest of the measurements this recent: a moment of quiet between two
/// busy stretches does not shorten the budgets.
const MEMORY: Duration = Duration::from_secs(90);

/// Never more than this: a measurement made while the machine was frozen for a moment would
/// otherwise turn every hang guard into hours.
const MAX_SLOWNESS: f64 = 40.0;

/// One calibration.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// Longest wall time of one worker.
    pub wall: Duration,
    /// That worker's own CPU time (`None` where the kernel does not say).
    pub cpu: Option<Duration>,
    /// Longest a sleeping thread woke up late meanwhile.
    pub late_wake: Duration,
    /// The slowness this sample says (at least 1).
    pub slowness: f64,
}

static SAMPLES: Mutex<Vec<Sample>> = Mutex::new(Vec::new());

/// How many times slower than a quiet machine this one is now (at least 1): the largest of the
/// recent calibrations, measuring anew when the last is older than [`FRESH`]. The first call in
/// a test binary measures; a measurement takes a few tens of ms on a quiet machine.
pub fn slowness() -> f64 {
    let mut samples = SAMPLES.lock();
    let now = Instant::now();
    if samples
        .last()
        .is_none_or(|s| now.duration_since(s.at) > FRESH)
    {
        let s = measure();
        eprintln!(
            "speed: calibration took {:.1} ms wall, {} CPU, a sleeper woke up to {:.1} ms \
             late: slowness {:.2}",
            ms(s.wall),
            s.cpu.map_or("n/a".into(), |c| format!("{:.1} ms", ms(c))),
            ms(s.late_wake),
            s.slowness
        );
        samples.push(s);
    }
    samples.retain(|s| now.duration_since(s.at) <= MEMORY);
    samples.iter().map(|s| s.slowness).fold(1.0, f64::max)
}

/// `d` stretched by the machine's [`slowness`].
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(slowness())
}

/// `ms` milliseconds stretched by the machine's [`slowness`], as a command-line value.
pub fn scaled_ms(ms: u64) -> String {
    scaled(Duration::from_millis(ms)).as_millis().to_string()
}

/// `s` seconds stretched by the machine's [`slowness`], rounded up to whole seconds, as a
/// command-line value.
pub fn scaled_secs(s: u64) -> u64 {
    scaled(Duration::from_secs(s)).as_secs_f64().ceil() as u64
}

/// The flags that give a `colo primary` or `colo secondary` process a silence timeout of
/// `heartbeat_ms` and the default progress timeout (10 s), both as on a quiet machine and
/// stretched by the machine's [`slowness`].
pub fn timeout_flags(heartbeat_ms: u64) -> [String; 4] {
    [
        "--heartbeat-timeout-ms".into(),
        scaled_ms(heartbeat_ms),
        "--progress-timeout-ms".into(),
        scaled_ms(10_000),
    ]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the fixed work on as many threads as the machine has cores (a pair's node loops are
/// that many busy threads), with a sleeper beside them that notes how late it wakes up.
fn measure() -> Sample {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let start = Arc::new(Barrier::new(workers + 1));
    let handles: Vec<_> = (0..workers)
        .map(|i| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                let cpu0 = thread_cpu();
                let t = Instant::now();
                std::hint::black_box(work(i as u64 + 1));
                let wall = t.elapsed();
                let cpu = thread_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
                (wall, cpu)
            })
        })
        .collect();
    start.wait();
    let mut late_wake = Duration::ZERO;
    while !handles.iter().all(|h| h.is_finished()) {
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(1));
        late_wake = late_wake.max(t.elapsed().saturating_sub(Duration::from_millis(1)));
    }
    let (wall, cpu) = handles
        .into_iter()
        .map(|h| h.join().unwrap_or((Duration::MAX, None)))
        .max_by_key(|(wall, _)| *wall)
        .unwrap_or((Duration::MAX, None));
    // Slower than the quiet machine's CPU, or waiting for a core (or both).
    let vs_quiet = wall.as_secs_f64() / QUIET_CPU.as_secs_f64();
    let vs_own_cpu = cpu.map_or(1.0, |c| wall.as_secs_f64() / c.as_secs_f64().max(1e-6));
    Sample {
        at: Instant::now(),
        wall,
        cpu,
        late_wake,
        slowness: vs_quiet.max(vs_own_cpu).clamp(1.0, MAX_SLOWNESS),
    }
}

/// The fixed work: xorshift over a 1 MiB buffer, a few rounds (memory and integer work, as a
/// node loop copying and hashing pages does).
fn work(seed: u64) -> u64 {
    let mut buf = vec![0u64; 1 << 17];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..32 {
        for w in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = w.wrapping_add(x);
        }
    }
    buf.iter().fold(0, |a, b| a ^ b)
}

/// This thread's CPU time so far, from `/proc/thread-self/schedstat` (ns on a CPU, ns waiting
/// for one, timeslices); `None` where the kernel does not keep it.
fn thread_cpu() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

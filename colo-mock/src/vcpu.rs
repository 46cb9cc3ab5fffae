//! vCPU threads: each runs its workload one step at a time and parks between two steps when the
//! domain is paused. Pause returns only once every vCPU is parked.
//!
//! Control protocol (all under `Shared::ctl`): the host sets `run`; a vCPU checks `run` before
//! every step and, when it is false, increments `parked`, notifies, and waits. `pause` clears
//! `run` and waits for `parked == vcpus`. A vCPU whose step fails records the fault and stays
//! parked for good (a crashed guest), so pause still completes.

use crate::guest::{self, DirtyConfig, HostDevices, Scratch, Step, VcpuRegs, Workload};
use crate::ram::GuestMem;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Code the host asks a vCPU to run between two steps (tests, conformance guests).
pub(crate) type Job = Box<dyn FnOnce(&GuestMem) + Send>;

#[derive(Default)]
pub(crate) struct Ctl {
    pub run: bool,
    pub stop: bool,
    pub parked: usize,
    pub job: Option<Job>,
    pub fault: Option<String>,
}

pub(crate) struct Shared {
    pub mem: GuestMem,
    pub ctl: Mutex<Ctl>,
    pub cv: Condvar,
    pub regs: Vec<Mutex<VcpuRegs>>,
    pub steps: AtomicU64,
    /// Bumped by the host NIC after it posts a request.
    pub doorbell: AtomicU64,
    /// Signalled (at most one pending) when a vCPU put a frame in the TX ring, so the host
    /// sleeps until there is output instead of polling the ring.
    pub tx_ready: (
        crossbeam_channel::Sender<()>,
        crossbeam_channel::Receiver<()>,
    ),
    /// Dirty workload rate, pages per ms over all vCPUs.
    pub dirty_rate: AtomicU64,
    /// Dirty workload disk rate, blocks per ms over all vCPUs (0: no disk writes).
    pub disk_rate: AtomicU64,
    /// vCPUs idle once their program counter reaches this (u64::MAX = no limit).
    pub step_limit: AtomicU64,
    pub workload: Workload,
}

impl Shared {
    pub(crate) fn new(mem: GuestMem, workload: Workload) -> Self {
        let n = workload.vcpus();
        let rate = match &workload {
            Workload::Dirty(d) => d.pages_per_ms,
            _ => DirtyConfig::UNLIMITED,
        };
        Self {
            mem,
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            regs: (0..n).map(|i| Mutex::new(VcpuRegs::boot(i))).collect(),
            steps: AtomicU64::new(0),
            doorbell: AtomicU64::new(0),
            tx_ready: crossbeam_channel::bounded(1),
            dirty_rate: AtomicU64::new(rate),
            disk_rate: AtomicU64::new(0),
            step_limit: AtomicU64::new(u64::MAX),
            workload,
        }
    }

    /// Wakes idle vCPUs after the host posted work.
    pub(crate) fn ring_doorbell(&self) {
        self.doorbell.fetch_add(1, Ordering::Release);
        let _c = self.ctl.lock();
        self.cv.notify_all();
    }
}

/// Longest sleep of an idle vCPU between checks (every wake is signalled; this bounds the cost
/// of one that is not).
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Paces the dirty workload at `rate` pages/ms per vCPU from the last resume on.
struct Throttle {
    since: Instant,
    done: u64,
}

impl Throttle {
    fn reset(&mut self) {
        self.since = Instant::now();
        self.done = 0;
    }

    /// How long to wait before the next step (None = go). `rate` 0 = never go,
    /// [`DirtyConfig::UNLIMITED`] = always go.
    fn wait(&self, rate: u64) -> Option<Duration> {
        if rate == DirtyConfig::UNLIMITED {
            return None;
        }
        if rate == 0 {
            return Some(Duration::from_millis(5));
        }
        let allowed = (self.since.elapsed().as_micros() as u64).saturating_mul(rate) / 1000 + 1;
        (self.done >= allowed).then(|| {
            Duration::from_micros(((self.done + 1 - allowed) * 1000 / rate).clamp(50, 2000))
        })
    }
}

/// Body of vCPU thread `idx`.
pub(crate) fn run(shared: Arc<Shared>, idx: usize, mut dev: HostDevices) {
    let n = shared.regs.len();
    let mut scratch = Scratch::default();
    let mut throttle = Throttle {
        since: Instant::now(),
        done: 0,
    };
    // The dirty workload's disk writes, paced on their own.
    let mut disk_throttle = Throttle {
        since: Instant::now(),
        done: 0,
    };
    let writes_disk = matches!(shared.workload, Workload::Dirty(_)) && dev.disk().is_some();
    loop {
        let job = {
            let mut c = shared.ctl.lock();
            if !c.run || c.stop {
                c.parked += 1;
                shared.cv.notify_all();
                while !c.run && !c.stop {
                    shared.cv.wait(&mut c);
                }
                c.parked -= 1;
                if c.stop {
                    return;
                }
                throttle.reset();
                disk_throttle.reset();
            }
            c.job.take()
        };
        if let Some(job) = job {
            job(&shared.mem);
            continue;
        }
        let per_vcpu = |rate: u64| {
            if rate == DirtyConfig::UNLIMITED {
                rate
            } else {
                rate.div_ceil(n as u64)
            }
        };
        let mut disk_wait = None;
        let mut wrote_disk = false;
        if writes_disk {
            let rate = shared.disk_rate.load(Ordering::Relaxed);
            if rate > 0 {
                disk_wait = disk_throttle.wait(per_vcpu(rate));
                if disk_wait.is_none() {
                    if let Err(e) = guest::dirty_disk_write(&mut dev, &mut scratch) {
                        fault(&shared, idx, &e);
                        return;
                    }
                    disk_throttle.done += 1;
                    shared.steps.fetch_add(1, Ordering::Relaxed);
                    wrote_disk = true;
                }
            }
        }
        let per_vcpu = per_vcpu(shared.dirty_rate.load(Ordering::Relaxed));
        if let Some(d) = throttle.wait(per_vcpu) {
            if wrote_disk {
                // The disk's pace decides this turn: a disk written flat out beside few or no
                // page writes is not slowed to the pages' rate.
                continue;
            }
            let d = disk_wait.map_or(d, |w| w.min(d));
            let mut c = shared.ctl.lock();
            if c.run && c.job.is_none() {
                shared.cv.wait_for(&mut c, d);
            }
            continue;
        }
        let bell = shared.doorbell.load(Ordering::Acquire);
        let limit = shared.step_limit.load(Ordering::Relaxed);
        let r = {
            let mut regs = shared.regs[idx].lock();
            if regs.pc >= limit {
                Ok(Step::Idle)
            } else {
                guest::step(
                    &shared.workload,
                    &shared.mem,
                    &mut regs,
                    &mut dev,
                    &mut scratch,
                    idx,
                    n,
                )
            }
        };
        match r {
            Ok(step @ (Step::Progress | Step::Emitted)) => {
                throttle.done += 1;
                shared.steps.fetch_add(1, Ordering::Relaxed);
                if step == Step::Emitted {
                    // Full means a signal is already pending: the host drains everything.
                    let _ = shared.tx_ready.0.try_send(());
                }
            }
            Ok(Step::Idle) => {
                // The host rings the doorbell (under this lock) when it posts a request or
                // frees TX slots, and pause/stop notify too, so no wake is lost; the timeout
                // is only a safety net.
                let mut c = shared.ctl.lock();
                if c.run && c.job.is_none() && shared.doorbell.load(Ordering::Acquire) == bell {
                    shared.cv.wait_for(&mut c, IDLE_WAIT);
                }
            }
            Err(e) => {
                fault(&shared, idx, &e);
                return;
            }
        }
    }
}

/// vCPU `idx` faulted: it records why and stays parked for good (a crashed guest).
fn fault(shared: &Shared, idx: usize, e: &crate::MockError) {
    tracing::error!("vCPU {idx} faulted: {e}");
    let mut c = shared.ctl.lock();
    c.fault.get_or_insert_with(|| format!("vCPU {idx}: {e}"));
    c.parked += 1;
    shared.cv.notify_all();
    while !c.stop {
        shared.cv.wait(&mut c);
    }
}

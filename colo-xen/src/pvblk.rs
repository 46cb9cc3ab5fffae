//! A guest's PV disk served by colo from dom0: [`PvVbd`] creates the device's xenstore nodes
//! (the guest's blkfront sees a hot-plugged `xvda`), answers the handshake, maps the ring the
//! frontend granted, binds its event channel and serves the ring with
//! [`crate::blkif::BlkifBackend`] against a [`VbdStore`] (on the nodes: colo-mock's disk
//! image with its write log and the secondary's overlay). The backend's nodes live under a
//! device type the kernel's blkback does not claim (`backend/colo-vbd`), so colo is the only
//! path to the guest's disk.
//!
//! Handshake (xen/include/public/io/blkif.h, XenbusState numbers): colo writes the backend
//! directory (`Initialising`, 1) with everything blkfront reads at connect — `sectors` (in
//! 512-byte units), `info` 0, `sector-size` 4096 (so blkfront sends 4 KiB-aligned I/O),
//! `feature-flush-cache` 1; no barrier, discard, persistent grants, indirect segments,
//! multi-page ring or multi-queue — and the frontend directory (`virtual-device` 51712 =
//! xvda, `device-type` disk), then `InitWait` (2). blkfront publishes `ring-ref`,
//! `event-channel` and `protocol` and turns `Initialised` (3); colo maps and binds, turns
//! `Connected` (4) and waits for blkfront to turn `Connected` too.
//!
//! # Serving, and the checkpoint's pause
//! A thread serves the ring: it waits for the guest's kick (or 100 ms), takes the device's
//! lock and answers every published request (synchronous I/O on the store, the answers and
//! READ data written into guest memory under that lock). A request may arrive while the node
//! checkpoints, and a response written into guest memory after the capture read it would be
//! lost to the replica (the ring would say the request is unanswered while the PVM's
//! frontend has seen the answer). So the domain wrapper (`PvVbdGuest`, `pvdisk.rs`) calls
//! [`PvVbd::quiesce`] before it pauses the domain: it takes the lock (so a serve in progress
//! finishes first) and sets a flag under which the thread answers nothing. Between `pause` and
//! `resume` nothing of colo's reaches the guest's memory; [`PvVbd::release`], after the
//! domain's resume, clears the flag and serves what arrived meanwhile (the kicks of those
//! requests were taken by the thread while it was quiesced).
//!
//! Frames colo writes (READ data, the ring's answers and event index) are recorded and added to
//! the dirty set at every harvest ([`PvVbd::take_written`]): Xen's log does not see dom0's
//! foreign writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::blkif::{BlkRing, BlkifBackend, BlkifError, VbdStore, BLOCK};
use crate::error::XenError;
use crate::evtbits::{self, PortBits};
use crate::grant::Access;
use crate::netif::{FrameError, GuestFrames};
use crate::pvblkstate::VbdTrailer;
use crate::pvsys::{home, read_num, EventChannel, ForeignFrames, Mapped, NodePerms, XenStore};

/// Grant frames colo maps (Xen's default `max_grant_frames` for a domU is 64).
const GRANT_FRAMES: usize = 64;

/// `virtual-device` of xvda: major 202 (XENVBD), minor 0.
pub const XVDA: u32 = 202 << 8;

/// XenbusState values this handshake uses.
mod state {
    pub const INITIALISING: u64 = 1;
    pub const INIT_WAIT: u64 = 2;
    pub const INITIALISED: u64 = 3;
    pub const CONNECTED: u64 = 4;
    pub const CLOSED: u64 = 6;
}

/// Why a PV disk could not be served.
#[derive(Debug, thiserror::Error)]
pub enum PvVbdError {
    /// A Xen or xenstore call failed.
    #[error(transparent)]
    Xen(#[from] XenError),
    /// The ring broke.
    #[error(transparent)]
    Ring(#[from] BlkifError),
    /// The store is not a disk blkfront can use.
    #[error("the disk store has {blocks} blocks of 4 KiB: {why}")]
    Store {
        /// Its size.
        blocks: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The frontend did not reach `awaited` in time.
    #[error("domain {domid}'s blkfront did not turn {awaited} for vbd {devid} within {secs:.0} s (frontend state {state:?}; does the guest load xen-blkfront?)")]
    NoFrontend {
        /// The guest.
        domid: u32,
        /// The device number.
        devid: u32,
        /// The state waited for.
        awaited: &'static str,
        /// Seconds waited.
        secs: f64,
        /// The frontend's last state.
        state: Option<u64>,
    },
    /// The frontend published something colo cannot serve.
    #[error("domain {domid}'s blkfront: {what}")]
    Frontend {
        /// The guest.
        domid: u32,
        /// What.
        what: String,
    },
}

/// Counters of what the serving thread did (since the device was created).
#[derive(Debug, Default)]
pub struct VbdStats {
    /// Requests answered `OKAY`.
    pub ok: AtomicU64,
    /// Requests answered `ERROR`.
    pub errors: AtomicU64,
    /// Requests answered `EOPNOTSUPP`.
    pub unsupported: AtomicU64,
    /// Sectors (512 bytes) read for the guest.
    pub sectors_read: AtomicU64,
    /// Sectors written for the guest.
    pub sectors_written: AtomicU64,
    /// Flushes of the store.
    pub flushes: AtomicU64,
}

/// Everything the serving thread and the node share, behind one lock.
struct Serving {
    domid: u32,
    frames: ForeignFrames,
    grants: Mapped,
    ring: Mapped,
    ring_gfn: u64,
    ring_ref: u32,
    port: u32,
    backend: BlkifBackend,
    store: Box<dyn VbdStore + Send>,
    /// Frames colo wrote since the last [`PvVbd::take_written`] (READ data).
    written: Vec<u64>,
    /// The domain is (being) paused: answer nothing.
    quiesced: bool,
    /// The ring broke: served no more, and why.
    broken: Option<String>,
    evt: Arc<EventChannel>,
    stats: Arc<VbdStats>,
    /// The domain's shared-info page ([`PvVbd::watch_event_bits`]): the port's pending and
    /// mask bits travel with a checkpoint (see [`crate::evtbits`]).
    shinfo: Option<Mapped>,
}

/// The guest's frames, recording each one written.
struct Tracked<'a> {
    inner: &'a mut ForeignFrames,
    written: &'a mut Vec<u64>,
}

impl GuestFrames for Tracked<'_> {
    fn read(&mut self, gfn: u64, offset: usize, out: &mut [u8]) -> Result<(), FrameError> {
        self.inner.read(gfn, offset, out)
    }
    fn write(&mut self, gfn: u64, offset: usize, data: &[u8]) -> Result<(), FrameError> {
        self.written.push(gfn);
        self.inner.write(gfn, offset, data)
    }
}

fn ring_gfn(domid: u32, grants: &Mapped, ring_ref: u32) -> Result<u64, PvVbdError> {
    grants
        .grant_table()
        .resolve(ring_ref, 0, Access::Write)
        .map_err(|e| PvVbdError::Frontend {
            domid,
            what: format!("ring: {e}"),
        })
}

impl Serving {
    /// Answers every published request unless quiesced or broken; kicks the guest if asked.
    fn serve(&mut self) {
        if self.quiesced || self.broken.is_some() {
            return;
        }
        let table = self.grants.grant_table();
        let ring = match BlkRing::new(self.ring.words(0)) {
            Ok(r) => r,
            Err(e) => {
                self.broken = Some(e.to_string());
                return;
            }
        };
        let mut mem = Tracked {
            inner: &mut self.frames,
            written: &mut self.written,
        };
        match self
            .backend
            .serve(&ring, &table, &mut mem, self.store.as_mut())
        {
            Ok(s) => {
                let st = &self.stats;
                st.ok.fetch_add(u64::from(s.ok), Ordering::Relaxed);
                st.unsupported
                    .fetch_add(u64::from(s.unsupported), Ordering::Relaxed);
                st.sectors_read.fetch_add(s.sectors_read, Ordering::Relaxed);
                st.sectors_written
                    .fetch_add(s.sectors_written, Ordering::Relaxed);
                st.flushes
                    .fetch_add(u64::from(s.flushes), Ordering::Relaxed);
                if s.errors > 0 {
                    let n = st.errors.fetch_add(u64::from(s.errors), Ordering::Relaxed)
                        + u64::from(s.errors);
                    if n < 10 || n.is_power_of_two() {
                        let why = self.backend.take_last_error().unwrap_or_default();
                        eprintln!(
                            "colo-xen: pv-vbd of domain {}: a request answered ERROR: {why} ({n} such)",
                            self.domid
                        );
                    }
                }
                if s.notify {
                    if let Err(e) = self.evt.notify() {
                        eprintln!("colo-xen: pv-vbd of domain {}: {e}", self.domid);
                    }
                }
            }
            Err(e) => {
                eprintln!(
                    "colo-xen: pv-vbd of domain {}: the ring broke, the disk is served no more: {e}",
                    self.domid
                );
                self.broken = Some(e.to_string());
            }
        }
    }
}

/// One disk of a guest, served by colo.
pub struct PvVbd {
    domid: u32,
    devid: u32,
    xs: XenStore,
    shared: Arc<Mutex<Serving>>,
    stats: Arc<VbdStats>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for PvVbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvVbd")
            .field("domid", &self.domid)
            .field("devid", &self.devid)
            .finish()
    }
}

/// Removes a half-plugged device's xenstore directories when dropped armed.
struct Unplug {
    dirs: Option<[String; 2]>,
}

impl Drop for Unplug {
    fn drop(&mut self) {
        if let (Some(dirs), Ok(xs)) = (self.dirs.take(), XenStore::open()) {
            for d in &dirs {
                let _ = xs.remove(d);
            }
        }
    }
}

enum Waited {
    Xen(XenError),
    Timeout(Option<u64>),
}

/// Waits until the frontend's state at `front` is between `want` and Connected.
fn wait_state(
    xs: &XenStore,
    front: &str,
    want: u64,
    start: Instant,
    timeout: Duration,
) -> Result<(), Waited> {
    loop {
        let s = read_num(xs, &format!("{front}/state")).map_err(Waited::Xen)?;
        if s.is_some_and(|s| s >= want && s <= state::CONNECTED) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(Waited::Timeout(s));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lock(m: &Mutex<Serving>) -> MutexGuard<'_, Serving> {
    // A panic in the serving thread leaves the state as consistent as any serve: the ring
    // answers are published at the end of a serve, or not at all.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PvVbd {
    fn front_dir(domid: u32, devid: u32) -> String {
        format!("{}/device/vbd/{devid}", home(domid))
    }

    fn back_dir(domid: u32, devid: u32) -> String {
        format!("{}/backend/colo-vbd/{domid}/{devid}", home(0))
    }

    /// Plugs disk `devid` (xenstore id; 51712 = xvda) backed by `store` into domain `domid`,
    /// waits up to `timeout` for its blkfront to connect, then serves it from a thread.
    pub fn create(
        domid: u32,
        devid: u32,
        store: Box<dyn VbdStore + Send>,
        timeout: Duration,
    ) -> Result<Self, PvVbdError> {
        let blocks = store.block_count();
        if blocks == 0 {
            return Err(PvVbdError::Store {
                blocks,
                why: "an empty disk",
            });
        }
        let Some(sectors) = blocks.checked_mul((BLOCK / 512) as u64) else {
            return Err(PvVbdError::Store {
                blocks,
                why: "too large",
            });
        };
        let xs = XenStore::open()?;
        let (front, back) = (Self::front_dir(domid, devid), Self::back_dir(domid, devid));
        xs.remove(&front)?;
        xs.remove(&back)?;
        // Until the device is built (its Drop unplugs it), a failure unplugs it here.
        let mut unplug = Unplug {
            dirs: Some([front.clone(), back.clone()]),
        };
        let node = |dir: &str, k: &str, v: &str| (format!("{dir}/{k}"), v.to_string());
        let back_perms = NodePerms {
            owner: 0,
            reader: domid,
        };
        // The directories first: a node's permissions are its own, and the guest must be able
        // to create its nodes (ring-ref, event-channel, protocol, state) in its directory.
        let back_nodes = vec![
            (back.clone(), String::new()),
            node(&back, "frontend", &front),
            node(&back, "frontend-id", &domid.to_string()),
            node(&back, "online", "1"),
            node(&back, "removable", "0"),
            node(&back, "state", &state::INITIALISING.to_string()),
            node(&back, "handle", &devid.to_string()),
            node(&back, "type", "colo"),
            node(&back, "mode", "w"),
            node(&back, "device-type", "disk"),
            node(&back, "sectors", &sectors.to_string()),
            node(&back, "info", "0"),
            node(&back, "sector-size", &BLOCK.to_string()),
            node(&back, "physical-sector-size", &BLOCK.to_string()),
            node(&back, "feature-flush-cache", "1"),
            node(&back, "feature-barrier", "0"),
            node(&back, "feature-discard", "0"),
            node(&back, "feature-persistent", "0"),
        ];
        xs.write_all(&back_nodes, back_perms)?;
        let front_nodes = vec![
            (front.clone(), String::new()),
            node(&front, "backend", &back),
            node(&front, "backend-id", "0"),
            node(&front, "state", &state::INITIALISING.to_string()),
            node(&front, "virtual-device", &devid.to_string()),
            node(&front, "device-type", "disk"),
        ];
        xs.write_all(
            &front_nodes,
            NodePerms {
                owner: domid,
                reader: 0,
            },
        )?;
        xs.write_all(
            &[node(&back, "state", &state::INIT_WAIT.to_string())],
            back_perms,
        )?;

        let start = Instant::now();
        let wait_front = |xs: &XenStore, want: u64, awaited: &'static str| {
            wait_state(xs, &front, want, start, timeout).map_err(|e| match e {
                Waited::Xen(e) => PvVbdError::Xen(e),
                Waited::Timeout(state) => PvVbdError::NoFrontend {
                    domid,
                    devid,
                    awaited,
                    secs: start.elapsed().as_secs_f64(),
                    state,
                },
            })
        };
        wait_front(&xs, state::INITIALISED, "Initialised")?;
        let frontend = |what: String| PvVbdError::Frontend { domid, what };
        for (k, why) in [
            (
                "ring-page-order",
                "a multi-page ring, which colo does not offer",
            ),
            (
                "multi-queue-num-queues",
                "several queues, which colo does not offer",
            ),
        ] {
            if let Some(v) = read_num(&xs, &format!("{front}/{k}"))? {
                if !(k == "ring-page-order" && v == 0 || k == "multi-queue-num-queues" && v == 1) {
                    return Err(frontend(format!("{k} = {v}: {why}")));
                }
            }
        }
        if let Some(p) = xs.read(&format!("{front}/protocol"))? {
            if p != "x86_64-abi" {
                return Err(frontend(format!(
                    "protocol {p:?}: colo serves the x86_64 ring layout only"
                )));
            }
        }
        let need = |k: &str| -> Result<u32, PvVbdError> {
            let v = read_num(&xs, &format!("{front}/{k}"))?
                .ok_or_else(|| frontend(format!("initialised without {front}/{k}")))?;
            u32::try_from(v).map_err(|_| frontend(format!("{k} {v} out of range")))
        };
        let (ring_ref, port) = (need("ring-ref")?, need("event-channel")?);
        let frames = ForeignFrames::open(domid)?;
        let grants = frames.map_grant_table(GRANT_FRAMES)?;
        let gfn = ring_gfn(domid, &grants, ring_ref)?;
        let ring = frames.map(&[gfn])?;
        let evt = Arc::new(EventChannel::bind(domid, port)?);
        let backend = BlkifBackend::attach(&BlkRing::new(ring.words(0))?, 0)?;
        let stats = Arc::new(VbdStats::default());
        let shared = Arc::new(Mutex::new(Serving {
            domid,
            frames,
            grants,
            ring,
            ring_gfn: gfn,
            ring_ref,
            port,
            backend,
            store,
            written: Vec::new(),
            quiesced: false,
            broken: None,
            evt: evt.clone(),
            stats: stats.clone(),
            shinfo: None,
        }));
        xs.write_all(
            &[node(&back, "state", &state::CONNECTED.to_string())],
            back_perms,
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, st) = (shared.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("pv-vbd-{domid}"))
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    if evt.wait(Duration::from_millis(100)).is_err() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    lock(&sh).serve();
                }
            })
            .map_err(|e| frontend(format!("starting its serving thread: {e}")))?;
        let vbd = Self {
            domid,
            devid,
            xs,
            shared,
            stats,
            stop,
            thread: Some(thread),
        };
        unplug.dirs = None;
        // blkfront reads the disk's size and features, then turns Connected.
        wait_front(&vbd.xs, state::CONNECTED, "Connected")?;
        Ok(vbd)
    }

    /// What the serving thread did so far.
    pub fn stats(&self) -> &VbdStats {
        &self.stats
    }

    /// Why the ring is served no more, if it broke.
    pub fn broken(&self) -> Option<String> {
        lock(&self.shared).broken.clone()
    }

    /// Stops answering the guest (before its domain is paused): returns once a serve in
    /// progress has finished; nothing of colo's reaches guest memory until [`PvVbd::release`].
    pub fn quiesce(&self) {
        lock(&self.shared).quiesced = true;
    }

    /// Answers the guest again (after its domain resumed), starting with what it queued
    /// meanwhile.
    pub fn release(&self) {
        let mut s = lock(&self.shared);
        s.quiesced = false;
        s.serve();
    }

    /// Every frame colo wrote since the last call — READ data, and the ring's frame (answers
    /// and event index) — so the caller adds them to the dirty set a checkpoint sends.
    pub fn take_written(&self, mut each: impl FnMut(u64)) {
        let mut s = lock(&self.shared);
        // A harvest begins a checkpoint: no kept mapping lives across one (see ForeignFrames).
        s.frames.forget_mappings();
        s.written.sort_unstable();
        s.written.dedup();
        for &g in &s.written {
            each(g);
        }
        each(s.ring_gfn);
        s.written.clear();
    }

    /// This disk's part of a checkpoint's state (see [`crate::pvblkstate`]), appended to
    /// `out`: the grant frames in use straight from the mapped table, then the fields.
    pub fn export(&self, out: &mut Vec<u8>) {
        let s = lock(&self.shared);
        let n = s.grants.export_in_use(out);
        let port_bits = s
            .shinfo
            .as_ref()
            .and_then(|m| evtbits::read(m.words(0), s.port))
            .map_or(0, PortBits::to_byte);
        VbdTrailer {
            ring_ref: s.ring_ref,
            port: s.port,
            port_bits,
            grant_frames: &[],
        }
        .encode_fields(n, out);
    }

    /// Makes this (paused) domain's disk what the PVM's was at the capture its memory was just
    /// loaded from: the PVM's grant entries copied into this domain's grant table, the ring at
    /// the PVM's ref served, the backend's index taken from it.
    pub fn import(&self, t: &VbdTrailer<'_>) -> Result<(), PvVbdError> {
        let mut s = lock(&self.shared);
        let domid = self.domid;
        if t.port != s.port {
            return Err(PvVbdError::Frontend {
                domid,
                what: format!(
                    "the primary's blkfront uses event channel {}, this domain's uses {}: both domains must boot \
                     the same way and get their devices plugged in the same order",
                    t.port, s.port
                ),
            });
        }
        if let Err(n) = s.grants.load(t.grant_frames) {
            return Err(PvVbdError::Frontend {
                domid,
                what: format!("{n} grant frames to load, {} mapped", s.grants.pages()),
            });
        }
        let gfn = ring_gfn(domid, &s.grants, t.ring_ref)?;
        if gfn != s.ring_gfn {
            s.ring = s.frames.map(&[gfn])?;
            s.ring_gfn = gfn;
        }
        s.ring_ref = t.ring_ref;
        s.backend = BlkifBackend::attach(&BlkRing::new(s.ring.words(0))?, 0)?;
        s.broken = None;
        // The port as the PVM's Xen had it (see crate::evtbits).
        if let (Some(m), Some(bits)) = (&s.shinfo, PortBits::from_byte(t.port_bits)) {
            if evtbits::restore(m.words(0), s.port, bits) && bits.pending {
                s.evt.notify()?;
            }
        }
        Ok(())
    }

    /// Maps the domain's shared-info page (`gfn`: `xc_domain_getinfo`'s `shared_info_frame`)
    /// so that the port's pending and mask bits travel with every checkpoint (see
    /// [`crate::evtbits`]). Both nodes call it; without it they are not carried.
    pub fn watch_event_bits(&self, gfn: u64) -> Result<(), PvVbdError> {
        let mut s = lock(&self.shared);
        let m = s.frames.map(&[gfn])?;
        s.shinfo = Some(m);
        Ok(())
    }
}

impl Drop for PvVbd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Unplug: the frontend sees its backend close, then the nodes go.
        let back = Self::back_dir(self.domid, self.devid);
        let _ = self.xs.write_all(
            &[(format!("{back}/state"), state::CLOSED.to_string())],
            NodePerms {
                owner: 0,
                reader: self.domid,
            },
        );
        let _ = self.xs.remove(&Self::front_dir(self.domid, self.devid));
        let _ = self.xs.remove(&back);
    }
}

//! A guest's PV network device served by colo from dom0: [`PvVif`] creates the device's
//! xenstore nodes (the guest's netfront sees a hot-plugged `vif`), answers the handshake, maps
//! the rings the frontend granted and binds its event channel, then moves frames with
//! [`crate::netif::NetifBackend`]. The backend's nodes live under a device type the kernel's
//! netback does not claim (`backend/colo-vif`), so colo is the guest's only network path.
//!
//! Handshake (xen/include/public/io/netif.h, XenbusState numbers): colo writes the frontend
//! and backend directories (both `Initialising`, 1) with the backend's features
//! (`feature-rx-copy` = 1: colo copies into the guest's receive buffers; no scatter-gather,
//! no segmentation offloads, one queue, one event channel), then `InitWait` (2); netfront
//! publishes `tx-ring-ref`, `rx-ring-ref`, `event-channel`, `request-rx-copy` and turns
//! `Connected` (4); colo maps and binds, then turns `Connected` itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::XenError;
use crate::evtbits::{self, PortBits};
use crate::grant::Access;
use crate::netif::{
    Delivery, FrameError, GuestFrames, NetifBackend, NetifError, SharedRing, TxPoll,
};
use crate::pvstate::VifTrailer;
use crate::pvsys::{home, read_num, EventChannel, ForeignFrames, Mapped, NodePerms, XenStore};

/// Grant frames colo maps (Xen's default `max_grant_frames` for a domU is 64).
const GRANT_FRAMES: usize = 64;

/// Why a PV vif could not be served.
#[derive(Debug, thiserror::Error)]
pub enum PvVifError {
    /// A Xen or xenstore call failed.
    #[error(transparent)]
    Xen(#[from] XenError),
    /// The rings broke.
    #[error(transparent)]
    Ring(#[from] NetifError),
    /// The frontend did not connect in time.
    #[error("domain {domid}'s netfront did not connect vif {devid} within {secs:.0} s (frontend state {state:?})")]
    NoFrontend {
        /// The guest.
        domid: u32,
        /// The device number.
        devid: u32,
        /// Seconds waited.
        secs: f64,
        /// The frontend's last state.
        state: Option<u64>,
    },
    /// The frontend published something colo cannot serve.
    #[error("domain {domid}'s netfront: {what}")]
    Frontend {
        /// The guest.
        domid: u32,
        /// What.
        what: String,
    },
}

/// One vif of a guest, served by colo.
#[derive(Debug)]
pub struct PvVif {
    domid: u32,
    devid: u32,
    xs: XenStore,
    frames: ForeignFrames,
    grants: Mapped,
    rings: Mapped,
    evt: Arc<EventChannel>,
    backend: NetifBackend,
    /// The frontend's ring refs and event channel (after an import: the PVM's).
    tx_ref: u32,
    rx_ref: u32,
    port: u32,
    /// The rings' frames.
    ring_gfns: [u64; 2],
    /// The domain's shared-info page, mapped ([`PvVif::watch_event_bits`]): the port's
    /// pending and mask bits travel with a checkpoint (see [`crate::evtbits`]).
    shinfo: Option<Mapped>,
    bits_restored: u64,
    /// Frames colo wrote since [`PvVif::take_written`] (receive buffers; the ring frames are
    /// added there).
    written: Vec<u64>,
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

fn ring_gfns(
    domid: u32,
    grants: &Mapped,
    tx_ref: u32,
    rx_ref: u32,
) -> Result<[u64; 2], PvVifError> {
    let t = grants.grant_table();
    let gfn = |r: u32| {
        t.resolve(r, 0, Access::Write)
            .map_err(|e| PvVifError::Frontend {
                domid,
                what: format!("ring: {e}"),
            })
    };
    Ok([gfn(tx_ref)?, gfn(rx_ref)?])
}

impl PvVif {
    fn front_dir(domid: u32, devid: u32) -> String {
        format!("{}/device/vif/{devid}", home(domid))
    }

    fn back_dir(domid: u32, devid: u32) -> String {
        format!("{}/backend/colo-vif/{domid}/{devid}", home(0))
    }

    /// Plugs vif `devid` with `mac` into domain `domid` and waits up to `timeout` for its
    /// netfront to connect.
    pub fn create(
        domid: u32,
        devid: u32,
        mac: [u8; 6],
        timeout: Duration,
    ) -> Result<Self, PvVifError> {
        let xs = XenStore::open()?;
        let (front, back) = (Self::front_dir(domid, devid), Self::back_dir(domid, devid));
        let mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        xs.remove(&front)?;
        xs.remove(&back)?;
        let node = |dir: &str, k: &str, v: &str| (format!("{dir}/{k}"), v.to_string());
        // The directories themselves first: a node's permissions are its own, and the guest
        // must be able to create its nodes (ring refs, features, state) in its directory.
        let back_nodes = vec![
            (back.clone(), String::new()),
            node(&back, "frontend", &front),
            node(&back, "frontend-id", &domid.to_string()),
            node(&back, "online", "1"),
            node(&back, "state", "1"),
            node(&back, "handle", &devid.to_string()),
            node(&back, "mac", &mac),
            node(&back, "feature-rx-copy", "1"),
            node(&back, "feature-rx-flip", "0"),
            node(&back, "feature-sg", "0"),
            node(&back, "feature-gso-tcpv4", "0"),
            node(&back, "feature-gso-tcpv6", "0"),
            node(&back, "feature-ipv6-csum-offload", "0"),
        ];
        xs.write_all(
            &back_nodes,
            NodePerms {
                owner: 0,
                reader: domid,
            },
        )?;
        let front_nodes = vec![
            (front.clone(), String::new()),
            node(&front, "backend", &back),
            node(&front, "backend-id", "0"),
            node(&front, "state", "1"),
            node(&front, "handle", &devid.to_string()),
            node(&front, "mac", &mac),
        ];
        xs.write_all(
            &front_nodes,
            NodePerms {
                owner: domid,
                reader: 0,
            },
        )?;
        xs.write_all(
            &[node(&back, "state", "2")],
            NodePerms {
                owner: 0,
                reader: domid,
            },
        )?;

        let start = Instant::now();
        let mut state;
        loop {
            state = read_num(&xs, &format!("{front}/state"))?;
            if state == Some(4) {
                break;
            }
            if start.elapsed() > timeout {
                return Err(PvVifError::NoFrontend {
                    domid,
                    devid,
                    secs: start.elapsed().as_secs_f64(),
                    state,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let need = |k: &str| -> Result<u64, PvVifError> {
            read_num(&xs, &format!("{front}/{k}"))?.ok_or_else(|| PvVifError::Frontend {
                domid,
                what: format!("connected without {front}/{k} (multi-queue is not offered)"),
            })
        };
        let (tx_ref, rx_ref, port) = (
            need("tx-ring-ref")?,
            need("rx-ring-ref")?,
            need("event-channel")?,
        );
        if read_num(&xs, &format!("{front}/request-rx-copy"))? != Some(1) {
            return Err(PvVifError::Frontend {
                domid,
                what: "does not request rx-copy".into(),
            });
        }
        let frames = ForeignFrames::open(domid)?;
        let grants = frames.map_grant_table(GRANT_FRAMES)?;
        let num = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| PvVifError::Frontend {
                domid,
                what: format!("{what} {v} out of range"),
            })
        };
        let (tx_ref, rx_ref, port) = (
            num(tx_ref, "tx-ring-ref")?,
            num(rx_ref, "rx-ring-ref")?,
            num(port, "event channel")?,
        );
        let ring_gfns = ring_gfns(domid, &grants, tx_ref, rx_ref)?;
        let rings = frames.map(&ring_gfns)?;
        let evt = Arc::new(EventChannel::bind(domid, port)?);
        eprintln!(
            "colo-xen: pv-vif: domain {domid}'s netfront connected: TX ring at gfn {:#x}, RX ring at gfn {:#x}, event channel {port}",
            ring_gfns[0], ring_gfns[1]
        );
        let backend = NetifBackend::attach(
            &SharedRing::tx(rings.words(0))?,
            &SharedRing::rx(rings.words(1))?,
            0,
        )?;
        xs.write_all(
            &[node(&back, "state", "4")],
            NodePerms {
                owner: 0,
                reader: domid,
            },
        )?;
        Ok(Self {
            domid,
            devid,
            xs,
            frames,
            grants,
            rings,
            evt,
            backend,
            tx_ref,
            rx_ref,
            port,
            ring_gfns,
            shinfo: None,
            bits_restored: 0,
            written: Vec::new(),
        })
    }

    /// Takes every frame the guest sent, hands each to `out`, kicks the guest if it asked.
    pub fn poll_tx(&mut self, out: impl FnMut(&[u8])) -> Result<TxPoll, PvVifError> {
        let table = self.grants.grant_table();
        let tx = SharedRing::tx(self.rings.words(0))?;
        let mut mem = Tracked {
            inner: &mut self.frames,
            written: &mut self.written,
        };
        let p = self.backend.poll_tx(&tx, &table, &mut mem, out)?;
        if p.notify {
            self.evt.notify()?;
        }
        Ok(p)
    }

    /// Delivers `frames` into the guest's receive buffers (as many as it posted), publishes
    /// them once and kicks the guest if it asked. Returns how many were taken (a frame the
    /// guest's buffer refused counts as taken and lost; its reason is returned).
    pub fn deliver(&mut self, frames: &[&[u8]]) -> Result<(usize, Vec<String>), PvVifError> {
        let table = self.grants.grant_table();
        let rx = SharedRing::rx(self.rings.words(1))?;
        let mut mem = Tracked {
            inner: &mut self.frames,
            written: &mut self.written,
        };
        let (mut n, mut faults) = (0, Vec::new());
        for f in frames {
            match self.backend.deliver(&rx, &table, &mut mem, f)? {
                Delivery::Delivered => n += 1,
                Delivery::NoBuffer => break,
                Delivery::GuestFault(w) => {
                    n += 1;
                    faults.push(w);
                }
            }
        }
        if self.backend.push_rx(&rx) {
            self.evt.notify()?;
        }
        Ok((n, faults))
    }

    /// Waits up to `timeout` for the guest's kick.
    pub fn wait(&self, timeout: Duration) -> Result<bool, PvVifError> {
        Ok(self.evt.wait(timeout)?)
    }

    /// A channel holding a message whenever the guest kicked its event channel (it queued
    /// frames or posted receive buffers); a thread waits for the kicks until the vif is dropped.
    pub fn signal(&self) -> Result<(crossbeam_channel::Receiver<()>, Arc<AtomicBool>), PvVifError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let stop = Arc::new(AtomicBool::new(false));
        let (evt, st) = (self.evt.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("pv-vif-{}", self.domid))
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match evt.wait(Duration::from_millis(100)) {
                        Ok(true) => {
                            let _ = tx.try_send(());
                        }
                        Ok(false) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
            .map_err(|e| PvVifError::Frontend {
                domid: self.domid,
                what: format!("starting its signal thread: {e}"),
            })?;
        Ok((rx, stop))
    }

    /// Every frame colo wrote since the last call — the receive buffers it filled and both
    /// ring frames (answers and event indices) — so the caller adds them to the dirty set a
    /// checkpoint sends (Xen's log does not see dom0's writes through a foreign mapping).
    pub fn take_written(&mut self, mut each: impl FnMut(u64)) {
        // A harvest begins a checkpoint: no kept mapping lives across one (see ForeignFrames).
        self.frames.forget_mappings();
        self.written.sort_unstable();
        self.written.dedup();
        for &g in self.written.iter().chain(self.ring_gfns.iter()) {
            each(g);
        }
        self.written.clear();
    }

    /// This vif's part of a checkpoint's state (see [`crate::pvstate`]), appended to `out`:
    /// the grant frames in use go from the mapped table straight into `out` (this runs in the
    /// checkpoint's pause: no intermediate copy, no allocation beyond `out`'s growth).
    pub fn export(&self, rx_seq: u64, out: &mut Vec<u8>) {
        let n = self.grants.export_in_use(out);
        let port_bits = self
            .shinfo
            .as_ref()
            .and_then(|m| evtbits::read(m.words(0), self.port))
            .map_or(0, PortBits::to_byte);
        VifTrailer {
            rx_seq,
            tx_ref: self.tx_ref,
            rx_ref: self.rx_ref,
            port: self.port,
            port_bits,
            grant_frames: &[],
        }
        .encode_fields(n, out);
    }

    /// Makes this (paused) domain's vif what the PVM's was at the capture its memory was just
    /// loaded from: the PVM's grant entries copied into this domain's grant table, the rings
    /// at the PVM's refs served, the backend's indices taken from them.
    pub fn import(&mut self, t: &VifTrailer<'_>) -> Result<(), PvVifError> {
        let domid = self.domid;
        if t.port != self.port {
            return Err(PvVifError::Frontend {
                domid,
                what: format!(
                    "the primary's netfront uses event channel {}, this domain's uses {}: both domains must boot \
                     the same way and get their vif plugged at the same point (before any other device)",
                    t.port, self.port
                ),
            });
        }
        if let Err(n) = self.grants.load(t.grant_frames) {
            return Err(PvVifError::Frontend {
                domid,
                what: format!("{n} grant frames to load, {} mapped", self.grants.pages()),
            });
        }
        let gfns = ring_gfns(domid, &self.grants, t.tx_ref, t.rx_ref)?;
        if gfns != self.ring_gfns {
            self.rings = self.frames.map(&gfns)?;
            self.ring_gfns = gfns;
        }
        (self.tx_ref, self.rx_ref) = (t.tx_ref, t.rx_ref);
        self.backend = NetifBackend::attach(
            &SharedRing::tx(self.rings.words(0))?,
            &SharedRing::rx(self.rings.words(1))?,
            0,
        )?;
        // The port as the PVM's Xen had it: masked or not, and an event still pending raised
        // again through this domain's Xen (which sets the selector and upcall as it would).
        if let (Some(m), Some(bits)) = (&self.shinfo, PortBits::from_byte(t.port_bits)) {
            if evtbits::restore(m.words(0), self.port, bits) && bits.pending {
                self.evt.notify()?;
            }
            self.bits_restored += 1;
        }
        Ok(())
    }

    /// Maps the domain's shared-info page (`gfn`: `xc_domain_getinfo`'s `shared_info_frame`)
    /// so that the port's pending and mask bits travel with every checkpoint: read in
    /// [`PvVif::export`] on the primary, restored in [`PvVif::import`] on the secondary (see
    /// [`crate::evtbits`] for why). Both nodes call it; without it they are not carried.
    pub fn watch_event_bits(&mut self, gfn: u64) -> Result<(), PvVifError> {
        self.shinfo = Some(self.frames.map(&[gfn])?);
        Ok(())
    }

    /// Loads that restored the port's bits (for the status and the tests).
    pub fn bits_restored(&self) -> u64 {
        self.bits_restored
    }
}

impl Drop for PvVif {
    fn drop(&mut self) {
        // Unplug: the frontend sees its backend close, then the nodes go.
        let back = Self::back_dir(self.domid, self.devid);
        let _ = self.xs.write_all(
            &[(format!("{back}/state"), "6".into())],
            NodePerms {
                owner: 0,
                reader: self.domid,
            },
        );
        let _ = self.xs.remove(&Self::front_dir(self.domid, self.devid));
        let _ = self.xs.remove(&back);
    }
}

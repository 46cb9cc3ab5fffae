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

use std::time::{Duration, Instant};

use crate::error::XenError;
use crate::grant::{Access, GrantTable};
use crate::netif::{Delivery, NetifBackend, NetifError, SharedRing, TxPoll};
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
    evt: EventChannel,
    backend: NetifBackend,
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
        let gfn = |r: u64| -> Result<u64, PvVifError> {
            let words: Vec<_> = (0..grants.pages()).map(|i| grants.words(i)).collect();
            let table = GrantTable::new(words).ok_or_else(|| PvVifError::Frontend {
                domid,
                what: "short grant frame".into(),
            })?;
            let r = u32::try_from(r).map_err(|_| PvVifError::Frontend {
                domid,
                what: format!("ring ref {r} out of range"),
            })?;
            table
                .resolve(r, 0, Access::Write)
                .map_err(|e| PvVifError::Frontend {
                    domid,
                    what: format!("ring: {e}"),
                })
        };
        let rings = frames.map(&[gfn(tx_ref)?, gfn(rx_ref)?])?;
        let port = u32::try_from(port).map_err(|_| PvVifError::Frontend {
            domid,
            what: format!("event channel {port}"),
        })?;
        let evt = EventChannel::bind(domid, port)?;
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
        })
    }

    /// Takes every frame the guest sent, hands each to `out`, kicks the guest if it asked.
    pub fn poll_tx(&mut self, out: impl FnMut(&[u8])) -> Result<TxPoll, PvVifError> {
        let words: Vec<_> = (0..self.grants.pages())
            .map(|i| self.grants.words(i))
            .collect();
        let table = GrantTable::new(words)
            .unwrap_or_else(|| unreachable!("mapped grant frames are whole pages"));
        let tx = SharedRing::tx(self.rings.words(0))?;
        let p = self.backend.poll_tx(&tx, &table, &mut self.frames, out)?;
        if p.notify {
            self.evt.notify()?;
        }
        Ok(p)
    }

    /// Delivers `frames` into the guest's receive buffers (as many as it posted), publishes
    /// them once and kicks the guest if it asked. Returns how many were taken.
    pub fn deliver(&mut self, frames: &[&[u8]]) -> Result<(usize, Vec<String>), PvVifError> {
        let words: Vec<_> = (0..self.grants.pages())
            .map(|i| self.grants.words(i))
            .collect();
        let table = GrantTable::new(words)
            .unwrap_or_else(|| unreachable!("mapped grant frames are whole pages"));
        let rx = SharedRing::rx(self.rings.words(1))?;
        let (mut n, mut faults) = (0, Vec::new());
        for f in frames {
            match self.backend.deliver(&rx, &table, &mut self.frames, f)? {
                Delivery::Delivered => n += 1,
                Delivery::NoBuffer => break,
                Delivery::GuestFault(w) => faults.push(w),
            }
        }
        let notify = self.backend.push_rx(&rx);
        drop(table);
        if notify {
            self.evt.notify()?;
        }
        Ok((n, faults))
    }

    /// Waits up to `timeout` for the guest's kick.
    pub fn wait(&self, timeout: Duration) -> Result<bool, PvVifError> {
        Ok(self.evt.wait(timeout)?)
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

//! The service side of a node: where requests for the guest come from and where the output
//! colo releases goes, as one trait ([`Service`]) the primary (and a secondary that took over)
//! uses without knowing which runs:
//!
//! - the mock network path, [`ClientHub`]: clients over TCP with length-prefixed frames
//!   (`--client ADDR`);
//! - with `--features xen`, `PortService`: an AF_PACKET port on a Linux interface on the service
//!   network (`--service-if colo0`: a tap or veth port on the service bridge, or a NIC). Every
//!   frame it receives is a request for the guest; a released frame is sent out of it; a
//!   survivor announces the guest's addresses out of it (gratuitous ARP, unsolicited NA).

use std::fmt::Debug;

use anyhow::Result;
use crossbeam_channel::Receiver;

use crate::clients::ClientHub;
use crate::node::NodeOptions;

/// A node's service side (see the module docs).
pub trait Service: Send + Debug {
    /// The channel requests arrive on, `(source id, frame)`, to wait on with the node's other
    /// event sources.
    fn receiver(&self) -> &Receiver<(u64, Vec<u8>)>;
    /// The next request, without waiting.
    fn try_recv(&mut self) -> Option<Vec<u8>>;
    /// Sends a released frame to the service network.
    fn deliver(&mut self, frame: &[u8]);
    /// Frames delivered so far.
    fn delivered(&self) -> u64;
    /// Where it serves (an address, or `if:NAME`), for the status.
    fn describe(&self) -> String;
    /// Announces the guest's addresses after a takeover (`frames`: gratuitous ARPs and
    /// unsolicited NAs); returns how many went out. The default sends none: the mock's clients
    /// talk TCP to colo and have no link layer to update.
    fn announce(&mut self, _frames: &[Vec<u8>]) -> usize {
        0
    }
}

impl Service for ClientHub {
    fn receiver(&self) -> &Receiver<(u64, Vec<u8>)> {
        ClientHub::receiver(self)
    }
    fn try_recv(&mut self) -> Option<Vec<u8>> {
        ClientHub::try_recv(self)
    }
    fn deliver(&mut self, frame: &[u8]) {
        ClientHub::deliver(self, frame);
    }
    fn delivered(&self) -> u64 {
        self.delivered
    }
    fn describe(&self) -> String {
        self.addr().to_string()
    }
}

/// The service side the options ask for: `--service-if` (an AF_PACKET port), else `--client`
/// (the mock's hub), else none.
pub fn open(opts: &NodeOptions) -> Result<Option<Box<dyn Service>>> {
    if let Some(name) = opts.service_if.as_deref() {
        return open_port(name);
    }
    Ok(match opts.client_addr.as_deref() {
        Some(addr) => Some(Box::new(ClientHub::bind(addr)?)),
        None => None,
    })
}

#[cfg(feature = "xen")]
fn open_port(name: &str) -> Result<Option<Box<dyn Service>>> {
    Ok(Some(Box::new(port::PortService::open(name)?)))
}

#[cfg(not(feature = "xen"))]
fn open_port(name: &str) -> Result<Option<Box<dyn Service>>> {
    anyhow::bail!(
        "--service-if {name}: this colo was built without Xen support (the AF_PACKET port is \
         in colo-xen); rebuild with --features xen"
    )
}

#[cfg(feature = "xen")]
pub use port::PortService;

#[cfg(feature = "xen")]
mod port {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::{Context, Result};
    use colo_xen::{PacketPort, VifError, MAX_PORT_FRAME};
    use crossbeam_channel::{Receiver, Sender};

    use super::Service;

    /// How often the reader looks at its stop flag.
    const TICK: Duration = Duration::from_millis(100);
    /// Attempts at a frame while the interface's queue is full before it is dropped (counted,
    /// logged).
    const SEND_TRIES: usize = 1000;

    /// An AF_PACKET port on the service network (`--service-if`).
    #[derive(Debug)]
    pub struct PortService {
        port: Arc<PacketPort>,
        rx: Receiver<(u64, Vec<u8>)>,
        stop: Arc<AtomicBool>,
        delivered: u64,
        /// Released frames the interface refused (too large, or its queue stayed full).
        pub dropped: u64,
    }

    impl PortService {
        /// Opens the port on interface `name` and starts its reader thread.
        pub fn open(name: &str) -> Result<Self> {
            let port =
                Arc::new(PacketPort::open(name).with_context(|| format!("--service-if {name}"))?);
            let (tx, rx) = crossbeam_channel::unbounded();
            let stop = Arc::new(AtomicBool::new(false));
            let (p2, s2) = (port.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("colo-svc-{name}"))
                .spawn(move || reader(&p2, &tx, &s2))
                .context("spawning the service port's reader")?;
            Ok(Self {
                port,
                rx,
                stop,
                delivered: 0,
                dropped: 0,
            })
        }

        fn send(&mut self, frame: &[u8]) -> bool {
            for _ in 0..SEND_TRIES {
                match self.port.send(frame) {
                    Ok(true) => return true,
                    Ok(false) => std::thread::yield_now(),
                    Err(e) => {
                        self.dropped += 1;
                        tracing::warn!("a released frame was dropped: {e}");
                        return false;
                    }
                }
            }
            self.dropped += 1;
            tracing::warn!(
                "a released frame was dropped: the queue of `{}` stayed full",
                self.port.name()
            );
            false
        }
    }

    impl Drop for PortService {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn reader(port: &PacketPort, tx: &Sender<(u64, Vec<u8>)>, stop: &AtomicBool) {
        let mut buf = vec![0u8; MAX_PORT_FRAME];
        while !stop.load(Ordering::Relaxed) {
            match port.recv(&mut buf) {
                Ok(Some(n)) => {
                    if tx.send((0, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    if let Err(e) = port.wait(TICK) {
                        tracing::error!("the service port stopped: {e}");
                        return;
                    }
                }
                Err(e @ VifError::TooBig { .. }) => tracing::warn!("a request was dropped: {e}"),
                Err(e) => {
                    tracing::error!("the service port stopped: {e}");
                    return;
                }
            }
        }
    }

    impl Service for PortService {
        fn receiver(&self) -> &Receiver<(u64, Vec<u8>)> {
            &self.rx
        }
        fn try_recv(&mut self) -> Option<Vec<u8>> {
            self.rx.try_recv().ok().map(|(_, f)| f)
        }
        fn deliver(&mut self, frame: &[u8]) {
            if self.send(frame) {
                self.delivered += 1;
            }
        }
        fn delivered(&self) -> u64 {
            self.delivered
        }
        fn describe(&self) -> String {
            format!("if:{}", self.port.name())
        }
        fn announce(&mut self, frames: &[Vec<u8>]) -> usize {
            frames.iter().filter(|f| self.send(f)).count()
        }
    }
}

//! The client-facing side of a node on the mock network path: clients connect over TCP and
//! exchange Ethernet frames, each preceded by its length as a big-endian u32 (the framing of
//! QEMU's mirror/redirector sockets). Responses go back to the client whose UDP or TCP port
//! they name.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

/// Largest frame accepted from a client (a jumbo Ethernet frame).
pub const MAX_FRAME: usize = 9216;

/// Reads one length-prefixed frame. `Ok(None)` on a clean EOF between frames.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<()>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} is outside 1..={MAX_FRAME}"),
        ));
    }
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(Some(()))
}

/// Writes one length-prefixed frame.
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(4 + frame.len());
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    w.write_all(&out)
}

/// Source and destination ports of a UDP or TCP frame, if it is one.
fn udp_ports(frame: &[u8]) -> Option<(u16, u16)> {
    let p = etherparse::SlicedPacket::from_ethernet(frame).ok()?;
    match p.transport? {
        etherparse::TransportSlice::Udp(u) => Some((u.source_port(), u.destination_port())),
        etherparse::TransportSlice::Tcp(t) => Some((t.source_port(), t.destination_port())),
        _ => None,
    }
}

/// Accepts clients and moves their frames to the node's loop.
#[derive(Debug)]
pub struct ClientHub {
    addr: SocketAddr,
    rx: Receiver<(u64, Vec<u8>)>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    ports: HashMap<u16, u64>,
    stop: Arc<AtomicBool>,
    /// Frames delivered to clients.
    pub delivered: u64,
}

impl ClientHub {
    /// Listens on `addr` for clients.
    pub fn bind(addr: &str) -> Result<Self> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("binding client address {addr}"))?;
        let local = listener.local_addr().context("client listener address")?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let conns: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, s2) = (conns.clone(), stop.clone());
        std::thread::Builder::new()
            .name("colo-clients".into())
            .spawn(move || accept_loop(listener, tx, c2, s2))
            .context("spawning the client acceptor")?;
        Ok(Self {
            addr: local,
            rx,
            conns,
            ports: HashMap::new(),
            stop,
            delivered: 0,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The channel requests arrive on (to wait on it together with other inputs).
    pub fn receiver(&self) -> &Receiver<(u64, Vec<u8>)> {
        &self.rx
    }

    /// The next request from any client, without waiting.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        let (conn, frame) = self.rx.try_recv().ok()?;
        if let Some((src, _)) = udp_ports(&frame) {
            self.ports.insert(src, conn);
        }
        Some(frame)
    }

    /// Sends a released frame to the client it is addressed to (by UDP or TCP destination port), or to
    /// every client when that is unknown.
    pub fn deliver(&mut self, frame: &[u8]) {
        let target = udp_ports(frame).and_then(|(_, dst)| self.ports.get(&dst).copied());
        let mut conns = self.conns.lock();
        let mut dead = Vec::new();
        for (id, s) in conns.iter_mut() {
            if target.is_some_and(|t| t != *id) {
                continue;
            }
            if write_frame(s, frame).is_err() {
                dead.push(*id);
            } else {
                self.delivered += 1;
            }
        }
        for id in dead {
            conns.remove(&id);
        }
    }
}

impl Drop for ClientHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (_, s) in self.conns.lock().drain() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    tx: Sender<(u64, Vec<u8>)>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    stop: Arc<AtomicBool>,
) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                let id = NEXT.fetch_add(1, Ordering::Relaxed);
                let Ok(reader) = s.try_clone() else { continue };
                conns.lock().insert(id, s);
                let (tx, conns) = (tx.clone(), conns.clone());
                let _ = std::thread::Builder::new()
                    .name(format!("colo-client-{id}"))
                    .spawn(move || client_reader(id, reader, tx, conns));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!("accepting a client failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn client_reader(
    id: u64,
    mut s: TcpStream,
    tx: Sender<(u64, Vec<u8>)>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
) {
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut s, &mut buf) {
            Ok(Some(())) => {
                if tx.send((id, buf.clone())).is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::info!("client {id} dropped: {e}");
                break;
            }
        }
    }
    conns.lock().remove(&id);
}

//! A fault-injecting TCP proxy for failover tests: forwards between a listening socket and a
//! target, counts the bytes in each direction, and on command delays them (seeded jitter),
//! stalls them (stops forwarding while keeping both sockets open), drops the connections, or
//! cuts everything at an exact byte offset. Cutting goes through a [`KillSwitch`] that several
//! proxies can share, so the death of a node (its replication link and its client sockets at
//! once) is one atomic event: after the switch fires, no proxy forwards another byte. With a
//! [`crate::tamper::Tampering`] plan it also changes the sealed records it forwards.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use crate::tamper::{Forward, Stage, Tampering};

/// How often blocked proxy threads look at their flags.
const TICK: Duration = Duration::from_millis(5);
/// Bytes read from a socket at once.
const CHUNK: usize = 64 * 1024;
/// No cut armed.
const NO_CUT: u64 = u64::MAX;

/// One failure shared by several proxies: once fired, every registered socket is shut down and
/// no proxy in the group forwards anything again.
#[derive(Debug, Default)]
pub struct KillSwitch {
    killed: AtomicBool,
    at: Mutex<Option<Instant>>,
    sockets: Mutex<Vec<TcpStream>>,
}

impl KillSwitch {
    /// A switch that has not fired.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Fires the switch. Returns true for the call that fired it, false if it already had.
    pub fn kill(&self) -> bool {
        // The time is set under its lock before the flag, so whoever sees the flag set finds
        // the time (killed_at waits for the lock).
        let mut at = self.at.lock();
        if self.killed.swap(true, Ordering::SeqCst) {
            return false;
        }
        *at = Some(Instant::now());
        drop(at);
        for s in self.sockets.lock().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        true
    }

    /// True once fired.
    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// When it fired.
    pub fn killed_at(&self) -> Option<Instant> {
        *self.at.lock()
    }

    /// Shuts `s` down when the switch fires (at once if it already has).
    pub fn register(&self, s: &TcpStream) {
        let Ok(clone) = s.try_clone() else {
            let _ = s.shutdown(Shutdown::Both);
            return;
        };
        let mut socks = self.sockets.lock();
        if self.is_killed() {
            let _ = clone.shutdown(Shutdown::Both);
        } else {
            socks.push(clone);
        }
    }
}

/// A direction through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the side that connected to the proxy towards the target.
    ToTarget,
    /// From the target back to the side that connected.
    FromTarget,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToTarget => 0,
            Direction::FromTarget => 1,
        }
    }
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    switch: Arc<KillSwitch>,
    stop: AtomicBool,
    stalled: AtomicBool,
    delay_us: AtomicU64,
    jitter_us: AtomicU64,
    rng: Mutex<u64>,
    forwarded: [AtomicU64; 2],
    cut_at: [AtomicU64; 2],
    conns: Mutex<Vec<TcpStream>>,
    accepted: AtomicU64,
    tamper: Mutex<Option<Arc<Tampering>>>,
}

impl Shared {
    fn dead(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.switch.is_killed()
    }

    /// Delay for the next chunk: base plus a seeded uniform jitter.
    fn next_delay(&self) -> Duration {
        let base = self.delay_us.load(Ordering::Relaxed);
        let jitter = self.jitter_us.load(Ordering::Relaxed);
        let extra = if jitter == 0 {
            0
        } else {
            let mut r = self.rng.lock();
            // splitmix64
            *r = r.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *r;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % (jitter + 1)
        };
        Duration::from_micros(base + extra)
    }
}

/// A fault-injecting proxy listening on a loopback port.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port and forwards every connection to `target`.
    /// `seed` drives the delay jitter; `switch` is the failure this proxy belongs to.
    pub fn start(target: SocketAddr, switch: Arc<KillSwitch>, seed: u64) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            target,
            switch,
            stop: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            jitter_us: AtomicU64::new(0),
            rng: Mutex::new(seed),
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
            cut_at: [AtomicU64::new(NO_CUT), AtomicU64::new(NO_CUT)],
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            tamper: Mutex::new(None),
        });
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("faultproxy-accept".into())
            .spawn(move || accept_loop(listener, sh))?;
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The kill switch this proxy obeys.
    pub fn switch(&self) -> &Arc<KillSwitch> {
        &self.shared.switch
    }

    /// Bytes forwarded so far in `dir` (over all connections).
    pub fn forwarded(&self, dir: Direction) -> u64 {
        self.shared.forwarded[dir.index()].load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Fires the kill switch once exactly `n` more bytes were forwarded in `dir` (the chunk that
    /// crosses the mark is forwarded up to it and no further).
    pub fn cut_after(&self, dir: Direction, n: u64) {
        let at = self.forwarded(dir).saturating_add(n).min(NO_CUT - 1);
        self.shared.cut_at[dir.index()].store(at, Ordering::SeqCst);
    }

    /// Holds every chunk for `base` plus a seeded uniform jitter in `0..=jitter` (order kept).
    pub fn set_delay(&self, base: Duration, jitter: Duration) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 4);
        self.shared.delay_us.store(us(base), Ordering::Relaxed);
        self.shared.jitter_us.store(us(jitter), Ordering::Relaxed);
    }

    /// Stops (true) or restarts (false) forwarding in both directions; the sockets stay open,
    /// so the peers see silence, not an error.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
    }

    /// Tampers with the connections accepted from now on as `plan` says (see
    /// [`crate::tamper`]).
    pub fn tamper(&self, plan: Arc<Tampering>) {
        *self.shared.tamper.lock() = Some(plan);
    }

    /// Shuts down the connections open now (both peers see the link break); the proxy keeps
    /// accepting new ones. Does not fire the kill switch.
    pub fn drop_connections(&self) {
        for s in self.shared.conns.lock().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.drop_connections();
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    // The listener is dropped when the switch fires, so connecting afterwards is refused, as
    // it is to a dead host's port.
    while !sh.dead() {
        match listener.accept() {
            Ok((inbound, _)) => {
                sh.accepted.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = connect_pair(inbound, &sh) {
                    tracing::debug!("fault proxy: connecting to {} failed: {e}", sh.target);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(TICK / 2),
            Err(e) => {
                tracing::debug!("fault proxy: accept failed: {e}");
                std::thread::sleep(TICK);
            }
        }
    }
}

fn connect_pair(inbound: TcpStream, sh: &Arc<Shared>) -> io::Result<()> {
    inbound.set_nonblocking(false)?;
    let outbound = TcpStream::connect_timeout(&sh.target, Duration::from_secs(1))?;
    for s in [&inbound, &outbound] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(TICK * 4))?;
        sh.switch.register(s);
        sh.conns.lock().push(s.try_clone()?);
    }
    if sh.dead() {
        let _ = inbound.shutdown(Shutdown::Both);
        let _ = outbound.shutdown(Shutdown::Both);
        return Ok(());
    }
    spawn_direction(
        inbound.try_clone()?,
        outbound.try_clone()?,
        Direction::ToTarget,
        sh,
    )?;
    spawn_direction(outbound, inbound, Direction::FromTarget, sh)?;
    Ok(())
}

/// A chunk to forward, due at the given time; an empty chunk stands for end of stream.
type Chunk = (Instant, Vec<u8>);

fn spawn_direction(
    from: TcpStream,
    to: TcpStream,
    dir: Direction,
    sh: &Arc<Shared>,
) -> io::Result<()> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let sh1 = sh.clone();
    let stage = sh.tamper.lock().clone().map(|t| Stage::new(t, dir));
    std::thread::Builder::new()
        .name("faultproxy-read".into())
        .spawn(move || reader(from, tx, &sh1, stage))?;
    let sh2 = sh.clone();
    std::thread::Builder::new()
        .name("faultproxy-write".into())
        .spawn(move || writer(to, rx, dir, &sh2))?;
    Ok(())
}

fn reader(mut from: TcpStream, tx: Sender<Chunk>, sh: &Shared, mut stage: Option<Stage>) {
    let mut buf = vec![0u8; CHUNK];
    let mut last_due = Instant::now();
    while !sh.dead() {
        if sh.stalled.load(Ordering::SeqCst) {
            // Stop reading too, so the sender's socket buffers fill as on a silent link.
            std::thread::sleep(TICK / 5);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send((Instant::now(), Vec::new()));
                return;
            }
            Ok(n) => {
                let due = (Instant::now() + sh.next_delay()).max(last_due);
                last_due = due;
                let Some(stage) = stage.as_mut() else {
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                    continue;
                };
                for f in stage.push(&buf[..n]) {
                    let chunk = match f {
                        Forward::Bytes(b) if b.is_empty() => continue,
                        Forward::Bytes(b) => b,
                        // The end of the stream.
                        Forward::Close => Vec::new(),
                    };
                    let end = chunk.is_empty();
                    if tx.send((due, chunk)).is_err() || end {
                        return;
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                let _ = tx.send((Instant::now(), Vec::new()));
                return;
            }
        }
    }
}

fn writer(mut to: TcpStream, rx: Receiver<Chunk>, dir: Direction, sh: &Shared) {
    let i = dir.index();
    loop {
        let (due, chunk) = match rx.recv_timeout(TICK * 4) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => {
                if sh.dead() {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        loop {
            if sh.dead() {
                return;
            }
            let now = Instant::now();
            if now < due {
                std::thread::sleep((due - now).min(TICK));
                continue;
            }
            if sh.stalled.load(Ordering::SeqCst) {
                std::thread::sleep(TICK / 5);
                continue;
            }
            break;
        }
        if chunk.is_empty() {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        let done = sh.forwarded[i].load(Ordering::SeqCst);
        let cut = sh.cut_at[i].load(Ordering::SeqCst);
        let len = chunk.len() as u64;
        if cut != NO_CUT && done.saturating_add(len) >= cut {
            let keep = usize::try_from(cut.saturating_sub(done)).unwrap_or(chunk.len());
            let keep = keep.min(chunk.len());
            if to.write_all(&chunk[..keep]).is_ok() {
                sh.forwarded[i].fetch_add(keep as u64, Ordering::SeqCst);
            }
            sh.switch.kill();
            return;
        }
        if to.write_all(&chunk).is_err() {
            return;
        }
        sh.forwarded[i].fetch_add(len, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that accepts one connection and returns it.
    fn server() -> (SocketAddr, JoinHandle<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        (
            addr,
            std::thread::spawn(move || l.accept().expect("accept").0),
        )
    }

    fn read_all(s: &mut TcpStream) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    #[test]
    fn forwards_both_ways_and_counts() {
        let (addr, srv) = server();
        let p = FaultProxy::start(addr, KillSwitch::new(), 1).expect("proxy");
        let mut c = TcpStream::connect(p.addr()).expect("connect");
        let mut s = srv.join().expect("server");
        c.write_all(b"hello").expect("write");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hello");
        s.write_all(b"abc").expect("write");
        let mut buf = [0u8; 3];
        c.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"abc");
        // The counters move right after the write the peer already read.
        let t = Instant::now();
        while (
            p.forwarded(Direction::ToTarget),
            p.forwarded(Direction::FromTarget),
        ) != (5, 3)
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(p.forwarded(Direction::ToTarget), 5);
        assert_eq!(p.forwarded(Direction::FromTarget), 3);
        assert_eq!(p.accepted(), 1);
    }

    #[test]
    fn cut_delivers_exactly_the_prefix_then_kills_the_group() {
        let (addr, srv) = server();
        let switch = KillSwitch::new();
        let p = FaultProxy::start(addr, switch.clone(), 2).expect("proxy");
        // A second proxy of the same group dies with the first.
        let (addr2, srv2) = server();
        let p2 = FaultProxy::start(addr2, switch.clone(), 3).expect("proxy");
        let mut c2 = TcpStream::connect(p2.addr()).expect("connect");
        let _s2 = srv2.join().expect("server");
        let mut c = TcpStream::connect(p.addr()).expect("connect");
        let mut s = srv.join().expect("server");
        p.cut_after(Direction::ToTarget, 1000);
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let _ = c.write_all(&data);
        let got = read_all(&mut s);
        assert_eq!(got, &data[..1000]);
        assert!(switch.is_killed() && switch.killed_at().is_some());
        // The other proxy's client sees its connection end, and nothing more is accepted: the
        // acceptor closes its listener at its next look at the switch (a busy machine may run
        // it late, so this waits for the refusal rather than a fixed while).
        assert!(read_all(&mut c2).is_empty());
        let t = Instant::now();
        while TcpStream::connect(p2.addr()).is_ok() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the dead proxy still accepts"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!switch.kill(), "a switch fires once");
    }

    #[test]
    fn stall_holds_data_until_released_and_delay_keeps_order() {
        let (addr, srv) = server();
        let p = FaultProxy::start(addr, KillSwitch::new(), 4).expect("proxy");
        let mut c = TcpStream::connect(p.addr()).expect("connect");
        let mut s = srv.join().expect("server");
        p.stall(true);
        c.write_all(b"stalled").expect("write");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        assert!(s.read(&mut buf).is_err(), "a stalled link forwards nothing");
        assert_eq!(p.forwarded(Direction::ToTarget), 0);
        p.set_delay(Duration::from_millis(2), Duration::from_millis(5));
        p.stall(false);
        for i in 0..50u8 {
            c.write_all(&[i]).expect("write");
        }
        drop(c);
        let got = read_all(&mut s);
        let mut want = b"stalled".to_vec();
        want.extend(0..50u8);
        assert_eq!(got, want, "delayed chunks arrive complete and in order");
    }

    #[test]
    fn dropping_connections_breaks_both_sides_without_firing_the_switch() {
        let (addr, srv) = server();
        let switch = KillSwitch::new();
        let p = FaultProxy::start(addr, switch.clone(), 5).expect("proxy");
        let mut c = TcpStream::connect(p.addr()).expect("connect");
        let mut s = srv.join().expect("server");
        c.write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("read");
        p.drop_connections();
        assert!(read_all(&mut s).is_empty());
        assert!(read_all(&mut c).is_empty());
        assert!(!switch.is_killed());
    }
}

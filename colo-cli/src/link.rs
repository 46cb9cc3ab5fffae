//! The replication link: one TCP connection per pair (TCP_NODELAY, 4 MiB socket buffers), read
//! with a deadline into a reusable buffer and decoded incrementally with colo-core's decoder,
//! written whole records at a time, with a keepalive thread that speaks while the node is busy.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use colo_core::engine::messages::Message;
use parking_lot::{Mutex, MutexGuard};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender, TryRecvError};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use colo_core::stream::{Decoder, DecoderConfig, Event, StreamError};
use socket2::SockRef;

/// Socket buffer size asked for on both sides: a checkpoint of a few thousand pages fits.
const SOCKET_BUFFER: usize = 4 << 20;
/// Read buffer: large enough that a page usually arrives whole and is borrowed, not copied.
const READ_BUFFER: usize = 1 << 20;

/// A chunk read from the socket: the buffer and how many bytes of it are valid.
pub(crate) type Chunk = io::Result<(Vec<u8>, usize)>;

/// Keepalive heartbeats carry sequence numbers with this bit set, so a stream dump tells them
/// from the state machine's own.
const KEEPALIVE_SEQ: u64 = 1 << 63;

/// The sending half, shared with the keepalive thread.
#[derive(Debug)]
struct Tx {
    /// Held for the whole of each write, so records never interleave.
    stream: Mutex<TcpStream>,
    /// Another handle on the socket, for shutting it down without waiting for a writer.
    ctl: TcpStream,
    /// When the last write ended, in ns since `epoch`.
    last_write: AtomicU64,
    epoch: Instant,
    /// Set when the link is dropped: the keepalive thread ends.
    closed: AtomicBool,
}

impl Tx {
    fn touch(&self) {
        let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_write.fetch_max(ns, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last_write.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Sends a heartbeat whenever nothing was written for `interval`, unless a write is under way.
///
/// The node's loop sends heartbeats itself, but not while it sits in one long backend call (a
/// slow hypervisor copying a large checkpoint, or digesting a whole guest, takes seconds); the
/// peer would read that silence as death. So silence means "process, host or network gone",
/// and a loop that is alive but stuck is caught by the state machine's progress timeout.
fn keepalive(tx: Arc<Tx>, interval: Duration) {
    let mut seq = 0u64;
    let mut frame = Vec::with_capacity(32);
    let tick = (interval / 2).max(Duration::from_millis(1));
    while !tx.closed.load(Ordering::Relaxed) {
        std::thread::sleep(tick);
        if tx.idle_for() < interval {
            continue;
        }
        // A write in progress is itself a sign of life (or blocked by the peer): skip.
        let Some(mut s) = tx.stream.try_lock() else {
            continue;
        };
        if tx.closed.load(Ordering::Relaxed) {
            return;
        }
        seq += 1;
        frame.clear();
        Message::Heartbeat(KEEPALIVE_SEQ | seq).encode(&mut frame);
        if s.write_all(&frame).is_err() {
            // The node's next write or read reports the broken link.
            return;
        }
        drop(s);
        tx.touch();
    }
}

/// Exclusive use of the link's sending half for a batch of whole records (see [`Link::writer`]).
#[derive(Debug)]
pub struct LinkWriter<'a> {
    guard: MutexGuard<'a, TcpStream>,
    tx: &'a Tx,
    /// The link's count of bytes written: every byte through this writer is counted.
    bytes_out: &'a mut u64,
}

impl Write for LinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.guard.write(buf)?;
        *self.bytes_out += n as u64;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self.guard.write_vectored(bufs)?;
        *self.bytes_out += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.guard.flush()
    }
}

impl Drop for LinkWriter<'_> {
    fn drop(&mut self) {
        self.tx.touch();
    }
}

/// The clock is read once per this many events of a [`ReadSlice`].
const CLOCK_EVERY: u32 = 64;

/// A node loop's time slice for consuming the link. The clock is read once per 64 events, not
/// per page: in a Xen PV dom0 under emulation reading it is a trap, and a 1M-pfn initial
/// synchronisation spent more time reading the clock than writing pages.
#[derive(Debug, Clone, Copy)]
pub struct ReadSlice {
    until: Instant,
    now: Instant,
    count: u32,
}

impl ReadSlice {
    /// A slice of `len` from now.
    pub fn new(len: Duration) -> Self {
        let now = Instant::now();
        Self {
            until: now + len,
            now,
            count: 0,
        }
    }

    /// The time as of the last reading (at most 64 events old).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Reads the clock now (for an event whose time matters: a protocol step, not a page).
    pub fn refresh(&mut self) -> Instant {
        self.now = Instant::now();
        self.now
    }

    /// The time to stamp `ev` with: a page takes the last reading, any other event (a protocol
    /// step, whose timing is measured) a fresh one.
    pub fn stamp(&mut self, ev: &Event<'_>) -> Instant {
        match ev {
            Event::Page { .. } => self.now,
            _ => self.refresh(),
        }
    }

    /// Counts one more event; false once the slice is over.
    fn tick(&mut self) -> bool {
        self.count = self.count.wrapping_add(1);
        if self.count % CLOCK_EVERY == 0 {
            self.now = Instant::now();
        }
        self.now <= self.until
    }
}

/// One end of the replication link.
///
/// A reader thread owns the receiving half: it reads into pooled buffers and hands them over a
/// channel, so the node's loop can wait for the link and its other inputs at once, with precise
/// timeouts (SO_RCVTIMEO is rounded to the kernel's tick). Buffers move, they are not copied; the
/// decoder borrows pages straight from them.
#[derive(Debug)]
pub struct Link {
    tx: Arc<Tx>,
    keepalive: bool,
    arrival: Arc<Arrival>,
    decoder: Decoder,
    rx: Receiver<Chunk>,
    pool: Sender<Vec<u8>>,
    cur: Option<(Vec<u8>, usize)>,
    pos: usize,
    failed: Option<io::Error>,
    peer: SocketAddr,
    /// Bytes written so far.
    bytes_out: u64,
    /// Bytes read so far.
    bytes_in: u64,
}

fn configure(stream: &TcpStream) -> Result<()> {
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let s = SockRef::from(stream);
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    Ok(())
}

/// Whole seconds left until `deadline`, rounded (for messages).
fn secs_left(deadline: Instant) -> u64 {
    deadline
        .saturating_duration_since(Instant::now())
        .as_secs_f64()
        .round() as u64
}

/// When bytes last arrived, in ns since `epoch` (0: never), written by the reader thread.
#[derive(Debug)]
struct Arrival {
    epoch: Instant,
    last: AtomicU64,
}

impl Arrival {
    fn stamp(&self) {
        let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(ns.max(1), Ordering::Relaxed);
    }

    fn last(&self) -> Option<Instant> {
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns)),
        }
    }
}

fn reader(mut s: TcpStream, tx: Sender<Chunk>, pool: Receiver<Vec<u8>>, arrival: Arc<Arrival>) {
    loop {
        let mut buf = pool.try_recv().unwrap_or_else(|_| vec![0; READ_BUFFER]);
        let res = s.read(&mut buf);
        arrival.stamp();
        match res {
            Ok(0) => {
                let _ = tx.send(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the link",
                )));
                return;
            }
            Ok(n) => {
                if tx.send(Ok((buf, n))).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

impl Link {
    fn new(stream: TcpStream, cfg: DecoderConfig) -> Result<Self> {
        configure(&stream)?;
        let peer = stream.peer_addr().context("peer address of the link")?;
        let read_half = stream.try_clone().context("cloning the link socket")?;
        let (tx, rx) = crossbeam_channel::bounded(16);
        let (pool_tx, pool_rx) = crossbeam_channel::bounded(16);
        let arrival = Arc::new(Arrival {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        });
        let stamps = arrival.clone();
        std::thread::Builder::new()
            .name("colo-link-rx".into())
            .spawn(move || reader(read_half, tx, pool_rx, stamps))
            .context("spawning the link reader")?;
        Ok(Self {
            tx: Arc::new(Tx {
                ctl: stream.try_clone().context("cloning the link socket")?,
                stream: Mutex::new(stream),
                last_write: AtomicU64::new(0),
                epoch: Instant::now(),
                closed: AtomicBool::new(false),
            }),
            keepalive: false,
            arrival,
            decoder: Decoder::new(cfg),
            rx,
            pool: pool_tx,
            cur: None,
            pos: 0,
            failed: None,
            peer,
            bytes_out: 0,
            bytes_in: 0,
        })
    }

    /// Connects to `addr`, retrying until `timeout` (the peer may still be starting). The first
    /// failed attempt is logged once (a warning naming the address and the time left), the
    /// retries are quiet.
    pub fn connect(addr: &str, timeout: Duration, cfg: DecoderConfig) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .with_context(|| format!("resolving peer address `{addr}`"))?
            .collect();
        let first = *addrs
            .first()
            .ok_or_else(|| anyhow!("peer address `{addr}` resolves to nothing"))?;
        let mut said = false;
        loop {
            match TcpStream::connect_timeout(&first, Duration::from_millis(500)) {
                Ok(s) => return Self::new(s, cfg),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot reach peer {addr} within {} s",
                            timeout.as_secs_f64()
                        )
                    })
                }
                Err(e) => {
                    if !said {
                        said = true;
                        tracing::warn!(
                            "cannot reach the peer at {addr} yet ({e}); retrying quietly until \
                             it is up, giving up in {} s (--connect-timeout)",
                            secs_left(deadline)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50))
                }
            }
        }
    }

    /// [`Link::connect`] on a helper thread, so the caller's loop (a node serving clients) never
    /// blocks on name resolution or connection attempts; [`PendingLink::poll`] hands over the
    /// result.
    pub fn connect_in_background(
        addr: &str,
        timeout: Duration,
        cfg: DecoderConfig,
    ) -> io::Result<PendingLink> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let addr = addr.to_string();
        std::thread::Builder::new()
            .name("colo-link-connect".into())
            .spawn(move || {
                let _ = tx.send(Self::connect(&addr, timeout, cfg));
            })?;
        Ok(PendingLink { rx })
    }

    /// Accepts one connection on `listener`, waiting at most `timeout` (None: forever).
    pub fn accept(
        listener: &TcpListener,
        timeout: Option<Duration>,
        cfg: DecoderConfig,
    ) -> Result<Self> {
        let deadline = timeout.map(|t| Instant::now() + t);
        listener
            .set_nonblocking(true)
            .context("listener nonblocking")?;
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut said = false;
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).context("link blocking mode")?;
                    return Self::new(s, cfg);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(anyhow!(
                            "no peer connected to {local} within {} s",
                            timeout.unwrap_or_default().as_secs_f64()
                        ));
                    }
                    if !said {
                        said = true;
                        match deadline {
                            Some(d) => tracing::warn!(
                                "waiting for the peer to connect to {local}; giving up in {} s \
                                 (--connect-timeout)",
                                secs_left(d)
                            ),
                            None => tracing::warn!("waiting for the peer to connect to {local}"),
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("accepting the peer's connection"),
            }
        }
    }

    /// When the reader thread last received bytes (or saw the link end), decoded or not.
    pub fn last_arrival(&self) -> Option<Instant> {
        self.arrival.last()
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Writes all of `bytes` (whole records: nothing else is written in between).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.writer().write_all(bytes)
    }

    /// Bytes written to the peer so far (every path counts: `send`, `writer`).
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    /// Bytes received from the peer so far.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    /// The sending half for a batch of whole records (vectored page writes); the keepalive
    /// thread stays out until the writer is dropped. Uncontended, this is a lock without a
    /// syscall.
    pub fn writer(&mut self) -> LinkWriter<'_> {
        LinkWriter {
            guard: self.tx.stream.lock(),
            tx: &self.tx,
            bytes_out: &mut self.bytes_out,
        }
    }

    /// From now on, a heartbeat goes out whenever nothing was written for `interval`, even
    /// while the caller is busy. Call it once the handshake is over (a heartbeat before it
    /// breaks the handshake); later calls do nothing.
    pub fn start_keepalive(&mut self, interval: Duration) -> io::Result<()> {
        if self.keepalive {
            return Ok(());
        }
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("colo-link-keepalive".into())
            .spawn(move || keepalive(tx, interval))?;
        self.keepalive = true;
        Ok(())
    }

    fn take(&mut self, chunk: Chunk) -> io::Result<()> {
        let (buf, n) = chunk?;
        self.bytes_in += n as u64;
        if let Some((old, _)) = self.cur.replace((buf, n)) {
            let _ = self.pool.try_send(old);
        }
        self.pos = 0;
        Ok(())
    }

    fn closed() -> io::Error {
        io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the link")
    }

    /// Waits up to `timeout` until bytes from the peer are buffered, or until `also` has a
    /// message (then returns without taking it). `Ok(false)`: nothing from the peer yet. A
    /// closed or broken link is an error.
    pub fn fill<T>(&mut self, timeout: Duration, also: Option<&Receiver<T>>) -> io::Result<bool> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.has_buffered() {
            return Ok(true);
        }
        let ready = match also {
            None => match self.rx.recv_timeout(timeout) {
                Ok(chunk) => {
                    self.take(chunk)?;
                    return Ok(true);
                }
                Err(RecvTimeoutError::Timeout) => return Ok(false),
                Err(RecvTimeoutError::Disconnected) => return Err(Self::closed()),
            },
            Some(other) => {
                let mut sel = Select::new();
                let mine = sel.recv(&self.rx);
                sel.recv(other);
                sel.ready_timeout(timeout).ok() == Some(mine)
            }
        };
        if !ready {
            return Ok(false);
        }
        match self.rx.try_recv() {
            Ok(chunk) => {
                self.take(chunk)?;
                Ok(true)
            }
            Err(TryRecvError::Empty) => Ok(false),
            Err(TryRecvError::Disconnected) => Err(Self::closed()),
        }
    }

    /// Decodes the next event from the bytes received so far; `Ok(None)` when more bytes are
    /// needed. A broken link shows up in the next [`Link::fill`].
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>, StreamError> {
        while self.cur.as_ref().is_some_and(|(_, n)| self.pos >= *n) {
            // The current chunk is used up: recycle it and move to the next one, if any.
            match self.rx.try_recv() {
                Ok(Ok((buf, n))) => {
                    self.bytes_in += n as u64;
                    if let Some((old, _)) = self.cur.replace((buf, n)) {
                        let _ = self.pool.try_send(old);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    // The next fill() reports it.
                    if let Some((old, _)) = self.cur.take() {
                        let _ = self.pool.try_send(old);
                    }
                    self.failed = Some(e);
                }
                Err(_) => {
                    if let Some((old, _)) = self.cur.take() {
                        let _ = self.pool.try_send(old);
                    }
                }
            }
        }
        let input: &[u8] = match &self.cur {
            Some((buf, n)) => &buf[self.pos..*n],
            None => &[],
        };
        // The decoder either yields an event or consumes everything it was given; some events
        // consume no bytes, so it is also called on an empty slice.
        let (used, ev) = self.decoder.feed(input)?;
        self.pos += used;
        Ok(ev)
    }

    /// [`Link::next_event`], or `Ok(None)` once the caller's time slice is over (what is left
    /// stays buffered for the next call).
    pub fn next_event_until(
        &mut self,
        slice: &mut ReadSlice,
    ) -> Result<Option<Event<'_>>, StreamError> {
        if !slice.tick() {
            return Ok(None);
        }
        self.next_event()
    }

    /// The channel to sleep on (with a node's other sources) until bytes arrive; None when the
    /// link needs no wait: bytes are buffered or a failure waits to be reported by
    /// [`Link::fill`].
    pub(crate) fn wait_handle(&self) -> Option<&Receiver<Chunk>> {
        (!self.has_buffered() && self.failed.is_none()).then_some(&self.rx)
    }

    /// True if received bytes wait to be decoded.
    pub fn has_buffered(&self) -> bool {
        self.cur.as_ref().is_some_and(|(_, n)| self.pos < *n)
    }

    /// Forgets bytes received but not decoded.
    pub fn discard_buffered(&mut self) {
        if let Some((old, _)) = self.cur.take() {
            let _ = self.pool.try_send(old);
        }
        self.pos = 0;
    }

    /// Shuts the sending direction down (the peer reads EOF after what was sent).
    pub fn shutdown_write(&self) {
        // No keepalive may follow the last record.
        self.tx.closed.store(true, Ordering::Relaxed);
        let _ = self.tx.ctl.shutdown(std::net::Shutdown::Write);
    }

    /// Shuts the connection down (both directions).
    pub fn shutdown(&self) {
        self.tx.closed.store(true, Ordering::Relaxed);
        let _ = self.tx.ctl.shutdown(std::net::Shutdown::Both);
    }
}

/// A [`Link::connect_in_background`] under way.
#[derive(Debug)]
pub struct PendingLink {
    rx: Receiver<Result<Link>>,
}

impl PendingLink {
    /// The connection's outcome once there is one; `None` while it is still trying.
    pub fn poll(&self) -> Option<Result<Link>> {
        match self.rx.try_recv() {
            Ok(res) => Some(res),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                Some(Err(anyhow!("the connecting thread ended without a result")))
            }
        }
    }
}

impl Drop for Link {
    /// Shuts the socket down so the reader thread (which holds a clone) ends and the peer sees
    /// the close at once, not when the reader next wakes.
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte written reaches the count, whichever path wrote it.
    #[test]
    fn bytes_out_counts_send_and_writer_alike() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cfg = DecoderConfig {
            expect_headers: false,
            page_count: None,
        };
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut all = Vec::new();
            io::Read::read_to_end(&mut s, &mut all).unwrap();
            all.len() as u64
        });
        let mut link = Link::connect(&addr, Duration::from_secs(5), cfg).unwrap();
        link.send(&[1; 100]).unwrap();
        let vectored = {
            let mut w = link.writer();
            w.write_all(&[2; 5000]).unwrap();
            let parts = [io::IoSlice::new(&[3; 7]), io::IoSlice::new(&[4; 70_000])];
            w.write_vectored(&parts).unwrap() as u64
        };
        assert!(vectored > 0);
        assert_eq!(link.bytes_out(), 100 + 5000 + vectored);
        link.shutdown_write();
        let got = reader.join().unwrap();
        assert_eq!(got, link.bytes_out());
    }
}

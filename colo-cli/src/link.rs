//! The replication link: one TCP connection per pair (TCP_NODELAY, 4 MiB socket buffers), read
//! with a deadline into a reusable buffer and decoded incrementally with colo-core's decoder,
//! written whole records at a time, with a keepalive thread that speaks while the node is busy.
//! With a pre-shared key (and without `--insecure-plaintext`) every byte after each side's
//! AUTH travels in colo-core's sealed frames ([`colo_core::seal`]): the writer seals whole
//! batches of records (one AEAD call per MiB), the reader thread reads each frame into a
//! pooled buffer, opens it in place and hands over only authenticated plaintext.
//!
//! With `--streams N` (N > 1, agreed in HELLO) each direction's bytes after its handshake are cut
//! into frames (sealed, or plaintext behind a length field) sent round-robin over N TCP
//! connections: the one the handshake ran on and N-1 more that the connecting side opens, each
//! beginning with a JOIN bound to both HELLO nonces ([`colo_core::stripe`]). One reader thread
//! per connection opens its frames; a merging thread hands them on in frame order, so the
//! decoder sees the bytes exactly as written. A connection that fails fails the link.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use colo_core::engine::messages::{Hello, Message, Role};
use colo_core::seal::{self, HandshakeTap, Opener, SealError, Sealer, TapOutcome};
use colo_core::stripe::{self, EndOutcome, Joined, Session, StripeError, StripeTap};
use parking_lot::{Condvar, Mutex, MutexGuard};

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

/// Plaintext per sealed frame: whole batches of records share one AEAD call per MiB, and a
/// whole frame fits one standard read buffer.
const SEAL_FRAME: usize = READ_BUFFER - seal::OVERHEAD;
/// Receive buffers kept for reuse: a checkpoint's kept buffers (tens for 10,000 pages) come
/// back here after its apply, so the next one does not allocate them again.
const POOL: usize = 128;
/// Most bytes read at once beyond a sealed frame's end (they are copied to the next frame's
/// buffer); a frame's own body is read straight into its buffer.
const READ_AHEAD: usize = 16 << 10;

/// How long the extra connections of a striped link may take to join once the handshake is
/// over (a peer that never opens them fails the link, it does not hang it).
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames each connection's reader may hold before the merging thread takes them.
const STREAM_QUEUE: usize = 4;

/// A chunk from the reader thread: a buffer and the range of it that holds stream bytes
/// (received as they are, or the plaintext of one authenticated frame).
pub(crate) type Chunk = io::Result<(Vec<u8>, Range<usize>)>;

/// What the sealing needs from both halves of a link: the key, and the HELLO each direction
/// carried (the writer sees this node's go out, the reader thread the peer's come in).
#[derive(Default)]
struct Keying {
    psk: Option<Vec<u8>>,
    ours: Option<Hello>,
    theirs: Option<Hello>,
    /// The connections this node asks for (`--streams`; 0 or 1: one).
    streams: u8,
    /// [`Link::set_key`] was called: `streams` and `psk` are final.
    configured: bool,
}

impl std::fmt::Debug for Keying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keying")
            .field("has_key", &self.psk.is_some())
            .field("ours", &self.ours.is_some())
            .field("theirs", &self.theirs.is_some())
            .field("streams", &self.streams)
            .finish()
    }
}

impl Keying {
    /// Whether the records after the handshake are sealed, with this node's key for `dir`
    /// (`Some` only then): `send` the one this node seals with, else the one it opens with.
    /// Errs if the peer's AUTH came before this node's HELLO went out (no honest peer can).
    fn key(&self, send: bool) -> Result<Option<seal::DirectionKey>, SealError> {
        let (Some(psk), Some(theirs)) = (&self.psk, &self.theirs) else {
            return Ok(None);
        };
        let Some(ours) = &self.ours else {
            return Err(SealError::Key);
        };
        if !seal::seals(ours, theirs) {
            return Ok(None);
        }
        let (tx, rx) = seal::session_keys(psk, ours.role, &ours.nonce, &theirs.nonce)?;
        Ok(Some(if send { tx } else { rx }))
    }
}

fn stripe_error(e: StripeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn sealing_error(e: SealError) -> io::Error {
    let kind = match e {
        SealError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e)
}

/// How this node's bytes go out.
#[derive(Debug)]
enum Outgoing {
    /// As they are (no key, `--insecure-plaintext`, or the handshake said so).
    Plain,
    /// The handshake is still going out: watched to find where sealing begins.
    Tapping(Box<HandshakeTap>),
    /// In sealed frames.
    Sealed(Box<Sealer>),
    /// Several connections (`--streams`): the handshake is still going out, watched to find
    /// where the frames begin.
    StripeTapping(Box<StripeTap>),
    /// Several connections: in frames, round-robin.
    Striped(Box<StripedOut>),
}

/// The sending side of a striped link.
#[derive(Debug)]
struct StripedOut {
    /// The direction key when the frames are sealed.
    key: Option<seal::DirectionKey>,
    /// The extra connections (1..N) once they joined.
    streams: Vec<TcpStream>,
    /// One sealer per connection (0..N) once they joined, when sealed.
    sealers: Vec<Sealer>,
    /// The next frame's number.
    next: u64,
    ready: bool,
}

/// The socket's sending side and what goes with it, under the link's write lock.
#[derive(Debug)]
struct TxInner {
    stream: TcpStream,
    out: Outgoing,
    /// The sealed frame being filled: length field, then plaintext.
    frame: Vec<u8>,
    /// A failed write that no caller saw yet (a frame sealed when a writer was dropped).
    failed: Option<io::Error>,
    /// The link's extra connections (shared with the reader thread that sets them up).
    fan: Arc<Fanout>,
}

impl TxInner {
    /// Sends `buf` (or a prefix of it, in plaintext) and returns how much was taken.
    fn write_records(&mut self, buf: &[u8], keying: &Mutex<Keying>) -> io::Result<usize> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        match &mut self.out {
            Outgoing::Plain => self.stream.write(buf),
            Outgoing::Sealed(_) | Outgoing::Striped(_) => {
                self.append(buf)?;
                Ok(buf.len())
            }
            Outgoing::StripeTapping(tap) => {
                let step = tap.feed(buf);
                if let Some(h) = tap.hello() {
                    keying.lock().ours.get_or_insert(*h);
                }
                match step {
                    EndOutcome::More => self.stream.write_all(buf)?,
                    EndOutcome::Other => {
                        self.out = Outgoing::Plain;
                        self.stream.write_all(buf)?;
                    }
                    EndOutcome::End { used } => {
                        self.stream.write_all(&buf[..used])?;
                        let key = keying.lock().key(true).map_err(sealing_error)?;
                        self.out = Outgoing::Striped(Box::new(StripedOut {
                            key,
                            streams: Vec::new(),
                            sealers: Vec::new(),
                            next: 0,
                            ready: false,
                        }));
                        Sealer::begin(&mut self.frame);
                        self.write_all_records(&buf[used..], keying)?;
                    }
                }
                Ok(buf.len())
            }
            Outgoing::Tapping(tap) => {
                let step = tap.feed(buf);
                if let Some(h) = tap.hello() {
                    keying.lock().ours.get_or_insert(*h);
                }
                match step {
                    TapOutcome::More => self.stream.write_all(buf)?,
                    TapOutcome::Plain => {
                        self.out = Outgoing::Plain;
                        self.stream.write_all(buf)?;
                    }
                    TapOutcome::SealAfter { used } => {
                        self.stream.write_all(&buf[..used])?;
                        self.out = match keying.lock().key(true).map_err(sealing_error)? {
                            Some(k) => {
                                tracing::info!(
                                    "replication link: records from here on are encrypted and \
                                     authenticated (AES-256-GCM)"
                                );
                                Outgoing::Sealed(Box::new(Sealer::new(k).map_err(sealing_error)?))
                            }
                            None => Outgoing::Plain,
                        };
                        Sealer::begin(&mut self.frame);
                        self.write_all_records(&buf[used..], keying)?;
                    }
                }
                Ok(buf.len())
            }
        }
    }

    fn write_all_records(&mut self, mut buf: &[u8], keying: &Mutex<Keying>) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_records(buf, keying)? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }

    /// Adds plaintext to the sealed frame, sending each frame that fills up.
    fn append(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.frame.capacity() < seal::HEADER_LEN + SEAL_FRAME + seal::TAG_LEN {
                self.frame
                    .reserve_exact(seal::HEADER_LEN + SEAL_FRAME + seal::TAG_LEN);
            }
            let room = SEAL_FRAME.saturating_sub(self.frame.len() - seal::HEADER_LEN);
            let take = room.min(buf.len());
            self.frame.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.frame.len() - seal::HEADER_LEN >= SEAL_FRAME {
                self.finish_frame()?;
            }
        }
        Ok(())
    }

    /// Seals and sends the frame being filled, if it holds anything.
    fn finish_frame(&mut self) -> io::Result<()> {
        if matches!(self.out, Outgoing::Striped(_)) {
            return self.finish_striped();
        }
        let Outgoing::Sealed(sealer) = &mut self.out else {
            return Ok(());
        };
        if self.frame.len() <= seal::HEADER_LEN {
            return Ok(());
        }
        let res = sealer
            .seal(&mut self.frame)
            .map_err(sealing_error)
            .and_then(|()| self.stream.write_all(&self.frame));
        Sealer::begin(&mut self.frame);
        res
    }
}

impl TxInner {
    /// Sends the frame being filled on its connection (striped links), sealed with that
    /// connection's key or behind a length field. The first frame waits until the extra
    /// connections joined.
    fn finish_striped(&mut self) -> io::Result<()> {
        let Outgoing::Striped(st) = &mut self.out else {
            return Ok(());
        };
        if self.frame.len() <= seal::HEADER_LEN {
            return Ok(());
        }
        if !st.ready {
            match self
                .fan
                .wait(Instant::now() + JOIN_TIMEOUT + Duration::from_secs(5))
            {
                Fan::Ready(streams) => {
                    if let Some(k) = &st.key {
                        let n = u8::try_from(streams.len() + 1).unwrap_or(u8::MAX);
                        for i in 0..n {
                            let key = seal::stream_key(k, i).map_err(sealing_error)?;
                            st.sealers.push(Sealer::new(key).map_err(sealing_error)?);
                        }
                    }
                    st.streams = streams;
                    st.ready = true;
                }
                Fan::Off if st.key.is_none() => {
                    // The peer asked for another count (the handshake refuses it): as they are.
                    self.out = Outgoing::Plain;
                    let res = self.stream.write_all(&self.frame[seal::HEADER_LEN..]);
                    self.frame.clear();
                    return res;
                }
                Fan::Off => {
                    return Err(io::Error::other(
                        "the link's connections were not agreed in the handshake",
                    ))
                }
                Fan::Awaiting => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the link's extra connections did not join in time",
                    ))
                }
                Fan::Failed(why) => return Err(io::Error::other(why)),
            }
        }
        let n = st.streams.len() + 1;
        let i = stripe::stream_of(st.next, n as u8);
        let res = match st.sealers.get_mut(i) {
            Some(sealer) => sealer.seal(&mut self.frame).map_err(sealing_error),
            None => {
                let len = self.frame.len() - stripe::FRAME_HEADER;
                self.frame[..stripe::FRAME_HEADER].copy_from_slice(&stripe::frame_header(len));
                Ok(())
            }
        }
        .and_then(|()| match i {
            0 => self.stream.write_all(&self.frame),
            _ => st.streams[i - 1].write_all(&self.frame),
        });
        st.next += 1;
        Sealer::begin(&mut self.frame);
        res
    }
}

/// Where a link's extra connections come from: the side that connected opens them to the
/// peer's address, the side that accepted takes them from its listener.
#[derive(Debug)]
enum Origin {
    Connected(SocketAddr),
    Accepted(Option<TcpListener>),
}

/// The state of a link's extra connections.
#[derive(Debug)]
enum Fan {
    /// Not known yet: the reader thread has not reached the end of the peer's handshake.
    Awaiting,
    /// One connection (not agreed, or one asked for).
    Off,
    /// Joined: the sending halves of connections 1..N.
    Ready(Vec<TcpStream>),
    /// Setting them up failed.
    Failed(String),
}

/// A link's extra connections, set up by the reader thread and awaited by the writer.
#[derive(Debug)]
struct Fanout {
    state: Mutex<Fan>,
    cond: Condvar,
    origin: Origin,
    /// Handles on every extra connection, for shutting them down.
    ctl: Mutex<Vec<TcpStream>>,
    /// The link was shut down: a set-up under way gives up.
    closed: AtomicBool,
    /// Connections in use once the extra ones joined (0 before).
    in_use: AtomicU64,
}

impl Fanout {
    fn new(origin: Origin) -> Self {
        Self {
            state: Mutex::new(Fan::Awaiting),
            cond: Condvar::new(),
            origin,
            ctl: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            in_use: AtomicU64::new(0),
        }
    }

    fn set(&self, fan: Fan) {
        let mut st = self.state.lock();
        if let Fan::Ready(v) = &fan {
            self.in_use.store(v.len() as u64 + 1, Ordering::Relaxed);
        }
        if matches!(*st, Fan::Awaiting) {
            *st = fan;
        }
        self.cond.notify_all();
    }

    /// The outcome (taking the connections), waiting until `deadline`; `Awaiting` if none came.
    fn wait(&self, deadline: Instant) -> Fan {
        let mut st = self.state.lock();
        while matches!(*st, Fan::Awaiting) {
            if self.cond.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
        match &mut *st {
            Fan::Ready(v) => Fan::Ready(std::mem::take(v)),
            Fan::Off => Fan::Off,
            Fan::Awaiting => Fan::Awaiting,
            Fan::Failed(why) => Fan::Failed(why.clone()),
        }
    }

    /// Shuts every extra connection down (`how`).
    fn shutdown(&self, how: std::net::Shutdown) {
        for s in self.ctl.lock().iter() {
            let _ = s.shutdown(how);
        }
    }
}

/// Keepalive heartbeats carry sequence numbers with this bit set, so a stream dump tells them
/// from the state machine's own.
const KEEPALIVE_SEQ: u64 = 1 << 63;

/// The sending half, shared with the keepalive thread.
#[derive(Debug)]
struct Tx {
    /// Held for the whole of each write, so records never interleave.
    stream: Mutex<TxInner>,
    /// Shared with the reader thread.
    keying: Arc<Mutex<Keying>>,
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
        if let Err(e) = s
            .write_all_records(&frame, &tx.keying)
            .and_then(|()| s.finish_frame())
        {
            // The node's next write or read reports the broken link.
            s.failed.get_or_insert(e);
            return;
        }
        drop(s);
        tx.touch();
    }
}

/// Exclusive use of the link's sending half for a batch of whole records (see [`Link::writer`]).
/// On a sealed link the batch is sealed in frames of 1 MiB as it fills and the last frame
/// when the writer is finished or dropped (a failure then is reported by the next write).
#[derive(Debug)]
pub struct LinkWriter<'a> {
    guard: MutexGuard<'a, TxInner>,
    tx: &'a Tx,
    /// The link's count of bytes written: every record byte through this writer is counted
    /// (before sealing).
    bytes_out: &'a mut u64,
}

impl LinkWriter<'_> {
    /// Sends what is buffered (the last sealed frame of the batch) and reports any failure.
    pub fn finish(&mut self) -> io::Result<()> {
        if let Some(e) = self.guard.failed.take() {
            return Err(e);
        }
        self.guard.finish_frame()
    }
}

impl Write for LinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.guard.write_records(buf, &self.tx.keying)?;
        *self.bytes_out += n as u64;
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = match self.guard.out {
            Outgoing::Plain => match self.guard.failed.take() {
                Some(e) => return Err(e),
                None => self.guard.stream.write_vectored(bufs)?,
            },
            Outgoing::Sealed(_) | Outgoing::Striped(_) => {
                let mut n = 0;
                for b in bufs {
                    self.guard.write_all_records(b, &self.tx.keying)?;
                    n += b.len();
                }
                n
            }
            Outgoing::Tapping(_) | Outgoing::StripeTapping(_) => {
                match bufs.iter().find(|b| !b.is_empty()) {
                    Some(b) => self.guard.write_records(b, &self.tx.keying)?,
                    None => 0,
                }
            }
        };
        *self.bytes_out += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.finish()?;
        self.guard.stream.flush()
    }
}

impl Drop for LinkWriter<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.guard.finish_frame() {
            self.guard.failed.get_or_insert(e);
        }
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
    /// The extra connections of a striped link (`--streams`).
    fan: Arc<Fanout>,
    keepalive: bool,
    arrival: Arc<Arrival>,
    decoder: Decoder,
    rx: Receiver<Chunk>,
    pool: Sender<Vec<u8>>,
    /// The buffer being decoded and where its stream bytes end; `pos` is the next one.
    cur: Option<(Vec<u8>, usize)>,
    pos: usize,
    /// The number of the buffer in `cur` (counted from 1 per link).
    cur_seq: u64,
    /// Buffers numbered from this on are kept when used up, not recycled (the secondary's
    /// staged pages point into them; see [`Link::keep_from`]).
    keep_from: Option<u64>,
    /// The buffers kept, by ascending number.
    kept: Vec<(u64, Vec<u8>)>,
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

/// The reader thread's ends: where it reads, where chunks go, the buffer pool, the arrival
/// stamp.
struct ReaderIo {
    s: TcpStream,
    tx: Sender<Chunk>,
    pool: Receiver<Vec<u8>>,
    arrival: Arc<Arrival>,
}

impl ReaderIo {
    /// A pooled buffer of at least `len` bytes (kept at its length: refilled, never zeroed
    /// again).
    fn buffer(&self, len: usize) -> Vec<u8> {
        let mut buf = self.pool.try_recv().unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf
    }

    /// One read; `Ok(0)` at the end of the stream.
    fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        loop {
            let res = self.s.read(into);
            self.arrival.stamp();
            match res {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    /// Hands a chunk over; false once the link is gone.
    fn send(&self, chunk: Chunk) -> bool {
        self.tx.send(chunk).is_ok()
    }
}

fn closed_by_peer() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the link")
}

/// The reader thread: the stream as it comes until the peer's AUTH; then, if the handshake
/// seals, one authenticated frame at a time. On a link of several connections it sets them up
/// where the peer's handshake ends and merges their frames from there on.
fn reader(mut io: ReaderIo, keying: Arc<Mutex<Keying>>, headers: bool, fan: Arc<Fanout>) {
    let mut tap = Some(HandshakeTap::with_headers(headers));
    let mut end = Some(StripeTap::with_headers(headers));
    loop {
        let mut buf = io.buffer(READ_BUFFER);
        let n = match io.read(&mut buf) {
            Ok(0) => {
                io.send(Err(closed_by_peer()));
                return;
            }
            Ok(n) => n,
            Err(e) => {
                io.send(Err(e));
                return;
            }
        };
        if let Some(e) = end.as_mut() {
            let step = e.feed(&buf[..n]);
            let theirs = e.hello().copied();
            if let Some(h) = theirs {
                keying.lock().theirs.get_or_insert(h);
            }
            match (step, theirs) {
                (EndOutcome::More, _) => {}
                (EndOutcome::End { used }, Some(theirs)) => {
                    end = None;
                    match striping(&keying, &theirs) {
                        Ok(None) => fan.set(Fan::Off),
                        Ok(Some((session, key))) => {
                            let carry = buf[used..n].to_vec();
                            if used > 0 && !io.send(Ok((buf, 0..used))) {
                                return;
                            }
                            striped(io, &fan, &session, key, carry);
                            return;
                        }
                        Err(e) => {
                            fan.set(Fan::Failed(e.to_string()));
                            io.send(Err(e));
                            return;
                        }
                    }
                }
                _ => {
                    end = None;
                    fan.set(Fan::Off);
                }
            }
        }
        let Some(t) = tap.as_mut() else {
            if !io.send(Ok((buf, 0..n))) {
                return;
            }
            continue;
        };
        let step = t.feed(&buf[..n]);
        if let Some(h) = t.hello() {
            keying.lock().theirs.get_or_insert(*h);
        }
        let used = match step {
            TapOutcome::More => n,
            TapOutcome::Plain => {
                tap = None;
                n
            }
            TapOutcome::SealAfter { used } => {
                tap = None;
                let key = keying.lock().key(false);
                match key.and_then(|k| k.map(Opener::new).transpose()) {
                    Ok(None) => n,
                    Ok(Some(opener)) => {
                        let carry = buf[used..n].to_vec();
                        if used > 0 && !io.send(Ok((buf, 0..used))) {
                            return;
                        }
                        read_frames(io, opener, carry);
                        return;
                    }
                    Err(e) => {
                        io.send(Err(sealing_error(e)));
                        return;
                    }
                }
            }
        };
        if !io.send(Ok((buf, 0..used))) {
            return;
        }
    }
}

/// Whether the link stripes, decided where the peer's handshake (HELLO `theirs`) ended: the
/// session the extra connections join and the key the peer seals with (None: plaintext). None
/// when either side asked for one connection or the counts differ (the handshake refuses that).
fn striping(
    keying: &Mutex<Keying>,
    theirs: &Hello,
) -> io::Result<Option<(Session, Option<seal::DirectionKey>)>> {
    if theirs.streams <= 1 {
        return Ok(None);
    }
    // This node's count and HELLO may not be set yet (the peer's HELLO can arrive before the
    // node configured a link it just accepted).
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        {
            let k = keying.lock();
            if k.configured && k.streams.max(1) != theirs.streams {
                return Ok(None);
            }
            if let (true, Some(ours)) = (k.configured, k.ours) {
                let session = Session::new(k.psk.as_deref(), &ours, theirs, theirs.streams);
                let key = k.key(false).map_err(sealing_error)?;
                return Ok(Some((session, key)));
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "this node's HELLO did not go out within 10 s of the peer's",
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Opens (connecting side) or accepts (accepting side) the extra connections of `session`;
/// connections 1..N in order.
fn join_streams(fan: &Fanout, session: &Session) -> io::Result<Vec<TcpStream>> {
    let n = session.streams();
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let timeout_err = |what: String| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} within {} s", JOIN_TIMEOUT.as_secs()),
        )
    };
    match &fan.origin {
        Origin::Connected(addr) => {
            let mut out = Vec::new();
            for i in 1..n {
                let left = deadline.saturating_duration_since(Instant::now());
                let mut s = TcpStream::connect_timeout(addr, left.max(Duration::from_millis(1)))
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("opening connection {i} of {n} to {addr}: {e}"),
                        )
                    })?;
                configure(&s).map_err(|e| io::Error::other(format!("{e:#}")))?;
                s.write_all(&session.join(i))?;
                fan.ctl.lock().push(s.try_clone()?);
                out.push(s);
            }
            Ok(out)
        }
        Origin::Accepted(None) => Err(io::Error::other(
            "no listener to accept the link's extra connections on",
        )),
        Origin::Accepted(Some(listener)) => {
            let mut slots: Vec<Option<TcpStream>> = (1..n).map(|_| None).collect();
            let mut joined = Joined::new(n);
            while !joined.complete() {
                if fan.closed.load(Ordering::Relaxed) {
                    return Err(closed_by_peer());
                }
                let now = Instant::now();
                if now >= deadline {
                    let missing = slots.iter().filter(|s| s.is_none()).count();
                    return Err(timeout_err(format!(
                        "{missing} of the link's {} extra connection(s) did not join",
                        n - 1
                    )));
                }
                let (mut s, from) = match listener.accept() {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(now)
                        .clamp(Duration::from_millis(1), Duration::from_secs(2)),
                ))?;
                let mut msg = [0u8; stripe::JOIN_LEN];
                if let Err(e) = s.read_exact(&mut msg) {
                    tracing::warn!("a connection from {from} sent no JOIN ({e}); dropped");
                    continue;
                }
                let index = match session.check_join(&msg) {
                    Ok(i) => i,
                    Err(e @ (StripeError::NotAJoin | StripeError::OtherSession)) => {
                        tracing::warn!("refused a connection from {from}: {e}");
                        continue;
                    }
                    Err(e) => return Err(stripe_error(e)),
                };
                joined.admit(index).map_err(stripe_error)?;
                s.set_read_timeout(None)?;
                configure(&s).map_err(|e| io::Error::other(format!("{e:#}")))?;
                fan.ctl.lock().push(s.try_clone()?);
                if let Some(slot) = slots.get_mut(usize::from(index) - 1) {
                    *slot = Some(s);
                }
            }
            Ok(slots.into_iter().flatten().collect())
        }
    }
}

/// The first failure of any of a striped link's connections (reported instead of the
/// closures it causes on the others).
type FirstError = Arc<Mutex<Option<(io::ErrorKind, String)>>>;

/// The striped phase of the reader thread: sets up the extra connections, starts a reader per
/// connection and merges their frames in order (frame `k` from connection `k mod N`).
fn striped(
    io: ReaderIo,
    fan: &Arc<Fanout>,
    session: &Session,
    key: Option<seal::DirectionKey>,
    carry: Vec<u8>,
) {
    let n = session.streams();
    let extra = match join_streams(fan, session) {
        Ok(v) => v,
        Err(e) => {
            fan.set(Fan::Failed(format!("the link's extra connections: {e}")));
            fan.shutdown(std::net::Shutdown::Both);
            io.send(Err(e));
            return;
        }
    };
    let mut reads = vec![io.s.try_clone()];
    let mut writes = Vec::new();
    for s in extra {
        reads.push(s.try_clone());
        writes.push(s);
    }
    let reads: io::Result<Vec<TcpStream>> = reads.into_iter().collect();
    let reads = match reads {
        Ok(r) => r,
        Err(e) => {
            fan.set(Fan::Failed(format!("the link's extra connections: {e}")));
            fan.shutdown(std::net::Shutdown::Both);
            io.send(Err(e));
            return;
        }
    };
    // A failing connection shuts all of them down, the first one included, so the merge never
    // waits on a connection of a broken link.
    if let Ok(main) = io.s.try_clone() {
        fan.ctl.lock().push(main);
    }
    tracing::info!(
        "replication link: {n} connections, frames round-robin{}",
        if key.is_some() { ", sealed" } else { "" }
    );
    fan.set(Fan::Ready(writes));
    if fan.closed.load(Ordering::Relaxed) {
        fan.shutdown(std::net::Shutdown::Both);
    }
    let first: FirstError = Arc::new(Mutex::new(None));
    let mut inputs = Vec::new();
    let mut carry = Some(carry);
    for (i, s) in reads.into_iter().enumerate() {
        let (tx, rx) = crossbeam_channel::bounded(STREAM_QUEUE);
        let sio = ReaderIo {
            s,
            tx,
            pool: io.pool.clone(),
            arrival: io.arrival.clone(),
        };
        let opener = match &key {
            Some(k) => match seal::stream_key(k, i as u8).and_then(Opener::new) {
                Ok(o) => Some(o),
                Err(e) => {
                    io.send(Err(sealing_error(e)));
                    fan.shutdown(std::net::Shutdown::Both);
                    return;
                }
            },
            None => None,
        };
        let (fan2, first2, c) = (fan.clone(), first.clone(), carry.take().unwrap_or_default());
        let spawned = std::thread::Builder::new()
            .name(format!("colo-link-rx{i}"))
            .spawn(move || stream_reader(sio, i as u8, opener, c, &fan2, &first2));
        if let Err(e) = spawned {
            io.send(Err(e));
            fan.shutdown(std::net::Shutdown::Both);
            return;
        }
        inputs.push(rx);
    }
    merge(&inputs, &io.tx, &first);
    // The link is gone or broken: no connection outlives it.
    fan.shutdown(std::net::Shutdown::Both);
    let _ = io.s.shutdown(std::net::Shutdown::Both);
}

/// Hands on the frames of `inputs` (one per connection) in order: frame `k` from input
/// `k mod N`. Ends at the first failure (reported as the first failure of any connection) or
/// when the link is gone.
fn merge(inputs: &[Receiver<Chunk>], out: &Sender<Chunk>, first: &FirstError) {
    let n = u8::try_from(inputs.len()).unwrap_or(u8::MAX);
    for k in 0u64.. {
        let chunk = match inputs[stripe::stream_of(k, n)].recv() {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(closed_by_peer()),
        };
        match chunk {
            Ok(c) => {
                if out.send(Ok(c)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let e = match first.lock().as_ref() {
                    Some((kind, why)) => io::Error::new(*kind, why.clone()),
                    None => e,
                };
                let _ = out.send(Err(e));
                return;
            }
        }
    }
}

/// One connection of a striped link: reads its frames (opening them when sealed) and queues
/// them for the merge. A failure is recorded as the link's first (if it is) and shuts every
/// connection down, so the merge never waits on a connection of a broken link.
fn stream_reader(
    mut io: ReaderIo,
    index: u8,
    mut opener: Option<Opener>,
    carried: Vec<u8>,
    fan: &Fanout,
    first: &FirstError,
) {
    let mut carry = Carry {
        end: carried.len(),
        buf: carried,
        start: 0,
    };
    loop {
        let next = match opener.as_mut() {
            Some(o) => next_frame(&mut io, o, &mut carry),
            None => next_plain_frame(&mut io, index, &mut carry),
        };
        match next {
            Ok(Some(chunk)) => {
                if !io.send(Ok(chunk)) {
                    return;
                }
            }
            Ok(None) => {
                // An orderly end between frames: the others end too when the peer closes.
                io.send(Err(closed_by_peer()));
                return;
            }
            Err(e) => {
                let why = format!("connection {index} of the link: {e}");
                first.lock().get_or_insert((e.kind(), why.clone()));
                io.send(Err(io::Error::new(e.kind(), why)));
                fan.shutdown(std::net::Shutdown::Both);
                let _ = io.s.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

/// Reads the next plaintext frame of connection `index` (length field, then its bytes);
/// `Ok(None)` when the connection ends between frames.
fn next_plain_frame(
    io: &mut ReaderIo,
    index: u8,
    carry: &mut Carry,
) -> io::Result<Option<(Vec<u8>, Range<usize>)>> {
    while carry.len() < stripe::FRAME_HEADER {
        if carry.fill(io)? == 0 {
            if carry.len() == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended inside a frame's length field",
            ));
        }
    }
    let h = &carry.buf[carry.start..carry.start + stripe::FRAME_HEADER];
    let want = stripe::frame_len([h[0], h[1], h[2], h[3]], index).map_err(stripe_error)?;
    carry.start += stripe::FRAME_HEADER;
    let mut buf = io.buffer(want.max(READ_BUFFER));
    let mut got = carry.take_into(&mut buf, want);
    while got < want {
        match io.read(&mut buf[got..want])? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the connection ended after {got} of a frame's {want} bytes"),
                ))
            }
            n => got += n,
        }
    }
    Ok(Some((buf, 0..want)))
}

/// Bytes read past the end of a frame, kept for the next ones.
struct Carry {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Carry {
    fn len(&self) -> usize {
        self.end - self.start
    }

    /// Moves up to `n` carried bytes to the front of `into`.
    fn take_into(&mut self, into: &mut [u8], n: usize) -> usize {
        let k = n.min(self.len()).min(into.len());
        into[..k].copy_from_slice(&self.buf[self.start..self.start + k]);
        self.start += k;
        k
    }

    /// Reads once more (at most [`READ_AHEAD`]) after what is carried; `Ok(0)` at the end of
    /// the stream.
    fn fill(&mut self, io: &mut ReaderIo) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < self.end + READ_AHEAD {
            self.buf.resize(self.end + READ_AHEAD, 0);
        }
        let n = io.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

/// The sealed phase of the reader thread: each frame is read into a pooled buffer (its body
/// straight from the socket), opened in place, and only its authenticated plaintext handed
/// over. Anything that fails authentication ends the link with the reason.
fn read_frames(mut io: ReaderIo, mut opener: Opener, carried: Vec<u8>) {
    let mut carry = Carry {
        end: carried.len(),
        buf: carried,
        start: 0,
    };
    loop {
        match next_frame(&mut io, &mut opener, &mut carry) {
            Ok(Some(chunk)) => {
                if !io.send(Ok(chunk)) {
                    return;
                }
            }
            Ok(None) => {
                io.send(Err(closed_by_peer()));
                return;
            }
            Err(e) => {
                io.send(Err(e));
                return;
            }
        }
    }
}

/// Reads and opens the next frame; `Ok(None)` when the stream ends between frames.
fn next_frame(
    io: &mut ReaderIo,
    opener: &mut Opener,
    carry: &mut Carry,
) -> io::Result<Option<(Vec<u8>, Range<usize>)>> {
    while carry.len() < seal::HEADER_LEN {
        if carry.fill(io)? == 0 {
            if carry.len() == 0 {
                return Ok(None);
            }
            return Err(sealing_error(
                opener.truncated(carry.len(), seal::HEADER_LEN),
            ));
        }
    }
    let h = &carry.buf[carry.start..carry.start + seal::HEADER_LEN];
    let want = opener
        .frame_len([h[0], h[1], h[2], h[3]])
        .map_err(sealing_error)?;
    let mut buf = io.buffer(want.max(SEAL_FRAME + seal::OVERHEAD));
    let mut got = carry.take_into(&mut buf, want);
    while got < want {
        match io.read(&mut buf[got..want])? {
            0 => return Err(sealing_error(opener.truncated(got, want))),
            n => got += n,
        }
    }
    let plain = opener.open(&mut buf[..want]).map_err(sealing_error)?;
    Ok(Some((buf, plain)))
}

/// Where an event's bytes were decoded from: receive buffer number `seq`, at addresses
/// `base..end` (its stream bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The buffer's number on this link (see [`Link::buffer`]).
    pub seq: u64,
    base: usize,
    end: usize,
}

impl Span {
    /// No buffer.
    pub(crate) const NONE: Span = Span {
        seq: 0,
        base: 0,
        end: 0,
    };

    /// Buffer number `seq` holding `bytes` (for tests of what refers to buffers).
    #[cfg(test)]
    pub(crate) fn over(seq: u64, bytes: &[u8]) -> Span {
        let base = bytes.as_ptr() as usize;
        Span {
            seq,
            base,
            end: base + bytes.len(),
        }
    }

    /// The offset of `data` in the buffer, if all of it lies there (the decoder hands out
    /// pages from its own buffer when they straddle two receive buffers or were unpacked).
    pub fn offset_of(&self, data: &[u8]) -> Option<usize> {
        let at = data.as_ptr() as usize;
        (self.seq != 0 && at >= self.base && at + data.len() <= self.end).then(|| at - self.base)
    }
}

impl Link {
    fn new(stream: TcpStream, cfg: DecoderConfig, origin: Origin) -> Result<Self> {
        configure(&stream)?;
        let peer = stream.peer_addr().context("peer address of the link")?;
        let read_half = stream.try_clone().context("cloning the link socket")?;
        let (tx, rx) = crossbeam_channel::bounded(16);
        let (pool_tx, pool_rx) = crossbeam_channel::bounded(POOL);
        let arrival = Arc::new(Arrival {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        });
        let keying = Arc::new(Mutex::new(Keying::default()));
        let io = ReaderIo {
            s: read_half,
            tx,
            pool: pool_rx,
            arrival: arrival.clone(),
        };
        let fan = Arc::new(Fanout::new(origin));
        let (k, headers, f) = (keying.clone(), cfg.expect_headers, fan.clone());
        std::thread::Builder::new()
            .name("colo-link-rx".into())
            .spawn(move || reader(io, k, headers, f))
            .context("spawning the link reader")?;
        Ok(Self {
            fan: fan.clone(),
            tx: Arc::new(Tx {
                ctl: stream.try_clone().context("cloning the link socket")?,
                stream: Mutex::new(TxInner {
                    stream,
                    out: Outgoing::Plain,
                    frame: Vec::new(),
                    failed: None,
                    fan,
                }),
                keying,
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
            cur_seq: 0,
            keep_from: None,
            kept: Vec::new(),
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
                Ok(s) => return Self::new(s, cfg, Origin::Connected(first)),
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
                    // Kept for a striped link's extra connections (only the handshake says
                    // whether there will be any).
                    let origin = Origin::Accepted(listener.try_clone().ok());
                    return Self::new(s, cfg, origin);
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

    /// Seals the records after the handshake with keys derived from `key` (see
    /// [`colo_core::seal`]) when both HELLOs ask for it: both sides hold a key and neither
    /// gave `--insecure-plaintext`. This node plays `role`. Call it before this node's HELLO
    /// goes out; without a key (None) the link stays plaintext.
    pub fn set_key(&mut self, role: Role, key: Option<&[u8]>) {
        let streams = {
            let mut k = self.tx.keying.lock();
            k.configured = true;
            k.streams
        };
        if streams > 1 {
            let tap = StripeTap::with_headers(role == Role::Primary);
            self.tx.stream.lock().out = Outgoing::StripeTapping(Box::new(tap));
        }
        let Some(key) = key else {
            // Said once per process: a secondary refusing stray connections would repeat it.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    "no --key-file: the replication link with {} is neither authenticated nor \
                     encrypted; anyone on the path can read guest memory or inject records",
                    self.peer
                )
            });
            return;
        };
        self.tx.keying.lock().psk = Some(key.to_vec());
        if streams <= 1 {
            self.tx.stream.lock().out = Outgoing::Tapping(Box::new(HandshakeTap::new(role)));
        }
    }

    /// Asks for `n` connections (`--streams`; 1: one, as without the option). Call it before
    /// [`Link::set_key`]; the handshake must agree (see [`colo_core::stripe`]).
    pub fn set_streams(&mut self, n: u8) {
        self.tx.keying.lock().streams = n.clamp(1, colo_core::engine::messages::MAX_STREAMS);
    }

    /// True once this node's records go out sealed.
    pub fn is_sealed(&self) -> bool {
        match &self.tx.stream.lock().out {
            Outgoing::Sealed(_) => true,
            Outgoing::Striped(st) => st.key.is_some(),
            _ => false,
        }
    }

    /// Connections the link's records travel on (1 until a striped link's extra connections
    /// joined). Takes no lock: a node may ask at every turn of its loop.
    pub fn streams(&self) -> usize {
        (self.fan.in_use.load(Ordering::Relaxed) as usize).max(1)
    }

    /// Writes all of `bytes` (whole records: nothing else is written in between).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut w = self.writer();
        w.write_all(bytes)?;
        w.finish()
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
        let (buf, range) = chunk?;
        self.install(buf, range);
        Ok(())
    }

    /// Makes `buf[range]` the bytes to decode next, recycling the previous buffer.
    fn install(&mut self, buf: Vec<u8>, range: Range<usize>) {
        self.bytes_in += range.len() as u64;
        if let Some((old, end)) = self.cur.replace((buf, range.end)) {
            self.retire(self.cur_seq, old, end);
        }
        self.cur_seq += 1;
        self.pos = range.start;
    }

    /// A used-up buffer whose stream bytes end at `end`: kept if it may hold staged pages,
    /// else back to the reader's pool. Of a kept buffer less than half full (a short read:
    /// the reader caught up with the sender, or a slow link) only its bytes are kept, copied
    /// out, so what a checkpoint keeps stays within twice its size (staged pages are found by
    /// offset, so the move does not matter); the buffer itself goes back to the pool whole, so
    /// the reader reuses it as it is instead of growing a shrunk one again (a 1 MiB zero-fill
    /// and its page faults, tens of times per 10,000-page checkpoint).
    fn retire(&mut self, seq: u64, mut buf: Vec<u8>, end: usize) {
        if self.keep_from.is_some_and(|k| seq >= k) {
            if end < buf.capacity() / 2 {
                let bytes = buf.get(..end).unwrap_or_default().to_vec();
                let _ = self.pool.try_send(std::mem::replace(&mut buf, bytes));
            }
            self.kept.push((seq, buf));
        } else {
            let _ = self.pool.try_send(buf);
        }
    }

    /// The current buffer goes (used up, or the link failed).
    fn drop_current(&mut self) {
        if let Some((old, end)) = self.cur.take() {
            self.retire(self.cur_seq, old, end);
        }
    }

    /// Keeps every receive buffer numbered `from` on (see [`Span`]) once it is used up, until
    /// a later call moves `from` past it (or None: keeps nothing); those buffers go back to
    /// the pool then. Cheap when `from` did not change.
    pub fn keep_from(&mut self, from: Option<u64>) {
        if from == self.keep_from {
            return;
        }
        self.keep_from = from;
        let cut = self
            .kept
            .partition_point(|(seq, _)| from.is_none_or(|k| *seq < k));
        // The bytes copied out of short reads are not worth pooling (the reader would grow
        // them again); whole buffers are.
        for (_, buf) in self.kept.drain(..cut) {
            if buf.capacity() >= READ_BUFFER / 2 {
                let _ = self.pool.try_send(buf);
            }
        }
    }

    /// Receive buffer number `seq` (the current one or a kept one), whole.
    pub fn buffer(&self, seq: u64) -> Option<&[u8]> {
        if let Some((b, _)) = self.cur.as_ref().filter(|_| seq == self.cur_seq) {
            return Some(b);
        }
        // Not current: kept (the current one too, once it is used up and none follows yet).
        let i = self.kept.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        Some(&self.kept[i].1)
    }

    /// Buffers kept now (for the log).
    pub fn kept_buffers(&self) -> usize {
        self.kept.len()
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
                Err(RecvTimeoutError::Disconnected) => return Err(closed_by_peer()),
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
            Err(TryRecvError::Disconnected) => Err(closed_by_peer()),
        }
    }

    /// [`Link::next_event`], with the receive buffer the event's bytes were decoded from (a
    /// page whose data lies in it may be referenced there instead of copied; see
    /// [`Link::keep_from`]).
    pub fn next_event_spanned(&mut self) -> Result<Option<(Event<'_>, Span)>, StreamError> {
        while self.cur.as_ref().is_some_and(|(_, n)| self.pos >= *n) {
            // The current chunk is used up: recycle it and move to the next one, if any.
            match self.rx.try_recv() {
                Ok(Ok((buf, range))) => self.install(buf, range),
                Ok(Err(e)) => {
                    // The next fill() reports it.
                    self.drop_current();
                    self.failed = Some(e);
                }
                Err(_) => self.drop_current(),
            }
        }
        let (input, span): (&[u8], Span) = match &self.cur {
            Some((buf, n)) => (
                &buf[self.pos..*n],
                Span {
                    seq: self.cur_seq,
                    base: buf.as_ptr() as usize,
                    end: buf.as_ptr() as usize + *n,
                },
            ),
            None => (&[], Span::NONE),
        };
        // The decoder either yields an event or consumes everything it was given; some events
        // consume no bytes, so it is also called on an empty slice.
        let (used, ev) = self.decoder.feed(input)?;
        self.pos += used;
        Ok(ev.map(|ev| (ev, span)))
    }

    /// Decodes the next event from the bytes received so far; `Ok(None)` when more bytes are
    /// needed. A broken link shows up in the next [`Link::fill`].
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>, StreamError> {
        Ok(self.next_event_spanned()?.map(|(ev, _)| ev))
    }

    /// [`Link::next_event`], or `Ok(None)` once the caller's time slice is over (what is left
    /// stays buffered for the next call).
    pub fn next_event_until(
        &mut self,
        slice: &mut ReadSlice,
    ) -> Result<Option<(Event<'_>, Span)>, StreamError> {
        if !slice.tick() {
            return Ok(None);
        }
        self.next_event_spanned()
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
        self.drop_current();
        self.pos = 0;
    }

    /// Shuts the sending direction down (the peer reads EOF after what was sent).
    pub fn shutdown_write(&self) {
        // No keepalive may follow the last record.
        self.tx.closed.store(true, Ordering::Relaxed);
        let _ = self.tx.ctl.shutdown(std::net::Shutdown::Write);
        self.fan.shutdown(std::net::Shutdown::Write);
    }

    /// Shuts the connection down (both directions).
    pub fn shutdown(&self) {
        self.tx.closed.store(true, Ordering::Relaxed);
        self.fan.closed.store(true, Ordering::Relaxed);
        let _ = self.tx.ctl.shutdown(std::net::Shutdown::Both);
        self.fan.shutdown(std::net::Shutdown::Both);
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

    /// Pages referred to where they were received stay readable in the buffers the link keeps,
    /// however the stream was split into reads (a page across two reads is not referable);
    /// released buffers go back.
    #[test]
    fn kept_buffers_hold_the_pages_referred_to() {
        use colo_core::stream::{encode_page_data_header, PageType};
        use colo_core::PAGE_SIZE;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pages = 3000u64;
        let fill = |p: u64| (p % 251) as u8;
        let writer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut buf = Vec::new();
            for batch in 0..3 {
                let entries: Vec<(u64, PageType)> = (batch * 1000..(batch + 1) * 1000)
                    .map(|p| (p, PageType::Notab))
                    .collect();
                buf.clear();
                encode_page_data_header(&mut buf, &entries).unwrap();
                for (p, _) in &entries {
                    buf.resize(buf.len() + PAGE_SIZE, fill(*p));
                }
                for part in buf.chunks(70_001) {
                    s.write_all(part).unwrap();
                }
            }
            s
        });
        let cfg = DecoderConfig {
            expect_headers: false,
            page_count: Some(pages),
        };
        let mut link = Link::accept(&listener, Some(Duration::from_secs(10)), cfg).unwrap();
        link.keep_from(Some(1));
        let (mut refs, mut copied, mut seen) = (Vec::new(), 0, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen < pages {
            assert!(Instant::now() < deadline, "only {seen} pages within 20 s");
            match link.next_event_spanned().unwrap() {
                Some((
                    Event::Page {
                        pfn, data: Some(d), ..
                    },
                    span,
                )) => {
                    seen += 1;
                    assert!(d.iter().all(|&x| x == fill(pfn)));
                    match span.offset_of(d) {
                        Some(off) => refs.push((pfn, span.seq, off)),
                        None => copied += 1,
                    }
                }
                Some(_) => {}
                None => {
                    link.fill::<()>(Duration::from_millis(50), None).unwrap();
                }
            }
        }
        let _stream = writer.join().unwrap();
        assert!(
            refs.len() as u64 + copied == pages && refs.len() > 2000,
            "{copied} copied"
        );
        for &(pfn, seq, off) in &refs {
            let b = link.buffer(seq).expect("a kept buffer");
            assert!(
                b[off..off + PAGE_SIZE].iter().all(|&x| x == fill(pfn)),
                "pfn {pfn}"
            );
        }
        assert!(link.kept_buffers() > 0);
        link.keep_from(None);
        assert_eq!(link.kept_buffers(), 0);
    }

    /// The next colo record from `link` (headers skipped) as (type, body), waiting up to 10 s.
    fn next_record(link: &mut Link) -> (u32, Vec<u8>) {
        use colo_core::stream::Record;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no record within 10 s");
            match link.next_event().unwrap() {
                Some(Event::Record(Record::Optional { rtype, body })) => {
                    return (rtype, body.to_vec())
                }
                Some(_) => {}
                None => {
                    link.fill::<()>(Duration::from_millis(50), None).unwrap();
                }
            }
        }
    }

    /// A record from [`next_record`] parsed.
    fn parse((t, b): &(u32, Vec<u8>)) -> Message<'_> {
        Message::parse(*t, b).unwrap().unwrap()
    }

    /// `m` as (type, body), as [`next_record`] returns it.
    fn record(m: Message<'_>) -> (u32, Vec<u8>) {
        let mut out = Vec::new();
        m.encode(&mut out);
        let len = u32::from_le_bytes([out[4], out[5], out[6], out[7]]) as usize;
        (m.rtype(), out[8..8 + len].to_vec())
    }

    /// Two links with the same key run colo-core's handshake, then carry records of many sizes
    /// both ways (frames split across reads, several frames per read, a record over several
    /// frames) sealed, and each side reads exactly what the other wrote.
    #[test]
    fn a_sealed_link_carries_records_of_any_size_both_ways() {
        use colo_core::engine::link::Handshake;
        use colo_core::stream::{DomainHeader, DomainType, ImageHeader};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cfg = |headers| DecoderConfig {
            expect_headers: headers,
            page_count: Some(16),
        };
        let acceptor = std::thread::spawn(move || {
            Link::accept(&listener, Some(Duration::from_secs(10)), cfg(true)).unwrap()
        });
        let mut p = Link::connect(&addr, Duration::from_secs(10), cfg(false)).unwrap();
        let mut s = acceptor.join().unwrap();
        let key = b"unit-test key";
        p.set_key(Role::Primary, Some(key));
        s.set_key(Role::Secondary, Some(key));
        let (mut po, mut so) = (Vec::new(), Vec::new());
        po.extend_from_slice(&ImageHeader { version: 3 }.encode());
        po.extend_from_slice(
            &DomainHeader {
                domain_type: DomainType::X86Hvm,
                page_shift: 12,
                xen_major: 4,
                xen_minor: 17,
            }
            .encode(),
        );
        let mut ph = Handshake::start(
            Role::Primary,
            16,
            false,
            false,
            Some(key.to_vec()),
            [1; 32],
            &mut po,
        );
        let mut sh = Handshake::start(
            Role::Secondary,
            16,
            false,
            false,
            Some(key.to_vec()),
            [2; 32],
            &mut so,
        );
        p.send(&po).unwrap();
        s.send(&so).unwrap();
        // HELLO each way, then AUTH each way.
        for _ in 0..2 {
            let (mut pout, mut sout) = (Vec::new(), Vec::new());
            let from_s = next_record(&mut p);
            ph.on_message(&parse(&from_s), &mut pout).unwrap();
            let from_p = next_record(&mut s);
            sh.on_message(&parse(&from_p), &mut sout).unwrap();
            p.send(&pout).unwrap();
            s.send(&sout).unwrap();
        }
        assert!(p.is_sealed() && s.is_sealed(), "both sides seal after AUTH");
        let sizes = [0usize, 1, 7, 4096, (1 << 20) - 30, 1 << 20, 3 << 20, 5];
        let blob = |n: usize| -> Vec<u8> { (0..n).map(|i| (i % 251) as u8).collect() };
        let writer = std::thread::spawn(move || {
            for (i, &n) in sizes.iter().enumerate() {
                let mut rec = Vec::new();
                Message::VcpuState(&blob(n)).encode(&mut rec);
                Message::Heartbeat(i as u64).encode(&mut rec);
                // One record through the writer in uneven pieces, then one through send.
                let (a, b) = rec.split_at(rec.len() / 3);
                let mut w = p.writer();
                w.write_all(a).unwrap();
                w.write_all(b).unwrap();
                drop(w);
            }
            p
        });
        for (i, &n) in sizes.iter().enumerate() {
            let state = record(Message::VcpuState(&blob(n)));
            assert!(next_record(&mut s) == state, "record {i}");
            assert_eq!(next_record(&mut s), record(Message::Heartbeat(i as u64)));
        }
        let mut p = writer.join().unwrap();
        // And back.
        let mut back = Vec::new();
        Message::Heartbeat(77).encode(&mut back);
        s.send(&back).unwrap();
        assert_eq!(next_record(&mut p), record(Message::Heartbeat(77)));
    }

    /// A connected pair of links asking for `streams` connections, after colo-core's handshake
    /// (with `key`, and `--insecure-plaintext` if `plaintext`): (primary, secondary).
    fn striped_pair(key: Option<&[u8]>, plaintext: bool, streams: u8) -> (Link, Link) {
        use colo_core::engine::link::{Handshake, Offer};
        use colo_core::stream::{DomainHeader, DomainType, ImageHeader};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cfg = |headers| DecoderConfig {
            expect_headers: headers,
            page_count: Some(16),
        };
        let acceptor = std::thread::spawn(move || {
            let l = Link::accept(&listener, Some(Duration::from_secs(10)), cfg(true)).unwrap();
            // The listener stays open while the extra connections join.
            (l, listener)
        });
        let mut p = Link::connect(&addr, Duration::from_secs(10), cfg(false)).unwrap();
        let (mut s, listener) = acceptor.join().unwrap();
        for (l, role) in [(&mut p, Role::Primary), (&mut s, Role::Secondary)] {
            l.set_streams(streams);
            l.set_key(role, key);
        }
        let offer = Offer {
            page_count: 16,
            plaintext,
            streams,
            ..Offer::default()
        };
        let (mut po, mut so) = (Vec::new(), Vec::new());
        // The primary's direction begins with Xen's headers, as a node's does.
        po.extend_from_slice(&ImageHeader { version: 3 }.encode());
        po.extend_from_slice(
            &DomainHeader {
                domain_type: DomainType::X86Hvm,
                page_shift: 12,
                xen_major: 4,
                xen_minor: 17,
            }
            .encode(),
        );
        let k = key.map(<[u8]>::to_vec);
        let mut ph = Handshake::offer(Role::Primary, offer, k.clone(), [1; 32], &mut po);
        let mut sh = Handshake::offer(Role::Secondary, offer, k, [2; 32], &mut so);
        p.send(&po).unwrap();
        s.send(&so).unwrap();
        // HELLO each way, then AUTH each way (with a key).
        let rounds = if key.is_some() { 2 } else { 1 };
        for _ in 0..rounds {
            let (mut pout, mut sout) = (Vec::new(), Vec::new());
            ph.on_message(&parse(&next_record(&mut p)), &mut pout)
                .unwrap();
            sh.on_message(&parse(&next_record(&mut s)), &mut sout)
                .unwrap();
            p.send(&pout).unwrap();
            s.send(&sout).unwrap();
        }
        drop(listener);
        (p, s)
    }

    /// Records of many sizes (frames split across reads and connections, a record over several
    /// frames) from `p` to `s` and back, each read exactly as written.
    fn carries_records_both_ways(mut p: Link, mut s: Link) -> (Link, Link) {
        let sizes = [
            0usize,
            1,
            7,
            4096,
            (1 << 20) - 30,
            1 << 20,
            3 << 20,
            5,
            70_000,
        ];
        let blob = |n: usize| -> Vec<u8> { (0..n).map(|i| (i % 251) as u8).collect() };
        let writer = std::thread::spawn(move || {
            for (i, &n) in sizes.iter().enumerate() {
                let mut rec = Vec::new();
                Message::VcpuState(&blob(n)).encode(&mut rec);
                Message::Heartbeat(i as u64).encode(&mut rec);
                let (a, b) = rec.split_at(rec.len() / 3);
                let mut w = p.writer();
                w.write_all(a).unwrap();
                w.write_all(b).unwrap();
                drop(w);
            }
            p
        });
        for (i, &n) in sizes.iter().enumerate() {
            let state = record(Message::VcpuState(&blob(n)));
            assert!(next_record(&mut s) == state, "record {i}");
            assert_eq!(next_record(&mut s), record(Message::Heartbeat(i as u64)));
        }
        let mut p = writer.join().unwrap();
        for i in 0..7u64 {
            let mut back = Vec::new();
            Message::Heartbeat(100 + i).encode(&mut back);
            s.send(&back).unwrap();
        }
        for i in 0..7u64 {
            assert_eq!(next_record(&mut p), record(Message::Heartbeat(100 + i)));
        }
        (p, s)
    }

    /// Three connections, sealed, plaintext with a key, and without a key: the records arrive
    /// in order both ways, and the link really uses three connections.
    #[test]
    fn a_striped_link_carries_records_in_order_both_ways() {
        for (key, plaintext, sealed) in [
            (Some(&b"unit-test key"[..]), false, true),
            (Some(&b"unit-test key"[..]), true, false),
            (None, false, false),
        ] {
            let (p, s) = striped_pair(key, plaintext, 3);
            let (p, s) = carries_records_both_ways(p, s);
            assert_eq!((p.streams(), s.streams()), (3, 3), "key {key:?}");
            assert_eq!((p.is_sealed(), s.is_sealed()), (sealed, sealed));
        }
        // One connection asked for: nothing changes.
        let (p, s) = striped_pair(None, false, 1);
        let (p, s) = carries_records_both_ways(p, s);
        assert_eq!((p.streams(), s.streams()), (1, 1));
    }

    /// Frames arriving on their connections in any order come out in frame order; the first
    /// failure of any connection is the one reported.
    #[test]
    fn the_merge_takes_frame_k_from_connection_k_mod_n() {
        let n = 3usize;
        // Frames 0..19, then frame 19 is connection 1's turn (19 mod 3).
        let frames = 19u8;
        let mut txs = Vec::new();
        let mut rxs = Vec::new();
        for _ in 0..n {
            let (tx, rx) = crossbeam_channel::unbounded::<Chunk>();
            txs.push(tx);
            rxs.push(rx);
        }
        // Connection 2's frames all arrive first, then 1's, then 0's.
        for i in (0..n).rev() {
            for k in (0..frames).filter(|k| usize::from(*k) % n == i) {
                txs[i].send(Ok((vec![9, k, 9], 1..2))).unwrap();
            }
        }
        // Then connection 1 fails: the frames queued before still come out first.
        txs[1]
            .send(Err(io::Error::other("connection 1 broke")))
            .unwrap();
        let (out, got) = crossbeam_channel::unbounded();
        let first: FirstError = Arc::new(Mutex::new(None));
        merge(&rxs, &out, &first);
        let mut seen = Vec::new();
        let mut err = None;
        while let Ok(c) = got.try_recv() {
            match c {
                Ok((b, r)) => seen.push(b[r][0]),
                Err(e) => err = Some(e.to_string()),
            }
        }
        assert_eq!(seen, (0..frames).collect::<Vec<_>>());
        assert_eq!(err.as_deref(), Some("connection 1 broke"));
        // A connection's failure recorded first is reported whatever the merge waited on.
        let (tx0, rx0) = crossbeam_channel::unbounded::<Chunk>();
        let (_tx1, rx1) = crossbeam_channel::unbounded::<Chunk>();
        tx0.send(Err(closed_by_peer())).unwrap();
        *first.lock() = Some((io::ErrorKind::InvalidData, "connection 1: bad tag".into()));
        let (out, got) = crossbeam_channel::unbounded();
        merge(&[rx0, rx1], &out, &first);
        let e = got.try_recv().unwrap().unwrap_err();
        assert_eq!(e.to_string(), "connection 1: bad tag");
    }

    /// A peer that lies on a striped link: a JOIN for a connection the link does not have, or a
    /// frame longer than any frame may be. Each is a clear error on the link, not a hang.
    #[test]
    fn a_peer_lying_about_an_index_or_a_length_breaks_the_link_clearly() {
        use colo_core::engine::link::{Handshake, Offer};
        use colo_core::stripe::Session;
        let hello_of = |role, nonce| {
            let mut out = Vec::new();
            let offer = Offer {
                page_count: 16,
                streams: 2,
                ..Offer::default()
            };
            Handshake::offer(role, offer, None, [nonce; 32], &mut out);
            out
        };
        let hello =
            |b: &[u8]| match Message::parse(colo_core::engine::messages::colo_type::HELLO, &b[8..])
            {
                Ok(Some(Message::Hello(h))) => h,
                other => panic!("{other:?}"),
            };
        for lie in ["index", "length", "length on connection 1"] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let (ph, sh) = (hello_of(Role::Primary, 1), hello_of(Role::Secondary, 2));
            let (ph2, sh2) = (ph.clone(), sh.clone());
            let peer = std::thread::spawn(move || {
                let mut main = TcpStream::connect(addr).unwrap();
                main.write_all(&ph2).unwrap();
                let mut theirs = vec![0u8; sh2.len()];
                main.read_exact(&mut theirs).unwrap();
                let session = Session::new(None, &hello(&ph2), &hello(&theirs), 2);
                let mut extra = TcpStream::connect(addr).unwrap();
                match lie {
                    "index" => extra.write_all(&session.join(5)).unwrap(),
                    "length" => {
                        extra.write_all(&session.join(1)).unwrap();
                        main.write_all(&[0xff; 4]).unwrap();
                    }
                    _ => {
                        // Frame 0 never comes: the merge waits on connection 0 while
                        // connection 1 fails.
                        extra.write_all(&session.join(1)).unwrap();
                        extra.write_all(&[0xff; 4]).unwrap();
                    }
                }
                (main, extra)
            });
            let cfg = DecoderConfig {
                expect_headers: false,
                page_count: Some(16),
            };
            let mut s = Link::accept(&listener, Some(Duration::from_secs(10)), cfg).unwrap();
            s.set_streams(2);
            s.set_key(Role::Secondary, None);
            s.send(&sh).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            let err = loop {
                assert!(Instant::now() < deadline, "no error within 30 s ({lie})");
                match s.fill::<()>(Duration::from_millis(50), None) {
                    Ok(_) => while s.next_event().unwrap().is_some() {},
                    Err(e) => break e.to_string(),
                }
            };
            let want = match lie {
                "index" => "joined connection 5, but this link's extra connections are 1..2",
                "length" => "connection 0: the peer announced a frame of 4294967295 bytes",
                _ => "connection 1: the peer announced a frame of 4294967295 bytes",
            };
            assert!(err.contains(want), "{lie}: {err}");
            let _ = peer.join().unwrap();
        }
    }
}

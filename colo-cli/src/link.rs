//! The replication link: one TCP connection per pair (TCP_NODELAY, 4 MiB socket buffers), read
//! with a deadline into a reusable buffer and decoded incrementally with colo-core's decoder.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use colo_core::stream::{Decoder, DecoderConfig, Event, StreamError};
use socket2::SockRef;

/// Socket buffer size asked for on both sides: a checkpoint of a few thousand pages fits.
const SOCKET_BUFFER: usize = 4 << 20;
/// Read buffer: large enough that a page usually arrives whole and is borrowed, not copied.
const READ_BUFFER: usize = 1 << 20;

/// One end of the replication link.
#[derive(Debug)]
pub struct Link {
    stream: TcpStream,
    decoder: Decoder,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    peer: SocketAddr,
    /// Bytes written so far.
    pub bytes_out: u64,
    /// Bytes read so far.
    pub bytes_in: u64,
}

fn configure(stream: &TcpStream) -> Result<()> {
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let s = SockRef::from(stream);
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    Ok(())
}

impl Link {
    fn new(stream: TcpStream, cfg: DecoderConfig) -> Result<Self> {
        configure(&stream)?;
        let peer = stream.peer_addr().context("peer address of the link")?;
        Ok(Self {
            stream,
            decoder: Decoder::new(cfg),
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            peer,
            bytes_out: 0,
            bytes_in: 0,
        })
    }

    /// Connects to `addr`, retrying until `timeout` (the peer may still be starting).
    pub fn connect(addr: &str, timeout: Duration, cfg: DecoderConfig) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .with_context(|| format!("resolving peer address `{addr}`"))?
            .collect();
        let first = *addrs
            .first()
            .ok_or_else(|| anyhow!("peer address `{addr}` resolves to nothing"))?;
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
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
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
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).context("link blocking mode")?;
                    return Self::new(s, cfg);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(anyhow!(
                            "no peer connected to {} in time",
                            listener
                                .local_addr()
                                .map(|a| a.to_string())
                                .unwrap_or_default()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("accepting the peer's connection"),
            }
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Writes all of `bytes`.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.stream.write_all(bytes)?;
        self.bytes_out += bytes.len() as u64;
        Ok(())
    }

    /// The stream for vectored page writes.
    pub fn writer(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Waits up to `timeout` for bytes and reads what is there. `Ok(false)`: nothing arrived.
    /// EOF is an error ("the peer closed the link").
    pub fn fill(&mut self, timeout: Duration) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_micros(100))))?;
        match self.stream.read(&mut self.buf[self.end..]) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the link",
            )),
            Ok(n) => {
                self.end += n;
                self.bytes_in += n as u64;
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Decodes the next event from the bytes read so far; `Ok(None)` when more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>, StreamError> {
        // The decoder either yields an event or consumes everything it was given; some events
        // consume no bytes, so it is called even on an empty slice.
        let (n, ev) = self.decoder.feed(&self.buf[self.start..self.end])?;
        // The event borrows the buffer; `start` moves past it, and the buffer is only compacted
        // in `fill`, after the caller is done with the event.
        self.start += n;
        Ok(ev)
    }

    /// True if undecoded bytes remain in the buffer.
    pub fn has_buffered(&self) -> bool {
        self.start < self.end
    }

    /// Shuts the sending direction down (the peer reads EOF after what was sent).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Forgets bytes read but not decoded.
    pub fn discard_buffered(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Shuts the connection down (both directions).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// A second handle on the socket, e.g. to cut it from another thread.
    pub fn try_clone_stream(&self) -> io::Result<TcpStream> {
        self.stream.try_clone()
    }
}

//! A TCP client of the kv guest through a node's client hub (the mock network path): it
//! carries the TCP connection's segments as length-prefixed frames (`clients.rs`), does the
//! handshake, sends requests on the stream and reads the responses, retransmitting the last
//! segment when nothing comes (colo-mock's `TcpClientConn` keeps the numbers). Used by the tests
//! of TCP alignment (`colo-cli/tests/tcp_align.rs`).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use colo_mock::tcp::{ClientEvent, TcpClientConn};
use colo_mock::{ClientAddr, KvRequest, KvResponse};
use crossbeam_channel::Receiver;

use crate::clients::{read_frame, write_frame};

/// One hub connection carrying TCP connections to the guest, one at a time.
#[derive(Debug)]
pub struct TcpKvClient {
    stream: TcpStream,
    frames: Receiver<Vec<u8>>,
    /// Wait before the last segment is sent again.
    pub rto: Duration,
    /// Give up on one exchange after this long.
    pub timeout: Duration,
    /// Segments sent again after `rto` passed without an answer.
    pub retransmits: u64,
    buf: Vec<u8>,
}

impl TcpKvClient {
    /// Connects to the hub at `addr`.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Self> {
        let (stream, frames) = Self::hub(addr)?;
        Ok(Self {
            stream,
            frames,
            rto: (timeout / 10).max(Duration::from_millis(50)),
            timeout,
            retransmits: 0,
            buf: Vec::new(),
        })
    }

    /// A hub connection and the channel its reader thread puts the guest's frames on.
    fn hub(addr: &str) -> Result<(TcpStream, Receiver<Vec<u8>>)> {
        let stream =
            TcpStream::connect(addr).with_context(|| format!("connecting to the hub {addr}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let mut reader = stream.try_clone().context("cloning the hub socket")?;
        let (tx, frames) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("tcpkv-client".into())
            .spawn(move || {
                let mut buf = Vec::new();
                while let Ok(Some(())) = read_frame(&mut reader, &mut buf) {
                    if tx.send(buf.clone()).is_err() {
                        break;
                    }
                }
            })
            .context("spawning the client's reader")?;
        Ok((stream, frames))
    }

    /// Moves to the hub at `addr` (a survivor's, after a failover), trying until `limit`
    /// passed; the TCP connections the client holds carry on through it.
    pub fn switch_hub(&mut self, addr: &str, limit: Duration) -> Result<()> {
        let until = Instant::now() + limit;
        let (stream, frames) = loop {
            match Self::hub(addr) {
                Ok(h) => break h,
                Err(e) if Instant::now() >= until => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.stream = stream;
        self.frames = frames;
        Ok(())
    }

    fn send(&mut self, frame: &[u8]) -> Result<()> {
        write_frame(&mut self.stream, frame).context("writing to the hub")
    }

    /// Feeds the guest's frames to `conn` until `done` says so, resending `conn.last()` every
    /// `rto`; `what` names the exchange in errors.
    fn await_event(
        &mut self,
        conn: &mut TcpClientConn,
        what: &str,
        mut done: impl FnMut(&mut TcpClientConn, ClientEvent) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut resend = Instant::now() + self.rto;
        loop {
            let now = Instant::now();
            if now >= deadline {
                bail!("{what}: no answer within {:?}", self.timeout);
            }
            match self.frames.recv_timeout(resend.min(deadline) - now) {
                Ok(f) => {
                    let ev = conn.receive(&f);
                    if ev == ClientEvent::Other {
                        continue;
                    }
                    if done(conn, ev)? {
                        return Ok(());
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    let last = conn.last().to_vec();
                    self.send(&last)?;
                    self.retransmits += 1;
                    resend = Instant::now() + self.rto;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    bail!("{what}: the hub closed the connection")
                }
            }
        }
    }

    /// Opens a TCP connection from `me` with initial sequence number `iss`: SYN, SYN-ACK, ACK.
    pub fn open(&mut self, me: ClientAddr, iss: u32) -> Result<TcpClientConn> {
        let mut conn = TcpClientConn::open(me, iss, &mut self.buf)?;
        let syn = std::mem::take(&mut self.buf);
        self.send(&syn)?;
        self.buf = syn;
        self.await_event(&mut conn, "handshake", |_, ev| match ev {
            ClientEvent::Open => Ok(true),
            ClientEvent::Reset => Err(anyhow!("the guest refused the connection (RST)")),
            _ => Ok(false),
        })?;
        conn.ack(&mut self.buf)?;
        let ack = std::mem::take(&mut self.buf);
        self.send(&ack)?;
        self.buf = ack;
        Ok(conn)
    }

    /// Sends `req` on `conn` and waits for its response.
    pub fn call(&mut self, conn: &mut TcpClientConn, req: &KvRequest<'_>) -> Result<KvResponse> {
        conn.request(req, &mut self.buf)?;
        let seg = std::mem::take(&mut self.buf);
        self.send(&seg)?;
        self.buf = seg;
        let mut got = None;
        self.await_event(conn, "request", |c, ev| {
            if ev == ClientEvent::Reset {
                bail!("the guest reset the connection");
            }
            got = c.next_response().context("malformed response stream")?;
            Ok(got.is_some())
        })?;
        let r = got.ok_or_else(|| anyhow!("no response"))?;
        if r.id != req.id {
            bail!("response to request {} came for request {}", r.id, req.id);
        }
        Ok(r)
    }

    /// Closes `conn`: FIN, the guest's FIN, the last ACK.
    pub fn close(&mut self, mut conn: TcpClientConn) -> Result<()> {
        conn.fin(&mut self.buf)?;
        let fin = std::mem::take(&mut self.buf);
        self.send(&fin)?;
        self.buf = fin;
        self.await_event(&mut conn, "close", |c, ev| match ev {
            ClientEvent::Reset => Err(anyhow!("the guest reset the connection on close")),
            _ => Ok(c.fin_received()),
        })?;
        conn.ack(&mut self.buf)?;
        let ack = std::mem::take(&mut self.buf);
        self.send(&ack)
    }
}

impl Drop for TcpKvClient {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

//! A verifying client of the `kv` guest: sends requests to the primary's client address, moves
//! to the next address when it stops answering (failover), and checks that every write it saw
//! acknowledged is read back afterwards and no response it saw is contradicted later.
//!
//! A client given a cancel flag ([`KvClient::set_cancel`]) abandons its request in flight when
//! the flag is set, within 50 ms, with the error [`Cancelled`]: a stop, not a failure of the
//! pair. A write abandoned that way may or may not have happened, so its key is no longer checked.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use colo_mock::{build_request_frame, parse_response_frame, ClientAddr, KvOp, KvRequest, KvStatus};
use serde::Serialize;

use crate::clients::{read_frame, write_frame};

/// What the client saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientStats {
    /// Operations completed.
    pub ops: u64,
    /// PUTs and DELETEs acknowledged.
    pub acked_writes: u64,
    /// Reads that did not return an acknowledged write (must stay 0).
    pub lost_acked_writes: u64,
    /// Responses with an id the client did not expect, or a second answer to one (duplicates
    /// after a failover are expected and ignored).
    pub stray_responses: u64,
    /// Times the client moved to the other node.
    pub failovers: u64,
    /// Requests resent after a timeout.
    pub retries: u64,
    /// Failover: from the first unanswered request to the first answer from the survivor, ms.
    pub failover_gap_ms: Option<f64>,
    /// Requests abandoned unanswered because the client was stopped (see [`Cancelled`]).
    pub cancelled: u64,
}

/// A request abandoned because the client's cancel flag was set: the client was stopped, the
/// pair did not fail. (Display and Error are written out: colo-cli does not depend on
/// thiserror.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled {
    /// The request's id.
    pub id: u64,
}

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request {} abandoned: the client was stopped", self.id)
    }
}

impl std::error::Error for Cancelled {}

/// Whether `e` is (or wraps) [`Cancelled`].
pub fn is_cancelled(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Cancelled>().is_some()
}

/// How long a cancellable client waits at a time before it looks at its cancel flag again.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// What waiting for an answer ended with.
enum Wait {
    /// Bytes (or EOF, or an error) are there to read.
    Ready,
    /// Nothing came within the timeout.
    TimedOut,
    /// The cancel flag was set.
    Cancelled,
}

/// Waits until `s` is readable, `timeout` after `started` has passed, or `cancel` is set,
/// looking at the flag every [`CANCEL_POLL`]. Peeks, so a frame is never torn.
fn wait_readable(s: &TcpStream, cancel: &AtomicBool, started: Instant, timeout: Duration) -> Wait {
    let mut one = [0u8; 1];
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Wait::Cancelled;
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Wait::TimedOut;
        }
        let slice = left.min(CANCEL_POLL).max(Duration::from_millis(1));
        if s.set_read_timeout(Some(slice)).is_err() {
            return Wait::Ready;
        }
        match s.peek(&mut one) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // Data, EOF or a broken connection: the read that follows sees which.
            _ => return Wait::Ready,
        }
    }
}

/// A sequential kv client with a model of what it was told.
#[derive(Debug)]
pub struct KvClient {
    addrs: Vec<String>,
    cur: usize,
    stream: Option<TcpStream>,
    me: ClientAddr,
    next_id: u64,
    model: HashMap<Vec<u8>, Vec<u8>>,
    /// Keys whose last write was abandoned (it may or may not have happened): not checked
    /// until a write to them is acknowledged again.
    uncertain: HashSet<Vec<u8>>,
    cancel: Option<Arc<AtomicBool>>,
    timeout: Duration,
    frame: Vec<u8>,
    buf: Vec<u8>,
    /// Figures.
    pub stats: ClientStats,
    /// When set, every frame received from a node is kept in `received` (for tests).
    pub record: bool,
    /// Frames received, in order (only with `record`).
    pub received: Vec<Vec<u8>>,
}

impl KvClient {
    /// A client that talks to `addrs[0]` first and fails over along the list. `port` tells
    /// clients apart on the guest's network.
    pub fn new(addrs: Vec<String>, port: u16, timeout: Duration) -> Self {
        Self {
            addrs,
            cur: 0,
            stream: None,
            me: ClientAddr {
                mac: [2, 0, 0, 0, (port >> 8) as u8, port as u8],
                ip: [10, 0, 0, 100],
                port,
            },
            next_id: 1,
            model: HashMap::new(),
            uncertain: HashSet::new(),
            cancel: None,
            timeout,
            frame: Vec::new(),
            buf: Vec::new(),
            stats: ClientStats::default(),
            record: false,
            received: Vec::new(),
        }
    }

    /// Abandons the request in flight (error [`Cancelled`]) once `flag` is set; `None` waits for
    /// every answer until the caller's deadline.
    pub fn set_cancel(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.cancel = flag;
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// A write to `key` was abandoned: it may or may not have happened.
    fn forget(&mut self, key: &[u8], e: anyhow::Error) -> anyhow::Error {
        if is_cancelled(&e) {
            self.model.remove(key);
            self.uncertain.insert(key.to_vec());
        }
        e
    }

    fn connect(&mut self) -> Result<()> {
        let addr = &self.addrs[self.cur % self.addrs.len()];
        let s = TcpStream::connect_timeout(
            &addr
                .parse()
                .map_err(|e| anyhow!("client address `{addr}`: {e}"))?,
            Duration::from_millis(500),
        )?;
        s.set_nodelay(true)?;
        self.stream = Some(s);
        Ok(())
    }

    /// Sends one request and waits for its answer, failing over as needed, until `deadline`.
    fn call(
        &mut self,
        op: KvOp,
        key: &[u8],
        value: &[u8],
        deadline: Instant,
    ) -> Result<(KvStatus, Vec<u8>, bool)> {
        let id = self.next_id;
        self.next_id += 1;
        build_request_frame(&self.me, &KvRequest { id, op, key, value }, &mut self.frame)
            .map_err(|e| anyhow!("building a request: {e}"))?;
        let mut retried = false;
        let mut gap_start: Option<Instant> = None;
        loop {
            if self.cancelled() {
                self.stats.cancelled += 1;
                return Err(Cancelled { id }.into());
            }
            if Instant::now() >= deadline {
                bail!("request {id} unanswered by every node until the deadline");
            }
            if self.stream.is_none() && self.connect().is_err() {
                self.cur += 1;
                self.stats.failovers += 1;
                gap_start.get_or_insert_with(Instant::now);
                // A short backoff: the survivor may be a millisecond away from taking over.
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let Some(s) = self.stream.as_mut() else {
                continue;
            };
            if write_frame(s, &self.frame).is_err() {
                self.stream = None;
                continue;
            }
            let _ = s.set_read_timeout(Some(self.timeout));
            let started = Instant::now();
            while let Some(s) = self.stream.as_mut() {
                let ready = match self.cancel.as_deref() {
                    None => Wait::Ready,
                    Some(flag) => wait_readable(s, flag, started, self.timeout),
                };
                let res = match ready {
                    Wait::Cancelled => {
                        self.stats.cancelled += 1;
                        return Err(Cancelled { id }.into());
                    }
                    Wait::TimedOut => Ok(None),
                    Wait::Ready => {
                        if self.cancel.is_some() {
                            let _ = s.set_read_timeout(Some(self.timeout));
                        }
                        read_frame(s, &mut self.buf)
                    }
                };
                match res {
                    Ok(Some(())) => {
                        if self.record {
                            self.received.push(self.buf.clone());
                        }
                        match parse_response_frame(&self.buf) {
                            Ok(r) if r.id == id => {
                                if let Some(g) = gap_start {
                                    self.stats.failover_gap_ms =
                                        Some(g.elapsed().as_secs_f64() * 1e3);
                                }
                                return Ok((r.status, r.value, retried));
                            }
                            _ => self.stats.stray_responses += 1,
                        }
                    }
                    Ok(None) | Err(_) => {
                        // Timeout, reset or EOF: the node is gone or stuck; try the next one.
                        self.stream = None;
                        if started.elapsed() >= self.timeout || self.addrs.len() > 1 {
                            self.cur += 1;
                            self.stats.failovers += 1;
                        }
                        gap_start.get_or_insert(started);
                        break;
                    }
                }
            }
            retried = true;
            self.stats.retries += 1;
        }
    }

    /// PUT `key` = `value`; records it in the model once acknowledged.
    pub fn put(&mut self, key: &[u8], value: &[u8], deadline: Instant) -> Result<()> {
        let (st, _, _) = self
            .call(KvOp::Put, key, value, deadline)
            .map_err(|e| self.forget(key, e))?;
        self.stats.ops += 1;
        if st == KvStatus::Ok {
            self.stats.acked_writes += 1;
            self.uncertain.remove(key);
            self.model.insert(key.to_vec(), value.to_vec());
        }
        Ok(())
    }

    /// DELETE `key`.
    pub fn delete(&mut self, key: &[u8], deadline: Instant) -> Result<()> {
        let (st, _, retried) = self
            .call(KvOp::Delete, key, &[], deadline)
            .map_err(|e| self.forget(key, e))?;
        self.stats.ops += 1;
        match st {
            KvStatus::Ok => {
                self.stats.acked_writes += 1;
                self.uncertain.remove(key);
                self.model.remove(key);
            }
            // A retried DELETE may find its first attempt already done.
            KvStatus::NotFound if retried => {
                self.uncertain.remove(key);
                self.model.remove(key);
            }
            // An abandoned write may have happened or not; now the key is known absent.
            KvStatus::NotFound if self.uncertain.remove(key) => {}
            KvStatus::NotFound if self.model.contains_key(key) => {
                self.stats.lost_acked_writes += 1;
                self.model.remove(key);
            }
            _ => {}
        }
        Ok(())
    }

    /// GET `key` and check it against what the client was told.
    pub fn get(&mut self, key: &[u8], deadline: Instant) -> Result<()> {
        let (st, value, _) = self.call(KvOp::Get, key, &[], deadline)?;
        self.stats.ops += 1;
        if self.uncertain.contains(key) {
            // An abandoned write may or may not have happened: either answer is right.
            return Ok(());
        }
        let expected = self.model.get(key);
        let ok = match (st, expected) {
            (KvStatus::Ok, Some(v)) => *v == value,
            (KvStatus::NotFound, None) => true,
            _ => false,
        };
        if !ok {
            self.stats.lost_acked_writes += 1;
            tracing::error!(
                "GET {:?} returned {st:?} {:?}, but the client was told {:?}",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(&value),
                expected.map(|v| String::from_utf8_lossy(v).into_owned())
            );
        }
        Ok(())
    }

    /// What the client was told: every key whose last acknowledged write was a PUT, with its
    /// value (keys whose last write was abandoned are left out, see [`KvClient::set_cancel`]).
    pub fn acknowledged(&self) -> &HashMap<Vec<u8>, Vec<u8>> {
        &self.model
    }

    /// Keys whose last write was abandoned: either outcome is right for them.
    pub fn uncertain(&self) -> &HashSet<Vec<u8>> {
        &self.uncertain
    }

    /// Reads every key the client wrote and checks it.
    pub fn verify_all(&mut self, deadline: Instant) -> Result<()> {
        let keys: Vec<Vec<u8>> = self.model.keys().cloned().collect();
        for k in keys {
            self.get(&k, deadline)?;
        }
        Ok(())
    }

    /// One step of a mixed workload over `keys` keys driven by `rng` (50 % PUT, 40 % GET, 10 %
    /// DELETE).
    pub fn random_op(&mut self, rng: &mut u64, keys: u64, deadline: Instant) -> Result<()> {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let key = format!("key-{}", *rng % keys);
        match (*rng >> 32) % 10 {
            0..=4 => {
                let value = format!("v{}", *rng >> 16);
                self.put(key.as_bytes(), value.as_bytes(), deadline)
            }
            5..=8 => self.get(key.as_bytes(), deadline),
            _ => self.delete(key.as_bytes(), deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_stopped_client_abandons_its_request_at_once() {
        // A node that accepts and never answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let conn = l.accept();
            std::thread::sleep(Duration::from_secs(10));
            drop(conn);
        });
        let mut c = KvClient::new(vec![addr], 1, Duration::from_secs(30));
        let flag = Arc::new(AtomicBool::new(false));
        c.set_cancel(Some(flag.clone()));
        let f = flag.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            f.store(true, Ordering::Relaxed);
        });
        let t = Instant::now();
        let e = c
            .put(b"k", b"v", Instant::now() + Duration::from_secs(30))
            .unwrap_err();
        assert!(is_cancelled(&e), "{e:#}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(c.stats.cancelled, 1);
        assert_eq!(c.stats.ops, 0);
        // The abandoned write may have happened or not: its key is not checked.
        assert!(c.uncertain.contains(&b"k"[..]));
        assert!(!c.model.contains_key(&b"k"[..]));
    }
}

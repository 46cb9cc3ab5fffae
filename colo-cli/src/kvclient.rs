//! A verifying client of the `kv` guest: sends requests to the primary's client address, moves
//! to the next address when it stops answering (failover), and checks that every write it saw
//! acknowledged is read back afterwards and no response it saw is contradicted later.

use std::collections::HashMap;
use std::net::TcpStream;
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
            timeout,
            frame: Vec::new(),
            buf: Vec::new(),
            stats: ClientStats::default(),
            record: false,
            received: Vec::new(),
        }
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
                match read_frame(s, &mut self.buf) {
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
        let (st, _, _) = self.call(KvOp::Put, key, value, deadline)?;
        self.stats.ops += 1;
        if st == KvStatus::Ok {
            self.stats.acked_writes += 1;
            self.model.insert(key.to_vec(), value.to_vec());
        }
        Ok(())
    }

    /// DELETE `key`.
    pub fn delete(&mut self, key: &[u8], deadline: Instant) -> Result<()> {
        let (st, _, retried) = self.call(KvOp::Delete, key, &[], deadline)?;
        self.stats.ops += 1;
        match st {
            KvStatus::Ok => {
                self.stats.acked_writes += 1;
                self.model.remove(key);
            }
            // A retried DELETE may find its first attempt already done.
            KvStatus::NotFound if retried => {
                self.model.remove(key);
            }
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

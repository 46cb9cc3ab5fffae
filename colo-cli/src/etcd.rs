//! A small etcd v3 client over etcd's JSON gateway (HTTP/1.1 POST to `/v3/...`): the four calls
//! the arbiter needs — grant a lease, keep it alive, put the serving key if absent, read it.
//!
//! Why not the `etcd-client` crate: it needs `protoc` at build time and brings tokio and tonic
//! for four unary calls; the gateway is part of every etcd v3 server (3.4 included) and its
//! JSON is stable. Every request is one short-lived connection with a deadline (connect, write
//! and read each bounded by the client's timeout), tried on each endpoint in turn starting from
//! the last one that answered, so a dead member costs one timeout, not a hang. etcd encodes
//! keys and values in base64 and 64-bit integers as JSON strings.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The `--arbiter` value is not `etcd://HOST:PORT[,HOST:PORT…]`.
    #[error("bad arbiter address {given:?}: {why} (expected etcd://HOST:PORT[,HOST:PORT...])")]
    BadUrl {
        /// What was given.
        given: String,
        /// What is wrong with it.
        why: String,
    },
    /// No endpoint answered.
    #[error("no etcd endpoint answered ({tried}): {last}")]
    Unreachable {
        /// The endpoints tried.
        tried: String,
        /// The last endpoint's error.
        last: String,
    },
    /// An endpoint answered with an error.
    #[error("etcd at {endpoint} refused {call}: {message}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The call, e.g. `/v3/kv/txn`.
        call: &'static str,
        /// etcd's message, or the HTTP status.
        message: String,
    },
    /// An answer that does not parse as etcd's JSON.
    #[error("etcd at {endpoint} answered {call} with something unexpected: {why}")]
    BadAnswer {
        /// The endpoint.
        endpoint: String,
        /// The call.
        call: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The answer to [`Etcd::put_if_absent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// The key was absent and now holds our value.
    Put,
    /// Someone holds it: its value and the lease it is bound to.
    Held {
        /// The key's value (the holder's name).
        value: String,
        /// The holder's lease id (0: none).
        lease: i64,
    },
}

/// A key's value and lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The value.
    pub value: String,
    /// The lease it is bound to (0: none).
    pub lease: i64,
}

/// An etcd cluster, by its client endpoints.
#[derive(Debug, Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    timeout: Duration,
    preferred: usize,
}

/// The longest answer read from etcd (the gateway's answers here are a few hundred bytes).
const MAX_ANSWER: usize = 1 << 20;

impl Etcd {
    /// Parses `etcd://HOST:PORT[,HOST:PORT…]`; each request waits at most `timeout` per
    /// endpoint.
    pub fn parse(url: &str, timeout: Duration) -> Result<Etcd, EtcdError> {
        let bad = |why: &str| EtcdError::BadUrl {
            given: url.to_string(),
            why: why.to_string(),
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("it does not start with etcd://"))?;
        let mut endpoints = Vec::new();
        for ep in rest.split(',') {
            let ep = ep.trim().trim_end_matches('/');
            let (host, port) = ep
                .rsplit_once(':')
                .ok_or_else(|| bad(&format!("{ep:?} has no :PORT")))?;
            if host.is_empty() {
                return Err(bad(&format!("{ep:?} has no host")));
            }
            port.parse::<u16>()
                .map_err(|_| bad(&format!("{port:?} is not a port number")))?;
            endpoints.push(ep.to_string());
        }
        Ok(Etcd {
            endpoints,
            timeout,
            preferred: 0,
        })
    }

    /// The endpoints, as given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1); returns its id and the TTL granted.
    pub fn grant(&mut self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let secs = ttl.as_secs().max(1);
        let (ep, v) = self.call("/v3/lease/grant", &json!({ "TTL": secs }))?;
        let id = int(&v, "ID").ok_or_else(|| bad(&ep, "/v3/lease/grant", "no ID", &v))?;
        let granted = int(&v, "TTL").ok_or_else(|| bad(&ep, "/v3/lease/grant", "no TTL", &v))?;
        Ok((id, Duration::from_secs(granted.max(0) as u64)))
    }

    /// Renews lease `id`; returns the TTL left, zero when the lease no longer exists.
    pub fn keepalive(&mut self, id: i64) -> Result<Duration, EtcdError> {
        let call = "/v3/lease/keepalive";
        let (ep, v) = self.call(call, &json!({ "ID": id.to_string() }))?;
        let result = v.get("result").unwrap_or(&v);
        let ttl = int(result, "TTL").unwrap_or(0);
        Ok(Duration::from_secs(ttl.max(0) as u64)).inspect(|_| {
            if result.get("ID").is_none() {
                tracing::debug!("etcd at {ep}: keepalive of {id:#x} answered without an ID");
            }
        })
    }

    /// Revokes lease `id` (its keys go at once).
    pub fn revoke(&mut self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() }))
            .map(|_| ())
    }

    /// Puts `key = value` bound to `lease` if the key does not exist; otherwise says who holds
    /// it. One transaction, so two nodes can never both succeed.
    pub fn put_if_absent(
        &mut self,
        key: &str,
        value: &str,
        lease: i64,
    ) -> Result<PutOutcome, EtcdError> {
        let k = b64(key);
        let body = json!({
            "compare": [{ "key": k, "target": "CREATE", "create_revision": "0" }],
            "success": [{ "request_put": { "key": k, "value": b64(value), "lease": lease.to_string() } }],
            "failure": [{ "request_range": { "key": k } }],
        });
        let call = "/v3/kv/txn";
        let (ep, v) = self.call(call, &body)?;
        if v.get("succeeded").and_then(Value::as_bool) == Some(true) {
            return Ok(PutOutcome::Put);
        }
        let kv = v
            .pointer("/responses/0/response_range/kvs/0")
            .ok_or_else(|| bad(&ep, call, "the key is neither put nor there", &v))?;
        let held = key_value(kv).ok_or_else(|| bad(&ep, call, "unreadable key", &v))?;
        Ok(PutOutcome::Held {
            value: held.value,
            lease: held.lease,
        })
    }

    /// Reads `key`.
    pub fn get(&mut self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let call = "/v3/kv/range";
        let (ep, v) = self.call(call, &json!({ "key": b64(key) }))?;
        match v.pointer("/kvs/0") {
            None => Ok(None),
            Some(kv) => key_value(kv)
                .map(Some)
                .ok_or_else(|| bad(&ep, call, "unreadable key", &v)),
        }
    }

    /// Deletes `key` if it still holds `value` (a node giving up its own key).
    pub fn delete_if(&mut self, key: &str, value: &str) -> Result<bool, EtcdError> {
        let k = b64(key);
        let body = json!({
            "compare": [{ "key": k, "target": "VALUE", "value": b64(value) }],
            "success": [{ "request_delete_range": { "key": k } }],
        });
        let (_, v) = self.call("/v3/kv/txn", &body)?;
        Ok(v.get("succeeded").and_then(Value::as_bool) == Some(true))
    }

    /// Sends `body` to `path` on each endpoint in turn until one answers.
    fn call(&mut self, path: &'static str, body: &Value) -> Result<(String, Value), EtcdError> {
        let body = body.to_string();
        let n = self.endpoints.len();
        let mut last = String::new();
        for i in 0..n {
            let at = (self.preferred + i) % n;
            let ep = self.endpoints[at].clone();
            match post(&ep, path, &body, self.timeout) {
                Ok((status, text)) => {
                    self.preferred = at;
                    return answer(&ep, path, status, &text).map(|v| (ep, v));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    last = format!("{ep}: no answer within {} ms", self.timeout.as_millis());
                }
                Err(e) => last = format!("{ep}: {e}"),
            }
        }
        Err(EtcdError::Unreachable {
            tried: self.endpoints.join(", "),
            last,
        })
    }
}

/// Parses an HTTP answer's body as etcd's JSON, mapping a gateway error to `Refused`.
fn answer(ep: &str, call: &'static str, status: u16, text: &str) -> Result<Value, EtcdError> {
    let v: Value = serde_json::from_str(text.trim()).map_err(|e| EtcdError::BadAnswer {
        endpoint: ep.to_string(),
        call,
        why: format!("HTTP {status}, not JSON ({e}): {:.200}", text.trim()),
    })?;
    let message = v
        .get("error")
        .or_else(|| v.get("message"))
        .and_then(Value::as_str);
    if status != 200 || v.get("code").is_some() && message.is_some() {
        return Err(EtcdError::Refused {
            endpoint: ep.to_string(),
            call,
            message: message
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {status}")),
        });
    }
    Ok(v)
}

fn bad(ep: &str, call: &'static str, why: &str, v: &Value) -> EtcdError {
    EtcdError::BadAnswer {
        endpoint: ep.to_string(),
        call,
        why: format!("{why}: {:.200}", v.to_string()),
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A JSON field holding an integer, which etcd writes as a string.
fn int(v: &Value, field: &str) -> Option<i64> {
    match v.get(field)? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn key_value(kv: &Value) -> Option<KeyValue> {
    let raw = kv.get("value").and_then(Value::as_str).unwrap_or("");
    let bytes = base64::engine::general_purpose::STANDARD.decode(raw).ok()?;
    Some(KeyValue {
        value: String::from_utf8_lossy(&bytes).into_owned(),
        lease: int(kv, "lease").unwrap_or(0),
    })
}

/// One HTTP/1.1 POST with `Connection: close`; returns the status and the (de-chunked) body.
fn post(ep: &str, path: &str, body: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = ep.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")
    })?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {ep}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.take(MAX_ANSWER as u64 + 1).read_to_end(&mut raw)?;
    if raw.len() > MAX_ANSWER {
        return Err(invalid("an answer over 1 MiB"));
    }
    parse_response(&raw)
}

fn invalid(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string())
}

/// Splits an HTTP/1.1 response into status and body, undoing chunked transfer encoding.
fn parse_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("an HTTP answer without the end of its header"))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| invalid("an HTTP answer without a status"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[end + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("a chunk without its size line"))?;
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| invalid("a chunk size that is not hex"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size {
            // The server closed mid-chunk (a streaming call cut short): keep what came.
            out.extend_from_slice(b);
            return Ok(out);
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arbiter_urls_parse_or_say_what_is_wrong() {
        let e = Etcd::parse("etcd://10.0.0.1:2379, h2:2379", Duration::from_secs(1)).unwrap();
        assert_eq!(e.endpoints(), ["10.0.0.1:2379", "h2:2379"]);
        for (url, says) in [
            ("http://h:2379", "does not start with etcd://"),
            ("etcd://h", "has no :PORT"),
            ("etcd://:2379", "has no host"),
            ("etcd://h:99999", "is not a port number"),
        ] {
            let err = Etcd::parse(url, Duration::from_secs(1))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn responses_with_length_or_chunks_parse() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, "{}".into()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "{\"a\":1}".into()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        let bad_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(parse_response(bad_chunk).is_err());
    }

    #[test]
    fn gateway_errors_are_refusals_with_etcds_message() {
        let e = answer(
            "h:1",
            "/v3/kv/txn",
            400,
            r#"{"error":"etcdserver: requested lease not found","code":5}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("requested lease not found"), "{e}");
        let e = answer("h:1", "/v3/kv/txn", 200, "<html>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not JSON"), "{e}");
    }

    #[test]
    fn an_unreachable_cluster_names_every_endpoint() {
        // Port 1 on loopback: nothing listens there.
        let mut e =
            Etcd::parse("etcd://127.0.0.1:1,127.0.0.1:1", Duration::from_millis(200)).unwrap();
        let err = e.grant(Duration::from_secs(3)).unwrap_err();
        assert!(matches!(err, EtcdError::Unreachable { .. }), "{err}");
        assert!(
            err.to_string().contains("127.0.0.1:1, 127.0.0.1:1"),
            "{err}"
        );
    }
}

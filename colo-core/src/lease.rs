//! The arbiter's lease as a node sees it, without IO: whether output may go out now, when to
//! renew, and how long the lease is certainly still held.
//!
//! With an arbiter (etcd in colo-cli), the serving node holds a key bound to a lease of `ttl`
//! and renews it; the other node may take over only after it has put the key itself, which the
//! arbiter allows only once the old lease has expired. A node cannot see the arbiter's clock,
//! so it counts from the moment it *sent* the request that granted or renewed the lease: the
//! arbiter answered after that moment, so the lease ends no sooner than `sent + ttl` by the
//! arbiter's clock. Clocks run at slightly different rates and the answer may have come from a
//! lease the arbiter had already shortened, so the node stops a `margin` earlier:
//!
//! ```text
//!   sent ──► arbiter renews (TTL) ──► answer
//!    │◄──────────────── ttl ────────────────────►│  lease ends no sooner than this
//!    │◄─────────── ttl − margin ──────────►│     │
//!                          certainly valid ┘     └ another node may acquire the key after it
//! ```
//!
//! States, named for what they await:
//!
//! ```text
//!   AwaitingGrant ──granted──► Holding ──renewed(ttl 0) / key taken──► Lost
//!                                 │ ▲
//!                                 └─┘ renewed / renew failed (validity runs down)
//! ```
//!
//! A renewal that fails (the arbiter unreachable) does not end the lease at once: it stays
//! certainly valid until `sent + ttl − margin` of the last successful request, and renewals
//! go on being tried. Only the arbiter's own word (the lease is gone, or another node holds the
//! key) moves to `Lost`, from which the only way back is a new grant.

use std::time::{Duration, Instant};

/// How a node keeps its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The lease's time to live, as granted by the arbiter.
    pub ttl: Duration,
    /// How much sooner than `ttl` the node stops counting on the lease (clock rate differences,
    /// the time to stop releasing).
    pub margin: Duration,
    /// How often a renewal is sent.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// The usual settings for `ttl`: renew at a third of it, stop a tenth early (at least 100 ms).
    pub fn for_ttl(ttl: Duration) -> LeaseConfig {
        LeaseConfig {
            ttl,
            margin: (ttl / 10).max(Duration::from_millis(100)).min(ttl / 2),
            renew_every: ttl / 3,
        }
    }
}

/// Why a lease is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostReason {
    /// The arbiter said the lease has expired (a renewal answered with TTL 0).
    Expired,
    /// Another node holds the serving key.
    TakenBy(String),
    /// The node gave the lease up.
    Released,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::Expired => f.write_str("the arbiter let the lease expire"),
            LostReason::TakenBy(who) => write!(f, "the arbiter names {who} as the serving node"),
            LostReason::Released => f.write_str("the lease was given up"),
        }
    }
}

/// The lease's state; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// No lease yet: awaiting the arbiter's grant of the serving key.
    AwaitingGrant,
    /// The key is held; awaiting the next renewal.
    Holding {
        /// The arbiter's lease id.
        id: i64,
        /// When the request behind the current validity was sent.
        sent: Instant,
        /// The TTL the arbiter gave with it.
        ttl: Duration,
        /// When a renewal in flight was sent, if one is.
        in_flight: Option<Instant>,
    },
    /// The lease is gone; only a new grant brings it back.
    Lost(LostReason),
}

/// An event that does not fit the lease's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease: {event} while {state}")]
pub struct LeaseError {
    /// The event.
    pub event: &'static str,
    /// The state's name.
    pub state: &'static str,
}

/// One node's lease; see the module docs.
#[derive(Debug, Clone)]
pub struct Lease {
    cfg: LeaseConfig,
    state: LeaseState,
    last_error: Option<String>,
    renewed_at: Option<Instant>,
}

impl Lease {
    /// A node without a lease yet.
    pub fn new(cfg: LeaseConfig) -> Lease {
        Lease {
            cfg,
            state: LeaseState::AwaitingGrant,
            last_error: None,
            renewed_at: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// The state.
    pub fn state(&self) -> &LeaseState {
        &self.state
    }

    /// The state's name, for logs and status.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            LeaseState::AwaitingGrant => "AwaitingGrant",
            LeaseState::Holding { .. } => "Holding",
            LeaseState::Lost(_) => "Lost",
        }
    }

    /// The last failed request's error, until a request succeeds.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// When the lease was last granted or renewed (the answer's arrival).
    pub fn renewed_at(&self) -> Option<Instant> {
        self.renewed_at
    }

    /// The arbiter granted lease `id` with `ttl` and the serving key is ours; the request went
    /// out at `sent`, its answer came at `now`.
    pub fn granted(&mut self, id: i64, ttl: Duration, sent: Instant, now: Instant) {
        self.state = LeaseState::Holding {
            id,
            sent,
            ttl: ttl.min(self.cfg.ttl),
            in_flight: None,
        };
        self.last_error = None;
        self.renewed_at = Some(now);
    }

    /// True when a renewal should be sent now.
    pub fn renew_due(&self, now: Instant) -> bool {
        match self.state {
            LeaseState::Holding {
                sent, in_flight, ..
            } => in_flight.is_none() && now.saturating_duration_since(sent) >= self.cfg.renew_every,
            _ => false,
        }
    }

    /// A renewal goes out at `now`; returns the lease id to renew.
    pub fn renew_sent(&mut self, now: Instant) -> Result<i64, LeaseError> {
        match &mut self.state {
            LeaseState::Holding { id, in_flight, .. } => {
                *in_flight = Some(now);
                Ok(*id)
            }
            _ => Err(self.error("renew_sent")),
        }
    }

    /// The arbiter answered the renewal in flight with `ttl` left (zero: the lease is gone).
    pub fn renewed(&mut self, ttl: Duration, now: Instant) -> Result<(), LeaseError> {
        let cap = self.cfg.ttl;
        let LeaseState::Holding {
            sent,
            ttl: held,
            in_flight,
            ..
        } = &mut self.state
        else {
            return Err(self.error("renewed"));
        };
        let Some(at) = in_flight.take() else {
            return Err(self.error("renewed without a renewal in flight"));
        };
        if ttl.is_zero() {
            self.state = LeaseState::Lost(LostReason::Expired);
            return Ok(());
        }
        *sent = at;
        *held = ttl.min(cap);
        self.last_error = None;
        self.renewed_at = Some(now);
        Ok(())
    }

    /// The renewal in flight failed (the arbiter unreachable, or it answered with an error).
    /// The lease runs down from its last success; renewals go on.
    pub fn renew_failed(&mut self, why: String) {
        if let LeaseState::Holding { in_flight, .. } = &mut self.state {
            *in_flight = None;
        }
        self.last_error = Some(why);
    }

    /// The arbiter's word that the lease is gone (another node holds the key, or it was given
    /// up).
    pub fn lost(&mut self, why: LostReason) {
        self.state = LeaseState::Lost(why);
    }

    /// When the lease stops being certainly held (`sent + ttl − margin`); None without one.
    pub fn valid_until(&self) -> Option<Instant> {
        match self.state {
            LeaseState::Holding { sent, ttl, .. } => {
                Some(sent + ttl.saturating_sub(self.cfg.margin))
            }
            _ => None,
        }
    }

    /// True while the lease is certainly held: no other node can hold the key at `now`.
    pub fn certainly_valid(&self, now: Instant) -> bool {
        self.valid_until().is_some_and(|t| now < t)
    }

    /// How long the lease is still certainly held (zero when not).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.valid_until()
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(Duration::ZERO)
    }

    /// True when the lease has run down without a renewal: past `sent + ttl`, the arbiter may
    /// have given the key to another node.
    pub fn run_down(&self, now: Instant) -> bool {
        match self.state {
            LeaseState::Holding { sent, ttl, .. } => now >= sent + ttl,
            LeaseState::Lost(_) => true,
            LeaseState::AwaitingGrant => false,
        }
    }

    fn error(&self, event: &'static str) -> LeaseError {
        LeaseError {
            event,
            state: self.state_name(),
        }
    }
}

/// Whether a primary may release output now. In lockstep with its secondary (the secondary is
/// connected and answering), output goes out under COLO's own rule — only once the SVM produced
/// the same or a checkpoint covering it was applied — so the SVM holds every released reply
/// whoever serves next, and the lease is not needed. Alone, a primary releases only while its
/// lease is certainly held: afterwards the secondary may have taken over.
pub fn may_release(lease: Option<&Lease>, lockstep: bool, now: Instant) -> bool {
    match lease {
        None => true,
        Some(l) => lockstep || l.certainly_valid(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn held(t0: Instant) -> Lease {
        let mut l = Lease::new(LeaseConfig::for_ttl(ms(3000)));
        l.granted(7, ms(3000), t0, t0 + ms(5));
        l
    }

    #[test]
    fn validity_counts_from_the_request_and_stops_a_margin_early() {
        let t0 = Instant::now();
        let l = held(t0);
        assert_eq!(l.config().margin, ms(300));
        assert!(l.certainly_valid(t0 + ms(2699)));
        assert!(!l.certainly_valid(t0 + ms(2700)));
        assert_eq!(l.remaining(t0 + ms(700)), ms(2000));
        assert!(!l.run_down(t0 + ms(2999)));
        assert!(l.run_down(t0 + ms(3000)));
    }

    #[test]
    fn a_renewal_moves_validity_to_its_send_time() {
        let t0 = Instant::now();
        let mut l = held(t0);
        assert!(!l.renew_due(t0 + ms(999)));
        assert!(l.renew_due(t0 + ms(1000)));
        assert_eq!(l.renew_sent(t0 + ms(1000)), Ok(7));
        assert!(
            !l.renew_due(t0 + ms(2000)),
            "one renewal in flight at a time"
        );
        l.renewed(ms(3000), t0 + ms(1900)).unwrap();
        assert_eq!(l.valid_until(), Some(t0 + ms(3700)));
        assert_eq!(l.renewed_at(), Some(t0 + ms(1900)));
    }

    #[test]
    fn a_failed_renewal_lets_the_lease_run_down_but_keeps_trying() {
        let t0 = Instant::now();
        let mut l = held(t0);
        l.renew_sent(t0 + ms(1000)).unwrap();
        l.renew_failed("connection refused".into());
        assert_eq!(l.last_error(), Some("connection refused"));
        assert!(l.certainly_valid(t0 + ms(2000)));
        assert!(l.renew_due(t0 + ms(2000)));
        assert!(!l.certainly_valid(t0 + ms(2800)));
        assert_eq!(l.state_name(), "Holding");
    }

    #[test]
    fn ttl_zero_or_a_taken_key_loses_the_lease() {
        let t0 = Instant::now();
        let mut l = held(t0);
        l.renew_sent(t0 + ms(1000)).unwrap();
        l.renewed(Duration::ZERO, t0 + ms(1001)).unwrap();
        assert_eq!(l.state(), &LeaseState::Lost(LostReason::Expired));
        assert!(!l.certainly_valid(t0 + ms(1002)));
        assert!(l.run_down(t0 + ms(1002)));
        let e = l.renew_sent(t0 + ms(1003)).unwrap_err();
        assert_eq!(e.to_string(), "lease: renew_sent while Lost");

        let mut l = held(t0);
        l.lost(LostReason::TakenBy("secondary@10.0.0.2".into()));
        assert!(!l.certainly_valid(t0));
        assert_eq!(
            l.state(),
            &LeaseState::Lost(LostReason::TakenBy("secondary@10.0.0.2".into()))
        );
    }

    #[test]
    fn an_answer_without_a_request_is_refused() {
        let t0 = Instant::now();
        let mut l = held(t0);
        assert!(l.renewed(ms(3000), t0).is_err());
        let mut fresh = Lease::new(LeaseConfig::for_ttl(ms(3000)));
        assert_eq!(
            fresh.renewed(ms(3000), t0).unwrap_err().state,
            "AwaitingGrant"
        );
    }

    #[test]
    fn a_longer_ttl_than_configured_is_not_believed() {
        let t0 = Instant::now();
        let mut l = Lease::new(LeaseConfig::for_ttl(ms(3000)));
        l.granted(1, ms(60_000), t0, t0);
        assert_eq!(l.valid_until(), Some(t0 + ms(2700)));
    }

    #[test]
    fn release_needs_lockstep_or_a_certain_lease() {
        let t0 = Instant::now();
        let l = held(t0);
        assert!(may_release(None, false, t0 + ms(99_999)));
        assert!(may_release(Some(&l), false, t0 + ms(100)));
        assert!(!may_release(Some(&l), false, t0 + ms(2700)));
        assert!(may_release(Some(&l), true, t0 + ms(2700)));
    }
}

//! The arbiter against a real etcd (Debian's etcd-server on loopback): one holder of the
//! serving key at a time, takeover only after the old lease expired, output held once the lease
//! can no longer be counted on.

use std::time::{Duration, Instant};

use colo_cli::arbiter::{Arbiter, ArbiterConfig};
use colo_cli::etcd::{Etcd, PutOutcome};
use colo_cli::etcd_server::EtcdServer;

mod common;
use common::speed::{scaled, scaled_secs};

/// The lease TTL of the tests, s: 2 on a quiet machine, stretched by the measured slowness (a
/// live holder must not miss its renewals because the machine is busy). Read once per test.
fn ttl() -> u64 {
    scaled_secs(2)
}

fn cfg(server: &EtcdServer, pair: &str, name: &str, ttl_s: u64) -> ArbiterConfig {
    ArbiterConfig {
        url: server.url(),
        pair: pair.into(),
        ttl: Duration::from_secs(ttl_s),
        name: name.into(),
        unreachable: Default::default(),
    }
}

/// Waits for `cond`, giving up after `budget` (a hang guard: every wait here is bounded by a
/// lease TTL, and the budget is many of them).
fn wait_for(what: &str, budget: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + scaled(budget);
    while !cond() {
        assert!(Instant::now() < end, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// On a quiet machine; [`wait_for`] stretches it by the measured slowness.
const BUDGET: Duration = Duration::from_secs(120);

#[test]
fn one_holder_and_a_takeover_only_after_the_old_lease_expired() {
    let server = EtcdServer::start().unwrap();
    let ttl = ttl();
    let primary = Arbiter::start(cfg(&server, "p1", "primary@a", ttl), true).unwrap();
    wait_for("the primary to hold the key", BUDGET, || {
        primary.holds_key(Instant::now())
    });
    let secondary = Arbiter::start(cfg(&server, "p1", "secondary@b", ttl), false).unwrap();
    wait_for("the secondary to see the holder", BUDGET, || {
        secondary.status(Instant::now()).holder.as_deref() == Some("primary@a")
    });
    assert!(!secondary.lapsed());
    secondary.want_key();
    // The primary renews: the secondary sees it hold the key for longer than a TTL and never
    // gets it.
    wait_for(
        "the secondary to see the key held past a TTL",
        BUDGET,
        || {
            secondary
                .held_by_other(Instant::now())
                .is_some_and(|(who, d)| who == "primary@a" && d > Duration::from_secs(ttl) * 3 / 2)
        },
    );
    assert!(!secondary.holds_key(Instant::now()));
    assert!(primary.holds_key(Instant::now()));
    // A dead primary: its lease is granted and never renewed again. Simulated with a raw lease.
    drop(primary); // an orderly stop gives the key up at once
    wait_for("the secondary to take the key", BUDGET, || {
        secondary.holds_key(Instant::now())
    });
    let s = secondary.status(Instant::now());
    assert_eq!(s.holder.as_deref(), Some("secondary@b"));
    assert_eq!(s.state, "Holding");
}

#[test]
fn a_dead_holders_key_passes_after_its_ttl_not_before() {
    let server = EtcdServer::start().unwrap();
    let ttl = ttl();
    let mut etcd = Etcd::parse(&server.url(), scaled(Duration::from_secs(2))).unwrap();
    let (id, _) = etcd.grant(Duration::from_secs(ttl)).unwrap();
    let put = Instant::now();
    assert_eq!(
        etcd.put_if_absent("/colo/p2/serving", "primary@dead", id)
            .unwrap(),
        PutOutcome::Put
    );
    let secondary = Arbiter::start(cfg(&server, "p2", "secondary@b", ttl), false).unwrap();
    wait_for("the secondary to see the dead holder", BUDGET, || {
        secondary.status(Instant::now()).holder.is_some()
    });
    secondary.want_key();
    wait_for("the secondary to take the key", BUDGET, || {
        secondary.holds_key(Instant::now())
    });
    let took = put.elapsed();
    assert!(
        took >= Duration::from_secs(ttl) / 2,
        "the key passed {took:?} after a {ttl} s lease was put: before it could have expired"
    );
    eprintln!(
        "takeover with the arbiter: key passed {took:?} after the dead holder's last renewal \
         (ttl {ttl} s)"
    );
}

#[test]
fn a_lone_primary_holds_output_once_etcd_is_gone_and_renews_when_it_is_back() {
    let mut server = EtcdServer::start().unwrap();
    let primary = Arbiter::start(cfg(&server, "p3", "primary@a", ttl()), true).unwrap();
    wait_for("the primary to hold the key", BUDGET, || {
        primary.holds_key(Instant::now())
    });
    assert!(primary.may_release(false, Instant::now()));
    server.stop();
    wait_for("output held after the lease ran down", BUDGET, || {
        !primary.may_release(false, Instant::now())
    });
    // In lockstep with a secondary, COLO's own rule covers released output.
    assert!(primary.may_release(true, Instant::now()));
    let s = primary.status(Instant::now());
    assert!(s.last_error.is_some(), "{s:?}");
    assert_eq!(s.lease_remaining_ms, 0);
    server.restart().unwrap();
    // The lease survives the restart (etcd keeps leases on disk and extends them on a new
    // leader), so the primary renews it, or puts the key again if it lapsed.
    wait_for("the primary to hold the key again", BUDGET, || {
        primary.may_release(false, Instant::now())
    });
    assert!(primary.dropped().is_none());
}

#[test]
fn a_primary_whose_key_was_taken_learns_it_was_dropped() {
    let server = EtcdServer::start().unwrap();
    let primary = Arbiter::start(cfg(&server, "p4", "primary@a", ttl()), true).unwrap();
    wait_for("the primary to hold the key", BUDGET, || {
        primary.holds_key(Instant::now())
    });
    // Someone revokes the primary's lease behind its back (an operator, or an expiry while the
    // primary was stalled), and the secondary takes the key.
    let mut etcd = Etcd::parse(&server.url(), scaled(Duration::from_secs(2))).unwrap();
    let held = etcd.get("/colo/p4/serving").unwrap().unwrap();
    etcd.revoke(held.lease).unwrap();
    let (id, _) = etcd.grant(Duration::from_secs(30)).unwrap();
    assert_eq!(
        etcd.put_if_absent("/colo/p4/serving", "secondary@b", id)
            .unwrap(),
        PutOutcome::Put
    );
    wait_for("the primary to learn it was dropped", BUDGET, || {
        primary.dropped().is_some()
    });
    assert_eq!(primary.dropped().as_deref(), Some("secondary@b"));
    assert!(!primary.may_release(false, Instant::now()));
}

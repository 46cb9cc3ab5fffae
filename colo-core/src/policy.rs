//! Checkpoint policy: when to start a checkpoint, given the comparator's request and the clock.
//!
//! COLO checkpoints on demand: as long as the two VMs produce the same outputs they run freely
//! and nothing is copied. A checkpoint starts
//! - at once when something asks for it ([`CheckpointReason::Mismatch`], a frame held too long,
//!   a full queue, an operator's request) — but never sooner than [`CheckpointPolicy::min_interval`]
//!   after the previous checkpoint ended, so that a pair that mismatches on every packet still
//!   gets to run (it bounds the checkpoint rate to `1 / min_interval`);
//! - otherwise periodically, [`CheckpointPolicy::max_interval`] after the previous one ended, which
//!   bounds how much memory the two VMs can dirty between checkpoints (the pause grows with the
//!   dirty set `D = A ∪ B`) and how far their states can drift apart unseen.
//!
//! The policy is a pure function of its arguments: the caller passes the current time.

use std::time::{Duration, Instant};

/// Why a checkpoint is (or should be) taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointReason {
    /// The PVM's and the SVM's outputs differ.
    Mismatch,
    /// A frame waited for its counterpart longer than the compare timeout.
    HeldTooLong,
    /// The comparator's queue reached its bound (nothing was dropped).
    QueueFull,
    /// `max_interval` passed since the previous checkpoint.
    Periodic,
    /// The operator (or the driver) asked for one.
    Manual,
}

impl std::fmt::Display for CheckpointReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckpointReason::Mismatch => "output mismatch",
            CheckpointReason::HeldTooLong => "frame held too long",
            CheckpointReason::QueueFull => "compare queue full",
            CheckpointReason::Periodic => "periodic",
            CheckpointReason::Manual => "manual",
        })
    }
}

/// When checkpoints are taken; see the module docs.
///
/// Defaults (chosen by reasoning, to be confirmed by the comparator/latency benchmarks):
/// - `min_interval` = 10 ms: a checkpoint pause is a few ms (colo's target is well under the
///   1.4–24 ms QEMU reaches with `TCP_NODELAY`), so even under a mismatch on every packet the VMs
///   run at least about two thirds of the time, while a mismatched response waits at most 10 ms
///   more than the pause itself.
/// - `max_interval` = 1 s: bounds the dirty set that one checkpoint must move (QEMU's 20 s default
///   lets it grow to the whole working set and its pause with it) while costing an idle pair at
///   most one small checkpoint per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Smallest gap between the end of one checkpoint and the start of the next.
    pub min_interval: Duration,
    /// Largest gap: a periodic checkpoint starts when it has passed with no other reason.
    pub max_interval: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            min_interval: Duration::from_millis(10),
            max_interval: Duration::from_secs(1),
        }
    }
}

impl CheckpointPolicy {
    /// Should a checkpoint start now? `last_end` = when the previous checkpoint finished;
    /// `wanted` = the comparator's request (or a manual one). A request is granted once
    /// `min_interval` has passed since `last_end`; without one, a periodic checkpoint is due
    /// once `max_interval` has passed. (If `min_interval > max_interval`, the periodic
    /// checkpoint still waits for `min_interval`.)
    pub fn decide(
        &self,
        now: Instant,
        last_end: Instant,
        wanted: Option<CheckpointReason>,
    ) -> Option<CheckpointReason> {
        let since = now.saturating_duration_since(last_end);
        if since < self.min_interval {
            return None;
        }
        match wanted {
            Some(reason) => Some(reason),
            None if since >= self.max_interval => Some(CheckpointReason::Periodic),
            None => None,
        }
    }

    /// When to wake up next to re-evaluate [`decide`](Self::decide) (never before `now`).
    /// With a pending request that is `last_end + min_interval`; otherwise the periodic
    /// deadline `last_end + max(min_interval, max_interval)`.
    pub fn next_wakeup(
        &self,
        now: Instant,
        last_end: Instant,
        wanted: Option<CheckpointReason>,
    ) -> Instant {
        let gap = match wanted {
            Some(_) => self.min_interval,
            None => self.max_interval.max(self.min_interval),
        };
        // An Instant that cannot be represented is "never": wake up as late as we can say.
        let at = last_end
            .checked_add(gap)
            .or_else(|| now.checked_add(Duration::from_secs(3600)))
            .unwrap_or(now);
        at.max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn mismatch_waits_for_min_interval_then_is_immediate() {
        let p = CheckpointPolicy {
            min_interval: ms(10),
            max_interval: ms(1000),
        };
        let t0 = Instant::now();
        let m = Some(CheckpointReason::Mismatch);
        assert_eq!(p.decide(t0 + ms(5), t0, m), None);
        assert_eq!(p.next_wakeup(t0 + ms(5), t0, m), t0 + ms(10));
        assert_eq!(p.decide(t0 + ms(10), t0, m), m);
        assert_eq!(p.next_wakeup(t0 + ms(20), t0, m), t0 + ms(20));
    }

    #[test]
    fn periodic_after_max_interval() {
        let p = CheckpointPolicy {
            min_interval: ms(10),
            max_interval: ms(1000),
        };
        let t0 = Instant::now();
        assert_eq!(p.decide(t0 + ms(999), t0, None), None);
        assert_eq!(p.next_wakeup(t0 + ms(500), t0, None), t0 + ms(1000));
        assert_eq!(
            p.decide(t0 + ms(1000), t0, None),
            Some(CheckpointReason::Periodic)
        );
        // A request keeps its own reason even when the periodic one is also due.
        assert_eq!(
            p.decide(t0 + ms(2000), t0, Some(CheckpointReason::QueueFull)),
            Some(CheckpointReason::QueueFull)
        );
    }

    #[test]
    fn min_above_max_still_waits_min() {
        let p = CheckpointPolicy {
            min_interval: ms(50),
            max_interval: ms(20),
        };
        let t0 = Instant::now();
        assert_eq!(p.decide(t0 + ms(30), t0, None), None);
        assert_eq!(p.next_wakeup(t0 + ms(30), t0, None), t0 + ms(50));
        assert_eq!(
            p.decide(t0 + ms(50), t0, None),
            Some(CheckpointReason::Periodic)
        );
    }

    #[test]
    fn clock_before_last_end_is_not_a_panic() {
        let p = CheckpointPolicy::default();
        let t0 = Instant::now() + ms(100);
        assert_eq!(
            p.decide(t0 - ms(50), t0, Some(CheckpointReason::Manual)),
            None
        );
        assert!(p.next_wakeup(t0 - ms(50), t0, None) >= t0);
    }
}

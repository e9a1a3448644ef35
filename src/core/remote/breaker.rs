//! Circuit breaker for fleet calls: after `failures` calls in a row fail (timeout, 5xx,
//! no answer), stop calling for `cooldown_ms` and decide locally (fallback); then let
//! one trial call through (half-open): success closes it, failure opens it again.
//!
//! Without it every request of a subject without a lease would wait one timeout while
//! the limit service is down; with it only the calls that trip it do, and an outage
//! never adds latency beyond one timeout to any request.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are not made; decisions are local until the cooldown ends.
    Open,
    /// Cooldown over: one trial call is (or may be) in flight.
    HalfOpen,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breaker {
    consecutive_failures: u32,
    open_until_ms: u64,
    /// Half-open: the trial call was handed out at this time (0: not yet).
    trial_since_ms: u64,
}

impl Breaker {
    pub fn state(&self, now_ms: u64) -> BreakerState {
        if self.open_until_ms == 0 {
            BreakerState::Closed
        } else if now_ms < self.open_until_ms {
            BreakerState::Open
        } else {
            BreakerState::HalfOpen
        }
    }

    /// Whether a call may be made now. Half-open hands out one trial call; if its answer
    /// never comes (the host lost it), another trial is allowed after `cooldown_ms`.
    pub fn allow(&mut self, now_ms: u64, cooldown_ms: u64) -> bool {
        match self.state(now_ms) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => {
                if self.trial_since_ms == 0 || now_ms.saturating_sub(self.trial_since_ms) >= cooldown_ms {
                    self.trial_since_ms = now_ms.max(1);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Whether requests should use the lease service (closed or half-open) rather than
    /// the partition fallback.
    pub fn connected(&self, now_ms: u64) -> bool {
        self.state(now_ms) != BreakerState::Open
    }

    pub fn success(&mut self) {
        *self = Breaker::default();
    }

    /// Counts a failed call; returns true when this failure opened the breaker.
    pub fn failure(&mut self, now_ms: u64, threshold: u32, cooldown_ms: u64) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let was_open = self.open_until_ms != 0;
        if was_open || self.consecutive_failures >= threshold.max(1) {
            self.open_until_ms = now_ms.saturating_add(cooldown_ms).max(1);
            self.trial_since_ms = 0;
            return !was_open;
        }
        false
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_half_opens_with_one_trial() {
        let mut b = Breaker::default();
        assert!(b.allow(0, 1_000));
        assert!(!b.failure(10, 3, 1_000));
        assert!(!b.failure(20, 3, 1_000));
        assert_eq!(b.state(20), BreakerState::Closed);
        assert!(b.failure(30, 3, 1_000), "third failure opens it");
        assert_eq!(b.state(30), BreakerState::Open);
        assert!(!b.connected(500));
        assert!(!b.allow(1_029, 1_000));
        // Cooldown over: exactly one trial.
        assert_eq!(b.state(1_030), BreakerState::HalfOpen);
        assert!(b.connected(1_030));
        assert!(b.allow(1_030, 1_000));
        assert!(!b.allow(1_031, 1_000));
        // The trial fails: open again for a full cooldown.
        assert!(!b.failure(1_050, 3, 1_000), "already open: not a new opening");
        assert_eq!(b.state(2_049), BreakerState::Open);
        assert!(b.allow(2_050, 1_000));
        b.success();
        assert_eq!(b.state(2_060), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[test]
    fn a_lost_trial_is_retried_after_a_cooldown() {
        let mut b = Breaker::default();
        b.failure(0, 1, 100);
        assert!(b.allow(100, 100));
        assert!(!b.allow(199, 100));
        assert!(b.allow(200, 100));
    }

    #[test]
    fn success_resets_the_failure_count() {
        let mut b = Breaker::default();
        b.failure(0, 3, 100);
        b.failure(0, 3, 100);
        b.success();
        assert!(!b.failure(0, 3, 100));
        assert_eq!(b.state(0), BreakerState::Closed);
    }
}

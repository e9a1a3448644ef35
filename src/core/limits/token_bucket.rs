//! Token bucket shared by all Envoy workers.
//!
//! Workers keep one [`BucketState`] per key in proxy-wasm shared data and update it with
//! compare-and-swap: read state, call [`try_take`], write the new state back only if the
//! stored version did not change, retry otherwise. That loop needs a pure function and a
//! small, fixed-size state, which is what this module provides.
//!
//! # Exact integer maths
//!
//! A limit of `rate` tokens per `interval_ms` refills `rate / (interval_ms * 10^6)` tokens
//! per nanosecond, which is rarely a whole number. With `I = interval_ms * 10^6` and
//! `g = gcd(rate, I)`, one token is split into `unit = I / g` debt units and each
//! nanosecond repays exactly `per_ns = rate / g` units. The bucket's debt (tokens consumed
//! and not yet refilled) is then an integer number of units at every nanosecond, so there
//! is no rounding and no drift, however the requests are spaced. The capacity
//! `burst * unit` must fit in a `u64` (checked by [`BucketLimit::validate`]); the few
//! products that may not fit are computed in `u128`.

use core::fmt;

use serde::{Deserialize, Serialize};

/// Nanoseconds per millisecond: the limit is configured in ms, the clock is in ns.
const NS_PER_MS: u64 = 1_000_000;

/// A token-bucket limit: `rate` tokens are added every `interval_ms` milliseconds (spread
/// evenly, one token each `interval_ms / rate` ms), up to a capacity of `burst` tokens.
///
/// Keeping the rate as a fraction (`rate` per `interval_ms`) instead of tokens per second
/// lets plans such as "100 per minute" or "3 per second" be enforced exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketLimit {
    /// Tokens added per `interval_ms`.
    pub rate: u64,
    /// Length of the refill interval in milliseconds.
    pub interval_ms: u64,
    /// Capacity: the most tokens that can be spent at once after a quiet period.
    pub burst: u64,
}

/// Why a [`BucketLimit`] cannot be enforced, so configuration loading can reject it with
/// a clear message instead of the filter misbehaving at request time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitError {
    /// `rate` is zero: the bucket would never refill.
    ZeroRate,
    /// `interval_ms` is zero: the refill speed would be infinite.
    ZeroInterval,
    /// `burst` is zero: no request could ever pass.
    ZeroBurst,
    /// `interval_ms` in nanoseconds does not fit in a `u64` (more than ~584 years).
    IntervalTooLong,
    /// `burst` tokens in exact debt units do not fit in a `u64`; lower the burst or pick
    /// a rate that divides the interval more evenly.
    BurstTooLarge,
    /// An empty bucket would take longer than [`MAX_REFILL_MS`] to fill again: use a
    /// quota for allowances of that length.
    RefillTooLong,
}

/// The longest time an empty bucket may take to fill (31 days). Bounding it lets idle
/// limit state be reclaimed after a fixed time without knowing its plan (see
/// `limits::reclaim`); anything slower is a monthly quota, which plans have.
pub const MAX_REFILL_MS: u64 = 31 * 24 * 3600 * 1000;

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitError::ZeroRate => "token bucket rate must be greater than zero",
            LimitError::ZeroInterval => "token bucket interval must be greater than zero",
            LimitError::ZeroBurst => "token bucket burst must be greater than zero",
            LimitError::IntervalTooLong => "token bucket interval is too long",
            LimitError::RefillTooLong => {
                "token bucket takes longer than 31 days to refill (burst * per / rate); use a quota"
            }
            LimitError::BurstTooLarge => {
                "token bucket burst is too large for this rate and interval \
                 (burst * interval_ns / gcd(rate, interval_ns) must fit in 64 bits)"
            }
        })
    }
}

impl std::error::Error for LimitError {}

/// The exact integer form of a limit (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Params {
    /// Debt units per token.
    unit: u64,
    /// Debt units repaid per nanosecond.
    per_ns: u64,
    /// `burst * unit`: the debt of an empty bucket.
    cap: u64,
}

impl BucketLimit {
    /// Checks that the limit can be enforced exactly without overflow.
    ///
    /// Call it when loading configuration: [`try_take`] denies every request under an
    /// invalid limit (failing closed) rather than panicking.
    pub fn validate(&self) -> Result<(), LimitError> {
        self.params()?;
        // burst * interval / rate, in u128 so no plan can overflow the check.
        let refill_ms = (self.burst as u128 * self.interval_ms as u128).div_ceil(self.rate as u128);
        if refill_ms > MAX_REFILL_MS as u128 {
            return Err(LimitError::RefillTooLong);
        }
        Ok(())
    }

    /// The exact integer form of the limit, or why there is none.
    fn params(&self) -> Result<Params, LimitError> {
        if self.rate == 0 {
            return Err(LimitError::ZeroRate);
        }
        if self.interval_ms == 0 {
            return Err(LimitError::ZeroInterval);
        }
        if self.burst == 0 {
            return Err(LimitError::ZeroBurst);
        }
        let interval_ns = self
            .interval_ms
            .checked_mul(NS_PER_MS)
            .ok_or(LimitError::IntervalTooLong)?;
        let g = gcd(self.rate, interval_ns);
        let unit = interval_ns / g;
        let cap = self.burst.checked_mul(unit).ok_or(LimitError::BurstTooLarge)?;
        Ok(Params {
            unit,
            per_ns: self.rate / g,
            cap,
        })
    }
}

/// Shared per-key bucket state: what was consumed and when, in the exact units of the
/// limit it was recorded under. 24 bytes with bincode.
///
/// The default (all zero) state is a full bucket, so a key seen for the first time needs
/// no initialisation. Fields are private so that only [`try_take`] produces states; any
/// deserialized value is still handled without panicking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketState {
    /// Latest clock reading used (ns); `debt` is as of this instant. Never moves back.
    last_ns: u64,
    /// Tokens consumed and not yet refilled at `last_ns`, in units of `1 / unit` token.
    debt: u64,
    /// Debt units per token of the limit `debt` was recorded under; 0 only when unused.
    /// Stored so that a limit change can convert the debt to the new units.
    unit: u64,
}

impl BucketState {
    /// The latest clock reading this state has seen (ns; 0 for a never-used bucket).
    pub fn last_ns(&self) -> u64 {
        self.last_ns
    }
}

/// Outcome of [`try_take`], with everything needed for `RateLimit` headers and
/// `Retry-After`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Take {
    /// Whether the request may proceed (its cost has been taken from the bucket).
    pub allowed: bool,
    /// Whole tokens left in the bucket after this request (fractions are not promised).
    pub remaining: u64,
    /// When denied: milliseconds until `cost` tokens will be available, rounded up.
    /// `None` when allowed, or when `cost > burst` (no amount of waiting helps).
    pub retry_after_ms: Option<u64>,
}

/// Takes `cost` tokens at time `now_ns` if they are available; returns the decision and
/// the state to store (compare-and-swap it into shared data when it differs from `state`).
///
/// Pure and allocation-free, so concurrent workers can retry it freely.
///
/// * Denied requests, cost 0 and an invalid limit return `*state` unchanged. Cost 0 is
///   always allowed; an invalid limit (see [`BucketLimit::validate`]) denies everything
///   with `retry_after_ms: None`.
/// * Clock going backwards: a `now_ns` earlier than the latest time the state has seen
///   counts as that latest time, i.e. no time elapsed; durations in the decision are
///   then measured from that latest time. This never grants extra tokens and never panics.
/// * Limit change (plan change): the tokens consumed as of the state's last update stay
///   consumed — the debt is converted to the new limit's units, rounding up, and capped
///   at the new `burst` (a full debt means an empty bucket, never more) — and are refilled
///   from then on at the new rate. So an upgrade keeps past consumption (it does not hand
///   out a fresh full bucket) and a downgrade below the consumed amount leaves the bucket
///   empty rather than owing more than one new burst.
pub fn try_take(limit: &BucketLimit, state: &BucketState, now_ns: u64, cost: u64) -> (Take, BucketState) {
    let Ok(p) = limit.params() else {
        let decision = Take {
            allowed: false,
            remaining: 0,
            retry_after_ms: None,
        };
        return (decision, *state);
    };
    let now = now_ns.max(state.last_ns);
    let debt = current_debt(&p, state, now);

    if cost == 0 {
        return (take_result(&p, debt, true, None), *state);
    }
    if cost > limit.burst {
        return (take_result(&p, debt, false, None), *state);
    }
    // cost <= burst, so cost * unit <= cap fits in u64.
    let need = cost * p.unit;
    let free = p.cap - debt;
    if need <= free {
        let debt = debt + need;
        let next = BucketState {
            last_ns: now,
            debt,
            unit: p.unit,
        };
        (take_result(&p, debt, true, None), next)
    } else {
        let retry = ms_to_repay(&p, need - free);
        (take_result(&p, debt, false, Some(retry)), *state)
    }
}

/// Puts `tokens` taken earlier and never spent back into the bucket at `now_ns` (a
/// worker's lease giving back its unspent units): the debt shrinks by that many tokens,
/// never below 0, so a bucket that refilled meanwhile keeps at most `burst` (what does
/// not fit is lost, never a credit). Like [`try_take`]: the clock never moves back, a
/// state recorded under another limit is converted, an invalid limit changes nothing.
pub fn give_back(limit: &BucketLimit, state: &BucketState, now_ns: u64, tokens: u64) -> BucketState {
    let Ok(p) = limit.params() else {
        return *state;
    };
    if tokens == 0 {
        return *state;
    }
    let now = now_ns.max(state.last_ns);
    let debt = current_debt(&p, state, now);
    // debt <= cap fits in u64, so the difference does too.
    let debt = u128::from(debt).saturating_sub(u128::from(tokens) * u128::from(p.unit)) as u64;
    BucketState {
        last_ns: now,
        debt,
        unit: p.unit,
    }
}

/// The state's debt at `now` (>= `state.last_ns`) in the units of `p`, at most `p.cap`.
fn current_debt(p: &Params, state: &BucketState, now: u64) -> u64 {
    if state.debt == 0 || state.unit == 0 {
        return 0;
    }
    let recorded = if state.unit == p.unit {
        u128::from(state.debt)
    } else {
        // Convert to the new units, rounding up: consumed tokens stay consumed.
        (u128::from(state.debt) * u128::from(p.unit)).div_ceil(u128::from(state.unit))
    };
    let recorded = recorded.min(u128::from(p.cap));
    let repaid = u128::from(now - state.last_ns) * u128::from(p.per_ns);
    // Result <= cap, so it fits in u64.
    recorded.saturating_sub(repaid) as u64
}

/// Whole milliseconds (rounded up) needed to repay `units` of debt.
fn ms_to_repay(p: &Params, units: u64) -> u64 {
    let per_ms = u128::from(p.per_ns) * u128::from(NS_PER_MS);
    // <= units, so it fits in u64.
    u128::from(units).div_ceil(per_ms) as u64
}

/// Builds the result for a bucket left with `debt` units owed.
fn take_result(p: &Params, debt: u64, allowed: bool, retry_after_ms: Option<u64>) -> Take {
    Take {
        allowed,
        remaining: (p.cap - debt) / p.unit,
        retry_after_ms,
    }
}

/// Greatest common divisor (Euclid), to reduce the refill fraction.
fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = NS_PER_MS;
    const SEC: u64 = 1_000 * MS;

    fn lim(rate: u64, interval_ms: u64, burst: u64) -> BucketLimit {
        BucketLimit {
            rate,
            interval_ms,
            burst,
        }
    }

    fn dec(allowed: bool, remaining: u64, retry: Option<u64>) -> Take {
        Take {
            allowed,
            remaining,
            retry_after_ms: retry,
        }
    }

    /// Runs `try_take` and stores the new state, like a worker whose CAS succeeded.
    fn take(limit: &BucketLimit, state: &mut BucketState, now_ns: u64, cost: u64) -> Take {
        let (d, next) = try_take(limit, state, now_ns, cost);
        if !d.allowed || cost == 0 {
            assert_eq!(next, *state, "denied or free requests must not change the state");
        }
        *state = next;
        d
    }

    #[test]
    fn validation() {
        assert_eq!(lim(10, 1000, 10).validate(), Ok(()));
        assert_eq!(lim(0, 1000, 10).validate(), Err(LimitError::ZeroRate));
        assert_eq!(lim(10, 0, 10).validate(), Err(LimitError::ZeroInterval));
        assert_eq!(lim(10, 1000, 0).validate(), Err(LimitError::ZeroBurst));
        assert_eq!(
            lim(1, u64::MAX / MS + 1, 1).validate(),
            Err(LimitError::IntervalTooLong)
        );
        // Representable, but slower to refill than MAX_REFILL_MS: refused.
        assert!(lim(1, u64::MAX / MS, 1).params().is_ok());
        assert_eq!(lim(1, u64::MAX / MS, 1).validate(), Err(LimitError::RefillTooLong));
        // 1 token/day: unit = 86_400 * 10^9; a burst of 213_503 fits, 213_504 does not.
        assert!(lim(1, 86_400_000, 213_503).params().is_ok());
        assert_eq!(lim(1, 86_400_000, 213_504).validate(), Err(LimitError::BurstTooLarge));
        // Refill time burst * per / rate: 31 days is the longest allowed.
        assert_eq!(lim(1, 86_400_000, 31).validate(), Ok(()));
        assert_eq!(lim(1, 86_400_000, 32).validate(), Err(LimitError::RefillTooLong));
        assert_eq!(lim(2, 86_400_000, 62).validate(), Ok(()));
        // The gcd reduction makes "a million per day, burst a million" representable.
        assert_eq!(lim(1_000_000, 86_400_000, 1_000_000).validate(), Ok(()));
        // Largest rate per ms with a whole number of tokens per ns: unit 1, any burst.
        assert_eq!(lim(u64::MAX / MS * MS, 1, u64::MAX).validate(), Ok(()));
        // u64::MAX per ms only shares a factor 5 with 10^6: unit 200_000.
        assert_eq!(lim(u64::MAX, 1, 92_233_720_368_547).validate(), Ok(()));
        assert_eq!(
            lim(u64::MAX, 1, 92_233_720_368_548).validate(),
            Err(LimitError::BurstTooLarge)
        );
        assert!(LimitError::BurstTooLarge.to_string().contains("too large"));
    }

    #[test]
    fn invalid_limit_denies_without_panicking() {
        let s = BucketState::default();
        for l in [lim(0, 1, 1), lim(1, 0, 1), lim(1, 1, 0), lim(1, u64::MAX, 1)] {
            assert_eq!(try_take(&l, &s, 5, 1), (dec(false, 0, None), s));
        }
    }

    #[test]
    fn params_are_reduced_exactly() {
        // 10 per second: I = 10^9 ns, g = 10, unit = 10^8, per_ns = 1.
        assert_eq!(
            lim(10, 1000, 20).params(),
            Ok(Params {
                unit: 100_000_000,
                per_ns: 1,
                cap: 2_000_000_000
            })
        );
        // 3 per 7 ms: I = 7_000_000, g = 1.
        assert_eq!(
            lim(3, 7, 2).params(),
            Ok(Params {
                unit: 7_000_000,
                per_ns: 3,
                cap: 14_000_000
            })
        );
    }

    #[test]
    fn full_burst_then_deny() {
        let l = lim(10, 1000, 5); // one token every 100 ms
        let mut s = BucketState::default();
        let t0 = 1_700_000_000 * SEC;
        for left in (0..5).rev() {
            assert_eq!(take(&l, &mut s, t0, 1), dec(true, left, None));
        }
        assert_eq!(take(&l, &mut s, t0, 1), dec(false, 0, Some(100)));
        // 1 ns before the next token: still denied, retry rounds up to 1 ms.
        assert_eq!(take(&l, &mut s, t0 + 100 * MS - 1, 1), dec(false, 0, Some(1)));
        assert_eq!(take(&l, &mut s, t0 + 100 * MS, 1), dec(true, 0, None));
    }

    #[test]
    fn exact_refill_after_k_intervals_over_rate() {
        // 3 tokens per second: one every 333.33.. ms, which is not a whole number of ns.
        let l = lim(3, 1000, 3);
        let mut s = BucketState::default();
        assert_eq!(take(&l, &mut s, 0, 3), dec(true, 0, None));
        // k tokens are back after exactly k * 10^9 / 3 ns: not one ns earlier.
        for k in 1..=3u64 {
            let exact = k * SEC / 3 + u64::from(!(k * SEC).is_multiple_of(3));
            let (d, _) = try_take(&l, &s, exact - 1, k);
            assert!(!d.allowed, "k={k}");
            let (d, _) = try_take(&l, &s, exact, k);
            assert!(d.allowed, "k={k}");
        }
        // Over a long run the refill does not drift: 3000 requests in 1000 s, at exactly
        // the instants the tokens appear.
        let mut s = BucketState::default();
        assert!(take(&l, &mut s, 0, 3).allowed);
        for k in 1..=3000u64 {
            let at = (k * SEC).div_ceil(3);
            assert!(!take(&l, &mut s, at - 1, 1).allowed, "k={k}");
            assert_eq!(take(&l, &mut s, at, 1).remaining, 0, "k={k}");
        }
        assert_eq!(take(&l, &mut s, 1000 * SEC, 0), dec(true, 0, None));
        assert_eq!(take(&l, &mut s, 1000 * SEC + 1, 0), dec(true, 0, None));
        assert_eq!(take(&l, &mut s, 1001 * SEC, 0), dec(true, 3, None));
    }

    #[test]
    fn partial_refill() {
        let l = lim(10, 1000, 10); // one token per 100 ms
        let mut s = BucketState::default();
        assert_eq!(take(&l, &mut s, 0, 10), dec(true, 0, None));
        // After 250 ms: 2.5 tokens are back, 2 whole ones are reported.
        assert_eq!(take(&l, &mut s, 250 * MS, 0), dec(true, 2, None));
        assert_eq!(take(&l, &mut s, 250 * MS, 3), dec(false, 2, Some(50)));
        assert_eq!(take(&l, &mut s, 250 * MS, 2), dec(true, 0, None));
        // The half token is kept: the next one arrives 50 ms later, not 100 ms.
        assert_eq!(take(&l, &mut s, 250 * MS, 1), dec(false, 0, Some(50)));
        assert_eq!(take(&l, &mut s, 300 * MS, 1), dec(true, 0, None));
    }

    #[test]
    fn cost_greater_than_one() {
        let l = lim(1, 1000, 10);
        let mut s = BucketState::default();
        assert_eq!(take(&l, &mut s, 0, 4), dec(true, 6, None));
        assert_eq!(take(&l, &mut s, 0, 4), dec(true, 2, None));
        assert_eq!(take(&l, &mut s, 0, 4), dec(false, 2, Some(2000)));
        assert_eq!(take(&l, &mut s, 1500 * MS, 4), dec(false, 3, Some(500)));
        assert_eq!(take(&l, &mut s, 2 * SEC, 4), dec(true, 0, None));
        assert_eq!(take(&l, &mut s, 2 * SEC, 10), dec(false, 0, Some(10_000)));
        assert_eq!(take(&l, &mut s, 12 * SEC, 10), dec(true, 0, None));
    }

    #[test]
    fn cost_greater_than_burst_is_never_satisfiable() {
        let l = lim(10, 1000, 5);
        let s = BucketState::default();
        assert_eq!(try_take(&l, &s, 0, 6), (dec(false, 5, None), s));
        assert_eq!(try_take(&l, &s, 0, u64::MAX), (dec(false, 5, None), s));
        let mut s = s;
        take(&l, &mut s, 0, 2);
        assert_eq!(try_take(&l, &s, 0, 6), (dec(false, 3, None), s));
    }

    #[test]
    fn cost_zero_changes_nothing() {
        let l = lim(10, 1000, 5);
        let mut s = BucketState::default();
        assert_eq!(try_take(&l, &s, 7, 0), (dec(true, 5, None), s));
        take(&l, &mut s, 0, 5);
        // Allowed even on an empty bucket, and the state is returned untouched.
        assert_eq!(try_take(&l, &s, 10 * MS, 0), (dec(true, 0, None), s));
    }

    #[test]
    fn default_state_is_full_at_any_time() {
        let l = lim(5, 1000, 7);
        for now in [0, 1, SEC, u64::MAX] {
            let (d, s) = try_take(&l, &BucketState::default(), now, 7);
            assert_eq!(d, dec(true, 0, None));
            assert_eq!(
                s,
                BucketState {
                    last_ns: now,
                    debt: 7 * l.params().unwrap().unit,
                    unit: l.params().unwrap().unit
                }
            );
        }
    }

    #[test]
    fn clock_going_backwards() {
        let l = lim(10, 1000, 2);
        let mut s = BucketState::default();
        let t = 1_000 * SEC;
        assert_eq!(take(&l, &mut s, t, 2), dec(true, 0, None));
        // Earlier than the state: no time elapsed, nothing refilled, durations from `t`.
        assert_eq!(take(&l, &mut s, t - 5 * SEC, 1), dec(false, 0, Some(100)));
        assert_eq!(take(&l, &mut s, 0, 1), dec(false, 0, Some(100)));
        // Half refilled; going back again does not undo or double-count that time.
        assert_eq!(take(&l, &mut s, t + 150 * MS, 1), dec(true, 0, None));
        assert_eq!(s.last_ns, t + 150 * MS);
        assert_eq!(take(&l, &mut s, t + 100 * MS, 1), dec(false, 0, Some(50)));
        // A free look later does not move the state's time...
        assert_eq!(take(&l, &mut s, t + 300 * MS, 0), dec(true, 2, None));
        assert_eq!(s.last_ns, t + 150 * MS);
        // ...so an allowed take at an earlier (but not backwards) time refills 0.5 only.
        assert_eq!(take(&l, &mut s, t + 200 * MS, 1), dec(true, 0, None));
        assert_eq!(s.last_ns, t + 200 * MS);
        assert_eq!(take(&l, &mut s, t, 1), dec(false, 0, Some(100)));
        assert_eq!(take(&l, &mut s, t + 300 * MS, 1), dec(true, 0, None));
    }

    #[test]
    fn huge_gaps_do_not_overflow() {
        // unit 1, P = 18_446_744_073_709 units (= tokens) per ns, capacity u64::MAX.
        const P: u64 = u64::MAX / MS;
        let l = lim(P * MS, 1, u64::MAX);
        let mut s = BucketState::default();
        assert_eq!(take(&l, &mut s, 0, u64::MAX), dec(true, 0, None));
        // 1 ns later P tokens are back; the rest takes just under 1 ms.
        assert_eq!(take(&l, &mut s, 1, u64::MAX), dec(false, P, Some(1)));
        // u64::MAX ns later everything is back (P * u64::MAX does not overflow).
        assert_eq!(take(&l, &mut s, u64::MAX, u64::MAX), dec(true, 0, None));

        // One token per 1000 days, burst 213 (213 * 8.64e16 units just fits).
        let slow = lim(1, 1_000 * 86_400_000, 213);
        let mut s = BucketState::default();
        assert!(take(&slow, &mut s, u64::MAX - 1, 213).allowed);
        assert_eq!(take(&slow, &mut s, u64::MAX, 1), dec(false, 0, Some(86_400_000_000)));
        // From time 0 to the end of time with a fast limit: a full bucket, no overflow.
        let fast = lim(1_000_000, 1, 1_000_000);
        let mut s = BucketState::default();
        take(&fast, &mut s, 0, 1_000_000);
        assert_eq!(take(&fast, &mut s, u64::MAX, 0), dec(true, 1_000_000, None));
    }

    #[test]
    fn corrupt_states_do_not_panic() {
        let l = lim(10, 1000, 5);
        for s in [
            BucketState {
                last_ns: u64::MAX,
                debt: u64::MAX,
                unit: 1,
            },
            BucketState {
                last_ns: 0,
                debt: u64::MAX,
                unit: 0,
            },
            BucketState {
                last_ns: 3,
                debt: u64::MAX,
                unit: u64::MAX,
            },
        ] {
            for now in [0, 1, u64::MAX] {
                for cost in [0, 1, 5, 6, u64::MAX] {
                    let (d, next) = try_take(&l, &s, now, cost);
                    assert!(d.remaining <= 5);
                    assert!(next.debt <= l.params().unwrap().cap || next == s);
                }
            }
        }
    }

    #[test]
    fn plan_change_up_keeps_consumed_tokens() {
        let small = lim(10, 1000, 10);
        let big = lim(100, 1000, 100);
        let mut s = BucketState::default();
        assert_eq!(take(&small, &mut s, 0, 8), dec(true, 2, None));
        // Same instant, bigger plan: the 8 consumed tokens stay consumed.
        assert_eq!(take(&big, &mut s, 0, 0), dec(true, 92, None));
        assert_eq!(take(&big, &mut s, 0, 1), dec(true, 91, None));
        // And refill at the new speed (one per 10 ms).
        assert_eq!(take(&big, &mut s, 50 * MS, 0), dec(true, 96, None));
    }

    #[test]
    fn plan_change_down_caps_at_new_burst() {
        let big = lim(100, 1000, 100);
        let small = lim(10, 1000, 10);
        let mut s = BucketState::default();
        assert_eq!(take(&big, &mut s, 0, 30), dec(true, 70, None));
        // 30 consumed > 10 new burst: the bucket is empty, but owes no more than 10.
        assert_eq!(take(&small, &mut s, 0, 1), dec(false, 0, Some(100)));
        assert_eq!(take(&small, &mut s, SEC, 10), dec(true, 0, None));

        let mut s = BucketState::default();
        assert_eq!(take(&big, &mut s, 0, 5), dec(true, 95, None));
        assert_eq!(take(&small, &mut s, 0, 0), dec(true, 5, None));
        // Burst-only change (same units): the cap applies too.
        let tiny = lim(100, 1000, 3);
        assert_eq!(take(&tiny, &mut s, 0, 1), dec(false, 0, Some(10)));
    }

    #[test]
    fn plan_change_of_rate_converts_fractions_exactly() {
        // 4 per second (unit 2.5e8): take 3 at 0, then 1 at 100 ms (0.4 back): 3.6 owed.
        let four = lim(4, 1000, 10);
        let three = lim(3, 1000, 10); // unit 1e9
        let mut s = BucketState::default();
        assert_eq!(take(&four, &mut s, 0, 3), dec(true, 7, None));
        assert_eq!(take(&four, &mut s, 100 * MS, 1), dec(true, 6, None));
        // Under 3/s the 3.6 owed tokens take 1200 ms to refill.
        assert_eq!(take(&three, &mut s, 100 * MS, 0), dec(true, 6, None));
        // 6.4 tokens are free: 7 need 0.6 more, i.e. exactly 200 ms at 3/s.
        assert_eq!(take(&three, &mut s, 100 * MS, 7), dec(false, 6, Some(200)));
        assert!(!take(&three, &mut s, 300 * MS - 1, 7).allowed);
        assert_eq!(take(&three, &mut s, 300 * MS, 7), dec(true, 0, None));
    }

    #[test]
    fn plan_change_refills_at_new_rate_since_last_update() {
        // The debt is converted as of the state's last update; the time since then is
        // refilled at the new rate (the moment of the plan change is not known).
        let four = lim(4, 1000, 10);
        let three = lim(3, 1000, 10);
        let mut s = BucketState::default();
        take(&four, &mut s, 0, 3);
        // 100 ms at 3/s = 0.3 tokens: 2.7 owed, 900 ms to full.
        assert_eq!(take(&three, &mut s, 100 * MS, 0), dec(true, 7, None));
    }

    #[test]
    fn plan_change_rounds_consumed_fraction_up() {
        // 1 per 3 ms -> 1 per 2 ms. After 1 ns, 3e6 - 1 of 3e6 units are owed, i.e.
        // (2e6 - 2/3) new units, rounded up to 2e6: a whole token, never less.
        let a = lim(1, 3, 1);
        let b = lim(1, 2, 1);
        let mut s = BucketState::default();
        assert!(take(&a, &mut s, 0, 1).allowed);
        let (d, _) = try_take(&b, &s, 1, 1);
        assert_eq!(d, dec(false, 0, Some(2)));
        // 2e6 new units at 1 unit/ns, from the state's time (0).
        assert!(!try_take(&b, &s, 2 * MS - 1, 1).0.allowed);
        assert!(try_take(&b, &s, 2 * MS, 1).0.allowed);
    }

    #[test]
    fn state_is_small_when_serialized() {
        let l = lim(7, 1000, 9);
        let (_, s) = try_take(&l, &BucketState::default(), 123_456_789, 4);
        let bytes = bincode::serialize(&s).unwrap();
        assert_eq!(bytes.len(), 24);
        assert_eq!(bincode::deserialize::<BucketState>(&bytes).unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<BucketState>(&json).unwrap(), s);
    }

    /// Deterministic xorshift64* generator for the randomized comparison.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Reference model: tokens held (not debt) in u128 fixed point with `I = interval_ns`
    /// fractional units per token (no gcd reduction), refilled by `rate` units per ns,
    /// and durations found by binary search over whole milliseconds instead of division.
    struct Reference {
        limit: BucketLimit,
        tokens: u128,
        last: u64,
    }

    impl Reference {
        fn new(limit: BucketLimit) -> Self {
            let scale = u128::from(limit.interval_ms) * u128::from(MS);
            Reference {
                limit,
                tokens: u128::from(limit.burst) * scale,
                last: 0,
            }
        }

        fn scale(&self) -> u128 {
            u128::from(self.limit.interval_ms) * u128::from(MS)
        }

        fn cap(&self) -> u128 {
            u128::from(self.limit.burst) * self.scale()
        }

        fn tokens_after(&self, tokens: u128, ns: u128) -> u128 {
            (tokens + ns * u128::from(self.limit.rate)).min(self.cap())
        }

        /// Smallest whole number of ms after which `tokens` grows to at least `target`.
        fn ms_until(&self, tokens: u128, target: u128) -> u64 {
            let (mut lo, mut hi) = (0u64, 1u64);
            while self.tokens_after(tokens, u128::from(hi) * u128::from(MS)) < target {
                hi *= 2;
            }
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if self.tokens_after(tokens, u128::from(mid) * u128::from(MS)) >= target {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            lo
        }

        fn take(&mut self, now: u64, cost: u64) -> Take {
            let at = now.max(self.last);
            let tokens = self.tokens_after(self.tokens, u128::from(at - self.last));
            let need = u128::from(cost) * self.scale();
            let allowed = cost == 0 || (cost <= self.limit.burst && tokens >= need);
            let left = if allowed && cost > 0 {
                self.tokens = tokens - need;
                self.last = at;
                self.tokens
            } else {
                tokens
            };
            let retry = if allowed || cost > self.limit.burst {
                None
            } else {
                Some(self.ms_until(tokens, need))
            };
            Take {
                allowed,
                remaining: (left / self.scale()) as u64,
                retry_after_ms: retry,
            }
        }
    }

    #[test]
    fn matches_reference_model_on_random_sequences() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut allowed_total = 0u64;
        for _ in 0..300 {
            let max_interval = if rng.below(2) == 0 { 5_000 } else { 60_000 };
            let limit = lim(1 + rng.below(20), 1 + rng.below(max_interval), 1 + rng.below(30));
            let mut reference = Reference::new(limit);
            let mut state = BucketState::default();
            let mut now = rng.below(1 << 50);
            let step_ns = limit.interval_ms * MS / limit.rate.max(1);
            for step in 0..400 {
                match rng.below(10) {
                    0 => now = now.saturating_sub(rng.below(3 * step_ns + 1)), // clock back
                    1 => {}                                                    // same instant
                    2 => now += rng.below(1_000),                              // a few ns
                    3 => now += rng.below(limit.burst * step_ns * 2 + 1),      // long pause
                    _ => now += rng.below(2 * step_ns + 1),
                }
                let cost = match rng.below(8) {
                    0 => 0,
                    1 => limit.burst + rng.below(3),
                    2 => 1 + rng.below(limit.burst),
                    _ => 1,
                };
                let expected = reference.take(now, cost);
                let got = take(&limit, &mut state, now, cost);
                assert_eq!(got, expected, "limit {limit:?} step {step} now {now} cost {cost}");
                allowed_total += u64::from(got.allowed);
            }
        }
        // The sequences exercise both outcomes.
        assert!(allowed_total > 10_000 && allowed_total < 110_000, "{allowed_total}");
    }
}

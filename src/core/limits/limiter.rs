//! Applying a plan's token buckets and quotas to one request, as a pure function of the
//! stored state, so the adapter only does the shared-data CAS loop around it.
//!
//! State is one small shared-data entry per limited subject (a key's lineage, a
//! consumer, or an anonymous client IP). Limits are matched to their state by a hash of
//! their name, so a plan change that edits numbers keeps the consumed state, and one
//! that renames a limit starts it fresh (documented rule).

use crate::core::cas::{cas_update, Create, Step};
use crate::core::limits::plan::{NamedBucket, NamedQuota};
use crate::core::limits::quota::{self, QuotaState};
use crate::core::limits::ratelimit_headers::{push_ratelimit, push_ratelimit_policy};
use crate::core::limits::token_bucket::{self, BucketState};
use crate::core::store::Store;
use serde::{Deserialize, Serialize};

/// Stored per subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitState {
    pub buckets: Vec<(u32, BucketState)>,
    pub quotas: Vec<(u32, QuotaState)>,
}

impl LimitState {
    pub fn decode(bytes: &[u8]) -> LimitState {
        bincode::deserialize(bytes).unwrap_or_default()
    }
    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).expect("limit state encodes")
    }
}

/// FNV-1a: stable across builds and platforms, unlike `DefaultHasher`.
pub fn name_hash(name: &str) -> u32 {
    name.bytes()
        .fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    RateLimited,
    QuotaExceeded,
    /// The cost can never fit in a bucket: retrying will not help.
    CostExceedsBurst,
}

/// One limit's view after this request, for the `RateLimit` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitView {
    pub name: String,
    /// Quota units per window, for `RateLimit-Policy`.
    pub quota: u64,
    pub window_secs: u64,
    pub remaining: u64,
    /// Seconds until more is available (0 when something remains).
    pub reset_secs: u64,
    /// This limit alone had room for the request (its numbers above count it as taken
    /// until [`evaluate`] finds that another limit refused it).
    pub fit: bool,
    /// A token bucket (more becomes available continuously), not a calendar quota.
    pub bucket: bool,
}

/// What every limit said about one request: the denial, if any, and each limit's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitCheck {
    pub denial: Option<Denial>,
    /// Seconds to wait before retrying (denied requests only).
    pub retry_after_secs: Option<u64>,
    pub views: Vec<LimitView>,
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

/// Evaluates every limit; the request passes only if all of them pass. Returns the new
/// state to store when it passes (`None` when denied: a denied request consumes
/// nothing, so no write is needed).
pub fn evaluate(
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    state: &LimitState,
    now_ms: u64,
    cost: u64,
) -> (LimitCheck, Option<LimitState>) {
    let now_ns = now_ms.saturating_mul(1_000_000);
    let now_secs = (now_ms / 1000) as i64;
    let mut next = LimitState {
        buckets: Vec::with_capacity(buckets.len()),
        quotas: Vec::with_capacity(quotas.len()),
    };
    let mut views = Vec::with_capacity(buckets.len() + quotas.len());
    let mut denial = None;
    let mut retry_ms: Option<u64> = None;

    for b in buckets {
        let h = name_hash(&b.name);
        let old = state
            .buckets
            .iter()
            .find(|(n, _)| *n == h)
            .map(|(_, s)| *s)
            .unwrap_or_default();
        let (d, new) = token_bucket::try_take(&b.limit, &old, now_ns, cost);
        if !d.allowed {
            match d.retry_after_ms {
                None => denial = Some(Denial::CostExceedsBurst),
                Some(ms) => {
                    if denial.is_none() {
                        denial = Some(Denial::RateLimited);
                    }
                    retry_ms = Some(retry_ms.unwrap_or(0).max(ms));
                }
            }
        }
        next.buckets.push((h, new));
        let refill_one_ms = ceil_div(b.limit.interval_ms, b.limit.rate);
        views.push(LimitView {
            name: b.name.clone(),
            quota: b.limit.rate,
            window_secs: ceil_div(b.limit.interval_ms, 1000),
            remaining: d.remaining,
            reset_secs: if d.remaining > 0 {
                0
            } else {
                ceil_div(d.retry_after_ms.unwrap_or(refill_one_ms), 1000)
            },
            fit: d.allowed,
            bucket: true,
        });
    }
    for q in quotas {
        let h = name_hash(&q.name);
        let old = state
            .quotas
            .iter()
            .find(|(n, _)| *n == h)
            .map(|(_, s)| *s)
            .unwrap_or_default();
        let (d, new) = quota::consume(q.limit, q.period, &old, now_secs, cost);
        if !d.allowed {
            if denial.is_none() || denial == Some(Denial::RateLimited) {
                denial = Some(Denial::QuotaExceeded);
            }
            retry_ms = Some(retry_ms.unwrap_or(0).max(d.reset_secs.saturating_mul(1000)));
        }
        next.quotas.push((h, new));
        let (start, end) = quota::period_bounds(q.period, now_secs);
        views.push(LimitView {
            name: q.name.clone(),
            quota: q.limit,
            window_secs: (end - start).max(0) as u64,
            remaining: d.remaining,
            reset_secs: d.reset_secs,
            fit: d.allowed,
            bucket: false,
        });
    }
    let retry_after_secs = match denial {
        Some(Denial::CostExceedsBurst) | None => None,
        Some(_) => Some(ceil_div(retry_ms.unwrap_or(1000), 1000).max(1)),
    };
    if denial.is_some() {
        // Nothing is charged for a refused request, so the limits it would have fit in
        // still have `cost` more than their decision (taken as if charged) says. Exact:
        // a bucket's remaining is whole tokens of its debt, a quota's whole units.
        for view in views.iter_mut().filter(|v| v.fit) {
            view.remaining = view.remaining.saturating_add(cost);
            if view.bucket && view.remaining > 0 {
                view.reset_secs = 0;
            }
        }
    }
    let check = LimitCheck {
        denial,
        retry_after_secs,
        views,
    };
    if check.denial.is_some() {
        (check, None)
    } else {
        (check, Some(next))
    }
}

/// CAS attempts on one limit entry before a request counts as contended.
pub const CAS_RETRIES: usize = 32;

/// What applying limits to one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitOutcome {
    Allowed(LimitCheck),
    Denied(LimitCheck),
    /// Other writers changed the state under every one of our CAS attempts (or the
    /// host failed): the caller decides, by configuration, and counts it.
    Contended,
}

/// Applies limits to the shared state at `state_key`: read, evaluate, CAS-write,
/// retried while other workers race on the same entry. A denial writes nothing.
pub fn apply(
    store: &dyn Store,
    state_key: &str,
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    now_ms: u64,
    cost: u64,
) -> LimitOutcome {
    if buckets.is_empty() && quotas.is_empty() {
        return LimitOutcome::Allowed(LimitCheck {
            denial: None,
            retry_after_secs: None,
            views: Vec::new(),
        });
    }
    let r = cas_update(store, state_key, CAS_RETRIES, Create::ViaLock { now_ms }, |bytes| {
        let state = bytes.map(LimitState::decode).unwrap_or_default();
        match evaluate(buckets, quotas, &state, now_ms, cost) {
            (check, Some(next)) => Step::Write(next.encode(), LimitOutcome::Allowed(check)),
            (check, None) => Step::Keep(LimitOutcome::Denied(check)),
        }
    });
    r.unwrap_or(LimitOutcome::Contended)
}

/// Puts `units` a worker took at `taken_at_ms` and did not spend back into `state`
/// (each limit of the lease, matched by name); see `token_bucket::give_back` and
/// `quota::give_back` for what cannot go back.
fn give_back(
    state: &mut LimitState,
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    now_ms: u64,
    units: u64,
    taken_at_ms: u64,
) {
    let now_ns = now_ms.saturating_mul(1_000_000);
    for b in buckets {
        let h = name_hash(&b.name);
        if let Some((_, s)) = state.buckets.iter_mut().find(|(n, _)| *n == h) {
            *s = token_bucket::give_back(&b.limit, s, now_ns, units);
        }
    }
    let taken_at_secs = (taken_at_ms / 1000) as i64;
    for q in quotas {
        let h = name_hash(&q.name);
        if let Some((_, s)) = state.quotas.iter_mut().find(|(n, _)| *n == h) {
            *s = quota::give_back(q.period, s, taken_at_secs, units);
        }
    }
}

/// What one CAS of a worker's lease came to (see `core::limits::worker_lease`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTake {
    /// The request's decision. Its views are the shared state after this CAS, without
    /// the `extra` units the worker now holds.
    pub check: LimitCheck,
    /// The state to store; `None` when nothing changed.
    pub write: Option<LimitState>,
    /// Units taken on top of the request's cost, now held by the worker.
    pub extra: u64,
}

/// A worker's lease CAS, as a pure function of the stored state: first `back` units the
/// worker took at `back_taken_at_ms` and did not spend go back, then the request's
/// `cost` is decided exactly as [`evaluate`] decides it, and if it passes, up to `want`
/// more units are taken for the worker to spend locally. Extra units are one unit of
/// every limit at once, at most what each bucket has left after the request and at
/// most `1 / share` of what each quota has left (so a quota's last `share` units are
/// never leased: at its end every request is decided here, exactly).
#[allow(clippy::too_many_arguments)]
pub fn lease_take(
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    state: &LimitState,
    now_ms: u64,
    cost: u64,
    want: u64,
    back: (u64, u64),
    share: u64,
) -> LeaseTake {
    let mut base = state.clone();
    let (back, back_taken_at_ms) = back;
    if back > 0 {
        give_back(&mut base, buckets, quotas, now_ms, back, back_taken_at_ms);
    }
    let changed = |next: &LimitState| (next != state).then(|| next.clone());
    let (check, next) = evaluate(buckets, quotas, &base, now_ms, cost);
    let Some(next) = next else {
        return LeaseTake {
            check,
            write: changed(&base),
            extra: 0,
        };
    };
    let room = check
        .views
        .iter()
        .map(|v| {
            if v.bucket {
                v.remaining
            } else {
                v.remaining / share.max(1)
            }
        })
        .min()
        .unwrap_or(0);
    let extra = want.min(room);
    if extra > 0 {
        if let (check, Some(next)) = evaluate(buckets, quotas, &base, now_ms, cost.saturating_add(extra)) {
            return LeaseTake {
                check,
                write: changed(&next),
                extra,
            };
        }
    }
    LeaseTake {
        check,
        write: changed(&next),
        extra: 0,
    }
}

/// `RateLimit-Policy` and `RateLimit` values for a check (`None` without limits).
pub fn headers(check: &LimitCheck) -> Option<(String, String)> {
    let views = &check.views;
    (!views.is_empty()).then(|| (policy_field(views), ratelimit_field(views, 0)))
}

/// The `RateLimit-Policy` value of these views (it changes only with the limits, so a
/// worker's lease keeps it rendered).
pub fn policy_field(views: &[LimitView]) -> String {
    let policies: Vec<(&str, u64, u64)> = views
        .iter()
        .map(|v| (v.name.as_str(), v.quota, v.window_secs))
        .collect();
    let mut p = String::with_capacity(64);
    push_ratelimit_policy(&mut p, &policies);
    p
}

/// The `RateLimit` value of these views with `held` more units of every limit.
pub fn ratelimit_field(views: &[LimitView], held: u64) -> String {
    let states: Vec<(&str, u64, u64)> = views
        .iter()
        .map(|v| {
            let remaining = v.remaining.saturating_add(held);
            let reset = if v.bucket && remaining > 0 { 0 } else { v.reset_secs };
            (v.name.as_str(), remaining, reset)
        })
        .collect();
    let mut s = String::with_capacity(64);
    push_ratelimit(&mut s, &states);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::quota::Period;
    use crate::core::limits::test_support::bucket;
    use crate::core::limits::token_bucket::BucketLimit;

    fn daily(limit: u64) -> Vec<NamedQuota> {
        vec![NamedQuota {
            name: "day".into(),
            period: Period::Day,
            limit,
        }]
    }
    const T0: u64 = 1_700_000_000_000; // ms

    fn run(b: &[NamedBucket], q: &[NamedQuota], st: &mut LimitState, now: u64, cost: u64) -> LimitCheck {
        let (v, next) = evaluate(b, q, st, now, cost);
        if let Some(n) = next {
            *st = n;
        }
        v
    }

    #[test]
    fn burst_then_throttle_then_refill() {
        let b = bucket(2, 1000, 5);
        let mut st = LimitState::default();
        for i in 0..5 {
            let v = run(&b, &[], &mut st, T0, 1);
            assert_eq!(v.denial, None, "request {i}");
            assert_eq!(v.views[0].remaining, 4 - i);
        }
        let v = run(&b, &[], &mut st, T0, 1);
        assert_eq!(v.denial, Some(Denial::RateLimited));
        assert_eq!(v.retry_after_secs, Some(1));
        assert_eq!(v.views[0].reset_secs, 1);
        assert_eq!(run(&b, &[], &mut st, T0 + 499, 1).denial, Some(Denial::RateLimited));
        assert_eq!(run(&b, &[], &mut st, T0 + 500, 1).denial, None);
        assert_eq!(run(&b, &[], &mut st, T0 + 500, 1).denial, Some(Denial::RateLimited));
    }

    #[test]
    fn denied_requests_change_nothing() {
        let b = bucket(1, 1000, 1);
        let st = LimitState::default();
        let (_, next) = evaluate(&b, &[], &st, T0, 1);
        let st = next.unwrap();
        let (v, next) = evaluate(&b, &[], &st, T0, 1);
        assert!(v.denial.is_some() && next.is_none());
    }

    #[test]
    fn quota_exhaustion_wins_over_rate_and_says_when() {
        let b = bucket(100, 1000, 100);
        let q = daily(3);
        let mut st = LimitState::default();
        // 2024-02-29T23:59:00Z, leap day: resets at midnight (60 s later)
        let now = 1_709_251_140_000;
        for _ in 0..3 {
            assert_eq!(run(&b, &q, &mut st, now, 1).denial, None);
        }
        let v = run(&b, &q, &mut st, now, 1);
        assert_eq!(v.denial, Some(Denial::QuotaExceeded));
        assert_eq!(v.retry_after_secs, Some(60));
        assert_eq!(run(&b, &q, &mut st, now + 60_000, 1).denial, None);
    }

    /// A refused request is not charged to any limit, so the views (the `RateLimit`
    /// field) must report what really remains, also for the limits it would have fit in.
    #[test]
    fn a_denied_request_reports_uncharged_remaining_for_every_limit() {
        // The bucket refuses while the quota still has room.
        let b = bucket(2, 3_600_000, 2);
        let q = daily(10);
        let mut st = LimitState::default();
        assert_eq!(run(&b, &q, &mut st, T0, 1).views[1].remaining, 9);
        assert_eq!(run(&b, &q, &mut st, T0, 1).views[1].remaining, 8);
        let v = run(&b, &q, &mut st, T0, 1);
        assert_eq!(v.denial, Some(Denial::RateLimited));
        assert_eq!((v.views[0].remaining, v.views[1].remaining), (0, 8));
        // Weighted: a cost of 3 that the quota could take is not subtracted either.
        let v = run(&b, &q, &mut st, T0, 3);
        assert_eq!(v.views[1].remaining, 8);

        // The quota refuses while the bucket still has tokens: the bucket reports its
        // tokens as they are, and "more available" (reset 0) since some remain.
        let b = bucket(100, 1000, 100);
        let q = daily(2);
        let mut st = LimitState::default();
        run(&b, &q, &mut st, T0, 1);
        run(&b, &q, &mut st, T0, 1);
        let v = run(&b, &q, &mut st, T0, 1);
        assert_eq!(v.denial, Some(Denial::QuotaExceeded));
        assert_eq!((v.views[0].remaining, v.views[0].reset_secs), (98, 0));
        assert_eq!(v.views[1].remaining, 0);
        // A bucket emptied by exactly this (refused) request still reports its last tokens.
        let b = bucket(1, 3_600_000, 3);
        let mut st = LimitState::default();
        run(&b, &daily(2), &mut st, T0, 2);
        let v = run(&b, &daily(2), &mut st, T0, 1);
        assert_eq!(v.denial, Some(Denial::QuotaExceeded));
        assert_eq!((v.views[0].remaining, v.views[0].reset_secs), (1, 0));
    }

    #[test]
    fn cost_weights_and_cost_beyond_burst() {
        let b = bucket(10, 1000, 10);
        let mut st = LimitState::default();
        assert_eq!(run(&b, &[], &mut st, T0, 7).views[0].remaining, 3);
        assert_eq!(run(&b, &[], &mut st, T0, 4).denial, Some(Denial::RateLimited));
        let v = run(&b, &[], &mut st, T0, 11);
        assert_eq!(v.denial, Some(Denial::CostExceedsBurst));
        assert_eq!(v.retry_after_secs, None);
    }

    #[test]
    fn plan_change_keeps_consumed_state_by_name() {
        let mut st = LimitState::default();
        for _ in 0..10 {
            run(&bucket(10, 60_000, 10), &[], &mut st, T0, 1);
        }
        // the plan grows to burst 20: the 10 consumed tokens stay consumed
        let v = run(&bucket(10, 60_000, 20), &[], &mut st, T0, 1);
        assert_eq!(v.denial, None);
        assert_eq!(v.views[0].remaining, 9);
        // a renamed limit is a new limit
        let renamed = vec![NamedBucket {
            name: "other".into(),
            limit: BucketLimit {
                rate: 1,
                interval_ms: 1000,
                burst: 1,
            },
        }];
        assert_eq!(run(&renamed, &[], &mut st, T0, 1).denial, None);
    }

    #[test]
    fn apply_shares_state_through_the_store_and_denials_do_not_write() {
        use crate::core::store::MemStore;
        let s = MemStore::default();
        let b = bucket(1, 3_600_000, 2);
        assert!(matches!(
            apply(&s, "km/rl/k/x", &b, &[], T0, 1),
            LimitOutcome::Allowed(_)
        ));
        assert!(matches!(
            apply(&s, "km/rl/k/x", &b, &[], T0, 1),
            LimitOutcome::Allowed(_)
        ));
        let written = s.get("km/rl/k/x").1;
        let LimitOutcome::Denied(v) = apply(&s, "km/rl/k/x", &b, &[], T0, 1) else {
            panic!("not denied")
        };
        assert_eq!(v.denial, Some(Denial::RateLimited));
        assert_eq!(s.get("km/rl/k/x").1, written, "a denial wrote the state");
        assert!(
            matches!(apply(&s, "km/rl/k/y", &b, &[], T0, 1), LimitOutcome::Allowed(_)),
            "own state per key"
        );
        let (p, st) = headers(&v).unwrap();
        assert_eq!(p, "\"b\";q=1;w=3600");
        assert!(st.starts_with("\"b\";r=0;t="));
        assert!(
            matches!(apply(&s, "km/rl/k/z", &[], &[], T0, 1), LimitOutcome::Allowed(ref v) if headers(v).is_none())
        );
    }

    #[test]
    fn apply_retries_a_racing_writer_and_reports_endless_contention() {
        use crate::core::store::MemStore;
        use std::rc::Rc;
        let s = Rc::new(MemStore::default());
        let b = bucket(1, 3_600_000, 100);
        assert!(matches!(apply(&*s, "k", &b, &[], T0, 1), LimitOutcome::Allowed(_)));
        // Another "worker" takes a token right before our first write: we retry and win.
        let other = Rc::downgrade(&s);
        let raced = Rc::new(std::cell::Cell::new(false));
        let r2 = raced.clone();
        *s.before_set.borrow_mut() = Some(Box::new(move |key: &str| {
            if key == "k" && !r2.replace(true) {
                let s = other.upgrade().unwrap();
                let (v, _) = s.get("k");
                let (_, next) = evaluate(&bucket(1, 3_600_000, 100), &[], &LimitState::decode(&v.unwrap()), T0, 1);
                s.map_set_raw("k", &next.unwrap().encode());
            }
        }));
        let LimitOutcome::Allowed(v) = apply(&*s, "k", &b, &[], T0, 1) else {
            panic!("lost the race")
        };
        assert_eq!(v.views[0].remaining, 97, "both takes counted");
        // A writer that always gets in first: bounded retries, then Contended.
        let other = Rc::downgrade(&s);
        *s.before_set.borrow_mut() = Some(Box::new(move |key: &str| {
            if key == "k" {
                let s = other.upgrade().unwrap();
                let v = s.get("k").0.unwrap();
                s.map_set_raw("k", &v);
            }
        }));
        assert_eq!(apply(&*s, "k", &b, &[], T0, 1), LimitOutcome::Contended);
    }

    /// A lease CAS: returns first, the request decided exactly, extra units at most what
    /// each bucket has left and 1/share of what each quota has left (none of its last
    /// `share` units), and nothing written for a no-op.
    #[test]
    fn lease_take_returns_decides_then_leases_within_the_shares() {
        let b = bucket(1000, 3_600_000, 1000);
        let q = daily(100);
        let st = LimitState::default();
        let t = lease_take(&b, &q, &st, T0, 4, 50, (0, 0), 16);
        // The quota has 96 left after the request: at most 96 / 16 = 6 extra.
        assert_eq!((t.check.denial, t.extra), (None, 6));
        assert_eq!((t.check.views[0].remaining, t.check.views[1].remaining), (990, 90));
        let st = t.write.unwrap();
        // The 6 come back with the next CAS, which takes 81: 15 left, no room for extra.
        let t = lease_take(&b, &q, &st, T0, 81, 50, (6, T0), 16);
        assert_eq!((t.check.denial, t.extra), (None, 0));
        assert_eq!(t.check.views[1].remaining, 15);
        let st = t.write.unwrap();
        let t = lease_take(&b, &q, &st, T0, 1, 50, (0, T0), 16);
        assert_eq!(
            (t.extra, t.check.views[1].remaining),
            (0, 14),
            "the last 16 are not leased"
        );
        let st = t.write.unwrap();
        // A refusal writes nothing (it would write the returns, had there been any).
        let t = lease_take(&b, &q, &st, T0, 15, 50, (0, T0), 16);
        assert_eq!((t.check.denial, t.write), (Some(Denial::QuotaExceeded), None));
        // Units taken yesterday go back to the bucket, not to today's quota; a CAS with
        // nothing to take or give back writes nothing.
        let t = lease_take(&b, &q, &st, T0, 0, 0, (5, T0 - 86_400_000), 16);
        let views = evaluate(&b, &q, &t.write.unwrap(), T0, 0).0.views;
        let before = evaluate(&b, &q, &st, T0, 0).0.views;
        assert_eq!(views[0].remaining, before[0].remaining + 5);
        assert_eq!(views[1].remaining, 14);
        assert_eq!(lease_take(&b, &q, &st, T0, 0, 0, (0, T0), 16).write, None);
        let t = lease_take(&b, &q, &st, T0, 0, 0, (5, T0), 16);
        let back = t.write.unwrap();
        assert_eq!(evaluate(&b, &q, &back, T0, 0).0.views[1].remaining, 19);
        // A refusal with returns writes them.
        let t = lease_take(&b, &q, &st, T0, 50, 50, (5, T0), 16);
        assert_eq!(t.check.denial, Some(Denial::QuotaExceeded));
        assert_eq!(t.write, Some(back));
    }

    #[test]
    fn state_round_trips_and_garbage_decodes_to_fresh() {
        let mut st = LimitState::default();
        run(&bucket(1, 1000, 3), &daily(5), &mut st, T0, 1);
        assert_eq!(LimitState::decode(&st.encode()), st);
        assert_eq!(LimitState::decode(b"\xff"), LimitState::default());
        assert_eq!(name_hash("a"), 0xe40c292c);
    }
}

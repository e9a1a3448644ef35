//! Fleet mode's `RateLimit-Policy` / `RateLimit` fields: the node's view.
//!
//! A node does not know the fleet's remaining count at the instant of a request (that
//! is the point of leasing: no call per request). What it knows is what it holds (its
//! lease, valid units only) and what the fleet said was left for everyone else the last
//! time this node called it (a lease or take answer: a quota's `available`, a bucket's
//! `tokens`; both already exclude the units this node holds). The `remaining` it sends
//! for a limit is therefore
//!
//! ```text
//! remaining = min(limit, held + left in the fleet at this node's last call)
//! ```
//!
//! which is never above the limit (a quota's limit, a bucket's burst), only goes down
//! between two calls of this node (its own spend), and is refreshed by every call. Other
//! nodes' spend since that call is not in it, nor a bucket's refill: it is an estimate,
//! as of the node's last call, not a promise. A refused request reports a remaining
//! below its cost for the limit that refused it (0 for a cost of 1), whatever the
//! estimate said, so a client never sees "remaining 5" on a 429.

use super::fleet::{FleetVerdict, Via};
use super::limiter::{headers as render, name_hash, Denial, LimitCheck, LimitView};
use super::plan::{NamedBucket, NamedQuota};
use super::quota::period_bounds;
use crate::core::remote::fleet_protocol::{BucketView, QuotaView};
use serde::{Deserialize, Serialize};

/// What the fleet last said was left, per limit (by name hash), for units not held by
/// this node. Stored in the node's entry for the subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    pub left: Vec<(u32, u64)>,
    /// Store time of the answer recorded (answers may arrive out of order: a take's and
    /// a lease call's, say; an older one never replaces a newer one).
    pub at_ms: u64,
}

impl FleetView {
    /// Records a lease or take answer's views, computed by the store at `at_ms`.
    pub fn record(&mut self, at_ms: u64, buckets: &[BucketView], quotas: &[QuotaView]) {
        if at_ms < self.at_ms {
            return;
        }
        self.at_ms = at_ms;
        self.left.clear();
        self.left.extend(buckets.iter().map(|b| (name_hash(&b.name), b.tokens)));
        self.left
            .extend(quotas.iter().map(|q| (name_hash(&q.name), q.available)));
    }

    fn left(&self, name: &str) -> u64 {
        let h = name_hash(name);
        self.left.iter().find(|(n, _)| *n == h).map_or(0, |(_, v)| *v)
    }
}

/// The `RateLimit-Policy` and `RateLimit` values for a fleet decision: `held` valid
/// lease units after the decision, `view` the fleet's last answer. `None` without limits.
pub fn headers(
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    held: u64,
    view: &FleetView,
    verdict: &FleetVerdict,
    now_ms: u64,
    cost: u64,
) -> Option<(String, String)> {
    render(&LimitCheck {
        denial: verdict.denial,
        retry_after_secs: verdict.retry_after_secs,
        views: views(buckets, quotas, held, view, verdict, now_ms, cost),
    })
}

/// The per-limit views `headers` renders. A worker's lease drawn from the node's
/// (`super::fleet_loans`) keeps these, taken with its units counted in `held`, less its
/// units: a request it serves adds back what it still holds, so it reports what the
/// node would.
pub fn views(
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    held: u64,
    view: &FleetView,
    verdict: &FleetVerdict,
    now_ms: u64,
    cost: u64,
) -> Vec<LimitView> {
    let now_secs = (now_ms / 1000) as i64;
    let retry = verdict.retry_after_secs.unwrap_or(1).max(1);
    let mut views = Vec::with_capacity(buckets.len() + quotas.len());
    for b in buckets {
        let remaining = held.saturating_add(view.left(&b.name)).min(b.limit.burst);
        views.push(LimitView {
            name: b.name.clone(),
            quota: b.limit.rate,
            window_secs: b.limit.interval_ms.div_ceil(1000),
            remaining,
            reset_secs: 0,
            fit: true,
            bucket: true,
        });
    }
    for q in quotas {
        let (start, end) = period_bounds(q.period, now_secs);
        views.push(LimitView {
            name: q.name.clone(),
            quota: q.limit,
            window_secs: (end - start).max(0) as u64,
            remaining: held.saturating_add(view.left(&q.name)).min(q.limit),
            reset_secs: u64::try_from(end.saturating_sub(now_secs)).unwrap_or(0),
            fit: true,
            bucket: false,
        });
    }
    // The limits of the kind that refused: at least one must show it cannot take `cost`
    // (if the estimate says they all could, it is stale, or this is the partition
    // fallback's own bound: report them empty).
    let refusing = match verdict.denial {
        Some(Denial::RateLimited) => Some(true),
        Some(Denial::QuotaExceeded) => Some(false),
        Some(Denial::CostExceedsBurst) | None => None,
    };
    if let Some(bucket) = refusing {
        let kind = |v: &&mut LimitView| v.bucket == bucket;
        let stale = verdict.via == Via::Fallback || !views.iter_mut().filter(kind).any(|v| v.remaining < cost);
        for v in views.iter_mut().filter(kind) {
            if stale {
                v.remaining = 0;
            }
            if v.remaining < cost {
                v.fit = false;
            }
        }
    }
    // A bucket with nothing left: more after Retry-After when refused, else one token's
    // refill (as one node reports).
    for (v, b) in views.iter_mut().zip(buckets).filter(|(v, _)| v.remaining == 0) {
        v.reset_secs = match verdict.denial {
            Some(_) => retry,
            None => b.limit.interval_ms.div_ceil(b.limit.rate.max(1)).div_ceil(1000),
        };
    }
    views
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::quota::Period;
    use crate::core::limits::token_bucket::BucketLimit;

    const T0: u64 = 1_700_000_000_000;

    fn bucket() -> Vec<NamedBucket> {
        vec![NamedBucket {
            name: "ps".into(),
            limit: BucketLimit {
                rate: 10,
                interval_ms: 1000,
                burst: 20,
            },
        }]
    }

    fn monthly(limit: u64) -> Vec<NamedQuota> {
        vec![NamedQuota {
            name: "month".into(),
            period: Period::Month,
            limit,
        }]
    }

    fn ok(via: Via) -> FleetVerdict {
        FleetVerdict {
            denial: None,
            retry_after_secs: None,
            via,
        }
    }

    fn refused(d: Denial, via: Via) -> FleetVerdict {
        FleetVerdict {
            denial: Some(d),
            retry_after_secs: Some(7),
            via,
        }
    }

    fn view(b: u64, q: u64) -> FleetView {
        let mut v = FleetView::default();
        v.record(
            0,
            &[BucketView {
                name: "ps".into(),
                tokens: b,
                wait_ms: 0,
            }],
            &[QuotaView {
                name: "month".into(),
                period_start: 0,
                period_end: 0,
                consumed: 0,
                outstanding: 0,
                available: q,
            }],
        );
        v
    }

    #[test]
    fn remaining_is_held_plus_what_the_fleet_had_left_capped_at_the_limit() {
        let (p, s) = headers(&bucket(), &monthly(1000), 7, &view(5, 300), &ok(Via::Lease), T0, 1).unwrap();
        // November 2023 has 30 days.
        assert_eq!(p, r#""ps";q=10;w=1, "month";q=1000;w=2592000"#);
        let reset = 1_701_388_800 - T0 / 1000; // to 2023-12-01
        assert_eq!(s, format!(r#""ps";r=12;t=0, "month";r=307;t={reset}"#));
        // Never above the limit (a bucket's burst, a quota's limit).
        let (_, s) = headers(&bucket(), &monthly(100), 90, &view(15, 50), &ok(Via::Take), T0, 1).unwrap();
        assert!(s.starts_with(r#""ps";r=20;t=0, "month";r=100;"#), "{s}");
        assert!(headers(&[], &[], 0, &FleetView::default(), &ok(Via::Lease), T0, 1).is_none());
    }

    #[test]
    fn a_refusal_shows_the_refusing_limit_empty() {
        // The fleet said the quota is gone (a refused take): 0, the bucket as seen.
        let v = view(5, 0);
        let (_, s) = headers(
            &bucket(),
            &monthly(1000),
            0,
            &v,
            &refused(Denial::QuotaExceeded, Via::Take),
            T0,
            1,
        )
        .unwrap();
        assert!(s.starts_with(r#""ps";r=5;t=0, "month";r=0;"#), "{s}");
        // A stale estimate (the fallback's overdraft is used up while the last answer
        // said 300 were left): the quota still reads 0 on the 429.
        let (_, s) = headers(
            &bucket(),
            &monthly(1000),
            0,
            &view(5, 300),
            &refused(Denial::QuotaExceeded, Via::Fallback),
            T0,
            1,
        )
        .unwrap();
        assert!(s.contains(r#""month";r=0;"#), "{s}");
        // A rate refusal: the bucket is empty and resets after Retry-After.
        let (_, s) = headers(
            &bucket(),
            &monthly(1000),
            0,
            &view(3, 300),
            &refused(Denial::RateLimited, Via::Exhausted),
            T0,
            1,
        )
        .unwrap();
        assert!(s.starts_with(r#""ps";r=0;t=7, "month";r=300;"#), "{s}");
        // A refused cost of 5 with 3 left reports the 3 (below the cost), as one node does.
        let (_, s) = headers(
            &bucket(),
            &[],
            0,
            &view(3, 0),
            &refused(Denial::RateLimited, Via::Take),
            T0,
            5,
        )
        .unwrap();
        assert_eq!(s, r#""ps";r=3;t=0"#);
    }

    #[test]
    fn views_are_matched_by_name_and_unknown_limits_count_what_is_held() {
        let mut v = FleetView::default();
        v.record(0, &[], &[]);
        let (_, s) = headers(&[], &monthly(1000), 4, &v, &ok(Via::Lease), T0, 1).unwrap();
        assert!(s.starts_with(r#""month";r=4;"#), "{s}");
        let v = view(1, 2);
        assert_eq!((v.left("ps"), v.left("month"), v.left("other")), (1, 2, 0));
    }

    #[test]
    fn an_older_answer_never_replaces_a_newer_one() {
        let q = |available| QuotaView {
            name: "month".into(),
            period_start: 0,
            period_end: 0,
            consumed: 0,
            outstanding: 0,
            available,
        };
        let mut v = FleetView::default();
        v.record(2_000, &[], &[q(10)]);
        v.record(1_999, &[], &[q(11)]); // a lease answer computed before the take's
        assert_eq!((v.left("month"), v.at_ms), (10, 2_000));
        v.record(2_000, &[], &[q(9)]);
        assert_eq!(v.left("month"), 9);
    }
}

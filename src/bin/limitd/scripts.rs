//! The Redis side: key layout and the Lua scripts that apply one call atomically
//! (`lease.lua` and `take.lua`, each documented at its top, after the helpers in
//! `common.lua`).
//!
//! Keys of a subject share the hash tag `{<subject>}`, so on a Redis Cluster one
//! subject's keys live in one slot and the script can touch them all. Quota period
//! bounds are computed here with the core's `period_bounds` (UTC calendar periods,
//! exactly as a single node computes them) and passed to the script, which keys each
//! period separately: a new period is a new key, the old one expires a day after its end.

use keymeter::core::limits::lease::share;
use keymeter::core::limits::quota::{period_bounds, Period};
use keymeter::core::remote::fleet_protocol::{
    BucketSpec, BucketView, LeaseRequest, LeaseResponse, QuotaSpec, QuotaView, TakeRequest, TakeResponse,
};

pub const COMMON_LUA: &str = include_str!("common.lua");
pub const LEASE_LUA: &str = include_str!("lease.lua");
pub const TAKE_LUA: &str = include_str!("take.lua");

/// A script's full text: the shared helpers, then its body.
pub fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{COMMON_LUA}{body}"))
}

/// How long a node's sequence number and cumulative spend are remembered after its
/// last call: a node partitioned for longer than this replays its spend as new.
pub const DEFAULT_FORGET_MS: u64 = 7 * 86_400_000;

/// How long a tagged take is remembered by id (`take.lua`): a take whose answer was lost
/// is settled exactly by its node's next lease call within this time; a node that
/// reaches limitd only later may have that take's cost counted twice.
pub const DEFAULT_TAKE_RECORD_MS: u64 = 3_600_000;

/// Takes of a subject by id (`take.lua`, `lease.lua`).
pub fn takes_key(subject: &str) -> String {
    format!("km:{{{subject}}}:t")
}

pub fn node_key(subject: &str) -> String {
    format!("km:{{{subject}}}:n")
}

pub fn bucket_key(subject: &str, name: &str) -> String {
    format!("km:{{{subject}}}:b:{name}")
}

pub fn quota_key(subject: &str, name: &str, period_start: i64) -> String {
    format!("km:{{{subject}}}:q:{name}:{period_start}")
}

fn period_letter(p: Period) -> &'static str {
    match p {
        Period::Day => "d",
        Period::Week => "w",
        Period::Month => "m",
    }
}

/// The quota's key in the period containing `now_secs`, with the period bounds. The
/// period kind is part of the name, so a plan change from daily to monthly starts a
/// fresh count rather than reading another period's.
pub fn quota_key_at(subject: &str, q: &QuotaSpec, now_secs: i64) -> (String, i64, i64) {
    let (start, end) = period_bounds(q.period, now_secs);
    let name = format!("{}.{}", q.name, period_letter(q.period));
    (quota_key(subject, &name, start), start, end)
}

/// KEYS and ARGV of the lease script for a validated request at `now_secs`, and the
/// quota period bounds used.
pub fn lease_call(
    req: &LeaseRequest,
    now_secs: i64,
    forget_ms: u64,
    take_record_ms: u64,
) -> (Vec<String>, Vec<String>, Vec<(i64, i64)>) {
    let mut keys = Vec::with_capacity(1 + req.buckets.len() + req.quotas.len());
    keys.push(node_key(&req.subject));
    let mut args = vec![
        req.node.clone(),
        req.seq.to_string(),
        req.ttl_ms.to_string(),
        share(req.fleet_size).to_string(),
        req.buckets.len().to_string(),
        req.quotas.len().to_string(),
        req.want.to_string(),
        req.hold.to_string(),
        req.returned.to_string(),
        req.spent_total.to_string(),
        forget_ms.to_string(),
        req.unreported_max.map_or_else(|| "-1".to_string(), |r| r.to_string()),
    ];
    let periods = limit_args(&req.subject, &req.buckets, &req.quotas, now_secs, &mut keys, &mut args);
    if !req.doubts.is_empty() {
        keys.push(takes_key(&req.subject));
        args.extend([req.doubts.len().to_string(), take_record_ms.to_string()]);
        for d in &req.doubts {
            args.extend([d.id.to_string(), d.cost.to_string()]);
        }
    }
    (keys, args, periods)
}

fn limit_args(
    subject: &str,
    buckets: &[BucketSpec],
    quotas: &[QuotaSpec],
    now_secs: i64,
    keys: &mut Vec<String>,
    args: &mut Vec<String>,
) -> Vec<(i64, i64)> {
    for b in buckets {
        keys.push(bucket_key(subject, &b.name));
        args.extend([b.rate.to_string(), b.interval_ms.to_string(), b.burst.to_string()]);
    }
    let mut periods = Vec::with_capacity(quotas.len());
    for q in quotas {
        let (key, start, end) = quota_key_at(subject, q, now_secs);
        keys.push(key);
        args.extend([q.limit.to_string(), (end.saturating_mul(1000)).to_string()]);
        periods.push((start, end));
    }
    periods
}

/// KEYS and ARGV of the take script for a validated request at `now_secs`.
pub fn take_call(req: &TakeRequest, now_secs: i64, take_record_ms: u64) -> (Vec<String>, Vec<String>, Vec<(i64, i64)>) {
    let mut keys = Vec::with_capacity(req.buckets.len() + req.quotas.len() + 1);
    let mut args = vec![
        req.buckets.len().to_string(),
        req.quotas.len().to_string(),
        req.cost.to_string(),
    ];
    let periods = limit_args(&req.subject, &req.buckets, &req.quotas, now_secs, &mut keys, &mut args);
    if let (Some(node), Some(id)) = (&req.node, req.id) {
        keys.push(takes_key(&req.subject));
        args.extend([node.clone(), id.to_string(), take_record_ms.to_string()]);
    }
    (keys, args, periods)
}

/// The `(tokens, wait_ms)` pair per bucket, from position `at` on (advanced past them).
fn bucket_views(buckets: &[BucketSpec], u: &impl Fn(usize) -> Option<u64>, at: &mut usize) -> Option<Vec<BucketView>> {
    let mut views = Vec::with_capacity(buckets.len());
    for b in buckets {
        views.push(BucketView {
            name: b.name.clone(),
            tokens: u(*at)?,
            wait_ms: u(*at + 1)?,
        });
        *at += 2;
    }
    Some(views)
}

pub fn take_response(req: &TakeRequest, periods: &[(i64, i64)], r: &[i64]) -> Option<TakeResponse> {
    let u = |i: usize| r.get(i).map(|&v| v.max(0) as u64);
    let (admitted, now_ms) = (*r.first()? == 1, u(1)?);
    let mut at = 2;
    let buckets = bucket_views(&req.buckets, &u, &mut at)?;
    let mut quotas = Vec::with_capacity(req.quotas.len());
    for (q, &(start, end)) in req.quotas.iter().zip(periods) {
        let (consumed, available) = (u(at)?, u(at + 1)?);
        quotas.push(QuotaView {
            name: q.name.clone(),
            period_start: start,
            period_end: end,
            consumed,
            outstanding: q.limit.saturating_sub(consumed).saturating_sub(available),
            available,
        });
        at += 2;
    }
    (at == r.len()).then_some(TakeResponse {
        admitted,
        now_ms,
        buckets,
        quotas,
    })
}

/// Turns the script's integer array into the response; `None` if it has the wrong shape
/// (which would be a bug in the script, reported as a server error).
pub fn lease_response(req: &LeaseRequest, periods: &[(i64, i64)], r: &[i64]) -> Option<LeaseResponse> {
    let u = |i: usize| r.get(i).map(|&v| v.max(0) as u64);
    let applied = *r.first()? == 1;
    let now_ms = u(1)?;
    if !applied {
        return Some(LeaseResponse {
            applied,
            granted: 0,
            valid_ms: 0,
            hold_void: false,
            now_ms,
            buckets: Vec::new(),
            quotas: Vec::new(),
            settled: Vec::new(),
        });
    }
    let (granted, valid_ms, hold_void) = (u(2)?, u(3)?, u(4)? == 1);
    let mut at = 5;
    let buckets = bucket_views(&req.buckets, &u, &mut at)?;
    let mut quotas = Vec::with_capacity(req.quotas.len());
    for (q, &(start, end)) in req.quotas.iter().zip(periods) {
        quotas.push(QuotaView {
            name: q.name.clone(),
            period_start: start,
            period_end: end,
            consumed: u(at)?,
            outstanding: u(at + 1)?,
            available: u(at + 2)?,
        });
        at += 3;
    }
    (at == r.len()).then_some(LeaseResponse {
        applied,
        granted,
        valid_ms,
        hold_void,
        now_ms,
        buckets,
        quotas,
        // An applied call settles every take in doubt it names.
        settled: req.doubts.iter().map(|d| d.id).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keymeter::core::remote::fleet_protocol::TakeDoubt;

    #[test]
    fn keys_share_the_subject_hash_tag_and_periods_come_from_the_core() {
        let req = LeaseRequest {
            node: "n1".into(),
            seq: 3,
            subject: "c:acme".into(),
            fleet_size: 3,
            ttl_ms: 5000,
            want: 7,
            hold: 2,
            returned: 1,
            spent_total: 40,
            unreported_max: Some(4),
            buckets: vec![BucketSpec {
                name: "s".into(),
                rate: 10,
                interval_ms: 1000,
                burst: 20,
            }],
            quotas: vec![QuotaSpec {
                name: "m".into(),
                period: Period::Month,
                limit: 1000,
            }],
            doubts: vec![],
        };
        // 2024-02-29T12:00:00Z: the month is February 2024.
        let now = 1_709_208_000;
        let (keys, args, periods) = lease_call(&req, now, 99, 5);
        assert_eq!(
            keys,
            ["km:{c:acme}:n", "km:{c:acme}:b:s", "km:{c:acme}:q:m.m:1706745600"]
        );
        assert!(keys.iter().all(|k| k.contains("{c:acme}")));
        assert_eq!(periods, [(1_706_745_600, 1_709_251_200)]);
        assert_eq!(
            args,
            [
                "n1",
                "3",
                "5000",
                "6",
                "1",
                "1",
                "7",
                "2",
                "1",
                "40",
                "99",
                "4",
                "10",
                "1000",
                "20",
                "1000",
                "1709251200000"
            ]
        );
        let r = lease_response(&req, &periods, &[1, 5, 7, 5000, 0, 12, 0, 40, 9, 951]).unwrap();
        assert_eq!(
            (
                r.granted,
                r.valid_ms,
                r.hold_void,
                r.buckets[0].tokens,
                r.quotas[0].available
            ),
            (7, 5000, false, 12, 951)
        );
        assert!(
            lease_response(&req, &periods, &[1, 5, 7, 5000, 1, 12, 0, 40, 9, 951])
                .unwrap()
                .hold_void
        );
        assert!(lease_response(&req, &periods, &[1, 5, 7]).is_none());
        assert!(!lease_response(&req, &periods, &[0, 5]).unwrap().applied);
    }

    #[test]
    fn takes_in_doubt_and_tagged_takes_add_the_takes_key_and_their_arguments() {
        let quotas = vec![QuotaSpec {
            name: "m".into(),
            period: Period::Month,
            limit: 1000,
        }];
        let now = 1_709_208_000;
        let req = LeaseRequest {
            node: "n1".into(),
            seq: 3,
            subject: "c:acme".into(),
            fleet_size: 1,
            ttl_ms: 5000,
            want: 0,
            hold: 0,
            returned: 0,
            spent_total: 2,
            unreported_max: None,
            buckets: vec![],
            quotas: quotas.clone(),
            doubts: vec![TakeDoubt { id: 9, cost: 2 }, TakeDoubt { id: 11, cost: 1 }],
        };
        let (keys, args, periods) = lease_call(&req, now, 99, 3_600_000);
        assert_eq!(keys.last().unwrap(), "km:{c:acme}:t");
        assert_eq!(args[args.len() - 6..], ["2", "3600000", "9", "2", "11", "1"]);
        // Every doubt named in an applied call is settled; none in a replay.
        let r = lease_response(&req, &periods, &[1, 5, 0, 5000, 0, 2, 0, 998]).unwrap();
        assert_eq!(r.settled, [9, 11]);
        assert!(lease_response(&req, &periods, &[0, 5]).unwrap().settled.is_empty());
        // Without doubts, nothing of it (the call a limitd without doubts knows).
        let plain = LeaseRequest { doubts: vec![], ..req };
        let (keys, args, _) = lease_call(&plain, now, 99, 3_600_000);
        assert_eq!((keys.len(), args.len()), (2, 14));
        let take = TakeRequest {
            subject: "c:acme".into(),
            cost: 1,
            buckets: vec![],
            quotas,
            node: Some("n1".into()),
            id: Some(9),
        };
        let (keys, args, _) = take_call(&take, now, 60_000);
        assert_eq!(keys.last().unwrap(), "km:{c:acme}:t");
        assert_eq!(args[args.len() - 3..], ["n1", "9", "60000"]);
        let untagged = TakeRequest {
            node: None,
            id: None,
            ..take
        };
        let (keys, args, _) = take_call(&untagged, now, 60_000);
        assert_eq!((keys.len(), args.len()), (1, 5));
    }
}

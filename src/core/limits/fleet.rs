//! Fleet mode, the node's side: limits shared by many Envoys through
//! `keymeter-limitd` and Redis, decided per request from the node's lease in shared
//! data, with no network call on the request path in the common case.
//!
//! Per subject (key lineage, consumer, client address) the node keeps one
//! [`FleetEntry`] in shared data, updated by CAS like the single-node limit state. A
//! busy named subject's request is first served from the worker's own lease drawn from
//! this entry (`super::fleet_loans`: no shared-data call); any other request is decided
//! by [`decide`]:
//!
//! 1. from the node's lease (units leased from the fleet ahead of time), as long as the
//!    node's spend not yet acknowledged stays within R (`FleetConfig::unreported_max`),
//!    so that a node killed at any moment has admitted at most R units the fleet does
//!    not know of (the lease script presumes min(R, held) spent when the lease expires);
//! 2. if the lease cannot cover it and the fleet is reachable: [`Step::Take`]: the
//!    request pauses for one `POST /v1/take` (the cost, taken atomically in Redis), at
//!    most `timeout_ms`. That is the first request of a subject on a node, a quota near
//!    its end (chunks of 1), and a node at R until its report is acknowledged. Pausing
//!    rather than a local credit keeps "never more than the quota" true from the first
//!    request on. A subject at a rate limit's cap takes nothing per request: the last
//!    answer said the fleet bucket is (nearly) empty, so the node refuses locally until
//!    its next refill, one per cap interval (`lease::bounds::cap_refill_interval_ms`);
//! 3. if the fleet is unreachable (circuit breaker open): the partition fallback: token
//!    buckets at a local share (`limit / fleet_size`, rounded up), never allow-all;
//!    quotas within a bounded `overdraft` per subject on this node, then 429. What is
//!    spent meanwhile goes into the lease's cumulative spend and is replayed (once, the
//!    script counts only growth) when the fleet is back.
//!
//! Leases are refilled off the request path by the root context (one call in flight
//! per subject per node); see `core::limits::lease` for the lease itself.

use super::lease::{bounds, Ask, Lease, LeasePolicy};
use super::limiter::Denial;
use super::plan::{NamedBucket, NamedQuota};
use super::token_bucket::{self, BucketLimit, BucketState};
use crate::core::remote::fleet_protocol::{
    BucketSpec, BucketView, LeaseRequest, LeaseResponse, QuotaSpec, TakeDoubt, TakeRequest, TakeResponse, MAX_DOUBTS,
};
use serde::{Deserialize, Serialize};

/// `fleet` in the plugin configuration, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetDoc {
    pub cluster: String,
    #[serde(default = "d_authority")]
    pub authority: String,
    #[serde(default = "d_timeout")]
    pub timeout_ms: u64,
    pub fleet_size: u64,
    #[serde(default = "d_lease_ttl")]
    pub lease_ttl_ms: u64,
    #[serde(default = "d_rate_lease")]
    pub rate_lease_ms: u64,
    #[serde(default = "d_max_chunk")]
    pub max_chunk: u64,
    /// Default: 10, or `max_chunk` if smaller.
    #[serde(default)]
    pub initial_chunk: Option<u64>,
    #[serde(default = "d_overdraft")]
    pub overdraft: u64,
    #[serde(default = "d_breaker_failures")]
    pub breaker_failures: u32,
    #[serde(default = "d_breaker_cooldown")]
    pub breaker_cooldown_ms: u64,
    #[serde(default = "d_refill_tick")]
    pub refill_tick_ms: u64,
    #[serde(default = "d_report_interval")]
    pub report_interval_ms: u64,
    #[serde(default = "d_unreported_pct")]
    pub unreported_pct: u64,
    #[serde(default)]
    pub node_name: Option<String>,
}

fn d_authority() -> String {
    "keymeter-limitd".into()
}
fn d_timeout() -> u64 {
    50
}
fn d_lease_ttl() -> u64 {
    30_000
}
fn d_rate_lease() -> u64 {
    1_000
}
fn d_max_chunk() -> u64 {
    1_000
}
fn d_overdraft() -> u64 {
    10
}
fn d_breaker_failures() -> u32 {
    3
}
fn d_breaker_cooldown() -> u64 {
    1_000
}
fn d_refill_tick() -> u64 {
    20
}
fn d_report_interval() -> u64 {
    1_000
}
fn d_unreported_pct() -> u64 {
    1
}

/// The validated `fleet` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// Envoy cluster of the limitd instances.
    pub cluster: String,
    pub authority: String,
    /// Bound of every call (and so of the wait of a paused request).
    pub timeout_ms: u64,
    /// Envoys sharing the limits: chunk rule and partition share.
    pub fleet_size: u64,
    /// Validity of leased quota units.
    pub lease_ttl_ms: u64,
    /// Validity of leased token-bucket units (bounds the rate skew).
    pub rate_lease_ms: u64,
    pub max_chunk: u64,
    pub initial_chunk: u64,
    /// Quota units a node may admit per subject while the fleet is unreachable.
    pub overdraft: u64,
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    /// How often the root context looks for leases to refill, renew or return.
    pub refill_tick_ms: u64,
    /// Spend not yet reported is reported at least this often (billing freshness, and
    /// the bound on what a crashed node can have spent unreported).
    pub report_interval_ms: u64,
    /// R, the bound on a subject's spend not yet acknowledged by the fleet, as a
    /// percentage of its quota (`lease::bounds::unreported_max`): what a killed node can
    /// cost the subject for good, and what it reports at (half of it).
    pub unreported_pct: u64,
    /// Prefix of this node's id in Redis (the id itself is unique per process).
    pub node_name: String,
}

impl FleetDoc {
    pub fn validate(&self) -> Result<FleetConfig, String> {
        let field = |f: &str, m: &str| Err(format!("invalid plugin configuration: fleet.{f}: {m}"));
        let printable = |s: &str| !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| (0x21..0x7f).contains(&b));
        if !printable(&self.cluster) {
            return field("cluster", "must be an Envoy cluster name (printable ASCII, no spaces)");
        }
        if !printable(&self.authority) {
            return field("authority", "must be a host name");
        }
        let ranges: [(&str, u64, u64, u64); 9] = [
            ("timeout_ms", self.timeout_ms, 5, 10_000),
            ("fleet_size", self.fleet_size, 1, 10_000),
            ("lease_ttl_ms", self.lease_ttl_ms, 100, 86_400_000),
            ("rate_lease_ms", self.rate_lease_ms, 10, 86_400_000),
            ("max_chunk", self.max_chunk, 1, 1 << 40),
            ("breaker_cooldown_ms", self.breaker_cooldown_ms, 10, 600_000),
            ("refill_tick_ms", self.refill_tick_ms, 5, 10_000),
            ("report_interval_ms", self.report_interval_ms, 10, 3_600_000),
            ("unreported_pct", self.unreported_pct, 0, 100),
        ];
        for (name, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                return field(name, &format!("must be between {lo} and {hi}"));
            }
        }
        let initial_chunk = self.initial_chunk.unwrap_or(self.max_chunk.min(10));
        if initial_chunk == 0 || initial_chunk > self.max_chunk {
            return field("initial_chunk", "must be between 1 and max_chunk");
        }
        if self.overdraft >= 1 << 40 {
            return field("overdraft", "is too large");
        }
        if self.breaker_failures == 0 || self.breaker_failures > 1000 {
            return field("breaker_failures", "must be between 1 and 1000");
        }
        let name = self.node_name.clone().unwrap_or_else(|| "envoy".into());
        if name.is_empty()
            || name.len() > 40
            || !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return field("node_name", "must be 1-40 of A-Z a-z 0-9 - _");
        }
        Ok(FleetConfig {
            cluster: self.cluster.clone(),
            authority: self.authority.clone(),
            timeout_ms: self.timeout_ms,
            fleet_size: self.fleet_size,
            lease_ttl_ms: self.lease_ttl_ms,
            rate_lease_ms: self.rate_lease_ms,
            max_chunk: self.max_chunk,
            initial_chunk,
            overdraft: self.overdraft,
            breaker_failures: self.breaker_failures,
            breaker_cooldown_ms: self.breaker_cooldown_ms,
            refill_tick_ms: self.refill_tick_ms,
            report_interval_ms: self.report_interval_ms,
            unreported_pct: self.unreported_pct,
            node_name: name,
        })
    }
}

impl FleetConfig {
    pub fn policy(&self) -> LeasePolicy {
        LeasePolicy {
            max_chunk: self.max_chunk,
            initial_chunk: self.initial_chunk,
            // Renew a little before expiry: a tick and a call must fit in between.
            renew_before_ms: (self.refill_tick_ms * 2 + self.timeout_ms).min(self.lease_ttl_ms / 2),
            refill_timeout_ms: self.timeout_ms * 2 + self.refill_tick_ms,
        }
    }

    /// R for a subject with these quotas (the smallest quota's); `None` without quotas:
    /// a token bucket loses nothing to a dead node (its leased tokens are gone, not
    /// returned).
    ///
    /// R is taken from the plan as it is now and sent with every call; a plan raised
    /// between two calls applies the larger R one call early (for at most a refill tick).
    pub fn unreported_max(&self, quotas: &[NamedQuota]) -> Option<u64> {
        quotas
            .iter()
            .map(|q| bounds::unreported_max(q.limit, self.unreported_pct, self.max_chunk))
            .min()
    }

    /// How often a node refills a subject held at its rate cap: the shortest of its
    /// buckets' `lease::bounds::cap_refill_interval_ms`.
    pub fn cap_refill_ms(&self, buckets: &[NamedBucket]) -> u64 {
        buckets
            .iter()
            .map(|b| {
                bounds::cap_refill_interval_ms(
                    b.limit.rate,
                    b.limit.interval_ms,
                    b.limit.burst,
                    self.fleet_size,
                    self.refill_tick_ms,
                )
            })
            .min()
            .unwrap_or(self.refill_tick_ms)
    }

    /// Validity to ask for: token-bucket units are short-lived (they bound the rate
    /// skew), quota units live `lease_ttl_ms`.
    pub fn ttl_for(&self, buckets: &[NamedBucket]) -> u64 {
        if buckets.is_empty() {
            self.lease_ttl_ms
        } else {
            self.rate_lease_ms.min(self.lease_ttl_ms)
        }
    }
}

/// The node's state of one subject, in shared data (`km/fl/<subject>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetEntry {
    pub lease: Lease,
    /// Sequence number of this node's last lease call for the subject.
    pub seq: u64,
    /// The fleet had nothing for this subject (an exhausted quota, or a rate limit at its
    /// cap): what the lease cannot cover is refused locally until then, without calls.
    pub denied_until_ms: u64,
    /// Which limit was exhausted (for the refusal): quota or rate.
    pub denied_quota: bool,
    /// Partition fallback: local-share buckets, by limit-name hash.
    pub local: Vec<(u32, BucketState)>,
    /// Partition fallback: quota units admitted without a lease since the fleet was last
    /// reached (bounded by `overdraft`; reset once a call has reported them).
    pub overdraft_used: u64,
    /// When the last lease call was sent (for the report interval).
    pub last_call_ms: u64,
    /// What the fleet last said was left (the `RateLimit` fields, `super::fleet_view`).
    pub view: super::fleet_view::FleetView,
    /// Units of `lease` lent to this node's workers (`super::fleet_loans`).
    pub loans: Vec<super::fleet_loans::Loan>,
    /// Takes whose answer was lost, oldest first, until a lease call settles them
    /// (`TakeDoubt`); at most `MAX_DOUBTS`.
    pub doubts: Vec<TakeDoubt>,
}

/// The shared-data key of a subject's node entry (`k:<lineage>` -> `km/fl/k:<lineage>`);
/// also the key of a worker's lease drawn from it.
pub fn entry_key(subject: &str) -> String {
    format!("km/fl/{subject}")
}

/// Layout version of the node's fleet state in shared data (`FleetEntry`, `AnonSlot`).
/// Shared data outlives a plugin upgrade through LDS, and bincode cannot tell one layout
/// from another: a value of another format is read as "no state", and the node id
/// carries the format too (`node_id_for`), so limitd sees a new node rather than an old
/// one whose sequence numbers and spend the fresh state would contradict. Bump it with
/// any change to these structs.
pub const ENTRY_FORMAT: u8 = 4;

/// Encodes `v` behind the `ENTRY_FORMAT` byte.
pub fn encode_tagged<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![ENTRY_FORMAT];
    bincode::serialize_into(&mut out, v).expect("fleet state encodes");
    out
}

/// Decodes a value written by `encode_tagged` of this format; anything else (another
/// format, garbage, nothing) is the default.
pub fn decode_tagged<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> T {
    match bytes.split_first() {
        Some((&ENTRY_FORMAT, rest)) => bincode::deserialize(rest).unwrap_or_default(),
        _ => T::default(),
    }
}

/// The node id limitd knows this Envoy's node by: name, instance and state format.
pub fn node_id_for(node_name: &str, instance: &str) -> String {
    format!("{node_name}-{instance}-f{ENTRY_FORMAT}")
}

impl FleetEntry {
    pub fn decode(bytes: &[u8]) -> FleetEntry {
        decode_tagged(bytes)
    }
    pub fn encode(&self) -> Vec<u8> {
        encode_tagged(self)
    }
}

/// How a request was decided, for metrics and the status (lease hit ratio).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Lease,
    Take,
    Fallback,
    /// The fleet said it has nothing (a recent take or lease call).
    Exhausted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetVerdict {
    pub denial: Option<Denial>,
    pub retry_after_secs: Option<u64>,
    pub via: Via,
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Decided; store the entry if it changed.
    Decided(FleetVerdict),
    /// Pause the request for a `POST /v1/take` of its cost.
    Take,
}

fn allowed(via: Via) -> Step {
    Step::Decided(FleetVerdict {
        denial: None,
        retry_after_secs: None,
        via,
    })
}

fn denied(denial: Denial, retry_ms: Option<u64>, via: Via) -> Step {
    Step::Decided(FleetVerdict {
        denial: Some(denial),
        retry_after_secs: retry_ms.map(|ms| ms.div_ceil(1000).max(1)),
        via,
    })
}

/// A rate limit's partition share: rate and burst divided by the fleet size, rounded
/// up (see `lease::bounds::local_share`).
pub fn local_share(limit: &BucketLimit, fleet_size: u64) -> BucketLimit {
    use super::lease::bounds::local_share as share;
    BucketLimit {
        rate: share(limit.rate, fleet_size),
        interval_ms: limit.interval_ms,
        burst: share(limit.burst, fleet_size),
    }
}

/// Decides one request of `cost` for a subject with these limits. `connected`: the
/// circuit breaker lets calls through. Mutates `entry` only for what must be stored.
pub fn decide(
    entry: &mut FleetEntry,
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    cfg: &FleetConfig,
    now_ms: u64,
    cost: u64,
    connected: bool,
) -> Step {
    if buckets.iter().any(|b| cost > b.limit.burst) {
        return denied(Denial::CostExceedsBurst, None, Via::Lease);
    }
    // Never more than R spent unreported: beyond it the cost is taken from the fleet
    // directly (counted at once) until the report, sent at R/2, is acknowledged. Units
    // on loan to workers count as spent here (they may be, unreported).
    entry.lease.expire(now_ms);
    super::fleet_loans::reclaim_orphans(entry, now_ms);
    let within_r = cfg.unreported_max(quotas).is_none_or(|r| {
        entry
            .lease
            .unreported()
            .saturating_add(super::fleet_loans::on_loan(entry))
            .saturating_add(cost)
            <= r
    });
    if within_r && entry.lease.try_spend(cost, now_ms) {
        return allowed(Via::Lease);
    }
    if connected {
        if now_ms < entry.denied_until_ms {
            // At a rate cap the next refill is the retry time; for a quota, the denial.
            let (d, until) = if entry.denied_quota {
                (Denial::QuotaExceeded, entry.denied_until_ms)
            } else {
                (Denial::RateLimited, entry.lease.retry_at_ms.max(now_ms))
            };
            return denied(d, Some(until - now_ms), Via::Exhausted);
        }
        return Step::Take;
    }
    fallback(entry, buckets, quotas, cfg, now_ms, cost)
}

/// The partition fallback (also used when a take call fails): never allow-all.
pub fn fallback(
    entry: &mut FleetEntry,
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    cfg: &FleetConfig,
    now_ms: u64,
    cost: u64,
) -> Step {
    let now_ns = now_ms.saturating_mul(1_000_000);
    let mut next = Vec::with_capacity(buckets.len());
    let mut retry: Option<u64> = None;
    for b in buckets {
        let h = super::limiter::name_hash(&b.name);
        let old = entry
            .local
            .iter()
            .find(|(n, _)| *n == h)
            .map(|(_, s)| *s)
            .unwrap_or_default();
        let (d, new) = token_bucket::try_take(&local_share(&b.limit, cfg.fleet_size), &old, now_ns, cost);
        if !d.allowed {
            retry = Some(retry.unwrap_or(0).max(d.retry_after_ms.unwrap_or(1000)));
        }
        next.push((h, new));
    }
    if let Some(ms) = retry {
        return denied(Denial::RateLimited, Some(ms), Via::Fallback);
    }
    if !quotas.is_empty() {
        if entry.overdraft_used.saturating_add(cost) > cfg.overdraft {
            // Retry when the fleet may be back: the breaker's cooldown.
            return denied(Denial::QuotaExceeded, Some(cfg.breaker_cooldown_ms), Via::Fallback);
        }
        entry.overdraft_used += cost;
    }
    entry.local = next;
    entry.lease.record_overdraft(cost);
    allowed(Via::Fallback)
}

fn specs(buckets: &[NamedBucket], quotas: &[NamedQuota]) -> (Vec<BucketSpec>, Vec<QuotaSpec>) {
    (
        buckets
            .iter()
            .map(|b| BucketSpec {
                name: b.name.clone(),
                rate: b.limit.rate,
                interval_ms: b.limit.interval_ms,
                burst: b.limit.burst,
            })
            .collect(),
        quotas
            .iter()
            .map(|q| QuotaSpec {
                name: q.name.clone(),
                period: q.period,
                limit: q.limit,
            })
            .collect(),
    )
}

/// The `POST /v1/take` body for a request of `cost`; `tag`: the node id and this take's
/// id (unique per node), so that a lost answer can be settled later.
pub fn take_request(
    subject: &str,
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    cost: u64,
    tag: Option<(&str, u64)>,
) -> TakeRequest {
    let (buckets, quotas) = specs(buckets, quotas);
    TakeRequest {
        subject: subject.to_string(),
        cost,
        buckets,
        quotas,
        node: tag.map(|(n, _)| n.to_string()),
        id: tag.map(|(_, id)| id),
    }
}

/// Records a take whose answer was lost (it may have been applied) for the next lease
/// call to settle. Only quotas need it: a take applied twice over, once in Redis and
/// once as this node's overdraft, would be billed twice, whereas tokens taken from a
/// bucket for nothing just refill. At `MAX_DOUBTS` the oldest is dropped unsettled
/// (counted as applied: at most its cost counted twice); returns whether one was.
pub fn record_doubt(entry: &mut FleetEntry, quotas: &[NamedQuota], id: u64, cost: u64) -> bool {
    if quotas.is_empty() || entry.doubts.iter().any(|d| d.id == id) {
        return false;
    }
    let dropped = entry.doubts.len() >= MAX_DOUBTS;
    if dropped {
        entry.doubts.remove(0);
    }
    entry.doubts.push(TakeDoubt { id, cost });
    dropped
}

/// Applies a take answer to the entry; returns the request's verdict. A refusal makes
/// the node deny the subject locally until the fleet could have more (the bucket's
/// wait, or one breaker cooldown for a quota, which may get units back from returns).
pub fn apply_take(
    entry: &mut FleetEntry,
    resp: &TakeResponse,
    buckets: &[NamedBucket],
    cfg: &FleetConfig,
    now_ms: u64,
    cost: u64,
) -> FleetVerdict {
    entry.overdraft_used = 0;
    if resp.admitted {
        // Admitted: at the cap only if it already was and the bucket is still low (as
        // for a full lease grant).
        if at_cap_already(entry) && at_cap(&resp.buckets, buckets, cfg) {
            hold_at_cap(entry, &resp.buckets, buckets, cfg, now_ms);
        } else {
            entry.denied_until_ms = 0;
        }
        return FleetVerdict {
            denial: None,
            retry_after_secs: None,
            via: Via::Take,
        };
    }
    let quota_short = resp.quotas.iter().any(|q| q.available == 0);
    if quota_short && entry.lease.available >= cost {
        // Refused for want of units this node holds itself but may not spend until its
        // report (at R) is acknowledged, which takes a tick and a call: refuse this one
        // request, cache nothing.
        return FleetVerdict {
            denial: Some(Denial::QuotaExceeded),
            retry_after_secs: Some(1),
            via: Via::Take,
        };
    }
    let wait = if quota_short {
        // Until the period ends if nothing is held anywhere, else a cooldown.
        let end_ms = resp
            .quotas
            .iter()
            .filter(|q| q.available == 0)
            .map(|q| (q.period_end.max(0) as u64).saturating_mul(1000))
            .min()
            .unwrap_or(0);
        let held = resp.quotas.iter().any(|q| q.outstanding > 0);
        let to_end = end_ms.saturating_sub(resp.now_ms).max(1);
        if held {
            to_end.min(cfg.breaker_cooldown_ms)
        } else {
            to_end
        }
    } else {
        // At the rate cap: refused locally until the node's next refill.
        let wait = hold_at_cap(entry, &resp.buckets, buckets, cfg, now_ms);
        return FleetVerdict {
            denial: Some(Denial::RateLimited),
            retry_after_secs: Some(wait.div_ceil(1000).max(1)),
            via: Via::Take,
        };
    };
    entry.denied_until_ms = now_ms.saturating_add(wait);
    entry.denied_quota = quota_short;
    let d = if quota_short {
        Denial::QuotaExceeded
    } else {
        Denial::RateLimited
    };
    FleetVerdict {
        denial: Some(d),
        retry_after_secs: Some(wait.div_ceil(1000).max(1)),
        via: Via::Take,
    }
}

/// Whether the fleet's answer shows a subject at its rate cap: some bucket holds fewer
/// tokens than one node's grant (`burst / (2 × fleet_size)`, at least 1), so asking
/// again before more have accrued would only race the other nodes for single tokens.
fn at_cap(views: &[BucketView], buckets: &[NamedBucket], cfg: &FleetConfig) -> bool {
    let share = super::lease::share(cfg.fleet_size);
    views.iter().any(|v| {
        let fair = buckets
            .iter()
            .find(|b| b.name == v.name)
            .map_or(1, |b| (b.limit.burst / share).max(1));
        v.tokens < fair
    })
}

/// Whether the subject is held at a rate cap (until a grant leaves enough tokens).
fn at_cap_already(entry: &FleetEntry) -> bool {
    !entry.denied_quota && entry.denied_until_ms != 0
}

/// Caches "at the cap" for a subject: its next refill (root context) is not before the
/// store's next tokens nor before one cap refill interval, and a request its lease
/// cannot cover is refused locally (429, `Retry-After` the refill) until that refill
/// can have been answered, so at the cap calls follow the refill interval, not the
/// request rate. Returns the wait until the refill.
fn hold_at_cap(
    entry: &mut FleetEntry,
    views: &[BucketView],
    buckets: &[NamedBucket],
    cfg: &FleetConfig,
    now_ms: u64,
) -> u64 {
    let wait = views
        .iter()
        .map(|v| v.wait_ms)
        .max()
        .unwrap_or(0)
        .max(cfg.cap_refill_ms(buckets));
    let next = now_ms.saturating_add(wait);
    entry.lease.back_off(next);
    entry.denied_until_ms = next.saturating_add(cfg.refill_tick_ms + cfg.timeout_ms);
    entry.denied_quota = false;
    wait
}

/// Whether the subject needs a lease call soon (the request path flags it for the root
/// tick): a refill, a renewal, something to give back, or unreported spend at half R.
pub fn wants_call(entry: &FleetEntry, quotas: &[NamedQuota], cfg: &FleetConfig, now_ms: u64) -> bool {
    entry.lease.needs_refill(now_ms, &cfg.policy()) || report_due_by_r(entry, quotas, cfg)
}

fn report_due_by_r(entry: &FleetEntry, quotas: &[NamedQuota], cfg: &FleetConfig) -> bool {
    cfg.unreported_max(quotas)
        .is_some_and(|r| entry.lease.unreported() >= bounds::report_at(r))
}

/// A subject and the limits that apply to it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// `k:<lineage>`, `c:<consumer>` or `ip:<addr>`.
    pub name: &'a str,
    pub buckets: &'a [NamedBucket],
    pub quotas: &'a [NamedQuota],
}

/// Starts a background lease call if the entry needs one and none is in flight; the
/// caller stores the entry (CAS) and sends the returned body.
pub fn begin_lease(
    entry: &mut FleetEntry,
    node: &str,
    subject: &Subject<'_>,
    cfg: &FleetConfig,
    now_ms: u64,
    release: bool,
) -> Option<(Ask, LeaseRequest)> {
    let (buckets, quotas) = (subject.buckets, subject.quotas);
    let policy = cfg.policy();
    super::fleet_loans::reclaim_orphans(entry, now_ms);
    let ask = if release {
        if entry.lease.refill_in_flight(now_ms, &policy) {
            return None;
        }
        entry.lease.refill_sent_ms = now_ms.max(1);
        entry.lease.release(now_ms)
    } else {
        let report_due = (entry.lease.spent_total > entry.lease.reported_total
            && now_ms.saturating_sub(entry.last_call_ms) >= cfg.report_interval_ms)
            || report_due_by_r(entry, quotas, cfg);
        if !entry.lease.needs_refill(now_ms, &policy)
            && entry.overdraft_used == 0
            && entry.doubts.is_empty()
            && !report_due
        {
            return None;
        }
        match entry.lease.begin_refill(now_ms, &policy) {
            Some(ask) => ask,
            // Told to wait before asking for more, but spend at half R is reported.
            None if report_due_by_r(entry, quotas, cfg) => entry.lease.begin_report(now_ms, &policy)?,
            None => return None,
        }
    };
    entry.last_call_ms = now_ms;
    entry.seq += 1;
    let (b, q) = specs(buckets, quotas);
    let req = LeaseRequest {
        node: node.to_string(),
        seq: entry.seq,
        subject: subject.name.to_string(),
        fleet_size: cfg.fleet_size,
        ttl_ms: cfg.ttl_for(buckets),
        want: ask.want,
        hold: ask.hold,
        returned: ask.returned,
        spent_total: ask.spent_total,
        unreported_max: cfg.unreported_max(quotas),
        buckets: b,
        quotas: q,
        doubts: entry.doubts.clone(),
    };
    Some((ask, req))
}

/// Applies a lease answer (for the ask it answers) to the entry; `buckets` are the
/// subject's token buckets.
pub fn apply_lease(
    entry: &mut FleetEntry,
    ask: &Ask,
    resp: &LeaseResponse,
    buckets: &[NamedBucket],
    now_ms: u64,
    cfg: &FleetConfig,
) {
    if !resp.applied {
        // Replayed or overtaken: nothing changed in Redis; the next ask has a new seq.
        entry.lease.on_failure();
        return;
    }
    entry.doubts.retain(|d| !resp.settled.contains(&d.id));
    if resp.hold_void {
        // The fleet reclaimed our lease before this call arrived (it came late): the
        // units we held are no longer ours, whatever our clock says, nor those lent.
        entry.lease.available = 0;
        super::fleet_loans::void_all(entry);
    }
    entry.lease.on_grant(ask, resp.granted, resp.valid_ms);
    entry.overdraft_used = 0;
    if ask.want == 0 {
        // A report: it asked for nothing, so it says nothing about the cap.
        return;
    }
    // Short of what we asked because the bucket is (nearly) empty: at the cap, and it
    // stays there while the bucket stays that low. A full grant does not bring a subject
    // to the cap: demand below the rate is not refused while the fleet has tokens.
    if (resp.granted < ask.want || at_cap_already(entry)) && at_cap(&resp.buckets, buckets, cfg) {
        hold_at_cap(entry, &resp.buckets, buckets, cfg, now_ms);
        return;
    }
    if !entry.denied_quota {
        entry.denied_until_ms = 0;
    }
    if resp.granted < ask.want {
        let quota_empty = resp.quotas.iter().any(|q| q.available == 0);
        let wait = if quota_empty {
            cfg.breaker_cooldown_ms
        } else {
            cfg.refill_tick_ms
        };
        entry.lease.back_off(now_ms.saturating_add(wait));
    }
}

#[cfg(test)]
mod tests {
    use super::super::quota::Period;
    use super::*;
    use crate::core::remote::fleet_protocol::{BucketView, QuotaView};

    fn cfg() -> FleetConfig {
        let doc: FleetDoc = serde_json::from_str(r#"{"cluster":"limitd","fleet_size":3,"overdraft":5}"#).unwrap();
        doc.validate().unwrap()
    }

    fn bucket(rate: u64, burst: u64) -> Vec<NamedBucket> {
        vec![NamedBucket {
            name: "ps".into(),
            limit: BucketLimit {
                rate,
                interval_ms: 1000,
                burst,
            },
        }]
    }

    fn monthly(limit: u64) -> Vec<NamedQuota> {
        vec![NamedQuota {
            name: "m".into(),
            period: Period::Month,
            limit,
        }]
    }

    #[test]
    fn config_defaults_and_errors_name_the_field() {
        let c = cfg();
        assert_eq!(
            (c.timeout_ms, c.lease_ttl_ms, c.rate_lease_ms, c.node_name.as_str()),
            (50, 30_000, 1_000, "envoy")
        );
        let bad = |j: &str| {
            serde_json::from_str::<FleetDoc>(j)
                .map_err(|e| e.to_string())
                .and_then(|d| d.validate())
                .unwrap_err()
        };
        assert!(bad(r#"{"cluster":"l","fleet_size":0}"#).contains("fleet.fleet_size"));
        assert!(bad(r#"{"cluster":"l","fleet_size":1,"timeout_ms":1}"#).contains("fleet.timeout_ms"));
        assert!(bad(r#"{"cluster":"","fleet_size":1}"#).contains("fleet.cluster"));
        assert!(bad(r#"{"cluster":"l","fleet_size":1,"initial_chunk":5000}"#).contains("fleet.initial_chunk"));
        let small: FleetDoc = serde_json::from_str(r#"{"cluster":"l","fleet_size":1,"max_chunk":5}"#).unwrap();
        assert_eq!(small.validate().unwrap().initial_chunk, 5);
        assert!(bad(r#"{"cluster":"l","fleet_size":1,"node_name":"a b"}"#).contains("fleet.node_name"));
        assert!(bad(r#"{"cluster":"l","fleet_size":1,"x":1}"#).contains("unknown field"));
        assert_eq!(c.ttl_for(&bucket(1, 1)), 1_000);
        assert_eq!(c.ttl_for(&[]), 30_000);
    }

    #[test]
    fn lease_first_then_take_then_exhausted() {
        let c = cfg();
        let (b, q) = (bucket(100, 100), monthly(1000));
        let mut e = FleetEntry::default();
        // No lease yet: the request pauses for a take.
        assert_eq!(decide(&mut e, &b, &q, &c, 1_000, 1, true), Step::Take);
        // A background lease of 10 units arrives.
        let (ask, req) = begin_lease(
            &mut e,
            "n1-x",
            &Subject {
                name: "k:a",
                buckets: &b,
                quotas: &q,
            },
            &c,
            1_000,
            false,
        )
        .unwrap();
        assert_eq!((req.seq, req.want, req.ttl_ms, req.fleet_size), (1, 10, 1_000, 3));
        assert!(
            begin_lease(
                &mut e,
                "n1-x",
                &Subject {
                    name: "k:a",
                    buckets: &b,
                    quotas: &q
                },
                &c,
                1_001,
                false
            )
            .is_none(),
            "one in flight"
        );
        let resp = LeaseResponse {
            applied: true,
            granted: 10,
            valid_ms: 1_000,
            hold_void: false,
            now_ms: 0,
            buckets: vec![],
            quotas: vec![],
            settled: Vec::new(),
        };
        apply_lease(&mut e, &ask, &resp, &[], 1_002, &c);
        for _ in 0..10 {
            assert_eq!(decide(&mut e, &b, &q, &c, 1_010, 1, true), allowed(Via::Lease));
        }
        // Lease empty; the fleet refuses a take for the quota: denied locally after.
        assert_eq!(decide(&mut e, &b, &q, &c, 1_010, 1, true), Step::Take);
        let refusal = TakeResponse {
            admitted: false,
            now_ms: 1_010,
            buckets: vec![BucketView {
                name: "ps".into(),
                tokens: 50,
                wait_ms: 0,
            }],
            quotas: vec![QuotaView {
                name: "m".into(),
                period_start: 0,
                period_end: 100,
                consumed: 990,
                outstanding: 10,
                available: 0,
            }],
        };
        let v = apply_take(&mut e, &refusal, &b, &c, 1_010, 1);
        assert_eq!(v.denial, Some(Denial::QuotaExceeded));
        assert_eq!(
            v.retry_after_secs,
            Some(1),
            "units are held elsewhere: retry after a cooldown"
        );
        match decide(&mut e, &b, &q, &c, 1_500, 1, true) {
            Step::Decided(v) => assert_eq!((v.denial, v.via), (Some(Denial::QuotaExceeded), Via::Exhausted)),
            s => panic!("{s:?}"),
        }
        assert_eq!(decide(&mut e, &b, &q, &c, 2_010, 1, true), Step::Take, "cooldown over");
        // Cost above a bucket's burst never passes and never calls.
        assert_eq!(
            decide(&mut e, &b, &q, &c, 2_010, 101, true),
            denied(Denial::CostExceedsBurst, None, Via::Lease)
        );
    }

    #[test]
    fn partition_fallback_uses_a_local_share_and_a_bounded_overdraft() {
        let c = cfg(); // fleet of 3, overdraft 5
        let b = bucket(30, 30);
        let mut e = FleetEntry::default();
        // Rate only: 30/s across 3 nodes is 10/s here, never allow-all.
        let mut ok = 0;
        for _ in 0..50 {
            if let Step::Decided(v) = decide(&mut e, &b, &[], &c, 10_000, 1, false) {
                ok += u32::from(v.denial.is_none());
            }
        }
        assert_eq!(ok, 10);
        // Quota: 5 units of overdraft, then 429 quota.
        let mut e = FleetEntry::default();
        let q = monthly(1_000);
        for i in 0..5 {
            assert_eq!(
                decide(&mut e, &[], &q, &c, 10_000, 1, false),
                allowed(Via::Fallback),
                "{i}"
            );
        }
        match decide(&mut e, &[], &q, &c, 10_000, 1, false) {
            Step::Decided(v) => assert_eq!((v.denial, v.via), (Some(Denial::QuotaExceeded), Via::Fallback)),
            s => panic!("{s:?}"),
        }
        // The overdraft is reported as spend with the next lease call (replay) and the
        // allowance resets once that call is answered.
        assert_eq!(e.lease.spent_total, 5);
        let (ask, req) = begin_lease(
            &mut e,
            "n",
            &Subject {
                name: "k:a",
                buckets: &[],
                quotas: &q,
            },
            &c,
            11_000,
            false,
        )
        .unwrap();
        assert_eq!(req.spent_total, 5);
        let resp = LeaseResponse {
            applied: true,
            granted: 10,
            valid_ms: 30_000,
            hold_void: false,
            now_ms: 0,
            buckets: vec![],
            quotas: vec![],
            settled: Vec::new(),
        };
        apply_lease(&mut e, &ask, &resp, &[], 11_001, &c);
        assert_eq!(e.overdraft_used, 0);
        // Held lease units are spent first, even while partitioned.
        assert_eq!(decide(&mut e, &[], &q, &c, 11_002, 1, false), allowed(Via::Lease));
    }

    #[test]
    fn a_take_in_doubt_rides_the_next_lease_calls_until_one_settles_it() {
        let c = cfg();
        let q = monthly(1_000);
        let s = Subject {
            name: "k:a",
            buckets: &[],
            quotas: &q,
        };
        let mut e = FleetEntry::default();
        // Tagged with the node and the take id.
        let t = take_request("k:a", &[], &q, 2, Some(("n", 7)));
        assert_eq!((t.node.as_deref(), t.id), (Some("n"), Some(7)));
        assert_eq!(take_request("k:a", &[], &q, 2, None).id, None);
        // Only quotas are settled (a bucket's tokens taken for nothing just refill), and
        // an id is recorded once.
        assert!(!record_doubt(&mut e, &[], 6, 1));
        assert!(e.doubts.is_empty());
        assert!(!record_doubt(&mut e, &q, 7, 2));
        assert!(!record_doubt(&mut e, &q, 7, 2));
        assert_eq!(e.doubts, [TakeDoubt { id: 7, cost: 2 }]);
        // The lost take's request was admitted as overdraft.
        assert_eq!(decide(&mut e, &[], &q, &c, 10, 2, false), allowed(Via::Fallback));
        // A doubt alone makes a lease call due, and the call names it.
        e.overdraft_used = 0;
        let (ask, req) = begin_lease(&mut e, "n", &s, &c, 20, false).unwrap();
        assert_eq!(req.doubts, [TakeDoubt { id: 7, cost: 2 }]);
        assert_eq!(req.spent_total, 2, "the overdraft is reported as the node's spend");
        let resp = LeaseResponse {
            applied: true,
            granted: 10,
            valid_ms: 30_000,
            hold_void: false,
            now_ms: 0,
            buckets: vec![],
            quotas: vec![],
            settled: vec![],
        };
        // Not applied (a replay): the doubt stays for the next call.
        apply_lease(
            &mut e,
            &ask,
            &LeaseResponse {
                applied: false,
                ..resp.clone()
            },
            &[],
            21,
            &c,
        );
        assert_eq!(e.doubts.len(), 1);
        let (ask, req) = begin_lease(&mut e, "n", &s, &c, 22, false).unwrap();
        assert_eq!(req.doubts.len(), 1);
        // A doubt recorded while the call was out is not dropped by its answer.
        record_doubt(&mut e, &q, 8, 1);
        apply_lease(
            &mut e,
            &ask,
            &LeaseResponse {
                settled: vec![7],
                ..resp
            },
            &[],
            23,
            &c,
        );
        assert_eq!(e.doubts, [TakeDoubt { id: 8, cost: 1 }]);
        assert_eq!(FleetEntry::decode(&e.encode()), e);
        // Bounded: beyond MAX_DOUBTS the oldest goes, and the caller is told.
        for id in 100..100 + MAX_DOUBTS as u64 - 1 {
            assert!(!record_doubt(&mut e, &q, id, 1));
        }
        assert!(record_doubt(&mut e, &q, 999, 1));
        assert_eq!(e.doubts.len(), MAX_DOUBTS);
        assert_eq!(e.doubts[0].id, 100);
    }

    #[test]
    fn release_returns_everything_and_entries_round_trip() {
        let c = cfg();
        let q = monthly(1_000);
        let mut e = FleetEntry::default();
        let (ask, _) = begin_lease(
            &mut e,
            "n",
            &Subject {
                name: "k:a",
                buckets: &[],
                quotas: &q,
            },
            &c,
            0,
            false,
        )
        .unwrap();
        let resp = LeaseResponse {
            applied: true,
            granted: 10,
            valid_ms: 30_000,
            hold_void: false,
            now_ms: 0,
            buckets: vec![],
            quotas: vec![],
            settled: Vec::new(),
        };
        apply_lease(&mut e, &ask, &resp, &[], 1, &c);
        assert_eq!(decide(&mut e, &[], &q, &c, 2, 3, true), allowed(Via::Lease));
        let (_, req) = begin_lease(
            &mut e,
            "n",
            &Subject {
                name: "k:a",
                buckets: &[],
                quotas: &q,
            },
            &c,
            3,
            true,
        )
        .unwrap();
        assert_eq!(
            (req.want, req.hold, req.returned, req.spent_total, req.seq),
            (0, 0, 7, 3, 2)
        );
        // A replayed answer changes nothing and lets the next call go.
        let stale = LeaseResponse { applied: false, ..resp };
        apply_lease(&mut e, &ask, &stale, &[], 4, &c);
        assert_eq!(e.lease.refill_sent_ms, 0);
        assert_eq!(FleetEntry::decode(&e.encode()), e);
        assert_eq!(FleetEntry::decode(b"garbage"), FleetEntry::default());
        // A previous build's untagged entry (or any other format) is no state at all.
        assert_eq!(
            FleetEntry::decode(&bincode::serialize(&e).unwrap()),
            FleetEntry::default()
        );
        let mut other = e.encode();
        other[0] = ENTRY_FORMAT + 1;
        assert_eq!(FleetEntry::decode(&other), FleetEntry::default());
        assert!(node_id_for("edge", "abc").ends_with(&format!("-f{ENTRY_FORMAT}")));
    }

    #[test]
    fn unreported_spend_is_reported_within_the_report_interval() {
        let c = cfg(); // report every 1000 ms
        let q = monthly(10_000);
        let s = Subject {
            name: "k:a",
            buckets: &[],
            quotas: &q,
        };
        let mut e = FleetEntry::default();
        let (ask, _) = begin_lease(&mut e, "n", &s, &c, 0, false).unwrap();
        let resp = LeaseResponse {
            applied: true,
            granted: 10,
            valid_ms: 30_000,
            hold_void: false,
            now_ms: 0,
            buckets: vec![],
            quotas: vec![],
            settled: Vec::new(),
        };
        apply_lease(&mut e, &ask, &resp, &[], 1, &c);
        assert!(
            begin_lease(&mut e, "n", &s, &c, 2_000, false).is_none(),
            "nothing spent, nothing due"
        );
        assert_eq!(decide(&mut e, &[], &q, &c, 2_000, 1, true), allowed(Via::Lease));
        assert!(
            begin_lease(&mut e, "n", &s, &c, 2_000, false).is_some(),
            "spend unreported for 2 s"
        );
    }

    fn lease_resp(granted: u64, tokens: u64, wait_ms: u64) -> LeaseResponse {
        LeaseResponse {
            applied: true,
            granted,
            valid_ms: 1_000,
            hold_void: false,
            now_ms: 0,
            buckets: vec![BucketView {
                name: "ps".into(),
                tokens,
                wait_ms,
            }],
            quotas: vec![],
            settled: Vec::new(),
        }
    }

    /// At the rate cap the node neither takes per request nor races the other nodes
    /// for each token: it refuses locally until its next refill, one per cap interval.
    #[test]
    fn at_the_rate_cap_refusals_are_cached_until_the_next_refill() {
        let c = cfg(); // fleet of 3, tick 20
        let b = bucket(100, 100); // fair grant 100 / 6 = 16; cap interval 3 x 10 ms = 30 ms
        assert_eq!(c.cap_refill_ms(&b), 30);
        let s = Subject {
            name: "k:a",
            buckets: &b,
            quotas: &[],
        };
        let mut e = FleetEntry::default();
        let (ask, _) = begin_lease(&mut e, "n", &s, &c, 0, false).unwrap();
        // 1 granted, the bucket is empty, next token in 10 ms: at the cap.
        apply_lease(&mut e, &ask, &lease_resp(1, 0, 10), &b, 5, &c);
        assert_eq!(decide(&mut e, &b, &[], &c, 6, 1, true), allowed(Via::Lease));
        // The lease is spent: refused locally, no take, Retry-After the refill (1 s).
        for now in [7, 20, 34, 60] {
            match decide(&mut e, &b, &[], &c, now, 1, true) {
                Step::Decided(v) => assert_eq!(
                    (v.denial, v.retry_after_secs, v.via),
                    (Some(Denial::RateLimited), Some(1), Via::Exhausted),
                    "{now}"
                ),
                s => panic!("{now}: {s:?}"),
            }
        }
        assert!(
            begin_lease(&mut e, "n", &s, &c, 34, false).is_none(),
            "one refill per cap interval: not before 5 + 30 ms"
        );
        let (ask, _) = begin_lease(&mut e, "n", &s, &c, 35, false).unwrap();
        assert_eq!(ask.want, 2, "twice the 1 spent");
        // 1 granted, 2 left, fewer than a node's grant: still at the cap.
        apply_lease(&mut e, &ask, &lease_resp(1, 2, 0), &b, 36, &c);
        assert!(begin_lease(&mut e, "n", &s, &c, 65, false).is_none());
        assert_eq!(decide(&mut e, &b, &[], &c, 40, 1, true), allowed(Via::Lease));
        assert!(matches!(decide(&mut e, &b, &[], &c, 41, 1, true), Step::Decided(v) if v.via == Via::Exhausted));
        // A full grant leaves the cap only once the bucket holds a node's grant again.
        let (ask, _) = begin_lease(&mut e, "n", &s, &c, 66, false).unwrap();
        apply_lease(&mut e, &ask, &lease_resp(ask.want, 1, 0), &b, 67, &c);
        assert_ne!(e.denied_until_ms, 0, "still at the cap");
        while decide(&mut e, &b, &[], &c, 68, 1, true) == allowed(Via::Lease) {}
        let (ask, _) = begin_lease(&mut e, "n", &s, &c, 97, false).unwrap();
        apply_lease(&mut e, &ask, &lease_resp(ask.want, 16, 0), &b, 98, &c);
        assert_eq!(e.denied_until_ms, 0);
        for _ in 0..ask.want {
            assert_eq!(decide(&mut e, &b, &[], &c, 99, 1, true), allowed(Via::Lease));
        }
        assert_eq!(
            decide(&mut e, &b, &[], &c, 99, 1, true),
            Step::Take,
            "not known to be at the cap"
        );
        // A full grant or an admitted take never brings a subject to the cap, however
        // few tokens are left.
        let mut fresh = FleetEntry::default();
        let (ask, _) = begin_lease(&mut fresh, "n", &s, &c, 0, false).unwrap();
        apply_lease(&mut fresh, &ask, &lease_resp(ask.want, 0, 10), &b, 1, &c);
        assert_eq!((fresh.denied_until_ms, fresh.lease.retry_at_ms), (0, 0));
        let admitted = TakeResponse {
            admitted: true,
            now_ms: 0,
            buckets: vec![BucketView {
                name: "ps".into(),
                tokens: 0,
                wait_ms: 10,
            }],
            quotas: vec![],
        };
        let mut fresh = FleetEntry::default();
        assert_eq!(apply_take(&mut fresh, &admitted, &b, &c, 1, 1).denial, None);
        assert_eq!((fresh.denied_until_ms, fresh.lease.retry_at_ms), (0, 0));
        // A refused take puts the subject at the cap the same way.
        let refusal = TakeResponse {
            admitted: false,
            now_ms: 0,
            buckets: vec![BucketView {
                name: "ps".into(),
                tokens: 0,
                wait_ms: 4,
            }],
            quotas: vec![],
        };
        let v = apply_take(&mut e, &refusal, &b, &c, 100, 1);
        assert_eq!((v.denial, v.retry_after_secs), (Some(Denial::RateLimited), Some(1)));
        assert!(begin_lease(&mut e, "n", &s, &c, 129, false).is_none());
        assert!(matches!(decide(&mut e, &b, &[], &c, 140, 1, true), Step::Decided(v) if v.via == Via::Exhausted));
        assert!(begin_lease(&mut e, "n", &s, &c, 130, false).is_some());
    }

    /// A node never has more than R units spent unreported: it reports at R/2 (off the
    /// request path) and, beyond R, takes from the fleet directly until acknowledged.
    #[test]
    fn unreported_spend_is_bounded_by_r() {
        let doc: FleetDoc =
            serde_json::from_str(r#"{"cluster":"l","fleet_size":2,"unreported_pct":10,"max_chunk":20}"#).unwrap();
        let c = doc.validate().unwrap();
        let q = monthly(60);
        assert_eq!(c.unreported_max(&q), Some(6));
        assert_eq!(c.unreported_max(&[]), None, "token buckets lose nothing to a dead node");
        let s = Subject {
            name: "k:a",
            buckets: &[],
            quotas: &q,
        };
        let mut e = FleetEntry::default();
        let (ask, req) = begin_lease(&mut e, "n", &s, &c, 0, false).unwrap();
        assert_eq!(req.unreported_max, Some(6));
        let grant = LeaseResponse {
            applied: true,
            granted: 15,
            valid_ms: 30_000,
            hold_void: false,
            now_ms: 0,
            buckets: vec![],
            quotas: vec![],
            settled: Vec::new(),
        };
        apply_lease(&mut e, &ask, &grant, &[], 1, &c);
        assert!(!wants_call(&e, &q, &c, 2));
        for _ in 0..3 {
            assert_eq!(decide(&mut e, &[], &q, &c, 2, 1, true), allowed(Via::Lease));
        }
        assert!(wants_call(&e, &q, &c, 2), "R/2 = 3 unreported: report");
        let (ask, req) = begin_lease(&mut e, "n", &s, &c, 3, false).unwrap();
        assert_eq!(req.spent_total, 3);
        // The report is slow; spending goes on up to R, then takes.
        for _ in 0..3 {
            assert_eq!(decide(&mut e, &[], &q, &c, 4, 1, true), allowed(Via::Lease));
        }
        assert_eq!(decide(&mut e, &[], &q, &c, 4, 1, true), Step::Take);
        assert_eq!(decide(&mut e, &[], &q, &c, 4, 2, true), Step::Take);
        assert_eq!(e.lease.unreported(), 6);
        // Acknowledged: 3 of the 6 are reported; 3 more may be spent.
        apply_lease(
            &mut e,
            &ask,
            &LeaseResponse {
                granted: 0,
                ..grant.clone()
            },
            &[],
            5,
            &c,
        );
        assert_eq!(e.lease.unreported(), 3);
        for _ in 0..3 {
            assert_eq!(decide(&mut e, &[], &q, &c, 6, 1, true), allowed(Via::Lease));
        }
        assert_eq!(decide(&mut e, &[], &q, &c, 6, 1, true), Step::Take);
        // Partitioned: the same bound, then the overdraft (spend without a lease).
        assert_eq!(
            decide(&mut e, &[], &q, &c, 6, 1, false),
            allowed(Via::Fallback),
            "R reached: the overdraft, not the lease"
        );
        // A late answer says our lease had expired in the fleet: its units are dropped.
        let (ask, _) = begin_lease(&mut e, "n", &s, &c, 30, false).unwrap();
        assert!(ask.hold > 0);
        apply_lease(
            &mut e,
            &ask,
            &LeaseResponse {
                granted: 2,
                hold_void: true,
                ..grant.clone()
            },
            &[],
            31,
            &c,
        );
        assert_eq!(e.lease.available, 2, "only the grant is ours");
    }

    /// Near the quota's end a node blocked at R must neither cache a refusal caused by
    /// units it holds itself nor wait out a back-off before reporting.
    #[test]
    fn a_node_at_r_reports_through_a_back_off_and_caches_no_self_made_refusal() {
        let doc: FleetDoc =
            serde_json::from_str(r#"{"cluster":"l","fleet_size":2,"unreported_pct":10,"max_chunk":20}"#).unwrap();
        let c = doc.validate().unwrap();
        let q = monthly(60); // R = 6, report at 3
        let s = Subject {
            name: "k:a",
            buckets: &[],
            quotas: &q,
        };
        let mut e = FleetEntry::default();
        let (ask, _) = begin_lease(&mut e, "n", &s, &c, 0, false).unwrap();
        // 8 of 10 granted, nothing left outside leases: back off for a cooldown.
        let grant = LeaseResponse {
            applied: true,
            granted: 8,
            valid_ms: 30_000,
            hold_void: false,
            now_ms: 0,
            buckets: vec![],
            quotas: vec![QuotaView {
                name: "m".into(),
                period_start: 0,
                period_end: 1 << 40,
                consumed: 40,
                outstanding: 20,
                available: 0,
            }],
            settled: Vec::new(),
        };
        apply_lease(&mut e, &ask, &grant, &[], 1, &c);
        assert_eq!(e.lease.retry_at_ms, 1 + c.breaker_cooldown_ms);
        for _ in 0..6 {
            assert_eq!(decide(&mut e, &[], &q, &c, 2, 1, true), allowed(Via::Lease));
        }
        assert!(
            begin_lease(&mut e, "n", &s, &c, 3, false).is_some_and(|(a, _)| a.want == 0 && a.spent_total == 6),
            "the report goes despite the back-off"
        );
        assert_eq!(decide(&mut e, &[], &q, &c, 4, 1, true), Step::Take, "at R: take");
        let refusal = TakeResponse {
            admitted: false,
            now_ms: 0,
            buckets: vec![],
            quotas: grant.quotas.clone(),
        };
        let v = apply_take(&mut e, &refusal, &[], &c, 5, 1);
        assert_eq!((v.denial, v.retry_after_secs), (Some(Denial::QuotaExceeded), Some(1)));
        assert_eq!(e.denied_until_ms, 0, "our own 2 units: nothing cached");
    }
}

//! Fleet mode on the wire: what a node (the filter) sends to `keymeter-limitd` and gets
//! back, with the validation that keeps bad input out of Redis. One set of types for
//! both ends (the filter serializes requests, limitd checks and answers them).
//!
//! * `POST /v1/lease`: report, give back, renew and ask, for one subject of one node
//!   (the node's lease; see `core::limits::lease` for the holder's side).
//! * `POST /v1/take`: take a request's cost at once, when the node's lease cannot
//!   decide it (first use of a subject, a subject at its cap).
//!
//! limitd is stateless, so a request carries the subject's limits (the node has them
//! from its key set); the fleet state they apply to lives in Redis under the subject's
//! hash tag.

use crate::core::limits::plan::is_valid_name;
use crate::core::limits::quota::Period;
use crate::core::limits::token_bucket::BucketLimit;
use serde::{Deserialize, Serialize};

/// Lua numbers are doubles: every integer that goes through a script stays below 2^53.
pub const MAX_LUA_INT: u64 = 1 << 53;
/// Longest lease a node may ask for.
pub const MAX_TTL_MS: u64 = 86_400_000;
/// Most limits per subject (each is a key and a few script arguments).
pub const MAX_LIMITS: usize = 16;
/// Most takes in doubt one lease call settles (`LeaseRequest::doubts`).
pub const MAX_DOUBTS: usize = 16;

/// A take whose answer the node never got (timeout, reset, a 5xx): limitd may have
/// applied it, counting `cost` as consumed, while the node decided the request by its
/// partition fallback. The node names it in its next lease call, which settles it
/// exactly once: an applied take's cost is taken off the count again (the node either
/// refused the request or admitted it as overdraft, which it reports as its own
/// spend), and a take that has not arrived yet is voided, so arriving late it changes
/// nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeDoubt {
    /// `TakeRequest::id`.
    pub id: u64,
    pub cost: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketSpec {
    pub name: String,
    pub rate: u64,
    pub interval_ms: u64,
    pub burst: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    pub name: String,
    pub period: Period,
    pub limit: u64,
}

fn one() -> u64 {
    1
}

/// One lease call: report, give back, renew and ask, for one subject of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Node id, unique per Envoy process lifetime (a restart is a new node).
    pub node: String,
    /// Increases with every call of this node; calls not newer than the last applied
    /// one for the subject change nothing (replays, reordered retries).
    pub seq: u64,
    /// `k:<lineage>`, `c:<consumer>` or `ip:<addr>`.
    pub subject: String,
    /// Nodes sharing the limits; chunks are at most `available / (2 × fleet_size)`.
    #[serde(default = "one")]
    pub fleet_size: u64,
    /// Validity asked for the node's units (capped at the end of the quota period).
    pub ttl_ms: u64,
    /// Units wanted on top of `hold`.
    #[serde(default)]
    pub want: u64,
    /// Units the node still holds and may spend: its outstanding lease becomes this
    /// plus the grant.
    #[serde(default)]
    pub hold: u64,
    /// Units the node gave up since its last applied call (back into the buckets).
    #[serde(default)]
    pub returned: u64,
    /// Cumulative units the node spent on this subject since it started; the growth
    /// since the last applied call is counted as consumed (idempotent replay).
    #[serde(default)]
    pub spent_total: u64,
    /// R: the node never has more than this many units spent and not yet acknowledged
    /// (`lease::bounds::unreported_max`). If its lease expires without a further call
    /// (the node died), min(R, held) is counted as consumed and the rest comes back.
    /// Absent: nothing is presumed (every held unit comes back).
    #[serde(default)]
    pub unreported_max: Option<u64>,
    #[serde(default)]
    pub buckets: Vec<BucketSpec>,
    #[serde(default)]
    pub quotas: Vec<QuotaSpec>,
    /// This node's takes of the subject in doubt, settled by this call if it applies.
    /// Left out when empty, so a limitd that predates it still takes the call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub doubts: Vec<TakeDoubt>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketView {
    pub name: String,
    /// Whole tokens left in the fleet bucket after this call.
    pub tokens: u64,
    /// Milliseconds until the next whole token, when none is left.
    pub wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaView {
    pub name: String,
    /// Unix seconds, UTC calendar period as `core::limits::quota::period_bounds`.
    pub period_start: i64,
    pub period_end: i64,
    /// Units reported spent by all nodes in this period.
    pub consumed: u64,
    /// Units held by nodes' leases, not yet spent or returned.
    pub outstanding: u64,
    /// `limit - consumed - outstanding` (0 when overdrawn).
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseResponse {
    /// False when the call was a replay or arrived out of order: nothing changed.
    pub applied: bool,
    /// Units granted, good for every limit of the subject.
    pub granted: u64,
    /// The node's held and granted units are valid this long from when it sent the call.
    pub valid_ms: u64,
    /// The node's lease had already expired in the fleet (or been reclaimed) when this
    /// call arrived: the units it said it holds are not its own any more and must be
    /// dropped; only `granted` is its lease.
    #[serde(default)]
    pub hold_void: bool,
    /// Redis time of the call.
    pub now_ms: u64,
    pub buckets: Vec<BucketView>,
    pub quotas: Vec<QuotaView>,
    /// Ids of the `doubts` this call settled (all of them when it applied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settled: Vec<u64>,
}

/// Take `cost` units of every limit of a subject at once, or nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeRequest {
    pub subject: String,
    pub cost: u64,
    #[serde(default)]
    pub buckets: Vec<BucketSpec>,
    #[serde(default)]
    pub quotas: Vec<QuotaSpec>,
    /// The calling node and its id for this take (unique per node), so that a take
    /// whose answer is lost can be settled by a later lease call (`TakeDoubt`). Without
    /// them a lost answer cannot be told from a take that never arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeResponse {
    /// The cost was taken from every limit (and counted as consumed).
    pub admitted: bool,
    pub now_ms: u64,
    /// `wait_ms`: until the bucket holds `cost` tokens.
    pub buckets: Vec<BucketView>,
    /// `outstanding` is what nodes hold in leases.
    pub quotas: Vec<QuotaView>,
}

/// Read-only view of a subject's quotas (`POST /v1/peek`), for ops and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeekRequest {
    pub subject: String,
    pub quotas: Vec<QuotaSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeekQuota {
    pub name: String,
    pub period_start: i64,
    pub consumed: u64,
    /// Held units per node id (expired leases included until the next call reclaims them).
    pub holders: std::collections::BTreeMap<String, u64>,
}

/// Node ids: short, safe in a Redis hash field and a log line.
fn valid_node(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

/// Subjects become part of Redis keys inside a `{…}` hash tag: printable ASCII without
/// braces or spaces, so the tag (and hence the Cluster slot) is exactly the subject.
pub fn valid_subject(s: &str) -> bool {
    (1..=200).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_graphic() && c != b'{' && c != b'}')
}

fn check_buckets(buckets: &[BucketSpec]) -> Result<(), String> {
    for (i, b) in buckets.iter().enumerate() {
        if !is_valid_name(&b.name) || buckets[..i].iter().any(|o| o.name == b.name) {
            return Err(format!("buckets[{i}].name: must be unique, 1-64 of A-Z a-z 0-9 _ -"));
        }
        let limit = BucketLimit {
            rate: b.rate,
            interval_ms: b.interval_ms,
            burst: b.burst,
        };
        limit.validate().map_err(|e| format!("buckets[{i}]: {e}"))?;
        // The scripts keep a bucket in units of 1/interval_ms token.
        if u128::from(b.burst) * u128::from(b.interval_ms) >= u128::from(MAX_LUA_INT) {
            return Err(format!("buckets[{i}]: burst x interval_ms must be below 2^53"));
        }
    }
    Ok(())
}

fn check_limits(buckets: &[BucketSpec], quotas: &[QuotaSpec]) -> Result<(), String> {
    let n = buckets.len() + quotas.len();
    if n == 0 || n > MAX_LIMITS {
        return Err(format!("buckets, quotas: 1 to {MAX_LIMITS} limits in all"));
    }
    check_buckets(buckets)?;
    check_quotas(quotas)
}

fn check_quotas(quotas: &[QuotaSpec]) -> Result<(), String> {
    for (i, q) in quotas.iter().enumerate() {
        if !is_valid_name(&q.name) || quotas[..i].iter().any(|o| o.name == q.name) {
            return Err(format!("quotas[{i}].name: must be unique, 1-64 of A-Z a-z 0-9 _ -"));
        }
        if q.limit == 0 || q.limit >= MAX_LUA_INT {
            return Err(format!("quotas[{i}].limit: must be 1 to 2^53 - 1"));
        }
    }
    Ok(())
}

impl LeaseRequest {
    /// Checks everything the script relies on; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_node(&self.node) {
            return Err("node: must be 1-64 of A-Z a-z 0-9 _ - .".into());
        }
        if !valid_subject(&self.subject) {
            return Err("subject: must be 1-200 printable ASCII characters without { } or spaces".into());
        }
        if self.seq == 0 || self.seq >= MAX_LUA_INT {
            return Err("seq: must be 1 to 2^53 - 1".into());
        }
        if !(1..=10_000).contains(&self.fleet_size) {
            return Err("fleet_size: must be 1 to 10000".into());
        }
        if !(1..=MAX_TTL_MS).contains(&self.ttl_ms) {
            return Err(format!("ttl_ms: must be 1 to {MAX_TTL_MS}"));
        }
        for (name, v) in [
            ("want", self.want),
            ("hold", self.hold),
            ("returned", self.returned),
            ("spent_total", self.spent_total),
            ("unreported_max", self.unreported_max.unwrap_or(0)),
        ] {
            if v >= MAX_LUA_INT {
                return Err(format!("{name}: must be below 2^53"));
            }
        }
        if self.doubts.len() > MAX_DOUBTS {
            return Err(format!("doubts: at most {MAX_DOUBTS}"));
        }
        for (i, d) in self.doubts.iter().enumerate() {
            if d.id == 0 || d.id >= MAX_LUA_INT || d.cost == 0 || d.cost >= MAX_LUA_INT {
                return Err(format!("doubts[{i}]: id and cost must be 1 to 2^53 - 1"));
            }
        }
        check_limits(&self.buckets, &self.quotas)
    }
}

impl TakeRequest {
    pub fn validate(&self) -> Result<(), String> {
        if !valid_subject(&self.subject) {
            return Err("subject: must be 1-200 printable ASCII characters without { } or spaces".into());
        }
        if self.cost == 0 || self.cost >= MAX_LUA_INT {
            return Err("cost: must be 1 to 2^53 - 1".into());
        }
        match (&self.node, self.id) {
            (None, None) => {}
            (Some(n), Some(id)) if valid_node(n) && (1..MAX_LUA_INT).contains(&id) => {}
            _ => return Err("node, id: both or neither; node 1-64 of A-Z a-z 0-9 _ - ., id 1 to 2^53 - 1".into()),
        }
        check_limits(&self.buckets, &self.quotas)
    }
}

impl PeekRequest {
    pub fn validate(&self) -> Result<(), String> {
        if !valid_subject(&self.subject) {
            return Err("subject: must be 1-200 printable ASCII characters without { } or spaces".into());
        }
        if self.quotas.is_empty() || self.quotas.len() > MAX_LIMITS {
            return Err(format!("quotas: 1 to {MAX_LIMITS}"));
        }
        check_quotas(&self.quotas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> LeaseRequest {
        serde_json::from_str(
            r#"{"node":"n1","seq":1,"subject":"k:AbC","fleet_size":3,"ttl_ms":1000,"want":5,
                "buckets":[{"name":"s","rate":10,"interval_ms":1000,"burst":20}],
                "quotas":[{"name":"m","period":"month","limit":1000}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn accepts_a_good_request_and_names_the_bad_field() {
        assert_eq!(req().validate(), Ok(()));
        let mut r = req();
        r.subject = "k:{x}".into();
        assert!(r.validate().unwrap_err().starts_with("subject"));
        let mut r = req();
        r.node = "a b".into();
        assert!(r.validate().unwrap_err().starts_with("node"));
        let mut r = req();
        r.seq = 0;
        assert!(r.validate().unwrap_err().starts_with("seq"));
        let mut r = req();
        r.buckets[0].rate = 0;
        assert!(r.validate().unwrap_err().starts_with("buckets[0]"));
        let mut r = req();
        // Valid for the core (one token per ns, so the debt fits) but too fine for Lua.
        r.buckets[0].rate = 1_000_000_000;
        r.buckets[0].burst = 1 << 44;
        assert!(r.validate().unwrap_err().contains("2^53"));
        let mut r = req();
        r.quotas.push(r.quotas[0].clone());
        assert!(r.validate().unwrap_err().starts_with("quotas[1].name"));
        let mut r = req();
        r.buckets.clear();
        r.quotas.clear();
        assert!(r.validate().is_err());
        assert!(
            serde_json::from_str::<LeaseRequest>(r#"{"node":"n","seq":1,"subject":"s","ttl_ms":1,"x":1}"#).is_err()
        );
        let mut r = req();
        r.doubts = vec![TakeDoubt { id: 1, cost: 1 }; MAX_DOUBTS + 1];
        assert!(r.validate().unwrap_err().starts_with("doubts"));
        r.doubts = vec![TakeDoubt { id: 0, cost: 1 }];
        assert!(r.validate().unwrap_err().starts_with("doubts[0]"));
        r.doubts = vec![TakeDoubt { id: 7, cost: 2 }];
        assert_eq!(r.validate(), Ok(()));
    }

    #[test]
    fn doubts_and_take_ids_stay_off_the_wire_when_unused() {
        // A node with nothing in doubt sends what a limitd without doubts accepts.
        let mut r = req();
        assert!(!serde_json::to_string(&r).unwrap().contains("doubts"));
        r.doubts = vec![TakeDoubt { id: 3, cost: 1 }];
        assert!(serde_json::to_string(&r)
            .unwrap()
            .contains(r#""doubts":[{"id":3,"cost":1}]"#));
        let t = TakeRequest {
            subject: "k:a".into(),
            cost: 1,
            buckets: vec![],
            quotas: req().quotas,
            node: None,
            id: None,
        };
        assert_eq!(t.validate(), Ok(()));
        assert!(!serde_json::to_string(&t).unwrap().contains("id"));
        let half = TakeRequest {
            id: Some(5),
            ..t.clone()
        };
        assert!(half.validate().unwrap_err().starts_with("node, id"));
        let both = TakeRequest {
            node: Some("n-1".into()),
            id: Some(5),
            ..t
        };
        assert_eq!(both.validate(), Ok(()));
    }
}

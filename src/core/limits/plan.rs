//! Plans: the rate limits, quotas and request costs a key is sold with.
//!
//! Two forms: `PlanDoc`/`LimitsDoc` are what people write in the key-set JSON (durations
//! as text); `Plan`/`Limits` are the compiled form the filter keeps in shared data and
//! uses per request without parsing anything.

use crate::core::auth::scope::Scope;
use crate::core::limits::quota::Period;
use crate::core::limits::token_bucket::BucketLimit;
use crate::core::time::parse_duration;
use serde::{Deserialize, Serialize};

/// A token bucket as written in a key set: `rate` tokens per `per`, up to `burst`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitDoc {
    pub name: String,
    pub rate: u64,
    /// Duration text, e.g. `1s`, `1m`, `1h`.
    pub per: String,
    /// Capacity; defaults to `rate` (no extra burst).
    pub burst: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaDoc {
    pub name: String,
    pub period: Period,
    pub limit: u64,
}

/// Who shares one set of counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitBy {
    /// Each key (lineage) has its own buckets and quotas.
    #[default]
    Key,
    /// All keys of a consumer draw from the same buckets and quotas.
    Consumer,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostDoc {
    #[serde(default)]
    pub methods: Vec<String>,
    pub path_prefix: String,
    pub cost: u64,
}

/// Limits as written; on a key they replace the plan's lists that are present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsDoc {
    pub rate_limits: Option<Vec<RateLimitDoc>>,
    pub quotas: Option<Vec<QuotaDoc>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanDoc {
    #[serde(default)]
    pub rate_limits: Vec<RateLimitDoc>,
    #[serde(default)]
    pub quotas: Vec<QuotaDoc>,
    #[serde(default)]
    pub limit_by: LimitBy,
    /// First matching entry wins; requests matching none cost `default_cost`.
    #[serde(default)]
    pub costs: Vec<CostDoc>,
    pub default_cost: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedBucket {
    pub name: String,
    pub limit: BucketLimit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedQuota {
    pub name: String,
    pub period: Period,
    pub limit: u64,
}

/// Compiled limits (plan-wide or a key's override).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub rate_limits: Option<Vec<NamedBucket>>,
    pub quotas: Option<Vec<NamedQuota>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub rate_limits: Vec<NamedBucket>,
    pub quotas: Vec<NamedQuota>,
    pub limit_by: LimitBy,
    pub costs: Vec<(Scope, u64)>,
    pub default_cost: u64,
}

impl Plan {
    /// Cost of a request: the first matching route weight, else the default.
    pub fn cost(&self, method: &str, path: &str) -> u64 {
        self.costs
            .iter()
            .find(|(s, _)| s.allows(method, path))
            .map_or(self.default_cost, |(_, c)| *c)
    }
}

/// Names are used in response headers and metric labels: keep them to a safe alphabet.
pub fn is_valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{kind} name '{name}' must be 1-64 characters of A-Z a-z 0-9 _ -"
        ))
    }
}

/// Compiles a list of rate limits; errors name the entry (`rate_limits[i]`).
pub fn compile_rate_limits(docs: &[RateLimitDoc]) -> Result<Vec<NamedBucket>, String> {
    crate::core::caps::check(docs.len(), crate::core::caps::MAX_LIMITS, "rate_limits", "plan")?;
    let mut out: Vec<NamedBucket> = Vec::with_capacity(docs.len());
    for (i, d) in docs.iter().enumerate() {
        let at = |m: String| format!("rate_limits[{i}]: {m}");
        check_name("rate limit", &d.name).map_err(at)?;
        if out.iter().any(|b| b.name == d.name) {
            return Err(at(format!("duplicate name '{}'", d.name)));
        }
        let interval_ms = parse_duration(&d.per).map_err(|e| at(format!("per: {e}")))?;
        let limit = BucketLimit {
            rate: d.rate,
            interval_ms,
            burst: d.burst.unwrap_or(d.rate),
        };
        limit.validate().map_err(|e| at(e.to_string()))?;
        out.push(NamedBucket {
            name: d.name.clone(),
            limit,
        });
    }
    Ok(out)
}

pub fn compile_quotas(docs: &[QuotaDoc]) -> Result<Vec<NamedQuota>, String> {
    crate::core::caps::check(docs.len(), crate::core::caps::MAX_LIMITS, "quotas", "plan")?;
    let mut out: Vec<NamedQuota> = Vec::with_capacity(docs.len());
    for (i, d) in docs.iter().enumerate() {
        let at = |m: String| format!("quotas[{i}]: {m}");
        check_name("quota", &d.name).map_err(at)?;
        if out.iter().any(|q| q.name == d.name) || d.limit == 0 {
            return Err(at(format!("duplicate name '{}' or zero limit", d.name)));
        }
        out.push(NamedQuota {
            name: d.name.clone(),
            period: d.period,
            limit: d.limit,
        });
    }
    Ok(out)
}

impl LimitsDoc {
    pub fn compile(&self) -> Result<Limits, String> {
        Ok(Limits {
            rate_limits: self.rate_limits.as_deref().map(compile_rate_limits).transpose()?,
            quotas: self.quotas.as_deref().map(compile_quotas).transpose()?,
        })
    }
}

impl PlanDoc {
    pub fn compile(&self) -> Result<Plan, String> {
        crate::core::caps::check(self.costs.len(), crate::core::caps::MAX_COSTS, "costs", "plan")?;
        let mut costs = Vec::with_capacity(self.costs.len());
        for (i, c) in self.costs.iter().enumerate() {
            let scope = Scope::new(&c.methods, &c.path_prefix).map_err(|e| format!("costs[{i}]: {e}"))?;
            costs.push((scope, c.cost));
        }
        Ok(Plan {
            rate_limits: compile_rate_limits(&self.rate_limits)?,
            quotas: compile_quotas(&self.quotas)?,
            limit_by: self.limit_by,
            costs,
            default_cost: self.default_cost.unwrap_or(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> PlanDoc {
        serde_json::from_str(
            r#"{"rate_limits":[{"name":"burst","rate":10,"per":"1s","burst":20}],
                "quotas":[{"name":"daily","period":"day","limit":1000}],
                "limit_by":"consumer",
                "costs":[{"methods":["POST"],"path_prefix":"/v1/render","cost":5}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn compiles_and_costs() {
        let p = doc().compile().unwrap();
        assert_eq!(
            p.rate_limits[0].limit,
            BucketLimit {
                rate: 10,
                interval_ms: 1000,
                burst: 20
            }
        );
        assert_eq!(p.quotas[0].period, Period::Day);
        assert_eq!(p.limit_by, LimitBy::Consumer);
        assert_eq!(p.cost("POST", "/v1/render/x"), 5);
        assert_eq!(p.cost("GET", "/v1/render/x"), 1);
    }

    #[test]
    fn errors_name_the_entry() {
        let mut d = doc();
        d.rate_limits[0].per = "soon".into();
        assert!(d.compile().unwrap_err().starts_with("rate_limits[0]: per:"));
        let mut d = doc();
        d.quotas.push(d.quotas[0].clone());
        assert!(d.compile().unwrap_err().starts_with("quotas[1]"));
        assert!(serde_json::from_str::<PlanDoc>(r#"{"rate_limit":[]}"#).is_err());
    }
}

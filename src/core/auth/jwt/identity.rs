//! Who a verified JWT is: its consumer and plan, from the configured claims.
//!
//! The token itself was verified by Envoy's jwt_authn (signature, issuer, audience,
//! expiry); keymeter only maps claims onto its own model, so a JWT user is limited and
//! metered like the API keys of the same consumer.

use super::config::JwtConfig;
use super::metadata::{Claim, Payload};
use crate::core::limits::plan::{is_valid_name, LimitBy};

/// Usage and limit state of JWT users live under this lineage prefix. Key lineages are
/// 12 base62 characters and the anonymous plan's is `anonymous`, so `jwt-<consumer>`
/// can never collide with either.
pub const LINEAGE_PREFIX: &str = "jwt-";

/// The identity a verified token maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtIdentity {
    pub consumer: String,
    pub plan: String,
}

impl JwtIdentity {
    /// The usage lineage of this consumer's JWT requests (one per consumer).
    pub fn lineage(&self) -> String {
        format!("{LINEAGE_PREFIX}{}", self.consumer)
    }

    /// The limit state this user draws from under a plan's `limit_by`: its own per
    /// consumer (`limit_by: key`, apart from the consumer's API keys), or the state the
    /// consumer's keys share (`limit_by: consumer`).
    pub fn state_key(&self, limit_by: LimitBy) -> String {
        match limit_by {
            LimitBy::Key => format!("km/rl/j/{}", self.consumer),
            LimitBy::Consumer => format!("km/rl/c/{}", self.consumer),
        }
    }
}

/// Why a verified token cannot be used (403: the caller is known, but keymeter cannot
/// give it an identity or a plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtRefusal {
    /// The consumer claim is absent, not a string, or not a valid consumer name.
    UnusableIdentity,
    /// The plan claim names no plan in the key set and there is no usable default plan.
    UnknownPlan,
}

/// Maps a verified payload to an identity. `plan_exists` asks the loaded key set.
///
/// Plan order: the plan claim if it names a plan in the key set, else `default_plan` if
/// it is in the key set, else `UnknownPlan`. A payload that cannot be decoded is treated
/// as an unusable identity.
pub fn identify(
    cfg: &JwtConfig,
    payload: &Payload<'_>,
    plan_exists: impl Fn(&str) -> bool,
) -> Result<JwtIdentity, JwtRefusal> {
    let consumer = match payload.claim(&cfg.consumer_claim) {
        Ok(Claim::String(s)) if is_valid_name(s) => s,
        _ => return Err(JwtRefusal::UnusableIdentity),
    };
    let claimed = match &cfg.plan_claim {
        Some(name) => match payload.claim(name) {
            Ok(Claim::String(p)) if is_valid_name(p) && plan_exists(p) => Some(p),
            _ => None,
        },
        None => None,
    };
    let plan = match claimed {
        Some(p) => p,
        None => match cfg.default_plan.as_deref() {
            Some(p) if plan_exists(p) => p,
            _ => return Err(JwtRefusal::UnknownPlan),
        },
    };
    Ok(JwtIdentity {
        consumer: consumer.to_string(),
        plan: plan.to_string(),
    })
}

/// Whether a usage lineage belongs to JWT users (for the `credential` label and field).
pub fn is_jwt_lineage(lineage: &str) -> bool {
    lineage.starts_with(LINEAGE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::super::metadata::encode::metadata;
    use super::*;
    use serde_json::{json, Value};

    const NS: &str = "envoy.filters.http.jwt_authn";

    fn cfg(plan_claim: Option<&str>, default_plan: Option<&str>) -> JwtConfig {
        JwtConfig {
            metadata_namespace: NS.into(),
            payload_key: "p".into(),
            consumer_claim: "sub".into(),
            plan_claim: plan_claim.map(Into::into),
            default_plan: default_plan.map(Into::into),
            key_wins: true,
        }
    }

    fn run(cfg: &JwtConfig, claims: Value) -> Result<JwtIdentity, JwtRefusal> {
        let bytes = metadata(NS, "p", &claims);
        let payload = Payload::find(&bytes, NS, "p").unwrap().unwrap();
        identify(cfg, &payload, |p| ["free", "pro"].contains(&p))
    }

    fn id(consumer: &str, plan: &str) -> Result<JwtIdentity, JwtRefusal> {
        Ok(JwtIdentity {
            consumer: consumer.into(),
            plan: plan.into(),
        })
    }

    #[test]
    fn plan_from_claim_when_the_key_set_has_it() {
        let c = cfg(Some("plan"), Some("free"));
        assert_eq!(run(&c, json!({"sub": "acme", "plan": "pro"})), id("acme", "pro"));
        assert_eq!(run(&c, json!({"sub": "acme", "plan": "gold"})), id("acme", "free"));
        assert_eq!(run(&c, json!({"sub": "acme"})), id("acme", "free"));
        assert_eq!(run(&c, json!({"sub": "acme", "plan": 3})), id("acme", "free"));
        assert_eq!(run(&c, json!({"sub": "acme", "plan": "a b"})), id("acme", "free"));
    }

    #[test]
    fn unknown_plan_without_a_usable_default_is_refused() {
        let c = cfg(Some("plan"), None);
        assert_eq!(
            run(&c, json!({"sub": "acme", "plan": "gold"})),
            Err(JwtRefusal::UnknownPlan)
        );
        assert_eq!(run(&c, json!({"sub": "acme"})), Err(JwtRefusal::UnknownPlan));
        // A default plan that the key set no longer has is no plan either.
        let c = cfg(Some("plan"), Some("retired"));
        assert_eq!(
            run(&c, json!({"sub": "acme", "plan": "gold"})),
            Err(JwtRefusal::UnknownPlan)
        );
        let c = cfg(None, Some("pro"));
        assert_eq!(run(&c, json!({"sub": "acme", "plan": "free"})), id("acme", "pro"));
    }

    #[test]
    fn consumer_claim_must_be_a_string_name() {
        let c = cfg(None, Some("free"));
        assert_eq!(run(&c, json!({"sub": "Zx-9_a"})), id("Zx-9_a", "free"));
        for bad in [
            json!({}),
            json!({"sub": 12345678}),
            json!({"sub": true}),
            json!({"sub": {"a": "b"}}),
            json!({"sub": ["acme"]}),
            json!({"sub": ""}),
            json!({"sub": "auth0|123"}),
            json!({"sub": "a.b"}),
            json!({"sub": "x".repeat(65)}),
        ] {
            assert_eq!(run(&c, bad.clone()), Err(JwtRefusal::UnusableIdentity), "{bad}");
        }
        let mut custom = cfg(None, Some("free"));
        custom.consumer_claim = "custom:tenant".into();
        assert_eq!(
            run(&custom, json!({"sub": "u1", "custom:tenant": "acme"})),
            id("acme", "free")
        );
    }

    #[test]
    fn lineages_are_apart_from_keys_and_anonymous() {
        let i = JwtIdentity {
            consumer: "acme".into(),
            plan: "free".into(),
        };
        assert_eq!(i.lineage(), "jwt-acme");
        // Shared with the consumer's keys only when the plan says so (keys use
        // km/rl/k/<lineage> and km/rl/c/<consumer>).
        assert_eq!(i.state_key(LimitBy::Consumer), "km/rl/c/acme");
        assert_eq!(i.state_key(LimitBy::Key), "km/rl/j/acme");
        assert!(is_jwt_lineage("jwt-acme"));
        assert!(!is_jwt_lineage("Zz0000000001"));
        assert!(!is_jwt_lineage("anonymous"));
    }
}

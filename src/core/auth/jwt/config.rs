//! The `jwt` section of the plugin configuration: where the verified payload is and how
//! its claims map to a consumer and a plan. Off unless present.

use crate::core::limits::plan::is_valid_name;
use serde::Deserialize;

/// jwt_authn's filter name: the namespace it writes `payload_in_metadata` under.
pub const DEFAULT_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

fn d_namespace() -> String {
    DEFAULT_NAMESPACE.into()
}
fn d_sub() -> String {
    "sub".into()
}
fn d_true() -> bool {
    true
}

/// `jwt` as written in the plugin configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtDoc {
    #[serde(default = "d_namespace")]
    metadata_namespace: String,
    payload_key: String,
    #[serde(default = "d_sub")]
    consumer_claim: String,
    #[serde(default)]
    plan_claim: Option<String>,
    #[serde(default)]
    default_plan: Option<String>,
    #[serde(default = "d_true")]
    key_wins: bool,
}

/// The validated `jwt` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// Dynamic-metadata namespace jwt_authn writes to (its filter name).
    pub metadata_namespace: String,
    /// The provider's `payload_in_metadata` value.
    pub payload_key: String,
    /// Top-level claim naming the consumer (`sub` by default).
    pub consumer_claim: String,
    /// Top-level claim naming the plan, if tokens carry one.
    pub plan_claim: Option<String>,
    /// Plan for tokens whose plan claim is absent or names no plan in the key set.
    pub default_plan: Option<String>,
    /// With both an API key and a verified JWT on a request, the key decides (default);
    /// `false`: the JWT decides and the key is not looked at.
    pub key_wins: bool,
}

impl JwtDoc {
    pub fn validate(&self) -> Result<JwtConfig, String> {
        let field = |f: &str, m: &str| Err(format!("invalid plugin configuration: jwt.{f}: {m}"));
        // Metadata keys are arbitrary strings to Envoy; keep them printable and bounded so
        // a typo shows up in the error message as written.
        let printable = |s: &str| (1..=256).contains(&s.len()) && s.bytes().all(|b| (0x21..0x7f).contains(&b));
        if !printable(&self.metadata_namespace) {
            return field(
                "metadata_namespace",
                "must be 1-256 printable ASCII characters without spaces",
            );
        }
        if !printable(&self.payload_key) {
            return field(
                "payload_key",
                "must be the provider's payload_in_metadata name (1-256 printable ASCII characters)",
            );
        }
        if !printable(&self.consumer_claim) {
            return field(
                "consumer_claim",
                "must be a claim name (1-256 printable ASCII characters)",
            );
        }
        if let Some(c) = &self.plan_claim {
            if !printable(c) {
                return field("plan_claim", "must be a claim name (1-256 printable ASCII characters)");
            }
        }
        if let Some(p) = &self.default_plan {
            if !is_valid_name(p) {
                return field("default_plan", "must be a plan name (A-Z a-z 0-9 _ -)");
            }
        }
        if self.plan_claim.is_none() && self.default_plan.is_none() {
            return field(
                "default_plan",
                "is required when there is no plan_claim (every JWT user needs a plan)",
            );
        }
        Ok(JwtConfig {
            metadata_namespace: self.metadata_namespace.clone(),
            payload_key: self.payload_key.clone(),
            consumer_claim: self.consumer_claim.clone(),
            plan_claim: self.plan_claim.clone(),
            default_plan: self.default_plan.clone(),
            key_wins: self.key_wins,
        })
    }
}

//! What the request decision tells the adapter to do.

use crate::core::auth::jwt::identity::JwtIdentity;
use crate::core::auth::key_record::KeyRecord;
use crate::core::auth::problem::Problem;
use crate::core::config::{Config, IdentityField};
use crate::core::limits::fleet::FleetVerdict;
use crate::core::limits::limiter::Denial;
use crate::core::limits::plan::{NamedBucket, NamedQuota};
use crate::core::metering::credential;
use crate::core::metering::usage::Outcome;
use std::rc::Rc;

/// Who a request is charged to (usage, limits): an authentic key, the anonymous plan,
/// or nobody (refused before a key was authentic, or let through by fail-open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Nobody,
    Key(Rc<KeyRecord>),
    /// Anonymous access under this plan.
    Anonymous(String),
    /// A user with a JWT verified by Envoy's jwt_authn (see `core::auth::jwt`), and
    /// its usage lineage (`jwt-<consumer>`).
    Jwt {
        identity: JwtIdentity,
        lineage: String,
    },
}

/// Reasons a request had no authentic key; counted globally, not per key (anyone can
/// send any key id, so these must not be charged to the id's owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unauthenticated {
    Missing,
    Malformed,
    Invalid,
    KeySetUnavailable,
    /// Let through unauthenticated because no key set is loaded (`when_no_keyset: allow`).
    FailOpen,
    /// Refused because keymeter could not decide: the host clock failed, or the key's
    /// plan is missing from the key set (fail closed, 503).
    Unavailable,
    /// A verified JWT whose consumer claim is unusable (nobody to charge).
    TokenIdentityUnusable,
    /// A verified JWT with no plan in the key set (no plan to count under).
    TokenPlanUnknown,
}

impl Unauthenticated {
    pub const ALL: [Unauthenticated; 8] = [
        Self::Missing,
        Self::Malformed,
        Self::Invalid,
        Self::KeySetUnavailable,
        Self::FailOpen,
        Self::Unavailable,
        Self::TokenIdentityUnusable,
        Self::TokenPlanUnknown,
    ];
    /// The `reason` label of `keymeter_unauthenticated_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing_credential",
            Self::Malformed => "malformed_credential",
            Self::Invalid => "invalid_credential",
            Self::KeySetUnavailable => "keyset_unavailable",
            Self::FailOpen => "fail_open",
            Self::Unavailable => "unavailable",
            Self::TokenIdentityUnusable => "token_identity_unusable",
            Self::TokenPlanUnknown => "token_plan_unknown",
        }
    }
}

/// A refusal: the adapter sends the problem as a local reply with [`Decision::refusal_headers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub problem: Problem,
    /// `Retry-After` seconds (rate limits, quotas, contention).
    pub retry_after_secs: Option<u64>,
}

/// Where the credential came from, so an admitted request forwards without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strip {
    /// Remove the configured API-key header.
    ApiKeyHeader,
    /// Remove `Authorization`.
    Authorization,
    /// Replace `:path` with this one (the query parameter removed).
    Path(String),
}

/// Fleet mode: the limits of an otherwise admitted request, left to the node's lease
/// (`core::limits::fleet::decide` in the adapter, which may pause for a take).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetLimits {
    /// `k:<lineage>`, `c:<consumer>` or `ip:<addr>`.
    pub subject: String,
    pub buckets: Vec<NamedBucket>,
    pub quotas: Vec<NamedQuota>,
    pub now_ms: u64,
}

/// The outcome of [`super::decide`] for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub caller: Caller,
    /// `Some`: send this refusal; `None`: forward the request.
    pub refused: Option<Refused>,
    /// How the request ended for its caller (usage counters).
    pub outcome: Outcome,
    /// Why the request had no authentic key, if so (global counter).
    pub unauthenticated: Option<Unauthenticated>,
    /// Cost units charged by the limits (0 when no limit applied).
    pub cost: u64,
    /// Credential to strip before forwarding (admitted requests only).
    pub strip: Option<Strip>,
    /// `RateLimit-Policy` and `RateLimit` values: on the refusal, or on the upstream's
    /// response when admitted.
    pub ratelimit: Option<(String, String)>,
    /// The limit state stayed contended through every CAS retry (counted and logged).
    pub contended: bool,
    /// Fleet mode: limits still to decide from the node's lease (`None` when decided).
    pub fleet: Option<FleetLimits>,
}

impl Decision {
    pub(super) fn new(caller: Caller) -> Self {
        Decision {
            caller,
            refused: None,
            outcome: Outcome::Admitted,
            unauthenticated: None,
            cost: 0,
            strip: None,
            ratelimit: None,
            contended: false,
            fleet: None,
        }
    }

    /// Applies the fleet's verdict on this request's limits (`FleetLimits`): a denial
    /// becomes the same refusal a single-node limit gives. (The adapter sets the
    /// `RateLimit` fields, the node's view: `core::limits::fleet_view`.)
    pub fn apply_fleet(&mut self, v: &FleetVerdict) {
        self.fleet = None;
        let Some(denial) = v.denial else { return };
        let (outcome, problem) = match denial {
            Denial::QuotaExceeded => (Outcome::QuotaExceeded, Problem::QuotaExceeded),
            Denial::CostExceedsBurst => (Outcome::RateLimited, Problem::CostExceedsBurst),
            Denial::RateLimited => (Outcome::RateLimited, Problem::RateLimited),
        };
        self.outcome = outcome;
        self.refused = Some(Refused {
            problem,
            retry_after_secs: v.retry_after_secs,
        });
    }

    pub(super) fn refuse(mut self, problem: Problem, retry_after_secs: Option<u64>) -> Self {
        self.refused = Some(Refused {
            problem,
            retry_after_secs,
        });
        self
    }

    pub(super) fn unauthenticated(why: Unauthenticated, problem: Problem) -> Self {
        let mut d = Decision::new(Caller::Nobody).refuse(problem, None);
        d.unauthenticated = Some(why);
        d
    }

    /// Whether usage is counted for this request's caller.
    pub fn is_charged(&self) -> bool {
        self.caller != Caller::Nobody
    }

    /// Request headers to set (`Some`) or remove (`None`) before forwarding: the identity
    /// headers, always written so a client can never pass its own through, then the
    /// credential when it is stripped. Nothing when refused. Each call is one host call.
    pub fn for_each_request_header(&self, cfg: &Config, mut f: impl FnMut(&str, Option<&str>)) {
        if self.refused.is_some() {
            return;
        }
        let h = &cfg.headers;
        let (rec, consumer, plan, auth) = match &self.caller {
            Caller::Key(r) => (
                Some(&**r),
                Some(r.consumer.as_str()),
                Some(r.plan.as_str()),
                Some(credential::API_KEY),
            ),
            Caller::Anonymous(p) => (None, Some("anonymous"), Some(p.as_str()), Some(credential::ANONYMOUS)),
            Caller::Jwt { identity, .. } => (
                None,
                Some(identity.consumer.as_str()),
                Some(identity.plan.as_str()),
                Some(credential::JWT),
            ),
            Caller::Nobody => (None, None, None, None),
        };
        if h.forwards(IdentityField::KeyId) {
            f(&h.key_id, rec.map(|r| r.id.as_str()));
        }
        if h.forwards(IdentityField::Consumer) {
            f(&h.consumer, consumer);
        }
        if h.forwards(IdentityField::Plan) {
            f(&h.plan, plan);
        }
        if h.forwards(IdentityField::Auth) {
            f(&h.auth, auth);
        }
        for (name, header) in &cfg.forward_metadata {
            f(header, rec.and_then(|r| r.metadata(name)));
        }
        match &self.strip {
            None => {}
            Some(Strip::ApiKeyHeader) => f(cfg.sources.header.as_deref().unwrap_or("x-api-key"), None),
            Some(Strip::Authorization) => f("authorization", None),
            Some(Strip::Path(p)) => f(":path", Some(p)),
        }
    }

    /// Headers of the local reply for a refusal (one host call sends them all).
    /// `retry_after` is the caller's buffer for the `Retry-After` value.
    pub fn refusal_headers<'a>(
        &'a self,
        challenges: &'a [String],
        retry_after: &'a mut String,
    ) -> Vec<(&'a str, &'a str)> {
        let mut out = vec![
            ("content-type", "application/problem+json"),
            ("cache-control", "no-store"),
        ];
        let Some(r) = &self.refused else {
            return out;
        };
        if r.problem.status() == 401 {
            out.extend(challenges.iter().map(|c| ("www-authenticate", c.as_str())));
        }
        if let Some(s) = r.retry_after_secs {
            *retry_after = s.to_string();
            out.push(("retry-after", retry_after.as_str()));
        }
        if let Some((p, s)) = &self.ratelimit {
            out.push(("ratelimit-policy", p.as_str()));
            out.push(("ratelimit", s.as_str()));
        }
        out
    }

    /// Whether the upstream's `:status` must be read (one host call): only for usage
    /// counting of a forwarded request (a refusal knows its own status).
    pub fn reads_response_status(&self, metering_enabled: bool) -> bool {
        metering_enabled && self.refused.is_none() && self.is_charged()
    }

    /// Response headers to add to the upstream's answer (admitted requests only): the
    /// `RateLimit` fields. Each is one host call.
    pub fn response_headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let fields = match (&self.refused, &self.ratelimit) {
            (None, Some((p, s))) => [Some(("ratelimit-policy", p.as_str())), Some(("ratelimit", s.as_str()))],
            _ => [None, None],
        };
        fields.into_iter().flatten()
    }
}

//! The request decision for a JWT user: consumer and plan from the claims Envoy's
//! jwt_authn verified, then the plan's limits like any API key of that consumer.
//! `decide` comes here only when no API key decides (see `core::auth::jwt::order`).

use super::decide::{clock_failed, enforce, Target};
use super::decision::{Caller, Decision, Strip, Unauthenticated};
use super::fetch::Fetch;
use crate::core::auth::jwt::config::JwtConfig;
use crate::core::auth::jwt::identity::{identify, JwtRefusal};
use crate::core::auth::jwt::metadata::Payload;
use crate::core::auth::path::for_rules;
use crate::core::auth::problem::Problem;
use crate::core::config::Config;
use crate::core::keyset::meta::Meta;
use crate::core::limits::worker_lease::WorkerLeases;
use crate::core::metering::usage::Outcome;
use crate::core::store::Store;

/// The dynamic metadata when it holds a verified payload for `jwt`, else `None`: one
/// host read. Metadata that is not a well-formed payload is treated as no token (fail
/// closed: the request then needs an API key).
pub(super) fn verified_metadata(jwt: &JwtConfig, host: &mut impl Fetch) -> Option<Vec<u8>> {
    let bytes = host.dynamic_metadata()?;
    match Payload::find(&bytes, &jwt.metadata_namespace, &jwt.payload_key) {
        Ok(Some(_)) => Some(bytes),
        Ok(None) => None,
        Err(_) => {
            log::warn!(
                "keymeter: dynamic metadata under '{}' holds no well-formed JWT payload; ignoring it",
                jwt.metadata_namespace
            );
            None
        }
    }
}

/// Decides a request whose verified JWT is the deciding credential. Host reads: the
/// plans (cached), `:method` and `:path` only when the plan has route costs, then the
/// limit state through `store`. `now` is the clock `decide` read first.
#[allow(clippy::too_many_arguments)]
pub(super) fn decide_jwt(
    cfg: &Config,
    jwt: &JwtConfig,
    host: &mut impl Fetch,
    store: &dyn Store,
    leases: &mut WorkerLeases,
    meta: &Meta,
    metadata: &[u8],
    now: Option<u64>,
) -> Decision {
    let plans = host.plans(meta);
    let identity = match Payload::find(metadata, &jwt.metadata_namespace, &jwt.payload_key) {
        Ok(Some(payload)) => identify(jwt, &payload, |p| plans.contains_key(p)),
        _ => Err(JwtRefusal::UnusableIdentity),
    };
    let (identity, plan) = match identity {
        Ok(id) => match plans.get(&id.plan) {
            Some(plan) => (id, plan),
            None => return Decision::unauthenticated(Unauthenticated::TokenPlanUnknown, Problem::TokenPlanUnknown),
        },
        Err(JwtRefusal::UnusableIdentity) => {
            return Decision::unauthenticated(Unauthenticated::TokenIdentityUnusable, Problem::TokenIdentityUnusable)
        }
        Err(JwtRefusal::UnknownPlan) => {
            return Decision::unauthenticated(Unauthenticated::TokenPlanUnknown, Problem::TokenPlanUnknown)
        }
    };
    let state_key = identity.state_key(plan.limit_by);
    let lineage = identity.lineage();
    // From here on the user is known: everything is counted under its lineage.
    let mut d = Decision::new(Caller::Jwt { identity, lineage });
    let has_rules = !plan.costs.is_empty();
    let (mut method, mut raw_path) = (String::new(), String::new());
    if has_rules {
        method = host.method().unwrap_or_default();
        raw_path = host.path().unwrap_or_default();
    }
    let Ok(path) = for_rules(&raw_path, has_rules) else {
        d.outcome = Outcome::Forbidden;
        return d.refuse(Problem::AmbiguousPath, None);
    };
    let Some(now_ms) = now else {
        return clock_failed();
    };
    d = enforce(
        cfg,
        store,
        leases,
        d,
        Target::Entry(&state_key),
        plan,
        None,
        &method,
        &path,
        now_ms,
    );
    if d.refused.is_some() {
        return d;
    }
    // With `key_wins: false` an API key may have come along, never looked at: the
    // backend has no use for that secret.
    if !jwt.key_wins && !cfg.keep_credential && cfg.sources.header.is_some() {
        d.strip = Some(Strip::ApiKeyHeader);
    }
    d
}

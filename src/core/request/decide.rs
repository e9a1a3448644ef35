//! Authentication order, authorization, state-key naming and limit application for one
//! request.

use super::decision::{Caller, Decision, FleetLimits, Strip, Unauthenticated};
use super::fetch::Fetch;
use super::key_cache::KeyCache;
use crate::core::auth::api_key::hashes_equal;
use crate::core::auth::cidr::limit_subject;
use crate::core::auth::credential::{self, CredentialError, Field, Source};
use crate::core::auth::jwt::order::{self, Which};
use crate::core::auth::key_record::{stored_hash, KeyRecord, Refusal};
use crate::core::auth::path;
use crate::core::auth::problem::Problem;
use crate::core::config::{Config, NoKeySet, OnContention};
use crate::core::keyset::entry::KeyEntry;
use crate::core::keyset::meta::Meta;
use crate::core::limits::fleet::entry_key as fleet_entry_key;
use crate::core::limits::limiter::{self, Denial, LimitOutcome};
use crate::core::limits::plan::{LimitBy, Plan};
use crate::core::limits::subject_table::{self, ANONYMOUS_SLOTS};
use crate::core::limits::worker_lease::WorkerLeases;
use crate::core::metering::usage::Outcome;
use crate::core::store::Store;
use std::rc::Rc;

/// Decides one request. Host reads happen in this order, each only when needed: the
/// clock; `km/meta` only when this worker's copy of it (in `cache`, see
/// `super::meta_copy`) is older than `STALE_MS`; the credential sources in
/// `credential::find` order (with a `jwt` config: the dynamic metadata when no key
/// decides, or first when `key_wins` is off, see `core::auth::jwt::order`; a JWT user
/// continues in `super::jwt`); the key entry unless `cache` holds the key under this
/// `km/meta` (on a miss, `km/meta` again and, if the generation moved, the entry once
/// more); `:method` and `:path` only for scopes or route costs; the peer address only
/// for CIDRs; then the limit state through `store`, unless this worker's lease on it
/// (`leases`, see `core::limits::worker_lease`) covers the request.
pub fn decide<H: Fetch>(
    cfg: &Config,
    cache: &mut KeyCache,
    leases: &mut WorkerLeases,
    host: &mut H,
    store: &dyn Store,
) -> Decision {
    if let Some(d) = decide_once(cfg, cache, leases, host, store) {
        return d;
    }
    // The copy of `km/meta` named a generation whose plans are gone (two full pushes
    // within the staleness bound): nothing was written yet, decide again from an inline
    // read. That read is fresh, so this never repeats.
    cache.meta.invalidate();
    decide_once(cfg, cache, leases, host, store)
        .unwrap_or_else(|| Decision::unauthenticated(Unauthenticated::Unavailable, Problem::Unavailable))
}

/// `decide`, or `None` when a copy of `km/meta` turned out to be too old to decide with.
fn decide_once<H: Fetch>(
    cfg: &Config,
    cache: &mut KeyCache,
    leases: &mut WorkerLeases,
    host: &mut H,
    store: &dyn Store,
) -> Option<Decision> {
    // The clock first: it says whether this worker's copy of `km/meta` may be used
    // (and every later use of the time takes this reading).
    let now = host.now_ms();
    let copy = now.and_then(|t| cache.meta.fresh(t));
    let from_copy = copy.is_some();
    let read = copy.unwrap_or_else(|| {
        let read = host.meta();
        if let Some(t) = now {
            cache.meta.store(read, t);
        }
        read
    });
    let Some((meta, meta_cas)) = read else {
        return Some(match cfg.when_no_keyset {
            NoKeySet::Deny => Decision::unauthenticated(Unauthenticated::KeySetUnavailable, Problem::KeySetUnavailable),
            NoKeySet::Allow => {
                let mut d = Decision::new(Caller::Nobody);
                d.unauthenticated = Some(Unauthenticated::FailOpen);
                d
            }
        });
    };
    // Plans come back empty when they are not of `meta`'s generation (or the set has
    // none): with a copy, its slot may have been reused by a later push. Then decide
    // again from a fresh read (a set without plans admits nobody either way).
    let copy_outdated = |host: &mut H, meta: &Meta| from_copy && host.plans(meta).is_empty();
    let mut path: Option<String> = None;
    let mut jwt_metadata: Option<Vec<u8>> = None;
    let find_key = |host: &mut H| {
        credential::find(&cfg.sources, |f| match f {
            Field::ApiKeyHeader => host.api_key_header(cfg.sources.header.as_deref()?),
            Field::Authorization => host.authorization(),
            Field::Path => {
                path = host.path();
                path.clone()
            }
        })
    };
    // Without a `jwt` config there is never a token: the API-key path exactly as before.
    let which = match &cfg.jwt {
        None => order::choose(true, host, find_key, |_| false),
        Some(j) => order::choose(j.key_wins, host, find_key, |host| {
            jwt_metadata = super::jwt::verified_metadata(j, host);
            jwt_metadata.is_some()
        }),
    };
    let cred = match which {
        Which::Key(c) => c,
        Which::Jwt => {
            let (Some(j), Some(metadata)) = (&cfg.jwt, &jwt_metadata) else {
                return Some(Decision::unauthenticated(
                    Unauthenticated::Missing,
                    Problem::MissingCredential,
                ));
            };
            if copy_outdated(host, &meta) {
                return None;
            }
            return Some(super::jwt::decide_jwt(
                cfg, j, host, store, leases, &meta, metadata, now,
            ));
        }
        Which::Neither(CredentialError::Missing) => {
            return match &cfg.anonymous_plan {
                Some(_) if copy_outdated(host, &meta) => None,
                Some(plan) => Some(anonymous(cfg, host, store, leases, &meta, plan, now)),
                None => Some(Decision::unauthenticated(
                    Unauthenticated::Missing,
                    Problem::MissingCredential,
                )),
            }
        }
        Which::Neither(CredentialError::Malformed(_) | CredentialError::BadChecksum(_)) => {
            return Some(Decision::unauthenticated(
                Unauthenticated::Malformed,
                Problem::MalformedCredential,
            ))
        }
    };
    let key = cred.key();
    let (mut meta, mut meta_cas, mut meta_is_copy) = (meta, meta_cas, from_copy);
    let cached = now.and_then(|t| cache.get(meta_cas, key.id(), t));
    let from_cache = cached.is_some();
    let mut rec = cached.or_else(|| active_record(host, &meta, key.id()));
    if rec.is_none() {
        // A full push may have flipped the generation and swept the slot we were about
        // to read since `km/meta` was read (by this request, or by the worker's copy):
        // re-read it, and retry once if it moved (a real miss costs one more read, a
        // race or an old copy no spurious 401).
        let fresh = host.meta();
        if let Some(t) = now {
            cache.meta.store(fresh, t);
        }
        if let Some((m, cas)) = fresh.filter(|(m, _)| m.gen != meta.gen) {
            (meta, meta_cas, meta_is_copy) = (m, cas, false);
            rec = active_record(host, &meta, key.id());
        }
    }
    let Some(rec) = rec else {
        return Some(Decision::unauthenticated(
            Unauthenticated::Invalid,
            Problem::InvalidCredential,
        ));
    };
    if !hashes_equal(&stored_hash(&key.hash()), &rec.hash) {
        return Some(Decision::unauthenticated(
            Unauthenticated::Invalid,
            Problem::InvalidCredential,
        ));
    }
    if meta_is_copy && copy_outdated(host, &meta) {
        return None;
    }
    // From here on the key is authentic: everything is counted against it.
    let mut d = Decision::new(Caller::Key(rec.clone()));
    let plans = host.plans(&meta);
    let Some(plan) = plans.get(&rec.plan) else {
        // Validation refuses such key sets; should one still be running, the key must
        // not be unlimited.
        log::warn!(
            "keymeter: plan '{}' of key {} is not in the key set; refusing",
            rec.plan,
            rec.id
        );
        return Some(Decision::unauthenticated(
            Unauthenticated::Unavailable,
            Problem::Unavailable,
        ));
    };
    // Method and path only matter for scopes and route costs: skip the two host calls
    // when the key has neither (the common case).
    let mut method = String::new();
    if !rec.scopes.is_empty() || !plan.costs.is_empty() {
        method = host.method().unwrap_or_default();
        if path.is_none() {
            path = host.path();
        }
    }
    // Scopes and route costs match the canonical path; forms backends disagree on are
    // refused (see `core::auth::path`).
    let has_rules = !rec.scopes.is_empty() || !plan.costs.is_empty();
    let Ok(path_str) = path::for_rules(path.as_deref().unwrap_or("/"), has_rules) else {
        d.outcome = Outcome::Forbidden;
        return Some(d.refuse(Problem::AmbiguousPath, None));
    };
    let path_str: &str = &path_str;
    let peer = if rec.cidrs.is_empty() { None } else { host.peer_ip() };
    let Some(now_ms) = now else {
        return Some(clock_failed());
    };
    if !from_cache {
        cache.insert(meta_cas, rec.clone(), now_ms);
    }
    if let Err(r) = rec.admit((now_ms / 1000) as i64, &method, path_str, peer) {
        d.outcome = match r {
            Refusal::OutOfScope | Refusal::AddressNotAllowed => Outcome::Forbidden,
            _ => Outcome::Unauthorized,
        };
        let problem = match r {
            Refusal::Disabled => Problem::KeyDisabled,
            Refusal::NotYetValid => Problem::KeyNotYetValid,
            Refusal::Expired => Problem::KeyExpired,
            Refusal::OutOfScope => Problem::OutOfScope,
            Refusal::AddressNotAllowed => Problem::AddressNotAllowed,
        };
        return Some(d.refuse(problem, None));
    }
    let state_key = match plan.limit_by {
        LimitBy::Key => format!("km/rl/k/{}", rec.lineage()),
        LimitBy::Consumer => format!("km/rl/c/{}", rec.consumer),
    };
    d = enforce(
        cfg,
        store,
        leases,
        d,
        Target::Entry(&state_key),
        plan,
        Some(&rec),
        &method,
        path_str,
        now_ms,
    );
    if d.refused.is_some() {
        return Some(d);
    }
    if !cfg.keep_credential {
        d.strip = match cred.source {
            Source::Header => Some(Strip::ApiKeyHeader),
            Source::Bearer | Source::Basic => Some(Strip::Authorization),
            Source::Query => match (&path, &cfg.sources.query_param) {
                (Some(p), Some(name)) => Some(Strip::Path(credential::strip_query_param(p, name))),
                _ => None,
            },
        };
    }
    Some(d)
}

/// Without a clock, expiry, not-before and every limit are unknowable: fail closed
/// (time 0 would silently admit expired keys).
pub(super) fn clock_failed() -> Decision {
    log::warn!("keymeter: the host clock failed; refusing");
    Decision::unauthenticated(Unauthenticated::Unavailable, Problem::Unavailable)
}

/// The record of key `id` visible under `meta`, if any.
fn active_record(host: &mut impl Fetch, meta: &Meta, id: &str) -> Option<Rc<KeyRecord>> {
    host.key_entry(id)
        .filter(|b| !b.is_empty())
        .and_then(|b| KeyEntry::decode(&b, id))
        .and_then(|e| e.into_active(meta))
        .map(Rc::new)
}

/// A request without a credential under `anonymous_plan`: limited per client address.
fn anonymous(
    cfg: &Config,
    host: &mut impl Fetch,
    store: &dyn Store,
    leases: &mut WorkerLeases,
    meta: &Meta,
    plan_name: &str,
    now: Option<u64>,
) -> Decision {
    let plans = host.plans(meta);
    let Some(plan) = plans.get(plan_name) else {
        log::warn!("keymeter: anonymous plan '{plan_name}' is not in the key set; refusing");
        return Decision::new(Caller::Nobody).refuse(Problem::MissingCredential, None);
    };
    let Some(ip) = host.peer_ip() else {
        return Decision::new(Caller::Nobody).refuse(Problem::MissingCredential, None);
    };
    let subject = limit_subject(ip).to_string();
    let method = host.method().unwrap_or_default();
    let raw_path = host.path().unwrap_or_default();
    let mut d = Decision::new(Caller::Anonymous(plan_name.to_string()));
    let Ok(path) = path::for_rules(&raw_path, !plan.costs.is_empty()) else {
        d.outcome = Outcome::Forbidden;
        return d.refuse(Problem::AmbiguousPath, None);
    };
    let Some(now_ms) = now else {
        return clock_failed();
    };
    enforce(
        cfg,
        store,
        leases,
        d,
        Target::Anonymous(&subject),
        plan,
        None,
        &method,
        &path,
        now_ms,
    )
}

/// Where a subject's limit state lives.
pub(super) enum Target<'a> {
    /// Its own entry (keys and consumers: bounded by the key set).
    Entry(&'a str),
    /// A slot of the bounded anonymous table (client addresses are unbounded). Never
    /// leased: a slot may change owner, and one address is rarely busy on one worker.
    Anonymous(&'a str),
}

/// Applies the plan's limits (or the key's replacement limits) to the state at
/// `target`, recording cost, `RateLimit` fields and any refusal in `d`.
#[allow(clippy::too_many_arguments)]
pub(super) fn enforce(
    cfg: &Config,
    store: &dyn Store,
    leases: &mut WorkerLeases,
    mut d: Decision,
    target: Target<'_>,
    plan: &Plan,
    key: Option<&KeyRecord>,
    method: &str,
    path: &str,
    now_ms: u64,
) -> Decision {
    let cost = plan.cost(method, path);
    d.cost = cost;
    let limits = key.and_then(|r| r.limits.as_ref());
    let buckets = limits
        .and_then(|l| l.rate_limits.as_deref())
        .unwrap_or(&plan.rate_limits);
    let quotas = limits.and_then(|l| l.quotas.as_deref()).unwrap_or(&plan.quotas);
    if cfg.fleet.is_some() && !(buckets.is_empty() && quotas.is_empty()) {
        // Fleet mode: the node's lease decides (km/rl/k/<lineage> -> k:<lineage>, a
        // client address -> ip:<addr>).
        let subject = match target {
            Target::Entry(key) => key.strip_prefix("km/rl/").unwrap_or(key).replacen('/', ":", 1),
            Target::Anonymous(addr) => format!("ip:{addr}"),
        };
        // The steady request of a busy subject: from this worker's lease drawn from the
        // node's (`core::limits::fleet_loans`), no host call. Never for anonymous
        // subjects (their table slot may change owner).
        if let Target::Entry(_) = target {
            if let Some(served) = leases.spend(&fleet_entry_key(&subject), buckets, quotas, now_ms, cost) {
                if cfg.rate_limit_headers {
                    d.ratelimit = served.headers();
                }
                return d;
            }
        }
        d.fleet = Some(FleetLimits {
            subject,
            buckets: buckets.to_vec(),
            quotas: quotas.to_vec(),
            now_ms,
        });
        return d;
    }
    let outcome = match target {
        Target::Entry(key) => {
            // The steady request of a busy subject: from this worker's lease, no host call.
            if let Some(served) = leases.spend(key, buckets, quotas, now_ms, cost) {
                if cfg.rate_limit_headers {
                    d.ratelimit = served.headers();
                }
                return d;
            }
            leases.take(store, key, buckets, quotas, now_ms, cost)
        }
        Target::Anonymous(subject) => {
            subject_table::apply(store, subject, ANONYMOUS_SLOTS, buckets, quotas, now_ms, cost)
        }
    };
    match outcome {
        LimitOutcome::Allowed(check) => {
            if cfg.rate_limit_headers {
                d.ratelimit = limiter::headers(&check);
            }
            d
        }
        LimitOutcome::Denied(check) => {
            if cfg.rate_limit_headers {
                d.ratelimit = limiter::headers(&check);
            }
            let (outcome, problem) = match check.denial {
                Some(Denial::QuotaExceeded) => (Outcome::QuotaExceeded, Problem::QuotaExceeded),
                Some(Denial::CostExceedsBurst) => (Outcome::RateLimited, Problem::CostExceedsBurst),
                _ => (Outcome::RateLimited, Problem::RateLimited),
            };
            d.outcome = outcome;
            d.refuse(problem, check.retry_after_secs)
        }
        LimitOutcome::Contended => {
            d.contended = true;
            match cfg.on_contention {
                OnContention::Deny => {
                    d.outcome = Outcome::RateLimited;
                    d.refuse(Problem::RateLimited, Some(1))
                }
                OnContention::Allow => d,
            }
        }
    }
}

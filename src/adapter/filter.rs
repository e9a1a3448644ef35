//! The public filter: authenticate, authorize, limit, forward identity.

use super::host::{self, HostStore};
use super::metering::{Unauthenticated, Who};
use super::root::Shared;
use crate::core::auth::api_key::hashes_equal;
use crate::core::auth::credential::{self, CredentialError, Field, Source};
use crate::core::auth::key_record::{KeyRecord, Refusal};
use crate::core::auth::problem::Problem;
use crate::core::config::{NoKeySet, OnContention};
use crate::core::keyset::entry::KeyEntry;
use crate::core::keyset::meta::{read_meta, Meta};
use crate::core::keyset::names::key_entry_name;
use crate::core::limits::limiter::{self, Denial, LimitOutcome, Verdict};
use crate::core::limits::plan::{LimitBy, Plan};
use crate::core::metering::usage::Outcome;
use crate::core::store::Store;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::cell::Cell;
use std::rc::Rc;

pub struct FilterRequest {
    shared: Rc<Shared>,
    /// `RateLimit-Policy` and `RateLimit` values for the response.
    ratelimit_headers: Option<(String, String)>,
    /// What `on_log` counts: the authentic key of this request (or the anonymous plan's
    /// name), and how the request ended for it.
    record: Option<Rc<KeyRecord>>,
    anonymous_plan: Option<String>,
    outcome: Outcome,
    unauthenticated: Option<Unauthenticated>,
    cost: u64,
    now_ms: Cell<u64>,
    /// Response status and body bytes, seen in callbacks Envoy makes anyway, so
    /// metering needs no host call of its own.
    status: Cell<u32>,
    request_bytes: u64,
    response_bytes: Cell<u64>,
}

/// Who a limit applies to and what it draws from.
struct Subject<'a> {
    state_key: String,
    plan: &'a Plan,
    override_rec: Option<&'a KeyRecord>,
}

impl FilterRequest {
    pub fn new(shared: Rc<Shared>) -> Self {
        FilterRequest {
            shared,
            ratelimit_headers: None,
            record: None,
            anonymous_plan: None,
            outcome: Outcome::Admitted,
            unauthenticated: None,
            cost: 0,
            now_ms: Cell::default(),
            status: Cell::default(),
            request_bytes: 0,
            response_bytes: Cell::default(),
        }
    }

    fn refuse(&self, problem: Problem) -> Action {
        self.refuse_with(problem, &[])
    }

    fn refuse_with(&self, problem: Problem, extra: &[(&str, &str)]) -> Action {
        let body = self.shared.bodies.get(&problem).map(String::as_bytes);
        let mut headers = vec![
            ("content-type", "application/problem+json"),
            ("cache-control", "no-store"),
        ];
        if problem.status() == 401 {
            for c in &self.shared.challenges {
                headers.push(("www-authenticate", c.as_str()));
            }
        }
        headers.extend_from_slice(extra);
        self.status.set(problem.status());
        self.response_bytes.set(body.map_or(0, |b| b.len() as u64));
        self.send_http_response(problem.status(), headers, body);
        Action::Pause
    }

    /// Identity headers are always set or removed (never passed through from the
    /// client), so a backend can trust them.
    fn forward_identity(
        &self,
        key_id: Option<&str>,
        consumer: Option<&str>,
        plan: Option<&str>,
        rec: Option<&KeyRecord>,
    ) {
        let h = &self.shared.config.headers;
        self.set_http_request_header(&h.key_id, key_id);
        self.set_http_request_header(&h.consumer, consumer);
        self.set_http_request_header(&h.plan, plan);
        for (name, header) in &self.shared.config.forward_metadata {
            self.set_http_request_header(header, rec.and_then(|r| r.metadata(name)));
        }
    }

    fn strip_credential(&self, source: Source, path: Option<&str>) {
        let cfg = &self.shared.config;
        if cfg.keep_credential {
            return;
        }
        match source {
            Source::Header => self.set_http_request_header(cfg.sources.header.as_deref().unwrap_or("x-api-key"), None),
            Source::Bearer | Source::Basic => self.set_http_request_header("authorization", None),
            Source::Query => {
                if let (Some(p), Some(name)) = (path, &cfg.sources.query_param) {
                    self.set_http_request_header(":path", Some(&credential::strip_query_param(p, name)));
                }
            }
        }
    }

    fn set_ratelimit_headers(&mut self, verdict: &Verdict) {
        if self.shared.config.rate_limit_headers {
            self.ratelimit_headers = limiter::headers(verdict);
        }
    }

    /// Applies limits; `None` means go on, `Some(action)` means the request was refused.
    fn enforce(&mut self, store: &HostStore, subject: &Subject<'_>, method: &str, path: &str) -> Option<Action> {
        let cost = subject.plan.cost(method, path);
        self.cost = cost;
        let limits = subject.override_rec.and_then(|r| r.limits.as_ref());
        let buckets = limits
            .and_then(|l| l.rate_limits.as_deref())
            .unwrap_or(&subject.plan.rate_limits);
        let quotas = limits.and_then(|l| l.quotas.as_deref()).unwrap_or(&subject.plan.quotas);
        match limiter::apply(store, &subject.state_key, buckets, quotas, self.now_ms(), cost) {
            LimitOutcome::Allowed(v) => {
                self.set_ratelimit_headers(&v);
                None
            }
            LimitOutcome::Denied(v) => {
                self.set_ratelimit_headers(&v);
                self.set_outcome(if v.denial == Some(Denial::QuotaExceeded) {
                    Outcome::QuotaExceeded
                } else {
                    Outcome::RateLimited
                });
                let problem = match v.denial {
                    Some(Denial::QuotaExceeded) => Problem::QuotaExceeded,
                    Some(Denial::CostExceedsBurst) => Problem::CostExceedsBurst,
                    _ => Problem::RateLimited,
                };
                let retry = v.retry_after_secs.map(|s| s.to_string());
                let mut extra: Vec<(&str, &str)> = Vec::with_capacity(3);
                if let Some(r) = &retry {
                    extra.push(("retry-after", r));
                }
                if let Some((p, s)) = &self.ratelimit_headers {
                    extra.push(("ratelimit-policy", p));
                    extra.push(("ratelimit", s));
                }
                Some(self.refuse_with(problem, &extra))
            }
            LimitOutcome::Contended => {
                if self.shared.meter.borrow_mut().contention() {
                    log::warn!(
                        "keymeter: limit state contended for {} (logged once per flush)",
                        subject.state_key
                    );
                }
                match self.shared.config.on_contention {
                    OnContention::Deny => {
                        self.set_outcome(Outcome::RateLimited);
                        Some(self.refuse_with(Problem::RateLimited, &[("retry-after", "1")]))
                    }
                    OnContention::Allow => None,
                }
            }
        }
    }

    /// The host clock, read once per request (each read is a host call).
    fn now_ms(&self) -> u64 {
        if self.now_ms.get() == 0 {
            self.now_ms.set(host::now_ms());
        }
        self.now_ms.get()
    }

    fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    fn unauthenticated(&mut self, why: Unauthenticated, problem: Problem) -> Action {
        self.unauthenticated = Some(why);
        self.refuse(problem)
    }

    fn anonymous(&mut self, store: &HostStore, meta: &Meta, plan_name: &str) -> Action {
        let plans = self.shared.plans.borrow_mut().get(store, meta);
        let Some(plan) = plans.get(plan_name) else {
            log::warn!("keymeter: anonymous plan '{plan_name}' is not in the key set; refusing");
            return self.refuse(Problem::MissingCredential);
        };
        let Some(ip) = host::peer_ip() else {
            return self.refuse(Problem::MissingCredential);
        };
        let subject = Subject {
            state_key: format!("km/rl/ip/{}", crate::core::auth::cidr::limit_subject(ip)),
            plan,
            override_rec: None,
        };
        let method = host::request_header(":method").unwrap_or_default();
        let raw_path = host::request_header(":path").unwrap_or_default();
        self.anonymous_plan = Some(plan_name.to_string());
        let Ok(path) = crate::core::auth::path::for_rules(&raw_path, !plan.costs.is_empty()) else {
            self.set_outcome(Outcome::Forbidden);
            return self.refuse(Problem::AmbiguousPath);
        };
        if let Some(refused) = self.enforce(store, &subject, &method, &path) {
            return refused;
        }
        self.forward_identity(None, Some("anonymous"), Some(plan_name), None);
        Action::Continue
    }

    fn authenticate(&mut self) -> Action {
        let store = HostStore;
        let Some(meta) = read_meta(&store) else {
            return match self.shared.config.when_no_keyset {
                NoKeySet::Deny => self.unauthenticated(Unauthenticated::KeySetUnavailable, Problem::KeySetUnavailable),
                NoKeySet::Allow => {
                    if !self.shared.warned_fail_open.replace(true) {
                        log::warn!("keymeter: no key set loaded, letting requests through unauthenticated");
                    }
                    self.unauthenticated = Some(Unauthenticated::FailOpen);
                    self.forward_identity(None, None, None, None);
                    Action::Continue
                }
            };
        };
        let shared = self.shared.clone();
        let cfg = &shared.config;
        let mut path: Option<String> = None;
        let found = credential::find(&cfg.sources, |f| match f {
            Field::ApiKeyHeader => host::request_header(cfg.sources.header.as_deref()?),
            Field::Authorization => host::request_header("authorization"),
            Field::Path => {
                path = host::request_header(":path");
                path.clone()
            }
        });
        let cred = match found {
            Ok(c) => c,
            Err(CredentialError::Missing) => {
                return match &cfg.anonymous_plan {
                    Some(plan) => self.anonymous(&store, &meta, plan),
                    None => self.unauthenticated(Unauthenticated::Missing, Problem::MissingCredential),
                }
            }
            Err(CredentialError::Malformed(_) | CredentialError::BadChecksum(_)) => {
                return self.unauthenticated(Unauthenticated::Malformed, Problem::MalformedCredential)
            }
        };
        let key = cred.key();
        let mut name_buf = [0u8; 32];
        let (bytes, _) = store.get(key_entry_name(key.id(), &mut name_buf));
        let entry = bytes.filter(|b| !b.is_empty()).and_then(|b| KeyEntry::decode(&b));
        let Some(rec) = entry.and_then(|e| e.into_active(&meta)) else {
            return self.unauthenticated(Unauthenticated::Invalid, Problem::InvalidCredential);
        };
        if !hashes_equal(&key.hash(), &rec.hash) {
            return self.unauthenticated(Unauthenticated::Invalid, Problem::InvalidCredential);
        }
        // From here on the key is authentic: everything is counted against it.
        let rec = Rc::new(rec);
        self.record = Some(rec.clone());
        let plans = shared.plans.borrow_mut().get(&store, &meta);
        let plan = plans.get(&rec.plan);
        // Method and path only matter for scopes and route costs: skip the two host
        // calls when the key has neither (the common case).
        let mut method = String::new();
        if !rec.scopes.is_empty() || plan.is_some_and(|p| !p.costs.is_empty()) {
            method = host::request_header(":method").unwrap_or_default();
            if path.is_none() {
                path = host::request_header(":path");
            }
        }
        // Scopes and route costs match the canonical path; forms backends disagree on are refused.
        let has_rules = !rec.scopes.is_empty() || plan.is_some_and(|p| !p.costs.is_empty());
        let Ok(path_str) = crate::core::auth::path::for_rules(path.as_deref().unwrap_or("/"), has_rules) else {
            self.set_outcome(Outcome::Forbidden);
            return self.refuse(Problem::AmbiguousPath);
        };
        let path_str: &str = &path_str;
        let peer = if rec.cidrs.is_empty() { None } else { host::peer_ip() };
        let now_secs = (self.now_ms() / 1000) as i64;
        if let Err(r) = rec.admit(now_secs, &method, path_str, peer) {
            self.set_outcome(match r {
                Refusal::OutOfScope | Refusal::AddressNotAllowed => Outcome::Forbidden,
                _ => Outcome::Unauthorized,
            });
            return self.refuse(match r {
                Refusal::Disabled => Problem::KeyDisabled,
                Refusal::NotYetValid => Problem::KeyNotYetValid,
                Refusal::Expired => Problem::KeyExpired,
                Refusal::OutOfScope => Problem::OutOfScope,
                Refusal::AddressNotAllowed => Problem::AddressNotAllowed,
            });
        }
        if let Some(plan) = plan {
            let state_key = match plan.limit_by {
                LimitBy::Key => format!("km/rl/k/{}", rec.lineage()),
                LimitBy::Consumer => format!("km/rl/c/{}", rec.consumer),
            };
            let subject = Subject {
                state_key,
                plan,
                override_rec: Some(&rec),
            };
            if let Some(refused) = self.enforce(&store, &subject, &method, path_str) {
                return refused;
            }
        }
        self.forward_identity(Some(&rec.id), Some(&rec.consumer), Some(&rec.plan), Some(&rec));
        self.strip_credential(cred.source, path.as_deref());
        Action::Continue
    }
}

impl Context for FilterRequest {}

impl HttpContext for FilterRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.authenticate()
    }

    fn on_log(&mut self) {
        let mut meter = self.shared.meter.borrow_mut();
        if !meter.enabled() {
            return;
        }
        if let Some(why) = self.unauthenticated {
            meter.unauthenticated(why);
        }
        let who = match (&self.record, &self.anonymous_plan) {
            (Some(r), _) => Some(Who {
                lineage: r.lineage(),
                key_id: &r.id,
                consumer: &r.consumer,
                plan: &r.plan,
            }),
            (None, Some(plan)) => Some(Who {
                lineage: "anonymous",
                key_id: "anonymous",
                consumer: "anonymous",
                plan,
            }),
            _ => None,
        };
        if let Some(who) = who {
            let (status, req, resp) = (self.status.get(), self.request_bytes, self.response_bytes.get());
            meter.record(&who, self.outcome, status, req, resp, self.cost);
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        // We always continue, so each call sees only the new chunk.
        self.request_bytes += body_size as u64;
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if self.status.get() == 0 || self.record.is_some() || self.anonymous_plan.is_some() {
            self.response_bytes.set(self.response_bytes.get() + body_size as u64);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.status.get() == 0 && (self.record.is_some() || self.anonymous_plan.is_some()) {
            let status = host::response_header(":status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            self.status.set(status);
        }
        if let Some((policy, state)) = self.ratelimit_headers.take() {
            self.set_http_response_header("ratelimit-policy", Some(&policy));
            self.set_http_response_header("ratelimit", Some(&state));
        }
        Action::Continue
    }
}

//! Fleet mode in the filter: the host side of `core::limits::fleet`.
//!
//! * Request path: a busy named subject's request is served by the core from this
//!   worker's lease drawn from the node's (`core::limits::fleet_loans`), with no call
//!   here at all. Otherwise `FleetNode::decide` reads the subject's node entry from
//!   shared data, decides with the core (settling the worker's previous lease and
//!   drawing a new one in the same step), CAS-writes it back. When the core asks for a take, the
//!   HTTP context dispatches `POST /v1/take` itself and pauses (bounded by `timeout_ms`);
//!   its answer comes back to that context (`on_take_response`).
//! * Root context (`on_tick`, every `refill_tick_ms` on each worker): settles this
//!   worker's leases on node entries that expired or hold unreported spend (every
//!   `worker_lease::SWEEP_MS`); for the subjects
//!   this worker has seen, refills leases at their low-water mark, renews them before
//!   expiry, returns them when the subject went idle (one call in flight per subject per
//!   node, claimed in the shared entry), and publishes fleet health and metrics.
//! * `release_all` (plugin unload, reload, shutdown): settles this worker's leases into
//!   the node's entries, then returns every node lease this worker knows of.
//!
//! Every call goes through the per-worker circuit breaker; while it is open requests use
//! the core's partition fallback and only a trial call per cooldown is made.

use super::host::{self, HostStore};
use super::service::{dispatch, CallResponse};
use crate::core::cas::{cas_update, Create, Step as CasStep};
use crate::core::limits::fleet::{self, FleetConfig, FleetEntry, FleetVerdict, Step, Subject, Via};
use crate::core::limits::fleet_loans;
use crate::core::limits::fleet_slots::{self, Miss, Place};
use crate::core::limits::fleet_view;
use crate::core::limits::lease::Ask;
use crate::core::limits::limiter;
use crate::core::limits::plan::{NamedBucket, NamedQuota};
use crate::core::limits::subject_table::ANONYMOUS_SLOTS;
use crate::core::limits::worker_lease::{self, Drawn, WorkerLeases};
use crate::core::remote::breaker::{Breaker, BreakerState};
use crate::core::remote::fleet_health::{self, WorkerHealth, HEARTBEAT_MS};
use crate::core::remote::fleet_protocol::{LeaseResponse, TakeResponse};
use crate::core::remote::outbound::{may_have_been_applied, snippet};
use crate::core::store::{ensure_exists, Store};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;

/// Fleet health for `GET /v1/status` (`fleet`), written by the root contexts.
pub const HEALTH: &str = "km/fleet";
/// Counter naming each worker's entry in the health (`w<n>`, unique per process).
const WORKER_SEQ: &str = "km/fleet/workers";
/// CAS attempts on a subject's entry before the request falls back to a local decision.
const CAS_RETRIES: usize = 32;
/// Largest limitd answer read.
const MAX_BODY: usize = 64 * 1024;

use crate::core::limits::fleet::entry_key;

/// Counters since this Envoy started, merged into `km/fleet` by every worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub lease_decisions: u64,
    pub take_decisions: u64,
    pub fallback_decisions: u64,
    pub exhausted_decisions: u64,
    pub lease_calls: u64,
    pub lease_failures: u64,
    pub take_calls: u64,
    pub take_failures: u64,
    pub refill_latency_ms_sum: u64,
    /// Quota units admitted without a lease while partitioned (each later replayed).
    pub overdraft_units: u64,
    /// Of `lease_decisions`, those served from a worker's lease drawn from the node's
    /// (`core::limits::fleet_loans`): no shared-data call.
    #[serde(default)]
    pub worker_lease_decisions: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.lease_decisions += o.lease_decisions;
        self.take_decisions += o.take_decisions;
        self.fallback_decisions += o.fallback_decisions;
        self.exhausted_decisions += o.exhausted_decisions;
        self.lease_calls += o.lease_calls;
        self.lease_failures += o.lease_failures;
        self.take_calls += o.take_calls;
        self.take_failures += o.take_failures;
        self.refill_latency_ms_sum += o.refill_latency_ms_sum;
        self.overdraft_units += o.overdraft_units;
        self.worker_lease_decisions += o.worker_lease_decisions;
    }
}

/// What `GET /v1/status` shows under `fleet`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Health {
    pub node_id: String,
    /// `connected`, `partitioned` (a worker's breaker is open) or `probing` (half-open):
    /// the worst of the live workers' states (`workers`).
    pub state: String,
    /// Workers partitioned or probing.
    #[serde(default)]
    pub degraded_workers: usize,
    /// Each live worker's own view (`core::remote::fleet_health`).
    #[serde(default)]
    pub workers: Vec<WorkerHealth>,
    pub fleet_size: u64,
    pub counters: Counters,
    /// Requests decided from the lease over all fleet decisions.
    pub lease_hit_ratio: f64,
    pub refill_latency_ms_last: u64,
    pub refill_latency_ms_mean: f64,
    /// Quota units admitted on overdraft and not yet reported to the fleet (the most
    /// any worker sees).
    pub overdraft_in_use: u64,
    /// Subjects tracked (the most any worker tracks).
    pub subjects: usize,
    pub last_success_at_ms: u64,
    pub last_failure_at_ms: u64,
    pub last_error: Option<String>,
}

struct Tracked {
    /// Anonymous subjects: the slot of the fixed table holding the entry.
    place: Option<Place>,
    buckets: Vec<NamedBucket>,
    quotas: Vec<NamedQuota>,
    last_used_ms: u64,
    /// A request found the lease at its low-water mark or near expiry.
    wanted: bool,
    /// Otherwise the tick looks at the entry no earlier than this (reports, idle
    /// returns), so a tick costs shared-data reads only for subjects that need them.
    next_check_ms: u64,
}

struct Pending {
    subject: String,
    place: Option<Place>,
    ask: Ask,
    sent_ms: u64,
    release: bool,
}

/// Metric ids, defined once at start-up.
#[derive(Default)]
struct Metrics {
    decisions: [Option<u32>; 4],
    calls: Option<u32>,
    failures: Option<u32>,
    latency: Option<u32>,
    overdraft: Option<u32>,
    partitioned: Option<u32>,
}

impl Metrics {
    fn define() -> Metrics {
        let c = |n: &str| hostcalls::define_metric(MetricType::Counter, n).ok();
        Metrics {
            decisions: [
                c("keymeter_fleet_lease_decisions_total"),
                c("keymeter_fleet_take_decisions_total"),
                c("keymeter_fleet_fallback_decisions_total"),
                c("keymeter_fleet_exhausted_decisions_total"),
            ],
            calls: c("keymeter_fleet_calls_total"),
            failures: c("keymeter_fleet_call_failures_total"),
            latency: c("keymeter_fleet_refill_latency_ms_total"),
            overdraft: c("keymeter_fleet_overdraft_units_total"),
            partitioned: hostcalls::define_metric(MetricType::Gauge, "keymeter_fleet_partitioned").ok(),
        }
    }

    fn add(id: Option<u32>, v: u64) {
        if let (Some(id), true) = (id, v > 0) {
            let _ = hostcalls::increment_metric(id, v as i64);
        }
    }
}

/// One worker's fleet-mode state.
pub struct FleetNode {
    pub cfg: FleetConfig,
    node_id: String,
    breaker: RefCell<Breaker>,
    subjects: RefCell<HashMap<String, Tracked>>,
    calls: RefCell<HashMap<u32, Pending>>,
    /// Not yet merged into `km/fleet`.
    delta: RefCell<Counters>,
    last_latency: std::cell::Cell<u64>,
    last_error: RefCell<Option<(u64, String)>>,
    last_success_ms: std::cell::Cell<u64>,
    /// What was last published (skip the shared-data write when nothing changed).
    published: std::cell::Cell<Option<(BreakerState, u64, usize, u64)>>,
    /// When this worker last wrote its health entry (a heartbeat keeps it live).
    published_at: std::cell::Cell<u64>,
    /// This worker's key in `Health::workers`.
    worker: String,
    /// This worker's number in the node (`w<n>`): whom the node's entries lend to.
    worker_id: u32,
    /// When the worker leases drawn from node entries were last looked at for
    /// settlement (every `worker_lease::SWEEP_MS`).
    settled_at: std::cell::Cell<u64>,
    /// Takes this worker sent: the low bits of a take's id (`take_id`).
    takes_sent: std::cell::Cell<u64>,
    metrics: Metrics,
    /// Send `RateLimit-Policy` / `RateLimit` (the plugin's `rate_limit_headers`).
    pub ratelimit_headers: bool,
}

/// `RateLimit-Policy` and `RateLimit` values for a decided request, if sent.
pub type Fields = Option<(String, String)>;

/// The request path's next move.
pub enum RequestStep {
    Decided(FleetVerdict, Fields),
    /// Paused for this take call (token, take id or 0).
    Paused(u32, u64),
}

/// Bits of a take id below the worker number.
const TAKE_ID_WORKER_SHIFT: u32 = 40;

impl FleetNode {
    /// Called from `on_configure` (filter role with `fleet`).
    pub fn new(cfg: FleetConfig) -> FleetNode {
        host::ensure_instance();
        let instance = HostStore
            .get(host::INSTANCE)
            .0
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["instance_id"].as_str().map(str::to_string))
            .unwrap_or_else(|| "0".into());
        let node_id = crate::core::limits::fleet::node_id_for(&cfg.node_name, &instance);
        let _ = ensure_exists(&HostStore, HEALTH, b"{}", host::now_ms());
        let create = Create::ViaLock { now_ms: host::now_ms() };
        let n = cas_update(&HostStore, WORKER_SEQ, CAS_RETRIES, create, |current| {
            let n = current
                .and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            CasStep::Write(n.to_string().into_bytes(), n)
        })
        .unwrap_or(0);
        FleetNode {
            cfg,
            node_id,
            breaker: RefCell::default(),
            subjects: RefCell::default(),
            calls: RefCell::default(),
            delta: RefCell::default(),
            last_latency: Default::default(),
            last_error: RefCell::default(),
            last_success_ms: Default::default(),
            published: Default::default(),
            published_at: Default::default(),
            worker: format!("w{n}"),
            worker_id: u32::try_from(n).unwrap_or(u32::MAX),
            settled_at: Default::default(),
            takes_sent: Default::default(),
            metrics: Metrics::define(),
            ratelimit_headers: false,
        }
    }

    fn count(&self, via: Via) {
        let mut d = self.delta.borrow_mut();
        match via {
            Via::Lease => d.lease_decisions += 1,
            Via::Take => d.take_decisions += 1,
            Via::Fallback => d.fallback_decisions += 1,
            Via::Exhausted => d.exhausted_decisions += 1,
        }
    }

    /// Applies `f` to the subject's entry under CAS (`f` may run more than once);
    /// `None` when the entry stayed contended (or the host failed) for all attempts.
    fn update<T>(&self, subject: &str, f: impl FnMut(&mut FleetEntry) -> T) -> Option<T> {
        self.update_placed(subject, f).map(|(t, _)| t)
    }

    /// As `update`; an anonymous subject (`ip:<addr>`) is found, or given a slot, in the
    /// fixed table (`core::limits::fleet_slots`), whose place is returned: its owner is
    /// the subject whose limits apply (a neighbour's when the table is full).
    fn update_placed<T>(&self, subject: &str, mut f: impl FnMut(&mut FleetEntry) -> T) -> Option<(T, Option<Place>)> {
        if subject.starts_with("ip:") {
            let policy = self.cfg.policy();
            return fleet_slots::with_slot(&HostStore, subject, ANONYMOUS_SLOTS, host::now_ms(), &policy, |e, _| {
                f(e)
            })
            .map(|(t, p)| (t, Some(p)));
        }
        self.update_named(subject, f).map(|t| (t, None))
    }

    /// `update` of a tracked subject: at its slot if it has one (`Err(Miss::Lost)` once
    /// another subject took the slot over, which it may only do when the entry was
    /// forgettable).
    fn update_tracked<T>(
        &self,
        subject: &str,
        place: Option<&Place>,
        f: impl FnMut(&mut FleetEntry) -> T,
    ) -> Result<T, Miss> {
        match place {
            Some(p) => fleet_slots::at_place(&HostStore, p, host::now_ms(), f),
            None => self.update_named(subject, f).ok_or(Miss::Contended),
        }
    }

    fn update_named<T>(&self, subject: &str, mut f: impl FnMut(&mut FleetEntry) -> T) -> Option<T> {
        let create = Create::ViaLock { now_ms: host::now_ms() };
        cas_update(&HostStore, &entry_key(subject), CAS_RETRIES, create, |current| {
            let old = current.map(FleetEntry::decode).unwrap_or_default();
            let mut e = old.clone();
            let out = f(&mut e);
            if current.is_some() && e == old {
                CasStep::Keep(out)
            } else {
                CasStep::Write(e.encode(), out)
            }
        })
        .ok()
    }

    /// The `RateLimit` fields for a verdict on `e` (after the decision), if sent.
    fn fields(&self, e: &FleetEntry, subject: &Subject<'_>, v: &FleetVerdict, now_ms: u64, cost: u64) -> Fields {
        if !self.ratelimit_headers {
            return None;
        }
        let held = e.lease.available;
        fleet_view::headers(subject.buckets, subject.quotas, held, &e.view, v, now_ms, cost)
    }

    /// Decides a request of `cost` for `subject`; may dispatch a take and pause. A named
    /// subject's request this worker's lease could not serve (`core::request` tried it)
    /// also settles that lease and draws a new one from the node's, in the same CAS
    /// (`core::limits::fleet_loans`).
    pub fn decide(&self, subject: &Subject<'_>, now_ms: u64, cost: u64, leases: &mut WorkerLeases) -> RequestStep {
        let connected = self.breaker.borrow().connected(now_ms);
        let cfg = &self.cfg;
        let (buckets, quotas) = (subject.buckets, subject.quotas);
        // No worker lease for anonymous subjects (a slot changes owner), nor without a
        // worker number of our own (0: the counter could not be read at start-up), since
        // loans are settled by it.
        let lease_key = (!subject.name.starts_with("ip:") && self.worker_id != 0).then(|| entry_key(subject.name));
        let draw = lease_key
            .as_deref()
            .and_then(|k| leases.begin_draw(k, buckets, quotas, now_ms));
        let worker = self.worker_id;
        let placed = self.update_placed(subject.name, |e| {
            let (step, grant) =
                fleet_loans::decide_drawing(e, worker, draw.as_ref(), buckets, quotas, cfg, now_ms, cost, connected);
            let (fields, views) = match &step {
                Step::Decided(v) if self.ratelimit_headers => {
                    // The worker's new units are still the node's: counted as held.
                    let held = e.lease.available + grant.granted;
                    let mut views = fleet_view::views(buckets, quotas, held, &e.view, v, now_ms, cost);
                    let fields = (!views.is_empty())
                        .then(|| (limiter::policy_field(&views), limiter::ratelimit_field(&views, 0)));
                    if grant.granted > 0 {
                        for view in &mut views {
                            view.remaining = view.remaining.saturating_sub(grant.granted);
                        }
                    } else {
                        views.clear();
                    }
                    (fields, views)
                }
                _ => (None, Vec::new()),
            };
            let admitted = matches!(&step, Step::Decided(v) if v.denial.is_none());
            (
                step,
                fleet::wants_call(e, quotas, cfg, now_ms),
                fields,
                Drawn {
                    granted: grant.granted,
                    valid_ms: grant.valid_ms,
                    admitted,
                    views,
                },
            )
        });
        let (step, place) = match placed {
            Some(((s, w, f, drawn), p)) => {
                if let (Some(k), Some(d)) = (lease_key.as_deref(), draw.as_ref()) {
                    leases.end_draw(k, d, Some(drawn), buckets, quotas, cost);
                }
                (Some((s, w, f)), p)
            }
            None => {
                if let (Some(k), Some(d)) = (lease_key.as_deref(), draw.as_ref()) {
                    leases.end_draw(k, d, None, buckets, quotas, cost);
                }
                (None, None)
            }
        };
        // The subject whose limits apply (an anonymous newcomer sharing a neighbour's
        // slot in a full table is charged to the neighbour).
        let subject = &Subject {
            name: place.as_ref().map_or(subject.name, |p| p.owner.as_str()),
            ..*subject
        };
        self.track(subject, place.clone(), now_ms, step.as_ref().is_none_or(|(_, w, _)| *w));
        match step {
            Some((Step::Decided(v), _, fields)) => {
                self.count(v.via);
                self.note_overdraft(&v, subject, cost);
                RequestStep::Decided(v, fields)
            }
            Some((Step::Take, _, _)) => {
                let allowed = self.breaker.borrow_mut().allow(now_ms, cfg.breaker_cooldown_ms);
                if allowed {
                    let id = self.take_id();
                    let node = self.node_for(place.as_ref());
                    let tag = (id != 0).then_some((node.as_ref(), id));
                    if let Some(token) = self.dispatch_take(subject, cost, now_ms, tag) {
                        return RequestStep::Paused(token, id);
                    }
                }
                let (v, fields) = self.fall_back(subject, now_ms, cost, None);
                RequestStep::Decided(v, fields)
            }
            // Contended beyond retries: decide from a fresh local fallback view, which
            // never admits more than the local share.
            None => {
                let (v, fields) = self.fall_back(subject, now_ms, cost, None);
                RequestStep::Decided(v, fields)
            }
        }
    }

    /// A fresh take id, unique in this node: the worker's number above the count of its
    /// takes; 0 (no id, a lost answer cannot be settled) without a number of our own or
    /// beyond the 2^53 a Lua script counts exactly.
    fn take_id(&self) -> u64 {
        let n = self.takes_sent.get() + 1;
        self.takes_sent.set(n);
        let worker = u64::from(self.worker_id);
        if worker == 0 || worker >= 1 << (53 - TAKE_ID_WORKER_SHIFT) || n >= 1 << TAKE_ID_WORKER_SHIFT {
            return 0;
        }
        worker << TAKE_ID_WORKER_SHIFT | n
    }

    fn note_overdraft(&self, v: &FleetVerdict, subject: &Subject<'_>, cost: u64) {
        if v.via == Via::Fallback && v.denial.is_none() && !subject.quotas.is_empty() {
            self.delta.borrow_mut().overdraft_units += cost;
        }
    }

    /// The partition fallback for one request; `doubt`: the id of its take whose answer
    /// was lost, kept in the entry for the next lease call to settle.
    fn fall_back(&self, subject: &Subject<'_>, now_ms: u64, cost: u64, doubt: Option<u64>) -> (FleetVerdict, Fields) {
        let cfg = &self.cfg;
        let step = self.update(subject.name, |e| {
            if let Some(id) = doubt {
                if fleet::record_doubt(e, subject.quotas, id, cost) {
                    log::warn!("keymeter fleet: too many takes in doubt; the oldest may be counted twice");
                }
            }
            let step = fleet::fallback(e, subject.buckets, subject.quotas, cfg, now_ms, cost);
            let fields = match &step {
                Step::Decided(v) => self.fields(e, subject, v, now_ms, cost),
                Step::Take => None,
            };
            (step, fields)
        });
        let (v, fields) = match step {
            Some((Step::Decided(v), fields)) => (v, fields),
            _ => (
                FleetVerdict {
                    denial: Some(limiter::Denial::RateLimited),
                    retry_after_secs: Some(1),
                    via: Via::Fallback,
                },
                None,
            ),
        };
        self.count(v.via);
        self.note_overdraft(&v, subject, cost);
        (v, fields)
    }

    fn dispatch_take(&self, subject: &Subject<'_>, cost: u64, now_ms: u64, tag: Option<(&str, u64)>) -> Option<u32> {
        let body = serde_json::to_vec(&fleet::take_request(
            subject.name,
            subject.buckets,
            subject.quotas,
            cost,
            tag,
        ))
        .ok()?;
        self.delta.borrow_mut().take_calls += 1;
        match self.call("/v1/take", &body) {
            Ok(token) => Some(token),
            Err(e) => {
                self.failed(now_ms, e);
                self.delta.borrow_mut().take_failures += 1;
                None
            }
        }
    }

    fn call(&self, path: &str, body: &[u8]) -> Result<u32, String> {
        dispatch(
            &self.cfg.cluster,
            "POST",
            path,
            &self.cfg.authority,
            &[("content-type", "application/json")],
            &[],
            Some(body),
            self.cfg.timeout_ms,
        )
    }

    fn failed(&self, now_ms: u64, why: String) {
        if self
            .breaker
            .borrow_mut()
            .failure(now_ms, self.cfg.breaker_failures, self.cfg.breaker_cooldown_ms)
        {
            log::warn!("keymeter fleet: limit service unreachable, deciding locally: {why}");
        }
        *self.last_error.borrow_mut() = Some((now_ms, why));
    }

    fn succeeded(&self, now_ms: u64) {
        if self.breaker.borrow().state(now_ms) != BreakerState::Closed {
            log::info!("keymeter fleet: limit service reachable again");
        }
        self.breaker.borrow_mut().success();
        self.last_success_ms.set(now_ms);
    }

    /// Reads a limitd answer: the JSON body of a 200, or why there is none.
    fn answer<T: serde::de::DeserializeOwned>(num_headers: usize, body_size: usize) -> Result<T, String> {
        Self::answer_of(&CallResponse::read(num_headers, body_size, MAX_BODY))
    }

    fn answer_of<T: serde::de::DeserializeOwned>(r: &CallResponse) -> Result<T, String> {
        match r.status() {
            Some(200) => serde_json::from_slice(&r.body).map_err(|e| format!("bad answer: {e}")),
            Some(s) => Err(format!("limitd answered {s}")),
            None => Err("no answer (timeout or connection failure)".into()),
        }
    }

    /// The take answer for a paused request (in its HTTP context).
    pub fn on_take_response(
        &self,
        subject: &Subject<'_>,
        cost: u64,
        take_id: u64,
        num_headers: usize,
        body_size: usize,
    ) -> (FleetVerdict, Fields) {
        let now_ms = host::now_ms();
        let r = CallResponse::read(num_headers, body_size, MAX_BODY);
        match Self::answer_of::<TakeResponse>(&r) {
            Ok(resp) => {
                self.succeeded(now_ms);
                let cfg = &self.cfg;
                let apply = |e: &mut FleetEntry| {
                    let v = fleet::apply_take(e, &resp, subject.buckets, cfg, now_ms, cost);
                    e.view.record(resp.now_ms, &resp.buckets, &resp.quotas);
                    (v, self.fields(e, subject, &v, now_ms, cost))
                };
                let (v, fields) = self
                    .update(subject.name, apply)
                    .unwrap_or_else(|| apply(&mut FleetEntry::default()));
                self.count(v.via);
                (v, fields)
            }
            Err(why) => {
                self.delta.borrow_mut().take_failures += 1;
                self.failed(now_ms, why);
                let doubt = (take_id != 0 && may_have_been_applied(r.status(), &snippet(&r.body))).then_some(take_id);
                let decided = self.fall_back(subject, now_ms, cost, doubt);
                if doubt.is_some() {
                    // The next tick sends the lease call that settles it.
                    if let Some(t) = self.subjects.borrow_mut().get_mut(subject.name) {
                        t.wanted = true;
                    }
                }
                decided
            }
        }
    }

    fn track(&self, subject: &Subject<'_>, place: Option<Place>, now_ms: u64, wanted: bool) {
        let mut subjects = self.subjects.borrow_mut();
        match subjects.get_mut(subject.name) {
            Some(t) => {
                t.last_used_ms = now_ms;
                t.wanted |= wanted;
                if place.is_some() && t.place != place {
                    t.place = place;
                }
                if t.buckets != subject.buckets || t.quotas != subject.quotas {
                    t.buckets = subject.buckets.to_vec();
                    t.quotas = subject.quotas.to_vec();
                }
            }
            None => {
                subjects.insert(
                    subject.name.to_string(),
                    Tracked {
                        place,
                        buckets: subject.buckets.to_vec(),
                        quotas: subject.quotas.to_vec(),
                        last_used_ms: now_ms,
                        wanted: true,
                        next_check_ms: 0,
                    },
                );
            }
        }
    }

    /// Settles this worker's leases drawn from node entries that are due (expired
    /// units, spend to report; with `all` everything held) into those entries.
    fn settle_worker_leases(&self, leases: &mut WorkerLeases, now: u64, all: bool) {
        if !all && now.saturating_sub(self.settled_at.get()) < worker_lease::SWEEP_MS {
            return;
        }
        self.settled_at.set(now);
        let served = leases.take_served();
        {
            let mut d = self.delta.borrow_mut();
            d.lease_decisions += served;
            d.worker_lease_decisions += served;
        }
        let worker = self.worker_id;
        for (key, d) in leases.settlements_due(now, all) {
            let subject = key.strip_prefix("km/fl/").unwrap_or(&key);
            let ok = self
                .update_named(subject, |e| {
                    fleet_loans::settle(e, worker, d.spent, d.ask.returned, now)
                })
                .is_some();
            leases.settled(&key, &d, ok);
            if ok && d.spent > 0 {
                // Spend entered the node's lease: let this tick see whether it is due
                // for a report (R/2) rather than wait for the subject's next check.
                if let Some(t) = self.subjects.borrow_mut().get_mut(subject) {
                    t.wanted = true;
                }
            }
        }
    }

    /// Root tick: settle this worker's leases on node entries, refill, renew or return
    /// the node's leases of the subjects this worker saw, then publish health and
    /// metrics.
    pub fn on_tick(&self, leases: &mut WorkerLeases) {
        let now = host::now_ms();
        self.settle_worker_leases(leases, now, false);
        let cfg = &self.cfg;
        let idle_after = cfg.lease_ttl_ms;
        let names: Vec<String> = self
            .subjects
            .borrow_mut()
            .iter_mut()
            .filter(|(_, t)| t.wanted || now >= t.next_check_ms)
            .map(|(name, t)| {
                t.wanted = false;
                t.next_check_ms = now + cfg.report_interval_ms.min(cfg.lease_ttl_ms / 4).max(cfg.refill_tick_ms);
                name.clone()
            })
            .collect();
        let mut overdraft_in_use = 0;
        for name in names {
            // Open: no calls; half-open: one trial call for the whole worker.
            if self.breaker.borrow().state(now) != BreakerState::Closed
                && !self.breaker.borrow_mut().allow(now, cfg.breaker_cooldown_ms)
            {
                continue;
            }
            let (buckets, quotas, idle, place) = {
                let s = self.subjects.borrow();
                let t = &s[&name];
                (
                    t.buckets.clone(),
                    t.quotas.clone(),
                    now.saturating_sub(t.last_used_ms) > idle_after,
                    t.place.clone(),
                )
            };
            let subject = Subject {
                name: &name,
                buckets: &buckets,
                quotas: &quotas,
            };
            let node_id = self.node_for(place.as_ref());
            let started = self.update_tracked(&name, place.as_ref(), |e| {
                let overdraft = e.overdraft_used;
                if idle && e.lease.settled() && e.loans.is_empty() && overdraft == 0 && e.doubts.is_empty() {
                    return (overdraft, None);
                }
                (overdraft, fleet::begin_lease(e, &node_id, &subject, cfg, now, idle))
            });
            overdraft_in_use += started.as_ref().map_or(0, |(o, _)| *o);
            match started.map(|(_, s)| s) {
                Ok(Some((ask, req))) => self.send_lease(name.clone(), place, ask, &req, now, idle),
                // Nothing held, nothing to report: forget the subject. (A lost slot was
                // taken over because its entry was forgettable.)
                Ok(None) if idle => {
                    self.subjects.borrow_mut().remove(&name);
                }
                Err(Miss::Lost) => {
                    self.subjects.borrow_mut().remove(&name);
                }
                _ => {}
            }
        }
        self.publish(now, overdraft_in_use);
    }

    /// The node id of a subject's lease calls: the slot's own for anonymous subjects.
    fn node_for(&self, place: Option<&Place>) -> std::borrow::Cow<'_, str> {
        match place {
            Some(p) => p.node_id(&self.node_id).into(),
            None => self.node_id.as_str().into(),
        }
    }

    fn send_lease(
        &self,
        subject: String,
        place: Option<Place>,
        ask: Ask,
        req: &crate::core::remote::fleet_protocol::LeaseRequest,
        now: u64,
        release: bool,
    ) {
        let Ok(body) = serde_json::to_vec(req) else { return };
        self.delta.borrow_mut().lease_calls += 1;
        match self.call("/v1/lease", &body) {
            Ok(token) => {
                self.calls.borrow_mut().insert(
                    token,
                    Pending {
                        subject,
                        place,
                        ask,
                        sent_ms: now,
                        release,
                    },
                );
            }
            Err(e) => {
                self.delta.borrow_mut().lease_failures += 1;
                self.failed(now, e);
                let _ = self.update_tracked(&subject, place.as_ref(), |e| e.lease.on_failure());
            }
        }
    }

    /// A lease answer for the root context; false if `token` is not ours.
    pub fn on_lease_response(&self, token: u32, num_headers: usize, body_size: usize) -> bool {
        let Some(p) = self.calls.borrow_mut().remove(&token) else {
            return false;
        };
        let now = host::now_ms();
        let cfg = &self.cfg;
        match Self::answer::<LeaseResponse>(num_headers, body_size) {
            Ok(resp) => {
                self.succeeded(now);
                let latency = now.saturating_sub(p.sent_ms);
                self.last_latency.set(latency);
                self.delta.borrow_mut().refill_latency_ms_sum += latency;
                let buckets = self
                    .subjects
                    .borrow()
                    .get(&p.subject)
                    .map(|t| t.buckets.clone())
                    .unwrap_or_default();
                let _ = self.update_tracked(&p.subject, p.place.as_ref(), |e| {
                    fleet::apply_lease(e, &p.ask, &resp, &buckets, now, cfg);
                    if resp.applied {
                        e.view.record(resp.now_ms, &resp.buckets, &resp.quotas);
                    }
                });
                if p.release {
                    self.subjects.borrow_mut().remove(&p.subject);
                }
            }
            Err(why) => {
                self.delta.borrow_mut().lease_failures += 1;
                self.failed(now, why);
                let _ = self.update_tracked(&p.subject, p.place.as_ref(), |e| e.lease.on_failure());
            }
        }
        true
    }

    /// Returns every lease this worker knows of (unload, reload, shutdown); best effort:
    /// first what it drew from the node's entries (back into them), then the node's
    /// leases of its subjects (to the fleet; units other workers still hold stay in the
    /// `hold` until they settle and their own unload returns them). Returns how many
    /// calls were sent.
    pub fn release_all(&self, leases: &mut WorkerLeases) -> usize {
        let now = host::now_ms();
        self.settle_worker_leases(leases, now, true);
        let names: Vec<String> = self.subjects.borrow().keys().cloned().collect();
        let mut sent = 0;
        for name in names {
            let (buckets, quotas, place) = {
                let s = self.subjects.borrow();
                (
                    s[&name].buckets.clone(),
                    s[&name].quotas.clone(),
                    s[&name].place.clone(),
                )
            };
            let subject = Subject {
                name: &name,
                buckets: &buckets,
                quotas: &quotas,
            };
            let node_id = self.node_for(place.as_ref());
            let cfg = &self.cfg;
            // A call in flight is given up: the release supersedes it (newer seq).
            let started = self.update_tracked(&name, place.as_ref(), |e| {
                e.lease.refill_sent_ms = 0;
                fleet::begin_lease(e, &node_id, &subject, cfg, now, true)
            });
            if let Ok(Some((ask, req))) = started {
                self.send_lease(name.clone(), place, ask, &req, now, true);
                sent += 1;
            }
        }
        sent
    }

    /// Removes this worker's health entry (plugin unload): the node's state is then
    /// its remaining workers'.
    pub fn retire(&self) {
        let now = host::now_ms();
        let create = Create::ViaLock { now_ms: now };
        let _ = cas_update(&HostStore, HEALTH, CAS_RETRIES, create, |current| {
            let mut h: Health = current.and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default();
            let before = h.workers.len();
            h.workers.retain(|w| w.worker != self.worker);
            if h.workers.len() == before {
                return CasStep::Keep(());
            }
            let summary = fleet_health::summarize(&mut h.workers, now);
            h.state = summary.state;
            h.degraded_workers = summary.degraded_workers;
            CasStep::Write(serde_json::to_vec(&h).unwrap_or_default(), ())
        });
    }

    pub fn pending_calls(&self) -> usize {
        self.calls.borrow().len()
    }

    /// Merges this worker's counters into `km/fleet` and updates the metrics.
    fn publish(&self, now: u64, overdraft_in_use: u64) {
        let delta = std::mem::take(&mut *self.delta.borrow_mut());
        let state = self.breaker.borrow().state(now);
        let seen = (
            state,
            overdraft_in_use,
            self.subjects.borrow().len(),
            self.last_latency.get(),
        );
        if delta == Counters::default()
            && self.published.get() == Some(seen)
            && now.saturating_sub(self.published_at.get()) < HEARTBEAT_MS
        {
            return;
        }
        self.published.set(Some(seen));
        self.published_at.set(now);
        let m = &self.metrics;
        for (i, v) in [
            delta.lease_decisions,
            delta.take_decisions,
            delta.fallback_decisions,
            delta.exhausted_decisions,
        ]
        .into_iter()
        .enumerate()
        {
            Metrics::add(m.decisions[i], v);
        }
        Metrics::add(m.calls, delta.lease_calls + delta.take_calls);
        Metrics::add(m.failures, delta.lease_failures + delta.take_failures);
        Metrics::add(m.latency, delta.refill_latency_ms_sum);
        Metrics::add(m.overdraft, delta.overdraft_units);
        let create = Create::ViaLock { now_ms: now };
        let node_state = cas_update(&HostStore, HEALTH, CAS_RETRIES, create, |current| {
            let mut h: Health = current.and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default();
            h.counters.add(&delta);
            h.node_id.clone_from(&self.node_id);
            let idle = self.subjects.borrow().is_empty();
            let mine = WorkerHealth {
                worker: self.worker.clone(),
                state: match state {
                    BreakerState::Closed => "connected",
                    BreakerState::Open => "partitioned",
                    BreakerState::HalfOpen if idle => "idle",
                    BreakerState::HalfOpen => "probing",
                }
                .into(),
                subjects: self.subjects.borrow().len(),
                overdraft_in_use,
                refill_latency_ms_last: self.last_latency.get(),
                updated_at_ms: now,
            };
            fleet_health::upsert(&mut h.workers, mine);
            let summary = fleet_health::summarize(&mut h.workers, now);
            h.state = summary.state;
            h.degraded_workers = summary.degraded_workers;
            h.overdraft_in_use = summary.overdraft_in_use;
            h.subjects = summary.subjects;
            h.fleet_size = self.cfg.fleet_size;
            let c = &h.counters;
            let decided = c.lease_decisions + c.take_decisions + c.fallback_decisions + c.exhausted_decisions;
            h.lease_hit_ratio = if decided == 0 {
                0.0
            } else {
                c.lease_decisions as f64 / decided as f64
            };
            let answered = c.lease_calls.saturating_sub(c.lease_failures).max(1);
            h.refill_latency_ms_mean = c.refill_latency_ms_sum as f64 / answered as f64;
            if self.last_latency.get() > 0 {
                h.refill_latency_ms_last = self.last_latency.get();
            }
            h.last_success_at_ms = h.last_success_at_ms.max(self.last_success_ms.get());
            if let Some((at, e)) = self.last_error.borrow().as_ref() {
                if *at >= h.last_failure_at_ms {
                    h.last_failure_at_ms = *at;
                    h.last_error = Some(e.clone());
                }
            }
            let partitioned = h.state == "partitioned";
            CasStep::Write(serde_json::to_vec(&h).unwrap_or_default(), partitioned)
        });
        // The node's state (the worst live worker's), not this worker's: every worker
        // sets the one gauge.
        if let (Some(id), Ok(partitioned)) = (m.partitioned, node_state) {
            let _ = hostcalls::record_metric(id, u64::from(partitioned));
        }
    }
}

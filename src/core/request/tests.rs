//! Host tests of the request decision with a counting fake host: every path's exact
//! sequence of host calls, request and response phase, as the adapter makes them.

use super::*;
use crate::core::auth::api_key::{assemble, hash_key};
use crate::core::auth::cidr::Cidr;
use crate::core::auth::key_record::{stored_hash, KeyRecord};
use crate::core::auth::problem::Problem;
use crate::core::auth::scope::Scope;
use crate::core::config::Config;
use crate::core::keyset::full_push::FullPush;
use crate::core::keyset::meta::Meta;
use crate::core::limits::plan::{LimitBy, NamedBucket, NamedQuota, Plan};
use crate::core::limits::quota::Period;
use crate::core::limits::token_bucket::BucketLimit;
use crate::core::limits::worker_lease::WorkerLeases;
use crate::core::mem_store::MemStore;
use crate::core::metering::usage::Outcome;
use crate::core::store::{Store, StoreError};
use crate::core::time::Clock;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::rc::Rc;

const T0: u64 = 1_700_000_000_000;
const ID: &str = "AbCdEf012345";
const SECRET: &str = "s3cr3ts3cr3ts3cr3ts3cr3ts3cr3t00";

type Log = Rc<RefCell<Vec<String>>>;
/// Another worker's writes, run between two reads of the request under test.
type Interleave = Box<dyn FnOnce(&MemStore)>;

/// Shared data that logs every get and set (each is one host call).
struct CountingStore {
    mem: MemStore,
    log: Log,
}

impl Store for CountingStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        self.log.borrow_mut().push(format!("get {key}"));
        self.mem.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.log.borrow_mut().push(format!("set {key}"));
        self.mem.set(key, value, cas)
    }
}

/// The fake host: request headers, peer address and clock, every read logged.
struct FakeHost {
    store: Rc<CountingStore>,
    headers: HashMap<&'static str, String>,
    peer: Option<IpAddr>,
    now: Option<u64>,
    plans: PlansCache,
    /// Runs once, just before the next key-entry read: another worker's write landing
    /// between this request's reads.
    before_entry: Option<Interleave>,
    /// The worker's key cache, kept across requests like the adapter's.
    cache: KeyCache,
    /// The worker's token leases, likewise.
    leases: WorkerLeases,
    /// What `get_property(["metadata"])` returns (jwt_authn's verified payload).
    metadata: Option<Vec<u8>>,
}

impl FakeHost {
    fn log(&self, what: impl Into<String>) {
        self.store.log.borrow_mut().push(what.into());
    }
    fn header(&mut self, name: &str) -> Option<String> {
        self.log(format!("req_header {name}"));
        self.headers.get(name).cloned()
    }
}

impl Fetch for FakeHost {
    fn api_key_header(&mut self, name: &str) -> Option<String> {
        self.header(name)
    }
    fn authorization(&mut self) -> Option<String> {
        self.header("authorization")
    }
    fn path(&mut self) -> Option<String> {
        self.header(":path")
    }
    fn method(&mut self) -> Option<String> {
        self.header(":method")
    }
    fn peer_ip(&mut self) -> Option<IpAddr> {
        self.log("property source.address");
        self.peer
    }
    fn now_ms(&mut self) -> Option<u64> {
        self.log("time");
        self.now
    }
    fn meta(&mut self) -> Option<(Meta, u32)> {
        let (bytes, cas) = crate::core::store::read_value(&*self.store, crate::core::keyset::names::META);
        Some((Meta::decode(&bytes?)?, cas))
    }
    fn key_entry(&mut self, id: &str) -> Option<Vec<u8>> {
        if let Some(f) = self.before_entry.take() {
            f(&self.store.mem);
        }
        let mut buf = [0u8; 32];
        self.store
            .get(crate::core::keyset::names::key_entry_name(id, &mut buf))
            .0
    }
    fn plans(&mut self, meta: &Meta) -> Rc<BTreeMap<String, Plan>> {
        self.plans.get(&*self.store, meta)
    }
    fn dynamic_metadata(&mut self) -> Option<Vec<u8>> {
        self.log("property metadata");
        self.metadata.clone()
    }
}

fn key() -> String {
    assemble(ID, SECRET)
}

fn record() -> KeyRecord {
    KeyRecord {
        id: ID.into(),
        hash: stored_hash(&hash_key(&key())),
        consumer: "acme".into(),
        plan: "pro".into(),
        enabled: true,
        not_before: None,
        expires_at: None,
        scopes: vec![],
        cidrs: vec![],
        metadata: vec![("tier".into(), "gold".into())],
        lineage: None,
        limits: None,
    }
}

fn plan(rate: u64, burst: u64, quota: Option<u64>) -> Plan {
    Plan {
        rate_limits: vec![NamedBucket {
            name: "burst".into(),
            limit: BucketLimit {
                rate,
                interval_ms: 1000,
                burst,
            },
        }],
        quotas: quota
            .map(|limit| {
                vec![NamedQuota {
                    name: "daily".into(),
                    period: Period::Day,
                    limit,
                }]
            })
            .unwrap_or_default(),
        limit_by: LimitBy::Key,
        costs: vec![],
        default_cost: 1,
    }
}

/// A host with the key set `recs` and `plans` loaded and the key in `x-api-key`.
fn host(recs: &[KeyRecord], plans: &[(&str, Plan)]) -> FakeHost {
    let store = Rc::new(CountingStore {
        mem: MemStore::default(),
        log: Log::default(),
    });
    let mut push = FullPush::begin(&*store, Clock::Fixed(T0)).unwrap();
    for r in recs {
        push.add(r).unwrap();
    }
    let plans: BTreeMap<String, Plan> = plans.iter().map(|(n, p)| (n.to_string(), p.clone())).collect();
    push.commit(1, &plans, false).unwrap();
    FakeHost {
        store,
        headers: HashMap::from([
            ("x-api-key", key()),
            (":path", "/v1/items?x=1".to_string()),
            (":method", "GET".to_string()),
        ]),
        peer: Some("10.1.2.3".parse().unwrap()),
        now: Some(T0),
        plans: PlansCache::default(),
        before_entry: None,
        cache: KeyCache::default(),
        leases: WorkerLeases::default(),
        metadata: None,
    }
}

fn cfg(json: &str) -> Config {
    Config::parse(json.as_bytes()).unwrap()
}

fn filter_cfg() -> Config {
    cfg(r#"{"role":"filter"}"#)
}

/// Runs one request the way the adapter does (decide, then apply: local reply or
/// request-header writes; then the response phase) and returns the decision and every
/// host call made, in order.
fn run(cfg: &Config, h: &mut FakeHost) -> (Decision, Vec<String>) {
    h.store.log.borrow_mut().clear();
    let store = h.store.clone();
    let mut cache = std::mem::take(&mut h.cache);
    let mut leases = std::mem::take(&mut h.leases);
    let d = decide(cfg, &mut cache, &mut leases, h, &*store);
    h.cache = cache;
    h.leases = leases;
    let mut calls = std::mem::take(&mut *h.store.log.borrow_mut());
    if d.refused.is_some() {
        let mut retry = String::new();
        let _ = d.refusal_headers(&cfg.challenges(), &mut retry);
        calls.push("send_local_reply".into());
    } else {
        d.for_each_request_header(cfg, |name, value| {
            calls.push(match value {
                Some(_) => format!("set_req {name}"),
                None => format!("remove_req {name}"),
            })
        });
    }
    if d.reads_response_status(cfg.metering.enabled) {
        calls.push("resp_header :status".into());
    }
    for (name, _) in d.response_headers() {
        calls.push(format!("set_resp {name}"));
    }
    (d, calls)
}

/// Runs a first request (fills the plans cache and the worker's copy of `km/meta`,
/// creates the limit state), then forgets the cached key record, so the measured
/// request reads its key entry: the path of a worker's first request of a key after
/// any key-set change. (`hot` keeps it.)
fn warm(cfg: &Config, h: &mut FakeHost) {
    run(cfg, h);
    h.cache.forget_records();
}

/// The worker's tick `POLL_MS` later: the clock moves on and the copy of `km/meta` is
/// re-read, as `adapter::root` does.
fn tick(h: &mut FakeHost) {
    let now = h.now.unwrap() + super::meta_copy::POLL_MS;
    h.now = Some(now);
    let store = h.store.clone();
    h.cache.poll_meta(now, || {
        let (bytes, cas) = crate::core::store::read_value(&store.mem, crate::core::keyset::names::META);
        Some((Meta::decode(&bytes?)?, cas))
    });
}

/// Like `warm`, but keeps the key record cached: the steady state of a busy key.
fn hot(cfg: &Config, h: &mut FakeHost) {
    run(cfg, h);
}

const IDENTITY: [&str; 4] = [
    "set_req x-keymeter-key-id",
    "set_req x-keymeter-consumer",
    "set_req x-keymeter-plan",
    "set_req x-keymeter-auth",
];

fn seq(parts: &[&[&str]]) -> Vec<String> {
    parts.iter().flat_map(|p| p.iter().map(|s| s.to_string())).collect()
}

fn key_entry() -> String {
    format!("get k/{ID}")
}

#[test]
fn admitted_request_reading_its_key_entry_makes_13_host_calls() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    assert_eq!(d.outcome, Outcome::Admitted);
    assert_eq!(d.cost, 1);
    let rl = format!("km/rl/k/{ID}");
    assert_eq!(
        calls,
        seq(&[
            &["time", "req_header x-api-key", &key_entry()],
            &[&format!("get {rl}"), &format!("set {rl}")],
            &IDENTITY,
            &["remove_req x-api-key"],
            &["resp_header :status", "set_resp ratelimit-policy", "set_resp ratelimit"],
        ])
    );
    assert_eq!(calls.len(), 13, "host calls per admitted request reading its key entry");
    assert_eq!(
        d.ratelimit,
        Some((r#""burst";q=100;w=1"#.into(), r#""burst";r=98;t=0"#.into()))
    );
}

#[test]
fn first_request_reads_plans_once_and_creates_limit_state() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    let (_, first) = run(&c, &mut h);
    assert!(first.iter().any(|c| c.starts_with("get km/plans")), "{first:?}");
    let (_, second) = run(&c, &mut h);
    assert!(!second.iter().any(|c| c.starts_with("get km/plans")), "{second:?}");
    assert!(first.len() > second.len());
}

#[test]
fn metering_off_skips_the_status_read_and_headers_off_skip_ratelimit() {
    let c = cfg(r#"{"role":"filter","metering":{"enabled":false},"rate_limit_headers":false}"#);
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    warm(&c, &mut h);
    let (_, calls) = run(&c, &mut h);
    assert!(!calls
        .iter()
        .any(|c| c.starts_with("resp_header") || c.starts_with("set_resp")));
    assert_eq!(calls.len(), 10, "{calls:?}");
}

#[test]
fn key_without_limits_in_its_plan_skips_the_limit_state() {
    let c = filter_cfg();
    let mut unlimited = plan(1, 1, None);
    unlimited.rate_limits.clear();
    let mut h = host(&[record()], &[("pro", unlimited)]);
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    assert_eq!(
        calls,
        seq(&[
            &["time", "req_header x-api-key", &key_entry()],
            &IDENTITY,
            &["remove_req x-api-key", "resp_header :status"],
        ])
    );
}

fn refused(d: &Decision) -> Problem {
    d.refused.expect("refused").problem
}

#[test]
fn unauthenticated_refusals_stop_early() {
    let c = filter_cfg();
    let base = || host(&[record()], &[("pro", plan(100, 100, None))]);

    let mut h = base();
    h.headers.clear();
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::MissingCredential);
    assert_eq!(d.unauthenticated, Some(Unauthenticated::Missing));
    assert_eq!(d.caller, Caller::Nobody);
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "get km/meta",
            "req_header x-api-key",
            "req_header authorization",
            "send_local_reply"
        ]])
    );

    let mut h = base();
    h.headers.insert("x-api-key", "km_nonsense".into());
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::MalformedCredential);
    assert_eq!(d.unauthenticated, Some(Unauthenticated::Malformed));
    assert_eq!(
        calls,
        seq(&[&["time", "get km/meta", "req_header x-api-key", "send_local_reply"]])
    );

    // A well-formed key whose id is not in the set.
    let mut h = base();
    h.headers.insert("x-api-key", assemble("ZZZZZZZZZZZZ", SECRET));
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::InvalidCredential);
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "get km/meta",
            "req_header x-api-key",
            "get k/ZZZZZZZZZZZZ",
            "get km/meta",
            "send_local_reply"
        ]])
    );

    // The right id with the wrong secret.
    let mut h = base();
    h.headers
        .insert("x-api-key", assemble(ID, "00000000000000000000000000000000"));
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::InvalidCredential);
    assert_eq!(d.unauthenticated, Some(Unauthenticated::Invalid));
    assert_eq!(d.caller, Caller::Nobody, "a wrong secret is never charged to the id");
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "get km/meta",
            "req_header x-api-key",
            &key_entry(),
            "send_local_reply"
        ]])
    );
    // The same refusals from a worker whose copy of `km/meta` is fresh: no shared-data
    // call before the credential.
    let mut h = base();
    h.headers.clear();
    run(&c, &mut h);
    let (_, calls) = run(&c, &mut h);
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "req_header x-api-key",
            "req_header authorization",
            "send_local_reply"
        ]])
    );
}

#[test]
fn no_key_set_denies_or_fails_open() {
    let store = Rc::new(CountingStore {
        mem: MemStore::default(),
        log: Log::default(),
    });
    let mut h = FakeHost {
        store,
        headers: HashMap::from([("x-api-key", key())]),
        peer: None,
        now: Some(T0),
        plans: PlansCache::default(),
        before_entry: None,
        cache: KeyCache::default(),
        leases: WorkerLeases::default(),
        metadata: None,
    };
    let (d, calls) = run(&filter_cfg(), &mut h);
    assert_eq!(refused(&d), Problem::KeySetUnavailable);
    assert_eq!(d.unauthenticated, Some(Unauthenticated::KeySetUnavailable));
    assert_eq!(calls, seq(&[&["time", "get km/meta", "send_local_reply"]]));

    let c = cfg(r#"{"role":"filter","when_no_keyset":"allow","forward_metadata":["tier"]}"#);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    assert_eq!(d.unauthenticated, Some(Unauthenticated::FailOpen));
    // Identity headers are removed, never passed through from the client. ("No key
    // set" is in the worker's copy of `km/meta` now.)
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "remove_req x-keymeter-key-id",
            "remove_req x-keymeter-consumer",
            "remove_req x-keymeter-plan",
            "remove_req x-keymeter-auth",
            "remove_req x-keymeter-meta-tier",
        ]])
    );
}

#[test]
fn key_state_refusals_are_charged_to_the_key() {
    let c = filter_cfg();
    let cases = [
        (
            KeyRecord {
                enabled: false,
                ..record()
            },
            Problem::KeyDisabled,
        ),
        (
            KeyRecord {
                expires_at: Some((T0 / 1000) as i64),
                ..record()
            },
            Problem::KeyExpired,
        ),
        (
            KeyRecord {
                not_before: Some((T0 / 1000) as i64 + 1),
                ..record()
            },
            Problem::KeyNotYetValid,
        ),
    ];
    for (rec, problem) in cases {
        let mut h = host(&[rec], &[("pro", plan(100, 100, None))]);
        warm(&c, &mut h);
        let (d, calls) = run(&c, &mut h);
        assert_eq!(refused(&d), problem);
        assert_eq!(d.outcome, Outcome::Unauthorized);
        assert!(matches!(d.caller, Caller::Key(_)));
        assert_eq!(d.unauthenticated, None);
        assert_eq!(
            calls,
            seq(&[&["time", "req_header x-api-key", &key_entry(), "send_local_reply"]])
        );
    }
}

#[test]
fn scopes_read_method_and_path_and_refuse_outside() {
    let c = filter_cfg();
    let rec = KeyRecord {
        scopes: vec![Scope::new(&["GET".into()], "/v1/items").unwrap()],
        ..record()
    };
    let mut h = host(&[rec], &[("pro", plan(100, 100, None))]);
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    let rl = format!("km/rl/k/{ID}");
    assert_eq!(
        calls,
        seq(&[
            &["time", "req_header x-api-key", &key_entry()],
            &["req_header :method", "req_header :path"],
            &[&format!("get {rl}"), &format!("set {rl}")],
            &IDENTITY,
            &["remove_req x-api-key"],
            &["resp_header :status", "set_resp ratelimit-policy", "set_resp ratelimit"],
        ])
    );

    h.headers.insert(":method", "DELETE".into());
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::OutOfScope);
    assert_eq!(d.outcome, Outcome::Forbidden);
    // The record is cached now.
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "req_header x-api-key",
            "req_header :method",
            "req_header :path",
            "send_local_reply",
        ]])
    );
}

#[test]
fn cidrs_read_the_peer_address_and_refuse_outside() {
    let c = filter_cfg();
    let rec = KeyRecord {
        cidrs: vec![Cidr::parse("10.0.0.0/8").unwrap()],
        ..record()
    };
    let mut h = host(&[rec], &[("pro", plan(100, 100, None))]);
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    assert_eq!(
        &calls[..4],
        seq(&[&["time", "req_header x-api-key", &key_entry(), "property source.address",]])
    );
    assert_eq!(calls.len(), 14);

    h.peer = Some("192.168.1.1".parse().unwrap());
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::AddressNotAllowed);
    assert_eq!(d.outcome, Outcome::Forbidden);
    assert_eq!(calls.len(), 4, "cached record: {calls:?}");
}

#[test]
fn route_costs_read_method_and_path_and_charge_the_cost() {
    let c = filter_cfg();
    let mut p = plan(100, 100, None);
    p.costs = vec![(Scope::new(&["GET".into()], "/v1/items").unwrap(), 7)];
    let mut h = host(&[record()], &[("pro", p)]);
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.cost, 7);
    assert_eq!(
        &calls[..5],
        seq(&[&[
            "time",
            "req_header x-api-key",
            &key_entry(),
            "req_header :method",
            "req_header :path",
        ]])
    );
    assert_eq!(calls.len(), 15);
}

#[test]
fn forwarded_metadata_adds_one_header_write_each() {
    let c = cfg(r#"{"role":"filter","forward_metadata":["tier","region"]}"#);
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    warm(&c, &mut h);
    let (_, calls) = run(&c, &mut h);
    assert_eq!(calls.len(), 15);
    assert!(calls.contains(&"set_req x-keymeter-meta-tier".to_string()));
    // A name the key has no value for is removed (a client cannot inject it).
    assert!(calls.contains(&"remove_req x-keymeter-meta-region".to_string()));
}

#[test]
fn rate_limited_and_quota_refusals_carry_retry_and_ratelimit_headers() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(1, 1, None))]);
    let (d, _) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::RateLimited);
    assert_eq!(d.outcome, Outcome::RateLimited);
    assert_eq!(d.refused.unwrap().retry_after_secs, Some(1));
    let rl = format!("km/rl/k/{ID}");
    // A denial writes nothing; its RateLimit fields go on the local reply. (The key
    // record comes from the worker's cache: the first request read it.)
    assert_eq!(
        calls,
        seq(&[&["time", "req_header x-api-key", &format!("get {rl}"), "send_local_reply",]])
    );
    let (challenges, mut retry) = (c.challenges(), String::new());
    let headers = d.refusal_headers(&challenges, &mut retry);
    let names: Vec<&str> = headers.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "content-type",
            "cache-control",
            "retry-after",
            "ratelimit-policy",
            "ratelimit"
        ]
    );

    let mut h = host(&[record()], &[("pro", plan(100, 100, Some(1)))]);
    run(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::QuotaExceeded);
    assert_eq!(d.outcome, Outcome::QuotaExceeded);
    assert_eq!(calls.len(), 4, "cached record: {calls:?}");
}

#[test]
fn a_cost_above_burst_is_refused_without_retry_after() {
    let c = filter_cfg();
    let mut p = plan(1, 2, None);
    p.default_cost = 3;
    let mut h = host(&[record()], &[("pro", p)]);
    let (d, _) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::CostExceedsBurst);
    assert_eq!(d.refused.unwrap().retry_after_secs, None);
}

#[test]
fn contention_denies_or_allows_by_configuration() {
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    warm(&filter_cfg(), &mut h);
    let rl = format!("km/rl/k/{ID}");
    // Another worker writes the limit state before each of our CAS writes.
    let other = h.store.clone();
    *h.store.mem.before_set.borrow_mut() = Some(Box::new(move |k: &str| {
        if k == rl {
            other.mem.map_set_raw(k, &[]);
        }
    }));
    let (d, calls) = run(&filter_cfg(), &mut h);
    assert!(d.contended);
    assert_eq!(refused(&d), Problem::RateLimited);
    assert_eq!(d.refused.unwrap().retry_after_secs, Some(1));
    assert_eq!(d.ratelimit, None);
    let cas = crate::core::limits::limiter::CAS_RETRIES;
    assert_eq!(calls.len(), 3 + 2 * cas + 1, "bounded retries");

    let (d, _) = run(&cfg(r#"{"role":"filter","on_contention":"allow"}"#), &mut h);
    assert!(d.contended);
    assert_eq!(d.refused, None);
}

#[test]
fn consumer_limits_share_one_state_key() {
    let c = filter_cfg();
    let mut p = plan(100, 100, None);
    p.limit_by = LimitBy::Consumer;
    let mut h = host(&[record()], &[("pro", p)]);
    warm(&c, &mut h);
    let (_, calls) = run(&c, &mut h);
    assert!(calls.contains(&"set km/rl/c/acme".to_string()), "{calls:?}");
}

#[test]
fn bearer_and_query_param_credentials_are_found_and_stripped() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    h.headers.remove("x-api-key");
    h.headers.insert("authorization", format!("Bearer {}", key()));
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.strip, Some(Strip::Authorization));
    assert_eq!(
        &calls[..3],
        seq(&[&["time", "req_header x-api-key", "req_header authorization"]])
    );
    assert!(calls.contains(&"remove_req authorization".to_string()));
    assert_eq!(calls.len(), 14);

    let c =
        cfg(r#"{"role":"filter","credentials":{"header":null,"bearer":false,"basic":false,"query_param":"api_key"}}"#);
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    h.headers.clear();
    h.headers
        .insert(":path", format!("/v1/items?a=1&api_key={}&b=2", key()));
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.strip, Some(Strip::Path("/v1/items?a=1&b=2".into())));
    // The path read for the credential is reused; no header source is read.
    assert_eq!(
        calls,
        seq(&[
            &["time", "req_header :path", &key_entry()],
            &[&format!("get km/rl/k/{ID}"), &format!("set km/rl/k/{ID}")],
            &IDENTITY,
            &["set_req :path"],
            &["resp_header :status", "set_resp ratelimit-policy", "set_resp ratelimit"],
        ])
    );
}

#[test]
fn keep_credential_skips_the_strip() {
    let c = cfg(r#"{"role":"filter","keep_credential":true}"#);
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.strip, None);
    assert_eq!(calls.len(), 12);
}

#[test]
fn anonymous_plan_limits_per_client_address() {
    let c = cfg(r#"{"role":"filter","anonymous":{"plan":"free"}}"#);
    let mut h = host(&[record()], &[("free", plan(1, 1, None))]);
    h.headers.remove("x-api-key");
    warm(&c, &mut h);
    h.now = Some(T0 + 5_000);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    assert_eq!(d.caller, Caller::Anonymous("free".into()));
    // the first candidate slot of 10.1.2.3 in the bounded anonymous table
    let rl = &crate::core::limits::subject_table::slot_name(crate::core::limits::subject_table::slot_of(
        "10.1.2.3",
        0,
        crate::core::limits::subject_table::ANONYMOUS_SLOTS,
    ));
    // 5 s later: the worker's copy of `km/meta` is stale (no tick ran), read inline.
    assert_eq!(
        calls,
        seq(&[
            &[
                "time",
                "get km/meta",
                "req_header x-api-key",
                "req_header authorization"
            ],
            &["property source.address", "req_header :method", "req_header :path"],
            &[&format!("get {rl}"), &format!("set {rl}")],
            &[
                "remove_req x-keymeter-key-id",
                "set_req x-keymeter-consumer",
                "set_req x-keymeter-plan",
                "set_req x-keymeter-auth",
            ],
            &["resp_header :status", "set_resp ratelimit-policy", "set_resp ratelimit"],
        ])
    );
    let (d, _) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::RateLimited);
    assert_eq!(
        d.caller,
        Caller::Anonymous("free".into()),
        "anonymous refusals are counted"
    );

    // A plan missing from the key set fails closed.
    let c = cfg(r#"{"role":"filter","anonymous":{"plan":"gone"}}"#);
    let (d, _) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::MissingCredential);
}

#[test]
fn refusal_of_a_missing_key_challenges_every_enabled_scheme() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    h.headers.clear();
    let (d, _) = run(&c, &mut h);
    let (challenges, mut retry) = (c.challenges(), String::new());
    let n = d
        .refusal_headers(&challenges, &mut retry)
        .iter()
        .filter(|(n, _)| *n == "www-authenticate")
        .count();
    assert_eq!(n, 2);
}

#[test]
fn an_ambiguous_path_is_refused_only_when_a_path_rule_depends_on_it() {
    let c = filter_cfg();
    let rec = KeyRecord {
        scopes: vec![Scope::new(&["GET".into()], "/v1/items").unwrap()],
        ..record()
    };
    let mut h = host(&[rec], &[("pro", plan(100, 100, None))]);
    h.headers.insert(":path", "/v1/items/..;/admin".into());
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::AmbiguousPath);
    assert_eq!(d.outcome, Outcome::Forbidden);
    assert!(matches!(d.caller, Caller::Key(_)));
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "req_header x-api-key",
            &key_entry(),
            "req_header :method",
            "req_header :path",
            "send_local_reply",
        ]])
    );
    // Without scopes or costs the path is not even read.
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    h.headers.insert(":path", "/v1/items/..;/admin".into());
    let (d, _) = run(&c, &mut h);
    assert_eq!(d.refused, None);
}

/// Commits a full push of `recs` (version `version`) straight into `mem`.
fn full_push(mem: &MemStore, version: u64, recs: &[KeyRecord], plans: &[(&str, Plan)]) {
    let mut push = FullPush::begin(mem, Clock::Fixed(T0)).unwrap();
    for r in recs {
        push.add(r).unwrap();
    }
    let plans: BTreeMap<String, Plan> = plans.iter().map(|(n, p)| (n.to_string(), p.clone())).collect();
    push.commit(version, &plans, false).unwrap();
}

#[test]
fn a_full_push_between_meta_and_key_entry_is_retried_not_refused() {
    let c = filter_cfg();
    let plans = [("pro", plan(100, 100, None))];
    let mut h = host(&[record()], &plans);
    warm(&c, &mut h);
    // The push commits (new generation, old slot swept) after this worker read
    // `km/meta` (its copy is fresh) and before the request reads its key entry.
    h.before_entry = Some(Box::new(move |mem: &MemStore| full_push(mem, 2, &[record()], &plans)));
    let (d, calls) = run(&c, &mut h);
    assert_eq!(
        d.refused, None,
        "a valid key is never refused because of a concurrent push"
    );
    // The retry re-reads meta and the entry; the new generation's plans are read once.
    assert_eq!(
        &calls[..6],
        seq(&[&[
            "time",
            "req_header x-api-key",
            &key_entry(),
            "get km/meta",
            &key_entry(),
            &format!("get {}", crate::core::keyset::names::plans_name(1)),
        ]])
    );
}

#[test]
fn an_unknown_key_costs_one_more_meta_read_and_no_retry() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    h.headers.insert("x-api-key", assemble("ZZZZZZZZZZZZ", SECRET));
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::InvalidCredential);
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "get km/meta",
            "req_header x-api-key",
            "get k/ZZZZZZZZZZZZ",
            "get km/meta",
            "send_local_reply"
        ]])
    );
}

#[test]
fn a_failed_clock_read_fails_closed() {
    let c = filter_cfg();
    // With time 0 an expired key would look valid: it must be refused, not admitted.
    let expired = KeyRecord {
        expires_at: Some((T0 / 1000) as i64 - 60),
        ..record()
    };
    let mut h = host(&[expired], &[("pro", plan(100, 100, None))]);
    warm(&c, &mut h);
    h.now = None;
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::Unavailable);
    assert_eq!(d.refused.unwrap().problem.status(), 503);
    assert_eq!(d.unauthenticated, Some(Unauthenticated::Unavailable));
    // Without the time the copy of `km/meta` cannot be judged: read inline.
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "get km/meta",
            "req_header x-api-key",
            &key_entry(),
            "send_local_reply"
        ]])
    );
    assert!(!calls.iter().any(|c| c.starts_with("set ")), "no limit is consumed");

    let c = cfg(r#"{"role":"filter","anonymous":{"plan":"pro"}}"#);
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    h.headers.remove("x-api-key");
    h.now = None;
    let (d, _) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::Unavailable);
}

#[test]
fn a_key_whose_plan_is_missing_fails_closed() {
    let c = filter_cfg();
    let orphan = KeyRecord {
        plan: "gone".into(),
        ..record()
    };
    let mut h = host(&[orphan], &[("pro", plan(1, 1, None))]);
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::Unavailable, "never unlimited");
    assert_eq!(d.unauthenticated, Some(Unauthenticated::Unavailable));
    assert_eq!(
        calls,
        seq(&[&["time", "req_header x-api-key", &key_entry(), "send_local_reply"]])
    );
}

#[test]
fn a_cached_key_record_saves_the_entry_read_12_host_calls() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    hot(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    let rl = format!("km/rl/k/{ID}");
    assert_eq!(
        calls,
        seq(&[
            &["time", "req_header x-api-key"],
            &[&format!("get {rl}"), &format!("set {rl}")],
            &IDENTITY,
            &["remove_req x-api-key"],
            &["resp_header :status", "set_resp ratelimit-policy", "set_resp ratelimit"],
        ])
    );
    // 13 without the cache; 11 with `headers.forward` leaving out `auth`.
    assert_eq!(calls.len(), 12, "host calls per admitted request, steady state");
}

/// The steady state of a busy key: the worker's lease on its limits covers the
/// request, so neither the limit state's get nor its CAS set is made (see
/// `core::limits::worker_lease`), and the worker's copy of `km/meta` is fresh, so no
/// shared-data call at all. The first request takes its cost only; the second, a CAS,
/// takes a lease sized by the demand seen (capped at 10 ms of rate = 10); the next ten
/// are served from it; the one after that is a CAS again.
#[test]
fn a_request_served_from_the_worker_lease_makes_10_host_calls() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(1000, 1000, None))]);
    hot(&c, &mut h);
    let rl = format!("km/rl/k/{ID}");
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    assert!(calls.contains(&format!("set {rl}")), "{calls:?}");
    assert_eq!(calls.len(), 12);
    assert_eq!(h.leases.held(&rl), 10);
    for i in 0..10u64 {
        let (d, calls) = run(&c, &mut h);
        assert_eq!(d.refused, None);
        assert_eq!(d.cost, 1);
        assert_eq!(
            calls,
            seq(&[
                &["time", "req_header x-api-key"],
                &IDENTITY,
                &["remove_req x-api-key"],
                &["resp_header :status", "set_resp ratelimit-policy", "set_resp ratelimit"],
            ])
        );
        assert_eq!(calls.len(), 10, "host calls per admitted request served from the lease");
        assert!(!calls.iter().any(|c| c.starts_with("get ") || c.starts_with("set ")));
        // The RateLimit field counts what the worker still holds: with one worker and
        // no time passing it is exact.
        assert_eq!(
            d.ratelimit,
            Some((r#""burst";q=1000;w=1"#.into(), format!(r#""burst";r={};t=0"#, 997 - i)))
        );
    }
    let (_, calls) = run(&c, &mut h);
    assert_eq!(calls.len(), 12, "lease spent: a CAS again: {calls:?}");
    // A revoke (any key-set write) is refused, lease or not, once this worker's copy of
    // `km/meta` is refreshed: at its next tick, or inline once the copy is `STALE_MS`
    // old. (The admin API answers the revoke only after that: `core::admin_hold`.)
    use crate::core::keyset::delta::apply_delta;
    use crate::core::keyset::document::CompiledOp;
    let opts = crate::core::keyset::apply::ApplyOptions {
        force: false,
        now_ms: T0,
    };
    assert!(h.leases.held(&rl) > 0);
    apply_delta(&h.store.mem, 2, &[CompiledOp::Revoke(ID.into())], opts).unwrap();
    tick(&mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::InvalidCredential);
    assert!(!calls.iter().any(|c| c.contains("km/rl/")), "{calls:?}");
}

/// Between a key-set write and this worker's next read of `km/meta` (at most
/// `STALE_MS`), the worker still decides with its copy; from `STALE_MS` on it reads
/// inline, tick or no tick: the bound holds on the host clock alone.
#[test]
fn a_stale_copy_of_km_meta_is_read_inline_so_a_revoke_needs_no_tick() {
    use super::meta_copy::STALE_MS;
    use crate::core::keyset::delta::apply_delta;
    use crate::core::keyset::document::CompiledOp;
    let c = filter_cfg();
    let mut unlimited = plan(1, 1, None);
    unlimited.rate_limits.clear();
    let mut h = host(&[record()], &[("pro", unlimited)]);
    hot(&c, &mut h);
    // Fresh copy: no shared-data call at all (the bench's "4a" path).
    let steady = seq(&[
        &["time", "req_header x-api-key"],
        &IDENTITY,
        &["remove_req x-api-key", "resp_header :status"],
    ]);
    assert_eq!(run(&c, &mut h).1, steady);
    // STALE_MS old (no tick ran): still used.
    h.now = Some(T0 + STALE_MS);
    assert_eq!(run(&c, &mut h).1, steady);
    // One ms more: read inline, once, and the copy is fresh again.
    h.now = Some(T0 + STALE_MS + 1);
    let mut inline = steady.clone();
    inline.insert(1, "get km/meta".into());
    assert_eq!(run(&c, &mut h).1, inline);
    assert_eq!(run(&c, &mut h).1, steady);
    // A revoke: the window is the copy's age; past it, refused without any tick.
    let opts = crate::core::keyset::apply::ApplyOptions {
        force: false,
        now_ms: T0,
    };
    apply_delta(&h.store.mem, 2, &[CompiledOp::Revoke(ID.into())], opts).unwrap();
    let copied_at = T0 + STALE_MS + 1;
    h.now = Some(copied_at + STALE_MS);
    assert_eq!(run(&c, &mut h).0.refused, None, "within the bound the copy decides");
    h.now = Some(copied_at + STALE_MS + 1);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::InvalidCredential);
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "get km/meta",
            "req_header x-api-key",
            &key_entry(),
            "get km/meta",
            "send_local_reply"
        ]])
    );
}

/// The worker's tick keeps the copy fresh, so a steady worker reads `km/meta` once per
/// `POLL_MS`, not per request, and sees a write at its next tick.
#[test]
fn the_tick_refreshes_the_copy_and_a_revoke_is_refused_after_it() {
    use crate::core::keyset::delta::apply_delta;
    use crate::core::keyset::document::CompiledOp;
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    hot(&c, &mut h);
    for _ in 0..5 {
        tick(&mut h);
        let (d, calls) = run(&c, &mut h);
        assert_eq!(d.refused, None);
        assert!(!calls.contains(&"get km/meta".to_string()), "{calls:?}");
    }
    let opts = crate::core::keyset::apply::ApplyOptions {
        force: false,
        now_ms: T0,
    };
    apply_delta(&h.store.mem, 2, &[CompiledOp::Revoke(ID.into())], opts).unwrap();
    tick(&mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::InvalidCredential);
    assert!(!calls.iter().any(|c| c.contains("km/rl/")), "{calls:?}");
}

/// A single-token plan (burst 1, or a rate under 100/s) is never leased: every
/// admitted request is one exact CAS, as before.
#[test]
fn a_single_token_plan_makes_a_cas_for_every_request() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(99, 1000, None))]);
    hot(&c, &mut h);
    for _ in 0..5 {
        let (_, calls) = run(&c, &mut h);
        assert_eq!(calls.len(), 12, "{calls:?}");
    }
    assert!(h.leases.is_empty());
}

#[test]
fn a_wrong_secret_is_refused_even_when_the_id_is_cached() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    hot(&c, &mut h);
    h.headers
        .insert("x-api-key", assemble(ID, "00000000000000000000000000000000"));
    let (d, _) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::InvalidCredential);
    assert_eq!(d.caller, Caller::Nobody);
}

#[test]
fn any_key_set_write_invalidates_the_cache_once_the_copy_of_meta_is_refreshed() {
    use crate::core::keyset::delta::apply_delta;
    use crate::core::keyset::document::CompiledOp;
    let c = filter_cfg();
    let plans = [("pro", plan(100, 100, None))];
    let mut h = host(&[record()], &plans);
    hot(&c, &mut h);
    // A delta disabling the key, committed by another worker.
    let opts = crate::core::keyset::apply::ApplyOptions {
        force: false,
        now_ms: T0,
    };
    apply_delta(&h.store.mem, 2, &[CompiledOp::SetEnabled(ID.into(), false)], opts).unwrap();
    tick(&mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(
        refused(&d),
        Problem::KeyDisabled,
        "the first request after the tick sees it"
    );
    assert!(calls.contains(&key_entry()), "{calls:?}");
    // Revoked: refused after the next tick, too.
    hot(&c, &mut h);
    apply_delta(&h.store.mem, 3, &[CompiledOp::Revoke(ID.into())], opts).unwrap();
    tick(&mut h);
    let (d, _) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::InvalidCredential);
    // A full push replacing the key's record.
    let mut h = host(&[record()], &plans);
    hot(&c, &mut h);
    let moved = KeyRecord {
        consumer: "other".into(),
        ..record()
    };
    full_push(&h.store.mem, 2, &[moved], &plans);
    tick(&mut h);
    let (d, _) = run(&c, &mut h);
    let Caller::Key(rec) = d.caller else {
        panic!("not admitted")
    };
    assert_eq!(rec.consumer, "other");
}

/// A worker whose copy of `km/meta` predates two full pushes (the second reusing the
/// slot the copy points at) never refuses a valid key: the lookups are checked against
/// the copy's generation, and a mismatch (an entry or the plans gone) re-reads
/// `km/meta` inline.
#[test]
fn a_copy_older_than_two_full_pushes_reads_inline_and_admits() {
    let c = filter_cfg();
    let plans = [("pro", plan(100, 100, None))];
    // A cached record, plans of the copy's generation no longer in the worker's
    // plans cache: the plans read is what finds the slot reused.
    let mut h = host(&[record()], &plans);
    hot(&c, &mut h);
    full_push(&h.store.mem, 2, &[record()], &plans);
    full_push(&h.store.mem, 3, &[record()], &plans);
    h.plans = PlansCache::default();
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None, "{calls:?}");
    let Caller::Key(_) = d.caller else { panic!() };
    assert_eq!(calls.iter().filter(|c| *c == "get km/meta").count(), 1, "{calls:?}");
    // And without the cached record: the entry read finds the slot reused.
    let mut h = host(&[record()], &plans);
    warm(&c, &mut h);
    full_push(&h.store.mem, 2, &[record()], &plans);
    full_push(&h.store.mem, 3, &[record()], &plans);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None, "{calls:?}");
    assert_eq!(calls.iter().filter(|c| *c == "get km/meta").count(), 1, "{calls:?}");
    // Then the copy is the new generation's: steady again.
    let (_, calls) = run(&c, &mut h);
    assert!(!calls.contains(&"get km/meta".to_string()), "{calls:?}");
}

#[test]
fn a_cached_record_is_reread_after_its_ttl_even_without_a_meta_write() {
    let c = filter_cfg();
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    hot(&c, &mut h);
    // An entry write without a meta write (a delta that failed half-way).
    let disabled = KeyRecord {
        enabled: false,
        ..record()
    };
    let meta = crate::core::keyset::meta::read_meta(&h.store.mem).unwrap();
    let mut entry = crate::core::keyset::entry::KeyEntry::default();
    entry.slots[meta.slot as usize & 1] = Some(crate::core::keyset::entry::Slot {
        gen: meta.gen,
        record: disabled,
    });
    let mut buf = [0u8; 32];
    let name = crate::core::keyset::names::key_entry_name(ID, &mut buf).to_string();
    h.store
        .mem
        .map_set_raw(&name, &crate::core::keyset::entry_format::encode(&entry));
    h.now = Some(T0 + super::key_cache::TTL_MS - 1);
    assert_eq!(run(&c, &mut h).0.refused, None, "within the TTL the cache still serves");
    h.now = Some(T0 + super::key_cache::TTL_MS);
    assert_eq!(refused(&run(&c, &mut h).0), Problem::KeyDisabled);
}

#[test]
fn identity_headers_left_out_by_configuration_cost_no_host_call() {
    let c = cfg(r#"{"role":"filter","headers":{"forward":["key_id"]}}"#);
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    hot(&c, &mut h);
    let (_, calls) = run(&c, &mut h);
    assert_eq!(calls.len(), 9, "{calls:?}");
    assert!(calls.contains(&"set_req x-keymeter-key-id".to_string()));
    assert!(!calls
        .iter()
        .any(|c| c.contains("consumer") || c.contains("x-keymeter-plan")));
    assert!(Config::parse(br#"{"role":"filter","headers":{"forward":["tier"]}}"#).is_err());
}

/// Fleet mode: the limits are left to the node's lease (the adapter decides them with
/// `limits::fleet`), so the single-node limit state is neither read nor written, and
/// the verdict becomes the same refusal a single-node limit gives.
#[test]
fn fleet_mode_defers_limits_to_the_lease() {
    let c = cfg(r#"{"role":"filter","fleet":{"cluster":"limitd","fleet_size":3}}"#);
    let mut h = host(&[record()], &[("pro", plan(100, 100, Some(1000)))]);
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    let f = d.fleet.clone().expect("limits left to the lease");
    assert_eq!(f.subject, format!("k:{ID}"));
    assert_eq!((f.buckets.len(), f.quotas.len(), f.now_ms), (1, 1, T0));
    assert!(!calls.iter().any(|c| c.contains("km/rl/")), "{calls:?}");
    assert_eq!(d.ratelimit, None);
    let mut refused = d.clone();
    refused.apply_fleet(&crate::core::limits::fleet::FleetVerdict {
        denial: Some(crate::core::limits::limiter::Denial::QuotaExceeded),
        retry_after_secs: Some(7),
        via: crate::core::limits::fleet::Via::Exhausted,
    });
    assert_eq!(refused.outcome, Outcome::QuotaExceeded);
    assert_eq!(
        refused.refused,
        Some(Refused {
            problem: Problem::QuotaExceeded,
            retry_after_secs: Some(7)
        })
    );
    assert_eq!(refused.fleet, None);
    // A plan without limits has nothing for the fleet to decide.
    let mut h = host(
        &[record()],
        &[(
            "pro",
            Plan {
                rate_limits: vec![],
                ..plan(1, 1, None)
            },
        )],
    );
    assert_eq!(run(&c, &mut h).0.fleet, None);
    // Consumer-wide limits use the consumer as the subject.
    let mut h = host(
        &[record()],
        &[(
            "pro",
            Plan {
                limit_by: LimitBy::Consumer,
                ..plan(1, 1, None)
            },
        )],
    );
    assert_eq!(run(&c, &mut h).0.fleet.unwrap().subject, "c:acme");
}

/// The JWT paths.
mod jwt;

/// Fleet mode's worker-lease path.
mod fleet;

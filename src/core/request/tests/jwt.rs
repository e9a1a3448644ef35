//! Host-call sequences of the JWT paths (see `core::auth::jwt`): a JWT user, key
//! requests with a `jwt` config (no extra read), `key_wins: false`, refusals and the
//! consumer-shared limit.

use super::*;
use crate::core::auth::jwt::identity::JwtIdentity;
use crate::core::auth::jwt::metadata::encode::metadata;
use serde_json::json;

const NS: &str = "envoy.filters.http.jwt_authn";

fn jwt_cfg(extra: &str) -> Config {
    cfg(&format!(
        r#"{{"role":"filter","jwt":{{"payload_key":"jwt_payload","plan_claim":"plan","default_plan":"pro"{extra}}}}}"#
    ))
}

/// A host with the usual key set, no API key on the request, and jwt_authn's verified
/// payload `claims` in the dynamic metadata.
fn jwt_host(claims: serde_json::Value, plans: &[(&str, Plan)]) -> FakeHost {
    let mut h = host(&[record()], plans);
    h.headers.remove("x-api-key");
    h.metadata = Some(metadata(NS, "jwt_payload", &claims));
    h
}

fn jwt_caller(consumer: &str, plan: &str) -> Caller {
    Caller::Jwt {
        identity: JwtIdentity {
            consumer: consumer.into(),
            plan: plan.into(),
        },
        lineage: format!("jwt-{consumer}"),
    }
}

const JWT_IDENTITY: [&str; 4] = [
    "remove_req x-keymeter-key-id",
    "set_req x-keymeter-consumer",
    "set_req x-keymeter-plan",
    "set_req x-keymeter-auth",
];

#[test]
fn jwt_user_makes_exactly_13_host_calls() {
    let c = jwt_cfg("");
    let mut h = jwt_host(json!({"sub": "alice", "plan": "pro"}), &[("pro", plan(100, 100, None))]);
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    assert_eq!(d.caller, jwt_caller("alice", "pro"));
    assert_eq!((d.outcome, d.cost, d.strip.clone()), (Outcome::Admitted, 1, None));
    let rl = "km/rl/j/alice";
    assert_eq!(
        calls,
        seq(&[
            &[
                "time",
                "req_header x-api-key",
                "req_header authorization",
                "property metadata",
            ],
            &[&format!("get {rl}"), &format!("set {rl}")],
            &JWT_IDENTITY,
            &["resp_header :status", "set_resp ratelimit-policy", "set_resp ratelimit"],
        ])
    );
    assert_eq!(calls.len(), 13, "host calls per admitted JWT request");
}

#[test]
fn key_requests_never_read_the_metadata() {
    let c = jwt_cfg("");
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    h.metadata = Some(metadata(NS, "jwt_payload", &json!({"sub": "alice"})));
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert!(matches!(d.caller, Caller::Key(_)), "the key wins");
    assert!(!calls.iter().any(|c| c == "property metadata"), "{calls:?}");
    assert_eq!(calls.len(), 13, "same as without a jwt config");
    assert!(calls.contains(&"set_req x-keymeter-auth".to_string()));
    // A malformed key is refused, never rescued by a token (and no token is looked for).
    h.headers.insert("x-api-key", "km_nonsense".into());
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::MalformedCredential);
    assert_eq!(calls, seq(&[&["time", "req_header x-api-key", "send_local_reply"]]));
}

#[test]
fn no_key_and_no_token_is_one_metadata_read_more_then_401() {
    let c = jwt_cfg("");
    let mut h = host(&[record()], &[("pro", plan(100, 100, None))]);
    h.headers.clear();
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::MissingCredential);
    assert_eq!(d.unauthenticated, Some(Unauthenticated::Missing));
    assert_eq!(
        calls,
        seq(&[&[
            "time",
            "get km/meta",
            "req_header x-api-key",
            "req_header authorization",
            "property metadata",
            "send_local_reply"
        ]])
    );
    // Metadata of other filters, or of another payload key, is no token.
    h.metadata = Some(metadata(NS, "other_payload", &json!({"sub": "alice"})));
    assert_eq!(refused(&run(&c, &mut h).0), Problem::MissingCredential);
    h.metadata = Some(metadata(
        "envoy.filters.http.other",
        "jwt_payload",
        &json!({"sub": "alice"}),
    ));
    assert_eq!(refused(&run(&c, &mut h).0), Problem::MissingCredential);
    // Garbage fails closed.
    h.metadata = Some(b"\x0a\xff\xff".to_vec());
    assert_eq!(refused(&run(&c, &mut h).0), Problem::MissingCredential);
}

#[test]
fn token_wins_when_configured_reading_no_key_and_stripping_it() {
    let c = jwt_cfg(r#","key_wins":false"#);
    let mut h = jwt_host(json!({"sub": "alice"}), &[("pro", plan(100, 100, None))]);
    h.headers.insert("x-api-key", key());
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.caller, jwt_caller("alice", "pro"));
    assert_eq!(d.strip, Some(Strip::ApiKeyHeader));
    assert_eq!(
        calls,
        seq(&[
            &["time", "property metadata"],
            &["get km/rl/j/alice", "set km/rl/j/alice"],
            &JWT_IDENTITY,
            &["remove_req x-api-key"],
            &["resp_header :status", "set_resp ratelimit-policy", "set_resp ratelimit"],
        ])
    );
    // No token: the key decides as usual.
    h.metadata = None;
    let (d, calls) = run(&c, &mut h);
    assert!(matches!(d.caller, Caller::Key(_)));
    assert_eq!(
        &calls[..3],
        seq(&[&["time", "property metadata", "req_header x-api-key"]])
    );
}

#[test]
fn a_forwarded_token_in_bearer_is_not_a_malformed_key() {
    let c = jwt_cfg("");
    let mut h = jwt_host(json!({"sub": "alice"}), &[("pro", plan(100, 100, None))]);
    h.headers.insert(
        "authorization",
        "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln".into(),
    );
    let (d, _) = run(&c, &mut h);
    assert_eq!(d.caller, jwt_caller("alice", "pro"));
    h.metadata = None;
    assert_eq!(refused(&run(&c, &mut h).0), Problem::MalformedCredential);
}

#[test]
fn plan_from_the_claim_or_default_or_403() {
    let plans = [("pro", plan(100, 100, None)), ("free", plan(100, 100, None))];
    let c = jwt_cfg("");
    let mut h = jwt_host(json!({"sub": "alice", "plan": "free"}), &plans);
    assert_eq!(run(&c, &mut h).0.caller, jwt_caller("alice", "free"));
    h.metadata = Some(metadata(NS, "jwt_payload", &json!({"sub": "alice", "plan": "gold"})));
    assert_eq!(run(&c, &mut h).0.caller, jwt_caller("alice", "pro"));

    let c = cfg(r#"{"role":"filter","jwt":{"payload_key":"jwt_payload","plan_claim":"plan"}}"#);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(refused(&d), Problem::TokenPlanUnknown);
    assert_eq!(refused(&d).status(), 403);
    assert_eq!(
        (d.caller.clone(), d.unauthenticated),
        (Caller::Nobody, Some(Unauthenticated::TokenPlanUnknown))
    );
    assert_eq!(calls.last().map(String::as_str), Some("send_local_reply"));
    assert!(
        !calls.iter().any(|c| c.starts_with("get km/rl")),
        "nothing is limited or charged"
    );

    for claims in [
        json!({"plan": "pro"}),
        json!({"sub": "a.b"}),
        json!({"sub": 42}),
        json!({"sub": ["x"]}),
    ] {
        h.metadata = Some(metadata(NS, "jwt_payload", &claims));
        let d = run(&jwt_cfg(""), &mut h).0;
        assert_eq!(refused(&d), Problem::TokenIdentityUnusable, "{claims}");
        assert_eq!(d.unauthenticated, Some(Unauthenticated::TokenIdentityUnusable));
    }
}

#[test]
fn consumer_limits_are_shared_with_the_consumers_keys() {
    let c = jwt_cfg("");
    let mut p = plan(1, 2, None);
    p.limit_by = LimitBy::Consumer;
    // record() is consumer acme, plan pro; the token is consumer acme too.
    let mut h = jwt_host(json!({"sub": "acme"}), &[("pro", p)]);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.refused, None);
    assert!(calls.contains(&"set km/rl/c/acme".to_string()), "{calls:?}");
    h.headers.insert("x-api-key", key());
    assert_eq!(run(&c, &mut h).0.refused, None, "the key takes the second token");
    let d = run(&c, &mut h).0;
    assert_eq!(
        refused(&d),
        Problem::RateLimited,
        "key: bucket shared with the JWT user is empty"
    );
    h.headers.remove("x-api-key");
    let d = run(&c, &mut h).0;
    assert_eq!(refused(&d), Problem::RateLimited);
    assert_eq!(d.caller, jwt_caller("acme", "pro"), "a JWT user's 429 is charged to it");
    assert!(d.ratelimit.is_some());
}

#[test]
fn route_costs_read_method_and_path_for_jwt_users() {
    let c = jwt_cfg("");
    let mut p = plan(100, 100, None);
    p.costs = vec![(Scope::new(&["GET".into()], "/v1/items").unwrap(), 7)];
    let mut h = jwt_host(json!({"sub": "alice"}), &[("pro", p)]);
    warm(&c, &mut h);
    let (d, calls) = run(&c, &mut h);
    assert_eq!(d.cost, 7);
    assert_eq!(
        &calls[3..6],
        seq(&[&["property metadata", "req_header :method", "req_header :path"]])
    );
}

"""JWT users beside API-key clients, in real Envoy with real signed tokens.

Envoy's jwt_authn (before keymeter) verifies RS256 tokens from jwt_tokens.Issuer against
a local JWKS and writes the payload to dynamic metadata; keymeter maps the verified
claims to a consumer and plan, limits and meters the request like an API key of that
consumer. Routes: `/` accepts either credential (the harness default), the extra routes
below need a JWT or take API keys only."""

from __future__ import annotations

import time

import pytest

import harness
from jwt_tokens import Issuer, bearer
from keys import Key, keyset
from test_auth import assert_problem, get, push
from test_metering import prom_samples, usage


@pytest.fixture(scope="module")
def idp() -> Issuer:
    return Issuer()


def jwt_routes() -> list[dict]:
    return [
        {"match": {"prefix": "/app/"}, "route": {"cluster": "backend"},
         "typed_per_filter_config": harness.jwt_route_config("jwt")},
        {"match": {"prefix": "/partner/"}, "route": {"cluster": "backend"},
         "typed_per_filter_config": harness.jwt_route_config(None)},
    ]  # fmt: skip


# --------------------------------------------------------------------------- jwt_authn alone


def test_harness_jwt_authn_verifies_tokens_per_route(start_envoy, backend, idp):
    """The harness's jwt_authn set-up without keymeter: what Envoy itself refuses."""
    envoy = start_envoy(wasm=False, jwt_authn=harness.jwt_authn_filter(jwks=idp.jwks_json()), extra_routes=jwt_routes())
    get = lambda path, headers=None: harness.http("GET", envoy.url(path), headers)  # noqa: E731
    good = idp.token("alice")
    assert get("/v1/x", bearer(good)).status == 200
    # forward: false: the verified token is not passed on.
    assert "authorization" not in {k.lower() for k in backend.requests()[-1]["headers"]}
    assert get("/v1/x").status == 200, "either: no token is fine (keymeter decides)"
    assert get("/app/x").status == 401, "jwt: no token"
    assert get("/app/x", bearer(good)).status == 200
    bad = {
        "expired": idp.token("alice", expires_in=-120),
        "wrong audience": idp.token("alice", audience="someone-else"),
        "wrong issuer": idp.token("alice", issuer="https://evil.test"),
        "bad signature": Issuer(kid=idp.kid).token("alice"),
        "tampered": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
        "not a jwt": "km_notajwt",
    }
    # jwt_authn answers 401, except 403 for a token valid in every way but its audience.
    for what, token in bad.items():
        for path in ("/v1/x", "/app/x"):
            r = get(path, bearer(token))
            assert r.status == (403 if what == "wrong audience" else 401), (what, path, r)
    # API keys only: jwt_authn is off, whatever the client sends.
    assert get("/partner/x", bearer(bad["expired"])).status == 200


# --------------------------------------------------------------------------- keymeter with JWT

SLOW = {"name": "hourly", "rate": 1, "per": "1h"}
PLANS = {
    "free": {"rate_limits": [{**SLOW, "burst": 3}]},
    "pro": {"rate_limits": [{**SLOW, "burst": 100}]},
    # One set of counters per consumer, shared by its keys and its JWT users.
    "team": {"rate_limits": [{**SLOW, "burst": 4}], "limit_by": "consumer"},
}
FLUSH = "200ms"


def keymeter_conf(**jwt) -> dict:
    return {
        "role": "filter",
        "metering": {"flush_interval": FLUSH},
        "jwt": harness.jwt_filter_conf(**({"plan_claim": "plan", "default_plan": "free"} | jwt)),
    }


def start(start_envoy, idp, conf=None, **jwt_authn):
    return start_envoy(
        concurrency=2,
        filter_conf=conf or keymeter_conf(),
        jwt_authn=harness.jwt_authn_filter(jwks=idp.jwks_json(), **jwt_authn),
        extra_routes=jwt_routes(),
    )


@pytest.fixture
def env(start_envoy, backend, idp):
    envoy = start(start_envoy, idp)
    keys = {"acme-free": Key(consumer="acme", plan="free"), "acme-team": Key(consumer="acme", plan="team")}
    assert push(envoy, keyset(1, list(keys.values()), PLANS)).status == 200
    backend.clear()
    return envoy, keys


def usage_rows(envoy) -> dict:
    return {row["lineage"]: row for row in usage(envoy)["items"]}


def wait_counted(envoy, lineage, **want) -> dict:
    """Waits until the usage row of `lineage` has exactly the `want` request counts."""

    def done():
        row = usage_rows(envoy).get(lineage)
        return row if row and all(row["requests"][k] == v for k, v in want.items()) else None

    return harness.wait_until(done, timeout=10, message=f"{lineage}: {want} not counted: {usage_rows(envoy)}")


def sent_identity(backend) -> dict:
    h = backend.requests()[-1]["headers"]
    return {k: h.get(k) for k in (*harness.IDENTITY_HEADERS, "authorization", "x-api-key")}


def test_valid_token_gets_identity_headers_and_counted_usage(env, backend, idp):
    envoy, keys = env
    r = get(envoy, "/v1/things", bearer(idp.token("alice", plan="pro")))
    assert r.status == 200, r
    assert sent_identity(backend) == {
        "x-keymeter-key-id": None, "x-keymeter-consumer": "alice", "x-keymeter-plan": "pro",
        "x-keymeter-auth": "jwt", "authorization": None, "x-api-key": None,
    }  # fmt: skip
    assert r.headers.get("ratelimit-policy") == '"hourly";q=1;w=3600'
    # An API-key request says so too.
    assert get(envoy, "/v1/things", {"x-api-key": keys["acme-free"].key}).status == 200
    assert sent_identity(backend)["x-keymeter-auth"] == "api-key"
    for _ in range(2):
        assert get(envoy, "/v1/things", bearer(idp.token("alice", plan="pro"))).status == 200
    row = wait_counted(envoy, "jwt-alice", admitted=3)
    assert (row["consumer"], row["plan"], row["credential"]) == ("alice", "pro", "jwt")
    assert row["responses"]["2xx"] == 3
    key_row = wait_counted(envoy, keys["acme-free"].id, admitted=1)
    assert key_row["credential"] == "api-key"
    # Prometheus: the same counts, labelled credential="jwt".
    samples = prom_samples(envoy, "keymeter_requests_total")
    labels = frozenset({("consumer", "alice"), ("plan", "pro"), ("key_id", "jwt-alice"), ("credential", "jwt"),
                        ("outcome", "admitted")})  # fmt: skip
    assert samples.get(labels) == 3, samples
    assert any(("credential", "api-key") in k for k in samples), samples


def test_tokens_jwt_authn_refuses_reach_nothing_and_count_nothing(env, backend, idp):
    envoy, _ = env
    bad = {
        "expired": (idp.token("alice", expires_in=-120), 401, "Jwt is expired"),
        "wrong audience": (idp.token("alice", audience="other-api"), 403, "Audiences in Jwt are not allowed"),
        "bad signature": (Issuer(kid=idp.kid).token("alice"), 401, "Jwt verification fails"),
    }
    for what, (token, status, text) in bad.items():
        for path in ("/v1/things", "/app/things"):
            r = get(envoy, path, bearer(token))
            assert (r.status, r.text) == (status, text), (what, path, r)
    assert backend.requests() == []
    # A counted request afterwards, then one more flush interval: whatever keymeter
    # had counted for the refused ones would be in the usage API and metrics by now.
    assert get(envoy, "/v1/things", bearer(idp.token("bob"))).status == 200
    wait_counted(envoy, "jwt-bob", admitted=1)
    time.sleep(0.5)
    rows = usage_rows(envoy)
    assert set(rows) == {"jwt-bob"}, rows
    assert sum(rows["jwt-bob"]["requests"].values()) == 1
    assert sum(prom_samples(envoy, "keymeter_unauthenticated_total").values()) == 0


def test_token_plus_key_is_the_key(env, backend, idp):
    envoy, keys = env
    k = keys["acme-free"]
    r = get(envoy, "/v1/things", {"x-api-key": k.key, **bearer(idp.token("alice", plan="pro"))})
    assert r.status == 200, r
    ident = sent_identity(backend)
    assert ident["x-keymeter-key-id"] == k.id
    assert (ident["x-keymeter-consumer"], ident["x-keymeter-plan"], ident["x-keymeter-auth"]) == ("acme", "free", "api-key")
    assert ident["x-api-key"] is None and ident["authorization"] is None
    # A malformed key is not rescued by a good token: the key decides.
    assert_problem(get(envoy, "/v1/things", {"x-api-key": "km_typo", **bearer(idp.token("alice"))}), 401, "malformed-credential")
    wait_counted(envoy, k.id, admitted=1)
    assert "jwt-alice" not in usage_rows(envoy)


def test_client_sent_identity_and_metadata_names_have_no_effect(env, backend, idp):
    envoy, _ = env
    forged = [
        ("x-keymeter-consumer", "mallory"), ("x-keymeter-plan", "pro"), ("x-keymeter-auth", "jwt"),
        ("x-keymeter-key-id", "AbCdEf012345"), ("jwt_payload", '{"sub":"mallory","plan":"pro"}'),
        ("envoy.filters.http.jwt_authn", '{"jwt_payload":{"sub":"mallory"}}'),
        ("x-jwt-payload", "eyJzdWIiOiJtYWxsb3J5In0"), ("sub", "mallory"), ("plan", "pro"),
    ]  # fmt: skip
    # No credential: still a 401, whatever the headers claim.
    r = get(envoy, "/v1/things", forged)
    assert_problem(r, 401, "missing-credential")
    assert backend.requests() == []
    # A real token: the backend sees the token's identity, not the forged one.
    r = get(envoy, "/v1/things", forged + list(bearer(idp.token("alice")).items()))
    assert r.status == 200, r
    ident = sent_identity(backend)
    assert (ident["x-keymeter-consumer"], ident["x-keymeter-plan"], ident["x-keymeter-auth"]) == ("alice", "free", "jwt")
    assert ident["x-keymeter-key-id"] is None
    # jwt_authn is off on the key-only route: an unverified token there is no identity
    # (it is a malformed API key).
    assert_problem(get(envoy, "/partner/things", forged + list(bearer(idp.token("alice")).items())), 401, "malformed-credential")
    wait_counted(envoy, "jwt-alice", admitted=1)
    assert set(usage_rows(envoy)) == {"jwt-alice"}


def test_jwt_users_hit_their_plans_429_with_ratelimit_fields(env, backend, idp):
    envoy, _ = env
    token = bearer(idp.token("carol", plan="free"))
    oks = [get(envoy, "/v1/things", token) for _ in range(3)]
    assert [r.status for r in oks] == [200, 200, 200]
    assert [r.headers.get("ratelimit") for r in oks] == ['"hourly";r=2;t=0', '"hourly";r=1;t=0', '"hourly";r=0;t=3600']
    backend.clear()
    r = get(envoy, "/v1/things", token)
    assert_problem(r, 429, "rate-limited")
    assert r.headers.get("ratelimit-policy") == '"hourly";q=1;w=3600'
    assert r.headers.get("ratelimit") == '"hourly";r=0;t=3600'
    assert 3590 <= int(r.headers.get("retry-after")) <= 3600
    assert backend.requests() == []
    # A new token of the same user draws from the same bucket; another user has its own.
    assert get(envoy, "/v1/things", bearer(idp.token("carol", plan="free"))).status == 429
    assert get(envoy, "/v1/things", bearer(idp.token("dave", plan="free"))).status == 200
    wait_counted(envoy, "jwt-carol", admitted=3, rate_limited=2)


def test_consumer_limit_is_shared_by_keys_and_jwts_of_the_consumer(env, backend, idp):
    envoy, keys = env
    key = {"x-api-key": keys["acme-team"].key}
    token = bearer(idp.token("acme", plan="team"))
    got = [get(envoy, "/v1/things", h).status for h in (key, token, key, token)]
    assert got == [200, 200, 200, 200]
    assert_problem(get(envoy, "/v1/things", token), 429, "rate-limited")
    assert_problem(get(envoy, "/v1/things", key), 429, "rate-limited")
    # limit_by key (plan free): the JWT user and the consumer's key have their own buckets.
    free_key = {"x-api-key": keys["acme-free"].key}
    free_token = bearer(idp.token("acme", plan="free"))
    assert [get(envoy, "/v1/things", free_key).status for _ in range(3)] == [200] * 3
    assert get(envoy, "/v1/things", free_key).status == 429
    assert [get(envoy, "/v1/things", free_token).status for _ in range(3)] == [200] * 3
    assert get(envoy, "/v1/things", free_token).status == 429
    # Metered apart: the JWT row and the key rows of consumer acme.
    row = wait_counted(envoy, "jwt-acme", admitted=5, rate_limited=2)
    assert row["consumer"] == "acme" and row["credential"] == "jwt"
    wait_counted(envoy, keys["acme-team"].id, admitted=2, rate_limited=1)


def test_plan_claim_mapping_and_refusals(start_envoy, backend, idp):
    envoy = start(start_envoy, idp, keymeter_conf(default_plan=None))
    assert push(envoy, keyset(1, [], PLANS)).status == 200
    get_ = lambda **kw: get(envoy, "/v1/things", bearer(idp.token(**kw)))  # noqa: E731
    assert get_(sub="erin", plan="pro").status == 200
    assert sent_identity(backend)["x-keymeter-plan"] == "pro"
    # No default plan: a plan the key set does not have (or none) is a documented 403.
    assert_problem(get_(sub="erin", plan="gold"), 403, "token-plan-unknown")
    assert_problem(get_(sub="erin"), 403, "token-plan-unknown")
    # The consumer claim must be a name keymeter can use in headers and labels.
    for sub in ("auth0|123", "a.b", None):
        assert_problem(get_(sub=sub, plan="pro"), 403, "token-identity-unusable")
    # (A non-string `sub` never gets this far: jwt_authn itself refuses it.)
    assert get_(sub=12345, plan="pro").text == "Jwt payload [sub] field is not a string"
    harness.wait_until(
        lambda: prom_samples(envoy, "keymeter_unauthenticated_total").get(
            frozenset({("reason", "token_identity_unusable")})) == 3,
        timeout=10,
    )  # fmt: skip
    assert prom_samples(envoy, "keymeter_unauthenticated_total").get(frozenset({("reason", "token_plan_unknown")})) == 2


def test_jwt_only_route_and_bearer_keys_on_token_routes(env, backend, idp):
    envoy, keys = env
    k = keys["acme-free"]
    # /app/ requires a verified token: jwt_authn refuses a request without one.
    r = get(envoy, "/app/things", {"x-api-key": k.key})
    assert (r.status, r.text) == (401, "Jwt is missing")
    assert get(envoy, "/app/things", bearer(idp.token("alice"))).status == 200
    # Where tokens are verified, jwt_authn takes `Authorization: Bearer` for a JWT, so API
    # keys go in x-api-key there (or Basic); on key-only routes Bearer keys work.
    assert get(envoy, "/v1/things", bearer(k.key)).status == 401
    assert get(envoy, "/v1/things", {"x-api-key": k.key}).status == 200
    assert get(envoy, "/partner/things", bearer(k.key)).status == 200
    assert sent_identity(backend)["x-keymeter-auth"] == "api-key"


def test_token_wins_when_key_wins_is_off(start_envoy, backend, idp):
    envoy = start(start_envoy, idp, keymeter_conf(key_wins=False))
    k = Key(consumer="acme", plan="pro")
    assert push(envoy, keyset(1, [k], PLANS)).status == 200
    assert get(envoy, "/v1/things", {"x-api-key": k.key, **bearer(idp.token("alice"))}).status == 200
    ident = sent_identity(backend)
    assert (ident["x-keymeter-consumer"], ident["x-keymeter-auth"], ident["x-keymeter-key-id"]) == ("alice", "jwt", None)
    assert ident["x-api-key"] is None, "the unused key is not passed on"
    assert get(envoy, "/v1/things", {"x-api-key": k.key}).status == 200
    assert sent_identity(backend)["x-keymeter-auth"] == "api-key"


def test_forwarded_token_in_bearer_is_not_taken_for_a_bad_key(start_envoy, backend, idp):
    envoy = start(start_envoy, idp, forward=True)
    assert push(envoy, keyset(1, [], PLANS)).status == 200
    token = idp.token("alice", plan="pro")
    assert get(envoy, "/v1/things", bearer(token)).status == 200
    ident = sent_identity(backend)
    assert (ident["x-keymeter-consumer"], ident["x-keymeter-auth"]) == ("alice", "jwt")
    assert ident["authorization"] == f"Bearer {token}", "forward: true keeps the token for the backend"


def test_jwt_usage_is_exported_with_its_credential(start_envoy, backend, idp, wasm_path):
    from usage_collector import UsageCollector

    with UsageCollector() as collector:
        envoy = start_envoy(
            concurrency=2,
            filter_conf=keymeter_conf(),
            jwt_authn=harness.jwt_authn_filter(jwks=idp.jwks_json()),
            **harness.export_service(collector.port, wasm_path),
        )
        k = Key(consumer="acme", plan="pro")
        assert push(envoy, keyset(1, [k], PLANS)).status == 200
        token = bearer(idp.token("acme", plan="pro"))
        assert [get(envoy, "/v1/things", token).status for _ in range(3)] == [200] * 3
        assert get(envoy, "/v1/things", {"x-api-key": k.key}).status == 200

        def exported():
            events = {e["data"]["lineage"]: e for e in collector.accepted_events()}
            return events if {"jwt-acme", k.id} <= set(events) else None

        events = harness.wait_until(exported, timeout=20, message=f"not exported: {collector.requests()}")
        jwt_event, key_event = events["jwt-acme"], events[k.id]
        assert jwt_event["subject"] == key_event["subject"] == "acme"
        assert (jwt_event["data"]["credential"], jwt_event["data"]["plan"]) == ("jwt", "pro")
        assert key_event["data"]["credential"] == "api-key"
        harness.wait_until(lambda: collector.totals()["jwt-acme"]["requests"]["admitted"] == 3, timeout=20)

"""JWT users beside API-key clients, in real Envoy with real signed tokens.

Envoy's jwt_authn (before keymeter) verifies RS256 tokens from jwt_tokens.Issuer against
a local JWKS and writes the payload to dynamic metadata; keymeter maps the verified
claims to a consumer and plan, limits and meters the request like an API key of that
consumer. Routes: `/` accepts either credential (the harness default), the extra routes
below need a JWT or take API keys only."""

from __future__ import annotations

import pytest

import harness
from jwt_tokens import Issuer, bearer


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

"""A test identity provider: an RSA signing key, its JWKS and real signed JWTs.

Uses PyJWT with `cryptography` (installed by the Makefile into the pinned venv), so
tokens are made by a well-kept JOSE library rather than by hand. Envoy's jwt_authn
verifies them against `jwks_json()`; keymeter only ever sees the verified payload.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

import harness


class Issuer:
    """One signing key (RS256) with key id `kid`, issuing for harness.JWT_ISSUER."""

    def __init__(self, kid: str = "test-key-1", issuer: str = harness.JWT_ISSUER):
        self.kid = kid
        self.issuer = issuer
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @classmethod
    def from_pem(cls, pem: bytes, kid: str, issuer: str = harness.JWT_ISSUER) -> Issuer:
        self = cls.__new__(cls)
        self.kid, self.issuer = kid, issuer
        self._key = serialization.load_pem_private_key(pem, password=None)
        return self

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def jwks(self) -> dict:
        jwk = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        jwk.update(kid=self.kid, alg="RS256", use="sig")
        return {"keys": [jwk]}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks())

    def token(
        self,
        sub: str | Any | None,
        *,
        plan: str | None = None,
        audience: str | list[str] = harness.JWT_AUDIENCE,
        expires_in: int = 600,
        not_before: int | None = None,
        issuer: str | None = None,
        claims: dict | None = None,
        kid: str | None = None,
    ) -> str:
        """A signed RS256 token. `sub=None` leaves the claim out; `expires_in` < 0
        makes an expired token."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "aud": audience,
            "iat": now,
            "exp": now + expires_in,
        }
        if sub is not None:
            payload["sub"] = sub
        if plan is not None:
            payload["plan"] = plan
        if not_before is not None:
            payload["nbf"] = not_before
        payload.update(claims or {})
        return jwt.encode(payload, self._key, algorithm="RS256", headers={"kid": kid or self.kid})


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}

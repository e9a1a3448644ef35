"""An independent Python implementation of the keymeter key format and key-set
documents, so the Envoy tests check the Rust code against a second reading of the spec.

Key: km_<id:12 base62>_<secret:32 base62><crc32 of everything before, 6 base62>.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_HASH_PLAN = "default"


def b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(BASE62[n % 62])
        n //= 62
    return "".join(reversed(out))


def random_b62(n: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(n))


def make_key(key_id: str | None = None) -> tuple[str, str]:
    """Returns (id, full key)."""
    key_id = key_id or random_b62(12)
    body = f"km_{key_id}_{random_b62(32)}"
    return key_id, body + b62(zlib.crc32(body.encode()), 6)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Key:
    """A generated key and its key-set entry."""

    def __init__(self, consumer: str = "acme", plan: str = "default", **fields):
        self.id, self.key = make_key(fields.pop("id", None))
        self.doc = {"id": self.id, "hash": key_hash(self.key), "consumer": consumer, "plan": plan, **fields}

    @property
    def secret_part(self) -> str:
        return self.key[16:]


def keyset(version: int, keys: list[Key], plans: dict | None = None) -> dict:
    return {"version": version, "plans": plans if plans is not None else {"default": {}}, "keys": [k.doc for k in keys]}

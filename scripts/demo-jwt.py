#!/usr/bin/env python3
"""The demo's identity provider (`make run`): a signing key made at start-up, its JWKS for
Envoy's jwt_authn, and demo tokens.

    demo-jwt.py init DIR              new RSA key in DIR/jwt-signing-key.pem, DIR/jwks.json
    demo-jwt.py token DIR SUB [PLAN]  a token for SUB (plan claim PLAN), valid 24 h

Uses wasm-tests/jwt_tokens.py (PyJWT + cryptography, installed by `make tools`), the
same issuer code the tests use; issuer and audience are the harness's, which
envoy/demo.json is generated from.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "wasm-tests"))

from jwt_tokens import Issuer  # noqa: E402

KID = "demo-key"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "init":
        out = Path(argv[1])
        out.mkdir(parents=True, exist_ok=True)
        issuer = Issuer(kid=KID)
        key = out / "jwt-signing-key.pem"
        key.write_bytes(issuer.private_pem())
        key.chmod(0o600)
        (out / "jwks.json").write_text(issuer.jwks_json() + "\n")
        return 0
    if len(argv) in (3, 4) and argv[0] == "token":
        issuer = Issuer.from_pem((Path(argv[1]) / "jwt-signing-key.pem").read_bytes(), KID)
        print(issuer.token(argv[2], plan=argv[3] if len(argv) == 4 else None, expires_in=86400))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

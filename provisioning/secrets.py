"""Bearer secrets (provisioning tokens, operator API tokens, broker passwords).

They are random with 256 bits of entropy, so a plain SHA-256 is the right way to store them: a
slow password hash adds nothing against guessing a 256-bit value, and a fast lookup by hash keeps
authentication one indexed query. A short prefix tells a person which kind of secret they hold.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PROVISIONING_TOKEN_PREFIX = "efp_"  # noqa: S105 (a prefix, not a secret)
API_TOKEN_PREFIX = "efa_"  # noqa: S105


def new_secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def same_secret(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))

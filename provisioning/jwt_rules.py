"""The JWT/JWS rules both sides live by.

Two kinds of signed token cross the wire, both ES256 compact JWS with registered claims:

* **device tokens** (agent -> gateway HTTP): signed with the device's own key, ``sub`` = device id,
  ``aud`` = the gateway's id, short-lived (at most ``MAX_DEVICE_TOKEN_LIFETIME``), unique ``jti``.
* **commands** (gateway -> agent over MQTT): signed with the gateway's key, ``aud`` = the device id,
  ``iss`` = the gateway's id, ``jti`` = the command id, ``cmd`` = what to do, ``args`` = how.

Every check is explicit: an algorithm allowlist of one (never ``none``, never HMAC, so a public
key can never be used as an HMAC secret), a bounded lifetime, a small clock-skew leeway, and the
audience. Replays are refused by the caller, who owns the storage of seen ``jti`` values (the
gateway's database, the agent's state directory); `verify_*` return what the caller needs for it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

ALGORITHM = "ES256"
ALLOWED_ALGORITHMS = (ALGORITHM,)
LEEWAY_SECONDS = 30
MAX_DEVICE_TOKEN_LIFETIME = 300
DEFAULT_DEVICE_TOKEN_LIFETIME = 120
MAX_COMMAND_LIFETIME = 7 * 24 * 3600


class TokenRejected(Exception):
    """A token that fails a rule. `reason` is a short stable code; str() explains it to a person."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class DeviceClaims:
    device_id: str
    jti: str
    issued_at: int
    expires_at: int


@dataclass(frozen=True)
class Command:
    """A verified command from the gateway. `id` is unique; the agent runs each id once."""

    id: str
    device_id: str
    kind: str
    args: Mapping[str, Any]
    issued_at: int
    expires_at: int


def new_jti() -> str:
    return uuid.uuid4().hex


def _check_header(token: str) -> None:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError as exc:
        raise TokenRejected("malformed", f"not a JWT: {exc}") from exc
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise TokenRejected(
            "algorithm_not_allowed",
            f"algorithm {alg!r} is not allowed; only {', '.join(ALLOWED_ALGORITHMS)} is accepted",
        )


def _decode(
    token: str,
    key: ec.EllipticCurvePublicKey,
    audience: str,
    required: list[str],
    now: float | None,
) -> dict[str, Any]:
    # PyJWT reads the clock itself; for a caller-supplied clock, exp/iat/nbf are checked below.
    own_clock = now is None
    options: jwt.types.Options = {
        "require": required,
        "verify_exp": own_clock,
        "verify_iat": own_clock,
        "verify_nbf": own_clock,
    }
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=list(ALLOWED_ALGORITHMS),
            audience=audience,
            leeway=LEEWAY_SECONDS,
            options=options,
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenRejected("expired", "the token has expired") from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenRejected("wrong_audience", f"the token is not addressed to {audience}") from exc
    except jwt.InvalidSignatureError as exc:
        raise TokenRejected("bad_signature", "the signature does not match the key") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TokenRejected("malformed", f"the token lacks the {exc.claim!r} claim") from exc
    except jwt.ImmatureSignatureError as exc:
        raise TokenRejected("not_yet_valid", "the token is issued in the future") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenRejected("malformed", f"invalid token: {exc}") from exc
    if not isinstance(claims.get("aud"), str):
        # PyJWT accepts a list that contains the audience; a token is for one party only.
        raise TokenRejected("wrong_audience", f"aud must be the one string {audience!r}")
    _check_times(claims, now if now is not None else time.time(), check_exp=now is not None)
    return claims


def _check_times(claims: Mapping[str, Any], now: float, *, check_exp: bool) -> None:
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, int | float) or not isinstance(exp, int | float):
        raise TokenRejected("malformed", "iat and exp must be numbers")
    if iat > now + LEEWAY_SECONDS:
        raise TokenRejected("not_yet_valid", "the token is issued in the future")
    if check_exp and exp < now - LEEWAY_SECONDS:
        raise TokenRejected("expired", "the token has expired")
    if exp <= iat:
        raise TokenRejected("malformed", "the token expires before it was issued")


def sign_device_token(
    key: ec.EllipticCurvePrivateKey,
    device_id: str,
    audience: str,
    lifetime: int = DEFAULT_DEVICE_TOKEN_LIFETIME,
    now: float | None = None,
) -> str:
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": device_id,
        "aud": audience,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": new_jti(),
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def unverified_subject(token: str) -> str:
    """The `sub` a token claims, to find the key to check it with. Trust nothing else from it."""
    _check_header(token)
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise TokenRejected("malformed", f"not a JWT: {exc}") from exc
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenRejected("malformed", "the token lacks a 'sub' claim naming the device")
    return sub


def verify_device_token(
    token: str,
    key_for: Callable[[str], ec.EllipticCurvePublicKey],
    audience: str,
    now: float | None = None,
) -> DeviceClaims:
    """Check a device token. `key_for(device_id)` returns the device's registered public key or
    raises TokenRejected (unknown or revoked device)."""
    device_id = unverified_subject(token)
    key = key_for(device_id)
    claims = _decode(token, key, audience, ["sub", "aud", "iat", "exp", "jti"], now)
    lifetime = claims["exp"] - claims["iat"]
    if lifetime > MAX_DEVICE_TOKEN_LIFETIME:
        raise TokenRejected(
            "lifetime_too_long",
            f"the token lives {lifetime:.0f}s; at most {MAX_DEVICE_TOKEN_LIFETIME}s is accepted",
        )
    jti = claims["jti"]
    if not isinstance(jti, str) or not 8 <= len(jti) <= 128:
        raise TokenRejected("malformed", "jti must be a string of 8 to 128 characters")
    return DeviceClaims(device_id, jti, int(claims["iat"]), int(claims["exp"]))


def sign_command(
    key: ec.EllipticCurvePrivateKey,
    *,
    gateway_id: str,
    device_id: str,
    kind: str,
    args: Mapping[str, Any],
    lifetime: int,
    command_id: str | None = None,
    now: float | None = None,
) -> tuple[str, str]:
    """Sign a command for one device; returns (command id, compact JWS)."""
    if not 0 < lifetime <= MAX_COMMAND_LIFETIME:
        raise ValueError(f"command lifetime must be 1..{MAX_COMMAND_LIFETIME}s, not {lifetime}")
    issued = int(now if now is not None else time.time())
    cid = command_id or new_jti()
    claims = {
        "iss": gateway_id,
        "aud": device_id,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": cid,
        "cmd": kind,
        "args": dict(args),
    }
    return cid, jwt.encode(claims, key, algorithm=ALGORITHM)


def verify_command(
    token: str | bytes,
    gateway_key: ec.EllipticCurvePublicKey,
    *,
    gateway_id: str,
    device_id: str,
    now: float | None = None,
) -> Command:
    """Check a command addressed to `device_id`. The caller refuses a replayed `Command.id`."""
    text = token.decode("ascii", "replace") if isinstance(token, bytes) else token
    _check_header(text)
    claims = _decode(text, gateway_key, device_id, ["iss", "aud", "iat", "exp", "jti", "cmd"], now)
    if claims["iss"] != gateway_id:
        raise TokenRejected("wrong_issuer", f"the command was issued by {claims['iss']!r}")
    if claims["exp"] - claims["iat"] > MAX_COMMAND_LIFETIME:
        raise TokenRejected("lifetime_too_long", "the command's lifetime is longer than allowed")
    kind, args = claims["cmd"], claims.get("args", {})
    if not isinstance(kind, str) or not isinstance(args, dict):
        raise TokenRejected("malformed", "cmd must be a string and args an object")
    return Command(
        id=str(claims["jti"]),
        device_id=device_id,
        kind=kind,
        args=args,
        issued_at=int(claims["iat"]),
        expires_at=int(claims["exp"]),
    )

"""The signed-command rules an agent lives by, and the key handling both sides share."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import keys
from provisioning.jwt_rules import (
    MAX_DEVICE_TOKEN_LIFETIME,
    TokenRejected,
    sign_command,
    sign_device_token,
    verify_command,
    verify_device_token,
)

GATEWAY = "edgefleet-gw-test"


@pytest.fixture(scope="module")
def gateway_key() -> ec.EllipticCurvePrivateKey:
    return keys.generate_private_key()


def _verify(token: str | bytes, key: ec.EllipticCurvePrivateKey, device: str = "dev-aaa") -> None:
    verify_command(token, key.public_key(), gateway_id=GATEWAY, device_id=device)


def test_signed_command_round_trip(gateway_key: ec.EllipticCurvePrivateKey) -> None:
    cid, token = sign_command(
        gateway_key,
        gateway_id=GATEWAY,
        device_id="dev-aaa",
        kind="ping",
        args={"n": 1},
        lifetime=60,
    )
    command = verify_command(
        token.encode(), gateway_key.public_key(), gateway_id=GATEWAY, device_id="dev-aaa"
    )
    assert (command.id, command.kind, dict(command.args)) == (cid, "ping", {"n": 1})


def test_command_for_another_device_is_refused(gateway_key: ec.EllipticCurvePrivateKey) -> None:
    _, token = sign_command(
        gateway_key, gateway_id=GATEWAY, device_id="dev-bbb", kind="ping", args={}, lifetime=60
    )
    with pytest.raises(TokenRejected) as caught:
        _verify(token, gateway_key, device="dev-aaa")
    assert caught.value.reason == "wrong_audience"


def test_forged_command_is_refused(gateway_key: ec.EllipticCurvePrivateKey) -> None:
    forger = keys.generate_private_key()
    _, token = sign_command(
        forger, gateway_id=GATEWAY, device_id="dev-aaa", kind="ping", args={}, lifetime=60
    )
    with pytest.raises(TokenRejected) as caught:
        _verify(token, gateway_key)
    assert caught.value.reason == "bad_signature"


def test_unsigned_and_hmac_commands_are_refused(gateway_key: ec.EllipticCurvePrivateKey) -> None:
    now = int(time.time())
    claims = {
        "iss": GATEWAY,
        "aud": "dev-aaa",
        "iat": now,
        "exp": now + 60,
        "jti": "x" * 16,
        "cmd": "ping",
    }
    unsigned = jwt.encode(claims, "", algorithm="none")
    with pytest.raises(TokenRejected) as caught:
        _verify(unsigned, gateway_key)
    assert caught.value.reason == "algorithm_not_allowed"
    hmac_token = jwt.encode(claims, "a-shared-secret-of-32-bytes-long!", algorithm="HS256")
    with pytest.raises(TokenRejected) as caught:
        _verify(hmac_token, gateway_key)
    assert caught.value.reason == "algorithm_not_allowed"
    with pytest.raises(TokenRejected) as caught:
        _verify(b"\x00\xffnot a token", gateway_key)
    assert caught.value.reason == "malformed"


def test_expired_command_and_wrong_issuer_are_refused(
    gateway_key: ec.EllipticCurvePrivateKey,
) -> None:
    _, old = sign_command(
        gateway_key,
        gateway_id=GATEWAY,
        device_id="dev-aaa",
        kind="ping",
        args={},
        lifetime=60,
        now=time.time() - 3600,
    )
    with pytest.raises(TokenRejected) as caught:
        _verify(old, gateway_key)
    assert caught.value.reason == "expired"
    _, other = sign_command(
        gateway_key,
        gateway_id="another-gateway",
        device_id="dev-aaa",
        kind="ping",
        args={},
        lifetime=60,
    )
    with pytest.raises(TokenRejected) as caught:
        _verify(other, gateway_key)
    assert caught.value.reason == "wrong_issuer"


def test_device_token_lifetime_is_bounded() -> None:
    key = keys.generate_private_key()
    token = sign_device_token(key, "dev-aaa", GATEWAY, lifetime=MAX_DEVICE_TOKEN_LIFETIME + 1)
    with pytest.raises(TokenRejected) as caught:
        verify_device_token(token, lambda _d: key.public_key(), GATEWAY)
    assert caught.value.reason == "lifetime_too_long"
    ok = sign_device_token(key, "dev-aaa", GATEWAY)
    assert verify_device_token(ok, lambda _d: key.public_key(), GATEWAY).device_id == "dev-aaa"


def test_device_token_issued_in_the_future_is_refused() -> None:
    key = keys.generate_private_key()
    token = sign_device_token(key, "dev-aaa", GATEWAY, now=time.time() + 3600)
    with pytest.raises(TokenRejected) as caught:
        verify_device_token(token, lambda _d: key.public_key(), GATEWAY)
    assert caught.value.reason == "not_yet_valid"


def test_private_key_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "device-key.pem"
    os.umask(0o022)
    key = keys.ensure_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = keys.ensure_private_key(path)
    assert keys.fingerprint(again.public_key()) == keys.fingerprint(key.public_key())


def test_public_keys_of_other_types_are_refused() -> None:
    with pytest.raises(keys.InvalidKey, match="P-256"):
        keys.load_public_key(
            keys.public_key_pem(ec.generate_private_key(ec.SECP384R1()).public_key())
        )
    with pytest.raises(keys.InvalidKey, match="not a PEM"):
        keys.load_public_key("hello")

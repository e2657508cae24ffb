"""The registry over HTTP, on SQLite and PostgreSQL, with a real broker behind it.

Covers the trust rules of provisioning: enrollment is all-or-nothing, tokens expire/count/revoke,
device JWTs are checked strictly, operator roles limit what each token may do, revocation is
immediate, and every change lands in the audit log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from gateway.broker.dynsec import DynsecAdmin
from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.registry.models import Device, ProvisioningToken, Role
from gateway.runtime import GatewayRuntime
from provisioning import keys
from provisioning.jwt_rules import sign_device_token
from tests.conftest import api_token
from tests.support.mosquitto import MqttProbe, device_endpoint
from tests.support.waiting import wait_for


def make_token(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = client.post("/api/v1/provisioning-tokens", json=body, headers=headers)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


def enroll(
    client: TestClient,
    token: str,
    key: ec.EllipticCurvePrivateKey | None = None,
    name: str | None = "press-07",
) -> tuple[ec.EllipticCurvePrivateKey, Any]:
    key = key or keys.generate_private_key()
    body = {"token": token, "public_key": keys.public_key_pem(key.public_key())}
    if name:
        body["name"] = name
    return key, client.post("/api/v1/enroll", json=body)


def device_count(runtime: GatewayRuntime) -> int:
    with Session(runtime.engine) as session:
        return len(session.exec(select(Device)).all())


# ---- enrollment -----------------------------------------------------------------------------


def test_enrollment_registers_device_with_tags_and_broker_credential(
    client: TestClient,
    admin_headers: dict[str, str],
    runtime: GatewayRuntime,
    dynsec: DynsecAdmin,
    broker: MosquittoSupervisor,
) -> None:
    token = make_token(client, admin_headers, tags={"site": "plant-3"}, uses=2)
    _, response = enroll(client, token["token"])
    assert response.status_code == 201, response.text
    body = response.json()
    device_id = body["device_id"]
    assert body["tags"] == {"site": "plant-3"}
    assert body["gateway_public_key"] == runtime.identity.public_key_pem
    assert body["gateway_id"] == runtime.identity.gateway_id
    assert body["broker"]["username"] == device_id and body["broker"]["client_id"] == device_id
    assert body["broker"]["ca_cert"] == broker.ca.cert_pem
    assert device_id in dynsec.list_devices()

    # The credential it got really works on the broker, and only under its own topics.
    probe = MqttProbe(device_endpoint(broker, device_id, body["broker"]["password"]), device_id)
    try:
        assert not probe.connect().is_failure
        assert not probe.publish(f"fleet/{device_id}/status", b"{}").is_failure
        assert probe.publish("fleet/dev-someone-else/status", b"{}").is_failure
    finally:
        probe.close()

    shown = client.get(f"/api/v1/devices/{device_id}", headers=admin_headers).json()
    assert shown["name"] == "press-07" and shown["state"] == "active"
    tokens = client.get("/api/v1/provisioning-tokens", headers=admin_headers).json()
    assert [t["uses"] for t in tokens if t["id"] == token["id"]] == [1]
    assert "token" not in tokens[0]  # the secret is never shown again


def test_token_secret_is_stored_only_as_hash(
    client: TestClient, admin_headers: dict[str, str], runtime: GatewayRuntime
) -> None:
    token = make_token(client, admin_headers)
    with Session(runtime.engine) as session:
        row = session.get(ProvisioningToken, token["id"])
        assert row is not None
        assert token["token"] not in (row.token_hash, row.note)
        assert len(row.token_hash) == 64


@pytest.mark.parametrize("problem", ["unknown", "expired", "exhausted", "revoked"])
def test_bad_provisioning_tokens_are_refused_and_leave_nothing_behind(
    problem: str,
    client: TestClient,
    admin_headers: dict[str, str],
    runtime: GatewayRuntime,
    dynsec: DynsecAdmin,
) -> None:
    secret = "efp_not-a-token-at-all"
    if problem != "unknown":
        created = make_token(
            client, admin_headers, uses=1, ttl_seconds=1 if problem == "expired" else 3600
        )
        secret = created["token"]
        if problem == "exhausted":
            assert enroll(client, secret, name="first")[1].status_code == 201
        if problem == "revoked":
            revoked = client.delete(
                f"/api/v1/provisioning-tokens/{created['id']}", headers=admin_headers
            )
            assert revoked.json()["state"] == "revoked"
        if problem == "expired":
            wait_for(
                lambda: (
                    client.get("/api/v1/provisioning-tokens", headers=admin_headers).json()[0][
                        "state"
                    ]
                    == "expired"
                ),
                timeout=5,
                what="the token to expire",
            )
    before_devices, before_creds = device_count(runtime), set(dynsec.list_devices())
    _, response = enroll(client, secret)
    assert response.status_code == 401
    assert response.json()["reason"] == (
        "unknown_token" if problem == "unknown" else f"token_{problem}"
    )
    assert problem in response.json()["detail"]
    assert device_count(runtime) == before_devices
    assert set(dynsec.list_devices()) == before_creds


def test_last_use_of_a_token_admits_exactly_one_of_concurrent_enrollments(
    client: TestClient, admin_headers: dict[str, str], runtime: GatewayRuntime
) -> None:
    secret = make_token(client, admin_headers, uses=1)["token"]
    statuses: list[int] = []
    barrier = threading.Barrier(4)

    def attempt(n: int) -> None:
        barrier.wait()
        statuses.append(enroll(client, secret, name=f"race-{n}")[1].status_code)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201, 401, 401, 401]
    assert device_count(runtime) == 1


def _rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _p384_pem() -> str:
    return keys.public_key_pem(ec.generate_private_key(ec.SECP384R1()).public_key())


@pytest.mark.parametrize(
    ("public_key", "expected"),
    [
        (
            "-----BEGIN PUBLIC KEY-----\nnot base64 at all!!\n-----END PUBLIC KEY-----\n"
            + "x" * 40,
            "not a PEM",
        ),
        (_rsa_pem(), "EC P-256"),
        (_p384_pem(), "P-256"),
    ],
    ids=["malformed", "rsa", "p384"],
)
def test_bad_public_keys_are_refused_without_using_the_token(
    public_key: str,
    expected: str,
    client: TestClient,
    admin_headers: dict[str, str],
    runtime: GatewayRuntime,
) -> None:
    token = make_token(client, admin_headers, uses=1)
    response = client.post(
        "/api/v1/enroll", json={"token": token["token"], "public_key": public_key}
    )
    assert response.status_code == 422
    assert response.json()["reason"] == "bad_public_key"
    assert expected in response.json()["detail"]
    assert device_count(runtime) == 0
    listed = client.get("/api/v1/provisioning-tokens", headers=admin_headers).json()
    assert listed[0]["uses"] == 0  # the failed attempt did not spend a use


def test_same_key_cannot_enroll_twice(client: TestClient, admin_headers: dict[str, str]) -> None:
    secret = make_token(client, admin_headers, uses=2)["token"]
    key, first = enroll(client, secret)
    assert first.status_code == 201
    _, second = enroll(client, secret, key=key)
    assert second.status_code == 409
    assert second.json()["reason"] == "key_already_enrolled"


def test_broker_failure_rolls_the_enrollment_back(
    client: TestClient, admin_headers: dict[str, str], runtime: GatewayRuntime
) -> None:
    """A broker that cannot take the credential: 503, and no device row, no spent token use."""
    from tests.support.mosquitto import running_broker

    token = make_token(client, admin_headers, uses=1)
    with running_broker() as other:
        doomed = DynsecAdmin(other.endpoint, timeout=1.0)
        doomed.connect()
    # `other` is stopped now: the admin connection is gone and cannot come back.
    runtime.broker = doomed
    try:
        _, response = enroll(client, token["token"])
    finally:
        doomed.close()
    assert response.status_code == 503, response.text
    assert response.json()["reason"] == "broker_unavailable"
    assert device_count(runtime) == 0
    listed = client.get("/api/v1/provisioning-tokens", headers=admin_headers).json()
    assert listed[0]["uses"] == 0


def test_oversized_and_malformed_requests(client: TestClient) -> None:
    huge = client.post(
        "/api/v1/enroll",
        content=b'{"token": "' + b"a" * 200_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413
    assert huge.json()["reason"] == "too_large"
    broken = client.post(
        "/api/v1/enroll", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422
    extra = client.post(
        "/api/v1/enroll", json={"token": "x" * 10, "public_key": "y" * 60, "admin": True}
    )
    assert extra.status_code == 422


# ---- device JWTs ----------------------------------------------------------------------------


@pytest.fixture
def enrolled(
    client: TestClient, admin_headers: dict[str, str]
) -> tuple[str, ec.EllipticCurvePrivateKey]:
    secret = make_token(client, admin_headers, uses=1)["token"]
    key, response = enroll(client, secret)
    assert response.status_code == 201
    return response.json()["device_id"], key


def _self(client: TestClient, token: str) -> Any:
    return client.get("/api/v1/agent/self", headers={"Authorization": f"Bearer {token}"})


def test_device_jwt_accepted(
    client: TestClient, runtime: GatewayRuntime, enrolled: tuple[str, ec.EllipticCurvePrivateKey]
) -> None:
    device_id, key = enrolled
    response = _self(client, sign_device_token(key, device_id, runtime.identity.gateway_id))
    assert response.status_code == 200
    assert response.json()["id"] == device_id


def _claims(device_id: str, audience: str | list[str], **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": device_id, "aud": audience, "iat": now, "exp": now + 60, "jti": "j" * 16}
    claims.update(changes)
    return claims


@pytest.mark.parametrize(
    "case",
    [
        "alg_none",
        "hmac_with_public_key",
        "wrong_key",
        "wrong_audience",
        "list_audience",
        "expired",
        "too_long",
        "no_jti",
        "other_device",
    ],
)
def test_device_jwt_rejections(
    case: str,
    client: TestClient,
    runtime: GatewayRuntime,
    enrolled: tuple[str, ec.EllipticCurvePrivateKey],
) -> None:
    device_id, key = enrolled
    aud = runtime.identity.gateway_id
    expected = {
        "alg_none": "algorithm_not_allowed",
        "hmac_with_public_key": "algorithm_not_allowed",
        "wrong_key": "bad_signature",
        "wrong_audience": "wrong_audience",
        "list_audience": "wrong_audience",
        "expired": "expired",
        "too_long": "lifetime_too_long",
        "no_jti": "malformed",
        "other_device": "unknown_device",
    }[case]
    if case == "alg_none":
        header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
        payload = jwt.utils.base64url_encode(
            jwt.api_jwt.PyJWT()._encode_payload(_claims(device_id, aud))
        ).decode()
        token = f"{header}.{payload}."
    elif case == "hmac_with_public_key":
        secret = keys.public_key_pem(key.public_key()).encode()
        token = _hs256(_claims(device_id, aud), secret)
    elif case == "wrong_key":
        token = jwt.encode(_claims(device_id, aud), keys.generate_private_key(), algorithm="ES256")
    elif case == "wrong_audience":
        token = jwt.encode(_claims(device_id, "someone-else"), key, algorithm="ES256")
    elif case == "list_audience":  # PyJWT alone accepts a list that holds the audience
        token = jwt.encode(_claims(device_id, [aud, "another-gateway"]), key, algorithm="ES256")
    elif case == "expired":
        old = int(time.time()) - 600
        token = jwt.encode(_claims(device_id, aud, iat=old, exp=old + 60), key, algorithm="ES256")
    elif case == "too_long":
        now = int(time.time())
        token = jwt.encode(_claims(device_id, aud, exp=now + 86400), key, algorithm="ES256")
    elif case == "no_jti":
        claims = _claims(device_id, aud)
        del claims["jti"]
        token = jwt.encode(claims, key, algorithm="ES256")
    else:  # a valid signature, but claiming a device that is not this key's
        token = jwt.encode(_claims("dev-notenrolled1", aud), key, algorithm="ES256")
    response = _self(client, token)
    assert response.status_code == 401, response.text
    assert response.json()["reason"] == expected
    assert response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """HS256 by hand: PyJWT itself refuses to use a PEM public key as an HMAC secret."""
    import hashlib
    import hmac
    import json

    b64 = jwt.utils.base64url_encode
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(claims).encode())
    signature = b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode()


def test_replayed_device_jwt_is_refused(
    client: TestClient, runtime: GatewayRuntime, enrolled: tuple[str, ec.EllipticCurvePrivateKey]
) -> None:
    device_id, key = enrolled
    token = sign_device_token(key, device_id, runtime.identity.gateway_id)
    assert _self(client, token).status_code == 200
    again = _self(client, token)
    assert again.status_code == 401
    assert again.json()["reason"] == "replayed"


def test_revoked_device_is_out_at_once(
    client: TestClient,
    admin_headers: dict[str, str],
    runtime: GatewayRuntime,
    dynsec: DynsecAdmin,
    broker: MosquittoSupervisor,
) -> None:
    secret = make_token(client, admin_headers, uses=1)["token"]
    key, response = enroll(client, secret)
    body = response.json()
    device_id, password = body["device_id"], body["broker"]["password"]
    probe = MqttProbe(device_endpoint(broker, device_id, password), device_id)
    try:
        assert not probe.connect().is_failure
        revoked = client.post(f"/api/v1/devices/{device_id}/revoke", headers=admin_headers)
        assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
        # Disconnected by the broker, and every reconnect is refused.
        wait_for(lambda: probe.disconnects, timeout=5, what="the broker to drop the device")
        wait_for(
            lambda: any(rc.is_failure for rc in probe.connect_results[1:]),
            timeout=5,
            what="a refused reconnect",
        )
        assert probe.connected_count == 1
    finally:
        probe.close()
    assert device_id not in dynsec.list_devices()
    token = sign_device_token(key, device_id, runtime.identity.gateway_id)
    refused = _self(client, token)
    assert refused.status_code == 401 and refused.json()["reason"] == "device_revoked"
    listed = client.get("/api/v1/devices", headers=admin_headers).json()
    assert device_id not in [d["id"] for d in listed]
    everything = client.get("/api/v1/devices?include_revoked=true", headers=admin_headers).json()
    assert [d["state"] for d in everything if d["id"] == device_id] == ["revoked"]


# ---- operators ------------------------------------------------------------------------------


def test_operator_endpoints_refuse_missing_wrong_and_revoked_tokens(
    client: TestClient, runtime: GatewayRuntime, admin_headers: dict[str, str]
) -> None:
    missing = client.get("/api/v1/devices")
    assert missing.status_code == 401 and missing.json()["reason"] == "missing_credentials"
    wrong = client.get("/api/v1/devices", headers={"Authorization": "Bearer efa_nope"})
    assert wrong.status_code == 401 and wrong.json()["reason"] == "unknown_api_token"
    created = client.post(
        "/api/v1/api-tokens", json={"name": "ci", "role": "viewer"}, headers=admin_headers
    ).json()
    viewer = {"Authorization": f"Bearer {created['token']}"}
    assert client.get("/api/v1/devices", headers=viewer).status_code == 200
    client.delete(f"/api/v1/api-tokens/{created['id']}", headers=admin_headers)
    gone = client.get("/api/v1/devices", headers=viewer)
    assert gone.status_code == 401 and gone.json()["reason"] == "api_token_revoked"


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (Role.viewer, {"list_devices", "api_tokens"}),
        (Role.operator, {"list_devices", "create_token", "audit", "api_tokens"}),
        (Role.admin, {"list_devices", "create_token", "audit", "revoke_device", "api_tokens"}),
    ],
)
def test_roles_limit_what_a_token_may_do(
    role: Role,
    allowed: set[str],
    client: TestClient,
    runtime: GatewayRuntime,
    enrolled: tuple[str, ec.EllipticCurvePrivateKey],
) -> None:
    device_id, _ = enrolled
    headers = {"Authorization": f"Bearer {api_token(runtime, role)}"}
    calls: dict[str, Callable[[], Any]] = {
        "list_devices": lambda: client.get("/api/v1/devices", headers=headers),
        "create_token": lambda: client.post(
            "/api/v1/provisioning-tokens", json={}, headers=headers
        ),
        "audit": lambda: client.get("/api/v1/audit", headers=headers),
        "api_tokens": lambda: client.get("/api/v1/api-tokens", headers=headers),
        "revoke_device": lambda: client.post(
            f"/api/v1/devices/{device_id}/revoke", headers=headers
        ),
    }
    for name, call in calls.items():
        response = call()
        if name in allowed:
            assert response.status_code in (200, 201), (name, response.text)
        else:
            assert response.status_code == 403, (name, response.text)
            assert response.json()["reason"] == "insufficient_role"


def test_audit_log_records_enrollment_revocation_and_token_changes(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    token = make_token(client, admin_headers, uses=1, tags={"line": "A"})
    _, response = enroll(client, token["token"])
    device_id = response.json()["device_id"]
    client.delete(f"/api/v1/provisioning-tokens/{token['id']}", headers=admin_headers)
    client.post(f"/api/v1/devices/{device_id}/revoke", headers=admin_headers)
    created = client.post(
        "/api/v1/api-tokens", json={"name": "bot", "role": "operator"}, headers=admin_headers
    ).json()
    events = client.get("/api/v1/audit", headers=admin_headers).json()
    seen = {(e["action"], e["target"]) for e in events}
    assert ("provisioning_token.create", token["id"]) in seen
    assert ("device.enroll", device_id) in seen
    assert ("provisioning_token.revoke", token["id"]) in seen
    assert ("device.revoke", device_id) in seen
    assert ("api_token.create", created["id"]) in seen
    enroll_event = next(e for e in events if e["action"] == "device.enroll")
    assert enroll_event["actor"] == f"token:{token['id']}"
    assert enroll_event["detail"]["tags"] == {"line": "A"}
    revoke_event = next(e for e in events if e["action"] == "device.revoke")
    assert revoke_event["actor"].startswith("admin-")  # the person's email
    assert revoke_event["user_id"].startswith("usr-") and revoke_event["token_id"].startswith("at-")
    only = client.get(f"/api/v1/audit?target={device_id}", headers=admin_headers).json()
    assert {e["target"] for e in only} == {device_id}


def test_openapi_document_describes_the_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in [
        "/api/v1/enroll",
        "/api/v1/agent/self",
        "/api/v1/provisioning-tokens",
        "/api/v1/provisioning-tokens/{token_id}",
        "/api/v1/devices",
        "/api/v1/devices/{device}",
        "/api/v1/devices/{device}/revoke",
        "/api/v1/api-tokens",
        "/api/v1/audit",
    ]:
        assert path in paths, path
    enroll_op = paths["/api/v1/enroll"]["post"]
    assert "201" in enroll_op["responses"] and "401" in enroll_op["responses"]
    schema = enroll_op["responses"]["201"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/EnrollResponse")
    assert "bearer" in str(spec.get("components", {}).get("securitySchemes", {})).lower()

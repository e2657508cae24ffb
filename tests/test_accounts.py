"""Accounts on SQLite and PostgreSQL: argon2id passwords, DB sessions (rotated at login, ended at
logout), CSRF on cookie changes, login throttling, API tokens bound to their user, the bootstrap
token, support consent, claim codes, names, tags, filters and pagination."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from gateway.accounts.api_tokens import create_bootstrap
from gateway.accounts.models import BrowserSession, User
from gateway.accounts.sessions import COOKIE
from gateway.registry.models import ApiToken, AuditEvent, Role
from gateway.runtime import GatewayRuntime
from provisioning import keys
from provisioning.wireguard.keys import generate_keypair
from tests.support.accounts import make_customer, make_user, token_of

PASSWORD = "correct horse battery staple"


def _login(client: TestClient, email: str, password: str = PASSWORD) -> Any:
    return client.post("/api/v1/auth/login", json={"email": email, "password": password})


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_passwords_are_argon2id_and_never_stored_or_logged_in_plain(
    client: TestClient, runtime: GatewayRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    user = make_user(runtime.engine, Role.operator, password=PASSWORD)
    assert user.password_hash is not None
    assert user.password_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert _login(client, user.email).status_code == 200
    assert _login(client, user.email, "wrong password!!").status_code == 401
    with Session(runtime.engine) as session:
        stored = " ".join(
            str(row.model_dump()) for row in session.exec(select(AuditEvent)).all()
        ) + " ".join(str(u.model_dump()) for u in session.exec(select(User)).all())
    assert PASSWORD not in stored and "wrong password!!" not in stored
    assert PASSWORD not in caplog.text and "wrong password!!" not in caplog.text


def test_login_rotates_the_session_and_logout_ends_it_everywhere(
    client: TestClient, runtime: GatewayRuntime
) -> None:
    user = make_user(runtime.engine, Role.viewer, password=PASSWORD)
    first = _login(client, user.email)
    assert first.status_code == 200
    old = client.cookies.get(COOKIE)
    cookie_header = first.headers["set-cookie"].lower()
    assert (
        "httponly" in cookie_header
        and "secure" in cookie_header
        and "samesite=lax" in cookie_header
    )
    assert client.get("/api/v1/auth/me").json()["email"] == user.email
    second = _login(client, user.email)  # the browser comes back with its old cookie
    new = client.cookies.get(COOKIE)
    assert new and old and new != old
    with Session(runtime.engine) as session:
        rows = session.exec(select(BrowserSession).where(BrowserSession.user_id == user.id)).all()
        assert len(rows) == 2 and sum(r.ended_at is None for r in rows) == 1
        assert old not in {r.id_hash for r in rows}  # only hashes are stored
    replay = TestClient(client.app, base_url="https://testserver", cookies={COOKIE: old})
    assert replay.get("/api/v1/auth/me").status_code == 401  # the rotated-out session is dead
    csrf = second.json()["csrf_token"]
    assert client.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    again = TestClient(client.app, base_url="https://testserver", cookies={COOKIE: new})
    assert again.get("/api/v1/auth/me").status_code == 401


def test_cookie_changes_need_the_csrf_token_header_or_form_field(
    client: TestClient, runtime: GatewayRuntime
) -> None:
    user = make_user(runtime.engine, Role.admin, password=PASSWORD)
    csrf = _login(client, user.email).json()["csrf_token"]
    body = {"name": "acme"}
    refused = client.post("/api/v1/customers", json=body)
    assert refused.status_code == 403 and refused.json()["reason"] == "csrf_failed"
    wrong = client.post("/api/v1/customers", json=body, headers={"X-CSRF-Token": "nope"})
    assert wrong.status_code == 403
    with Session(runtime.engine) as session:
        assert not session.exec(
            select(AuditEvent).where(AuditEvent.action == "customer.create")
        ).all()
    ok = client.post("/api/v1/customers", json=body, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 201
    # An HTML form posts the token as a field (the logout form of the console).
    form = client.post("/api/v1/auth/logout", data={"csrf_token": csrf})
    assert form.status_code == 204
    assert client.get("/api/v1/auth/me").status_code == 401
    # Reading needs no token; a bearer token needs none (no browser adds that header).
    token = token_of(runtime.engine, user)
    assert (
        client.post("/api/v1/customers", json={"name": "borg"}, headers=_bearer(token)).status_code
        == 201
    )


def test_brute_force_is_throttled_per_account_and_audited(
    client: TestClient, runtime: GatewayRuntime
) -> None:
    user = make_user(runtime.engine, Role.viewer, password=PASSWORD)
    limit = runtime.settings.login_account_failures
    for _ in range(limit):
        assert _login(client, user.email, "not the password").status_code == 401
    blocked = _login(client, user.email)  # even the right password waits now
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 0
    with Session(runtime.engine) as session:
        failed = session.exec(
            select(AuditEvent).where(AuditEvent.action == "auth.login_failed")
        ).all()
    assert len(failed) == limit and all(e.target == user.id for e in failed)
    assert {e.detail["why"] for e in failed} == {"wrong_password"}
    other = make_user(runtime.engine, Role.viewer, password=PASSWORD)
    assert _login(client, other.email).status_code == 200  # another account is not held up


def test_api_tokens_are_hashed_expire_and_never_exceed_their_user(
    client: TestClient, runtime: GatewayRuntime
) -> None:
    operator = make_user(runtime.engine, Role.operator)
    headers = _bearer(token_of(runtime.engine, operator))
    too_high = client.post(
        "/api/v1/api-tokens", json={"name": "x", "role": "admin"}, headers=headers
    )
    assert too_high.status_code == 403 and too_high.json()["reason"] == "role_too_high"
    made = client.post(
        "/api/v1/api-tokens",
        json={"name": "ci", "role": "viewer", "ttl_seconds": 60},
        headers=headers,
    ).json()
    assert made["role"] == "viewer" and made["expires_at"]
    with Session(runtime.engine) as session:
        row = session.get(ApiToken, made["id"])
        assert row is not None and made["token"] not in row.token_hash
        user = session.get(User, operator.id)
        assert user is not None
        user.role = Role.viewer  # demoted: the operator's own token follows at once
        session.add(user)
        session.commit()
    refused = client.post("/api/v1/provisioning-tokens", json={}, headers=headers)
    assert refused.status_code == 403
    client.post(
        f"/api/v1/users/{operator.id}/disable",
        headers=_bearer(token_of(runtime.engine, make_user(runtime.engine, Role.admin))),
    )
    gone = client.get("/api/v1/devices", headers=_bearer(made["token"]))
    assert gone.status_code == 401 and gone.json()["reason"] == "user_disabled"


def test_bootstrap_token_only_creates_the_first_admin(
    client: TestClient, runtime: GatewayRuntime
) -> None:
    with Session(runtime.engine, expire_on_commit=False) as session:
        boot = create_bootstrap(session).token
    headers = _bearer(boot)
    assert client.get("/api/v1/devices", headers=headers).json()["reason"] == "bootstrap_only"
    viewer = {"email": "v@example.com", "role": "viewer", "password": PASSWORD}
    assert client.post("/api/v1/users", json=viewer, headers=headers).status_code == 403
    admin = {"email": "root@example.com", "role": "admin", "password": PASSWORD}
    assert client.post("/api/v1/users", json=admin, headers=headers).status_code == 201
    spent = client.post("/api/v1/users", json=admin | {"email": "x@example.com"}, headers=headers)
    assert spent.status_code == 401 and spent.json()["reason"] in (
        "bootstrap_spent",
        "api_token_revoked",
    )


def _enroll(client: TestClient, token: str, name: str) -> dict[str, Any]:
    key = keys.generate_private_key()
    body = {"token": token, "public_key": keys.public_key_pem(key.public_key()), "name": name}
    response = client.post("/api/v1/enroll", json=body)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


def test_stock_machine_is_claimed_once_and_names_tags_filters_pages_work(
    client: TestClient, runtime: GatewayRuntime
) -> None:
    engine = runtime.engine
    acme = make_customer(engine, "Acme")
    admin = _bearer(token_of(engine, make_user(engine, Role.admin)))
    acme_admin = _bearer(token_of(engine, make_user(engine, Role.customer_admin, acme.id)))
    stock = client.post("/api/v1/provisioning-tokens", json={"uses": 5}, headers=admin).json()
    first = _enroll(client, stock["token"], "press-07")
    assert first["claim_code"]
    second = _enroll(client, stock["token"], "press-07")  # the stock already has a press-07
    assert second["name"] != "press-07" and second["name"].startswith("press-07-")
    hidden = client.get("/api/v1/devices/press-07", headers=acme_admin)
    assert hidden.status_code == 404
    claimed = client.post(
        "/api/v1/devices/claim", json={"code": first["claim_code"].lower()}, headers=acme_admin
    )
    assert claimed.status_code == 200 and claimed.json()["customer"] == "Acme"
    again = client.post(
        "/api/v1/devices/claim", json={"code": first["claim_code"]}, headers=acme_admin
    )
    assert again.status_code == 404  # one use
    shown = client.get("/api/v1/devices/press-07", headers=acme_admin).json()
    assert shown["id"] == first["device_id"] and shown["node_red_up"] is None
    tagged = client.post(
        "/api/v1/devices/press-07/tags",
        json={"set": {"line": "B"}, "remove": ["x"]},
        headers=acme_admin,
    ).json()
    assert tagged["tags"] == {"line": "B"}
    renamed = client.post(
        "/api/v1/devices/press-07/rename", json={"name": "press-7"}, headers=acme_admin
    )
    assert renamed.json()["name"] == "press-7"
    assert [d["id"] for d in client.get("/api/v1/devices?tag=line=B", headers=admin).json()] == [
        first["device_id"]
    ]
    assert [
        d["id"] for d in client.get("/api/v1/devices?customer=stock", headers=admin).json()
    ] == [second["device_id"]]
    assert client.get("/api/v1/devices?online=true", headers=admin).json() == []
    assert len(client.get("/api/v1/devices?name_prefix=press-", headers=admin).json()) == 2
    page = client.get("/api/v1/devices?limit=1", headers=admin)
    cursor = page.headers["X-Next-Cursor"]
    rest = client.get(f"/api/v1/devices?limit=1&cursor={cursor}", headers=admin)
    assert [d["id"] for d in page.json() + rest.json()] == [first["device_id"], second["device_id"]]
    assert "X-Next-Cursor" not in rest.headers
    assert client.get("/api/v1/devices?cursor=garbage", headers=admin).status_code == 422
    assert client.get("/api/v1/devices?limit=100000", headers=admin).status_code == 422
    # Both machines named press-07-ish for the manufacturer: an ambiguous name lists them.
    client.post(
        f"/api/v1/devices/{second['device_id']}/rename", json={"name": "press-7"}, headers=admin
    )
    ambiguous = client.get("/api/v1/devices/press-7", headers=admin)
    assert ambiguous.status_code == 409 and first["device_id"] in ambiguous.json()["detail"]
    events = client.get("/api/v1/audit", headers=acme_admin).json()
    assert {"device.claim", "device.tag", "device.rename"} <= {e["action"] for e in events}


def test_consent_refuses_support_tunnels_outside_a_granted_window(
    client: TestClient, runtime: GatewayRuntime
) -> None:
    engine = runtime.engine
    acme = make_customer(engine, "Acme")
    admin = _bearer(token_of(engine, make_user(engine, Role.admin)))
    support = _bearer(token_of(engine, make_user(engine, Role.support)))
    acme_admin = _bearer(token_of(engine, make_user(engine, Role.customer_admin, acme.id)))
    made = client.post(
        "/api/v1/provisioning-tokens", json={"customer": "Acme"}, headers=admin
    ).json()
    machine = _enroll(client, made["token"], "press-9")
    assert "claim_code" not in machine  # a customer's machine needs no claim code
    body = {
        "device_id": "press-9",
        "ports": [1880],
        "engineer_public_key": generate_keypair().public_key,
    }
    # No consent required yet: the open gets past consent (and stops at the missing hub).
    assert client.post("/api/v1/tunnels", json=body, headers=support).status_code == 503
    required = client.put(
        "/api/v1/customers/Acme/support", json={"required": True}, headers=acme_admin
    )
    assert required.json()["open_now"] is False
    refused = client.post("/api/v1/tunnels", json=body, headers=support)
    assert refused.status_code == 409 and refused.json()["reason"] == "consent_required"
    # The manufacturer cannot consent for its customer.
    assert (
        client.post(
            "/api/v1/customers/Acme/support/grants", json={"seconds": 60}, headers=admin
        ).status_code
        == 403
    )
    granted = client.post(
        "/api/v1/customers/Acme/support/grants",
        json={"seconds": 3600, "note": "ticket 1"},
        headers=acme_admin,
    )
    assert granted.status_code == 201
    assert client.post("/api/v1/tunnels", json=body, headers=support).status_code == 503
    client.post("/api/v1/customers/Acme/support/revoke", headers=acme_admin)
    again = client.post("/api/v1/tunnels", json=body, headers=support)
    assert again.status_code == 409 and again.json()["reason"] == "consent_required"
    seen = {e["action"] for e in client.get("/api/v1/audit", headers=acme_admin).json()}
    assert {"support.require", "support.grant", "support.revoke"} <= seen

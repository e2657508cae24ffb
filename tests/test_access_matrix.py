"""Who may call what: every route of the OpenAPI document x every kind of caller.

Callers: the manufacturer's admin, operator, support and viewer; customer A's admin and viewer;
customer B's admin; an anonymous caller; a machine (customer A's) with its own JWT. Path
parameters name customer A's things (its machine, its command, its tunnel, its user, ...).

For each route the table `RULES` says who may call it. The test checks that each caller gets
exactly that: the allowed ones pass authorization (the answer is one of the route's `ok`
codes), a caller without the role gets 403, nobody gets in without credentials (401), and
customer B never sees anything of A's: a route about A's thing answers B's admin 404 (as for
a thing that does not exist), and a list B may read holds none of A's ids. A route in the
OpenAPI document without a rule fails the test, and so does a rule for a route that is gone.

Routes that end something (revoke, disable, logout) run last, in that order.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from gateway.commands.models import CommandRecord
from gateway.db import utcnow
from gateway.registry.models import Role
from gateway.runtime import GatewayRuntime
from gateway.tunnels.models import TunnelRecord
from provisioning import keys
from provisioning.jwt_rules import sign_device_token
from provisioning.wireguard.keys import generate_keypair
from tests.support.accounts import make_customer, make_user, token_of

STAFF = {"admin", "operator", "support", "viewer"}
A_PEOPLE = {"a_admin", "a_viewer"}
READERS = STAFF | A_PEOPLE | {"b_admin"}  # read A's machines; B is scoped out (404 / absent)
PEOPLE = READERS
CALLERS = [
    "admin",
    "operator",
    "support",
    "viewer",
    "a_admin",
    "a_viewer",
    "b_admin",
    "anon",
    "device",
]
PUBLIC = "public"  # everybody gets the same answer
DEVICE = "device"  # the machine's routes


@dataclass
class Rule:
    may: set[str] | str
    ok: set[int] = field(default_factory=lambda: {200})
    #: True: the route names A's thing (B's admin gets 404 where its role would allow it);
    #: False: a list or a thing of nobody's (B's admin must not see A's ids in the answer).
    about_a: bool = False
    body: Callable[[Ctx, str], Any] | None = None
    content: bytes | None = None
    #: Explicit answers for some callers (overrides the rest).
    special: dict[str, int] = field(default_factory=dict)
    order: int = 0  # higher runs later


@dataclass
class Ctx:
    a_customer: str
    b_customer: str
    device: str
    device_name: str
    device_key: Any
    command: str
    tunnel: str
    victim_user: str
    victim_api_token: str
    provisioning_token: str
    release: str
    deployment: str
    gateway_id: str
    a_ids: list[str]


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


FLOWS = json.dumps([{"id": "t1", "type": "tab", "label": "m"}])

RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): Rule(PUBLIC),
    ("GET", "/metrics"): Rule(PUBLIC),
    ("POST", "/api/v1/enroll"): Rule(
        PUBLIC, {422}, body=lambda c, _: {"token": "efp_" + "x" * 40, "public_key": "k" * 60}
    ),
    ("GET", "/api/v1/agent/self"): Rule(DEVICE),
    ("GET", "/api/v1/agent/bundles/{digest}"): Rule(DEVICE),  # its deployment's release
    ("GET", "/api/v1/agent/modules/{sha256}"): Rule(DEVICE, {403, 404}),
    ("POST", "/api/v1/auth/login"): Rule(
        PUBLIC, {401}, body=lambda c, who: {"email": f"{who}@nobody.example.com", "password": "x"}
    ),
    ("POST", "/api/v1/auth/token"): Rule(
        PUBLIC, {401}, body=lambda c, who: {"email": f"{who}@none.example.com", "password": "x"}
    ),
    ("GET", "/api/v1/auth/me"): Rule(PEOPLE),
    ("POST", "/api/v1/auth/logout"): Rule(PEOPLE, {204}, order=9),
    ("GET", "/api/v1/auth/oidc/login"): Rule(PUBLIC, {422}),
    ("GET", "/api/v1/auth/oidc/callback"): Rule(PUBLIC, {403}),
    # people
    ("POST", "/api/v1/users"): Rule(
        {"admin", "a_admin", "b_admin"},
        {201},
        about_a=True,
        body=lambda c, who: {
            "email": _unique(who) + "@example.com",
            "role": "customer-viewer",
            "customer": c.a_customer,
            "password": "a long enough password",
        },
    ),
    ("GET", "/api/v1/users"): Rule({"admin", "a_admin", "b_admin"}),
    ("GET", "/api/v1/users/{user}"): Rule({"admin", "a_admin", "b_admin"}, about_a=True),
    ("POST", "/api/v1/users/{user}/disable"): Rule(
        {"admin", "a_admin", "b_admin"}, about_a=True, order=8
    ),
    ("POST", "/api/v1/customers"): Rule({"admin"}, {201}, body=lambda c, w: {"name": _unique(w)}),
    ("GET", "/api/v1/customers"): Rule(PEOPLE),
    ("GET", "/api/v1/customers/{customer}"): Rule(PEOPLE, about_a=True),
    ("GET", "/api/v1/customers/{customer}/support"): Rule(PEOPLE, about_a=True),
    ("PUT", "/api/v1/customers/{customer}/support"): Rule(
        {"a_admin", "b_admin"}, about_a=True, body=lambda c, w: {"required": False}
    ),
    ("POST", "/api/v1/customers/{customer}/support/grants"): Rule(
        {"a_admin", "b_admin"}, {201}, about_a=True, body=lambda c, w: {"seconds": 60}
    ),
    ("POST", "/api/v1/customers/{customer}/support/revoke"): Rule(
        {"a_admin", "b_admin"}, about_a=True
    ),
    ("POST", "/api/v1/api-tokens"): Rule(PEOPLE, {201}, body=lambda c, w: {"name": "m"}),
    ("GET", "/api/v1/api-tokens"): Rule(PEOPLE),
    # A's victim token belongs to A's admin: only its owner and the admin may revoke it.
    ("DELETE", "/api/v1/api-tokens/{token_id}"): Rule(
        PEOPLE, about_a=True, special={w: 404 for w in PEOPLE - {"admin", "a_admin"}}, order=7
    ),
    # provisioning
    ("POST", "/api/v1/provisioning-tokens"): Rule(
        {"admin", "operator"}, {201}, body=lambda c, w: {}
    ),
    ("GET", "/api/v1/provisioning-tokens"): Rule({"admin", "operator"}),
    ("DELETE", "/api/v1/provisioning-tokens/{token_id}"): Rule({"admin", "operator"}, order=7),
    ("GET", "/api/v1/audit"): Rule({"admin", "operator", "support", "a_admin", "b_admin"}),
    # machines
    ("GET", "/api/v1/devices"): Rule(READERS),
    ("GET", "/api/v1/devices/{device}"): Rule(READERS, about_a=True),
    ("POST", "/api/v1/devices/{device}/rename"): Rule(
        {"admin", "operator", "a_admin", "b_admin"},
        about_a=True,
        body=lambda c, w: {"name": c.device_name},
    ),
    ("POST", "/api/v1/devices/{device}/tags"): Rule(
        {"admin", "operator", "a_admin", "b_admin"}, about_a=True, body=lambda c, w: {}
    ),
    ("POST", "/api/v1/devices/{device}/assign"): Rule(
        {"admin"}, about_a=True, body=lambda c, w: {"customer": c.a_customer}
    ),
    ("POST", "/api/v1/devices/claim"): Rule(
        {"a_admin", "b_admin"}, {404}, body=lambda c, w: {"code": "ABCDE-FGHJK-MNPQR-STUVW"}
    ),
    ("POST", "/api/v1/devices/{device}/revoke"): Rule({"admin"}, about_a=True, order=6),
    ("POST", "/api/v1/devices/{device}/ping"): Rule(
        {"admin", "operator", "support"}, {503}, about_a=True
    ),
    ("GET", "/api/v1/devices/{device}/deployments"): Rule(READERS, about_a=True),
    ("GET", "/api/v1/commands/{command_id}"): Rule(READERS, about_a=True),
    ("GET", "/api/v1/devices/{device_id}/telemetry/latest"): Rule(READERS, about_a=True),
    ("GET", "/api/v1/devices/{device_id}/telemetry/export.csv"): Rule(READERS, about_a=True),
    ("GET", "/api/v1/devices/{device_id}/telemetry/{metric}"): Rule(READERS, about_a=True),
    # flows: the manufacturer's
    ("POST", "/api/v1/flows/releases"): Rule(
        {"admin", "operator"}, {200, 201}, body=lambda c, w: {"flows_json": FLOWS}
    ),
    ("GET", "/api/v1/flows/releases"): Rule(STAFF),
    ("GET", "/api/v1/flows/releases/{ref}"): Rule(STAFF),
    ("POST", "/api/v1/flows/modules"): Rule({"admin", "operator"}, {422}, content=b"not a tarball"),
    ("GET", "/api/v1/flows/modules"): Rule(STAFF),
    ("POST", "/api/v1/deployments"): Rule(
        {"admin", "operator"},
        {201},
        body=lambda c, w: {"release": c.release, "to": {"devices": [c.device]}, "force": True},
    ),
    ("GET", "/api/v1/deployments"): Rule(STAFF),
    ("GET", "/api/v1/deployments/{deployment_id}"): Rule(STAFF),
    ("POST", "/api/v1/deployments/{deployment_id}/cancel"): Rule({"admin", "operator"}, {200, 409}),
    # tunnels
    ("POST", "/api/v1/tunnels"): Rule(
        {"admin", "operator", "support"},
        {503},
        body=lambda c, w: {
            "device_id": c.device_name,
            "ports": [1880],
            "engineer_public_key": generate_keypair().public_key,
        },
    ),
    ("GET", "/api/v1/tunnels"): Rule(READERS),
    ("GET", "/api/v1/tunnels/pool"): Rule(STAFF),
    ("GET", "/api/v1/tunnels/{tunnel_id}"): Rule(READERS, about_a=True),
    ("POST", "/api/v1/tunnels/{tunnel_id}/close"): Rule(
        {"admin", "operator", "support", "a_admin", "b_admin"}, about_a=True
    ),
}


def _routes(client: TestClient) -> set[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    return {
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    }


def _path(path: str, c: Ctx) -> str:
    values = {
        "device": c.device,
        "device_id": c.device,
        "command_id": c.command,
        "tunnel_id": c.tunnel,
        "user": c.victim_user,
        "customer": c.a_customer,
        "deployment_id": c.deployment,
        "ref": c.release,
        "digest": c.release,
        "sha256": "0" * 64,
        "metric": "temp",
    }
    if path.endswith("/api-tokens/{token_id}"):
        values["token_id"] = c.victim_api_token
    else:
        values["token_id"] = c.provisioning_token
    return path.format(**values)


@pytest.fixture
def world(client: TestClient, runtime: GatewayRuntime) -> tuple[Ctx, dict[str, dict[str, str]]]:
    engine = runtime.engine
    a = make_customer(engine, "Acme")
    b = make_customer(engine, "Borg")
    people = {
        "admin": make_user(engine, Role.admin),
        "operator": make_user(engine, Role.operator),
        "support": make_user(engine, Role.support),
        "viewer": make_user(engine, Role.viewer),
        "a_admin": make_user(engine, Role.customer_admin, a.id),
        "a_viewer": make_user(engine, Role.customer_viewer, a.id),
        "b_admin": make_user(engine, Role.customer_admin, b.id),
    }
    headers = {w: {"Authorization": f"Bearer {token_of(engine, u)}"} for w, u in people.items()}
    headers["anon"] = {}
    admin = headers["admin"]
    victim = make_user(engine, Role.customer_viewer, a.id)
    victim_token = client.post(
        "/api/v1/api-tokens", json={"name": "victim"}, headers=headers["a_admin"]
    ).json()["id"]
    made = client.post("/api/v1/provisioning-tokens", json={"customer": a.id}, headers=admin)
    key = keys.generate_private_key()
    enrolled = client.post(
        "/api/v1/enroll",
        json={
            "token": made.json()["token"],
            "public_key": keys.public_key_pem(key.public_key()),
            "name": "press-a",
        },
    ).json()
    device = enrolled["device_id"]
    spare = client.post("/api/v1/provisioning-tokens", json={}, headers=admin).json()["id"]
    release = client.post(
        "/api/v1/flows/releases", json={"flows_json": FLOWS}, headers=admin
    ).json()["digest"]
    deployment = client.post(
        "/api/v1/deployments",
        json={"release": release, "to": {"devices": [device]}},
        headers=admin,
    ).json()["id"]
    now = utcnow()
    with Session(engine) as session:
        session.add(
            CommandRecord(
                id="cmd-a-1",
                device_id=device,
                kind="ping",
                state="sent",
                created_at=now,
                updated_at=now,
                expires_at=now + timedelta(minutes=5),
                actor="tests",
            )
        )
        session.add(
            TunnelRecord(
                id="t-a-1",
                device_id=device,
                state="closed",
                actor="tests",
                ports=[1880],
                device_ip="10.9.0.2",
                engineer_ip="10.9.0.3",
                engineer_public_key="k",
                hub_ip="10.9.0.1",
                hub_public_key="h",
                hub_endpoint="hub:51820",
                mtu=1280,
                created_at=now,
                expires_at=now,
                open_deadline=now,
                closed_at=now,
            )
        )
        session.commit()
    ctx = Ctx(
        a_customer=a.id,
        b_customer=b.id,
        device=device,
        device_name="press-a",
        device_key=key,
        command="cmd-a-1",
        tunnel="t-a-1",
        victim_user=victim.id,
        victim_api_token=victim_token,
        provisioning_token=spare,
        release=release,
        deployment=deployment,
        gateway_id=runtime.identity.gateway_id,
        a_ids=[a.id, device, "cmd-a-1", "t-a-1", victim.id, people["a_admin"].email, victim_token],
    )
    return ctx, headers


def _expected(rule: Rule, who: str) -> set[int]:
    if who in rule.special:
        return {rule.special[who]}
    if rule.may == PUBLIC:
        return rule.ok
    if rule.may == DEVICE:
        return rule.ok if who == "device" else {401}
    if who in ("anon", "device"):
        return {401}
    assert isinstance(rule.may, set)
    if who not in rule.may:
        return {403}
    if who == "b_admin" and rule.about_a:
        return {404}
    return rule.ok


def test_every_route_has_a_rule(client: TestClient) -> None:
    routes = _routes(client)
    missing = sorted(routes - RULES.keys())
    stale = sorted(RULES.keys() - routes)
    assert not missing, f"routes without an access rule (add them to RULES): {missing}"
    assert not stale, f"rules for routes that no longer exist: {stale}"


def test_each_caller_gets_exactly_what_its_role_allows(
    client: TestClient, world: tuple[Ctx, dict[str, dict[str, str]]]
) -> None:
    ctx, headers = world
    failures: list[str] = []
    calls = 0
    for (method, path), rule in sorted(RULES.items(), key=lambda item: item[1].order):
        for who in CALLERS:
            if who == "device":
                token = sign_device_token(ctx.device_key, ctx.device, ctx.gateway_id)
                sent = {"Authorization": f"Bearer {token}"}
            else:
                sent = headers[who]
            kwargs: dict[str, Any] = {"headers": sent}
            if rule.body is not None:
                kwargs["json"] = rule.body(ctx, who)
            if rule.content is not None:
                kwargs["content"] = rule.content
            response = client.request(method, _path(path, ctx), **kwargs)
            calls += 1
            expected = _expected(rule, who)
            if response.status_code not in expected:
                failures.append(
                    f"{method} {path} as {who}: {response.status_code} (expected "
                    f"{sorted(expected)}): {response.text[:160]}"
                )
            elif who == "b_admin" and response.status_code < 300 and method == "GET":
                leaked = [i for i in ctx.a_ids if i in response.text]
                if leaked:
                    failures.append(f"{method} {path} as b_admin shows A's {leaked}")
    assert calls == len(RULES) * len(CALLERS)
    assert not failures, "\n".join(failures)

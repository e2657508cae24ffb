"""The EMQX adapter: the gateway's answers to EMQX's HTTP authentication/authorization hooks.

EMQX cannot run on this machine (no Docker engine, no package), so these tests drive the hooks
with the requests EMQX documents ("Use HTTP Service" for authn and authz in the EMQX 5.8 docs) and
check the answers by the same contract. The one stand-in is EMQX's REST API for kicking a client:
a small HTTP server on loopback that records the DELETE /api/v5/clients/{id} it receives.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.broker.emqx import EmqxApi, EmqxBrokerAdmin
from gateway.registry.models import Role
from gateway.runtime import GatewayRuntime
from provisioning import keys
from tests.conftest import api_token


class FakeEmqxApi(ThreadingHTTPServer):
    """Stand-in for EMQX's REST API (EMQX cannot run here): records kicks, checks basic auth."""

    def __init__(self) -> None:
        self.kicked: list[str] = []
        self.auth_seen: list[str] = []

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_DELETE(self) -> None:
                outer.auth_seen.append(self.headers.get("Authorization", ""))
                outer.kicked.append(self.path.rsplit("/", 1)[-1])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def emqx_api() -> Iterator[FakeEmqxApi]:
    server = FakeEmqxApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def emqx_client(runtime: GatewayRuntime, emqx_api: FakeEmqxApi) -> Iterator[TestClient]:
    runtime.settings.broker_kind = "emqx"
    runtime.settings.broker_hook_token = "hook-secret"
    runtime.broker = EmqxBrokerAdmin(runtime.engine, EmqxApi(emqx_api.url, "key", "secret"))
    with TestClient(create_app(runtime)) as client:
        yield client


HOOK = {"Authorization": "Bearer hook-secret"}


def _enrolled(client: TestClient, runtime: GatewayRuntime) -> tuple[str, str]:
    admin = {"Authorization": f"Bearer {api_token(runtime, Role.admin)}"}
    token = client.post("/api/v1/provisioning-tokens", json={}, headers=admin).json()["token"]
    key = keys.generate_private_key()
    body = client.post(
        "/api/v1/enroll", json={"token": token, "public_key": keys.public_key_pem(key.public_key())}
    ).json()
    return body["device_id"], body["broker"]["password"]


def _authn(client: TestClient, user: str, password: str, clientid: str | None = None) -> Any:
    body = {
        "clientid": clientid or user,
        "username": user,
        "password": password,
        "peerhost": "10.0.0.7",
    }
    response = client.post("/api/v1/broker/authn", json=body, headers=HOOK)
    assert response.status_code == 200  # EMQX reads any error status as "ignore"
    return response.json()


def test_authn_allows_a_device_with_its_password_and_hands_it_its_acl(
    emqx_client: TestClient, runtime: GatewayRuntime
) -> None:
    device_id, password = _enrolled(emqx_client, runtime)
    answer = _authn(emqx_client, device_id, password)
    assert answer["result"] == "allow"
    assert answer["is_superuser"] is False
    rules = {(r["permission"], r["action"], r["topic"]) for r in answer["acl"]}
    assert ("allow", "publish", f"fleet/{device_id}/telemetry") in rules
    assert ("allow", "subscribe", f"fleet/{device_id}/cmd") in rules
    assert answer["acl"][-1] == {"permission": "deny", "action": "all", "topic": "#"}


@pytest.mark.parametrize("case", ["wrong_password", "other_client_id", "unknown", "no_hook_token"])
def test_authn_refusals(case: str, emqx_client: TestClient, runtime: GatewayRuntime) -> None:
    device_id, password = _enrolled(emqx_client, runtime)
    if case == "no_hook_token":
        response = emqx_client.post(
            "/api/v1/broker/authn",
            json={"clientid": device_id, "username": device_id, "password": password},
        )
        assert response.status_code == 401
        return
    user, secret, clientid = {
        "wrong_password": (device_id, password + "x", device_id),
        "other_client_id": (device_id, password, "dev-someoneelse"),
        "unknown": ("dev-notenrolled1", password, "dev-notenrolled1"),
    }[case]
    assert _authn(emqx_client, user, secret, clientid)["result"] == "deny"


def test_authz_allows_only_the_devices_own_topics(
    emqx_client: TestClient, runtime: GatewayRuntime
) -> None:
    device_id, _ = _enrolled(emqx_client, runtime)

    def ask(action: str, topic: str, user: str = device_id) -> str:
        body = {"clientid": user, "username": user, "topic": topic, "action": action}
        answer = emqx_client.post("/api/v1/broker/authz", json=body, headers=HOOK).json()
        return str(answer["result"])

    assert ask("publish", f"fleet/{device_id}/telemetry") == "allow"
    assert ask("publish", f"fleet/{device_id}/reply") == "allow"
    assert ask("subscribe", f"fleet/{device_id}/cmd") == "allow"
    assert ask("publish", f"fleet/{device_id}/cmd") == "deny"
    assert ask("publish", "fleet/dev-other000/telemetry") == "deny"
    assert ask("subscribe", "fleet/+/cmd") == "deny"
    assert ask("subscribe", "#") == "deny"


def test_revoked_device_is_kicked_and_refused(
    emqx_client: TestClient, runtime: GatewayRuntime, emqx_api: FakeEmqxApi
) -> None:
    device_id, password = _enrolled(emqx_client, runtime)
    admin = {"Authorization": f"Bearer {api_token(runtime, Role.admin)}"}
    revoked = emqx_client.post(f"/api/v1/devices/{device_id}/revoke", headers=admin)
    assert revoked.status_code == 200
    assert emqx_api.kicked == [device_id]
    assert emqx_api.auth_seen[0].startswith("Basic ")
    assert _authn(emqx_client, device_id, password)["result"] == "deny"
    body = {
        "clientid": device_id,
        "username": device_id,
        "topic": f"fleet/{device_id}/telemetry",
        "action": "publish",
    }
    answer = emqx_client.post("/api/v1/broker/authz", json=body, headers=HOOK).json()
    assert answer["result"] == "deny"


def test_hooks_are_absent_with_the_mosquitto_adapter(client: TestClient) -> None:
    response = client.post("/api/v1/broker/authn", json={})
    assert response.status_code == 404

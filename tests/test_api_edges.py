"""The API's answers to bad or careless requests: a clear 4xx of the documented shape, never a
500, never the input echoed back (issue 12's list). The app, on SQLite, through its test client.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.registry.models import Role
from gateway.runtime import GatewayRuntime
from provisioning import keys
from provisioning.wireguard.keys import WgKeyError, generate_keypair, normalize_public_key
from tests.conftest import api_token

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def operator(runtime: GatewayRuntime) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_token(runtime, Role.operator)}"}


def _device(client: TestClient, operator: dict[str, str]) -> str:
    token = client.post("/api/v1/provisioning-tokens", json={}, headers=operator).json()["token"]
    key = keys.public_key_pem(keys.generate_private_key().public_key())
    enrolled = client.post("/api/v1/enroll", json={"token": token, "public_key": key})
    assert enrolled.status_code == 201, enrolled.text
    return str(enrolled.json()["device_id"])


def _release(client: TestClient, operator: dict[str, str], flows: str, **extra: Any) -> Any:
    return client.post(
        "/api/v1/flows/releases", json={"flows_json": flows, **extra}, headers=operator
    )


def test_an_empty_flows_list_is_a_release_only_when_asked_for(
    client: TestClient, operator: dict[str, str]
) -> None:
    refused = _release(client, operator, "[]")
    assert refused.status_code == 422
    assert refused.json()["reason"] == "empty_flows"
    assert "remove every flow" in refused.json()["detail"]
    assert client.get("/api/v1/flows/releases", headers=operator).json() == []
    asked = _release(client, operator, "[]", allow_empty=True)
    assert asked.status_code == 201, asked.text
    assert asked.json()["node_count"] == 0


@pytest.mark.parametrize(
    "flows",
    [
        "[" * 1500 + "]" * 1500,  # RecursionError in the parser before
        '[{"id": "a", "type": "inject", "name": "\\ud800"}]',  # UnicodeEncodeError in the digest
    ],
)
def test_flows_that_broke_the_parser_are_a_422(
    client: TestClient, operator: dict[str, str], flows: str
) -> None:
    response = _release(client, operator, flows)
    assert response.status_code == 422, response.text
    assert response.json()["reason"] == "invalid_flows"


def test_a_lone_surrogate_in_the_request_json_itself_is_a_422(
    client: TestClient, operator: dict[str, str]
) -> None:
    # The request's JSON decodes "\ud800" into the flows text itself (not an escape inside it).
    body = b'{"flows_json": "[{\\"id\\": \\"a\\", \\"type\\": \\"x\\", \\"n\\": \\"\\ud800\\"}]"}'
    response = client.post(
        "/api/v1/flows/releases",
        content=body,
        headers={**operator, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text


def test_a_module_with_a_deeply_nested_package_json_is_a_422(
    client: TestClient, operator: dict[str, str]
) -> None:
    import io
    import tarfile

    manifest = ("[" * 5000 + "]" * 5000).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("package/package.json")
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))
    response = client.post(
        "/api/v1/flows/modules",
        content=buffer.getvalue(),
        headers={**operator, "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["reason"] == "bad_tarball"


def test_the_all_zero_wireguard_key_is_refused(
    client: TestClient, operator: dict[str, str]
) -> None:
    device_id = _device(client, operator)
    zero = base64.b64encode(bytes(32)).decode()
    response = client.post(
        "/api/v1/tunnels",
        json={"device_id": device_id, "ports": [1880], "engineer_public_key": zero},
        headers=operator,
    )
    assert response.status_code == 422, response.text
    assert "small order" in response.json()["detail"]
    assert normalize_public_key(generate_keypair().public_key)
    with pytest.raises(WgKeyError):
        normalize_public_key(base64.b64encode(b"\x01" + bytes(31)).decode())


def test_unix_seconds_are_never_read_as_milliseconds(
    client: TestClient, operator: dict[str, str]
) -> None:
    device_id = _device(client, operator)
    url = f"/api/v1/devices/{device_id}/telemetry/temp"
    later = client.get(url, params={"until": "99999999999", "every": 1e9}, headers=operator)
    assert later.status_code == 200, later.text
    assert later.json()["until"] == 99999999999  # the year 5138, as seconds
    millis = client.get(url, params={"until": "1732370000000"}, headers=operator)
    assert millis.status_code == 422
    assert "milliseconds? send seconds" in millis.json()["detail"]
    iso = client.get(url, params={"since": "2025-01-31T12:00:00Z"}, headers=operator)
    assert iso.status_code == 200 and iso.json()["since"] == 1738324800.0


def test_a_422_names_the_problem_without_echoing_the_input(
    client: TestClient, operator: dict[str, str]
) -> None:
    secret = "s3cret-" + "q" * 20_000
    response = client.post(
        "/api/v1/provisioning-tokens",
        json={"uses": secret, "tags": {"k": secret}},
        headers=operator,
    )
    assert response.status_code == 422
    body = response.json()
    assert secret[:30] not in response.text and len(response.text) < 2000
    assert body["reason"] == "invalid_request" and body["detail"].startswith("body.")
    assert {tuple(e["loc"]) for e in body["errors"]} >= {("body", "uses")}


def test_a_body_that_is_not_json_is_a_422_not_an_undocumented_400(
    client: TestClient, operator: dict[str, str]
) -> None:
    for raw in (b"\xff\xfe)b\x80", b"{not json"):
        response = client.post(
            "/api/v1/provisioning-tokens",
            content=raw,
            headers={**operator, "Content-Type": "application/json"},
        )
        assert response.status_code == 422, response.text
        assert response.json()["reason"] == "malformed_json"


def test_405_lists_every_method_of_the_path(client: TestClient, operator: dict[str, str]) -> None:
    response = client.request("OPTIONS", "/api/v1/provisioning-tokens", headers=operator)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, POST"
    assert json.loads(response.text)["reason"] == "method_not_allowed"

"""Flow pushes over HTTP, on SQLite and PostgreSQL: releases, the module cache, deployments in
waves, the rollout scheduler, cancel, and what agents may fetch.

The gateway side is real (the app, the database, the rollout scheduler, a `CommandPublisher` on the
real broker). Devices are enrolled through the API; their answers are fed to `apply_reply`, the
function the reply listener calls for every reply it receives, so the tests decide exactly when a
device finishes. Real agents against real Node-RED are in test_flows_e2e.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.commands.models import CommandRecord
from gateway.commands.publisher import CommandPublisher
from gateway.commands.replies import apply_reply
from gateway.db import make_engine, utcnow
from gateway.flows.scheduler import RolloutScheduler
from gateway.flows.wiring import install as install_flow_pushes
from gateway.identity import GatewayIdentity
from gateway.leader import LeaderElection, SingletonJobs
from gateway.registry.models import AuditEvent, Role
from gateway.runtime import GatewayRuntime
from provisioning import keys
from provisioning.bundles import Bundle
from provisioning.deploy_command import DeployArgs
from provisioning.jwt_rules import sign_device_token
from provisioning.states import CommandKind
from provisioning.wire import EnrollResponse, Reply
from tests.conftest import api_token
from tests.support.mosquitto import MqttProbe, device_endpoint
from tests.support.waiting import wait_for

SENSOR_TYPE = "acme-sensor"
SENSOR_MODULE = "node-red-contrib-acme-sensor"


def flows_json(label: str, *extra_types: str, indent: int | None = None) -> str:
    tab = f"tab-{label}"
    nodes: list[dict[str, Any]] = [
        {"id": tab, "type": "tab", "label": label},
        {"id": f"inject-{label}", "type": "inject", "z": tab, "wires": [[f"debug-{label}"]]},
        {"id": f"debug-{label}", "type": "debug", "z": tab, "wires": []},
    ]
    nodes += [
        {"id": f"x{i}-{label}", "type": t, "z": tab, "wires": []} for i, t in enumerate(extra_types)
    ]
    return json.dumps(nodes, indent=indent)


def module_tarball(name: str, version: str, node_type: str, comment: str = "") -> bytes:
    """A Node-RED node module laid out as `npm pack` makes it (everything under package/)."""
    files = {
        "package/package.json": json.dumps(
            {
                "name": name,
                "version": version,
                "node-red": {"nodes": {node_type: "nodes/sensor.js"}},
            }
        ),
        "package/nodes/sensor.js": "module.exports = function (RED) {\n"
        f"  RED.nodes.registerType('{node_type}',\n"
        "    function (c) { RED.nodes.createNode(this, c); });\n"
        f"}}; // {comment}\n",
        "package/nodes/sensor.html": "<script>RED.nodes.registerType("
        f'"{node_type}", {{category: "input"}});</script>\n',
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Fleet:
    """Devices enrolled through the API, and a way to answer for them."""

    def __init__(self, client: TestClient, headers: dict[str, str], runtime: GatewayRuntime):
        self.client = client
        self.headers = headers
        self.runtime = runtime
        self.keys: dict[str, Any] = {}
        self.enrollments: dict[str, EnrollResponse] = {}

    def enroll(self, count: int, tags: dict[str, str] | None = None) -> list[str]:
        token = self.client.post(
            "/api/v1/provisioning-tokens",
            json={"uses": count, "tags": tags or {}},
            headers=self.headers,
        ).json()["token"]
        ids = []
        for _ in range(count):
            key = keys.generate_private_key()
            response = self.client.post(
                "/api/v1/enroll",
                json={"token": token, "public_key": keys.public_key_pem(key.public_key())},
            )
            assert response.status_code == 201, response.text
            enrollment = EnrollResponse.model_validate(response.json())
            self.keys[enrollment.device_id] = key
            self.enrollments[enrollment.device_id] = enrollment
            ids.append(enrollment.device_id)
        return ids

    def device_headers(self, device_id: str) -> dict[str, str]:
        token = sign_device_token(self.keys[device_id], device_id, self.runtime.identity.gateway_id)
        return {"Authorization": f"Bearer {token}"}

    def reply(
        self, device_id: str, command_id: str, state: str, detail: str | None = None, **data: Any
    ) -> None:
        """What the reply listener does with a reply that arrived on the device's topic."""
        with Session(self.runtime.engine, expire_on_commit=False) as session:
            stored = apply_reply(
                session,
                device_id,
                Reply(command_id=command_id, state=state, detail=detail, data=data),
                self.runtime.hooks,
            )
        assert stored is not None

    def finish(self, deployment: dict[str, Any], device_id: str, state: str = "succeeded") -> None:
        record = device_record(deployment, device_id)
        assert record["command_id"], f"{device_id} has no command yet"
        self.reply(device_id, record["command_id"], "downloading")
        self.reply(device_id, record["command_id"], "applying")
        detail = None if state == "succeeded" else f"the {state} reason"
        self.reply(device_id, record["command_id"], state, detail, rev=f"rev-{device_id}")


def device_record(deployment: dict[str, Any], device_id: str) -> dict[str, Any]:
    return next(d for d in deployment["devices"] if d["device_id"] == device_id)


def deploy_commands(runtime: GatewayRuntime, device_id: str | None = None) -> list[CommandRecord]:
    with Session(runtime.engine) as session:
        query = select(CommandRecord).where(CommandRecord.kind == CommandKind.deploy)
        if device_id is not None:
            query = query.where(CommandRecord.device_id == device_id)
        return list(session.exec(query.order_by(col(CommandRecord.created_at))))


@pytest.fixture
def publisher(runtime: GatewayRuntime, broker: MosquittoSupervisor) -> Iterator[CommandPublisher]:
    publisher = CommandPublisher(broker.endpoint, runtime.topics)
    publisher.start()
    runtime.publisher = publisher
    yield publisher
    publisher.stop()


@pytest.fixture
def scheduler(runtime: GatewayRuntime, publisher: CommandPublisher) -> RolloutScheduler:
    return install_flow_pushes(runtime, contextlib.ExitStack())


@pytest.fixture
def fleet(client: TestClient, admin_headers: dict[str, str], runtime: GatewayRuntime) -> Fleet:
    return Fleet(client, admin_headers, runtime)


@pytest.fixture
def operator_headers(runtime: GatewayRuntime) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_token(runtime, Role.operator)}"}


def release(client: TestClient, headers: dict[str, str], flows: str, **body: Any) -> Any:
    response = client.post(
        "/api/v1/flows/releases", json={"flows_json": flows, **body}, headers=headers
    )
    assert response.status_code in (200, 201), response.text
    return response.json()


def push(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    response = client.post("/api/v1/deployments", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def show(client: TestClient, headers: dict[str, str], deployment_id: str) -> Any:
    response = client.get(f"/api/v1/deployments/{deployment_id}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def audit_actions(runtime: GatewayRuntime, target: str) -> list[str]:
    with Session(runtime.engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.target == target))
        return [e.action for e in events]


# ---- releases -------------------------------------------------------------------------------


def test_a_release_is_content_addressed_immutable_and_reports_unprovided_types(
    client: TestClient, operator_headers: dict[str, str], runtime: GatewayRuntime
) -> None:
    flows = flows_json("a", SENSOR_TYPE)
    made = client.post(
        "/api/v1/flows/releases",
        json={"flows_json": flows, "notes": "first"},
        headers=operator_headers,
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["digest"] == Bundle.create(flows).digest
    assert body["created"] is True and body["node_count"] == 4
    assert body["unprovided_types"] == [SENSOR_TYPE]
    assert any(SENSOR_TYPE in w and "roll this release back" in w for w in body["warnings"])
    assert "inject" in body["node_types"] and "tab" not in body["node_types"]

    # The same flows, indented differently: the same release, its first notes kept.
    again = client.post(
        "/api/v1/flows/releases",
        json={"flows_json": flows_json("a", SENSOR_TYPE, indent=4), "notes": "second"},
        headers=operator_headers,
    )
    assert again.status_code == 200, again.text
    assert again.json()["digest"] == body["digest"] and again.json()["created"] is False
    assert again.json()["notes"] == "first"

    short = body["digest"].removeprefix("sha256:")[:10]
    shown = client.get(f"/api/v1/flows/releases/{short}", headers=operator_headers)
    assert shown.status_code == 200 and shown.json()["digest"] == body["digest"]
    listed = client.get("/api/v1/flows/releases", headers=operator_headers).json()
    assert [r["digest"] for r in listed] == [body["digest"]]
    assert audit_actions(runtime, body["digest"]) == ["flows.release"]
    missing = client.get("/api/v1/flows/releases/abcdef0123", headers=operator_headers)
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("flows", "modules", "reason"),
    [
        ("[{]", [], "not valid JSON"),
        ('{"id": "x", "type": "tab"}', [], "JSON object"),
        ('[{"id": "a", "type": "tab"}, {"type": "inject"}]', [], "item 1 (type 'inject') has no"),
        ('[{"id": "a", "type": "tab"}, {"id": "a", "type": "tab"}]', [], "used by item 0"),
        ('[{"id": "n", "type": "inject", "z": "nowhere"}]', [], "no tab or subflow"),
        (flows_json("ok"), ["node-red-contrib-x"], "has no version"),
        (flows_json("ok"), ["node-red-contrib-x@^1.0"], "not an exact version"),
    ],
)
def test_a_bad_flows_file_is_refused_with_the_reason_and_nothing_is_stored(
    client: TestClient,
    operator_headers: dict[str, str],
    flows: str,
    modules: list[str],
    reason: str,
) -> None:
    response = client.post(
        "/api/v1/flows/releases",
        json={"flows_json": flows, "modules": modules},
        headers=operator_headers,
    )
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"]
    assert client.get("/api/v1/flows/releases", headers=operator_headers).json() == []


# ---- module cache ---------------------------------------------------------------------------


def test_module_cache_stores_a_tarball_once_verified_and_feeds_release_checks(
    client: TestClient, operator_headers: dict[str, str], runtime: GatewayRuntime
) -> None:
    data = module_tarball(SENSOR_MODULE, "1.2.3", SENSOR_TYPE)
    digest = hashlib.sha256(data).hexdigest()
    octets = {**operator_headers, "Content-Type": "application/octet-stream"}

    damaged = client.post(
        "/api/v1/flows/modules", content=data, params={"sha256": "0" * 64}, headers=octets
    )
    assert damaged.status_code == 422 and damaged.json()["reason"] == "sha256_mismatch"
    assert client.get("/api/v1/flows/modules", headers=operator_headers).json() == []

    added = client.post(
        "/api/v1/flows/modules", content=data, params={"sha256": digest}, headers=octets
    )
    assert added.status_code == 201, added.text
    assert added.json() == {
        "sha256": digest,
        "name": SENSOR_MODULE,
        "version": "1.2.3",
        "size": len(data),
        "node_types": [SENSOR_TYPE],
        "created": True,
    }
    again = client.post("/api/v1/flows/modules", content=data, headers=octets)
    assert again.status_code == 200 and again.json()["created"] is False
    other = module_tarball(SENSOR_MODULE, "1.2.3", SENSOR_TYPE, comment="changed")
    clash = client.post("/api/v1/flows/modules", content=other, headers=octets)
    assert clash.status_code == 409 and "immutable" in clash.json()["detail"]
    junk = client.post("/api/v1/flows/modules", content=b"not a tarball", headers=octets)
    assert junk.status_code == 422 and junk.json()["reason"] == "bad_tarball"
    assert audit_actions(runtime, f"{SENSOR_MODULE}@1.2.3") == ["flows.module.add"]

    # A release that uses the type without listing the module is told which module has it.
    unlisted = release(client, operator_headers, flows_json("b", SENSOR_TYPE))
    assert unlisted["unprovided_types"] == [SENSOR_TYPE]
    assert any(f"add --module {SENSOR_MODULE}@1.2.3" in w for w in unlisted["warnings"])
    listed = release(
        client, operator_headers, flows_json("c", SENSOR_TYPE), modules=[f"{SENSOR_MODULE}@1.2.3"]
    )
    assert listed["unprovided_types"] == [] and listed["warnings"] == []
    # A listed module the cache does not have is reported (machines could not install it).
    uncached = release(
        client, operator_headers, flows_json("d"), modules=["node-red-contrib-elsewhere@2.0.0"]
    )
    assert any("not in the gateway's module cache" in w for w in uncached["warnings"])


def test_module_upload_has_its_own_size_limit(
    client: TestClient, operator_headers: dict[str, str], runtime: GatewayRuntime
) -> None:
    limit = runtime.settings.max_module_bytes
    too_big = client.post(
        "/api/v1/flows/modules",
        content=b"\0" * (limit + 1),
        headers={**operator_headers, "Content-Type": "application/octet-stream"},
    )
    assert too_big.status_code == 413
    # Far above the general request limit, but under the module limit: it gets to the parser.
    bigger = client.post(
        "/api/v1/flows/modules",
        content=b"\0" * (runtime.settings.max_request_bytes * 4),
        headers={**operator_headers, "Content-Type": "application/octet-stream"},
    )
    assert bigger.status_code == 422 and bigger.json()["reason"] == "bad_tarball"


# ---- roles ----------------------------------------------------------------------------------


def test_a_viewer_can_look_but_not_release_push_cancel_or_add_modules(
    client: TestClient,
    operator_headers: dict[str, str],
    runtime: GatewayRuntime,
    fleet: Fleet,
    scheduler: RolloutScheduler,
) -> None:
    viewer = {"Authorization": f"Bearer {api_token(runtime, Role.viewer)}"}
    device = fleet.enroll(1)[0]
    made = release(client, operator_headers, flows_json("roles"))
    deployment = push(client, operator_headers, release=made["digest"], to={"all": True})

    for method, path, kwargs in [
        ("POST", "/api/v1/flows/releases", {"json": {"flows_json": flows_json("v")}}),
        ("POST", "/api/v1/deployments", {"json": {"release": made["digest"], "to": {"all": True}}}),
        ("POST", f"/api/v1/deployments/{deployment['id']}/cancel", {}),
        ("POST", "/api/v1/flows/modules", {"content": b"x"}),
    ]:
        refused = client.request(method, path, headers=viewer, **kwargs)
        assert refused.status_code == 403, (path, refused.text)
        assert "role operator or admin" in refused.json()["detail"]
    assert client.get("/api/v1/deployments", headers=viewer).status_code == 200
    assert show(client, viewer, deployment["id"])["state"] == "running"
    assert client.get("/api/v1/flows/releases", headers=viewer).status_code == 200
    # Agent routes take device JWTs, not operator tokens; and operator routes not device JWTs.
    bundle = client.get(f"/api/v1/agent/bundles/{made['digest']}", headers=operator_headers)
    assert bundle.status_code == 401
    as_device = client.get("/api/v1/deployments", headers=fleet.device_headers(device))
    assert as_device.status_code == 401


# ---- planning -------------------------------------------------------------------------------


def test_targets_and_waves_are_planned_and_bad_plans_refused(
    client: TestClient, operator_headers: dict[str, str], fleet: Fleet, runtime: GatewayRuntime
) -> None:
    line_a = fleet.enroll(5, {"site": "plant-3", "line": "A"})
    line_b = fleet.enroll(2, {"site": "plant-3", "line": "B"})
    made = release(client, operator_headers, flows_json("plan"))

    by_tags = push(
        client,
        operator_headers,
        release=made["digest"][:20],
        to={"tags": {"site": "plant-3", "line": "A"}},
        canary="1",
        wave="40%",
    )
    assert by_tags["device_count"] == 5 and by_tags["target_text"] == "line=A,site=plant-3"
    assert [d["device_id"] for d in by_tags["devices"]] == line_a  # enrollment order
    assert [d["wave"] for d in by_tags["devices"]] == [0, 1, 1, 2, 2]
    assert (by_tags["canary_size"], by_tags["wave_size"], by_tags["wave_count"]) == (1, 2, 3)
    assert by_tags["counts"] == {"pending": 5} and by_tags["min_finished"] == 1
    assert audit_actions(runtime, by_tags["id"]) == ["flows.deploy"]

    by_ids = push(client, operator_headers, release=made["digest"], to={"devices": line_b})
    assert by_ids["wave_count"] == 1 and by_ids["device_count"] == 2
    everyone = push(client, operator_headers, release=made["digest"], to={"all": True}, wave="3")
    assert everyone["device_count"] == 7 and everyone["wave_count"] == 3

    for body, status, text in [
        ({"to": {"devices": ["dev-nosuchthing"]}}, 422, "no active device dev-nosuchthing"),
        ({"to": {"tags": {"site": "plant-9"}}}, 422, "no active device matches"),
        ({"to": {"all": True, "tags": {"a": "b"}}}, 422, "exactly one"),
        ({"to": {"all": True}, "canary": "half"}, 422, "canary"),
        ({"to": {"all": True}, "wave": "150%"}, 422, "more than 100%"),
        ({"to": {"all": True}, "max_failures": "10"}, 422, "max_failures"),
        ({"to": {"all": True}, "timeout_seconds": 0}, 422, "timeout_seconds"),
        ({"to": {"all": True}, "release": "sha256:" + "0" * 64}, 404, "no release"),
    ]:
        answer = client.post(
            "/api/v1/deployments",
            json={"release": made["digest"], **body},
            headers=operator_headers,
        )
        assert answer.status_code == status, (body, answer.text)
        assert text in answer.text, (body, answer.text)
    assert len(client.get("/api/v1/deployments", headers=operator_headers).json()) == 3


# ---- the scheduler --------------------------------------------------------------------------


def test_waves_go_out_one_after_another_and_the_deployment_succeeds(
    client: TestClient,
    operator_headers: dict[str, str],
    fleet: Fleet,
    scheduler: RolloutScheduler,
    runtime: GatewayRuntime,
) -> None:
    devices = fleet.enroll(4)
    octets = {**operator_headers, "Content-Type": "application/octet-stream"}
    tarball = module_tarball(SENSOR_MODULE, "1.0.0", SENSOR_TYPE)
    client.post("/api/v1/flows/modules", content=tarball, headers=octets)
    made = release(
        client,
        operator_headers,
        flows_json("waves", SENSOR_TYPE),
        modules=[f"{SENSOR_MODULE}@1.0.0", "node-red-contrib-uncached@1.0.0"],
    )
    deployment = push(
        client, operator_headers, release=made["digest"], to={"all": True}, canary="1", wave="2"
    )

    assert scheduler.tick().sent == devices[:1]
    assert scheduler.tick().sent == []  # the canary has not finished
    [command] = deploy_commands(runtime)
    assert command.device_id == devices[0] and command.ref == deployment["id"]
    args = DeployArgs.model_validate(command.args)
    assert args.deployment_id == deployment["id"] and args.release == made["digest"]
    assert args.force is False
    # Only cached modules carry a hash; the agent can install nothing else from the gateway.
    assert args.modules == {f"{SENSOR_MODULE}@1.0.0": hashlib.sha256(tarball).hexdigest()}
    assert (command.expires_at - command.created_at) == timedelta(seconds=600)

    state = show(client, operator_headers, deployment["id"])
    canary = device_record(state, devices[0])
    assert canary["state"] == "sent" and canary["command_id"] == command.id
    assert state["waves_started"] == 1

    fleet.reply(devices[0], command.id, "downloading")
    assert device_record(show(client, operator_headers, deployment["id"]), devices[0])["state"] == (
        "downloading"
    )
    fleet.reply(devices[0], command.id, "succeeded", rev="r1")
    fleet.reply(devices[0], command.id, "applying")  # late progress never undoes a result
    done = device_record(show(client, operator_headers, deployment["id"]), devices[0])
    assert done["state"] == "succeeded" and done["rev"] == "r1" and done["seconds"] is not None

    assert sorted(scheduler.tick().sent) == sorted(devices[1:3])
    state = show(client, operator_headers, deployment["id"])
    for device in devices[1:3]:
        fleet.finish(state, device)
    assert scheduler.tick().sent == devices[3:]
    fleet.finish(show(client, operator_headers, deployment["id"]), devices[3])
    assert scheduler.tick().finished == {deployment["id"]: "succeeded"}

    final = show(client, operator_headers, deployment["id"])
    assert final["state"] == "succeeded" and final["counts"] == {"succeeded": 4}
    assert final["finished_at"] is not None and final["waves_started"] == 3
    for device in devices:  # one command per device, ever
        assert len(deploy_commands(runtime, device)) == 1
    assert scheduler.tick().sent == []


def test_a_wave_waits_while_the_broker_is_away_and_goes_out_when_it_is_back(
    client: TestClient,
    operator_headers: dict[str, str],
    fleet: Fleet,
    scheduler: RolloutScheduler,
    runtime: GatewayRuntime,
    publisher: CommandPublisher,
    broker: MosquittoSupervisor,
) -> None:
    devices = fleet.enroll(3)
    made = release(client, operator_headers, flows_json("broker-away"))
    deployment = push(client, operator_headers, release=made["digest"], to={"all": True})
    away = CommandPublisher(broker.endpoint, runtime.topics, timeout=0.2)  # never connected
    runtime.publisher = away
    assert scheduler.tick().sent == []
    state = show(client, operator_headers, deployment["id"])
    assert state["counts"] == {"pending": 3}  # the claims were undone: nothing was published
    assert {c.state for c in deploy_commands(runtime)} == {"queued"}  # recorded, never sent

    runtime.publisher = publisher
    assert sorted(scheduler.tick().sent) == sorted(devices)
    state = show(client, operator_headers, deployment["id"])
    assert state["counts"] == {"sent": 3}
    for device in devices:
        sent = [c for c in deploy_commands(runtime, device) if c.state == "sent"]
        assert [c.id for c in sent] == [device_record(state, device)["command_id"]]
        fleet.finish(state, device)
    assert scheduler.tick().finished == {deployment["id"]: "succeeded"}


def test_a_canary_failure_stops_the_rollout_and_later_waves_never_get_a_command(
    client: TestClient,
    operator_headers: dict[str, str],
    fleet: Fleet,
    scheduler: RolloutScheduler,
    runtime: GatewayRuntime,
) -> None:
    devices = fleet.enroll(3)
    made = release(client, operator_headers, flows_json("bad", "acme-missing"))
    deployment = push(
        client, operator_headers, release=made["digest"], to={"all": True}, canary="1", wave="1"
    )
    scheduler.tick()
    state = show(client, operator_headers, deployment["id"])
    fleet.finish(state, devices[0], "rolled_back")

    report = scheduler.tick()
    assert report.finished == {deployment["id"]: "aborted"} and report.sent == []
    final = show(client, operator_headers, deployment["id"])
    assert final["state"] == "aborted"
    assert "1 of 1 finished devices did not succeed" in final["reason"]
    assert "2 device(s) of later waves were not sent" in final["reason"]
    assert device_record(final, devices[0])["error"] == "the rolled_back reason"
    for device in devices[1:]:
        record = device_record(final, device)
        assert record["state"] == "pending" and record["command_id"] is None
    scheduler.tick()
    assert [c.device_id for c in deploy_commands(runtime)] == devices[:1]


def test_failures_under_the_threshold_let_the_rollout_finish_as_partial(
    client: TestClient,
    operator_headers: dict[str, str],
    fleet: Fleet,
    scheduler: RolloutScheduler,
) -> None:
    devices = fleet.enroll(4)
    made = release(client, operator_headers, flows_json("partial"))
    deployment = push(
        client,
        operator_headers,
        release=made["digest"],
        to={"all": True},
        max_failures="30%",
        min_finished=4,
    )
    assert len(scheduler.tick().sent) == 4
    state = show(client, operator_headers, deployment["id"])
    for device in devices[:3]:
        fleet.finish(state, device)
    fleet.finish(state, devices[3], "drift")
    assert scheduler.tick().finished == {deployment["id"]: "partial"}
    final = show(client, operator_headers, deployment["id"])
    assert final["counts"] == {"succeeded": 3, "drift": 1}
    assert "1 of 4 devices did not succeed" in final["reason"]


def test_a_device_that_does_not_finish_in_time_counts_as_failed(
    client: TestClient,
    operator_headers: dict[str, str],
    fleet: Fleet,
    scheduler: RolloutScheduler,
) -> None:
    devices = fleet.enroll(2)
    made = release(client, operator_headers, flows_json("slow"))
    deployment = push(
        client,
        operator_headers,
        release=made["digest"],
        to={"all": True},
        timeout_seconds=60,
        max_failures="50%",
    )
    scheduler.tick()
    state = show(client, operator_headers, deployment["id"])
    fleet.finish(state, devices[0])
    fleet.reply(devices[1], device_record(state, devices[1])["command_id"], "applying")

    assert scheduler.tick(utcnow() + timedelta(seconds=30)).timed_out == []
    report = scheduler.tick(utcnow() + timedelta(seconds=61))
    assert report.timed_out == [devices[1]]
    late = device_record(show(client, operator_headers, deployment["id"]), devices[1])
    assert late["state"] == "failed"
    assert (
        late["error"]
        == "timed out: no result 60s after the command was sent (last state: applying)"
    )
    assert show(client, operator_headers, deployment["id"])["state"] == "partial"

    # The machine's own result, arriving after all, is what the record shows.
    fleet.reply(devices[1], late["command_id"], "succeeded", rev="r9")
    truth = device_record(show(client, operator_headers, deployment["id"]), devices[1])
    assert truth["state"] == "succeeded" and truth["rev"] == "r9"
    assert truth["error"] == "reported after the gateway had marked it failed"


def test_cancel_stops_waves_and_refuses_the_bundle_to_devices_not_started(
    client: TestClient,
    operator_headers: dict[str, str],
    fleet: Fleet,
    scheduler: RolloutScheduler,
    runtime: GatewayRuntime,
) -> None:
    devices = fleet.enroll(3)
    made = release(client, operator_headers, flows_json("cancel"))
    deployment = push(
        client, operator_headers, release=made["digest"], to={"all": True}, canary="2"
    )
    scheduler.tick()
    state = show(client, operator_headers, deployment["id"])
    fleet.reply(devices[0], device_record(state, devices[0])["command_id"], "applying")

    cancelled = client.post(
        f"/api/v1/deployments/{deployment['id']}/cancel", headers=operator_headers
    )
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["state"] == "cancelled" and body["reason"].startswith("cancelled by operator-")
    assert [d["state"] for d in body["devices"]] == ["applying", "cancelled", "cancelled"]
    assert audit_actions(runtime, deployment["id"]) == ["flows.deploy", "flows.cancel"]
    again = client.post(f"/api/v1/deployments/{deployment['id']}/cancel", headers=operator_headers)
    assert again.status_code == 409

    assert scheduler.tick().sent == []
    assert len(deploy_commands(runtime)) == 2  # the third device never gets one
    # Device 2 got its command before the cancel (it was offline): the gateway refuses it the
    # bundle, so a late delivery applies nothing.
    url = f"/api/v1/agent/bundles/{made['digest']}"
    gone = client.get(
        url, params={"deployment": deployment["id"]}, headers=fleet.device_headers(devices[1])
    )
    assert gone.status_code == 410 and gone.json()["reason"] == "deployment_cancelled"
    # The device that was applying finishes and says so.
    fleet.reply(devices[0], device_record(body, devices[0])["command_id"], "succeeded")
    final = show(client, operator_headers, deployment["id"])
    assert final["state"] == "cancelled" and final["counts"] == {"succeeded": 1, "cancelled": 2}


# ---- what agents may fetch ------------------------------------------------------------------


def test_agents_fetch_bundles_and_modules_only_for_their_own_deployments(
    client: TestClient,
    operator_headers: dict[str, str],
    fleet: Fleet,
    scheduler: RolloutScheduler,
) -> None:
    targeted, bystander = fleet.enroll(2)
    tarball = module_tarball(SENSOR_MODULE, "1.0.0", SENSOR_TYPE)
    sha = hashlib.sha256(tarball).hexdigest()
    client.post(
        "/api/v1/flows/modules",
        content=tarball,
        headers={**operator_headers, "Content-Type": "application/octet-stream"},
    )
    made = release(
        client,
        operator_headers,
        flows_json("fetch", SENSOR_TYPE),
        modules=[f"{SENSOR_MODULE}@1.0.0"],
    )
    deployment = push(client, operator_headers, release=made["digest"], to={"devices": [targeted]})
    scheduler.tick()
    url = f"/api/v1/agent/bundles/{made['digest']}"

    got = client.get(
        url, params={"deployment": deployment["id"]}, headers=fleet.device_headers(targeted)
    )
    assert got.status_code == 200, got.text
    assert "sha256:" + hashlib.sha256(got.content).hexdigest() == made["digest"]
    assert Bundle.from_bytes(got.content, expected_digest=made["digest"]).modules[0].version == (
        "1.0.0"
    )
    module = client.get(f"/api/v1/agent/modules/{sha}", headers=fleet.device_headers(targeted))
    assert module.status_code == 200 and module.content == tarball

    for path in (url, f"/api/v1/agent/modules/{sha}"):
        refused = client.get(path, headers=fleet.device_headers(bystander))
        assert refused.status_code == 403 and refused.json()["reason"] == "not_targeted"
    # A device JWT is good once: a replayed one is refused.
    headers = fleet.device_headers(targeted)
    assert client.get(url, headers=headers).status_code == 200
    assert client.get(url, headers=headers).status_code == 401
    # After the device's deadline the bundle is no longer handed out for that deployment.
    with Session(fleet.runtime.engine) as session:
        from gateway.flows.models import DeploymentDevice

        row = session.get(DeploymentDevice, (deployment["id"], targeted))
        assert row is not None
        row.deadline_at = utcnow() - timedelta(seconds=1)
        session.add(row)
        session.commit()
    late = client.get(
        url, params={"deployment": deployment["id"]}, headers=fleet.device_headers(targeted)
    )
    assert late.status_code == 410 and late.json()["reason"] == "deployment_timed_out"


# ---- several replicas -----------------------------------------------------------------------


def test_two_replicas_on_one_database_send_each_device_its_command_exactly_once(
    client: TestClient,
    operator_headers: dict[str, str],
    fleet: Fleet,
    runtime: GatewayRuntime,
    publisher: CommandPublisher,
    broker: MosquittoSupervisor,
    db_url: str,
) -> None:
    """Two gateways' schedulers on one database, ticking as fast as they can. With PostgreSQL
    one holds the advisory lock; with SQLite both run (one replica is the rule there, but the
    conditional claim alone must already prevent a double send). Each device counts the
    commands the broker delivers to it."""
    install_flow_pushes(runtime, contextlib.ExitStack())  # the reply hook
    devices = fleet.enroll(6)
    probes = []
    for device in devices:
        enrollment = fleet.enrollments[device]
        probe = MqttProbe(device_endpoint(broker, device, enrollment.broker.password), device)
        assert not probe.connect().is_failure
        assert not probe.subscribe(f"fleet/{device}/cmd").is_failure
        probes.append(probe)
    engines = [make_engine(runtime.settings.database_url) for _ in range(2)]
    identity = GatewayIdentity.load_or_create(runtime.settings.signing_key_path)
    replicas: list[SingletonJobs] = []
    started: list[SingletonJobs] = []
    for engine in engines:
        jobs = SingletonJobs(LeaderElection(engine, retry=0.05), tick=0.01)
        jobs.add("rollouts", 0.0, RolloutScheduler(engine, identity, lambda: publisher).run)
        replicas.append(jobs)
    try:
        made = release(client, operator_headers, flows_json("replicas"))
        deployment = push(
            client, operator_headers, release=made["digest"], to={"all": True}, canary="3"
        )
        for jobs in replicas:
            jobs.start()
            started.append(jobs)

        def sent_in_wave(count: int) -> Any:
            state = show(client, operator_headers, deployment["id"])
            done = [d for d in state["devices"] if d["command_id"]]
            return state if len(done) == count else None

        state = wait_for(lambda: sent_in_wave(3), timeout=10, what="the canary wave sent")
        if db_url.startswith("postgresql"):
            leaders = [jobs.is_leader for jobs in replicas]
            assert sorted(leaders) == [False, True], leaders
            # The leader goes away; the other replica takes over the rest of the rollout.
            replicas[leaders.index(True)].stop()
        for device in devices[:3]:
            fleet.finish(state, device)
        state = wait_for(lambda: sent_in_wave(6), timeout=10, what="the second wave sent")
        for device in devices[3:]:
            fleet.finish(state, device)
        wait_for(
            lambda: show(client, operator_headers, deployment["id"])["state"] == "succeeded",
            timeout=10,
            what="the deployment to succeed",
        )
        for device, probe in zip(devices, probes, strict=True):
            assert len(deploy_commands(runtime, device)) == 1
            assert len(probe.received(f"fleet/{device}/cmd")) == 1, device
    finally:
        for jobs in started:
            jobs.stop()  # a second stop of the one stopped above does nothing
        for probe in probes:
            probe.close()
        for engine in engines:
            engine.dispose()


def test_the_openapi_document_describes_uploads_and_agent_downloads(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    upload = paths["/api/v1/flows/modules"]["post"]["requestBody"]["content"]
    assert list(upload) == ["application/octet-stream"]
    bundle = paths["/api/v1/agent/bundles/{digest}"]["get"]["responses"]["200"]["content"]
    assert "application/json" in bundle
    module = paths["/api/v1/agent/modules/{sha256}"]["get"]["responses"]["200"]["content"]
    assert "application/gzip" in module
    for path in ("/api/v1/deployments", "/api/v1/deployments/{deployment_id}/cancel"):
        assert path in paths

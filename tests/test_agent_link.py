"""A real `edgefleet agent run` against the real broker: status, Last Will, signed commands.

The agent is a subprocess (so it can be killed like a machine losing power); the gateway side is
the in-process registry with its real `StatusListener`, and a gateway-identity MQTT client that
publishes commands signed with the gateway's key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from edge_agent.state import AgentState
from gateway.broker.dynsec import DynsecAdmin
from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.commands.publisher import CommandPublisher
from gateway.commands.replies import ReplyListener
from gateway.registry.models import Device
from gateway.registry.status_listener import StatusListener
from gateway.runtime import GatewayRuntime
from provisioning import keys
from provisioning.jwt_rules import sign_command
from provisioning.wire import EnrollResponse, Reply
from tests.support.mosquitto import MqttProbe, enroll_device
from tests.support.waiting import wait_for


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """These tests are about the MQTT link; SQLite is enough for the registry behind it."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


class RunningAgent:
    def __init__(self, state_dir: Path, device_id: str) -> None:
        self.state_dir = state_dir
        self.device_id = device_id
        self.log_path = state_dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgefleet.cli",
                "agent",
                "run",
                "--state-dir",
                str(self.state_dir),
                "--node-red",
                "http://127.0.0.1:9",
                "--log-level",
                "debug",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def agent(
    client: TestClient, admin_headers: dict[str, str], tmp_path: Path
) -> Iterator[RunningAgent]:
    token = client.post(
        "/api/v1/provisioning-tokens", json={"uses": 1}, headers=admin_headers
    ).json()["token"]
    key = keys.generate_private_key()
    response = client.post(
        "/api/v1/enroll",
        json={"token": token, "public_key": keys.public_key_pem(key.public_key()), "name": "m1"},
    )
    assert response.status_code == 201, response.text
    enrollment = EnrollResponse.model_validate(response.json())
    state = AgentState(tmp_path / "agent")
    state.directory.mkdir()
    keys.write_private_key(state.key_path, key)
    state.save("http://127.0.0.1:9", enrollment)
    running = RunningAgent(state.directory, enrollment.device_id)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def listener(runtime: GatewayRuntime, broker: MosquittoSupervisor) -> Iterator[StatusListener]:
    status = StatusListener(broker.endpoint, runtime.engine, runtime.topics)
    status.start()
    yield status
    status.stop()


@pytest.fixture
def gateway_mqtt(broker: MosquittoSupervisor) -> Iterator[MqttProbe]:
    probe = MqttProbe(broker.endpoint, f"test-gw-{os.getpid()}")
    assert not probe.connect().is_failure
    yield probe
    probe.close()


def _online(runtime: GatewayRuntime, device_id: str) -> bool:
    with Session(runtime.engine) as session:
        device = session.get(Device, device_id)
        return bool(device and device.online)


def test_agent_goes_online_and_its_last_will_marks_it_offline(
    agent: RunningAgent, listener: StatusListener, runtime: GatewayRuntime
) -> None:
    wait_for(lambda: _online(runtime, agent.device_id), timeout=10, what="the agent online")
    with Session(runtime.engine) as session:
        device = session.get(Device, agent.device_id)
        assert device is not None and device.last_seen is not None
        assert device.agent_version
    agent.stop(signal.SIGKILL)  # power loss: no goodbye, the broker sends the Last Will
    wait_for(
        lambda: not _online(runtime, agent.device_id), timeout=90, what="the Last Will (offline)"
    )


def test_status_retained_while_the_gateway_was_away_is_read_at_start(
    agent: RunningAgent, runtime: GatewayRuntime, broker: MosquittoSupervisor
) -> None:
    """No listener while the agent comes online; one started later still learns it is online."""
    probe = MqttProbe(broker.endpoint, "retained-check")
    try:
        probe.connect()
        probe.subscribe(f"fleet/{agent.device_id}/status")
        wait_for(
            lambda: probe.received(f"fleet/{agent.device_id}/status"),
            timeout=10,
            what="the agent's status on the broker",
        )
    finally:
        probe.close()
    assert not _online(runtime, agent.device_id)
    late = StatusListener(broker.endpoint, runtime.engine, runtime.topics)
    late.start()
    try:
        wait_for(lambda: _online(runtime, agent.device_id), timeout=10, what="retained status")
    finally:
        late.stop()


def _replies(probe: MqttProbe, device_id: str) -> list[dict[str, Any]]:
    return [json.loads(p) for p in probe.received(f"fleet/{device_id}/reply")]


def test_agent_runs_signed_commands_once_and_refuses_the_rest(
    agent: RunningAgent, runtime: GatewayRuntime, gateway_mqtt: MqttProbe
) -> None:
    device_id = agent.device_id
    # The gateway identity reads replies only through a shared subscription (as replicas do).
    assert not gateway_mqtt.subscribe("$share/test/fleet/+/reply").is_failure
    wait_for(lambda: "connected to the broker" in agent.log(), timeout=10, what="agent connect")

    def send(token: str) -> None:
        assert not gateway_mqtt.publish(f"fleet/{device_id}/cmd", token).is_failure

    cid, good = sign_command(
        runtime.identity.private_key,
        gateway_id=runtime.identity.gateway_id,
        device_id=device_id,
        kind="ping",
        args={"n": 7},
        lifetime=60,
    )
    send(good)
    done = wait_for(
        lambda: [
            r
            for r in _replies(gateway_mqtt, device_id)
            if r["command_id"] == cid and r["state"] == "succeeded"
        ],
        timeout=10,
        what="the ping result",
    )
    assert done[0]["data"]["echo"] == {"n": 7}

    send(good)  # the same command again: reported again, not run again
    wait_for(lambda: "seen before" in agent.log(), timeout=10, what="the repeat noticed")

    forged_key = keys.generate_private_key()
    _, forged = sign_command(
        forged_key,
        gateway_id=runtime.identity.gateway_id,
        device_id=device_id,
        kind="ping",
        args={},
        lifetime=60,
    )
    _, other = sign_command(
        runtime.identity.private_key,
        gateway_id=runtime.identity.gateway_id,
        device_id="dev-someoneelse",
        kind="ping",
        args={},
        lifetime=60,
    )
    _, expired = sign_command(
        runtime.identity.private_key,
        gateway_id=runtime.identity.gateway_id,
        device_id=device_id,
        kind="ping",
        args={},
        lifetime=60,
        now=0,
    )
    for token in (forged, other, expired, "not a jws"):
        send(token)
    refusals = wait_for(
        lambda: (
            [r for r in _replies(gateway_mqtt, device_id) if r["state"] == "refused"]
            if len([r for r in _replies(gateway_mqtt, device_id) if r["state"] == "refused"]) >= 4
            else None
        ),
        timeout=10,
        what="four refusals",
    )
    reasons = sorted(r["detail"].split(":")[0] for r in refusals)
    assert reasons == ["bad_signature", "expired", "malformed", "wrong_audience"]
    succeeded = [r for r in _replies(gateway_mqtt, device_id) if r["state"] == "succeeded"]
    assert {r["command_id"] for r in succeeded} == {cid}


@pytest.fixture
def replies(runtime: GatewayRuntime, broker: MosquittoSupervisor) -> Iterator[ReplyListener]:
    """The gateway's real command publisher (on the runtime) and reply listener, running."""
    publisher = CommandPublisher(broker.endpoint, runtime.topics)
    publisher.start()
    listener = ReplyListener(broker.endpoint, runtime.engine, runtime.topics, runtime.hooks)
    listener.start()
    runtime.publisher = publisher
    yield listener
    listener.stop()
    publisher.stop()


def test_ping_through_the_api_is_answered_and_recorded(
    agent: RunningAgent,
    replies: ReplyListener,
    client: TestClient,
    admin_headers: dict[str, str],
) -> None:
    wait_for(lambda: "connected to the broker" in agent.log(), timeout=10, what="agent connect")
    sent = client.post(f"/api/v1/devices/{agent.device_id}/ping", headers=admin_headers)
    assert sent.status_code == 202, sent.text
    command_id = sent.json()["id"]
    answered = wait_for(
        lambda: (
            c
            if (c := client.get(f"/api/v1/commands/{command_id}", headers=admin_headers).json())[
                "state"
            ]
            == "succeeded"
            else None
        ),
        timeout=10,
        what="the ping recorded as succeeded",
    )
    assert answered["detail"] == "pong"
    assert answered["device_id"] == agent.device_id


def test_a_device_cannot_answer_for_another_devices_command(
    agent: RunningAgent,
    replies: ReplyListener,
    client: TestClient,
    admin_headers: dict[str, str],
    broker: MosquittoSupervisor,
) -> None:
    """Device B replies 'succeeded' about A's command on its own reply topic (the only one the
    broker lets it use): the gateway ignores it, because identity comes from the topic."""
    agent.stop()  # A is offline, so only B's forged reply could complete the command
    sent = client.post(f"/api/v1/devices/{agent.device_id}/ping", headers=admin_headers).json()
    intruder = enroll_device(broker, "dev-intruder01")
    probe = MqttProbe(intruder, "dev-intruder01")
    before = replies.processed
    try:
        assert not probe.connect().is_failure
        forged = Reply(command_id=sent["id"], state="succeeded", detail="pong")
        refused = probe.publish(f"fleet/{agent.device_id}/reply", forged.model_dump_json())
        assert refused.is_failure  # the broker does not let B use A's topic at all
        assert not probe.publish("fleet/dev-intruder01/reply", forged.model_dump_json()).is_failure
    finally:
        probe.close()
        with DynsecAdmin(broker.endpoint) as admin:
            admin.remove_device("dev-intruder01")
    wait_for(lambda: replies.processed > before, timeout=10, what="the forged reply handled")
    shown = client.get(f"/api/v1/commands/{sent['id']}", headers=admin_headers).json()
    assert shown["state"] == "sent"

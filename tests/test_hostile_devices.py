"""What an enrolled machine sends cannot crash, corrupt or flood the gateway, nor reach an
operator's terminal raw: the reproductions of issue 12 against a real `edgefleet gateway run`
(SQLite, its supervised Mosquitto), with a device enrolled through the API that then publishes
by hand on its own topics with its own broker credential, as a broken or hostile agent could.
"""

from __future__ import annotations

import json
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx
import jwt
import paho.mqtt.client as mqtt
import pytest

from provisioning import keys
from provisioning.mqtt import MqttEndpoint
from tests.support import local_http
from tests.support.gateway_process import GatewayProcess, wait_until
from tests.support.mosquitto import MqttProbe
from tests.support.waiting import wait_for

MARKER = "PAYLOAD-MARKER-7f3a"  # put in bad payloads; must never appear in the gateway's log


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with GatewayProcess(tmp_path_factory.mktemp("hostile") / "data") as gateway:
        yield gateway


class Device:
    """An enrolled device and an MQTT client with its credential."""

    def __init__(self, gw: GatewayProcess, name: str) -> None:
        self.gw = gw
        token = gw.create_provisioning_token()["token"]
        key = keys.generate_private_key()
        enrolled = local_http.post(
            gw.url + "/api/v1/enroll",
            json={
                "token": token,
                "public_key": keys.public_key_pem(key.public_key()),
                "name": name,
            },
        )
        assert enrolled.status_code == 201, enrolled.text
        body = enrolled.json()
        self.id: str = body["device_id"]
        broker = body["broker"]
        ca = gw.data_dir.parent / f"{self.id}-ca.pem"
        ca.write_text(broker["ca_cert"])
        self.endpoint = MqttEndpoint(
            "127.0.0.1", broker["port"], True, broker["username"], broker["password"], ca
        )
        self.probe = MqttProbe(self.endpoint, self.id)
        assert not self.probe.connect().is_failure

    def reconnect(self) -> None:
        self.probe.close()
        self.probe = MqttProbe(self.endpoint, self.id)
        assert not self.probe.connect().is_failure

    def topic(self, leaf: str) -> str:
        return f"fleet/{self.id}/{leaf}"

    def close(self) -> None:
        self.probe.close()


@pytest.fixture
def device(gw: GatewayProcess) -> Iterator[Device]:
    made = Device(gw, f"m-{uuid.uuid4().hex[:6]}")
    yield made
    made.close()


def _metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    text = local_http.get(gw.url + "/metrics", timeout=5).text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def _refused(gw: GatewayProcess, kind: str, reason: str) -> float:
    return _metric(gw, "edgefleet_device_messages_refused_total", kind=kind, reason=reason)


def _device_row(gw: GatewayProcess, device_id: str) -> dict[str, Any]:
    shown = gw.cli_json("devices", "show", device_id)
    assert isinstance(shown, dict)
    return shown


def test_the_data_dir_is_private_database_files_included(gw: GatewayProcess) -> None:
    assert stat.S_IMODE(gw.data_dir.stat().st_mode) == 0o700
    names = {p.name for p in gw.data_dir.iterdir()}
    assert {"edgefleet.db", "edgefleet.db-wal", "edgefleet.db-shm"} <= names
    for path in [gw.data_dir, *gw.data_dir.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


def test_qos0_telemetry_does_not_knock_the_ingest_off_the_broker(
    gw: GatewayProcess, device: Device
) -> None:
    now = time.time()
    for seq in range(1, 21):  # what `mosquitto_pub -q 0` does, twenty times
        payload = json.dumps({"v": 1, "seq": seq, "samples": [{"m": "q0", "t": now, "v": seq}]})
        info = device.probe.client.publish(device.topic("telemetry"), payload, qos=0)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS
    headers = {"Authorization": f"Bearer {gw.admin_token}"}
    url = f"{gw.url}/api/v1/devices/{device.id}/telemetry/q0"
    wait_until(
        lambda: (
            sum(b["count"] for b in local_http.get(url, headers=headers).json()["buckets"]) == 20
        ),
        "the twenty QoS 0 samples stored",
        gw,
    )
    assert "telemetry ingest disconnected" not in gw.log_text()
    assert _metric(gw, "edgefleet_telemetry_connected") == 1.0


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ({"state": "online", "agent_version": "\u001b[2J\u001b[31mPWNED"}, "schema"),
        ({"state": "online", "node_red_version": "4.0\u202e1"}, "schema"),
        ({"state": "online", "agent_version": "v" * 65}, "schema"),
        ({"state": "owned"}, "schema"),
        ({"state": "online", "outbox_queued": -1}, "schema"),
        ({"state": "online", "agent_version": "9" * 200_000}, "oversized"),
    ],
)
def test_a_status_with_bad_fields_is_refused_and_changes_nothing(
    gw: GatewayProcess, device: Device, status: dict[str, Any], reason: str
) -> None:
    good = {"state": "online", "agent_version": "1.2.3", "node_red_version": "4.1.15"}
    device.probe.publish(device.topic("status"), json.dumps(good), retain=True)
    wait_until(lambda: _device_row(gw, device.id)["agent_version"] == "1.2.3", "status", gw)
    before = _refused(gw, "status", reason)
    device.probe.publish(device.topic("status"), json.dumps(status), retain=True)
    wait_until(lambda: _refused(gw, "status", reason) == before + 1, "refusal counted", gw)
    row = _device_row(gw, device.id)
    assert (row["agent_version"], row["node_red_version"]) == ("1.2.3", "4.1.15")


def test_a_publish_over_the_broker_limit_never_reaches_the_gateway(
    gw: GatewayProcess, device: Device
) -> None:
    received = _metric(gw, "edgefleet_telemetry_messages_received_total")
    before = len(device.probe.disconnects)
    device.probe.client.publish(device.topic("telemetry"), b"x" * (1024 * 1024), qos=1)
    wait_for(lambda: len(device.probe.disconnects) > before, 10, what="broker disconnects it")
    config = gw.mosquitto_config.read_text()
    assert "max_packet_size 278528" in config
    assert _metric(gw, "edgefleet_telemetry_messages_received_total") == received
    device.reconnect()  # a new client: paho would send the refused message again
    now = time.time()
    small = {"v": 1, "seq": 1, "samples": [{"m": "after", "t": now, "v": 1.0}]}
    device.probe.publish(device.topic("telemetry"), json.dumps(small))
    wait_until(
        lambda: _metric(gw, "edgefleet_telemetry_messages_received_total") == received + 1,
        "the next message in size",
        gw,
    )


def _ping(gw: GatewayProcess, device: Device) -> str:
    """A ping command for the device (the device does not answer by itself); its id."""
    headers = {"Authorization": f"Bearer {gw.admin_token}"}
    device.probe.subscribe(device.topic("cmd"))
    sent = local_http.post(f"{gw.url}/api/v1/devices/{device.id}/ping", headers=headers)
    assert sent.status_code == 202, sent.text
    return str(sent.json()["id"])


def _command(gw: GatewayProcess, command_id: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {gw.admin_token}"}
    found: dict[str, Any] = local_http.get(
        f"{gw.url}/api/v1/commands/{command_id}", headers=headers
    ).json()
    return found


def test_a_reply_in_a_state_no_agent_reports_or_too_large_is_refused(
    gw: GatewayProcess, device: Device
) -> None:
    command_id = _ping(gw, device)
    before = _refused(gw, "reply", "schema")
    device.probe.publish(
        device.topic("reply"), json.dumps({"command_id": command_id, "state": "owned"})
    )
    wait_until(lambda: _refused(gw, "reply", "schema") == before + 1, "refusal counted", gw)
    oversized = _refused(gw, "reply", "oversized")
    huge = {"command_id": command_id, "state": "failed", "data": {"junk": "j" * 200_000}}
    device.probe.publish(device.topic("reply"), json.dumps(huge))
    wait_until(lambda: _refused(gw, "reply", "oversized") == oversized + 1, "oversized", gw)
    assert _command(gw, command_id)["state"] == "sent"
    # A 16 MB reply does not even reach the gateway: the broker drops the device.
    drops = len(device.probe.disconnects)
    device.probe.client.publish(device.topic("reply"), b"{" + b" " * (16 << 20) + b"}", qos=1)
    wait_for(lambda: len(device.probe.disconnects) > drops, 15, what="broker disconnects it")
    device.reconnect()  # a new client: paho would send the refused message again
    device.probe.publish(
        device.topic("reply"), json.dumps({"command_id": command_id, "state": "succeeded"})
    )
    wait_until(lambda: _command(gw, command_id)["state"] == "succeeded", "a good reply", gw)


def test_thousands_of_bad_messages_make_a_few_log_lines_without_their_payload(
    gw: GatewayProcess, device: Device
) -> None:
    lines_before = len(gw.log_text().splitlines())
    malformed = f'{{"{MARKER}": '.encode()
    wrong = json.dumps({"command_id": MARKER, "state": MARKER}).encode()
    before = _refused(gw, "reply", "malformed_json") + _refused(gw, "status", "schema")
    for n in range(1000):  # 4,000 messages: malformed and wrong replies and statuses
        client = device.probe.client
        client.publish(device.topic("reply"), malformed, qos=1)
        client.publish(device.topic("reply"), wrong, qos=1)
        client.publish(device.topic("status"), malformed, qos=1)
        last = client.publish(device.topic("status"), wrong, qos=1)
        if n % 100 == 99:
            last.wait_for_publish(10)
    wait_until(
        lambda: (
            _refused(gw, "reply", "malformed_json") + _refused(gw, "status", "schema")
            >= before + 2000
        ),
        "every bad message counted",
        gw,
        timeout=60,
    )
    new = gw.log_text().splitlines()[lines_before:]
    mine = [line for line in new if device.id in line]
    assert 1 <= len(mine) <= 6, "\n".join(mine[:20])
    assert not any(MARKER in line for line in new)


def test_the_cli_shows_what_machines_said_with_control_characters_escaped(
    gw: GatewayProcess, device: Device
) -> None:
    # A version stored raw (by a gateway before this check, or straight into the database).
    with closing(sqlite3.connect(gw.data_dir / "edgefleet.db", timeout=30)) as db:
        db.execute(
            "UPDATE devices SET agent_version = ? WHERE id = ?",
            ("\x1b[2J\x1b[31mPWNED\x07", device.id),
        )
        db.commit()
    shown = gw.cli("devices", "show", device.id).stdout
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b[2J\\x1b[31mPWNED\\x07" in shown
    listed = gw.cli("devices", "list").stdout
    assert "\x1b" not in listed
    # A reply's detail is free text: stored as sent (bounded), escaped when shown.
    done = threading.Event()

    def answer(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        command_id = jwt.decode(msg.payload, options={"verify_signature": False})["jti"]
        reply = {"command_id": command_id, "state": "failed", "detail": "\x1b]0;owned\x07bad"}
        device.probe.client.publish(device.topic("reply"), json.dumps(reply), qos=1)
        done.set()

    device.probe.subscribe(device.topic("cmd"))
    device.probe.client.on_message = answer
    pinged = gw.cli("devices", "ping", device.id, "--timeout", "20s", check=False)
    assert done.is_set()
    assert pinged.returncode == 1
    assert "\x1b" not in pinged.stderr and "\\x1b]0;owned\\x07bad" in pinged.stderr


def test_failed_enrollments_are_audited_logged_and_limited(gw: GatewayProcess) -> None:
    key = keys.public_key_pem(keys.generate_private_key().public_key())
    codes = []
    # From 127.0.0.2: the limit is per client address, and the other tests enroll from .1.
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, timeout=10) as guesser:
        for _ in range(12):
            response = guesser.post(
                gw.url + "/api/v1/enroll", json={"token": "efp_" + "x" * 40, "public_key": key}
            )
            codes.append(response.status_code)
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
                assert response.json()["reason"] == "too_many_failures"
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    events = gw.cli_json("audit", "--action", "device.enroll_failed", "--limit", "50")
    assert len(events) == 10
    assert {e["detail"]["reason"] for e in events} == {"unknown_token"}
    assert all(e["actor"] == "address:127.0.0.2" for e in events)
    assert "efp_xxxx" not in json.dumps(events)
    logged = [line for line in gw.log_text().splitlines() if "enrollment from 127.0.0.2" in line]
    assert len(logged) == 1
    assert _metric(gw, "edgefleet_enroll_refused_total", reason="too_many_failures") == 2
    assert _metric(gw, "edgefleet_enroll_refused_total", reason="unknown_token") >= 10
    # Another address is not held up by it.
    Device(gw, "after-the-guesser").close()

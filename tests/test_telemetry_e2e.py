"""End to end: a real machine's samples through two real gateway replicas into PostgreSQL.

Two `edgefleet gateway run` processes share one PostgreSQL database; the first supervises the
Mosquitto broker, the second reaches it with ``--mqtt-url`` as a second replica would. A real
`edgefleet agent run` (enrolled through the CLI) takes numbered samples on its loopback intake,
exactly as a Node-RED flow would post them. One replica is killed with SIGKILL in the middle of
the stream and started again; every sample must be stored exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy.engine import Engine

from gateway.broker.dynsec import GATEWAY_USERNAME
from gateway.broker.mosquitto import gateway_password_path, pki_directory
from gateway.broker.pki import CA_CERT_NAME
from gateway.db import make_engine
from gateway.settings import GatewaySettings
from provisioning.mqtt import MqttEndpoint
from provisioning.telemetry import Sample, encode_batch
from tests.support import local_http
from tests.support.gateway_process import (
    AgentProcess,
    GatewayProcess,
    clean_env,
    edgefleet_command,
    wait_until,
)
from tests.support.mosquitto import MqttProbe
from tests.support.telemetry import numbered, stored_values
from tests.support.waiting import free_port

pytestmark = pytest.mark.postgres
TOTAL = 2000  # numbered samples in the stream
PER_POST = 10
# At most one post per 15 ms: the stream lasts at least 3 s, so a replica is killed (and the
# survivor seen storing on) while it flows, however fast the host posts.
POST_EVERY_S = 0.015


class Replica(GatewayProcess):
    """`gateway run` on PostgreSQL; with ``broker_of`` it uses that replica's broker."""

    def __init__(
        self, data_dir: Path, db_url: str, broker_of: GatewayProcess | None = None
    ) -> None:
        self.db_url = db_url
        self.broker_of = broker_of
        extra = ["--db", db_url]
        if broker_of is not None:
            extra += ["--signing-key", str(broker_of.data_dir / "signing-key.pem")]
        super().__init__(data_dir, extra_args=extra)

    @property
    def argv(self) -> list[str]:
        argv = super().argv
        if self.broker_of is None:
            return argv
        at = argv.index("--mqtt-port")
        upstream = self.broker_of
        password = gateway_password_path(upstream.data_dir).read_text().strip()
        url = f"mqtts://{GATEWAY_USERNAME}:{quote(password, safe='')}@127.0.0.1:"
        url += str(upstream.mqtt_port)
        ca = pki_directory(upstream.data_dir) / CA_CERT_NAME
        return [*argv[:at], "--mqtt-url", url, "--mqtt-ca-file", str(ca), *argv[at + 2 :]]

    def make_admin_token(self) -> None:
        if self.broker_of is None:
            super().make_admin_token()
        else:  # one database: the first replica's token is good here too
            self.admin_token = self.broker_of.admin_token
            self.admin_token_id = self.broker_of.admin_token_id

    def cli(self, *args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if args[:1] == ("admin",):
            args = (*args, "--db", self.db_url)
        return super().cli(*args, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        """One value from this replica's /metrics (0 if absent)."""
        text = local_http.get(self.url + "/metrics", timeout=5).text
        wanted = f"edgefleet_telemetry_{name}"
        if labels:
            wanted += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class Machine(AgentProcess):
    """A real agent whose intake listens on a free port and sends 10-sample batches."""

    def __init__(self, gateway: GatewayProcess, state_dir: Path, name: str) -> None:
        super().__init__(gateway, state_dir, name)
        self.intake_port = free_port()
        # One connection for every post, as Node-RED keeps one (a new client per post spends
        # ~25 ms of CPU on its TLS context alone, two thousand samples ten at a time).
        self.intake = httpx.Client(base_url=f"http://127.0.0.1:{self.intake_port}", timeout=10)

    def start(self) -> Self:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        env = {
            "EDGEFLEET_AGENT_TELEMETRY_INTAKE_PORT": str(self.intake_port),
            "EDGEFLEET_AGENT_HOST_METRICS_INTERVAL": "0",
            "EDGEFLEET_AGENT_OUTBOX_BATCH_SIZE": "10",
        }
        self.proc = subprocess.Popen(
            [*edgefleet_command(), "agent", "run", "--state-dir", str(self.state_dir)],
            env=clean_env(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def post(self, samples: Sequence[dict[str, Any]]) -> None:
        response = self.intake.post("/telemetry", json={"samples": list(samples)})
        assert response.status_code == 200, response.text

    def stop(self, timeout: float = 15.0) -> int | None:
        self.intake.close()
        return super().stop(timeout)

    def broker_password(self) -> str:
        identity = json.loads(self.identity_path.read_text())
        return str(identity["broker"]["password"])


class Stream:
    """Posts the numbered samples 0..TOTAL-1 to the machine's intake, PER_POST at a time."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.sent = 0
        self.error: BaseException | None = None
        self._go = threading.Event()
        self._go.set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            next_post = time.monotonic()
            while self.sent < TOTAL:
                self._go.wait()
                time.sleep(max(0.0, next_post - time.monotonic()))
                next_post = time.monotonic() + POST_EVERY_S
                batch = range(self.sent, self.sent + PER_POST)
                self.machine.post([{"m": "n", "v": float(v)} for v in batch])
                self.sent += PER_POST
        except BaseException as exc:  # reported by the test
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join(60)
        assert self.error is None, f"posting samples failed: {self.error}"
        assert self.sent == TOTAL


@pytest.fixture
def engine(pg_database: str) -> Iterator[Engine]:
    engine = make_engine(GatewaySettings(db_url=pg_database).database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def replicas(tmp_path: Path, pg_database: str) -> Iterator[tuple[Replica, Replica]]:
    first = Replica(tmp_path / "gw-a", pg_database).start()
    try:
        second = Replica(tmp_path / "gw-b", pg_database, broker_of=first).start()
        try:
            yield first, second
        finally:
            second.stop(check=False)
    finally:
        first.stop()


def _enroll(gateway: Replica, state_dir: Path, name: str) -> Machine:
    machine = Machine(gateway, state_dir, name)
    token = gateway.create_provisioning_token("--uses", "1")["token"]
    machine.enroll(token)
    return machine


def test_kill9_of_one_replica_mid_stream_stores_every_sample_once(
    replicas: tuple[Replica, Replica], engine: Engine, tmp_path: Path
) -> None:
    first, second = replicas
    machine = _enroll(first, tmp_path / "machine", "press-07")
    machine.start()
    try:
        machine.wait_connected()
        device = machine.device_id
        stream = Stream(machine)
        stream.start()
        wait_until(
            lambda: (
                first.metric("batches_stored_total") > 0
                and second.metric("batches_stored_total") > 0
            ),
            "both replicas storing a share",
            first,
            second,
            machine,
        )
        second.kill9()  # mid-stream: no goodbye, whatever it held unacknowledged stays queued
        stored_at_kill = len(stored_values(engine, device))
        assert stored_at_kill < TOTAL, "the stream ended before the kill; nothing was tested"
        wait_until(
            lambda: len(stored_values(engine, device)) > stored_at_kill + 100,
            "the surviving replica storing on",
            first,
            machine,
        )
        restarted = Replica(second.data_dir, second.db_url, broker_of=first).start()
        try:
            stream.join()
            values = wait_until(
                lambda: (v := stored_values(engine, device)) and len(v) >= TOTAL and v,
                f"all {TOTAL} samples stored",
                first,
                restarted,
                machine,
                timeout=60,
            )
            assert restarted.metric("batches_stored_total") > 0, "the restarted one drained"
            wait_until(lambda: machine_outbox_empty(machine), "the outbox empty", machine)
            values = stored_values(engine, device)
        finally:
            restarted.stop()
    finally:
        machine.stop()
    assert values == [float(v) for v in range(TOTAL)], "a sample lost or stored twice"


def machine_outbox_empty(machine: Machine) -> bool:
    health = machine.intake.get("/health").json()
    return bool(health["queued"] == 0)


def test_refused_messages_show_in_metrics_and_the_agent_reports_its_outbox(
    replicas: tuple[Replica, Replica], engine: Engine, tmp_path: Path
) -> None:
    first, second = replicas
    machine = _enroll(first, tmp_path / "machine", "press-08")
    rogue = _enroll(first, tmp_path / "rogue", "press-09")  # enrolled, its agent never runs
    machine.start()
    try:
        machine.wait_connected()
        endpoint = MqttEndpoint(
            "127.0.0.1",
            first.mqtt_port,
            True,
            rogue.device_id,
            rogue.broker_password(),
            pki_directory(first.data_dir) / CA_CERT_NAME,
        )
        topic = f"fleet/{rogue.device_id}/telemetry"
        with MqttProbe(endpoint, rogue.device_id) as publisher:
            assert not publisher.connect().is_failure
            publisher.publish(topic, b"not json at all")
            publisher.publish(topic, b'{"v": 1, "seq": 1, "samples": []}')
            claim = encode_batch(2, [Sample("n", time.time(), 1.0)], device=machine.device_id)
            publisher.publish(topic, claim)
            publisher.publish(topic, numbered(3, 0, 4))  # and a good one
        machine.post([{"m": "n", "v": 1.5}])

        def refused(reason: str) -> float:
            return first.metric("refused_total", reason=reason) + second.metric(
                "refused_total", reason=reason
            )

        wait_until(
            lambda: (
                refused("malformed_json") == refused("schema") == 1
                and refused("device_mismatch") == 1
            ),
            "refusals counted in /metrics",
            first,
            second,
        )
        wait_until(lambda: len(stored_values(engine, rogue.device_id)) == 4, "the good batch")
        wait_until(lambda: stored_values(engine, machine.device_id) == [1.5], "the machine's")
        # The agent's retained status carries its outbox counters.
        with MqttProbe(first.broker_endpoint(), "status-reader") as reader:
            assert not reader.connect().is_failure
            reader.subscribe(f"fleet/{machine.device_id}/status")
            status = json.loads(
                wait_until(
                    lambda: reader.received(f"fleet/{machine.device_id}/status"),
                    "the retained status",
                )[-1]
            )
        assert status["state"] == "online"
        assert status["outbox_queued"] >= 0 and status["outbox_dropped"] == 0
    finally:
        machine.stop()

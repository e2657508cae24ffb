"""Telemetry test helpers: registered devices, a device-side link, an ingest that cleans up.

`DeviceLink` is the agent's telemetry path without the rest of the agent: a paho-mqtt 2 client
with the device's credential and a persistent session, wired to a real `Outbox` and
`TelemetrySender` exactly as `edge_agent.runner.Agent` forwards its callbacks.

`running_ingest` starts a real `TelemetryIngest` with a client id unique to the test and, on the
way out, stops it and removes its persistent session from the broker (otherwise the broker would
keep routing a share of later tests' telemetry to a member that never comes back).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlmodel import Session

from edge_agent.telemetry.outbox import Outbox
from edge_agent.telemetry.sender import TelemetrySender
from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.registry.models import Device
from gateway.telemetry.ingest import IngestOptions, TelemetryIngest
from gateway.telemetry.metrics import TelemetryMetrics
from gateway.telemetry.models import samples, series
from gateway.telemetry.store import WriteResult
from provisioning.mqtt import MqttEndpoint
from provisioning.telemetry import Sample, encode_batch
from provisioning.wire import Topics
from tests.support.mosquitto import RECONNECT_DELAY_S, enroll_device
from tests.support.relay import pump
from tests.support.waiting import wait_for

TOPICS = Topics()


def add_device(engine: Engine, device_id: str) -> None:
    """A registry row for ``device_id`` (active), as enrollment would leave it."""
    with Session(engine) as session:
        session.add(
            Device(
                id=device_id,
                name=device_id,
                public_key="-----BEGIN PUBLIC KEY-----test",
                key_fingerprint=uuid.uuid4().hex[:32],
                enrolled_at=datetime.now(UTC),
            )
        )
        session.commit()


def register(engine: Engine, broker: MosquittoSupervisor, device_id: str) -> MqttEndpoint:
    """Registry row plus broker credential; the endpoint the device connects with."""
    add_device(engine, device_id)
    return enroll_device(broker, device_id)


def numbered(seq: int, first: int, count: int, metric: str = "n", ts: float = 0.0) -> bytes:
    """A batch whose samples carry the values first, first+1, ... (unique across a stream)."""
    when = ts or datetime.now(UTC).timestamp()
    return encode_batch(seq, [Sample(metric, when, float(v)) for v in range(first, first + count)])


def stored_values(engine: Engine, device_id: str, metric: str = "n") -> list[float]:
    """Every stored value of one metric, duplicates included, sorted."""
    query = (
        sa.select(samples.c.value)
        .join(series, series.c.id == samples.c.series_id)
        .where(series.c.device_id == device_id, series.c.metric == metric)
        .order_by(samples.c.value)
    )
    with engine.connect() as conn:
        return [float(v) for v in conn.execute(query).scalars()]


def wait_values(
    engine: Engine, device_id: str, count: int, timeout: float = 30.0, metric: str = "n"
) -> list[float]:
    """Wait until at least ``count`` values are stored; return them all (sorted)."""
    return wait_for(
        lambda: (v := stored_values(engine, device_id, metric)) and len(v) >= count and v,
        timeout,
        interval=0.1,
        what=f"{count} values of {metric} from {device_id}",
    )


def session_present(endpoint: MqttEndpoint, client_id: str) -> bool:
    """Does the broker hold a session for ``client_id``? (Asking leaves none behind.)"""
    flags: list[bool] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    endpoint.configure(client)
    client.on_connect = lambda _c, _u, f, _rc, _p: flags.append(bool(f.session_present))
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.connect(endpoint.host, endpoint.port, clean_start=False, properties=props)
    client.loop_start()
    try:
        wait_for(lambda: flags, 10, what="CONNACK")
    finally:
        client.disconnect()
        client.loop_stop()
    return flags[0]


def forget_session(endpoint: MqttEndpoint, client_id: str) -> None:
    """Remove a persistent session: connect with clean start and expiry 0, then leave."""
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    endpoint.configure(client)
    client.on_connect = lambda *_args: done.set()
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.connect(endpoint.host, endpoint.port, clean_start=True, properties=props)
    client.loop_start()
    try:
        done.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()


class CommitLog:
    """Records what each write committed, in order (the ingest's ``on_committed`` hook)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stored: list[tuple[str, int]] = []
        self.duplicates = 0

    def __call__(self, result: WriteResult, _committed_at: float) -> None:
        with self._lock:
            self.stored.extend((b.device_id, b.seq) for b in result.stored)
            self.duplicates += result.duplicates

    def seqs(self, device_id: str) -> list[int]:
        with self._lock:
            return [seq for device, seq in self.stored if device == device_id]


@contextmanager
def running_ingest(
    broker: MosquittoSupervisor,
    engine: Engine,
    *,
    client_id: str | None = None,
    forget: bool = True,
    leave: bool = False,
    registry: CollectorRegistry | None = None,
    **options: Any,
) -> Iterator[tuple[TelemetryIngest, CommitLog]]:
    """A started ingest (connected and subscribed) and the log of what it committed."""
    name = client_id or f"test-ingest-{uuid.uuid4().hex[:8]}"
    log = CommitLog()
    metrics = TelemetryMetrics(registry if registry is not None else CollectorRegistry())
    ingest = TelemetryIngest(
        broker.endpoint,
        engine,
        TOPICS,
        IngestOptions(client_id=name, **options),
        metrics,
        on_committed=log,
    )
    ingest.start()
    assert ingest.connected, f"ingest {name} did not connect"
    try:
        yield ingest, log
    finally:
        ingest.stop(leave=leave)
        if forget:
            forget_session(broker.endpoint, name)


class DeviceLink:
    """The agent's telemetry path: outbox -> sender -> paho client (persistent session)."""

    def __init__(self, endpoint: MqttEndpoint, device_id: str, outbox_path: Path, batch: int):
        self.device_id = device_id
        self.endpoint = endpoint
        self.outbox = Outbox(outbox_path, batch_size=batch)
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
        )
        endpoint.configure(self.client)
        self.client.suppress_exceptions = True
        self.client.reconnect_delay_set(RECONNECT_DELAY_S, RECONNECT_DELAY_S)
        self.sender = TelemetrySender(self.client, TOPICS.telemetry(device_id), self.outbox)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if not rc.is_failure:
            self.connected.set()
            self.sender.on_connect()

    def _on_disconnect(self, *_args: Any) -> None:
        self.connected.clear()
        self.sender.on_disconnect()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self.sender.on_publish(mid, rc)

    def start(self) -> None:
        self.sender.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect_async(
            self.endpoint.host, self.endpoint.port, clean_start=False, properties=props
        )
        self.client.loop_start()
        assert self.connected.wait(10), f"{self.device_id} did not connect"

    def add(self, first: int, count: int, metric: str = "n") -> None:
        now = datetime.now(UTC).timestamp()
        self.outbox.add([Sample(metric, now, float(v)) for v in range(first, first + count)])

    def close(self) -> None:
        self.sender.stop()
        self.client.disconnect()
        self.client.loop_stop()
        self.outbox.close()
        forget_session(self.endpoint, self.device_id)


class CuttableLink:
    """A TCP relay on loopback between a device and the broker, whose "cable" can be pulled.

    `cut()` closes every relayed connection and stops accepting (the device sees its network
    gone: connection reset, then refused); `restore()` accepts again on the same port. TLS
    passes through untouched, so the device still verifies the broker itself.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def endpoint(self, endpoint: MqttEndpoint) -> MqttEndpoint:
        return replace(endpoint, host=self.host, port=self.port)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                inside, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                outside = socket.create_connection((self.host, self.target_port))
            except OSError:
                inside.close()
                continue
            with self._lock:
                self._conns += [inside, outside]
            for src, dst in ((inside, outside), (outside, inside)):
                threading.Thread(target=pump, args=(src, dst), daemon=True).start()

    def cut(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.cut()

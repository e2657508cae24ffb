"""The telemetry sender against a real Mosquitto of our own: outages, restarts, refusals.

Each test starts ``mosquitto`` on a free port with a minimal config in a temporary directory
(plain listener, anonymous, persistence on) and a paho-mqtt 2 subscriber with a persistent
session, so a broker restart neither loses the subscription nor what was queued for it.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.telemetry.outbox import Outbox
from edge_agent.telemetry.sender import TelemetrySender
from provisioning.telemetry import Sample, TelemetryBatch, parse_batch
from tests.support.waiting import free_port, port_open, wait_for

DEVICE = "press-01"
TOPIC = f"fleet/{DEVICE}/telemetry"


class Broker:
    """A plain Mosquitto 2 process with persistence, restartable on the same port."""

    def __init__(self, workdir: Path, port: int, acl: str | None = None) -> None:
        self.workdir = workdir
        self.port = port
        self.config = workdir / "mosquitto.conf"
        self.acl = workdir / "acl"
        self.log = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        (workdir / "store").mkdir(exist_ok=True)
        lines = [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "persistence true",
            f"persistence_location {workdir / 'store'}/",
            "max_queued_messages 100000",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if acl is not None:
            self.set_acl(acl)
            lines.append(f"acl_file {self.acl}")
        self.config.write_text("\n".join(lines) + "\n")

    def set_acl(self, text: str) -> None:
        self.acl.write_text(text)
        if self._proc is not None:
            self._proc.send_signal(signal.SIGHUP)  # mosquitto re-reads its ACL file

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is read or answered."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                ["mosquitto", "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(lambda: port_open(self.port), 10, what=f"mosquitto on port {self.port}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)  # in case it was frozen
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        wait_for(lambda: not port_open(self.port), 10, what="the broker's port to close")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    server = Broker(tmp_path, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Subscriber:
    """Records every telemetry message (duplicates included) with a persistent session."""

    def __init__(self, port: int, client_id: str = "observer") -> None:
        self.lock = threading.Lock()
        self.payloads: list[bytes] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, 10, what="the observer's subscription")

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(TOPIC, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.payloads.append(bytes(msg.payload))

    def batches(self) -> list[TelemetryBatch]:
        with self.lock:
            payloads = list(self.payloads)
        return [parse_batch(p, max_bytes=1 << 20, max_samples=10_000, now=1e10) for p in payloads]

    def values(self) -> set[int]:
        return {int(value) for b in self.batches() for _metric, _ts, value in b.samples}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Device:
    """The agent's side: an outbox, a paho client owned here, and the sender under test."""

    def __init__(
        self, port: int, outbox: Outbox, *, drop_on_connect: bool = False, **sender_options: Any
    ) -> None:
        self.outbox = outbox
        self.drop_on_connect = drop_on_connect
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=DEVICE, protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.sender = TelemetrySender(self.client, TOPIC, outbox, **sender_options)
        self.connects = 0
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.sender.on_disconnect()
        self.client.on_publish = self._on_publish
        self.sender.start()
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        if not rc.is_failure:
            if self.drop_on_connect:
                client.drop_out_messages()
            self.connects += 1
            self.sender.on_connect()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        self.sender.on_publish(mid, rc)

    def close(self) -> None:
        self.sender.stop()
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db", batch_size=50) as box:
        yield box


@pytest.fixture
def observer(broker: Broker) -> Iterator[Subscriber]:
    subscriber = Subscriber(broker.port)
    try:
        yield subscriber
    finally:
        subscriber.close()


def numbered(start: int, count: int) -> list[Sample]:
    return [Sample("n", 1_700_000_000.0 + i, float(i)) for i in range(start, start + count)]


def assert_delivery(observer: Subscriber, expected: int) -> dict[int, TelemetryBatch]:
    """Every sample arrived; duplicates are only whole batches re-sent with the same seq."""
    batches = observer.batches()
    by_seq: dict[int, TelemetryBatch] = {}
    first_arrivals: list[int] = []
    for batch in batches:
        if batch.seq in by_seq:
            assert batch.samples == by_seq[batch.seq].samples, f"seq {batch.seq} changed"
        else:
            by_seq[batch.seq] = batch
            first_arrivals.append(batch.seq)
    unique = [int(value) for seq in sorted(by_seq) for _m, _t, value in by_seq[seq].samples]
    assert unique == list(range(expected)), "each sample once, in order, across distinct seqs"
    assert first_arrivals == sorted(first_arrivals), "batches first arrived out of order"
    return by_seq


def test_drains_in_order_with_at_most_n_in_flight(
    broker: Broker, observer: Subscriber, outbox: Outbox
) -> None:
    outbox.add(numbered(0, 2000))
    with Device(broker.port, outbox, max_inflight=3) as device:
        wait_for(lambda: len(outbox) == 0, 30, what="the outbox to drain")
        wait_for(lambda: len(observer.values()) == 2000, 10, what="all samples at the observer")
        stats = device.sender.stats()
        assert stats.acked == 40
        assert stats.inflight == 0 and stats.refused == 0
    by_seq = assert_delivery(observer, 2000)
    assert sorted(by_seq) == list(range(1, 41))


def test_broker_restart_mid_stream_loses_nothing(
    broker: Broker, observer: Subscriber, outbox: Outbox
) -> None:
    total = 10_000
    stop_producing = threading.Event()
    produced = [0]

    def produce() -> None:
        """A machine producing 100 samples every few ms, whatever the broker does."""
        while produced[0] < total and not stop_producing.is_set():
            outbox.add(numbered(produced[0], 100))
            produced[0] += 100
            stop_producing.wait(0.005)  # pacing of the producer, not waiting for anything

    producer = threading.Thread(target=produce)
    with Device(broker.port, outbox, max_inflight=10) as device:
        producer.start()
        try:
            wait_for(lambda: len(observer.values()) >= 2500, 30, what="the stream to be flowing")
            broker.stop()  # SIGTERM: mosquitto saves its store, as a restart would
            seen_at_kill = len(observer.values())
            wait_for(lambda: len(outbox) >= 1000, 30, what="samples queued during the outage")
            broker.start()
            producer.join(timeout=60)
            wait_for(lambda: len(outbox) == 0, 60, what="the outbox to drain after the restart")
            wait_for(
                lambda: len(observer.values()) == total, 30, what="all samples at the observer"
            )
        finally:
            stop_producing.set()
            producer.join()
        assert seen_at_kill < total
        assert device.connects >= 2
        assert outbox.stats().dropped == 0
    by_seq = assert_delivery(observer, total)
    assert len(by_seq) == device.sender.stats().acked


def test_samples_wait_through_an_outage_and_an_agent_restart(tmp_path: Path) -> None:
    """Broker down from the start, agent restarted meanwhile: all goes out, in order."""
    broker = Broker(tmp_path, free_port())
    path = tmp_path / "agent" / "outbox.db"
    with Outbox(path, batch_size=50) as outbox:
        outbox.add(numbered(0, 300))
        with Device(broker.port, outbox) as device:
            outbox.add(numbered(300, 200))
            assert device.sender.stats().published == 0
            assert not device.client.is_connected()
        assert len(outbox) == 500

    broker.start()
    observer = Subscriber(broker.port)
    try:
        with Outbox(path, batch_size=50) as outbox, Device(broker.port, outbox):
            assert len(outbox) == 500  # nothing left the machine, nothing was lost
            wait_for(lambda: len(outbox) == 0, 30, what="the outbox to drain")
            wait_for(lambda: len(observer.values()) == 500, 10, what="all samples")
        assert_delivery(observer, 500)
    finally:
        observer.close()
        broker.stop()


def test_refused_batches_stay_queued_and_go_when_allowed(tmp_path: Path, outbox: Outbox) -> None:
    deny = "user observer\ntopic read fleet/#\n"  # anonymous clients may not write at all
    broker = Broker(tmp_path, free_port(), acl=deny)
    broker.start()
    observer = Subscriber(broker.port)
    try:
        outbox.add(numbered(0, 120))
        with Device(broker.port, outbox) as device:
            wait_for(lambda: device.sender.stats().refused >= 3, 10, what="PUBACKs refusing")
            assert len(outbox) == 120
            assert observer.values() == set()
            broker.set_acl("topic readwrite fleet/#\n")
            wait_for(lambda: len(outbox) == 0, 30, what="the outbox to drain once allowed")
            wait_for(lambda: len(observer.values()) == 120, 10, what="all samples")
        assert_delivery(observer, 120)
    finally:
        observer.close()
        broker.stop()


def test_batches_the_client_forgot_are_sent_again(
    broker: Broker, observer: Subscriber, outbox: Outbox
) -> None:
    """An owner that drops paho's unacked messages on reconnect (as paho's docs suggest for
    topic aliases) must not lose telemetry: the ack timeout sends those batches again."""
    broker.stop()  # a clean restart first, so the store holds the observer's session
    broker.start()
    wait_for(lambda: observer.subscribed.is_set(), 10)
    with Device(broker.port, outbox, ack_timeout=2.0, drop_on_connect=True) as device:
        wait_for(lambda: device.connects == 1, 10, what="the device to connect")
        broker.freeze()  # the broker takes the bytes but never answers
        outbox.add(numbered(0, 100))
        wait_for(lambda: device.sender.stats().published == 2, 10, what="two batches in flight")
        broker.stop(signal.SIGKILL)  # they die unacknowledged with the broker
        broker.start()
        wait_for(lambda: device.connects == 2, 10, what="the reconnect")
        wait_for(lambda: len(outbox) == 0, 20, what="the outbox to drain")
        assert device.sender.stats().resent >= 2
    wait_for(lambda: len(observer.values()) == 100, 10, what="all samples")
    assert_delivery(observer, 100)


def test_payload_on_the_wire_is_the_schema(
    broker: Broker, observer: Subscriber, outbox: Outbox
) -> None:
    outbox.add([Sample("line1/temp", 1_700_000_000.5, 21.5)])
    with Device(broker.port, outbox):
        wait_for(lambda: observer.payloads, 10, what="one message")
    assert json.loads(observer.payloads[0]) == {
        "v": 1,
        "seq": 1,
        "samples": [{"m": "line1/temp", "t": 1_700_000_000.5, "v": 21.5}],
    }

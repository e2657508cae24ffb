"""Telemetry ingest: ``$share/gateway/{prefix}/+/telemetry`` into the database, losing nothing.

One MQTT 5 client (paho-mqtt 2) per replica with a **stable client id** and a **persistent
session** (``clean_start=False``, a session expiry): messages the broker routed to this replica
while it was away, and those it had received but not acknowledged, wait in the broker for it.
Acknowledgements are manual (``manual_ack=True``): a PUBACK goes out only after the message's
batch is committed, so a replica killed at any moment loses nothing; the broker delivers the
unacknowledged messages again and the ``(device, seq)`` key drops what was already stored.

Threads. paho's network thread only puts messages on a queue (``on_message`` never waits). The
writer thread (`provisioning.mqtt.QueueWorker`) takes everything queued (up to ``max_messages``;
while a write runs, the next group gathers by itself, so a busy stream is written in large
groups and a quiet one at once),
validates each message (`provisioning.telemetry.parse_batch`; the device is the one in the
topic, which the broker's ACL allowed the publisher, never the payload), checks the device is
active (`ActiveDevices`), writes the valid batches in one transaction (`TelemetryStore`),
commits, then acknowledges every message of the group.

Refused messages (bad JSON or schema, too large, non-numeric, far-future timestamps, a payload
claiming another device, an unknown or revoked device) are acknowledged too: sent again they
would be refused again. They are counted by reason (`TelemetryMetrics.refused`) and logged once
per device and reason (`RefusalLog`); the rest of the group is stored as if they were not there.

Database errors. Nothing of the group is acknowledged; the writer keeps the group and tries the
same write again with backoff (0.5 s doubling to 30 s) until it succeeds or the ingest stops.
Meanwhile the broker sends at most Receive Maximum unacknowledged messages and keeps the rest.

Reconnects. A PUBACK names a packet id, which is only meaningful on the connection the message
came in on. Each message carries the connection generation it arrived on; after a disconnect
the writer stores those messages but does not acknowledge them (the broker sends them again on
the resumed session, and the copy is acknowledged as a duplicate). This prevents acknowledging,
with a reused packet id, a different message that has not been stored.

Mosquitto 2.0 notes, for operators: shared subscriptions are strict round-robin and include
members that are offline with a persistent session, so the share of a stopped replica waits in
its session (up to ``max_queued_messages``) until it comes back with the same client id; a
replica that is retired for good should be started once more with its replica name and stopped
after it drained, or its session left to expire (``session_expiry``).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.telemetry.active_devices import ActiveDevices
from gateway.telemetry.metrics import SERIES_LIMIT, UNKNOWN_DEVICE, TelemetryMetrics
from gateway.telemetry.refusals import RefusalLog
from gateway.telemetry.store import (
    DEFAULT_MAX_SERIES_PER_DEVICE,
    IncomingBatch,
    TelemetryStore,
    WriteResult,
)
from provisioning.mqtt import MqttEndpoint, QueueWorker, make_client, start_client, stop_client
from provisioning.telemetry import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_FUTURE_SKEW,
    DEFAULT_MAX_SAMPLES,
    BatchRejected,
    check_identity,
    parse_batch,
)
from provisioning.wire import SHARED_GROUP, Topics

log = logging.getLogger(__name__)

DEFAULT_SESSION_EXPIRY: Final = 7 * 24 * 3600
DEFAULT_RECEIVE_MAXIMUM: Final = 10_000
DEFAULT_MAX_MESSAGES: Final = 2_000
_RETRY_FIRST: Final = 0.5
_RETRY_MAX: Final = 30.0
_IDLE_POLL: Final = 0.2
_TOPIC_CACHE: Final = 100_000
_LEAVE_QUIET: Final = 0.5
_BEHIND_FOR: Final = 1.0

Committed = Callable[[WriteResult, float], None]
T = TypeVar("T")


def default_client_id(data_dir: Path, replica_name: str | None = None) -> str:
    """The ingest's MQTT client id: ``edgefleet-ingest-<name>``, stable across restarts.

    Without a replica name it is derived from the host name and the data directory, so each
    replica (its own data directory) keeps its own persistent session.
    """
    if replica_name:
        return f"edgefleet-ingest-{replica_name}"
    seed = f"{socket.gethostname()}:{data_dir.resolve()}".encode()
    return f"edgefleet-ingest-{hashlib.sha256(seed).hexdigest()[:16]}"


@dataclass(frozen=True, slots=True)
class IngestOptions:
    client_id: str
    group: str = SHARED_GROUP
    session_expiry: int = DEFAULT_SESSION_EXPIRY
    """Seconds the broker keeps this replica's session (and its share) while it is away."""
    receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM
    """Unacknowledged messages the broker may send us at once (memory: that many payloads)."""
    max_messages: int = DEFAULT_MAX_MESSAGES
    """Messages written in one transaction at most."""
    max_bytes: int = DEFAULT_MAX_BYTES
    max_samples: int = DEFAULT_MAX_SAMPLES
    max_future_skew: float = DEFAULT_MAX_FUTURE_SKEW
    device_refresh: float = 5.0
    keepalive: int = 30
    max_series_per_device: int = DEFAULT_MAX_SERIES_PER_DEVICE


class _Received(NamedTuple):  # a tuple: made for every message on paho's thread
    generation: int
    mid: int
    topic: str
    payload: bytes | bytearray
    qos: int
    """QoS 0 has no packet id and gets no PUBACK (a PUBACK for id 0 is a protocol error)."""


class TelemetryIngest:
    def __init__(
        self,
        endpoint: MqttEndpoint,
        engine: Engine,
        topics: Topics,
        options: IngestOptions,
        metrics: TelemetryMetrics,
        *,
        on_committed: Committed | None = None,
    ) -> None:
        if not 1 <= options.receive_maximum <= 65535:
            raise ValueError(f"receive_maximum must be 1..65535, got {options.receive_maximum}")
        self.options = options
        self.metrics = metrics
        self._endpoint = endpoint
        self._topics = topics
        self._store = TelemetryStore(engine, max_series_per_device=options.max_series_per_device)
        self._devices = ActiveDevices(engine, options.device_refresh)
        self._refusals = RefusalLog(log)
        self._device_of: dict[str, str | None] = {}  # topic -> device id (None: not a device's)
        self._on_committed = on_committed
        # paho's thread puts each message here; the writer thread stores them in groups.
        self._writer: QueueWorker[_Received] = QueueWorker(
            "telemetry-writer",
            self._handle_group,
            max_group=options.max_messages,
            idle_poll=_IDLE_POLL,
            daemon=False,
        )
        self._put = self._writer.put
        self._stopping = self._writer.stopping
        self._connected = threading.Event()
        # The generation is bumped by the network thread; acks read it under this lock, so no
        # ack of an old connection's packet id is queued once on_disconnect has returned.
        self._ack_lock = threading.Lock()
        self._unsubscribed = threading.Event()
        self._session_ended = False
        self._generation = 0
        self.trailing = 0.0
        """Seconds the newest batch of the last write trailed its device's clock at its commit
        (written by the writer thread, read by anyone: how far behind the ingest is)."""
        self._last_write = 0.0
        self._received = 0  # network thread only
        self._settled = 0  # writer thread only: acknowledged, or left to the broker to resend
        self.client = make_client(
            endpoint,
            options.client_id,
            name="telemetry ingest",
            on_connected=self._subscribe,
            manual_ack=True,
        )
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        metrics.watch(self.outstanding, self._writer.qsize)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start writing and connect; returns once the broker confirmed the subscription (or
        after ``timeout``: then it keeps trying in the background)."""
        self._writer.start()
        start_client(
            self.client,
            self._endpoint,
            keepalive=self.options.keepalive,
            clean_start=False,
            session_expiry=self.options.session_expiry,
            receive_maximum=self.options.receive_maximum,
        )
        if not self._connected.wait(timeout):
            log.warning(
                "telemetry ingest not connected to %s yet; it keeps trying", self._endpoint.url
            )

    def stop(self, leave: bool = False, timeout: float = 30.0) -> None:
        """Finish the write in progress (and acknowledge it), then disconnect.

        By default the session stays: messages still queued are not acknowledged, the broker
        keeps them and this replica's further share for this client id, and they come back on
        the next start (a restart loses nothing). With ``leave`` the replica leaves the group
        for good: it unsubscribes, stores and acknowledges everything already sent to it, and
        ends its session, so the broker deals its share to the other replicas from then on
        (with none left, the broker answers "no matching subscribers" and the agents keep their
        batches until a replica is back).
        """
        if leave and self.connected:
            self._leave(timeout)
        self._writer.stop(drain=False)  # what is still queued is not acknowledged: it comes back
        props = None
        if self._session_ended:
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        stop_client(self.client, props)
        self.metrics.connected.set(0)

    def _leave(self, timeout: float) -> None:
        topic = self._topics.shared("telemetry", self.options.group)
        self._unsubscribed.clear()
        self.client.unsubscribe(topic)
        if not self._unsubscribed.wait(timeout):
            log.warning("telemetry ingest: no UNSUBACK; stopping with the session kept")
            return
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline:  # until nothing new came for a moment and all is acked
            if self._received == seen and self.outstanding() == 0:
                self._session_ended = True
                log.info("telemetry ingest %s left the group", self.options.client_id)
                return
            seen = self._received
            time.sleep(_LEAVE_QUIET)
        log.warning(
            "telemetry ingest: still busy after %.0fs; stopping with the session kept", timeout
        )

    @property
    def connected(self) -> bool:
        """Connected and subscribed."""
        return self._connected.is_set()

    def behind(self, seconds: float) -> bool:
        """Whether the ingest trails the machines by more than `seconds`: its last write, a
        moment ago, did (an ingest that has nothing to write is behind nothing)."""
        return self.trailing > seconds and time.monotonic() - self._last_write < _BEHIND_FOR

    def outstanding(self) -> int:
        """Messages received and neither acknowledged nor given back to the broker."""
        return self._received - self._settled

    # -- paho's network thread: hand over, never wait ----------------------------------------

    def _subscribe(self, client: mqtt.Client, flags: mqtt.ConnectFlags) -> None:
        topic = self._topics.shared("telemetry", self.options.group)
        client.subscribe(topic, qos=1)
        log.info(
            "telemetry ingest %s connected (session present: %s); subscribing to %s",
            self.options.client_id,
            flags.session_present,
            topic,
        )

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, reason_codes: list[ReasonCode], _p: Any
    ) -> None:
        if any(code.is_failure for code in reason_codes):
            log.error(
                "telemetry ingest: the broker refused the subscription (%s); check the "
                "gateway's ACL for $share/%s/%s/+/telemetry",
                ", ".join(str(code) for code in reason_codes),
                self.options.group,
                self._topics.prefix,
            )
            return
        self._connected.set()
        self.metrics.connected.set(1)

    def _on_unsubscribe(self, *_args: Any) -> None:
        self._unsubscribed.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason_code: ReasonCode, _p: Any
    ) -> None:
        with self._ack_lock:
            self._generation += 1
        self._connected.clear()
        self.metrics.connected.set(0)
        if not self._stopping.is_set():
            log.warning("telemetry ingest disconnected (%s); reconnecting", reason_code)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._received += 1
        self._put(_Received(self._generation, msg.mid, msg.topic, msg.payload, msg.qos))

    # -- the writer thread -------------------------------------------------------------------

    def _handle_group(self, taken: list[_Received]) -> None:
        self.metrics.received.inc(len(taken))
        try:
            self._handle(taken)
        except Exception:  # a bug, not bad input: keep the stream going, leave to broker
            log.exception("telemetry ingest: unexpected error; %d messages left", len(taken))
            self._settled += len(taken)

    def _handle(self, taken: list[_Received]) -> None:
        now = time.time()
        valid: list[tuple[_Received, IncomingBatch]] = []
        refused: list[tuple[_Received, str, str, str]] = []
        opts = self.options
        for item in taken:
            device_id = self._device(item.topic)
            if device_id is None:
                refused.append((item, item.topic[:120], UNKNOWN_DEVICE, "not a device topic"))
                continue
            try:
                parsed_batch = parse_batch(
                    bytes(item.payload),
                    max_bytes=opts.max_bytes,
                    max_samples=opts.max_samples,
                    now=now,
                    max_future_skew=opts.max_future_skew,
                )
                check_identity(parsed_batch, device_id)
            except BatchRejected as exc:
                refused.append((item, device_id, exc.reason, exc.detail))
                continue
            valid.append((item, IncomingBatch(device_id, parsed_batch.seq, parsed_batch.samples)))
        if valid:
            active = self._retry(lambda: self._devices.filter(b.device_id for _, b in valid))
            if active is None:
                return self._abandon(taken)
            for item, batch in valid:
                if batch.device_id not in active:
                    refused.append((item, batch.device_id, UNKNOWN_DEVICE, "no such active device"))
            valid = [(item, batch) for item, batch in valid if batch.device_id in active]
        for _item, device, reason, detail in refused:
            self.metrics.refused.labels(reason=reason).inc()
            self._refusals.refused(device, reason, detail)
        if valid:
            result = self._retry(lambda: self._write([batch for _, batch in valid], now))
            if result is None:
                return self._abandon(taken)
        self._ack(taken)
        return None

    def _device(self, topic: str) -> str | None:
        """The device a telemetry topic belongs to (remembered: topics repeat per device)."""
        try:
            return self._device_of[topic]
        except KeyError:
            pass
        if len(self._device_of) >= _TOPIC_CACHE:
            self._device_of.clear()
        parsed = self._topics.parse(topic)
        device_id = parsed[0] if parsed is not None and parsed[1] == "telemetry" else None
        self._device_of[topic] = device_id
        return device_id

    def _write(self, batches: list[IncomingBatch], now: float) -> WriteResult:
        started = time.perf_counter()
        result = self._store.write(batches, now)
        self.metrics.write_seconds.observe(time.perf_counter() - started)
        self.metrics.batches.inc(len(result.stored))
        self.metrics.samples.inc(result.samples)
        self.metrics.duplicates.inc(result.duplicates)
        for device, metrics in result.refused.items():
            self.metrics.refused.labels(reason=SERIES_LIMIT).inc()
            detail = f"at its limit of {self.options.max_series_per_device} series: {metrics[:5]}"
            self._refusals.refused(device, SERIES_LIMIT, detail)
        self.metrics.series_refused_samples.inc(result.refused_samples)
        committed = time.time()
        observe = self.metrics.lag.observe
        trailing = 0.0
        for batch in batches:  # the agent sends samples in time order: the last is the newest
            lag = max(0.0, committed - batch.samples[-1][1])
            observe(lag)
            trailing = max(trailing, lag)
        self.trailing = trailing
        self._last_write = time.monotonic()
        if self._on_committed is not None:
            self._on_committed(result, committed)
        return result

    def _retry(self, attempt: Callable[[], T]) -> T | None:
        """Run a database step until it succeeds; None if the ingest stops first."""
        delay = _RETRY_FIRST
        while True:
            try:
                return attempt()
            except SQLAlchemyError as exc:
                self.metrics.write_errors.inc()
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                log.error(
                    "telemetry ingest: database error (%s); nothing acknowledged, retrying in "
                    "%.1fs",
                    reason,
                    delay,
                )
            if self._stopping.wait(delay):
                return None
            delay = min(_RETRY_MAX, delay * 2)

    def _abandon(self, taken: list[_Received]) -> None:
        """Stopping during a database outage: the broker keeps these and resends them."""
        self._settled += len(taken)

    def _ack(self, taken: list[_Received]) -> None:
        ack = self.client.ack
        with self._ack_lock:
            current = self._generation
            for item in taken:
                if item.generation == current and item.qos:
                    ack(item.mid, item.qos)
        self._settled += len(taken)

"""The one MQTT layer both sides build their clients with (paho-mqtt 2, MQTT 5).

- `MqttEndpoint`: where a broker is and how to reach it (credential, TLS trust anchor).
- `make_client`: a paho client as every part of edgefleet wants one: callback API 2, MQTT 5, its
  client id, credential and TLS from the endpoint, reconnect delays, exceptions in callbacks
  logged instead of killing the network loop, and a broker's refusal of the connection logged
  (and reported) the same way everywhere. `start_client` connects it in the background.
- `QueueWorker`: "paho's network thread enqueues, a writer thread stores". paho runs callbacks
  on its network thread, which must never wait; listeners put what they receive on the worker's
  queue and the worker hands it to them in groups, on a thread of its own.
- `Listener`: a client and a `QueueWorker` together, for the gateway's listeners that subscribe
  on every connection and store ``(topic, payload)`` groups (replies, statuses).

Nothing here logs or copies per message: `QueueWorker.put` is the queue's own ``put``, so the
telemetry ingest's hot path costs what it did before there was a shared layer.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

T = TypeVar("T")
OnConnected = Callable[[mqtt.Client, mqtt.ConnectFlags], None]
OnRefused = Callable[[ReasonCode], None]


@dataclass(frozen=True)
class MqttEndpoint:
    """A broker address with the credential and trust anchor to use for it."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None

    @property
    def url(self) -> str:
        """The URL without the password, safe for logs."""
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that verifies the broker (against `ca_file` if given)."""
        context = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def configure(self, client: mqtt.Client) -> None:
        """Apply credentials and TLS to a paho client before it connects."""
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set_context(self.ssl_context())


def unique_client_id(role: str) -> str:
    """``edgefleet-<role>-<random>``: for clients that keep no session across restarts."""
    return f"edgefleet-{role}-{uuid.uuid4().hex[:12]}"


def make_client(
    endpoint: MqttEndpoint,
    client_id: str,
    *,
    name: str,
    on_connected: OnConnected | None = None,
    on_refused: OnRefused | None = None,
    max_reconnect_delay: int = 10,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A paho client for `endpoint`, not connected yet (see `start_client`).

    `name` says in logs which part of edgefleet this is. `on_connected(client, flags)` runs on
    each accepted connection (subscribe there: a new connection starts with none unless the
    session was kept); a refused one is logged and given to `on_refused`.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=True,
        manual_ack=manual_ack,
    )
    endpoint.configure(client)
    client.suppress_exceptions = True
    client.reconnect_delay_set(1, max_reconnect_delay)

    def on_connect(
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error(
                "%s: the broker at %s refused the connection: %s", name, endpoint.url, reason_code
            )
            if on_refused is not None:
                on_refused(reason_code)
            return
        if on_connected is not None:
            on_connected(client, flags)

    client.on_connect = on_connect
    return client


def start_client(
    client: mqtt.Client,
    endpoint: MqttEndpoint,
    *,
    keepalive: int = 60,
    clean_start: mqtt.CleanStartOption = mqtt.MQTT_CLEAN_START_FIRST_ONLY,
    session_expiry: int | None = None,
    receive_maximum: int | None = None,
) -> None:
    """Connect in the background and start paho's network thread (it reconnects by itself)."""
    props: Properties | None = None
    if session_expiry is not None or receive_maximum is not None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if session_expiry is not None:
            props.SessionExpiryInterval = session_expiry
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
    client.connect_async(
        endpoint.host, endpoint.port, keepalive=keepalive, clean_start=clean_start, properties=props
    )
    client.loop_start()


def stop_client(client: mqtt.Client, properties: Properties | None = None) -> None:
    """Disconnect (with DISCONNECT `properties`, if given) and stop the network thread."""
    client.disconnect(properties=properties)
    client.loop_stop()


class QueueWorker(Generic[T]):
    """One writer thread for what paho's network thread receives.

    The network thread calls `put` (never blocks). The writer takes everything queued, up to
    `max_group` items, and calls `handle(group)`; while it handles one group the next gathers by
    itself, so a busy stream is handled in large groups and a quiet one at once. An exception in
    `handle` is logged and the worker goes on with the next group.

    `stop(drain=True)` handles what is queued first; `stop(drain=False)` only finishes the group
    in hand (what is left is the caller's to account for, e.g. messages the broker will send
    again). `stopping` is set from the moment `stop` is called: a `handle` that waits (retrying
    a database, say) waits on it.
    """

    def __init__(
        self,
        name: str,
        handle: Callable[[list[T]], None],
        *,
        max_group: int,
        idle_poll: float = 0.2,
        maxsize: int = 0,
        daemon: bool = True,
    ) -> None:
        if max_group < 1:
            raise ValueError(f"max_group must be at least 1, got {max_group}")
        self._handle = handle
        self._max_group = max_group
        self._idle_poll = idle_poll
        # Unbounded: the C SimpleQueue (the ingest's receive maximum bounds it). Bounded: `put`
        # waits when `maxsize` items are waiting, which holds up paho's thread (backpressure).
        self._queue: queue.SimpleQueue[T] | queue.Queue[T] = (
            queue.Queue(maxsize) if maxsize else queue.SimpleQueue()
        )
        self._drain = True
        self.stopping = threading.Event()
        self.put: Callable[[T], None] = self._queue.put
        """Hand one item to the writer (paho's thread: returns at once)."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=daemon)

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        self._drain = drain
        self.stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def qsize(self) -> int:
        """Items received and not taken yet."""
        return self._queue.qsize()

    def _take(self) -> list[T]:
        try:
            first = self._queue.get(timeout=self._idle_poll)
        except queue.Empty:
            return []
        taken = [first]
        get = self._queue.get_nowait
        limit = self._max_group
        try:
            while len(taken) < limit:
                taken.append(get())
        except queue.Empty:
            pass
        return taken

    def _run(self) -> None:
        while True:
            if self.stopping.is_set() and not self._drain:
                return
            taken = self._take()
            if not taken:
                if self.stopping.is_set():
                    return
                continue
            try:
                self._handle(taken)
            except Exception:
                log.exception("%s: handling %d items failed", self._thread.name, len(taken))


Received = tuple[str, bytes]
"""A message as a listener keeps it: its topic and payload."""


class Listener:
    """Subscribes on every connection and hands what arrives to `store`, in groups, on a writer
    thread (a `QueueWorker` of `max_group`; paho's thread waits when `maxsize` are queued).

    A subclass says what to subscribe to (`subscribe`), which messages to keep (`wanted`) and
    how to store a group (`store`). `stop` stores what was received before it returns.
    """

    max_group = 500
    maxsize = 100_000

    def __init__(self, endpoint: MqttEndpoint, role: str, name: str) -> None:
        self.name = name
        self._endpoint = endpoint
        self._writer: QueueWorker[Received] = QueueWorker(
            f"{role}-writer", self.store, max_group=self.max_group, maxsize=self.maxsize
        )
        self._connected = threading.Event()
        self._client = make_client(
            endpoint, unique_client_id(role), name=name, on_connected=self._on_connected
        )
        self._client.on_message = self._on_message

    def subscribe(self, client: mqtt.Client) -> None:
        raise NotImplementedError

    def wanted(self, msg: mqtt.MQTTMessage) -> bool:
        """Whether to keep a message (paho's thread: decide at once)."""
        return True

    def store(self, group: list[Received]) -> None:
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> None:
        """Start writing and connect; returns once subscribed, or after `timeout` (then it keeps
        trying in the background)."""
        self._writer.start()
        start_client(self._client, self._endpoint)
        if not self._connected.wait(timeout):
            log.warning("%s not connected to the broker yet; it keeps trying", self.name)

    def stop(self) -> None:
        """Disconnect, then store what was received (a `store` waiting to retry ends)."""
        stop_client(self._client)
        self._writer.stop(drain=True, timeout=5)

    @property
    def stopping(self) -> threading.Event:
        return self._writer.stopping

    def backlog(self) -> int:
        """Messages received and waiting for the writer."""
        return self._writer.qsize()

    def _on_connected(self, client: mqtt.Client, _flags: mqtt.ConnectFlags) -> None:
        self.subscribe(client)
        self._connected.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.wanted(msg):
            self._writer.put((msg.topic, bytes(msg.payload)))

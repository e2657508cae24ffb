"""Drains the outbox to the broker: batches in order, QoS 1, deleted only once PUBACKed.

The MQTT client belongs to the agent's connection code; this class only publishes on it. The
owner forwards three paho callbacks (``on_connect`` after a successful CONNACK,
``on_disconnect``, ``on_publish(mid, reason_code)``); they only queue an event and wake the
sender's own thread, which does every outbox read, publish and ack. paho's network thread
never waits on SQLite.

Who resends what. paho-mqtt 2 keeps every unacknowledged QoS 1 message of a client in memory
and publishes it again (DUP) on reconnect, in mid order, whatever the session state. So within
one client the in-flight batches keep their mids across a reconnect and their PUBACKs still
find their batch here; re-publishing them as well would only double the traffic. What paho does
*not* cover is handled here:

- a PUBACK with a failure reason code (>= 0x80, e.g. "not authorized", "quota exceeded"): paho
  forgets the message; the batch stays in the outbox and is sent again after a backoff;
- a PUBACK with 0x10 "no matching subscribers": the broker took the message and dropped it, as
  nobody was subscribed. For telemetry that means nobody stored it (the gateway has not
  subscribed yet, or its subscription was lost: Mosquitto 2.0 does not restore shared
  subscriptions from its persistence file, so after a broker restart telemetry has no
  subscriber until the gateway's ingest reconnects). Treated like a refusal: sent again;
- a batch with no PUBACK ``ack_timeout`` seconds after it was sent or after the last reconnect
  (paho dropped it, the owner replaced or reset the client): sent again;
- an agent restart: the outbox is on disk; sending starts again from its oldest batch.

A batch sent twice carries the same ``seq`` and samples; the gateway stores it once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Final

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.telemetry.outbox import Outbox, OutboxError

log = logging.getLogger(__name__)

DEFAULT_MAX_INFLIGHT: Final = 10
DEFAULT_ACK_TIMEOUT: Final = 30.0
_BACKOFF_FIRST: Final = 1.0
_BACKOFF_MAX: Final = 60.0
_IDLE_WAKE: Final = 1.0
NO_MATCHING_SUBSCRIBERS: Final = 0x10


@dataclass(frozen=True, slots=True)
class SenderStats:
    """Counters since `TelemetrySender.start`, for the agent's status."""

    connected: bool
    inflight: int
    published: int
    """Publishes handed to the client, re-sends included."""
    acked: int
    """Batches acknowledged by the broker and removed from the outbox."""
    refused: int
    """PUBACKs with a failure reason code (the batch waits and is sent again)."""
    resent: int
    """Batches sent again by this class after a refusal or an ack timeout."""


@dataclass(slots=True)
class _InFlight:
    seq: int
    since: float


class TelemetrySender:
    """Publishes the outbox's batches on ``topic`` with at most ``max_inflight`` unacknowledged.

    ``client`` is a paho-mqtt 2 client created, connected and looped by someone else.
    """

    def __init__(
        self,
        client: mqtt.Client,
        topic: str,
        outbox: Outbox,
        *,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self.client = client
        self.topic = topic
        self.outbox = outbox
        self.max_inflight = max_inflight
        self.ack_timeout = ack_timeout
        # Written by paho's thread (and the outbox's adders), read by the worker.
        self._events: collections.deque[tuple[str, int, int]] = collections.deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Owned by the worker thread only.
        self._connected = False
        self._inflight: dict[int, _InFlight] = {}  # mid -> batch
        self._inflight_seqs: set[int] = set()
        self._cursor = 0  # highest seq handed to the client in this pass
        self._backoff = 0.0
        self._resume_at = 0.0
        self._published = self._acked = self._refused = self._resent = 0

    # -- called from paho's network thread: queue and wake, nothing else ---------------------

    def on_connect(self) -> None:
        """Forward from the client's ``on_connect`` when the CONNACK reason is success."""
        self._events.append(("connect", 0, 0))
        self._wake.set()

    def on_disconnect(self) -> None:
        self._events.append(("disconnect", 0, 0))
        self._wake.set()

    def on_publish(self, mid: int, reason_code: ReasonCode | int) -> None:
        """Forward from the client's ``on_publish(client, userdata, mid, reason_code, props)``."""
        code = reason_code.value if isinstance(reason_code, ReasonCode) else int(reason_code)
        self._events.append(("publish", mid, code))
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._connected = self.client.is_connected()
        self.outbox.add_listener(self._wake.set)
        self._thread = threading.Thread(target=self._run, name="telemetry-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sending. Unacknowledged batches stay in the outbox for the next start."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake.set()
        thread.join()
        self._thread = None
        self.outbox.remove_listener(self._wake.set)

    def stats(self) -> SenderStats:
        return SenderStats(
            connected=self._connected,
            inflight=len(self._inflight),
            published=self._published,
            acked=self._acked,
            refused=self._refused,
            resent=self._resent,
        )

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        log.info("telemetry sender publishing to %s", self.topic)
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self._handle_events()
                self._expire()
                self._fill()
            except OutboxError as exc:
                log.error("telemetry sender paused: %s", exc)
                self._pause()
            except Exception:
                log.exception("telemetry sender failed; retrying")
                self._pause()
            self._wake.wait(self._sleep_time())

    def _handle_events(self) -> None:
        while self._events:
            kind, mid, code = self._events.popleft()
            if kind == "connect":
                self._connected = True
                now = time.monotonic()
                for entry in self._inflight.values():  # paho re-sends them now: restart clocks
                    entry.since = now
            elif kind == "disconnect":
                self._connected = False
            else:
                self._published_ack(mid, code)

    def _published_ack(self, mid: int, code: int) -> None:
        entry = self._inflight.pop(mid, None)
        if entry is None:  # a publish of the owner's, or a batch already given up on
            return
        self._inflight_seqs.discard(entry.seq)
        if code < 0x80 and code != NO_MATCHING_SUBSCRIBERS:
            if self.outbox.ack(entry.seq):  # False: the bound dropped it while in flight
                self._acked += 1
            self._backoff = 0.0
            return
        self._refused += 1
        if code == NO_MATCHING_SUBSCRIBERS:
            log.warning("no subscriber took telemetry batch %d; it stays queued", entry.seq)
        else:
            log.warning(
                "broker refused telemetry batch %d (0x%02x); it stays queued", entry.seq, code
            )
        self._again(entry.seq)
        if time.monotonic() >= self._resume_at:  # one backoff step per episode, not per batch
            self._pause()

    def _expire(self) -> None:
        if not self._connected:
            return
        deadline = time.monotonic() - self.ack_timeout
        for mid, entry in list(self._inflight.items()):
            if entry.since < deadline:
                log.warning(
                    "no PUBACK for telemetry batch %d in %.0fs", entry.seq, self.ack_timeout
                )
                del self._inflight[mid]
                self._inflight_seqs.discard(entry.seq)
                self._again(entry.seq)

    def _again(self, seq: int) -> None:
        """Send batch ``seq`` (and any later unacked one not in flight) again, in order."""
        self._cursor = min(self._cursor, seq - 1)
        self._resent += 1

    def _fill(self) -> None:
        while (
            self._connected
            and len(self._inflight) < self.max_inflight
            and time.monotonic() >= self._resume_at
            and not self._stopping.is_set()
        ):
            batch = self.outbox.next_batch(after=self._cursor)
            if batch is None:
                return
            self._cursor = batch.seq
            if batch.seq in self._inflight_seqs:
                continue
            info = self.client.publish(self.topic, batch.encode(), qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # Not queued by paho (e.g. its queue is full): try this batch again shortly.
                log.warning("publish of batch %d failed: %s", batch.seq, mqtt.error_string(info.rc))
                self._cursor = batch.seq - 1
                self._pause()
                return
            # NO_CONN: paho keeps the message and sends it on reconnect, like any in flight.
            self._inflight[info.mid] = _InFlight(batch.seq, time.monotonic())
            self._inflight_seqs.add(batch.seq)
            self._published += 1

    def _pause(self) -> None:
        self._backoff = min(_BACKOFF_MAX, self._backoff * 2) if self._backoff else _BACKOFF_FIRST
        self._resume_at = time.monotonic() + self._backoff

    def _sleep_time(self) -> float:
        now = time.monotonic()
        wake = now + _IDLE_WAKE
        if self._resume_at > now:
            wake = min(wake, self._resume_at)
        if self._inflight and self._connected:
            oldest = min(entry.since for entry in self._inflight.values())
            wake = min(wake, oldest + self.ack_timeout)
        return max(0.0, wake - now)

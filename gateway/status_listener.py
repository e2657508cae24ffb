"""Keeps each device's online state from its retained status messages.

Replicas share ``$share/gateway/{prefix}/+/status``. Retained messages are not delivered to shared
subscriptions (MQTT 5), so at start a replica also subscribes to the plain topic once to read the
statuses retained while it was away, then drops that subscription.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gateway.broker.mqtt_url import MqttEndpoint
from gateway.registry.devices import record_status
from provisioning.wire import DeviceStatus, Topics

log = logging.getLogger(__name__)
_SHARED, _RETAINED = 1, 2
_RETAINED_PASS_SECONDS = 10.0


class StatusListener:
    def __init__(self, endpoint: MqttEndpoint, engine: Engine, topics: Topics) -> None:
        self._engine = engine
        self._topics = topics
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=100_000)
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-status-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        endpoint.configure(self._client)
        self._client.suppress_exceptions = True
        self._client.reconnect_delay_set(1, 10)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._worker = threading.Thread(target=self._work, name="status-writer", daemon=True)
        self._connected = threading.Event()
        self._endpoint = endpoint

    def start(self, timeout: float = 10.0) -> None:
        self._worker.start()
        self._client.connect_async(self._endpoint.host, self._endpoint.port)
        self._client.loop_start()
        if not self._connected.wait(timeout):
            log.warning("status listener not connected to the broker yet; it keeps trying")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._queue.put(None)
        self._worker.join(timeout=5)

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason_code: ReasonCode,
        _properties: Any,
    ) -> None:
        if reason_code.is_failure:
            log.error("status listener: broker refused the connection: %s", reason_code)
            return
        client.subscribe(self._topics.shared("status"), qos=1, properties=_sub_id(_SHARED))
        # One pass over the retained statuses; the shared subscription carries the live ones.
        client.subscribe(self._topics.all_of("status"), qos=1, properties=_sub_id(_RETAINED))
        timer = threading.Timer(
            _RETAINED_PASS_SECONDS, client.unsubscribe, [self._topics.all_of("status")]
        )
        timer.daemon = True
        timer.start()
        self._connected.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) or []
        if _SHARED in ids or (msg.retain and _RETAINED in ids):
            self._queue.put((msg.topic, bytes(msg.payload)))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            topic, payload = item
            try:
                self._store(topic, payload)
            except Exception:
                log.exception("could not store the status from %s", topic)

    def _store(self, topic: str, payload: bytes) -> None:
        parsed = self._topics.parse(topic)
        if parsed is None:
            return
        device_id, _ = parsed
        if not payload:  # a cleared retained status (revoked device)
            return
        try:
            status = DeviceStatus.model_validate_json(payload)
        except ValidationError as exc:
            log.warning("device %s sent a malformed status: %s", device_id, exc.errors()[:1])
            return
        with Session(self._engine) as session:
            if not record_status(
                session,
                device_id,
                status.state == "online",
                status.agent_version,
                status.node_red_version,
            ):
                log.info("status from unknown or revoked device %s ignored", device_id)


def _sub_id(value: int) -> Properties:
    props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
    props.SubscriptionIdentifier = value
    return props

"""Keeps each device's online state from its retained status messages.

Replicas share ``$share/gateway/{prefix}/+/status``. Retained messages are not delivered to shared
subscriptions (MQTT 5), so at start a replica also subscribes to the plain topic once to read the
statuses retained while it was away, then drops that subscription.
"""

from __future__ import annotations

import logging
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gateway.device_messages import DeviceMessages
from gateway.registry.devices import record_status
from provisioning.mqtt import Listener, MqttEndpoint, Received
from provisioning.wire import Topics

log = logging.getLogger(__name__)
_SHARED, _RETAINED = 1, 2
_RETAINED_PASS_SECONDS = 10.0


class StatusListener(Listener):
    def __init__(
        self,
        endpoint: MqttEndpoint,
        engine: Engine,
        topics: Topics,
        messages: DeviceMessages | None = None,
    ) -> None:
        super().__init__(endpoint, "status", "status listener")
        self._engine = engine
        self._topics = topics
        self._messages = messages or DeviceMessages()

    def subscribe(self, client: mqtt.Client) -> None:
        client.subscribe(self._topics.shared("status"), qos=1, properties=_sub_id(_SHARED))
        # One pass over the retained statuses; the shared subscription carries the live ones.
        client.subscribe(self._topics.all_of("status"), qos=1, properties=_sub_id(_RETAINED))
        timer = threading.Timer(
            _RETAINED_PASS_SECONDS, client.unsubscribe, [self._topics.all_of("status")]
        )
        timer.daemon = True
        timer.start()

    def wanted(self, msg: mqtt.MQTTMessage) -> bool:
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) or []
        return _SHARED in ids or (msg.retain and _RETAINED in ids)

    def store(self, group: list[Received]) -> None:
        for topic, payload in group:
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
        status = self._messages.status(device_id, payload)
        if status is None:
            return
        with Session(self._engine) as session:
            if not record_status(session, device_id, status):
                self._messages.unknown_device("status", device_id)


def _sub_id(value: int) -> Properties:
    props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
    props.SubscriptionIdentifier = value
    return props

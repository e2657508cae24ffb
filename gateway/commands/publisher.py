"""The gateway's MQTT connection for sending commands (QoS 1, each publish waits for its PUBACK)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from gateway.broker.mqtt_url import MqttEndpoint
from gateway.errors import Unavailable
from provisioning.wire import Topics

log = logging.getLogger(__name__)


class CommandPublisher:
    """The gateway's connection for sending commands (QoS 1, waits for the broker's PUBACK)."""

    def __init__(self, endpoint: MqttEndpoint, topics: Topics, timeout: float = 5.0) -> None:
        self._topics = topics
        self._timeout = timeout
        self._endpoint = endpoint
        self._connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-cmd-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        endpoint.configure(self._client)
        self._client.suppress_exceptions = True
        self._client.reconnect_delay_set(1, 5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect

    def start(self) -> None:
        self._client.connect_async(self._endpoint.host, self._endpoint.port)
        self._client.loop_start()
        self._connected.wait(self._timeout)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason_code: ReasonCode, _p: Any
    ) -> None:
        if reason_code.is_failure:
            log.error("command publisher refused by the broker: %s", reason_code)
        else:
            self._connected.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self._connected.clear()

    def publish_many(self, messages: Sequence[tuple[str, str]]) -> list[bool]:
        """Publish ``(device_id, token)`` commands together, then wait for their PUBACKs.

        Returns, per message, whether the broker confirmed it within the timeout (unconfirmed
        ones may still arrive). Raises `Unavailable` when not connected: nothing was sent.
        """
        if not self._connected.wait(self._timeout):
            raise Unavailable("broker_unavailable", "not connected to the broker; try again")
        infos = [self._client.publish(self._topics.cmd(d), token, qos=1) for d, token in messages]
        deadline = time.monotonic() + self._timeout
        confirmed = []
        for info in infos:
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            confirmed.append(info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published())
        return confirmed

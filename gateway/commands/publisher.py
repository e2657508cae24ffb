"""The gateway's MQTT connection for sending commands (QoS 1, each publish waits for its PUBACK)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt

from gateway.errors import Unavailable
from provisioning.mqtt import MqttEndpoint, make_client, start_client, stop_client, unique_client_id
from provisioning.wire import Topics


class CommandPublisher:
    """The gateway's connection for sending commands (QoS 1, waits for the broker's PUBACK)."""

    def __init__(self, endpoint: MqttEndpoint, topics: Topics, timeout: float = 5.0) -> None:
        self._topics = topics
        self._timeout = timeout
        self._endpoint = endpoint
        self._connected = threading.Event()
        self._client = make_client(
            endpoint,
            unique_client_id("cmd"),
            name="command publisher",
            on_connected=lambda _client, _flags: self._connected.set(),
            max_reconnect_delay=5,
        )
        self._client.on_disconnect = self._on_disconnect

    def start(self) -> None:
        start_client(self._client, self._endpoint)
        self._connected.wait(self._timeout)

    def stop(self) -> None:
        stop_client(self._client)

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

"""A real, gateway-supervised Mosquitto for tests, and a small paho-mqtt 2 probe client.

`running_broker()` starts a `MosquittoSupervisor` on a free port in a temporary data directory
(TLS, dynamic security, persistence: exactly what `edgefleet gateway run` starts) and stops it and
removes the directory afterwards, also when the test fails. `MqttProbe` is a device- or
gateway-side client that records what happens to it so tests can wait on conditions.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.broker.dynsec import DynsecAdmin, generate_password
from gateway.broker.mosquitto import MosquittoSupervisor
from provisioning.mqtt import MqttEndpoint
from tests.support.waiting import free_port, wait_for

#: How long a test's MQTT client waits before it reconnects (paho's backoff, pinned). An agent
#: starts at 1 s and backs off; tests wait for what happens, not for when, and a client closed
#: while it waits to reconnect takes that long to stop (paho sleeps it out).
RECONNECT_DELAY_S = 0.25


@contextmanager
def running_broker(
    data_dir: Path | None = None,
    *,
    port: int | None = None,
    topic_prefix: str = "fleet",
    hostnames: Sequence[str] = (),
) -> Iterator[MosquittoSupervisor]:
    """Start a supervised Mosquitto (in `data_dir`, or a fresh temporary one) and yield it."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-broker-") as tmp:
        supervisor = MosquittoSupervisor(
            data_dir if data_dir is not None else Path(tmp),
            port=port if port is not None else free_port(),
            bind="127.0.0.1",
            hostnames=hostnames,
            topic_prefix=topic_prefix,
        )
        supervisor.start()
        try:
            yield supervisor
        finally:
            supervisor.stop()


def device_endpoint(broker: MosquittoSupervisor, device_id: str, password: str) -> MqttEndpoint:
    """The broker endpoint with a device's credential instead of the gateway's."""
    return replace(broker.endpoint, username=device_id, password=password)


def enroll_device(broker: MosquittoSupervisor, device_id: str) -> MqttEndpoint:
    """Create a broker credential for `device_id` and return the endpoint the device would use."""
    password = generate_password()
    with DynsecAdmin(broker.endpoint) as admin:
        admin.add_device(device_id, password)
    return device_endpoint(broker, device_id, password)


class MqttProbe:
    """A paho-mqtt 2 (MQTT v5) client that records connects, disconnects and messages.

    paho reconnects it automatically (as an agent would) until `close()`.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        client_id: str,
        *,
        clean_start: bool = True,
        session_expiry: int = 0,
    ) -> None:
        self.endpoint = endpoint
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self._lock = threading.Lock()
        self.connect_results: list[ReasonCode] = []
        self.disconnects: list[ReasonCode] = []
        self.messages: list[mqtt.MQTTMessage] = []
        self._acks: dict[int, list[ReasonCode]] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        endpoint.configure(self.client)
        self.client.reconnect_delay_set(min_delay=RECONNECT_DELAY_S, max_delay=RECONNECT_DELAY_S)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    # callbacks

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        with self._lock:
            self.connect_results.append(rc)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        with self._lock:
            self.disconnects.append(rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        codes: list[ReasonCode],
        props: Properties | None,
    ) -> None:
        with self._lock:
            self._acks[mid] = list(codes)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Properties | None
    ) -> None:
        with self._lock:
            self._acks[mid] = [rc]

    # actions

    @property
    def connected_count(self) -> int:
        with self._lock:
            return sum(1 for rc in self.connect_results if not rc.is_failure)

    def connect(self, timeout: float = 5.0) -> ReasonCode:
        """Connect and return the CONNACK reason code (success or refusal)."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry
        self.client.connect_async(
            self.endpoint.host,
            self.endpoint.port,
            keepalive=30,
            clean_start=self.clean_start,
            properties=props,
        )
        self.client.loop_start()
        wait_for(lambda: self.connect_results, timeout, what=f"CONNACK for {self.client}")
        return self.connect_results[0]

    def _wait_ack(self, mid: int, timeout: float) -> list[ReasonCode]:
        def ack() -> list[ReasonCode] | None:
            with self._lock:
                return self._acks.get(mid)

        return wait_for(ack, timeout, what=f"ack for message id {mid}")

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> ReasonCode:
        """Subscribe and return the SUBACK reason code."""
        result, mid = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(result)
        assert mid is not None
        return self._wait_ack(mid, timeout)[0]

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> ReasonCode:
        """Publish with QoS 1 or 2, wait for the ack and return its reason code."""
        if qos not in (1, 2):
            raise ValueError(
                "MqttProbe.publish waits for an ack; use probe.client.publish for QoS 0"
            )
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        return self._wait_ack(info.mid, 5.0)[0]

    def received(self, topic: str) -> list[bytes]:
        with self._lock:
            return [bytes(m.payload) for m in self.messages if m.topic == topic]

    def close(self) -> None:
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

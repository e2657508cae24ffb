"""Everything a running gateway holds, built once at start and handed to the app (no globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from gateway.broker.admin import BrokerAdmin, DeviceBrokerInfo
from gateway.commands.publisher import CommandPublisher
from gateway.commands.replies import ReplyHooks
from gateway.errors import Unavailable
from gateway.identity import GatewayIdentity
from gateway.leader import SingletonJobs
from gateway.settings import GatewaySettings
from provisioning.mqtt import MqttEndpoint
from provisioning.wire import Topics


@dataclass
class GatewayRuntime:
    settings: GatewaySettings
    engine: Engine
    identity: GatewayIdentity
    broker: BrokerAdmin
    broker_info: DeviceBrokerInfo
    publisher: CommandPublisher | None = None
    hooks: ReplyHooks = field(default_factory=ReplyHooks)
    jobs: SingletonJobs | None = None
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)
    """This gateway's Prometheus metrics (served at /metrics); never the global registry."""
    endpoint: MqttEndpoint | None = None
    """How this gateway's own MQTT clients reach the broker (None: it has none, e.g. in tests
    of the HTTP API alone)."""

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.topic_prefix)

    def mqtt_endpoint(self) -> MqttEndpoint:
        if self.endpoint is None:
            raise RuntimeError("this gateway runtime has no MQTT endpoint")
        return self.endpoint

    def command_publisher(self) -> CommandPublisher:
        if self.publisher is None:
            raise Unavailable("no_publisher", "this gateway does not send commands")
        return self.publisher

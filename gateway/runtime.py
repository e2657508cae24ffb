"""Everything a running gateway holds, built once at start and handed to the app (no globals)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.engine import Engine

from gateway.broker.admin import BrokerAdmin, DeviceBrokerInfo
from gateway.commands.publisher import CommandPublisher
from gateway.commands.replies import ReplyHooks
from gateway.enroll_guard import EnrollGuard
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
    http_refused: Counter | None = None
    enroll_guard: EnrollGuard | None = None
    """Failed enrollments per client address (built from the settings on first use)."""
    devices_first: Callable[[], bool] | None = None
    """True while the MQTT side trails the machines (the telemetry ingest sets it up): the API
    lets new requests wait meanwhile, so its threads leave the interpreter to the ingest."""
    mqtt_engine: Engine | None = None
    """The MQTT side's own database connections (ingest, status, replies), which API traffic
    cannot take; None: it shares `engine` (tests of one part alone)."""

    def http_refusals(self) -> Counter:
        """HTTP requests refused before they ran, by reason (one counter per runtime, however
        many apps are made on it)."""
        if self.http_refused is None:
            self.http_refused = Counter(
                "edgefleet_http_refused",
                "HTTP requests refused before they ran, by reason (overloaded: 503 with "
                "Retry-After; body_timeout: 408).",
                ["reason"],
                registry=self.metrics,
            )
        return self.http_refused

    def enrollments(self) -> EnrollGuard:
        if self.enroll_guard is None:
            limit = self.settings.enroll_failures_per_minute
            self.enroll_guard = EnrollGuard(limit, registry=self.metrics)
        return self.enroll_guard

    @property
    def listener_engine(self) -> Engine:
        return self.mqtt_engine if self.mqtt_engine is not None else self.engine

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

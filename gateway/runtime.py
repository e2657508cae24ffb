"""Everything a running gateway holds, built once at start and handed to the app (no globals)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from gateway.broker_admin import BrokerAdmin, DeviceBrokerInfo
from gateway.identity import GatewayIdentity
from gateway.settings import GatewaySettings
from provisioning.wire import Topics


@dataclass
class GatewayRuntime:
    settings: GatewaySettings
    engine: Engine
    identity: GatewayIdentity
    broker: BrokerAdmin
    broker_info: DeviceBrokerInfo

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.topic_prefix)

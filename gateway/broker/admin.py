"""What the registry needs from a broker: per-device credentials that it can add and remove.

The embedded and external Mosquitto implement it with the dynamic-security plugin
(`gateway.broker.dynsec.DynsecAdmin`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class BrokerAdmin(Protocol):
    def add_device(self, device_id: str, password: str) -> None: ...

    def remove_device(self, device_id: str) -> None: ...

    def list_devices(self) -> list[str]: ...


@dataclass(frozen=True)
class DeviceBrokerInfo:
    """Where devices connect, as told to them at enrollment."""

    host: str | None
    port: int
    tls: bool
    ca_pem: str | None

"""What the registry needs from a broker, and what it tells machines about it.

`BrokerAdmin`: per-device credentials the registry adds at enrollment and removes at revocation.
Mosquitto (embedded or external) implements it with its dynamic-security plugin
(`gateway.broker.dynsec.DynsecAdmin`), EMQX by asking the gateway's HTTP hooks, which read the
registry (`gateway.broker.emqx.EmqxBrokerAdmin`). `DeviceBrokerInfo`: where machines connect.
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

"""The tunnel commands: what the gateway signs and the agent runs to open and close a tunnel.

The gateway opens a tunnel in two signed steps so its hub knows the device's key before the
device dials (a handshake to a peer the hub does not know yet is retried only after ~5 s):

* `tunnel.open` (`TunnelOpenArgs`): the agent checks its owner's policy, makes a key pair for
  this session and brings its interface up without a peer; it answers with the session's public
  key (`TunnelOpenResult`), or `refused` with the reason;
* `tunnel.connect` (`TunnelRef`): the agent adds the hub as its only peer and dials out;
* `tunnel.close` (`TunnelCloseArgs`): the agent removes everything of that session
  (`TunnelCloseResult.closed`).
"""

from __future__ import annotations

from collections.abc import Set
from ipaddress import IPv4Address
from typing import Annotated, ClassVar

from pydantic import (
    ConfigDict,
    Field,
    PlainSerializer,
    StrictFloat,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from provisioning.commands import CommandArgs, CommandResult
from provisioning.wireguard.config import DEFAULT_KEEPALIVE, DEFAULT_MTU
from provisioning.wireguard.keys import normalize_key

__all__ = [
    "TUNNEL_ID_PATTERN",
    "TunnelCloseArgs",
    "TunnelCloseResult",
    "TunnelOpenArgs",
    "TunnelOpenResult",
    "TunnelRef",
]

#: Tunnel ids name nftables chains on both sides: 1-64 letters, digits, '_' or '-'.
TUNNEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

TunnelId = Annotated[str, StringConstraints(pattern=TUNNEL_ID_PATTERN)]
Port = Annotated[StrictInt, Field(gt=0, lt=65536)]


def _sorted_ports(ports: Set[int]) -> list[int]:
    return sorted(ports)


Ports = Annotated[
    frozenset[Port], Field(min_length=1), PlainSerializer(_sorted_ports, return_type=list[int])
]


class TunnelOpenArgs(CommandArgs):
    """What a `tunnel.open` asks the device to bring up: its session."""

    what: ClassVar[str] = "tunnel request"

    tunnel_id: TunnelId
    device_ip: IPv4Address
    engineer_ip: IPv4Address
    hub_ip: IPv4Address
    hub_public_key: str = Field(description="The hub's WireGuard public key (base64).")
    hub_endpoint: str = Field(description="HOST:PORT (UDP) the device dials.")
    ports: Ports = Field(description="The ports the engineer may reach on the device.")
    expires_at: StrictFloat = Field(description="Unix time; the device drops its side then.")
    mtu: Annotated[StrictInt, Field(ge=576, le=65535)] = DEFAULT_MTU
    keepalive: Annotated[StrictInt, Field(gt=0, le=65535)] = DEFAULT_KEEPALIVE

    @field_validator("hub_public_key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        return normalize_key(value, "hub public key")

    @field_validator("hub_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"hub endpoint {value!r} must be HOST:PORT with a port 1..65535")
        return value

    @model_validator(mode="after")
    def _check_addresses(self) -> TunnelOpenArgs:
        if len({self.device_ip, self.engineer_ip, self.hub_ip}) != 3:
            raise ValueError("device, engineer and hub addresses must all differ")
        return self


class TunnelRef(CommandArgs):
    """`tunnel.connect`: which prepared session to dial."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tunnel_id: str


class TunnelCloseArgs(TunnelRef):
    """`tunnel.close`: which session to remove, and why (for the device's log)."""

    reason: str | None = None


class TunnelOpenResult(CommandResult):
    tunnel_id: str | None = None
    public_key: str | None = Field(
        default=None, description="The session's WireGuard public key (on success)."
    )


class TunnelCloseResult(CommandResult):
    closed: bool = Field(default=False, description="A session was open here and was removed.")

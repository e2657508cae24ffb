"""Request and response bodies of the tunnel API (they make its part of the OpenAPI document)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.tunnels.addresses import PoolUsage
from gateway.tunnels.models import HubRecord, TunnelRecord
from provisioning.wireguard.keys import normalize_public_key

Port = Annotated[int, Field(ge=1, le=65535)]
WG_KEY_PATTERN = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
"""32 bytes in standard base64, as `wg pubkey` prints them."""


class TunnelOpen(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="The machine to reach: its id or name."
    )
    ports: list[Port] = Field(
        min_length=1, max_length=32, description="TCP/UDP ports the engineer may reach."
    )
    ttl_seconds: int = Field(
        default=3600, gt=0, description="Lifetime; at most the gateway's maximum (default 12 h)."
    )
    reason: str = Field(default="", max_length=200, description="Why (for the audit log).")
    engineer_public_key: str = Field(
        json_schema_extra={"pattern": WG_KEY_PATTERN},  # checked by _key, with the reason
        description="The engineer's WireGuard public key (44 base64 characters). The private "
        "key stays on the engineer's machine.",
    )
    open_timeout: float | None = Field(
        default=None,
        gt=0,
        le=600,
        description="Seconds to wait for the machine to come up; at most (and by default) the "
        "gateway's open timeout (20 s unless configured).",
    )
    wait: bool = Field(
        default=True,
        description="Answer once the machine is up (first handshake), or with a clear error "
        "after the gateway's open timeout; false answers at once (poll GET /tunnels/{id}).",
    )

    @field_validator("ports")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        return sorted(set(value))

    @field_validator("engineer_public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        key = normalize_public_key(value, "engineer public key")
        if re.fullmatch(WG_KEY_PATTERN, value) is None:  # spaces around it, say
            raise ValueError(
                "engineer public key must be the 44 characters `wg pubkey` prints, nothing else"
            )
        return key


class TunnelClose(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=200)


class TunnelOut(BaseModel):
    """One tunnel. The engineer's config is built from device_ip, engineer_ip and the hub fields."""

    id: str
    device_id: str
    state: str = Field(
        description="requested, prepared, dialing, open, closing, closed, expired or failed"
    )
    actor: str
    reason: str
    ports: list[int]
    device_ip: str
    engineer_ip: str
    engineer_public_key: str
    hub_ip: str
    hub_public_key: str
    hub_endpoint: str
    mtu: int
    created_at: datetime
    expires_at: datetime
    opened_at: datetime | None
    device_handshake_at: datetime | None = Field(
        description="Last WireGuard handshake of the machine with the hub: its liveness."
    )
    device_endpoint: str | None
    closed_at: datetime | None
    closed_by: str | None
    close_reason: str | None
    failure: str | None
    device_closed_at: datetime | None = Field(
        description="When the machine confirmed it dropped its side."
    )
    bytes_from_device: int
    bytes_to_device: int

    @classmethod
    def of(cls, row: TunnelRecord) -> TunnelOut:
        return cls.model_validate(row, from_attributes=True)


class HubOut(BaseModel):
    public_key: str
    endpoint: str
    interface: str
    started_at: datetime
    heartbeat_at: datetime

    @classmethod
    def of(cls, row: HubRecord) -> HubOut:
        return cls.model_validate(row, from_attributes=True)


class PoolOut(BaseModel):
    network: str
    hub_ip: str
    size: int
    in_use: int
    quarantined: int = Field(description="Released recently; not handed out again yet.")
    free: int
    next_release_at: datetime | None
    hub: HubOut | None

    @classmethod
    def of(cls, usage: PoolUsage, hub: HubRecord | None) -> PoolOut:
        return cls(
            network=str(usage.network),
            hub_ip=str(usage.hub_ip),
            size=usage.size,
            in_use=usage.in_use,
            quarantined=usage.quarantined,
            free=usage.free,
            next_release_at=usage.next_release_at,
            hub=HubOut.of(hub) if hub else None,
        )

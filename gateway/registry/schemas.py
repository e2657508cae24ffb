"""Request and response bodies of the operator API (the OpenAPI document is built from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.registry.models import ApiToken, Device, ProvisioningToken, Role
from gateway.registry.tokens import token_state
from provisioning.wire import DeviceName, Tags


class DeviceOut(BaseModel):
    id: str
    name: str
    tags: dict[str, str]
    state: str
    online: bool
    last_seen: datetime | None
    enrolled_at: datetime
    revoked_at: datetime | None
    agent_version: str | None
    node_red_version: str | None
    hostname: str | None
    key_fingerprint: str

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        return cls.model_validate(device, from_attributes=True)


class ProvisioningTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_seconds: int = Field(default=3600, gt=0, description="How long the token may be used.")
    uses: int = Field(default=1, gt=0, le=100_000, description="How many machines it enrolls.")
    tags: Tags = Field(default_factory=dict, description="Given to every machine it enrolls.")
    note: str = Field(default="", max_length=200)


class ProvisioningTokenOut(BaseModel):
    id: str
    tags: dict[str, str]
    uses: int
    max_uses: int
    state: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    created_by: str
    note: str

    @classmethod
    def of(cls, row: ProvisioningToken) -> ProvisioningTokenOut:
        return cls(
            id=row.id,
            tags=row.tags,
            uses=row.uses,
            max_uses=row.max_uses,
            state=token_state(row),
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            created_by=row.created_by,
            note=row.note,
        )


class ProvisioningTokenCreated(ProvisioningTokenOut):
    token: str = Field(description="The secret. It is shown once and stored only as a hash.")


class ApiTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: DeviceName
    role: Role


class ApiTokenOut(BaseModel):
    id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None
    created_by: str

    @classmethod
    def of(cls, row: ApiToken) -> ApiTokenOut:
        return cls.model_validate(row, from_attributes=True)


class ApiTokenCreated(ApiTokenOut):
    token: str = Field(description="The secret. It is shown once and stored only as a hash.")


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


class DeviceSelf(BaseModel):
    """What an agent learns about itself."""

    id: str
    name: str
    tags: dict[str, str]
    state: str


class CommandOut(BaseModel):
    id: str
    device_id: str
    kind: str
    args: dict[str, Any]
    state: str
    detail: str | None
    result: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    actor: str
    ref: str | None

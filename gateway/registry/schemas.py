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
    customer_id: str | None = Field(description="The owner; null: the manufacturer's stock.")
    customer: str | None = Field(default=None, description="The owner's name.")
    claimable: bool = Field(default=False, description="In stock with an unused claim code.")
    node_red_up: bool | None = Field(description="Node-RED answered the agent's last probe.")
    outbox_queued: int | None = Field(description="Telemetry samples waiting on the machine.")
    outbox_dropped: int | None = Field(description="Samples the machine had to drop.")
    release: str | None = Field(
        default=None, description="The release its latest succeeded deployment put on it."
    )

    @classmethod
    def of(
        cls, device: Device, customer: str | None = None, release: str | None = None
    ) -> DeviceOut:
        out = cls.model_validate(device, from_attributes=True)
        out.customer = customer
        out.release = release
        out.claimable = device.customer_id is None and device.claim_code_hash is not None
        return out


class ProvisioningTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_seconds: int = Field(default=3600, gt=0, description="How long the token may be used.")
    uses: int = Field(default=1, gt=0, le=100_000, description="How many machines it enrolls.")
    tags: Tags = Field(default_factory=dict, description="Given to every machine it enrolls.")
    note: str = Field(default="", max_length=200)
    customer: str | None = Field(
        default=None,
        max_length=64,
        description="The customer (name or id) its machines belong to; default: the stock, "
        "where each machine gets a claim code.",
    )


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
    customer_id: str | None = None

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
            customer_id=row.customer_id,
        )


class ProvisioningTokenCreated(ProvisioningTokenOut):
    token: str = Field(description="The secret. It is shown once and stored only as a hash.")


class ApiTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: DeviceName
    role: Role | None = Field(
        default=None, description="At most the caller's role (default: the caller's)."
    )
    ttl_seconds: int | None = Field(
        default=None, gt=0, description="Lifetime (default 90 days, at most api_token_max_ttl)."
    )


class ApiTokenOut(BaseModel):
    id: str
    name: str
    role: Role
    kind: str = Field(description="user (a person's), bootstrap, or legacy (from before users).")
    user_id: str | None
    state: str = Field(description="active, expired or revoked.")
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_by: str

    @classmethod
    def of(cls, row: ApiToken) -> ApiTokenOut:
        from gateway.accounts.api_tokens import state

        fields = {name: getattr(row, name, None) for name in cls.model_fields if name != "state"}
        return cls.model_validate({**fields, "state": state(row)})


class ApiTokenCreated(ApiTokenOut):
    token: str = Field(description="The secret. It is shown once and stored only as a hash.")


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str = Field(description="Who acted: an email, a token, the gateway.")
    user_id: str | None = Field(description="The person who acted, if a person did.")
    token_id: str | None = Field(description="The API token they acted with, if any.")
    customer_id: str | None = Field(description="Whose machine or account it was about.")
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

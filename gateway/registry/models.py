"""The registry: devices, provisioning tokens, operator API tokens, used JWT ids, the audit log.

Tables are SQLModel classes; their schema is created and changed only by the Alembic migrations in
`gateway/migrations` (one set for SQLite and PostgreSQL). Telemetry does not live here: it goes
through SQLAlchemy Core on its hot path.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import JSON, Column, Field, SQLModel

from gateway.db import utc_column as _ts


class Role(StrEnum):
    """A person's role (DESIGN.md, "People and customers"); what each may do is in
    `gateway.accounts.permissions`. The manufacturer's roles come first, then the customers'."""

    viewer = "viewer"
    support = "support"
    operator = "operator"
    admin = "admin"
    customer_viewer = "customer-viewer"
    customer_admin = "customer-admin"

    @property
    def is_customer(self) -> bool:
        return self in (Role.customer_viewer, Role.customer_admin)

    @property
    def rank(self) -> int:
        """Order within its organisation: a token's role may not rank above its user's."""
        chain = _CUSTOMER_CHAIN if self.is_customer else _MANUFACTURER_CHAIN
        return chain.index(self)

    def within(self, other: Role) -> bool:
        """This role is `other` or less, in the same organisation."""
        return self.is_customer == other.is_customer and self.rank <= other.rank


_MANUFACTURER_CHAIN = (Role.viewer, Role.support, Role.operator, Role.admin)
_CUSTOMER_CHAIN = (Role.customer_viewer, Role.customer_admin)


class DeviceState(StrEnum):
    active = "active"
    revoked = "revoked"


class Device(SQLModel, table=True):
    __tablename__ = "devices"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=64, index=True)
    public_key: str = Field(sa_column=Column(sa.Text(), nullable=False))
    key_fingerprint: str = Field(max_length=32, unique=True)
    tags: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: DeviceState = Field(
        default=DeviceState.active, sa_column=Column(sa.String(16), nullable=False)
    )
    online: bool = False
    last_seen: datetime | None = _ts(nullable=True)
    enrolled_at: datetime = _ts()
    revoked_at: datetime | None = _ts(nullable=True)
    agent_version: str | None = Field(default=None, max_length=64)
    node_red_version: str | None = Field(default=None, max_length=64)
    hostname: str | None = Field(default=None, max_length=255)
    provisioning_token_id: str | None = Field(default=None, max_length=32)
    # SHA-256 of the device's broker password, for brokers that ask the gateway (EMQX hooks).
    broker_password_hash: str | None = Field(default=None, max_length=64)
    # The customer that owns the machine; NULL: the manufacturer's stock (gateway.accounts).
    customer_id: str | None = Field(default=None, max_length=32, index=True)
    # SHA-256 of the claim code a stock machine got at enrollment (for its label); one use.
    claim_code_hash: str | None = Field(default=None, max_length=64, unique=True)
    # Health from the agent's status message (provisioning.wire.DeviceStatus).
    node_red_up: bool | None = None
    outbox_queued: int | None = None
    outbox_dropped: int | None = None


class ProvisioningToken(SQLModel, table=True):
    __tablename__ = "provisioning_tokens"

    id: str = Field(primary_key=True, max_length=32)
    token_hash: str = Field(max_length=64, unique=True)
    tags: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    max_uses: int
    uses: int = 0
    created_at: datetime = _ts()
    expires_at: datetime = _ts()
    revoked_at: datetime | None = _ts(nullable=True)
    created_by: str = Field(max_length=64)
    note: str = Field(default="", max_length=200)
    # Machines it enrolls belong to this customer; NULL: into stock, each with a claim code.
    customer_id: str | None = Field(default=None, max_length=32)


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=64)
    token_hash: str = Field(max_length=64, unique=True)
    role: Role = Field(sa_column=Column(sa.String(16), nullable=False))
    created_at: datetime = _ts()
    revoked_at: datetime | None = _ts(nullable=True)
    created_by: str = Field(max_length=64)
    # user: a person's own token; bootstrap: from `admin create-token`; legacy: made before
    # there were users (an upgraded install's tokens keep working with their role).
    kind: str = Field(default="user", max_length=16)
    user_id: str | None = Field(default=None, max_length=32, index=True)
    expires_at: datetime | None = _ts(nullable=True)
    last_used_at: datetime | None = _ts(nullable=True)


class UsedJti(SQLModel, table=True):
    """JWT ids already seen, kept until the token would have expired anyway (replay guard)."""

    __tablename__ = "used_jtis"

    jti: str = Field(primary_key=True, max_length=128)
    device_id: str = Field(max_length=64)
    expires_at: datetime = _ts(index=True)


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _ts(index=True)
    actor: str = Field(max_length=80)
    action: str = Field(max_length=64, index=True)
    target: str = Field(default="", max_length=128, index=True)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # Who exactly (the person and the token they used) and whose machine it was about.
    user_id: str | None = Field(default=None, max_length=32)
    token_id: str | None = Field(default=None, max_length=32)
    customer_id: str | None = Field(default=None, max_length=32, index=True)

"""Tables of people and customers: customers, users, browser sessions, login throttles, support
consent grants and pending single sign-on logins. Schema from migration 0008_accounts.

Everything a person's session needs is here, in the database every replica shares: a replica
keeps nothing of a session in memory.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Column, Field, SQLModel

from gateway.db import UTCDateTime
from gateway.registry.models import Role


def _ts(nullable: bool = False, index: bool = False) -> Any:
    if nullable:
        return Field(default=None, sa_column=Column(UTCDateTime(), nullable=True, index=index))
    return Field(sa_column=Column(UTCDateTime(), nullable=False, index=index))


class Customer(SQLModel, table=True):
    """An organisation that owns machines; its users see only its machines."""

    __tablename__ = "customers"

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=64, unique=True)
    #: A support tunnel to its machines opens only inside a window it granted.
    consent_required: bool = False
    created_at: datetime = _ts()
    created_by: str = Field(max_length=64)


class User(SQLModel, table=True):
    """A person: the manufacturer's staff (customer_id NULL) or a customer's."""

    __tablename__ = "users"
    __table_args__ = (
        sa.UniqueConstraint("oidc_issuer", "oidc_subject", name="uq_users_oidc_identity"),
    )

    id: str = Field(primary_key=True, max_length=32)
    email: str = Field(max_length=254, unique=True)
    role: Role = Field(sa_column=Column(sa.String(16), nullable=False))
    customer_id: str | None = Field(
        default=None, foreign_key="customers.id", max_length=32, index=True
    )
    #: argon2id (PHC string); NULL: the user signs in only through single sign-on.
    password_hash: str | None = Field(default=None, max_length=255)
    oidc_issuer: str | None = Field(default=None, max_length=255)
    oidc_subject: str | None = Field(default=None, max_length=255)
    created_at: datetime = _ts()
    created_by: str = Field(max_length=64)
    disabled_at: datetime | None = _ts(nullable=True)
    last_login_at: datetime | None = _ts(nullable=True)


class BrowserSession(SQLModel, table=True):
    """A signed-in browser. The cookie holds a random secret; only its SHA-256 is stored."""

    __tablename__ = "browser_sessions"

    id_hash: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(foreign_key="users.id", max_length=32, index=True)
    #: The synchronizer token every cookie-authenticated change must carry (gateway.accounts.csrf).
    csrf_token: str = Field(max_length=64)
    created_at: datetime = _ts()
    last_seen_at: datetime = _ts()
    expires_at: datetime = _ts(index=True)
    ended_at: datetime | None = _ts(nullable=True)
    address: str = Field(default="", max_length=64)
    user_agent: str = Field(default="", max_length=200)
    #: password or oidc
    method: str = Field(default="password", max_length=16)


class LoginThrottle(SQLModel, table=True):
    """Failed logins per account or per address in the current window (shared by replicas)."""

    __tablename__ = "login_throttles"

    key: str = Field(primary_key=True, max_length=300)
    failures: int = 0
    window_start: datetime = _ts()
    blocked_until: datetime | None = _ts(nullable=True)


class SupportGrant(SQLModel, table=True):
    """A window in which the manufacturer's support may open tunnels to a customer's machines."""

    __tablename__ = "support_grants"

    id: str = Field(primary_key=True, max_length=32)
    customer_id: str = Field(foreign_key="customers.id", max_length=32, index=True)
    starts_at: datetime = _ts()
    ends_at: datetime = _ts()
    granted_by: str = Field(max_length=64)
    note: str = Field(default="", max_length=200)
    revoked_at: datetime | None = _ts(nullable=True)
    revoked_by: str | None = Field(default=None, max_length=64)


class OidcLogin(SQLModel, table=True):
    """A single sign-on login on its way through the provider (state, nonce, PKCE verifier)."""

    __tablename__ = "oidc_logins"

    state: str = Field(primary_key=True, max_length=64)
    nonce: str = Field(max_length=64)
    code_verifier: str = Field(max_length=128)
    redirect_uri: str = Field(max_length=500)
    next_path: str = Field(default="/", max_length=500)
    created_at: datetime = _ts(index=True)

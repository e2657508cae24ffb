"""Provisioning tokens (to enroll machines). API tokens: `gateway.accounts.api_tokens`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.db import utcnow
from gateway.errors import Invalid, NotFound, Unauthorized
from gateway.registry import audit
from gateway.registry.models import ProvisioningToken
from provisioning.secrets import PROVISIONING_TOKEN_PREFIX, hash_secret, new_secret


def _short_id(prefix: str) -> str:
    return prefix + secrets.token_hex(5)


@dataclass(frozen=True)
class IssuedToken:
    """A token as created: the only moment its secret exists outside the holder's hands."""

    id: str
    token: str
    expires_at: datetime | None


def create_provisioning_token(
    session: Session,
    *,
    actor: str,
    ttl_seconds: int,
    max_ttl_seconds: int,
    uses: int,
    tags: dict[str, str],
    note: str = "",
    customer_id: str | None = None,
) -> tuple[IssuedToken, ProvisioningToken]:
    if not 0 < ttl_seconds <= max_ttl_seconds:
        raise Invalid("bad_ttl", f"ttl must be between 1s and {max_ttl_seconds}s")
    if not 0 < uses <= 100_000:
        raise Invalid("bad_uses", "uses must be between 1 and 100000")
    secret = new_secret(PROVISIONING_TOKEN_PREFIX)
    now = utcnow()
    row = ProvisioningToken(
        id=_short_id("pt-"),
        token_hash=hash_secret(secret),
        tags=tags,
        max_uses=uses,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds),
        created_by=actor,
        note=note,
        customer_id=customer_id,
    )
    session.add(row)
    audit.record(
        session,
        actor,
        "provisioning_token.create",
        row.id,
        customer_id=customer_id,
        tags=tags,
        uses=uses,
        ttl=ttl_seconds,
    )
    session.commit()
    return IssuedToken(row.id, secret, row.expires_at), row


def list_provisioning_tokens(session: Session) -> list[ProvisioningToken]:
    query = select(ProvisioningToken).order_by(col(ProvisioningToken.created_at).desc())
    return list(session.exec(query))


def revoke_provisioning_token(session: Session, token_id: str, actor: str) -> ProvisioningToken:
    row = session.get(ProvisioningToken, token_id)
    if row is None:
        raise NotFound("unknown_token", f"no provisioning token {token_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        audit.record(session, actor, "provisioning_token.revoke", row.id)
        session.commit()
    return row


def token_state(row: ProvisioningToken, now: datetime | None = None) -> str:
    now = now or utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at <= now:
        return "expired"
    if row.uses >= row.max_uses:
        return "exhausted"
    return "active"


def consume_provisioning_token(session: Session, secret: str) -> ProvisioningToken:
    """Count one use of a provisioning token, in the caller's transaction.

    The counting is a single conditional UPDATE, so two machines enrolling at once with the last
    use of a token cannot both get in, on SQLite as on PostgreSQL.
    """
    row = session.exec(
        select(ProvisioningToken).where(ProvisioningToken.token_hash == hash_secret(secret))
    ).first()
    if row is None:
        raise Unauthorized("unknown_token", "unknown provisioning token")
    state = token_state(row)
    if state != "active":
        raise Unauthorized(f"token_{state}", f"the provisioning token {row.id} is {state}")
    table = ProvisioningToken.__table__  # type: ignore[attr-defined]
    result = session.execute(
        sa.update(table)
        .where(
            table.c.id == row.id,
            table.c.uses < table.c.max_uses,
            table.c.revoked_at.is_(None),
        )
        .values(uses=table.c.uses + 1)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise Unauthorized("token_exhausted", f"the provisioning token {row.id} is exhausted")
    session.refresh(row)
    return row

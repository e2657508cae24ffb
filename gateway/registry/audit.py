"""The audit log: every operator action that touches a machine or a credential."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from gateway.db import utcnow
from gateway.registry.models import AuditEvent


def record(session: Session, actor: str, action: str, target: str = "", **detail: Any) -> None:
    """Add an audit event to the session; it commits with the change it describes."""
    session.add(AuditEvent(at=utcnow(), actor=actor, action=action, target=target, detail=detail))


def recent(
    session: Session,
    limit: int = 100,
    action: str | None = None,
    target: str | None = None,
) -> list[AuditEvent]:
    query = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(limit)
    if action:
        query = query.where(AuditEvent.action == action)
    if target:
        query = query.where(AuditEvent.target == target)
    return list(session.exec(query))

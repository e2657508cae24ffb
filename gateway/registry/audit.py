"""The audit log: every operator action that touches a machine or a credential.

Each entry names who acted: `actor` is the name shown (an email, a token's name), and when it
is a `gateway.accounts.principal.Actor` its exact user and token ids are stored beside it. An
entry about a machine also records the machine's customer, so that customer sees it.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from gateway.db import utcnow
from gateway.registry.models import AuditEvent, Device


def record(
    session: Session,
    actor: str,
    action: str,
    target: str = "",
    *,
    customer_id: str | None = None,
    **detail: Any,
) -> None:
    """Add an audit event to the session; it commits with the change it describes.

    `customer_id`: whose business it is; default: the customer of the machine `target` names.
    """
    if customer_id is None and target.startswith("dev-"):
        device = session.get(Device, target)
        customer_id = device.customer_id if device is not None else None
    session.add(
        AuditEvent(
            at=utcnow(),
            actor=actor,
            action=action,
            target=target,
            detail=detail,
            user_id=getattr(actor, "user_id", None),
            token_id=getattr(actor, "token_id", None),
            customer_id=customer_id,
        )
    )


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

"""Support consent: a customer may require that support tunnels to its machines open only inside
a window it granted.

- `set_required`: a customer-admin (or an admin) turns the requirement on or off.
- `grant`: a window from now for a while (at most `MAX_GRANT`); `revoke` ends every open window
  of the customer (the API then closes its machines' live tunnels too).
- `tunnel_deadline`: what the tunnel API asks before opening: None when the machine's customer
  does not require consent (or it is stock), else the end of the window that covers now, which
  the tunnel may not outlast; outside any window a 409 `consent_required`.

The machine's own policy (allowed ports, maximum lifetime) still applies on the machine.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.accounts import customers
from gateway.accounts.models import Customer, SupportGrant
from gateway.accounts.principal import Principal
from gateway.db import utcnow
from gateway.errors import Conflict, Invalid
from gateway.registry import audit
from gateway.registry.models import Device
from gateway.tunnels import states as tunnel_states
from gateway.tunnels.models import TunnelRecord

MAX_GRANT = 30 * 86400


@dataclass(frozen=True)
class ConsentStatus:
    customer: Customer
    active: SupportGrant | None
    recent: list[SupportGrant]


def _active(session: Session, customer_id: str, now: datetime) -> SupportGrant | None:
    query = (
        select(SupportGrant)
        .where(
            SupportGrant.customer_id == customer_id,
            col(SupportGrant.revoked_at).is_(None),
            SupportGrant.starts_at <= now,
            SupportGrant.ends_at > now,
        )
        .order_by(col(SupportGrant.ends_at).desc())
    )
    return session.exec(query).first()


def status(session: Session, who: Principal, customer_ref: str) -> ConsentStatus:
    customer = customers.resolve(session, who, customer_ref)
    recent = session.exec(
        select(SupportGrant)
        .where(SupportGrant.customer_id == customer.id)
        .order_by(col(SupportGrant.starts_at).desc())
        .limit(10)
    )
    return ConsentStatus(customer, _active(session, customer.id, utcnow()), list(recent))


def set_required(session: Session, who: Principal, customer_ref: str, required: bool) -> Customer:
    customer = customers.resolve(session, who, customer_ref)
    if customer.consent_required != required:
        customer.consent_required = required
        session.add(customer)
        audit.record(
            session,
            who.actor,
            "support.require",
            customer.id,
            customer_id=customer.id,
            required=required,
        )
        session.commit()
    return customer


def grant(
    session: Session, who: Principal, customer_ref: str, seconds: int, note: str = ""
) -> SupportGrant:
    if not 0 < seconds <= MAX_GRANT:
        raise Invalid("bad_grant", f"a support window lasts between 1 s and {MAX_GRANT // 86400} d")
    customer = customers.resolve(session, who, customer_ref)
    now = utcnow()
    row = SupportGrant(
        id="sg-" + secrets.token_hex(5),
        customer_id=customer.id,
        starts_at=now,
        ends_at=now + timedelta(seconds=seconds),
        granted_by=who.actor,
        note=note,
    )
    session.add(row)
    audit.record(
        session,
        who.actor,
        "support.grant",
        customer.id,
        customer_id=customer.id,
        grant_id=row.id,
        until=row.ends_at.isoformat(),
        note=note,
    )
    session.commit()
    return row


def revoke(session: Session, who: Principal, customer_ref: str) -> tuple[Customer, int]:
    """End every open window of the customer; how many there were."""
    customer = customers.resolve(session, who, customer_ref)
    now = utcnow()
    table = SupportGrant.__table__  # type: ignore[attr-defined]
    result = session.execute(
        sa.update(table)
        .where(
            table.c.customer_id == customer.id,
            table.c.revoked_at.is_(None),
            table.c.ends_at > now,
        )
        .values(revoked_at=now, revoked_by=who.actor)
    )
    count = int(result.rowcount)  # type: ignore[attr-defined]
    audit.record(
        session, who.actor, "support.revoke", customer.id, customer_id=customer.id, grants=count
    )
    session.commit()
    return customer, count


def live_tunnels(session: Session, customer_id: str) -> list[TunnelRecord]:
    """The customer's machines' tunnels that are not closed yet (to close on revoke)."""
    owned = select(Device.id).where(Device.customer_id == customer_id)
    query = select(TunnelRecord).where(
        col(TunnelRecord.device_id).in_(owned), col(TunnelRecord.state).in_(tunnel_states.LIVE)
    )
    return list(session.exec(query))


def tunnel_deadline(session: Session, device: Device) -> datetime | None:
    """None: no consent needed; else the end of the open window (409 outside any)."""
    if device.customer_id is None:
        return None
    customer = session.get(Customer, device.customer_id)
    if customer is None or not customer.consent_required:
        return None
    window = _active(session, customer.id, utcnow())
    if window is None:
        raise Conflict(
            "consent_required",
            f"customer {customer.name} requires consent for support and has granted no window "
            f"now; its admin opens one with: edgefleet support grant --for 24h",
        )
    return window.ends_at

"""What a caller may see: the one place that narrows queries to a customer's own rows.

A manufacturer caller sees every machine; a customer's user sees its customer's machines and
everything derived from them, and nothing else. A row it may not see answers exactly like a row
that does not exist (404, the same message), so its existence is not confirmed.

Machines are named by id or by name everywhere. Names are unique among a customer's active
machines (and among the stock's); a name that matches several machines the caller can see
(different customers, seen by the manufacturer) is a 409 that lists them.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from gateway.accounts.principal import Principal
from gateway.errors import Conflict, NotFound
from gateway.registry.models import Device, DeviceState

Q = TypeVar("Q", bound=SelectOfScalar[Any])


def devices(query: Q, who: Principal) -> Q:
    """`query` (over a statement that has the devices table) narrowed to `who`'s machines."""
    if who.is_customer:
        return query.where(Device.customer_id == who.customer_id)
    return query


def device_ids(who: Principal) -> SelectOfScalar[str]:
    """A subquery of the ids of the machines `who` sees (for tables keyed by device id)."""
    return devices(select(Device.id), who)


def sees(who: Principal, device: Device) -> bool:
    return who.sees_customer(device.customer_id)


def not_found(ref: str) -> NotFound:
    return NotFound("unknown_device", f"no device {ref!r}")


def resolve_device(session: Session, who: Principal, ref: str) -> Device:
    """The machine `ref` (its id, else its name) names among those `who` sees; 404 or 409."""
    device = session.get(Device, ref)
    if device is not None:
        if not sees(who, device):
            raise not_found(ref)
        return device
    query = devices(select(Device).where(Device.name == ref), who)
    matches = list(session.exec(query.order_by(col(Device.enrolled_at))))
    active = [d for d in matches if d.state == DeviceState.active]
    found = active or matches
    if not found:
        raise not_found(ref)
    if len(found) > 1:
        listed = ", ".join(f"{d.id} ({d.customer_id or 'stock'}, {d.state})" for d in found[:20])
        raise Conflict(
            "ambiguous_device",
            f"{len(found)} machines are named {ref!r}: {listed}; give the device id",
        )
    return found[0]


def check_name_free(
    session: Session, name: str, customer_id: str | None, except_id: str | None = None
) -> None:
    """Refuse a name another active machine of the same customer (or of the stock) has."""
    query = select(Device.id).where(Device.name == name, Device.state == DeviceState.active)
    query = query.where(
        Device.customer_id == customer_id if customer_id else col(Device.customer_id).is_(None)
    )
    if except_id:
        query = query.where(Device.id != except_id)
    taken = session.exec(query).first()
    if taken is not None:
        owner = f"customer {customer_id}" if customer_id else "the stock"
        raise Conflict(
            "name_taken", f"machine {taken} of {owner} is already named {name!r}; pick another"
        )

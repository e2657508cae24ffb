"""Who owns a machine: a customer, or the manufacturer's stock.

A machine enrolled with a provisioning token that carries a customer belongs to that customer.
One enrolled into stock gets a claim code: printed by `edgefleet agent enroll`, kept in the
agent's state directory for its label, stored here only as a SHA-256 hash. A customer-admin
claims the machine with it (one use). An admin moves machines freely (`assign`); a machine put
back into stock gets a new claim code, shown to that admin once.
"""

from __future__ import annotations

import secrets

from sqlmodel import Session, select

from gateway.accounts import customers, scoping
from gateway.accounts.principal import Principal
from gateway.errors import Conflict, Invalid, NotFound
from gateway.registry import audit
from gateway.registry.models import Device, DeviceState
from provisioning.secrets import hash_secret
from provisioning.wire import CLAIM_CODE_ALPHABET, normalize_claim_code


def new_claim_code() -> str:
    """20 characters from a 31-letter alphabet without look-alikes (99 bits), in groups of 5."""
    raw = "".join(secrets.choice(CLAIM_CODE_ALPHABET) for _ in range(20))
    return "-".join(raw[i : i + 5] for i in range(0, 20, 5))


def claim_code_hash(code: str) -> str:
    return hash_secret(normalize_claim_code(code))


def unique_name(session: Session, wanted: str, customer_id: str | None, device_id: str) -> str:
    """`wanted`, or `wanted-XXXX` (the id's tail) when another active machine of the same
    owner has it: an enrollment never fails over a name."""
    try:
        scoping.check_name_free(session, wanted, customer_id)
    except Conflict:
        return f"{wanted[:58]}-{device_id[-5:]}"
    return wanted


def assign(
    session: Session, who: Principal, ref: str, customer_ref: str | None
) -> tuple[Device, str | None]:
    """Move a machine to a customer (`customer_ref`) or to stock (None); returns the machine
    and, for stock, its new claim code."""
    device = scoping.resolve_device(session, who, ref)
    customer = customers.resolve(session, who, customer_ref) if customer_ref else None
    target = customer.id if customer else None
    code: str | None = None
    if device.customer_id != target or (target is None and device.claim_code_hash is None):
        scoping.check_name_free(session, device.name, target, except_id=device.id)
        previous = device.customer_id
        device.customer_id = target
        if target is None:
            code = new_claim_code()
            device.claim_code_hash = claim_code_hash(code)
        else:
            device.claim_code_hash = None
        session.add(device)
        audit.record(
            session,
            who.actor,
            "device.assign",
            device.id,
            customer_id=target,
            previous_customer=previous,
            customer=customer.name if customer else "stock",
        )
        if previous and previous != target:  # the customer it left sees that it left
            audit.record(
                session,
                who.actor,
                "device.unassign",
                device.id,
                customer_id=previous,
                to="another owner",
            )
        session.commit()
    return device, code


def claim(session: Session, who: Principal, code: str) -> Device:
    """A customer-admin takes a stock machine with its claim code (the code is used up)."""
    if who.customer_id is None:
        raise Invalid("not_a_customer", "a machine is claimed by a customer's admin")
    try:
        digest = claim_code_hash(code)
    except ValueError as exc:
        raise Invalid("bad_claim_code", str(exc)) from exc
    device = session.exec(select(Device).where(Device.claim_code_hash == digest)).first()
    if device is None or device.customer_id is not None or device.state != DeviceState.active:
        raise NotFound("unknown_claim_code", "no machine in stock has this claim code")
    scoping.check_name_free(session, device.name, who.customer_id, except_id=device.id)
    device.customer_id = who.customer_id
    device.claim_code_hash = None
    session.add(device)
    audit.record(
        session, who.actor, "device.claim", device.id, customer_id=who.customer_id, name=device.name
    )
    session.commit()
    return device

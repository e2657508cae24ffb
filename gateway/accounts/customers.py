"""Customers: the organisations that own machines."""

from __future__ import annotations

import re
import secrets

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.accounts.models import Customer
from gateway.accounts.principal import Principal
from gateway.db import utcnow
from gateway.errors import Conflict, Invalid, NotFound
from gateway.pagination import Page, PageRequest, SortKey, paginate
from gateway.registry import audit

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.&-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def create(session: Session, who: Principal, name: str) -> Customer:
    name = name.strip()
    if not _NAME.match(name) or name.startswith("cus-"):
        raise Invalid(
            "bad_customer_name",
            f"a customer name is 1-64 letters, digits, spaces or _.&- (not starting with "
            f"'cus-'), not {name!r}",
        )
    if find(session, name) is not None:
        raise Conflict("customer_exists", f"there is already a customer {name!r}")
    row = Customer(
        id="cus-" + secrets.token_hex(5), name=name, created_at=utcnow(), created_by=who.actor
    )
    session.add(row)
    audit.record(session, who.actor, "customer.create", row.id, customer_id=row.id, name=name)
    try:
        session.commit()
    except sa.exc.IntegrityError as exc:
        session.rollback()
        raise Conflict("customer_exists", f"there is already a customer {name!r}") from exc
    return row


def find(session: Session, ref: str) -> Customer | None:
    """By id or by name (names compare without regard to case)."""
    row = session.get(Customer, ref)
    if row is not None:
        return row
    query = select(Customer).where(sa.func.lower(Customer.name) == ref.strip().lower())
    return session.exec(query).first()


def resolve(session: Session, who: Principal, ref: str) -> Customer:
    """The customer `ref` names, if `who` may see it; 404 otherwise (its existence included)."""
    row = find(session, ref)
    if row is None or not who.sees_customer(row.id):
        raise NotFound("unknown_customer", f"no customer {ref!r}")
    return row


def list_customers(session: Session, who: Principal, page: PageRequest) -> Page[Customer]:
    query = select(Customer)
    if who.is_customer:
        query = query.where(Customer.id == who.customer_id)
    keys = [SortKey(col(Customer.name)), SortKey(col(Customer.id))]
    return paginate(session, query, keys, page, lambda c: (c.name, c.id))


def names(session: Session, ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    rows = session.exec(select(Customer.id, Customer.name).where(col(Customer.id).in_(ids)))
    return dict(rows.all())

"""Users: create, list, disable, and check a password at login.

Who may create whom:
- the bootstrap token (`edgefleet admin create-token`): the first manufacturer admin, once; that
  creation revokes every bootstrap token;
- an admin: anyone; a customer role needs a customer, a manufacturer role has none;
- a customer-admin: customer-admins and customer-viewers of its own customer.
"""

from __future__ import annotations

import re
import secrets

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.accounts import customers, passwords, rate_limit, sessions
from gateway.accounts.models import User
from gateway.accounts.principal import Actor, Principal, PrincipalKind
from gateway.db import utcnow
from gateway.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from gateway.pagination import Page, PageRequest, SortKey, paginate
from gateway.registry import audit
from gateway.registry.models import ApiToken, Role
from gateway.settings import GatewaySettings

# Spelled out rather than \s, whose meaning differs between Python's re, pydantic's regex engine
# and the JSON Schema (ECMAScript) one: the API document states this very pattern.
_SPACE = " \t\n\r\f\v"
_NOT_IN_PART = "@\\x00-\\x20\\x7f"
EMAIL_CORE = f"[^{_NOT_IN_PART}]{{1,64}}@[^{_NOT_IN_PART}]{{1,189}}\\.[^.{_NOT_IN_PART}]{{1,63}}"
EMAIL_PATTERN = f"^[ \\t\\n\\r\\f\\v]*{EMAIL_CORE}[ \\t\\n\\r\\f\\v]*$"
"""An email address, with spaces around it allowed (they are stripped)."""
_EMAIL = re.compile(f"^{EMAIL_CORE}$")


def normalize_email(email: str) -> str:
    text = email.strip(_SPACE).lower()
    if len(text) > 254 or not _EMAIL.match(text):
        raise Invalid("bad_email", f"{email!r} is not an email address")
    return text


def admin_exists(session: Session) -> bool:
    query = select(User.id).where(
        User.role == Role.admin, col(User.customer_id).is_(None), col(User.disabled_at).is_(None)
    )
    return session.exec(query).first() is not None


def _check_may_create(
    session: Session, who: Principal, role: Role, customer_id: str | None
) -> None:
    if who.kind is PrincipalKind.bootstrap:
        if role is not Role.admin or customer_id is not None:
            raise Forbidden(
                "bootstrap_only",
                "the bootstrap token only creates the first admin user (--role admin, no customer)",
            )
        return
    if who.is_customer:
        if not role.is_customer:
            raise Forbidden(
                "customer_roles_only",
                "a customer-admin gives only customer-admin or customer-viewer",
            )
        return
    if who.role is not Role.admin:
        raise Forbidden("insufficient_role", "creating users needs the admin role")


def create(
    session: Session,
    who: Principal,
    *,
    email: str,
    role: Role,
    customer_ref: str | None,
    password: str | None,
) -> User:
    email = normalize_email(email)
    if who.is_customer:
        customer_ref = customer_ref or who.customer_id
    customer = customers.resolve(session, who, customer_ref) if customer_ref else None
    if role.is_customer and customer is None:
        raise Invalid("customer_needed", f"a {role.value} user belongs to a customer (--customer)")
    if not role.is_customer and customer is not None:
        raise Invalid(
            "no_customer_for_staff",
            f"{role.value} is a manufacturer role; a customer's users are customer-admin or "
            "customer-viewer",
        )
    _check_may_create(session, who, role, customer.id if customer else None)
    if session.exec(select(User.id).where(User.email == email)).first() is not None:
        raise Conflict("user_exists", f"there is already a user {email}")
    row = User(
        id="usr-" + secrets.token_hex(5),
        email=email,
        role=role,
        customer_id=customer.id if customer else None,
        password_hash=passwords.hash_password(password) if password else None,
        created_at=utcnow(),
        created_by=who.actor,
    )
    session.add(row)
    audit.record(
        session,
        who.actor,
        "user.create",
        row.id,
        customer_id=row.customer_id,
        email=email,
        role=role.value,
        sso_only=password is None,
    )
    if who.kind is PrincipalKind.bootstrap:
        table = ApiToken.__table__  # type: ignore[attr-defined]
        session.execute(
            sa.update(table)
            .where(table.c.kind == "bootstrap", table.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        audit.record(session, who.actor, "api_token.bootstrap_spent", who.token_id or "")
    try:
        session.commit()
    except sa.exc.IntegrityError as exc:
        session.rollback()
        raise Conflict("user_exists", f"there is already a user {email}") from exc
    return row


def resolve(session: Session, who: Principal, ref: str) -> User:
    """A user by id or email, if `who` may see it; 404 otherwise."""
    row = session.get(User, ref)
    if row is None and "@" in ref:
        row = session.exec(select(User).where(User.email == ref.strip().lower())).first()
    if row is None or not who.sees_customer(row.customer_id):
        raise NotFound("unknown_user", f"no user {ref!r}")
    return row


def list_users(
    session: Session, who: Principal, page: PageRequest, customer_ref: str | None = None
) -> Page[User]:
    query = select(User)
    if who.is_customer:
        query = query.where(User.customer_id == who.customer_id)
    if customer_ref == "-":  # the manufacturer's own staff
        query = query.where(col(User.customer_id).is_(None))
    elif customer_ref:
        query = query.where(User.customer_id == customers.resolve(session, who, customer_ref).id)
    keys = [SortKey(col(User.email))]
    return paginate(session, query, keys, page, lambda u: (u.email,))


def disable(session: Session, who: Principal, ref: str) -> User:
    """Disable a user: their sessions end and their tokens stop working at once."""
    row = resolve(session, who, ref)
    if who.is_customer and not Role(row.role).is_customer:
        raise NotFound("unknown_user", f"no user {ref!r}")
    if row.disabled_at is not None:
        return row
    if row.role == Role.admin and row.customer_id is None:
        others = (
            select(sa.func.count())
            .select_from(User)
            .where(
                User.role == Role.admin,
                col(User.customer_id).is_(None),
                col(User.disabled_at).is_(None),
                User.id != row.id,
            )
        )
        if not session.exec(others).one():
            raise Conflict("last_admin", "this is the last enabled admin; make another first")
    row.disabled_at = utcnow()
    session.add(row)
    sessions.end_all_of(session, row.id)
    audit.record(
        session, who.actor, "user.disable", row.id, customer_id=row.customer_id, email=row.email
    )
    session.commit()
    return row


def check_password(
    session: Session,
    settings: GatewaySettings,
    *,
    email: str,
    password: str,
    address: str,
) -> User:
    """The enabled user with this email and password; throttled per account and address, and
    every failure audited (never with the password)."""
    email = email.strip().lower()[:254]
    keys = [rate_limit.account_key(email), rate_limit.address_key(address)]
    try:
        rate_limit.check(session, keys)
    except rate_limit.Throttled:
        audit.record(
            session, Actor("anonymous"), "auth.login_throttled", "", email=email, address=address
        )
        session.commit()
        raise
    row = session.exec(select(User).where(User.email == email)).first()
    ok = passwords.verify(row.password_hash if row else None, password)
    if row is None or not ok or row.disabled_at is not None:
        why = "unknown_user" if row is None else ("disabled" if ok else "wrong_password")
        rate_limit.record_failure(session, keys, settings)
        audit.record(
            session,
            Actor("anonymous"),
            "auth.login_failed",
            row.id if row else "",
            customer_id=row.customer_id if row else None,
            email=email,
            address=address,
            why=why,
        )
        session.commit()
        raise Unauthorized("login_failed", "wrong email or password, or the user is disabled")
    rate_limit.clear(session, keys[0])
    if row.password_hash and (new_hash := passwords.rehashed(row.password_hash, password)):
        row.password_hash = new_hash
    return row

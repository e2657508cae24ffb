"""API tokens for scripts: a person's own (named, expiring, stored as a SHA-256 hash), the
bootstrap token, and an upgraded install's legacy tokens.

A person's token never does more than its person: its role is checked against the user's role
at every request (demote or disable the user and the token follows at once), and it may not be
created with a higher role than the user's (nor, when made with another token, than that
token's).

The bootstrap token (`edgefleet admin create-token`) can do one thing: create the first admin
user (`POST /api/v1/users`). Creating that user revokes it; while an enabled admin user exists
any bootstrap token is refused (401 `bootstrap_spent`): make a new one on the gateway host
only if every admin is gone.

Legacy tokens: made before there were users (migration 0008). They keep their role
(viewer/operator/admin) as manufacturer staff and cannot make tokens; revoke them once people
have their own.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from gateway.accounts import users
from gateway.accounts.models import User
from gateway.accounts.principal import Actor, Principal, PrincipalKind, actor_label
from gateway.db import utcnow
from gateway.errors import Forbidden, Invalid, NotFound, Unauthorized
from gateway.pagination import Page, PageRequest, SortKey, paginate
from gateway.registry import audit
from gateway.registry.models import ApiToken, Role
from provisioning.secrets import API_TOKEN_PREFIX, hash_secret, new_secret

DEFAULT_TTL = 90 * 86400
#: last_used_at is written at most this often.
TOUCH_EVERY = timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A token as made: the only moment its secret exists outside its holder's hands."""

    token: str
    row: ApiToken


def _new_row(
    name: str,
    role: Role,
    kind: str,
    actor: str,
    user_id: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[str, ApiToken]:
    secret = new_secret(API_TOKEN_PREFIX)
    row = ApiToken(
        id="at-" + secrets.token_hex(5),
        name=name,
        token_hash=hash_secret(secret),
        role=role,
        kind=kind,
        created_at=utcnow(),
        created_by=actor[:64],
        user_id=user_id,
        expires_at=expires_at,
    )
    return secret, row


def create_bootstrap(session: Session, actor: str = "local-admin") -> Issued:
    """The token that creates the first admin user (made on the gateway host)."""
    secret, row = _new_row("bootstrap", Role.admin, "bootstrap", actor)
    session.add(row)
    audit.record(session, actor, "api_token.create", row.id, name="bootstrap", kind="bootstrap")
    session.commit()
    return Issued(secret, row)


def create_for_user(
    session: Session,
    who: Principal,
    *,
    name: str,
    role: Role | None,
    ttl_seconds: int | None,
    max_ttl_seconds: int,
) -> Issued:
    if who.kind not in (PrincipalKind.session, PrincipalKind.user_token) or who.role is None:
        raise Forbidden(
            "no_user",
            "only a person makes API tokens (log in: edgefleet login); this caller "
            "is a token of no user",
        )
    role = role or who.role
    if not role.within(who.role):
        raise Forbidden(
            "role_too_high",
            f"a token may not do more than its maker: {role.value} is above {who.role.value}",
        )
    ttl = ttl_seconds or min(DEFAULT_TTL, max_ttl_seconds)
    if not 0 < ttl <= max_ttl_seconds:
        raise Invalid("bad_ttl", f"a token lives between 1 s and {max_ttl_seconds} s")
    secret, row = _new_row(
        name,
        role,
        "user",
        who.actor,
        user_id=who.user_id,
        expires_at=utcnow() + timedelta(seconds=ttl),
    )
    session.add(row)
    audit.record(
        session,
        who.actor,
        "api_token.create",
        row.id,
        customer_id=who.customer_id,
        name=name,
        role=role.value,
        expires_at=row.expires_at.isoformat() if row.expires_at else None,
    )
    session.commit()
    return Issued(secret, row)


def list_tokens(
    session: Session, who: Principal, page: PageRequest, include_revoked: bool = False
) -> Page[ApiToken]:
    query = select(ApiToken)
    if not who.may_all_tokens:
        query = query.where(ApiToken.user_id == (who.user_id or "-"))
    if not include_revoked:
        query = query.where(col(ApiToken.revoked_at).is_(None))
    keys = [SortKey(col(ApiToken.created_at), True), SortKey(col(ApiToken.id), True)]
    return paginate(session, query, keys, page, lambda t: (t.created_at, t.id))


def revoke(session: Session, who: Principal, token_id: str) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None or not (who.may_all_tokens or (row.user_id and row.user_id == who.user_id)):
        raise NotFound("unknown_token", f"no API token {token_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        owner = session.get(User, row.user_id) if row.user_id else None
        audit.record(
            session,
            who.actor,
            "api_token.revoke",
            row.id,
            customer_id=owner.customer_id if owner else None,
            name=row.name,
        )
        session.commit()
    return row


def state(row: ApiToken, now: datetime | None = None) -> str:
    now = now or utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def authenticate(session: Session, secret: str) -> Principal:
    """The caller behind an API token, or 401 with the reason."""
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret))).first()
    if row is None:
        raise Unauthorized("unknown_api_token", "unknown API token")
    now = utcnow()
    current = state(row, now)
    if current != "active":
        raise Unauthorized(f"api_token_{current}", f"the API token {row.id} is {current}")
    if row.kind == "bootstrap":
        if users.admin_exists(session):
            raise Unauthorized(
                "bootstrap_spent",
                "an admin user exists: the bootstrap token is spent; log in as a user "
                "(edgefleet login)",
            )
        return Principal(
            PrincipalKind.bootstrap,
            Actor(f"bootstrap ({row.id})", token_id=row.id),
            token_id=row.id,
        )
    if row.kind == "legacy" or row.user_id is None:
        return Principal(
            PrincipalKind.legacy_token,
            Actor(f"{row.name} ({row.id})"[:64], token_id=row.id),
            role=Role(row.role),
            token_id=row.id,
        )
    user = session.get(User, row.user_id)
    if user is None or user.disabled_at is not None:
        raise Unauthorized("user_disabled", f"the user of API token {row.id} is disabled")
    role = Role(row.role)
    if not role.within(Role(user.role)):  # the user was demoted since: the token follows
        role = Role(user.role)
    if row.last_used_at is None or now - row.last_used_at >= TOUCH_EVERY:
        row.last_used_at = now
        session.add(row)
        session.commit()
    return Principal(
        PrincipalKind.user_token,
        Actor(actor_label(user.email, user.id, row.id), user_id=user.id, token_id=row.id),
        role=role,
        user_id=user.id,
        email=user.email,
        customer_id=user.customer_id,
        token_id=row.id,
    )

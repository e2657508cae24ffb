"""Browser sessions, kept in the database every replica shares.

The cookie (`edgefleet_session`: Secure, HttpOnly, SameSite=Lax, Path=/) holds 32 random bytes;
the table keeps only their SHA-256, so a copy of the database opens no session. A login always
makes a new session and ends the one the browser came with (no session fixation); logout ends
the row, so the cookie is dead on every replica at once. A session also ends after
`session_idle_timeout` without a request and `session_max_age` after login, and when its user
is disabled.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from fastapi import Response
from sqlmodel import Session, col

from gateway.accounts.models import BrowserSession, User
from gateway.db import utcnow
from gateway.settings import GatewaySettings
from provisioning.secrets import hash_secret

COOKIE = "edgefleet_session"
#: A session's last_seen_at is written at most this often (not on every request).
TOUCH_EVERY = timedelta(seconds=60)


@dataclass(frozen=True)
class Started:
    secret: str
    row: BrowserSession


def start(
    session: Session,
    user: User,
    settings: GatewaySettings,
    *,
    address: str,
    user_agent: str,
    method: str,
    previous_secret: str | None,
) -> Started:
    """A new session for `user` (in the caller's transaction); ends `previous_secret`'s."""
    if previous_secret:
        end(session, previous_secret)
    now = utcnow()
    secret = secrets.token_urlsafe(32)
    row = BrowserSession(
        id_hash=hash_secret(secret),
        user_id=user.id,
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        last_seen_at=now,
        expires_at=now + timedelta(seconds=settings.session_max_age),
        address=address[:64],
        user_agent=user_agent[:200],
        method=method,
    )
    session.add(row)
    return Started(secret, row)


def _live(row: BrowserSession, settings: GatewaySettings, now: datetime) -> bool:
    idle_until = row.last_seen_at + timedelta(seconds=settings.session_idle_timeout)
    return row.ended_at is None and now < row.expires_at and now < idle_until


def lookup(
    session: Session, secret: str, settings: GatewaySettings
) -> tuple[BrowserSession, User] | None:
    """The live session behind a cookie and its enabled user, or None."""
    if not secret or len(secret) > 100:
        return None
    row = session.get(BrowserSession, hash_secret(secret))
    now = utcnow()
    if row is None or not _live(row, settings, now):
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled_at is not None:
        return None
    if now - row.last_seen_at >= TOUCH_EVERY:
        row.last_seen_at = now
        session.add(row)
        session.commit()
    return row, user


def end(session: Session, secret: str) -> bool:
    """End the session behind a cookie; whether there was a live one."""
    table = BrowserSession.__table__  # type: ignore[attr-defined]
    result = session.execute(
        sa.update(table)
        .where(table.c.id_hash == hash_secret(secret), table.c.ended_at.is_(None))
        .values(ended_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def end_all_of(session: Session, user_id: str) -> None:
    table = BrowserSession.__table__  # type: ignore[attr-defined]
    session.execute(
        sa.update(table)
        .where(table.c.user_id == user_id, table.c.ended_at.is_(None))
        .values(ended_at=utcnow())
    )


def purge(session: Session) -> int:
    """Delete sessions that ended or expired a day ago or more (housekeeping)."""
    cutoff = utcnow() - timedelta(days=1)
    table = BrowserSession.__table__  # type: ignore[attr-defined]
    result = session.execute(
        sa.delete(table).where(sa.or_(col(table.c.expires_at) < cutoff, table.c.ended_at < cutoff))
    )
    session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]


def set_cookie(response: Response, secret: str, settings: GatewaySettings) -> None:
    response.set_cookie(
        COOKIE,
        secret,
        max_age=settings.session_max_age,
        path="/",
        secure=settings.session_cookie_secure,
        httponly=True,
        samesite="lax",
    )


def clear_cookie(response: Response, settings: GatewaySettings) -> None:
    response.delete_cookie(
        COOKIE, path="/", secure=settings.session_cookie_secure, httponly=True, samesite="lax"
    )

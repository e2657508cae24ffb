"""Login throttling per account and per client address, counted in the shared database.

Each failed login adds one to its account's and its address's counters for the current window
(`login_window` seconds). A counter that reaches its limit (`login_account_failures`,
`login_address_failures`) blocks further attempts with 429 and `Retry-After` for a window's
length from that failure, before any password is checked, on every replica alike: the counters
are rows updated with single conditional statements, not anything one replica holds. A
successful login clears its account's counter (not its address's: one right password must not
reset a spraying address).
"""

from __future__ import annotations

import math
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import Session

from gateway.accounts.models import LoginThrottle
from gateway.db import utcnow
from gateway.errors import GatewayError
from gateway.settings import GatewaySettings


class Throttled(GatewayError):
    status = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__("login_throttled", detail)
        self.headers = {"Retry-After": str(retry_after)}


def account_key(email: str) -> str:
    return "account:" + email.strip().lower()[:254]


def address_key(address: str) -> str:
    return "address:" + address[:64]


def _limits(settings: GatewaySettings) -> dict[str, int]:
    return {"account": settings.login_account_failures, "address": settings.login_address_failures}


def check(session: Session, keys: list[str]) -> None:
    """Refuse now when any of `keys` is blocked."""
    now = utcnow()
    table = LoginThrottle.__table__  # type: ignore[attr-defined]
    rows = session.execute(
        sa.select(table.c.key, table.c.blocked_until).where(
            table.c.key.in_(keys), table.c.blocked_until > now
        )
    ).all()
    if rows:
        key, until = max(rows, key=lambda row: row[1])
        wait = max(1, math.ceil((until - now).total_seconds()))
        what = "this account" if key.startswith("account:") else "this client address"
        raise Throttled(
            f"too many failed logins for {what}; try again in {wait} s", retry_after=wait
        )


def record_failure(session: Session, keys: list[str], settings: GatewaySettings) -> None:
    """Count a failed login against each key (in the caller's transaction)."""
    now = utcnow()
    window = timedelta(seconds=settings.login_window)
    table = LoginThrottle.__table__  # type: ignore[attr-defined]
    for key in keys:
        limit = _limits(settings)[key.split(":", 1)[0]]
        stale = table.c.window_start <= now - window
        bump = (
            sa.update(table)
            .where(table.c.key == key)
            .values(
                failures=sa.case((stale, 1), else_=table.c.failures + 1),
                window_start=sa.case((stale, now), else_=table.c.window_start),
            )
        )
        if not session.execute(bump).rowcount:  # type: ignore[attr-defined]
            try:
                with session.begin_nested():
                    session.execute(sa.insert(table).values(key=key, failures=1, window_start=now))
            except sa.exc.IntegrityError:  # another replica inserted it first
                session.execute(bump)
        session.execute(
            sa.update(table)
            .where(table.c.key == key, table.c.failures >= limit)
            .values(blocked_until=now + window)
        )


def clear(session: Session, key: str) -> None:
    table = LoginThrottle.__table__  # type: ignore[attr-defined]
    session.execute(sa.delete(table).where(table.c.key == key))

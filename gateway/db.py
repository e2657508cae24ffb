"""The database: engine, schema migrations, deadlock retries, the UTC column type of every table.

Requests get their session from `gateway.api.deps`; background work opens `Session(engine)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine
from sqlmodel import Column, Field, Session, create_engine

from gateway.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every replica (PostgreSQL advisory lock).
MIGRATION_LOCK_KEY = 0x6564_6765_6D69


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone otherwise)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_column(nullable: bool = False, index: bool = False) -> Any:
    """A model field stored as a `UTCDateTime` column."""
    return Field(sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


T = TypeVar("T")
_DEADLOCK = "40P01"  # PostgreSQL's SQLSTATE for "deadlock detected"


def is_deadlock(exc: sa.exc.DBAPIError) -> bool:
    """PostgreSQL aborted this transaction to break a deadlock (running it again is safe)."""
    return getattr(exc.orig, "sqlstate", None) == _DEADLOCK


def retry_deadlocks(session: Session, work: Callable[[], T], attempts: int = 3) -> T:
    """Run `work` (a transaction that ends with its commit); when PostgreSQL picks it as a
    deadlock's victim, roll back and run it again (writers that touch the same rows in different
    orders, such as a wave being recorded while its first replies come in)."""
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except sa.exc.OperationalError as exc:
            if not is_deadlock(exc) or attempt == attempts:
                raise
            session.rollback()
            log.info("deadlock with another writer; running the transaction again")
    raise AssertionError("unreachable")


def redact(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class PoolSize:
    """How many connections an engine keeps (``size``) and may open beyond them (``overflow``),
    and how long a checkout waits for one (then `sqlalchemy.exc.TimeoutError`)."""

    size: int = 10
    overflow: int = 20
    timeout: float = 30.0


JOB_CONNECTIONS = 4
"""Beside the API's requests, the singleton jobs (rollouts, housekeeping, tunnel reaper,
retention, leader election) use the API's engine too."""
MQTT_POOL = PoolSize(size=4, overflow=2, timeout=30.0)
"""The MQTT side (telemetry ingest, status and reply listeners) has its own engine: API traffic
can never take the connections that store what machines send."""


def api_pool(max_in_flight: int) -> PoolSize:
    """A connection for every request load shedding lets run, and for the jobs; a checkout that
    still finds none waits briefly and becomes a 503 (never a 500)."""
    return PoolSize(size=max_in_flight + JOB_CONNECTIONS, overflow=JOB_CONNECTIONS, timeout=10.0)


def make_engine(url: str, pool: PoolSize | None = None) -> Engine:
    pool = pool or PoolSize()
    sizes = {"pool_size": pool.size, "max_overflow": pool.overflow, "pool_timeout": pool.timeout}
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        memory = not path or path == ":memory:"
        if path and not memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            **({} if memory else sizes),
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **sizes)


def check_connection(engine: Engine) -> None:
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseUnavailable(
            f"cannot reach the database at {redact(str(engine.url))}: {reason}"
        ) from exc


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (the same migrations on SQLite and PostgreSQL).

    On PostgreSQL an advisory lock makes replicas that start together take turns.
    """
    check_connection(engine)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session

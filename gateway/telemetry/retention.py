"""Deletes telemetry older than the configured age, in small chunks, in the background.

Each chunk is its own short transaction (``chunk`` rows, a few milliseconds), and the job
pauses between chunks, so the ingest's writes never wait long behind it: on SQLite, where one
writer at a time holds the database, the ingest gets the lock between two chunks; on
PostgreSQL rows are only locked for the length of a chunk.

What goes: samples whose timestamp is older than ``now - max_age``, and batch keys stored
longer ago than that (``received_at``). A batch redelivered after its key was deleted would be
stored again, which can only happen to a message older than the retention age.

With several replicas on one PostgreSQL database, one replica at a time runs a pass (a
``pg_try_advisory_lock``); the others skip theirs.

The statements are SQL text because the cheap way to delete "some rows matching X" differs per
database and SQLAlchemy has no construct for it: ``ctid = ANY(ARRAY(SELECT ctid ... LIMIT n))``
on PostgreSQL (a TID scan; ``IN (subquery)`` plans a scan of the whole table) and ``rowid IN
(SELECT rowid ... LIMIT n)`` on SQLite. Both find the old rows through the ``ts`` /
``received_at`` index.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gateway.telemetry.metrics import TelemetryMetrics
from provisioning.periodic import Periodic

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE: Final = 30 * 86400
DEFAULT_INTERVAL: Final = 300.0
DEFAULT_CHUNK: Final = 5_000
DEFAULT_PAUSE: Final = 0.02
RETENTION_LOCK_KEY: Final = 0x6564_6774_656C  # any constant shared by all replicas

_TABLES: Final = (("telemetry_samples", "ts"), ("telemetry_batches", "received_at"))


def _delete_chunk(dialect: str, table: str, column: str) -> sa.TextClause:
    if dialect == "postgresql":
        return sa.text(
            f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("  # noqa: S608 (names are constants)
            f"SELECT ctid FROM {table} WHERE {column} < :cutoff LIMIT :chunk))"
        )
    return sa.text(
        f"DELETE FROM {table} WHERE rowid IN ("  # noqa: S608 (names are constants)
        f"SELECT rowid FROM {table} WHERE {column} < :cutoff LIMIT :chunk)"
    )


@dataclass(frozen=True, slots=True)
class RetentionResult:
    samples: int
    batches: int
    chunks: int = 0
    """Transactions it took (each deleting at most ``chunk`` rows)."""
    skipped: bool = False
    """Another replica held the retention lock."""


class RetentionJob:
    def __init__(
        self,
        engine: Engine,
        max_age: float = DEFAULT_MAX_AGE,
        metrics: TelemetryMetrics | None = None,
        *,
        interval: float = DEFAULT_INTERVAL,
        chunk: int = DEFAULT_CHUNK,
        pause: float = DEFAULT_PAUSE,
    ) -> None:
        if max_age <= 0:
            raise ValueError(f"telemetry retention must be positive, got {max_age}")
        if chunk < 1:
            raise ValueError(f"retention chunk must be at least 1, got {chunk}")
        self.engine = engine
        self.max_age = max_age
        self.metrics = metrics
        self.interval = interval
        self.chunk = chunk
        self.pause = pause
        self._periodic = Periodic("telemetry-retention", self._tick, interval)
        self._stop = self._periodic.stopping

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()

    def _tick(self) -> None:
        try:
            self.run_once()
        except sa.exc.SQLAlchemyError as exc:
            log.error("telemetry retention failed (%s); trying again later", exc)

    def run_once(self, now: float | None = None) -> RetentionResult:
        """One pass: delete everything older than ``now - max_age``, chunk by chunk."""
        cutoff = (time.time() if now is None else now) - self.max_age
        with self.engine.connect() as conn:
            postgres = conn.dialect.name == "postgresql"
            if postgres and not self._try_lock(conn):
                return RetentionResult(0, 0, skipped=True)
            try:
                done = [
                    self._delete_older(conn, table, column, cutoff) for table, column in _TABLES
                ]
            finally:
                if postgres:
                    conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:k)"), {"k": RETENTION_LOCK_KEY}
                    )
                    conn.commit()
        (samples, sample_chunks), (keys, key_chunks) = done
        if samples or keys:
            log.info(
                "telemetry retention: deleted %d samples and %d batch keys older than %.0fs",
                samples,
                keys,
                self.max_age,
            )
        return RetentionResult(samples, keys, sample_chunks + key_chunks)

    @staticmethod
    def _try_lock(conn: Connection) -> bool:
        locked = conn.execute(
            sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": RETENTION_LOCK_KEY}
        ).scalar_one()
        conn.commit()
        return bool(locked)

    def _delete_older(
        self, conn: Connection, table: str, column: str, cutoff: float
    ) -> tuple[int, int]:
        """(rows deleted, chunks) for one table."""
        statement = _delete_chunk(conn.dialect.name, table, column)
        total = chunks = 0
        while not self._stop.is_set():
            with conn.begin():
                deleted = conn.execute(statement, {"cutoff": cutoff, "chunk": self.chunk}).rowcount
            total += deleted
            chunks += 1
            if self.metrics is not None and deleted:
                self.metrics.retention_deleted.labels(table=table).inc(deleted)
            if deleted < self.chunk:
                break
            self._stop.wait(self.pause)  # let the ingest in between two chunks
        return total, chunks

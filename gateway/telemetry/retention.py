"""Retention: whole chunk windows, days of chunks and weeks of rollups go once they are old.

Raw samples (compacted or not) are kept ``max_age`` seconds, rollups ``rollup_max_age``
(longer, typically: a year of hourly and minute rollups costs a fraction of a month of samples).
What goes is always a whole unit, on both databases alike, so SQLite and PostgreSQL keep exactly
the same data:

=====================  ===================  ============================================
what                   unit                 PostgreSQL / SQLite
=====================  ===================  ============================================
raw samples            a chunk window (1h)  DROP of the window's partition / DELETE of
                                            the rows of that window
chunks                 a day                DROP of the day's partition / DELETE of the
                                            day's chunk rows (one per series and window)
rollups (1m and 1h)    a week               DROP of the week's partition / DELETE of its
                                            rollup rows
=====================  ===================  ============================================

A unit goes once all of it is older than the age, so data is kept at least the configured age
and at most one unit longer. Raw samples are normally compacted long before their age; the raw
step only removes what the compaction has not reached (samples that arrived very late, in the
default partition, are deleted row by row).

Batch keys (``telemetry_batches``) are not time-partitioned: their primary key must be unique
across all time to drop redelivered batches. They are deleted in chunks of ``chunk`` rows, each
its own short transaction, stored longer ago than ``max_age``; a batch redelivered after its key
was deleted would be stored again, which can only happen to a message older than that.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gateway.telemetry import partitions
from gateway.telemetry.metrics import TelemetryMetrics
from gateway.telemetry.partitions import (
    CHUNK_PARENT,
    CHUNK_PARTITION_SECONDS,
    CHUNK_SECONDS,
    RAW_DEFAULT,
    RAW_PARENT,
    ROLLUP_PARENTS,
    ROLLUP_PARTITION_SECONDS,
    floor_to,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE: Final = 30 * 86400
DEFAULT_ROLLUP_MAX_AGE: Final = 365 * 86400
DEFAULT_INTERVAL: Final = 300.0
DEFAULT_CHUNK: Final = 5_000
DEFAULT_PAUSE: Final = 0.02

# table -> (column of its time, unit in seconds) for the whole-unit deletes on SQLite
_UNITS: Final = {
    CHUNK_PARENT: ("window_start", CHUNK_PARTITION_SECONDS),
    **{name: ("start", ROLLUP_PARTITION_SECONDS) for name in ROLLUP_PARENTS},
}


@dataclass(slots=True)
class RetentionResult:
    dropped: dict[str, int] = field(default_factory=dict)
    """Units dropped per table (PostgreSQL partitions; on SQLite whole units of rows)."""
    raw_samples: int = 0
    """Raw samples deleted row by row (SQLite, or PostgreSQL's default partition)."""
    batches: int = 0
    """Batch keys deleted."""


class Retention:
    def __init__(
        self,
        engine: Engine,
        max_age: float = DEFAULT_MAX_AGE,
        rollup_max_age: float | None = None,
        metrics: TelemetryMetrics | None = None,
        *,
        chunk: int = DEFAULT_CHUNK,
        pause: float = DEFAULT_PAUSE,
        stop: threading.Event | None = None,
    ) -> None:
        rollup_max_age = max_age if rollup_max_age is None else rollup_max_age
        if max_age <= 0 or rollup_max_age <= 0:
            raise ValueError(f"telemetry retention must be positive, got {max_age}")
        if rollup_max_age < max_age:
            raise ValueError(
                f"rollups ({rollup_max_age:.0f}s) cannot be kept shorter than the samples "
                f"({max_age:.0f}s)"
            )
        if chunk < 1:
            raise ValueError(f"retention chunk must be at least 1, got {chunk}")
        self.engine = engine
        self.max_age = max_age
        self.rollup_max_age = rollup_max_age
        self.metrics = metrics
        self.chunk = chunk
        self.pause = pause
        self._stop = stop or threading.Event()

    def run_once(self, now: float) -> RetentionResult:
        """One pass; the caller makes sure only one replica runs it (`maintenance`)."""
        result = RetentionResult()
        raw_cutoff = now - self.max_age
        rollup_cutoff = now - self.rollup_max_age
        with self.engine.connect() as conn:
            postgres = conn.dialect.name == "postgresql"
            if postgres:
                self._count(result, RAW_PARENT, partitions.drop_older(
                    conn, RAW_PARENT, raw_cutoff, CHUNK_SECONDS
                ))  # fmt: skip
                result.raw_samples = self._delete_rows(
                    conn, RAW_DEFAULT, "ts", floor_to(raw_cutoff, CHUNK_SECONDS)
                )
                self._count(result, CHUNK_PARENT, partitions.drop_older(
                    conn, CHUNK_PARENT, raw_cutoff, CHUNK_PARTITION_SECONDS
                ))  # fmt: skip
                for parent in ROLLUP_PARENTS:
                    self._count(result, parent, partitions.drop_older(
                        conn, parent, rollup_cutoff, ROLLUP_PARTITION_SECONDS
                    ))  # fmt: skip
            else:
                result.raw_samples = self._delete_rows(
                    conn, RAW_PARENT, "ts", floor_to(raw_cutoff, CHUNK_SECONDS)
                )
                for table, (column, unit) in _UNITS.items():
                    cutoff = raw_cutoff if table == CHUNK_PARENT else rollup_cutoff
                    self._count(
                        result, table, self._delete_units(conn, table, column, cutoff, unit)
                    )
            result.batches = self._delete_rows(conn, "telemetry_batches", "received_at", raw_cutoff)
        if any(result.dropped.values()) or result.raw_samples or result.batches:
            log.info(
                "telemetry retention: dropped %s; deleted %d late raw samples and %d batch keys",
                ", ".join(f"{n} of {t}" for t, n in result.dropped.items() if n) or "nothing",
                result.raw_samples,
                result.batches,
            )
        return result

    def _count(self, result: RetentionResult, table: str, units: int) -> None:
        result.dropped[table] = units
        if self.metrics is not None and units:
            self.metrics.retention_dropped.labels(table=table).inc(units)

    @staticmethod
    def _delete_units(conn: Connection, table: str, column: str, cutoff: float, unit: int) -> int:
        """SQLite: delete every whole unit older than ``cutoff``; how many units had rows."""
        end = floor_to(cutoff, unit)
        with partitions.begin(conn):
            units = conn.execute(
                sa.text(
                    f"SELECT count(DISTINCT {column} / {unit}) FROM {table} "  # noqa: S608
                    f"WHERE {column} < :end"
                ),
                {"end": end},
            ).scalar_one()
            conn.execute(
                sa.text(f"DELETE FROM {table} WHERE {column} < :end"),  # noqa: S608
                {"end": end},
            )
        return int(units)

    def _delete_rows(self, conn: Connection, table: str, column: str, cutoff: float) -> int:
        """Delete rows older than ``cutoff`` in chunks, each its own transaction."""
        if conn.dialect.name == "postgresql":
            statement = sa.text(
                f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("  # noqa: S608 (names are constants)
                f"SELECT ctid FROM {table} WHERE {column} < :cutoff LIMIT :chunk))"
            )
        else:
            statement = sa.text(
                f"DELETE FROM {table} WHERE rowid IN ("  # noqa: S608 (names are constants)
                f"SELECT rowid FROM {table} WHERE {column} < :cutoff LIMIT :chunk)"
            )
        total = 0
        while not self._stop.is_set():
            with partitions.begin(conn):
                deleted = conn.execute(statement, {"cutoff": cutoff, "chunk": self.chunk}).rowcount
            total += deleted
            if self.metrics is not None and deleted:
                self.metrics.retention_deleted.labels(table=table).inc(deleted)
            if deleted < self.chunk:
                break
            self._stop.wait(self.pause)  # let the ingest in between two chunks
        return total

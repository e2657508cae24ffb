"""The telemetry background job: partitions, compaction and retention, on one replica.

One `Periodic` thread per replica wakes every ``interval`` seconds. With PostgreSQL it first takes a
session advisory lock on a connection of its own for the pass: the replica holding it runs the
pass, the others skip theirs; a replica killed mid-pass loses its connection, PostgreSQL
releases the lock, and the next pass of another replica picks up the work (the compaction's
transactions make a cut-off pass harmless, see `compaction`). With SQLite there is one replica.

A pass: retention (every ``retention_interval``), then the compaction of closed windows. Errors
are logged and counted; the next pass tries again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.telemetry import partitions
from gateway.telemetry.compaction import DEFAULT_COMPACT_AFTER, CompactionResult, Compactor
from gateway.telemetry.metrics import TelemetryMetrics
from gateway.telemetry.retention import (
    DEFAULT_INTERVAL as DEFAULT_RETENTION_INTERVAL,
)
from gateway.telemetry.retention import (
    DEFAULT_MAX_AGE,
    Retention,
    RetentionResult,
)
from provisioning.periodic import Periodic

log = logging.getLogger(__name__)

DEFAULT_INTERVAL: Final = 60.0
MAINTENANCE_LOCK_KEY: Final = 0x6564_6774_656C  # any constant shared by all replicas


@dataclass(frozen=True, slots=True)
class PassResult:
    compaction: CompactionResult | None
    retention: RetentionResult | None
    skipped: bool = False
    """Another replica holds the lock."""


def prepare(engine: Engine, now: float | None = None) -> None:
    """Before the ingest starts (every replica): raw partitions for now and the next windows."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        partitions.ensure_raw(conn, time.time() if now is None else now)


class TelemetryMaintenance:
    def __init__(
        self,
        engine: Engine,
        *,
        compact_after: float = DEFAULT_COMPACT_AFTER,
        compact_pace: float = 0.0,
        retention: float = DEFAULT_MAX_AGE,
        rollup_retention: float | None = None,
        metrics: TelemetryMetrics | None = None,
        interval: float = DEFAULT_INTERVAL,
        retention_interval: float = DEFAULT_RETENTION_INTERVAL,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.interval = interval
        self.retention_interval = retention_interval
        self._periodic = Periodic("telemetry-maintenance", self._tick, interval)
        stopping = self._periodic.stopping
        self.compactor = Compactor(engine, compact_after, pace=compact_pace, stop=stopping)
        self.retention = Retention(engine, retention, rollup_retention, metrics, stop=stopping)
        self._retention_due = 0.0

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()

    def _tick(self) -> None:
        try:
            self.run_once()
        except (sa.exc.SQLAlchemyError, ValueError) as exc:
            if self.metrics is not None:
                self.metrics.maintenance_errors.inc()
            log.error("telemetry maintenance failed (%s); trying again later", exc)

    def run_once(self, now: float | None = None, *, retention: bool | None = None) -> PassResult:
        """One pass (retention when due, or as ``retention`` says; then the compaction)."""
        now = time.time() if now is None else now
        with self._leader() as leading:
            if not leading:
                return PassResult(None, None, skipped=True)
            kept = None
            due = time.monotonic() >= self._retention_due if retention is None else retention
            if due:
                self._retention_due = time.monotonic() + self.retention_interval
                kept = self.retention.run_once(now)
            compacted = self.compactor.run_once(now)
        if self.metrics is not None:
            self.metrics.compacted.inc(compacted.samples)
            self.metrics.compaction_seconds.inc(compacted.seconds)
        return PassResult(compacted, kept)

    @contextlib.contextmanager
    def _leader(self) -> Iterator[bool]:
        if self.engine.dialect.name != "postgresql":
            yield True
            return
        with self.engine.connect() as conn:
            key = {"k": MAINTENANCE_LOCK_KEY}
            got = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), key).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), key)
                    conn.commit()

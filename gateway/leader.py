"""Singleton jobs: run by exactly one replica at a time.

With PostgreSQL, the replica holding a session-level advisory lock on a connection of its own is
the leader; when it dies its connection drops, PostgreSQL releases the lock, and another replica
takes it at its next try (every `retry` seconds). With SQLite there is one replica (the data
directory is locked), so it is always the leader.

Jobs must be safe to run again after a leader change (a transaction per step): a job that was cut
off mid-way by the death of its replica is re-run by the next leader, never run by two at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from provisioning.periodic import Periodic

log = logging.getLogger(__name__)

LEADER_LOCK_KEY = 0x6564_6765_6C64  # "edgeld"; one constant shared by every replica


@dataclass
class Job:
    name: str
    interval: float
    run: Callable[[], None]
    next_at: float = field(default=0.0)


class LeaderElection:
    def __init__(self, engine: Engine, retry: float = 2.0) -> None:
        self._engine = engine
        self._retry = retry
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._next_try = 0.0
        self.changes = 0  # how often leadership was gained, for logs and tests

    @property
    def uses_lock(self) -> bool:
        return self._engine.dialect.name == "postgresql"

    def check(self) -> bool:
        """Are we the leader now? Tries to become it if not; drops it if the connection died."""
        if not self.uses_lock:
            return True
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute(sa.text("SELECT 1"))
                    return True
                except sa.exc.DBAPIError:
                    log.warning("lost the leader connection; leadership is open again")
                    self._close()
            if time.monotonic() < self._next_try:
                return False
            self._next_try = time.monotonic() + self._retry
            try:
                conn = self._engine.connect()
            except sa.exc.OperationalError as exc:
                log.warning("cannot reach the database for the leader election: %s", exc)
                return False
            got = conn.execute(
                sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": LEADER_LOCK_KEY}
            ).scalar()
            conn.commit()
            if got:
                self._conn = conn
                self.changes += 1
                log.info("this replica is now the leader (runs the singleton jobs)")
                return True
            conn.close()
            return False

    def resign(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:k)"), {"k": LEADER_LOCK_KEY}
                    )
                    self._conn.commit()
                except sa.exc.DBAPIError:
                    pass
                self._close()

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sa.exc.DBAPIError):
                self._conn.close()
            self._conn = None


class SingletonJobs:
    """Runs registered jobs on their intervals, only while this replica is the leader."""

    def __init__(self, election: LeaderElection, tick: float = 0.5) -> None:
        self._election = election
        self._jobs: list[Job] = []
        self._periodic = Periodic("singleton-jobs", self.run_due, tick, first_at_start=True)
        self.is_leader = False

    def add(self, name: str, interval: float, run: Callable[[], None]) -> None:
        self._jobs.append(Job(name, interval, run))

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop(timeout=10)
        self._election.resign()

    def run_due(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.is_leader = self._election.check()
        if not self.is_leader:
            return
        for job in self._jobs:
            if now >= job.next_at:
                job.next_at = now + job.interval
                try:
                    job.run()
                except Exception:
                    log.exception("job %s failed; next try in %.0fs", job.name, job.interval)

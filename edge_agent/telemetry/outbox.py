"""The agent's disk-backed telemetry outbox: nothing is sent that was not stored first.

Samples go into an SQLite database (WAL) the moment they are accepted and leave it only when the
broker has acknowledged the batch that carried them (QoS 1 PUBACK). Broker down, network gone,
agent restarted: the samples wait on disk, and go out oldest first when the way is back.

Batches. `next_batch` groups the oldest unbatched samples into a batch and gives it the next
sequence number, assigned **once** and written in the same transaction. A batch is a contiguous
range of sample row ids, so a batch handed out, lost and handed out again (after a reconnect or
a restart) has the same ``seq`` and the same samples; the gateway's unique ``(device, seq)``
key then stores it exactly once. Batches are deleted whole (ack, or a drop widened to whole
batches), so every row of a live batch exists, and SQLite gives a new row ``max(rowid) + 1``:
new samples always land above the newest live batch. "Unbatched" is therefore "id above the
newest live batch's range", a watermark kept in memory and recomputed when that batch goes.
(AUTOINCREMENT would also do, at 40% of the insert rate.)

Bound. When ``max_samples`` would be exceeded, the oldest samples are dropped and counted in a
persisted ``dropped`` counter. A drop that reaches into a batch drops the whole batch, so a
sequence number never names two different sets of samples.

Memory. The data lives on disk; Python holds no per-sample state, so RSS stays flat whether
ten or a million samples wait. SQLite's page cache is its default (about 2 MiB).

Durability. ``synchronous=NORMAL`` (the default here) survives a crash of the agent process,
not a power cut in the last moments before it; ``synchronous="FULL"`` fsyncs every commit for
devices whose power may vanish, at a cost in samples/s.

Threads. One connection behind one lock: the intake thread adds, the sender thread takes
batches and acks; each call is one short transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Self

from provisioning.telemetry import (
    DEFAULT_MAX_FUTURE_SKEW,
    Sample,
    check_samples,
    encode_batch,
)

log = logging.getLogger(__name__)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS sample (
    id INTEGER PRIMARY KEY,
    metric TEXT NOT NULL,
    ts REAL NOT NULL,
    value REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch (
    seq INTEGER PRIMARY KEY,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counter (name, value) VALUES ('next_seq', 1), ('dropped', 0);
"""


class OutboxError(RuntimeError):
    """The outbox cannot store or read samples (disk full, database damaged, closed)."""


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """A batch waiting for its PUBACK. Same ``seq``, same samples, however often it is sent."""

    seq: int
    samples: list[Sample]

    def encode(self) -> bytes:
        """The telemetry wire payload of this batch."""
        return encode_batch(self.seq, self.samples)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """What the agent reports in its status."""

    queued: int
    """Samples stored and not yet acknowledged by the broker."""
    dropped: int
    """Samples dropped because the outbox was full, since the database was created."""
    next_seq: int
    """The sequence number the next new batch will get."""
    oldest_age: float | None
    """Seconds between the oldest queued sample's timestamp and now; None when empty."""
    batches_pending: int
    """Batches handed out and not yet acknowledged."""


class Outbox:
    """A bounded, disk-backed queue of samples that leaves in numbered batches.

    ``add`` validates and stores samples (``BatchRejected`` for a bad one: nothing of that call
    is stored); ``next_batch`` hands out the oldest batch after a given sequence number;
    ``ack`` deletes a batch once the broker has it.
    """

    def __init__(
        self,
        path: Path,
        max_samples: int = 1_000_000,
        batch_size: int = 100,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        max_future_skew: float = DEFAULT_MAX_FUTURE_SKEW,
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if batch_size > max_samples:
            raise ValueError(f"batch_size {batch_size} is larger than max_samples {max_samples}")
        self.path = path
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.max_future_skew = max_future_skew
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db: sqlite3.Connection | None = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None
            )
            # Exclusive: one agent owns its outbox; a second opener fails instead of both
            # handing out sequence numbers from the same counter.
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_SCHEMA)
            self._queued = int(self._db.execute("SELECT count(*) FROM sample").fetchone()[0])
            self._batched_upto = self._newest_batch_end(self._db)
        except sqlite3.Error as exc:
            hint = " (is another agent using it?)" if "locked" in str(exc) else ""
            raise OutboxError(f"cannot open the outbox at {path}: {exc}{hint}") from exc
        log.info("outbox %s open: %d samples queued", path, self._queued)

    # -- adding -----------------------------------------------------------------------------

    def add(self, samples: Iterable[Sample]) -> int:
        """Validate and store samples; return how many were stored.

        Validation comes first, so a bad sample raises `BatchRejected` and nothing of this call
        is stored. If the outbox would overflow, the oldest samples are dropped and counted.
        """
        rows = check_samples(samples, now=time.time(), max_future_skew=self.max_future_skew)
        return self._store(rows)

    def add_values(self, values: dict[str, float], ts: float | None = None) -> int:
        """Store one sample per metric, all stamped ``ts`` (default: now)."""
        when = time.time() if ts is None else ts
        return self.add([Sample(metric, when, value) for metric, value in values.items()])

    def _store(self, rows: list[Sample]) -> int:
        if not rows:
            return 0
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                excess = len(rows) - self.max_samples
                dropped_new = 0
                if excess > 0:  # one call larger than the whole outbox: keep its newest part
                    rows = rows[excess:]
                    dropped_new = excess
                overflow = self._queued + len(rows) - self.max_samples
                dropped_old = self._drop_oldest(db, overflow) if overflow > 0 else 0
                db.executemany("INSERT INTO sample (metric, ts, value) VALUES (?, ?, ?)", rows)
                dropped = dropped_new + dropped_old
                if dropped:
                    db.execute(
                        "UPDATE counter SET value = value + ? WHERE name = 'dropped'", (dropped,)
                    )
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(db)
                self._reload_counts(db)
                raise OutboxError(f"could not store {len(rows)} samples: {exc}") from exc
            self._queued += len(rows) - dropped_old
            listeners = list(self._listeners)
        if dropped:
            log.warning(
                "outbox full (%d samples): dropped the %d oldest", self.max_samples, dropped
            )
        for listener in listeners:
            listener()
        return len(rows)

    def _drop_oldest(self, db: sqlite3.Connection, count: int) -> int:
        """Delete at least ``count`` oldest samples, widening to whole batches; return how many."""
        row = db.execute("SELECT id FROM sample ORDER BY id LIMIT 1 OFFSET ?", (count - 1,))
        found = row.fetchone()
        if found is None:  # fewer stored than asked: drop everything
            cutoff = int(db.execute("SELECT coalesce(max(id), 0) FROM sample").fetchone()[0])
        else:
            cutoff = int(found[0])
        inside = db.execute(
            "SELECT last_id FROM batch WHERE first_id <= ? AND last_id >= ?", (cutoff, cutoff)
        ).fetchone()
        if inside is not None:
            cutoff = int(inside[0])
        removed = db.execute("DELETE FROM sample WHERE id <= ?", (cutoff,)).rowcount
        db.execute("DELETE FROM batch WHERE last_id <= ?", (cutoff,))
        self._batched_upto = self._newest_batch_end(db)
        return int(removed)

    @staticmethod
    def _newest_batch_end(db: sqlite3.Connection) -> int:
        """The last sample id of the newest live batch (0 if none): the batched watermark."""
        row = db.execute("SELECT last_id FROM batch ORDER BY seq DESC LIMIT 1").fetchone()
        return 0 if row is None else int(row[0])

    # -- sending ----------------------------------------------------------------------------

    def next_batch(self, after: int = 0) -> PendingBatch | None:
        """The oldest unacknowledged batch with ``seq > after``, or None if nothing waits.

        Batches already numbered come back unchanged; past them, the oldest unbatched samples
        (up to ``batch_size``) become a new batch whose number is stored before it is returned.
        A sender keeps ``after`` as its cursor; ``after=0`` starts again from the oldest.
        """
        with self._lock:
            db = self._conn()
            try:
                found = db.execute(
                    "SELECT seq, first_id, last_id FROM batch WHERE seq > ? ORDER BY seq LIMIT 1",
                    (after,),
                ).fetchone()
                if found is not None:
                    seq, first, last = (int(v) for v in found)
                    return PendingBatch(seq, self._samples(db, first, last))
                return self._new_batch(db)
            except sqlite3.Error as exc:
                self._rollback(db)
                raise OutboxError(f"could not read the next batch: {exc}") from exc

    def _new_batch(self, db: sqlite3.Connection) -> PendingBatch | None:
        rows = db.execute(
            "SELECT id, metric, ts, value FROM sample WHERE id > ? ORDER BY id LIMIT ?",
            (self._batched_upto, self.batch_size),
        ).fetchall()
        if not rows:
            return None
        first, last = int(rows[0][0]), int(rows[-1][0])
        db.execute("BEGIN IMMEDIATE")
        seq = int(db.execute("SELECT value FROM counter WHERE name = 'next_seq'").fetchone()[0])
        db.execute("UPDATE counter SET value = ? WHERE name = 'next_seq'", (seq + 1,))
        db.execute(
            "INSERT INTO batch (seq, first_id, last_id) VALUES (?, ?, ?)", (seq, first, last)
        )
        db.execute("COMMIT")
        self._batched_upto = last
        return PendingBatch(seq, [Sample(m, t, v) for _, m, t, v in rows])

    @staticmethod
    def _samples(db: sqlite3.Connection, first: int, last: int) -> list[Sample]:
        rows = db.execute(
            "SELECT metric, ts, value FROM sample WHERE id BETWEEN ? AND ? ORDER BY id",
            (first, last),
        )
        return [Sample(m, t, v) for m, t, v in rows]

    def ack(self, seq: int) -> bool:
        """Delete batch ``seq`` and its samples: the broker has it. False if it is not here.

        An unknown ``seq`` is normal: a batch acked twice (a duplicate PUBACK after a
        reconnect) or dropped by the bound while it was in flight.
        """
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                found = db.execute(
                    "SELECT first_id, last_id FROM batch WHERE seq = ?", (seq,)
                ).fetchone()
                if found is None:
                    db.execute("COMMIT")
                    return False
                removed = db.execute(
                    "DELETE FROM sample WHERE id BETWEEN ? AND ?", (found[0], found[1])
                ).rowcount
                db.execute("DELETE FROM batch WHERE seq = ?", (seq,))
                if found[1] == self._batched_upto:  # the newest batch went: lower the mark
                    self._batched_upto = self._newest_batch_end(db)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(db)
                self._reload_counts(db)
                raise OutboxError(f"could not acknowledge batch {seq}: {exc}") from exc
            self._queued -= int(removed)
            return True

    # -- watching ---------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from the adding thread, outside the lock) after each add."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.remove(listener)

    def stats(self) -> OutboxStats:
        with self._lock:
            db = self._conn()
            counters = dict(db.execute("SELECT name, value FROM counter").fetchall())
            oldest = db.execute("SELECT ts FROM sample ORDER BY id LIMIT 1").fetchone()
            pending = int(db.execute("SELECT count(*) FROM batch").fetchone()[0])
            return OutboxStats(
                queued=self._queued,
                dropped=int(counters["dropped"]),
                next_seq=int(counters["next_seq"]),
                oldest_age=None if oldest is None else max(0.0, time.time() - float(oldest[0])),
                batches_pending=pending,
            )

    def __len__(self) -> int:
        return self._queued

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError(f"the outbox at {self.path} is closed")
        return self._db

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        if db.in_transaction:
            db.execute("ROLLBACK")

    def _reload_counts(self, db: sqlite3.Connection) -> None:
        """After a failed write, trust the database rather than our arithmetic."""
        try:
            self._queued = int(db.execute("SELECT count(*) FROM sample").fetchone()[0])
            self._batched_upto = self._newest_batch_end(db)
        except sqlite3.Error:
            log.exception("outbox %s: cannot recount samples", self.path)

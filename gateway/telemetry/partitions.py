"""Time windows of telemetry storage, and the PostgreSQL partitions that hold them.

Windows. Raw samples are compacted per series and `CHUNK_SECONDS` window (an hour, aligned to
the epoch, so a window is also exactly one hourly rollup). Chunks are kept in day-wide
partitions (`CHUNK_PARTITION_SECONDS`), rollups in week-wide ones (`ROLLUP_PARTITION_SECONDS`).
Retention drops whole partitions on PostgreSQL and deletes the same whole units on SQLite, so
both keep exactly the same data: a chunk stays until its whole day is older than the retention,
a rollup until its whole week is.

PostgreSQL partitions (declarative, by range):

- ``telemetry_samples_p<window start>`` for the current window and the next few, made ahead of
  time (`ensure_raw`); ``telemetry_samples_default`` takes whatever has no partition (late
  samples of a window already sealed, or a window not made yet).
- A window that has closed is *sealed* (`seal`): in one short transaction its partition is
  detached from ``telemetry_samples`` and made a child of ``telemetry_samples_sealed`` by table
  inheritance. From then on the ingest cannot write there (samples arriving late for that window
  go to the default partition), queries still read it, and the compaction reads it without any
  lock that would stop the ingest.
- ``telemetry_chunks_p<day start>``, ``telemetry_rollups_1m_p<week start>``,
  ``telemetry_rollups_1h_p<week start>`` are made before a compaction writes into them.

DDL on a partitioned table briefly takes an exclusive lock on it; each of these statements runs
with a short ``lock_timeout`` so that a long query in the way makes the step wait for the next
pass instead of stalling the ingest behind it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RootTransaction

log = logging.getLogger(__name__)

CHUNK_SECONDS: Final = 3600
CHUNK_PARTITION_SECONDS: Final = 86400
ROLLUP_PARTITION_SECONDS: Final = 7 * 86400
RAW_AHEAD: Final = 3
"""Raw partitions made ahead of the current window."""
LOCK_TIMEOUT: Final = "500ms"

RAW_PARENT: Final = "telemetry_samples"
RAW_DEFAULT: Final = "telemetry_samples_default"
SEALED_PARENT: Final = "telemetry_samples_sealed"
CHUNK_PARENT: Final = "telemetry_chunks"
ROLLUP_PARENTS: Final = ("telemetry_rollups_1m", "telemetry_rollups_1h")
_PARTITION = re.compile(r"^telemetry_(samples|chunks|rollups_1m|rollups_1h)_(p\d+|default)$")


def is_partition(name: str | None) -> bool:
    """A table made at run time (a partition or a sealed window), not by the migrations."""
    return bool(name and _PARTITION.match(name))


def window_of(ts: float) -> int:
    return int(ts // CHUNK_SECONDS) * CHUNK_SECONDS


def floor_to(value: float, width: int) -> int:
    return int(value // width) * width


def raw_name(window: int) -> str:
    return f"{RAW_PARENT}_p{window}"


def _partition_name(parent: str, start: int) -> str:
    return f"{parent}_p{start}"


def _start_of(name: str) -> int:
    return int(name.rsplit("_p", 1)[1])


def begin(conn: Connection) -> RootTransaction:
    """A new transaction on ``conn``, ending the one a plain query may have begun."""
    if conn.in_transaction():
        conn.commit()
    return conn.begin()


def _lock_timeout(conn: Connection) -> None:
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")


def _tables_like(conn: Connection, prefix: str) -> list[str]:
    rows = conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
            "AND c.relname LIKE :pattern"
        ),
        {"pattern": prefix.replace("_", r"\_") + r"\_p%"},
    )
    return sorted((str(name) for name in rows.scalars()), key=_start_of)


def attached_raw(conn: Connection) -> list[int]:
    """Window starts of the raw partitions the ingest writes into, oldest first."""
    rows = conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = CAST(:parent AS regclass) AND c.relname <> :default"
        ),
        {"parent": RAW_PARENT, "default": RAW_DEFAULT},
    )
    return sorted(_start_of(str(name)) for name in rows.scalars())


def sealed_raw(conn: Connection) -> list[int]:
    """Window starts of the sealed raw partitions (waiting for the compaction), oldest first."""
    rows = conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = CAST(:parent AS regclass)"
        ),
        {"parent": SEALED_PARENT},
    )
    return sorted(_start_of(str(name)) for name in rows.scalars())


def _create(conn: Connection, parent: str, start: int, width: int) -> bool:
    """Make one partition in its own transaction; False if it cannot be made now."""
    name = _partition_name(parent, start)
    try:
        with begin(conn):
            _lock_timeout(conn)
            conn.exec_driver_sql(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {parent} "
                f"FOR VALUES FROM ({start}) TO ({start + width})"
            )
    except sa.exc.DBAPIError as exc:
        # A lock that did not come in time, or the default partition already holding samples
        # of that range (they stay there and are compacted from there).
        log.info("telemetry: partition %s not made now: %s", name, _first_line(exc))
        return False
    return True


def _first_line(exc: sa.exc.DBAPIError) -> str:
    return str(exc.orig or exc).strip().splitlines()[0]


def ensure_raw(conn: Connection, now: float) -> None:
    """Raw partitions for the current window and the next `RAW_AHEAD` (PostgreSQL)."""
    current = window_of(now)
    have = set(attached_raw(conn)) | set(sealed_raw(conn))
    for window in range(current, current + (RAW_AHEAD + 1) * CHUNK_SECONDS, CHUNK_SECONDS):
        if window not in have:
            _create(conn, RAW_PARENT, window, CHUNK_SECONDS)


def ensure_for_windows(conn: Connection, windows: Iterable[int]) -> bool:
    """The chunk and rollup partitions the compaction of ``windows`` writes into."""
    wanted: set[tuple[str, int, int]] = set()
    for window in windows:
        day = floor_to(window, CHUNK_PARTITION_SECONDS)
        wanted.add((CHUNK_PARENT, day, CHUNK_PARTITION_SECONDS))
        week = floor_to(window, ROLLUP_PARTITION_SECONDS)
        for parent in ROLLUP_PARENTS:
            wanted.add((parent, week, ROLLUP_PARTITION_SECONDS))
    existing = {
        parent: {_start_of(n) for n in _tables_like(conn, parent)}
        for parent in {CHUNK_PARENT, *ROLLUP_PARENTS}
    }
    ok = True
    for parent, start, width in sorted(wanted):
        if start not in existing[parent]:
            ok = _create(conn, parent, start, width) and ok
    return ok


def seal(conn: Connection, window: int) -> bool:
    """Detach a closed window's raw partition and hand it to the sealed parent (one txn)."""
    name = raw_name(window)
    try:
        with begin(conn):
            _lock_timeout(conn)
            conn.exec_driver_sql(f"ALTER TABLE {RAW_PARENT} DETACH PARTITION {name}")
            conn.exec_driver_sql(f"ALTER TABLE {name} INHERIT {SEALED_PARENT}")
    except sa.exc.DBAPIError as exc:
        log.info("telemetry: window %s not sealed now: %s", name, _first_line(exc))
        return False
    return True


def drop_older(conn: Connection, parent: str, cutoff: float, width: int) -> int:
    """Drop the partitions of ``parent`` whose whole range is older than ``cutoff``."""
    dropped = 0
    for name in _tables_like(conn, parent):
        if _start_of(name) + width > cutoff:
            break
        try:
            with begin(conn):
                _lock_timeout(conn)
                conn.exec_driver_sql(f"DROP TABLE {name}")
        except sa.exc.DBAPIError as exc:
            log.info("telemetry retention: %s not dropped now: %s", name, _first_line(exc))
            continue
        dropped += 1
    return dropped

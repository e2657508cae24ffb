"""Compaction: closed chunk windows of raw samples become encoded chunks plus rollups.

A window is *closed* once its end is older than ``compact_after``. For each closed window
that still has raw samples, the samples of a group of devices are taken, merged with whatever
of those devices was compacted into that window before (late samples), and written back as:

- one `chunks` row per series and window (values encoded with `codec`; the timestamps stored
  once per set of series of a device that share them);
- `rollups` rows per series and minute and per series and hour (replaced, not added to).

Each step is one transaction in which the raw samples disappear and their chunks appear, so a
crash (kill -9 of the replica doing it) at any moment leaves either the raw samples or the
chunks, never both and never neither. Where the raw samples come from:

- SQLite, and samples in PostgreSQL's default partition: ``DELETE ... RETURNING`` per group of
  devices, a short transaction each (on SQLite the ingest waits for the write lock only that
  long);
- a sealed PostgreSQL partition (`partitions.seal`): read in one transaction (nobody writes to
  it any more, and reading takes no lock the ingest needs), then dropped in the same
  transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gateway.telemetry import codec, partitions
from gateway.telemetry.models import chunks, series
from gateway.telemetry.partitions import CHUNK_SECONDS
from gateway.telemetry.rollups import LEVELS, summarise, upsert_sql

log = logging.getLogger(__name__)

DEFAULT_COMPACT_AFTER: Final = 3600
GROUP_SERIES: Final = 200
"""Series per step (their devices' whole window); fewer on SQLite, where a step holds the lock."""
GROUP_SERIES_SQLITE: Final = 40
_DROP_TRIES: Final = 10
VACUUM_AFTER: Final = 100_000
"""Samples drained from PostgreSQL's default partition in one pass that make it vacuum it."""

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

# A float8[] in PostgreSQL's binary send format (array_send): a 20-byte header (dimensions,
# null flag, element type, length, lower bound), then per element its length and its value.
_ARRAY_HEADER: Final = 20
_ARRAY_ITEM: Final = np.dtype([("len", ">i4"), ("v", ">f8")])
_INSERT_CHUNK_PG: Final = (
    "INSERT INTO telemetry_chunks (series_id, count, window_start, last_ts, last_value, "
    "times_series_id, ts_data, data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)
_INSERT_CHUNK_SQLITE: Final = _INSERT_CHUNK_PG.replace("%s", "?")


@dataclass(frozen=True, slots=True)
class Rows:
    """Raw samples as column arrays."""

    series_id: Ints
    ts: Floats
    value: Floats

    def __len__(self) -> int:
        return len(self.series_id)

    @staticmethod
    def empty() -> Rows:
        return Rows(np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.float64))

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Rows.empty()
        return Rows(
            np.concatenate([p.series_id for p in parts]),
            np.concatenate([p.ts for p in parts]),
            np.concatenate([p.value for p in parts]),
        )

    def sorted(self) -> Rows:
        order = np.lexsort((self.ts, self.series_id))
        return Rows(self.series_id[order], self.ts[order], self.value[order])


@dataclass(slots=True)
class CompactionResult:
    windows: set[int] = field(default_factory=set)
    samples: int = 0
    """Raw samples turned into chunks by this pass."""
    chunks: int = 0
    """Chunk rows written (new, or rewritten with late samples)."""
    steps: int = 0
    """Transactions."""
    sealed: int = 0
    """PostgreSQL partitions sealed."""
    seconds: float = 0.0


def _floats(array_bytes: bytes) -> Floats:
    if len(array_bytes) <= _ARRAY_HEADER:  # an empty array has a shorter header
        return np.empty(0, np.float64)
    items = np.frombuffer(array_bytes, _ARRAY_ITEM, offset=_ARRAY_HEADER)
    return items["v"].astype(np.float64)


def fetch_rows(conn: Connection, rows_sql: str) -> Rows:
    """The (series_id, ts, value) rows that ``rows_sql`` gives (a SELECT, or on PostgreSQL a
    DELETE ... RETURNING too), as arrays.

    PostgreSQL gathers them per series into two arrays in its binary format, which numpy reads
    as they are: a Python object per sample would cost more than everything else here. SQLite
    hands over plain rows through its C cursor.
    """
    if conn.dialect.name == "postgresql":
        query = (
            f"WITH r AS ({rows_sql}) SELECT series_id, count(*), "  # noqa: S608 (ours)
            "array_send(array_agg(ts)), array_send(array_agg(value)) FROM r GROUP BY series_id"
        )
        parts = []
        for sid, count, ts, values in conn.exec_driver_sql(query):
            parts.append(
                Rows(np.full(int(count), int(sid), np.int64), _floats(ts), _floats(values))
            )
        return Rows.concat(parts)
    driver = conn.connection.driver_connection
    assert driver is not None
    found = driver.execute(rows_sql).fetchall()
    if not found:
        return Rows.empty()
    table = np.array(found, dtype=np.float64)
    return Rows(table[:, 0].astype(np.int64), table[:, 1].copy(), table[:, 2].copy())


def _id_list(ids: Iterable[int]) -> str:
    return ",".join(str(int(i)) for i in ids)


class Compactor:
    """Compacts closed windows; run by one replica at a time (`maintenance`)."""

    def __init__(
        self,
        engine: Engine,
        compact_after: float = DEFAULT_COMPACT_AFTER,
        *,
        group_series: int | None = None,
        pace: float = 0.0,
        stop: threading.Event | None = None,
    ) -> None:
        if compact_after <= 0:
            raise ValueError(f"compact_after must be positive, got {compact_after}")
        if pace < 0:
            raise ValueError(f"pace must be 0 or more, got {pace}")
        self.pace = pace
        """After each group, rest ``pace`` times as long as the group took: the compaction then
        takes at most 1 / (1 + pace) of a core and of the database's time, leaving the rest to
        the ingest (0: as fast as it can, for a backlog or a benchmark)."""
        self.engine = engine
        self.compact_after = compact_after
        self.postgres = engine.dialect.name == "postgresql"
        default_group = GROUP_SERIES if self.postgres else GROUP_SERIES_SQLITE
        self.group_series = group_series or default_group
        self._stop = stop or threading.Event()
        self._device_of: dict[int, str] = {}
        self._since = 0.0

    def closed(self, window: int, now: float) -> bool:
        return window + CHUNK_SECONDS <= now - self.compact_after

    # -- a pass --------------------------------------------------------------------------

    def run_once(self, now: float | None = None) -> CompactionResult:
        """Compact every closed window that has raw samples."""
        now = time.time() if now is None else now
        started = self._since = time.perf_counter()
        result = CompactionResult()
        with self.engine.connect() as conn:
            if self.postgres:
                self._postgres_pass(conn, now, result)
            else:
                for window in self._sqlite_windows(conn, now):
                    if self._stop.is_set():
                        break
                    self._drain(conn, "telemetry_samples", window, result)
        result.seconds = time.perf_counter() - started
        if result.samples:
            log.info(
                "telemetry compaction: %d samples of %d windows into %d chunks in %.1fs",
                result.samples,
                len(result.windows),
                result.chunks,
                result.seconds,
            )
        return result

    def _postgres_pass(self, conn: Connection, now: float, result: CompactionResult) -> None:
        partitions.ensure_raw(conn, now)
        for window in partitions.attached_raw(conn):
            if self.closed(window, now) and partitions.seal(conn, window):
                result.sealed += 1
        sealed = partitions.sealed_raw(conn)
        late = self._default_windows(conn, now)
        if not partitions.ensure_for_windows(conn, [*sealed, *late]):
            log.info("telemetry compaction: partitions missing; trying again at the next pass")
            return
        for window in sealed:
            if self._stop.is_set():
                return
            try:
                self._compact_sealed(conn, window, result)
            except _Stopped:
                return
        drained = result.samples
        for window in late:
            if self._stop.is_set():
                break
            self._drain(conn, partitions.RAW_DEFAULT, window, result)
        if result.samples - drained >= VACUUM_AFTER:
            self._vacuum_default()

    def _vacuum_default(self) -> None:
        """Many rows deleted from the default partition (an upgraded install's old samples,
        a long backlog): vacuum it now rather than leave its index full of dead entries that
        every query of recent samples would step over until autovacuum comes."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {partitions.RAW_DEFAULT}")

    def _default_windows(self, conn: Connection, now: float) -> list[int]:
        with partitions.begin(conn):
            found = conn.execute(
                sa.text(
                    f"SELECT DISTINCT CAST(floor(ts / {CHUNK_SECONDS}) AS bigint) "  # noqa: S608
                    f"FROM {partitions.RAW_DEFAULT} WHERE ts < :end"
                ),
                {"end": partitions.floor_to(now - self.compact_after, CHUNK_SECONDS)},
            ).scalars()
            return sorted(int(w) * CHUNK_SECONDS for w in found)

    def _sqlite_windows(self, conn: Connection, now: float) -> Iterator[int]:
        end = partitions.floor_to(now - self.compact_after, CHUNK_SECONDS)
        after = float("-inf")
        while True:
            with partitions.begin(conn):
                first = conn.execute(
                    sa.text("SELECT min(ts) FROM telemetry_samples WHERE ts >= :a AND ts < :e"),
                    {"a": after, "e": end},
                ).scalar()
            if first is None:
                return
            window = partitions.window_of(float(first))
            yield window
            after = float(window + CHUNK_SECONDS)

    # -- the two sources -----------------------------------------------------------------

    def _present(self, conn: Connection, table: str, window: int) -> list[int]:
        where = (
            ""
            if table.endswith(f"_p{window}")
            else (f" WHERE ts >= {window} AND ts < {window + CHUNK_SECONDS}")
        )
        query = f"SELECT DISTINCT series_id FROM {table}{where}"  # noqa: S608
        return [int(s) for s in conn.execute(sa.text(query)).scalars()]

    def _groups(self, conn: Connection, present: list[int]) -> list[tuple[list[str], list[int]]]:
        """(devices, their series present) in groups of about `group_series` series."""
        devices = self._devices(conn, present)
        by_device: dict[str, list[int]] = {}
        for sid in present:
            by_device.setdefault(devices[sid], []).append(sid)
        groups: list[tuple[list[str], list[int]]] = []
        names: list[str] = []
        ids: list[int] = []
        for device in sorted(by_device):
            names.append(device)
            ids.extend(by_device[device])
            if len(ids) >= self.group_series:
                groups.append((names, ids))
                names, ids = [], []
        if ids:
            groups.append((names, ids))
        return groups

    def _devices(self, conn: Connection, ids: Iterable[int]) -> dict[int, str]:
        missing = sorted(set(ids) - self._device_of.keys())
        for start in range(0, len(missing), 5000):
            part = missing[start : start + 5000]
            rows = conn.execute(
                sa.select(series.c.id, series.c.device_id).where(series.c.id.in_(part))
            )
            self._device_of.update({int(i): str(d) for i, d in rows})
        if len(self._device_of) > 2_000_000:  # bounded; ids never change, so just read again
            keep = set(ids)
            self._device_of = {k: v for k, v in self._device_of.items() if k in keep}
        return self._device_of

    def _drain(self, conn: Connection, table: str, window: int, result: CompactionResult) -> None:
        """Samples of ``window`` in ``table``, deleted and compacted group by group."""
        with partitions.begin(conn):
            present = self._present(conn, table, window)
            groups = self._groups(conn, present)
        end = window + CHUNK_SECONDS
        for devices, ids in groups:
            if self._rest():
                return
            where = f"ts >= {window} AND ts < {end} AND series_id IN ({_id_list(ids)})"
            delete = f"DELETE FROM {table} WHERE {where} RETURNING series_id, ts, value"  # noqa: S608
            with partitions.begin(conn):
                rows = fetch_rows(conn, delete)
                if len(rows):
                    self._write(conn, window, devices, rows, result)
            result.steps += 1

    def _rest(self) -> bool:
        """Pause between two groups as `pace` says; True if the gateway is stopping."""
        now = time.perf_counter()
        worked = now - self._since
        stopping = self._stop.wait(worked * self.pace) if self.pace and worked > 0 else False
        self._since = time.perf_counter()
        return stopping or self._stop.is_set()

    def _compact_sealed(self, conn: Connection, window: int, result: CompactionResult) -> None:
        """A sealed partition, all in one transaction that ends by dropping it."""
        table = partitions.raw_name(window)
        done = CompactionResult()
        with partitions.begin(conn):
            present = self._present(conn, table, window)
            for devices, ids in self._groups(conn, present):
                if self._rest():
                    raise _Stopped
                rows = fetch_rows(
                    conn,
                    f"SELECT series_id, ts, value FROM {table} "  # noqa: S608
                    f"WHERE series_id IN ({_id_list(ids)})",
                )
                if len(rows):
                    self._write(conn, window, devices, rows, done)
            self._drop_in_transaction(conn, table)
        result.samples += done.samples
        result.chunks += done.chunks
        result.windows |= done.windows
        result.steps += 1

    def _drop_in_transaction(self, conn: Connection, table: str) -> None:
        for attempt in range(1, _DROP_TRIES + 1):
            savepoint = conn.begin_nested()
            try:
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{partitions.LOCK_TIMEOUT}'")
                conn.exec_driver_sql(f"DROP TABLE {table}")
            except sa.exc.OperationalError:
                savepoint.rollback()
                if attempt == _DROP_TRIES:
                    raise
                self._stop.wait(0.2 * attempt)
                continue
            savepoint.commit()
            return

    # -- chunks and rollups --------------------------------------------------------------

    def _write(
        self,
        conn: Connection,
        window: int,
        devices: list[str],
        raw: Rows,
        result: CompactionResult,
    ) -> None:
        """Merge ``raw`` with those devices' chunks of ``window``; write chunks and rollups."""
        old = self._existing(conn, window, devices)
        merged = Rows.concat([old, raw]).sorted()
        if len(old):
            conn.execute(
                sa.delete(chunks).where(
                    chunks.c.window_start == window,
                    chunks.c.series_id.in_(sorted(set(old.series_id.tolist()))),
                )
            )
        device_of = self._devices(conn, merged.series_id.tolist())
        rows = self._encode(window, merged, device_of)
        dialect = conn.dialect.name
        if dialect == "postgresql":
            driver = conn.connection.driver_connection
            assert driver is not None
            with driver.cursor() as cursor:
                cursor.executemany(_INSERT_CHUNK_PG, rows)
                for width, table in LEVELS:
                    summary = summarise(merged.series_id, merged.ts, merged.value, width)
                    cursor.execute(
                        upsert_sql(table, dialect),
                        (
                            summary.series_id.tolist(),
                            summary.count.tolist(),
                            summary.start.tolist(),
                            summary.min.tolist(),
                            summary.max.tolist(),
                            summary.sum.tolist(),
                        ),
                    )
        else:
            conn.exec_driver_sql(_INSERT_CHUNK_SQLITE, rows)
            for width, table in LEVELS:
                summary = summarise(merged.series_id, merged.ts, merged.value, width)
                conn.exec_driver_sql(upsert_sql(table, dialect), summary.rows())
        result.samples += len(raw)
        result.chunks += len(rows)
        result.windows.add(window)

    def _existing(self, conn: Connection, window: int, devices: list[str]) -> Rows:
        """The samples already compacted into ``window`` for ``devices`` (late samples)."""
        owned = sa.select(series.c.id).where(series.c.device_id.in_(devices))
        found = conn.execute(
            sa.select(
                chunks.c.series_id, chunks.c.count, chunks.c.times_series_id, chunks.c.ts_data,
                chunks.c.data,
            ).where(chunks.c.window_start == window, chunks.c.series_id.in_(owned))
        ).all()  # fmt: skip
        if not found:
            return Rows.empty()
        times = {
            int(sid): codec.decode(ts_data, int(count))
            for sid, count, _t, ts_data, _d in found
            if ts_data is not None
        }
        parts = []
        for sid, count, times_sid, _ts, data in found:
            values = codec.decode(data, int(count))
            ids = np.full(int(count), int(sid), np.int64)
            parts.append(Rows(ids, times[int(times_sid)], values))
        return Rows.concat(parts)

    @staticmethod
    def _encode(
        window: int, merged: Rows, device_of: dict[int, str]
    ) -> list[tuple[int, int, int, float, float, int, bytes | None, bytes]]:
        """Chunk rows; series of one device with identical timestamps share one copy."""
        sid = merged.series_id
        bounds = np.flatnonzero(sid[1:] != sid[:-1]) + 1
        starts = [0, *bounds.tolist()]
        ends = [*bounds.tolist(), len(sid)]
        owners: dict[tuple[str, bytes], int] = {}
        out: list[tuple[int, int, int, float, float, int, bytes | None, bytes]] = []
        for start, end in zip(starts, ends, strict=True):
            series_id = int(sid[start])
            ts = merged.ts[start:end]
            values = merged.value[start:end]
            key = (device_of[series_id], ts.tobytes())
            owner = owners.setdefault(key, series_id)
            ts_data = codec.encode(ts) if owner == series_id else None
            out.append(
                (
                    series_id,
                    end - start,
                    window,
                    float(ts[-1]),
                    float(values[-1]),
                    owner,
                    ts_data,
                    codec.encode(np.ascontiguousarray(values)),
                )
            )
        return out


class _Stopped(Exception):
    """The gateway is stopping: roll the sealed window's transaction back (it is redone)."""

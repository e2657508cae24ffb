"""Reading telemetry: latest value per metric, bucketed ranges, raw rows for export.

A sample is stored in exactly one of two forms: raw (``telemetry_samples``, and on PostgreSQL
the sealed windows waiting for the compaction) or compacted (a chunk, summarised in rollups).
Every query reads both and gives the same answer whichever form a sample is in:

- latest: per series, the newer of the newest raw row (one backward index probe) and the
  newest chunk's ``last_ts``/``last_value`` (one more probe, no decoding);
- buckets: a width that is a multiple of an hour (or a minute) is answered from the hourly
  (or minute) rollups for the whole hours (minutes) inside the range, plus the raw rows there;
  the parts of the range that cut through an hour or minute, and widths that are no multiple
  of a minute, are answered from raw rows and decoded chunks. count, min and max are the same
  numbers either way; avg is sum/count, where a sum added up in a different order can differ
  in its last bits;
- export: the raw rows and the decoded chunks of each series, merged in time order.

All reads of one query run in one snapshot (REPEATABLE READ on PostgreSQL, one read
transaction on SQLite), so a compaction committing in between cannot show a sample twice or
hide it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql import FromClause

from gateway.telemetry import codec
from gateway.telemetry.models import chunks, samples, sealed, series
from gateway.telemetry.partitions import CHUNK_SECONDS, floor_to
from gateway.telemetry.rollups import LEVELS

MAX_BUCKETS: Final = 100_000
EXPORT_CHUNK: Final = 5_000
# Bucket widths picked when the caller gives none: about AUTO_BUCKETS buckets over the range.
AUTO_BUCKETS: Final = 500
_NICE_STEPS: Final = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
)  # fmt: skip


class QueryError(ValueError):
    """The query asks for something that cannot be answered (the message says what to change)."""


@dataclass(frozen=True, slots=True)
class Latest:
    metric: str
    ts: float
    value: float


@dataclass(frozen=True, slots=True)
class Bucket:
    start: float
    count: int
    min: float
    max: float
    avg: float


def snapshot(conn: Connection) -> None:
    """Make the following reads on ``conn`` see one state of the database.

    On PostgreSQL the sealed windows are locked for reading first: the compaction's drop of a
    window then waits for this query instead of removing rows it is about to read.
    """
    if conn.in_transaction():
        return
    if conn.dialect.name == "postgresql":
        conn.execution_options(isolation_level="REPEATABLE READ")
        conn.exec_driver_sql("LOCK TABLE telemetry_samples_sealed IN ACCESS SHARE MODE")
    else:
        conn.exec_driver_sql("BEGIN")


def raw_source(conn: Connection) -> FromClause:
    """The raw samples: the samples table, and on PostgreSQL the sealed windows too."""
    if conn.dialect.name != "postgresql":
        return samples
    return sa.union_all(
        sa.select(samples.c.series_id, samples.c.ts, samples.c.value),
        sa.select(sealed.c.series_id, sealed.c.ts, sealed.c.value),
    ).subquery("raw")


def latest(conn: Connection, device_id: str) -> list[Latest]:
    """The newest sample of each metric of one device, by metric name."""
    snapshot(conn)
    raw = raw_source(conn)
    newest = (
        sa.select(raw.c.ts, raw.c.value)
        .where(raw.c.series_id == series.c.id)
        .order_by(raw.c.ts.desc())
        .limit(1)
    )
    compacted = (
        sa.select(chunks.c.last_ts, chunks.c.last_value)
        .where(chunks.c.series_id == series.c.id)
        .order_by(chunks.c.window_start.desc())
        .limit(1)
    )
    query = (
        sa.select(
            series.c.metric,
            newest.with_only_columns(raw.c.ts).scalar_subquery().label("ts"),
            newest.with_only_columns(raw.c.value).scalar_subquery().label("value"),
            compacted.with_only_columns(chunks.c.last_ts).scalar_subquery().label("c_ts"),
            compacted.with_only_columns(chunks.c.last_value).scalar_subquery().label("c_value"),
        )
        .where(series.c.device_id == device_id)
        .order_by(series.c.metric)
    )
    found: list[Latest] = []
    for metric, ts, value, c_ts, c_value in conn.execute(query):
        if c_ts is not None and (ts is None or c_ts > ts):
            ts, value = c_ts, c_value
        if ts is not None:  # None: a series whose samples retention removed
            found.append(Latest(str(metric), float(ts), float(value)))
    return found


def auto_every(since: float, until: float) -> float:
    """A round bucket width giving about `AUTO_BUCKETS` buckets over ``[since, until)``."""
    wanted = (until - since) / AUTO_BUCKETS
    for step in _NICE_STEPS:
        if step >= wanted:
            return float(step)
    return float(math.ceil(wanted / 86400) * 86400)


def _series_id(conn: Connection, device_id: str, metric: str) -> int | None:
    found = conn.execute(
        sa.select(series.c.id).where(series.c.device_id == device_id, series.c.metric == metric)
    ).scalar_one_or_none()
    return None if found is None else int(found)


def _bucket_of(conn: Connection, column: Any, every: float) -> Any:
    """``floor(column / every) * every``; SQLite may lack floor(), and values > 0 let a cast
    truncate."""
    scaled = column / every
    if conn.dialect.name == "sqlite":
        return sa.cast(scaled, sa.BigInteger) * every
    return sa.func.floor(scaled) * every


_Acc = dict[float, list[float]]  # bucket start -> [count, min, max, sum]


def _add(acc: _Acc, start: float, count: float, lo: float, hi: float, total: float) -> None:
    found = acc.get(start)
    if found is None:
        acc[start] = [count, lo, hi, total]
        return
    found[0] += count
    found[1] = min(found[1], lo)
    found[2] = max(found[2], hi)
    found[3] += total


def buckets(
    conn: Connection, device_id: str, metric: str, since: float, until: float, every: float
) -> list[Bucket]:
    """min/max/avg/count of one metric per ``every`` seconds over ``[since, until)``.

    Buckets are aligned to multiples of ``every`` since the epoch; empty ones are left out.
    """
    if not until > since:
        raise QueryError(f"until ({until}) must be after since ({since})")
    if not every > 0 or not math.isfinite(every):
        raise QueryError(f"every must be a positive number of seconds, not {every}")
    if (until - since) / every > MAX_BUCKETS:
        raise QueryError(
            f"{(until - since) / every:.0f} buckets of {every}s over that range; at most "
            f"{MAX_BUCKETS}: make every larger or the range shorter"
        )
    snapshot(conn)
    series_id = _series_id(conn, device_id, metric)
    if series_id is None:
        return []
    acc: _Acc = {}
    _collect(conn, series_id, since, until, every, 0, acc)
    return [
        Bucket(start, int(n), lo, hi, total / n)
        for start, (n, lo, hi, total) in sorted(acc.items())
    ]


def _collect(
    conn: Connection, sid: int, lo: float, hi: float, every: float, level: int, acc: _Acc
) -> None:
    """Add the samples in ``[lo, hi)`` to ``acc``, from the widest rollups that fit."""
    if not hi > lo:
        return
    for index in range(level, len(LEVELS)):
        width, table = LEVELS[index]
        if every % width:
            continue
        first = math.ceil(lo / width) * width
        last = math.floor(hi / width) * width
        if first >= last:
            continue
        _rollup_part(conn, sid, table, first, last, every, acc)
        _raw_part(conn, sid, first, last, every, acc)
        _collect(conn, sid, lo, first, every, index + 1, acc)
        _collect(conn, sid, last, hi, every, index + 1, acc)
        return
    _raw_part(conn, sid, lo, hi, every, acc)
    _chunk_part(conn, sid, lo, hi, every, acc)


def _rollup_part(
    conn: Connection, sid: int, table: sa.Table, first: int, last: int, every: float, acc: _Acc
) -> None:
    c = table.c
    _aggregate(
        conn,
        (c.start, sa.func.sum(c.count), sa.func.min(c.min), sa.func.max(c.max), sa.func.sum(c.sum)),
        sa.and_(c.series_id == sid, c.start >= first, c.start < last),
        every,
        acc,
    )


def _raw_part(conn: Connection, sid: int, lo: float, hi: float, every: float, acc: _Acc) -> None:
    c = raw_source(conn).c
    v = c.value
    _aggregate(
        conn,
        (c.ts, sa.func.count(), sa.func.min(v), sa.func.max(v), sa.func.sum(v)),
        sa.and_(c.series_id == sid, c.ts >= lo, c.ts < hi),
        every,
        acc,
    )


def _aggregate(
    conn: Connection, columns: tuple[Any, ...], where: Any, every: float, acc: _Acc
) -> None:
    """Add ``(count, min, max, sum)`` per bucket of ``columns[0]`` (a time) to ``acc``."""
    start = _bucket_of(conn, columns[0], every).label("b")
    query = sa.select(start, *columns[1:]).where(where).group_by(start)
    for b, n, low, high, total in conn.execute(query):
        _add(acc, float(b), float(n), float(low), float(high), float(total))


def _chunk_part(conn: Connection, sid: int, lo: float, hi: float, every: float, acc: _Acc) -> None:
    for ts, values in _chunk_arrays(conn, sid, lo, hi):
        keys = np.floor(ts / every) * every
        first = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        counts = np.diff(np.append(first, len(ts)))
        for b, n, low, high, total in zip(
            keys[first].tolist(),
            counts.tolist(),
            np.minimum.reduceat(values, first).tolist(),
            np.maximum.reduceat(values, first).tolist(),
            np.add.reduceat(values, first).tolist(),
            strict=True,
        ):
            _add(acc, b, n, low, high, total)


def _chunk_arrays(
    conn: Connection, sid: int, lo: float, hi: float
) -> Iterator[tuple[codec.FloatArray, codec.FloatArray]]:
    """(timestamps, values) of the chunks of one series in ``[lo, hi)``, window by window."""
    owner = chunks.alias("owner")
    query = (
        sa.select(chunks.c.count, owner.c.ts_data, chunks.c.data)
        .join(
            owner,
            sa.and_(
                owner.c.series_id == chunks.c.times_series_id,
                owner.c.window_start == chunks.c.window_start,
            ),
        )
        .where(
            chunks.c.series_id == sid,
            chunks.c.window_start >= floor_to(lo, CHUNK_SECONDS),
            chunks.c.window_start < hi,
        )
        .order_by(chunks.c.window_start)
    )
    for count, ts_data, data in conn.execution_options(yield_per=64).execute(query):
        ts = codec.decode(ts_data, int(count))
        values = codec.decode(data, int(count))
        inside = (ts >= lo) & (ts < hi)
        if not inside.all():
            ts, values = ts[inside], values[inside]
        if len(ts):
            yield ts, values


def export_rows(
    conn: Connection,
    device_id: str,
    metric: str | None,
    since: float,
    until: float,
) -> Iterator[tuple[str, float, float]]:
    """``(metric, ts, value)`` of one device (one metric or all), by metric then time.

    Raw rows come through a server-side cursor in chunks of `EXPORT_CHUNK` and compacted ones
    a window at a time, so a long range streams in constant memory.
    """
    snapshot(conn)
    wanted = sa.select(series.c.id, series.c.metric).where(series.c.device_id == device_id)
    if metric is not None:
        wanted = wanted.where(series.c.metric == metric)
    raw = raw_source(conn)
    for series_id, name in conn.execute(wanted.order_by(series.c.metric)).all():
        query = (
            sa.select(raw.c.ts, raw.c.value)
            .where(raw.c.series_id == series_id, raw.c.ts >= since, raw.c.ts < until)
            .order_by(raw.c.ts)
        )
        stored = conn.execution_options(yield_per=EXPORT_CHUNK).execute(query)
        raw_rows = ((float(ts), float(value)) for ts, value in stored)
        compacted = (
            pair
            for ts, values in _chunk_arrays(conn, int(series_id), since, until)
            for pair in zip(ts.tolist(), values.tolist(), strict=True)
        )
        label = str(name)
        for ts, value in heapq.merge(compacted, raw_rows, key=lambda row: row[0]):
            yield label, ts, value

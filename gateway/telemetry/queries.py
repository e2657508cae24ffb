"""Reading telemetry: latest value per metric, bucketed ranges, raw rows for export.

All three go through the ``(series_id, ts)`` index: a device's series are a handful of rows in
``telemetry_series``; "latest" is one backward index probe per series; a range is one index
range scan, grouped by ``floor(ts / every)`` in the database.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.telemetry.models import samples, series

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


def latest(conn: Connection, device_id: str) -> list[Latest]:
    """The newest sample of each metric of one device, by metric name."""
    newest = (
        sa.select(samples.c.ts, samples.c.value)
        .where(samples.c.series_id == series.c.id)
        .order_by(samples.c.ts.desc())
        .limit(1)
    )
    query = (
        sa.select(
            series.c.metric,
            newest.with_only_columns(samples.c.ts).scalar_subquery().label("ts"),
            newest.with_only_columns(samples.c.value).scalar_subquery().label("value"),
        )
        .where(series.c.device_id == device_id)
        .order_by(series.c.metric)
    )
    return [
        Latest(str(metric), float(ts), float(value))
        for metric, ts, value in conn.execute(query)
        if ts is not None  # a series whose samples retention removed
    ]


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


def _bucket_start(conn: Connection, every: float) -> Any:
    """``floor(ts / every) * every``; SQLite may lack floor(), and ts > 0 lets a cast truncate."""
    scaled = samples.c.ts / every
    if conn.dialect.name == "sqlite":
        return sa.cast(scaled, sa.BigInteger) * every
    return sa.func.floor(scaled) * every


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
    series_id = _series_id(conn, device_id, metric)
    if series_id is None:
        return []
    start = _bucket_start(conn, every).label("start")
    query = (
        sa.select(
            start,
            sa.func.count(),
            sa.func.min(samples.c.value),
            sa.func.max(samples.c.value),
            sa.func.avg(samples.c.value),
        )
        .where(samples.c.series_id == series_id, samples.c.ts >= since, samples.c.ts < until)
        .group_by(start)
        .order_by(start)
    )
    return [
        Bucket(float(b), int(n), float(lo), float(hi), float(mean))
        for b, n, lo, hi, mean in conn.execute(query)
    ]


def export_rows(
    conn: Connection,
    device_id: str,
    metric: str | None,
    since: float,
    until: float,
) -> Iterator[tuple[str, float, float]]:
    """``(metric, ts, value)`` of one device (one metric or all), by metric then time.

    Read with a server-side cursor in chunks of `EXPORT_CHUNK`, so a long range streams in
    constant memory.
    """
    wanted = sa.select(series.c.id, series.c.metric).where(series.c.device_id == device_id)
    if metric is not None:
        wanted = wanted.where(series.c.metric == metric)
    for series_id, name in conn.execute(wanted.order_by(series.c.metric)).all():
        query = (
            sa.select(samples.c.ts, samples.c.value)
            .where(samples.c.series_id == series_id, samples.c.ts >= since, samples.c.ts < until)
            .order_by(samples.c.ts)
        )
        result = conn.execution_options(yield_per=EXPORT_CHUNK).execute(query)
        for ts, value in result:
            yield str(name), float(ts), float(value)

"""Rollups: count, min, max and sum of each series per minute and per hour.

The compaction computes them from the samples of a chunk window (all of that window's samples
of the series, merged with any compacted before), so each rollup row is exact and complete; a
row is written again, not added to, when late samples change it. Bucketed queries whose width
is a multiple of a rollup's width read rollups for the whole minutes or hours inside the range
(`queries`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

from gateway.telemetry.models import rollups_1h, rollups_1m

LEVELS: Final = ((3600, rollups_1h), (60, rollups_1m))
"""Rollup widths in seconds and their tables, widest first."""


@dataclass(frozen=True, slots=True)
class RollupRows:
    """Column arrays of one table's rollup rows."""

    series_id: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    count: npt.NDArray[np.int64]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    sum: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.series_id)

    def rows(self) -> list[tuple[int, int, int, float, float, float]]:
        return list(
            zip(
                self.series_id.tolist(),
                self.count.tolist(),
                self.start.tolist(),
                self.min.tolist(),
                self.max.tolist(),
                self.sum.tolist(),
                strict=True,
            )
        )


def summarise(
    series_id: npt.NDArray[np.int64],
    ts: npt.NDArray[np.float64],
    value: npt.NDArray[np.float64],
    width: int,
) -> RollupRows:
    """Rollups of ``width`` seconds; the arrays are sorted by series then time.

    ``floor(ts / width)`` in float64 is the exact floor for positive timestamps and integer
    widths (the quotient can never round up to the next integer), the same value the database
    computes for a raw bucket, so a sample lands in the same bucket either way.
    """
    start = (np.floor(ts / width) * width).astype(np.int64)
    change = np.empty(len(ts), dtype=bool)
    change[0] = True
    np.not_equal(series_id[1:], series_id[:-1], out=change[1:])
    change[1:] |= start[1:] != start[:-1]
    first = np.flatnonzero(change)
    return RollupRows(
        series_id=series_id[first],
        start=start[first],
        count=np.diff(np.append(first, len(ts))),
        min=np.minimum.reduceat(value, first),
        max=np.maximum.reduceat(value, first),
        sum=np.add.reduceat(value, first),
    )


def upsert_sql(table: sa.Table, dialect: str) -> str:
    """Write rollup rows, replacing the ones already there (they were computed from less)."""
    name = table.name
    update = "count = excluded.count, min = excluded.min, max = excluded.max, sum = excluded.sum"
    if dialect == "postgresql":
        return (
            f"INSERT INTO {name} (series_id, count, start, min, max, sum) "  # noqa: S608
            "SELECT * FROM unnest(CAST(%s AS integer[]), CAST(%s AS integer[]), "
            "CAST(%s AS bigint[]), CAST(%s AS double precision[]), "
            "CAST(%s AS double precision[]), CAST(%s AS double precision[])) "
            f"ON CONFLICT (series_id, start) DO UPDATE SET {update}"
        )
    return (
        f"INSERT INTO {name} (series_id, count, start, min, max, sum) "  # noqa: S608
        f"VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (series_id, start) DO UPDATE SET {update}"
    )

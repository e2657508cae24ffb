"""The telemetry tables: SQLAlchemy Core, registered on ``SQLModel.metadata`` for the migrations.

Telemetry is written in bulk on a hot path, so these are plain Core tables, not ORM classes.

``telemetry_batches``
    One row per stored batch: the unique ``(device_id, seq)`` key that makes a redelivered
    batch a no-op, when it was stored (``received_at``, unix seconds; retention drops old keys
    by it) and how many samples it carried.
``telemetry_series``
    One row per ``(device_id, metric)`` ever seen, with a small integer id. Samples refer to
    their series by that id, so the sample index is ``(int, double)`` instead of two strings
    and a double: measured on PostgreSQL 15 here, COPY into the samples table runs about 1.5x
    faster with integer keys in the index (the index is where the time goes: without it COPY
    takes ~900k rows/s, with the string index ~200k). "Latest value of each metric of a device"
    becomes one index probe per series of that device.
``telemetry_samples``
    One row per sample: ``ts`` (unix seconds) and ``value`` are double precision. Seconds as a
    double rather than ``timestamptz``: the same 8 bytes on PostgreSQL, a native REAL on SQLite,
    no conversion on the way in (the wire carries seconds) and bucketing is plain arithmetic
    that both databases compute alike.

    These are the *raw* samples: recent ones, as the ingest wrote them. On PostgreSQL the table
    is partitioned by ``ts``, one partition per chunk window (`partitions`), plus a default
    partition for samples that arrive for a window whose partition is gone or not made yet.
``telemetry_samples_sealed``
    PostgreSQL only (empty on SQLite): the parent, by plain table inheritance, of raw partitions
    that were detached from ``telemetry_samples`` because their window closed. Nothing writes to
    them any more; queries read them until the compaction has turned them into chunks and
    dropped them in the same transaction (`compaction`).
``telemetry_chunks``
    One row per series and chunk window (`CHUNK_SECONDS`): that window's samples, compacted.
    ``data`` is the values as an encoded block (`codec`), ``ts_data`` the timestamps, which the
    series of one device often share (one POST carries all of a machine's readings): they are
    stored once, in the chunk of the series named by ``times_series_id``, and that column points
    to the series' own row when it has its own. ``last_ts``/``last_value`` answer "latest"
    without decoding. Partitioned by ``window_start`` on PostgreSQL, a day per partition.
``telemetry_rollups_1m``, ``telemetry_rollups_1h``
    count, min, max and sum per series and minute or hour, written by the compaction with the
    chunks; they answer bucketed queries whose width is a multiple of theirs. Partitioned by
    ``start`` on PostgreSQL, a week per partition.

Indexes. ``(series_id, ts)`` serves ranges of one metric and the latest value per series.
``ts`` alone finds the raw samples of a window; on PostgreSQL it is a BRIN index (a few pages for
the whole table, cheap to maintain since samples arrive roughly in time order), on SQLite an
ordinary one. The samples table has no primary key and no foreign key: nothing refers to a
single sample, and each would cost another index lookup on every insert. Series rows are never
deleted, so a sample's series id stays valid. Chunks and rollups have their ``(series_id,
time)`` primary key as their only index.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa
from sqlmodel import SQLModel

METRIC_LENGTH: Final = 64
DEVICE_ID_LENGTH: Final = 64

batches = sa.Table(
    "telemetry_batches",
    SQLModel.metadata,
    sa.Column("device_id", sa.String(DEVICE_ID_LENGTH), primary_key=True),
    sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("received_at", sa.Double(), nullable=False),
    sa.Column("samples", sa.Integer(), nullable=False),
    sa.Index("ix_telemetry_batches_received_at", "received_at", postgresql_using="brin"),
)

series = sa.Table(
    "telemetry_series",
    SQLModel.metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("device_id", sa.String(DEVICE_ID_LENGTH), nullable=False),
    sa.Column("metric", sa.String(METRIC_LENGTH), nullable=False),
    sa.UniqueConstraint("device_id", "metric", name="uq_telemetry_series_device_metric"),
)

samples = sa.Table(
    "telemetry_samples",
    SQLModel.metadata,
    sa.Column("series_id", sa.Integer(), nullable=False),
    sa.Column("ts", sa.Double(), nullable=False),
    sa.Column("value", sa.Double(), nullable=False),
    sa.Index("ix_telemetry_samples_series_ts", "series_id", "ts"),
    sa.Index("ix_telemetry_samples_ts", "ts", postgresql_using="brin"),
    postgresql_partition_by="RANGE (ts)",
)

sealed = sa.Table(
    "telemetry_samples_sealed",
    SQLModel.metadata,
    sa.Column("series_id", sa.Integer(), nullable=False),
    sa.Column("ts", sa.Double(), nullable=False),
    sa.Column("value", sa.Double(), nullable=False),
)

chunks = sa.Table(
    "telemetry_chunks",
    SQLModel.metadata,
    sa.Column("series_id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("count", sa.Integer(), nullable=False),
    sa.Column("window_start", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("last_ts", sa.Double(), nullable=False),
    sa.Column("last_value", sa.Double(), nullable=False),
    sa.Column("times_series_id", sa.Integer(), nullable=False),
    sa.Column("ts_data", sa.LargeBinary(), nullable=True),
    sa.Column("data", sa.LargeBinary(), nullable=False),
    postgresql_partition_by="RANGE (window_start)",
)


def _rollup_table(name: str) -> sa.Table:
    return sa.Table(
        name,
        SQLModel.metadata,
        sa.Column("series_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("start", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("min", sa.Double(), nullable=False),
        sa.Column("max", sa.Double(), nullable=False),
        sa.Column("sum", sa.Double(), nullable=False),
        postgresql_partition_by="RANGE (start)",
    )


rollups_1m = _rollup_table("telemetry_rollups_1m")
rollups_1h = _rollup_table("telemetry_rollups_1h")

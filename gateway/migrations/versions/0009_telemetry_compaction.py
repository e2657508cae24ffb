"""telemetry compaction: raw samples partitioned by window (PostgreSQL), chunks and rollups

Existing installs keep their samples where they are: on PostgreSQL the old samples table becomes
the default partition of the new partitioned ``telemetry_samples`` (renamed and attached, no
copy), and the compaction works through it window by window; on SQLite the table stays as it is.

Revision ID: 0009_telemetry_compaction
Revises: 0008_accounts
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_telemetry_compaction"
down_revision = "0008_accounts"
branch_labels = None
depends_on = None


def _rollup(name: str) -> None:
    op.create_table(
        name,
        sa.Column("series_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("start", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("min", sa.Double(), nullable=False),
        sa.Column("max", sa.Double(), nullable=False),
        sa.Column("sum", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("series_id", "start"),
        postgresql_partition_by="RANGE (start)",
    )


def _partition_samples() -> None:
    """PostgreSQL: the samples table becomes the default partition of a partitioned one."""
    run = op.execute
    run("ALTER TABLE telemetry_samples RENAME TO telemetry_samples_default")
    run("ALTER INDEX ix_telemetry_samples_series_ts RENAME TO telemetry_samples_default_series_ts")
    run("ALTER INDEX ix_telemetry_samples_ts RENAME TO telemetry_samples_default_ts")
    run(
        "CREATE TABLE telemetry_samples (series_id integer NOT NULL, ts double precision NOT "
        "NULL, value double precision NOT NULL) PARTITION BY RANGE (ts)"
    )
    run("CREATE INDEX ix_telemetry_samples_series_ts ON ONLY telemetry_samples (series_id, ts)")
    run("CREATE INDEX ix_telemetry_samples_ts ON ONLY telemetry_samples USING brin (ts)")
    run("ALTER TABLE telemetry_samples ATTACH PARTITION telemetry_samples_default DEFAULT")
    run(
        "ALTER INDEX ix_telemetry_samples_series_ts "
        "ATTACH PARTITION telemetry_samples_default_series_ts"
    )
    run("ALTER INDEX ix_telemetry_samples_ts ATTACH PARTITION telemetry_samples_default_ts")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _partition_samples()
    op.create_table(
        "telemetry_samples_sealed",
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
    )
    op.create_table(
        "telemetry_chunks",
        sa.Column("series_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("last_ts", sa.Double(), nullable=False),
        sa.Column("last_value", sa.Double(), nullable=False),
        sa.Column("times_series_id", sa.Integer(), nullable=False),
        sa.Column("ts_data", sa.LargeBinary(), nullable=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("series_id", "window_start"),
        postgresql_partition_by="RANGE (window_start)",
    )
    _rollup("telemetry_rollups_1m")
    _rollup("telemetry_rollups_1h")


def downgrade() -> None:
    op.drop_table("telemetry_rollups_1h")
    op.drop_table("telemetry_rollups_1m")
    op.drop_table("telemetry_chunks")
    op.drop_table("telemetry_samples_sealed")

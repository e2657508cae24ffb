"""telemetry: batch keys, series and samples

Revision ID: 0003_telemetry
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_telemetry"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "telemetry_batches",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("received_at", sa.Double(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "seq"),
    )
    with op.batch_alter_table("telemetry_batches", schema=None) as batch_op:
        batch_op.create_index(
            "ix_telemetry_batches_received_at",
            ["received_at"],
            unique=False,
            postgresql_using="brin",
        )

    op.create_table(
        "telemetry_samples",
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Double(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
    )
    with op.batch_alter_table("telemetry_samples", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_samples_series_ts", ["series_id", "ts"], unique=False)
        batch_op.create_index(
            "ix_telemetry_samples_ts", ["ts"], unique=False, postgresql_using="brin"
        )

    op.create_table(
        "telemetry_series",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "metric", name="uq_telemetry_series_device_metric"),
    )


def downgrade() -> None:
    op.drop_table("telemetry_series")
    with op.batch_alter_table("telemetry_samples", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_samples_ts", postgresql_using="brin")
        batch_op.drop_index("ix_telemetry_samples_series_ts")

    op.drop_table("telemetry_samples")
    with op.batch_alter_table("telemetry_batches", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_batches_received_at", postgresql_using="brin")

    op.drop_table("telemetry_batches")

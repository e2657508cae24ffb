"""flows: releases, the module cache, deployments and their devices

Revision ID: 0004_flows
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_flows"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "flow_modules",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=214), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("node_types", sa.JSON(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("added_by", sa.String(length=80), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
        sa.UniqueConstraint("name", "version", name="uq_flow_modules_name_version"),
    )
    op.create_table(
        "flow_releases",
        sa.Column("digest", sa.String(length=71), nullable=False),
        sa.Column("bundle", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("node_count", sa.Integer(), nullable=False),
        sa.Column("modules", sa.JSON(), nullable=False),
        sa.Column("node_types", sa.JSON(), nullable=False),
        sa.Column("unprovided_types", sa.JSON(), nullable=False),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=80), nullable=False),
        sa.PrimaryKeyConstraint("digest"),
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("release_digest", sa.String(length=71), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("target_text", sa.String(length=200), nullable=False),
        sa.Column("force", sa.Boolean(), nullable=False),
        sa.Column("device_count", sa.Integer(), nullable=False),
        sa.Column("canary_size", sa.Integer(), nullable=False),
        sa.Column("wave_size", sa.Integer(), nullable=False),
        sa.Column("wave_count", sa.Integer(), nullable=False),
        sa.Column("max_failures_pct", sa.Float(), nullable=False),
        sa.Column("min_finished", sa.Integer(), nullable=False),
        sa.Column("timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=80), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["release_digest"],
            ["flow_releases.digest"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deployments_release_digest"), ["release_digest"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_deployments_state"), ["state"], unique=False)

    op.create_table(
        "deployment_devices",
        sa.Column("deployment_id", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("command_id", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("rev", sa.String(length=64), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
        ),
        sa.PrimaryKeyConstraint("deployment_id", "device_id"),
    )
    with op.batch_alter_table("deployment_devices", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deployment_devices_device_id"), ["device_id"], unique=False
        )
        batch_op.create_index(
            "ix_deployment_devices_progress", ["deployment_id", "wave", "state"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("deployment_devices", schema=None) as batch_op:
        batch_op.drop_index("ix_deployment_devices_progress")
        batch_op.drop_index(batch_op.f("ix_deployment_devices_device_id"))

    op.drop_table("deployment_devices")
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deployments_state"))
        batch_op.drop_index(batch_op.f("ix_deployments_release_digest"))

    op.drop_table("deployments")
    op.drop_table("flow_releases")
    op.drop_table("flow_modules")

"""tunnels: support tunnels, their pool addresses, the hub's public side

Revision ID: 0005_tunnels
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_tunnels"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tunnel_addresses",
        sa.Column("address", sa.String(length=15), nullable=False),
        sa.Column("tunnel_id", sa.String(length=64), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("address"),
    )
    with op.batch_alter_table("tunnel_addresses", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_tunnel_addresses_tunnel_id"), ["tunnel_id"], unique=False
        )

    op.create_table(
        "tunnel_hubs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("endpoint", sa.String(length=255), nullable=False),
        sa.Column("network", sa.String(length=18), nullable=False),
        sa.Column("hub_ip", sa.String(length=15), nullable=False),
        sa.Column("mtu", sa.Integer(), nullable=False),
        sa.Column("interface", sa.String(length=15), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "tunnels",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("active_device", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=80), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("ports", sa.JSON(), nullable=False),
        sa.Column("device_ip", sa.String(length=15), nullable=False),
        sa.Column("engineer_ip", sa.String(length=15), nullable=False),
        sa.Column("engineer_public_key", sa.String(length=64), nullable=False),
        sa.Column("device_public_key", sa.String(length=64), nullable=True),
        sa.Column("hub_ip", sa.String(length=15), nullable=False),
        sa.Column("hub_public_key", sa.String(length=64), nullable=False),
        sa.Column("hub_endpoint", sa.String(length=255), nullable=False),
        sa.Column("mtu", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("open_deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("hub_added_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_state", sa.String(length=16), nullable=True),
        sa.Column("close_reason", sa.Text(), nullable=True),
        sa.Column("failure", sa.String(length=32), nullable=True),
        sa.Column("closed_by", sa.String(length=80), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("device_close_due", sa.Boolean(), nullable=False),
        sa.Column("device_close_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("device_closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("device_handshake_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("device_endpoint", sa.String(length=64), nullable=True),
        sa.Column("bytes_from_device", sa.BigInteger(), nullable=False),
        sa.Column("bytes_to_device", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("active_device"),
    )
    with op.batch_alter_table("tunnels", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tunnels_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_tunnels_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_tunnels_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tunnels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tunnels_state"))
        batch_op.drop_index(batch_op.f("ix_tunnels_expires_at"))
        batch_op.drop_index(batch_op.f("ix_tunnels_device_id"))

    op.drop_table("tunnels")
    op.drop_table("tunnel_hubs")
    with op.batch_alter_table("tunnel_addresses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tunnel_addresses_tunnel_id"))

    op.drop_table("tunnel_addresses")

"""merge the feature branches (telemetry, flows, tunnels, broker password hash) into one head

The four features were built side by side, each as a branch off 0002. From here on there is
one head again: a new migration revises "0007".

Revision ID: 0007
Revises: 0003_telemetry, 0004_flows, 0005_tunnels, 0006
"""

from __future__ import annotations

revision = "0007"
down_revision = ("0003_telemetry", "0004_flows", "0005_tunnels", "0006")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass

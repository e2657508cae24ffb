"""Alembic environment: always driven from `gateway.db.migrate`, which passes the connection."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import gateway.accounts.models  # customers, users, sessions, consent
import gateway.commands.models
import gateway.flows.models  # flow releases, module cache, deployments
import gateway.registry.models  # registers the tables on SQLModel.metadata
import gateway.telemetry.models  # noqa: F401  (the telemetry tables)
from gateway.tunnels import models as tunnel_models  # noqa: F401  (support tunnels)

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()

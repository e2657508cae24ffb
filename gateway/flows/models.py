"""Tables of the flow pushes. Their schema comes from migration 0004_flows.

Bundles and module tarballs are stored in the database, not on a replica's disk, so every
replica of a cluster can serve them to agents.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import JSON, Column, Field, SQLModel

from gateway.db import UTCDateTime


def _ts(nullable: bool = False) -> Any:
    if nullable:
        return Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    return Field(sa_column=Column(UTCDateTime(), nullable=False))


class FlowRelease(SQLModel, table=True):
    """An immutable release: a bundle (flows + modules) under its sha256 digest."""

    __tablename__ = "flow_releases"

    digest: str = Field(primary_key=True, max_length=71)
    bundle: bytes = Field(sa_column=Column(sa.LargeBinary(), nullable=False))
    size: int
    node_count: int
    modules: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    node_types: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    unprovided_types: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    warnings: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    notes: str = Field(default="", sa_column=Column(sa.Text(), nullable=False))
    created_at: datetime = _ts()
    created_by: str = Field(max_length=80)


class FlowModule(SQLModel, table=True):
    """A node module tarball (`npm pack` format) in the gateway's cache, verified by sha256."""

    __tablename__ = "flow_modules"
    __table_args__ = (sa.UniqueConstraint("name", "version", name="uq_flow_modules_name_version"),)

    sha256: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=214)
    version: str = Field(max_length=64)
    size: int
    node_types: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    data: bytes = Field(sa_column=Column(sa.LargeBinary(), nullable=False))
    added_at: datetime = _ts()
    added_by: str = Field(max_length=80)


class Deployment(SQLModel, table=True):
    """One release sent to a set of devices in waves."""

    __tablename__ = "deployments"

    id: str = Field(primary_key=True, max_length=32)
    release_digest: str = Field(foreign_key="flow_releases.digest", max_length=71, index=True)
    target: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    target_text: str = Field(max_length=200)
    force: bool = False
    device_count: int
    canary_size: int
    wave_size: int
    wave_count: int
    max_failures_pct: float
    min_finished: int
    timeout_seconds: int
    state: str = Field(max_length=16, index=True)
    reason: str | None = Field(default=None, sa_column=Column(sa.Text(), nullable=True))
    created_at: datetime = _ts()
    created_by: str = Field(max_length=80)
    updated_at: datetime = _ts()
    finished_at: datetime | None = _ts(nullable=True)


class DeploymentDevice(SQLModel, table=True):
    """One device's part in a deployment: its wave, state, command and timings."""

    __tablename__ = "deployment_devices"
    __table_args__ = (sa.Index("ix_deployment_devices_progress", "deployment_id", "wave", "state"),)

    deployment_id: str = Field(foreign_key="deployments.id", primary_key=True, max_length=32)
    device_id: str = Field(foreign_key="devices.id", primary_key=True, max_length=64, index=True)
    wave: int
    position: int
    state: str = Field(max_length=16)
    command_id: str | None = Field(default=None, max_length=64)
    error: str | None = Field(default=None, sa_column=Column(sa.Text(), nullable=True))
    rev: str | None = Field(default=None, max_length=64)
    sent_at: datetime | None = _ts(nullable=True)
    deadline_at: datetime | None = _ts(nullable=True)
    started_at: datetime | None = _ts(nullable=True)
    finished_at: datetime | None = _ts(nullable=True)
    updated_at: datetime = _ts()

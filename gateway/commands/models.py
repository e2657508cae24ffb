"""The `commands` table: every command sent to a machine, and the latest thing it said about it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import JSON, Column, Field, SQLModel

from gateway.db import utc_column


class CommandRecord(SQLModel, table=True):
    """A signed command sent to one machine, and the latest thing it said about it."""

    __tablename__ = "commands"

    id: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(max_length=64, index=True)
    kind: str = Field(max_length=32)
    args: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: str = Field(max_length=24)
    detail: str | None = Field(default=None, sa_column=Column(sa.Text(), nullable=True))
    result: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = utc_column()
    updated_at: datetime = utc_column()
    expires_at: datetime = utc_column()
    actor: str = Field(max_length=80)
    ref: str | None = Field(default=None, max_length=80, index=True)

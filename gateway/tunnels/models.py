"""Registry tables of support tunnels: the tunnels, their pool addresses, the hub's public side.

The database is the one truth every replica shares: the API replica records a tunnel and sends
`tunnel.open`, whichever replica gets the device's reply stores its key, and the replica that runs
the hub makes the hub match these rows. States are strings (see `gateway.tunnels.states`).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import JSON, Column, Field, SQLModel

from gateway.db import UTCDateTime


def _ts(nullable: bool = False, index: bool = False) -> datetime:
    field: datetime = Field(sa_column=Column(UTCDateTime(), nullable=nullable, index=index))
    return field


class TunnelRecord(SQLModel, table=True):
    """One support tunnel: who asked for what, its addresses and keys, how it went."""

    __tablename__ = "tunnels"

    id: str = Field(primary_key=True, max_length=64)
    device_id: str = Field(max_length=64, index=True)
    #: The device id while the tunnel is not final, else NULL: the unique constraint allows one
    #: live tunnel per device on SQLite and PostgreSQL alike (NULLs never collide).
    active_device: str | None = Field(default=None, max_length=64, unique=True)
    state: str = Field(max_length=16, index=True)
    actor: str = Field(max_length=80)
    reason: str = Field(default="", max_length=200)
    ports: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    device_ip: str = Field(max_length=15)
    engineer_ip: str = Field(max_length=15)
    engineer_public_key: str = Field(max_length=64)
    device_public_key: str | None = Field(default=None, max_length=64)
    hub_ip: str = Field(max_length=15)
    hub_public_key: str = Field(max_length=64)
    hub_endpoint: str = Field(max_length=255)
    mtu: int
    created_at: datetime = _ts()
    expires_at: datetime = _ts(index=True)
    open_deadline: datetime = _ts()
    hub_added_at: datetime | None = _ts(nullable=True)
    opened_at: datetime | None = _ts(nullable=True)
    #: Set when the tunnel is being closed: the final state it goes to, why, by whom.
    close_state: str | None = Field(default=None, max_length=16)
    close_reason: str | None = Field(default=None, sa_column=Column(sa.Text(), nullable=True))
    failure: str | None = Field(default=None, max_length=32)
    closed_by: str | None = Field(default=None, max_length=80)
    closed_at: datetime | None = _ts(nullable=True)
    #: The device must be told to drop its side (it may have brought it up) and was not yet.
    device_close_due: bool = False
    device_close_sent_at: datetime | None = _ts(nullable=True)
    device_closed_at: datetime | None = _ts(nullable=True)
    device_handshake_at: datetime | None = _ts(nullable=True)
    device_endpoint: str | None = Field(default=None, max_length=64)
    bytes_from_device: int = Field(
        default=0, sa_column=Column(sa.BigInteger(), nullable=False, default=0)
    )
    bytes_to_device: int = Field(
        default=0, sa_column=Column(sa.BigInteger(), nullable=False, default=0)
    )


class TunnelAddress(SQLModel, table=True):
    """A pool address ever handed out: in use while `released_at` is NULL, then in quarantine.

    The address is the primary key, so two replicas can never hand out the same one.
    """

    __tablename__ = "tunnel_addresses"

    address: str = Field(primary_key=True, max_length=15)
    tunnel_id: str = Field(max_length=64, index=True)
    assigned_at: datetime = _ts()
    released_at: datetime | None = _ts(nullable=True)


class HubRecord(SQLModel, table=True):
    """The running hub's public side, so any replica can hand it to devices and engineers."""

    __tablename__ = "tunnel_hubs"

    id: str = Field(primary_key=True, max_length=32)
    public_key: str = Field(max_length=64)
    endpoint: str = Field(max_length=255)
    network: str = Field(max_length=18)
    hub_ip: str = Field(max_length=15)
    mtu: int
    interface: str = Field(max_length=15)
    started_at: datetime = _ts()
    heartbeat_at: datetime = _ts()

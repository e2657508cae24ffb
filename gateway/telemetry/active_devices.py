"""Which device ids may send telemetry: the registry's active devices, cached for the ingest.

The broker already refuses publishes from revoked or unknown credentials; this is the
gateway's own check, for messages that were in flight when a device was revoked and for a
broker that is not ours to configure. The whole set is reloaded every ``refresh`` seconds (a
revocation is seen within that time). An id not in the set is looked up at once before it is
refused, so a machine enrolled a moment ago is not turned away; ids found inactive are
remembered until the next reload so a device that keeps sending costs no query per message.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.registry.models import Device, DeviceState

_devices = Device.__table__  # type: ignore[attr-defined]


class ActiveDevices:
    """Used from one thread (the ingest's writer); raises SQLAlchemyError if the DB is down."""

    def __init__(self, engine: Engine, refresh: float = 5.0) -> None:
        self._engine = engine
        self._refresh = refresh
        self._active: set[str] = set()
        self._inactive: set[str] = set()
        self._loaded_at = float("-inf")

    def filter(self, device_ids: Iterable[str]) -> set[str]:
        """The subset of ``device_ids`` that are enrolled and not revoked."""
        wanted = set(device_ids)
        now = time.monotonic()
        if now - self._loaded_at >= self._refresh:
            self._reload(now)
        unknown = wanted - self._active - self._inactive
        if unknown:
            found = self._lookup(unknown)
            self._active |= found
            self._inactive |= unknown - found
        return wanted & self._active

    def _active_ids(self, where: sa.ColumnElement[bool] | None = None) -> set[str]:
        query = sa.select(_devices.c.id).where(_devices.c.state == DeviceState.active.value)
        if where is not None:
            query = query.where(where)
        with self._engine.connect() as conn:
            return {str(device_id) for device_id in conn.execute(query).scalars()}

    def _reload(self, now: float) -> None:
        self._active = self._active_ids()
        self._inactive = set()
        self._loaded_at = now

    def _lookup(self, device_ids: set[str]) -> set[str]:
        return self._active_ids(_devices.c.id.in_(sorted(device_ids)))

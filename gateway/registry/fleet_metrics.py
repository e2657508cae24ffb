"""Fleet figures for /metrics, read from the database at each scrape (every replica answers the
same): machines by state, deployments by state, open tunnels."""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from gateway.flows.models import Deployment
from gateway.registry.models import Device
from gateway.tunnels import states
from gateway.tunnels.models import TunnelRecord


class FleetCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        devices = Device.__table__  # type: ignore[attr-defined]
        deployments = Deployment.__table__  # type: ignore[attr-defined]
        tunnels = TunnelRecord.__table__  # type: ignore[attr-defined]
        state = sa.case(
            (devices.c.state != "active", devices.c.state),
            (devices.c.online.is_(True), "online"),
            else_="offline",
        )
        owner = sa.case((devices.c.customer_id.is_(None), "stock"), else_="customer")
        with self._engine.connect() as conn:
            machine_rows = conn.execute(
                sa.select(state, owner, sa.func.count()).group_by(state, owner)
            ).all()
            deployment_rows = conn.execute(
                sa.select(deployments.c.state, sa.func.count()).group_by(deployments.c.state)
            ).all()
            open_tunnels = conn.execute(
                sa.select(sa.func.count()).where(tunnels.c.state.in_(states.LIVE))
            ).scalar_one()
        machines = GaugeMetricFamily(
            "edgefleet_machines",
            "Machines in the registry by state (online, offline, revoked) and owner",
            labels=["state", "owner"],
        )
        for name, kind, count in machine_rows:
            machines.add_metric([str(name), str(kind)], float(count))
        yield machines
        by_state = GaugeMetricFamily(
            "edgefleet_deployments", "Deployments by state", labels=["state"]
        )
        for name, count in deployment_rows:
            by_state.add_metric([str(name)], float(count))
        yield by_state
        yield GaugeMetricFamily(
            "edgefleet_tunnels_open", "Support tunnels opening or open", value=float(open_tunnels)
        )

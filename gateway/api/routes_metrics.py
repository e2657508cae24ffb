"""``/metrics``: the gateway's own Prometheus metrics (text exposition format).

Served without a token, as Prometheus scrapers expect: it holds counters, timings and fleet-wide
counts only (no device names or ids, no secrets). Put it behind the proxy's access rules if that
is too much.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.api.deps import RuntimeDep
from gateway.registry.fleet_metrics import FleetCollector

router = APIRouter()


@router.get(
    "/metrics",
    tags=["ops"],
    summary="Prometheus metrics of this gateway",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(runtime: RuntimeDep) -> Response:
    fleet = CollectorRegistry(auto_describe=False)
    fleet.register(FleetCollector(runtime.engine))  # counted now, from the shared database
    body = generate_latest(runtime.metrics) + generate_latest(fleet)
    return Response(body, media_type=CONTENT_TYPE_LATEST)

"""``/metrics``: the gateway's own Prometheus metrics (text exposition format).

Served without a token, as Prometheus scrapers expect: it holds counters and timings only (no
device data, no secrets). Put it behind the proxy's access rules if that is too much.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.api.deps import RuntimeDep

router = APIRouter()


@router.get(
    "/metrics",
    tags=["ops"],
    summary="Prometheus metrics of this gateway",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(runtime: RuntimeDep) -> Response:
    return Response(generate_latest(runtime.metrics), media_type=CONTENT_TYPE_LATEST)

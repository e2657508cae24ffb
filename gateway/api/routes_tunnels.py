"""Support tunnels: open one to a machine, list them, close one, see the address pool."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, status

from gateway.api.deps import OperatorDep, RuntimeDep, SessionDep, Viewer
from gateway.db import utcnow
from gateway.tunnels import addresses, service
from gateway.tunnels.models import HubRecord
from gateway.tunnels.schemas import PoolOut, TunnelClose, TunnelOpen, TunnelOut
from gateway.tunnels.wireguard.pool import parse_network
from provisioning.wire import ErrorBody

_errors: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422, 502, 503, 504)
}
router = APIRouter(prefix="/api/v1", responses=_errors, tags=["tunnels"])


@router.post(
    "/tunnels",
    response_model=TunnelOut,
    status_code=status.HTTP_201_CREATED,
    summary="Open a support tunnel to one machine",
    description="Allocates a device and an engineer address from the pool, sends the machine a "
    "signed tunnel.open and (with wait) answers once the machine's WireGuard is up. Errors: 409 "
    "when the machine's owner refuses or the pool is exhausted, 504 when the machine does not "
    "come up in time, 503 without a running tunnel hub. A failed open leaves nothing open.",
)
def open_tunnel(
    body: TunnelOpen, session: SessionDep, runtime: RuntimeDep, who: OperatorDep
) -> TunnelOut:
    request = service.OpenRequest(
        device_id=body.device_id,
        ports=tuple(body.ports),
        ttl_seconds=body.ttl_seconds,
        reason=body.reason,
        engineer_public_key=body.engineer_public_key,
        open_timeout=body.open_timeout,
    )
    tunnel = service.open_tunnel(session, runtime, request, who.actor)
    if body.wait:
        tunnel = service.wait_open(runtime, tunnel.id)
    return TunnelOut.of(tunnel)


@router.get("/tunnels", response_model=list[TunnelOut], summary="Tunnels, newest first")
def list_tunnels(
    session: SessionDep,
    _: Viewer,
    include_closed: Annotated[bool, Query(description="Also closed, expired, failed.")] = False,
    device_id: Annotated[str | None, Query(description="Only this machine's.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[TunnelOut]:
    rows = service.list_tunnels(
        session, include_closed=include_closed, device_id=device_id, limit=limit
    )
    return [TunnelOut.of(row) for row in rows]


@router.get("/tunnels/pool", response_model=PoolOut, summary="Tunnel address pool and hub")
def tunnel_pool(session: SessionDep, runtime: RuntimeDep, _: Viewer) -> PoolOut:
    hub = session.get(HubRecord, service.HUB_ID)
    network = parse_network(hub.network if hub else runtime.settings.tunnel_network)
    usage = addresses.usage(session, network, utcnow(), runtime.settings.tunnel_quarantine)
    return PoolOut.of(usage, hub)


@router.get("/tunnels/{tunnel_id}", response_model=TunnelOut)
def show_tunnel(tunnel_id: str, session: SessionDep, _: Viewer) -> TunnelOut:
    return TunnelOut.of(service.get_tunnel(session, tunnel_id))


@router.post(
    "/tunnels/{tunnel_id}/close",
    response_model=TunnelOut,
    summary="Close a tunnel now",
    description="Takes its peers and rules off the hub (waiting up to 10 s for the hub) and "
    "tells the machine to drop its side. Closing a closed tunnel changes nothing.",
)
def close_tunnel(
    tunnel_id: str,
    runtime: RuntimeDep,
    who: OperatorDep,
    body: Annotated[TunnelClose | None, Body()] = None,
) -> TunnelOut:
    reason = body.reason if body else ""
    return TunnelOut.of(service.close_tunnel(runtime, tunnel_id, who.actor, reason))

"""Support tunnels: open one to a machine, list them, close one, see the address pool."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response, status
from sqlmodel import col, select

from gateway.accounts import consent, scoping
from gateway.accounts.principal import Principal
from gateway.api.auth import FleetRead, TunnelClose, TunnelOpen, TunnelPool
from gateway.api.deps import RuntimeDep, SessionDep
from gateway.api.pages import PageDep, send_page
from gateway.db import utcnow
from gateway.errors import NotFound
from gateway.pagination import SortKey, paginate
from gateway.registry.models import Device
from gateway.tunnels import addresses, service
from gateway.tunnels.models import HubRecord, TunnelRecord
from gateway.tunnels.schemas import PoolOut, TunnelOut
from gateway.tunnels.schemas import TunnelClose as TunnelCloseBody
from gateway.tunnels.schemas import TunnelOpen as TunnelOpenBody
from gateway.tunnels.wireguard.pool import parse_network
from provisioning.states import TUNNEL_FINAL
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
    "when the machine's owner refuses, its customer requires consent and has granted no window "
    "now (`consent_required`; inside a window the tunnel ends with it at the latest), or the "
    "pool is exhausted, 504 when the machine does not "
    "come up in time, 503 without a running tunnel hub. A failed open leaves nothing open.",
)
def open_tunnel(
    body: TunnelOpenBody, session: SessionDep, runtime: RuntimeDep, who: TunnelOpen
) -> TunnelOut:
    device = scoping.resolve_device(session, who, body.device_id)
    ttl = body.ttl_seconds
    deadline = consent.tunnel_deadline(session, device)  # 409 outside a granted window
    if deadline is not None:  # the tunnel ends with the customer's window at the latest
        ttl = max(1, min(ttl, int((deadline - utcnow()).total_seconds())))
    request = service.OpenRequest(
        device_id=device.id,
        ports=tuple(body.ports),
        ttl_seconds=ttl,
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
    request: Request,
    response: Response,
    session: SessionDep,
    who: FleetRead,
    page: PageDep,
    include_closed: Annotated[bool, Query(description="Also closed, expired, failed.")] = False,
    device_id: Annotated[
        str | None, Query(max_length=64, description="Only this machine's (id or name).")
    ] = None,
) -> list[TunnelOut]:
    query = select(TunnelRecord).where(col(TunnelRecord.device_id).in_(scoping.device_ids(who)))
    if not include_closed:
        query = query.where(col(TunnelRecord.state).not_in(TUNNEL_FINAL))
    if device_id:
        device = scoping.resolve_device(session, who, device_id)
        query = query.where(TunnelRecord.device_id == device.id)
    keys = [SortKey(col(TunnelRecord.created_at), True), SortKey(col(TunnelRecord.id), True)]
    found = paginate(session, query, keys, page, lambda t: (t.created_at, t.id))
    send_page(request, response, found)
    return [TunnelOut.of(row) for row in found.items]


def _visible_tunnel(session: SessionDep, who: Principal, tunnel_id: str) -> TunnelRecord:
    tunnel = session.get(TunnelRecord, tunnel_id)
    device = session.get(Device, tunnel.device_id) if tunnel else None
    if tunnel is None or device is None or not scoping.sees(who, device):
        raise NotFound("unknown_tunnel", f"no tunnel {tunnel_id!r}")
    return tunnel


@router.get("/tunnels/pool", response_model=PoolOut, summary="Tunnel address pool and hub")
def tunnel_pool(session: SessionDep, runtime: RuntimeDep, _: TunnelPool) -> PoolOut:
    hub = session.get(HubRecord, service.HUB_ID)
    network = parse_network(hub.network if hub else runtime.settings.tunnel_network)
    usage = addresses.usage(session, network, utcnow(), runtime.settings.tunnel_quarantine)
    return PoolOut.of(usage, hub)


@router.get("/tunnels/{tunnel_id}", response_model=TunnelOut)
def show_tunnel(tunnel_id: str, session: SessionDep, who: FleetRead) -> TunnelOut:
    return TunnelOut.of(_visible_tunnel(session, who, tunnel_id))


@router.post(
    "/tunnels/{tunnel_id}/close",
    response_model=TunnelOut,
    summary="Close a tunnel now",
    description="Takes its peers and rules off the hub (waiting up to 10 s for the hub) and "
    "tells the machine to drop its side. Closing a closed tunnel changes nothing.",
)
def close_tunnel(
    tunnel_id: str,
    session: SessionDep,
    runtime: RuntimeDep,
    who: TunnelClose,
    body: Annotated[TunnelCloseBody | None, Body()] = None,
) -> TunnelOut:
    _visible_tunnel(session, who, tunnel_id)
    reason = body.reason if body else ""
    return TunnelOut.of(service.close_tunnel(runtime, tunnel_id, who.actor, reason))

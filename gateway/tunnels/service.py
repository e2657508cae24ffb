"""Opening, waiting for, closing and listing support tunnels (what the API calls).

Opening records the tunnel with its two pool addresses and sends the device a signed
`tunnel.open`; the rest happens elsewhere and meets in the database: the reply hook stores the
device's key, the hub runner adds both peers and sends `tunnel.connect`, and marks the tunnel open
at the first handshake. `wait_open` watches the row until then, and past the open deadline ends
the tunnel itself, so a failed open leaves nothing behind and says why.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv4Network

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from gateway.commands.sender import issue
from gateway.db import utcnow
from gateway.errors import (
    Conflict,
    GatewayError,
    Invalid,
    NotFound,
    OpenFailed,
    OpenTimedOut,
    Unavailable,
)
from gateway.registry import audit, devices
from gateway.runtime import GatewayRuntime
from gateway.tunnels import addresses, states
from gateway.tunnels.addresses import AddressRaceError
from gateway.tunnels.lifecycle import begin_close, fail, finalize
from gateway.tunnels.models import HubRecord, TunnelRecord
from gateway.tunnels.states import TunnelFailure
from gateway.tunnels.wireguard.pool import PoolExhaustedError, parse_network
from provisioning.states import TUNNEL_FINAL, CommandKind, TunnelState
from provisioning.tunnel_command import TunnelOpenArgs

HUB_ID = "default"
#: A hub that has not written its heartbeat for this long is taken as down.
HUB_STALE_AFTER = 30.0
#: Keepalive the device keeps towards the hub (holds the customer's NAT open).
DEVICE_KEEPALIVE = 15
#: How long a close waits for the hub to take the peers out before answering.
CLOSE_WAIT = 10.0
POLL_INTERVAL = 0.05
_ALLOCATION_ATTEMPTS = 5


@dataclass(frozen=True)
class OpenRequest:
    device_id: str
    ports: tuple[int, ...]
    ttl_seconds: int
    reason: str
    engineer_public_key: str
    #: How long to wait for the machine; at most (and by default) the gateway's open timeout.
    open_timeout: float | None = None


def span(seconds: float) -> str:
    """90 -> '1m30s', 7200 -> '2h' (for messages)."""
    whole = round(seconds)
    parts: list[str] = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size or (unit == "s" and not parts):
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)


def live_hub(session: Session, now: datetime) -> HubRecord:
    """The running hub's public side, or a clear 503 when there is none."""
    hub = session.get(HubRecord, HUB_ID)
    if hub is None:
        raise Unavailable(
            "no_tunnel_hub",
            "no tunnel hub is running: start one gateway replica with --tunnel-hub "
            "--tunnel-endpoint HOST:PORT",
        )
    age = (now - hub.heartbeat_at).total_seconds()
    if age > HUB_STALE_AFTER:
        raise Unavailable(
            "tunnel_hub_down",
            f"the tunnel hub ({hub.endpoint}) has not reported for {span(age)}; is the gateway "
            "replica started with --tunnel-hub running?",
        )
    return hub


def live_tunnel_of(session: Session, device_id: str) -> TunnelRecord | None:
    query = select(TunnelRecord).where(
        TunnelRecord.device_id == device_id, col(TunnelRecord.state).in_(states.LIVE)
    )
    return session.exec(query).first()


def get_tunnel(session: Session, tunnel_id: str) -> TunnelRecord:
    tunnel = session.get(TunnelRecord, tunnel_id)
    if tunnel is None:
        raise NotFound("unknown_tunnel", f"no tunnel {tunnel_id!r}")
    return tunnel


def list_tunnels(
    session: Session,
    *,
    include_closed: bool = False,
    device_id: str | None = None,
    limit: int = 200,
) -> list[TunnelRecord]:
    query = select(TunnelRecord)
    if not include_closed:
        query = query.where(col(TunnelRecord.state).not_in(TUNNEL_FINAL))
    if device_id:
        query = query.where(TunnelRecord.device_id == device_id)
    query = query.order_by(col(TunnelRecord.created_at).desc()).limit(limit)
    return list(session.exec(query))


def session_args(tunnel: TunnelRecord) -> TunnelOpenArgs:
    """What `tunnel.open` asks the device to bring up."""
    return TunnelOpenArgs(
        tunnel_id=tunnel.id,
        device_ip=IPv4Address(tunnel.device_ip),
        engineer_ip=IPv4Address(tunnel.engineer_ip),
        hub_ip=IPv4Address(tunnel.hub_ip),
        hub_public_key=tunnel.hub_public_key,
        hub_endpoint=tunnel.hub_endpoint,
        ports=frozenset(tunnel.ports),
        expires_at=tunnel.expires_at.timestamp(),
        mtu=tunnel.mtu,
        keepalive=DEVICE_KEEPALIVE,
    )


def _check_request(session: Session, runtime: GatewayRuntime, request: OpenRequest) -> None:
    device = devices.get_device(session, request.device_id)
    if device.state != "active":
        raise Conflict("device_revoked", f"device {device.id} is revoked")
    limit = runtime.settings.tunnel_max_ttl
    if request.ttl_seconds > limit:
        raise Invalid(
            "ttl_too_long",
            f"a tunnel may last at most {span(limit)} on this gateway, not "
            f"{span(request.ttl_seconds)}; ask for less (extending needs a new open)",
        )
    existing = live_tunnel_of(session, device.id)
    if existing is not None:
        raise Conflict(
            "tunnel_exists",
            f"device {device.id} already has tunnel {existing.id} ({existing.state}, until "
            f"{existing.expires_at:%Y-%m-%d %H:%M:%S} UTC); close it first",
        )


def _record(
    session: Session,
    runtime: GatewayRuntime,
    request: OpenRequest,
    hub: HubRecord,
    network: IPv4Network,
    actor: str,
    now: datetime,
) -> TunnelRecord:
    tunnel_id = f"t-{secrets.token_hex(4)}"
    quarantine = runtime.settings.tunnel_quarantine
    limit = runtime.settings.tunnel_open_timeout
    open_timeout = min(request.open_timeout or limit, limit)
    device_ip, engineer_ip = addresses.allocate(session, network, tunnel_id, now, quarantine)
    tunnel = TunnelRecord(
        id=tunnel_id,
        device_id=request.device_id,
        active_device=request.device_id,
        state=TunnelState.requested,
        actor=actor,
        reason=request.reason,
        ports=sorted(set(request.ports)),
        device_ip=str(device_ip),
        engineer_ip=str(engineer_ip),
        engineer_public_key=request.engineer_public_key,
        hub_ip=hub.hub_ip,
        hub_public_key=hub.public_key,
        hub_endpoint=hub.endpoint,
        mtu=hub.mtu,
        created_at=now,
        expires_at=now + timedelta(seconds=request.ttl_seconds),
        open_deadline=now + timedelta(seconds=open_timeout),
    )
    session.add(tunnel)
    audit.record(
        session,
        actor,
        "tunnel.open",
        target=request.device_id,
        tunnel_id=tunnel_id,
        why=request.reason,
        ports=tunnel.ports,
        ttl_seconds=request.ttl_seconds,
        device_ip=tunnel.device_ip,
        engineer_ip=tunnel.engineer_ip,
        engineer_public_key=request.engineer_public_key,
    )
    session.flush()
    return tunnel


def open_tunnel(
    session: Session, runtime: GatewayRuntime, request: OpenRequest, actor: str
) -> TunnelRecord:
    """Record a tunnel with fresh pool addresses and send the device `tunnel.open`."""
    _check_request(session, runtime, request)
    now = utcnow()
    hub = live_hub(session, now)
    if request.engineer_public_key == hub.public_key:
        raise Invalid("bad_engineer_key", "the engineer's public key is the hub's own key")
    publisher = runtime.command_publisher()
    network = parse_network(hub.network)
    tunnel: TunnelRecord | None = None
    for _attempt in range(_ALLOCATION_ATTEMPTS):
        try:
            tunnel = _record(session, runtime, request, hub, network, actor, now)
            session.commit()
            break
        except PoolExhaustedError as exc:
            session.rollback()
            raise Conflict("pool_exhausted", str(exc)) from exc
        except (IntegrityError, AddressRaceError):
            session.rollback()  # a concurrent open took an address, the id, or the device
            _check_request(session, runtime, request)
    if tunnel is None:
        raise Unavailable("busy", "could not allocate tunnel addresses (contention); try again")
    try:
        issue(
            session,
            identity=runtime.identity,
            publisher=publisher,
            device_id=tunnel.device_id,
            kind=CommandKind.tunnel_open,
            args=session_args(tunnel),
            lifetime=math.ceil((tunnel.open_deadline - tunnel.created_at).total_seconds()),
            actor=actor,
            ref=tunnel.id,
        )
    except Unavailable as exc:
        session.rollback()
        finalize(
            session,
            tunnel,
            final_state=TunnelState.failed,
            reason=f"the command could not be sent: {exc.detail}",
            actor="gateway",
            now=utcnow(),
            from_states=(TunnelState.requested,),
            failure=TunnelFailure.broker_unavailable,
            device_close_due=False,
        )
        session.commit()
        raise
    return tunnel


def _poll(
    engine: Engine, tunnel_id: str, done: Callable[[TunnelRecord], bool], timeout: float
) -> TunnelRecord:
    """The tunnel row once `done(row)` holds, or as it is when `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        with Session(engine, expire_on_commit=False) as session:
            row = get_tunnel(session, tunnel_id)
        if done(row) or time.monotonic() >= deadline:
            return row
        time.sleep(POLL_INTERVAL)


def deadline_reason(tunnel: TunnelRecord, session: Session) -> tuple[str, str]:
    """(failure code, message) for a tunnel that was not open by its deadline."""
    waited = span((tunnel.open_deadline - tunnel.created_at).total_seconds())
    if tunnel.state == TunnelState.requested:
        device = devices.get_device(session, tunnel.device_id)
        seen = (
            f"last seen {device.last_seen:%Y-%m-%d %H:%M:%S} UTC"
            if device.last_seen
            else "never seen online"
        )
        registry = "online" if device.online else f"offline, {seen}"
        return (
            TunnelFailure.device_offline,
            f"device {tunnel.device_id} did not answer within {waited}: it is offline or its "
            f"agent is not running (registry: {registry})",
        )
    if tunnel.state == TunnelState.prepared:
        return (
            TunnelFailure.hub_failed,
            f"the tunnel hub did not take the tunnel within {waited}; is the gateway replica "
            "started with --tunnel-hub running?",
        )
    return (
        TunnelFailure.no_handshake,
        f"device {tunnel.device_id} brought its side up but made no WireGuard handshake with the "
        f"hub at {tunnel.hub_endpoint} within {waited}; check that it can reach that UDP port",
    )


def fail_if_late(session: Session, runtime: GatewayRuntime, tunnel: TunnelRecord) -> bool:
    """End a tunnel still opening past its deadline; whether this call did."""
    failure, reason = deadline_reason(tunnel, session)
    return fail(session, tunnel, failure, reason, from_states=(tunnel.state,))


def open_error(tunnel: TunnelRecord) -> GatewayError:
    """The HTTP error for a tunnel that did not open."""
    why = tunnel.close_reason or tunnel.state
    detail = (
        f"tunnel {tunnel.id} to {tunnel.device_id} was not opened: {why}. Nothing was left open."
    )
    if tunnel.failure == TunnelFailure.device_refused:
        return Conflict("device_refused", detail)
    if tunnel.failure in (TunnelFailure.device_offline, TunnelFailure.no_handshake):
        return OpenTimedOut(tunnel.failure, detail)
    if tunnel.failure == TunnelFailure.broker_unavailable:
        return Unavailable(tunnel.failure, detail)
    if tunnel.state == TunnelState.closed:
        return Conflict(
            "closed", f"tunnel {tunnel.id} was closed by {tunnel.closed_by} while opening"
        )
    return OpenFailed(tunnel.failure or "open_failed", detail)


def wait_open(runtime: GatewayRuntime, tunnel_id: str) -> TunnelRecord:
    """Wait until the tunnel is open (first handshake), or fail it at its deadline and raise."""
    engine = runtime.engine
    with Session(engine, expire_on_commit=False) as session:
        tunnel = get_tunnel(session, tunnel_id)
    remaining = (tunnel.open_deadline - utcnow()).total_seconds()
    row = _poll(engine, tunnel_id, lambda t: t.state not in states.OPENING, max(0.0, remaining))
    if row.state in states.OPENING:
        with Session(engine, expire_on_commit=False) as session:
            fail_if_late(session, runtime, row)
    if row.state == TunnelState.open:
        return row
    final = _poll(
        engine, tunnel_id, lambda t: t.state in (*TUNNEL_FINAL, TunnelState.open), CLOSE_WAIT
    )
    if final.state == TunnelState.open:
        return final
    raise open_error(final)


def close_tunnel(
    runtime: GatewayRuntime, tunnel_id: str, actor: str, reason: str, wait: bool = True
) -> TunnelRecord:
    """Close a tunnel now (idempotent); waits, bounded, until the hub has taken it out."""
    with Session(runtime.engine, expire_on_commit=False) as session:
        tunnel = get_tunnel(session, tunnel_id)
        if tunnel.state not in TUNNEL_FINAL:
            begin_close(
                session,
                tunnel,
                final_state=TunnelState.closed,
                reason=reason or f"closed by {actor}",
                actor=actor,
                now=utcnow(),
            )
            session.commit()
    if not wait:
        with Session(runtime.engine, expire_on_commit=False) as session:
            return get_tunnel(session, tunnel_id)
    return _poll(runtime.engine, tunnel_id, lambda t: t.state in TUNNEL_FINAL, CLOSE_WAIT)

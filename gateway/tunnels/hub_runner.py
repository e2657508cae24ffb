"""Drives the WireGuard hub from the database, on the one replica started with --tunnel-hub.

A small reconciler: every tick it reads the tunnels that concern the hub and does what each state
asks, changing only what changed (no periodic full `syncconf`):

* `prepared` (the device reported its key): claim it (`dialing`), add both peers and the tunnel's
  nftables chain, then send the device `tunnel.connect`, so the hub knows the device before it
  dials;
* `dialing`: watch `wg show dump`; the first handshake makes the tunnel `open` (audited);
* `open`: copy handshake time and byte counters into the row now and then, for `tunnel list`;
* `closing`: take the peers and rules out, then finalize with the bytes moved and tell the device.

Because it works from stored state, it does not matter which replica received the device's reply.
At start it publishes the hub's public side (key, endpoint, network) for the other replicas and
`restore`s the hub from the database: wireguard-go outlives a gateway restart, so open tunnels
keep working and only differences are fixed. It ticks fast while a tunnel is opening or closing
and slowly otherwise; a reply hook wakes it at once when a device's key arrives.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.commands.sender import issue
from gateway.db import utcnow
from gateway.errors import HubConflictError, Unavailable
from gateway.registry import audit
from gateway.runtime import GatewayRuntime
from gateway.tunnels import states
from gateway.tunnels.lifecycle import fail, finalize, send_device_closes, transition
from gateway.tunnels.models import HubRecord, TunnelRecord
from gateway.tunnels.service import HUB_ID, HUB_STALE_AFTER
from gateway.tunnels.states import TunnelFailure
from gateway.tunnels.wireguard.hub import HubTunnel, TunnelHub, UnknownTunnelError
from provisioning.periodic import Periodic
from provisioning.states import CommandKind, TunnelState
from provisioning.tunnel_command import TunnelRef
from provisioning.wireguard.tools import PeerStats, WireGuardError

log = logging.getLogger(__name__)

_WORK = (TunnelState.prepared, TunnelState.dialing, TunnelState.open, TunnelState.closing)


def hub_tunnel(row: TunnelRecord) -> HubTunnel:
    """The hub's view of a stored tunnel (its device key must be known)."""
    if row.device_public_key is None:
        raise ValueError(f"tunnel {row.id} has no device key yet")
    return HubTunnel(
        row.id,
        row.device_public_key,
        row.engineer_public_key,
        IPv4Address(row.device_ip),
        IPv4Address(row.engineer_ip),
        frozenset(row.ports),
    )


def _at(unix: float | None) -> datetime | None:
    return datetime.fromtimestamp(unix, UTC) if unix is not None else None


class HubRunner:
    def __init__(
        self,
        runtime: GatewayRuntime,
        hub: TunnelHub,
        endpoint: str,
        *,
        busy_tick: float = 0.05,
        idle_tick: float = 0.25,
        heartbeat_every: float = 5.0,
        stats_every: float = 2.0,
    ) -> None:
        self.runtime = runtime
        self.hub = hub
        self.endpoint = endpoint
        self.busy_tick = busy_tick
        self.idle_tick = idle_tick
        self.heartbeat_every = heartbeat_every
        self.stats_every = stats_every
        self._periodic = Periodic("tunnel-hub", self._tick, idle_tick, first_at_start=True)
        self._next_heartbeat = 0.0
        self._next_stats = 0.0

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Claim the hub's row, bring the hub up (or adopt it), restore it, start the loop."""
        self._claim()
        self.hub.up()
        with Session(self.runtime.engine, expire_on_commit=False) as session:
            rows = session.exec(
                select(TunnelRecord).where(
                    col(TunnelRecord.state).in_(states.ON_HUB),
                    col(TunnelRecord.device_public_key).is_not(None),
                )
            ).all()
        report = self.hub.restore([hub_tunnel(row) for row in rows])
        log.info("tunnel hub restored %d tunnel(s) from the database: %s", len(rows), report)
        self._periodic.start()

    def wake(self) -> None:
        self._periodic.wake()

    def stop(self) -> None:
        """Stop the loop. The hub stays up while tunnels are open (a restart adopts it)."""
        self._periodic.stop(timeout=10)
        open_now = self.hub.tunnels
        if open_now:
            log.info(
                "leaving tunnel hub %s up for %d open tunnel(s); a restarted gateway adopts it",
                self.hub.interface,
                len(open_now),
            )
        else:
            try:
                self.hub.down()
            except WireGuardError as exc:  # stopping anyway; a restart adopts or replaces it
                log.error("tunnel hub %s did not go down cleanly: %s", self.hub.interface, exc)

    def _claim(self) -> None:
        now = utcnow()
        with Session(self.runtime.engine, expire_on_commit=False) as session:
            row = session.get(HubRecord, HUB_ID)
            public_key = self.hub.public_key
            if (
                row is not None
                and row.public_key != public_key
                and (now - row.heartbeat_at).total_seconds() < HUB_STALE_AFTER
            ):
                raise HubConflictError(
                    f"another tunnel hub ({row.endpoint}) is running for this database; run "
                    "--tunnel-hub on one replica only"
                )
            fields: dict[str, Any] = {
                "public_key": public_key,
                "endpoint": self.endpoint,
                "network": str(self.hub.network),
                "hub_ip": str(self.hub.hub_ip),
                "mtu": self.hub.mtu,
                "interface": self.hub.interface,
                "started_at": now,
                "heartbeat_at": now,
            }
            if row is None:
                row = HubRecord(id=HUB_ID, **fields)
            else:
                for name, value in fields.items():
                    setattr(row, name, value)
            session.add(row)
            session.commit()

    # ---- the loop -------------------------------------------------------------------------
    def _tick(self) -> float:
        """One reconcile; tick fast while a tunnel is on its way."""
        return self.busy_tick if self.reconcile() else self.idle_tick

    def reconcile(self) -> bool:
        """One pass; whether a tunnel is still on its way (tick fast)."""
        with Session(self.runtime.engine, expire_on_commit=False) as session:
            rows = session.exec(
                select(TunnelRecord).where(col(TunnelRecord.state).in_(_WORK))
            ).all()
        by_state: dict[str, list[TunnelRecord]] = {state: [] for state in _WORK}
        for row in rows:
            by_state[row.state].append(row)
        for row in by_state[TunnelState.prepared]:
            self._add(row)
        closed = sum(self._remove(row) for row in by_state[TunnelState.closing])
        self._watch(by_state[TunnelState.dialing], by_state[TunnelState.open])
        known = {row.id for row in rows}
        for stray in set(self.hub.tunnels) - known:
            log.warning("tunnel %s is on the hub but not live in the database; removing", stray)
            self.hub.remove_tunnel(stray)
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_every
            self._heartbeat()
        if closed:
            with Session(self.runtime.engine, expire_on_commit=False) as session:
                send_device_closes(session, self.runtime, utcnow())
        return bool(by_state[TunnelState.prepared] or by_state[TunnelState.dialing] or closed)

    def _heartbeat(self) -> None:
        with Session(self.runtime.engine) as session:
            session.execute(
                sa.update(HubRecord)
                .where(
                    col(HubRecord.id) == HUB_ID, col(HubRecord.public_key) == self.hub.public_key
                )
                .values(heartbeat_at=utcnow())
            )
            session.commit()

    def _fail(self, row: TunnelRecord, failure: str, reason: str) -> None:
        with Session(self.runtime.engine, expire_on_commit=False) as session:
            fail(session, row, failure, reason, from_states=(TunnelState.dialing,))

    def _add(self, row: TunnelRecord) -> None:
        with Session(self.runtime.engine, expire_on_commit=False) as session:
            claimed = transition(
                session,
                row.id,
                (TunnelState.prepared,),
                state=TunnelState.dialing,
                hub_added_at=utcnow(),
            )
            session.commit()
        if not claimed:
            return
        try:
            self.hub.add_tunnel(hub_tunnel(row))
        except (ValueError, WireGuardError) as exc:
            log.error("tunnel %s: the hub could not add it: %s", row.id, exc)
            self._fail(row, TunnelFailure.hub_failed, f"the hub could not add the tunnel: {exc}")
            return
        lifetime = max(30, int((row.open_deadline - utcnow()).total_seconds()) + 1)
        try:
            with Session(self.runtime.engine, expire_on_commit=False) as session:
                issue(
                    session,
                    identity=self.runtime.identity,
                    publisher=self.runtime.command_publisher(),
                    device_id=row.device_id,
                    kind=CommandKind.tunnel_connect,
                    args=TunnelRef(tunnel_id=row.id),
                    lifetime=lifetime,
                    actor=row.actor,
                    ref=row.id,
                )
        except Unavailable as exc:
            self._fail(
                row, TunnelFailure.broker_unavailable, f"tunnel.connect not sent: {exc.detail}"
            )

    def _remove(self, row: TunnelRecord) -> bool:
        try:
            stats = self.hub.remove_tunnel(row.id)
        except UnknownTunnelError:
            stats = None  # it never got onto the hub (adding failed)
        except WireGuardError as exc:
            log.error("tunnel %s: removing it from the hub failed (will retry): %s", row.id, exc)
            return False
        with Session(self.runtime.engine, expire_on_commit=False) as session:
            done = finalize(
                session,
                row,
                final_state=TunnelState(row.close_state or TunnelState.closed),
                reason=row.close_reason or "closed",
                actor=row.closed_by or "gateway",
                now=utcnow(),
                from_states=(TunnelState.closing,),
                failure=row.failure,
                stats=stats,
            )
            session.commit()
        return done

    def _watch(self, dialing: list[TunnelRecord], open_rows: list[TunnelRecord]) -> None:
        """Dialing tunnels: open at the first handshake. Open ones: counters now and then."""
        now = time.monotonic()
        stats_due = bool(open_rows) and now >= self._next_stats
        if not dialing and not stats_due:
            return
        peers = self.hub.peer_stats()  # one `wg show dump` for all tunnels
        for row in dialing:
            peer = peers.get(row.device_public_key or "")
            if peer is not None and peer.last_handshake is not None:
                self._mark_open(row, peer)
        if not stats_due:
            return
        self._next_stats = now + self.stats_every
        with Session(self.runtime.engine) as session:
            for row in open_rows:
                peer = peers.get(row.device_public_key or "")
                if peer is None:
                    continue
                values: dict[str, Any] = {}
                handshake = _at(peer.last_handshake)
                if handshake is not None and handshake != row.device_handshake_at:
                    values["device_handshake_at"] = handshake
                if peer.endpoint and peer.endpoint != row.device_endpoint:
                    values["device_endpoint"] = peer.endpoint
                if peer.rx_bytes != row.bytes_from_device:
                    values["bytes_from_device"] = peer.rx_bytes
                if peer.tx_bytes != row.bytes_to_device:
                    values["bytes_to_device"] = peer.tx_bytes
                if values:
                    transition(session, row.id, (TunnelState.open,), **values)
            session.commit()

    def _mark_open(self, row: TunnelRecord, peer: PeerStats) -> None:
        now = utcnow()
        with Session(self.runtime.engine) as session:
            if not transition(
                session,
                row.id,
                (TunnelState.dialing,),
                state=TunnelState.open,
                opened_at=now,
                device_handshake_at=_at(peer.last_handshake),
                device_endpoint=peer.endpoint,
                bytes_from_device=peer.rx_bytes,
                bytes_to_device=peer.tx_bytes,
            ):
                return
            audit.record(
                session,
                row.actor,
                "tunnel.handshake",
                target=row.device_id,
                tunnel_id=row.id,
                why=row.reason,
                seconds_to_open=round((now - row.created_at).total_seconds(), 3),
                device_endpoint=peer.endpoint,
            )
            session.commit()
        log.info("tunnel %s to %s is open (first handshake)", row.id, row.device_id)

"""Tunnel addresses from the database: one /32 per peer, never two holders, quarantine on release.

`wireguard.pool.choose_address` decides (pure); this module feeds it the stored state and
claims the chosen address in the same transaction. The address is the table's primary key and a
re-used address is claimed with a conditional UPDATE, so two replicas allocating at once cannot
both get it: the loser's transaction fails and is retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, ip_address

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.tunnels.models import TunnelAddress
from gateway.tunnels.wireguard.pool import PoolExhaustedError, choose_address, hub_address


class AddressRaceError(RuntimeError):
    """Another transaction claimed the address first; retry the allocation."""


def _stored(session: Session) -> tuple[set[IPv4Address], dict[IPv4Address, datetime]]:
    in_use: set[IPv4Address] = set()
    released: dict[IPv4Address, datetime] = {}
    for row in session.exec(select(TunnelAddress)):
        addr = ip_address(row.address)
        if not isinstance(addr, IPv4Address):
            continue
        if row.released_at is None:
            in_use.add(addr)
        else:
            released[addr] = row.released_at
    return in_use, released


def allocate(
    session: Session,
    network: IPv4Network,
    tunnel_id: str,
    now: datetime,
    quarantine: float,
    count: int = 2,
) -> list[IPv4Address]:
    """Claim `count` free addresses for `tunnel_id` in this transaction (flushed, not committed).

    All or none: raises PoolExhaustedError (saying how many are in use or in quarantine) when
    fewer are free, AddressRaceError when another transaction took one at the same moment.
    """
    in_use, released = _stored(session)
    seconds = {addr: when.timestamp() for addr, when in released.items()}
    chosen: list[IPv4Address] = []
    try:
        for _ in range(count):
            taken = in_use | set(chosen)
            chosen.append(choose_address(network, taken, seconds, now.timestamp(), quarantine))
    except PoolExhaustedError as exc:
        if not chosen:
            raise
        pool = usage(session, network, now, quarantine)
        soon = ""
        if pool.next_release_at is not None:
            wait = max(0.0, (pool.next_release_at - now).total_seconds())
            soon = f"; the next comes back in {wait:.0f}s"
        raise PoolExhaustedError(
            f"tunnel address pool exhausted: a tunnel needs {count} addresses and only "
            f"{len(chosen)} of the {pool.size} in {network} is free ({pool.in_use} in use, "
            f"{pool.quarantined} in quarantine after release{soon}). Close tunnels that are "
            "no longer needed or configure a larger pool."
        ) from exc
    cutoff = now - timedelta(seconds=quarantine)
    for addr in chosen:
        if addr in released:
            claimed = session.execute(
                sa.update(TunnelAddress)
                .where(
                    col(TunnelAddress.address) == str(addr),
                    col(TunnelAddress.released_at).is_not(None),
                    col(TunnelAddress.released_at) <= cutoff,
                )
                .values(tunnel_id=tunnel_id, assigned_at=now, released_at=None)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                raise AddressRaceError(f"{addr} was claimed by another tunnel at the same moment")
        else:
            session.add(TunnelAddress(address=str(addr), tunnel_id=tunnel_id, assigned_at=now))
    session.flush()
    return chosen


def release(session: Session, tunnel_id: str, now: datetime) -> int:
    """Put a tunnel's addresses into quarantine; returns how many were released."""
    result = session.execute(
        sa.update(TunnelAddress)
        .where(col(TunnelAddress.tunnel_id) == tunnel_id, col(TunnelAddress.released_at).is_(None))
        .values(released_at=now)
    )
    count: int = result.rowcount  # type: ignore[attr-defined]
    return count


@dataclass(frozen=True)
class PoolUsage:
    network: IPv4Network
    hub_ip: IPv4Address
    size: int
    in_use: int
    quarantined: int
    next_release_at: datetime | None

    @property
    def free(self) -> int:
        return self.size - self.in_use - self.quarantined


def usage(session: Session, network: IPv4Network, now: datetime, quarantine: float) -> PoolUsage:
    """How much of the pool is taken, and when the next quarantined address comes back."""
    in_use, released = _stored(session)
    cutoff = now - timedelta(seconds=quarantine)
    waiting = [when for addr, when in released.items() if addr in network and when > cutoff]
    return PoolUsage(
        network=network,
        hub_ip=hub_address(network),
        size=network.num_addresses - 3,
        in_use=sum(1 for addr in in_use if addr in network),
        quarantined=len(waiting),
        next_release_at=min(waiting) + timedelta(seconds=quarantine) if waiting else None,
    )

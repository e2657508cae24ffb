"""Tunnel addresses: one /32 per WireGuard peer, from a configured pool, never reused at once.

Two WireGuard peers with overlapping AllowedIPs do not fail: the range silently moves to the
newest peer, so traffic meant for one machine would reach another. The allocator is therefore the
one place that decides addresses, and it checks every address it hands out or is handed.

`choose_address` is a pure function of (pool, addresses in use, recent releases, now) so the
gateway drives it from a database query and keeps the state in the database
(`gateway.tunnels.addresses`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

logger = logging.getLogger(__name__)

#: Private range chosen to stay clear of 100.64.0.0/10 (carrier-grade NAT, Tailscale) and of the
#: usual 10.0.x / 192.168.x LANs and container defaults (10.88/16 podman, 172.17/16 docker).
DEFAULT_NETWORK = IPv4Network("10.213.0.0/16")
#: A released address waits this long before it is handed out again, so a late packet or a
#: stale engineer config cannot reach the next tunnel's machine.
DEFAULT_QUARANTINE = 600.0
CGNAT_NETWORK = IPv4Network("100.64.0.0/10")


class PoolError(ValueError):
    """An address request that cannot be met as asked."""


class PoolExhaustedError(PoolError):
    """No address is free: all are in use or still in quarantine after release."""


class AddressNotAssignableError(PoolError):
    """An address is outside the pool, reserved (network, broadcast, hub) or already in use."""


def parse_network(network: str | IPv4Network) -> IPv4Network:
    """Check a configured pool: IPv4, at least a /29 (hub plus a few peers)."""
    try:
        net = ip_network(network) if isinstance(network, str) else network
    except ValueError as exc:
        raise PoolError(
            f"tunnel pool {network!r} is not a network: {exc}; use CIDR such as 10.213.0.0/16"
        ) from exc
    if not isinstance(net, IPv4Network):
        raise PoolError(f"tunnel pool {network!r} must be IPv4, such as 10.213.0.0/16")
    if net.prefixlen > 29:
        raise PoolError(f"tunnel pool {net} is too small: use a /29 or larger")
    if net.overlaps(CGNAT_NETWORK):
        logger.warning(
            "tunnel pool %s overlaps %s (carrier-grade NAT, Tailscale); engineers on such "
            "networks may not reach their tunnel",
            net,
            CGNAT_NETWORK,
        )
    return net


def hub_address(network: IPv4Network) -> IPv4Address:
    """The hub's own tunnel address: the pool's first host address."""
    return network.network_address + 1


def as_address(value: IPv4Address | str) -> IPv4Address:
    addr = ip_address(value) if isinstance(value, str) else value
    if not isinstance(addr, IPv4Address):
        raise AddressNotAssignableError(f"{value!r} is not an IPv4 address")
    return addr


def check_assignable(
    network: IPv4Network, address: IPv4Address | str, in_use: Collection[IPv4Address]
) -> IPv4Address:
    """Return `address` if it may be given to a new peer as its /32, else raise why not."""
    addr = as_address(address)
    if addr not in network:
        raise AddressNotAssignableError(f"{addr} is not in the tunnel pool {network}")
    if addr in (network.network_address, network.broadcast_address):
        raise AddressNotAssignableError(f"{addr} is the network or broadcast address of {network}")
    if addr == hub_address(network):
        raise AddressNotAssignableError(f"{addr} is the hub's own address")
    if addr in in_use:
        raise AddressNotAssignableError(f"{addr} is already assigned to another peer")
    return addr


def choose_address(
    network: IPv4Network,
    in_use: Collection[IPv4Address],
    released: Mapping[IPv4Address, float],
    now: float,
    quarantine: float = DEFAULT_QUARANTINE,
) -> IPv4Address:
    """Pick the address for a new peer. Pure: no I/O, no clock, no state.

    Addresses never released come first (lowest first), so the pool is walked through before any
    address comes back; then addresses whose quarantine is over, longest-released first. An address
    released less than `quarantine` seconds before `now` is never chosen.
    """
    hub = hub_address(network)
    for host in network.hosts():
        if host != hub and host not in in_use and host not in released:
            return host
    cutoff = now - quarantine
    candidates = [
        (when, addr)
        for addr, when in released.items()
        if when <= cutoff and addr not in in_use and addr in network and addr != hub
    ]
    if candidates:
        return min(candidates)[1]
    waiting = [when for addr, when in released.items() if addr not in in_use and addr in network]
    size = network.num_addresses - 3
    detail = f"{len(in_use)} of {size} addresses of {network} are in use"
    if waiting:
        free_in = max(0.0, min(waiting) + quarantine - now)
        detail += (
            f", {len(waiting)} more are in quarantine after release; the next one is free "
            f"in {free_in:.0f}s"
        )
    raise PoolExhaustedError(
        f"tunnel address pool exhausted: {detail}. Close tunnels that are no longer needed or "
        "configure a larger pool."
    )

"""WireGuard helpers only the tests and benchmarks use: an in-memory address pool, waiting for a
tunnel's handshake on the hub, the engineer's config as the hub sees it, and reading wg-quick files.

The gateway keeps its pool in the database (`gateway.tunnels.addresses`), watches handshakes in
its hub runner, and the engineer's config is made by `edgefleet tunnel open`; these are the same
rules for code that drives a `TunnelHub` directly.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from wireguard_tools import WireguardConfig

from gateway.tunnels.wireguard.hub import TunnelHub, TunnelHubError, TunnelStats, UnknownTunnelError
from gateway.tunnels.wireguard.pool import (
    DEFAULT_NETWORK,
    DEFAULT_QUARANTINE,
    AddressNotAssignableError,
    PoolError,
    as_address,
    check_assignable,
    choose_address,
    hub_address,
    parse_network,
)
from provisioning.wireguard.config import WgConfigError, host_network, render_wg_quick
from provisioning.wireguard.keys import public_key_from_private

#: Keepalive written into engineers' configs (their laptops sit behind NAT too).
ENGINEER_KEEPALIVE = 25


class HandshakeTimeoutError(TunnelHubError):
    """The device did not complete a WireGuard handshake in time (offline, blocked, wrong key)."""


class AddressPool:
    """In-memory allocator over `choose_address`, for one process (thread-safe).

    Seed it from stored state with `in_use`/`released` to continue where a previous process left.
    """

    def __init__(
        self,
        network: str | IPv4Network = DEFAULT_NETWORK,
        *,
        quarantine: float = DEFAULT_QUARANTINE,
        in_use: Iterable[IPv4Address] = (),
        released: Mapping[IPv4Address, float] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if quarantine < 0:
            raise PoolError("quarantine must be zero or more seconds")
        self.network = parse_network(network)
        self.quarantine = quarantine
        self._clock = clock
        self._lock = threading.Lock()
        self._in_use: set[IPv4Address] = set()
        self._released: dict[IPv4Address, float] = dict(released or {})
        for addr in in_use:
            self.reserve(addr)

    @property
    def hub_address(self) -> IPv4Address:
        """The hub's own address (never handed out)."""
        return hub_address(self.network)

    @property
    def in_use(self) -> frozenset[IPv4Address]:
        """Addresses currently assigned."""
        with self._lock:
            return frozenset(self._in_use)

    @property
    def released(self) -> dict[IPv4Address, float]:
        """Recently released addresses and when (for persisting)."""
        with self._lock:
            return dict(self._released)

    def allocate(self) -> IPv4Address:
        """A fresh /32 for a new peer; raises PoolExhaustedError when none is free."""
        with self._lock:
            addr = choose_address(
                self.network, self._in_use, self._released, self._clock(), self.quarantine
            )
            self._in_use.add(addr)
            self._released.pop(addr, None)
            return addr

    def reserve(self, address: IPv4Address | str) -> IPv4Address:
        """Mark a known address (from stored state) as in use, checking that it may be."""
        with self._lock:
            addr = check_assignable(self.network, address, self._in_use)
            self._in_use.add(addr)
            self._released.pop(addr, None)
            return addr

    def release(self, address: IPv4Address | str) -> None:
        """Give an address back; it stays in quarantine before it is handed out again."""
        addr = as_address(address)
        with self._lock:
            if addr not in self._in_use:
                raise AddressNotAssignableError(f"{addr} is not assigned, so it cannot be released")
            self._in_use.remove(addr)
            self._released[addr] = self._clock()
            cutoff = self._clock() - self.quarantine
            for old in [a for a, when in self._released.items() if when <= cutoff]:
                del self._released[old]


def tunnel_stats(hub: TunnelHub, tunnel_id: str) -> TunnelStats:
    """Both peers of one open tunnel (liveness = `device_handshake_age()`)."""
    tunnel = hub.tunnels.get(tunnel_id)
    if tunnel is None:
        raise UnknownTunnelError(f"no open tunnel {tunnel_id!r} on hub {hub.interface}")
    peers = hub.peer_stats()
    return TunnelStats(
        tunnel.tunnel_id, peers.get(tunnel.device_public_key), peers.get(tunnel.engineer_public_key)
    )


def wait_for_handshake(
    hub: TunnelHub, tunnel_id: str, timeout: float, *, interval: float = 0.05
) -> TunnelStats:
    """Wait until the device of `tunnel_id` has completed a handshake with the hub.

    Keys are fresh per session, so any handshake with this peer belongs to this tunnel. Raises
    HandshakeTimeoutError after `timeout` seconds; the tunnel stays open (the caller decides
    to remove it).
    """
    deadline = time.monotonic() + timeout
    while True:
        stats = tunnel_stats(hub, tunnel_id)
        if stats.device is not None and stats.device.last_handshake is not None:
            return stats
        if time.monotonic() >= deadline:
            raise HandshakeTimeoutError(
                f"tunnel {tunnel_id}: the device made no WireGuard handshake with the hub "
                f"within {timeout:.0f}s; it may be offline or unable to reach the hub's "
                f"UDP port {hub.listen_port}"
            )
        time.sleep(interval)


def engineer_config(
    hub: TunnelHub, tunnel_id: str, engineer_private_key: str, endpoint: str
) -> str:
    """The engineer's wg-quick config: their /32, the hub as only peer, the device reachable.

    `endpoint` is how the engineer reaches the hub (public HOST:PORT). Write it with
    `provisioning.files.write_private` (mode 0600).
    """
    tunnel = hub.tunnels.get(tunnel_id)
    if tunnel is None:
        raise UnknownTunnelError(f"no open tunnel {tunnel_id!r} on hub {hub.interface}")
    if public_key_from_private(engineer_private_key) != tunnel.engineer_public_key:
        raise ValueError(
            f"tunnel {tunnel_id}: the engineer private key does not match the engineer "
            "public key the tunnel was opened with"
        )
    return render_wg_quick(
        private_key=engineer_private_key,
        address=IPv4Interface(f"{tunnel.engineer_ip}/32"),
        peer_public_key=hub.public_key,
        endpoint=endpoint,
        allowed_ips=[host_network(tunnel.device_ip)],
        mtu=hub.mtu,
        persistent_keepalive=ENGINEER_KEEPALIVE,
    )


def parse_wg_quick(text: str) -> WireguardConfig:
    """Read a wg-quick config; a malformed one raises WgConfigError saying what is wrong."""
    try:
        config = WireguardConfig.from_wgconfig(io.StringIO(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise WgConfigError(f"not a valid WireGuard config: {exc}") from exc
    if config.private_key is None:
        raise WgConfigError("WireGuard config has no PrivateKey in its [Interface] section")
    return config


def wg_quick_addresses(config: WireguardConfig) -> list[IPv4Interface]:
    """The IPv4 `Address =` entries of a wg-quick config."""
    return [a for a in config.addresses if isinstance(a, IPv4Interface)]


def wg_quick_allowed_ips(config: WireguardConfig) -> list[IPv4Network]:
    """All IPv4 AllowedIPs of all peers of a wg-quick config, as networks."""
    nets: list[IPv4Network] = []
    for peer in config.peers.values():
        nets += [a.network for a in peer.allowed_ips if isinstance(a, IPv4Interface)]
    return nets


def strip_wg_quick(config: WireguardConfig) -> str:
    """The config in `wg setconf` form (wg-quick's Address/MTU/... lines removed)."""
    return config.to_wgconfig(wgquick_format=False)

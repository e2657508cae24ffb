"""The WireGuard hub on the gateway host: one interface, two peers per support tunnel.

Each tunnel is a device peer (AllowedIPs = the device's /32) and an engineer peer (AllowedIPs =
the engineer's /32). The hub's kernel routes between them (forwarding is switched on for the hub
interface only), and `HubFirewall` lets the engineer reach that device on the tunnel's ports and
nothing else.

Changes are incremental: adding a tunnel is one `wg set` with two peers plus one nftables
transaction, closing removes exactly those. There is no periodic full `syncconf`, which would
disturb live sessions. A restarted gateway calls `up()` then `restore(tunnels_from_db)`:
wireguard-go runs in its own session and survives the gateway process, so `up()` adopts it and
`restore` only fixes differences, leaving working tunnels untouched. The hub's private key lives
0600 in the state directory, so the hub keeps its identity (and engineers' configs stay valid)
across restarts.

Add the device's peer here *before* the device dials: a handshake to an unknown peer is retried only
after about 5 s (see `edge_agent.tunnel.endpoint.TunnelEndpoint.prepare`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from pathlib import Path

from gateway.tunnels.wireguard.firewall import HubFirewall, TunnelRule, check_tunnel_id
from gateway.tunnels.wireguard.pool import (
    DEFAULT_NETWORK,
    check_assignable,
    hub_address,
    parse_network,
)
from provisioning.wireguard.config import DEFAULT_MTU, host_network
from provisioning.wireguard.keys import (
    load_or_create_private_key,
    normalize_key,
    public_key_from_private,
)
from provisioning.wireguard.tools import (
    PeerStats,
    PeerUpdate,
    WireGuardError,
    configure_link,
    set_sysctl,
    wg_set_peers,
    wg_set_private_key,
    wg_show_dump,
)
from provisioning.wireguard.wireguard_go import WireGuardGo, uapi_alive

logger = logging.getLogger(__name__)

DEFAULT_INTERFACE = "efhub0"
DEFAULT_LISTEN_PORT = 51820


def _wait_until_gone(interface: str, timeout: float = 2.0) -> bool:
    """Whether no (other) wireguard-go serves `interface`; a just-killed one gets a moment."""
    deadline = time.monotonic() + timeout
    while uapi_alive(interface):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class TunnelHubError(WireGuardError):
    """The hub cannot do what was asked in its current state."""


class TunnelConflictError(ValueError):
    """A tunnel would reuse an id, key or address another tunnel holds."""


class UnknownTunnelError(KeyError):
    """No open tunnel has this id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown tunnel"


def _check_ports(ports: Iterable[int], tunnel_id: str) -> frozenset[int]:
    result = frozenset(ports)
    if not result:
        raise ValueError(f"tunnel {tunnel_id}: give at least one port to allow")
    bad = sorted(
        p for p in result if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536
    )
    if bad:
        raise ValueError(f"tunnel {tunnel_id}: ports must be integers 1..65535, got {bad}")
    return result


@dataclass(frozen=True)
class HubTunnel:
    """One support tunnel as the hub sees it (what the gateway keeps in its database)."""

    tunnel_id: str
    device_public_key: str
    engineer_public_key: str
    device_ip: IPv4Address
    engineer_ip: IPv4Address
    ports: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        tid = check_tunnel_id(self.tunnel_id)
        dev_key = normalize_key(self.device_public_key, f"tunnel {tid}: device public key")
        eng_key = normalize_key(self.engineer_public_key, f"tunnel {tid}: engineer public key")
        if dev_key == eng_key:
            raise TunnelConflictError(f"tunnel {tid}: device and engineer must have different keys")
        dev_ip, eng_ip = ip_address(self.device_ip), ip_address(self.engineer_ip)
        if not isinstance(dev_ip, IPv4Address) or not isinstance(eng_ip, IPv4Address):
            raise ValueError(f"tunnel {tid}: device and engineer addresses must be IPv4")
        if dev_ip == eng_ip:
            raise TunnelConflictError(f"tunnel {tid}: device and engineer need different addresses")
        object.__setattr__(self, "device_public_key", dev_key)
        object.__setattr__(self, "engineer_public_key", eng_key)
        object.__setattr__(self, "device_ip", dev_ip)
        object.__setattr__(self, "engineer_ip", eng_ip)
        object.__setattr__(self, "ports", _check_ports(self.ports, tid))

    def rule(self) -> TunnelRule:
        """The firewall's view of this tunnel."""
        return TunnelRule(self.tunnel_id, self.device_ip, self.engineer_ip, self.ports)

    def peer_updates(self) -> list[PeerUpdate]:
        """The two hub peers of this tunnel, one /32 each."""
        return [
            PeerUpdate(self.device_public_key, (host_network(self.device_ip),)),
            PeerUpdate(self.engineer_public_key, (host_network(self.engineer_ip),)),
        ]


@dataclass(frozen=True)
class TunnelStats:
    """Both peers of one tunnel as `wg show dump` reports them (None: peer not on the hub)."""

    tunnel_id: str
    device: PeerStats | None
    engineer: PeerStats | None

    @property
    def bytes_from_device(self) -> int:
        return self.device.rx_bytes if self.device else 0

    @property
    def bytes_to_device(self) -> int:
        return self.device.tx_bytes if self.device else 0

    def device_handshake_age(self, now: float | None = None) -> float | None:
        """Seconds since the device's last handshake: the device is up when this is recent."""
        return self.device.handshake_age(now) if self.device else None


@dataclass(frozen=True)
class RestoreReport:
    """What `TunnelHub.restore` found and changed."""

    kept_peers: int
    set_peers: int
    removed_peers: int
    kept_rules: tuple[str, ...]
    written_rules: tuple[str, ...]
    removed_rules: tuple[str, ...]


class TunnelHub:
    """The hub interface (wireguard-go or kernel) with its tunnels and firewall."""

    def __init__(
        self,
        state_dir: Path,
        *,
        interface: str = DEFAULT_INTERFACE,
        listen_port: int = DEFAULT_LISTEN_PORT,
        network: str | IPv4Network = DEFAULT_NETWORK,
        mtu: int = DEFAULT_MTU,
        netns: str | None = None,
    ) -> None:
        if not 0 < listen_port < 65536:
            raise ValueError(f"listen port {listen_port} is out of range 1..65535")
        self.state_dir = Path(state_dir)
        self.interface = interface
        self.listen_port = listen_port
        self.network = parse_network(network)
        self.hub_ip = hub_address(self.network)
        self.mtu = mtu
        self.netns = netns
        self.firewall = HubFirewall(interface, netns=netns)
        self._key_file = self.state_dir / f"{interface}.key"
        self._process = WireGuardGo(
            interface,
            netns=netns,
            pid_file=self.state_dir / f"{interface}.pid",
            log_file=self.state_dir / f"{interface}.log",
        )
        self._tunnels: dict[str, HubTunnel] = {}
        self._lock = threading.RLock()
        self._public_key: str | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def public_key(self) -> str:
        """The hub's public key (stable across restarts: the private key is kept on disk)."""
        if self._public_key is None:
            self._public_key = public_key_from_private(self._private_key())
        return self._public_key

    def _private_key(self) -> str:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return load_or_create_private_key(self._key_file)

    @property
    def pid(self) -> int | None:
        """Process id of the hub's wireguard-go (None when not running or kernel WireGuard)."""
        return self._process.pid

    def up(self) -> None:
        """Bring the hub interface up, or adopt the one a previous gateway process left running.

        If a fresh start fails half-way (say the UDP port is taken), what it started is stopped
        again and the error is raised.
        """
        with self._lock:
            private = self._private_key()
            started = False
            if not self._process.adopt():
                if not _wait_until_gone(self.interface):
                    raise TunnelHubError(
                        f"{self.interface} is run by a wireguard-go this gateway did not start "
                        f"(no matching pid file in {self.state_dir}); stop it or choose another "
                        "interface name"
                    )
                self._process.start()
                started = True
            try:
                self._configure(private)
            except BaseException:
                if started:
                    with contextlib.suppress(Exception):
                        self._process.stop()
                        self.firewall.delete()
                raise
            logger.info(
                "tunnel hub %s up on port %d, %s, key %s",
                self.interface,
                self.listen_port,
                self.network,
                self.public_key,
            )

    def _configure(self, private: str) -> None:
        # Filter before the interface carries anything (an adopted one keeps its table).
        self.firewall.ensure_base()
        state = wg_show_dump(self.interface, netns=self.netns)
        if state.public_key != self.public_key or state.listen_port != self.listen_port:
            wg_set_private_key(
                self.interface, private, listen_port=self.listen_port, netns=self.netns
            )
        configure_link(
            self.interface,
            address=IPv4Interface(f"{self.hub_ip}/{self.network.prefixlen}"),
            mtu=self.mtu,
            netns=self.netns,
        )
        # Forward between peers on this interface only; no ICMP redirects to peers.
        set_sysctl(f"net.ipv4.conf.{self.interface}.forwarding", "1", netns=self.netns)
        set_sysctl(f"net.ipv4.conf.{self.interface}.send_redirects", "0", netns=self.netns)

    def down(self) -> None:
        """Stop the interface, then remove the firewall table (the key file stays).

        In that order: once wireguard-go is gone no peer can send, so there is no moment with
        peers up and their filter gone.
        """
        with self._lock:
            errors: list[Exception] = []
            if self._process.pid is None:
                self._process.adopt()
            try:
                self._process.stop()
            except OSError as exc:
                errors.append(exc)
            try:
                self.firewall.delete()
            except WireGuardError as exc:
                errors.append(exc)
            self._tunnels.clear()
            if errors:
                raise TunnelHubError(f"hub {self.interface} did not go down cleanly: {errors}")
            logger.info("tunnel hub %s down", self.interface)

    # ------------------------------------------------------------------ tunnels

    @property
    def tunnels(self) -> dict[str, HubTunnel]:
        """Open tunnels by id (a copy)."""
        with self._lock:
            return dict(self._tunnels)

    def _check_free(self, tunnel: HubTunnel, others: Iterable[HubTunnel]) -> None:
        used_ips: set[IPv4Address] = set()
        used_keys = {self.public_key}
        for other in others:
            if other.tunnel_id == tunnel.tunnel_id:
                raise TunnelConflictError(f"tunnel {tunnel.tunnel_id} is already open")
            used_ips |= {other.device_ip, other.engineer_ip}
            used_keys |= {other.device_public_key, other.engineer_public_key}
        for addr in (tunnel.device_ip, tunnel.engineer_ip):
            try:
                check_assignable(self.network, addr, used_ips)
            except ValueError as exc:
                raise TunnelConflictError(f"tunnel {tunnel.tunnel_id}: {exc}") from exc
        for key in (tunnel.device_public_key, tunnel.engineer_public_key):
            if key in used_keys:
                raise TunnelConflictError(
                    f"tunnel {tunnel.tunnel_id}: public key {key} is already a peer of the hub"
                )

    def add_tunnel(self, tunnel: HubTunnel) -> None:
        """Open a tunnel on the hub: firewall rules first, then both peers in one `wg set`.

        Call this before the device dials. Raises TunnelConflictError (and changes nothing) if
        the id, an address or a key is already taken.
        """
        with self._lock:
            self._check_free(tunnel, self._tunnels.values())
            live = wg_show_dump(self.interface, netns=self.netns).peers
            live_ips = {ip for peer in live.values() for ip in peer.allowed_ips}
            for key in (tunnel.device_public_key, tunnel.engineer_public_key):
                if key in live:
                    raise TunnelConflictError(
                        f"tunnel {tunnel.tunnel_id}: public key {key} is already a peer of the hub"
                    )
            for addr in (tunnel.device_ip, tunnel.engineer_ip):
                if f"{addr}/32" in live_ips:
                    raise TunnelConflictError(
                        f"tunnel {tunnel.tunnel_id}: {addr} is already assigned to a hub peer "
                        "(restore() the hub's tunnels after a restart)"
                    )
            self.firewall.add(tunnel.rule())
            try:
                wg_set_peers(self.interface, tunnel.peer_updates(), netns=self.netns)
            except Exception:
                self.firewall.remove(tunnel.tunnel_id)
                raise
            self._tunnels[tunnel.tunnel_id] = tunnel
            logger.info(
                "tunnel %s open on hub: engineer %s -> device %s ports %s",
                tunnel.tunnel_id,
                tunnel.engineer_ip,
                tunnel.device_ip,
                sorted(tunnel.ports),
            )

    def remove_tunnel(self, tunnel_id: str) -> TunnelStats:
        """Close a tunnel on the hub: peers out first (no more packets), then its rules.

        Returns the peers' final counters (bytes moved, last handshake) for the audit log.
        """
        with self._lock:
            tunnel = self._tunnels.get(tunnel_id)
            if tunnel is None:
                raise UnknownTunnelError(f"no open tunnel {tunnel_id!r} on hub {self.interface}")
            stats = self._stats_for(tunnel, wg_show_dump(self.interface, netns=self.netns).peers)
            wg_set_peers(
                self.interface,
                [
                    PeerUpdate(tunnel.device_public_key, remove=True),
                    PeerUpdate(tunnel.engineer_public_key, remove=True),
                ],
                netns=self.netns,
            )
            self.firewall.remove(tunnel_id)
            del self._tunnels[tunnel_id]
            logger.info(
                "tunnel %s closed on hub (%d bytes from device, %d to device)",
                tunnel_id,
                stats.bytes_from_device,
                stats.bytes_to_device,
            )
            return stats

    def restore(self, tunnels: Iterable[HubTunnel]) -> RestoreReport:
        """Make the running hub match `tunnels` (the database's open tunnels) after a restart.

        Peers and rules that already match stay as they are (their sessions and conntrack state
        survive); missing ones are added, changed ones rewritten, unknown ones removed.
        """
        wanted = list(tunnels)
        with self._lock:
            checked: list[HubTunnel] = []
            for tunnel in wanted:
                self._check_free(tunnel, checked)
                checked.append(tunnel)
            live = wg_show_dump(self.interface, netns=self.netns).peers
            want_peers = {u.public_key: u for t in wanted for u in t.peer_updates()}
            stale = [PeerUpdate(key, remove=True) for key in live if key not in want_peers]
            changed = [
                update
                for key, update in want_peers.items()
                if key not in live
                or set(live[key].allowed_ips) != {str(net) for net in update.allowed_ips}
            ]
            wg_set_peers(self.interface, stale, netns=self.netns)
            fw = self.firewall.sync(t.rule() for t in wanted)
            wg_set_peers(self.interface, changed, netns=self.netns)
            self._tunnels = {t.tunnel_id: t for t in wanted}
            report = RestoreReport(
                kept_peers=len(want_peers) - len(changed),
                set_peers=len(changed),
                removed_peers=len(stale),
                kept_rules=fw.kept,
                written_rules=fw.written,
                removed_rules=fw.removed,
            )
            logger.info("tunnel hub %s restored: %s", self.interface, report)
            return report

    # ------------------------------------------------------------------ state

    def peer_stats(self) -> dict[str, PeerStats]:
        """Every hub peer by public key: handshake time, bytes, endpoint."""
        return dict(wg_show_dump(self.interface, netns=self.netns).peers)

    @staticmethod
    def _stats_for(tunnel: HubTunnel, peers: Mapping[str, PeerStats]) -> TunnelStats:
        return TunnelStats(
            tunnel.tunnel_id,
            peers.get(tunnel.device_public_key),
            peers.get(tunnel.engineer_public_key),
        )

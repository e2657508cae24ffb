"""wg-quick configs: what `edgefleet tunnel open` writes for the engineer (mode 0600)."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from wireguard_tools import WireguardConfig, WireguardKey, WireguardPeer

from provisioning.wireguard.keys import normalize_key

#: Safe for LTE and PPPoE paths, where 1420 (WireGuard's default) fragments.
DEFAULT_MTU = 1280
#: Keeps a NAT mapping alive on the way out of a customer's network.
DEFAULT_KEEPALIVE = 15


class WgConfigError(ValueError):
    """A WireGuard config file could not be read."""


def render_wg_quick(
    *,
    private_key: str,
    address: IPv4Interface,
    peer_public_key: str,
    endpoint: str,
    allowed_ips: Sequence[IPv4Network],
    mtu: int = DEFAULT_MTU,
    persistent_keepalive: int | None = DEFAULT_KEEPALIVE,
) -> str:
    """A wg-quick config for a one-peer client (the support engineer's file)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise WgConfigError(f"endpoint {endpoint!r} must be HOST:PORT")
    config = WireguardConfig(
        private_key=WireguardKey(normalize_key(private_key, "private key")),
        addresses=[address],
        mtu=mtu,
    )
    config.add_peer(
        WireguardPeer(
            public_key=WireguardKey(normalize_key(peer_public_key)),
            endpoint_host=host.strip("[]"),
            endpoint_port=int(port),
            persistent_keepalive=persistent_keepalive,
            allowed_ips=[IPv4Interface(str(net)) for net in allowed_ips],
        )
    )
    return config.to_wgconfig(wgquick_format=True)


def host_network(address: IPv4Address) -> IPv4Network:
    """`address` as a /32 network (one /32 per peer)."""
    return IPv4Network(f"{address}/32")

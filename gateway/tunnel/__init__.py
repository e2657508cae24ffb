"""Support tunnels, hub side: address pool, WireGuard hub interface, nftables rules.

The MQTT/HTTP flow (signed `tunnel.open`, CLI, audit, persistence) builds on these pieces.
"""

from gateway.tunnel.firewall import HubFirewall, TunnelRule
from gateway.tunnel.hub import (
    HandshakeTimeoutError,
    HubTunnel,
    RestoreReport,
    TunnelConflictError,
    TunnelHub,
    TunnelHubError,
    TunnelStats,
    UnknownTunnelError,
)
from gateway.tunnel.pool import (
    DEFAULT_NETWORK,
    DEFAULT_QUARANTINE,
    AddressNotAssignableError,
    AddressPool,
    PoolError,
    PoolExhaustedError,
    choose_address,
)

__all__ = [
    "DEFAULT_NETWORK",
    "DEFAULT_QUARANTINE",
    "AddressNotAssignableError",
    "AddressPool",
    "HandshakeTimeoutError",
    "HubFirewall",
    "HubTunnel",
    "PoolError",
    "PoolExhaustedError",
    "RestoreReport",
    "TunnelConflictError",
    "TunnelHub",
    "TunnelHubError",
    "TunnelRule",
    "TunnelStats",
    "UnknownTunnelError",
    "choose_address",
]

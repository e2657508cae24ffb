"""Support tunnels, device side: the owner's policy, the WireGuard endpoint, its local filter.

Imports only `provisioning`, never `gateway`.
"""

from edge_agent.tunnel.endpoint import (
    InvalidTunnelSession,
    TunnelEndpoint,
    TunnelEndpointError,
    TunnelSession,
)
from edge_agent.tunnel.firewall import AgentFirewall
from edge_agent.tunnel.policy import TunnelPolicy, TunnelRefused

__all__ = [
    "AgentFirewall",
    "InvalidTunnelSession",
    "TunnelEndpoint",
    "TunnelEndpointError",
    "TunnelPolicy",
    "TunnelRefused",
    "TunnelSession",
]

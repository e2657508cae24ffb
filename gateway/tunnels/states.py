"""A tunnel's life, stored in `tunnels.state` (the names are `provisioning.states.TunnelState`).

    requested --(device answers with its key)--> prepared --(hub adds both peers,
    tunnel.connect sent)--> dialing --(first handshake)--> open
    any of those --(close, expiry, failure)--> closing (peers on the hub) --> closed|expired|failed

A tunnel that never reached the hub goes straight to its final state.
"""

from __future__ import annotations

from enum import StrEnum

from provisioning.states import TunnelState

#: Not yet open: the open deadline applies.
OPENING = (TunnelState.requested, TunnelState.prepared, TunnelState.dialing)
#: Alive: counts as the device's one tunnel, can be closed.
LIVE = (*OPENING, TunnelState.open)
#: The hub holds (or may hold) peers for these.
ON_HUB = (TunnelState.dialing, TunnelState.open, TunnelState.closing)


class TunnelFailure(StrEnum):
    """Why an open failed (stored in `tunnels.failure`, the API error's reason)."""

    device_offline = "device_offline"
    device_refused = "device_refused"
    device_failed = "device_failed"
    no_handshake = "no_handshake"
    hub_failed = "hub_failed"
    broker_unavailable = "broker_unavailable"


#: The audit action written when a tunnel reaches each final state.
AUDIT_ACTION = {
    TunnelState.closed: "tunnel.close",
    TunnelState.expired: "tunnel.expire",
    TunnelState.failed: "tunnel.fail",
}

"""A tunnel's life, as strings stored in `tunnels.state`.

    requested --(device answers with its key)--> prepared --(hub adds both peers,
    tunnel.connect sent)--> dialing --(first handshake)--> open
    any of those --(close, expiry, failure)--> closing (peers on the hub) --> closed|expired|failed

A tunnel that never reached the hub goes straight to its final state.
"""

from __future__ import annotations

REQUESTED = "requested"
PREPARED = "prepared"
DIALING = "dialing"
OPEN = "open"
CLOSING = "closing"
CLOSED = "closed"
EXPIRED = "expired"
FAILED = "failed"

#: Not yet open: the open deadline applies.
OPENING = (REQUESTED, PREPARED, DIALING)
#: Alive: counts as the device's one tunnel, can be closed.
LIVE = (*OPENING, OPEN)
#: The hub holds (or may hold) peers for these.
ON_HUB = (DIALING, OPEN, CLOSING)
FINAL = (CLOSED, EXPIRED, FAILED)

#: Why an open failed (stored in `tunnels.failure`, mapped to an HTTP status by the API).
DEVICE_OFFLINE = "device_offline"
DEVICE_REFUSED = "device_refused"
DEVICE_FAILED = "device_failed"
NO_HANDSHAKE = "no_handshake"
HUB_FAILED = "hub_failed"
BROKER_UNAVAILABLE = "broker_unavailable"

#: The audit action written when a tunnel reaches each final state.
AUDIT_ACTION = {CLOSED: "tunnel.close", EXPIRED: "tunnel.expire", FAILED: "tunnel.fail"}

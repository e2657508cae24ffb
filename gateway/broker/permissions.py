"""What a device may do on the broker: the one rule every broker adapter renders.

A device publishes only its own ``{prefix}/{device}/telemetry|status|reply`` and subscribes to
(and receives) only its own ``{prefix}/{device}/cmd`` (the topics come from
`provisioning.wire.Topics`). Mosquitto gets it as dynamic-security ACLs (`gateway.broker.dynsec`),
EMQX as the answers of the gateway's HTTP hooks (`gateway.broker.emqx`).
"""

from __future__ import annotations

from typing import Literal

from provisioning.wire import Topics

Action = Literal["publish", "subscribe"]


def device_topics(prefix: str, device_id: str) -> dict[Action, tuple[str, ...]]:
    topics = Topics(prefix)
    return {"publish": topics.device_publishes(device_id), "subscribe": (topics.cmd(device_id),)}


def device_may(prefix: str, device_id: str, action: str, topic: str) -> bool:
    """Exact topic match only: wildcards in a device's subscription are refused."""
    allowed = device_topics(prefix, device_id)
    return action in allowed and topic in allowed[action]

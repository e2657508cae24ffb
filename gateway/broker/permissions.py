"""What a device may do on the broker: the one rule every broker adapter renders.

A device publishes only its own ``{prefix}/{device}/telemetry|status|reply`` and subscribes to
(and receives) only its own ``{prefix}/{device}/cmd``. Mosquitto gets it as dynamic-security ACLs
(`gateway.broker.dynsec`), EMQX as the answers of the gateway's HTTP hooks (`gateway.broker.emqx`).
"""

from __future__ import annotations

from typing import Literal

Action = Literal["publish", "subscribe"]
DEVICE_TOPICS_OUT = ("telemetry", "status", "reply")
DEVICE_TOPIC_IN = "cmd"


def device_topics(prefix: str, device_id: str) -> dict[Action, tuple[str, ...]]:
    base = f"{prefix}/{device_id}"
    return {
        "publish": tuple(f"{base}/{leaf}" for leaf in DEVICE_TOPICS_OUT),
        "subscribe": (f"{base}/{DEVICE_TOPIC_IN}",),
    }


def device_may(prefix: str, device_id: str, action: str, topic: str) -> bool:
    """Exact topic match only: wildcards in a device's subscription are refused."""
    allowed = device_topics(prefix, device_id)
    return action in allowed and topic in allowed[action]

"""The machine owner's last word on support tunnels.

The gateway's signature proves a `tunnel.open` comes from the manufacturer; it does not make the
request acceptable to the customer who owns the machine. The agent's local config says whether
remote support is allowed at all, which ports may ever be opened and for how long. A request that
asks for more is refused as a whole (never trimmed silently) and nothing is brought up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provisioning.tunnel_command import TunnelOpenArgs

DEFAULT_MAX_TTL = 12 * 3600.0
#: Allowed difference between gateway and device clocks when checking the requested lifetime.
CLOCK_LEEWAY = 60.0


class TunnelRefused(Exception):
    """The owner's policy does not allow this tunnel; `reason` says why, for the reply."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _ports(values: Iterable[Any], what: str) -> frozenset[int]:
    result: set[int] = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ValueError(f"{what}: {value!r} is not a port (integers 1..65535)")
        result.add(value)
    return frozenset(result)


@dataclass(frozen=True)
class TunnelPolicy:
    """Whether support tunnels are allowed, on which ports at most, for how long at most.

    The default allows nothing: an owner opts in.
    """

    allowed: bool = False
    allowed_ports: frozenset[int] = field(default_factory=frozenset)
    max_ttl: float = DEFAULT_MAX_TTL

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "allowed_ports", _ports(self.allowed_ports, "tunnel policy allowed_ports")
        )
        if not self.max_ttl > 0:
            raise ValueError(f"tunnel policy max_ttl must be positive seconds, got {self.max_ttl}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TunnelPolicy:
        """Read the agent config's `tunnel` section: {allowed, allowed_ports, max_ttl}."""
        unknown = set(data) - {"allowed", "allowed_ports", "max_ttl"}
        if unknown:
            raise ValueError(
                f"unknown tunnel policy settings {sorted(unknown)}; "
                "use allowed, allowed_ports, max_ttl"
            )
        allowed = data.get("allowed", False)
        if not isinstance(allowed, bool):
            raise ValueError("tunnel policy 'allowed' must be true or false")
        ports = data.get("allowed_ports", [])
        if isinstance(ports, str | bytes) or not isinstance(ports, Iterable):
            raise ValueError("tunnel policy 'allowed_ports' must be a list of port numbers")
        max_ttl = data.get("max_ttl", DEFAULT_MAX_TTL)
        if isinstance(max_ttl, bool) or not isinstance(max_ttl, int | float):
            raise ValueError("tunnel policy 'max_ttl' must be a number of seconds")
        return cls(allowed=allowed, allowed_ports=frozenset(ports), max_ttl=float(max_ttl))

    def check(self, session: TunnelOpenArgs, now: float | None = None) -> None:
        """Raise TunnelRefused unless this machine's owner allows `session` as asked."""
        current = time.time() if now is None else now
        if not self.allowed:
            raise TunnelRefused(
                "remote support tunnels are disabled on this machine by its owner "
                "(agent config: tunnel.allowed = false)"
            )
        extra = sorted(session.ports - self.allowed_ports)
        if extra:
            raise TunnelRefused(
                f"ports {extra} are not allowed for support tunnels on this machine; "
                f"the owner allows {sorted(self.allowed_ports) or 'none'}"
            )
        ttl = session.expires_at - current
        if ttl <= 0:
            raise TunnelRefused(f"tunnel {session.tunnel_id} has already expired")
        if ttl > self.max_ttl + CLOCK_LEEWAY:
            raise TunnelRefused(
                f"tunnel lifetime {ttl:.0f}s exceeds the {self.max_ttl:.0f}s this machine's owner "
                "allows; ask for a shorter TTL"
            )

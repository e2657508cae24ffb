"""The device's own filter on its tunnel interface: least privilege enforced a second time.

The hub already limits what an engineer reaches, but the machine should not have to trust the
manufacturer's host for that. This table (one per tunnel interface, `inet edgefleet_agent_<if>`)
lets in only new connections from the engineer's address to the device's tunnel address on the
allowed ports, plus their replies; the device opens nothing towards the tunnel, and nothing is
forwarded through it into the plant network. It only matches the tunnel interface by name, so it can
be installed before the interface exists and leaves the rest of the machine alone. Removing it is
deleting the table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Any

from provisioning.wg import (
    WgCommandError,
    check_interface_name,
    nft_apply,
    nft_delete_table,
    nft_list_table,
)

logger = logging.getLogger(__name__)

FAMILY = "inet"
TABLE_PREFIX = "edgefleet_agent_"


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _ip(field_name: str) -> dict[str, Any]:
    return {"payload": {"protocol": "ip", "field": field_name}}


class AgentFirewall:
    """nftables filter for one tunnel interface on the device (in `netns` when given)."""

    def __init__(self, interface: str, *, netns: str | None = None) -> None:
        self.interface = check_interface_name(interface)
        self.netns = netns
        self.table = TABLE_PREFIX + self.interface

    def _obj(self, **extra: Any) -> dict[str, Any]:
        return {"family": FAMILY, "table": self.table, **extra}

    def _chain(self, name: str, hook: str) -> dict[str, Any]:
        return {
            "add": {
                "chain": self._obj(name=name, type="filter", hook=hook, prio=0, policy="accept")
            }
        }

    def _rule(self, chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
        return {"add": {"rule": self._obj(chain=chain, expr=list(expr))}}

    def apply(
        self, *, engineer_ip: IPv4Address, device_ip: IPv4Address, ports: Iterable[int]
    ) -> None:
        """Install (or replace, atomically) the filter for one session."""
        port_set = sorted(set(ports))
        if not port_set:
            raise ValueError("a tunnel filter needs at least one port")
        iif = _match({"meta": {"key": "iifname"}}, self.interface)
        oif = _match({"meta": {"key": "oifname"}}, self.interface)
        established = _match({"ct": {"key": "state"}}, ["established", "related"], op="in")
        drop = ({"counter": None}, {"drop": None})
        commands: list[dict[str, Any]] = []
        if nft_list_table(FAMILY, self.table, netns=self.netns) is not None:
            commands.append({"delete": {"table": {"family": FAMILY, "name": self.table}}})
        commands += [
            {"add": {"table": {"family": FAMILY, "name": self.table}}},
            self._chain("tunnel_in", "input"),
            self._chain("tunnel_out", "output"),
            self._chain("tunnel_forward", "forward"),
            self._rule("tunnel_in", iif, established, {"accept": None}),
            self._rule(
                "tunnel_in",
                iif,
                _match(_ip("saddr"), str(engineer_ip)),
                _match(_ip("daddr"), str(device_ip)),
                _match({"meta": {"key": "l4proto"}}, {"set": ["tcp", "udp"]}),
                _match({"payload": {"protocol": "th", "field": "dport"}}, {"set": port_set}),
                {"accept": None},
            ),
            self._rule("tunnel_in", iif, *drop),
            self._rule("tunnel_out", oif, established, {"accept": None}),
            self._rule("tunnel_out", oif, *drop),
            self._rule("tunnel_forward", iif, *drop),
            self._rule("tunnel_forward", oif, *drop),
        ]
        nft_apply(commands, netns=self.netns)
        logger.info(
            "agent firewall on %s: only %s -> %s ports %s",
            self.interface,
            engineer_ip,
            device_ip,
            port_set,
        )

    def installed(self) -> bool:
        """Whether this interface's table exists (on a machine without nft: it cannot)."""
        try:
            return nft_list_table(FAMILY, self.table, netns=self.netns) is not None
        except WgCommandError as exc:
            if exc.tool_missing:
                return False
            raise

    def remove(self) -> bool:
        """Delete the table; False if it was not there (or nft is not even installed)."""
        try:
            return nft_delete_table(FAMILY, self.table, netns=self.netns)
        except WgCommandError as exc:
            if exc.tool_missing:
                return False
            raise

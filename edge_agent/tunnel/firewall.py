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

from provisioning import nftables as nft
from provisioning.wireguard.tools import WgCommandError, check_interface_name

logger = logging.getLogger(__name__)

TABLE_PREFIX = "edgefleet_agent_"


class AgentFirewall:
    """nftables filter for one tunnel interface on the device (in `netns` when given)."""

    def __init__(self, interface: str, *, netns: str | None = None) -> None:
        self.interface = check_interface_name(interface)
        self.netns = netns
        self._table = nft.Table(TABLE_PREFIX + self.interface, netns=netns)
        self.table = self._table.name

    def apply(
        self, *, engineer_ip: IPv4Address, device_ip: IPv4Address, ports: Iterable[int]
    ) -> None:
        """Install (or replace, atomically) the filter for one session."""
        port_set = sorted(set(ports))
        if not port_set:
            raise ValueError("a tunnel filter needs at least one port")
        table = self._table
        iif = nft.match(nft.meta("iifname"), self.interface)
        oif = nft.match(nft.meta("oifname"), self.interface)
        established = nft.ct_state("established", "related")
        commands: list[dict[str, Any]] = []
        if table.listing() is not None:
            commands.append(table.delete())
        commands += [
            table.add(),
            table.base_chain("tunnel_in", "input"),
            table.base_chain("tunnel_out", "output"),
            table.base_chain("tunnel_forward", "forward"),
            table.rule("tunnel_in", [iif, established, nft.ACCEPT]),
            table.rule(
                "tunnel_in",
                [
                    iif,
                    nft.match(nft.ip_field("saddr"), str(engineer_ip)),
                    nft.match(nft.ip_field("daddr"), str(device_ip)),
                    *nft.to_ports(port_set),
                    nft.ACCEPT,
                ],
            ),
            table.rule("tunnel_in", [iif, *nft.COUNT_AND_DROP]),
            table.rule("tunnel_out", [oif, established, nft.ACCEPT]),
            table.rule("tunnel_out", [oif, *nft.COUNT_AND_DROP]),
            table.rule("tunnel_forward", [iif, *nft.COUNT_AND_DROP]),
            table.rule("tunnel_forward", [oif, *nft.COUNT_AND_DROP]),
        ]
        table.apply(commands)
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
            return self._table.listing() is not None
        except WgCommandError as exc:
            if exc.tool_missing:
                return False
            raise

    def remove(self) -> bool:
        """Delete the table; False if it was not there (or nft is not even installed)."""
        try:
            return self._table.remove()
        except WgCommandError as exc:
            if exc.tool_missing:
                return False
            raise

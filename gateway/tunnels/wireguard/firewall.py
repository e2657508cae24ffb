"""nftables on the hub: an engineer reaches one device on the listed ports and nothing else.

Everything lives in one table of our own per hub interface (`inet edgefleet_hub_<interface>`), so
we never touch anyone else's rules (nor another hub's), and only traffic on the hub's WireGuard
interface is judged:

* `hub_forward` (hook forward): a packet that came in on the hub interface jumps, by its source
  address, through the `tunnel_dispatch` verdict map into its tunnel's chain; whatever that chain
  does not accept is dropped. Traffic from other interfaces into the tunnel network is dropped too.
* `hub_input` (hook input): nothing from a tunnel peer reaches the hub itself.
* `tun_<id>` (one chain per tunnel): engineer -> device on the tunnel's TCP/UDP ports; device ->
  engineer only as replies (conntrack established/related). The first rule's comment carries a
  fingerprint of the tunnel's spec so a restarted gateway can tell an intact chain from a stale one.

Closing a tunnel deletes its map elements and its chain in one transaction, which removes exactly
its rules and nothing else. Rules are sent as libnftables JSON through stdin (`nft -j -f -`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from provisioning import nftables as nft
from provisioning.tunnel_command import TUNNEL_ID_PATTERN
from provisioning.wireguard.tools import check_interface_name

logger = logging.getLogger(__name__)

TABLE_PREFIX = "edgefleet_hub_"
DISPATCH_MAP = "tunnel_dispatch"
FORWARD_CHAIN = "hub_forward"
INPUT_CHAIN = "hub_input"
CHAIN_PREFIX = "tun_"
_COMMENT_RE = re.compile(r"^edgefleet tunnel (?P<id>\S+) fp=(?P<fp>[0-9a-f]+)$")
TUNNEL_ID_RE = re.compile(TUNNEL_ID_PATTERN)


def check_tunnel_id(tunnel_id: str) -> str:
    """Tunnel ids name nftables chains: 1-64 letters, digits, '_' or '-' (a UUID fits)."""
    if not isinstance(tunnel_id, str) or not TUNNEL_ID_RE.fullmatch(tunnel_id):
        raise ValueError(
            f"tunnel id {tunnel_id!r} is not valid: use 1 to 64 letters, digits, '_' or '-'"
        )
    return tunnel_id


def chain_name(tunnel_id: str) -> str:
    """The nftables chain that holds one tunnel's rules."""
    return CHAIN_PREFIX + check_tunnel_id(tunnel_id)


@dataclass(frozen=True)
class TunnelRule:
    """What the hub's firewall needs to know about one tunnel."""

    tunnel_id: str
    device_ip: IPv4Address
    engineer_ip: IPv4Address
    ports: frozenset[int] = field(default_factory=frozenset)

    def fingerprint(self) -> str:
        """A short digest of the spec: equal fingerprints mean equal rules."""
        text = f"{self.device_ip}|{self.engineer_ip}|{','.join(map(str, sorted(self.ports)))}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FirewallSync:
    """What `HubFirewall.sync` changed."""

    kept: tuple[str, ...]
    written: tuple[str, ...]
    removed: tuple[str, ...]


class HubFirewall:
    """Our nftables table on the hub (in `netns` when given)."""

    def __init__(self, interface: str, *, netns: str | None = None) -> None:
        self.interface = check_interface_name(interface)
        self.netns = netns
        self._table = nft.Table(TABLE_PREFIX + self.interface, netns=netns)
        self.table = self._table.name

    def _base_commands(self) -> list[dict[str, Any]]:
        table = self._table
        iif = nft.match(nft.meta("iifname"), self.interface)
        oif = nft.match(nft.meta("oifname"), self.interface)
        return [
            table.add(),
            {"add": {"map": table.obj(name=DISPATCH_MAP, type="ipv4_addr", map="verdict")}},
            table.base_chain(FORWARD_CHAIN, "forward"),
            table.base_chain(INPUT_CHAIN, "input"),
            table.rule(
                FORWARD_CHAIN,
                [iif, {"vmap": {"key": nft.ip_field("saddr"), "data": f"@{DISPATCH_MAP}"}}],
                "edgefleet: to the sender's tunnel",
            ),
            table.rule(
                FORWARD_CHAIN, [iif, *nft.COUNT_AND_DROP], "edgefleet: not allowed by any tunnel"
            ),
            table.rule(
                FORWARD_CHAIN, [oif, *nft.COUNT_AND_DROP], "edgefleet: only engineers reach devices"
            ),
            table.rule(
                INPUT_CHAIN,
                [iif, *nft.COUNT_AND_DROP],
                "edgefleet: tunnel peers never reach the hub",
            ),
        ]

    def ensure_base(self) -> None:
        """Create our table with its fixed chains, unless it is already there and whole.

        A table that exists but lacks a base chain (someone edited it) is rebuilt; the caller then
        restores the tunnels.
        """
        items = self._table.listing()
        if items is not None:
            chains = {i["chain"]["name"] for i in items if "chain" in i}
            maps = {i["map"]["name"] for i in items if "map" in i}
            rules = [i["rule"] for i in items if "rule" in i]
            base_rules = sum(1 for r in rules if r["chain"] in (FORWARD_CHAIN, INPUT_CHAIN))
            if {FORWARD_CHAIN, INPUT_CHAIN} <= chains and DISPATCH_MAP in maps and base_rules == 4:
                return
            logger.warning("nftables table %s is incomplete; rebuilding it", self.table)
            self._table.apply([self._table.delete()])
        self._table.apply(self._base_commands())

    def delete(self) -> bool:
        """Remove our whole table (hub going down)."""
        return self._table.remove()

    def _tunnel_commands(self, rule: TunnelRule) -> list[dict[str, Any]]:
        chain = chain_name(rule.tunnel_id)
        eng, dev = str(rule.engineer_ip), str(rule.device_ip)
        jump = {"jump": {"target": chain}}
        table = self._table
        from_engineer = [
            nft.match(nft.ip_field("saddr"), eng),
            nft.match(nft.ip_field("daddr"), dev),
        ]
        from_device = [nft.match(nft.ip_field("saddr"), dev), nft.match(nft.ip_field("daddr"), eng)]
        return [
            {"add": {"chain": table.obj(name=chain)}},
            table.rule(
                chain,
                [*from_engineer, *nft.to_ports(rule.ports), {"counter": None}, nft.ACCEPT],
                f"edgefleet tunnel {rule.tunnel_id} fp={rule.fingerprint()}",
            ),
            table.rule(chain, [*from_device, nft.ct_state("established", "related"), nft.ACCEPT]),
            table.rule(chain, [*from_engineer, nft.ct_state("related"), nft.ACCEPT]),
            {"add": {"element": table.obj(name=DISPATCH_MAP, elem=[[eng, jump], [dev, jump]])}},
        ]

    def _removal_commands(self, tunnel_id: str, elements: dict[str, str]) -> list[dict[str, Any]]:
        chain = chain_name(tunnel_id)
        keys = [addr for addr, target in elements.items() if target == chain]
        commands: list[dict[str, Any]] = []
        if keys:
            commands.append({"delete": {"element": self._table.obj(name=DISPATCH_MAP, elem=keys)}})
        commands.append({"flush": {"chain": self._table.obj(name=chain)}})
        commands.append({"delete": {"chain": self._table.obj(name=chain)}})
        return commands

    def _state(self) -> tuple[dict[str, str | None], dict[str, str]]:
        """(tunnel id -> fingerprint, dispatch address -> chain) as installed now."""
        items = self._table.listing() or []
        tunnels: dict[str, str | None] = {}
        for item in items:
            chain = item.get("chain")
            if chain and chain["name"].startswith(CHAIN_PREFIX):
                tunnels.setdefault(chain["name"][len(CHAIN_PREFIX) :], None)
        for item in items:
            rule = item.get("rule")
            if rule and rule["chain"].startswith(CHAIN_PREFIX):
                found = _COMMENT_RE.match(rule.get("comment", ""))
                tid = rule["chain"][len(CHAIN_PREFIX) :]
                if found and found["id"] == tid:
                    tunnels[tid] = found["fp"]
        elements: dict[str, str] = {}
        for item in items:
            nft_map = item.get("map")
            if nft_map and nft_map["name"] == DISPATCH_MAP:
                for key, verdict in nft_map.get("elem", []):
                    target = verdict.get("jump", {}).get("target") or verdict.get("goto", {}).get(
                        "target"
                    )
                    if isinstance(key, str) and target:
                        elements[key] = target
        return tunnels, elements

    def installed(self) -> dict[str, str | None]:
        """Tunnel id -> fingerprint of every tunnel chain in the table."""
        return self._state()[0]

    def add(self, rule: TunnelRule) -> None:
        """Install one tunnel's chain and dispatch entries (atomic)."""
        if not rule.ports:
            raise ValueError(f"tunnel {rule.tunnel_id} has no ports to allow")
        self._table.apply(self._tunnel_commands(rule))
        logger.info(
            "hub firewall: tunnel %s allows %s -> %s ports %s",
            rule.tunnel_id,
            rule.engineer_ip,
            rule.device_ip,
            sorted(rule.ports),
        )

    def remove(self, tunnel_id: str) -> bool:
        """Remove exactly one tunnel's rules (atomic); False if it had none."""
        tunnels, elements = self._state()
        if tunnel_id not in tunnels:
            return False
        self._table.apply(self._removal_commands(tunnel_id, elements))
        logger.info("hub firewall: tunnel %s removed", tunnel_id)
        return True

    def sync(self, rules: Iterable[TunnelRule]) -> FirewallSync:
        """Make the table hold exactly `rules`, in one transaction, touching only what differs.

        Chains whose fingerprint and dispatch entries already match are left alone, so packets of
        working tunnels never see a gap.
        """
        wanted = {rule.tunnel_id: rule for rule in rules}
        tunnels, elements = self._state()
        commands: list[dict[str, Any]] = []
        kept: list[str] = []
        written: list[str] = []
        removed: list[str] = []
        for tid in tunnels:
            if tid not in wanted:
                commands += self._removal_commands(tid, elements)
                removed.append(tid)
        for tid, rule in wanted.items():
            chain = chain_name(tid)
            ok_elements = (
                elements.get(str(rule.engineer_ip)) == chain
                and elements.get(str(rule.device_ip)) == chain
                and sum(1 for target in elements.values() if target == chain) == 2
            )
            if tunnels.get(tid) == rule.fingerprint() and ok_elements:
                kept.append(tid)
                continue
            if tid in tunnels:
                commands += self._removal_commands(tid, elements)
            commands += self._tunnel_commands(rule)
            written.append(tid)
        self._table.apply(commands)
        return FirewallSync(tuple(kept), tuple(written), tuple(removed))

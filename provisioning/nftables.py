"""nftables for both firewalls (the hub's and the device's): one table of our own per tunnel
interface, built as libnftables JSON and applied as one atomic transaction (`nft -j -f -`).

JSON rather than the text syntax: names and addresses are data, so nothing can be injected and
nothing needs quoting. `Table` makes the commands of one table; the expression helpers make the
matches both firewalls use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from provisioning.wireguard.tools import WgCommandError, run_command

Command = dict[str, Any]
Expr = dict[str, Any]

FAMILY = "inet"


def match(left: Any, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def ip_field(name: str) -> Expr:
    """``ip saddr`` / ``ip daddr``."""
    return {"payload": {"protocol": "ip", "field": name}}


def meta(key: str) -> Expr:
    """``meta iifname`` and the like."""
    return {"meta": {"key": key}}


def ct_state(*states: str) -> Expr:
    """``ct state { ... }``."""
    return match({"ct": {"key": "state"}}, list(states), op="in")


def to_ports(ports: Iterable[int]) -> list[Expr]:
    """TCP or UDP to one of `ports`."""
    return [
        match(meta("l4proto"), {"set": ["tcp", "udp"]}),
        match({"payload": {"protocol": "th", "field": "dport"}}, {"set": sorted(set(ports))}),
    ]


COUNT_AND_DROP: tuple[Expr, Expr] = ({"counter": None}, {"drop": None})
ACCEPT: Expr = {"accept": None}


class Table:
    """One nftables table of ours (``inet <name>``), in `netns` when given."""

    def __init__(self, name: str, *, netns: str | None = None) -> None:
        self.name = name
        self.netns = netns

    def obj(self, **extra: Any) -> dict[str, Any]:
        """An object of this table (chain, rule, map, element) with `extra` fields."""
        return {"family": FAMILY, "table": self.name, **extra}

    def add(self) -> Command:
        return {"add": {"table": {"family": FAMILY, "name": self.name}}}

    def delete(self) -> Command:
        return {"delete": {"table": {"family": FAMILY, "name": self.name}}}

    def base_chain(self, name: str, hook: str) -> Command:
        """A filter chain on `hook` whose policy accepts (our rules drop what they must)."""
        chain = self.obj(name=name, type="filter", hook=hook, prio=0, policy="accept")
        return {"add": {"chain": chain}}

    def rule(self, chain: str, expr: Sequence[Expr], comment: str | None = None) -> Command:
        rule = self.obj(chain=chain, expr=list(expr))
        if comment is not None:
            rule["comment"] = comment
        return {"add": {"rule": rule}}

    def listing(self) -> list[dict[str, Any]] | None:
        """The table's objects, or None if it does not exist."""
        return nft_list_table(FAMILY, self.name, netns=self.netns)

    def apply(self, commands: Sequence[Mapping[str, Any]]) -> None:
        nft_apply(commands, netns=self.netns)

    def remove(self) -> bool:
        """Delete the whole table; False if it was not there."""
        return nft_delete_table(FAMILY, self.name, netns=self.netns)


def nft_apply(commands: Sequence[Mapping[str, Any]], *, netns: str | None = None) -> None:
    """Apply nftables commands (libnftables JSON objects) as one atomic transaction via stdin."""
    if not commands:
        return
    payload = json.dumps({"nftables": list(commands)})
    run_command(["nft", "-j", "-f", "-"], netns=netns, input_text=payload)


def nft_list_table(
    family: str, table: str, *, netns: str | None = None
) -> list[dict[str, Any]] | None:
    """The objects of one nftables table as JSON dicts, or None if the table does not exist."""
    try:
        out = run_command(["nft", "-j", "list", "table", family, table], netns=netns)
    except WgCommandError as exc:
        # nft's own answer for a missing table; not a missing nft binary (exit 127 here, or
        # `ip netns exec`'s 'exec of "nft" failed: No such file or directory').
        if exc.stderr.startswith("Error: No such file or directory"):
            return None
        raise
    items: list[dict[str, Any]] = json.loads(out).get("nftables", [])
    return items


def nft_delete_table(family: str, table: str, *, netns: str | None = None) -> bool:
    """Delete one of our tables (rules, chains, maps go with it); False if it was not there."""
    if nft_list_table(family, table, netns=netns) is None:
        return False
    nft_apply([{"delete": {"table": {"family": family, "name": table}}}], netns=netns)
    return True

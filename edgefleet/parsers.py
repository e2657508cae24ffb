"""How commands are declared: groups of commands, commands, the options several of them share,
and options that load only when used.

`group` and `command` are argparse's own calls with what every edgefleet command does the same
way (an ACTION for a group, the function that runs a command). `json_option()` and
`connection_options()` go into ``parents=[...]`` (`operator()` is both): every command that
prints JSON gets the same ``--json``, every operator command the same ``--gateway``/``--token``
(from ``EDGEFLEET_GATEWAY``/``EDGEFLEET_TOKEN``, else what `edgefleet login` kept).
`load_options_when_used` lets a command's options come from code that should load only when that
command runs (the gateway's settings need pydantic-settings: ~0.3 s that `edgefleet devices
list` need not pay).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers = argparse._SubParsersAction


def group(sub: Subparsers, name: str, *, dest: str = "action", **kwargs: Any) -> Subparsers:
    """A command with sub-commands (``edgefleet NAME ACTION``); its sub-commands' parent."""
    parser = sub.add_parser(name, **kwargs)
    return parser.add_subparsers(dest=dest, required=True, metavar="ACTION")


def command(
    sub: Subparsers, run: Callable[[argparse.Namespace], None], name: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """A command that calls `run(args)`; add its arguments to the parser it returns."""
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(func=run)
    return parser


def json_option() -> argparse.ArgumentParser:
    """``--json``: one JSON document instead of a table."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print one JSON document")
    return parent


def connection_options() -> argparse.ArgumentParser:
    """``--gateway`` and ``--token`` (default: ``EDGEFLEET_GATEWAY``, ``EDGEFLEET_TOKEN``)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("gateway connection")
    group.add_argument(
        "--gateway",
        default=os.environ.get("EDGEFLEET_GATEWAY", ""),
        help="gateway URL (default: $EDGEFLEET_GATEWAY, else the one you logged in to)",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("EDGEFLEET_TOKEN", ""),
        help="API token (default: $EDGEFLEET_TOKEN, else the one `edgefleet login` keeps)",
    )
    return parent


def operator() -> list[argparse.ArgumentParser]:
    """The parents of an operator command that prints a table or JSON: --json, the gateway."""
    return [json_option(), connection_options()]


class _OptionsWhenUsed(argparse.ArgumentParser):
    """A parser whose options are added the first time it parses or shows its help."""

    _add_options: Callable[[argparse.ArgumentParser], None] | None = None

    def _load(self) -> None:
        add, self._add_options = self._add_options, None
        if add is not None:
            add(self)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._load()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._load()
        return super().format_usage()

    def format_help(self) -> str:
        self._load()
        return super().format_help()


def load_options_when_used(
    parser: argparse.ArgumentParser, add: Callable[[argparse.ArgumentParser], Any]
) -> None:
    """Call `add(parser)` to add `parser`'s options only once it is used (parse, help, usage)."""
    parser.__class__ = _OptionsWhenUsed
    parser._add_options = add  # type: ignore[attr-defined]

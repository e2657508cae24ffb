"""Commands run on the gateway host: `gateway run` and `admin ...`.

Only argparse is imported at module level: the gateway's code (FastAPI, SQLModel, uvicorn) loads
when one of these commands runs, so `edgefleet agent ...` works where only the agent is installed.
"""

from __future__ import annotations

import argparse
import logging
import types
import typing
from typing import Any

from edgefleet.output import CommandError, make_settings, parse_duration, printed_as_json, span
from edgefleet.parsers import Subparsers, command, group, load_options_when_used


def register(sub: Subparsers) -> None:
    gsub = group(
        sub,
        "gateway",
        help="run the manufacturer-side gateway",
        description="The gateway keeps the device registry, runs (or connects to) the MQTT broker "
        "and serves the HTTP API.",
    )
    run = command(
        gsub,
        _run,
        "run",
        help="start the gateway in the foreground",
        description="Start the gateway. On its embedded defaults it keeps SQLite and a Mosquitto "
        "broker it starts and supervises itself (TLS with its own CA, dynamic security) in "
        "--data-dir. Every flag also reads an EDGEFLEET_* environment variable.",
        epilog="examples:\n"
        "  edgefleet gateway run --data-dir /var/lib/edgefleet\n"
        "  edgefleet gateway run --db postgresql://edgefleet@db/edgefleet "
        "--mqtt-url mqtts://gw:secret@broker:8883 --mqtt-ca-file ca.pem",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load_options_when_used(run, _run_options)

    asub = group(
        sub,
        "admin",
        help="local administration on the gateway host (talks to the database directly)",
    )
    create = command(
        asub,
        _create_token,
        "create-token",
        help="make the bootstrap token that creates the first admin user",
        description="Create a bootstrap token directly in the database. It does one thing: "
        "create the first admin user (edgefleet users create EMAIL --role admin). Creating that "
        "user spends it; while an enabled admin user exists no bootstrap token works (make a "
        "new one here only if every admin is gone). People then log in (edgefleet login) and "
        "make API tokens of their own (edgefleet api-tokens create).",
        epilog="example:\n"
        "  export EDGEFLEET_TOKEN=$(edgefleet admin create-token)\n"
        "  edgefleet users create ops@example.com --role admin --password-stdin < pw.txt\n"
        "  unset EDGEFLEET_TOKEN; edgefleet login --email ops@example.com --password-stdin",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load_options_when_used(create, _create_token_options)


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except CommandError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _run_options(parser: argparse.ArgumentParser) -> None:
    setting_flags(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])


def _create_token_options(parser: argparse.ArgumentParser) -> None:
    setting_flags(parser, only=DATA_SETTINGS)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    # Scripts written before people had accounts pass --role admin: still accepted, and
    # any other role is refused with the reason, not an argparse error about a flag.
    parser.add_argument("--role", help=argparse.SUPPRESS)


#: The settings `admin create-token` takes: where the gateway's data is.
DATA_SETTINGS = ("data_dir", "db_url")


def flagged_settings(only: tuple[str, ...] | None = None) -> list[tuple[str, Any, Any]]:
    """(name, field, Flag) of each `GatewaySettings` field marked as an option, in field order."""
    from gateway.settings import Flag, GatewaySettings

    found = []
    for name, field in GatewaySettings.model_fields.items():
        flag = next((m for m in field.metadata if isinstance(m, Flag)), None)
        if flag is not None and (only is None or name in only):
            found.append((name, field, flag))
    return found


def setting_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add an option per setting marked as one (see `gateway.settings.Flag`). Unset options
    stay None, so the environment and the defaults still apply."""
    groups: dict[str, Any] = {}
    for name, field, flag in flagged_settings(only):
        container: Any = parser
        if flag.group is not None:
            if flag.group not in groups:
                groups[flag.group] = parser.add_argument_group(flag.group)
            container = groups[flag.group]
        if flag.exclusive is not None:
            key = f"exclusive: {flag.exclusive}"
            if key not in groups:
                groups[key] = container.add_mutually_exclusive_group()
            container = groups[key]
        options: dict[str, Any] = {"dest": name}
        kind = _value_type(field.annotation)
        if kind is bool:
            options.update(action="store_true", default=None)
        elif isinstance(kind, tuple):
            options["choices"] = list(kind)
        elif flag.duration:
            options["type"] = _duration
        elif kind is not str:
            options["type"] = kind
        if flag.metavar is not None:
            options["metavar"] = flag.metavar
        default = field.default
        shown = span(default) if flag.duration else str(default)
        options["help"] = (field.description or "").replace("{default}", shown)
        container.add_argument(flag.name or "--" + name.replace("_", "-"), **options)


def _value_type(annotation: Any) -> Any:
    """The type of a setting's value for argparse: bool, int, Path... or a tuple of choices."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(args)
    if args and typing.get_origin(annotation) in (types.UnionType, typing.Union):
        return _value_type(args[0])
    return annotation


def _settings(args: argparse.Namespace, only: tuple[str, ...] | None = None) -> Any:
    from gateway.settings import GatewaySettings

    names = [name for name, _field, _flag in flagged_settings(only)]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return make_settings(GatewaySettings, overrides)


def _run(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = _settings(args)
    from gateway.errors import StartupError
    from gateway.server import run_gateway

    try:
        run_gateway(settings)
    except StartupError as exc:
        raise CommandError(str(exc), 2) from exc


def _create_token(args: argparse.Namespace) -> None:
    if args.role not in (None, "admin"):
        raise CommandError(
            f"a bootstrap token only creates the first admin user; there are no {args.role} "
            "bootstrap tokens (people get their own: edgefleet users create, edgefleet login)",
            2,
        )
    settings = _settings(args, DATA_SETTINGS)
    from gateway.accounts.api_tokens import create_bootstrap
    from gateway.accounts.users import admin_exists
    from gateway.data_dir import secure_data_dir
    from gateway.db import make_engine, migrate, session_scope
    from gateway.errors import DatabaseUnavailable

    if settings.is_sqlite:  # it may create the database (and its -wal/-shm) in the data dir
        secure_data_dir(settings.data_dir)
    engine = make_engine(settings.database_url)
    try:
        migrate(engine)
        with session_scope(engine) as session:
            if admin_exists(session):
                raise CommandError(
                    "an admin user exists, so a bootstrap token would not work: log in as an "
                    "admin (edgefleet login) or disable every admin first",
                    2,
                )
            issued = create_bootstrap(session)
    except DatabaseUnavailable as exc:
        raise CommandError(str(exc), 2) from exc
    finally:
        engine.dispose()
    if not printed_as_json(args, {"id": issued.row.id, "kind": "bootstrap", "token": issued.token}):
        print(issued.token)

"""Commands run on the gateway host: `gateway run` and `admin ...`.

Only argparse is imported at module level: the gateway's code (FastAPI, SQLModel, uvicorn) loads
when one of these commands runs, so `edgefleet agent ...` works where only the agent is installed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from edgefleet.output import CommandError, parse_duration, print_json


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gateway = sub.add_parser(
        "gateway",
        help="run the manufacturer-side gateway",
        description="The gateway keeps the device registry, runs (or connects to) the MQTT broker "
        "and serves the HTTP API.",
    )
    gsub = gateway.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = gsub.add_parser(
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
    _data_options(run)
    run.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="where the HTTP API listens (default 0.0.0.0:8080; $EDGEFLEET_HTTP)",
    )
    broker = run.add_mutually_exclusive_group()
    broker.add_argument(
        "--mqtt-port",
        type=int,
        metavar="PORT",
        help="port of the embedded Mosquitto, TLS (default 8883)",
    )
    broker.add_argument(
        "--mqtt-url",
        metavar="URL",
        help="use an external broker instead (mqtts://user:pass@host:port)",
    )
    run.add_argument(
        "--broker-kind",
        choices=["mosquitto", "emqx"],
        help="how machine credentials reach the broker: mosquitto (dynamic security, default) "
        "or emqx (EMQX asks this gateway's HTTP hooks; needs --mqtt-url)",
    )
    run.add_argument(
        "--mqtt-ca-file",
        type=Path,
        metavar="PEM",
        help="CA of the external broker, handed to machines at enrollment",
    )
    run.add_argument(
        "--public-host",
        metavar="HOST",
        help="name machines use to reach this host (put in the broker certificate)",
    )
    run.add_argument("--topic-prefix", metavar="PREFIX", help="MQTT topic prefix (default fleet)")
    run.add_argument(
        "--signing-key",
        type=Path,
        metavar="PEM",
        dest="signing_key_file",
        help="the command-signing key; replicas of a cluster share one",
    )
    run.add_argument(
        "--replica-name",
        metavar="NAME",
        help="this replica's name for its MQTT sessions (default: from host and data dir)",
    )
    run.add_argument(
        "--telemetry-retention",
        metavar="AGE",
        help="delete samples older than this, e.g. 30d or 12h (default 30d)",
    )
    tunnels = run.add_argument_group("support tunnels (the hub runs on one replica only)")
    tunnels.add_argument(
        "--tunnel-hub",
        action="store_true",
        default=None,
        help="run the WireGuard tunnel hub on this replica (needs root or CAP_NET_ADMIN)",
    )
    tunnels.add_argument(
        "--tunnel-endpoint",
        metavar="HOST:PORT",
        help="public UDP address machines and engineers dial to reach the hub",
    )
    tunnels.add_argument(
        "--tunnel-listen-port", type=int, metavar="PORT", help="hub UDP port (default 51820)"
    )
    tunnels.add_argument(
        "--tunnel-interface", metavar="NAME", help="hub interface name (default efhub0)"
    )
    tunnels.add_argument(
        "--tunnel-network", metavar="CIDR", help="tunnel address pool (default 10.213.0.0/16)"
    )
    tunnels.add_argument("--tunnel-mtu", type=int, metavar="MTU", help="default 1280")
    tunnels.add_argument(
        "--tunnel-max-ttl",
        type=_duration,
        metavar="DURATION",
        help="longest tunnel an operator may open, e.g. 4h (default 12h)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    run.set_defaults(func=_run)

    admin = sub.add_parser(
        "admin",
        help="local administration on the gateway host (talks to the database directly)",
    )
    asub = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = asub.add_parser(
        "create-token",
        help="make an operator API token (the first one comes from here)",
        description="Create an operator API token directly in the database. Roles: viewer (read), "
        "operator (also tokens, flows, tunnels), admin (also revoke machines, manage API tokens).",
        epilog="example: export EDGEFLEET_TOKEN=$(edgefleet admin create-token --role admin)",
    )
    create.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    create.add_argument("--name", default="admin", help="who or what the token is for")
    _data_options(create)
    create.add_argument("--json", action="store_true", help="print one JSON document")
    create.set_defaults(func=_create_token)


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except CommandError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="gateway data directory (default ./edgefleet-data)",
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        dest="db_url",
        help="database URL, e.g. postgresql://user@host/db (default: SQLite in the data directory)",
    )


def _settings(args: argparse.Namespace, names: tuple[str, ...]) -> Any:
    from pydantic import ValidationError

    from gateway.settings import GatewaySettings

    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        return GatewaySettings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CommandError(f"bad setting: {problems}", 2) from exc


def _run(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = _settings(
        args,
        (
            "data_dir",
            "http",
            "db_url",
            "mqtt_port",
            "mqtt_url",
            "mqtt_ca_file",
            "public_host",
            "broker_kind",
            "topic_prefix",
            "signing_key_file",
            "replica_name",
            "telemetry_retention",
            "tunnel_hub",
            "tunnel_endpoint",
            "tunnel_listen_port",
            "tunnel_interface",
            "tunnel_network",
            "tunnel_mtu",
            "tunnel_max_ttl",
        ),
    )
    from gateway.errors import StartupError
    from gateway.server import run_gateway

    try:
        run_gateway(settings)
    except StartupError as exc:
        raise CommandError(str(exc), 2) from exc


def _create_token(args: argparse.Namespace) -> None:
    settings = _settings(args, ("data_dir", "db_url"))
    from gateway.db import make_engine, migrate, session_scope
    from gateway.errors import DatabaseUnavailable
    from gateway.registry.models import Role
    from gateway.registry.tokens import create_api_token

    engine = make_engine(settings.database_url)
    try:
        migrate(engine)
        with session_scope(engine) as session:
            issued, row = create_api_token(
                session, name=args.name, role=Role(args.role), actor="local-admin"
            )
    except DatabaseUnavailable as exc:
        raise CommandError(str(exc), 2) from exc
    finally:
        engine.dispose()
    if args.json:
        print_json({"id": row.id, "name": row.name, "role": str(row.role), "token": issued.token})
    else:
        print(issued.token)

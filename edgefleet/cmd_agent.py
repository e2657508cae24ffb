"""Commands run on a machine in the field: `agent enroll`, `agent run`.

Imports only the agent's code (paho-mqtt, httpx, cryptography): no FastAPI, SQLModel or uvicorn.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from typing import Any

from edgefleet.output import CommandError, make_settings, parse_duration, print_json
from edgefleet.parsers import Subparsers, command, group


def register(sub: Subparsers) -> None:
    asub = group(
        sub,
        "agent",
        help="the edge agent that runs on each machine",
        description="The edge agent runs beside Node-RED on a machine: it holds the machine's "
        "key, reports its status, applies flow pushes and opens support tunnels.",
    )
    enroll = command(
        asub,
        _enroll,
        "enroll",
        help="register this machine with a gateway",
        description="Generate this machine's key pair (EC P-256; the private key stays here, "
        "mode 0600), enroll with a provisioning token and keep what the gateway answers: the "
        "device id, the broker credential, the gateway's public key and CA (pinned from now on).",
        epilog="example: edgefleet agent enroll --gateway https://gw.example.com --token efp_... "
        "--name press-07",
    )
    enroll.add_argument("--gateway", required=True, metavar="URL", help="the gateway's URL")
    enroll.add_argument(
        "--token", required=True, help="a provisioning token (edgefleet token create)"
    )
    enroll.add_argument("--name", help="a name for this machine (default: its device id)")
    enroll.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="CA to trust for an https gateway with a private certificate",
    )
    enroll.add_argument(
        "--force",
        action="store_true",
        help="enroll again even if enrolled (new key, new device id)",
    )
    _state_dir(enroll)
    enroll.add_argument("--json", action="store_true", help="print one JSON document")

    run = command(
        asub,
        _run,
        "run",
        help="run the agent in the foreground",
        description="Connect to the broker with this machine's credential, publish its status "
        "and run the gateway's signed commands. Reconnects with backoff on its own.",
    )
    _state_dir(run)
    run.add_argument(
        "--node-red", metavar="URL", help="Node-RED's Admin API (default http://127.0.0.1:1880)"
    )
    tunnel = run.add_argument_group(
        "support tunnels (the machine owner's policy; off unless --allow-tunnels)"
    )
    tunnel.add_argument(
        "--allow-tunnels",
        action="store_true",
        default=None,
        dest="tunnel_allowed",
        help="allow remote support tunnels ($EDGEFLEET_AGENT_TUNNEL_ALLOWED)",
    )
    tunnel.add_argument(
        "--tunnel-port",
        type=int,
        action="append",
        metavar="PORT",
        dest="tunnel_allowed_ports",
        help="a port a support tunnel may open (repeat; or "
        "$EDGEFLEET_AGENT_TUNNEL_ALLOWED_PORTS=1880,22)",
    )
    tunnel.add_argument(
        "--tunnel-max-ttl",
        metavar="DURATION",
        help="longest support tunnel, e.g. 2h (default 12h)",
    )
    tunnel.add_argument(
        "--tunnel-interface",
        metavar="NAME",
        help="WireGuard interface name for the tunnel (default eftun0)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where the key and identity live (default /var/lib/edgefleet-agent; "
        "$EDGEFLEET_AGENT_STATE_DIR)",
    )


def _settings(args: argparse.Namespace) -> Any:
    from edge_agent.settings import AgentSettings

    overrides: dict[str, Any] = {}
    if args.state_dir is not None:
        overrides["state_dir"] = args.state_dir
    if getattr(args, "node_red", None):
        overrides["node_red"] = args.node_red
    for name in ("tunnel_allowed", "tunnel_allowed_ports", "tunnel_interface"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "tunnel_max_ttl", None):
        overrides["tunnel_max_ttl"] = parse_duration(args.tunnel_max_ttl)
    return make_settings(AgentSettings, overrides)


def _enroll(args: argparse.Namespace) -> None:
    from edge_agent.enroll import AlreadyEnrolled, EnrollmentError, enroll
    from edge_agent.state import AgentState

    settings = _settings(args)
    try:
        result = enroll(
            args.gateway,
            args.token,
            AgentState(settings.state_dir),
            name=args.name,
            force=args.force,
            ca_file=args.ca_file,
        )
    except AlreadyEnrolled as exc:
        raise CommandError(str(exc), 3) from exc
    except EnrollmentError as exc:
        raise CommandError(str(exc)) from exc
    except PermissionError as exc:
        raise CommandError(f"cannot write the state directory: {exc} (try --state-dir)") from exc
    if args.json:
        print_json(
            {
                "device_id": result.device_id,
                "name": result.name,
                "tags": result.tags,
                "state_dir": str(settings.state_dir),
                "claim_code": result.claim_code,
            }
        )
    else:
        print(f"enrolled as {result.device_id} ({result.name}); state in {settings.state_dir}")
        if result.claim_code:
            print(
                f"claim code: {result.claim_code} (for the label; kept in "
                f"{AgentState(settings.state_dir).claim_code_path}); the customer claims the "
                "machine with: edgefleet devices claim CODE"
            )
        print(f"start it with: edgefleet agent run --state-dir {settings.state_dir}")


def _run(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from edge_agent.assembly import build_agent
    from edge_agent.state import NotEnrolled

    try:
        agent = build_agent(_settings(args))
    except NotEnrolled as exc:
        raise CommandError(str(exc), 2) from exc
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    agent.run()

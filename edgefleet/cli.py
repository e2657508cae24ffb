"""`edgefleet`: one command line for the gateway, the agent and the operators.

Each side's code loads only when one of its commands runs, so `edgefleet agent ...` works on a
machine where only the agent extra is installed.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from edgefleet import (
    cmd_accounts,
    cmd_agent,
    cmd_deployments,
    cmd_flows,
    cmd_gateway,
    cmd_operator,
    cmd_telemetry,
    cmd_tunnel,
)
from edgefleet.output import CommandError, TerminalSafe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet",
        description="Remote services for a fleet of machines running Node-RED: provision a new "
        "machine, push flows to the fleet, open a support tunnel.",
        epilog="first steps:\n"
        "  edgefleet gateway run --data-dir ./gw                 # on the gateway host\n"
        "  export EDGEFLEET_GATEWAY=http://gateway-host:8080\n"
        "  export EDGEFLEET_TOKEN=$(edgefleet admin create-token --data-dir ./gw)  # bootstrap\n"
        "  edgefleet users create me@example.com --role admin --password-stdin < pw\n"
        "  unset EDGEFLEET_TOKEN; edgefleet login --email me@example.com\n"
        "  edgefleet token create --tag site=plant-3 --ttl 1h   # a provisioning token\n"
        "  edgefleet agent enroll --gateway URL --token TOKEN  # on the machine\n"
        "  edgefleet agent run                                  # on the machine\n"
        "  edgefleet devices list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd_gateway.register(sub)
    cmd_agent.register(sub)
    cmd_operator.register(sub)
    cmd_accounts.register(sub)
    cmd_tunnel.register(sub)
    cmd_flows.register(sub)
    cmd_deployments.register(sub)
    cmd_telemetry.register(sub)
    return parser


# Which optional install each command's code needs (see pyproject.toml).
_EXTRA_OF = {"gateway": "gateway", "admin": "gateway", "agent": "agent"}
# Commands that run a long-lived side (their output is their log) print as they are; every other
# command shows what the gateway said, which includes what machines reported: escaped.
_RAW_OUTPUT = frozenset({"gateway", "agent"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    finally:
        # The command is done and has closed what it opened. Spare the interpreter's last
        # garbage collections on the way out: they walk every object FastAPI, SQLAlchemy and
        # pydantic made (~0.4 s for `gateway run`, ~0.15 s for `admin create-token`).
        gc.freeze()


def _run(args: argparse.Namespace) -> int:
    if args.command in _RAW_OUTPUT:
        return _run_command(args)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = TerminalSafe(stdout)
    sys.stderr = TerminalSafe(stderr)
    try:
        return _run_command(args)
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _run_command(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except CommandError as exc:
        print(f"edgefleet: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF.get(args.command, "gateway")
        print(
            f"edgefleet: error: `edgefleet {args.command}` needs the {extra!r} extra, and "
            f"{exc.name!r} is not installed here: pip install 'edgefleet[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgefleet ... | head`
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

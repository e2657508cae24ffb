"""Operator commands that follow flow pushes: `deployments list|show|cancel`, and the live view.

`follow` is the live view `flows push` and `deployments show --follow` share: per-state counts
and the failing devices with their error, redrawn in place on a terminal, one snapshot per change
otherwise. Only argparse, the standard library and httpx are imported.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import IO, Any

from edgefleet.client import GatewayClient
from edgefleet.cmd_operator import client_of
from edgefleet.output import (
    CommandError,
    ago,
    print_table,
    printed_as_json,
    short_digest,
    write_control,
)
from edgefleet.parsers import Subparsers, command, group, operator
from provisioning.states import DEPLOY_FAILURES, DeploymentState, DeviceDeployState

SHOWN_FAILURES = 10
POLL_SECONDS = 0.5


def register(sub: Subparsers) -> None:
    dsub = group(
        sub,
        "deployments",
        help="flow deployments: their progress, and every device's state",
        description="A deployment sends one release to a set of devices in waves. Device states: "
        + ", ".join(DeviceDeployState)
        + ".",
    )
    command(
        dsub,
        _deployments_list,
        "list",
        help="recent deployments with their progress",
        parents=operator(),
    )
    show = command(
        dsub,
        _deployments_show,
        "show",
        help="one deployment and every device's state",
        parents=operator(),
    )
    show.add_argument("deployment_id", metavar="ID")
    show.add_argument(
        "--follow", action="store_true", help="follow it live until it ends (Ctrl-C detaches)"
    )
    cancel = command(
        dsub,
        _deployments_cancel,
        "cancel",
        help="stop a deployment: no more waves, devices that have not started are cancelled",
        parents=operator(),
    )
    cancel.add_argument("deployment_id", metavar="ID")


def exit_for(final: dict[str, Any] | None) -> None:
    if final is None or final["state"] == DeploymentState.succeeded:
        return
    raise CommandError(
        f"deployment {final['id']} {final['state']}"
        + (f": {final['reason']}" if final.get("reason") else "")
    )


# ---- following a deployment ------------------------------------------------------------------


def _counts_text(counts: dict[str, int]) -> str:
    parts = [f"{state} {counts[state]}" for state in DeviceDeployState if counts.get(state)]
    return "  ".join(parts) or "no devices"


def render(deployment: dict[str, Any], elapsed: float) -> list[str]:
    """The lines of the live display for one snapshot of a deployment."""
    lines = [
        f"{deployment['id']}  {deployment['state']}  wave "
        f"{max(1, deployment['waves_started'])}/{deployment['wave_count']}  "
        f"{elapsed:.1f}s",
        "  " + _counts_text(deployment["counts"]),
    ]
    failing = [d for d in deployment.get("devices", []) if d["state"] in DEPLOY_FAILURES]
    if failing:
        lines.append("  failing:")
        for device in failing[:SHOWN_FAILURES]:
            error = (device.get("error") or "").replace("\n", " ")
            lines.append(f"    {device['device_id']} ({device['name']}) {device['state']}: {error}")
        if len(failing) > SHOWN_FAILURES:
            lines.append(f"    ... and {len(failing) - SHOWN_FAILURES} more")
    if deployment["state"] != DeploymentState.running and deployment.get("reason"):
        lines.append(f"  {deployment['reason']}")
    return lines


def follow(
    client: GatewayClient, deployment_id: str, stream: IO[str] | None = None
) -> dict[str, Any] | None:
    """Show a deployment live until it ends; returns its last state, or None on Ctrl-C."""
    out = stream or sys.stdout
    tty = out.isatty()
    started = time.monotonic()
    drawn = 0
    last: list[str] = []
    try:
        while True:
            deployment: dict[str, Any] = client.get(f"/deployments/{deployment_id}")
            lines = render(deployment, time.monotonic() - started)
            if tty:
                if drawn:
                    write_control(out, f"\x1b[{drawn}F\x1b[J")
                out.write("\n".join(lines) + "\n")
                drawn = len(lines)
            elif lines[1:] != last[1:] or deployment["state"] != DeploymentState.running:
                out.write("\n".join(lines) + "\n")
            last = lines
            out.flush()
            if deployment["state"] != DeploymentState.running:
                return deployment
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        out.write(
            f"\ndetached; deployment {deployment_id} goes on. Follow it with: "
            f"edgefleet deployments show {deployment_id} --follow\n"
        )
        out.flush()
        return None


# ---- deployments -----------------------------------------------------------------------------


def _deployments_list(args: argparse.Namespace) -> None:
    items = client_of(args).get("/deployments")
    if printed_as_json(args, items):
        return
    rows = [
        [
            d["id"],
            short_digest(d["release"]),
            d["target_text"],
            d["state"],
            f"{d['counts'].get('succeeded', 0)}/{d['device_count']}",
            sum(d["counts"].get(s, 0) for s in DEPLOY_FAILURES),
            ago(d["created_at"]),
        ]
        for d in items
    ]
    print_table(["ID", "RELEASE", "TARGET", "STATE", "OK", "FAILED", "CREATED"], rows)


def _deployments_show(args: argparse.Namespace) -> None:
    client = client_of(args)
    if args.follow and not args.json:
        exit_for(follow(client, args.deployment_id))
        return
    item = client.get(f"/deployments/{args.deployment_id}")
    if printed_as_json(args, item):
        return
    print(f"deployment   {item['id']} ({item['state']})")
    print(f"release      {item['release']}")
    print(f"target       {item['target_text']} ({item['device_count']} devices)")
    print(
        f"waves        {item['waves_started']}/{item['wave_count']} started "
        f"(canary {item['canary_size']}, waves of {item['wave_size']})"
    )
    print(
        f"thresholds   abort above {item['max_failures_pct']:g}% failed after "
        f"{item['min_finished']} finished; timeout {item['timeout_seconds']}s"
        + ("; force" if item["force"] else "")
    )
    print(f"created      {ago(item['created_at'])} by {item['created_by']}")
    if item["reason"]:
        print(f"reason       {item['reason']}")
    print(f"devices      {_counts_text(item['counts'])}")
    print()
    rows = [
        [
            d["device_id"],
            d["name"],
            d["wave"] + 1,
            d["state"],
            "-" if d["seconds"] is None else f"{d['seconds']:.1f}",
            (d["error"] or "-")[:100],
        ]
        for d in item["devices"]
    ]
    print_table(["DEVICE", "NAME", "WAVE", "STATE", "SECONDS", "ERROR"], rows)


def _deployments_cancel(args: argparse.Namespace) -> None:
    item = client_of(args).post(f"/deployments/{args.deployment_id}/cancel")
    if printed_as_json(args, item):
        return
    print(
        f"deployment {item['id']} is cancelled; {item['counts'].get('cancelled', 0)} device(s) "
        "will not get it, devices already applying it finish"
    )

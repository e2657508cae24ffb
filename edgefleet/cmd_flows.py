"""Operator commands that push flows: `flows release|push|list|module`, `deployments ...`.

Only argparse, the standard library and httpx are imported: these commands talk to the gateway's
HTTP API, which validates everything (a bad flows file is refused there, with the reason).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import IO, Any

from edgefleet.client import GatewayClient
from edgefleet.cmd_operator import add_connection_options, client_of
from edgefleet.output import (
    CommandError,
    ago,
    parse_duration,
    parse_tags,
    print_json,
    print_table,
)
from provisioning.states import DEPLOY_FAILURES, DeploymentState, DeviceDeployState

SHOWN_FAILURES = 10
POLL_SECONDS = 0.5


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_flows(sub)
    _register_deployments(sub)


# ---- parsers ---------------------------------------------------------------------------------


def _release_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="NAME@VERSION",
        help="a node module the flows need, pinned (repeat for several)",
    )
    parser.add_argument(
        "--module-tarball",
        action="append",
        default=[],
        type=Path,
        metavar="TGZ",
        help="add this `npm pack` tarball to the gateway's module cache and list its module",
    )
    parser.add_argument("--notes", default="", help="release notes")


def _register_flows(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    flows = sub.add_parser(
        "flows",
        help="releases of Node-RED flows, and pushing them to the fleet",
        description="A release is an immutable bundle of a Node-RED flows file and the node "
        "modules it needs, named by its sha256 digest. Push one to devices, tags or the whole "
        "fleet in waves; each machine installs missing modules from the gateway's module cache, "
        "deploys, checks Node-RED runs the flows and rolls back if not.",
        epilog="examples:\n"
        "  edgefleet flows release flows.json --module node-red-contrib-modbus@5.43.0\n"
        "  edgefleet flows push flows.json --to site=plant-3,line=A --canary 1 --wave 25%\n"
        "  edgefleet flows push 1a2b3c4d --to dev-abc,dev-def --timeout 15m",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fsub = flows.add_subparsers(dest="action", required=True, metavar="ACTION")

    release = fsub.add_parser(
        "release",
        help="store a flows file (and the modules it needs) as a release",
        description="Validates the flows file, stores it with the listed modules as an "
        "immutable release and prints its digest. Node types that neither Node-RED's core nor a "
        "listed module provide are reported: such a release rolls back on machines without them.",
    )
    release.add_argument("flows_file", type=Path, metavar="FLOWS.json")
    _release_options(release)
    _json_flag(release)
    add_connection_options(release)
    release.set_defaults(func=_flows_release)

    push = fsub.add_parser(
        "push",
        help="send a release (or a flows file) to devices in waves",
        description="Creates a deployment and follows it live (per-state counts, failing devices "
        "with their error) until it ends; Ctrl-C detaches and leaves it running. A machine that "
        "is offline gets it when it is back, unless the deployment was cancelled or timed out.",
        epilog="SELECTOR: `all`, device ids (dev-abc,dev-def) or tags (site=plant-3,line=A).\n"
        "Exit status: 0 when every device succeeded (or on detach), 1 otherwise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument(
        "release", metavar="RELEASE|FLOWS.json", help="a release digest (or prefix), or a file"
    )
    push.add_argument("--to", required=True, metavar="SELECTOR", help="which devices")
    push.add_argument("--canary", metavar="N|P%", help="first wave, alone (e.g. 1 or 5%%)")
    push.add_argument("--wave", metavar="N|P%", help="size of each later wave (default: all)")
    push.add_argument(
        "--max-failures",
        default="10%",
        metavar="P%",
        help="abort when more than this share of finished devices failed (default 10%%)",
    )
    push.add_argument(
        "--min-finished",
        type=int,
        metavar="N",
        help="finished devices needed before --max-failures applies (default: canary size, or 5)",
    )
    push.add_argument(
        "--timeout",
        default="10m",
        help="a device not done this long after its command was sent counts as failed (10m)",
    )
    push.add_argument(
        "--force", action="store_true", help="overwrite flows changed on a machine (drift)"
    )
    _release_options(push)
    _json_flag(push)
    add_connection_options(push)
    push.set_defaults(func=_flows_push)

    listing = fsub.add_parser("list", help="the releases, newest first")
    _json_flag(listing)
    add_connection_options(listing)
    listing.set_defaults(func=_flows_list)

    module = fsub.add_parser(
        "module",
        help="the gateway's node module cache (machines install modules from it)",
        description="Machines never reach a public npm registry: they install node modules from "
        "tarballs the gateway keeps. Make one with `npm pack NAME@VERSION` where a registry is "
        "reachable and add it here; it is stored once, verified by sha256.",
    )
    msub = module.add_subparsers(dest="module_action", required=True, metavar="ACTION")
    add = msub.add_parser("add", help="add an `npm pack` tarball to the cache")
    add.add_argument("tarball", type=Path, metavar="TARBALL")
    _json_flag(add)
    add_connection_options(add)
    add.set_defaults(func=_module_add)
    mlist = msub.add_parser("list", help="the cached modules and the node types they provide")
    _json_flag(mlist)
    add_connection_options(mlist)
    mlist.set_defaults(func=_module_list)


def _register_deployments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    deployments = sub.add_parser(
        "deployments",
        help="flow deployments: their progress, and every device's state",
        description="A deployment sends one release to a set of devices in waves. Device states: "
        + ", ".join(DeviceDeployState)
        + ".",
    )
    dsub = deployments.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = dsub.add_parser("list", help="recent deployments with their progress")
    _json_flag(listing)
    add_connection_options(listing)
    listing.set_defaults(func=_deployments_list)
    show = dsub.add_parser("show", help="one deployment and every device's state")
    show.add_argument("deployment_id", metavar="ID")
    show.add_argument(
        "--follow", action="store_true", help="follow it live until it ends (Ctrl-C detaches)"
    )
    _json_flag(show)
    add_connection_options(show)
    show.set_defaults(func=_deployments_show)
    cancel = dsub.add_parser(
        "cancel",
        help="stop a deployment: no more waves, devices that have not started are cancelled",
    )
    cancel.add_argument("deployment_id", metavar="ID")
    _json_flag(cancel)
    add_connection_options(cancel)
    cancel.set_defaults(func=_deployments_cancel)


# ---- releases and modules --------------------------------------------------------------------


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CommandError(f"no {what} {path}") from None
    except OSError as exc:
        raise CommandError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _add_tarball(client: GatewayClient, path: Path) -> dict[str, Any]:
    data = _read_file(path, "tarball")
    added: dict[str, Any] = client.post(
        "/flows/modules",
        content=data,
        params={"sha256": hashlib.sha256(data).hexdigest()},
        headers={"Content-Type": "application/octet-stream"},
    )
    return added


def _make_release(
    client: GatewayClient, args: argparse.Namespace, flows_file: Path
) -> dict[str, Any]:
    flows = _read_file(flows_file, "flows file")
    modules = list(args.module)
    for tarball in args.module_tarball:
        added = _add_tarball(client, tarball)
        ref = f"{added['name']}@{added['version']}"
        print(
            f"module {ref} {'added to' if added['created'] else 'already in'} the module cache",
            file=sys.stderr,
        )
        if ref not in modules:
            modules.append(ref)
    try:
        text = flows.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CommandError(
            f"the flows file is not UTF-8 text (bad byte at offset {exc.start}); export it "
            "from the Node-RED editor again"
        ) from exc
    release: dict[str, Any] = client.post(
        "/flows/releases", json={"flows_json": text, "modules": modules, "notes": args.notes}
    )
    for warning in release["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return release


def _flows_release(args: argparse.Namespace) -> None:
    release = _make_release(client_of(args), args, args.flows_file)
    if args.json:
        print_json(release)
        return
    verb = "released" if release["created"] else "already released"
    print(release["digest"])
    print(
        f"{verb}: {release['node_count']} nodes, modules: "
        f"{', '.join(release['modules']) or 'none'}",
        file=sys.stderr,
    )


def _flows_list(args: argparse.Namespace) -> None:
    items = client_of(args).get("/flows/releases")
    if args.json:
        print_json(items)
        return
    rows = [
        [
            _short(r["digest"]),
            r["node_count"],
            ", ".join(r["modules"]) or "-",
            ago(r["created_at"]),
            (r["notes"] or "-")[:40],
        ]
        for r in items
    ]
    print_table(["RELEASE", "NODES", "MODULES", "CREATED", "NOTES"], rows)


def _module_add(args: argparse.Namespace) -> None:
    added = _add_tarball(client_of(args), args.tarball)
    if args.json:
        print_json(added)
        return
    verb = "added" if added["created"] else "already cached"
    print(
        f"{added['name']}@{added['version']} {verb} (sha256 {added['sha256']}); node types: "
        f"{', '.join(added['node_types']) or 'none found'}"
    )


def _module_list(args: argparse.Namespace) -> None:
    items = client_of(args).get("/flows/modules")
    if args.json:
        print_json(items)
        return
    rows = [
        [m["name"], m["version"], m["size"], ", ".join(m["node_types"]) or "-", m["sha256"][:12]]
        for m in items
    ]
    print_table(["MODULE", "VERSION", "BYTES", "NODE TYPES", "SHA256"], rows)


# ---- pushing ---------------------------------------------------------------------------------


def parse_selector(text: str) -> dict[str, Any]:
    """`all`, `dev-a,dev-b` or `site=plant-3,line=A` -> the API's target object."""
    text = text.strip()
    if not text:
        raise CommandError("--to is empty: give all, device ids, or tags such as site=plant-3")
    if text == "all":
        return {"all": True}
    if "=" in text:
        return {"tags": parse_tags([text])}
    devices = [part.strip() for part in text.split(",") if part.strip()]
    return {"devices": devices}


def _flows_push(args: argparse.Namespace) -> None:
    client = client_of(args)
    body: dict[str, Any] = {
        "to": parse_selector(args.to),
        "max_failures": args.max_failures,
        "timeout_seconds": parse_duration(args.timeout),
        "force": args.force,
    }
    if args.canary:
        body["canary"] = args.canary
    if args.wave:
        body["wave"] = args.wave
    if args.min_finished is not None:
        body["min_finished"] = args.min_finished
    if Path(args.release).is_file():
        body["release"] = _make_release(client, args, Path(args.release))["digest"]
    elif args.release.endswith(".json"):
        raise CommandError(f"no flows file {args.release}")
    else:
        if args.module or args.module_tarball:
            raise CommandError("--module and --module-tarball go with a flows file, not a release")
        body["release"] = args.release
    deployment = client.post("/deployments", json=body)
    if args.json:
        print_json(deployment)
        return
    print(
        f"deployment {deployment['id']}: release {_short(deployment['release'])} to "
        f"{deployment['target_text']} ({deployment['device_count']} devices, "
        f"{deployment['wave_count']} wave(s))"
    )
    final = follow(client, deployment["id"])
    _exit_for(final)


def _exit_for(final: dict[str, Any] | None) -> None:
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
                    out.write(f"\x1b[{drawn}F\x1b[J")
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
    if args.json:
        print_json(items)
        return
    rows = [
        [
            d["id"],
            _short(d["release"]),
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
        _exit_for(follow(client, args.deployment_id))
        return
    item = client.get(f"/deployments/{args.deployment_id}")
    if args.json:
        print_json(item)
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
    if args.json:
        print_json(item)
        return
    print(
        f"deployment {item['id']} is cancelled; {item['counts'].get('cancelled', 0)} device(s) "
        "will not get it, devices already applying it finish"
    )

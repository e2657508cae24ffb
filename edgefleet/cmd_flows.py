"""Operator commands that push flows: `flows release|push|list|module`.

Only argparse, the standard library and httpx are imported: these commands talk to the gateway's
HTTP API, which validates everything (a bad flows file is refused there, with the reason).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from edgefleet.client import GatewayClient
from edgefleet.cmd_deployments import exit_for, follow
from edgefleet.cmd_operator import client_of
from edgefleet.output import (
    CommandError,
    ago,
    parse_duration,
    parse_tags,
    print_table,
    printed_as_json,
    short_digest,
)
from edgefleet.parsers import Subparsers, command, group, operator


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
    parser.add_argument(
        "--allow-empty",
        action="store_true",
        help="release a flows file with no nodes at all (deploying it removes every flow "
        "from the machines); refused without this flag",
    )


def register(sub: Subparsers) -> None:
    fsub = group(
        sub,
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

    release = command(
        fsub,
        _flows_release,
        "release",
        help="store a flows file (and the modules it needs) as a release",
        description="Validates the flows file, stores it with the listed modules as an "
        "immutable release and prints its digest. Node types that neither Node-RED's core nor a "
        "listed module provide are reported: such a release rolls back on machines without them.",
        parents=operator(),
    )
    release.add_argument("flows_file", type=Path, metavar="FLOWS.json")
    _release_options(release)

    push = command(
        fsub,
        _flows_push,
        "push",
        help="send a release (or a flows file) to devices in waves",
        description="Creates a deployment and follows it live (per-state counts, failing devices "
        "with their error) until it ends; Ctrl-C detaches and leaves it running. A machine that "
        "is offline gets it when it is back, unless the deployment was cancelled or timed out.",
        epilog="SELECTOR: `all`, device ids (dev-abc,dev-def) or tags (site=plant-3,line=A).\n"
        "Exit status: 0 when every device succeeded (or on detach), 1 otherwise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=operator(),
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

    command(fsub, _flows_list, "list", help="the releases, newest first", parents=operator())

    msub = group(
        fsub,
        "module",
        dest="module_action",
        help="the gateway's node module cache (machines install modules from it)",
        description="Machines never reach a public npm registry: they install node modules from "
        "tarballs the gateway keeps. Make one with `npm pack NAME@VERSION` where a registry is "
        "reachable and add it here; it is stored once, verified by sha256.",
    )
    add = command(
        msub, _module_add, "add", help="add an `npm pack` tarball to the cache", parents=operator()
    )
    add.add_argument("tarball", type=Path, metavar="TARBALL")
    command(
        msub,
        _module_list,
        "list",
        help="the cached modules and the node types they provide",
        parents=operator(),
    )


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
        "/flows/releases",
        json={
            "flows_json": text,
            "modules": modules,
            "notes": args.notes,
            "allow_empty": args.allow_empty,
        },
    )
    for warning in release["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return release


def _flows_release(args: argparse.Namespace) -> None:
    release = _make_release(client_of(args), args, args.flows_file)
    if printed_as_json(args, release):
        return
    verb = "released" if release["created"] else "already released"
    print(release["digest"])
    print(
        f"{verb}: {release['node_count']} nodes, modules: "
        f"{', '.join(release['modules']) or 'none'}",
        file=sys.stderr,
    )


def _flows_list(args: argparse.Namespace) -> None:
    items = client_of(args).get_all("/flows/releases")
    if printed_as_json(args, items):
        return
    rows = [
        [
            short_digest(r["digest"]),
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
    if printed_as_json(args, added):
        return
    verb = "added" if added["created"] else "already cached"
    print(
        f"{added['name']}@{added['version']} {verb} (sha256 {added['sha256']}); node types: "
        f"{', '.join(added['node_types']) or 'none found'}"
    )


def _module_list(args: argparse.Namespace) -> None:
    items = client_of(args).get_all("/flows/modules")
    if printed_as_json(args, items):
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
    if printed_as_json(args, deployment):
        return
    print(
        f"deployment {deployment['id']}: release {short_digest(deployment['release'])} to "
        f"{deployment['target_text']} ({deployment['device_count']} devices, "
        f"{deployment['wave_count']} wave(s))"
    )
    final = follow(client, deployment["id"])
    exit_for(final)

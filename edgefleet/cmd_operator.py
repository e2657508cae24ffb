"""Operator commands that talk to a gateway over HTTP: tokens, devices, audit."""

from __future__ import annotations

import argparse
import time
from typing import Any

from edgefleet.client import GatewayClient
from edgefleet.output import (
    CommandError,
    ago,
    format_tags,
    parse_duration,
    parse_tags,
    print_json,
    print_table,
    printed_as_json,
    until,
)
from edgefleet.parsers import Subparsers, command, group, operator
from provisioning.states import CommandState

#: A ping is answered once the command is in one of these.
ANSWERED = (CommandState.succeeded, CommandState.failed, CommandState.refused)


def client_of(args: argparse.Namespace) -> GatewayClient:
    return GatewayClient(args.gateway, args.token)


def register(sub: Subparsers) -> None:
    _register_tokens(sub)
    _register_devices(sub)
    _register_audit(sub)


def _register_tokens(sub: Subparsers) -> None:
    tsub = group(
        sub,
        "token",
        help="provisioning tokens that enroll new machines",
        description="Provisioning tokens enroll new machines. A token is random, stored only as "
        "a hash, expires, counts its uses and gives its tags to every machine it enrolls.",
        epilog="example: edgefleet token create --tag site=plant-3 --ttl 1h --uses 5",
    )
    create = command(
        tsub, _token_create, "create", help="make a token (printed once)", parents=operator()
    )
    create.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tag for enrolled machines (repeat, or comma-separate)",
    )
    create.add_argument("--ttl", default="1h", help="how long it may be used (e.g. 30m, 1h, 7d)")
    create.add_argument("--uses", type=int, default=1, help="how many machines it may enroll")
    create.add_argument("--note", default="", help="a note for the token list")
    command(
        tsub, _token_list, "list", help="list tokens with their state and uses", parents=operator()
    )
    revoke = command(
        tsub,
        _token_revoke,
        "revoke",
        help="stop a token from enrolling more machines",
        parents=operator(),
    )
    revoke.add_argument("token_id", metavar="TOKEN_ID", help="the token's id (pt-...)")


def _token_create(args: argparse.Namespace) -> None:
    body = {
        "ttl_seconds": parse_duration(args.ttl),
        "uses": args.uses,
        "tags": parse_tags(args.tag),
        "note": args.note,
    }
    created = client_of(args).post("/provisioning-tokens", json=body)
    if printed_as_json(args, created):
        return
    print(created["token"])
    print(
        f"token {created['id']}: {created['max_uses']} use(s), "
        f"expires {until(created['expires_at'])}, "
        f"tags {format_tags(created['tags'])}. It is shown only now.",
    )
    print("enroll a machine with: edgefleet agent enroll --gateway URL --token TOKEN")


def _token_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            t["id"],
            t["state"],
            f"{t['uses']}/{t['max_uses']}",
            until(t["expires_at"]),
            format_tags(t["tags"]),
            t["note"] or "-",
        ]
        for t in items
    ]


def _token_list(args: argparse.Namespace) -> None:
    items = client_of(args).get("/provisioning-tokens")
    if not printed_as_json(args, items):
        print_table(["ID", "STATE", "USES", "EXPIRES", "TAGS", "NOTE"], _token_rows(items))


def _token_revoke(args: argparse.Namespace) -> None:
    item = client_of(args).delete(f"/provisioning-tokens/{args.token_id}")
    if not printed_as_json(args, item):
        print(f"token {item['id']} is {item['state']}")


def _register_devices(sub: Subparsers) -> None:
    dsub = group(
        sub,
        "devices",
        help="the machines in the registry",
        description="List, show and revoke enrolled machines.",
    )
    listing = command(
        dsub,
        _devices_list,
        "list",
        help="every machine with tags, online state, last seen",
        parents=operator(),
    )
    listing.add_argument("--all", action="store_true", help="include revoked machines")
    show = command(dsub, _devices_show, "show", help="one machine in full", parents=operator())
    show.add_argument("device_id", metavar="DEVICE_ID")
    ping = command(
        dsub,
        _devices_ping,
        "ping",
        help="send a signed ping and wait for the machine to answer",
        description="Checks the whole command path: the gateway signs a command, the broker "
        "delivers it, the agent verifies it and answers. A machine that is offline gets the "
        "ping when it comes back (within 5 minutes).",
        parents=operator(),
    )
    ping.add_argument("device_id", metavar="DEVICE_ID")
    ping.add_argument("--timeout", default="10s", help="how long to wait (default 10s)")
    revoke = command(
        dsub,
        _devices_revoke,
        "revoke",
        help="take a machine out: disconnect it, remove its credential, refuse its JWTs",
        parents=operator(),
    )
    revoke.add_argument("device_id", metavar="DEVICE_ID")


def _devices_list(args: argparse.Namespace) -> None:
    params = {"include_revoked": "true"} if args.all else None
    items = client_of(args).get("/devices", params=params)
    if printed_as_json(args, items):
        return
    rows = [
        [
            d["id"],
            d["name"],
            "revoked" if d["state"] == "revoked" else ("online" if d["online"] else "offline"),
            format_tags(d["tags"]),
            ago(d["last_seen"]),
            ago(d["enrolled_at"]),
        ]
        for d in items
    ]
    print_table(["ID", "NAME", "STATE", "TAGS", "LAST SEEN", "ENROLLED"], rows)


def _devices_show(args: argparse.Namespace) -> None:
    item = client_of(args).get(f"/devices/{args.device_id}")
    if printed_as_json(args, item):
        return
    for key, value in item.items():
        shown = format_tags(value) if key == "tags" else ("-" if value is None else value)
        print(f"{key:18} {shown}")


def _devices_ping(args: argparse.Namespace) -> None:
    client = client_of(args)
    timeout = parse_duration(args.timeout)
    started = time.monotonic()
    command = client.post(f"/devices/{args.device_id}/ping")
    while command["state"] not in ANSWERED:
        if time.monotonic() - started > timeout:
            if args.json:
                print_json(command)
            raise CommandError(
                f"no answer from {args.device_id} within {args.timeout} (state: "
                f"{command['state']}); it gets the ping when it is back online"
            )
        time.sleep(0.1)
        command = client.get(f"/commands/{command['id']}")
    elapsed = time.monotonic() - started
    if args.json:
        print_json(command | {"round_trip_seconds": round(elapsed, 3)})
    elif command["state"] == CommandState.succeeded:
        print(f"{args.device_id} answered in {elapsed * 1000:.0f} ms")
    else:
        raise CommandError(f"{args.device_id} answered {command['state']}: {command['detail']}")


def _devices_revoke(args: argparse.Namespace) -> None:
    item = client_of(args).post(f"/devices/{args.device_id}/revoke")
    if not printed_as_json(args, item):
        print(f"device {item['id']} ({item['name']}) is revoked: disconnected, credential removed")


def _register_audit(sub: Subparsers) -> None:
    audit = command(
        sub,
        _audit,
        "audit",
        help="who did what to which machine",
        description="The audit log: enrollments, revocations, token changes, deployments, "
        "tunnels. Newest first.",
        parents=operator(),
    )
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--action", help="only this action, e.g. device.revoke")
    audit.add_argument("--target", help="only events about this device or token id")


def _audit(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"limit": args.limit}
    if args.action:
        params["action"] = args.action
    if args.target:
        params["target"] = args.target
    items = client_of(args).get("/audit", params=params)
    if printed_as_json(args, items):
        return
    rows = [
        [
            e["at"][:19].replace("T", " "),
            e["actor"],
            e["action"],
            e["target"] or "-",
            ", ".join(f"{k}={v}" for k, v in e["detail"].items()) or "-",
        ]
        for e in items
    ]
    print_table(["AT (UTC)", "ACTOR", "ACTION", "TARGET", "DETAIL"], rows)

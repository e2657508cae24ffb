"""Operator commands that talk to a gateway over HTTP: tokens, devices, audit."""

from __future__ import annotations

import argparse
import time
from typing import Any

from edgefleet import credentials
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


def connection(args: argparse.Namespace) -> tuple[str, str]:
    """(gateway URL, token): flags and environment first, then what `edgefleet login` kept."""
    gateway, token = args.gateway, args.token
    if not token:
        saved = credentials.load()
        if saved is not None and (not gateway or gateway.rstrip("/") == saved.gateway):
            return gateway or saved.gateway, saved.token
    return gateway, token


def client_of(args: argparse.Namespace, timeout: float = 30.0) -> GatewayClient:
    return GatewayClient(*connection(args), timeout=timeout)


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
    create.add_argument(
        "--customer",
        metavar="CUSTOMER",
        help="machines it enrolls belong to this customer (default: into stock, each with a "
        "claim code)",
    )
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
        "customer": args.customer,
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
    items = client_of(args).get_all("/provisioning-tokens")
    if not printed_as_json(args, items):
        print_table(["ID", "STATE", "USES", "EXPIRES", "TAGS", "NOTE"], _token_rows(items))


def _token_revoke(args: argparse.Namespace) -> None:
    item = client_of(args).delete(f"/provisioning-tokens/{args.token_id}")
    if not printed_as_json(args, item):
        print(f"token {item['id']} is {item['state']}")


def _device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device", metavar="DEVICE", help="the machine's name or device id")


def _register_devices(sub: Subparsers) -> None:
    dsub = group(
        sub,
        "devices",
        help="the machines in the registry",
        description="List, show, label, assign, claim and revoke machines. Every DEVICE is a "
        "machine's name or its device id (names are unique within a customer; a name several "
        "machines share is an error that lists them).",
    )
    listing = command(
        dsub,
        _devices_list,
        "list",
        help="machines with owner, tags, online state, last seen",
        epilog="examples:\n"
        "  edgefleet devices list --tag site=plant-3 --offline\n"
        "  edgefleet devices list --customer acme --name-prefix press-",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=operator(),
    )
    listing.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only machines with this tag (repeat or comma-separate: all must match; the "
        "syntax of flows push --to)",
    )
    state = listing.add_mutually_exclusive_group()
    state.add_argument("--online", action="store_true", help="only machines online now")
    state.add_argument("--offline", action="store_true", help="only machines offline now")
    listing.add_argument("--customer", help="only this customer's (name or id), or 'stock'")
    listing.add_argument("--name-prefix", metavar="PREFIX", help="only names starting so")
    listing.add_argument("--all", action="store_true", help="include revoked machines")
    listing.add_argument("--limit", type=int, help="at most this many (default: all)")
    show = command(
        dsub,
        _devices_show,
        "show",
        help="one machine in full, with its health (last seen, Node-RED, outbox, release)",
        parents=operator(),
    )
    _device_arg(show)
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
    _device_arg(ping)
    ping.add_argument("--timeout", default="10s", help="how long to wait (default 10s)")
    revoke = command(
        dsub,
        _devices_revoke,
        "revoke",
        help="take a machine out: disconnect it, remove its credential, refuse its JWTs",
        parents=operator(),
    )
    _device_arg(revoke)
    rename = command(
        dsub, _devices_rename, "rename", help="give a machine a new name", parents=operator()
    )
    _device_arg(rename)
    rename.add_argument("name", metavar="NEW_NAME")
    tag = command(
        dsub,
        _devices_tag,
        "tag",
        help="set and remove a machine's tags",
        epilog="example: edgefleet devices tag press-07 line=B shift=2 --remove old",
        parents=operator(),
    )
    _device_arg(tag)
    tag.add_argument("tags", nargs="*", metavar="KEY=VALUE", help="tags to set")
    tag.add_argument(
        "--remove", action="append", default=[], metavar="KEY", help="a tag to remove (repeat)"
    )
    assign = command(
        dsub,
        _devices_assign,
        "assign",
        help="give a machine to a customer, or take it back into stock (an admin)",
        description="Move a machine to CUSTOMER, or with --stock back into the manufacturer's "
        "stock, where it gets a new claim code (printed once, for a new label).",
        parents=operator(),
    )
    _device_arg(assign)
    target = assign.add_mutually_exclusive_group(required=True)
    target.add_argument("--customer", help="the new owner (name or id)")
    target.add_argument("--stock", action="store_true", help="back into stock")
    claim = command(
        dsub,
        _devices_claim,
        "claim",
        help="claim a machine from stock with the code on its label (a customer-admin)",
        epilog="example: edgefleet devices claim K7QMX-2PAB9-RTB4H-NCDEF",
        parents=operator(),
    )
    claim.add_argument("code", metavar="CODE", help="the claim code (dashes and case optional)")


def _state_of(d: dict[str, Any]) -> str:
    return "revoked" if d["state"] == "revoked" else ("online" if d["online"] else "offline")


def _devices_list(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"include_revoked": "true" if args.all else "false"}
    if args.tag:
        params["tag"] = args.tag
    if args.online or args.offline:
        params["online"] = "true" if args.online else "false"
    if args.customer:
        params["customer"] = args.customer
    if args.name_prefix:
        params["name_prefix"] = args.name_prefix
    items = client_of(args).get_all("/devices", params=params, limit=args.limit)
    if printed_as_json(args, items):
        return
    rows = [
        [
            d["id"],
            d["name"],
            d.get("customer") or "stock",
            _state_of(d),
            format_tags(d["tags"]),
            ago(d["last_seen"]),
            ago(d["enrolled_at"]),
        ]
        for d in items
    ]
    print_table(["ID", "NAME", "OWNER", "STATE", "TAGS", "LAST SEEN", "ENROLLED"], rows)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def _devices_show(args: argparse.Namespace) -> None:
    d = client_of(args).get(f"/devices/{args.device}")
    if printed_as_json(args, d):
        return
    lines = [
        ("id", d["id"]),
        ("name", d["name"]),
        ("owner", d.get("customer") or ("stock (claimable)" if d.get("claimable") else "stock")),
        ("state", _state_of(d)),
        ("last seen", ago(d["last_seen"])),
        ("node-red answers", _yes_no(d.get("node_red_up"))),
        ("outbox queued", "-" if d.get("outbox_queued") is None else d["outbox_queued"]),
        ("outbox dropped", "-" if d.get("outbox_dropped") is None else d["outbox_dropped"]),
        ("agent version", d["agent_version"] or "-"),
        ("node-red version", d["node_red_version"] or "-"),
        ("release", d.get("release") or "-"),
        ("tags", format_tags(d["tags"])),
        ("hostname", d["hostname"] or "-"),
        ("enrolled", f"{d['enrolled_at']} ({ago(d['enrolled_at'])})"),
        ("key", d["key_fingerprint"]),
    ]
    if d["revoked_at"]:
        lines.append(("revoked", d["revoked_at"]))
    for key, value in lines:
        print(f"{key:18} {value}")


def _devices_ping(args: argparse.Namespace) -> None:
    client = client_of(args)
    timeout = parse_duration(args.timeout)
    started = time.monotonic()
    command = client.post(f"/devices/{args.device}/ping")
    while command["state"] not in ANSWERED:
        if time.monotonic() - started > timeout:
            if args.json:
                print_json(command)
            raise CommandError(
                f"no answer from {args.device} within {args.timeout} (state: "
                f"{command['state']}); it gets the ping when it is back online"
            )
        time.sleep(0.1)
        command = client.get(f"/commands/{command['id']}")
    elapsed = time.monotonic() - started
    if args.json:
        print_json(command | {"round_trip_seconds": round(elapsed, 3)})
    elif command["state"] == CommandState.succeeded:
        print(f"{args.device} answered in {elapsed * 1000:.0f} ms")
    else:
        raise CommandError(f"{args.device} answered {command['state']}: {command['detail']}")


def _devices_revoke(args: argparse.Namespace) -> None:
    item = client_of(args).post(f"/devices/{args.device}/revoke")
    if not printed_as_json(args, item):
        print(f"device {item['id']} ({item['name']}) is revoked: disconnected, credential removed")


def _devices_rename(args: argparse.Namespace) -> None:
    item = client_of(args).post(f"/devices/{args.device}/rename", json={"name": args.name})
    if not printed_as_json(args, item):
        print(f"device {item['id']} is now named {item['name']}")


def _devices_tag(args: argparse.Namespace) -> None:
    if not args.tags and not args.remove:
        raise CommandError("give tags to set (KEY=VALUE) or --remove KEY", 2)
    body = {"set": parse_tags(args.tags), "remove": args.remove}
    item = client_of(args).post(f"/devices/{args.device}/tags", json=body)
    if not printed_as_json(args, item):
        print(f"device {item['name']} ({item['id']}) tags: {format_tags(item['tags'])}")


def _devices_assign(args: argparse.Namespace) -> None:
    body = {"customer": None if args.stock else args.customer}
    item = client_of(args).post(f"/devices/{args.device}/assign", json=body)
    if printed_as_json(args, item):
        return
    owner = item.get("customer") or "stock"
    print(f"device {item['name']} ({item['id']}) belongs to {owner}")
    if item.get("claim_code"):
        print(f"new claim code: {item['claim_code']} (shown only now: put it on the label)")


def _devices_claim(args: argparse.Namespace) -> None:
    item = client_of(args).post("/devices/claim", json={"code": args.code})
    if not printed_as_json(args, item):
        print(f"claimed {item['name']} ({item['id']}) for {item.get('customer')}")


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
    audit.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    audit.add_argument("--action", help="only this action, e.g. device.revoke or tunnel.open")
    audit.add_argument("--target", help="only events about this id (a token, a user, ...)")
    audit.add_argument("--device", help="only events about this machine (name or id)")


def _audit(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {}
    for name in ("action", "target", "device"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    items = client_of(args).get_all("/audit", params=params, limit=args.limit)
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

"""`edgefleet tunnel open|list|close`: WireGuard access to one machine, for a while, audited.

`open` makes the engineer's WireGuard key pair here, on the engineer's machine: only the public
key goes to the gateway, and the private key is written only into the config file (mode 0600).
The WireGuard code loads only when `open` runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from edgefleet.cmd_operator import client_of
from edgefleet.output import (
    CommandError,
    ago,
    parse_duration,
    print_table,
    printed_as_json,
    until,
)
from edgefleet.parsers import Subparsers, command, group, operator
from provisioning.states import TUNNEL_FINAL

#: The gateway answers an open once the machine is up or after its open timeout (20 s by
#: default); the HTTP read waits longer than any sane timeout.
OPEN_HTTP_TIMEOUT = 660.0
#: The engineer's laptop sits behind NAT too.
ENGINEER_KEEPALIVE = 25


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, not {port}")
    return port


def register(sub: Subparsers) -> None:
    tsub = group(
        sub,
        "tunnel",
        help="support tunnels: WireGuard access to one machine for a while",
        description="A support tunnel lets one engineer reach one machine on a few ports until it "
        "expires. The machine dials out (nothing to open in the customer's firewall); the "
        "gateway's hub and the machine itself both allow only the engineer, only those ports. "
        "Every open, first handshake, close and expiry is in the audit log.",
    )

    opening = command(
        tsub,
        _open,
        "open",
        help="open a tunnel and write your WireGuard config",
        description="Make a WireGuard key pair here, ask the gateway for a tunnel to DEVICE and "
        "wait until the machine is up. Writes the config (mode 0600) and prints the machine's "
        "tunnel address and the allowed ports. Fails with the reason, leaving nothing open, when "
        "the machine is offline or its owner does not allow the request.",
        epilog="example: edgefleet tunnel open press-07 --ttl 30m --port 1880 --port 22 "
        "--reason 'ticket 4711' -o press-07.conf && sudo wg-quick up ./press-07.conf",
        parents=operator(),
    )
    opening.add_argument("device_id", metavar="DEVICE", help="the machine's device id")
    opening.add_argument(
        "--port",
        type=_port,
        action="append",
        required=True,
        metavar="PORT",
        dest="ports",
        help="a port to reach on the machine (repeat)",
    )
    opening.add_argument(
        "--ttl", default="1h", help="how long it stays open, e.g. 30m or 2h (default 1h)"
    )
    opening.add_argument("--reason", default="", help="why (kept in the audit log)")
    opening.add_argument(
        "--wait",
        metavar="DURATION",
        help="how long to wait for the machine to come up (default and maximum: the gateway's, "
        "20s unless configured)",
    )
    opening.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="where to write the WireGuard config (default ./TUNNEL_ID.conf, usable with wg-quick)",
    )

    listing = command(
        tsub,
        _list,
        "list",
        help="tunnels with state, time left and handshake age",
        parents=operator(),
    )
    listing.add_argument("--all", action="store_true", help="also closed, expired and failed ones")
    listing.add_argument("--device", metavar="DEVICE", help="only this machine's tunnels")

    closing = command(
        tsub,
        _close,
        "close",
        help="close a tunnel now, on the hub and on the machine",
        parents=operator(),
    )
    closing.add_argument("tunnel_id", metavar="TUNNEL_ID")
    closing.add_argument("--reason", default="", help="why (kept in the audit log)")


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CommandError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CommandError(f"cannot write {path}: directory {parent} is not writable")


def _open(args: argparse.Namespace) -> None:
    ttl = parse_duration(args.ttl)
    wait = parse_duration(args.wait) if args.wait else None
    if args.output is not None:
        _check_writable(args.output)
    from ipaddress import IPv4Interface, IPv4Network

    from provisioning.files import write_private
    from provisioning.wireguard.config import render_wg_quick
    from provisioning.wireguard.keys import generate_keypair

    keys = generate_keypair()
    client = client_of(args, timeout=OPEN_HTTP_TIMEOUT)
    tunnel: dict[str, Any] = client.post(
        "/tunnels",
        json={
            "device_id": args.device_id,
            "ports": args.ports,
            "ttl_seconds": ttl,
            "reason": args.reason,
            "engineer_public_key": keys.public_key,
            "open_timeout": wait,
        },
    )
    config = render_wg_quick(
        private_key=keys.private_key,
        address=IPv4Interface(f"{tunnel['engineer_ip']}/32"),
        peer_public_key=tunnel["hub_public_key"],
        endpoint=tunnel["hub_endpoint"],
        allowed_ips=[IPv4Network(f"{tunnel['device_ip']}/32")],
        mtu=tunnel["mtu"],
        persistent_keepalive=ENGINEER_KEEPALIVE,
    )
    path: Path = args.output or Path(f"{tunnel['id']}.conf")
    try:
        write_private(path, config)
    except OSError as exc:
        client.post(f"/tunnels/{tunnel['id']}/close", json={"reason": "config not written"})
        raise CommandError(f"could not write {path}: {exc}; the tunnel was closed again") from exc
    if printed_as_json(args, tunnel | {"config_path": str(path.resolve())}):
        return
    ports = ", ".join(str(p) for p in tunnel["ports"])
    print(
        f"tunnel {tunnel['id']} to {tunnel['device_id']} is open until "
        f"{tunnel['expires_at'][:16].replace('T', ' ')} UTC ({until(tunnel['expires_at'])})"
    )
    print(f"  device address  {tunnel['device_ip']}")
    print(f"  allowed ports   {ports}")
    print(f"  WireGuard config written to {path} (mode 0600); bring it up with:")
    print(f"    sudo wg-quick up {path.resolve()}")
    print(f"  close it early: edgefleet tunnel close {tunnel['id']}")


def _row(t: dict[str, Any]) -> list[Any]:
    live = t["state"] not in TUNNEL_FINAL
    return [
        t["id"],
        t["device_id"],
        t["state"],
        t["device_ip"],
        ",".join(str(p) for p in t["ports"]),
        until(t["expires_at"]) if live else "-",
        ago(t["device_handshake_at"]),
        t["actor"],
        t["reason"] or "-",
    ]


def _list(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"include_closed": "true" if args.all else "false"}
    if args.device:
        params["device_id"] = args.device
    items = client_of(args).get_all("/tunnels", params=params)
    if printed_as_json(args, items):
        return
    headers = ["ID", "DEVICE", "STATE", "DEVICE IP", "PORTS", "TIME LEFT", "HANDSHAKE", "BY"]
    print_table([*headers, "REASON"], [_row(t) for t in items])


def _close(args: argparse.Namespace) -> None:
    client = client_of(args)
    item = client.post(f"/tunnels/{args.tunnel_id}/close", json={"reason": args.reason})
    if printed_as_json(args, item):
        return
    if item["state"] == "closing":
        print(f"tunnel {item['id']} is closing; the hub has not confirmed yet")
        return
    print(
        f"tunnel {item['id']} is {item['state']}: {item['bytes_from_device']} bytes from the "
        f"device, {item['bytes_to_device']} to it"
    )

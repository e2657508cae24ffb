"""People and customers on the command line: login, logout, users, customers, API tokens and
support consent. Only argparse, the standard library and httpx load here."""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
from typing import Any

from edgefleet import credentials
from edgefleet.client import GatewayClient
from edgefleet.cmd_operator import client_of
from edgefleet.output import (
    CommandError,
    ago,
    parse_duration,
    print_json,
    print_table,
    printed_as_json,
    until,
)
from edgefleet.parsers import Subparsers, command, group, operator

ROLES = ["admin", "operator", "support", "viewer", "customer-admin", "customer-viewer"]


def _password(args: argparse.Namespace, prompt: str = "password: ") -> str:
    if args.password_stdin:
        text = sys.stdin.readline().rstrip("\r\n")
        if not text:
            raise CommandError("--password-stdin: no password on standard input", 2)
        return text
    if not sys.stdin.isatty():
        raise CommandError("no terminal to ask for the password: use --password-stdin", 2)
    return getpass.getpass(prompt)


def register(sub: Subparsers) -> None:
    _register_login(sub)
    _register_users(sub)
    _register_customers(sub)
    _register_api_tokens(sub)
    _register_support(sub)


# ---- login / logout ---------------------------------------------------------------------------


def _register_login(sub: Subparsers) -> None:
    login = command(
        sub,
        _login,
        "login",
        help="log in and keep an API token of your own for the next commands",
        description="Trade your email and password for an API token of your own (never more "
        "than your role), kept in $XDG_CONFIG_HOME/edgefleet/credentials.json (mode 0600). "
        "Later commands use it when EDGEFLEET_TOKEN and --token are not given.",
        epilog="example: edgefleet login --gateway https://gw.example.com --email me@example.com",
        parents=operator(),
    )
    login.add_argument("--email", required=True, metavar="EMAIL")
    login.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    login.add_argument("--expires", default="30d", help="how long the token lives (default 30d)")
    login.add_argument("--name", help="the token's name (default: cli-HOSTNAME)")
    command(
        sub,
        _logout,
        "logout",
        help="revoke the token `edgefleet login` kept, and forget it",
        parents=operator(),
    )


def _login(args: argparse.Namespace) -> None:
    gateway = args.gateway or (credentials.load() or credentials.Saved("", "", "", "")).gateway
    if not gateway:
        raise CommandError("no gateway given: pass --gateway URL or set EDGEFLEET_GATEWAY", 2)
    password = _password(args)
    name = args.name or ("cli-" + socket.gethostname().split(".")[0])[:64]
    body = {
        "email": args.email,
        "password": password,
        "name": "".join(c if c.isalnum() or c in "_.-" else "-" for c in name),
        "ttl_seconds": parse_duration(args.expires),
    }
    made = GatewayClient(gateway, "login").post("/auth/token", json=body)
    saved = credentials.Saved(gateway.rstrip("/"), made["token"], made["id"], args.email)
    where = credentials.save(saved)
    if printed_as_json(
        args, {k: v for k, v in made.items() if k != "token"} | {"credentials": str(where)}
    ):
        return
    print(f"logged in as {args.email} ({made['role']}); token {made['id']} kept in {where}")
    print(f"it expires {until(made['expires_at'])}; edgefleet logout revokes it")


def _logout(args: argparse.Namespace) -> None:
    saved = credentials.load()
    revoked = False
    if saved is not None:
        try:
            GatewayClient(args.gateway or saved.gateway, saved.token).post("/auth/logout")
            revoked = True
        except CommandError as exc:  # expired or revoked already: forget it all the same
            print(f"edgefleet: note: {exc}", file=sys.stderr)
    forgotten = credentials.forget()
    if args.json:
        print_json({"revoked": revoked, "forgotten": forgotten})
    elif saved is None:
        print("not logged in")
    else:
        print(f"logged out {saved.email}: token {saved.token_id} revoked and forgotten")


# ---- users ------------------------------------------------------------------------------------


def _register_users(sub: Subparsers) -> None:
    usub = group(
        sub,
        "users",
        help="people: the manufacturer's staff and the customers' users",
        description="Roles: admin, operator (flows, tunnels), support (tunnels, reading), viewer "
        "for the manufacturer; customer-admin (its users, machines, support consent) and "
        "customer-viewer for a customer. A customer-admin manages its own customer's users.",
    )
    create = command(usub, _users_create, "create", help="create a user", parents=operator())
    create.add_argument("email", metavar="EMAIL")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--customer", help="the customer (name or id) of a customer role")
    create.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (none: single sign-on only)",
    )
    listing = command(usub, _users_list, "list", help="list users", parents=operator())
    listing.add_argument("--customer", help="only this customer's users ('-': staff only)")
    show = command(usub, _users_show, "show", help="one user", parents=operator())
    show.add_argument("user", metavar="USER", help="email or user id")
    disable = command(
        usub,
        _users_disable,
        "disable",
        help="disable a user: sessions end, tokens stop working",
        parents=operator(),
    )
    disable.add_argument("user", metavar="USER", help="email or user id")


def _user_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            u["id"],
            u["email"],
            u["role"],
            u["customer_id"] or "-",
            "disabled" if u["disabled_at"] else "active",
            ago(u["last_login_at"]),
        ]
        for u in items
    ]


_USER_HEADERS = ["ID", "EMAIL", "ROLE", "CUSTOMER", "STATE", "LAST LOGIN"]


def _users_create(args: argparse.Namespace) -> None:
    body = {
        "email": args.email,
        "role": args.role,
        "customer": args.customer,
        "password": _password(args, "new user's password: ") if args.password_stdin else None,
    }
    made = client_of(args).post("/users", json=body)
    if not printed_as_json(args, made):
        print(f"user {made['id']} {made['email']} ({made['role']}) created")


def _users_list(args: argparse.Namespace) -> None:
    params = {"customer": args.customer} if args.customer else None
    items = client_of(args).get_all("/users", params=params)
    if not printed_as_json(args, items):
        print_table(_USER_HEADERS, _user_rows(items))


def _users_show(args: argparse.Namespace) -> None:
    item = client_of(args).get(f"/users/{args.user}")
    if not printed_as_json(args, item):
        print_table(_USER_HEADERS, _user_rows([item]))


def _users_disable(args: argparse.Namespace) -> None:
    item = client_of(args).post(f"/users/{args.user}/disable")
    if not printed_as_json(args, item):
        print(f"user {item['email']} is disabled: sessions ended, tokens refused")


# ---- customers --------------------------------------------------------------------------------


def _register_customers(sub: Subparsers) -> None:
    csub = group(sub, "customers", help="the organisations that own machines")
    create = command(
        csub, _customers_create, "create", help="create a customer (an admin)", parents=operator()
    )
    create.add_argument("name", metavar="NAME")
    command(csub, _customers_list, "list", help="list customers", parents=operator())
    show = command(csub, _customers_show, "show", help="one customer", parents=operator())
    show.add_argument("customer", metavar="CUSTOMER", help="name or id")


def _customer_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [c["id"], c["name"], "required" if c["consent_required"] else "not required"] for c in items
    ]


def _customers_create(args: argparse.Namespace) -> None:
    made = client_of(args).post("/customers", json={"name": args.name})
    if not printed_as_json(args, made):
        print(f"customer {made['id']} {made['name']} created")


def _customers_list(args: argparse.Namespace) -> None:
    items = client_of(args).get_all("/customers")
    if not printed_as_json(args, items):
        print_table(["ID", "NAME", "SUPPORT CONSENT"], _customer_rows(items))


def _customers_show(args: argparse.Namespace) -> None:
    item = client_of(args).get(f"/customers/{args.customer}")
    if not printed_as_json(args, item):
        print_table(["ID", "NAME", "SUPPORT CONSENT"], _customer_rows([item]))


# ---- API tokens -------------------------------------------------------------------------------


def _register_api_tokens(sub: Subparsers) -> None:
    tsub = group(
        sub,
        "api-tokens",
        help="your API tokens for scripts (hashed, named, expiring, never above your role)",
    )
    create = command(
        tsub, _tokens_create, "create", help="make a token (printed once)", parents=operator()
    )
    create.add_argument("--name", required=True)
    create.add_argument("--role", choices=ROLES, help="at most yours (default: yours)")
    create.add_argument("--expires", default="90d", help="lifetime, e.g. 30d (default 90d)")
    listing = command(
        tsub, _tokens_list, "list", help="your tokens (an admin: everybody's)", parents=operator()
    )
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    revoke = command(tsub, _tokens_revoke, "revoke", help="revoke a token", parents=operator())
    revoke.add_argument("token_id", metavar="TOKEN_ID")


def _tokens_create(args: argparse.Namespace) -> None:
    body = {"name": args.name, "role": args.role, "ttl_seconds": parse_duration(args.expires)}
    made = client_of(args).post("/api-tokens", json=body)
    if printed_as_json(args, made):
        return
    print(made["token"])
    print(
        f"token {made['id']} ({made['role']}) expires {until(made['expires_at'])}. "
        "It is shown only now."
    )


def _tokens_list(args: argparse.Namespace) -> None:
    params = {"include_revoked": "true" if args.all else "false"}
    items = client_of(args).get_all("/api-tokens", params=params)
    if printed_as_json(args, items):
        return
    rows = [
        [
            t["id"],
            t["name"],
            t["role"],
            t["kind"],
            t["state"],
            until(t["expires_at"]),
            ago(t["last_used_at"]),
            t["created_by"],
        ]
        for t in items
    ]
    print_table(["ID", "NAME", "ROLE", "KIND", "STATE", "EXPIRES", "USED", "BY"], rows)


def _tokens_revoke(args: argparse.Namespace) -> None:
    item = client_of(args).delete(f"/api-tokens/{args.token_id}")
    if not printed_as_json(args, item):
        print(f"token {item['id']} is {item['state']}")


# ---- support consent --------------------------------------------------------------------------


def _register_support(sub: Subparsers) -> None:
    ssub = group(
        sub,
        "support",
        help="support consent: when the manufacturer may open tunnels to your machines",
        description="A customer-admin may require consent for support. Then a support tunnel "
        "to the customer's machines opens only inside a window it granted (and ends with it at "
        "the latest); `edgefleet audit --action tunnel.open` shows who connected, when, to "
        "what and why. --customer defaults to your own customer.",
        epilog="examples:\n"
        "  edgefleet support require on\n"
        "  edgefleet support grant --for 24h --note 'ticket 4711'\n"
        "  edgefleet support status\n"
        "  edgefleet support revoke",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    require = command(
        ssub,
        _require,
        "require",
        help="require consent for support (on) or not (off)",
        parents=operator(),
    )
    require.add_argument("setting", choices=["on", "off"])
    grant = command(
        ssub, _grant, "grant", help="let support connect from now for a while", parents=operator()
    )
    grant.add_argument("--for", dest="duration", required=True, help="how long, e.g. 24h")
    grant.add_argument("--note", default="", help="why (kept in the audit log)")
    revoke = command(
        ssub,
        _revoke,
        "revoke",
        help="end every open window now; live tunnels close",
        parents=operator(),
    )
    status = command(
        ssub,
        _status,
        "status",
        help="whether support may connect now, and recent windows",
        parents=operator(),
    )
    for parser in (require, grant, revoke, status):
        parser.add_argument("--customer", help="the customer (default: yours)")


def _customer_of(args: argparse.Namespace, client: GatewayClient) -> str:
    if args.customer:
        return str(args.customer)
    me = client.get("/auth/me")
    if not me.get("customer_id"):
        raise CommandError("you are not a customer's user: name one with --customer", 2)
    return str(me["customer_id"])


def _print_status(status: dict[str, Any]) -> None:
    if not status["consent_required"]:
        print(f"{status['customer']}: consent not required; support may connect")
    elif status["active"]:
        g = status["active"]
        print(
            f"{status['customer']}: support may connect until {g['ends_at'][:16]} UTC "
            f"({until(g['ends_at'])}), granted by {g['granted_by']}"
        )
    else:
        print(f"{status['customer']}: consent required; no window open, support cannot connect")


def _require(args: argparse.Namespace) -> None:
    client = client_of(args)
    customer = _customer_of(args, client)
    status = client.request(
        "PUT", f"/customers/{customer}/support", json={"required": args.setting == "on"}
    )
    if not printed_as_json(args, status):
        _print_status(status)


def _grant(args: argparse.Namespace) -> None:
    client = client_of(args)
    customer = _customer_of(args, client)
    body = {"seconds": parse_duration(args.duration), "note": args.note}
    made = client.post(f"/customers/{customer}/support/grants", json=body)
    if not printed_as_json(args, made):
        print(
            f"support may connect until {made['ends_at'][:16]} UTC ({until(made['ends_at'])}); "
            "end it early with: edgefleet support revoke"
        )


def _revoke(args: argparse.Namespace) -> None:
    client = client_of(args)
    customer = _customer_of(args, client)
    result = client.post(f"/customers/{customer}/support/revoke")
    if printed_as_json(args, result):
        return
    closed = ", ".join(result["tunnels_closed"]) or "none"
    print(f"{result['grants_revoked']} window(s) ended; tunnels closed: {closed}")


def _status(args: argparse.Namespace) -> None:
    client = client_of(args)
    status = client.get(f"/customers/{_customer_of(args, client)}/support")
    if not printed_as_json(args, status):
        _print_status(status)

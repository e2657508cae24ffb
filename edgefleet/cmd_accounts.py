"""People and customers on the command line: login, logout, users, customers, API tokens and
support consent. Only argparse, the standard library and httpx load here."""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
from typing import TYPE_CHECKING, Any

from edgefleet import credentials
from edgefleet.client import GatewayClient
from edgefleet.cmd_operator import add_connection_options, client_of
from edgefleet.output import (
    CommandError,
    ago,
    parse_duration,
    print_json,
    print_table,
    until,
)

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
ROLES = ["admin", "operator", "support", "viewer", "customer-admin", "customer-viewer"]


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _leaf(sub: SubParsers, name: str, help_text: str, func: Any, **kwargs: Any) -> Any:
    parser = sub.add_parser(name, help=help_text, **kwargs)
    parser.set_defaults(func=func)
    return parser


def _finish(parser: argparse.ArgumentParser) -> None:
    _json_flag(parser)
    add_connection_options(parser)


def _password(args: argparse.Namespace, prompt: str = "password: ") -> str:
    if args.password_stdin:
        text = sys.stdin.readline().rstrip("\r\n")
        if not text:
            raise CommandError("--password-stdin: no password on standard input", 2)
        return text
    if not sys.stdin.isatty():
        raise CommandError("no terminal to ask for the password: use --password-stdin", 2)
    return getpass.getpass(prompt)


def register(sub: SubParsers) -> None:
    _register_login(sub)
    _register_users(sub)
    _register_customers(sub)
    _register_api_tokens(sub)
    _register_support(sub)


# ---- login / logout ---------------------------------------------------------------------------


def _register_login(sub: SubParsers) -> None:
    login = _leaf(
        sub,
        "login",
        "log in and keep an API token of your own for the next commands",
        _login,
        description="Trade your email and password for an API token of your own (never more "
        "than your role), kept in $XDG_CONFIG_HOME/edgefleet/credentials.json (mode 0600). "
        "Later commands use it when EDGEFLEET_TOKEN and --token are not given.",
        epilog="example: edgefleet login --gateway https://gw.example.com --email me@example.com",
    )
    login.add_argument("--email", required=True, metavar="EMAIL")
    login.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    login.add_argument("--expires", default="30d", help="how long the token lives (default 30d)")
    login.add_argument("--name", help="the token's name (default: cli-HOSTNAME)")
    _finish(login)
    logout = _leaf(
        sub,
        "logout",
        "revoke the token `edgefleet login` kept, and forget it",
        _logout,
    )
    _finish(logout)


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
    if args.json:
        print_json({k: v for k, v in made.items() if k != "token"} | {"credentials": str(where)})
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


def _register_users(sub: SubParsers) -> None:
    users = sub.add_parser(
        "users",
        help="people: the manufacturer's staff and the customers' users",
        description="Roles: admin, operator (flows, tunnels), support (tunnels, reading), viewer "
        "for the manufacturer; customer-admin (its users, machines, support consent) and "
        "customer-viewer for a customer. A customer-admin manages its own customer's users.",
    )
    usub = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = _leaf(usub, "create", "create a user", _users_create)
    create.add_argument("email", metavar="EMAIL")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--customer", help="the customer (name or id) of a customer role")
    create.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (none: single sign-on only)",
    )
    _finish(create)
    listing = _leaf(usub, "list", "list users", _users_list)
    listing.add_argument("--customer", help="only this customer's users ('-': staff only)")
    _finish(listing)
    show = _leaf(usub, "show", "one user", _users_show)
    show.add_argument("user", metavar="USER", help="email or user id")
    _finish(show)
    disable = _leaf(
        usub, "disable", "disable a user: sessions end, tokens stop working", _users_disable
    )
    disable.add_argument("user", metavar="USER", help="email or user id")
    _finish(disable)


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
    if args.json:
        print_json(made)
    else:
        print(f"user {made['id']} {made['email']} ({made['role']}) created")


def _users_list(args: argparse.Namespace) -> None:
    params = {"customer": args.customer} if args.customer else None
    items = client_of(args).get_all("/users", params=params)
    if args.json:
        print_json(items)
    else:
        print_table(_USER_HEADERS, _user_rows(items))


def _users_show(args: argparse.Namespace) -> None:
    item = client_of(args).get(f"/users/{args.user}")
    if args.json:
        print_json(item)
    else:
        print_table(_USER_HEADERS, _user_rows([item]))


def _users_disable(args: argparse.Namespace) -> None:
    item = client_of(args).post(f"/users/{args.user}/disable")
    if args.json:
        print_json(item)
    else:
        print(f"user {item['email']} is disabled: sessions ended, tokens refused")


# ---- customers --------------------------------------------------------------------------------


def _register_customers(sub: SubParsers) -> None:
    customers = sub.add_parser("customers", help="the organisations that own machines")
    csub = customers.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = _leaf(csub, "create", "create a customer (an admin)", _customers_create)
    create.add_argument("name", metavar="NAME")
    _finish(create)
    _finish(_leaf(csub, "list", "list customers", _customers_list))
    show = _leaf(csub, "show", "one customer", _customers_show)
    show.add_argument("customer", metavar="CUSTOMER", help="name or id")
    _finish(show)


def _customer_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [c["id"], c["name"], "required" if c["consent_required"] else "not required"] for c in items
    ]


def _customers_create(args: argparse.Namespace) -> None:
    made = client_of(args).post("/customers", json={"name": args.name})
    if args.json:
        print_json(made)
    else:
        print(f"customer {made['id']} {made['name']} created")


def _customers_list(args: argparse.Namespace) -> None:
    items = client_of(args).get_all("/customers")
    if args.json:
        print_json(items)
    else:
        print_table(["ID", "NAME", "SUPPORT CONSENT"], _customer_rows(items))


def _customers_show(args: argparse.Namespace) -> None:
    item = client_of(args).get(f"/customers/{args.customer}")
    if args.json:
        print_json(item)
    else:
        print_table(["ID", "NAME", "SUPPORT CONSENT"], _customer_rows([item]))


# ---- API tokens -------------------------------------------------------------------------------


def _register_api_tokens(sub: SubParsers) -> None:
    tokens = sub.add_parser(
        "api-tokens",
        help="your API tokens for scripts (hashed, named, expiring, never above your role)",
    )
    tsub = tokens.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = _leaf(tsub, "create", "make a token (printed once)", _tokens_create)
    create.add_argument("--name", required=True)
    create.add_argument("--role", choices=ROLES, help="at most yours (default: yours)")
    create.add_argument("--expires", default="90d", help="lifetime, e.g. 30d (default 90d)")
    _finish(create)
    listing = _leaf(tsub, "list", "your tokens (an admin: everybody's)", _tokens_list)
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    _finish(listing)
    revoke = _leaf(tsub, "revoke", "revoke a token", _tokens_revoke)
    revoke.add_argument("token_id", metavar="TOKEN_ID")
    _finish(revoke)


def _tokens_create(args: argparse.Namespace) -> None:
    body = {"name": args.name, "role": args.role, "ttl_seconds": parse_duration(args.expires)}
    made = client_of(args).post("/api-tokens", json=body)
    if args.json:
        print_json(made)
        return
    print(made["token"])
    print(
        f"token {made['id']} ({made['role']}) expires {until(made['expires_at'])}. "
        "It is shown only now."
    )


def _tokens_list(args: argparse.Namespace) -> None:
    params = {"include_revoked": "true" if args.all else "false"}
    items = client_of(args).get_all("/api-tokens", params=params)
    if args.json:
        print_json(items)
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
    if args.json:
        print_json(item)
    else:
        print(f"token {item['id']} is {item['state']}")


# ---- support consent --------------------------------------------------------------------------


def _register_support(sub: SubParsers) -> None:
    support = sub.add_parser(
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
    ssub = support.add_subparsers(dest="action", required=True, metavar="ACTION")
    require = _leaf(ssub, "require", "require consent for support (on) or not (off)", _require)
    require.add_argument("setting", choices=["on", "off"])
    grant = _leaf(ssub, "grant", "let support connect from now for a while", _grant)
    grant.add_argument("--for", dest="duration", required=True, help="how long, e.g. 24h")
    grant.add_argument("--note", default="", help="why (kept in the audit log)")
    revoke = _leaf(ssub, "revoke", "end every open window now; live tunnels close", _revoke)
    status = _leaf(ssub, "status", "whether support may connect now, and recent windows", _status)
    for parser in (require, grant, revoke, status):
        parser.add_argument("--customer", help="the customer (default: yours)")
        _finish(parser)


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
    if args.json:
        print_json(status)
    else:
        _print_status(status)


def _grant(args: argparse.Namespace) -> None:
    client = client_of(args)
    customer = _customer_of(args, client)
    body = {"seconds": parse_duration(args.duration), "note": args.note}
    made = client.post(f"/customers/{customer}/support/grants", json=body)
    if args.json:
        print_json(made)
    else:
        print(
            f"support may connect until {made['ends_at'][:16]} UTC ({until(made['ends_at'])}); "
            "end it early with: edgefleet support revoke"
        )


def _revoke(args: argparse.Namespace) -> None:
    client = client_of(args)
    customer = _customer_of(args, client)
    result = client.post(f"/customers/{customer}/support/revoke")
    if args.json:
        print_json(result)
        return
    closed = ", ".join(result["tunnels_closed"]) or "none"
    print(f"{result['grants_revoked']} window(s) ended; tunnels closed: {closed}")


def _status(args: argparse.Namespace) -> None:
    client = client_of(args)
    status = client.get(f"/customers/{_customer_of(args, client)}/support")
    if args.json:
        print_json(status)
    else:
        _print_status(status)

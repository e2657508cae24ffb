"""What each role may do: one table, read by the one dependency every route uses.

A permission says what kind of thing a caller may do; *which* rows it may do it to is the scoping
helper's business (`gateway.accounts.scoping`): a customer's user holding `fleet_read` reads its
own customer's machines and nothing else.
"""

from __future__ import annotations

from enum import StrEnum

from gateway.registry.models import Role


class Permission(StrEnum):
    fleet_read = "fleet_read"  # machines, their commands, telemetry, tunnels, deployment records
    fleet_label = "fleet_label"  # rename a machine, change its tags
    fleet_ping = "fleet_ping"  # send a machine a signed ping
    fleet_assign = "fleet_assign"  # move a machine to a customer or back to stock; claim codes
    fleet_claim = "fleet_claim"  # claim a stock machine with its code
    fleet_revoke = "fleet_revoke"  # take a machine out for good
    provision = "provision"  # provisioning tokens
    flows_read = "flows_read"  # releases, modules, deployments (the manufacturer's)
    flows_write = "flows_write"  # make releases and deployments, cancel them
    tunnel_open = "tunnel_open"  # open a support tunnel
    tunnel_close = "tunnel_close"  # close one
    tunnel_pool = "tunnel_pool"  # the hub and its address pool
    audit_read = "audit_read"
    users_read = "users_read"
    users_manage = "users_manage"  # create and disable users (a customer-admin: its own)
    customers_read = "customers_read"
    customers_manage = "customers_manage"
    consent_read = "consent_read"
    consent_manage = "consent_manage"  # require consent, grant and revoke support windows
    tokens_own = "tokens_own"  # a person's own API tokens
    tokens_all = "tokens_all"  # everybody's API tokens


P = Permission
_READ_ALL = {P.fleet_read, P.flows_read, P.tunnel_pool, P.customers_read, P.consent_read}
_MANUFACTURER = {P.tokens_own} | _READ_ALL

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.viewer: frozenset(_MANUFACTURER),
    Role.support: frozenset(
        _MANUFACTURER | {P.fleet_ping, P.tunnel_open, P.tunnel_close, P.audit_read}
    ),
    Role.operator: frozenset(
        _MANUFACTURER
        | {
            P.fleet_ping,
            P.fleet_label,
            P.tunnel_open,
            P.tunnel_close,
            P.audit_read,
            P.provision,
            P.flows_write,
        }
    ),
    # Everything but the customer's own decisions: the manufacturer cannot consent for it.
    Role.admin: frozenset(Permission) - {P.consent_manage, P.fleet_claim},
    Role.customer_viewer: frozenset({P.fleet_read, P.customers_read, P.consent_read, P.tokens_own}),
    Role.customer_admin: frozenset(
        {
            P.fleet_read,
            P.fleet_label,
            P.fleet_claim,
            P.tunnel_close,
            P.audit_read,
            P.users_read,
            P.users_manage,
            P.customers_read,
            P.consent_read,
            P.consent_manage,
            P.tokens_own,
        }
    ),
}


def allows(role: Role, permission: Permission) -> bool:
    return permission in ROLE_PERMISSIONS[role]


def needed_role(permission: Permission) -> str:
    """The roles that hold a permission, for error messages."""
    return " or ".join(role.value for role in Role if allows(role, permission))

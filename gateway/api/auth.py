"""Who is calling, as FastAPI dependencies: the one way every route (API and console) learns it.

- `CallerDep`: the authenticated caller of a people's route, from, in this order, an
  ``Authorization: Bearer`` API token (a person's, the bootstrap token, a legacy token) or the
  browser session cookie. No credential, or a dead one: 401.
- `require(permission)`: `CallerDep` that also holds `permission` (403 otherwise, naming the
  roles that do) and, when it came by cookie and the request changes something, carries the
  session's CSRF token (`gateway.accounts.csrf`). The bootstrap token passes only
  `require_bootstrap_or(...)`, on the one route that creates users.
- `DevicePrincipalDep` / `DeviceDep`: a machine's JWT, on device routes only (a device JWT is no
  credential anywhere else, and a person's token none here).

Which rows a caller may touch is then `gateway.accounts.scoping`'s business.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from gateway.accounts import api_tokens, csrf, sessions
from gateway.accounts.permissions import Permission, needed_role
from gateway.accounts.principal import Actor, Principal, PrincipalKind, actor_label
from gateway.api.deps import RuntimeDep, SessionDep
from gateway.errors import Forbidden, Unauthorized
from gateway.registry import devices
from gateway.registry.models import Device, Role

_bearer = HTTPBearer(auto_error=False, description="A person's API token (efa_...).")
_cookie = APIKeyCookie(
    name=sessions.COOKIE, auto_error=False, description="The browser session (POST /auth/login)."
)
_device_bearer = HTTPBearer(
    auto_error=False, scheme_name="DeviceJWT", description="The machine's own ES256 JWT."
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
CookieDep = Annotated[str | None, Depends(_cookie)]


def authenticate(
    session: SessionDep, runtime: RuntimeDep, bearer: BearerDep, cookie: CookieDep
) -> Principal:
    if bearer is not None and bearer.credentials:
        return api_tokens.authenticate(session, bearer.credentials)
    if cookie:
        found = sessions.lookup(session, cookie, runtime.settings)
        if found is None:
            raise Unauthorized("session_ended", "the session has ended; log in again")
        row, user = found
        return Principal(
            PrincipalKind.session,
            Actor(actor_label(user.email, user.id), user_id=user.id),
            role=Role(user.role),
            user_id=user.id,
            email=user.email,
            customer_id=user.customer_id,
            csrf_token=row.csrf_token,
        )
    raise Unauthorized(
        "missing_credentials",
        "send 'Authorization: Bearer <API token>' or log in (edgefleet login)",
    )


CallerDep = Annotated[Principal, Depends(authenticate)]


async def _guard(request: Request, who: Principal) -> None:
    if who.via_cookie and who.csrf_token is not None:
        await csrf.check(request, who.csrf_token)


def require(
    permission: Permission, *, bootstrap: bool = False
) -> Callable[[Request, Principal], Awaitable[Principal]]:
    """A dependency admitting callers that hold `permission` (and, with `bootstrap`, the
    bootstrap token, whose route then decides what it may do)."""

    async def dependency(request: Request, who: CallerDep) -> Principal:
        await _guard(request, who)
        if who.kind is PrincipalKind.bootstrap:
            if bootstrap:
                return who
            raise Forbidden(
                "bootstrap_only",
                "the bootstrap token only creates the first admin user: "
                "edgefleet users create EMAIL --role admin --password-stdin",
            )
        if not who.may(permission):
            role = who.role.value if who.role else "none"
            raise Forbidden(
                "insufficient_role",
                f"this needs the role {needed_role(permission)}; the caller has {role}",
            )
        return who

    dependency.__name__ = f"require_{permission.value}"
    return dependency


async def any_person(request: Request, who: CallerDep) -> Principal:
    """Any authenticated caller but a machine (what am I, log out)."""
    await _guard(request, who)
    return who


PersonDep = Annotated[Principal, Depends(any_person)]
DeviceBearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_device_bearer)]


def device_caller(session: SessionDep, runtime: RuntimeDep, credentials: DeviceBearerDep) -> Device:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing_token", "send 'Authorization: Bearer <device JWT>'")
    return devices.authenticate_device(
        session, credentials.credentials, runtime.identity.gateway_id
    )


DeviceDep = Annotated[Device, Depends(device_caller)]


def device_principal(device: DeviceDep) -> Principal:
    """The same machine as a Principal (for code that serves people and machines alike)."""
    return Principal(
        PrincipalKind.device,
        Actor(f"device:{device.id}"),
        device_id=device.id,
        customer_id=device.customer_id,
    )


DevicePrincipalDep = Annotated[Principal, Depends(device_principal)]


def _dep(permission: Permission) -> object:
    return Depends(require(permission))


P = Permission
# One alias per permission, for route signatures: `who: FleetRead`.
FleetRead = Annotated[Principal, _dep(P.fleet_read)]
FleetLabel = Annotated[Principal, _dep(P.fleet_label)]
FleetPing = Annotated[Principal, _dep(P.fleet_ping)]
FleetAssign = Annotated[Principal, _dep(P.fleet_assign)]
FleetClaim = Annotated[Principal, _dep(P.fleet_claim)]
FleetRevoke = Annotated[Principal, _dep(P.fleet_revoke)]
Provision = Annotated[Principal, _dep(P.provision)]
FlowsRead = Annotated[Principal, _dep(P.flows_read)]
FlowsWrite = Annotated[Principal, _dep(P.flows_write)]
TunnelOpen = Annotated[Principal, _dep(P.tunnel_open)]
TunnelClose = Annotated[Principal, _dep(P.tunnel_close)]
TunnelPool = Annotated[Principal, _dep(P.tunnel_pool)]
AuditRead = Annotated[Principal, _dep(P.audit_read)]
UsersRead = Annotated[Principal, _dep(P.users_read)]
UsersManage = Annotated[Principal, Depends(require(P.users_manage, bootstrap=True))]
CustomersRead = Annotated[Principal, _dep(P.customers_read)]
CustomersManage = Annotated[Principal, _dep(P.customers_manage)]
ConsentRead = Annotated[Principal, _dep(P.consent_read)]
ConsentManage = Annotated[Principal, _dep(P.consent_manage)]
TokensOwn = Annotated[Principal, _dep(P.tokens_own)]

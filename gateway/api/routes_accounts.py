"""People and customers: logging in, users, customers, API tokens, support consent."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import RedirectResponse
from pydantic import Field

from gateway.accounts import (
    api_tokens,
    consent,
    customers,
    login,
    oidc,
    sessions,
    users,
)
from gateway.accounts.models import User
from gateway.accounts.schemas import (
    ConsentOut,
    ConsentRequire,
    CustomerCreate,
    CustomerOut,
    GrantCreate,
    GrantOut,
    LoginBody,
    Me,
    RevokeOut,
    UserCreate,
    UserOut,
)
from gateway.api.auth import (
    ConsentManage,
    ConsentRead,
    CustomersManage,
    CustomersRead,
    PersonDep,
    TokensOwn,
    UsersManage,
    UsersRead,
)
from gateway.api.deps import RuntimeDep, SessionDep
from gateway.api.pages import PageDep, send_page
from gateway.errors import Forbidden
from gateway.registry.schemas import ApiTokenCreate, ApiTokenCreated, ApiTokenOut
from gateway.tunnels import service as tunnel_service
from provisioning.wire import DeviceName, ErrorBody

_errors: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422, 429, 503)
}
router = APIRouter(prefix="/api/v1", responses=_errors)


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


# ---- logging in -----------------------------------------------------------------------------


@router.post(
    "/auth/login",
    response_model=Me,
    tags=["auth"],
    summary="Log in with email and password: sets the session cookie",
    description="A new session every time (the one the browser came with ends). Failed logins "
    "are audited and throttled per account and per address (429 with Retry-After). The body "
    "holds the session's CSRF token, which every cookie-authenticated change must carry.",
)
def login_password(
    body: LoginBody, request: Request, response: Response, session: SessionDep, runtime: RuntimeDep
) -> Me:
    settings = runtime.settings
    started, user = login.password_login(
        session,
        settings,
        email=body.email,
        password=body.password,
        address=_address(request),
        user_agent=request.headers.get("user-agent", ""),
        previous_secret=request.cookies.get(sessions.COOKIE),
    )
    sessions.set_cookie(response, started.secret, settings)
    return _me_of_session(user, started.row.csrf_token)


def _me_of_session(user: User, csrf_token: str) -> Me:
    return Me(
        kind="session",
        actor=user.email,
        user_id=user.id,
        email=user.email,
        role=user.role,
        customer_id=user.customer_id,
        token_id=None,
        csrf_token=csrf_token,
    )


class _TokenLogin(LoginBody):
    name: DeviceName = "cli"
    ttl_seconds: int | None = Field(default=None, gt=0)


@router.post(
    "/auth/token",
    response_model=ApiTokenCreated,
    status_code=status.HTTP_201_CREATED,
    tags=["auth"],
    summary="Log in with email and password for an API token of your own (edgefleet login)",
)
def login_token(
    body: _TokenLogin, request: Request, session: SessionDep, runtime: RuntimeDep
) -> ApiTokenCreated:
    issued = login.token_login(
        session,
        runtime.settings,
        email=body.email,
        password=body.password,
        address=_address(request),
        name=body.name,
        ttl_seconds=body.ttl_seconds,
    )
    return ApiTokenCreated(**ApiTokenOut.of(issued.row).model_dump(), token=issued.token)


@router.get("/auth/me", response_model=Me, tags=["auth"], summary="Who am I")
def me(who: PersonDep) -> Me:
    return Me.of(who)


@router.post(
    "/auth/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["auth"],
    summary="End this browser session (or revoke the API token this request carries)",
)
def logout(
    request: Request, response: Response, session: SessionDep, runtime: RuntimeDep, who: PersonDep
) -> None:
    login.logout(session, who, request.cookies.get(sessions.COOKIE))
    sessions.clear_cookie(response, runtime.settings)


@router.get(
    "/auth/oidc/login",
    tags=["auth"],
    summary="Single sign-on: off to the OpenID Connect provider",
    status_code=status.HTTP_302_FOUND,
    response_class=RedirectResponse,
)
def oidc_login(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    next: Annotated[str, Query(max_length=500, description="Path to land on afterwards.")] = "/",
) -> RedirectResponse:
    settings = runtime.settings
    redirect_uri = settings.oidc_redirect_url or str(request.url_for("oidc_callback"))
    url, state = oidc.begin(session, settings, redirect_uri, next)
    response = RedirectResponse(url, status_code=status.HTTP_302_FOUND)
    response.set_cookie(
        oidc.STATE_COOKIE,
        state,
        max_age=int(oidc.LOGIN_TTL.total_seconds()),
        path="/api/v1/auth/oidc",
        secure=settings.session_cookie_secure,
        httponly=True,
        samesite="lax",
    )
    return response


@router.get(
    "/auth/oidc/callback",
    name="oidc_callback",
    tags=["auth"],
    summary="Single sign-on: back from the provider; sets the session cookie",
    status_code=status.HTTP_302_FOUND,
    response_class=RedirectResponse,
)
def oidc_callback(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    state: Annotated[str, Query(max_length=200)] = "",
    code: Annotated[str, Query(max_length=2000)] = "",
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> RedirectResponse:
    if error or not code:
        raise Forbidden("oidc_denied", f"the provider did not sign you in: {error or 'no code'}")
    settings = runtime.settings
    identity, next_path = oidc.finish(
        session,
        settings,
        state=state,
        code=code,
        cookie_state=request.cookies.get(oidc.STATE_COOKIE),
    )
    user = oidc.user_for(session, identity)
    started = login.open_session(
        session,
        settings,
        user,
        method="oidc",
        address=_address(request),
        user_agent=request.headers.get("user-agent", ""),
        previous_secret=request.cookies.get(sessions.COOKIE),
    )
    response = RedirectResponse(next_path, status_code=status.HTTP_302_FOUND)
    sessions.set_cookie(response, started.secret, settings)
    response.delete_cookie(oidc.STATE_COOKIE, path="/api/v1/auth/oidc")
    return response


# ---- users ----------------------------------------------------------------------------------


@router.post(
    "/users",
    response_model=UserOut,
    status_code=status.HTTP_201_CREATED,
    tags=["people"],
    summary="Create a user (the bootstrap token: the first admin only)",
)
def create_user(body: UserCreate, session: SessionDep, who: UsersManage) -> UserOut:
    row = users.create(
        session,
        who,
        email=body.email,
        role=body.role,
        customer_ref=body.customer,
        password=body.password,
    )
    return UserOut.of(row)


@router.get("/users", response_model=list[UserOut], tags=["people"])
def list_users(
    request: Request,
    response: Response,
    session: SessionDep,
    who: UsersRead,
    page: PageDep,
    customer: Annotated[
        str | None, Query(max_length=64, description="A customer's name or id; '-': staff.")
    ] = None,
) -> list[UserOut]:
    found = users.list_users(session, who, page, customer)
    send_page(request, response, found)
    return [UserOut.of(row) for row in found.items]


@router.get("/users/{user}", response_model=UserOut, tags=["people"])
def show_user(user: str, session: SessionDep, who: UsersRead) -> UserOut:
    return UserOut.of(users.resolve(session, who, user))


@router.post(
    "/users/{user}/disable",
    response_model=UserOut,
    tags=["people"],
    summary="Disable a user: their sessions end and their tokens stop working",
)
def disable_user(user: str, session: SessionDep, who: UsersManage) -> UserOut:
    return UserOut.of(users.disable(session, who, user))


# ---- customers and support consent ----------------------------------------------------------


@router.post(
    "/customers", response_model=CustomerOut, status_code=status.HTTP_201_CREATED, tags=["people"]
)
def create_customer(body: CustomerCreate, session: SessionDep, who: CustomersManage) -> CustomerOut:
    return CustomerOut.of(customers.create(session, who, body.name))


@router.get("/customers", response_model=list[CustomerOut], tags=["people"])
def list_customers(
    request: Request, response: Response, session: SessionDep, who: CustomersRead, page: PageDep
) -> list[CustomerOut]:
    found = customers.list_customers(session, who, page)
    send_page(request, response, found)
    return [CustomerOut.of(row) for row in found.items]


@router.get("/customers/{customer}", response_model=CustomerOut, tags=["people"])
def show_customer(customer: str, session: SessionDep, who: CustomersRead) -> CustomerOut:
    return CustomerOut.of(customers.resolve(session, who, customer))


@router.get(
    "/customers/{customer}/support",
    response_model=ConsentOut,
    tags=["support consent"],
    summary="Whether support may connect to the customer's machines now",
)
def support_status(customer: str, session: SessionDep, who: ConsentRead) -> ConsentOut:
    return ConsentOut.of(consent.status(session, who, customer))


@router.put(
    "/customers/{customer}/support",
    response_model=ConsentOut,
    tags=["support consent"],
    summary="Require consent for support tunnels (or stop requiring it)",
)
def support_require(
    customer: str, body: ConsentRequire, session: SessionDep, who: ConsentManage
) -> ConsentOut:
    consent.set_required(session, who, customer, body.required)
    return ConsentOut.of(consent.status(session, who, customer))


@router.post(
    "/customers/{customer}/support/grants",
    response_model=GrantOut,
    status_code=status.HTTP_201_CREATED,
    tags=["support consent"],
    summary="Let support connect to the customer's machines from now for a while",
)
def support_grant(
    customer: str, body: GrantCreate, session: SessionDep, who: ConsentManage
) -> GrantOut:
    return GrantOut.of(consent.grant(session, who, customer, body.seconds, body.note))


@router.post(
    "/customers/{customer}/support/revoke",
    response_model=RevokeOut,
    tags=["support consent"],
    summary="End every open support window now, and close the live tunnels to its machines",
)
def support_revoke(
    customer: str, session: SessionDep, runtime: RuntimeDep, who: ConsentManage
) -> RevokeOut:
    row, count = consent.revoke(session, who, customer)
    closed = []
    if row.consent_required:
        for tunnel in consent.live_tunnels(session, row.id):
            tunnel_service.close_tunnel(runtime, tunnel.id, who.actor, "support consent revoked")
            closed.append(tunnel.id)
    return RevokeOut(customer_id=row.id, grants_revoked=count, tunnels_closed=closed)


# ---- API tokens -----------------------------------------------------------------------------


@router.post(
    "/api-tokens",
    response_model=ApiTokenCreated,
    status_code=status.HTTP_201_CREATED,
    tags=["people"],
    summary="Make an API token of your own (never more powerful than you)",
)
def create_api_token(
    body: ApiTokenCreate, session: SessionDep, runtime: RuntimeDep, who: TokensOwn
) -> ApiTokenCreated:
    issued = api_tokens.create_for_user(
        session,
        who,
        name=body.name,
        role=body.role,
        ttl_seconds=body.ttl_seconds,
        max_ttl_seconds=runtime.settings.api_token_max_ttl,
    )
    return ApiTokenCreated(**ApiTokenOut.of(issued.row).model_dump(), token=issued.token)


@router.get(
    "/api-tokens",
    response_model=list[ApiTokenOut],
    tags=["people"],
    summary="Your API tokens (an admin: everybody's)",
)
def list_api_tokens(
    request: Request,
    response: Response,
    session: SessionDep,
    who: TokensOwn,
    page: PageDep,
    include_revoked: bool = False,
) -> list[ApiTokenOut]:
    found = api_tokens.list_tokens(session, who, page, include_revoked)
    send_page(request, response, found)
    return [ApiTokenOut.of(row) for row in found.items]


@router.delete("/api-tokens/{token_id}", response_model=ApiTokenOut, tags=["people"])
def revoke_api_token(token_id: str, session: SessionDep, who: TokensOwn) -> ApiTokenOut:
    return ApiTokenOut.of(api_tokens.revoke(session, who, token_id))

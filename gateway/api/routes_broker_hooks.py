"""The HTTP hooks EMQX calls to authenticate and authorize machines (cluster layout).

EMQX posts JSON built from the body templates in compose/cluster/emqx/emqx.conf and reads the
`result` of the answer. An error status makes EMQX treat the answer as "ignore", so every refusal
here is a 200 with result "deny".
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header

from gateway.api.deps import RuntimeDep, SessionDep
from gateway.broker.emqx import (
    AuthnRequest,
    AuthnResponse,
    AuthzRequest,
    AuthzResponse,
    authenticate,
    authorize,
)
from gateway.errors import Unauthorized
from gateway.runtime import GatewayRuntime
from provisioning.secrets import same_secret

router = APIRouter(prefix="/api/v1/broker", tags=["broker hooks"])


def _check_hook_token(runtime: GatewayRuntime, authorization: str | None) -> None:
    expected = runtime.settings.broker_hook_token
    if expected is None:
        return
    if not authorization or not same_secret(authorization, f"Bearer {expected}"):
        raise Unauthorized("bad_hook_token", "the broker hook needs the configured bearer token")


@router.post("/authn", response_model=AuthnResponse, summary="EMQX: may this client connect?")
def broker_authn(
    body: AuthnRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    authorization: Annotated[str | None, Header()] = None,
) -> AuthnResponse:
    _check_hook_token(runtime, authorization)
    return authenticate(session, body, runtime.settings.topic_prefix)


@router.post("/authz", response_model=AuthzResponse, summary="EMQX: may it publish/subscribe?")
def broker_authz(
    body: AuthzRequest,
    session: SessionDep,
    runtime: RuntimeDep,
    authorization: Annotated[str | None, Header()] = None,
) -> AuthzResponse:
    _check_hook_token(runtime, authorization)
    return authorize(session, body, runtime.settings.topic_prefix)

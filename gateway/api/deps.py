"""FastAPI dependencies: the runtime, a database session, and who is calling."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from gateway.errors import Forbidden, Unauthorized
from gateway.registry import devices, tokens
from gateway.registry.models import Device, Role
from gateway.runtime import GatewayRuntime

_bearer = HTTPBearer(auto_error=False)


def get_runtime(request: Request) -> GatewayRuntime:
    runtime: GatewayRuntime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[GatewayRuntime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with Session(runtime.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


@dataclass(frozen=True)
class Operator:
    token_id: str
    name: str
    role: Role

    @property
    def actor(self) -> str:
        return f"{self.name} ({self.token_id})"


def _bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing_token", "send 'Authorization: Bearer <token>'")
    return credentials.credentials


def require_role(minimum: Role) -> Callable[[SessionDep, BearerDep], Operator]:
    """A dependency that admits operator API tokens of `minimum` role or higher."""

    def dependency(session: SessionDep, credentials: BearerDep) -> Operator:
        row = tokens.authenticate_api_token(session, _bearer_token(credentials))
        role = Role(row.role)
        if role.rank < minimum.rank:
            raise Forbidden(
                "insufficient_role",
                f"this needs the {minimum.value} role; token {row.id} has {role.value}",
            )
        return Operator(row.id, row.name, role)

    return dependency


Viewer = Annotated[Operator, Depends(require_role(Role.viewer))]
OperatorDep = Annotated[Operator, Depends(require_role(Role.operator))]
Admin = Annotated[Operator, Depends(require_role(Role.admin))]


def current_device(session: SessionDep, runtime: RuntimeDep, credentials: BearerDep) -> Device:
    return devices.authenticate_device(
        session, _bearer_token(credentials), runtime.identity.gateway_id
    )


DeviceDep = Annotated[Device, Depends(current_device)]

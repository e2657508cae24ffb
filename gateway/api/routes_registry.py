"""Enrollment, provisioning tokens, devices, API tokens and the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from gateway.api.deps import Admin, DeviceDep, OperatorDep, RuntimeDep, SessionDep, Viewer
from gateway.commands.models import CommandRecord
from gateway.commands.sender import issue
from gateway.errors import Conflict, NotFound
from gateway.registry import audit, devices, tokens
from gateway.registry.devices import EnrollContext
from gateway.registry.schemas import (
    ApiTokenCreate,
    ApiTokenCreated,
    ApiTokenOut,
    AuditOut,
    CommandOut,
    DeviceOut,
    DeviceSelf,
    ProvisioningTokenCreate,
    ProvisioningTokenCreated,
    ProvisioningTokenOut,
)
from provisioning.commands import PingArgs
from provisioning.states import CommandKind
from provisioning.wire import EnrollRequest, EnrollResponse, ErrorBody

_errors: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 503)
}
router = APIRouter(prefix="/api/v1", responses=_errors)


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    status_code=status.HTTP_201_CREATED,
    tags=["agent"],
    summary="Enroll a machine with a provisioning token and its public key",
)
def enroll(body: EnrollRequest, session: SessionDep, runtime: RuntimeDep) -> EnrollResponse:
    ctx = EnrollContext(
        identity=runtime.identity,
        broker=runtime.broker,
        broker_info=runtime.broker_info,
        topic_prefix=runtime.settings.topic_prefix,
    )
    return devices.enroll(session, body, ctx)


@router.get("/agent/self", response_model=DeviceSelf, tags=["agent"], summary="Who am I")
def agent_self(device: DeviceDep) -> DeviceSelf:
    return DeviceSelf(id=device.id, name=device.name, tags=device.tags, state=device.state)


@router.post(
    "/provisioning-tokens",
    response_model=ProvisioningTokenCreated,
    status_code=status.HTTP_201_CREATED,
    tags=["provisioning"],
)
def create_provisioning_token(
    body: ProvisioningTokenCreate, session: SessionDep, runtime: RuntimeDep, who: OperatorDep
) -> ProvisioningTokenCreated:
    issued, row = tokens.create_provisioning_token(
        session,
        actor=who.actor,
        ttl_seconds=body.ttl_seconds,
        max_ttl_seconds=runtime.settings.provisioning_token_max_ttl,
        uses=body.uses,
        tags=body.tags,
        note=body.note,
    )
    return ProvisioningTokenCreated(**ProvisioningTokenOut.of(row).model_dump(), token=issued.token)


@router.get(
    "/provisioning-tokens", response_model=list[ProvisioningTokenOut], tags=["provisioning"]
)
def list_provisioning_tokens(session: SessionDep, _: OperatorDep) -> list[ProvisioningTokenOut]:
    return [ProvisioningTokenOut.of(row) for row in tokens.list_provisioning_tokens(session)]


@router.delete(
    "/provisioning-tokens/{token_id}", response_model=ProvisioningTokenOut, tags=["provisioning"]
)
def revoke_provisioning_token(
    token_id: str, session: SessionDep, who: OperatorDep
) -> ProvisioningTokenOut:
    return ProvisioningTokenOut.of(tokens.revoke_provisioning_token(session, token_id, who.actor))


@router.get("/devices", response_model=list[DeviceOut], tags=["devices"])
def list_devices(
    session: SessionDep,
    _: Viewer,
    include_revoked: Annotated[bool, Query(description="Also list revoked machines.")] = False,
) -> list[DeviceOut]:
    return [DeviceOut.of(d) for d in devices.list_devices(session, include_revoked)]


@router.get("/devices/{device_id}", response_model=DeviceOut, tags=["devices"])
def show_device(device_id: str, session: SessionDep, _: Viewer) -> DeviceOut:
    return DeviceOut.of(devices.get_device(session, device_id))


@router.post(
    "/devices/{device_id}/revoke",
    response_model=DeviceOut,
    tags=["devices"],
    summary="Revoke a machine: its JWTs stop working and the broker disconnects it",
)
def revoke_device(
    device_id: str, session: SessionDep, runtime: RuntimeDep, who: Admin
) -> DeviceOut:
    device = devices.revoke(session, device_id, who.actor, runtime.broker)
    return DeviceOut.of(device)


@router.post(
    "/devices/{device_id}/ping",
    response_model=CommandOut,
    status_code=status.HTTP_202_ACCEPTED,
    tags=["devices"],
    summary="Send a signed ping; follow it with GET /commands/{id}",
)
def ping_device(
    device_id: str, session: SessionDep, runtime: RuntimeDep, who: OperatorDep
) -> CommandOut:
    device = devices.get_device(session, device_id)
    if device.state != "active":
        raise Conflict("device_revoked", f"device {device_id} is revoked")
    record = issue(
        session,
        identity=runtime.identity,
        publisher=runtime.command_publisher(),
        device_id=device.id,
        kind=CommandKind.ping,
        args=PingArgs(),
        lifetime=300,
        actor=who.actor,
    )
    return CommandOut.model_validate(record, from_attributes=True)


@router.get("/commands/{command_id}", response_model=CommandOut, tags=["devices"])
def show_command(command_id: str, session: SessionDep, _: Viewer) -> CommandOut:
    record = session.get(CommandRecord, command_id)
    if record is None:
        raise NotFound("unknown_command", f"no command {command_id!r}")
    return CommandOut.model_validate(record, from_attributes=True)


@router.post(
    "/api-tokens",
    response_model=ApiTokenCreated,
    status_code=status.HTTP_201_CREATED,
    tags=["operators"],
)
def create_api_token(body: ApiTokenCreate, session: SessionDep, who: Admin) -> ApiTokenCreated:
    issued, row = tokens.create_api_token(session, name=body.name, role=body.role, actor=who.actor)
    return ApiTokenCreated(**ApiTokenOut.of(row).model_dump(), token=issued.token)


@router.get("/api-tokens", response_model=list[ApiTokenOut], tags=["operators"])
def list_api_tokens(session: SessionDep, _: Admin) -> list[ApiTokenOut]:
    return [ApiTokenOut.of(row) for row in tokens.list_api_tokens(session)]


@router.delete("/api-tokens/{token_id}", response_model=ApiTokenOut, tags=["operators"])
def revoke_api_token(token_id: str, session: SessionDep, who: Admin) -> ApiTokenOut:
    return ApiTokenOut.of(tokens.revoke_api_token(session, token_id, who.actor))


@router.get("/audit", response_model=list[AuditOut], tags=["audit"])
def audit_log(
    session: SessionDep,
    _: OperatorDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    action: str | None = None,
    target: str | None = None,
) -> list[AuditOut]:
    return [
        AuditOut.model_validate(e, from_attributes=True)
        for e in audit.recent(session, limit, action, target)
    ]

"""Enrollment, what an agent learns about itself, provisioning tokens and the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from sqlmodel import col, select

from gateway.accounts import customers, scoping
from gateway.api.auth import AuditRead, DeviceDep, Provision
from gateway.api.deps import RuntimeDep, SessionDep
from gateway.api.pages import PageDep, send_page
from gateway.errors import Conflict, Invalid, Unauthorized
from gateway.pagination import SortKey, paginate
from gateway.registry import devices, tokens
from gateway.registry.devices import EnrollContext
from gateway.registry.models import AuditEvent, ProvisioningToken
from gateway.registry.schemas import (
    AuditOut,
    DeviceSelf,
    ProvisioningTokenCreate,
    ProvisioningTokenCreated,
    ProvisioningTokenOut,
)
from provisioning.wire import EnrollRequest, EnrollResponse, ErrorBody

_errors: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 422, 429, 503)
}
router = APIRouter(prefix="/api/v1", responses=_errors)


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    response_model_exclude_unset=True,  # no claim_code key for a customer's machine
    status_code=status.HTTP_201_CREATED,
    tags=["agent"],
    summary="Enroll a machine with a provisioning token and its public key",
)
def enroll(
    body: EnrollRequest, session: SessionDep, runtime: RuntimeDep, request: Request
) -> EnrollResponse:
    ctx = EnrollContext(
        identity=runtime.identity,
        broker=runtime.broker,
        broker_info=runtime.broker_info,
        topic_prefix=runtime.settings.topic_prefix,
    )
    guard = runtime.enrollments()
    address = request.client.host if request.client else "unknown"
    guard.check(address)
    try:
        return devices.enroll(session, body, ctx)
    except (Unauthorized, Invalid, Conflict) as exc:
        guard.failed(session, address, exc)
        raise


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
    body: ProvisioningTokenCreate, session: SessionDep, runtime: RuntimeDep, who: Provision
) -> ProvisioningTokenCreated:
    customer = customers.resolve(session, who, body.customer) if body.customer else None
    issued, row = tokens.create_provisioning_token(
        session,
        actor=who.actor,
        ttl_seconds=body.ttl_seconds,
        max_ttl_seconds=runtime.settings.provisioning_token_max_ttl,
        uses=body.uses,
        tags=body.tags,
        note=body.note,
        customer_id=customer.id if customer else None,
    )
    return ProvisioningTokenCreated(**ProvisioningTokenOut.of(row).model_dump(), token=issued.token)


@router.get(
    "/provisioning-tokens", response_model=list[ProvisioningTokenOut], tags=["provisioning"]
)
def list_provisioning_tokens(
    request: Request, response: Response, session: SessionDep, _: Provision, page: PageDep
) -> list[ProvisioningTokenOut]:
    keys = [
        SortKey(col(ProvisioningToken.created_at), True),
        SortKey(col(ProvisioningToken.id), True),
    ]
    found = paginate(session, select(ProvisioningToken), keys, page, lambda t: (t.created_at, t.id))
    send_page(request, response, found)
    return [ProvisioningTokenOut.of(row) for row in found.items]


@router.delete(
    "/provisioning-tokens/{token_id}", response_model=ProvisioningTokenOut, tags=["provisioning"]
)
def revoke_provisioning_token(
    token_id: str, session: SessionDep, who: Provision
) -> ProvisioningTokenOut:
    return ProvisioningTokenOut.of(tokens.revoke_provisioning_token(session, token_id, who.actor))


@router.get(
    "/audit",
    response_model=list[AuditOut],
    tags=["audit"],
    summary="The audit log, newest first (a customer's admin: what concerns its customer)",
)
def audit_log(
    request: Request,
    response: Response,
    session: SessionDep,
    who: AuditRead,
    page: PageDep,
    action: Annotated[str | None, Query(max_length=64)] = None,
    target: Annotated[str | None, Query(max_length=128)] = None,
    device: Annotated[
        str | None, Query(max_length=64, description="Only events about this machine (name or id).")
    ] = None,
) -> list[AuditOut]:
    query = select(AuditEvent)
    if who.is_customer:
        query = query.where(AuditEvent.customer_id == who.customer_id)
    if action:
        query = query.where(AuditEvent.action == action)
    if target:
        query = query.where(AuditEvent.target == target)
    if device:
        query = query.where(AuditEvent.target == scoping.resolve_device(session, who, device).id)
    found = paginate(session, query, [SortKey(col(AuditEvent.id), True)], page, lambda e: (e.id,))
    send_page(request, response, found)
    return [AuditOut.model_validate(e, from_attributes=True) for e in found.items]

"""Machines: list with filters, show with health, rename, tag, assign, claim, revoke, ping.

Every `{device}` in a path is the machine's id or its name (see `gateway.accounts.scoping`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlmodel import Session

from gateway.accounts import customers, scoping
from gateway.accounts.principal import Principal
from gateway.api.auth import FleetAssign, FleetClaim, FleetLabel, FleetPing, FleetRead, FleetRevoke
from gateway.api.deps import RuntimeDep, SessionDep
from gateway.api.pages import PageDep, send_page
from gateway.commands.models import CommandRecord
from gateway.commands.sender import issue
from gateway.errors import Conflict, Invalid, NotFound
from gateway.registry import devices, machines, ownership
from gateway.registry.models import Device
from gateway.registry.schemas import CommandOut, DeviceOut
from provisioning.commands import PingArgs
from provisioning.states import CommandKind
from provisioning.wire import DeviceName, ErrorBody, Tags

_errors: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422)
}
router = APIRouter(prefix="/api/v1", responses=_errors, tags=["devices"])


def device_out(session: Session, device: Device) -> DeviceOut:
    return devices_out(session, [device])[0]


def devices_out(session: Session, found: list[Device]) -> list[DeviceOut]:
    names = customers.names(session, {d.customer_id for d in found if d.customer_id})
    releases = machines.current_releases(session, [d.id for d in found])
    return [DeviceOut.of(d, names.get(d.customer_id or ""), releases.get(d.id)) for d in found]


_PART = r"[^=,]*[^=,\s][^=,]*=[^,]*"
TAG_SELECTOR_PATTERN = f"^{_PART}(,{_PART})*$"
"""What `parse_tag_selector` reads: comma-separated KEY=VALUE, each key not blank."""


def parse_tag_selector(items: list[str]) -> dict[str, str]:
    """['site=plant-3', 'line=A,shift=2'] -> tags (the syntax of `flows push --to`)."""
    tags: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise Invalid("bad_tag_selector", f"a tag selector is KEY=VALUE, not {part!r}")
            tags[key.strip()] = value.strip()
    return tags


@router.get(
    "/devices",
    response_model=list[DeviceOut],
    summary="Machines, oldest enrollment first, filtered and paginated",
)
def list_devices(
    request: Request,
    response: Response,
    session: SessionDep,
    who: FleetRead,
    page: PageDep,
    tag: Annotated[
        list[Annotated[str, StringConstraints(pattern=TAG_SELECTOR_PATTERN)]],
        Query(description="KEY=VALUE (repeat, or comma-separate): all must match."),
    ] = [],  # noqa: B006  (FastAPI copies defaults)
    online: Annotated[bool | None, Query(description="Only online (true) or offline.")] = None,
    customer: Annotated[
        str | None, Query(max_length=64, description="A customer's name or id, or 'stock'.")
    ] = None,
    name_prefix: Annotated[str | None, Query(max_length=64)] = None,
    include_revoked: Annotated[bool, Query(description="Also list revoked machines.")] = False,
) -> list[DeviceOut]:
    where = machines.DeviceFilter(
        tags=parse_tag_selector(tag),
        online=online,
        customer=customer,
        name_prefix=name_prefix,
        include_revoked=include_revoked,
    )
    found = machines.list_devices(session, who, where, page)
    send_page(request, response, found)
    return devices_out(session, found.items)


@router.get(
    "/devices/{device}",
    response_model=DeviceOut,
    summary="One machine, with its health (last seen, Node-RED, outbox, versions, release)",
)
def show_device(device: str, session: SessionDep, who: FleetRead) -> DeviceOut:
    return device_out(session, scoping.resolve_device(session, who, device))


class RenameBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: DeviceName


@router.post("/devices/{device}/rename", response_model=DeviceOut, summary="Rename a machine")
def rename_device(device: str, body: RenameBody, session: SessionDep, who: FleetLabel) -> DeviceOut:
    return device_out(session, machines.rename(session, who, device, body.name))


class TagBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    set: Tags = Field(default_factory=dict, description="Tags to add or change.")
    remove: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=100, description="Tag keys to remove."
    )


@router.post(
    "/devices/{device}/tags", response_model=DeviceOut, summary="Set and remove a machine's tags"
)
def tag_device(device: str, body: TagBody, session: SessionDep, who: FleetLabel) -> DeviceOut:
    return device_out(session, machines.retag(session, who, device, body.set, body.remove))


class AssignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer: str | None = Field(
        max_length=64, description="The new owner (name or id); null: back into stock."
    )


class AssignOut(DeviceOut):
    claim_code: str | None = Field(
        default=None, description="Back in stock: its new claim code, shown only now."
    )


@router.post(
    "/devices/{device}/assign",
    response_model=AssignOut,
    summary="Give a machine to a customer, or take it back into stock (new claim code)",
)
def assign_device(
    device: str, body: AssignBody, session: SessionDep, who: FleetAssign
) -> AssignOut:
    row, code = ownership.assign(session, who, device, body.customer)
    return AssignOut(**device_out(session, row).model_dump(), claim_code=code)


class ClaimBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(max_length=64, description="The claim code on the machine's label.")


@router.post(
    "/devices/claim",
    response_model=DeviceOut,
    summary="Claim a machine from stock with the code on its label (a customer-admin)",
)
def claim_device(body: ClaimBody, session: SessionDep, who: FleetClaim) -> DeviceOut:
    return device_out(session, ownership.claim(session, who, body.code))


@router.post(
    "/devices/{device}/revoke",
    response_model=DeviceOut,
    summary="Revoke a machine: its JWTs stop working and the broker disconnects it",
)
def revoke_device(
    device: str, session: SessionDep, runtime: RuntimeDep, who: FleetRevoke
) -> DeviceOut:
    row = scoping.resolve_device(session, who, device)
    return device_out(session, devices.revoke(session, row.id, who.actor, runtime.broker))


@router.post(
    "/devices/{device}/ping",
    response_model=CommandOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Send a signed ping; follow it with GET /commands/{id}",
)
def ping_device(
    device: str, session: SessionDep, runtime: RuntimeDep, who: FleetPing
) -> CommandOut:
    row = scoping.resolve_device(session, who, device)
    if row.state != "active":
        raise Conflict("device_revoked", f"device {row.id} is revoked")
    record = issue(
        session,
        identity=runtime.identity,
        publisher=runtime.command_publisher(),
        device_id=row.id,
        kind=CommandKind.ping,
        args=PingArgs(),
        lifetime=300,
        actor=who.actor,
    )
    return CommandOut.model_validate(record, from_attributes=True)


def visible_command(session: Session, who: Principal, command_id: str) -> CommandRecord:
    record = session.get(CommandRecord, command_id)
    device = session.get(Device, record.device_id) if record else None
    if record is None or device is None or not scoping.sees(who, device):
        raise NotFound("unknown_command", f"no command {command_id!r}")
    return record


@router.get("/commands/{command_id}", response_model=CommandOut)
def show_command(command_id: str, session: SessionDep, who: FleetRead) -> CommandOut:
    record = visible_command(session, who, command_id)
    return CommandOut.model_validate(record, from_attributes=True)


class DeviceDeploymentOut(BaseModel):
    deployment_id: str
    release: str
    state: str
    error: str | None
    created_at: str
    finished_at: str | None


@router.get(
    "/devices/{device}/deployments",
    response_model=list[DeviceDeploymentOut],
    summary="What each deployment that reached this machine did on it, newest first",
)
def device_deployments(
    device: str,
    request: Request,
    response: Response,
    session: SessionDep,
    who: FleetRead,
    page: PageDep,
) -> list[DeviceDeploymentOut]:
    _, found = machines.deployment_records(session, who, device, page)
    send_page(request, response, found)
    return [
        DeviceDeploymentOut(
            deployment_id=deployment.id,
            release=deployment.release_digest,
            state=record.state,
            error=record.error,
            created_at=deployment.created_at.isoformat(),
            finished_at=record.finished_at.isoformat() if record.finished_at else None,
        )
        for record, deployment in found.items
    ]

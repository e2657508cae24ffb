"""Machines as people look for them: filtered, paginated lists, renames, tags, health.

Every function takes the caller (`Principal`) and narrows through `gateway.accounts.scoping`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.accounts import customers, scoping
from gateway.accounts.principal import Principal
from gateway.errors import Invalid
from gateway.flows.models import Deployment, DeploymentDevice
from gateway.pagination import Page, PageRequest, SortKey, finish, keyset, paginate
from gateway.registry import audit
from gateway.registry.models import Device, DeviceState
from provisioning.states import DeviceDeployState

STOCK = "stock"


@dataclass(frozen=True)
class DeviceFilter:
    """What `devices list` may ask for; every part narrows (AND)."""

    tags: dict[str, str] = field(default_factory=dict)
    online: bool | None = None
    customer: str | None = None  # a customer's name or id, or "stock"
    name_prefix: str | None = None
    include_revoked: bool = False


def list_devices(
    session: Session, who: Principal, where: DeviceFilter, page: PageRequest
) -> Page[Device]:
    query = scoping.devices(select(Device), who)
    if not where.include_revoked:
        query = query.where(Device.state == DeviceState.active)
    if where.online is not None:
        query = query.where(Device.online == where.online)
    if where.name_prefix:
        query = query.where(col(Device.name).startswith(where.name_prefix, autoescape=True))
    if where.customer == STOCK:
        query = query.where(col(Device.customer_id).is_(None))
    elif where.customer:
        query = query.where(
            Device.customer_id == customers.resolve(session, who, where.customer).id
        )
    tags = Device.__table__.c.tags  # type: ignore[attr-defined]
    for key, value in sorted(where.tags.items()):
        query = query.where(tags[key].as_string() == value)
    keys = [SortKey(col(Device.enrolled_at)), SortKey(col(Device.id))]
    return paginate(session, query, keys, page, lambda d: (d.enrolled_at, d.id))


def rename(session: Session, who: Principal, ref: str, name: str) -> Device:
    device = scoping.resolve_device(session, who, ref)
    if name == device.name:
        return device
    scoping.check_name_free(session, name, device.customer_id, except_id=device.id)
    previous, device.name = device.name, name
    session.add(device)
    audit.record(session, who.actor, "device.rename", device.id, name=name, previous=previous)
    session.commit()
    return device


def retag(
    session: Session, who: Principal, ref: str, set_tags: dict[str, str], remove: list[str]
) -> Device:
    """Set some tags and remove others (a key both set and removed is an error)."""
    both = sorted(set(set_tags) & set(remove))
    if both:
        raise Invalid("tag_set_and_removed", f"tag {', '.join(both)} is both set and removed")
    device = scoping.resolve_device(session, who, ref)
    tags = {k: v for k, v in device.tags.items() if k not in remove} | set_tags
    if tags != device.tags:
        before = dict(device.tags)
        device.tags = tags
        session.add(device)
        audit.record(session, who.actor, "device.tag", device.id, tags=tags, previous=before)
        session.commit()
    return device


def current_releases(session: Session, device_ids: list[str]) -> dict[str, str]:
    """Per machine: the release its latest succeeded deployment put on it."""
    if not device_ids:
        return {}
    table = DeploymentDevice.__table__  # type: ignore[attr-defined]
    deployments = Deployment.__table__  # type: ignore[attr-defined]
    latest = (
        sa.select(table.c.device_id, sa.func.max(table.c.finished_at).label("at"))
        .where(table.c.device_id.in_(device_ids), table.c.state == DeviceDeployState.succeeded)
        .group_by(table.c.device_id)
        .subquery()
    )
    query = (
        sa.select(table.c.device_id, deployments.c.release_digest)
        .join(deployments, deployments.c.id == table.c.deployment_id)
        .join(
            latest,
            sa.and_(latest.c.device_id == table.c.device_id, latest.c.at == table.c.finished_at),
        )
        .where(table.c.state == DeviceDeployState.succeeded)
    )
    return {device: digest for device, digest in session.execute(query)}


def deployment_records(
    session: Session, who: Principal, ref: str, page: PageRequest
) -> tuple[Device, Page[tuple[DeploymentDevice, Deployment]]]:
    """A machine's part in each deployment that reached it, newest first."""
    device = scoping.resolve_device(session, who, ref)
    query = (
        select(DeploymentDevice, Deployment)
        .join(Deployment, col(Deployment.id) == col(DeploymentDevice.deployment_id))
        .where(DeploymentDevice.device_id == device.id)
    )
    keys = [SortKey(col(Deployment.created_at), True), SortKey(col(Deployment.id), True)]
    rows = [(record, deployment) for record, deployment in session.exec(keyset(query, keys, page))]
    return device, finish(rows, page, lambda r: (r[1].created_at, r[1].id))

"""Deployments: a release sent to a target in waves, with a record per device.

Creating a deployment plans it (devices, waves, thresholds) and stores every device as `pending`;
the rollout scheduler sends the commands wave by wave. Cancelling stops the waves that have not
started and refuses the bundle to devices whose command has not been picked up yet; a device
already applying the release finishes (a half-applied flow would be worse).

Agents fetch bundles and module tarballs here too, and only for deployments that target them.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.db import utcnow
from gateway.errors import Conflict, Forbidden, Gone, Invalid, NotFound
from gateway.flows.models import Deployment, DeploymentDevice, FlowModule, FlowRelease
from gateway.flows.module_cache import get_module
from gateway.flows.releases import resolve_digest
from gateway.flows.targets import Share, Target, parse_percent, plan_waves, select_devices
from gateway.pagination import Page, PageRequest, SortKey, paginate
from gateway.registry import audit
from gateway.registry.models import Device
from provisioning.jwt_rules import MAX_COMMAND_LIFETIME
from provisioning.states import DeploymentState, DeviceDeployState

__all__ = [
    "DeploymentPlan",
    "bundle_for_device",
    "cancel_deployment",
    "create_deployment",
    "get_deployment",
    "list_deployments",
    "module_for_device",
    "state_counts",
]

DEFAULT_MIN_FINISHED: Final = 5
_ID_ALPHABET: Final = "abcdefghijkmnpqrstuvwxyz23456789"


@dataclass(frozen=True)
class DeploymentPlan:
    """What an operator asks for; `create_deployment` resolves it against the fleet."""

    release: str
    target: Target
    canary: str | None = None
    wave: str | None = None
    max_failures: str = "10%"
    min_finished: int | None = None
    timeout_seconds: int = 600
    force: bool = False


def new_deployment_id() -> str:
    return "dep-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def create_deployment(session: Session, plan: DeploymentPlan, actor: str) -> Deployment:
    """Plan a deployment and store it with every device pending; the scheduler sends it."""
    if not 1 <= plan.timeout_seconds <= MAX_COMMAND_LIFETIME:
        raise Invalid("bad_timeout", f"the timeout must be 1s to {MAX_COMMAND_LIFETIME}s (7 days)")
    digest = resolve_digest(session, plan.release)
    canary = Share.parse(plan.canary, "--canary") if plan.canary else None
    wave = Share.parse(plan.wave, "--wave") if plan.wave else None
    max_failures = parse_percent(plan.max_failures, "--max-failures")
    devices = select_devices(session, plan.target)
    total = len(devices)
    canary_size = canary.of(total) if canary else 0
    wave_size = wave.of(total) if wave else 0
    sizes = plan_waves(total, canary_size, wave_size)
    min_finished = plan.min_finished or (
        canary_size if canary_size else min(DEFAULT_MIN_FINISHED, total)
    )
    now = utcnow()
    deployment = Deployment(
        id=new_deployment_id(),
        release_digest=digest,
        target=plan.target.model_dump(exclude_none=True, exclude_defaults=True) or {"all": True},
        target_text=plan.target.describe(),
        force=plan.force,
        device_count=total,
        canary_size=canary_size,
        wave_size=wave_size or (sizes[-1] if sizes else 0),
        wave_count=len(sizes),
        max_failures_pct=max_failures,
        min_finished=max(1, min(min_finished, total)),
        timeout_seconds=plan.timeout_seconds,
        state=DeploymentState.running,
        created_at=now,
        created_by=actor[:80],
        updated_at=now,
    )
    session.add(deployment)
    session.flush()
    rows = []
    position = 0
    for wave_index, size in enumerate(sizes):
        for device in devices[position : position + size]:
            rows.append(
                {
                    "deployment_id": deployment.id,
                    "device_id": device.id,
                    "wave": wave_index,
                    "position": position,
                    "state": DeviceDeployState.pending,
                    "updated_at": now,
                }
            )
            position += 1
    session.execute(sa.insert(DeploymentDevice), rows)
    audit.record(
        session,
        actor,
        "flows.deploy",
        deployment.id,
        release=digest,
        to=deployment.target_text,
        devices=total,
        waves=sizes,
        force=plan.force,
    )
    session.commit()
    return deployment


def get_deployment(session: Session, deployment_id: str) -> Deployment:
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFound("unknown_deployment", f"no deployment {deployment_id!r}")
    return deployment


def list_deployments(session: Session, page: PageRequest) -> Page[Deployment]:
    """Newest first, a page at a time (`gateway.pagination`)."""
    keys = [SortKey(col(Deployment.created_at), True), SortKey(col(Deployment.id), True)]
    return paginate(session, select(Deployment), keys, page, lambda d: (d.created_at, d.id))


def device_records(session: Session, deployment_id: str) -> list[tuple[DeploymentDevice, str]]:
    """Every device of a deployment in plan order, with the device's name."""
    query = (
        select(DeploymentDevice, Device.name)
        .join(Device, col(Device.id) == col(DeploymentDevice.device_id))
        .where(DeploymentDevice.deployment_id == deployment_id)
        .order_by(col(DeploymentDevice.position))
    )
    return [(row, name) for row, name in session.exec(query)]


def state_counts(session: Session, deployment_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per deployment: how many devices are in each state (states with none are left out)."""
    ids = list(deployment_ids)
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    if not ids:
        return counts
    table = DeploymentDevice.__table__  # type: ignore[attr-defined]
    query = (
        sa.select(table.c.deployment_id, table.c.state, sa.func.count())
        .where(table.c.deployment_id.in_(ids))
        .group_by(table.c.deployment_id, table.c.state)
    )
    for deployment_id, state, count in session.execute(query):
        counts[deployment_id][state] = int(count)
    return counts


def cancel_deployment(session: Session, deployment_id: str, actor: str) -> Deployment:
    """Stop a running deployment: no further commands; devices not started are cancelled."""
    deployment = session.exec(
        select(Deployment).where(Deployment.id == deployment_id).with_for_update()
    ).first()
    if deployment is None:
        raise NotFound("unknown_deployment", f"no deployment {deployment_id!r}")
    if deployment.state != DeploymentState.running:
        raise Conflict(
            "deployment_finished",
            f"deployment {deployment_id} is already {deployment.state}; nothing to cancel",
        )
    now = utcnow()
    deployment.state = DeploymentState.cancelled
    deployment.reason = f"cancelled by {actor}"
    deployment.finished_at = now
    deployment.updated_at = now
    session.add(deployment)
    table = DeploymentDevice.__table__  # type: ignore[attr-defined]
    result = session.execute(
        sa.update(table)
        .where(
            table.c.deployment_id == deployment_id,
            table.c.state.in_([DeviceDeployState.pending, DeviceDeployState.sent]),
        )
        .values(
            state=DeviceDeployState.cancelled,
            error=f"the deployment was cancelled by {actor} before this device started",
            finished_at=now,
            updated_at=now,
        )
    )
    audit.record(
        session,
        actor,
        "flows.cancel",
        deployment_id,
        release=deployment.release_digest,
        devices_cancelled=int(result.rowcount),  # type: ignore[attr-defined]
    )
    session.commit()
    return deployment


# ---- what agents may fetch ------------------------------------------------------------------


def bundle_for_device(
    session: Session, device: Device, digest: str, deployment_id: str | None
) -> bytes:
    """The bundle of `digest`, if a deployment of that release targets `device`.

    With `deployment_id`, that deployment must be the one and still usable for this device
    (not cancelled, not timed out), so a command delivered late is not applied. One query:
    every device of a rollout asks at about the same time.
    """
    deployments = Deployment.__table__  # type: ignore[attr-defined]
    targets = DeploymentDevice.__table__  # type: ignore[attr-defined]
    release = FlowRelease.__table__  # type: ignore[attr-defined]
    query = (
        sa.select(
            deployments.c.id,
            deployments.c.state,
            targets.c.state,
            targets.c.deadline_at,
            release.c.bundle,
        )
        .join(targets, targets.c.deployment_id == deployments.c.id)
        .join(release, release.c.digest == deployments.c.release_digest)
        .where(targets.c.device_id == device.id, deployments.c.release_digest == digest)
        .limit(1)
    )
    if deployment_id is not None:
        query = query.where(deployments.c.id == deployment_id)
    found = session.execute(query).first()
    if found is None:
        raise Forbidden(
            "not_targeted",
            f"no deployment of release {digest} targets device {device.id}",
        )
    found_id, deployment_state, device_state, deadline, bundle = found
    if deployment_id is not None:
        if DeploymentState.cancelled in (deployment_state, device_state):
            raise Gone(
                "deployment_cancelled", f"deployment {found_id} was cancelled; do not apply it"
            )
        if deadline is not None and utcnow() > deadline:
            raise Gone(
                "deployment_timed_out",
                f"deployment {found_id} timed out for this device at {deadline.isoformat()}; "
                "do not apply it",
            )
    return bytes(bundle)


def module_for_device(session: Session, device: Device, sha256: str) -> FlowModule:
    """A cached module tarball, if a deployment targeting `device` needs that module."""
    module = get_module(session, sha256)
    ref = f"{module.name}@{module.version}"
    query = (
        select(FlowRelease.modules)
        .join(Deployment, col(Deployment.release_digest) == col(FlowRelease.digest))
        .join(DeploymentDevice, col(DeploymentDevice.deployment_id) == col(Deployment.id))
        .where(
            DeploymentDevice.device_id == device.id,
            DeploymentDevice.state != DeviceDeployState.cancelled,
        )
    )
    if not any(ref in modules for modules in session.exec(query)):
        raise Forbidden(
            "not_targeted", f"no deployment targeting device {device.id} needs module {ref}"
        )
    return module


def waves_started(session: Session, deployment_ids: Iterable[str]) -> dict[str, int]:
    """Per deployment: how many waves have been sent (0 before the first)."""
    ids = list(deployment_ids)
    if not ids:
        return {}
    table = DeploymentDevice.__table__  # type: ignore[attr-defined]
    query = (
        sa.select(table.c.deployment_id, sa.func.max(table.c.wave))
        .where(table.c.deployment_id.in_(ids), table.c.sent_at.is_not(None))
        .group_by(table.c.deployment_id)
    )
    return {deployment_id: int(top) + 1 for deployment_id, top in session.execute(query)}

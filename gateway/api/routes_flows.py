"""Flow pushes over HTTP: releases, the module cache, deployments; and what agents fetch."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, Request, Response, status

from gateway.api.auth import DeviceDep, FlowsRead, FlowsWrite
from gateway.api.deps import SessionDep
from gateway.api.pages import PageDep, send_page
from gateway.flows import deployments, module_cache, releases
from gateway.flows.deployments import DeploymentPlan
from gateway.flows.schemas import (
    DeploymentCreate,
    DeploymentDetail,
    DeploymentDeviceOut,
    DeploymentOut,
    ModuleAdded,
    ModuleOut,
    ReleaseCreate,
    ReleaseCreated,
    ReleaseOut,
)
from provisioning.wire import ErrorBody

_errors: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 409, 410, 413, 422)
}
router = APIRouter(prefix="/api/v1", responses=_errors)

_SHA256 = r"^[0-9a-f]{64}$"
_DIGEST = r"^sha256:[0-9a-f]{64}$"


# ---- releases -------------------------------------------------------------------------------


@router.post(
    "/flows/releases",
    response_model=ReleaseCreated,
    status_code=status.HTTP_201_CREATED,
    tags=["flows"],
    summary="Store a release (a flows file and the modules it needs) under its sha256 digest",
    responses={200: {"model": ReleaseCreated, "description": "The same release existed"}},
)
def create_release(
    body: ReleaseCreate, session: SessionDep, who: FlowsWrite, response: Response
) -> ReleaseCreated:
    row, created = releases.create_release(
        session, body.flows_json, body.modules, body.notes, who.actor
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return ReleaseCreated(**ReleaseOut.of(row).model_dump(), created=created)


@router.get("/flows/releases", response_model=list[ReleaseOut], tags=["flows"])
def list_releases(
    request: Request, response: Response, session: SessionDep, _: FlowsRead, page: PageDep
) -> list[ReleaseOut]:
    found = releases.list_releases(session, page)
    send_page(request, response, found)
    return [ReleaseOut.of(item) for item in found.items]


@router.get(
    "/flows/releases/{ref}",
    response_model=ReleaseOut,
    tags=["flows"],
    summary="One release, by digest or a unique prefix of its hex digits",
)
def show_release(ref: str, session: SessionDep, _: FlowsRead) -> ReleaseOut:
    return ReleaseOut.of(releases.get_release(session, ref))


# ---- module cache ---------------------------------------------------------------------------


@router.post(
    "/flows/modules",
    response_model=ModuleAdded,
    status_code=status.HTTP_201_CREATED,
    tags=["flows"],
    summary="Add a node module tarball (`npm pack` output) to the gateway's module cache",
    responses={200: {"model": ModuleAdded, "description": "The same tarball was cached"}},
)
def add_module(
    data: Annotated[
        bytes,
        Body(
            media_type="application/octet-stream",
            description="The tarball's bytes; name and version are read from its package.json.",
        ),
    ],
    session: SessionDep,
    who: FlowsWrite,
    response: Response,
    sha256: Annotated[
        str | None,
        Query(description="The tarball's sha256 (hex); the upload is refused if it differs."),
    ] = None,
) -> ModuleAdded:
    module, created = module_cache.add_module(session, data, who.actor, sha256)
    if not created:
        response.status_code = status.HTTP_200_OK
    return ModuleAdded(**ModuleOut.of(module).model_dump(), created=created)


@router.get("/flows/modules", response_model=list[ModuleOut], tags=["flows"])
def list_modules(
    request: Request, response: Response, session: SessionDep, _: FlowsRead, page: PageDep
) -> list[ModuleOut]:
    found = module_cache.list_modules(session, page)
    send_page(request, response, found)
    return [ModuleOut.of(item) for item in found.items]


# ---- deployments ----------------------------------------------------------------------------


def _detail(session: SessionDep, deployment_id: str) -> DeploymentDetail:
    row = deployments.get_deployment(session, deployment_id)
    counts = deployments.state_counts(session, [row.id]).get(row.id, {})
    started = deployments.waves_started(session, [row.id]).get(row.id, 0)
    devices = [
        DeploymentDeviceOut.of(record, name)
        for record, name in deployments.device_records(session, row.id)
    ]
    return DeploymentDetail(**DeploymentOut.of(row, counts, started).model_dump(), devices=devices)


@router.post(
    "/deployments",
    response_model=DeploymentDetail,
    status_code=status.HTTP_201_CREATED,
    tags=["flows"],
    summary="Send a release to devices, tags or the whole fleet, in waves",
)
def create_deployment(
    body: DeploymentCreate, session: SessionDep, who: FlowsWrite
) -> DeploymentDetail:
    plan = DeploymentPlan(
        release=body.release,
        target=body.to,
        canary=body.canary,
        wave=body.wave,
        max_failures=body.max_failures,
        min_finished=body.min_finished,
        timeout_seconds=body.timeout_seconds,
        force=body.force,
    )
    row = deployments.create_deployment(session, plan, who.actor)
    return _detail(session, row.id)


@router.get("/deployments", response_model=list[DeploymentOut], tags=["flows"])
def list_deployments(
    request: Request, response: Response, session: SessionDep, _: FlowsRead, page: PageDep
) -> list[DeploymentOut]:
    found = deployments.list_deployments(session, page)
    send_page(request, response, found)
    rows = found.items
    ids = [row.id for row in rows]
    counts = deployments.state_counts(session, ids)
    started = deployments.waves_started(session, ids)
    return [DeploymentOut.of(r, counts.get(r.id, {}), started.get(r.id, 0)) for r in rows]


@router.get(
    "/deployments/{deployment_id}",
    response_model=DeploymentDetail,
    tags=["flows"],
    summary="A deployment with every device's state, timings and error",
)
def show_deployment(deployment_id: str, session: SessionDep, _: FlowsRead) -> DeploymentDetail:
    return _detail(session, deployment_id)


@router.post(
    "/deployments/{deployment_id}/cancel",
    response_model=DeploymentDetail,
    tags=["flows"],
    summary="Stop a deployment: no more waves; devices that have not started are cancelled",
)
def cancel_deployment(deployment_id: str, session: SessionDep, who: FlowsWrite) -> DeploymentDetail:
    deployments.cancel_deployment(session, deployment_id, who.actor)
    return _detail(session, deployment_id)


# ---- for agents -----------------------------------------------------------------------------


@router.get(
    "/agent/bundles/{digest}",
    tags=["agent"],
    summary="The bundle of a release, for a device a deployment of it targets",
    response_class=Response,
    responses={200: {"content": {"application/json": {}}, "description": "The bundle"}},
)
def agent_bundle(
    digest: Annotated[str, Path(pattern=_DIGEST)],
    session: SessionDep,
    device: DeviceDep,
    deployment: Annotated[
        str | None,
        Query(description="The deployment being applied; refused if cancelled or timed out."),
    ] = None,
) -> Response:
    data = deployments.bundle_for_device(session, device, digest, deployment)
    return Response(
        content=data,
        media_type="application/json",
        headers={"ETag": f'"{digest}"', "Cache-Control": "private, max-age=31536000, immutable"},
    )


@router.get(
    "/agent/modules/{sha256}",
    tags=["agent"],
    summary="A node module tarball from the cache, for a device a deployment needs it on",
    response_class=Response,
    responses={200: {"content": {"application/gzip": {}}, "description": "The tarball"}},
)
def agent_module(
    sha256: Annotated[str, Path(pattern=_SHA256)], session: SessionDep, device: DeviceDep
) -> Response:
    module = deployments.module_for_device(session, device, sha256)
    return Response(
        content=module.data,
        media_type="application/gzip",
        headers={"ETag": f'"{module.sha256}"'},
    )

"""Request and response bodies of the flow-push API (they make its part of the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway.flows.models import Deployment, DeploymentDevice, FlowRelease
from gateway.flows.module_cache import ModuleSummary
from gateway.flows.releases import ReleaseSummary
from gateway.flows.targets import Target
from provisioning.bundles import MAX_FLOWS_BYTES
from provisioning.jwt_rules import MAX_COMMAND_LIFETIME

RELEASE_REF_PATTERN = r"^(?:sha256:)?[0-9a-f]{6,64}$"
"""A release digest, or a unique prefix of its hex digits (at least 6)."""

ShareText = Annotated[str, StringConstraints(pattern=r"^\s*\d+(\.\d+)?\s*%?\s*$", max_length=16)]
PercentText = Annotated[str, StringConstraints(pattern=r"^\s*\d+(\.\d+)?\s*%\s*$", max_length=16)]


class ReleaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flows_json: str = Field(
        max_length=2 * MAX_FLOWS_BYTES,
        description="The Node-RED flows file as exported by the editor (a JSON array), as text.",
    )
    modules: list[str] = Field(
        default_factory=list,
        max_length=200,
        description="Node modules the flows need, each name@exact-version.",
    )
    notes: str = Field(default="", max_length=4000)
    allow_empty: bool = Field(
        default=False,
        description="Accept a flows file with no nodes (`[]`): deploying it removes every flow "
        "from the machines, so it must be asked for.",
    )


class ReleaseOut(BaseModel):
    digest: str = Field(description="sha256:<hex> of the canonical bundle; the release's id.")
    size: int
    node_count: int
    modules: list[str]
    node_types: list[str]
    unprovided_types: list[str] = Field(
        description="Non-core node types no listed (cached) module provides, at release time."
    )
    warnings: list[str]
    notes: str
    created_at: datetime
    created_by: str

    @classmethod
    def of(cls, item: FlowRelease | ReleaseSummary) -> ReleaseOut:
        return cls.model_validate(item, from_attributes=True)


class ReleaseCreated(ReleaseOut):
    created: bool = Field(description="False if the same release existed already (same digest).")


class ModuleOut(BaseModel):
    sha256: str
    name: str
    version: str
    size: int
    node_types: list[str] = Field(description="Node types the module registers.")

    @classmethod
    def of(cls, item: ModuleSummary) -> ModuleOut:
        return cls.model_validate(item, from_attributes=True)


class ModuleAdded(ModuleOut):
    created: bool = Field(description="False if the same tarball was in the cache already.")


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    release: str = Field(
        pattern=RELEASE_REF_PATTERN,
        description="A release digest, or a unique prefix of its hex digits.",
    )
    to: Target
    canary: ShareText | None = Field(
        default=None, description="First wave: N devices or P% of the target."
    )
    wave: ShareText | None = Field(
        default=None, description="Later waves: N devices or P% each (default: all the rest)."
    )
    max_failures: PercentText = Field(
        default="10%",
        description="Abort when more than this share of finished devices did not succeed.",
    )
    min_finished: int | None = Field(
        default=None,
        ge=1,
        description="Devices that must have finished before the threshold applies (default: "
        "the canary size, or 5).",
    )
    timeout_seconds: int = Field(
        default=600,
        ge=1,
        le=MAX_COMMAND_LIFETIME,
        description="A device that has not finished this long after its command was sent "
        "counts as failed; its command expires then too.",
    )
    force: bool = Field(
        default=False, description="Overwrite flows changed on the machine (drift)."
    )


class DeploymentOut(BaseModel):
    id: str
    release: str
    target: dict[str, object]
    target_text: str
    state: str = Field(description="running, succeeded, partial, aborted or cancelled.")
    reason: str | None
    force: bool
    device_count: int
    canary_size: int
    wave_size: int
    wave_count: int
    waves_started: int
    max_failures_pct: float
    min_finished: int
    timeout_seconds: int
    counts: dict[str, int] = Field(description="How many devices are in each state.")
    created_at: datetime
    created_by: str
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, row: Deployment, counts: dict[str, int], waves_started: int) -> DeploymentOut:
        return cls(
            id=row.id,
            release=row.release_digest,
            target=dict(row.target),
            target_text=row.target_text,
            state=row.state,
            reason=row.reason,
            force=row.force,
            device_count=row.device_count,
            canary_size=row.canary_size,
            wave_size=row.wave_size,
            wave_count=row.wave_count,
            waves_started=waves_started,
            max_failures_pct=row.max_failures_pct,
            min_finished=row.min_finished,
            timeout_seconds=row.timeout_seconds,
            counts=counts,
            created_at=row.created_at,
            created_by=row.created_by,
            updated_at=row.updated_at,
            finished_at=row.finished_at,
        )


class DeploymentDeviceOut(BaseModel):
    device_id: str
    name: str
    wave: int
    state: str = Field(
        description="pending, sent, downloading, installing, applying, succeeded, failed, "
        "rolled_back, drift or cancelled."
    )
    error: str | None
    rev: str | None = Field(description="Node-RED's flows rev after the deployment.")
    command_id: str | None
    sent_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime | None
    seconds: float | None = Field(description="From the command sent to the result.")

    @classmethod
    def of(cls, row: DeploymentDevice, name: str) -> DeploymentDeviceOut:
        seconds = None
        if row.sent_at is not None and row.finished_at is not None:
            seconds = round((row.finished_at - row.sent_at).total_seconds(), 3)
        return cls(
            device_id=row.device_id,
            name=name,
            wave=row.wave,
            state=row.state,
            error=row.error,
            rev=row.rev,
            command_id=row.command_id,
            sent_at=row.sent_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            deadline_at=row.deadline_at,
            seconds=seconds,
        )


class DeploymentDetail(DeploymentOut):
    devices: list[DeploymentDeviceOut]

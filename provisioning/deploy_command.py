"""The `deploy` command: what the gateway signs and the agent runs to apply a flow release.

Both sides import this; it is the contract of one command kind. The arguments (`DeployArgs`)
travel inside the gateway's signed JWS, so the module hashes here are as trustworthy as the
gateway's key: an agent that downloads a module tarball checks it against them.

The progress contract. A device in a deployment goes through the states of
`provisioning.states.DeviceDeployState` in order: the gateway sets ``pending`` and ``sent``; the
agent reports each of `DEPLOY_PROGRESS` (``downloading``, ``installing``, ``applying``; checking
that Node-RED runs the new flows is part of ``applying``) once, as a progress reply, and then
one final state as the command's result (`DeployCommandResult`): ``succeeded``, ``failed``,
``rolled_back`` (the new flows failed their check and the previous ones were restored),
``drift`` (the flows were changed on the machine; nothing was applied) or ``cancelled`` (the
gateway said the deployment was cancelled or timed out before it was applied).
"""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import Field, field_validator

from provisioning.commands import CommandArgs, CommandResult

__all__ = ["DeployArgs", "DeployCommandResult"]

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class DeployArgs(CommandArgs):
    """The `args` of a signed deploy command."""

    what: ClassVar[str] = "deploy command"

    deployment_id: str = Field(min_length=1, max_length=64)
    release: str = Field(description="The bundle digest, sha256:<hex>.")
    force: bool = False
    modules: dict[str, str] = Field(
        default_factory=dict,
        description="name@version -> sha256 (hex) of the tarball in the gateway's module cache.",
    )

    @field_validator("release")
    @classmethod
    def _check_release(cls, value: str) -> str:
        if not _DIGEST.match(value):
            raise ValueError(f"release must be sha256:<64 hex digits>, not {value!r}")
        return value

    @field_validator("modules")
    @classmethod
    def _check_modules(cls, value: dict[str, str]) -> dict[str, str]:
        for spec, digest in value.items():
            if "@" not in spec.lstrip("@") or not _SHA256_HEX.match(digest):
                raise ValueError(f"module {spec!r}: expected name@version -> sha256 hex")
        return value


class DeployCommandResult(CommandResult):
    """The agent's answer to a deploy command (its state is a `DeviceDeployState`)."""

    deployment_id: str | None = None
    release: str | None = Field(default=None, description="The bundle digest applied.")
    rev: str | None = Field(default=None, description="Node-RED's flows rev afterwards.")
    retryable: bool | None = Field(
        default=None,
        description="Nothing was changed because Node-RED was unreachable; the same deployment "
        "may be tried again.",
    )

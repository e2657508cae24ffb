"""The `deploy` command: what the gateway signs and the agent runs to apply a flow release.

Both sides import this; it is the contract of one command kind. The arguments travel inside the
gateway's signed JWS, so the module hashes here are as trustworthy as the gateway's key: an agent
that downloads a module tarball checks it against them.

Per-device states, in the order a device goes through them (the agent reports the middle ones as
progress replies, the last as the command's result):

    pending -> sent -> downloading -> installing -> applying -> succeeded | failed |
    rolled_back | drift | cancelled
"""

from __future__ import annotations

import re
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DEPLOY_KIND",
    "FINAL_DEVICE_STATES",
    "PROGRESS_STATES",
    "DeployArgs",
]

DEPLOY_KIND: Final = "deploy"

PROGRESS_STATES: Final = ("downloading", "installing", "applying")
"""What an agent reports while it works on a deploy command, in this order."""

FINAL_DEVICE_STATES: Final = frozenset({"succeeded", "failed", "rolled_back", "drift", "cancelled"})

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class DeployArgs(BaseModel):
    """The `args` of a signed deploy command."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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

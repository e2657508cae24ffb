"""Which devices a deployment reaches, and in which waves.

A target is the whole fleet, a list of device ids, or tags (every active device carrying all of
them). Devices are ordered online first (so a canary is a machine that can answer now), then by
enrollment, then by id: the same target over the same fleet always makes the same plan.

Wave sizes are "N" devices or "P%" of the target (rounded up, at least one). The canary is the
first wave; the rest go in waves of `wave` devices (all at once if not given).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Final, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from sqlmodel import Session, col, select

from gateway.errors import Invalid
from gateway.registry.models import Device, DeviceState
from provisioning.wire import DEVICE_ID_PATTERN, Tags

__all__ = ["Share", "Target", "plan_waves", "select_devices"]

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
_SHARE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


class Target(BaseModel):
    """Exactly one of: `all`, `devices`, `tags`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # the document says what `_exactly_one` checks
            "minProperties": 1,
            "maxProperties": 1,
            "oneOf": [
                {"required": ["all"], "properties": {"all": {"const": True}}},
                {"required": ["devices"], "properties": {"devices": {"type": "array"}}},
                {
                    "required": ["tags"],
                    "properties": {"tags": {"type": "object", "minProperties": 1}},
                },
            ],
        },
    )

    all: bool = Field(default=False, description="Every active device.")
    devices: list[DeviceId] | None = Field(
        default=None, min_length=1, max_length=100_000, description="These device ids."
    )
    tags: Tags | None = Field(
        default=None, description="Active devices that carry every one of these tags."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [self.all, self.devices is not None, self.tags is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of all=true, devices=[...] or tags={...}")
        if self.tags is not None and not self.tags:
            raise ValueError("tags must name at least one KEY=VALUE")
        return self

    def describe(self) -> str:
        if self.all:
            return "all"
        if self.devices is not None:
            text = ",".join(self.devices)
            return text if len(text) <= 200 else f"{len(self.devices)} devices"
        assert self.tags is not None
        return ",".join(f"{k}={v}" for k, v in sorted(self.tags.items()))[:200]


def select_devices(session: Session, target: Target) -> list[Device]:
    """The active devices a target names, in plan order; Invalid if none or some are unknown."""
    query = select(Device).where(Device.state == DeviceState.active)
    if target.devices is not None:
        wanted = list(dict.fromkeys(target.devices))
        found = {d.id: d for d in session.exec(query.where(col(Device.id).in_(wanted)))}
        missing = [d for d in wanted if d not in found]
        if missing:
            raise Invalid(
                "unknown_devices",
                f"no active device {', '.join(missing[:20])}"
                + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
                + " (unknown or revoked; see `edgefleet devices list`)",
            )
        devices = list(found.values())
    else:
        devices = list(session.exec(query))
        if target.tags is not None:
            tags = target.tags
            devices = [d for d in devices if all(d.tags.get(k) == v for k, v in tags.items())]
    if not devices:
        raise Invalid("no_devices", f"no active device matches the target {target.describe()!r}")
    devices.sort(key=lambda d: (not d.online, d.enrolled_at, d.id))
    return devices


@dataclass(frozen=True)
class Share:
    """A number of devices, or a percentage of the target."""

    value: float
    percent: bool

    @classmethod
    def parse(cls, text: str, what: str) -> Share:
        match = _SHARE.match(text)
        if match is None:
            raise Invalid("bad_share", f"{what} is N devices or P% of the target, not {text!r}")
        value, percent = float(match.group(1)), bool(match.group(2))
        if percent and value > 100:
            raise Invalid("bad_share", f"{what} {text!r} is more than 100%")
        if not percent and value != int(value):
            raise Invalid("bad_share", f"{what} {text!r}: a number of devices is a whole number")
        return cls(value, percent)

    def of(self, total: int) -> int:
        """How many devices this is out of `total` (a non-zero share is at least one)."""
        if self.value == 0:
            return 0
        count = math.ceil(total * self.value / 100) if self.percent else int(self.value)
        return max(1, min(total, count))


def plan_waves(total: int, canary: int, wave: int) -> list[int]:
    """Wave sizes: [canary, wave, wave, ..., rest]; `wave` 0 means all the rest at once."""
    if total <= 0:
        return []
    sizes: list[int] = []
    left = total
    if canary > 0:
        sizes.append(min(canary, left))
        left -= sizes[0]
    step = wave if wave > 0 else left
    while left > 0:
        sizes.append(min(step, left))
        left -= sizes[-1]
    return sizes


def parse_percent(text: str, what: str) -> float:
    match = _SHARE.match(text)
    if match is None or not match.group(2) or float(match.group(1)) > 100:
        raise Invalid("bad_percent", f"{what} is a percentage such as 10%, not {text!r}")
    return float(match.group(1))

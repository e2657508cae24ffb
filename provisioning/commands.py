"""What every command carries and answers, and the `ping` command.

A command is a JWS signed by the gateway (`provisioning.jwt_rules`) whose ``args`` match the
command kind's args model: `PingArgs` here, `DeployArgs` in `deploy_command`, the tunnel commands'
in `tunnel_command`. The agent answers with a `CommandResult` (or the kind's subclass of it): its
``state`` and ``detail`` become the reply's, and all of its fields travel as the reply's ``data``
(`provisioning.wire.Reply`), which the gateway keeps as the command's result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from provisioning.states import CommandState

__all__ = [
    "CommandArgs",
    "CommandResult",
    "InvalidArgs",
    "PingArgs",
    "PingResult",
]


class InvalidArgs(ValueError):
    """A command's args do not match its kind's model; the message says what is wrong."""


class CommandArgs(BaseModel):
    """The ``args`` of one command kind (each kind has its subclass)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: How messages about these args name them ("tunnel request lacks ['ports']").
    what: ClassVar[str] = "request"

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Self:
        """`data` as these args, or InvalidArgs naming the missing, unknown and wrong fields."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise InvalidArgs(describe(exc, cls.what)) from exc


def describe(exc: ValidationError, what: str) -> str:
    """One sentence for a person: what is missing, what is unknown, what is wrong and why."""
    missing = sorted(str(e["loc"][0]) for e in exc.errors() if e["type"] == "missing")
    unknown = sorted(str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden")
    parts = []
    if missing:
        parts.append(f"{what} lacks {missing}")
    if unknown:
        parts.append(f"unknown {what} fields {unknown}")
    for error in exc.errors():
        if error["type"] in ("missing", "extra_forbidden"):
            continue
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


class PingArgs(CommandArgs):
    """`ping` carries anything; the agent echoes it back."""

    model_config = ConfigDict(extra="allow", frozen=True)


class CommandResult(BaseModel):
    """What the agent answers about a command (the reply's state, detail and data)."""

    model_config = ConfigDict(extra="forbid")

    state: CommandState
    detail: str | None = None

    def data(self) -> dict[str, Any]:
        """The reply's ``data``: the fields given when this result was made (JSON types)."""
        return self.model_dump(mode="json", exclude_unset=True)


class PingResult(CommandResult):
    echo: dict[str, Any]

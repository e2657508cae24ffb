"""What a device may put into the gateway: bounded, typed text, and the size of its messages.

Everything a machine sends (its status, its replies, what it says at enrollment) ends up in the
registry and on an operator's terminal or browser. A machine may be broken or in hostile hands, so
each field is checked here, on the wire contract both sides import, before anything stores it:

* identifiers and versions are short printable ASCII (`ShortText`): no control characters, no
  escape sequences, at most 64 characters;
* free text (a command's error message) is bounded (`DetailText`, `MAX_DETAIL_CHARS`); it may hold
  line breaks, so whatever shows it escapes control characters (the CLI does, see
  `edgefleet.output.safe`);
* every message is bounded in bytes, at the gateway (`MAX_STATUS_BYTES`, `MAX_REPLY_BYTES`, the
  telemetry limit) and again at the broker (`MAX_MQTT_PACKET_BYTES`, which the supervised
  Mosquitto and the EMQX layout are configured with).

`MessageRefused` carries a stable `reason` (counted by the gateway) and a `detail` that never
quotes the payload: a refusal is logged, and a log must not become the device's megaphone.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, StringConstraints, ValidationError

from provisioning.telemetry import DEFAULT_MAX_BYTES

MAX_STATUS_BYTES: Final = 4 * 1024
"""A status message (state, two versions, a few counters) is ~200 bytes."""
MAX_REPLY_BYTES: Final = 64 * 1024
"""A reply carries a state, a detail and a small result document."""
MAX_MQTT_PACKET_BYTES: Final = DEFAULT_MAX_BYTES + 16 * 1024
"""The broker's packet limit: the largest telemetry message plus room for topic and properties.
A device's publish over it is refused by the broker itself (Mosquitto disconnects the client)."""
MAX_DETAIL_CHARS: Final = 4000
"""Longest free-text detail a reply may carry (an agent shortens longer ones before sending)."""
MAX_SHORT_TEXT: Final = 64

# Printable ASCII only: version strings, host names, ids. Nothing a terminal would interpret.
SHORT_TEXT_PATTERN: Final = r"^[\x20-\x7e]*$"
HOSTNAME_PATTERN: Final = r"^[A-Za-z0-9_.:-]*$"
COMMAND_ID_PATTERN: Final = r"^(?:[A-Za-z0-9_-]{1,64}|\?)$"
"""A command id, or ``?`` for a reply to a command the agent could not even read."""

# What a terminal would act on: C0 controls but tab and line feed (ESC starts the sequences that
# move the cursor, clear the screen, retitle the window), DEL, the C1 controls (0x9b is a CSI on
# its own), and Unicode's bidirectional overrides and isolates, which reorder what a reader sees
# ("Trojan source").
UNSAFE_IN_TEXT: Final = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
_SURROGATE: Final = re.compile("[\ud800-\udfff]")

ReplyState = Literal[
    "running",
    "downloading",
    "installing",
    "applying",
    "succeeded",
    "failed",
    "refused",
    "rolled_back",
    "drift",
    "cancelled",
]
"""Every state an agent may report about a command (progress first, then one result)."""

ShortText = Annotated[str, StringConstraints(max_length=MAX_SHORT_TEXT, pattern=SHORT_TEXT_PATTERN)]
HostName = Annotated[str, StringConstraints(max_length=255, pattern=HOSTNAME_PATTERN)]
CommandId = Annotated[str, StringConstraints(pattern=COMMAND_ID_PATTERN)]


def _shorten(value: object) -> object:
    return shorten_detail(value) if isinstance(value, str) else value


DetailText = Annotated[
    str, BeforeValidator(_shorten), StringConstraints(max_length=MAX_DETAIL_CHARS)
]
"""Free text, cut to `MAX_DETAIL_CHARS` (an ellipsis marks the cut); lone surrogates replaced."""


class MessageRefused(ValueError):
    """A device's message breaks the contract; `reason` is stable, `detail` quotes no payload."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


OVERSIZED: Final = "oversized"
MALFORMED_JSON: Final = "malformed_json"
SCHEMA: Final = "schema"
REFUSAL_REASONS: Final = frozenset({OVERSIZED, MALFORMED_JSON, SCHEMA})

M = TypeVar("M", bound=BaseModel)


def parse_message(model: type[M], payload: bytes, max_bytes: int) -> M:
    """Validate one device message as `model`, or raise `MessageRefused`.

    The refusal names the first field that was wrong and why, never the value it held.
    """
    if len(payload) > max_bytes:
        raise MessageRefused(
            OVERSIZED, f"message is {len(payload)} bytes, the limit is {max_bytes}"
        )
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise refusal_of(exc) from None


def refusal_of(exc: ValidationError) -> MessageRefused:
    """A `MessageRefused` from pydantic's first error: where and what, without the input."""
    error = exc.errors(include_url=False, include_input=False, include_context=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "message"
    if error["type"] in {"json_invalid", "json_type"}:
        return MessageRefused(MALFORMED_JSON, f"not UTF-8 JSON: {error['msg']}")
    return MessageRefused(SCHEMA, f"{where}: {error['msg']}")


def shorten_detail(text: str | None) -> str | None:
    """The agent's side of `DetailText`: a detail cut to the limit, surrogates replaced."""
    if text is None:
        return None
    clean = _SURROGATE.sub("\ufffd", text)
    if len(clean) <= MAX_DETAIL_CHARS:
        return clean
    return clean[: MAX_DETAIL_CHARS - 1] + "\u2026"


def fits_json(value: Any, max_bytes: int) -> bool:
    """Whether `value` encodes to at most `max_bytes` of JSON (a bound on stored documents)."""
    try:
        return len(json.dumps(value, separators=(",", ":"))) <= max_bytes
    except (TypeError, ValueError, RecursionError):
        return False


def has_unsafe_characters(text: str) -> bool:
    """Whether `text` holds anything a terminal would interpret (see the module's list)."""
    return UNSAFE_IN_TEXT.search(text) is not None

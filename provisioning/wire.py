"""What crosses the wire between agent and gateway: topics, enrollment, status.

This module is the contract. The gateway and the agent import it and nothing of each other.
Commands are compact JWS strings (see `jwt_rules`); their ``args`` and results are the models of
`commands`, `deploy_command` and `tunnel_command`; the names of states are in `states`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from provisioning.device_input import (
    MAX_REPLY_BYTES,
    CommandId,
    DetailText,
    HostName,
    ReplyState,
    ShortText,
)

DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,63}$"
"""The one rule for a device id: it becomes an MQTT topic segment, broker username and client id."""
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
_PREFIX_SEGMENT_RE = re.compile(r"[A-Za-z0-9_.-]+")
DEFAULT_TOPIC_PREFIX = "fleet"
SHARED_GROUP = "gateway"
#: What a device publishes under ``{prefix}/{device}/``, and the one topic it reads.
DEVICE_PUBLISHES = ("telemetry", "status", "reply")
DEVICE_RECEIVES = "cmd"

TAG_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
TAG_VALUE_PATTERN = r"^[A-Za-z0-9_.:/-]{0,128}$"
TagKey = Annotated[str, StringConstraints(pattern=TAG_KEY_PATTERN)]
TagValue = Annotated[str, StringConstraints(pattern=TAG_VALUE_PATTERN)]
Tags = Annotated[
    dict[TagKey, TagValue],
    WithJsonSchema(  # pydantic leaves out that keys matching no pattern are refused
        {
            "type": "object",
            "patternProperties": {
                TAG_KEY_PATTERN: {"type": "string", "pattern": TAG_VALUE_PATTERN}
            },
            "additionalProperties": False,
        }
    ),
]
DeviceName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def is_device_id(value: str) -> bool:
    return isinstance(value, str) and _DEVICE_ID_RE.fullmatch(value) is not None


def validate_device_id(device_id: str) -> str:
    """Return `device_id` if it follows `DEVICE_ID_PATTERN`, else ValueError saying the rule."""
    if not is_device_id(device_id):
        raise ValueError(
            f"invalid device id {device_id!r}: use 3 to 64 characters from a-z, 0-9 and '-', "
            "starting with a letter or digit (it becomes an MQTT topic segment, username and "
            "client id)"
        )
    return device_id


def validate_topic_prefix(prefix: str) -> str:
    """Return `prefix` if it is a plain topic path (no wildcards, no ``$``), else ValueError."""
    segments = prefix.split("/") if isinstance(prefix, str) else [""]
    if not all(_PREFIX_SEGMENT_RE.fullmatch(segment) for segment in segments):
        raise ValueError(
            f"invalid topic prefix {prefix!r}: use one or more '/'-separated segments of "
            f"letters, digits, '_', '.' and '-' (no wildcards, no '$'), e.g. 'fleet'"
        )
    return prefix


#: Claim codes (a stock machine's label): no 0/O, 1/I/L look-alikes; read aloud, typed by hand.
CLAIM_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CLAIM_CODE_LENGTH = 20


def normalize_claim_code(code: str) -> str:
    """'abcde-fghjk ...' -> 'ABCDEFGHJK...'; ValueError for anything that is not a claim code."""
    text = "".join(code.split()).replace("-", "").upper()
    if len(text) != CLAIM_CODE_LENGTH or any(c not in CLAIM_CODE_ALPHABET for c in text):
        raise ValueError(
            f"a claim code is {CLAIM_CODE_LENGTH} letters and digits in groups of 5, as printed "
            "on the machine's label"
        )
    return text


@dataclass(frozen=True)
class Topics:
    """The topic tree of one fleet: ``{prefix}/{device}/{telemetry|status|cmd|reply}``.

    The one place topic strings are built, for the clients and for the broker's permissions.
    """

    prefix: str = DEFAULT_TOPIC_PREFIX

    def device(self, device_id: str, leaf: str) -> str:
        return f"{self.prefix}/{device_id}/{leaf}"

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, "telemetry")

    def status(self, device_id: str) -> str:
        return self.device(device_id, "status")

    def cmd(self, device_id: str) -> str:
        return self.device(device_id, DEVICE_RECEIVES)

    def reply(self, device_id: str) -> str:
        return self.device(device_id, "reply")

    def device_publishes(self, device_id: str) -> tuple[str, ...]:
        """The topics a device may publish on (and nothing else)."""
        return tuple(self.device(device_id, leaf) for leaf in DEVICE_PUBLISHES)

    def shared(self, leaf: str, group: str = SHARED_GROUP) -> str:
        """The shared subscription gateway replicas split between them (``+``: any group)."""
        return f"$share/{group}/{self.prefix}/+/{leaf}"

    def all_of(self, leaf: str) -> str:
        return f"{self.prefix}/+/{leaf}"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(device id, leaf) of a topic in this tree, or None for anything else."""
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != self.prefix or not is_device_id(parts[1]):
            return None
        return parts[1], parts[2]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrollRequest(_Strict):
    token: Annotated[str, StringConstraints(min_length=8, max_length=200)]
    public_key: Annotated[str, StringConstraints(min_length=50, max_length=2000)] = Field(
        description="The device's EC P-256 public key, PEM (SubjectPublicKeyInfo)."
    )
    name: DeviceName | None = None
    agent_version: ShortText = ""
    hostname: HostName = ""


class BrokerCredential(_Strict):
    host: str | None = Field(
        description="Broker host; null means the host the agent reached the gateway on."
    )
    port: int
    tls: bool = True
    username: str
    password: str
    client_id: str
    ca_cert: str | None = Field(description="PEM of the CA that signed the broker certificate.")


class EnrollResponse(BaseModel):
    # Not strict: an agent keeps working when a newer gateway adds a field.
    model_config = ConfigDict(extra="ignore")

    device_id: str
    name: str
    tags: dict[str, str]
    gateway_id: str = Field(description="The audience of the device's JWTs.")
    gateway_public_key: str = Field(description="PEM; every command is signed by this key.")
    topic_prefix: str
    broker: BrokerCredential
    claim_code: str | None = Field(
        default=None,
        description="A machine enrolled into stock: the code its customer claims it with "
        "(for its label). Absent for a machine enrolled to a customer.",
    )


class DeviceStatus(BaseModel):
    """The retained message on ``{prefix}/{device}/status`` (offline one is the Last Will)."""

    model_config = ConfigDict(extra="ignore")

    state: Literal["online", "offline"]
    agent_version: ShortText | None = None
    node_red_version: ShortText | None = None
    ts: float | None = Field(default=None, allow_inf_nan=False)
    outbox_queued: int | None = Field(default=None, ge=0, le=2**63 - 1)
    outbox_dropped: int | None = Field(default=None, ge=0, le=2**63 - 1)
    node_red_up: bool | None = Field(
        default=None, description="Whether Node-RED answered the agent's last probe."
    )


class Reply(BaseModel):
    """What an agent publishes on ``{prefix}/{device}/reply`` about a command it got."""

    model_config = ConfigDict(extra="ignore")

    command_id: CommandId
    state: ReplyState
    detail: DetailText | None = None
    data: dict[str, object] = Field(
        default_factory=dict,
        description=f"The command's result document; the whole reply is at most "
        f"{MAX_REPLY_BYTES} bytes.",
    )
    ts: float | None = Field(default=None, allow_inf_nan=False)


class FieldError(BaseModel):
    """One problem with a request: where (``["body", "tags", "site"]``) and what."""

    loc: list[str]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """The body of every HTTP error the gateway sends."""

    detail: str
    reason: str | None = None
    errors: list[FieldError] | None = Field(
        default=None,
        description="For a request that failed validation: each problem (at most 10); the "
        "values sent are not repeated.",
    )

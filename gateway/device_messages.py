"""The gateway's door for status and reply messages: validate, count and log each refusal once.

The listeners hand every payload to `DeviceMessages.status` / `.reply`; what comes back is a
checked wire model (`provisioning.device_input` says what is checked) or None. A refusal is
counted in ``edgefleet_device_messages_refused_total{kind, reason}`` and logged once per device,
kind and reason per interval (`RefusalLog`), naming the field that was wrong, never its value:
4,000 bad messages make a handful of log lines, not 4,000 copies of what a device sent.
"""

from __future__ import annotations

import logging
from typing import Final, TypeVar

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel

from gateway.telemetry.refusals import DEFAULT_INTERVAL, RefusalLog
from provisioning.device_input import (
    MAX_REPLY_BYTES,
    MAX_STATUS_BYTES,
    REFUSAL_REASONS,
    MessageRefused,
    parse_message,
)
from provisioning.wire import DeviceStatus, Reply

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

KINDS: Final = ("status", "reply")
UNKNOWN_DEVICE: Final = "unknown_device"
"""The topic names no active device (revoked since it published, or never enrolled)."""
UNKNOWN_COMMAND: Final = "unknown_command"
"""A reply about a command the gateway did not send to that device."""
REASONS: Final = frozenset(REFUSAL_REASONS | {UNKNOWN_DEVICE, UNKNOWN_COMMAND})


class DeviceMessages:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        interval: float = DEFAULT_INTERVAL,
        max_status_bytes: int = MAX_STATUS_BYTES,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        self._registry = registry if registry is not None else CollectorRegistry()
        self.refused = Counter(
            "edgefleet_device_messages_refused",
            "Status and reply messages from devices refused, by kind and reason (dropped).",
            ["kind", "reason"],
            registry=self._registry,
        )
        for kind in KINDS:
            for reason in sorted(REASONS):
                self.refused.labels(kind=kind, reason=reason)
        self._logs = {kind: RefusalLog(log, interval, what=kind) for kind in KINDS}
        self._max = {"status": max_status_bytes, "reply": max_reply_bytes}

    def status(self, device_id: str, payload: bytes) -> DeviceStatus | None:
        return self._parse("status", DeviceStatus, device_id, payload)

    def reply(self, device_id: str, payload: bytes) -> Reply | None:
        return self._parse("reply", Reply, device_id, payload)

    def _parse(self, kind: str, model: type[M], device_id: str, payload: bytes) -> M | None:
        try:
            return parse_message(model, payload, self._max[kind])
        except MessageRefused as exc:
            self.refuse(kind, device_id, exc)
            return None

    def refuse(self, kind: str, device_id: str, exc: MessageRefused) -> None:
        self.refused.labels(kind=kind, reason=exc.reason).inc()
        self._logs[kind].refused(device_id, exc.reason, exc.detail)

    def unknown_device(self, kind: str, device_id: str) -> None:
        self.refuse(kind, device_id, MessageRefused(UNKNOWN_DEVICE, "no such active device"))

    def unknown_command(self, device_id: str, command_id: str) -> None:
        detail = f"no command {command_id} was sent to this device"
        self.refuse("reply", device_id, MessageRefused(UNKNOWN_COMMAND, detail))

    def refused_count(self, kind: str, reason: str) -> float:
        labels = {"kind": kind, "reason": reason}
        value = self._registry.get_sample_value("edgefleet_device_messages_refused_total", labels)
        return value or 0.0

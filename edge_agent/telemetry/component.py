"""The agent's telemetry: outbox, local intake, host metrics and the sender, as one component.

- `Outbox` (``outbox.db`` in the state directory): every sample is on disk before it is sent
  and leaves only when the broker acknowledged its batch.
- `IntakeServer`: Node-RED posts samples to ``http://127.0.0.1:1881/telemetry`` (loopback).
- `HostSampler`: CPU, memory and the state directory's disk, every ``host_metrics_interval``.
- `TelemetrySender`: publishes the outbox's batches on ``{prefix}/{device}/telemetry`` over the
  agent's own MQTT client; the agent forwards paho's callbacks here (`Component`).

A part that cannot start (the intake port is taken, say) is logged and left out; the agent keeps
running its other jobs (commands, tunnels), and samples from the parts that did start still go
out. The status message reports ``outbox_queued`` and ``outbox_dropped``.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING, Any

from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.settings import AgentSettings
from edge_agent.telemetry.host_metrics import HostSampler
from edge_agent.telemetry.intake import IntakeError, IntakeServer
from edge_agent.telemetry.outbox import Outbox, OutboxError
from edge_agent.telemetry.sender import TelemetrySender

if TYPE_CHECKING:
    from edge_agent.runner import Agent

log = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.db"


class TelemetryComponent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.outbox: Outbox | None = None
        self.sender: TelemetrySender | None = None
        self.intake: IntakeServer | None = None
        self.sampler: HostSampler | None = None
        self._final: dict[str, Any] = {}

    def start(self, agent: Agent) -> None:
        settings = self.settings
        try:
            self.outbox = Outbox(
                settings.state_dir / OUTBOX_FILE,
                max_samples=settings.outbox_max_samples,
                batch_size=min(settings.outbox_batch_size, settings.outbox_max_samples),
            )
        except OutboxError as exc:
            log.error("telemetry is off: %s", exc)
            return
        topic = agent.topics.telemetry(agent.identity.device_id)
        self.sender = TelemetrySender(agent.client, topic, self.outbox)
        self.sender.start()
        if settings.telemetry_intake:
            intake = IntakeServer(
                self.outbox, settings.telemetry_intake_host, settings.telemetry_intake_port
            )
            try:
                intake.start()
                self.intake = intake
            except IntakeError as exc:
                log.error("no local telemetry intake: %s", exc)
        if settings.host_metrics_interval > 0:
            self.sampler = HostSampler(
                self.outbox, settings.host_metrics_interval, disk_path=settings.state_dir
            )
            self.sampler.start()

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.intake is not None:
            self.intake.stop()
        if self.sender is not None:
            self.sender.stop()
        if self.outbox is not None:
            self._final = self.status()  # for the "offline" status sent after the stop
            self.outbox.close()
            self.outbox = None

    # paho's network thread: the sender only queues an event and wakes its own thread.

    def on_connect(self) -> None:
        if self.sender is not None:
            self.sender.on_connect()

    def on_disconnect(self) -> None:
        if self.sender is not None:
            self.sender.on_disconnect()

    def on_publish(self, mid: int, reason_code: ReasonCode) -> None:
        if self.sender is not None:
            self.sender.on_publish(mid, reason_code)

    def status(self) -> dict[str, Any]:
        if self.outbox is None:
            return self._final
        try:
            stats = self.outbox.stats()
        except (OutboxError, sqlite3.Error) as exc:  # the status goes out without them
            log.warning("cannot read the outbox for the status: %s", exc)
            return {}
        return {"outbox_queued": stats.queued, "outbox_dropped": stats.dropped}

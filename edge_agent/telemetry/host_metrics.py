"""The agent's own host telemetry: CPU, memory and disk use, sampled on an interval.

A machine whose disk fills or whose CPU is pegged stops doing its job long before anyone looks
at it; these three numbers let the manufacturer see it coming. They go through the same outbox
as the machine's own data, so they survive outages the same way.

Metrics (percent, 0-100): ``host.cpu_percent`` (all CPUs, averaged over the last interval),
``host.mem_percent`` (memory in use), ``host.disk_percent`` (the file system holding the
agent's data directory, where the outbox grows).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Final

import psutil

from edge_agent.telemetry.outbox import Outbox, OutboxError
from provisioning.periodic import Periodic
from provisioning.telemetry import BatchRejected

log = logging.getLogger(__name__)

CPU: Final = "host.cpu_percent"
MEMORY: Final = "host.mem_percent"
DISK: Final = "host.disk_percent"


class HostSampler:
    """Adds one sample of each host metric to the outbox every ``interval`` seconds."""

    def __init__(self, outbox: Outbox, interval: float = 60.0, disk_path: Path = Path("/")) -> None:
        if interval <= 0:
            raise ValueError(f"host metrics interval must be positive, got {interval}")
        self.outbox = outbox
        self.interval = interval
        self.disk_path = disk_path
        self._periodic = Periodic("host-metrics", self._tick, interval)
        self._problems: set[str] = set()

    def read(self) -> dict[str, float]:
        """One reading. CPU is the average since the previous call (psutil keeps the mark).

        A disk path that cannot be read (unmounted, removed) leaves disk out and is logged;
        CPU and memory are still worth sending.
        """
        values = {
            CPU: float(psutil.cpu_percent(interval=None)),
            MEMORY: float(psutil.virtual_memory().percent),
        }
        try:
            values[DISK] = float(psutil.disk_usage(str(self.disk_path)).percent)
            self._problems.discard("disk")
        except OSError as exc:
            self._warn_once("disk", f"cannot read disk use of {self.disk_path}: {exc}")
        return values

    def record(self) -> dict[str, float]:
        """Take a reading and store it in the outbox; returns what was stored."""
        values = self.read()
        self.outbox.add_values(values, ts=time.time())
        return values

    def start(self) -> None:
        if self._periodic.running:
            return
        psutil.cpu_percent(interval=None)  # set the mark: the first real reading is an average
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()

    def _tick(self) -> None:
        try:
            self.record()
            self._problems.discard("record")
        except (OutboxError, BatchRejected, OSError) as exc:
            self._warn_once("record", f"host metrics not recorded: {exc}")

    def _warn_once(self, problem: str, message: str) -> None:
        """Log a failure when it starts, not on every interval while it lasts."""
        if problem not in self._problems:
            log.warning(message)
            self._problems.add(problem)

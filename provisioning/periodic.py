"""One background thread that does one thing every so often, and stops when asked.

The agent's host metrics, the gateway's telemetry maintenance and its tunnel hub runner each are
one `Periodic`: `tick()` runs on the thread every `interval` seconds (the first after one
interval, or at once with ``first_at_start``); a tick may return how long to wait before the
next one instead (the hub runner ticks fast while a tunnel is on its way); `wake()` runs the
next tick now. An exception in a tick is logged and the next tick comes as planned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(
        self,
        name: str,
        tick: Callable[[], float | None],
        interval: float,
        *,
        first_at_start: bool = False,
        daemon: bool = True,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"{name}: the interval must be positive, got {interval}")
        self.name = name
        self.interval = interval
        self._tick = tick
        self._first_at_start = first_at_start
        self._daemon = daemon
        self._wake = threading.Event()
        self.stopping = threading.Event()
        """Set by `stop`: a tick that pauses or loops should wait on it."""
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (again after a `stop`); nothing if it runs."""
        if self._thread is not None:
            return
        self.stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=self._daemon)
        self._thread.start()

    def wake(self) -> None:
        """Run the next tick now rather than at its time."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Let the tick in progress finish and end the thread."""
        self.stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        delay = 0.0 if self._first_at_start else self.interval
        while not self._wait(delay):
            try:
                asked = self._tick()
            except Exception:
                log.exception("%s failed; next try in %.1fs", self.name, self.interval)
                asked = None
            delay = self.interval if asked is None else asked

    def _wait(self, delay: float) -> bool:
        """Wait `delay` seconds or until woken; whether to stop."""
        if delay > 0:
            self._wake.wait(delay)
        self._wake.clear()
        return self.stopping.is_set()

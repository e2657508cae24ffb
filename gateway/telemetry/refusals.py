"""Logging refused telemetry without flooding: once per device and reason, then a summary.

A broken publisher may send thousands of bad batches a second; the log should say once which
device sends what and why, and later how many more followed, not repeat itself. Counting by
reason is the metrics' job (`TelemetryMetrics.refused`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

DEFAULT_INTERVAL: Final = 600.0
DEFAULT_MAX_KEYS: Final = 10_000


@dataclass(slots=True)
class _Seen:
    logged_at: float
    suppressed: int


class RefusalLog:
    """Logs a refusal of ``(device, reason)`` at most once per ``interval`` seconds.

    Remembers at most ``max_keys`` pairs (oldest forgotten first), so a flood of made-up device
    ids cannot grow it without bound.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL,
        max_keys: int = DEFAULT_MAX_KEYS,
        what: str = "telemetry",
    ) -> None:
        self._log = logger
        self._what = what
        self._interval = interval
        self._max_keys = max_keys
        self._seen: OrderedDict[tuple[str, str], _Seen] = OrderedDict()

    def refused(self, device: str, reason: str, detail: str) -> bool:
        """Record one refusal; True if it was logged (not suppressed)."""
        key = (device, reason)
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen.logged_at < self._interval:
            seen.suppressed += 1
            return False
        more = ""
        if seen is not None and seen.suppressed:
            more = f" ({seen.suppressed} more since the last report)"
        self._log.warning("%s from %s refused (%s): %s%s", self._what, device, reason, detail, more)
        self._seen[key] = _Seen(now, 0)
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        return True

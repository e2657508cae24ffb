"""Failed enrollments: logged, audited, and limited per client address.

Enrollment is the one write anybody may attempt without a credential of their own. Each failed
attempt (unknown, expired or used-up token, bad key, key already enrolled) is written to the
audit log (`device.enroll_failed`: the client's address, the reason and the refusal's text,
which names a known token by its id and never holds a secret) and logged once per address
and reason per interval. An address with `limit` failures within a minute is refused with 429
and ``Retry-After`` until the oldest of them is a minute old, before its request is looked at;
successful enrollments never count, so a factory line enrolling a hundred machines from one
address is never slowed.

The counts live in this replica's memory (at most `MAX_ADDRESSES` addresses, the oldest
forgotten first): with several replicas an address gets the limit at each. A limit is no
session: losing it on a restart costs nothing but a minute of guessing, against tokens of 256
random bits.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from typing import Final

from prometheus_client import CollectorRegistry, Counter
from sqlmodel import Session

from gateway.errors import GatewayError
from gateway.registry import audit
from gateway.telemetry.refusals import RefusalLog

log = logging.getLogger(__name__)
WINDOW_SECONDS: Final = 60.0
MAX_ADDRESSES: Final = 10_000


class TooManyFailures(GatewayError):
    status = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__("too_many_failures", detail)
        self.headers = {"Retry-After": str(retry_after)}


class EnrollGuard:
    def __init__(
        self, limit: int, window: float = WINDOW_SECONDS, registry: CollectorRegistry | None = None
    ) -> None:
        self.limit = limit
        self.window = window
        self.refused = Counter(
            "edgefleet_enroll_refused",
            "Enrollments refused, by reason (too_many_failures: the address's limit).",
            ["reason"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()
        self._log = RefusalLog(log, what="enrollment")

    def check(self, address: str) -> None:
        """Raise `TooManyFailures` while `address` is over its limit."""
        now = time.monotonic()
        with self._lock:
            recent = self._recent(address, now)
            if len(recent) < self.limit:
                return
            wait = max(1, math.ceil(recent[0] + self.window - now))
        self.refused.labels(reason="too_many_failures").inc()
        raise TooManyFailures(
            f"too many failed enrollments from {address}; try again in {wait} s", wait
        )

    def failed(self, session: Session, address: str, exc: GatewayError) -> None:
        """Count, audit (committed at once: the enrollment itself was rolled back) and log."""
        now = time.monotonic()
        with self._lock:
            self._recent(address, now).append(now)
            self._failures.move_to_end(address)
            while len(self._failures) > MAX_ADDRESSES:
                self._failures.popitem(last=False)
        self.refused.labels(reason=exc.reason).inc()
        session.rollback()
        audit.record(
            session,
            f"address:{address}"[:80],
            "device.enroll_failed",
            "",
            reason=exc.reason,
            status=exc.status,
            detail=exc.detail[:200],
        )
        session.commit()
        self._log.refused(address, exc.reason, exc.detail)

    def _recent(self, address: str, now: float) -> deque[float]:
        found = self._failures.setdefault(address, deque())
        while found and found[0] <= now - self.window:
            found.popleft()
        return found

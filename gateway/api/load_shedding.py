"""Polite overload: a bounded number of requests in flight, a short wait, then 503 Retry-After.

Every request the application runs holds a worker thread and, mostly, a database connection.
Unbounded, a crowd of readers takes every pooled connection; the next request waits out the
pool's timeout and fails with a 500, and everything else (the health check, the MQTT side) waits
behind them. Here at most ``max_in_flight`` requests run at once (the API's database pool is sized
to match, `gateway.db.api_pool`), up to ``max_waiting`` more wait up to ``queue_timeout`` seconds
for a place in arrival order, and the rest get ``503 {"reason": "overloaded"}`` with
``Retry-After`` at once. Nothing hangs and nothing fails for want of a connection.

Paths in ``exempt`` (the health check, the metrics) skip the queue: they touch no database and
must answer while the API is saturated.

Device data comes first: while ``yield_to()`` says so (the telemetry ingest trails the machines
by more than ``http_yield_lag``), new requests wait too, up to the same ``queue_timeout``. The
API's handlers and the ingest's writer are threads of one interpreter, which hands its lock to
each runnable thread in turn: sixteen busy handlers leave the writer a seventeenth of the time,
and telemetry would fall ever further behind while a crowd reads.

The body of a request is read under ``body_timeout`` (the whole body) and ``read_timeout`` (each
chunk): a client that trickles its upload does not hold a place forever; it gets 408.

Why not a library: Starlette, FastAPI and uvicorn offer only uvicorn's ``limit_concurrency``,
which counts connections and answers 503 without Retry-After, for the health check too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.early_answer import EarlyAnswer, answer

_YIELD_POLL: Final = 0.02


class LoadShedding:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_in_flight: int,
        max_waiting: int,
        queue_timeout: float,
        retry_after: float = 1.0,
        body_timeout: float = 60.0,
        read_timeout: float = 15.0,
        exempt: Iterable[str] = ("/healthz", "/metrics"),
        refused: Counter | None = None,
        yield_to: Callable[[], bool] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.app = app
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting
        self.queue_timeout = queue_timeout
        self.retry_after = max(1, math.ceil(retry_after))
        self.body_timeout = body_timeout
        self.read_timeout = read_timeout
        self.exempt = frozenset(exempt)
        self.refused = refused
        self.yield_to = yield_to
        self._gate: asyncio.Event | None = None
        self._watcher: asyncio.Task[None] | None = None
        if refused is not None:
            for reason in ("overloaded", "body_timeout"):
                refused.labels(reason=reason)
        self._slots: asyncio.Semaphore | None = None  # made on the server's event loop
        self.in_flight = 0
        self.waiting = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_in_flight)
        slots = self._slots
        if self.yield_to is not None and self.yield_to() and not await self._yield(send):
            return
        if slots.locked():
            if self.waiting >= self.max_waiting:
                await self._overloaded(send)
                return
            self.waiting += 1
            try:
                await asyncio.wait_for(slots.acquire(), self.queue_timeout)
            except TimeoutError:
                await self._overloaded(send)
                return
            finally:
                self.waiting -= 1
        else:
            await slots.acquire()
        self.in_flight += 1
        early = EarlyAnswer(send)
        try:
            await self.app(scope, self._timed(receive, early), early.send)
        finally:
            self.in_flight -= 1
            slots.release()

    async def _yield(self, send: Send) -> bool:
        """Wait while `yield_to` says the devices come first; False: refused (503) instead.

        One watcher task asks `yield_to` every `_YIELD_POLL` seconds and opens a gate for all
        the waiting requests at once (a poll per waiting request would itself keep the
        interpreter busy)."""
        if self.waiting >= self.max_waiting:
            await self._overloaded(send)
            return False
        if self._gate is None:
            self._gate = asyncio.Event()
        if self._watcher is None or self._watcher.done():
            self._gate.clear()  # now: a gate left open by the last watcher must not let this by
            self._watcher = asyncio.create_task(self._watch(self._gate))
        self.waiting += 1
        try:
            await asyncio.wait_for(self._gate.wait(), self.queue_timeout)
        except TimeoutError:
            await self._overloaded(send)
            return False
        finally:
            self.waiting -= 1
        return True

    async def _watch(self, gate: asyncio.Event) -> None:
        """Keep the gate closed while the devices come first; open it and end."""
        while self.yield_to is not None and self.yield_to():
            await asyncio.sleep(_YIELD_POLL)
        gate.set()

    def _timed(self, receive: Receive, early: EarlyAnswer) -> Receive:
        deadline = time.monotonic() + self.body_timeout
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # waiting for a disconnect while the response streams: no deadline
                return await receive()
            left = min(self.read_timeout, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except TimeoutError:
                self._count("body_timeout")
                return await early.answer(
                    408, "body_timeout", "the request body arrived too slowly"
                )
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        return timed_receive

    def _count(self, reason: str) -> None:
        if self.refused is not None:
            self.refused.labels(reason=reason).inc()

    async def _overloaded(self, send: Send) -> None:
        self._count("overloaded")
        await answer(
            send,
            503,
            "overloaded",
            f"the gateway is busy; try again in {self.retry_after} s",
            {"Retry-After": str(self.retry_after)},
        )
